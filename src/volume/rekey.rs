//! `volcrypt rekey`: give a journaled LUKS volume a new key from the key manager, as Cinder
//! does for a volume created from an encrypted image (`cryptsetup luksChangeKey`): the volume
//! key and the data stay; the keyslot the old key opens is replaced by one the new key opens.
//! Online: the mapping is never touched.
//!
//! The order makes every crash point safe — at each one the key the journal names opens the
//! volume: add a keyslot for the new key (the journal still names the old key, which still
//! opens it), check that the new key opens it, journal the new key (both open it now), remove
//! the old key's keyslot, then journal the rekey as finished. Running the same rekey again
//! finishes an interrupted one; a different new key is refused until it is finished.

use std::path::Path;

use serde::Serialize;

use super::journal::{PendingRekey, Phase, Record};
use super::{Context, Error};
use crate::keys::Secret;
use crate::kind::Kind;
use crate::request::{self, VolumeFormat};
use crate::secret::SecretBytes;

/// What a rekey did (printed as JSON; no key material).
#[derive(Debug, Clone, Serialize)]
pub struct RekeyOutcome {
    pub volume_id: String,
    /// The key the volume opens with now.
    pub key_id: String,
    pub previous_key_id: String,
    /// The keyslot the new key opens.
    pub keyslot: u32,
    /// The keyslot removed (the old key's); `None` when the old and new keys are the same
    /// passphrase, or it was gone already.
    pub removed_keyslot: Option<u32>,
    /// This call finished a rekey that an earlier one had started.
    pub resumed: bool,
}

/// Rekey `volume_id` to the secret `new_key_id` (see the module doc for the order of steps).
pub fn rekey(ctx: &Context<'_>, volume_id: &str, new_key_id: &str) -> Result<RekeyOutcome, Error> {
    request::check_volume_id(volume_id)?;
    let journal = ctx.journal();
    let (_lock, mut record) = journal.lock_record(volume_id)?;
    let device = rekeyable(ctx, &record)?;

    if let Some(pending) = record.rekey.clone() {
        if record.key_id != new_key_id {
            return Err(refused(format!(
                "volume {volume_id}: the rekey from key {} to key {} is unfinished; run \
                 `volcrypt rekey {volume_id} --new-key-id {}` to finish it first",
                pending.old_key_id, record.key_id, record.key_id
            )));
        }
        let new = secret(ctx, new_key_id)?.passphrase();
        return finish(ctx, &mut record, &device, &pending, &new, None);
    }
    if record.key_id == new_key_id {
        return Err(refused(format!(
            "volume {volume_id} already opens with key {new_key_id}: nothing to change"
        )));
    }

    let old = secret(ctx, &record.key_id)?.passphrase();
    let new_secret = secret(ctx, new_key_id)?;
    let new = new_secret.passphrase();
    let sys = &*ctx.sys;
    let old_keyslot = sys
        .keyslot_for(&device, old.expose())?
        .ok_or_else(|| Error::WrongKey {
            key_id: record.key_id.clone(),
            device: device.clone(),
        })?;
    // A keyslot the new key already opens: an earlier rekey to this key crashed before it
    // journaled it (or both secrets give the same passphrase). Reused, never added twice.
    let new_keyslot = match sys.keyslot_for(&device, new.expose())? {
        Some(slot) => slot,
        None => {
            let slot = sys.add_keyslot(
                &device,
                old.expose(),
                new.expose(),
                ctx.config.pbkdf.as_ref(),
            )?;
            super::test_pause("rekey-added");
            if sys.keyslot_for(&device, new.expose())? != Some(slot) {
                return Err(Error::Crypt {
                    op: "rekey",
                    target: device.display().to_string(),
                    detail: format!(
                        "keyslot {slot} was added for key {new_key_id} but the key does not \
                         open it; the journal still names key {}",
                        record.key_id
                    ),
                    kind: Kind::Invalid,
                });
            }
            slot
        }
    };

    let pending = PendingRekey {
        old_key_id: record.key_id.clone(),
        old_keyslot,
        new_keyslot,
    };
    set_key(&mut record, new_key_id, &new_secret);
    record.rekey = Some(pending.clone());
    journal.rekeyed(&record)?;
    super::test_pause("rekey-journaled");
    finish(ctx, &mut record, &device, &pending, &new, Some(new_keyslot))
}

/// Remove the old key's keyslot (if it is not also the new key's and is still there) once the
/// new key is checked to open the volume, then clear the pending rekey from the record.
fn finish(
    ctx: &Context<'_>,
    record: &mut Record,
    device: &Path,
    pending: &PendingRekey,
    new: &SecretBytes,
    checked: Option<u32>,
) -> Result<RekeyOutcome, Error> {
    let sys = &*ctx.sys;
    // `checked`: this call has just seen the new key open that keyslot (no second KDF); a
    // resumed rekey checks it here, before removing anything.
    let resumed = checked.is_none();
    let opens = match checked {
        Some(slot) => Some(slot),
        None => sys.keyslot_for(device, new.expose())?,
    };
    if opens.is_none() {
        return Err(Error::WrongKey {
            key_id: record.key_id.clone(),
            device: device.to_owned(),
        });
    }
    let removed = if pending.old_keyslot != pending.new_keyslot
        && Some(pending.old_keyslot) != opens
        && sys.keyslot_in_use(device, pending.old_keyslot)?
    {
        sys.destroy_keyslot(device, pending.old_keyslot)?;
        super::test_pause("rekey-removed");
        Some(pending.old_keyslot)
    } else {
        None
    };
    record.rekey = None;
    ctx.journal().rekeyed(record)?;
    super::consumers::detached(ctx, &pending.old_key_id, &record.volume_id);
    super::consumers::attached(ctx, &record.key_id, &record.volume_id);
    tracing::info!(volume = %record.volume_id, key_id = %record.key_id, "volume rekeyed");
    Ok(RekeyOutcome {
        volume_id: record.volume_id.clone(),
        key_id: record.key_id.clone(),
        previous_key_id: pending.old_key_id.clone(),
        keyslot: opens.unwrap_or(pending.new_keyslot),
        removed_keyslot: removed,
        resumed,
    })
}

/// The backing device of a record that can be rekeyed: a LUKS volume, attached (no half-done
/// operation), its device present and still the one the journal names.
fn rekeyable(ctx: &Context<'_>, record: &Record) -> Result<std::path::PathBuf, Error> {
    let id = &record.volume_id;
    if record.format == VolumeFormat::Plain {
        return Err(refused(format!(
            "volume {id} is plain dm-crypt: its key is the hashed passphrase itself, with no \
             keyslot to replace; changing it means re-encrypting the data"
        )));
    }
    if record.phase != Phase::Attached {
        return Err(refused(format!(
            "volume {id} is {}: rekey needs an attached volume (finish or reconcile the \
             pending operation first)",
            record.phase
        )));
    }
    let device = record.backing_device.clone();
    let present = ctx.sys.devno_of(&device).ok() == Some(record.backing_devno);
    if !present {
        return Err(Error::NoDevice {
            path: device,
            detail: " (the volume's backing device is not the one its record names)".into(),
        });
    }
    Ok(device)
}

fn secret(ctx: &Context<'_>, key_id: &str) -> Result<Secret, Error> {
    ctx.keys.get(key_id).map_err(|source| Error::Key {
        key_id: key_id.to_owned(),
        source,
    })
}

/// Point the record (and the request it re-attaches with after a reboot) at `new_key_id`.
fn set_key(record: &mut Record, new_key_id: &str, secret: &Secret) {
    record.key_id = new_key_id.to_owned();
    record.derivation = Record::derivation_of(secret.secret_type.derivation());
    if let Some(meta) = record.request.as_mut().and_then(|r| r.encryption.as_mut()) {
        meta.encryption_key_id = Some(new_key_id.to_owned());
    }
}

fn refused(detail: String) -> Error {
    Error::Refused { detail }
}
