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

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::ExitStatus;
use crate::keys;
use crate::secret::SecretBytes;

/// Where `--config` defaults to; a missing file there means "all defaults".
pub const DEFAULT_CONFIG_PATH: &str = "/etc/volcrypt/volcrypt.toml";
/// The keystore directory when nothing else is configured.
pub const DEFAULT_KEYSTORE_DIR: &str = "/var/lib/volcrypt/keys";
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
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::Invalid
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

    /// `--config FILE` if given (it must exist), else [`DEFAULT_CONFIG_PATH`] if it exists,
    /// else all defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, Error> {
        match path {
            Some(p) => Config::load(p),
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyManagerBackend {
    #[default]
    Keystore,
    Barbican,
    FixedKey,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyManagerConfig {
    pub backend: KeyManagerBackend,
    pub fixed_key: Option<ConfigSecret>,
    pub fixed_key_file: Option<PathBuf>,
    pub keystore: KeystoreConfig,
    pub barbican: BarbicanConfig,
}

impl KeyManagerConfig {
    fn has_inline_secrets(&self) -> bool {
        self.fixed_key.is_some()
            || matches!(
                self.barbican.auth,
                Some(BarbicanAuth::Password(_))
                    | Some(BarbicanAuth::ApplicationCredential(_))
                    | Some(BarbicanAuth::Token(_))
            )
    }

    /// The configured fixed key, hex-decoded (from `fixed_key` or `fixed_key_file`), or None.
    pub fn fixed_key_bytes(&self) -> Result<Option<SecretBytes>, keys::Error> {
        let hex = match (&self.fixed_key, &self.fixed_key_file) {
            (Some(_), Some(_)) => {
                return Err(keys::Error::Config {
                    field: "key_manager.fixed_key".into(),
                    reason: "set fixed_key or fixed_key_file, not both".into(),
                });
            }
            (Some(k), None) => k.0.clone(),
            (None, Some(path)) => read_secret_file(path)?,
            (None, None) => return Ok(None),
        };
        keys::fixed::decode_hex_key(hex.expose()).map(Some)
    }
}

/// Read a small secret file (a fixed key in hex), refusing group/other access, trimming
/// surrounding whitespace.
fn read_secret_file(path: &Path) -> Result<SecretBytes, keys::Error> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| keys::Error::io(path, e))?;
    let meta = f.metadata().map_err(|e| keys::Error::io(path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(keys::Error::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    (&mut f)
        .take(64 * 1024)
        .read_to_end(&mut buf)
        .map_err(|e| keys::Error::io(path, e))?;
    Ok(SecretBytes::new(buf.trim_ascii().to_vec()))
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeystoreConfig {
    pub dir: PathBuf,
    pub create: bool,
}

impl Default for KeystoreConfig {
    fn default() -> Self {
        KeystoreConfig {
            dir: PathBuf::from(DEFAULT_KEYSTORE_DIR),
            create: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BarbicanConfig {
    pub endpoint: Option<String>,
    pub interface: String,
    pub region: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: f64,
    pub read_timeout: f64,
    pub retries: u32,
    pub backoff_initial: f64,
    pub backoff_max: f64,
    pub auth: Option<BarbicanAuth>,
}

impl Default for BarbicanConfig {
    fn default() -> Self {
        BarbicanConfig {
            endpoint: None,
            interface: "public".into(),
            region: None,
            ca_file: None,
            connect_timeout: 5.0,
            read_timeout: 30.0,
            retries: 3,
            backoff_initial: 0.2,
            backoff_max: 5.0,
            auth: None,
        }
    }
}

/// How volcrypt authenticates to Barbican.
#[derive(Debug, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum BarbicanAuth {
    /// Keystone v3 password authentication, project-scoped.
    Password(KeystonePassword),
    /// Keystone v3 application credential (scoped by the credential itself).
    ApplicationCredential(KeystoneAppCredential),
    /// A static token sent as X-Auth-Token (no renewal).
    Token(StaticToken),
    /// No Keystone: send the headers keystonemiddleware would set (test deployments).
    Headers(HeaderAuth),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeystonePassword {
    pub auth_url: String,
    pub username: Option<String>,
    pub user_id: Option<String>,
    pub user_domain_name: Option<String>,
    pub user_domain_id: Option<String>,
    pub password: ConfigSecret,
    pub project_name: Option<String>,
    pub project_id: Option<String>,
    pub project_domain_name: Option<String>,
    pub project_domain_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeystoneAppCredential {
    pub auth_url: String,
    pub application_credential_id: Option<String>,
    pub application_credential_name: Option<String>,
    pub username: Option<String>,
    pub user_id: Option<String>,
    pub user_domain_name: Option<String>,
    pub user_domain_id: Option<String>,
    pub application_credential_secret: ConfigSecret,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    pub token: ConfigSecret,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderAuth {
    pub project_id: String,
    #[serde(default = "default_roles")]
    pub roles: String,
    pub user_id: Option<String>,
}

fn default_roles() -> String {
    "member".into()
}

/// A secret string from the config file. Zeroed on drop; Debug shows only its length; a
/// wrongly typed value is reported without echoing it.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigSecret(pub SecretBytes);

impl ConfigSecret {
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }
}

impl fmt::Debug for ConfigSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfigSecret(<{} bytes redacted>)", self.0.len())
    }
}

impl<'de> Deserialize<'de> for ConfigSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn wrong<E: serde::de::Error>() -> E {
                E::custom("expected a string (value not shown: it is a secret)")
            }
        }
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ConfigSecret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ConfigSecret(SecretBytes::new(v.as_bytes().to_vec())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                let v = zeroize::Zeroizing::new(v);
                Ok(ConfigSecret(SecretBytes::new(v.as_bytes().to_vec())))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Err(V::wrong())
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Err(V::wrong())
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Err(V::wrong())
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Err(V::wrong())
            }
        }
        d.deserialize_any(V)
    }
}
