//! What a test needs from its environment, and the one rule for when it is missing.
//!
//! A test never returns early reporting `ok`: a green line must mean the behaviour was checked.
//! So there are exactly two outcomes for a prerequisite:
//!
//! - **The stage that provides it runs the test.** Tests that need the kernel's dm-crypt, loop
//!   devices, udevd or scsi_debug are `#[ignore = "needs dm-crypt: runs in the VM stage …"]`
//!   ([`VM_ONLY`]). A native `cargo test` therefore reports them as *ignored*, never as
//!   *passed*; the VM stage (`tests/vm/attach-suite.sh`) runs them with `--include-ignored`
//!   and checks that every test of each binary ran.
//! - **Once a test runs, a missing prerequisite fails it** with what is missing and how to get
//!   it: the `require_*` functions below panic. That holds inside the VM (the harness sets
//!   `VOLCRYPT_VM=1`: a guest without dm_crypt must go red, not green) and on any host that
//!   runs the ignored tests by hand with `--include-ignored`.
//!
//! The checks look at the kernel and the real tools (`/sys/module`, `dmsetup version`), never
//! at volcrypt's own code, so a regression in volcrypt cannot make a test think its
//! environment is missing.

use std::path::Path;
use std::process::{Command, Stdio};

/// The `#[ignore]` reason of every test that needs the VM stage's kernel (kept in one place so
/// the wording stays the same in every binary's output).
pub const VM_ONLY: &str = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)";

/// True inside the QEMU harness (tests/vm/run.sh exports `VOLCRYPT_VM=1`).
pub fn in_vm() -> bool {
    std::env::var("VOLCRYPT_VM").is_ok_and(|v| v == "1")
}

/// True when this process runs as root (from /proc, so it needs no crate feature).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// True when the kernel's device-mapper answers (`dmsetup version` prints the driver's
/// version only when the ioctl interface works).
pub fn dm_available() -> bool {
    Command::new("dmsetup")
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Driver version")
        })
}

fn fail(what: &str) -> ! {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    let place = if in_vm() {
        "inside the VM (VOLCRYPT_VM=1), where the harness must provide it"
    } else {
        "on this host (it runs in the VM stage: tests/vm/attach-suite.sh)"
    };
    panic!("{test}: prerequisite missing {place}: {what}");
}

/// Fails the test unless it runs as root (`why`: what needs it).
pub fn require_root(why: &str) {
    if !is_root() {
        panic!("needs root ({why}); make test and the VM stage run as root");
    }
}

/// Fails the test unless it runs as root with the kernel's dm-crypt and loop devices: the
/// first line of every dm-crypt test.
pub fn require_dm_crypt() {
    if !is_root() {
        fail("root (device-mapper and loop devices need it)");
    }
    if !Path::new("/sys/module/dm_crypt").exists() {
        fail("the dm_crypt kernel module is not loaded (/sys/module/dm_crypt)");
    }
    if !dm_available() {
        fail("device-mapper does not answer (`dmsetup version` shows no driver)");
    }
    if !Path::new("/dev/loop-control").exists() {
        fail("no loop devices (/dev/loop-control; the loop module)");
    }
}

/// Fails the test unless udevd runs (the VM stage starts it with `run.sh --udev`).
pub fn require_udevd() {
    require_dm_crypt();
    if !Path::new("/run/udev/control").exists() {
        fail("no running udevd (/run/udev/control; tests/vm/run.sh --udev)");
    }
}

/// `modprobe` from the guest kernel's module tree (the harness exports its root); true on
/// success.
pub fn modprobe(args: &[&str]) -> bool {
    let mut c = Command::new("modprobe");
    if let Ok(root) = std::env::var("VOLCRYPT_VM_MODULES_ROOT") {
        c.arg("-d").arg(root);
    }
    c.args(args)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Loads scsi_debug (no disks yet) and sd_mod, or fails the test: a SCSI disk can be deleted
/// while dm-crypt holds it, which a loop device cannot.
pub fn require_scsi_debug() {
    require_dm_crypt();
    // sd_mod turns the SCSI disk into /dev/sdX; udev's own modprobe cannot load it in the VM.
    let _ = modprobe(&["sd_mod"]);
    let drv = Path::new("/sys/bus/pseudo/drivers/scsi_debug");
    if !drv.exists() && !modprobe(&["scsi_debug", "add_host=0", "dev_size_mb=32"]) {
        fail("the scsi_debug module cannot be loaded");
    }
}

/// The scsi_debug disks present now (`sdX` names).
pub fn scsi_debug_disks() -> Vec<String> {
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sd"))
                .filter(|n| {
                    std::fs::read_to_string(format!("/sys/block/{n}/device/model"))
                        .is_ok_and(|m| m.contains("scsi_debug"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether device-mapper has a mapping of that name (`dmsetup info`, not volcrypt's code).
pub fn mapping_active(name: &str) -> bool {
    Command::new("dmsetup")
        .args(["info", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
