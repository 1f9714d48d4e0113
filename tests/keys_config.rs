//! The TOML configuration: defaults, every auth method, errors that never show secrets.

use std::path::PathBuf;

use volcrypt::config::{
    BarbicanAuth, Config, DEFAULT_KEYSTORE_DIR, Error as ConfigError, KeyManagerBackend,
};
use volcrypt::keys::{self, Error};

#[test]
fn no_config_means_a_local_keystore_with_documented_defaults() {
    for text in ["", "[key_manager]\n", "[key_manager.keystore]\n"] {
        let cfg = Config::from_toml(text, "t").unwrap();
        let km = &cfg.key_manager;
        assert_eq!(km.backend, KeyManagerBackend::Keystore);
        assert_eq!(km.keystore.dir, PathBuf::from("/var/lib/volcrypt/keys"));
        assert_eq!(DEFAULT_KEYSTORE_DIR, "/var/lib/volcrypt/keys");
        assert!(km.keystore.create);
        assert!(km.fixed_key.is_none() && km.fixed_key_file.is_none());
        let b = &km.barbican;
        assert_eq!(b.endpoint, None);
        assert_eq!(b.interface, "public");
        assert_eq!(b.connect_timeout, 5.0);
        assert_eq!(b.read_timeout, 30.0);
        assert_eq!(b.retries, 3);
        assert_eq!(b.backoff_initial, 0.2);
        assert_eq!(b.backoff_max, 5.0);
        assert!(b.auth.is_none() && b.ca_file.is_none());
    }
    let d = Config::default();
    assert_eq!(
        d.key_manager.keystore.dir,
        PathBuf::from(DEFAULT_KEYSTORE_DIR)
    );
}

const PASSWORD_CONFIG: &str = r#"
[key_manager]
backend = "barbican"

[key_manager.barbican]
endpoint = "https://barbican.example:9311/"
ca_file = "/etc/ssl/ca.pem"
connect_timeout = 2.5
read_timeout = 10
retries = 5

[key_manager.barbican.auth]
method = "password"
auth_url = "https://keystone.example:5000/v3"
username = "volcrypt"
password = "hunter2-very-secret"
project_name = "service"
"#;

#[test]
fn barbican_with_keystone_password() {
    let cfg = Config::from_toml(PASSWORD_CONFIG, "t").unwrap();
    let b = &cfg.key_manager.barbican;
    assert_eq!(cfg.key_manager.backend, KeyManagerBackend::Barbican);
    assert_eq!(
        b.endpoint.as_deref(),
        Some("https://barbican.example:9311/")
    );
    assert_eq!(b.connect_timeout, 2.5);
    assert_eq!(b.read_timeout, 10.0);
    assert_eq!(b.retries, 5);
    let Some(BarbicanAuth::Password(p)) = &b.auth else {
        panic!("{:?}", b.auth)
    };
    assert_eq!(p.username.as_deref(), Some("volcrypt"));
    assert_eq!(p.password.expose(), b"hunter2-very-secret");
    assert_eq!(p.project_name.as_deref(), Some("service"));
    // Debug output of the whole config never shows the password.
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("redacted"));
}

#[test]
fn other_auth_methods_parse() {
    let app = r#"
[key_manager.barbican.auth]
method = "application-credential"
auth_url = "http://k:5000"
application_credential_id = "abc123"
application_credential_secret = "s"
"#;
    let cfg = Config::from_toml(app, "t").unwrap();
    assert!(matches!(
        cfg.key_manager.barbican.auth,
        Some(BarbicanAuth::ApplicationCredential(ref a)) if a.application_credential_id.as_deref() == Some("abc123")
    ));
    let tok = "[key_manager.barbican.auth]\nmethod = \"token\"\ntoken = \"gAAAA\"\n";
    assert!(matches!(
        Config::from_toml(tok, "t")
            .unwrap()
            .key_manager
            .barbican
            .auth,
        Some(BarbicanAuth::Token(_))
    ));
    let hdr = "[key_manager.barbican.auth]\nmethod = \"headers\"\nproject_id = \"p1\"\n";
    let cfg = Config::from_toml(hdr, "t").unwrap();
    let Some(BarbicanAuth::Headers(h)) = cfg.key_manager.barbican.auth else {
        panic!()
    };
    assert_eq!((h.project_id.as_str(), h.roles.as_str()), ("p1", "member"));
}

#[test]
fn parse_errors_name_the_line_and_never_echo_secrets() {
    let typo = "[key_manager]\nbackend = \"keystore\"\nfixed_kye = \"00\"\n";
    let err = Config::from_toml(typo, "/etc/volcrypt/volcrypt.toml").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConfigError::Parse { line: 3, .. }), "{text}");
    assert!(
        text.contains("fixed_kye") && text.contains("/etc/volcrypt/volcrypt.toml"),
        "{text}"
    );

    let backend = "[key_manager]\nbackend = \"vault\"\n";
    let text = Config::from_toml(backend, "t").unwrap_err().to_string();
    assert!(
        text.contains("vault") && text.contains("keystore"),
        "{text}"
    );

    let wrong_type = "[key_manager.barbican.auth]\nmethod = \"token\"\ntoken = 1234567\n";
    let text = Config::from_toml(wrong_type, "t").unwrap_err().to_string();
    assert!(!text.contains("1234567"), "secret echoed: {text}");
    assert!(text.contains("value not shown"), "{text}");
    let wrong_type = "[key_manager]\nfixed_key = 1234567\n";
    let text = Config::from_toml(wrong_type, "t").unwrap_err().to_string();
    assert!(!text.contains("1234567"), "secret echoed: {text}");
    assert!(text.contains("line 2"), "{text}");

    let bad_line = "[key_manager]\nfixed_key = \"supersecret-hex\" garbage\n";
    let text = Config::from_toml(bad_line, "t").unwrap_err().to_string();
    assert!(!text.contains("supersecret"), "secret echoed: {text}");

    let unknown_method = "[key_manager.barbican.auth]\nmethod = \"kerberos\"\n";
    assert!(Config::from_toml(unknown_method, "t").is_err());
}

#[test]
fn barbican_settings_are_validated_when_building_the_client() {
    let build = |extra: &str| {
        let text =
            format!("[key_manager]\nbackend = \"barbican\"\n[key_manager.barbican]\n{extra}\n");
        let cfg = Config::from_toml(&text, "t").unwrap();
        keys::from_config(&cfg.key_manager).map(|_| ())
    };
    let hdr = "[key_manager.barbican.auth]\nmethod = \"headers\"\nproject_id = \"p\"";
    build(&format!("endpoint = \"http://127.0.0.1:9311\"\n{hdr}")).unwrap();
    let field_of = |e: Error| match e {
        Error::Config { field, .. } => field,
        other => panic!("{other}"),
    };
    assert_eq!(
        field_of(build("endpoint = \"http://h\"").unwrap_err()),
        "key_manager.barbican.auth"
    );
    assert_eq!(
        field_of(build(hdr).unwrap_err()),
        "key_manager.barbican.endpoint"
    );
    assert_eq!(
        field_of(build(&format!("endpoint = \"ftp://h\"\n{hdr}")).unwrap_err()),
        "key_manager.barbican.endpoint"
    );
    for t in [
        "connect_timeout = 0",
        "read_timeout = -1",
        "backoff_max = 1e9",
    ] {
        let e = build(&format!("endpoint = \"http://h\"\n{t}\n{hdr}")).unwrap_err();
        assert!(field_of(e).ends_with(t.split(' ').next().unwrap()), "{t}");
    }
    // Keystone auth without an endpoint is fine: the catalog provides it (at first use).
    let ks = "[key_manager.barbican.auth]\nmethod = \"password\"\nauth_url = \"http://k/v3\"\n\
              username = \"u\"\npassword = \"p\"\nproject_id = \"x\"";
    build(ks).unwrap();
    let both = "[key_manager.barbican.auth]\nmethod = \"password\"\nauth_url = \"http://k/v3\"\n\
                username = \"u\"\nuser_id = \"1\"\npassword = \"p\"\nproject_id = \"x\"";
    assert_eq!(
        field_of(build(both).unwrap_err()),
        "key_manager.barbican.auth.user"
    );
    let missing_ca = format!("endpoint = \"https://h\"\nca_file = \"/nonexistent/ca.pem\"\n{hdr}");
    assert!(
        build(&missing_ca)
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/ca.pem")
    );
}

#[test]
fn config_files_are_loaded_and_a_missing_explicit_file_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("volcrypt.toml");
    std::fs::write(
        &p,
        "[key_manager.keystore]\ndir = \"/srv/keys\"\ncreate = false\n",
    )
    .unwrap();
    let cfg = Config::load(&p).unwrap();
    assert_eq!(cfg.key_manager.keystore.dir, PathBuf::from("/srv/keys"));
    assert!(!cfg.key_manager.keystore.create);
    let cfg = Config::load_or_default(Some(&p)).unwrap();
    assert!(!cfg.key_manager.keystore.create);
    let missing = tmp.path().join("missing.toml");
    let err = Config::load_or_default(Some(&missing)).unwrap_err();
    assert!(err.to_string().contains("missing.toml"), "{err}");
    assert_eq!(volcrypt::error::ExitStatus::from(err.kind()).code(), 1);
}

#[test]
fn keystore_backend_from_config_creates_the_directory_or_refuses_a_missing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let text = format!(
        "[key_manager.keystore]\ndir = {:?}\ncreate = false\n",
        dir.display().to_string()
    );
    let cfg = Config::from_toml(&text, "t").unwrap();
    assert!(matches!(
        keys::from_config(&cfg.key_manager),
        Err(Error::Io { .. })
    ));
    let text = format!(
        "[key_manager.keystore]\ndir = {:?}\n",
        dir.display().to_string()
    );
    let cfg = Config::from_toml(&text, "t").unwrap();
    let km = keys::from_config(&cfg.key_manager).unwrap();
    assert_eq!(km.kind(), "keystore");
    assert!(dir.is_dir());
}
