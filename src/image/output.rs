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
use std::sync::{Arc, Mutex};

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
                if let Ok(meta) = std::fs::metadata(path) {
                    if meta.file_type().is_block_device() {
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
/// The signals are blocked in the calling thread (and so in every thread it starts later,
/// such as the cipher workers) and taken by one waiting thread with `sigwait`, so the removal
/// runs as ordinary code, not in a signal handler. Call this before starting any worker
/// threads.
pub fn remove_on_signal(path: &Path) -> SignalGuard {
    let slot = Arc::new(Mutex::new(Some(path.to_path_buf())));
    let set = signal_set();
    // SAFETY: pthread_sigmask with a valid, initialised set and a null old-set pointer.
    let blocked =
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } == 0;
    if blocked {
        let waiting = Arc::clone(&slot);
        let _ = std::thread::Builder::new()
            .name("volcrypt-signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait with a valid set and a valid out-pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                if let Ok(guard) = waiting.lock()
                    && let Some(p) = guard.as_ref()
                {
                    let _ = std::fs::remove_file(p);
                    eprintln!("interrupted: removed the partial output {}", p.display());
                }
                std::process::exit(128 + sig);
            });
    }
    SignalGuard { slot }
}

/// Disarms [`remove_on_signal`] when the output is complete (or already cleaned up).
pub struct SignalGuard {
    slot: Arc<Mutex<Option<PathBuf>>>,
}

impl SignalGuard {
    pub fn disarm(&self) {
        if let Ok(mut g) = self.slot.lock() {
            *g = None;
        }
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset adds valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}
