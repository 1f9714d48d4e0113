//! A simulated host for unit tests of the engine: block devices with their contents (blank, a
//! foreign signature, a LUKS header with or without its keyslot), device-mapper mappings and
//! links, all in memory. Every step that changes something first passes [`Sim::enter`], which
//! can "crash" there (a panic carrying [`Crash`], caught by the test: the step never happened
//! and nothing after it runs, as when the agent is killed) or fail it with an error. The
//! journal's writes are steps too, through [`System::step`].
//!
//! Modelled after the real host where the engine depends on it: an activation is two steps
//! (libcryptsetup creates a table-less device, then loads the table), a format is two (the
//! header, then the keyslot), a busy mapping refuses to close, a removed device no longer
//! resolves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::crypt::{Activation, ActiveInfo, Closed, NewHeader, Plain, Unlock};
use super::dm::{DevNo, MapInfo};
use super::header::DeviceHeader;
use super::probe::Probe;
use super::system::System;
use super::timing::AttachTimings;
use super::{Error, PerfFlags};

/// The panic payload of a simulated crash.
#[derive(Debug)]
pub struct Crash(pub &'static str);

/// What a simulated device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Blank,
    /// Something libblkid would recognise.
    Signature(&'static str),
    /// A LUKS header and the passphrase of each keyslot in use (none before a format's first
    /// keyslot is written).
    Luks {
        uuid: String,
        slots: BTreeMap<u32, Vec<u8>>,
    },
}

impl Content {
    /// A LUKS header whose keyslot 0 `passphrase` opens.
    pub fn luks(uuid: &str, passphrase: &[u8]) -> Content {
        Content::Luks {
            uuid: uuid.into(),
            slots: BTreeMap::from([(0, passphrase.to_vec())]),
        }
    }

    /// The keyslot `passphrase` opens, if this is a LUKS header.
    pub fn keyslot_for(&self, passphrase: &[u8]) -> Option<u32> {
        match self {
            Content::Luks { slots, .. } => slots
                .iter()
                .find(|(_, p)| p.as_slice() == passphrase)
                .map(|(n, _)| *n),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub devno: DevNo,
    pub content: Content,
    pub present: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub devno: DevNo,
    /// `None`: created, table not loaded yet.
    pub backing: Option<DevNo>,
    pub open_count: i32,
    pub uuid: String,
    pub flags: PerfFlags,
}

/// Everything the simulated host holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// By canonical path.
    pub devices: BTreeMap<PathBuf, Device>,
    pub maps: BTreeMap<String, Mapping>,
    pub links: BTreeMap<PathBuf, PathBuf>,
    /// Persistent activation flags stored in a device's LUKS2 header, by canonical path.
    pub header_flags: BTreeMap<PathBuf, PerfFlags>,
    /// Formats written over a header whose keyslot was in use: must stay 0.
    pub formats_over_data: usize,
    next_dm_minor: u32,
}

#[derive(Default)]
pub struct Sim {
    state: Mutex<State>,
    steps: AtomicUsize,
    /// Crash before step number n (1-based); 0: never.
    crash_at: AtomicUsize,
    /// Fail every step with this name (fault injection), with an I/O error.
    fail: Mutex<Option<&'static str>>,
    /// The names of the steps taken, in order.
    taken: Mutex<Vec<&'static str>>,
}

impl Sim {
    pub fn new() -> Sim {
        Sim::default()
    }

    /// Add a block device at `path` (canonical) holding `content`.
    pub fn add_device(&self, path: &str, minor: u32, content: Content) {
        self.lock().devices.insert(
            PathBuf::from(path),
            Device {
                devno: DevNo { major: 8, minor },
                content,
                present: true,
            },
        );
    }

    pub fn add_link(&self, link: &str, target: &str) {
        self.lock()
            .links
            .insert(PathBuf::from(link), PathBuf::from(target));
    }

    pub fn state(&self) -> State {
        self.lock().clone()
    }

    pub fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.lock())
    }

    /// Crash before step `n` from now on (counting from the next step as 1); 0: never.
    pub fn crash_before(&self, n: usize) {
        self.steps.store(0, Ordering::SeqCst);
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.crash_at.store(n, Ordering::SeqCst);
    }

    pub fn fail_step(&self, name: Option<&'static str>) {
        *self.fail.lock().unwrap_or_else(|e| e.into_inner()) = name;
    }

    /// The steps taken since [`Self::crash_before`].
    pub fn taken(&self) -> Vec<&'static str> {
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count a step, crashing before it when asked.
    fn count(&self, what: &'static str) {
        let n = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
        if self.crash_at.load(Ordering::SeqCst) == n {
            std::panic::panic_any(Crash(what));
        }
        self.taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(what);
    }

    /// Count a step; crash or fail it when asked.
    fn enter(&self, what: &'static str) -> Result<(), Error> {
        self.count(what);
        if *self.fail.lock().unwrap_or_else(|e| e.into_inner()) == Some(what) {
            return Err(Error::io(
                "simulated step",
                what,
                std::io::Error::other("injected fault"),
            ));
        }
        Ok(())
    }

    fn device(&self, path: &Path) -> Option<Device> {
        self.lock().devices.get(path).filter(|d| d.present).cloned()
    }

    /// Create mapping `to.name` on `device` in the two steps of a libcryptsetup activation.
    fn activate(&self, device: &Path, to: Activation<'_>, uuid: String) -> Result<(), Error> {
        let backing = self.device(device).map(|d| d.devno);
        self.enter("activate: create device")?;
        {
            let mut s = self.lock();
            if s.maps.contains_key(to.name) {
                return Err(Error::Crypt {
                    op: "activate",
                    target: to.name.to_owned(),
                    detail: "device already exists".into(),
                    kind: crate::kind::Kind::Busy,
                });
            }
            s.next_dm_minor += 1;
            let devno = DevNo {
                major: 253,
                minor: s.next_dm_minor,
            };
            let m = Mapping {
                devno,
                backing: None,
                open_count: 0,
                uuid,
                flags: to.flags,
            };
            s.maps.insert(to.name.to_owned(), m);
        }
        if let Err(e) = self.enter("activate: load table") {
            // libcryptsetup removes the device it created when the activation fails.
            self.lock().maps.remove(to.name);
            return Err(e);
        }
        if let Some(m) = self.lock().maps.get_mut(to.name) {
            m.backing = backing;
        }
        Ok(())
    }

    fn resolve(&self, path: &Path) -> Option<PathBuf> {
        let s = self.lock();
        let mut p = path.to_owned();
        for _ in 0..8 {
            if let Some(name) = p.strip_prefix("/dev/mapper").ok().and_then(|n| n.to_str()) {
                return s
                    .maps
                    .get(name)
                    .map(|m| PathBuf::from(format!("/dev/dm-{}", m.devno.minor)));
            }
            match s.links.get(&p) {
                Some(t) => p = t.clone(),
                None => break,
            }
        }
        let is_dm = s
            .maps
            .values()
            .any(|m| p == Path::new(&format!("/dev/dm-{}", m.devno.minor)));
        (is_dm || s.devices.get(&p).is_some_and(|d| d.present)).then_some(p)
    }
}

fn not_found(path: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{}: no such simulated device", path.display()),
    )
}

impl System for Sim {
    fn step(&self, what: &'static str) {
        // The journal's writes are not failed here; only crashed.
        self.count(what);
    }

    fn canonicalize(&self, path: &Path) -> std::io::Result<PathBuf> {
        self.resolve(path).ok_or_else(|| not_found(path))
    }
    fn devno_of(&self, path: &Path) -> Result<DevNo, Error> {
        let p = self.resolve(path).ok_or_else(|| Error::NoDevice {
            path: path.to_owned(),
            detail: ": no such simulated device".into(),
        })?;
        let s = self.lock();
        if let Some(d) = s.devices.get(&p) {
            return Ok(d.devno);
        }
        s.maps
            .values()
            .find(|m| p == Path::new(&format!("/dev/dm-{}", m.devno.minor)))
            .map(|m| m.devno)
            .ok_or_else(|| Error::NoDevice {
                path: path.to_owned(),
                detail: String::new(),
            })
    }
    fn exists(&self, devno: DevNo) -> bool {
        let s = self.lock();
        s.devices.values().any(|d| d.devno == devno && d.present)
            || s.maps.values().any(|m| m.devno == devno)
    }
    fn dev_path(&self, devno: DevNo) -> Option<PathBuf> {
        let s = self.lock();
        s.devices
            .iter()
            .find(|(_, d)| d.devno == devno && d.present)
            .map(|(p, _)| p.clone())
    }
    fn size_bytes(&self, devno: DevNo) -> Option<u64> {
        self.exists(devno).then_some(1 << 30)
    }
    fn holders(&self, devno: DevNo) -> Vec<String> {
        let s = self.lock();
        s.maps
            .iter()
            .filter(|(_, m)| m.backing == Some(devno))
            .map(|(n, m)| format!("dm-{} ({n})", m.devno.minor))
            .collect()
    }
    fn processes(&self, devno: DevNo) -> Vec<String> {
        let s = self.lock();
        let open = s
            .maps
            .values()
            .any(|m| m.devno == devno && m.open_count > 0);
        if open {
            vec!["4242 (simulated)".into()]
        } else {
            Vec::new()
        }
    }
    fn exclusive_open(&self, device: &Path) -> std::io::Result<()> {
        let devno = self
            .device(device)
            .map(|d| d.devno)
            .ok_or_else(|| not_found(device))?;
        if self.holders(devno).is_empty() {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(nix::libc::EBUSY))
        }
    }
    fn kernel_cipher(&self, _cipher: &str, _mode: &str, _bits: u32) -> super::kcapi::Answer {
        super::kcapi::Answer::Runs
    }
    /// The simulated devices are all zeros where they are blank: `expect` holds for them.
    fn probe(&self, device: &Path, _expect: super::probe::Expect) -> Result<Probe, Error> {
        Ok(match self.device(device).map(|d| d.content) {
            Some(Content::Blank) => Probe::Blank,
            Some(Content::Signature(s)) => Probe::Signature(format!("a {s} signature")),
            Some(Content::Luks { .. }) => Probe::Signature("a crypto_LUKS signature".into()),
            None => {
                return Err(Error::NoDevice {
                    path: device.to_owned(),
                    detail: String::new(),
                });
            }
        })
    }
    fn read_header(&self, _device: &Path) -> Option<DeviceHeader> {
        None
    }
    /// The simulated host has no udev: its requests name devices by path.
    fn find_device(&self, _selector: &crate::request::Selector) -> Result<Option<PathBuf>, String> {
        Ok(None)
    }

    fn dm_check(&self) -> Result<(), Error> {
        Ok(())
    }
    fn dm_info(&self, name: &str) -> Result<Option<MapInfo>, Error> {
        Ok(self.lock().maps.get(name).map(|m| MapInfo {
            name: name.to_owned(),
            devno: m.devno,
            uuid: Some(m.uuid.clone()),
            open_count: m.open_count,
            read_only: false,
            suspended: false,
            deps: m.backing.into_iter().collect(),
        }))
    }
    fn dm_names(&self) -> Result<Vec<String>, Error> {
        Ok(self.lock().maps.keys().cloned().collect())
    }
    fn dm_remove(&self, name: &str) -> Result<bool, Error> {
        self.enter("dm remove")?;
        let mut s = self.lock();
        match s.maps.get(name) {
            Some(m) if m.open_count > 0 => Ok(false),
            _ => Ok(s.maps.remove(name).is_some()),
        }
    }

    fn luks_uuid_and_keyslots(&self, device: &Path) -> Result<Option<(String, bool)>, Error> {
        Ok(match self.device(device).map(|d| d.content) {
            Some(Content::Luks { uuid, slots }) => Some((uuid, !slots.is_empty())),
            _ => None,
        })
    }
    fn open_luks(
        &self,
        device: &Path,
        _header: Option<crate::luks::Header>,
        passphrase: &[u8],
        to: Activation<'_>,
        how: Unlock,
        _t: &mut AttachTimings,
    ) -> Result<bool, Error> {
        let Some(Content::Luks { uuid, slots }) = self.device(device).map(|d| d.content) else {
            return Ok(false);
        };
        if slots.is_empty() {
            return Err(Error::Crypt {
                op: "activate",
                target: device.display().to_string(),
                detail: "the LUKS header has no usable keyslot".into(),
                kind: crate::kind::Kind::WrongDevice,
            });
        }
        if !slots.values().any(|p| p == passphrase) {
            return Err(Error::WrongKey {
                key_id: to.key_id.to_owned(),
                device: device.to_owned(),
            });
        }
        // The host's engine unlocks in userspace before device-mapper: so does this one.
        if let (Unlock::Userspace, Some(crate::volume::crypt::AfterKdf(done))) = (how, to.after_kdf)
        {
            done();
        }
        let hex = uuid.replace('-', "");
        self.activate(device, to, format!("CRYPT-LUKS2-{hex}-{}", to.name))?;
        Ok(true)
    }
    fn open_plain(
        &self,
        device: &Path,
        _cipher: Option<&str>,
        _key_bits: Option<u32>,
        _passphrase: &[u8],
        to: Activation<'_>,
    ) -> Result<(), Error> {
        self.device(device).ok_or_else(|| Error::NoDevice {
            path: device.to_owned(),
            detail: String::new(),
        })?;
        self.activate(device, to, format!("CRYPT-PLAIN-{}", to.name))
    }
    fn format_luks(
        &self,
        device: &Path,
        h: &NewHeader<'_>,
        passphrase: &[u8],
    ) -> Result<(), Error> {
        self.enter("format: header")?;
        self.with_device(device, |d| {
            if matches!(&d.content, Content::Luks { slots, .. } if !slots.is_empty()) {
                return Err(());
            }
            d.content = Content::Luks {
                uuid: h.uuid.to_string(),
                slots: BTreeMap::new(),
            };
            Ok(())
        })
        .map_err(|()| {
            self.lock().formats_over_data += 1;
            Error::io("format", device, std::io::Error::other("over a keyslot"))
        })?;
        self.enter("format: keyslot")?;
        let _ = self.with_device(device, |d| {
            if let Content::Luks { slots, .. } = &mut d.content {
                slots.insert(0, passphrase.to_vec());
            }
            Ok(())
        });
        Ok(())
    }
    fn wipe_own_header(&self, device: &Path, uuid: &str) -> Result<bool, Error> {
        self.enter("wipe header")?;
        Ok(self
            .with_device(device, |d| match &d.content {
                Content::Luks { uuid: u, .. } if u.eq_ignore_ascii_case(uuid) => {
                    d.content = Content::Blank;
                    Ok(())
                }
                _ => Err(()),
            })
            .is_ok())
    }
    fn keyslot_for(&self, device: &Path, passphrase: &[u8]) -> Result<Option<u32>, Error> {
        Ok(self
            .device(device)
            .and_then(|d| d.content.keyslot_for(passphrase)))
    }
    fn keyslot_in_use(&self, device: &Path, slot: u32) -> Result<bool, Error> {
        Ok(matches!(
            self.device(device).map(|d| d.content),
            Some(Content::Luks { slots, .. }) if slots.contains_key(&slot)
        ))
    }
    fn add_keyslot(
        &self,
        device: &Path,
        existing: &[u8],
        new: &[u8],
        _pbkdf: Option<&super::PbkdfConfig>,
    ) -> Result<u32, Error> {
        let wrong = || Error::WrongKey {
            key_id: "(existing)".into(),
            device: device.to_owned(),
        };
        self.device(device)
            .and_then(|d| d.content.keyslot_for(existing))
            .ok_or_else(wrong)?;
        self.enter("add keyslot")?;
        let mut added = None;
        let _ = self.with_device(device, |d| {
            if let Content::Luks { slots, .. } = &mut d.content {
                let n = (0..).find(|n| !slots.contains_key(n)).unwrap_or(0);
                slots.insert(n, new.to_vec());
                added = Some(n);
            }
            Ok(())
        });
        added.ok_or_else(wrong)
    }
    fn destroy_keyslot(&self, device: &Path, slot: u32) -> Result<(), Error> {
        self.enter("remove keyslot")?;
        let _ = self.with_device(device, |d| {
            if let Content::Luks { slots, .. } = &mut d.content {
                slots.remove(&slot);
            }
            Ok(())
        });
        Ok(())
    }
    fn close(&self, name: &str) -> Result<Closed, Error> {
        self.enter("close")?;
        let mut s = self.lock();
        Ok(match s.maps.get(name) {
            None => Closed::NotActive,
            Some(m) if m.open_count > 0 => Closed::Busy,
            Some(_) => {
                s.maps.remove(name);
                Closed::Closed
            }
        })
    }
    fn resize(&self, name: &str, _passphrase: &[u8], _key_id: &str) -> Result<(), Error> {
        self.enter("resize")?;
        match self.lock().maps.contains_key(name) {
            true => Ok(()),
            false => Err(Error::NoDevice {
                path: name.into(),
                detail: String::new(),
            }),
        }
    }
    fn refresh(
        &self,
        device: &Path,
        plain: Option<Plain<'_>>,
        passphrase: &[u8],
        to: Activation<'_>,
    ) -> Result<(), Error> {
        let refuse = |detail: &str| Error::Crypt {
            op: "refresh",
            target: to.name.to_owned(),
            detail: detail.to_owned(),
            kind: crate::kind::Kind::Invalid,
        };
        if !self.lock().maps.contains_key(to.name) {
            return Err(refuse("the mapping is not active"));
        }
        match (plain, self.device(device).map(|d| d.content)) {
            (Some(_), _) if to.persistent => return Err(refuse(crate::request::NOT_PERSISTABLE)),
            (Some(_), _) => {}
            (None, Some(c @ Content::Luks { .. })) if c.keyslot_for(passphrase).is_some() => {}
            (None, Some(Content::Luks { .. })) => {
                return Err(Error::WrongKey {
                    key_id: to.key_id.to_owned(),
                    device: device.to_owned(),
                });
            }
            (None, _) => return Err(refuse("the device carries no LUKS header")),
        }
        // The real refresh stores the header's flags first and puts them back when the kernel
        // refuses the table: either way a failed refresh changes nothing.
        self.enter("refresh")?;
        let mut s = self.lock();
        if let Some(m) = s.maps.get_mut(to.name) {
            m.flags = to.flags;
        }
        if to.persistent {
            s.header_flags.insert(device.to_owned(), to.flags);
        }
        Ok(())
    }
    fn active_info(&self, name: &str) -> Result<Option<ActiveInfo>, Error> {
        Ok(self.lock().maps.get(name).map(|m| ActiveInfo {
            kind: if m.uuid.starts_with("CRYPT-PLAIN") {
                "PLAIN"
            } else {
                "LUKS2"
            }
            .into(),
            cipher: "aes-xts-plain64".into(),
            key_bits: 512,
            sector_size: 512,
            size_sectors: 1 << 21,
            flags: m.flags,
            key_in_keyring: false,
        }))
    }

    fn read_link(&self, link: &Path) -> Option<PathBuf> {
        self.lock().links.get(link).cloned()
    }
    fn is_replaceable(&self, link: &Path) -> bool {
        !self.lock().devices.contains_key(link)
    }
    fn set_symlink(&self, link: &Path, target: &Path) -> Result<Option<PathBuf>, Error> {
        let previous = self.read_link(link);
        if previous.as_deref() == Some(target) {
            return Ok(previous);
        }
        self.enter("set link")?;
        self.lock().links.insert(link.to_owned(), target.to_owned());
        Ok(previous)
    }
    fn remove_if_points_to(&self, link: &Path, target: &Path) -> Result<bool, Error> {
        if self.read_link(link).as_deref() != Some(target) {
            return Ok(false);
        }
        self.enter("remove link")?;
        self.lock().links.remove(link);
        Ok(true)
    }
    fn restore_if_points_to(
        &self,
        link: &Path,
        ours: &Path,
        previous: &Path,
    ) -> Result<bool, Error> {
        if self.read_link(link).as_deref() != Some(ours) {
            return Ok(false);
        }
        self.enter("restore link")?;
        self.lock()
            .links
            .insert(link.to_owned(), previous.to_owned());
        Ok(true)
    }
}

impl Sim {
    fn with_device(
        &self,
        path: &Path,
        f: impl FnOnce(&mut Device) -> Result<(), ()>,
    ) -> Result<(), ()> {
        match self.lock().devices.get_mut(path) {
            Some(d) if d.present => f(d),
            _ => Err(()),
        }
    }
}
