//! `verify`: the userspace engine checks what the kernel wrote on a live, attached volume.
//!
//! For each checked sector the plaintext is read through the mapping (what dm-crypt decrypts)
//! and the ciphertext from the backing device; the ciphertext is decrypted with volcrypt's own
//! engine and the two must agree. The volume key is obtained the way attach obtains it: the
//! key manager's secret → the os-brick passphrase → a keyslot unlocked in userspace (LUKS), or
//! cryptsetup's plain-mode hashing (plain).
//!
//! It never disturbs the volume: both devices are opened read-only, without `O_EXCL`, with
//! `O_DIRECT` (so the page cache neither serves stale data nor is polluted), in whole
//! encryption sectors; an optional rate limit keeps it from starving the guest. A sector that
//! mismatches is read again (a write through the mapping between the two reads is normal on a
//! busy volume and must never be reported as corruption); only a sector that keeps
//! mismatching is reported, with both offsets. Ciphertext that is all zeros is a region that
//! was never written or was discarded: it is counted and reported as such, not as damage.
//!
//! Key material lives only in the zeroizing key schedule of the cipher; plaintext buffers are
//! zeroized when dropped. Nothing here logs or returns either.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::Context;
use super::journal::Record;
use crate::crypto::cipher::{CipherSpec, SectorCipher};
use crate::crypto::hash::HashAlg;
use crate::crypto::kdf::KdfLimits;
use crate::kind::Kind;
use crate::request::VolumeFormat;
use crate::secret::SecretBytes;

/// Sectors checked by a sampled verify when no count is given.
pub const DEFAULT_SAMPLE: u64 = 256;
/// Bytes read per side at a time by `--full` and `--range`.
const CHUNK: usize = 1 << 20;
/// Times a mismatching sector is read again before it is reported.
const REREADS: u32 = 3;
/// Mismatch entries kept in a report (the count is always exact).
const MAX_LISTED: usize = 64;
/// Reading threads of one verify, at most (one per core, and at least two so that the
/// kernel's decryption of one piece overlaps the userspace decryption of another).
const MAX_WORKERS: usize = 8;

/// Which sectors to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Mode {
    /// `count` sectors at random, one in each of `count` equal stretches of the device.
    Sample { count: u64 },
    /// Every sector.
    Full,
    /// Bytes `start..start+len` of the mapping (whole encryption sectors).
    Range { start: u64, len: u64 },
}

impl Default for Mode {
    fn default() -> Self {
        Mode::Sample {
            count: DEFAULT_SAMPLE,
        }
    }
}

/// A verify request as the agent takes it (`{"mode": "full"}`, `{"mode": "sample", "count":
/// 100}`, `{"mode": "range", "start": 0, "len": 1048576}`, each with an optional
/// `"max_rate_mb"`); an empty body is the default sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Request {
    #[serde(flatten)]
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_mb: Option<f64>,
}

/// How to run a verify.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub mode: Mode,
    /// Read at most this many MB (10^6 bytes) per second from the backing device.
    pub max_rate_mb: Option<f64>,
    /// Draw a progress bar on stderr (the CLI passes `stderr().is_terminal()`).
    pub progress: bool,
    /// Set to stop a running verify at the next chunk (the agent's `DELETE`, a detach).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Where the agent watches a running verify (plain counters, so the engine stays free of
    /// the agent's types).
    pub counters: Option<Arc<Progress>>,
}

/// Progress of a running verify: bytes to check (set once the sectors are chosen) and bytes
/// checked so far.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
}

/// One sector that kept mismatching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// Byte offset in the mapping (the plaintext side).
    pub mapping_offset: u64,
    /// Byte offset on the backing device (the ciphertext side).
    pub backing_offset: u64,
    /// Which side looked wrong, when that can be told.
    pub note: String,
}

/// What a verify found. The same JSON from the CLI and the agent.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub volume_id: String,
    pub mapping: String,
    pub backing_device: PathBuf,
    pub format: String,
    pub cipher: String,
    pub sector_size: u32,
    /// Where the payload starts on the backing device.
    pub data_offset: u64,
    pub mapping_bytes: u64,
    #[serde(flatten)]
    pub mode: Mode,
    pub sectors_checked: u64,
    pub bytes_checked: u64,
    /// Checked sectors whose ciphertext is all zeros: never written, or discarded.
    pub unwritten_sectors: u64,
    /// Sectors that mismatched once but agreed on a re-read (written during the verify).
    pub changed_during_verify: u64,
    pub mismatch_count: u64,
    /// The first mismatches (at most 64).
    pub mismatches: Vec<Mismatch>,
    /// "agree" or "mismatch".
    pub verdict: &'static str,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Boxed: the attach engine's error is large, and this one travels up to the CLI's.
    #[error(transparent)]
    Volume(Box<super::Error>),
    /// The check cannot run (cipher not in the engine, key unavailable or not opening the
    /// header): never to be read as "corrupt".
    #[error("cannot verify volume {volume_id}: {reason}")]
    CannotVerify { volume_id: String, reason: String },
    #[error("verify of volume {volume_id}: {reason}")]
    Invalid { volume_id: String, reason: String },
    #[error("verify of volume {volume_id} cancelled")]
    Cancelled { volume_id: String },
    /// The verify ran and found sectors that keep differing (the CLI's exit status for it).
    #[error(
        "volume {volume_id}: {count} sector(s) differ between the mapping and the userspace decryption of the backing device, first at mapping byte {first_mapping} (backing byte {first_backing}): {note}"
    )]
    Mismatch {
        volume_id: String,
        count: u64,
        first_mapping: u64,
        first_backing: u64,
        note: String,
    },
}

impl From<super::Error> for Error {
    fn from(e: super::Error) -> Error {
        Error::Volume(Box::new(e))
    }
}

impl Error {
    pub fn kind(&self) -> Kind {
        match self {
            Error::Volume(e) => e.kind(),
            Error::CannotVerify { .. } => Kind::CannotVerify,
            Error::Invalid { .. } | Error::Cancelled { .. } => Kind::Invalid,
            Error::Mismatch { .. } => Kind::Mismatch,
        }
    }
}

impl Report {
    /// The error a report with mismatches amounts to (for the CLI's exit status).
    pub fn failure(&self) -> Option<Error> {
        let first = self.mismatches.first()?;
        Some(Error::Mismatch {
            volume_id: self.volume_id.clone(),
            count: self.mismatch_count,
            first_mapping: first.mapping_offset,
            first_backing: first.backing_offset,
            note: first.note.clone(),
        })
    }
}

/// The volume's geometry and cipher, ready to decrypt sectors.
struct Engine {
    cipher: SectorCipher,
    spec: String,
    sector_size: u32,
    data_offset: u64,
    iv_tweak: u64,
}

/// Verify the attached volume `volume_id`.
pub fn verify(ctx: &Context<'_>, volume_id: &str, opts: &Options) -> Result<Report, Error> {
    let started = Instant::now();
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };
    let record = ctx
        .journal()
        .get(volume_id)?
        .ok_or_else(|| super::Error::NotManaged {
            volume_id: volume_id.to_owned(),
            state_dir: ctx.config.state_dir.clone(),
        })?;
    let invalid = |reason: String| Error::Invalid {
        volume_id: volume_id.to_owned(),
        reason,
    };
    let mapper = PathBuf::from(format!("/dev/mapper/{}", record.mapping_name));
    let plain_dev = open_direct(&mapper).map_err(|e| {
        invalid(format!(
            "mapping {} cannot be opened (is the volume attached?): {e}",
            mapper.display()
        ))
    })?;
    let cipher_dev = open_direct(&record.backing_device)
        .map_err(|e| super::Error::io("open", &record.backing_device, e))?;
    let mapping_bytes =
        device_size(&plain_dev).map_err(|e| super::Error::io("size", &mapper, e))?;
    // A verify cancelled while it waited for its turn stops before the keyslot unlock.
    if cancelled() {
        return Err(Error::Cancelled {
            volume_id: volume_id.to_owned(),
        });
    }
    let engine = engine_for(ctx, &record)?;
    let ss = u64::from(engine.sector_size);
    let sectors = mapping_bytes / ss;

    let extents: Vec<(u64, u64)> = match opts.mode {
        Mode::Full => vec![(0, sectors)],
        Mode::Range { start, len } => {
            if !start.is_multiple_of(ss) || !len.is_multiple_of(ss) || len == 0 {
                return Err(invalid(format!(
                    "range {start}:{len} is not whole, non-empty {ss}-byte sectors"
                )));
            }
            if start.checked_add(len).is_none_or(|end| end > mapping_bytes) {
                return Err(invalid(format!(
                    "range {start}:{len} ends beyond the mapping's {mapping_bytes} bytes"
                )));
            }
            vec![(start / ss, len / ss)]
        }
        Mode::Sample { count } => {
            if count == 0 {
                return Err(invalid("a sample of 0 sectors checks nothing".into()));
            }
            sample(sectors, count).into_iter().map(|s| (s, 1)).collect()
        }
    };
    let total: u64 = extents.iter().map(|e| e.1).sum::<u64>() * ss;
    let bar = progress_bar(opts.progress, total);
    if let Some(c) = &opts.counters {
        c.total.store(total, Ordering::Relaxed);
    }
    // The work, in order: pieces of at most CHUNK bytes. Each worker takes the next piece, so
    // the plaintext read (dm-crypt decrypting in the kernel) of one overlaps the ciphertext
    // read and userspace decryption of another: a single thread doing one after the other ran
    // at 0.4x the speed of reading the mapping alone.
    let pieces = Pieces::new(extents, (CHUNK as u64 / ss).max(1));
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, MAX_WORKERS)
        .min(usize::try_from(pieces.len()).unwrap_or(usize::MAX).max(1));
    let limiter = opts.max_rate_mb.map(|mb| Mutex::new(RateLimit::new(mb)));
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let runs: Vec<Result<Run<'_>, Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut run = Run::new(&engine, &plain_dev, &cipher_dev, limiter.as_ref());
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            return Ok(run);
                        }
                        if cancelled() {
                            stop.store(true, Ordering::Relaxed);
                            return Err(Error::Cancelled {
                                volume_id: volume_id.to_owned(),
                            });
                        }
                        let Some((s, n)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(run);
                        };
                        if let Err(e) = run.check(s, n) {
                            stop.store(true, Ordering::Relaxed);
                            return Err(super::Error::io("read", &record.backing_device, e).into());
                        }
                        if let Some(b) = &bar {
                            b.inc(n * ss);
                        }
                        if let Some(c) = &opts.counters {
                            c.done.fetch_add(n * ss, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(invalid("a verify worker thread panicked".into())))
            })
            .collect()
    });
    // Each worker took its pieces in increasing order, so its listed mismatches are its first
    // ones, and the first MAX_LISTED of them all are among the lists.
    let mut run = Run::new(&engine, &plain_dev, &cipher_dev, None);
    for r in runs {
        let r = r?;
        run.checked += r.checked;
        run.unwritten += r.unwritten;
        run.changed += r.changed;
        run.mismatch_count += r.mismatch_count;
        run.mismatches.extend(r.mismatches);
    }
    run.mismatches.sort_by_key(|m| m.mapping_offset);
    run.mismatches.truncate(MAX_LISTED);
    Ok(Report {
        volume_id: volume_id.to_owned(),
        mapping: record.mapping_name.clone(),
        backing_device: record.backing_device.clone(),
        format: record.format.to_string(),
        cipher: engine.spec.clone(),
        sector_size: engine.sector_size,
        data_offset: engine.data_offset,
        mapping_bytes,
        mode: opts.mode,
        sectors_checked: run.checked,
        bytes_checked: run.checked * ss,
        unwritten_sectors: run.unwritten,
        changed_during_verify: run.changed,
        mismatch_count: run.mismatch_count,
        verdict: if run.mismatch_count == 0 {
            "agree"
        } else {
            "mismatch"
        },
        mismatches: run.mismatches,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// The cipher and geometry of the record's volume, with the key obtained as attach does.
fn engine_for(ctx: &Context<'_>, record: &Record) -> Result<Engine, Error> {
    let cannot = |reason: String| Error::CannotVerify {
        volume_id: record.volume_id.clone(),
        reason,
    };
    let secret = ctx.keys.get(&record.key_id).map_err(|e| {
        cannot(format!(
            "the key {} is not available from the {} key manager: {e}",
            record.key_id,
            ctx.keys.kind()
        ))
    })?;
    let passphrase = secret.passphrase();
    drop(secret);
    match record.format {
        VolumeFormat::Plain => {
            let spec_text = record
                .cipher
                .clone()
                .unwrap_or_else(|| super::crypt::PLAIN_DEFAULT_CIPHER.to_owned());
            let spec = CipherSpec::parse(&spec_text).map_err(|e| {
                cannot(format!(
                    "the userspace engine cannot decrypt {spec_text}: {e}"
                ))
            })?;
            let bits = record
                .key_size
                .unwrap_or(super::crypt::PLAIN_DEFAULT_KEY_BITS);
            let key = plain_key(passphrase.expose(), (bits / 8) as usize)?;
            let cipher = SectorCipher::new(&spec, key.expose())
                .map_err(|e| cannot(format!("{spec_text} with a {bits}-bit key: {e}")))?;
            Ok(Engine {
                cipher,
                spec: spec_text,
                sector_size: 512,
                data_offset: 0,
                iv_tweak: 0,
            })
        }
        VolumeFormat::Luks1 | VolumeFormat::Luks2 => {
            let dh = super::header::read(&record.backing_device).ok_or_else(|| {
                cannot(format!(
                    "no LUKS header the userspace engine reads on {}",
                    record.backing_device.display()
                ))
            })?;
            let h = dh.header;
            h.check_activation_allowed()
                .map_err(|e| cannot(e.to_string()))?;
            let spec = h
                .cipher()
                .map_err(|e| {
                    cannot(format!(
                        "the userspace engine cannot decrypt this volume: {e}"
                    ))
                })?
                .clone();
            let mut f =
                File::open(&dh.device).map_err(|e| super::Error::io("open", &dh.device, e))?;
            let (_, key) = h
                .unlock(&mut f, passphrase.expose(), None, &KdfLimits::default())
                .map_err(|e| match e {
                    crate::luks::Error::NoKey => cannot(format!(
                        "key {} opens no keyslot of the header on {} (was the volume rekeyed?)",
                        record.key_id,
                        dh.device.display()
                    )),
                    other => cannot(other.to_string()),
                })?;
            let cipher =
                SectorCipher::new(&spec, key.expose()).map_err(|e| cannot(e.to_string()))?;
            drop(key);
            Ok(Engine {
                cipher,
                spec: spec.to_string(),
                sector_size: h.sector_size(),
                data_offset: h.data_offset(),
                iv_tweak: h.iv_tweak(),
            })
        }
    }
}

/// cryptsetup's plain-mode key (hash "ripemd160", as [`super::crypt::open_plain`] asks
/// libcryptsetup for): hash(p) ‖ hash("A" ‖ p) ‖ hash("AA" ‖ p) ‖ …, cut to the key size.
fn plain_key(passphrase: &[u8], key_bytes: usize) -> Result<SecretBytes, Error> {
    let hash = HashAlg::from_name(super::crypt::PLAIN_HASH).map_err(|e| Error::CannotVerify {
        volume_id: String::new(),
        reason: e.to_string(),
    })?;
    let mut out = Zeroizing::new(Vec::with_capacity(key_bytes + hash.output_len()));
    let mut prefix = Vec::new();
    while out.len() < key_bytes {
        let d = Zeroizing::new(hash.digest(&[&prefix, passphrase]));
        out.extend_from_slice(&d);
        prefix.push(b'A');
    }
    out.truncate(key_bytes);
    Ok(SecretBytes::new(std::mem::take(&mut *out)))
}

/// One sector index in each of `count` equal stretches of `sectors` (all of them when the
/// device has fewer), at a random place within its stretch.
fn sample(sectors: u64, count: u64) -> Vec<u64> {
    if sectors <= count {
        return (0..sectors).collect();
    }
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..count {
        let lo = sectors * i / count;
        let hi = sectors * (i + 1) / count;
        let mut r = [0u8; 8];
        // Without randomness the start of each stretch is still a fair spread.
        let off = match getrandom::fill(&mut r) {
            Ok(()) => u64::from_le_bytes(r) % (hi - lo).max(1),
            Err(_) => 0,
        };
        out.push(lo + off);
    }
    out
}

/// The pieces of the extents to check, at most `per` sectors each, in order — computed from
/// their index rather than listed: a full verify of a large volume has millions of them.
struct Pieces {
    /// (first sector, sectors)
    extents: Vec<(u64, u64)>,
    /// Pieces in the extents up to and including each one.
    ends: Vec<u64>,
    per: u64,
}

impl Pieces {
    fn new(extents: Vec<(u64, u64)>, per: u64) -> Pieces {
        let ends = extents
            .iter()
            .scan(0u64, |total, &(_, count)| {
                *total += count.div_ceil(per);
                Some(*total)
            })
            .collect();
        Pieces { extents, ends, per }
    }

    fn len(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Piece `i`: its first sector and its length in sectors.
    fn get(&self, i: u64) -> Option<(u64, u64)> {
        let e = self.ends.partition_point(|&end| end <= i);
        let &(first, count) = self.extents.get(e)?;
        let before = if e == 0 { 0 } else { self.ends[e - 1] };
        let s = first + (i - before) * self.per;
        Some((s, (first + count - s).min(self.per)))
    }
}

/// One worker's share of a verify: its counts, its mismatches, and its read buffers (reused
/// from piece to piece).
struct Run<'a> {
    engine: &'a Engine,
    plain_dev: &'a File,
    cipher_dev: &'a File,
    limiter: Option<&'a Mutex<RateLimit>>,
    plain: Aligned,
    cipher: Aligned,
    checked: u64,
    unwritten: u64,
    changed: u64,
    mismatches: Vec<Mismatch>,
    mismatch_count: u64,
}

impl<'a> Run<'a> {
    fn new(
        engine: &'a Engine,
        plain_dev: &'a File,
        cipher_dev: &'a File,
        limiter: Option<&'a Mutex<RateLimit>>,
    ) -> Run<'a> {
        Run {
            engine,
            plain_dev,
            cipher_dev,
            limiter,
            plain: Aligned::empty(),
            cipher: Aligned::empty(),
            checked: 0,
            unwritten: 0,
            changed: 0,
            mismatches: Vec::new(),
            mismatch_count: 0,
        }
    }

    /// Checks `n` sectors from sector `first` (of the mapping).
    fn check(&mut self, first: u64, n: u64) -> io::Result<()> {
        let ss = u64::from(self.engine.sector_size);
        let len = usize::try_from(n * ss).map_err(io::Error::other)?;
        let zeros = self.read_pair(first, len)?;
        self.unwritten += zeros.iter().filter(|&&z| z).count() as u64;
        // Collected first: a re-read reuses the buffers.
        let differing: Vec<u64> = (0..n)
            .filter(|&i| {
                let r = (i * ss) as usize..((i + 1) * ss) as usize;
                self.plain.get()[r.clone()] != self.cipher.get()[r]
            })
            .collect();
        for i in differing {
            self.recheck(first + i)?;
        }
        self.checked += n;
        Ok(())
    }

    /// Reads `len` bytes of both sides from sector `first` into the buffers and decrypts the
    /// ciphertext in place; returns, per sector, whether its ciphertext was all zeros
    /// (unwritten or discarded).
    fn read_pair(&mut self, first: u64, len: usize) -> io::Result<Vec<bool>> {
        let ss = u64::from(self.engine.sector_size);
        let off = first * ss;
        if let Some(l) = self.limiter {
            l.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(len as u64);
        }
        self.plain.resize(len);
        self.cipher.resize(len);
        self.plain_dev.read_exact_at(self.plain.get_mut(), off)?;
        self.cipher_dev
            .read_exact_at(self.cipher.get_mut(), self.engine.data_offset + off)?;
        let zeros = self
            .cipher
            .get()
            .chunks(ss as usize)
            .map(|c| c.iter().all(|&b| b == 0))
            .collect();
        self.engine.cipher.decrypt(
            self.cipher.get_mut(),
            self.engine.sector_size as usize,
            self.engine.iv_tweak + off / 512,
        );
        Ok(zeros)
    }

    /// A sector mismatched: read it again; report it only if it keeps mismatching.
    fn recheck(&mut self, sector: u64) -> io::Result<()> {
        let len = self.engine.sector_size as usize;
        let mut zero = false;
        for attempt in 0..REREADS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(20 << attempt));
            }
            zero = self.read_pair(sector, len)?[0];
            if self.plain.get() == self.cipher.get() {
                self.changed += 1;
                return Ok(());
            }
        }
        self.mismatch_count += 1;
        if self.mismatches.len() < MAX_LISTED {
            let note = if zero {
                "the ciphertext is all zeros (an unwritten or discarded region on the backing \
                 device, zeroed behind dm-crypt): the mapping shows data the disk no longer holds"
            } else if self.plain.get().iter().all(|&b| b == 0) {
                "the mapping reads all zeros where the backing device holds ciphertext"
            } else {
                "the ciphertext on the backing device does not decrypt to what the mapping shows"
            };
            self.mismatches.push(Mismatch {
                mapping_offset: sector * len as u64,
                backing_offset: self.engine.data_offset + sector * len as u64,
                note: note.into(),
            });
        }
        Ok(())
    }
}

/// A zeroizing buffer aligned for `O_DIRECT` (4096 bytes covers every logical block size).
struct Aligned {
    raw: Zeroizing<Vec<u8>>,
    start: usize,
    len: usize,
}

const ALIGN: usize = 4096;

impl Aligned {
    fn empty() -> Aligned {
        Aligned {
            raw: Zeroizing::new(Vec::new()),
            start: 0,
            len: 0,
        }
    }
    /// Makes the buffer `len` bytes long; it reallocates only to grow.
    fn resize(&mut self, len: usize) {
        if self.raw.len() < len + ALIGN {
            let raw = Zeroizing::new(vec![0u8; len + ALIGN]);
            self.start = raw.as_ptr().align_offset(ALIGN);
            self.raw = raw;
        }
        self.len = len;
    }
    fn get(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Read-only, `O_DIRECT`, never `O_EXCL`: a verify must not block the guest or other openers.
fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

fn device_size(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let len = f.metadata()?.len();
    if len > 0 {
        return Ok(len);
    }
    f.seek(SeekFrom::End(0))
}

/// Sleeps so that reads stay under the configured rate.
struct RateLimit {
    bytes_per_sec: f64,
    start: Instant,
    taken: u64,
}

impl RateLimit {
    fn new(mb_per_sec: f64) -> RateLimit {
        RateLimit {
            bytes_per_sec: (mb_per_sec * 1e6).max(1.0),
            start: Instant::now(),
            taken: 0,
        }
    }
    fn take(&mut self, bytes: u64) {
        let due = Duration::from_secs_f64(self.taken as f64 / self.bytes_per_sec);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        self.taken += bytes;
    }
}

fn progress_bar(show: bool, total: u64) -> Option<indicatif::ProgressBar> {
    show.then(|| {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "verify {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_spread_over_the_device_one_per_stretch() {
        let s = sample(1000, 10);
        assert_eq!(s.len(), 10);
        for (i, x) in s.iter().enumerate() {
            let i = i as u64;
            assert!((i * 100..(i + 1) * 100).contains(x), "{i}: {x}");
        }
        assert_eq!(sample(5, 10), vec![0, 1, 2, 3, 4]);
    }

    /// The key cryptsetup's plain mode derives: each block hashes one more "A" before the
    /// passphrase (checked against the RustCrypto RIPEMD-160 directly).
    #[test]
    fn plain_key_is_ripemd160_blocks_with_growing_a_prefix() {
        use ripemd::{Digest, Ripemd160};
        let k = plain_key(b"hello", 32).expect("key");
        let first = Ripemd160::digest(b"hello");
        let second = Ripemd160::digest(b"Ahello");
        assert_eq!(&k.expose()[..20], &first[..]);
        assert_eq!(&k.expose()[20..], &second[..12]);
    }

    #[test]
    fn pieces_cover_every_extent_in_order_in_pieces_of_at_most_per() {
        let p = Pieces::new(vec![(0, 5), (10, 1), (20, 4)], 2);
        let all: Vec<_> = (0..p.len()).map(|i| p.get(i).unwrap()).collect();
        assert_eq!(all, [(0, 2), (2, 2), (4, 1), (10, 1), (20, 2), (22, 2)]);
        assert_eq!(p.get(p.len()), None);
        assert_eq!(Pieces::new(vec![], 8).get(0), None);
        // A full verify of 16 TiB in 1 MiB pieces: no list of 16 million entries.
        let big = Pieces::new(vec![(0, 1 << 35)], 2048);
        assert_eq!(big.len(), 1 << 24);
        assert_eq!(big.get((1 << 24) - 1), Some(((1 << 35) - 2048, 2048)));
    }

    #[test]
    fn rate_limit_paces_reads() {
        let mut l = RateLimit::new(1.0); // 1 MB/s
        let t0 = Instant::now();
        l.take(100_000);
        l.take(100_000); // the second waits for the first's 0.1 s
        assert!(t0.elapsed() >= Duration::from_millis(90));
    }
}
