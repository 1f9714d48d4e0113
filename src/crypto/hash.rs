//! Hash algorithms LUKS headers name (keyslot/digest PBKDF2 hashes, AF diffusion, ESSIV), and
//! PBKDF2-HMAC over them.

use std::fmt;

use hmac::EagerHash;
use sha2::Digest;

use super::Error;

/// A hash algorithm named in a LUKS header. cryptsetup's common choices; anything else gives
/// [`Error::UnsupportedHash`] naming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Ripemd160,
}

impl HashAlg {
    /// Every supported algorithm, for help texts and tests.
    pub const ALL: [HashAlg; 6] = [
        HashAlg::Sha1,
        HashAlg::Sha224,
        HashAlg::Sha256,
        HashAlg::Sha384,
        HashAlg::Sha512,
        HashAlg::Ripemd160,
    ];

    /// Parses a hash name as cryptsetup writes it ("sha256"), case-insensitively.
    pub fn from_name(name: &str) -> Result<Self, Error> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Ok(HashAlg::Sha1),
            "sha224" => Ok(HashAlg::Sha224),
            "sha256" => Ok(HashAlg::Sha256),
            "sha384" => Ok(HashAlg::Sha384),
            "sha512" => Ok(HashAlg::Sha512),
            "ripemd160" => Ok(HashAlg::Ripemd160),
            _ => Err(Error::UnsupportedHash(name.to_string())),
        }
    }

    /// The name cryptsetup writes into headers.
    pub fn name(&self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
        }
    }

    /// Digest length in bytes.
    pub fn output_len(&self) -> usize {
        match self {
            HashAlg::Sha1 | HashAlg::Ripemd160 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The hash of the concatenation of `parts`.
    pub fn digest(&self, parts: &[&[u8]]) -> Vec<u8> {
        match self {
            HashAlg::Sha1 => digest_parts::<sha1::Sha1>(parts),
            HashAlg::Sha224 => digest_parts::<sha2::Sha224>(parts),
            HashAlg::Sha256 => digest_parts::<sha2::Sha256>(parts),
            HashAlg::Sha384 => digest_parts::<sha2::Sha384>(parts),
            HashAlg::Sha512 => digest_parts::<sha2::Sha512>(parts),
            HashAlg::Ripemd160 => digest_parts::<ripemd::Ripemd160>(parts),
        }
    }
}

impl fmt::Display for HashAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn digest_parts<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
    let mut h = D::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().to_vec()
}

/// PBKDF2 (RFC 8018) with HMAC over `hash`, filling `out`. Any password length and iteration
/// count ≥ 1 is accepted (0 is treated as 1, as in most implementations' loop structure);
/// callers bound the iteration count through [`super::KdfLimits`].
pub fn pbkdf2(hash: HashAlg, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    let rounds = iterations.max(1);
    match hash {
        HashAlg::Sha1 => pbkdf2_generic::<sha1::Sha1>(password, salt, rounds, out),
        HashAlg::Sha224 => pbkdf2_generic::<sha2::Sha224>(password, salt, rounds, out),
        HashAlg::Sha256 => pbkdf2_generic::<sha2::Sha256>(password, salt, rounds, out),
        HashAlg::Sha384 => pbkdf2_generic::<sha2::Sha384>(password, salt, rounds, out),
        HashAlg::Sha512 => pbkdf2_generic::<sha2::Sha512>(password, salt, rounds, out),
        HashAlg::Ripemd160 => pbkdf2_generic::<ripemd::Ripemd160>(password, salt, rounds, out),
    }
}

fn pbkdf2_generic<D: EagerHash>(password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
    pbkdf2::pbkdf2_hmac::<D>(password, salt, rounds, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_hash_is_named() {
        for h in HashAlg::ALL {
            assert_eq!(HashAlg::from_name(h.name()).unwrap(), h);
            assert_eq!(h.digest(&[b"x"]).len(), h.output_len());
        }
        assert_eq!(HashAlg::from_name("SHA256").unwrap(), HashAlg::Sha256);
        let e = HashAlg::from_name("whirlpool").unwrap_err();
        assert!(e.to_string().contains("whirlpool"), "{e}");
    }

    #[test]
    fn digest_of_parts_is_digest_of_concatenation() {
        for h in HashAlg::ALL {
            assert_eq!(h.digest(&[b"ab", b"", b"c"]), h.digest(&[b"abc"]));
        }
        // FIPS 180-2 "abc" vector.
        assert_eq!(
            hex(&HashAlg::Sha256.digest(&[b"abc"])),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
