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
/// several unrelated ones (two disks with one serial, or a LUKS header cloned onto two
/// devices: attaching either could be the wrong one). Devices stacked on each other are one
/// device: a multipath map and its paths all carry the LUKS UUID, and the map (the holder)
/// is the one to attach.
pub fn find(selector: &Selector) -> Result<Option<BlockDevice>, Error> {
    pick(scan()?, selector, |d| {
        d.devno.map(|n| n.holders()).unwrap_or_default()
    })
}

/// The matching part of [`find`], with the holders lookup (`/sys/dev/block/M:m/holders`)
/// passed in so it can be tested without sysfs.
pub fn pick(
    devices: Vec<BlockDevice>,
    selector: &Selector,
    holders: impl Fn(&BlockDevice) -> Vec<String>,
) -> Result<Option<BlockDevice>, Error> {
    let found: Vec<BlockDevice> = devices
        .into_iter()
        .filter(|d| d.matches(selector))
        .collect();
    if found.len() <= 1 {
        return Ok(found.into_iter().next());
    }
    let kernel_name = |d: &BlockDevice| {
        d.devnode
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|f| f.to_string_lossy().into_owned())
    };
    let names: Vec<String> = found.iter().filter_map(kernel_name).collect();
    // Keep only the top of each stack: drop a match that another match holds.
    let top: Vec<&BlockDevice> = found
        .iter()
        .filter(|d| !holders(d).iter().any(|h| names.contains(h)))
        .collect();
    if let [one] = top.as_slice() {
        return Ok(Some((*one).clone()));
    }
    Err(Error::Ambiguous {
        selector: selector.to_string(),
        count: found.len(),
        nodes: found
            .iter()
            .filter_map(|d| d.devnode.as_ref().map(|p| p.display().to_string()))
            .collect::<Vec<_>>()
            .join(", "),
    })
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
        let none = |_: &BlockDevice| Vec::new();
        let one = pick(vec![luks("/dev/sdb", u), luks("/dev/sdc", "x")], &s, none).unwrap();
        assert_eq!(one.unwrap().devnode.as_deref(), Some(Path::new("/dev/sdb")));
        assert_eq!(pick(vec![luks("/dev/sdc", "x")], &s, none).unwrap(), None);
        let e = pick(vec![luks("/dev/sdb", u), luks("/dev/sdd", u)], &s, none).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("/dev/sdb") && m.contains("/dev/sdd") && m.contains(u),
            "{m}"
        );
    }

    #[test]
    fn a_multipath_map_wins_over_its_paths() {
        let u = "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55";
        let s = Selector::LuksUuid(u.into());
        // sdb and sdc are two paths held by dm-3, which carries the same header.
        let held_by_dm3 = |d: &BlockDevice| match d.devnode.as_deref() {
            Some(p) if p == Path::new("/dev/sdb") || p == Path::new("/dev/sdc") => {
                vec!["dm-3".to_owned()]
            }
            _ => Vec::new(),
        };
        let devs = vec![
            luks("/dev/sdb", u),
            luks("/dev/dm-3", u),
            luks("/dev/sdc", u),
        ];
        let got = pick(devs.clone(), &s, held_by_dm3).unwrap().unwrap();
        assert_eq!(got.devnode.as_deref(), Some(Path::new("/dev/dm-3")));
        // An unrelated fourth copy makes it ambiguous again.
        let mut more = devs;
        more.push(luks("/dev/sdz", u));
        assert!(matches!(
            pick(more, &s, held_by_dm3),
            Err(Error::Ambiguous { count: 4, .. })
        ));
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
