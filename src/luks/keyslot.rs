//! Recovering a volume key from one keyslot, common to LUKS1 and LUKS2:
//! KDF(passphrase) → decrypt the AF-split key material (512-byte sectors, IV 0 at the area
//! start) → AF merge → PBKDF2 digest check.

use std::io::{Read, Seek};

use zeroize::Zeroizing;

use super::{Error, util};
use crate::crypto::af;
use crate::crypto::cipher::{CipherSpec, SectorCipher};
use crate::crypto::hash::HashAlg;
use crate::crypto::kdf::{Kdf, KdfLimits};
use crate::secret::SecretBytes;

/// Everything needed to open one keyslot, already validated against the header's bounds.
pub(crate) struct SlotParams<'a> {
    pub header: &'static str,
    /// JSON path or field name of the keyslot, for messages ("keyslots.3", "key_slot_2").
    pub field: String,
    pub kdf: Kdf,
    pub salt: &'a [u8],
    /// Bytes the KDF derives (the keyslot-encryption key, LUKS2 area.key_size).
    pub kdf_key_size: usize,
    /// Bytes of the volume key that was AF-split.
    pub key_size: usize,
    pub stripes: u32,
    pub af_hash: HashAlg,
    pub cipher: &'a CipherSpec,
    pub area_offset: u64,
    /// Bytes the area may hold; the material read never exceeds it.
    pub area_len: u64,
}

/// Anti-forensic stripes of every keyslot volcrypt writes (and LUKS1 requires).
pub(crate) const STRIPES: u32 = 4000;

/// Bytes of AF-split key material, rounded up to whole 512-byte sectors.
pub(crate) fn material_len(key_size: usize, stripes: u32) -> Option<u64> {
    (key_size as u64)
        .checked_mul(u64::from(stripes))
        .and_then(|n| util::round_up(n, 512))
}

/// Returns the candidate key (not yet checked against the digest).
pub(crate) fn candidate_key(
    r: &mut (impl Read + Seek),
    p: &SlotParams<'_>,
    passphrase: &[u8],
    limits: &KdfLimits,
) -> Result<SecretBytes, Error> {
    let len = material_len(p.key_size, p.stripes)
        .filter(|&n| n <= p.area_len)
        .ok_or_else(|| {
            Error::invalid(
                p.header,
                format!("{}.area", p.field),
                format!(
                    "{} stripes of a {}-byte key do not fit in {} bytes",
                    p.stripes, p.key_size, p.area_len
                ),
            )
        })?;
    let len = usize::try_from(len)
        .map_err(|_| Error::invalid(p.header, p.field.clone(), "key material too large"))?;
    p.cipher.check_key_len(p.kdf_key_size)?;
    let derived = p.kdf.derive(passphrase, p.salt, p.kdf_key_size, limits)?;
    let mut material = Zeroizing::new(vec![0u8; len]);
    util::read_exact_at(
        r,
        p.area_offset,
        &mut material,
        p.header,
        &format!("{}.area", p.field),
    )?;
    SectorCipher::new(p.cipher, derived.expose())?.decrypt(&mut material, 512, 0);
    let used = p.key_size * p.stripes as usize;
    Ok(af::af_merge(
        &material[..used],
        p.key_size,
        p.stripes,
        p.af_hash,
    )?)
}

/// PBKDF2(hash, key, salt, iterations) == expected, within the KDF limits.
pub(crate) fn digest_matches(
    hash: HashAlg,
    key: &[u8],
    salt: &[u8],
    iterations: u32,
    expected: &[u8],
    limits: &KdfLimits,
) -> Result<bool, Error> {
    let kdf = Kdf::Pbkdf2 { hash, iterations };
    let got = kdf.derive(key, salt, expected.len(), limits)?;
    Ok(util::ct_eq(got.expose(), expected))
}

/// The digest stored for a new volume key.
pub(crate) fn make_digest(
    hash: HashAlg,
    key: &[u8],
    salt: &[u8],
    iterations: u32,
    len: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; len];
    crate::crypto::hash::pbkdf2(hash, key, salt, iterations, &mut out);
    out
}

/// Encrypts AF-split key material (4000 stripes, as both LUKS versions use) for a new keyslot:
/// returns the sector-padded ciphertext.
pub(crate) fn seal_key(
    volume_key: &[u8],
    kdf: &Kdf,
    salt: &[u8],
    passphrase: &[u8],
    cipher: &CipherSpec,
    af_hash: HashAlg,
    limits: &KdfLimits,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let derived = kdf.derive(passphrase, salt, volume_key.len(), limits)?;
    let stripes = STRIPES;
    let split = af::af_split(volume_key, stripes, af_hash)?;
    let len = material_len(volume_key.len(), stripes)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::BadParameters("key material too large".into()))?;
    let mut material = Zeroizing::new(vec![0u8; len]);
    material[..split.len()].copy_from_slice(&split);
    SectorCipher::new(cipher, derived.expose())?.encrypt(&mut material, 512, 0);
    Ok(material)
}
