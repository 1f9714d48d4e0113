//! `volcrypt image inspect` accepts exactly the LUKS2 headers the real cryptsetup accepts.
//!
//! A header made by `cryptsetup luksFormat` is edited (one rule of cryptsetup's LUKS2
//! validation at a time, the cases of its `tests/luks2-validation-test` and more), both copies
//! re-checksummed, and then judged twice: by `cryptsetup luksDump` and by
//! `volcrypt image inspect`. The two verdicts must agree, and agree with the expected one
//! written next to each case (so a change in either tool is noticed). Operations volcrypt
//! cannot do on an accepted header (unlock, decrypt) are refused with a reason, never by
//! refusing the header.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use volcrypt::crypto::HashAlg;

const HDR: usize = 16384;
const MIB: u64 = 1024 * 1024;
const PASS: &[u8] = b"verdicts";

/// A LUKS2 image made by cryptsetup: 16 KiB metadata, 1 MiB keyslots area, data at 2 MiB,
/// 4 MiB in all. Returns its first 2 MiB (everything but the data).
fn base(dir: &Path) -> Vec<u8> {
    let path = dir.join("base.img");
    fs::File::create(&path).unwrap().set_len(4 * MIB).unwrap();
    let mut child = Command::new("cryptsetup")
        .args(["luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2"])
        .args([
            "--pbkdf-force-iterations",
            "1000",
            "--luks2-keyslots-size",
            "1M",
        ])
        .args(["--offset", "4096", "--key-file", "-"])
        .arg(&path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("cryptsetup is installed (scripts/install-deps.sh)");
    child.stdin.take().unwrap().write_all(PASS).unwrap();
    assert!(child.wait().unwrap().success(), "cryptsetup luksFormat");
    let mut b = fs::read(&path).unwrap();
    b.truncate(2 * MIB as usize);
    b
}

fn json_of(b: &[u8]) -> Value {
    let area = &b[4096..HDR];
    let end = area.iter().position(|&c| c == 0).unwrap();
    serde_json::from_slice(&area[..end]).unwrap()
}

/// Writes `v` as the JSON of both copies, with their checksums, into a 4 MiB image.
fn write_case(dir: &Path, name: &str, base: &[u8], v: &Value) -> PathBuf {
    let mut b = base.to_vec();
    let text = serde_json::to_vec(v).unwrap();
    assert!(text.len() < HDR - 4096, "{name}: JSON too long");
    for at in [0, HDR] {
        b[at + 4096..at + HDR].fill(0);
        b[at + 4096..at + 4096 + text.len()].copy_from_slice(&text);
        b[at + 0x1C0..at + 0x200].fill(0);
        let sum = HashAlg::Sha256.digest(&[&b[at..at + HDR]]);
        b[at + 0x1C0..at + 0x1C0 + 32].copy_from_slice(&sum);
    }
    let path = dir.join(format!("{name}.img"));
    fs::write(&path, &b).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    path
}

fn volcrypt(args: &[&str], path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_volcrypt"))
        .args(args)
        .arg(path)
        .output()
        .unwrap()
}

type Edit = fn(&mut Value);

/// (name, does cryptsetup 2.6 accept it, the edit).
fn cases() -> Vec<(&'static str, bool, Edit)> {
    fn seg(v: &mut Value) -> &mut Value {
        &mut v["segments"]["0"]
    }
    fn ks(v: &mut Value) -> &mut Value {
        &mut v["keyslots"]["0"]
    }
    fn offset(v: &Value) -> u64 {
        v["segments"]["0"]["offset"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }
    vec![
        ("unchanged", true, |_| {}),
        // Segments: cryptsetup's validation-test cases and the rules behind them.
        ("segment of an unknown type", true, |v| {
            let s = seg(v).clone();
            v["segments"]["0"] = json!({"type": "some_type", "offset": s["offset"], "size": s["size"], "a_field": 0});
        }),
        ("two segments, the second of an unknown type", true, |v| {
            let next = (offset(v) + 4096).to_string();
            seg(v)["size"] = json!("4096");
            v["segments"]["1"] = json!({"type": "some", "offset": next, "size": "dynamic"});
        }),
        ("segment size 2^64 - 4096", true, |v| {
            seg(v)["size"] = json!((u64::MAX - 4095).to_string())
        }),
        ("segment size 2^64 - 512, 512-byte sectors", true, |v| {
            seg(v)["sector_size"] = json!(512);
            seg(v)["size"] = json!((u64::MAX - 511).to_string());
        }),
        ("segment size 2^64 (overflow)", false, |v| {
            seg(v)["size"] = json!("18446744073709551616")
        }),
        ("segment size negative", false, |v| {
            seg(v)["size"] = json!("-512")
        }),
        ("segment size 0", false, |v| seg(v)["size"] = json!("0")),
        ("segment size with a leading zero", true, |v| {
            seg(v)["size"] = json!("04096")
        }),
        ("segment size with a plus sign", false, |v| {
            seg(v)["size"] = json!("+4096")
        }),
        ("segment size a JSON number", false, |v| {
            seg(v)["size"] = json!(4096)
        }),
        (
            "segment size not a multiple of the sector size",
            false,
            |v| seg(v)["size"] = json!("512"),
        ),
        ("segment offset unaligned", false, |v| {
            seg(v)["offset"] = json!("2097153")
        }),
        ("segment offset 0 on the data device", true, |v| {
            seg(v)["offset"] = json!("0")
        }),
        ("segment offset inside the keyslots area", false, |v| {
            seg(v)["offset"] = json!("4096")
        }),
        ("segment type missing", false, |v| {
            seg(v).as_object_mut().unwrap().remove("type");
        }),
        ("segment type a number", false, |v| {
            seg(v)["type"] = json!(1)
        }),
        ("crypt segment without encryption", false, |v| {
            seg(v).as_object_mut().unwrap().remove("encryption");
        }),
        ("crypt segment with empty encryption", false, |v| {
            seg(v)["encryption"] = json!("")
        }),
        ("crypt segment with a cipher volcrypt lacks", true, |v| {
            seg(v)["encryption"] = json!("serpent-xts-plain64")
        }),
        ("crypt segment with a garbage cipher", true, |v| {
            seg(v)["encryption"] = json!("!!")
        }),
        ("iv_tweak negative", false, |v| {
            seg(v)["iv_tweak"] = json!("-1")
        }),
        ("iv_tweak 2^64 - 1", true, |v| {
            seg(v)["iv_tweak"] = json!(u64::MAX.to_string())
        }),
        ("iv_tweak missing", false, |v| {
            seg(v).as_object_mut().unwrap().remove("iv_tweak");
        }),
        ("sector size 1024", true, |v| {
            seg(v)["sector_size"] = json!(1024)
        }),
        ("sector size 1536", true, |v| {
            seg(v)["sector_size"] = json!(1536)
        }),
        ("sector size 8192", true, |v| {
            seg(v)["sector_size"] = json!(8192)
        }),
        ("sector size 0", false, |v| seg(v)["sector_size"] = json!(0)),
        ("sector size 256", false, |v| {
            seg(v)["sector_size"] = json!(256)
        }),
        ("sector size above 32 bits", false, |v| {
            seg(v)["sector_size"] = json!(1u64 << 32)
        }),
        ("sector size a string", false, |v| {
            seg(v)["sector_size"] = json!("4096")
        }),
        ("segment flags", true, |v| {
            seg(v)["flags"] = json!(["x", "y"])
        }),
        ("a hundred segment flags", true, |v| {
            seg(v)["flags"] = json!((0..100).map(|i| format!("f{i}")).collect::<Vec<_>>());
        }),
        ("segment flags not strings", false, |v| {
            seg(v)["flags"] = json!([1])
        }),
        ("segment flags not an array", false, |v| {
            seg(v)["flags"] = json!("x")
        }),
        ("integrity without its fields", false, |v| {
            seg(v)["integrity"] = json!({})
        }),
        ("integrity with its fields", true, |v| {
            seg(v)["integrity"] = json!({"type": "hmac(sha256)", "journal_encryption": "none", "journal_integrity": "none"});
        }),
        ("only a backup segment", false, |v| {
            seg(v)["flags"] = json!(["backup-previous"])
        }),
        ("a backup segment after the data", true, |v| {
            let mut b = seg(v).clone();
            b["flags"] = json!(["backup-final"]);
            v["segments"]["1"] = b;
            v["digests"]["0"]["segments"] = json!(["0", "1"]);
        }),
        ("a regular segment after a backup", false, |v| {
            let s = seg(v).clone();
            let mut b = s.clone();
            b["flags"] = json!(["backup-final"]);
            v["segments"]["0"] = b;
            v["segments"]["1"] = s;
            v["digests"]["0"]["segments"] = json!(["0", "1"]);
        }),
        ("a gap in segment keys", false, |v| {
            v["segments"]["2"] = json!({"type": "x", "offset": "0", "size": "512"})
        }),
        ("segment key 40 alone", false, |v| {
            let s = seg(v).clone();
            v["segments"] = json!({"40": s});
            v["digests"]["0"]["segments"] = json!(["40"]);
        }),
        ("two dynamic segments", false, |v| {
            let next = (offset(v) + 4096).to_string();
            v["segments"]["1"] = json!({"type": "x", "offset": next, "size": "dynamic"});
        }),
        ("overlapping segments", false, |v| {
            let next = (offset(v) + 512).to_string();
            seg(v)["size"] = json!("4096");
            v["segments"]["1"] = json!({"type": "x", "offset": next, "size": "512"});
        }),
        ("a crypt segment without a digest", false, |v| {
            let next = (offset(v) + 4096).to_string();
            seg(v)["size"] = json!("4096");
            let mut s = seg(v).clone();
            s["offset"] = json!(next);
            v["segments"]["1"] = s;
        }),
        ("no segments", false, |v| v["segments"] = json!({})),
        // Digests: cryptsetup checks the type and the references only.
        ("digest of an unknown type", true, |v| {
            v["digests"]["0"]["type"] = json!("foo")
        }),
        ("digest of an unknown type, no parameters", true, |v| {
            v["digests"]["0"] = json!({"type": "foo", "keyslots": ["0"], "segments": ["0"]});
        }),
        ("digest listing a segment twice", true, |v| {
            v["digests"]["0"]["segments"] = json!(["0", "0"])
        }),
        ("digest listing a keyslot twice", true, |v| {
            v["digests"]["0"]["keyslots"] = json!(["0", "0"])
        }),
        ("digest of no segment", false, |v| {
            v["digests"]["0"]["segments"] = json!([])
        }),
        ("digest key 9", true, |v| {
            let d = v["digests"]["0"].clone();
            v["digests"] = json!({"9": d});
        }),
        ("a keyslot in two digests", false, |v| {
            v["digests"]["1"] = v["digests"]["0"].clone()
        }),
        ("digest iterations 0", true, |v| {
            v["digests"]["0"]["iterations"] = json!(0)
        }),
        ("digest value empty", true, |v| {
            v["digests"]["0"]["digest"] = json!("")
        }),
        ("digest salt not base64", true, |v| {
            v["digests"]["0"]["salt"] = json!("!!")
        }),
        ("digest hash unknown", true, |v| {
            v["digests"]["0"]["hash"] = json!("md4")
        }),
        ("digest of a missing keyslot", false, |v| {
            v["digests"]["0"]["keyslots"] = json!(["0", "7"])
        }),
        ("digest of a missing segment", false, |v| {
            v["digests"]["0"]["segments"] = json!(["0", "7"])
        }),
        // Keyslots.
        ("keyslot key 40", true, |v| {
            let k = ks(v).clone();
            v["keyslots"] = json!({"40": k});
            v["digests"]["0"]["keyslots"] = json!(["40"]);
        }),
        ("keyslot key with a leading zero", false, |v| {
            let k = ks(v).clone();
            v["keyslots"] = json!({"00": k});
            v["digests"]["0"]["keyslots"] = json!(["00"]);
        }),
        ("keyslot of an unknown type", true, |v| {
            ks(v)["type"] = json!("foo")
        }),
        ("keyslot in no digest", false, |v| {
            v["digests"]["0"]["keyslots"] = json!([])
        }),
        ("keyslot KDF of an unknown type", true, |v| {
            ks(v)["kdf"] = json!({"type": "scrypt", "salt": "AA=="})
        }),
        ("keyslot with 1 AF stripe", true, |v| {
            ks(v)["af"]["stripes"] = json!(1)
        }),
        ("keyslot priority 3", true, |v| ks(v)["priority"] = json!(3)),
        ("keyslot priority -1", true, |v| {
            ks(v)["priority"] = json!(-1)
        }),
        ("keyslot key size 0", true, |v| ks(v)["key_size"] = json!(0)),
        ("keyslot key size a string", false, |v| {
            ks(v)["key_size"] = json!("64")
        }),
        ("keyslot area too small for its material", true, |v| {
            ks(v)["area"]["size"] = json!("4096")
        }),
        ("keyslot area of another type", false, |v| {
            ks(v)["area"]["type"] = json!("checksum")
        }),
        ("keyslot area encryption empty", false, |v| {
            ks(v)["area"]["encryption"] = json!("")
        }),
        ("keyslot area key size 0", true, |v| {
            ks(v)["area"]["key_size"] = json!(0)
        }),
        ("keyslot area beyond the keyslots area", false, |v| {
            ks(v)["area"]["offset"] = json!("2097152")
        }),
        ("keyslot area in the header", false, |v| {
            ks(v)["area"]["offset"] = json!("16384")
        }),
        ("keyslot area size 0", false, |v| {
            ks(v)["area"]["size"] = json!("0")
        }),
        ("keyslot AF of another type", false, |v| {
            ks(v)["af"]["type"] = json!("luks2")
        }),
        ("keyslot AF missing", false, |v| {
            ks(v).as_object_mut().unwrap().remove("af");
        }),
        ("keyslot AF hash unknown", true, |v| {
            ks(v)["af"]["hash"] = json!("md4")
        }),
        ("keyslot KDF missing", false, |v| {
            ks(v).as_object_mut().unwrap().remove("kdf");
        }),
        ("pbkdf2 iterations 0", true, |v| {
            ks(v)["kdf"]["iterations"] = json!(0)
        }),
        ("pbkdf2 without a hash", false, |v| {
            ks(v)["kdf"].as_object_mut().unwrap().remove("hash");
        }),
        ("KDF salt not base64", true, |v| {
            ks(v)["kdf"]["salt"] = json!("!!!")
        }),
        ("argon2id without memory", false, |v| {
            ks(v)["kdf"] = json!({"type": "argon2id", "time": 4, "cpus": 1, "salt": "AAAA"});
        }),
        ("argon2id memory 0", true, |v| {
            ks(v)["kdf"] =
                json!({"type": "argon2id", "time": 4, "memory": 0, "cpus": 1, "salt": "AAAA"});
        }),
        ("unknown keyslot without an area", false, |v| {
            v["keyslots"]["1"] = json!({"type": "foo", "key_size": 1})
        }),
        ("unknown keyslot with an area", true, |v| {
            v["keyslots"]["1"] = json!({"type": "foo", "key_size": 1, "area": {"type": "none", "offset": "1044480", "size": "4096"}});
        }),
        // Tokens and config.
        ("token of an unknown type", true, |v| {
            v["tokens"]["0"] = json!({"type": "x", "keyslots": []})
        }),
        ("token key 40", true, |v| {
            v["tokens"]["40"] = json!({"type": "x", "keyslots": ["0"]})
        }),
        ("token without keyslots", false, |v| {
            v["tokens"]["0"] = json!({"type": "x"})
        }),
        ("token of a missing keyslot", false, |v| {
            v["tokens"]["0"] = json!({"type": "x", "keyslots": ["5"]})
        }),
        ("token keyslot a number", false, |v| {
            v["tokens"]["0"] = json!({"type": "x", "keyslots": [0]})
        }),
        ("a hundred config flags", true, |v| {
            v["config"]["flags"] = json!((0..100).map(|i| format!("f{i}")).collect::<Vec<_>>());
        }),
        ("an unknown mandatory requirement", true, |v| {
            v["config"]["requirements"] = json!({"mandatory": ["foo"]})
        }),
        ("requirements not an object", false, |v| {
            v["config"]["requirements"] = json!([])
        }),
        ("json_size not the area's", false, |v| {
            v["config"]["json_size"] = json!("8192")
        }),
        ("keyslots_size unaligned", false, |v| {
            v["config"]["keyslots_size"] = json!("1044481")
        }),
        ("keyslots_size past the data", false, |v| {
            v["config"]["keyslots_size"] = json!("2097152")
        }),
        ("keyslots_size above 128 MiB", false, |v| {
            v["config"]["keyslots_size"] = json!("134221824")
        }),
        ("an unknown top-level member", true, |v| {
            v["extra"] = json!(1)
        }),
    ]
}

#[test]
fn inspect_accepts_exactly_what_cryptsetup_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let original = json_of(&base);
    let mut wrong = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for (i, (name, expected, edit)) in cases().into_iter().enumerate() {
        let mut v = original.clone();
        edit(&mut v);
        let path = write_case(dir.path(), &format!("case{i}"), &base, &v);
        let cryptsetup = Command::new("cryptsetup")
            .arg("luksDump")
            .arg(&path)
            .output()
            .unwrap()
            .status
            .success();
        let out = volcrypt(&["image", "inspect"], &path);
        let ours = out.status.success();
        if ours {
            accepted += 1;
        } else {
            refused += 1;
        }
        if cryptsetup != expected || ours != expected {
            wrong.push(format!(
                "{name}: expected {}, cryptsetup {}, volcrypt {} {}",
                verdict(expected),
                verdict(cryptsetup),
                verdict(ours),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if !ours {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("LUKS2") && !err.contains("panicked"),
                "{name}: refusal does not name the header rule: {err}"
            );
        }
    }
    assert!(wrong.is_empty(), "verdicts differ:\n{}", wrong.join("\n"));
    assert!(
        accepted > 20 && refused > 20,
        "{accepted} accepted, {refused} refused"
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok { "accept" } else { "refuse" }
}

/// A header cryptsetup accepts but whose data volcrypt cannot open: inspect shows it, while
/// check-key and decrypt refuse with the reason (exit 1 or 2 like cryptsetup, no panic).
#[test]
fn accepted_headers_volcrypt_cannot_open_refuse_only_the_operation() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let key = dir.path().join("key");
    fs::write(&key, PASS).unwrap();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "unknown segment type",
            |v| {
                let s = v["segments"]["0"].clone();
                v["segments"]["0"] =
                    json!({"type": "some_type", "offset": s["offset"], "size": s["size"]});
            },
            "some_type",
        ),
        (
            "sector size 1536",
            |v| v["segments"]["0"]["sector_size"] = json!(1536),
            "sector_size 1536",
        ),
        (
            "segment size near 2^64",
            |v| v["segments"]["0"]["size"] = json!((u64::MAX - 4095).to_string()),
            "beyond the device end",
        ),
        (
            "data at offset 0",
            |v| v["segments"]["0"]["offset"] = json!("0"),
            "detached-header",
        ),
        (
            "unknown digest type",
            |v| v["digests"]["0"]["type"] = json!("foo"),
            "foo",
        ),
    ];
    for (name, edit, reason) in cases {
        let mut v = json_of(&base);
        edit(&mut v);
        let path = write_case(dir.path(), name.replace(' ', "-").as_str(), &base, &v);
        let inspect = volcrypt(&["image", "inspect"], &path);
        assert!(
            inspect.status.success(),
            "{name}: inspect refused: {}",
            String::from_utf8_lossy(&inspect.stderr)
        );
        let json_out = volcrypt(&["image", "inspect", "--json"], &path);
        assert!(json_out.status.success(), "{name}: inspect --json");
        serde_json::from_slice::<Value>(&json_out.stdout).expect("inspect --json prints JSON");
        let out_file = dir.path().join("plain.out");
        let decrypt = Command::new(env!("CARGO_BIN_EXE_volcrypt"))
            .args(["image", "decrypt", "--key-file"])
            .arg(&key)
            .arg("--output")
            .arg(&out_file)
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&decrypt.stderr);
        assert!(!decrypt.status.success(), "{name}: decrypt succeeded");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(
            err.contains(reason),
            "{name}: decrypt error does not say why ({reason}): {err}"
        );
        assert!(!out_file.exists(), "{name}: decrypt left an output file");
    }
}
