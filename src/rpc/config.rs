//! The agent's configuration file (`volcrypt serve --config FILE`, TOML).
//!
//! Every key has a documented default, so the agent runs with no file at all:
//!
//! ```toml
//! [server]
//! socket = "/run/volcrypt/api.sock"   # HTTP/1.1 + JSON; created 0660, parent dir 0750
//! group = "volcrypt"                  # optional: this group may use the API besides root
//! request_timeout_secs = 120          # whole request, including waits for locks and budget
//! max_body_bytes = 65536              # larger bodies get 413 (default: the request model's cap)
//! kdf_memory_budget_mib = 8192        # default: half of MemTotal
//! kdf_memory_estimate_mib = 1024      # cost of an attach whose header cannot be read
//! shutdown_grace_secs = 30            # in-flight operations get this long after SIGTERM
//! udev = true                         # udev monitor: wait_for_device, teardown on remove,
//!                                     # re-activation on add (udev-rules/90-volcrypt.rules)
//! verify_interval_secs = 86400        # periodic sampled verify of every attached volume
//!                                     # (default: off)
//! verify_sample = 256                 # sectors per volume and round
//! verify_max_rate_mb = 20             # read rate limit of the periodic verify, MB/s (default: none)
//!
//! [volume]                            # the attach engine's settings (crate::volume::VolumeConfig)
//! state_dir = "/var/lib/volcrypt/state"
//!
//! [key_manager]                       # crate::config::KeyManagerConfig (default: keystore in
//! backend = "keystore"                # /var/lib/volcrypt/keys)
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::volume::VolumeConfig;

/// What the agent runs with: its own `[server]` section and the attach engine's `[volume]`.
/// The key manager is built from `[key_manager]` by the caller and handed over ready, so the
/// agent never reads the configuration file itself (`crate::config` assembles the file from
/// each layer's section, and the CLI splits it up again).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeConfig {
    pub server: ServerConfig,
    pub volume: VolumeConfig,
}

/// The `[server]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub socket: PathBuf,
    /// Group (name or numeric gid) whose members may call the API, besides root.
    pub group: Option<String>,
    pub request_timeout_secs: u64,
    pub max_body_bytes: u64,
    /// Total memory the KDFs of concurrent attaches may use. `None`: half of MemTotal.
    pub kdf_memory_budget_mib: Option<u64>,
    /// Assumed KDF memory of an attach whose LUKS header cannot be read before unlocking
    /// (missing device, not LUKS yet: a first-attach format uses the engine's default KDF, which
    /// for LUKS2 is argon2id with up to 1 GiB).
    pub kdf_memory_estimate_mib: u64,
    pub shutdown_grace_secs: u64,
    /// Run the udev monitor (udev-triggered activation). `false`: no `wait_for_device`, no
    /// teardown on remove; selectors still resolve against the devices present, and
    /// `waiting` records are still tried at start-up.
    pub udev: bool,
    /// Verify every attached volume by sampling this often (`None`, the default: never). The
    /// results are what `GET /v1/attachments/{id}` and the verify metrics show.
    pub verify_interval_secs: Option<u64>,
    /// Sectors the periodic verify checks per volume.
    pub verify_sample: u64,
    /// Read rate limit of the periodic verify, MB/s (`None`: unlimited).
    pub verify_max_rate_mb: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: PathBuf::from("/run/volcrypt/api.sock"),
            group: None,
            request_timeout_secs: 120,
            max_body_bytes: crate::request::MAX_REQUEST_BYTES,
            kdf_memory_budget_mib: None,
            kdf_memory_estimate_mib: 1024,
            shutdown_grace_secs: 30,
            udev: true,
            verify_interval_secs: None,
            verify_sample: crate::volume::verify::DEFAULT_SAMPLE,
            verify_max_rate_mb: None,
        }
    }
}

impl ServerConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The KDF budget in MiB: the configured value exactly, else half of MemTotal (1 GiB if
    /// unknown). Never below 1 MiB: a single KDF larger than the budget runs alone.
    pub fn kdf_budget_mib(&self) -> u64 {
        self.kdf_memory_budget_mib
            .unwrap_or_else(|| mem_total_mib().map(|m| m / 2).unwrap_or(1024))
            .max(1)
    }
}

/// MemTotal from /proc/meminfo, in MiB.
fn mem_total_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl ServerConfig {
    /// Bounds that keep a typo from disabling a limit.
    pub fn check(&self) -> Result<(), String> {
        if self.max_body_bytes == 0 || self.max_body_bytes > 16 * 1024 * 1024 {
            return Err(format!(
                "server.max_body_bytes = {}: must be 1 to 16777216",
                self.max_body_bytes
            ));
        }
        if self.request_timeout_secs == 0 || self.request_timeout_secs > 86_400 {
            return Err(format!(
                "server.request_timeout_secs = {}: must be 1 to 86400",
                self.request_timeout_secs
            ));
        }
        if self.shutdown_grace_secs > 3600 {
            return Err(format!(
                "server.shutdown_grace_secs = {}: must be at most 3600",
                self.shutdown_grace_secs
            ));
        }
        if self
            .verify_interval_secs
            .is_some_and(|s| !(60..=31_536_000).contains(&s))
        {
            return Err(format!(
                "server.verify_interval_secs = {}: must be 60 to 31536000 (leave it out for no \
                 periodic verify)",
                self.verify_interval_secs.unwrap_or_default()
            ));
        }
        if self.verify_sample == 0 || self.verify_sample > 1_000_000 {
            return Err(format!(
                "server.verify_sample = {}: must be 1 to 1000000",
                self.verify_sample
            ));
        }
        if self.verify_max_rate_mb == Some(0) {
            return Err(
                "server.verify_max_rate_mb = 0: must be positive (leave it out for no \
                        limit)"
                    .into(),
            );
        }
        if !self.socket.is_absolute() {
            return Err(format!(
                "server.socket = {}: must be an absolute path",
                self.socket.display()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_verify_is_off_by_default_and_bounded() {
        let d = ServerConfig::default();
        assert_eq!(d.verify_interval_secs, None);
        assert!(d.check().is_ok());
        let on: ServerConfig =
            toml::from_str("verify_interval_secs = 3600\nverify_max_rate_mb = 20").unwrap();
        assert!(on.check().is_ok(), "{:?}", on.check());
        assert_eq!(on.verify_sample, crate::volume::verify::DEFAULT_SAMPLE);
        for bad in [
            "verify_interval_secs = 5",
            "verify_sample = 0",
            "verify_max_rate_mb = 0",
        ] {
            let c: ServerConfig = toml::from_str(bad).unwrap();
            let e = c.check().unwrap_err();
            assert!(e.contains(bad.split(' ').next().unwrap()), "{bad}: {e}");
        }
    }
}
