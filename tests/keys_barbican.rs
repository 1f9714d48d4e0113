//! The Barbican client against a real Barbican server (PyPI `barbican`, SQLite, simple_crypto),
//! started by `scripts/barbican-test-server.sh`. Secrets are created through Barbican's REST API
//! the way Cinder (orders and stored symmetric keys), castellan (passphrases) and users (opaque
//! uploads) create them, then fetched through volcrypt's client.
//!
//! Run: `eval "$(scripts/barbican-test-server.sh start)"; cargo test --test keys_barbican`.
//! Every test needs that server: without VOLCRYPT_TEST_BARBICAN_URL (and, for HTTPS,
//! VOLCRYPT_TEST_BARBICAN_TLS_URL and VOLCRYPT_TEST_BARBICAN_CA), or with a server that does not
//! answer, it fails and says how to start one. `make test` starts it and exports them.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use base64::Engine;
use volcrypt::config::{BarbicanAuth, BarbicanConfig, HeaderAuth};
use volcrypt::keys::{Barbican, Consumer, Error, KeyManager, Secret};
use volcrypt::secret::{SecretBytes, SecretType};

use common::{barbican, hex, os_random};

/// A fresh project per test: tests run in parallel and must not see each other's secrets.
fn new_project() -> String {
    let b = os_random(8);
    format!("proj-{}", hex(&b))
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
    let url = barbican::require_url();
    let project = new_project();
    let rest = Rest::new(&url, &project);
    // Make sure a leading zero byte survives: hex must keep "0x" -> "00"/"0a" digits.
    let mut key = os_random(32);
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
    let url = barbican::require_url();
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
    let url = barbican::require_url();
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
    let url = barbican::require_url();
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
    let url = barbican::require_url();
    let project = new_project();
    let rest = Rest::new(&url, &project);
    let mut payload = os_random(48);
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
/// A client that would wait [`RETRY_WAIT`] before any retry: longer than one attempt can take
/// (connect 2 s + read 10 s), so a call that returns sooner made exactly one attempt, however
/// slow the host is.
const RETRY_WAIT: Duration = Duration::from_secs(30);

fn no_retry_config(url: &str, project: &str) -> Barbican {
    let mut cfg = config(url, project);
    cfg.retries = 3;
    cfg.backoff_initial = RETRY_WAIT.as_secs_f64();
    cfg.backoff_max = RETRY_WAIT.as_secs_f64();
    Barbican::from_config(&cfg).unwrap()
}

#[test]
fn unknown_secret_is_not_found_without_retries() {
    let url = barbican::require_url();
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
    assert!(elapsed < RETRY_WAIT, "took {elapsed:?}: retried a 404?");
}

#[test]
fn another_projects_secret_is_forbidden_without_retries() {
    let url = barbican::require_url();
    let owner = new_project();
    let id = Rest::new(&url, &owner).store(serde_json::json!({
        "secret_type": "symmetric", "algorithm": "aes", "bit_length": 256,
        "payload": b64(&os_random(32)), "payload_content_type": "application/octet-stream",
        "payload_content_encoding": "base64",
    }));
    let t = Instant::now();
    let err = no_retry_config(&url, &new_project()).get(&id).unwrap_err();
    let elapsed = t.elapsed();
    assert!(
        matches!(&err, Error::Forbidden { key_id, .. } if *key_id == id),
        "{err}"
    );
    assert!(elapsed < RETRY_WAIT, "took {elapsed:?}: retried a 403?");
    // The owner still reads it.
    assert!(client(&url, &owner).get(&id).is_ok());
}

#[test]
fn secret_without_payload_is_a_clear_error() {
    let url = barbican::require_url();
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
    let url = barbican::require_url();
    let err = client(&url, &new_project()).get("../orders").unwrap_err();
    assert!(matches!(err, Error::InvalidKeyId { .. }), "{err}");
}

#[test]
fn health_reports_a_reachable_server() {
    let url = barbican::require_url();
    let b = client(&url, &new_project());
    assert_eq!(b.kind(), "barbican");
    b.health().unwrap();
}

#[test]
fn a_role_without_secret_access_is_refused() {
    let url = barbican::require_url();
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
    let url = barbican::require_url();
    let project = new_project();
    let id = Rest::new(&url, &project).store(serde_json::json!({
        "secret_type": "symmetric", "algorithm": "aes", "bit_length": 256,
        "payload": b64(&os_random(32)), "payload_content_type": "application/octet-stream",
        "payload_content_encoding": "base64",
    }));
    let b = client(&url, &project);
    let n = 20;
    let first = b.get(&id).unwrap().passphrase().expose().to_vec();
    let t = Instant::now();
    for i in 1..n {
        let again = b
            .get(&id)
            .unwrap_or_else(|e| panic!("fetch {i} of {n}: {e}"));
        assert_eq!(again.passphrase().expose(), first.as_slice(), "fetch {i}");
    }
    // For a reader only: speed is measured by the benchmarks, never asserted by a test.
    let _ = writeln!(
        std::io::stderr(),
        "barbican: {n} secret fetches (metadata + payload), {:?} each",
        t.elapsed() / (n - 1)
    );
}

#[test]
fn https_with_the_configured_ca_file() {
    let (tls_url, ca) = barbican::require_tls();
    let url = barbican::require_url();
    let project = new_project();
    let key = os_random(32);
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
    let (tls_url, _ca) = barbican::require_tls();
    // System roots (the platform verifier) do not include the test CA.
    let mut cfg = config(&tls_url, &new_project());
    cfg.retries = 3;
    cfg.backoff_initial = 3.0;
    let b = Barbican::from_config(&cfg).unwrap();
    let err = b.get("3e1b2c4d-0000-4000-8000-000000000001").unwrap_err();
    let text = err.to_string();
    // One attempt: a TLS trust failure is final, never retried (3 retries were allowed).
    assert!(
        matches!(err, Error::Unreachable { attempts: 1, .. }),
        "{text}"
    );
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

/// What a `GET` of a JSON document of the REST API answers.
fn get_json(rest: &Rest, path: &str) -> serde_json::Value {
    let (status, body) = rest.get(path, "application/json");
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).unwrap()
}

/// Secrets volcrypt creates (`KeyManager::create`, behind `volcrypt secret create`): Barbican
/// assigns the id, stores the type and, for symmetric keys, the algorithm and bit length; the
/// payload fetched back is byte for byte the one created.
#[test]
fn created_secrets_round_trip_with_their_type() {
    let url = barbican::require_url();
    let project = new_project();
    let c = client(&url, &project);
    let rest = Rest::new(&url, &project);
    for (secret_type, payload, bits) in [
        (SecretType::Symmetric, os_random(32), Some(256)),
        (
            SecretType::Passphrase,
            b"base64+text/of=random\n".to_vec(),
            None,
        ),
    ] {
        let secret = Secret::new(secret_type.clone(), SecretBytes::new(payload));
        let id = c.create(Some("volcrypt-created"), &secret).unwrap();
        assert_eq!(c.get(&id).unwrap(), secret, "{secret_type}");
        let meta = get_json(&rest, &format!("/v1/secrets/{id}"));
        assert_eq!(meta["secret_type"], secret_type.to_string(), "{meta}");
        assert_eq!(meta["name"], "volcrypt-created", "{meta}");
        if let Some(bits) = bits {
            assert_eq!(meta["bit_length"], bits, "{meta}");
            assert_eq!(meta["algorithm"], "aes", "{meta}");
        }
    }
}

/// `volcrypt secret create` prints the new secret's id and nothing else (never the payload);
/// the secret is in Barbican with the asked type and size. Bad sizes are refused.
#[test]
fn cli_secret_create_prints_only_the_id() {
    let url = barbican::require_url();
    let dir = common::tempdir();
    let cfg = dir.path().join("volcrypt.toml");
    std::fs::write(&cfg, barbican::key_manager_toml(&url)).unwrap();
    let c = client(&url, barbican::PROJECT);
    for (kind, bits, len) in [("symmetric", "512", 64), ("passphrase", "256", 44)] {
        let out = common::check(
            common::volcrypt([
                "secret", "create", "--type", kind, "--bits", bits, "--config",
            ])
            .arg(&cfg),
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let id = stdout.trim();
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        let got = c.get(id).unwrap();
        assert_eq!(got.secret_type.to_string(), kind);
        assert_eq!(got.payload.len(), len, "{kind}");
        if kind == "passphrase" {
            assert!(got.payload.expose().iter().all(u8::is_ascii_graphic));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let payload_text = String::from_utf8_lossy(got.payload.expose()).into_owned();
        for shown in [&stdout, &stderr.to_string()] {
            assert!(
                !shown.contains(&hex(got.payload.expose())),
                "payload printed"
            );
            assert!(
                !shown.contains(&b64(got.payload.expose())),
                "payload printed"
            );
            assert!(
                kind != "passphrase" || !shown.contains(&payload_text),
                "payload printed"
            );
        }
    }
    let out = common::run(
        common::volcrypt([
            "secret",
            "create",
            "--type",
            "symmetric",
            "--bits",
            "100",
            "--config",
        ])
        .arg(&cfg),
    );
    assert_eq!(common::code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bits 100"));
}

/// Consumers (`register_consumers = true`): registering is idempotent (one consumer after two
/// registrations), removal removes it and a second removal is fine; with the option off (the
/// default) nothing is registered; a secret that does not exist is named.
#[test]
fn consumers_are_registered_idempotently_and_removed() {
    let url = barbican::require_url();
    let project = new_project();
    let rest = Rest::new(&url, &project);
    let id = rest.store(serde_json::json!({
        "secret_type": "symmetric", "algorithm": "aes", "bit_length": 256, "mode": "xts",
        "payload": b64(&os_random(32)), "payload_content_type": "application/octet-stream",
        "payload_content_encoding": "base64",
    }));
    let consumers = || get_json(&rest, &format!("/v1/secrets/{id}/consumers"))["consumers"].clone();
    let consumer = Consumer {
        service: "volcrypt@test-host".into(),
        resource_type: "volume".into(),
        resource_id: "6f1d2c0a-3b4e-4c5d-8e9f-0a1b2c3d4e5f".into(),
    };

    client(&url, &project).add_consumer(&id, &consumer).unwrap();
    assert_eq!(
        consumers(),
        serde_json::json!([]),
        "registered with the option off"
    );

    let mut cfg = config(&url, &project);
    cfg.register_consumers = true;
    let c = Barbican::from_config(&cfg).unwrap();
    c.add_consumer(&id, &consumer).unwrap();
    c.add_consumer(&id, &consumer).unwrap();
    let list = consumers();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["service"], consumer.service, "{list}");
    assert_eq!(list[0]["resource_type"], "volume", "{list}");
    assert_eq!(list[0]["resource_id"], consumer.resource_id, "{list}");

    c.remove_consumer(&id, &consumer).unwrap();
    assert_eq!(consumers(), serde_json::json!([]));
    c.remove_consumer(&id, &consumer).unwrap();

    let missing = "00000000-0000-4000-8000-000000000000";
    match c.add_consumer(missing, &consumer) {
        Err(Error::NotFound { key_id, .. }) => assert_eq!(key_id, missing),
        other => panic!("expected NotFound, got {other:?}"),
    }
}
