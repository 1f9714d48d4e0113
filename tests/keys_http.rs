//! The Barbican client's transport policy, without a Barbican: unreachable endpoints, a server
//! that never answers (timeouts), and a tiny local HTTP responder that counts connections to
//! prove that 5xx answers are retried and 4xx answers are not.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use volcrypt::config::{BarbicanAuth, BarbicanConfig, HeaderAuth, StaticToken};
use volcrypt::keys::{Barbican, Error, KeyManager};

fn cfg(endpoint: &str, retries: u32, backoff: f64) -> BarbicanConfig {
    BarbicanConfig {
        endpoint: Some(endpoint.to_string()),
        connect_timeout: 1.0,
        read_timeout: 0.5,
        retries,
        backoff_initial: backoff,
        backoff_max: 10.0,
        auth: Some(BarbicanAuth::Headers(HeaderAuth {
            project_id: "p".into(),
            roles: "member".into(),
            user_id: None,
        })),
        ..BarbicanConfig::default()
    }
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn unreachable_server_fails_after_the_retries_in_bounded_time() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let b = Barbican::from_config(&cfg(&url, 3, 0.1)).unwrap();
    let t = Instant::now();
    let err = b.get("3e1b2c4d-0000-4000-8000-000000000001").unwrap_err();
    let elapsed = t.elapsed();
    match &err {
        Error::Unreachable {
            attempts, key_id, ..
        } => {
            assert_eq!(*attempts, 4);
            assert_eq!(
                key_id.as_deref(),
                Some("3e1b2c4d-0000-4000-8000-000000000001")
            );
        }
        other => panic!("expected Unreachable, got {other}"),
    }
    // Backoff 0.1 + 0.2 + 0.4 s between the four attempts.
    assert!(
        elapsed >= Duration::from_millis(700),
        "{elapsed:?}: no backoff?"
    );
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(volcrypt::error::ExitStatus::from(err.kind()).code(), 2);
    assert!(err.to_string().contains(&url), "{err}");
    assert!(matches!(b.health(), Err(Error::Unreachable { .. })));
}

#[test]
fn a_server_that_never_answers_times_out() {
    // Accepts connections (the kernel does, via the backlog) but never responds.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let b = Barbican::from_config(&cfg(&url, 1, 0.1)).unwrap();
    let t = Instant::now();
    let err = b.get("k1").unwrap_err();
    let elapsed = t.elapsed();
    assert!(
        matches!(err, Error::Unreachable { attempts: 2, .. }),
        "{err}"
    );
    // Two 0.5 s read timeouts and one 0.1 s backoff.
    assert!(elapsed >= Duration::from_millis(1000), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    drop(l);
}

/// Answers every request with `status` and counts requests; records the request headers.
struct Responder {
    url: String,
    count: Arc<AtomicU32>,
    last_headers: Arc<std::sync::Mutex<Vec<String>>>,
}

fn responder(status: u16) -> Responder {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let count = Arc::new(AtomicU32::new(0));
    let last_headers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, h) = (count.clone(), last_headers.clone());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { break };
            serve(conn, status, &c, &h);
        }
    });
    Responder {
        url,
        count,
        last_headers,
    }
}

fn serve(conn: TcpStream, status: u16, count: &AtomicU32, headers: &std::sync::Mutex<Vec<String>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            lines.push(line.trim_end().to_string());
        }
        count.fetch_add(1, Ordering::SeqCst);
        *headers.lock().unwrap() = lines;
        let body = format!("{{\"code\": {status}}}");
        let _ = write!(
            conn,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
}

#[test]
fn server_errors_are_retried_then_reported() {
    let r = responder(503);
    let b = Barbican::from_config(&cfg(&r.url, 2, 0.05)).unwrap();
    let err = b.get("k-503").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Server {
                status: 503,
                attempts: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(r.count.load(Ordering::SeqCst), 3);
    assert!(err.to_string().contains("k-503"), "{err}");
}

#[test]
fn client_errors_are_never_retried() {
    for (status, check) in [
        (
            404u16,
            (|e: &Error| matches!(e, Error::NotFound { .. })) as fn(&Error) -> bool,
        ),
        (403, |e| matches!(e, Error::Forbidden { .. })),
        (401, |e| matches!(e, Error::Auth { .. })),
        (400, |e| matches!(e, Error::Protocol { .. })),
    ] {
        let r = responder(status);
        let b = Barbican::from_config(&cfg(&r.url, 5, 0.05)).unwrap();
        let err = b.get("k-4xx").unwrap_err();
        assert!(check(&err), "HTTP {status}: {err}");
        assert_eq!(
            r.count.load(Ordering::SeqCst),
            1,
            "HTTP {status} was retried"
        );
    }
}

#[test]
fn header_auth_sends_what_keystonemiddleware_would_set_and_static_tokens_are_sent() {
    let r = responder(404);
    let b = Barbican::from_config(&cfg(&r.url, 0, 0.05)).unwrap();
    let _ = b.get("k1");
    let h = r
        .last_headers
        .lock()
        .unwrap()
        .join("\n")
        .to_ascii_lowercase();
    assert!(h.starts_with("get /v1/secrets/k1 http/1.1"), "{h}");
    assert!(h.contains("x-identity-status: confirmed"), "{h}");
    assert!(h.contains("x-project-id: p"), "{h}");
    assert!(h.contains("x-roles: member"), "{h}");
    assert!(h.contains("accept: application/json"), "{h}");

    let r = responder(401);
    let mut c = cfg(&r.url, 0, 0.05);
    c.auth = Some(BarbicanAuth::Token(StaticToken {
        token: toml::from_str::<Tok>("token = \"gAAAAtok3n\"")
            .unwrap()
            .token,
    }));
    let b = Barbican::from_config(&c).unwrap();
    let err = b.get("k2").unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(
        !err.to_string().contains("gAAAAtok3n"),
        "token leaked: {err}"
    );
    let h = r.last_headers.lock().unwrap().join("\n");
    assert!(
        h.contains("X-Auth-Token: gAAAAtok3n") || h.contains("x-auth-token: gAAAAtok3n"),
        "{h}"
    );
}

#[derive(serde::Deserialize)]
struct Tok {
    token: volcrypt::config::ConfigSecret,
}
