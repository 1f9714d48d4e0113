//! Symlinks: os-brick's `device_path` replacement and volcrypt's own stable link.
//!
//! `device_path` (e.g. `/dev/disk/by-path/…-lun-1`) is a udev-managed link; os-brick points it
//! at `/dev/mapper/<name>` with `ln -sf`, and udev may later rewrite it back to the ciphertext
//! device (Launchpad 1964379, 1967790). volcrypt does the same replacement (atomically, and
//! only when `device_path` *is* a symlink — a device node is never replaced) for os-brick
//! parity, and also creates `/dev/disk/by-id/volcrypt-<volume_id>`:
//!
//! - no udev rule creates names starting with `volcrypt-`, and udev only removes or rewrites
//!   links recorded in its own database for a device (`/run/udev/links`), which this link
//!   never is, so a `change` or `add` event cannot take it back;
//! - every attach of an already-attached volume re-asserts both links, so even a link removed
//!   by hand (or by a rule written later) is repaired by the next attach.
//!
//! All link changes are atomic: a temporary link next to the target name, then `rename(2)`.

use std::path::{Path, PathBuf};

use super::Error;

/// The stable link for a volume.
pub fn stable_link_path(by_id_dir: &Path, volume_id: &str) -> PathBuf {
    by_id_dir.join(format!("volcrypt-{volume_id}"))
}

/// `/dev/mapper/<name>`.
pub fn mapper_path(name: &str) -> PathBuf {
    PathBuf::from("/dev/mapper").join(name)
}

/// Where `link` points now, if it is a symlink.
pub fn read_link(link: &Path) -> Option<PathBuf> {
    std::fs::read_link(link).ok()
}

/// Make `link` point at `target`, atomically. Returns the previous target (if `link` was a
/// symlink), so detach can restore it.
pub fn set_symlink(link: &Path, target: &Path) -> Result<Option<PathBuf>, Error> {
    let previous = read_link(link);
    if previous.as_deref() == Some(target) {
        return Ok(previous);
    }
    let dir = link.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let file = link
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file}.volcrypt-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| Error::io("create symlink", &tmp, e))?;
    if let Err(e) = std::fs::rename(&tmp, link) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("replace symlink", link, e));
    }
    Ok(previous)
}

/// Whether `link` may be replaced: it is a symlink (or absent). A device node or regular file
/// at `device_path` is left alone.
pub fn is_replaceable(link: &Path) -> bool {
    match std::fs::symlink_metadata(link) {
        Ok(m) => m.file_type().is_symlink(),
        Err(_) => false,
    }
}

/// Remove `link` if it still points at `target` (someone else's link is left alone).
pub fn remove_if_points_to(link: &Path, target: &Path) -> Result<bool, Error> {
    if read_link(link).as_deref() == Some(target) {
        std::fs::remove_file(link).map_err(|e| Error::io("remove symlink", link, e))?;
        return Ok(true);
    }
    Ok(false)
}

/// Put `link` back to `previous` if it still points at `ours`.
pub fn restore_if_points_to(link: &Path, ours: &Path, previous: &Path) -> Result<bool, Error> {
    if read_link(link).as_deref() == Some(ours) {
        set_symlink(link, previous)?;
        return Ok(true);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_restore_and_remove_only_touch_our_links() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("by-path").join("lun-1");
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink("/dev/loop7", &link).unwrap();
        assert!(is_replaceable(&link));
        let prev = set_symlink(&link, Path::new("/dev/mapper/crypt-lun-1")).unwrap();
        assert_eq!(prev.as_deref(), Some(Path::new("/dev/loop7")));
        assert_eq!(
            read_link(&link).unwrap(),
            PathBuf::from("/dev/mapper/crypt-lun-1")
        );
        // No temporary files left behind.
        assert_eq!(
            std::fs::read_dir(link.parent().unwrap()).unwrap().count(),
            1
        );

        assert!(
            !restore_if_points_to(&link, Path::new("/dev/mapper/other"), Path::new("/x")).unwrap()
        );
        assert!(
            restore_if_points_to(
                &link,
                Path::new("/dev/mapper/crypt-lun-1"),
                Path::new("/dev/loop7")
            )
            .unwrap()
        );
        assert_eq!(read_link(&link).unwrap(), PathBuf::from("/dev/loop7"));
        assert!(!remove_if_points_to(&link, Path::new("/dev/mapper/crypt-lun-1")).unwrap());
        assert!(link.exists() || read_link(&link).is_some());

        let stable = stable_link_path(&dir.path().join("by-id"), "vol-1");
        assert!(stable.ends_with("by-id/volcrypt-vol-1"));
        set_symlink(&stable, Path::new("/dev/mapper/crypt-lun-1")).unwrap();
        assert!(remove_if_points_to(&stable, Path::new("/dev/mapper/crypt-lun-1")).unwrap());
        assert!(read_link(&stable).is_none());
    }

    #[test]
    fn regular_files_are_not_replaceable() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node");
        std::fs::write(&f, b"").unwrap();
        assert!(!is_replaceable(&f));
        assert!(!is_replaceable(&dir.path().join("missing")));
    }
}
