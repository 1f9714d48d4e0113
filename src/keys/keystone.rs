//! Keystone v3 authentication for the Barbican client.
//!
//! `POST {auth_url}/auth/tokens` with a password (project-scoped) or an application
//! credential; the token comes back in the `X-Subject-Token` header, its lifetime in
//! `token.expires_at`, the service catalog in `token.catalog`. The token is cached and renewed
//! before it expires (five minutes early, or half its lifetime if that is shorter), and
//! dropped on a 401 so that the next request authenticates afresh. The request body carrying
//! the password is built in a zeroizing buffer; tokens live in [`SecretBytes`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use ureq::http::StatusCode;
use zeroize::Zeroizing;

use crate::keys::Error;
use crate::keys::barbican::{Http, MAX_JSON_BYTES, excerpt, read_body};
use crate::keys::config::{ConfigSecret, KeystoneAppCredential, KeystonePassword};
use crate::secret::SecretBytes;

/// Renew this long before expiry at most.
const RENEW_MARGIN: Duration = Duration::from_secs(300);

enum Method {
    Password {
        user: Named,
        user_domain: Named,
        password: ConfigSecret,
        project: Named,
        project_domain: Named,
    },
    AppCredential {
        id: Option<String>,
        name: Option<String>,
        user: Option<(Named, Named)>,
        secret: ConfigSecret,
    },
}

/// An object named by id or by name (Keystone accepts either).
#[derive(Clone)]
enum Named {
    Id(String),
    Name(String),
}

impl Named {
    fn pick(field: &str, id: &Option<String>, name: &Option<String>) -> Result<Named, Error> {
        match (id, name) {
            (Some(id), None) => Ok(Named::Id(id.clone())),
            (None, Some(n)) => Ok(Named::Name(n.clone())),
            _ => Err(Error::Config {
                field: format!("key_manager.barbican.auth.{field}"),
                reason: format!("set exactly one of {field}_id and {field}_name"),
            }),
        }
    }

    fn json(&self) -> IdOrName<'_> {
        match self {
            Named::Id(id) => IdOrName {
                id: Some(id),
                name: None,
            },
            Named::Name(n) => IdOrName {
                id: None,
                name: Some(n),
            },
        }
    }
}

struct CachedToken {
    value: SecretBytes,
    renew_at: SystemTime,
    catalog: Vec<CatalogService>,
}

/// A Keystone session: how to authenticate, and the current token.
pub struct Keystone {
    http: Arc<Http>,
    tokens_url: String,
    method: Method,
    cache: Mutex<Option<CachedToken>>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct CatalogService {
    #[serde(rename = "type")]
    service_type: String,
    #[serde(default)]
    endpoints: Vec<CatalogEndpoint>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct CatalogEndpoint {
    interface: String,
    url: String,
    region_id: Option<String>,
    region: Option<String>,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: TokenBody,
}

#[derive(serde::Deserialize)]
struct TokenBody {
    expires_at: Option<String>,
    #[serde(default)]
    catalog: Vec<CatalogService>,
}

// Borrowed request-body structs: serialized straight into a zeroizing buffer, so the
// password is never copied into an intermediate JSON value.
#[derive(Serialize)]
struct IdOrName<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct UserRef<'a> {
    #[serde(flatten)]
    who: IdOrName<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<IdOrName<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<&'a str>,
}

#[derive(Serialize)]
struct PasswordIdentity<'a> {
    methods: [&'static str; 1],
    password: PasswordUser<'a>,
}

#[derive(Serialize)]
struct PasswordUser<'a> {
    user: UserRef<'a>,
}

#[derive(Serialize)]
struct ProjectScope<'a> {
    project: ProjectRef<'a>,
}

#[derive(Serialize)]
struct ProjectRef<'a> {
    #[serde(flatten)]
    who: IdOrName<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<IdOrName<'a>>,
}

#[derive(Serialize)]
struct AppCredIdentity<'a> {
    methods: [&'static str; 1],
    application_credential: AppCred<'a>,
}

#[derive(Serialize)]
struct AppCred<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<UserRef<'a>>,
    secret: &'a str,
}

#[derive(Serialize)]
struct AuthRequest<I, S> {
    auth: AuthBody<I, S>,
}

#[derive(Serialize)]
struct AuthBody<I, S> {
    identity: I,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<S>,
}

fn tokens_url(auth_url: &str) -> Result<String, Error> {
    let u = auth_url.trim().trim_end_matches('/');
    if !(u.starts_with("http://") || u.starts_with("https://")) {
        return Err(Error::Config {
            field: "key_manager.barbican.auth.auth_url".into(),
            reason: format!("{u:?} is not an http:// or https:// URL"),
        });
    }
    if u.ends_with("/v3") {
        Ok(format!("{u}/auth/tokens"))
    } else {
        Ok(format!("{u}/v3/auth/tokens"))
    }
}

fn secret_str<'a>(s: &'a ConfigSecret, field: &str) -> Result<&'a str, Error> {
    std::str::from_utf8(s.expose()).map_err(|_| Error::Config {
        field: format!("key_manager.barbican.auth.{field}"),
        reason: "is not UTF-8".into(),
    })
}

impl Keystone {
    pub(crate) fn password(p: &KeystonePassword, http: Arc<Http>) -> Result<Keystone, Error> {
        let user = Named::pick("user", &p.user_id, &p.username)?;
        // Keystone needs a domain for names; ids are global. Default: "Default", like the
        // OpenStack clients.
        let domain = |id: &Option<String>, name: &Option<String>| match (id, name) {
            (None, None) => Ok(Named::Name("Default".into())),
            _ => Named::pick("user_domain", id, name),
        };
        let user_domain = domain(&p.user_domain_id, &p.user_domain_name)?;
        let project = Named::pick("project", &p.project_id, &p.project_name)?;
        let project_domain = match (&p.project_domain_id, &p.project_domain_name) {
            (None, None) => Named::Name("Default".into()),
            (id, name) => Named::pick("project_domain", id, name)?,
        };
        secret_str(&p.password, "password")?;
        Ok(Keystone {
            http,
            tokens_url: tokens_url(&p.auth_url)?,
            method: Method::Password {
                user,
                user_domain,
                password: p.password.clone(),
                project,
                project_domain,
            },
            cache: Mutex::new(None),
        })
    }

    pub(crate) fn application_credential(
        a: &KeystoneAppCredential,
        http: Arc<Http>,
    ) -> Result<Keystone, Error> {
        let user = match (&a.user_id, &a.username) {
            (None, None) => None,
            (id, name) => {
                let u = Named::pick("user", id, name)?;
                let d = match (&a.user_domain_id, &a.user_domain_name) {
                    (None, None) => Named::Name("Default".into()),
                    (id, name) => Named::pick("user_domain", id, name)?,
                };
                Some((u, d))
            }
        };
        match (
            &a.application_credential_id,
            &a.application_credential_name,
            &user,
        ) {
            (Some(_), None, _) | (None, Some(_), Some(_)) => {}
            _ => {
                return Err(Error::Config {
                    field: "key_manager.barbican.auth.application_credential_id".into(),
                    reason: "set application_credential_id, or application_credential_name \
                             with username/user_id"
                        .into(),
                });
            }
        }
        secret_str(
            &a.application_credential_secret,
            "application_credential_secret",
        )?;
        Ok(Keystone {
            http,
            tokens_url: tokens_url(&a.auth_url)?,
            method: Method::AppCredential {
                id: a.application_credential_id.clone(),
                name: a.application_credential_name.clone(),
                user,
                secret: a.application_credential_secret.clone(),
            },
            cache: Mutex::new(None),
        })
    }

    fn body(&self) -> Result<Zeroizing<Vec<u8>>, Error> {
        let mut buf = Zeroizing::new(Vec::with_capacity(4096));
        let res = match &self.method {
            Method::Password {
                user,
                user_domain,
                password,
                project,
                project_domain,
            } => {
                let user_ref = UserRef {
                    who: user.json(),
                    domain: matches!(user, Named::Name(_)).then(|| user_domain.json()),
                    password: Some(secret_str(password, "password")?),
                };
                let req = AuthRequest {
                    auth: AuthBody {
                        identity: PasswordIdentity {
                            methods: ["password"],
                            password: PasswordUser { user: user_ref },
                        },
                        scope: Some(ProjectScope {
                            project: ProjectRef {
                                who: project.json(),
                                domain: matches!(project, Named::Name(_))
                                    .then(|| project_domain.json()),
                            },
                        }),
                    },
                };
                serde_json::to_writer(&mut *buf, &req)
            }
            Method::AppCredential {
                id,
                name,
                user,
                secret,
            } => {
                let req: AuthRequest<_, ProjectScope> = AuthRequest {
                    auth: AuthBody {
                        identity: AppCredIdentity {
                            methods: ["application_credential"],
                            application_credential: AppCred {
                                id: id.as_deref(),
                                name: name.as_deref(),
                                user: user.as_ref().map(|(u, d)| UserRef {
                                    who: u.json(),
                                    domain: matches!(u, Named::Name(_)).then(|| d.json()),
                                    password: None,
                                }),
                                secret: secret_str(secret, "application_credential_secret")?,
                            },
                        },
                        scope: None,
                    },
                };
                serde_json::to_writer(&mut *buf, &req)
            }
        };
        res.map_err(|e| Error::Auth {
            url: self.tokens_url.clone(),
            reason: format!("building the request: {e}"),
        })?;
        Ok(buf)
    }

    /// A valid token: the cached one, or a fresh one.
    pub fn token(&self) -> Result<SecretBytes, Error> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.as_ref()
            && SystemTime::now() < t.renew_at
        {
            return Ok(t.value.clone());
        }
        let fresh = self.authenticate()?;
        let value = fresh.value.clone();
        *cache = Some(fresh);
        Ok(value)
    }

    /// Forget the cached token (after a 401).
    pub fn invalidate(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        *cache = None;
    }

    /// Look a service endpoint up in the catalog of the current token.
    pub fn endpoint(
        &self,
        service_type: &str,
        interface: &str,
        region: Option<&str>,
    ) -> Result<String, Error> {
        self.token()?;
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let catalog = cache.as_ref().map(|t| t.catalog.as_slice()).unwrap_or(&[]);
        catalog
            .iter()
            .filter(|s| s.service_type == service_type)
            .flat_map(|s| s.endpoints.iter())
            .find(|e| {
                e.interface == interface
                    && region.is_none_or(|r| {
                        e.region_id.as_deref() == Some(r) || e.region.as_deref() == Some(r)
                    })
            })
            .map(|e| e.url.clone())
            .ok_or_else(|| Error::Config {
                field: "key_manager.barbican.endpoint".into(),
                reason: format!(
                    "not set, and Keystone's catalog has no {interface} {service_type} endpoint{}",
                    region
                        .map(|r| format!(" in region {r}"))
                        .unwrap_or_default()
                ),
            })
    }

    fn authenticate(&self) -> Result<CachedToken, Error> {
        let url = self.tokens_url.as_str();
        let body = self.body()?;
        let started = SystemTime::now();
        let mut answer = self.http.send(url, None, |agent| {
            agent
                .post(url)
                .header("Content-Type", "application/json")
                .header("Accept", "application/json")
                .send(&body[..])
        })?;
        let status = answer.resp.status();
        if status != StatusCode::CREATED && status != StatusCode::OK {
            let detail = excerpt(&mut answer.resp);
            return Err(Error::Auth {
                url: url.to_string(),
                reason: format!("Keystone answered HTTP {}: {detail}", status.as_u16()),
            });
        }
        let value = answer
            .resp
            .headers()
            .get("X-Subject-Token")
            .map(|v| SecretBytes::new(v.as_bytes().to_vec()))
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::Auth {
                url: url.to_string(),
                reason: "Keystone's answer has no X-Subject-Token header".into(),
            })?;
        let json = read_body(&mut answer.resp, MAX_JSON_BYTES, url, None)?;
        let parsed: TokenResponse = serde_json::from_slice(&json).map_err(|e| Error::Auth {
            url: url.to_string(),
            reason: format!("Keystone's token document is not valid: {e}"),
        })?;
        let expires = match parsed.token.expires_at.as_deref() {
            Some(s) => parse_iso8601_utc(s).ok_or_else(|| Error::Auth {
                url: url.to_string(),
                reason: format!("cannot read token expires_at {s:?}"),
            })?,
            // No expiry given: renew hourly anyway.
            None => started + Duration::from_secs(3600),
        };
        let lifetime = expires.duration_since(started).unwrap_or(Duration::ZERO);
        let margin = RENEW_MARGIN.min(lifetime / 2);
        tracing::debug!(
            url,
            lifetime_s = lifetime.as_secs(),
            "Keystone token issued"
        );
        Ok(CachedToken {
            value,
            renew_at: expires.checked_sub(margin).unwrap_or(started),
            catalog: parsed.token.catalog,
        })
    }
}

/// Parse Keystone's `2026-11-25T22:15:03.000000Z` (fraction optional, `Z` or `+00:00`).
pub fn parse_iso8601_utc(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (main, _) = if let Some(x) = s.strip_suffix('Z') {
        (x, ())
    } else if let Some(x) = s.strip_suffix("+00:00") {
        (x, ())
    } else {
        (s, ())
    };
    let (date, time) = main.split_once('T')?;
    let mut d = date.split('-');
    let (y, m, day) = (
        d.next()?.parse::<i64>().ok()?,
        d.next()?.parse::<u32>().ok()?,
        d.next()?.parse::<u32>().ok()?,
    );
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let time = time.split('.').next()?;
    let mut t = time.split(':');
    let (hh, mm, ss) = (
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<u64>().ok()?,
    );
    if t.next().is_some() || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days.checked_mul(86_400)? + (hh * 3600 + mm * 60 + ss) as i64;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keystone_timestamps_parse() {
        let t = parse_iso8601_utc("2026-11-25T22:15:03.000000Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_795_644_903
        );
        let t = parse_iso8601_utc("1970-01-01T00:00:00Z").unwrap();
        assert_eq!(t, UNIX_EPOCH);
        let t = parse_iso8601_utc("2000-03-01T00:00:00+00:00").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 951_868_800);
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "yesterday",
            "2026-01-01",
            "2026-01-01T25:00:00Z",
        ] {
            assert!(parse_iso8601_utc(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn auth_urls_get_the_tokens_path() {
        assert_eq!(
            tokens_url("http://k:5000/v3/").unwrap(),
            "http://k:5000/v3/auth/tokens"
        );
        assert_eq!(
            tokens_url("https://k/identity").unwrap(),
            "https://k/identity/v3/auth/tokens"
        );
        assert!(tokens_url("k:5000").is_err());
    }
}
