//! The LUKS2 JSON metadata: validation into typed structs (paths in every error, e.g.
//! `segments.0.offset`), keeping the raw JSON (tokens are carried as raw values).
//!
//! What makes a header invalid is exactly what cryptsetup's own LUKS2 validation refuses
//! (`cryptsetup luksDump` accepts the rest; tests/luks_verdicts.rs compares the two verdicts):
//! a header cryptsetup reads must inspect here too. Values that are well-formed but that no
//! engine can use (a zero iteration count, a salt that is not base64, an unknown digest type,
//! a segment of an unknown type) leave the header valid and make only the keyslot, digest or
//! operation that needs them unusable, with the reason (`problem`).

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
/// cryptsetup's LUKS2_MAX_KEYSLOTS_SIZE: the keyslots area is at most 128 MiB.
pub const MAX_KEYSLOTS_SIZE: u64 = 128 * 1024 * 1024;

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

/// Object key that must be a decimal number below `max` (no sign, no leading zero: a
/// reference "0" must find it).
fn numbered(key: &str, path: &str, max: u32) -> Result<u32, Error> {
    let canonical = key == "0" || !key.starts_with('0');
    let n = if canonical
        && !key.is_empty()
        && key.len() <= 10
        && key.bytes().all(|b| b.is_ascii_digit())
    {
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
    a.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| err(&format!("{path}[{i}]"), "is not a string"))
        })
        .collect()
}

/// Array of decimal-string references ("0", "1", ...). A repeated reference means nothing
/// more than one (cryptsetup accepts it), so it is kept once.
fn id_list(o: &Obj, key: &str, path: &str, max: u32) -> Result<Vec<u32>, Error> {
    let p = join(path, key);
    let mut ids = Vec::new();
    for (i, s) in string_list(get(o, key, path)?, &p)?.iter().enumerate() {
        let n = numbered(s, &format!("{p}[{i}]"), max)?;
        if !ids.contains(&n) {
            ids.push(n);
        }
    }
    Ok(ids)
}

/// A JSON integer that must be present; its value is checked by the caller (`None` when it
/// does not fit a u32: well-formed, but unusable).
fn get_any_int(o: &Obj, key: &str, path: &str) -> Result<Option<u32>, Error> {
    let v = get(o, key, path)?;
    if !(v.is_i64() || v.is_u64()) {
        return Err(err(
            &join(path, key),
            format!("is {}, not an integer", type_name(v)),
        ));
    }
    Ok(v.as_u64().and_then(|n| u32::try_from(n).ok()))
}

/// Base64 bytes of a string field that must be present; `None` when not valid base64.
fn get_b64_lenient(o: &Obj, key: &str, path: &str) -> Result<Option<Vec<u8>>, Error> {
    let s = get_str(o, key, path)?;
    Ok(base64::engine::general_purpose::STANDARD.decode(s).ok())
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
    /// Why this keyslot cannot unlock although the header is valid (a zero iteration count, a
    /// salt that is not base64, an area too small for its key material...).
    pub problem: Option<String>,
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
    /// Why this digest cannot verify a key although the header is valid (a type other than
    /// pbkdf2, missing or unusable parameters).
    pub problem: Option<String>,
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
        check_keyslots_fit(&config, hdr_size, &segments)?;
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
    if keyslots_size > MAX_KEYSLOTS_SIZE {
        return Err(err(
            "config.keyslots_size",
            format!("{keyslots_size} is larger than {MAX_KEYSLOTS_SIZE} (128 MiB)"),
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

/// A keyslot's KDF: the fields its type needs must be present with the right JSON types;
/// values no KDF can run with go to `problems`.
fn parse_kdf(o: &Obj, path: &str, problems: &mut Vec<String>) -> Result<KdfDesc, Error> {
    let kind = get_str(o, "type", path)?;
    let int = |key: &str, problems: &mut Vec<String>| -> Result<u32, Error> {
        match get_any_int(o, key, path)? {
            Some(n) if n >= 1 => Ok(n),
            _ => {
                problems.push(format!(
                    "{path}.{key} {} is not between 1 and {}",
                    o[key],
                    u32::MAX
                ));
                Ok(0)
            }
        }
    };
    let salt = |problems: &mut Vec<String>| -> Result<Vec<u8>, Error> {
        Ok(get_b64_lenient(o, "salt", path)?.unwrap_or_else(|| {
            problems.push(format!("{path}.salt is not valid base64"));
            Vec::new()
        }))
    };
    Ok(match kind {
        "pbkdf2" => KdfDesc::Pbkdf2 {
            hash: get_str(o, "hash", path)?.to_string(),
            iterations: int("iterations", problems)?,
            salt: salt(problems)?,
        },
        "argon2i" | "argon2id" => KdfDesc::Argon2 {
            id: kind == "argon2id",
            time: int("time", problems)?,
            memory: int("memory", problems)?,
            cpus: int("cpus", problems)?,
            salt: salt(problems)?,
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
        // The value is checked when the keyslot is used (cryptsetup reads any integer).
        let key_size = get_any_int(o, "key_size", path)?.unwrap_or(0);
        (Some(enc.to_string()), Some(key_size))
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
        let id = numbered(key, "keyslots", u32::MAX)?;
        let path = format!("keyslots.{key}");
        let ks = as_obj(v, &path)?;
        let kind = get_str(ks, "type", &path)?.to_string();
        let luks2 = kind == "luks2";
        let area = parse_area(get_obj(ks, "area", &path)?, &format!("{path}.area"), luks2)?;
        // 0 ignore, 2 high; cryptsetup reads any integer and treats the rest as normal.
        let priority = match ks.get("priority") {
            Some(_) => match get_any_int(ks, "priority", &path)? {
                Some(0) => 0,
                Some(2) => 2,
                _ => 1,
            },
            None => 1,
        };
        // cryptsetup requires a 32-bit unsigned integer here; its value is checked on use.
        let key_size = get_any_int(ks, "key_size", &path)?.ok_or_else(|| {
            err(
                &format!("{path}.key_size"),
                format!("{} is not between 0 and {}", ks["key_size"], u32::MAX),
            )
        })?;
        let slot = if luks2 {
            let mut problems = Vec::new();
            let key_size = match key_size {
                n if (1..=MAX_KEY_SIZE).contains(&n) => n,
                _ => {
                    problems.push(format!(
                        "{path}.key_size {} is not between 1 and {MAX_KEY_SIZE}",
                        ks["key_size"]
                    ));
                    0
                }
            };
            if let Some(k) = area.key_size.filter(|k| !(1..=MAX_KEY_SIZE).contains(k)) {
                problems.push(format!(
                    "{path}.area.key_size {k} is not between 1 and {MAX_KEY_SIZE}"
                ));
            }
            let af_path = format!("{path}.af");
            let af = get_obj(ks, "af", &path)?;
            let af_type = get_str(af, "type", &af_path)?;
            if af_type != "luks1" {
                return Err(err(
                    &format!("{af_path}.type"),
                    format!("{af_type:?} is not \"luks1\""),
                ));
            }
            let af_stripes = match get_any_int(af, "stripes", &af_path)? {
                Some(STRIPES) => STRIPES,
                _ => {
                    problems.push(format!(
                        "{af_path}.stripes {} is not {STRIPES} (the only LUKS2 stripe count)",
                        af["stripes"]
                    ));
                    0
                }
            };
            let af_hash = get_str(af, "hash", &af_path)?.to_string();
            let kdf = parse_kdf(
                get_obj(ks, "kdf", &path)?,
                &format!("{path}.kdf"),
                &mut problems,
            )?;
            let need = material_len(key_size as usize, af_stripes).unwrap_or(u64::MAX);
            if key_size > 0 && af_stripes > 0 && need > area.size {
                problems.push(format!(
                    "{path}.area.size {} cannot hold {af_stripes} stripes of a {key_size}-byte key ({need} bytes)",
                    area.size
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
                problem: (!problems.is_empty()).then(|| problems.join("; ")),
            }
        } else {
            Keyslot {
                kind,
                key_size,
                priority,
                area,
                kdf: None,
                af_stripes: 0,
                af_hash: String::new(),
                problem: None,
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

/// Whether a segment is a backup kept during reencryption (a flag "backup-…").
fn is_backup(s: &Segment) -> bool {
    s.flags.iter().any(|f| f.starts_with("backup-"))
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
            if n == 0 {
                return Err(err(&size_path, "is 0 (\"dynamic\" or a positive size)"));
            }
            if n % 512 != 0 {
                return Err(err(&size_path, format!("{n} is not a multiple of 512")));
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
            // Any non-zero multiple of 512 that fits 32 bits is a valid header; the engine
            // and dm-crypt take powers of two up to 4096 (checked when the data is used).
            let sector_size = get_any_int(s, "sector_size", &path)?
                .filter(|n| *n > 0 && n % 512 == 0)
                .ok_or_else(|| {
                    err(
                        &format!("{path}.sector_size"),
                        format!("{} is not a positive multiple of 512", s["sector_size"]),
                    )
                })?;
            if let Some(n) = size.filter(|n| n % u64::from(sector_size) != 0) {
                return Err(err(
                    &size_path,
                    format!("{n} is not a multiple of the sector size {sector_size}"),
                ));
            }
            let integrity = match s.get("integrity") {
                Some(i) => {
                    let ipath = format!("{path}.integrity");
                    let i = as_obj(i, &ipath)?;
                    for k in ["type", "journal_encryption", "journal_integrity"] {
                        get_str(i, k, &ipath)?;
                    }
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
    if out.is_empty() {
        return Err(err("segments", "is empty (a header needs a segment)"));
    }
    // Keys run 0..n without gaps; regular segments come before backup segments.
    for (i, id) in out.keys().enumerate() {
        if *id as usize != i {
            return Err(err(
                "segments",
                format!("gap before segment {id} (expected key {i})"),
            ));
        }
    }
    let regular: Vec<(u32, &Segment)> = out
        .iter()
        .take_while(|(_, s)| !is_backup(s))
        .map(|(id, s)| (*id, s))
        .collect();
    if regular.is_empty() {
        return Err(err("segments", "no regular segment (only backups)"));
    }
    if let Some((id, _)) = out.iter().skip(regular.len()).find(|(_, s)| !is_backup(s)) {
        return Err(err(
            &format!("segments.{id}"),
            "a regular segment after a backup segment",
        ));
    }
    // Among regular segments only the last may be dynamic, and none may start inside another.
    // The end is computed with wrap-around as cryptsetup does, so a size near 2^64 is valid.
    let last = regular.len() - 1;
    for (i, (id, s)) in regular.iter().enumerate() {
        if s.size.is_none() && i != last {
            return Err(err(
                &format!("segments.{id}.size"),
                "\"dynamic\" is allowed for the last regular segment only",
            ));
        }
        for (j, (other, t)) in regular.iter().enumerate() {
            let inside = match t.size {
                None => s.offset >= t.offset,
                Some(n) => s.offset >= t.offset && s.offset < t.offset.wrapping_add(n),
            };
            if i != j && inside {
                return Err(err(
                    &format!("segments.{id}"),
                    format!("overlaps segments.{other}"),
                ));
            }
        }
    }
    Ok(out)
}

/// The keyslots area must end before the first data (unless a segment sits at offset 0: a
/// detached header).
fn check_keyslots_fit(
    config: &Config,
    hdr_size: u64,
    segments: &BTreeMap<u32, Segment>,
) -> Result<(), Error> {
    let first = segments.values().map(|s| s.offset).min().unwrap_or(0);
    let need = (2 * hdr_size).saturating_add(config.keyslots_size);
    if first != 0 && first < need {
        return Err(err(
            "config.keyslots_size",
            format!(
                "{} does not fit between the headers (end at {}) and the data at {first}",
                config.keyslots_size,
                2 * hdr_size
            ),
        ));
    }
    Ok(())
}

fn parse_digests(
    o: &Obj,
    keyslots: &BTreeMap<u32, Keyslot>,
    segments: &BTreeMap<u32, Segment>,
) -> Result<BTreeMap<u32, Digest>, Error> {
    let mut out = BTreeMap::new();
    for (key, v) in o {
        let id = numbered(key, "digests", u32::MAX)?;
        let path = format!("digests.{key}");
        let d = as_obj(v, &path)?;
        let kind = get_str(d, "type", &path)?.to_string();
        let ks = id_list(d, "keyslots", &path, u32::MAX)?;
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
        out.insert(id, pbkdf2_digest(d, &path, kind, ks, segs));
    }
    Ok(out)
}

/// The parameters of a pbkdf2 digest. cryptsetup validates only the digest's type and
/// references, so anything wrong here makes the digest (and the keyslots bound to it)
/// unusable, not the header invalid.
fn pbkdf2_digest(
    d: &Obj,
    path: &str,
    kind: String,
    keyslots: Vec<u32>,
    segments: Vec<u32>,
) -> Digest {
    let mut problems = Vec::new();
    if kind != "pbkdf2" {
        problems.push(format!(
            "{path}.type {kind:?} is not a digest type volcrypt knows (pbkdf2)"
        ));
    }
    let hash = d
        .get("hash")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let iterations = d
        .get("iterations")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or(0);
    let b64 = |k: &str| {
        d.get(k)
            .and_then(Value::as_str)
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
    };
    let salt = b64("salt").unwrap_or_default();
    let digest = b64("digest").unwrap_or_default();
    if kind == "pbkdf2" {
        if hash.is_empty() {
            problems.push(format!("{path}.hash is missing"));
        }
        if iterations == 0 {
            problems.push(format!(
                "{path}.iterations is missing or not between 1 and {}",
                u32::MAX
            ));
        }
        if b64("salt").is_none() {
            problems.push(format!("{path}.salt is missing or not valid base64"));
        }
        if digest.is_empty() || digest.len() > 64 {
            problems.push(format!(
                "{path}.digest is missing, not base64, or not 1 to 64 bytes"
            ));
        }
    }
    Digest {
        kind,
        keyslots,
        segments,
        hash,
        iterations,
        salt,
        digest,
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

fn parse_tokens(o: &Obj, keyslots: &BTreeMap<u32, Keyslot>) -> Result<BTreeMap<u32, Token>, Error> {
    let mut out = BTreeMap::new();
    for (key, v) in o {
        let id = numbered(key, "tokens", u32::MAX)?;
        let path = format!("tokens.{key}");
        let t = as_obj(v, &path)?;
        let kind = get_str(t, "type", &path)?.to_string();
        let ks = id_list(t, "keyslots", &path, u32::MAX)?;
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
