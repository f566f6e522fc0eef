//! Byte budgets of LB front connections (CONTRACT section 9): partial frames that fill the
//! process budget are cut at their frame deadline, so they cannot wedge every connection.

use std::sync::Arc;
use std::time::Duration;

use rpc_lb::dispatch::Dispatcher;
use rpc_lb::front::{self, Activity, FrontSettings};
use rpc_lb::metrics::LbMetrics;
use rpc_mux::ProcessBudget;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn partial_frames_filling_the_process_budget_are_cut_at_their_deadline() {
    let process = ProcessBudget::new(1000);
    let settings = Arc::new(FrontSettings {
        service: "svc".into(),
        max_frame_size: 800,
        request_timeout: Duration::from_secs(5),
        frame_timeout: Duration::from_secs(1),
        idle_timeout: None,
        write_timeout: Duration::from_secs(5),
        max_buffer_bytes: 1000,
        process_budget: process.clone(),
        metrics: Arc::new(LbMetrics::new("svc")),
    });
    let dispatcher = Arc::new(Dispatcher::new(10));
    let activity = Arc::new(Activity::default());
    let connect = || {
        let (client, lb_side) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(lb_side);
        tokio::spawn(front::serve(
            r,
            w,
            dispatcher.clone(),
            settings.clone(),
            activity.clone(),
            CancellationToken::new(),
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
    a_w.write_all(&[0u8]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
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
        "first peer closed after 3 s (frame timeout 1 s): {a_closed}; new peer's ping answered: {}; budget used {}",
        answer.is_ok(),
        process.used()
    );
    assert!(
        answer.is_ok() && a_closed,
        "LB front wedged: stalled partial frames hold the process budget and no front connection is read"
    );
}
