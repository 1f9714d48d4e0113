//! The real Barbican the tests use (PyPI `barbican`, started on 127.0.0.1 by
//! `scripts/barbican-test-server.sh`; `make test` starts it and exports its URLs, and the VM
//! stage forwards it into the guest): no-auth "headers" mode, secrets created the way Cinder and
//! users create them.
//!
//! Rule: a test that uses Barbican *requires* it. Without `VOLCRYPT_TEST_BARBICAN_URL`, or with a
//! server that does not answer, the test fails and says how to start one; it never passes
//! without having talked to Barbican.

use std::process::{Command, Stdio};

/// The project the VM and agent tests create their secrets in.
pub const PROJECT: &str = "volcrypt-vm-tests";

const START: &str = "start one with: eval \"$(scripts/barbican-test-server.sh start)\" \
     (make test does this and exports VOLCRYPT_TEST_BARBICAN_URL, _TLS_URL and _CA)";

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{name} is not set: this test needs the real Barbican; {START}"),
    }
}

/// Fails the test unless `url` answers Barbican's version document (300 or 200) within 10 s.
fn require_answers(url: &str, ca: Option<&str>) {
    let mut c = Command::new("curl");
    c.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10"]);
    if let Some(ca) = ca {
        c.args(["--cacert", ca]);
    }
    let out = c
        .arg(format!("{url}/"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl (apt-get install curl): {e}"));
    let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && (code == "300" || code == "200"),
        "Barbican at {url} is configured but does not answer (HTTP {code:?}: {}); {START}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The configured plain-HTTP endpoint, without a trailing slash, checked to answer; fails the
/// test otherwise.
pub fn require_url() -> String {
    let url = var("VOLCRYPT_TEST_BARBICAN_URL")
        .trim_end_matches('/')
        .to_owned();
    require_answers(&url, None);
    url
}

/// The configured HTTPS endpoint and the CA file that signs it, checked to answer; fails the
/// test otherwise.
pub fn require_tls() -> (String, String) {
    let url = var("VOLCRYPT_TEST_BARBICAN_TLS_URL")
        .trim_end_matches('/')
        .to_owned();
    let ca = var("VOLCRYPT_TEST_BARBICAN_CA");
    require_answers(&url, Some(&ca));
    (url, ca)
}

/// The `[key_manager]` TOML that points volcrypt at that Barbican.
pub fn key_manager_toml(url: &str) -> String {
    format!(
        "[key_manager]\nbackend = \"barbican\"\n[key_manager.barbican]\nendpoint = \"{url}\"\n\
         retries = 1\n[key_manager.barbican.auth]\nmethod = \"headers\"\nproject_id = \"{PROJECT}\"\n"
    )
}

/// POSTs a secret of `secret_type` (`symmetric`, `passphrase`, `opaque`, …) as
/// octet-stream/base64, so every byte round-trips; its UUID.
pub fn create_secret(url: &str, secret_type: &str, payload: &[u8]) -> String {
    use base64::Engine as _;
    let mut body = serde_json::json!({
        "name": "volcrypt-vm-test",
        "secret_type": secret_type,
        "payload": base64::engine::general_purpose::STANDARD.encode(payload),
        "payload_content_type": "application/octet-stream",
        "payload_content_encoding": "base64",
    });
    if secret_type == "symmetric" {
        body["algorithm"] = "aes".into();
        body["bit_length"] = (payload.len() * 8).into();
        body["mode"] = "xts".into();
    }
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail-with-body", "-X", "POST"])
        .arg(format!("{url}/v1/secrets"))
        .args(["-H", "Content-Type: application/json"])
        .args(["-H", "X-Identity-Status: Confirmed"])
        .args(["-H", &format!("X-Project-Id: {PROJECT}")])
        .args(["-H", "X-Roles: member", "-d", "@-"]);
    let o = super::run_with_stdin(c, body.to_string().as_bytes());
    assert!(
        o.status.success(),
        "Barbican POST: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("Barbican's JSON");
    let r = v["secret_ref"].as_str().expect("secret_ref");
    r.rsplit('/').next().expect("a secret id").to_owned()
}

/// The consumers Barbican records for secret `id` (in [`PROJECT`]), as `(service,
/// resource_type, resource_id)`.
pub fn consumers(url: &str, id: &str) -> Vec<(String, String, String)> {
    let o = super::run(
        Command::new("curl")
            .args(["-sS", "--fail-with-body"])
            .arg(format!("{url}/v1/secrets/{id}/consumers"))
            .args(["-H", "Accept: application/json"])
            .args(["-H", "X-Identity-Status: Confirmed"])
            .args(["-H", &format!("X-Project-Id: {PROJECT}")])
            .args(["-H", "X-Roles: member"]),
    );
    assert!(
        o.status.success(),
        "Barbican GET consumers: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("Barbican's JSON");
    v["consumers"]
        .as_array()
        .expect("a consumers list")
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (s("service"), s("resource_type"), s("resource_id"))
        })
        .collect()
}
