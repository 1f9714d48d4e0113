//! Read-only device-mapper and sysfs queries.
//!
//! dm-crypt tables contain the volume key (or a keyring reference), so this module never asks
//! for a table: the backing device comes from the table's *dependencies* (major:minor only),
//! everything else from the device info and sysfs.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use devicemapper::{DM, DevId, DmName, DmOptions};

use super::Error;

/// A block device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevNo {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for DevNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl DevNo {
    fn from_rdev(rdev: u64) -> DevNo {
        DevNo {
            major: nix::sys::stat::major(rdev) as u32,
            minor: nix::sys::stat::minor(rdev) as u32,
        }
    }

    fn sysfs(&self) -> PathBuf {
        PathBuf::from(format!("/sys/dev/block/{self}"))
    }

    /// Whether the kernel still has this block device.
    pub fn exists(&self) -> bool {
        self.sysfs().exists()
    }

    /// `/dev/<name>` from sysfs (`DEVNAME` in the uevent file).
    pub fn dev_path(&self) -> Option<PathBuf> {
        let uevent = std::fs::read_to_string(self.sysfs().join("uevent")).ok()?;
        uevent
            .lines()
            .find_map(|l| l.strip_prefix("DEVNAME="))
            .map(|n| PathBuf::from("/dev").join(n))
    }

    /// Size in bytes from sysfs (always counted in 512-byte sectors there).
    pub fn size_bytes(&self) -> Option<u64> {
        let s = std::fs::read_to_string(self.sysfs().join("size")).ok()?;
        s.trim().parse::<u64>().ok()?.checked_mul(512)
    }

    /// Kernel names of the devices stacked on this one (`/sys/dev/block/M:m/holders`).
    pub fn holders(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.sysfs().join("holders")) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                // Show dm holders by their mapping name when sysfs has it.
                match std::fs::read_to_string(e.path().join("dm/name")) {
                    Ok(dm) => format!("{n} ({})", dm.trim()),
                    Err(_) => n,
                }
            })
            .collect();
        v.sort();
        v
    }

    /// Processes holding this device open, as `pid (comm)`, found through `/proc/*/fd`.
    /// Best effort: processes we may not inspect are skipped.
    pub fn processes(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return out;
        };
        for p in procs.filter_map(|e| e.ok()) {
            let name = p.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            let holds = fds.filter_map(|e| e.ok()).any(|fd| {
                std::fs::metadata(fd.path())
                    .map(|m| m.file_type().is_block_device() && DevNo::from_rdev(m.rdev()) == *self)
                    .unwrap_or(false)
            });
            if holds {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                out.push(format!("{pid} ({})", comm.trim()));
            }
        }
        out
    }
}

/// The block device number behind `path` (following symlinks), or why there is none.
pub fn devno_of(path: &Path) -> Result<DevNo, Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::NoDevice {
        path: path.to_owned(),
        detail: format!(": {e}"),
    })?;
    if !meta.file_type().is_block_device() {
        return Err(Error::NoDevice {
            path: path.to_owned(),
            detail: " (it exists but is not a block device)".into(),
        });
    }
    Ok(DevNo::from_rdev(meta.rdev()))
}

/// The device-mapper name of a dm block device, if `devno` is one.
pub fn dm_name_of(devno: DevNo) -> Option<String> {
    std::fs::read_to_string(devno.sysfs().join("dm/name"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A handle on the device-mapper control device; failing to get one is the single
/// "device-mapper is not available" error.
pub struct Dm(DM);

/// Device-mapper facts about one mapping (never its table).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MapInfo {
    pub name: String,
    pub devno: DevNo,
    pub uuid: Option<String>,
    pub open_count: i32,
    pub read_only: bool,
    pub suspended: bool,
    /// Devices the active table maps (for dm-crypt: the backing device).
    pub deps: Vec<DevNo>,
}

impl Dm {
    pub fn open() -> Result<Dm, Error> {
        DM::new().map(Dm).map_err(|e| Error::DmUnavailable {
            detail: e.to_string(),
        })
    }

    /// Facts about mapping `name`, or `None` when no such mapping exists.
    pub fn info(&self, name: &str) -> Result<Option<MapInfo>, Error> {
        let dm_name = DmName::new(name).map_err(|e| Error::Dm {
            op: "name",
            target: name.to_owned(),
            detail: e.to_string(),
        })?;
        let id = DevId::Name(dm_name);
        let info = match self.0.device_info(&id) {
            Ok(i) => i,
            Err(e) => {
                // ENXIO: no such device.
                if self.list_names()?.iter().any(|n| n == name) {
                    return Err(Error::Dm {
                        op: "info",
                        target: name.to_owned(),
                        detail: e.to_string(),
                    });
                }
                return Ok(None);
            }
        };
        let deps = self
            .0
            .table_deps(&id, DmOptions::default())
            .map_err(|e| Error::Dm {
                op: "deps",
                target: name.to_owned(),
                detail: e.to_string(),
            })?
            .into_iter()
            .map(|d| DevNo {
                major: d.major,
                minor: d.minor,
            })
            .collect();
        let flags = info.flags();
        let dev = info.device();
        Ok(Some(MapInfo {
            name: name.to_owned(),
            devno: DevNo {
                major: dev.major,
                minor: dev.minor,
            },
            uuid: info.uuid().map(|u| u.to_string()),
            open_count: info.open_count(),
            read_only: flags.contains(devicemapper::DmFlags::DM_READONLY),
            suspended: flags.contains(devicemapper::DmFlags::DM_SUSPEND),
            deps,
        }))
    }

    /// Remove mapping `name` directly through device-mapper. Used for stale mappings, whose
    /// missing backing device can stop libcryptsetup from loading them. `Ok(false)`: busy.
    pub fn remove(&self, name: &str) -> Result<bool, Error> {
        let dm_name = DmName::new(name).map_err(|e| Error::Dm {
            op: "name",
            target: name.to_owned(),
            detail: e.to_string(),
        })?;
        match self
            .0
            .device_remove(&DevId::Name(dm_name), DmOptions::default())
        {
            Ok(_) => Ok(true),
            Err(e) => {
                if self.info(name)?.is_some_and(|i| i.open_count > 0) {
                    return Ok(false);
                }
                Err(Error::Dm {
                    op: "remove",
                    target: name.to_owned(),
                    detail: e.to_string(),
                })
            }
        }
    }

    /// Names of every active mapping.
    pub fn list_names(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .0
            .list_devices()
            .map_err(|e| Error::Dm {
                op: "list",
                target: "all mappings".into(),
                detail: e.to_string(),
            })?
            .into_iter()
            .map(|(n, _, _)| n.to_string())
            .collect())
    }
}

/// Whether dm-crypt is usable here, and what was found: device-mapper's control device answers
/// and the `crypt` target is registered (or its module is present, to be loaded on first use).
pub fn crypt_target_status() -> (bool, String) {
    match devicemapper::DM::new() {
        Err(e) => (
            false,
            format!("device-mapper is not available on this host: {e}"),
        ),
        Ok(dm) => {
            let targets = dm.list_versions().unwrap_or_default();
            if let Some((_, a, b, c)) = targets.iter().find(|t| t.0 == "crypt") {
                (true, format!("dm-crypt target v{a}.{b}.{c}"))
            } else if std::path::Path::new("/sys/module/dm_crypt").exists() {
                (true, "dm_crypt module present".into())
            } else {
                (
                    true,
                    "device-mapper available; crypt target not loaded yet (dm_crypt is loaded on first use)".into(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devno_of_rejects_regular_files_and_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        let e = devno_of(&f).unwrap_err().to_string();
        assert!(e.contains("not a block device"), "{e}");
        let e = devno_of(&dir.path().join("none")).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn devno_display_is_major_colon_minor() {
        assert_eq!(DevNo { major: 7, minor: 3 }.to_string(), "7:3");
        assert!(
            !DevNo {
                major: 4095,
                minor: 1_000_000
            }
            .exists()
        );
    }
}
