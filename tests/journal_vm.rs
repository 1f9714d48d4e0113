//! Crash safety of the journal: `kill -9` of `volcrypt serve` at
//! every journal point of attach and detach, then a restart, leaves a consistent state.
//!
//! For each point the engine's test hook (`VOLCRYPT_TEST_PAUSE_AT`, src/volume/attach.rs
//! `test_pause`) stops the agent there; the test checks that it really is at that point (record
//! phase, mapping present or not), `kill -9`s it, restarts it without the hook and checks what
//! the start-up reconcile reported (`GET /v1/health` → `reconcile`), the mapping, both links
//! (the stable `volcrypt-<id>` link and the replaced `device_path` symlink), the record's
//! phase, that data written before the crash is intact, and that attach and detach through the
//! API work afterwards. The semantics per point are in README.md ("Crash safety").
//! Rekey: a kill at each of its steps leaves a volume that the key its record names opens,
//! online (the mapping never closes), and the same request finishes it after the restart.
//! Also: a kill inside the activation (simulated: the table-less device it leaves), a second
//! kill during the restart's own recovery, the formatted flag of a first attach, and a truncated
//! record beside the others (reported under `corrupt`, moved aside byte for byte).
//!
//! Needs root and dm-crypt: natively every test is reported *ignored*; the VM stage runs them
//! (`tests/vm/attach-suite.sh kill9_` for just these), and there a missing prerequisite fails.
#![cfg(feature = "system")]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{Agent, assert_error};
use common::{need, sh};
use serde_json::{Value, json};
use volcrypt::keys::{Keystore, Secret};
use volcrypt::secret::{SecretBytes, SecretType};

const FAST_KDF: &str = "[volume.pbkdf]\nkind = \"pbkdf2\"\niterations = 1000\n";
/// Bytes written through the mapping before the crash and read back after it.
const DATA_LEN: usize = 256 * 1024;
const DATA_OFFSET: u64 = 1 << 20;

/// One volume on a loop device, named through a `device_path` symlink the attach replaces.
struct Vol {
    agent: Agent,
    id: String,
    /// The request's `device_path`: a symlink to the loop device.
    link: PathBuf,
    loop_dev: PathBuf,
    mapping: String,
    body: String,
}

impl Vol {
    fn new(point: &str) -> Vol {
        Vol::with_provider(point, "luks2")
    }

    fn with_provider(point: &str, provider: &str) -> Vol {
        let agent = Agent::start_with("", FAST_KDF);
        let ks = Keystore::create(agent.dir.path().join("keys")).unwrap();
        ks.put(
            "pass",
            &Secret::new(
                SecretType::Passphrase,
                SecretBytes::new(format!("crash at {point}").into_bytes()),
            ),
        )
        .unwrap();
        let img = agent.dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(24 << 20)
            .unwrap();
        let loop_dev = PathBuf::from(sh(&format!("losetup --find --show {}", img.display())));
        let link = agent.dir.path().join(format!("by-path/jdisk-{point}"));
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&loop_dev, &link).unwrap();
        let id = format!("jvol-{point}");
        let body = format!(
            r#"{{"volume_id": "{id}", "device_path": "{}",
                "encryption": {{"provider": "{provider}", "control_location": "front-end",
                                "encryption_key_id": "pass"}},
                "options": {{"replace_device_symlink": true}}}}"#,
            link.display()
        );
        Vol {
            agent,
            id,
            link,
            loop_dev,
            mapping: format!("crypt-jdisk-{point}"),
            body,
        }
    }

    fn mapper(&self) -> PathBuf {
        PathBuf::from("/dev/mapper").join(&self.mapping)
    }

    fn stable(&self) -> PathBuf {
        self.agent
            .dir
            .path()
            .join(format!("by-id/volcrypt-{}", self.id))
    }

    fn record_path(&self) -> PathBuf {
        self.agent
            .dir
            .path()
            .join(format!("state/{}.json", self.id))
    }

    /// The record's phase on disk, `None` without a record.
    fn record_phase(&self) -> Option<String> {
        let text = match std::fs::read_to_string(self.record_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("read record: {e}"),
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        Some(v["phase"].as_str().unwrap().to_owned())
    }

    /// Whether device-mapper has the mapping (`dmsetup info`, not our own code).
    fn mapping_active(&self) -> bool {
        need::mapping_active(&self.mapping)
    }

    fn attach(&self) -> (u16, Value) {
        self.agent.checked(
            "POST",
            "/v1/attachments",
            "/v1/attachments",
            Some(self.body.as_bytes()),
        )
    }

    fn detach(&self) -> (u16, Value) {
        let path = format!("/v1/attachments/{}", self.id);
        self.agent
            .checked("DELETE", "/v1/attachments/{volume_id}", &path, None)
    }

    fn get(&self) -> (u16, Value) {
        let path = format!("/v1/attachments/{}", self.id);
        self.agent
            .checked("GET", "/v1/attachments/{volume_id}", &path, None)
    }

    fn pattern(&self) -> Vec<u8> {
        let seed = self.id.bytes().fold(7u8, |a, b| a.wrapping_mul(31) ^ b);
        (0..DATA_LEN)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 9) as u8)
            .collect()
    }

    fn write_data(&self) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.mapper())
            .unwrap();
        f.seek(SeekFrom::Start(DATA_OFFSET)).unwrap();
        f.write_all(&self.pattern()).unwrap();
        f.sync_all().unwrap();
    }

    fn assert_data(&self) {
        let mut f = std::fs::File::open(self.mapper()).unwrap();
        f.seek(SeekFrom::Start(DATA_OFFSET)).unwrap();
        let mut buf = vec![0u8; DATA_LEN];
        f.read_exact(&mut buf).unwrap();
        assert!(
            buf == self.pattern(),
            "data written before the crash is not intact"
        );
    }

    /// Attached: mapping active, both links at it, record `attached` (on disk and in the API).
    fn assert_attached(&self) {
        assert!(self.mapping_active(), "{} not active", self.mapping);
        assert!(self.mapper().exists());
        assert_eq!(
            std::fs::read_link(self.stable()).ok(),
            Some(self.mapper()),
            "stable link"
        );
        assert_eq!(
            std::fs::read_link(&self.link).ok(),
            Some(self.mapper()),
            "device_path link"
        );
        assert_eq!(self.record_phase().as_deref(), Some("attached"));
        let (s, v) = self.get();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["phase"], "attached", "{v}");
        assert_eq!(v["active"], true, "{v}");
        assert_eq!(v["stable_link_ok"], true, "{v}");
        let (s, v) = self
            .agent
            .checked("GET", "/v1/attachments", "/v1/attachments", None);
        assert_eq!(s, 200, "{v}");
        let listed: Vec<_> = v["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["volume_id"].clone(), a["phase"].clone()))
            .collect();
        assert_eq!(listed, [(json!(self.id), json!("attached"))], "{v}");
    }

    /// Detached: no mapping, no stable link, device_path back at the loop device, no record.
    fn assert_detached(&self) {
        assert!(!self.mapping_active(), "{} still active", self.mapping);
        assert!(
            std::fs::symlink_metadata(self.stable()).is_err(),
            "stable link left behind"
        );
        assert_eq!(
            std::fs::read_link(&self.link).ok(),
            Some(self.loop_dev.clone()),
            "device_path not restored"
        );
        assert_eq!(self.record_phase(), None, "record left behind");
        let (s, v) = self.get();
        assert_eq!(s, 404, "{v}");
    }

    /// First attach (formats the blank device), then write the data.
    fn attach_and_write(&self) {
        let (s, v) = self.attach();
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["formatted"], true, "{v}");
        assert_eq!(v["device_link"], "replaced", "{v}");
        self.write_data();
        self.assert_attached();
    }

    /// Stop the agent (SIGTERM) and start it again with the test hook set to `point`.
    fn restart_paused(&mut self, point: &str) -> u64 {
        assert!(self.agent.terminate().success());
        self.start_paused(point)
    }

    /// Start the (dead) agent with the test hook set to `point`; returns the log offset.
    fn start_paused(&mut self, point: &str) -> u64 {
        let from = log_len(&self.agent);
        self.agent.child = spawn(&self.agent, Some(point));
        self.agent.wait_ready();
        from
    }

    /// Wait for the pause line (logged after `from`), check it carries the request span's
    /// volume id, mapping and phase (`None`: paused in the start-up reconcile, no request),
    /// then `kill -9` the agent.
    fn kill_at(&mut self, point: &str, from: u64, phase: Option<&str>) {
        let want = format!("test pause at {point}");
        let deadline = Instant::now() + Duration::from_secs(300);
        let line = loop {
            let text = self.agent.log_text();
            let new = text.get(from as usize..).unwrap_or("");
            // Whole lines only: the agent may be writing the next one right now.
            if let Some(l) = new
                .split_inclusive('\n')
                .find(|l| l.ends_with('\n') && l.contains(&want))
            {
                break l.trim_end().to_owned();
            }
            if let Some(st) = self.agent.child.try_wait().unwrap() {
                panic!("agent exited ({st}) before pausing at {point}: {new}");
            }
            assert!(
                Instant::now() < deadline,
                "agent did not pause at {point}: {new}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        if let Some(phase) = phase {
            assert_eq!(v["span"]["volume_id"], json!(self.id), "{line}");
            assert_eq!(v["span"]["mapping"], json!(self.mapping), "{line}");
            assert_eq!(v["span"]["phase"], phase, "{line}");
            // The API shows the operation in progress (reads take no volume lock).
            let (s, got) = self.get();
            assert_eq!(s, 200, "{got}");
            assert_eq!(got["phase"], phase, "{got}");
            assert_eq!(got["active"], self.mapping_active(), "{got}");
        }
        // SIGKILL: no destructor, no shutdown, nothing flushed beyond what is on disk.
        self.agent.child.kill().unwrap();
        let st = self.agent.child.wait().unwrap();
        assert!(!st.success(), "{st}");
    }

    /// Start the agent again without the hook and return its reconcile report.
    fn restart_after_crash(&mut self) -> Value {
        self.agent.child = spawn(&self.agent, None);
        self.agent.wait_ready();
        let health = self.agent.health_after_reconcile();
        let r = health["reconcile"].clone();
        assert_eq!(r["checked"], true, "{health}");
        for k in ["failed", "conflict", "inactive", "stale"] {
            assert_eq!(r[k], json!([]), "{k}: {health}");
        }
        // Other tests' mappings may be listed as foreign (they run beside this one), ours never.
        assert!(
            !r["foreign"]
                .as_array()
                .unwrap()
                .contains(&json!(self.mapping)),
            "{health}"
        );
        r
    }
}

impl Drop for Vol {
    fn drop(&mut self) {
        let _ = self.agent.child.kill();
        let _ = self.agent.child.wait();
        // A failed test may leave its mapping: close it so nothing leaks into the next test.
        let _ = Command::new("cryptsetup")
            .args(["close", &self.mapping])
            .stderr(Stdio::null())
            .status();
        // A table-less device (the inside-open case) is removed by device-mapper alone.
        let _ = Command::new("dmsetup")
            .args(["remove", &self.mapping])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loop_dev)
            .status();
    }
}

fn log_len(agent: &Agent) -> u64 {
    std::fs::metadata(&agent.log).map(|m| m.len()).unwrap_or(0)
}

/// `volcrypt serve` on the agent's config and log, with the pause hook when `pause` is set.
fn spawn(agent: &Agent, pause: Option<&str>) -> Child {
    let mut cmd = common::agent::serve_command(&agent.dir.path().join("volcrypt.toml"), &agent.log);
    cmd.env_remove("VOLCRYPT_TEST_PAUSE_AT");
    if let Some(p) = pause {
        cmd.env("VOLCRYPT_TEST_PAUSE_AT", p);
    }
    cmd.spawn().unwrap()
}

/// Send a request from another thread (it never gets an answer: the agent is killed).
fn send_in_background(
    agent: &Agent,
    method: &'static str,
    path: String,
    body: Option<String>,
) -> std::thread::JoinHandle<()> {
    let socket = agent.socket.clone();
    std::thread::spawn(move || {
        let r = volcrypt::rpc::client::call(&socket, method, &path, body.map(String::into_bytes));
        if let Ok(reply) = r {
            panic!(
                "{method} {path} answered {} although the agent was killed mid-operation",
                reply.status
            );
        }
    })
}

/// Crash during attach at `point`, with the volume detached (data on it) before. `inside_open`:
/// also leave what a kill inside libcryptsetup's activation leaves (device-mapper's create done,
/// table load not yet): a table-less device under the mapping name with the LUKS mapping's uuid.
fn crash_during_attach(
    label: &str,
    point: &str,
    inside_open: bool,
    mapping_before_kill: bool,
    report_key: &str,
) {
    let mut vol = Vol::new(label);
    vol.attach_and_write();
    let uuid = sh(&format!(
        "dmsetup info -c --noheadings -o uuid {}",
        vol.mapping
    ));
    assert!(uuid.starts_with("CRYPT-LUKS2-"), "{uuid}");
    let (s, v) = vol.detach();
    assert_eq!(s, 200, "{v}");
    vol.assert_detached();

    let from = vol.restart_paused(point);
    let client = send_in_background(
        &vol.agent,
        "POST",
        "/v1/attachments".into(),
        Some(vol.body.clone()),
    );
    vol.kill_at(point, from, Some("attaching"));
    client.join().unwrap();
    // Where the crash happened: the journal says attaching; the mapping is there or not.
    assert_eq!(vol.record_phase().as_deref(), Some("attaching"));
    assert_eq!(vol.mapping_active(), mapping_before_kill, "at {point}");
    let linked = std::fs::read_link(vol.stable()).ok() == Some(vol.mapper());
    assert_eq!(linked, point == "linked", "stable link at {point}");
    if inside_open {
        sh(&format!(
            "dmsetup create {} --notable -u {uuid}",
            vol.mapping
        ));
        assert!(vol.mapping_active());
    }

    // A truncated record beside it: reported and kept aside, the good record still reconciled.
    let cut = vol.agent.dir.path().join("state/cut-vol.json");
    let full = std::fs::read(vol.record_path()).unwrap();
    std::fs::write(&cut, &full[..full.len() / 3]).unwrap();

    let r = vol.restart_after_crash();
    assert_eq!(r[report_key], json!([vol.id]), "{r}");
    assert_eq!(r["records"], 1, "{r}");
    let corrupt = r["corrupt"].as_array().unwrap();
    assert_eq!(corrupt.len(), 1, "{r}");
    assert_eq!(corrupt[0]["file"], json!(cut), "{r}");
    assert!(corrupt[0]["reason"].as_str().unwrap().contains("corrupt"));
    let aside = PathBuf::from(corrupt[0]["moved_to"].as_str().unwrap());
    assert_eq!(std::fs::read(&aside).unwrap(), &full[..full.len() / 3]);
    assert!(!cut.exists());

    // Rolled forward: attached as the journaled request asked, nothing re-formatted.
    vol.assert_attached();
    vol.assert_data();
    // A client retry of the interrupted attach is idempotent.
    let (s, v) = vol.attach();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["already_attached"], true, "{v}");
    assert_eq!(v["formatted"], false, "{v}");
    let (s, v) = vol.detach();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["was_active"], true, "{v}");
    vol.assert_detached();
}

/// Crash during detach at `point`, with data written while attached.
fn crash_during_detach(point: &str, mapping_before_kill: bool) {
    let mut vol = Vol::new(point);
    vol.attach_and_write();

    let from = vol.restart_paused(point);
    let client = send_in_background(
        &vol.agent,
        "DELETE",
        format!("/v1/attachments/{}", vol.id),
        None,
    );
    vol.kill_at(point, from, Some("detaching"));
    client.join().unwrap();
    assert_eq!(vol.record_phase().as_deref(), Some("detaching"));
    assert_eq!(vol.mapping_active(), mapping_before_kill, "at {point}");
    assert_eq!(
        std::fs::read_link(vol.stable()).ok(),
        Some(vol.mapper()),
        "links are removed only after the close"
    );

    let r = vol.restart_after_crash();
    assert_eq!(r["detached"], json!([vol.id]), "{r}");
    assert_eq!(r["reactivated"], json!([]), "{r}");
    // Rolled forward: the detach the client asked for is finished.
    vol.assert_detached();

    // The volume attaches again through the API with its data intact.
    let (s, v) = vol.attach();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["formatted"], false, "{v}");
    vol.assert_attached();
    vol.assert_data();
    let (s, v) = vol.detach();
    assert_eq!(s, 200, "{v}");
    vol.assert_detached();
}

/// Record `attaching` written, no mapping yet → re-attached from the journaled request.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_attach_before_open_reattaches() {
    need::require_dm_crypt();
    crash_during_attach("attaching", "attaching", false, false, "reactivated");
}

/// Killed inside the activation itself: the table-less device it leaves is removed and the
/// attach redone.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_attach_inside_open_removes_the_tableless_device_and_reattaches() {
    need::require_dm_crypt();
    crash_during_attach("inside-open", "attaching", true, false, "reactivated");
}

/// Mapping open, no links yet → links set, record marked attached.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_attach_after_open_repairs_links() {
    need::require_dm_crypt();
    crash_during_attach("opened", "opened", false, true, "repaired");
}

/// Links set, record still `attaching` → record marked attached.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_attach_after_links_marks_attached() {
    need::require_dm_crypt();
    crash_during_attach("linked", "linked", false, true, "repaired");
}

/// Record `detaching` written, mapping still open → detach finished.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_detach_before_close_finishes_detach() {
    need::require_dm_crypt();
    crash_during_detach("detaching", true);
}

/// Mapping closed, links and record still there → links restored, record removed.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_detach_after_close_finishes_detach() {
    need::require_dm_crypt();
    crash_during_detach("closed", false);
}

/// Killed at `attaching`, then killed again while the restart's reconcile re-attaches (mapping
/// open, no links): the second restart finishes it.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_again_during_the_recovery_of_an_attach() {
    need::require_dm_crypt();
    let mut vol = Vol::new("re-attach");
    vol.attach_and_write();
    let (s, v) = vol.detach();
    assert_eq!(s, 200, "{v}");
    let from = vol.restart_paused("attaching");
    let client = send_in_background(
        &vol.agent,
        "POST",
        "/v1/attachments".into(),
        Some(vol.body.clone()),
    );
    vol.kill_at("attaching", from, Some("attaching"));
    client.join().unwrap();
    assert!(!vol.mapping_active());

    let from = vol.start_paused("opened");
    vol.kill_at("opened", from, None);
    assert_eq!(vol.record_phase().as_deref(), Some("attaching"));
    assert!(vol.mapping_active());

    let r = vol.restart_after_crash();
    assert_eq!(r["repaired"], json!([vol.id]), "{r}");
    vol.assert_attached();
    vol.assert_data();
    let (s, v) = vol.detach();
    assert_eq!(s, 200, "{v}");
    vol.assert_detached();
}

/// Killed at `detaching`, then killed again while the restart's reconcile finishes the detach
/// (mapping closed, links and record left): the second restart finishes it.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_again_during_the_recovery_of_a_detach() {
    need::require_dm_crypt();
    let mut vol = Vol::new("re-detach");
    vol.attach_and_write();
    let from = vol.restart_paused("detaching");
    let client = send_in_background(
        &vol.agent,
        "DELETE",
        format!("/v1/attachments/{}", vol.id),
        None,
    );
    vol.kill_at("detaching", from, Some("detaching"));
    client.join().unwrap();
    assert!(vol.mapping_active());

    let from = vol.start_paused("closed");
    vol.kill_at("closed", from, None);
    assert_eq!(vol.record_phase().as_deref(), Some("detaching"));
    assert!(!vol.mapping_active());

    let r = vol.restart_after_crash();
    assert_eq!(r["detached"], json!([vol.id]), "{r}");
    vol.assert_detached();
    let (s, v) = vol.attach();
    assert_eq!(s, 201, "{v}");
    vol.assert_data();
    let (s, v) = vol.detach();
    assert_eq!(s, 200, "{v}");
    vol.assert_detached();
}

/// Killed after the first attach formatted and opened the blank device: the restart finishes
/// the attach and the record still says volcrypt formatted it.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_first_attach_after_format_keeps_the_formatted_flag() {
    need::require_dm_crypt();
    let mut vol = Vol::new("first");
    let from = vol.restart_paused("opened");
    let client = send_in_background(
        &vol.agent,
        "POST",
        "/v1/attachments".into(),
        Some(vol.body.clone()),
    );
    vol.kill_at("opened", from, Some("attaching"));
    client.join().unwrap();
    let r = vol.restart_after_crash();
    assert_eq!(r["repaired"], json!([vol.id]), "{r}");
    vol.assert_attached();
    let (s, v) = vol.get();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["formatted_by_volcrypt"], true, "{v}");
    vol.write_data();
    let (s, v) = vol.detach();
    assert_eq!(s, 200, "{v}");
    vol.assert_detached();
    let (s, v) = vol.attach();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["formatted"], false, "{v}");
    vol.assert_data();
    let (s, v) = vol.detach();
    assert_eq!(s, 200, "{v}");
}

/// Killed inside the first attach's format, between libcryptsetup's header write and its keyslot
/// write: the device holds a LUKS header with no keyslot, whose volume key is gone. The header
/// carries the UUID the journal recorded before formatting, so the restart recognises it as
/// volcrypt's own half-done work and formats again (nothing readable can be lost). The same
/// header with another UUID is not volcrypt's: it is refused and left exactly as it is.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_inside_the_first_format_formats_the_half_written_header_again() {
    need::require_dm_crypt();
    for ours in [true, false] {
        let mut vol = Vol::new(if ours { "halfformat" } else { "halfother" });
        let from = vol.restart_paused("formatted");
        let client = send_in_background(
            &vol.agent,
            "POST",
            "/v1/attachments".into(),
            Some(vol.body.clone()),
        );
        vol.kill_at("formatted", from, Some("attaching"));
        client.join().unwrap();
        let dev = vol.loop_dev.display().to_string();
        let record: Value =
            serde_json::from_slice(&std::fs::read(vol.record_path()).unwrap()).unwrap();
        let journaled = record["format_uuid"].as_str().unwrap().to_owned();
        assert_eq!(sh(&format!("cryptsetup luksUUID {dev}")), journaled);
        let dump = sh(&format!("cryptsetup luksDump {dev}"));
        assert!(!dump.contains(": luks2"), "a keyslot was written: {dump}");

        if ours {
            let r = vol.restart_after_crash();
            assert_eq!(r["reactivated"], json!([vol.id]), "{r}");
            vol.assert_attached();
            let (s, v) = vol.get();
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["formatted_by_volcrypt"], true, "{v}");
            vol.write_data();
            let (s, v) = vol.detach();
            assert_eq!(s, 200, "{v}");
            let (s, v) = vol.attach();
            assert_eq!(s, 201, "{v}");
            assert_eq!(v["formatted"], false, "{v}");
            vol.assert_data();
            let (s, v) = vol.detach();
            assert_eq!(s, 200, "{v}");
        } else {
            let other = "0b0e0e0e-1111-4222-8333-444455556666";
            sh(&format!("cryptsetup luksUUID -q --uuid {other} {dev}"));
            let before = sh(&format!("head -c 1048576 {dev} | sha256sum"));
            vol.agent.child = spawn(&vol.agent, None);
            vol.agent.wait_ready();
            let health = vol.agent.health_after_reconcile();
            let failed = &health["reconcile"]["failed"];
            assert_eq!(failed[0]["volume_id"], json!(vol.id), "{health}");
            assert_eq!(vol.record_phase().as_deref(), Some("attaching"));
            assert!(!vol.mapping_active());
            assert_eq!(sh(&format!("cryptsetup luksUUID {dev}")), other);
            assert_eq!(
                sh(&format!("head -c 1048576 {dev} | sha256sum")),
                before,
                "a header that is not volcrypt's was written to"
            );
        }
    }
}

/// The secret `rekey` tests move volumes to: symmetric, so its passphrase is the lowercase hex
/// of these bytes (the old key is a passphrase secret: the derivation changes too).
const NEW_KEY: [u8; 32] = [0x5a; 32];

impl Vol {
    /// Put the rekey target `new` into the agent's keystore.
    fn add_new_key(&self) {
        Keystore::open(self.agent.dir.path().join("keys"))
            .unwrap()
            .put(
                "new",
                &Secret::new(SecretType::Symmetric, SecretBytes::new(NEW_KEY.to_vec())),
            )
            .unwrap();
    }

    /// The LUKS passphrase of keystore key `id` (`pass` or `new`).
    fn passphrase_of(&self, id: &str) -> Vec<u8> {
        match id {
            "new" => common::hex(&NEW_KEY).into_bytes(),
            "pass" => format!("crash at {}", &self.id["jvol-".len()..]).into_bytes(),
            other => panic!("unknown key {other}"),
        }
    }

    /// Whether the passphrase of key `id` opens a keyslot (`cryptsetup open --test-passphrase`).
    fn opens(&self, id: &str) -> bool {
        let mut child = Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file=-"])
            .arg(&self.loop_dev)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&self.passphrase_of(id))
            .unwrap();
        child.wait().unwrap().success()
    }

    fn record_key(&self) -> String {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(self.record_path()).unwrap()).unwrap();
        assert_eq!(
            v["key_id"], v["request"]["encryption"]["encryption_key_id"],
            "the re-attach request names another key than the record: {v}"
        );
        v["key_id"].as_str().unwrap().to_owned()
    }

    fn rekey(&self, new_key_id: &str) -> (u16, Value) {
        let path = format!("/v1/attachments/{}/rekey", self.id);
        let body = format!(r#"{{"new_key_id": "{new_key_id}"}}"#);
        self.agent.checked(
            "POST",
            "/v1/attachments/{volume_id}/rekey",
            &path,
            Some(body.as_bytes()),
        )
    }

    /// The device number of the active mapping (it must not change: rekey is online).
    fn mapping_devno(&self) -> String {
        sh(&format!(
            "dmsetup info -c --noheadings -o major,minor {}",
            self.mapping
        ))
    }
}

/// Rekey through the agent, killed (-9) after each of its steps — new keyslot added, new key
/// journaled, old keyslot removed: the mapping stays open with the data intact, the key the
/// record names opens the header, the restart's reconcile is clean, and the same request then
/// finishes the rekey (only the new key opens the volume). The volume then detaches and attaches
/// again with the new key, and an attach naming the old key is refused.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kill9_rekey_at_every_step_leaves_a_volume_the_journaled_key_opens() {
    need::require_dm_crypt();
    for (point, journaled) in [
        ("rekey-added", "pass"),
        ("rekey-journaled", "new"),
        ("rekey-removed", "new"),
    ] {
        let mut v = Vol::new(point);
        v.add_new_key();
        v.attach_and_write();
        let devno = v.mapping_devno();
        let from = v.restart_paused(point);
        let path = format!("/v1/attachments/{}/rekey", v.id);
        let sent = send_in_background(
            &v.agent,
            "POST",
            path,
            Some(r#"{"new_key_id": "new"}"#.into()),
        );
        v.kill_at(point, from, Some("attached"));
        sent.join().unwrap();

        assert_eq!(
            v.mapping_devno(),
            devno,
            "{point}: the mapping was reopened"
        );
        v.assert_data();
        assert_eq!(v.record_key(), journaled, "{point}");
        assert!(
            v.opens(journaled),
            "{point}: the journaled key {journaled} opens nothing"
        );
        assert!(v.opens("new"), "{point}: the new keyslot is missing");
        assert_eq!(
            v.opens("pass"),
            point != "rekey-removed",
            "{point}: old keyslot"
        );

        v.restart_after_crash();
        v.assert_attached();
        let (s, out) = v.rekey("new");
        assert_eq!(s, 200, "{point}: {out}");
        assert_eq!(out["key_id"], "new", "{out}");
        assert_eq!(out["previous_key_id"], "pass", "{out}");
        assert_eq!(out["resumed"], journaled == "new", "{point}: {out}");
        assert!(
            v.opens("new") && !v.opens("pass"),
            "{point}: after finishing"
        );
        assert_eq!(v.record_key(), "new");
        assert_eq!(
            v.mapping_devno(),
            devno,
            "{point}: the mapping was reopened"
        );
        v.assert_data();

        let (s, out) = v.rekey("new");
        assert_error(s, &out, 409, "refused", None);
        let (s, out) = v.detach();
        assert_eq!(s, 200, "{out}");
        // The orchestrator's stale request (old key) is refused; the updated one attaches.
        let (s, out) = v.attach();
        assert_error(
            s,
            &out,
            422,
            "wrong_key",
            Some("encryption.encryption_key_id"),
        );
        let body = v.body.replace(
            r#""encryption_key_id": "pass""#,
            r#""encryption_key_id": "new""#,
        );
        let (s, out) = v.agent.checked(
            "POST",
            "/v1/attachments",
            "/v1/attachments",
            Some(body.as_bytes()),
        );
        assert_eq!(s, 201, "{point}: {out}");
        assert_eq!(out["formatted"], false, "{out}");
        v.assert_data();
    }
}

/// LUKS1 rekey by the CLI while the agent runs (the volume lock is shared across processes):
/// online, the old keyslot replaced; a key the key manager does not have changes nothing; a
/// plain volume is refused with the reason, nothing changed.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn rekey_luks1_by_the_cli_and_refusals() {
    need::require_dm_crypt();
    let v = Vol::with_provider("rk-luks1", "luks");
    v.add_new_key();
    v.attach_and_write();
    let devno = v.mapping_devno();
    let config = v.agent.dir.path().join("volcrypt.toml");
    let cli = |new: &str| {
        Command::new(env!("CARGO_BIN_EXE_volcrypt"))
            .args(["rekey", &v.id, "--new-key-id", new, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let dump = || sh(&format!("cryptsetup luksDump {}", v.loop_dev.display()));
    let before = dump();
    let out = cli("missing-key");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing-key"), "{err}");
    assert_eq!(dump(), before, "a failed rekey changed the header");
    assert_eq!(v.record_key(), "pass");

    let out = cli("new");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["keyslot"].as_u64(), r["removed_keyslot"].as_u64()),
        (Some(1), Some(0)),
        "{r}"
    );
    assert!(v.opens("new") && !v.opens("pass"));
    let version = dump()
        .lines()
        .find(|l| l.starts_with("Version:"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned());
    assert_eq!(version.as_deref(), Some("1"), "not LUKS1");
    assert_eq!(v.mapping_devno(), devno);
    v.assert_data();
    let (s, got) = v.get();
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["key_id"], "new", "{got}");

    let p = Vol::with_provider("rk-plain", "plain");
    let (s, out) = p.attach();
    assert_eq!(s, 201, "{out}");
    p.add_new_key();
    let (s, out) = p.rekey("new");
    assert_error(s, &out, 409, "refused", None);
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("plain dm-crypt"),
        "{out}"
    );
    assert_eq!(p.record_key(), "pass");
}
