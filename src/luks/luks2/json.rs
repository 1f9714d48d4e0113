//! The LUKS2 JSON metadata: strict validation into typed structs (paths in every error, e.g.
//! `segments.0.offset`), keeping the raw JSON (tokens are carried as raw values).

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Map, Value};

use super::super::Error;
use super::super::keyslot::material_len;

const H: &str = "LUKS2";
/// cryptsetup's LUKS2_KEYSLOTS_MAX / LUKS2_TOKENS_MAX / LUKS2_SEGMENT_MAX / LUKS2_DIGEST_MAX.
pub const MAX_KEYSLOTS: u32 = 32;
pub const MAX_TOKENS: u32 = 32;
pub const MAX_SEGMENTS: u32 = 32;
pub const MAX_DIGESTS: u32 = 8;
pub const STRIPES: u32 = 4000;
pub const MAX_KEY_SIZE: u32 = 512;
/// Bounds on lists inside objects (flags, requirements, references).
const MAX_LIST: usize = 64;

type Obj = Map<String, Value>;

fn err(path: &str, reason: impl Into<String>) -> Error {
    Error::invalid(H, path, reason)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn as_obj<'a>(v: &'a Value, path: &str) -> Result<&'a Obj, Error> {
    v.as_object()
        .ok_or_else(|| err(path, format!("is {}, not an object", type_name(v))))
}

fn get<'a>(o: &'a Obj, key: &str, path: &str) -> Result<&'a Value, Error> {
    o.get(key)
        .ok_or_else(|| err(&join(path, key), "is missing"))
}

fn get_obj<'a>(o: &'a Obj, key: &str, path: &str) -> Result<&'a Obj, Error> {
    as_obj(get(o, key, path)?, &join(path, key))
}

fn get_str<'a>(o: &'a Obj, key: &str, path: &str) -> Result<&'a str, Error> {
    let v = get(o, key, path)?;
    v.as_str().ok_or_else(|| {
        err(
            &join(path, key),
            format!("is {}, not a string", type_name(v)),
        )
    })
}

/// A 64-bit value stored as a string of decimal digits (no sign, no overflow).
pub fn parse_u64_str(s: &str, path: &str) -> Result<u64, Error> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(path, format!("{s:?} is not a 64-bit number")));
    }
    s.parse::<u64>()
        .map_err(|_| err(path, format!("{s:?} is not a 64-bit number")))
}

fn get_u64_str(o: &Obj, key: &str, path: &str) -> Result<u64, Error> {
    let p = join(path, key);
    let v = get(o, key, path)?;
    let s = v.as_str().ok_or_else(|| {
        err(
            &p,
            format!("is {}, not a string holding a 64-bit number", type_name(v)),
        )
    })?;
    parse_u64_str(s, &p)
}

/// A JSON integer in `min..=max`.
fn get_int(o: &Obj, key: &str, path: &str, min: u32, max: u32) -> Result<u32, Error> {
    let p = join(path, key);
    let v = get(o, key, path)?;
    let n = v
        .as_u64()
        .ok_or_else(|| err(&p, format!("{v} is not a non-negative integer")))?;
    u32::try_from(n)
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| err(&p, format!("{n} is not between {min} and {max}")))
}

fn get_b64(o: &Obj, key: &str, path: &str) -> Result<Vec<u8>, Error> {
    let p = join(path, key);
    let s = get_str(o, key, path)?;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| err(&p, format!("is not valid base64: {e}")))
}

/// Object key that must be a decimal number below `max`.
fn numbered(key: &str, path: &str, max: u32) -> Result<u32, Error> {
    let n = if !key.is_empty() && key.len() <= 10 && key.bytes().all(|b| b.is_ascii_digit()) {
        key.parse::<u32>().ok()
    } else {
        None
    };
    match n {
        Some(n) if n < max => Ok(n),
        Some(n) => Err(err(&join(path, key), format!("id {n} is not below {max}"))),
        None => Err(err(path, format!("key {key:?} is not a decimal number"))),
    }
}

fn string_list(v: &Value, path: &str) -> Result<Vec<String>, Error> {
    let a = v
        .as_array()
        .ok_or_else(|| err(path, format!("is {}, not an array", type_name(v))))?;
    if a.len() > MAX_LIST {
        return Err(err(
            path,
            format!("has {} entries (at most {MAX_LIST})", a.len()),
        ));
    }
    a.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| err(&format!("{path}[{i}]"), "is not a string"))
        })
        .collect()
}

/// Array of decimal-string references ("0", "1", ...).
fn id_list(o: &Obj, key: &str, path: &str, max: u32) -> Result<Vec<u32>, Error> {
    let p = join(path, key);
    let mut ids = Vec::new();
    for (i, s) in string_list(get(o, key, path)?, &p)?.iter().enumerate() {
        let n = numbered(s, &format!("{p}[{i}]"), max)?;
        if ids.contains(&n) {
            return Err(err(&p, format!("lists {n} twice")));
        }
        ids.push(n);
    }
    Ok(ids)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KdfDesc {
    Pbkdf2 {
        hash: String,
        iterations: u32,
        salt: Vec<u8>,
    },
    Argon2 {
        id: bool,
        time: u32,
        memory: u32,
        cpus: u32,
        salt: Vec<u8>,
    },
    /// Unknown KDF type: the header stays valid, the keyslot is unusable.
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Area {
    pub kind: String,
    pub offset: u64,
    pub size: u64,
    pub encryption: Option<String>,
    pub key_size: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyslot {
    /// "luks2" is the only type that unlocks; others (e.g. "reencrypt") are kept for areas.
    pub kind: String,
    pub key_size: u32,
    /// 0 ignore, 1 normal (default), 2 high.
    pub priority: u8,
    pub area: Area,
    pub kdf: Option<KdfDesc>,
    pub af_stripes: u32,
    pub af_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptParams {
    pub encryption: String,
    pub iv_tweak: u64,
    pub sector_size: u32,
    pub integrity: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub kind: String,
    pub offset: u64,
    /// None = "dynamic" (to the end of the device).
    pub size: Option<u64>,
    pub crypt: Option<CryptParams>,
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub kind: String,
    pub keyslots: Vec<u32>,
    pub segments: Vec<u32>,
    pub hash: String,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub digest: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub kind: String,
    pub keyslots: Vec<u32>,
    /// The token object exactly as stored, so it is kept intact.
    pub raw: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub json_size: u64,
    pub keyslots_size: u64,
    pub flags: Vec<String>,
    /// config.requirements.mandatory.
    pub requirements: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    pub keyslots: BTreeMap<u32, Keyslot>,
    pub tokens: BTreeMap<u32, Token>,
    pub segments: BTreeMap<u32, Segment>,
    pub digests: BTreeMap<u32, Digest>,
    pub config: Config,
    /// The whole JSON object as read.
    pub raw: Value,
}

impl Metadata {
    /// Validates the JSON of a header whose binary part says `hdr_size`.
    pub fn from_json(raw: Value, hdr_size: u64) -> Result<Metadata, Error> {
        let top = as_obj(&raw, "JSON")?;
        for key in ["keyslots", "tokens", "segments", "digests", "config"] {
            get_obj(top, key, "")?;
        }
        let config = parse_config(get_obj(top, "config", "")?, hdr_size)?;
        let keyslots = parse_keyslots(get_obj(top, "keyslots", "")?)?;
        check_areas(&keyslots, hdr_size, config.keyslots_size)?;
        let segments = parse_segments(get_obj(top, "segments", "")?)?;
        let digests = parse_digests(get_obj(top, "digests", "")?, &keyslots, &segments)?;
        let tokens = parse_tokens(get_obj(top, "tokens", "")?, &keyslots)?;
        let meta = Metadata {
            keyslots,
            tokens,
            segments,
            digests,
            config,
            raw: Value::Null,
        };
        meta.check_bindings()?;
        Ok(Metadata { raw, ..meta })
    }

    /// The digest a keyslot belongs to.
    pub fn digest_of_keyslot(&self, slot: u32) -> Option<(u32, &Digest)> {
        self.digests
            .iter()
            .find(|(_, d)| d.keyslots.contains(&slot))
            .map(|(id, d)| (*id, d))
    }

    fn check_bindings(&self) -> Result<(), Error> {
        for (id, ks) in &self.keyslots {
            if ks.kind != "luks2" {
                continue;
            }
            let n = self
                .digests
                .values()
                .filter(|d| d.keyslots.contains(id))
                .count();
            if n != 1 {
                return Err(err(
                    &format!("keyslots.{id}"),
                    if n == 0 {
                        "is not assigned to any digest".to_string()
                    } else {
                        format!("is assigned to {n} digests (exactly one allowed)")
                    },
                ));
            }
        }
        for (id, seg) in &self.segments {
            if seg.crypt.is_some() && !self.digests.values().any(|d| d.segments.contains(id)) {
                return Err(err(
                    &format!("segments.{id}"),
                    "crypt segment is not assigned to any digest",
                ));
            }
        }
        Ok(())
    }
}

fn parse_config(o: &Obj, hdr_size: u64) -> Result<Config, Error> {
    let json_size = get_u64_str(o, "json_size", "config")?;
    if json_size != hdr_size - 4096 {
        return Err(err(
            "config.json_size",
            format!(
                "{json_size} does not match hdr_size - 4096 ({})",
                hdr_size - 4096
            ),
        ));
    }
    let keyslots_size = get_u64_str(o, "keyslots_size", "config")?;
    if keyslots_size % 4096 != 0 {
        return Err(err(
            "config.keyslots_size",
            format!("{keyslots_size} is not a multiple of 4096"),
        ));
    }
    if keyslots_size.checked_add(2 * hdr_size).is_none() {
        return Err(err(
            "config.keyslots_size",
            format!("{keyslots_size} is too large"),
        ));
    }
    let flags = match o.get("flags") {
        Some(v) => string_list(v, "config.flags")?,
        None => Vec::new(),
    };
    let requirements = match o.get("requirements") {
        Some(v) => {
            let r = as_obj(v, "config.requirements")?;
            match r.get("mandatory") {
                Some(m) => string_list(m, "config.requirements.mandatory")?,
                None => Vec::new(),
            }
        }
        None => Vec::new(),
    };
    Ok(Config {
        json_size,
        keyslots_size,
        flags,
        requirements,
    })
}

fn parse_kdf(o: &Obj, path: &str) -> Result<KdfDesc, Error> {
    let kind = get_str(o, "type", path)?;
    Ok(match kind {
        "pbkdf2" => KdfDesc::Pbkdf2 {
            hash: get_str(o, "hash", path)?.to_string(),
            iterations: get_int(o, "iterations", path, 1, u32::MAX)?,
            salt: get_b64(o, "salt", path)?,
        },
        "argon2i" | "argon2id" => KdfDesc::Argon2 {
            id: kind == "argon2id",
            time: get_int(o, "time", path, 1, u32::MAX)?,
            memory: get_int(o, "memory", path, 1, u32::MAX)?,
            cpus: get_int(o, "cpus", path, 1, u32::MAX)?,
            salt: get_b64(o, "salt", path)?,
        },
        other => KdfDesc::Unknown(other.to_string()),
    })
}

fn parse_area(o: &Obj, path: &str, luks2: bool) -> Result<Area, Error> {
    let kind = get_str(o, "type", path)?.to_string();
    let offset = get_u64_str(o, "offset", path)?;
    let size = get_u64_str(o, "size", path)?;
    let (encryption, key_size) = if kind == "raw" {
        let enc = get_str(o, "encryption", path)?;
        if enc.is_empty() {
            return Err(err(&join(path, "encryption"), "is empty"));
        }
        (
            Some(enc.to_string()),
            Some(get_int(o, "key_size", path, 1, MAX_KEY_SIZE)?),
        )
    } else if luks2 {
        return Err(err(
            &join(path, "type"),
            format!("{kind:?} is not \"raw\" (required for a luks2 keyslot)"),
        ));
    } else {
        (None, None)
    };
    Ok(Area {
        kind,
        offset,
        size,
        encryption,
        key_size,
    })
}

fn parse_keyslots(o: &Obj) -> Result<BTreeMap<u32, Keyslot>, Error> {
    let mut out = BTreeMap::new();
    for (key, v) in o {
        let id = numbered(key, "keyslots", MAX_KEYSLOTS)?;
        let path = format!("keyslots.{key}");
        let ks = as_obj(v, &path)?;
        let kind = get_str(ks, "type", &path)?.to_string();
        let luks2 = kind == "luks2";
        let area = parse_area(get_obj(ks, "area", &path)?, &format!("{path}.area"), luks2)?;
        let priority = match ks.get("priority") {
            Some(_) => get_int(ks, "priority", &path, 0, 2)? as u8,
            None => 1,
        };
        let slot = if luks2 {
            let key_size = get_int(ks, "key_size", &path, 1, MAX_KEY_SIZE)?;
            let af_path = format!("{path}.af");
            let af = get_obj(ks, "af", &path)?;
            let af_type = get_str(af, "type", &af_path)?;
            if af_type != "luks1" {
                return Err(err(
                    &format!("{af_path}.type"),
                    format!("{af_type:?} is not \"luks1\""),
                ));
            }
            let af_stripes = get_int(af, "stripes", &af_path, STRIPES, STRIPES)?;
            let af_hash = get_str(af, "hash", &af_path)?.to_string();
            let kdf = parse_kdf(get_obj(ks, "kdf", &path)?, &format!("{path}.kdf"))?;
            let need = material_len(key_size as usize, af_stripes).unwrap_or(u64::MAX);
            if need > area.size {
                return Err(err(
                    &format!("{path}.area.size"),
                    format!(
                        "{} bytes cannot hold {af_stripes} stripes of a {key_size}-byte key ({need} bytes)",
                        area.size
                    ),
                ));
            }
            Keyslot {
                kind,
                key_size,
                priority,
                area,
                kdf: Some(kdf),
                af_stripes,
                af_hash,
            }
        } else {
            Keyslot {
                kind,
                key_size: 0,
                priority,
                area,
                kdf: None,
                af_stripes: 0,
                af_hash: String::new(),
            }
        };
        out.insert(id, slot);
    }
    Ok(out)
}

/// Keyslot areas: non-empty, inside [2*hdr_size, 2*hdr_size + keyslots_size), no overlap.
fn check_areas(
    keyslots: &BTreeMap<u32, Keyslot>,
    hdr_size: u64,
    keyslots_size: u64,
) -> Result<(), Error> {
    let start = 2 * hdr_size;
    let end = start + keyslots_size;
    let mut spans = Vec::new();
    for (id, ks) in keyslots {
        let path = format!("keyslots.{id}.area");
        let a = &ks.area;
        if a.size == 0 {
            return Err(err(&format!("{path}.size"), "is 0"));
        }
        let a_end = a
            .offset
            .checked_add(a.size)
            .filter(|&e| a.offset >= start && e <= end);
        let Some(a_end) = a_end else {
            return Err(err(
                &path,
                format!(
                    "offset {} size {} is outside the keyslots area [{start}, {end})",
                    a.offset, a.size
                ),
            ));
        };
        spans.push((a.offset, a_end, *id));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(err(
                &format!("keyslots.{}.area", w[1].2),
                format!("overlaps keyslots.{}.area", w[0].2),
            ));
        }
    }
    Ok(())
}

fn parse_segments(o: &Obj) -> Result<BTreeMap<u32, Segment>, Error> {
    let mut out = BTreeMap::new();
    for (key, v) in o {
        let id = numbered(key, "segments", MAX_SEGMENTS)?;
        let path = format!("segments.{key}");
        let s = as_obj(v, &path)?;
        let kind = get_str(s, "type", &path)?.to_string();
        let offset = get_u64_str(s, "offset", &path)?;
        if offset % 512 != 0 {
            return Err(err(
                &format!("{path}.offset"),
                format!("{offset} is not a multiple of 512"),
            ));
        }
        let size_path = format!("{path}.size");
        let size = match get(s, "size", &path)? {
            Value::String(t) if t == "dynamic" => None,
            Value::String(t) => Some(parse_u64_str(t, &size_path)?),
            other => {
                return Err(err(
                    &size_path,
                    format!("is {}, not a string", type_name(other)),
                ));
            }
        };
        if let Some(n) = size {
            if n % 512 != 0 {
                return Err(err(&size_path, format!("{n} is not a multiple of 512")));
            }
            if offset.checked_add(n).is_none() {
                return Err(err(&size_path, "offset + size overflows 64 bits"));
            }
        }
        let flags = match s.get("flags") {
            Some(f) => string_list(f, &format!("{path}.flags"))?,
            None => Vec::new(),
        };
        let crypt = if kind == "crypt" {
            let encryption = get_str(s, "encryption", &path)?.to_string();
            if encryption.is_empty() {
                return Err(err(&format!("{path}.encryption"), "is empty"));
            }
            let iv_tweak = get_u64_str(s, "iv_tweak", &path)?;
            let sector_size = get_int(s, "sector_size", &path, 512, 4096)?;
            if !sector_size.is_power_of_two() {
                return Err(err(
                    &format!("{path}.sector_size"),
                    format!("{sector_size} is not a power of two"),
                ));
            }
            if let Some(n) = size.filter(|n| n % u64::from(sector_size) != 0) {
                return Err(err(
                    &size_path,
                    format!("{n} is not a multiple of the sector size {sector_size}"),
                ));
            }
            let integrity = match s.get("integrity") {
                Some(i) => {
                    as_obj(i, &format!("{path}.integrity"))?;
                    true
                }
                None => false,
            };
            Some(CryptParams {
                encryption,
                iv_tweak,
                sector_size,
                integrity,
            })
        } else {
            None
        };
        out.insert(
            id,
            Segment {
                kind,
                offset,
                size,
                crypt,
                flags,
            },
        );
    }
    // Keys run 0..n without gaps; only the last may be dynamic; no overlaps.
    for (i, id) in out.keys().enumerate() {
        if *id as usize != i {
            return Err(err(
                "segments",
                format!("gap before segment {id} (expected key {i})"),
            ));
        }
    }
    let last = out.keys().next_back().copied();
    for (id, s) in &out {
        if s.size.is_none() && Some(*id) != last {
            return Err(err(
                &format!("segments.{id}.size"),
                "\"dynamic\" is allowed for the last segment only",
            ));
        }
    }
    let mut spans: Vec<(u64, Option<u64>, u32)> = out
        .iter()
        .map(|(id, s)| (s.offset, s.size.map(|n| s.offset + n), *id))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        let overlaps = match w[0].1 {
            None => true,
            Some(end) => w[1].0 < end,
        };
        if overlaps {
            return Err(err(
                &format!("segments.{}", w[1].2),
                format!("overlaps segments.{}", w[0].2),
            ));
        }
    }
    Ok(out)
}

fn parse_digests(
    o: &Obj,
    keyslots: &BTreeMap<u32, Keyslot>,
    segments: &BTreeMap<u32, Segment>,
) -> Result<BTreeMap<u32, Digest>, Error> {
    let mut out = BTreeMap::new();
    for (key, v) in o {
        let id = numbered(key, "digests", MAX_DIGESTS)?;
        let path = format!("digests.{key}");
        let d = as_obj(v, &path)?;
        let kind = get_str(d, "type", &path)?.to_string();
        if kind != "pbkdf2" {
            return Err(err(
                &format!("{path}.type"),
                format!("unsupported digest type {kind:?}"),
            ));
        }
        let ks = id_list(d, "keyslots", &path, MAX_KEYSLOTS)?;
        for k in &ks {
            if !keyslots.contains_key(k) {
                return Err(err(
                    &format!("{path}.keyslots"),
                    format!("keyslot {k} does not exist"),
                ));
            }
        }
        let segs = id_list(d, "segments", &path, MAX_SEGMENTS)?;
        for s in &segs {
            if !segments.contains_key(s) {
                return Err(err(
                    &format!("{path}.segments"),
                    format!("segment {s} does not exist"),
                ));
            }
        }
        let digest = get_b64(d, "digest", &path)?;
        if digest.is_empty() || digest.len() > 64 {
            return Err(err(
                &format!("{path}.digest"),
                format!("{} bytes long", digest.len()),
            ));
        }
        out.insert(
            id,
            Digest {
                kind,
                keyslots: ks,
                segments: segs,
                hash: get_str(d, "hash", &path)?.to_string(),
                iterations: get_int(d, "iterations", &path, 1, u32::MAX)?,
                salt: get_b64(d, "salt", &path)?,
                digest,
            },
        );
    }
    Ok(out)
}

fn parse_tokens(o: &Obj, keyslots: &BTreeMap<u32, Keyslot>) -> Result<BTreeMap<u32, Token>, Error> {
    let mut out = BTreeMap::new();
    for (key, v) in o {
        let id = numbered(key, "tokens", MAX_TOKENS)?;
        let path = format!("tokens.{key}");
        let t = as_obj(v, &path)?;
        let kind = get_str(t, "type", &path)?.to_string();
        let ks = id_list(t, "keyslots", &path, MAX_KEYSLOTS)?;
        for k in &ks {
            if !keyslots.contains_key(k) {
                return Err(err(
                    &format!("{path}.keyslots"),
                    format!("keyslot {k} does not exist"),
                ));
            }
        }
        out.insert(
            id,
            Token {
                kind,
                keyslots: ks,
                raw: v.clone(),
            },
        );
    }
    Ok(out)
}
