//! The same-host rule of discovery (CONTRACT section 9) against a real ZooKeeper: a unix-path
//! frontend reaches the routing table only when its node's `hostname` is empty, `localhost`
//! or the proxy's host; TCP frontends always do. A skipped node is warned about once per
//! version, not again on every read (a watch on its service, a resync).

mod common;

use std::sync::{Mutex, Once};
use std::time::Duration;

use common::{Discovery, EVENT_TIMEOUT, client, create_endpoint, ephemeral, info, settings};
use rpc_registry::{EndpointInfo, LocalHost, SessionState};
use rpc_testkit::{ZkServer, wait_until_async};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

const PRODUCT: &str = "samehost";
/// The warning of a skipped unix-path endpoint (crates/registry/src/discovery.rs).
const SKIP_WARNING: &str = "skipping endpoint: unix-path frontend of another host";

/// Every warning logged by this test binary, as `message field=value ...`.
static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records warnings into [`WARNINGS`].
struct RecordWarnings;

/// Renders an event's fields as one line.
#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for RecordWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut line = Line::default();
            event.record(&mut line);
            WARNINGS.lock().unwrap().push(line.0);
        }
    }
}

fn record_warnings() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        tracing_subscriber::registry()
            .with(RecordWarnings)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
            )
            .init();
    });
}

/// The skip warnings of discovery on `host` about `node`.
fn skip_warnings(host: &str, node: &str) -> Vec<String> {
    let local = format!("not by this host {host}");
    WARNINGS
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.contains(SKIP_WARNING) && w.contains(&local))
        .filter(|w| w.contains(&format!("node={node}")))
        .cloned()
        .collect()
}

fn with_host(mut info: EndpointInfo, hostname: &str) -> EndpointInfo {
    info.hostname = hostname.to_owned();
    info
}

/// Checks that discovery's table holds exactly `expected` for the service `echo`.
#[track_caller]
fn assert_exactly(discovery: &Discovery, expected: &[&EndpointInfo]) {
    let mut expected = expected.to_vec();
    expected.sort_by(|a, b| a.service_id.cmp(&b.service_id));
    let names: Vec<&str> = expected.iter().map(|i| i.service_id.as_str()).collect();
    assert_eq!(discovery.nodes("echo"), names, "endpoint nodes");
    for (endpoint, info) in discovery.table["echo"].iter().zip(expected) {
        assert_eq!(&endpoint.info, info, "data of {}", endpoint.node);
    }
}

/// Waits until `ready` holds for the node names of `echo` in discovery's table (each event
/// bounded by the harness), then checks the table as [`assert_exactly`] does.
async fn until_then_exactly(
    discovery: &mut Discovery,
    ready: impl Fn(&[String]) -> bool,
    expected: &[&EndpointInfo],
) {
    while !ready(&discovery.nodes("echo")) {
        discovery.next().await;
    }
    assert_exactly(discovery, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_frontends_reach_only_the_proxy_of_their_host() {
    record_warnings();
    let mut zk = ZkServer::start();
    let servers = zk.connect_string();
    let zkc = client(&servers).await;
    common::create_service(&zkc, PRODUCT, "echo").await;

    let on_web1 = with_host(info("echo", "/run/rpc/on-web1.sock"), "web1");
    let on_web2 = with_host(info("echo", "/run/rpc/on-web2.sock"), "WEB2");
    let unnamed = with_host(info("echo", "/run/rpc/unnamed.sock"), "");
    let localhost = with_host(info("echo", "/run/rpc/localhost.sock"), "localhost");
    let tcp = with_host(info("echo", "10.0.0.2:5555"), "web2");
    for endpoint in [&on_web1, &on_web2, &unnamed, &localhost, &tcp] {
        create_endpoint(&zkc, PRODUCT, endpoint, &ephemeral()).await;
    }

    let session = Duration::from_secs(20);
    let mut web1 = Discovery::start_as(
        settings(&servers, session),
        PRODUCT,
        LocalHost::named("web1"),
    );
    let mut web2 = Discovery::start_as(
        settings(&servers, session),
        PRODUCT,
        LocalHost::named("web2"),
    );
    web1.until_synced().await;
    web2.until_synced().await;
    assert_exactly(&web1, &[&on_web1, &unnamed, &localhost, &tcp]);
    assert_exactly(&web2, &[&on_web2, &unnamed, &localhost, &tcp]);
    assert_eq!(skip_warnings("web1", &on_web2.service_id).len(), 1);
    assert_eq!(skip_warnings("web2", &on_web1.service_id).len(), 1);

    // Another endpoint joins: the service's watch fires and every node of it is read again.
    let joined = with_host(info("echo", "10.0.0.3:5555"), "web3");
    create_endpoint(&zkc, PRODUCT, &joined, &ephemeral()).await;
    let has_joined = |nodes: &[String]| nodes.contains(&joined.service_id);
    until_then_exactly(
        &mut web1,
        has_joined,
        &[&on_web1, &unnamed, &localhost, &tcp, &joined],
    )
    .await;
    until_then_exactly(
        &mut web2,
        has_joined,
        &[&on_web2, &unnamed, &localhost, &tcp, &joined],
    )
    .await;

    // ZooKeeper restarts: both sessions come back (the server restores them) and resync.
    tokio::task::block_in_place(|| zk.restart());
    for discovery in [&mut web1, &mut web2] {
        discovery.until_session(SessionState::Disconnected).await;
        discovery.until_synced().await;
    }
    assert_exactly(&web1, &[&on_web1, &unnamed, &localhost, &tcp, &joined]);
    assert_exactly(&web2, &[&on_web2, &unnamed, &localhost, &tcp, &joined]);
    let once = |host: &str, node: &EndpointInfo| {
        let warnings = skip_warnings(host, &node.service_id);
        assert_eq!(
            warnings.len(),
            1,
            "one warning for {} on {host}, not one per read: {warnings:#?}",
            node.service_id
        );
    };
    once("web1", &on_web2);
    once("web2", &on_web1);

    // The node is registered again by web1 (its LB moved): the verdict follows the new
    // node, and web2 warns about it once.
    let moved = with_host(on_web2.clone(), "web1");
    let path = rpc_registry::endpoint_path(PRODUCT, "echo", &moved.service_id);
    zkc.delete(&path, None).await.expect("delete");
    create_endpoint(&zkc, PRODUCT, &moved, &ephemeral()).await;
    let has_moved = |nodes: &[String]| nodes.contains(&moved.service_id);
    until_then_exactly(
        &mut web1,
        has_moved,
        &[&on_web1, &moved, &unnamed, &localhost, &tcp, &joined],
    )
    .await;
    until_then_exactly(
        &mut web2,
        |nodes| !has_moved(nodes),
        &[&unnamed, &localhost, &tcp, &joined],
    )
    .await;
    // The removal may be sent before the new node is read: wait for the read's warning.
    wait_until_async(EVENT_TIMEOUT, || async {
        !skip_warnings("web2", &moved.service_id).is_empty()
    })
    .await;
    let warnings = skip_warnings("web2", &moved.service_id);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    once("web1", &on_web2);

    web1.stop().await;
    web2.stop().await;
}
