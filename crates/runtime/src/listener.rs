//! Listening sockets of both binaries (the proxy's client socket, the LB's front and back):
//! a unix socket (stale file of a dead process replaced, mode set, file removed on drop) or a
//! TCP address, plus accepting from either kind.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rpc_config::Address;

/// An accepted connection of either kind.
#[derive(Debug)]
pub enum Stream {
    /// From a unix socket.
    Unix(tokio::net::UnixStream),
    /// From a TCP socket (`TCP_NODELAY` set).
    Tcp(tokio::net::TcpStream),
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket; the guard removes its file on drop.
    Unix(tokio::net::UnixListener, SocketFile),
    /// A TCP socket.
    Tcp(tokio::net::TcpListener),
}

/// Errors binding the listener.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process is serving on the socket path.
    #[error("{0} is in use by a running process")]
    InUse(PathBuf),
    /// The path exists and is not a socket: refuse to delete it.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Any other I/O failure (the I/O error is the [`source`](std::error::Error::source), so
    /// print with `{:#}` through `anyhow` to see it).
    #[error("cannot listen on {addr}")]
    Io {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Removes the socket file on drop, if it is still the one this process created.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    inode: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.inode
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Listener {
    /// Binds `address`. A unix socket file left by a dead process is replaced; the new file
    /// gets permissions `mode`.
    ///
    /// # Errors
    /// [`BindError`].
    pub async fn bind(address: &Address, mode: u32) -> Result<Self, BindError> {
        match address {
            Address::Unix(path) => bind_unix(path, mode).await,
            Address::Tcp(addr) => tokio::net::TcpListener::bind(addr.as_str())
                .await
                .map(Listener::Tcp)
                .map_err(|source| BindError::Io {
                    addr: addr.clone(),
                    source,
                }),
        }
    }

    /// Accepts one connection.
    ///
    /// # Errors
    /// The accept failed (for example EMFILE); the listener stays usable.
    pub async fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept().await?.0)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
        }
    }

    /// The next connection, or `None` once `stop` is cancelled. A failed accept (EMFILE and
    /// friends) is logged and retried after 50 ms instead of spinning; `side` names the
    /// listener in that log line.
    pub async fn accept_until(
        &self,
        stop: &tokio_util::sync::CancellationToken,
        side: &'static str,
    ) -> Option<Stream> {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return None,
                accepted = self.accept() => match accepted {
                    Ok(stream) => return Some(stream),
                    Err(e) => {
                        tracing::warn!(error = %e, side, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// The bound address, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(_, file) => file.path.display().to_string(),
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        }
    }
}

async fn bind_unix(path: &Path, mode: u32) -> Result<Listener, BindError> {
    let io = |source| BindError::Io {
        addr: path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_path_buf()));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(BindError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    Ok(Listener::Unix(
        listener,
        SocketFile {
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
        },
    ))
}

/// Connects to `address` (unix path, or TCP with `TCP_NODELAY`).
///
/// # Errors
/// The connect failed.
pub async fn connect(address: &Address) -> std::io::Result<Stream> {
    match address {
        Address::Unix(path) => Ok(Stream::Unix(tokio::net::UnixStream::connect(path).await?)),
        Address::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr.as_str()).await?;
            stream.set_nodelay(true)?;
            Ok(Stream::Tcp(stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accept_until_returns_connections_then_none_once_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let address = Address::Unix(dir.path().join("a.sock"));
        let listener = Listener::bind(&address, 0o660).await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let _client = connect(&address).await.unwrap();
        assert!(listener.accept_until(&stop, "test").await.is_some());
        stop.cancel();
        assert!(listener.accept_until(&stop, "test").await.is_none());
    }

    #[tokio::test]
    async fn unix_socket_mode_stale_file_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A stale socket file: bound once, its listener gone.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let address = Address::Unix(path.clone());
        let listener = Listener::bind(&address, 0o640).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert!(matches!(
            Listener::bind(&address, 0o640).await,
            Err(BindError::InUse(_))
        ));
        drop(listener);
        assert!(!path.exists(), "socket file removed on drop");
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            Listener::bind(&address, 0o640).await,
            Err(BindError::NotASocket(_))
        ));
    }
}
