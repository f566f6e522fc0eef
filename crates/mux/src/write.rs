//! Writes with a deadline on progress (CONTRACT section 9, `write_timeout_ms`): a peer that
//! accepts no byte of a pending write for that long is given up, while a large write that
//! moves steadily is never cut. Every socket writer of the proxy and the LB goes through
//! [`write_all`].

use std::time::Duration;

use futures_util::FutureExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Why a write did not complete.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The peer took no byte for the write timeout.
    #[error("peer accepted no byte for {0:?}")]
    Stalled(Duration),
    /// The socket failed or was closed.
    #[error("write failed: {0}")]
    Io(#[from] std::io::Error),
}

impl WriteError {
    /// Whether the peer stalled (as opposed to a closed or broken socket).
    pub fn is_stall(&self) -> bool {
        matches!(self, WriteError::Stalled(_))
    }
}

/// Writes all of `buf`; each chunk the socket takes restarts the `timeout` clock.
///
/// Most writes go out at once: those take no clock reading and no timer, and the future stays
/// small (an idle connection's task carries it). Only a write the socket does not take at once
/// goes on, boxed, with its deadline.
///
/// # Errors
/// [`WriteError::Stalled`] when no byte went out for `timeout`; [`WriteError::Io`] when the
/// socket fails (a write of 0 bytes counts as closed).
pub async fn write_all<W>(
    writer: &mut W,
    mut buf: &[u8],
    timeout: Duration,
) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
{
    while !buf.is_empty() {
        // Polled once: a write that is not ready wrote nothing (cancel-safe).
        match writer.write(buf).now_or_never() {
            None => return Box::pin(write_all_within(writer, buf, timeout)).await,
            Some(written) => buf = &buf[accepted(written)?..],
        }
    }
    Ok(())
}

/// The rest of [`write_all`], each step under `timeout`.
async fn write_all_within<W>(
    writer: &mut W,
    mut buf: &[u8],
    timeout: Duration,
) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
{
    while !buf.is_empty() {
        match tokio::time::timeout(timeout, writer.write(buf)).await {
            Err(_) => return Err(WriteError::Stalled(timeout)),
            Ok(written) => buf = &buf[accepted(written)?..],
        }
    }
    Ok(())
}

/// The bytes one write took; 0 means the socket is closed.
fn accepted(written: std::io::Result<usize>) -> Result<usize, WriteError> {
    match written? {
        0 => Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_nothing_stalls_the_write() {
        let (mut ours, _theirs) = tokio::io::duplex(1024);
        let err = write_all(&mut ours, &[0u8; 4096], Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.is_stall(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_steady_reader_is_not_cut() {
        let (mut ours, mut theirs) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut chunk = [0u8; 16];
            while got < 256 {
                // 1 s per 16 bytes: 16 s in all, each step under the 2 s timeout.
                tokio::time::sleep(Duration::from_secs(1)).await;
                got += theirs.read(&mut chunk).await.unwrap();
            }
        });
        write_all(&mut ours, &[1u8; 256], Duration::from_secs(2))
            .await
            .unwrap();
        reader.await.unwrap();
    }
}
