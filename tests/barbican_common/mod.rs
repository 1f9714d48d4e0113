//! The real Barbican the VM tests use: `VOLCRYPT_TEST_BARBICAN_URL` (scripts/barbican-test-server.sh
//! on the host, forwarded into the guest by tests/vm/attach-suite.sh), no-auth "headers" mode
//! with a fixed project, and secrets created the way Cinder and users create them.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::process::{Command, Stdio};

use volcrypt::secret::SecretType;

pub const PROJECT: &str = "volcrypt-vm-tests";

/// The configured endpoint without a trailing slash, or `None` when the tests run without one.
pub fn url() -> Option<String> {
    std::env::var("VOLCRYPT_TEST_BARBICAN_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .map(|u| u.trim_end_matches('/').to_owned())
}

/// The `[key_manager]` TOML that points volcrypt at that Barbican.
pub fn key_manager_toml(url: &str) -> String {
    format!(
        "[key_manager]\nbackend = \"barbican\"\n[key_manager.barbican]\nendpoint = \"{url}\"\n\
         retries = 1\n[key_manager.barbican.auth]\nmethod = \"headers\"\nproject_id = \"{PROJECT}\"\n"
    )
}

/// POST a secret (octet-stream/base64, so every byte round-trips); its UUID.
pub fn create_secret(url: &str, t: &SecretType, payload: &[u8]) -> String {
    use base64::Engine as _;
    let mut body = serde_json::json!({
        "name": "volcrypt-vm-test",
        "secret_type": t.as_str(),
        "payload": base64::engine::general_purpose::STANDARD.encode(payload),
        "payload_content_type": "application/octet-stream",
        "payload_content_encoding": "base64",
    });
    if *t == SecretType::Symmetric {
        body["algorithm"] = "aes".into();
        body["bit_length"] = (payload.len() * 8).into();
        body["mode"] = "xts".into();
    }
    let mut c = Command::new("curl")
        .args(["-sS", "--fail-with-body", "-X", "POST"])
        .arg(format!("{url}/v1/secrets"))
        .args(["-H", "Content-Type: application/json"])
        .args(["-H", "X-Identity-Status: Confirmed"])
        .args(["-H", &format!("X-Project-Id: {PROJECT}")])
        .args(["-H", "X-Roles: member", "-d", "@-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn curl");
    c.stdin
        .take()
        .unwrap()
        .write_all(body.to_string().as_bytes())
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "Barbican POST: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = v["secret_ref"].as_str().unwrap();
    r.rsplit('/').next().unwrap().to_owned()
}
