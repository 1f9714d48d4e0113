//! LUKS2 against cryptsetup, both directions, without device-mapper: cryptsetup's offline
//! reencryption encrypts and decrypts plain files in place, so containers with known random
//! plaintext can be made and checked by the reference implementation itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

struct Case {
    spec: &'static str,
    key_bits: u32,
    sector: u32,
    /// pbkdf2-HASH, argon2i or argon2id
    kdf: &'static str,
    secret_type: &'static str,
}

const CASES: &[Case] = &[
    Case {
        spec: "aes-xts-plain64",
        key_bits: 512,
        sector: 4096,
        kdf: "argon2id",
        secret_type: "passphrase",
    },
    Case {
        spec: "aes-xts-plain64",
        key_bits: 256,
        sector: 512,
        kdf: "pbkdf2-sha1",
        secret_type: "symmetric",
    },
    Case {
        spec: "aes-xts-plain",
        key_bits: 512,
        sector: 512,
        kdf: "argon2i",
        secret_type: "passphrase",
    },
    Case {
        spec: "aes-cbc-essiv:sha256",
        key_bits: 256,
        sector: 4096,
        kdf: "pbkdf2-sha512",
        secret_type: "opaque",
    },
    Case {
        spec: "aes-cbc-plain",
        key_bits: 256,
        sector: 512,
        kdf: "pbkdf2-sha256",
        secret_type: "passphrase",
    },
    Case {
        spec: "aes-cbc-plain64",
        key_bits: 128,
        sector: 2048,
        kdf: "argon2id",
        secret_type: "symmetric",
    },
];

/// cryptsetup's KDF options for a case: cheap but real.
fn cryptsetup_kdf(kdf: &str) -> Vec<String> {
    let v: Vec<&str> = match kdf.split_once('-') {
        Some(("pbkdf2", hash)) => vec![
            "--pbkdf",
            "pbkdf2",
            "--hash",
            hash,
            "--pbkdf-force-iterations",
            "1000",
        ],
        _ => vec![
            "--pbkdf",
            kdf,
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "64",
            "--pbkdf-parallel",
            "1",
        ],
    };
    v.into_iter().map(String::from).collect()
}

/// The same for volcrypt.
fn volcrypt_kdf(kdf: &str) -> Vec<String> {
    match kdf.split_once('-') {
        Some(("pbkdf2", hash)) => {
            let mut v = cheap_kdf("pbkdf2");
            v.extend(["--hash".to_string(), hash.to_string()]);
            v
        }
        _ => cheap_kdf(kdf),
    }
}

/// (volcrypt key file, passphrase file for cryptsetup).
fn key_files(dir: &Path, secret_type: &str, seed: u64) -> (PathBuf, PathBuf) {
    let key = dir.join("key");
    let pass = dir.join("pass");
    if secret_type == "passphrase" {
        let p = format!("correct horse {seed:x}\n").into_bytes();
        write_file(&key, &p);
        write_file(&pass, &p);
    } else {
        let raw = random_bytes(32, !seed);
        write_file(&key, &raw);
        write_file(&pass, hex(&raw).as_bytes());
    }
    (key, pass)
}

fn reencrypt_encrypt(
    cs: &Path,
    case: &Case,
    pass: &Path,
    header: Option<&Path>,
    data: &Path,
    extra: &[&str],
) {
    let mut c = Command::new(cs);
    c.args([
        "reencrypt",
        "--encrypt",
        "--type",
        "luks2",
        "--force-offline-reencrypt",
        "--batch-mode",
    ])
    .args([
        "--cipher",
        case.spec,
        "--key-size",
        &case.key_bits.to_string(),
    ])
    .args(["--sector-size", &case.sector.to_string()])
    .args(cryptsetup_kdf(case.kdf))
    .arg("--key-file")
    .arg(pass)
    .args(extra);
    if let Some(h) = header {
        c.arg("--header").arg(h);
    }
    check(c.arg(data));
}

#[test]
fn cryptsetup_luks2_detached_containers_decrypt_byte_exact_with_volcrypt() {
    let cs = cryptsetup();
    for (i, case) in CASES.iter().enumerate() {
        let dir = tempdir();
        let seed = fresh_seed(case.spec);
        let plain = random_bytes((1 << 20) + (i + 1) * 8192, seed);
        let data = dir.path().join("data.img");
        write_file(&data, &plain);
        let hdr = dir.path().join("hdr");
        let (key, pass) = key_files(dir.path(), case.secret_type, seed);
        reencrypt_encrypt(&cs, case, &pass, Some(&hdr), &data, &[]);
        assert_ne!(
            read_file(&data),
            plain,
            "cryptsetup left the data unencrypted"
        );

        let out = check(
            volcrypt(["image", "inspect", "--json", "--header"])
                .arg(&hdr)
                .arg(&data),
        );
        let json = stdout(&out);
        assert!(json.contains(case.spec), "inspect --json: {json}");

        // check-key names the slot; decrypt is byte-exact.
        let out = check(
            volcrypt([
                "image",
                "check-key",
                "--secret-type",
                case.secret_type,
                "--header",
            ])
            .arg(&hdr)
            .arg("--key-file")
            .arg(&key)
            .arg(&data),
        );
        assert!(
            stdout(&out).contains("slot 0"),
            "check-key: {}",
            stdout(&out)
        );
        let out_path = dir.path().join("out.raw");
        check(
            volcrypt([
                "image",
                "decrypt",
                "--secret-type",
                case.secret_type,
                "--header",
            ])
            .arg(&hdr)
            .arg("--key-file")
            .arg(&key)
            .arg("-o")
            .arg(&out_path)
            .arg(&data),
        );
        assert_same_bytes(&read_file(&out_path), &plain, case.spec);
    }
}

#[test]
fn cryptsetup_luks2_attached_header_with_data_shift_decrypts_with_volcrypt() {
    let cs = cryptsetup();
    let case = &CASES[0];
    let dir = tempdir();
    let seed = fresh_seed("attached");
    let size = 6usize << 20;
    let reduce = 2usize << 20;
    let plain = random_bytes(size, seed);
    let img = dir.path().join("img");
    write_file(&img, &plain);
    let (key, pass) = key_files(dir.path(), case.secret_type, seed);
    reencrypt_encrypt(
        &cs,
        case,
        &pass,
        None,
        &img,
        &[
            "--reduce-device-size",
            "2M",
            "--luks2-metadata-size",
            "16k",
            "--luks2-keyslots-size",
            "1M",
        ],
    );
    let out_path = dir.path().join("out.raw");
    check(
        volcrypt(["image", "decrypt", "--key-file"])
            .arg(&key)
            .arg("--output")
            .arg(&out_path)
            .arg(&img),
    );
    let got = read_file(&out_path);
    // cryptsetup moved the data behind a 1 MiB header; the filesystem area it promises to
    // keep is the original size minus --reduce-device-size.
    assert!(
        got.len() >= size - reduce,
        "payload of {} bytes is too short",
        got.len()
    );
    assert_same_bytes(
        &got[..size - reduce],
        &plain[..size - reduce],
        "attached LUKS2",
    );
}

#[test]
fn volcrypt_luks2_detached_containers_pass_cryptsetup_and_decrypt_with_reencrypt() {
    let cs = cryptsetup();
    for (i, case) in CASES.iter().enumerate() {
        let dir = tempdir();
        let seed = fresh_seed(case.spec);
        let plain = random_bytes((1 << 20) + (i + 1) * 4096 * 2, seed);
        let plain_path = dir.path().join("plain.raw");
        write_file(&plain_path, &plain);
        let (key, pass) = key_files(dir.path(), case.secret_type, seed);
        let data = dir.path().join("data.img");
        let hdr = dir.path().join("hdr");
        check(
            volcrypt(["image", "encrypt", "--type", "luks2", "--cipher", case.spec])
                .args(["--key-size", &case.key_bits.to_string()])
                .args(["--sector-size", &case.sector.to_string()])
                .args(volcrypt_kdf(case.kdf))
                .args(["--label", "cross-test", "--secret-type", case.secret_type])
                .arg("--key-file")
                .arg(&key)
                .arg("--header")
                .arg(&hdr)
                .arg("--output")
                .arg(&data)
                .arg(&plain_path),
        );
        assert_eq!(
            std::fs::metadata(&data).expect("data").len(),
            plain.len() as u64,
            "with --header the output holds only the payload"
        );

        let dump = stdout(&check(Command::new(&cs).arg("luksDump").arg(&hdr)));
        assert!(dump.contains("Version:       \t2"), "{dump}");
        assert!(dump.contains("Label:         \tcross-test"), "{dump}");
        assert!(dump.contains(&format!("cipher: {}", case.spec)), "{dump}");
        assert!(
            dump.contains(&format!("sector: {} [bytes]", case.sector)),
            "{dump}"
        );
        assert!(
            dump.contains(&format!("Key:        {} bits", case.key_bits)),
            "{dump}"
        );
        let kdf_name = case.kdf.split('-').next().unwrap_or(case.kdf);
        assert!(dump.contains(&format!("PBKDF:      {kdf_name}")), "{dump}");

        check(
            Command::new(&cs)
                .args(["open", "--test-passphrase", "--header"])
                .arg(&hdr)
                .arg("--key-file")
                .arg(&pass)
                .arg(&data),
        );
        check(
            Command::new(&cs)
                .args([
                    "reencrypt",
                    "--decrypt",
                    "--force-offline-reencrypt",
                    "--batch-mode",
                    "--header",
                ])
                .arg(&hdr)
                .arg("--key-file")
                .arg(&pass)
                .arg(&data),
        );
        assert_same_bytes(&read_file(&data), &plain, case.spec);
    }
}

#[test]
fn volcrypt_luks2_attached_containers_pass_cryptsetup_and_decrypt_with_reencrypt() {
    let cs = cryptsetup();
    // Default options apart from a cheap KDF: what an operator gets.
    let dir = tempdir();
    let seed = fresh_seed("attached volcrypt");
    let plain = random_bytes(3 << 20, seed);
    let plain_path = dir.path().join("plain.raw");
    write_file(&plain_path, &plain);
    let (key, pass) = key_files(dir.path(), "passphrase", seed);
    let img = dir.path().join("img.luks");
    check(
        volcrypt(["image", "encrypt", "--key-file"])
            .arg(&key)
            .args(cheap_kdf("argon2id"))
            .arg("--output")
            .arg(&img)
            .arg(&plain_path),
    );
    let dump = stdout(&check(Command::new(&cs).arg("luksDump").arg(&img)));
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(dump.contains("cipher: aes-xts-plain64"), "{dump}");
    assert!(
        dump.contains("sector: 4096 [bytes]"),
        "default sector size for a 4 KiB multiple: {dump}"
    );
    assert!(dump.contains("Key:        512 bits"), "{dump}");
    assert!(dump.contains("PBKDF:      argon2id"), "{dump}");
    check(
        Command::new(&cs)
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(&pass)
            .arg(&img),
    );
    // cryptsetup 2.6 decrypts an attached-header device by moving the header out to a new
    // file and shifting the data back to offset 0.
    let moved = dir.path().join("moved-hdr");
    check(
        Command::new(&cs)
            .args([
                "reencrypt",
                "--decrypt",
                "--force-offline-reencrypt",
                "--batch-mode",
                "--header",
            ])
            .arg(&moved)
            .arg("--key-file")
            .arg(&pass)
            .arg(&img),
    );
    let got = read_file(&img);
    assert_same_bytes(&got[..plain.len()], &plain, "attached volcrypt LUKS2");
}
