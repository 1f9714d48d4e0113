//! The agent's shared state and its admission rules, the one place every engine operation
//! passes through, whether an API request or a udev event asked for it:
//! - operations on one volume are serialized by a per-volume async mutex, different volumes
//!   run in parallel;
//! - attaches and extends (the operations that run a KDF) first take their KDF memory from a
//!   budget semaphore weighted in MiB, as the volume's LUKS header says ([`volume::prepare`]);
//! - engine calls are blocking (libcryptsetup's `CryptDevice` is not `Send`) and run on tokio's
//!   blocking pool; the volume lock, the budget and an in-flight token move into that task, so a
//!   request that hits its deadline (504) leaves the operation to finish with its lock held:
//!   nothing else touches the volume until it has.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hyper::StatusCode;
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use super::Keys;
use super::config::ServeConfig;
use super::errors::ApiError;
use super::metrics::Metrics;
use super::peer::Access;
use super::waiters::Waiters;
use crate::request::ValidRequest;
use crate::volume::{self, Context};

/// Upper bound on operations in flight (also the token count the shutdown waits to get back).
const MAX_IN_FLIGHT: u32 = 4096;

/// The server's shared state.
pub struct App {
    pub config: ServeConfig,
    pub access: Access,
    pub metrics: Metrics,
    pub(crate) keys: Keys,
    pub(crate) locks: VolumeLocks,
    /// udev-triggered activation: pending device waits, whether the monitor runs.
    pub(crate) devices: Waiters,
    kdf_budget: Arc<Semaphore>,
    pub(crate) kdf_budget_mib: u32,
    in_flight: Arc<Semaphore>,
    shutting_down: AtomicBool,
    /// The start-up reconcile report (`checked: false` until the check has run).
    pub(crate) reconcile: Mutex<volume::Report>,
    /// Running and last verify of each volume.
    pub(crate) verify_jobs: super::verify_jobs::VerifyJobs,
}

impl App {
    pub fn new(config: ServeConfig, access: Access, keys: Keys) -> App {
        let budget = u32::try_from(config.server.kdf_budget_mib()).unwrap_or(u32::MAX >> 3);
        let budget = budget.min(Semaphore::MAX_PERMITS as u32);
        let metrics = Metrics::new();
        metrics.kdf_memory_budget_mib.set(i64::from(budget));
        App {
            config,
            access,
            metrics,
            keys,
            locks: VolumeLocks::default(),
            devices: Waiters::default(),
            kdf_budget: Arc::new(Semaphore::new(budget as usize)),
            kdf_budget_mib: budget,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize)),
            shutting_down: AtomicBool::new(false),
            reconcile: Mutex::new(volume::Report {
                detail: "start-up check still running".into(),
                ..Default::default()
            }),
            verify_jobs: Default::default(),
        }
    }

    /// Run the start-up reconcile in the background ([`super::reactivate`]): journaled
    /// volumes re-activated in parallel under their locks and the KDF budget, progress in
    /// health. The handle resolves when every record has its first finding; volumes whose key
    /// or device is not available yet are retried afterwards in their own task.
    pub fn spawn_reconcile(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(super::reactivate::startup(self.clone()))
    }

    /// Whether [`App::drain`] has begun (background work stops starting new operations).
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Refuse new operations, then wait until every running one has returned its token.
    pub async fn drain(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // A running verify only reads: stop it rather than wait for a whole disk.
        self.verify_jobs.cancel_all();
        if let Ok(all) = self.in_flight.acquire_many(MAX_IN_FLIGHT).await {
            all.forget();
        }
    }

    pub fn operations_in_flight(&self) -> usize {
        MAX_IN_FLIGHT as usize - self.in_flight.available_permits()
    }
}

/// One async mutex per volume id. Entries nobody holds or waits for are pruned on the next
/// lock, so the map stays as small as the set of volumes being worked on.
#[derive(Default)]
pub(crate) struct VolumeLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl VolumeLocks {
    pub(crate) async fn lock(&self, volume_id: &str) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, m| Arc::strong_count(m) > 1);
            map.entry(volume_id.to_owned()).or_default().clone()
        };
        m.lock_owned().await
    }
}

/// What an engine task holds until it returns (the KDF share only until its keyslot is
/// unlocked: see [`KdfShare`]).
pub(crate) struct Held {
    pub(crate) _volume: Option<OwnedMutexGuard<()>>,
    pub(crate) _kdf: Option<OwnedSemaphorePermit>,
    pub(crate) kdf_mib: u32,
}

/// An engine task's share of the KDF memory budget. It goes back as soon as the attach has
/// unlocked its keyslot ([`Context::after_kdf`]): the memory is free then, and the next attach
/// or re-activation can start its KDF while this one waits for device-mapper and udev.
/// Whatever was not given back then is when the task ends.
pub(crate) struct KdfShare {
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    mib: u32,
    app: Arc<App>,
}

impl KdfShare {
    pub(crate) fn release(&self) {
        let taken = self.permit.lock().unwrap_or_else(|e| e.into_inner()).take();
        if taken.is_some() {
            self.app
                .metrics
                .kdf_memory_in_use_mib
                .dec_by(i64::from(self.mib));
        }
    }
}

/// Take `mib` of the KDF budget (clamped to the whole budget, so one oversized KDF runs alone
/// rather than never).
pub(crate) async fn take_kdf(app: &App, mib: u64) -> Result<(OwnedSemaphorePermit, u32), ApiError> {
    let n = u32::try_from(mib)
        .unwrap_or(u32::MAX)
        .clamp(1, app.kdf_budget_mib.max(1));
    let t0 = Instant::now();
    let permit = app
        .kdf_budget
        .clone()
        .acquire_many_owned(n)
        .await
        .map_err(|_| shutting_down())?;
    app.metrics.observe_kdf_wait(t0.elapsed().as_secs_f64());
    app.metrics.kdf_memory_in_use_mib.inc_by(i64::from(n));
    tracing::debug!(kdf_mib = n, "KDF budget admitted");
    Ok((permit, n))
}

pub(crate) fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the agent is shutting down and takes no new operations",
    )
}

/// Run one blocking engine call on the blocking pool with what it holds; record its latency and
/// failure reason whatever happens to the request.
pub(crate) async fn run_engine<T, F>(
    app: &Arc<App>,
    op: &'static str,
    held: Held,
    f: F,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Context<'_>) -> Result<T, ApiError> + Send + 'static,
{
    if app.shutting_down.load(Ordering::SeqCst) {
        return Err(shutting_down());
    }
    let token = app
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| shutting_down())?;
    let app2 = app.clone();
    let span = tracing::Span::current();
    let task = tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let _token = token;
        let Held {
            _volume,
            _kdf,
            kdf_mib,
        } = held;
        let share = Arc::new(KdfShare {
            permit: Mutex::new(_kdf),
            mib: kdf_mib,
            app: app2.clone(),
        });
        app2.metrics.in_flight.inc();
        let t0 = Instant::now();
        let result = match (app2.keys.factory)() {
            Ok(keys) => {
                let share = share.clone();
                let ctx = Context::new(keys.as_ref(), app2.config.volume.clone())
                    .and_after_kdf(move || share.release());
                f(&ctx)
            }
            Err(message) => Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "key_manager",
                format!("key manager unavailable: {message}"),
            )),
        };
        let secs = t0.elapsed().as_secs_f64();
        app2.metrics
            .observe_operation(op, secs, result.as_ref().err().map(|e| e.code));
        app2.metrics.in_flight.dec();
        share.release();
        tracing::info!(
            op,
            ms = (secs * 1000.0) as u64,
            ok = result.is_ok(),
            "engine operation done"
        );
        drop(_volume);
        result
    });
    task.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the {op} operation failed unexpectedly: {e}"),
        )
    })?
}

pub(crate) fn engine_err(e: volume::Error) -> ApiError {
    ApiError::from(&e)
}

/// Attach a request whose device is known (a path, or a resolved selector): the volume lock,
/// the KDF budget, the engine. Also what udev-triggered re-activation runs.
pub(crate) async fn attach_resolved(
    app: &Arc<App>,
    valid: ValidRequest,
) -> Result<volume::AttachOutcome, ApiError> {
    let volume_guard = app.locks.lock(&valid.volume_id).await;
    attach_locked(app, valid, volume_guard).await
}

/// [`attach_resolved`] for a caller that already holds the volume's lock. The engine reads the
/// device's LUKS header once ([`volume::prepare`]): its KDF memory is taken from the budget
/// before the attach runs, and the attach unlocks with the same header.
pub(crate) async fn attach_locked(
    app: &Arc<App>,
    valid: ValidRequest,
    volume_guard: OwnedMutexGuard<()>,
) -> Result<volume::AttachOutcome, ApiError> {
    let prepared = tokio::task::spawn_blocking(move || volume::prepare(&volume::HOST, valid))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(engine_err)?;
    let cost = prepared.kdf_mib(
        &app.config.volume,
        app.config.server.kdf_memory_estimate_mib,
    );
    let (kdf, kdf_mib) = if cost == 0 {
        (None, 0)
    } else {
        let (permit, n) = take_kdf(app, cost).await?;
        (Some(permit), n)
    };
    let held = Held {
        _volume: Some(volume_guard),
        _kdf: kdf,
        kdf_mib,
    };
    let outcome = run_engine(app, "attach", held, move |ctx| {
        volume::attach_prepared(ctx, prepared).map_err(engine_err)
    })
    .await?;
    app.metrics.observe_attach_phases(&outcome.timings);
    Ok(outcome)
}

/// The 504 of a request past its deadline.
pub(crate) fn request_timeout(timeout: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!(
            "the request did not complete within {} s; an engine operation already \
             started keeps running and holds the volume until it ends: query \
             GET /v1/attachments/{{volume_id}}",
            timeout.as_secs()
        ),
    )
}
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_volume_serializes_and_locks_are_pruned() {
        let locks = VolumeLocks::default();
        let g = locks.lock("a").await;
        // A different volume proceeds while "a" is held.
        let _b = tokio::time::timeout(std::time::Duration::from_secs(1), locks.lock("b"))
            .await
            .expect("other volume not blocked");
        // The same volume waits.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), locks.lock("a"))
                .await
                .is_err()
        );
        drop(g);
        drop(_b);
        let _c = locks.lock("c").await;
        let n = locks.0.lock().unwrap().len();
        assert_eq!(n, 1, "unused entries pruned");
    }
}
