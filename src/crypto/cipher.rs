//! Cipher specifications as LUKS and dm-crypt spell them ("aes-xts-plain64"), and
//! [`SectorCipher`], which encrypts and decrypts whole sectors with dm-crypt's IV rules.
//!
//! IV block for sector number n (a 16-byte block, zero-padded):
//! - `plain`: n truncated to 32 bits, little-endian (wraps every 2 TiB of 512-byte sectors);
//! - `plain64`: n as 64-bit little-endian;
//! - `essiv:H`: AES_{H(volume key)}(plain64 block), with the hash's digest as the AES key.
//!
//! XTS then encrypts the IV block with its tweak key; CBC chains from it directly.

use std::fmt;

use super::Error;
use super::cbc;
use super::hash::HashAlg;
use super::xts::{AesAny, Xts};

/// The block cipher of a spec. Only AES is implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockCipher {
    Aes,
}

/// The chaining mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Xts,
    Cbc,
}

/// The IV generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IvMode {
    Plain,
    Plain64,
    /// ESSIV with this hash; its digest must be a valid AES key length (16, 24 or 32 bytes).
    Essiv(HashAlg),
}

/// A parsed cipher specification such as `aes-xts-plain64` or `aes-cbc-essiv:sha256`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CipherSpec {
    pub cipher: BlockCipher,
    pub mode: Mode,
    pub iv: IvMode,
}

impl CipherSpec {
    /// The cryptsetup 2.6 default, `aes-xts-plain64`.
    pub const AES_XTS_PLAIN64: CipherSpec = CipherSpec {
        cipher: BlockCipher::Aes,
        mode: Mode::Xts,
        iv: IvMode::Plain64,
    };

    /// Parses a dm-crypt/LUKS2 cipher string, `CIPHER-MODE-IV`. Anything volcrypt cannot
    /// process exactly (other ciphers, modes or IV generators, key-count or `capi:` forms)
    /// is [`Error::UnsupportedCipher`] naming the whole spec.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let unsupported = || Error::UnsupportedCipher(spec.to_string());
        let lower = spec.to_ascii_lowercase();
        let mut parts = lower.splitn(3, '-');
        let (Some(cipher), Some(mode), Some(iv)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(unsupported());
        };
        let cipher = match cipher {
            "aes" => BlockCipher::Aes,
            _ => return Err(unsupported()),
        };
        let mode = match mode {
            "xts" => Mode::Xts,
            "cbc" => Mode::Cbc,
            _ => return Err(unsupported()),
        };
        let iv = match iv {
            "plain" => IvMode::Plain,
            "plain64" => IvMode::Plain64,
            _ => {
                let Some(hash) = iv.strip_prefix("essiv:") else {
                    return Err(unsupported());
                };
                let hash = HashAlg::from_name(hash).map_err(|_| unsupported())?;
                if !matches!(hash.output_len(), 16 | 24 | 32) {
                    // The kernel keys the ESSIV AES with the digest; other lengths fail there.
                    return Err(unsupported());
                }
                IvMode::Essiv(hash)
            }
        };
        Ok(CipherSpec { cipher, mode, iv })
    }

    /// From a LUKS1 header's `cipher-name` and `cipher-mode` fields, e.g. ("aes", "xts-plain64").
    pub fn from_luks1(cipher_name: &str, cipher_mode: &str) -> Result<Self, Error> {
        if cipher_name.contains('-') {
            return Err(Error::UnsupportedCipher(format!(
                "{cipher_name}-{cipher_mode}"
            )));
        }
        Self::parse(&format!("{cipher_name}-{cipher_mode}"))
    }

    /// The LUKS1 header's `cipher-name` and `cipher-mode` for this spec.
    pub fn luks1_names(&self) -> (String, String) {
        let name = match self.cipher {
            BlockCipher::Aes => "aes",
        };
        let mode = match self.mode {
            Mode::Xts => "xts",
            Mode::Cbc => "cbc",
        };
        let iv = match self.iv {
            IvMode::Plain => "plain".to_string(),
            IvMode::Plain64 => "plain64".to_string(),
            IvMode::Essiv(h) => format!("essiv:{}", h.name()),
        };
        (name.to_string(), format!("{mode}-{iv}"))
    }

    /// Checks a volume key length: XTS takes two AES keys (32 or 64 bytes), CBC one
    /// (16, 24 or 32 bytes).
    pub fn check_key_len(&self, key_bytes: usize) -> Result<(), Error> {
        let (ok, expected) = match self.mode {
            Mode::Xts => (matches!(key_bytes, 32 | 64), "32 or 64 bytes"),
            Mode::Cbc => (matches!(key_bytes, 16 | 24 | 32), "16, 24 or 32 bytes"),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidKeyLength {
                spec: self.to_string(),
                got: key_bytes,
                expected,
            })
        }
    }
}

impl fmt::Display for CipherSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, mode) = self.luks1_names();
        write!(f, "{name}-{mode}")
    }
}

/// Checks a sector size for [`SectorCipher`]: a non-zero multiple of 512 (LUKS uses 512..4096,
/// powers of two).
pub fn check_sector_size(sector_size: usize) -> Result<(), Error> {
    if sector_size == 0 || !sector_size.is_multiple_of(512) {
        return Err(Error::UnsupportedCipher(format!(
            "sector size {sector_size} (must be a non-zero multiple of 512)"
        )));
    }
    Ok(())
}

/// Encrypts/decrypts whole sectors. Send + Sync (shared across rayon threads); key material
/// (round keys) is zeroized on drop.
pub struct SectorCipher {
    spec: CipherSpec,
    engine: Engine,
    essiv: Option<AesAny>,
}

enum Engine {
    Xts(Xts),
    Cbc(Box<AesAny>),
}

/// Sectors whose IV blocks are computed at once (bulk ESSIV encryption, XTS tweak batching).
const IV_BATCH: usize = 64;

impl SectorCipher {
    pub fn new(spec: &CipherSpec, key: &[u8]) -> Result<Self, Error> {
        spec.check_key_len(key.len())?;
        let engine = match spec.mode {
            Mode::Xts => Engine::Xts(Xts::new(key)?),
            Mode::Cbc => Engine::Cbc(Box::new(
                AesAny::new(key).ok_or_else(|| Error::UnsupportedCipher(spec.to_string()))?,
            )),
        };
        let essiv = match spec.iv {
            IvMode::Essiv(hash) => {
                let salt = zeroize::Zeroizing::new(hash.digest(&[key]));
                Some(AesAny::new(&salt).ok_or_else(|| Error::UnsupportedCipher(spec.to_string()))?)
            }
            _ => None,
        };
        Ok(SectorCipher {
            spec: spec.clone(),
            engine,
            essiv,
        })
    }

    pub fn spec(&self) -> &CipherSpec {
        &self.spec
    }

    /// Which XTS implementation runs (None for CBC), for `volcrypt bench` and logs.
    pub fn xts_implementation(&self) -> Option<super::xts::Implementation> {
        match &self.engine {
            Engine::Xts(x) => Some(x.implementation()),
            Engine::Cbc(_) => None,
        }
    }

    /// Encrypts `data` in place. `data.len()` is a multiple of `sector_size`. Sector k of
    /// `data` uses IV number `first_iv + k * (sector_size / 512)` (LUKS counts IVs in
    /// 512-byte units even for 4 KiB sectors).
    ///
    /// # Panics
    /// If `sector_size` fails [`check_sector_size`] or `data.len()` is not a multiple of it:
    /// both are fixed by the caller's validated header, so a violation is a bug there.
    pub fn encrypt(&self, data: &mut [u8], sector_size: usize, first_iv: u64) {
        self.crypt(data, sector_size, first_iv, true);
    }

    /// Decrypts `data` in place; the same layout rules as [`SectorCipher::encrypt`].
    ///
    /// # Panics
    /// As [`SectorCipher::encrypt`].
    pub fn decrypt(&self, data: &mut [u8], sector_size: usize, first_iv: u64) {
        self.crypt(data, sector_size, first_iv, false);
    }

    fn crypt(&self, data: &mut [u8], sector_size: usize, first_iv: u64, encrypt: bool) {
        assert!(
            check_sector_size(sector_size).is_ok() && data.len().is_multiple_of(sector_size),
            "SectorCipher: {} bytes are not whole sectors of {sector_size} bytes",
            data.len()
        );
        let step = (sector_size / 512) as u64;
        let mut ivs = [[0u8; 16]; IV_BATCH];
        let mut iv = first_iv;
        for batch in data.chunks_mut(sector_size * IV_BATCH) {
            let n = batch.len() / sector_size;
            let ivs = &mut ivs[..n];
            for block in ivs.iter_mut() {
                *block = self.iv_block(iv);
                iv = iv.wrapping_add(step);
            }
            if let Some(essiv) = &self.essiv {
                let (blocks, _) = aes::Block::slice_as_chunks_mut(ivs.as_flattened_mut());
                essiv.encrypt_blocks(blocks);
            }
            match (&self.engine, encrypt) {
                (Engine::Xts(x), true) => x.encrypt_sectors(batch, sector_size, ivs),
                (Engine::Xts(x), false) => x.decrypt_sectors(batch, sector_size, ivs),
                (Engine::Cbc(k), true) => {
                    for (s, iv) in batch.chunks_exact_mut(sector_size).zip(ivs.iter()) {
                        cbc::encrypt_sector(k, s, iv);
                    }
                }
                (Engine::Cbc(k), false) => {
                    for (s, iv) in batch.chunks_exact_mut(sector_size).zip(ivs.iter()) {
                        cbc::decrypt_sector(k, s, iv);
                    }
                }
            }
        }
    }

    /// The unencrypted IV block (before ESSIV) for IV number `n`.
    fn iv_block(&self, n: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        match self.spec.iv {
            IvMode::Plain => b[..4].copy_from_slice(&(n as u32).to_le_bytes()),
            IvMode::Plain64 | IvMode::Essiv(_) => b[..8].copy_from_slice(&n.to_le_bytes()),
        }
        b
    }
}

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SectorCipher")
            .field("spec", &self.spec.to_string())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_specs_and_round_trips_names() {
        for s in [
            "aes-xts-plain64",
            "aes-xts-plain",
            "aes-cbc-essiv:sha256",
            "aes-cbc-plain",
            "aes-cbc-plain64",
            "aes-xts-essiv:sha256",
        ] {
            let spec = CipherSpec::parse(s).unwrap();
            assert_eq!(spec.to_string(), s);
            let (n, m) = spec.luks1_names();
            assert_eq!(CipherSpec::from_luks1(&n, &m).unwrap(), spec);
        }
        assert_eq!(
            CipherSpec::from_luks1("aes", "xts-plain64").unwrap(),
            CipherSpec::AES_XTS_PLAIN64
        );
        assert_eq!(
            CipherSpec::parse("AES-XTS-PLAIN64").unwrap(),
            CipherSpec::AES_XTS_PLAIN64
        );
    }

    #[test]
    fn unsupported_specs_are_named() {
        for s in [
            "serpent-xts-plain64",
            "twofish-cbc-essiv:sha256",
            "aes-cbc-benbi",
            "aes-lrw-benbi",
            "aes-xts",
            "aes",
            "",
            "aes-ecb-plain",
            "aes-cbc-essiv:sha1",
            "aes-cbc-essiv:whirlpool",
            "aes-xts-plain64be",
            "capi:xts(aes)-plain64",
            "aes:64-cbc-lmk",
            "cipher_null-ecb",
        ] {
            let e = CipherSpec::parse(s).unwrap_err();
            assert!(matches!(e, Error::UnsupportedCipher(_)), "{s}: {e}");
            assert!(e.to_string().contains(&format!("{s:?}")), "{e}");
        }
        assert!(CipherSpec::from_luks1("aes-xts", "plain64").is_err());
    }

    #[test]
    fn key_lengths() {
        let xts = CipherSpec::AES_XTS_PLAIN64;
        assert!(xts.check_key_len(32).is_ok() && xts.check_key_len(64).is_ok());
        for bad in [0, 16, 24, 48, 65] {
            let e = xts.check_key_len(bad).unwrap_err();
            assert!(e.to_string().contains("aes-xts-plain64"), "{e}");
            assert!(SectorCipher::new(&xts, &vec![0; bad]).is_err());
        }
        let cbc = CipherSpec::parse("aes-cbc-essiv:sha256").unwrap();
        for ok in [16, 24, 32] {
            assert!(SectorCipher::new(&cbc, &vec![1; ok]).is_ok());
        }
        assert!(cbc.check_key_len(64).is_err());
    }

    #[test]
    fn debug_output_hides_the_key() {
        let c = SectorCipher::new(&CipherSpec::AES_XTS_PLAIN64, &[0xab; 64]).unwrap();
        let shown = format!("{c:?}");
        assert!(
            shown.contains("aes-xts-plain64") && !shown.contains("171"),
            "{shown}"
        );
    }

    #[test]
    fn plain_iv_wraps_at_32_bits_and_plain64_does_not() {
        let key = [3u8; 64];
        let plain = SectorCipher::new(&CipherSpec::parse("aes-xts-plain").unwrap(), &key).unwrap();
        let p64 = SectorCipher::new(&CipherSpec::AES_XTS_PLAIN64, &key).unwrap();
        let data = vec![0u8; 512];
        let (mut a, mut b, mut c) = (data.clone(), data.clone(), data.clone());
        plain.encrypt(&mut a, 512, 1 << 32);
        p64.encrypt(&mut b, 512, 0);
        p64.encrypt(&mut c, 512, 1 << 32);
        assert_eq!(a, b);
        assert_ne!(b, c);
    }

    #[test]
    fn iv_counts_512_byte_units_for_large_sectors() {
        let c = SectorCipher::new(&CipherSpec::AES_XTS_PLAIN64, &[9u8; 32]).unwrap();
        let data: Vec<u8> = (0..3 * 4096).map(|i| i as u8).collect();
        let mut whole = data.clone();
        c.encrypt(&mut whole, 4096, 100);
        for k in 0..3 {
            let mut one = data[k * 4096..(k + 1) * 4096].to_vec();
            c.encrypt(&mut one, 4096, 100 + 8 * k as u64);
            assert_eq!(one, whole[k * 4096..(k + 1) * 4096]);
        }
    }
}
