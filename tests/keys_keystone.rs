//! Keystone v3 authentication of the Barbican client: request bodies, token caching and
//! renewal, re-authentication after a 401, endpoint lookup in the catalog.
//!
//! No Keystone runs here, so a small scripted HTTP server plays Keystone's token API and a
//! token-checking secret store. What it proves is the client's side of the protocol (which
//! requests, how often, with which token); the body shapes are checked against the Keystone v3
//! API reference's examples.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use volcrypt::config::{BarbicanAuth, BarbicanConfig, Config};
use volcrypt::keys::{Barbican, Error, KeyManager};
use volcrypt::secret::SecretType;

#[derive(Default)]
struct State {
    auth_bodies: Vec<serde_json::Value>,
    issued: u32,
    revoked: HashSet<String>,
    seen_tokens: Vec<String>,
    /// Seconds of token lifetime handed out.
    lifetime_s: i64,
    /// Answer auth requests with 401.
    refuse_auth: bool,
}

struct Server {
    url: String,
    state: Arc<Mutex<State>>,
}

fn iso(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{secs}"),
            "+%Y-%m-%dT%H:%M:%S.000000Z",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn server(lifetime_s: i64) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let state = Arc::new(Mutex::new(State {
        lifetime_s,
        ..State::default()
    }));
    let (st, base) = (state.clone(), url.clone());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { break };
            let (st, base) = (st.clone(), base.clone());
            std::thread::spawn(move || handle(conn, &st, &base));
        }
    });
    Server { url, state }
}

fn handle(conn: std::net::TcpStream, st: &Mutex<State>, base: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            let (k, v) = line.trim_end().split_once(':').unwrap();
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let len: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let mut parts = request_line.split(' ');
        let (method, path) = (parts.next().unwrap(), parts.next().unwrap());

        let mut extra = String::new();
        let (status, resp_body): (u16, Vec<u8>) = {
            let mut s = st.lock().unwrap();
            if method == "POST" && path == "/identity/v3/auth/tokens" {
                s.auth_bodies.push(serde_json::from_slice(&body).unwrap());
                if s.refuse_auth {
                    (401, br#"{"error": {"code": 401, "message": "The request you have made requires authentication."}}"#.to_vec())
                } else {
                    s.issued += 1;
                    extra = format!("X-Subject-Token: tok-{}\r\n", s.issued);
                    let expires = std::time::SystemTime::now()
                        + std::time::Duration::from_secs(s.lifetime_s.max(0) as u64);
                    let doc = serde_json::json!({"token": {
                    "expires_at": iso(expires),
                    "catalog": [
                        {"type": "identity", "endpoints": [{"interface": "public", "url": "http://wrong", "region_id": "RegionOne"}]},
                        {"type": "key-manager", "endpoints": [
                            {"interface": "internal", "url": "http://wrong-interface", "region_id": "RegionOne"},
                            {"interface": "public", "url": "http://wrong-region", "region_id": "RegionTwo"},
                            {"interface": "public", "url": format!("{base}/"), "region_id": "RegionOne"}
                        ]}
                    ]}});
                    (201, doc.to_string().into_bytes())
                }
            } else if method == "GET" && path.starts_with("/v1/secrets/") {
                let token = header("x-auth-token").unwrap_or_default();
                s.seen_tokens.push(token.clone());
                if !token.starts_with("tok-") || s.revoked.contains(&token) {
                    (401, br#"{"code": 401, "title": "Unauthorized"}"#.to_vec())
                } else if path.ends_with("/payload") {
                    assert_eq!(
                        header("accept").as_deref(),
                        Some("application/octet-stream")
                    );
                    (200, vec![0xab, 0x01])
                } else {
                    let doc = serde_json::json!({"secret_type": "symmetric", "status": "ACTIVE",
                        "content_types": {"default": "application/octet-stream"}});
                    (200, doc.to_string().into_bytes())
                }
            } else {
                (404, b"{}".to_vec())
            }
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status} X\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            resp_body.len()
        );
        let _ = conn.write_all(&resp_body);
    }
}

fn barbican_cfg(auth_toml: &str, endpoint: Option<&str>) -> BarbicanConfig {
    let text = format!(
        "[key_manager.barbican]\nretries = 0\nregion = \"RegionOne\"\n{}[key_manager.barbican.auth]\n{auth_toml}\n",
        endpoint
            .map(|e| format!("endpoint = \"{e}\"\n"))
            .unwrap_or_default()
    );
    Config::from_toml(&text, "t").unwrap().key_manager.barbican
}

fn password_auth(url: &str) -> String {
    format!(
        "method = \"password\"\nauth_url = \"{url}/identity/v3\"\nusername = \"volcrypt\"\n\
         password = \"pa55-unique-marker\"\nproject_name = \"service\"\nproject_domain_name = \"Default\"\n"
    )
}

#[test]
fn password_auth_caches_the_token_and_finds_barbican_in_the_catalog() {
    let s = server(3600);
    let b = Barbican::from_config(&barbican_cfg(&password_auth(&s.url), None)).unwrap();
    for _ in 0..3 {
        let secret = b.get("k1").unwrap();
        assert_eq!(secret.secret_type, SecretType::Symmetric);
        assert_eq!(secret.passphrase().expose(), b"ab01");
    }
    let st = s.state.lock().unwrap();
    assert_eq!(st.issued, 1, "token not cached");
    assert_eq!(st.seen_tokens.len(), 6);
    assert!(st.seen_tokens.iter().all(|t| t == "tok-1"));
    // The body of the Keystone v3 API reference's "password, project-scoped" example.
    assert_eq!(
        st.auth_bodies[0],
        serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "volcrypt", "domain": {"name": "Default"}, "password": "pa55-unique-marker"}}},
            "scope": {"project": {"name": "service", "domain": {"name": "Default"}}}}})
    );
}

#[test]
fn a_revoked_token_is_replaced_once_after_a_401() {
    let s = server(3600);
    let b = Barbican::from_config(&barbican_cfg(&password_auth(&s.url), Some(&s.url))).unwrap();
    b.get("k1").unwrap();
    s.state.lock().unwrap().revoked.insert("tok-1".into());
    b.get("k1").unwrap();
    {
        let st = s.state.lock().unwrap();
        assert_eq!(st.issued, 2);
        assert_eq!(
            st.seen_tokens,
            ["tok-1", "tok-1", "tok-1", "tok-2", "tok-2"],
            "expected one 401 then the fresh token"
        );
    }
    // If even the fresh token is refused, the error is Auth, after exactly one re-auth.
    {
        let mut st = s.state.lock().unwrap();
        st.revoked.insert("tok-2".into());
        st.revoked.insert("tok-3".into());
    }
    let err = b.get("k1").unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert_eq!(s.state.lock().unwrap().issued, 3);
}

#[test]
fn short_lived_tokens_are_renewed_before_they_expire() {
    // Lifetime 0 s: already inside the renewal margin, so every request re-authenticates.
    let s = server(0);
    let b = Barbican::from_config(&barbican_cfg(&password_auth(&s.url), Some(&s.url))).unwrap();
    b.get("k1").unwrap();
    b.get("k1").unwrap();
    assert_eq!(
        s.state.lock().unwrap().issued,
        4,
        "one token per request pair expected"
    );
}

#[test]
fn application_credentials_and_refused_auth() {
    let s = server(3600);
    let auth = format!(
        "method = \"application-credential\"\nauth_url = \"{}/identity\"\n\
         application_credential_id = \"423f19a4ac1e4f48bbb4180756e6eb6c\"\n\
         application_credential_secret = \"appcred-unique-marker\"\n",
        s.url
    );
    let b = Barbican::from_config(&barbican_cfg(&auth, Some(&s.url))).unwrap();
    b.health().unwrap_err(); // our scripted server has no secret list; only the auth matters
    b.get("k1").unwrap();
    {
        let st = s.state.lock().unwrap();
        assert_eq!(
            st.auth_bodies[0],
            serde_json::json!({"auth": {"identity": {"methods": ["application_credential"],
                "application_credential": {"id": "423f19a4ac1e4f48bbb4180756e6eb6c",
                                           "secret": "appcred-unique-marker"}}}})
        );
    }
    s.state.lock().unwrap().refuse_auth = true;
    let b = Barbican::from_config(&barbican_cfg(&password_auth(&s.url), Some(&s.url))).unwrap();
    let err = b.get("k1").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Auth { .. }), "{text}");
    assert!(
        text.contains("401") && text.contains("requires authentication"),
        "{text}"
    );
    assert!(
        !text.contains("pa55-unique-marker"),
        "password leaked: {text}"
    );
    assert_eq!(volcrypt::error::ExitStatus::from(err.kind()).code(), 2);
}

#[test]
fn a_catalog_without_the_wanted_endpoint_is_a_config_error() {
    let s = server(3600);
    let mut cfg = barbican_cfg(&password_auth(&s.url), None);
    cfg.region = Some("RegionThree".into());
    let b = Barbican::from_config(&cfg).unwrap();
    let err = b.get("k1").unwrap_err();
    assert!(
        matches!(&err, Error::Config { field, .. } if field == "key_manager.barbican.endpoint"),
        "{err}"
    );
    assert!(err.to_string().contains("RegionThree"), "{err}");
    assert!(matches!(cfg.auth, Some(BarbicanAuth::Password(_))));
}
