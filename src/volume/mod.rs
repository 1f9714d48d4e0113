//! The attach engine: every operation on encrypted volumes through the kernel's dm-crypt, the
//! way os-brick does them and more safely, used identically by the CLI and the agent.
//!
//! The operations: [`attach`] (or [`prepare`] + [`attach_prepared`], so the agent can admit an
//! attach into its KDF budget first), [`detach`], [`extend`], [`tune`], [`status`], [`reconcile`] (the
//! journal against the kernel, after a crash or reboot) and [`hotplug::device_gone`] (teardown
//! when a backing device is removed).
//!
//! Layout, one job per file:
//! - [`attach`], [`detach`], [`status`], [`tune`]: the operations and their outcomes;
//! - [`format`]: opening a new attachment's mapping, formatting a provably blank device;
//! - [`reconcile`]: the journal against the kernel, as a pure decision table and its actions;
//! - [`hotplug`]: devices that come and go (selectors resolved now, teardown on removal);
//! - [`journal`]: the per-volume records and every change of their phase;
//! - [`header`]: the LUKS header read once per attach (KDF memory, userspace unlock);
//! - [`crypt`]: the libcryptsetup wrapper (open LUKS/plain, refresh, format, close, resize, status);
//! - [`dm`]: read-only device-mapper and sysfs queries (list, deps, open count, holders). dm
//!   tables carry key material, so this module never reads or logs them;
//! - [`probe`]: the signature probe that must find nothing before a device is formatted;
//! - [`kcapi`]: whether the kernel runs a cipher and key size, asked before a format;
//! - [`links`]: the device-path symlink and the stable `/dev/disk/by-id/volcrypt-<id>` link;
//! - [`system`]: the one boundary through which the operations reach all of the above, so
//!   unit tests can run them on a simulated host that crashes at any step;
//! - [`timing`]: where an attach or detach spent its time (for metrics and debug logs).
//!
//! Every operation is a plain blocking function taking a [`Context`]; each opens libcryptsetup
//! afresh because `CryptDevice` is not `Send`, so the agent can call them from worker threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keys::KeyManager;
use crate::kind::Kind;

pub mod attach;
pub mod consumers;
pub mod crypt;
pub mod detach;
pub mod dm;
pub mod format;
pub mod header;
pub mod hotplug;
pub mod journal;
pub mod kcapi;
pub mod links;
pub mod probe;
pub mod reconcile;
pub mod rekey;
pub mod status;
pub mod system;
pub mod timing;
pub mod tune;
pub mod verify;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod sim;

pub use attach::{AttachOutcome, How, LinkChange, Prepared, attach, attach_prepared, prepare};
pub use detach::{DetachOutcome, detach};
pub use journal::Journal;
pub use reconcile::{Report, run as reconcile};
pub use rekey::{RekeyOutcome, rekey};
pub use status::{ExtendOutcome, VolumeStatus, extend, status};
pub use system::{HOST, Host, System};
pub use tune::{TuneOutcome, tune};

/// Settings of the attach engine: the `[volume]` part of the agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeConfig {
    /// One JSON record per managed volume.
    pub state_dir: PathBuf,
    /// Where the stable `volcrypt-<volume_id>` links go.
    pub by_id_dir: PathBuf,
    /// Defaults for the dm-crypt performance flags; a request's `options` override them.
    pub allow_discards: bool,
    pub no_read_workqueue: bool,
    pub no_write_workqueue: bool,
    /// Encryption sector size for new LUKS2 formats (512 or 4096).
    pub luks2_sector_size: u32,
    /// How long a busy detach keeps retrying.
    pub detach_timeout_ms: u64,
    /// KDF for new keyslots: `None` keeps libcryptsetup's benchmarked default
    /// (argon2id for LUKS2, PBKDF2 for LUKS1).
    pub pbkdf: Option<PbkdfConfig>,
    /// Format a first attach's device even when the LUKS header area it overwrites is not all
    /// zeros (signatures and a backup GPT still refuse it). Only for storage backends that hand
    /// out non-zeroed blank volumes; every format it lets through is logged as a warning.
    pub allow_nonzero_blank: bool,
}

/// A fixed-cost KDF for new keyslots (tests and benchmarks use PBKDF2 with few iterations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PbkdfConfig {
    /// `pbkdf2`, `argon2i` or `argon2id`.
    pub kind: String,
    /// PBKDF2 iterations, or Argon2 time cost.
    pub iterations: u32,
    /// Argon2 memory in KiB (ignored for PBKDF2).
    #[serde(default)]
    pub memory_kib: u32,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            state_dir: PathBuf::from("/var/lib/volcrypt/state"),
            by_id_dir: PathBuf::from("/dev/disk/by-id"),
            allow_discards: false,
            no_read_workqueue: false,
            no_write_workqueue: false,
            luks2_sector_size: 512,
            detach_timeout_ms: 10_000,
            pbkdf: None,
            allow_nonzero_blank: false,
        }
    }
}

impl VolumeConfig {
    pub fn detach_timeout(&self) -> Duration {
        Duration::from_millis(self.detach_timeout_ms)
    }
}

/// What every operation needs: the key manager, the configuration and the host.
#[derive(Clone)]
pub struct Context<'a> {
    pub keys: &'a dyn KeyManager,
    pub config: VolumeConfig,
    /// The host the operations act on: [`Host`], or a simulation in unit tests.
    pub sys: Arc<dyn System>,
    /// Called when an attach has unlocked its keyslot in userspace and goes on to the
    /// device-mapper work (see [`crypt::AfterKdf`]); the agent gives back its KDF share then.
    pub after_kdf: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl<'a> Context<'a> {
    /// A context on the real host.
    pub fn new(keys: &'a dyn KeyManager, config: VolumeConfig) -> Context<'a> {
        Context {
            keys,
            config,
            sys: Arc::new(Host),
            after_kdf: None,
        }
    }

    /// The same context, with `f` also called after a userspace keyslot unlock: first `f`, then
    /// the hook the context had (the inner layer first: the agent's re-activation logs the
    /// unlock before the KDF budget it held goes back).
    pub fn and_after_kdf(&self, f: impl Fn() + Send + Sync + 'static) -> Context<'a> {
        let outer = self.after_kdf.clone();
        Context {
            after_kdf: Some(Arc::new(move || {
                f();
                if let Some(o) = &outer {
                    o();
                }
            })),
            ..self.clone()
        }
    }

    /// The journal in the configured state directory.
    pub fn journal(&self) -> Journal {
        Journal::new(&self.config.state_dir).with_steps(self.sys.clone())
    }

    /// The same host and configuration, without the key manager.
    pub fn keyless(&self) -> Context<'static> {
        Context {
            keys: &NoKeys,
            config: self.config.clone(),
            sys: self.sys.clone(),
            after_kdf: None,
        }
    }
}

impl Context<'static> {
    /// For the operations that never fetch a key (detach, status, link repair): they work
    /// where no key manager is configured or reachable.
    pub fn without_keys(config: VolumeConfig) -> Context<'static> {
        Context::new(&NoKeys, config)
    }
}

/// The key manager of [`Context::without_keys`]: any request for a key is refused, naming why.
struct NoKeys;

impl KeyManager for NoKeys {
    fn kind(&self) -> &'static str {
        "none"
    }
    fn get(&self, key_id: &str) -> Result<crate::keys::Secret, crate::keys::Error> {
        Err(crate::keys::Error::NotFound {
            key_id: key_id.to_owned(),
            manager: "no key manager (this operation needs no key)",
        })
    }
    fn health(&self) -> Result<(), crate::keys::Error> {
        Ok(())
    }
}

/// Attach-engine errors. Messages name the volume, mapping, device or key id concerned and
/// never carry key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Request(#[from] crate::request::Error),
    #[error("key {key_id}: {source}")]
    Key {
        key_id: String,
        source: crate::keys::Error,
    },
    #[error(
        "device-mapper is not available on this host (is the dm_crypt module loaded?): {detail}"
    )]
    DmUnavailable { detail: String },
    #[error("wrong key: key {key_id} does not open {device} (no keyslot matches the passphrase)")]
    WrongKey { key_id: String, device: PathBuf },
    #[error("device {path} does not exist or is not a block device{detail}")]
    NoDevice { path: PathBuf, detail: String },
    #[error(
        "mapping {name} already exists and maps {held_by}, not {requested}: refusing to touch it"
    )]
    NameConflict {
        name: String,
        held_by: String,
        requested: String,
    },
    #[error(
        "device {device} is already attached as volume {owner} (mapping {name}), not {requested}: refusing to share it"
    )]
    OwnedByOther {
        device: PathBuf,
        name: String,
        owner: String,
        requested: String,
    },
    #[error(
        "mapping {name} is stale (its backing device {backing} is gone) and still open {open_count} time(s): not replacing it"
    )]
    StaleBusy {
        name: String,
        backing: String,
        open_count: i32,
    },
    #[error(
        "mapping {name} is busy (open count {open_count}; holders: {holders}; processes: {processes}); gave up after {waited_ms} ms"
    )]
    Busy {
        name: String,
        open_count: i32,
        holders: String,
        processes: String,
        waited_ms: u128,
    },
    #[error("refusing to format {device}: it is not LUKS but holds {found}")]
    RefuseFormat { device: PathBuf, found: String },
    #[error("refusing to format {device}: it is in use ({by})")]
    InUse { device: PathBuf, by: String },
    #[error("{op} failed for {target}: {detail}")]
    Crypt {
        op: &'static str,
        target: String,
        detail: String,
        kind: Kind,
    },
    #[error("device-mapper {op} failed for {target}: {detail}")]
    Dm {
        op: &'static str,
        target: String,
        detail: String,
    },
    #[error("{op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("state record {path}: {detail}")]
    State { path: PathBuf, detail: String },
    #[error("volume {volume_id} is not managed by volcrypt (no state record in {state_dir})")]
    NotManaged {
        volume_id: String,
        state_dir: PathBuf,
    },
    #[error(
        "reconcile: {failed} attachment(s) could not be repaired (records kept; see the report)"
    )]
    ReconcileFailed { failed: usize },
    /// An operation that cannot apply to this volume as it is (the reason says why).
    #[error("{detail}")]
    Refused { detail: String },
    #[error("volume {volume_id} is attached without dm-crypt ({reason}); there is nothing to {op}")]
    NotEncrypted {
        volume_id: String,
        reason: String,
        op: &'static str,
    },
}

impl Error {
    pub fn kind(&self) -> Kind {
        match self {
            Error::Request(e) => e.kind(),
            Error::Key { source, .. } => source.kind(),
            Error::DmUnavailable { .. } => Kind::Invalid,
            Error::WrongKey { .. } => Kind::NoKey,
            Error::NoDevice { .. } => Kind::WrongDevice,
            Error::NameConflict { .. }
            | Error::OwnedByOther { .. }
            | Error::StaleBusy { .. }
            | Error::Busy { .. }
            | Error::InUse { .. } => Kind::Busy,
            Error::RefuseFormat { .. } => Kind::Invalid,
            Error::Crypt { kind, .. } => *kind,
            Error::Dm { .. } | Error::Io { .. } | Error::State { .. } => Kind::Invalid,
            Error::NotManaged { .. } => Kind::WrongDevice,
            Error::NotEncrypted { .. } | Error::Refused { .. } => Kind::Invalid,
            Error::ReconcileFailed { .. } => Kind::Invalid,
        }
    }

    /// The request field at fault, for the RPC's `{"error": {"field": …}}`.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Request(e) => e.field(),
            Error::Key { .. } | Error::WrongKey { .. } => Some("encryption.encryption_key_id"),
            Error::NoDevice { .. } | Error::RefuseFormat { .. } | Error::InUse { .. } => {
                Some("device_path")
            }
            _ => None,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, error: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            error,
        }
    }
}

/// dm-crypt activation flags volcrypt sets (and shows in `status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerfFlags {
    pub allow_discards: bool,
    pub no_read_workqueue: bool,
    pub no_write_workqueue: bool,
}

impl PerfFlags {
    /// Request options override the configured defaults.
    pub fn resolve(config: &VolumeConfig, options: &crate::request::AttachOptions) -> PerfFlags {
        PerfFlags {
            allow_discards: options.allow_discards.unwrap_or(config.allow_discards),
            no_read_workqueue: options
                .no_read_workqueue
                .unwrap_or(config.no_read_workqueue),
            no_write_workqueue: options
                .no_write_workqueue
                .unwrap_or(config.no_write_workqueue),
        }
    }

    /// These flags with the ones a tune request gives replaced (the others stay).
    pub fn with(self, t: &crate::request::TuneRequest) -> PerfFlags {
        PerfFlags {
            allow_discards: t.allow_discards.unwrap_or(self.allow_discards),
            no_read_workqueue: t.no_read_workqueue.unwrap_or(self.no_read_workqueue),
            no_write_workqueue: t.no_write_workqueue.unwrap_or(self.no_write_workqueue),
        }
    }

    /// dmsetup-style names of the flags that are set.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.allow_discards {
            v.push("allow_discards");
        }
        if self.no_read_workqueue {
            v.push("no_read_workqueue");
        }
        if self.no_write_workqueue {
            v.push("no_write_workqueue");
        }
        v
    }
}

/// Crash-test hook, compiled only with the `test-hooks` feature (the test harness builds with
/// it; release builds and packages never do): with `VOLCRYPT_TEST_PAUSE_AT=<point>` the engine
/// logs `test pause at <point>` and sleeps for an hour there, so a test can `kill -9` the agent
/// at that exact point. The points, in order: `attaching` (record `attaching` written, no
/// mapping yet), `formatted` (first attach: LUKS header written, no keyslot yet), `opened`
/// (mapping open, no links), `linked` (links set, record still `attaching`), `detaching` (record
/// `detaching` written, mapping still open), `closed` (mapping closed, links and record still
/// there); rekey: `rekey-added` (new keyslot added, record names the old key), `rekey-journaled`
/// (record names the new key, old keyslot still there), `rekey-removed` (old keyslot removed,
/// record still marks the rekey pending).
#[cfg(feature = "test-hooks")]
pub(crate) fn test_pause(point: &str) {
    if std::env::var_os("VOLCRYPT_TEST_PAUSE_AT").is_some_and(|v| v == point) {
        tracing::warn!("test pause at {point}");
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn test_pause(_point: &str) {}

/// Fault-injection hook for error paths the kernel does not produce on demand, compiled only
/// with the `test-hooks` feature. `VOLCRYPT_TEST_FAIL_AT=<point>` fails, on a first attach:
/// `keyslot` adding the new header's first keyslot (as if libcryptsetup had refused),
/// `activate` the activation right after the format, `link` setting the stable link.
#[cfg(feature = "test-hooks")]
pub(crate) fn test_fault(point: &str) -> bool {
    std::env::var_os("VOLCRYPT_TEST_FAIL_AT").is_some_and(|v| v == point)
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn test_fault(_point: &str) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::AttachOptions;

    #[test]
    fn request_options_override_config_defaults() {
        let config = VolumeConfig {
            allow_discards: true,
            no_read_workqueue: true,
            ..VolumeConfig::default()
        };
        let opts = AttachOptions {
            allow_discards: Some(false),
            no_write_workqueue: Some(true),
            ..AttachOptions::default()
        };
        let f = PerfFlags::resolve(&config, &opts);
        assert_eq!(
            f,
            PerfFlags {
                allow_discards: false,
                no_read_workqueue: true,
                no_write_workqueue: true
            }
        );
        assert_eq!(f.names(), vec!["no_read_workqueue", "no_write_workqueue"]);
    }

    #[test]
    fn wrong_key_and_conflicts_map_to_cryptsetup_exit_codes() {
        let e = Error::WrongKey {
            key_id: "k-42".into(),
            device: "/dev/loop0".into(),
        };
        assert_eq!(e.kind(), Kind::NoKey);
        assert!(e.to_string().contains("k-42"));
        let e = Error::NameConflict {
            name: "crypt-x".into(),
            held_by: "7:1".into(),
            requested: "7:0".into(),
        };
        assert_eq!(e.kind(), Kind::Busy);
    }

    #[test]
    fn config_parses_with_defaults_for_missing_fields() {
        let c: VolumeConfig = serde_json::from_str(r#"{"no_read_workqueue": true}"#).unwrap();
        assert!(c.no_read_workqueue);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/volcrypt/state"));
        assert!(serde_json::from_str::<VolumeConfig>(r#"{"bogus": 1}"#).is_err());
    }
}
