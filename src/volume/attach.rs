//! Attach: open a volume's mapping (formatting a provably blank device on its first attach),
//! point the links at it and journal it. The safety rules: never format a device that holds
//! anything, never touch a mapping that is not ours, nothing half-done after a failure.
//!
//! An attach runs in two halves so the agent can admit it before it runs: [`prepare`] checks
//! the request and reads the device's LUKS header once (the agent takes the header's KDF memory
//! from its budget), [`attach_prepared`] does the work. [`attach`] is both in one call.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::dm::{DevNo, MapInfo};
use super::format::{self, Format, Target};
use super::header::{self, DeviceHeader};
use super::journal::{Journal, Phase, Record};
use super::links;
use super::system::System;
use super::timing::{AttachTimings, timed};
use super::{Context, Error, PerfFlags, test_pause};
use crate::request::{self, AttachRequest, EncryptedPlan, Plan, ValidRequest, VolumeFormat};

/// How the mapping came to be (or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// No dm-crypt: the raw device is what the guest gets (back-end encryption, NoOp, none).
    Raw,
    /// An existing LUKS or plain volume was opened.
    Opened,
    /// The blank device was formatted on this first attach, then opened.
    Formatted,
    /// The volume was already attached to this device; the existing mapping was returned.
    AlreadyAttached,
}

/// What happened to the request's `device_path` link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    Replaced,
    AlreadyPointsAtMapping,
    /// Left alone, and why.
    NotReplaced(&'static str),
}

impl std::fmt::Display for LinkChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkChange::Replaced => f.write_str("replaced"),
            LinkChange::AlreadyPointsAtMapping => f.write_str("already points at the mapping"),
            LinkChange::NotReplaced(why) => write!(f, "not replaced: {why}"),
        }
    }
}

/// The result of an attach, as the CLI prints it and the RPC returns it. No key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachOutcome {
    pub volume_id: String,
    pub how: How,
    /// A stale mapping (backing device gone, unused) of the same name was replaced first.
    pub replaced_stale: bool,
    /// Why no dm-crypt is used ([`How::Raw`] only).
    pub raw_reason: Option<String>,
    pub mapping_name: Option<String>,
    /// The device the guest should get: `/dev/mapper/<name>`, or the raw device.
    pub device: PathBuf,
    pub stable_link: Option<PathBuf>,
    pub backing_device: Option<PathBuf>,
    pub format: Option<VolumeFormat>,
    pub key_manager: Option<String>,
    pub key_id: Option<String>,
    pub derivation: Option<String>,
    pub flags: PerfFlags,
    pub device_link: LinkChange,
    /// For the client: e.g. the volume opened with a weak-but-real cipher.
    pub warnings: Vec<String>,
    /// Where the engine spent its time (for metrics and logs; not part of the API's JSON).
    pub timings: AttachTimings,
}

impl AttachOutcome {
    pub fn encrypted(&self) -> bool {
        self.how != How::Raw
    }
    pub fn formatted(&self) -> bool {
        self.how == How::Formatted
    }
    pub fn already_attached(&self) -> bool {
        self.how == How::AlreadyAttached
    }
}

/// The JSON the CLI prints and the API returns (its field names are the API's contract).
#[derive(Serialize)]
struct Wire<'a> {
    volume_id: &'a str,
    encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mapping_name: Option<&'a str>,
    device: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    stable_link: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_device: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<VolumeFormat>,
    formatted: bool,
    already_attached: bool,
    replaced_stale: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_manager: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    derivation: Option<&'a str>,
    flags: PerfFlags,
    device_link: String,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

impl Serialize for AttachOutcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            volume_id: &self.volume_id,
            encrypted: self.encrypted(),
            raw_reason: self.raw_reason.as_deref(),
            mapping_name: self.mapping_name.as_deref(),
            device: &self.device,
            stable_link: self.stable_link.as_deref(),
            backing_device: self.backing_device.as_deref(),
            format: self.format,
            formatted: self.formatted(),
            already_attached: self.already_attached(),
            replaced_stale: self.replaced_stale,
            key_manager: self.key_manager.as_deref(),
            key_id: self.key_id.as_deref(),
            derivation: self.derivation.as_deref(),
            flags: self.flags,
            device_link: self.device_link.to_string(),
            warnings: &self.warnings,
        }
        .serialize(s)
    }
}

/// A checked attach request with its LUKS header read: what the agent admits into its KDF
/// budget and what [`attach_prepared`] runs.
#[derive(Debug, Clone)]
pub struct Prepared {
    valid: ValidRequest,
    header: Option<DeviceHeader>,
}

impl Prepared {
    pub fn volume_id(&self) -> &str {
        &self.valid.volume_id
    }

    /// The memory (MiB) this attach's KDF needs at its peak: the header's largest keyslot, or
    /// for a device without a header the KDF a format gives its keyslot (`estimate_mib` when
    /// that is libcryptsetup's benchmarked default). A raw attach runs no KDF: 0.
    pub fn kdf_mib(&self, config: &super::VolumeConfig, estimate_mib: u64) -> u64 {
        match (&self.valid.plan, &self.header) {
            (Plan::Raw { .. }, _) => 0,
            (Plan::Encrypted(p), _) if p.format == VolumeFormat::Plain => header::MIN_COST_MIB,
            (_, Some(h)) => header::kdf_mib(&h.header),
            (_, None) => header::format_kdf_mib(config, estimate_mib),
        }
    }
}

/// Check a request whose device is known and read its device's LUKS header (blocking).
pub fn prepare(sys: &dyn System, valid: ValidRequest) -> Result<Prepared, Error> {
    valid.require_resolved()?;
    let header = match &valid.plan {
        Plan::Encrypted(p) if p.format != VolumeFormat::Plain => {
            sys.read_header(&valid.device_path)
        }
        _ => None,
    };
    Ok(Prepared { valid, header })
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
    attach_prepared(ctx, prepare(&*ctx.sys, req.validate()?)?)
}

/// The second half of [`attach`]: under the volume's lock ([`Journal::lock`]), taken once the
/// device is known to exist (a request for a missing device changes nothing, not even the
/// state directory).
pub fn attach_prepared(ctx: &Context<'_>, p: Prepared) -> Result<AttachOutcome, Error> {
    if let Plan::Raw { reason } = &p.valid.plan {
        return Ok(raw_outcome(&p.valid, reason));
    }
    // A missing device fails here, before the lock file exists; under the lock the device is
    // found again, since an operation that held the lock meanwhile may have changed the links.
    find_device(&*ctx.sys, &p.valid)?;
    let _lock = ctx.journal().lock(&p.valid.volume_id)?;
    attach_held(ctx, p)
}

/// [`attach_prepared`] for a caller that holds the volume's lock (the reconcile).
pub(super) fn attach_held(ctx: &Context<'_>, p: Prepared) -> Result<AttachOutcome, Error> {
    if let Plan::Raw { reason } = &p.valid.plan {
        return Ok(raw_outcome(&p.valid, reason));
    }
    let (real, devno) = find_device(&*ctx.sys, &p.valid)?;
    attach_on(ctx, p, real, devno)
}

/// The canonical path and number of the request's device.
fn find_device(sys: &dyn System, v: &ValidRequest) -> Result<(PathBuf, DevNo), Error> {
    sys.dm_check()?;
    let real = sys
        .canonicalize(&v.device_path)
        .map_err(|e| Error::NoDevice {
            path: v.device_path.clone(),
            detail: format!(": {e}"),
        })?;
    let devno = sys.devno_of(&real)?;
    Ok((real, devno))
}

/// The attach proper, on the device `real` (`devno`) [`find_device`] found.
fn attach_on(
    ctx: &Context<'_>,
    p: Prepared,
    real: PathBuf,
    devno: DevNo,
) -> Result<AttachOutcome, Error> {
    let Prepared { valid: v, header } = p;
    let plan = match &v.plan {
        Plan::Raw { reason } => return Ok(raw_outcome(&v, reason)),
        Plan::Encrypted(e) => e.clone(),
    };
    let sys = &*ctx.sys;
    let journal = ctx.journal();
    match choose_mapping(sys, &journal, &v, &real, devno)? {
        Mapping::Existing { name, backing } => {
            finish_existing(ctx, &journal, &v, &plan, &name, backing)
        }
        Mapping::New {
            name,
            replaced_stale,
        } => {
            // The header prepare() read is used only if it is the one of this very device.
            let header = header.filter(|h| h.device == real);
            let target = Target {
                real,
                devno,
                name,
                header,
            };
            let mut o = open_new(ctx, &journal, &v, &plan, target)?;
            o.replaced_stale = replaced_stale;
            Ok(o)
        }
    }
}

fn raw_outcome(v: &ValidRequest, reason: &str) -> AttachOutcome {
    tracing::info!(volume_id = %v.volume_id, %reason, "attaching raw device without dm-crypt");
    AttachOutcome {
        volume_id: v.volume_id.clone(),
        how: How::Raw,
        replaced_stale: false,
        raw_reason: Some(reason.to_owned()),
        mapping_name: None,
        device: v.device_path.clone(),
        stable_link: None,
        backing_device: None,
        format: None,
        key_manager: None,
        key_id: None,
        derivation: None,
        flags: PerfFlags::default(),
        device_link: LinkChange::NotReplaced("no dm-crypt"),
        warnings: Vec::new(),
        timings: AttachTimings::default(),
    }
}

/// Which mapping an attach ends up with.
enum Mapping {
    /// The volume's mapping already maps this device: return it.
    Existing {
        name: String,
        backing: (PathBuf, DevNo),
    },
    /// Create `name` (a stale mapping of that name was removed first when `replaced_stale`).
    New { name: String, replaced_stale: bool },
}

/// What to do with the mapping name an attach wants, from what device-mapper has under it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MappingPlan {
    /// Nothing there: create it.
    Create,
    /// It maps this device already (or is the device `device_path` points at): reuse it.
    /// `backing`: the device under it, when `device_path` named the mapping itself.
    Reuse { backing: Option<DevNo> },
    /// It is ours, but for another volume id.
    OwnedBy(String),
    /// Stale (every device it maps is gone) and unused: remove it, then create.
    ReplaceStale { held_by: String },
    /// Stale but still open: left alone.
    StaleBusy { held_by: String, open_count: i32 },
    /// It maps another device.
    Conflict { held_by: String },
}

/// The pure decision of [`choose_mapping`]. `owner`: the volume id of another record using
/// the name; `deps_gone`: every device the mapping maps has disappeared.
fn plan_mapping(
    info: Option<&MapInfo>,
    devno: DevNo,
    owner: Option<&str>,
    deps_gone: bool,
) -> MappingPlan {
    let Some(info) = info else {
        return MappingPlan::Create;
    };
    // device_path may already point at our mapping (its link was replaced on a first attach):
    // then the device the request means is the mapping's backing device.
    let points_at_mapping = info.devno == devno;
    if points_at_mapping || info.deps.contains(&devno) {
        // Handing a mapping of another volume id to this one too would let a detach of either
        // close the other's device.
        return match owner {
            Some(o) => MappingPlan::OwnedBy(o.to_owned()),
            None => MappingPlan::Reuse {
                backing: info.deps.first().copied().filter(|_| points_at_mapping),
            },
        };
    }
    let held_by = info
        .deps
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    match (deps_gone && !info.deps.is_empty(), info.open_count) {
        (false, _) if held_by.is_empty() => MappingPlan::Conflict {
            held_by: "no device".into(),
        },
        (false, _) => MappingPlan::Conflict { held_by },
        (true, 0) => MappingPlan::ReplaceStale { held_by },
        (true, open_count) => MappingPlan::StaleBusy {
            held_by,
            open_count,
        },
    }
}

/// Decide the mapping from the name the request implies and what device-mapper and the
/// journal hold under it ([`plan_mapping`]), and carry it out: a stale mapping (backing device
/// gone, unused) of that name is removed; a name held by another device or volume is refused.
fn choose_mapping(
    sys: &dyn System,
    journal: &Journal,
    v: &ValidRequest,
    real: &Path,
    devno: DevNo,
) -> Result<Mapping, Error> {
    // os-brick reuses an active mapping with the legacy (unprefixed) name.
    let mut name = v.mapping_name.clone();
    if let Some(legacy) = request::legacy_mapping_name(&v.device_path)
        && sys.dm_info(&legacy)?.is_some()
    {
        name = legacy;
    }
    tracing::Span::current().record("mapping", name.as_str());
    let info = sys.dm_info(&name)?;
    let owner = match &info {
        Some(_) => journal
            .list()?
            .into_iter()
            .find(|r| r.mapping_name == name && r.volume_id != v.volume_id)
            .map(|r| r.volume_id),
        None => None,
    };
    let deps_gone = info
        .as_ref()
        .is_some_and(|i| i.deps.iter().all(|d| !sys.exists(*d)));
    match plan_mapping(info.as_ref(), devno, owner.as_deref(), deps_gone) {
        MappingPlan::Create => Ok(Mapping::New {
            name,
            replaced_stale: false,
        }),
        MappingPlan::Reuse { backing } => {
            let backing = match backing {
                Some(d) => (
                    sys.dev_path(d)
                        .unwrap_or_else(|| PathBuf::from(d.to_string())),
                    d,
                ),
                None => (real.to_owned(), devno),
            };
            Ok(Mapping::Existing { name, backing })
        }
        MappingPlan::OwnedBy(owner) => Err(Error::OwnedByOther {
            device: v.device_path.clone(),
            name,
            owner,
            requested: v.volume_id.clone(),
        }),
        MappingPlan::Conflict { held_by } => Err(Error::NameConflict {
            name,
            held_by,
            requested: format!("{} ({devno})", real.display()),
        }),
        MappingPlan::StaleBusy {
            held_by,
            open_count,
        } => Err(Error::StaleBusy {
            name,
            backing: held_by,
            open_count,
        }),
        MappingPlan::ReplaceStale { held_by } => {
            tracing::warn!(mapping = %name, backing = %held_by, "replacing stale mapping whose backing device is gone");
            if !sys.dm_remove(&name)? {
                return Err(Error::StaleBusy {
                    name,
                    backing: held_by,
                    open_count: 0,
                });
            }
            Ok(Mapping::New {
                name,
                replaced_stale: true,
            })
        }
    }
}

/// Fetch the key, journal the attachment, open (or format and open) the mapping, set the links
/// and journal it attached. Any failure undoes what this attach did and puts the journal back.
fn open_new(
    ctx: &Context<'_>,
    journal: &Journal,
    v: &ValidRequest,
    plan: &EncryptedPlan,
    target: Target,
) -> Result<AttachOutcome, Error> {
    let started = Instant::now();
    let mut t = AttachTimings::default();
    let secret =
        timed(&mut t.key_fetch, || ctx.keys.get(&plan.key_id)).map_err(|source| Error::Key {
            key_id: plan.key_id.clone(),
            source,
        })?;
    let derivation = secret.secret_type.derivation();
    let passphrase = secret.passphrase();
    drop(secret);
    let flags = PerfFlags::resolve(&ctx.config, &v.options);

    // Journal the attachment before the mapping exists: a crash from here on leaves an
    // `attaching` record that the reconcile finishes.
    let prior = journal.get(&v.volume_id)?;
    let (mut record, format_uuid) = new_record(
        ctx,
        v,
        plan,
        &target,
        prior.as_ref(),
        flags,
        &derivation.to_string(),
    )?;
    record.device_link_previous = planned_previous_link(&*ctx.sys, v, &record, prior.as_ref());
    timed(&mut t.journal, || journal.begin_attach(&mut record))?;
    test_pause("attaching");
    let format = Format {
        uuid: format_uuid,
        prior: prior.as_ref(),
    };
    let opened = format::open_mapping(
        ctx,
        v,
        plan,
        &target,
        passphrase.expose(),
        flags,
        format,
        &mut t,
    );
    let (how, warning) = match opened {
        Ok(o) if o.formatted => (How::Formatted, o.warning),
        Ok(o) => (How::Opened, o.warning),
        Err(e) => {
            restore(journal, &v.volume_id, prior.as_ref());
            return Err(e);
        }
    };
    // From here on the mapping exists: any failure closes it, undoes the links and, if this
    // attach formatted the device, wipes the header it wrote (the device was blank).
    let mut undo = Undo {
        sys: &*ctx.sys,
        name: target.name.clone(),
        links: Vec::new(),
        formatted: match (how, &record.format_uuid) {
            (How::Formatted, Some(uuid)) => Some((target.real.clone(), uuid.clone())),
            _ => None,
        },
    };
    match link_and_commit(ctx, journal, v, &mut record, how, &mut undo, &mut t) {
        Ok(device_link) => {
            t.total = started.elapsed();
            t.log(&v.volume_id);
            let mut o = mapped_outcome(&record, how, device_link, t);
            o.warnings.extend(warning);
            Ok(o)
        }
        Err(e) => {
            undo.run();
            restore(journal, &v.volume_id, prior.as_ref());
            Err(e)
        }
    }
}

/// The journal record of a new attachment (phase set by [`Journal::begin_attach`]), and the
/// UUID a format on this attach would give the header: journaled before formatting so a
/// header left half-written by a crash is recognised as this attach's own. A retry of an
/// interrupted first attach of the same device keeps that attach's UUID: a crash of the retry
/// before its own format must not orphan the keyless header the first one left.
fn new_record(
    ctx: &Context<'_>,
    v: &ValidRequest,
    plan: &EncryptedPlan,
    target: &Target,
    prior: Option<&Record>,
    flags: PerfFlags,
    derivation: &str,
) -> Result<(Record, Option<uuid::Uuid>), Error> {
    let unfinished = prior
        .filter(|p| p.phase == Phase::Attaching && !p.formatted && p.backing_devno == target.devno)
        .and_then(|p| p.format_uuid.as_deref())
        .and_then(|u| uuid::Uuid::parse_str(u).ok());
    let format_uuid = match (plan.format, unfinished) {
        (VolumeFormat::Plain, _) => None,
        (_, Some(u)) => Some(u),
        _ => Some(super::crypt::new_header_uuid()?),
    };
    let record = Record {
        volume_id: v.volume_id.clone(),
        mapping_name: target.name.clone(),
        device_path: v.device_path.clone(),
        backing_device: target.real.clone(),
        backing_devno: target.devno,
        format: plan.format,
        cipher: plan.cipher.clone(),
        key_size: plan.key_size,
        key_manager: ctx.keys.kind().to_owned(),
        key_id: plan.key_id.clone(),
        derivation: derivation.to_owned(),
        flags,
        formatted: false,
        stable_link: Some(links::stable_link_path(&ctx.config.by_id_dir, &v.volume_id)),
        device_link_previous: None,
        attached_at: now_secs(),
        phase: Phase::Attaching,
        format_uuid: format_uuid.map(|u| u.to_string()),
        request: Some(v.request().clone()),
        // A rekey interrupted before it removed the old keyslot stays to be finished.
        rekey: prior
            .filter(|p| p.backing_devno == target.devno && p.key_id == plan.key_id)
            .and_then(|p| p.rekey.clone()),
        // A re-activation (the record outlived its mapping: a reboot) keeps the volume's last
        // verify; a detach removed the record, so a new attachment starts without one.
        last_verify: prior.and_then(|p| p.last_verify.clone()),
    };
    Ok((record, format_uuid))
}

/// Where `device_path` points now, if this attach will replace it: journaled before the link
/// is touched, so a crash right after the replacement can still restore it. Otherwise what an
/// earlier record remembered.
fn planned_previous_link(
    sys: &dyn System,
    v: &ValidRequest,
    record: &Record,
    prior: Option<&Record>,
) -> Option<PathBuf> {
    let mapper = links::mapper_path(&record.mapping_name);
    if v.options.replace_device_symlink
        && sys.is_replaceable(&v.device_path)
        && sys.read_link(&v.device_path).as_deref() != Some(mapper.as_path())
    {
        sys.read_link(&v.device_path)
    } else {
        prior.and_then(|p| p.device_link_previous.clone())
    }
}

/// The mapping is open: journal a format, set the links, journal the attachment as done.
fn link_and_commit(
    ctx: &Context<'_>,
    journal: &Journal,
    v: &ValidRequest,
    record: &mut Record,
    how: How,
    undo: &mut Undo<'_>,
    t: &mut AttachTimings,
) -> Result<LinkChange, Error> {
    if how == How::Formatted {
        timed(&mut t.journal, || journal.formatted(record))?;
    }
    test_pause("opened");
    let links_started = Instant::now();
    let mapper = links::mapper_path(&record.mapping_name);
    let stable = links::stable_link_path(&ctx.config.by_id_dir, &v.volume_id);
    if let Some(e) = format::injected("link", &stable) {
        return Err(e);
    }
    let prev_stable = ctx.sys.set_symlink(&stable, &mapper)?;
    undo.links.push((stable, prev_stable));
    let (device_link, previous) = replace_device_link(&*ctx.sys, v, &mapper)?;
    if device_link == LinkChange::Replaced {
        undo.links.push((v.device_path.clone(), previous.clone()));
    }
    t.links += links_started.elapsed();
    if previous.is_some() {
        record.device_link_previous = previous;
    }
    test_pause("linked");
    super::consumers::commit_attached(ctx, journal, record, &mut t.journal)?;
    Ok(device_link)
}

fn mapped_outcome(
    record: &Record,
    how: How,
    device_link: LinkChange,
    timings: AttachTimings,
) -> AttachOutcome {
    AttachOutcome {
        volume_id: record.volume_id.clone(),
        how,
        replaced_stale: false,
        raw_reason: None,
        mapping_name: Some(record.mapping_name.clone()),
        device: links::mapper_path(&record.mapping_name),
        stable_link: record.stable_link.clone(),
        backing_device: Some(record.backing_device.clone()),
        format: Some(record.format),
        key_manager: Some(record.key_manager.clone()),
        key_id: Some(record.key_id.clone()),
        derivation: Some(record.derivation.clone()),
        flags: record.flags,
        device_link,
        warnings: Vec::new(),
        timings,
    }
}

/// After a failed attach, put the journal back as it was before it.
fn restore(journal: &Journal, volume_id: &str, prior: Option<&Record>) {
    if let Err(e) = journal.restore(volume_id, prior) {
        tracing::error!(volume_id, error = %e, "rollback could not restore the state record");
    }
}

/// Point `device_path` at the mapping when asked and when it is a symlink. Returns what was
/// done and, when replaced, where it pointed before.
fn replace_device_link(
    sys: &dyn System,
    v: &ValidRequest,
    mapper: &Path,
) -> Result<(LinkChange, Option<PathBuf>), Error> {
    if !v.options.replace_device_symlink {
        return Ok((
            LinkChange::NotReplaced("replace_device_symlink is false"),
            None,
        ));
    }
    let current = sys.read_link(&v.device_path);
    if current.as_deref() == Some(mapper) {
        return Ok((LinkChange::AlreadyPointsAtMapping, None));
    }
    if !sys.is_replaceable(&v.device_path) {
        return Ok((
            LinkChange::NotReplaced(
                "device_path is not a symlink (a device node is never replaced)",
            ),
            None,
        ));
    }
    let previous = sys.set_symlink(&v.device_path, mapper)?;
    Ok((LinkChange::Replaced, previous))
}

/// The volume is already attached to the requested device: re-assert links, make sure a
/// record exists, and return the existing mapping.
fn finish_existing(
    ctx: &Context<'_>,
    journal: &Journal,
    v: &ValidRequest,
    plan: &EncryptedPlan,
    name: &str,
    backing: (PathBuf, DevNo),
) -> Result<AttachOutcome, Error> {
    let mapper = links::mapper_path(name);
    let stable = links::stable_link_path(&ctx.config.by_id_dir, &v.volume_id);
    ctx.sys.set_symlink(&stable, &mapper)?;
    let (device_link, previous) = replace_device_link(&*ctx.sys, v, &mapper)?;
    let flags = ctx
        .sys
        .active_info(name)?
        .map(|i| i.flags)
        .unwrap_or_default();
    let mut record = match journal.get(&v.volume_id)? {
        Some(mut r) => {
            if r.device_link_previous.is_none() {
                r.device_link_previous = previous;
            }
            if r.request.is_none() {
                r.request = Some(v.request().clone());
            }
            r
        }
        None => Record {
            volume_id: v.volume_id.clone(),
            mapping_name: name.to_owned(),
            device_path: v.device_path.clone(),
            backing_device: backing.0,
            backing_devno: backing.1,
            format: plan.format,
            cipher: plan.cipher.clone(),
            key_size: plan.key_size,
            key_manager: ctx.keys.kind().to_owned(),
            key_id: plan.key_id.clone(),
            derivation: "unknown (opened before volcrypt managed it)".into(),
            flags,
            formatted: false,
            stable_link: None,
            device_link_previous: previous,
            attached_at: now_secs(),
            phase: Phase::Attached,
            format_uuid: None,
            request: Some(v.request().clone()),
            rekey: None,
            last_verify: None,
        },
    };
    record.stable_link = Some(stable);
    if record.phase == Phase::Detaching {
        // This attach supersedes the interrupted detach: the volume is wanted again.
        journal.begin_attach(&mut record)?;
    }
    super::consumers::commit_attached(ctx, journal, &mut record, &mut Duration::default())?;
    let mut o = mapped_outcome(
        &record,
        How::AlreadyAttached,
        device_link,
        AttachTimings::default(),
    );
    o.flags = flags;
    Ok(o)
}

/// Rollback of a half-done attach: restore or remove the links we set, close the mapping, and
/// wipe the header a first attach wrote.
struct Undo<'a> {
    sys: &'a dyn System,
    name: String,
    links: Vec<(PathBuf, Option<PathBuf>)>,
    /// The device this attach formatted and the UUID it journaled for the header.
    formatted: Option<(PathBuf, String)>,
}

impl Undo<'_> {
    fn run(self) {
        let mapper = links::mapper_path(&self.name);
        for (link, previous) in self.links.into_iter().rev() {
            let r = match previous {
                Some(p) => self.sys.restore_if_points_to(&link, &mapper, &p),
                None => self.sys.remove_if_points_to(&link, &mapper),
            };
            if let Err(e) = r {
                tracing::error!(link = %link.display(), error = %e, "rollback could not restore link");
            }
        }
        match self.sys.close(&self.name) {
            Ok(super::crypt::Closed::Busy) => {
                tracing::error!(mapping = %self.name, "rollback could not close the mapping: busy");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(mapping = %self.name, error = %e, "rollback could not close mapping");
                return;
            }
        }
        if let Some((device, uuid)) = self.formatted {
            format::roll_back(self.sys, &device, &uuid);
        }
    }
}
