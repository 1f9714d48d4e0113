//! `image convert`: raw LUKS ⇄ qcow2-LUKS, to a new file or onto a block device, keeping the
//! key, with the plaintext only ever in memory.
//!
//! The source is unlocked once (one KDF); its plaintext is produced by a reader that decrypts
//! a batch at a time in memory ([`RawPlain`], or the qcow2 reader of `qcow2_luks`), and that
//! reader feeds the encryptor of the destination directly: the streaming pipeline of `stream`
//! for raw LUKS, the one-pass writer of `qcow2_write` for qcow2. No plaintext byte is written
//! to any file, pipe or temporary.
//!
//! The same key: the destination header gets one keyslot for the passphrase that opened the
//! source, wrapping the source's *volume key*. Reusing the volume key (rather than drawing a
//! new one) keeps the result the same encrypted volume as far as key custody goes: whoever
//! holds the source's volume key (a header backup, a `--dump-volume-key` escrow) can still
//! open it, and re-keying stays an explicit, separate act (`volcrypt rekey`), as it is in
//! Cinder. It is always possible because the destination keeps the source's cipher and key
//! size (qcow2-LUKS accepts any cipher LUKS1 does). Reusing a key across the two containers
//! is safe for the tweakable ciphers LUKS uses: sectors are encrypted under IVs that differ
//! (qcow2 uses host offsets, raw LUKS guest offsets), so the two ciphertexts reveal nothing
//! about each other beyond what either reveals alone.
//!
//! What cannot be kept is said in [`ConvertReport::notes`]: qcow2 encryption is LUKS1 with
//! 512-byte sectors, and LUKS1 has no larger sectors either.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use rayon::prelude::*;
use zeroize::Zeroizing;

use super::output::{Existing, Outputs, remove_on_signal};
use super::stream::IV_UNIT;
use super::{
    EncryptOptions, Error, Format, StreamError, StreamOptions, encrypt_to, io_err, qcow2,
    qcow2_luks, qcow2_write, refuse_same_file,
};
use crate::crypto::cipher::{CipherSpec, SectorCipher};
use crate::crypto::kdf::KdfLimits;
use crate::luks;
use crate::secret::SecretBytes;

/// Ciphertext read and decrypted at a time by [`RawPlain`].
const BATCH: usize = 8 << 20;
/// Pieces of a batch handed to the worker threads.
const PIECE: usize = 256 << 10;

/// What `convert` did.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub source: Format,
    pub target: Format,
    /// The source keyslot the passphrase opened.
    pub slot: u32,
    pub summary: luks::Summary,
    pub payload_bytes: u64,
    pub sector_size: u32,
    pub block_device: bool,
    /// Source properties the destination could not keep, and why.
    pub notes: Vec<String>,
}

/// The source's facts the destination keeps where it can.
struct SourceFacts {
    version: u8,
    cipher: CipherSpec,
    key_bits: u32,
    sector_size: u32,
    plaintext_len: u64,
}

/// `image convert SOURCE --output TARGET`: see the module documentation. `options` carries the
/// user's keyslot choices for the new header (LUKS type, PBKDF, cost, hash); cipher, key size
/// and sector size come from the source. An existing regular file at `target` is refused; an
/// existing block device gets raw LUKS written onto it (opened exclusively).
pub fn convert(
    source: &Path,
    target: &Path,
    format: Format,
    passphrase: &SecretBytes,
    options: &EncryptOptions,
    limits: &KdfLimits,
    opts: &StreamOptions,
) -> Result<ConvertReport, Error> {
    refuse_same_file("overwrite the source", source, target)?;
    // Cheap refusals before the KDF runs.
    let target_meta = std::fs::metadata(target).ok();
    let block_device = target_meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    if target_meta.is_some() && !block_device {
        return Err(Error::OutputExists {
            path: target.display().to_string(),
        });
    }
    if block_device && format == Format::Qcow2 {
        return Err(Error::Parameter(format!(
            "{}: a block device gets raw LUKS (a volume), not a qcow2 image; use --format luks",
            target.display()
        )));
    }

    let source_format = super::detect(source)?;
    let mut raw_src = None;
    let mut qcow_src = None;
    let (slot, key, facts) = match source_format {
        Format::Luks => {
            let mut opened = super::open(source, None)?;
            opened
                .header
                .check_activation_allowed()
                .map_err(super::header_err(source))?;
            let (offset, len) = opened.payload_extent()?;
            let (slot, key) = opened.unlock(passphrase, None, limits)?;
            let facts = SourceFacts {
                version: opened.header.version(),
                cipher: opened.header.cipher()?.clone(),
                key_bits: (opened.header.volume_key_len() * 8) as u32,
                sector_size: opened.header.sector_size(),
                plaintext_len: len,
            };
            raw_src = Some((opened, offset, len));
            (slot, key, facts)
        }
        Format::Qcow2 => {
            let mut opened = qcow2_luks::open(source)?;
            let (slot, key) = opened.unlock(passphrase, None, limits)?;
            let facts = SourceFacts {
                version: 1,
                cipher: opened.luks.cipher()?.clone(),
                key_bits: (opened.luks.volume_key_len() * 8) as u32,
                sector_size: qcow2::SECTOR as u32,
                plaintext_len: opened.qcow2.virtual_size,
            };
            qcow_src = Some(opened);
            (slot, key, facts)
        }
    };
    let src_cipher = SectorCipher::new(&facts.cipher, key.expose())?;

    let (params, mut notes) = target_params(&facts, format, options, limits)?;
    // The new header wraps the source's volume key (see the module documentation).
    let created = luks::create_with_key(&params, key, passphrase.expose(), limits)?;
    let summary = created.header_summary.clone();
    let header_len = created.data_offset;
    let payload = facts.plaintext_len;

    // Armed before the file is created, so no signal between the two leaves it behind (the
    // path did not exist a moment ago; if it appears meanwhile, create_new fails and the
    // guard is dropped, disarmed, before anything else).
    let signals = (!block_device).then(|| remove_on_signal(target));
    let mut outputs = Outputs::default();
    let opened_out = outputs.create(target, Existing::RefuseFiles)?;
    let mut out = opened_out.file;
    let signals = match signals {
        // The path became a device since it was looked at: never unlink a device node.
        Some(g) if opened_out.block_device => {
            g.disarm();
            None
        }
        other => other,
    };
    if opened_out.block_device {
        let size = out.seek(SeekFrom::End(0)).map_err(io_err(target))?;
        let needed = header_len + payload;
        if size < needed {
            return Err(Error::DeviceTooSmall {
                path: target.display().to_string(),
                size,
                needed,
                header: header_len,
                payload,
            });
        }
        if size > needed {
            notes.push(format!(
                "the device ({size} bytes) is larger than the image needs ({needed} bytes): the \
                 volume spans the whole device, and its last {} bytes read as noise until \
                 written (grow the file system to use them)",
                size - needed
            ));
        }
    }

    let source_name = source.display().to_string();
    let target_name = target.display().to_string();
    let stream_err = |source: StreamError| Error::Stream {
        path: match &source {
            StreamError::Write(_) => target_name.clone(),
            _ => source_name.clone(),
        },
        source,
    };
    let result = (|| -> Result<u64, Error> {
        // The source's plaintext, decrypted in memory a batch at a time.
        let reader: Box<dyn Read + Send + '_> = match (raw_src.as_mut(), qcow_src.as_mut()) {
            (Some((opened, offset, len)), _) => Box::new(
                RawPlain::new(
                    &mut opened.image,
                    *offset,
                    *len,
                    &src_cipher,
                    facts.sector_size as usize,
                    opened.header.iv_tweak(),
                    opts.threads,
                )
                .map_err(io_err(source))?,
            ),
            (None, Some(q)) => Box::new(q.plaintext(&src_cipher, opts.threads)?),
            (None, None) => return Err(Error::Parameter("internal: no source".into())),
        };
        match format {
            Format::Luks => {
                let cipher = SectorCipher::new(&params.cipher, created.volume_key.expose())?;
                // Until the payload is complete the target holds no header: an interrupted
                // run leaves nothing that looks like a LUKS volume (on a device, the old
                // header area is wiped first for the same reason).
                if opened_out.block_device {
                    out.seek(SeekFrom::Start(0)).map_err(io_err(target))?;
                    io::copy(&mut io::repeat(0).take(header_len), &mut out)
                        .map_err(io_err(target))?;
                } else {
                    out.set_len(header_len).map_err(io_err(target))?;
                }
                out.seek(SeekFrom::Start(header_len))
                    .map_err(io_err(target))?;
                let sector = params.sector_size as usize;
                let n = encrypt_to(reader, &mut out, &cipher, payload, sector, 0, opts)
                    .map_err(stream_err)?;
                drop(cipher);
                out.sync_data().map_err(io_err(target))?;
                out.write_all_at(&created.header, 0)
                    .map_err(io_err(target))?;
                out.sync_all().map_err(io_err(target))?;
                Ok(n)
            }
            Format::Qcow2 => {
                let report = qcow2_write::write_image(
                    reader,
                    &source_name,
                    payload,
                    created,
                    &params.cipher,
                    &mut out,
                    target,
                    opts,
                )?;
                Ok(report.payload_bytes)
            }
        }
    })();
    let n = match result {
        Ok(n) => n,
        Err(e) => {
            drop(outputs); // removes the partial file before the guard is disarmed
            if let Some(g) = signals {
                g.disarm();
            }
            return Err(e);
        }
    };
    outputs.keep();
    if let Some(g) = signals {
        g.disarm();
    }
    Ok(ConvertReport {
        source: source_format,
        target: format,
        slot,
        summary,
        payload_bytes: n,
        sector_size: params.sector_size,
        block_device: opened_out.block_device,
        notes,
    })
}

/// The new header's parameters: the source's cipher, key size and (where the format allows)
/// sector size and LUKS version; the user's keyslot options. Returns notes for what changed.
fn target_params(
    facts: &SourceFacts,
    format: Format,
    options: &EncryptOptions,
    limits: &KdfLimits,
) -> Result<(luks::NewContainer, Vec<String>), Error> {
    let mut notes = Vec::new();
    let mut o = options.clone();
    let version = match (format, o.version) {
        (Format::Qcow2, None | Some(1)) => 1,
        (Format::Qcow2, Some(v)) => {
            return Err(Error::Parameter(format!(
                "--type luks{v}: qcow2 encryption uses a LUKS1 header (the only version qemu \
                 reads inside qcow2)"
            )));
        }
        (Format::Luks, v) => v.unwrap_or(facts.version),
    };
    if version != facts.version {
        let why = if format == Format::Qcow2 {
            " (qcow2 encryption is LUKS1)"
        } else {
            ""
        };
        notes.push(format!(
            "LUKS{} source, LUKS{version} result{why}",
            facts.version
        ));
    }
    o.version = Some(version);
    o.cipher = Some(facts.cipher.to_string());
    o.key_size_bits = Some(facts.key_bits);
    let sector = if version == 1 {
        512
    } else if facts
        .plaintext_len
        .is_multiple_of(u64::from(facts.sector_size))
    {
        facts.sector_size
    } else {
        512
    };
    if sector != facts.sector_size {
        let why = match format {
            Format::Qcow2 => "qcow2 encryption uses 512-byte sectors",
            Format::Luks if version == 1 => "LUKS1 has 512-byte sectors only",
            Format::Luks => "the size is not a whole number of the source's sectors",
        };
        notes.push(format!(
            "sector size {} of the source becomes {sector} ({why})",
            facts.sector_size
        ));
    }
    o.sector_size = Some(sector);
    if options.cipher.is_some() || options.key_size_bits.is_some() {
        return Err(Error::Parameter(
            "convert keeps the source's cipher and key size (the volume key is reused)".into(),
        ));
    }
    let params = o.resolve(facts.plaintext_len, false, limits)?;
    Ok((params, notes))
}

/// The payload of a raw LUKS image as a stream of plaintext, decrypted in memory a batch at a
/// time with every core (never written anywhere by this reader).
pub struct RawPlain<'a> {
    file: &'a mut File,
    cipher: &'a SectorCipher,
    sector_size: usize,
    iv_tweak: u64,
    len: u64,
    /// Payload bytes decrypted so far.
    done: u64,
    pool: rayon::ThreadPool,
    buf: Zeroizing<Vec<u8>>,
    buf_pos: usize,
}

impl<'a> RawPlain<'a> {
    pub fn new(
        file: &'a mut File,
        offset: u64,
        len: u64,
        cipher: &'a SectorCipher,
        sector_size: usize,
        iv_tweak: u64,
        threads: Option<usize>,
    ) -> io::Result<Self> {
        file.seek(SeekFrom::Start(offset))?;
        let threads = threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("volcrypt-source-{i}"))
            .build()
            .map_err(io::Error::other)?;
        Ok(RawPlain {
            file,
            cipher,
            sector_size,
            iv_tweak,
            len,
            done: 0,
            pool,
            buf: Zeroizing::new(Vec::with_capacity(BATCH)),
            buf_pos: 0,
        })
    }
}

impl Read for RawPlain<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.buf_pos == self.buf.len() {
            if self.done == self.len || out.is_empty() {
                return Ok(0);
            }
            let n = usize::try_from(self.len - self.done).map_or(BATCH, |r| r.min(BATCH));
            self.buf.clear();
            self.buf.resize(n, 0);
            self.file.read_exact(&mut self.buf).map_err(|e| {
                io::Error::new(e.kind(), format!("payload byte {}: {e}", self.done))
            })?;
            let (cipher, ss, base) = (self.cipher, self.sector_size, self.done);
            let tweak = self.iv_tweak;
            let piece = (PIECE / ss).max(1) * ss;
            let buf = &mut self.buf;
            self.pool.install(|| {
                buf.par_chunks_mut(piece).enumerate().for_each(|(k, p)| {
                    let iv = tweak.wrapping_add((base + (k * piece) as u64) / IV_UNIT);
                    cipher.decrypt(p, ss, iv);
                })
            });
            self.done += n as u64;
            self.buf_pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.buf_pos);
        out[..n].copy_from_slice(&self.buf[self.buf_pos..self.buf_pos + n]);
        self.buf_pos += n;
        Ok(n)
    }
}
