//! `volcrypt attach | detach | extend | status`: the attach engine from the command line.
//!
//! attach/detach/extend print their outcome as one JSON object on stdout (what the RPC will
//! return too); status prints a table, or JSON with `--json`. Nothing printed ever holds keys.

use std::path::PathBuf;

use clap::Args;

use crate::error::Error;
use crate::request::AttachRequest;
use crate::volume::{self, Context, KeySource, VolumeConfig};

/// Options shared by the volume commands.
#[derive(Debug, Clone, Args)]
pub struct VolumeOpts {
    /// State directory (one record per managed volume) [env VOLCRYPT_STATE_DIR; default
    /// /var/lib/volcrypt/state].
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Directory for the stable volcrypt-<volume_id> links [env VOLCRYPT_BY_ID_DIR; default
    /// /dev/disk/by-id].
    #[arg(long, global = true)]
    pub by_id_dir: Option<PathBuf>,
    /// Attach-engine settings as JSON (the `[volume]` section: perf-flag defaults, KDF for new
    /// formats, detach timeout) [env VOLCRYPT_VOLUME_CONFIG].
    #[arg(long, global = true)]
    pub volume_config: Option<PathBuf>,
    /// Send the command to a running `volcrypt serve` on this socket instead of acting directly.
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The attach request (JSON), or `-` for stdin.
    #[arg(long)]
    pub request: PathBuf,
    #[command(flatten)]
    pub opts: VolumeOpts,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    pub volume_id: String,
    /// The device path of the attach, for volumes volcrypt has no record of (os-brick's).
    #[arg(long)]
    pub device_path: Option<PathBuf>,
    /// Seconds to keep retrying while the mapping is busy (default from config: 10).
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub opts: VolumeOpts,
}

#[derive(Debug, Args)]
pub struct ExtendArgs {
    pub volume_id: String,
    #[command(flatten)]
    pub opts: VolumeOpts,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub opts: VolumeOpts,
}

/// Build the configuration: file (if any), then environment, then flags.
pub fn load_config(opts: &VolumeOpts) -> Result<VolumeConfig, Error> {
    let file = opts
        .volume_config
        .clone()
        .or_else(|| std::env::var_os("VOLCRYPT_VOLUME_CONFIG").map(PathBuf::from));
    let mut config = match file {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::Usage(format!("cannot read volume config {}: {e}", path.display()))
            })?;
            serde_json::from_str(&text)
                .map_err(|e| Error::Usage(format!("volume config {}: {e}", path.display())))?
        }
        None => VolumeConfig::default(),
    };
    if let Some(d) = std::env::var_os("VOLCRYPT_STATE_DIR") {
        config.state_dir = d.into();
    }
    if let Some(d) = std::env::var_os("VOLCRYPT_BY_ID_DIR") {
        config.by_id_dir = d.into();
    }
    if let Some(d) = &opts.state_dir {
        config.state_dir = d.clone();
    }
    if let Some(d) = &opts.by_id_dir {
        config.by_id_dir = d.clone();
    }
    Ok(config)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Usage(format!("cannot encode output: {e}")))?;
    println!("{text}");
    Ok(())
}

pub fn attach(args: AttachArgs, keys: &dyn KeySource) -> Result<(), Error> {
    let config = load_config(&args.opts)?;
    let request = AttachRequest::read(&args.request)?;
    let ctx = Context { keys, config };
    let outcome = volume::attach(&ctx, &request)?;
    print_json(&outcome)
}

pub fn detach(args: DetachArgs, keys: &dyn KeySource) -> Result<(), Error> {
    let mut config = load_config(&args.opts)?;
    if let Some(t) = args.timeout {
        if !(0.0..=3600.0).contains(&t) {
            return Err(Error::Usage(format!(
                "--timeout {t}: must be 0 to 3600 seconds"
            )));
        }
        config.detach_timeout_ms = (t * 1000.0) as u64;
    }
    let ctx = Context { keys, config };
    let outcome = volume::detach(&ctx, &args.volume_id, args.device_path.as_deref())?;
    print_json(&outcome)
}

pub fn extend(args: ExtendArgs, keys: &dyn KeySource) -> Result<(), Error> {
    let config = load_config(&args.opts)?;
    let ctx = Context { keys, config };
    let outcome = volume::extend(&ctx, &args.volume_id)?;
    print_json(&outcome)
}

pub fn status(args: StatusArgs, keys: &dyn KeySource) -> Result<(), Error> {
    let config = load_config(&args.opts)?;
    let ctx = Context { keys, config };
    let list = volume::status(&ctx)?;
    if args.json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no volumes managed by volcrypt");
        return Ok(());
    }
    for s in &list {
        let state = match (s.active, s.stale) {
            (true, true) => "STALE (backing device gone)",
            (true, false) => "active",
            (false, _) => "INACTIVE",
        };
        println!("{}: {}", s.volume_id, state);
        println!("  mapping:      /dev/mapper/{}", s.mapping_name);
        println!(
            "  backing:      {} ({})",
            s.backing_device.display(),
            s.backing_devno
        );
        println!("  device path:  {}", s.device_path.display());
        println!(
            "  format:       {} {}",
            s.kind.as_deref().unwrap_or(&s.format.to_string()),
            s.cipher.as_deref().unwrap_or("-")
        );
        if let Some(bits) = s.key_bits {
            println!("  key size:     {bits} bits");
        }
        if let Some(sz) = s.sector_size {
            println!("  sector size:  {sz}");
        }
        println!(
            "  key source:   {} key {} ({})",
            s.key_manager, s.key_id, s.derivation
        );
        println!(
            "  dm flags:     {}",
            if s.flags.is_empty() {
                "none".to_owned()
            } else {
                s.flags.join(" ")
            }
        );
        if let Some(n) = s.open_count {
            println!("  open count:   {n}");
        }
        if !s.holders.is_empty() {
            println!("  holders:      {}", s.holders.join(", "));
        }
        if let Some(l) = &s.stable_link {
            println!(
                "  stable link:  {}{}",
                l.display(),
                if s.stable_link_ok {
                    ""
                } else {
                    " (MISSING or wrong)"
                }
            );
        }
    }
    Ok(())
}

/// The key manager the volume commands use.
/// (Until the key-manager layer is merged there is none: commands that need a key fail.)
pub fn key_source() -> Result<Box<dyn KeySource>, Error> {
    struct Unavailable;
    impl KeySource for Unavailable {
        fn kind(&self) -> String {
            "none".into()
        }
        fn passphrase(
            &self,
            key_id: &str,
        ) -> Result<(crate::secret::SecretBytes, crate::secret::Derivation), crate::keys::Error>
        {
            Err(crate::keys::Error::NotFound {
                key_id: key_id.to_owned(),
                manager: "none",
            })
        }
    }
    Ok(Box::new(Unavailable))
}

/// Dispatch one volume command.
pub fn run(cmd: VolumeCommand) -> Result<(), Error> {
    if let Some(result) = super::serve::remote(&cmd) {
        return result;
    }
    let keys = key_source()?;
    match cmd {
        VolumeCommand::Attach(a) => attach(a, keys.as_ref()),
        VolumeCommand::Detach(a) => detach(a, keys.as_ref()),
        VolumeCommand::Extend(a) => extend(a, keys.as_ref()),
        VolumeCommand::Status(a) => status(a, keys.as_ref()),
    }
}

/// The volume commands, flattened into the top level (`volcrypt attach …`).
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Open an encrypted volume with dm-crypt from an attach request (what Nova hands os-brick).
    Attach(AttachArgs),
    /// Close a volume's mapping (busy: retry until the timeout, then name the holders).
    Detach(DetachArgs),
    /// Grow a volume's mapping after its backing device grew.
    Extend(ExtendArgs),
    /// Show the volumes volcrypt manages (never key material).
    Status(StatusArgs),
}
