//! The agent against a real kernel (dm-crypt, loop devices): attach, idempotent re-attach,
//! status, wrong and unknown keys, detach through the API and the CLI's `--socket` mode, and 20
//! concurrent attaches of different Argon2 volumes held within the KDF memory budget.
//!
//! Needs root and dm-crypt: natively this prints `skipped: needs dm-crypt` and passes; in the
//! VM (tests/vm/run.sh sets VOLCRYPT_VM=1 and loads dm_crypt) it runs for real, e.g.
//!   cargo test --no-run --test rpc_vm  # then, with the printed binary:
//!   tests/vm/run.sh --udev --mem 1536 -- tests/vm/guest-attach.sh target/debug/deps/rpc_vm-…
#![cfg(feature = "system")]

mod rpc_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rpc_common::{Agent, BIN, assert_error};
use volcrypt::keys::{Keystore, Secret};
use volcrypt::secret::{SecretBytes, SecretType};

fn skip() -> bool {
    let vm = std::env::var("VOLCRYPT_VM").is_ok_and(|v| v == "1");
    let dm = Path::new("/sys/module/dm_crypt").exists() || vm;
    if !(dm && nix::unistd::geteuid().is_root() && rpc_common::dm_available()) {
        eprintln!("skipped: needs dm-crypt (root and the dm_crypt module; run in the VM)");
        return true;
    }
    false
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

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

const FAST_KDF: &str = "[volume.pbkdf]\nkind = \"pbkdf2\"\niterations = 1000\n";

#[test]
fn attach_status_detach_through_the_api() {
    if skip() {
        return;
    }
    let agent = Agent::start_with("", FAST_KDF);
    let ks = keystore(&agent);
    put(&ks, "pass-1", SecretType::Passphrase, b"correct horse");
    put(&ks, "sym-2", SecretType::Symmetric, &[7u8; 32]);
    let loops = Loops::new(agent.dir.path(), 2, 24);
    let dev = &loops.0[0];
    let body = request("vm-vol-1", dev, "luks2", "pass-1");

    // First attach formats the blank device: 201.
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(body.as_bytes()),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["formatted"], true);
    let mapper = PathBuf::from(v["device"].as_str().unwrap());
    assert!(mapper.exists(), "{}", mapper.display());
    assert_eq!(v["derivation"], "raw");
    assert!(
        !v.to_string().contains("correct horse"),
        "secret in the response"
    );

    // Again: the existing mapping, 200.
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(body.as_bytes()),
    );
    assert_eq!(s, 200, "{v}");
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
    assert_error(s, &v, 422, "wrong_key", None);
    assert!(v["error"]["message"].as_str().unwrap().contains("sym-2"));
}

/// 20 attaches at once, each an Argon2id keyslot of 8 MiB, with a 24 MiB budget (3 at a time): all succeed
/// and the KDF memory admitted never exceeds the budget (sampled from /metrics meanwhile).
#[test]
fn twenty_concurrent_attaches_stay_within_the_kdf_budget() {
    if skip() {
        return;
    }
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
fn restart_reports_inactive_and_foreign_mappings_without_touching_them() {
    if skip() {
        return;
    }
    let mut agent = Agent::start_with("", FAST_KDF);
    let ks = keystore(&agent);
    put(&ks, "pass-r", SecretType::Passphrase, b"reconcile");
    let loops = Loops::new(agent.dir.path(), 2, 24);
    let body = request("vm-rec-1", &loops.0[0], "luks2", "pass-r");
    let (s, v) = agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(body.as_bytes()),
    );
    assert_eq!(s, 201, "{v}");
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
    assert_eq!(r["foreign"], serde_json::json!(["crypt-foreign-x"]), "{v}");
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
