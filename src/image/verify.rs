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

use super::{Error, OpenedImage, StreamOptions, header_err, open_err};
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
    match plaintext {
        None => {
            opened.decrypt_into(&unlocked, io::sink(), "(no output)", opts)?;
        }
        Some(p) => {
            let f = File::open(p).map_err(open_err(p))?;
            let plain_len = f.metadata().map_err(super::io_err(p))?.len();
            let mut cmp = Compare {
                expected: BufReader::with_capacity(1 << 20, f),
                pos: 0,
                first_diff: None,
                expected_ended: false,
                scratch: vec![0u8; 1 << 20],
            };
            opened.decrypt_into(&unlocked, &mut cmp, &p.display().to_string(), opts)?;
            let size_note = (plain_len != unlocked.len).then(|| {
                format!(
                    "the plaintext has {plain_len} bytes, the payload {}",
                    unlocked.len
                )
            });
            let byte = cmp
                .first_diff
                .or_else(|| size_note.as_ref().map(|_| plain_len.min(unlocked.len)));
            report.plaintext_diff = byte.map(|byte| PlaintextDiff {
                byte,
                sector: byte / u64::from(sector_size),
                sector_size,
                size_note,
            });
        }
    }
    Ok(report)
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
