//! The NATS harness itself (tests/common/nats.rs): clusters come up healthy on loopback, a
//! stream's leader is found, a killed node comes back on its ports and store, and no node
//! outlives the thread that started it. Runs whatever `TIDEWIRE_TEST_BACKEND` says: these are
//! the servers the nats backend and the gateway and chaos tests stand on.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::nats::{NatsCluster, NatsNode};
use common::PATIENCE;

/// Creates an R`replicas` stream `name` on `subject` and publishes `n` messages to it.
async fn stream_with(cluster: &NatsCluster, name: &str, replicas: usize, n: usize) {
    let js = jetstream::new(cluster.connect().await);
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.>")],
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .expect("create stream");
    // A new replicated stream answers only once its leader is elected: until then a publish
    // finds no responder (reported as "stream not found"), so each is retried for a while.
    for i in 0..n {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // The msg id makes a retry whose first try was stored count once.
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{name}-{i}"));
            let sent = js
                .publish_with_headers(format!("{name}.x"), headers, format!("{i}").into())
                .await;
            let acked = match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match acked {
                Ok(()) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "publish {i} to {name}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn messages(cluster: &NatsCluster, name: &str) -> u64 {
    cluster.stream_info(name).await["state"]["messages"]
        .as_u64()
        .expect("state.messages")
}

#[tokio::test]
async fn a_single_node_keeps_its_stream_across_kill_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::single(tmp.path()).await;
    assert_eq!(cluster.nodes.len(), 1);
    let node = cluster.node(0);
    assert!(node.client.ip().is_loopback() && node.monitor.ip().is_loopback());
    assert!(cluster.urls().starts_with("nats://127.0.0.1:"));
    let conf = std::fs::read_to_string(node.dir.join("nats.conf")).unwrap();
    assert!(conf.contains("sync_interval: always"), "{conf}");
    assert!(!conf.contains("cluster {"), "{conf}");

    stream_with(&cluster, "one", 1, 3).await;
    assert_eq!(cluster.stream_leader("one").await, Some(0));
    let (client, monitor) = (node.client, node.monitor);
    node.kill9();
    assert!(!node.is_running());
    node.restart().await;
    assert!(node.is_running());
    assert_eq!((node.client, node.monitor), (client, monitor));
    assert_eq!(
        messages(&cluster, "one").await,
        3,
        "the store survived kill -9"
    );
}

#[tokio::test]
async fn three_nodes_elect_a_stream_leader_and_survive_losing_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::three(tmp.path()).await;
    assert_eq!(cluster.urls().split(',').count(), 3);
    for node in &cluster.nodes {
        let route = node.cluster.expect("a route port");
        assert!(route.ip().is_loopback());
        let conf = std::fs::read_to_string(node.dir.join("nats.conf")).unwrap();
        assert!(
            conf.contains(&format!("name: \"{}\"", cluster.name)),
            "{conf}"
        );
    }
    assert!(cluster.meta_leader_index().await.is_some());

    stream_with(&cluster, "three", 3, 5).await;
    let leader = cluster
        .stream_leader("three")
        .await
        .expect("a stream leader");
    cluster.node(leader).kill9();
    // The two left elect another leader and keep every message.
    let deadline = Instant::now() + PATIENCE;
    let new_leader = loop {
        match cluster.stream_leader("three").await {
            Some(l) if l != leader => break l,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no new stream leader after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(new_leader, leader);
    assert_eq!(messages(&cluster, "three").await, 5);

    cluster.node(leader).restart().await;
    cluster.wait_healthy().await;
    assert!(cluster.nodes.iter().all(NatsNode::is_running));
    assert_eq!(messages(&cluster, "three").await, 5);
}

#[tokio::test]
async fn a_whole_cluster_comes_back_one_node_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::three(tmp.path()).await;
    stream_with(&cluster, "all", 3, 4).await;
    for node in &cluster.nodes {
        node.kill9();
    }
    // A lone node cannot be healthy (no meta leader), so bring them back first, then wait.
    for node in &cluster.nodes {
        node.respawn().await;
    }
    cluster.wait_healthy().await;
    let deadline = Instant::now() + PATIENCE;
    while cluster.stream_leader("all").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "no stream leader after a full restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(messages(&cluster, "all").await, 4);
}

#[test]
fn a_node_dies_with_the_thread_that_started_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // Start a node on a thread of its own, leak it (no Drop kills it), and let the thread end.
    let pid = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cluster = rt.block_on(NatsCluster::single(&dir));
        let pid = cluster.node(0).pid().expect("running");
        std::mem::forget(cluster);
        pid
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie (nobody waits for it: the Child was leaked with the cluster).
        let field = state
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        if state.is_empty() || field == Some("Z") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nats-server {pid} still runs after its thread ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
