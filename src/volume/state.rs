//! The record of what volcrypt manages: one JSON file per volume in the state directory,
//! written atomically (temporary file, fsync, rename, fsync of the directory). It holds names,
//! devices and the key *source* (manager kind, key id, derivation) — never key material.
//! The agent (issue 4) replaces this with a journal; the record format stays.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Error;
use super::PerfFlags;
use super::dm::DevNo;
use crate::request::VolumeFormat;
use crate::secret::Derivation;

/// Largest record accepted when reading (they are a few hundred bytes).
const MAX_RECORD_BYTES: u64 = 64 * 1024;

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
}

impl Record {
    pub fn derivation_of(d: Derivation) -> String {
        d.to_string()
    }
}

fn record_path(dir: &Path, volume_id: &str) -> PathBuf {
    dir.join(format!("{volume_id}.json"))
}

/// Read the record for `volume_id`, if any.
pub fn load(dir: &Path, volume_id: &str) -> Result<Option<Record>, Error> {
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
pub fn list(dir: &Path) -> Result<Vec<Record>, Error> {
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

/// Write `record` atomically (mode 0600; the directory is created 0700).
pub fn save(dir: &Path, record: &Record) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create state directory", dir, e))?;
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
pub fn remove(dir: &Path, volume_id: &str) -> Result<(), Error> {
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
    fn corrupt_records_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.json"), b"{not json").unwrap();
        let e = list(dir.path()).unwrap_err().to_string();
        assert!(e.contains("x.json") && e.contains("corrupt"), "{e}");
    }
}
