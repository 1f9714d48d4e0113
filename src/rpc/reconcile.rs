//! The start-up check of recorded attachments against the kernel (read-only).
//!
//! After a restart (or a crash) the agent compares its state records with the active
//! device-mapper mappings and reports, without changing anything:
//! - records whose mapping is not active (the volume should be attached: attach it again);
//! - records whose mapping is active but whose backing device is gone (stale);
//! - `crypt-*` mappings (os-brick's naming) that no record explains — not created by this
//!   agent, so never touched.
//!
//! The report is logged at start and shown in `GET /v1/health` under `reconcile`. Repairing
//! (re-activation, link repair) belongs to the crash-safe journal work (issue 4 §4).

use serde::Serialize;

use crate::keys::KeyManager;
use crate::volume::{self, Context, VolumeConfig, dm::Dm, state};

/// What the start-up check found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// false: the check could not run (see `detail`).
    pub checked: bool,
    pub detail: String,
    /// State records found.
    pub records: usize,
    /// Volume ids whose mapping is not active.
    pub inactive: Vec<String>,
    /// Volume ids whose mapping is active but whose backing device is gone.
    pub stale: Vec<String>,
    /// `crypt-*` mappings without a record (left untouched).
    pub foreign: Vec<String>,
}

/// `volume::status` takes a key manager in its context but never asks it for a key; the check
/// passes this one, which has none, so it can run before and apart from the real one.
struct NoKeys;

impl KeyManager for NoKeys {
    fn kind(&self) -> &'static str {
        "none"
    }
    fn get(&self, key_id: &str) -> Result<crate::keys::Secret, crate::keys::Error> {
        Err(crate::keys::Error::NotFound {
            key_id: key_id.to_owned(),
            manager: "start-up check (no key manager)",
        })
    }
    fn health(&self) -> Result<(), crate::keys::Error> {
        Ok(())
    }
}

/// Compare records and mappings. Blocking (libdevmapper, state files).
pub fn scan(config: &VolumeConfig) -> Report {
    let records = match state::list(&config.state_dir) {
        Ok(r) => r,
        Err(e) => {
            return Report {
                detail: format!("cannot read the state records: {e}"),
                ..Report::default()
            };
        }
    };
    let dm = match Dm::open() {
        Ok(dm) => dm,
        Err(e) => {
            return Report {
                detail: e.to_string(),
                records: records.len(),
                ..Report::default()
            };
        }
    };
    let ctx = Context {
        keys: &NoKeys,
        config: config.clone(),
    };
    let status = match volume::status(&ctx) {
        Ok(s) => s,
        Err(e) => {
            return Report {
                detail: format!("cannot read the volumes' state: {e}"),
                records: records.len(),
                ..Report::default()
            };
        }
    };
    let names = match dm.list_names() {
        Ok(n) => n,
        Err(e) => {
            return Report {
                detail: e.to_string(),
                records: records.len(),
                ..Report::default()
            };
        }
    };
    let ours: std::collections::HashSet<&str> =
        records.iter().map(|r| r.mapping_name.as_str()).collect();
    let mut foreign: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("crypt-") && !ours.contains(n.as_str()))
        .collect();
    foreign.sort();
    let inactive: Vec<String> = status
        .iter()
        .filter(|s| !s.active)
        .map(|s| s.volume_id.clone())
        .collect();
    let stale: Vec<String> = status
        .iter()
        .filter(|s| s.stale)
        .map(|s| s.volume_id.clone())
        .collect();
    let detail = if inactive.is_empty() && stale.is_empty() && foreign.is_empty() {
        "every record matches an active mapping".to_owned()
    } else {
        "attachments need attention (see inactive, stale, foreign)".to_owned()
    };
    Report {
        checked: true,
        detail,
        records: records.len(),
        inactive,
        stale,
        foreign,
    }
}

/// Log what a report says, one line per finding.
pub fn log(report: &Report) {
    if !report.checked {
        tracing::warn!(detail = %report.detail, records = report.records, "start-up reconcile check skipped");
        return;
    }
    for v in &report.inactive {
        tracing::warn!(volume_id = %v, "recorded attachment is not active (attach it again)");
    }
    for v in &report.stale {
        tracing::warn!(volume_id = %v, "attachment is stale: its backing device is gone");
    }
    for m in &report.foreign {
        tracing::warn!(mapping = %m, "crypt mapping not created by volcrypt: leaving it untouched");
    }
    tracing::info!(
        records = report.records,
        inactive = report.inactive.len(),
        stale = report.stale.len(),
        foreign = report.foreign.len(),
        "start-up reconcile check done"
    );
}
