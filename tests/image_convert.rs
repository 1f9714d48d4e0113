//! `volcrypt image convert` against qemu-img (the reference for qcow2-LUKS and LUKS1) and
//! cryptsetup (volume-key dumps): both directions keep the plaintext byte-exact and the key
//! (the same passphrase opens the result, which wraps the source's volume key), qemu-img opens
//! what convert writes, sparse and odd sizes survive, LUKS1 and LUKS2 sources work, and every
//! refusal (wrong key, existing output, damaged source) names the problem and leaves no output
//! behind. Small images and few qemu-img calls: these run in the native suite.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-iterations", "1000"];

fn secret_object(pass: &Path) -> String {
    format!("secret,id=sec0,file={}", pass.display())
}

/// qemu's `--image-opts` for an encrypted image (qcow2-LUKS or raw LUKS1).
fn image_opts(img: &Path) -> String {
    let qcow2 = std::fs::read(img)
        .map(|b| b.starts_with(b"QFI\xfb"))
        .unwrap_or(false);
    if qcow2 {
        format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            img.display()
        )
    } else {
        format!(
            "driver=luks,file.filename={},key-secret=sec0",
            img.display()
        )
    }
}

/// qemu-img compares the decrypted `img` with the raw `plain` (exit 0 = identical).
fn qemu_compare(img: &Path, pass: &Path, plain: &Path) {
    let out = run(Command::new(qemu_img())
        .arg("compare")
        .arg("--object")
        .arg(secret_object(pass))
        .arg("--image-opts")
        .arg(image_opts(img))
        .arg(format!("driver=raw,file.filename={}", plain.display())));
    assert!(
        out.status.success(),
        "qemu-img compare {} with the plaintext: {}{}",
        img.display(),
        stdout(&out),
        stderr(&out)
    );
}

fn convert(src: &Path, dst: &Path, key: &Path, extra: &[&str]) -> std::process::Output {
    run(volcrypt(["image", "convert"])
        .arg(src)
        .arg("--output")
        .arg(dst)
        .arg("--key-file")
        .arg(key)
        .args(FAST)
        .args(extra))
}

fn convert_ok(src: &Path, dst: &Path, key: &Path, extra: &[&str]) -> String {
    let out = convert(src, dst, key, extra);
    assert!(
        out.status.success(),
        "convert {} -> {}: {}",
        src.display(),
        dst.display(),
        stderr(&out)
    );
    stderr(&out)
}

/// A plaintext of `sectors` 512-byte sectors: random data with zero runs (whole zero
/// clusters, partly zero clusters) so the qcow2 side has unallocated clusters.
fn sparse_plaintext(sectors: usize, seed: u64) -> Vec<u8> {
    let mut v = random_bytes(sectors * 512, seed);
    let ctl = random_bytes(32, seed ^ 0x2e20);
    let mut at = 0usize;
    for (k, c) in ctl.chunks(2).enumerate() {
        at += (c[0] as usize + 1) * 1024 + k * 4096;
        let len = (c[1] as usize + 1) * 1536;
        if at >= v.len() {
            break;
        }
        let end = (at + len).min(v.len());
        v[at..end].fill(0);
        at = end;
    }
    v
}

/// A random number of sectors in `lo..lo+span`, printed with the seed by `random_bytes`.
fn random_sectors(seed: u64, lo: usize, span: usize) -> usize {
    let r = random_bytes(4, seed ^ 0x5ec7)
        .iter()
        .fold(0usize, |a, &b| a * 256 + b as usize);
    lo + r % span
}

/// The volume key cryptsetup unlocks from a raw LUKS image with `key` (hex, as printed).
fn volume_key_of(img: &Path, key: &Path) -> String {
    let out = check(
        Command::new(cryptsetup())
            .args([
                "luksDump",
                "--dump-volume-key",
                "--batch-mode",
                "--key-file",
            ])
            .arg(key)
            .arg(img),
    );
    let text = stdout(&out);
    let at = text
        .find("MK dump:")
        .unwrap_or_else(|| panic!("no volume key in the dump of {}", img.display()));
    text[at..]
        .lines()
        .map(|l| l.trim_start_matches("MK dump:").trim())
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn inspect_json(img: &Path) -> serde_json::Value {
    let out = check(volcrypt(["image", "inspect", "--json"]).arg(img));
    serde_json::from_slice(&out.stdout).expect("inspect JSON")
}

/// qemu-img writes a qcow2-LUKS image (size not a multiple of the cluster, zero regions);
/// convert makes raw LUKS of it that qemu-img opens with the same secret and finds identical,
/// and converts that back to a qcow2-LUKS image that qemu-img checks clean and finds identical.
#[test]
fn qemu_made_qcow2_luks_converts_to_raw_luks_and_back() {
    let dir = tempdir();
    let d = dir.path();
    let seed = fresh_seed("convert qcow2 round trip");
    // 1..~3 MiB, not a multiple of the 64 KiB cluster.
    let sectors = random_sectors(seed, 1, 6000) | 1;
    let plain = d.join("plain.raw");
    write_file(&plain, &sparse_plaintext(sectors, seed));
    let key = d.join("pass");
    write_file(&key, b"convert me\n");
    let src = d.join("src.qcow2");
    check_qemu_img_luks(
        Command::new(qemu_img())
            .args(["convert", "-f", "raw", "-O", "qcow2", "--object"])
            .arg(secret_object(&key))
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ])
            .arg(&plain)
            .arg(&src),
    );

    let raw = d.join("volume.luks");
    let msg = convert_ok(&src, &raw, &key, &[]);
    assert!(msg.contains("qcow2-LUKS source"), "{msg}");
    assert!(msg.contains("raw LUKS"), "{msg}");
    assert_eq!(
        inspect_json(&raw)["version"],
        1,
        "a LUKS1 source stays LUKS1"
    );
    qemu_compare(&raw, &key, &plain);

    let back = d.join("back.qcow2");
    convert_ok(&raw, &back, &key, &["--format", "qcow2"]);
    qemu_compare(&back, &key, &plain);
    check(
        Command::new(qemu_img())
            .arg("check")
            .arg("--object")
            .arg(secret_object(&key))
            .arg("--image-opts")
            .arg(image_opts(&back)),
    );
    // Zero clusters stay unallocated: the file is no bigger than the allocated data plus
    // metadata (a dense image would hold every cluster).
    let zero_clusters = read_file(&plain)
        .chunks(65536)
        .filter(|c| c.iter().all(|&b| b == 0))
        .count() as u64;
    let dense = (sectors as u64 * 512).div_ceil(65536) * 65536;
    let size = std::fs::metadata(&back).unwrap().len();
    assert!(
        zero_clusters == 0 || size < dense + (4 << 20) - zero_clusters * 65536 + 65536,
        "qcow2 result of {size} bytes for {dense} bytes of guest disk with {zero_clusters} zero \
         clusters: zero clusters were written"
    );
}

/// LUKS1 and LUKS2 raw sources (volcrypt-made; LUKS2 with 4096-byte sectors and argon2id)
/// convert to qcow2-LUKS that qemu-img finds identical, saying what changed (LUKS1, 512-byte
/// sectors); raw results keep the source's sector size where LUKS2 allows it; and the volume
/// key survives a round trip through qcow2 (cryptsetup dumps the same key from both ends).
#[test]
fn luks1_and_luks2_sources_round_trip_keeping_the_volume_key() {
    let dir = tempdir();
    let d = dir.path();
    let seed = fresh_seed("convert luks1 luks2");
    // Whole 4 KiB sectors, so the LUKS2 source can use them.
    let sectors = random_sectors(seed, 8, 4000) / 8 * 8;
    let plain = d.join("plain.raw");
    write_file(&plain, &sparse_plaintext(sectors, seed));
    let key = d.join("pass");
    // qemu reads secrets as UTF-8 text.
    write_file(
        &key,
        format!("{}\n", hex(&random_bytes(20, seed ^ 1))).as_bytes(),
    );

    for (ty, kdf) in [("luks1", "pbkdf2"), ("luks2", "argon2id")] {
        let src = d.join(format!("src.{ty}"));
        check(
            volcrypt(["image", "encrypt", "--type", ty, "--key-file"])
                .arg(&key)
                .args(cheap_kdf(kdf))
                .arg("-o")
                .arg(&src)
                .arg(&plain),
        );
        let qcow = d.join(format!("{ty}.qcow2"));
        let msg = convert_ok(&src, &qcow, &key, &["--format", "qcow2"]);
        if ty == "luks2" {
            assert!(msg.contains("LUKS2 source, LUKS1 result"), "{msg}");
            assert!(
                msg.contains("sector size 4096 of the source becomes 512"),
                "{msg}"
            );
        }
        qemu_compare(&qcow, &key, &plain);

        // Back to raw, as a LUKS2 volume: volcrypt verifies it against the plaintext
        // (qemu-img 7.2 does not read LUKS2).
        let raw2 = d.join(format!("{ty}.back.luks2"));
        convert_ok(&qcow, &raw2, &key, &["--type", "luks2"]);
        check(
            volcrypt(["image", "verify", "--key-file"])
                .arg(&key)
                .arg("--plaintext")
                .arg(&plain)
                .arg(&raw2),
        );
        assert_eq!(
            volume_key_of(&src, &key),
            volume_key_of(&raw2, &key),
            "{ty}: the volume key changed on the way through qcow2"
        );
    }

    // raw LUKS2 -> raw LUKS2 keeps the 4096-byte sectors.
    let same = d.join("same.luks2");
    convert_ok(&d.join("src.luks2"), &same, &key, &[]);
    let j = inspect_json(&same);
    assert_eq!(
        (j["version"].as_u64(), j["sector_size"].as_u64()),
        (Some(2), Some(4096))
    );
    check(
        volcrypt(["image", "verify", "--key-file"])
            .arg(&key)
            .arg("--plaintext")
            .arg(&plain)
            .arg(&same),
    );
}

fn assert_absent(p: &Path, why: &str) {
    assert!(!p.exists(), "{why}: {} was left behind", p.display());
}

/// Refusals name the problem and leave no output: a wrong key (exit 2), an existing output
/// (exit 5, untouched), a truncated or damaged source (the partial output is removed), the
/// cipher options convert does not take, and --type luks2 for qcow2.
#[test]
fn refusals_name_the_problem_and_leave_no_output() {
    let dir = tempdir();
    let d = dir.path();
    let plain = d.join("plain.raw");
    write_file(&plain, &random_bytes(3 << 20, 0xc0de));
    let key = d.join("pass");
    write_file(&key, b"right");
    let wrong = d.join("wrong");
    write_file(&wrong, b"wrong");
    let raw = d.join("src.luks");
    check(
        volcrypt(["image", "encrypt", "--key-file"])
            .arg(&key)
            .args(FAST)
            .arg("-o")
            .arg(&raw)
            .arg(&plain),
    );
    let qcow = d.join("src.qcow2");
    convert_ok(&raw, &qcow, &key, &["--format", "qcow2"]);
    let out_path = d.join("out");

    // Wrong key.
    for src in [&raw, &qcow] {
        let out = convert(src, &out_path, &wrong, &[]);
        assert_eq!(code(&out), 2, "wrong key: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no key available"),
            "{}",
            stderr(&out)
        );
        assert_absent(&out_path, "wrong key");
    }

    // Existing output: refused before the KDF, left as it was.
    write_file(&out_path, b"precious");
    let out = convert(&raw, &out_path, &key, &[]);
    assert_eq!(code(&out), 5, "existing output: {}", stderr(&out));
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
    assert_eq!(read_file(&out_path), b"precious");
    std::fs::remove_file(&out_path).unwrap();

    // Options convert does not take.
    let out = convert(
        &raw,
        &out_path,
        &key,
        &["--format", "qcow2", "--type", "luks2"],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("LUKS1"), "{}", stderr(&out));
    assert_absent(&out_path, "--type luks2 for qcow2");

    // A raw source cut inside its header (a cut inside the payload of a LUKS "dynamic"
    // segment is indistinguishable from a smaller volume, for cryptsetup too).
    let cut = d.join("cut.luks");
    let bytes = read_file(&raw);
    write_file(&cut, &bytes[..1 << 20]);
    let out = convert(&cut, &out_path, &key, &[]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("cut.luks"), "{}", stderr(&out));
    assert_absent(&out_path, "truncated raw source");

    // A truncated qcow2 source: found while streaming, so the output had been created; it
    // must be removed.
    let cutq = d.join("cut.qcow2");
    let bytes = read_file(&qcow);
    write_file(&cutq, &bytes[..bytes.len() / 2]);
    for fmt in ["raw", "qcow2"] {
        let out = convert(&cutq, &out_path, &key, &["--format", fmt]);
        assert_ne!(code(&out), 0, "truncated qcow2 source to {fmt}");
        assert!(stderr(&out).contains("cut.qcow2"), "{}", stderr(&out));
        assert_absent(&out_path, "truncated qcow2 source");
    }

    // A damaged LUKS header inside the qcow2 image.
    let bad = d.join("bad.qcow2");
    let mut bytes = read_file(&qcow);
    let at = bytes
        .windows(6)
        .position(|w| w == b"LUKS\xba\xbe")
        .expect("LUKS header in the qcow2 image");
    bytes[at] = b'X';
    write_file(&bad, &bytes);
    let out = convert(&bad, &out_path, &key, &[]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("bad.qcow2"), "{}", stderr(&out));
    assert_absent(&out_path, "damaged source");

    // A plaintext source is not an encrypted image.
    let out = convert(&plain, &out_path, &key, &[]);
    assert_ne!(code(&out), 0);
    assert_absent(&out_path, "plaintext source");
}

/// `convert --key-id` takes the secret from the key manager (symmetric: its hex is the
/// passphrase, the os-brick rule, which is what qemu-img is given) and writes the Glance
/// property set of the result.
#[test]
fn key_id_from_the_key_manager_and_glance_properties() {
    let dir = tempdir();
    let d = dir.path();
    let cfg = keystore_config(d);
    let plain = d.join("plain.raw");
    write_file(&plain, &sparse_plaintext(2048 + 7, 0x1d));
    let hex_pass = d.join("hex.pass");
    write_file(&hex_pass, hex(&[0x42u8; 32]).as_bytes());
    let qcow = d.join("img.qcow2");
    check(
        volcrypt([
            "image", "encrypt", "--format", "qcow2", "--key-id", "img-key", "--config",
        ])
        .arg(&cfg)
        .args(FAST)
        .arg("-o")
        .arg(&qcow)
        .arg(&plain),
    );
    let raw = d.join("img.luks");
    let props = d.join("props.json");
    check(
        volcrypt(["image", "convert", "--key-id", "img-key", "--config"])
            .arg(&cfg)
            .args(FAST)
            .arg("-o")
            .arg(&raw)
            .arg("--glance-properties")
            .arg(&props)
            .arg(&qcow),
    );
    qemu_compare(&raw, &hex_pass, &plain);
    let p: serde_json::Value = serde_json::from_slice(&read_file(&props)).unwrap();
    assert_eq!(p["disk_format"], "luks", "{p}");
    assert_eq!(p["os_encrypt_key_id"], "img-key", "{p}");
    assert_eq!(p["os_encrypt_format"], "LUKSv1", "{p}");
    check(
        volcrypt(["image", "check-properties"])
            .arg(&raw)
            .arg(&props),
    );
}

/// An interrupted convert (SIGTERM, SIGINT) removes the output file it created and exits
/// with 128 + the signal. The source is an empty 1 GiB qcow2-LUKS image (cheap to make; the
/// raw result is 1 GiB of ciphertext, so the signal arrives long before the end).
#[test]
fn an_interrupted_convert_removes_its_output() {
    let dir = tempdir();
    let d = dir.path();
    let key = d.join("pass");
    write_file(&key, b"interrupt me");
    let src = d.join("empty.qcow2");
    check_qemu_img_luks(
        Command::new(qemu_img())
            .args(["create", "-q", "-f", "qcow2", "--object"])
            .arg(secret_object(&key))
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ])
            .arg(&src)
            .arg("1G"),
    );
    for (signal, name) in [(libc_sig::TERM, "TERM"), (libc_sig::INT, "INT")] {
        let out_path = d.join(format!("out-{name}.luks"));
        let mut child = volcrypt(["image", "convert", "--threads", "1", "--key-file"])
            .arg(&key)
            .args(FAST)
            .arg("--output")
            .arg(&out_path)
            .arg(&src)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start volcrypt");
        let started = std::time::Instant::now();
        while !out_path.exists() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "convert never created its output"
            );
            if let Some(status) = child.try_wait().unwrap() {
                panic!("convert ended before creating its output: {status}");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        check(
            Command::new("kill")
                .arg(format!("-{name}"))
                .arg(child.id().to_string()),
        );
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(128 + signal),
            "SIG{name}: the convert was not interrupted (it ended: {}): {}",
            out.status,
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("removed the partial output"),
            "{}",
            stderr(&out)
        );
        assert_absent(&out_path, &format!("SIG{name}"));
    }
}

/// Signal numbers (Linux).
mod libc_sig {
    pub const INT: i32 = 2;
    pub const TERM: i32 = 15;
}
