//! qcow2 images encrypted with LUKS, as whole images: open (qcow2 header plus the LUKS header
//! inside it), unlock, and decrypt to a raw plaintext disk image.
//!
//! The format itself is `qcow2`'s job; the keyslots and the cipher are the same code the raw
//! LUKS path uses, so the passphrase rule (key file bytes, secret-type hexlification) is
//! identical for both kinds of image.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use zeroize::Zeroizing;

use super::output::{Existing, Outputs};
use super::qcow2::{self, Extent, Qcow2Header, SECTOR, Window};
use super::{DecryptReport, Error, Output, StreamOptions, file_size, io_err, open_err};
use crate::crypto::cipher::SectorCipher;
use crate::crypto::kdf::KdfLimits;
use crate::luks::{self, Header};
use crate::secret::SecretBytes;

/// Bytes read and decrypted at a time (bounded memory whatever the image size).
const BATCH: u64 = 8 << 20;
/// Pieces of a batch handed to the worker threads.
const PIECE: usize = 256 << 10;

/// A qcow2-LUKS image opened for reading, with both headers validated.
pub struct OpenedQcow2 {
    pub qcow2: Qcow2Header,
    pub luks: Header,
    path: PathBuf,
    file: File,
}

fn qcow2_err(path: &Path) -> impl FnOnce(qcow2::Error) -> Error + '_ {
    move |source| Error::Qcow2 {
        path: path.display().to_string(),
        source,
    }
}

/// Opens a qcow2 image and validates its qcow2 header and the LUKS header it holds.
pub fn open(path: &Path) -> Result<OpenedQcow2, Error> {
    let mut file = File::open(path).map_err(open_err(path))?;
    let size = file_size(&mut file).map_err(io_err(path))?;
    let q = Qcow2Header::read(&mut file, size).map_err(qcow2_err(path))?;
    let luks = {
        let mut w = Window::new(&mut file, q.luks_offset, q.luks_length);
        // The payload offset in this header is unused (qcow2 maps the data), so no device
        // size is given for the payload check.
        Header::read(&mut w, None).map_err(|source| Error::Header {
            path: format!("{} (LUKS header at byte {})", path.display(), q.luks_offset),
            source,
        })?
    };
    if !matches!(luks, Header::Luks1(_)) {
        return Err(Error::Qcow2 {
            path: path.display().to_string(),
            source: qcow2::Error::Unsupported(format!(
                "the LUKS header inside the qcow2 image is LUKS{}; qemu defines qcow2 \
                 encryption with LUKS1 headers only",
                luks.version()
            )),
        });
    }
    Ok(OpenedQcow2 {
        qcow2: q,
        luks,
        path: path.to_path_buf(),
        file,
    })
}

impl OpenedQcow2 {
    /// Tries the keyslots (or only `slot`); returns the accepting slot and the volume key.
    pub fn unlock(
        &mut self,
        passphrase: &SecretBytes,
        slot: Option<u32>,
        limits: &KdfLimits,
    ) -> Result<(u32, SecretBytes), Error> {
        let mut w = Window::new(
            &mut self.file,
            self.qcow2.luks_offset,
            self.qcow2.luks_length,
        );
        self.luks
            .unlock(&mut w, passphrase.expose(), slot, limits)
            .map_err(|source| Error::Header {
                path: self.path.display().to_string(),
                source,
            })
    }

    /// Decrypts the guest disk into `sink`: data clusters decrypted with the IV of their host
    /// sector, unallocated and zero clusters as zeros. Returns the guest bytes written.
    fn decrypt_into(
        &mut self,
        cipher: &SectorCipher,
        sink: &mut Sink,
        opts: &StreamOptions,
    ) -> Result<u64, Error> {
        let path = self.path.clone();
        let threads = opts
            .threads
            .unwrap_or_else(rayon::current_num_threads)
            .max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Parameter(format!("cannot start {threads} worker threads: {e}")))?;
        let q = self.qcow2.clone();
        let l1 = q.read_l1(&mut self.file).map_err(qcow2_err(&path))?;
        let per_l2 = q.cluster_size * (q.cluster_size / if q.extended_l2 { 16 } else { 8 });
        let mut extents = Vec::new();
        let mut buf = Zeroizing::new(Vec::new());
        let mut written = 0u64;
        for (i, &l2) in l1.iter().enumerate() {
            extents.clear();
            q.read_l2(&mut self.file, l2, i as u64 * per_l2, &mut extents)
                .map_err(qcow2_err(&path))?;
            for e in &extents {
                match *e {
                    Extent::Zero { len } => sink.zeros(len)?,
                    Extent::Data { host, len } => {
                        let mut done = 0;
                        while done < len {
                            let n = (len - done).min(BATCH);
                            let at = host + done;
                            buf.resize(n as usize, 0);
                            self.file
                                .seek(SeekFrom::Start(at))
                                .and_then(|_| self.file.read_exact(&mut buf))
                                .map_err(io_err(&path))?;
                            pool.install(|| {
                                buf.par_chunks_mut(PIECE).enumerate().for_each(|(k, p)| {
                                    let iv = (at + (k * PIECE) as u64) / SECTOR;
                                    cipher.decrypt(p, SECTOR as usize, iv);
                                })
                            });
                            sink.data(&buf)?;
                            done += n;
                        }
                    }
                }
                written += e.len();
            }
        }
        sink.finish(written)?;
        Ok(written)
    }
}

impl OpenedQcow2 {
    /// The guest disk as a stream of plaintext: data clusters are read and decrypted in memory
    /// a batch at a time (with the IV of their host sector), unallocated and zero clusters read
    /// as zeros. Nothing is written anywhere: `image convert` feeds this straight into the
    /// encryptor of the new image.
    pub fn plaintext<'a>(
        &'a mut self,
        cipher: &'a SectorCipher,
        threads: Option<usize>,
    ) -> Result<PlainReader<'a>, Error> {
        let threads = threads.unwrap_or_else(rayon::current_num_threads).max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("volcrypt-qcow2-{i}"))
            .build()
            .map_err(|e| Error::Parameter(format!("cannot start {threads} worker threads: {e}")))?;
        let path = self.path.clone();
        let l1 = self
            .qcow2
            .read_l1(&mut self.file)
            .map_err(qcow2_err(&path))?;
        Ok(PlainReader {
            opened: self,
            cipher,
            pool,
            l1,
            next_l1: 0,
            extents: std::collections::VecDeque::new(),
            buf: Zeroizing::new(Vec::new()),
            buf_pos: 0,
            zeros_left: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// See [`OpenedQcow2::plaintext`]. Read errors name the qcow2 structure or offset at fault.
pub struct PlainReader<'a> {
    opened: &'a mut OpenedQcow2,
    cipher: &'a SectorCipher,
    pool: rayon::ThreadPool,
    l1: Vec<u64>,
    next_l1: usize,
    extents: std::collections::VecDeque<Extent>,
    /// Decrypted bytes not yet handed out (zeroized when replaced or dropped).
    buf: Zeroizing<Vec<u8>>,
    buf_pos: usize,
    zeros_left: u64,
}

impl PlainReader<'_> {
    fn refill(&mut self) -> io::Result<bool> {
        loop {
            match self.extents.pop_front() {
                Some(Extent::Zero { len }) => {
                    self.zeros_left = len;
                    return Ok(true);
                }
                Some(Extent::Data { host, len }) => {
                    let n = len.min(BATCH);
                    if n < len {
                        self.extents.push_front(Extent::Data {
                            host: host + n,
                            len: len - n,
                        });
                    }
                    // Reuse the allocation: resizing within capacity leaves no copies.
                    self.buf.clear();
                    self.buf.resize(n as usize, 0);
                    let file = &mut self.opened.file;
                    file.seek(SeekFrom::Start(host))
                        .and_then(|_| file.read_exact(&mut self.buf))
                        .map_err(|e| {
                            io::Error::new(
                                e.kind(),
                                format!("data cluster at host offset {host}: {e}"),
                            )
                        })?;
                    let cipher = self.cipher;
                    let buf = &mut self.buf;
                    self.pool.install(|| {
                        buf.par_chunks_mut(PIECE).enumerate().for_each(|(k, p)| {
                            let iv = (host + (k * PIECE) as u64) / SECTOR;
                            cipher.decrypt(p, SECTOR as usize, iv);
                        })
                    });
                    self.buf_pos = 0;
                    return Ok(true);
                }
                None => {
                    let Some(&l2) = self.l1.get(self.next_l1) else {
                        return Ok(false);
                    };
                    let q = &self.opened.qcow2;
                    let per_l2 =
                        q.cluster_size * (q.cluster_size / if q.extended_l2 { 16 } else { 8 });
                    let mut found = Vec::new();
                    q.read_l2(
                        &mut self.opened.file,
                        l2,
                        self.next_l1 as u64 * per_l2,
                        &mut found,
                    )
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    self.extents.extend(found);
                    self.next_l1 += 1;
                }
            }
        }
    }
}

impl Read for PlainReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.buf_pos < self.buf.len() {
                let n = out.len().min(self.buf.len() - self.buf_pos);
                out[..n].copy_from_slice(&self.buf[self.buf_pos..self.buf_pos + n]);
                self.buf_pos += n;
                return Ok(n);
            }
            if self.zeros_left > 0 {
                let n = usize::try_from(self.zeros_left).map_or(out.len(), |z| z.min(out.len()));
                out[..n].fill(0);
                self.zeros_left -= n as u64;
                return Ok(n);
            }
            if out.is_empty() || !self.refill()? {
                return Ok(0);
            }
        }
    }
}

/// Where plaintext goes. A regular file gets holes for zero runs (the output stays sparse,
/// as `qemu-img convert` leaves it); anything else (standard output, a block device whose old
/// contents must be overwritten) gets the zeros written.
enum Sink {
    Sparse { file: File, name: String },
    Dense { w: Box<dyn Write>, name: String },
}

/// A block of zeros to write zero runs from.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl Sink {
    fn err(&self) -> impl FnOnce(io::Error) -> Error + '_ {
        let name = match self {
            Sink::Sparse { name, .. } | Sink::Dense { name, .. } => name.clone(),
        };
        move |source| Error::Io { path: name, source }
    }

    fn zeros(&mut self, mut len: u64) -> Result<(), Error> {
        let r = match self {
            Sink::Sparse { file, .. } => i64::try_from(len)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "zero run too long"))
                .and_then(|d| file.seek(SeekFrom::Current(d)))
                .map(|_| ()),
            Sink::Dense { w, .. } => (|| {
                while len > 0 {
                    let n = len.min(ZEROS.len() as u64) as usize;
                    w.write_all(&ZEROS[..n])?;
                    len -= n as u64;
                }
                Ok(())
            })(),
        };
        r.map_err(self.err())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let r = match self {
            Sink::Sparse { file, .. } => file.write_all(bytes),
            Sink::Dense { w, .. } => w.write_all(bytes),
        };
        r.map_err(self.err())
    }

    fn finish(&mut self, total: u64) -> Result<(), Error> {
        let r = match self {
            Sink::Sparse { file, .. } => file.set_len(total).and_then(|_| file.sync_all()),
            Sink::Dense { w, .. } => w.flush(),
        };
        r.map_err(self.err())
    }
}

/// `image decrypt` for a qcow2-LUKS image: writes the guest disk as raw plaintext.
pub fn decrypt(
    image: &Path,
    passphrase: &SecretBytes,
    slot: Option<u32>,
    limits: &KdfLimits,
    output: Output<'_>,
    opts: &StreamOptions,
) -> Result<DecryptReport, Error> {
    if let Output::File(out) = output {
        super::refuse_same_file("overwrite the image", image, out)?;
    }
    let mut opened = open(image)?;
    let (slot, key) = opened.unlock(passphrase, slot, limits)?;
    let cipher = SectorCipher::new(opened.luks.cipher()?, key.expose())?;
    drop(key);
    match output {
        Output::Stdout => {
            let mut sink = Sink::Dense {
                w: Box::new(io::stdout().lock()),
                name: "standard output".into(),
            };
            let bytes = opened.decrypt_into(&cipher, &mut sink, opts)?;
            Ok(DecryptReport { slot, bytes })
        }
        Output::File(out) => {
            let mut outputs = Outputs::default();
            let f = outputs.create(out, Existing::Overwrite)?.file;
            let regular = f.metadata().map(|m| m.is_file()).unwrap_or(false);
            let name = out.display().to_string();
            let mut sink = if regular {
                Sink::Sparse { file: f, name }
            } else {
                Sink::Dense {
                    w: Box::new(io::BufWriter::with_capacity(1 << 20, f)),
                    name,
                }
            };
            let bytes = opened.decrypt_into(&cipher, &mut sink, opts)?;
            outputs.keep();
            Ok(DecryptReport { slot, bytes })
        }
    }
}

/// What `image inspect` shows for a qcow2-LUKS image.
#[derive(Debug, serde::Serialize)]
pub struct Qcow2Summary {
    pub format: &'static str,
    pub qcow2: Qcow2Header,
    pub luks: luks::Summary,
}

impl OpenedQcow2 {
    pub fn summary(&self) -> Qcow2Summary {
        Qcow2Summary {
            format: "qcow2",
            qcow2: self.qcow2.clone(),
            luks: self.luks.summary(),
        }
    }
}

impl std::fmt::Display for Qcow2Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = &self.qcow2;
        writeln!(f, "qcow2 image (version {}), LUKS encrypted", q.version)?;
        writeln!(f, "Virtual size:   {} bytes", q.virtual_size)?;
        writeln!(f, "Cluster size:   {} bytes", q.cluster_size)?;
        writeln!(
            f,
            "Extended L2:    {}",
            if q.extended_l2 { "yes" } else { "no" }
        )?;
        if q.dirty {
            writeln!(f, "Dirty:          yes (not closed cleanly)")?;
        }
        writeln!(f, "Snapshots:      {}", q.snapshots)?;
        writeln!(
            f,
            "LUKS header:    {} bytes at offset {}",
            q.luks_length, q.luks_offset
        )?;
        writeln!(f)?;
        write!(f, "{}", self.luks)
    }
}
