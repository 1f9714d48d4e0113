//! The agent against a real kernel (dm-crypt, loop devices): attach, idempotent re-attach,
//! status, wrong and unknown keys, detach through the API and the CLI's `--socket` mode, and 20
//! concurrent attaches of different Argon2 volumes held within the KDF memory budget, keys from
//! the real Barbican, and bad requests of every kind changing nothing in the kernel.
//!
//! Needs root and dm-crypt: natively every test is reported *ignored*; the VM stage
//! (tests/vm/attach-suite.sh, which loads dm_crypt and sets VOLCRYPT_VM=1) runs them with
//! `--include-ignored`, and there a missing prerequisite (or a Barbican that does not answer)
//! fails the test.
#![cfg(feature = "system")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::agent::{Agent, BIN, assert_error};
use common::{barbican, need, sh};
use volcrypt::keys::{Keystore, Secret};
use volcrypt::secret::{SecretBytes, SecretType};

/// Loop devices over sparse files, detached on drop.
struct Loops(Vec<PathBuf>);

impl Loops {
    fn new(dir: &Path, n: usize, mib: u64) -> Loops {
        let mut v = Vec::new();
        for i in 0..n {
            let img = dir.join(format!("disk{i}.img"));
            std::fs::File::create(&img)
                .unwrap()
                .set_len(mib << 20)
                .unwrap();
            v.push(PathBuf::from(sh(&format!(
                "losetup --find --show {}",
                img.display()
            ))));
        }
        Loops(v)
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for l in &self.0 {
            // A failed test may leave its mapping: close it first so nothing leaks.
            if let Some(base) = l.file_name() {
                let _ = Command::new("cryptsetup")
                    .arg("close")
                    .arg(format!("crypt-{}", base.to_string_lossy()))
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
    }
}

fn keystore(agent: &Agent) -> Keystore {
    Keystore::create(agent.dir.path().join("keys")).unwrap()
}

fn put(ks: &Keystore, id: &str, t: SecretType, payload: &[u8]) {
    ks.put(id, &Secret::new(t, SecretBytes::new(payload.to_vec())))
        .unwrap();
}

fn request(volume: &str, device: &Path, provider: &str, key: &str) -> String {
    format!(
        r#"{{"volume_id": "{volume}", "device_path": "{}",
            "encryption": {{"provider": "{provider}", "control_location": "front-end",
                            "encryption_key_id": "{key}"}},
            "options": {{"replace_device_symlink": false}}}}"#,
        device.display()
    )
}

impl Agent {
    /// `POST /v1/attachments` with `body`, expecting a success: `want` 201 (attached now) or
    /// 200 (already attached). The response, checked against the OpenAPI document.
    fn attach_ok(&self, body: &str, want: u16) -> serde_json::Value {
        assert!(want == 200 || want == 201, "not a success status: {want}");
        let (s, v) = self.checked(
            "POST",
            "/v1/attachments",
            "/v1/attachments",
            Some(body.as_bytes()),
        );
        assert_eq!(s, want, "{v}");
        v
    }
}

const FAST_KDF: &str = "[volume.pbkdf]\nkind = \"pbkdf2\"\niterations = 1000\n";

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn attach_status_detach_through_the_api() {
    need::require_dm_crypt();
    let agent = Agent::start_with("", FAST_KDF);
    let ks = keystore(&agent);
    put(&ks, "pass-1", SecretType::Passphrase, b"correct horse");
    put(&ks, "sym-2", SecretType::Symmetric, &[7u8; 32]);
    let loops = Loops::new(agent.dir.path(), 2, 24);
    let dev = &loops.0[0];
    let body = request("vm-vol-1", dev, "luks2", "pass-1");

    // First attach formats the blank device: 201.
    let v = agent.attach_ok(&body, 201);
    assert_eq!(v["formatted"], true);
    let mapper = PathBuf::from(v["device"].as_str().unwrap());
    assert!(mapper.exists(), "{}", mapper.display());
    assert_eq!(v["derivation"], "raw");
    assert!(
        !v.to_string().contains("correct horse"),
        "secret in the response"
    );

    // Again: the existing mapping, 200.
    let v = agent.attach_ok(&body, 200);
    assert_eq!(v["already_attached"], true);

    let (s, v) = agent.checked(
        "GET",
        "/v1/attachments/{volume_id}",
        "/v1/attachments/vm-vol-1",
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["active"], true);
    let (s, v) = agent.checked("GET", "/v1/attachments", "/v1/attachments", None);
    assert_eq!(s, 200);
    assert_eq!(v["attachments"].as_array().unwrap().len(), 1);

    // Unknown key id: 404, naming the field.
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(request("vm-vol-2", &loops.0[1], "luks2", "no-such-key").as_bytes()),
    );
    assert_error(
        s,
        &v,
        404,
        "unknown_key",
        Some("encryption.encryption_key_id"),
    );

    // Detach through the CLI's --socket mode.
    let out = Command::new(BIN)
        .args(["detach", "vm-vol-1", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!mapper.exists());
    let (s, v) = agent.checked(
        "GET",
        "/v1/attachments/{volume_id}",
        "/v1/attachments/vm-vol-1",
        None,
    );
    assert_error(s, &v, 404, "unknown_volume", None);

    // Wrong key now that the device is LUKS and free: 422.
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(request("vm-vol-1", dev, "luks2", "sym-2").as_bytes()),
    );
    assert_error(
        s,
        &v,
        422,
        "wrong_key",
        Some("encryption.encryption_key_id"),
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("sym-2"));
}

/// `POST /v1/attachments/{id}/verify` and `volcrypt verify --socket`: the same report, "agree"
/// for data the kernel wrote; a key that no longer matches the volume is 422 `cannot_verify`
/// (exit 7 through the CLI), never a mismatch.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn verify_through_the_api() {
    need::require_dm_crypt();
    let agent = Agent::start_with("", FAST_KDF);
    let ks = keystore(&agent);
    put(&ks, "pass-v", SecretType::Passphrase, b"verify horse");
    let loops = Loops::new(agent.dir.path(), 1, 24);
    let body = request("vm-vol-v", &loops.0[0], "luks2", "pass-v");
    let v = agent.attach_ok(&body, 201);
    let mapper = PathBuf::from(v["device"].as_str().unwrap());
    sh(&format!(
        "dd if=/dev/urandom of={} bs=1M count=4 oflag=direct status=none",
        mapper.display()
    ));

    let route = "/v1/attachments/{volume_id}/verify";
    let path = "/v1/attachments/vm-vol-v/verify";
    let (s, v) = agent.checked("POST", route, path, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["verdict"], "agree", "{v}");
    assert_eq!(v["mode"], "sample", "{v}");
    assert_eq!(v["sectors_checked"], 256, "{v}");
    let (s, v) = agent.checked(
        "POST",
        route,
        path,
        Some(br#"{"mode": "range", "start": 0, "len": 4194304, "max_rate_mb": 500}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["verdict"], "agree", "{v}");
    assert_eq!(v["bytes_checked"], 4 << 20, "{v}");
    assert!(
        !v.to_string().contains("verify horse"),
        "secret in the report"
    );

    let cli = |extra: &[&str]| {
        Command::new(BIN)
            .args(["verify", "vm-vol-v", "--socket"])
            .arg(&agent.socket)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = cli(&["--sample", "32"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sectors_checked"], 32, "{report}");

    // The key manager's secret changed under the volume: cannot verify, said plainly.
    put(&ks, "pass-v", SecretType::Passphrase, b"another horse");
    let (s, v) = agent.checked("POST", route, path, None);
    assert_error(s, &v, 422, "cannot_verify", None);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("pass-v"),
        "{v}"
    );
    let out = cli(&[]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    put(&ks, "pass-v", SecretType::Passphrase, b"verify horse");
    let (s, _) = agent.checked(
        "DELETE",
        "/v1/attachments/{volume_id}",
        "/v1/attachments/vm-vol-v",
        None,
    );
    assert_eq!(s, 200);
}

/// `PATCH /v1/attachments/{volume_id}` and `volcrypt tune --socket`: the flags change on the
/// live mapping (dmsetup table, status); typos, a sector size and persistence on LUKS1 are
/// refused naming why, changing nothing.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn tune_through_the_api() {
    need::require_dm_crypt();
    let agent = Agent::start_with("", FAST_KDF);
    let ks = keystore(&agent);
    put(&ks, "pass-t", SecretType::Passphrase, b"tune horse");
    let loops = Loops::new(agent.dir.path(), 2, 24);
    let has = |name: &str, flag: &str| {
        sh(&format!("dmsetup table {name}"))
            .split_whitespace()
            .any(|f| f == flag)
    };
    let attach = |id: &str, dev: &Path, provider: &str| {
        let body = request(id, dev, provider, "pass-t");
        let v = agent.attach_ok(&body, 201);
        v["mapping_name"].as_str().unwrap().to_owned()
    };
    let route = "/v1/attachments/{volume_id}";
    let name = attach("vm-vol-t", &loops.0[0], "luks2");
    let path = "/v1/attachments/vm-vol-t";

    let (s, v) = agent.checked(
        "PATCH",
        route,
        path,
        Some(br#"{"no_read_workqueue": true}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["flags"]["no_read_workqueue"], true, "{v}");
    assert_eq!(v["previous_flags"]["no_read_workqueue"], false, "{v}");
    assert!(has(&name, "no_read_workqueue"));
    let (s, v) = agent.checked("GET", route, path, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["flags"], serde_json::json!(["no_read_workqueue"]), "{v}");

    let (s, v) = agent.checked("PATCH", route, path, Some(br#"{"allow_discard": true}"#));
    assert_error(s, &v, 400, "invalid_json", Some("allow_discard"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(r#"did you mean "allow_discards"?"#),
        "{v}"
    );
    let (s, v) = agent.checked("PATCH", route, path, Some(br#"{"sector_size": 4096}"#));
    assert_error(s, &v, 400, "invalid_request", Some("sector_size"));
    let (s, v) = agent.checked(
        "PATCH",
        route,
        "/v1/attachments/vm-nope",
        Some(br#"{"allow_discards": true}"#),
    );
    assert_error(s, &v, 404, "unknown_volume", None);
    assert!(!has(&name, "allow_discards"));

    // The CLI through the agent.
    let out = Command::new(BIN)
        .args([
            "tune",
            "vm-vol-t",
            "--allow-discards",
            "--read-workqueue",
            "--socket",
        ])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(o["flags"]["allow_discards"], true, "{o}");
    assert!(has(&name, "allow_discards") && !has(&name, "no_read_workqueue"));

    // LUKS1 cannot keep flags: 422, the mapping and its record as they were.
    let name1 = attach("vm-vol-t1", &loops.0[1], "luks");
    let path1 = "/v1/attachments/vm-vol-t1";
    let state = agent.dir.path().join("state").join("vm-vol-t1.json");
    let before = std::fs::read(&state).unwrap();
    let (s, v) = agent.checked(
        "PATCH",
        route,
        path1,
        Some(br#"{"no_write_workqueue": true, "persistent": true}"#),
    );
    assert_error(s, &v, 422, "crypt_failed", None);
    assert!(
        v["error"]["message"].as_str().unwrap().contains(
            "LUKS1 and plain volumes have no place to store activation flags; they apply per activation only"
        ),
        "{v}"
    );
    assert!(!has(&name1, "no_write_workqueue"));
    assert_eq!(std::fs::read(&state).unwrap(), before);
    // Without persistence the LUKS1 mapping is tuned for this activation.
    let (s, v) = agent.checked(
        "PATCH",
        route,
        path1,
        Some(br#"{"no_write_workqueue": true}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert!(has(&name1, "no_write_workqueue"));

    for p in [path, path1] {
        let (s, v) = agent.checked("DELETE", route, p, None);
        assert_eq!(s, 200, "{v}");
    }
}

/// Verify jobs through the agent: a synchronous full verify becomes the volume's
/// `last_verify` in `GET /v1/attachments/{id}` and the per-volume metrics; an async verify
/// reports its progress, refuses a second one (409), and a `DELETE` cancels it leaving nothing
/// behind (no descriptor of the volume's devices in the agent, budget and lock returned, state
/// record unchanged, no bytes counted); a detach cancels a running verify and forgets the
/// volume's job and metric series (attached again, it starts fresh); a completed verify's
/// `last_verify` survives an agent restart (kept in the state record).
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn verify_jobs_progress_cancel_last_result_and_metrics() {
    need::require_dm_crypt();
    let mut agent = Agent::start_with("", FAST_KDF);
    let ks = keystore(&agent);
    put(&ks, "pass-j", SecretType::Passphrase, b"job horse");
    let loops = Loops::new(agent.dir.path(), 1, 24);
    let body = request("vm-vol-j", &loops.0[0], "luks2", "pass-j");
    let v = agent.attach_ok(&body, 201);
    let mapper = PathBuf::from(v["device"].as_str().unwrap());
    sh(&format!(
        "dd if=/dev/urandom of={} bs=1M count=2 oflag=direct status=none",
        mapper.display()
    ));
    let one = ("/v1/attachments/{volume_id}", "/v1/attachments/vm-vol-j");
    let job = (
        "/v1/attachments/{volume_id}/verify",
        "/v1/attachments/vm-vol-j/verify",
    );
    let metric = |name: &str| -> Option<String> {
        let m = String::from_utf8(agent.call("GET", "/metrics", None).body).unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned))
    };

    let (s, v) = agent.checked("GET", one.0, one.1, None);
    assert_eq!(s, 200, "{v}");
    assert!(v.get("last_verify").is_none(), "no verify ran yet: {v}");
    let (s, report) = agent.checked("POST", job.0, job.1, Some(br#"{"mode": "full"}"#));
    assert_eq!(s, 200, "{report}");
    assert_eq!(report["verdict"], "agree", "{report}");
    let size = report["mapping_bytes"].as_u64().unwrap();
    assert_eq!(report["bytes_checked"], size, "{report}");
    let (_, v) = agent.checked("GET", one.0, one.1, None);
    let last = &v["last_verify"];
    assert_eq!(
        (
            &last["state"],
            &last["verdict"],
            &last["mode"],
            &last["trigger"]
        ),
        (
            &"finished".into(),
            &"agree".into(),
            &"full".into(),
            &"api".into()
        ),
        "{v}"
    );
    assert_eq!(
        (&last["bytes_checked"], &last["mismatch_count"]),
        (&size.into(), &0.into()),
        "{v}"
    );
    assert!(
        last["finished_at_unix"].as_u64().unwrap() > 1_600_000_000,
        "{v}"
    );
    let (s, v) = agent.checked("GET", job.0, job.1, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["report"]["verdict"], "agree", "{v}");
    let bytes_metric = r#"volcrypt_verify_bytes_total{volume_id="vm-vol-j"}"#;
    assert_eq!(metric(bytes_metric), Some(size.to_string()));
    assert_eq!(
        metric(r#"volcrypt_verify_mismatches_total{volume_id="vm-vol-j"}"#),
        Some("0".into())
    );
    let stamp: u64 = metric(r#"volcrypt_verify_last_timestamp_seconds{volume_id="vm-vol-j"}"#)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(Some(stamp), last["finished_at_unix"].as_u64());

    let fds_of_volume = || -> Vec<String> {
        let devs: Vec<u64> = [&mapper, &loops.0[0]]
            .iter()
            .map(|p| std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(p).unwrap()))
            .collect();
        std::fs::read_dir(format!("/proc/{}/fd", agent.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| {
                std::fs::metadata(t).is_ok_and(|m| {
                    devs.contains(&std::os::unix::fs::MetadataExt::rdev(&m))
                        && std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())
                })
            })
            .map(|t| t.display().to_string())
            .collect()
    };
    let fds_idle = fds_of_volume();
    // Async, slowed to 0.5 MB/s so it is still running when cancelled.
    let record = agent.dir.path().join("state/vm-vol-j.json");
    let record_before = std::fs::read(&record).unwrap();
    let slow = br#"{"mode": "full", "max_rate_mb": 0.5, "async": true}"#;
    let (s, v) = agent.checked("POST", job.0, job.1, Some(slow));
    assert_eq!(s, 202, "{v}");
    assert!(v["state"] == "queued" || v["state"] == "running", "{v}");
    let t0 = Instant::now();
    let running = loop {
        let (_, v) = agent.checked("GET", job.0, job.1, None);
        if v["state"] == "running" && v["bytes_done"].as_u64().unwrap() > 0 {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(running["bytes_total"], size, "{running}");
    assert!(running["bytes_done"].as_u64().unwrap() < size, "{running}");
    let (s, v) = agent.checked("POST", job.0, job.1, None);
    assert_error(s, &v, 409, "verify_running", None);
    let during = fds_of_volume();
    assert!(
        during.len() >= 2,
        "the running verify reads both devices: {during:?}"
    );
    let (s, v) = agent.checked("DELETE", job.0, job.1, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "cancelled", "{v}");
    assert_eq!(v["error"]["code"], "cancelled", "{v}");
    assert!(v["bytes_done"].as_u64().unwrap() < size, "{v}");
    assert_eq!(fds_of_volume(), fds_idle, "descriptors left open");
    assert_eq!(metric("volcrypt_kdf_memory_in_use_mib"), Some("0".into()));
    assert_eq!(metric("volcrypt_operations_in_flight"), Some("0".into()));
    assert_eq!(
        metric(bytes_metric),
        Some(size.to_string()),
        "a cancelled verify counts nothing"
    );
    assert_eq!(
        std::fs::read(&record).unwrap(),
        record_before,
        "state record changed"
    );
    let (_, v) = agent.checked("GET", one.0, one.1, None);
    assert_eq!(v["last_verify"]["state"], "cancelled", "{v}");
    let (s, _) = agent.checked("DELETE", job.0, job.1, None);
    assert_eq!(s, 404, "nothing left to cancel");
    // The lock and the budget are free: the next verify runs at once.
    let (s, v) = agent.checked(
        "POST",
        job.0,
        job.1,
        Some(br#"{"mode": "sample", "count": 8}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["verdict"], "agree", "{v}");

    // A detach does not wait for a running verify: it cancels it.
    let (s, v) = agent.checked("POST", job.0, job.1, Some(slow));
    assert_eq!(s, 202, "{v}");
    let t0 = Instant::now();
    let (s, v) = agent.checked("DELETE", one.0, one.1, None);
    assert_eq!(s, 200, "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(size / 500_000),
        "detach waited for the verify"
    );
    assert!(!mapper.exists());
    // The detach forgot the volume's job and series.
    let (s, v) = agent.checked("GET", job.0, job.1, None);
    assert_eq!(s, 404, "{v}");
    assert_eq!(metric(bytes_metric), None, "series left after the detach");

    // Attached again: no last verify. A completed verify survives a restart.
    agent.attach_ok(&body, 201);
    let (_, v) = agent.checked("GET", one.0, one.1, None);
    assert!(v.get("last_verify").is_none(), "attached again: {v}");
    let (s, v) = agent.checked(
        "POST",
        job.0,
        job.1,
        Some(br#"{"mode": "sample", "count": 8}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        metric(bytes_metric),
        v["bytes_checked"].as_u64().map(|b| b.to_string())
    );
    let (_, before) = agent.checked("GET", one.0, one.1, None);
    assert_eq!(before["last_verify"]["state"], "finished", "{before}");
    agent.restart();
    let (s, after) = agent.checked("GET", one.0, one.1, None);
    assert_eq!(s, 200, "{after}");
    assert_eq!(after["last_verify"], before["last_verify"], "{after}");
    assert_eq!(after["last_verify"]["mode"], "sample", "{after}");
    let (s, v) = agent.checked("DELETE", one.0, one.1, None);
    assert_eq!(s, 200, "{v}");
}

/// 20 attaches at once, each an Argon2id keyslot of 8 MiB, with a 24 MiB budget (3 at a time): all succeed
/// and the KDF memory admitted never exceeds the budget (sampled from /metrics meanwhile).
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn twenty_concurrent_attaches_stay_within_the_kdf_budget() {
    need::require_dm_crypt();
    const N: usize = 20;
    const BUDGET: i64 = 24;
    let agent = Arc::new(Agent::start_with(
        &format!("kdf_memory_budget_mib = {BUDGET}\nrequest_timeout_secs = 600"),
        "",
    ));
    let ks = keystore(&agent);
    put(&ks, "argon-pass", SecretType::Passphrase, b"budget test");
    let loops = Loops::new(agent.dir.path(), N, 8);
    let pass = agent.dir.path().join("pass");
    std::fs::write(&pass, b"budget test").unwrap();
    for dev in &loops.0 {
        sh(&format!(
            "cryptsetup luksFormat --batch-mode --type luks2 --luks2-metadata-size 16k \
             --luks2-keyslots-size 1m --pbkdf argon2id --pbkdf-memory 8192 \
             --pbkdf-force-iterations 4 --pbkdf-parallel 1 --key-file {} {}",
            pass.display(),
            dev.display()
        ));
    }

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (agent, done, peak) = (agent.clone(), done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let m = String::from_utf8(agent.call("GET", "/metrics", None).body).unwrap();
                if let Some(v) = m
                    .lines()
                    .find_map(|l| l.strip_prefix("volcrypt_kdf_memory_in_use_mib "))
                {
                    peak.fetch_max(v.trim().parse().unwrap(), Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let t0 = Instant::now();
    let handles: Vec<_> = loops
        .0
        .iter()
        .enumerate()
        .map(|(i, dev)| {
            let agent = agent.clone();
            let body = request(&format!("budget-{i}"), dev, "luks2", "argon-pass");
            std::thread::spawn(move || agent.call("POST", "/v1/attachments", Some(body.as_bytes())))
        })
        .collect();
    let replies: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let took = t0.elapsed();
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    for r in &replies {
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    let peak = peak.load(Ordering::SeqCst);
    eprintln!(
        "{N} concurrent Argon2 (8 MiB) attaches in {took:?}; peak KDF memory admitted {peak} MiB of {BUDGET}"
    );
    assert!(peak <= BUDGET, "budget exceeded: {peak} MiB");
    assert!(peak >= 8, "sampler saw no attach in flight");
    let m = String::from_utf8(agent.call("GET", "/metrics", None).body).unwrap();
    assert!(
        m.contains(&format!("volcrypt_kdf_budget_wait_seconds_count {N}")),
        "{m}"
    );
    assert!(
        m.contains(&format!("volcrypt_active_attachments {N}")),
        "{m}"
    );

    for i in 0..N {
        let r = agent.call("DELETE", &format!("/v1/attachments/budget-{i}"), None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let left = sh("dmsetup ls --target crypt");
    assert!(!left.contains("crypt-loop"), "mappings left: {left}");
}

/// Restart after changes behind the agent's back: a recorded mapping closed by hand is reported
/// inactive, a `crypt-*` mapping it did not create is reported foreign and left alone.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn restart_reports_inactive_and_foreign_mappings_without_touching_them() {
    need::require_dm_crypt();
    let mut agent = Agent::start_with("", FAST_KDF);
    let ks = keystore(&agent);
    put(&ks, "pass-r", SecretType::Passphrase, b"reconcile");
    let loops = Loops::new(agent.dir.path(), 2, 24);
    let body = request("vm-rec-1", &loops.0[0], "luks2", "pass-r");
    let v = agent.attach_ok(&body, 201);
    let ours = v["mapping_name"].as_str().unwrap().to_owned();
    let v = agent.health_after_reconcile();
    assert_eq!(v["reconcile"]["checked"], true, "{v}");
    assert_eq!(
        v["reconcile"]["records"], 0,
        "no record before the attach: {v}"
    );

    // Behind the agent's back: close ours, open a foreign one.
    sh(&format!("cryptsetup close {ours}"));
    let pass = agent.dir.path().join("foreign-pass");
    std::fs::write(&pass, b"foreign").unwrap();
    let foreign_dev = loops.0[1].display().to_string();
    sh(&format!(
        "cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
         --key-file {p} {foreign_dev} && cryptsetup open --key-file {p} {foreign_dev} crypt-foreign-x",
        p = pass.display()
    ));

    agent.restart();
    let v = agent.health_after_reconcile();
    let r = &v["reconcile"];
    assert_eq!(r["checked"], true, "{v}");
    assert_eq!(r["records"], 1, "{v}");
    assert_eq!(r["reactivated"], serde_json::json!(["vm-rec-1"]), "{v}");
    // Other tests' agents run alongside with their own mappings: those are foreign here too.
    let foreign: Vec<&str> = r["foreign"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(foreign.contains(&"crypt-foreign-x"), "{v}");
    assert!(!foreign.contains(&ours.as_str()), "{v}");
    assert!(
        Path::new("/dev/mapper/crypt-foreign-x").exists(),
        "foreign mapping touched"
    );
    assert!(
        agent
            .log_text()
            .contains("crypt mapping not created by volcrypt")
    );

    // Attaching again re-activates ours; the foreign one is still untouched.
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(body.as_bytes()),
    );
    assert!([200, 201].contains(&s), "{v}");
    let r = agent.call("DELETE", "/v1/attachments/vm-rec-1", None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    sh("cryptsetup close crypt-foreign-x");
}

/// A reboot with journaled volumes, sketched: volumes attached through the agent, the agent
/// stopped, every mapping closed, one volume's key removed. The restarted agent re-activates
/// the others **in parallel** within the KDF memory budget, the PBKDF2 ones before the argon2
/// ones; health shows the progress (total, done, failed) and lists the key-less volume under
/// `retrying` with its record kept; once its key is back, the agent's retry opens it by itself.
/// Proved from the order of the agent's start/end lines and the health document, never from
/// elapsed time.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn restart_reactivates_in_parallel_within_the_budget_and_retries_a_missing_key() {
    need::require_dm_crypt();
    const ARGON: usize = 4;
    const PBKDF2: usize = 2;
    const BUDGET: i64 = 16; // two 8 MiB argon2 KDFs at a time
    let mut agent = Agent::start_with(
        &format!("kdf_memory_budget_mib = {BUDGET}\nrequest_timeout_secs = 600"),
        "",
    );
    let ks = keystore(&agent);
    put(&ks, "re-pass", SecretType::Passphrase, b"reboot storm");
    put(&ks, "re-late", SecretType::Passphrase, b"late key");
    let loops = Loops::new(agent.dir.path(), ARGON + PBKDF2 + 1, 8);
    let pass = agent.dir.path().join("pass");
    let late = agent.dir.path().join("late");
    std::fs::write(&pass, b"reboot storm").unwrap();
    std::fs::write(&late, b"late key").unwrap();
    let mut volumes = Vec::new();
    for (i, dev) in loops.0.iter().enumerate() {
        let (name, kdf, key, file) = if i < ARGON {
            (
                format!("re-argon-{i}"),
                "--pbkdf argon2id --pbkdf-memory 8192 --pbkdf-force-iterations 4 --pbkdf-parallel 1",
                "re-pass",
                &pass,
            )
        } else if i < ARGON + PBKDF2 {
            (
                format!("re-pbkdf2-{i}"),
                "--pbkdf pbkdf2 --pbkdf-force-iterations 1000",
                "re-pass",
                &pass,
            )
        } else {
            (
                "re-late".to_owned(),
                "--pbkdf pbkdf2 --pbkdf-force-iterations 1000",
                "re-late",
                &late,
            )
        };
        sh(&format!(
            "cryptsetup luksFormat --batch-mode --type luks2 --luks2-metadata-size 16k \
             --luks2-keyslots-size 1m {kdf} --key-file {} {}",
            file.display(),
            dev.display()
        ));
        let body = request(&name, dev, "luks2", key);
        let v = agent.attach_ok(&body, 201);
        volumes.push((name, v["mapping_name"].as_str().unwrap().to_owned()));
    }

    // "Reboot": the agent stops, the kernel forgets every mapping, one key is gone.
    assert!(agent.terminate().success());
    for (_, mapping) in &volumes {
        sh(&format!("cryptsetup close {mapping}"));
    }
    ks.remove("re-late").unwrap();
    let log_from = agent.log_text().len();
    agent.start_again();
    let v = health_when(&agent, |r| r["detail"] != "start-up check still running");
    let r = &v["reconcile"];
    let n = volumes.len();
    assert_eq!(r["checked"], true, "{v}");
    assert_eq!(
        r["progress"],
        serde_json::json!({"total": n, "done": n, "failed": 1}),
        "{v}"
    );
    assert_eq!(r["reactivated"].as_array().unwrap().len(), n - 1, "{v}");
    assert_eq!(r["retrying"][0]["volume_id"], "re-late", "{v}");
    assert!(
        r["retrying"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not found"),
        "{v}"
    );
    assert!(r["failed"].as_array().unwrap().is_empty(), "{v}");
    for (name, mapping) in &volumes {
        let open = Path::new("/dev/mapper").join(mapping).exists();
        assert_eq!(open, name != "re-late", "{name}: mapping open = {open}");
    }
    // The key-less volume's record is kept (nothing formatted, nothing dropped).
    let (s, g) = agent.checked(
        "GET",
        "/v1/attachments/{volume_id}",
        "/v1/attachments/re-late",
        None,
    );
    assert_eq!(s, 200, "{g}");

    // Order of the start/end lines of the first pass.
    let log = agent.log_text()[log_from..].to_owned();
    let mut running: Vec<(String, i64)> = Vec::new();
    let (mut most, mut peak_mib) = (0, 0);
    let mut argon_started = false;
    let mut started = Vec::new();
    for line in log.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let f = &e["fields"];
        let id = f["volume_id"].as_str().unwrap_or_default().to_owned();
        let mib = f["kdf_mib"].as_i64().unwrap_or_default();
        match f["message"].as_str() {
            Some("re-activation started") => {
                if id.starts_with("re-argon") {
                    argon_started = true;
                } else if !started.contains(&id) {
                    assert!(
                        !argon_started,
                        "{id} started after an argon2 volume:\n{log}"
                    );
                }
                started.push(id.clone());
                running.push((id, mib));
                most = most.max(running.len());
                peak_mib = peak_mib.max(running.iter().map(|r| r.1).sum::<i64>());
            }
            // The KDF memory goes back at the unlock; the device-mapper work goes on without it.
            Some("re-activation unlocked, KDF share returned" | "re-activation done") => {
                running.retain(|r| r.0 != id)
            }
            _ => {}
        }
    }
    assert!(
        most >= 2,
        "re-activations never overlapped (at most {most} at once):\n{log}"
    );
    assert!(
        peak_mib <= BUDGET,
        "KDF memory of overlapping re-activations {peak_mib} MiB > budget {BUDGET}"
    );
    for (name, _) in &volumes {
        assert!(started.contains(name), "{name} never started:\n{log}");
    }

    // The key comes back: the agent's retry opens the volume by itself.
    put(&ks, "re-late", SecretType::Passphrase, b"late key");
    let v = health_when(&agent, |r| {
        r["retrying"].as_array().is_some_and(|a| a.is_empty())
    });
    let r = &v["reconcile"];
    assert!(
        r["reactivated"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("re-late")),
        "{v}"
    );
    assert_eq!(r["progress"]["failed"], 0, "{v}");
    let late_mapping = &volumes.last().unwrap().1;
    assert!(Path::new("/dev/mapper").join(late_mapping).exists());
    for (name, _) in &volumes {
        let r = agent.call("DELETE", &format!("/v1/attachments/{name}"), None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
}

/// The health document once `ready` holds for its `reconcile` part (polled; a generous
/// deadline only to end a hung test).
fn health_when(agent: &Agent, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, v) = agent.checked("GET", "/v1/health", "/v1/health", None);
        if ready(&v["reconcile"]) {
            return v;
        }
        assert!(Instant::now() < deadline, "not reached: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Keys from the real Barbican through the agent: a `passphrase` secret is used raw, a
/// `symmetric` one as its lowercase hex (OpenStack's rule) — proved with cryptsetup itself,
/// which opens each volume with exactly that passphrase and not the other form.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn attach_and_detach_with_keys_from_barbican() {
    need::require_dm_crypt();
    let url = barbican::require_url();
    // The [key_manager] tables go after [volume]; the harness appends the keystore's dir.
    let agent = Agent::start_with(
        "",
        &format!("{FAST_KDF}{}", barbican::key_manager_toml(&url)),
    );
    let sym: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let pass_id = barbican::create_secret(&url, SecretType::Passphrase.as_str(), b"from barbican");
    let sym_id = barbican::create_secret(&url, SecretType::Symmetric.as_str(), &sym);
    let loops = Loops::new(agent.dir.path(), 2, 24);
    let post = |body: String| {
        agent.checked(
            "POST",
            "/v1/attachments",
            "/v1/attachments",
            Some(body.as_bytes()),
        )
    };

    let (s, a) = post(request("bb-pass", &loops.0[0], "luks2", &pass_id));
    assert_eq!(s, 201, "{a}");
    assert_eq!(a["key_manager"], "barbican", "{a}");
    assert_eq!(a["derivation"], "raw", "{a}");
    let (s, b) = post(request("bb-sym", &loops.0[1], "luks", &sym_id));
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["derivation"], "lowercase-hex", "{b}");
    assert_eq!(b["format"], "luks1", "{b}");
    let hex: String = sym.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        !b.to_string().contains(&hex),
        "key material in the response"
    );
    let b_dev = b["device"].as_str().unwrap().to_owned();
    sh(&format!(
        "printf 'barbican-backed data' | dd of={b_dev} conv=fsync status=none"
    ));

    for id in ["bb-pass", "bb-sym"] {
        let (s, v) = agent.checked(
            "DELETE",
            "/v1/attachments/{volume_id}",
            &format!("/v1/attachments/{id}"),
            None,
        );
        assert_eq!(s, 200, "{v}");
    }
    assert!(!Path::new(&b_dev).exists(), "mapping left after detach");

    // cryptsetup agrees on the passphrase each volume got, and rejects the other form.
    let dir = agent.dir.path();
    let keyfile = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    let test = |dev: &Path, file: &str| {
        Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file", file])
            .arg(dev)
            .status()
            .unwrap()
            .success()
    };
    assert!(test(&loops.0[0], &keyfile("raw", b"from barbican")));
    assert!(test(&loops.0[1], &keyfile("hex", hex.as_bytes())));
    assert!(!test(&loops.0[1], &keyfile("sym-raw", &sym)));

    // Attach again: the existing LUKS1 volume opens (not formatted) with its data intact.
    let (s, b) = post(request("bb-sym", &loops.0[1], "luks", &sym_id));
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["formatted"], false, "{b}");
    let back = sh(&format!(
        "dd if={} bs=20 count=1 status=none",
        b["device"].as_str().unwrap()
    ));
    assert_eq!(back, "barbican-backed data");
    let r = agent.call("DELETE", "/v1/attachments/bb-sym", None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// What the kernel and the agent's files look like: the crypt mappings of `loops` (other tests
/// run alongside), state records, stable links, and a digest of each device in `hashed` (a
/// reformat would change it).
fn snapshot(agent: &Agent, loops: &Loops, hashed: &[PathBuf]) -> String {
    let ls = |d: &str| {
        sh(&format!(
            "ls -A {} 2>/dev/null || true",
            agent.dir.path().join(d).display()
        ))
    };
    let ours: Vec<String> = loops
        .0
        .iter()
        .map(|l| format!("crypt-{}\t", l.file_name().unwrap().to_string_lossy()))
        .collect();
    let mappings: Vec<String> = sh("dmsetup ls --target crypt")
        .lines()
        .filter(|l| ours.iter().any(|o| l.starts_with(o.as_str())))
        .map(str::to_owned)
        .collect();
    let mut s = format!(
        "mappings: {mappings:?}\nstate:\n{}\nby-id:\n{}\n",
        ls("state"),
        ls("by-id")
    );
    for d in hashed {
        // The first MiB holds every header and keyslot a format would write.
        s += &sh(&format!("head -c 1048576 {} | sha256sum", d.display()));
        s.push('\n');
    }
    s
}

/// A bad request: what it is, its body, and the status, error code and field it must get.
type BadCase = (
    &'static str,
    Vec<u8>,
    u16,
    &'static str,
    Option<&'static str>,
);

/// Every kind of bad request against a live agent that holds one attachment: each gets its
/// status and error code, and nothing changes — no mapping, record or link appears or goes, and
/// no device is written (the LUKS device offered the wrong key is not reformatted, the blank
/// one an unauthorized peer asked for is not formatted).
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn bad_requests_get_their_status_and_change_nothing() {
    need::require_dm_crypt();
    let agent = Agent::start_with("group = \"nogroup\"", FAST_KDF);
    let ks = keystore(&agent);
    put(&ks, "good", SecretType::Passphrase, b"good key");
    let loops = Loops::new(agent.dir.path(), 3, 24);
    let (attached, theirs, blank) = (&loops.0[0], &loops.0[1], &loops.0[2]);
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(request("bad-ok", attached, "luks2", "good").as_bytes()),
    );
    assert_eq!(s, 201, "{v}");
    let pass = agent.dir.path().join("their-pass");
    std::fs::write(&pass, b"not ours").unwrap();
    sh(&format!(
        "cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
         --key-file {} {}",
        pass.display(),
        theirs.display()
    ));
    let devices = [theirs.clone(), blank.clone()];
    let before = snapshot(&agent, &loops, &devices);

    let post =
        |body: &[u8]| agent.checked("POST", "/v1/attachments", "/v1/attachments", Some(body));
    let good_blank = request("bad-1", blank, "luks2", "good");
    let mut cases: Vec<BadCase> = vec![
        (
            "invalid JSON",
            b"{\"volume_id\": ".to_vec(),
            400,
            "invalid_json",
            None,
        ),
        (
            "unknown provider",
            good_blank.replace("\"luks2\"", "\"rot13\"").into_bytes(),
            400,
            "invalid_request",
            Some("encryption.provider"),
        ),
        (
            "missing key id",
            good_blank
                .replace("\"encryption_key_id\": \"good\"", "\"cipher\": null")
                .into_bytes(),
            400,
            "invalid_request",
            Some("encryption.encryption_key_id"),
        ),
        (
            "unknown key id",
            request("bad-1", blank, "luks2", "nope").into_bytes(),
            404,
            "unknown_key",
            Some("encryption.encryption_key_id"),
        ),
        (
            "wrong key for an existing LUKS device",
            request("bad-1", theirs, "luks2", "good").into_bytes(),
            422,
            "wrong_key",
            Some("encryption.encryption_key_id"),
        ),
        (
            "unknown device",
            request("bad-1", Path::new("/dev/no-such-disk"), "luks2", "good").into_bytes(),
            404,
            "unknown_device",
            Some("device_path"),
        ),
        (
            "another volume id for an attached device",
            request("bad-1", attached, "luks2", "good").into_bytes(),
            409,
            "attached_elsewhere",
            None,
        ),
    ];
    let mut big = Vec::from(&b"{\"volume_id\": \""[..]);
    big.extend(std::iter::repeat_n(b'a', 70_000));
    big.extend(b"\"}");
    cases.push(("oversize body", big, 413, "body_too_large", None));
    for (what, body, status, code, field) in &cases {
        let (s, v) = post(body);
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (*status, Some(*code)),
            "{what}: {v}"
        );
        assert_error(s, &v, *status, code, *field);
        assert_eq!(
            snapshot(&agent, &loops, &devices),
            before,
            "{what} changed something"
        );
    }

    // An unauthorized peer asking for a valid attach of the blank device: 403, not formatted.
    for p in [agent.dir.path(), agent.socket.parent().unwrap()] {
        sh(&format!("chmod 755 {}", p.display()));
    }
    sh(&format!("chmod 666 {}", agent.socket.display()));
    let body = agent.dir.path().join("body.json");
    std::fs::write(&body, &good_blank).unwrap();
    let out = sh(&format!(
        "setpriv --reuid=65533 --regid=65533 --clear-groups curl -sS --unix-socket {} \
         -X POST --data-binary @{} -w '\\n%{{http_code}}' http://localhost/v1/attachments",
        agent.socket.display(),
        body.display()
    ));
    assert!(out.ends_with("\n403"), "{out}");
    assert!(out.contains("forbidden"), "{out}");
    assert_eq!(
        snapshot(&agent, &loops, &devices),
        before,
        "refused peer changed something"
    );

    // The attachment that was there is still there, and works.
    let (s, v) = agent.checked("GET", "/v1/attachments", "/v1/attachments", None);
    assert_eq!(s, 200);
    let ids: Vec<_> = v["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["volume_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["bad-ok"], "{v}");
    let r = agent.call("DELETE", "/v1/attachments/bad-ok", None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
