//! LUKS1: the 592-byte header (LUKS1 spec 1.2.3), validated the way cryptsetup does, and
//! keyslot unlock. The old v1.0 layout (key material at sector 2, areas not aligned) is the
//! same binary format and passes the same checks.

use std::io::{Read, Seek};

use super::keyslot::{self, SlotParams};
use super::summary::{KdfSummary, KeyslotSummary, SegmentSummary, Summary};
use super::{Error, LUKS_MAGIC, util};
use crate::crypto::cipher::CipherSpec;
use crate::crypto::hash::HashAlg;
use crate::crypto::kdf::{Kdf, KdfLimits};
use crate::secret::SecretBytes;

const H: &str = "LUKS1";
pub const HEADER_LEN: usize = 592;
pub const NUM_KEYSLOTS: usize = 8;
pub const STRIPES: u32 = 4000;
pub const DIGEST_LEN: usize = 20;
pub const SALT_LEN: usize = 32;
pub const KEY_ENABLED: u32 = 0x00AC_71F3;
pub const KEY_DISABLED: u32 = 0x0000_DEAD;
/// Larger than any cipher's key; bounds key material (bytes × 4000) before anything is read.
pub const MAX_KEY_BYTES: u32 = 512;

const OFF_CIPHER_NAME: usize = 8;
const OFF_CIPHER_MODE: usize = 40;
const OFF_HASH: usize = 72;
const OFF_PAYLOAD: usize = 104;
const OFF_KEY_BYTES: usize = 108;
const OFF_DIGEST: usize = 112;
const OFF_DIGEST_SALT: usize = 132;
const OFF_DIGEST_ITER: usize = 164;
const OFF_UUID: usize = 168;
const OFF_KEYSLOTS: usize = 208;
const KEYSLOT_LEN: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyslot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// In 512-byte sectors.
    pub key_material_offset: u32,
    pub stripes: u32,
}

#[derive(Debug, Clone)]
pub struct Header {
    /// The 592 bytes as read, for copying the header unchanged.
    pub raw: Vec<u8>,
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    pub hash: HashAlg,
    /// The data and keyslot cipher, when the userspace engine can run it. `None` (serpent,
    /// twofish...) still reads and inspects: only unlocking needs the cipher, and it says so.
    pub cipher: Option<CipherSpec>,
    /// In 512-byte sectors; 0 = detached header.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_digest_salt: [u8; SALT_LEN],
    pub mk_digest_iterations: u32,
    pub uuid: String,
    pub keyslots: [Keyslot; NUM_KEYSLOTS],
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Sectors of AF-split material for a key of `key_bytes` (cryptsetup's AF_split_sectors).
pub fn material_sectors(key_bytes: u32) -> u64 {
    (u64::from(key_bytes) * u64::from(STRIPES)).div_ceil(512)
}

impl Header {
    /// Reads and validates the header at offset 0 of `r`.
    pub fn read(r: &mut (impl Read + Seek), device_size: Option<u64>) -> Result<Header, Error> {
        let mut raw = vec![0u8; HEADER_LEN];
        let got = util::read_at_most(r, 0, &mut raw)?;
        if got < 6 || raw[..6] != LUKS_MAGIC {
            return Err(Error::NotLuks);
        }
        if got < HEADER_LEN {
            return Err(Error::invalid(
                H,
                "header",
                format!("truncated: {got} of {HEADER_LEN} bytes"),
            ));
        }
        let stream_len = util::stream_len(r)?;
        Self::parse(raw, device_size, stream_len)
    }

    /// Validates a 592-byte header. `device_size` is the size of the device holding the data
    /// (None for a detached header); `stream_len` the size of the file holding the header.
    pub fn parse(raw: Vec<u8>, device_size: Option<u64>, stream_len: u64) -> Result<Header, Error> {
        if raw.len() < HEADER_LEN || raw[..6] != LUKS_MAGIC {
            return Err(Error::NotLuks);
        }
        let version = u16::from_be_bytes([raw[6], raw[7]]);
        if version != 1 {
            return Err(Error::invalid(H, "version", format!("{version} is not 1")));
        }
        let cipher_name = util::c_string(&raw[OFF_CIPHER_NAME..OFF_CIPHER_MODE], H, "cipher_name")?;
        let cipher_mode = util::c_string(&raw[OFF_CIPHER_MODE..OFF_HASH], H, "cipher_mode")?;
        let hash_spec = util::c_string(&raw[OFF_HASH..OFF_PAYLOAD], H, "hash_spec")?;
        let uuid = util::c_string(&raw[OFF_UUID..OFF_KEYSLOTS], H, "uuid")?;
        let hash = HashAlg::from_name(&hash_spec)
            .map_err(|e| Error::invalid(H, "hash_spec", e.to_string()))?;
        if hash.output_len() < DIGEST_LEN {
            return Err(Error::invalid(
                H,
                "hash_spec",
                format!("{hash_spec} digests are shorter than {DIGEST_LEN} bytes"),
            ));
        }
        if cipher_name.is_empty() || cipher_mode.is_empty() {
            return Err(Error::invalid(
                H,
                "cipher_name",
                "empty cipher name or mode",
            ));
        }
        if uuid.is_empty() || !uuid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(Error::invalid(
                H,
                "uuid",
                format!("{uuid:?} is not a UUID (hex digits and dashes)"),
            ));
        }
        let payload_offset = be32(&raw, OFF_PAYLOAD);
        let key_bytes = be32(&raw, OFF_KEY_BYTES);
        if key_bytes == 0 || key_bytes > MAX_KEY_BYTES {
            return Err(Error::invalid(
                H,
                "key_bytes",
                format!("{key_bytes} is not between 1 and {MAX_KEY_BYTES}"),
            ));
        }
        let cipher = CipherSpec::from_luks1(&cipher_name, &cipher_mode).ok();
        if let Some(c) = &cipher {
            c.check_key_len(key_bytes as usize)
                .map_err(|e| Error::invalid(H, "key_bytes", e.to_string()))?;
        }
        let mk_digest_iterations = be32(&raw, OFF_DIGEST_ITER);
        if mk_digest_iterations == 0 {
            return Err(Error::invalid(H, "mk_digest_iterations", "is 0"));
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&raw[OFF_DIGEST..OFF_DIGEST + DIGEST_LEN]);
        let mut mk_digest_salt = [0u8; SALT_LEN];
        mk_digest_salt.copy_from_slice(&raw[OFF_DIGEST_SALT..OFF_DIGEST_SALT + SALT_LEN]);

        let keyslots: [Keyslot; NUM_KEYSLOTS] = std::array::from_fn(|i| {
            let b = &raw[OFF_KEYSLOTS + i * KEYSLOT_LEN..OFF_KEYSLOTS + (i + 1) * KEYSLOT_LEN];
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&b[8..40]);
            Keyslot {
                active: be32(b, 0) == KEY_ENABLED,
                iterations: be32(b, 4),
                salt,
                key_material_offset: be32(b, 40),
                stripes: be32(b, 44),
            }
        });
        for i in 0..NUM_KEYSLOTS {
            let b = &raw[OFF_KEYSLOTS + i * KEYSLOT_LEN..];
            let state = be32(b, 0);
            if state != KEY_ENABLED && state != KEY_DISABLED {
                return Err(Error::invalid(
                    H,
                    format!("key_slot_{i}.active"),
                    format!(
                        "0x{state:08x} is neither enabled (0x{KEY_ENABLED:08x}) nor disabled (0x{KEY_DISABLED:08x})"
                    ),
                ));
            }
        }
        let header = Header {
            raw,
            cipher_name,
            cipher_mode,
            hash_spec,
            hash,
            cipher,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iterations,
            uuid,
            keyslots,
        };
        header.check_keyslots()?;
        header.check_device_size(device_size, stream_len)?;
        Ok(header)
    }

    /// cryptsetup's LUKS_check_keyslots: stripes, overlap with the header, the payload and
    /// each other — for all eight slots, active or not.
    fn check_keyslots(&self) -> Result<(), Error> {
        let secs = material_sectors(self.key_bytes);
        for (i, ks) in self.keyslots.iter().enumerate() {
            let f = format!("key_slot_{i}");
            if ks.stripes != STRIPES {
                return Err(Error::invalid(
                    H,
                    format!("{f}.stripes"),
                    format!("{} is not {STRIPES}", ks.stripes),
                ));
            }
            if u64::from(ks.key_material_offset) * 512 < HEADER_LEN as u64 {
                return Err(Error::invalid(
                    H,
                    format!("{f}.key_material_offset"),
                    format!(
                        "sector {} overlaps the {HEADER_LEN}-byte header",
                        ks.key_material_offset
                    ),
                ));
            }
            if ks.active && ks.iterations == 0 {
                return Err(Error::invalid(H, format!("{f}.iterations"), "is 0"));
            }
            if self.payload_offset != 0
                && u64::from(ks.key_material_offset) + secs > u64::from(self.payload_offset)
            {
                return Err(Error::invalid(
                    H,
                    format!("{f}.key_material_offset"),
                    format!(
                        "key material (sectors {}..{}) overlaps the payload at sector {}",
                        ks.key_material_offset,
                        u64::from(ks.key_material_offset) + secs,
                        self.payload_offset
                    ),
                ));
            }
        }
        let mut order: Vec<usize> = (0..NUM_KEYSLOTS).collect();
        order.sort_by_key(|&i| self.keyslots[i].key_material_offset);
        for w in order.windows(2) {
            let (a, b) = (&self.keyslots[w[0]], &self.keyslots[w[1]]);
            if u64::from(b.key_material_offset) < u64::from(a.key_material_offset) + secs {
                return Err(Error::invalid(
                    H,
                    format!("key_slot_{}.key_material_offset", w[1]),
                    format!(
                        "key material at sector {} overlaps key_slot_{} (sectors {}..{})",
                        b.key_material_offset,
                        w[0],
                        a.key_material_offset,
                        u64::from(a.key_material_offset) + secs
                    ),
                ));
            }
        }
        Ok(())
    }

    /// End of the last keyslot area in bytes.
    pub fn keyslots_end(&self) -> u64 {
        let secs = material_sectors(self.key_bytes);
        self.keyslots
            .iter()
            .map(|k| (u64::from(k.key_material_offset) + secs) * 512)
            .max()
            .unwrap_or(0)
    }

    fn check_device_size(&self, device_size: Option<u64>, stream_len: u64) -> Result<(), Error> {
        let payload = u64::from(self.payload_offset) * 512;
        if let Some(dev) = device_size {
            if self.payload_offset == 0 {
                return Err(Error::invalid(
                    H,
                    "payload_offset",
                    "0 (detached-header layout) but the header is on the data device",
                ));
            }
            if payload > dev {
                return Err(Error::invalid(
                    H,
                    "payload_offset",
                    format!("payload at byte {payload} is beyond the device end ({dev} bytes)"),
                ));
            }
        }
        let end = self.keyslots_end();
        let limit = device_size.unwrap_or(stream_len).min(stream_len);
        if end > limit {
            return Err(Error::invalid(
                H,
                "key_material_offset",
                format!(
                    "keyslot areas end at byte {end}, beyond the end of the header ({limit} bytes)"
                ),
            ));
        }
        Ok(())
    }

    /// `cipher_name-cipher_mode` as the header spells it.
    pub fn cipher_text(&self) -> String {
        format!("{}-{}", self.cipher_name, self.cipher_mode)
    }

    /// The cipher, or an error naming it when the userspace engine cannot run it.
    pub fn cipher_spec(&self) -> Result<&CipherSpec, Error> {
        self.cipher
            .as_ref()
            .ok_or_else(|| crate::crypto::Error::UnsupportedCipher(self.cipher_text()).into())
    }

    fn slot_params(&self, i: usize) -> Result<SlotParams<'_>, Error> {
        let ks = &self.keyslots[i];
        Ok(SlotParams {
            header: H,
            field: format!("key_slot_{i}"),
            kdf: Kdf::Pbkdf2 {
                hash: self.hash,
                iterations: ks.iterations,
            },
            salt: &ks.salt,
            kdf_key_size: self.key_bytes as usize,
            key_size: self.key_bytes as usize,
            stripes: ks.stripes,
            af_hash: self.hash,
            cipher: self.cipher_spec()?,
            area_offset: u64::from(ks.key_material_offset) * 512,
            area_len: material_sectors(self.key_bytes) * 512,
        })
    }

    pub fn unlock(
        &self,
        r: &mut (impl Read + Seek),
        passphrase: &[u8],
        slot: Option<u32>,
        limits: &KdfLimits,
    ) -> Result<(u32, SecretBytes), Error> {
        let slots: Vec<usize> = match slot {
            Some(s) => {
                let i = usize::try_from(s)
                    .ok()
                    .filter(|&i| i < NUM_KEYSLOTS)
                    .ok_or_else(|| Error::Keyslot {
                        slot: s,
                        reason: format!("LUKS1 has keyslots 0..{}", NUM_KEYSLOTS - 1),
                    })?;
                if !self.keyslots[i].active {
                    return Err(Error::Keyslot {
                        slot: s,
                        reason: "is not active".into(),
                    });
                }
                vec![i]
            }
            None => (0..NUM_KEYSLOTS)
                .filter(|&i| self.keyslots[i].active)
                .collect(),
        };
        let mut limit_error = None;
        for i in slots {
            let key = match keyslot::candidate_key(r, &self.slot_params(i)?, passphrase, limits) {
                Ok(k) => k,
                Err(Error::Crypto(e)) if e.kind() == crate::kind::Kind::OutOfMemory => {
                    limit_error = Some(Error::Crypto(e));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if keyslot::digest_matches(
                self.hash,
                key.expose(),
                &self.mk_digest_salt,
                self.mk_digest_iterations,
                &self.mk_digest,
                limits,
            )? {
                return Ok((i as u32, key));
            }
        }
        Err(limit_error.unwrap_or(Error::NoKey))
    }

    pub fn summary(&self) -> Summary {
        let secs = material_sectors(self.key_bytes);
        let keyslots = self
            .keyslots
            .iter()
            .enumerate()
            .map(|(i, k)| KeyslotSummary {
                id: i as u32,
                state: if k.active { "ENABLED" } else { "DISABLED" }.into(),
                kind: None,
                priority: None,
                key_bits: self.key_bytes as usize * 8,
                kdf: k.active.then(|| KdfSummary {
                    kind: "pbkdf2".into(),
                    hash: Some(self.hash_spec.clone()),
                    iterations: Some(k.iterations),
                    time: None,
                    memory_kib: None,
                    parallel: None,
                }),
                af_stripes: Some(k.stripes),
                af_hash: Some(self.hash_spec.clone()),
                area_offset: u64::from(k.key_material_offset) * 512,
                area_size: secs * 512,
                area_encryption: Some(self.cipher_text()),
                digest: None,
                bound: k.active,
                usable: k.active,
                note: None,
            })
            .collect();
        Summary {
            version: 1,
            uuid: self.uuid.clone(),
            label: None,
            subsystem: None,
            cipher: Some(self.cipher_text()),
            hash: Some(self.hash_spec.clone()),
            volume_key_bits: self.key_bytes as usize * 8,
            sector_size: Some(512),
            data_offset: Some(u64::from(self.payload_offset) * 512),
            data_size: None,
            iv_tweak: Some(0),
            no_data_segment: None,
            hdr_size: None,
            seqid: None,
            checksum_alg: None,
            header_copy: None,
            keyslots_size: None,
            mk_digest_iterations: Some(self.mk_digest_iterations),
            keyslots,
            digests: Vec::new(),
            segments: vec![SegmentSummary {
                id: 0,
                kind: "crypt".into(),
                offset: u64::from(self.payload_offset) * 512,
                size: None,
                encryption: Some(self.cipher_text()),
                sector_size: Some(512),
                iv_tweak: Some(0),
                flags: Vec::new(),
            }],
            tokens: Vec::new(),
            requirements: Vec::new(),
            flags: Vec::new(),
        }
    }
}

/// Serialises a new LUKS1 header (the 592 bytes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode(
    cipher: &CipherSpec,
    hash: HashAlg,
    payload_offset: u32,
    key_bytes: u32,
    mk_digest: &[u8],
    mk_digest_salt: &[u8; SALT_LEN],
    mk_digest_iterations: u32,
    uuid: &str,
    keyslots: &[Keyslot; NUM_KEYSLOTS],
) -> Result<Vec<u8>, Error> {
    let mut b = vec![0u8; HEADER_LEN];
    b[..6].copy_from_slice(&LUKS_MAGIC);
    b[6..8].copy_from_slice(&1u16.to_be_bytes());
    let (name, mode) = cipher.luks1_names();
    util::put_c_string(
        &mut b[OFF_CIPHER_NAME..OFF_CIPHER_MODE],
        &name,
        "cipher name",
    )?;
    util::put_c_string(&mut b[OFF_CIPHER_MODE..OFF_HASH], &mode, "cipher mode")?;
    util::put_c_string(&mut b[OFF_HASH..OFF_PAYLOAD], hash.name(), "hash")?;
    b[OFF_PAYLOAD..OFF_PAYLOAD + 4].copy_from_slice(&payload_offset.to_be_bytes());
    b[OFF_KEY_BYTES..OFF_KEY_BYTES + 4].copy_from_slice(&key_bytes.to_be_bytes());
    b[OFF_DIGEST..OFF_DIGEST + DIGEST_LEN].copy_from_slice(&mk_digest[..DIGEST_LEN]);
    b[OFF_DIGEST_SALT..OFF_DIGEST_SALT + SALT_LEN].copy_from_slice(mk_digest_salt);
    b[OFF_DIGEST_ITER..OFF_DIGEST_ITER + 4].copy_from_slice(&mk_digest_iterations.to_be_bytes());
    util::put_c_string(&mut b[OFF_UUID..OFF_KEYSLOTS], uuid, "uuid")?;
    for (i, ks) in keyslots.iter().enumerate() {
        let o = OFF_KEYSLOTS + i * KEYSLOT_LEN;
        let state = if ks.active { KEY_ENABLED } else { KEY_DISABLED };
        b[o..o + 4].copy_from_slice(&state.to_be_bytes());
        b[o + 4..o + 8].copy_from_slice(&ks.iterations.to_be_bytes());
        b[o + 8..o + 40].copy_from_slice(&ks.salt);
        b[o + 40..o + 44].copy_from_slice(&ks.key_material_offset.to_be_bytes());
        b[o + 44..o + 48].copy_from_slice(&ks.stripes.to_be_bytes());
    }
    Ok(b)
}
