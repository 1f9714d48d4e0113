//! The attach request: what Nova hands os-brick at attach time, as a serde model, and its
//! validation into a [`Plan`] the attach controller can execute without further checks.
//!
//! The same model is used unchanged by the CLI (`volcrypt attach --request FILE`) and by the
//! RPC (`POST /v1/attachments`), so every rule lives here and every error names the field and,
//! where there is a fixed set, the accepted values.
//!
//! The OpenStack rules reproduced exactly (see the reference notes):
//! - only `control_location == "front-end"` (case-insensitive) makes an encryptor run;
//!   `back-end` or a missing value means "attach the raw device, no dm-crypt";
//! - `provider` spellings of os-brick and Nova map onto LUKS (formatted as LUKS1), LUKS2 or
//!   plain dm-crypt; the NoOp encryptor or no provider mean "nothing".

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ExitStatus;

/// Upper bound on a request document; a request is a few hundred bytes, so anything near this
/// is not a request, and reading stops before an input-driven allocation grows.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Longest device-mapper name the kernel accepts (DM_NAME_LEN 128 including the NUL).
const DM_NAME_MAX: usize = 127;

/// Provider spellings, in the order error messages list them.
pub const LUKS1_PROVIDERS: [&str; 4] = [
    "luks",
    "LuksEncryptor",
    "os_brick.encryptors.luks.LuksEncryptor",
    "nova.volume.encryptors.luks.LuksEncryptor",
];
pub const LUKS2_PROVIDERS: [&str; 3] = [
    "luks2",
    "Luks2Encryptor",
    "os_brick.encryptors.luks.Luks2Encryptor",
];
pub const PLAIN_PROVIDERS: [&str; 4] = [
    "plain",
    "CryptsetupEncryptor",
    "os_brick.encryptors.cryptsetup.CryptsetupEncryptor",
    "nova.volume.encryptors.cryptsetup.CryptsetupEncryptor",
];
pub const NOOP_PROVIDERS: [&str; 2] = ["nova.volume.encryptors.nop.NoOpEncryptor", "NoOpEncryptor"];

/// The request as it arrives (JSON). Unknown top-level and option fields are rejected so a
/// typo (`"optons"`) cannot silently turn off a safety option; the `encryption` object is
/// Cinder's metadata and legitimately carries extra fields (ids, timestamps), so those are
/// ignored there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub volume_id: String,
    pub device_path: PathBuf,
    #[serde(default)]
    pub multipath_id: Option<String>,
    #[serde(default)]
    pub encryption: Option<EncryptionMetadata>,
    #[serde(default)]
    pub options: AttachOptions,
}

/// Cinder's volume encryption metadata, as os-brick receives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionMetadata {
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub control_location: Option<String>,
    #[serde(default)]
    pub cipher: Option<String>,
    #[serde(default)]
    pub key_size: Option<u32>,
    #[serde(default)]
    pub encryption_key_id: Option<String>,
}

/// Per-attach options. `None` means "use the configured default".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachOptions {
    #[serde(default)]
    pub allow_discards: Option<bool>,
    #[serde(default)]
    pub no_read_workqueue: Option<bool>,
    #[serde(default)]
    pub no_write_workqueue: Option<bool>,
    /// Encryption sector size for a new LUKS2 format (512 or 4096).
    #[serde(default)]
    pub sector_size: Option<u32>,
    /// Point `device_path` at `/dev/mapper/<name>` after opening (os-brick's behaviour).
    #[serde(default = "default_true")]
    pub replace_device_symlink: bool,
}

fn default_true() -> bool {
    true
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            allow_discards: None,
            no_read_workqueue: None,
            no_write_workqueue: None,
            sector_size: None,
            replace_device_symlink: true,
        }
    }
}

/// Request errors: the field (JSON path) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read attach request {source_name}: {error}")]
    Read {
        source_name: String,
        error: std::io::Error,
    },
    #[error("attach request {source_name} is larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge { source_name: String },
    #[error("attach request is not valid JSON for the attach model: {0}")]
    Json(String),
    #[error("invalid attach request: field `{field}`: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::Invalid
    }

    /// The offending field, for the RPC's `{"error": {"field": …}}`.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

fn field(field: &'static str, message: impl Into<String>) -> Error {
    Error::Field {
        field,
        message: message.into(),
    }
}

/// The on-disk format a volume gets (or has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    /// Opened as LUKS (either version); formatted as LUKS1 on first attach.
    Luks1,
    /// Opened as LUKS (either version); formatted as LUKS2 on first attach.
    Luks2,
    /// Plain dm-crypt, no header.
    Plain,
}

impl fmt::Display for VolumeFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VolumeFormat::Luks1 => "luks1",
            VolumeFormat::Luks2 => "luks2",
            VolumeFormat::Plain => "plain",
        })
    }
}

/// What the controller must do for a validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No dm-crypt: the raw device is what the guest gets. `reason` says why (for the report).
    Raw { reason: String },
    /// Open (and if blank, format) with dm-crypt.
    Encrypted(EncryptedPlan),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedPlan {
    pub format: VolumeFormat,
    /// `None`: cryptsetup's default for the format.
    pub cipher: Option<String>,
    /// Bits, passed through unchanged (as os-brick does).
    pub key_size: Option<u32>,
    pub key_id: String,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRequest {
    pub volume_id: String,
    pub device_path: PathBuf,
    pub mapping_name: String,
    pub plan: Plan,
    pub options: AttachOptions,
}

impl AttachRequest {
    /// Parse a request document (already size-limited).
    pub fn from_json(bytes: &[u8]) -> Result<AttachRequest, Error> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let req: AttachRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                Error::Json(inner.to_string())
            } else {
                Error::Json(format!("field `{path}`: {inner}"))
            }
        })?;
        de.end().map_err(|e| Error::Json(e.to_string()))?;
        Ok(req)
    }

    /// Read and parse a request from a file, or from stdin when `path` is `-`.
    pub fn read(path: &Path) -> Result<AttachRequest, Error> {
        use std::io::Read;
        let source_name = path.display().to_string();
        let mut buf = Vec::new();
        let result = if path == Path::new("-") {
            std::io::stdin()
                .lock()
                .take(MAX_REQUEST_BYTES + 1)
                .read_to_end(&mut buf)
        } else {
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_REQUEST_BYTES + 1).read_to_end(&mut buf))
        };
        result.map_err(|error| Error::Read {
            source_name: source_name.clone(),
            error,
        })?;
        if buf.len() as u64 > MAX_REQUEST_BYTES {
            return Err(Error::TooLarge { source_name });
        }
        AttachRequest::from_json(&buf)
    }

    /// Check every field and decide what to do.
    pub fn validate(&self) -> Result<ValidRequest, Error> {
        validate_volume_id(&self.volume_id)?;
        let mapping_name = validate_device_path(&self.device_path)?;
        if let Some(size) = self.options.sector_size
            && size != 512
            && size != 4096
        {
            return Err(field(
                "options.sector_size",
                format!("{size} is not supported (accepted: 512, 4096)"),
            ));
        }
        let plan = plan(self.encryption.as_ref())?;
        Ok(ValidRequest {
            volume_id: self.volume_id.clone(),
            device_path: self.device_path.clone(),
            mapping_name,
            plan,
            options: self.options.clone(),
        })
    }
}

/// Check a volume id given on its own (detach, extend).
pub fn check_volume_id(id: &str) -> Result<(), Error> {
    validate_volume_id(id)
}

/// The volume id names a state file and the stable link, so only a safe alphabet is accepted.
fn validate_volume_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(field("volume_id", "must not be empty"));
    }
    if id.len() > 128 {
        return Err(field(
            "volume_id",
            format!("is {} characters long (at most 128)", id.len()),
        ));
    }
    if id == "." || id == ".." || id.starts_with('.') {
        return Err(field(
            "volume_id",
            format!("{id:?} must not start with '.'"),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(field(
            "volume_id",
            format!("{id:?} contains {c:?} (accepted: ASCII letters, digits, '-', '_', '.')"),
        ));
    }
    Ok(())
}

/// Returns the os-brick mapping name `crypt-<basename>`.
fn validate_device_path(path: &Path) -> Result<String, Error> {
    if !path.is_absolute() {
        return Err(field(
            "device_path",
            format!("{} is not an absolute path", path.display()),
        ));
    }
    let Some(base) = path.file_name().and_then(|b| b.to_str()) else {
        return Err(field(
            "device_path",
            format!(
                "{} has no UTF-8 file name to build the mapping name from",
                path.display()
            ),
        ));
    };
    mapping_name_for(base).map_err(|m| field("device_path", m))
}

/// os-brick's mapping name for a device path's basename: `crypt-<basename>`.
pub fn mapping_name_for(basename: &str) -> Result<String, String> {
    if basename.is_empty() || basename == "." || basename == ".." {
        return Err(format!("basename {basename:?} cannot name a mapping"));
    }
    if let Some(c) = basename.chars().find(|c| c.is_control() || *c == '/') {
        return Err(format!("basename {basename:?} contains {c:?}"));
    }
    let name = format!("crypt-{basename}");
    if name.len() > DM_NAME_MAX {
        return Err(format!(
            "mapping name {name:?} is longer than device-mapper's {DM_NAME_MAX} bytes"
        ));
    }
    Ok(name)
}

/// The legacy (pre-prefix) name os-brick reuses when it is already active.
pub fn legacy_mapping_name(device_path: &Path) -> Option<String> {
    device_path
        .file_name()
        .and_then(|b| b.to_str())
        .map(str::to_owned)
}

fn plan(meta: Option<&EncryptionMetadata>) -> Result<Plan, Error> {
    let Some(meta) = meta else {
        return Ok(Plan::Raw {
            reason: "no encryption metadata".into(),
        });
    };
    match meta.control_location.as_deref() {
        None => {
            return Ok(Plan::Raw {
                reason: "encryption.control_location is missing (not front-end)".into(),
            });
        }
        Some(loc) if loc.eq_ignore_ascii_case("front-end") => {}
        Some(loc) if loc.eq_ignore_ascii_case("back-end") => {
            return Ok(Plan::Raw {
                reason: "encryption.control_location is back-end: the storage back end encrypts"
                    .into(),
            });
        }
        Some(loc) => {
            return Err(field(
                "encryption.control_location",
                format!(
                    "{loc:?} is not accepted (accepted: front-end, back-end; case-insensitive)"
                ),
            ));
        }
    }
    let format = match meta.provider.as_deref() {
        None => {
            return Ok(Plan::Raw {
                reason: "encryption.provider is missing (no encryptor)".into(),
            });
        }
        Some(p) if NOOP_PROVIDERS.contains(&p) => {
            return Ok(Plan::Raw {
                reason: format!("encryption.provider is {p} (no encryptor)"),
            });
        }
        Some(p) if LUKS1_PROVIDERS.contains(&p) => VolumeFormat::Luks1,
        Some(p) if LUKS2_PROVIDERS.contains(&p) => VolumeFormat::Luks2,
        Some(p) if PLAIN_PROVIDERS.contains(&p) => VolumeFormat::Plain,
        Some(p) => {
            let accepted: Vec<&str> = LUKS1_PROVIDERS
                .iter()
                .chain(&LUKS2_PROVIDERS)
                .chain(&PLAIN_PROVIDERS)
                .chain(&NOOP_PROVIDERS)
                .copied()
                .collect();
            return Err(field(
                "encryption.provider",
                format!(
                    "{p:?} is not a known encryptor (accepted: {})",
                    accepted.join(", ")
                ),
            ));
        }
    };
    let key_id = match meta.encryption_key_id.as_deref() {
        None | Some("") => {
            return Err(field(
                "encryption.encryption_key_id",
                format!("is required for the {format} encryptor"),
            ));
        }
        Some(id) => {
            if id.len() > 256 || id.chars().any(|c| c.is_control() || c == '/') {
                return Err(field(
                    "encryption.encryption_key_id",
                    "must be at most 256 characters, without '/' or control characters",
                ));
            }
            id.to_owned()
        }
    };
    let cipher = match meta.cipher.as_deref() {
        None | Some("") => None,
        Some(c) => Some(validate_cipher(c)?),
    };
    if let Some(bits) = meta.key_size
        && (bits == 0 || bits % 8 != 0 || bits > 1024)
    {
        return Err(field(
            "encryption.key_size",
            format!("{bits} is not a key size in bits (a multiple of 8, at most 1024)"),
        ));
    }
    Ok(Plan::Encrypted(EncryptedPlan {
        format,
        cipher,
        key_size: meta.key_size,
        key_id,
    }))
}

/// `cipher-mode` as cryptsetup spells it (`aes-xts-plain64`, `aes-cbc-essiv:sha256`).
fn validate_cipher(c: &str) -> Result<String, Error> {
    let ok_chars = c
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | ':' | '_' | '(' | ')'));
    let parts = split_cipher(c);
    if !ok_chars || c.len() > 64 || parts.is_none() {
        return Err(field(
            "encryption.cipher",
            format!(
                "{c:?} is not a cipher specification like aes-xts-plain64 or aes-cbc-essiv:sha256"
            ),
        ));
    }
    Ok(c.to_owned())
}

/// Split `aes-xts-plain64` into (`aes`, `xts-plain64`) as libcryptsetup wants it.
pub fn split_cipher(spec: &str) -> Option<(&str, &str)> {
    let (cipher, mode) = spec.split_once('-')?;
    if cipher.is_empty() || mode.is_empty() {
        return None;
    }
    Some((cipher, mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<ValidRequest, Error> {
        AttachRequest::from_json(json.as_bytes())?.validate()
    }

    fn enc(provider: &str, loc: &str) -> String {
        format!(
            r#"{{"volume_id":"v1","device_path":"/dev/disk/by-path/ip-1-lun-1",
               "encryption":{{"provider":"{provider}","control_location":"{loc}",
               "cipher":"aes-xts-plain64","key_size":256,"encryption_key_id":"k1"}}}}"#
        )
    }

    #[test]
    fn issue_example_parses_into_a_luks1_plan_with_os_brick_mapping_name() {
        let r = req(r#"{"volume_id": "8c0f", "device_path": "/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn-lun-1", "multipath_id": null,
            "encryption": {"provider": "luks", "control_location": "front-end",
                "cipher": "aes-xts-plain64", "key_size": 256, "encryption_key_id": "3e1b"},
            "options": {"allow_discards": false, "replace_device_symlink": true}}"#)
        .unwrap();
        assert_eq!(r.mapping_name, "crypt-ip-10.0.0.1:3260-iscsi-iqn-lun-1");
        assert_eq!(
            r.plan,
            Plan::Encrypted(EncryptedPlan {
                format: VolumeFormat::Luks1,
                cipher: Some("aes-xts-plain64".into()),
                key_size: Some(256),
                key_id: "3e1b".into()
            })
        );
        assert_eq!(r.options.allow_discards, Some(false));
    }

    #[test]
    fn every_provider_spelling_maps_to_its_format() {
        for (list, fmt) in [
            (&LUKS1_PROVIDERS[..], VolumeFormat::Luks1),
            (&LUKS2_PROVIDERS[..], VolumeFormat::Luks2),
            (&PLAIN_PROVIDERS[..], VolumeFormat::Plain),
        ] {
            for p in list {
                match req(&enc(p, "front-end")).unwrap().plan {
                    Plan::Encrypted(e) => assert_eq!(e.format, fmt, "{p}"),
                    other => panic!("{p}: {other:?}"),
                }
            }
        }
        for p in NOOP_PROVIDERS {
            assert!(
                matches!(req(&enc(p, "front-end")).unwrap().plan, Plan::Raw { .. }),
                "{p}"
            );
        }
    }

    #[test]
    fn provider_spellings_are_exact_and_errors_list_them() {
        let err = req(&enc("LUKS", "front-end")).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.field(), Some("encryption.provider"));
        assert!(msg.contains("\"LUKS\""), "{msg}");
        for p in LUKS1_PROVIDERS
            .iter()
            .chain(&LUKS2_PROVIDERS)
            .chain(&PLAIN_PROVIDERS)
        {
            assert!(msg.contains(p), "{msg} lacks {p}");
        }
        assert!(msg.contains("NoOpEncryptor"), "{msg}");
    }

    #[test]
    fn control_location_is_case_insensitive_and_back_end_or_missing_means_raw() {
        assert!(matches!(
            req(&enc("luks", "FRONT-END")).unwrap().plan,
            Plan::Encrypted(_)
        ));
        assert!(matches!(
            req(&enc("luks", "Front-End")).unwrap().plan,
            Plan::Encrypted(_)
        ));
        match req(&enc("luks", "back-end")).unwrap().plan {
            Plan::Raw { reason } => assert!(reason.contains("back-end"), "{reason}"),
            p => panic!("{p:?}"),
        }
        let missing = r#"{"volume_id":"v","device_path":"/dev/sdb","encryption":{"provider":"luks","encryption_key_id":"k"}}"#;
        match req(missing).unwrap().plan {
            Plan::Raw { reason } => assert!(reason.contains("missing"), "{reason}"),
            p => panic!("{p:?}"),
        }
        let none = r#"{"volume_id":"v","device_path":"/dev/sdb"}"#;
        assert!(matches!(req(none).unwrap().plan, Plan::Raw { .. }));
        let err = req(&enc("luks", "frontend")).unwrap_err();
        assert_eq!(err.field(), Some("encryption.control_location"));
        assert!(err.to_string().contains("front-end, back-end"), "{err}");
    }

    #[test]
    fn front_end_without_provider_is_raw_and_without_key_id_is_an_error() {
        let r = r#"{"volume_id":"v","device_path":"/dev/sdb","encryption":{"control_location":"front-end"}}"#;
        assert!(matches!(req(r).unwrap().plan, Plan::Raw { .. }));
        let r = r#"{"volume_id":"v","device_path":"/dev/sdb","encryption":{"provider":"luks2","control_location":"front-end"}}"#;
        let err = req(r).unwrap_err();
        assert_eq!(err.field(), Some("encryption.encryption_key_id"));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (r#"{"volume_id":"","device_path":"/dev/sdb"}"#, "volume_id"),
            (
                r#"{"volume_id":"../x","device_path":"/dev/sdb"}"#,
                "volume_id",
            ),
            (
                r#"{"volume_id":"a/b","device_path":"/dev/sdb"}"#,
                "volume_id",
            ),
            (
                r#"{"volume_id":"v","device_path":"dev/sdb"}"#,
                "device_path",
            ),
            (r#"{"volume_id":"v","device_path":"/"}"#, "device_path"),
            (
                r#"{"volume_id":"v","device_path":"/dev/sdb","options":{"sector_size":1024}}"#,
                "options.sector_size",
            ),
        ];
        for (json, f) in cases {
            let err = req(json).unwrap_err();
            assert_eq!(err.field(), Some(f), "{json}: {err}");
            assert!(err.to_string().contains(f), "{err}");
        }
        let long = format!(
            r#"{{"volume_id":"v","device_path":"/dev/{}"}}"#,
            "x".repeat(130)
        );
        assert_eq!(req(&long).unwrap_err().field(), Some("device_path"));
    }

    #[test]
    fn key_size_and_cipher_are_checked() {
        let base = |cipher: &str, ks: u32| {
            format!(
                r#"{{"volume_id":"v","device_path":"/dev/sdb","encryption":{{"provider":"luks","control_location":"front-end","cipher":"{cipher}","key_size":{ks},"encryption_key_id":"k"}}}}"#
            )
        };
        assert_eq!(
            req(&base("aes-xts-plain64", 100)).unwrap_err().field(),
            Some("encryption.key_size")
        );
        assert_eq!(
            req(&base("aes-xts-plain64", 0)).unwrap_err().field(),
            Some("encryption.key_size")
        );
        assert_eq!(
            req(&base("aes", 256)).unwrap_err().field(),
            Some("encryption.cipher")
        );
        assert_eq!(
            req(&base("aes-xts plain", 256)).unwrap_err().field(),
            Some("encryption.cipher")
        );
        assert!(req(&base("aes-cbc-essiv:sha256", 256)).is_ok());
    }

    #[test]
    fn unknown_top_level_fields_are_rejected_but_extra_metadata_is_ignored() {
        let typo = r#"{"volume_id":"v","device_path":"/dev/sdb","optons":{}}"#;
        let msg = req(typo).unwrap_err().to_string();
        assert!(msg.contains("optons"), "{msg}");
        let extra = r#"{"volume_id":"v","device_path":"/dev/sdb","encryption":{"provider":"luks","control_location":"front-end","encryption_key_id":"k","created_at":"x","deleted":false}}"#;
        assert!(req(extra).is_ok());
        let wrong_type =
            r#"{"volume_id":"v","device_path":"/dev/sdb","encryption":{"key_size":"256"}}"#;
        assert!(
            req(wrong_type)
                .unwrap_err()
                .to_string()
                .contains("key_size")
        );
    }

    #[test]
    fn replace_device_symlink_defaults_to_true() {
        let r = req(r#"{"volume_id":"v","device_path":"/dev/sdb"}"#).unwrap();
        assert!(r.options.replace_device_symlink);
        let r = req(r#"{"volume_id":"v","device_path":"/dev/sdb","options":{}}"#).unwrap();
        assert!(r.options.replace_device_symlink);
    }

    #[test]
    fn names_follow_os_brick() {
        assert_eq!(mapping_name_for("sdb").unwrap(), "crypt-sdb");
        assert_eq!(
            legacy_mapping_name(Path::new("/dev/disk/by-path/x-lun-1")).as_deref(),
            Some("x-lun-1")
        );
        assert_eq!(
            split_cipher("aes-cbc-essiv:sha256"),
            Some(("aes", "cbc-essiv:sha256"))
        );
        assert_eq!(split_cipher("aes"), None);
    }

    #[test]
    fn oversized_request_files_are_refused_without_reading_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.json");
        std::fs::write(&p, vec![b' '; (MAX_REQUEST_BYTES + 10) as usize]).unwrap();
        assert!(matches!(
            AttachRequest::read(&p),
            Err(Error::TooLarge { .. })
        ));
        let missing = AttachRequest::read(&dir.path().join("nope.json")).unwrap_err();
        assert!(missing.to_string().contains("nope.json"), "{missing}");
    }
}
