//! Detach: close a volume's mapping (retrying while it is busy, up to the configured deadline),
//! remove the stable link, point `device_path` back where it pointed, drop the journal record.
//! A mapping that is not active is success, as cryptsetup's exit 4 is for os-brick.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::crypt::Closed;
use super::journal::{self, Journal, Record};
use super::links;
use super::system::System;
use super::timing::{DetachTimings, timed};
use super::{Context, Error, test_pause};
use crate::request;

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

/// Detach `volume_id`, under its lock ([`Journal::lock`]). `device_path` finds an os-brick
/// mapping volcrypt has no record of.
pub fn detach(
    ctx: &Context<'_>,
    volume_id: &str,
    device_path: Option<&Path>,
) -> Result<DetachOutcome, Error> {
    request::check_volume_id(volume_id)?;
    let journal = ctx.journal();
    if device_path.is_none() && journal.get(volume_id)?.is_none() {
        return Ok(nothing_attached(volume_id));
    }
    let _lock = journal.lock(volume_id)?;
    detach_held(ctx, volume_id, device_path)
}

fn nothing_attached(volume_id: &str) -> DetachOutcome {
    DetachOutcome {
        volume_id: volume_id.to_owned(),
        mapping_name: None,
        was_active: false,
        waited_ms: 0,
        note: "no state record and no --device-path: nothing is attached".into(),
        timings: DetachTimings::default(),
    }
}

/// [`detach`] for a caller that holds the volume's lock (the reconcile).
pub(super) fn detach_held(
    ctx: &Context<'_>,
    volume_id: &str,
    device_path: Option<&Path>,
) -> Result<DetachOutcome, Error> {
    let started = Instant::now();
    let mut t = DetachTimings::default();
    let journal = ctx.journal();
    let record = journal.get(volume_id)?;
    let sys = &*ctx.sys;
    sys.dm_check()?;
    let Some(name) = mapping_to_close(sys, record.as_ref(), device_path)? else {
        return Ok(nothing_attached(volume_id));
    };
    tracing::Span::current().record("mapping", name.as_str());
    // Journal the detach before closing: a crash from here on leaves a `detaching` record that
    // the reconcile finishes (close if still open, links, record).
    if let Some(r) = &record {
        timed(&mut t.journal, || journal.begin_detach(r))?;
    }
    test_pause("detaching");
    let start = Instant::now();
    let was_active = match close_with_retry(ctx, &name, &mut t) {
        Ok(active) => active,
        Err(e) => {
            // Still in use: the attachment stays, and so does its record as it was.
            if let Some(r) = &record {
                journal.restore(volume_id, Some(r))?;
            }
            return Err(e);
        }
    };
    test_pause("closed");
    let note = unlink_and_forget(
        ctx,
        &journal,
        volume_id,
        &name,
        record.as_ref(),
        was_active,
        &mut t,
    )?;
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

/// The mapping a detach closes: the record's, else os-brick's for `device_path` (its legacy
/// unprefixed name if that one is active). `None`: nothing to go by.
fn mapping_to_close(
    sys: &dyn System,
    record: Option<&Record>,
    device_path: Option<&Path>,
) -> Result<Option<String>, Error> {
    Ok(match (record, device_path) {
        (Some(r), _) => Some(r.mapping_name.clone()),
        (None, Some(p)) => {
            let base = request::legacy_mapping_name(p).unwrap_or_default();
            let prefixed =
                request::mapping_name_for(&base).map_err(|message| request::Error::Field {
                    field: "device_path",
                    message,
                })?;
            if !base.is_empty() && sys.dm_info(&base)?.is_some() {
                Some(base)
            } else {
                Some(prefixed)
            }
        }
        (None, None) => None,
    })
}

/// Close `name`, retrying while it is busy until the configured deadline. Returns whether it
/// was active; still busy at the deadline is [`Error::Busy`] naming the holders.
fn close_with_retry(ctx: &Context<'_>, name: &str, t: &mut DetachTimings) -> Result<bool, Error> {
    let sys = &*ctx.sys;
    let start = Instant::now();
    let deadline = start + ctx.config.detach_timeout();
    let mut delay = Duration::from_millis(50);
    // A stale mapping (backing device gone) is removed through device-mapper directly:
    // libcryptsetup cannot load it properly without its device.
    let stale = sys
        .dm_info(name)?
        .is_some_and(|i| !i.deps.is_empty() && i.deps.iter().all(|d| !sys.exists(*d)));
    let close = |name: &str| -> Result<Closed, Error> {
        if stale {
            return Ok(match sys.dm_info(name)? {
                None => Closed::NotActive,
                Some(_) if sys.dm_remove(name)? => Closed::Closed,
                Some(_) => Closed::Busy,
            });
        }
        sys.close(name)
    };
    loop {
        match timed(&mut t.dm, || close(name))? {
            Closed::Closed => return Ok(true),
            Closed::NotActive => return Ok(false),
            Closed::Busy => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(busy_error(sys, name, start.elapsed().as_millis()));
                }
                std::thread::sleep(delay.min(deadline - now));
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// The mapping is closed: remove the stable link, restore `device_path`, drop the record.
/// Returns the outcome's note.
fn unlink_and_forget(
    ctx: &Context<'_>,
    journal: &Journal,
    volume_id: &str,
    name: &str,
    record: Option<&Record>,
    was_active: bool,
    t: &mut DetachTimings,
) -> Result<String, Error> {
    let mapper = links::mapper_path(name);
    let stable = links::stable_link_path(&ctx.config.by_id_dir, volume_id);
    timed(&mut t.links, || {
        ctx.sys.remove_if_points_to(&stable, &mapper)
    })?;
    let mut note = if was_active {
        "closed".to_owned()
    } else {
        "mapping was not active".to_owned()
    };
    let Some(r) = record else {
        return Ok(note);
    };
    if let Some(prev) = &r.device_link_previous
        && timed(&mut t.links, || {
            ctx.sys.restore_if_points_to(&r.device_path, &mapper, prev)
        })?
    {
        note.push_str(&format!(
            "; {} points at {} again",
            r.device_path.display(),
            prev.display()
        ));
    }
    super::consumers::commit_detached(ctx, journal, r, &mut t.journal)?;
    journal::trace_phase(name, "detached");
    Ok(note)
}

fn busy_error(sys: &dyn System, name: &str, waited_ms: u128) -> Error {
    let info = sys.dm_info(name).ok().flatten();
    let (open_count, holders, processes) = match &info {
        Some(i) => (i.open_count, sys.holders(i.devno), sys.processes(i.devno)),
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
