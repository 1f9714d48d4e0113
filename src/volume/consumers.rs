//! Barbican consumers for attached volumes: with `[key_manager.barbican] register_consumers`,
//! this host is a consumer of a volume's secret while the volume is attached, so the key
//! manager knows the secret is in use (Barbican then refuses to delete it without `force`).
//!
//! Registration follows the journal, not the code path: every way a record becomes or is
//! confirmed `attached` (a new attach, an attach that finds the mapping already there, the
//! start-up reconcile's repair or re-activation) goes through [`commit_attached`], and every
//! removal of a record (a detach, or an interrupted detach finished by the reconcile) through
//! [`commit_detached`]. Best effort: a failure is logged, never fails the operation; both calls are
//! idempotent on the server, so registering again after a restart is harmless and repairs a
//! registration lost while the agent was down. A Barbican without the consumer API gets one
//! warning per process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Context;
use super::journal::{Journal, Record};
use crate::keys::{Consumer, Error};

static UNSUPPORTED_WARNED: AtomicBool = AtomicBool::new(false);

/// The consumer this host registers for `volume_id`.
pub fn consumer_for(volume_id: &str) -> Consumer {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    Consumer {
        service: format!("volcrypt@{host}"),
        resource_type: "volume".into(),
        resource_id: volume_id.to_owned(),
    }
}

/// Journal `record` as `attached` (a transition, or a confirmation of a record already
/// attached) and register its volume as a consumer of its secret: the one place an attached
/// record meets the key manager. The journal write's time is added to `journal_time` (the
/// key manager's round trip is not the journal's).
pub fn commit_attached(
    ctx: &Context<'_>,
    journal: &Journal,
    record: &mut Record,
    journal_time: &mut Duration,
) -> Result<(), super::Error> {
    super::timing::timed(journal_time, || journal.attached(record))?;
    attached(ctx, &record.key_id, &record.volume_id);
    Ok(())
}

/// Remove the consumer of `record`'s volume, then its record (the detach is complete). In that
/// order: a crash in between leaves a `detaching` record, whose reconcile removes the consumer
/// again (idempotent), never a consumer without a record.
pub fn commit_detached(
    ctx: &Context<'_>,
    journal: &Journal,
    record: &Record,
    journal_time: &mut Duration,
) -> Result<(), super::Error> {
    detached(ctx, &record.key_id, &record.volume_id);
    super::timing::timed(journal_time, || journal.detached(&record.volume_id))
}

/// Register `volume_id` as a consumer of secret `key_id`.
pub fn attached(ctx: &Context<'_>, key_id: &str, volume_id: &str) {
    let c = consumer_for(volume_id);
    report(
        "register",
        key_id,
        volume_id,
        ctx.keys.add_consumer(key_id, &c),
    );
}

/// Remove `volume_id` from the consumers of secret `key_id`.
pub fn detached(ctx: &Context<'_>, key_id: &str, volume_id: &str) {
    let c = consumer_for(volume_id);
    report(
        "remove",
        key_id,
        volume_id,
        ctx.keys.remove_consumer(key_id, &c),
    );
}

fn report(op: &str, key_id: &str, volume_id: &str, r: Result<(), Error>) {
    match r {
        Ok(()) => {}
        Err(e @ Error::Unsupported { .. }) => {
            if !UNSUPPORTED_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "register_consumers is set but the key manager has no consumer API: volumes are attached without consumers");
            }
        }
        Err(e) => {
            tracing::warn!(key_id, volume = volume_id, error = %e, "could not {op} the volume as a consumer of its secret");
        }
    }
}
