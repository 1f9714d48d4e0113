//! The server in-process (library calls), with a key source the test controls, to prove the
//! concurrency rules through the API: per-volume serialization, parallel
//! volumes, the KDF memory budget, request deadlines that leave the volume locked until the
//! operation ends, and graceful shutdown that lets an in-flight operation finish.
//!
//! On this host every engine call ends in a 404 (unknown volume) or 503 (no device-mapper)
//! after the key source returns: the events the key source records (which calls overlapped,
//! in which order they started and ended) prove the scheduling, not dm-crypt. Nothing here
//! measures time: the build hosts are shared, so a wall-clock bound would test the load.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use volcrypt::keys::{KeyManager, Secret};
use volcrypt::rpc::client::call_async;
use volcrypt::rpc::config::ServeConfig;
use volcrypt::rpc::{KeyFactory, Keys, server};

struct NoKeys;
impl KeyManager for NoKeys {
    fn kind(&self) -> &'static str {
        "test"
    }
    fn get(&self, key_id: &str) -> Result<Secret, volcrypt::keys::Error> {
        Err(volcrypt::keys::Error::NotFound {
            key_id: key_id.into(),
            manager: "test",
        })
    }
    fn health(&self) -> Result<(), volcrypt::keys::Error> {
        Ok(())
    }
}

/// What the key factory saw: it runs inside each engine call (on the blocking pool, after the
/// per-volume lock and the KDF budget are taken), so its calls show the server's scheduling
/// as events — how many calls overlapped and in which order they started and ended — with no
/// assumption about how fast this host is.
#[derive(Default)]
struct Probe {
    state: Mutex<ProbeState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProbeState {
    /// Calls started so far.
    started: usize,
    /// Calls inside the factory now, and the most there ever were at once.
    inside: usize,
    max_inside: usize,
    /// "start N" / "end N" in the order they happened (N: the call's number, from 1).
    events: Vec<String>,
    /// Calls may return: opened by the test ([`Probe::open`]).
    open: bool,
}

/// How long a call waits for a partner or for the test before it gives up: far longer than
/// any scheduling delay, and reached only when the behaviour under test is broken (a call
/// that should overlap another never sees it).
const PATIENCE: Duration = Duration::from_secs(60);

impl Probe {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProbeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the gate: every held call returns, and later calls do not wait.
    fn open(&self) {
        self.lock().open = true;
        self.changed.notify_all();
    }

    /// Waits until `pred` holds for the state (or [`PATIENCE`] runs out: false).
    fn wait_for(&self, pred: impl Fn(&ProbeState) -> bool) -> bool {
        let deadline = Instant::now() + PATIENCE;
        let mut st = self.lock();
        while !pred(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn snapshot(&self) -> (usize, usize, Vec<String>) {
        let st = self.lock();
        (st.started, st.max_inside, st.events.clone())
    }
}

/// How a factory call behaves once inside.
#[derive(Clone, Copy)]
enum Hold {
    /// Return when another call is inside at the same time (proves overlap), or after
    /// `linger` alone (giving a wrongly admitted second call the chance to show up).
    Rendezvous { linger: Duration },
    /// The first `n` calls return only when the test opens the gate; later ones at once.
    GateFirst(usize),
}

/// A key factory reporting to a [`Probe`] and holding each call as `hold` says.
fn probed_keys(hold: Hold) -> (KeyFactory, Arc<Probe>) {
    let probe = Arc::new(Probe::default());
    let p = probe.clone();
    let f: KeyFactory = Arc::new(move || {
        let n = {
            let mut st = p.lock();
            st.started += 1;
            st.inside += 1;
            st.max_inside = st.max_inside.max(st.inside);
            let n = st.started;
            st.events.push(format!("start {n}"));
            n
        };
        p.changed.notify_all();
        match hold {
            Hold::Rendezvous { linger } => {
                let deadline = Instant::now() + linger;
                let mut st = p.lock();
                while st.max_inside < 2 && !st.open {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    st = p
                        .changed
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            Hold::GateFirst(k) if n <= k => {
                p.wait_for(|st| st.open);
            }
            Hold::GateFirst(_) => {}
        }
        {
            let mut st = p.lock();
            st.inside -= 1;
            st.events.push(format!("end {n}"));
        }
        p.changed.notify_all();
        Ok(Arc::new(NoKeys) as Arc<dyn KeyManager>)
    });
    (f, probe)
}

fn config(dir: &Path, server_extra: &str) -> ServeConfig {
    volcrypt::config::parse_serve(&format!(
        "[server]\nsocket = \"{}\"\n{server_extra}\n[volume]\nstate_dir = \"{}\"\nby_id_dir = \"{}\"\n\
         [key_manager.keystore]\ndir = \"{}\"\n",
        dir.join("api.sock").display(),
        dir.join("state").display(),
        dir.join("by-id").display(),
        dir.join("keys").display()
    ))
    .unwrap()
    .0
}

/// Run `body` against a server; returns when both are done.
async fn with_server<F, Fut>(cfg: ServeConfig, keys: KeyFactory, body: F)
where
    F: FnOnce(std::path::PathBuf, tokio::sync::oneshot::Sender<()>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let sock = cfg.server.socket.clone();
    let listener = server::bind(&cfg).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server::serve(
        listener,
        cfg,
        Keys::from_factory(keys),
        async move {
            let _ = rx.await;
        },
    ));
    body(sock.clone(), tx).await;
    tokio::time::timeout(Duration::from_secs(20), srv)
        .await
        .expect("server did not stop")
        .unwrap()
        .unwrap();
    assert!(!sock.exists(), "socket not removed");
}

async fn status_of(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let r = call_async(sock, method, path, body.map(|b| b.as_bytes().to_vec()))
        .await
        .unwrap();
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

fn attach_body(volume: &str) -> String {
    format!(
        r#"{{"volume_id": "{volume}", "device_path": "/nonexistent/{volume}",
            "encryption": {{"provider": "luks2", "control_location": "front-end",
                            "encryption_key_id": "k-{volume}"}}}}"#
    )
}

/// Events as one line, for assertion messages.
fn show(events: &[String]) -> String {
    events.join(", ")
}

/// Two requests for one volume never overlap: the second starts only after the first ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_volume_is_serialized() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, probe) = probed_keys(Hold::Rendezvous {
        linger: Duration::from_secs(1),
    });
    with_server(config(dir.path(), ""), keys, |sock, stop| async move {
        let (a, b) = tokio::join!(
            status_of(&sock, "DELETE", "/v1/attachments/vol-a", None),
            status_of(&sock, "DELETE", "/v1/attachments/vol-a", None),
        );
        assert_eq!((a.0, b.0), (404, 404), "{a:?} {b:?}");
        let (started, max_inside, events) = probe.snapshot();
        assert_eq!(started, 2);
        assert_eq!(
            max_inside,
            1,
            "same volume ran in parallel: {}",
            show(&events)
        );
        assert_eq!(events, ["start 1", "end 1", "start 2", "end 2"]);
        let _ = stop.send(());
    })
    .await;
}

/// Requests for different volumes overlap: each call waits inside until it sees the other
/// there, which only happens if the server runs them at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_volumes_run_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, probe) = probed_keys(Hold::Rendezvous { linger: PATIENCE });
    with_server(config(dir.path(), ""), keys, |sock, stop| async move {
        let (a, b) = tokio::join!(
            status_of(&sock, "DELETE", "/v1/attachments/vol-b", None),
            status_of(&sock, "DELETE", "/v1/attachments/vol-c", None),
        );
        assert_eq!((a.0, b.0), (404, 404), "{a:?} {b:?}");
        let (started, max_inside, events) = probe.snapshot();
        assert_eq!(started, 2);
        assert_eq!(
            max_inside,
            2,
            "different volumes serialized: {}",
            show(&events)
        );
        let _ = stop.send(());
    })
    .await;
}

/// Two attaches of 60 MiB each: with a 100 MiB budget the second is admitted only after the
/// first ended; with 200 MiB both are inside together. Either way the budget is returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kdf_budget_queues_attaches_that_do_not_fit() {
    for (budget, expect_serial) in [(100, true), (200, false)] {
        let dir = tempfile::tempdir().unwrap();
        let linger = if expect_serial {
            Duration::from_secs(1)
        } else {
            PATIENCE
        };
        let (keys, probe) = probed_keys(Hold::Rendezvous { linger });
        let cfg = config(
            dir.path(),
            &format!("kdf_memory_budget_mib = {budget}\nkdf_memory_estimate_mib = 60"),
        );
        with_server(cfg, keys, |sock, stop| async move {
            let (b1, b2) = (attach_body("v1"), attach_body("v2"));
            let (a, b) = tokio::join!(
                status_of(&sock, "POST", "/v1/attachments", Some(&b1)),
                status_of(&sock, "POST", "/v1/attachments", Some(&b2)),
            );
            // No device-mapper here: the engine answers 503 once admitted (404 for the missing
            // device where device-mapper exists).
            assert!(
                [503, 404].contains(&a.0) && [503, 404].contains(&b.0),
                "{a:?} {b:?}"
            );
            let (started, max_inside, events) = probe.snapshot();
            assert_eq!(started, 2, "budget {budget} MiB");
            if expect_serial {
                assert_eq!(
                    events,
                    ["start 1", "end 1", "start 2", "end 2"],
                    "over-budget attaches ran together (budget {budget} MiB)"
                );
            } else {
                assert_eq!(
                    max_inside,
                    2,
                    "in-budget attaches serialized (budget {budget} MiB): {}",
                    show(&events)
                );
            }
            let m = status_of(&sock, "GET", "/metrics", None).await.1;
            assert!(
                m.contains("volcrypt_kdf_memory_in_use_mib 0"),
                "budget not returned: {m}"
            );
            assert!(
                m.contains("volcrypt_kdf_budget_wait_seconds_count 2"),
                "{m}"
            );
            let _ = stop.send(());
        })
        .await;
    }
}

/// A request whose operation outlives the deadline gets 504, the operation keeps the volume
/// locked until it really ends (a retry of the same volume starts only after it), and other
/// volumes are not held up meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_gives_504_and_the_volume_stays_locked_until_the_operation_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, probe) = probed_keys(Hold::GateFirst(1));
    let cfg = config(dir.path(), "request_timeout_secs = 2");
    with_server(cfg, keys, |sock, stop| async move {
        // Call 1 (vol-t) is held until the gate opens: the deadline passes first.
        let (s, body) = status_of(&sock, "DELETE", "/v1/attachments/vol-t", None).await;
        assert_eq!(s, 504, "{body}");
        assert!(body.contains("\"timeout\""), "{body}");
        // Another volume is not held up: call 2 runs and ends while call 1 is still inside.
        assert_eq!(
            status_of(&sock, "DELETE", "/v1/attachments/vol-u", None)
                .await
                .0,
            404
        );
        let (_, _, events) = probe.snapshot();
        assert_eq!(events, ["start 1", "start 2", "end 2"]);
        // The same volume again: it must wait for call 1, still running.
        let s2 = sock.clone();
        let retry =
            tokio::spawn(
                async move { status_of(&s2, "DELETE", "/v1/attachments/vol-t", None).await },
            );
        // Give a wrongly unlocked retry the time to reach the factory before call 1 ends (an
        // opportunity to fail, not a bound: a slow host only makes the check weaker).
        tokio::time::sleep(Duration::from_millis(500)).await;
        probe.open();
        let (s, body) = retry.await.unwrap();
        assert_eq!(s, 404, "{body}");
        let (started, _, events) = probe.snapshot();
        assert_eq!(started, 3);
        assert_eq!(
            events,
            ["start 1", "start 2", "end 2", "end 1", "start 3", "end 3"],
            "the retry ran before the timed-out operation ended: lock released early"
        );
        let _ = stop.send(());
    })
    .await;
}

/// Shutdown while an operation runs: new connections are refused at once, the in-flight
/// request still gets its answer, and no other operation starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_in_flight_operation_finish_and_refuses_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, probe) = probed_keys(Hold::GateFirst(1));
    let p = probe.clone();
    with_server(config(dir.path(), ""), keys, |sock, stop| async move {
        let s2 = sock.clone();
        let inflight =
            tokio::spawn(
                async move { status_of(&s2, "DELETE", "/v1/attachments/vol-s", None).await },
            );
        // The operation is inside the engine before the stop.
        let inside = tokio::task::spawn_blocking(move || p.wait_for(|st| st.started == 1));
        assert!(
            inside.await.unwrap(),
            "the request never reached the engine"
        );
        let _ = stop.send(());
        // The listener goes away while the operation is still held: new clients fail.
        let deadline = Instant::now() + PATIENCE;
        while call_async(&sock, "GET", "/v1/health", None).await.is_ok() {
            assert!(Instant::now() < deadline, "still accepting after the stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(probe.snapshot().2, ["start 1"], "finished before the stop?");
        probe.open();
        let (s, body) = inflight.await.unwrap();
        assert_eq!(s, 404, "in-flight request was not completed: {body}");
        let (started, _, events) = probe.snapshot();
        assert_eq!(started, 1);
        assert_eq!(events, ["start 1", "end 1"]);
    })
    .await;
}
