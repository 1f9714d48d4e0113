//! The local keystore: a private directory with one file per secret id.
//!
//! File format (chosen so the payload is stored byte for byte, needs no encoding layer that
//! would copy it around unzeroized, and an operator can still see the type with `head -1`):
//!
//! ```text
//! volcrypt-secret 1 <secret type>\n
//! <payload bytes, raw, to the end of the file>
//! ```
//!
//! Rules, because these files are keys:
//! - the directory must not be accessible by group or others (mode & 0077 == 0), nor any
//!   secret file; otherwise every operation fails with an error naming the path and mode;
//! - the directory is created 0700, files 0600;
//! - writes are atomic: a hidden temporary file in the same directory, fsync, rename over the
//!   target, fsync of the directory — a crash leaves the old secret or the new one, never half;
//! - ids are validated ([`crate::keys::validate_key_id`]): no separators, no `..`, bounded, and
//!   never starting with a dot, so temporary files (`.tmp-…`) can never collide with a secret;
//! - symlinks are refused, files larger than [`MAX_SECRET_FILE`] too.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::keys::{Error, KeyManager, Secret, validate_key_id};
use crate::secret::{SecretBytes, SecretType};

/// First token of every secret file's header line.
const MAGIC: &str = "volcrypt-secret";
/// Format version written and accepted.
const VERSION: &str = "1";
/// Largest secret file read (header + payload). Keys are bytes to a few KiB.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// A keystore directory (opened and checked; see the module docs for its rules).
#[derive(Debug, Clone)]
pub struct Keystore {
    dir: PathBuf,
}

impl Keystore {
    /// Open an existing keystore directory, checking that it is a private directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
        check_dir(&dir)?;
        Ok(Keystore { dir })
    }

    /// Open the keystore, creating the directory with mode 0700 if it does not exist (its
    /// parents are created with the default mode). An existing directory is checked, not
    /// chmod-ed: loose permissions on a key directory are an operator decision to fix, not hide.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref();
        if !dir.exists() {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(dir, e)),
            }
        }
        Keystore::open(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, key_id: &str) -> Result<PathBuf, Error> {
        validate_key_id(key_id)?;
        Ok(self.dir.join(key_id))
    }

    /// Is there a secret with this id?
    pub fn contains(&self, key_id: &str) -> Result<bool, Error> {
        let path = self.path_of(key_id)?;
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Store a secret under `key_id`, atomically replacing any previous one.
    pub fn put(&self, key_id: &str, secret: &Secret) -> Result<(), Error> {
        let path = self.path_of(key_id)?;
        check_dir(&self.dir)?;
        let header = format!("{MAGIC} {VERSION} {}\n", secret.secret_type.as_str());
        if header.len() as u64 + secret.payload.len() as u64 > MAX_SECRET_FILE {
            return Err(Error::Invalid {
                key_id: key_id.into(),
                path: path.display().to_string(),
                reason: format!("payload larger than {} bytes", MAX_SECRET_FILE - 64),
            });
        }
        let tmp = self.dir.join(format!(
            ".tmp-{key_id}-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| Error::io(&tmp, e))?;
            // The process umask may only remove bits; make 0600 explicit anyway.
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io(&tmp, e))?;
            f.write_all(header.as_bytes())
                .and_then(|()| f.write_all(secret.payload.expose()))
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io(&tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
            sync_dir(&self.dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Store a secret only if the id is free (the operator `add` command).
    pub fn add(&self, key_id: &str, secret: &Secret) -> Result<(), Error> {
        if self.contains(key_id)? {
            return Err(Error::AlreadyExists {
                key_id: key_id.into(),
                path: self.dir.clone(),
            });
        }
        self.put(key_id, secret)
    }

    /// Delete a secret (NotFound if there is none).
    pub fn remove(&self, key_id: &str) -> Result<(), Error> {
        let path = self.path_of(key_id)?;
        check_dir(&self.dir)?;
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound {
                key_id: key_id.into(),
                manager: "keystore",
            }),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Every secret id with its type, sorted by id. Reads only header lines; hidden files
    /// (temporaries) are skipped; any other file that is not a valid secret is an error, since
    /// the operator should know.
    pub fn list(&self) -> Result<Vec<(String, SecretType)>, Error> {
        check_dir(&self.dir)?;
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(invalid(
                    "?",
                    &entry.path(),
                    "file name is not UTF-8 (not a keystore entry)",
                ));
            };
            if name.starts_with('.') {
                continue;
            }
            validate_key_id(name)?;
            let (secret_type, _) = self.read_file(name, false)?;
            out.push((name.to_string(), secret_type));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Secret type and payload size, without returning the payload (`show-meta`).
    pub fn meta(&self, key_id: &str) -> Result<(SecretType, u64), Error> {
        let secret = self.get(key_id)?;
        Ok((secret.secret_type, secret.payload.len() as u64))
    }

    /// Read one file: its type, and the payload if `want_payload`.
    fn read_file(
        &self,
        key_id: &str,
        want_payload: bool,
    ) -> Result<(SecretType, Option<SecretBytes>), Error> {
        let path = self.path_of(key_id)?;
        // O_NOFOLLOW refuses a symlink atomically (no check-then-open race with a concurrent
        // rename); O_NONBLOCK keeps a FIFO planted in the directory from blocking us.
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound {
                    key_id: key_id.into(),
                    manager: "keystore",
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(invalid(
                    key_id,
                    &path,
                    "is a symlink (symlinks are refused)",
                ));
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let meta = f.metadata().map_err(|e| Error::io(&path, e))?;
        if !meta.file_type().is_file() {
            return Err(invalid(key_id, &path, "not a regular file"));
        }
        check_private(&path, &meta)?;
        if meta.len() > MAX_SECRET_FILE {
            return Err(invalid(key_id, &path, "larger than 64 KiB"));
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
        f.take(MAX_SECRET_FILE + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(&path, e))?;
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            return Err(invalid(key_id, &path, "no header line"));
        };
        let header = std::str::from_utf8(&buf[..nl])
            .map_err(|_| invalid(key_id, &path, "header line is not UTF-8"))?;
        let mut words = header.split(' ');
        let (Some(MAGIC), Some(version), Some(ty), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(invalid(
                key_id,
                &path,
                "header is not \"volcrypt-secret 1 <type>\"",
            ));
        };
        if version != VERSION {
            return Err(invalid(
                key_id,
                &path,
                &format!("unsupported format version {version:?} (expected 1)"),
            ));
        }
        let secret_type: SecretType = ty.parse().map_err(|e: String| invalid(key_id, &path, &e))?;
        let payload = want_payload.then(|| SecretBytes::new(buf[nl + 1..].to_vec()));
        Ok((secret_type, payload))
    }
}

impl KeyManager for Keystore {
    fn kind(&self) -> &'static str {
        "keystore"
    }

    fn get(&self, key_id: &str) -> Result<Secret, Error> {
        check_dir(&self.dir)?;
        let (secret_type, payload) = self.read_file(key_id, true)?;
        let payload = payload.unwrap_or_else(|| SecretBytes::new(Vec::new()));
        Ok(Secret::new(secret_type, payload))
    }

    fn health(&self) -> Result<(), Error> {
        check_dir(&self.dir)
    }

    fn create(&self, name: Option<&str>, secret: &Secret) -> Result<String, Error> {
        let id = match name {
            Some(n) => n.to_owned(),
            None => new_uuid()?,
        };
        self.put(&id, secret)?;
        Ok(id)
    }
}

/// A random (version 4) UUID, the form Barbican gives its secret ids.
fn new_uuid() -> Result<String, Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| Error::io("/dev/urandom", std::io::Error::other(e.to_string())))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn invalid(key_id: &str, path: &Path, reason: &str) -> Error {
    Error::Invalid {
        key_id: key_id.into(),
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn check_dir(dir: &Path) -> Result<(), Error> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    check_private(dir, &meta)
}

fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), Error> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Uniqueness, not secrecy: fall back to the clock if the RNG is unavailable.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t;
    }
    u64::from_le_bytes(b)
}
