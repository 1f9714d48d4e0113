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

use crate::cipher_policy;
use crate::kind::Kind;

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

/// The request as it arrives (JSON). Unknown fields are rejected at every level, naming the
/// closest known one, so a typo (`"optons"`, `"cypher"`) can neither silently turn off a
/// safety option nor format a volume with defaults the operator never asked for. The
/// `encryption` object is what Cinder's `volume_encryption_metadata_get` returns and Nova
/// hands os-brick: exactly `provider`, `control_location`, `cipher`, `key_size` and
/// `encryption_key_id`, so no extra key is accepted there either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub volume_id: String,
    /// The device to attach. Exactly one of `device_path` and [`AttachRequest::device`] is
    /// given; empty means "not given" (so requests naming a selector need no path).
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub device_path: PathBuf,
    /// The device named by an identity udev knows (serial, WWN, by-path link, LUKS UUID)
    /// instead of a path; resolved by the agent (`volcrypt serve`), see [`crate::udev`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceSelector>,
    /// Wait for the device to appear (udev add/change event) instead of failing at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_device: Option<WaitForDevice>,
    #[serde(default)]
    pub multipath_id: Option<String>,
    #[serde(default)]
    pub encryption: Option<EncryptionMetadata>,
    #[serde(default)]
    pub options: AttachOptions,
    /// The device node a selector resolved to: set by the agent right before it hands the
    /// request to the engine, never read from or written to JSON (a stored request keeps the
    /// selector, so it is resolved again when the device comes back under another node).
    #[serde(skip)]
    pub resolved_device: Option<PathBuf>,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// Longest wait a request may ask for: an hour covers a slow SAN login; longer waits belong
/// to the orchestrator, which can simply retry.
pub const MAX_WAIT_SECS: u64 = 3600;

/// A device named by what udev knows about it. Exactly one field is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSelector {
    /// `ID_SERIAL` or `ID_SERIAL_SHORT` of a whole disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// `ID_WWN` or `ID_WWN_WITH_EXTENSION` of a whole disk (`0x…`, `naa.…` or bare hex;
    /// compared case-insensitively).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    /// A `/dev/disk/by-path/…` link (the device's udev `DEVLINKS`, or `ID_PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_path: Option<PathBuf>,
    /// The LUKS header's UUID (`ID_FS_UUID` with `ID_FS_TYPE=crypto_LUKS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luks_uuid: Option<String>,
}

/// `wait_for_device`: how long the attach waits for its device to appear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitForDevice {
    /// 1 to [`MAX_WAIT_SECS`].
    pub timeout_secs: u64,
}

/// A validated [`DeviceSelector`]: what udev matching works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Serial(String),
    /// Normalised: lowercase, without `0x`/`naa.` prefix.
    Wwn(String),
    ByPath(PathBuf),
    /// Normalised: lowercase.
    LuksUuid(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Serial(s) => write!(f, "serial {s}"),
            Selector::Wwn(w) => write!(f, "wwn {w}"),
            Selector::ByPath(p) => write!(f, "by-path link {}", p.display()),
            Selector::LuksUuid(u) => write!(f, "LUKS UUID {u}"),
        }
    }
}

/// Lowercase hex without the `0x` or `naa.` prefix udev and SCSI tools may print.
pub fn normalize_wwn(w: &str) -> String {
    let l = w.trim().to_ascii_lowercase();
    let l = l.strip_prefix("0x").unwrap_or(&l);
    let l = l.strip_prefix("naa.").unwrap_or(l);
    l.to_owned()
}

impl DeviceSelector {
    /// Check the selector: exactly one identity, each in its expected shape.
    pub fn selector(&self) -> Result<Selector, Error> {
        let given = [
            self.serial.is_some(),
            self.wwn.is_some(),
            self.by_path.is_some(),
            self.luks_uuid.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given != 1 {
            return Err(field(
                "device",
                format!(
                    "names {given} identities; give exactly one of serial, wwn, by_path, luks_uuid"
                ),
            ));
        }
        let text = |f: &'static str, v: &str| -> Result<String, Error> {
            if v.is_empty() || v.len() > 256 {
                return Err(field(f, "must be 1 to 256 characters"));
            }
            if let Some(c) = v.chars().find(|c| c.is_control() || c.is_whitespace()) {
                return Err(field(f, format!("{v:?} contains {c:?}")));
            }
            Ok(v.to_owned())
        };
        if let Some(s) = &self.serial {
            return Ok(Selector::Serial(text("device.serial", s)?));
        }
        if let Some(w) = &self.wwn {
            let n = normalize_wwn(&text("device.wwn", w)?);
            if n.is_empty() || !n.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(field(
                    "device.wwn",
                    format!("{w:?} is not a WWN (hex digits, optionally prefixed 0x or naa.)"),
                ));
            }
            return Ok(Selector::Wwn(n));
        }
        if let Some(p) = &self.by_path {
            let s = p.to_string_lossy();
            let rest = s.strip_prefix("/dev/disk/by-path/").unwrap_or("");
            if rest.is_empty() || rest.contains('/') || text("device.by_path", &s).is_err() {
                return Err(field(
                    "device.by_path",
                    format!(
                        "{} is not a link directly under /dev/disk/by-path/",
                        p.display()
                    ),
                ));
            }
            return Ok(Selector::ByPath(p.clone()));
        }
        let u = self.luks_uuid.as_deref().unwrap_or_default();
        let l = u.to_ascii_lowercase();
        let shape_ok = l.len() == 36
            && l.char_indices().all(|(i, c)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
        if !shape_ok {
            return Err(field(
                "device.luks_uuid",
                format!("{u:?} is not a UUID like 3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55"),
            ));
        }
        Ok(Selector::LuksUuid(l))
    }
}

/// Cinder's volume encryption metadata, as os-brick receives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Also store the flags in the LUKS2 header (`cryptsetup open --persistent`), so any later
    /// opener (plain `cryptsetup open`, systemd-cryptsetup) applies them too. LUKS2 only:
    /// LUKS1 and plain volumes have nowhere to keep them.
    #[serde(default, skip_serializing_if = "is_false")]
    pub persistent: bool,
    /// Point `device_path` at `/dev/mapper/<name>` after opening (os-brick's behaviour).
    #[serde(default = "default_true")]
    pub replace_device_symlink: bool,
}

fn default_true() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Why `persistent` is refused for anything but LUKS2 (the attach request and tune say it alike).
pub const NOT_PERSISTABLE: &str = "LUKS1 and plain volumes have no place to store activation \
     flags; they apply per activation only (persistent needs a LUKS2 volume)";

/// A change of an active mapping's performance flags (`volcrypt tune`, `PATCH
/// /v1/attachments/{volume_id}`): the flags given change, the others stay as they are. Unknown
/// fields are refused naming the closest known one, like the attach request's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_discards: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_read_workqueue: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_write_workqueue: Option<bool>,
    /// Accepted by the parser only to be refused with the reason (see [`TuneRequest::validate`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sector_size: Option<u32>,
    /// Store the resulting flags in the LUKS2 header as well.
    #[serde(default, skip_serializing_if = "is_false")]
    pub persistent: bool,
}

/// The fields of a [`TuneRequest`].
pub const TUNE_FIELDS: [&str; 5] = [
    "allow_discards",
    "no_read_workqueue",
    "no_write_workqueue",
    "sector_size",
    "persistent",
];

impl TuneRequest {
    /// Parse a tune request body; an empty body is not a request.
    pub fn from_json(bytes: &[u8]) -> Result<TuneRequest, Error> {
        parse_flat(bytes, "tune", &TUNE_FIELDS)
    }

    /// What can change on an active mapping: the three flags (and storing them). The sector
    /// size is the mapping's geometry, fixed when it is created, so it is refused rather than
    /// ignored; a request that changes nothing is refused too.
    pub fn validate(&self) -> Result<(), Error> {
        if self.sector_size.is_some() {
            return Err(Error::Tune {
                field: "sector_size",
                message: "cannot change on an active mapping: dm-crypt fixes the sector size \
                          when the mapping is created (LUKS2 keeps it in the header from the \
                          format on)"
                    .into(),
            });
        }
        if !self.persistent
            && self.allow_discards.is_none()
            && self.no_read_workqueue.is_none()
            && self.no_write_workqueue.is_none()
        {
            return Err(Error::Tune {
                field: "allow_discards",
                message: "nothing to change: give allow_discards, no_read_workqueue, \
                          no_write_workqueue or persistent"
                    .into(),
            });
        }
        Ok(())
    }
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            allow_discards: None,
            no_read_workqueue: None,
            no_write_workqueue: None,
            sector_size: None,
            persistent: false,
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
    /// A field no level of the model knows: a typo, named with the closest known field.
    #[error("invalid {request} request: unknown field {name:?} in {within}{}", closest.as_ref().map(|c| format!(" (did you mean {c:?}?)")).unwrap_or_default())]
    UnknownField {
        /// `attach`, `tune`, `rekey`, `verify`.
        request: &'static str,
        name: String,
        /// `the request`, or the object's path (`encryption`, `device`).
        within: String,
        closest: Option<String>,
    },
    /// A small request's body ([`parse_flat`]) is not JSON, or not the model: `field` the one
    /// serde blames, when it names one.
    #[error("invalid {request} request: {}{message}", field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
    Body {
        request: &'static str,
        field: Option<String>,
        message: String,
    },
    #[error("invalid attach request: field `{field}`: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
    #[error("invalid tune request: field `{field}`: {message}")]
    Tune {
        field: &'static str,
        message: String,
    },
}

impl Error {
    pub fn kind(&self) -> Kind {
        Kind::Invalid
    }

    /// The offending field's JSON path, including an unknown field's (`encryption.cypher`).
    pub fn field_path(&self) -> Option<String> {
        match self {
            Error::UnknownField { name, within, .. } if within == "the request" => {
                Some(name.clone())
            }
            Error::UnknownField { name, within, .. } => Some(format!("{within}.{name}")),
            Error::Body { field, .. } => field.clone(),
            e => e.field().map(str::to_owned),
        }
    }

    /// The offending field, for the RPC's `{"error": {"field": …}}`.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Field { field, .. } | Error::Tune { field, .. } => Some(field),
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
    /// Why the cipher is real encryption but not what a new volume is formatted with (see
    /// [`crate::cipher_policy`]): such a plan opens an existing volume, with a warning, and
    /// never formats one.
    pub weak_cipher: Option<String>,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRequest {
    pub volume_id: String,
    /// For a selector request: the node it resolved to (empty until it is resolved).
    pub device_path: PathBuf,
    pub mapping_name: String,
    /// The device selector, when the request names its device by identity.
    pub selector: Option<Selector>,
    /// How long to wait for the device (`wait_for_device`).
    pub wait: Option<std::time::Duration>,
    pub plan: Plan,
    pub options: AttachOptions,
    /// The request as it was sent (key ids only, no secrets): what the journal keeps so the
    /// attachment can be made again after a crash or reboot.
    request: AttachRequest,
}

impl ValidRequest {
    /// The request this was validated from.
    pub fn request(&self) -> &AttachRequest {
        &self.request
    }

    /// Whether the device is known: a path request, or a selector resolved to a node.
    pub fn is_resolved(&self) -> bool {
        self.selector.is_none() || self.request.resolved_device.is_some()
    }

    /// The engine never guesses a selector's device: only a resolved request may run.
    pub fn require_resolved(&self) -> Result<(), Error> {
        if self.is_resolved() {
            return Ok(());
        }
        Err(field(
            "device",
            "a device selector must be resolved to a device node first (`volcrypt attach` \
             and the agent do; library callers use AttachRequest::resolved)",
        ))
    }

    /// This request once its selector found `devnode` (see [`AttachRequest::resolved`]); the
    /// checks already made hold for the resolved request, so they are not made again.
    pub fn resolved(mut self, devnode: &Path) -> ValidRequest {
        self.request = self.request.resolved(devnode);
        self.device_path = devnode.to_owned();
        self.wait = None;
        self.options.replace_device_symlink = false;
        self
    }
}

impl AttachRequest {
    /// Parse a request document (already size-limited).
    pub fn from_json(bytes: &[u8]) -> Result<AttachRequest, Error> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let req: AttachRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if let Some(u) = unknown_field(&path, &inner.to_string()) {
                return u;
            }
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

    /// Check every field and decide what to do. A selector request must have been resolved
    /// ([`AttachRequest::resolved`]): only the agent resolves selectors.
    pub fn validate(&self) -> Result<ValidRequest, Error> {
        let v = self.validate_unresolved()?;
        v.require_resolved()?;
        Ok(v)
    }

    /// Like [`AttachRequest::validate`], but a selector need not be resolved yet (the agent's
    /// check before it looks for or waits for the device).
    pub fn validate_unresolved(&self) -> Result<ValidRequest, Error> {
        validate_volume_id(&self.volume_id)?;
        let has_path = !path_is_empty(&self.device_path);
        let (mapping_name, selector, device_path) = match (&self.device, has_path) {
            (Some(_), true) => {
                return Err(field(
                    "device",
                    "give either device_path or device, not both",
                ));
            }
            (None, false) => {
                return Err(field(
                    "device_path",
                    "is required (or name the device by identity with `device`)",
                ));
            }
            (None, true) => (
                validate_device_path(&self.device_path)?,
                None,
                self.device_path.clone(),
            ),
            // Named after the volume, not the node: the node may differ each time the device
            // appears (sdb, then sdc), the mapping and its links stay the same.
            (Some(d), false) => (
                mapping_name_for(&self.volume_id).map_err(|m| {
                    field(
                        "volume_id",
                        format!("{m} (selector requests map crypt-<volume_id>)"),
                    )
                })?,
                Some(d.selector()?),
                self.resolved_device.clone().unwrap_or_default(),
            ),
        };
        let wait = match &self.wait_for_device {
            None => None,
            Some(w) if w.timeout_secs == 0 || w.timeout_secs > MAX_WAIT_SECS => {
                return Err(field(
                    "wait_for_device.timeout_secs",
                    format!("{} is out of range (1 to {MAX_WAIT_SECS})", w.timeout_secs),
                ));
            }
            Some(w) => Some(std::time::Duration::from_secs(w.timeout_secs)),
        };
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
        if self.options.persistent {
            match &plan {
                Plan::Encrypted(p) if p.format == VolumeFormat::Luks2 => {}
                Plan::Encrypted(_) => return Err(field("options.persistent", NOT_PERSISTABLE)),
                Plan::Raw { .. } => {
                    return Err(field(
                        "options.persistent",
                        "this request attaches the raw device (no dm-crypt): there are no \
                         activation flags to store",
                    ));
                }
            }
        }
        let mut options = self.options.clone();
        if selector.is_some() {
            // udev owns the links of a device named by identity: never replaced.
            options.replace_device_symlink = false;
        }
        Ok(ValidRequest {
            volume_id: self.volume_id.clone(),
            device_path,
            mapping_name,
            selector,
            wait,
            plan,
            options,
            request: self.clone(),
        })
    }

    /// The request as the engine runs it once its selector found `devnode`: the selector is
    /// kept (it is what the state record stores), device links are never replaced, and the
    /// wait is over.
    pub fn resolved(&self, devnode: &Path) -> AttachRequest {
        let mut r = self.clone();
        r.resolved_device = Some(devnode.to_owned());
        r.wait_for_device = None;
        r.options.replace_device_symlink = false;
        r
    }
}

/// The fields each object of the model knows, by its path (`.` is the request itself).
const KNOWN_FIELDS: [(&str, &[&str]); 5] = [
    (
        ".",
        &[
            "volume_id",
            "device_path",
            "device",
            "wait_for_device",
            "multipath_id",
            "encryption",
            "options",
        ],
    ),
    (
        "encryption",
        &[
            "provider",
            "control_location",
            "cipher",
            "key_size",
            "encryption_key_id",
        ],
    ),
    (
        "options",
        &[
            "allow_discards",
            "no_read_workqueue",
            "no_write_workqueue",
            "sector_size",
            "persistent",
            "replace_device_symlink",
        ],
    ),
    ("device", &["serial", "wwn", "by_path", "luks_uuid"]),
    ("wait_for_device", &["timeout_secs"]),
];

/// Parse the flat JSON object of a small request (`request`: `tune`, `rekey`, `verify`, …) as
/// strictly as the attach request: one whole document (no trailing data), every top-level
/// field one of `known` (an unknown one is [`Error::UnknownField`] naming the closest known
/// field, so a typo is never silently ignored, even for types whose `serde(flatten)` cannot
/// deny unknown fields), then the model's own checks ([`Error::Body`] naming the field serde
/// blames). The agent's routes and the command line share it, so both say the same.
pub fn parse_flat<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    request: &'static str,
    known: &[&str],
) -> Result<T, Error> {
    let body = |field: Option<String>, message: String| Error::Body {
        request,
        field,
        message,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_json::Value::deserialize(&mut de).map_err(|e| body(None, e.to_string()))?;
    de.end().map_err(|e| body(None, e.to_string()))?;
    if let serde_json::Value::Object(map) = &value
        && let Some(name) = map.keys().find(|k| !known.contains(&k.as_str()))
    {
        return Err(Error::UnknownField {
            request,
            name: name.clone(),
            within: "the request".into(),
            closest: closest(name, known).map(str::to_owned),
        });
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde names a missing field in its message, at its parent's path.
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_owned);
        let at = Some(path).filter(|p| !(p.is_empty() || p == "." || p == "?"));
        body(missing.or(at), inner)
    })
}

/// serde's "unknown field `x`, expected …" at `path` (serde_path_to_error's), as
/// [`Error::UnknownField`] naming the closest known field; `None` for any other message. The
/// command line and the agent both parse through this, so both say the same.
pub fn unknown_field(path: &str, message: &str) -> Option<Error> {
    let rest = message.strip_prefix("unknown field `")?;
    let name = &rest[..rest.find('`')?];
    // serde_path_to_error's path ends at the unknown field itself when it tracked it there.
    let parent = match path.rsplit_once('.') {
        Some((p, last)) if last == name => p,
        None if path == name => ".",
        _ => path,
    };
    let parent = if parent.is_empty() { "." } else { parent };
    let known = KNOWN_FIELDS
        .iter()
        .find(|(p, _)| *p == parent)
        .map(|(_, k)| *k)
        .unwrap_or(&[]);
    Some(Error::UnknownField {
        request: "attach",
        name: name.to_owned(),
        within: if parent == "." {
            "the request".into()
        } else {
            parent.to_owned()
        },
        closest: closest(name, known).map(str::to_owned),
    })
}

/// The known field nearest to `name` (edit distance at most a third of its length, at least
/// 2), or one that `name` contains or is contained in (`keysize` → `key_size`).
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let squash = |s: &str| s.to_ascii_lowercase().replace(['_', '-'], "");
    let n = squash(name);
    let limit = (n.len() / 3).max(2);
    let near = known
        .iter()
        .map(|k| (edit_distance(&n, &squash(k)), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k);
    near.or_else(|| {
        known.iter().copied().find(|k| {
            let k = squash(k);
            n.len() >= 4 && (k.contains(&n) || n.contains(&k))
        })
    })
}

/// Levenshtein distance over bytes (field names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
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
    // The cipher this plan uses: the request's, or cryptsetup's default for the format.
    let spec = cipher
        .as_deref()
        .unwrap_or(if format == VolumeFormat::Plain {
            DEFAULT_PLAIN_CIPHER
        } else {
            DEFAULT_LUKS_CIPHER
        });
    let (c, m) = split_cipher(spec).unwrap_or((spec, ""));
    let weak_cipher = match cipher_policy::judge(c, m) {
        cipher_policy::Verdict::Null(why) => {
            return Err(field(
                "encryption.cipher",
                format!("{why}: an encrypted volume type must never store plaintext"),
            ));
        }
        cipher_policy::Verdict::Weak(why) => Some(why),
        cipher_policy::Verdict::Accepted => {
            if let Some(bits) = meta.key_size {
                cipher_policy::check_key_size(c, m, bits)
                    .map_err(|why| field("encryption.key_size", why))?;
            }
            None
        }
    };
    Ok(Plan::Encrypted(EncryptedPlan {
        format,
        cipher,
        key_size: meta.key_size,
        key_id,
        weak_cipher,
    }))
}

/// cryptsetup's defaults when the request names no cipher (LUKS, plain).
const DEFAULT_LUKS_CIPHER: &str = "aes-xts-plain64";
const DEFAULT_PLAIN_CIPHER: &str = "aes-cbc-essiv:sha256";

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
                key_id: "3e1b".into(),
                weak_cipher: None,
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
    fn null_ciphers_are_refused_and_weak_ones_never_format() {
        let base = |provider: &str, cipher: &str, ks: u32| {
            format!(
                r#"{{"volume_id":"v","device_path":"/dev/sdb","encryption":{{"provider":"{provider}","control_location":"front-end","cipher":"{cipher}","key_size":{ks},"encryption_key_id":"k"}}}}"#
            )
        };
        for provider in ["luks", "luks2", "plain"] {
            let err = req(&base(provider, "cipher_null-ecb", 256)).unwrap_err();
            assert_eq!(err.field(), Some("encryption.cipher"), "{err}");
            assert!(err.to_string().contains("does no encryption"), "{err}");
        }
        // Weak but real: the plan carries the reason (an existing volume opens with a warning,
        // a blank one is never formatted with it).
        for (cipher, why) in [
            ("aes-ecb", "ECB"),
            ("des3_ede-cbc-essiv:sha256", "64-bit block"),
            ("blowfish-cbc-plain", "64-bit block"),
        ] {
            match req(&base("luks", cipher, 256)).unwrap().plan {
                Plan::Encrypted(p) => {
                    let w = p.weak_cipher.unwrap_or_default();
                    assert!(w.contains(why), "{cipher}: {w}");
                }
                p => panic!("{p:?}"),
            }
        }
        // Key sizes per mode, checked up front (the kernel would fail with EIO later).
        for (cipher, ks) in [
            ("aes-xts-plain64", 128),
            ("aes-xts-plain64", 384),
            ("aes-cbc-essiv:sha256", 512),
            ("serpent-xts-plain64", 1024),
        ] {
            let err = req(&base("luks", cipher, ks)).unwrap_err();
            assert_eq!(
                err.field(),
                Some("encryption.key_size"),
                "{cipher} {ks}: {err}"
            );
            assert!(err.to_string().contains(cipher), "{err}");
        }
        // No cipher given: the key size is checked against cryptsetup's default for the format.
        let no_cipher = r#"{"volume_id":"v","device_path":"/dev/sdb","encryption":{"provider":"luks","control_location":"front-end","key_size":128,"encryption_key_id":"k"}}"#;
        assert_eq!(
            req(no_cipher).unwrap_err().field(),
            Some("encryption.key_size")
        );
        for (cipher, ks) in [
            ("aes-xts-plain64", 256),
            ("aes-xts-plain64", 512),
            ("twofish-xts-plain64", 512),
            ("serpent-cbc-essiv:sha256", 128),
        ] {
            match req(&base("luks2", cipher, ks)).unwrap().plan {
                Plan::Encrypted(p) => assert_eq!(p.weak_cipher, None, "{cipher}"),
                p => panic!("{p:?}"),
            }
        }
    }

    #[test]
    fn unknown_fields_are_rejected_at_every_level_naming_the_closest_known_one() {
        let cases = [
            (
                r#"{"volume_id":"v","device_path":"/dev/sdb","optons":{}}"#,
                r#"unknown field "optons" in the request (did you mean "options"?)"#,
            ),
            (
                r#"{"volume_id":"v","device_path":"/dev/sdb","encryption":{"cypher":"aes-cbc-essiv:sha256"}}"#,
                r#"unknown field "cypher" in encryption (did you mean "cipher"?)"#,
            ),
            (
                r#"{"volume_id":"v","device_path":"/dev/sdb","encryption":{"keysize":512}}"#,
                r#"unknown field "keysize" in encryption (did you mean "key_size"?)"#,
            ),
            (
                r#"{"volume_id":"v","device_path":"/dev/sdb","options":{"allow_discard":true}}"#,
                r#"unknown field "allow_discard" in options (did you mean "allow_discards"?)"#,
            ),
            (
                r#"{"volume_id":"v","device":{"serail":"s"}}"#,
                r#"unknown field "serail" in device (did you mean "serial"?)"#,
            ),
            (
                r#"{"volume_id":"v","device_path":"/dev/sdb","wait_for_device":{"timeout":5}}"#,
                r#"unknown field "timeout" in wait_for_device (did you mean "timeout_secs"?)"#,
            ),
            (
                r#"{"volume_id":"v","device_path":"/dev/sdb","encryption":{"created_at":"x"}}"#,
                r#"unknown field "created_at" in encryption"#,
            ),
        ];
        for (json, want) in cases {
            let msg = req(json).unwrap_err().to_string();
            assert!(msg.contains(want), "{json}: {msg}");
        }
        assert_eq!(closest("zzzzzz", &["cipher", "key_size"]), None);
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

    const UUID: &str = "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55";

    #[test]
    fn selector_requests_map_crypt_volume_id_and_keep_udev_links() {
        let json = format!(
            r#"{{"volume_id":"vol-9","device":{{"luks_uuid":"{}"}},
                "wait_for_device":{{"timeout_secs":30}},
                "encryption":{{"provider":"luks2","control_location":"front-end","encryption_key_id":"k"}}}}"#,
            UUID.to_uppercase()
        );
        let r = AttachRequest::from_json(json.as_bytes()).unwrap();
        let v = r.validate_unresolved().unwrap();
        assert_eq!(v.mapping_name, "crypt-vol-9");
        assert_eq!(v.selector, Some(Selector::LuksUuid(UUID.into())));
        assert_eq!(v.wait, Some(std::time::Duration::from_secs(30)));
        assert!(!v.options.replace_device_symlink);
        // The engine refuses it until the agent resolved it.
        assert_eq!(r.validate().unwrap_err().field(), Some("device"));
        let res = r.resolved(Path::new("/dev/sdc"));
        let v = res.validate().unwrap();
        assert_eq!(v.device_path, PathBuf::from("/dev/sdc"));
        assert_eq!(
            v.mapping_name, "crypt-vol-9",
            "named after the volume, not the node"
        );
        assert!(!res.options.replace_device_symlink && res.wait_for_device.is_none());
        // Stored (the state record keeps the request): the selector, not the node.
        let stored = serde_json::to_value(&res).unwrap();
        assert!(stored.get("device_path").is_none(), "{stored}");
        assert!(stored.get("resolved_device").is_none(), "{stored}");
        assert_eq!(stored["device"]["luks_uuid"], UUID.to_uppercase());
        let back: AttachRequest = serde_json::from_value(stored).unwrap();
        assert_eq!(back.device, r.device);
        // Path requests serialize as before.
        let p = AttachRequest::from_json(br#"{"volume_id":"v","device_path":"/dev/sdb"}"#).unwrap();
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["device_path"], "/dev/sdb");
        assert!(j.get("device").is_none() && j.get("wait_for_device").is_none());
    }

    #[test]
    fn selector_and_wait_errors_name_their_field() {
        let long_id = "v".repeat(125);
        let cases = [
            (
                r#""device_path":"/dev/sdb","device":{"serial":"s"}"#.to_owned(),
                "device",
            ),
            (r#""device":{}"#.to_owned(), "device"),
            (
                r#""device":{"serial":"a","wwn":"0x5"}"#.to_owned(),
                "device",
            ),
            (r#""device":{"serial":""}"#.to_owned(), "device.serial"),
            (r#""device":{"serial":"a b"}"#.to_owned(), "device.serial"),
            (r#""device":{"wwn":"0xZZ"}"#.to_owned(), "device.wwn"),
            (r#""device":{"wwn":"0x"}"#.to_owned(), "device.wwn"),
            (
                r#""device":{"by_path":"/dev/sdb"}"#.to_owned(),
                "device.by_path",
            ),
            (
                r#""device":{"by_path":"/dev/disk/by-path/"}"#.to_owned(),
                "device.by_path",
            ),
            (
                r#""device":{"by_path":"/dev/disk/by-path/../x"}"#.to_owned(),
                "device.by_path",
            ),
            (
                r#""device":{"luks_uuid":"not-a-uuid"}"#.to_owned(),
                "device.luks_uuid",
            ),
            (
                format!(
                    r#""device":{{"luks_uuid":"{UUID}"}},"wait_for_device":{{"timeout_secs":0}}"#
                ),
                "wait_for_device.timeout_secs",
            ),
            (
                format!(
                    r#""device":{{"luks_uuid":"{UUID}"}},"wait_for_device":{{"timeout_secs":3601}}"#
                ),
                "wait_for_device.timeout_secs",
            ),
            (
                r#""device_path":"/dev/sdb","wait_for_device":{"timeout_secs":99999}"#.to_owned(),
                "wait_for_device.timeout_secs",
            ),
        ];
        for (body, f) in cases {
            let json = format!(r#"{{"volume_id":"v",{body}}}"#);
            let err = AttachRequest::from_json(json.as_bytes())
                .unwrap()
                .validate_unresolved()
                .unwrap_err();
            assert_eq!(err.field(), Some(f), "{json}: {err}");
        }
        // Unknown selector and wait fields are typos, rejected by the parser.
        for bad in [
            r#"{"volume_id":"v","device":{"serial":"s","uuid":"x"}}"#,
            r#"{"volume_id":"v","device_path":"/dev/sdb","wait_for_device":{"timeout":5}}"#,
        ] {
            assert!(
                matches!(
                    AttachRequest::from_json(bad.as_bytes()),
                    Err(Error::UnknownField { .. })
                ),
                "{bad}"
            );
        }
        // crypt-<volume_id> must fit device-mapper's name limit.
        let json = format!(r#"{{"volume_id":"{long_id}","device":{{"serial":"s"}}}}"#);
        let err = AttachRequest::from_json(json.as_bytes())
            .unwrap()
            .validate_unresolved()
            .unwrap_err();
        assert_eq!(err.field(), Some("volume_id"), "{err}");
        // The accepted shapes.
        for ok in [
            r#"{"serial":"Linux_scsi_debug_2000"}"#,
            r#"{"wwn":"naa.5000C500A1B2C3D4"}"#,
            r#"{"by_path":"/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.2010-10.org:x-lun-1"}"#,
        ] {
            let json = format!(r#"{{"volume_id":"v","device":{ok}}}"#);
            let v = AttachRequest::from_json(json.as_bytes())
                .unwrap()
                .validate_unresolved();
            assert!(v.is_ok(), "{json}: {v:?}");
        }
        assert_eq!(normalize_wwn("0x5000C500"), "5000c500");
        assert_eq!(normalize_wwn("naa.5000c500"), "5000c500");
    }

    #[test]
    fn path_requests_may_wait_too() {
        let r = req(
            r#"{"volume_id":"v","device_path":"/dev/sdb","wait_for_device":{"timeout_secs":5}}"#,
        )
        .unwrap();
        assert_eq!(r.wait, Some(std::time::Duration::from_secs(5)));
        assert_eq!(r.selector, None);
        assert!(r.options.replace_device_symlink);
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

    #[test]
    fn persistent_flags_need_a_luks2_request() {
        let with = |provider: &str| {
            enc(provider, "front-end").replace(
                r#""encryption_key_id":"k1"}"#,
                r#""encryption_key_id":"k1"},"options":{"persistent":true,"no_read_workqueue":true}"#,
            )
        };
        let r = req(&with("luks2")).unwrap();
        assert!(r.options.persistent);
        // A stored request without it serialises as before.
        let plain = req(&enc("luks2", "front-end")).unwrap();
        assert!(
            !serde_json::to_string(plain.request())
                .unwrap()
                .contains("persistent")
        );
        for provider in ["luks", "plain"] {
            let e = req(&with(provider)).unwrap_err();
            assert_eq!(e.field(), Some("options.persistent"));
            assert!(
                e.to_string().contains(
                    "LUKS1 and plain volumes have no place to store activation flags; they \
                     apply per activation only"
                ),
                "{e}"
            );
        }
        let e = req(&with("luks2").replace("front-end", "back-end")).unwrap_err();
        assert_eq!(e.field(), Some("options.persistent"));
    }

    #[test]
    fn tune_requests_are_parsed_strictly_and_refuse_what_cannot_change_online() {
        let t = TuneRequest::from_json(br#"{"no_read_workqueue":true,"persistent":true}"#).unwrap();
        assert_eq!(t.no_read_workqueue, Some(true));
        assert!(t.persistent && t.allow_discards.is_none());
        t.validate().unwrap();
        let e = TuneRequest::from_json(br#"{"allow_discard":true}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"invalid tune request: unknown field "allow_discard" in the request (did you mean "allow_discards"?)"#
        );
        assert_eq!(e.field_path().as_deref(), Some("allow_discard"));
        let e = TuneRequest::from_json(br#"{"persistant":true}"#).unwrap_err();
        assert!(
            e.to_string().contains(r#"did you mean "persistent"?"#),
            "{e}"
        );
        let e = TuneRequest::from_json(br#"{"allow_discards":"yes"}"#).unwrap_err();
        assert_eq!(e.field_path().as_deref(), Some("allow_discards"), "{e}");
        assert!(
            e.to_string()
                .starts_with("invalid tune request: field `allow_discards`: invalid type"),
            "{e}"
        );
        let e = TuneRequest::from_json(br#"{} x"#).unwrap_err();
        assert_eq!(e.field_path(), None, "{e}");
        assert!(e.to_string().contains("trailing characters"), "{e}");
        let e = TuneRequest::from_json(br#"{"sector_size":4096,"allow_discards":true}"#)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(e.field(), Some("sector_size"));
        assert!(
            e.to_string().contains("cannot change on an active mapping"),
            "{e}"
        );
        let e = TuneRequest::default().validate().unwrap_err();
        assert!(e.to_string().contains("nothing to change"), "{e}");
    }
}
