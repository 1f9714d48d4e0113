//! Cross tests against the real cryptsetup: headers made by `cryptsetup luksFormat` parse and
//! unlock to the volume key cryptsetup dumps, and headers made by volcrypt pass
//! `cryptsetup luksDump` and `cryptsetup open --test-passphrase`.

mod common;

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

use volcrypt::crypto::kdf::{Argon2Variant, Kdf, KdfLimits};
use volcrypt::crypto::{CipherSpec, HashAlg};
use volcrypt::luks::{self, Header, NewContainer};

const MIB: u64 = 1024 * 1024;

struct Img {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dir: PathBuf,
}

fn img(size: u64) -> Img {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let f = fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    Img {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        path,
    }
}

fn keyfile(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, content).unwrap();
    p
}

fn cs(args: &[&str]) -> String {
    let out = Command::new("cryptsetup")
        .args(args)
        .output()
        .expect("cryptsetup runs");
    assert!(
        out.status.success(),
        "cryptsetup {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cs_status(args: &[&str]) -> i32 {
    Command::new("cryptsetup")
        .args(args)
        .output()
        .unwrap()
        .status
        .code()
        .unwrap_or(-1)
}

/// The volume key as `cryptsetup luksDump --dump-volume-key` prints it.
fn dumped_key(header: &Path, key_file: &Path) -> Vec<u8> {
    let out = cs(&[
        "luksDump",
        "--dump-volume-key",
        "--batch-mode",
        "--key-file",
        key_file.to_str().unwrap(),
        header.to_str().unwrap(),
    ]);
    let mut hex = String::new();
    let mut on = false;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("MK dump:") {
            on = true;
            hex.push_str(rest);
        } else if on && line.starts_with(char::is_whitespace) {
            hex.push_str(line);
        } else {
            on = false;
        }
    }
    let hex: String = hex.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    assert!(!hex.is_empty(), "no key in luksDump output:\n{out}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn read(path: &Path, device: bool) -> Header {
    let bytes = fs::read(path).unwrap();
    let size = device.then_some(bytes.len() as u64);
    Header::read(&mut Cursor::new(bytes), size)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn unlock(
    path: &Path,
    h: &Header,
    pass: &[u8],
    slot: Option<u32>,
) -> Result<(u32, Vec<u8>), luks::Error> {
    let mut f = fs::File::open(path).unwrap();
    h.unlock(&mut f, pass, slot, &KdfLimits::default())
        .map(|(s, k)| (s, k.expose().to_vec()))
}

const FAST_ARGON: [&str; 6] = [
    "--pbkdf-memory",
    "32",
    "--pbkdf-force-iterations",
    "4",
    "--pbkdf-parallel",
    "1",
];

fn format(i: &Img, pass: &Path, extra: &[&str]) {
    let mut args = vec![
        "luksFormat",
        "--batch-mode",
        "--key-file",
        pass.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(i.path.to_str().unwrap());
    cs(&args);
}

#[test]
fn luks2_from_cryptsetup_parses_and_unlocks_to_the_dumped_key() {
    for (cipher, key_size, pbkdf, sector) in [
        ("aes-xts-plain64", "512", "argon2id", "4096"),
        ("aes-xts-plain64", "256", "argon2i", "512"),
        ("aes-cbc-essiv:sha256", "256", "pbkdf2", "512"),
    ] {
        let i = img(20 * MIB);
        let pass = keyfile(&i.dir, "pass", b"correct horse\n");
        let mut extra = vec![
            "--type",
            "luks2",
            "--cipher",
            cipher,
            "--key-size",
            key_size,
            "--pbkdf",
            pbkdf,
            "--sector-size",
            sector,
            "--label",
            "vol-label",
        ];
        if pbkdf == "pbkdf2" {
            extra.extend_from_slice(&["--pbkdf-force-iterations", "1000", "--hash", "sha512"]);
        } else {
            extra.extend_from_slice(&FAST_ARGON);
        }
        format(&i, &pass, &extra);
        let h = read(&i.path, true);
        assert_eq!(h.version(), 2);
        assert_eq!(h.cipher().unwrap().to_string(), cipher);
        assert_eq!(h.volume_key_len() * 8, key_size.parse::<usize>().unwrap());
        assert_eq!(h.sector_size().to_string(), sector);
        assert_eq!(h.data_offset(), 16 * MIB);
        assert_eq!(h.data_size(), None);
        assert_eq!(h.label(), Some("vol-label"));
        let s = h.summary();
        assert_eq!(s.keyslots[0].kdf.as_ref().unwrap().kind, pbkdf);
        assert!(h.summary().to_string().contains("vol-label"));
        let (slot, key) = unlock(&i.path, &h, b"correct horse\n", None).unwrap();
        assert_eq!(slot, 0);
        assert_eq!(key, dumped_key(&i.path, &pass), "{cipher} {pbkdf}");
        // The trailing newline is part of the key file, so without it the key is wrong.
        let e = unlock(&i.path, &h, b"correct horse", None).unwrap_err();
        assert!(matches!(e, luks::Error::NoKey), "{e}");
        assert_eq!(volcrypt::error::ExitStatus::from(e.kind()).code(), 2);
        assert_eq!(e.to_string(), "no key available with this passphrase");
    }
}

#[test]
fn luks1_from_cryptsetup_parses_and_unlocks() {
    for (hash, key_size) in [("sha256", "512"), ("sha1", "256"), ("sha512", "512")] {
        let i = img(4 * MIB);
        let pass = keyfile(&i.dir, "pass", b"luks1 pass");
        format(
            &i,
            &pass,
            &[
                "--type",
                "luks1",
                "--hash",
                hash,
                "--key-size",
                key_size,
                "--pbkdf-force-iterations",
                "1000",
            ],
        );
        let h = read(&i.path, true);
        assert_eq!(h.version(), 1);
        assert_eq!(h.data_offset(), 2 * MIB);
        let s = h.summary();
        assert_eq!(s.hash.as_deref(), Some(hash));
        assert_eq!(
            s.keyslots.iter().filter(|k| k.state == "ENABLED").count(),
            1
        );
        let (slot, key) = unlock(&i.path, &h, b"luks1 pass", None).unwrap();
        assert_eq!(slot, 0);
        assert_eq!(key, dumped_key(&i.path, &pass));
        assert!(matches!(
            unlock(&i.path, &h, b"wrong", None),
            Err(luks::Error::NoKey)
        ));
    }
}

#[test]
fn luks1_several_keyslots_and_slot_selection() {
    let i = img(4 * MIB);
    let p0 = keyfile(&i.dir, "p0", b"zero");
    let p1 = keyfile(&i.dir, "p1", b"one");
    format(
        &i,
        &p0,
        &["--type", "luks1", "--pbkdf-force-iterations", "1000"],
    );
    cs(&[
        "luksAddKey",
        "--batch-mode",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        p0.to_str().unwrap(),
        "--key-slot",
        "5",
        i.path.to_str().unwrap(),
        p1.to_str().unwrap(),
    ]);
    let h = read(&i.path, true);
    let (slot, key) = unlock(&i.path, &h, b"one", None).unwrap();
    assert_eq!(slot, 5);
    assert_eq!(key, dumped_key(&i.path, &p0));
    assert!(matches!(
        unlock(&i.path, &h, b"one", Some(0)),
        Err(luks::Error::NoKey)
    ));
    let e = unlock(&i.path, &h, b"one", Some(3)).unwrap_err();
    assert!(
        e.to_string().contains("keyslot 3") && e.to_string().contains("not active"),
        "{e}"
    );
}

#[test]
fn luks2_priorities_unbound_keyslots_and_tokens() {
    let i = img(20 * MIB);
    let p = |n: &str, c: &[u8]| keyfile(&i.dir, n, c);
    let (p0, p1, p2, pu) = (
        p("p0", b"same"),
        p("p1", b"same"),
        p("p2", b"only-two"),
        p("pu", b"unbound"),
    );
    let dev = i.path.to_str().unwrap();
    format(&i, &p0, &[&["--type", "luks2"][..], &FAST_ARGON].concat());
    let add = |existing: &Path, new: &Path, slot: &str, extra: &[&str]| {
        let mut a = vec![
            "luksAddKey",
            "--batch-mode",
            "--key-file",
            existing.to_str().unwrap(),
            "--key-slot",
            slot,
        ];
        a.extend_from_slice(&FAST_ARGON);
        a.extend_from_slice(extra);
        a.push(dev);
        a.push(new.to_str().unwrap());
        cs(&a);
    };
    add(&p0, &p1, "1", &[]);
    add(&p0, &p2, "2", &[]);
    cs(&[
        "luksAddKey",
        "--batch-mode",
        "--unbound",
        "--key-size",
        "256",
        "--key-slot",
        "3",
        "--pbkdf-memory",
        "32",
        "--pbkdf-force-iterations",
        "4",
        "--pbkdf-parallel",
        "1",
        dev,
        pu.to_str().unwrap(),
    ]);
    cs(&["config", "--priority", "prefer", "--key-slot", "1", dev]);
    cs(&["config", "--priority", "ignore", "--key-slot", "2", dev]);
    let tok = p(
        "tok.json",
        br#"{"type":"volcrypt-test","keyslots":["1"],"opaque":{"nested":[1,2,"x"]}}"#,
    );
    cs(&[
        "token",
        "import",
        "--json-file",
        tok.to_str().unwrap(),
        "--token-id",
        "4",
        dev,
    ]);

    let h = read(&i.path, true);
    let vk = dumped_key(&i.path, &p0);
    // Same passphrase in slots 0 and 1: the preferred (high priority) slot 1 is tried first.
    assert_eq!(unlock(&i.path, &h, b"same", None).unwrap(), (1, vk.clone()));
    assert_eq!(
        unlock(&i.path, &h, b"same", Some(0)).unwrap(),
        (0, vk.clone())
    );
    // Priority 0 ("ignore") is never tried unless selected.
    assert!(matches!(
        unlock(&i.path, &h, b"only-two", None),
        Err(luks::Error::NoKey)
    ));
    assert_eq!(
        unlock(&i.path, &h, b"only-two", Some(2)).unwrap(),
        (2, vk.clone())
    );
    // The unbound keyslot never unlocks data, even when selected.
    assert!(matches!(
        unlock(&i.path, &h, b"unbound", None),
        Err(luks::Error::NoKey)
    ));
    let e = unlock(&i.path, &h, b"unbound", Some(3)).unwrap_err();
    assert!(e.to_string().contains("unbound"), "{e}");

    let s = h.summary();
    let prio: Vec<_> = s
        .keyslots
        .iter()
        .map(|k| k.priority.clone().unwrap())
        .collect();
    assert_eq!(prio, ["normal", "high", "ignore", "normal"]);
    assert!(!s.keyslots[3].bound && !s.keyslots[3].usable);
    assert_eq!(s.keyslots[3].key_bits, 256);
    assert_eq!(s.tokens.len(), 1);
    assert_eq!(
        (
            s.tokens[0].id,
            s.tokens[0].kind.as_str(),
            s.tokens[0].keyslots.clone()
        ),
        (4, "volcrypt-test", vec![1])
    );
    let luks::Header::Luks2(h2) = &h else {
        panic!("not LUKS2")
    };
    assert_eq!(h2.meta.tokens[&4].raw["opaque"]["nested"][2], "x");
    let text = s.to_string();
    assert!(
        text.contains("volcrypt-test") && text.contains("(unbound)"),
        "{text}"
    );
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["tokens"][0]["kind"], "volcrypt-test");
}

#[test]
fn luks2_every_metadata_size_is_read() {
    for size in [
        "16k", "32k", "64k", "128k", "256k", "512k", "1m", "2m", "4m",
    ] {
        let i = img(30 * MIB);
        let pass = keyfile(&i.dir, "pass", b"pw");
        format(
            &i,
            &pass,
            &[
                &["--type", "luks2", "--luks2-metadata-size", size][..],
                &FAST_ARGON,
            ]
            .concat(),
        );
        let h = read(&i.path, true);
        let s = h.summary();
        let want = match size.strip_suffix('k') {
            Some(k) => k.parse::<u64>().unwrap() * 1024,
            None => size.trim_end_matches('m').parse::<u64>().unwrap() * MIB,
        };
        assert_eq!(s.hdr_size, Some(want));
        assert_eq!(
            unlock(&i.path, &h, b"pw", None).unwrap().1,
            dumped_key(&i.path, &pass),
            "{size}"
        );
    }
}

#[test]
fn luks2_damaged_primary_falls_back_to_secondary_without_rewriting() {
    let i = img(20 * MIB);
    let pass = keyfile(&i.dir, "pass", b"pw");
    format(
        &i,
        &pass,
        &[
            &["--type", "luks2", "--luks2-metadata-size", "64k"][..],
            &FAST_ARGON,
        ]
        .concat(),
    );
    let mut bytes = fs::read(&i.path).unwrap();
    bytes[0x1C0] ^= 0xff; // primary checksum
    fs::write(&i.path, &bytes).unwrap();
    let h = read(&i.path, true);
    assert_eq!(h.summary().header_copy.as_deref(), Some("secondary"));
    assert_eq!(
        unlock(&i.path, &h, b"pw", None).unwrap().1,
        dumped_key(&i.path, &pass)
    );
    // Primary magic destroyed too: the secondary is found by searching the allowed offsets.
    let mut bytes = fs::read(&i.path).unwrap();
    bytes[..4096].fill(0);
    fs::write(&i.path, &bytes).unwrap();
    let h = read(&i.path, true);
    assert_eq!(h.summary().hdr_size, Some(64 * 1024));
    assert_eq!(
        fs::read(&i.path).unwrap(),
        bytes,
        "reading must never repair the header"
    );
}

fn new_params(
    version: u8,
    detached: bool,
    kdf: Kdf,
    cipher: &str,
    key: usize,
    sector: u32,
) -> NewContainer {
    NewContainer {
        version,
        cipher: CipherSpec::parse(cipher).unwrap(),
        key_bytes: key,
        sector_size: sector,
        hash: HashAlg::Sha256,
        kdf,
        label: (version == 2).then(|| "made-by-volcrypt".to_string()),
        detached_header: detached,
        payload_size: MIB,
    }
}

#[test]
fn volcrypt_containers_pass_cryptsetup() {
    let pbkdf2 = Kdf::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    };
    let argon = Kdf::Argon2 {
        variant: Argon2Variant::Argon2id,
        time: 4,
        memory_kib: 64,
        parallel: 1,
    };
    let cases = [
        new_params(2, false, argon.clone(), "aes-xts-plain64", 64, 4096),
        new_params(2, true, pbkdf2.clone(), "aes-xts-plain64", 32, 512),
        new_params(2, false, pbkdf2.clone(), "aes-cbc-essiv:sha256", 32, 512),
        new_params(1, false, pbkdf2.clone(), "aes-xts-plain64", 64, 512),
        new_params(1, true, pbkdf2.clone(), "aes-xts-plain64", 32, 512),
        new_params(1, false, pbkdf2.clone(), "aes-cbc-essiv:sha256", 16, 512),
    ];
    for p in cases {
        let what = format!(
            "LUKS{} {} detached={}",
            p.version, p.cipher, p.detached_header
        );
        let c = luks::create(&p, b"new pass", &KdfLimits::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pass = keyfile(dir.path(), "pass", b"new pass");
        let hdr = dir.path().join("hdr.img");
        let data = dir.path().join("data.img");
        if p.detached_header {
            assert_eq!(c.data_offset, 0);
            fs::write(&hdr, &c.header[..]).unwrap();
            fs::File::create(&data)
                .unwrap()
                .set_len(p.payload_size)
                .unwrap();
        } else {
            assert_eq!(
                c.data_offset,
                if p.version == 2 { 16 * MIB } else { 2 * MIB },
                "{what}"
            );
            assert_eq!(c.header.len() as u64, c.data_offset);
            fs::write(&hdr, &c.header[..]).unwrap();
            let f = fs::OpenOptions::new().write(true).open(&hdr).unwrap();
            f.set_len(c.data_offset + p.payload_size).unwrap();
        }
        let dump = cs(&["luksDump", hdr.to_str().unwrap()]);
        assert!(
            dump.contains(&format!("Version:       \t{}", p.version))
                || dump.contains(&format!("Version:        {}", p.version)),
            "{what}: {dump}"
        );
        let mut open = vec![
            "open",
            "--test-passphrase",
            "--key-file",
            pass.to_str().unwrap(),
        ];
        if p.detached_header {
            open.extend_from_slice(&["--header", hdr.to_str().unwrap(), data.to_str().unwrap()]);
        } else {
            open.push(hdr.to_str().unwrap());
        }
        assert_eq!(
            cs_status(&open),
            0,
            "{what}: cryptsetup open --test-passphrase"
        );
        let wrong = keyfile(dir.path(), "wrong", b"other");
        open[3] = wrong.to_str().unwrap();
        assert_eq!(
            cs_status(&open),
            2,
            "{what}: wrong passphrase must be refused"
        );
        assert_eq!(dumped_key(&hdr, &pass), c.volume_key.expose(), "{what}");
        // And volcrypt reads back what it wrote.
        let h = read(&hdr, !p.detached_header);
        assert_eq!(
            unlock(&hdr, &h, b"new pass", None).unwrap().1,
            c.volume_key.expose()
        );
        assert_eq!(c.header_summary.uuid, h.uuid());
        let uuid = h.uuid();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4", "UUID v4: {uuid}");
    }
}

#[test]
fn detached_headers_from_cryptsetup() {
    for t in ["luks1", "luks2"] {
        let i = img(MIB);
        let pass = keyfile(&i.dir, "pass", b"detached");
        let hdr = i.dir.join("hdr.img");
        let mut args = vec!["--type", t, "--header", hdr.to_str().unwrap()];
        if t == "luks2" {
            args.extend_from_slice(&FAST_ARGON);
        } else {
            args.extend_from_slice(&["--pbkdf-force-iterations", "1000"]);
        }
        format(&i, &pass, &args);
        let h = read(&hdr, false);
        assert_eq!(h.data_offset(), 0, "{t}");
        assert_eq!(
            unlock(&hdr, &h, b"detached", None).unwrap().1,
            dumped_key(&hdr, &pass),
            "{t}"
        );
        // The detached layout presented as if it sat on the data device is refused: LUKS1
        // when read, LUKS2 when its data is opened (cryptsetup luksDump reads such a LUKS2
        // header too).
        let bytes = fs::read(&hdr).unwrap();
        let e = match Header::read(&mut Cursor::new(&bytes), Some(bytes.len() as u64)) {
            Err(e) => e.to_string(),
            Ok(h) => h.check_activation_allowed().unwrap_err().to_string(),
        };
        assert!(e.contains("detached"), "{t}: {e}");
    }
}

#[test]
fn luks1_from_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.luks");
    common::check_qemu_img_luks(
        Command::new(common::qemu_img())
            .args([
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                "secret,id=s,data=qemu-pw",
                "-o",
                "key-secret=s,iter-time=10,cipher-alg=aes-256,cipher-mode=xts,hash-alg=sha256",
            ])
            .arg(&path)
            .arg("1M"),
    );
    let h = read(&path, true);
    assert_eq!(h.version(), 1);
    assert_eq!(h.cipher().unwrap().to_string(), "aes-xts-plain64");
    let pass = keyfile(dir.path(), "pass", b"qemu-pw");
    assert_eq!(
        unlock(&path, &h, b"qemu-pw", None).unwrap().1,
        dumped_key(&path, &pass)
    );
}
