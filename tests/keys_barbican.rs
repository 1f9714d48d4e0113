//! The Barbican client against a real Barbican server (PyPI `barbican`, SQLite, simple_crypto),
//! started by `scripts/barbican-test-server.sh`. Secrets are created through Barbican's REST API
//! the way Cinder (orders and stored symmetric keys), castellan (passphrases) and users (opaque
//! uploads) create them, then fetched through volcrypt's client.
//!
//! Run: `eval "$(scripts/barbican-test-server.sh start)"; cargo test --test keys_barbican`.
//! Without VOLCRYPT_TEST_BARBICAN_URL every test prints a visible "skipped" line and passes.

use std::io::Write;
use std::time::{Duration, Instant};

use base64::Engine;
use volcrypt::config::{BarbicanAuth, BarbicanConfig, HeaderAuth};
use volcrypt::keys::{Barbican, Error, KeyManager};
use volcrypt::secret::SecretType;

fn barbican_url() -> Option<String> {
    match std::env::var("VOLCRYPT_TEST_BARBICAN_URL") {
        Ok(u) if !u.is_empty() => Some(u.trim_end_matches('/').to_string()),
        _ => {
            // Written to the real stderr, not through the test harness's capture.
            let _ = writeln!(
                std::io::stderr(),
                "skipped: VOLCRYPT_TEST_BARBICAN_URL not set (run scripts/barbican-test-server.sh)"
            );
            None
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    b
}

/// A fresh project per test: tests run in parallel and must not see each other's secrets.
fn new_project() -> String {
    let b = random_bytes(8);
    format!("proj-{}", hex(&b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn config(url: &str, project: &str) -> BarbicanConfig {
    BarbicanConfig {
        endpoint: Some(url.to_string()),
        connect_timeout: 2.0,
        read_timeout: 10.0,
        retries: 2,
        backoff_initial: 0.1,
        backoff_max: 1.0,
        auth: Some(BarbicanAuth::Headers(HeaderAuth {
            project_id: project.to_string(),
            roles: "member".into(),
            user_id: None,
        })),
        ..BarbicanConfig::default()
    }
}

fn client(url: &str, project: &str) -> Barbican {
    Barbican::from_config(&config(url, project)).unwrap()
}

/// The Barbican REST API, used directly (as Cinder/castellan/users would) to set up secrets.
struct Rest {
    url: String,
    project: String,
    agent: ureq::Agent,
}

impl Rest {
    fn new(url: &str, project: &str) -> Rest {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Rest {
            url: url.to_string(),
            project: project.to_string(),
            agent,
        }
    }

    fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let mut resp = self
            .agent
            .post(format!("{}{path}", self.url))
            .header("X-Identity-Status", "Confirmed")
            .header("X-Project-Id", &self.project)
            .header("X-Roles", "member")
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .send(body.to_string().as_bytes())
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    fn get(&self, path: &str, accept: &str) -> (u16, Vec<u8>) {
        let mut resp = self
            .agent
            .get(format!("{}{path}", self.url))
            .header("X-Identity-Status", "Confirmed")
            .header("X-Project-Id", &self.project)
            .header("X-Roles", "member")
            .header("Accept", accept)
            .call()
            .unwrap();
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_vec().unwrap(),
        )
    }

    /// POST /v1/secrets; returns the secret id (last segment of secret_ref).
    fn store(&self, body: serde_json::Value) -> String {
        let (status, json) = self.post("/v1/secrets", body);
        assert_eq!(status, 201, "store secret: {json}");
        id_of(json["secret_ref"].as_str().unwrap())
    }
}

fn id_of(secret_ref: &str) -> String {
    secret_ref.rsplit('/').next().unwrap().to_string()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn cinder_symmetric_key_stored_by_castellan_gives_hex_passphrase() {
    let Some(url) = barbican_url() else { return };
    let project = new_project();
    let rest = Rest::new(&url, &project);
    // Make sure a leading zero byte survives: hex must keep "0x" -> "00"/"0a" digits.
    let mut key = random_bytes(32);
    key[0] = 0x0a;
    key[1] = 0x00;
    let id = rest.store(serde_json::json!({
        "name": "volume-8c0f", "secret_type": "symmetric", "algorithm": "aes",
        "bit_length": 256, "mode": "xts",
        "payload": b64(&key), "payload_content_type": "application/octet-stream",
        "payload_content_encoding": "base64",
    }));
    let secret = client(&url, &project).get(&id).unwrap();
    assert_eq!(secret.secret_type, SecretType::Symmetric);
    assert_eq!(secret.payload.expose(), &key[..]);
    let pass = secret.passphrase();
    assert_eq!(pass.expose(), hex(&key).as_bytes());
    assert_eq!(pass.len(), 64);
    assert!(pass.expose().starts_with(b"0a00"));
}

#[test]
fn cinder_volume_key_generated_by_an_order_matches_barbicans_payload() {
    let Some(url) = barbican_url() else { return };
    let project = new_project();
    let rest = Rest::new(&url, &project);
    // Cinder's create_key: castellan asks Barbican to generate an AES-256 key (an order).
    let (status, json) = rest.post(
        "/v1/orders",
        serde_json::json!({"type": "key", "meta": {"name": "volume-key", "algorithm": "aes",
            "bit_length": 256, "mode": "cbc", "payload_content_type": "application/octet-stream"}}),
    );
    assert_eq!(status, 202, "{json}");
    let order_path = format!("/v1/orders/{}", id_of(json["order_ref"].as_str().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let secret_id = loop {
        let (s, body) = rest.get(&order_path, "application/json");
        assert_eq!(s, 200);
        let order: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if order["status"] == "ACTIVE" {
            break id_of(order["secret_ref"].as_str().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "order never became ACTIVE: {order}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Reference: the payload as Barbican serves it to anyone asking directly.
    let (s, reference) = rest.get(
        &format!("/v1/secrets/{secret_id}/payload"),
        "application/octet-stream",
    );
    assert_eq!(s, 200);
    assert_eq!(reference.len(), 32);
    let secret = client(&url, &project).get(&secret_id).unwrap();
    assert_eq!(secret.secret_type, SecretType::Symmetric);
    assert_eq!(secret.payload.expose(), &reference[..]);
    assert_eq!(secret.passphrase().expose(), hex(&reference).as_bytes());
}

#[test]
fn castellan_passphrase_secret_is_used_verbatim() {
    let Some(url) = barbican_url() else { return };
    let project = new_project();
    let rest = Rest::new(&url, &project);
    let text = "correct horse battery staple ✓";
    let id = rest.store(serde_json::json!({
        "name": "image-passphrase", "secret_type": "passphrase",
        "payload": text, "payload_content_type": "text/plain",
    }));
    let secret = client(&url, &project).get(&id).unwrap();
    assert_eq!(secret.secret_type, SecretType::Passphrase);
    assert_eq!(secret.passphrase().expose(), text.as_bytes());
}

#[test]
fn binary_passphrase_keeps_its_trailing_newline() {
    let Some(url) = barbican_url() else { return };
    let project = new_project();
    let rest = Rest::new(&url, &project);
    // Uploaded as octet-stream, every byte round-trips (text/plain would be stripped by
    // Barbican itself); os-brick uses passphrase payloads byte for byte.
    let id = rest.store(serde_json::json!({
        "secret_type": "passphrase", "payload": b64(b"s3cret\n"),
        "payload_content_type": "application/octet-stream", "payload_content_encoding": "base64",
    }));
    let secret = client(&url, &project).get(&id).unwrap();
    assert_eq!(secret.passphrase().expose(), b"s3cret\n");
}

#[test]
fn user_uploaded_opaque_secret_gives_hex_passphrase() {
    let Some(url) = barbican_url() else { return };
    let project = new_project();
    let rest = Rest::new(&url, &project);
    let mut payload = random_bytes(48);
    payload[5] = 0;
    payload[6] = b'\n';
    // No secret_type: Barbican's default is opaque, what `openstack secret store` does.
    let id = rest.store(serde_json::json!({
        "name": "my-image-key", "payload": b64(&payload),
        "payload_content_type": "application/octet-stream", "payload_content_encoding": "base64",
    }));
    let secret = client(&url, &project).get(&id).unwrap();
    assert_eq!(secret.secret_type, SecretType::Opaque);
    assert_eq!(secret.payload.expose(), &payload[..]);
    assert_eq!(secret.passphrase().expose(), hex(&payload).as_bytes());
}

/// With a 3 s initial backoff, any retry of a 4xx would push the call past 3 s.
fn no_retry_config(url: &str, project: &str) -> Barbican {
    let mut cfg = config(url, project);
    cfg.retries = 3;
    cfg.backoff_initial = 3.0;
    cfg.backoff_max = 3.0;
    Barbican::from_config(&cfg).unwrap()
}

#[test]
fn unknown_secret_is_not_found_without_retries() {
    let Some(url) = barbican_url() else { return };
    let project = new_project();
    let id = "3e1b2c4d-0000-4000-8000-00000000dead";
    let t = Instant::now();
    let err = no_retry_config(&url, &project).get(id).unwrap_err();
    let elapsed = t.elapsed();
    assert!(
        matches!(&err, Error::NotFound { key_id, .. } if key_id == id),
        "{err}"
    );
    assert!(err.to_string().contains(id), "{err}");
    assert_eq!(volcrypt::error::ExitStatus::from(err.kind()).code(), 2);
    assert!(
        elapsed < Duration::from_secs(2),
        "took {elapsed:?}: retried a 404?"
    );
}

#[test]
fn another_projects_secret_is_forbidden_without_retries() {
    let Some(url) = barbican_url() else { return };
    let owner = new_project();
    let id = Rest::new(&url, &owner).store(serde_json::json!({
        "secret_type": "symmetric", "algorithm": "aes", "bit_length": 256,
        "payload": b64(&random_bytes(32)), "payload_content_type": "application/octet-stream",
        "payload_content_encoding": "base64",
    }));
    let t = Instant::now();
    let err = no_retry_config(&url, &new_project()).get(&id).unwrap_err();
    let elapsed = t.elapsed();
    assert!(
        matches!(&err, Error::Forbidden { key_id, .. } if *key_id == id),
        "{err}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "took {elapsed:?}: retried a 403?"
    );
    // The owner still reads it.
    assert!(client(&url, &owner).get(&id).is_ok());
}

#[test]
fn secret_without_payload_is_a_clear_error() {
    let Some(url) = barbican_url() else { return };
    let project = new_project();
    // Barbican's two-step upload: metadata first, payload never sent.
    let id = Rest::new(&url, &project).store(serde_json::json!({"name": "no-payload-yet"}));
    let err = client(&url, &project).get(&id).unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("no payload"), "{err}");
    assert!(err.to_string().contains(&id), "{err}");
}

#[test]
fn invalid_key_id_never_reaches_the_server() {
    let Some(url) = barbican_url() else { return };
    let err = client(&url, &new_project()).get("../orders").unwrap_err();
    assert!(matches!(err, Error::InvalidKeyId { .. }), "{err}");
}

#[test]
fn health_reports_a_reachable_server() {
    let Some(url) = barbican_url() else { return };
    let b = client(&url, &new_project());
    assert_eq!(b.kind(), "barbican");
    b.health().unwrap();
}

#[test]
fn a_role_without_secret_access_is_refused() {
    let Some(url) = barbican_url() else { return };
    // The header pipeline with an empty role list: Barbican's policy refuses (403).
    let mut cfg = config(&url, &new_project());
    cfg.auth = Some(BarbicanAuth::Headers(HeaderAuth {
        project_id: new_project(),
        roles: "reader-of-nothing".into(),
        user_id: None,
    }));
    let b = Barbican::from_config(&cfg).unwrap();
    let err = b.health().unwrap_err();
    assert!(
        matches!(err, Error::Forbidden { .. } | Error::Auth { .. }),
        "{err}"
    );
}

#[test]
fn fetch_rate_is_reasonable() {
    let Some(url) = barbican_url() else { return };
    let project = new_project();
    let id = Rest::new(&url, &project).store(serde_json::json!({
        "secret_type": "symmetric", "algorithm": "aes", "bit_length": 256,
        "payload": b64(&random_bytes(32)), "payload_content_type": "application/octet-stream",
        "payload_content_encoding": "base64",
    }));
    let b = client(&url, &project);
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        b.get(&id).unwrap();
    }
    let per = t.elapsed() / n;
    let _ = writeln!(
        std::io::stderr(),
        "barbican: {n} secret fetches (metadata + payload), {per:?} each"
    );
    assert!(per < Duration::from_secs(2), "{per:?} per fetch");
}

/// The HTTPS instance of the test server and its throw-away CA (both set by the script).
fn barbican_tls() -> Option<(String, String)> {
    let url = barbican_url()?;
    match (
        std::env::var("VOLCRYPT_TEST_BARBICAN_TLS_URL"),
        std::env::var("VOLCRYPT_TEST_BARBICAN_CA"),
    ) {
        (Ok(tls), Ok(ca)) if !tls.is_empty() && !ca.is_empty() => {
            let _ = url;
            Some((tls, ca))
        }
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "skipped: VOLCRYPT_TEST_BARBICAN_TLS_URL/VOLCRYPT_TEST_BARBICAN_CA not set \
                 (run scripts/barbican-test-server.sh)"
            );
            None
        }
    }
}

#[test]
fn https_with_the_configured_ca_file() {
    let Some((tls_url, ca)) = barbican_tls() else {
        return;
    };
    let Some(url) = barbican_url() else { return };
    let project = new_project();
    let key = random_bytes(32);
    let id = Rest::new(&url, &project).store(serde_json::json!({
        "secret_type": "symmetric", "algorithm": "aes", "bit_length": 256,
        "payload": b64(&key), "payload_content_type": "application/octet-stream",
        "payload_content_encoding": "base64",
    }));
    let mut cfg = config(&tls_url, &project);
    cfg.ca_file = Some(ca.into());
    let b = Barbican::from_config(&cfg).unwrap();
    b.health().unwrap();
    assert_eq!(
        b.get(&id).unwrap().passphrase().expose(),
        hex(&key).as_bytes()
    );
}

#[test]
fn https_with_an_untrusted_certificate_fails_fast_and_clearly() {
    let Some((tls_url, _ca)) = barbican_tls() else {
        return;
    };
    // System roots (the platform verifier) do not include the test CA.
    let mut cfg = config(&tls_url, &new_project());
    cfg.retries = 3;
    cfg.backoff_initial = 3.0;
    let b = Barbican::from_config(&cfg).unwrap();
    let t = Instant::now();
    let err = b.get("3e1b2c4d-0000-4000-8000-000000000001").unwrap_err();
    let elapsed = t.elapsed();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Unreachable { attempts: 1, .. }),
        "{text}"
    );
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert!(
        elapsed < Duration::from_secs(3),
        "{elapsed:?}: a TLS trust failure was retried"
    );
}
