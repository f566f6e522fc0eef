//! Byte budgets of client connections (CONTRACT section 9): answers waiting behind a slow
//! call are charged and bounded, and partial frames that fill the process budget are cut at
//! their frame deadline, so they cannot wedge every connection.

use std::sync::Arc;
use std::time::Duration;

use rpc_mux::ProcessBudget;
use rpc_proxy::connection::{self, ConnectionSettings};
use rpc_proxy::route::Router;
use rpc_proxy::upstream::UpstreamSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn router() -> Arc<Router> {
    // Never synced: a call waits `startup_hold` before it is looked up.
    Arc::new(Router::new(Arc::new(UpstreamSettings::default())))
}

fn call_frame(name: &str, seqid: i32) -> bytes::BytesMut {
    rpc_frame::encode_message(rpc_frame::MessageType::Call, name, seqid, &[0])
}

/// One call whose reply is not ready (here: the startup hold; in production any slow
/// upstream call, up to request_timeout), then a flood of pings the client never reads the
/// answers of. Each ping answer is charged to the connection's budget (4 KB here) and their
/// number is bounded, so the proxy stops reading the flood instead of buffering it.
#[tokio::test]
async fn pings_behind_a_slow_call_are_bounded_by_the_budget() {
    let process = ProcessBudget::new(1 << 30);
    let mut settings = ConnectionSettings::new(1 << 20, 1024, Duration::from_secs(30));
    settings.max_buffer_bytes = 4096;
    settings.process_budget = process.clone();
    let (client, proxy_side) = tokio::io::duplex(64 * 1024);
    let (r, w) = tokio::io::split(proxy_side);
    let server = tokio::spawn(connection::serve_with_frame_timeout(
        r,
        w,
        router(),
        Arc::new(settings),
        CancellationToken::new(),
        Duration::from_secs(30),
    ));
    let (_client_r, mut client_w) = tokio::io::split(client);
    client_w
        .write_all(&call_frame("svc:slow", 1))
        .await
        .unwrap();
    let ping = rpc_frame::heartbeat(7);
    let mut flood = Vec::new();
    while flood.len() < 1 << 20 {
        flood.extend_from_slice(&ping);
    }
    let mut sent = 0usize;
    let wrote = tokio::time::timeout(Duration::from_secs(5), async {
        for _ in 0..64 {
            client_w.write_all(&flood).await.unwrap();
            sent += flood.len();
        }
    })
    .await;
    eprintln!(
        "client wrote {sent} bytes of pings, read no reply; budget used {} bytes",
        process.used()
    );
    // With a 4 KB budget the proxy should have stopped reading after a few KB (the client's
    // write would then block and the timeout fire).
    assert!(
        wrote.is_err(),
        "the proxy read {sent} bytes of pings past a 4096-byte connection budget and holds a reply for each"
    );
    server.abort();
}

/// Two clients each send most of a frame; together their partial frames reach the process
/// budget (1000 bytes), so nobody is read. The frame deadline (1 s) still runs while a
/// connection waits for room: the stalled clients are closed, their bytes come back, and a
/// client that connects afterwards is read (its ping answered).
#[tokio::test]
async fn partial_frames_filling_the_process_budget_are_cut_at_their_deadline() {
    let process = ProcessBudget::new(1000);
    let mut settings = ConnectionSettings::new(800, 1024, Duration::from_secs(30));
    settings.max_buffer_bytes = 1000;
    settings.process_budget = process.clone();
    let settings = Arc::new(settings);
    let router = router();
    let frame_timeout = Duration::from_secs(1);
    let connect = || {
        let (client, proxy_side) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(proxy_side);
        tokio::spawn(connection::serve_with_frame_timeout(
            r,
            w,
            router.clone(),
            settings.clone(),
            CancellationToken::new(),
            frame_timeout,
        ));
        tokio::io::split(client)
    };
    let mut partial = 700u32.to_be_bytes().to_vec();
    partial.extend_from_slice(&[0u8; 596]);
    let (mut a_r, mut a_w) = connect();
    a_w.write_all(&partial).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (_b_r, mut b_w) = connect();
    b_w.write_all(&partial).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // One more byte of A's frame: A's connection reads it (it was waiting on the socket) and
    // then, like B's, finds the budget full and waits for room with no frame clock.
    a_w.write_all(&[0u8]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    eprintln!(
        "process budget used after two partial frames: {}",
        process.used()
    );
    // Both clients now stall mid-frame, past the 1 s frame timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = [0u8; 64];
    let a_closed = matches!(
        tokio::time::timeout(Duration::from_millis(200), a_r.read(&mut got)).await,
        Ok(Ok(0) | Err(_))
    );
    let (mut c_r, mut c_w) = connect();
    c_w.write_all(&rpc_frame::heartbeat(9)).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(3), c_r.read(&mut got)).await;
    eprintln!(
        "first client closed after 3 s (frame timeout 1 s): {a_closed}; new client's ping answered: {}; budget used {}",
        answer.is_ok(),
        process.used()
    );
    assert!(
        a_closed,
        "a client stalled mid-frame 3 s (frame timeout 1 s) is still open: the frame timeout does not run while the budget is full"
    );
    assert!(
        answer.is_ok(),
        "a ping to a new connection got no answer in 3 s: the process budget is wedged by partial frames"
    );
}
