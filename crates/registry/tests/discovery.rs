//! `run_discovery` against a real ZooKeeper (started by rpc-testkit; never skipped).

mod common;

use std::time::{Duration, Instant};

use common::{
    Discovery, client, create_endpoint, create_service, endpoints, ephemeral, info, persistent,
    settings,
};
use rpc_registry::{DiscoveryEvent, SessionState, endpoint_path, service_path, services_path};
use rpc_testkit::ZkServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_live_changes() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let product = "live";
    let mut discovery = Discovery::start(settings(&servers, Duration::from_secs(10)), product);

    // An empty product (not even created yet): connected, then synced with nothing.
    assert_eq!(
        discovery.next().await,
        DiscoveryEvent::Session(SessionState::Connected)
    );
    assert_eq!(discovery.next().await, DiscoveryEvent::Synced);
    let zkc = client(&servers).await;
    assert!(
        zkc.check_stat(&services_path(product))
            .await
            .unwrap()
            .is_some(),
        "services path created"
    );

    // A service with two endpoints appears.
    let a = info("echo", "10.0.0.1:5555");
    let b = info("echo", "10.0.0.2:5555");
    create_service(&zkc, product, "echo").await;
    create_endpoint(&zkc, product, &a, &ephemeral()).await;
    create_endpoint(&zkc, product, &b, &ephemeral()).await;
    discovery
        .until(|e| matches!(e, DiscoveryEvent::Endpoints { endpoints, .. } if endpoints.len() == 2))
        .await;
    assert_eq!(discovery.table["echo"], endpoints(&[&a, &b]));

    // One endpoint goes away: the very next data event is the remaining one.
    let deleted = Instant::now();
    zkc.delete(&endpoint_path(product, "echo", &a.service_id), None)
        .await
        .unwrap();
    let event = discovery.next_data().await;
    eprintln!(
        "endpoint deletion seen by discovery {:?} after the delete returned",
        deleted.elapsed()
    );
    assert_eq!(
        event,
        DiscoveryEvent::Endpoints {
            service: "echo".into(),
            endpoints: endpoints(&[&b])
        }
    );

    // Garbage JSON is skipped; the valid endpoint stays.
    let garbage = endpoint_path(product, "echo", "garbage");
    zkc.create(&garbage, b"{not json", &ephemeral())
        .await
        .unwrap();
    let event = discovery.next_data().await;
    assert_eq!(
        event,
        DiscoveryEvent::Endpoints {
            service: "echo".into(),
            endpoints: endpoints(&[&b])
        }
    );

    // Unknown JSON fields are ignored.
    let c = info("echo", "10.0.0.3:5555");
    let mut json: serde_json::Value = serde_json::to_value(&c).unwrap();
    json["workers"] = 8.into();
    zkc.create(
        &endpoint_path(product, "echo", &c.service_id),
        json.to_string().as_bytes(),
        &ephemeral(),
    )
    .await
    .unwrap();
    discovery
        .until(|e| matches!(e, DiscoveryEvent::Endpoints { endpoints, .. } if endpoints.len() == 2))
        .await;
    assert_eq!(discovery.table["echo"], endpoints(&[&b, &c]));

    // An endpoint re-registered under the same name with new data is read again.
    let mut b2 = b.clone();
    b2.start_time = "2020-01-01 00:00:00".into();
    zkc.delete(&endpoint_path(product, "echo", &b.service_id), None)
        .await
        .unwrap();
    create_endpoint(&zkc, product, &b2, &ephemeral()).await;
    discovery.until(|e| matches!(e, DiscoveryEvent::Endpoints { endpoints, .. } if endpoints.contains(&common::endpoints(&[&b2])[0]))).await;
    assert_eq!(discovery.table["echo"], endpoints(&[&b2, &c]));

    // A new service appears live, with no endpoint yet, then with one.
    create_service(&zkc, product, "typo").await;
    let event = discovery.next_data().await;
    assert_eq!(
        event,
        DiscoveryEvent::Endpoints {
            service: "typo".into(),
            endpoints: vec![]
        }
    );
    let t = info("typo", "/tmp/typo.sock");
    create_endpoint(&zkc, product, &t, &ephemeral()).await;
    let event = discovery.next_data().await;
    assert_eq!(
        event,
        DiscoveryEvent::Endpoints {
            service: "typo".into(),
            endpoints: endpoints(&[&t])
        }
    );

    // The service is removed (its endpoint first, as ZooKeeper requires).
    zkc.delete(&endpoint_path(product, "typo", &t.service_id), None)
        .await
        .unwrap();
    zkc.delete(&service_path(product, "typo"), None)
        .await
        .unwrap();
    discovery
        .until(|e| matches!(e, DiscoveryEvent::ServiceRemoved { .. }))
        .await;
    assert_eq!(
        discovery.log.last(),
        Some(&DiscoveryEvent::ServiceRemoved {
            service: "typo".into()
        })
    );
    assert!(!discovery.table.contains_key("typo"));
    assert_eq!(discovery.table["echo"], endpoints(&[&b2, &c]));

    // The owner of the ephemeral nodes goes away: they vanish, and so do the endpoints.
    drop(zkc);
    discovery
        .until(|e| matches!(e, DiscoveryEvent::Endpoints { endpoints, .. } if endpoints.is_empty()))
        .await;
    assert!(discovery.table["echo"].is_empty());
    assert!(
        !discovery
            .log
            .iter()
            .any(|e| matches!(e, DiscoveryEvent::ServiceRemoved { service } if service == "echo")),
        "an empty service is not a removed one"
    );
    discovery.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_existing_state_at_start() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let product = "existing";
    let zkc = client(&servers).await;
    let a = info("a", "10.0.0.1:1");
    let b1 = info("b", "10.0.0.2:1");
    let b2 = info("b", "10.0.0.3:1");
    for i in [&a, &b1, &b2] {
        create_service(&zkc, product, &i.service).await;
        create_endpoint(&zkc, product, i, &ephemeral()).await;
    }
    create_service(&zkc, product, "empty").await;
    zkc.create(&endpoint_path(product, "b", "bad"), b"[]", &ephemeral())
        .await
        .unwrap();
    // Another product is not ours.
    create_service(&zkc, "other", "x").await;

    let mut discovery = Discovery::start(settings(&servers, Duration::from_secs(10)), product);
    discovery.until_synced().await;
    assert_eq!(discovery.table.len(), 3);
    assert_eq!(discovery.table["a"], endpoints(&[&a]));
    assert_eq!(discovery.table["b"], endpoints(&[&b1, &b2]));
    assert!(discovery.table["empty"].is_empty());
    discovery.stop().await;
}

/// ZooKeeper crashes and comes back within the session timeout: the session survives, and
/// discovery still resyncs (events during a reconnect can be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_restart_within_session() {
    common::init_tracing();
    let mut zk = ZkServer::start();
    let servers = zk.connect_string();
    let product = "restart";
    let zkc = client(&servers).await;
    let a = info("svc", "10.0.0.1:1");
    let b = info("svc", "10.0.0.2:1");
    create_service(&zkc, product, "svc").await;
    create_endpoint(&zkc, product, &a, &persistent()).await;
    create_endpoint(&zkc, product, &b, &persistent()).await;
    drop(zkc);

    let mut discovery = Discovery::start(settings(&servers, Duration::from_secs(20)), product);
    discovery.until_synced().await;
    assert_eq!(discovery.table["svc"], endpoints(&[&a, &b]));

    tokio::task::block_in_place(|| zk.stop());
    discovery.until_session(SessionState::Disconnected).await;
    tokio::task::block_in_place(|| zk.restart());
    discovery.until_session(SessionState::Connected).await;
    let seen_before_sync = discovery.log.len();
    discovery.until_synced().await;
    assert!(
        !discovery
            .log
            .contains(&DiscoveryEvent::Session(SessionState::Expired)),
        "{:#?}",
        discovery.log
    );
    let resync = &discovery.log[seen_before_sync..];
    assert!(resync.contains(&DiscoveryEvent::Endpoints {
        service: "svc".into(),
        endpoints: endpoints(&[&a, &b])
    }));
    assert_eq!(discovery.table["svc"], endpoints(&[&a, &b]));

    // And it watches again.
    let zkc = client(&servers).await;
    zkc.delete(&endpoint_path(product, "svc", &a.service_id), None)
        .await
        .unwrap();
    let event = discovery.next_data().await;
    assert_eq!(
        event,
        DiscoveryEvent::Endpoints {
            service: "svc".into(),
            endpoints: endpoints(&[&b])
        }
    );
    discovery.stop().await;
}

/// ZooKeeper is down longer than the session timeout: the session expires, nothing but
/// session events is said meanwhile, and a new session resyncs (changes made while the
/// proxy was away included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_resyncs_with_a_new_session() {
    common::init_tracing();
    let mut zk = ZkServer::start();
    let servers = zk.connect_string();
    let product = "expiry";
    let zkc = client(&servers).await;
    let a = info("svc", "10.0.0.1:1");
    let b = info("svc", "10.0.0.2:1");
    create_service(&zkc, product, "svc").await;
    create_service(&zkc, product, "gone").await;
    create_endpoint(&zkc, product, &a, &persistent()).await;
    create_endpoint(&zkc, product, &b, &persistent()).await;

    // 2 s session on a 200 ms tick: the client gives the session up about 3 s after the crash.
    let mut discovery = Discovery::start(settings(&servers, Duration::from_secs(2)), product);
    discovery.until_synced().await;
    assert_eq!(discovery.table["svc"], endpoints(&[&a, &b]));
    assert!(discovery.table.contains_key("gone"));

    // Changes the proxy cannot see while away (persistent nodes survive the crash).
    zkc.delete(&endpoint_path(product, "svc", &a.service_id), None)
        .await
        .unwrap();
    zkc.delete(&service_path(product, "gone"), None)
        .await
        .unwrap();
    drop(zkc);
    let before_crash = discovery.log.len();
    tokio::task::block_in_place(|| zk.stop());
    discovery.until_session(SessionState::Expired).await;
    let while_down = &discovery.log[before_crash..];
    assert!(
        while_down.contains(&DiscoveryEvent::Session(SessionState::Disconnected)),
        "{while_down:#?}"
    );
    // Until ZooKeeper is back, no data event; in particular never an empty set because ZK is down.
    // (Events from the watches that fired before the crash may still arrive; they are not empty.)
    for event in while_down {
        if let DiscoveryEvent::Endpoints { endpoints, .. } = event {
            assert!(
                !endpoints.is_empty(),
                "empty endpoints while zookeeper is down: {while_down:#?}"
            );
        }
    }

    tokio::task::block_in_place(|| zk.restart());
    let back = discovery.log.len();
    discovery.until_synced().await;
    let resync = &discovery.log[back..];
    assert_eq!(
        resync.first(),
        Some(&DiscoveryEvent::Session(SessionState::Connected)),
        "{resync:#?}"
    );
    assert!(
        resync.contains(&DiscoveryEvent::ServiceRemoved {
            service: "gone".into()
        }),
        "{resync:#?}"
    );
    assert_eq!(discovery.table["svc"], endpoints(&[&b]));
    assert_eq!(discovery.table.len(), 1);

    // The new session watches too.
    let zkc = client(&servers).await;
    let c = info("svc", "10.0.0.3:1");
    create_endpoint(&zkc, product, &c, &ephemeral()).await;
    let event = discovery.next_data().await;
    assert_eq!(
        event,
        DiscoveryEvent::Endpoints {
            service: "svc".into(),
            endpoints: endpoints(&[&b, &c])
        }
    );
    discovery.stop().await;
}

/// A "ZooKeeper" that accepts connections and never answers: the connect would hang for the
/// connection timeout (12 s here), but shutdown does not wait for it.
#[tokio::test]
async fn shutdown_is_not_blocked_by_a_hung_zookeeper() {
    common::init_tracing();
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let servers = hung.local_addr().unwrap().to_string();
    let discovery = Discovery::start(settings(&servers, Duration::from_secs(30)), "p");
    let (_conn, _) = tokio::time::timeout(common::EVENT_TIMEOUT, hung.accept())
        .await
        .expect("discovery dials zookeeper")
        .unwrap();
    let stopping = Instant::now();
    discovery.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test]
async fn keeps_retrying_an_unreachable_zookeeper_until_shutdown() {
    common::init_tracing();
    // Nothing listens on port 1: every attempt is refused at once, then retried with backoff.
    let mut discovery = Discovery::start(settings("127.0.0.1:1", Duration::from_secs(30)), "p");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), discovery.next_raw())
            .await
            .is_err(),
        "nothing to say while zookeeper was never reached"
    );
    discovery.stop().await;
}

#[tokio::test]
async fn ends_when_the_events_receiver_is_dropped() {
    common::init_tracing();
    let zk = ZkServer::start();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(rx);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = rpc_registry::run_discovery(
        settings(&zk.connect_string(), Duration::from_secs(10)),
        "p".into(),
        tx,
        shutdown,
    );
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("discovery returns once nobody listens");
}

/// 1,000 services with 4 endpoints each: the full read must be complete. The time to
/// `Synced` is printed, not asserted (benchmarks measure it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_1000_services_of_4_endpoints() {
    common::init_tracing();
    const SERVICES: usize = 1000;
    const ENDPOINTS: usize = 4;
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let product = "scale";
    let zkc = client(&servers).await;
    zkc.mkdir(&services_path(product), &persistent())
        .await
        .unwrap();
    let created = Instant::now();
    let names: Vec<String> = (0..SERVICES).map(|i| format!("service{i:04}")).collect();
    // Requests are sent when called: build all futures first, then await them together.
    let options = persistent();
    let service_paths: Vec<String> = names.iter().map(|s| service_path(product, s)).collect();
    let creates: Vec<_> = service_paths
        .iter()
        .map(|path| zkc.create(path, &[], &options))
        .collect();
    for result in futures::future::join_all(creates).await {
        result.unwrap();
    }
    let infos: Vec<_> = names
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            (0..ENDPOINTS).map(move |e| info(s, &format!("10.{}.{}.{e}:9000", i / 256, i % 256)))
        })
        .collect();
    let datas: Vec<Vec<u8>> = infos
        .iter()
        .map(|i| serde_json::to_vec(i).unwrap())
        .collect();
    let paths: Vec<String> = infos
        .iter()
        .map(|i| endpoint_path(product, &i.service, &i.service_id))
        .collect();
    let creates: Vec<_> = paths
        .iter()
        .zip(&datas)
        .map(|(path, data)| zkc.create(path, data, &options))
        .collect();
    for result in futures::future::join_all(creates).await {
        result.unwrap();
    }
    eprintln!(
        "created {SERVICES} services x {ENDPOINTS} endpoints in {:?}",
        created.elapsed()
    );

    let started = Instant::now();
    let mut discovery = Discovery::start(settings(&servers, Duration::from_secs(10)), product);
    discovery.until_session(SessionState::Connected).await;
    let connected = started.elapsed();
    discovery.until_synced().await;
    let synced = started.elapsed();
    eprintln!(
        "discovery of {SERVICES}x{ENDPOINTS}: connected after {connected:?}, synced after {synced:?} \
         ({:?} from connect to Synced)",
        synced - connected
    );
    assert_eq!(discovery.table.len(), SERVICES);
    for name in &names {
        let eps = &discovery.table[name];
        assert_eq!(eps.len(), ENDPOINTS, "{name}");
        assert!(
            eps.iter()
                .all(|e| e.info.service == *name && e.info.frontend.starts_with("10."))
        );
    }
    let endpoint_events = discovery
        .log
        .iter()
        .filter(|e| matches!(e, DiscoveryEvent::Endpoints { .. }))
        .count();
    assert_eq!(endpoint_events, SERVICES, "one Endpoints event per service");
    discovery.stop().await;

    // Again, against a server that has warmed up (as a production ZooKeeper is).
    let started = Instant::now();
    let mut discovery = Discovery::start(settings(&servers, Duration::from_secs(10)), product);
    discovery.until_session(SessionState::Connected).await;
    let connected = started.elapsed();
    discovery.until_synced().await;
    eprintln!(
        "discovery of {SERVICES}x{ENDPOINTS} again (warm server): {:?} from connect to Synced",
        started.elapsed() - connected
    );
    assert_eq!(discovery.table.len(), SERVICES);
    assert!(discovery.table.values().all(|eps| eps.len() == ENDPOINTS));
    discovery.stop().await;
}

/// How soon a vanished endpoint is reported: from the delete's reply to the event (printed,
/// not asserted; the first rounds include the server's JIT warm-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_removal_latency() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let product = "latency";
    let zkc = client(&servers).await;
    let mut discovery = Discovery::start(settings(&servers, Duration::from_secs(10)), product);
    discovery.until_synced().await;
    create_service(&zkc, product, "svc").await;
    let mut latencies = Vec::new();
    for round in 0..20 {
        let a = info("svc", &format!("10.0.0.{round}:1"));
        let b = info("svc", &format!("10.0.1.{round}:1"));
        create_endpoint(&zkc, product, &a, &ephemeral()).await;
        create_endpoint(&zkc, product, &b, &ephemeral()).await;
        discovery
            .until(|e| matches!(e, DiscoveryEvent::Endpoints { endpoints, .. } if endpoints.len() == 2))
            .await;
        zkc.delete(&endpoint_path(product, "svc", &a.service_id), None)
            .await
            .unwrap();
        let deleted = Instant::now();
        let event = discovery.next_data().await;
        latencies.push(deleted.elapsed());
        assert_eq!(
            event,
            DiscoveryEvent::Endpoints {
                service: "svc".into(),
                endpoints: endpoints(&[&b])
            }
        );
        zkc.delete(&endpoint_path(product, "svc", &b.service_id), None)
            .await
            .unwrap();
        discovery
            .until(|e| matches!(e, DiscoveryEvent::Endpoints { endpoints, .. } if endpoints.is_empty()))
            .await;
    }
    let mut sorted = latencies.clone();
    sorted.sort();
    eprintln!(
        "endpoint removal reported after the delete's reply: median {:?}, max {:?}, last 5 {:?}",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
        &latencies[latencies.len() - 5..]
    );
    discovery.stop().await;
}
