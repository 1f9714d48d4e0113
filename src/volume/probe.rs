//! The probe that stands between a device and `luksFormat`.
//!
//! os-brick formats any device that fails to open as LUKS, and peers have lost data that way.
//! volcrypt formats only a device that is blank, and "blank" means all of:
//! - libblkid, probing every superblock it knows (including RAID/LVM/DRBD metadata kept at the
//!   end of a device, and signatures with a bad checksum) *and* every partition table, reports
//!   nothing at all (each signature is looked at, not just the first one found);
//! - the last sector (at 512 and 4096 bytes) holds no backup GPT header: a disk whose start was
//!   wiped still has its partitions described there, and `gdisk`/`sfdisk` recover them, but
//!   libblkid looks for that header only behind a protective MBR;
//! - every byte the format is about to overwrite (the LUKS header area, see [`header_area`])
//!   reads as zero. New Cinder, Ceph and LVM-thin volumes do, so the normal path pays only the
//!   read; a backend that hands out non-zeroed blank volumes needs the operator's
//!   `allow_nonzero_blank` (logged as a warning every time it lets a format through).
//!
//! A read error anywhere counts as "something is there", and its message names the offset.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use libblkid_rs::{BlkidProbe, BlkidProbeRet, BlkidSublks, BlkidSublksFlags};

use super::Error;
use crate::kind::Kind;

/// What the probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature, no backup GPT, and the header area reads as zeros (or the operator
    /// allowed non-zero data there).
    Blank,
    /// What is there and where, for the refusal message (`an ext4 filesystem signature at
    /// offset 1080`, `a backup GPT header at LBA 16383`, `non-zero data at offset 4096 …`).
    Signature(String),
}

/// What the caller is about to write, and what the operator allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// Bytes from the start of the device the format overwrites; they must read as zeros.
    pub header_bytes: u64,
    /// The `[volume] allow_nonzero_blank` override: non-zero bytes in the header area do not
    /// refuse the format (signatures still do).
    pub allow_nonzero: bool,
}

const MIB: u64 = 1 << 20;

/// LUKS1 with libcryptsetup's default 1 MiB alignment: header sector, 8 keyslots of
/// `key_bytes * 4000` anti-forensic stripes (each 4 KiB aligned), rounded up to the alignment.
/// Never less than 2 MiB, the size cryptsetup's default (512-bit XTS key) gives.
pub fn luks1_header_area(key_bytes: u64) -> u64 {
    let align = |v: u64, a: u64| v.div_ceil(a) * a;
    let slots = 8 * align(key_bytes * 4000, 4096);
    align(4096 + slots, MIB).max(2 * MIB)
}

/// LUKS2 as libcryptsetup writes it by default: 16 MiB of metadata and keyslots before data.
pub const LUKS2_HEADER_AREA: u64 = 16 * MIB;

/// The bytes a LUKS format of `version` with a `key_bytes` volume key overwrites.
pub fn header_area(luks2: bool, key_bytes: u64) -> u64 {
    if luks2 {
        LUKS2_HEADER_AREA
    } else {
        luks1_header_area(key_bytes)
    }
}

fn read_err(device: &Path, offset: u64, e: std::io::Error) -> Error {
    Error::Crypt {
        op: "probe for signatures",
        target: device.display().to_string(),
        detail: format!("reading the device failed at offset {offset}: {e}"),
        kind: Kind::WrongDevice,
    }
}

fn blkid_err(device: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Crypt {
        op: "probe for signatures",
        target: device.display().to_string(),
        detail: format!(
            "libblkid could not {what} (the device's own reads succeeded; libblkid says: {e})"
        ),
        kind: Kind::WrongDevice,
    }
}

/// Probe `device` (read-only) as described in the module documentation.
pub fn probe(device: &Path, expect: Expect) -> Result<Probe, Error> {
    let mut f = File::open(device).map_err(|e| read_err(device, 0, e))?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| read_err(device, 0, e))?;
    // Our own reads first: an I/O error is reported with its offset and the OS error, which
    // libblkid's messages lack.
    let nonzero = first_nonzero(device, &mut f, expect.header_bytes.min(size))?;
    let gpt = backup_gpt(device, &mut f, size)?;
    if let Some(found) = blkid_signatures(device)? {
        return Ok(Probe::Signature(found));
    }
    if let Some(lba) = gpt {
        return Ok(Probe::Signature(format!(
            "a backup GPT header at LBA {lba} (its partitions are recoverable)"
        )));
    }
    if let Some(offset) = nonzero {
        let found = format!(
            "non-zero data at offset {offset} (inside the first {} the format would overwrite)",
            human(expect.header_bytes)
        );
        if !expect.allow_nonzero {
            return Ok(Probe::Signature(found));
        }
        tracing::warn!(
            device = %device.display(),
            offset,
            "allow_nonzero_blank: formatting a device that holds {found}, because [volume] allow_nonzero_blank = true"
        );
    }
    Ok(Probe::Blank)
}

fn human(bytes: u64) -> String {
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// The offset of the first non-zero byte in `[0, len)`, reading 1 MiB at a time.
fn first_nonzero(device: &Path, f: &mut File, len: u64) -> Result<Option<u64>, Error> {
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        read_at(device, f, off, &mut buf[..n])?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

fn read_at(device: &Path, f: &mut File, off: u64, buf: &mut [u8]) -> Result<(), Error> {
    f.seek(SeekFrom::Start(off))
        .and_then(|_| f.read_exact(buf))
        .map_err(|e| read_err(device, off, e))
}

/// The LBA of a backup GPT header (`EFI PART` at the start of the last logical block, for
/// 512- and 4096-byte blocks), if there is one.
fn backup_gpt(device: &Path, f: &mut File, size: u64) -> Result<Option<u64>, Error> {
    for lb in [512u64, 4096] {
        if size < 2 * lb {
            continue;
        }
        let last = size / lb - 1;
        let mut sig = [0u8; 8];
        read_at(device, f, last * lb, &mut sig)?;
        if &sig == b"EFI PART" {
            return Ok(Some(last));
        }
    }
    Ok(None)
}

/// Every signature libblkid finds (superblocks with bad checksums included, partition tables),
/// described with its offset; `None` when there is none.
fn blkid_signatures(device: &Path) -> Result<Option<String>, Error> {
    let mut p = BlkidProbe::new_from_filename(device).map_err(|e| blkid_err(device, "open", e))?;
    p.enable_superblocks(true)
        .and_then(|_| {
            p.set_superblock_flags(BlkidSublksFlags::new(vec![
                BlkidSublks::Type,
                BlkidSublks::Usage,
                BlkidSublks::Magic,
                BlkidSublks::Badcsum,
            ]))
        })
        .and_then(|_| p.enable_partitions(true))
        .map_err(|e| blkid_err(device, "set up the probe", e))?;
    let mut found = Vec::new();
    // wipefs' loop: each do_probe returns the next signature of any chain.
    for _ in 0..64 {
        match p.do_probe() {
            Ok(BlkidProbeRet::Success) => {
                let lookup = |k: &str| p.lookup_value(k).ok().filter(|v| !v.is_empty());
                let at = lookup("SBMAGIC_OFFSET")
                    .or_else(|| lookup("PTMAGIC_OFFSET"))
                    .map(|o| format!(" at offset {o}"))
                    .unwrap_or_default();
                let what = if let Some(t) = lookup("TYPE") {
                    match lookup("USAGE").as_deref() {
                        Some("raid") => format!("{t} RAID member metadata"),
                        Some("crypto") => format!("{t} encryption metadata"),
                        Some("filesystem") => format!("{t} filesystem signature"),
                        _ => format!("{t} signature"),
                    }
                } else if let Some(pt) = lookup("PTTYPE") {
                    format!("{pt} partition table")
                } else {
                    "unnamed signature".into()
                };
                let item = format!("{}{what}{at}", article(&what));
                if !found.contains(&item) {
                    found.push(item);
                }
            }
            Ok(_) => break,
            Err(e) => return Err(blkid_err(device, "probe", e)),
        }
    }
    Ok((!found.is_empty()).then(|| found.join(", ")))
}

/// "a" or "an" for a word as it is read aloud (acronyms by their first letter's name).
fn article(word: &str) -> &'static str {
    let first = word.split([' ', '_', '-']).next().unwrap_or("");
    let c = first.chars().next().unwrap_or('x').to_ascii_lowercase();
    let acronym = first.len() > 1
        && first.starts_with(|c: char| c.is_ascii_uppercase())
        && first
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
    let vowel_sound = if acronym {
        "aefhilmnorsx".contains(c)
    } else {
        "aeio".contains(c) || first.eq_ignore_ascii_case("xfs") || first.starts_with("ext")
    };
    if vowel_sound { "an " } else { "a " }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: Expect = Expect {
        header_bytes: 2 * MIB,
        allow_nonzero: false,
    };

    fn sfdisk_gpt(f: &Path) -> bool {
        std::process::Command::new("sfdisk")
            .arg("-q")
            .arg(f)
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
            .unwrap_or(false)
    }

    #[test]
    fn zeroed_file_is_blank_and_ext4_and_gpt_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.img");
        std::fs::write(&f, vec![0u8; 8 << 20]).unwrap();
        assert_eq!(probe(&f, STRICT).unwrap(), Probe::Blank);

        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&f)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "mkfs.ext4 failed (e2fsprogs is a build dependency)");
        match probe(&f, STRICT).unwrap() {
            Probe::Signature(s) => {
                assert!(
                    s.contains("an ext4 filesystem signature at offset 1080"),
                    "{s}"
                );
                assert!(!s.contains("signature signature"), "{s}");
            }
            Probe::Blank => panic!("ext4 not detected"),
        }

        std::fs::write(&f, vec![0u8; 8 << 20]).unwrap();
        assert!(
            sfdisk_gpt(&f),
            "sfdisk failed (fdisk is a build dependency)"
        );
        match probe(&f, STRICT).unwrap() {
            Probe::Signature(s) => assert!(s.contains("gpt partition table"), "{s}"),
            Probe::Blank => panic!("GPT not detected"),
        }
    }

    #[test]
    fn a_backup_gpt_alone_is_found_at_the_last_lba() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.img");
        std::fs::write(&f, vec![0u8; 8 << 20]).unwrap();
        assert!(
            sfdisk_gpt(&f),
            "sfdisk failed (fdisk is a build dependency)"
        );
        // Wipe the protective MBR and the primary GPT: only the backup at the end is left.
        let mut data = std::fs::read(&f).unwrap();
        data[..MIB as usize].fill(0);
        std::fs::write(&f, &data).unwrap();
        match probe(&f, STRICT).unwrap() {
            Probe::Signature(s) => {
                let last = (8 << 20) / 512 - 1;
                assert!(
                    s.contains(&format!("backup GPT header at LBA {last}")),
                    "{s}"
                )
            }
            Probe::Blank => panic!("backup GPT not detected"),
        }
    }

    /// An md superblock where mdadm puts it at the end of a member: 0.90 (64 KiB aligned, the
    /// last 64 KiB block) and 1.0 (8 KiB before the end, 4 KiB aligned). The magic, version and
    /// (for 1.0) the superblock's own offset are what libblkid checks.
    pub(crate) fn md_superblock(disk: &mut [u8], version: &str) {
        let size = disk.len() as u64;
        let (off, sb) = if version == "0.90" {
            let off = (size & !0xffff) - 0x10000;
            let mut sb = Vec::new();
            for w in [0xa92b_4efcu32, 0, 90, 0] {
                sb.extend_from_slice(&w.to_le_bytes());
            }
            (off, sb)
        } else {
            let sect = ((size / 512) - 16) & !7;
            let mut sb = vec![0u8; 256];
            sb[0..4].copy_from_slice(&0xa92b_4efcu32.to_le_bytes());
            sb[4..8].copy_from_slice(&1u32.to_le_bytes());
            sb[144..152].copy_from_slice(&sect.to_le_bytes());
            (sect * 512, sb)
        };
        disk[off as usize..off as usize + sb.len()].copy_from_slice(&sb);
    }

    #[test]
    fn md_superblocks_at_the_end_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.img");
        for version in ["0.90", "1.0"] {
            let mut data = vec![0u8; 32 << 20];
            md_superblock(&mut data, version);
            std::fs::write(&f, &data).unwrap();
            match probe(&f, STRICT).unwrap() {
                Probe::Signature(s) => {
                    assert!(
                        s.contains("linux_raid_member RAID member metadata at offset"),
                        "{version}: {s}"
                    )
                }
                Probe::Blank => panic!("md {version} superblock at the end not detected"),
            }
        }
    }

    #[test]
    fn non_zero_bytes_in_the_header_area_refuse_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.img");
        let mut data = vec![0u8; 8 << 20];
        data[1_500_000] = 0x5a;
        std::fs::write(&f, &data).unwrap();
        match probe(&f, STRICT).unwrap() {
            Probe::Signature(s) => {
                assert!(s.contains("non-zero data at offset 1500000"), "{s}");
                assert!(s.contains("first 2 MiB"), "{s}");
            }
            Probe::Blank => panic!("non-zero byte not detected"),
        }
        // Outside the area the format overwrites it does not matter.
        let small = Expect {
            header_bytes: MIB,
            allow_nonzero: false,
        };
        assert_eq!(probe(&f, small).unwrap(), Probe::Blank);
        // The operator's override lets it through (and logs it).
        let allowed = Expect {
            allow_nonzero: true,
            ..STRICT
        };
        assert_eq!(probe(&f, allowed).unwrap(), Probe::Blank);
    }

    #[test]
    fn header_areas_follow_libcryptsetup_defaults() {
        assert_eq!(header_area(false, 64), 2 * MIB);
        assert_eq!(header_area(false, 32), 2 * MIB);
        assert_eq!(header_area(false, 128), 4 * MIB);
        assert_eq!(header_area(true, 64), 16 * MIB);
    }

    #[test]
    fn articles_read_naturally() {
        assert_eq!(article("ext4 filesystem signature"), "an ");
        assert_eq!(article("xfs filesystem signature"), "an ");
        assert_eq!(article("btrfs filesystem signature"), "a ");
        assert_eq!(article("LVM2_member signature"), "an ");
        assert_eq!(article("gpt partition table"), "a ");
        assert_eq!(article("linux_raid_member RAID member metadata"), "a ");
        assert_eq!(article("iso9660 filesystem signature"), "an ");
    }

    #[test]
    fn missing_device_is_an_error_not_blank() {
        let e = probe(Path::new("/nonexistent/volcrypt-dev"), STRICT).unwrap_err();
        assert!(
            e.to_string()
                .contains("reading the device failed at offset 0"),
            "{e}"
        );
    }
}
