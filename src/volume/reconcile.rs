//! The reconcile of the journal against the kernel: what the agent runs at start and
//! `volcrypt reconcile` runs for an operator, after a crash, a reboot or a kill.
//!
//! The records are the journal of desired attachments, each in a phase written *before* the
//! step it names (see [`super::journal`]). After a restart, crash or reboot, each record is
//! compared with its device-mapper mapping and the pair resolved by [`decide`]:
//!
//! | phase \ mapping | absent                    | active on the recorded device | backing gone | held by another device |
//! |-----------------|---------------------------|-------------------------------|--------------|------------------------|
//! | attaching       | attach again (finish)     | set links, mark attached      | report stale | report conflict        |
//! | attached        | attach again (re-activate)| repair links                  | report stale | report conflict        |
//! | detaching       | finish detach             | finish detach                 | finish detach| report conflict        |
//! | waiting, lost   | keep, report `waiting`    | repair links                  | report stale | report conflict        |
//!
//! `waiting`/`lost` records belong to udev-triggered activation ([`super::hotplug`]): their
//! device went away; the agent's udev pass attaches them when it is back. A record whose stored
//! request names its device by identity (serial, WWN, by-path, LUKS UUID) is resolved through
//! udev when it is re-activated, and becomes `waiting` if that device is not there.
//!
//! Before that, a record still `attaching` whose mapping name holds a table-less device created
//! by libcryptsetup (the agent was killed inside the activation) has that device removed, so
//! the row "absent" applies (see [`remove_half_created`]).
//!
//! Re-attaching needs the request stored in the record; a record of an older version has
//! none and is reported `inactive` instead. A failed repair keeps the record and is reported
//! under `failed`. Records that do not parse are moved aside and reported under `corrupt`.
//! `crypt-*` mappings (os-brick's naming) that no record explains were not created by this
//! agent: reported as `foreign`, never touched.
//!
//! The report is logged at start and shown in `GET /v1/health` under `reconcile`.
//!
//! The agent splits each record into [`plan_one`] (everything above) and the re-activation
//! itself, so it can run re-activations in parallel under its KDF memory budget: cheapest KDF
//! first ([`order_by_cost`]), one per CPU ([`workers`]); one that lacks its key or device
//! ([`unavailable`]) is reported under `retrying` and tried again after [`backoff`].

use std::sync::Arc;

use serde::Serialize;

use super::dm;
use super::journal::{self, Phase, Record};
use super::system::System;
use super::{Context, Error, hotplug, links};
use crate::keys::KeyManager;

/// What the start-up reconcile found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// false: the check could not run (see `detail`).
    pub checked: bool,
    pub detail: String,
    /// State records found (corrupt ones not counted).
    pub records: usize,
    /// Volume ids whose mapping is not active and could not be re-activated (no stored request).
    pub inactive: Vec<String>,
    /// Volume ids whose mapping is active but whose backing device is gone.
    pub stale: Vec<String>,
    /// Volume ids waiting for their device to appear (udev-triggered activation).
    pub waiting: Vec<String>,
    /// `crypt-*` mappings without a record (left untouched).
    pub foreign: Vec<String>,
    /// Volume ids attached again because their record wanted them active.
    pub reactivated: Vec<String>,
    /// Volume ids whose links or phase were repaired (a half-done attach finished).
    pub repaired: Vec<String>,
    /// Volume ids whose interrupted detach was finished.
    pub detached: Vec<String>,
    /// Volume ids whose mapping name is held by a device other than the recorded one.
    pub conflict: Vec<String>,
    /// Repairs that failed (the record is kept).
    pub failed: Vec<Failure>,
    /// Re-activations that found their key or device not available yet: the record is kept
    /// and the agent retries them with backoff ([`backoff`]) until they open, fail otherwise,
    /// or their record goes away. Nothing is formatted meanwhile.
    pub retrying: Vec<Failure>,
    /// Record files that did not parse, and where they were moved.
    pub corrupt: Vec<journal::Corrupt>,
    /// How far the agent's start-up pass is (it runs while the API already answers).
    pub progress: Progress,
}

/// Records of the start-up pass: all of them, those resolved (any finding), and those whose
/// finding is a failure (`failed` or `retrying`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub total: usize,
    pub done: usize,
    pub failed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub volume_id: String,
    pub action: &'static str,
    pub error: String,
}

/// The kernel side of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmState {
    Absent,
    /// Active, mapping the recorded backing device.
    Ours,
    /// Active, but every device it maps is gone.
    Stale,
    /// Active on some other device (or without a table).
    Conflict,
}

/// What to do about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run the stored attach request again.
    Reactivate,
    /// Set the links and mark the record attached.
    RepairLinks,
    /// Run the detach again (close if open, links, drop the record).
    FinishDetach,
    /// Should be active, but the record holds no request to attach it with.
    ReportInactive,
    /// Waiting for its device (udev-triggered activation): keep the record as it is.
    Wait,
    ReportStale,
    ReportConflict,
}

/// The decision table of the module doc. Pure: unit-tested for every combination.
pub fn decide(phase: Phase, dm: DmState, has_request: bool) -> Action {
    match (phase, dm) {
        (_, DmState::Conflict) => Action::ReportConflict,
        (Phase::Detaching, _) => Action::FinishDetach,
        (_, DmState::Stale) => Action::ReportStale,
        (_, DmState::Ours) => Action::RepairLinks,
        // udev-triggered: attached when the device appears (rpc::devices), never lost here.
        (Phase::Waiting | Phase::Lost, DmState::Absent) => Action::Wait,
        (_, DmState::Absent) if has_request => Action::Reactivate,
        (_, DmState::Absent) => Action::ReportInactive,
    }
}

/// The result for one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Nothing to do (or the record disappeared meanwhile).
    Consistent,
    Reactivated,
    Repaired(Vec<String>),
    Detached,
    Inactive,
    /// Waiting for its device to appear (kept, attached by the agent's udev pass).
    Waiting,
    Stale,
    Conflict,
    Failed {
        action: &'static str,
        error: String,
    },
}

/// First step: move corrupt records aside and check that device-mapper is there. Returns the
/// report so far and the volume ids to reconcile one by one, or a `checked: false` report.
/// Blocking. `ctx` needs no key manager (see [`Context::without_keys`]).
#[allow(clippy::result_large_err)] // called once at start-up
pub fn prepare(ctx: &Context<'_>) -> Result<(Report, Vec<String>), Report> {
    let scan = match ctx.journal().scan() {
        Ok(s) => s,
        Err(e) => {
            return Err(Report {
                detail: format!("cannot read the state records: {e}"),
                ..Report::default()
            });
        }
    };
    let report = Report {
        records: scan.records.len(),
        corrupt: scan.corrupt,
        ..Report::default()
    };
    if let Err(e) = ctx.sys.dm_check() {
        return Err(Report {
            detail: e.to_string(),
            ..report
        });
    }
    let ids = scan.records.into_iter().map(|r| r.volume_id).collect();
    Ok((report, ids))
}

fn dm_state(sys: &dyn System, r: &Record) -> Result<DmState, Error> {
    let Some(info) = sys.dm_info(&r.mapping_name)? else {
        return Ok(DmState::Absent);
    };
    if !info.deps.is_empty() && info.deps.iter().all(|d| !sys.exists(*d)) {
        return Ok(DmState::Stale);
    }
    let now = sys
        .canonicalize(&r.backing_device)
        .ok()
        .and_then(|p| sys.devno_of(&p).ok());
    if info.deps.contains(&r.backing_devno) || now.is_some_and(|d| info.deps.contains(&d)) {
        Ok(DmState::Ours)
    } else {
        Ok(DmState::Conflict)
    }
}

/// A kill inside libcryptsetup's activation (after device-mapper's create, before the table is
/// loaded and resumed) leaves a device with no live table under the mapping name, whose uuid
/// libcryptsetup set (`CRYPT-<type>-<uuid>-<name>`). It maps nothing, so it holds no data and
/// nobody can be using it: for a record still `attaching`, remove it so the attach is redone
/// (otherwise it would block the name as a conflict forever). Anything else is left alone.
fn remove_half_created(sys: &dyn System, name: &str) -> Result<(), Error> {
    let Some(info) = sys.dm_info(name)? else {
        return Ok(());
    };
    if !is_half_created(&info, name) {
        return Ok(());
    }
    tracing::warn!(
        mapping = name,
        uuid = info.uuid.as_deref(),
        "removing the table-less device an interrupted activation left"
    );
    if !sys.dm_remove(name)? {
        tracing::warn!(mapping = name, "table-less device is busy: left in place");
    }
    Ok(())
}

/// No live table (dm-crypt's table always maps the backing device), unused, and a uuid that
/// libcryptsetup made for exactly this name: `CRYPT-<TYPE>-<hex uuid>-<name>` (LUKS) or
/// `CRYPT-<TYPE>-<name>` (plain).
fn is_half_created(info: &dm::MapInfo, name: &str) -> bool {
    let made_for_name = info
        .uuid
        .as_deref()
        .and_then(|u| u.strip_prefix("CRYPT-"))
        .and_then(|u| u.split_once('-'))
        .is_some_and(|(kind, rest)| {
            !kind.is_empty()
                && (rest == name
                    || rest.split_once('-').is_some_and(|(hex, n)| {
                        n == name && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())
                    }))
        });
    made_for_name && info.deps.is_empty() && info.open_count == 0
}

/// Reconcile one record (re-read now: a request may have changed it). Blocking; the engine's
/// lock of the volume is taken here (the agent holds its own as well). `ctx` needs no key
/// manager: `keys` re-activates, and registers or removes the consumers of the records the
/// reconcile confirms attached or finishes detaching (without it they are left as they are).
pub fn reconcile_one(
    ctx: &Context<'_>,
    keys: Result<Arc<dyn KeyManager>, String>,
    volume_id: &str,
) -> Finding {
    let keys = match keys {
        Ok(k) => k,
        Err(e) => {
            return match plan_one(ctx, volume_id) {
                Step::Done(f) => f,
                Step::Reactivate(_) => Finding::Failed {
                    action: "re-activate",
                    error: format!("key manager unavailable: {e}"),
                },
            };
        }
    };
    let ctx = Context {
        keys: keys.as_ref(),
        ..ctx.clone()
    };
    let planned = match plan_one(&ctx, volume_id) {
        Step::Done(f) => return f,
        Step::Reactivate(p) => p,
    };
    match planned.run(&ctx) {
        Ok(_) => Finding::Reactivated,
        Err(e) => Finding::Failed {
            action: "re-activate",
            error: e.to_string(),
        },
    }
}

/// What [`plan_one`] leaves to its caller.
pub enum Step {
    /// The record is resolved (or needs nothing).
    Done(Finding),
    /// Attach it again (see [`Reactivation`]).
    Reactivate(Box<Reactivation>),
}

/// A re-activation planned under the volume's lock, which it keeps until it has run: the
/// stored request, resolved and with its header read, so the caller can take the KDF memory
/// the header asks for before [`Reactivation::run`].
pub struct Reactivation {
    prepared: super::Prepared,
    _lock: journal::VolumeLock,
}

impl Reactivation {
    pub fn prepared(&self) -> &super::Prepared {
        &self.prepared
    }

    /// Run the attach (still under the lock `plan_one` took), then release the lock.
    pub fn run(self, ctx: &Context<'_>) -> Result<super::AttachOutcome, Error> {
        super::attach::attach_held(ctx, self.prepared)
    }
}

/// Everything [`reconcile_one`] does short of the re-activation itself (which needs keys and,
/// in the agent, the KDF budget), under the volume's lock. Blocking. `ctx`'s key manager is
/// used only for the consumers of the records confirmed attached or detached here (a keyless
/// context leaves them as they are).
pub fn plan_one(ctx: &Context<'_>, volume_id: &str) -> Step {
    let failed = |action, e: &dyn std::fmt::Display| {
        Step::Done(Finding::Failed {
            action,
            error: e.to_string(),
        })
    };
    let sys = &*ctx.sys;
    let journal = ctx.journal();
    let lock = match journal.lock(volume_id) {
        Ok(l) => l,
        Err(e) => return failed("lock volume", &e),
    };
    let record = match journal.get(volume_id) {
        Ok(Some(r)) => r,
        Ok(None) => return Step::Done(Finding::Consistent),
        Err(e) => return failed("read record", &e),
    };
    if let Err(e) = sys.dm_check() {
        return failed("open device-mapper", &e);
    }
    if record.phase == Phase::Attaching
        && let Err(e) = remove_half_created(sys, &record.mapping_name)
    {
        return failed("remove half-created mapping", &e);
    }
    let dms = match dm_state(sys, &record) {
        Ok(s) => s,
        Err(e) => return failed("read mapping", &e),
    };
    let action = decide(record.phase, dms, record.request.is_some());
    tracing::info!(volume_id, phase = %record.phase, dm = ?dms, ?action, "reconcile");
    Step::Done(match action {
        Action::ReportInactive => Finding::Inactive,
        Action::Wait => Finding::Waiting,
        Action::ReportStale => Finding::Stale,
        Action::ReportConflict => Finding::Conflict,
        Action::RepairLinks => match repair_links(ctx, &record) {
            Ok(c) if c.is_empty() => Finding::Consistent,
            Ok(c) => Finding::Repaired(c),
            Err(e) => return failed("repair links", &e),
        },
        Action::FinishDetach => match super::detach::detach_held(ctx, volume_id, None) {
            Ok(_) => Finding::Detached,
            Err(e) => return failed("finish detach", &e),
        },
        Action::Reactivate => {
            let Some(req) = &record.request else {
                return Step::Done(Finding::Inactive);
            };
            let req = match hotplug::resolve_now(sys, req) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    let mut record = record;
                    return match journal.waiting(&mut record) {
                        Ok(()) => Step::Done(Finding::Waiting),
                        Err(e) => failed("wait for device", &e),
                    };
                }
                Err(e) => return failed("re-activate", &e),
            };
            // A crash may have left device_path pointing at the (now absent) mapping: point it
            // back where it was, so the request resolves to the backing device again.
            let mapper = links::mapper_path(&record.mapping_name);
            if let Some(prev) = &record.device_link_previous
                && let Err(e) = sys.restore_if_points_to(&record.device_path, &mapper, prev)
            {
                return failed("re-activate", &e);
            }
            let prepared = req
                .validate()
                .map_err(Error::from)
                .and_then(|v| super::prepare(sys, v));
            return match prepared {
                Ok(prepared) => Step::Reactivate(Box::new(Reactivation {
                    prepared,
                    _lock: lock,
                })),
                Err(e) => failed("re-activate", &e),
            };
        }
    })
}

/// Bring the links of an active, recorded mapping back in line with its record (start-up
/// reconcile): the stable link, and `device_path` when the attachment replaced it. Marks the
/// record `attached` (registering its consumer with `ctx`'s key manager). Returns what was
/// changed (empty: nothing needed).
pub fn repair_links(ctx: &Context<'_>, record: &Record) -> Result<Vec<String>, Error> {
    let mapper = links::mapper_path(&record.mapping_name);
    let stable = links::stable_link_path(&ctx.config.by_id_dir, &record.volume_id);
    let mut changed = Vec::new();
    let mut r = record.clone();
    let sys = &*ctx.sys;
    if sys.read_link(&stable).as_deref() != Some(mapper.as_path()) {
        sys.set_symlink(&stable, &mapper)?;
        changed.push(format!("{} -> {}", stable.display(), mapper.display()));
    }
    r.stable_link = Some(stable);
    let replace = match &record.request {
        Some(req) => req.options.replace_device_symlink,
        None => record.device_link_previous.is_some(),
    };
    if replace
        && sys.is_replaceable(&record.device_path)
        && sys.read_link(&record.device_path).as_deref() != Some(mapper.as_path())
    {
        let previous = sys.set_symlink(&record.device_path, &mapper)?;
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
    }
    // Written even when unchanged: the record is confirmed attached, which also registers its
    // consumer again (a registration lost while the agent was down is repaired here).
    super::consumers::commit_attached(ctx, &ctx.journal(), &mut r, &mut Default::default())?;
    Ok(changed)
}

impl Report {
    pub fn add(&mut self, volume_id: &str, finding: Finding) {
        let id = volume_id.to_owned();
        match finding {
            Finding::Consistent => {}
            Finding::Reactivated => self.reactivated.push(id),
            Finding::Repaired(_) => self.repaired.push(id),
            Finding::Detached => self.detached.push(id),
            Finding::Inactive => self.inactive.push(id),
            Finding::Waiting => self.waiting.push(id),
            Finding::Stale => self.stale.push(id),
            Finding::Conflict => self.conflict.push(id),
            Finding::Failed { action, error } => self.failed.push(Failure {
                volume_id: id,
                action,
                error,
            }),
        }
    }

    /// Last step: list foreign mappings (against the records as they are now) and sum up.
    pub fn finish(mut self, ctx: &Context<'_>) -> Report {
        let names = match ctx.sys.dm_names() {
            Ok(n) => n,
            Err(e) => {
                self.detail = format!("cannot list mappings: {e}");
                return self;
            }
        };
        let ours: std::collections::HashSet<String> = match ctx.journal().list() {
            Ok(r) => r.into_iter().map(|r| r.mapping_name).collect(),
            Err(e) => {
                self.detail = format!("cannot read the state records: {e}");
                return self;
            }
        };
        let mut foreign: Vec<String> = names
            .into_iter()
            .filter(|n| n.starts_with("crypt-") && !ours.contains(n))
            .collect();
        foreign.sort();
        self.foreign = foreign;
        self.checked = true;
        self.detail = if self.inactive.is_empty()
            && self.stale.is_empty()
            && self.foreign.is_empty()
            && self.conflict.is_empty()
            && self.failed.is_empty()
            && self.retrying.is_empty()
            && self.corrupt.is_empty()
        {
            "every record matches an active mapping".to_owned()
        } else {
            "attachments need attention (see inactive, stale, foreign, conflict, failed, retrying, corrupt)"
                .to_owned()
        };
        self
    }
}

/// The whole reconcile in one blocking call (no per-volume locking: for callers that own the
/// state directory alone).
pub fn run(ctx: &Context<'_>, keys: Result<Arc<dyn KeyManager>, String>) -> Report {
    let (mut report, ids) = match prepare(ctx) {
        Ok(p) => p,
        Err(r) => return r,
    };
    for id in ids {
        let f = reconcile_one(ctx, keys.clone(), &id);
        report.add(&id, f);
    }
    report.finish(ctx)
}

/// Whether a failed re-activation only lacks something that may come later: the key (key
/// manager unreachable or erroring, secret not there yet) or the device. Such a record is kept
/// and retried with [`backoff`]; any other failure (wrong key, not LUKS, a conflict) is
/// reported once and left to the operator. No retry ever formats: the request runs as it did
/// the first time, and a key or device failure happens before anything is written.
pub fn unavailable(e: &Error) -> bool {
    use crate::keys::Error as K;
    match e {
        Error::Key { source, .. } => matches!(
            source,
            K::NotFound { .. } | K::Unreachable { .. } | K::Server { .. } | K::Auth { .. }
        ),
        Error::NoDevice { .. } => true,
        _ => false,
    }
}

/// The wait before retry number `attempt` (0-based) of the volumes whose key or device was
/// not available: doubling from 1 s, capped at 30 s, so a key manager that returns is noticed
/// within half a minute and one that stays down costs two attempts a minute.
pub fn backoff(attempt: u32) -> std::time::Duration {
    const BASE_SECS: u64 = 1;
    const MAX_SECS: u64 = 30;
    std::time::Duration::from_secs(
        BASE_SECS
            .saturating_mul(1u64 << attempt.min(16))
            .min(MAX_SECS),
    )
}

/// The order re-activations start in: cheapest KDF memory first (volumes with no or a tiny KDF
/// — PBKDF2, plain — are never starved behind argon2 volumes waiting for budget), then by
/// volume id so the order is the same on every start.
pub fn order_by_cost<T>(mut items: Vec<(String, u64, T)>) -> Vec<(String, u64, T)> {
    items.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    items
}

/// How many re-activations run at once: one per CPU (the KDF is CPU-bound, more would only
/// delay every volume's completion), at least one, and never more than the KDF memory budget
/// admits anyway (the budget is still taken per volume: this only bounds the workers).
pub fn workers(cpus: usize, budget_mib: u64, cheapest_mib: u64) -> usize {
    let by_budget = budget_mib / cheapest_mib.max(1);
    cpus.max(1)
        .min(usize::try_from(by_budget).unwrap_or(usize::MAX).max(1))
}

impl Report {
    /// Record a finding of the running pass (or of a retry): counted in `progress`, and a
    /// volume that was retrying leaves `retrying` for its new list.
    pub fn settle(&mut self, volume_id: &str, finding: Finding, retry: bool) {
        let was_retrying = self.retrying.len();
        self.retrying.retain(|f| f.volume_id != volume_id);
        let first = was_retrying == self.retrying.len();
        match finding {
            Finding::Failed { action, error } if retry => self.retrying.push(Failure {
                volume_id: volume_id.to_owned(),
                action,
                error,
            }),
            f => self.add(volume_id, f),
        }
        if first {
            self.progress.done += 1;
            let failed = self.failed.iter().any(|f| f.volume_id == volume_id)
                || self.retrying.iter().any(|f| f.volume_id == volume_id);
            if failed {
                self.progress.failed += 1;
            }
        } else if !self.retrying.iter().any(|f| f.volume_id == volume_id)
            && !self.failed.iter().any(|f| f.volume_id == volume_id)
        {
            // A retried volume that opened (or went away) is no longer a failure.
            self.progress.failed = self.progress.failed.saturating_sub(1);
        }
    }
}

/// Log what a report says, one line per finding.
pub fn log(report: &Report) {
    for c in &report.corrupt {
        tracing::error!(
            file = %c.file.display(),
            reason = %c.reason,
            moved_to = c.moved_to.as_ref().map(|p| p.display().to_string()).as_deref(),
            "corrupt state record moved aside (its attachment is not managed until repaired)"
        );
    }
    if !report.checked {
        tracing::warn!(detail = %report.detail, records = report.records, "start-up reconcile check skipped");
        return;
    }
    for v in &report.reactivated {
        tracing::info!(volume_id = %v, "recorded attachment was not active: attached it again");
    }
    for v in &report.repaired {
        tracing::info!(volume_id = %v, "repaired links of recorded attachment");
    }
    for v in &report.detached {
        tracing::info!(volume_id = %v, "finished interrupted detach");
    }
    for v in &report.inactive {
        tracing::warn!(volume_id = %v, "recorded attachment is not active (attach it again)");
    }
    for v in &report.stale {
        tracing::warn!(volume_id = %v, "attachment is stale: its backing device is gone");
    }
    for v in &report.conflict {
        tracing::warn!(volume_id = %v, "mapping name is held by another device: left untouched");
    }
    for f in &report.failed {
        tracing::error!(volume_id = %f.volume_id, action = f.action, error = %f.error, "reconcile failed (record kept)");
    }
    for m in &report.foreign {
        tracing::warn!(mapping = %m, "crypt mapping not created by volcrypt: leaving it untouched");
    }
    tracing::info!(
        records = report.records,
        reactivated = report.reactivated.len(),
        repaired = report.repaired.len(),
        detached = report.detached.len(),
        inactive = report.inactive.len(),
        stale = report.stale.len(),
        conflict = report.conflict.len(),
        failed = report.failed.len(),
        corrupt = report.corrupt.len(),
        foreign = report.foreign.len(),
        "start-up reconcile done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHASES: [Phase; 5] = [
        Phase::Attaching,
        Phase::Attached,
        Phase::Detaching,
        Phase::Waiting,
        Phase::Lost,
    ];
    const DMS: [DmState; 4] = [
        DmState::Absent,
        DmState::Ours,
        DmState::Stale,
        DmState::Conflict,
    ];

    #[test]
    fn decision_table() {
        use Action::*;
        use DmState::*;
        use Phase::*;
        let cases = [
            (Attaching, Absent, true, Reactivate),
            (Attaching, Absent, false, ReportInactive),
            (Attaching, Ours, true, RepairLinks),
            (Attaching, Stale, true, ReportStale),
            (Attaching, Conflict, true, ReportConflict),
            (Attached, Absent, true, Reactivate),
            (Attached, Absent, false, ReportInactive),
            (Attached, Ours, true, RepairLinks),
            (Attached, Ours, false, RepairLinks),
            (Attached, Stale, true, ReportStale),
            (Attached, Conflict, false, ReportConflict),
            (Detaching, Absent, true, FinishDetach),
            (Detaching, Ours, false, FinishDetach),
            (Detaching, Stale, true, FinishDetach),
            (Detaching, Conflict, true, ReportConflict),
            (Waiting, Absent, true, Wait),
            (Waiting, Absent, false, Wait),
            (Waiting, Ours, true, RepairLinks),
            (Waiting, Stale, true, ReportStale),
            (Lost, Absent, true, Wait),
            (Lost, Stale, true, ReportStale),
            (Lost, Ours, true, RepairLinks),
            (Lost, Conflict, true, ReportConflict),
        ];
        for (p, d, r, want) in cases {
            assert_eq!(decide(p, d, r), want, "{p} {d:?} request={r}");
        }
    }

    /// Invariants over every combination: a mapping on another device is never touched; a
    /// detach is always finished unless the name belongs to someone else; nothing that should
    /// be active is dropped (re-activated or reported).
    #[test]
    fn decision_invariants() {
        for p in PHASES {
            for d in DMS {
                for r in [false, true] {
                    let a = decide(p, d, r);
                    if d == DmState::Conflict {
                        assert_eq!(a, Action::ReportConflict);
                    } else if p == Phase::Detaching {
                        assert_eq!(a, Action::FinishDetach);
                    }
                    if p != Phase::Detaching {
                        assert_ne!(a, Action::FinishDetach, "{p} {d:?}");
                    }
                    if a == Action::Reactivate {
                        assert!(r && d == DmState::Absent);
                        // A record waiting for its device is attached by the udev pass only.
                        assert!(!matches!(p, Phase::Waiting | Phase::Lost), "{p}");
                    }
                }
            }
        }
    }

    #[test]
    fn only_an_unused_tableless_device_made_for_the_name_is_half_created() {
        let info = |uuid: Option<&str>, deps: usize, open: i32| dm::MapInfo {
            name: "crypt-sdb".into(),
            devno: dm::DevNo {
                major: 253,
                minor: 0,
            },
            uuid: uuid.map(str::to_owned),
            open_count: open,
            read_only: false,
            suspended: false,
            deps: vec![
                dm::DevNo {
                    major: 8,
                    minor: 16
                };
                deps
            ],
        };
        let luks = Some("CRYPT-LUKS2-0a1b2c3d4e5f67890a1b2c3d4e5f6789-crypt-sdb");
        assert!(is_half_created(&info(luks, 0, 0), "crypt-sdb"));
        assert!(is_half_created(
            &info(Some("CRYPT-PLAIN-crypt-sdb"), 0, 0),
            "crypt-sdb"
        ));
        // A table (it maps something), a user, another name, another owner: left alone.
        assert!(!is_half_created(&info(luks, 1, 0), "crypt-sdb"));
        assert!(!is_half_created(&info(luks, 0, 1), "crypt-sdb"));
        assert!(!is_half_created(&info(luks, 0, 0), "sdb"));
        assert!(!is_half_created(&info(luks, 0, 0), "b"));
        assert!(!is_half_created(
            &info(Some("LVM-abc-crypt-sdb"), 0, 0),
            "crypt-sdb"
        ));
        assert!(!is_half_created(&info(None, 0, 0), "crypt-sdb"));
    }

    #[test]
    fn report_collects_findings_and_summarises() {
        let mut r = Report::default();
        r.add("a", Finding::Reactivated);
        r.add("b", Finding::Consistent);
        r.add(
            "c",
            Finding::Failed {
                action: "re-activate",
                error: "boom".into(),
            },
        );
        r.add("d", Finding::Detached);
        assert_eq!(r.reactivated, ["a"]);
        assert_eq!(r.detached, ["d"]);
        assert_eq!(r.failed[0].volume_id, "c");
        assert_eq!(r.failed[0].error, "boom");
    }

    #[test]
    fn prepare_moves_corrupt_records_aside_before_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let config = super::super::VolumeConfig {
            state_dir: dir.path().to_owned(),
            ..super::super::VolumeConfig::default()
        };
        std::fs::write(dir.path().join("bad.json"), b"{\"volume_id\": \"ba").unwrap();
        let report = match prepare(&Context::without_keys(config)) {
            Ok((r, ids)) => {
                assert!(ids.is_empty());
                r
            }
            Err(r) => r,
        };
        assert_eq!(report.corrupt.len(), 1, "{report:?}");
        assert!(report.corrupt[0].file.ends_with("bad.json"));
        assert!(report.corrupt[0].reason.contains("corrupt"));
        assert!(report.corrupt[0].moved_to.as_ref().unwrap().exists());
    }

    #[test]
    fn backoff_doubles_from_one_second_to_a_thirty_second_cap() {
        let secs: Vec<u64> = (0..8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX).as_secs(), 30, "no overflow");
    }

    /// PBKDF2 (1 MiB) and plain volumes start before argon2 ones, whatever the journal order;
    /// equal costs go by volume id.
    #[test]
    fn cheapest_kdf_starts_first_in_a_stable_order() {
        let items = vec![
            ("argon-b".to_owned(), 1024, ()),
            ("pbkdf2-z".to_owned(), 1, ()),
            ("argon-a".to_owned(), 1024, ()),
            ("argon-small".to_owned(), 64, ()),
            ("pbkdf2-a".to_owned(), 1, ()),
            ("raw".to_owned(), 0, ()),
        ];
        let order: Vec<String> = order_by_cost(items).into_iter().map(|i| i.0).collect();
        assert_eq!(
            order,
            [
                "raw",
                "pbkdf2-a",
                "pbkdf2-z",
                "argon-small",
                "argon-a",
                "argon-b"
            ]
        );
    }

    #[test]
    fn workers_are_one_per_cpu_within_the_budget() {
        assert_eq!(workers(2, 2048, 1), 2);
        assert_eq!(workers(8, 2048, 1024), 2, "budget admits two 1 GiB KDFs");
        assert_eq!(
            workers(8, 512, 1024),
            1,
            "an oversized KDF still runs, alone"
        );
        assert_eq!(workers(0, 2048, 1), 1);
        assert_eq!(workers(4, 2048, 0), 4);
    }

    #[test]
    fn only_a_missing_key_or_device_is_retried() {
        use crate::keys::Error as K;
        let key = |source| Error::Key {
            key_id: "k".into(),
            source,
        };
        assert!(unavailable(&key(K::NotFound {
            key_id: "k".into(),
            manager: "keystore",
        })));
        assert!(unavailable(&key(K::Unreachable {
            url: "http://127.0.0.1:1".into(),
            key_id: None,
            attempts: 3,
            reason: "connection refused".into(),
        })));
        assert!(unavailable(&key(K::Server {
            url: "http://127.0.0.1:1".into(),
            key_id: None,
            status: 503,
            attempts: 3,
        })));
        assert!(unavailable(&Error::NoDevice {
            path: "/dev/vdz".into(),
            detail: String::new(),
        }));
        // A wrong key or a refused format would fail the same way every time.
        assert!(!unavailable(&Error::WrongKey {
            key_id: "k".into(),
            device: "/dev/vdb".into(),
        }));
        assert!(!unavailable(&key(K::Forbidden {
            key_id: "k".into(),
            url: "http://127.0.0.1:1".into(),
        })));
        assert!(!unavailable(&Error::DmUnavailable {
            detail: "no dm".into()
        }));
    }

    /// Progress counts each record once; a retried volume that opens stops counting as failed,
    /// one that fails for good moves from `retrying` to `failed`.
    #[test]
    fn settle_tracks_progress_through_retries() {
        let fail = |e: &str| Finding::Failed {
            action: "re-activate",
            error: e.into(),
        };
        let mut r = Report {
            progress: Progress {
                total: 4,
                ..Progress::default()
            },
            ..Report::default()
        };
        r.settle("a", Finding::Reactivated, false);
        r.settle("b", fail("key manager unreachable"), true);
        r.settle("c", fail("key manager unreachable"), true);
        r.settle("d", fail("wrong key"), false);
        assert_eq!(
            r.progress,
            Progress {
                total: 4,
                done: 4,
                failed: 3
            }
        );
        assert_eq!(r.retrying.len(), 2);
        assert_eq!(r.failed.len(), 1);
        // Retry round: b still unavailable, c opens.
        r.settle("b", fail("still unreachable"), true);
        r.settle("c", Finding::Reactivated, false);
        assert_eq!(r.progress.failed, 2);
        assert_eq!(r.progress.done, 4);
        assert_eq!(r.retrying.len(), 1);
        assert_eq!(r.retrying[0].error, "still unreachable");
        assert_eq!(r.reactivated, ["a", "c"]);
        // b fails for good: still one failure, now under failed.
        r.settle("b", fail("wrong key"), false);
        assert!(r.retrying.is_empty());
        assert_eq!(r.failed.len(), 2);
        assert_eq!(r.progress.failed, 2);
    }
}
