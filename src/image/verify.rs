//! `image verify`: proves an image is intact before it is trusted (after a download, or before
//! an image pipeline uploads it).
//!
//! Three checks, in the order a reader of the report needs them:
//! - every active keyslot: the key is tried against each one separately. A slot the key opens
//!   has passed the whole chain (KDF, keyslot decryption, AF merge, volume-key digest); for a
//!   slot it does not open, only what needs no key can be checked: that its area is readable
//!   and not wiped to zeros (an active slot whose area is all zeros can never open again);
//! - the payload decrypts whole with the recovered volume key;
//! - with a plaintext file, that the payload decrypts to exactly those bytes; the first
//!   differing sector is reported.
//!
//! Without the key a damaged keyslot area cannot be told from a different passphrase, so a key
//! that opens no keyslot is "cannot verify", never "corrupt". The outcome is a report; the
//! caller turns a failed check into [`Kind::Mismatch`] through [`VerifyReport::failure`].

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use serde::Serialize;

use rayon::prelude::*;
use zeroize::Zeroizing;

use super::stream::{self, IV_UNIT};
use super::{
    Error, OpenedImage, StreamError, StreamOptions, UnlockedPayload, header_err, open_err,
};
use crate::crypto::kdf::KdfLimits;
use crate::kind::Kind;
use crate::luks;
use crate::secret::SecretBytes;

/// What happened to one keyslot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum SlotState {
    /// The key opens it and the volume key it yields matches the digest.
    Opened,
    /// The key does not open it (another passphrase's slot, or a damaged area: without that
    /// passphrase the two cannot be told apart). Its area is readable and not wiped.
    NotThisKey,
    /// The slot cannot unlock data at all (unbound, unknown KDF, …): header facts, not damage.
    Unusable(String),
    /// The key could not be tried (KDF cost over the limits, unsupported algorithm).
    NotTried(String),
    /// Damage that needs no key to see: the area is unreadable or wiped to zeros.
    Damaged(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotCheck {
    pub id: u32,
    #[serde(flatten)]
    pub state: SlotState,
}

/// The first place the payload and the expected plaintext differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlaintextDiff {
    /// Byte offset in the plaintext of the first differing byte.
    pub byte: u64,
    /// Payload sector (of the header's sector size) holding it.
    pub sector: u64,
    pub sector_size: u32,
    /// Set when the sizes differ (the common part may still agree).
    pub size_note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub version: u8,
    pub cipher: String,
    pub sector_size: u32,
    pub payload_offset: u64,
    pub payload_bytes: u64,
    /// The keyslot whose key decrypted the payload.
    pub opened_by: u32,
    pub keyslots: Vec<SlotCheck>,
    /// Whether a plaintext was compared.
    pub plaintext_compared: bool,
    pub plaintext_diff: Option<PlaintextDiff>,
}

impl VerifyReport {
    /// Why verification failed, or None when every check passed.
    pub fn failure(&self) -> Option<String> {
        let mut reasons = Vec::new();
        for s in &self.keyslots {
            if let SlotState::Damaged(why) = &s.state {
                reasons.push(format!("keyslot {}: {why}", s.id));
            }
        }
        if let Some(d) = &self.plaintext_diff {
            reasons.push(format!(
                "the payload differs from the plaintext at byte {} ({}-byte sector {}){}",
                d.byte,
                d.sector_size,
                d.sector,
                d.size_note
                    .as_ref()
                    .map(|n| format!("; {n}"))
                    .unwrap_or_default()
            ));
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
}

/// A failed verification: the check that failed, with [`Kind::Mismatch`] or
/// [`Kind::CannotVerify`].
#[derive(Debug, thiserror::Error)]
#[error("verify {path}: {message}")]
pub struct VerifyFailed {
    pub path: String,
    pub message: String,
    pub kind: Kind,
}

/// Runs every check on `image`. Errors: the image cannot be read or parsed (as `inspect`), or
/// verification cannot run ([`Error::Verify`] with [`Kind::CannotVerify`]). A finished run
/// returns its report, failed checks included.
pub fn verify(
    image: &Path,
    header: Option<&Path>,
    passphrase: &SecretBytes,
    plaintext: Option<&Path>,
    limits: &KdfLimits,
    opts: &StreamOptions,
) -> Result<VerifyReport, Error> {
    let mut opened = super::open(image, header)?;
    let cannot = |message: String| {
        Error::Verify(VerifyFailed {
            path: image.display().to_string(),
            message,
            kind: Kind::CannotVerify,
        })
    };
    let cipher = match opened.header.cipher() {
        Ok(c) => c.to_string(),
        Err(e) => {
            return Err(cannot(format!(
                "the userspace engine cannot decrypt this data: {e}"
            )));
        }
    };
    opened
        .header
        .check_activation_allowed()
        .map_err(|e| cannot(e.to_string()))?;
    let keyslots = opened.check_keyslots(passphrase, limits)?;
    let Some(opener) = keyslots
        .iter()
        .find(|s| s.state == SlotState::Opened)
        .map(|s| s.id)
    else {
        let damaged = keyslots
            .iter()
            .any(|s| matches!(s.state, SlotState::Damaged(_)));
        let detail = keyslots
            .iter()
            .map(|s| format!("keyslot {}: {}", s.id, describe(&s.state)))
            .collect::<Vec<_>>()
            .join("; ");
        let message = format!(
            "no keyslot accepts this key (a wrong key, or a damaged keyslot area: without \
             the right key the two look the same){}",
            if detail.is_empty() {
                " — the header has no active keyslot".to_string()
            } else {
                format!(" — {detail}")
            }
        );
        return Err(Error::Verify(VerifyFailed {
            path: image.display().to_string(),
            message,
            kind: if damaged {
                Kind::Mismatch
            } else {
                Kind::CannotVerify
            },
        }));
    };
    let unlocked = opened.unlock_payload(passphrase, Some(opener), limits)?;
    let sector_size = opened.header.sector_size();
    let mut report = VerifyReport {
        version: opened.header.version(),
        cipher,
        sector_size,
        payload_offset: unlocked.offset,
        payload_bytes: unlocked.len,
        opened_by: opener,
        keyslots,
        plaintext_compared: plaintext.is_some(),
        plaintext_diff: None,
    };
    let expected = match plaintext {
        None => None,
        Some(p) => {
            use std::os::unix::fs::FileTypeExt;
            let mut f = File::open(p).map_err(open_err(p))?;
            let kind = f.metadata().map_err(super::io_err(p))?.file_type();
            let positional = kind.is_file() || kind.is_block_device();
            // A pipe's size is known only once it has been read to its end.
            let len = if positional {
                super::file_size(&mut f).map_err(super::io_err(p))?
            } else {
                0
            };
            Some(Expected {
                path: p,
                file: f,
                len,
                positional,
            })
        }
    };
    let (first_diff, plain_len) = match expected {
        Some(e) if !e.positional => {
            let (diff, len) = compare_stream(&mut opened, &unlocked, e.file, e.path, opts)?;
            (diff, Some(len))
        }
        e => {
            let len = e.as_ref().map(|e| e.len);
            (
                check_in_parallel(&opened, &unlocked, e.as_ref(), opts)?,
                len,
            )
        }
    };
    if let Some(plain_len) = plain_len {
        let size_note = (plain_len != unlocked.len).then(|| {
            format!(
                "the plaintext has {plain_len} bytes, the payload {}",
                unlocked.len
            )
        });
        let byte = first_diff.or_else(|| size_note.as_ref().map(|_| plain_len.min(unlocked.len)));
        report.plaintext_diff = byte.map(|byte| PlaintextDiff {
            byte,
            sector: byte / u64::from(sector_size),
            sector_size,
            size_note,
        });
    }
    Ok(report)
}

/// The plaintext to compare the payload with.
struct Expected<'a> {
    path: &'a Path,
    file: File,
    /// Its size (block devices included); 0 for a pipe.
    len: u64,
    /// A file or block device, read at any offset; a pipe is read in order.
    positional: bool,
}

/// Decrypts the payload, and compares it with `expected` when given, on every core at once:
/// each worker reads one piece of ciphertext and the same piece of plaintext at their offsets,
/// decrypts, and compares while both are still in its core's cache. Every byte is read once
/// from the page cache and no stage waits for a single thread — the streaming pipeline's one
/// comparing writer held verify to half the speed of `cmp`. Returns the first differing byte
/// of the common part.
fn check_in_parallel(
    opened: &OpenedImage,
    unlocked: &UnlockedPayload,
    expected: Option<&Expected<'_>>,
    opts: &StreamOptions,
) -> Result<Option<u64>, Error> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, Ordering};

    let sector_size = opened.header.sector_size() as usize;
    let iv_tweak = opened.header.iv_tweak();
    let piece = stream::piece_size(sector_size);
    let len = unlocked.len;
    let image_err = |source| Error::Stream {
        path: opened.image_path.display().to_string(),
        source,
    };
    let pool = stream::cipher_pool(opts).map_err(image_err)?;
    let bar = stream::progress_bar(opts.progress, len);
    let first_diff = AtomicU64::new(u64::MAX);
    let result: Result<(), Error> = pool.install(|| {
        (0..len.div_ceil(piece as u64))
            .into_par_iter()
            .try_for_each_init(
                || {
                    (
                        Zeroizing::new(vec![0u8; piece]),
                        Zeroizing::new(vec![0u8; piece]),
                    )
                },
                |(data, want), i| {
                    let off = i * piece as u64;
                    if off >= first_diff.load(Ordering::Relaxed) {
                        return Ok(()); // an earlier difference is already known
                    }
                    let n = usize::try_from(len - off).map_or(piece, |r| r.min(piece));
                    let data = &mut data[..n];
                    opened
                        .image
                        .read_exact_at(data, unlocked.offset + off)
                        .map_err(|e| {
                            image_err(if e.kind() == io::ErrorKind::UnexpectedEof {
                                StreamError::ShortInput {
                                    got: off,
                                    expected: len,
                                }
                            } else {
                                StreamError::Read(e)
                            })
                        })?;
                    unlocked.cipher.decrypt(
                        data,
                        sector_size,
                        iv_tweak.wrapping_add(off / IV_UNIT),
                    );
                    if let Some(e) = expected {
                        let m = usize::try_from(e.len.saturating_sub(off)).map_or(n, |r| r.min(n));
                        let want = &mut want[..m];
                        e.file
                            .read_exact_at(want, off)
                            .map_err(|err| Error::Stream {
                                path: e.path.display().to_string(),
                                source: StreamError::Read(err),
                            })?;
                        // A slice comparison (memcmp) first; the byte is looked for only on a
                        // difference.
                        if want[..] != data[..m]
                            && let Some(j) = want.iter().zip(data.iter()).position(|(a, b)| a != b)
                        {
                            first_diff.fetch_min(off + j as u64, Ordering::Relaxed);
                        }
                    }
                    bar.inc(n as u64);
                    Ok(())
                },
            )
    });
    match &result {
        Ok(()) => bar.finish_and_clear(),
        Err(_) => bar.abandon(),
    }
    result?;
    let d = first_diff.into_inner();
    Ok((d != u64::MAX).then_some(d))
}

/// Compares the payload with a plaintext that can only be read in order (a pipe): the
/// streaming pipeline decrypts, a writer compares. Returns the first differing byte and the
/// plaintext's length (read to its end).
fn compare_stream(
    opened: &mut OpenedImage,
    unlocked: &UnlockedPayload,
    file: File,
    path: &Path,
    opts: &StreamOptions,
) -> Result<(Option<u64>, u64), Error> {
    let mut cmp = Compare {
        expected: BufReader::with_capacity(1 << 20, file),
        pos: 0,
        consumed: 0,
        first_diff: None,
        expected_ended: false,
        scratch: vec![0u8; 1 << 20],
    };
    let name = path.display().to_string();
    opened.decrypt_into(unlocked, &mut cmp, &name, opts)?;
    let rest = io::copy(&mut cmp.expected, &mut io::sink()).map_err(|e| Error::Stream {
        path: name,
        source: StreamError::Read(e),
    })?;
    Ok((cmp.first_diff, cmp.consumed + rest))
}

fn describe(s: &SlotState) -> String {
    match s {
        SlotState::Opened => "opened".into(),
        SlotState::NotThisKey => "not opened by this key".into(),
        SlotState::Unusable(r) => format!("unusable: {r}"),
        SlotState::NotTried(r) => format!("not tried: {r}"),
        SlotState::Damaged(r) => format!("DAMAGED: {r}"),
    }
}

impl SlotCheck {
    /// One line for the text report.
    pub fn describe(&self) -> String {
        format!("keyslot {}: {}", self.id, describe(&self.state))
    }
}

impl OpenedImage {
    /// Tries the key against every active keyslot on its own and checks the keyless facts of
    /// each slot's area.
    fn check_keyslots(
        &mut self,
        passphrase: &SecretBytes,
        limits: &KdfLimits,
    ) -> Result<Vec<SlotCheck>, Error> {
        let summary = self.header.summary();
        let mut out = Vec::new();
        for ks in summary.keyslots.iter().filter(|k| k.state != "DISABLED") {
            let state = if !ks.usable {
                SlotState::Unusable(
                    ks.note
                        .clone()
                        .unwrap_or_else(|| "cannot unlock data".into()),
                )
            } else {
                match self.unlock(passphrase, Some(ks.id), limits) {
                    Ok((_, key)) => {
                        drop(key);
                        SlotState::Opened
                    }
                    Err(Error::Header { source, .. }) => match source {
                        luks::Error::NoKey => self.area_state(ks.area_offset, ks.area_size)?,
                        luks::Error::Keyslot { reason, .. } => SlotState::Unusable(reason),
                        luks::Error::Crypto(e) => SlotState::NotTried(e.to_string()),
                        luks::Error::Io(e) => SlotState::Damaged(format!("area unreadable: {e}")),
                        other => SlotState::Damaged(other.to_string()),
                    },
                    Err(e) => return Err(e),
                }
            };
            out.push(SlotCheck { id: ks.id, state });
        }
        Ok(out)
    }

    /// An area the key did not open: readable, and not wiped?
    fn area_state(&mut self, offset: u64, len: u64) -> Result<SlotState, Error> {
        use std::io::{Seek, SeekFrom};
        let (path, r) = match &mut self.header_file {
            Some((p, f)) => (p.clone(), f),
            None => (self.image_path.clone(), &mut self.image),
        };
        r.seek(SeekFrom::Start(offset))
            .map_err(|e| header_err(&path)(luks::Error::Io(e)))?;
        let mut buf = vec![0u8; 64 << 10];
        let mut left = len;
        let mut nonzero = false;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            if let Err(e) = r.read_exact(&mut buf[..n]) {
                return Ok(SlotState::Damaged(format!(
                    "area at byte {offset} ({len} bytes) unreadable: {e}"
                )));
            }
            nonzero |= buf[..n].iter().any(|&b| b != 0);
            left -= n as u64;
        }
        Ok(if nonzero {
            SlotState::NotThisKey
        } else {
            SlotState::Damaged(format!(
                "its key material area at byte {offset} ({len} bytes) is all zeros: the slot is \
                 marked active but can never open"
            ))
        })
    }
}

/// A writer that compares what is written with the expected plaintext, in order.
struct Compare<R: Read> {
    expected: R,
    pos: u64,
    /// Bytes read from `expected`.
    consumed: u64,
    first_diff: Option<u64>,
    expected_ended: bool,
    scratch: Vec<u8>,
}

impl<R: Read> Write for Compare<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.scratch.len());
            let got = if self.first_diff.is_some() || self.expected_ended {
                0
            } else {
                read_full(&mut self.expected, &mut self.scratch[..n])?
            };
            self.consumed += got as u64;
            if self.first_diff.is_none() {
                let (want, have) = (&self.scratch[..got], &buf[done..done + got]);
                // A slice comparison (memcmp) first; the byte is looked for only on a difference.
                if want != have {
                    let i = want.iter().zip(have).position(|(a, b)| a != b);
                    self.first_diff = i.map(|i| self.pos + i as u64);
                } else if got < n && !self.expected_ended {
                    // The plaintext ended: the size check reports it.
                    self.expected_ended = true;
                }
            }
            done += n;
            self.pos += n as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compare(expected: &[u8], writes: &[&[u8]]) -> Option<u64> {
        let mut c = Compare {
            expected,
            pos: 0,
            consumed: 0,
            first_diff: None,
            expected_ended: false,
            scratch: vec![0u8; 3],
        };
        for w in writes {
            c.write_all(w).expect("write");
        }
        c.first_diff
    }

    #[test]
    fn the_first_differing_byte_is_found_across_writes_and_scratch_sizes() {
        assert_eq!(compare(b"abcdefgh", &[b"abcd", b"efgh"]), None);
        assert_eq!(compare(b"abcdefgh", &[b"abcd", b"efXh"]), Some(6));
        assert_eq!(compare(b"abcdefgh", &[b"Xbcd", b"efXh"]), Some(0));
        // A shorter plaintext is not a byte difference: the size check reports it.
        assert_eq!(compare(b"abc", &[b"abcd", b"efgh"]), None);
        assert_eq!(compare(b"abX", &[b"abcd"]), Some(2));
    }
}
