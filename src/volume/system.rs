//! The engine's boundary with the host: every call that reads or changes device-mapper,
//! libcryptsetup headers, block devices (udev's view of them included) or links goes through
//! [`System`], and nothing else in the engine's operations touches them. Two backends implement it: [`Host`], the real one (thin calls into
//! [`super::dm`], [`super::crypt`], [`super::probe`], [`super::header`] and [`super::links`]),
//! and, in unit tests, an in-memory simulation that can fail or "crash" before any step, so
//! every crash point of attach, detach and reconcile is tested natively in milliseconds. The
//! VM tests prove the real backend.
//!
//! Steps that change something are the crash points: a simulated crash happens *before* the
//! step, so the step never took place. The journal's writes count as steps too (see
//! [`System::step`]).

use std::path::{Path, PathBuf};

use super::crypt::{self, Activation, ActiveInfo, Closed, NewHeader, Plain, Unlock};
use super::dm::{self, DevNo, Dm, MapInfo};
use super::header::{self, DeviceHeader};
use super::kcapi;
use super::probe::{self, Expect, Probe};
use super::timing::AttachTimings;
use super::{Error, PbkdfConfig, links};
use crate::request::Selector;

/// The host as the engine sees it. Queries first, then the steps that change something.
pub trait System: Send + Sync {
    /// A crash point that is not one of the calls below (the journal's writes). The real host
    /// does nothing.
    fn step(&self, _what: &'static str) {}

    // Block devices.
    fn canonicalize(&self, path: &Path) -> std::io::Result<PathBuf>;
    fn devno_of(&self, path: &Path) -> Result<DevNo, Error>;
    fn exists(&self, devno: DevNo) -> bool;
    fn dev_path(&self, devno: DevNo) -> Option<PathBuf>;
    fn size_bytes(&self, devno: DevNo) -> Option<u64>;
    /// Devices stacked on `devno`, by name.
    fn holders(&self, devno: DevNo) -> Vec<String>;
    /// Processes holding `devno` open, as `pid (comm)`.
    fn processes(&self, devno: DevNo) -> Vec<String>;
    /// Whether anyone holds `device` open exclusively or mounted (an `O_EXCL` open fails).
    fn exclusive_open(&self, device: &Path) -> std::io::Result<()>;
    /// The signature probe a device must pass before it is formatted.
    fn probe(&self, device: &Path, expect: Expect) -> Result<Probe, Error>;
    /// Whether the kernel's crypto API runs `cipher`-`mode` with a `bits`-bit key.
    fn kernel_cipher(&self, cipher: &str, mode: &str, bits: u32) -> kcapi::Answer;
    /// The LUKS header the engine reads (`None`: none it reads).
    fn read_header(&self, device: &Path) -> Option<DeviceHeader>;
    /// The device node of the block device present now that `selector` names (udev's view).
    fn find_device(&self, selector: &Selector) -> Result<Option<PathBuf>, String>;

    // Device-mapper (never tables: they hold keys).
    /// Fails when device-mapper is not usable on this host.
    fn dm_check(&self) -> Result<(), Error>;
    fn dm_info(&self, name: &str) -> Result<Option<MapInfo>, Error>;
    fn dm_names(&self) -> Result<Vec<String>, Error>;
    /// Remove a mapping directly (stale ones libcryptsetup cannot load). `Ok(false)`: busy.
    fn dm_remove(&self, name: &str) -> Result<bool, Error>;

    // LUKS and dm-crypt through libcryptsetup.
    /// The header's UUID and whether a keyslot is in use; `None`: no LUKS header.
    fn luks_uuid_and_keyslots(&self, device: &Path) -> Result<Option<(String, bool)>, Error>;
    /// `Ok(false)`: no LUKS header (nothing opened). A wrong passphrase is [`Error::WrongKey`].
    fn open_luks(
        &self,
        device: &Path,
        header: Option<crate::luks::Header>,
        passphrase: &[u8],
        to: Activation<'_>,
        how: Unlock,
        t: &mut AttachTimings,
    ) -> Result<bool, Error>;
    fn open_plain(
        &self,
        device: &Path,
        cipher: Option<&str>,
        key_bits: Option<u32>,
        passphrase: &[u8],
        to: Activation<'_>,
    ) -> Result<(), Error>;
    fn format_luks(&self, device: &Path, h: &NewHeader<'_>, passphrase: &[u8])
    -> Result<(), Error>;
    /// Wipe the LUKS header on `device` if its UUID is `uuid`; returns whether it did.
    fn wipe_own_header(&self, device: &Path, uuid: &str) -> Result<bool, Error>;
    /// The keyslot `passphrase` opens on `device`; `None`: it opens none.
    fn keyslot_for(&self, device: &Path, passphrase: &[u8]) -> Result<Option<u32>, Error>;
    fn keyslot_in_use(&self, device: &Path, slot: u32) -> Result<bool, Error>;
    /// Add a keyslot for `new`, unlocking the volume key with `existing`; returns its number.
    fn add_keyslot(
        &self,
        device: &Path,
        existing: &[u8],
        new: &[u8],
        pbkdf: Option<&PbkdfConfig>,
    ) -> Result<u32, Error>;
    fn destroy_keyslot(&self, device: &Path, slot: u32) -> Result<(), Error>;
    /// Load active mapping `to.name`'s table again with `to.flags` (and with `to.persistent`,
    /// store them in the LUKS2 header); `plain`: the volume is plain dm-crypt. A refusal
    /// changes nothing.
    fn refresh(
        &self,
        device: &Path,
        plain: Option<Plain<'_>>,
        passphrase: &[u8],
        to: Activation<'_>,
    ) -> Result<(), Error>;
    fn close(&self, name: &str) -> Result<Closed, Error>;
    fn resize(&self, name: &str, passphrase: &[u8], key_id: &str) -> Result<(), Error>;
    fn active_info(&self, name: &str) -> Result<Option<ActiveInfo>, Error>;

    // Links.
    fn read_link(&self, link: &Path) -> Option<PathBuf>;
    /// Whether `link` may be replaced: a symlink, or absent.
    fn is_replaceable(&self, link: &Path) -> bool;
    /// Point `link` at `target`; returns where it pointed before.
    fn set_symlink(&self, link: &Path, target: &Path) -> Result<Option<PathBuf>, Error>;
    fn remove_if_points_to(&self, link: &Path, target: &Path) -> Result<bool, Error>;
    fn restore_if_points_to(
        &self,
        link: &Path,
        ours: &Path,
        previous: &Path,
    ) -> Result<bool, Error>;
}

/// The real host: device-mapper, libcryptsetup, libblkid, sysfs and the file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

/// The one real host, for contexts that are not given another backend.
pub static HOST: Host = Host;

impl System for Host {
    fn canonicalize(&self, path: &Path) -> std::io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }
    fn devno_of(&self, path: &Path) -> Result<DevNo, Error> {
        dm::devno_of(path)
    }
    fn exists(&self, devno: DevNo) -> bool {
        devno.exists()
    }
    fn dev_path(&self, devno: DevNo) -> Option<PathBuf> {
        devno.dev_path()
    }
    fn size_bytes(&self, devno: DevNo) -> Option<u64> {
        devno.size_bytes()
    }
    fn holders(&self, devno: DevNo) -> Vec<String> {
        devno.holders()
    }
    fn processes(&self, devno: DevNo) -> Vec<String> {
        devno.processes()
    }
    fn exclusive_open(&self, device: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(device)
            .map(drop)
    }
    fn probe(&self, device: &Path, expect: Expect) -> Result<Probe, Error> {
        probe::probe(device, expect)
    }
    fn kernel_cipher(&self, cipher: &str, mode: &str, bits: u32) -> kcapi::Answer {
        kcapi::check(cipher, mode, bits)
    }
    fn read_header(&self, device: &Path) -> Option<DeviceHeader> {
        header::read(device)
    }
    fn find_device(&self, selector: &Selector) -> Result<Option<PathBuf>, String> {
        crate::udev::find(selector)
            .map(|d| d.and_then(|d| d.devnode))
            .map_err(|e| e.to_string())
    }

    fn dm_check(&self) -> Result<(), Error> {
        Dm::open().map(drop)
    }
    fn dm_info(&self, name: &str) -> Result<Option<MapInfo>, Error> {
        Dm::open()?.info(name)
    }
    fn dm_names(&self) -> Result<Vec<String>, Error> {
        Dm::open()?.list_names()
    }
    fn dm_remove(&self, name: &str) -> Result<bool, Error> {
        Dm::open()?.remove(name)
    }

    fn luks_uuid_and_keyslots(&self, device: &Path) -> Result<Option<(String, bool)>, Error> {
        crypt::luks_uuid_and_keyslots(device)
    }
    fn open_luks(
        &self,
        device: &Path,
        header: Option<crate::luks::Header>,
        passphrase: &[u8],
        to: Activation<'_>,
        how: Unlock,
        t: &mut AttachTimings,
    ) -> Result<bool, Error> {
        crypt::open_luks(device, header, passphrase, to, how, t)
    }
    fn open_plain(
        &self,
        device: &Path,
        cipher: Option<&str>,
        key_bits: Option<u32>,
        passphrase: &[u8],
        to: Activation<'_>,
    ) -> Result<(), Error> {
        crypt::open_plain(device, cipher, key_bits, passphrase, to)
    }
    fn format_luks(
        &self,
        device: &Path,
        h: &NewHeader<'_>,
        passphrase: &[u8],
    ) -> Result<(), Error> {
        crypt::format_luks(device, h, passphrase)
    }
    fn wipe_own_header(&self, device: &Path, uuid: &str) -> Result<bool, Error> {
        crypt::wipe_own_header(device, uuid)
    }
    fn keyslot_for(&self, device: &Path, passphrase: &[u8]) -> Result<Option<u32>, Error> {
        crypt::keyslot_for(device, passphrase)
    }
    fn keyslot_in_use(&self, device: &Path, slot: u32) -> Result<bool, Error> {
        crypt::keyslot_in_use(device, slot)
    }
    fn add_keyslot(
        &self,
        device: &Path,
        existing: &[u8],
        new: &[u8],
        pbkdf: Option<&PbkdfConfig>,
    ) -> Result<u32, Error> {
        crypt::add_keyslot(device, existing, new, pbkdf)
    }
    fn destroy_keyslot(&self, device: &Path, slot: u32) -> Result<(), Error> {
        crypt::destroy_keyslot(device, slot)
    }
    fn refresh(
        &self,
        device: &Path,
        plain: Option<Plain<'_>>,
        passphrase: &[u8],
        to: Activation<'_>,
    ) -> Result<(), Error> {
        crypt::refresh(device, plain, passphrase, to)
    }
    fn close(&self, name: &str) -> Result<Closed, Error> {
        crypt::close(name)
    }
    fn resize(&self, name: &str, passphrase: &[u8], key_id: &str) -> Result<(), Error> {
        crypt::resize(name, passphrase, key_id)
    }
    fn active_info(&self, name: &str) -> Result<Option<ActiveInfo>, Error> {
        crypt::active_info(name)
    }

    fn read_link(&self, link: &Path) -> Option<PathBuf> {
        links::read_link(link)
    }
    fn is_replaceable(&self, link: &Path) -> bool {
        links::is_replaceable(link)
    }
    fn set_symlink(&self, link: &Path, target: &Path) -> Result<Option<PathBuf>, Error> {
        links::set_symlink(link, target)
    }
    fn remove_if_points_to(&self, link: &Path, target: &Path) -> Result<bool, Error> {
        links::remove_if_points_to(link, target)
    }
    fn restore_if_points_to(
        &self,
        link: &Path,
        ours: &Path,
        previous: &Path,
    ) -> Result<bool, Error> {
        links::restore_if_points_to(link, ours, previous)
    }
}
