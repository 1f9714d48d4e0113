//! udev-triggered activation in the agent (issue 4 §3): the agent's side of [`crate::udev`].
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

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hyper::StatusCode;
use tokio::sync::oneshot;

use super::errors::ApiError;
use super::routes::App;
use crate::request::{AttachRequest, Selector, ValidRequest};
use crate::udev::{self, Action, BlockDevice, DeviceEvent};
use crate::volume::state::{self, Phase, Record};
use crate::volume::{self, VolumeConfig, dm::Dm, links};

/// What a pending attach waits for.
#[derive(Debug, Clone)]
enum Want {
    Selector(Selector),
    /// A `device_path` request with `wait_for_device`: the path (node or udev link).
    Path(PathBuf),
}

impl Want {
    fn matches(&self, d: &BlockDevice) -> bool {
        match self {
            Want::Selector(s) => d.matches(s),
            Want::Path(p) => d.is_path(p),
        }
    }
}

struct Waiter {
    id: u64,
    want: Want,
    tx: oneshot::Sender<BlockDevice>,
}

/// The agent's udev state: pending waits and whether the monitor runs.
#[derive(Default)]
pub struct Devices {
    monitor_running: AtomicBool,
    waiters: Mutex<Vec<Waiter>>,
    next_id: AtomicU64,
}

/// A pending wait; unregistered when dropped.
struct Registration<'a> {
    devices: &'a Devices,
    id: u64,
    rx: oneshot::Receiver<BlockDevice>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.devices.unregister(self.id);
    }
}

impl Devices {
    fn register(&self, want: Want) -> Registration<'_> {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Waiter { id, want, tx });
        Registration {
            devices: self,
            id,
            rx,
        }
    }

    fn unregister(&self, id: u64) {
        self.lock().retain(|w| w.id != id);
    }

    /// Wake every waiter the device satisfies (add/change events).
    fn notify(&self, d: &BlockDevice) {
        let mut waiters = self.lock();
        let (hit, keep): (Vec<Waiter>, Vec<Waiter>) =
            waiters.drain(..).partition(|w| w.want.matches(d));
        *waiters = keep;
        for w in hit {
            let _ = w.tx.send(d.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn monitor_running(&self) -> bool {
        self.monitor_running.load(Ordering::SeqCst)
    }
}

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

/// The request with its device resolved now, from the devices present: `Ok(None)` when a
/// selector finds nothing. Path requests are returned as they are. Blocking.
pub fn resolve_now(req: &AttachRequest) -> Result<Option<AttachRequest>, String> {
    let Some(d) = &req.device else {
        return Ok(Some(req.clone()));
    };
    let selector = d.selector().map_err(|e| e.to_string())?;
    match udev::find(&selector).map_err(|e| e.to_string())? {
        Some(dev) => Ok(dev.devnode.map(|n| req.resolved(&n))),
        None => Ok(None),
    }
}

/// Store `record` again in `phase`. Blocking.
pub fn mark(config: &VolumeConfig, record: &Record, phase: Phase) -> Result<(), volume::Error> {
    let mut r = record.clone();
    r.phase = phase;
    state::save(&config.state_dir, &r)
}

/// POST /v1/attachments: find (or wait for) the device of a request. Path requests without
/// `wait_for_device` pass through untouched (the engine reports a missing path as before).
pub async fn resolve_for_attach(
    app: &Arc<App>,
    req: &AttachRequest,
    valid: &ValidRequest,
) -> Result<AttachRequest, ApiError> {
    let want = match &valid.selector {
        Some(s) => Want::Selector(s.clone()),
        None if valid.wait.is_none() => return Ok(req.clone()),
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
        (Want::Selector(_), Some(node)) => req.resolved(&node),
        _ => req.clone(),
    })
}

/// A selector request names its mapping after its volume, so the engine's "mapping already on
/// this device" check cannot see another volume attached to the same device: look at the
/// records instead (409 `attached_elsewhere`, as the engine answers for path requests).
async fn refuse_if_attached_elsewhere(
    app: &Arc<App>,
    volume_id: &str,
    devno: volume::dm::DevNo,
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
                app.devices.monitor_running.store(true, Ordering::SeqCst);
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
    let dir = app.config.volume.state_dir.clone();
    match tokio::task::spawn_blocking(move || state::list(&dir)).await {
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

fn is_waiting(r: &Record) -> bool {
    matches!(r.phase, Phase::Waiting | Phase::Lost)
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
    for r in records(app).await {
        if r.phase == Phase::Attached && !r.backing_devno.exists() {
            backing_removed(app, &r.volume_id, r.backing_devno).await;
        }
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

/// Whether `d` is the device the record's stored request names.
fn record_wants(r: &Record, d: &BlockDevice) -> bool {
    let Some(req) = &r.request else {
        return false;
    };
    match &req.device {
        Some(sel) => sel.selector().is_ok_and(|s| d.matches(&s)),
        None => d.is_path(&req.device_path),
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
    let dir = app.config.volume.state_dir.clone();
    let id = volume_id.to_owned();
    let record = match tokio::task::spawn_blocking(move || state::load(&dir, &id)).await {
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
    let span = tracing::info_span!("udev", volume_id, device = ?device.devnode);
    let _enter = span.enter();
    match super::routes::attach_locked(app, req, valid, guard).await {
        Ok(o) => {
            app.metrics.device_event("reactivated");
            tracing::info!(
                volume_id,
                was = %record.phase,
                device = ?o.backing_device,
                mapping = ?o.mapping_name,
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
async fn backing_removed(app: &Arc<App>, volume_id: &str, devno: volume::dm::DevNo) {
    let guard = app.locks.lock(volume_id).await;
    let config = app.config.volume.clone();
    let id = volume_id.to_owned();
    let outcome = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        teardown(&config, &id, devno)
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

/// Blocking part of [`backing_removed`]: returns the phase the record ended in (`None`: the
/// record changed meanwhile, nothing done). Order: mapping, links, then the record, so a crash
/// in between leaves an `attached` record whose mapping is gone — which the start-up reconcile
/// re-activates or, for a selector request whose device is absent, marks `waiting`.
fn teardown(
    config: &VolumeConfig,
    volume_id: &str,
    devno: volume::dm::DevNo,
) -> Result<Option<Phase>, volume::Error> {
    let Some(record) = state::load(&config.state_dir, volume_id)? else {
        return Ok(None);
    };
    if record.phase != Phase::Attached || record.backing_devno != devno {
        return Ok(None);
    }
    let dm = Dm::open()?;
    let name = &record.mapping_name;
    if let Some(info) = dm.info(name)? {
        // Only a mapping on the vanished device is ours to remove.
        if !info.deps.is_empty() && !info.deps.contains(&devno) {
            return Ok(None);
        }
        if info.open_count > 0 || !dm.remove(name)? {
            mark(config, &record, Phase::Lost)?;
            return Ok(Some(Phase::Lost));
        }
    }
    let mapper = links::mapper_path(name);
    let stable = links::stable_link_path(&config.by_id_dir, volume_id);
    links::remove_if_points_to(&stable, &mapper)?;
    if let Some(prev) = &record.device_link_previous {
        links::restore_if_points_to(&record.device_path, &mapper, prev)?;
    }
    mark(config, &record, Phase::Waiting)?;
    Ok(Some(Phase::Waiting))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn luks_dev(uuid: &str) -> BlockDevice {
        BlockDevice {
            devnode: Some("/dev/sdz".into()),
            fs_type: Some("crypto_LUKS".into()),
            fs_uuid: Some(uuid.into()),
            ..BlockDevice::default()
        }
    }

    #[tokio::test]
    async fn waiters_are_woken_only_by_matching_devices() {
        let d = Devices::default();
        let u = "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55";
        let mut w = d.register(Want::Selector(Selector::LuksUuid(u.into())));
        let mut w_path = d.register(Want::Path("/dev/sdz".into()));
        d.notify(&luks_dev("00000000-0000-0000-0000-000000000000"));
        assert!(w.rx.try_recv().is_err(), "woken by another UUID");
        assert!(
            w_path.rx.try_recv().is_ok(),
            "path waiter woken by its node"
        );
        assert_eq!(d.lock().len(), 1, "only the woken waiter is removed");
        d.notify(&luks_dev(u));
        assert_eq!(
            (&mut w.rx).await.unwrap().devnode.as_deref(),
            Some("/dev/sdz".as_ref())
        );
        assert!(d.lock().is_empty(), "woken waiters are removed");
        drop((w, w_path));
        // A wait that ends without a device (timeout, dropped request) leaves nothing behind.
        let w = d.register(Want::Path("/dev/x".into()));
        assert_eq!(d.lock().len(), 1);
        drop(w);
        assert!(d.lock().is_empty());
    }

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
