//! Enumeration of the block devices present now.

use crate::request::Selector;

use super::{BlockDevice, Error};

/// Snapshot of one libudev device.
pub(crate) fn snapshot(d: &udev::Device) -> BlockDevice {
    BlockDevice::from_properties(d.devnode(), d.devnum(), |k| {
        d.property_value(k)
            .map(|v| v.to_string_lossy().into_owned())
    })
}

/// Every initialized block device udev knows now (udev's database, so the identity properties
/// are those its rules set). Blocking, cheap (a sysfs walk plus database reads).
pub fn scan() -> Result<Vec<BlockDevice>, Error> {
    let mut e = udev::Enumerator::new().map_err(|e| Error::udev("enumerator", e))?;
    e.match_subsystem("block")
        .map_err(|e| Error::udev("match subsystem block", e))?;
    e.match_is_initialized()
        .map_err(|e| Error::udev("match initialized", e))?;
    let list = e
        .scan_devices()
        .map_err(|e| Error::udev("scan block devices", e))?;
    Ok(list
        .map(|d| snapshot(&d))
        .filter(|d| d.devnode.is_some())
        .collect())
}

/// The one present device `selector` names: `None` if there is none, an error if there are
/// several (two disks with one serial, or a LUKS UUID cloned onto two devices: attaching
/// either could be the wrong one).
pub fn find(selector: &Selector) -> Result<Option<BlockDevice>, Error> {
    pick(scan()?, selector)
}

/// The matching part of [`find`] (pure).
pub fn pick(devices: Vec<BlockDevice>, selector: &Selector) -> Result<Option<BlockDevice>, Error> {
    let mut found: Vec<BlockDevice> = devices
        .into_iter()
        .filter(|d| d.matches(selector))
        .collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => Err(Error::Ambiguous {
            selector: selector.to_string(),
            count: n,
            nodes: found
                .iter()
                .filter_map(|d| d.devnode.as_ref().map(|p| p.display().to_string()))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn luks(node: &str, uuid: &str) -> BlockDevice {
        BlockDevice {
            devnode: Some(PathBuf::from(node)),
            fs_type: Some("crypto_LUKS".into()),
            fs_uuid: Some(uuid.into()),
            ..BlockDevice::default()
        }
    }

    #[test]
    fn pick_finds_one_none_or_refuses_several() {
        let u = "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55";
        let s = Selector::LuksUuid(u.into());
        let one = pick(vec![luks("/dev/sdb", u), luks("/dev/sdc", "x")], &s).unwrap();
        assert_eq!(one.unwrap().devnode.as_deref(), Some(Path::new("/dev/sdb")));
        assert_eq!(pick(vec![luks("/dev/sdc", "x")], &s).unwrap(), None);
        let e = pick(vec![luks("/dev/sdb", u), luks("/dev/sdd", u)], &s).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("/dev/sdb") && m.contains("/dev/sdd") && m.contains(u),
            "{m}"
        );
    }

    /// Runs against this host's udev database; every device found has a node.
    #[test]
    fn scan_lists_block_devices_with_nodes() {
        match scan() {
            Ok(devs) => assert!(devs.iter().all(|d| d.devnode.is_some())),
            // A container without /sys or udev: enumeration fails with a named error.
            Err(e) => assert!(e.to_string().contains("udev"), "{e}"),
        }
    }
}
