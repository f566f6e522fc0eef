//! The worker's socket to its LB: a unix or TCP stream dialled at the LB's `back_address`,
//! split into a reader (taken in turns by the pool threads and the connection thread), a writer
//! (shared by ping echoes, STOP and replies) and a control handle that can shut the socket down while another
//! thread is blocked on it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::protocol::Address;

/// A connected socket, unix or TCP.
#[derive(Debug)]
pub enum Stream {
    /// A unix socket connection.
    Unix(UnixStream),
    /// A TCP connection (with `TCP_NODELAY`: frames are written whole).
    Tcp(TcpStream),
}

// === impl Stream ===

impl Stream {
    /// Connects to `address`, giving up on a TCP address after `timeout` per resolved address.
    ///
    /// # Errors
    /// The connect error (of the last address tried, for TCP).
    pub fn connect(address: &Address, timeout: Duration) -> io::Result<Self> {
        match address {
            Address::Unix(path) => UnixStream::connect(path).map(Self::Unix),
            Address::Tcp(host_port) => {
                let mut last = io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{host_port} resolves to no address"),
                );
                for addr in host_port.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(stream) => {
                            stream.set_nodelay(true)?;
                            return Ok(Self::Tcp(stream));
                        }
                        Err(err) => last = err,
                    }
                }
                Err(last)
            }
        }
    }

    /// Another handle on the same socket.
    ///
    /// # Errors
    /// The OS error of `dup`.
    pub fn try_clone(&self) -> io::Result<Self> {
        match self {
            Self::Unix(stream) => stream.try_clone().map(Self::Unix),
            Self::Tcp(stream) => stream.try_clone().map(Self::Tcp),
        }
    }

    /// Bounds every blocking read (shared by all handles of the socket).
    ///
    /// # Errors
    /// The OS error of `setsockopt`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.set_read_timeout(timeout),
            Self::Tcp(stream) => stream.set_read_timeout(timeout),
        }
    }

    /// Bounds every blocking write that makes no progress (shared by all handles).
    ///
    /// # Errors
    /// The OS error of `setsockopt`.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.set_write_timeout(timeout),
            Self::Tcp(stream) => stream.set_write_timeout(timeout),
        }
    }

    /// Shuts down one or both directions; blocked readers and writers on other handles wake.
    /// Errors (the socket is already gone) are ignored: this is cleanup.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Self::Unix(stream) => stream.shutdown(how),
            Self::Tcp(stream) => stream.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(stream) => stream.read(buf),
            Self::Tcp(stream) => stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(stream) => stream.write(buf),
            Self::Tcp(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.flush(),
            Self::Tcp(stream) => stream.flush(),
        }
    }
}

/// Whether a read error only means "nothing arrived within the read timeout".
pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
