//! The webhook receiver the webhook tests point the server at: tests/interop/webhook_receiver.py,
//! a real HTTP server on a loopback port that verifies every call with PyPI's
//! `standardwebhooks` (an implementation of the signature check independent of the server's),
//! records each call and answers as the test tells it to (see the script's docstring).
//!
//! Needs a Python 3 with `standardwebhooks`: `$TIDEWIRE_TEST_WEBHOOK_PYTHON` when set (`.ci/run`
//! sets it to the virtualenv it installs the package in), else that virtualenv, else `python3`;
//! when none has it the harness builds the pinned virtualenv itself (PyPI). If even that fails
//! the tests fail and say why: they never pass silently.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use super::PATIENCE;

/// The pinned package, as `.ci/run` installs it.
pub const STANDARDWEBHOOKS: &str = "standardwebhooks==1.3.0";

fn cached_venv() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("tidewire-ci/standardwebhooks-1.3.0")
}

/// The Python interpreter that imports `standardwebhooks`, or a failure saying how to get one.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let works = |p: &Path| {
            Command::new(p)
                .args(["-c", "import standardwebhooks.webhooks"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let venv_python = cached_venv().join("bin/python");
        let mut tried = Vec::new();
        if let Some(p) = std::env::var_os("TIDEWIRE_TEST_WEBHOOK_PYTHON").filter(|p| !p.is_empty())
        {
            let p = PathBuf::from(p);
            if works(&p) {
                return p;
            }
            tried.push(format!("$TIDEWIRE_TEST_WEBHOOK_PYTHON ({})", p.display()));
        }
        for p in [venv_python.clone(), PathBuf::from("python3")] {
            if works(&p) {
                return p;
            }
            tried.push(p.display().to_string());
        }
        let built = Command::new("python3")
            .args(["-m", "venv"])
            .arg(cached_venv())
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&venv_python)
                .args(["-m", "pip", "install", "--quiet", STANDARDWEBHOOKS])
                .status()
                .is_ok_and(|s| s.success());
        if built && works(&venv_python) {
            return venv_python;
        }
        panic!(
            "the webhook tests verify calls with Python's standardwebhooks, and none of {} can \
             import it; building {} failed too (needs python3 with venv, and PyPI). Install it \
             with `python3 -m pip install {STANDARDWEBHOOKS}` and set \
             TIDEWIRE_TEST_WEBHOOK_PYTHON; `bash .ci/run` installs it by itself.",
            tried.join(", "),
            cached_venv().display()
        )
    })
}

/// A Standard Webhooks secret (`whsec_` + base64 of 32 bytes), different for each `n`.
pub fn secret(n: u8) -> String {
    use base64::Engine as _;
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(n))
        .collect();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// A running tests/interop/webhook_receiver.py. Its calls are kept in a file, so they survive
/// [`Receiver::stop`] and [`Receiver::restart`] (on the same port: "connection refused" in
/// between). Killed on drop.
pub struct Receiver {
    pub port: u16,
    child: Option<Child>,
    secret: String,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    /// Starts a receiver on a free loopback port verifying with `secret` and answering 200.
    pub fn start(secret: &str) -> Receiver {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = dir.path().join("calls.jsonl");
        let (child, port) = spawn(0, secret, &record);
        Receiver {
            port,
            child: Some(child),
            secret: secret.to_string(),
            record,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Kills the receiver (its port then refuses connections). Calls it had answered stay on
    /// record.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, answering 200 again unless `control` says otherwise.
    pub fn restart(&mut self, control: Option<Value>) {
        assert!(self.child.is_none(), "restart a stopped receiver");
        let (child, port) = spawn_with(self.port, &self.secret, &self.record, control);
        assert_eq!(port, self.port);
        self.child = Some(child);
    }

    /// Sets its behaviour (see the script's docstring).
    pub async fn control(&self, behaviour: Value) {
        let r = reqwest::Client::new()
            .post(self.url("/control"))
            .timeout(PATIENCE)
            .body(behaviour.to_string())
            .send()
            .await
            .expect("POST /control");
        assert_eq!(r.status(), 200, "the receiver refused {behaviour}");
    }

    /// Every call recorded so far, in arrival order (`GET /calls`).
    pub async fn calls(&self) -> Vec<Value> {
        self.snapshot().await["calls"]
            .as_array()
            .expect("calls")
            .clone()
    }

    /// The calls on `path` (any method), in arrival order.
    pub async fn calls_to(&self, path: &str) -> Vec<Value> {
        self.calls()
            .await
            .into_iter()
            .filter(|c| c["path"] == path)
            .collect()
    }

    /// `GET /calls` as it is: `{"calls": [...], "pending": [...]}`, where `pending` are the
    /// calls that arrived and are not answered yet.
    pub async fn snapshot(&self) -> Value {
        reqwest::Client::new()
            .get(self.url("/calls"))
            .timeout(PATIENCE)
            .send()
            .await
            .expect("GET /calls")
            .json()
            .await
            .expect("calls JSON")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(port: u16, secret: &str, record: &Path) -> (Child, u16) {
    spawn_with(port, secret, record, None)
}

/// Starts the script and reads the port it prints (bounded by [`PATIENCE`]).
fn spawn_with(port: u16, secret: &str, record: &Path, control: Option<Value>) -> (Child, u16) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/webhook_receiver.py");
    let mut cmd = Command::new(python());
    cmd.arg(&script)
        .args(["--port", &port.to_string(), "--secret", secret, "--record"])
        .arg(record)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("PYTHONPATH")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(c) = control {
        cmd.args(["--control", &c.to_string()]);
    }
    let mut child = cmd.spawn().expect("start webhook_receiver.py");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(PATIENCE).unwrap_or_default();
    let port = serde_json::from_str::<Value>(&line)
        .ok()
        .and_then(|v| v["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok());
    match port {
        Some(p) => (child, p),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("webhook_receiver.py did not say its port (its stderr is above): {line:?}")
        }
    }
}

/// Polls `probe` every 50 ms until it gives `Some`, for at most `within`; panics with `what`.
pub async fn wait_for<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of the `/metrics` samples named `name` whose labels include every `labels` pair
/// (in any order). 0 when none.
pub async fn metric_with(base: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = super::metrics_text(&reqwest::Client::new(), base).await;
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = series.split_once('{').unwrap_or((series, "}"));
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// `json!` of a behaviour that answers 200 to everything again.
pub fn all_ok() -> Value {
    json!({"status": 200, "retry_after": null, "location": null, "sleep": 0,
           "p500": 0, "p_slow": 0, "p429": 0, "script": []})
}
