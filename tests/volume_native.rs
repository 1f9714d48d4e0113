//! Attach-engine behaviour that needs no device-mapper: raw attaches, request errors through
//! the CLI, and the single clear error on hosts without device-mapper (like the build hosts).
#![cfg(feature = "system")]

use std::io::Write;
use std::process::{Command, Stdio};

use volcrypt::error::ExitStatus;
use volcrypt::keys::Keystore;
use volcrypt::request::AttachRequest;
use volcrypt::volume::{self, Context, VolumeConfig};

fn dm_missing() -> bool {
    !std::path::Path::new("/dev/mapper/control").exists()
        || !std::path::Path::new("/sys/module/dm_mod").exists()
}

fn ctx<'a>(dir: &std::path::Path, keys: &'a Keystore) -> Context<'a> {
    Context {
        keys,
        config: VolumeConfig {
            state_dir: dir.join("state"),
            by_id_dir: dir.join("by-id"),
            ..VolumeConfig::default()
        },
    }
}

#[test]
fn back_end_and_noop_volumes_attach_raw_without_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::create(dir.path().join("keys")).unwrap();
    let c = ctx(dir.path(), &ks);
    for enc in [
        r#"{"provider":"luks","control_location":"back-end","encryption_key_id":"k"}"#,
        r#"{"provider":"nova.volume.encryptors.nop.NoOpEncryptor","control_location":"front-end"}"#,
        r#"{"provider":"luks"}"#,
    ] {
        let json = format!(r#"{{"volume_id":"v1","device_path":"/dev/sdz","encryption":{enc}}}"#);
        let req = AttachRequest::from_json(json.as_bytes()).unwrap();
        let out = volume::attach(&c, &req).unwrap();
        assert!(!out.encrypted, "{enc}");
        assert_eq!(out.device, std::path::PathBuf::from("/dev/sdz"));
        assert!(out.raw_reason.is_some());
    }
    assert!(!dir.path().join("state").exists());
    assert!(!dir.path().join("by-id").exists());
}

/// Without device-mapper (the build hosts) an attach is one clear error naming it; where
/// device-mapper exists (the VM stage runs this binary too) the same attach gets past that check
/// and is refused for its missing device instead. Either way the test asserts an outcome.
#[test]
fn missing_device_mapper_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::create(dir.path().join("keys")).unwrap();
    let c = ctx(dir.path(), &ks);
    let req = AttachRequest::from_json(
        br#"{"volume_id":"v1","device_path":"/dev/sdz","encryption":{"provider":"luks","control_location":"front-end","encryption_key_id":"k"}}"#,
    )
    .unwrap();
    let err = volume::attach(&c, &req).unwrap_err();
    if !dm_missing() {
        let text = err.to_string();
        assert!(
            text.contains("/dev/sdz") && !text.contains("device-mapper is not available"),
            "{text}"
        );
        assert!(
            !dir.path().join("state").exists()
                || std::fs::read_dir(dir.path().join("state")).unwrap().count() == 0
        );
        return;
    }
    assert!(
        err.to_string().contains("device-mapper is not available"),
        "{err}"
    );
    assert_eq!(err.exit_status(), ExitStatus::Invalid);
    let err = volume::detach(&c, "v1", Some(std::path::Path::new("/dev/sdz"))).unwrap_err();
    assert!(
        err.to_string().contains("device-mapper is not available"),
        "{err}"
    );

    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let o = Command::new(bin)
        .args(["status", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("device-mapper is not available"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "one error line expected: {stderr}"
    );
}

#[test]
fn cli_rejects_malformed_requests_naming_the_field() {
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[u8], &str); 4] = [
        (b"{not json", "JSON"),
        (
            br#"{"volume_id":"x","device_path":"/dev/sdz","encryption":{"provider":"LUKS","control_location":"front-end","encryption_key_id":"k"}}"#,
            "encryption.provider",
        ),
        (
            br#"{"volume_id":"x","device_path":"/dev/sdz","encryption":{"provider":"luks","control_location":"front-end"}}"#,
            "encryption.encryption_key_id",
        ),
        (br#"{"volume_id":"x","device_path":"/dev/sdz","encryption":{"key_size":"big"}}"#, "encryption.key_size"),
    ];
    for (input, field) in cases {
        let mut child = Command::new(bin)
            .args(["attach", "--request", "-", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--by-id-dir")
            .arg(dir.path().join("by-id"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(field), "{field} not named: {stderr}");
        assert!(o.stdout.is_empty());
    }
    assert!(!dir.path().join("state").exists());
}

/// The CLI resolves a device selector against the devices present (no waiting: that is the
/// agent's job): nothing matching is exit 4 naming the selector, a wait is refused (exit 1).
#[test]
fn cli_resolves_selectors_now_and_leaves_waiting_to_the_agent() {
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let dir = tempfile::tempdir().unwrap();
    let uuid = "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55";
    let cases = [
        (
            format!(r#"{{"volume_id":"v8","device":{{"luks_uuid":"{uuid}"}}}}"#),
            4,
            "no block device matches LUKS UUID",
        ),
        (
            format!(
                r#"{{"volume_id":"v8","device":{{"luks_uuid":"{uuid}"}},"wait_for_device":{{"timeout_secs":5}}}}"#
            ),
            1,
            "--socket",
        ),
        (
            r#"{"volume_id":"v8","device":{"luks_uuid":"x"}}"#.to_owned(),
            1,
            "device.luks_uuid",
        ),
    ];
    for (body, code, want) in cases {
        let req = dir.path().join("req.json");
        std::fs::write(&req, &body).unwrap();
        let o = Command::new(bin)
            .args(["attach", "--request"])
            .arg(&req)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{body}: {stderr}");
        assert!(stderr.contains(want), "{body}: {stderr}");
    }
    assert!(!dir.path().join("state").exists());
}

#[test]
fn raw_attach_through_the_cli_prints_the_raw_device() {
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("req.json");
    std::fs::write(
        &req,
        br#"{"volume_id":"v9","device_path":"/dev/sdz","encryption":{"provider":"luks","control_location":"back-end","encryption_key_id":"k"}}"#,
    )
    .unwrap();
    let o = Command::new(bin)
        .args(["attach", "--request"])
        .arg(&req)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["encrypted"], false);
    assert_eq!(v["device"], "/dev/sdz");
    assert!(v["raw_reason"].as_str().unwrap().contains("back-end"));
}
