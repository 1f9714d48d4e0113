//! LUKS2: two binary header copies (each with its JSON area and checksum), strict JSON
//! validation, keyslot priorities, unbound keyslots, tokens kept intact, requirements.
//!
//! Reading never writes: when one copy is damaged or older, the other is simply used.

pub mod binary;
pub mod json;

use std::io::{Read, Seek};

use super::keyslot::{self, SlotParams};
use super::summary::{
    DigestSummary, KdfSummary, KeyslotSummary, SegmentSummary, Summary, TokenSummary,
};
use super::{Error, util};
use crate::crypto::cipher::CipherSpec;
use crate::crypto::hash::HashAlg;
use crate::crypto::kdf::{Argon2Variant, Kdf, KdfLimits};
use crate::secret::SecretBytes;
use binary::{BINARY_LEN, BinaryHeader, HDR_SIZES};
use json::{CryptParams, KdfDesc, Metadata, Segment};

const H: &str = "LUKS2";

#[derive(Debug, Clone)]
pub struct Header {
    /// The binary header of the copy in use.
    pub binary: BinaryHeader,
    /// hdr_size bytes (binary + JSON area) of the copy in use, unchanged.
    pub raw: Vec<u8>,
    pub meta: Metadata,
    /// Cipher of the data segment, when the userspace engine can run it (`None`: serpent,
    /// twofish... — the header still reads and inspects; see [`Header::data_cipher_spec`]).
    pub data_cipher: Option<CipherSpec>,
    /// The data segment, or why the header (valid as it is) has none volcrypt can use.
    data: Result<DataSegment, String>,
    /// Size of the device the header was read from (None: a detached header file).
    device_size: Option<u64>,
}

/// The segment holding the data and what opening it needs.
#[derive(Debug, Clone)]
struct DataSegment {
    id: u32,
    /// Copies of the segment and its crypt parameters (taken from `meta`).
    entry: Segment,
    crypt: CryptParams,
    volume_key_len: usize,
}

/// One copy, read and fully validated.
fn load_copy(
    r: &mut (impl Read + Seek),
    offset: u64,
    primary: bool,
) -> Result<(BinaryHeader, Vec<u8>, Metadata), Error> {
    let mut bin = vec![0u8; BINARY_LEN];
    let got = util::read_at_most(r, offset, &mut bin)?;
    if got < BINARY_LEN {
        return if got >= 6
            && bin[..6]
                == if primary {
                    super::LUKS_MAGIC
                } else {
                    binary::SECONDARY_MAGIC
                }
        {
            Err(Error::invalid(
                H,
                "header",
                format!(
                    "{}: truncated binary header",
                    binary::copy_name(primary, offset)
                ),
            ))
        } else {
            Err(Error::NotLuks)
        };
    }
    let b = BinaryHeader::parse(&bin, offset, primary)?;
    // hdr_size was validated (≤ 4 MiB) before this allocation.
    let json_len = usize::try_from(b.hdr_size)
        .map_err(|_| Error::invalid(H, "hdr_size", "too large"))?
        - BINARY_LEN;
    let mut area = vec![0u8; json_len];
    util::read_exact_at(
        r,
        offset + BINARY_LEN as u64,
        &mut area,
        H,
        &format!("JSON area ({})", binary::copy_name(primary, offset)),
    )?;
    binary::verify_checksum(&b, &bin, &area)?;
    let end = area.iter().position(|&c| c == 0).ok_or_else(|| {
        Error::invalid(
            H,
            "JSON area",
            "not NUL-terminated (the JSON fills the whole area)",
        )
    })?;
    if area[end..].iter().any(|&c| c != 0) {
        return Err(Error::invalid(
            H,
            "JSON area",
            "non-NUL bytes after the JSON text",
        ));
    }
    if area.first() != Some(&b'{') {
        return Err(Error::invalid(H, "JSON area", "does not start with '{'"));
    }
    let value: serde_json::Value = serde_json::from_slice(&area[..end])
        .map_err(|e| Error::invalid(H, "JSON area", format!("not valid JSON: {e}")))?;
    let meta = Metadata::from_json(value, b.hdr_size)?;
    bin.extend_from_slice(&area);
    Ok((b, bin, meta))
}

/// The primary copy's error, mentioning the secondary's when it differs.
fn annotate(e: Error, other: &Error) -> Error {
    if e.to_string() == other.to_string() {
        return e;
    }
    match e {
        Error::Invalid {
            header,
            field,
            reason,
        } => Error::Invalid {
            header,
            field,
            reason: format!("{reason} (the other copy is unusable too: {other})"),
        },
        e => e,
    }
}

impl Header {
    /// Reads both copies, validates each, and uses the valid one with the higher seqid.
    pub fn read(r: &mut (impl Read + Seek), device_size: Option<u64>) -> Result<Header, Error> {
        let primary = load_copy(r, 0, true);
        let primary_hdr_size = {
            let mut bin = [0u8; BINARY_LEN];
            let got = util::read_at_most(r, 0, &mut bin)?;
            if got == BINARY_LEN {
                BinaryHeader::parse(&bin, 0, true).ok().map(|b| b.hdr_size)
            } else {
                None
            }
        };
        let secondary = match primary_hdr_size {
            Some(sz) => load_copy(r, sz, false),
            None => {
                let mut found = Err(Error::NotLuks);
                for off in HDR_SIZES {
                    found = load_copy(r, off, false);
                    if !matches!(found, Err(Error::NotLuks)) {
                        break;
                    }
                }
                found
            }
        };
        let chosen = match (primary, secondary) {
            (Ok(p), Ok(s)) => {
                if s.0.seqid > p.0.seqid {
                    s
                } else {
                    p
                }
            }
            (Ok(p), Err(_)) => p,
            (Err(_), Ok(s)) => s,
            (Err(Error::NotLuks), Err(e)) => return Err(e),
            (Err(e), Err(Error::NotLuks)) => return Err(e),
            (Err(e), Err(other)) => return Err(annotate(e, &other)),
        };
        Self::from_parts(chosen.0, chosen.1, chosen.2, device_size)
    }

    fn from_parts(
        binary: BinaryHeader,
        raw: Vec<u8>,
        meta: Metadata,
        device_size: Option<u64>,
    ) -> Result<Header, Error> {
        let data = find_data_segment(&meta);
        let data_cipher = data
            .as_ref()
            .ok()
            .and_then(|d| CipherSpec::parse(&d.crypt.encryption).ok());
        Ok(Header {
            binary,
            raw,
            meta,
            data_cipher,
            data,
            device_size,
        })
    }

    /// The data segment, or an error saying why the header has none volcrypt can open.
    fn data(&self) -> Result<&DataSegment, Error> {
        self.data
            .as_ref()
            .map_err(|reason| Error::UnsupportedFeature(format!("LUKS2 header: {reason}")))
    }

    /// Checks that need the data device: the data must not overlap the header and keyslots
    /// and must end inside the device. cryptsetup reads such headers (luksDump) and refuses
    /// to activate them; so does volcrypt.
    fn check_data_placement(&self, d: &DataSegment) -> Result<(), Error> {
        let Some(dev) = self.device_size else {
            return Ok(());
        };
        let field = format!("segments.{}.offset", d.id);
        let seg = &d.entry;
        if seg.offset == 0 {
            return Err(Error::invalid(
                H,
                field,
                "0 (detached-header layout) but the header is on the data device",
            ));
        }
        let metadata_end = 2 * self.binary.hdr_size + self.meta.config.keyslots_size;
        if seg.offset < metadata_end {
            return Err(Error::invalid(
                H,
                field,
                format!(
                    "data at byte {} overlaps the header and keyslots area (ends at {metadata_end})",
                    seg.offset
                ),
            ));
        }
        let end = seg.offset.saturating_add(seg.size.unwrap_or(0));
        if end > dev {
            return Err(Error::invalid(
                H,
                field,
                format!(
                    "data (bytes {}..{end}) extends beyond the device end ({dev} bytes)",
                    seg.offset
                ),
            ));
        }
        Ok(())
    }

    /// Size of the volume key in bytes: the key size of the data segment's keyslots (0 when
    /// the header has no data segment volcrypt can use).
    pub fn volume_key_len(&self) -> usize {
        self.data.as_ref().map_or(0, |d| d.volume_key_len)
    }

    /// The data segment's cipher, or an error naming it when the userspace engine cannot run it.
    pub fn data_cipher_spec(&self) -> Result<&CipherSpec, Error> {
        let d = self.data()?;
        self.data_cipher.as_ref().ok_or_else(|| {
            crate::crypto::Error::UnsupportedCipher(d.crypt.encryption.clone()).into()
        })
    }

    /// The segment holding the data (the first crypt segment that is not a backup), if any.
    pub fn data_segment_entry(&self) -> Option<&Segment> {
        self.data.as_ref().ok().map(|d| &d.entry)
    }

    /// The data segment's crypt parameters, if there is a data segment.
    pub fn data_segment(&self) -> Option<&CryptParams> {
        self.data.as_ref().ok().map(|d| &d.crypt)
    }

    /// Whether the data may be opened (decrypted, activated, written): a data segment volcrypt
    /// understands, no unknown requirement, no dm-integrity, a sector size the engine and
    /// dm-crypt take, and (on a data device) data placed after the metadata and inside the
    /// device. Each refusal names its reason; the header itself stays valid for inspect.
    pub fn check_activation_allowed(&self) -> Result<(), Error> {
        if let Some(req) = self.meta.config.requirements.first() {
            return Err(Error::UnsupportedRequirement(req.clone()));
        }
        let d = self.data()?;
        if d.crypt.integrity {
            return Err(Error::UnsupportedFeature(format!(
                "LUKS2 header: segments.{}.integrity (authenticated encryption with dm-integrity)",
                d.id
            )));
        }
        let ss = d.crypt.sector_size;
        if !(ss.is_power_of_two() && (512..=4096).contains(&ss)) {
            return Err(Error::UnsupportedFeature(format!(
                "LUKS2 header: segments.{}.sector_size {ss} (dm-crypt and volcrypt take 512, 1024, 2048 or 4096)",
                d.id
            )));
        }
        self.check_data_placement(d)
    }

    /// Whether a keyslot's digest covers the data segment.
    fn is_bound(&self, slot: u32) -> bool {
        self.meta.digest_of_keyslot(slot).is_some_and(|(_, d)| {
            self.data
                .as_ref()
                .is_ok_and(|data| d.segments.contains(&data.id))
        })
    }

    /// Why a keyslot cannot unlock the data, or None when it can.
    fn unusable_reason(&self, slot: u32) -> Option<String> {
        let ks = self.meta.keyslots.get(&slot)?;
        if ks.kind != "luks2" {
            return Some(format!(
                "keyslot type {:?} cannot unlock the volume key",
                ks.kind
            ));
        }
        if let Some(KdfDesc::Unknown(t)) = &ks.kdf {
            return Some(format!("unsupported KDF type {t:?}"));
        }
        if let Some(p) = &ks.problem {
            return Some(p.clone());
        }
        if let Some((_, d)) = self.meta.digest_of_keyslot(slot)
            && let Some(p) = &d.problem
        {
            return Some(p.clone());
        }
        if !self.is_bound(slot) {
            return Some("is unbound (its key is not the volume key of the data segment); it is never used to unlock data".into());
        }
        None
    }

    fn kdf_of<'a>(ks: &'a json::Keyslot, field: &str) -> Result<(Kdf, &'a [u8]), Error> {
        match &ks.kdf {
            Some(KdfDesc::Pbkdf2 {
                hash,
                iterations,
                salt,
            }) => {
                let hash = HashAlg::from_name(hash)
                    .map_err(|e| Error::invalid(H, format!("{field}.kdf.hash"), e.to_string()))?;
                Ok((
                    Kdf::Pbkdf2 {
                        hash,
                        iterations: *iterations,
                    },
                    salt,
                ))
            }
            Some(KdfDesc::Argon2 {
                id,
                time,
                memory,
                cpus,
                salt,
            }) => Ok((
                Kdf::Argon2 {
                    variant: if *id {
                        Argon2Variant::Argon2id
                    } else {
                        Argon2Variant::Argon2i
                    },
                    time: *time,
                    memory_kib: *memory,
                    parallel: *cpus,
                },
                salt,
            )),
            _ => Err(Error::invalid(H, format!("{field}.kdf"), "unsupported KDF")),
        }
    }

    fn try_slot(
        &self,
        r: &mut (impl Read + Seek),
        slot: u32,
        passphrase: &[u8],
        limits: &KdfLimits,
    ) -> Result<Option<SecretBytes>, Error> {
        let field = format!("keyslots.{slot}");
        let ks = self
            .meta
            .keyslots
            .get(&slot)
            .ok_or_else(|| Error::Keyslot {
                slot,
                reason: "is not active".into(),
            })?;
        let (kdf, salt) = Self::kdf_of(ks, &field)?;
        let encryption = ks.area.encryption.as_deref().unwrap_or_default();
        let cipher = CipherSpec::parse(encryption)?;
        let af_hash = HashAlg::from_name(&ks.af_hash)
            .map_err(|e| Error::invalid(H, format!("{field}.af.hash"), e.to_string()))?;
        let params = SlotParams {
            header: H,
            field: field.clone(),
            kdf,
            salt,
            kdf_key_size: ks.area.key_size.unwrap_or(ks.key_size) as usize,
            key_size: ks.key_size as usize,
            stripes: ks.af_stripes,
            af_hash,
            cipher: &cipher,
            area_offset: ks.area.offset,
            area_len: ks.area.size,
        };
        let key = keyslot::candidate_key(r, &params, passphrase, limits)?;
        let Some((did, digest)) = self.meta.digest_of_keyslot(slot) else {
            return Ok(None);
        };
        let dhash = HashAlg::from_name(&digest.hash)
            .map_err(|e| Error::invalid(H, format!("digests.{did}.hash"), e.to_string()))?;
        let ok = keyslot::digest_matches(
            dhash,
            key.expose(),
            &digest.salt,
            digest.iterations,
            &digest.digest,
            limits,
        )?;
        Ok(ok.then_some(key))
    }

    pub fn unlock(
        &self,
        r: &mut (impl Read + Seek),
        passphrase: &[u8],
        slot: Option<u32>,
        limits: &KdfLimits,
    ) -> Result<(u32, SecretBytes), Error> {
        let order: Vec<u32> = match slot {
            Some(s) => {
                if !self.meta.keyslots.contains_key(&s) {
                    return Err(Error::Keyslot {
                        slot: s,
                        reason: "is not active".into(),
                    });
                }
                if let Some(reason) = self.unusable_reason(s) {
                    return Err(Error::Keyslot { slot: s, reason });
                }
                vec![s]
            }
            None => {
                // Without a data segment there is no volume key to unlock.
                self.data()?;
                let mut v: Vec<(u8, u32)> = self
                    .meta
                    .keyslots
                    .iter()
                    .filter(|(id, ks)| ks.priority != 0 && self.unusable_reason(**id).is_none())
                    .map(|(id, ks)| (ks.priority, *id))
                    .collect();
                // High priority (2) first, then normal; by id within a priority.
                v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                let order: Vec<u32> = v.into_iter().map(|(_, id)| id).collect();
                // No keyslot can be tried at all: say why rather than "wrong passphrase".
                if order.is_empty()
                    && let Some((id, reason)) = self
                        .meta
                        .keyslots
                        .keys()
                        .find_map(|id| Some((*id, self.unusable_reason(*id)?)))
                {
                    return Err(Error::Keyslot {
                        slot: id,
                        reason: format!("{reason} (no keyslot is usable)"),
                    });
                }
                order
            }
        };
        // Unlocking yields the data segment's volume key: without one there is nothing to
        // unlock (a keyslot's own problem, reported above, is the more precise reason).
        self.data()?;
        let mut deferred = None;
        for s in order {
            match self.try_slot(r, s, passphrase, limits) {
                Ok(Some(key)) => return Ok((s, key)),
                Ok(None) => {}
                // Over the KDF limits or an unsupported algorithm in this slot: try the
                // others, and report it only if no slot accepts the passphrase.
                Err(Error::Crypto(e)) if slot.is_none() => {
                    deferred.get_or_insert(Error::Crypto(e));
                }
                Err(e) => return Err(e),
            }
        }
        Err(deferred.unwrap_or(Error::NoKey))
    }

    pub fn summary(&self) -> Summary {
        let m = &self.meta;
        let keyslots = m
            .keyslots
            .iter()
            .map(|(id, ks)| {
                let kdf = ks.kdf.as_ref().map(|k| match k {
                    KdfDesc::Pbkdf2 {
                        hash, iterations, ..
                    } => KdfSummary {
                        kind: "pbkdf2".into(),
                        hash: Some(hash.clone()),
                        iterations: Some(*iterations),
                        time: None,
                        memory_kib: None,
                        parallel: None,
                    },
                    KdfDesc::Argon2 {
                        id,
                        time,
                        memory,
                        cpus,
                        ..
                    } => KdfSummary {
                        kind: if *id { "argon2id" } else { "argon2i" }.into(),
                        hash: None,
                        iterations: None,
                        time: Some(*time),
                        memory_kib: Some(*memory),
                        parallel: Some(*cpus),
                    },
                    KdfDesc::Unknown(t) => KdfSummary {
                        kind: t.clone(),
                        hash: None,
                        iterations: None,
                        time: None,
                        memory_kib: None,
                        parallel: None,
                    },
                });
                let luks2 = ks.kind == "luks2";
                let reason = self.unusable_reason(*id);
                KeyslotSummary {
                    id: *id,
                    state: ks.kind.clone(),
                    kind: Some(ks.kind.clone()),
                    priority: Some(
                        match ks.priority {
                            0 => "ignore",
                            2 => "high",
                            _ => "normal",
                        }
                        .into(),
                    ),
                    key_bits: ks.key_size as usize * 8,
                    kdf,
                    af_stripes: luks2.then_some(ks.af_stripes),
                    af_hash: luks2.then(|| ks.af_hash.clone()),
                    area_offset: ks.area.offset,
                    area_size: ks.area.size,
                    area_encryption: ks.area.encryption.clone(),
                    digest: m.digest_of_keyslot(*id).map(|(d, _)| d),
                    bound: self.is_bound(*id),
                    usable: reason.is_none(),
                    note: reason,
                }
            })
            .collect();
        let data = self.data.as_ref().ok();
        Summary {
            version: 2,
            uuid: self.binary.uuid.clone(),
            label: (!self.binary.label.is_empty()).then(|| self.binary.label.clone()),
            subsystem: (!self.binary.subsystem.is_empty()).then(|| self.binary.subsystem.clone()),
            cipher: data.map(|d| d.crypt.encryption.clone()),
            hash: None,
            volume_key_bits: self.volume_key_len() * 8,
            sector_size: data.map(|d| d.crypt.sector_size),
            data_offset: data.map(|d| d.entry.offset),
            data_size: data.and_then(|d| d.entry.size),
            iv_tweak: data.map(|d| d.crypt.iv_tweak),
            no_data_segment: self.data.as_ref().err().cloned(),
            hdr_size: Some(self.binary.hdr_size),
            seqid: Some(self.binary.seqid),
            checksum_alg: Some(self.binary.csum_alg.clone()),
            header_copy: Some(
                if self.binary.primary {
                    "primary"
                } else {
                    "secondary"
                }
                .into(),
            ),
            keyslots_size: Some(m.config.keyslots_size),
            mk_digest_iterations: None,
            keyslots,
            digests: m
                .digests
                .iter()
                .map(|(id, d)| DigestSummary {
                    id: *id,
                    kind: d.kind.clone(),
                    hash: Some(d.hash.clone()),
                    iterations: Some(d.iterations),
                    keyslots: d.keyslots.clone(),
                    segments: d.segments.clone(),
                })
                .collect(),
            segments: m
                .segments
                .iter()
                .map(|(id, s)| SegmentSummary {
                    id: *id,
                    kind: s.kind.clone(),
                    offset: s.offset,
                    size: s.size,
                    encryption: s.crypt.as_ref().map(|c| c.encryption.clone()),
                    sector_size: s.crypt.as_ref().map(|c| c.sector_size),
                    iv_tweak: s.crypt.as_ref().map(|c| c.iv_tweak),
                    flags: s.flags.clone(),
                })
                .collect(),
            tokens: m
                .tokens
                .iter()
                .map(|(id, t)| TokenSummary {
                    id: *id,
                    kind: t.kind.clone(),
                    keyslots: t.keyslots.clone(),
                })
                .collect(),
            requirements: m.config.requirements.clone(),
            flags: m.config.flags.clone(),
        }
    }
}

/// The data segment (the first regular crypt segment) with the volume key size its digest's
/// keyslots give, or why there is none volcrypt can use. A header without one is still valid
/// (cryptsetup reads it: a segment of a type it does not know, for example); only opening
/// the data is refused.
fn find_data_segment(meta: &Metadata) -> Result<DataSegment, String> {
    let (id, seg) = meta
        .segments
        .iter()
        .find(|(_, s)| !s.flags.iter().any(|f| f.starts_with("backup-")))
        .ok_or("no regular segment")?;
    let crypt = seg.crypt.clone().ok_or_else(|| {
        format!(
            "segments.{id} has type {:?}; volcrypt opens only \"crypt\" data segments",
            seg.kind
        )
    })?;
    let (digest_id, digest) = meta
        .digests
        .iter()
        .find(|(_, d)| d.segments.contains(id))
        .ok_or_else(|| format!("segments.{id} is not assigned to any digest"))?;
    let volume_key_len = digest
        .keyslots
        .iter()
        .filter_map(|k| meta.keyslots.get(k))
        .find(|k| k.kind == "luks2" && k.key_size > 0)
        .map(|k| k.key_size as usize)
        .ok_or_else(|| format!("digests.{digest_id} (the data segment's) has no luks2 keyslot"))?;
    if let Ok(c) = CipherSpec::parse(&crypt.encryption) {
        c.check_key_len(volume_key_len)
            .map_err(|e| format!("digests.{digest_id}.keyslots: volume key size: {e}"))?;
    }
    Ok(DataSegment {
        id: *id,
        entry: seg.clone(),
        crypt,
        volume_key_len,
    })
}
