//! API errors: the JSON body `{"error": {"code", "message", "field"}}` and the HTTP status for
//! every engine failure, so clients branch on `status`/`code` and humans read `message`.
//!
//! Status rules: 400 invalid request, 403 peer not allowed, 404 unknown volume,
//! key or device, 409 conflict or busy, 413 body too large, 422 wrong key or not LUKS, 503
//! device-mapper unavailable, 504 timeout (the request's deadline passed; the operation may
//! still complete in the background and `GET /v1/attachments/{id}` tells).

use hyper::StatusCode;
use serde::Serialize;

use crate::kind::Kind;
use crate::volume;

/// One failed request, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable reason; also the `reason` label of the failure metric.
    pub code: &'static str,
    pub message: String,
    /// The offending request field (JSON path), when one is to blame.
    pub field: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    pub fn json(&self) -> String {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        // Serializing plain strings cannot fail; fall back to a fixed body rather than panic.
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"code":"internal","message":"cannot encode error","field":null}}"#.into()
        })
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    /// The kind of failure an API answer reports (the CLI's `--socket` mode exits with it).
    pub fn kind_for(status: u16, code: &str) -> Kind {
        match (status, code) {
            (_, "wrong_key") => Kind::NoKey,
            (_, "unknown_key" | "key_manager_unreachable" | "key_forbidden") => Kind::NoKey,
            (404, _) => Kind::WrongDevice,
            (409, _) => Kind::Busy,
            (503, "out_of_memory") => Kind::OutOfMemory,
            (_, "mismatch") => Kind::Mismatch,
            (_, "cannot_verify") => Kind::CannotVerify,
            _ => Kind::Invalid,
        }
    }
}

impl From<&crate::request::Error> for ApiError {
    fn from(e: &crate::request::Error) -> ApiError {
        let mut a = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
        a.field = e.field_path();
        a
    }
}

impl From<&volume::verify::Error> for ApiError {
    fn from(e: &volume::verify::Error) -> ApiError {
        use volume::verify::Error as E;
        let (status, code) = match e {
            E::Volume(v) => return ApiError::from(v.as_ref()),
            E::CannotVerify { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "cannot_verify"),
            E::Mismatch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "mismatch"),
            E::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::Cancelled { .. } => (StatusCode::CONFLICT, "cancelled"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<&volume::Error> for ApiError {
    fn from(e: &volume::Error) -> ApiError {
        use volume::Error as E;
        let (status, code) = match e {
            E::Request(r) => return ApiError::from(r),
            E::Key { source, .. } => {
                use crate::keys::Error as K;
                match source {
                    K::NotFound { .. } => (StatusCode::NOT_FOUND, "unknown_key"),
                    K::InvalidKeyId { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
                    K::Forbidden { .. } => (StatusCode::BAD_GATEWAY, "key_forbidden"),
                    K::Unreachable { .. } | K::Server { .. } | K::Auth { .. } => {
                        (StatusCode::BAD_GATEWAY, "key_manager_unreachable")
                    }
                    _ => (StatusCode::BAD_GATEWAY, "key_manager"),
                }
            }
            E::DmUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "dm_unavailable"),
            E::WrongKey { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "wrong_key"),
            E::NoDevice { .. } => (StatusCode::NOT_FOUND, "unknown_device"),
            E::NameConflict { .. } => (StatusCode::CONFLICT, "name_conflict"),
            E::OwnedByOther { .. } => (StatusCode::CONFLICT, "attached_elsewhere"),
            E::StaleBusy { .. } | E::Busy { .. } | E::InUse { .. } => {
                (StatusCode::CONFLICT, "busy")
            }
            E::RefuseFormat { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "not_luks"),
            E::Crypt { kind, .. } => match kind {
                Kind::NoKey => (StatusCode::UNPROCESSABLE_ENTITY, "wrong_key"),
                Kind::Busy => (StatusCode::CONFLICT, "busy"),
                Kind::WrongDevice => (StatusCode::NOT_FOUND, "unknown_device"),
                Kind::OutOfMemory => (StatusCode::SERVICE_UNAVAILABLE, "out_of_memory"),
                Kind::Invalid => (StatusCode::UNPROCESSABLE_ENTITY, "crypt_failed"),
                Kind::Mismatch => (StatusCode::UNPROCESSABLE_ENTITY, "mismatch"),
                Kind::CannotVerify => (StatusCode::UNPROCESSABLE_ENTITY, "cannot_verify"),
                // Only the client reports this kind; the engine never does.
                Kind::AgentLost => (StatusCode::INTERNAL_SERVER_ERROR, "crypt_failed"),
            },
            E::Dm { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "dm_error"),
            E::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "io_error"),
            E::State { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "state_error"),
            E::NotManaged { .. } => (StatusCode::NOT_FOUND, "unknown_volume"),
            E::NotEncrypted { .. } => (StatusCode::CONFLICT, "not_encrypted"),
            E::Refused { .. } => (StatusCode::CONFLICT, "refused"),
            E::ReconcileFailed { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "reconcile_failed"),
        };
        let field = e.field().map(str::to_owned);
        ApiError {
            status,
            code,
            message: e.to_string(),
            field,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_get_the_statuses_of_the_issue() {
        let dm = volume::Error::DmUnavailable { detail: "x".into() };
        let a = ApiError::from(&dm);
        assert_eq!((a.status.as_u16(), a.code), (503, "dm_unavailable"));
        assert!(a.message.contains("device-mapper is not available"));
        let wk = volume::Error::WrongKey {
            key_id: "k1".into(),
            device: "/dev/loop0".into(),
        };
        assert_eq!(ApiError::from(&wk).status.as_u16(), 422);
        let nm = volume::Error::NotManaged {
            volume_id: "v".into(),
            state_dir: "/s".into(),
        };
        assert_eq!(ApiError::from(&nm).status.as_u16(), 404);
        let busy = volume::Error::Busy {
            name: "crypt-x".into(),
            open_count: 1,
            holders: "none".into(),
            processes: "none".into(),
            waited_ms: 10,
        };
        assert_eq!(ApiError::from(&busy).status.as_u16(), 409);
        let key = volume::Error::Key {
            key_id: "k9".into(),
            source: crate::keys::Error::NotFound {
                key_id: "k9".into(),
                manager: "keystore",
            },
        };
        let a = ApiError::from(&key);
        assert_eq!((a.status.as_u16(), a.code), (404, "unknown_key"));
        assert_eq!(a.field.as_deref(), Some("encryption.encryption_key_id"));
    }

    #[test]
    fn body_has_code_message_and_field() {
        let a = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "bad \"x\"")
            .with_field("encryption.provider");
        let v: serde_json::Value = serde_json::from_str(&a.json()).unwrap();
        assert_eq!(v["error"]["code"], "invalid_request");
        assert_eq!(v["error"]["message"], "bad \"x\"");
        assert_eq!(v["error"]["field"], "encryption.provider");
        let v: serde_json::Value =
            serde_json::from_str(&ApiError::not_found("nope").json()).unwrap();
        assert!(v["error"]["field"].is_null());
    }

    #[test]
    fn cli_exit_statuses_follow_cryptsetup() {
        assert_eq!(ApiError::kind_for(422, "wrong_key"), Kind::NoKey);
        assert_eq!(ApiError::kind_for(409, "busy"), Kind::Busy);
        assert_eq!(ApiError::kind_for(404, "unknown_volume"), Kind::WrongDevice);
        assert_eq!(ApiError::kind_for(400, "invalid_request"), Kind::Invalid);
    }
}
