//! OpenStack Barbican client (blocking; ureq with rustls).
//!
//! A secret is fetched in two requests, as castellan does: `GET /v1/secrets/{id}` for its
//! metadata (`secret_type`, `status`, `content_types.default`), then
//! `GET /v1/secrets/{id}/payload` with `Accept:` set to that default content type (Barbican
//! answers 406 to any other).
//!
//! Transport policy: connect and per-response timeouts; redirects are not followed (a token
//! must never be replayed to another host); connection errors, timeouts and HTTP 5xx are
//! retried with exponential backoff, 4xx never (404 → NotFound, 401 → Auth after one Keystone
//! re-authentication, 403 → Forbidden, 406 → ContentType). TLS trusts the platform's roots, or
//! exactly the certificates of a configured CA file. Payloads and tokens are never logged.

use std::sync::Arc;
use std::time::Duration;

use ureq::http::{Response, StatusCode};
use zeroize::Zeroizing;

use crate::keys::config::{BarbicanAuth, BarbicanConfig};
use crate::keys::keystone::Keystone;
use crate::keys::{Consumer, Error, KeyManager, Secret, validate_key_id};
use crate::secret::{SecretBytes, SecretType};

/// Largest secret payload accepted (keys are bytes to a few KiB).
pub const MAX_PAYLOAD_BYTES: u64 = 64 * 1024;
/// Largest JSON document accepted (secret metadata, Keystone token with catalog).
pub const MAX_JSON_BYTES: u64 = 4 * 1024 * 1024;
/// The longest error-body excerpt copied into an error message.
const MAX_EXCERPT: usize = 200;

/// Timeouts and retry policy shared by the Barbican and Keystone requests.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Extra attempts after the first one.
    pub retries: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl RetryPolicy {
    fn delay(&self, retry_index: u32) -> Duration {
        let factor = 1u32.checked_shl(retry_index.min(16)).unwrap_or(u32::MAX);
        self.backoff_initial
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// An HTTP agent plus the retry policy: the one place requests are sent from.
pub(crate) struct Http {
    agent: ureq::Agent,
    pub(crate) retry: RetryPolicy,
}

/// A response and how many attempts it took.
pub(crate) struct Answer {
    pub resp: Response<ureq::Body>,
    pub attempts: u32,
}

impl Http {
    pub(crate) fn new(cfg: &BarbicanConfig) -> Result<Http, Error> {
        let secs = |field: &str, v: f64| -> Result<Duration, Error> {
            if v.is_finite() && v > 0.0 && v <= 3600.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(Error::Config {
                    field: format!("key_manager.barbican.{field}"),
                    reason: format!("{v} is not a number of seconds in (0, 3600]"),
                })
            }
        };
        let connect = secs("connect_timeout", cfg.connect_timeout)?;
        let read = secs("read_timeout", cfg.read_timeout)?;
        let retry = RetryPolicy {
            retries: cfg.retries.min(20),
            backoff_initial: secs("backoff_initial", cfg.backoff_initial)?,
            backoff_max: secs("backoff_max", cfg.backoff_max)?,
        };
        let root_certs = match &cfg.ca_file {
            None => ureq::tls::RootCerts::PlatformVerifier,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| Error::io(path, e))?;
                let mut certs = Vec::new();
                for item in ureq::tls::parse_pem(&pem) {
                    match item {
                        Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                        Ok(_) => {}
                        Err(e) => {
                            return Err(Error::Config {
                                field: "key_manager.barbican.ca_file".into(),
                                reason: format!("{}: {e}", path.display()),
                            });
                        }
                    }
                }
                if certs.is_empty() {
                    return Err(Error::Config {
                        field: "key_manager.barbican.ca_file".into(),
                        reason: format!("{}: no PEM certificate found", path.display()),
                    });
                }
                ureq::tls::RootCerts::Specific(Arc::new(certs))
            }
        };
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(root_certs)
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(connect))
            .timeout_resolve(Some(connect))
            .timeout_send_request(Some(read))
            .timeout_send_body(Some(read))
            .timeout_recv_response(Some(read))
            .timeout_recv_body(Some(read))
            .user_agent(concat!("volcrypt/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .build()
            .into();
        Ok(Http { agent, retry })
    }

    /// Send a request built by `build` (called again for each attempt), retrying connection
    /// failures and 5xx answers. A 5xx on the last attempt is returned for the caller to map.
    pub(crate) fn send(
        &self,
        url: &str,
        key_id: Option<&str>,
        mut build: impl FnMut(&ureq::Agent) -> Result<Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, Error> {
        let max_attempts = self.retry.retries.saturating_add(1);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let last = attempt >= max_attempts;
            match build(&self.agent) {
                Ok(resp) if resp.status().is_server_error() && !last => {
                    tracing::debug!(url, status = resp.status().as_u16(), attempt, "retrying");
                }
                Ok(resp) => {
                    return Ok(Answer {
                        resp,
                        attempts: attempt,
                    });
                }
                Err(e) if retryable(&e) && !last => {
                    tracing::debug!(url, error = %e, attempt, "retrying");
                }
                Err(e) => {
                    return Err(Error::Unreachable {
                        url: url.to_string(),
                        key_id: key_id.map(str::to_string),
                        attempts: attempt,
                        reason: describe(&e),
                    });
                }
            }
            std::thread::sleep(self.retry.delay(attempt - 1));
        }
    }
}

/// Transport failures worth another try (the server may be restarting). Not retried: TLS
/// failures (rustls reports them as I/O errors of kind InvalidData: an untrusted certificate
/// stays untrusted), URL and configuration errors.
fn retryable(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Io(io) => io.kind() != std::io::ErrorKind::InvalidData,
        ureq::Error::Timeout(_)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::Protocol(_) => true,
        _ => false,
    }
}

/// ureq's message, with a hint where the fix is a setting.
fn describe(e: &ureq::Error) -> String {
    let text = e.to_string();
    if text.contains("certificate") {
        format!(
            "{text} (TLS: is the server's CA in the system roots, or key_manager.barbican.ca_file?)"
        )
    } else {
        text
    }
}

/// Read a response body into memory, bounded.
pub(crate) fn read_body(
    resp: &mut Response<ureq::Body>,
    limit: u64,
    url: &str,
    key_id: Option<&str>,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    resp.body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map(Zeroizing::new)
        .map_err(|e| Error::Protocol {
            url: url.to_string(),
            key_id: key_id.map(str::to_string),
            reason: format!("reading the response body: {e}"),
        })
}

/// A short, printable excerpt of an error body (Barbican's and Keystone's error documents
/// name the problem; they never contain secrets).
pub(crate) fn excerpt(resp: &mut Response<ureq::Body>) -> String {
    let body = resp
        .body_mut()
        .with_config()
        .limit(16 * 1024)
        .read_to_vec()
        .unwrap_or_default();
    let text: String = String::from_utf8_lossy(&body)
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_EXCERPT)
        .collect();
    text
}

enum Auth {
    Headers {
        project_id: String,
        roles: String,
        user_id: Option<String>,
    },
    Token(SecretBytes),
    Keystone(Keystone),
}

/// Barbican as a [`KeyManager`].
pub struct Barbican {
    http: Arc<Http>,
    /// Base URL without the version (`https://host:9311`), or None: from Keystone's catalog.
    endpoint: Option<String>,
    interface: String,
    region: Option<String>,
    auth: Auth,
    /// Register the volumes attached here as consumers of their secrets (opt-in).
    register_consumers: bool,
}

/// An authenticated request's method, with the JSON body of those that carry one.
#[derive(Clone, Copy)]
enum Call<'a> {
    Get,
    Post(&'a [u8]),
    Delete(&'a [u8]),
}

/// The body of a secret's creation (`POST /v1/secrets`).
#[derive(serde::Serialize)]
struct NewSecret<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    secret_type: String,
    payload: &'a str,
    payload_content_type: &'static str,
    payload_content_encoding: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    algorithm: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bit_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
}

/// Secret metadata as Barbican returns it (only the fields used).
#[derive(Debug, serde::Deserialize)]
struct SecretMeta {
    secret_type: Option<String>,
    status: Option<String>,
    content_types: Option<ContentTypes>,
}

#[derive(Debug, serde::Deserialize)]
struct ContentTypes {
    default: Option<String>,
}

impl Barbican {
    pub fn from_config(cfg: &BarbicanConfig) -> Result<Barbican, Error> {
        let http = Arc::new(Http::new(cfg)?);
        let auth = match &cfg.auth {
            None => {
                return Err(Error::Config {
                    field: "key_manager.barbican.auth".into(),
                    reason: "missing: set method = \"password\", \"application-credential\", \
                             \"token\" or \"headers\""
                        .into(),
                });
            }
            Some(BarbicanAuth::Headers(h)) => {
                for (field, v) in [("project_id", &h.project_id), ("roles", &h.roles)] {
                    if v.is_empty() || !is_header_safe(v) {
                        return Err(Error::Config {
                            field: format!("key_manager.barbican.auth.{field}"),
                            reason: "must be non-empty printable ASCII".into(),
                        });
                    }
                }
                if let Some(u) = &h.user_id
                    && !is_header_safe(u)
                {
                    return Err(Error::Config {
                        field: "key_manager.barbican.auth.user_id".into(),
                        reason: "must be printable ASCII".into(),
                    });
                }
                Auth::Headers {
                    project_id: h.project_id.clone(),
                    roles: h.roles.clone(),
                    user_id: h.user_id.clone(),
                }
            }
            Some(BarbicanAuth::Token(t)) => {
                let ok = std::str::from_utf8(t.token.expose()).is_ok_and(is_header_safe);
                if !ok || t.token.expose().is_empty() {
                    return Err(Error::Config {
                        field: "key_manager.barbican.auth.token".into(),
                        reason: "must be non-empty printable ASCII".into(),
                    });
                }
                Auth::Token(t.token.0.clone())
            }
            Some(BarbicanAuth::Password(p)) => Auth::Keystone(Keystone::password(p, http.clone())?),
            Some(BarbicanAuth::ApplicationCredential(a)) => {
                Auth::Keystone(Keystone::application_credential(a, http.clone())?)
            }
        };
        let endpoint = match &cfg.endpoint {
            Some(e) => Some(normalize_endpoint(e)?),
            None if matches!(auth, Auth::Keystone(_)) => None,
            None => {
                return Err(Error::Config {
                    field: "key_manager.barbican.endpoint".into(),
                    reason: "required unless Keystone authentication provides a catalog".into(),
                });
            }
        };
        Ok(Barbican {
            http,
            endpoint,
            interface: cfg.interface.clone(),
            region: cfg.region.clone(),
            auth,
            register_consumers: cfg.register_consumers,
        })
    }

    fn endpoint(&self) -> Result<String, Error> {
        match (&self.endpoint, &self.auth) {
            (Some(e), _) => Ok(e.clone()),
            (None, Auth::Keystone(ks)) => normalize_endpoint(&ks.endpoint(
                "key-manager",
                &self.interface,
                self.region.as_deref(),
            )?),
            (None, _) => Err(Error::Config {
                field: "key_manager.barbican.endpoint".into(),
                reason: "missing".into(),
            }),
        }
    }

    /// GET `url` with our authentication (see [`Self::authed`]).
    fn get_authed(&self, url: &str, accept: &str, key_id: Option<&str>) -> Result<Answer, Error> {
        self.authed(Call::Get, url, accept, key_id)
    }

    /// Send `call` to `url` with our authentication; on a 401 under Keystone auth, drop the
    /// cached token and try once more (the token may have been revoked early).
    fn authed(
        &self,
        call: Call<'_>,
        url: &str,
        accept: &str,
        key_id: Option<&str>,
    ) -> Result<Answer, Error> {
        let mut reauthed = false;
        loop {
            let token = match &self.auth {
                Auth::Keystone(ks) => Some(ks.token()?),
                Auth::Token(t) => Some(t.clone()),
                Auth::Headers { .. } => None,
            };
            let token_str = match &token {
                Some(t) => Some(std::str::from_utf8(t.expose()).map_err(|_| Error::Auth {
                    url: url.to_string(),
                    reason: "token is not ASCII".into(),
                })?),
                None => None,
            };
            let answer = self.http.send(url, key_id, |agent| match call {
                Call::Get => self.headers(agent.get(url), accept, token_str).call(),
                Call::Post(body) => self
                    .headers(agent.post(url), accept, token_str)
                    .header("Content-Type", "application/json")
                    .send(body),
                Call::Delete(body) => self
                    .headers(agent.delete(url).force_send_body(), accept, token_str)
                    .header("Content-Type", "application/json")
                    .send(body),
            })?;
            if answer.resp.status() == StatusCode::UNAUTHORIZED
                && !reauthed
                && let Auth::Keystone(ks) = &self.auth
            {
                ks.invalidate();
                reauthed = true;
                continue;
            }
            return Ok(answer);
        }
    }

    /// The headers every request carries: what it accepts, the API version, authentication.
    fn headers<B>(
        &self,
        req: ureq::RequestBuilder<B>,
        accept: &str,
        token: Option<&str>,
    ) -> ureq::RequestBuilder<B> {
        let mut req = req
            .header("Accept", accept)
            .header("OpenStack-API-Version", "key-manager 1.0");
        if let Some(t) = token {
            req = req.header("X-Auth-Token", t);
        }
        if let Auth::Headers {
            project_id,
            roles,
            user_id,
        } = &self.auth
        {
            req = req
                .header("X-Identity-Status", "Confirmed")
                .header("X-Project-Id", project_id.as_str())
                .header("X-Roles", roles.as_str());
            if let Some(u) = user_id {
                req = req.header("X-User-Id", u.as_str());
            }
        }
        req
    }

    /// Add (`remove: false`) or remove `consumer` on secret `key_id` (Barbican >= 17's secret
    /// consumer API; both are idempotent on the server).
    fn consumer(&self, key_id: &str, consumer: &Consumer, remove: bool) -> Result<(), Error> {
        validate_key_id(key_id)?;
        let url = format!("{}/v1/secrets/{key_id}/consumers", self.endpoint()?);
        let body = serde_json::to_vec(consumer).map_err(|e| Error::Protocol {
            url: url.clone(),
            key_id: Some(key_id.into()),
            reason: format!("cannot encode the consumer: {e}"),
        })?;
        let call = if remove {
            Call::Delete(&body)
        } else {
            Call::Post(&body)
        };
        let answer = self.authed(call, &url, "application/json", Some(key_id))?;
        let status = answer.resp.status();
        if status.is_success() {
            return Ok(());
        }
        if !matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) {
            return Err(self.status_error(answer, &url, Some(key_id)));
        }
        // 404/405: the secret is gone, or this Barbican has no consumer API, or (removal) the
        // consumer was not registered.
        if !self.secret_exists(key_id)? {
            return Err(self.status_error(answer, &url, Some(key_id)));
        }
        if remove {
            return Ok(());
        }
        Err(Error::Unsupported {
            manager: url,
            what: "the secret consumer API (Barbican 17.0.0 or later)",
        })
    }

    fn secret_exists(&self, key_id: &str) -> Result<bool, Error> {
        let url = format!("{}/v1/secrets/{key_id}", self.endpoint()?);
        let answer = self.get_authed(&url, "application/json", Some(key_id))?;
        match answer.resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.status_error(answer, &url, Some(key_id))),
        }
    }

    /// Map a non-200 answer onto an error.
    fn status_error(&self, mut answer: Answer, url: &str, key_id: Option<&str>) -> Error {
        let status = answer.resp.status();
        let kid = || key_id.unwrap_or("-").to_string();
        match status {
            StatusCode::NOT_FOUND if key_id.is_some() => Error::NotFound {
                key_id: kid(),
                manager: "Barbican",
            },
            StatusCode::UNAUTHORIZED => Error::Auth {
                url: url.to_string(),
                reason: format!("HTTP 401: {}", excerpt(&mut answer.resp)),
            },
            StatusCode::FORBIDDEN => Error::Forbidden {
                key_id: kid(),
                url: url.to_string(),
            },
            s if s.is_server_error() => Error::Server {
                url: url.to_string(),
                key_id: key_id.map(str::to_string),
                status: s.as_u16(),
                attempts: answer.attempts,
            },
            s => Error::Protocol {
                url: url.to_string(),
                key_id: key_id.map(str::to_string),
                reason: format!("HTTP {}: {}", s.as_u16(), excerpt(&mut answer.resp)),
            },
        }
    }
}

impl KeyManager for Barbican {
    fn kind(&self) -> &'static str {
        "barbican"
    }

    fn get(&self, key_id: &str) -> Result<Secret, Error> {
        validate_key_id(key_id)?;
        let base = self.endpoint()?;
        let meta_url = format!("{base}/v1/secrets/{key_id}");
        let mut answer = self.get_authed(&meta_url, "application/json", Some(key_id))?;
        if answer.resp.status() != StatusCode::OK {
            return Err(self.status_error(answer, &meta_url, Some(key_id)));
        }
        let body = read_body(&mut answer.resp, MAX_JSON_BYTES, &meta_url, Some(key_id))?;
        let proto = |reason: String| Error::Protocol {
            url: meta_url.clone(),
            key_id: Some(key_id.to_string()),
            reason,
        };
        let meta: SecretMeta = serde_json::from_slice(&body)
            .map_err(|e| proto(format!("secret metadata is not valid JSON: {e}")))?;
        if let Some(status) = &meta.status
            && !status.eq_ignore_ascii_case("ACTIVE")
        {
            return Err(proto(format!("secret status is {status:?}, not ACTIVE")));
        }
        // Barbican's default type is opaque; a missing field means an old server.
        let secret_type: SecretType = match &meta.secret_type {
            Some(t) => t.parse().map_err(proto)?,
            None => SecretType::Opaque,
        };
        let content_type = meta
            .content_types
            .and_then(|c| c.default)
            .ok_or_else(|| proto("secret has no payload (no content_types.default)".into()))?;
        if !is_header_safe(&content_type) {
            return Err(proto(
                "content_types.default is not a valid header value".into(),
            ));
        }

        let payload_url = format!("{meta_url}/payload");
        let mut answer = self.get_authed(&payload_url, &content_type, Some(key_id))?;
        match answer.resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_ACCEPTABLE => {
                return Err(Error::ContentType {
                    key_id: key_id.to_string(),
                    url: payload_url,
                    content_type,
                });
            }
            _ => return Err(self.status_error(answer, &payload_url, Some(key_id))),
        }
        let payload = read_body(
            &mut answer.resp,
            MAX_PAYLOAD_BYTES,
            &payload_url,
            Some(key_id),
        )?;
        tracing::debug!(key_id, %secret_type, bytes = payload.len(), "fetched secret from Barbican");
        Ok(Secret::new(secret_type, SecretBytes::new(payload.to_vec())))
    }

    /// POST a new secret (payload base64 in the JSON body, never logged); Barbican assigns the
    /// id, returned from the `secret_ref` it answers with.
    fn create(&self, name: Option<&str>, secret: &Secret) -> Result<String, Error> {
        use base64::Engine;
        let url = format!("{}/v1/secrets", self.endpoint()?);
        let payload = Zeroizing::new(
            base64::engine::general_purpose::STANDARD.encode(secret.payload.expose()),
        );
        let symmetric = secret.secret_type == SecretType::Symmetric;
        let doc = NewSecret {
            name,
            secret_type: secret.secret_type.to_string(),
            payload: &payload,
            payload_content_type: "application/octet-stream",
            payload_content_encoding: "base64",
            algorithm: symmetric.then_some("aes"),
            bit_length: symmetric.then_some(secret.payload.expose().len() * 8),
            mode: symmetric.then_some("xts"),
        };
        let body = Zeroizing::new(serde_json::to_vec(&doc).map_err(|e| Error::Protocol {
            url: url.clone(),
            key_id: None,
            reason: format!("cannot encode the secret: {e}"),
        })?);
        let mut answer = self.authed(Call::Post(&body), &url, "application/json", None)?;
        if answer.resp.status() != StatusCode::CREATED {
            return Err(self.status_error(answer, &url, None));
        }
        let reply = read_body(&mut answer.resp, MAX_JSON_BYTES, &url, None)?;
        let proto = |reason: String| Error::Protocol {
            url: url.clone(),
            key_id: None,
            reason,
        };
        let v: serde_json::Value = serde_json::from_slice(&reply)
            .map_err(|e| proto(format!("answer is not valid JSON: {e}")))?;
        let id = v["secret_ref"]
            .as_str()
            .and_then(|r| r.trim_end_matches('/').rsplit('/').next())
            .ok_or_else(|| proto("no secret_ref in the answer".into()))?;
        validate_key_id(id)?;
        Ok(id.to_owned())
    }

    fn add_consumer(&self, key_id: &str, consumer: &Consumer) -> Result<(), Error> {
        if !self.register_consumers {
            return Ok(());
        }
        self.consumer(key_id, consumer, false)
    }

    fn remove_consumer(&self, key_id: &str, consumer: &Consumer) -> Result<(), Error> {
        if !self.register_consumers {
            return Ok(());
        }
        self.consumer(key_id, consumer, true)
    }

    /// Lists at most one secret: proves the server answers and accepts our credentials.
    fn health(&self) -> Result<(), Error> {
        let base = self.endpoint()?;
        let url = format!("{base}/v1/secrets?limit=1");
        let answer = self.get_authed(&url, "application/json", None)?;
        if answer.resp.status() == StatusCode::OK {
            Ok(())
        } else {
            Err(self.status_error(answer, &url, None))
        }
    }
}

/// `https://host:9311/`, `https://host:9311/v1` → `https://host:9311`.
fn normalize_endpoint(e: &str) -> Result<String, Error> {
    let e = e.trim().trim_end_matches('/');
    let e = e.strip_suffix("/v1").unwrap_or(e);
    if !(e.starts_with("http://") || e.starts_with("https://")) || e.contains(char::is_whitespace) {
        return Err(Error::Config {
            field: "key_manager.barbican.endpoint".into(),
            reason: format!("{e:?} is not an http:// or https:// URL"),
        });
    }
    Ok(e.to_string())
}

fn is_header_safe(v: &str) -> bool {
    v.bytes().all(|b| (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_lose_version_and_slashes() {
        assert_eq!(
            normalize_endpoint("http://h:9311/v1/").unwrap(),
            "http://h:9311"
        );
        assert_eq!(normalize_endpoint("https://h/").unwrap(), "https://h");
        assert!(normalize_endpoint("h:9311").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            retries: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
        };
        let d: Vec<u128> = (0..5).map(|i| p.delay(i).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 500, 500]);
        assert_eq!(p.delay(u32::MAX), Duration::from_millis(500));
    }
}
