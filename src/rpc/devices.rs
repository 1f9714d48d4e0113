//! udev-triggered activation in the agent: the agent's side of [`crate::udev`].
//!
//! - An attach may name its device by identity (`device`: serial, WWN, by-path link, LUKS
//!   UUID) and ask to wait for it (`wait_for_device`). [`resolve_for_attach`] registers a
//!   waiter *before* enumerating the present devices, so a device appearing in between is not
//!   missed; the waiter is woken by an add/change event that matches. No device in time: 504
//!   `device_timeout`, nothing changed.
//! - A remove event for the backing device of an attached volume tears the mapping down when
//!   nobody uses it (mapping closed, stable link removed, record kept in phase `waiting`: the
//!   attachment is still desired), or, when it is in use, leaves the mapping alone and marks the
//!   record `lost` (warning, `GET /v1/attachments` shows `phase: lost`, metric
//!   `volcrypt_lost_attachments`).
//! - An add/change event matching a `waiting` or `lost` record (its selector, or its
//!   `device_path` for path requests) attaches it again with the stored request.
//! - At start, after the reconcile: attached records whose backing device vanished while the
//!   agent was down are handled as a remove event would have been; then the present devices
//!   are enumerated and `waiting`/`lost` records whose device is there are attached. The
//!   monitor is listening before that, so nothing that appears meanwhile is missed.
//!
//! Everything touching a volume runs under that volume's lock, like the API's own operations.

use std::sync::Arc;

use hyper::StatusCode;

use super::app::{App, attach_locked};
use super::errors::ApiError;
use super::waiters::Want;
use crate::request::ValidRequest;
use crate::udev::{self, Action, BlockDevice, DeviceEvent};
use crate::volume::dm::DevNo;
use crate::volume::hotplug::{self, is_waiting, record_wants};
use crate::volume::journal::{Journal, Phase, Record};
use crate::volume::{self, Context};

fn udev_error(e: udev::Error) -> ApiError {
    match e {
        udev::Error::Ambiguous { .. } => {
            ApiError::new(StatusCode::CONFLICT, "ambiguous_device", e.to_string())
                .with_field("device")
        }
        udev::Error::NoMatch { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_device", e.to_string())
                .with_field("device")
        }
        udev::Error::Udev { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "udev_unavailable",
            e.to_string(),
        ),
    }
}

/// POST /v1/attachments: find (or wait for) the device of a request. Path requests without
/// `wait_for_device` pass through untouched (the engine reports a missing path as before).
pub async fn resolve_for_attach(
    app: &Arc<App>,
    valid: ValidRequest,
) -> Result<ValidRequest, ApiError> {
    let want = match &valid.selector {
        Some(s) => Want::Selector(s.clone()),
        None if valid.wait.is_none() => return Ok(valid),
        None => Want::Path(valid.device_path.clone()),
    };
    if valid.wait.is_some() && !app.devices.monitor_running() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "udev_unavailable",
            "wait_for_device needs the agent's udev monitor, which is not running \
             (server.udev = false, or it failed to start: see the agent's log)",
        )
        .with_field("wait_for_device"));
    }
    // Register first, then look: a device that appears in between wakes the waiter. The
    // registration is dropped (unregistered) however this ends, a dropped request included.
    let waiter = valid.wait.map(|_| app.devices.register(want.clone()));
    let present = {
        let want = want.clone();
        tokio::task::spawn_blocking(move || -> Result<Option<BlockDevice>, udev::Error> {
            match &want {
                Want::Selector(s) => udev::find(s),
                Want::Path(p) => Ok(p.exists().then(|| BlockDevice {
                    devnode: Some(p.clone()),
                    ..BlockDevice::default()
                })),
            }
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(udev_error)?
    };
    let device = match (present, waiter, valid.wait) {
        (Some(d), _, _) => d,
        (None, Some(mut w), Some(timeout)) => {
            tracing::info!(want = ?want, timeout_secs = timeout.as_secs(), "waiting for the device to appear");
            match tokio::time::timeout(timeout, &mut w.rx).await {
                Ok(Ok(d)) => confirm(&want, d).await?,
                _ => {
                    app.metrics.failure("attach", "device_timeout");
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "device_timeout",
                        format!(
                            "no device matching {} appeared within {} s (wait_for_device); \
                             nothing was changed",
                            describe(&want),
                            timeout.as_secs()
                        ),
                    )
                    .with_field(match want {
                        Want::Selector(_) => "device",
                        Want::Path(_) => "device_path",
                    }));
                }
            }
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_device",
                format!(
                    "no block device matches {} (ask to wait with wait_for_device)",
                    describe(&want)
                ),
            )
            .with_field("device"));
        }
    };
    if let (Want::Selector(_), Some(devno)) = (&want, device.devno) {
        refuse_if_attached_elsewhere(app, &valid.volume_id, devno, &device).await?;
    }
    Ok(match (&want, device.devnode) {
        (Want::Selector(_), Some(node)) => valid.resolved(&node),
        _ => valid,
    })
}

/// A selector request names its mapping after its volume, so the engine's "mapping already on
/// this device" check cannot see another volume attached to the same device: look at the
/// records instead (409 `attached_elsewhere`, as the engine answers for path requests).
async fn refuse_if_attached_elsewhere(
    app: &Arc<App>,
    volume_id: &str,
    devno: DevNo,
    device: &BlockDevice,
) -> Result<(), ApiError> {
    let other = records(app).await.into_iter().find(|r| {
        r.volume_id != volume_id
            && r.backing_devno == devno
            && matches!(r.phase, Phase::Attaching | Phase::Attached | Phase::Lost)
    });
    match other {
        None => Ok(()),
        Some(r) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "attached_elsewhere",
            format!(
                "device {} ({devno}) is attached as volume {} (mapping {}); refusing to attach \
                 it as volume {volume_id} too",
                device
                    .devnode
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                r.volume_id,
                r.mapping_name
            ),
        )
        .with_field("device")),
    }
}

/// The event's device, checked against every device present now: a selector that has
/// become ambiguous (a cloned LUKS header, a second disk with that serial) is refused, and a
/// stack (multipath map over its paths) resolves to its top. Falls back to the event's device
/// when udev's database does not list it (yet).
async fn confirm(want: &Want, event_device: BlockDevice) -> Result<BlockDevice, ApiError> {
    let Want::Selector(s) = want else {
        return Ok(event_device);
    };
    let s = s.clone();
    match tokio::task::spawn_blocking(move || udev::find(&s)).await {
        Ok(Ok(Some(d))) => Ok(d),
        Ok(Ok(None)) => Ok(event_device),
        Ok(Err(e)) => Err(udev_error(e)),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )),
    }
}

fn describe(want: &Want) -> String {
    match want {
        Want::Selector(s) => s.to_string(),
        Want::Path(p) => p.display().to_string(),
    }
}

/// Start udev-triggered activation: the monitor (unless `server.udev = false`), then, once the
/// start-up reconcile is done, the start-up pass, then the events as they come. The monitor is
/// listening before the pass enumerates, so a device appearing in between is seen.
pub fn start(app: Arc<App>, reconciled: tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DeviceEvent>();
    if app.config.server.udev {
        if !std::path::Path::new("/run/udev/control").exists() {
            tracing::warn!(
                "udevd does not seem to run (no /run/udev/control): no device events will arrive"
            );
        }
        match udev::spawn_monitor(tx) {
            Ok(_) => {
                app.devices.set_monitor_running(true);
                tracing::info!(tag = udev::TAG, "udev monitor listening for block devices");
            }
            Err(e) => {
                tracing::error!(error = %e, "udev monitor could not start: udev-triggered activation is off")
            }
        }
    } else {
        drop(tx);
        tracing::info!("udev monitor disabled (server.udev = false)");
    }
    tokio::spawn(async move {
        let _ = reconciled.await;
        startup_pass(&app).await;
        while let Some(event) = rx.recv().await {
            handle_event(&app, event).await;
        }
    });
}

async fn records(app: &Arc<App>) -> Vec<Record> {
    let journal = Journal::new(&app.config.volume.state_dir);
    match tokio::task::spawn_blocking(move || journal.list()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "udev activation: cannot read the state records");
            Vec::new()
        }
        Err(e) => {
            tracing::error!(error = %e, "udev activation: state read task failed");
            Vec::new()
        }
    }
}

/// Handle what happened while the agent was down: attached records whose backing device is
/// gone are torn down (or marked lost), then every `waiting`/`lost` record whose device is
/// present is attached.
async fn startup_pass(app: &Arc<App>) {
    let devices = match tokio::task::spawn_blocking(udev::scan).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "start-up device enumeration failed");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "start-up device enumeration task failed");
            return;
        }
    };
    // Backing devices that went away while the agent was down: as if the remove event had
    // been heard (teardown if unused → waiting, else lost).
    let journal = Journal::new(&app.config.volume.state_dir);
    match tokio::task::spawn_blocking(move || hotplug::vanished(&volume::HOST, &journal)).await {
        Ok(Ok(gone)) => {
            for r in gone {
                backing_removed(app, &r.volume_id, r.backing_devno).await;
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "udev activation: cannot read the state records"),
        Err(e) => tracing::error!(error = %e, "udev activation: state read task failed"),
    }
    let waiting: Vec<Record> = records(app).await.into_iter().filter(is_waiting).collect();
    tracing::info!(
        devices = devices.len(),
        waiting = waiting.len(),
        "start-up pass: activating waiting attachments whose device is present"
    );
    for r in waiting {
        if let Some(d) = devices.iter().find(|d| record_wants(&r, d)) {
            reactivate(app, &r.volume_id, d.clone()).await;
        }
    }
}

async fn handle_event(app: &Arc<App>, event: DeviceEvent) {
    let d = event.device;
    match event.action {
        Action::Add | Action::Change => {
            app.devices.notify(&d);
            for r in records(app).await.into_iter().filter(is_waiting) {
                if record_wants(&r, &d) {
                    reactivate(app, &r.volume_id, d.clone()).await;
                }
            }
        }
        Action::Remove => {
            let Some(devno) = d.devno else { return };
            for r in records(app).await {
                if r.backing_devno == devno && r.phase == Phase::Attached {
                    backing_removed(app, &r.volume_id, devno).await;
                }
            }
        }
        Action::Other => {}
    }
}

/// Attach a waiting/lost record again on `device`, under its lock (re-checked under it).
async fn reactivate(app: &Arc<App>, volume_id: &str, device: BlockDevice) {
    let guard = app.locks.lock(volume_id).await;
    let journal = Journal::new(&app.config.volume.state_dir);
    let id = volume_id.to_owned();
    let record = match tokio::task::spawn_blocking(move || journal.get(&id)).await {
        Ok(Ok(Some(r))) if is_waiting(&r) && record_wants(&r, &device) => r,
        _ => return, // detached, attached or changed meanwhile
    };
    let Some(stored) = &record.request else {
        return;
    };
    let device = match &stored.device {
        Some(sel) => match sel.selector() {
            Ok(s) => match confirm(&Want::Selector(s), device).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(volume_id, error = %e.message, "device appeared but cannot be told apart: left {}", record.phase);
                    return;
                }
            },
            Err(_) => return,
        },
        None => device,
    };
    let req = match (&stored.device, &device.devnode) {
        (Some(_), Some(node)) => stored.resolved(node),
        (Some(_), None) => return,
        (None, _) => stored.clone(),
    };
    let valid = match req.validate() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(volume_id, error = %e, "stored request no longer validates: left waiting");
            return;
        }
    };
    let span = tracing::info_span!(
        "udev",
        volume_id,
        device = device
            .devnode
            .as_ref()
            .map(|p| p.display().to_string())
            .as_deref()
    );
    let _enter = span.enter();
    match attach_locked(app, valid, guard).await {
        Ok(o) => {
            app.metrics.device_event("reactivated");
            tracing::info!(
                volume_id,
                was = %record.phase,
                device = o.backing_device.as_ref().map(|p| p.display().to_string()).as_deref(),
                mapping = o.mapping_name.as_deref(),
                "device appeared: attachment active again"
            );
        }
        Err(e) => {
            // The engine put the record back as it was (waiting or lost).
            app.metrics.device_event("reactivation_failed");
            tracing::warn!(volume_id, code = e.code, error = %e.message, "device appeared but attaching it failed; the record stays {}", record.phase);
        }
    }
}

/// The backing device of an attached volume is gone: tear down or mark lost.
async fn backing_removed(app: &Arc<App>, volume_id: &str, devno: DevNo) {
    let guard = app.locks.lock(volume_id).await;
    let config = app.config.volume.clone();
    let id = volume_id.to_owned();
    let outcome = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        hotplug::device_gone(&Context::without_keys(config), &id, devno)
    })
    .await;
    match outcome {
        Ok(Ok(Some(Phase::Waiting))) => {
            app.metrics.device_event("teardown");
            tracing::info!(volume_id, %devno, "backing device removed: unused mapping torn down, attachment waiting for the device to return");
        }
        Ok(Ok(Some(_))) => {
            app.metrics.device_event("lost");
            tracing::warn!(volume_id, %devno, "backing device removed while the mapping is in use: mapping left in place, attachment marked lost");
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            app.metrics.device_event("teardown_failed");
            tracing::error!(volume_id, %devno, error = %e, "backing device removed: teardown failed (record kept)");
        }
        Err(e) => tracing::error!(volume_id, error = %e, "teardown task failed"),
    }
}
