//! Cinder's `fixed_key` compatibility.
//!
//! Deployments without a key manager configure `[key_manager] fixed_key = <hex>` in Cinder and
//! Nova; their encrypted volumes then carry the all-zero key id [`FIXED_KEY_ID`], and the key is
//! the hex-decoded string, handed out as a *symmetric* secret — so the LUKS passphrase os-brick
//! derives is that hex string in lowercase.
//!
//! Why a wrapper: when such a deployment later adopts Barbican, castellan's migration key
//! manager keeps answering the all-zero id with the fixed key while every other id goes to
//! Barbican, so old and new volumes both keep working. [`FixedKey`] does the same in front of any
//! inner manager (keystore or Barbican); with no inner manager (backend `fixed-key`) it behaves
//! like Cinder's plain ConfKeyManager and knows only the all-zero id.

use crate::keys::{Consumer, Error, KeyManager, Secret};
use crate::secret::{SecretBytes, SecretType};

/// The key id Cinder stores for volumes encrypted with the fixed key.
pub const FIXED_KEY_ID: &str = "00000000-0000-0000-0000-000000000000";

/// Answers [`FIXED_KEY_ID`] with the configured key; delegates every other id.
pub struct FixedKey {
    key: SecretBytes,
    inner: Option<Box<dyn KeyManager>>,
}

impl FixedKey {
    /// `key` is the decoded key bytes (see [`decode_hex_key`]).
    pub fn new(key: SecretBytes, inner: Option<Box<dyn KeyManager>>) -> Self {
        FixedKey { key, inner }
    }

    /// The wrapped manager's kind, if any (for status output: "fixed-key+barbican").
    pub fn inner_kind(&self) -> Option<&'static str> {
        self.inner.as_ref().map(|m| m.kind())
    }
}

impl KeyManager for FixedKey {
    fn kind(&self) -> &'static str {
        "fixed-key"
    }

    fn get(&self, key_id: &str) -> Result<Secret, Error> {
        if key_id == FIXED_KEY_ID {
            return Ok(Secret::new(SecretType::Symmetric, self.key.clone()));
        }
        match &self.inner {
            Some(inner) => inner.get(key_id),
            None => {
                crate::keys::validate_key_id(key_id)?;
                Err(Error::NotFound {
                    key_id: key_id.to_string(),
                    manager: "fixed-key manager (it knows only the all-zero key id)",
                })
            }
        }
    }

    fn create(&self, name: Option<&str>, secret: &Secret) -> Result<String, Error> {
        match &self.inner {
            Some(inner) => inner.create(name, secret),
            None => Err(Error::Unsupported {
                manager: "the fixed-key manager".into(),
                what: "creating secrets",
            }),
        }
    }

    fn add_consumer(&self, key_id: &str, consumer: &Consumer) -> Result<(), Error> {
        match &self.inner {
            Some(inner) if key_id != FIXED_KEY_ID => inner.add_consumer(key_id, consumer),
            _ => Ok(()),
        }
    }

    fn remove_consumer(&self, key_id: &str, consumer: &Consumer) -> Result<(), Error> {
        match &self.inner {
            Some(inner) if key_id != FIXED_KEY_ID => inner.remove_consumer(key_id, consumer),
            _ => Ok(()),
        }
    }

    fn health(&self) -> Result<(), Error> {
        match &self.inner {
            Some(inner) => inner.health(),
            None => Ok(()),
        }
    }
}

/// Decode Cinder's `fixed_key` hex string (either case; surrounding whitespace ignored).
/// Errors say what is wrong without echoing the key.
pub fn decode_hex_key(hex: &[u8]) -> Result<SecretBytes, Error> {
    decode_hex(hex, 1024).map_err(|reason| Error::Config {
        field: "key_manager.fixed_key".into(),
        reason: reason.into(),
    })
}

/// Hex (either case, surrounding whitespace ignored) to bytes, at most `max_bytes`; the error
/// describes the problem, never the input.
pub fn decode_hex(hex: &[u8], max_bytes: usize) -> Result<SecretBytes, &'static str> {
    let hex = hex.trim_ascii();
    if hex.is_empty() {
        return Err("it is empty");
    }
    if !hex.len().is_multiple_of(2) {
        return Err("it has an odd number of hex digits");
    }
    if hex.len() / 2 > max_bytes {
        return Err("it is too long");
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(hex.len() / 2));
    for pair in hex.chunks_exact(2) {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => out.push(h << 4 | l),
            _ => return Err("it contains a character that is not a hex digit"),
        }
    }
    Ok(SecretBytes::new(std::mem::take(&mut *out)))
}
