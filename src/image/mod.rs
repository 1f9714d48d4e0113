//! Whole-container operations on image files: inspect, check a key, decrypt, encrypt, verify.
//!
//! This layer owns files, sizes and streaming; the on-disk format is `crate::luks`' job and
//! the ciphers are `crate::crypto`'s. Everything here works on plain files (or block devices
//! opened as files) without root or device-mapper, which is what lets operators prepare
//! encrypted images for a cloud image service and lets the tests compare against cryptsetup
//! and qemu-img.
//!
//! Payload sizes: a LUKS payload is a whole number of sectors, and neither cryptsetup nor
//! qemu-img can represent a trailing partial sector. `encrypt` therefore refuses an input whose
//! size is not a multiple of the sector size (naming the size and the nearest valid sizes)
//! rather than silently padding it, because a padded image would not decrypt to the same bytes.

pub mod bench;
pub mod convert;
pub mod glance;
pub mod output;
pub mod params;
pub mod qcow2;
pub mod qcow2_luks;
pub mod qcow2_write;
pub mod stream;
pub mod verify;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::crypto::cipher::SectorCipher;
use crate::crypto::kdf::KdfLimits;
use crate::kind::Kind;
use crate::luks::{self, Header};
use crate::secret::SecretBytes;

use output::{Existing, Outputs};
pub use params::EncryptOptions;
pub use stream::{StreamError, StreamOptions};

/// cryptsetup's default maximum key file size (8 MiB): a bigger "key" is almost certainly
/// the wrong file, and reading it whole would be an input-driven allocation.
pub const MAX_KEY_FILE_SIZE: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that should exist cannot be opened (exit 4, as cryptsetup's "wrong device").
    #[error("{path}: cannot open: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: {source}")]
    Stream { path: String, source: StreamError },
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("refusing to {action}: {a} and {b} are the same file")]
    SameFile {
        action: &'static str,
        a: String,
        b: String,
    },
    #[error(
        "{path}: size {size} bytes is not a multiple of the {sector_size}-byte sector size \
         (a LUKS payload is whole sectors; pad the file to {padded} bytes, e.g. \
         `truncate -s {padded} {path}`, or choose --sector-size 512)"
    )]
    NotWholeSectors {
        path: String,
        size: u64,
        sector_size: u32,
        padded: u64,
    },
    #[error("{path}: input is empty; a LUKS payload needs at least one sector")]
    EmptyInput { path: String },
    #[error(
        "{path}: the header puts the payload at bytes {offset}..{end}, but the image has only \
         {size} bytes"
    )]
    PayloadBeyondImage {
        path: String,
        offset: u64,
        end: u64,
        size: u64,
    },
    #[error("{path}: payload of {size} bytes is not a whole number of {sector_size}-byte sectors")]
    PayloadNotWholeSectors {
        path: String,
        size: u64,
        sector_size: u32,
    },
    /// An output file that exists where a command refuses to overwrite (exit 5, "busy").
    #[error("{path}: exists; refusing to overwrite it (remove it first, or choose another output)")]
    OutputExists { path: String },
    /// A block device that is mounted, mapped or held (`O_EXCL` refused it; exit 5).
    #[error(
        "{path}: the device is in use (mounted, mapped or held by another device); refusing to \
         write to it"
    )]
    DeviceBusy { path: String },
    /// A target block device too small for the image (exit 4, "wrong device").
    #[error(
        "{path}: the device has {size} bytes but the converted image needs {needed} bytes \
         ({header} of header and {payload} of payload)"
    )]
    DeviceTooSmall {
        path: String,
        size: u64,
        needed: u64,
        header: u64,
        payload: u64,
    },
    /// Contradictory or out-of-range encrypt options (exit 1).
    #[error("{0}")]
    Parameter(String),
    /// A header or unlock failure, with the file it concerns.
    #[error("{path}: {source}")]
    Header { path: String, source: luks::Error },
    #[error(transparent)]
    Luks(#[from] luks::Error),
    #[error(transparent)]
    Crypto(#[from] crate::crypto::Error),
    /// A qcow2 image that is malformed or uses a feature volcrypt does not process.
    #[error("{path}: {source}")]
    Qcow2 { path: String, source: qcow2::Error },
    /// `image verify` found a difference, or could not verify.
    #[error(transparent)]
    Verify(verify::VerifyFailed),
}

impl Error {
    pub fn kind(&self) -> Kind {
        match self {
            Error::Open { .. } | Error::DeviceTooSmall { .. } => Kind::WrongDevice,
            Error::OutputExists { .. } | Error::DeviceBusy { .. } => Kind::Busy,
            Error::Luks(e) | Error::Header { source: e, .. } => e.kind(),
            Error::Crypto(e) => e.kind(),
            Error::Verify(v) => v.kind,
            Error::Qcow2 {
                source: qcow2::Error::Io(_),
                ..
            } => Kind::WrongDevice,
            _ => Kind::Invalid,
        }
    }
}

fn open_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Open {
        path: path.display().to_string(),
        source,
    }
}

fn header_err(path: &Path) -> impl FnOnce(luks::Error) -> Error + '_ {
    move |source| Error::Header {
        path: path.display().to_string(),
        source,
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a key file whole, as cryptsetup's `--key-file` does: no newline stripping, at most
/// [`MAX_KEY_FILE_SIZE`] bytes. `-` reads standard input, so a passphrase never needs to
/// touch a file.
pub fn read_key_file(path: &Path) -> Result<SecretBytes, Error> {
    let shown = || path.display().to_string();
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    let limit = MAX_KEY_FILE_SIZE + 1;
    if path == Path::new("-") {
        buf.reserve(4096);
        io::stdin()
            .lock()
            .take(limit)
            .read_to_end(&mut buf)
            .map_err(io_err(path))?;
    } else {
        let f = File::open(path).map_err(open_err(path))?;
        // Reserve up front so growing the buffer leaves no unzeroized copies behind.
        let hint = f.metadata().map_or(0, |m| m.len().min(MAX_KEY_FILE_SIZE));
        buf.reserve(usize::try_from(hint).unwrap_or(0) + 1);
        f.take(limit).read_to_end(&mut buf).map_err(io_err(path))?;
    }
    if buf.len() as u64 > MAX_KEY_FILE_SIZE {
        return Err(Error::KeyFile {
            path: shown(),
            reason: format!("larger than the {MAX_KEY_FILE_SIZE}-byte maximum"),
        });
    }
    if buf.is_empty() {
        return Err(Error::KeyFile {
            path: shown(),
            reason: "empty".into(),
        });
    }
    Ok(SecretBytes::new(std::mem::take(&mut *buf)))
}

/// An image opened for reading with its validated header.
pub struct OpenedImage {
    pub header: Header,
    image_path: PathBuf,
    image: File,
    image_size: u64,
    /// The detached header file, if any (keyslot areas live there, not in the image).
    header_file: Option<(PathBuf, File)>,
}

/// The container formats `image` commands read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A LUKS1/LUKS2 header at offset 0 (or a detached header).
    Luks,
    /// A qcow2 image (magic `QFI\xfb`), which must carry LUKS encryption.
    Qcow2,
}

/// Tells a qcow2 image from anything else (which the LUKS reader then judges).
pub fn detect(image: &Path) -> Result<Format, Error> {
    let mut f = File::open(image).map_err(open_err(image))?;
    if qcow2::is_qcow(&mut f).map_err(io_err(image))? {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Luks)
    }
}

/// Opens `image` (and the detached `header` file, if given), reads and validates the header.
/// A qcow2 image is refused by name here: callers that handle qcow2 check [`detect`] first.
pub fn open(image: &Path, header: Option<&Path>) -> Result<OpenedImage, Error> {
    let mut image_file = File::open(image).map_err(open_err(image))?;
    if header.is_none() && qcow2::is_qcow(&mut image_file).map_err(io_err(image))? {
        return Err(Error::Qcow2 {
            path: image.display().to_string(),
            source: qcow2::Error::Unsupported(
                "this is a qcow2 image: this command reads raw LUKS images only (inspect, \
                 check-key and decrypt read qcow2-LUKS images)"
                    .into(),
            ),
        });
    }
    let image_size = file_size(&mut image_file).map_err(io_err(image))?;
    let (parsed, header_file) = match header {
        Some(hpath) => {
            let mut hf = File::open(hpath).map_err(open_err(hpath))?;
            let h = Header::read(&mut hf, None).map_err(header_err(hpath))?;
            (h, Some((hpath.to_path_buf(), hf)))
        }
        None => {
            image_file.seek(SeekFrom::Start(0)).map_err(io_err(image))?;
            (
                Header::read(&mut image_file, Some(image_size)).map_err(header_err(image))?,
                None,
            )
        }
    };
    Ok(OpenedImage {
        header: parsed,
        image_path: image.to_path_buf(),
        image: image_file,
        image_size,
        header_file,
    })
}

/// Size of a regular file or a block device (whose metadata length is 0).
fn file_size(f: &mut File) -> io::Result<u64> {
    let meta_len = f.metadata()?.len();
    if meta_len > 0 {
        return Ok(meta_len);
    }
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

impl OpenedImage {
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Where the payload lies in the image: (offset, length), checked against the image size
    /// and the sector size. A "dynamic" segment runs to the end of the image, rounded down to
    /// whole 512-byte units as a block device would be.
    pub fn payload_extent(&self) -> Result<(u64, u64), Error> {
        let path = self.image_path.display().to_string();
        let offset = self.header.data_offset();
        let sector_size = self.header.sector_size();
        let size = match self.header.data_size() {
            Some(size) => size,
            None => self.image_size.saturating_sub(offset) / 512 * 512,
        };
        let end = offset
            .checked_add(size)
            .ok_or_else(|| Error::PayloadBeyondImage {
                path: path.clone(),
                offset,
                end: u64::MAX,
                size: self.image_size,
            })?;
        if offset > self.image_size || end > self.image_size {
            return Err(Error::PayloadBeyondImage {
                path,
                offset,
                end,
                size: self.image_size,
            });
        }
        if sector_size == 0 || !size.is_multiple_of(u64::from(sector_size)) {
            return Err(Error::PayloadNotWholeSectors {
                path,
                size,
                sector_size,
            });
        }
        Ok((offset, size))
    }

    /// Tries the keyslots (or only `slot`) with `passphrase`; returns the accepting slot and
    /// the verified volume key.
    pub fn unlock(
        &mut self,
        passphrase: &SecretBytes,
        slot: Option<u32>,
        limits: &KdfLimits,
    ) -> Result<(u32, SecretBytes), Error> {
        let pw = passphrase.expose();
        let (path, r) = match &mut self.header_file {
            Some((p, f)) => (p.as_path(), f),
            None => (self.image_path.as_path(), &mut self.image),
        };
        self.header
            .unlock(r, pw, slot, limits)
            .map_err(header_err(path))
    }

    /// Checks that the data may be activated (no unknown mandatory requirements), that the
    /// payload fits the image, and unlocks a keyslot: everything that can fail before any
    /// output is created.
    pub fn unlock_payload(
        &mut self,
        passphrase: &SecretBytes,
        slot: Option<u32>,
        limits: &KdfLimits,
    ) -> Result<UnlockedPayload, Error> {
        self.header
            .check_activation_allowed()
            .map_err(header_err(&self.image_path))?;
        let (offset, len) = self.payload_extent()?;
        let (slot, key) = self.unlock(passphrase, slot, limits)?;
        // The key now lives only inside the cipher's zeroizing key schedule.
        let cipher = SectorCipher::new(self.header.cipher()?, key.expose())?;
        drop(key);
        Ok(UnlockedPayload {
            slot,
            cipher,
            offset,
            len,
        })
    }

    /// Decrypts the unlocked payload into `out` (named `out_name` in errors).
    pub fn decrypt_into<W: Write + Send>(
        &mut self,
        unlocked: &UnlockedPayload,
        out: W,
        out_name: &str,
        opts: &StreamOptions,
    ) -> Result<DecryptReport, Error> {
        let path = self.image_path.clone();
        self.image
            .seek(SeekFrom::Start(unlocked.offset))
            .map_err(io_err(&path))?;
        let reader = (&mut self.image).take(unlocked.len);
        let written = decrypt_to(
            reader,
            out,
            &unlocked.cipher,
            unlocked.len,
            self.header.sector_size() as usize,
            self.header.iv_tweak(),
            opts,
        )
        .map_err(|source| Error::Stream {
            path: match &source {
                StreamError::Write(_) => out_name.to_string(),
                _ => path.display().to_string(),
            },
            source,
        })?;
        Ok(DecryptReport {
            slot: unlocked.slot,
            bytes: written,
        })
    }
}

/// A payload ready to decrypt: the slot that opened it, its cipher, and where it lies.
pub struct UnlockedPayload {
    pub slot: u32,
    pub cipher: SectorCipher,
    pub offset: u64,
    pub len: u64,
}

/// What `decrypt` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecryptReport {
    pub slot: u32,
    pub bytes: u64,
}

/// Decrypts `len` bytes of payload from `reader` to `writer` with `threads` cores (`None` =
/// all). The library entry point for benchmarks: compare `threads: Some(1)` with `None`.
pub fn decrypt_to<R: Read + Send, W: Write + Send>(
    reader: R,
    writer: W,
    cipher: &SectorCipher,
    len: u64,
    sector_size: usize,
    iv_tweak: u64,
    opts: &StreamOptions,
) -> Result<u64, StreamError> {
    stream::transform(
        reader,
        writer,
        len,
        sector_size,
        iv_tweak,
        opts,
        |piece, iv| cipher.decrypt(piece, sector_size, iv),
    )
}

/// Encrypts `len` bytes of plaintext from `reader` to `writer` (see [`decrypt_to`]).
pub fn encrypt_to<R: Read + Send, W: Write + Send>(
    reader: R,
    writer: W,
    cipher: &SectorCipher,
    len: u64,
    sector_size: usize,
    iv_tweak: u64,
    opts: &StreamOptions,
) -> Result<u64, StreamError> {
    stream::transform(
        reader,
        writer,
        len,
        sector_size,
        iv_tweak,
        opts,
        |piece, iv| cipher.encrypt(piece, sector_size, iv),
    )
}

/// Identity of an existing file (device and inode), to refuse writing over an input.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Errors when `a` and `b` name the same existing file.
pub fn refuse_same_file(action: &'static str, a: &Path, b: &Path) -> Result<(), Error> {
    match (file_id(a), file_id(b)) {
        (Some(x), Some(y)) if x == y => Err(Error::SameFile {
            action,
            a: a.display().to_string(),
            b: b.display().to_string(),
        }),
        _ => Ok(()),
    }
}

/// Where decrypted data goes.
pub enum Output<'a> {
    Stdout,
    File(&'a Path),
}

/// `image decrypt`: opens, unlocks and writes the payload byte-exact to `output`.
pub fn decrypt(
    image: &Path,
    header: Option<&Path>,
    passphrase: &SecretBytes,
    slot: Option<u32>,
    limits: &KdfLimits,
    output: Output<'_>,
    opts: &StreamOptions,
) -> Result<DecryptReport, Error> {
    if let Output::File(out) = output {
        refuse_same_file("overwrite the image", image, out)?;
        if let Some(h) = header {
            refuse_same_file("overwrite the header", h, out)?;
        }
    }
    let mut opened = open(image, header)?;
    let unlocked = opened.unlock_payload(passphrase, slot, limits)?;
    match output {
        Output::Stdout => opened.decrypt_into(&unlocked, io::stdout(), "standard output", opts),
        Output::File(out) => {
            let mut outputs = Outputs::default();
            let f = outputs.create(out, Existing::Overwrite)?.file;
            let report = opened.decrypt_into(&unlocked, f, &out.display().to_string(), opts)?;
            outputs.keep();
            Ok(report)
        }
    }
}

/// What `encrypt` wrote.
#[derive(Debug, Clone)]
pub struct EncryptReport {
    pub summary: luks::Summary,
    pub payload_bytes: u64,
    pub data_offset: u64,
    pub sector_size: u32,
}

/// `image encrypt`: writes a LUKS container holding `input` to `output` (with a detached
/// header in `header` when given: the payload then starts at offset 0 of `output`).
pub fn encrypt(
    input: &Path,
    output: &Path,
    header: Option<&Path>,
    passphrase: &SecretBytes,
    options: &EncryptOptions,
    limits: &KdfLimits,
    opts: &StreamOptions,
) -> Result<EncryptReport, Error> {
    refuse_same_file("overwrite the input", input, output)?;
    if let Some(h) = header {
        refuse_same_file("overwrite the input", input, h)?;
        refuse_same_file("write header and payload to one file", output, h)?;
        if h == output {
            return Err(Error::SameFile {
                action: "write header and payload to one file",
                a: h.display().to_string(),
                b: output.display().to_string(),
            });
        }
    }
    let mut in_file = File::open(input).map_err(open_err(input))?;
    let size = file_size(&mut in_file).map_err(io_err(input))?;
    if size == 0 {
        return Err(Error::EmptyInput {
            path: input.display().to_string(),
        });
    }
    let params = options.resolve(size, header.is_some(), limits)?;
    if !size.is_multiple_of(u64::from(params.sector_size)) {
        let ss = u64::from(params.sector_size);
        return Err(Error::NotWholeSectors {
            path: input.display().to_string(),
            size,
            sector_size: params.sector_size,
            padded: size.div_ceil(ss) * ss,
        });
    }
    let created = luks::create(&params, passphrase.expose(), limits)?;
    let cipher = SectorCipher::new(&params.cipher, created.volume_key.expose())?;
    // The key now lives only inside the cipher's (zeroizing) key schedule.
    let data_offset = created.data_offset;
    let summary = created.header_summary.clone();
    let header_bytes = created.header;
    drop(created.volume_key);

    let mut outputs = Outputs::default();
    let result = (|| -> Result<u64, Error> {
        if let Some(hpath) = header {
            let mut hf = outputs.create(hpath, Existing::Overwrite)?.file;
            hf.write_all(&header_bytes).map_err(io_err(hpath))?;
            hf.sync_all().map_err(io_err(hpath))?;
        }
        let mut out = outputs.create(output, Existing::Overwrite)?.file;
        if header.is_none() {
            out.write_all(&header_bytes).map_err(io_err(output))?;
            let pad = data_offset
                .checked_sub(header_bytes.len() as u64)
                .ok_or_else(|| {
                    Error::Parameter(format!(
                        "internal: header of {} bytes is larger than the data offset {data_offset}",
                        header_bytes.len()
                    ))
                })?;
            io::copy(&mut io::repeat(0).take(pad), &mut out).map_err(io_err(output))?;
        }
        in_file.seek(SeekFrom::Start(0)).map_err(io_err(input))?;
        let n = encrypt_to(
            (&mut in_file).take(size),
            &mut out,
            &cipher,
            size,
            params.sector_size as usize,
            0,
            opts,
        )
        .map_err(|source| Error::Stream {
            path: match &source {
                StreamError::Write(_) => output.display().to_string(),
                _ => input.display().to_string(),
            },
            source,
        })?;
        out.sync_all().map_err(io_err(output))?;
        Ok(n)
    })();
    match result {
        Ok(n) => {
            outputs.keep();
            Ok(EncryptReport {
                summary,
                payload_bytes: n,
                data_offset,
                sector_size: params.sector_size,
            })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write");
        f
    }

    #[test]
    fn key_files_are_read_whole_keeping_newlines() {
        let f = temp_file(b"pass\n\0word\r\n");
        let k = read_key_file(f.path()).expect("read");
        assert_eq!(k.expose(), b"pass\n\0word\r\n");
    }

    #[test]
    fn empty_and_oversized_key_files_are_refused_naming_the_file() {
        let f = temp_file(b"");
        let e = read_key_file(f.path()).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        assert!(
            e.to_string().contains(&f.path().display().to_string()),
            "{e}"
        );
        assert_eq!(e.kind(), Kind::Invalid);

        let big = tempfile::NamedTempFile::new().expect("temp");
        big.as_file()
            .set_len(MAX_KEY_FILE_SIZE + 1)
            .expect("set_len");
        let e = read_key_file(big.path()).unwrap_err();
        assert!(e.to_string().contains("maximum"), "{e}");

        let e = read_key_file(Path::new("/nonexistent/key")).unwrap_err();
        assert_eq!(e.kind(), Kind::WrongDevice);
    }

    #[test]
    fn same_file_is_detected_through_other_names() {
        let f = temp_file(b"x");
        let dir = f.path().parent().expect("parent");
        let dotted = dir.join(".").join(f.path().file_name().expect("name"));
        let e = refuse_same_file("overwrite the input", f.path(), &dotted).unwrap_err();
        assert!(e.to_string().contains("same file"), "{e}");
        let g = temp_file(b"y");
        refuse_same_file("overwrite the input", f.path(), g.path()).expect("different files");
        refuse_same_file(
            "overwrite the input",
            f.path(),
            Path::new("/nonexistent/out"),
        )
        .expect("a new output");
    }
}
