//! Attach/detach/extend/status against a real kernel: dm-crypt, loop devices, libcryptsetup.
//!
//! These need root and dm-crypt. Natively (the build hosts have no device-mapper) every test is
//! reported *ignored*; the VM stage (tests/vm/attach-suite.sh: tests/vm/run.sh loads dm_crypt and
//! sets VOLCRYPT_VM=1, tests/vm/guest-attach.sh runs them with `--include-ignored`) runs them
//! for real, and there a missing prerequisite fails the test. Every key-manager test runs with
//! the keystore and with the real Barbican, which the VM stage forwards into the guest.
#![cfg(feature = "system")]

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use volcrypt::config::Config;
use volcrypt::error::ExitStatus;
use volcrypt::keys::{KeyManager, Keystore, Secret};
use volcrypt::request::AttachRequest;
use volcrypt::secret::{SecretBytes, SecretType};
use volcrypt::volume::{self, Context, PbkdfConfig, VolumeConfig};

use common::{barbican, hex, need, pattern, sh, sh_in};

/// The secrets the tests use: one of each type Cinder, castellan and users create.
fn secrets() -> Vec<(&'static str, SecretType, Vec<u8>)> {
    vec![
        ("sym-1", SecretType::Symmetric, (0u8..32).collect()),
        ("sym-2", SecretType::Symmetric, vec![0x07; 32]),
        (
            "pass-1",
            SecretType::Passphrase,
            b"correct horse\n".to_vec(),
        ),
        ("opaque-1", SecretType::Opaque, vec![0xa5, 0x00, 0x5a, 0xff]),
    ]
}

/// A key manager holding [`secrets`], and the ids it gave them.
struct Keys {
    km: Box<dyn KeyManager>,
    ids: HashMap<String, String>,
    _dir: Option<tempfile::TempDir>,
}

impl Keys {
    /// The real id of a logical test secret (`sym-1` → a Barbican UUID, say).
    fn id(&self, logical: &str) -> String {
        self.ids
            .get(logical)
            .cloned()
            .unwrap_or_else(|| logical.to_owned())
    }
}

/// The local keystore (the embedded default), filled through its public API.
fn keys() -> Keys {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let ks = Keystore::create(dir.path().join("keys")).unwrap();
    let mut ids = HashMap::new();
    for (id, t, payload) in secrets() {
        ks.put(id, &Secret::new(t, SecretBytes::new(payload)))
            .unwrap();
        ids.insert(id.to_owned(), id.to_owned());
    }
    Keys {
        km: Box::new(ks),
        ids,
        _dir: Some(dir),
    }
}

/// The real Barbican (VOLCRYPT_TEST_BARBICAN_URL, reached from the VM through the harness's
/// forward), with the secrets created the way Cinder and users do; fails the test when it is
/// not configured or does not answer.
fn barbican_keys() -> Keys {
    let url = barbican::require_url();
    let cfg = Config::from_toml(&barbican::key_manager_toml(&url), "<test>").unwrap();
    let km = volcrypt::keys::from_config(&cfg.key_manager).unwrap();
    let mut ids = HashMap::new();
    for (name, t, payload) in secrets() {
        ids.insert(
            name.to_owned(),
            barbican::create_secret(&url, t.as_str(), &payload),
        );
    }
    Keys {
        km,
        ids,
        _dir: None,
    }
}

/// Both key managers: the local keystore and the real Barbican (required).
fn backends() -> Vec<(&'static str, Keys)> {
    vec![("keystore", keys()), ("barbican", barbican_keys())]
}

/// A loop device over a file in a private directory, with a by-path style link to it, a state
/// dir and a by-id dir. Everything is torn down on drop (mapping first).
struct Vol {
    dir: tempfile::TempDir,
    file: PathBuf,
    loopdev: PathBuf,
    link: PathBuf,
    name: String,
}

impl Vol {
    fn new(tag: &str, mib: u64) -> Vol {
        let (dir, file, loopdev) = common::loopdev::backing(mib << 20);
        let bypath = dir.path().join("by-path");
        std::fs::create_dir_all(&bypath).unwrap();
        let link = bypath.join(format!("vc-{tag}-lun-1"));
        std::os::unix::fs::symlink(&loopdev, &link).unwrap();
        Vol {
            name: format!("crypt-vc-{tag}-lun-1"),
            dir,
            file,
            loopdev,
            link,
        }
    }

    fn ctx<'a>(&self, keys: &'a Keys) -> Context<'a> {
        Context::new(
            keys.km.as_ref(),
            VolumeConfig {
                state_dir: self.dir.path().join("state"),
                by_id_dir: self.dir.path().join("by-id"),
                detach_timeout_ms: 1500,
                pbkdf: Some(PbkdfConfig {
                    kind: "pbkdf2".into(),
                    iterations: 1000,
                    memory_kib: 0,
                }),
                ..VolumeConfig::default()
            },
        )
    }

    fn request(
        &self,
        provider: &str,
        key_id: &str,
        extra_enc: &str,
        options: &str,
    ) -> AttachRequest {
        let json = format!(
            r#"{{"volume_id": "vol-{name}", "device_path": "{link}",
                "encryption": {{"provider": "{provider}", "control_location": "front-end",
                                "encryption_key_id": "{key_id}"{extra_enc}}},
                "options": {{{options}}}}}"#,
            name = self.name,
            link = self.link.display()
        );
        AttachRequest::from_json(json.as_bytes()).unwrap()
    }

    fn volume_id(&self) -> String {
        format!("vol-{}", self.name)
    }

    fn mapper(&self) -> PathBuf {
        PathBuf::from("/dev/mapper").join(&self.name)
    }

    fn active(&self) -> bool {
        need::mapping_active(&self.name)
    }

    fn stable_link(&self) -> PathBuf {
        self.dir
            .path()
            .join("by-id")
            .join(format!("volcrypt-{}", self.volume_id()))
    }

    fn state_file(&self) -> PathBuf {
        self.dir
            .path()
            .join("state")
            .join(format!("{}.json", self.volume_id()))
    }

    /// Nothing of an attach is left: no mapping, no stable link, no record, link untouched.
    fn assert_nothing_left(&self) {
        assert!(!self.active(), "mapping {} left behind", self.name);
        assert!(
            std::fs::symlink_metadata(self.stable_link()).is_err(),
            "stable link left behind"
        );
        assert!(!self.state_file().exists(), "state record left behind");
        assert_eq!(
            std::fs::read_link(&self.link).unwrap(),
            self.loopdev,
            "device link changed"
        );
    }
}

impl Drop for Vol {
    fn drop(&mut self) {
        common::loopdev::teardown(&self.name, &self.loopdev);
    }
}

fn write_at(dev: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_at(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn sha256_of(path: &Path) -> String {
    sh(&format!("sha256sum {}", path.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The dm key cryptsetup derives in plain mode: RIPEMD160(p) ‖ RIPEMD160("A" ‖ p) ‖ …,
/// truncated to the key size.
fn plain_key(passphrase: &[u8], key_bytes: usize) -> Vec<u8> {
    use ripemd::{Digest, Ripemd160};
    let mut out = Vec::new();
    let mut prefix = Vec::new();
    while out.len() < key_bytes {
        let mut h = Ripemd160::new();
        h.update(&prefix);
        h.update(passphrase);
        out.extend_from_slice(&h.finalize());
        prefix.push(b'A');
    }
    out.truncate(key_bytes);
    out
}

/// First attach formats (LUKS) or creates (plain), data goes through the mapping, detach, and
/// a second attach of the same volume opens the existing header and reads the data back.
fn round_trip(provider: &str, logical_key: &str, tag: &str, expect_luks: Option<&str>) {
    for (backend, k) in backends() {
        round_trip_with(
            &k,
            provider,
            logical_key,
            &format!("{tag}{}", &backend[..1]),
            expect_luks,
        );
    }
}

fn round_trip_with(
    k: &Keys,
    provider: &str,
    logical_key: &str,
    tag: &str,
    expect_luks: Option<&str>,
) {
    let v = Vol::new(tag, 32);
    let ctx = v.ctx(k);
    let key_id = k.id(logical_key);
    let key_id = key_id.as_str();
    let req = v.request(
        provider,
        key_id,
        r#", "cipher": "aes-xts-plain64", "key_size": 256"#,
        "",
    );
    let out = volume::attach(&ctx, &req).unwrap();
    assert!(out.encrypted());
    assert_eq!(out.mapping_name.as_deref(), Some(v.name.as_str()));
    assert_eq!(out.formatted(), expect_luks.is_some(), "{out:?}");
    assert_eq!(out.device, v.mapper());
    assert_eq!(
        std::fs::read_link(&v.link).unwrap(),
        v.mapper(),
        "device_path not replaced"
    );
    assert_eq!(std::fs::read_link(v.stable_link()).unwrap(), v.mapper());
    let derivation = if logical_key.starts_with("pass") {
        "raw"
    } else {
        "lowercase-hex"
    };
    assert_eq!(out.derivation.as_deref(), Some(derivation));

    if let Some(version) = expect_luks {
        let dump = sh(&format!("cryptsetup luksDump {}", v.loopdev.display()));
        assert!(
            dump.contains(&format!("Version:       \t{version}"))
                || dump.contains(&format!("Version:        {version}"))
                || dump.contains(&format!("Version:\t{version}")),
            "{dump}"
        );
        // aes-xts-plain64 + 256 bits is passed through: AES-128-XTS, 256-bit volume key.
        assert!(
            dump.contains("256 bits") || dump.contains("MK bits:       \t256"),
            "{dump}"
        );
        // The same passphrase opens it with cryptsetup itself.
        let p = k.km.get(key_id).unwrap().passphrase();
        let o = sh_in(
            &format!(
                "cryptsetup open --test-passphrase --key-file=- {}",
                v.loopdev.display()
            ),
            p.expose(),
        );
        assert!(
            o.status.success(),
            "cryptsetup rejects the passphrase: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    let data = pattern(tag.len() as u8, 1 << 20);
    write_at(&v.mapper(), 4096, &data);
    let st = volume::status(&ctx).unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].key_id, key_id);
    assert_eq!(st[0].derivation, derivation);
    assert!(st[0].active && !st[0].stale);
    assert_eq!(st[0].cipher.as_deref(), Some("aes-xts-plain64"));
    assert_eq!(st[0].key_bits, Some(256));

    let d = volume::detach(&ctx, &v.volume_id(), None).unwrap();
    assert!(d.was_active);
    assert!(!v.active());
    assert_eq!(
        std::fs::read_link(&v.link).unwrap(),
        v.loopdev,
        "device_path not restored"
    );
    assert!(std::fs::symlink_metadata(v.stable_link()).is_err());

    let out = volume::attach(&ctx, &req).unwrap();
    assert!(!out.formatted());
    assert_eq!(
        read_at(&v.mapper(), 4096, data.len()),
        data,
        "data did not survive re-attach"
    );
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn luks1_with_symmetric_key_formats_then_reopens() {
    need::require_dm_crypt();
    round_trip("luks", "sym-1", "l1sym", Some("1"));
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn luks1_with_passphrase_secret_formats_then_reopens() {
    need::require_dm_crypt();
    round_trip(
        "nova.volume.encryptors.luks.LuksEncryptor",
        "pass-1",
        "l1pass",
        Some("1"),
    );
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn luks2_with_symmetric_key_formats_then_reopens() {
    need::require_dm_crypt();
    round_trip("luks2", "sym-2", "l2sym", Some("2"));
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn luks2_with_opaque_and_passphrase_secrets() {
    need::require_dm_crypt();
    round_trip("Luks2Encryptor", "opaque-1", "l2opq", Some("2"));
    round_trip(
        "os_brick.encryptors.luks.Luks2Encryptor",
        "pass-1",
        "l2pass",
        Some("2"),
    );
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn plain_with_each_secret_type_round_trips() {
    need::require_dm_crypt();
    round_trip("plain", "sym-1", "plsym", None);
    round_trip("CryptsetupEncryptor", "pass-1", "plpass", None);
    round_trip(
        "os_brick.encryptors.cryptsetup.CryptsetupEncryptor",
        "opaque-1",
        "plopq",
        None,
    );
}

/// Plain mode with cryptsetup's defaults: aes-cbc-essiv:sha256, 256 bits, and the dm key is
/// RIPEMD160(p) ‖ RIPEMD160("A" ‖ p) truncated, exactly as `cryptsetup create` makes it.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn plain_defaults_hash_the_passphrase_with_ripemd160() {
    need::require_dm_crypt();
    let v = Vol::new("plkey", 16);
    let k = keys();
    let ctx = v.ctx(&k);
    let out = volume::attach(&ctx, &v.request("plain", "sym-1", "", "")).unwrap();
    assert!(!out.formatted());
    let table = sh(&format!("dmsetup table --showkeys {}", v.name));
    let fields: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(fields[2], "crypt", "{}", fields[2]);
    assert_eq!(fields[3], "aes-cbc-essiv:sha256");
    let passphrase = hex(&(0u8..32).collect::<Vec<u8>>());
    assert_eq!(passphrase.len(), 64);
    assert_eq!(
        fields[4],
        hex(&plain_key(passphrase.as_bytes(), 32)),
        "dm key is not the ripemd160 hash"
    );

    // cryptsetup itself, fed the same passphrase, makes the same key.
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    let o = sh_in(
        &format!(
            "cryptsetup create --key-file=- vc-plkey-ref {}",
            v.loopdev.display()
        ),
        passphrase.as_bytes(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = sh("dmsetup table --showkeys vc-plkey-ref");
    sh("cryptsetup close vc-plkey-ref");
    assert_eq!(reference.split_whitespace().nth(4), Some(fields[4]));
}

/// A volume formatted by `cryptsetup luksFormat` with the hex passphrase (what os-brick does)
/// opens with volcrypt, and reads what cryptsetup's mapping wrote.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn cryptsetup_formatted_volume_opens_with_volcrypt() {
    need::require_dm_crypt();
    let v = Vol::new("csfmt", 32);
    let k = keys();
    let ctx = v.ctx(&k);
    let passphrase = hex(&[0x07; 32]);
    let o = sh_in(
        &format!(
            "cryptsetup --batch-mode luksFormat --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file=- {}",
            v.loopdev.display()
        ),
        passphrase.as_bytes(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = sh_in(
        &format!(
            "cryptsetup open --key-file=- {} vc-csfmt-ref",
            v.loopdev.display()
        ),
        passphrase.as_bytes(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let data = pattern(9, 65536);
    write_at(Path::new("/dev/mapper/vc-csfmt-ref"), 0, &data);
    sh("cryptsetup close vc-csfmt-ref");

    let out = volume::attach(&ctx, &v.request("luks", "sym-2", "", "")).unwrap();
    assert!(
        !out.formatted(),
        "an existing LUKS2 volume must be opened, not formatted"
    );
    assert_eq!(read_at(&v.mapper(), 0, data.len()), data);
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
}

fn refuse_format(tag: &str, prepare: &str, expect: &str) {
    let v = Vol::new(tag, 32);
    let k = keys();
    let ctx = v.ctx(&k);
    sh(&prepare.replace("DEV", &v.loopdev.display().to_string()));
    let before = sha256_of(&v.loopdev);
    let err = volume::attach(&ctx, &v.request("luks2", "sym-1", "", "")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, volume::Error::RefuseFormat { .. }), "{msg}");
    assert!(msg.contains(expect), "{msg}");
    assert_eq!(ExitStatus::from(err.kind()), ExitStatus::Invalid);
    assert_eq!(sha256_of(&v.loopdev), before, "device content changed");
    v.assert_nothing_left();
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn refuses_to_format_a_device_with_ext4() {
    need::require_dm_crypt();
    refuse_format("ext4", "mkfs.ext4 -q -F DEV", "ext4");
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn refuses_to_format_a_device_with_a_partition_table() {
    need::require_dm_crypt();
    refuse_format("gpt", "printf 'label: gpt\\n,4M\\n' | sfdisk -q DEV", "gpt");
    refuse_format("dos", "printf 'label: dos\\n,4M\\n' | sfdisk -q DEV", "dos");
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn double_attach_returns_the_existing_mapping() {
    need::require_dm_crypt();
    let v = Vol::new("dbl", 32);
    let k = keys();
    let ctx = v.ctx(&k);
    let req = v.request("luks2", "sym-1", "", "");
    let first = volume::attach(&ctx, &req).unwrap();
    // device_path now points at the mapping itself; a repeat must still recognise the volume.
    let second = volume::attach(&ctx, &req).unwrap();
    assert!(second.already_attached() && !second.formatted());
    assert_eq!(second.device, first.device);
    assert_eq!(second.backing_device.as_deref(), Some(v.loopdev.as_path()));
    // Links removed by someone are re-asserted by the repeat attach.
    std::fs::remove_file(v.stable_link()).unwrap();
    let third = volume::attach(&ctx, &req).unwrap();
    assert!(third.already_attached());
    assert_eq!(std::fs::read_link(v.stable_link()).unwrap(), v.mapper());
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    assert_eq!(std::fs::read_link(&v.link).unwrap(), v.loopdev);
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn name_held_by_another_device_is_refused_and_nothing_changes() {
    need::require_dm_crypt();
    let a = Vol::new("conf", 32);
    let b = Vol::new("conf", 32); // same basename, different loop device
    let k = keys();
    let ctx_a = a.ctx(&k);
    volume::attach(&ctx_a, &a.request("luks2", "sym-1", "", "")).unwrap();
    let table_before = sh(&format!("dmsetup deps {}", a.name));
    let ctx_b = b.ctx(&k);
    let err = volume::attach(&ctx_b, &b.request("luks2", "sym-1", "", "")).unwrap_err();
    assert!(matches!(err, volume::Error::NameConflict { .. }), "{err}");
    assert_eq!(ExitStatus::from(err.kind()), ExitStatus::Busy);
    assert_eq!(sh(&format!("dmsetup deps {}", a.name)), table_before);
    assert_eq!(std::fs::read_link(&b.link).unwrap(), b.loopdev);
    assert!(std::fs::symlink_metadata(b.stable_link()).is_err());
    assert!(!b.state_file().exists());
    assert_eq!(sha256_of(&b.loopdev), sha256_of(&b.file), "b was touched");
    assert!(
        read_at(&b.loopdev, 0, 4096).iter().all(|&x| x == 0),
        "b was formatted"
    );
    volume::detach(&ctx_a, &a.volume_id(), None).unwrap();
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn busy_detach_fails_naming_holders_then_succeeds_after_release() {
    need::require_dm_crypt();
    let v = Vol::new("busy", 32);
    let k = keys();
    let ctx = v.ctx(&k);
    volume::attach(&ctx, &v.request("luks", "sym-1", "", "")).unwrap();
    let held = std::fs::File::open(v.mapper()).unwrap();
    let t = std::time::Instant::now();
    let err = volume::detach(&ctx, &v.volume_id(), None).unwrap_err();
    let waited = t.elapsed();
    let msg = err.to_string();
    assert!(matches!(err, volume::Error::Busy { .. }), "{msg}");
    assert_eq!(ExitStatus::from(err.kind()), ExitStatus::Busy);
    assert!(msg.contains("open count 1"), "{msg}");
    assert!(
        msg.contains(&std::process::id().to_string()),
        "our pid not named: {msg}"
    );
    assert!(
        waited >= std::time::Duration::from_millis(1400),
        "gave up after {waited:?}"
    );
    assert!(v.active());
    drop(held);
    let d = volume::detach(&ctx, &v.volume_id(), None).unwrap();
    assert!(d.was_active);
    assert!(!v.active());
    // Detaching again: not active is success.
    let d = volume::detach(&ctx, &v.volume_id(), Some(&v.link)).unwrap();
    assert!(!d.was_active);
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn extend_after_growing_the_loop_device() {
    need::require_dm_crypt();
    for (provider, tag) in [("luks2", "ext2"), ("luks", "ext1"), ("plain", "extp")] {
        let v = Vol::new(tag, 32);
        let k = keys();
        let ctx = v.ctx(&k);
        volume::attach(&ctx, &v.request(provider, "sym-1", "", "")).unwrap();
        let before = sh(&format!("blockdev --getsize64 {}", v.mapper().display()));
        let before: u64 = before.trim().parse().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&v.file)
            .unwrap()
            .set_len(48 << 20)
            .unwrap();
        sh(&format!("losetup -c {}", v.loopdev.display()));
        let out = volume::extend(&ctx, &v.volume_id()).unwrap();
        let after: u64 = sh(&format!("blockdev --getsize64 {}", v.mapper().display()))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(after, before + (16 << 20), "{provider}: {out:?}");
        assert_eq!(out.new_size_bytes, after);
        volume::detach(&ctx, &v.volume_id(), None).unwrap();
    }
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn wrong_key_is_exit_2_naming_the_key_and_leaves_nothing() {
    need::require_dm_crypt();
    let v = Vol::new("wkey", 32);
    let k = keys();
    let ctx = v.ctx(&k);
    volume::attach(&ctx, &v.request("luks2", "sym-1", "", "")).unwrap();
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    let header = sha256_of(&v.loopdev);
    let err = volume::attach(&ctx, &v.request("luks2", "sym-2", "", "")).unwrap_err();
    assert!(matches!(err, volume::Error::WrongKey { .. }), "{err}");
    assert_eq!(ExitStatus::from(err.kind()), ExitStatus::NoKey);
    assert!(err.to_string().contains("sym-2"), "{err}");
    assert_eq!(
        sha256_of(&v.loopdev),
        header,
        "a wrong key must never lead to a format"
    );
    v.assert_nothing_left();
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn unknown_key_id_leaves_nothing() {
    need::require_dm_crypt();
    let v = Vol::new("nokey", 32);
    let k = keys();
    let ctx = v.ctx(&k);
    let err = volume::attach(&ctx, &v.request("luks2", "no-such-key", "", "")).unwrap_err();
    assert!(err.to_string().contains("no-such-key"), "{err}");
    assert!(
        read_at(&v.loopdev, 0, 4096).iter().all(|&x| x == 0),
        "formatted without a key"
    );
    v.assert_nothing_left();
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn unreachable_barbican_is_exit_2_and_leaves_nothing() {
    need::require_dm_crypt();
    let v = Vol::new("nobarb", 32);
    // Nothing listens on port 9 of the loopback: connection refused, fast.
    let cfg = Config::from_toml(
        "[key_manager]\nbackend = \"barbican\"\n[key_manager.barbican]\nendpoint = \"http://127.0.0.1:9\"\n\
         retries = 1\nbackoff_initial = 0.05\nconnect_timeout = 1.0\n[key_manager.barbican.auth]\nmethod = \"headers\"\nproject_id = \"p\"\n",
        "<test>",
    )
    .unwrap();
    let k = Keys {
        km: volcrypt::keys::from_config(&cfg.key_manager).unwrap(),
        ids: HashMap::new(),
        _dir: None,
    };
    let ctx = v.ctx(&k);
    let err = volume::attach(
        &ctx,
        &v.request("luks2", "3e1b0f0a-0000-4000-8000-000000000001", "", ""),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("unreachable") && msg.contains("3e1b0f0a"),
        "{msg}"
    );
    assert_eq!(ExitStatus::from(err.kind()), ExitStatus::NoKey);
    assert!(
        read_at(&v.loopdev, 0, 4096).iter().all(|&x| x == 0),
        "formatted without a key"
    );
    v.assert_nothing_left();
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn perf_flags_reach_the_kernel_and_status_and_4k_sectors_for_luks2() {
    need::require_dm_crypt();
    let v = Vol::new("perf", 32);
    let k = keys();
    let ctx = v.ctx(&k);
    let req = v.request(
        "luks2",
        "sym-1",
        "",
        r#""allow_discards": true, "no_read_workqueue": true, "no_write_workqueue": true, "sector_size": 4096"#,
    );
    volume::attach(&ctx, &req).unwrap();
    let table = sh(&format!("dmsetup table {}", v.name));
    for f in [
        "allow_discards",
        "no_read_workqueue",
        "no_write_workqueue",
        "sector_size:4096",
    ] {
        assert!(table.contains(f), "{f} missing in kernel table");
    }
    let st = volume::status(&ctx).unwrap();
    assert_eq!(
        st[0].flags,
        vec!["allow_discards", "no_read_workqueue", "no_write_workqueue"]
    );
    assert_eq!(st[0].sector_size, Some(4096));
    assert_eq!(st[0].open_count, Some(0));
    // status never shows key material.
    let json = serde_json::to_string(&st).unwrap();
    let key_hex = sh(&format!("dmsetup table --showkeys {}", v.name));
    for field in key_hex.split_whitespace().filter(|f| f.len() >= 32) {
        assert!(!json.contains(field), "status leaks a table field");
    }
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
}

/// Whether the kernel's table of `name` (no keys: without --showkeys) carries `flag`.
fn table_has(name: &str, flag: &str) -> bool {
    sh(&format!("dmsetup table {name}"))
        .split_whitespace()
        .any(|f| f == flag)
}

const PERF_FLAGS: [&str; 3] = ["allow_discards", "no_read_workqueue", "no_write_workqueue"];

/// `tune` of an active LUKS2 mapping: the kernel's table changes online (the data stays
/// readable through the same mapping), the journal and status follow; a sector size is refused
/// and changes nothing; `--persistent` stores the flags in the header, so a plain `cryptsetup
/// open` applies them later. Both the engine call and the CLI.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn tune_changes_flags_online_and_persistent_flags_reach_plain_cryptsetup() {
    need::require_dm_crypt();
    let v = Vol::new("tune", 32);
    let k = keys();
    let ctx = v.ctx(&k);
    volume::attach(&ctx, &v.request("luks2", "sym-1", "", "")).unwrap();
    for f in PERF_FLAGS {
        assert!(!table_has(&v.name, f), "{f} set before any was asked");
    }
    let data = pattern(9, 1 << 20);
    write_at(&v.mapper(), 8192, &data);
    let mut holder = std::fs::File::open(v.mapper()).unwrap(); // in use while tuned

    let tune = |json: &str| {
        let req = volcrypt::request::TuneRequest::from_json(json.as_bytes()).unwrap();
        volume::tune(&ctx, &v.volume_id(), &req)
    };
    let out = tune(r#"{"allow_discards": true, "no_read_workqueue": true}"#).unwrap();
    assert!(
        out.flags.allow_discards && out.flags.no_read_workqueue,
        "{out:?}"
    );
    assert!(!out.flags.no_write_workqueue && !out.persistent, "{out:?}");
    for (f, want) in PERF_FLAGS.iter().zip([true, true, false]) {
        assert_eq!(table_has(&v.name, f), want, "{f} after tune");
    }
    let mut buf = vec![0u8; data.len()];
    holder.seek(SeekFrom::Start(8192)).unwrap();
    holder.read_exact(&mut buf).unwrap();
    assert!(buf == data, "data changed across the refresh");
    let st = volume::status(&ctx).unwrap();
    assert_eq!(st[0].flags, vec!["allow_discards", "no_read_workqueue"]);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v.state_file()).unwrap()).unwrap();
    assert_eq!(record["flags"]["allow_discards"], true);
    assert_eq!(record["request"]["options"]["no_read_workqueue"], true);
    assert!(
        !sh(&format!("cryptsetup luksDump {}", v.loopdev.display())).contains("allow-discards"),
        "a tune without persistent wrote the header"
    );

    // The sector size cannot change online: refused, nothing changed.
    let before = std::fs::read(v.state_file()).unwrap();
    let e = tune(r#"{"sector_size": 4096, "allow_discards": false}"#).unwrap_err();
    assert!(
        e.to_string().contains("cannot change on an active mapping"),
        "{e}"
    );
    assert!(table_has(&v.name, "allow_discards"));
    assert_eq!(std::fs::read(v.state_file()).unwrap(), before);

    // The CLI, persistent: the header carries the resulting flags.
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let (cfg, _) = cli_files(&v, &k, "");
    let cli = |args: &str| {
        sh_in(
            &format!(
                "{bin} tune {} {args} --config {}",
                v.volume_id(),
                cfg.display()
            ),
            b"",
        )
    };
    let o = cli("--no-allow-discards --no-write-workqueue --persistent");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(printed["persistent"], true);
    assert_eq!(printed["flags"]["no_write_workqueue"], true);
    assert!(!table_has(&v.name, "allow_discards"));
    assert!(table_has(&v.name, "no_write_workqueue"));
    let dump = sh(&format!("cryptsetup luksDump {}", v.loopdev.display()));
    let flags_line = dump
        .lines()
        .find(|l| l.starts_with("Flags:"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        flags_line.contains("no-read-workqueue") && flags_line.contains("no-write-workqueue"),
        "luksDump Flags: {flags_line:?}"
    );
    assert!(!flags_line.contains("allow-discards"), "{flags_line:?}");
    // A refresh libcryptsetup refuses (here: the key manager now hands out another key)
    // changes nothing: the header's flags were stored first and are put back, the table and
    // the journal stay as they were.
    let ks = Keystore::open(k._dir.as_ref().unwrap().path().join("keys")).unwrap();
    let secret = |b: Vec<u8>| Secret::new(SecretType::Symmetric, SecretBytes::new(b));
    ks.put("sym-1", &secret(vec![0x42; 32])).unwrap();
    let before = std::fs::read(v.state_file()).unwrap();
    let e = tune(r#"{"allow_discards": true, "persistent": true}"#).unwrap_err();
    ks.put("sym-1", &secret((0u8..32).collect())).unwrap();
    assert!(matches!(e, volume::Error::WrongKey { .. }), "{e}");
    let dump = sh(&format!("cryptsetup luksDump {}", v.loopdev.display()));
    assert_eq!(
        dump.lines()
            .find(|l| l.starts_with("Flags:"))
            .unwrap_or_default(),
        flags_line,
        "a refused refresh changed the header's flags"
    );
    assert!(!table_has(&v.name, "allow_discards"));
    assert_eq!(std::fs::read(v.state_file()).unwrap(), before);
    let o = cli("--sector-size 4096");
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(holder);
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    v.assert_nothing_left();

    // A plain cryptsetup open, no flag options: the header's flags are applied.
    let p = k.km.get("sym-1").unwrap().passphrase();
    let o = sh_in(
        &format!(
            "cryptsetup open --key-file=- {} vc-tune-ref",
            v.loopdev.display()
        ),
        p.expose(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let applied = (
        table_has("vc-tune-ref", "no_read_workqueue"),
        table_has("vc-tune-ref", "no_write_workqueue"),
        table_has("vc-tune-ref", "allow_discards"),
    );
    sh("cryptsetup close vc-tune-ref");
    assert_eq!(
        applied,
        (true, true, false),
        "flags of a plain cryptsetup open"
    );
    assert_eq!(read_at(&v.loopdev, 0, 4), b"LUKS");
}

/// `persistent` at attach: stored in a LUKS2 header (a plain `cryptsetup open` applies it),
/// refused for a LUKS1 request and for a LUKS2 request that finds a LUKS1 header, before
/// anything changed (no mapping, no record, header bytes unchanged).
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn persistent_flags_at_attach_for_luks2_and_a_clear_refusal_for_luks1() {
    need::require_dm_crypt();
    let k = keys();
    let v = Vol::new("persist", 32);
    let ctx = v.ctx(&k);
    let opts = r#""no_read_workqueue": true, "persistent": true"#;
    volume::attach(&ctx, &v.request("luks2", "sym-1", "", opts)).unwrap();
    assert!(table_has(&v.name, "no_read_workqueue"));
    let dump = sh(&format!("cryptsetup luksDump {}", v.loopdev.display()));
    assert!(
        dump.lines()
            .any(|l| l.starts_with("Flags:") && l.contains("no-read-workqueue")),
        "no Flags: line with no-read-workqueue in luksDump"
    );
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    let p = k.km.get("sym-1").unwrap().passphrase();
    let o = sh_in(
        &format!(
            "cryptsetup open --key-file=- {} vc-persist-ref",
            v.loopdev.display()
        ),
        p.expose(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let applied = table_has("vc-persist-ref", "no_read_workqueue");
    sh("cryptsetup close vc-persist-ref");
    assert!(
        applied,
        "a plain cryptsetup open did not apply the stored flag"
    );

    // LUKS1: the request is refused before anything happens.
    let w = Vol::new("persist1", 32);
    let ctx1 = w.ctx(&k);
    let e = AttachRequest::from_json(
        serde_json::to_vec(&w.request("luks", "sym-2", "", r#""allow_discards": true"#))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let mut luks1 = e.clone();
    luks1.options.persistent = true;
    let err = volume::attach(&ctx1, &luks1).unwrap_err();
    assert!(
        err.to_string().contains(
            "LUKS1 and plain volumes have no place to store activation flags; they apply per \
             activation only"
        ),
        "{err}"
    );
    w.assert_nothing_left();
    // A LUKS1 header under a LUKS2 request: refused once the header is read, before the open.
    volume::attach(&ctx1, &e).unwrap();
    volume::detach(&ctx1, &w.volume_id(), None).unwrap();
    let header = read_at(&w.loopdev, 0, 4096);
    let mut luks2_req = w.request("luks2", "sym-2", "", r#""persistent": true"#);
    luks2_req.options.allow_discards = Some(true);
    let err = volume::attach(&ctx1, &luks2_req).unwrap_err();
    assert!(err.to_string().contains("the volume is LUKS1"), "{err}");
    w.assert_nothing_left();
    assert!(
        read_at(&w.loopdev, 0, 4096) == header,
        "the LUKS1 header changed"
    );
}

/// The CLI end to end: malformed request → exit 1 and nothing changed; status --json.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn cli_malformed_request_changes_nothing() {
    need::require_dm_crypt();
    let v = Vol::new("cli", 16);
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let cases: [&[u8]; 3] = [
        b"{not json",
        br#"{"volume_id":"x","device_path":"/dev/null","encryption":{"provider":"LUKS","control_location":"front-end","encryption_key_id":"k"}}"#,
        br#"{"volume_id":"x","device_path":"/dev/null","encryption":{"provider":"luks","control_location":"front-end"}}"#,
    ];
    for input in cases {
        let o = sh_in(
            &format!(
                "{bin} attach --request - --state-dir {}/state --by-id-dir {}/by-id",
                v.dir.path().display(),
                v.dir.path().display()
            ),
            input,
        );
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!String::from_utf8_lossy(&o.stderr).is_empty());
    }
    v.assert_nothing_left();
    assert!(
        !v.dir.path().join("state").exists()
            || std::fs::read_dir(v.dir.path().join("state"))
                .unwrap()
                .count()
                == 0
    );
}

/// A scsi_debug disk: unlike a loop device, it can be deleted while dm-crypt holds it, which
/// is what an iSCSI logout or a path failure does to a real volume.
fn scsi_debug_disk() -> Option<PathBuf> {
    need::require_scsi_debug();
    let drv = Path::new("/sys/bus/pseudo/drivers/scsi_debug");
    let list = need::scsi_debug_disks;
    let before = list();
    std::fs::write(drv.join("add_host"), "1").ok()?;
    for _ in 0..100 {
        if let Some(n) = list().into_iter().find(|n| !before.contains(n)) {
            let dev = PathBuf::from("/dev").join(&n);
            for _ in 0..50 {
                if dev.exists() {
                    return Some(dev);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn stale_mapping_is_reported_and_replaced_only_when_unused() {
    need::require_dm_crypt();
    let disk = scsi_debug_disk().expect("a new scsi_debug disk");
    let v = Vol::new("stale", 32);
    // The volume's device path points at the SCSI disk first.
    std::fs::remove_file(&v.link).unwrap();
    std::os::unix::fs::symlink(&disk, &v.link).unwrap();
    let k = keys();
    let ctx = v.ctx(&k);
    // scsi_debug disks share one store: zero the 2 MiB a LUKS1 format overwrites, which a
    // blank device must read as zeros.
    write_at(&disk, 0, &vec![0u8; 2 << 20]);
    volume::attach(&ctx, &v.request("luks", "sym-1", "", "")).unwrap();
    let base = disk.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::write(format!("/sys/block/{base}/device/delete"), "1").unwrap();
    for _ in 0..50 {
        if !disk.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let st = volume::status(&ctx).unwrap();
    assert!(
        st[0].active && st[0].stale && !st[0].backing_present,
        "{:?}",
        st[0]
    );

    // The volume comes back on another device (the loop device) under the same path.
    std::fs::remove_file(&v.link).unwrap();
    std::os::unix::fs::symlink(&v.loopdev, &v.link).unwrap();
    let held = std::fs::File::open(v.mapper()).unwrap();
    let err = volume::attach(&ctx, &v.request("luks", "sym-1", "", "")).unwrap_err();
    assert!(matches!(err, volume::Error::StaleBusy { .. }), "{err}");
    assert_eq!(ExitStatus::from(err.kind()), ExitStatus::Busy);
    assert!(v.active());
    drop(held);
    let out = volume::attach(&ctx, &v.request("luks", "sym-1", "", "")).unwrap();
    assert!(out.replaced_stale && out.formatted(), "{out:?}");
    assert_eq!(out.backing_device.as_deref(), Some(v.loopdev.as_path()));
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
}

/// With udevd running (harness `--udev`), the stable link in /dev/disk/by-id survives udev
/// `change`/`add` events on both the mapping and the backing device.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn stable_link_survives_udev_events() {
    need::require_udevd();
    let v = Vol::new("udev", 32);
    let k = keys();
    let mut ctx = v.ctx(&k);
    ctx.config.by_id_dir = PathBuf::from("/dev/disk/by-id");
    let out = volume::attach(&ctx, &v.request("luks2", "sym-1", "", "")).unwrap();
    let link = out.stable_link.clone().unwrap();
    assert!(link.starts_with("/dev/disk/by-id"));
    for action in ["change", "add", "change"] {
        sh(&format!(
            "udevadm trigger --action={action} {} /dev/mapper/{} && udevadm settle",
            v.loopdev.display(),
            v.name
        ));
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            v.mapper(),
            "udev took the link back after {action}"
        );
    }
    let st = volume::status(&ctx).unwrap();
    assert!(st[0].stable_link_ok);
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    assert!(std::fs::symlink_metadata(&link).is_err());
}

/// The kernel and the userspace engine agree: data written through the kernel mapping of a
/// volume volcrypt formatted decrypts byte-exact with `volcrypt image decrypt` of the raw
/// backing device, and a container written by `volcrypt image encrypt` reads back through the
/// kernel mapping.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn kernel_and_userspace_engine_agree() {
    need::require_dm_crypt();
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let k = keys();
    let key_file = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    std::fs::write(key_file.path(), (0u8..32).collect::<Vec<u8>>()).unwrap(); // sym-1's payload

    for provider in ["luks", "luks2"] {
        // Kernel writes, userspace reads.
        let v = Vol::new(&format!("agree{provider}"), 20);
        let ctx = v.ctx(&k);
        volume::attach(&ctx, &v.request(provider, "sym-1", "", "")).unwrap();
        let size: usize = sh(&format!("blockdev --getsize64 {}", v.mapper().display()))
            .trim()
            .parse()
            .unwrap();
        let data = pattern(77, size);
        write_at(&v.mapper(), 0, &data);
        volume::detach(&ctx, &v.volume_id(), None).unwrap();
        let out = v.dir.path().join("decrypted.img");
        sh(&format!(
            "{bin} image decrypt {} --key-file {} --secret-type symmetric -o {}",
            v.file.display(),
            key_file.path().display(),
            out.display()
        ));
        assert!(
            std::fs::read(&out).unwrap() == data,
            "{provider}: userspace decrypt differs from what the kernel wrote"
        );

        // Userspace writes, kernel reads.
        let mut w = Vol::new(&format!("agreeu{provider}"), 1);
        let plain = w.dir.path().join("plain.img");
        let data = pattern(5, 2 << 20);
        std::fs::write(&plain, &data).unwrap();
        let container = w.dir.path().join("container.img");
        let luks_type = if provider == "luks" { "luks1" } else { "luks2" };
        sh(&format!(
            "{bin} image encrypt {} -o {} --key-file {} --secret-type symmetric --type {luks_type} \
             --pbkdf pbkdf2 --pbkdf-iterations 1000",
            plain.display(),
            container.display(),
            key_file.path().display()
        ));
        sh(&format!("losetup -d {}", w.loopdev.display()));
        let lo = sh(&format!("losetup -f --show {}", container.display()))
            .trim()
            .to_owned();
        // Vol's drop detaches its loop device: from now on that is `lo`. Detaching the old
        // number again would detach whichever test's device got that number meanwhile.
        w.loopdev = PathBuf::from(&lo);
        std::fs::remove_file(&w.link).unwrap();
        std::os::unix::fs::symlink(&lo, &w.link).unwrap();
        let wctx = w.ctx(&k);
        let o = volume::attach(&wctx, &w.request(provider, "sym-1", "", "")).unwrap();
        assert!(
            !o.formatted(),
            "an encrypted image must be opened, not formatted"
        );
        assert!(
            read_at(&w.mapper(), 0, data.len()) == data,
            "{provider}: kernel reads something else than was encrypted"
        );
        volume::detach(&wctx, &w.volume_id(), None).unwrap();
    }
}

/// A config file for the CLI (the keys' keystore, the volume's state and by-id dirs, fast
/// PBKDF2, `extra_volume` lines under `[volume]`) and a request file attaching `v` as LUKS2
/// with the symmetric key `sym-2`.
fn cli_files(v: &Vol, k: &Keys, extra_volume: &str) -> (PathBuf, PathBuf) {
    let keydir = k._dir.as_ref().unwrap().path().join("keys");
    let cfg = v.dir.path().join("volcrypt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[key_manager]\nbackend = \"keystore\"\n[key_manager.keystore]\ndir = \"{}\"\ncreate = false\n\
             [volume]\nstate_dir = \"{}\"\nby_id_dir = \"{}\"\n{extra_volume}\
             [volume.pbkdf]\nkind = \"pbkdf2\"\niterations = 1000\n",
            keydir.display(),
            v.dir.path().join("state").display(),
            v.dir.path().join("by-id").display()
        ),
    )
    .unwrap();
    let req = v.dir.path().join("req.json");
    let r = serde_json::json!({
        "volume_id": v.volume_id(), "device_path": v.link,
        "encryption": {"provider": "luks2", "control_location": "front-end", "encryption_key_id": "sym-2"}
    });
    std::fs::write(&req, r.to_string()).unwrap();
    (cfg, req)
}

/// The CLI end to end with a TOML config (keystore + [volume]): attach → status → detach;
/// a wrong key exits 2 and leaves nothing.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn cli_attach_status_detach_with_a_config_file() {
    need::require_dm_crypt();
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let v = Vol::new("clie2e", 32);
    let k = keys();
    let (cfg, req) = cli_files(&v, &k, "no_read_workqueue = true\n");
    let run = |args: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("{bin} {args} --config {}", cfg.display()))
            .output()
            .unwrap()
    };
    let o = run(&format!("attach --request {}", req.display()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out["mapping_name"], v.name.as_str());
    assert_eq!(out["formatted"], true);
    assert_eq!(out["key_manager"], "keystore");
    assert_eq!(out["flags"]["no_read_workqueue"], true);

    let o = run("status --json");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st[0]["volume_id"], v.volume_id().as_str());
    assert_eq!(st[0]["key_id"], "sym-2");
    assert_eq!(st[0]["derivation"], "lowercase-hex");
    assert_eq!(st[0]["flags"][0], "no_read_workqueue");
    let text = run("status");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("keystore key sym-2 (lowercase-hex)"),
        "{text}"
    );
    let passphrase = hex(&[0x07; 32]);
    assert!(
        !text.contains(&passphrase) && !String::from_utf8_lossy(&o.stdout).contains(&passphrase)
    );

    let o = run(&format!("detach {}", v.volume_id()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!v.active());

    // Wrong key through the CLI: exit 2 naming the key, nothing left.
    let r = serde_json::json!({
        "volume_id": v.volume_id(), "device_path": v.link,
        "encryption": {"provider": "luks2", "control_location": "front-end", "encryption_key_id": "sym-1"}
    });
    std::fs::write(&req, r.to_string()).unwrap();
    let o = run(&format!("attach --request {}", req.display()));
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("sym-1"));
    v.assert_nothing_left();
}

/// Volumes os-brick attached before volcrypt took over: an active legacy-named mapping
/// (`<basename>`, no prefix) is reused, and a `crypt-<basename>` mapping volcrypt has no record
/// of is detached with `--device-path`.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn os_brick_mappings_are_reused_and_detached() {
    need::require_dm_crypt();
    let k = keys();
    let passphrase = hex(&[0x07; 32]); // sym-2, hexlified as os-brick does
    let v = Vol::new("legacy", 32);
    let ctx = v.ctx(&k);
    let base = v.link.file_name().unwrap().to_string_lossy().into_owned();
    let o = sh_in(
        &format!(
            "cryptsetup --batch-mode luksFormat --type luks1 --pbkdf-force-iterations 1000 --key-file=- {}",
            v.loopdev.display()
        ),
        passphrase.as_bytes(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = sh_in(
        &format!(
            "cryptsetup open --key-file=- {} {base}",
            v.loopdev.display()
        ),
        passphrase.as_bytes(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = volume::attach(&ctx, &v.request("luks", "sym-2", "", "")).unwrap();
    assert!(out.already_attached(), "{out:?}");
    assert_eq!(out.mapping_name.as_deref(), Some(base.as_str()));
    volume::detach(&ctx, &v.volume_id(), None).unwrap();
    assert!(!Path::new("/dev/mapper").join(&base).exists());

    // A crypt-<basename> mapping opened by os-brick (cryptsetup), no volcrypt record.
    let w = Vol::new("obrick", 32);
    let wctx = w.ctx(&k);
    let o = sh_in(
        &format!(
            "cryptsetup --batch-mode luksFormat --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file=- {}",
            w.loopdev.display()
        ),
        passphrase.as_bytes(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = sh_in(
        &format!(
            "cryptsetup open --key-file=- {} {}",
            w.loopdev.display(),
            w.name
        ),
        passphrase.as_bytes(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = volume::detach(&wctx, "brick-vol", Some(&w.link)).unwrap();
    assert!(d.was_active && !w.active());
}

/// `dmsetup table` of a mapping with the key replaced by its SHA-256 (the table carries the key
/// in hex, or a keyring reference for LUKS2), so two tables can be compared without printing a
/// key when they differ.
fn table_with_hashed_key(name: &str) -> Vec<String> {
    let t = sh(&format!("dmsetup table --showkeys {name}"));
    t.split_whitespace()
        .enumerate()
        .map(|(i, f)| {
            if i == 4 {
                use sha2::Digest;
                hex(&sha2::Sha256::digest(f.as_bytes()))
            } else {
                f.to_owned()
            }
        })
        .collect()
}

/// volcrypt's fast open path (its own keyslot unlock, then libcryptsetup's activation by volume
/// key) on volumes cryptsetup formatted — LUKS1, LUKS2 with PBKDF2, LUKS2 with argon2id, a
/// LUKS2 volume whose passphrase sits in its second keyslot, and (the fallback) a serpent volume
/// the engine cannot unlock, which libcryptsetup unlocks: each gets exactly the dm table
/// `cryptsetup open` gets (same key or keyring reference, offset, flags), reads what cryptsetup's mapping wrote and writes what cryptsetup's mapping
/// then reads; a wrong passphrase is volcrypt's WrongKey with cryptsetup's own exit code, and
/// changes nothing.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn userspace_unlock_opens_cryptsetup_volumes_like_cryptsetup() {
    need::require_dm_crypt();
    let cases: &[(&str, &str, &str, bool)] = &[
        (
            "usl1",
            "luks",
            "--type luks1 --pbkdf-force-iterations 1000",
            false,
        ),
        (
            "usl2",
            "luks2",
            "--type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000",
            false,
        ),
        (
            "usa2",
            "luks2",
            "--type luks2 --pbkdf argon2id --pbkdf-force-iterations 4 --pbkdf-memory 32768 --pbkdf-parallel 2",
            false,
        ),
        (
            "uss2",
            "luks2",
            "--type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000",
            true,
        ),
        // A cipher volcrypt's engine does not run (keyslot area too): libcryptsetup unlocks.
        (
            "usp2",
            "luks2",
            "--type luks2 --cipher serpent-xts-plain64 --pbkdf pbkdf2 --pbkdf-force-iterations 1000",
            false,
        ),
    ];
    let k = keys();
    let passphrase = hex(&[0x07; 32]); // what sym-2 becomes (os-brick's hex passphrase)
    for (tag, provider, format_args, second_slot) in cases {
        let v = Vol::new(tag, 32);
        let ctx = v.ctx(&k);
        let dev = v.loopdev.display().to_string();
        let first = if *second_slot {
            "another passphrase"
        } else {
            passphrase.as_str()
        };
        let o = sh_in(
            &format!("cryptsetup --batch-mode luksFormat {format_args} --key-file=- {dev}"),
            first.as_bytes(),
        );
        assert!(
            o.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        if *second_slot {
            std::fs::write(v.dir.path().join("new-pass"), &passphrase).unwrap();
            let o = sh_in(
                &format!(
                    "cryptsetup luksAddKey --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file=- {dev} {}",
                    v.dir.path().join("new-pass").display()
                ),
                first.as_bytes(),
            );
            assert!(
                o.status.success(),
                "{tag}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        // cryptsetup's own mapping: the reference table, and data written through it.
        let reference = format!("vc-{tag}-ref");
        let o = sh_in(
            &format!("cryptsetup open --key-file=- {dev} {reference}"),
            passphrase.as_bytes(),
        );
        assert!(
            o.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let want_table = table_with_hashed_key(&reference);
        let data = pattern(21, 1 << 20);
        write_at(&PathBuf::from("/dev/mapper").join(&reference), 4096, &data);
        sh(&format!("cryptsetup close {reference}"));
        let header = sha256_of(&v.loopdev);

        // A wrong passphrase: WrongKey, cryptsetup's exit code, nothing changed or left.
        let err = volume::attach(&ctx, &v.request(provider, "sym-1", "", "")).unwrap_err();
        assert!(
            matches!(err, volume::Error::WrongKey { .. }),
            "{tag}: {err}"
        );
        let o = sh_in(
            &format!("cryptsetup open --test-passphrase --key-file=- {dev}"),
            hex(&(0u8..32).collect::<Vec<_>>()).as_bytes(),
        );
        assert_eq!(
            o.status.code(),
            Some(volcrypt::error::ExitStatus::from(err.kind()).code()),
            "{tag}: cryptsetup's exit code for the same wrong passphrase"
        );
        assert_eq!(sha256_of(&v.loopdev), header, "{tag}: header changed");
        v.assert_nothing_left();

        // The right one: volcrypt's userspace unlock, the same table, the same plaintext.
        let out = volume::attach(&ctx, &v.request(provider, "sym-2", "", "")).unwrap();
        assert!(!out.formatted(), "{tag}: must open, not format");
        let t = out.timings;
        if format_args.contains("serpent") {
            assert!(
                !t.kdf_split && !t.dm.is_zero(),
                "{tag}: libcryptsetup must have unlocked it: {t:?}"
            );
        } else {
            assert!(
                t.kdf_split && !t.kdf.is_zero() && !t.dm.is_zero() && !t.header.is_zero(),
                "{tag}: the userspace unlock must have opened it: {t:?}"
            );
        }
        // A LUKS2 keyring reference names the volume key by the device's UUID and digest, not
        // by the mapping name: the whole table matches.
        assert_eq!(
            table_with_hashed_key(&v.name),
            want_table,
            "{tag}: dm table differs from cryptsetup's"
        );
        assert_eq!(read_at(&v.mapper(), 4096, data.len()), data, "{tag}");
        let back = pattern(77, 1 << 20);
        write_at(&v.mapper(), 8192, &back);
        volume::detach(&ctx, &v.volume_id(), None).unwrap();
        let o = sh_in(
            &format!("cryptsetup open --key-file=- {dev} {reference}"),
            passphrase.as_bytes(),
        );
        assert!(
            o.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let mapped = PathBuf::from("/dev/mapper").join(&reference);
        assert_eq!(
            read_at(&mapped, 8192, back.len()),
            back,
            "{tag}: written through volcrypt"
        );
        sh(&format!("cryptsetup close {reference}"));
        v.assert_nothing_left();
    }
}

/// A first attach that formats the blank device and then fails — its first keyslot cannot be
/// written, the activation fails, a link cannot be set (each injected with the test hook
/// VOLCRYPT_TEST_FAIL_AT, in a CLI child only) — leaves the device as it found it: all zeros, no
/// keyless LUKS header that nobody could open and volcrypt would then refuse to format, no
/// mapping, no record. The same device formats and attaches normally afterwards.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn a_first_attach_failing_after_its_format_leaves_the_device_blank() {
    need::require_dm_crypt();
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let v = Vol::new("kslotfail", 32);
    let k = keys();
    let (cfg, req) = cli_files(&v, &k, "");
    let attach = |fault: Option<&str>| {
        let mut c = Command::new(bin);
        c.arg("attach")
            .arg("--request")
            .arg(&req)
            .arg("--config")
            .arg(&cfg);
        if let Some(f) = fault {
            c.env("VOLCRYPT_TEST_FAIL_AT", f);
        }
        c.output().unwrap()
    };
    for (fault, says) in [
        ("keyslot", "add keyslot"),
        ("activate", "activate"),
        ("link", "link"),
    ] {
        let o = attach(Some(fault));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            !o.status.success(),
            "{fault}: the injected fault did not fail the attach"
        );
        assert!(
            err.contains(says) && err.contains("test fault"),
            "{fault}: {err}"
        );
        let is_luks = Command::new("cryptsetup")
            .arg("isLuks")
            .arg(&v.loopdev)
            .status()
            .unwrap();
        assert!(!is_luks.success(), "{fault}: a LUKS header was left: {err}");
        let bytes = std::fs::read(&v.loopdev).unwrap();
        let nonzero = bytes.iter().position(|&b| b != 0);
        assert_eq!(nonzero, None, "{fault}: the device is not all zeros again");
        v.assert_nothing_left();
    }

    let o = attach(None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out["formatted"], true, "{out}");
    volume::detach(&v.ctx(&k), &v.volume_id(), None).unwrap();
    v.assert_nothing_left();
}

/// A volume opened with `cryptsetup open` directly has no volcrypt state record, so volcrypt
/// knows neither its key id nor its key manager: `verify` refuses it plainly (naming the volume
/// and "not managed by volcrypt"), reads nothing and leaves the mapping alone.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn verify_refuses_a_volume_opened_by_cryptsetup_directly() {
    need::require_dm_crypt();
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let k = keys();
    let v = Vol::new("vercsetup", 24);
    let (cfg, _) = cli_files(&v, &k, "");
    let pass = v.dir.path().join("pass");
    std::fs::write(&pass, b"opened elsewhere").unwrap();
    sh(&format!(
        "cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 \
         --pbkdf-force-iterations 1000 --key-file {p} {d} && \
         cryptsetup open --key-file {p} {d} {n}",
        p = pass.display(),
        d = v.loopdev.display(),
        n = v.name
    ));
    for id in [v.volume_id(), v.name.clone()] {
        let (code, r, err) = run_verify(bin, &cfg, &id, "--full");
        assert_ne!(code, 0, "{id}: {r}");
        assert_ne!(code, 6, "{id}: refused, not a mismatch: {err}");
        assert!(
            err.contains(&format!("volume {id} is not managed by volcrypt")),
            "{id}: {err}"
        );
    }
    assert!(v.active(), "the mapping opened by cryptsetup was touched");
    sh(&format!("cryptsetup close {}", v.name));
}

/// A writer keeps writing through the mapping while `verify --full` runs (several times): a
/// sector written between the two reads of a verify must agree on its re-read, so no run may
/// report a mismatch.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn verify_full_under_a_concurrent_writer_never_reports_a_false_mismatch() {
    use std::os::unix::process::CommandExt;
    need::require_dm_crypt();
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let k = keys();
    let v = Vol::new("verwriter", 24);
    let (cfg, _) = cli_files(&v, &k, "");
    volume::attach(&v.ctx(&k), &v.request("luks2", "sym-1", "", "")).unwrap();
    let mapper = v.mapper();
    // The payload is rewritten over and over, alternating two random patterns, in 64 KiB
    // O_DIRECT writes (few processes: spawning is slow under emulation).
    let size: u64 = sh(&format!("blockdev --getsize64 {}", mapper.display()))
        .trim()
        .parse()
        .unwrap();
    let (a, b) = (v.dir.path().join("a"), v.dir.path().join("b"));
    std::fs::write(&a, pattern(41, size as usize)).unwrap();
    std::fs::write(&b, pattern(43, size as usize)).unwrap();
    // In its own process group, so that stopping it stops the `dd` it is running too (a
    // surviving `dd` would hold the mapping open and make the detach below busy).
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while :; do for p in {a} {b}; do dd if=$p of={m} bs=64k oflag=direct conv=notrunc \
             status=none || exit 1; done; done",
            a = a.display(),
            b = b.display(),
            m = mapper.display()
        ))
        .process_group(0)
        .spawn()
        .unwrap();
    let mut changed = 0;
    for run in 0..3 {
        let (code, r, err) = run_verify(bin, &cfg, &v.volume_id(), "--full");
        assert_eq!(code, 0, "run {run}: {err} {r}");
        assert_eq!(r["mismatch_count"].as_u64(), Some(0), "run {run}: {r}");
        assert_eq!(r["verdict"], "agree", "run {run}: {r}");
        changed += r["changed_during_verify"].as_u64().unwrap();
    }
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the writer stopped: the test did not write during the verifies"
    );
    let group = nix::unistd::Pid::from_raw(-i32::try_from(writer.id()).unwrap());
    nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = writer.wait();
    eprintln!(
        "verify under a writer: 3 full runs agree, {changed} sector(s) changed during verify"
    );
    volume::detach(&v.ctx(&k), &v.volume_id(), None).unwrap();
}

/// `volcrypt verify VOLUME_ID` as an operator runs it (the CLI with a config file) for a
/// volume the engine attached; returns (exit code, JSON report or Null, stderr).
fn run_verify(
    bin: &str,
    cfg: &Path,
    volume_id: &str,
    args: &str,
) -> (i32, serde_json::Value, String) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{bin} verify {volume_id} {args} --config {}",
            cfg.display()
        ))
        .output()
        .unwrap();
    let json = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (
        o.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Writes `data` to `dev` at `offset` with O_DIRECT (behind dm-crypt's back when `dev` is the
/// backing device), then drops the page cache so nothing stale is served.
fn write_direct(dev: &Path, offset: u64, data: &[u8]) {
    let tmp = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    std::fs::write(tmp.path(), data).unwrap();
    sh(&format!(
        "dd if={} of={} bs=512 seek={} oflag=direct conv=notrunc status=none && sync && echo 3 > /proc/sys/vm/drop_caches",
        tmp.path().display(),
        dev.display(),
        offset / 512
    ));
}

/// Replaces the live table of `v`'s mapping (test-only: the table holds the key and is never
/// printed) so that the `ss`-byte sector at mapping byte `at` is decrypted with the IV of the
/// sector after it; returns the original table. A LUKS2 table names a keyring key, which is
/// gone after activation: the hex volume key then comes from `cryptsetup luksDump
/// --dump-volume-key` with sym-1's passphrase.
fn skew_one_sector(v: &Vol, at: u64, ss: u64) -> String {
    let table = sh(&format!("dmsetup table --showkeys {}", v.name));
    let f: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(f[2], "crypt", "one crypt target expected");
    let len: u64 = f[1].parse().unwrap();
    let (cipher, iv, dev, off): (&str, u64, &str, u64) =
        (f[3], f[5].parse().unwrap(), f[6], f[7].parse().unwrap());
    let rest = f[8..].join(" ");
    let key = if f[4].starts_with(':') {
        let pass = v.dir.path().join("sym1pass");
        std::fs::write(&pass, hex(&(0u8..32).collect::<Vec<u8>>())).unwrap();
        let dump = sh(&format!(
            "cryptsetup luksDump --dump-volume-key --batch-mode --key-file {} {}",
            pass.display(),
            v.loopdev.display()
        ));
        let tail = dump.split("MK dump:").nth(1).expect("MK dump in luksDump");
        tail.split_whitespace()
            .take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
            .collect::<String>()
    } else {
        f[4].to_owned()
    };
    let (a, n) = (at / 512, ss / 512);
    let line = |start: u64, count: u64, iv: u64, off: u64| {
        format!("{start} {count} crypt {cipher} {key} {iv} {dev} {off} {rest}\n")
    };
    let skewed = line(0, a, iv, off)
        + &line(a, n, iv + a + n, off + a)
        + &line(a + n, len - a - n, iv + a + n, off + a + n);
    load_table(&v.name, &skewed);
    line(0, len, iv, off)
}

/// Loads `table` into mapping `name` and resumes it.
fn load_table(name: &str, table: &str) {
    let out = sh_in(
        &format!("dmsetup reload {name} && dmsetup resume {name}"),
        table.as_bytes(),
    );
    assert!(
        out.status.success(),
        "dmsetup reload/resume {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// verify: what the kernel wrote through the mapping decrypts in userspace to what the mapping
/// shows (LUKS1, LUKS2 with 512- and 4096-byte sectors, plain), fully and sampled; a sector
/// the kernel decrypts wrongly is found at exactly its offsets (exit 6); a zeroed (discarded) region is reported as unwritten, not as corruption;
/// a key that no longer opens the header is "cannot verify" (exit 7), never a mismatch.
#[test]
#[ignore = "needs dm-crypt: runs in the VM stage (tests/vm/attach-suite.sh)"]
fn verify_agrees_with_the_kernel_and_finds_a_wrongly_decrypted_sector() {
    need::require_dm_crypt();
    let bin = env!("CARGO_BIN_EXE_volcrypt");
    let k = keys();
    for (provider, ss) in [
        ("luks", 512u64),
        ("luks2", 512),
        ("luks2", 4096),
        ("plain", 512),
    ] {
        // LUKS2 headers take 16 MiB: 24 MiB leaves 8 MiB of data.
        let v = Vol::new(&format!("ver{provider}{ss}"), 24);
        let (cfg, _) = cli_files(&v, &k, &format!("luks2_sector_size = {ss}\n"));
        let mut ctx = v.ctx(&k);
        ctx.config.luks2_sector_size = ss as u32;
        volume::attach(&ctx, &v.request(provider, "sym-1", "", "")).unwrap();
        let size: u64 = sh(&format!("blockdev --getsize64 {}", v.mapper().display()))
            .trim()
            .parse()
            .unwrap();
        write_at(&v.mapper(), 0, &pattern(31, size as usize));
        let what = format!("{provider}/{ss}");

        let (code, r, err) = run_verify(bin, &cfg, &v.volume_id(), "--full");
        assert_eq!(code, 0, "{what}: {err} {r}");
        assert_eq!(r["verdict"], "agree", "{what}: {r}");
        assert_eq!(r["sector_size"].as_u64(), Some(ss), "{what}: {r}");
        assert_eq!(r["bytes_checked"].as_u64(), Some(size), "{what}: {r}");
        assert_eq!(r["unwritten_sectors"].as_u64(), Some(0), "{what}: {r}");
        let data_offset = r["data_offset"].as_u64().unwrap();
        let (code, r, err) = run_verify(bin, &cfg, &v.volume_id(), "--sample 50");
        assert_eq!(code, 0, "{what}: {err}");
        assert_eq!(r["sectors_checked"].as_u64(), Some(50), "{what}: {r}");

        // The kernel decrypts one sector wrongly (its table is reloaded so that sector uses its
        // neighbour's IV, as a faulty cipher driver would): verify finds exactly that sector.
        // (Ciphertext changed on the disk is a different matter: the kernel and the engine then
        // decrypt the same changed bytes and agree; `image verify --plaintext` covers that.)
        let sector = size / ss / 2 + 1;
        let original = skew_one_sector(&v, sector * ss, ss);
        // 2 MiB around it (a full pass per volume above is enough under emulation).
        let around = format!("--range {}:{}", sector * ss - (1 << 20), 2u64 << 20);
        let (code, r, err) = run_verify(bin, &cfg, &v.volume_id(), &around);
        assert_eq!(
            code, 6,
            "{what}: the wrongly decrypted sector was not found: {err} {r}"
        );
        assert_eq!(r["mismatch_count"].as_u64(), Some(1), "{what}: {r}");
        assert_eq!(
            r["mismatches"][0]["mapping_offset"].as_u64(),
            Some(sector * ss)
        );
        assert_eq!(
            r["mismatches"][0]["backing_offset"].as_u64(),
            Some(data_offset + sector * ss)
        );
        assert!(
            err.contains(&format!("mapping byte {}", sector * ss)),
            "{what}: {err}"
        );
        let (code, _, err) = run_verify(
            bin,
            &cfg,
            &v.volume_id(),
            &format!("--range {}:{ss}", sector * ss),
        );
        assert_eq!(code, 6, "{what}: {err}");
        load_table(&v.name, &original);
        let (code, _, err) = run_verify(bin, &cfg, &v.volume_id(), &around);
        assert_eq!(code, 0, "{what}: after restoring the table: {err}");

        // A zeroed region (what a discard leaves on thin storage) is unwritten, not corrupt.
        let zeroed = 16 * 1024u64;
        write_direct(
            &v.loopdev,
            data_offset + 4 * ss,
            &vec![0u8; zeroed as usize],
        );
        let (code, r, err) = run_verify(
            bin,
            &cfg,
            &v.volume_id(),
            &format!("--range {}:{}", 4 * ss, zeroed + 2 * ss),
        );
        assert_eq!(code, 0, "{what}: {err} {r}");
        assert_eq!(
            r["unwritten_sectors"].as_u64(),
            Some(zeroed / ss),
            "{what}: {r}"
        );

        if provider == "luks2" && ss == 512 {
            // Someone else rekeyed the volume: the key in the key manager opens nothing now.
            sh(&format!(
                "printf 'other passphrase' > {dir}/newpass && printf '%s' {old} > {dir}/oldpass && \
                 cryptsetup luksAddKey --batch-mode --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
                 --key-file {dir}/oldpass {dev} {dir}/newpass && \
                 cryptsetup luksKillSlot --batch-mode --key-file {dir}/newpass {dev} 0",
                dir = v.dir.path().display(),
                old = hex(&(0u8..32).collect::<Vec<u8>>()),
                dev = v.loopdev.display()
            ));
            let (code, r, err) = run_verify(bin, &cfg, &v.volume_id(), "");
            assert_eq!(code, 7, "{what}: rekeyed volume: {err} {r}");
            assert!(
                err.contains("cannot verify") && err.contains("sym-1"),
                "{err}"
            );
        }
        volume::detach(&ctx, &v.volume_id(), None).unwrap();
    }
}
