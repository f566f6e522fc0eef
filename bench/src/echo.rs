//! The echo backend: a fast tokio framed Thrift server that answers every `echo` CALL with
//! its REPLY (same name, same seqid; see [`wire::echo_in_place`]) and echoes heartbeats. It
//! takes the proxy's stripped name `echo` and a direct client's `echo:echo` alike.
//!
//! It runs as its own process (`rpc-bench echo-server`, so its CPU is not the client's) for
//! the hop scenarios, and in-process for the discovery scenario, where many listeners each
//! count their connections and calls and note when the last call arrived ([`Stats`]).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::wire;

/// Read buffer growth step for small frames.
const READ_CHUNK: usize = 64 * 1024;

/// What one listener saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// Calls answered.
    pub calls: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// When the last call arrived, in [`now_ns`] time (0: never).
    pub last_call_ns: AtomicU64,
}

/// Nanoseconds since the first call of this function in this process: a clock shared by the
/// in-process backends and the code measuring them.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Binds a unix socket (removing a stale file first).
///
/// # Errors
/// When the socket cannot be bound.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Accepts and serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, stats: Arc<Stats>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                stats.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve_connection(stream, stats.clone()));
            }
            Err(_) => {
                // EMFILE: wait for connections to go away rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// Answers the calls of one connection in order, writing every reply ready in one batch.
async fn serve_connection(mut stream: UnixStream, stats: Arc<Stats>) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // `start..done` holds answered frames not written yet.
        let (mut start, mut done, mut answered) = (0, 0, 0u64);
        while let Some(total) = wire::frame_len(&buf[done..]) {
            if buf.len() - done < total {
                // A large frame: make room for all of it at once.
                buf.reserve(total - (buf.len() - done));
                break;
            }
            if wire::echo_in_place(&mut buf[done..done + total]) {
                answered += 1;
            } else {
                // No answer (ONEWAY, junk): write what precedes it and skip it.
                if stream.write_all(&buf[start..done]).await.is_err() {
                    return;
                }
                start = done + total;
            }
            done += total;
        }
        if answered > 0 {
            stats.calls.fetch_add(answered, Ordering::Relaxed);
            stats.last_call_ns.store(now_ns(), Ordering::Relaxed);
        }
        if start < done && stream.write_all(&buf[start..done]).await.is_err() {
            return;
        }
        buf.advance(done);
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
    }
}
