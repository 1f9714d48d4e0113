//! The LUKS1 and LUKS2 on-disk formats: parse, validate (as strictly as cryptsetup), unlock
//! keyslots, summarise, and write new containers.
//!
//! Everything read from disk is bounded before it is allocated: a LUKS2 JSON area is at most
//! 4 MiB - 4 KiB (hdr_size is validated first), keyslot material is at most what the validated
//! area holds, and counts of keyslots/segments/digests/tokens are capped as in cryptsetup.
//! Headers are never rewritten: a damaged primary LUKS2 copy is simply not used.

pub mod create;
mod keyslot;
pub mod luks1;
pub mod luks2;
pub mod summary;
mod util;

use std::io::{Read, Seek};

use crate::crypto;
use crate::crypto::cipher::CipherSpec;
use crate::crypto::kdf::KdfLimits;
use crate::kind::Kind;
use crate::secret::SecretBytes;

pub use create::{Created, NewContainer, create, create_with_key};
pub use summary::Summary;

/// `LUKS\xba\xbe`: magic of a LUKS1 header and of the primary LUKS2 copy.
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a LUKS device")]
    NotLuks,
    /// A header rule is broken. `header` is "LUKS1", "LUKS2" or "LUKS"; `field` names the
    /// on-disk field or JSON path (e.g. `segments.0.offset`).
    #[error("{header} header: {field}: {reason}")]
    Invalid {
        header: &'static str,
        field: String,
        reason: String,
    },
    #[error("no key available with this passphrase")]
    NoKey,
    /// `config.requirements.mandatory` lists something volcrypt does not implement: the header
    /// may be inspected but the data must not be activated, decrypted or written.
    #[error(
        "LUKS2 header: config.requirements.mandatory: requirement {0:?} is not supported, \
         refusing to activate, decrypt or write the data (inspect is still possible)"
    )]
    UnsupportedRequirement(String),
    /// A header feature volcrypt cannot process for data (e.g. a dm-integrity segment).
    #[error("{0}: not supported by volcrypt, refusing to activate, decrypt or write the data")]
    UnsupportedFeature(String),
    /// The selected keyslot cannot be used (inactive, unbound, unknown KDF or type).
    #[error("keyslot {slot}: {reason}")]
    Keyslot { slot: u32, reason: String },
    /// Parameters of a new container that cannot be written.
    #[error("cannot create LUKS container: {0}")]
    BadParameters(String),
    #[error(transparent)]
    Crypto(#[from] crypto::Error),
    #[error("reading the LUKS header: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn kind(&self) -> Kind {
        match self {
            Error::NoKey => Kind::NoKey,
            Error::Crypto(e) => e.kind(),
            Error::Io(_) => Kind::WrongDevice,
            Error::NotLuks
            | Error::Invalid { .. }
            | Error::UnsupportedRequirement(_)
            | Error::UnsupportedFeature(_)
            | Error::Keyslot { .. }
            | Error::BadParameters(_) => Kind::Invalid,
        }
    }

    pub(crate) fn invalid(
        header: &'static str,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            header,
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Parsed, validated header (LUKS1 or LUKS2), with the unchanged bytes needed to copy it.
#[derive(Debug, Clone)]
pub enum Header {
    Luks1(luks1::Header),
    Luks2(luks2::Header),
}

impl Header {
    /// Reads and validates from an image or a detached header file. `device_size` (bytes) lets
    /// the validator check the payload fits (None for a detached header file).
    pub fn read(r: &mut (impl Read + Seek), device_size: Option<u64>) -> Result<Header, Error> {
        let mut start = [0u8; 8];
        let got = util::read_at_most(r, 0, &mut start)?;
        if got == 8 && start[..6] == LUKS_MAGIC && u16::from_be_bytes([start[6], start[7]]) == 1 {
            return Ok(Header::Luks1(luks1::Header::read(r, device_size)?));
        }
        // Everything else may still be LUKS2 with a damaged primary copy: the LUKS2 reader
        // searches the secondary copy and reports NotLuks when there is none.
        match luks2::Header::read(r, device_size) {
            Err(Error::NotLuks) if got == 8 && start[..6] == LUKS_MAGIC => Err(Error::invalid(
                "LUKS",
                "version",
                format!(
                    "unsupported LUKS version {}",
                    u16::from_be_bytes([start[6], start[7]])
                ),
            )),
            other => Ok(Header::Luks2(other?)),
        }
    }

    pub fn version(&self) -> u8 {
        match self {
            Header::Luks1(_) => 1,
            Header::Luks2(_) => 2,
        }
    }

    pub fn uuid(&self) -> &str {
        match self {
            Header::Luks1(h) => &h.uuid,
            Header::Luks2(h) => &h.binary.uuid,
        }
    }

    pub fn label(&self) -> Option<&str> {
        match self {
            Header::Luks1(_) => None,
            Header::Luks2(h) => (!h.binary.label.is_empty()).then_some(h.binary.label.as_str()),
        }
    }

    /// Cipher of the data segment; an error naming it when the userspace engine cannot run it
    /// (the header itself is still fine: inspect and the kernel may handle it).
    pub fn cipher(&self) -> Result<&CipherSpec, Error> {
        match self {
            Header::Luks1(h) => h.cipher_spec(),
            Header::Luks2(h) => h.data_cipher_spec(),
        }
    }

    pub fn volume_key_len(&self) -> usize {
        match self {
            Header::Luks1(h) => h.key_bytes as usize,
            Header::Luks2(h) => h.volume_key_len(),
        }
    }

    pub fn sector_size(&self) -> u32 {
        match self {
            Header::Luks1(_) => 512,
            Header::Luks2(h) => h.data_segment().map_or(512, |c| c.sector_size),
        }
    }

    /// Byte offset of the data (0 with a detached header).
    pub fn data_offset(&self) -> u64 {
        match self {
            Header::Luks1(h) => u64::from(h.payload_offset) * 512,
            Header::Luks2(h) => h.data_segment_entry().map_or(0, |s| s.offset),
        }
    }

    /// None = to the end of the device ("dynamic").
    pub fn data_size(&self) -> Option<u64> {
        match self {
            Header::Luks1(_) => None,
            Header::Luks2(h) => h.data_segment_entry().and_then(|s| s.size),
        }
    }

    pub fn iv_tweak(&self) -> u64 {
        match self {
            Header::Luks1(_) => 0,
            Header::Luks2(h) => h.data_segment().map_or(0, |c| c.iv_tweak),
        }
    }

    /// Whether the data may be opened (decrypt, unlock for activation, write); an error naming
    /// the reason otherwise. Inspect never needs this: a header that cryptsetup reads is shown
    /// even when volcrypt cannot open its data. The accessors above (sector size, offsets)
    /// describe the data segment and are meaningful only when this returns Ok.
    pub fn check_activation_allowed(&self) -> Result<(), Error> {
        match self {
            Header::Luks1(_) => Ok(()),
            Header::Luks2(h) => h.check_activation_allowed(),
        }
    }

    /// Try keyslots (priority order; only `slot` if given). Unbound keyslots are never used.
    /// Returns the slot that accepted the passphrase and the verified volume key.
    pub fn unlock(
        &self,
        r: &mut (impl Read + Seek),
        passphrase: &[u8],
        slot: Option<u32>,
        limits: &KdfLimits,
    ) -> Result<(u32, SecretBytes), Error> {
        match self {
            Header::Luks1(h) => h.unlock(r, passphrase, slot, limits),
            Header::Luks2(h) => h.unlock(r, passphrase, slot, limits),
        }
    }

    /// Everything `image inspect` shows (serde::Serialize for --json; Display for text).
    pub fn summary(&self) -> Summary {
        match self {
            Header::Luks1(h) => h.summary(),
            Header::Luks2(h) => h.summary(),
        }
    }
}
