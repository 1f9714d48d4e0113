//! The engine's side of devices that come and go: finding a request's device by identity
//! among those present, which journaled attachments a device that appeared is for, and the
//! teardown when an attachment's backing device is removed. The agent hears the udev events
//! and holds the volume locks; what they do to mappings, links and the journal is here, so the
//! CLI's reconcile does the same.

use std::time::{Duration, Instant};

use super::dm::DevNo;
use super::journal::{Journal, Phase, Record};
use super::system::System;
use super::{Context, Error, links};
use crate::request::AttachRequest;
use crate::udev::BlockDevice;

/// How long a mapping whose backing device vanished may stay open before it counts as in use.
const IN_USE_SETTLE: Duration = Duration::from_secs(2);

/// The request with its device resolved now, from the devices present: `Ok(None)` when a
/// selector finds nothing. Path requests are returned as they are. Blocking.
pub fn resolve_now(sys: &dyn System, req: &AttachRequest) -> Result<Option<AttachRequest>, String> {
    let Some(d) = &req.device else {
        return Ok(Some(req.clone()));
    };
    let selector = d.selector().map_err(|e| e.to_string())?;
    Ok(sys.find_device(&selector)?.map(|node| req.resolved(&node)))
}

/// A record waiting for its device (`waiting`), or whose device went away while in use
/// (`lost`): attached again when its device appears.
pub fn is_waiting(r: &Record) -> bool {
    matches!(r.phase, Phase::Waiting | Phase::Lost)
}

/// Whether `d` is the device the record's stored request names (its selector, or its path).
pub fn record_wants(r: &Record, d: &BlockDevice) -> bool {
    let Some(req) = &r.request else {
        return false;
    };
    match &req.device {
        Some(sel) => sel.selector().is_ok_and(|s| d.matches(&s)),
        None => d.is_path(&req.device_path),
    }
}

/// The backing device `devno` of an attached volume is gone: an unused mapping on it is
/// closed, its links undone and the record kept as `waiting` (still desired); a mapping in use
/// is left alone and the record marked `lost`. Returns the phase the record ended in (`None`:
/// not an attached record of that device, nothing done).
///
/// Order: mapping, links, then the record, so a crash in between leaves an `attached` record
/// whose mapping is gone, which the reconcile re-activates or, for a selector request whose
/// device is absent, marks `waiting`.
pub fn device_gone(
    ctx: &Context<'_>,
    volume_id: &str,
    devno: DevNo,
) -> Result<Option<Phase>, Error> {
    let sys = &*ctx.sys;
    let journal = ctx.journal();
    if journal.get(volume_id)?.is_none() {
        return Ok(None);
    }
    let _lock = journal.lock(volume_id)?;
    let Some(mut record) = journal.get(volume_id)? else {
        return Ok(None);
    };
    if record.phase != Phase::Attached || record.backing_devno != devno {
        return Ok(None);
    }
    sys.dm_check()?;
    let name = record.mapping_name.clone();
    // Short-lived openers (udev's probes, a status query reading the mapping through
    // libcryptsetup) hold a mapping for milliseconds: only a mapping still in use after a
    // moment is someone's, to be left alone and reported lost.
    let deadline = Instant::now() + IN_USE_SETTLE;
    while let Some(info) = sys.dm_info(&name)? {
        // Only a mapping on the vanished device is ours to remove.
        if !info.deps.is_empty() && !info.deps.contains(&devno) {
            return Ok(None);
        }
        if info.open_count == 0 && sys.dm_remove(&name)? {
            break;
        }
        if Instant::now() >= deadline {
            journal.lost(&mut record)?;
            return Ok(Some(Phase::Lost));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mapper = links::mapper_path(&name);
    let stable = links::stable_link_path(&ctx.config.by_id_dir, volume_id);
    sys.remove_if_points_to(&stable, &mapper)?;
    if let Some(prev) = &record.device_link_previous {
        sys.restore_if_points_to(&record.device_path, &mapper, prev)?;
    }
    journal.waiting(&mut record)?;
    Ok(Some(Phase::Waiting))
}

/// Attached records whose backing device is not there (it went away while nobody listened).
pub fn vanished(sys: &dyn System, journal: &Journal) -> Result<Vec<Record>, Error> {
    Ok(journal
        .list()?
        .into_iter()
        .filter(|r| r.phase == Phase::Attached && !sys.exists(r.backing_devno))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::udev::device::luks_test_device as luks_dev;

    #[test]
    fn records_want_their_selector_or_their_path() {
        let u = "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55";
        let req: AttachRequest = serde_json::from_str(&format!(
            r#"{{"volume_id":"v","device":{{"luks_uuid":"{u}"}}}}"#
        ))
        .unwrap();
        let mut r: Record = serde_json::from_value(serde_json::json!({
            "volume_id": "v", "mapping_name": "crypt-v", "device_path": "/dev/sdz",
            "backing_device": "/dev/sdz", "backing_devno": {"major": 8, "minor": 1},
            "format": "luks2", "cipher": null, "key_size": null, "key_manager": "keystore",
            "key_id": "k", "derivation": "raw",
            "flags": {"allow_discards": false, "no_read_workqueue": false, "no_write_workqueue": false},
            "formatted": false, "stable_link": null, "device_link_previous": null,
            "attached_at": 1, "phase": "waiting"
        }))
        .unwrap();
        assert!(
            !record_wants(&r, &luks_dev(u)),
            "no stored request: nothing to match"
        );
        r.request = Some(req);
        assert!(record_wants(&r, &luks_dev(u)));
        assert!(!record_wants(
            &r,
            &luks_dev("00000000-0000-0000-0000-000000000000")
        ));
        r.request = Some(
            serde_json::from_str(r#"{"volume_id":"v","device_path":"/dev/disk/by-path/p"}"#)
                .unwrap(),
        );
        let mut d = luks_dev(u);
        assert!(!record_wants(&r, &d));
        d.devlinks.push("/dev/disk/by-path/p".into());
        assert!(record_wants(&r, &d));
        assert!(is_waiting(&r));
    }
}
