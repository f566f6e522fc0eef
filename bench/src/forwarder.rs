//! The minimal tokio frame forwarder: the floor for an L7 hop. It accepts a client, connects
//! one upstream connection for it, and copies whole frames each way (each read is cut at the
//! last complete frame, lengths checked against the maximum). No routing, no seqid rewrite,
//! no sharing of upstream connections: whatever `rpc_proxy` costs beyond this is the price of
//! its features.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::wire;

/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;

/// Serves clients of `listener`, forwarding each to its own connection to `upstream`.
pub async fn serve(listener: UnixListener, upstream: PathBuf) {
    let upstream = Arc::new(upstream);
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(server) = UnixStream::connect(upstream.as_path()).await {
                        forward(client, server).await;
                    }
                });
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn forward(mut client: UnixStream, mut server: UnixStream) {
    let (client_r, client_w) = client.split();
    let (server_r, server_w) = server.split();
    let _ = tokio::join!(pump(client_r, server_w), pump(server_r, client_w));
}

/// Copies whole frames from `reader` to `writer` until EOF or an error, then shuts the
/// writer down.
async fn pump<R, W>(mut reader: R, mut writer: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if reader.read_buf(&mut buf).await? == 0 {
            break;
        }
        let mut whole = 0;
        while let Some(total) = wire::frame_len(&buf[whole..]) {
            if total - rpc_frame::LENGTH_PREFIX > rpc_frame::DEFAULT_MAX_FRAME_SIZE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "frame too large",
                ));
            }
            if buf.len() - whole < total {
                buf.reserve(total - (buf.len() - whole));
                break;
            }
            whole += total;
        }
        if whole > 0 {
            writer.write_all(&buf[..whole]).await?;
            buf.advance(whole);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
    }
    writer.shutdown().await
}
