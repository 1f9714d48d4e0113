//! `volcrypt serve`: the attach engine as a long-running agent with an HTTP/1.1 + JSON API on a
//! Unix socket. The agent holds HTTP, access control, admission (per-volume locks, the KDF
//! memory budget, deadlines) and the udev event plumbing; everything that touches
//! device-mapper, libcryptsetup, links or the journal is the engine's ([`crate::volume`]).
//!
//! - [`config`]: the `[server]` section and its defaults;
//! - [`server`]: the socket (permissions, stale-file rule), accept loop, graceful shutdown;
//! - [`peer`]: SO_PEERCRED and the access rule (root, the agent's user, the configured group);
//! - [`app`]: the shared state and admission, the start-up reconcile under the volume locks;
//! - [`routes`]: the endpoints;
//! - [`devices`]: udev-triggered activation (device selectors, waits, teardown on remove);
//! - [`waiters`]: attaches waiting for their device to appear;
//! - [`errors`]: the JSON error body and the status of every engine error;
//! - [`verify_jobs`]: verify jobs (progress, cancel, last result, periodic verification);
//! - [`metrics`]: Prometheus metrics;
//! - [`client`]: the small client behind the CLI's `--socket` mode.
//!
//! The API is described in `docs/openapi.yaml`; `tests/rpc_openapi.rs` holds the server to it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::keys::KeyManager;
use crate::kind::Kind;

pub mod app;
pub mod client;
pub mod config;
pub mod devices;
pub mod errors;
pub mod metrics;
pub mod peer;
pub mod reactivate;
pub mod routes;
pub mod server;
pub mod verify_jobs;
pub mod waiters;

/// Hands each engine operation its key manager. Production: the one shared, thread-safe
/// manager built from `[key_manager]`; tests: a manager that takes a known time to arrive, to
/// measure scheduling through the API.
pub type KeyFactory = Arc<dyn Fn() -> Result<Arc<dyn KeyManager>, String> + Send + Sync>;

/// Where the agent's engine operations get keys, and what `GET /v1/health` probes.
#[derive(Clone)]
pub struct Keys {
    pub factory: KeyFactory,
    /// The key manager behind the factory, for its health probe (`None`: not probed).
    pub manager: Option<Arc<dyn KeyManager>>,
}

impl Keys {
    /// One shared key manager (the production case).
    pub fn from_manager(manager: Arc<dyn KeyManager>) -> Keys {
        let m = manager.clone();
        Keys {
            factory: Arc::new(move || Ok(m.clone())),
            manager: Some(manager),
        }
    }

    /// Any factory (tests).
    pub fn from_factory(factory: KeyFactory) -> Keys {
        Keys {
            factory,
            manager: None,
        }
    }
}

/// Agent and client errors (not API errors: those are [`errors::ApiError`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket {path}: {detail}")]
    Socket { path: PathBuf, detail: String },
    #[error("socket {path}: another agent is listening on it (stop it first)")]
    AlreadyServing { path: PathBuf },
    #[error("key manager: {0}")]
    Keys(#[from] crate::keys::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(String),
    #[error("agent at {socket}: {detail}")]
    Client { socket: PathBuf, detail: String },
    /// Connected and sent, but the agent closed the connection before its answer was complete.
    #[error(
        "agent at {socket} closed the connection before answering ({detail}): it died or was stopped mid-request; the request may or may not have been carried out"
    )]
    AgentLost { socket: PathBuf, detail: String },
    /// The agent answered with an error.
    #[error("agent: {message} (HTTP {status}, {code}{})", field.as_deref().map(|f| format!(", field {f}")).unwrap_or_default())]
    Remote {
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
    },
}

impl Error {
    pub fn kind(&self) -> Kind {
        match self {
            Error::Remote { status, code, .. } => errors::ApiError::kind_for(*status, code),
            Error::AlreadyServing { .. } => Kind::Busy,
            Error::Client { .. } => Kind::WrongDevice,
            Error::AgentLost { .. } => Kind::AgentLost,
            _ => Kind::Invalid,
        }
    }
}
