//! Where clients come in: binds the proxy's unix socket (stale file replaced, mode set) or
//! TCP address, and accepts connections under a connection limit. Sits in front of
//! [`crate::connection`].

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rpc_config::Address;

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
    /// Any other I/O failure.
    #[error("cannot listen on {addr}: {source}")]
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
