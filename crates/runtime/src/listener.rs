//! Listening sockets of both binaries (the proxy's client socket, the LB's front and back):
//! a unix socket or a TCP address, plus accepting from either kind.
//!
//! A unix socket file appears at its path with its mode already set (bound and chmod-ed in a
//! private directory first, then linked into place); an existing file there is replaced only
//! when it is a socket whose connect is refused (its process is gone), never a live or
//! unreachable one; the file is removed on drop.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Connecting to the socket at the path failed otherwise than refused (EAGAIN: a live
    /// socket with a full backlog; EACCES: one this process may not reach): it may be in
    /// use, so it is left in place.
    #[error("{path} may be in use (connecting to it failed); not replacing it")]
    MaybeInUse {
        /// The socket path.
        path: PathBuf,
        /// Why the connect failed.
        source: std::io::Error,
    },
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
    /// Binds `address`. A unix socket file left by a dead process (connecting to it is
    /// refused) is replaced; the new file appears with permissions `mode`.
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

/// Binds a unix socket at `path` with permissions `mode`, never exposing it at a looser mode
/// and never replacing a socket another process may still serve.
///
/// 1. Whatever is at `path` is probed ([`remove_stale`]): only a dead socket is removed.
/// 2. The socket is bound in a [`PrivateDir`] (mode 0700) beside `path` and given `mode`
///    there: while its mode is what the umask made it, no other user can reach it. The
///    process-wide umask is left alone (other threads create files meanwhile).
/// 3. It is hard-linked to `path`: it appears there with `mode` already set. Unlike
///    `rename`, a link never replaces a file that appeared at `path` since step 1.
/// 4. The private directory goes (on every path, by its guard).
async fn bind_unix(path: &Path, mode: u32) -> Result<Listener, BindError> {
    let io = |source| BindError::Io {
        addr: path.display().to_string(),
        source,
    };
    remove_stale(path).await?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(io)?;
    let private = PrivateDir::create(parent).map_err(io)?;
    let listener = private.bind().map_err(io)?;
    std::fs::set_permissions(private.socket(), std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    std::fs::hard_link(private.socket(), path).map_err(io)?;
    appeared(path);
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    drop(private);
    Ok(Listener::Unix(
        listener,
        SocketFile {
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
        },
    ))
}

/// Makes way for binding `path`: nothing there, or a socket file left by a dead process
/// (removed). Only a refused connection (ECONNREFUSED) proves a socket dead. Any other
/// failure to connect (EAGAIN from a live socket whose backlog is full, EACCES, ...) leaves
/// the file alone and is an error.
///
/// # Errors
/// [`BindError::InUse`], [`BindError::NotASocket`], [`BindError::MaybeInUse`], or
/// [`BindError::Io`] when the file cannot be examined or removed.
async fn remove_stale(path: &Path) -> Result<(), BindError> {
    let io = |source| BindError::Io {
        addr: path.display().to_string(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket(path.to_path_buf()));
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Err(BindError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
                _ => Ok(()),
            }
        }
        // Removed since it was examined: nothing to make way for.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BindError::MaybeInUse {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Longest path a unix socket can be bound at (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

// === impl PrivateDir ===

/// A directory of mode 0700 made beside a socket path (`.bind.<pid>.<n>`, in the same
/// directory so that a hard link can move the socket into place), holding the socket while
/// its mode is set. Removed with its content on drop.
#[derive(Debug)]
struct PrivateDir {
    dir: PathBuf,
}

impl PrivateDir {
    /// Makes a fresh private directory in `parent`.
    fn create(parent: &Path) -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = parent.join(format!(".bind.{}.{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                // The umask may only have narrowed 0700; the owner needs all of it.
                Ok(()) => {
                    let private = PrivateDir { dir };
                    std::fs::set_permissions(&private.dir, std::fs::Permissions::from_mode(0o700))?;
                    return Ok(private);
                }
                // Left by a killed process that had our pid: try the next name.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Where the socket is bound.
    fn socket(&self) -> PathBuf {
        self.dir.join("s")
    }

    /// Binds the socket. When its path is too long for a socket address (while the final
    /// path is not), it is bound through `/proc/self/fd/<dir>/s`, which names the same place.
    fn bind(&self) -> std::io::Result<tokio::net::UnixListener> {
        let socket = self.socket();
        if socket.as_os_str().len() <= MAX_SOCKET_PATH {
            return tokio::net::UnixListener::bind(&socket);
        }
        let dir = std::fs::File::open(&self.dir)?;
        tokio::net::UnixListener::bind(format!("/proc/self/fd/{}/s", dir.as_raw_fd()))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Tests: a look at a socket file the moment it appears at its path.
#[cfg(test)]
type AppearHook = Box<dyn FnMut(&Path)>;

#[cfg(test)]
thread_local! {
    /// Tests: called with the final path the moment a socket file appears there.
    static ON_APPEAR: std::cell::RefCell<Option<AppearHook>> =
        const { std::cell::RefCell::new(None) };
}

/// A socket file has just appeared at `path` (tests observe it there; a no-op otherwise).
fn appeared(_path: &Path) {
    #[cfg(test)]
    ON_APPEAR.with(|hook| {
        if let Some(hook) = hook.borrow_mut().as_mut() {
            hook(_path)
        }
    });
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

    /// The socket file never exists at its path with another mode than the one asked for,
    /// whatever the umask makes of a new socket (0755 under the usual 022).
    #[tokio::test]
    async fn socket_file_has_its_mode_the_moment_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o666] {
            let path = dir.path().join(format!("{mode:o}.sock"));
            let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let record = seen.clone();
            ON_APPEAR.with(|hook| {
                *hook.borrow_mut() = Some(Box::new(move |at: &Path| {
                    let meta = std::fs::symlink_metadata(at).unwrap();
                    record
                        .borrow_mut()
                        .push((at.to_path_buf(), meta.permissions().mode() & 0o777));
                }))
            });
            let bound = Listener::bind(&Address::Unix(path.clone()), mode).await;
            ON_APPEAR.with(|hook| hook.borrow_mut().take());
            let _listener = bound.unwrap();
            assert_eq!(*seen.borrow(), vec![(path.clone(), mode)]);
        }
    }

    #[tokio::test]
    async fn private_directory_is_gone_after_binding_and_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = Listener::bind(&Address::Unix(path.clone()), 0o600)
            .await
            .unwrap();
        let names = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(dir.path()), ["s.sock"]);
        let _client = connect(&Address::Unix(path.clone())).await.unwrap();
        assert!(
            listener.accept().await.is_ok(),
            "served through the final path"
        );
        // Whichever step after its creation fails, the guard removes the directory and the
        // socket name in it (the listener may live on).
        let private = PrivateDir::create(dir.path()).unwrap();
        let mode = std::fs::metadata(&private.dir)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        let _bound = private.bind().unwrap();
        assert!(private.socket().exists());
        drop(private);
        assert_eq!(names(dir.path()), ["s.sock"]);
    }

    /// A final path that fits a socket address while the private one beside it does not.
    #[tokio::test]
    async fn path_near_the_length_limit_binds() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().as_os_str().len() + 1;
        assert!(
            base < MAX_SOCKET_PATH - 10,
            "tempdir too deep: {}",
            dir.path().display()
        );
        let path = dir.path().join("x".repeat(MAX_SOCKET_PATH - base));
        assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH);
        let address = Address::Unix(path.clone());
        let listener = Listener::bind(&address, 0o600).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _client = connect(&address).await.unwrap();
        assert!(listener.accept().await.is_ok());
    }

    #[tokio::test]
    async fn live_socket_with_a_full_backlog_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        let socket = tokio::net::UnixSocket::new_stream().unwrap();
        socket.bind(&path).unwrap();
        let live = socket.listen(0).unwrap();
        let inode = std::fs::symlink_metadata(&path).unwrap().ino();
        // Connections never accepted, until a non-blocking connect is turned away (EAGAIN).
        let mut queued = Vec::new();
        let full = loop {
            assert!(queued.len() < 64, "backlog 0 never filled");
            match tokio::net::UnixStream::connect(&path).await {
                Ok(stream) => queued.push(stream),
                Err(e) => break e,
            }
        };
        assert_eq!(full.kind(), std::io::ErrorKind::WouldBlock, "{full}");
        let err = Listener::bind(&Address::Unix(path.clone()), 0o600)
            .await
            .expect_err("a live socket is never replaced");
        assert!(matches!(err, BindError::MaybeInUse { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(
            std::fs::symlink_metadata(&path).unwrap().ino(),
            inode,
            "not unlinked"
        );
        // The live listener still owns the path: it accepts what was queued, then a new
        // connection made through the path.
        let accept = || tokio::time::timeout(std::time::Duration::from_secs(5), live.accept());
        for _ in 0..queued.len() {
            accept().await.expect("queued connection").unwrap();
        }
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        accept().await.expect("new connection").unwrap();
    }
}
