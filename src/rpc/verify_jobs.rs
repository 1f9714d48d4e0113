//! Verify jobs: every verify the agent runs (`POST /v1/attachments/{id}/verify`, synchronous
//! or `"async": true`, and the periodic sampled verification) is one job per volume, so that
//! - a long verify can be followed (`GET …/verify`: bytes done of bytes to check) and
//!   cancelled (`DELETE …/verify`, a detach of the volume, the agent's shutdown);
//! - the last result of each volume stays in memory for `GET /v1/attachments/{id}` and feeds
//!   the per-volume metrics (bytes verified, mismatches, time of the last completed verify).
//!
//! A job is admitted like every operation that unlocks a keyslot ([`super::routes::admit_unlock`]:
//! the volume's lock and its KDF memory), and runs in the engine's blocking pool with a cancel
//! flag and progress counters ([`volume::verify::Options`]). A cancelled job leaves nothing
//! behind: a verify only reads, its devices are closed and its lock and budget returned when
//! the engine call ends, and the cancel takes effect within one chunk (1 MiB per side).
//! One verify per volume at a time: a second `POST` while one runs is 409 `verify_running`.
//!
//! The last job of each volume (finished, failed or cancelled) and the per-volume metrics live
//! in memory; a detach forgets both, so a volume attached again starts without them. A
//! *completed* verify (one with a report) is also written into the volume's journal record
//! (`last_verify`), under the volume's lock, so `GET /v1/attachments/{id}` still shows it after
//! an agent restart; a failed or cancelled job changes nothing on disk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use serde::Serialize;
use tokio::sync::{Notify, oneshot, watch};

use super::app::{App, run_engine};
use super::errors::ApiError;
use crate::volume::{
    self,
    verify::{Mode, Progress, Report, Request},
};

/// Who started a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Api,
    Periodic,
}

/// The error of a job that did not produce a report.
#[derive(Debug, Clone, Serialize)]
pub struct JobError {
    pub code: &'static str,
    pub message: String,
}

/// A job as the API shows it, running or finished.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub volume_id: String,
    /// `queued` (waiting for the volume's lock or the KDF budget), `running`, `finished` (a
    /// report; see `verdict`), `failed` (see `error`), `cancelled`.
    pub state: &'static str,
    pub trigger: Trigger,
    #[serde(flatten)]
    pub mode: Mode,
    pub started_at_unix: u64,
    /// Bytes of the mapping the job checks (0 until the sectors are chosen).
    pub bytes_total: u64,
    pub bytes_done: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_unix: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_checked: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mismatch_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// The whole report of a finished job (`GET …/verify` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
}

struct Running {
    job: u64,
    view: JobView,
    admitted: Arc<AtomicBool>,
    counters: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    /// Wakes a job still waiting for its admission.
    wake: Arc<Notify>,
    /// Turns true when the job has ended and its result is recorded.
    ended: watch::Receiver<bool>,
}

impl Running {
    fn view(&self) -> JobView {
        let mut v = self.view.clone();
        if self.admitted.load(Ordering::Relaxed) {
            v.state = "running";
        }
        v.bytes_total = self.counters.total.load(Ordering::Relaxed);
        v.bytes_done = self.counters.done.load(Ordering::Relaxed);
        v
    }
}

#[derive(Default)]
struct Entry {
    running: Option<Running>,
    last: Option<JobView>,
}

/// The agent's verify jobs, by volume id.
#[derive(Default)]
pub(crate) struct VerifyJobs {
    entries: Mutex<HashMap<String, Entry>>,
    next: std::sync::atomic::AtomicU64,
}

/// What the sync route awaits: the job's report or error.
pub(crate) type Outcome = oneshot::Receiver<Result<Report, ApiError>>;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VerifyJobs {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The running job of the volume, else its last finished one (with the full report).
    pub(crate) fn view(&self, volume_id: &str) -> Option<JobView> {
        let map = self.map();
        let e = map.get(volume_id)?;
        match &e.running {
            Some(r) => Some(r.view()),
            None => e.last.clone(),
        }
    }

    /// The last finished job of the volume, without the report (`GET /v1/attachments/{id}`).
    pub(crate) fn last(&self, volume_id: &str) -> Option<JobView> {
        let mut v = self.map().get(volume_id)?.last.clone()?;
        v.report = None;
        Some(v)
    }

    /// Cancel the volume's running job and wait until it has ended (its devices closed, its
    /// lock and budget returned); the job's final view, `None` when none ran.
    pub(crate) async fn cancel_and_wait(&self, volume_id: &str) -> Option<JobView> {
        let mut ended = {
            let map = self.map();
            let r = map.get(volume_id)?.running.as_ref()?;
            r.cancel.store(true, Ordering::SeqCst);
            r.wake.notify_one();
            r.ended.clone()
        };
        let _ = ended.wait_for(|e| *e).await;
        self.map().get(volume_id)?.last.clone()
    }

    /// Forget the volume's last result (it was detached). A job started meanwhile (it is
    /// still waiting for the volume's lock) stays.
    pub(crate) fn forget(&self, volume_id: &str) {
        let mut map = self.map();
        if let Some(e) = map.get_mut(volume_id) {
            e.last = None;
            if e.running.is_none() {
                map.remove(volume_id);
            }
        }
    }

    /// Cancel every running job (the agent is shutting down).
    pub(crate) fn cancel_all(&self) {
        for e in self.map().values() {
            if let Some(r) = &e.running {
                r.cancel.store(true, Ordering::SeqCst);
                r.wake.notify_one();
            }
        }
    }

    /// Record the job's end; its final view.
    fn finish(
        &self,
        volume_id: &str,
        job: u64,
        result: &Result<Report, ApiError>,
    ) -> Option<JobView> {
        let mut map = self.map();
        let e = map.get_mut(volume_id)?;
        let r = e.running.take_if(|r| r.job == job)?;
        let mut v = r.view();
        v.finished_at_unix = Some(now_unix());
        match result {
            Ok(report) => {
                v.state = "finished";
                v.verdict = Some(report.verdict);
                v.bytes_checked = Some(report.bytes_checked);
                v.mismatch_count = Some(report.mismatch_count);
                v.duration_ms = Some(report.duration_ms);
                v.report = Some(report.clone());
            }
            Err(err) => {
                v.state = if err.code == "cancelled" {
                    "cancelled"
                } else {
                    "failed"
                };
                v.error = Some(JobError {
                    code: err.code,
                    message: err.message.clone(),
                });
            }
        }
        e.last = Some(v.clone());
        Some(v)
    }
}

/// The 409 of a second verify while one runs.
fn already_running(v: &JobView) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "verify_running",
        format!(
            "a verify of volume {} is already {} (started at {} UTC seconds, {} of {} bytes): \
             follow it with GET /v1/attachments/{}/verify, cancel it with DELETE",
            v.volume_id, v.state, v.started_at_unix, v.bytes_done, v.bytes_total, v.volume_id
        ),
    )
}

fn cancelled(volume_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "cancelled",
        format!("verify of volume {volume_id} cancelled"),
    )
}

/// Start a verify job of `volume_id`: its view (state `queued`) and the receiver of its
/// outcome. 409 `verify_running` when one already runs for the volume.
pub(crate) fn start(
    app: &Arc<App>,
    volume_id: &str,
    req: Request,
    trigger: Trigger,
) -> Result<(JobView, Outcome), ApiError> {
    let jobs = &app.verify_jobs;
    let job = jobs.next.fetch_add(1, Ordering::Relaxed);
    let counters = Arc::new(Progress::default());
    let cancel = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    let (ended_tx, ended) = watch::channel(false);
    let view = JobView {
        volume_id: volume_id.to_owned(),
        state: "queued",
        trigger,
        mode: req.mode,
        started_at_unix: now_unix(),
        bytes_total: 0,
        bytes_done: 0,
        finished_at_unix: None,
        verdict: None,
        bytes_checked: None,
        mismatch_count: None,
        duration_ms: None,
        error: None,
        report: None,
    };
    {
        let mut map = jobs.map();
        let e = map.entry(volume_id.to_owned()).or_default();
        if let Some(r) = &e.running {
            return Err(already_running(&r.view()));
        }
        e.running = Some(Running {
            job,
            view: view.clone(),
            admitted: admitted.clone(),
            counters: counters.clone(),
            cancel: cancel.clone(),
            wake: wake.clone(),
            ended,
        });
    }
    let (tx, rx) = oneshot::channel();
    let app = app.clone();
    let id = volume_id.to_owned();
    let opts = volume::verify::Options {
        mode: req.mode,
        max_rate_mb: req.max_rate_mb,
        progress: false,
        cancel: Some(cancel),
        counters: Some(counters),
    };
    tokio::spawn(async move {
        let result = async {
            // A cancel while waiting for the volume's lock or the budget ends the wait.
            let held = tokio::select! {
                held = super::routes::admit_unlock(&app, &id) => held?,
                () = wake.notified() => return Err(cancelled(&id)),
            };
            admitted.store(true, Ordering::Relaxed);
            let id2 = id.clone();
            run_engine(&app, "verify", held, move |ctx| {
                volume::verify::verify(ctx, &id2, &opts).map_err(|e| ApiError::from(&e))
            })
            .await
        }
        .await;
        record(&app, &id, trigger, &result);
        let view = app.verify_jobs.finish(&id, job, &result);
        if let Some(view) = view.filter(|_| result.is_ok()) {
            persist(&app, &id, view).await;
        }
        let _ = ended_tx.send(true);
        let _ = tx.send(result);
    });
    Ok((view, rx))
}

/// Write a completed job's view (without the report) into the volume's journal record, under
/// the volume's lock: a record detached meanwhile is not written again. Best effort: a failure
/// is logged (the result stays in memory).
async fn persist(app: &Arc<App>, id: &str, mut view: JobView) {
    view.report = None;
    let Ok(value) = serde_json::to_value(&view) else {
        return;
    };
    let _guard = app.locks.lock(id).await;
    let journal = volume::Journal::new(&app.config.volume.state_dir);
    let id2 = id.to_owned();
    let written = tokio::task::spawn_blocking(move || {
        let (_lock, mut record) = journal.lock_record(&id2)?;
        record.last_verify = Some(value);
        journal.verified(&record)
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(volume_id = id, error = %e, "could not keep the verify result in the state record")
        }
        Err(e) => {
            tracing::warn!(volume_id = id, error = %e, "could not keep the verify result in the state record")
        }
    }
}

/// The metrics and log line of a job's outcome.
fn record(app: &App, id: &str, trigger: Trigger, result: &Result<Report, ApiError>) {
    match result {
        Ok(r) => {
            app.metrics
                .observe_verify(id, r.bytes_checked, r.mismatch_count, now_unix());
            if r.mismatch_count > 0 {
                tracing::error!(
                    volume_id = id,
                    ?trigger,
                    mismatches = r.mismatch_count,
                    first_mapping_offset = r.mismatches.first().map(|m| m.mapping_offset),
                    "verify found sectors whose ciphertext does not decrypt to what the mapping shows"
                );
            } else {
                tracing::info!(
                    volume_id = id,
                    ?trigger,
                    bytes = r.bytes_checked,
                    "verify agrees"
                );
            }
        }
        Err(e) => {
            tracing::warn!(volume_id = id, ?trigger, code = e.code, error = %e.message, "verify did not complete")
        }
    }
}

/// Periodic sampled verification of every attached volume (`server.verify_interval_secs`,
/// off by default): one volume after another, so it costs at most one unlock and one rate-
/// limited read at a time; a volume whose verify is already running is skipped this round.
pub(crate) fn spawn_periodic(app: Arc<App>) {
    let Some(secs) = app.config.server.verify_interval_secs.filter(|&s| s > 0) else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: the first round is one interval in
        loop {
            tick.tick().await;
            if app.is_shutting_down() {
                return;
            }
            let journal = volume::Journal::new(&app.config.volume.state_dir);
            let records = match tokio::task::spawn_blocking(move || journal.list()).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "periodic verify: cannot list the state records");
                    continue;
                }
                Err(_) => continue,
            };
            for r in records {
                if app.is_shutting_down() {
                    return;
                }
                if r.phase != volume::journal::Phase::Attached {
                    continue;
                }
                let req = Request {
                    mode: Mode::Sample {
                        count: app.config.server.verify_sample,
                    },
                    max_rate_mb: app.config.server.verify_max_rate_mb.map(|m| m as f64),
                };
                if let Ok((_, done)) = start(&app, &r.volume_id, req, Trigger::Periodic) {
                    let _ = done.await;
                }
            }
        }
    });
}
