//! Barbican consumers for attached volumes: with `[key_manager.barbican] register_consumers`,
//! an attach registers this host as a consumer of the volume's secret and a detach removes it,
//! so the key manager knows the secret is in use (Barbican then refuses to delete it without
//! `force`). Best effort: a failure is logged, never fails the attach or detach; both calls are
//! idempotent on the server, so the re-activations after a restart simply register again.
//! A Barbican without the consumer API gets one warning per process.

use std::sync::atomic::{AtomicBool, Ordering};

use super::Context;
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
