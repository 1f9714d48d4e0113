//! "Never format a device that holds data", null ciphers and strict requests, proved against a
//! real kernel through the command line (exit codes and messages are what operators see).
//!
//! Every refusal is checked the same way: the exact exit code, the class of the message, the
//! device byte-identical (sha256 before and after), no mapping, no journal record. Natively
//! (no device-mapper) the tests are *ignored*; the VM stage (tests/vm/attach-suite.sh) runs
//! them with `--include-ignored`, and there a missing prerequisite fails them.
#![cfg(feature = "system")]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use volcrypt::keys::{Keystore, Secret};
use volcrypt::secret::{SecretBytes, SecretType};

use common::{need, sh, sh_in};

const BIN: &str = env!("CARGO_BIN_EXE_volcrypt");
const MIB: u64 = 1 << 20;

/// A loop device over a sparse file, a keystore holding `k1`, a config and state dirs; torn
/// down on drop (mapping first).
struct Dev {
    dir: tempfile::TempDir,
    loopdev: PathBuf,
    name: String,
    tag: String,
}

impl Dev {
    fn new(tag: &str, mib: u64) -> Dev {
        let (dir, _, loopdev) = common::loopdev::backing(mib * MIB);
        let ks = Keystore::create(dir.path().join("keys")).unwrap();
        ks.put(
            "k1",
            &Secret::new(SecretType::Symmetric, SecretBytes::new(vec![0x42; 32])),
        )
        .unwrap();
        let name = format!("crypt-{}", loopdev.file_name().unwrap().to_string_lossy());
        let d = Dev {
            dir,
            loopdev,
            name,
            tag: tag.to_owned(),
        };
        d.config("");
        d
    }

    fn volume_id(&self) -> String {
        format!("vol-safety-{}", self.tag)
    }

    /// Write the config, with `extra` lines in `[volume]`.
    fn config(&self, extra: &str) {
        let p = self.dir.path();
        std::fs::write(
            p.join("volcrypt.toml"),
            format!(
                "[key_manager]\nbackend = \"keystore\"\n[key_manager.keystore]\ndir = \"{}\"\ncreate = false\n\
                 [volume]\nstate_dir = \"{}\"\nby_id_dir = \"{}\"\n{extra}\n\
                 [volume.pbkdf]\nkind = \"pbkdf2\"\niterations = 1000\n",
                p.join("keys").display(),
                p.join("state").display(),
                p.join("by-id").display()
            ),
        )
        .unwrap();
    }

    /// A request for this device: `encryption` and `options` are JSON object bodies.
    fn request(&self, encryption: &str, options: &str) -> String {
        format!(
            r#"{{"volume_id": "{}", "device_path": "{}", "encryption": {{{encryption}}}, "options": {{{options}}}}}"#,
            self.volume_id(),
            self.loopdev.display()
        )
    }

    fn luks2(&self) -> String {
        self.request(
            r#""provider": "luks2", "control_location": "front-end", "encryption_key_id": "k1""#,
            "",
        )
    }

    fn attach(&self, request: &str) -> Output {
        sh_in(
            &format!(
                "{BIN} attach --config {} --request -",
                self.dir.path().join("volcrypt.toml").display()
            ),
            request.as_bytes(),
        )
    }

    fn detach(&self) -> Output {
        Command::new(BIN)
            .args(["detach", &self.volume_id(), "--config"])
            .arg(self.dir.path().join("volcrypt.toml"))
            .output()
            .unwrap()
    }

    fn sha256(&self) -> String {
        sh(&format!("sha256sum {}", self.loopdev.display()))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    }

    fn write_at(&self, offset: u64, data: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.loopdev)
            .unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }

    fn size(&self) -> u64 {
        sh(&format!("blockdev --getsize64 {}", self.loopdev.display()))
            .trim()
            .parse()
            .unwrap()
    }

    /// Attach with `request`, expect exit `code` with `message` on stderr, and nothing changed.
    fn refused(&self, request: &str, code: i32, message: &str) -> String {
        let before = self.sha256();
        let o = self.attach(request);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(code), "{err}");
        assert!(err.contains(message), "expected {message:?} in: {err}");
        assert!(
            o.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert_eq!(self.sha256(), before, "device content changed");
        self.assert_nothing_left();
        err
    }

    /// No mapping, no journal record, no stable link.
    fn assert_nothing_left(&self) {
        assert!(
            !need::mapping_active(&self.name),
            "mapping {} left",
            self.name
        );
        // Records are `<volume_id>.json`; the engine's lock file (`.lock`) is not one.
        let state = self.dir.path().join("state");
        let records = std::fs::read_dir(&state)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(records, 0, "journal records left in {}", state.display());
        let links = std::fs::read_dir(self.dir.path().join("by-id"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(links, 0, "stable links left");
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        common::loopdev::teardown(&self.name, &self.loopdev);
    }
}

/// A GPT made by sfdisk, then the first MiB (protective MBR, primary header and table) zeroed:
/// only the backup GPT at the last LBA is left, and it is found there.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn safety_a_device_with_only_a_backup_gpt_is_refused() {
    need::require_dm_crypt();
    let d = Dev::new("bgpt", 32);
    let o = sh_in(
        &format!("sfdisk -q {}", d.loopdev.display()),
        b"label: gpt\n,8M\n,8M\n",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    d.write_at(0, &vec![0u8; MIB as usize]);
    // What the kernel's and libblkid's default probes see: nothing at the start.
    assert!(
        sh(&format!("blkid -p {} || true", d.loopdev.display()))
            .trim()
            .is_empty(),
        "blkid still sees a signature at the start"
    );
    let last = d.size() / 512 - 1;
    d.refused(
        &d.luks2(),
        1,
        &format!("it is not LUKS but holds a backup GPT header at LBA {last}"),
    );
}

/// A single non-zero byte inside the 16 MiB a LUKS2 format overwrites refuses it, naming the
/// offset; outside the 2 MiB of a LUKS1 format it does not matter to LUKS1. The operator's
/// `allow_nonzero_blank` formats it anyway, with the warning in the log.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn safety_non_zero_bytes_in_the_header_area_refuse_the_format_unless_the_operator_allows_them() {
    need::require_dm_crypt();
    let d = Dev::new("nz", 32);
    d.write_at(3 * MIB + 17, b"\x01");
    d.refused(
        &d.luks2(),
        1,
        &format!(
            "holds non-zero data at offset {} (inside the first 16 MiB the format would overwrite)",
            3 * MIB + 17
        ),
    );
    // LUKS1 writes 2 MiB: the byte at 3 MiB is not in its way.
    let luks1 = d.request(
        r#""provider": "luks", "control_location": "front-end", "encryption_key_id": "k1""#,
        "",
    );
    let o = d.attach(&luks1);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.detach().status.success());
    // A fresh device with a byte inside the LUKS1 area: refused; allowed by the operator.
    let d = Dev::new("nz1", 32);
    d.write_at(MIB + 5, b"\xff");
    d.refused(
        &luks1_of(&d),
        1,
        &format!("non-zero data at offset {}", MIB + 5),
    );
    d.config("allow_nonzero_blank = true");
    let o = d.attach(&luks1_of(&d));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("allow_nonzero_blank") && err.contains(&format!("offset {}", MIB + 5)),
        "the override must be logged: {err}"
    );
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out["formatted"], true, "{out}");
    assert!(d.detach().status.success());
}

fn luks1_of(d: &Dev) -> String {
    d.request(
        r#""provider": "luks", "control_location": "front-end", "encryption_key_id": "k1""#,
        "",
    )
}

/// md RAID member metadata at the end of the device (0.90 and 1.0 keep it there), found by
/// libblkid (wipefs agrees).
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn safety_md_metadata_at_the_end_is_refused() {
    need::require_dm_crypt();
    for (tag, version) in [("md090", "0.90"), ("md10", "1.0")] {
        let d = Dev::new(tag, 32);
        let size = d.size();
        let (off, sb) = md_superblock(size, version);
        d.write_at(off, &sb);
        let wipefs = sh(&format!("wipefs --noheadings {}", d.loopdev.display()));
        assert!(wipefs.contains("linux_raid_member"), "{wipefs}");
        d.refused(
            &d.luks2(),
            1,
            &format!("holds a linux_raid_member RAID member metadata at offset {off}"),
        );
    }
}

/// mdadm's superblock placement and the fields libblkid checks (magic, version, and for 1.0
/// the superblock's own sector).
fn md_superblock(size: u64, version: &str) -> (u64, Vec<u8>) {
    if version == "0.90" {
        let mut sb = Vec::new();
        for w in [0xa92b_4efcu32, 0, 90, 0] {
            sb.extend_from_slice(&w.to_le_bytes());
        }
        ((size & !0xffff) - 0x10000, sb)
    } else {
        let sect = ((size / 512) - 16) & !7;
        let mut sb = vec![0u8; 256];
        sb[0..4].copy_from_slice(&0xa92b_4efcu32.to_le_bytes());
        sb[4..8].copy_from_slice(&1u32.to_le_bytes());
        sb[144..152].copy_from_slice(&sect.to_le_bytes());
        (sect * 512, sb)
    }
}

/// cipher_null in any form is refused as no encryption; ECB and 64-bit-block ciphers never
/// format a blank device; key sizes the mode does not take are refused up front (never the
/// kernel's "Input/output error").
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn safety_null_and_weak_ciphers_and_bad_key_sizes_are_refused_before_anything_is_written() {
    need::require_dm_crypt();
    let d = Dev::new("ciph", 32);
    let enc = |provider: &str, cipher: &str, key_size: u32| {
        d.request(
            &format!(
                r#""provider": "{provider}", "control_location": "front-end", "cipher": "{cipher}", "key_size": {key_size}, "encryption_key_id": "k1""#
            ),
            "",
        )
    };
    for provider in ["luks", "luks2", "plain"] {
        for cipher in ["cipher_null-ecb", "cipher_null-cbc-plain"] {
            d.refused(
                &enc(provider, cipher, 256),
                1,
                "does no encryption (cipher_null stores the data in clear)",
            );
        }
    }
    for (cipher, why) in [
        ("aes-ecb", "uses ECB"),
        ("des3_ede-cbc-essiv:sha256", "64-bit block"),
        ("blowfish-cbc-plain", "64-bit block"),
    ] {
        d.refused(
            &enc("luks2", cipher, 192),
            1,
            &format!(
                "refusing to format a new volume with this cipher: {}",
                cipher.split('-').next().unwrap()
            ),
        );
        let err = d.refused(&enc("luks", cipher, 192), 1, why);
        assert!(!err.contains("Input/output error"), "{err}");
    }
    for (cipher, bits, accepted) in [
        ("aes-xts-plain64", 128, "accepted: 256, 512"),
        ("aes-xts-plain64", 1024, "accepted: 256, 512"),
        ("aes-cbc-essiv:sha256", 512, "accepted: 128, 192, 256"),
        ("twofish-xts-plain64", 384, "accepted: 256, 512"),
    ] {
        let err = d.refused(&enc("luks2", cipher, bits), 1, accepted);
        assert!(err.contains("encryption.key_size"), "{err}");
    }
}

/// An existing LUKS header whose cipher is cipher_null is not an encrypted volume: refused,
/// never opened, never formatted over.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn safety_an_existing_cipher_null_header_is_refused_as_not_encrypted() {
    need::require_dm_crypt();
    let d = Dev::new("nullhdr", 32);
    let o = sh_in(
        &format!(
            "cryptsetup --batch-mode luksFormat --type luks1 --pbkdf-force-iterations 1000 \
             --key-file=- {}",
            d.loopdev.display()
        ),
        &[0x42; 32],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The header's cipher fields (LUKS1: name at 8, mode at 40, 32 bytes each, no checksum
    // over them) say cipher_null-ecb, as `cryptsetup luksFormat --cipher cipher_null-ecb`
    // writes them.
    d.write_at(8, &pad32(b"cipher_null"));
    d.write_at(40, &pad32(b"ecb"));
    let dump = sh(&format!("cryptsetup luksDump {}", d.loopdev.display()));
    assert!(dump.contains("cipher_null"), "{dump}");
    let luks1 = luks1_of(&d);
    d.refused(
        &luks1,
        1,
        "not an encrypted volume: its LUKS header's cipher",
    );
}

fn pad32(s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    v.resize(32, 0);
    v
}

/// Misspelt fields at every level: exit 1, the unknown field and its closest known one named,
/// nothing written (the device is blank, so a silently accepted request would format it).
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn safety_misspelt_fields_at_every_level_are_refused_naming_the_closest_field() {
    need::require_dm_crypt();
    let d = Dev::new("typo", 32);
    let enc = r#""provider": "luks2", "control_location": "front-end", "encryption_key_id": "k1""#;
    let cases = [
        (
            d.request(&format!(r#"{enc}, "cypher": "aes-cbc-essiv:sha256""#), ""),
            r#"unknown field "cypher" in encryption (did you mean "cipher"?)"#,
        ),
        (
            d.request(&format!(r#"{enc}, "keysize": 512"#), ""),
            r#"unknown field "keysize" in encryption (did you mean "key_size"?)"#,
        ),
        (
            d.request(enc, r#""sector_sise": 4096"#),
            r#"unknown field "sector_sise" in options (did you mean "sector_size"?)"#,
        ),
        (
            d.luks2()
                .replacen("\"volume_id\"", "\"volume_idd\": \"x\", \"volume_id\"", 1),
            r#"unknown field "volume_idd" in the request (did you mean "volume_id"?)"#,
        ),
    ];
    for (request, message) in cases {
        d.refused(&request, 1, message);
    }
}

/// A device in use (held open exclusively by another process) is refused as busy: exit 5.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn safety_a_device_in_use_is_refused_as_busy() {
    need::require_dm_crypt();
    let d = Dev::new("busy", 32);
    // A linear mapping over the device holds it (a holder in sysfs), as LVM or md would.
    let sectors = d.size() / 512;
    let holder = format!("vc-safety-holder-{}", std::process::id());
    sh(&format!(
        "dmsetup create {holder} --table '0 {sectors} linear {} 0'",
        d.loopdev.display()
    ));
    let err = d.refused(&d.luks2(), 5, "it is in use (held by dm-");
    assert!(!err.contains("holders"), "{err}");
    sh(&format!("dmsetup remove --retry {holder}"));
}

/// Reading the device fails (a dm `error` target over the part the probe reads): the
/// message names the offset and the OS error, not libblkid's "conversion was unsuccessful".
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn safety_read_errors_while_probing_name_the_offset_and_the_os_error() {
    need::require_dm_crypt();
    let d = Dev::new("ioerr", 32);
    let sectors = d.size() / 512;
    let name = format!("vc-safety-ioerr-{}", std::process::id());
    // The head: errors at 8 MiB, inside the 16 MiB a LUKS2 format overwrites and past the
    // 4 MiB libcryptsetup reads looking for a LUKS2 header. The tail: the last MiB errors, so
    // the read of the last sector (backup GPT) fails.
    for (tag, table, offset) in [
        (
            "head",
            format!(
                "0 16384 linear {dev} 0\n16384 2048 error\n18432 {} linear {dev} 18432",
                sectors - 18432,
                dev = d.loopdev.display()
            ),
            8 * MIB,
        ),
        (
            "tail",
            format!(
                "0 {} linear {dev} 0\n{} 2048 error",
                sectors - 2048,
                sectors - 2048,
                dev = d.loopdev.display()
            ),
            (sectors - 1) * 512,
        ),
    ] {
        let dm = format!("{name}-{tag}");
        let o = sh_in(&format!("dmsetup create {dm}"), table.as_bytes());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // Named through a link of its own, as a by-path link names a disk (a /dev/mapper
        // path would be taken for an existing mapping to adopt).
        let node = std::fs::canonicalize(Path::new("/dev/mapper").join(&dm)).unwrap();
        let link = d.dir.path().join(format!("vc-ioerr-{tag}-lun-1"));
        std::os::unix::fs::symlink(&node, &link).unwrap();
        let request = d.luks2().replace(
            &d.loopdev.display().to_string(),
            &link.display().to_string(),
        );
        let o = d.attach(&request);
        assert!(
            !need::mapping_active(&format!("crypt-vc-ioerr-{tag}-lun-1")),
            "{tag}: a mapping was made"
        );
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let _ = Command::new("dmsetup")
            .args(["remove", "--retry", &dm])
            .output();
        assert_eq!(o.status.code(), Some(4), "{tag}: {err}");
        assert!(
            err.contains("reading the device failed at offset")
                && err.contains("Input/output error"),
            "{tag}: {err}"
        );
        assert!(
            err.contains(&format!("reading the device failed at offset {offset}:")),
            "{tag}: {err}"
        );
        assert!(!err.contains("conversion was unsuccessful"), "{err}");
        d.assert_nothing_left();
    }
}

/// A cipher on the allow-list whose module the kernel has not loaded (the VM loads aes and
/// serpent, not twofish, and cannot autoload modules): refused before anything is written,
/// naming the kernel algorithm, not "Input/output error".
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn safety_a_cipher_the_kernel_lacks_is_named() {
    need::require_dm_crypt();
    assert!(
        !std::fs::read_to_string("/proc/crypto")
            .unwrap()
            .contains("twofish"),
        "this test needs a kernel without twofish loaded"
    );
    let d = Dev::new("nokc", 32);
    let request = d.request(
        r#""provider": "luks2", "control_location": "front-end", "cipher": "twofish-xts-plain64", "key_size": 512, "encryption_key_id": "k1""#,
        "",
    );
    let err = d.refused(&request, 1, "the kernel crypto API has no xts(twofish)");
    assert!(!err.contains("Input/output error"), "{err}");
}
