//! `volcrypt image verify` against containers written by cryptsetup, qemu-img and volcrypt:
//! intact images verify (exit 0); a one-byte plaintext difference, a changed ciphertext sector
//! and a wiped keyslot area are found and located (exit 6); a key that opens nothing and a
//! cipher the userspace engine lacks are "cannot verify" (exit 7), never "corrupt".

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const MISMATCH: i32 = 6;
const CANNOT_VERIFY: i32 = 7;

fn verify(img: &Path, key: &Path, plaintext: Option<&Path>, extra: &[&str]) -> Output {
    let mut c = volcrypt(["image", "verify", "--key-file"]);
    c.arg(key).args(extra);
    if let Some(p) = plaintext {
        c.arg("--plaintext").arg(p);
    }
    run(c.arg(img))
}

fn assert_code(out: &Output, want: i32, what: &str) {
    assert_eq!(
        code(out),
        want,
        "{what}: stdout {} stderr {}",
        stdout(out),
        stderr(out)
    );
}

/// Overwrites `bytes` at `offset` of `path`.
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for poke");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(bytes).expect("poke");
}

/// Copy of `plain` with one byte changed at `at`, written next to it.
fn one_byte_off(plain: &[u8], at: usize, dir: &Path) -> PathBuf {
    let mut other = plain.to_vec();
    other[at] ^= 0x01;
    let p = dir.join("plain-off-by-one");
    write_file(&p, &other);
    p
}

fn inspect_json(img: &Path, header: Option<&Path>) -> serde_json::Value {
    let mut c = volcrypt(["image", "inspect", "--json"]);
    if let Some(h) = header {
        c.arg("--header").arg(h);
    }
    serde_json::from_str(&stdout(&check(c.arg(img)))).expect("inspect JSON")
}

fn area_of(json: &serde_json::Value, slot: u64) -> (u64, u64) {
    let ks = json["keyslots"]
        .as_array()
        .expect("keyslots")
        .iter()
        .find(|k| k["id"].as_u64() == Some(slot))
        .unwrap_or_else(|| panic!("no keyslot {slot} in {json}"));
    (
        ks["area_offset"].as_u64().expect("area_offset"),
        ks["area_size"].as_u64().expect("area_size"),
    )
}

#[test]
fn cryptsetup_luks2_images_verify_and_a_one_byte_difference_is_located() {
    let cs = cryptsetup();
    for sector in [512u32, 4096] {
        let dir = tempdir();
        let seed = fresh_seed("verify-cryptsetup");
        let plain = random_bytes((2 << 20) + 3 * 4096, seed);
        let plain_path = dir.path().join("plain");
        write_file(&plain_path, &plain);
        let data = dir.path().join("data");
        write_file(&data, &plain);
        let hdr = dir.path().join("hdr");
        let key = dir.path().join("key");
        write_file(&key, format!("verify {seed:x}\n").as_bytes());
        check(
            Command::new(&cs)
                .args(["reencrypt", "--encrypt", "--type", "luks2"])
                .args(["--force-offline-reencrypt", "--batch-mode"])
                .args(["--sector-size", &sector.to_string()])
                .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
                .arg("--key-file")
                .arg(&key)
                .arg("--header")
                .arg(&hdr)
                .arg(&data),
        );
        let hdr_arg = ["--header", hdr.to_str().expect("utf-8 path")];

        let out = verify(&data, &key, Some(&plain_path), &hdr_arg);
        assert_code(&out, 0, "intact cryptsetup image");
        assert!(
            stdout(&out).contains("plaintext: identical"),
            "{}",
            stdout(&out)
        );
        assert!(
            stdout(&out).contains("keyslot 0: opened"),
            "{}",
            stdout(&out)
        );

        // A one-byte difference in the expected plaintext is found at its byte and sector.
        let at = (1 << 20) + 4096 + 77;
        let off = one_byte_off(&plain, at, dir.path());
        let out = verify(&data, &key, Some(&off), &hdr_arg);
        assert_code(&out, MISMATCH, "plaintext off by one byte");
        let want = format!(
            "at byte {at} ({sector}-byte sector {})",
            at as u64 / u64::from(sector)
        );
        assert!(
            stderr(&out).contains(&want),
            "want {want:?}: {}",
            stderr(&out)
        );

        // JSON carries the same facts.
        let out = verify(
            &data,
            &key,
            Some(&off),
            &[&hdr_arg[..], &["--json"]].concat(),
        );
        assert_code(&out, MISMATCH, "JSON report of the difference");
        let json: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
        assert_eq!(json["plaintext_diff"]["byte"].as_u64(), Some(at as u64));
        assert_eq!(json["opened_by"].as_u64(), Some(0));

        // A changed ciphertext sector is found by comparing with the plaintext…
        let sector_no = 100u64;
        poke(&data, sector_no * u64::from(sector) + 5, &[0xA5; 3]);
        let out = verify(&data, &key, Some(&plain_path), &hdr_arg);
        assert_code(&out, MISMATCH, "changed ciphertext");
        assert!(
            stderr(&out).contains(&format!("{sector}-byte sector {sector_no})")),
            "{}",
            stderr(&out)
        );
        // …while without one the payload still decrypts (XTS has no integrity of its own).
        let out = verify(&data, &key, None, &hdr_arg);
        assert_code(&out, 0, "decrypt-only check");
    }
}

#[test]
fn qemu_img_and_volcrypt_images_verify_against_their_plaintext() {
    let qemu = qemu_img();
    let dir = tempdir();
    let seed = fresh_seed("verify-qemu");
    let plain = random_bytes((1 << 20) + 9 * 512, seed);
    let plain_path = dir.path().join("plain");
    write_file(&plain_path, &plain);
    let key = dir.path().join("key");
    write_file(&key, format!("qemu verify {seed:x}").as_bytes());

    let img = dir.path().join("qemu.luks");
    check_qemu_img_luks(
        Command::new(&qemu)
            .args(["convert", "-f", "raw", "-O", "luks", "--object"])
            .arg(format!("secret,id=sec0,file={}", key.display()))
            .args(["-o", "key-secret=sec0,iter-time=10"])
            .arg(&plain_path)
            .arg(&img),
    );
    assert_code(
        &verify(&img, &key, Some(&plain_path), &[]),
        0,
        "qemu-img image",
    );
    let off = one_byte_off(&plain, 512 * 7 + 1, dir.path());
    let out = verify(&img, &key, Some(&off), &[]);
    assert_code(&out, MISMATCH, "qemu-img image, plaintext off by one");
    assert!(
        stderr(&out).contains(&format!("at byte {} (512-byte sector 7)", 512 * 7 + 1)),
        "{}",
        stderr(&out)
    );

    for version in ["luks1", "luks2"] {
        let img = dir.path().join(format!("{version}.img"));
        check(
            volcrypt(["image", "encrypt", "--type", version])
                .args(cheap_kdf("pbkdf2"))
                .arg("--key-file")
                .arg(&key)
                .arg("-o")
                .arg(&img)
                .arg(&plain_path),
        );
        assert_code(&verify(&img, &key, Some(&plain_path), &[]), 0, version);
        // A plaintext of another size is a difference even when the common part agrees.
        let longer = dir.path().join("longer");
        write_file(&longer, &[&plain[..], &[0u8; 512]].concat());
        let out = verify(&img, &key, Some(&longer), &[]);
        assert_code(&out, MISMATCH, "longer plaintext");
        assert!(
            stderr(&out).contains(&format!("the plaintext has {} bytes", plain.len() + 512)),
            "{}",
            stderr(&out)
        );
    }
}

/// A LUKS2 file with two keyslots (different passphrases), made by cryptsetup.
fn two_slot_image(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let cs = cryptsetup();
    let img = dir.join("two.img");
    write_file(&img, &random_bytes(20 << 20, fresh_seed("two-slot")));
    let k0 = dir.join("k0");
    let k1 = dir.join("k1");
    write_file(&k0, b"first passphrase");
    write_file(&k1, b"second passphrase");
    let kdf = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
    check(
        Command::new(&cs)
            .args(["luksFormat", "--batch-mode", "--type", "luks2"])
            .args(kdf)
            .arg("--key-file")
            .arg(&k0)
            .arg(&img),
    );
    check(
        Command::new(&cs)
            .arg("luksAddKey")
            .args(kdf)
            .arg("--key-file")
            .arg(&k0)
            .arg(&img)
            .arg(&k1),
    );
    (img, k0, k1)
}

#[test]
fn damaged_keyslots_are_reported_and_a_key_opening_nothing_cannot_verify() {
    let dir = tempdir();
    let (img, k0, k1) = two_slot_image(dir.path());
    let out = verify(&img, &k0, None, &[]);
    assert_code(&out, 0, "intact two-slot image");
    assert!(
        stdout(&out).contains("keyslot 0: opened"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("keyslot 1: not opened by this key"),
        "{}",
        stdout(&out)
    );

    let json = inspect_json(&img, None);
    // Slot 1 wiped to zeros: visible without its passphrase.
    let (off1, len1) = area_of(&json, 1);
    poke(&img, off1, &vec![0u8; len1 as usize]);
    let out = verify(&img, &k0, None, &[]);
    assert_code(&out, MISMATCH, "wiped keyslot 1");
    assert!(
        stderr(&out).contains("keyslot 1:") && stderr(&out).contains("all zeros"),
        "{}",
        stderr(&out)
    );
    // Its own passphrase no longer opens anything, and the report says a wiped slot is why.
    let out = verify(&img, &k1, None, &[]);
    assert_code(&out, MISMATCH, "key of the wiped slot");

    // Slot 0 garbled (not zeros): its key opens nothing. Without the right key a damaged
    // area and a wrong key look the same, so this is "cannot verify", naming both causes.
    let (img2, k0b, _) = {
        let d2 = dir.path().join("second");
        std::fs::create_dir(&d2).expect("mkdir");
        two_slot_image(&d2)
    };
    let (off0b, _) = area_of(&inspect_json(&img2, None), 0);
    poke(&img2, off0b + 4096, &os_random(512));
    let out = verify(&img2, &k0b, None, &[]);
    assert_code(&out, CANNOT_VERIFY, "garbled keyslot 0");
    assert!(
        stderr(&out).contains("no keyslot accepts this key")
            && stderr(&out).contains("damaged keyslot area"),
        "{}",
        stderr(&out)
    );

    // A plainly wrong key is "cannot verify" too, and nothing secret is printed.
    let wrong = dir.path().join("wrong");
    write_file(&wrong, b"not a passphrase of this image");
    let (img3, _, _) = {
        let d3 = dir.path().join("third");
        std::fs::create_dir(&d3).expect("mkdir");
        two_slot_image(&d3)
    };
    let out = verify(&img3, &wrong, None, &[]);
    assert_code(&out, CANNOT_VERIFY, "wrong key");
    assert!(
        !stderr(&out).contains("not a passphrase"),
        "{}",
        stderr(&out)
    );
}

/// A LUKS1 header naming serpent (cryptsetup needs a kernel serpent to write one, which the
/// build host lacks; the cipher name is a plain 32-byte field with no checksum, so a volcrypt
/// AES image is renamed instead — exactly what the engine must refuse to run).
#[test]
fn a_cipher_the_userspace_engine_lacks_cannot_verify() {
    let dir = tempdir();
    let plain = dir.path().join("plain");
    write_file(&plain, &random_bytes(64 << 10, fresh_seed("serpent")));
    let key = dir.path().join("key");
    write_file(&key, b"serpent key");
    let img = dir.path().join("serpent.img");
    check(
        volcrypt(["image", "encrypt", "--type", "luks1"])
            .args(cheap_kdf("pbkdf2"))
            .arg("--key-file")
            .arg(&key)
            .arg("-o")
            .arg(&img)
            .arg(&plain),
    );
    let mut name = [0u8; 32];
    name[..7].copy_from_slice(b"serpent");
    poke(&img, 8, &name);
    let dump = stdout(&check(Command::new(cryptsetup()).arg("luksDump").arg(&img)));
    assert!(
        dump.contains("serpent"),
        "cryptsetup reads the renamed header: {dump}"
    );

    let out = verify(&img, &key, Some(&plain), &[]);
    assert_code(&out, CANNOT_VERIFY, "serpent");
    assert!(
        stderr(&out).contains("serpent") && stderr(&out).contains("userspace engine"),
        "{}",
        stderr(&out)
    );
}

/// The plaintext is read at its offsets when it is a file and in order when it is a pipe: both
/// find the earliest of several differences (the file's pieces are checked on every core at
/// once, in no particular order) and a size difference, with the pipe's size counted to its end.
#[test]
fn a_plaintext_file_or_pipe_reports_the_earliest_difference_and_its_size() {
    let dir = tempdir();
    let seed = fresh_seed("verify-pipe");
    // Several 256 KiB pieces, and a tail that is not a whole piece.
    let plain = random_bytes((3 << 20) + 7 * 512, seed);
    let plain_path = dir.path().join("plain");
    write_file(&plain_path, &plain);
    let key = dir.path().join("key");
    write_file(&key, format!("pipe verify {seed:x}").as_bytes());
    let img = dir.path().join("img.luks");
    check(
        volcrypt(["image", "encrypt"])
            .args(cheap_kdf("pbkdf2"))
            .arg("--key-file")
            .arg(&key)
            .arg("-o")
            .arg(&img)
            .arg(&plain_path),
    );
    let piped = |bytes: &[u8]| {
        run_with_stdin(
            volcrypt(["image", "verify", "--key-file"])
                .arg(&key)
                .args(["--plaintext", "/dev/stdin"])
                .arg(&img),
            bytes,
        )
    };
    let filed = |bytes: &[u8], name: &str| {
        let p = dir.path().join(name);
        write_file(&p, bytes);
        verify(&img, &key, Some(&p), &[])
    };

    for (how, out) in [("file", filed(&plain, "same")), ("pipe", piped(&plain))] {
        assert_code(&out, 0, how);
        assert!(
            stdout(&out).contains("plaintext: identical"),
            "{how}: {}",
            stdout(&out)
        );
    }

    // Differences in the last piece, the second piece and the first: the first one is named.
    let mut changed = plain.clone();
    let early = (256 << 10) + 3;
    for at in [plain.len() - 2, (1 << 20) + 9, early] {
        changed[at] ^= 0x40;
    }
    for (how, out) in [
        ("file", filed(&changed, "changed")),
        ("pipe", piped(&changed)),
    ] {
        assert_code(&out, MISMATCH, how);
        assert!(
            stderr(&out).contains(&format!(
                "at byte {early} (512-byte sector {})",
                early / 512
            )),
            "{how}: {}",
            stderr(&out)
        );
    }

    // Shorter and longer plaintexts: the sizes are named, the pipe's counted to its end.
    let payload = plain.len();
    for (extra, name) in [(-512i64, "shorter"), (3 << 20, "longer")] {
        let len = usize::try_from(payload as i64 + extra).expect("size");
        let mut other = plain.clone();
        other.resize(len, 0x5a);
        for (how, out) in [("file", filed(&other, name)), ("pipe", piped(&other))] {
            assert_code(&out, MISMATCH, &format!("{name} {how}"));
            let note = format!("the plaintext has {len} bytes, the payload {payload}");
            assert!(
                stderr(&out).contains(&note),
                "{name} {how}: {}",
                stderr(&out)
            );
            let at = format!("at byte {} ", len.min(payload));
            assert!(stderr(&out).contains(&at), "{name} {how}: {}", stderr(&out));
        }
    }
}
