//! Opening the mapping of a new attachment, and formatting a blank device on its first attach.
//!
//! A device is formatted only when it carries no LUKS header and the signature probe finds
//! nothing on it, and nobody holds or opens it. A device that merely failed to open (wrong key,
//! I/O error, busy) is never formatted. One exception is made, and only for volcrypt's own
//! half-done work: a keyless LUKS header whose UUID the journal recorded for this very attach
//! before a crash (see [`interrupted_format`]).

use std::path::{Path, PathBuf};

use super::crypt::{self, Activation, AfterKdf, LuksVersion, NewHeader, Unlock};
use super::dm::DevNo;
use super::header::DeviceHeader;
use super::journal::{Phase, Record};
use super::probe::{self, Probe};
use super::system::System;
use super::timing::{AttachTimings, timed};
use super::{Context, Error, PerfFlags};
use crate::luks::Header;
use crate::request::{EncryptedPlan, ValidRequest, VolumeFormat};

/// Whether `real` holds the LUKS header an interrupted first attach of this volume was writing
/// when the agent died (killed between libcryptsetup's header write and its keyslot write): the
/// journal's record is an `attaching` first attach of this very device that never opened it,
/// the header carries the UUID that attach journaled, and no keyslot is in use. Its volume key
/// was never stored anywhere and no mapping ever wrote through it, so nothing on the device can
/// be read: formatting it again loses nothing. Anything else is refused as before.
fn interrupted_format(
    sys: &dyn System,
    real: &Path,
    devno: DevNo,
    prior: Option<&Record>,
) -> Result<bool, Error> {
    let Some(expected) = prior
        .filter(|p| p.phase == Phase::Attaching && !p.formatted && p.backing_devno == devno)
        .and_then(|p| p.format_uuid.as_deref())
    else {
        return Ok(false);
    };
    Ok(match sys.luks_uuid_and_keyslots(real)? {
        Some((uuid, in_use)) => !in_use && uuid.eq_ignore_ascii_case(expected),
        None => false,
    })
}

/// The device a new mapping is opened on.
pub(super) struct Target {
    pub(super) real: PathBuf,
    pub(super) devno: DevNo,
    pub(super) name: String,
    /// Its LUKS header as the attach's `prepare` read it, if it had one.
    pub(super) header: Option<DeviceHeader>,
}

/// What a first attach needs to format a blank device: the UUID journaled for the new header,
/// and the record the journal held before this attach (an interrupted predecessor's).
pub(super) struct Format<'a> {
    pub(super) uuid: Option<uuid::Uuid>,
    pub(super) prior: Option<&'a Record>,
}

/// What opening a new attachment's mapping did.
pub(super) struct Opened {
    /// The blank device was formatted first.
    pub(super) formatted: bool,
    /// For the client: the volume opened, but with a weak-but-real cipher.
    pub(super) warning: Option<String>,
}

/// Open (and on first attach, format) the mapping on `target`.
#[allow(clippy::too_many_arguments)]
pub(super) fn open_mapping(
    ctx: &Context<'_>,
    v: &ValidRequest,
    plan: &EncryptedPlan,
    target: &Target,
    passphrase: &[u8],
    flags: PerfFlags,
    format: Format<'_>,
    t: &mut AttachTimings,
) -> Result<Opened, Error> {
    let sys = &*ctx.sys;
    let real = target.real.as_path();
    let to = Activation {
        name: &target.name,
        flags,
        key_id: &plan.key_id,
        persistent: v.options.persistent,
        refresh: false,
        after_kdf: ctx
            .after_kdf
            .as_deref()
            .map(|f| AfterKdf(f as &(dyn Fn() + Sync))),
    };
    if plan.format == VolumeFormat::Plain {
        let warning = plan.weak_cipher.as_ref().map(|why| {
            tracing::warn!(device = %real.display(), volume_id = %v.volume_id, "opening plain dm-crypt with a weak cipher: {why}");
            format!("weak cipher: {why}")
        });
        let (cipher, bits) = (plan.cipher.as_deref(), plan.key_size);
        timed(&mut t.dm, || {
            sys.open_plain(real, cipher, bits, passphrase, to)
        })?;
        return Ok(Opened {
            formatted: false,
            warning,
        });
    }
    let warning = match &target.header {
        Some(h) => header_cipher_is_encryption(real, &v.volume_id, &h.header)?,
        None => None,
    };
    let header = target.header.as_ref().map(|h| h.header.clone());
    let redo = match sys.open_luks(real, header, passphrase, to, Unlock::Userspace, t) {
        Ok(true) => {
            return Ok(Opened {
                formatted: false,
                warning,
            });
        }
        Ok(false) => false,
        Err(e) if interrupted_format(sys, real, target.devno, format.prior)? => {
            tracing::warn!(device = %real.display(), error = %e, "LUKS header without a keyslot left by an interrupted first attach (its UUID is the journaled one): formatting it again");
            true
        }
        Err(e) => return Err(e),
    };
    // Not LUKS. Format only if nothing at all is recognizable on it and nobody uses it.
    if !redo && let Probe::Signature(found) = sys.probe(real, probe_expect(ctx, plan))? {
        return Err(Error::RefuseFormat {
            device: real.to_owned(),
            found,
        });
    }
    if let Some(why) = &plan.weak_cipher {
        return Err(Error::Crypt {
            op: "format",
            target: real.display().to_string(),
            detail: format!("refusing to format a new volume with this cipher: {why}"),
            kind: crate::kind::Kind::Invalid,
        });
    }
    let Some(uuid) = format.uuid else {
        return Err(Error::Crypt {
            op: "format",
            target: real.display().to_string(),
            detail: "no header UUID was journaled for this attach".into(),
            kind: crate::kind::Kind::Invalid,
        });
    };
    ensure_unused(sys, real, target.devno)?;
    kernel_runs(sys, real, plan)?;
    let (version, sector_size) = match plan.format {
        VolumeFormat::Luks2 => (
            LuksVersion::Luks2,
            v.options
                .sector_size
                .unwrap_or(ctx.config.luks2_sector_size),
        ),
        _ => (LuksVersion::Luks1, 512),
    };
    let new = NewHeader {
        uuid,
        version,
        cipher: plan.cipher.as_deref(),
        key_bits: plan.key_size,
        sector_size,
        pbkdf: ctx.config.pbkdf.as_ref(),
    };
    tracing::info!(device = %real.display(), format = %plan.format, "formatting blank device on first attach");
    format_and_open(sys, real, &new, passphrase, to, t)?;
    Ok(Opened {
        formatted: true,
        warning: None,
    })
}

/// Format the blank device `real` and open what was written; if the open fails, the format is
/// rolled back.
fn format_and_open(
    sys: &dyn System,
    real: &Path,
    new: &NewHeader<'_>,
    passphrase: &[u8],
    to: Activation<'_>,
    t: &mut AttachTimings,
) -> Result<(), Error> {
    timed(&mut t.format, || sys.format_luks(real, new, passphrase))?;
    // Just formatted by libcryptsetup: let it unlock what it wrote (first attach only).
    let opened = match injected("activate", real) {
        Some(e) => Err(e),
        None => sys.open_luks(real, None, passphrase, to, Unlock::Libcryptsetup, t),
    };
    let e = match opened {
        Ok(true) => return Ok(()),
        Ok(false) => Error::Crypt {
            op: "read LUKS header",
            target: real.display().to_string(),
            detail: "no LUKS header found right after formatting".into(),
            kind: crate::kind::Kind::Invalid,
        },
        Err(e) => e,
    };
    roll_back(sys, real, &new.uuid.to_string());
    Err(e)
}

/// Undo the format of a first attach that failed afterwards: the device was blank and the
/// header holds no data, so it is wiped, making the device blank again for the client's retry
/// (left in place, it would be refused or reported as a wrong key forever). Only a header with
/// the UUID this attach journaled is wiped; anything else is left and logged.
pub(super) fn roll_back(sys: &dyn System, device: &Path, uuid: &str) {
    match sys.wipe_own_header(device, uuid) {
        Ok(true) => {
            tracing::warn!(device = %device.display(), "the first attach failed after formatting: its new header was wiped, the device is blank again")
        }
        Ok(false) => {
            tracing::error!(device = %device.display(), "the first attach failed after formatting, but the header on the device is not the one it wrote: left alone")
        }
        Err(e) => {
            tracing::error!(device = %device.display(), error = %e, "the first attach failed after formatting and its new header could not be wiped")
        }
    }
}

/// An existing header whose data cipher is `cipher_null` is not an encrypted volume and is
/// refused as one; a weak-but-real cipher (ECB, a 64-bit block) still opens, so the user's
/// data is never stranded, with a warning (logged, and returned for the response).
fn header_cipher_is_encryption(
    real: &Path,
    volume_id: &str,
    h: &Header,
) -> Result<Option<String>, Error> {
    let Some(spec) = h.summary().cipher else {
        return Ok(None);
    };
    let (c, m) = crate::request::split_cipher(&spec).unwrap_or((spec.as_str(), ""));
    match crate::cipher_policy::judge(c, m) {
        crate::cipher_policy::Verdict::Null(why) => Err(Error::Crypt {
            op: "open",
            target: real.display().to_string(),
            detail: format!("not an encrypted volume: its LUKS header's cipher {why}"),
            kind: crate::kind::Kind::Invalid,
        }),
        crate::cipher_policy::Verdict::Weak(why) => {
            tracing::warn!(device = %real.display(), volume_id, cipher = %spec, "opening an existing volume with a weak cipher: {why}");
            Ok(Some(format!("weak cipher {spec}: {why}")))
        }
        crate::cipher_policy::Verdict::Accepted => Ok(None),
    }
}

/// The kernel must run the cipher with the key size, or the format is refused naming both
/// (instead of a bare "Input/output error" from libcryptsetup or dm-crypt).
fn kernel_runs(sys: &dyn System, real: &Path, plan: &EncryptedPlan) -> Result<(), Error> {
    let spec = plan.cipher.as_deref().unwrap_or(crypt::LUKS_DEFAULT_CIPHER);
    let Some((c, m)) = crate::request::split_cipher(spec) else {
        return Ok(());
    };
    let bits = crypt::format_key_bits(plan.cipher.as_deref(), plan.key_size);
    match sys.kernel_cipher(c, m, bits) {
        super::kcapi::Answer::Refused(why) => Err(Error::Crypt {
            op: "format",
            target: real.display().to_string(),
            detail: why,
            kind: crate::kind::Kind::Invalid,
        }),
        super::kcapi::Answer::Runs | super::kcapi::Answer::Unknown => Ok(()),
    }
}

/// What the probe must see before this plan's format: the LUKS header area it overwrites read
/// as zeros (unless the operator's `allow_nonzero_blank` says otherwise).
fn probe_expect(ctx: &Context<'_>, plan: &EncryptedPlan) -> probe::Expect {
    let key_bytes = u64::from(crypt::format_key_bits(plan.cipher.as_deref(), plan.key_size) / 8);
    probe::Expect {
        header_bytes: probe::header_area(plan.format == VolumeFormat::Luks2, key_bytes),
        allow_nonzero: ctx.config.allow_nonzero_blank,
    }
}

/// A device that is mounted, held by a mapping or opened exclusively is never formatted: an
/// `O_EXCL` open fails with EBUSY exactly then.
fn ensure_unused(sys: &dyn System, real: &Path, devno: DevNo) -> Result<(), Error> {
    let holders = sys.holders(devno);
    if !holders.is_empty() {
        return Err(Error::InUse {
            device: real.to_owned(),
            by: format!("held by {}", holders.join(", ")),
        });
    }
    sys.exclusive_open(real).map_err(|e| Error::InUse {
        device: real.to_owned(),
        by: format!("opened exclusively by another user: {e}"),
    })
}

/// The error of an injected fault at `point` (see [`super::test_fault`]), if one is asked for.
pub(super) fn injected(point: &'static str, target: &Path) -> Option<Error> {
    super::test_fault(point).then(|| Error::Crypt {
        op: point,
        target: target.display().to_string(),
        detail: format!("test fault injected (VOLCRYPT_TEST_FAIL_AT={point})"),
        kind: crate::kind::Kind::Invalid,
    })
}
