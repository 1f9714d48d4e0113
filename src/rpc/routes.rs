//! The API's routes: HTTP in, engine operation through the admission rules of [`super::app`],
//! JSON out. Every request has a deadline (`server.request_timeout_secs`) covering lock and
//! budget waits.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::app::{App, Held, attach_resolved, engine_err, request_timeout, run_engine, take_kdf};
use super::errors::ApiError;
use super::peer::Peer;
use crate::request::{self, AttachRequest};
use crate::volume::{self, journal::Record};

type Resp = Response<Full<Bytes>>;

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(body) => with_body(status, "application/json", body),
        Err(e) => error_response(&ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode response: {e}"),
        )),
    }
}

pub fn error_response(e: &ApiError) -> Resp {
    with_body(e.status, "application/json", e.json().into_bytes())
}

fn with_body(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// The route templates (also the `route` metric label and what the OpenAPI test checks).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/metrics"),
    ("POST", "/v1/attachments"),
    ("GET", "/v1/attachments"),
    ("GET", "/v1/attachments/{volume_id}"),
    ("DELETE", "/v1/attachments/{volume_id}"),
    ("PATCH", "/v1/attachments/{volume_id}"),
    ("POST", "/v1/attachments/{volume_id}/extend"),
    ("POST", "/v1/attachments/{volume_id}/verify"),
    ("POST", "/v1/attachments/{volume_id}/rekey"),
    ("GET", "/v1/attachments/{volume_id}/verify"),
    ("DELETE", "/v1/attachments/{volume_id}/verify"),
];

/// Serve one request from an allowed peer: a span with the peer and the volume (and, once the
/// engine or the route has read or written the volume's journal record, its mapping and phase),
/// the deadline, one log line with the outcome.
pub async fn handle(app: Arc<App>, peer: Peer, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let span = tracing::info_span!(
        "request",
        %method,
        %path,
        peer_uid = peer.uid,
        peer_pid = peer.pid,
        volume_id = tracing::field::Empty,
        mapping = tracing::field::Empty,
        phase = tracing::field::Empty,
    );
    async move {
        let start = Instant::now();
        let mut timeout = app.config.server.request_timeout();
        if method == Method::POST && path == "/v1/attachments" {
            // An attach may wait for its device (wait_for_device, bounded by MAX_WAIT_SECS);
            // `attach` holds the parts before and after that wait to the plain deadline.
            timeout += std::time::Duration::from_secs(request::MAX_WAIT_SECS);
        }
        let (route, result) = match tokio::time::timeout(timeout, route(&app, req)).await {
            Ok(r) => r,
            Err(_) => ("timeout", Err(request_timeout(timeout))),
        };
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(status = e.status.as_u16(), code = e.code, field = e.field.as_deref(), error = %e.message, "request failed");
                error_response(&e)
            }
        };
        app.metrics.request(route, resp.status().as_u16());
        tracing::info!(
            status = resp.status().as_u16(),
            ms = start.elapsed().as_millis() as u64,
            "request done"
        );
        Ok(resp)
    }
    .instrument(span)
    .await
}

/// Answer every request of a peer the access rule refuses.
pub fn forbidden(app: &App, peer: &Peer) -> Resp {
    app.metrics.rejected_peer();
    app.metrics.request("forbidden", 403);
    tracing::warn!(
        peer_uid = peer.uid,
        peer_gid = peer.gid,
        peer_pid = peer.pid,
        "refused request from a peer that is not root, the agent's user or in its group"
    );
    let group = match app.access.group {
        Some(g) => format!("group {g}"),
        None => "no group is configured".to_owned(),
    };
    error_response(&ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "peer uid {} gid {} (pid {}) may not use this API: only root, uid {} and members of \
             the configured group ({group})",
            peer.uid, peer.gid, peer.pid, app.access.own_uid
        ),
    ))
}

type Routed = (&'static str, Result<Resp, ApiError>);

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Routed {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (segs.as_slice(), &method) {
        (["v1", "health"], &Method::GET) => ("/v1/health", health(app).await),
        (["metrics"], &Method::GET) => {
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = super::metrics::Format::negotiate(accept);
            ("/metrics", metrics(app, format).await)
        }
        (["v1", "attachments"], &Method::POST) => {
            let declared = header_len(&req_len(&req));
            (
                "/v1/attachments",
                attach(app, req.into_body(), declared).await,
            )
        }
        (["v1", "attachments"], &Method::GET) => ("/v1/attachments", list(app).await),
        (["v1", "attachments", id], &Method::GET) => {
            ("/v1/attachments/{volume_id}", get_one(app, id).await)
        }
        (["v1", "attachments", id], &Method::DELETE) => (
            "/v1/attachments/{volume_id}",
            detach(app, id, query.as_deref()).await,
        ),
        (["v1", "attachments", id], &Method::PATCH) => {
            let declared = header_len(&req_len(&req));
            (
                "/v1/attachments/{volume_id}",
                tune(app, id, req.into_body(), declared).await,
            )
        }
        (["v1", "attachments", id, "extend"], &Method::POST) => {
            ("/v1/attachments/{volume_id}/extend", extend(app, id).await)
        }
        (["v1", "attachments", id, "verify"], &Method::POST) => {
            let declared = header_len(&req_len(&req));
            (
                "/v1/attachments/{volume_id}/verify",
                verify(app, id, req.into_body(), declared).await,
            )
        }
        (["v1", "attachments", id, "rekey"], &Method::POST) => {
            let declared = header_len(&req_len(&req));
            (
                "/v1/attachments/{volume_id}/rekey",
                rekey(app, id, req.into_body(), declared).await,
            )
        }
        (["v1", "attachments", id, "verify"], m) if m == Method::GET || m == Method::DELETE => (
            "/v1/attachments/{volume_id}/verify",
            verify_job(app, id, m == Method::DELETE).await,
        ),
        (["v1", "health"] | ["metrics"] | ["v1", "attachments"], _)
        | (["v1", "attachments", _, "verify" | "rekey"], _)
        | (["v1", "attachments", _], _)
        | (["v1", "attachments", _, "extend"], _) => (
            "method_not_allowed",
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {path}"),
            )),
        ),
        _ => (
            "not_found",
            Err(ApiError::not_found(format!("no route {method} {path}"))),
        ),
    }
}

fn req_len(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn header_len(v: &Option<String>) -> Option<u64> {
    v.as_deref().and_then(|s| s.trim().parse().ok())
}

/// How much of a body declared too large is still read (and dropped) so the client sees the 413.
const DRAIN_MAX_BYTES: u64 = 1 << 20;

/// Read a body of at most `server.max_body_bytes`; more is 413 before anything is parsed.
async fn read_body(app: &App, body: Incoming, declared: Option<u64>) -> Result<Bytes, ApiError> {
    let max = app.config.server.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {max} bytes"),
        )
    };
    if let Some(n) = declared.filter(|&n| n > max) {
        // Read and drop a moderately oversized body before answering: a client still writing
        // it would otherwise fail on the closed connection instead of reading the 413 (seen
        // under emulation). Bodies beyond the drain bound are refused without reading them.
        if n <= DRAIN_MAX_BYTES {
            let mut body = body;
            while let Some(Ok(_)) = body.frame().await {}
        }
        return Err(too_large());
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("cannot read request body: {e}"),
        )),
    }
}

/// Parse the JSON body of the tune, rekey and verify routes ([`request::parse_flat`]): an
/// unknown field is refused naming the closest known one, as the attach route does, and every
/// error is the same 400 `invalid_json` with `field` the field concerned when there is one.
fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    request: &'static str,
    known: &[&str],
) -> Result<T, ApiError> {
    request::parse_flat(body, request, known).map_err(|e| {
        let err = ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string());
        match e.field_path() {
            Some(f) => err.with_field(f),
            None => err,
        }
    })
}

/// The fields of a verify request: the engine's [`volume::verify::Request`] and `async`.
const VERIFY_FIELDS: [&str; 6] = ["mode", "count", "start", "len", "max_rate_mb", "async"];

/// Parse the attach request, naming the field a type or unknown-field error is about.
fn parse_attach(body: &[u8]) -> Result<AttachRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: Result<AttachRequest, _> = serde_path_to_error::deserialize(&mut de);
    let req = parsed.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        if let Some(u) = request::unknown_field(&path, &inner) {
            let err = ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", u.to_string());
            return err.with_field(u.field_path().unwrap_or_default());
        }
        let err = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("request body is not a valid attach request: {inner}"),
        );
        // serde reports a missing field at its parent's path and names it in the message.
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next());
        // Syntax errors and truncation are about the document, not a field.
        let data_error = e.inner().classify() == serde_json::error::Category::Data;
        let known = data_error && !(path.is_empty() || path == "." || path == "?");
        match (known, missing) {
            (true, Some(m)) => err.with_field(format!("{path}.{m}")),
            (false, Some(m)) => err.with_field(m),
            (true, None) => err.with_field(path),
            (false, None) => err,
        }
    })?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("trailing data after the attach request: {e}"),
        )
    })?;
    Ok(req)
}

fn record_volume(volume_id: &str) {
    tracing::Span::current().record("volume_id", volume_id);
}

/// The mapping and journal phase of the volume's record, on the request span.
fn record_phase(r: &Record) {
    tracing::Span::current()
        .record("mapping", r.mapping_name.as_str())
        .record("phase", tracing::field::display(r.phase));
}

fn check_id(id: &str) -> Result<(), ApiError> {
    request::check_volume_id(id).map_err(|e| ApiError::from(&e))
}

async fn attach(app: &Arc<App>, body: Incoming, declared: Option<u64>) -> Result<Resp, ApiError> {
    // The whole request may last request_timeout_secs plus its device wait (see `handle`): the
    // parts before and after the wait each get the plain deadline.
    let deadline = app.config.server.request_timeout();
    let bytes = tokio::time::timeout(deadline, read_body(app, body, declared))
        .await
        .map_err(|_| request_timeout(deadline))??;
    let req = parse_attach(&bytes)?;
    let valid = req.validate_unresolved().map_err(|e| ApiError::from(&e))?;
    record_volume(&valid.volume_id);
    let valid = super::devices::resolve_for_attach(app, valid).await?;
    let outcome = tokio::time::timeout(deadline, attach_resolved(app, valid))
        .await
        .map_err(|_| request_timeout(deadline))??;
    let status = if outcome.already_attached() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_response(status, &outcome))
}

#[derive(Serialize)]
struct List {
    attachments: Vec<volume::VolumeStatus>,
}

async fn list(app: &Arc<App>) -> Result<Resp, ApiError> {
    let held = Held {
        _volume: None,
        _kdf: None,
        kdf_mib: 0,
    };
    let all = run_engine(app, "status", held, |ctx| {
        volume::status(ctx).map_err(engine_err)
    })
    .await?;
    Ok(json_response(StatusCode::OK, &List { attachments: all }))
}

fn unknown_volume(id: &str, app: &App) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_volume",
        format!(
            "volume {id} is not managed by volcrypt (no state record in {})",
            app.config.volume.state_dir.display()
        ),
    )
}

async fn get_one(app: &Arc<App>, id: &str) -> Result<Resp, ApiError> {
    check_id(id)?;
    record_volume(id);
    let held = Held {
        _volume: None,
        _kdf: None,
        kdf_mib: 0,
    };
    let id2 = id.to_owned();
    let not_found = unknown_volume(id, app);
    let (found, kept) = run_engine(app, "status", held, move |ctx| {
        let Some(r) = ctx.journal().get(&id2).map_err(engine_err)? else {
            return Err(not_found);
        };
        record_phase(&r);
        let status = volume::status(ctx)
            .map_err(engine_err)?
            .into_iter()
            .find(|s| s.volume_id == id2)
            .ok_or(not_found)?;
        Ok((status, r.last_verify))
    })
    .await?;
    let mut found = serde_json::to_value(&found).unwrap_or_default();
    // This agent's last job (even a cancelled one), else the last completed verify the
    // journal kept across a restart.
    let last = app
        .verify_jobs
        .last(id)
        .and_then(|l| serde_json::to_value(l).ok())
        .or(kept);
    if let Some(last) = last {
        found["last_verify"] = last;
    }
    Ok(json_response(StatusCode::OK, &found))
}

async fn detach(app: &Arc<App>, id: &str, query: Option<&str>) -> Result<Resp, ApiError> {
    check_id(id)?;
    record_volume(id);
    let device_path = query_param(query, "device_path")?.map(PathBuf::from);
    // A running verify would hold the volume's lock for a whole read of the disk: stop it.
    app.verify_jobs.cancel_and_wait(id).await;
    let guard = app.locks.lock(id).await;
    let held = Held {
        _volume: Some(guard),
        _kdf: None,
        kdf_mib: 0,
    };
    let id2 = id.to_owned();
    let not_found = unknown_volume(id, app);
    let outcome = run_engine(app, "detach", held, move |ctx| {
        // REST semantics: a volume with no record (and no device path to find an os-brick
        // mapping by) is unknown, not "already detached".
        match ctx.journal().get(&id2).map_err(engine_err)? {
            Some(r) => record_phase(&r),
            None if device_path.is_none() => return Err(not_found),
            None => {}
        }
        volume::detach(ctx, &id2, device_path.as_deref()).map_err(engine_err)
    })
    .await?;
    app.metrics
        .observe_detach_phases(&outcome.timings, outcome.was_active);
    // The volume is gone: its verify result and series too (attached again, it starts fresh).
    app.verify_jobs.forget(id);
    app.metrics.forget_volume(id);
    Ok(json_response(StatusCode::OK, &outcome))
}

/// The volume's lock and the KDF memory of unlocking its keyslot again (extend and verify
/// both do), as the record's header says.
pub(crate) async fn admit_unlock(app: &Arc<App>, id: &str) -> Result<Held, ApiError> {
    let guard = app.locks.lock(id).await;
    let volume = app.config.volume.clone();
    let estimate = app.config.server.kdf_memory_estimate_mib;
    let id2 = id.to_owned();
    let cost = tokio::task::spawn_blocking(move || {
        volume::status::extend_kdf_mib(&volume, &id2, estimate)
    })
    .await
    .unwrap_or(estimate);
    let (permit, n) = take_kdf(app, cost).await?;
    Ok(Held {
        _volume: Some(guard),
        _kdf: Some(permit),
        kdf_mib: n,
    })
}

async fn extend(app: &Arc<App>, id: &str) -> Result<Resp, ApiError> {
    check_id(id)?;
    record_volume(id);
    // Resizing a LUKS mapping unlocks a keyslot again: it costs a KDF.
    let held = admit_unlock(app, id).await?;
    let id2 = id.to_owned();
    let outcome = run_engine(app, "extend", held, move |ctx| {
        volume::extend(ctx, &id2).map_err(engine_err)
    })
    .await?;
    Ok(json_response(StatusCode::OK, &outcome))
}

/// Change an attached volume's performance flags online (`volume::tune`): its keyslot is
/// unlocked again, so it is admitted into the KDF budget like extend, under the volume's lock.
async fn tune(
    app: &Arc<App>,
    id: &str,
    body: Incoming,
    declared: Option<u64>,
) -> Result<Resp, ApiError> {
    check_id(id)?;
    record_volume(id);
    let body = read_body(app, body, declared).await?;
    let req: request::TuneRequest = parse_json(&body, "tune", &request::TUNE_FIELDS)?;
    req.validate().map_err(|e| ApiError::from(&e))?;
    let held = admit_unlock(app, id).await?;
    let id2 = id.to_owned();
    let not_found = unknown_volume(id, app);
    let outcome = run_engine(app, "tune", held, move |ctx| {
        match ctx.journal().get(&id2).map_err(engine_err)? {
            Some(r) => record_phase(&r),
            None => return Err(not_found),
        }
        volume::tune(ctx, &id2, &req).map_err(engine_err)
    })
    .await?;
    Ok(json_response(StatusCode::OK, &outcome))
}

/// Verify an attached volume (`volume::verify`) as a job ([`super::verify_jobs`]): admitted
/// into the KDF budget like an attach (its keyslot unlock costs the same), holding the volume's
/// lock so no other operation runs under it. Synchronous: 200 with the report whatever the
/// verdict ("cannot verify" is a 422 `cannot_verify`). `"async": true`: 202 with the job, to
/// follow and cancel at the same path.
async fn verify(
    app: &Arc<App>,
    id: &str,
    body: Incoming,
    declared: Option<u64>,
) -> Result<Resp, ApiError> {
    check_id(id)?;
    record_volume(id);
    let body = read_body(app, body, declared).await?;
    let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m);
    // The engine's request, plus `"async"`; `{}`, `{"async": true}` and no body are a sample.
    let mut body: serde_json::Map<String, serde_json::Value> =
        if body.iter().all(u8::is_ascii_whitespace) {
            Default::default()
        } else {
            parse_json(&body, "verify", &VERIFY_FIELDS)?
        };
    let run_async = match body.remove("async") {
        None => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(v) => {
            return Err(invalid(format!("async {v}: must be true or false")).with_field("async"));
        }
    };
    let req: volume::verify::Request = if body.is_empty() {
        Default::default()
    } else {
        let rest = serde_json::to_vec(&body).unwrap_or_default();
        parse_json(&rest, "verify", &VERIFY_FIELDS)?
    };
    if let Some(r) = req.max_rate_mb.filter(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(invalid(format!(
            "max_rate_mb {r}: must be a positive number"
        )));
    }
    // An unknown volume leaves no job behind.
    let journal = volume::Journal::new(&app.config.volume.state_dir);
    let id2 = id.to_owned();
    match tokio::task::spawn_blocking(move || journal.get(&id2)).await {
        Ok(Ok(Some(_))) => {}
        Ok(Ok(None)) => return Err(unknown_volume(id, app)),
        Ok(Err(e)) => return Err(engine_err(e)),
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
            ));
        }
    }
    use super::verify_jobs::{Trigger, start};
    let (job, done) = start(app, id, req, Trigger::Api)?;
    if run_async {
        let mut r = json_response(StatusCode::ACCEPTED, &job);
        if let Ok(v) = format!("/v1/attachments/{id}/verify").parse() {
            r.headers_mut().insert(hyper::header::LOCATION, v);
        }
        return Ok(r);
    }
    let report = done.await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "verify job lost",
        )
    })??;
    Ok(json_response(StatusCode::OK, &report))
}

/// The body of `POST /v1/attachments/{volume_id}/rekey`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RekeyRequest {
    new_key_id: String,
}

/// Rekey a volume (`volume::rekey`): admitted like extend (it unlocks keyslots), under the
/// volume's lock; the mapping stays active.
async fn rekey(
    app: &Arc<App>,
    id: &str,
    body: Incoming,
    declared: Option<u64>,
) -> Result<Resp, ApiError> {
    check_id(id)?;
    record_volume(id);
    let body = read_body(app, body, declared).await?;
    let req: RekeyRequest = parse_json(&body, "rekey", &["new_key_id"])?;
    let held = admit_unlock(app, id).await?;
    let id2 = id.to_owned();
    let outcome = run_engine(app, "rekey", held, move |ctx| {
        volume::rekey(ctx, &id2, &req.new_key_id).map_err(engine_err)
    })
    .await?;
    Ok(json_response(StatusCode::OK, &outcome))
}

/// `GET …/verify`: the running job with its progress, else the last finished one with its
/// report. `DELETE …/verify`: cancel the running job and answer once it has ended.
async fn verify_job(app: &Arc<App>, id: &str, cancel: bool) -> Result<Resp, ApiError> {
    check_id(id)?;
    record_volume(id);
    let view = if cancel {
        app.verify_jobs
            .cancel_and_wait(id)
            .await
            .ok_or_else(|| ApiError::not_found(format!("no verify of volume {id} is running")))?
    } else {
        app.verify_jobs.view(id).ok_or_else(|| {
            ApiError::not_found(format!(
                "no verify of volume {id} has run since the agent started"
            ))
        })?
    };
    Ok(json_response(StatusCode::OK, &view))
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
    dm_crypt: Check,
    state_dir: Check,
    key_managers: Vec<KeyManagerHealth>,
    operations_in_flight: usize,
    kdf_memory_budget_mib: u32,
    reconcile: volume::Report,
}

#[derive(Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

#[derive(Serialize)]
struct KeyManagerHealth {
    kind: String,
    /// `null`: the key-manager layer offers no reachability probe yet.
    reachable: Option<bool>,
    detail: String,
}

fn dm_crypt_check() -> Check {
    let (ok, detail) = volume::dm::crypt_target_status();
    Check { ok, detail }
}

fn state_dir_check(dir: &std::path::Path) -> Check {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Check {
            ok: true,
            detail: dir.display().to_string(),
        },
        Ok(_) => Check {
            ok: false,
            detail: format!("{} is not a directory", dir.display()),
        },
        // The engine creates it on first attach; its parent must be usable.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check {
            ok: true,
            detail: format!("{} (created on first attach)", dir.display()),
        },
        Err(e) => Check {
            ok: false,
            detail: format!("{}: {e}", dir.display()),
        },
    }
}

async fn health(app: &Arc<App>) -> Result<Resp, ApiError> {
    let app2 = app.clone();
    let h = tokio::task::spawn_blocking(move || {
        let dm_crypt = dm_crypt_check();
        let state_dir = state_dir_check(&app2.config.volume.state_dir);
        let key_managers = match (&app2.keys.manager, (app2.keys.factory)()) {
            (Some(m), _) => vec![match m.health() {
                Ok(()) => KeyManagerHealth {
                    kind: m.kind().to_owned(),
                    reachable: Some(true),
                    detail: "reachable".into(),
                },
                Err(e) => KeyManagerHealth {
                    kind: m.kind().to_owned(),
                    reachable: Some(false),
                    detail: e.to_string(),
                },
            }],
            (None, Ok(k)) => vec![KeyManagerHealth {
                kind: k.kind().to_owned(),
                reachable: None,
                detail: "configured; this key source has no reachability probe".into(),
            }],
            (None, Err(e)) => vec![KeyManagerHealth {
                kind: "unavailable".into(),
                reachable: Some(false),
                detail: e,
            }],
        };
        let ok =
            dm_crypt.ok && state_dir.ok && key_managers.iter().all(|k| k.reachable != Some(false));
        Health {
            status: if ok { "ok" } else { "degraded" },
            version: env!("CARGO_PKG_VERSION"),
            dm_crypt,
            state_dir,
            key_managers,
            operations_in_flight: app2.operations_in_flight(),
            kdf_memory_budget_mib: app2.kdf_budget_mib,
            reconcile: app2
                .reconcile
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let status = if h.status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(status, &h))
}

async fn metrics(app: &Arc<App>, format: super::metrics::Format) -> Result<Resp, ApiError> {
    let journal = volume::Journal::new(&app.config.volume.state_dir);
    if let Ok(Ok(records)) = tokio::task::spawn_blocking(move || journal.list()).await {
        use volume::journal::Phase;
        let count = |p: Phase| records.iter().filter(|r| r.phase == p).count() as i64;
        let (waiting, lost) = (count(Phase::Waiting), count(Phase::Lost));
        app.metrics
            .active_attachments
            .set(records.len() as i64 - waiting - lost);
        app.metrics.waiting_attachments.set(waiting);
        app.metrics.lost_attachments.set(lost);
    }
    Ok(with_body(
        StatusCode::OK,
        format.content_type(),
        app.metrics.encode(format).into_bytes(),
    ))
}

/// One query parameter, percent-decoded (`%2F` → `/`).
fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, ApiError> {
    let Some(q) = query else {
        return Ok(None);
    };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            return percent_decode(v).map(Some).ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("query parameter {name} is not valid percent-encoded UTF-8"),
                )
                .with_field(name)
            });
        }
    }
    Ok(None)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encode a query value (the client's side of [`query_param`]).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_round_trip() {
        let p = "/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.x-lun-1 &=%";
        let q = format!("a=1&device_path={}", percent_encode(p));
        assert_eq!(
            query_param(Some(&q), "device_path").unwrap().as_deref(),
            Some(p)
        );
        assert_eq!(query_param(Some("a=1"), "device_path").unwrap(), None);
        assert!(query_param(Some("device_path=%zz"), "device_path").is_err());
        assert!(query_param(Some("device_path=%f"), "device_path").is_err());
    }

    #[test]
    fn attach_parse_errors_name_the_field() {
        let e = parse_attach(br#"{"volume_id": 5, "device_path": "/dev/x"}"#).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.field.as_deref()),
            (400, Some("volume_id"))
        );
        let e = parse_attach(b"{not json").unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.code, e.field),
            (400, "invalid_json", None)
        );
        // device_path may be left out for a `device` selector: the model's check names it.
        let r = parse_attach(br#"{"volume_id": "v"}"#).unwrap();
        let e = ApiError::from(&r.validate_unresolved().unwrap_err());
        assert_eq!(
            (e.status.as_u16(), e.field.as_deref()),
            (400, Some("device_path"))
        );
        let e = parse_attach(br#"{"volume_id":"v","device":{"serail":"x"}}"#).unwrap_err();
        assert!(e.message.contains("serail"), "{}", e.message);
        assert_eq!(e.field.as_deref(), Some("device.serail"));
        let e = parse_attach(br#"{"volume_id":"v","device_path":"/d","optons":{}}"#).unwrap_err();
        assert!(e.message.contains("optons"), "{}", e.message);
        let e = parse_attach(br#"{"volume_id":"v","device_path":"/d"} x"#).unwrap_err();
        assert_eq!(e.code, "invalid_json");
    }
}
