//! Key managers: where a volume's secret comes from.
//!
//! One small trait, [`KeyManager`], with three backends:
//!
//! - [`keystore::Keystore`]: a local directory, one file per secret id (the embedded default);
//! - [`barbican::Barbican`]: OpenStack's key manager over REST (Keystone, static token or
//!   header authentication);
//! - [`fixed::FixedKey`]: Cinder's `fixed_key` compatibility for the all-zero key id, alone or
//!   in front of another manager (see that module for why it wraps).
//!
//! Every backend returns a [`Secret`]: the payload together with its secret type, because the
//! type alone decides how the payload becomes a LUKS passphrase (see [`crate::secret`]).
//! Errors name the key id and the place asked, never the payload, a token or a password.

use std::path::PathBuf;

use crate::keys::config::{KeyManagerBackend, KeyManagerConfig};
use crate::kind::Kind;
use crate::secret::{SecretBytes, SecretType, derive_passphrase};

pub mod barbican;
pub mod config;
pub mod fixed;
pub mod keystone;
pub mod keystore;

pub use barbican::Barbican;
pub use fixed::{FIXED_KEY_ID, FixedKey};
pub use keystore::Keystore;

/// The longest key id accepted anywhere (Barbican ids are 36-character UUIDs; this leaves room
/// for operator-chosen keystore names while keeping file names and URLs bounded).
pub const MAX_KEY_ID_LEN: usize = 128;

/// A secret as a key manager hands it out: its type and its payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub secret_type: SecretType,
    pub payload: SecretBytes,
}

impl Secret {
    pub fn new(secret_type: SecretType, payload: SecretBytes) -> Self {
        Secret {
            secret_type,
            payload,
        }
    }

    /// The LUKS passphrase os-brick would use for this secret: `passphrase` payloads verbatim,
    /// every other type lowercase hex.
    pub fn passphrase(&self) -> SecretBytes {
        derive_passphrase(&self.secret_type, &self.payload)
    }
}

/// A source of secrets by id. Implementations are blocking and safe to share between threads
/// (the agent calls them from a blocking pool).
pub trait KeyManager: Send + Sync {
    /// "keystore", "barbican" or "fixed-key": shown in status output and health reports.
    fn kind(&self) -> &'static str;
    /// Fetch one secret. Errors name `key_id`.
    fn get(&self, key_id: &str) -> Result<Secret, Error>;
    /// Is the backend usable right now (directory present and private; server reachable and
    /// accepting our credentials)? Used by `GET /v1/health`.
    fn health(&self) -> Result<(), Error>;
    /// Store a new secret and return its id: the one the manager assigns (Barbican's UUID), or
    /// `name` where the caller names it (keystore; a new UUID without one).
    fn create(&self, _name: Option<&str>, _secret: &Secret) -> Result<String, Error> {
        Err(Error::Unsupported {
            manager: self.kind().into(),
            what: "creating secrets",
        })
    }
    /// Record `consumer` as a user of secret `key_id`, so the secret is not deleted under it
    /// (Barbican's consumer API). Managers without consumers have nothing to record.
    fn add_consumer(&self, _key_id: &str, _consumer: &Consumer) -> Result<(), Error> {
        Ok(())
    }
    /// Remove `consumer` from secret `key_id`; not being registered is not an error.
    fn remove_consumer(&self, _key_id: &str, _consumer: &Consumer) -> Result<(), Error> {
        Ok(())
    }
}

/// A user of a secret as Barbican records it: Glance registers the images a secret encrypts,
/// Cinder its volumes, the agent (when configured to) the volumes it holds open.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Consumer {
    pub service: String,
    pub resource_type: String,
    pub resource_id: String,
}

/// Build the key manager a configuration describes.
pub fn from_config(cfg: &KeyManagerConfig) -> Result<Box<dyn KeyManager>, Error> {
    let inner: Option<Box<dyn KeyManager>> = match cfg.backend {
        KeyManagerBackend::Keystore => {
            let ks = if cfg.keystore.create {
                Keystore::create(&cfg.keystore.dir)?
            } else {
                Keystore::open(&cfg.keystore.dir)?
            };
            Some(Box::new(ks))
        }
        KeyManagerBackend::Barbican => Some(Box::new(Barbican::from_config(&cfg.barbican)?)),
        KeyManagerBackend::FixedKey => None,
    };
    match cfg.fixed_key_bytes()? {
        Some(key) => Ok(Box::new(FixedKey::new(key, inner))),
        None => match inner {
            Some(inner) => Ok(inner),
            None => Err(Error::Config {
                field: "key_manager.fixed_key".into(),
                reason: "backend \"fixed-key\" needs fixed_key or fixed_key_file".into(),
            }),
        },
    }
}

/// Check a key id before it becomes a file name or a URL path segment: 1 to
/// [`MAX_KEY_ID_LEN`] characters from `[A-Za-z0-9._-]`, not starting with a dot (so no `.`,
/// `..` or hidden files), hence no path separators and nothing that needs URL escaping.
pub fn validate_key_id(key_id: &str) -> Result<(), Error> {
    let reason = if key_id.is_empty() {
        Some("it is empty")
    } else if key_id.len() > MAX_KEY_ID_LEN {
        Some("it is longer than 128 characters")
    } else if key_id.starts_with('.') {
        Some("it starts with a dot")
    } else if !key_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("only letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidKeyId {
            // Bounded and escaped: the id came from a request and may be anything.
            key_id: shorten(key_id),
            reason,
        }),
    }
}

fn shorten(s: &str) -> String {
    let cut: String = s.chars().take(MAX_KEY_ID_LEN).collect();
    format!("{cut:?}")
}

fn fmt_key(key_id: &Option<String>) -> String {
    match key_id {
        Some(k) => format!(" (secret {k})"),
        None => String::new(),
    }
}

/// Key-manager errors. None of them carries secret material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("secret {key_id} not found in the {manager}")]
    NotFound {
        key_id: String,
        manager: &'static str,
    },
    #[error("invalid key id {key_id}: {reason}")]
    InvalidKeyId {
        key_id: String,
        reason: &'static str,
    },
    #[error(
        "key manager at {url} unreachable{} after {attempts} attempt(s): {reason}",
        fmt_key(key_id)
    )]
    Unreachable {
        url: String,
        key_id: Option<String>,
        attempts: u32,
        reason: String,
    },
    #[error(
        "key manager at {url} answered HTTP {status}{} after {attempts} attempt(s)",
        fmt_key(key_id)
    )]
    Server {
        url: String,
        key_id: Option<String>,
        status: u16,
        attempts: u32,
    },
    #[error("authentication to {url} failed: {reason}")]
    Auth { url: String, reason: String },
    #[error("access to secret {key_id} forbidden by {url} (wrong project or role?)")]
    Forbidden { key_id: String, url: String },
    #[error(
        "{url} refused content type {content_type:?} for secret {key_id} (HTTP 406): the secret's \
         metadata and payload disagree"
    )]
    ContentType {
        key_id: String,
        url: String,
        content_type: String,
    },
    #[error("unexpected answer from {url}{}: {reason}", fmt_key(key_id))]
    Protocol {
        url: String,
        key_id: Option<String>,
        reason: String,
    },
    #[error("secret {key_id} in {path}: {reason}")]
    Invalid {
        key_id: String,
        path: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:04o}: key material must not be accessible by group or others \
         (chmod go-rwx)"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("secret {key_id} already exists in {path} (remove it first, or add with --replace)")]
    AlreadyExists { key_id: String, path: PathBuf },
    #[error("configuration {field}: {reason}")]
    Config { field: String, reason: String },
    #[error("{manager} does not support {what}")]
    Unsupported { manager: String, what: &'static str },
}

impl Error {
    /// cryptsetup-style exit status: a key that cannot be had (missing, forbidden, server
    /// unreachable) is "no key available" (2); everything else is invalid input or setup (1),
    /// except an existing secret on add (5, "already exists").
    pub fn kind(&self) -> Kind {
        match self {
            Error::NotFound { .. }
            | Error::Unreachable { .. }
            | Error::Server { .. }
            | Error::Auth { .. }
            | Error::Forbidden { .. } => Kind::NoKey,
            Error::AlreadyExists { .. } => Kind::Busy,
            Error::InvalidKeyId { .. }
            | Error::ContentType { .. }
            | Error::Protocol { .. }
            | Error::Invalid { .. }
            | Error::Io { .. }
            | Error::InsecurePermissions { .. }
            | Error::Config { .. }
            | Error::Unsupported { .. } => Kind::Invalid,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_checked_before_use() {
        for ok in [
            "3e1b2c4d-0000-4000-8000-000000000001",
            "volume_key.v2",
            "A",
            &"x".repeat(128),
        ] {
            assert!(validate_key_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", ".", "..", ".hidden", "a/b", "../etc", "a\\b", "a b", "é", "a\0b", "a%2f",
        ] {
            assert!(
                matches!(validate_key_id(bad), Err(Error::InvalidKeyId { .. })),
                "{bad:?}"
            );
        }
        let long = "y".repeat(129);
        let err = validate_key_id(&long).unwrap_err();
        assert!(err.to_string().contains("longer than 128"), "{err}");
    }

    #[test]
    fn secret_passphrase_follows_the_openstack_rule() {
        let s = Secret::new(SecretType::Symmetric, SecretBytes::new(vec![0x0a, 0xff]));
        assert_eq!(s.passphrase().expose(), b"0aff");
        let p = Secret::new(SecretType::Passphrase, SecretBytes::new(b"pw\n".to_vec()));
        assert_eq!(p.passphrase().expose(), b"pw\n");
    }

    #[test]
    fn unavailable_keys_exit_2() {
        let e = Error::NotFound {
            key_id: "k".into(),
            manager: "keystore",
        };
        assert_eq!(e.kind(), Kind::NoKey);
        assert!(e.to_string().contains("secret k not found"));
    }
}
