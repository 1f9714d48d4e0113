//! Opening the mapping of a new attachment, and formatting a blank device on its first attach.
//!
//! A device is formatted only when it carries no LUKS header and the signature probe finds
//! nothing on it, and nobody holds or opens it. A device that merely failed to open (wrong key,
//! I/O error, busy) is never formatted. One exception is made, and only for volcrypt's own
//! half-done work: a keyless LUKS header whose UUID the journal recorded for this very attach
//! before a crash (see [`interrupted_format`]).

use std::path::Path;

use super::crypt::{self, LuksVersion, Unlock};
use super::dm::DevNo;
use super::journal::{Phase, Record};
use super::probe::{self, Probe};
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
fn interrupted_format(real: &Path, devno: DevNo, prior: Option<&Record>) -> Result<bool, Error> {
    let Some(expected) = prior
        .filter(|p| p.phase == Phase::Attaching && !p.formatted && p.backing_devno == devno)
        .and_then(|p| p.format_uuid.as_deref())
    else {
        return Ok(false);
    };
    Ok(match crypt::luks_uuid_and_keyslots(real)? {
        Some((uuid, in_use)) => !in_use && uuid.eq_ignore_ascii_case(expected),
        None => false,
    })
}

/// What a first attach needs to format a blank device: the UUID journaled for the new header,
/// and the record the journal held before this attach (an interrupted predecessor's).
pub(super) struct Format<'a> {
    pub(super) uuid: Option<uuid::Uuid>,
    pub(super) prior: Option<&'a Record>,
}

/// Open (and on first attach, format) the mapping. Returns whether the device was formatted.
#[allow(clippy::too_many_arguments)]
pub(super) fn open_mapping(
    ctx: &Context<'_>,
    v: &ValidRequest,
    plan: &EncryptedPlan,
    real: &Path,
    devno: DevNo,
    name: &str,
    header: Option<Header>,
    passphrase: &[u8],
    flags: PerfFlags,
    format: Format<'_>,
    t: &mut AttachTimings,
) -> Result<bool, Error> {
    if plan.format == VolumeFormat::Plain {
        if let Some(why) = &plan.weak_cipher {
            tracing::warn!(device = %real.display(), volume_id = %v.volume_id, "opening plain dm-crypt with a weak cipher: {why}");
        }
        timed(&mut t.dm, || {
            crypt::open_plain(
                real,
                name,
                plan.cipher.as_deref(),
                plan.key_size,
                passphrase,
                flags,
            )
        })?;
        return Ok(false);
    }
    if let Some(h) = &header {
        header_cipher_is_encryption(real, &v.volume_id, h)?;
    }
    let how = Unlock::Userspace;
    let redo = match crypt::open_luks(real, name, header, passphrase, flags, &plan.key_id, how, t) {
        Ok(true) => return Ok(false),
        Ok(false) => false,
        Err(e) if interrupted_format(real, devno, format.prior)? => {
            tracing::warn!(device = %real.display(), error = %e, "LUKS header without a keyslot left by an interrupted first attach (its UUID is the journaled one): formatting it again");
            true
        }
        Err(e) => return Err(e),
    };
    // Not LUKS. Format only if nothing at all is recognizable on it and nobody uses it.
    if !redo && let Probe::Signature(found) = probe::probe(real, probe_expect(ctx, plan))? {
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
    ensure_unused(real, devno)?;
    kernel_runs(real, plan)?;
    let (version, sector) = match plan.format {
        VolumeFormat::Luks2 => (
            LuksVersion::Luks2,
            v.options
                .sector_size
                .unwrap_or(ctx.config.luks2_sector_size),
        ),
        _ => (LuksVersion::Luks1, 512),
    };
    tracing::info!(device = %real.display(), format = %plan.format, "formatting blank device on first attach");
    timed(&mut t.format, || {
        crypt::format_luks(
            real,
            uuid,
            version,
            plan.cipher.as_deref(),
            plan.key_size,
            sector,
            ctx.config.pbkdf.as_ref(),
            passphrase,
        )
    })?;
    // Just formatted by libcryptsetup: let it unlock what it wrote (first attach only).
    let how = Unlock::Libcryptsetup;
    if !crypt::open_luks(real, name, None, passphrase, flags, &plan.key_id, how, t)? {
        return Err(Error::Crypt {
            op: "read LUKS header",
            target: real.display().to_string(),
            detail: "no LUKS header found right after formatting".into(),
            kind: crate::kind::Kind::Invalid,
        });
    }
    Ok(true)
}

/// An existing header whose data cipher is `cipher_null` is not an encrypted volume and is
/// refused as one; a weak-but-real cipher (ECB, a 64-bit block) still opens, so the user's
/// data is never stranded, with a warning.
fn header_cipher_is_encryption(real: &Path, volume_id: &str, h: &Header) -> Result<(), Error> {
    let Some(spec) = h.summary().cipher else {
        return Ok(());
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
            Ok(())
        }
        crate::cipher_policy::Verdict::Accepted => Ok(()),
    }
}

/// The kernel must run the cipher with the key size, or the format is refused naming both
/// (instead of a bare "Input/output error" from libcryptsetup or dm-crypt).
fn kernel_runs(real: &Path, plan: &EncryptedPlan) -> Result<(), Error> {
    let spec = plan.cipher.as_deref().unwrap_or(crypt::LUKS_DEFAULT_CIPHER);
    let Some((c, m)) = crate::request::split_cipher(spec) else {
        return Ok(());
    };
    let bits = crypt::format_key_bits(plan.cipher.as_deref(), plan.key_size);
    match super::kcapi::check(c, m, bits) {
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
fn ensure_unused(real: &Path, devno: DevNo) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let holders = devno.holders();
    if !holders.is_empty() {
        return Err(Error::InUse {
            device: real.to_owned(),
            by: format!("held by {}", holders.join(", ")),
        });
    }
    const O_EXCL: i32 = 0o200;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_EXCL)
        .open(real)
    {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::InUse {
            device: real.to_owned(),
            by: format!("opened exclusively by another user: {e}"),
        }),
    }
}
