//! The loop-device fixture of the VM tests that work on one volume at a time: a sparse file in
//! a private directory under /tmp behind a loop device, and the teardown that leaves nothing
//! behind whatever the test did (its mapping removed first, then the loop device detached).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A private directory holding `backing.img` of `bytes` (sparse), attached to a free loop
/// device: the directory, the file and the loop device's path.
pub fn backing(bytes: u64) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let file = dir.path().join("backing.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    let loopdev = PathBuf::from(super::sh(&format!("losetup -f --show {}", file.display())).trim());
    (dir, file, loopdev)
}

/// Remove mapping `name` if a test left it, then detach `loopdev` (for `Drop`: errors ignored,
/// there is nothing left to do about them).
pub fn teardown(name: &str, loopdev: &Path) {
    let _ = Command::new("dmsetup")
        .args(["remove", "--retry", name])
        .output();
    let _ = Command::new("losetup").arg("-d").arg(loopdev).output();
}
