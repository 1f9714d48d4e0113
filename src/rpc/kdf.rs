//! How much memory an attach's KDF will take, read before unlocking so the KDF budget can
//! admit or queue it.
//!
//! The attach engine does not report the KDF cost, so this reads the LUKS header itself: the
//! LUKS2 JSON area lists every keyslot's KDF (Argon2 `memory` in KiB); opening tries keyslots one
//! after another, so the peak is the largest. LUKS1 keyslots are PBKDF2 (negligible memory).
//! When there is no readable header (device missing, blank device about to be formatted, I/O
//! error) the cost is the configured KDF of new keyslots, else the configured estimate.
//! The read is two small reads (4 KiB binary header, the JSON area of at most 4 MiB).

use std::io::Read;
use std::path::Path;

use crate::volume::VolumeConfig;

/// Memory that counts against the budget for a KDF that barely uses any (PBKDF2), so that
/// every attach still holds some of the budget while it runs.
pub const MIN_COST_MIB: u64 = 1;

/// LUKS2 puts the JSON area right after the 4 KiB binary header; the whole header is at most
/// 4 MiB (LUKS2 allows 16 KiB … 4 MiB).
const LUKS2_BIN_HDR: u64 = 4096;
const LUKS2_MAX_HDR: u64 = 4 * 1024 * 1024;

/// What the header says about the KDF memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderKdf {
    /// Largest keyslot KDF memory, MiB (rounded up; `MIN_COST_MIB` for PBKDF2-only headers).
    Luks { mib: u64 },
    /// No LUKS header (or unreadable): the caller uses its estimate.
    Unknown,
}

/// Read the KDF memory of the LUKS header on `device` (a block device or an image file).
pub fn header_kdf(device: &Path) -> HeaderKdf {
    read_header_kdf(device).unwrap_or(HeaderKdf::Unknown)
}

fn read_header_kdf(device: &Path) -> Option<HeaderKdf> {
    let mut f = std::fs::File::open(device).ok()?;
    let mut bin = [0u8; 16];
    f.read_exact(&mut bin).ok()?;
    if bin[..6] != *b"LUKS\xba\xbe" {
        return None;
    }
    let version = u16::from_be_bytes([bin[6], bin[7]]);
    if version == 1 {
        return Some(HeaderKdf::Luks { mib: MIN_COST_MIB });
    }
    if version != 2 {
        return None;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&bin[8..16]);
    let hdr_size = u64::from_be_bytes(size);
    if !(LUKS2_BIN_HDR * 4..=LUKS2_MAX_HDR).contains(&hdr_size) {
        return None;
    }
    let mut skip = vec![0u8; (LUKS2_BIN_HDR - 16) as usize];
    f.read_exact(&mut skip).ok()?;
    let mut json = Vec::new();
    f.take(hdr_size - LUKS2_BIN_HDR)
        .read_to_end(&mut json)
        .ok()?;
    let end = json.iter().position(|&b| b == 0).unwrap_or(json.len());
    let v: serde_json::Value = serde_json::from_slice(&json[..end]).ok()?;
    let slots = v.get("keyslots")?.as_object()?;
    let kib = slots
        .values()
        .filter_map(|s| s.get("kdf")?.get("memory")?.as_u64())
        .max()
        .unwrap_or(0);
    Some(HeaderKdf::Luks {
        mib: kib.div_ceil(1024).max(MIN_COST_MIB),
    })
}

/// The cost (MiB) of an attach of `device`: its header's, else the KDF new keyslots get
/// (`[volume].pbkdf`), else `estimate_mib`.
pub fn attach_cost_mib(device: &Path, volume: &VolumeConfig, estimate_mib: u64) -> u64 {
    match header_kdf(device) {
        HeaderKdf::Luks { mib } => mib,
        HeaderKdf::Unknown => match &volume.pbkdf {
            Some(p) if p.kind == "pbkdf2" => MIN_COST_MIB,
            Some(p) => u64::from(p.memory_kib).div_ceil(1024).max(MIN_COST_MIB),
            None => estimate_mib.max(MIN_COST_MIB),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn cryptsetup_format(path: &Path, args: &[&str]) -> bool {
        std::fs::write(path, vec![0u8; 20 * 1024 * 1024]).unwrap();
        let mut cmd = Command::new("cryptsetup");
        cmd.args(["luksFormat", "--batch-mode", "--key-file", "-"])
            .args(args)
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let Ok(mut child) = cmd.spawn() else {
            return false;
        };
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"passphrase").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cryptsetup luksFormat {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        true
    }

    /// A real header written by cryptsetup: the Argon2 memory it records is what we read.
    #[test]
    fn reads_argon2_memory_from_a_cryptsetup_luks2_header() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("v2.img");
        if !cryptsetup_format(
            &img,
            &[
                "--type",
                "luks2",
                "--pbkdf",
                "argon2id",
                "--pbkdf-memory",
                "65536",
                "--pbkdf-force-iterations",
                "4",
            ],
        ) {
            eprintln!("skipped: cryptsetup not installed");
            return;
        }
        assert_eq!(header_kdf(&img), HeaderKdf::Luks { mib: 64 });
        let cfg = VolumeConfig::default();
        assert_eq!(attach_cost_mib(&img, &cfg, 1024), 64);

        let v1 = dir.path().join("v1.img");
        cryptsetup_format(
            &v1,
            &["--type", "luks1", "--pbkdf-force-iterations", "1000"],
        );
        assert_eq!(header_kdf(&v1), HeaderKdf::Luks { mib: MIN_COST_MIB });
    }

    #[test]
    fn no_header_falls_back_to_new_keyslot_kdf_then_estimate() {
        let dir = tempfile::tempdir().unwrap();
        let blank = dir.path().join("blank");
        std::fs::write(&blank, vec![0u8; 8192]).unwrap();
        assert_eq!(header_kdf(&blank), HeaderKdf::Unknown);
        assert_eq!(header_kdf(&dir.path().join("missing")), HeaderKdf::Unknown);
        let mut cfg = VolumeConfig::default();
        assert_eq!(attach_cost_mib(&blank, &cfg, 777), 777);
        cfg.pbkdf = Some(crate::volume::PbkdfConfig {
            kind: "argon2id".into(),
            iterations: 4,
            memory_kib: 262_144,
        });
        assert_eq!(attach_cost_mib(&blank, &cfg, 777), 256);
        cfg.pbkdf = Some(crate::volume::PbkdfConfig {
            kind: "pbkdf2".into(),
            iterations: 1000,
            memory_kib: 0,
        });
        assert_eq!(attach_cost_mib(&blank, &cfg, 777), MIN_COST_MIB);
    }

    #[test]
    fn corrupt_luks2_header_sizes_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad");
        let mut h = vec![0u8; 8192];
        h[..6].copy_from_slice(b"LUKS\xba\xbe");
        h[7] = 2;
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        std::fs::write(&f, &h).unwrap();
        assert_eq!(header_kdf(&f), HeaderKdf::Unknown);
    }
}
