//! `volcrypt attach | detach | extend | rekey | status | verify`: the attach engine from the
//! command line.
//!
//! attach/detach/extend print their outcome as one JSON object on stdout (what the RPC will
//! return too); status prints a table, or JSON with `--json`. Nothing printed ever holds keys.

use std::path::PathBuf;

use clap::Args;

use crate::config::Config;
use crate::error::Error;
use crate::keys::KeyManager;
use crate::request::AttachRequest;
use crate::volume::{self, Context, VolumeConfig};

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
    /// Configuration file (TOML: [key_manager] and [volume]) [env VOLCRYPT_CONFIG; default
    /// /etc/volcrypt/volcrypt.toml if it exists].
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Keystore directory for a keystore key manager: overrides `[key_manager.keystore] dir`
    /// of the config, exactly as `volcrypt keystore --dir` does, so both can name one keystore.
    #[arg(long, global = true)]
    pub keystore_dir: Option<PathBuf>,
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

/// `volcrypt tune`: each flag is switched on or off by its pair of options
/// (`--allow-discards`/`--no-allow-discards`, `--no-read-workqueue`/`--read-workqueue`, ...);
/// a flag not named stays as it is. The last of a pair wins.
#[derive(Debug, Args)]
pub struct TuneArgs {
    /// The attached volume whose mapping is tuned.
    pub volume_id: String,
    /// Pass discards (TRIM) through to the backing device.
    #[arg(long, overrides_with = "no_allow_discards")]
    pub allow_discards: bool,
    /// Stop passing discards through.
    #[arg(long)]
    pub no_allow_discards: bool,
    /// Decrypt reads in the I/O's context instead of dm-crypt's workqueue (less latency).
    #[arg(long, overrides_with = "read_workqueue")]
    pub no_read_workqueue: bool,
    /// Use dm-crypt's read workqueue again.
    #[arg(long)]
    pub read_workqueue: bool,
    /// Encrypt writes in the I/O's context instead of dm-crypt's workqueue.
    #[arg(long, overrides_with = "write_workqueue")]
    pub no_write_workqueue: bool,
    /// Use dm-crypt's write workqueue again.
    #[arg(long)]
    pub write_workqueue: bool,
    /// Refused: the sector size of an active mapping cannot change (accepted so the refusal
    /// can say why).
    #[arg(long, value_name = "BYTES")]
    pub sector_size: Option<u32>,
    /// Also store the resulting flags in the LUKS2 header, so any later `cryptsetup open`
    /// applies them (LUKS2 only: LUKS1 and plain volumes have no place for them).
    #[arg(long)]
    pub persistent: bool,
    #[command(flatten)]
    pub opts: VolumeOpts,
}

impl TuneArgs {
    /// The request the options make (the same body `PATCH /v1/attachments/{id}` takes).
    pub fn request(&self) -> Result<crate::request::TuneRequest, Error> {
        let pick = |on: bool, off: bool| match (on, off) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        };
        let req = crate::request::TuneRequest {
            allow_discards: pick(self.allow_discards, self.no_allow_discards),
            no_read_workqueue: pick(self.no_read_workqueue, self.read_workqueue),
            no_write_workqueue: pick(self.no_write_workqueue, self.write_workqueue),
            sector_size: self.sector_size,
            persistent: self.persistent,
        };
        req.validate()?;
        Ok(req)
    }
}

#[derive(Debug, Args)]
pub struct RekeyArgs {
    pub volume_id: String,
    /// The key manager id of the new secret (the same passphrase rule as attach applies).
    #[arg(long, value_name = "ID")]
    pub new_key_id: String,
    #[command(flatten)]
    pub opts: VolumeOpts,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    pub volume_id: String,
    /// Check N random sectors spread over the device (the default, with 256).
    #[arg(long, value_name = "N", conflicts_with_all = ["full", "range"])]
    pub sample: Option<u64>,
    /// Check every sector.
    #[arg(long, conflicts_with = "range")]
    pub full: bool,
    /// Check bytes START..START+LEN of the mapping (whole encryption sectors).
    #[arg(long, value_name = "START:LEN")]
    pub range: Option<String>,
    /// Read at most this many MB/s from the backing device.
    #[arg(long, value_name = "MB/s")]
    pub max_rate: Option<f64>,
    #[command(flatten)]
    pub opts: VolumeOpts,
}

impl VerifyArgs {
    /// The mode the options ask for (sampled by default).
    pub fn mode(&self) -> Result<volume::verify::Mode, Error> {
        use volume::verify::Mode;
        if self.full {
            return Ok(Mode::Full);
        }
        if let Some(r) = &self.range {
            let parsed = r
                .split_once(':')
                .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
            let Some((start, len)) = parsed else {
                return Err(Error::Usage(format!(
                    "--range {r}: expected START:LEN in bytes, e.g. 0:1048576"
                )));
            };
            return Ok(Mode::Range { start, len });
        }
        Ok(Mode::Sample {
            count: self.sample.unwrap_or(volume::verify::DEFAULT_SAMPLE),
        })
    }

    pub fn max_rate_mb(&self) -> Result<Option<f64>, Error> {
        match self.max_rate {
            Some(r) if !(r.is_finite() && r > 0.0) => Err(Error::Usage(format!(
                "--max-rate {r}: must be a positive number of MB/s"
            ))),
            other => Ok(other),
        }
    }
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
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
pub fn load_config(opts: &VolumeOpts) -> Result<(Config, VolumeConfig), Error> {
    let mut config = Config::load_or_default(opts.config.as_deref())?;
    if let Some(d) = &opts.keystore_dir {
        config.key_manager.keystore.dir = d.clone();
    }
    let mut volume = std::mem::take(&mut config.volume);
    if let Some(d) = std::env::var_os("VOLCRYPT_STATE_DIR") {
        volume.state_dir = d.into();
    }
    if let Some(d) = std::env::var_os("VOLCRYPT_BY_ID_DIR") {
        volume.by_id_dir = d.into();
    }
    if let Some(d) = &opts.state_dir {
        volume.state_dir = d.clone();
    }
    if let Some(d) = &opts.by_id_dir {
        volume.by_id_dir = d.clone();
    }
    Ok((config, volume))
}

/// The key manager the configuration names. Built only by the operations that fetch a key
/// (attach, extend): detach, status and reconcile work where it is unreachable.
fn key_manager(config: &Config) -> Result<Box<dyn KeyManager>, Error> {
    Ok(crate::keys::from_config(&config.key_manager)?)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Usage(format!("cannot encode output: {e}")))?;
    println!("{text}");
    Ok(())
}

pub fn attach(args: AttachArgs) -> Result<(), Error> {
    let (config, volume) = load_config(&args.opts)?;
    let request = resolve_present(AttachRequest::read(&args.request)?)?;
    let keys = key_manager(&config)?;
    let ctx = Context::new(keys.as_ref(), volume);
    let outcome = volume::attach(&ctx, &request)?;
    print_json(&outcome)
}

/// A device named by identity (`device`) is looked up among the block devices present now;
/// waiting for one to appear is the agent's job (`--socket`).
fn resolve_present(req: AttachRequest) -> Result<AttachRequest, Error> {
    let Some(d) = &req.device else {
        return Ok(req);
    };
    let selector = d.selector()?;
    if req.wait_for_device.is_some() {
        return Err(Error::Usage(
            "wait_for_device: only the agent waits for devices to appear; send the request to \
             it with --socket PATH"
                .into(),
        ));
    }
    match crate::udev::find(&selector)?.and_then(|d| d.devnode) {
        Some(node) => Ok(req.resolved(&node)),
        None => Err(crate::udev::Error::NoMatch {
            selector: selector.to_string(),
        }
        .into()),
    }
}

pub fn detach(args: DetachArgs) -> Result<(), Error> {
    let (_, mut volume) = load_config(&args.opts)?;
    if let Some(t) = args.timeout {
        if !(0.0..=3600.0).contains(&t) {
            return Err(Error::Usage(format!(
                "--timeout {t}: must be 0 to 3600 seconds"
            )));
        }
        volume.detach_timeout_ms = (t * 1000.0) as u64;
    }
    let ctx = Context::without_keys(volume);
    let outcome = volume::detach(&ctx, &args.volume_id, args.device_path.as_deref())?;
    print_json(&outcome)
}

pub fn extend(args: ExtendArgs) -> Result<(), Error> {
    let (config, volume) = load_config(&args.opts)?;
    let keys = key_manager(&config)?;
    let ctx = Context::new(keys.as_ref(), volume);
    let outcome = volume::extend(&ctx, &args.volume_id)?;
    print_json(&outcome)
}

/// An unknown volume is named as such before any key manager is built or asked.
fn require_managed(volume: &VolumeConfig, volume_id: &str) -> Result<(), Error> {
    match volume::Journal::new(&volume.state_dir).get(volume_id)? {
        Some(_) => Ok(()),
        None => Err(volume::Error::NotManaged {
            volume_id: volume_id.to_owned(),
            state_dir: volume.state_dir.clone(),
        }
        .into()),
    }
}

pub fn rekey(args: RekeyArgs) -> Result<(), Error> {
    let (config, volume) = load_config(&args.opts)?;
    require_managed(&volume, &args.volume_id)?;
    let keys = key_manager(&config)?;
    let ctx = Context::new(keys.as_ref(), volume);
    let outcome = volume::rekey(&ctx, &args.volume_id, &args.new_key_id)?;
    print_json(&outcome)
}

/// `volcrypt tune`: prints the outcome as JSON.
pub fn tune(args: TuneArgs) -> Result<(), Error> {
    let req = args.request()?;
    let (config, volume) = load_config(&args.opts)?;
    require_managed(&volume, &args.volume_id)?;
    let keys = key_manager(&config)?;
    let ctx = Context::new(keys.as_ref(), volume);
    let outcome = volume::tune(&ctx, &args.volume_id, &req)?;
    print_json(&outcome)
}

/// `volcrypt verify`: prints the report as JSON; exit 6 when sectors keep mismatching.
pub fn verify(args: VerifyArgs) -> Result<(), Error> {
    let (config, volume) = load_config(&args.opts)?;
    let options = volume::verify::Options {
        mode: args.mode()?,
        max_rate_mb: args.max_rate_mb()?,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        // Ctrl-C ends the process: a verify only reads, so nothing is left half-done.
        cancel: None,
        counters: None,
    };
    require_managed(&volume, &args.volume_id)?;
    let keys = key_manager(&config)?;
    let ctx = Context::new(keys.as_ref(), volume);
    let report = volume::verify::verify(&ctx, &args.volume_id, &options)?;
    print_json(&report)?;
    match report.failure() {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

pub fn status(args: StatusArgs) -> Result<(), Error> {
    let (_, volume) = load_config(&args.opts)?;
    let ctx = Context::without_keys(volume);
    let list = match volume::status(&ctx) {
        Ok(list) => list,
        // Without device-mapper the live state is unknown, but the journal still says what is
        // wanted: list it, and say why the rest is missing.
        Err(volume::Error::DmUnavailable { detail }) => {
            return journal_only(&ctx, &detail, args.json);
        }
        Err(e) => return Err(e.into()),
    };
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
        print_placement(
            &s.mapping_name,
            &s.backing_device,
            s.backing_devno,
            &s.device_path,
        );
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

/// The lines of `status` that say where a volume sits: its mapping and devices.
fn print_placement(
    mapping: &str,
    backing: &std::path::Path,
    devno: volume::dm::DevNo,
    device_path: &std::path::Path,
) {
    println!("  mapping:      /dev/mapper/{mapping}");
    println!("  backing:      {} ({devno})", backing.display());
    println!("  device path:  {}", device_path.display());
}

/// `status` where device-mapper is unavailable: the journal's records, and the reason.
fn journal_only(ctx: &Context<'_>, dm_detail: &str, json: bool) -> Result<(), Error> {
    let records = ctx.journal().list()?;
    if json {
        let list: Vec<_> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "volume_id": r.volume_id, "mapping_name": r.mapping_name,
                    "device_path": r.device_path, "backing_device": r.backing_device,
                    "format": r.format, "key_manager": r.key_manager, "key_id": r.key_id,
                    "phase": r.phase, "active": null,
                })
            })
            .collect();
        return print_json(&serde_json::json!({
            "device_mapper": {"available": false, "detail": dm_detail},
            "attachments": list,
        }));
    }
    eprintln!("volcrypt: device-mapper is unavailable, live state unknown: {dm_detail}");
    if records.is_empty() {
        println!("no volumes managed by volcrypt");
    }
    for r in &records {
        println!("{}: {} (journal only)", r.volume_id, r.phase);
        print_placement(
            &r.mapping_name,
            &r.backing_device,
            r.backing_devno,
            &r.device_path,
        );
        println!(
            "  key source:   {} key {} ({})",
            r.key_manager, r.key_id, r.derivation
        );
    }
    Ok(())
}

/// `volcrypt reconcile`: the recovery the agent runs at start, for an operator without one.
pub fn reconcile(args: ReconcileArgs) -> Result<(), Error> {
    let (config, volume) = load_config(&args.opts)?;
    // Re-activation needs keys; everything else works without a key manager, so a broken one
    // only fails the records that need it (reported under `failed`).
    let keys = key_manager(&config)
        .map(std::sync::Arc::from)
        .map_err(|e| e.to_string());
    let report = volume::reconcile(&Context::without_keys(volume), keys);
    volume::reconcile::log(&report);
    print_json(&report)?;
    if !report.checked {
        return Err(Error::Usage(format!(
            "reconcile could not run: {}",
            report.detail
        )));
    }
    if !report.failed.is_empty() {
        return Err(volume::Error::ReconcileFailed {
            failed: report.failed.len(),
        }
        .into());
    }
    Ok(())
}

/// Dispatch one volume command.
pub fn run(cmd: VolumeCommand) -> Result<(), Error> {
    if let Some(result) = super::serve::remote(&cmd) {
        return result;
    }
    match cmd {
        VolumeCommand::Attach(a) => attach(a),
        VolumeCommand::Detach(a) => detach(a),
        VolumeCommand::Extend(a) => extend(a),
        VolumeCommand::Rekey(a) => rekey(a),
        VolumeCommand::Tune(a) => tune(a),
        VolumeCommand::Status(a) => status(a),
        VolumeCommand::Reconcile(a) => reconcile(a),
        VolumeCommand::Verify(a) => verify(a),
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
    /// Give a LUKS volume a new key from the key manager, as Cinder does for a volume created
    /// from an image (luksChangeKey): adds a keyslot for the new key, checks it, journals the
    /// new key, removes the old key's keyslot. Online; a crash at any step leaves a volume the
    /// journaled key opens, and the same command again finishes it. Plain volumes are refused.
    Rekey(RekeyArgs),
    /// Change an attached volume's dm-crypt performance flags while it is in use (like
    /// `cryptsetup refresh`): only the flags named change; --persistent also stores them in
    /// the LUKS2 header for every later opener. The sector size cannot change online.
    Tune(TuneArgs),
    /// Show the volumes volcrypt manages (never key material).
    Status(StatusArgs),
    /// Bring the journal and the kernel back in line after a crash or reboot, as the agent does
    /// when it starts: re-activate wanted volumes, finish interrupted attaches and detaches,
    /// repair links; report (never touch) mappings volcrypt did not create. Prints the report;
    /// exit 0 when nothing failed.
    Reconcile(ReconcileArgs),
    /// Check an attached volume: sectors read through the mapping must equal the userspace
    /// decryption of the backing device's ciphertext (key obtained as attach does). Read-only,
    /// O_DIRECT, no exclusive open. Prints a JSON report; exit 0 agree, 6 mismatch, 7 cannot
    /// verify (cipher not in the userspace engine, key unavailable or not opening the header).
    Verify(VerifyArgs),
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use super::VolumeCommand;

    fn tune(args: &[&str]) -> Result<crate::request::TuneRequest, crate::error::Error> {
        let cli = Cli::try_parse_from([&["volcrypt", "tune", "vol-1"], args].concat()).unwrap();
        match cli.command {
            Command::Volume(VolumeCommand::Tune(a)) => a.request(),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn tune_options_name_each_flag_on_or_off_and_leave_the_others() {
        let r = tune(&["--allow-discards", "--read-workqueue", "--persistent"]).unwrap();
        assert_eq!(r.allow_discards, Some(true));
        assert_eq!(r.no_read_workqueue, Some(false));
        assert_eq!(r.no_write_workqueue, None);
        assert!(r.persistent);
        // The last of a pair wins.
        let r = tune(&["--allow-discards", "--no-allow-discards"]).unwrap();
        assert_eq!(r.allow_discards, Some(false));
        let r = tune(&["--no-write-workqueue"]).unwrap();
        assert_eq!(r.no_write_workqueue, Some(true));
        let e = tune(&["--sector-size", "4096", "--allow-discards"]).unwrap_err();
        assert!(
            e.to_string().contains("cannot change on an active mapping"),
            "{e}"
        );
        let e = tune(&[]).unwrap_err();
        assert!(e.to_string().contains("nothing to change"), "{e}");
    }
}
