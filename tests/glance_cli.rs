//! The image side of OpenStack's encrypted-image workflow, natively: `image encrypt --key-id`
//! (the key straight from the key manager, no key file), the Glance property set written by
//! `encrypt --glance-properties` and derived by `inspect --glance-properties` (for images made
//! by volcrypt, raw and qcow2, and by `qemu-img`), and `check-properties` naming every
//! disagreement (exit 6).

mod common;

use std::path::Path;

use common::{check, code, keystore_config, qemu_img, random_bytes, run, tempdir, volcrypt};
use serde_json::Value;

const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-iterations", "1000"];

fn props_of(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `encrypt --key-id` takes the secret from the key manager with the os-brick rule (a symmetric
/// secret's lowercase hex opens the image), and writes the property set that
/// `check-properties` accepts, for raw LUKS2 and qcow2; a property changed is named.
#[test]
fn encrypt_with_a_key_id_writes_properties_that_check_clean() {
    let dir = tempdir();
    let d = dir.path();
    let cfg = keystore_config(d);
    let plain = d.join("plain.raw");
    std::fs::write(&plain, random_bytes(3 << 20, 0x61a9)).unwrap();
    let hex_pass = d.join("hex.pass");
    std::fs::write(&hex_pass, common::hex(&[0x42u8; 32])).unwrap();

    for (format, disk_format, luks) in [("raw", "luks", "LUKSv2"), ("qcow2", "qcow2", "LUKSv1")] {
        let img = d.join(format!("image.{format}"));
        let props = d.join(format!("{format}.json"));
        check(
            volcrypt([
                "image", "encrypt", "--format", format, "--key-id", "img-key",
            ])
            .arg("--config")
            .arg(&cfg)
            .args(FAST)
            .arg("--output")
            .arg(&img)
            .arg("--glance-properties")
            .arg(&props)
            .arg(&plain),
        );
        let p = props_of(&props);
        assert_eq!(p["disk_format"], disk_format, "{p}");
        assert_eq!(p["container_format"], "bare", "{p}");
        assert_eq!(p["os_encrypt_format"], luks, "{p}");
        assert_eq!(p["os_encrypt_key_id"], "img-key", "{p}");
        assert_eq!(p["os_encrypt_key_deletion_policy"], "do_not_delete", "{p}");
        assert_eq!(p["os_decrypt_container_format"], "bare", "{p}");
        assert_eq!(p["os_decrypt_size"], (3u64 << 20).to_string(), "{p}");
        // The secret's hex is the passphrase (os-brick's rule for a symmetric secret).
        check(
            volcrypt(["image", "check-key"])
                .arg(&img)
                .arg("--key-file")
                .arg(&hex_pass),
        );
        let out = check(
            volcrypt(["image", "check-properties"])
                .arg(&img)
                .arg(&props),
        );
        let f: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(f["disagreements"], serde_json::json!([]), "{f}");

        let mut wrong = p.clone();
        wrong["os_decrypt_size"] = "4096".into();
        wrong["disk_format"] = "raw".into();
        std::fs::write(&props, wrong.to_string()).unwrap();
        let out = run(volcrypt(["image", "check-properties"])
            .arg(&img)
            .arg(&props));
        assert_eq!(code(&out), 6, "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("os_decrypt_size is 4096"), "{err}");
        assert!(err.contains("disk_format is \"raw\""), "{err}");
    }

    let out = run(volcrypt(["image", "encrypt", "--key-id", "absent"])
        .arg("--config")
        .arg(&cfg)
        .arg("--output")
        .arg(d.join("x.img"))
        .arg(&plain));
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent"));
    assert!(
        !d.join("x.img").exists(),
        "an image was written without a key"
    );
}

/// `inspect --glance-properties -` derives the set from an image qemu-img made, and legacy
/// Cinder property names are accepted with notes.
#[test]
fn inspect_derives_properties_of_a_qemu_img_image_and_legacy_names_are_notes() {
    let dir = tempdir();
    let d = dir.path();
    let plain = d.join("plain.raw");
    std::fs::write(&plain, random_bytes(1 << 20, 0x77)).unwrap();
    let pass = d.join("pass");
    std::fs::write(&pass, b"qemu image pass").unwrap();
    let img = d.join("qemu.luks");
    common::check_qemu_img_luks(
        std::process::Command::new(qemu_img())
            .args(["convert", "-f", "raw", "-O", "luks", "--object"])
            .arg(format!("secret,id=sec0,file={}", pass.display()))
            .args(["-o", "key-secret=sec0,iter-time=10"])
            .arg(&plain)
            .arg(&img),
    );
    let out = check(
        volcrypt(["image", "inspect", "--glance-properties", "-"])
            .args([
                "--os-encrypt-key-id",
                "6f1d2c0a-3b4e-4c5d-8e9f-0a1b2c3d4e5f",
            ])
            .arg(&img),
    );
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["disk_format"], "luks", "{p}");
    assert_eq!(p["os_encrypt_format"], "LUKSv1", "{p}");
    assert_eq!(p["os_decrypt_size"], (1u64 << 20).to_string(), "{p}");

    let mut legacy = p.as_object().unwrap().clone();
    let key = legacy.remove("os_encrypt_key_id").unwrap();
    legacy.remove("os_encrypt_key_deletion_policy");
    legacy.insert("cinder_encryption_key_id".into(), key);
    legacy.insert(
        "cinder_encryption_key_deletion_policy".into(),
        "on_image_deletion".into(),
    );
    let file = d.join("legacy.json");
    std::fs::write(&file, Value::Object(legacy).to_string()).unwrap();
    let out = check(volcrypt(["image", "check-properties"]).arg(&img).arg(&file));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cinder_encryption_key_id is the legacy"),
        "{err}"
    );
    assert!(err.contains("cinder_encryption_key_deletion_policy is the legacy"));

    let array = d.join("array.json");
    std::fs::write(&array, "[1, 2]").unwrap();
    let out = run(volcrypt(["image", "check-properties"])
        .arg(&img)
        .arg(&array));
    assert_eq!(code(&out), 1, "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a JSON object"));
}
