//! The agent's start-up pass over the journal: every record resolved by the engine's reconcile
//! ([`volume::reconcile`]), the volumes that should be active re-activated **in parallel**.
//!
//! A host that reboots with many attached volumes waits for all of them before its guests
//! start, and each LUKS2 unlock is a deliberately slow KDF; one after another that is the sum
//! of them all. So:
//! - every journaled volume's lock is taken first: a request for one of them waits until its
//!   re-activation is done (then finds it attached) instead of racing it;
//! - each record is planned (dm state, links, header read) by a pool of workers, then the
//!   re-activations start cheapest KDF first ([`reconcile::order_by_cost`]), one worker per
//!   CPU ([`reconcile::workers`]), each taking the KDF memory its header asks for from the same
//!   budget attaches use, so the budget is never exceeded and PBKDF2 volumes never queue
//!   behind argon2 ones;
//! - `/v1/health` answers throughout and shows `reconcile.progress` (total, done, failed);
//! - a volume whose key or device is not available yet ([`reconcile::unavailable`]) stays in
//!   the journal, is listed under `reconcile.retrying`, and is retried with
//!   [`reconcile::backoff`] until it opens, fails otherwise, or its record goes away.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::app::{App, Held, engine_err, run_engine, take_kdf};
use crate::volume::{self, Context, reconcile};
use reconcile::{Finding, Step};

/// The start-up pass; returns when every record has a first finding (the retries of the
/// unavailable ones go on in their own task).
#[allow(clippy::result_large_err)] // reconcile::prepare's report, once at start-up
pub(crate) async fn startup(app: Arc<App>) {
    let ctx = Context::without_keys(app.config.volume.clone());
    let prepared = tokio::task::spawn_blocking(move || reconcile::prepare(&ctx)).await;
    let (mut report, ids) = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(report)) => return publish_final(&app, report),
        Err(e) => {
            return publish_final(
                &app,
                volume::Report {
                    detail: format!("reconcile task failed: {e}"),
                    ..Default::default()
                },
            );
        }
    };
    let mut guards = HashMap::new();
    for id in &ids {
        guards.insert(id.clone(), app.locks.lock(id).await);
    }
    report.progress.total = ids.len();
    report.detail = RUNNING.into();
    publish(&app, &report);

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let estimate = app.config.server.kdf_memory_estimate_mib;
    // Plan every record (each under its lock, which moves into the task and back).
    let planners = Arc::new(Semaphore::new(cpus.max(1)));
    let mut plans = JoinSet::new();
    for (id, guard) in guards {
        let (app, planners) = (app.clone(), planners.clone());
        plans.spawn(async move {
            let _slot = planners.acquire_owned().await;
            let step = plan(&app, &id).await;
            (id, guard, step)
        });
    }
    let mut queue = Vec::new();
    while let Some(joined) = plans.join_next().await {
        let Ok((id, guard, step)) = joined else {
            continue; // a panicked planner: its lock is released, the record stays as it is
        };
        match step {
            Step::Done(finding) => settle(&app, &id, finding, false),
            Step::Reactivate(p) => {
                let cost = p.prepared().kdf_mib(&app.config.volume, estimate);
                queue.push((id, cost, (p, guard)));
            }
        }
    }
    let queue = reconcile::order_by_cost(queue);
    let cheapest = queue.first().map_or(1, |q| q.1);
    let slots = reconcile::workers(cpus, u64::from(app.kdf_budget_mib), cheapest);
    tracing::info!(
        volumes = queue.len(),
        workers = slots,
        "re-activating journaled volumes"
    );
    let slots = Arc::new(Semaphore::new(slots));
    let mut running = JoinSet::new();
    for (id, cost, (prepared, guard)) in queue {
        // Taken here, in order, so the cheapest start first.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let app = app.clone();
        running.spawn(async move {
            let (finding, retry) = reactivate(&app, *prepared, cost, guard, Some(slot)).await;
            settle(&app, &id, finding, retry);
        });
    }
    while running.join_next().await.is_some() {}

    let report = current(&app);
    let ctx = Context::without_keys(app.config.volume.clone());
    let report = tokio::task::spawn_blocking(move || report.finish(&ctx))
        .await
        .unwrap_or_else(|e| volume::Report {
            detail: format!("reconcile task failed: {e}"),
            ..Default::default()
        });
    let retry: Vec<String> = report
        .retrying
        .iter()
        .map(|f| f.volume_id.clone())
        .collect();
    publish_final(&app, report);
    if !retry.is_empty() {
        tokio::spawn(retry_loop(app, retry));
    }
}

/// What the health check shows until the first pass is done.
const RUNNING: &str = "start-up check still running";

/// Retry the volumes whose key or device was not available, with backoff, until none is left
/// or the agent shuts down. Each round re-plans under the volume's lock: a record detached or
/// attached by a request meanwhile resolves like any other.
async fn retry_loop(app: Arc<App>, mut ids: Vec<String>) {
    let mut attempt = 0u32;
    while !ids.is_empty() {
        let wait = reconcile::backoff(attempt);
        tracing::info!(
            volumes = ids.len(),
            wait_s = wait.as_secs(),
            "retrying re-activation of volumes whose key or device was not available"
        );
        tokio::time::sleep(wait).await;
        if app.is_shutting_down() {
            return;
        }
        let mut still = Vec::new();
        for id in ids {
            let guard = app.locks.lock(&id).await;
            let (finding, retry) = match plan(&app, &id).await {
                Step::Done(f) => (f, false),
                Step::Reactivate(p) => {
                    let cost = p.prepared().kdf_mib(
                        &app.config.volume,
                        app.config.server.kdf_memory_estimate_mib,
                    );
                    reactivate(&app, *p, cost, guard, None).await
                }
            };
            if retry {
                still.push(id.clone());
            } else {
                tracing::info!(volume_id = %id, finding = ?finding, "retried re-activation resolved");
            }
            settle(&app, &id, finding, retry);
        }
        ids = still;
        attempt = attempt.saturating_add(1);
        // The summary line follows what the retries changed.
        let report = current(&app);
        let ctx = Context::without_keys(app.config.volume.clone());
        if let Ok(report) = tokio::task::spawn_blocking(move || report.finish(&ctx)).await {
            publish(&app, &report);
        }
    }
}

/// The engine's plan for one record, on the blocking pool, with the key manager when there is
/// one (a record confirmed attached registers its consumer; see [`volume::consumers`]).
async fn plan(app: &Arc<App>, id: &str) -> Step {
    let config = app.config.volume.clone();
    let factory = app.keys.factory.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || match factory() {
        Ok(keys) => reconcile::plan_one(&Context::new(keys.as_ref(), config), &id),
        Err(e) => {
            tracing::debug!(volume_id = %id, error = %e, "planning without the key manager: consumers not updated");
            reconcile::plan_one(&Context::without_keys(config), &id)
        }
    })
        .await
        .unwrap_or_else(|e| {
            Step::Done(Finding::Failed {
                action: "reconcile",
                error: e.to_string(),
            })
        })
}

/// One re-activation under the volume's lock and `cost` MiB of the KDF budget. Returns the
/// finding and whether it is worth retrying (key or device not available). `worker`, the
/// start-up pass's CPU slot, goes back with the KDF budget as soon as the keyslot is unlocked:
/// the next volume's KDF then runs while this one waits for device-mapper and udev.
async fn reactivate(
    app: &Arc<App>,
    planned: reconcile::Reactivation,
    cost: u64,
    guard: OwnedMutexGuard<()>,
    worker: Option<OwnedSemaphorePermit>,
) -> (Finding, bool) {
    let (kdf, kdf_mib) = if cost == 0 {
        (None, 0)
    } else {
        match take_kdf(app, cost).await {
            Ok((permit, n)) => (Some(permit), n),
            Err(e) => return (failed(e.message), false),
        }
    };
    let held = Held {
        _volume: Some(guard),
        _kdf: kdf,
        kdf_mib,
    };
    let unavailable = Arc::new(AtomicBool::new(false));
    let flag = unavailable.clone();
    let worker = std::sync::Mutex::new(worker);
    let result = run_engine(app, "attach", held, move |ctx| {
        // Start, unlock and end lines of each re-activation: their order in the log shows
        // which ran side by side, and which held KDF memory at once (from start to unlock).
        let volume_id = planned.prepared().volume_id().to_owned();
        let id = volume_id.clone();
        let ctx = &ctx.and_after_kdf(move || {
            tracing::info!(
                volume_id = id,
                kdf_mib,
                "re-activation unlocked, KDF share returned"
            );
            drop(worker.lock().unwrap_or_else(|e| e.into_inner()).take());
        });
        tracing::info!(volume_id, kdf_mib, "re-activation started");
        let result = planned.run(ctx);
        tracing::info!(
            volume_id,
            kdf_mib,
            ok = result.is_ok(),
            "re-activation done"
        );
        result.map_err(|e| {
            flag.store(reconcile::unavailable(&e), Ordering::SeqCst);
            engine_err(e)
        })
    })
    .await;
    match result {
        Ok(outcome) => {
            app.metrics.observe_attach_phases(&outcome.timings);
            (Finding::Reactivated, false)
        }
        // No key manager at all (its client could not be built) is as unavailable as a down one.
        Err(e) => {
            let retry = unavailable.load(Ordering::SeqCst) || e.code == "key_manager";
            (failed(e.message), retry)
        }
    }
}

fn failed(error: String) -> Finding {
    Finding::Failed {
        action: "re-activate",
        error,
    }
}

fn settle(app: &App, id: &str, finding: Finding, retry: bool) {
    let mut r = app.reconcile.lock().unwrap_or_else(|e| e.into_inner());
    if let Finding::Failed { error, .. } = &finding {
        tracing::warn!(volume_id = id, retry, error = %error, "re-activation failed");
    }
    r.settle(id, finding, retry);
}

fn current(app: &App) -> volume::Report {
    app.reconcile
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

fn publish(app: &App, report: &volume::Report) {
    *app.reconcile.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
}

fn publish_final(app: &App, report: volume::Report) {
    reconcile::log(&report);
    *app.reconcile.lock().unwrap_or_else(|e| e.into_inner()) = report;
}
