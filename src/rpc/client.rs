//! A tiny blocking client for the API, used by the CLI's `--socket PATH` mode (and the tests):
//! one HTTP/1.1 request per connection over the Unix socket.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;

use super::Error;

/// Responses larger than this are not read (a status listing of thousands of volumes is still
/// far below).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A response: status and body bytes.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("response is not JSON: {e}"))
    }

    /// 2xx as JSON; anything else as [`Error::Remote`] with the server's code and message.
    pub fn into_result(self) -> Result<serde_json::Value, Error> {
        if (200..300).contains(&self.status) {
            return self.json().map_err(|detail| Error::Client {
                socket: Default::default(),
                detail,
            });
        }
        let v = self.json().unwrap_or_default();
        let e = &v["error"];
        Err(Error::Remote {
            status: self.status,
            code: e["code"].as_str().unwrap_or("unknown").to_owned(),
            message: e["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned()),
            field: e["field"].as_str().map(str::to_owned),
        })
    }
}

/// Send one request and read the whole response.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Reply, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime(e.to_string()))?;
    rt.block_on(call_async(socket, method, path, body))
}

/// The async form of [`call`].
pub async fn call_async(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Reply, Error> {
    let err = |detail: String| Error::Client {
        socket: socket.to_owned(),
        detail,
    };
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        err(format!(
            "cannot connect (is `volcrypt serve` running?): {e}"
        ))
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| err(format!("handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let has_body = body.is_some();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "volcrypt");
    if has_body {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| err(format!("bad request {method} {path}: {e}")))?;
    let lost = |detail: String| Error::AgentLost {
        socket: socket.to_owned(),
        detail,
    };
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| lost(format!("{method} {path}: {e}")))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                err(format!(
                    "the response is larger than {MAX_RESPONSE_BYTES} bytes"
                ))
            } else {
                lost(format!("reading the response: {e}"))
            }
        })?
        .to_bytes()
        .to_vec();
    Ok(Reply {
        status,
        content_type,
        body,
    })
}
