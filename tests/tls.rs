//! TLS against the real server on 127.0.0.1: HTTPS publish and SSE, HTTP/2 chosen by ALPN,
//! WSS, curl as an independent client, certificate reload on SIGHUP without dropping
//! streams, start-up refusal of unusable certificates and keys, and the slow-client and
//! connection-cap defences over TLS.
//!
//! Certificates come from a CA generated in each test with rcgen (no external tool); the
//! clients (reqwest with rustls, tokio-rustls, tokio-tungstenite, curl) trust only that CA.
mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{metric_via, next_event, BinServer, PATIENCE};
use eventsource_stream::{Event as SseEvent, Eventsource};
use futures_util::{SinkExt, Stream, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tidewire::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

// ---- Certificates ----------------------------------------------------------------------

/// A test CA that signs server certificates for `127.0.0.1` and `localhost`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// One server certificate: the PEM chain (leaf, then the CA), its PEM key (PKCS#8), and the
/// leaf's DER to recognise it in a handshake.
struct Leaf {
    chain_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tidewire test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        Pki {
            ca: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A server certificate with subject `cn` and serial `serial`.
    fn leaf(&self, cn: &str, serial: u64) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(serial.into());
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("sign leaf");
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.ca.pem()),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// The certificate and key files a server is started with.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Files {
    fn write(dir: &Path, pki: &Pki, leaf: &Leaf) -> Files {
        let files = Files {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
        };
        std::fs::write(&files.ca, pki.ca_pem()).expect("write CA");
        files.replace(leaf);
        files
    }

    /// Replaces both files the way a certificate manager would: each written aside, then
    /// renamed into place.
    fn replace(&self, leaf: &Leaf) {
        for (path, text) in [(&self.cert, &leaf.chain_pem), (&self.key, &leaf.key_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write PEM");
            std::fs::rename(&tmp, path).expect("rename PEM");
        }
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

// ---- Clients -----------------------------------------------------------------------------

fn https_url(addr: SocketAddr, path: &str) -> String {
    format!("https://{addr}{path}")
}

/// reqwest over rustls trusting only `ca_pem`; offers h2 and http/1.1 unless `http1_only`.
/// No overall timeout: SSE responses are read for as long as a test needs.
fn https_client(ca_pem: &str, http1_only: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"))
        .connect_timeout(PATIENCE);
    if http1_only {
        b = b.http1_only();
    }
    b.build().expect("https client")
}

/// A rustls client configuration trusting only `ca_pem`, offering `alpn`.
fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM"))
        .expect("add CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A fresh TCP + TLS connection to `addr`, verified as `server_name`.
async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
    server_name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    tokio::time::timeout(
        PATIENCE,
        TlsConnector::from(client_config(ca_pem, alpn)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// The leaf certificate a new connection to `addr` is shown.
async fn presented_leaf(addr: SocketAddr, ca_pem: &str) -> Vec<u8> {
    let tls = tls_connect(addr, ca_pem, &[b"http/1.1"], "127.0.0.1")
        .await
        .expect("TLS connect");
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .to_vec()
}

/// Opens an SSE stream over HTTPS with reqwest + eventsource-stream.
async fn sse(
    client: &reqwest::Client,
    url: &str,
) -> impl Stream<Item = Result<SseEvent, String>> + Unpin {
    let resp = client
        .get(url)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("SSE connect");
    assert_eq!(resp.status(), 200, "SSE refused");
    Box::pin(
        resp.bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string())),
    )
}

/// Publishes `data` to `topic` over HTTPS; returns the id (asserts 201).
async fn publish(client: &reqwest::Client, addr: SocketAddr, topic: &str, data: Value) -> u64 {
    let resp = tokio::time::timeout(
        PATIENCE,
        client
            .post(https_url(addr, &format!("/v1/topics/{topic}/events")))
            .header("content-type", "application/json")
            .body(json!({ "data": data }).to_string())
            .send(),
    )
    .await
    .expect("publish in time")
    .expect("publish");
    assert_eq!(resp.status(), 201, "publish refused");
    let body: Value = resp.json().await.expect("receipt");
    body["first_id"].as_u64().expect("first_id")
}

/// Waits until `GET /readyz` over HTTPS answers 200; fails at once when `exited` says the
/// server process stopped.
async fn wait_ready_tls(
    addr: SocketAddr,
    ca_pem: &str,
    mut exited: impl FnMut() -> Option<String>,
) {
    let client = https_client(ca_pem, true);
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(why) = exited() {
            panic!("tidewire on {addr} stopped before it was ready: {why}");
        }
        if let Ok(r) = client
            .get(https_url(addr, "/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "server never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the server closes `s` (EOF or reset) within `within`; returns what it sent.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

// ---- Servers ---------------------------------------------------------------------------

/// The server in this process (`server::run`) with TLS on, on `127.0.0.1:0`.
struct InProcess {
    addr: SocketAddr,
    ca_pem: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl InProcess {
    async fn start(dir: &Path, tune: impl FnOnce(&mut Config)) -> InProcess {
        let pki = Pki::new();
        let files = Files::write(dir, &pki, &pki.leaf("tidewire test server", 1));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut config = Config {
            data_dir: dir.join("data"),
            tls_cert: Some(files.cert.clone()),
            tls_key: Some(files.key.clone()),
            ..Config::default()
        };
        common::use_backend(&mut config).await;
        tune(&mut config);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            if let Err(e) = tidewire::server::run(listener, config, shutdown).await {
                panic!("server failed: {e}");
            }
        });
        let ca_pem = pki.ca_pem();
        wait_ready_tls(addr, &ca_pem, || None).await;
        InProcess {
            addr,
            ca_pem,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        https_url(self.addr, path)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server did not stop in time")
                .expect("server task panicked");
        }
    }
}

/// The `tidewire` binary with TLS flags, its stderr collected line by line.
struct TlsBin {
    server: BinServer,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl TlsBin {
    async fn spawn(data_dir: &Path, files: &Files, ca_pem: &str) -> TlsBin {
        let addr = common::free_addr();
        let backend = common::backend_flags(data_dir).await;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(&backend)
            .args(files.flags())
            .env("RUST_LOG", "tidewire=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tidewire");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("stderr pipe");
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[tidewire] {line}");
                lines.lock().expect("stderr lines").push(line);
            }
        });
        let mut server = BinServer { addr, child };
        wait_ready_tls(addr, ca_pem, || {
            server
                .child
                .try_wait()
                .expect("wait")
                .map(|st| format!("exited with {st}"))
        })
        .await;
        TlsBin { server, stderr }
    }

    fn pid(&self) -> u32 {
        self.server.child.id()
    }

    fn sighup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP failed");
    }

    /// Waits until stderr has `n` lines containing `needle`.
    async fn wait_log(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen = self
                .stderr
                .lock()
                .expect("stderr lines")
                .iter()
                .filter(|l| l.contains(needle))
                .count();
            if seen >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the server never logged {n}× {needle:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.server.child.try_wait(), Ok(None))
    }
}

/// Runs `tidewire serve ARGS` that is expected to exit by itself; returns its status and
/// stderr (kills it and fails if it is still running after [`PATIENCE`]).
fn serve_expecting_exit(args: &[String]) -> (std::process::ExitStatus, String) {
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tidewire");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tidewire {args:?} kept running; it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    (status, stderr)
}

// ---- Tests -----------------------------------------------------------------------------

#[tokio::test]
async fn https_publish_and_an_sse_stream_work_with_a_generated_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = InProcess::start(tmp.path(), |_| {}).await;
    let client = https_client(&server.ca_pem, true);
    let mut stream = sse(
        &client,
        &server.url("/v1/sse?topic=tls/https/**&last_event_id=0"),
    )
    .await;
    let first = publish(&client, server.addr, "tls/https/a", json!({"n": 1})).await;
    let second = publish(&client, server.addr, "tls/https/b", json!({"n": 2})).await;
    for (want, n) in [(first, 1), (second, 2)] {
        let ev = next_event(&mut stream).await;
        assert_eq!(ev.id, want.to_string());
        let env: Value = serde_json::from_str(&ev.data).expect("event JSON");
        assert_eq!(env["data"], json!({"n": n}));
    }
    // Plain HTTP/1.1 over TLS: the answer says so.
    let resp = client
        .get(server.url("/v1/topics/tls/https/a"))
        .send()
        .await
        .expect("GET topic");
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.status(), 200);
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn alpn_offers_h2_and_http_1_1_and_http2_is_served_over_tls() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = InProcess::start(tmp.path(), |_| {}).await;

    // What the server chooses for each offer (verified as `localhost` too: both names are in
    // the certificate).
    for (offer, want) in [
        (vec![&b"h2"[..], &b"http/1.1"[..]], Some(&b"h2"[..])),
        (vec![&b"http/1.1"[..]], Some(&b"http/1.1"[..])),
        (vec![&b"h2"[..]], Some(&b"h2"[..])),
        (vec![], None),
    ] {
        let tls = tls_connect(server.addr, &server.ca_pem, &offer, "localhost")
            .await
            .expect("TLS connect");
        assert_eq!(tls.get_ref().1.alpn_protocol(), want, "offer {offer:?}");
    }

    // A client without ALPN still gets HTTP/1.1 (the server recognises the protocol).
    let mut tls = tls_connect(server.addr, &server.ca_pem, &[], "127.0.0.1")
        .await
        .expect("TLS connect");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, tls.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .ok();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // reqwest negotiates h2 by ALPN: publish, SSE replay and a read all over HTTP/2.
    let client = https_client(&server.ca_pem, false);
    let resp = client
        .post(server.url("/v1/topics/tls/h2/events"))
        .header("content-type", "application/json")
        .body(r#"{"data":{"over":"h2"}}"#)
        .send()
        .await
        .expect("publish over h2");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 201);
    let id = resp.json::<Value>().await.expect("receipt")["first_id"]
        .as_u64()
        .expect("first_id");
    let resp = client
        .get(server.url("/v1/sse?topic=tls/h2&last_event_id=0"))
        .send()
        .await
        .expect("SSE over h2");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let mut stream = Box::pin(resp.bytes_stream().eventsource());
    let ev = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("event in time")
        .expect("stream open")
        .expect("event");
    assert_eq!(ev.id, id.to_string());
    server.stop().await;
}

#[tokio::test]
async fn wss_subscribes_and_receives_an_event() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = InProcess::start(tmp.path(), |_| {}).await;
    let tls = tls_connect(server.addr, &server.ca_pem, &[b"http/1.1"], "127.0.0.1")
        .await
        .expect("TLS connect");
    let url = format!("wss://{}/v1/ws?topic=tls/ws/**&since=0", server.addr);
    let (mut ws, resp) = tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("handshake in time")
        .expect("WebSocket handshake over TLS");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text(json!({"op":"ping","ref":"sync"}).to_string()))
        .await
        .expect("send ping");
    let client = https_client(&server.ca_pem, true);
    let id = publish(&client, server.addr, "tls/ws/a", json!({"over": "wss"})).await;
    let deadline = Instant::now() + PATIENCE;
    let mut pong = false;
    let event = loop {
        assert!(Instant::now() < deadline, "no event over WSS");
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("frame in time")
            .expect("socket open")
            .expect("frame");
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(&text).expect("JSON frame");
        if v["op"] == "pong" {
            pong = true;
            continue;
        }
        break v;
    };
    assert_eq!(event["id"], json!(id));
    assert_eq!(event["topic"], json!("tls/ws/a"));
    assert_eq!(event["data"], json!({"over": "wss"}));
    // The socket takes ops too: a publish over WSS is acknowledged.
    ws.send(Message::text(
        json!({"op":"publish","topic":"tls/ws/b","data":2,"ref":"p"}).to_string(),
    ))
    .await
    .expect("send publish");
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("ack in time")
            .expect("socket open")
            .expect("frame");
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(&text).expect("JSON frame");
        if v["op"] == "pong" {
            pong = true;
        } else if v["op"] == "ack" {
            assert_eq!(v["ref"], json!("p"));
            break;
        }
    }
    assert!(pong, "the ping was never answered");
    let _ = ws.close(None).await;
    server.stop().await;
}

/// Runs `curl -sS ARGS` off the runtime (bounded by `--max-time`); returns (code, stdout).
async fn curl(args: Vec<String>) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .arg("-sS")
            .args(&args)
            .output()
            .expect("run curl (is it installed?)");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("curl task")
}

#[tokio::test]
async fn curl_trusting_the_ca_publishes_over_http2_and_http_1_1_and_streams_sse() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = InProcess::start(tmp.path(), |_| {}).await;
    let ca = tmp.path().join("ca.pem");
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (code, out, err) = curl(vec![
            flag.into(),
            "--cacert".into(),
            ca.display().to_string(),
            "--max-time".into(),
            "20".into(),
            "-H".into(),
            "content-type: application/json".into(),
            "-d".into(),
            r#"{"data":{"via":"curl"}}"#.into(),
            "-w".into(),
            "\n%{http_code} %{http_version}".into(),
            server.url("/v1/topics/tls/curl/events"),
        ])
        .await;
        assert_eq!(code, Some(0), "curl {flag} failed: {err}");
        let (body, status) = out.rsplit_once('\n').expect("status line");
        assert_eq!(status, format!("201 {version}"), "curl {flag}: {out}");
        let receipt: Value = serde_json::from_str(body).expect("receipt JSON");
        assert_eq!(receipt["count"], json!(1));
    }
    // An SSE replay read by curl until --max-time cuts it (exit 28: timed out, as expected).
    let (code, out, err) = curl(vec![
        "-N".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--max-time".into(),
        "2".into(),
        server.url("/v1/sse?topic=tls/curl&last_event_id=0"),
    ])
    .await;
    assert_eq!(code, Some(28), "curl SSE: {err}");
    assert!(out.contains("id: 1\n") && out.contains("id: 2\n"), "{out}");
    assert!(out.contains(r#""via":"curl""#), "{out}");
    // curl refuses the server without the CA: the certificate is really checked.
    let (code, _, _) = curl(vec![
        "--max-time".into(),
        "20".into(),
        server.url("/readyz"),
    ])
    .await;
    assert_eq!(code, Some(60), "curl trusted an unknown CA");
    server.stop().await;
}

#[tokio::test]
async fn a_plain_http_request_to_the_tls_port_gets_no_http_answer_and_is_closed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = InProcess::start(tmp.path(), |_| {}).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    let got = read_until_closed(&mut s, PATIENCE)
        .await
        .expect("the server kept a plain-HTTP connection open");
    assert!(
        !got.starts_with(b"HTTP/"),
        "answered in plain HTTP: {}",
        String::from_utf8_lossy(&got)
    );
    // And it goes on serving TLS clients.
    let client = https_client(&server.ca_pem, true);
    let resp = client
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(resp.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_never_completes_the_handshake_is_closed_after_the_header_read_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = InProcess::start(tmp.path(), |c| {
        c.header_read_timeout_secs = 1;
        c.idle_timeout_secs = 60;
    })
    .await;
    // Silent after connecting, and stalled after the first bytes of a ClientHello.
    for (what, bytes) in [
        ("silent", &b""[..]),
        (
            "partial ClientHello",
            &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..],
        ),
    ] {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let started = Instant::now();
        s.write_all(bytes).await.expect("write");
        let closed = read_until_closed(&mut s, Duration::from_secs(8)).await;
        let elapsed = started.elapsed();
        assert!(
            closed.is_some(),
            "{what}: still open after 8 s (header timeout 1 s)"
        );
        assert!(
            elapsed >= Duration::from_millis(800),
            "{what}: closed after {elapsed:?}, before the header timeout"
        );
    }
    let timed_out = metric_via(
        &https_client(&server.ca_pem, true),
        &server.url(""),
        r#"tidewire_connections_timed_out_total{reason="header_timeout"}"#,
    )
    .await;
    assert!(timed_out >= 2.0, "header_timeout count {timed_out}");
    server.stop().await;
}

#[tokio::test]
async fn a_quiet_sse_stream_over_tls_outlives_the_header_and_idle_timeouts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = InProcess::start(tmp.path(), |c| {
        c.header_read_timeout_secs = 1;
        c.idle_timeout_secs = 1;
        c.sse_heartbeat_secs = 60;
    })
    .await;
    for http1_only in [true, false] {
        let client = https_client(&server.ca_pem, http1_only);
        let topic = if http1_only {
            "tls/quiet/h1"
        } else {
            "tls/quiet/h2"
        };
        let mut stream = sse(&client, &server.url(&format!("/v1/sse?topic={topic}"))).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let publisher = https_client(&server.ca_pem, true);
        let id = publish(&publisher, server.addr, topic, json!("late")).await;
        let ev = next_event(&mut stream).await;
        assert_eq!(ev.id, id.to_string(), "h1 only: {http1_only}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_connection_over_the_cap_is_refused_with_a_readable_503_over_tls() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = InProcess::start(tmp.path(), |c| c.max_connections = 1).await;
    // Hold the one place with a pooled keep-alive connection (the readiness probe's
    // connection may still be counted for a moment: retry).
    let holder = https_client(&server.ca_pem, true);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let resp = holder
            .get(server.url("/healthz"))
            .send()
            .await
            .expect("healthz");
        if resp.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never admitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other = https_client(&server.ca_pem, true);
    let resp = other
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("a refused connection is answered, over TLS");
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("error body");
    assert_eq!(body["error"]["code"], json!("server_at_capacity"));
    drop(holder);
    drop(other);
    server.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_certificate_for_new_connections_without_dropping_streams() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let cert_a = pki.leaf("tidewire cert A", 1001);
    let cert_b = pki.leaf("tidewire cert B", 2002);
    assert_ne!(cert_a.der, cert_b.der);
    let files = Files::write(tmp.path(), &pki, &cert_a);
    let ca_pem = pki.ca_pem();
    let mut bin = TlsBin::spawn(&tmp.path().join("data"), &files, &ca_pem).await;
    let addr = bin.server.addr;
    assert_eq!(presented_leaf(addr, &ca_pem).await, cert_a.der);

    // A stream opened under certificate A.
    let streamer = https_client(&ca_pem, true);
    let mut stream = sse(&streamer, &https_url(addr, "/v1/sse?topic=tls/reload")).await;

    // Certificate B replaces A on disk; SIGHUP.
    files.replace(&cert_b);
    bin.sighup();
    bin.wait_log("TLS certificate reloaded", 1).await;
    assert!(bin.alive(), "SIGHUP stopped the server");
    assert_eq!(
        presented_leaf(addr, &ca_pem).await,
        cert_b.der,
        "a new connection still gets certificate A"
    );
    // The stream opened under A still delivers.
    let publisher = https_client(&ca_pem, true);
    let id = publish(&publisher, addr, "tls/reload", json!("after reload")).await;
    assert_eq!(next_event(&mut stream).await.id, id.to_string());

    // A broken certificate file: the reload fails, B stays, the server lives on.
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("garbage");
    bin.sighup();
    bin.wait_log("TLS reload failed", 1).await;
    assert!(bin.alive(), "a failed reload stopped the server");
    assert_eq!(presented_leaf(addr, &ca_pem).await, cert_b.der);
    // A key that belongs to another certificate: refused as well.
    files.replace(&Leaf {
        key_pem: cert_a.key_pem.clone(),
        ..pki.leaf("tidewire cert C", 3003)
    });
    bin.sighup();
    bin.wait_log("TLS reload failed", 2).await;
    assert_eq!(presented_leaf(addr, &ca_pem).await, cert_b.der);
    let id = publish(&publisher, addr, "tls/reload", json!("after bad reload")).await;
    assert_eq!(next_event(&mut stream).await.id, id.to_string());
    let ready = publisher
        .get(https_url(addr, "/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);

    // SIGTERM still shuts it down cleanly.
    drop(stream);
    let status = bin.server.sigterm();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn startup_refuses_an_unusable_certificate_or_key_before_binding() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let good = pki.leaf("good", 1);
    let other = pki.leaf("other", 2);
    let dir = tmp.path();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let cert = write("cert.pem", &good.chain_pem);
    let key = write("key.pem", &good.key_pem);
    let other_key = write("other-key.pem", &other.key_pem);
    let garbage = write("garbage.pem", "this is not PEM\n");
    let broken = write("broken.pem", "-----BEGIN CERTIFICATE-----\nnot base64 !!\n");
    let missing = dir.join("missing.pem").display().to_string();
    let flags = |c: &str, k: &str| {
        vec![
            "--tls-cert".to_string(),
            c.to_string(),
            "--tls-key".to_string(),
            k.to_string(),
        ]
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing certificate file",
            flags(&missing, &key),
            "missing.pem",
        ),
        ("missing key file", flags(&cert, &missing), "missing.pem"),
        (
            "certificate file without PEM",
            flags(&garbage, &key),
            "no CERTIFICATE",
        ),
        ("broken PEM", flags(&broken, &key), "broken.pem"),
        (
            "key file without a key",
            flags(&cert, &cert),
            "no PRIVATE KEY",
        ),
        (
            "key of another certificate",
            flags(&cert, &other_key),
            "does not fit",
        ),
        (
            "certificate without key",
            vec!["--tls-cert".into(), cert.clone()],
            "must be set together",
        ),
    ];
    for (what, args, says) in cases {
        let addr = common::free_addr();
        let mut all = vec![
            "--listen".to_string(),
            addr.to_string(),
            "--data-dir".to_string(),
            dir.join("data").display().to_string(),
        ];
        all.extend(args);
        let (status, stderr) = serve_expecting_exit(&all);
        assert!(!status.success(), "{what}: started anyway");
        assert!(stderr.contains(says), "{what}: message {stderr:?}");
        // Nothing was ever bound (the data dir was not even opened).
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "{what}: the port was bound"
        );
    }
    assert!(!dir.join("data").exists(), "the log was opened");
}

#[tokio::test]
async fn tls_keeps_an_open_server_on_loopback_unless_insecure_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let files = Files::write(tmp.path(), &pki, &pki.leaf("open", 1));
    let mut args = vec![
        "--listen".to_string(),
        "0.0.0.0:0".to_string(),
        "--data-dir".to_string(),
        tmp.path().join("data").display().to_string(),
    ];
    args.extend(files.flags());
    let (status, stderr) = serve_expecting_exit(&args);
    assert!(!status.success());
    assert!(stderr.contains("without authentication"), "{stderr}");
}

#[test]
fn pkcs8_pkcs1_rsa_and_sec1_ec_keys_load_and_a_mismatched_pair_does_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let leaf = pki.leaf("pkcs8", 1);
    let files = Files::write(tmp.path(), &pki, &leaf);
    let tls = tidewire::tls::Tls::from_files(&files.cert, &files.key).expect("PKCS#8 EC key");
    assert_eq!(tls.current_leaf().expect("leaf").to_vec(), leaf.der);
    let other = pki.leaf("other", 2);
    std::fs::write(&files.key, &other.key_pem).expect("write");
    let err = tidewire::tls::Tls::from_files(&files.cert, &files.key)
        .expect_err("a key of another certificate");
    assert!(err.to_string().contains("does not fit"), "{err}");

    // PKCS#1 RSA ("RSA PRIVATE KEY") and SEC1 EC ("EC PRIVATE KEY") keys come from the
    // openssl CLI: rcgen (ring) writes PKCS#8 only and cannot generate RSA keys.
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl not installed: PKCS#1 and SEC1 key formats not checked");
        return;
    }
    let dir = tmp.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&["genrsa", "-traditional", "-out", "rsa.pem", "2048"]);
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "ec.pem",
    ]);
    for (key, block) in [("rsa.pem", "RSA PRIVATE KEY"), ("ec.pem", "EC PRIVATE KEY")] {
        let text = std::fs::read_to_string(dir.join(key)).expect("read key");
        assert!(text.contains(block), "{key} is not {block}: {text}");
        let cert = format!("{key}.crt");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            key,
            "-out",
            &cert,
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ]);
        tidewire::tls::Tls::from_files(&dir.join(&cert), &dir.join(key))
            .unwrap_or_else(|e| panic!("{block}: {e}"));
    }
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_tls_handshake_that_never_completes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Timeouts and a grace period far beyond PATIENCE, which bounds the stop.
    let server = InProcess::start(tmp.path(), |c| {
        c.header_read_timeout_secs = 300;
        c.idle_timeout_secs = 300;
        c.shutdown_grace_secs = 300;
    })
    .await;
    let mut conns = Vec::new();
    for bytes in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        s.write_all(bytes).await.expect("write");
        conns.push(s);
    }
    // Both accepted before the stop (the metrics request is one more connection).
    let client = https_client(&server.ca_pem, true);
    let deadline = Instant::now() + PATIENCE;
    while metric_via(&client, &server.url(""), "tidewire_connections_open").await < 3.0 {
        assert!(Instant::now() < deadline, "connections never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    server.stop().await;
    for mut s in conns {
        assert!(
            read_until_closed(&mut s, Duration::from_secs(5))
                .await
                .is_some(),
            "a handshaking connection outlived the server"
        );
    }
}
