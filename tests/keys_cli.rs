//! `volcrypt keystore add|list|remove|show-meta` as an operator runs it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use volcrypt::keys::{KeyManager, Keystore};
use volcrypt::secret::SecretType;

fn volcrypt(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_volcrypt"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn operator_round_trip_never_prints_the_payload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let d = dir.to_str().unwrap();
    let secret_pw = "Tr0ub4dor&3-unique-marker";

    let o = volcrypt(
        &[
            "keystore",
            "--dir",
            d,
            "add",
            "vol-pw",
            "--type",
            "passphrase",
            "--file",
            "-",
        ],
        format!("{secret_pw}\n").as_bytes(),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains(secret_pw));

    let o = volcrypt(
        &[
            "keystore",
            "--dir",
            d,
            "add",
            "vol-sym",
            "--type",
            "symmetric",
            "--encoding",
            "hex",
            "--file",
            "-",
        ],
        b"DEADbeef00\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    let key_file = tmp.path().join("k.b64");
    std::fs::write(&key_file, "AAEC\n").unwrap();
    let o = volcrypt(
        &[
            "keystore",
            "--dir",
            d,
            "add",
            "vol-b64",
            "--type",
            "opaque",
            "--encoding",
            "base64",
            "--file",
            key_file.to_str().unwrap(),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o));

    // What the agent will read back.
    let ks = Keystore::open(&dir).unwrap();
    assert_eq!(
        ks.get("vol-pw").unwrap().passphrase().expose(),
        format!("{secret_pw}\n").as_bytes(),
        "newline kept by default"
    );
    assert_eq!(
        ks.get("vol-sym").unwrap().passphrase().expose(),
        b"deadbeef00"
    );
    assert_eq!(ks.get("vol-b64").unwrap().payload.expose(), &[0, 1, 2]);

    let o = volcrypt(&["keystore", "--dir", d, "list"], b"");
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vol-b64\topaque\nvol-pw\tpassphrase\nvol-sym\tsymmetric\n"
    );
    let o = volcrypt(
        &["keystore", "--dir", d, "show-meta", "vol-pw", "--json"],
        b"",
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["secret_type"], "passphrase");
    assert_eq!(v["derivation"], "raw");
    assert_eq!(v["payload_bytes"], secret_pw.len() + 1);
    assert!(!text(&o).contains(secret_pw));
    let o = volcrypt(&["keystore", "--dir", d, "show-meta", "vol-sym"], b"");
    assert!(text(&o).contains("lowercase-hex"), "{}", text(&o));
    assert!(!text(&o).contains("deadbeef"), "{}", text(&o));

    // Duplicate add: exit 5, secret unchanged; --replace swaps it.
    let o = volcrypt(
        &[
            "keystore",
            "--dir",
            d,
            "add",
            "vol-pw",
            "--type",
            "passphrase",
            "--file",
            "-",
            "--trim-newline",
        ],
        b"other\n",
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let o = volcrypt(
        &[
            "keystore",
            "--dir",
            d,
            "add",
            "vol-pw",
            "--type",
            "passphrase",
            "--file",
            "-",
            "--trim-newline",
            "--replace",
        ],
        b"other\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ks.get("vol-pw").unwrap().payload.expose(), b"other");
    assert_eq!(
        ks.get("vol-pw").unwrap().secret_type,
        SecretType::Passphrase
    );

    let o = volcrypt(&["keystore", "--dir", d, "remove", "vol-pw"], b"");
    assert!(o.status.success());
    let o = volcrypt(&["keystore", "--dir", d, "remove", "vol-pw"], b"");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = volcrypt(&["keystore", "--dir", d, "show-meta", "vol-pw"], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("vol-pw"));
    assert_eq!(ks.list().unwrap().len(), 2);
    ks.health().unwrap();
}

#[test]
fn bad_input_is_refused_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let d = dir.to_str().unwrap();
    for (args, stdin) in [
        (
            vec!["add", "../x", "--type", "opaque", "--file", "-"],
            &b"k"[..],
        ),
        (vec!["add", "x", "--type", "aes", "--file", "-"], b"k"),
        (
            vec![
                "add",
                "x",
                "--type",
                "symmetric",
                "--encoding",
                "hex",
                "--file",
                "-",
            ],
            b"s3cr3tzz",
        ),
        (vec!["add", "x", "--type", "symmetric", "--file", "-"], b""),
        (
            vec![
                "add",
                "x",
                "--type",
                "symmetric",
                "--file",
                "/nonexistent/key",
            ],
            b"",
        ),
    ] {
        let mut all = vec!["keystore", "--dir", d];
        all.extend(&args);
        let o = volcrypt(&all, stdin);
        assert!(!o.status.success(), "{args:?}: {}", text(&o));
        assert!(!text(&o).contains("s3cr3t"), "{}", text(&o));
    }
    assert!(!dir.join("x").exists());
    // Oversized payloads are refused before anything is written.
    let o = volcrypt(
        &[
            "keystore", "--dir", d, "add", "big", "--type", "opaque", "--file", "-",
        ],
        &vec![1u8; 70 * 1024],
    );
    assert!(!o.status.success());
    assert!(!dir.join("big").exists());
}

#[test]
fn the_directory_comes_from_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("from-config");
    let cfg = tmp.path().join("volcrypt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[key_manager.keystore]\ndir = {:?}\n",
            dir.to_str().unwrap()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let o = volcrypt(
        &[
            "keystore", "--config", c, "add", "k", "--type", "opaque", "--file", "-",
        ],
        b"abc",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(dir.join("k").is_file());
    let o = volcrypt(&["keystore", "--config", c, "list"], b"");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "k\topaque\n");
}
