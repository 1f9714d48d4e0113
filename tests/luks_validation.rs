//! Header validation: every rule from the LUKS notes broken on purpose, each error naming the
//! broken rule or field. Headers are made by `luks::create` and then edited (JSON edits are
//! re-checksummed on both copies so that the JSON validator, not the checksum, is exercised).

use std::io::Cursor;
use std::sync::OnceLock;

use serde_json::{Value, json};
use volcrypt::crypto::kdf::{Kdf, KdfLimits};
use volcrypt::crypto::{CipherSpec, HashAlg};
use volcrypt::luks::{self, Header, NewContainer};

const HDR: usize = 16384;
const MIB: u64 = 1024 * 1024;
const PASS: &[u8] = b"validation";

fn params(version: u8, detached: bool) -> NewContainer {
    NewContainer {
        version,
        cipher: CipherSpec::parse("aes-xts-plain64").unwrap(),
        key_bytes: 64,
        sector_size: if version == 2 { 4096 } else { 512 },
        hash: HashAlg::Sha256,
        kdf: Kdf::Pbkdf2 {
            hash: HashAlg::Sha256,
            iterations: 1000,
        },
        label: None,
        detached_header: detached,
        payload_size: MIB,
    }
}

/// A detached LUKS2 header (16 MiB) and a LUKS1 header with its 2 MiB of keyslots, made once.
fn luks2() -> Vec<u8> {
    static H: OnceLock<Vec<u8>> = OnceLock::new();
    H.get_or_init(|| {
        luks::create(&params(2, true), PASS, &KdfLimits::default())
            .unwrap()
            .header
            .to_vec()
    })
    .clone()
}

fn luks1() -> Vec<u8> {
    static H: OnceLock<Vec<u8>> = OnceLock::new();
    H.get_or_init(|| {
        luks::create(&params(1, false), PASS, &KdfLimits::default())
            .unwrap()
            .header
            .to_vec()
    })
    .clone()
}

fn read(bytes: &[u8], device: Option<u64>) -> Result<Header, luks::Error> {
    Header::read(&mut Cursor::new(bytes), device)
}

fn err(bytes: &[u8], device: Option<u64>) -> String {
    match read(bytes, device) {
        Ok(_) => panic!("header was accepted"),
        Err(e) => {
            assert_eq!(volcrypt::error::ExitStatus::from(e.kind()).code(), 1, "{e}");
            e.to_string()
        }
    }
}

fn json_of(bytes: &[u8], at: usize) -> Value {
    let area = &bytes[at + 4096..at + HDR];
    let end = area.iter().position(|&b| b == 0).unwrap();
    serde_json::from_slice(&area[..end]).unwrap()
}

/// Recomputes the sha256 checksum of the copy at `at`.
fn fix_csum(bytes: &mut [u8], at: usize) {
    let mut bin = bytes[at..at + 4096].to_vec();
    bin[0x1C0..0x200].fill(0);
    let sum = HashAlg::Sha256.digest(&[&bin, &bytes[at + 4096..at + HDR]]);
    bytes[at + 0x1C0..at + 0x200].fill(0);
    bytes[at + 0x1C0..at + 0x1C0 + 32].copy_from_slice(&sum);
}

fn put_json_text(bytes: &mut [u8], at: usize, text: &[u8]) {
    let area = &mut bytes[at + 4096..at + HDR];
    area.fill(0);
    area[..text.len()].copy_from_slice(text);
    fix_csum(bytes, at);
}

/// Applies a JSON edit to both copies, with correct checksums.
fn edited(f: impl Fn(&mut Value)) -> Vec<u8> {
    let mut b = luks2();
    let mut v = json_of(&b, 0);
    f(&mut v);
    let text = serde_json::to_vec(&v).unwrap();
    for at in [0, HDR] {
        put_json_text(&mut b, at, &text);
    }
    b
}

fn json_err(f: impl Fn(&mut Value)) -> String {
    err(&edited(f), None)
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

#[test]
fn created_headers_are_valid_and_unlock() {
    let b = luks2();
    let h = read(&b, None).unwrap();
    assert_eq!(
        h.unlock(&mut Cursor::new(&b), PASS, None, &KdfLimits::default())
            .unwrap()
            .0,
        0
    );
    let b1 = luks1();
    let h1 = read(&b1, Some(b1.len() as u64 + MIB)).unwrap();
    assert_eq!(
        h1.unlock(&mut Cursor::new(&b1), PASS, None, &KdfLimits::default())
            .unwrap()
            .0,
        0
    );
}

#[test]
fn not_luks() {
    for bytes in [vec![], vec![0u8; 100], vec![0u8; 5 * HDR], b"LUKS".to_vec()] {
        let e = read(&bytes, None).unwrap_err();
        assert!(matches!(e, luks::Error::NotLuks), "{e}");
        assert_eq!(e.to_string(), "not a LUKS device");
        assert_eq!(volcrypt::error::ExitStatus::from(e.kind()).code(), 1);
    }
}

#[test]
fn luks2_checksum_rules() {
    let mut b = luks2();
    b[0x1C0] ^= 1;
    let h = read(&b, None).unwrap();
    assert_eq!(h.summary().header_copy.as_deref(), Some("secondary"));
    b[HDR + 0x1C0] ^= 1;
    assert_names(
        &err(&b, None),
        &[
            "LUKS2 header: checksum:",
            "primary copy",
            "secondary copy",
            "mismatch",
        ],
    );
    // Any JSON byte change without a new checksum is caught too.
    let mut b = luks2();
    b[4096 + 2] ^= 0x20;
    b[HDR + 4096 + 2] ^= 0x20;
    assert_names(&err(&b, None), &["checksum"]);
}

#[test]
fn luks2_higher_seqid_wins_either_way() {
    let token = json!({"type": "t", "keyslots": ["0"], "keep": {"me": [1, "two"]}});
    for winner in [0, HDR] {
        let mut b = luks2();
        let mut v = json_of(&b, winner);
        v["tokens"]["3"] = token.clone();
        put_json_text(&mut b, winner, &serde_json::to_vec(&v).unwrap());
        b[winner + 16..winner + 24].copy_from_slice(&7u64.to_be_bytes());
        fix_csum(&mut b, winner);
        let h = read(&b, None).unwrap();
        let s = h.summary();
        assert_eq!(s.seqid, Some(7));
        assert_eq!(
            s.header_copy.as_deref(),
            Some(if winner == 0 { "primary" } else { "secondary" })
        );
        assert_eq!(s.tokens.len(), 1);
        let Header::Luks2(h2) = h else { panic!() };
        assert_eq!(h2.meta.tokens[&3].raw, token, "tokens are kept intact");
    }
}

#[test]
fn luks2_binary_fields() {
    // hdr_offset must equal where the copy sits (both copies broken).
    let mut b = luks2();
    for at in [0, HDR] {
        b[at + 256..at + 264].copy_from_slice(&12345u64.to_be_bytes());
        fix_csum(&mut b, at);
    }
    assert_names(&err(&b, None), &["hdr_offset", "12345"]);
    let mut b = luks2();
    for at in [0, HDR] {
        b[at + 8..at + 16].copy_from_slice(&20000u64.to_be_bytes());
        fix_csum(&mut b, at);
    }
    assert_names(&err(&b, None), &["hdr_size", "20000", "power of two"]);
    let mut b = luks2();
    for at in [0, HDR] {
        b[at + 6] = 0;
        b[at + 7] = 3;
    }
    assert_names(&err(&b, None), &["version"]);
    let mut b = luks2();
    for at in [0, HDR] {
        b[at + 168..at + 208].fill(b'a');
        fix_csum(&mut b, at);
    }
    assert_names(&err(&b, None), &["uuid", "NUL"]);
}

#[test]
fn luks2_json_area_rules() {
    let mut b = luks2();
    let text = serde_json::to_vec(&json_of(&b, 0)).unwrap();
    let mut garbage = text.clone();
    garbage.extend_from_slice(b"\0\0x");
    for at in [0, HDR] {
        put_json_text(&mut b, at, &garbage);
    }
    assert_names(&err(&b, None), &["JSON area", "after the JSON"]);
    let mut b = luks2();
    for at in [0, HDR] {
        put_json_text(&mut b, at, &vec![b' '; HDR - 4096]);
    }
    assert_names(&err(&b, None), &["JSON area", "NUL-terminated"]);
    let mut b = luks2();
    for at in [0, HDR] {
        put_json_text(&mut b, at, b"{\"keyslots\": ");
    }
    assert_names(&err(&b, None), &["JSON area", "not valid JSON"]);
    let mut b = luks2();
    for at in [0, HDR] {
        put_json_text(&mut b, at, b"[1,2]");
    }
    assert_names(&err(&b, None), &["JSON area"]);
}

#[test]
fn luks2_required_objects() {
    for key in ["keyslots", "tokens", "segments", "digests", "config"] {
        let e = json_err(|v| {
            v.as_object_mut().unwrap().remove(key);
        });
        assert_names(&e, &[&format!("LUKS2 header: {key}: is missing")]);
        let e = json_err(|v| v[key] = json!([]));
        assert_names(&e, &[key, "not an object"]);
    }
}

#[test]
fn luks2_64_bit_strings() {
    let e = json_err(|v| v["segments"]["0"]["offset"] = json!("184467440737095516160"));
    assert_eq!(
        e,
        r#"LUKS2 header: segments.0.offset: "184467440737095516160" is not a 64-bit number"#
    );
    for bad in ["-1", "+5", "1e3", "", " 1", "0x10", "18446744073709551616"] {
        let e = json_err(|v| v["keyslots"]["0"]["area"]["offset"] = json!(bad));
        assert_names(&e, &["keyslots.0.area.offset", "is not a 64-bit number"]);
    }
    let e = json_err(|v| v["segments"]["0"]["iv_tweak"] = json!(0));
    assert_names(&e, &["segments.0.iv_tweak", "not a string"]);
    let e = json_err(|v| v["config"]["keyslots_size"] = json!("-4096"));
    assert_names(&e, &["config.keyslots_size", "not a 64-bit number"]);
}

#[test]
fn luks2_bad_json_types() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "keyslots.0.key_size",
            Box::new(|v| v["keyslots"]["0"]["key_size"] = json!("64")),
        ),
        (
            "keyslots.0.key_size",
            Box::new(|v| v["keyslots"]["0"]["key_size"] = json!(-64)),
        ),
        (
            "keyslots.0.type",
            Box::new(|v| v["keyslots"]["0"]["type"] = json!(2)),
        ),
        (
            "keyslots.0.kdf.iterations",
            Box::new(|v| v["keyslots"]["0"]["kdf"]["iterations"] = json!(1.5)),
        ),
        (
            "keyslots.0.area.type",
            Box::new(|v| v["keyslots"]["0"]["area"]["type"] = json!("none")),
        ),
        (
            "segments.0.sector_size",
            Box::new(|v| v["segments"]["0"]["sector_size"] = json!("4096")),
        ),
        (
            "digests.0.keyslots",
            Box::new(|v| v["digests"]["0"]["keyslots"] = json!("0")),
        ),
        (
            "config.flags",
            Box::new(|v| v["config"]["flags"] = json!("allow-discards")),
        ),
        (
            "config.requirements",
            Box::new(|v| v["config"]["requirements"] = json!(["x"])),
        ),
        (
            "keyslots",
            Box::new(|v| v["keyslots"]["zero"] = v["keyslots"]["0"].clone()),
        ),
        (
            "keyslots.32",
            Box::new(|v| v["keyslots"]["32"] = v["keyslots"]["0"].clone()),
        ),
        (
            "tokens",
            Box::new(|v| v["tokens"]["-1"] = json!({"type": "x", "keyslots": []})),
        ),
        (
            "tokens.0.keyslots",
            Box::new(|v| v["tokens"]["0"] = json!({"type": "x", "keyslots": ["5"]})),
        ),
        (
            "tokens.0.type",
            Box::new(|v| v["tokens"]["0"] = json!({"keyslots": []})),
        ),
    ];
    for (field, f) in cases {
        let e = json_err(f);
        assert_names(&e, &[&format!("LUKS2 header: {field}")]);
    }
}

/// Values cryptsetup's validation does not look at (it reads such headers): the header is
/// valid, and only the keyslot that needs the value is unusable, naming it.
#[test]
fn luks2_values_cryptsetup_accepts_make_only_the_keyslot_unusable() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "keyslots.0.kdf.salt",
            Box::new(|v| v["keyslots"]["0"]["kdf"]["salt"] = json!("!!notbase64")),
        ),
        (
            "keyslots.0.kdf.iterations",
            Box::new(|v| v["keyslots"]["0"]["kdf"]["iterations"] = json!(0)),
        ),
        (
            "keyslots.0.af.stripes",
            Box::new(|v| v["keyslots"]["0"]["af"]["stripes"] = json!(3999)),
        ),
        (
            "keyslots.0.area.size",
            Box::new(|v| v["keyslots"]["0"]["area"]["size"] = json!("4096")),
        ),
        (
            "keyslots.0.key_size",
            Box::new(|v| v["keyslots"]["0"]["key_size"] = json!(0)),
        ),
        (
            "digests.0.digest",
            Box::new(|v| v["digests"]["0"]["digest"] = json!("")),
        ),
        (
            "digests.0.type",
            Box::new(|v| v["digests"]["0"]["type"] = json!("argon2-digest")),
        ),
    ];
    for (field, f) in cases {
        let b = edited(f);
        let h = read(&b, None).unwrap_or_else(|e| panic!("{field}: refused: {e}"));
        let s = h.summary();
        assert!(!s.keyslots[0].usable, "{field}");
        assert_names(s.keyslots[0].note.as_deref().unwrap_or(""), &[field]);
        let e = h
            .unlock(&mut Cursor::new(&b), PASS, Some(0), &KdfLimits::default())
            .unwrap_err();
        assert_names(&e.to_string(), &["keyslot 0", field]);
    }
    // Priorities other than 0, 1, 2 read as normal.
    let h = read(&edited(|v| v["keyslots"]["0"]["priority"] = json!(3)), None).unwrap();
    assert_eq!(h.summary().keyslots[0].priority.as_deref(), Some("normal"));
}

#[test]
fn luks2_keyslot_areas() {
    let e = json_err(|v| {
        v["keyslots"]["1"] = v["keyslots"]["0"].clone();
        v["digests"]["0"]["keyslots"] = json!(["0", "1"]);
    });
    assert_names(&e, &["keyslots.1.area", "overlaps keyslots.0.area"]);
    let e = json_err(|v| v["keyslots"]["0"]["area"]["offset"] = json!("0"));
    assert_names(&e, &["keyslots.0.area", "outside the keyslots area"]);
    let e = json_err(|v| v["keyslots"]["0"]["area"]["offset"] = json!("16773120"));
    assert_names(&e, &["keyslots.0.area", "outside the keyslots area"]);
    let e = json_err(|v| v["keyslots"]["0"]["area"]["size"] = json!("0"));
    assert_names(&e, &["keyslots.0.area"]);
    let e = json_err(|v| v["config"]["json_size"] = json!("4096"));
    assert_names(&e, &["config.json_size", "hdr_size - 4096"]);
    let e = json_err(|v| v["config"]["keyslots_size"] = json!("1000"));
    assert_names(&e, &["config.keyslots_size", "multiple of 4096"]);
}

#[test]
fn luks2_segments() {
    let seg0 = |v: &Value| v["segments"]["0"].clone();
    let e = json_err(|v| {
        let mut s = seg0(v);
        s["offset"] = json!("33554432");
        v["segments"]["1"] = s;
        v["digests"]["0"]["segments"] = json!(["0", "1"]);
    });
    assert_names(
        &e,
        &[
            "segments.0.size",
            "\"dynamic\" is allowed for the last regular segment only",
        ],
    );
    let e = json_err(|v| {
        v["segments"]["0"]["size"] = json!("1048576");
        let mut s = seg0(v);
        s["offset"] = json!("512");
        s["size"] = json!("dynamic");
        v["segments"]["1"] = s;
        v["digests"]["0"]["segments"] = json!(["0", "1"]);
    });
    assert_names(&e, &["segments.1", "overlaps segments.0"]);
    let e = json_err(|v| {
        let s = seg0(v);
        v["segments"] = json!({ "1": s });
        v["digests"]["0"]["segments"] = json!(["1"]);
    });
    assert_names(&e, &["segments", "gap"]);
    for bad in [0, 256, 1000] {
        let e = json_err(|v| v["segments"]["0"]["sector_size"] = json!(bad));
        assert_names(
            &e,
            &["segments.0.sector_size", "not a positive multiple of 512"],
        );
    }
    // Valid for cryptsetup (it reads them), but neither dm-crypt nor volcrypt opens the data.
    for odd in [1536, 8192] {
        let h = read(
            &edited(|v| v["segments"]["0"]["sector_size"] = json!(odd)),
            None,
        )
        .unwrap();
        let e = h.check_activation_allowed().unwrap_err().to_string();
        assert_names(&e, &["segments.0.sector_size", &odd.to_string()]);
    }
    let e = json_err(|v| v["segments"]["0"]["size"] = json!("0"));
    assert_names(&e, &["segments.0.size", "is 0"]);
    // A size near 2^64 is valid (cryptsetup's validation test); it cannot fit a device.
    let h = read(
        &edited(|v| v["segments"]["0"]["size"] = json!((u64::MAX - 4095).to_string())),
        None,
    )
    .unwrap();
    assert_eq!(h.data_size(), Some(u64::MAX - 4095));
    // A segment type volcrypt does not know is valid; only opening the data is refused.
    let b = edited(|v| v["segments"]["0"]["type"] = json!("some_type"));
    let h = read(&b, None).unwrap();
    assert_names(
        h.summary().no_data_segment.as_deref().unwrap(),
        &["segments.0", "some_type"],
    );
    for e in [
        h.check_activation_allowed().unwrap_err(),
        h.unlock(&mut Cursor::new(&b), PASS, None, &KdfLimits::default())
            .unwrap_err(),
    ] {
        assert_names(&e.to_string(), &["some_type", "crypt"]);
    }
    let e = json_err(|v| v["segments"]["0"]["flags"] = json!(["backup-previous"]));
    assert_names(&e, &["segments", "no regular segment"]);
    let e = json_err(|v| v["segments"]["0"]["offset"] = json!("1000"));
    assert_names(&e, &["segments.0.offset", "multiple of 512"]);
    let e = json_err(|v| v["segments"]["0"]["size"] = json!("1536"));
    assert_names(&e, &["segments.0.size", "multiple of the sector size 4096"]);
    let e = json_err(|v| {
        v["segments"]["0"]
            .as_object_mut()
            .unwrap()
            .remove("encryption");
    });
    assert_names(&e, &["segments.0.encryption: is missing"]);
}

#[test]
fn luks2_digest_bindings() {
    let e = json_err(|v| v["digests"]["0"]["keyslots"] = json!(["0", "7"]));
    assert_names(&e, &["digests.0.keyslots", "keyslot 7 does not exist"]);
    let e = json_err(|v| v["digests"]["0"]["segments"] = json!(["0", "4"]));
    assert_names(&e, &["digests.0.segments", "segment 4 does not exist"]);
    let e = json_err(|v| v["digests"]["0"]["keyslots"] = json!([]));
    assert_names(&e, &["keyslots.0", "not assigned to any digest"]);
    let e = json_err(|v| v["digests"]["0"]["segments"] = json!([]));
    assert_names(&e, &["segments.0", "not assigned to any digest"]);
    let e = json_err(|v| v["digests"]["1"] = v["digests"]["0"].clone());
    assert_names(&e, &["keyslots.0", "2 digests"]);
}

#[test]
fn luks2_device_size_checks() {
    // cryptsetup reads these headers (luksDump) and refuses to open their data: so does
    // volcrypt, at check_activation_allowed (decrypt, attach), not when reading.
    let c = luks::create(&params(2, false), PASS, &KdfLimits::default()).unwrap();
    let b = c.header.to_vec();
    let fits = read(&b, Some(16 * MIB + 4096)).unwrap();
    assert!(fits.check_activation_allowed().is_ok());
    let short = read(&b, Some(8 * MIB)).unwrap();
    assert_names(
        &short.check_activation_allowed().unwrap_err().to_string(),
        &["segments.0.offset", "beyond the device end"],
    );
    // A detached-layout header (data offset 0) on the data device itself is refused.
    let d = luks2();
    let on_device = read(&d, Some(32 * MIB)).unwrap();
    assert_names(
        &on_device
            .check_activation_allowed()
            .unwrap_err()
            .to_string(),
        &["segments.0.offset", "detached"],
    );
    assert!(read(&d, None).unwrap().check_activation_allowed().is_ok());
}

#[test]
fn luks2_requirements_block_activation_but_not_inspect_or_check_key() {
    let b =
        edited(|v| v["config"]["requirements"] = json!({"mandatory": ["volcrypt-future-thing"]}));
    let h = read(&b, None).unwrap();
    assert_eq!(h.summary().requirements, ["volcrypt-future-thing"]);
    let e = h.check_activation_allowed().unwrap_err();
    assert_names(
        &e.to_string(),
        &[
            "volcrypt-future-thing",
            "config.requirements.mandatory",
            "refusing",
        ],
    );
    assert_eq!(volcrypt::error::ExitStatus::from(e.kind()).code(), 1);
    assert!(
        h.unlock(&mut Cursor::new(&b), PASS, None, &KdfLimits::default())
            .is_ok()
    );
    assert!(
        read(&luks2(), None)
            .unwrap()
            .check_activation_allowed()
            .is_ok()
    );
}

#[test]
fn luks2_unknown_kdf_makes_only_that_keyslot_unusable() {
    let b = edited(|v| v["keyslots"]["0"]["kdf"]["type"] = json!("scrypt"));
    let h = read(&b, None).unwrap();
    let s = h.summary();
    assert!(!s.keyslots[0].usable);
    assert!(s.keyslots[0].note.as_deref().unwrap().contains("scrypt"));
    // With no other keyslot, the refusal says why instead of "wrong passphrase".
    let e = h
        .unlock(&mut Cursor::new(&b), PASS, None, &KdfLimits::default())
        .unwrap_err();
    assert!(matches!(e, luks::Error::Keyslot { slot: 0, .. }), "{e}");
    assert_names(&e.to_string(), &["scrypt", "no keyslot is usable"]);
    let e = h
        .unlock(&mut Cursor::new(&b), PASS, Some(0), &KdfLimits::default())
        .unwrap_err();
    assert_names(
        &e.to_string(),
        &["keyslot 0", "unsupported KDF type \"scrypt\""],
    );
}

#[test]
fn kdf_limits_are_enforced_with_exit_3() {
    let b = luks2();
    let h = read(&b, None).unwrap();
    let limits = KdfLimits {
        max_pbkdf2_iterations: 999,
        ..KdfLimits::default()
    };
    let e = h
        .unlock(&mut Cursor::new(&b), PASS, None, &limits)
        .unwrap_err();
    assert_eq!(volcrypt::error::ExitStatus::from(e.kind()).code(), 3, "{e}");
    let b1 = luks1();
    let h1 = read(&b1, None).unwrap();
    let e = h1
        .unlock(&mut Cursor::new(&b1), PASS, None, &limits)
        .unwrap_err();
    assert_eq!(volcrypt::error::ExitStatus::from(e.kind()).code(), 3, "{e}");
}

#[test]
fn truncated_headers_are_errors() {
    let b = luks2();
    for len in [4096, 4097, 10000, HDR - 1] {
        assert!(
            read(&b[..len], None).is_err(),
            "truncated at {len} accepted"
        );
    }
    // A truncated secondary copy does not matter while the primary is intact.
    assert!(read(&b[..HDR + 100], None).is_ok());
    let b = luks2();
    let h = read(&b[..40000], None).unwrap();
    let e = h
        .unlock(
            &mut Cursor::new(&b[..40000]),
            PASS,
            None,
            &KdfLimits::default(),
        )
        .unwrap_err();
    assert_names(
        &e.to_string(),
        &["keyslots.0.area", "beyond the end of the file"],
    );
    let b1 = luks1();
    assert_names(
        &err(&b1[..300], None),
        &["LUKS1 header: header", "truncated"],
    );
}

// ---------------------------------------------------------------- LUKS1

fn set32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn slot_off(i: usize) -> usize {
    208 + i * 48
}

fn luks1_err(f: impl Fn(&mut Vec<u8>), device: Option<u64>) -> String {
    let mut b = luks1();
    f(&mut b);
    err(&b, device)
}

#[test]
fn luks1_rules() {
    let dev = Some(4 * MIB);
    assert_names(
        &luks1_err(|b| set32(b, slot_off(3) + 44, 3999), dev),
        &["LUKS1 header: key_slot_3.stripes", "3999 is not 4000"],
    );
    assert_names(
        &luks1_err(|b| set32(b, slot_off(0) + 40, 1), dev),
        &[
            "key_slot_0.key_material_offset",
            "overlaps the 592-byte header",
        ],
    );
    assert_names(
        &luks1_err(|b| set32(b, slot_off(1) + 40, 18), dev),
        &["key_material_offset", "overlaps key_slot_"],
    );
    assert_names(
        &luks1_err(|b| set32(b, 104, 600), dev),
        &["key_slot_", "overlaps the payload"],
    );
    assert_names(
        &luks1_err(|_| {}, Some(MIB)),
        &["payload_offset", "beyond the device end"],
    );
    assert_names(
        &luks1_err(|b| set32(b, 104, 0), dev),
        &["payload_offset", "detached"],
    );
    assert_names(
        &luks1_err(|b| b[8..40].fill(b'a'), dev),
        &["cipher_name", "NUL-terminated"],
    );
    assert_names(
        &luks1_err(|b| b[72..104].fill(b'a'), dev),
        &["hash_spec", "NUL-terminated"],
    );
    assert_names(
        &luks1_err(|b| b[72..80].copy_from_slice(b"whirl\0\0\0"), dev),
        &["hash_spec", "whirl"],
    );
    assert_names(&luks1_err(|b| set32(b, 108, 0), dev), &["key_bytes", "0"]);
    assert_names(&luks1_err(|b| set32(b, 108, 33), dev), &["key_bytes"]);
    assert_names(
        &luks1_err(|b| set32(b, 108, 4_000_000), dev),
        &["key_bytes"],
    );
    assert_names(
        &luks1_err(|b| set32(b, slot_off(2), 0x1234), dev),
        &["key_slot_2.active", "0x00001234"],
    );
    assert_names(
        &luks1_err(|b| set32(b, slot_off(0) + 4, 0), dev),
        &["key_slot_0.iterations"],
    );
    assert_names(
        &luks1_err(|b| set32(b, 164, 0), dev),
        &["mk_digest_iterations"],
    );
    assert_names(
        &luks1_err(|b| b[168..172].copy_from_slice(b"zz\0\0"), dev),
        &["uuid"],
    );
    assert_names(&luks1_err(|b| b[7] = 7, dev), &["version", "7"]);
    // Keyslot areas must lie inside the file holding the header.
    let b = luks1();
    assert_names(
        &err(&b[..MIB as usize], None),
        &["key_material_offset", "beyond the end"],
    );
    // Detached LUKS1 headers (payload offset 0) are fine without a device.
    let c = luks::create(&params(1, true), PASS, &KdfLimits::default()).unwrap();
    let h = read(&c.header, None).unwrap();
    assert_eq!(h.data_offset(), 0);
}

#[test]
fn luks1_old_v1_0_layout_with_material_at_sector_2() {
    let mut b = luks1();
    let start = 8 * 512;
    let len = 500 * 512;
    let material = b[start..start + len].to_vec();
    b[2 * 512..2 * 512 + len].copy_from_slice(&material);
    set32(&mut b, slot_off(0) + 40, 2);
    let h = read(&b, Some(4 * MIB)).unwrap();
    assert_eq!(h.summary().keyslots[0].area_offset, 1024);
    let (slot, key) = h
        .unlock(&mut Cursor::new(&b), PASS, None, &KdfLimits::default())
        .unwrap();
    assert_eq!((slot, key.len()), (0, 64));
    assert!(matches!(
        h.unlock(&mut Cursor::new(&b), b"nope", None, &KdfLimits::default()),
        Err(luks::Error::NoKey)
    ));
}

/// Headers whose cipher the userspace engine cannot run (serpent here) read and inspect like
/// cryptsetup's luksDump shows them; only unlocking or decrypting needs the cipher, and the
/// error names it.
#[test]
fn ciphers_the_engine_cannot_run_still_inspect_and_name_themselves_on_use() {
    let spec = "serpent-xts-plain64";
    let b = edited(|v| {
        v["segments"]["0"]["encryption"] = json!(spec);
        v["keyslots"]["0"]["area"]["encryption"] = json!(spec);
    });
    let h = read(&b, None).unwrap();
    assert_eq!(h.summary().cipher.as_deref(), Some(spec));
    assert_names(&h.cipher().unwrap_err().to_string(), &[spec]);
    let e = h
        .unlock(&mut Cursor::new(&b), PASS, Some(0), &KdfLimits::default())
        .unwrap_err();
    assert_names(&e.to_string(), &[spec]);

    // LUKS1: the cipher name is a fixed 32-byte field at offset 8; no checksum to fix.
    let mut b = luks1();
    b[8..40].fill(0);
    b[8..15].copy_from_slice(b"serpent");
    let h = read(&b, None).unwrap();
    let s = h.summary();
    assert_eq!(s.cipher.as_deref(), Some(spec));
    assert_eq!(s.keyslots[0].area_encryption.as_deref(), Some(spec));
    assert_names(&h.cipher().unwrap_err().to_string(), &[spec]);
    let e = h
        .unlock(&mut Cursor::new(&b), PASS, None, &KdfLimits::default())
        .unwrap_err();
    assert_names(&e.to_string(), &[spec]);
    // The engine's own cipher still resolves.
    assert!(read(&luks1(), None).unwrap().cipher().is_ok());
}
