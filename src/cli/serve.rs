//! `volcrypt serve [--config FILE] [--socket PATH]`, and the `--socket PATH` mode of
//! attach/detach/extend/status, which sends the command to a running agent instead of acting
//! directly (so operators use one tool, and the agent's locks and budget apply).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use crate::cli::volume::VolumeCommand;
use crate::error::Error;
use crate::request::AttachRequest;
use crate::rpc::{self, client, routes::percent_encode};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML: [server], [volume], [key_manager]; every key has a default, see
    /// `rpc::config`) [default /etc/volcrypt/volcrypt.toml if it exists, else the defaults].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Socket to listen on (overrides `server.socket`; default /run/volcrypt/api.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// Run the agent until SIGTERM/SIGINT.
pub fn run(args: ServeArgs) -> Result<(), Error> {
    let (mut config, key_manager) = crate::config::load_serve(args.config.as_deref())?;
    if let Some(s) = args.socket {
        config.server.socket = s;
    }
    let manager = crate::keys::from_config(&key_manager).map_err(rpc::Error::from)?;
    let keys = rpc::Keys::from_manager(Arc::from(manager));
    rpc::server::run_blocking(config, keys)?;
    Ok(())
}

/// When the volume command names a socket, run it through the agent; `None`: act directly.
pub fn remote(cmd: &VolumeCommand) -> Option<Result<(), Error>> {
    let socket = match cmd {
        VolumeCommand::Attach(a) => a.opts.socket.as_deref(),
        VolumeCommand::Detach(a) => a.opts.socket.as_deref(),
        VolumeCommand::Extend(a) => a.opts.socket.as_deref(),
        VolumeCommand::Rekey(a) => a.opts.socket.as_deref(),
        VolumeCommand::Tune(a) => a.opts.socket.as_deref(),
        VolumeCommand::Status(a) => a.opts.socket.as_deref(),
        VolumeCommand::Reconcile(a) => a.opts.socket.as_deref(),
        VolumeCommand::Verify(a) => a.opts.socket.as_deref(),
    }?;
    Some(remote_at(socket, cmd))
}

fn remote_at(socket: &Path, cmd: &VolumeCommand) -> Result<(), Error> {
    let reply = match cmd {
        VolumeCommand::Attach(a) => {
            let req = AttachRequest::read(&a.request)?;
            let body = serde_json::to_vec(&req)
                .map_err(|e| Error::Usage(format!("cannot encode the request: {e}")))?;
            client::call(socket, "POST", "/v1/attachments", Some(body))?
        }
        VolumeCommand::Detach(a) => {
            if a.timeout.is_some() {
                return Err(Error::Usage(
                    "--timeout applies without --socket only (the agent uses its configured detach timeout)".into(),
                ));
            }
            let mut path = format!("/v1/attachments/{}", percent_encode(&a.volume_id));
            if let Some(p) = &a.device_path {
                path.push_str("?device_path=");
                path.push_str(&percent_encode(&p.to_string_lossy()));
            }
            client::call(socket, "DELETE", &path, None)?
        }
        VolumeCommand::Extend(a) => client::call(
            socket,
            "POST",
            &format!("/v1/attachments/{}/extend", percent_encode(&a.volume_id)),
            None,
        )?,
        VolumeCommand::Rekey(a) => {
            let body = serde_json::json!({ "new_key_id": a.new_key_id }).to_string();
            client::call(
                socket,
                "POST",
                &format!("/v1/attachments/{}/rekey", percent_encode(&a.volume_id)),
                Some(body.into_bytes()),
            )?
        }
        VolumeCommand::Tune(a) => {
            let body = serde_json::to_vec(&a.request()?)
                .map_err(|e| Error::Usage(format!("cannot encode the request: {e}")))?;
            client::call(
                socket,
                "PATCH",
                &format!("/v1/attachments/{}", percent_encode(&a.volume_id)),
                Some(body),
            )?
        }
        VolumeCommand::Status(_) => client::call(socket, "GET", "/v1/attachments", None)?,
        VolumeCommand::Verify(a) => {
            let body = crate::volume::verify::Request {
                mode: a.mode()?,
                max_rate_mb: a.max_rate_mb()?,
            };
            let body = serde_json::to_vec(&body)
                .map_err(|e| Error::Usage(format!("cannot encode the request: {e}")))?;
            client::call(
                socket,
                "POST",
                &format!("/v1/attachments/{}/verify", percent_encode(&a.volume_id)),
                Some(body),
            )?
        }
        VolumeCommand::Reconcile(_) => {
            return Err(Error::Usage(
                "reconcile acts on this host directly: the agent reconciles by itself when it \
                 starts (see GET /v1/health); run it without --socket, with the agent stopped"
                    .into(),
            ));
        }
    };
    // A repeated detach is expected (os-brick retries): the agent answers 404 unknown_volume
    // (REST), the command line reports the same success as without --socket.
    if let VolumeCommand::Detach(a) = cmd
        && reply.status == 404
        && reply
            .json()
            .is_ok_and(|v| v["error"]["code"] == "unknown_volume")
    {
        let value = serde_json::json!({
            "volume_id": a.volume_id,
            "was_active": false,
            "waited_ms": 0,
            "note": "the agent has no record of this volume: nothing is attached",
        });
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| Error::Usage(format!("cannot encode output: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    let value = reply.into_result()?;
    let value = match cmd {
        VolumeCommand::Status(_) => value["attachments"].clone(),
        _ => value,
    };
    let text = serde_json::to_string_pretty(&value)
        .map_err(|e| Error::Usage(format!("cannot encode output: {e}")))?;
    println!("{text}");
    if value["verdict"] == "mismatch" {
        return Err(crate::volume::verify::Error::Mismatch {
            volume_id: value["volume_id"].as_str().unwrap_or_default().to_owned(),
            count: value["mismatch_count"].as_u64().unwrap_or(0),
            first_mapping: value["mismatches"][0]["mapping_offset"]
                .as_u64()
                .unwrap_or(0),
            first_backing: value["mismatches"][0]["backing_offset"]
                .as_u64()
                .unwrap_or(0),
            note: value["mismatches"][0]["note"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        }
        .into());
    }
    Ok(())
}
