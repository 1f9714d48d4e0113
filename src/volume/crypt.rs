//! The libcryptsetup wrapper: the only place that calls into libcryptsetup-rs.
//!
//! Each function opens its own `CryptDevice` (it is not `Send`) and drops it before returning.
//! Errors come back as errno values from libcryptsetup; they are turned into [`Error`]s that
//! name the operation and device, with the errno cases that matter (wrong key, busy, no
//! device-mapper) singled out.

use std::path::{Path, PathBuf};
use std::sync::Once;

use libcryptsetup_rs::consts::flags::{
    CryptActivate, CryptDeactivate, CryptPbkdf, CryptVolumeKey, CryptWipe,
};
use libcryptsetup_rs::consts::vals::{
    CryptKdf, CryptStatusInfo, CryptWipePattern, EncryptionFormat, KeyslotInfo,
};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks1, CryptParamsLuks1Ref, CryptParamsLuks2,
    CryptParamsLuks2Ref, CryptParamsPlain, CryptParamsPlainRef, CryptPbkdfType, Either,
    LibcryptErr,
};

use super::timing::{AttachTimings, timed};
use super::{Error, PbkdfConfig, PerfFlags};
use crate::kind::Kind;
use crate::request::split_cipher;
use crate::secret::SecretBytes;

/// cryptsetup's plain-mode defaults (2.6): cipher, key bits, passphrase hash.
pub const PLAIN_DEFAULT_CIPHER: &str = "aes-cbc-essiv:sha256";
pub const PLAIN_DEFAULT_KEY_BITS: u32 = 256;
pub const PLAIN_HASH: &str = "ripemd160";
/// cryptsetup's LUKS default cipher; its default key size doubles for XTS (two halves).
pub const LUKS_DEFAULT_CIPHER: &str = "aes-xts-plain64";

/// errno values used here (stable on Linux).
mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const ENXIO: i32 = 6;
    pub const ENOMEM: i32 = 12;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const ENODEV: i32 = 19;
    pub const EINVAL: i32 = 22;
    pub const EOPNOTSUPP: i32 = 95;
}

/// The LUKS version found on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuksVersion {
    Luks1,
    Luks2,
}

fn errno_of(e: &LibcryptErr) -> Option<i32> {
    match e {
        LibcryptErr::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// Turn a libcryptsetup failure into an error naming the operation and target.
fn crypt_err(op: &'static str, target: impl AsRef<Path>, e: &LibcryptErr) -> Error {
    let code = errno_of(e);
    if matches!(code, Some(errno::ENODEV) | Some(errno::EOPNOTSUPP))
        && matches!(op, "activate" | "deactivate" | "resize")
    {
        return Error::DmUnavailable {
            detail: format!("{op} of {} returned {e}", target.as_ref().display()),
        };
    }
    let kind = match code {
        Some(errno::EPERM) => Kind::NoKey,
        Some(errno::EBUSY) | Some(errno::EEXIST) => Kind::Busy,
        Some(errno::ENOENT) | Some(errno::ENXIO) | Some(errno::ENODEV) => Kind::WrongDevice,
        Some(errno::ENOMEM) => Kind::OutOfMemory,
        _ => Kind::Invalid,
    };
    Error::Crypt {
        op,
        target: target.as_ref().display().to_string(),
        detail: e.to_string(),
        kind,
    }
}

/// libcryptsetup prints its messages to stderr unless a callback is installed: route them
/// into tracing instead (they carry device names and reasons, never key material).
fn install_log_callback() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        libcryptsetup_rs::set_log_callback::<()>(Some(log_callback), None);
    });
}

unsafe extern "C" fn log_callback(
    level: std::os::raw::c_int,
    msg: *const std::os::raw::c_char,
    _usrptr: *mut std::os::raw::c_void,
) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string valid for the call.
    let text = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy();
    let text = text.trim_end();
    // CRYPT_LOG_ERROR = 1, CRYPT_LOG_VERBOSE = 2 (cryptsetup's libcryptsetup.h).
    if level == 1 {
        tracing::info!(target: "libcryptsetup", "{text}");
    } else {
        tracing::debug!(target: "libcryptsetup", "{text}");
    }
}

fn init(device: &Path) -> Result<CryptDevice, Error> {
    install_log_callback();
    CryptInit::init(device).map_err(|e| crypt_err("open", device, &e))
}

fn init_by_name(name: &str) -> Result<CryptDevice, Error> {
    install_log_callback();
    CryptInit::init_by_name_and_header(name, None)
        .map_err(|e| crypt_err("look up mapping", name, &e))
}

/// libcryptsetup's activation flags for `flags`. A LUKS2 header's persistent flags are added
/// by libcryptsetup on every activation (that is how other openers honour them) unless
/// `exact`: then the mapping gets exactly `flags` (a tune that turns one off, an attach that
/// stores its own).
fn activate_flags(flags: PerfFlags, exact: bool) -> CryptActivate {
    let mut f = CryptActivate::empty();
    if exact {
        f |= CryptActivate::IGNORE_PERSISTENT;
    }
    if flags.allow_discards {
        f |= CryptActivate::ALLOW_DISCARDS;
    }
    if flags.no_read_workqueue {
        f |= CryptActivate::NO_READ_WORKQUEUE;
    }
    if flags.no_write_workqueue {
        f |= CryptActivate::NO_WRITE_WORKQUEUE;
    }
    f
}

/// The LUKS version on `device`, or `None` when it carries no LUKS header. Read errors are
/// errors, never "not LUKS": only a device that was read and found headerless may be formatted.
pub fn luks_version(device: &Path) -> Result<Option<LuksVersion>, Error> {
    let mut cd = init(device)?;
    match cd.context_handle().load::<()>(None, None) {
        Ok(()) => {}
        Err(e) if errno_of(&e) == Some(errno::EINVAL) => return Ok(None),
        Err(e) => return Err(crypt_err("read LUKS header", device, &e)),
    }
    match cd.format_handle().get_type() {
        Ok(EncryptionFormat::Luks1) => Ok(Some(LuksVersion::Luks1)),
        Ok(EncryptionFormat::Luks2) => Ok(Some(LuksVersion::Luks2)),
        Ok(_) => Ok(None),
        Err(e) => Err(crypt_err("read LUKS header", device, &e)),
    }
}

/// How [`open_luks`] unlocks the volume key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unlock {
    /// volcrypt's own LUKS engine unlocks the keyslot in userspace and libcryptsetup activates
    /// with that volume key (`crypt_activate_by_volume_key`, which checks it against the
    /// header's digest before any table is loaded). Falls back to [`Unlock::Libcryptsetup`]
    /// whenever the engine cannot decide (a keyslot type, KDF or cipher it does not run, a
    /// LUKS2 requirement such as an online reencryption).
    Userspace,
    /// libcryptsetup unlocks and activates in one call (`crypt_activate_by_passphrase`).
    Libcryptsetup,
}

/// What a first-attach format writes: the header's identity and parameters.
#[derive(Debug, Clone, Copy)]
pub struct NewHeader<'a> {
    /// Journaled before the format, so a header left half-written by a crash is recognised.
    pub uuid: uuid::Uuid,
    pub version: LuksVersion,
    pub cipher: Option<&'a str>,
    pub key_bits: Option<u32>,
    pub sector_size: u32,
    pub pbkdf: Option<&'a PbkdfConfig>,
}

/// Called once a keyslot is unlocked in userspace, before the device-mapper work: the agent
/// hands the KDF's share of CPUs and memory to the next volume then, instead of holding it
/// through the activation and its udev wait.
#[derive(Clone, Copy)]
pub struct AfterKdf<'a>(pub &'a (dyn Fn() + Sync));

impl std::fmt::Debug for AfterKdf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterKdf")
    }
}

/// Opening a mapping: its name, flags, and the key id (for messages).
#[derive(Debug, Clone, Copy)]
pub struct Activation<'a> {
    pub name: &'a str,
    pub flags: PerfFlags,
    pub key_id: &'a str,
    /// Also store `flags` in the LUKS2 header (`cryptsetup open --persistent`); a LUKS1 or
    /// plain volume is refused before anything changes.
    pub persistent: bool,
    /// The mapping `name` is active already: load its table again with `flags`
    /// (`cryptsetup refresh`), the same volume key checked against the active one.
    pub refresh: bool,
    pub after_kdf: Option<AfterKdf<'a>>,
}

impl Activation<'_> {
    fn crypt_flags(&self) -> CryptActivate {
        let f = activate_flags(self.flags, self.persistent || self.refresh);
        if self.refresh {
            f | CryptActivate::REFRESH
        } else {
            f
        }
    }

    fn op(&self) -> &'static str {
        if self.refresh { "refresh" } else { "activate" }
    }
}

/// Open a LUKS device as `name` with the passphrase. A wrong passphrase is [`Error::WrongKey`].
/// `Ok(false)`: the device carries no LUKS header (nothing was opened). Fills the header, KDF
/// and device-mapper phases of `t`.
///
/// Why the userspace unlock: libcryptsetup decrypts the keyslot area through the kernel crypto
/// API (AF_ALG) and runs the anti-forensic merge through its hash backend one small hash
/// context at a time; volcrypt's engine does both many times faster. The mapping is the
/// same either way: same volume key (verified by libcryptsetup against the LUKS digest), same
/// activation code, same kernel keyring use, same udev wait.
pub fn open_luks(
    device: &Path,
    header: Option<crate::luks::Header>,
    passphrase: &[u8],
    to: Activation<'_>,
    how: Unlock,
    t: &mut AttachTimings,
) -> Result<bool, Error> {
    let (loaded, engine) = load_and_unlock(device, header, passphrase, how, t);
    if let (Some(Engine::Key(_)), Some(AfterKdf(done))) = (&engine, to.after_kdf) {
        done();
    }
    let Some(mut cd) = loaded? else {
        return Ok(false);
    };
    // Stored first so a refused activation can put the header's flags back: a flag the
    // kernel refuses then changes nothing, on the mapping or in the header.
    let stored = match to.persistent {
        true => Some(store_persistent_flags(&mut cd, device, to.flags)?),
        false => None,
    };
    let r = activate_loaded(&mut cd, device, engine, passphrase, to, t);
    if let (Err(_), Some(previous)) = (&r, stored)
        && let Err(e) = cd
            .luks2_flag_handle::<CryptActivate>()
            .persistent_flags_set(previous)
    {
        tracing::error!(device = %device.display(), error = %e, "the activation failed and the header's previous persistent flags could not be put back");
    }
    r
}

/// Store `flags` as the LUKS2 header's persistent activation flags; returns the ones it held.
/// LUKS1 has no place for them: refused, naming why, before anything is written.
fn store_persistent_flags(
    cd: &mut CryptDevice,
    device: &Path,
    flags: PerfFlags,
) -> Result<CryptActivate, Error> {
    let refuse = |detail: String| Error::Crypt {
        op: "store persistent flags",
        target: device.display().to_string(),
        detail,
        kind: Kind::Invalid,
    };
    if !matches!(cd.format_handle().get_type(), Ok(EncryptionFormat::Luks2)) {
        return Err(refuse(format!(
            "the volume is LUKS1: {}",
            crate::request::NOT_PERSISTABLE
        )));
    }
    let mut handle = cd.luks2_flag_handle::<CryptActivate>();
    let previous = handle
        .persistent_flags_get()
        .map_err(|e| crypt_err("read persistent flags", device, &e))?;
    handle
        .persistent_flags_set(activate_flags(flags, false))
        .map_err(|e| crypt_err("store persistent flags", device, &e))?;
    Ok(previous)
}

/// The activation (or refresh) of [`open_luks`], on the loaded header.
fn activate_loaded(
    cd: &mut CryptDevice,
    device: &Path,
    engine: Option<Engine>,
    passphrase: &[u8],
    to: Activation<'_>,
    t: &mut AttachTimings,
) -> Result<bool, Error> {
    let Activation { name, key_id, .. } = to;
    let wrong_key = || Error::WrongKey {
        key_id: key_id.to_owned(),
        device: device.to_owned(),
    };
    match engine {
        Some(Engine::Key(key)) => {
            t.kdf_split = true;
            match timed(&mut t.dm, || {
                cd.activate_handle().activate_by_volume_key(
                    Some(name),
                    Some(key.expose()),
                    to.crypt_flags(),
                )
            }) {
                Ok(()) => return Ok(true),
                // The digest check refused a key the engine had verified: never expected; let
                // libcryptsetup decide with the passphrase rather than fail.
                Err(e) if errno_of(&e) == Some(errno::EPERM) => {
                    tracing::warn!(device = %device.display(), "libcryptsetup refused the volume key volcrypt unlocked; retrying with libcryptsetup's own unlock");
                }
                Err(e) => return Err(crypt_err(to.op(), device, &e)),
            }
        }
        Some(Engine::WrongPassphrase) => return Err(wrong_key()),
        Some(Engine::CannotDecide(reason)) => {
            tracing::debug!(device = %device.display(), %reason, "userspace unlock not used; libcryptsetup unlocks");
        }
        None => {}
    }
    t.kdf_split = false;
    match timed(&mut t.dm, || {
        cd.activate_handle()
            .activate_by_passphrase(Some(name), None, passphrase, to.crypt_flags())
    }) {
        Ok(_) => Ok(true),
        Err(e) if errno_of(&e) == Some(errno::EPERM) => Err(wrong_key()),
        // libcryptsetup's "No usable keyslot is available": say so, not "no such file".
        Err(e) if errno_of(&e) == Some(errno::ENOENT) => Err(Error::Crypt {
            op: to.op(),
            target: device.display().to_string(),
            detail: format!("the LUKS header has no usable keyslot (libcryptsetup: {e})"),
            kind: Kind::WrongDevice,
        }),
        Err(e) => Err(crypt_err(to.op(), device, &e)),
    }
}

/// libcryptsetup loads the header for the activation on this thread while volcrypt's engine
/// reads the header and unlocks a keyslot on a second one (a CryptDevice is not Send, so it
/// stays here). Both only read; libcryptsetup's load decides whether this is LUKS. The
/// engine's answer is `None` when it was not asked ([`Unlock::Libcryptsetup`]).
type Loaded = Result<Option<CryptDevice>, Error>;
fn load_and_unlock(
    device: &Path,
    header: Option<crate::luks::Header>,
    passphrase: &[u8],
    how: Unlock,
    t: &mut AttachTimings,
) -> (Loaded, Option<Engine>) {
    let span = tracing::Span::current();
    std::thread::scope(|s| {
        let engine = (how == Unlock::Userspace).then(|| {
            std::thread::Builder::new()
                .name("volcrypt-unlock".into())
                .spawn_scoped(s, || {
                    // The request's span (volume id, peer) for the engine's debug lines.
                    let _span = span.enter();
                    let mut et = AttachTimings::default();
                    let e = unlock_in_userspace(device, header, passphrase, &mut et);
                    (e, et)
                })
        });
        let loaded = load_luks(device, t);
        let engine = engine.map(|spawned| match spawned.map(|h| h.join()) {
            Ok(Ok((e, et))) => {
                t.header += et.header;
                t.kdf += et.kdf;
                e
            }
            Ok(Err(_)) => Engine::CannotDecide("the unlock thread panicked".into()),
            Err(e) => Engine::CannotDecide(format!("cannot start the unlock thread: {e}")),
        });
        (loaded, engine)
    })
}

/// libcryptsetup's context for `device` with its LUKS header loaded, or `None` when the device
/// carries no LUKS header.
fn load_luks(device: &Path, t: &mut AttachTimings) -> Result<Option<CryptDevice>, Error> {
    let mut cd = timed(&mut t.header, || init(device))?;
    match timed(&mut t.header, || cd.context_handle().load::<()>(None, None)) {
        Ok(()) => {}
        Err(e) if errno_of(&e) == Some(errno::EINVAL) => return Ok(None),
        Err(e) => return Err(crypt_err("read LUKS header", device, &e)),
    }
    Ok(matches!(
        cd.format_handle().get_type(),
        Ok(EncryptionFormat::Luks1) | Ok(EncryptionFormat::Luks2)
    )
    .then_some(cd))
}

/// What volcrypt's LUKS engine made of the passphrase.
enum Engine {
    Key(SecretBytes),
    /// Every keyslot libcryptsetup would try was tried: none accepts the passphrase.
    WrongPassphrase,
    /// Anything else (with the reason, for the debug log): libcryptsetup decides.
    CannotDecide(String),
}

/// Unlock the volume key with volcrypt's engine: the header (`header`, as the attach read it
/// with [`super::header::read`]; read here when `None`, `t.header`), then keyslot KDF, area
/// decryption, AF merge and digest check (`t.kdf`).
fn unlock_in_userspace(
    device: &Path,
    header: Option<crate::luks::Header>,
    passphrase: &[u8],
    t: &mut AttachTimings,
) -> Engine {
    let header = match header {
        Some(h) => Some(h),
        None => timed(&mut t.header, || super::header::read(device)).map(|h| h.header),
    };
    let Some(header) = header else {
        return Engine::CannotDecide("no LUKS header the engine reads".into());
    };
    if let Err(e) = header.check_activation_allowed() {
        return Engine::CannotDecide(e.to_string());
    }
    if let Some(reason) = keyslot_the_engine_skips(&header) {
        return Engine::CannotDecide(reason);
    }
    let mut f = match std::fs::File::open(device) {
        Ok(f) => f,
        Err(e) => return Engine::CannotDecide(format!("open: {e}")),
    };
    let limits = crate::crypto::kdf::KdfLimits::default();
    match timed(&mut t.kdf, || {
        header.unlock(&mut f, passphrase, None, &limits)
    }) {
        Ok((_slot, key)) => Engine::Key(key),
        Err(crate::luks::Error::NoKey) => Engine::WrongPassphrase,
        Err(e) => Engine::CannotDecide(e.to_string()),
    }
}

/// A LUKS2 keyslot libcryptsetup might open but volcrypt's engine skips (another keyslot type,
/// an unknown KDF): then "no keyslot matches" from the engine would not be the whole answer.
fn keyslot_the_engine_skips(header: &crate::luks::Header) -> Option<String> {
    use crate::luks::luks2::json::KdfDesc;
    let crate::luks::Header::Luks2(h) = header else {
        return None;
    };
    h.meta.keyslots.iter().find_map(|(id, ks)| {
        if ks.kind != "luks2" {
            Some(format!("keyslot {id} has type {:?}", ks.kind))
        } else if matches!(ks.kdf, Some(KdfDesc::Unknown(_)) | None) {
            Some(format!("keyslot {id} has a KDF volcrypt does not run"))
        } else {
            None
        }
    })
}

/// Cipher and mode for libcryptsetup, and the volume key size in bytes. The key size is passed
/// through unchanged like os-brick does (`aes-xts-plain64` + 256 bits is AES-128-XTS); without
/// one, cryptsetup's default applies (256 bits, doubled for XTS).
fn cipher_and_key(
    cipher: Option<&str>,
    key_bits: Option<u32>,
    default_cipher: &str,
) -> Result<(String, String, usize), Error> {
    let spec = cipher.unwrap_or(default_cipher);
    let (c, m) = split_cipher(spec).ok_or_else(|| Error::Crypt {
        op: "format",
        target: spec.to_owned(),
        detail: "cipher must be <cipher>-<mode>".into(),
        kind: Kind::Invalid,
    })?;
    let bits = match key_bits {
        Some(b) => b,
        None if m.starts_with("xts") => 512,
        None => 256,
    };
    Ok((c.to_owned(), m.to_owned(), (bits / 8) as usize))
}

/// The volume key size (bits) a format with `cipher` and `key_bits` gives: the request's, or
/// cryptsetup's default for the mode.
pub fn format_key_bits(cipher: Option<&str>, key_bits: Option<u32>) -> u32 {
    cipher_and_key(cipher, key_bits, LUKS_DEFAULT_CIPHER)
        .map(|(_, _, bytes)| (bytes * 8) as u32)
        .unwrap_or(512)
}

fn pbkdf_type(cfg: &PbkdfConfig, luks1: bool) -> CryptPbkdfType {
    let kind = match cfg.kind.as_str() {
        _ if luks1 => CryptKdf::Pbkdf2,
        "argon2i" => CryptKdf::Argon2I,
        "argon2id" => CryptKdf::Argon2Id,
        _ => CryptKdf::Pbkdf2,
    };
    let is_pbkdf2 = matches!(kind, CryptKdf::Pbkdf2);
    CryptPbkdfType {
        type_: kind,
        hash: Some("sha256".into()),
        time_ms: 0,
        // LUKS1 and libcryptsetup refuse fewer than 1000 PBKDF2 iterations.
        iterations: if is_pbkdf2 {
            cfg.iterations.max(1000)
        } else {
            cfg.iterations.max(1)
        },
        max_memory_kb: if is_pbkdf2 { 0 } else { cfg.memory_kib.max(32) },
        parallel_threads: if is_pbkdf2 { 0 } else { 1 },
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

/// Format `device` as LUKS1 or LUKS2 with one keyslot for `passphrase`. The caller has already
/// established that the device is blank (see `probe`).
pub fn format_luks(device: &Path, h: &NewHeader<'_>, passphrase: &[u8]) -> Result<(), Error> {
    let (c, m, key_bytes) = cipher_and_key(h.cipher, h.key_bits, LUKS_DEFAULT_CIPHER)?;
    let mut cd = init(device)?;
    let luks1 = h.version == LuksVersion::Luks1;
    if let Some(p) = h.pbkdf {
        let t = pbkdf_type(p, luks1);
        cd.settings_handle()
            .set_pbkdf_type(&t)
            .map_err(|e| crypt_err("set PBKDF", device, &e))?;
    }
    write_header(&mut cd, h, (&c, &m), key_bytes).map_err(|e| crypt_err("format", device, &e))?;
    super::test_pause("formatted");
    let added = if super::test_fault("keyslot") {
        Err(LibcryptErr::IOError(std::io::Error::other(
            "test fault injected (VOLCRYPT_TEST_FAIL_AT=keyslot)",
        )))
    } else {
        cd.keyslot_handle()
            .add_by_key(None, None, passphrase, CryptVolumeKey::empty())
            .map(drop)
    };
    if let Err(e) = added {
        // The header this call wrote a moment ago has no keyslot, so its volume key exists
        // nowhere and nothing can be lost by removing it; left in place it would turn the blank
        // device into a LUKS volume nobody can open, which volcrypt then refuses to format.
        if let Err(w) = wipe_loaded_header(&mut cd, device) {
            tracing::error!(device = %device.display(), error = %w, "could not wipe the keyless header of the failed format");
        }
        return Err(crypt_err("add keyslot", device, &e));
    }
    Ok(())
}

/// libcryptsetup's format call for the header `h` (header and volume key; no keyslot yet).
fn write_header(
    cd: &mut CryptDevice,
    h: &NewHeader<'_>,
    cipher: (&str, &str),
    key_bytes: usize,
) -> Result<(), LibcryptErr> {
    match h.version {
        LuksVersion::Luks1 => {
            let params = CryptParamsLuks1 {
                hash: "sha256".into(),
                data_alignment: 0,
                data_device: None,
            };
            let mut r: CryptParamsLuks1Ref<'_> = (&params).try_into()?;
            cd.context_handle().format(
                EncryptionFormat::Luks1,
                cipher,
                Some(h.uuid),
                Either::Right(key_bytes),
                Some(&mut r),
            )
        }
        LuksVersion::Luks2 => {
            let params = CryptParamsLuks2 {
                pbkdf: h.pbkdf.map(|p| pbkdf_type(p, false)),
                integrity: None,
                integrity_params: None,
                data_alignment: 0,
                data_device: None,
                sector_size: h.sector_size,
                label: None,
                subsystem: None,
            };
            let mut r: CryptParamsLuks2Ref<'_> = (&params).try_into()?;
            cd.context_handle().format(
                EncryptionFormat::Luks2,
                cipher,
                Some(h.uuid),
                Either::Right(key_bytes),
                Some(&mut r),
            )
        }
    }
}

/// Zero the header area (everything before the data offset) of the header loaded in `cd`.
/// A data offset of 0 would make crypt_wipe's length "to the end of the device": never asked.
fn wipe_loaded_header(cd: &mut CryptDevice, device: &Path) -> Result<(), Error> {
    let header_bytes = cd.status_handle().get_data_offset() * 512;
    if header_bytes == 0 {
        return Err(Error::Crypt {
            op: "wipe header",
            target: device.display().to_string(),
            detail: "the header reports no data offset; nothing wiped".into(),
            kind: Kind::Invalid,
        });
    }
    cd.wipe_handle()
        .wipe::<()>(
            device,
            CryptWipePattern::Zero,
            0,
            header_bytes,
            1 << 20,
            CryptWipe::empty(),
            None,
            None,
        )
        .map_err(|e| crypt_err("wipe header", device, &e))
}

/// Undo a first-attach format whose attach failed later: wipe the header on `device` if it is
/// the one that attach wrote (its UUID is `uuid`). Returns whether it wiped. A header with any
/// other UUID is never touched.
pub fn wipe_own_header(device: &Path, uuid: &str) -> Result<bool, Error> {
    let Some(mut cd) = load_luks(device, &mut AttachTimings::default())? else {
        return Ok(false);
    };
    let on_disk = cd
        .status_handle()
        .get_uuid()
        .map_err(|e| crypt_err("read LUKS header", device, &e))?;
    if !on_disk.to_string().eq_ignore_ascii_case(uuid) {
        return Ok(false);
    }
    wipe_loaded_header(&mut cd, device)?;
    Ok(true)
}

/// A fresh random (version 4) UUID for a header volcrypt is about to write: journaled before
/// the format, so an interrupted format is recognisable as volcrypt's own.
pub fn new_header_uuid() -> Result<uuid::Uuid, Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Error::Crypt {
        op: "format",
        target: "new header UUID".into(),
        detail: format!("no randomness from the kernel: {e}"),
        kind: Kind::Invalid,
    })?;
    Ok(uuid::Builder::from_random_bytes(bytes).into_uuid())
}

/// The UUID of the LUKS header on `device` and whether any of its keyslots is in use, as
/// libcryptsetup reads them; `None` when the device carries no LUKS header.
pub fn luks_uuid_and_keyslots(device: &Path) -> Result<Option<(String, bool)>, Error> {
    let Some(mut cd) = load_luks(device, &mut AttachTimings::default())? else {
        return Ok(None);
    };
    let kind = cd
        .format_handle()
        .get_type()
        .map_err(|e| crypt_err("read LUKS header", device, &e))?;
    let uuid = cd
        .status_handle()
        .get_uuid()
        .map_err(|e| crypt_err("read LUKS header", device, &e))?;
    let max = libcryptsetup_rs::CryptKeyslotHandle::max_keyslots(kind)
        .map_err(|e| crypt_err("read LUKS header", device, &e))?;
    let mut in_use = false;
    for slot in 0..max {
        let status = cd
            .keyslot_handle()
            .status(slot)
            .map_err(|e| crypt_err("read LUKS keyslot", device, &e))?;
        in_use |= !matches!(status, KeyslotInfo::Inactive | KeyslotInfo::Invalid);
    }
    Ok(Some((uuid.to_string(), in_use)))
}

/// The LUKS header on `device`, loaded; an error naming the device when it has none.
fn load_luks_or_err(device: &Path, op: &'static str) -> Result<CryptDevice, Error> {
    load_luks(device, &mut AttachTimings::default())?.ok_or_else(|| Error::Crypt {
        op,
        target: device.display().to_string(),
        detail: "no LUKS header on the device".into(),
        kind: Kind::WrongDevice,
    })
}

/// The keyslot `passphrase` opens on `device`, `None` when it opens none: libcryptsetup's
/// check without activation (`cryptsetup open --test-passphrase`), one keyslot KDF per slot
/// it tries.
pub fn keyslot_for(device: &Path, passphrase: &[u8]) -> Result<Option<u32>, Error> {
    let mut cd = load_luks_or_err(device, "test passphrase")?;
    match cd.activate_handle().activate_by_passphrase(
        None,
        None,
        passphrase,
        CryptActivate::empty(),
    ) {
        Ok(slot) => Ok(Some(slot)),
        Err(e) if errno_of(&e) == Some(errno::EPERM) => Ok(None),
        Err(e) => Err(crypt_err("test passphrase", device, &e)),
    }
}

/// Whether keyslot `slot` of the LUKS header on `device` holds a key.
pub fn keyslot_in_use(device: &Path, slot: u32) -> Result<bool, Error> {
    let mut cd = load_luks_or_err(device, "read LUKS keyslot")?;
    let status = cd
        .keyslot_handle()
        .status(slot)
        .map_err(|e| crypt_err("read LUKS keyslot", device, &e))?;
    Ok(matches!(
        status,
        KeyslotInfo::Active | KeyslotInfo::ActiveLast
    ))
}

/// Add a keyslot for `new` to the LUKS header on `device`, unlocking the volume key with
/// `existing` (`cryptsetup luksAddKey`); `pbkdf` as a format would use it. Returns the slot.
pub fn add_keyslot(
    device: &Path,
    existing: &[u8],
    new: &[u8],
    pbkdf: Option<&PbkdfConfig>,
) -> Result<u32, Error> {
    let mut cd = load_luks_or_err(device, "add keyslot")?;
    if let Some(p) = pbkdf {
        let luks1 = matches!(cd.format_handle().get_type(), Ok(EncryptionFormat::Luks1));
        cd.settings_handle()
            .set_pbkdf_type(&pbkdf_type(p, luks1))
            .map_err(|e| crypt_err("set PBKDF", device, &e))?;
    }
    cd.keyslot_handle()
        .add_by_passphrase(None, existing, new)
        .map_err(|e| crypt_err("add keyslot", device, &e))
}

/// Remove keyslot `slot` from the LUKS header on `device` (`cryptsetup luksKillSlot`).
pub fn destroy_keyslot(device: &Path, slot: u32) -> Result<(), Error> {
    let mut cd = load_luks_or_err(device, "remove keyslot")?;
    cd.keyslot_handle()
        .destroy(slot)
        .map_err(|e| crypt_err("remove keyslot", device, &e))
}

/// Open `device` in plain mode: the passphrase is hashed (ripemd160) into the key by
/// libcryptsetup, exactly like `cryptsetup create --key-file=-`.
pub fn open_plain(
    device: &Path,
    cipher: Option<&str>,
    key_bits: Option<u32>,
    passphrase: &[u8],
    to: Activation<'_>,
) -> Result<(), Error> {
    if to.persistent {
        return Err(Error::Crypt {
            op: "store persistent flags",
            target: device.display().to_string(),
            detail: format!(
                "the volume is plain dm-crypt: {}",
                crate::request::NOT_PERSISTABLE
            ),
            kind: Kind::Invalid,
        });
    }
    let (c, m, key_bytes) = cipher_and_key(
        cipher,
        Some(key_bits.unwrap_or(PLAIN_DEFAULT_KEY_BITS)),
        PLAIN_DEFAULT_CIPHER,
    )?;
    let mut cd = init(device)?;
    let params = CryptParamsPlain {
        hash: PLAIN_HASH.into(),
        offset: 0,
        sector_size: 0,
        size: 0,
        skip: 0,
    };
    let mut r: CryptParamsPlainRef<'_> = (&params)
        .try_into()
        .map_err(|e| crypt_err("set up plain mode", device, &e))?;
    cd.context_handle()
        .format(
            EncryptionFormat::Plain,
            (&c, &m),
            None,
            Either::Right(key_bytes),
            Some(&mut r),
        )
        .map_err(|e| crypt_err("set up plain mode", device, &e))?;
    cd.activate_handle()
        .activate_by_passphrase(Some(to.name), None, passphrase, to.crypt_flags())
        .map_err(|e| crypt_err(to.op(), device, &e))?;
    Ok(())
}

/// A plain volume's parameters, for [`refresh`] (they are not in any header).
#[derive(Debug, Clone, Copy)]
pub struct Plain<'a> {
    pub cipher: Option<&'a str>,
    pub key_bits: Option<u32>,
}

/// Load the table of active mapping `to.name` on `device` again with `to.flags`, as `cryptsetup
/// refresh` does: the key is unlocked again (libcryptsetup refuses a key other than the active
/// one), the mapping never goes away and I/O is only suspended for the table swap. A flag the
/// kernel refuses leaves the mapping, and a header `to.persistent` was to change, as they were.
pub fn refresh(
    device: &Path,
    plain: Option<Plain<'_>>,
    passphrase: &[u8],
    to: Activation<'_>,
) -> Result<(), Error> {
    let to = Activation {
        refresh: true,
        ..to
    };
    if let Some(p) = plain {
        return open_plain(device, p.cipher, p.key_bits, passphrase, to);
    }
    let mut t = AttachTimings::default();
    match open_luks(device, None, passphrase, to, Unlock::Libcryptsetup, &mut t)? {
        true => Ok(()),
        false => Err(Error::Crypt {
            op: "refresh",
            target: device.display().to_string(),
            detail: "the device carries no LUKS header".into(),
            kind: Kind::WrongDevice,
        }),
    }
}

/// Outcome of a close attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Closed,
    NotActive,
    Busy,
}

/// Close mapping `name`. "Not active" and "busy" are outcomes, not errors: the caller decides.
pub fn close(name: &str) -> Result<Closed, Error> {
    install_log_callback();
    match libcryptsetup_rs::status(None, name) {
        Ok(CryptStatusInfo::Inactive) => return Ok(Closed::NotActive),
        Ok(CryptStatusInfo::Invalid) => {
            return Err(Error::DmUnavailable {
                detail: format!("status of {name} is invalid"),
            });
        }
        Ok(CryptStatusInfo::Busy) => return Ok(Closed::Busy),
        _ => {}
    }
    let mut cd = match CryptInit::init_by_name_and_header(name, None) {
        Ok(cd) => cd,
        Err(e) if matches!(errno_of(&e), Some(errno::ENODEV) | Some(errno::ENOENT)) => {
            return Ok(Closed::NotActive);
        }
        Err(e) => return Err(crypt_err("look up mapping", name, &e)),
    };
    match cd
        .activate_handle()
        .deactivate(name, CryptDeactivate::empty())
    {
        Ok(()) => Ok(Closed::Closed),
        Err(e) if errno_of(&e) == Some(errno::EBUSY) => Ok(Closed::Busy),
        Err(e) if errno_of(&e) == Some(errno::ENODEV) => Ok(Closed::NotActive),
        Err(e) => Err(crypt_err("deactivate", name, &e)),
    }
}

/// Grow mapping `name` to its (already grown) backing device. A LUKS2 mapping whose volume key
/// lives in the kernel keyring needs the key loaded again first, hence the passphrase.
pub fn resize(name: &str, passphrase: &[u8], key_id: &str) -> Result<(), Error> {
    let mut cd = init_by_name(name)?;
    let is_luks2 = matches!(cd.format_handle().get_type(), Ok(EncryptionFormat::Luks2));
    if is_luks2 {
        let active = cd
            .runtime_handle(name)
            .get_active_device()
            .map_err(|e| crypt_err("read mapping", name, &e))?;
        if active.flags.contains(CryptActivate::KEYRING_KEY) {
            match cd.activate_handle().activate_by_passphrase(
                None,
                None,
                passphrase,
                CryptActivate::KEYRING_KEY,
            ) {
                Ok(_) => {}
                Err(e) if errno_of(&e) == Some(errno::EPERM) => {
                    return Err(Error::WrongKey {
                        key_id: key_id.to_owned(),
                        device: PathBuf::from(format!("/dev/mapper/{name}")),
                    });
                }
                Err(e) => return Err(crypt_err("load volume key", name, &e)),
            }
        }
    }
    cd.context_handle()
        .resize(name, 0)
        .map_err(|e| crypt_err("resize", name, &e))
}

/// What libcryptsetup reports about an active mapping (no key material).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ActiveInfo {
    /// `LUKS1`, `LUKS2`, `PLAIN`, ...
    pub kind: String,
    pub cipher: String,
    pub key_bits: u32,
    pub sector_size: u32,
    /// Size in 512-byte sectors.
    pub size_sectors: u64,
    pub flags: PerfFlags,
    pub key_in_keyring: bool,
}

/// Describe active mapping `name`, or `None` when it is not an active crypt mapping.
/// Never call this for a mapping whose backing device has vanished (see below).
pub fn active_info(name: &str) -> Result<Option<ActiveInfo>, Error> {
    install_log_callback();
    match libcryptsetup_rs::status(None, name) {
        Ok(CryptStatusInfo::Active) | Ok(CryptStatusInfo::Busy) => {}
        Ok(CryptStatusInfo::Invalid) => {
            return Err(Error::DmUnavailable {
                detail: format!("status of {name} is invalid"),
            });
        }
        _ => return Ok(None),
    }
    let mut cd = init_by_name(name)?;
    // libcryptsetup-rs turns C strings into Rust without NULL checks, and libcryptsetup
    // returns NULL for the cipher of an untyped context and for the device path of a mapping
    // whose backing device is gone: ask only what is known to be set (callers skip mappings
    // with a vanished backing device; the backing device itself comes from dm deps).
    let kind = match cd.format_handle().get_type() {
        Ok(EncryptionFormat::Luks1) => "LUKS1",
        Ok(EncryptionFormat::Luks2) => "LUKS2",
        Ok(EncryptionFormat::Plain) => "PLAIN",
        _ => return Ok(None),
    }
    .to_owned();
    let (cipher, key_bits) = {
        let mut s = cd.status_handle();
        let c = s.get_cipher().unwrap_or_default();
        let m = s.get_cipher_mode().unwrap_or_default();
        let bits = u32::try_from(s.get_volume_key_size())
            .unwrap_or(0)
            .saturating_mul(8);
        (format!("{c}-{m}"), bits)
    };
    let sector_size = u32::try_from(libcryptsetup_rs::get_sector_size(Some(&mut cd))).unwrap_or(0);
    let active = cd
        .runtime_handle(name)
        .get_active_device()
        .map_err(|e| crypt_err("read mapping", name, &e))?;
    Ok(Some(ActiveInfo {
        kind,
        cipher,
        key_bits,
        sector_size,
        size_sectors: active.size,
        flags: PerfFlags {
            allow_discards: active.flags.contains(CryptActivate::ALLOW_DISCARDS),
            no_read_workqueue: active.flags.contains(CryptActivate::NO_READ_WORKQUEUE),
            no_write_workqueue: active.flags.contains(CryptActivate::NO_WRITE_WORKQUEUE),
        },
        key_in_keyring: active.flags.contains(CryptActivate::KEYRING_KEY),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_size_passes_through_and_defaults_follow_cryptsetup() {
        assert_eq!(
            cipher_and_key(Some("aes-xts-plain64"), Some(256), LUKS_DEFAULT_CIPHER).unwrap(),
            ("aes".into(), "xts-plain64".into(), 32)
        );
        assert_eq!(
            cipher_and_key(None, None, LUKS_DEFAULT_CIPHER).unwrap().2,
            64
        );
        assert_eq!(
            cipher_and_key(None, None, PLAIN_DEFAULT_CIPHER).unwrap(),
            ("aes".into(), "cbc-essiv:sha256".into(), 32)
        );
    }

    #[test]
    fn luks1_always_gets_pbkdf2_with_at_least_1000_iterations() {
        let cfg = PbkdfConfig {
            kind: "argon2id".into(),
            iterations: 4,
            memory_kib: 64,
        };
        let t = pbkdf_type(&cfg, true);
        assert!(matches!(t.type_, CryptKdf::Pbkdf2));
        assert_eq!(t.iterations, 1000);
        let t = pbkdf_type(&cfg, false);
        assert!(matches!(t.type_, CryptKdf::Argon2Id));
        assert_eq!((t.iterations, t.max_memory_kb), (4, 64));
    }

    /// volcrypt's userspace unlock on LUKS1, LUKS2/PBKDF2 and LUKS2/argon2id files formatted by
    /// libcryptsetup: the right passphrase gives the key libcryptsetup's own digest check
    /// accepts; a wrong one is a definite "wrong passphrase"; a file without LUKS is left to
    /// libcryptsetup. (On real devices the VM test compares the mappings with `cryptsetup open`.)
    #[test]
    fn userspace_unlock_gives_the_volume_key_libcryptsetup_verifies() {
        let cases = [
            (LuksVersion::Luks1, "pbkdf2", 1000, 0),
            (LuksVersion::Luks2, "pbkdf2", 1000, 0),
            (LuksVersion::Luks2, "argon2id", 4, 1024),
        ];
        for (version, kind, iterations, memory_kib) in cases {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("vol.img");
            std::fs::write(&f, vec![0u8; 20 << 20]).unwrap();
            let cfg = PbkdfConfig {
                kind: kind.into(),
                iterations,
                memory_kib,
            };
            let h = NewHeader {
                uuid: new_header_uuid().unwrap(),
                version,
                cipher: None,
                key_bits: None,
                sector_size: 512,
                pbkdf: Some(&cfg),
            };
            format_luks(&f, &h, b"right").unwrap();
            let mut cd = init(&f).unwrap();
            cd.context_handle().load::<()>(None, None).unwrap();
            let mut t = AttachTimings::default();
            let Engine::Key(key) = unlock_in_userspace(&f, None, b"right", &mut t) else {
                panic!("{version:?} {kind}: the right passphrase must unlock");
            };
            assert_eq!(
                key.expose().len(),
                64,
                "{version:?}: aes-xts-plain64 default"
            );
            cd.volume_key_handle()
                .verify(key.expose())
                .unwrap_or_else(|e| panic!("{version:?} {kind}: libcryptsetup refuses: {e}"));
            assert!(!t.kdf.is_zero() && !t.header.is_zero(), "{t:?}");

            // The header the attach read beforehand serves the unlock as well.
            let read = super::super::header::read(&f).unwrap().header;
            let mut t = AttachTimings::default();
            assert!(matches!(
                unlock_in_userspace(&f, Some(read.clone()), b"right", &mut t),
                Engine::Key(_)
            ));
            assert!(t.header.is_zero(), "no second header read: {t:?}");
            assert!(
                matches!(
                    unlock_in_userspace(&f, Some(read), b"wrong", &mut t),
                    Engine::WrongPassphrase
                ),
                "{version:?} {kind}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("blank.img");
        std::fs::write(&f, vec![0u8; 1 << 20]).unwrap();
        let mut t = AttachTimings::default();
        assert!(matches!(
            unlock_in_userspace(&f, None, b"x", &mut t),
            Engine::CannotDecide(_)
        ));
    }

    /// Format and header reads work on a plain file without device-mapper.
    #[test]
    fn format_then_detect_on_a_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vol.img");
        std::fs::write(&f, vec![0u8; 20 << 20]).unwrap();
        assert_eq!(luks_version(&f).unwrap(), None);
        let cfg = PbkdfConfig {
            kind: "pbkdf2".into(),
            iterations: 1000,
            memory_kib: 0,
        };
        let uuid = new_header_uuid().unwrap();
        assert_eq!(uuid.get_version_num(), 4);
        assert_ne!(uuid, new_header_uuid().unwrap());
        let h = NewHeader {
            uuid,
            version: LuksVersion::Luks2,
            cipher: Some("aes-xts-plain64"),
            key_bits: Some(256),
            sector_size: 4096,
            pbkdf: Some(&cfg),
        };
        format_luks(&f, &h, b"pw").unwrap();
        // The rollback of a failed first attach wipes only the header with its own UUID.
        let other = new_header_uuid().unwrap().to_string();
        assert!(!wipe_own_header(&f, &other).unwrap());
        assert_eq!(luks_version(&f).unwrap(), Some(LuksVersion::Luks2));
        assert_eq!(luks_version(&f).unwrap(), Some(LuksVersion::Luks2));
        // The header has the UUID volcrypt journaled, and its keyslot is in use...
        assert_eq!(
            luks_uuid_and_keyslots(&f).unwrap(),
            Some((uuid.to_string(), true))
        );
        // ...until it is gone: what a kill between the header and the keyslot write leaves.
        let mut cd = init(&f).unwrap();
        cd.context_handle().load::<()>(None, None).unwrap();
        cd.keyslot_handle().destroy(0).unwrap();
        drop(cd);
        assert_eq!(
            luks_uuid_and_keyslots(&f).unwrap(),
            Some((uuid.to_string(), false))
        );
        let blank = dir.path().join("blank.img");
        std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(luks_uuid_and_keyslots(&blank).unwrap(), None);
        assert!(!wipe_own_header(&blank, &uuid.to_string()).unwrap());
        // Its own UUID: the header area is zeros again, the data behind it untouched.
        let mut data = std::fs::read(&f).unwrap();
        data[(20 << 20) - 1] = 0x5a;
        std::fs::write(&f, &data).unwrap();
        assert!(wipe_own_header(&f, &uuid.to_string().to_uppercase()).unwrap());
        assert_eq!(luks_version(&f).unwrap(), None);
        let after = std::fs::read(&f).unwrap();
        assert!(after[..16 << 20].iter().all(|&b| b == 0));
        assert_eq!(after[(20 << 20) - 1], 0x5a);
    }
}
