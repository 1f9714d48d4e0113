//! Tune: change the dm-crypt performance flags (`allow_discards`, `no_read_workqueue`,
//! `no_write_workqueue`) of an attached volume while it is in use, the way `cryptsetup refresh`
//! does, and optionally store them in its LUKS2 header so every later opener applies them.
//!
//! The rules: only the flags the request names change; the sector size never changes on a live
//! mapping; `persistent` needs a LUKS2 header (checked before anything changes); a flag the
//! kernel refuses leaves the mapping, the header and the journal as they were. The journal's
//! record (and the request it keeps for re-activation) follows the flags the kernel reports.

use serde::Serialize;

use super::crypt::{Activation, Plain};
use super::journal::Phase;
use super::{Context, Error, PerfFlags, links};
use crate::kind::Kind;
use crate::request::{self, NOT_PERSISTABLE, TuneRequest, VolumeFormat};

/// What a tune did. No key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TuneOutcome {
    pub volume_id: String,
    pub mapping_name: String,
    /// The mapping's flags before, as the kernel reported them.
    pub previous_flags: PerfFlags,
    /// The mapping's flags now, as the kernel reports them.
    pub flags: PerfFlags,
    /// The flags were stored in the LUKS2 header too.
    pub persistent: bool,
}

/// Apply `req` to the active mapping of `volume_id`, under the volume's lock.
pub fn tune(ctx: &Context<'_>, volume_id: &str, req: &TuneRequest) -> Result<TuneOutcome, Error> {
    request::check_volume_id(volume_id)?;
    req.validate()?;
    let journal = ctx.journal();
    let (_lock, mut record) = journal.lock_record(volume_id)?;
    let name = record.mapping_name.clone();
    let refuse = |detail: String| Error::Crypt {
        op: "tune",
        target: volume_id.to_owned(),
        detail,
        kind: Kind::Invalid,
    };
    if record.phase != Phase::Attached {
        return Err(refuse(format!(
            "the volume is {}, not attached: only an attached volume's mapping is tuned",
            record.phase
        )));
    }
    let sys = &*ctx.sys;
    let not_active = |why: &str| Error::NoDevice {
        path: links::mapper_path(&name),
        detail: format!(" ({why})"),
    };
    let info = sys
        .dm_info(&name)?
        .ok_or_else(|| not_active("the mapping is not active"))?;
    // libcryptsetup is never asked about a mapping whose backing device vanished.
    let backing = match info.deps.as_slice() {
        [d] if sys.exists(*d) => *d,
        _ => return Err(not_active("its backing device is gone")),
    };
    let device = sys
        .dev_path(backing)
        .ok_or_else(|| not_active("its backing device is gone"))?;
    let active = sys
        .active_info(&name)?
        .ok_or_else(|| not_active("the mapping is not active"))?;
    if req.persistent && active.kind != "LUKS2" {
        return Err(refuse(format!(
            "the volume is {}: {NOT_PERSISTABLE}",
            active.kind
        )));
    }
    let previous = active.flags;
    let wanted = previous.with(req);
    let passphrase = ctx
        .keys
        .get(&record.key_id)
        .map_err(|source| Error::Key {
            key_id: record.key_id.clone(),
            source,
        })?
        .passphrase();
    let plain = (record.format == VolumeFormat::Plain).then_some(Plain {
        cipher: record.cipher.as_deref(),
        key_bits: record.key_size,
    });
    let to = |flags: PerfFlags, persistent: bool| Activation {
        name: &name,
        flags,
        key_id: &record.key_id,
        persistent,
        refresh: true,
        after_kdf: None,
    };
    sys.refresh(
        &device,
        plain,
        passphrase.expose(),
        to(wanted, req.persistent),
    )?;
    let now = sys.active_info(&name)?.map_or(wanted, |a| a.flags);
    let mut tuned = record.clone();
    tuned.flags = now;
    if let Some(r) = tuned.request.as_mut() {
        // A re-activation (reboot, crash) runs the stored request: it opens with these flags.
        r.options.allow_discards = Some(now.allow_discards);
        r.options.no_read_workqueue = Some(now.no_read_workqueue);
        r.options.no_write_workqueue = Some(now.no_write_workqueue);
    }
    if let Err(e) = journal.tuned(&tuned) {
        // The journal must not disagree with the mapping: put the old flags back.
        if let Err(back) = sys.refresh(&device, plain, passphrase.expose(), to(previous, false)) {
            tracing::error!(mapping = %name, error = %back, "the journal could not record the new flags and the old ones could not be put back");
        }
        return Err(e);
    }
    record = tuned;
    tracing::info!(mapping = %name, flags = ?record.flags.names(), persistent = req.persistent, "performance flags changed");
    Ok(TuneOutcome {
        volume_id: volume_id.to_owned(),
        mapping_name: name,
        previous_flags: previous,
        flags: record.flags,
        persistent: req.persistent,
    })
}
