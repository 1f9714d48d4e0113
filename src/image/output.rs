//! Output files of the image commands, and their removal when a run fails half-way.
//!
//! A failed `decrypt`, `encrypt` or `convert` must not leave a file that looks like a finished
//! result (a container with a truncated payload, a plaintext image cut short). Every command
//! therefore creates its outputs through [`Outputs`], which remembers the files *it created*
//! and removes them unless the run is [kept](Outputs::keep). Files that existed before (block
//! devices, files the user asked to overwrite) are never removed.
//!
//! `convert` also removes its output when interrupted by SIGINT/SIGTERM/SIGHUP
//! ([`remove_on_signal`]): a Drop guard does not run when the process is killed by a signal.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};

use super::{Error, open_err};

/// What to do when the output path already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Truncate and overwrite it (`encrypt`/`decrypt`, which, like `dd`, may write to a
    /// device or over an old result).
    Overwrite,
    /// Refuse an existing regular file; open an existing block device exclusively
    /// (`O_EXCL`: the kernel refuses a device that is mounted, mapped or otherwise held) and
    /// write over it without truncating.
    RefuseFiles,
}

/// Outputs created by one run; removed on drop unless [`Outputs::keep`] was called.
#[derive(Default)]
pub struct Outputs {
    created: Vec<PathBuf>,
    kept: bool,
}

/// An opened output and what it is.
pub struct Opened {
    pub file: File,
    /// A block device (never truncated, never removed, never sparse).
    pub block_device: bool,
}

impl Outputs {
    /// Opens `path` for writing under the `existing` rule, remembering it for removal when
    /// this run created it.
    pub fn create(&mut self, path: &Path, existing: Existing) -> Result<Opened, Error> {
        match existing {
            Existing::Overwrite => {
                let existed = path.exists();
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .map_err(open_err(path))?;
                if !existed {
                    self.created.push(path.to_path_buf());
                }
                let block_device = file
                    .metadata()
                    .map(|m| m.file_type().is_block_device())
                    .unwrap_or(false);
                Ok(Opened { file, block_device })
            }
            Existing::RefuseFiles => {
                if let Ok(meta) = std::fs::metadata(path)
                    && meta.file_type().is_block_device()
                {
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_EXCL)
                        .open(path)
                        .map_err(|e| busy_err(path, e))?;
                    return Ok(Opened {
                        file,
                        block_device: true,
                    });
                }
                // create_new: no window in which another file appearing there is overwritten.
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            Error::OutputExists {
                                path: path.display().to_string(),
                            }
                        } else {
                            open_err(path)(e)
                        }
                    })?;
                self.created.push(path.to_path_buf());
                Ok(Opened {
                    file,
                    block_device: false,
                })
            }
        }
    }

    /// The run succeeded: keep every output.
    pub fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        if !self.kept {
            for p in &self.created {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn busy_err(path: &Path, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::EBUSY) {
        Error::DeviceBusy {
            path: path.display().to_string(),
        }
    } else {
        open_err(path)(e)
    }
}

/// Removes `path` if the process is interrupted (SIGINT, SIGTERM, SIGHUP) before the returned
/// guard is disarmed, then exits with 128 + the signal number, as a shell would report it.
///
/// A signal handler, not a waiting thread: a process-directed signal goes to any thread that
/// does not block it, and threads started before this call (a key manager's runtime, a KDF
/// pool) would not block it. The handler only calls async-signal-safe functions (`unlink`,
/// `write`, `_exit`) on a path prepared beforehand.
pub fn remove_on_signal(path: &Path) -> SignalGuard {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return SignalGuard { armed: false };
    };
    // Leaked on purpose: the handler may read it at any time until the process ends (one
    // path per convert, i.e. per process).
    let old = SIGNAL_PATH.swap(c.into_raw(), Ordering::SeqCst);
    if !old.is_null() {
        // SAFETY: `old` came from CString::into_raw above and is no longer reachable by the
        // handler (swapped out).
        drop(unsafe { std::ffi::CString::from_raw(old) });
    }
    set_handlers(on_signal as *const () as libc::sighandler_t);
    SignalGuard { armed: true }
}

static SIGNAL_PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(sig: libc::c_int) {
    const MSG: &[u8] = b"volcrypt: interrupted: removed the partial output\n";
    let p = SIGNAL_PATH.load(Ordering::SeqCst);
    // SAFETY: unlink, write and _exit are async-signal-safe; `p` is null or a valid C string
    // leaked by remove_on_signal.
    unsafe {
        if !p.is_null() && libc::unlink(p) == 0 {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
        }
        libc::_exit(128 + sig);
    }
}

fn set_handlers(handler: libc::sighandler_t) {
    for sig in SIGNALS {
        // SAFETY: a zeroed sigaction with an empty mask and a handler that is either SIG_DFL
        // or an extern "C" fn(c_int) is a valid argument.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Disarms [`remove_on_signal`] when the output is complete (or already cleaned up): the
/// signals get their default actions back.
pub struct SignalGuard {
    armed: bool,
}

impl SignalGuard {
    pub fn disarm(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if self.armed {
            self.armed = false;
            set_handlers(libc::SIG_DFL);
            SIGNAL_PATH.store(std::ptr::null_mut(), Ordering::SeqCst);
        }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        self.release();
    }
}
