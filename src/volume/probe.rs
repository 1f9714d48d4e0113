//! The probe that stands between a device and `luksFormat`.
//!
//! os-brick formats any device that fails to open as LUKS, and peers have lost data that way.
//! volcrypt formats only when libblkid, probing superblocks *and* partition tables, finds
//! nothing at all; an ambiguous result or a read error counts as "something is there".

use std::path::Path;

use libblkid_rs::{BlkidProbe, BlkidSafeprobeRet};

use super::Error;

/// What the probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No filesystem, RAID/LVM member, LUKS header or partition table.
    Blank,
    /// Something recognizable, described for the error message (e.g. `ext4 filesystem`).
    Signature(String),
}

fn probe_err(device: &Path, e: impl std::fmt::Display) -> Error {
    Error::Crypt {
        op: "probe for signatures",
        target: device.display().to_string(),
        detail: e.to_string(),
        kind: crate::kind::Kind::Invalid,
    }
}

/// Probe `device` (read-only) for any signature libblkid knows.
pub fn probe(device: &Path) -> Result<Probe, Error> {
    let mut p = BlkidProbe::new_from_filename(device).map_err(|e| probe_err(device, e))?;
    p.enable_superblocks(true)
        .map_err(|e| probe_err(device, e))?;
    p.enable_partitions(true)
        .map_err(|e| probe_err(device, e))?;
    match p.do_safeprobe() {
        Ok(BlkidSafeprobeRet::None) => Ok(Probe::Blank),
        Ok(BlkidSafeprobeRet::Success) => {
            let lookup = |k: &str| p.lookup_value(k).ok().filter(|v| !v.is_empty());
            let found = if let Some(t) = lookup("TYPE") {
                let usage = lookup("USAGE").unwrap_or_else(|| "signature".into());
                format!("a {t} {usage} signature")
            } else if let Some(pt) = lookup("PTTYPE") {
                format!("a {pt} partition table")
            } else {
                "an unnamed signature".into()
            };
            Ok(Probe::Signature(found))
        }
        Ok(BlkidSafeprobeRet::Ambiguous) => Ok(Probe::Signature(
            "several conflicting signatures (blkid: ambiguous)".into(),
        )),
        Err(e) => Err(probe_err(device, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_file_is_blank_and_ext4_and_gpt_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.img");
        std::fs::write(&f, vec![0u8; 8 << 20]).unwrap();
        assert_eq!(probe(&f).unwrap(), Probe::Blank);

        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&f)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            match probe(&f).unwrap() {
                Probe::Signature(s) => assert!(s.contains("ext4"), "{s}"),
                Probe::Blank => panic!("ext4 not detected"),
            }
        } else {
            eprintln!("skipped ext4 part: mkfs.ext4 not available");
        }

        std::fs::write(&f, vec![0u8; 8 << 20]).unwrap();
        let ok = std::process::Command::new("sfdisk")
            .arg("-q")
            .arg(&f)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .map(|mut s| s.write_all(b"label: gpt\n,1M\n"));
                c.wait()
            })
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            match probe(&f).unwrap() {
                Probe::Signature(s) => assert!(s.contains("gpt"), "{s}"),
                Probe::Blank => panic!("GPT not detected"),
            }
        } else {
            eprintln!("skipped gpt part: sfdisk not available");
        }
    }

    #[test]
    fn missing_device_is_an_error_not_blank() {
        assert!(probe(Path::new("/nonexistent/volcrypt-dev")).is_err());
    }
}
