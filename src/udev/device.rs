//! Owned snapshots of udev block devices and the pure selector matching.

use std::path::{Path, PathBuf};

use crate::request::{Selector, normalize_wwn};
use crate::volume::dm::DevNo;

/// What udev said happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Add,
    Change,
    Remove,
    /// bind, unbind, move, …: not acted upon.
    Other,
}

impl Action {
    pub fn parse(s: &str) -> Action {
        match s {
            "add" => Action::Add,
            "change" => Action::Change,
            "remove" => Action::Remove,
            _ => Action::Other,
        }
    }
}

/// A block device as udev describes it: only what volcrypt needs, owned (no libudev handle).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockDevice {
    pub devnode: Option<PathBuf>,
    pub devno: Option<DevNo>,
    /// `disk` or `partition`.
    pub devtype: Option<String>,
    pub serial: Option<String>,
    pub serial_short: Option<String>,
    pub wwn: Option<String>,
    pub wwn_with_extension: Option<String>,
    pub id_path: Option<String>,
    pub fs_type: Option<String>,
    pub fs_uuid: Option<String>,
    /// `DEVLINKS`: every /dev link udev made for it.
    pub devlinks: Vec<PathBuf>,
    /// A path of a multipath map (`DM_MULTIPATH_DEVICE_PATH=1`, or blkid type
    /// `mpath_member`): it shares the map's identities, but only the map is to be attached.
    pub multipath_member: bool,
}

/// One udev event, owned, as the monitor thread sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEvent {
    pub action: Action,
    pub device: BlockDevice,
}

impl BlockDevice {
    /// Build from a property lookup (`udev::Device::property_value`, or a map in tests).
    pub fn from_properties(
        devnode: Option<&Path>,
        devnum: Option<u64>,
        prop: impl Fn(&str) -> Option<String>,
    ) -> BlockDevice {
        let nonempty = |k: &str| prop(k).filter(|v| !v.is_empty());
        BlockDevice {
            devnode: devnode.map(Path::to_owned),
            devno: devnum.filter(|d| *d != 0).map(|d| DevNo {
                major: nix::sys::stat::major(d) as u32,
                minor: nix::sys::stat::minor(d) as u32,
            }),
            devtype: nonempty("DEVTYPE"),
            serial: nonempty("ID_SERIAL"),
            serial_short: nonempty("ID_SERIAL_SHORT"),
            wwn: nonempty("ID_WWN"),
            wwn_with_extension: nonempty("ID_WWN_WITH_EXTENSION"),
            id_path: nonempty("ID_PATH"),
            fs_type: nonempty("ID_FS_TYPE"),
            fs_uuid: nonempty("ID_FS_UUID"),
            devlinks: prop("DEVLINKS")
                .map(|l| l.split_whitespace().map(PathBuf::from).collect())
                .unwrap_or_default(),
            multipath_member: prop("DM_MULTIPATH_DEVICE_PATH").as_deref() == Some("1")
                || prop("ID_FS_TYPE").as_deref() == Some("mpath_member"),
        }
    }

    /// Partitions inherit their disk's serial, WWN and ID_PATH: identities of a *disk* match
    /// only the disk itself.
    fn is_partition(&self) -> bool {
        self.devtype.as_deref() == Some("partition")
    }

    /// Whether this device is the one `selector` names.
    pub fn matches(&self, selector: &Selector) -> bool {
        if self.multipath_member {
            return false;
        }
        match selector {
            Selector::Serial(s) => {
                !self.is_partition()
                    && (self.serial.as_deref() == Some(s.as_str())
                        || self.serial_short.as_deref() == Some(s.as_str()))
            }
            Selector::Wwn(w) => {
                !self.is_partition()
                    && [&self.wwn, &self.wwn_with_extension]
                        .into_iter()
                        .flatten()
                        .any(|v| normalize_wwn(v) == *w)
            }
            Selector::ByPath(p) => {
                self.devlinks.iter().any(|l| l == p)
                    || (!self.is_partition()
                        && self
                            .id_path
                            .as_deref()
                            .is_some_and(|id| p.file_name().is_some_and(|f| f == id)))
            }
            Selector::LuksUuid(u) => {
                self.fs_type.as_deref() == Some("crypto_LUKS")
                    && self
                        .fs_uuid
                        .as_deref()
                        .is_some_and(|v| v.eq_ignore_ascii_case(u))
            }
        }
    }

    /// Whether this device is the one a path names (its node, or one of its links).
    pub fn is_path(&self, path: &Path) -> bool {
        self.devnode.as_deref() == Some(path) || self.devlinks.iter().any(|l| l == path)
    }
}

/// A LUKS block device with this UUID at `/dev/sdz`, for tests of device matching.
#[cfg(test)]
pub(crate) fn luks_test_device(uuid: &str) -> BlockDevice {
    BlockDevice {
        devnode: Some("/dev/sdz".into()),
        fs_type: Some("crypto_LUKS".into()),
        fs_uuid: Some(uuid.into()),
        ..BlockDevice::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn dev(props: &[(&str, &str)]) -> BlockDevice {
        let m: HashMap<String, String> = props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        BlockDevice::from_properties(Some(Path::new("/dev/sdb")), Some(0x0810), |k| {
            m.get(k).cloned()
        })
    }

    fn sel(json: &str) -> Selector {
        serde_json::from_str::<crate::request::DeviceSelector>(json)
            .unwrap()
            .selector()
            .unwrap()
    }

    #[test]
    fn properties_are_read_into_the_snapshot() {
        let d = dev(&[
            ("DEVTYPE", "disk"),
            ("ID_SERIAL", "QEMU_HARDDISK_1234"),
            ("ID_FS_TYPE", ""),
            (
                "DEVLINKS",
                "/dev/disk/by-id/a /dev/disk/by-path/pci-0-lun-0",
            ),
        ]);
        assert_eq!(
            d.devno,
            Some(DevNo {
                major: 8,
                minor: 16
            })
        );
        assert_eq!(d.serial.as_deref(), Some("QEMU_HARDDISK_1234"));
        assert_eq!(d.fs_type, None, "empty properties are absent");
        assert_eq!(d.devlinks.len(), 2);
        assert!(d.is_path(Path::new("/dev/sdb")));
        assert!(d.is_path(Path::new("/dev/disk/by-id/a")));
        assert!(!d.is_path(Path::new("/dev/sdc")));
    }

    #[test]
    fn serial_matches_long_or_short_form_of_disks_only() {
        let disk = dev(&[
            ("DEVTYPE", "disk"),
            ("ID_SERIAL", "Linux_scsi_debug_2000"),
            ("ID_SERIAL_SHORT", "2000"),
        ]);
        assert!(disk.matches(&sel(r#"{"serial":"Linux_scsi_debug_2000"}"#)));
        assert!(disk.matches(&sel(r#"{"serial":"2000"}"#)));
        assert!(!disk.matches(&sel(r#"{"serial":"200"}"#)));
        assert!(!disk.matches(&sel(r#"{"serial":"linux_scsi_debug_2000"}"#)));
        let part = dev(&[("DEVTYPE", "partition"), ("ID_SERIAL_SHORT", "2000")]);
        assert!(!part.matches(&sel(r#"{"serial":"2000"}"#)));
    }

    #[test]
    fn wwn_matches_either_property_in_any_spelling() {
        let d = dev(&[
            ("DEVTYPE", "disk"),
            ("ID_WWN", "0x5000c500a1b2c3d4"),
            ("ID_WWN_WITH_EXTENSION", "0x5000c500a1b2c3d4aabb"),
        ]);
        assert!(d.matches(&sel(r#"{"wwn":"0x5000C500A1B2C3D4"}"#)));
        assert!(d.matches(&sel(r#"{"wwn":"naa.5000c500a1b2c3d4"}"#)));
        assert!(d.matches(&sel(r#"{"wwn":"5000c500a1b2c3d4aabb"}"#)));
        assert!(!d.matches(&sel(r#"{"wwn":"5000c500a1b2c3d5"}"#)));
        let none = dev(&[("DEVTYPE", "disk")]);
        assert!(!none.matches(&sel(r#"{"wwn":"5000c500a1b2c3d4"}"#)));
    }

    #[test]
    fn by_path_matches_a_devlink_or_the_id_path() {
        let d = dev(&[
            ("DEVTYPE", "disk"),
            ("ID_PATH", "ip-10.0.0.1:3260-iscsi-iqn.x-lun-1"),
            ("DEVLINKS", "/dev/disk/by-path/pci-0000:00:1f.2-ata-1"),
        ]);
        assert!(d.matches(&sel(
            r#"{"by_path":"/dev/disk/by-path/pci-0000:00:1f.2-ata-1"}"#
        )));
        assert!(d.matches(&sel(
            r#"{"by_path":"/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.x-lun-1"}"#
        )));
        assert!(!d.matches(&sel(
            r#"{"by_path":"/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.x-lun-2"}"#
        )));
    }

    #[test]
    fn luks_uuid_needs_the_luks_type_and_ignores_case() {
        let u = "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55";
        let d = dev(&[("ID_FS_TYPE", "crypto_LUKS"), ("ID_FS_UUID", u)]);
        assert!(d.matches(&sel(&format!(r#"{{"luks_uuid":"{}"}}"#, u.to_uppercase()))));
        let ext4 = dev(&[("ID_FS_TYPE", "ext4"), ("ID_FS_UUID", u)]);
        assert!(!ext4.matches(&sel(&format!(r#"{{"luks_uuid":"{u}"}}"#))));
        // A LUKS partition is fine: the UUID is the header's own.
        let part = dev(&[
            ("DEVTYPE", "partition"),
            ("ID_FS_TYPE", "crypto_LUKS"),
            ("ID_FS_UUID", u),
        ]);
        assert!(part.matches(&sel(&format!(r#"{{"luks_uuid":"{u}"}}"#))));
    }

    #[test]
    fn multipath_paths_never_match() {
        let path = dev(&[
            ("DEVTYPE", "disk"),
            ("ID_SERIAL", "3600a0980"),
            ("DM_MULTIPATH_DEVICE_PATH", "1"),
        ]);
        assert!(path.multipath_member);
        assert!(!path.matches(&sel(r#"{"serial":"3600a0980"}"#)));
        let member = dev(&[
            ("DEVTYPE", "disk"),
            ("ID_FS_TYPE", "mpath_member"),
            ("ID_SERIAL", "s"),
        ]);
        assert!(!member.matches(&sel(r#"{"serial":"s"}"#)));
        let plain = dev(&[
            ("DEVTYPE", "disk"),
            ("ID_SERIAL", "s"),
            ("DM_MULTIPATH_DEVICE_PATH", "0"),
        ]);
        assert!(plain.matches(&sel(r#"{"serial":"s"}"#)));
    }

    #[test]
    fn actions_parse() {
        assert_eq!(Action::parse("add"), Action::Add);
        assert_eq!(Action::parse("change"), Action::Change);
        assert_eq!(Action::parse("remove"), Action::Remove);
        assert_eq!(Action::parse("bind"), Action::Other);
    }
}
