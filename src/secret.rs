//! Secrets as OpenStack hands them out, and the rule that turns one into a LUKS passphrase.
//!
//! os-brick (6.9.0 and later) uses a `passphrase` secret's payload verbatim and the lowercase
//! hex of every other secret type's payload. The secret type is the only record of which rule
//! applies, so it travels with the payload everywhere.

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

/// Key-manager secret types (Barbican's list). Only `passphrase` changes the derivation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretType {
    Passphrase,
    Symmetric,
    Opaque,
    Public,
    Private,
    Certificate,
}

impl SecretType {
    pub const NAMES: [&'static str; 6] = [
        "passphrase",
        "symmetric",
        "opaque",
        "public",
        "private",
        "certificate",
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            SecretType::Passphrase => "passphrase",
            SecretType::Symmetric => "symmetric",
            SecretType::Opaque => "opaque",
            SecretType::Public => "public",
            SecretType::Private => "private",
            SecretType::Certificate => "certificate",
        }
    }

    /// How a payload of this type becomes a passphrase.
    pub fn derivation(&self) -> Derivation {
        match self {
            SecretType::Passphrase => Derivation::Raw,
            _ => Derivation::LowercaseHex,
        }
    }
}

impl fmt::Display for SecretType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SecretType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "passphrase" => Ok(SecretType::Passphrase),
            "symmetric" => Ok(SecretType::Symmetric),
            "opaque" => Ok(SecretType::Opaque),
            "public" => Ok(SecretType::Public),
            "private" => Ok(SecretType::Private),
            "certificate" => Ok(SecretType::Certificate),
            _ => Err(format!(
                "unknown secret type {s:?} (accepted: {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// The passphrase derivation applied to a secret payload; reported (never the key) by
/// `status` and the RPC so operators can see which rule opened a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Derivation {
    /// The payload bytes are the passphrase, verbatim.
    Raw,
    /// The passphrase is the lowercase hex encoding of the payload.
    LowercaseHex,
}

impl fmt::Display for Derivation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Derivation::Raw => "raw",
            Derivation::LowercaseHex => "lowercase-hex",
        })
    }
}

/// Secret bytes (a passphrase, a payload, a volume key). Zeroed on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        SecretBytes::new(bytes)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// Apply the OpenStack rule: `passphrase` payloads verbatim, every other type lowercase hex.
pub fn derive_passphrase(secret_type: &SecretType, payload: &SecretBytes) -> SecretBytes {
    match secret_type.derivation() {
        Derivation::Raw => payload.clone(),
        Derivation::LowercaseHex => SecretBytes::new(lowercase_hex(payload.expose())),
    }
}

fn lowercase_hex(bytes: &[u8]) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passphrase_secrets_are_used_verbatim_including_newlines() {
        let p = SecretBytes::new(b"s3cret\n".to_vec());
        assert_eq!(
            derive_passphrase(&SecretType::Passphrase, &p).expose(),
            b"s3cret\n"
        );
    }

    #[test]
    fn other_secret_types_become_lowercase_hex_keeping_leading_zeros() {
        let p = SecretBytes::new(vec![0x07, 0xab, 0x00, 0xff]);
        for t in [
            SecretType::Symmetric,
            SecretType::Opaque,
            SecretType::Private,
        ] {
            assert_eq!(derive_passphrase(&t, &p).expose(), b"07ab00ff");
        }
    }

    #[test]
    fn debug_output_never_shows_secret_bytes() {
        let p = SecretBytes::new(b"hunter2".to_vec());
        let shown = format!("{p:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("7 bytes"));
    }

    #[test]
    fn secret_type_parsing_names_accepted_values() {
        assert_eq!("SYMMETRIC".parse::<SecretType>(), Ok(SecretType::Symmetric));
        let err = "aes".parse::<SecretType>().unwrap_err();
        assert!(err.contains("passphrase, symmetric, opaque"), "{err}");
    }
}
