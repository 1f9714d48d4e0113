//! The real agent: start the `volcrypt serve` binary on a socket in a temp dir, talk to it with
//! the crate's HTTP client, and check every response against docs/openapi.yaml.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use volcrypt::rpc::client::{self, Reply};

pub const BIN: &str = env!("CARGO_BIN_EXE_volcrypt");

pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Start `volcrypt serve` with a config in a fresh temp dir; `extra_server` is appended to
    /// the `[server]` section.
    pub fn start(extra_server: &str) -> Agent {
        Agent::start_with(extra_server, "")
    }

    /// Like [`Agent::start`], with lines appended to the `[volume]` section too.
    pub fn start_with(extra_server: &str, extra_volume: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/api.sock");
        let config = dir.path().join("volcrypt.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nsocket = \"{}\"\n{extra_server}\n[volume]\nstate_dir = \"{}\"\nby_id_dir = \"{}\"\n{extra_volume}\n\
                 [key_manager.keystore]\ndir = \"{}\"\n",
                socket.display(),
                dir.path().join("state").display(),
                dir.path().join("by-id").display(),
                dir.path().join("keys").display(),
            ),
        )
        .unwrap();
        let log = dir.path().join("agent.log");
        let child = spawn(&config, &log);
        let mut agent = Agent {
            child,
            dir,
            socket,
            log,
        };
        agent.wait_ready();
        agent
    }

    /// SIGTERM the agent and start it again with the same configuration and directories.
    pub fn restart(&mut self) {
        assert!(self.terminate().success());
        self.child = spawn(&self.dir.path().join("volcrypt.toml"), &self.log);
        self.wait_ready();
    }

    /// Start the agent again after [`Agent::terminate`] (same configuration and directories),
    /// so a test can change things while no agent runs.
    pub fn start_again(&mut self) {
        self.child = spawn(&self.dir.path().join("volcrypt.toml"), &self.log);
        self.wait_ready();
    }

    /// The health document once the start-up reconcile check has finished.
    pub fn health_after_reconcile(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, v) = self.checked("GET", "/v1/health", "/v1/health", None);
            if v["reconcile"]["detail"] != "start-up check still running" {
                return v;
            }
            assert!(Instant::now() < deadline, "reconcile check did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Until the agent accepts on its socket (a killed agent's socket file refuses until a new
    /// one has replaced it); a panic with its log if it exits or takes over 60 s.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("agent exited early ({status}): {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent did not listen within 60 s: {}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        client::call(&self.socket, method, path, body.map(<[u8]>::to_vec)).unwrap()
    }

    /// Call and check the response against the OpenAPI document for `route`.
    pub fn checked(
        &self,
        method: &str,
        route: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> (u16, Value) {
        let r = self.call(method, path, body);
        let v = if r.status == 200 && route == "/metrics" {
            Value::String(String::from_utf8(r.body.clone()).unwrap())
        } else {
            r.json()
                .unwrap_or_else(|e| panic!("{method} {path}: {e}: {:?}", r.body))
        };
        OpenApi::load().check_response(method, route, r.status, &v);
        (r.status, v)
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `volcrypt serve` on `config`, JSON logs at info level appended to `log`, not yet started
/// (a test may add to its environment).
pub fn serve_command(config: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--log-level",
        "info",
        "--log-format",
        "json",
        "serve",
        "--config",
    ])
    .arg(config)
    .stdout(Stdio::null())
    .stderr(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap(),
    );
    cmd
}

fn spawn(config: &Path, log: &Path) -> Child {
    serve_command(config, log).spawn().unwrap()
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Assert an error body: the documented shape, the status, the code, the field.
pub fn assert_error(
    status: u16,
    v: &Value,
    want_status: u16,
    want_code: &str,
    want_field: Option<&str>,
) {
    assert_eq!(status, want_status, "body: {v}");
    assert_eq!(v["error"]["code"], want_code, "body: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    match want_field {
        Some(f) => assert_eq!(v["error"]["field"], f, "body: {v}"),
        None => assert!(v["error"]["field"].is_null(), "body: {v}"),
    }
}

/// The OpenAPI document, and a small JSON-schema check (type, required, properties, items,
/// enum, nullable, additionalProperties: false, $ref) — enough to hold responses to it.
pub struct OpenApi(pub Value);

impl OpenApi {
    pub fn load() -> OpenApi {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let yaml: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        OpenApi(serde_json::to_value(yaml).unwrap())
    }

    pub fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        let mut v = v;
        while let Some(r) = v.get("$ref").and_then(Value::as_str) {
            let ptr = r.strip_prefix('#').expect("local $ref");
            v = self
                .0
                .pointer(ptr)
                .unwrap_or_else(|| panic!("dangling $ref {r}"));
        }
        v
    }

    pub fn operation(&self, method: &str, route: &str) -> &Value {
        let op = &self.0["paths"][route][method.to_lowercase()];
        assert!(
            op.is_object(),
            "{method} {route} is not documented in docs/openapi.yaml"
        );
        op
    }

    /// The documented schema of `method route` answering `status`.
    pub fn response_schema(&self, method: &str, route: &str, status: u16) -> Option<&Value> {
        let op = self.operation(method, route);
        let resp = op["responses"]
            .get(status.to_string())
            .unwrap_or_else(|| panic!("{method} {route}: status {status} is not documented"));
        let resp = self.resolve(resp);
        let content = resp["content"].as_object()?;
        let (_, media) = content.iter().next()?;
        Some(&media["schema"])
    }

    pub fn check_response(&self, method: &str, route: &str, status: u16, body: &Value) {
        if let Some(schema) = self.response_schema(method, route, status)
            && let Err(e) = self.validate(schema, body, "$")
        {
            panic!(
                "{method} {route} → {status}: body does not match the documented schema: {e}\nbody: {body}"
            );
        }
    }

    pub fn validate(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        if v.is_null() {
            return if schema["nullable"] == true || schema.get("type").is_none() {
                Ok(())
            } else {
                Err(format!("{at}: null where {} is documented", schema["type"]))
            };
        }
        if let Some(e) = schema["enum"].as_array()
            && !e.contains(v)
        {
            return Err(format!("{at}: {v} is not one of {e:?}"));
        }
        let ty = schema["type"].as_str().unwrap_or("");
        let ok = match ty {
            "" => true,
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "boolean" => v.is_boolean(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            other => return Err(format!("{at}: unsupported schema type {other}")),
        };
        if !ok {
            return Err(format!("{at}: {v} is not of type {ty}"));
        }
        if let Some(obj) = v.as_object() {
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !obj.contains_key(r) {
                    return Err(format!("{at}: required property {r} is missing"));
                }
            }
            let props = schema["properties"].as_object();
            for (k, val) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => self.validate(s, val, &format!("{at}.{k}"))?,
                    None if schema["additionalProperties"] == false => {
                        return Err(format!("{at}: property {k} is not documented"));
                    }
                    None => return Err(format!("{at}: property {k} is not documented")),
                }
            }
        }
        if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
            for (i, x) in arr.iter().enumerate() {
                self.validate(items, x, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }
}
