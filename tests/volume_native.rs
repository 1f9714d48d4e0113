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

#[test]
fn missing_device_mapper_is_one_clear_error() {
    if !dm_missing() {
        notice("skipped: this host has device-mapper");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::create(dir.path().join("keys")).unwrap();
    let c = ctx(dir.path(), &ks);
    let req = AttachRequest::from_json(
        br#"{"volume_id":"v1","device_path":"/dev/sdz","encryption":{"provider":"luks","control_location":"front-end","encryption_key_id":"k"}}"#,
    )
    .unwrap();
    let err = volume::attach(&c, &req).unwrap_err();
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

/// Print past the test harness's output capture, so skips are visible in a normal run.
fn notice(msg: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{msg}");
}
