//! Integration tests of `rpc_proxy` without ZooKeeper: a proxy in-process on a unix socket,
//! static discovery events, fake upstream Thrift servers and raw framed clients
//! (CONTRACT sections 2, 6 and 8).

// Each test binary uses its own part of the shared harness.
#[allow(dead_code)]
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rpc_frame::{ExceptionCode, MessageType};
use rpc_testkit::wait_until_async;
use support::{
    Action, FakeUpstream, Pings, assert_reply, code, describe, exception, is_reply, start_proxy,
};

/// Bound for conditions the proxy should reach quickly (EOFs, connections, counts).
const SOON: Duration = Duration::from_secs(3);

// === routing and the wire ===

#[tokio::test]
async fn call_is_forwarded_with_service_stripped_and_seqid_restored() {
    let upstream = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let body = b"\x0b\x00\x01\x00\x00\x00\x05hello\x00 distinctive body \xff\x00\x01";
    let reply = client.call("echo:method", 777_777, body).await;

    assert_reply(&reply, 777_777, body);
    let calls = upstream.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].name, "method", "service: prefix stripped");
    assert_eq!(calls[0].message_type, MessageType::Call);
    assert_ne!(
        calls[0].seqid, 777_777,
        "seqid rewritten for the shared connection"
    );
    assert_eq!(calls[0].body, body, "body forwarded untouched");
}

#[tokio::test]
async fn pipelined_calls_answered_out_of_order_come_back_in_request_order() {
    const CALLS: i32 = 50;
    let upstream = FakeUpstream::start(|_| Action::HoldThenReverse(CALLS as usize)).await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let mut batch = Vec::new();
    for i in 0..CALLS {
        batch.extend_from_slice(&rpc_frame::encode_message(
            MessageType::Call,
            "echo:method",
            1000 + i,
            format!("body-{i}").as_bytes(),
        ));
    }
    client.send_raw(&batch).await;

    for i in 0..CALLS {
        let reply = client.reply().await;
        assert_reply(&reply, 1000 + i, format!("body-{i}").as_bytes());
    }
    // The upstream really answered in reverse: the last call it saw was the first answered.
    let calls = upstream.calls();
    assert_eq!(calls.len(), CALLS as usize);
    assert_eq!(
        calls.last().map(|c| c.body.clone()),
        Some(format!("body-{}", CALLS - 1).into_bytes())
    );
}

#[tokio::test]
async fn many_client_connections_share_one_upstream_connection() {
    const CLIENTS: usize = 20;
    const PER_CLIENT: i32 = 3;
    let total = CLIENTS * PER_CLIENT as usize;
    // Nothing is answered until every call is in flight at once.
    let upstream = FakeUpstream::start(move |_| Action::HoldThenReverse(total)).await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;

    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let mut client = proxy.client().await;
        tasks.spawn(async move {
            // Every client uses the same seqids: only the proxy's rewrite keeps them apart.
            for i in 1..=PER_CLIENT {
                client
                    .send_call("echo:method", i, format!("client-{c}-call-{i}").as_bytes())
                    .await;
            }
            for i in 1..=PER_CLIENT {
                let reply = client.reply().await;
                assert_reply(&reply, i, format!("client-{c}-call-{i}").as_bytes());
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("client task");
    }

    assert_eq!(upstream.accepts(), 1, "one multiplexed upstream connection");
    let calls = upstream.calls();
    assert_eq!(calls.len(), total);
    let seqids: HashSet<i32> = calls.iter().map(|c| c.seqid).collect();
    assert_eq!(
        seqids.len(),
        total,
        "seqids in flight together must be unique: {:?}",
        calls
    );
}

#[tokio::test]
async fn unknown_service_and_service_without_endpoints_fail_at_once() {
    let proxy = start_proxy("").await;
    proxy.route("svc", &[]).await;
    let mut client = proxy.client().await;

    let reply = client.call("nosuch:method", 11, b"x").await;
    let (got, text) = exception(&reply, 11);
    assert_eq!(got, code(ExceptionCode::Unknown), "{text}");
    assert!(text.starts_with("Service: nosuch Not Found"), "{text}");
    assert_eq!(reply.name(), "method");

    let start = Instant::now();
    let reply = client.call("svc:method", 12, b"x").await;
    let (got, text) = exception(&reply, 12);
    assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
    assert!(
        text.starts_with("Worker FOR svc.method Not Found"),
        "{text}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "not held: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn client_ping_is_answered_by_the_proxy() {
    // No endpoint and no sync at all: the ping must not wait for routing.
    let proxy = start_proxy("").await;
    let mut client = proxy.client().await;
    let start = Instant::now();
    client.send_raw(&rpc_frame::heartbeat(4242)).await;
    let reply = client.reply().await;
    assert_eq!(
        reply.message_type(),
        MessageType::Reply,
        "{}",
        describe(&reply)
    );
    assert_eq!(reply.name(), "ping");
    assert_eq!(reply.seqid(), 4242);
    assert_eq!(reply.body(), [0u8], "empty struct body");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

// === protocol errors ===

#[tokio::test]
async fn message_types_that_are_not_calls_get_code_7_and_the_connection_stays_usable() {
    let upstream = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let not_calls = [
        (MessageType::Reply, 5),
        (MessageType::Exception, 6),
        (MessageType::Stop, 7),
        (MessageType::StopConfirm, 8),
        (MessageType::Other(9), 9),
    ];
    for (message_type, seqid) in not_calls {
        client
            .send(message_type, "echo:method", seqid, b"\x00")
            .await;
        let reply = client.reply().await;
        let (got, text) = exception(&reply, seqid);
        assert_eq!(
            got,
            code(ExceptionCode::ProtocolError),
            "{message_type:?}: {text}"
        );
    }

    let reply = client.call("echo:method", 10, b"still usable").await;
    assert_reply(&reply, 10, b"still usable");
    assert_eq!(
        upstream.call_count(),
        1,
        "nothing but the real call was forwarded"
    );
}

#[tokio::test]
async fn name_without_service_gets_an_exception_with_the_client_seqid() {
    let upstream = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let reply = client.call("method", 31, b"x").await;
    let (got, text) = exception(&reply, 31);
    assert!(
        got == code(ExceptionCode::ProtocolError) || got == code(ExceptionCode::Unknown),
        "code {got}: {text}"
    );

    let reply = client.call("echo:method", 32, b"after").await;
    assert_reply(&reply, 32, b"after");
    assert_eq!(upstream.call_count(), 1);
}

#[tokio::test]
async fn non_strict_header_gets_code_7() {
    let upstream = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    // Old-style binary header: i32 name length, name, i8 type, i32 seqid; then the body.
    let name = b"echo:method";
    let mut payload = Vec::new();
    payload.extend_from_slice(&(name.len() as i32).to_be_bytes());
    payload.extend_from_slice(name);
    payload.push(1);
    payload.extend_from_slice(&41i32.to_be_bytes());
    payload.push(0);
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    client.send_raw(&frame).await;

    let reply = client.reply().await;
    assert_eq!(
        reply.message_type(),
        MessageType::Exception,
        "{}",
        describe(&reply)
    );
    let (got, text) = rpc_frame::parse_application_exception(reply.body()).expect("exception body");
    assert_eq!(got, code(ExceptionCode::ProtocolError), "{text}");
    assert!(
        text.to_lowercase().contains("strict"),
        "a clear reason: {text}"
    );
    assert_eq!(upstream.call_count(), 0, "never forwarded");
}

#[tokio::test]
async fn unframeable_lengths_get_code_7_or_eof_never_silence() {
    let upstream = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;

    let lengths: [(&str, i32); 3] = [
        ("zero", 0),
        ("negative", -2),
        ("over max_frame_size", i32::MAX),
    ];
    for (what, length) in lengths {
        let mut client = proxy.client().await;
        let mut bytes = length.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0x80, 0x01, 0x00, 0x01]);
        if length > 0 {
            // An oversized frame is answered once its header is in (name and seqid), so
            // the answer reaches its caller; the rest of it is skipped.
            bytes.extend_from_slice(&9u32.to_be_bytes());
            bytes.extend_from_slice(b"echo:echo");
            bytes.extend_from_slice(&77i32.to_be_bytes());
        }
        client.send_raw(&bytes).await;
        match client.recv().await {
            None => {}
            Some(reply) => {
                assert_eq!(
                    reply.message_type(),
                    MessageType::Exception,
                    "{what}: {}",
                    describe(&reply)
                );
                let (got, text) =
                    rpc_frame::parse_application_exception(reply.body()).expect("exception body");
                assert_eq!(got, code(ExceptionCode::ProtocolError), "{what}: {text}");
                if length > 0 {
                    assert_eq!((reply.seqid(), reply.name()), (77, "echo"), "{what}");
                }
            }
        }
    }
    assert_eq!(upstream.call_count(), 0);
}

// === upstream failures ===

#[tokio::test]
async fn request_timeout_fails_the_call_and_the_connection_keeps_working() {
    let silent = FakeUpstream::start(|_| Action::Ignore).await;
    let healthy = FakeUpstream::echo().await;
    let proxy = start_proxy("request_timeout_ms=300").await;
    proxy.set_endpoints("slow", &[silent.frontend()]).await;
    proxy.set_endpoints("echo", &[healthy.frontend()]).await;
    proxy.synced().await;
    let mut client = proxy.client().await;

    let start = Instant::now();
    let reply = client.call("slow:method", 51, b"x").await;
    let elapsed = start.elapsed();
    let (got, text) = exception(&reply, 51);
    assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
    assert!(text.to_lowercase().contains("timeout"), "{text}");
    assert!(
        elapsed >= Duration::from_millis(250),
        "too early: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(3), "too late: {elapsed:?}");
    assert_eq!(silent.call_count(), 1);

    let reply = client.call("echo:method", 52, b"next").await;
    assert_reply(&reply, 52, b"next");
}

#[tokio::test]
async fn upstream_closing_fails_the_call_in_flight_and_a_later_call_reconnects() {
    let upstream = FakeUpstream::start(|call| {
        if call.body == b"close" {
            Action::Close
        } else {
            Action::Reply
        }
    })
    .await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let start = Instant::now();
    let reply = client.call("echo:method", 61, b"close").await;
    let (got, text) = exception(&reply, 61);
    assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "prompt: {:?}",
        start.elapsed()
    );

    // The endpoint may be in reconnect backoff for a moment: calls then fail fast with code 6.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seqid = 62;
    loop {
        let reply = client.call("echo:method", seqid, b"again").await;
        if is_reply(&reply) {
            assert_reply(&reply, seqid, b"again");
            break;
        }
        let (got, text) = exception(&reply, seqid);
        assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
        assert!(Instant::now() < deadline, "no reconnect within 5 s: {text}");
        seqid += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.accepts(), 2, "reconnected once");
    let calls = upstream.calls();
    assert_eq!(
        calls.last().map(|c| c.conn),
        Some(1),
        "answered on the new connection: {calls:?}"
    );
}

#[tokio::test]
async fn reply_with_the_wrong_method_name_is_a_bad_reply() {
    let upstream = FakeUpstream::start(|_| Action::ReplyAs("other")).await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let reply = client.call("echo:method", 71, b"x").await;
    let (got, text) = exception(&reply, 71);
    assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
    assert!(
        text.contains("echo") && text.contains("method"),
        "names service and method: {text}"
    );
}

// === heartbeats ===

#[tokio::test]
async fn silent_upstream_is_dropped_by_heartbeat_timeout() {
    let upstream = FakeUpstream::start_with(Pings::Ignore, |_| Action::Ignore).await;
    let proxy = start_proxy("heartbeat_interval_ms=100\nheartbeat_timeout_ms=600").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let start = Instant::now();
    // request_timeout_ms is the default 15 s: only the heartbeat can end this call early.
    let reply = client.call("echo:method", 81, b"x").await;
    let elapsed = start.elapsed();
    let (got, text) = exception(&reply, 81);
    assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    wait_until_async(SOON, || async { upstream.eofs() == 1 }).await;
    assert!(upstream.pings() >= 1, "the quiet connection was pinged");
}

#[tokio::test]
async fn upstream_answering_pings_with_unknown_method_stays_connected() {
    let upstream = FakeUpstream::start_with(Pings::UnknownMethod, |_| Action::Reply).await;
    let proxy = start_proxy("heartbeat_interval_ms=100\nheartbeat_timeout_ms=600").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let reply = client.call("echo:method", 91, b"first").await;
    assert_reply(&reply, 91, b"first");
    // The behaviour under test is "stays up while idle", so an idle spell is the test.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(upstream.eofs(), 0, "connection kept");
    assert!(
        upstream.pings() >= 2,
        "pinged while idle: {}",
        upstream.pings()
    );

    let reply = client.call("echo:method", 92, b"second").await;
    assert_reply(&reply, 92, b"second");
    assert_eq!(upstream.accepts(), 1, "same connection");
}

// === endpoints ===

#[tokio::test]
async fn removed_endpoint_finishes_its_call_then_closes() {
    let a = FakeUpstream::start(|call| {
        if call.body == b"slow" {
            Action::ReplyAfter(Duration::from_millis(600))
        } else {
            Action::Reply
        }
    })
    .await;
    let b = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[a.frontend()]).await;

    let mut slow_client = proxy.client().await;
    slow_client.send_call("echo:method", 101, b"slow").await;
    wait_until_async(SOON, || async { a.call_count() == 1 }).await;

    proxy.set_endpoints("echo", &[b.frontend()]).await;
    let mut client = proxy.client().await;
    for seqid in 0..20 {
        let reply = client.call("echo:method", seqid, b"new").await;
        assert_reply(&reply, seqid, b"new");
    }
    assert_eq!(b.call_count(), 20, "new calls go to B");
    assert_eq!(a.call_count(), 1, "no new call on the removed endpoint");

    let reply = slow_client.reply().await;
    assert_reply(&reply, 101, b"slow");
    wait_until_async(SOON, || async { a.eofs() == 1 }).await;
    assert_eq!(b.eofs(), 0);
}

#[tokio::test]
async fn sequential_calls_spread_over_endpoints() {
    let a = FakeUpstream::echo().await;
    let b = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[a.frontend(), b.frontend()]).await;
    let mut client = proxy.client().await;

    for seqid in 0..200 {
        let reply = client.call("echo:method", seqid, b"spread").await;
        assert_reply(&reply, seqid, b"spread");
    }
    let (na, nb) = (a.call_count(), b.call_count());
    assert_eq!(na + nb, 200);
    assert!(na > 40 && nb > 40, "uneven spread: A {na}, B {nb}");
}

#[tokio::test]
async fn unreachable_endpoint_is_routed_around_or_fails_fast() {
    let healthy = FakeUpstream::echo().await;
    let nowhere = tempfile::tempdir().expect("tempdir");
    let dead_unix = nowhere.path().join("nothing.sock").display().to_string();
    let dead_tcp = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    let proxy = start_proxy("").await;
    proxy
        .set_endpoints("echo", &[dead_unix, healthy.frontend()])
        .await;
    proxy.set_endpoints("gone", &[dead_tcp]).await;
    proxy.synced().await;
    let mut client = proxy.client().await;

    for seqid in 0..20 {
        let reply = client.call("echo:method", seqid, b"rerouted").await;
        assert_reply(&reply, seqid, b"rerouted");
    }
    assert_eq!(healthy.call_count(), 20);

    let start = Instant::now();
    let reply = client.call("gone:method", 131, b"x").await;
    let (got, text) = exception(&reply, 131);
    assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
    assert!(
        text.starts_with("Worker FOR gone.method Not Found"),
        "{text}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

// === lifecycle ===

#[tokio::test]
async fn graceful_stop_finishes_the_call_in_flight_and_removes_the_socket() {
    let upstream = FakeUpstream::start(|_| Action::ReplyAfter(Duration::from_millis(500))).await;
    let mut proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    client.send_call("echo:method", 141, b"in flight").await;
    wait_until_async(SOON, || async { upstream.call_count() == 1 }).await;
    proxy.shutdown.cancel();

    // The reply is written before the proxy can finish its drain, so when both are ready the
    // reply is taken (biased); a proxy that returns without waiting for it loses the race.
    let reply = tokio::select! {
        biased;
        reply = client.reply() => reply,
        _ = &mut proxy.join => panic!("the proxy stopped before answering the call in flight"),
    };
    assert_reply(&reply, 141, b"in flight");
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.join)
        .await
        .expect("the proxy did not stop within 5 s")
        .expect("the proxy task panicked");
    assert!(!proxy.socket.exists(), "socket file removed");
    assert!(
        tokio::net::UnixStream::connect(&proxy.socket)
            .await
            .is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn calls_beyond_max_inflight_per_connection_are_refused_in_order() {
    let upstream = FakeUpstream::start(|_| Action::ReplyAfter(Duration::from_millis(500))).await;
    let proxy = start_proxy("max_inflight_per_connection=4").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let mut batch = Vec::new();
    for seqid in 0..10 {
        batch.extend_from_slice(&rpc_frame::encode_message(
            MessageType::Call,
            "echo:method",
            seqid,
            b"limited",
        ));
    }
    let start = Instant::now();
    client.send_raw(&batch).await;

    for seqid in 0..4 {
        let reply = client.reply().await;
        assert_reply(&reply, seqid, b"limited");
    }
    for seqid in 4..10 {
        let reply = client.reply().await;
        let (got, text) = exception(&reply, seqid);
        assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        upstream.call_count(),
        4,
        "refused calls never reach the upstream"
    );
}

#[tokio::test]
async fn upstream_connection_is_opened_on_first_call_only() {
    let upstream = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;

    // Asserting an absence: a short observation window.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.accepts(), 0, "no connection before the first call");

    let mut client = proxy.client().await;
    let reply = client.call("echo:method", 161, b"first").await;
    assert_reply(&reply, 161, b"first");
    let reply = client.call("echo:method", 162, b"second").await;
    assert_reply(&reply, 162, b"second");
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn call_before_the_first_sync_is_held_until_routes_arrive() {
    let upstream = FakeUpstream::echo().await;
    let proxy = start_proxy("startup_hold_ms=5000").await;
    let mut client = proxy.client().await;

    let start = Instant::now();
    client.send_call("echo:method", 171, b"early").await;
    // Unheld, it would be answered `Service: echo Not Found` at once.
    if let Some(early) = client.recv_within(Duration::from_millis(300)).await {
        panic!("answered before sync: {:?}", early.as_ref().map(describe));
    }

    proxy.route("echo", &[upstream.frontend()]).await;
    let reply = client.reply().await;
    assert_reply(&reply, 171, b"early");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

// === bad headers keep the client's seqid ===

#[tokio::test]
async fn code_7_reply_to_a_bad_header_carries_the_client_seqid() {
    let upstream = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    proxy.route("echo", &[upstream.frontend()]).await;
    let mut client = proxy.client().await;

    let mut non_strict = 11i32.to_be_bytes().to_vec();
    non_strict.extend_from_slice(b"echo:method");
    non_strict.push(1);
    non_strict.extend_from_slice(&41i32.to_be_bytes());
    non_strict.push(0);
    let strict = |version: u32, name: &[u8], seqid: i32| {
        let mut payload = version.to_be_bytes().to_vec();
        payload.extend_from_slice(&(name.len() as i32).to_be_bytes());
        payload.extend_from_slice(name);
        payload.extend_from_slice(&seqid.to_be_bytes());
        payload.push(0);
        payload
    };
    let cases = [
        ("non-strict header", non_strict, 41),
        (
            "invalid UTF-8 in the name",
            strict(rpc_frame::VERSION_1 | 1, b"echo:\xff\xfe", 42),
            42,
        ),
        (
            "bad version word",
            strict(0x8002_0001, b"echo:method", 43),
            43,
        ),
    ];
    for (what, payload, seqid) in cases {
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        client.send_raw(&frame).await;
        let reply = client.reply().await;
        let (got, text) = exception(&reply, seqid);
        assert_eq!(got, code(ExceptionCode::ProtocolError), "{what}: {text}");
    }
    assert_reply(&client.call("echo:method", 44, b"ok").await, 44, b"ok");
    assert_eq!(upstream.call_count(), 1, "bad headers are never forwarded");
}

// === frame-completion deadline ===

/// Client connections served by `connection::serve_with_frame_timeout` with a short bound
/// (the binary uses the 30 s `FRAME_TIMEOUT`), `echo` routed to one upstream.
struct FrameBound {
    socket: std::path::PathBuf,
    stop: tokio_util::sync::CancellationToken,
    _dir: tempfile::TempDir,
}

impl FrameBound {
    async fn start(frame_timeout: Duration, upstream: &FakeUpstream) -> FrameBound {
        use rpc_proxy::connection::{self, ConnectionSettings};
        let text = "zk=127.0.0.1:1\nproxy_address=/unused.sock\n";
        let (config, _) = rpc_config::ProxyConfig::parse(text).expect("config");
        let router = std::sync::Arc::new(rpc_proxy::route::Router::new(std::sync::Arc::new(
            rpc_proxy::upstream_settings(&config),
        )));
        router.apply(rpc_registry::DiscoveryEvent::Endpoints {
            service: "echo".into(),
            endpoints: vec![rpc_registry::Endpoint {
                node: rpc_registry::service_id(&upstream.frontend()),
                info: rpc_registry::EndpointInfo {
                    service: "echo".into(),
                    frontend: upstream.frontend(),
                    ..Default::default()
                },
            }],
        });
        router.apply(rpc_registry::DiscoveryEvent::Synced);
        let settings = std::sync::Arc::new(ConnectionSettings::new(
            config.common.max_frame_size,
            config.max_inflight_per_connection,
            config.startup_hold,
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("c.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let stop = tokio_util::sync::CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => return,
                    },
                };
                let (router, settings, shutdown) =
                    (router.clone(), settings.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let (r, w) = stream.into_split();
                    connection::serve_with_frame_timeout(
                        r,
                        w,
                        router,
                        settings,
                        shutdown,
                        frame_timeout,
                    )
                    .await;
                });
            }
        });
        FrameBound {
            socket,
            stop,
            _dir: dir,
        }
    }

    async fn client(&self) -> support::Client {
        support::Client::connect(&self.socket).await
    }
}

impl Drop for FrameBound {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reads `reader` until EOF within `limit`; returns the bytes read, or `None` if the
/// connection is still open then.
async fn read_until_eof(
    reader: &mut tokio::net::unix::OwnedReadHalf,
    limit: Duration,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok().map(|()| got)
}

#[tokio::test]
async fn client_dripping_a_frame_is_closed_after_the_frame_timeout_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let frame_timeout = Duration::from_secs(1);
    let upstream = FakeUpstream::echo().await;
    let proxy = FrameBound::start(frame_timeout, &upstream).await;
    let mut bystander = proxy.client().await;
    assert_reply(
        &bystander.call("echo:method", 1, b"before").await,
        1,
        b"before",
    );

    let stream = tokio::net::UnixStream::connect(&proxy.socket)
        .await
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let frame = rpc_frame::encode_message(MessageType::Call, "echo:method", 9, &[0u8; 80]);
    let started = Instant::now();
    let drip = tokio::spawn(async move {
        for byte in frame.iter() {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(150)).await; // the drip's pace
        }
    });
    let got = read_until_eof(&mut reader, frame_timeout + Duration::from_secs(3))
        .await
        .expect("a client dripping one byte per 150 ms is still connected");
    let closed_after = started.elapsed();
    drip.abort();
    assert!(got.is_empty(), "nothing is owed to the dripping client");
    assert!(
        closed_after >= frame_timeout - Duration::from_millis(100),
        "closed after {closed_after:?}, before the frame timeout"
    );
    assert_reply(
        &bystander.call("echo:method", 2, b"after").await,
        2,
        b"after",
    );
    assert_eq!(
        upstream.call_count(),
        2,
        "the partial call never went upstream"
    );
}

#[tokio::test]
async fn stalled_frame_closes_the_connection_after_the_replies_it_is_owed() {
    let frame_timeout = Duration::from_secs(1);
    let upstream = FakeUpstream::start(|_| Action::ReplyAfter(Duration::from_millis(1500))).await;
    let proxy = FrameBound::start(frame_timeout, &upstream).await;
    let mut client = proxy.client().await;
    let call = rpc_frame::encode_message(MessageType::Call, "echo:method", 5, b"owed");
    let next = rpc_frame::encode_message(MessageType::Call, "echo:method", 6, b"stalled");
    let mut bytes = call.to_vec();
    bytes.extend_from_slice(&next[..10]);
    client.send_raw(&bytes).await;
    // The reply comes after the frame deadline passed: it is still delivered, then EOF.
    assert_reply(&client.reply().await, 5, b"owed");
    match client
        .recv_within(frame_timeout + Duration::from_secs(3))
        .await
    {
        Some(None) => {}
        Some(Some(m)) => panic!("unexpected frame {}", describe(&m)),
        None => panic!("still open with a frame stalled past the frame timeout"),
    }
    assert_eq!(upstream.call_count(), 1);
}

#[tokio::test]
async fn large_frames_arriving_steadily_within_the_frame_timeout_are_served() {
    // Each frame takes ~1.2 s of a 2 s bound; both together take longer than the bound.
    let frame_timeout = Duration::from_secs(2);
    let upstream = FakeUpstream::echo().await;
    let proxy = FrameBound::start(frame_timeout, &upstream).await;
    let mut client = proxy.client().await;
    let started = Instant::now();
    for seqid in [1, 2] {
        let body = vec![seqid as u8; 256 * 1024];
        let frame = rpc_frame::encode_message(MessageType::Call, "echo:method", seqid, &body);
        for chunk in frame.chunks(frame.len() / 8 + 1) {
            client.send_raw(chunk).await;
            tokio::time::sleep(Duration::from_millis(150)).await; // the sender's pace
        }
        assert_reply(&client.reply().await, seqid, &body);
    }
    assert!(
        started.elapsed() > frame_timeout,
        "the test must span more than one frame timeout"
    );
}
