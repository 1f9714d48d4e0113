//! udev-triggered activation against the real udevd and kernel: attaches that
//! name their device by LUKS UUID, WWN or serial and wait for it; teardown when the backing
//! device is removed (`waiting`), `lost` when it was in use, re-activation when it returns,
//! activation at start of a device that appeared while the agent was down, and a wait that
//! times out (504, nothing changed).
//!
//! Installs `udev-rules/90-volcrypt.rules` in /run/udev/rules.d, so it needs root, dm-crypt and
//! a running udevd: natively every test is reported *ignored*; the VM stage runs them
//! (`tests/vm/attach-suite.sh udev_vm_` for just these), and there a missing prerequisite
//! (udevd, scsi_debug) fails the test. The removal tests use scsi_debug
//! disks: a loop device cannot vanish while dm-crypt holds it (`losetup -d` only sets
//! autoclear), a SCSI disk can, like an iSCSI logout or a pulled disk.
#![cfg(feature = "system")]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use std::sync::Once;
use std::time::{Duration, Instant};

use common::agent::{Agent, OpenApi, assert_error};
use common::need::{self, mapping_active as mapping_exists};
use common::sh;
use serde_json::Value;
use volcrypt::keys::{Keystore, Secret};
use volcrypt::secret::{SecretBytes, SecretType};

const FAST_KDF: &str = "[volume.pbkdf]\nkind = \"pbkdf2\"\niterations = 1000\n";
const PASS: &[u8] = b"udev passphrase";

/// Fails the test unless udevd runs with dm-crypt; installs the rules under test.
fn setup() {
    need::require_udevd();
    install_rules();
}

/// The rules under test, installed once for the whole binary.
fn install_rules() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("udev-rules/90-volcrypt.rules");
        std::fs::create_dir_all("/run/udev/rules.d").unwrap();
        std::fs::copy(&src, "/run/udev/rules.d/90-volcrypt.rules").unwrap();
        // scsi_debug disks sit on a pseudo bus without ID_PATH: give them a by-path link so
        // the by_path selector is tried against a real udev link.
        std::fs::write(
            "/run/udev/rules.d/89-volcrypt-test.rules",
            "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTRS{model}==\"scsi_debug*\", \
             SYMLINK+=\"disk/by-path/volcrypt-test-scsi-debug\"\n",
        )
        .unwrap();
        sh("udevadm control --reload");
    });
}

fn settle() {
    sh("udevadm settle --timeout=60");
}

fn keystore(agent: &Agent) {
    let ks = Keystore::create(agent.dir.path().join("keys")).unwrap();
    ks.put(
        "udev-pass",
        &Secret::new(SecretType::Passphrase, SecretBytes::new(PASS.to_vec())),
    )
    .unwrap();
}

/// A LUKS2 header made by the real cryptsetup (PBKDF2 at 1000 iterations: cheap under TCG).
fn luks_format(target: &Path, dir: &Path) -> String {
    let pass = dir.join("pass");
    std::fs::write(&pass, PASS).unwrap();
    sh(&format!(
        "cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 \
         --pbkdf-force-iterations 1000 --key-file {} {}",
        pass.display(),
        target.display()
    ));
    sh(&format!("cryptsetup luksUUID {}", target.display()))
}

fn request(volume: &str, device: &str, wait: Option<u64>) -> String {
    let wait = wait
        .map(|s| format!(r#", "wait_for_device": {{"timeout_secs": {s}}}"#))
        .unwrap_or_default();
    format!(
        r#"{{"volume_id": "{volume}", "device": {device}{wait},
            "encryption": {{"provider": "luks2", "control_location": "front-end",
                            "encryption_key_id": "udev-pass"}}}}"#
    )
}

fn post(agent: &Agent, body: &str) -> (u16, Value) {
    agent.checked(
        "POST",
        "/v1/attachments",
        "/v1/attachments",
        Some(body.as_bytes()),
    )
}

fn get(agent: &Agent, id: &str) -> (u16, Value) {
    agent.checked(
        "GET",
        "/v1/attachments/{volume_id}",
        &format!("/v1/attachments/{id}"),
        None,
    )
}

/// Poll the volume until `pred` holds (60 s).
fn wait_for(agent: &Agent, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, v) = get(agent, id);
        if s == 200 && pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: not {what} after 60 s: {v}\nagent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    common::pattern(seed, 1 << 20)
}

fn write_dev(dev: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_dev(dev: &Path, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(dev).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn metric(agent: &Agent, name: &str) -> Option<i64> {
    let m = String::from_utf8(agent.call("GET", "/metrics", None).body).unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// (d) and (a): a wait that times out changes nothing; a loop device with a LUKS header that
/// appears while an attach waits for its UUID completes that attach, with the right key.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn udev_vm_loop_device_appearing_completes_a_waiting_attach() {
    setup();
    let agent = Agent::start_with("", FAST_KDF);
    keystore(&agent);
    let img = agent.dir.path().join("luks.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    let uuid = luks_format(&img, agent.dir.path());

    // (d) Nothing carries this UUID: 504 device_timeout after the wait, and nothing changed.
    let t0 = Instant::now();
    let (s, v) = post(
        &agent,
        &request(
            "udev-a",
            r#"{"luks_uuid": "00000000-0000-4000-8000-000000000000"}"#,
            Some(2),
        ),
    );
    assert_error(s, &v, 504, "device_timeout", Some("device"));
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    let (_, list) = agent.checked("GET", "/v1/attachments", "/v1/attachments", None);
    assert_eq!(list["attachments"], serde_json::json!([]), "{list}");
    assert!(!mapping_exists("crypt-udev-a"));
    // Without a wait, an absent device is 404 at once.
    let (s, v) = post(
        &agent,
        &request("udev-a", &format!(r#"{{"luks_uuid": "{uuid}"}}"#), None),
    );
    assert_error(s, &v, 404, "unknown_device", Some("device"));

    // (a) The attach waits; the loop device appears 2 s later.
    let socket = agent.socket.clone();
    let body = request(
        "udev-a",
        &format!(r#"{{"luks_uuid": "{uuid}"}}"#),
        Some(120),
    );
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let r = volcrypt::rpc::client::call(
            &socket,
            "POST",
            "/v1/attachments",
            Some(body.into_bytes()),
        )
        .unwrap();
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_secs(2));
    let loopdev = PathBuf::from(sh(&format!("losetup --find --show {}", img.display())));
    let (reply, waited) = waiter.join().unwrap();
    let v: Value = reply.json().unwrap();
    OpenApi::load().check_response("POST", "/v1/attachments", reply.status, &v);
    assert_eq!(reply.status, 201, "{v}\n{}", agent.log_text());
    eprintln!(
        "udev: waiting attach completed {waited:?} after it was sent (device added after 2 s)"
    );
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    assert_eq!(v["mapping_name"], "crypt-udev-a");
    assert_eq!(v["formatted"], false, "{v}");
    assert_eq!(v["backing_device"], loopdev.display().to_string());
    assert_eq!(
        v["device_link"],
        "not replaced: replace_device_symlink is false"
    );
    let mapper = PathBuf::from(v["device"].as_str().unwrap());
    let (_, st) = get(&agent, "udev-a");
    assert_eq!(st["phase"], "attached", "{st}");

    // Data written through the mapping is what cryptsetup reads back with the passphrase, and
    // is not on the loop device in the clear.
    let data = pattern(0x5a);
    write_dev(&mapper, &data);
    let r = agent.call("DELETE", "/v1/attachments/udev-a", None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!mapping_exists("crypt-udev-a"));
    let pass = agent.dir.path().join("pass");
    sh(&format!(
        "cryptsetup open --key-file {} {} udev-check",
        pass.display(),
        loopdev.display()
    ));
    let back = read_dev(Path::new("/dev/mapper/udev-check"), data.len());
    sh("cryptsetup close udev-check");
    assert!(back == data, "data read back through cryptsetup differs");
    let raw = std::fs::read(&img).unwrap();
    assert!(
        !raw.windows(64).any(|w| w == &data[..64]),
        "plaintext found on the backing device"
    );
    sh(&format!("losetup -d {}", loopdev.display()));

    // A device_path request may wait too: for udev's /dev/disk/by-uuid link of the header.
    settle();
    let link = format!("/dev/disk/by-uuid/{uuid}");
    assert!(!Path::new(&link).exists(), "{link} still there");
    let socket = agent.socket.clone();
    let body = format!(
        r#"{{"volume_id": "udev-p", "device_path": "{link}", "wait_for_device": {{"timeout_secs": 120}},
            "encryption": {{"provider": "luks2", "control_location": "front-end",
                            "encryption_key_id": "udev-pass"}},
            "options": {{"replace_device_symlink": false}}}}"#
    );
    let waiter = std::thread::spawn(move || {
        volcrypt::rpc::client::call(&socket, "POST", "/v1/attachments", Some(body.into_bytes()))
            .unwrap()
    });
    std::thread::sleep(Duration::from_secs(2));
    let loopdev = PathBuf::from(sh(&format!("losetup --find --show {}", img.display())));
    let reply = waiter.join().unwrap();
    let v: Value = reply.json().unwrap();
    assert_eq!(reply.status, 201, "{v}");
    assert_eq!(v["backing_device"], loopdev.display().to_string());
    let mapper = PathBuf::from(v["device"].as_str().unwrap());
    assert!(
        read_dev(&mapper, data.len()) == data,
        "path attach reads other data"
    );
    let r = agent.call("DELETE", "/v1/attachments/udev-p", None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    sh(&format!("losetup -d {}", loopdev.display()));
}

/// A scsi_debug disk (its data survives delete + rescan while the module stays loaded).
struct ScsiDisk {
    dev: PathBuf,
    host_scan: PathBuf,
}

impl ScsiDisk {
    /// A new disk of the loaded scsi_debug driver ([`need::require_scsi_debug`]).
    fn new() -> Option<ScsiDisk> {
        let drv = Path::new("/sys/bus/pseudo/drivers/scsi_debug");
        let before = Self::disks();
        std::fs::write(drv.join("add_host"), "1").ok()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(n) = Self::disks().into_iter().find(|n| !before.contains(n)) {
                settle();
                let dev = PathBuf::from("/dev").join(&n);
                // /sys/block/sdX/device -> …/hostN/targetN:0:0/N:0:0:0
                let link = std::fs::canonicalize(format!("/sys/block/{n}/device")).ok()?;
                let host = link
                    .ancestors()
                    .find(|p| {
                        p.file_name()
                            .is_some_and(|f| f.to_string_lossy().starts_with("host"))
                    })?
                    .file_name()?
                    .to_owned();
                let host_scan = Path::new("/sys/class/scsi_host").join(host).join("scan");
                return Some(ScsiDisk { dev, host_scan });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn disks() -> Vec<String> {
        need::scsi_debug_disks()
    }

    fn property(&self, name: &str) -> Option<String> {
        sh(&format!(
            "udevadm info --query=property --name={}",
            self.dev.display()
        ))
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_owned))
    }

    /// Hot-unplug: the kernel removes the disk (udev `remove`).
    fn remove(&self) {
        let base = self.dev.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::write(format!("/sys/block/{base}/device/delete"), "1").unwrap();
    }

    /// Plug it back (host rescan; udev `add`). Returns its node, which may differ.
    fn rescan(&mut self) -> PathBuf {
        let before = Self::disks();
        std::fs::write(&self.host_scan, "- - -").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(n) = Self::disks().into_iter().find(|n| !before.contains(n)) {
                self.dev = PathBuf::from("/dev").join(n);
                return self.dev.clone();
            }
            assert!(
                Instant::now() < deadline,
                "scsi_debug disk did not come back"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ScsiDisk {
    fn drop(&mut self) {
        if self.dev.exists() {
            self.remove();
        }
    }
}

/// (b) removal of an unused mapping's disk → torn down, `waiting`; back → re-activated;
/// (e) back while the agent is down → activated at start; (c) removed while the mapping is
/// held open → `lost`, mapping left and reported; released and back → active again.
/// Selectors: WWN, then serial.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn udev_vm_scsi_disk_removed_and_returned() {
    setup();
    need::require_scsi_debug();
    let mut disk = ScsiDisk::new().expect("a new scsi_debug disk");
    let mut agent = Agent::start_with("", FAST_KDF);
    keystore(&agent);
    let uuid = luks_format(&disk.dev, agent.dir.path());
    sh(&format!(
        "udevadm trigger --action=change --settle {}",
        disk.dev.display()
    ));
    // The rules tagged it, with the identities the selectors use.
    let tags = disk
        .property("CURRENT_TAGS")
        .or_else(|| disk.property("TAGS"))
        .unwrap_or_default();
    assert!(tags.contains(":volcrypt:"), "not tagged: {tags:?}");
    assert_eq!(disk.property("ID_FS_UUID").as_deref(), Some(uuid.as_str()));
    let wwn = disk.property("ID_WWN").expect("scsi_debug disk has ID_WWN");
    let serial = disk
        .property("ID_SERIAL")
        .expect("scsi_debug disk has ID_SERIAL");
    eprintln!(
        "udev: scsi_debug disk {} wwn {wwn} serial {serial} LUKS {uuid}",
        disk.dev.display()
    );

    // Attach by WWN (present: no wait needed).
    let id = "udev-b";
    let (s, v) = post(
        &agent,
        &request(id, &format!(r#"{{"wwn": "{wwn}"}}"#), Some(30)),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["mapping_name"], "crypt-udev-b");
    let mapper = PathBuf::from(v["device"].as_str().unwrap());
    let stable = PathBuf::from(v["stable_link"].as_str().unwrap());
    let data = pattern(0xa5);
    write_dev(&mapper, &data);

    // (b) Unplugged while unused: torn down, waiting.
    disk.remove();
    let st = wait_for(&agent, id, "waiting", |v| v["phase"] == "waiting");
    assert_eq!(st["active"], false, "{st}");
    assert!(
        !mapping_exists("crypt-udev-b"),
        "mapping left after teardown"
    );
    assert!(
        std::fs::symlink_metadata(&stable).is_err(),
        "stable link left"
    );
    assert_eq!(metric(&agent, "volcrypt_waiting_attachments"), Some(1));
    assert!(agent.log_text().contains("unused mapping torn down"));
    // Back: re-activated by the add event, same data.
    let node = disk.rescan();
    let st = wait_for(&agent, id, "re-activated", |v| {
        v["phase"] == "attached" && v["active"] == true
    });
    assert_eq!(st["backing_device"], node.display().to_string(), "{st}");
    assert!(
        read_dev(&mapper, data.len()) == data,
        "data differs after re-activation"
    );
    eprintln!(
        "udev: removed → waiting → re-added → attached ({})",
        node.display()
    );

    // (e) Unplugged again, then back while the agent is down: activated at start.
    disk.remove();
    wait_for(&agent, id, "waiting", |v| v["phase"] == "waiting");
    assert!(agent.terminate().success());
    let node = disk.rescan();
    settle();
    agent.start_again();
    let h = agent.health_after_reconcile();
    assert_eq!(h["reconcile"]["waiting"], serde_json::json!([id]), "{h}");
    let st = wait_for(&agent, id, "activated at start", |v| {
        v["phase"] == "attached" && v["active"] == true
    });
    assert_eq!(st["backing_device"], node.display().to_string(), "{st}");
    assert!(read_dev(&mapper, data.len()) == data);
    eprintln!("udev: device returned while the agent was down → attached at start");

    // Unplugged while the agent is down: handled at start as the remove event would have been
    // (unused: torn down, waiting); back afterwards: re-activated.
    assert!(agent.terminate().success());
    disk.remove();
    settle();
    agent.start_again();
    let st = wait_for(&agent, id, "torn down at start", |v| {
        v["phase"] == "waiting"
    });
    assert!(!mapping_exists("crypt-udev-b"), "{st}");
    disk.rescan();
    wait_for(&agent, id, "re-activated", |v| {
        v["phase"] == "attached" && v["active"] == true
    });
    eprintln!(
        "udev: device removed while the agent was down → torn down at start → back → attached"
    );

    // (c) Unplugged while the mapping is open: left in place, lost, reported.
    let held = std::fs::File::open(&mapper).unwrap();
    disk.remove();
    let st = wait_for(&agent, id, "lost", |v| v["phase"] == "lost");
    assert_eq!(st["active"], true, "{st}");
    assert_eq!(st["stale"], true, "{st}");
    assert!(
        mapping_exists("crypt-udev-b"),
        "an open mapping was removed"
    );
    assert_eq!(metric(&agent, "volcrypt_lost_attachments"), Some(1));
    let (_, list) = agent.checked("GET", "/v1/attachments", "/v1/attachments", None);
    assert_eq!(list["attachments"][0]["phase"], "lost", "{list}");
    assert!(agent.log_text().contains("marked lost"));
    // Released and back: the stale mapping is replaced, active again.
    drop(held);
    disk.rescan();
    wait_for(&agent, id, "re-activated after lost", |v| {
        v["phase"] == "attached" && v["active"] == true && v["stale"] == false
    });
    assert!(read_dev(&mapper, data.len()) == data);
    assert_eq!(metric(&agent, "volcrypt_lost_attachments"), Some(0));

    let r = agent.call("DELETE", &format!("/v1/attachments/{id}"), None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // By serial too, attached at once.
    let (s, v) = post(
        &agent,
        &request("udev-s", &format!(r#"{{"serial": "{serial}"}}"#), None),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["backing_device"], disk.dev.display().to_string());
    // The same disk for another volume is refused.
    let (s, v) = post(
        &agent,
        &request("udev-t", &format!(r#"{{"luks_uuid": "{uuid}"}}"#), None),
    );
    assert_error(s, &v, 409, "attached_elsewhere", Some("device"));
    assert!(!mapping_exists("crypt-udev-t"));
    let r = agent.call("DELETE", "/v1/attachments/udev-s", None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!mapping_exists("crypt-udev-s"));

    // And by its by-path link.
    let by_path = disk.property("DEVLINKS").and_then(|l| {
        l.split_whitespace()
            .find(|p| p.starts_with("/dev/disk/by-path/"))
            .map(str::to_owned)
    });
    match by_path {
        Some(p) => {
            let (s, v) = post(
                &agent,
                &request("udev-p", &format!(r#"{{"by_path": "{p}"}}"#), None),
            );
            assert_eq!(s, 201, "{v}");
            assert_eq!(v["backing_device"], disk.dev.display().to_string());
            assert!(
                std::fs::symlink_metadata(&p)
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );
            assert_eq!(
                std::fs::canonicalize(&p).unwrap(),
                disk.dev,
                "udev's link was replaced"
            );
            let r = agent.call("DELETE", "/v1/attachments/udev-p", None);
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            eprintln!("udev: attached by serial {serial} and by-path {p}");
        }
        None => eprintln!("udev: scsi_debug disk has no by-path link here: by_path not covered"),
    }
}
