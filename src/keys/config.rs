//! The `[key_manager]` section of the configuration file: which key manager, and how to reach
//! it. It lives with the key managers because only they read it; `crate::config` assembles the
//! whole file from each layer's section.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::keys;
use crate::secret::SecretBytes;

/// The keystore directory when nothing else is configured.
pub const DEFAULT_KEYSTORE_DIR: &str = "/var/lib/volcrypt/keys";

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
    pub(crate) fn has_inline_secrets(&self) -> bool {
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
    /// Register each volume attached on this host as a consumer of its secret while it is
    /// attached (service `volcrypt@<hostname>`, resource type `volume`, the volume id), so
    /// Barbican warns before the secret of an attached volume is deleted. Off by default.
    pub register_consumers: bool,
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
            register_consumers: false,
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
