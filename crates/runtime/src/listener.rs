//! Listening sockets of both binaries (the proxy's client socket, the LB's front and back):
//! a unix socket or a TCP address, plus accepting from either kind.
//!
//! A listener comes from one of three places:
//! - [`Listener::bind`]: a unix socket file appears at its path with its mode already set
//!   (bound and chmod-ed in a private directory first, then linked into place); an existing
//!   file there is replaced only when it is a socket whose connect is refused (its process is
//!   gone), never a live or unreachable one.
//! - [`Listener::take_over`] (`rpc_proxy --takeover`, a handover restart): bound the same
//!   way, then renamed over the path in one atomic step, live socket or not. New connects
//!   reach the new socket from that instant; those already queued on the old one stay there
//!   for the old process to serve.
//! - [`Listener::from_inherited`]: a socket passed by socket activation ([`Inherited`]). It
//!   belongs to the service manager, which keeps it open across restarts.
//!
//! Stopping ([`Listener::close`]): the socket file goes first, but only while it is still the
//! one this process made (same device and inode; after a takeover it is another process's),
//! so no new connect reaches the socket; then the connections already queued on it are
//! accepted without waiting and handed back to be served; then it closes. Nothing a client
//! connected is refused. An inherited socket is neither unlinked nor drained: its queue
//! outlives this process and is the next one's to serve. Dropping a listener instead of
//! closing it removes its file the same way, without draining.

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

/// A listening socket, bound by this process or inherited.
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    /// The unix socket file this process put at its path (`None` for TCP and inherited
    /// sockets): removed when the listener closes, if it is still the one there.
    file: Option<SocketFile>,
    /// Passed in by socket activation: never unlinked, never drained (see the module doc).
    inherited: bool,
}

/// The socket itself.
#[derive(Debug)]
enum Socket {
    Unix(tokio::net::UnixListener),
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
    /// A takeover of a TCP address: only a unix socket path can be renamed over.
    #[error("{0}: only a unix socket can be taken over, not a TCP address")]
    NotUnix(String),
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

/// At most this many connections are taken from the queue when a listener closes: a unix
/// socket gets none after its file is gone, but a TCP one may get new ones all along.
const MAX_DRAINED: usize = 8192;

// === impl Listener ===

impl Listener {
    /// Binds `address`. A unix socket file left by a dead process (connecting to it is
    /// refused) is replaced; the new file appears with permissions `mode`.
    ///
    /// # Errors
    /// [`BindError`].
    pub async fn bind(address: &Address, mode: u32) -> Result<Self, BindError> {
        match address {
            Address::Unix(path) => bind_unix(path, mode, Place::Link).await,
            Address::Tcp(addr) => tokio::net::TcpListener::bind(addr.as_str())
                .await
                .map(|l| Listener::new(Socket::Tcp(l), None))
                .map_err(|source| BindError::Io {
                    addr: addr.clone(),
                    source,
                }),
        }
    }

    /// Binds the unix socket `address` in place of whatever socket is at its path, live or
    /// not: bound and given `mode` beside the path, then renamed over it (atomic), so every
    /// connect from then on reaches this listener and none is refused meanwhile. The process
    /// that served the old socket keeps its queue and, on its stop, sees that the path is no
    /// longer its own (see the module doc). With nothing at the path it is a plain bind.
    ///
    /// # Errors
    /// [`BindError::NotUnix`] for a TCP address, [`BindError::NotASocket`] when the path
    /// holds anything but a socket, [`BindError::Io`].
    pub async fn take_over(address: &Address, mode: u32) -> Result<Self, BindError> {
        match address {
            Address::Unix(path) => bind_unix(path, mode, Place::Replace).await,
            Address::Tcp(addr) => Err(BindError::NotUnix(addr.clone())),
        }
    }

    /// Serves a socket passed by socket activation. Its path and mode are the service
    /// manager's; this process never unlinks it (see the module doc).
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// The socket cannot be made non-blocking or registered with the runtime.
    pub fn from_inherited(inherited: Inherited) -> std::io::Result<Self> {
        let socket = match inherited {
            Inherited::Unix(l) => {
                l.set_nonblocking(true)?;
                Socket::Unix(tokio::net::UnixListener::from_std(l)?)
            }
            Inherited::Tcp(l) => {
                l.set_nonblocking(true)?;
                Socket::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
        };
        Ok(Listener {
            socket,
            file: None,
            inherited: true,
        })
    }

    fn new(socket: Socket, file: Option<SocketFile>) -> Self {
        Listener {
            socket,
            file,
            inherited: false,
        }
    }

    /// Whether the socket came from socket activation ([`Listener::from_inherited`]).
    pub fn is_inherited(&self) -> bool {
        self.inherited
    }

    /// Accepts one connection.
    ///
    /// # Errors
    /// The accept failed (for example EMFILE); the listener stays usable.
    pub async fn accept(&self) -> std::io::Result<Stream> {
        match &self.socket {
            Socket::Unix(l) => Ok(Stream::Unix(l.accept().await?.0)),
            Socket::Tcp(l) => {
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

    /// Stops listening without refusing a connection that got in: removes the socket file
    /// while it is still this process's, accepts every connection already queued (without
    /// waiting for more), closes the socket and returns those connections, to be served like
    /// any other. An inherited socket is only closed here (this process's descriptor of it):
    /// its queue stays with the service manager for the next process, so nothing is returned.
    ///
    /// Must be called inside a tokio runtime.
    pub fn close(mut self) -> Vec<Stream> {
        if self.inherited {
            return Vec::new();
        }
        if let Some(file) = self.file.as_mut() {
            file.remove();
        }
        let drained = match self.socket {
            Socket::Unix(l) => drain(l.into_std(), |l| {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                Ok(Stream::Unix(tokio::net::UnixStream::from_std(s)?))
            }),
            Socket::Tcp(l) => drain(l.into_std(), |l| {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(tokio::net::TcpStream::from_std(s)?))
            }),
        };
        if !drained.is_empty() {
            tracing::debug!(
                connections = drained.len(),
                "accepted the connections queued at the stop"
            );
        }
        drained
    }

    /// The bound address, for logs.
    pub fn describe(&self) -> String {
        let address = match (&self.file, &self.socket) {
            (Some(file), _) => file.path.display().to_string(),
            (None, Socket::Unix(l)) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_default(),
            (None, Socket::Tcp(l)) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        };
        if self.inherited {
            format!("{address} (inherited)")
        } else {
            address
        }
    }
}

/// Accepts from a non-blocking `listener` (as `into_std` leaves it) until its queue is empty
/// (or [`MAX_DRAINED`]), then drops it: the socket closes.
fn drain<L>(
    listener: std::io::Result<L>,
    accept: impl Fn(&L) -> std::io::Result<Stream>,
) -> Vec<Stream> {
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the queued connections at the stop");
            return Vec::new();
        }
    };
    let mut drained = Vec::new();
    while drained.len() < MAX_DRAINED {
        match accept(&listener) {
            Ok(stream) => drained.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "accepting the queued connections at the stop failed");
                break;
            }
        }
    }
    drained
}

// === impl Inherited ===

/// A listening socket passed by socket activation (systemd's `.socket` units, or anything
/// speaking the same protocol): descriptor 3, named by `LISTEN_FDS` and `LISTEN_PID`.
#[derive(Debug)]
pub enum Inherited {
    /// A unix stream socket.
    Unix(std::os::unix::net::UnixListener),
    /// A TCP socket.
    Tcp(std::net::TcpListener),
}

impl Inherited {
    /// Takes the first socket passed by socket activation when `LISTEN_PID` is this process's
    /// pid and `LISTEN_FDS` is at least 1; `None` otherwise (then the binary binds its
    /// address itself). Whenever `LISTEN_FDS` was set, `LISTEN_PID`, `LISTEN_FDS` and
    /// `LISTEN_FDNAMES` are gone from the environment afterwards, ours or not, so no child
    /// ever takes them for its own. More than one socket passed: the first is used, the rest
    /// stay open unused (see [`InheritedFds::extra`]).
    ///
    /// Call it first thing in `main`, before any thread starts: it changes the environment,
    /// which is sound only while no other thread may read it.
    ///
    /// # Errors
    /// Descriptor 3 is not a stream socket (unix or TCP).
    pub fn from_env() -> std::io::Result<InheritedFds> {
        let ours = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            == Some(std::process::id());
        // Reads LISTEN_FDS and LISTEN_PID, then unsets both; `listenfd` also takes an absent
        // LISTEN_PID as ours, which `ours` above does not.
        let mut fds = listenfd::ListenFd::from_env();
        if std::env::var_os("LISTEN_FDNAMES").is_some() {
            // Documented to unset LISTEN_FDNAMES (with the two above, already gone) whatever
            // it returns; this crate cannot call `remove_var` itself (no unsafe code).
            let _ = sd_notify::listen_fds_with_names(true);
        }
        if !ours || fds.len() == 0 {
            return Ok(InheritedFds {
                socket: None,
                extra: 0,
            });
        }
        let extra = fds.len() - 1;
        let socket = match fds.take_unix_listener(0) {
            Ok(unix) => unix.map(Inherited::Unix),
            // Not a unix stream socket (left in place): TCP, then, or an error.
            Err(_) => fds.take_tcp_listener(0)?.map(Inherited::Tcp),
        };
        Ok(InheritedFds { socket, extra })
    }

    /// Where the socket listens: its unix path (empty for an unnamed one) or `ip:port`.
    pub fn address(&self) -> String {
        match self {
            Inherited::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_default(),
            Inherited::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        }
    }

    /// Whether this is the socket `address` names: the same unix path, or a TCP socket for a
    /// TCP address with the same port (its host may be a name, so only the port is sure).
    pub fn matches(&self, address: &Address) -> bool {
        match (self, address) {
            (Inherited::Unix(_), Address::Unix(path)) => Path::new(&self.address()) == path,
            (Inherited::Tcp(l), Address::Tcp(addr)) => {
                let port = addr
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                l.local_addr().ok().map(|a| a.port()) == port
            }
            _ => false,
        }
    }
}

/// What [`Inherited::from_env`] found.
#[derive(Debug)]
pub struct InheritedFds {
    /// The first socket passed, when there was one for this process.
    pub socket: Option<Inherited>,
    /// How many more were passed (left open, unused).
    pub extra: usize,
}

// === impl SocketFile ===

/// A unix socket file this process put at `path`; removed on drop (or by
/// [`Listener::close`]) if it is still the one there.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    /// Device and inode of the file this process put there: a file at `path` with others
    /// is another process's (a takeover renamed its own over ours). `None` once removed.
    inode: Option<(u64, u64)>,
}

impl SocketFile {
    /// Removes the file if it is still ours; then never again.
    ///
    /// The check and the unlink are two steps: a takeover renaming its socket over the path
    /// between them would lose its file. `control_proxy.sh restart` stops the old process
    /// only once the path has changed, so this cannot happen there.
    fn remove(&mut self) {
        let Some(inode) = self.inode.take() else {
            return;
        };
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == inode
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// How a socket bound in its private directory is put at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Hard-linked: never replaces a file (a dead socket was removed first).
    Link,
    /// Renamed over whatever socket is there, live or not (a takeover).
    Replace,
}

/// Binds a unix socket at `path` with permissions `mode`, never exposing it at a looser mode
/// and, placed with [`Place::Link`], never replacing a socket another process may still serve.
///
/// 1. Whatever is at `path` is probed: with [`Place::Link`] only a dead socket is removed
///    ([`remove_stale`]); with [`Place::Replace`] anything but a socket is refused.
/// 2. The socket is bound in a [`PrivateDir`] (mode 0700) beside `path` and given `mode`
///    there: while its mode is what the umask made it, no other user can reach it. The
///    process-wide umask is left alone (other threads create files meanwhile).
/// 3. [`Place::Link`]: it is hard-linked to `path`, where it appears with `mode` already
///    set; unlike `rename`, a link never replaces a file that appeared at `path` since
///    step 1. [`Place::Replace`]: it is renamed over `path`, which never stops naming a
///    socket that accepts (the old one until the rename, this one after it).
/// 4. The private directory goes (on every path, by its guard).
async fn bind_unix(path: &Path, mode: u32, place: Place) -> Result<Listener, BindError> {
    let io = |source| BindError::Io {
        addr: path.display().to_string(),
        source,
    };
    match place {
        Place::Link => remove_stale(path).await?,
        Place::Replace => refuse_non_socket(path)?,
    }
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(io)?;
    let private = PrivateDir::create(parent).map_err(io)?;
    let listener = private.bind().map_err(io)?;
    std::fs::set_permissions(private.socket(), std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    // Read before the file is placed (a link or a rename keeps the inode): once it is at
    // `path` nothing may fail, or a takeover would leave a dead socket there.
    let meta = std::fs::symlink_metadata(private.socket()).map_err(io)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        inode: Some((meta.dev(), meta.ino())),
    };
    match place {
        Place::Link => std::fs::hard_link(private.socket(), path).map_err(io)?,
        Place::Replace => std::fs::rename(private.socket(), path).map_err(io)?,
    }
    appeared(path);
    drop(private);
    Ok(Listener::new(Socket::Unix(listener), Some(file)))
}

/// A takeover replaces a socket, live or dead, and nothing else.
///
/// # Errors
/// [`BindError::NotASocket`], or [`BindError::Io`] when the path cannot be examined.
fn refuse_non_socket(path: &Path) -> Result<(), BindError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(_) => Err(BindError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BindError::Io {
            addr: path.display().to_string(),
            source,
        }),
    }
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
            // A takeover puts its own socket there the same way.
            let taken = Listener::take_over(&Address::Unix(path.clone()), mode).await;
            ON_APPEAR.with(|hook| hook.borrow_mut().take());
            let (_listener, _taken) = (bound.unwrap(), taken.unwrap());
            assert_eq!(*seen.borrow(), vec![(path.clone(), mode); 2]);
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

    fn inode(path: &Path) -> (u64, u64) {
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.dev(), meta.ino())
    }

    /// A client that connected (and sent its call) without being accepted yet.
    async fn queued_client(path: &Path, call: &[u8]) -> tokio::net::UnixStream {
        use tokio::io::AsyncWriteExt;
        let mut client = tokio::net::UnixStream::connect(path).await.unwrap();
        client.write_all(call).await.unwrap();
        client
    }

    /// Reads what a client sent on a connection taken from the queue.
    async fn sent(stream: Stream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let Stream::Unix(mut stream) = stream else {
            panic!("a unix connection")
        };
        let mut buf = [0u8; 16];
        let n = stream.read(&mut buf).await.unwrap();
        buf[..n].to_vec()
    }

    #[tokio::test]
    async fn close_unlinks_first_then_hands_back_the_queued_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = Listener::bind(&Address::Unix(path.clone()), 0o600)
            .await
            .unwrap();
        let _a = queued_client(&path, b"a").await;
        let _b = queued_client(&path, b"b").await;
        let queued = listener.close();
        assert!(!path.exists(), "socket file removed");
        assert_eq!(queued.len(), 2, "both queued connections handed back");
        let mut got = Vec::new();
        for stream in queued {
            got.push(sent(stream).await);
        }
        assert_eq!(got, [b"a".to_vec(), b"b".to_vec()]);
        assert!(tokio::net::UnixStream::connect(&path).await.is_err());
    }

    /// The handover of `rpc_proxy --takeover`: the path moves to the new socket in one step,
    /// the old listener keeps what was queued on it, and closing it leaves the new file alone.
    #[tokio::test]
    async fn takeover_moves_the_path_and_the_old_listener_serves_its_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let address = Address::Unix(path.clone());
        let old = Listener::bind(&address, 0o600).await.unwrap();
        let old_inode = inode(&path);
        let _queued = queued_client(&path, b"old").await;

        let new = Listener::take_over(&address, 0o640).await.unwrap();
        assert_ne!(inode(&path), old_inode, "the path names the new socket");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let new_inode = inode(&path);
        let _fresh = queued_client(&path, b"new").await;

        let drained = old.close();
        assert_eq!(drained.len(), 1, "the old queue is the old listener's");
        assert_eq!(sent(drained.into_iter().next().unwrap()).await, b"old");
        assert_eq!(
            inode(&path),
            new_inode,
            "the old listener never unlinks the new file"
        );
        assert_eq!(sent(new.accept().await.unwrap()).await, b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no private directory left: {names:?}");

        drop(new);
        assert!(!path.exists(), "the new listener removes its own file");
    }

    #[tokio::test]
    async fn takeover_with_nothing_there_binds_and_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = Listener::take_over(&Address::Unix(path.clone()), 0o600)
            .await
            .unwrap();
        let _client = queued_client(&path, b"x").await;
        assert_eq!(sent(listener.accept().await.unwrap()).await, b"x");
        drop(listener);

        std::fs::write(&path, b"data").unwrap();
        let err = Listener::take_over(&Address::Unix(path.clone()), 0o600)
            .await
            .unwrap_err();
        assert!(matches!(err, BindError::NotASocket(_)), "{err:?}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");

        let err = Listener::take_over(&Address::Tcp("127.0.0.1:1".into()), 0o600)
            .await
            .unwrap_err();
        assert!(matches!(err, BindError::NotUnix(_)), "{err:?}");
    }

    /// Socket activation: the socket is the holder's (systemd's). Closing this process's
    /// listener neither unlinks it nor takes its queue, which the next process serves.
    #[tokio::test]
    async fn inherited_socket_is_neither_unlinked_nor_drained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let holder = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let inherited = Inherited::Unix(holder.try_clone().unwrap());
        assert!(inherited.matches(&Address::Unix(path.clone())));
        assert!(!inherited.matches(&Address::Unix(dir.path().join("other.sock"))));
        assert!(!inherited.matches(&Address::Tcp("127.0.0.1:1".into())));
        let listener = Listener::from_inherited(inherited).unwrap();
        assert!(listener.is_inherited());
        assert_eq!(
            listener.describe(),
            format!("{} (inherited)", path.display())
        );

        let _served = queued_client(&path, b"1").await;
        assert_eq!(sent(listener.accept().await.unwrap()).await, b"1");
        let _waiting = queued_client(&path, b"2").await;
        assert!(
            listener.close().is_empty(),
            "the queue is left to the next process"
        );
        assert!(path.exists(), "an inherited socket file is never removed");

        // The next process gets the connection that waited.
        let next = Listener::from_inherited(Inherited::Unix(holder)).unwrap();
        assert_eq!(sent(next.accept().await.unwrap()).await, b"2");
        drop(next);
        assert!(path.exists());
    }

    #[tokio::test]
    async fn inherited_tcp_socket_matches_its_port() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let inherited = Inherited::Tcp(holder);
        assert!(inherited.matches(&Address::Tcp(format!("localhost:{port}"))));
        assert!(!inherited.matches(&Address::Tcp(format!("127.0.0.1:{}", port ^ 1))));
        let listener = Listener::from_inherited(inherited).unwrap();
        let _client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        assert!(matches!(listener.accept().await.unwrap(), Stream::Tcp(_)));
    }
}
