//! A TCP relay in front of ZooKeeper that a test can cut and heal: a network partition
//! between one client and a server that keeps running (so the server expires the client's
//! session while the client cannot tell). It also counts what clients send through it
//! (connections, and the paths of create requests), so a test can measure retry rates.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards `127.0.0.1:<port>` to an upstream address until dropped.
pub struct Relay {
    addr: SocketAddr,
    /// `true` while cut; every change is seen by the live connections.
    cut: watch::Sender<bool>,
    seen: Arc<Seen>,
    task: JoinHandle<()>,
}

/// What the relay saw clients send.
#[derive(Debug, Default)]
struct Seen {
    /// Connections relayed to the server.
    connections: AtomicUsize,
    /// The path of every create request (any create op code), in order.
    creates: Mutex<Vec<String>>,
}

impl Relay {
    /// Listens on a fresh loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let (cut, cut_rx) = watch::channel(false);
        let seen = Arc::new(Seen::default());
        let task = tokio::spawn(accept(listener, upstream, cut_rx, seen.clone()));
        Relay {
            addr,
            cut,
            seen,
            task,
        }
    }

    /// `127.0.0.1:PORT`, for a client's connect string.
    pub fn connect_string(&self) -> String {
        self.addr.to_string()
    }

    /// Closes every relayed connection and, until [`Relay::heal`], every new one at once.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Relays new connections again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// How many connections were relayed to the server so far.
    pub fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::Acquire)
    }

    /// How many create requests for `path` clients sent so far.
    pub fn creates_of(&self, path: &str) -> usize {
        let creates = self.seen.creates.lock().expect("no panic while holding it");
        creates.iter().filter(|p| *p == path).count()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: watch::Receiver<bool>,
    seen: Arc<Seen>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *cut.borrow() {
            drop(client); // Partitioned: the client sees its connection close at once.
            continue;
        }
        conns.spawn(relay(client, upstream, cut.clone(), seen.clone()));
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    mut cut: watch::Receiver<bool>,
    seen: Arc<Seen>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    seen.connections.fetch_add(1, Ordering::AcqRel);
    let (client_read, mut client_write) = client.into_split();
    let (mut server_read, server_write) = server.into_split();
    // Either direction ending (or a cut) ends the connection: ZooKeeper has no half-close.
    tokio::select! {
        () = requests(client_read, server_write, &seen) => {}
        _ = tokio::io::copy(&mut server_read, &mut client_write) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
    // Both sockets close here.
}

/// Copies the client's bytes to the server, noting the path of every create request.
async fn requests(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, seen: &Seen) {
    let mut scanner = Scanner::default();
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        scanner.feed(&buf[..n], seen);
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Splits a client's byte stream into ZooKeeper request frames: a 4-byte big-endian length,
/// then the frame. The first frame of a connection is the connect request (no header); every
/// later one starts with `xid: i32, op: i32`, and a create's body with its path (`i32` length,
/// then UTF-8).
#[derive(Default)]
struct Scanner {
    pending: Vec<u8>,
    /// Whether the connect request has gone by.
    connected: bool,
}

impl Scanner {
    /// Op codes of create requests: create, create2, createContainer, createTTL.
    const CREATES: [i32; 4] = [1, 15, 19, 21];

    fn feed(&mut self, bytes: &[u8], seen: &Seen) {
        self.pending.extend_from_slice(bytes);
        loop {
            let Some(len) = read_i32(&self.pending, 0) else {
                return;
            };
            let len = usize::try_from(len).unwrap_or(0);
            if self.pending.len() < 4 + len {
                return;
            }
            let frame: Vec<u8> = self.pending.drain(..4 + len).skip(4).collect();
            if !self.connected {
                self.connected = true;
                continue;
            }
            let Some(op) = read_i32(&frame, 4) else {
                continue;
            };
            if Self::CREATES.contains(&op)
                && let Some(path) = read_string(&frame, 8)
            {
                seen.creates
                    .lock()
                    .expect("no panic while holding it")
                    .push(path);
            }
        }
    }
}

fn read_i32(bytes: &[u8], at: usize) -> Option<i32> {
    let raw: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(i32::from_be_bytes(raw))
}

fn read_string(bytes: &[u8], at: usize) -> Option<String> {
    let len = usize::try_from(read_i32(bytes, at)?).ok()?;
    let raw = bytes.get(at + 4..at + 4 + len)?;
    Some(String::from_utf8_lossy(raw).into_owned())
}
