//! LUKS1 against qemu-img (a fully independent userspace implementation), both directions,
//! with known random plaintext across the cipher/hash/secret-type matrix.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// One row of the LUKS1 matrix, in qemu-img's and in cryptsetup's vocabulary.
struct Case {
    /// qemu-img: cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg
    qemu: (
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
        &'static str,
    ),
    /// volcrypt/cryptsetup: cipher spec, key bits, hash
    spec: &'static str,
    key_bits: u32,
    hash: &'static str,
    secret_type: &'static str,
}

const CASES: &[Case] = &[
    Case {
        qemu: ("aes-256", "xts", "plain64", None, "sha256"),
        spec: "aes-xts-plain64",
        key_bits: 512,
        hash: "sha256",
        secret_type: "passphrase",
    },
    Case {
        qemu: ("aes-128", "xts", "plain64", None, "sha1"),
        spec: "aes-xts-plain64",
        key_bits: 256,
        hash: "sha1",
        secret_type: "symmetric",
    },
    Case {
        qemu: ("aes-256", "xts", "plain", None, "sha512"),
        spec: "aes-xts-plain",
        key_bits: 512,
        hash: "sha512",
        secret_type: "passphrase",
    },
    Case {
        qemu: ("aes-256", "cbc", "essiv", Some("sha256"), "sha256"),
        spec: "aes-cbc-essiv:sha256",
        key_bits: 256,
        hash: "sha256",
        secret_type: "opaque",
    },
    Case {
        qemu: ("aes-128", "cbc", "plain", None, "sha1"),
        spec: "aes-cbc-plain",
        key_bits: 128,
        hash: "sha1",
        secret_type: "passphrase",
    },
    Case {
        qemu: ("aes-256", "cbc", "plain64", None, "sha512"),
        spec: "aes-cbc-plain64",
        key_bits: 256,
        hash: "sha512",
        secret_type: "symmetric",
    },
];

/// The key file volcrypt reads, and the passphrase file the other tool reads (the OpenStack
/// rule applied by hand: hex for non-passphrase secrets).
fn key_files(dir: &Path, secret_type: &str, seed: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = dir.join("key");
    let pass = dir.join("pass");
    if secret_type == "passphrase" {
        // A trailing newline is part of the passphrase (no stripping anywhere).
        let mut p = format!("pass {seed:x} phrase").into_bytes();
        p.push(b'\n');
        write_file(&key, &p);
        write_file(&pass, &p);
    } else {
        let raw = random_bytes(32, seed ^ 0x5eed);
        write_file(&key, &raw);
        write_file(&pass, hex(&raw).as_bytes());
    }
    (key, pass)
}

fn secret_object(pass: &Path) -> String {
    format!("secret,id=sec0,file={}", pass.display())
}

#[test]
fn qemu_img_luks1_containers_decrypt_byte_exact_with_volcrypt() {
    let qemu = qemu_img();
    for (i, case) in CASES.iter().enumerate() {
        let dir = tempdir();
        let seed = fresh_seed(case.spec);
        // 1 MiB plus an odd number of sectors, so chunk boundaries are exercised.
        let plain = random_bytes((1 << 20) + 7 * 512 + (i * 4096), seed);
        let plain_path = dir.path().join("plain.raw");
        write_file(&plain_path, &plain);
        let (key, pass) = key_files(dir.path(), case.secret_type, seed);
        let img = dir.path().join("qemu.luks");
        let (alg, mode, ivgen, ivhash, hash) = case.qemu;
        let mut opts = format!(
            "key-secret=sec0,cipher-alg={alg},cipher-mode={mode},ivgen-alg={ivgen},hash-alg={hash},iter-time=10"
        );
        if let Some(h) = ivhash {
            opts.push_str(&format!(",ivgen-hash-alg={h}"));
        }
        check_qemu_img_luks(
            Command::new(&qemu)
                .args(["convert", "-f", "raw", "-O", "luks", "--object"])
                .arg(secret_object(&pass))
                .args(["-o", &opts])
                .arg(&plain_path)
                .arg(&img),
        );

        // Inspect sees what qemu-img wrote.
        let out = check(volcrypt(["image", "inspect", "--json"]).arg(&img));
        let json = stdout(&out);
        assert!(
            json.contains(case.spec),
            "{}: inspect --json lacks the cipher: {json}",
            case.spec
        );

        let out_path = dir.path().join("out.raw");
        let out = check(
            volcrypt([
                "image",
                "decrypt",
                "--secret-type",
                case.secret_type,
                "--key-file",
            ])
            .arg(&key)
            .arg("--output")
            .arg(&out_path)
            .arg(&img),
        );
        assert!(
            !stderr(&out).contains("pass "),
            "stderr shows the passphrase"
        );
        assert_same_bytes(&read_file(&out_path), &plain, case.spec);
    }
}

#[test]
fn volcrypt_luks1_containers_pass_cryptsetup_and_decrypt_through_qemu_img() {
    let qemu = qemu_img();
    let cs = cryptsetup();
    for (i, case) in CASES.iter().enumerate() {
        let dir = tempdir();
        let seed = fresh_seed(case.spec);
        let plain = random_bytes((1 << 20) + (i + 1) * 512, seed);
        let plain_path = dir.path().join("plain.raw");
        write_file(&plain_path, &plain);
        let (key, pass) = key_files(dir.path(), case.secret_type, seed);
        let img = dir.path().join("volcrypt.luks");
        let key_bits = case.key_bits.to_string();
        check(
            volcrypt(["image", "encrypt", "--type", "luks1", "--cipher", case.spec])
                .args(["--key-size", &key_bits, "--hash", case.hash])
                .args(cheap_kdf("pbkdf2"))
                .args(["--secret-type", case.secret_type, "--key-file"])
                .arg(&key)
                .arg("--output")
                .arg(&img)
                .arg(&plain_path),
        );

        // cryptsetup accepts the header and reads the same parameters back.
        let dump = stdout(&check(Command::new(&cs).arg("luksDump").arg(&img)));
        assert!(dump.contains("Version:       \t1"), "{}: {dump}", case.spec);
        let (cname, cmode) = case.spec.split_once('-').expect("spec has a mode");
        assert!(
            dump.contains(&format!("Cipher name:   \t{cname}")),
            "{dump}"
        );
        assert!(
            dump.contains(&format!("Cipher mode:   \t{cmode}")),
            "{dump}"
        );
        assert!(
            dump.contains(&format!("Hash spec:     \t{}", case.hash)),
            "{dump}"
        );
        assert!(
            dump.contains(&format!("MK bits:       \t{}", case.key_bits)),
            "{dump}"
        );

        // cryptsetup unlocks it with the derived passphrase…
        check(
            Command::new(&cs)
                .args(["open", "--test-passphrase", "--key-file"])
                .arg(&pass)
                .arg(&img),
        );
        // …and refuses a wrong one with its "no key" exit code.
        let wrong = dir.path().join("wrong");
        write_file(&wrong, b"not the passphrase");
        let out = run(Command::new(&cs)
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(&wrong)
            .arg(&img));
        assert_eq!(
            code(&out),
            2,
            "cryptsetup with a wrong key: {}",
            stderr(&out)
        );

        // qemu-img decrypts the payload byte-exact.
        let out_path = dir.path().join("qemu-out.raw");
        check(
            Command::new(&qemu)
                .args(["convert", "--object"])
                .arg(secret_object(&pass))
                .arg("--image-opts")
                .arg(format!(
                    "driver=luks,key-secret=sec0,file.filename={}",
                    img.display()
                ))
                .args(["-O", "raw"])
                .arg(&out_path),
        );
        assert_same_bytes(&read_file(&out_path), &plain, case.spec);
    }
}
