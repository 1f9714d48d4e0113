//! Status and extend: what volcrypt manages as the kernel sees it now, and growing a mapping
//! after its backing device grew.

use std::path::PathBuf;

use serde::Serialize;

use super::dm::DevNo;
use super::journal::Phase;
use super::links;
use super::{Context, Error};
use crate::request::{self, VolumeFormat};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtendOutcome {
    pub volume_id: String,
    pub mapping_name: String,
    pub old_size_bytes: u64,
    pub new_size_bytes: u64,
    pub backing_size_bytes: u64,
}

/// One managed volume, as `status` shows it. Never key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeStatus {
    pub volume_id: String,
    pub mapping_name: String,
    pub active: bool,
    pub device_path: PathBuf,
    pub backing_device: PathBuf,
    pub backing_devno: DevNo,
    pub backing_present: bool,
    /// Active, but the backing device is gone.
    pub stale: bool,
    pub format: VolumeFormat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_bits: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sector_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    pub key_manager: String,
    pub key_id: String,
    pub derivation: String,
    /// Flags of the active mapping as the kernel reports them (the requested ones if inactive).
    pub flags: Vec<&'static str>,
    pub volume_key_in_keyring: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_count: Option<i32>,
    pub holders: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable_link: Option<PathBuf>,
    pub stable_link_ok: bool,
    pub formatted_by_volcrypt: bool,
    /// The journal phase of the record: `attached`, a half-done `attaching`/`detaching`, or
    /// `waiting`/`lost` when its device went away.
    pub phase: Phase,
}

/// Grow a mapping to its backing device after the device grew.
pub fn extend(ctx: &Context<'_>, volume_id: &str) -> Result<ExtendOutcome, Error> {
    request::check_volume_id(volume_id)?;
    let journal = ctx.journal();
    let _lock = match journal.get(volume_id)? {
        Some(_) => Some(journal.lock(volume_id)?),
        None => None,
    };
    let record = journal.get(volume_id)?.ok_or_else(|| Error::NotManaged {
        volume_id: volume_id.to_owned(),
        state_dir: ctx.config.state_dir.clone(),
    })?;
    super::journal::trace_phase(&record.mapping_name, record.phase);
    let sys = &*ctx.sys;
    let name = &record.mapping_name;
    let info = sys.dm_info(name)?.ok_or_else(|| Error::NoDevice {
        path: links::mapper_path(name),
        detail: " (the mapping is not active)".into(),
    })?;
    let old = sys.size_bytes(info.devno).unwrap_or(0);
    let backing_size = info
        .deps
        .first()
        .and_then(|d| sys.size_bytes(*d))
        .unwrap_or(0);
    let passphrase = if record.format == VolumeFormat::Plain {
        crate::secret::SecretBytes::new(Vec::new())
    } else {
        ctx.keys
            .get(&record.key_id)
            .map_err(|source| Error::Key {
                key_id: record.key_id.clone(),
                source,
            })?
            .passphrase()
    };
    sys.resize(name, passphrase.expose(), &record.key_id)?;
    let new = sys.size_bytes(info.devno).unwrap_or(0);
    Ok(ExtendOutcome {
        volume_id: volume_id.to_owned(),
        mapping_name: name.clone(),
        old_size_bytes: old,
        new_size_bytes: new,
        backing_size_bytes: backing_size,
    })
}

/// Every volume volcrypt manages, with its live state.
pub fn status(ctx: &Context<'_>) -> Result<Vec<VolumeStatus>, Error> {
    let records = ctx.journal().list()?;
    let sys = &*ctx.sys;
    sys.dm_check()?;
    let mut out = Vec::new();
    for r in records {
        let info = sys.dm_info(&r.mapping_name)?;
        let deps_present = info
            .as_ref()
            .is_some_and(|i| !i.deps.is_empty() && i.deps.iter().all(|d| sys.exists(*d)));
        let active = if deps_present {
            sys.active_info(&r.mapping_name)?
        } else {
            None
        };
        let mapper = links::mapper_path(&r.mapping_name);
        let backing_present = sys.exists(r.backing_devno);
        let stable_link_ok = r
            .stable_link
            .as_ref()
            .map(|l| sys.read_link(l).as_deref() == Some(mapper.as_path()))
            .unwrap_or(false);
        out.push(VolumeStatus {
            volume_id: r.volume_id.clone(),
            mapping_name: r.mapping_name.clone(),
            active: info.is_some(),
            device_path: r.device_path.clone(),
            backing_device: r.backing_device.clone(),
            backing_devno: r.backing_devno,
            backing_present,
            stale: info.is_some() && !deps_present,
            format: r.format,
            kind: active.as_ref().map(|a| a.kind.clone()),
            cipher: active.as_ref().map(|a| a.cipher.clone()),
            key_bits: active.as_ref().map(|a| a.key_bits),
            sector_size: active.as_ref().map(|a| a.sector_size),
            size_bytes: active.as_ref().map(|a| a.size_sectors.saturating_mul(512)),
            key_manager: r.key_manager.clone(),
            key_id: r.key_id.clone(),
            derivation: r.derivation.clone(),
            flags: active.as_ref().map(|a| a.flags).unwrap_or(r.flags).names(),
            volume_key_in_keyring: active.as_ref().map(|a| a.key_in_keyring).unwrap_or(false),
            open_count: info.as_ref().map(|i| i.open_count),
            holders: info
                .as_ref()
                .map(|i| sys.holders(i.devno))
                .unwrap_or_default(),
            stable_link: r.stable_link.clone(),
            stable_link_ok,
            formatted_by_volcrypt: r.formatted,
            phase: r.phase,
        });
    }
    Ok(out)
}

/// The KDF memory (MiB) an extend of `volume_id` takes: resizing a LUKS mapping unlocks a
/// keyslot again, with the header's KDF (`estimate_mib` when the header cannot be read).
pub fn extend_kdf_mib(config: &super::VolumeConfig, volume_id: &str, estimate_mib: u64) -> u64 {
    use super::header;
    match super::Journal::new(&config.state_dir).get(volume_id) {
        Ok(Some(r)) if r.format != VolumeFormat::Plain => header::read(&r.backing_device)
            .map(|h| header::kdf_mib(&h.header))
            .unwrap_or(estimate_mib.max(header::MIN_COST_MIB)),
        _ => header::MIN_COST_MIB,
    }
}
