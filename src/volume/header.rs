//! The LUKS header of the device an attach opens, read once with volcrypt's own engine
//! ([`crate::luks`]) and used twice: its keyslots' KDF memory is what the agent admits into its
//! KDF budget before the attach runs, and the same parsed header is what the engine unlocks the
//! keyslot with. libcryptsetup still loads the header itself for the activation (its context is
//! not `Send` and checks the volume key against the header's digest), so a header changed in
//! between is caught there.

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::VolumeConfig;
use crate::luks::Header;

/// Memory that counts against the budget for a KDF that barely uses any (PBKDF2), so that
/// every attach still holds some of the budget while it runs.
pub const MIN_COST_MIB: u64 = 1;

/// A LUKS header and the device (canonical path) it was read from.
#[derive(Debug, Clone)]
pub struct DeviceHeader {
    pub device: PathBuf,
    pub header: Header,
}

/// Read the LUKS header of `device` (a block device or an image file). `None` when there is no
/// valid LUKS header the engine reads (missing device, blank device, I/O error, a header only
/// libcryptsetup understands): the attach then goes on without it and libcryptsetup decides.
pub fn read(device: &Path) -> Option<DeviceHeader> {
    let device = std::fs::canonicalize(device).ok()?;
    let mut f = std::fs::File::open(&device).ok()?;
    // libcryptsetup reads the header with O_DIRECT; these reads go through the page cache.
    // Drop the device's clean cached pages first so a header just changed by another tool
    // with O_DIRECT (luksAddKey, luksChangeKey) is read from the disk, exactly as
    // libcryptsetup sees it: the engine's "no keyslot matches" must be about the same bytes.
    if let Err(e) = nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    ) {
        tracing::debug!(device = %device.display(), error = %e, "could not drop the cached header pages");
    }
    let size = f.seek(SeekFrom::End(0)).ok()?;
    f.seek(SeekFrom::Start(0)).ok()?;
    match Header::read(&mut f, Some(size)) {
        Ok(header) => Some(DeviceHeader { device, header }),
        Err(e) => {
            tracing::debug!(device = %device.display(), error = %e, "no LUKS header the engine reads");
            None
        }
    }
}

/// The KDF memory (MiB) of unlocking `header`: keyslots are tried one after another, so the
/// peak is the largest keyslot's Argon2 memory (LUKS1 and PBKDF2 keyslots: [`MIN_COST_MIB`]).
pub fn kdf_mib(header: &Header) -> u64 {
    use crate::luks::luks2::json::KdfDesc;
    let Header::Luks2(h) = header else {
        return MIN_COST_MIB;
    };
    let kib = h
        .meta
        .keyslots
        .values()
        .filter_map(|ks| match &ks.kdf {
            Some(KdfDesc::Argon2 { memory, .. }) => Some(u64::from(*memory)),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    kib.div_ceil(1024).max(MIN_COST_MIB)
}

/// The cost (MiB) of an attach when its device has no header to read: a first attach formats
/// with the KDF new keyslots get (`[volume].pbkdf`); without one configured, libcryptsetup's
/// benchmarked default, whose cost is not known in advance: `estimate_mib`.
pub fn format_kdf_mib(config: &VolumeConfig, estimate_mib: u64) -> u64 {
    match &config.pbkdf {
        Some(p) if p.kind == "pbkdf2" => MIN_COST_MIB,
        Some(p) => u64::from(p.memory_kib).div_ceil(1024).max(MIN_COST_MIB),
        None => estimate_mib.max(MIN_COST_MIB),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn cryptsetup_format(path: &Path, args: &[&str]) {
        std::fs::write(path, vec![0u8; 20 * 1024 * 1024]).unwrap();
        let mut child = Command::new("cryptsetup")
            .args(["luksFormat", "--batch-mode", "--key-file", "-"])
            .args(args)
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cryptsetup must be installed (scripts/install-deps.sh)");
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
    }

    /// A real header written by cryptsetup: the Argon2 memory it records is what we read.
    #[test]
    fn reads_argon2_memory_from_a_cryptsetup_luks2_header() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("v2.img");
        cryptsetup_format(
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
        );
        let h = read(&img).expect("cryptsetup's LUKS2 header reads");
        assert_eq!(h.device, std::fs::canonicalize(&img).unwrap());
        assert_eq!(kdf_mib(&h.header), 64);

        let v1 = dir.path().join("v1.img");
        cryptsetup_format(
            &v1,
            &["--type", "luks1", "--pbkdf-force-iterations", "1000"],
        );
        assert_eq!(kdf_mib(&read(&v1).unwrap().header), MIN_COST_MIB);
    }

    #[test]
    fn no_header_means_the_format_kdf_then_the_estimate() {
        let dir = tempfile::tempdir().unwrap();
        let blank = dir.path().join("blank");
        std::fs::write(&blank, vec![0u8; 8192]).unwrap();
        assert!(read(&blank).is_none());
        assert!(read(&dir.path().join("missing")).is_none());
        let mut cfg = VolumeConfig::default();
        assert_eq!(format_kdf_mib(&cfg, 777), 777);
        cfg.pbkdf = Some(crate::volume::PbkdfConfig {
            kind: "argon2id".into(),
            iterations: 4,
            memory_kib: 262_144,
        });
        assert_eq!(format_kdf_mib(&cfg, 777), 256);
        cfg.pbkdf = Some(crate::volume::PbkdfConfig {
            kind: "pbkdf2".into(),
            iterations: 1000,
            memory_kib: 0,
        });
        assert_eq!(format_kdf_mib(&cfg, 777), MIN_COST_MIB);
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
        assert!(read(&f).is_none());
    }
}
