//! The journal of desired attachments: one JSON record per volume in the state directory,
//! written atomically (temporary file, fsync, rename, fsync of the directory). A record holds
//! names, devices and the key *source* (manager kind, key id, derivation), never key material.
//!
//! [`Journal`] owns every write. Each record carries a [`Phase`], and each change of phase is
//! one method of [`Journal`] that checks the change is allowed ([`Phase::may_become`]) and
//! writes the record *before* the step it names returns to its caller, so that after a crash
//! the reconcile (`volume::reconcile`) finds a record that says what was being done: `attaching`
//! before the mapping is created, `detaching` before it is closed. Nothing else in the crate
//! writes a record. A record that does not parse is never dropped: [`Journal::scan`] moves it
//! aside to `<file>.corrupt-<secs>` and names it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Error;
use super::PerfFlags;
use super::dm::DevNo;
use super::system::System;
use crate::request::{AttachRequest, VolumeFormat};
use crate::secret::Derivation;

/// Largest record accepted when reading (they are a few hundred bytes).
const MAX_RECORD_BYTES: u64 = 64 * 1024;

/// Where an attachment stood when its record was last written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Written before the mapping is created: the mapping and links may or may not exist.
    Attaching,
    /// Mapping open, links set (records written before the journal had phases are this).
    #[default]
    Attached,
    /// Written before the mapping is closed: it may or may not still be open.
    Detaching,
    /// Desired, but its backing device is gone (udev remove): the unused mapping was torn
    /// down; the agent attaches it again when the device reappears (udev add/change, or the
    /// start-up enumeration).
    Waiting,
    /// Its backing device is gone while the mapping was in use: the mapping was left alone
    /// (stale) and this is reported; the agent retries when the device reappears.
    Lost,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Attaching => "attaching",
            Phase::Attached => "attached",
            Phase::Detaching => "detaching",
            Phase::Waiting => "waiting",
            Phase::Lost => "lost",
        })
    }
}

impl Phase {
    /// Whether a record in this phase may be written in phase `next`. Any phase may start an
    /// attach again (a retry, a re-activation, a device that came back) and any may start a
    /// detach; a half-done detach is never declared attached or waiting (only
    /// [`Journal::restore`] puts back a record a failed detach found); `lost` (a mapping in use
    /// whose device went away) needs a mapping, which a half-done attach may not have.
    pub fn may_become(self, next: Phase) -> bool {
        use Phase::*;
        match (self, next) {
            (_, Attaching | Detaching) => true,
            (Detaching, _) => false,
            (_, Attached | Waiting) => true,
            (Attached | Waiting | Lost, Lost) => true,
            (Attaching, Lost) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub volume_id: String,
    pub mapping_name: String,
    /// The path the request named (usually a udev link).
    pub device_path: PathBuf,
    /// The ciphertext block device it resolved to at attach time.
    pub backing_device: PathBuf,
    pub backing_devno: DevNo,
    pub format: VolumeFormat,
    pub cipher: Option<String>,
    pub key_size: Option<u32>,
    pub key_manager: String,
    pub key_id: String,
    pub derivation: String,
    pub flags: PerfFlags,
    /// volcrypt formatted this device on first attach.
    pub formatted: bool,
    pub stable_link: Option<PathBuf>,
    /// Where `device_path` pointed before volcrypt replaced it (restored on detach).
    pub device_link_previous: Option<PathBuf>,
    /// Seconds since the epoch.
    pub attached_at: u64,
    #[serde(default)]
    pub phase: Phase,
    /// The UUID a format on this attach gives the device (journaled before formatting), so a
    /// LUKS header left half-written by a crash is recognised as volcrypt's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_uuid: Option<String>,
    /// The request that made this attachment (no secrets in it: key ids only), so the agent
    /// can attach it again after a crash or reboot. Absent in records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<AttachRequest>,
    /// A rekey that switched `key_id` but has not yet removed the old key's keyslot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rekey: Option<PendingRekey>,
    /// The agent's last completed verify of this volume, as `GET /v1/attachments/{id}` shows
    /// it under `last_verify`, kept here so an agent restart does not forget it. Opaque to the
    /// engine (the agent's job view); absent until a verify completes, and in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<serde_json::Value>,
}

/// What a rekey still has to do once the record names the new key: remove `old_keyslot`,
/// which `old_key_id` opened, keeping `new_keyslot`, which the new key opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRekey {
    pub old_key_id: String,
    pub old_keyslot: u32,
    pub new_keyslot: u32,
}

impl Record {
    pub fn derivation_of(d: Derivation) -> String {
        d.to_string()
    }
}

/// The journal in one state directory. Every record write goes through one of its methods,
/// one per phase change; reads are free.
#[derive(Clone)]
pub struct Journal {
    dir: PathBuf,
    /// Told of every write before it happens (a crash point of the simulated system).
    steps: Option<Arc<dyn System>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

impl Journal {
    pub fn new(dir: impl Into<PathBuf>) -> Journal {
        Journal {
            dir: dir.into(),
            steps: None,
        }
    }

    /// The journal whose writes are steps of `sys` (see [`System::step`]).
    pub(super) fn with_steps(mut self, sys: Arc<dyn System>) -> Journal {
        self.steps = Some(sys);
        self
    }

    fn step(&self, what: &'static str) {
        if let Some(s) = &self.steps {
            s.step(what);
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The record of `volume_id`, if any.
    pub fn get(&self, volume_id: &str) -> Result<Option<Record>, Error> {
        load(&self.dir, volume_id)
    }

    /// Every record, sorted by volume id. A corrupt record is an error here (see [`Self::scan`]).
    pub fn list(&self) -> Result<Vec<Record>, Error> {
        list(&self.dir)
    }

    /// Every readable record; corrupt ones are moved aside and reported.
    pub fn scan(&self) -> Result<Scan, Error> {
        scan(&self.dir)
    }

    /// An attach is about to create the mapping (or format the device): from here on a crash
    /// leaves a record the reconcile finishes.
    pub fn begin_attach(&self, record: &mut Record) -> Result<(), Error> {
        record.phase = Phase::Attaching;
        self.write(record)
    }

    /// The first attach formatted the blank device: recorded at once, so a crash before the
    /// record says `attached` does not forget who formatted it.
    pub fn formatted(&self, record: &mut Record) -> Result<(), Error> {
        record.formatted = true;
        self.transition(record, Phase::Attaching)
    }

    /// Mapping and links are in place (also: a reconcile found them in place and repaired the
    /// record, or an attach found the volume already attached).
    pub fn attached(&self, record: &mut Record) -> Result<(), Error> {
        self.transition(record, Phase::Attached)
    }

    /// A detach is about to close the mapping. `record` stays as it was, for
    /// [`Self::restore`] if the mapping stays busy.
    pub fn begin_detach(&self, record: &Record) -> Result<(), Error> {
        let mut d = record.clone();
        if d.phase != Phase::Detaching {
            self.transition(&mut d, Phase::Detaching)?;
        }
        Ok(())
    }

    /// The detach is complete: the record goes.
    pub fn detached(&self, volume_id: &str) -> Result<(), Error> {
        self.step("journal: remove record");
        remove(&self.dir, volume_id)
    }

    /// A rekey changed which key the record names, or finished (phase unchanged).
    pub fn rekeyed(&self, record: &Record) -> Result<(), Error> {
        self.write(record)
    }

    /// A verify of the volume completed (phase unchanged; see [`Record::last_verify`]).
    pub fn verified(&self, record: &Record) -> Result<(), Error> {
        self.write(record)
    }

    /// An attached volume's flags changed (tune): same phase, new flags (and stored request).
    pub fn tuned(&self, record: &Record) -> Result<(), Error> {
        if record.phase != Phase::Attached {
            return Err(Error::State {
                path: record_path(&self.dir, &record.volume_id),
                detail: format!("a {} record cannot be tuned", record.phase),
            });
        }
        self.write(record)
    }

    /// The backing device went away and the unused mapping was torn down: still desired.
    pub fn waiting(&self, record: &mut Record) -> Result<(), Error> {
        self.transition(record, Phase::Waiting)
    }

    /// The backing device went away while the mapping was in use: left alone, reported.
    pub fn lost(&self, record: &mut Record) -> Result<(), Error> {
        self.transition(record, Phase::Lost)
    }

    /// Roll a failed operation back: put back the record that was there before it (a desired
    /// attachment is never lost to a failed retry), or remove the one it wrote.
    pub fn restore(&self, volume_id: &str, prior: Option<&Record>) -> Result<(), Error> {
        self.step("journal: restore record");
        match prior {
            Some(p) => save(&self.dir, p),
            None => remove(&self.dir, volume_id),
        }
    }

    fn transition(&self, record: &mut Record, next: Phase) -> Result<(), Error> {
        if !record.phase.may_become(next) {
            return Err(Error::State {
                path: record_path(&self.dir, &record.volume_id),
                detail: format!("a {} record cannot become {next}", record.phase),
            });
        }
        record.phase = next;
        self.write(record)
    }

    fn write(&self, record: &Record) -> Result<(), Error> {
        self.step("journal: write record");
        save(&self.dir, record)?;
        trace_phase(&record.mapping_name, record.phase);
        tracing::debug!(mapping = %record.mapping_name, phase = %record.phase, "journal record written");
        Ok(())
    }
}

/// An exclusive lock on one volume, across processes: every operation that changes a volume
/// (attach, detach, extend, the reconcile of its record, the teardown when its device goes)
/// holds it from its first look at the journal to its last write, so two of them — the agent
/// and a CLI command, or two CLI commands — never interleave their steps (two first attaches
/// could otherwise both find the device blank and both format it). An open-file-description
/// lock (`F_OFD_SETLKW`) on one byte of `<state_dir>/.lock` chosen by the volume id's hash:
/// one file for all volumes (a failed request leaves nothing behind), different volumes do not
/// wait for each other, threads of one process exclude each other like processes do, and the
/// kernel releases it when the lock is dropped or its process dies.
pub struct VolumeLock {
    _file: std::fs::File,
}

impl Journal {
    /// The lock of a volume that must have a record, with that record as it is under the lock.
    /// An unknown volume is [`Error::NotManaged`] and creates nothing, not even the lock file.
    pub fn lock_record(&self, volume_id: &str) -> Result<(VolumeLock, Record), Error> {
        let not_managed = || Error::NotManaged {
            volume_id: volume_id.to_owned(),
            state_dir: self.dir.clone(),
        };
        self.get(volume_id)?.ok_or_else(not_managed)?;
        let lock = self.lock(volume_id)?;
        let record = self.get(volume_id)?.ok_or_else(not_managed)?;
        trace_phase(&record.mapping_name, record.phase);
        Ok((lock, record))
    }

    /// Wait for and take the lock of `volume_id`.
    pub fn lock(&self, volume_id: &str) -> Result<VolumeLock, Error> {
        use nix::fcntl::{FcntlArg, fcntl};
        use std::os::unix::fs::OpenOptionsExt;
        create_dir(&self.dir)?;
        let path = self.dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io("open the volume lock file", &path, e))?;
        let range = nix::libc::flock {
            l_type: nix::libc::F_WRLCK as i16,
            l_whence: nix::libc::SEEK_SET as i16,
            l_start: lock_offset(volume_id),
            l_len: 1,
            l_pid: 0,
        };
        loop {
            match fcntl(&file, FcntlArg::F_OFD_SETLKW(&range)) {
                Ok(_) => return Ok(VolumeLock { _file: file }),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::io("lock volume", &path, e.into())),
            }
        }
    }
}

/// The byte of the lock file that stands for `volume_id`: 62 bits of its SHA-256 (a collision
/// only makes two volumes wait for each other).
fn lock_offset(volume_id: &str) -> i64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(volume_id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_le_bytes(b) >> 2) as i64
}

/// Note a mapping and its phase on the current span (the request's span under `volcrypt
/// serve`), so every later log line of the request carries them; a no-op outside a span.
pub fn trace_phase(mapping: &str, phase: impl std::fmt::Display) {
    tracing::Span::current()
        .record("mapping", mapping)
        .record("phase", tracing::field::display(phase));
}

fn record_path(dir: &Path, volume_id: &str) -> PathBuf {
    dir.join(format!("{volume_id}.json"))
}

/// Read the record for `volume_id`, if any.
fn load(dir: &Path, volume_id: &str) -> Result<Option<Record>, Error> {
    load_path(&record_path(dir, volume_id))
}

fn load_path(path: &Path) -> Result<Option<Record>, Error> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read state record", path, e)),
    };
    let mut buf = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("read state record", path, e))?;
    if buf.len() as u64 > MAX_RECORD_BYTES {
        return Err(Error::State {
            path: path.to_owned(),
            detail: format!("larger than {MAX_RECORD_BYTES} bytes"),
        });
    }
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|e| Error::State {
            path: path.to_owned(),
            detail: format!("corrupt: {e}"),
        })
}

/// Every record in `dir`, sorted by volume id. Corrupt records are reported, not skipped.
fn list(dir: &Path) -> Result<Vec<Record>, Error> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list state directory", dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list state directory", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        if let Some(r) = load_path(&entry.path())? {
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    Ok(out)
}

/// A record file that could not be read as a record, and where it was moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Corrupt {
    pub file: PathBuf,
    pub reason: String,
    /// `None`: it could not be moved (it stays where it is, and is reported again next time).
    pub moved_to: Option<PathBuf>,
}

/// What [`scan`] found in the state directory.
#[derive(Debug, Default)]
pub struct Scan {
    pub records: Vec<Record>,
    pub corrupt: Vec<Corrupt>,
}

/// Every record in `dir`, sorted by volume id. A corrupt, truncated or oversized record is moved
/// aside to `<file>.corrupt-<secs since epoch>` (never deleted) and listed in `corrupt`, so the
/// others can still be reconciled and the agent can start. Leftover temporary files of a write
/// that crashed before its rename are removed: they never were a record.
fn scan(dir: &Path) -> Result<Scan, Error> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(e) => return Err(Error::io("list state directory", dir, e)),
    };
    let mut out = Scan::default();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list state directory", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        if name.starts_with('.') && name.ends_with(".json.tmp") {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::warn!(file = %path.display(), "removed the temporary file of an interrupted state write")
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot remove temporary state file")
                }
            }
            continue;
        }
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        match load_path(&path) {
            Ok(Some(r)) => out.records.push(r),
            Ok(None) => {}
            Err(Error::State { detail, .. }) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = dir.join(format!("{name}.corrupt-{stamp}"));
                let moved_to = match std::fs::rename(&path, &aside) {
                    Ok(()) => {
                        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
                        Some(aside)
                    }
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "cannot move corrupt state record aside");
                        None
                    }
                };
                out.corrupt.push(Corrupt {
                    file: path,
                    reason: detail,
                    moved_to,
                });
            }
            Err(e) => return Err(e),
        }
    }
    out.records.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    Ok(out)
}

/// Write `record` atomically (mode 0600; the directory is created 0700).
fn create_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create state directory", dir, e))
}

fn save(dir: &Path, record: &Record) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    create_dir(dir)?;
    let path = record_path(dir, &record.volume_id);
    let tmp = dir.join(format!(".{}.json.tmp", record.volume_id));
    let json = serde_json::to_vec_pretty(record).map_err(|e| Error::State {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("write state record", &path, e)
    })
}

/// Remove the record for `volume_id` (absent is fine).
fn remove(dir: &Path, volume_id: &str) -> Result<(), Error> {
    let path = record_path(dir, volume_id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove state record", &path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> Record {
        Record {
            volume_id: id.into(),
            mapping_name: format!("crypt-{id}"),
            device_path: "/dev/disk/by-path/x".into(),
            backing_device: "/dev/loop0".into(),
            backing_devno: DevNo { major: 7, minor: 0 },
            format: VolumeFormat::Luks2,
            cipher: Some("aes-xts-plain64".into()),
            key_size: Some(512),
            key_manager: "keystore".into(),
            key_id: "k".into(),
            derivation: "lowercase-hex".into(),
            flags: PerfFlags::default(),
            formatted: true,
            stable_link: None,
            device_link_previous: None,
            attached_at: 1,
            phase: Phase::Attached,
            format_uuid: None,
            request: None,
            rekey: None,
            last_verify: None,
        }
    }

    #[test]
    fn save_load_list_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        assert_eq!(load(&d, "a").unwrap(), None);
        assert!(list(&d).unwrap().is_empty());
        save(&d, &sample("b")).unwrap();
        save(&d, &sample("a")).unwrap();
        assert_eq!(load(&d, "a").unwrap(), Some(sample("a")));
        let ids: Vec<_> = list(&d).unwrap().into_iter().map(|r| r.volume_id).collect();
        assert_eq!(ids, ["a", "b"]);
        remove(&d, "a").unwrap();
        remove(&d, "a").unwrap();
        assert_eq!(load(&d, "a").unwrap(), None);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("b.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }

    #[test]
    fn phase_and_request_round_trip_and_old_records_read_as_attached() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = sample("p");
        r.phase = Phase::Detaching;
        r.request =
            Some(serde_json::from_str(r#"{"volume_id":"p","device_path":"/dev/loop0"}"#).unwrap());
        save(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path(), "p").unwrap(), Some(r.clone()));
        // A record written before phases existed.
        let mut v = serde_json::to_value(sample("old")).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("phase");
        o.remove("request");
        std::fs::write(dir.path().join("old.json"), v.to_string()).unwrap();
        let old = load(dir.path(), "old").unwrap().unwrap();
        assert_eq!(old.phase, Phase::Attached);
        assert_eq!(old.request, None);
    }

    #[test]
    fn scan_moves_corrupt_and_truncated_records_aside_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        save(d, &sample("good")).unwrap();
        let full = std::fs::read(d.join("good.json")).unwrap();
        std::fs::write(d.join("cut.json"), &full[..full.len() / 2]).unwrap();
        std::fs::write(d.join("junk.json"), b"\x00\x00garbage").unwrap();
        std::fs::write(d.join(".half.json.tmp"), b"{").unwrap();
        let s = scan(d).unwrap();
        assert_eq!(s.records, vec![sample("good")]);
        let mut files: Vec<_> = s
            .corrupt
            .iter()
            .map(|c| c.file.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["cut.json", "junk.json"]);
        for c in &s.corrupt {
            assert!(c.reason.contains("corrupt"), "{c:?}");
            let aside = c.moved_to.as_ref().unwrap();
            assert!(aside.to_string_lossy().contains(".json.corrupt-"), "{c:?}");
            assert!(aside.exists() && !c.file.exists(), "{c:?}");
        }
        // The truncated record's bytes are kept, byte for byte.
        let cut = s
            .corrupt
            .iter()
            .find(|c| c.file.ends_with("cut.json"))
            .unwrap();
        assert_eq!(
            std::fs::read(cut.moved_to.as_ref().unwrap()).unwrap(),
            &full[..full.len() / 2]
        );
        assert!(!d.join(".half.json.tmp").exists());
        // Now the directory lists cleanly, and a second scan finds nothing new.
        assert_eq!(list(d).unwrap(), vec![sample("good")]);
        assert!(scan(d).unwrap().corrupt.is_empty());
    }

    #[test]
    fn phase_transitions_follow_the_table() {
        use Phase::*;
        let all = [Attaching, Attached, Detaching, Waiting, Lost];
        for from in all {
            // Every phase may start an attach again and may start a detach.
            assert!(
                from.may_become(Attaching) && from.may_become(Detaching),
                "{from}"
            );
        }
        // A half-done detach is never declared attached, waiting or lost.
        for to in [Attached, Waiting, Lost] {
            assert!(!Detaching.may_become(to), "detaching -> {to}");
        }
        // `lost` needs a mapping in use, which a half-done attach may not have.
        assert!(!Attaching.may_become(Lost));
        for from in [Attaching, Attached, Waiting, Lost] {
            assert!(
                from.may_become(Attached) && from.may_become(Waiting),
                "{from}"
            );
        }
    }

    #[test]
    fn the_journal_writes_each_transition_and_refuses_illegal_ones() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        let mut r = sample("t");
        r.phase = Phase::Lost;
        j.begin_attach(&mut r).unwrap();
        assert_eq!(j.get("t").unwrap().unwrap().phase, Phase::Attaching);
        j.formatted(&mut r).unwrap();
        let on_disk = j.get("t").unwrap().unwrap();
        assert!(on_disk.formatted && on_disk.phase == Phase::Attaching);
        j.attached(&mut r).unwrap();
        assert_eq!(j.get("t").unwrap().unwrap().phase, Phase::Attached);
        // A detach writes `detaching` first and leaves the caller's record as it was.
        let before = r.clone();
        j.begin_detach(&r).unwrap();
        assert_eq!(r.phase, Phase::Attached);
        assert_eq!(j.get("t").unwrap().unwrap().phase, Phase::Detaching);
        // A busy detach puts the record back as it was.
        j.restore("t", Some(&before)).unwrap();
        assert_eq!(j.get("t").unwrap().unwrap(), before);
        let mut d = j.get("t").unwrap().unwrap();
        d.phase = Phase::Detaching;
        let e = j.attached(&mut d).unwrap_err().to_string();
        assert!(e.contains("detaching record cannot become attached"), "{e}");
        assert_eq!(
            j.get("t").unwrap().unwrap().phase,
            Phase::Attached,
            "nothing written"
        );
        j.detached("t").unwrap();
        assert_eq!(j.get("t").unwrap(), None);
        // Rolling back a failed first attach removes the record it wrote.
        let mut n = sample("n");
        j.begin_attach(&mut n).unwrap();
        j.restore("n", None).unwrap();
        assert_eq!(j.get("n").unwrap(), None);
    }

    #[test]
    fn corrupt_records_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.json"), b"{not json").unwrap();
        let e = list(dir.path()).unwrap_err().to_string();
        assert!(e.contains("x.json") && e.contains("corrupt"), "{e}");
    }
}
