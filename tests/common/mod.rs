//! The one test-support module every integration test shares: running the real volcrypt
//! binary, cryptsetup and qemu-img, shell commands, known plaintext and hex, temporary files,
//! and (submodules) the prerequisite rules ([`need`]), the real Barbican ([`barbican`]), the
//! real agent ([`agent`]) and loop devices over sparse files ([`loopdev`]).
//!
//! Prerequisites are required, not optional: a missing tool, kernel feature or server fails the
//! test with what to install or start, so a machine without them can never report a silent
//! pass. Tests that need an environment only one stage provides are `#[ignore]`d with the
//! stage's name instead (see [`need`]).
#![allow(dead_code, unused_imports)] // each test binary uses its own subset

#[cfg(feature = "system")]
pub mod agent;
pub mod barbican;
pub mod loopdev;
pub mod need;

use std::borrow::BorrowMut;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const VOLCRYPT: &str = env!("CARGO_BIN_EXE_volcrypt");

/// Fails the test unless `tool` is on PATH (or in /sbin, /usr/sbin), naming the package.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{tool} is not installed: this cross-implementation test needs it. Install the Debian/Ubuntu \
         package `{package}` (apt-get install {package}; scripts/install-deps.sh does it)"
    );
}

pub fn cryptsetup() -> PathBuf {
    require_tool("cryptsetup", "cryptsetup-bin")
}

pub fn qemu_img() -> PathBuf {
    require_tool("qemu-img", "qemu-utils")
}

/// A scratch directory, removed at the end of the test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("volcrypt-test-")
        .tempdir()
        .expect("create a temporary directory")
}

/// `len` bytes of reproducible pseudo-random plaintext (xorshift64*), different per seed.
/// The seed is printed so a failure can be reproduced.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    if x == 0 {
        x = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A fresh random seed (from the OS), printed for reproduction.
pub fn fresh_seed(what: &str) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("OS RNG");
    let seed = u64::from_le_bytes(b);
    eprintln!("{what}: plaintext seed {seed:#x}");
    seed
}

pub fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Lowercase hex, the OpenStack rule for non-passphrase secrets.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` bytes from the OS RNG (keys and ids that must differ between runs).
pub fn os_random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("OS RNG");
    b
}

/// `len` bytes of a cheap reproducible pattern, different per seed (data written through a
/// mapping and read back).
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs `sh -c cmd`; its trimmed stdout, or a panic with the status and stderr.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run sh -c {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `sh -c cmd` with `input` on stdin; its output, whatever the status.
pub fn sh_in(cmd: &str, input: &[u8]) -> Output {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd);
    run_with_stdin(c, input)
}

/// Prints past the test harness's output capture (progress a reader of a long run wants).
pub fn notice(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Runs a command, returning its output; panics only if it cannot be started.
pub fn run(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command with `stdin` bytes.
pub fn run_with_stdin(mut cmd: impl BorrowMut<Command>, stdin: &[u8]) -> Output {
    let cmd = cmd.borrow_mut();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// Panics with the command, status, stdout and stderr unless it exited 0.
pub fn check(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    let out = run(&mut *cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a `qemu-img` command that writes a LUKS container, like [`check`], but run it again (at
/// most 3 times in all) when it fails with "Unable to get accurate CPU usage": QEMU before
/// 9.2.1 (Debian 12 ships 7.2) fails its PBKDF benchmark that way at random when its first
/// timing round takes no measurable CPU time (fixed upstream by "crypto: fix bogus error
/// benchmarking pbkdf on fast machines"). Any other failure fails at once.
pub fn check_qemu_img_luks(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    for _ in 0..2 {
        let out = run(&mut *cmd);
        if out.status.success() {
            return out;
        }
        if !String::from_utf8_lossy(&out.stderr).contains("Unable to get accurate CPU usage") {
            break;
        }
        eprintln!("qemu-img's PBKDF benchmark failed spuriously (QEMU < 9.2.1): running it again");
    }
    check(cmd)
}

/// The volcrypt binary with the given arguments (progress bars are off: stderr is a pipe).
pub fn volcrypt<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(VOLCRYPT);
    c.args(args);
    c
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cheap KDF options for volcrypt encrypt, so the matrix runs in seconds.
pub fn cheap_kdf(pbkdf: &str) -> Vec<String> {
    match pbkdf {
        "pbkdf2" => vec!["--pbkdf", "pbkdf2", "--pbkdf-iterations", "1000"],
        other => vec![
            "--pbkdf",
            other,
            "--pbkdf-iterations",
            "4",
            "--pbkdf-memory",
            "64",
            "--pbkdf-parallel",
            "1",
        ],
    }
    .into_iter()
    .map(String::from)
    .collect()
}

/// Asserts two byte strings are equal without dumping megabytes on failure.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: plaintext differs: got {} bytes, want {} bytes, first difference at byte {first}",
        got.len(),
        want.len()
    );
}

/// Reads one HTTP/1.1 request head from a test server's connection: the request line and the
/// header lines, trimmed, in order (`None` when the client closed the connection). The tiny
/// local responders of the HTTP client tests share it.
pub fn read_request_head(reader: &mut impl std::io::BufRead) -> Option<(String, Vec<String>)> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some((request_line.trim_end().to_owned(), headers));
        }
        headers.push(line.trim_end().to_owned());
    }
}

/// A keystore config in `dir` with one symmetric secret `img-key` (32 bytes of 0x42), for the
/// `--key-id` image tests; returns the config path.
pub fn keystore_config(dir: &Path) -> PathBuf {
    let keys = dir.join("keys");
    let key = dir.join("key.bin");
    std::fs::write(&key, [0x42u8; 32]).unwrap();
    check(
        volcrypt(["keystore", "--dir"])
            .arg(&keys)
            .args(["add", "img-key", "--type", "symmetric", "--file"])
            .arg(&key),
    );
    std::fs::remove_file(&key).unwrap();
    let cfg = dir.join("volcrypt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[key_manager.keystore]\ndir = \"{}\"\ncreate = false\n",
            keys.display()
        ),
    )
    .unwrap();
    cfg
}
