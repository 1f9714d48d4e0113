//! AES-XTS (IEEE 1619) over whole sectors, the way dm-crypt uses it: each sector is one data
//! unit whose initial tweak is AES_{K2}(IV block), and block j of the sector is processed as
//! C_j = AES_{K1}(P_j ⊕ T_j) ⊕ T_j with T_j = T_0 · α^j in GF(2^128).
//!
//! Sectors are whole multiples of 16 bytes, so ciphertext stealing is never needed.
//!
//! Speed matters here (it bounds image encrypt/decrypt), so [`Xts`] picks at run time the
//! fastest implementation the CPU supports: VAES with AVX-512 or AVX2, AES-NI, or a portable
//! path built on the `aes` crate's bulk block functions. All produce identical output; the
//! tests compare them with each other, with the IEEE 1619 vectors and with OpenSSL.

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

use super::Error;
#[cfg(target_arch = "x86_64")]
use super::aes_impl::x86;

/// An AES-XTS key (two AES keys of 128 or 256 bits), ready to process sectors.
pub struct Xts {
    backend: Backend,
}

enum Backend {
    Portable(Box<PortableXts>),
    /// The round keys carry the detected CPU level they run at.
    #[cfg(target_arch = "x86_64")]
    X86(Box<x86::XtsKeys>),
}

/// Which implementation an [`Xts`] uses; reported by `volcrypt bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    /// `aes` crate bulk block functions with tweaks computed per sector.
    Portable,
    /// AES-NI, 8 blocks in flight (x86_64).
    AesNi,
    /// VAES on 256-bit vectors with AVX2, 16 blocks in flight (x86_64).
    Vaes256,
    /// VAES on 512-bit vectors with AVX-512, 32 blocks in flight (x86_64).
    Vaes512,
}

impl Implementation {
    /// Every implementation volcrypt has, whether or not this CPU can run it.
    pub const ALL: [Implementation; 4] = [
        Implementation::Vaes512,
        Implementation::Vaes256,
        Implementation::AesNi,
        Implementation::Portable,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Implementation::Portable => "portable (aes crate)",
            Implementation::AesNi => "AES-NI",
            Implementation::Vaes256 => "VAES-256/AVX2",
            Implementation::Vaes512 => "VAES-512/AVX-512",
        }
    }

    /// The implementations this CPU can run (detected at run time), preferred (fastest)
    /// first. Each one can be asked for with [`Xts::with_implementation`].
    pub fn available() -> Vec<Implementation> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        for level in x86::Level::detect_all() {
            v.push(level.implementation());
        }
        v.push(Implementation::Portable);
        v
    }
}

impl Xts {
    /// A key of 32 bytes (AES-128-XTS) or 64 bytes (AES-256-XTS): data key first, tweak key
    /// second, as dm-crypt and IEEE 1619 order them. Uses the fastest implementation this CPU
    /// supports, detected once here (never per sector).
    pub fn new(key: &[u8]) -> Result<Self, Error> {
        check_key(key)?;
        #[cfg(target_arch = "x86_64")]
        if let Some(level) = x86::Level::detect() {
            return Self::x86(key, level);
        }
        Self::portable(key)
    }

    /// As [`Xts::new`], with one given implementation (tests and benchmarks run each one).
    /// The CPU's support is detected here: asking for one it lacks is an error, never a
    /// fallback and never an attempt to run instructions the CPU does not have.
    pub fn with_implementation(key: &[u8], imp: Implementation) -> Result<Self, Error> {
        check_key(key)?;
        if imp == Implementation::Portable {
            return Self::portable(key);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(level) = x86::Level::detect_all()
            .into_iter()
            .find(|l| l.implementation() == imp)
        {
            return Self::x86(key, level);
        }
        Err(Error::ImplementationUnavailable(imp.name()))
    }

    fn portable(key: &[u8]) -> Result<Self, Error> {
        Ok(Xts {
            backend: Backend::Portable(Box::new(PortableXts::new(key)?)),
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn x86(key: &[u8], level: x86::Level) -> Result<Self, Error> {
        let keys = x86::XtsKeys::new(key, level).ok_or_else(|| key_length_error(key))?;
        Ok(Xts {
            backend: Backend::X86(Box::new(keys)),
        })
    }

    pub fn implementation(&self) -> Implementation {
        match &self.backend {
            Backend::Portable(_) => Implementation::Portable,
            #[cfg(target_arch = "x86_64")]
            Backend::X86(k) => k.level().implementation(),
        }
    }

    /// Encrypts consecutive sectors of `sector_size` bytes in place, sector i with IV block
    /// `ivs[i]`. `data.len()` must be `ivs.len() * sector_size` and `sector_size` a non-zero
    /// multiple of 16 ([`super::SectorCipher`] guarantees both).
    ///
    /// # Panics
    /// If the layout is violated: processing only part of the data would be wrong output.
    pub fn encrypt_sectors(&self, data: &mut [u8], sector_size: usize, ivs: &[[u8; 16]]) {
        check_layout(data.len(), sector_size, ivs.len());
        match &self.backend {
            Backend::Portable(k) => {
                for (sector, iv) in data.chunks_exact_mut(sector_size).zip(ivs) {
                    k.crypt_sector(sector, iv, true);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Backend::X86(k) => k.crypt_sectors(data, sector_size, ivs, true),
        }
    }

    /// Decrypts, as [`Xts::encrypt_sectors`].
    ///
    /// # Panics
    /// As [`Xts::encrypt_sectors`].
    pub fn decrypt_sectors(&self, data: &mut [u8], sector_size: usize, ivs: &[[u8; 16]]) {
        check_layout(data.len(), sector_size, ivs.len());
        match &self.backend {
            Backend::Portable(k) => {
                for (sector, iv) in data.chunks_exact_mut(sector_size).zip(ivs) {
                    k.crypt_sector(sector, iv, false);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Backend::X86(k) => k.crypt_sectors(data, sector_size, ivs, false),
        }
    }
}

fn check_key(key: &[u8]) -> Result<(), Error> {
    if key.len() == 32 || key.len() == 64 {
        Ok(())
    } else {
        Err(key_length_error(key))
    }
}

fn key_length_error(key: &[u8]) -> Error {
    Error::InvalidKeyLength {
        spec: "aes-xts".into(),
        got: key.len(),
        expected: "32 or 64 bytes",
    }
}

fn check_layout(data_len: usize, sector_size: usize, sectors: usize) {
    assert!(
        sector_size > 0
            && sector_size.is_multiple_of(16)
            && sector_size.checked_mul(sectors) == Some(data_len),
        "XTS: {data_len} bytes are not {sectors} sectors of {sector_size} bytes (whole 16-byte blocks)"
    );
}

/// Multiplies a tweak by α (x) in GF(2^128) with the XTS (little-endian) bit order.
#[inline]
pub fn mul_alpha(t: u128) -> u128 {
    let carry = (t >> 127) as u8;
    (t << 1) ^ u128::from(0x87 * carry)
}

/// An AES key of any size from the `aes` crate (both directions). Zeroized on drop by the
/// crate (its `zeroize` feature is enabled in Cargo.toml).
pub(crate) enum AesAny {
    Aes128(aes::Aes128),
    Aes192(aes::Aes192),
    Aes256(aes::Aes256),
}

impl AesAny {
    /// Callers guarantee a 16-, 24- or 32-byte key.
    pub(crate) fn new(key: &[u8]) -> Option<Self> {
        match key.len() {
            16 => aes::Aes128::new_from_slice(key).ok().map(AesAny::Aes128),
            24 => aes::Aes192::new_from_slice(key).ok().map(AesAny::Aes192),
            32 => aes::Aes256::new_from_slice(key).ok().map(AesAny::Aes256),
            _ => None,
        }
    }

    pub(crate) fn encrypt_blocks(&self, blocks: &mut [aes::Block]) {
        match self {
            AesAny::Aes128(c) => c.encrypt_blocks(blocks),
            AesAny::Aes192(c) => c.encrypt_blocks(blocks),
            AesAny::Aes256(c) => c.encrypt_blocks(blocks),
        }
    }

    pub(crate) fn decrypt_blocks(&self, blocks: &mut [aes::Block]) {
        match self {
            AesAny::Aes128(c) => c.decrypt_blocks(blocks),
            AesAny::Aes192(c) => c.decrypt_blocks(blocks),
            AesAny::Aes256(c) => c.decrypt_blocks(blocks),
        }
    }

    pub(crate) fn encrypt_block(&self, block: &mut [u8; 16]) {
        let mut b = aes::Block::from(*block);
        self.encrypt_blocks(std::slice::from_mut(&mut b));
        block.copy_from_slice(&b);
    }

    pub(crate) fn decrypt_block(&self, block: &mut [u8; 16]) {
        let mut b = aes::Block::from(*block);
        self.decrypt_blocks(std::slice::from_mut(&mut b));
        block.copy_from_slice(&b);
    }
}

/// The portable XTS: tweaks for a run of blocks computed first, then one bulk call into the
/// `aes` crate (which itself uses AES-NI/VAES when present) for the run.
struct PortableXts {
    data: AesAny,
    tweak: AesAny,
}

/// Blocks processed per bulk call in the portable path.
const PORTABLE_RUN: usize = 64;

impl PortableXts {
    /// A 32- or 64-byte key: two AES-128 or two AES-256 keys.
    fn new(key: &[u8]) -> Result<Self, Error> {
        let half = key.len() / 2;
        match (AesAny::new(&key[..half]), AesAny::new(&key[half..])) {
            (Some(data), Some(tweak)) if key.len() == 32 || key.len() == 64 => {
                Ok(PortableXts { data, tweak })
            }
            _ => Err(key_length_error(key)),
        }
    }

    fn crypt_sector(&self, sector: &mut [u8], iv: &[u8; 16], encrypt: bool) {
        let mut t0 = *iv;
        self.tweak.encrypt_block(&mut t0);
        let mut t = u128::from_le_bytes(t0);
        let (blocks, _) = aes::Block::slice_as_chunks_mut(sector);
        let mut tweaks = [0u128; PORTABLE_RUN];
        for run in blocks.chunks_mut(PORTABLE_RUN) {
            for (b, tw) in run.iter_mut().zip(tweaks.iter_mut()) {
                *tw = t;
                xor_block(b, t);
                t = mul_alpha(t);
            }
            if encrypt {
                self.data.encrypt_blocks(run);
            } else {
                self.data.decrypt_blocks(run);
            }
            for (b, tw) in run.iter_mut().zip(tweaks.iter()) {
                xor_block(b, *tw);
            }
        }
    }
}

#[inline]
fn xor_block(b: &mut aes::Block, t: u128) {
    let v = u128::from_le_bytes((*b).into()) ^ t;
    b.copy_from_slice(&v.to_le_bytes());
}

/// The textbook XTS, one 16-byte block at a time, as the `xts-mode` crate does it: the
/// baseline `volcrypt bench` compares against, and an independent oracle for tests.
pub struct ReferenceXts {
    data: AesAny,
    tweak: AesAny,
}

impl ReferenceXts {
    /// 32- or 64-byte key.
    pub fn new(key: &[u8]) -> Result<Self, Error> {
        let p = PortableXts::new(key)?;
        Ok(ReferenceXts {
            data: p.data,
            tweak: p.tweak,
        })
    }

    /// Encrypts (or decrypts) one sector with IV block `iv`, block by block.
    pub fn crypt_sector(&self, sector: &mut [u8], iv: &[u8; 16], encrypt: bool) {
        let mut t0 = *iv;
        self.tweak.encrypt_block(&mut t0);
        let mut t = u128::from_le_bytes(t0);
        for chunk in sector.chunks_exact_mut(16) {
            let mut b = [0u8; 16];
            b.copy_from_slice(chunk);
            let mut x = (u128::from_le_bytes(b) ^ t).to_le_bytes();
            if encrypt {
                self.data.encrypt_block(&mut x);
            } else {
                self.data.decrypt_block(&mut x);
            }
            let y = u128::from_le_bytes(x) ^ t;
            chunk.copy_from_slice(&y.to_le_bytes());
            t = mul_alpha(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_implementation_the_cpu_lacks_is_refused_not_run() {
        let available = Implementation::available();
        assert_eq!(available.last(), Some(&Implementation::Portable));
        assert_eq!(
            Xts::new(&[7; 64]).unwrap().implementation(),
            available[0],
            "Xts::new picks the preferred detected implementation"
        );
        for imp in Implementation::ALL {
            let r = Xts::with_implementation(&[7; 64], imp);
            if available.contains(&imp) {
                assert_eq!(r.unwrap().implementation(), imp);
            } else {
                let e = r.err().expect("unsupported implementation must be refused");
                assert!(e.to_string().contains(imp.name()), "{e}");
            }
        }
        for bad in [0, 16, 48, 65] {
            for imp in Implementation::ALL {
                assert!(Xts::with_implementation(&vec![1; bad], imp).is_err());
            }
        }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn every_available_implementation_matches_the_reference() {
        for key_len in [32, 64] {
            let key = pseudo_random(key_len, key_len as u64);
            let reference = ReferenceXts::new(&key).unwrap();
            for imp in Implementation::available() {
                let xts = Xts::with_implementation(&key, imp).unwrap();
                assert_eq!(xts.implementation(), imp);
                for sector_size in [16, 32, 48, 512, 528, 1024, 4096] {
                    let sectors = 5;
                    let plain = pseudo_random(sector_size * sectors, sector_size as u64);
                    let ivs: Vec<[u8; 16]> = (0..sectors)
                        .map(|i| {
                            let mut iv = [0u8; 16];
                            iv.copy_from_slice(&pseudo_random(16, 1000 + i as u64));
                            iv
                        })
                        .collect();
                    let mut want = plain.clone();
                    for (s, iv) in want.chunks_exact_mut(sector_size).zip(&ivs) {
                        reference.crypt_sector(s, iv, true);
                    }
                    let mut got = plain.clone();
                    xts.encrypt_sectors(&mut got, sector_size, &ivs);
                    assert!(got == want, "{imp:?} key {key_len} sector {sector_size}");
                    xts.decrypt_sectors(&mut got, sector_size, &ivs);
                    assert!(got == plain, "{imp:?} decrypt, sector {sector_size}");
                }
            }
        }
    }
}
