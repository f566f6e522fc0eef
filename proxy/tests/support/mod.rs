//! Harness for the proxy's integration tests, all in one process and without ZooKeeper:
//! [`start_proxy`] runs `rpc_proxy` on a unix socket in a temporary directory, fed by static
//! discovery events; [`FakeUpstream`] is a scriptable Thrift server standing in for an LB;
//! [`Client`] writes raw frames and reads replies, every read under a timeout.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use rpc_frame::{ExceptionCode, Mark, Message, MessageType};
use rpc_registry::{DiscoveryEvent, SessionState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest wait for one frame; a test that waits longer has found silence, a failure.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest frame the client and the fake upstream accept.
const MAX_FRAME: usize = rpc_frame::DEFAULT_MAX_FRAME_SIZE;

// === impl ProxyHandle ===

/// A proxy running in the test's runtime.
pub struct ProxyHandle {
    /// The client socket.
    pub socket: PathBuf,
    /// Static discovery: events go straight to the routing table.
    pub events: mpsc::Sender<DiscoveryEvent>,
    /// Cancelling it starts the graceful stop.
    pub shutdown: CancellationToken,
    /// The proxy's `run_with_discovery` future; finishes once the stop is over.
    pub join: JoinHandle<()>,
    /// Holds the socket's directory.
    _dir: tempfile::TempDir,
}

/// Starts a proxy on `<tmp>/p.sock`; `extra_config` is more `key=value` lines. Nothing is
/// routable (and calls are held) until the test sends endpoints and `Synced`.
pub async fn start_proxy(extra_config: &str) -> ProxyHandle {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("p.sock");
    let text = format!(
        "zk=127.0.0.1:1\nproxy_address={}\n{extra_config}\n",
        socket.display()
    );
    let (config, warnings) = rpc_config::ProxyConfig::parse(&text).expect("proxy config");
    // A misspelt key would silently test the default instead.
    assert!(warnings.is_empty(), "config warnings: {warnings:?}");
    let listener =
        rpc_proxy::listener::Listener::bind(&config.proxy_address, config.common.socket_mode)
            .await
            .expect("bind the proxy socket");
    // One slot: see `ProxyHandle::apply`.
    let (events, rx) = mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let join = tokio::spawn(rpc_proxy::run_with_discovery(
        config,
        listener,
        rx,
        shutdown.clone(),
    ));
    ProxyHandle {
        socket,
        events,
        shutdown,
        join,
        _dir: dir,
    }
}

impl ProxyHandle {
    /// Sends one discovery event and returns once the proxy has applied it.
    pub async fn apply(&self, event: DiscoveryEvent) {
        self.events
            .send(event)
            .await
            .expect("proxy stopped taking events");
        // The queue holds one event and the proxy applies each event as it takes it off the
        // queue. The first filler is queued once `event` has been taken, the second once the
        // first filler has been taken, which is after `event` was applied.
        for _ in 0..2 {
            let filler = DiscoveryEvent::Session(SessionState::Connected);
            self.events
                .send(filler)
                .await
                .expect("proxy stopped taking events");
        }
    }

    /// Replaces the endpoints of `service` (an empty list: the service exists with none).
    pub async fn set_endpoints(&self, service: &str, frontends: &[String]) {
        let plain: Vec<_> = frontends.iter().map(|f| (f.clone(), false)).collect();
        self.set_marked_endpoints(service, &plain).await;
    }

    /// Replaces the endpoints of `service`, each `(frontend, announces marks)`: a marking
    /// endpoint's node carries `"marks": 1`, as an rpc_lb's does.
    pub async fn set_marked_endpoints(&self, service: &str, frontends: &[(String, bool)]) {
        let endpoints = frontends
            .iter()
            .map(|(frontend, marks)| rpc_registry::Endpoint {
                node: rpc_registry::service_id(frontend),
                info: rpc_registry::EndpointInfo {
                    service: service.to_owned(),
                    frontend: frontend.clone(),
                    marks: u32::from(*marks),
                    ..Default::default()
                },
            })
            .collect();
        self.apply(DiscoveryEvent::Endpoints {
            service: service.to_owned(),
            endpoints,
        })
        .await;
    }

    /// Marks the routing table complete.
    pub async fn synced(&self) {
        self.apply(DiscoveryEvent::Synced).await;
    }

    /// `set_endpoints` then `synced`.
    pub async fn route(&self, service: &str, frontends: &[String]) {
        self.set_endpoints(service, frontends).await;
        self.synced().await;
    }

    /// A new client connection.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// === impl FakeUpstream ===

/// What the fake upstream does with one call.
#[derive(Debug, Clone)]
pub enum Action {
    /// Echo a REPLY with the call's name, seqid and body, at once.
    Reply,
    /// The same, after a delay (other calls are served meanwhile).
    ReplyAfter(Duration),
    /// A REPLY with the call's seqid and body but this name.
    ReplyAs(&'static str),
    /// Never answer.
    Ignore,
    /// Close the connection (the call stays unanswered).
    Close,
    /// Hold the call; once this many calls are held (over all connections), answer them all
    /// in the reverse order of their arrival.
    HoldThenReverse(usize),
    /// Answer with a code-6 `TApplicationException` carrying this field 3 (an LB's refusal
    /// or failure; `None`: a handler's error).
    Raise(Option<Mark>),
}

/// How the fake upstream treats the proxy's heartbeat pings (type 20).
#[derive(Debug, Clone, Copy)]
pub enum Pings {
    /// Echo them unchanged, as LBs and workers do.
    Echo,
    /// Never answer them.
    Ignore,
    /// Answer with an UNKNOWN_METHOD `TApplicationException`, as a plain Thrift server does.
    UnknownMethod,
}

/// One call as the fake upstream received it.
#[derive(Debug, Clone)]
pub struct Call {
    /// Which accepted connection it came on (0-based).
    pub conn: usize,
    /// The message type.
    pub message_type: MessageType,
    /// The name as received.
    pub name: String,
    /// The seqid as received.
    pub seqid: i32,
    /// The body as received.
    pub body: Vec<u8>,
}

type Script = dyn Fn(&Call) -> Action + Send + Sync;

/// Frames for one connection's writer.
enum Out {
    Frame(BytesMut),
    Close,
}

/// What the fake has seen, shared with its tasks.
#[derive(Default)]
struct Record {
    accepts: usize,
    eofs: usize,
    pings: usize,
    calls: Vec<Call>,
    held: Vec<(mpsc::UnboundedSender<Out>, Call)>,
    /// Frames from the proxy that were not well-formed messages.
    garbage: Vec<String>,
}

struct Shared {
    record: Mutex<Record>,
    script: Box<Script>,
    pings: Pings,
}

impl Shared {
    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A Thrift server on a unix socket standing in for an LB; the test scripts its replies.
pub struct FakeUpstream {
    path: PathBuf,
    shared: Arc<Shared>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl FakeUpstream {
    /// An upstream that answers every call at once and echoes pings.
    pub async fn echo() -> FakeUpstream {
        Self::start(|_| Action::Reply).await
    }

    /// An upstream whose calls are handled by `script`; pings are echoed.
    pub async fn start(script: impl Fn(&Call) -> Action + Send + Sync + 'static) -> FakeUpstream {
        Self::start_with(Pings::Echo, script).await
    }

    /// An upstream with the given ping behaviour, its calls handled by `script`.
    pub async fn start_with(
        pings: Pings,
        script: impl Fn(&Call) -> Action + Send + Sync + 'static,
    ) -> FakeUpstream {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("up.sock");
        let listener = UnixListener::bind(&path).expect("bind the fake upstream");
        let shared = Arc::new(Shared {
            record: Mutex::default(),
            script: Box::new(script),
            pings,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        FakeUpstream {
            path,
            shared,
            stop,
            _dir: dir,
        }
    }

    /// The address to put in an endpoint's `frontend`.
    pub fn frontend(&self) -> String {
        self.path.display().to_string()
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.shared.record().accepts
    }

    /// Connections the proxy closed (EOF seen by the fake).
    pub fn eofs(&self) -> usize {
        self.shared.record().eofs
    }

    /// Heartbeat pings received.
    pub fn pings(&self) -> usize {
        self.shared.record().pings
    }

    /// Every call received, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.record().calls.clone()
    }

    /// How many calls were received.
    pub fn call_count(&self) -> usize {
        self.shared.record().calls.len()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
        let garbage = std::mem::take(&mut self.shared.record().garbage);
        if !std::thread::panicking() {
            assert!(
                garbage.is_empty(),
                "the proxy sent malformed frames upstream: {garbage:?}"
            );
        }
    }
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => return,
            },
        };
        let conn = {
            let mut record = shared.record();
            record.accepts += 1;
            record.accepts - 1
        };
        tokio::spawn(serve_upstream(stream, conn, shared.clone(), stop.clone()));
    }
}

/// Serves one connection from the proxy until EOF, a scripted close, or the fake stops.
async fn serve_upstream(
    stream: UnixStream,
    conn: usize,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    // Replies go through one writer task so delayed and reordered replies can be sent from
    // anywhere; `Out::Close` drops the write half.
    tokio::spawn(async move {
        while let Some(Out::Frame(frame)) = rx.recv().await {
            if writer.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut buf = BytesMut::new();
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => break,
            read = reader.read_buf(&mut buf) => read,
        };
        if matches!(read, Ok(0) | Err(_)) {
            shared.record().eofs += 1;
            break;
        }
        if !take_frames(&mut buf, conn, &shared, &tx) {
            break;
        }
    }
    let _ = tx.send(Out::Close);
}

/// Handles every whole frame in `buf`; false once the script closed the connection.
fn take_frames(
    buf: &mut BytesMut,
    conn: usize,
    shared: &Shared,
    tx: &mpsc::UnboundedSender<Out>,
) -> bool {
    loop {
        let frame = match rpc_frame::decode_frame(buf, MAX_FRAME) {
            Ok(Some(frame)) => frame,
            Ok(None) => return true,
            Err(e) => {
                shared.record().garbage.push(format!("bad frame: {e}"));
                return false;
            }
        };
        let message = match Message::parse(frame) {
            Ok(message) => message,
            Err((_, e)) => {
                shared.record().garbage.push(format!("bad header: {e}"));
                continue;
            }
        };
        if message.message_type() == MessageType::Heartbeat {
            shared.record().pings += 1;
            let answer = match shared.pings {
                Pings::Echo => Some(message.into_wire()),
                Pings::Ignore => None,
                Pings::UnknownMethod => Some(rpc_frame::application_exception(
                    message.name(),
                    message.seqid(),
                    ExceptionCode::UnknownMethod,
                    &format!("Invalid method name: '{}'", message.name()),
                )),
            };
            if let Some(frame) = answer {
                let _ = tx.send(Out::Frame(frame));
            }
            continue;
        }
        let call = Call {
            conn,
            message_type: message.message_type(),
            name: message.name().to_owned(),
            seqid: message.seqid(),
            body: message.body().to_vec(),
        };
        shared.record().calls.push(call.clone());
        match (shared.script)(&call) {
            Action::Reply => {
                let _ = tx.send(Out::Frame(reply_to(&call, &call.name)));
            }
            Action::ReplyAfter(delay) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(Out::Frame(reply_to(&call, &call.name)));
                });
            }
            Action::ReplyAs(name) => {
                let _ = tx.send(Out::Frame(reply_to(&call, name)));
            }
            Action::Raise(mark) => {
                let _ = tx.send(Out::Frame(rpc_frame::marked_application_exception(
                    &call.name,
                    call.seqid,
                    ExceptionCode::InternalError,
                    "raised by the fake upstream",
                    mark,
                )));
            }
            Action::Ignore => {}
            Action::Close => return false,
            Action::HoldThenReverse(count) => {
                let mut record = shared.record();
                record.held.push((tx.clone(), call));
                if record.held.len() >= count {
                    for (tx, call) in record.held.drain(..).rev() {
                        let _ = tx.send(Out::Frame(reply_to(&call, &call.name)));
                    }
                }
            }
        }
    }
}

/// A REPLY to `call` named `name`, with the call's seqid and body.
fn reply_to(call: &Call, name: &str) -> BytesMut {
    rpc_frame::encode_message(MessageType::Reply, name, call.seqid, &call.body)
}

// === impl Client ===

/// A raw framed client of the proxy.
pub struct Client {
    stream: UnixStream,
    buf: BytesMut,
}

impl Client {
    /// Connects to the proxy socket at `path`.
    pub async fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path)
            .await
            .expect("connect to the proxy");
        Client {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Writes bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .expect("write to the proxy");
    }

    /// Writes one message.
    pub async fn send(&mut self, message_type: MessageType, name: &str, seqid: i32, body: &[u8]) {
        self.send_raw(&rpc_frame::encode_message(message_type, name, seqid, body))
            .await;
    }

    /// Writes one CALL.
    pub async fn send_call(&mut self, name: &str, seqid: i32, body: &[u8]) {
        self.send(MessageType::Call, name, seqid, body).await;
    }

    /// The next message (`Some(None)` at EOF), or `None` if nothing came within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<Option<Message>> {
        let read = async {
            loop {
                match rpc_frame::decode_frame(&mut self.buf, MAX_FRAME) {
                    Ok(Some(frame)) => {
                        return Some(Message::parse(frame).expect("the proxy sent a bad header"));
                    }
                    Ok(None) => {}
                    Err(e) => panic!("the proxy sent a bad frame: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => {
                        assert!(self.buf.is_empty(), "EOF inside a frame");
                        return None;
                    }
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(limit, read).await.ok()
    }

    /// The next message, or `None` at EOF.
    ///
    /// # Panics
    /// When nothing arrives within [`RECV_TIMEOUT`].
    pub async fn recv(&mut self) -> Option<Message> {
        self.recv_within(RECV_TIMEOUT)
            .await
            .expect("no frame from the proxy within RECV_TIMEOUT")
    }

    /// The next message.
    ///
    /// # Panics
    /// At EOF, or when nothing arrives within [`RECV_TIMEOUT`].
    pub async fn reply(&mut self) -> Message {
        self.recv().await.expect("the proxy closed the connection")
    }

    /// One CALL and its answer.
    pub async fn call(&mut self, name: &str, seqid: i32, body: &[u8]) -> Message {
        self.send_call(name, seqid, body).await;
        self.reply().await
    }
}

// === assertions ===

/// Asserts `message` is the REPLY of a `service:method` call: bare name `method`, the
/// client's `seqid`, the body untouched.
#[track_caller]
pub fn assert_reply(message: &Message, seqid: i32, body: &[u8]) {
    assert_eq!(
        message.message_type(),
        MessageType::Reply,
        "not a reply: {}",
        describe(message)
    );
    assert_eq!(message.name(), "method", "{}", describe(message));
    assert_eq!(message.seqid(), seqid, "{}", describe(message));
    assert_eq!(message.body(), body, "{}", describe(message));
}

/// Asserts `message` is a `TApplicationException` carrying `seqid`; returns its code and text.
#[track_caller]
pub fn exception(message: &Message, seqid: i32) -> (i32, String) {
    assert_eq!(
        message.message_type(),
        MessageType::Exception,
        "not an exception: {}",
        describe(message)
    );
    assert_eq!(message.seqid(), seqid, "{}", describe(message));
    rpc_frame::parse_application_exception(message.body())
        .unwrap_or_else(|| panic!("not a TApplicationException body: {}", describe(message)))
}

/// Whether `message` is a REPLY (for retry loops).
pub fn is_reply(message: &Message) -> bool {
    message.message_type() == MessageType::Reply
}

/// A message for assertion failures, with the exception text when it is one.
pub fn describe(message: &Message) -> String {
    let exception = rpc_frame::parse_application_exception(message.body())
        .filter(|_| message.message_type() == MessageType::Exception);
    format!(
        "({:?}, {:?}, seqid {}, body {:?}, exception {exception:?})",
        message.name(),
        message.message_type(),
        message.seqid(),
        String::from_utf8_lossy(message.body()),
    )
}

/// The `TApplicationException` code as sent on the wire.
pub fn code(code: ExceptionCode) -> i32 {
    code as i32
}
