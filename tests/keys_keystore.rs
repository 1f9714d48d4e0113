//! The local keystore: permissions, atomic writes, id validation, file format.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use volcrypt::keys::{Error, KeyManager, Keystore, Secret};
use volcrypt::secret::{SecretBytes, SecretType};

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn secret(t: SecretType, b: &[u8]) -> Secret {
    Secret::new(t, SecretBytes::new(b.to_vec()))
}

fn new_store() -> (tempfile::TempDir, Keystore) {
    let tmp = tempfile::tempdir().unwrap();
    let ks = Keystore::create(tmp.path().join("a/b/keys")).unwrap();
    (tmp, ks)
}

#[test]
fn create_makes_a_private_directory_and_private_files() {
    let (_tmp, ks) = new_store();
    assert_eq!(mode(ks.dir()), 0o700);
    ks.put("vol-1", &secret(SecretType::Symmetric, &[1, 2, 3]))
        .unwrap();
    assert_eq!(mode(&ks.dir().join("vol-1")), 0o600);
    // create on an existing, private directory just opens it.
    let again = Keystore::create(ks.dir()).unwrap();
    assert_eq!(again.list().unwrap().len(), 1);
}

#[test]
fn every_secret_type_round_trips_byte_for_byte() {
    let (_tmp, ks) = new_store();
    let payloads: [(&str, SecretType, &[u8]); 4] = [
        ("sym", SecretType::Symmetric, &[0x00, 0x0a, 0xff, b'\n', 0]),
        ("pass", SecretType::Passphrase, b"s3cret\n"),
        ("opaque", SecretType::Opaque, b""),
        ("priv", SecretType::Private, &[0x0a; 300]),
    ];
    for (id, t, p) in &payloads {
        ks.put(id, &secret(t.clone(), p)).unwrap();
    }
    for (id, t, p) in &payloads {
        let s = ks.get(id).unwrap();
        assert_eq!(&s.secret_type, t, "{id}");
        assert_eq!(s.payload.expose(), *p, "{id}");
    }
    assert_eq!(ks.get("pass").unwrap().passphrase().expose(), b"s3cret\n");
    assert_eq!(ks.get("sym").unwrap().passphrase().expose(), b"000aff0a00");
    assert_eq!(
        ks.list().unwrap(),
        vec![
            ("opaque".to_string(), SecretType::Opaque),
            ("pass".to_string(), SecretType::Passphrase),
            ("priv".to_string(), SecretType::Private),
            ("sym".to_string(), SecretType::Symmetric),
        ]
    );
    assert_eq!(ks.meta("priv").unwrap(), (SecretType::Private, 300));
    assert_eq!(ks.kind(), "keystore");
    ks.health().unwrap();
}

#[test]
fn the_file_format_is_a_header_line_then_raw_bytes() {
    let (_tmp, ks) = new_store();
    ks.put("k", &secret(SecretType::Passphrase, b"pw\n"))
        .unwrap();
    assert_eq!(
        fs::read(ks.dir().join("k")).unwrap(),
        b"volcrypt-secret 1 passphrase\npw\n"
    );
    // A hand-written file in that format is read back.
    let p = ks.dir().join("manual");
    fs::write(&p, b"volcrypt-secret 1 symmetric\n\x01\x02").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(ks.get("manual").unwrap().passphrase().expose(), b"0102");
}

#[test]
fn missing_and_duplicate_secrets() {
    let (_tmp, ks) = new_store();
    let err = ks.get("nope").unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { key_id, .. } if key_id == "nope"),
        "{err}"
    );
    assert_eq!(volcrypt::error::ExitStatus::from(err.kind()).code(), 2);
    assert!(matches!(ks.remove("nope"), Err(Error::NotFound { .. })));
    ks.add("k", &secret(SecretType::Opaque, b"1")).unwrap();
    let err = ks.add("k", &secret(SecretType::Opaque, b"2")).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert_eq!(ks.get("k").unwrap().payload.expose(), b"1");
    ks.remove("k").unwrap();
    assert!(!ks.contains("k").unwrap());
    assert!(ks.list().unwrap().is_empty());
}

#[test]
fn a_directory_open_to_group_or_others_is_refused() {
    let (_tmp, ks) = new_store();
    ks.put("k", &secret(SecretType::Opaque, b"x")).unwrap();
    for m in [0o750, 0o705, 0o770, 0o701] {
        fs::set_permissions(ks.dir(), fs::Permissions::from_mode(m)).unwrap();
        let err = Keystore::open(ks.dir()).unwrap_err();
        match &err {
            Error::InsecurePermissions { path, mode } => {
                assert_eq!(path, ks.dir());
                assert_eq!(*mode, m);
            }
            other => panic!("expected InsecurePermissions, got {other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&ks.dir().display().to_string()), "{text}");
        assert!(text.contains(&format!("{m:04o}")), "{text}");
        // An already opened store re-checks on every operation.
        assert!(matches!(
            ks.get("k"),
            Err(Error::InsecurePermissions { .. })
        ));
        assert!(matches!(ks.list(), Err(Error::InsecurePermissions { .. })));
        assert!(matches!(
            ks.health(),
            Err(Error::InsecurePermissions { .. })
        ));
        assert!(matches!(
            ks.put("k2", &secret(SecretType::Opaque, b"y")),
            Err(Error::InsecurePermissions { .. })
        ));
        // create does not silently chmod an existing directory.
        assert!(Keystore::create(ks.dir()).is_err());
        assert_eq!(mode(ks.dir()), m);
    }
    fs::set_permissions(ks.dir(), fs::Permissions::from_mode(0o700)).unwrap();
    assert!(!ks.contains("k2").unwrap());
}

#[test]
fn a_secret_file_open_to_group_or_others_is_refused() {
    let (_tmp, ks) = new_store();
    ks.put("k", &secret(SecretType::Opaque, b"x")).unwrap();
    let p = ks.dir().join("k");
    for m in [0o640, 0o604, 0o644, 0o660] {
        fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
        let err = ks.get("k").unwrap_err();
        assert!(
            matches!(&err, Error::InsecurePermissions { path, mode } if *path == p && *mode == m),
            "{err}"
        );
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        assert!(ks.list().is_err());
    }
}

#[test]
fn key_ids_cannot_escape_the_directory() {
    let (tmp, ks) = new_store();
    let s = secret(SecretType::Opaque, b"x");
    for bad in [
        "../escape",
        "..",
        ".",
        "a/b",
        "/etc/passwd",
        ".hidden",
        "",
        &"z".repeat(129),
        "sp ace",
    ] {
        assert!(
            matches!(ks.put(bad, &s), Err(Error::InvalidKeyId { .. })),
            "{bad:?}"
        );
        assert!(
            matches!(ks.get(bad), Err(Error::InvalidKeyId { .. })),
            "{bad:?}"
        );
        assert!(matches!(ks.remove(bad), Err(Error::InvalidKeyId { .. })));
    }
    assert!(!tmp.path().join("a/b/escape").exists());
    assert!(fs::read_dir(ks.dir()).unwrap().next().is_none());
    // The longest allowed id works.
    ks.put(&"z".repeat(128), &s).unwrap();
}

#[test]
fn symlinks_corrupt_and_oversized_files_are_refused() {
    let (tmp, ks) = new_store();
    let outside = tmp.path().join("outside");
    fs::write(&outside, b"volcrypt-secret 1 opaque\nx").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&outside, ks.dir().join("link")).unwrap();
    let err = ks.get("link").unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");

    for (name, content) in [
        ("nohdr", &b"just bytes"[..]),
        ("badmagic", b"something 1 opaque\nx"),
        ("badver", b"volcrypt-secret 2 opaque\nx"),
        ("badtype", b"volcrypt-secret 1 aes\nx"),
    ] {
        let p = ks.dir().join(name);
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let err = ks.get(name).unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{name}: {err}");
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        fs::remove_file(&p).unwrap();
    }
    let big = ks.dir().join("big");
    let mut data = b"volcrypt-secret 1 opaque\n".to_vec();
    data.resize(70 * 1024, 7);
    fs::write(&big, &data).unwrap();
    fs::set_permissions(&big, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(ks.get("big").unwrap_err().to_string().contains("64 KiB"));
    // And put refuses to write one.
    assert!(
        ks.put("big2", &secret(SecretType::Opaque, &vec![0; 65 * 1024]))
            .is_err()
    );
    assert!(!ks.dir().join("big2").exists());
}

#[test]
fn writes_are_atomic_and_leave_no_temporaries() {
    let (_tmp, ks) = new_store();
    let a = vec![b'a'; 4000];
    let b = vec![b'b'; 9000];
    ks.put("v", &secret(SecretType::Opaque, &a)).unwrap();
    // A stale temporary from a crashed writer is invisible to readers and to list.
    let stale = ks.dir().join(".tmp-v-1-0000000000000000");
    fs::write(&stale, b"volcrypt-secret 1 opaque\npartial").unwrap();
    fs::set_permissions(&stale, fs::Permissions::from_mode(0o600)).unwrap();

    // A reader racing a writer that alternates two payloads always sees one of them whole.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let ks = ks.clone();
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let got = ks.get("v").unwrap();
                let p = got.payload.expose();
                assert!(p == &a[..] || p == &b[..], "torn read of {} bytes", p.len());
                reads += 1;
            }
            reads
        })
    };
    for i in 0..200 {
        let p = if i % 2 == 0 { &b } else { &a };
        ks.put("v", &secret(SecretType::Opaque, p)).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    assert_eq!(ks.get("v").unwrap().payload.expose(), &a[..]);
    assert_eq!(
        ks.list().unwrap(),
        vec![("v".to_string(), SecretType::Opaque)]
    );
    let names: Vec<String> = fs::read_dir(ks.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(
        names,
        vec![".tmp-v-1-0000000000000000", "v"],
        "leftover temporaries"
    );
}

#[test]
fn opening_a_missing_directory_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("none");
    let err = Keystore::open(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains(&missing.display().to_string()));
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        Keystore::open(&file)
            .unwrap_err()
            .to_string()
            .contains("not a directory")
    );
}
