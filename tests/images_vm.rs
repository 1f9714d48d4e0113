//! Volumes created from encrypted images, as Cinder does it: a raw LUKS image (made by
//! `volcrypt image encrypt` as LUKS1 and LUKS2, and by `qemu-img convert -O luks`) is written
//! onto a block device, the agent attaches it with the image's secret (a `passphrase` secret
//! used verbatim, a `symmetric` one hexlified), the plaintext reads back, and a rekey then gives
//! the volume its own key (the image's key no longer opens it; the volume's does, after a
//! detach and attach too).
//!
//! Needs root and dm-crypt: natively every test is reported *ignored*; the VM stage runs them
//! (`tests/vm/attach-suite.sh image_`), and there a missing prerequisite fails.
#![cfg(feature = "system")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::agent::Agent;
use common::{check, hex, need, qemu_img, random_bytes, sh};
use volcrypt::keys::{Keystore, Secret};
use volcrypt::secret::{SecretBytes, SecretType};

const FAST_KDF: &str = "[volume.pbkdf]\nkind = \"pbkdf2\"\niterations = 1000\n";
const PLAIN_LEN: usize = 4 << 20;

/// A loop device over a file, detached at the end.
struct Loop(PathBuf);

impl Loop {
    fn over(file: &Path) -> Loop {
        Loop(PathBuf::from(sh(&format!(
            "losetup --find --show {}",
            file.display()
        ))))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Make the encrypted image of `plain` at `out` with `maker`, whose LUKS passphrase is
/// `passphrase` (what the image's secret derives to).
fn make_image(maker: &str, plain: &Path, out: &Path, passphrase: &[u8], dir: &Path) {
    let pass_file = dir.join("image.pass");
    std::fs::write(&pass_file, passphrase).unwrap();
    let fast = ["--pbkdf", "pbkdf2", "--pbkdf-iterations", "1000"];
    match maker {
        "volcrypt-luks1" | "volcrypt-luks2" => {
            let kind = &maker["volcrypt-".len()..];
            check(
                Command::new(common::VOLCRYPT)
                    .args(["image", "encrypt", "--type", kind])
                    .args(fast)
                    .arg("--key-file")
                    .arg(&pass_file)
                    .arg("--output")
                    .arg(out)
                    .arg(plain),
            );
        }
        "qemu-img" => {
            common::check_qemu_img_luks(
                Command::new(qemu_img())
                    .args(["convert", "-f", "raw", "-O", "luks"])
                    .arg("--object")
                    .arg(format!("secret,id=sec0,file={}", pass_file.display()))
                    .args(["-o", "key-secret=sec0,iter-time=10"])
                    .arg(plain)
                    .arg(out),
            );
        }
        other => panic!("unknown image maker {other}"),
    }
}

/// Images of each maker, opened with each secret type, read back, then rekeyed to the volume's
/// own key.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn image_volumes_open_with_the_image_secret_and_rekey_to_their_own() {
    need::require_dm_crypt();
    let agent = Agent::start_with("", FAST_KDF);
    let dir = agent.dir.path();
    let ks = Keystore::create(dir.join("keys")).unwrap();
    let volume_key = [0x3cu8; 32];
    ks.put(
        "volume-key",
        &Secret::new(SecretType::Symmetric, SecretBytes::new(volume_key.to_vec())),
    )
    .unwrap();
    let plain_path = dir.join("plain.raw");
    let plain = random_bytes(PLAIN_LEN, 0x1a9e);
    std::fs::write(&plain_path, &plain).unwrap();

    let secrets: [(SecretType, Vec<u8>); 2] = [
        // Nova-style passphrase text, trailing newline and all: used byte for byte.
        (
            SecretType::Passphrase,
            b"image passphrase \xc3\xa9\n".to_vec(),
        ),
        (SecretType::Symmetric, (0u8..32).collect()),
    ];
    for maker in ["volcrypt-luks1", "volcrypt-luks2", "qemu-img"] {
        for (n, (kind, payload)) in secrets.iter().enumerate() {
            let what = format!("{maker}/{kind:?}");
            let key_id = format!("image-key-{maker}-{n}");
            ks.put(
                &key_id,
                &Secret::new(kind.clone(), SecretBytes::new(payload.clone())),
            )
            .unwrap();
            let passphrase = match kind {
                SecretType::Passphrase => payload.clone(),
                _ => hex(payload).into_bytes(),
            };
            let image = dir.join(format!("{maker}-{n}.img"));
            make_image(maker, &plain_path, &image, &passphrase, dir);

            // Cinder's copy of the image onto the new volume.
            let disk = dir.join(format!("{maker}-{n}.disk"));
            let image_len = std::fs::metadata(&image).unwrap().len();
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(image_len + (1 << 20))
                .unwrap();
            sh(&format!(
                "dd if={} of={} bs=1M conv=notrunc status=none",
                image.display(),
                disk.display()
            ));
            let lo = Loop::over(&disk);
            let id = format!("img-{n}-{maker}");
            let body = |key: &str| {
                format!(
                    r#"{{"volume_id": "{id}", "device_path": "{}",
                        "encryption": {{"provider": "luks", "control_location": "front-end",
                                        "encryption_key_id": "{key}"}}}}"#,
                    lo.0.display()
                )
            };
            let attach = |key: &str| {
                agent.checked(
                    "POST",
                    "/v1/attachments",
                    "/v1/attachments",
                    Some(body(key).as_bytes()),
                )
            };
            let (s, v) = attach(&key_id);
            assert_eq!(s, 201, "{what}: {v}");
            assert_eq!(
                v["formatted"], false,
                "{what}: an image volume was formatted: {v}"
            );
            let mapper = PathBuf::from(v["device"].as_str().unwrap());
            let read_back = std::fs::read(&mapper).unwrap();
            assert!(
                read_back.len() >= PLAIN_LEN && read_back[..PLAIN_LEN] == plain[..],
                "{what}: the volume does not hold the image's plaintext"
            );

            let path = format!("/v1/attachments/{id}/rekey");
            let (s, v) = agent.checked(
                "POST",
                "/v1/attachments/{volume_id}/rekey",
                &path,
                Some(br#"{"new_key_id": "volume-key"}"#),
            );
            assert_eq!(s, 200, "{what}: {v}");
            assert_eq!(v["previous_key_id"], key_id.as_str(), "{what}: {v}");
            let opens = |pass: &[u8]| {
                common::sh_in(
                    &format!(
                        "cryptsetup open --test-passphrase --key-file=- {}",
                        lo.0.display()
                    ),
                    pass,
                )
                .status
                .success()
            };
            assert!(
                !opens(&passphrase),
                "{what}: the image key still opens the volume"
            );
            assert!(
                opens(hex(&volume_key).as_bytes()),
                "{what}: the volume key does not open it"
            );

            let path = format!("/v1/attachments/{id}");
            let (s, v) = agent.checked("DELETE", "/v1/attachments/{volume_id}", &path, None);
            assert_eq!(s, 200, "{what}: {v}");
            let (s, v) = attach("volume-key");
            assert_eq!(s, 201, "{what}: {v}");
            assert_eq!(v["formatted"], false, "{what}: {v}");
            let read_back = std::fs::read(&mapper).unwrap();
            assert!(
                read_back[..PLAIN_LEN] == plain[..],
                "{what}: after the rekey"
            );
            let (s, v) = agent.checked("DELETE", "/v1/attachments/{volume_id}", &path, None);
            assert_eq!(s, 200, "{what}: {v}");
            std::fs::remove_file(&image).unwrap();
        }
    }
}

/// Cinder's "volume from a qcow2-LUKS image" without the plaintext touching a disk: an image
/// made by qemu-img is converted by `volcrypt image convert --key-id` (the secret straight
/// from the key manager) onto a block device, which the agent then attaches with the image's
/// secret; the plaintext reads back through the mapping, as LUKS1 (the source's version) and
/// as LUKS2. A device too small and a device in use (held by the mapping) are refused by name
/// and left alone.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn image_qcow2_converted_onto_a_block_device_attaches_with_the_image_secret() {
    need::require_dm_crypt();
    let agent = Agent::start_with("", FAST_KDF);
    let dir = agent.dir.path();
    let config = dir.join("volcrypt.toml");
    let ks = Keystore::create(dir.join("keys")).unwrap();
    let secret: Vec<u8> = (100u8..132).collect();
    ks.put(
        "qcow2-image-key",
        &Secret::new(SecretType::Symmetric, SecretBytes::new(secret.clone())),
    )
    .unwrap();
    let pass_file = dir.join("image.pass");
    std::fs::write(&pass_file, hex(&secret)).unwrap();
    // Random data with a zero hole (unallocated clusters in the qcow2 image) and a size that
    // is not a whole number of clusters.
    let len = PLAIN_LEN + 3 * 512;
    let mut plain = random_bytes(len, 0xc0c2);
    plain[(1 << 20)..(2 << 20)].fill(0);
    let plain_path = dir.join("plain.raw");
    std::fs::write(&plain_path, &plain).unwrap();
    let image = dir.join("image.qcow2");
    common::check_qemu_img_luks(
        Command::new(qemu_img())
            .args(["convert", "-f", "raw", "-O", "qcow2", "--object"])
            .arg(format!("secret,id=sec0,file={}", pass_file.display()))
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ])
            .arg(&plain_path)
            .arg(&image),
    );
    std::fs::remove_file(&plain_path).unwrap();
    let convert = |device: &Path, extra: &[&str]| {
        common::run(
            Command::new(common::VOLCRYPT)
                .args([
                    "image",
                    "convert",
                    "--key-id",
                    "qcow2-image-key",
                    "--config",
                ])
                .arg(&config)
                .args(["--pbkdf", "pbkdf2", "--pbkdf-iterations", "1000"])
                .args(extra)
                .arg("--output")
                .arg(device)
                .arg(&image),
        )
    };

    // Too small: refused naming both sizes, the device untouched.
    let small = dir.join("small.disk");
    std::fs::write(&small, vec![0x5au8; 2 << 20]).unwrap();
    let small_lo = Loop::over(&small);
    let out = convert(&small_lo.0, &[]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!("has {} bytes", 2 << 20)) && err.contains("needs"),
        "{err}"
    );
    drop(small_lo);
    assert!(
        std::fs::read(&small).unwrap().iter().all(|&b| b == 0x5a),
        "a refused device was written"
    );

    let disk = dir.join("volume.disk");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    let lo = Loop::over(&disk);
    for (n, extra) in [&[][..], &["--type", "luks2"][..]].into_iter().enumerate() {
        let what = format!("convert {extra:?}");
        let out = convert(&lo.0, extra);
        assert!(
            out.status.success(),
            "{what}: {}: {}{}\nkernel log:\n{}",
            out.status,
            common::stdout(&out),
            common::stderr(&out),
            sh("dmesg | tail -n 8")
        );
        let id = format!("qcow2-converted-{n}");
        let body = format!(
            r#"{{"volume_id": "{id}", "device_path": "{}",
                "encryption": {{"provider": "luks", "control_location": "front-end",
                                "encryption_key_id": "qcow2-image-key"}}}}"#,
            lo.0.display()
        );
        let (s, v) = agent.checked(
            "POST",
            "/v1/attachments",
            "/v1/attachments",
            Some(body.as_bytes()),
        );
        assert_eq!(s, 201, "{what}: {v}");
        assert_eq!(
            v["formatted"], false,
            "{what}: the volume was formatted: {v}"
        );
        let mapper = PathBuf::from(v["device"].as_str().unwrap());
        let read_back = std::fs::read(&mapper).unwrap();
        assert!(
            read_back.len() >= len && read_back[..len] == plain[..],
            "{what}: the volume does not hold the image's plaintext"
        );
        let version = sh(&format!(
            "cryptsetup luksDump {} | sed -n 's/^Version:[[:space:]]*//p'",
            lo.0.display()
        ));
        assert_eq!(version.trim(), ["1", "2"][n], "{what}");

        // In use (held by the mapping): refused, the mapping keeps working.
        let out = convert(&lo.0, &[]);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(5), "{what}: {err}");
        assert!(err.contains("in use"), "{what}: {err}");
        assert!(
            std::fs::read(&mapper).unwrap()[..len] == plain[..],
            "{what}: a refused convert changed the volume"
        );

        let path = format!("/v1/attachments/{id}");
        let (s, v) = agent.checked("DELETE", "/v1/attachments/{volume_id}", &path, None);
        assert_eq!(s, 200, "{what}: {v}");
    }
}

/// With `register_consumers = true`, the agent registers this host as a consumer of a
/// volume's Barbican secret while the volume is attached, moves it to the new secret on a
/// rekey, and removes it on detach.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn barbican_consumers_follow_the_attachment() {
    need::require_dm_crypt();
    let url = common::barbican::require_url();
    let km = common::barbican::key_manager_toml(&url)
        .replace("retries = 1\n", "retries = 1\nregister_consumers = true\n");
    let agent = Agent::start_with("", &format!("{FAST_KDF}{km}"));
    let first = common::barbican::create_secret(&url, "symmetric", &[0x11; 32]);
    let second = common::barbican::create_secret(&url, "passphrase", b"second secret");
    let disk = agent.dir.path().join("consumer.disk");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    let lo = Loop::over(&disk);
    let id = "6f1d2c0a-3b4e-4c5d-8e9f-consumer0001";
    let body = format!(
        r#"{{"volume_id": "{id}", "device_path": "{}",
            "encryption": {{"provider": "luks2", "control_location": "front-end",
                            "encryption_key_id": "{first}"}}}}"#,
        lo.0.display()
    );
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(body.as_bytes()),
    );
    assert_eq!(s, 201, "{v}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let me = (
        format!("volcrypt@{}", host.trim()),
        "volume".to_owned(),
        id.to_owned(),
    );
    assert_eq!(
        common::barbican::consumers(&url, &first),
        std::slice::from_ref(&me)
    );

    let path = format!("/v1/attachments/{id}/rekey");
    let rekey = format!(r#"{{"new_key_id": "{second}"}}"#);
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments/{volume_id}/rekey",
        &path,
        Some(rekey.as_bytes()),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(common::barbican::consumers(&url, &first), []);
    assert_eq!(common::barbican::consumers(&url, &second), [me]);

    let path = format!("/v1/attachments/{id}");
    let (s, v) = agent.checked("DELETE", "/v1/attachments/{volume_id}", &path, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(common::barbican::consumers(&url, &second), []);
}
