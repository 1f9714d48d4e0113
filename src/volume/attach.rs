//! The attach controller: attach, detach, extend and status, with the safety rules of issue 3
//! (never format a device that holds anything, never touch a mapping that is not ours, nothing
//! half-done after a failure).
//!
//! Each function is a plain blocking call taking a [`Context`]; the CLI calls them directly and
//! the RPC will call them from worker threads.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::crypt::{self, Closed, LuksVersion, Unlock};
use super::dm::{self, DevNo, Dm};
use super::links;
use super::probe::{self, Probe};
use super::state::{self, Phase, Record};
use super::timing::{AttachTimings, DetachTimings, timed};
use super::{Context, Error, PerfFlags, test_pause};
use crate::request::{self, AttachRequest, EncryptedPlan, Plan, ValidRequest, VolumeFormat};

/// The result of an attach, as the CLI prints it and the RPC returns it. No key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachOutcome {
    pub volume_id: String,
    /// false: the raw device is used (back-end encryption, NoOp, no metadata).
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping_name: Option<String>,
    /// The device the guest should get: `/dev/mapper/<name>`, or the raw device.
    pub device: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable_link: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_device: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<VolumeFormat>,
    /// volcrypt formatted the (blank) device during this attach.
    pub formatted: bool,
    /// The volume was already attached to this device; the existing mapping was returned.
    pub already_attached: bool,
    /// A stale mapping (backing device gone, unused) was replaced.
    pub replaced_stale: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_manager: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub derivation: Option<String>,
    pub flags: PerfFlags,
    /// What happened to `device_path`: `replaced`, `already points at the mapping`,
    /// `not replaced: …`.
    pub device_link: String,
    /// Where the engine spent its time (for metrics and logs; not part of the API's JSON).
    #[serde(skip)]
    pub timings: AttachTimings,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DetachOutcome {
    pub volume_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping_name: Option<String>,
    /// false: the mapping was not active (success, like cryptsetup's exit 4 in os-brick).
    pub was_active: bool,
    pub waited_ms: u128,
    pub note: String,
    /// Where the engine spent its time (for metrics and logs; not part of the API's JSON).
    #[serde(skip)]
    pub timings: DetachTimings,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtendOutcome {
    pub volume_id: String,
    pub mapping_name: String,
    pub old_size_bytes: u64,
    pub new_size_bytes: u64,
    pub backing_size_bytes: u64,
}

/// One managed volume, as `status` shows it. Never key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeStatus {
    pub volume_id: String,
    pub mapping_name: String,
    pub active: bool,
    pub device_path: PathBuf,
    pub backing_device: PathBuf,
    pub backing_devno: DevNo,
    pub backing_present: bool,
    /// Active, but the backing device is gone.
    pub stale: bool,
    pub format: VolumeFormat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_bits: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sector_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    pub key_manager: String,
    pub key_id: String,
    pub derivation: String,
    /// Flags of the active mapping as the kernel reports them (the requested ones if inactive).
    pub flags: Vec<&'static str>,
    pub volume_key_in_keyring: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_count: Option<i32>,
    pub holders: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable_link: Option<PathBuf>,
    pub stable_link_ok: bool,
    pub formatted_by_volcrypt: bool,
    /// The journal phase of the record: `attached`, a half-done `attaching`/`detaching`, or
    /// `waiting`/`lost` when its device went away.
    pub phase: Phase,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Attach a volume: validate the request, then open (formatting a provably blank device on
/// first attach), link and record it. Already attached to the same device: the existing
/// mapping is returned and its links re-asserted.
pub fn attach(ctx: &Context<'_>, req: &AttachRequest) -> Result<AttachOutcome, Error> {
    let started = Instant::now();
    let mut t = AttachTimings::default();
    let v = req.validate()?;
    let plan = match &v.plan {
        Plan::Raw { reason } => {
            tracing::info!(volume_id = %v.volume_id, %reason, "attaching raw device without dm-crypt");
            return Ok(AttachOutcome {
                volume_id: v.volume_id.clone(),
                encrypted: false,
                raw_reason: Some(reason.clone()),
                mapping_name: None,
                device: v.device_path.clone(),
                stable_link: None,
                backing_device: None,
                format: None,
                formatted: false,
                already_attached: false,
                replaced_stale: false,
                key_manager: None,
                key_id: None,
                derivation: None,
                flags: PerfFlags::default(),
                device_link: "not replaced: no dm-crypt".into(),
                timings: AttachTimings::default(),
            });
        }
        Plan::Encrypted(e) => e.clone(),
    };
    let dm = Dm::open()?;
    let real = std::fs::canonicalize(&v.device_path).map_err(|e| Error::NoDevice {
        path: v.device_path.clone(),
        detail: format!(": {e}"),
    })?;
    let devno = dm::devno_of(&real)?;

    // os-brick reuses an active mapping with the legacy (unprefixed) name.
    let mut name = v.mapping_name.clone();
    if let Some(legacy) = request::legacy_mapping_name(&v.device_path)
        && dm.info(&legacy)?.is_some()
    {
        name = legacy;
    }
    tracing::Span::current().record("mapping", name.as_str());

    // device_path may already point at our mapping (its link was replaced on a first attach):
    // then the device the request means is the mapping's backing device.
    let mut backing = (real.clone(), devno);
    let mut replaced_stale = false;
    if let Some(info) = dm.info(&name)? {
        let points_at_mapping = info.devno == devno;
        if points_at_mapping || info.deps.contains(&devno) {
            // The mapping is ours for another volume id: handing it to this one as well would
            // let a detach of either close the other's device.
            if let Some(owner) = state::list(&ctx.config.state_dir)?
                .into_iter()
                .find(|r| r.mapping_name == name && r.volume_id != v.volume_id)
            {
                return Err(Error::OwnedByOther {
                    device: v.device_path.clone(),
                    name,
                    owner: owner.volume_id,
                    requested: v.volume_id.clone(),
                });
            }
            if points_at_mapping && let Some(d) = info.deps.first() {
                backing = (
                    d.dev_path().unwrap_or_else(|| PathBuf::from(d.to_string())),
                    *d,
                );
            }
            return finish_existing(ctx, req, &v, &plan, &name, backing);
        }
        let gone = !info.deps.is_empty() && info.deps.iter().all(|d| !d.exists());
        let held_by = info
            .deps
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",");
        if gone {
            if info.open_count != 0 {
                return Err(Error::StaleBusy {
                    name,
                    backing: held_by,
                    open_count: info.open_count,
                });
            }
            tracing::warn!(mapping = %name, backing = %held_by, "replacing stale mapping whose backing device is gone");
            if !dm.remove(&name)? {
                return Err(Error::StaleBusy {
                    name,
                    backing: held_by,
                    open_count: info.open_count,
                });
            }
            replaced_stale = true;
        } else {
            return Err(Error::NameConflict {
                name,
                held_by: if held_by.is_empty() {
                    "no device".into()
                } else {
                    held_by
                },
                requested: format!("{} ({devno})", real.display()),
            });
        }
    }
    if let Some(other) = dm::dm_name_of(devno) {
        // device_path resolves to some other dm device (e.g. multipath): fine, it is the
        // backing device. Logged for the operator.
        tracing::debug!(device = %real.display(), dm_name = %other, "backing device is a dm device");
    }

    let secret =
        timed(&mut t.key_fetch, || ctx.keys.get(&plan.key_id)).map_err(|source| Error::Key {
            key_id: plan.key_id.clone(),
            source,
        })?;
    let derivation = secret.secret_type.derivation();
    let passphrase = secret.passphrase();
    drop(secret);
    let flags = PerfFlags::resolve(&ctx.config, &v.options);
    let mapper = links::mapper_path(&name);
    let stable = links::stable_link_path(&ctx.config.by_id_dir, &v.volume_id);

    // Journal the attachment before the mapping exists: a crash from here on leaves an
    // `attaching` record that the start-up reconcile finishes. The record already names where
    // device_path points now, so a crash right after the link is replaced can still restore it.
    let prior = state::load(&ctx.config.state_dir, &v.volume_id)?;
    let prior_previous = prior.as_ref().and_then(|p| p.device_link_previous.clone());
    let planned_previous = if v.options.replace_device_symlink
        && links::is_replaceable(&v.device_path)
        && links::read_link(&v.device_path).as_deref() != Some(mapper.as_path())
    {
        links::read_link(&v.device_path)
    } else {
        prior_previous.clone()
    };
    let format_uuid = match plan.format {
        VolumeFormat::Plain => None,
        _ => Some(crypt::new_header_uuid()?),
    };
    let mut record = Record {
        volume_id: v.volume_id.clone(),
        mapping_name: name.clone(),
        device_path: v.device_path.clone(),
        backing_device: real.clone(),
        backing_devno: devno,
        format: plan.format,
        cipher: plan.cipher.clone(),
        key_size: plan.key_size,
        key_manager: ctx.keys.kind().to_owned(),
        key_id: plan.key_id.clone(),
        derivation: derivation.to_string(),
        flags,
        formatted: false,
        stable_link: Some(stable.clone()),
        device_link_previous: planned_previous,
        attached_at: now_secs(),
        phase: Phase::Attaching,
        format_uuid: format_uuid.map(|u| u.to_string()),
        request: Some(req.clone()),
    };
    timed(&mut t.journal, || journal(ctx, &record))?;
    test_pause("attaching");
    let formatted = match open_mapping(
        ctx,
        &v,
        &plan,
        &real,
        devno,
        &name,
        passphrase.expose(),
        flags,
        Format {
            uuid: format_uuid,
            prior: prior.as_ref(),
        },
        &mut t,
    ) {
        Ok(f) => f,
        Err(e) => {
            restore_record(ctx, &v.volume_id, prior);
            return Err(e);
        }
    };

    // From here on the mapping exists: any failure closes it and undoes the links.
    let mut undo = Undo {
        name: name.clone(),
        links: Vec::new(),
    };
    let result = (|| -> Result<AttachOutcome, Error> {
        if formatted {
            // Journal the format at once, so a crash before the record says `attached` does
            // not forget that volcrypt formatted this device (first attaches only).
            record.formatted = true;
            timed(&mut t.journal, || journal(ctx, &record))?;
        }
        test_pause("opened");
        let links_started = Instant::now();
        let prev_stable = links::set_symlink(&stable, &mapper)?;
        undo.links.push((stable.clone(), prev_stable));
        let (device_link, previous) = replace_device_link(&v, &mapper)?;
        if device_link == "replaced" {
            undo.links.push((v.device_path.clone(), previous.clone()));
        }
        t.links += links_started.elapsed();
        record.formatted = formatted;
        record.device_link_previous = previous.or(prior_previous);
        test_pause("linked");
        record.phase = Phase::Attached;
        timed(&mut t.journal, || journal(ctx, &record))?;
        t.total = started.elapsed();
        t.log(&v.volume_id);
        Ok(AttachOutcome {
            volume_id: v.volume_id.clone(),
            encrypted: true,
            raw_reason: None,
            mapping_name: Some(name.clone()),
            device: mapper.clone(),
            stable_link: Some(stable.clone()),
            backing_device: Some(real.clone()),
            format: Some(plan.format),
            formatted,
            already_attached: false,
            replaced_stale,
            key_manager: Some(record.key_manager),
            key_id: Some(plan.key_id.clone()),
            derivation: Some(record.derivation),
            flags,
            device_link,
            timings: t,
        })
    })();
    match result {
        Ok(o) => Ok(o),
        Err(e) => {
            undo.run();
            restore_record(ctx, &v.volume_id, prior);
            Err(e)
        }
    }
}

/// After a failed attach, put back the record that was there before it (a desired attachment
/// is never lost to a failed retry), or remove the `attaching` one.
fn restore_record(ctx: &Context<'_>, volume_id: &str, prior: Option<Record>) {
    let r = match prior {
        Some(p) => state::save(&ctx.config.state_dir, &p),
        None => state::remove(&ctx.config.state_dir, volume_id),
    };
    if let Err(e) = r {
        tracing::error!(volume_id, error = %e, "rollback could not restore the state record");
    }
}

/// Write a journal record and note its mapping and phase on the current tracing span (the
/// request's span under `volcrypt serve`), so every later log line of the request carries them.
fn journal(ctx: &Context<'_>, record: &Record) -> Result<(), Error> {
    state::save(&ctx.config.state_dir, record)?;
    trace_phase(&record.mapping_name, &record.phase.to_string());
    tracing::debug!(mapping = %record.mapping_name, phase = %record.phase, "journal record written");
    Ok(())
}

/// Note a mapping and its phase on the current span (no-op outside a request).
fn trace_phase(mapping: &str, phase: &str) {
    tracing::Span::current()
        .record("mapping", mapping)
        .record("phase", phase);
}

/// Bring the links of an active, recorded mapping back in line with its record (start-up
/// reconcile): the stable link, and `device_path` when the attachment replaced it. Marks the
/// record `attached`. Returns what was changed (empty: nothing needed).
pub fn repair_links(ctx: &Context<'_>, record: &Record) -> Result<Vec<String>, Error> {
    let mapper = links::mapper_path(&record.mapping_name);
    let stable = links::stable_link_path(&ctx.config.by_id_dir, &record.volume_id);
    let mut changed = Vec::new();
    let mut r = record.clone();
    if links::read_link(&stable).as_deref() != Some(mapper.as_path()) {
        links::set_symlink(&stable, &mapper)?;
        changed.push(format!("{} -> {}", stable.display(), mapper.display()));
    }
    r.stable_link = Some(stable);
    let replace = match &record.request {
        Some(req) => req.options.replace_device_symlink,
        None => record.device_link_previous.is_some(),
    };
    if replace
        && links::is_replaceable(&record.device_path)
        && links::read_link(&record.device_path).as_deref() != Some(mapper.as_path())
    {
        let previous = links::set_symlink(&record.device_path, &mapper)?;
        if r.device_link_previous.is_none() {
            r.device_link_previous = previous;
        }
        changed.push(format!(
            "{} -> {}",
            record.device_path.display(),
            mapper.display()
        ));
    }
    if r.phase != Phase::Attached {
        changed.push(format!("record {} -> attached", r.phase));
        r.phase = Phase::Attached;
    }
    if r != *record {
        state::save(&ctx.config.state_dir, &r)?;
    }
    Ok(changed)
}

/// Rollback of a half-done attach: restore or remove the links we set, close the mapping.
struct Undo {
    name: String,
    links: Vec<(PathBuf, Option<PathBuf>)>,
}

impl Undo {
    fn run(self) {
        let mapper = links::mapper_path(&self.name);
        for (link, previous) in self.links.into_iter().rev() {
            let r = match previous {
                Some(p) => links::restore_if_points_to(&link, &mapper, &p),
                None => links::remove_if_points_to(&link, &mapper),
            };
            if let Err(e) = r {
                tracing::error!(link = %link.display(), error = %e, "rollback could not restore link");
            }
        }
        match crypt::close(&self.name) {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(mapping = %self.name, error = %e, "rollback could not close mapping")
            }
        }
    }
}

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
struct Format<'a> {
    uuid: Option<uuid::Uuid>,
    prior: Option<&'a Record>,
}

/// Open (and on first attach, format) the mapping. Returns whether the device was formatted.
#[allow(clippy::too_many_arguments)]
fn open_mapping(
    ctx: &Context<'_>,
    v: &ValidRequest,
    plan: &EncryptedPlan,
    real: &Path,
    devno: DevNo,
    name: &str,
    passphrase: &[u8],
    flags: PerfFlags,
    format: Format<'_>,
    t: &mut AttachTimings,
) -> Result<bool, Error> {
    if plan.format == VolumeFormat::Plain {
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
    let how = Unlock::Userspace;
    let redo = match crypt::open_luks(real, name, passphrase, flags, &plan.key_id, how, t) {
        Ok(true) => return Ok(false),
        Ok(false) => false,
        Err(e) if interrupted_format(real, devno, format.prior)? => {
            tracing::warn!(device = %real.display(), error = %e, "LUKS header without a keyslot left by an interrupted first attach (its UUID is the journaled one): formatting it again");
            true
        }
        Err(e) => return Err(e),
    };
    // Not LUKS. Format only if nothing at all is recognizable on it and nobody uses it.
    if !redo && let Probe::Signature(found) = probe::probe(real)? {
        return Err(Error::RefuseFormat {
            device: real.to_owned(),
            found,
        });
    }
    let Some(uuid) = format.uuid else {
        return Err(Error::Crypt {
            op: "format",
            target: real.display().to_string(),
            detail: "no header UUID was journaled for this attach".into(),
            status: crate::error::ExitStatus::Invalid,
        });
    };
    ensure_unused(real, devno)?;
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
    if !crypt::open_luks(real, name, passphrase, flags, &plan.key_id, how, t)? {
        return Err(Error::Crypt {
            op: "read LUKS header",
            target: real.display().to_string(),
            detail: "no LUKS header found right after formatting".into(),
            status: crate::error::ExitStatus::Invalid,
        });
    }
    Ok(true)
}

/// A device that is mounted, held by a mapping or opened exclusively is never formatted: an
/// `O_EXCL` open fails with EBUSY exactly then.
fn ensure_unused(real: &Path, devno: DevNo) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let holders = devno.holders();
    if !holders.is_empty() {
        return Err(Error::RefuseFormat {
            device: real.to_owned(),
            found: format!("holders ({})", holders.join(", ")),
        });
    }
    const O_EXCL: i32 = 0o200;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_EXCL)
        .open(real)
    {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::RefuseFormat {
            device: real.to_owned(),
            found: format!("a user (exclusive open failed: {e})"),
        }),
    }
}

/// Point `device_path` at the mapping when asked and when it is a symlink.
fn replace_device_link(
    v: &ValidRequest,
    mapper: &Path,
) -> Result<(String, Option<PathBuf>), Error> {
    if !v.options.replace_device_symlink {
        return Ok(("not replaced: replace_device_symlink is false".into(), None));
    }
    let current = links::read_link(&v.device_path);
    if current.as_deref() == Some(mapper) {
        return Ok(("already points at the mapping".into(), None));
    }
    if !links::is_replaceable(&v.device_path) {
        return Ok((
            "not replaced: device_path is not a symlink (a device node is never replaced)".into(),
            None,
        ));
    }
    let previous = links::set_symlink(&v.device_path, mapper)?;
    Ok(("replaced".into(), previous))
}

/// The volume is already attached to the requested device: re-assert links, make sure a
/// record exists, and return the existing mapping.
fn finish_existing(
    ctx: &Context<'_>,
    req: &AttachRequest,
    v: &ValidRequest,
    plan: &EncryptedPlan,
    name: &str,
    backing: (PathBuf, DevNo),
) -> Result<AttachOutcome, Error> {
    let mapper = links::mapper_path(name);
    let stable = links::stable_link_path(&ctx.config.by_id_dir, &v.volume_id);
    links::set_symlink(&stable, &mapper)?;
    let (device_link, previous) = replace_device_link(v, &mapper)?;
    let existing = state::load(&ctx.config.state_dir, &v.volume_id)?;
    let info = crypt::active_info(name)?;
    let flags = info.as_ref().map(|i| i.flags).unwrap_or_default();
    let record = match existing {
        Some(mut r) => {
            if r.device_link_previous.is_none() {
                r.device_link_previous = previous;
            }
            r.stable_link = Some(stable.clone());
            r.phase = Phase::Attached;
            if r.request.is_none() {
                r.request = Some(req.clone());
            }
            r
        }
        None => Record {
            volume_id: v.volume_id.clone(),
            mapping_name: name.to_owned(),
            device_path: v.device_path.clone(),
            backing_device: backing.0.clone(),
            backing_devno: backing.1,
            format: plan.format,
            cipher: plan.cipher.clone(),
            key_size: plan.key_size,
            key_manager: ctx.keys.kind().to_owned(),
            key_id: plan.key_id.clone(),
            derivation: "unknown (opened before volcrypt managed it)".into(),
            flags,
            formatted: false,
            stable_link: Some(stable.clone()),
            device_link_previous: previous,
            attached_at: now_secs(),
            phase: Phase::Attached,
            format_uuid: None,
            request: Some(req.clone()),
        },
    };
    journal(ctx, &record)?;
    Ok(AttachOutcome {
        volume_id: v.volume_id.clone(),
        encrypted: true,
        raw_reason: None,
        mapping_name: Some(name.to_owned()),
        device: mapper,
        stable_link: Some(stable),
        backing_device: Some(record.backing_device.clone()),
        format: Some(record.format),
        formatted: false,
        already_attached: true,
        replaced_stale: false,
        key_manager: Some(record.key_manager.clone()),
        key_id: Some(record.key_id.clone()),
        derivation: Some(record.derivation.clone()),
        flags,
        device_link,
        timings: AttachTimings::default(),
    })
}

/// Detach a volume: close its mapping (retrying while busy, up to the configured deadline),
/// remove the stable link, restore `device_path`, drop the record. A mapping that is not active
/// is success.
pub fn detach(
    ctx: &Context<'_>,
    volume_id: &str,
    device_path: Option<&Path>,
) -> Result<DetachOutcome, Error> {
    request::check_volume_id(volume_id)?;
    let started = Instant::now();
    let mut t = DetachTimings::default();
    let record = state::load(&ctx.config.state_dir, volume_id)?;
    let dm = Dm::open()?;
    let name = match (&record, device_path) {
        (Some(r), _) => r.mapping_name.clone(),
        (None, Some(p)) => {
            let base = request::legacy_mapping_name(p).unwrap_or_default();
            let prefixed =
                request::mapping_name_for(&base).map_err(|message| request::Error::Field {
                    field: "device_path",
                    message,
                })?;
            if !base.is_empty() && dm.info(&base)?.is_some() {
                base
            } else {
                prefixed
            }
        }
        (None, None) => {
            return Ok(DetachOutcome {
                volume_id: volume_id.to_owned(),
                mapping_name: None,
                was_active: false,
                waited_ms: 0,
                note: "no state record and no --device-path: nothing is attached".into(),
                timings: DetachTimings::default(),
            });
        }
    };
    tracing::Span::current().record("mapping", name.as_str());
    // Journal the detach before closing: a crash from here on leaves a `detaching` record that
    // the start-up reconcile finishes (close if still open, links, record).
    if let Some(r) = &record
        && r.phase != Phase::Detaching
    {
        let mut d = r.clone();
        d.phase = Phase::Detaching;
        timed(&mut t.journal, || journal(ctx, &d))?;
    }
    test_pause("detaching");
    let start = Instant::now();
    let deadline = start + ctx.config.detach_timeout();
    let mut delay = Duration::from_millis(50);
    // A stale mapping (backing device gone) is removed through device-mapper directly:
    // libcryptsetup cannot load it properly without its device.
    let stale = dm
        .info(&name)?
        .is_some_and(|i| !i.deps.is_empty() && i.deps.iter().all(|d| !d.exists()));
    let close = |name: &str| -> Result<Closed, Error> {
        if stale {
            return Ok(match dm.info(name)? {
                None => Closed::NotActive,
                Some(_) if dm.remove(name)? => Closed::Closed,
                Some(_) => Closed::Busy,
            });
        }
        crypt::close(name)
    };
    let was_active = loop {
        match timed(&mut t.dm, || close(&name))? {
            Closed::Closed => break true,
            Closed::NotActive => break false,
            Closed::Busy => {
                let now = Instant::now();
                if now >= deadline {
                    // Still in use: the attachment stays, and so does its record as it was.
                    if let Some(r) = &record {
                        state::save(&ctx.config.state_dir, r)?;
                    }
                    return Err(busy_error(&dm, &name, start.elapsed().as_millis()));
                }
                std::thread::sleep(delay.min(deadline - now));
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    };
    test_pause("closed");
    let mapper = links::mapper_path(&name);
    let stable = links::stable_link_path(&ctx.config.by_id_dir, volume_id);
    timed(&mut t.links, || {
        links::remove_if_points_to(&stable, &mapper)
    })?;
    let mut note = if was_active {
        "closed".to_owned()
    } else {
        "mapping was not active".to_owned()
    };
    if let Some(r) = &record {
        if let Some(prev) = &r.device_link_previous
            && timed(&mut t.links, || {
                links::restore_if_points_to(&r.device_path, &mapper, prev)
            })?
        {
            note.push_str(&format!(
                "; {} points at {} again",
                r.device_path.display(),
                prev.display()
            ));
        }
        timed(&mut t.journal, || {
            state::remove(&ctx.config.state_dir, volume_id)
        })?;
        trace_phase(&name, "detached");
    }
    t.total = started.elapsed();
    t.log(volume_id);
    Ok(DetachOutcome {
        volume_id: volume_id.to_owned(),
        mapping_name: Some(name),
        was_active,
        waited_ms: start.elapsed().as_millis(),
        note,
        timings: t,
    })
}

fn busy_error(dm: &Dm, name: &str, waited_ms: u128) -> Error {
    let info = dm.info(name).ok().flatten();
    let (open_count, holders, processes) = match &info {
        Some(i) => (i.open_count, i.devno.holders(), i.devno.processes()),
        None => (0, Vec::new(), Vec::new()),
    };
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "none found".to_owned()
        } else {
            v.join(", ")
        }
    };
    Error::Busy {
        name: name.to_owned(),
        open_count,
        holders: list(holders),
        processes: list(processes),
        waited_ms,
    }
}

/// Grow a mapping to its backing device after the device grew.
pub fn extend(ctx: &Context<'_>, volume_id: &str) -> Result<ExtendOutcome, Error> {
    request::check_volume_id(volume_id)?;
    let record =
        state::load(&ctx.config.state_dir, volume_id)?.ok_or_else(|| Error::NotManaged {
            volume_id: volume_id.to_owned(),
            state_dir: ctx.config.state_dir.clone(),
        })?;
    trace_phase(&record.mapping_name, &record.phase.to_string());
    let dm = Dm::open()?;
    let name = &record.mapping_name;
    let info = dm.info(name)?.ok_or_else(|| Error::NoDevice {
        path: links::mapper_path(name),
        detail: " (the mapping is not active)".into(),
    })?;
    let old = info.devno.size_bytes().unwrap_or(0);
    let backing_size = info.deps.first().and_then(|d| d.size_bytes()).unwrap_or(0);
    let passphrase = if record.format == VolumeFormat::Plain {
        crate::secret::SecretBytes::new(Vec::new())
    } else {
        ctx.keys
            .get(&record.key_id)
            .map_err(|source| Error::Key {
                key_id: record.key_id.clone(),
                source,
            })?
            .passphrase()
    };
    crypt::resize(name, passphrase.expose(), &record.key_id)?;
    let new = info.devno.size_bytes().unwrap_or(0);
    Ok(ExtendOutcome {
        volume_id: volume_id.to_owned(),
        mapping_name: name.clone(),
        old_size_bytes: old,
        new_size_bytes: new,
        backing_size_bytes: backing_size,
    })
}

/// Every volume volcrypt manages, with its live state.
pub fn status(ctx: &Context<'_>) -> Result<Vec<VolumeStatus>, Error> {
    let records = state::list(&ctx.config.state_dir)?;
    let dm = Dm::open()?;
    let mut out = Vec::new();
    for r in records {
        let info = dm.info(&r.mapping_name)?;
        let deps_present = info
            .as_ref()
            .is_some_and(|i| !i.deps.is_empty() && i.deps.iter().all(|d| d.exists()));
        let active = if deps_present {
            crypt::active_info(&r.mapping_name)?
        } else {
            None
        };
        let mapper = links::mapper_path(&r.mapping_name);
        let backing_present = r.backing_devno.exists();
        let stable_link_ok = r
            .stable_link
            .as_ref()
            .map(|l| links::read_link(l).as_deref() == Some(mapper.as_path()))
            .unwrap_or(false);
        out.push(VolumeStatus {
            volume_id: r.volume_id.clone(),
            mapping_name: r.mapping_name.clone(),
            active: info.is_some(),
            device_path: r.device_path.clone(),
            backing_device: r.backing_device.clone(),
            backing_devno: r.backing_devno,
            backing_present,
            stale: info.is_some() && !deps_present,
            format: r.format,
            kind: active.as_ref().map(|a| a.kind.clone()),
            cipher: active.as_ref().map(|a| a.cipher.clone()),
            key_bits: active.as_ref().map(|a| a.key_bits),
            sector_size: active.as_ref().map(|a| a.sector_size),
            size_bytes: active.as_ref().map(|a| a.size_sectors.saturating_mul(512)),
            key_manager: r.key_manager.clone(),
            key_id: r.key_id.clone(),
            derivation: r.derivation.clone(),
            flags: active.as_ref().map(|a| a.flags).unwrap_or(r.flags).names(),
            volume_key_in_keyring: active.as_ref().map(|a| a.key_in_keyring).unwrap_or(false),
            open_count: info.as_ref().map(|i| i.open_count),
            holders: info.as_ref().map(|i| i.devno.holders()).unwrap_or_default(),
            stable_link: r.stable_link.clone(),
            stable_link_ok,
            formatted_by_volcrypt: r.formatted,
            phase: r.phase,
        });
    }
    Ok(out)
}
