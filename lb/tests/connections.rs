//! Integration tests of the LB's connections without ZooKeeper: the front ([`front::serve`])
//! and back ([`workers::serve`]) tasks run in-process on unix socket pairs around one
//! [`Dispatcher`]; the tests play the proxy, scripted fake workers and abusive peers with
//! raw frames. Covers: a back connection takes calls only once it proved to be a worker
//! (HELLO or ping echo), frame-completion and idle deadlines on the front, and code-7 replies
//! to bad headers carrying the caller's seqid, what traces a call to its worker (pids
//! from HELLO, the per-call debug line), and field 3 on the wire: the LB's own refusals and
//! failures marked, protocol errors and a handler's exceptions not.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rpc_frame::{ExceptionCode, Hello, Mark, Message, MessageType};
use rpc_lb::dispatch::Dispatcher;
use rpc_lb::front::{self, Activity, FrontSettings};
use rpc_lb::metrics::LbMetrics;
use rpc_lb::workers::{self, WorkerEvent, WorkerSettings, WorkerTimeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest wait for a frame that must come; longer is silence, a failure.
const RECV: Duration = Duration::from_secs(5);

/// Margin on top of a deadline for the LB to act on it (a noisy 2-core box).
const MARGIN: Duration = Duration::from_secs(3);

const MAX_FRAME: usize = rpc_frame::DEFAULT_MAX_FRAME_SIZE;

// === the LB under test ===

/// Timings of one test's LB.
#[derive(Clone, Copy)]
struct Timings {
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    frame_timeout: Duration,
    idle_timeout: Option<Duration>,
    write_timeout: Duration,
    max_buffer_bytes: usize,
    request_timeout: Duration,
    worker_timeout: Option<Duration>,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_secs(2),
            frame_timeout: front::FRAME_TIMEOUT,
            idle_timeout: None,
            write_timeout: Duration::from_secs(30),
            max_buffer_bytes: 32 << 20,
            request_timeout: Duration::from_secs(10),
            worker_timeout: None,
        }
    }
}

/// A dispatcher with its front and back settings; connections are made with [`Lb::front`]
/// and [`Lb::back`].
struct Lb {
    dispatcher: Arc<Dispatcher>,
    front: Arc<FrontSettings>,
    back: Arc<WorkerSettings>,
    activity: Arc<Activity>,
    events: mpsc::UnboundedSender<WorkerEvent>,
    close: CancellationToken,
    _events: mpsc::UnboundedReceiver<WorkerEvent>,
}

impl Lb {
    fn new(timings: Timings) -> Lb {
        let metrics = Arc::new(LbMetrics::new("echo"));
        let (events, events_rx) = mpsc::unbounded_channel();
        Lb {
            dispatcher: Arc::new(Dispatcher::new(1024)),
            front: Arc::new(FrontSettings {
                service: "echo".into(),
                max_frame_size: MAX_FRAME,
                request_timeout: timings.request_timeout,
                frame_timeout: timings.frame_timeout,
                idle_timeout: timings.idle_timeout,
                write_timeout: timings.write_timeout,
                max_buffer_bytes: timings.max_buffer_bytes,
                process_budget: rpc_mux::ProcessBudget::new(1 << 30),
                metrics: metrics.clone(),
            }),
            back: Arc::new(WorkerSettings {
                service: "echo".into(),
                default_capacity: 1,
                max_capacity: 64,
                heartbeat_interval: timings.heartbeat_interval,
                heartbeat_timeout: timings.heartbeat_timeout,
                write_timeout: timings.write_timeout,
                max_frame_size: MAX_FRAME,
                metrics,
                worker_timeout: Arc::new(WorkerTimeout::new(timings.worker_timeout)),
                hung: Arc::default(),
            }),
            activity: Arc::new(Activity::default()),
            events,
            close: CancellationToken::new(),
            _events: events_rx,
        }
    }

    /// A new proxy-side connection to the front.
    fn front(&self) -> Peer {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let (r, w) = ours.into_split();
        tokio::spawn(front::serve(
            r,
            w,
            self.dispatcher.clone(),
            self.front.clone(),
            self.activity.clone(),
            self.close.clone(),
        ));
        Peer::new(theirs)
    }

    /// A new connection to the back socket (not a worker until it proves it is one).
    fn back(&self) -> Peer {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let (dispatcher, settings, events) = (
            self.dispatcher.clone(),
            self.back.clone(),
            self.events.clone(),
        );
        tokio::spawn(async move {
            let (r, w) = ours.into_split();
            workers::serve(r, w, dispatcher, settings, events).await;
        });
        Peer::new(theirs)
    }

    /// A well-behaved worker: HELLO with `pool_size` (pid [`WORKER_PID`]), echoes pings,
    /// answers every call with its body (`slow` after 2 s; `raise` with the handler's
    /// exception, [`RAISED`]). Returns the count of calls it answered.
    async fn worker(&self, pool_size: i32) -> Arc<AtomicUsize> {
        let before = self.dispatcher.active_workers();
        let peer = self.back();
        let served = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run_worker(peer, pool_size, served.clone()));
        let dispatcher = self.dispatcher.clone();
        wait_until(RECV, "the worker joins", || {
            dispatcher.active_workers() > before
        })
        .await;
        served
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.close.cancel();
    }
}

/// The pid in the HELLO of [`Lb::worker`]'s workers.
const WORKER_PID: i32 = 4242;

/// The message of the code-6 exception the handler of `raise` raises.
const RAISED: &str = "raised by the handler";

async fn run_worker(peer: Peer, pool_size: i32, served: Arc<AtomicUsize>) {
    let (mut reader, mut writer) = peer.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<BytesMut>();
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if writer.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let hello = Hello {
        pool_size,
        pid: WORKER_PID,
        service: "echo".into(),
    };
    let _ = tx.send(hello.encode());
    while let Some(message) = reader.next(Duration::from_secs(3600)).await.frame() {
        match message.message_type() {
            MessageType::Heartbeat => {
                let _ = tx.send(message.into_wire());
            }
            MessageType::Call => {
                let reply = if message.name() == "raise" {
                    rpc_frame::application_exception(
                        message.name(),
                        message.seqid(),
                        ExceptionCode::InternalError,
                        RAISED,
                    )
                } else {
                    rpc_frame::encode_message(
                        MessageType::Reply,
                        message.name(),
                        message.seqid(),
                        message.body(),
                    )
                };
                let delay = if message.name() == "slow" {
                    Duration::from_secs(2)
                } else {
                    Duration::ZERO
                };
                let (tx, served) = (tx.clone(), served.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await; // the handler's run time
                    served.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(reply);
                });
            }
            _ => {}
        }
    }
}

// === a raw framed peer ===

/// What a read brought.
#[derive(Debug)]
enum Got {
    Frame(Message),
    Eof,
    Silence,
}

impl Got {
    fn frame(self) -> Option<Message> {
        match self {
            Got::Frame(m) => Some(m),
            _ => None,
        }
    }
}

/// Reads frames from the LB.
struct Reader {
    half: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// The next frame, EOF, or silence after `limit`.
    async fn next(&mut self, limit: Duration) -> Got {
        let read = async {
            loop {
                match rpc_frame::decode_frame(&mut self.buf, MAX_FRAME) {
                    Ok(Some(frame)) => {
                        return Got::Frame(
                            Message::parse(frame).expect("the LB sent a bad header"),
                        );
                    }
                    Ok(None) => {}
                    Err(e) => panic!("the LB sent a bad frame: {e}"),
                }
                match self.half.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Got::Eof,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(limit, read)
            .await
            .unwrap_or(Got::Silence)
    }

    /// Reads until EOF, within `limit`; returns the frames seen, or `None` if the connection
    /// is still open then.
    async fn until_eof(&mut self, limit: Duration) -> Option<Vec<Message>> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Got::Frame(m) => seen.push(m),
                Got::Eof => return Some(seen),
                Got::Silence => return None,
            }
        }
    }
}

/// A raw connection to the LB.
struct Peer {
    reader: Reader,
    writer: OwnedWriteHalf,
}

impl Peer {
    fn new(stream: UnixStream) -> Peer {
        let (half, writer) = stream.into_split();
        Peer {
            reader: Reader {
                half,
                buf: BytesMut::new(),
            },
            writer,
        }
    }

    fn split(self) -> (Reader, OwnedWriteHalf) {
        (self.reader, self.writer)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write to the LB");
    }

    async fn send_call(&mut self, name: &str, seqid: i32, body: &[u8]) {
        self.send(&rpc_frame::encode_message(
            MessageType::Call,
            name,
            seqid,
            body,
        ))
        .await;
    }

    /// The next frame; panics at EOF or after [`RECV`] of silence.
    async fn recv(&mut self) -> Message {
        match self.reader.next(RECV).await {
            Got::Frame(m) => m,
            other => panic!("expected a frame from the LB, got {other:?}"),
        }
    }

    /// One call and its answer.
    async fn call(&mut self, name: &str, seqid: i32, body: &[u8]) -> Message {
        self.send_call(name, seqid, body).await;
        self.recv().await
    }
}

// === helpers ===

/// Polls `cond` every 10 ms until it holds; panics after `limit`.
async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn describe(m: &Message) -> String {
    let exception = rpc_frame::parse_application_exception(m.body())
        .filter(|_| m.message_type() == MessageType::Exception);
    format!(
        "({:?}, {:?}, seqid {}, exception {exception:?})",
        m.name(),
        m.message_type(),
        m.seqid()
    )
}

#[track_caller]
fn assert_reply(m: &Message, seqid: i32, body: &[u8]) {
    assert_eq!(m.message_type(), MessageType::Reply, "{}", describe(m));
    assert_eq!(m.seqid(), seqid, "{}", describe(m));
    assert_eq!(m.body(), body, "{}", describe(m));
}

/// `count` calls in one write; asserts every one is answered with its REPLY.
async fn calls_all_answered(front: &mut Peer, first_seqid: i32, count: i32) {
    let mut burst = BytesMut::new();
    for seqid in first_seqid..first_seqid + count {
        burst.extend_from_slice(&rpc_frame::encode_message(
            MessageType::Call,
            "echo:echo",
            seqid,
            format!("body-{seqid}").as_bytes(),
        ));
    }
    front.send(&burst).await;
    let mut seen = Vec::new();
    for _ in 0..count {
        let m = front.recv().await;
        assert_reply(&m, m.seqid(), format!("body-{}", m.seqid()).as_bytes());
        seen.push(m.seqid());
    }
    seen.sort_unstable();
    assert_eq!(seen, (first_seqid..first_seqid + count).collect::<Vec<_>>());
}

fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}

// === the back socket: a connection is a worker only once it proves it ===

#[tokio::test]
async fn new_back_connection_is_pinged_at_once_and_takes_calls_only_after_its_echo() {
    // Pings every 10 s: only a ping sent on accept arrives within the bound below.
    let lb = Lb::new(Timings {
        heartbeat_interval: Duration::from_secs(10),
        heartbeat_timeout: Duration::from_secs(30),
        ..Timings::default()
    });
    let mut peer = lb.back();
    let ping = match peer.reader.next(Duration::from_secs(3)).await {
        Got::Frame(m) => m,
        other => panic!("no ping on accept: {other:?}"),
    };
    assert_eq!(
        ping.message_type(),
        MessageType::Heartbeat,
        "{}",
        describe(&ping)
    );
    // Accepted and pinged, but nothing proved yet: not a worker.
    assert_eq!(
        lb.dispatcher.active_workers(),
        0,
        "{:?}",
        lb.dispatcher.loads()
    );
    let mut front = lb.front();
    let refused = front.call("echo:echo", 1, b"x").await;
    assert_eq!(refused.message_type(), MessageType::Exception);
    let (code, text) = rpc_frame::parse_application_exception(refused.body()).unwrap();
    assert_eq!(code, ExceptionCode::InternalError as i32, "{text}");
    assert!(text.starts_with("Worker FOR echo.echo Not Found"), "{text}");
    assert_eq!(
        rpc_frame::exception_mark(refused.body()),
        Some(Mark::Refused),
        "{text}"
    );

    // An old worker: no HELLO, it only echoes.
    peer.send(ping.as_wire()).await;
    let dispatcher = lb.dispatcher.clone();
    wait_until(RECV, "the echo makes it a worker", || {
        dispatcher.active_workers() == 1
    })
    .await;
    assert_eq!(lb.dispatcher.loads()[0].capacity, 1, "worker_pool_size");
    front.send_call("echo:echo", 2, b"now").await;
    let call = peer.recv().await;
    assert_eq!(
        (call.message_type(), call.name(), call.body()),
        (MessageType::Call, "echo", &b"now"[..])
    );
    peer.send(&rpc_frame::encode_message(
        MessageType::Reply,
        "echo",
        call.seqid(),
        b"now",
    ))
    .await;
    assert_reply(&front.recv().await, 2, b"now");
}

#[tokio::test]
async fn hello_makes_a_worker_with_its_capacity() {
    let lb = Lb::new(Timings::default());
    let mut peer = lb.back();
    let hello = Hello {
        pool_size: 3,
        pid: 7,
        service: "echo".into(),
    };
    peer.send(&hello.encode()).await;
    let dispatcher = lb.dispatcher.clone();
    wait_until(RECV, "HELLO makes it a worker", || {
        dispatcher
            .loads()
            .iter()
            .any(|w| w.active && w.capacity == 3)
    })
    .await;
}

#[tokio::test]
async fn silent_back_connection_gets_no_call_and_is_closed_within_the_heartbeat_timeout() {
    let lb = Lb::new(Timings::default()); // heartbeat timeout 2 s
    let served = lb.worker(2).await;
    let connected = Instant::now();
    let mut silent = lb.back();
    // Its first ping shows it was accepted before the calls are sent.
    let first = silent.recv().await;
    assert_eq!(first.message_type(), MessageType::Heartbeat);

    let mut front = lb.front();
    calls_all_answered(&mut front, 1, 20).await;
    assert_eq!(
        served.load(Ordering::SeqCst),
        20,
        "the real worker ran them all"
    );

    let frames = silent
        .reader
        .until_eof(lb.back.heartbeat_timeout + MARGIN)
        .await
        .expect("the silent connection is still open after the heartbeat timeout");
    let closed_after = connected.elapsed();
    for m in &frames {
        assert_eq!(
            m.message_type(),
            MessageType::Heartbeat,
            "only pings for a connection that never proved itself: {}",
            describe(m)
        );
    }
    assert!(
        closed_after >= lb.back.heartbeat_timeout - Duration::from_millis(300),
        "closed after {closed_after:?}, before the heartbeat timeout"
    );
    assert_eq!(lb.dispatcher.active_workers(), 1);
}

#[tokio::test]
async fn garbage_on_the_back_socket_before_joining_closes_it_and_costs_no_call() {
    let lb = Lb::new(Timings::default());
    lb.worker(4).await;
    let mut front = lb.front();
    let mut non_strict = 4i32.to_be_bytes().to_vec();
    non_strict.extend_from_slice(b"echo");
    non_strict.push(2);
    non_strict.extend_from_slice(&1i32.to_be_bytes());
    non_strict.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("http request", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("negative length", (-1i32).to_be_bytes().to_vec()),
        ("non-strict header", raw_frame(&non_strict)),
        (
            "a reply for no call",
            rpc_frame::encode_message(MessageType::Reply, "echo", 7, b"\0").to_vec(),
        ),
        (
            "a call sent to the LB",
            rpc_frame::encode_message(MessageType::Call, "echo", 1, b"\0").to_vec(),
        ),
        ("stop_confirm", rpc_frame::stop_confirm().to_vec()),
    ];
    for (k, (what, garbage)) in cases.into_iter().enumerate() {
        let mut fake = lb.back();
        let ping = fake.recv().await;
        assert_eq!(ping.message_type(), MessageType::Heartbeat, "{what}");
        // Connected (and pinged): calls made now must all go to the real worker.
        calls_all_answered(&mut front, 100 * (k as i32 + 1), 8).await;
        fake.send(&garbage).await;
        let frames = fake
            .reader
            .until_eof(MARGIN)
            .await
            .unwrap_or_else(|| panic!("{what}: the fake is still connected"));
        assert!(
            frames
                .iter()
                .all(|m| m.message_type() == MessageType::Heartbeat),
            "{what}: a fake got more than pings"
        );
        assert_eq!(lb.dispatcher.active_workers(), 1, "{what}");
        assert_eq!(lb.dispatcher.outstanding(), 0, "{what}");
    }
}

#[tokio::test]
async fn stop_before_joining_is_confirmed_and_the_connection_never_joins() {
    let lb = Lb::new(Timings::default());
    let mut peer = lb.back();
    assert_eq!(peer.recv().await.message_type(), MessageType::Heartbeat);
    peer.send(&rpc_frame::stop()).await;
    let confirm = loop {
        let m = peer.recv().await;
        if m.message_type() != MessageType::Heartbeat {
            break m;
        }
    };
    assert_eq!(confirm.message_type(), MessageType::StopConfirm);
    // Even its echo does not make it a worker now.
    peer.send(&rpc_frame::heartbeat(0)).await;
    peer.send(&rpc_frame::heartbeat(0)).await;
    let mut front = lb.front();
    let refused = front.call("echo:echo", 3, b"x").await;
    assert_eq!(
        refused.message_type(),
        MessageType::Exception,
        "{}",
        describe(&refused)
    );
    assert_eq!(lb.dispatcher.active_workers(), 0);
}

// === the front: frame-completion and idle deadlines ===

#[tokio::test]
async fn front_peer_dripping_a_frame_is_closed_after_the_frame_timeout_others_are_served() {
    let frame_timeout = Duration::from_secs(1);
    let lb = Lb::new(Timings {
        frame_timeout,
        ..Timings::default()
    });
    lb.worker(2).await;
    let mut bystander = lb.front();
    assert_reply(
        &bystander.call("echo:echo", 1, b"before").await,
        1,
        b"before",
    );

    let (mut reader, mut writer) = lb.front().split();
    let frame = rpc_frame::encode_message(MessageType::Call, "echo:echo", 9, &[0u8; 80]);
    let started = Instant::now();
    let drip = tokio::spawn(async move {
        for byte in frame.iter() {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(150)).await; // the drip's pace
        }
    });
    let frames = reader
        .until_eof(frame_timeout + MARGIN)
        .await
        .expect("a peer dripping one byte per 150 ms is still connected");
    let closed_after = started.elapsed();
    drip.abort();
    assert!(frames.is_empty(), "nothing is owed to the dripping peer");
    assert!(
        closed_after >= frame_timeout - Duration::from_millis(100),
        "closed after {closed_after:?}, before the frame timeout"
    );
    assert_reply(&bystander.call("echo:echo", 2, b"after").await, 2, b"after");
}

#[tokio::test]
async fn large_frames_arriving_steadily_within_the_frame_timeout_are_served() {
    // Each frame takes ~1.2 s of a 2 s bound; the two together take longer than the bound.
    let frame_timeout = Duration::from_secs(2);
    let lb = Lb::new(Timings {
        frame_timeout,
        ..Timings::default()
    });
    lb.worker(2).await;
    let mut peer = lb.front();
    let started = Instant::now();
    for seqid in [1, 2] {
        let body = vec![seqid as u8; 256 * 1024];
        let frame = rpc_frame::encode_message(MessageType::Call, "echo:echo", seqid, &body);
        for chunk in frame.chunks(frame.len() / 8 + 1) {
            peer.send(chunk).await;
            tokio::time::sleep(Duration::from_millis(150)).await; // the sender's pace
        }
        assert_reply(&peer.recv().await, seqid, &body);
    }
    assert!(
        started.elapsed() > frame_timeout,
        "the test must span more than one frame timeout"
    );
}

#[tokio::test]
async fn front_idle_timeout_spares_pinging_and_busy_connections() {
    let idle_timeout = Duration::from_secs(1);
    let lb = Lb::new(Timings {
        idle_timeout: Some(idle_timeout),
        ..Timings::default()
    });
    lb.worker(2).await;
    let started = Instant::now();
    let (mut idle, _idle_writer) = lb.front().split();
    let mut busy = lb.front();
    busy.send_call("echo:slow", 5, b"slow").await; // answered after 2 s
    let mut pinger = lb.front();

    // A proxy pings its idle connections: those pings keep it open past the timeout.
    let pinging = tokio::spawn(async move {
        for seqid in 0..12 {
            let ping = rpc_frame::heartbeat(seqid);
            pinger.send(&ping).await;
            let echo = pinger.recv().await;
            assert_eq!(echo.as_wire(), &ping[..], "pings are echoed unchanged");
            tokio::time::sleep(Duration::from_millis(250)).await; // the ping pace
        }
        pinger
    });

    let frames = idle
        .until_eof(idle_timeout + MARGIN)
        .await
        .expect("an idle front connection is still open after the idle timeout");
    assert!(frames.is_empty());
    let idle_closed = started.elapsed();
    assert!(
        idle_closed >= idle_timeout - Duration::from_millis(100),
        "closed after {idle_closed:?}"
    );

    // The call in flight outlives the idle timeout and is answered.
    assert_reply(&busy.recv().await, 5, b"slow");
    let answered = Instant::now();
    // Then that connection is idle too.
    busy.reader
        .until_eof(idle_timeout + MARGIN)
        .await
        .expect("the connection stays open long after its call was answered");
    assert!(answered.elapsed() >= idle_timeout - Duration::from_millis(100));

    let mut pinger = pinging.await.expect("the pinging connection was served");
    assert!(
        started.elapsed() > idle_timeout * 2,
        "pings spanned the idle timeout"
    );
    assert_reply(&pinger.call("echo:echo", 6, b"still").await, 6, b"still");
}

// === the front: code 7 with the caller's seqid ===

#[tokio::test]
async fn code_7_reply_to_a_bad_header_carries_the_callers_seqid() {
    let lb = Lb::new(Timings::default());
    lb.worker(1).await;
    let mut peer = lb.front();

    let mut non_strict = 9i32.to_be_bytes().to_vec();
    non_strict.extend_from_slice(b"echo:echo");
    non_strict.push(1);
    non_strict.extend_from_slice(&5i32.to_be_bytes());
    non_strict.push(0);
    let strict = |version: u32, name: &[u8], seqid: Option<i32>| {
        let mut payload = version.to_be_bytes().to_vec();
        payload.extend_from_slice(&(name.len() as i32).to_be_bytes());
        payload.extend_from_slice(name);
        if let Some(seqid) = seqid {
            payload.extend_from_slice(&seqid.to_be_bytes());
            payload.push(0);
        }
        raw_frame(&payload)
    };
    let cases = [
        ("non-strict header", raw_frame(&non_strict), 5),
        (
            "invalid UTF-8 in the name",
            strict(rpc_frame::VERSION_1 | 1, b"echo:\xff\xfe", Some(31)),
            31,
        ),
        (
            "bad version word",
            strict(0x8002_0001, b"e:ex", Some(32)),
            32,
        ),
        (
            "no seqid to be read",
            strict(rpc_frame::VERSION_1 | 1, b"echo:echo", None),
            0,
        ),
    ];
    for (what, frame, seqid) in cases {
        peer.send(&frame).await;
        let reply = peer.recv().await;
        assert_eq!(
            reply.message_type(),
            MessageType::Exception,
            "{what}: {}",
            describe(&reply)
        );
        assert_eq!(reply.seqid(), seqid, "{what}: {}", describe(&reply));
        let (code, text) = rpc_frame::parse_application_exception(reply.body()).unwrap();
        assert_eq!(code, ExceptionCode::ProtocolError as i32, "{what}: {text}");
        assert_eq!(
            rpc_frame::exception_mark(reply.body()),
            None,
            "{what}: a protocol error is not marked"
        );
    }
    // The connection goes on serving.
    assert_reply(&peer.call("echo:echo", 40, b"ok").await, 40, b"ok");
}

// === field 3: the LB's own refusals and failures, marked ===

/// The code, message and mark of an exception from the LB; panics on anything else.
#[track_caller]
fn exception(m: &Message) -> (i32, String, Option<Mark>) {
    assert_eq!(m.message_type(), MessageType::Exception, "{}", describe(m));
    let (code, text) = rpc_frame::parse_application_exception(m.body())
        .unwrap_or_else(|| panic!("not a TApplicationException: {}", describe(m)));
    (code, text, rpc_frame::exception_mark(m.body()))
}

/// Asserts `m` is a code-6 exception for `seqid` carrying `mark`, its text containing `needle`.
#[track_caller]
fn assert_marked(m: &Message, seqid: i32, mark: Option<Mark>, needle: &str) {
    let (code, text, got) = exception(m);
    assert_eq!(
        (m.seqid(), code, got),
        (seqid, ExceptionCode::InternalError as i32, mark),
        "{text}"
    );
    assert!(text.contains(needle), "{text}");
}

#[tokio::test]
async fn the_lbs_refusals_and_failures_are_marked_on_the_wire_a_handlers_exception_is_not() {
    const CODE_6: i32 = ExceptionCode::InternalError as i32;
    let mut lb = Lb::new(Timings {
        request_timeout: Duration::from_millis(500),
        ..Timings::default()
    });
    // No queue: a call finding its only worker busy is refused at once.
    lb.dispatcher = Arc::new(Dispatcher::new(0));
    let dispatcher = lb.dispatcher.clone();
    let mut front = lb.front();

    // No worker: refused.
    let (code, text, mark) = exception(&front.call("echo:echo", 1, b"x").await);
    assert_eq!((code, mark), (CODE_6, Some(Mark::Refused)), "{text}");

    // A worker lost holding the call: failed after dispatch.
    let mut dying = lb.back();
    let hello = Hello {
        pool_size: 1,
        pid: 31337,
        service: "echo".into(),
    };
    dying.send(&hello.encode()).await;
    wait_until(RECV, "the dying worker joins", || {
        dispatcher.active_workers() == 1
    })
    .await;
    front.send_call("echo:echo", 2, b"x").await;
    while dying.recv().await.message_type() != MessageType::Call {}
    drop(dying);
    let lost = front.recv().await;
    assert_marked(&lost, 2, Some(Mark::Failed), "worker lost");
    wait_until(RECV, "the dying worker is gone", || {
        dispatcher.active_workers() == 0
    })
    .await;

    // The handler's own exception passes unmarked.
    lb.worker(1).await;
    let raised = front.call("echo:raise", 3, b"x").await;
    assert_eq!(raised.seqid(), 3);
    assert_eq!(exception(&raised), (CODE_6, RAISED.to_owned(), None));

    // The only worker busy and no queue: refused at once; the busy call then gets the LB's
    // timeout, failed after dispatch.
    front.send_call("echo:slow", 4, b"x").await;
    front.send_call("echo:echo", 5, b"x").await;
    let full = front.recv().await;
    assert_marked(&full, 5, Some(Mark::Refused), "queue is full");
    let timeout = front.recv().await;
    assert_marked(&timeout, 4, Some(Mark::Failed), "timeout");

    // A protocol error: code 7, unmarked.
    front
        .send(&rpc_frame::encode_message(
            MessageType::Reply,
            "echo:echo",
            6,
            b"x",
        ))
        .await;
    let (code, text, mark) = exception(&front.recv().await);
    assert_eq!(
        (code, mark),
        (ExceptionCode::ProtocolError as i32, None),
        "{text}"
    );

    // Stopping: refused.
    let _ = dispatcher.stop_all();
    let (code, text, mark) = exception(&front.call("echo:echo", 7, b"x").await);
    assert_eq!((code, mark), (CODE_6, Some(Mark::Refused)), "{text}");
    assert!(text.contains("stopping"), "{text}");
}

// === tracing a call to its worker ===

/// One event the LB logged: its level and fields (`message` included), as text.
#[derive(Debug, Clone)]
struct Logged {
    level: tracing::Level,
    fields: BTreeMap<String, String>,
}

impl Logged {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// Events captured on this thread, while a [`Capture`] lives.
type Captured = Arc<Mutex<Vec<Logged>>>;

thread_local! {
    static CAPTURED: std::cell::RefCell<Option<Captured>> = const { std::cell::RefCell::new(None) };
}

/// The events the LB logs on this thread (every level) while it lives; `#[tokio::test]`
/// runs every task on the test's thread. A global subscriber (set once for the test binary)
/// feeds it: a thread-local default subscriber would miss events whose callsite another
/// test's thread registered first.
struct Capture(Captured);

impl Capture {
    fn start() -> Capture {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            tracing::subscriber::set_global_default(ToCapture)
                .expect("no other global subscriber in this test binary");
        });
        let captured = Captured::default();
        CAPTURED.with(|c| *c.borrow_mut() = Some(captured.clone()));
        Capture(captured)
    }

    /// Waits for an event with `message`, and returns it with the events logged before it;
    /// both leave the capture, later events stay.
    async fn wait_for(&self, message: &str) -> (Logged, Vec<Logged>) {
        let deadline = Instant::now() + RECV;
        loop {
            {
                let mut events = self.0.lock().unwrap();
                if let Some(at) = events
                    .iter()
                    .position(|e| e.field("message") == Some(message))
                {
                    let mut before: Vec<_> = events.drain(..=at).collect();
                    let event = before.pop().expect("drained up to it");
                    return (event, before);
                }
                assert!(
                    Instant::now() < deadline,
                    "no {message:?} logged: {events:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        CAPTURED.with(|c| c.borrow_mut().take());
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// The global subscriber behind [`Capture`]: every event, to the capture of its thread if
/// there is one.
struct ToCapture;

impl tracing::Subscriber for ToCapture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let Some(captured) = CAPTURED.with(|c| c.borrow().clone()) else {
            return;
        };
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        captured.lock().unwrap().push(Logged {
            level: *event.metadata().level(),
            fields,
        });
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn workers_are_known_by_the_pid_of_their_hello() {
    let lb = Lb::new(Timings::default());
    lb.worker(2).await;
    let pids = |lb: &Lb| -> Vec<_> { lb.dispatcher.workers().iter().map(|w| w.pid).collect() };
    assert_eq!(pids(&lb), [Some(WORKER_PID as u32)]);

    // An old worker joins by its ping echo: no pid, until it sends a HELLO after all.
    let mut old = lb.back();
    let ping = old.recv().await;
    old.send(ping.as_wire()).await;
    let dispatcher = lb.dispatcher.clone();
    wait_until(RECV, "the echo makes it a worker", || {
        dispatcher.active_workers() == 2
    })
    .await;
    assert_eq!(pids(&lb), [Some(WORKER_PID as u32), None]);
    let hello = Hello {
        pool_size: 3,
        pid: 5151,
        service: "echo".into(),
    };
    old.send(&hello.encode()).await;
    wait_until(RECV, "the late HELLO gives its pid", || {
        dispatcher.workers()[1].pid == Some(5151)
    })
    .await;
    assert_eq!(lb.dispatcher.workers()[1].load.capacity, 3);
}

#[tokio::test]
async fn each_call_logs_one_debug_line_naming_its_worker_and_nothing_at_info() {
    let capture = Capture::start();
    let lb = Lb::new(Timings {
        request_timeout: Duration::from_millis(500),
        ..Timings::default()
    });
    lb.worker(2).await;
    let worker = lb.dispatcher.workers()[0].load.id.to_string();
    let (joined, _) = capture.wait_for("worker joined").await;
    assert_eq!(joined.field("pid"), Some("4242"), "{joined:?}");
    capture.wait_for("worker hello").await;
    let mut front = lb.front();

    assert_reply(&front.call("echo:echo", 77, b"traced").await, 77, b"traced");
    let (done, during) = capture.wait_for("call done").await;
    assert_eq!(done.level, tracing::Level::DEBUG);
    for (field, value) in [
        ("service", "echo"),
        ("method", "echo"),
        ("seqid", "77"),
        ("worker", worker.as_str()),
        ("pid", "4242"),
        ("outcome", "ok"),
    ] {
        assert_eq!(done.field(field), Some(value), "{field} in {done:?}");
    }
    assert!(done.field("worker_seqid").is_some(), "{done:?}");
    let ms: f64 = done.field("duration_ms").unwrap().parse().unwrap();
    assert!((0.0..5000.0).contains(&ms), "{done:?}");
    let loud: Vec<_> = during
        .iter()
        .filter(|e| e.level <= tracing::Level::INFO)
        .collect();
    assert!(
        loud.is_empty(),
        "logged at info or above per call: {loud:?}"
    );

    // A call past the request timeout: its line when the caller gets the timeout, then one
    // for the worker's late reply.
    front.send_call("echo:slow", 78, b"slow").await;
    let timeout = front.recv().await;
    assert_eq!(timeout.message_type(), MessageType::Exception);
    let (done, _) = capture.wait_for("call done").await;
    assert_eq!(
        (done.field("seqid"), done.field("outcome")),
        (Some("78"), Some("timeout")),
        "{done:?}"
    );
    assert_eq!(done.field("worker_seqid"), None, "no answer yet: {done:?}");
    let (late, _) = capture
        .wait_for("late reply: the caller already got the timeout; dropped")
        .await;
    assert_eq!(late.level, tracing::Level::DEBUG);
    assert_eq!(
        (late.field("seqid"), late.field("pid")),
        (Some("78"), Some("4242")),
        "{late:?}"
    );
    assert!(late.field("worker_seqid").is_some(), "{late:?}");

    // A worker that dies holding a call: the line says so.
    let mut dying = lb.back();
    let hello = Hello {
        pool_size: 1,
        pid: 31337,
        service: "echo".into(),
    };
    dying.send(&hello.encode()).await;
    let dispatcher = lb.dispatcher.clone();
    wait_until(RECV, "the second worker joins", || {
        dispatcher.active_workers() == 2
    })
    .await;
    // Both idle with room: calls alternate, so one of two lands on the dying worker.
    front.send_call("echo:echo", 80, b"a").await;
    front.send_call("echo:echo", 81, b"b").await;
    let call = loop {
        let m = dying.recv().await;
        if m.message_type() == MessageType::Call {
            break m;
        }
    };
    drop(dying);
    let mut answers = [front.recv().await, front.recv().await];
    answers.sort_by_key(|m| m.seqid());
    assert_eq!(answers.len(), 2);
    let lost = loop {
        let (done, _) = capture.wait_for("call done").await;
        if done.field("outcome") == Some("worker_lost") {
            break done;
        }
    };
    assert_eq!(lost.field("pid"), Some("31337"), "{lost:?}");
    assert_eq!(lost.field("method"), Some(call.name()), "{lost:?}");
}

/// A worker holding a call longer than `worker_timeout_ms` is hung: it leaves the rotation
/// (no new call: the next one is refused, there being no other worker) and is reported once,
/// with the pid of its HELLO, for the watchdog. The held call is still answered by the
/// worker when it finishes (this worker was not killed).
#[tokio::test]
async fn a_worker_holding_a_call_past_the_worker_timeout_is_hung_and_out_of_rotation() {
    let mut lb = Lb::new(Timings {
        worker_timeout: Some(Duration::from_millis(300)),
        ..Timings::default()
    });
    lb.worker(1).await;
    let mut front = lb.front();
    front.send_call("echo:slow", 1, b"x").await;
    let hung = tokio::time::timeout(RECV, async {
        loop {
            match lb._events.recv().await {
                Some(WorkerEvent::Hung { id, pid }) => return (id, pid),
                Some(_) => {}
                None => panic!("events closed"),
            }
        }
    })
    .await
    .expect("no Hung event within RECV");
    assert_eq!(hung.1, Some(WORKER_PID as u32));
    assert_eq!(lb.dispatcher.active_workers(), 0, "out of rotation");
    let refused = front.call("echo:echo", 2, b"y").await;
    assert_marked(&refused, 2, Some(Mark::Refused), "Not Found");
    let slow = front.recv().await;
    assert_eq!((slow.message_type(), slow.seqid()), (MessageType::Reply, 1));
    // Reported once.
    let again = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Some(WorkerEvent::Hung { .. }) = lb._events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(again.is_err(), "a second Hung event");
}
