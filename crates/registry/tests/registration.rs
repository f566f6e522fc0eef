//! `Registration` against a real ZooKeeper (started by rpc-testkit; never skipped).

mod common;

use std::time::Duration;

use common::{client, ephemeral, info, settings};
use rpc_registry::{EndpointInfo, Registration, RegistryError, endpoint_path};
use rpc_testkit::{ZkServer, wait_until_async};
use zookeeper_client as zk;

const PRODUCT: &str = "reg";

/// The node's JSON and owner session (`None` if it does not exist).
async fn read_node(zkc: &zk::Client, path: &str) -> Option<(EndpointInfo, i64)> {
    match zkc.get_data(path).await {
        Ok((data, stat)) => Some((serde_json::from_slice(&data).unwrap(), stat.ephemeral_owner)),
        Err(zk::Error::NoNode) => None,
        Err(err) => panic!("get_data {path}: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_an_ephemeral_node_and_deregisters() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let lb = info("echo", "10.4.10.2:5555");
    let reg = Registration::register(
        settings(&servers, Duration::from_secs(10)),
        PRODUCT.into(),
        lb.clone(),
    )
    .await
    .expect("registers");
    let path = endpoint_path(PRODUCT, "echo", "10_4_10_2_5555");
    assert_eq!(reg.path(), path);
    assert!(reg.is_registered());

    let zkc = client(&servers).await;
    let (json, owner) = read_node(&zkc, &path).await.expect("node exists");
    assert_eq!(json, lb);
    assert_ne!(owner, 0, "the node is ephemeral");
    assert_ne!(
        owner,
        zkc.session_id().0,
        "owned by the registration's session"
    );
    // The raw JSON carries the CONTRACT field names.
    let (raw, _) = zkc.get_data(&path).await.unwrap();
    let raw: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    for key in [
        "service",
        "service_id",
        "frontend",
        "deploy_path",
        "code_url_version",
        "hostname",
        "start_time",
    ] {
        assert!(raw.get(key).is_some(), "{key} in {raw}");
    }

    reg.deregister().await.expect("deregisters");
    assert!(
        read_node(&zkc, &path).await.is_none(),
        "deregister deletes the node at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_a_stale_node() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let lb = info("echo", "10.0.0.9:7000");
    let path = endpoint_path(PRODUCT, "echo", &lb.service_id);
    // A node left by an earlier session (still alive here) with old data.
    let old = client(&servers).await;
    old.mkdir(
        &rpc_registry::service_path(PRODUCT, "echo"),
        &common::persistent(),
    )
    .await
    .unwrap();
    let mut stale = lb.clone();
    stale.start_time = "2001-01-01 00:00:00".into();
    old.create(&path, &serde_json::to_vec(&stale).unwrap(), &ephemeral())
        .await
        .unwrap();
    // A marker of the old session: it vanishes once the server closed that session.
    let marker = "/old-session-marker";
    old.create(marker, &[], &ephemeral()).await.unwrap();

    let reg = Registration::register(
        settings(&servers, Duration::from_secs(10)),
        PRODUCT.into(),
        lb.clone(),
    )
    .await
    .expect("registers over a stale node");
    let zkc = client(&servers).await;
    let (json, owner) = read_node(&zkc, &path).await.expect("node exists");
    assert_eq!(json, lb);
    assert_ne!(owner, old.session_id().0, "the stale node was replaced");
    // Closing the stale owner's session does not take the new node with it.
    drop(old);
    wait_until_async(Duration::from_secs(10), || async {
        zkc.check_stat(marker).await.unwrap().is_none()
    })
    .await;
    assert_eq!(read_node(&zkc, &path).await.map(|(j, _)| j), Some(lb));
    reg.deregister().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_registration_removes_the_node() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let lb = info("echo", "/tmp/echo.sock");
    let reg = Registration::register(
        settings(&servers, Duration::from_secs(10)),
        PRODUCT.into(),
        lb.clone(),
    )
    .await
    .unwrap();
    let path = reg.path().to_owned();
    let zkc = client(&servers).await;
    assert!(read_node(&zkc, &path).await.is_some());
    drop(reg);
    // The session closes with the keeper task; the ephemeral node goes with it.
    wait_until_async(Duration::from_secs(10), || async {
        read_node(&zkc, &path).await.is_none()
    })
    .await;
}

/// Forced expiry: ZooKeeper is killed for longer than the session timeout, so the client
/// declares the session expired on its own; after the restart the registration must come
/// back by itself, owned by a new session (the old one's node, which the restarted server
/// still holds until it expires the old session there too, is replaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_again_after_session_expiry() {
    common::init_tracing();
    let mut zk = ZkServer::start();
    let servers = zk.connect_string();
    let lb = info("echo", "10.0.0.7:7000");
    let reg = Registration::register(
        settings(&servers, Duration::from_secs(2)),
        PRODUCT.into(),
        lb.clone(),
    )
    .await
    .unwrap();
    let path = reg.path().to_owned();
    let first_owner = {
        let zkc = client(&servers).await;
        read_node(&zkc, &path).await.expect("registered").1
    };

    tokio::task::block_in_place(|| zk.stop());
    wait_until_async(Duration::from_secs(30), || async { !reg.is_registered() }).await;
    tokio::task::block_in_place(|| zk.restart());

    let zkc = client(&servers).await;
    wait_until_async(Duration::from_secs(30), || async {
        reg.is_registered()
            && read_node(&zkc, &path)
                .await
                .is_some_and(|(_, owner)| owner != first_owner)
    })
    .await;
    let (json, owner) = read_node(&zkc, &path).await.unwrap();
    assert_eq!(json, lb);
    assert_ne!(owner, 0);
    reg.deregister().await.unwrap();
    assert!(read_node(&zkc, &path).await.is_none());
}

#[tokio::test]
async fn register_fails_fast_when_zookeeper_is_unreachable() {
    common::init_tracing();
    let started = std::time::Instant::now();
    let result = Registration::register(
        settings("127.0.0.1:1", Duration::from_secs(30)),
        PRODUCT.into(),
        info("s", "h:1"),
    )
    .await;
    assert!(
        matches!(result, Err(RegistryError::Connect { .. })),
        "{:?}",
        result.err()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
