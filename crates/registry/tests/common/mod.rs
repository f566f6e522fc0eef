//! Shared harness of the registry integration tests: a discovery task with a model of the
//! routing table it feeds, and a plain ZooKeeper client to arrange nodes.

#![allow(dead_code)] // Each test binary uses its own subset.

pub mod relay;

use std::collections::BTreeMap;
use std::time::Duration;

use rpc_registry::{DiscoveryEvent, Endpoint, EndpointInfo, LocalHost, SessionState, ZkSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zookeeper_client as zk;

/// The host name in the node data of [`info`]: the tests' mesh runs on `web1`, and so does
/// the proxy of [`Discovery::start`] (unix-path frontends are routable only from their host).
pub const FIXTURE_HOST: &str = "web1";

/// Generous bound for any single expected event (CI boxes are slow and shared).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

pub fn settings(servers: &str, session_timeout: Duration) -> ZkSettings {
    ZkSettings {
        servers: servers.to_owned(),
        session_timeout,
        auth: None,
    }
}

/// A plain client for arranging nodes (its own session).
pub async fn client(servers: &str) -> zk::Client {
    zk::Client::connector()
        .with_session_timeout(Duration::from_secs(20))
        .connect(servers)
        .await
        .expect("test client connects")
}

pub fn info(service: &str, frontend: &str) -> EndpointInfo {
    EndpointInfo {
        service: service.to_owned(),
        service_id: rpc_registry::service_id(frontend),
        frontend: frontend.to_owned(),
        deploy_path: "/srv/app".to_owned(),
        code_url_version: "git@host:grp/app.git@936d577".to_owned(),
        hostname: FIXTURE_HOST.to_owned(),
        start_time: "2017-07-08 12:00:00".to_owned(),
        marks: 1,
    }
}

pub fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

pub fn ephemeral() -> zk::CreateOptions<'static> {
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all())
}

/// Creates the service node (and parents) if missing.
pub async fn create_service(client: &zk::Client, product: &str, service: &str) {
    client
        .mkdir(&rpc_registry::service_path(product, service), &persistent())
        .await
        .expect("mkdir service");
}

/// Creates an endpoint node the way an LB does (JSON of `info` under its service_id).
pub async fn create_endpoint(
    client: &zk::Client,
    product: &str,
    info: &EndpointInfo,
    options: &zk::CreateOptions<'_>,
) -> String {
    let path = rpc_registry::endpoint_path(product, &info.service, &info.service_id);
    let data = serde_json::to_vec(info).unwrap();
    client
        .create(&path, &data, options)
        .await
        .expect("create endpoint");
    path
}

/// A running `run_discovery` plus the table its events describe.
pub struct Discovery {
    rx: mpsc::Receiver<DiscoveryEvent>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// The routing table as the events built it.
    pub table: BTreeMap<String, Vec<Endpoint>>,
    /// Every event received, in order.
    pub log: Vec<DiscoveryEvent>,
}

impl Discovery {
    /// Discovery for a proxy on [`FIXTURE_HOST`], the host of every node [`info`] makes.
    pub fn start(settings: ZkSettings, product: &str) -> Discovery {
        Self::start_as(settings, product, LocalHost::named(FIXTURE_HOST))
    }

    /// Discovery for a proxy on `local_host` (the same-host rule of unix-path frontends).
    pub fn start_as(settings: ZkSettings, product: &str, local_host: LocalHost) -> Discovery {
        let product = product.to_owned();
        Self::spawn(|tx, shutdown| {
            rpc_registry::run_discovery_as(settings, product, local_host, tx, shutdown)
        })
    }

    fn spawn<F>(run: impl FnOnce(mpsc::Sender<DiscoveryEvent>, CancellationToken) -> F) -> Discovery
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(tx, shutdown.clone()));
        Discovery {
            rx,
            shutdown,
            task,
            table: BTreeMap::new(),
            log: Vec::new(),
        }
    }

    /// The next event (applied to the table).
    pub async fn next(&mut self) -> DiscoveryEvent {
        let event = tokio::time::timeout(EVENT_TIMEOUT, self.rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no discovery event within {EVENT_TIMEOUT:?}; so far: {:#?}",
                    self.log
                )
            })
            .expect("discovery ended");
        match &event {
            DiscoveryEvent::Endpoints { service, endpoints } => {
                self.table.insert(service.clone(), endpoints.clone());
            }
            DiscoveryEvent::ServiceRemoved { service } => {
                self.table.remove(service);
            }
            DiscoveryEvent::Synced | DiscoveryEvent::Session(_) => {}
        }
        self.log.push(event.clone());
        event
    }

    /// The next event or `None` if discovery ended (no timeout, not applied to the table).
    pub async fn next_raw(&mut self) -> Option<DiscoveryEvent> {
        self.rx.recv().await
    }

    /// Skips (but applies) events until one matches; returns it.
    pub async fn until(
        &mut self,
        mut matches: impl FnMut(&DiscoveryEvent) -> bool,
    ) -> DiscoveryEvent {
        loop {
            let event = self.next().await;
            if matches(&event) {
                return event;
            }
        }
    }

    /// The next event that is not a session state change.
    pub async fn next_data(&mut self) -> DiscoveryEvent {
        self.until(|e| !matches!(e, DiscoveryEvent::Session(_)))
            .await
    }

    pub async fn until_synced(&mut self) {
        self.until(|e| *e == DiscoveryEvent::Synced).await;
    }

    pub async fn until_session(&mut self, state: SessionState) {
        self.until(|e| *e == DiscoveryEvent::Session(state)).await;
    }

    /// Node names of a service in the table.
    pub fn nodes(&self, service: &str) -> Vec<String> {
        self.table
            .get(service)
            .map(|eps| eps.iter().map(|e| e.node.clone()).collect())
            .unwrap_or_default()
    }

    /// Cancels and waits (bounded) for the task to end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("discovery stops promptly on shutdown")
            .expect("discovery task does not panic");
    }
}

/// The endpoints of a service, as an `Endpoints` event carries them.
pub fn endpoints(infos: &[&EndpointInfo]) -> Vec<Endpoint> {
    let mut eps: Vec<Endpoint> = infos
        .iter()
        .map(|i| Endpoint {
            node: i.service_id.clone(),
            info: (*i).clone(),
        })
        .collect();
    eps.sort_by(|a, b| a.node.cmp(&b.node));
    eps
}
