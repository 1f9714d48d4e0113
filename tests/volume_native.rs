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
    Context::new(
        keys,
        VolumeConfig {
            state_dir: dir.join("state"),
            by_id_dir: dir.join("by-id"),
            ..VolumeConfig::default()
        },
    )
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
        assert!(!out.encrypted(), "{enc}");
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
    assert_eq!(ExitStatus::from(err.kind()), ExitStatus::Invalid);
    let err = volume::detach(&c, "v1", Some(std::path::Path::new("/dev/sdz"))).unwrap_err();
    assert!(
        err.to_string().contains("device-mapper is not available"),
        "{err}"
    );

    // Without device-mapper `status` still lists what the journal wants, and says why the live
    // state is missing; detach, status and reconcile never build the key manager, so a keystore
    // that cannot be opened does not get in their way (nor is it created as a side effect).
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let record = serde_json::json!({
        "volume_id": "jv", "mapping_name": "crypt-jv", "device_path": "/dev/disk/by-path/jv",
        "backing_device": "/dev/nonexistent-jv", "backing_devno": {"major": 7, "minor": 251},
        "format": "luks2", "cipher": null, "key_size": null, "key_manager": "keystore",
        "key_id": "k-jv", "derivation": "raw",
        "flags": {"allow_discards": false, "no_read_workqueue": false, "no_write_workqueue": false},
        "formatted": false, "stable_link": null, "device_link_previous": null,
        "attached_at": 1, "phase": "attached"
    });
    std::fs::write(state.join("jv.json"), record.to_string()).unwrap();
    let keystore = dir.path().join("no").join("such").join("keystore");
    let cfg = dir.path().join("volcrypt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[key_manager.keystore]\ndir = \"{}\"\ncreate = false\n",
            keystore.display()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let run = |args: &[&str]| {
        Command::new(bin)
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .env("VOLCRYPT_CONFIG", &cfg)
            .output()
            .unwrap()
    };
    let o = run(&["status"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("device-mapper is unavailable"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one warning line: {stderr}");
    assert!(
        stdout.contains("jv: attached (journal only)") && stdout.contains("k-jv"),
        "{stdout}"
    );
    let o = run(&["status", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["device_mapper"]["available"], false, "{v}");
    assert_eq!(v["attachments"][0]["volume_id"], "jv", "{v}");
    assert_eq!(v["attachments"][0]["phase"], "attached", "{v}");

    let o = run(&["detach", "jv"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("device-mapper is not available"),
        "{stderr}"
    );
    assert!(!stderr.contains("keystore"), "{stderr}");
    let o = run(&["reconcile"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("reconcile could not run"), "{stderr}");
    assert!(!keystore.exists(), "no command created the keystore");
    assert!(state.join("jv.json").exists(), "the record is kept");
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

/// `volcrypt verify`: an unmanaged volume is exit 4 naming it; malformed modes are exit 1
/// naming the option, before anything is read.
#[test]
fn cli_verify_names_unknown_volumes_and_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_volcrypt"))
            .arg("verify")
            .args(args)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--keystore-dir")
            .arg(dir.path().join("keys"))
            .output()
            .unwrap()
    };
    let o = run(&["no-such-vol"]);
    assert_eq!(
        o.status.code(),
        Some(ExitStatus::WrongDevice.code()),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-vol"));
    for (args, names) in [
        (&["v", "--range", "12"][..], "START:LEN"),
        (&["v", "--max-rate", "0"][..], "--max-rate"),
    ] {
        let o = run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(ExitStatus::Invalid.code()),
            "{args:?}: {err}"
        );
        assert!(err.contains(names), "{args:?}: {err}");
    }
    // Modes exclude each other (clap's usage error).
    let o = run(&["v", "--full", "--sample", "5"]);
    assert_ne!(o.status.code(), Some(0));
}
