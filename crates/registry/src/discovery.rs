//! The proxy's view of ZooKeeper: [`run_discovery`] keeps a children watch on
//! `/zk/product/<product>/services` and on every service under it, reads each endpoint
//! node's JSON, and tells the routing table through [`DiscoveryEvent`]s.
//!
//! # How it reads
//! `zookeeper_client` sends a request when its method is *called* and pipelines every request
//! of a session over one connection, so discovery issues a whole batch of calls first and
//! awaits them together: a full read is three round trips (list services; list every
//! service; get every endpoint's data) whatever the number of nodes.
//!
//! # Sessions
//! Every (re)connection is followed by a full read ending with [`DiscoveryEvent::Synced`]:
//! events during a reconnect can be lost (ZOOKEEPER-4698), and after `Expired` the client is
//! dead, so a new one is made. While disconnected nothing is said about endpoints: the last
//! table stays valid, and only successful reads ever produce [`DiscoveryEvent::Endpoints`].
//!
//! A session disconnected for longer than `session::TAKEOVER_AFTER` is raced against new
//! sessions made with a capped backoff (the library's own retries grow without bound): if
//! a new one is established first, the old client is dropped and discovery goes on with the
//! new session. Discovery holds no ephemeral node, so nothing is lost by leaving a session
//! that might still have come back; events say `Disconnected` then `Connected` (a reconnect,
//! not an expiry: `Expired` is only sent for a session the library declared expired).
//!
//! # Promptness of removals
//! When a service's children watch fires, the service is listed again (one round trip) and,
//! if endpoints vanished, the remaining set (from cached data) is sent *at once*. Only then
//! is every listed endpoint's data read again (an endpoint re-registered under the same name
//! may carry new data), and the set is sent again if that changed it. Watches that fired
//! together are handled as one batch, so a host going away with many services costs the
//! same two round trips.
//!
//! # Same-host rule
//! An endpoint whose `frontend` is a unix path registered by another host is left out of
//! every [`DiscoveryEvent::Endpoints`] (see [`LocalHost`]), with one warning per node
//! version: a node read again unchanged (on a resync, or when another endpoint of its
//! service changed) is skipped quietly.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use futures::FutureExt;
use futures::future::{BoxFuture, join_all};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use crate::session::{self, Backoff};
use crate::{DiscoveryEvent, Endpoint, EndpointInfo, LocalHost, SessionState, ZkSettings};
use crate::{endpoint_path, service_path, services_path};

/// Watches every service of `product` and sends [`DiscoveryEvent`]s until `shutdown` is
/// cancelled. Never fails: when ZooKeeper is unreachable or the session expires it keeps
/// quiet about endpoints (the last table stays valid), reconnects with jittered backoff, and
/// resyncs (sending the full state again, then [`DiscoveryEvent::Synced`]).
///
/// Also returns when `events` is closed (nobody is listening any more).
///
/// Unix-path frontends are routable when registered by this machine ([`LocalHost::current`]);
/// [`run_discovery_as`] names another host.
pub async fn run_discovery(
    settings: ZkSettings,
    product: String,
    events: mpsc::Sender<DiscoveryEvent>,
    shutdown: CancellationToken,
) {
    run_discovery_as(settings, product, LocalHost::current(), events, shutdown).await;
}

/// [`run_discovery`] for a proxy on `local_host`: a unix-path frontend is passed on only
/// when its node's `hostname` is empty, `localhost` or that host's name.
pub async fn run_discovery_as(
    settings: ZkSettings,
    product: String,
    local_host: LocalHost,
    events: mpsc::Sender<DiscoveryEvent>,
    shutdown: CancellationToken,
) {
    info!(
        servers = %settings.servers,
        product = %product,
        host = %local_host,
        "discovery starting"
    );
    let discovery = Discovery::new(product, local_host, events);
    // Dropping the discovery future mid-call is fine: its client goes with it, which closes
    // the session. A connect or read in progress therefore never delays shutdown.
    tokio::select! {
        biased;
        () = shutdown.cancelled() => info!("discovery stopped"),
        Closed = discovery.run(settings) => info!("discovery stopped: events receiver closed"),
    }
}

/// The events receiver is gone: there is nobody to tell, so discovery ends.
#[derive(Debug)]
struct Closed;

/// What to do after a session state change or a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Connected: read everything again and watch.
    Resync,
    /// Not connected: wait for the session to come back (or to expire), or replace it.
    WaitState,
    /// The client is dead (expired, closed): make a new one.
    NewClient,
}

/// An endpoint node as last read.
#[derive(Debug, Clone)]
struct Node {
    /// Creation and modification zxids: a node that was re-created or rewritten has new ones.
    czxid: i64,
    mzxid: i64,
    /// `None` when the endpoint is skipped: its data was not valid JSON, or it is a unix
    /// path of another host.
    info: Option<EndpointInfo>,
}

/// A service as last read.
#[derive(Debug)]
struct Service {
    /// Endpoint nodes by name.
    nodes: BTreeMap<String, Node>,
    /// Generation of the service's live children watch; fired watches of other generations
    /// are stale (from before a resync, or of an earlier service of the same name).
    watch_gen: u64,
    /// The endpoints last sent for this service.
    sent: Vec<Endpoint>,
}

/// A service read from ZooKeeper, with its children watch armed.
struct ServiceRead {
    name: String,
    watch: zk::OneshotWatcher,
    /// Endpoint nodes that still existed when their data was read, sorted by name.
    nodes: Vec<NodeRead>,
}

/// One endpoint node's raw data.
struct NodeRead {
    name: String,
    data: Vec<u8>,
    stat: zk::Stat,
}

/// A full read of the product.
struct Snapshot {
    services_watch: zk::OneshotWatcher,
    services: Vec<ServiceRead>,
}

/// The children watch of one service fired: `(service, watch generation, event)`.
type ServiceWatch = BoxFuture<'static, (String, u64, zk::WatchedEvent)>;

/// The watches of one read of the product.
struct Watches {
    /// Children of `.../services`; `pending()` once fired until re-armed.
    services: BoxFuture<'static, zk::WatchedEvent>,
    /// Children of each service.
    per_service: FuturesUnordered<ServiceWatch>,
}

/// The discovery loop's state. One task owns it; nothing is shared.
struct Discovery {
    product: String,
    services_path: String,
    /// The host whose unix-path frontends are routable.
    local_host: LocalHost,
    events: mpsc::Sender<DiscoveryEvent>,
    /// Services as last read. Kept across disconnects and sessions: it is what the proxy
    /// routes with meanwhile, and a resync diffs against it to send `ServiceRemoved`.
    table: BTreeMap<String, Service>,
    /// The session state last sent.
    session: Option<SessionState>,
    /// Source of watch generations.
    next_gen: u64,
}

// === impl Discovery ===

impl Discovery {
    fn new(product: String, local_host: LocalHost, events: mpsc::Sender<DiscoveryEvent>) -> Self {
        Discovery {
            services_path: services_path(&product),
            product,
            local_host,
            events,
            table: BTreeMap::new(),
            session: None,
            next_gen: 0,
        }
    }

    /// Connects, serves the session until it dies or is replaced, and starts over; forever.
    async fn run(mut self, settings: ZkSettings) -> Closed {
        let mut reconnect = Backoff::reconnect();
        let mut client = session::connect_retrying(&settings, &mut reconnect).await;
        loop {
            info!(
                session = %client.session_id(),
                timeout = ?client.session_timeout(),
                "zookeeper session established"
            );
            client = match self.serve(&client, &settings).await {
                Err(closed) => return closed,
                // Dropping the old client closes its session (once it reaches a server).
                Ok(Some(replacement)) => replacement,
                Ok(None) => session::connect_retrying(&settings, &mut reconnect).await,
            };
        }
    }

    /// Serves one client until its session is over (expired or closed: `None`) or a new
    /// session replaced it while it was disconnected (`Some(new)`).
    async fn serve(
        &mut self,
        client: &zk::Client,
        settings: &ZkSettings,
    ) -> Result<Option<zk::Client>, Closed> {
        let mut backoff = Backoff::retry();
        let mut state = client.state_watcher();
        // `state_watcher()` starts from the current state: look at it before waiting.
        let mut next = match state.peek_state() {
            s if session::is_terminal(s) => Next::NewClient,
            zk::SessionState::Disconnected => Next::WaitState,
            _ => {
                self.session_changed(SessionState::Connected).await?;
                Next::Resync
            }
        };
        // Watches of the current read; replaced (and the old ones dropped) only after a new
        // read armed its own, so the server never sees a path without a watch.
        let mut watches: Option<Watches> = None;
        // When the connection was found lost; `None` while connected.
        let mut lost: Option<Instant> = None;
        loop {
            if next == Next::Resync {
                lost = None;
            }
            next = match next {
                Next::NewClient => {
                    self.session_changed(SessionState::Expired).await?;
                    return Ok(None);
                }
                Next::WaitState => {
                    let since = *lost.get_or_insert_with(Instant::now);
                    // The current state first: a call can fail with a connection loss whose
                    // state changes were already seen (the session may be back already).
                    match state.state() {
                        s if session::is_terminal(s) => Next::NewClient,
                        zk::SessionState::Disconnected => {
                            self.session_changed(SessionState::Disconnected).await?;
                            tokio::select! {
                                biased;
                                s = state.changed() => self.on_state(s).await?,
                                replacement = session::take_over(settings, since) => {
                                    info!(
                                        old = %client.session_id(),
                                        new = %replacement.session_id(),
                                        disconnected = ?since.elapsed(),
                                        "zookeeper is back before the old session reconnected; \
                                         going on with the new session"
                                    );
                                    return Ok(Some(replacement));
                                }
                            }
                        }
                        s => self.on_state(s).await?,
                    }
                }
                Next::Resync => {
                    let started = Instant::now();
                    let read = tokio::select! {
                        biased;
                        s = state.changed() => Err(s),
                        read = read_all(client, &self.product) => Ok(read),
                    };
                    match read {
                        Err(s) => self.on_state(s).await?,
                        Ok(Err(err)) => after_error(client, &err, &mut backoff).await,
                        Ok(Ok(snapshot)) => {
                            let fresh = self.apply_snapshot(snapshot, started).await?;
                            backoff.reset();
                            let watches = watches.insert(fresh);
                            self.watch(client, &mut state, watches, &mut backoff)
                                .await?
                        }
                    }
                }
            };
        }
    }

    /// Reacts to watches until the session changes state or a call fails.
    async fn watch(
        &mut self,
        client: &zk::Client,
        state: &mut zk::StateWatcher,
        watches: &mut Watches,
        backoff: &mut Backoff,
    ) -> Result<Next, Closed> {
        enum Fired {
            State(zk::SessionState),
            Services(zk::WatchedEvent),
            Service(String, u64, zk::WatchedEvent),
        }
        loop {
            let fired = tokio::select! {
                biased;
                s = state.changed() => Fired::State(s),
                event = &mut watches.services => Fired::Services(event),
                Some((service, watch_gen, event)) = watches.per_service.next() => {
                    Fired::Service(service, watch_gen, event)
                }
            };
            let result = match fired {
                Fired::State(s) => return self.on_state(s).await,
                Fired::Services(event) => {
                    watches.services = Box::pin(std::future::pending());
                    if event.event_type == zk::EventType::Session {
                        // Terminal session event: the state watcher reports it too.
                        continue;
                    }
                    self.refresh_services(client, watches).await?
                }
                Fired::Service(service, watch_gen, event) => {
                    let mut fired = vec![(service, watch_gen, event)];
                    // Take every watch that fired meanwhile: one batch, one pair of round trips.
                    while let Some(Some(more)) = watches.per_service.next().now_or_never() {
                        fired.push(more);
                    }
                    let services: BTreeSet<String> = fired
                        .into_iter()
                        .filter(|(service, watch_gen, event)| {
                            event.event_type != zk::EventType::Session
                                && self
                                    .table
                                    .get(service)
                                    .is_some_and(|s| s.watch_gen == *watch_gen)
                        })
                        .map(|(service, _, _)| service)
                        .collect();
                    if services.is_empty() {
                        continue;
                    }
                    self.refresh(client, services, watches).await?
                }
            };
            if let Err(err) = result {
                return Ok(after_error(client, &err, backoff).await);
            }
        }
    }

    /// Sends the session state if it changed, and logs it once.
    async fn session_changed(&mut self, state: SessionState) -> Result<(), Closed> {
        if self.session == Some(state) {
            return Ok(());
        }
        self.session = Some(state);
        match state {
            SessionState::Connected => info!("zookeeper connected"),
            SessionState::Disconnected => {
                info!("zookeeper connection lost; keeping the last known endpoints")
            }
            SessionState::Expired => info!("zookeeper session expired; making a new session"),
        }
        self.emit(DiscoveryEvent::Session(state)).await
    }

    async fn on_state(&mut self, state: zk::SessionState) -> Result<Next, Closed> {
        Ok(match state {
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                self.session_changed(SessionState::Connected).await?;
                Next::Resync
            }
            zk::SessionState::Disconnected => {
                self.session_changed(SessionState::Disconnected).await?;
                Next::WaitState
            }
            // Expired, Closed, AuthFailed: terminal.
            _ => Next::NewClient,
        })
    }

    async fn emit(&self, event: DiscoveryEvent) -> Result<(), Closed> {
        self.events.send(event).await.map_err(|_| Closed)
    }

    fn next_gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    /// Replaces the table with a full read: every service's endpoints, `ServiceRemoved` for
    /// services that are gone, then `Synced`.
    async fn apply_snapshot(
        &mut self,
        snapshot: Snapshot,
        started: Instant,
    ) -> Result<Watches, Closed> {
        let watch_gen = self.next_gen();
        let per_service = FuturesUnordered::new();
        let mut table = BTreeMap::new();
        let mut endpoints_total = 0;
        for read in snapshot.services {
            let nodes = self.parse_nodes(&read.name, read.nodes);
            let endpoints = endpoints_of(&nodes);
            endpoints_total += endpoints.len();
            per_service.push(service_watch(read.name.clone(), watch_gen, read.watch));
            table.insert(
                read.name,
                Service {
                    nodes,
                    watch_gen,
                    sent: endpoints,
                },
            );
        }
        let old = std::mem::replace(&mut self.table, table);
        for (service, state) in &self.table {
            self.emit(DiscoveryEvent::Endpoints {
                service: service.clone(),
                endpoints: state.sent.clone(),
            })
            .await?;
        }
        for service in old.into_keys().filter(|s| !self.table.contains_key(s)) {
            self.emit(DiscoveryEvent::ServiceRemoved { service })
                .await?;
        }
        self.emit(DiscoveryEvent::Synced).await?;
        info!(
            services = self.table.len(),
            endpoints = endpoints_total,
            elapsed = ?started.elapsed(),
            "discovery synced"
        );
        Ok(Watches {
            services: services_watch(snapshot.services_watch),
            per_service,
        })
    }

    /// The services' children changed: watch new services, drop vanished ones.
    async fn refresh_services(
        &mut self,
        client: &zk::Client,
        watches: &mut Watches,
    ) -> Result<Result<(), zk::Error>, Closed> {
        let (names, _stat, watch) = match client.get_and_watch_children(&self.services_path).await {
            Ok(listed) => listed,
            Err(err) => return Ok(Err(err)),
        };
        watches.services = services_watch(watch);
        let names: BTreeSet<String> = names.into_iter().collect();
        let gone: Vec<String> = self
            .table
            .keys()
            .filter(|s| !names.contains(*s))
            .cloned()
            .collect();
        for service in gone {
            self.table.remove(&service);
            debug!(%service, "service removed");
            self.emit(DiscoveryEvent::ServiceRemoved { service })
                .await?;
        }
        let new: Vec<String> = names
            .into_iter()
            .filter(|s| !self.table.contains_key(s))
            .collect();
        if new.is_empty() {
            return Ok(Ok(()));
        }
        let reads = match read_services(client, &self.product, new).await {
            Ok(reads) => reads,
            Err(err) => return Ok(Err(err)),
        };
        let watch_gen = self.next_gen();
        for read in reads {
            let nodes = self.parse_nodes(&read.name, read.nodes);
            let endpoints = endpoints_of(&nodes);
            watches
                .per_service
                .push(service_watch(read.name.clone(), watch_gen, read.watch));
            debug!(service = %read.name, endpoints = endpoints.len(), "service added");
            self.table.insert(
                read.name.clone(),
                Service {
                    nodes,
                    watch_gen,
                    sent: endpoints.clone(),
                },
            );
            self.emit(DiscoveryEvent::Endpoints {
                service: read.name,
                endpoints,
            })
            .await?;
        }
        Ok(Ok(()))
    }

    /// The children watches of `services` fired: list them again (re-arming the watches),
    /// send removals at once from cached data, then re-read every endpoint's data.
    async fn refresh(
        &mut self,
        client: &zk::Client,
        services: BTreeSet<String>,
        watches: &mut Watches,
    ) -> Result<Result<(), zk::Error>, Closed> {
        let paths: Vec<String> = services
            .iter()
            .map(|s| service_path(&self.product, s))
            .collect();
        let lists = join_all(
            paths
                .iter()
                .map(|path| client.list_and_watch_children(path)),
        )
        .await;

        // Round trip 1 is back: re-arm, and send what is known to be gone right away.
        let mut listed: Vec<(String, Vec<String>, bool)> = Vec::with_capacity(services.len());
        for (service, list) in services.into_iter().zip(lists) {
            let (mut names, watch) = match list {
                Ok(list) => list,
                Err(zk::Error::NoNode) => {
                    if self.table.remove(&service).is_some() {
                        debug!(%service, "service removed");
                        self.emit(DiscoveryEvent::ServiceRemoved { service })
                            .await?;
                    }
                    continue;
                }
                Err(err) => return Ok(Err(err)),
            };
            names.sort_unstable();
            let watch_gen = self.next_gen();
            watches
                .per_service
                .push(service_watch(service.clone(), watch_gen, watch));
            let Some(state) = self.table.get_mut(&service) else {
                continue; // Filtered by the caller: a watched service is in the table.
            };
            state.watch_gen = watch_gen;
            let before = state.nodes.len();
            state
                .nodes
                .retain(|node, _| names.binary_search(node).is_ok());
            let removed = state.nodes.len() != before;
            if removed {
                state.sent = endpoints_of(&state.nodes);
                let endpoints = state.sent.clone();
                self.emit(DiscoveryEvent::Endpoints {
                    service: service.clone(),
                    endpoints,
                })
                .await?;
            }
            listed.push((service, names, removed));
        }

        // Round trip 2: every listed endpoint's data, all requests in flight together.
        let reads = join_all(listed.iter().map(|(service, names, _)| {
            let product = self.product.as_str();
            join_all(
                names
                    .iter()
                    .map(|node| client.get_data(&endpoint_path(product, service, node))),
            )
        }))
        .await;
        for ((service, names, removed), datas) in listed.into_iter().zip(reads) {
            let mut nodes = Vec::with_capacity(names.len());
            for (name, data) in names.into_iter().zip(datas) {
                match data {
                    Ok((data, stat)) => nodes.push(NodeRead { name, data, stat }),
                    // Deleted since the list: its watch has fired again already.
                    Err(zk::Error::NoNode) => {}
                    Err(err) => return Ok(Err(err)),
                }
            }
            let nodes = self.parse_nodes(&service, nodes);
            let endpoints = endpoints_of(&nodes);
            let Some(state) = self.table.get_mut(&service) else {
                continue;
            };
            state.nodes = nodes;
            if removed && state.sent == endpoints {
                continue; // Already sent by the fast path.
            }
            state.sent = endpoints.clone();
            self.emit(DiscoveryEvent::Endpoints { service, endpoints })
                .await?;
        }
        Ok(Ok(()))
    }

    /// Parses endpoint data and applies the same-host rule; logs a skipped endpoint once per
    /// node version (the same version always gets the same verdict).
    fn parse_nodes(&self, service: &str, reads: Vec<NodeRead>) -> BTreeMap<String, Node> {
        let known = self.table.get(service);
        reads
            .into_iter()
            .map(|read| {
                let seen = known.and_then(|s| s.nodes.get(&read.name)).is_some_and(|old| {
                    old.czxid == read.stat.czxid && old.mzxid == read.stat.mzxid
                });
                let info = match EndpointInfo::from_json(&read.data) {
                    Ok(info) => match self.local_host.check(&info) {
                        Ok(()) => Some(info),
                        Err(err) => {
                            if !seen {
                                warn!(%service, node = %read.name, %err, "skipping endpoint: unix-path frontend of another host");
                            }
                            None
                        }
                    },
                    Err(err) => {
                        if !seen {
                            warn!(%service, node = %read.name, %err, "skipping endpoint with unreadable data");
                        }
                        None
                    }
                };
                let node = Node { czxid: read.stat.czxid, mzxid: read.stat.mzxid, info };
                (read.name, node)
            })
            .collect()
    }
}

/// The endpoints of a service: readable nodes, sorted by node name.
fn endpoints_of(nodes: &BTreeMap<String, Node>) -> Vec<Endpoint> {
    nodes
        .iter()
        .filter_map(|(name, node)| {
            let info = node.info.clone()?;
            Some(Endpoint {
                node: name.clone(),
                info,
            })
        })
        .collect()
}

fn service_watch(service: String, watch_gen: u64, watch: zk::OneshotWatcher) -> ServiceWatch {
    Box::pin(async move { (service, watch_gen, watch.changed().await) })
}

fn services_watch(watch: zk::OneshotWatcher) -> BoxFuture<'static, zk::WatchedEvent> {
    Box::pin(watch.changed())
}

/// Decides what follows a failed call.
async fn after_error(client: &zk::Client, err: &zk::Error, backoff: &mut Backoff) -> Next {
    let state = client.state();
    if session::is_terminal(state)
        || matches!(err, zk::Error::SessionExpired | zk::Error::ClientClosed)
    {
        return Next::NewClient;
    }
    if state == zk::SessionState::Disconnected || *err == zk::Error::ConnectionLoss {
        debug!(%err, "zookeeper call failed on connection loss");
        return Next::WaitState;
    }
    let delay = backoff.next_delay();
    warn!(%err, ?delay, "zookeeper read failed; resyncing");
    tokio::time::sleep(delay).await;
    Next::Resync
}

/// Reads the whole product: creates `.../services` when missing, lists and watches it,
/// then every service (see [`read_services`]).
async fn read_all(client: &zk::Client, product: &str) -> Result<Snapshot, zk::Error> {
    let path = services_path(product);
    let (names, _stat, services_watch) = match client.get_and_watch_children(&path).await {
        Err(zk::Error::NoNode) => {
            let options = zk::CreateMode::Persistent.with_acls(session::DIRECTORY_ACLS);
            // `mkdir` tolerates nodes that exist (another proxy may race us).
            client.mkdir(&path, &options).await?;
            client.get_and_watch_children(&path).await?
        }
        listed => listed?,
    };
    let started = Instant::now();
    let services = read_services(client, product, names).await?;
    debug!(services = services.len(), elapsed = ?started.elapsed(), "read every service");
    Ok(Snapshot {
        services_watch,
        services,
    })
}

/// Lists and watches each service, then gets every endpoint's data: two round trips for all
/// of them. Every list request is sent up front; each service's data requests are sent as
/// soon as its list is back, without waiting for the other lists. Services deleted meanwhile
/// are left out (the services watch reports them), and so are endpoints deleted meanwhile
/// (their service's watch fires).
async fn read_services(
    client: &zk::Client,
    product: &str,
    services: Vec<String>,
) -> Result<Vec<ServiceRead>, zk::Error> {
    // `join_all` collects the iterator first: every list request is sent before any await.
    let reads = join_all(services.into_iter().map(|name| {
        let list = client.list_and_watch_children(&service_path(product, &name));
        async move {
            let (mut names, watch) = match list.await {
                Ok(listed) => listed,
                Err(zk::Error::NoNode) => return Ok(None),
                Err(err) => return Err(err),
            };
            names.sort_unstable();
            let datas = join_all(
                names
                    .iter()
                    .map(|node| client.get_data(&endpoint_path(product, &name, node))),
            )
            .await;
            let mut nodes = Vec::with_capacity(names.len());
            for (node, data) in names.into_iter().zip(datas) {
                match data {
                    Ok((data, stat)) => nodes.push(NodeRead {
                        name: node,
                        data,
                        stat,
                    }),
                    Err(zk::Error::NoNode) => {}
                    Err(err) => return Err(err),
                }
            }
            Ok(Some(ServiceRead { name, watch, nodes }))
        }
    }))
    .await;
    reads.into_iter().filter_map(Result::transpose).collect()
}
