//! `Registration` against a real ZooKeeper (started by rpc-testkit; never skipped).

mod common;

use std::time::{Duration, Instant};

use common::relay::Relay;
use common::{client, ephemeral, info, settings};
use rpc_registry::{EndpointInfo, Registration, RegistryError, endpoint_path, service_path};
use rpc_testkit::{ZkServer, wait_until_async};
use zookeeper_client as zk;

const PRODUCT: &str = "reg";

/// How soon a registration whose node was deleted under its live session must have made it
/// again. Generous: it takes one round trip after the watch fires.
const HEAL_BOUND: Duration = Duration::from_secs(5);

/// Registers `lb` under [`PRODUCT`] with the given session timeout; panics if it fails.
async fn register(servers: &str, lb: &EndpointInfo, session: Duration) -> Registration {
    Registration::register(settings(servers, session), PRODUCT.into(), lb.clone())
        .await
        .expect("registers")
}

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
    let reg = register(&servers, &lb, Duration::from_secs(10)).await;
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

    let reg = register(&servers, &lb, Duration::from_secs(10)).await;
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
    let reg = register(&servers, &lb, Duration::from_secs(10)).await;
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
    let reg = register(&servers, &lb, Duration::from_secs(2)).await;
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

/// Someone deletes the LB's node while its session lives (an operator, or a delete that an
/// abandoned session of the LB itself had queued while disconnected and sent late, after a
/// newer session registered): the registration notices through its watch and makes the node
/// again with the same session, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_under_its_live_session_is_made_again() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let lb = info("echo", "10.0.0.5:5000");
    let reg = register(&servers, &lb, Duration::from_secs(10)).await;
    let path = reg.path().to_owned();
    let zkc = client(&servers).await;
    let (_, owner) = read_node(&zkc, &path).await.expect("registered");

    // Several times: the watch must be armed again after each deletion.
    for round in 1..=3 {
        zkc.delete(&path, None).await.expect("delete the LB's node");
        let deleted = Instant::now();
        wait_until_async(HEAL_BOUND, || async {
            reg.is_registered()
                && read_node(&zkc, &path)
                    .await
                    .is_some_and(|(json, o)| json == lb && o == owner)
        })
        .await;
        eprintln!(
            "round {round}: node back {:?} after its deletion",
            deleted.elapsed()
        );
    }

    reg.deregister().await.expect("deregisters");
    assert!(read_node(&zkc, &path).await.is_none());
}

/// Another live session replaces the LB's node in one step (another LB with the same
/// address, an operator): the registration does not fight over it (it says it is not
/// registered, and leaves that node alone), and makes its own again once that one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_a_node_of_another_live_session_alone_until_it_goes() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let lb = info("echo", "10.0.0.6:6000");
    let reg = register(&servers, &lb, Duration::from_secs(10)).await;
    let path = reg.path().to_owned();
    let zkc = client(&servers).await;
    let (_, owner) = read_node(&zkc, &path).await.expect("registered");

    let other = client(&servers).await;
    let mut theirs = lb.clone();
    theirs.hostname = "web2".into();
    let mut swap = other.new_multi_writer();
    swap.add_delete(&path, None).unwrap();
    swap.add_create(&path, &serde_json::to_vec(&theirs).unwrap(), &ephemeral())
        .unwrap();
    swap.commit().await.expect("replace the node atomically");

    wait_until_async(Duration::from_secs(10), || async { !reg.is_registered() }).await;
    assert_eq!(
        read_node(&zkc, &path).await,
        Some((theirs, other.session_id().0)),
        "a node of another live session is left alone"
    );

    // Its session closes: the node goes, and the registration's own is back.
    drop(other);
    wait_until_async(Duration::from_secs(10), || async {
        reg.is_registered()
            && read_node(&zkc, &path)
                .await
                .is_some_and(|(json, o)| json == lb && o == owner)
    })
    .await;
    reg.deregister().await.expect("deregisters");
    assert!(read_node(&zkc, &path).await.is_none());
}

/// ZooKeeper is healthy but refuses the create (the service node's ACL was changed so that
/// the LB may no longer create under it): the registration retries on its live session, at
/// a slowing pace (200 ms doubling to 5 s), without new sessions; once allowed again, the
/// next retry registers. Attempts are counted at a relay in front of the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_creates_are_retried_slowly_on_the_same_session() {
    common::init_tracing();
    /// Long enough to tell the paces apart: 5-7 attempts in it at the intended pace, ~60 at
    /// the 50-100 ms one of a backoff reset by every connect.
    const WINDOW: Duration = Duration::from_secs(6);
    let zk = ZkServer::start();
    let relay = Relay::start(([127, 0, 0, 1], zk.port()).into()).await;
    let lb = info("echo", "10.0.0.8:8000");
    let reg = Registration::register(
        settings(&relay.connect_string(), Duration::from_secs(10)),
        PRODUCT.into(),
        lb.clone(),
    )
    .await
    .expect("registers");
    let path = reg.path().to_owned();
    let service = service_path(PRODUCT, "echo");
    // Arranges and observes directly, not through the relay.
    let zkc = client(&zk.connect_string()).await;
    let (_, owner) = read_node(&zkc, &path).await.expect("registered");

    let anyone = |permission| [zk::Acl::new(permission, zk::AuthId::anyone())];
    let no_create = anyone(zk::Permission::READ | zk::Permission::DELETE | zk::Permission::ADMIN);
    zkc.set_acl(&service, &no_create, None)
        .await
        .expect("forbid creating under the service");
    let connections = relay.connections();
    let before = relay.creates_of(&path);
    zkc.delete(&path, None).await.expect("delete the LB's node");
    wait_until_async(HEAL_BOUND, || async { relay.creates_of(&path) > before }).await;
    assert!(
        !reg.is_registered(),
        "the node is gone and could not be made"
    );
    let first = relay.creates_of(&path);
    // A measuring window, not a synchronisation: the attempts made in it are counted.
    tokio::time::sleep(WINDOW).await;
    let attempts = relay.creates_of(&path) - first;
    eprintln!("{attempts} more create attempts in {WINDOW:?} while ZooKeeper refused them");
    // Waits of 100-200 ms, 200-400 ms, 0.4-0.8 s, 0.8-1.6 s, 1.6-3.2 s, 2.5-5 s: 4 to 6
    // attempts after the first within the window.
    assert!(
        (2..=10).contains(&attempts),
        "{attempts} attempts in {WINDOW:?}"
    );
    assert_eq!(
        relay.connections(),
        connections,
        "retries go through the live session: no new sessions"
    );
    assert!(!reg.is_registered());

    // Allowed again: the next retry (at most 5 s away) registers, with the same session.
    zkc.set_acl(&service, &anyone(zk::Permission::ALL), None)
        .await
        .expect("allow creating again");
    wait_until_async(Duration::from_secs(15), || async {
        reg.is_registered()
            && read_node(&zkc, &path)
                .await
                .is_some_and(|(json, o)| json == lb && o == owner)
    })
    .await;
    reg.deregister().await.expect("deregisters");
    assert!(read_node(&zkc, &path).await.is_none());
}
