//! The real `volcrypt serve` binary on a socket in a temp dir, driven over HTTP: health, the
//! status of every kind of bad request, unknown volumes, attach on this host, the peer check,
//! socket permissions, metrics, the stale-socket rule and graceful shutdown. Every response is
//! also checked against docs/openapi.yaml.
//!
//! Runs as root natively, as make test does (the peer tests switch uid with setpriv, and fail
//! when not root); on a host without device-mapper an attach must fail with 503 and the engine's
//! "device-mapper is not available", on a host with it the unknown device is named instead.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use common::agent::{Agent, BIN, OpenApi, assert_error};
use common::need::{self, dm_available};

const GOOD: &str = r#"{"volume_id": "vol-1", "device_path": "/dev/disk/by-path/nonexistent-lun-1",
  "encryption": {"provider": "luks", "control_location": "front-end",
                 "cipher": "aes-xts-plain64", "key_size": 256, "encryption_key_id": "key-1"}}"#;

#[test]
fn health_reports_dm_crypt_state_and_budget() {
    let agent = Agent::start("kdf_memory_budget_mib = 3000");
    let (status, v) = agent.checked("GET", "/v1/health", "/v1/health", None);
    assert_eq!(v["kdf_memory_budget_mib"], 3000);
    assert_eq!(v["operations_in_flight"], 0);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["key_managers"].as_array().unwrap().len(), 1);
    assert_eq!(v["key_managers"][0]["kind"], "keystore");
    assert_eq!(v["key_managers"][0]["reachable"], true, "{v}");
    let r = agent.health_after_reconcile();
    if !dm_available() {
        assert_eq!(r["reconcile"]["checked"], false, "{r}");
        let d = r["reconcile"]["detail"].as_str().unwrap();
        assert!(d.contains("device-mapper is not available"), "{d}");
    }
    if dm_available() {
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["status"], "ok");
        assert_eq!(v["dm_crypt"]["ok"], true);
    } else {
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["status"], "degraded");
        assert_eq!(v["dm_crypt"]["ok"], false);
        let d = v["dm_crypt"]["detail"].as_str().unwrap();
        assert!(d.contains("device-mapper is not available"), "{d}");
    }
}

#[test]
fn health_reports_an_unusable_key_store() {
    let agent = Agent::start("");
    // Key material readable by others: the keystore refuses it, health says so.
    let keys = agent.dir.path().join("keys");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (status, v) = agent.checked("GET", "/v1/health", "/v1/health", None);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["key_managers"][0]["reachable"], false, "{v}");
    assert!(
        v["key_managers"][0]["detail"]
            .as_str()
            .unwrap()
            .contains(&keys.display().to_string()),
        "{v}"
    );
}

#[test]
fn bad_requests_get_400_or_413_naming_the_field() {
    let agent = Agent::start("");
    let post =
        |body: &[u8]| agent.checked("POST", "/v1/attachments", "/v1/attachments", Some(body));

    let (s, v) = post(b"{\"volume_id\": ");
    assert_error(s, &v, 400, "invalid_json", None);

    // Neither device_path nor a device selector.
    let (s, v) = post(br#"{"volume_id": "v1"}"#);
    assert_error(s, &v, 400, "invalid_request", Some("device_path"));

    // Device selectors and waits: shapes checked before any device is looked for.
    for (body, field) in [
        (
            r#"{"volume_id": "v1", "device_path": "/dev/x", "device": {"serial": "s"}}"#,
            "device",
        ),
        (
            r#"{"volume_id": "v1", "device": {"serial": "s", "wwn": "0x1"}}"#,
            "device",
        ),
        (
            r#"{"volume_id": "v1", "device": {"luks_uuid": "nope"}}"#,
            "device.luks_uuid",
        ),
        (
            r#"{"volume_id": "v1", "device": {"by_path": "/dev/sdb"}}"#,
            "device.by_path",
        ),
        (
            r#"{"volume_id": "v1", "device": {"wwn": "xyz"}, "wait_for_device": {"timeout_secs": 10}}"#,
            "device.wwn",
        ),
        (
            r#"{"volume_id": "v1", "device": {"serial": "s"}, "wait_for_device": {"timeout_secs": 7200}}"#,
            "wait_for_device.timeout_secs",
        ),
    ] {
        let (s, v) = post(body.as_bytes());
        assert_error(s, &v, 400, "invalid_request", Some(field));
    }
    let (s, v) = post(br#"{"volume_id": "v1", "device": {"serial": "s", "label": "x"}}"#);
    assert_error(s, &v, 400, "invalid_json", Some("device.label"));

    let (s, v) = post(br#"{"volume_id": "v1", "device_path": "/dev/x", "optons": {}}"#);
    assert_error(s, &v, 400, "invalid_json", Some("optons"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(r#"unknown field "optons" in the request (did you mean "options"?)"#),
        "{v}"
    );
    // Every level, the HTTP path saying exactly what the command line says.
    for (body, field, message) in [
        (
            GOOD.replace("\"cipher\"", "\"cypher\""),
            "encryption.cypher",
            r#"unknown field "cypher" in encryption (did you mean "cipher"?)"#,
        ),
        (
            GOOD.replace("\"key_size\"", "\"keysize\""),
            "encryption.keysize",
            r#"unknown field "keysize" in encryption (did you mean "key_size"?)"#,
        ),
        (
            r#"{"volume_id": "v1", "device_path": "/dev/x", "options": {"sectorsize": 4096}}"#
                .to_owned(),
            "options.sectorsize",
            r#"unknown field "sectorsize" in options (did you mean "sector_size"?)"#,
        ),
    ] {
        assert!(body != GOOD, "the test body must differ from GOOD");
        let (s, v) = post(body.as_bytes());
        assert_error(s, &v, 400, "invalid_json", Some(field));
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(message), "{m}");
    }

    let unknown_provider = GOOD.replace("\"luks\"", "\"rot13\"");
    let (s, v) = post(unknown_provider.as_bytes());
    assert_error(s, &v, 400, "invalid_request", Some("encryption.provider"));
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("rot13") && m.contains("luks2"), "{m}");

    let no_key = GOOD.replace(", \"encryption_key_id\": \"key-1\"", "");
    let (s, v) = post(no_key.as_bytes());
    assert_error(
        s,
        &v,
        400,
        "invalid_request",
        Some("encryption.encryption_key_id"),
    );

    let bad_id = GOOD.replace("vol-1", "../etc");
    let (s, v) = post(bad_id.as_bytes());
    assert_error(s, &v, 400, "invalid_request", Some("volume_id"));

    // Over the limit: refused before parsing, whatever the content.
    let mut big = Vec::from(&b"{\"volume_id\": \""[..]);
    big.extend(std::iter::repeat_n(b'a', 70_000));
    big.extend(b"\"}");
    let (s, v) = post(&big);
    assert_error(s, &v, 413, "body_too_large", None);

    // A bad volume id in the path.
    let (s, v) = agent.checked(
        "GET",
        "/v1/attachments/{volume_id}",
        "/v1/attachments/.hidden",
        None,
    );
    assert_error(s, &v, 400, "invalid_request", Some("volume_id"));

    // Nothing was recorded by any of them.
    assert!(
        !agent.dir.path().join("state").exists()
            || std::fs::read_dir(agent.dir.path().join("state"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// With the udev monitor off, an attach that asks to wait is refused at once (503), naming
/// `wait_for_device`; nothing is recorded.
#[test]
fn wait_for_device_needs_the_udev_monitor() {
    let agent = Agent::start("udev = false");
    let body =
        br#"{"volume_id": "v1", "device": {"luks_uuid": "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55"},
        "wait_for_device": {"timeout_secs": 30}}"#;
    let t0 = std::time::Instant::now();
    let (s, v) = agent.checked("POST", "/v1/attachments", "/v1/attachments", Some(body));
    assert_error(s, &v, 503, "udev_unavailable", Some("wait_for_device"));
    // Refused up front: it did not sit out the 30 s wait it asked for (a bound from the
    // request, not from this host's speed).
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
    assert!(agent.log_text().contains("udev monitor disabled"));
    // Without a wait, a selector that matches nothing is 404 at once (enumeration needs no
    // monitor).
    let body =
        br#"{"volume_id": "v1", "device": {"luks_uuid": "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55"}}"#;
    let (s, v) = agent.checked("POST", "/v1/attachments", "/v1/attachments", Some(body));
    assert_error(s, &v, 404, "unknown_device", Some("device"));
    assert!(!agent.dir.path().join("state").join("v1.json").exists());
}

#[test]
fn smaller_configured_body_limit_applies() {
    let agent = Agent::start("max_body_bytes = 100");
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(GOOD.as_bytes()),
    );
    assert_error(s, &v, 413, "body_too_large", None);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100 bytes")
    );
}

#[test]
fn unknown_volumes_are_404() {
    let agent = Agent::start("");
    let r = "/v1/attachments/{volume_id}";
    let (s, v) = agent.checked("GET", r, "/v1/attachments/no-such-vol", None);
    assert_error(s, &v, 404, "unknown_volume", None);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-vol")
    );
    let (s, v) = agent.checked("DELETE", r, "/v1/attachments/no-such-vol", None);
    assert_error(s, &v, 404, "unknown_volume", None);
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments/{volume_id}/extend",
        "/v1/attachments/no-such-vol/extend",
        None,
    );
    assert_error(s, &v, 404, "unknown_volume", None);
    // Tune: a malformed body is refused before anything is looked up, naming the field.
    let tp = "/v1/attachments/no-such-vol";
    let (s, v) = agent.checked("PATCH", r, tp, Some(br#"{"allow_discards": true}"#));
    assert_error(s, &v, 404, "unknown_volume", None);
    let (s, v) = agent.checked("PATCH", r, tp, Some(br#"{"no_read_workqeue": true}"#));
    assert_error(s, &v, 400, "invalid_json", Some("no_read_workqeue"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(r#"did you mean "no_read_workqueue"?"#),
        "{v}"
    );
    let (s, v) = agent.checked("PATCH", r, tp, Some(br#"{"sector_size": 4096}"#));
    assert_error(s, &v, 400, "invalid_request", Some("sector_size"));
    let (s, v) = agent.checked("PATCH", r, tp, Some(b"{}"));
    assert_error(s, &v, 400, "invalid_request", Some("allow_discards"));
    let vr = "/v1/attachments/{volume_id}/verify";
    let (s, v) = agent.checked("POST", vr, "/v1/attachments/no-such-vol/verify", None);
    assert_error(s, &v, 404, "unknown_volume", None);
    let (s, v) = agent.checked(
        "POST",
        vr,
        "/v1/attachments/no-such-vol/verify",
        Some(br#"{"mode": "full"}"#),
    );
    assert_error(s, &v, 404, "unknown_volume", None);
    // A verify request that is not one is refused before anything is looked up.
    let (s, v) = agent.checked(
        "POST",
        vr,
        "/v1/attachments/no-such-vol/verify",
        Some(br#"{"mode": "everything"}"#),
    );
    assert_error(s, &v, 400, "invalid_json", None);
    let (s, v) = agent.checked(
        "POST",
        vr,
        "/v1/attachments/no-such-vol/verify",
        Some(br#"{"mode": "sample", "count": 5, "max_rate_mb": -1}"#),
    );
    assert_error(s, &v, 400, "invalid_request", None);
    let (s, v) = agent.checked(
        "POST",
        vr,
        "/v1/attachments/no-such-vol/verify",
        Some(br#"{"async": 1}"#),
    );
    assert_error(s, &v, 400, "invalid_request", Some("async"));
    // An async verify of an unknown volume starts no job.
    let (s, v) = agent.checked(
        "POST",
        vr,
        "/v1/attachments/no-such-vol/verify",
        Some(br#"{"async": true, "mode": "full"}"#),
    );
    assert_error(s, &v, 404, "unknown_volume", None);
    for method in ["GET", "DELETE"] {
        let (s, v) = agent.checked(method, vr, "/v1/attachments/no-such-vol/verify", None);
        assert_error(s, &v, 404, "not_found", None);
    }
    let r = agent.call("PUT", "/v1/attachments/no-such-vol/verify", None);
    assert_eq!(r.status, 405);
    // Unknown routes and methods.
    let r = agent.call("GET", "/v2/nothing", None);
    assert_eq!(r.status, 404);
    let r = agent.call("PUT", "/v1/attachments", None);
    assert_eq!(r.status, 405);
}

/// The tune, rekey and verify bodies are parsed like the attach request: a typo is a 400
/// `invalid_json` naming the unknown field and the closest known one, never ignored; a wrong
/// type names its field; all before the volume is looked up.
#[test]
fn typos_in_tune_rekey_and_verify_bodies_name_the_closest_field() {
    let agent = Agent::start("");
    /// Method, documented route, path, body, the field blamed, a part of the message.
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static [u8],
        &'static str,
        &'static str,
    );
    let cases: [Case; 6] = [
        (
            "PATCH",
            "/v1/attachments/{volume_id}",
            "/v1/attachments/no-such-vol",
            br#"{"persistant": true, "allow_discards": true}"#,
            "persistant",
            r#"invalid tune request: unknown field "persistant" in the request (did you mean "persistent"?)"#,
        ),
        (
            "POST",
            "/v1/attachments/{volume_id}/rekey",
            "/v1/attachments/no-such-vol/rekey",
            br#"{"new_keyid": "k2"}"#,
            "new_keyid",
            r#"invalid rekey request: unknown field "new_keyid" in the request (did you mean "new_key_id"?)"#,
        ),
        (
            "POST",
            "/v1/attachments/{volume_id}/rekey",
            "/v1/attachments/no-such-vol/rekey",
            br#"{"key_id": "k2"}"#,
            "key_id",
            r#"(did you mean "new_key_id"?)"#,
        ),
        (
            "POST",
            "/v1/attachments/{volume_id}/verify",
            "/v1/attachments/no-such-vol/verify",
            br#"{"mode": "full", "max_rate": 5}"#,
            "max_rate",
            r#"invalid verify request: unknown field "max_rate" in the request (did you mean "max_rate_mb"?)"#,
        ),
        (
            "POST",
            "/v1/attachments/{volume_id}/verify",
            "/v1/attachments/no-such-vol/verify",
            br#"{"asyn": true}"#,
            "asyn",
            r#"(did you mean "async"?)"#,
        ),
        (
            "POST",
            "/v1/attachments/{volume_id}/rekey",
            "/v1/attachments/no-such-vol/rekey",
            br#"{"new_key_id": 7}"#,
            "new_key_id",
            "invalid rekey request: field `new_key_id`: invalid type: integer `7`",
        ),
    ];
    for (method, route, path, body, field, message) in cases {
        let (s, v) = agent.checked(method, route, path, Some(body));
        assert_error(s, &v, 400, "invalid_json", Some(field));
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(message), "{method} {path}: {m}");
    }
    // Not JSON, trailing data, a missing field: the same shape, no field to blame but the
    // missing one.
    let rekey = (
        "/v1/attachments/{volume_id}/rekey",
        "/v1/attachments/no-such-vol/rekey",
    );
    let (s, v) = agent.checked("POST", rekey.0, rekey.1, Some(b"{\"new_key_id\": "));
    assert_error(s, &v, 400, "invalid_json", None);
    let (s, v) = agent.checked("POST", rekey.0, rekey.1, Some(br#"{"new_key_id": "k"} {}"#));
    assert_error(s, &v, 400, "invalid_json", None);
    let (s, v) = agent.checked("POST", rekey.0, rekey.1, Some(b"{}"));
    assert_error(s, &v, 400, "invalid_json", Some("new_key_id"));
    // A well-formed rekey of an unknown volume gets past the parser.
    let (s, v) = agent.checked("POST", rekey.0, rekey.1, Some(br#"{"new_key_id": "k"}"#));
    assert_eq!(s, 404, "{v}");
}

/// Where device-mapper exists, the same request gets past the engine's device-mapper check and
/// is refused for its missing device: the test asserts behaviour on either kind of host.
fn attach_of_a_missing_device_with_device_mapper_is_404(agent: &Agent) {
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(GOOD.as_bytes()),
    );
    assert_error(s, &v, 404, "unknown_device", Some("device_path"));
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("/dev/disk/by-path/nonexistent-lun-1"),
        "{v}"
    );
}

#[test]
fn attach_without_device_mapper_is_503_with_the_engine_message() {
    let agent = Agent::start("");
    if dm_available() {
        return attach_of_a_missing_device_with_device_mapper_is_404(&agent);
    }
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(GOOD.as_bytes()),
    );
    assert_error(s, &v, 503, "dm_unavailable", None);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("device-mapper is not available"),
        "{v}"
    );
    let (s, v) = agent.checked("GET", "/v1/attachments", "/v1/attachments", None);
    assert_error(s, &v, 503, "dm_unavailable", None);
    // DELETE with a device path goes to the engine, which needs device-mapper too.
    let (s, v) = agent.checked(
        "DELETE",
        "/v1/attachments/{volume_id}",
        "/v1/attachments/vol-1?device_path=%2Fdev%2Fdisk%2Fby-path%2Fx",
        None,
    );
    assert_error(s, &v, 503, "dm_unavailable", None);
    // The failure is counted by reason.
    let (_, m) = agent.checked("GET", "/metrics", "/metrics", None);
    let m = m.as_str().unwrap();
    assert!(
        m.contains(r#"volcrypt_operation_failures_total{op="attach",reason="dm_unavailable"} 1"#),
        "{m}"
    );

    // The CLI's --socket mode reports the same error with cryptsetup's exit code 1.
    let req = agent.dir.path().join("req.json");
    std::fs::write(&req, GOOD).unwrap();
    let out = Command::new(BIN)
        .args(["attach", "--request"])
        .arg(&req)
        .arg("--socket")
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("device-mapper is not available") && err.contains("503"),
        "{err}"
    );
}

#[test]
fn cli_socket_mode_repeated_detach_is_success_and_other_404s_exit_4() {
    let agent = Agent::start("");
    // Detaching a volume the agent does not know (already detached): exit 0, was_active false,
    // exactly like the command line without --socket.
    let out = Command::new(BIN)
        .args(["detach", "gone-vol", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["was_active"], false, "{v}");
    assert_eq!(v["volume_id"], "gone-vol", "{v}");
    // Any other unknown volume is the wrong-device exit.
    let out = Command::new(BIN)
        .args(["extend", "gone-vol", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_volume"));
}

/// An agent that reads the request and dies before answering: the client exits 8 (its own
/// code, not 4 "wrong device"), saying the request may or may not have been carried out.
#[test]
fn cli_exits_6_when_the_agent_dies_mid_request() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dying.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        // Read the request head, then close without a word.
        let _ = conn.read(&mut buf);
        drop(conn);
    });
    let out = Command::new(BIN)
        .args(["detach", "some-vol", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    server.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert!(
        err.contains("closed the connection before answering"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn socket_and_directory_permissions() {
    let agent = Agent::start("group = \"nogroup\"");
    let sock = std::fs::symlink_metadata(&agent.socket).unwrap();
    assert_eq!(sock.permissions().mode() & 0o7777, 0o660);
    assert_eq!(sock.gid(), 65534);
    let dir = std::fs::metadata(agent.socket.parent().unwrap()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o7777, 0o750);
    assert_eq!(dir.gid(), 65534);
}

/// Run the CLI as another uid/gid (setpriv), asking the agent to detach an unknown volume:
/// an allowed peer gets 404, which the CLI reports as the expected repeated detach (exit 0,
/// `was_active: false`), a refused one 403 (exit 1). Returns stdout and stderr together.
fn detach_as(agent: &Agent, uid: u32, gid: u32) -> (Option<i32>, String) {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(BIN)
        .args(["detach", "peer-test", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn peers_outside_root_and_the_group_get_403_and_are_logged() {
    need::require_root("the peer check is proved by switching uid with setpriv");
    let agent = Agent::start("group = \"nogroup\"");
    // Open the filesystem fence so the SO_PEERCRED check is what decides.
    let tmp = agent.dir.path();
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        agent.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let (code, err) = detach_as(&agent, 65533, 65533);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("403") && err.contains("forbidden") && err.contains("uid 65533"),
        "{err}"
    );

    // In the configured group (primary gid): allowed, reaches the route.
    let (code, out) = detach_as(&agent, 65533, 65534);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"was_active\": false"), "{out}");

    let log = agent.log_text();
    let refused = log
        .lines()
        .find(|l| l.contains("refused request"))
        .unwrap_or_else(|| panic!("no refusal logged: {log}"));
    assert!(refused.contains("\"peer_uid\":65533"), "{refused}");
    assert!(refused.contains("peer_pid"), "{refused}");
    // Allowed requests are logged with the peer and the volume id.
    assert!(
        log.lines().any(|l| l.contains("request done")
            && l.contains("\"peer_uid\":65533")
            && l.contains("peer-test")),
        "{log}"
    );
    let (_, m) = agent.checked("GET", "/metrics", "/metrics", None);
    assert!(
        m.as_str()
            .unwrap()
            .contains("volcrypt_rejected_peers_total 1")
    );
}

#[test]
fn filesystem_permissions_keep_other_users_out_first() {
    need::require_root("the peer check is proved by switching uid with setpriv");
    let agent = Agent::start("group = \"nogroup\"");
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, err) = detach_as(&agent, 65533, 65533);
    assert_eq!(code, Some(4), "cannot connect → wrong device exit: {err}");
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn metrics_exposition_parses() {
    let agent = Agent::start("");
    agent.call("GET", "/v1/attachments/nope", None);
    agent.call("GET", "/v1/health", None);
    // No Accept header (curl, promtool's input): the Prometheus text format 0.0.4.
    let r = agent.call("GET", "/metrics", None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(r.body).unwrap();
    let mut types = std::collections::HashMap::new();
    let mut samples = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&ty), "{line}");
            types.insert(name.to_owned(), ty.to_owned());
        } else if line.starts_with("# HELP ") {
        } else {
            // name{labels} value
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line}"));
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {line}"));
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            assert!(
                types.keys().any(|t| name.starts_with(t.as_str())),
                "sample {name} without a TYPE line"
            );
            let labels = &series[name.len()..];
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
            samples += 1;
        }
    }
    assert!(!text.contains("# EOF"), "{text}");
    assert!(samples > 5);
    // A counter's HELP and TYPE carry its sample's name in this format.
    assert_eq!(types["volcrypt_http_requests_total"], "counter");
    assert!(
        text.contains("# HELP volcrypt_http_requests_total "),
        "{text}"
    );
    assert_eq!(types["volcrypt_operation_duration_seconds"], "histogram");
    assert_eq!(types["volcrypt_active_attachments"], "gauge");
    // The KDF / device-mapper split of attach and detach latency. The labelled
    // families (volcrypt_attach_dm_seconds{unlock}, volcrypt_operation_phase_seconds{op,phase})
    // appear with their first sample, which needs dm-crypt (the bench and rpc_vm see them).
    for name in ["volcrypt_attach_kdf_seconds", "volcrypt_detach_dm_seconds"] {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some("histogram"),
            "{name}"
        );
    }
    assert!(
        text.contains(
            r#"volcrypt_http_requests_total{route="/v1/attachments/{volume_id}",status="404"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"volcrypt_operation_duration_seconds_count{op="status",result="error"} 1"#),
        "{text}"
    );
}

/// A scraper that asks for OpenMetrics (Prometheus does, first) gets it, terminated by `# EOF`,
/// with counter families named without `_total`; one that prefers the text format gets that.
#[test]
fn metrics_negotiates_openmetrics_by_accept_header() {
    let agent = Agent::start("");
    agent.call("GET", "/v1/health", None);
    let (head, body) = get_with_accept(
        &agent.socket,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(
        body.contains("# TYPE volcrypt_http_requests counter\n"),
        "{body}"
    );
    assert!(
        body.contains(r#"volcrypt_http_requests_total{route="/v1/health",status="#),
        "{body}"
    );
    let (head, body) = get_with_accept(
        &agent.socket,
        "/metrics",
        "text/plain;version=0.0.4, application/openmetrics-text;q=0.3",
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(!body.contains("# EOF"), "{body}");
    assert!(
        body.contains("# TYPE volcrypt_http_requests_total counter\n"),
        "{body}"
    );
}

/// A plain HTTP/1.1 GET with an `Accept` header over the agent's socket: (status line and
/// headers, body).
fn get_with_accept(socket: &std::path::Path, path: &str, accept: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: volcrypt\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

#[test]
fn sigterm_removes_the_socket_and_exits_cleanly() {
    let mut agent = Agent::start("");
    assert!(agent.socket.exists());
    let status = agent.terminate();
    assert!(status.success(), "{status}: {}", agent.log_text());
    assert!(!agent.socket.exists(), "socket left behind");
    assert!(agent.log_text().contains("shutdown complete"));
}

#[test]
fn stale_socket_is_replaced_live_one_is_not() {
    let agent = Agent::start("");
    // A second agent on the same socket refuses to start (exit 5, cryptsetup's "busy").
    let cfg = agent.dir.path().join("volcrypt.toml");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("another agent is listening"));
    assert!(agent.socket.exists(), "the live socket was touched");
    drop(agent);

    // A socket file nobody listens on (a crashed agent's) is replaced.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    // Keep the key store and state out of /var/lib.
    let own_cfg = dir.path().join("c.toml");
    std::fs::write(
        &own_cfg,
        format!(
            "[volume]\nstate_dir = \"{0}/state\"\n[key_manager.keystore]\ndir = \"{0}/keys\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&own_cfg)
        .arg("--socket")
        .arg(&sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut ok = false;
    while t0.elapsed() < std::time::Duration::from_secs(20) {
        if let Ok(r) = volcrypt::rpc::client::call(&sock, "GET", "/v1/health", None) {
            ok = r.status == 200 || r.status == 503;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "agent did not take over the stale socket");

    // A regular file at the socket path is never replaced.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&own_cfg)
        .arg("--socket")
        .arg(&file)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[test]
fn openapi_documents_every_served_route() {
    let api = OpenApi::load();
    for (method, route) in volcrypt::rpc::routes::ROUTES {
        let op = api.operation(method, route);
        let responses = op["responses"].as_object().unwrap();
        // Every route documents the peer refusal and the deadline.
        for s in ["403", "504"] {
            assert!(responses.contains_key(s), "{method} {route} lacks {s}");
        }
        for (status, resp) in responses {
            let resp = api.resolve(resp);
            let status: u16 = status.parse().unwrap();
            // Health answers 503 with its own body (status "degraded"), by design.
            if status >= 400 && !(*route == "/v1/health" && status == 503) {
                let schema = &resp["content"]["application/json"]["schema"];
                assert_eq!(
                    api.resolve(schema),
                    api.resolve(&serde_json::json!({"$ref": "#/components/schemas/Error"})),
                    "{method} {route} {status} does not use the error schema"
                );
            }
        }
    }
    // No value lost to YAML flow syntax (an unquoted comma makes a key with a null value).
    fn no_nulls(v: &serde_json::Value, at: &str) {
        match v {
            serde_json::Value::Null => {
                panic!("null at {at} in docs/openapi.yaml (quote the text?)")
            }
            serde_json::Value::Object(m) => m
                .iter()
                .for_each(|(k, x)| no_nulls(x, &format!("{at}/{k}"))),
            serde_json::Value::Array(a) => a.iter().for_each(|x| no_nulls(x, at)),
            _ => {}
        }
    }
    no_nulls(&api.0, "");
    // The documented paths are exactly the served ones.
    let served: std::collections::BTreeSet<&str> = volcrypt::rpc::routes::ROUTES
        .iter()
        .map(|(_, r)| *r)
        .collect();
    let documented: std::collections::BTreeSet<&str> = api.0["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(served, documented);
}

/// The hardened unit parses (systemd-analyze verify, with ExecStart pointing at the built
/// binary), and keeps the settings the agent relies on.
#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/volcrypt.service"
    ))
    .unwrap();
    for needed in [
        "CapabilityBoundingSet=CAP_SYS_ADMIN",
        "ProtectSystem=strict",
        "RuntimeDirectory=volcrypt",
        "StateDirectory=volcrypt",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6",
        "DeviceAllow=/dev/mapper/control rw",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volcrypt.service");
    std::fs::write(&path, unit.replace("/usr/bin/volcrypt", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}

/// `--log-format json` (the harness starts `serve` with it): every log line is one JSON object,
/// and a request's lines carry its span with the peer, the volume id and — once the record has
/// been read — the mapping and the journal phase, which `GET /v1/attachments/{id}` also shows.
#[test]
fn json_logs_carry_the_request_span_with_volume_mapping_and_phase() {
    let agent = Agent::start("");
    // A record as the journal writes it on disk (its format is a contract: records written by
    // one version are read by the next), planted in the state directory.
    let record = serde_json::json!({
        "volume_id": "span-vol",
        "mapping_name": "crypt-span-disk",
        "device_path": "/dev/disk/by-path/span-disk",
        "backing_device": "/dev/nonexistent-span",
        "backing_devno": {"major": 7, "minor": 250},
        "format": "luks2",
        "cipher": null,
        "key_size": null,
        "key_manager": "keystore",
        "key_id": "k",
        "derivation": "raw",
        "flags": {"allow_discards": false, "no_read_workqueue": false, "no_write_workqueue": false},
        "formatted": false,
        "stable_link": null,
        "device_link_previous": null,
        "attached_at": 1,
        "phase": "detaching"
    });
    let state = agent.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("span-vol.json"), record.to_string()).unwrap();
    let (s, v) = agent.checked(
        "GET",
        "/v1/attachments/{volume_id}",
        "/v1/attachments/span-vol",
        None,
    );
    if dm_available() {
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["phase"], "detaching", "{v}");
    } else {
        assert_error(s, &v, 503, "dm_unavailable", None);
    }
    let log = agent.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 2, "{log}");
    for l in &lines {
        assert!(
            l["level"].is_string() && l["fields"]["message"].is_string(),
            "{l}"
        );
    }
    let done = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "request done"
                && l["span"]["path"] == "/v1/attachments/span-vol"
        })
        .unwrap_or_else(|| panic!("no request line: {log}"));
    let span = &done["span"];
    assert_eq!(span["name"], "request", "{done}");
    assert_eq!(span["volume_id"], "span-vol", "{done}");
    assert_eq!(span["mapping"], "crypt-span-disk", "{done}");
    assert_eq!(span["phase"], "detaching", "{done}");
    assert!(
        span["peer_uid"].is_u64() && span["peer_pid"].is_u64(),
        "{done}"
    );
    assert_eq!(done["fields"]["status"], s, "{done}");
}
