//! What a WebSocket connection is carried on, and reading and writing it without
//! holding a buffer while idle.
//!
//! A plain TCP connection is taken back from hyper after the upgrade and used through
//! its readiness: the publisher's task writes a frame straight to it when nothing is
//! queued (`connection::Sink`), and the connection's task reads with `try_read` into a
//! buffer on its stack. Anything else — TLS, or one stream of an HTTP/2 connection
//! (RFC 8441) — is an `AsyncRead + AsyncWrite` with buffering of its own: only the
//! connection's task touches it, reading through `poll_read` and writing the same
//! pre-encoded frames through `poll_write_vectored` (the encryption, or the HTTP/2 DATA
//! framing, is then per connection; the WebSocket frame is still built once).

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::frame::{FrameReader, Incoming, Violation};

/// A byte stream a WebSocket can be served on.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// The connection a WebSocket was upgraded from.
pub enum Socket {
    /// Plain TCP (HTTP/1.1 upgrade without TLS).
    Tcp(TcpStream),
    /// TLS, or an HTTP/2 stream (extended CONNECT).
    Stream(Box<dyn Stream>),
}

/// A plain TCP connection, shared by the connection's task (both sides) and the queue's
/// direct path, with what the direct path needs to encode: one allocation for all three.
pub struct TcpConn {
    pub stream: TcpStream,
    /// The server state when this connection negotiated permessage-deflate.
    pub deflate: Option<crate::app::AppState>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl std::ops::Deref for TcpConn {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

/// The read side. (A stream's halves sit in a `Mutex` only to make the connection
/// `Sync`; they are reached through `&mut`, never locked.)
pub enum Rx {
    Tcp(Arc<TcpConn>),
    Stream(Mutex<ReadHalf<Box<dyn Stream>>>),
}

/// The write side.
pub enum Tx {
    Tcp(Arc<TcpConn>),
    Stream {
        w: Mutex<WriteHalf<Box<dyn Stream>>>,
        /// Bytes were written since the last flush (a TLS session holds records until
        /// flushed).
        unflushed: bool,
    },
}

/// What one read gave.
pub enum Read {
    Data,
    Eof,
    WouldBlock,
    Failed,
    Violation(Violation),
}

/// Reads per wake-up before other work gets a turn.
const READS_PER_TURN: usize = 8;
const READ_BUF: usize = 8192;

impl Socket {
    /// `deflate` and `metrics` go with a TCP connection, for its direct path.
    pub fn split(self, deflate: Option<crate::app::AppState>, metrics: &Arc<crate::metrics::Metrics>) -> (Rx, Tx) {
        match self {
            Socket::Tcp(stream) => {
                let s = Arc::new(TcpConn { stream, deflate, metrics: metrics.clone() });
                (Rx::Tcp(s.clone()), Tx::Tcp(s))
            }
            Socket::Stream(s) => {
                let (r, w) = tokio::io::split(s);
                (Rx::Stream(Mutex::new(r)), Tx::Stream { w: Mutex::new(w), unflushed: false })
            }
        }
    }
}

impl Rx {
    /// Reads what is there into the frame parser; pending until something is. The read
    /// buffer lives on this call's stack only: an idle connection holds none.
    pub fn poll_read(&mut self, cx: &mut Context<'_>, reader: &mut FrameReader, out: &mut Vec<Incoming>) -> Poll<Read> {
        match self {
            Rx::Tcp(s) => loop {
                if ready!(s.poll_read_ready(cx)).is_err() {
                    return Poll::Ready(Read::Failed);
                }
                match read_available(s, reader, out) {
                    // Readiness was stale: `try_read` cleared it, so the next poll waits.
                    Read::WouldBlock => continue,
                    r => return Poll::Ready(r),
                }
            },
            Rx::Stream(s) => {
                let mut buf = [0u8; READ_BUF];
                let mut got = false;
                for _ in 0..READS_PER_TURN {
                    let mut rb = ReadBuf::new(&mut buf);
                    match Pin::new(exclusive(s)).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                            return Poll::Ready(if got { Read::Data } else { Read::Eof });
                        }
                        Poll::Ready(Ok(())) => {
                            got = true;
                            if let Err(v) = reader.feed(rb.filled(), out) {
                                return Poll::Ready(Read::Violation(v));
                            }
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(Read::Failed),
                        Poll::Pending => break,
                    }
                }
                if got {
                    Poll::Ready(Read::Data)
                } else {
                    Poll::Pending
                }
            }
        }
    }

    /// Reads what is there now, without waiting.
    pub fn read_now(&mut self, cx: &mut Context<'_>, reader: &mut FrameReader, out: &mut Vec<Incoming>) -> Read {
        match self {
            Rx::Tcp(s) => read_available(s, reader, out),
            Rx::Stream(_) => match self.poll_read(cx, reader, out) {
                Poll::Ready(r) => r,
                Poll::Pending => Read::WouldBlock,
            },
        }
    }

    /// Reads and drops input until the peer closes its side (`Ready(Ok)`), for a clean
    /// close (see `Conn::flush_and_close`).
    pub fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut sink = [0u8; 4096];
        loop {
            match self {
                Rx::Tcp(s) => {
                    ready!(s.poll_read_ready(cx))?;
                    match s.try_read(&mut sink) {
                        Ok(0) => return Poll::Ready(Ok(())),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                Rx::Stream(s) => {
                    let mut rb = ReadBuf::new(&mut sink);
                    ready!(Pin::new(exclusive(s)).poll_read(cx, &mut rb))?;
                    if rb.filled().is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

/// Reads what a TCP socket has into the frame parser, without waiting.
fn read_available(rd: &TcpStream, reader: &mut FrameReader, out: &mut Vec<Incoming>) -> Read {
    let mut buf = [0u8; READ_BUF];
    let mut got = false;
    for _ in 0..READS_PER_TURN {
        match rd.try_read(&mut buf) {
            Ok(0) => return if got { Read::Data } else { Read::Eof },
            Ok(n) => {
                got = true;
                if let Err(v) = reader.feed(&buf[..n], out) {
                    return Read::Violation(v);
                }
                if n < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return Read::Failed,
        }
    }
    if got {
        Read::Data
    } else {
        Read::WouldBlock
    }
}

impl Tx {
    /// The TCP socket, for the direct write path.
    pub fn tcp(&self) -> Option<&Arc<TcpConn>> {
        match self {
            Tx::Tcp(s) => Some(s),
            Tx::Stream { .. } => None,
        }
    }

    /// Writes as much of `slices` as goes without waiting: `Ok(None)` when the socket
    /// would block (for a stream, `cx` is woken when it can take more).
    pub fn write_vectored(&mut self, cx: &mut Context<'_>, slices: &[IoSlice<'_>]) -> std::io::Result<Option<usize>> {
        let r = match self {
            Tx::Tcp(s) => match s.try_write_vectored(slices) {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => Err(e),
            },
            Tx::Stream { w, unflushed } => match Pin::new(exclusive(w)).poll_write_vectored(cx, slices) {
                Poll::Ready(Ok(n)) => {
                    *unflushed = true;
                    Ok(n)
                }
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => return Ok(None),
            },
        };
        match r {
            Ok(0) => Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => Ok(Some(n)),
            Err(e) => Err(e),
        }
    }

    /// Pushes out what a stream buffered: `Ok(true)` when done (always, for TCP).
    pub fn flush(&mut self, cx: &mut Context<'_>) -> std::io::Result<bool> {
        match self {
            Tx::Tcp(_) => Ok(true),
            Tx::Stream { unflushed: false, .. } => Ok(true),
            Tx::Stream { w, unflushed } => match Pin::new(exclusive(w)).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    *unflushed = false;
                    Ok(true)
                }
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => Ok(false),
            },
        }
    }

    /// Whether a stream still holds bytes it was not able to flush.
    pub fn unflushed(&self) -> bool {
        matches!(self, Tx::Stream { unflushed: true, .. })
    }

    /// Resolves when a TCP socket can take more (for a stream, the write itself waits:
    /// see `Conn::run`).
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Tx::Tcp(s) => s.poll_write_ready(cx),
            Tx::Stream { .. } => Poll::Pending,
        }
    }

    /// Ends the write side: FIN on TCP, `close_notify` and the end of the stream
    /// otherwise.
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Tx::Tcp(s) => Poll::Ready(socket2::SockRef::from(&s.stream).shutdown(std::net::Shutdown::Write)),
            Tx::Stream { w, .. } => Pin::new(exclusive(w)).poll_shutdown(cx),
        }
    }
}

fn exclusive<T>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(|p| p.into_inner())
}
