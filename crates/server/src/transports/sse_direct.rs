//! SSE streams served on the socket itself, outside hyper.
//!
//! A connection whose first bytes are `GET /sse?` (or `GET /sse `) — an `EventSource` or
//! `curl -N` on a fresh connection, the usual case — has its request head read and parsed
//! here, and the request goes through the same router as every other (the same
//! middleware, the same gate, the same handler). Its response is then written straight
//! to the socket: chunked for HTTP/1.1, delimited by the close for HTTP/1.0. hyper's
//! per-connection machinery (an 8 KB read and an 8 KB write buffer, held for the stream's
//! life) is never built, and a client that goes away is seen at once — its socket turns
//! readable with an end-of-file — instead of at the next keepalive write.
//!
//! Anything else, including an SSE request on a connection that already carried another
//! request, is hyper's, as before. The connection is closed when the response ends.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::{Body, HttpBody as _};
use axum::http::{HeaderName, HeaderValue, Method, Request, Response, Version};
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use tokio::net::TcpStream;

use crate::app::AppState;
use crate::error::{ApiError, Code};
use crate::limits::{ConnSlot, PeerAddr, TcpSlot};

/// How long a client has to send its request head (hyper's `header_read_timeout` too).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest head read here: the router's own limits (a 8 KiB target, 16 KiB of
/// headers) fit with room to spare, so those are what a client meets.
const MAX_HEAD: usize = 32 * 1024;
/// Header fields parsed (hyper's default too); more is `headers_too_large`.
const MAX_HEADERS: usize = 100;
/// Publications written in one system call at most.
const MAX_BATCH: usize = 64;

/// What a new connection starts with.
pub enum Sniffed {
    /// An SSE request: serve it with [`serve`].
    Sse,
    /// Anything else: hyper's.
    Other,
    /// Nothing within [`HEAD_TIMEOUT`], or the peer left: close it.
    Gone,
}

/// Looks at the first bytes of a new connection without consuming them.
pub async fn sniff(tcp: &TcpStream) -> Sniffed {
    let mut first = [0u8; 9];
    match tokio::time::timeout(HEAD_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => Sniffed::Gone,
        Ok(Ok(9)) if &first == b"GET /sse?" || &first == b"GET /sse " => Sniffed::Sse,
        Ok(Ok(_)) => Sniffed::Other,
    }
}

/// Serves one SSE request on `tcp`, then closes it.
pub async fn serve(mut tcp: TcpStream, app: Router, state: AppState, peer: SocketAddr, slot: Arc<ConnSlot>) {
    // The head, the routing and the handler are boxed: they are done with before the
    // stream starts, and a boxed future leaves nothing behind in the long-lived one.
    let response = match Box::pin(read_request(&mut tcp)).await {
        Ok(Some(mut req)) => {
            req.extensions_mut().insert(PeerAddr(peer));
            req.extensions_mut().insert(TcpSlot(slot));
            let version = req.version();
            let r = Box::pin(tower::ServiceExt::oneshot(app, req)).await;
            (version, r.unwrap_or_else(|never| match never {}))
        }
        Ok(None) => return,
        Err(e) => {
            state.metrics.error(e.code.as_str());
            (Version::HTTP_11, e.into_response())
        }
    };
    drop(state);
    let _ = write_response(&mut tcp, response.0, response.1).await;
    Box::pin(linger(tcp)).await;
}

/// Closes our side and reads what the client still sends for a moment, so the end of
/// the response is not lost to a reset from unread data.
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut scratch = [0u8; 512];
        while let Ok(1..) = tcp.read(&mut scratch).await {}
    })
    .await;
}

/// Reads and parses the request head. `Ok(None)`: the client left or was too slow.
async fn read_request(tcp: &mut TcpStream) -> Result<Option<Request<Body>>, ApiError> {
    let mut buf = Vec::with_capacity(4096);
    let len = match tokio::time::timeout(HEAD_TIMEOUT, read_head(tcp, &mut buf)).await {
        Ok(Ok(Some(len))) => len,
        Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return Ok(None),
    };
    if len > MAX_HEAD {
        return Err(ApiError::new(Code::HeadersTooLarge, "the request head is larger than 32 KiB"));
    }
    parse(&buf[..len]).map(Some)
}

/// Reads until the end of the head (`\r\n\r\n`): its length, or `usize::MAX` past
/// [`MAX_HEAD`]. Bytes after the head (a GET has no body) are ignored.
async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    use tokio::io::AsyncReadExt;
    let mut searched = 0;
    loop {
        if buf.len() > MAX_HEAD {
            return Ok(Some(usize::MAX));
        }
        buf.reserve(4096);
        if tcp.read_buf(buf).await? == 0 {
            return Ok(None);
        }
        if let Some(i) = buf[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(searched + i + 4));
        }
        searched = buf.len().saturating_sub(3);
    }
}

fn parse(head: &[u8]) -> Result<Request<Body>, ApiError> {
    let malformed = || ApiError::new(Code::InvalidRequest, "malformed HTTP request head");
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(malformed()),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::new(Code::HeadersTooLarge, format!("more than {MAX_HEADERS} header fields")));
        }
        Err(_) => return Err(malformed()),
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut req = Request::builder().method(Method::GET).version(version).uri(parsed.path.ok_or_else(malformed)?);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| malformed())?;
        req = req.header(name, HeaderValue::from_bytes(h.value).map_err(|_| malformed())?);
    }
    req.body(Body::empty()).map_err(|_| malformed())
}

/// How the body is delimited on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    Length,
    Chunked,
    /// HTTP/1.0 without a length: the close ends it.
    Close,
}

/// Writes the response, its body as it comes, and returns when it has ended or the
/// client has gone.
async fn write_response(tcp: &mut TcpStream, version: Version, response: Response<Body>) -> std::io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let length = body.size_hint().exact();
    let framing = match length {
        Some(_) => Framing::Length,
        None if version == Version::HTTP_11 => Framing::Chunked,
        None => Framing::Close,
    };
    let head = head(version, &parts, framing, length);
    drop(parts);
    write_all(tcp, &mut [IoSlice::new(&head)]).await?;
    drop(head);
    let mut pending: Vec<Bytes> = Vec::new();
    loop {
        tokio::select! {
            biased;
            frame = body.frame() => match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        pending.push(data);
                    }
                }
                Some(Err(_)) => return Ok(()),
                None => break,
            },
            r = tcp.readable() => {
                r?;
                // A client of an event stream sends nothing more: readable means it has
                // closed (or sent something to ignore).
                let mut scratch = [0u8; 64];
                match tcp.try_read(&mut scratch) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
        }
        // Whatever else is ready leaves in the same write.
        let mut ended = false;
        while pending.len() < MAX_BATCH {
            match body.frame().now_or_never() {
                Some(Some(Ok(f))) => {
                    if let Ok(data) = f.into_data() {
                        pending.push(data);
                    }
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                Some(Some(Err(_))) => return Ok(()),
                None => break,
            }
        }
        write_data(tcp, &pending, framing).await?;
        pending = Vec::new(); // idle streams hold no batch
        if ended {
            break;
        }
    }
    if framing == Framing::Chunked {
        write_all(tcp, &mut [IoSlice::new(b"0\r\n\r\n")]).await?;
    }
    Ok(())
}

/// The status line and header block, with this connection's framing and `close`.
fn head(version: Version, parts: &axum::http::response::Parts, framing: Framing, length: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let v = if version == Version::HTTP_10 { "HTTP/1.0" } else { "HTTP/1.1" };
    let status = parts.status;
    out.extend_from_slice(
        format!("{v} {} {}\r\n", status.as_str(), status.canonical_reason().unwrap_or("")).as_bytes(),
    );
    for (name, value) in parts.headers.iter() {
        if matches!(name.as_str(), "content-length" | "transfer-encoding" | "connection" | "date") {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("date: {}\r\n", httpdate::fmt_http_date(SystemTime::now())).as_bytes());
    match framing {
        Framing::Length => out.extend_from_slice(format!("content-length: {}\r\n", length.unwrap_or(0)).as_bytes()),
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Close => {}
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out
}

/// Writes a batch of body data: chunked, one chunk per piece, in one vectored write when
/// the socket takes it all.
async fn write_data(tcp: &mut TcpStream, pieces: &[Bytes], framing: Framing) -> std::io::Result<()> {
    let pieces: Vec<&Bytes> = pieces.iter().filter(|p| !p.is_empty()).collect();
    if pieces.is_empty() {
        return Ok(());
    }
    if framing != Framing::Chunked {
        let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        return write_all(tcp, &mut slices).await;
    }
    let sizes: Vec<String> = pieces.iter().map(|p| format!("{:x}\r\n", p.len())).collect();
    let mut slices = Vec::with_capacity(pieces.len() * 3);
    for (size, piece) in sizes.iter().zip(&pieces) {
        slices.push(IoSlice::new(size.as_bytes()));
        slices.push(IoSlice::new(piece));
        slices.push(IoSlice::new(b"\r\n"));
    }
    write_all(tcp, &mut slices).await
}

/// Writes every slice, waiting for the socket when it is full.
async fn write_all(tcp: &mut TcpStream, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        tcp.writable().await?;
        match tcp.try_write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_into_requests_the_router_can_take() {
        let req = parse(b"GET /sse?channel=a HTTP/1.0\r\nHost: x\r\nLast-Event-ID: e:1\r\n\r\n").unwrap();
        assert_eq!(req.version(), Version::HTTP_10);
        assert_eq!(req.uri().query(), Some("channel=a"));
        assert_eq!(req.headers()["last-event-id"], "e:1");
        assert_eq!(parse(b"GET /sse?a HTTP/1.1\r\nBad Header: x\r\n\r\n").unwrap_err().code, Code::InvalidRequest);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let head = format!("GET /sse?a HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse(head.as_bytes()).unwrap_err().code, Code::HeadersTooLarge);
    }
}
