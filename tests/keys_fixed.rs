//! Cinder's fixed_key compatibility, alone and in front of the keystore.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use volcrypt::config::Config;
use volcrypt::keys::{self, Error, FIXED_KEY_ID, FixedKey, Keystore, Secret};
use volcrypt::secret::{SecretBytes, SecretType};

// Upper-case on purpose: Cinder accepts either case; os-brick's passphrase is the lowercase hex
// of the decoded bytes.
const HEX: &str = "0A1B2C3D4E5F60718293A4B5C6D7E8F90A1B2C3D4E5F60718293A4B5C6D7E8F9";

#[test]
fn all_zero_id_gives_the_fixed_key_as_a_symmetric_secret() {
    let cfg = Config::from_toml(
        &format!("[key_manager]\nbackend = \"fixed-key\"\nfixed_key = \"{HEX}\"\n"),
        "t",
    )
    .unwrap();
    let km = keys::from_config(&cfg.key_manager).unwrap();
    assert_eq!(km.kind(), "fixed-key");
    let s = km.get(FIXED_KEY_ID).unwrap();
    assert_eq!(s.secret_type, SecretType::Symmetric);
    assert_eq!(s.payload.len(), 32);
    assert_eq!(s.payload.expose()[..3], [0x0a, 0x1b, 0x2c]);
    assert_eq!(s.passphrase().expose(), HEX.to_ascii_lowercase().as_bytes());
    km.health().unwrap();
    // Alone it knows nothing else (Cinder's ConfKeyManager).
    let err = km.get("3e1b2c4d-0000-4000-8000-000000000001").unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("3e1b2c4d-0000-4000-8000-000000000001")
    );
}

#[test]
fn fixed_key_in_front_of_the_keystore_answers_only_the_all_zero_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let ks = Keystore::create(&dir).unwrap();
    ks.put(
        "vol-1",
        &Secret::new(SecretType::Passphrase, SecretBytes::new(b"pw".to_vec())),
    )
    .unwrap();
    // A keystore entry named like the all-zero id is shadowed by the fixed key, as castellan's
    // migration manager shadows Barbican.
    ks.put(
        FIXED_KEY_ID,
        &Secret::new(SecretType::Opaque, SecretBytes::new(b"shadowed".to_vec())),
    )
    .unwrap();
    let toml = format!(
        "[key_manager]\nfixed_key = \"{HEX}\"\n[key_manager.keystore]\ndir = {:?}\n",
        dir.display().to_string()
    );
    let km = keys::from_config(&Config::from_toml(&toml, "t").unwrap().key_manager).unwrap();
    assert_eq!(km.get("vol-1").unwrap().passphrase().expose(), b"pw");
    assert_eq!(
        km.get(FIXED_KEY_ID).unwrap().passphrase().expose(),
        HEX.to_ascii_lowercase().as_bytes()
    );
    assert!(matches!(km.get("vol-2"), Err(Error::NotFound { .. })));
    km.health().unwrap();

    let wrapped = FixedKey::new(SecretBytes::new(vec![1]), Some(Box::new(ks)));
    assert_eq!(wrapped.inner_kind(), Some("keystore"));
}

#[test]
fn bad_fixed_keys_are_refused_without_echoing_them() {
    for (bad, why) in [
        ("abc", "odd number"),
        ("zz11", "not a hex digit"),
        ("", "empty"),
        ("0011 223", "not a hex digit"),
    ] {
        let toml = format!("[key_manager]\nbackend = \"fixed-key\"\nfixed_key = \"{bad}\"\n");
        let cfg = Config::from_toml(&toml, "t").unwrap();
        let err = keys::from_config(&cfg.key_manager).err().unwrap();
        let text = err.to_string();
        assert!(
            text.contains("key_manager.fixed_key") && text.contains(why),
            "{text}"
        );
        if !bad.is_empty() {
            assert!(!text.contains(bad), "key echoed: {text}");
        }
    }
    let cfg = Config::from_toml("[key_manager]\nbackend = \"fixed-key\"\n", "t").unwrap();
    let err = keys::from_config(&cfg.key_manager).err().unwrap();
    assert!(err.to_string().contains("fixed_key"), "{err}");
}

#[test]
fn fixed_key_file_must_be_private_and_may_end_with_a_newline() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("fixed_key");
    fs::write(&f, format!("{HEX}\n")).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    let toml = format!(
        "[key_manager]\nbackend = \"fixed-key\"\nfixed_key_file = {:?}\n",
        f.display().to_string()
    );
    let cfg = Config::from_toml(&toml, "t").unwrap();
    let km = keys::from_config(&cfg.key_manager).unwrap();
    assert_eq!(
        km.get(FIXED_KEY_ID).unwrap().passphrase().expose(),
        HEX.to_ascii_lowercase().as_bytes()
    );
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    let err = keys::from_config(&cfg.key_manager).err().unwrap();
    assert!(
        matches!(err, Error::InsecurePermissions { mode: 0o644, .. }),
        "{err}"
    );
    let both = format!("{toml}fixed_key = \"00\"\n");
    let cfg = Config::from_toml(&both, "t").unwrap();
    assert!(keys::from_config(&cfg.key_manager).is_err());
}
