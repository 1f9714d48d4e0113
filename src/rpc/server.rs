//! The listener: the Unix socket (created safely), the accept loop with the peer check, and
//! graceful shutdown.
//!
//! Socket rules: default `/run/volcrypt/api.sock`; a missing parent directory is created 0750
//! (group: the configured one); the socket is chmod 0660 and chowned to the group right after
//! bind (the 0750 directory keeps others out in between); a socket file already there is
//! replaced only when nothing accepts on it, and anything else at that path is refused.
//! Shutdown: stop accepting and unlink the socket (new clients fail fast), let connections finish
//! their current request, wait for engine operations up to `server.shutdown_grace_secs`.

use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::UnixListener;

use super::app::App;
use super::config::ServeConfig;
use super::peer::{Access, Peer, resolve_group};
use super::routes::{forbidden, handle};
use super::{Error, Keys};

/// Slow or idle clients may not hold a connection open forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A bound socket, ready to serve.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    /// (dev, ino) of the socket we created, so shutdown unlinks only our own file.
    identity: (u64, u64),
    gid: Option<u32>,
}

impl Listener {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn sock_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Socket {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

/// Create the socket as the rules above say. Must run inside a tokio runtime.
pub fn bind(config: &ServeConfig) -> Result<Listener, Error> {
    let path = config.server.socket.clone();
    let gid = match &config.server.group {
        Some(g) => Some(resolve_group(g).map_err(|d| sock_err(&path, d))?),
        None => None,
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| sock_err(&path, "has no parent directory"))?;
    if !parent.exists() {
        std::fs::create_dir_all(parent)
            .map_err(|e| sock_err(&path, format!("cannot create {}: {e}", parent.display())))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o750))
            .map_err(|e| sock_err(&path, format!("chmod 0750 {}: {e}", parent.display())))?;
        if let Some(g) = gid {
            std::os::unix::fs::chown(parent, None, Some(g))
                .map_err(|e| sock_err(&path, format!("chown {}: {e}", parent.display())))?;
        }
    }
    remove_stale(&path)?;
    let listener = UnixListener::bind(&path).map_err(|e| sock_err(&path, format!("bind: {e}")))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| sock_err(&path, format!("chmod 0660: {e}")))?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(&path, None, Some(g))
            .map_err(|e| sock_err(&path, format!("chown to gid {g}: {e}")))?;
    }
    let meta = std::fs::symlink_metadata(&path).map_err(|e| sock_err(&path, e.to_string()))?;
    Ok(Listener {
        listener,
        path,
        identity: (meta.dev(), meta.ino()),
        gid,
    })
}

/// A socket file left by a dead agent is removed; a live one (something accepts) is an error;
/// a non-socket is never touched.
fn remove_stale(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(sock_err(path, e.to_string())),
    };
    if !meta.file_type().is_socket() {
        return Err(sock_err(
            path,
            "exists and is not a socket: refusing to replace it",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::AlreadyServing {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(|e| sock_err(path, format!("remove stale: {e}")))
        }
        Err(e) => Err(sock_err(
            path,
            format!("cannot tell whether it is in use: {e}"),
        )),
    }
}

/// Serve until `shutdown` resolves, then shut down gracefully.
pub async fn serve(
    listener: Listener,
    config: ServeConfig,
    keys: Keys,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let grace = config.server.shutdown_grace();
    let app = Arc::new(App::new(config, Access::new(listener.gid), keys));
    tracing::info!(
        socket = %listener.path.display(),
        group = listener.gid,
        kdf_budget_mib = app.config.server.kdf_budget_mib(),
        "volcrypt agent listening"
    );
    let reconciled = app.spawn_reconcile();
    super::devices::start(app.clone(), reconciled);
    super::verify_jobs::spawn_periodic(app.clone());
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let peer = match Peer::of(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials: dropping connection");
                continue;
            }
        };
        let app = app.clone();
        let allowed = app.access.allows(&peer);
        let svc = service_fn(move |req| {
            let app = app.clone();
            async move {
                if allowed {
                    handle(app, peer, req).await
                } else {
                    Ok(forbidden(&app, &peer))
                }
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down: no new connections");
    let Listener {
        listener: l,
        path,
        identity,
        ..
    } = listener;
    drop(l);
    unlink_if_ours(&path, identity);
    let drained = tokio::time::timeout(grace, async {
        graceful.shutdown().await;
        app.drain().await;
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("shutdown complete"),
        Err(_) => tracing::warn!(
            in_flight = app.operations_in_flight(),
            grace_secs = grace.as_secs(),
            "shutdown grace period over with operations still running; they end with the process"
        ),
    }
    Ok(())
}

fn unlink_if_ours(path: &Path, identity: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == identity => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "cannot remove socket");
            }
        }
        Ok(_) => {
            tracing::warn!(socket = %path.display(), "socket was replaced by someone else: leaving it")
        }
        Err(_) => {}
    }
}

/// Installs the SIGTERM/SIGINT handlers at once and returns a future resolving on either.
/// Called before the socket is bound: a signal arriving as soon as the socket exists (a
/// supervisor stopping a just-started agent) must be a graceful stop, not the default kill.
/// Needs the tokio runtime's context.
pub fn termination_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => tracing::info!("SIGTERM received"),
                    _ = i.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; stopping only on Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// The whole agent: runtime, socket, serve until SIGTERM/SIGINT.
pub fn run_blocking(config: ServeConfig, keys: Keys) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("volcrypt-rpc")
        .build()
        .map_err(|e| Error::Runtime(e.to_string()))?;
    let grace = config.server.shutdown_grace();
    let result = rt.block_on(async {
        let stop = termination_signal();
        let listener = bind(&config)?;
        serve(listener, config, keys, stop).await
    });
    // Operations that outlived the grace period are not waited for again.
    rt.shutdown_timeout(grace.min(Duration::from_secs(1)));
    result
}
