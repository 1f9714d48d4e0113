//! The TOML configuration file, with documented defaults so that no file is needed at all.
//!
//! An empty file (or no file) means: local keystore in `/var/lib/volcrypt/keys`, created with
//! mode 0700 if missing. Unknown keys are rejected, so a typo never silently falls back to a
//! default. Full example, every value shown being the default unless marked:
//!
//! ```toml
//! [key_manager]
//! backend = "keystore"            # "keystore" | "barbican" | "fixed-key"
//! # Cinder's fixed_key (hex). With backend keystore/barbican it answers only the all-zero key
//! # id in front of that backend (castellan's migration behaviour); with backend "fixed-key" it
//! # is the only key. Prefer fixed_key_file (a file holding the hex, mode 0600).
//! # fixed_key = "00112233..."     # (no default)
//! # fixed_key_file = "/etc/volcrypt/fixed_key"   # (no default)
//!
//! [key_manager.keystore]
//! dir = "/var/lib/volcrypt/keys"
//! create = true                   # create dir (0700) if missing
//!
//! [key_manager.barbican]
//! endpoint = "https://barbican.example:9311"   # (no default) without it, Keystone's catalog
//! interface = "public"            # catalog lookup: endpoint interface ...
//! # region = "RegionOne"          # ... and region (no default: first match)
//! # ca_file = "/etc/ssl/private-ca.pem"        # (no default: system roots)
//! connect_timeout = 5.0           # seconds
//! read_timeout = 30.0             # seconds, per response
//! retries = 3                     # extra attempts on connection errors and HTTP 5xx
//! backoff_initial = 0.2           # seconds before the first retry, doubled each time
//! backoff_max = 5.0               # seconds, cap of one wait
//!
//! [key_manager.barbican.auth]     # (no default: required for barbican)
//! method = "password"             # Keystone v3 password
//! auth_url = "https://keystone.example:5000/v3"
//! username = "volcrypt"           # or user_id
//! user_domain_name = "Default"    # or user_domain_id
//! password = "..."
//! project_name = "service"        # or project_id
//! project_domain_name = "Default" # or project_domain_id
//! # method = "application-credential": auth_url, application_credential_id (or
//! #          application_credential_name with username/user_id + user domain),
//! #          application_credential_secret
//! # method = "token": token = "..." (a static X-Auth-Token)
//! # method = "headers": project_id = "...", roles = "member", user_id (optional): for test
//! #          deployments without Keystone (X-Identity-Status: Confirmed, X-Project-Id, X-Roles)
//! ```
//!
//! Secrets (passwords, tokens, fixed keys) live in [`ConfigSecret`]s: zeroed on drop, never
//! printed; a config file holding any should be mode 0600 (a warning is logged otherwise).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::keys::config::*;
use crate::kind::Kind;

/// Where `--config` defaults to; a missing file there means "all defaults".
pub const DEFAULT_CONFIG_PATH: &str = "/etc/volcrypt/volcrypt.toml";
/// The environment variable that names the configuration file when `--config` is not given
/// (it must exist, like `--config`).
pub const CONFIG_ENV: &str = "VOLCRYPT_CONFIG";
/// Config files larger than this are refused (a config is a few KiB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is larger than 1 MiB")]
    TooLarge { path: PathBuf },
    /// Line number and toml's message, deliberately without toml's source excerpt: the line
    /// may hold a password.
    #[error("config {path}, line {line}: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    /// Parsed, but a value is out of its bounds.
    #[error("config {path}: {detail}")]
    Invalid { path: String, detail: String },
}

impl Error {
    pub fn kind(&self) -> Kind {
        Kind::Invalid
    }
}

/// The whole configuration file. Other sections (serve, state) join here as they appear.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub key_manager: KeyManagerConfig,
    /// `[volume]`: the attach engine (state dir, link dir, dm-crypt perf-flag defaults,
    /// LUKS2 sector size and KDF for new formats, detach timeout); see `volume::VolumeConfig`.
    #[cfg(feature = "system")]
    pub volume: crate::volume::VolumeConfig,
    /// `[server]`: the agent (`volcrypt serve`: socket, group, limits, KDF memory budget); see
    /// `rpc::config::ServerConfig`.
    #[cfg(feature = "system")]
    pub server: crate::rpc::config::ServerConfig,
}

impl Config {
    /// Parse TOML text; `origin` names it in errors (a path, or "<string>").
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, Error> {
        toml::from_str(text).map_err(|e| Error::Parse {
            path: origin.to_string(),
            line: e
                .span()
                .map(|s| {
                    1 + text.as_bytes()[..s.start.min(text.len())]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                })
                .unwrap_or(0),
            message: e.message().trim().to_string(),
        })
    }

    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let read_err = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(Error::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let cfg = Config::from_toml(&text, &path.display().to_string())?;
        let mode = meta.permissions().mode() & 0o7777;
        if cfg.key_manager.has_inline_secrets() && mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "config holds secrets but is readable by group or others; chmod 0600 it"
            );
        }
        Ok(cfg)
    }

    /// `--config FILE` if given, else `$VOLCRYPT_CONFIG` if set (either must exist), else
    /// [`DEFAULT_CONFIG_PATH`] if it exists, else all defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, Error> {
        match named_file(path) {
            Some(p) => Config::load(&p),
            None => {
                let p = Path::new(DEFAULT_CONFIG_PATH);
                if p.exists() {
                    Config::load(p)
                } else {
                    Ok(Config::default())
                }
            }
        }
    }
}

#[cfg(feature = "system")]
impl Config {
    /// Split the file into what the agent runs with (`[server]`, checked, and `[volume]`) and
    /// the key manager's section, from which the caller builds the key manager. `origin` names
    /// the file in errors.
    pub fn into_serve(
        self,
        origin: &str,
    ) -> Result<(crate::rpc::config::ServeConfig, KeyManagerConfig), Error> {
        self.server.check().map_err(|detail| Error::Invalid {
            path: origin.to_owned(),
            detail,
        })?;
        let serve = crate::rpc::config::ServeConfig {
            server: self.server,
            volume: self.volume,
        };
        Ok((serve, self.key_manager))
    }
}

/// The agent's configuration from TOML text (tests, and tools that embed a config).
#[cfg(feature = "system")]
pub fn parse_serve(
    text: &str,
) -> Result<(crate::rpc::config::ServeConfig, KeyManagerConfig), Error> {
    Config::from_toml(text, "<string>")?.into_serve("<string>")
}

/// The file the caller named: `--config FILE`, else a non-empty `$VOLCRYPT_CONFIG`.
fn named_file(path: Option<&Path>) -> Option<PathBuf> {
    path.map(Path::to_owned).or_else(|| {
        std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// The agent's configuration: `--config FILE`, else the default file if present, else the
/// defaults; `[server]` checked.
#[cfg(feature = "system")]
pub fn load_serve(
    path: Option<&Path>,
) -> Result<(crate::rpc::config::ServeConfig, KeyManagerConfig), Error> {
    let origin = named_file(path)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
        .display()
        .to_string();
    Config::load_or_default(path)?.into_serve(&origin)
}

#[cfg(all(test, feature = "system"))]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::rpc::config::ServerConfig;
    use crate::volume::VolumeConfig;

    fn parse(text: &str) -> Result<crate::rpc::config::ServeConfig, String> {
        parse_serve(text).map(|(s, _)| s).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.server, ServerConfig::default());
        assert_eq!(c.volume, VolumeConfig::default());
        assert_eq!(c.server.socket, PathBuf::from("/run/volcrypt/api.sock"));
        assert_eq!(c.server.max_body_bytes, crate::request::MAX_REQUEST_BYTES);
        assert!(c.server.kdf_budget_mib() >= 1);
        let small = ServerConfig {
            kdf_memory_budget_mib: Some(24),
            ..ServerConfig::default()
        };
        assert_eq!(
            small.kdf_budget_mib(),
            24,
            "a configured budget is honoured exactly"
        );
    }

    #[test]
    fn sections_parse_and_typos_are_rejected() {
        let text = "[server]\nsocket = \"/tmp/x.sock\"\ngroup = \"disk\"\nkdf_memory_budget_mib = 2048\n\
             [volume]\nstate_dir = \"/tmp/st\"\n\
             [key_manager.keystore]\ndir = \"/tmp/keys\"\n";
        let (c, keys) = parse_serve(text).unwrap();
        assert_eq!(c.server.group.as_deref(), Some("disk"));
        assert_eq!(c.server.kdf_budget_mib(), 2048);
        assert_eq!(c.volume.state_dir, PathBuf::from("/tmp/st"));
        assert_eq!(keys.keystore.dir, PathBuf::from("/tmp/keys"));
        let e = parse("[server]\nsokcet = \"/x\"\n").unwrap_err();
        assert!(e.contains("sokcet"), "{e}");
        let e = parse("[server]\nmax_body_bytes = 0\n").unwrap_err();
        assert!(e.contains("max_body_bytes"), "{e}");
        let e = parse("[server]\nsocket = \"rel.sock\"\n").unwrap_err();
        assert!(e.contains("absolute"), "{e}");
    }
}
