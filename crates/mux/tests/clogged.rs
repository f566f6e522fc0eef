//! A call queued behind a write the peer drips through must still end by its deadline
//! (CONTRACT section 9): the clock reports how long the batch being written has taken
//! (`Tick::writing_for`), and a policy that closes the connection then (as the proxy's does)
//! gets the queued call back at once instead of after the write gives up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rpc_frame::{Message, MessageType};
use rpc_mux::{Ending, Expiry, Failure, Outbound, Policy, Settings, Start, Tick};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Like the proxy's UpstreamPolicy: a call's deadline is `now + request_timeout` when the
/// writer takes it, expired calls are dropped, and a batch written for a request timeout
/// closes the connection.
struct Recorder {
    request_timeout: Duration,
    outcomes: Mutex<Vec<(u32, String, Duration)>>,
    t0: tokio::time::Instant,
}

impl Recorder {
    fn note(&self, id: u32, what: String) {
        self.outcomes
            .lock()
            .unwrap()
            .push((id, what, self.t0.elapsed()));
    }
    fn outcome(&self, id: u32) -> Option<(String, Duration)> {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .find(|(i, _, _)| *i == id)
            .map(|(_, w, t)| (w.clone(), *t))
    }
}

struct Call {
    id: u32,
    message: Message,
}

impl Policy for Recorder {
    type Call = Call;
    type Pending = u32;
    type Close = ();
    fn start(&self, call: Call, now: Instant) -> Start<u32> {
        Start {
            message: call.message,
            pending: Some((now + self.request_timeout, call.id)),
        }
    }
    fn reply(&self, id: u32, _: Message) {
        self.note(id, "reply".into());
    }
    fn expired(&self, _: &mut u32) -> Expiry {
        Expiry::Drop
    }
    fn failed(&self, id: u32, failure: Failure<()>) {
        self.note(id, format!("{failure:?}"));
    }
    fn frame(&self, _: Message) -> Result<(), ()> {
        Ok(())
    }
    fn tick(&self, tick: &Tick) -> Result<(), ()> {
        match tick.writing_for {
            Some(writing) if writing >= self.request_timeout => Err(()),
            _ => Ok(()),
        }
    }
    fn unsent(&self, call: Call, _: Ending<()>) {
        self.note(call.id, "unsent".into());
    }
}

fn message(name: &str, body_len: usize) -> Message {
    let mut wire = rpc_frame::encode_message(MessageType::Call, name, 0, &vec![0u8; body_len]);
    let frame = rpc_frame::decode_frame(&mut wire, usize::MAX)
        .unwrap()
        .unwrap();
    Message::parse(frame).unwrap()
}

/// An upstream that pings (so the heartbeat timeout never fires) and reads 1 KB every 1.5 s
/// (so the 2 s write timeout never fires). A call queued behind a large one comes back
/// unsent once the batch has been written for its request timeout (1 s).
#[tokio::test(start_paused = true)]
async fn a_call_queued_behind_a_dripping_write_comes_back_by_its_deadline() {
    let (ours, peer) = tokio::io::duplex(1024);
    let (r, w) = tokio::io::split(ours);
    let (mut peer_r, mut peer_w) = tokio::io::split(peer);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let policy = Arc::new(Recorder {
        request_timeout: Duration::from_secs(1),
        outcomes: Mutex::default(),
        t0: tokio::time::Instant::now(),
    });
    let settings = Settings {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_millis(1500),
        write_timeout: Duration::from_secs(2),
        max_frame_size: 64 * 1024,
        ping_at_start: false,
        ping_always: false,
    };
    let pinger = tokio::spawn(async move {
        loop {
            peer_w.write_all(&rpc_frame::heartbeat(0)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let dripper = tokio::spawn(async move {
        let mut chunk = [0u8; 1024];
        loop {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let _ = peer_r.read(&mut chunk).await;
        }
    });
    tx.send(Outbound::Call(Call {
        id: 1,
        message: message("big", 256 * 1024),
    }))
    .unwrap();
    let runner = tokio::spawn({
        let policy = policy.clone();
        async move { run_it(&policy, &settings, r, w, &mut rx).await }
    });
    // The writer is now stuck on call 1; call 2 is queued behind it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send(Outbound::Call(Call {
        id: 2,
        message: message("small", 10),
    }))
    .unwrap();
    // Virtual time: wait (bounded) until both calls have an outcome.
    for _ in 0..600 {
        if policy.outcome(1).is_some() && policy.outcome(2).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (one, _) = policy.outcome(1).expect("call 1 ended");
    let (two, at) = policy.outcome(2).expect("call 2 ended");
    assert!(
        one == "Timeout" || one.starts_with("Ended"),
        "held call 1: {one}"
    );
    assert_eq!(
        two, "unsent",
        "queued call 2 comes back for another endpoint"
    );
    assert!(
        at <= Duration::from_millis(1500),
        "call 2 back after {at:?}, its request timeout is 1 s"
    );
    assert!(runner.is_finished() || at <= Duration::from_millis(1500));
    pinger.abort();
    dripper.abort();
    runner.abort();
}

async fn run_it<R, W>(
    policy: &Recorder,
    settings: &Settings,
    r: R,
    w: W,
    rx: &mut mpsc::UnboundedReceiver<Outbound<Call>>,
) -> Ending<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    rpc_mux::connection::run(policy, settings, r, w, rx, std::future::pending()).await
}
