//! Interop with OpenStack's os-brick itself: volumes os-brick's encryptors format open with
//! volcrypt, and volumes volcrypt formats open with os-brick, against a real kernel.
//!
//! os-brick runs from PyPI in a virtualenv (`scripts/osbrick-venv.sh`, pinned version), driven
//! by `tests/vm/osbrick_driver.py` through its real encryptor classes (`LuksEncryptor`,
//! `Luks2Encryptor`, `CryptsetupEncryptor`, chosen by `get_volume_encryptor` from the provider
//! as Nova does) with a castellan-like key, so os-brick's own passphrase rule decides what
//! cryptsetup gets. `tests/vm/attach-suite.sh` makes the venv and passes its path in
//! `VOLCRYPT_OSBRICK_VENV`; without it (or with an os-brick that does not import) every test
//! here fails — the reference implementation missing is never a pass.
//!
//! For each provider (luks, luks2, plain) and secret (a passphrase ending in a newline, a
//! passphrase with non-ASCII UTF-8, a 32-byte symmetric key), both directions:
//! os-brick formats/attaches, writes, detaches → volcrypt attaches with the same secret from its
//! keystore; and volcrypt formats/attaches, writes, detaches → os-brick attaches. Each time the
//! mapping name, the dm UUID and the dm table (the key field compared as a SHA-256, never
//! printed) must be the same for both openers, and the data written by one is read by the
//! other.
//!
//! Differences from volcrypt found on the way (asserted, so a change shows up here):
//! - os-brick leaves the `device_path` link pointing at `/dev/mapper/<mapping>` after detach
//!   (Nova's connector removes the link); volcrypt points it back at the device. The tests
//!   re-point it before the next opener, as a new connection would.
//! - os-brick decodes a `passphrase` secret as UTF-8: a payload that is not valid UTF-8 fails in
//!   os-brick (`UnicodeDecodeError`) before cryptsetup runs, while volcrypt uses the bytes as
//!   they are (`passphrase_that_is_not_utf8_fails_in_os_brick_and_opens_with_volcrypt`).
//! - luksFormat in os-brick uses cryptsetup's benchmarked PBKDF; the driver pins a cheap one
//!   (the VM emulates its CPU), so the KDF cost is the only part of the header not os-brick's.
#![cfg(feature = "system")]

mod common;

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{Value, json};
use volcrypt::keys::{Keystore, Secret};
use volcrypt::request::AttachRequest;
use volcrypt::secret::{SecretBytes, SecretType};
use volcrypt::volume::{self, Context, PbkdfConfig, VolumeConfig};

use common::{hex, need, pattern, sh};

/// One test secret: keystore id, type, payload.
struct TestSecret {
    id: &'static str,
    kind: SecretType,
    payload: Vec<u8>,
}

/// The secrets of the matrix: the two passphrase shapes os-brick passes through untouched
/// (a trailing newline cryptsetup must not strip: both sides use `--key-file=-`; non-ASCII
/// UTF-8), and a Cinder-style symmetric key that both sides hexlify.
fn secrets() -> Vec<TestSecret> {
    vec![
        TestSecret {
            id: "pass-newline",
            kind: SecretType::Passphrase,
            payload: b"correct horse battery\n".to_vec(),
        },
        TestSecret {
            id: "pass-utf8",
            kind: SecretType::Passphrase,
            payload: "Grüße, ключ 鍵 ✓".as_bytes().to_vec(),
        },
        TestSecret {
            id: "sym-32",
            kind: SecretType::Symmetric,
            payload: (0u8..32).map(|b| b.wrapping_mul(7) ^ 0x5c).collect(),
        },
    ]
}

/// A keystore holding `secrets` (plus `extra`), in a directory removed at the end.
fn keystore(extra: &[TestSecret]) -> (Keystore, tempfile::TempDir) {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let ks = Keystore::create(dir.path().join("keys")).unwrap();
    for s in secrets().iter().chain(extra) {
        ks.put(
            s.id,
            &Secret::new(s.kind.clone(), SecretBytes::new(s.payload.clone())),
        )
        .unwrap();
    }
    (ks, dir)
}

/// The os-brick driver process (the venv's python running tests/vm/osbrick_driver.py).
struct Brick {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Brick {
    /// Starts the driver; fails the test when the venv is not there or os-brick does not import.
    fn start() -> Brick {
        let venv = std::env::var("VOLCRYPT_OSBRICK_VENV").unwrap_or_else(|_| {
            panic!(
                "VOLCRYPT_OSBRICK_VENV is not set: these tests need os-brick from PyPI \
                 (scripts/osbrick-venv.sh makes the venv; tests/vm/attach-suite.sh passes its path)"
            )
        });
        let python = Path::new(&venv).join("bin/python");
        assert!(
            python.is_file(),
            "{} missing: run scripts/osbrick-venv.sh (the venv must be visible in the VM)",
            python.display()
        );
        let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/osbrick_driver.py");
        let mut child = Command::new(&python)
            .arg(&driver)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut brick = Brick {
            child,
            stdin,
            stdout,
        };
        // The driver's first line: os-brick imported (else it died: its traceback is above).
        let ready = brick.answer();
        assert_eq!(ready["ready"], true, "{ready}");
        eprintln!("os-brick {} from {venv}", ready["os_brick"]);
        brick
    }

    /// The driver's next answer line.
    fn answer(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(
            !line.is_empty(),
            "the os-brick driver died (its stderr is above: is os-brick installed in \
             VOLCRYPT_OSBRICK_VENV? scripts/osbrick-venv.sh)"
        );
        serde_json::from_str(&line).unwrap()
    }

    /// One request; the driver's answer (`ok`, `mapping`, `commands` or `error`).
    fn call(
        &mut self,
        op: &str,
        provider: &str,
        link: &Path,
        s: &TestSecret,
        enc: &Value,
    ) -> Value {
        // castellan's managed_type() names: the same words as volcrypt's secret types.
        let kind = s.kind.as_str();
        let req = json!({
            "op": op, "provider": provider, "device_path": link,
            "secret_type": kind, "secret_hex": hex(&s.payload), "encryption": enc,
        });
        writeln!(self.stdin, "{req}").unwrap();
        self.stdin.flush().unwrap();
        self.answer()
    }

    /// A request that must succeed; returns the answer.
    fn ok(&mut self, op: &str, provider: &str, link: &Path, s: &TestSecret, enc: &Value) -> Value {
        let a = self.call(op, provider, link, s, enc);
        assert_eq!(a["ok"], true, "os-brick {op} {provider} with {}: {a}", s.id);
        a
    }
}

impl Drop for Brick {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loop device over a sparse file with a by-path style link to it (the `device_path` both
/// openers get), a state dir and a by-id dir for volcrypt. Torn down on drop, mapping first.
struct Vol {
    dir: tempfile::TempDir,
    loopdev: PathBuf,
    link: PathBuf,
    name: String,
}

impl Vol {
    /// 32 MiB: LUKS2 headers cryptsetup makes take 16 MiB.
    fn new(tag: &str) -> Vol {
        let (dir, _, loopdev) = common::loopdev::backing(32 << 20);
        let bypath = dir.path().join("by-path");
        std::fs::create_dir_all(&bypath).unwrap();
        let link = bypath.join(format!("ob-{tag}-lun-0"));
        std::os::unix::fs::symlink(&loopdev, &link).unwrap();
        Vol {
            name: format!("crypt-ob-{tag}-lun-0"),
            dir,
            loopdev,
            link,
        }
    }

    fn ctx<'a>(&self, ks: &'a Keystore) -> Context<'a> {
        Context::new(
            ks,
            VolumeConfig {
                state_dir: self.dir.path().join("state"),
                by_id_dir: self.dir.path().join("by-id"),
                detach_timeout_ms: 1500,
                pbkdf: Some(PbkdfConfig {
                    kind: "pbkdf2".into(),
                    iterations: 1000,
                    memory_kib: 0,
                }),
                ..VolumeConfig::default()
            },
        )
    }

    fn volume_id(&self) -> String {
        format!("vol-{}", self.name)
    }

    /// volcrypt's request for this volume: the same encryption metadata os-brick gets.
    fn request(&self, provider: &str, key_id: &str, enc: &Value) -> AttachRequest {
        let mut encryption = json!({
            "provider": provider, "control_location": "front-end", "encryption_key_id": key_id,
        });
        if let Value::Object(m) = enc {
            for (k, v) in m {
                encryption[k] = v.clone();
            }
        }
        let req = json!({
            "volume_id": self.volume_id(), "device_path": self.link, "encryption": encryption,
        });
        AttachRequest::from_json(req.to_string().as_bytes()).unwrap()
    }

    fn mapper(&self) -> PathBuf {
        Path::new("/dev/mapper").join(&self.name)
    }

    /// Points the link back at the device (what a new connection of the volume does).
    fn relink(&self) {
        std::fs::remove_file(&self.link).unwrap();
        std::os::unix::fs::symlink(&self.loopdev, &self.link).unwrap();
    }
}

impl Drop for Vol {
    fn drop(&mut self) {
        common::loopdev::teardown(&self.name, &self.loopdev);
    }
}

fn write_at(dev: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_at(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// What identifies a mapping to the kernel and udev: its dm UUID and its table, the key field
/// (hex key, or the LUKS2 keyring reference) replaced by its SHA-256 as soon as it is read, so
/// a mismatch can be shown without showing a key.
#[derive(Debug, PartialEq)]
struct Mapping {
    uuid: String,
    table: Vec<String>,
}

fn mapping(name: &str) -> Mapping {
    use sha2::Digest;
    let table = sh(&format!("dmsetup table --showkeys {name}"))
        .split_whitespace()
        .enumerate()
        .map(|(i, f)| {
            if i == 4 {
                format!("sha256:{}", hex(&sha2::Sha256::digest(f.as_bytes())))
            } else {
                f.to_owned()
            }
        })
        .collect::<Vec<_>>();
    assert_eq!(table.get(2).map(String::as_str), Some("crypt"), "{name}");
    Mapping {
        uuid: sh(&format!("dmsetup info -c --noheadings -o uuid {name}")),
        table,
    }
}

/// The encryption metadata of a case: Cinder's volume types give a symmetric key an explicit
/// cipher and key size; passphrase cases use cryptsetup's defaults (nothing given).
fn encryption_for(s: &TestSecret) -> Value {
    match s.kind {
        SecretType::Symmetric => json!({"cipher": "aes-xts-plain64", "key_size": 256}),
        _ => json!({}),
    }
}

/// The LUKS version cryptsetup reads from the device (None: not LUKS).
fn luks_version(dev: &Path) -> Option<String> {
    let o = Command::new("cryptsetup")
        .arg("luksDump")
        .arg(dev)
        .output()
        .unwrap();
    if !o.status.success() {
        return None;
    }
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_owned()))
}

/// Whether `passphrase` (exact bytes) unlocks a keyslot of the LUKS volume on `dev`.
fn opens_with(dev: &Path, passphrase: &[u8]) -> bool {
    common::sh_in(
        &format!(
            "cryptsetup open --test-passphrase --key-file=- {}",
            dev.display()
        ),
        passphrase,
    )
    .status
    .success()
}

fn ran(answer: &Value, sub: &str) -> bool {
    answer["commands"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c[1] == sub)
}

/// os-brick formats and attaches, writes, detaches; volcrypt opens the same volume with the
/// same secret: same mapping name, UUID and table, and it reads what os-brick's mapping wrote.
fn os_brick_formats_volcrypt_opens(
    brick: &mut Brick,
    ks: &Keystore,
    provider: &str,
    s: &TestSecret,
    tag: &str,
) {
    let v = Vol::new(tag);
    let enc = encryption_for(s);
    let a = brick.ok("attach", provider, &v.link, s, &enc);
    assert_eq!(
        a["mapping"],
        v.name.as_str(),
        "os-brick's mapping name: {a}"
    );
    let luks = match provider {
        "luks" => Some("1"),
        "luks2" => Some("2"),
        _ => None,
    };
    assert_eq!(
        ran(&a, "luksFormat"),
        luks.is_some(),
        "os-brick formats a blank LUKS volume on first attach, never a plain one: {a}"
    );
    assert_eq!(luks_version(&v.loopdev).as_deref(), luks, "{provider}");
    assert_eq!(
        std::fs::read_link(&v.link).unwrap(),
        v.mapper(),
        "os-brick points device_path at its mapping"
    );
    let by_brick = mapping(&v.name);
    let data = pattern(tag.len() as u8, 65536);
    write_at(&v.mapper(), 4096, &data);
    brick.ok("detach", provider, &v.link, s, &enc);
    assert!(
        !need::mapping_active(&v.name),
        "os-brick detach left {}",
        v.name
    );
    assert_eq!(
        std::fs::read_link(&v.link).unwrap(),
        v.mapper(),
        "os-brick leaves device_path pointing at the removed mapping (Nova's connector cleans up)"
    );
    v.relink();
    if luks.is_some() {
        // What os-brick gave cryptsetup: the passphrase byte for byte (its trailing newline
        // too: `--key-file=-` keeps it), a symmetric key as lowercase hex.
        let expected = match s.kind {
            SecretType::Passphrase => s.payload.clone(),
            _ => hex(&s.payload).into_bytes(),
        };
        assert!(
            opens_with(&v.loopdev, &expected),
            "{provider}/{}: os-brick's passphrase",
            s.id
        );
        if let Some(stripped) = expected.strip_suffix(b"\n") {
            assert!(
                !opens_with(&v.loopdev, stripped),
                "{provider}/{}: the trailing newline must be part of the passphrase",
                s.id
            );
        }
    }

    let ctx = v.ctx(ks);
    let out = volume::attach(&ctx, &v.request(provider, s.id, &enc)).unwrap();
    assert!(
        !out.formatted(),
        "volcrypt must open os-brick's volume, not format it"
    );
    assert_eq!(out.mapping_name.as_deref(), Some(v.name.as_str()));
    assert_eq!(
        mapping(&v.name),
        by_brick,
        "{provider}/{}: volcrypt's mapping differs from os-brick's",
        s.id
    );
    assert!(
        read_at(&v.mapper(), 4096, data.len()) == data,
        "{provider}/{}: volcrypt does not read what os-brick wrote",
        s.id
    );
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    assert!(!need::mapping_active(&v.name));
    assert_eq!(
        std::fs::read_link(&v.link).unwrap(),
        v.loopdev,
        "volcrypt restores device_path"
    );
}

/// volcrypt formats and attaches, writes, detaches; os-brick opens the same volume (without
/// formatting it): same mapping name, UUID and table, and it reads what volcrypt wrote.
fn volcrypt_formats_os_brick_opens(
    brick: &mut Brick,
    ks: &Keystore,
    provider: &str,
    s: &TestSecret,
    tag: &str,
) {
    let v = Vol::new(tag);
    let enc = encryption_for(s);
    let ctx = v.ctx(ks);
    let out = volume::attach(&ctx, &v.request(provider, s.id, &enc)).unwrap();
    assert_eq!(out.formatted(), provider != "plain", "{out:?}");
    assert_eq!(out.mapping_name.as_deref(), Some(v.name.as_str()));
    let by_volcrypt = mapping(&v.name);
    let data = pattern(tag.len() as u8 + 1, 65536);
    write_at(&v.mapper(), 8192, &data);
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    assert!(!need::mapping_active(&v.name));

    let a = brick.ok("attach", provider, &v.link, s, &enc);
    assert_eq!(
        a["mapping"],
        v.name.as_str(),
        "os-brick's mapping name: {a}"
    );
    assert!(
        !ran(&a, "luksFormat"),
        "os-brick reformatted volcrypt's volume: {a}"
    );
    assert_eq!(
        mapping(&v.name),
        by_volcrypt,
        "{provider}/{}: os-brick's mapping differs from volcrypt's",
        s.id
    );
    assert!(
        read_at(&v.mapper(), 8192, data.len()) == data,
        "{provider}/{}: os-brick does not read what volcrypt wrote",
        s.id
    );
    brick.ok("detach", provider, &v.link, s, &enc);
    assert!(
        !need::mapping_active(&v.name),
        "os-brick detach left {}",
        v.name
    );
}

/// The whole matrix for one provider: every secret, both directions.
fn both_directions(provider: &str, short: &str) {
    need::require_dm_crypt();
    let mut brick = Brick::start();
    let (ks, _dir) = keystore(&[]);
    for (i, s) in secrets().iter().enumerate() {
        os_brick_formats_volcrypt_opens(&mut brick, &ks, provider, s, &format!("{short}b{i}"));
        volcrypt_formats_os_brick_opens(&mut brick, &ks, provider, s, &format!("{short}v{i}"));
    }
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn luks1_volumes_open_with_os_brick_and_volcrypt_both_ways() {
    both_directions("luks", "l1");
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn luks2_volumes_open_with_os_brick_and_volcrypt_both_ways() {
    both_directions("luks2", "l2");
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn plain_volumes_open_with_os_brick_and_volcrypt_both_ways() {
    both_directions("plain", "pl");
}

/// A `passphrase` secret that is not UTF-8: os-brick decodes it as UTF-8 and fails before
/// running cryptsetup (no mapping, device untouched); volcrypt passes the bytes to cryptsetup's
/// KDF as they are and formats and opens the volume.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn passphrase_that_is_not_utf8_fails_in_os_brick_and_opens_with_volcrypt() {
    need::require_dm_crypt();
    let mut brick = Brick::start();
    let raw = TestSecret {
        id: "pass-latin1",
        kind: SecretType::Passphrase,
        payload: b"Gr\xfc\xdfe\n".to_vec(),
    };
    let v = Vol::new("raw");
    let a = brick.call("attach", "luks2", &v.link, &raw, &json!({}));
    assert_eq!(a["ok"], false, "{a}");
    assert!(
        a["error"].as_str().unwrap().contains("UnicodeDecodeError"),
        "{a}"
    );
    assert!(!need::mapping_active(&v.name));
    assert_eq!(
        luks_version(&v.loopdev),
        None,
        "os-brick must not have formatted"
    );
    assert_eq!(std::fs::read_link(&v.link).unwrap(), v.loopdev);

    let (ks, _dir) = keystore(std::slice::from_ref(&raw));
    let ctx = v.ctx(&ks);
    let out = volume::attach(&ctx, &v.request("luks2", raw.id, &json!({}))).unwrap();
    assert!(out.formatted());
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    // cryptsetup takes the same raw bytes.
    assert!(opens_with(&v.loopdev, &raw.payload));
}
