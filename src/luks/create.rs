//! Writing new containers with the layout cryptsetup 2.6 uses, so cryptsetup and other tools
//! accept them: LUKS1 with 4096-byte aligned keyslot areas and the payload at 2 MiB; LUKS2 with
//! two 16 KiB header copies, a 16 MiB - 32 KiB keyslots area and the data at 16 MiB.

use std::io::Cursor;

use base64::Engine;
use serde_json::json;
use zeroize::Zeroizing;

use super::keyslot;
use super::luks1;
use super::luks2::binary::BinaryHeader;
use super::summary::Summary;
use super::{Error, Header, util};
use crate::crypto;
use crate::crypto::cipher::CipherSpec;
use crate::crypto::hash::HashAlg;
use crate::crypto::kdf::{Argon2Variant, Kdf, KdfLimits};
use crate::secret::SecretBytes;

/// LUKS2 hdr_size of new headers (cryptsetup's default metadata size).
pub const LUKS2_HDR_SIZE: u64 = 16 * 1024;
/// Data offset of new embedded-header LUKS2 containers (cryptsetup 2.6).
pub const LUKS2_DATA_OFFSET: u64 = 16 * 1024 * 1024;
/// Payload offset of new LUKS1 containers, in 512-byte sectors (2 MiB).
pub const LUKS1_PAYLOAD_SECTORS: u32 = 4096;
const SALT_LEN: usize = 32;

/// Parameters of a new container. Defaults = what cryptsetup 2.6 writes.
#[derive(Debug, Clone)]
pub struct NewContainer {
    /// 1 or 2.
    pub version: u8,
    pub cipher: CipherSpec,
    pub key_bytes: usize,
    /// 512..4096; LUKS1 supports 512 only.
    pub sector_size: u32,
    /// Hash of the digest and AF splitter (and of PBKDF2 in LUKS1).
    pub hash: HashAlg,
    pub kdf: Kdf,
    /// LUKS2 only.
    pub label: Option<String>,
    /// Data at offset 0 of its own device; the header goes to a separate file.
    pub detached_header: bool,
    /// Bytes of payload the container will hold (must be a multiple of sector_size).
    pub payload_size: u64,
}

impl NewContainer {
    /// cryptsetup 2.6 defaults: LUKS2, aes-xts-plain64 with a 512-bit key, 4096-byte sectors,
    /// sha256, argon2id (4 iterations, 1 GiB, 4 threads).
    pub fn defaults(payload_size: u64) -> Result<NewContainer, Error> {
        Ok(NewContainer {
            version: 2,
            cipher: CipherSpec::parse("aes-xts-plain64")?,
            key_bytes: 64,
            sector_size: 4096,
            hash: HashAlg::Sha256,
            kdf: Kdf::Argon2 {
                variant: Argon2Variant::Argon2id,
                time: 4,
                memory_kib: 1024 * 1024,
                parallel: 4,
            },
            label: None,
            detached_header: false,
            payload_size,
        })
    }
}

/// A freshly written header.
pub struct Created {
    /// Bytes to write at offset 0 of the image (or of the detached header file). For an
    /// embedded header this covers everything up to `data_offset`.
    pub header: Zeroizing<Vec<u8>>,
    pub volume_key: SecretBytes,
    /// Where the payload starts in the image (0 for a detached header).
    pub data_offset: u64,
    pub header_summary: Summary,
}

fn random_vec(n: usize) -> Result<Vec<u8>, Error> {
    let mut v = vec![0u8; n];
    crypto::random_bytes(&mut v)?;
    Ok(v)
}

/// Digest iterations: cryptsetup benchmarks ~1/8 of the keyslot time; we take an eighth of the
/// keyslot's PBKDF2 count, at least cryptsetup's minimum of 1000.
fn digest_iterations(kdf: &Kdf) -> u32 {
    match kdf {
        Kdf::Pbkdf2 { iterations, .. } => (iterations / 8).max(1000),
        Kdf::Argon2 { .. } => 1000,
    }
}

fn check_params(p: &NewContainer) -> Result<(), Error> {
    if p.version != 1 && p.version != 2 {
        return Err(Error::BadParameters(format!(
            "LUKS version {} (1 or 2)",
            p.version
        )));
    }
    p.cipher.check_key_len(p.key_bytes)?;
    if !(512..=4096).contains(&p.sector_size) || !p.sector_size.is_power_of_two() {
        return Err(Error::BadParameters(format!(
            "sector size {} (a power of two from 512 to 4096)",
            p.sector_size
        )));
    }
    if !p.payload_size.is_multiple_of(u64::from(p.sector_size)) {
        return Err(Error::BadParameters(format!(
            "payload size {} is not a multiple of the sector size {}",
            p.payload_size, p.sector_size
        )));
    }
    if p.version == 1 {
        if p.sector_size != 512 {
            return Err(Error::BadParameters(
                "LUKS1 supports 512-byte sectors only".into(),
            ));
        }
        if p.label.is_some() {
            return Err(Error::BadParameters("LUKS1 has no label".into()));
        }
        match p.kdf {
            Kdf::Pbkdf2 { hash, .. } if hash == p.hash => {}
            _ => {
                return Err(Error::BadParameters(format!(
                    "LUKS1 needs PBKDF2 with the header hash ({})",
                    p.hash.name()
                )));
            }
        }
    }
    Ok(())
}

/// Builds a complete header (binary + keyslot areas) with a fresh random volume key, UUID and
/// salts, and parses it back as a self-check.
pub fn create(
    params: &NewContainer,
    passphrase: &[u8],
    limits: &KdfLimits,
) -> Result<Created, Error> {
    check_params(params)?;
    let volume_key = SecretBytes::new(random_vec(params.key_bytes)?);
    create_with_key(params, volume_key, passphrase, limits)
}

/// Like [`create`], but around an existing volume key (its length must be
/// `params.key_bytes`): `image convert` re-wraps the volume key of the image it reads, so
/// the result is the same encrypted volume under a new header.
pub fn create_with_key(
    params: &NewContainer,
    volume_key: SecretBytes,
    passphrase: &[u8],
    limits: &KdfLimits,
) -> Result<Created, Error> {
    check_params(params)?;
    if volume_key.expose().len() != params.key_bytes {
        return Err(Error::BadParameters(format!(
            "volume key of {} bytes for a {}-byte key size",
            volume_key.expose().len(),
            params.key_bytes
        )));
    }
    let (header, data_offset) = if params.version == 1 {
        create_luks1(params, &volume_key, passphrase, limits)?
    } else {
        create_luks2(params, &volume_key, passphrase, limits)?
    };
    let header_summary = Header::read(&mut Cursor::new(&header[..]), None)?.summary();
    Ok(Created {
        header,
        volume_key,
        data_offset,
        header_summary,
    })
}

fn create_luks1(
    p: &NewContainer,
    vk: &SecretBytes,
    passphrase: &[u8],
    limits: &KdfLimits,
) -> Result<(Zeroizing<Vec<u8>>, u64), Error> {
    let key_bytes = u32::try_from(p.key_bytes)
        .ok()
        .filter(|&k| k <= luks1::MAX_KEY_BYTES)
        .ok_or_else(|| Error::BadParameters(format!("key size {} bytes", p.key_bytes)))?;
    let Kdf::Pbkdf2 { iterations, .. } = p.kdf else {
        return Err(Error::BadParameters("LUKS1 needs PBKDF2".into()));
    };
    // Areas aligned to 4096 bytes (8 sectors), the first after the header's 4 KiB.
    let secs = luks1::material_sectors(key_bytes);
    let stride = util::round_up(secs, 8).unwrap_or(u64::MAX);
    let first = 8u64;
    let areas_end = first + stride * luks1::NUM_KEYSLOTS as u64;
    let payload_offset: u32 = if p.detached_header {
        0
    } else {
        u32::try_from(
            areas_end
                .max(u64::from(LUKS1_PAYLOAD_SECTORS))
                .div_ceil(2048)
                * 2048,
        )
        .map_err(|_| Error::BadParameters("payload offset too large".into()))?
    };
    let header_len = if p.detached_header {
        areas_end * 512
    } else {
        u64::from(payload_offset) * 512
    };
    let mut out = Zeroizing::new(vec![0u8; header_len as usize]);

    let mut salt = [0u8; luks1::SALT_LEN];
    crypto::random_bytes(&mut salt)?;
    let material = keyslot::seal_key(
        vk.expose(),
        &p.kdf,
        &salt,
        passphrase,
        &p.cipher,
        p.hash,
        limits,
    )?;
    let keyslots: [luks1::Keyslot; luks1::NUM_KEYSLOTS] = std::array::from_fn(|i| luks1::Keyslot {
        active: i == 0,
        iterations: if i == 0 { iterations } else { 0 },
        salt: if i == 0 { salt } else { [0u8; luks1::SALT_LEN] },
        key_material_offset: (first + stride * i as u64) as u32,
        stripes: luks1::STRIPES,
    });
    let off0 = (first * 512) as usize;
    out[off0..off0 + material.len()].copy_from_slice(&material);

    let mut digest_salt = [0u8; luks1::SALT_LEN];
    crypto::random_bytes(&mut digest_salt)?;
    let digest_iter = digest_iterations(&p.kdf);
    let digest = keyslot::make_digest(
        p.hash,
        vk.expose(),
        &digest_salt,
        digest_iter,
        luks1::DIGEST_LEN,
    );
    let hdr = luks1::encode(
        &p.cipher,
        p.hash,
        payload_offset,
        key_bytes,
        &digest,
        &digest_salt,
        digest_iter,
        &util::new_uuid()?,
        &keyslots,
    )?;
    out[..hdr.len()].copy_from_slice(&hdr);
    Ok((out, u64::from(payload_offset) * 512))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn create_luks2(
    p: &NewContainer,
    vk: &SecretBytes,
    passphrase: &[u8],
    limits: &KdfLimits,
) -> Result<(Zeroizing<Vec<u8>>, u64), Error> {
    let hdr_size = LUKS2_HDR_SIZE;
    let keyslots_size = LUKS2_DATA_OFFSET - 2 * hdr_size;
    let data_offset = if p.detached_header {
        0
    } else {
        LUKS2_DATA_OFFSET
    };
    let area_offset = 2 * hdr_size;
    let material_len = keyslot::material_len(p.key_bytes, json::STRIPES)
        .ok_or_else(|| Error::BadParameters("key too large".into()))?;
    let area_size = util::round_up(material_len, 4096).unwrap_or(u64::MAX);
    if area_size > keyslots_size {
        return Err(Error::BadParameters(format!(
            "key size {} bytes",
            p.key_bytes
        )));
    }

    let salt = random_vec(SALT_LEN)?;
    let material = keyslot::seal_key(
        vk.expose(),
        &p.kdf,
        &salt,
        passphrase,
        &p.cipher,
        p.hash,
        limits,
    )?;
    let kdf_json = match &p.kdf {
        Kdf::Pbkdf2 { hash, iterations } => json!({
            "type": "pbkdf2", "hash": hash.name(), "iterations": iterations, "salt": b64(&salt),
        }),
        Kdf::Argon2 {
            variant,
            time,
            memory_kib,
            parallel,
        } => json!({
            "type": match variant { Argon2Variant::Argon2i => "argon2i", Argon2Variant::Argon2id => "argon2id" },
            "time": time, "memory": memory_kib, "cpus": parallel, "salt": b64(&salt),
        }),
    };
    let digest_salt = random_vec(SALT_LEN)?;
    let digest_iter = digest_iterations(&p.kdf);
    let digest = keyslot::make_digest(
        p.hash,
        vk.expose(),
        &digest_salt,
        digest_iter,
        p.hash.output_len(),
    );
    let cipher = p.cipher.to_string();
    let metadata = json!({
        "keyslots": { "0": {
            "type": "luks2",
            "key_size": p.key_bytes,
            "af": { "type": "luks1", "stripes": json::STRIPES, "hash": p.hash.name() },
            "area": { "type": "raw", "offset": area_offset.to_string(), "size": area_size.to_string(),
                      "encryption": cipher, "key_size": p.key_bytes },
            "kdf": kdf_json,
        }},
        "tokens": {},
        "segments": { "0": {
            "type": "crypt", "offset": data_offset.to_string(), "size": "dynamic",
            "iv_tweak": "0", "encryption": cipher, "sector_size": p.sector_size,
        }},
        "digests": { "0": {
            "type": "pbkdf2", "keyslots": ["0"], "segments": ["0"], "hash": p.hash.name(),
            "iterations": digest_iter, "salt": b64(&digest_salt), "digest": b64(&digest),
        }},
        "config": { "json_size": (hdr_size - 4096).to_string(), "keyslots_size": keyslots_size.to_string() },
    });
    let text = serde_json::to_vec(&metadata)
        .map_err(|e| Error::BadParameters(format!("JSON encoding: {e}")))?;
    let json_len = (hdr_size - 4096) as usize;
    if text.len() >= json_len {
        return Err(Error::BadParameters(
            "metadata does not fit in the JSON area".into(),
        ));
    }
    let mut json_area = vec![0u8; json_len];
    json_area[..text.len()].copy_from_slice(&text);

    let uuid = util::new_uuid()?;
    let label = p.label.clone().unwrap_or_default();
    let mut out = Zeroizing::new(vec![0u8; (2 * hdr_size + keyslots_size) as usize]);
    for primary in [true, false] {
        let mut salt64 = [0u8; 64];
        crypto::random_bytes(&mut salt64)?;
        let bin = BinaryHeader {
            primary,
            hdr_size,
            seqid: 1,
            label: label.clone(),
            csum_alg: "sha256".into(),
            salt: salt64,
            uuid: uuid.clone(),
            subsystem: String::new(),
            hdr_offset: if primary { 0 } else { hdr_size },
            csum: [0u8; 64],
        };
        let bytes = bin.encode(&json_area)?;
        let at = bin.hdr_offset as usize;
        out[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    let at = area_offset as usize;
    out[at..at + material.len()].copy_from_slice(&material);
    Ok((out, data_offset))
}

use super::luks2::json;
