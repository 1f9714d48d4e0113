//! qcow2 images with LUKS encryption against qemu-img and qemu-io (the reference): images
//! qemu writes (several cluster sizes, extended L2 entries, version 2, sparse and partially
//! written clusters, zero clusters) decrypt byte-exact with volcrypt; what volcrypt cannot or
//! must not read is refused by name.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn qemu_io() -> PathBuf {
    require_tool("qemu-io", "qemu-utils")
}

fn secret_object(pass: &Path) -> String {
    format!("secret,id=sec0,file={}", pass.display())
}

fn image_opts(img: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        img.display()
    )
}

/// `key` is what volcrypt reads, `pass` what qemu reads (hex of the key for non-passphrase
/// secret types, the OpenStack rule).
fn key_files(dir: &Path, secret_type: &str, seed: u64) -> (PathBuf, PathBuf) {
    let key = dir.join("key");
    let pass = dir.join("pass");
    if secret_type == "passphrase" {
        let mut p = format!("qcow2 {seed:x}").into_bytes();
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

/// qemu-img's own decryption of `img` to raw.
fn qemu_decrypt(img: &Path, pass: &Path, out: &Path) -> Vec<u8> {
    check(
        Command::new(qemu_img())
            .args(["convert", "--object"])
            .arg(secret_object(pass))
            .arg("--image-opts")
            .arg(image_opts(img))
            .args(["-O", "raw"])
            .arg(out),
    );
    read_file(out)
}

fn volcrypt_decrypt(img: &Path, key: &Path, secret_type: &str, out: &Path) -> Vec<u8> {
    check(
        volcrypt([
            "image",
            "decrypt",
            "--secret-type",
            secret_type,
            "--key-file",
        ])
        .arg(key)
        .arg("-o")
        .arg(out)
        .arg(img),
    );
    read_file(out)
}

/// A sparse plaintext: random runs of random data between runs of zeros, `sectors` long.
fn sparse_plaintext(sectors: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; sectors * 512];
    let ctl = random_bytes(64, seed ^ 0xc0ffee);
    let mut at = 0usize;
    let mut k = 0;
    while at < v.len() {
        let skip = (ctl[k % 64] as usize) * 1024;
        let fill = (ctl[(k + 1) % 64] as usize + 1) * 700;
        at += skip;
        let end = (at + fill).min(v.len());
        if at < end {
            let data = random_bytes(end - at, seed.wrapping_add(k as u64));
            v[at..end].copy_from_slice(&data);
        }
        at = end;
        k += 2;
    }
    v
}

/// The qemu-img creation options of one image layout.
const LAYOUTS: &[(&str, &str)] = &[
    ("64 KiB clusters (default)", ""),
    ("512-byte clusters", ",cluster_size=512"),
    ("2 MiB clusters", ",cluster_size=2M"),
    ("4 KiB clusters", ",cluster_size=4096"),
    ("extended L2, 64 KiB", ",extended_l2=on"),
    ("extended L2, 16 KiB", ",extended_l2=on,cluster_size=16k"),
    ("version 2 (compat=0.10)", ",compat=0.10"),
];

#[test]
fn qemu_img_converted_qcow2_luks_images_decrypt_byte_exact() {
    let qemu = qemu_img();
    for (i, (name, layout)) in LAYOUTS.iter().enumerate() {
        let dir = tempdir();
        let seed = fresh_seed(name);
        let secret_type = ["passphrase", "symmetric"][i % 2];
        // A random size of up to ~6 MiB, whole sectors (qemu's rule for disk sizes).
        let sectors = 1
            + (random_bytes(4, seed ^ 7)
                .iter()
                .fold(0usize, |a, &b| a * 256 + b as usize)
                % 12_000);
        let plain = sparse_plaintext(sectors, seed);
        let plain_path = dir.path().join("plain.raw");
        write_file(&plain_path, &plain);
        let (key, pass) = key_files(dir.path(), secret_type, seed);
        let img = dir.path().join("img.qcow2");
        check_qemu_img_luks(
            Command::new(&qemu)
                .args(["convert", "-f", "raw", "-O", "qcow2", "--object"])
                .arg(secret_object(&pass))
                .args([
                    "-o",
                    &format!(
                        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{layout}"
                    ),
                ])
                .arg(&plain_path)
                .arg(&img),
        );
        let reference = qemu_decrypt(&img, &pass, &dir.path().join("qemu.raw"));
        assert_same_bytes(&reference, &plain, &format!("{name}: qemu-img itself"));
        let got = volcrypt_decrypt(&img, &key, secret_type, &dir.path().join("out.raw"));
        assert_same_bytes(&got, &plain, name);

        let json = stdout(&check(volcrypt(["image", "inspect", "--json"]).arg(&img)));
        assert!(json.contains("\"format\": \"qcow2\""), "{name}: {json}");
        assert!(json.contains("aes-xts-plain64"), "{name}: {json}");
        assert!(
            json.contains(&format!("\"virtual_size\": {}", plain.len())),
            "{name}: {json}"
        );
        let out = check(
            volcrypt([
                "image",
                "check-key",
                "--secret-type",
                secret_type,
                "--key-file",
            ])
            .arg(&key)
            .arg(&img),
        );
        assert!(
            stdout(&out).contains("Key slot 0 unlocked"),
            "{}",
            stdout(&out)
        );
    }
}

/// Images written piecemeal by qemu-io: partial clusters, explicit zero writes over data,
/// unallocated gaps, data at the very end; decrypted through standard output as well.
#[test]
fn qemu_io_written_images_decrypt_byte_exact() {
    let qemu = qemu_img();
    let io = qemu_io();
    for (name, layout) in LAYOUTS {
        let dir = tempdir();
        let (key, pass) = key_files(dir.path(), "passphrase", 0x10);
        let img = dir.path().join("img.qcow2");
        check_qemu_img_luks(
            Command::new(&qemu)
                .args(["create", "-q", "-f", "qcow2", "--object"])
                .arg(secret_object(&pass))
                .args([
                    "-o",
                    &format!(
                        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{layout}"
                    ),
                ])
                .arg(&img)
                .arg("7M"),
        );
        check(
            Command::new(&io)
                .arg("--object")
                .arg(secret_object(&pass))
                .arg("--image-opts")
                .arg(image_opts(&img))
                .args(["-c", "write -P 0xab 1000k 3k"])
                .args(["-c", "write -P 0x11 5M 1536"])
                .args(["-c", "write -z 5M 512"])
                .args(["-c", "write -P 0x33 0 512"])
                .args(["-c", "write -z 0 64k"])
                .args(["-c", "write -P 0x44 6M 1M"])
                .args(["-c", "write -P 0x55 2047k 2k"]),
        );
        let reference = qemu_decrypt(&img, &pass, &dir.path().join("qemu.raw"));
        assert_eq!(reference.len(), 7 << 20);
        assert!(reference[1000 << 10..1003 << 10].iter().all(|&b| b == 0xab));
        let got = volcrypt_decrypt(&img, &key, "passphrase", &dir.path().join("out.raw"));
        assert_same_bytes(&got, &reference, name);

        let out = check(
            volcrypt(["image", "decrypt", "--key-file"])
                .arg(&key)
                .args(["-o", "-"])
                .arg(&img),
        );
        assert_same_bytes(&out.stdout, &reference, &format!("{name} to stdout"));
    }
}

fn qemu_luks_qcow2(dir: &Path, pass: &Path, size: &str) -> PathBuf {
    let img = dir.join("img.qcow2");
    check_qemu_img_luks(
        Command::new(qemu_img())
            .args(["create", "-q", "-f", "qcow2", "--object"])
            .arg(secret_object(pass))
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ])
            .arg(&img)
            .arg(size),
    );
    img
}

#[test]
fn wrong_key_fails_with_the_no_key_exit_code_and_leaves_no_output() {
    let dir = tempdir();
    let (_key, pass) = key_files(dir.path(), "passphrase", 1);
    let img = qemu_luks_qcow2(dir.path(), &pass, "1M");
    let wrong = dir.path().join("wrong");
    write_file(&wrong, b"not the passphrase");
    let out_path = dir.path().join("out.raw");
    let out = run(volcrypt(["image", "decrypt", "--key-file"])
        .arg(&wrong)
        .arg("-o")
        .arg(&out_path)
        .arg(&img));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no key available"),
        "{}",
        stderr(&out)
    );
    assert!(
        !out_path.exists(),
        "a failed decrypt left {}",
        out_path.display()
    );
    let out = run(volcrypt(["image", "check-key", "--key-file"])
        .arg(&wrong)
        .arg(&img));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    // The passphrase rule is the raw path's: the key file's trailing newline matters.
    let stripped = dir.path().join("stripped");
    let mut p = read_file(&pass);
    p.pop();
    write_file(&stripped, &p);
    let out = run(volcrypt(["image", "check-key", "--key-file"])
        .arg(&stripped)
        .arg(&img));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

fn refused(img: &Path, key: &Path, needle: &str) {
    for cmd in ["inspect", "decrypt"] {
        let mut c = volcrypt(["image", cmd]);
        if cmd == "decrypt" {
            c.arg("--key-file").arg(key).args(["-o", "-"]);
        }
        let out = run(c.arg(img));
        assert_eq!(code(&out), 1, "{cmd}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(needle),
            "{cmd}: expected {needle:?} in {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{cmd} wrote output");
    }
}

fn be64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[test]
fn unsupported_images_are_refused_by_name() {
    let qemu = qemu_img();
    let dir = tempdir();
    let (key, pass) = key_files(dir.path(), "passphrase", 2);

    // A backing file.
    let base = dir.path().join("base.qcow2");
    check(
        Command::new(&qemu)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("1M"),
    );
    let overlay = dir.path().join("overlay.qcow2");
    check_qemu_img_luks(
        Command::new(&qemu)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg("--object")
            .arg(secret_object(&pass))
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ])
            .arg(&overlay),
    );
    refused(
        &overlay,
        &key,
        "backing file are not supported: flatten with qemu-img convert",
    );

    // Not encrypted at all.
    refused(&base, &key, "not encrypted");

    // The legacy AES method (qemu-img still writes it for data liberation).
    let aes = dir.path().join("aes.qcow2");
    check(
        Command::new(&qemu)
            .args(["create", "-q", "-f", "qcow2", "--object"])
            .arg(secret_object(&pass))
            .args(["-o", "encrypt.format=aes,encrypt.key-secret=sec0"])
            .arg(&aes)
            .arg("1M"),
    );
    refused(&aes, &key, "legacy AES");

    // A compressed cluster (qemu refuses to write one into an encrypted image, so it is made
    // by setting the compressed bit of an allocated L2 entry).
    let img = qemu_luks_qcow2(dir.path(), &pass, "1M");
    check(
        Command::new(qemu_io())
            .arg("--object")
            .arg(secret_object(&pass))
            .arg("--image-opts")
            .arg(image_opts(&img))
            .args(["-c", "write -P 0x42 0 64k"]),
    );
    let mut b = read_file(&img);
    let l1 = be64_at(&b, 40) as usize;
    let l2 = (be64_at(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be64_at(&b, l2) | (1 << 62);
    b[l2..l2 + 8].copy_from_slice(&e.to_be_bytes());
    let compressed = dir.path().join("compressed.qcow2");
    write_file(&compressed, &b);
    let out = run(volcrypt(["image", "decrypt", "--key-file"])
        .arg(&key)
        .args(["-o", "-"])
        .arg(&compressed));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("compressed cluster"),
        "{}",
        stderr(&out)
    );

    // An unknown incompatible feature bit.
    let mut b = read_file(&img);
    b[72..80].copy_from_slice(&(1u64 << 20).to_be_bytes());
    let unknown = dir.path().join("unknown.qcow2");
    write_file(&unknown, &b);
    refused(&unknown, &key, "incompatible feature bits 0x100000");

    // Commands that read raw LUKS only say so.
    let out = run(volcrypt(["image", "verify", "--key-file"])
        .arg(&key)
        .arg(&img));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("qcow2 image"), "{}", stderr(&out));
}

/// `image encrypt --format qcow2`: qemu-img checks the image clean, compares it identical to
/// the plaintext and converts it back byte-exact; all-zero clusters stay unallocated.
#[test]
fn volcrypt_qcow2_images_pass_qemu_img_check_compare_and_convert() {
    let qemu = qemu_img();
    let cases: &[(&str, &str, &[&str])] = &[
        ("passphrase", "aes-xts-plain64", &[]),
        ("symmetric", "aes-xts-plain64", &["--key-size", "256"]),
        ("passphrase", "aes-cbc-essiv:sha256", &["--key-size", "256"]),
    ];
    for (i, (secret_type, cipher, extra)) in cases.iter().enumerate() {
        let dir = tempdir();
        let seed = fresh_seed(cipher);
        // At least 128 KiB: qemu-io writes at 100 KiB below.
        let sectors = 256
            + (random_bytes(4, seed ^ 9)
                .iter()
                .fold(0usize, |a, &b| a * 256 + b as usize)
                % 16_000);
        let plain = sparse_plaintext(sectors, seed);
        let plain_path = dir.path().join("plain.raw");
        write_file(&plain_path, &plain);
        let (key, pass) = key_files(dir.path(), secret_type, seed);
        let img = dir.path().join("vc.qcow2");
        check(
            volcrypt(["image", "encrypt", "--format", "qcow2", "--cipher", cipher])
                .args(*extra)
                .args(cheap_kdf("pbkdf2"))
                .args(["--secret-type", secret_type, "--key-file"])
                .arg(&key)
                .arg("-o")
                .arg(&img)
                .arg(&plain_path),
        );
        let out = check(
            Command::new(&qemu)
                .args(["check", "--object"])
                .arg(secret_object(&pass))
                .arg("--image-opts")
                .arg(image_opts(&img)),
        );
        assert!(
            stdout(&out).contains("No errors were found"),
            "{}",
            stdout(&out)
        );
        let out = check(
            Command::new(&qemu)
                .args(["compare", "--object"])
                .arg(secret_object(&pass))
                .arg("--image-opts")
                .arg(image_opts(&img))
                .arg(format!("driver=raw,file.filename={}", plain_path.display())),
        );
        assert!(
            stdout(&out).contains("Images are identical"),
            "{}",
            stdout(&out)
        );
        let back = qemu_decrypt(&img, &pass, &dir.path().join("qemu.raw"));
        assert_same_bytes(&back, &plain, &format!("case {i}: qemu-img convert"));
        let ours = volcrypt_decrypt(&img, &key, secret_type, &dir.path().join("out.raw"));
        assert_same_bytes(&ours, &plain, &format!("case {i}: volcrypt decrypt"));

        // Only non-zero clusters are allocated: qemu-img map reports exactly those as data.
        let nonzero = plain
            .chunks(65536)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count() as u64;
        let map = stdout(&check(
            Command::new(&qemu)
                .args(["map", "--output=json", "--object"])
                .arg(secret_object(&pass))
                .arg("--image-opts")
                .arg(image_opts(&img)),
        ));
        let data_bytes: u64 = map
            .lines()
            .filter(|l| l.contains("\"data\": true"))
            .map(|l| {
                let at = l.find("\"length\": ").expect("length") + 10;
                l[at..]
                    .split(',')
                    .next()
                    .expect("number")
                    .trim()
                    .parse::<u64>()
                    .expect("u64")
            })
            .sum();
        let last = (plain.len() as u64).div_ceil(65536);
        assert!(
            data_bytes.div_ceil(65536) == nonzero && data_bytes <= nonzero * 65536,
            "case {i}: {data_bytes} data bytes mapped for {nonzero} non-zero of {last} clusters: {map}"
        );

        // qemu can go on writing into the image (the refcounts and tables are its own), and
        // what it writes decrypts the same in both tools.
        check(
            Command::new(qemu_io())
                .arg("--object")
                .arg(secret_object(&pass))
                .arg("--image-opts")
                .arg(image_opts(&img))
                .args(["-c", "write -P 0x77 100k 5k"])
                .args(["-c", "write -z 0 4k"]),
        );
        let out = check(
            Command::new(&qemu)
                .args(["check", "--object"])
                .arg(secret_object(&pass))
                .arg("--image-opts")
                .arg(image_opts(&img)),
        );
        assert!(
            stdout(&out).contains("No errors were found"),
            "{}",
            stdout(&out)
        );
        let back = qemu_decrypt(&img, &pass, &dir.path().join("qemu2.raw"));
        let ours = volcrypt_decrypt(&img, &key, secret_type, &dir.path().join("out2.raw"));
        assert_same_bytes(&ours, &back, &format!("case {i}: after qemu-io writes"));
        assert!(back[100 << 10..105 << 10].iter().all(|&b| b == 0x77));
    }
}

#[test]
fn qcow2_encrypt_refuses_what_qemu_cannot_read() {
    let dir = tempdir();
    let plain = dir.path().join("plain.raw");
    write_file(&plain, &[1u8; 4096]);
    let key = dir.path().join("key");
    write_file(&key, b"k");
    let out = run(volcrypt([
        "image",
        "encrypt",
        "--format",
        "qcow2",
        "--type",
        "luks2",
        "--key-file",
    ])
    .arg(&key)
    .arg("-o")
    .arg(dir.path().join("x.qcow2"))
    .arg(&plain));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("LUKS1"), "{}", stderr(&out));
    let out = run(
        volcrypt(["image", "encrypt", "--format", "qcow2", "--header"])
            .arg(dir.path().join("h"))
            .arg("--key-file")
            .arg(&key)
            .arg("-o")
            .arg(dir.path().join("x.qcow2"))
            .arg(&plain),
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("--header"), "{}", stderr(&out));
    write_file(&plain, &[1u8; 1000]);
    let out = run(
        volcrypt(["image", "encrypt", "--format", "qcow2", "--key-file"])
            .arg(&key)
            .arg("-o")
            .arg(dir.path().join("x.qcow2"))
            .arg(&plain),
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(!dir.path().join("x.qcow2").exists());
}

/// An image with an internal snapshot decrypts to its active state (the snapshot's clusters,
/// shared until qemu copies them on write, are not what the guest sees now).
#[test]
fn images_with_internal_snapshots_decrypt_their_active_state() {
    let dir = tempdir();
    let (key, pass) = key_files(dir.path(), "passphrase", 3);
    let img = qemu_luks_qcow2(dir.path(), &pass, "2M");
    let io = |cmd: &str| {
        check(
            Command::new(qemu_io())
                .arg("--object")
                .arg(secret_object(&pass))
                .arg("--image-opts")
                .arg(image_opts(&img))
                .args(["-c", cmd]),
        )
    };
    io("write -P 0x21 0 200k");
    check(
        Command::new(qemu_img())
            .args(["snapshot", "--object"])
            .arg(secret_object(&pass))
            .arg("--image-opts")
            .arg(image_opts(&img))
            .args(["-c", "s1"]),
    );
    io("write -P 0x66 64k 100k");
    let reference = qemu_decrypt(&img, &pass, &dir.path().join("qemu.raw"));
    assert!(reference[64 << 10..164 << 10].iter().all(|&b| b == 0x66));
    let got = volcrypt_decrypt(&img, &key, "passphrase", &dir.path().join("out.raw"));
    assert_same_bytes(&got, &reference, "active state after a snapshot");
}
