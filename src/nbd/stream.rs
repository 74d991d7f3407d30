//! A byte stream the server can serve on: TCP or Unix domain socket.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Socket operations the server needs beyond `Read + Write`.
pub trait Stream: Read + Write + Send {
    /// Another handle to the same socket (the reader and writer are separate).
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>>;
    /// Shuts down one or both directions, waking threads blocked on the socket.
    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()>;
    /// Sets the receive timeout (shared by all handles of the socket).
    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Sends from several buffers in one system call (`sendmsg`), without
    /// SIGPIPE when the peer has gone; returns the bytes sent.
    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

fn sendmsg_nosignal(fd: std::os::fd::BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
    let mut control = SendAncillaryBuffer::default();
    Ok(sendmsg(fd, bufs, &mut control, SendFlags::NOSIGNAL)?)
}

impl Stream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sendmsg_nosignal(std::os::fd::AsFd::as_fd(self), bufs)
    }
}

impl Stream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sendmsg_nosignal(std::os::fd::AsFd::as_fd(self), bufs)
    }
}
