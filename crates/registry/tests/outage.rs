//! Recovery after long ZooKeeper outages (real ZooKeeper from rpc-testkit; never skipped).
//!
//! The client library's own reconnect backoff doubles without a cap (100 ms, 200 ms, ...,
//! 12.8 s, 25.6 s: bounded only by its session deadline), so left alone a client finds a
//! returning ZooKeeper up to ~13 s late. Discovery and registration must be back within a
//! few seconds of ZooKeeper whatever the outage's length. Each test prints what it measured.

mod common;

use std::time::{Duration, Instant};

use common::relay::Relay;
use common::{Discovery, client, create_endpoint, endpoints, ephemeral, info, settings};
use rpc_registry::{DiscoveryEvent, EndpointInfo, Registration, SessionState};
use rpc_testkit::{ZkServer, wait_until_async};
use zookeeper_client as zk;

/// How soon after ZooKeeper is reachable again discovery and registration must have caught
/// up. Generous (the target is 1-2 s); the library's own backoff takes 7-10 s in these tests.
const RECOVERY_BOUND: Duration = Duration::from_secs(5);

/// Bound of the measuring waits: long enough to measure the slow behaviour too.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(40);

/// The node's JSON and owner session (`None` if it does not exist).
async fn read_node(zkc: &zk::Client, path: &str) -> Option<(EndpointInfo, i64)> {
    match zkc.get_data(path).await {
        Ok((data, stat)) => Some((serde_json::from_slice(&data).unwrap(), stat.ephemeral_owner)),
        Err(zk::Error::NoNode) => None,
        Err(err) => panic!("get_data {path}: {err}"),
    }
}

/// Waits (bounded by [`MEASURE_TIMEOUT`]) until discovery reports `service` with every one
/// of `wanted` among its endpoints; returns how long that took from `since`.
async fn discovery_sees(
    discovery: &mut Discovery,
    service: &str,
    wanted: &[&EndpointInfo],
    since: Instant,
) -> Duration {
    let wanted = endpoints(wanted);
    tokio::time::timeout(
        MEASURE_TIMEOUT,
        discovery.until(|e| {
            matches!(e, DiscoveryEvent::Endpoints { service: s, endpoints }
                if s == service && wanted.iter().all(|w| endpoints.contains(w)))
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("discovery never saw {wanted:?}"));
    since.elapsed()
}

/// ZooKeeper crashes and stays down ~14 s, long enough for the library's backoff to reach
/// its 12.8 s step, then comes back (same port and data). A change made after the restart
/// must reach discovery, and the LB's node must be there, within [`RECOVERY_BOUND`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resyncs_promptly_after_zookeeper_was_down_long() {
    common::init_tracing();
    /// Longer than the outage: the sessions could survive it (the server restores them).
    const SESSION: Duration = Duration::from_secs(20);
    /// The library's own retries fall at about 6.3 s, 12.7 s and 25.5 s after the loss: a
    /// ZooKeeper back at ~15-17 s (restart included) waits for the last of them.
    const OUTAGE: Duration = Duration::from_secs(14);
    let mut zk = ZkServer::start();
    let servers = zk.connect_string();
    let product = "outage";
    let lb = info("svc", "10.0.0.1:1");
    let reg = Registration::register(settings(&servers, SESSION), product.into(), lb.clone())
        .await
        .expect("registers");
    let path = reg.path().to_owned();
    let mut discovery = Discovery::start(settings(&servers, SESSION), product);
    discovery.until_synced().await;
    assert_eq!(discovery.table["svc"], endpoints(&[&lb]));
    let (_, first_owner) = read_node(&client(&servers).await, &path)
        .await
        .expect("registered");

    let before_crash = discovery.log.len();
    tokio::task::block_in_place(|| zk.stop());
    discovery.until_session(SessionState::Disconnected).await;
    // The outage itself, not a synchronisation: nothing is expected to happen meanwhile.
    tokio::time::sleep(OUTAGE).await;
    tokio::task::block_in_place(|| zk.restart());
    let back = Instant::now();

    // A change made after the restart (by a client of its own).
    let zkc = client(&servers).await;
    let c = info("svc", "10.0.0.2:1");
    create_endpoint(&zkc, product, &c, &ephemeral()).await;
    // Both measured at once: each wait returns as soon as its own condition holds.
    let wanted = [&c];
    let (discovered, registered) = tokio::join!(
        discovery_sees(&mut discovery, "svc", &wanted, back),
        async {
            wait_until_async(MEASURE_TIMEOUT, || async {
                reg.is_registered()
                    && read_node(&zkc, &path)
                        .await
                        .is_some_and(|(json, _)| json == lb)
            })
            .await;
            back.elapsed()
        }
    );
    eprintln!(
        "after a {OUTAGE:?} outage (session {SESSION:?}): discovery saw a change {discovered:?} \
         after zookeeper was back; registration node present after {registered:?}"
    );
    assert!(
        discovered <= RECOVERY_BOUND,
        "discovery resynced {discovered:?} after zookeeper was back: {:#?}",
        &discovery.log[before_crash..]
    );
    assert!(registered <= RECOVERY_BOUND, "{registered:?}");
    assert_eq!(discovery.table["svc"], endpoints(&[&lb, &c]));

    // Meanwhile the table was never emptied, and the session events tell the story.
    let story = &discovery.log[before_crash..];
    assert!(
        !story.iter().any(
            |e| matches!(e, DiscoveryEvent::Endpoints { endpoints, .. } if endpoints.is_empty())
        ),
        "{story:#?}"
    );
    let disconnected = story
        .iter()
        .position(|e| *e == DiscoveryEvent::Session(SessionState::Disconnected))
        .expect("disconnected");
    assert!(
        story[disconnected..].contains(&DiscoveryEvent::Session(SessionState::Connected)),
        "{story:#?}"
    );

    // The server restored the LB's session with its node: nothing needed making again.
    let (_, owner) = read_node(&zkc, &path).await.expect("registered");
    assert_eq!(
        owner, first_owner,
        "a node whose session lives is not made again"
    );
    // Deregistering now (its own session may not have reconnected yet) is prompt too.
    let deregistering = Instant::now();
    reg.deregister().await.expect("deregisters");
    let deregistered = deregistering.elapsed();
    eprintln!("deregistered in {deregistered:?}");
    assert!(read_node(&zkc, &path).await.is_none());
    assert!(deregistered <= RECOVERY_BOUND, "{deregistered:?}");
    discovery.stop().await;
}

/// The LB and the proxy lose ZooKeeper (a partition; the server keeps running) for longer
/// than their session timeout: the server expires both sessions and deletes the LB's node.
/// Once the partition heals, the node must be back and discovery must follow changes within
/// [`RECOVERY_BOUND`] (left alone, the library notices the expiry only at its own deadline,
/// 1.4 session timeouts after the loss: ~7 s after the server's expiry here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_promptly_after_a_partition_longer_than_the_session() {
    common::init_tracing();
    const SESSION: Duration = Duration::from_secs(18);
    let zk = ZkServer::start();
    let relay = Relay::start(([127, 0, 0, 1], zk.port()).into()).await;
    let via_relay = relay.connect_string();
    let product = "partition";
    let lb = info("svc", "10.0.0.1:1");
    let reg = Registration::register(settings(&via_relay, SESSION), product.into(), lb.clone())
        .await
        .expect("registers");
    let path = reg.path().to_owned();
    let mut discovery = Discovery::start(settings(&via_relay, SESSION), product);
    discovery.until_synced().await;
    assert_eq!(discovery.table["svc"], endpoints(&[&lb]));
    // Observes the server directly, not through the relay.
    let zkc = client(&zk.connect_string()).await;
    let (_, first_owner) = read_node(&zkc, &path).await.expect("registered");

    let before_cut = discovery.log.len();
    relay.cut();
    discovery.until_session(SessionState::Disconnected).await;
    let cut = Instant::now();
    // The server expires the LB's session after SESSION without contact; its node goes.
    wait_until_async(SESSION + Duration::from_secs(15), || async {
        read_node(&zkc, &path).await.is_none()
    })
    .await;
    eprintln!(
        "the server expired the LB's session {:?} after the cut",
        cut.elapsed()
    );
    relay.heal();
    let healed = Instant::now();

    let c = info("svc", "10.0.0.2:1");
    create_endpoint(&zkc, product, &c, &ephemeral()).await;
    let wanted = [&lb, &c];
    let (registered, discovered) = tokio::join!(
        async {
            wait_until_async(MEASURE_TIMEOUT, || async {
                reg.is_registered()
                    && read_node(&zkc, &path)
                        .await
                        .is_some_and(|(json, owner)| json == lb && owner != first_owner)
            })
            .await;
            healed.elapsed()
        },
        discovery_sees(&mut discovery, "svc", &wanted, healed)
    );
    eprintln!(
        "after a partition longer than the session ({SESSION:?}): node back {registered:?} and \
         discovery current {discovered:?} after the heal"
    );
    assert!(registered <= RECOVERY_BOUND, "{registered:?}");
    assert!(
        discovered <= RECOVERY_BOUND,
        "discovery resynced {discovered:?} after the heal: {:#?}",
        &discovery.log[before_cut..]
    );
    assert_eq!(discovery.table["svc"], endpoints(&[&lb, &c]));

    reg.deregister().await.expect("deregisters");
    assert!(read_node(&zkc, &path).await.is_none());
    discovery.stop().await;
}
