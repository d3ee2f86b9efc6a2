//! Shared parts of the real-browser tests: a tiny HTTP server of the test's own that serves one
//! page and takes the page's JSON reports, and headless Chromium as a child process killed by
//! its PID (and process group) on drop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const CHROMIUM: &str = "/usr/bin/chromium";

// ---------------------------------------------------------------------------------------------
// The test's own HTTP server.

/// The page's latest report: `{opens, errors, readyState, events: [{type, id, data}]}`.
pub type Report = Arc<Mutex<Option<Value>>>;

/// Serves the page at `/` and takes the page's reports at `POST /report`. One request per
/// connection (`Connection: close`): this is test scaffolding, not a web server.
pub async fn page_server(html: String) -> (u16, Report) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind page server");
    let port = listener.local_addr().expect("page addr").port();
    (port, serve_page(listener, html))
}

/// [`page_server`] on a port chosen beforehand (e.g. with `free_addr`), for a page whose
/// origin the server must be told before the page can be written.
pub async fn page_server_on(port: u16, html: String) -> Report {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind page server");
    serve_page(listener, html)
}

fn serve_page(listener: TcpListener, html: String) -> Report {
    let report: Report = Arc::new(Mutex::new(None));
    let html = Arc::new(html);
    let shared = report.clone();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let (html, report) = (html.clone(), shared.clone());
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), serve_one(conn, &html, &report))
                        .await;
            });
        }
    });
    report
}

async fn serve_one(mut conn: TcpStream, html: &str, report: &Report) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(()); // a speculative preconnect that never sent anything
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let content_length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < content_length {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (status, content_type, payload): (&str, &str, Vec<u8>) = match (method, path) {
        ("GET", "/") => (
            "200 OK",
            "text/html; charset=utf-8",
            html.as_bytes().to_vec(),
        ),
        ("POST", "/report") => match serde_json::from_slice::<Value>(&body) {
            Ok(v) => {
                *report.lock().expect("report lock") = Some(v);
                ("200 OK", "text/plain", b"ok".to_vec())
            }
            Err(_) => ("400 Bad Request", "text/plain", b"bad json".to_vec()),
        },
        _ => ("404 Not Found", "text/plain", b"not found".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        payload.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&payload).await?;
    conn.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Chromium as a child process, killed by its PID (and its process group) on drop.

pub struct Browser {
    pub child: Child,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Fails (never skips) when the browser is not installed.
    pub fn require() {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: this test needs Debian's Chromium. Run `bash .ci/run` \
             (installs it) or `sudo apt-get install chromium`."
        );
    }

    pub fn launch(url: &str) -> Browser {
        Self::launch_with(url, &[])
    }

    /// [`Browser::launch`] with extra command-line switches (e.g. `--remote-debugging-port=0`
    /// for [`DevTools`], `--window-size=W,H`).
    pub fn launch_with(url: &str, extra: &[&str]) -> Browser {
        Self::require();
        let profile = tempfile::tempdir().expect("profile dir");
        let log = profile.path().join("chromium.log");
        let stderr = std::fs::File::create(&log).expect("chromium log file");
        let mut cmd = Command::new(CHROMIUM);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        // Its own process group, so the renderer and helper processes go with it.
        .process_group(0);
        let child = cmd.spawn().expect("launch chromium");
        Browser {
            child,
            log,
            _profile: profile,
        }
    }

    /// Panics (with the browser's log) if Chromium has died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "chromium exited early ({status}); its log:\n{}",
                self.log_tail()
            );
        }
    }

    /// The profile directory Chromium runs with (where it writes `DevToolsActivePort`).
    pub fn profile_dir(&self) -> PathBuf {
        self._profile.path().join("profile")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pid = self.child.id();
        // The whole group we created (the group id is the PID we started), then the PID.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long [`wait_for`] waits for a page.
pub const PAGE_WAIT: Duration = Duration::from_secs(60);

/// Waits until the page's report satisfies `done`; panics with the report and the browser's
/// log after [`PAGE_WAIT`], or at once if the browser died.
pub async fn wait_for(
    what: &str,
    report: &Report,
    browser: &mut Browser,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + PAGE_WAIT;
    loop {
        let r = snapshot(report);
        if done(&r) {
            return r;
        }
        browser.assert_alive();
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; the page's last report: {r}\nchromium log:\n{}",
            browser.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids of the envelopes a page reported under `events`, in the order it got them.
pub fn report_ids(report: &Value) -> Vec<u64> {
    report["events"]
        .as_array()
        .map(|evs| evs.iter().map(|e| e["id"].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default()
}

/// The page's latest report, or `null` before the first one.
pub fn snapshot(report: &Report) -> Value {
    report
        .lock()
        .expect("report lock")
        .clone()
        .unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// The Chrome DevTools Protocol, just enough to drive a page as its user would (type, click,
// read what it shows) and take a screenshot: for pages that cannot report to the test's own
// server (the console's Content-Security-Policy allows only its own origin).

/// A DevTools session on the first page of a browser launched with `--remote-debugging-port=0`.
pub struct DevTools {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl DevTools {
    /// Attaches to the page `browser` opened (waits for Chromium to announce its port).
    pub async fn attach(browser: &mut Browser) -> DevTools {
        let file = browser.profile_dir().join("DevToolsActivePort");
        let deadline = std::time::Instant::now() + super::PATIENCE;
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse::<u16>().ok())
            {
                break port;
            }
            browser.assert_alive();
            assert!(
                std::time::Instant::now() < deadline,
                "Chromium never wrote {}",
                file.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let url = loop {
            let list: Value = match reqwest::get(format!("http://127.0.0.1:{port}/json/list")).await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let page = list.as_array().and_then(|l| {
                l.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            });
            if let Some(url) = page {
                break url;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no page target in DevTools: {list}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("attach to the page over DevTools");
        DevTools { ws, next: 0 }
    }

    /// Calls a DevTools method and returns its `result` (panics on a protocol error).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        self.next += 1;
        let id = self.next;
        let msg = serde_json::json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("DevTools send");
        loop {
            let m = tokio::time::timeout(super::PATIENCE, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools {method}: no answer"))
                .expect("DevTools closed")
                .expect("DevTools error");
            let Ok(text) = m.into_text() else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] != id {
                continue; // an event
            }
            if !v["error"].is_null() {
                panic!("DevTools {method}: {}", v["error"]);
            }
            return v["result"].clone();
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        if !r["exceptionDetails"].is_null() {
            panic!("{expr}: threw {}", r["exceptionDetails"]);
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` (an expression, not awaited) until it is truthy, within
    /// [`super::PATIENCE`]; returns its value.
    pub async fn wait_for(&mut self, what: &str, expr: &str) -> Value {
        let deadline = std::time::Instant::now() + super::PATIENCE;
        // Not there yet (an element the page has not drawn) counts as not yet.
        let guarded =
            format!("(() => {{ try {{ return ({expr}); }} catch (e) {{ return null; }} }})()");
        loop {
            let v = self.eval(&guarded).await;
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what} ({expr})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG of the page as it is shown now.
    pub async fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let r = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({ "format": "png" }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        std::fs::write(path, png).expect("write the screenshot");
    }
}
