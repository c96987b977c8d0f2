//! RFC 6455 framing: a parser for client frames and builders for server frames.
//!
//! Server frames are unmasked, so one built frame serves every subscriber. The parser keeps
//! no buffer while the connection is idle: bytes are only held while a frame is
//! incomplete.

use bytes::{BufMut, Bytes, BytesMut};

use super::deflate;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes (docs/protocol.md has the table).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const SLOW_CONSUMER: u16 = 4000;
    pub const HEARTBEAT_TIMEOUT: u16 = 4001;
    pub const TOKEN_INVALID: u16 = 4100;
    pub const TOKEN_EXPIRED: u16 = 4101;
    pub const DISCONNECTED: u16 = 4102;
}

/// A server frame with FIN set.
pub fn frame(opcode: u8, rsv1: bool, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 10);
    b.put_u8(0x80 | if rsv1 { 0x40 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => b.put_u8(n as u8),
        n if n <= u16::MAX as usize => {
            b.put_u8(126);
            b.put_u16(n as u16);
        }
        n => {
            b.put_u8(127);
            b.put_u64(n as u64);
        }
    }
    b.put_slice(payload);
    b.freeze()
}

pub fn text(payload: &[u8]) -> Bytes {
    frame(OP_TEXT, false, payload)
}

/// A text frame, compressed when that makes it smaller and `deflate` was negotiated.
pub fn text_maybe_deflated(payload: &[u8], deflate: bool) -> Bytes {
    data_maybe_deflated(OP_TEXT, payload, deflate)
}

/// A text or binary frame, compressed when that makes it smaller and `deflate` was
/// negotiated.
pub fn data_maybe_deflated(opcode: u8, payload: &[u8], deflate: bool) -> Bytes {
    if deflate && payload.len() >= 64 {
        let z = deflate::compress(payload);
        if z.len() < payload.len() {
            return frame(opcode, true, &z);
        }
    }
    frame(opcode, false, payload)
}

pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    // Control frames carry at most 125 bytes: 2 for the code, 123 for the reason.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OP_CLOSE, false, &p)
}

pub const PING: &[u8] = &[0x80 | OP_PING, 0];

/// What the peer sent, as complete messages.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    /// Only in conformance (echo) mode; the protocol itself refuses binary (1003).
    Binary(Vec<u8>),
    Ping(Bytes),
    Pong,
    /// The peer's close frame: its code (if any) and reason.
    Close(Option<u16>),
}

/// Why the connection must be closed, with the code to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

struct Partial {
    compressed: bool,
    binary: bool,
    data: Vec<u8>,
}

/// Incremental parser of client frames.
pub struct FrameReader {
    buf: Vec<u8>,
    /// Boxed: a fragmented message is rare, and idle connections keep this reader.
    partial: Option<Box<Partial>>,
    max_message: usize,
    deflate: bool,
    closed: bool,
    allow_binary: bool,
    /// Bytes copied into or within `buf` (tests check that feeding is linear).
    #[cfg(test)]
    copied: usize,
}

impl FrameReader {
    pub fn new(max_message: usize, deflate: bool) -> Self {
        FrameReader {
            buf: Vec::new(),
            partial: None,
            max_message,
            deflate,
            closed: false,
            allow_binary: false,
            #[cfg(test)]
            copied: 0,
        }
    }

    /// Accepts binary messages (the conformance echo endpoint).
    pub fn allowing_binary(mut self) -> Self {
        self.allow_binary = true;
        self
    }

    /// Bytes held for incomplete frames or messages.
    pub fn buffered(&self) -> usize {
        self.buf.capacity() + self.partial.as_ref().map_or(0, |p| p.data.capacity())
    }

    /// Parses `input`, appending complete messages to `out`. After a close frame nothing
    /// more is parsed.
    ///
    /// Linear in what arrives: a large frame trickling in over many reads is appended to
    /// the buffer once, not copied again on every read, and complete frames are parsed
    /// straight from `input` when nothing is pending.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Incoming>) -> Result<(), Violation> {
        if self.closed {
            return Ok(());
        }
        if self.buf.is_empty() {
            let consumed = self.parse(input, out)?;
            if consumed < input.len() {
                self.buf.extend_from_slice(&input[consumed..]);
                #[cfg(test)]
                {
                    self.copied += input.len() - consumed;
                }
            }
            return Ok(());
        }
        self.buf.extend_from_slice(input);
        #[cfg(test)]
        {
            self.copied += input.len();
        }
        let mut data = std::mem::take(&mut self.buf);
        let consumed = self.parse(&data, out)?;
        if consumed == data.len() {
            // An idle connection holds no buffer.
            return Ok(());
        }
        // Each byte is shifted at most once: what stays is one incomplete frame.
        if consumed > 0 {
            data.drain(..consumed);
            #[cfg(test)]
            {
                self.copied += data.len();
            }
        }
        if data.capacity() > 4 * data.len() + 64 * 1024 {
            data.shrink_to_fit();
        }
        self.buf = data;
        Ok(())
    }

    fn parse(&mut self, data: &[u8], out: &mut Vec<Incoming>) -> Result<usize, Violation> {
        let mut pos = 0;
        while !self.closed {
            let avail = &data[pos..];
            if avail.len() < 2 {
                break;
            }
            let (b0, b1) = (avail[0], avail[1]);
            let fin = b0 & 0x80 != 0;
            let rsv1 = b0 & 0x40 != 0;
            let opcode = b0 & 0x0F;
            let masked = b1 & 0x80 != 0;
            let len7 = (b1 & 0x7F) as usize;
            if b0 & 0x30 != 0 {
                return Err(violation(close::PROTOCOL_ERROR, "reserved bits set"));
            }
            if !matches!(opcode, OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
                return Err(violation(close::PROTOCOL_ERROR, "reserved opcode"));
            }
            let control = opcode & 0x8 != 0;
            if control && (!fin || len7 > 125) {
                return Err(violation(close::PROTOCOL_ERROR, "fragmented or oversize control frame"));
            }
            if rsv1 && !(self.deflate && (opcode == OP_TEXT || opcode == OP_BINARY)) {
                return Err(violation(close::PROTOCOL_ERROR, "RSV1 set without permessage-deflate"));
            }
            if !masked {
                return Err(violation(close::PROTOCOL_ERROR, "client frames must be masked"));
            }
            let (len, ext) = match len7 {
                126 => {
                    if avail.len() < 4 {
                        break;
                    }
                    (u16::from_be_bytes([avail[2], avail[3]]) as u64, 2)
                }
                127 => {
                    if avail.len() < 10 {
                        break;
                    }
                    let n = u64::from_be_bytes(avail[2..10].try_into().expect("8 bytes"));
                    if n >> 63 != 0 {
                        return Err(violation(close::PROTOCOL_ERROR, "frame length has its top bit set"));
                    }
                    (n, 8)
                }
                n => (n as u64, 0),
            };
            // Refuse oversize messages from the header, before buffering them.
            let so_far = self.partial.as_ref().map_or(0, |p| p.data.len()) as u64;
            if !control && so_far + len > self.max_message as u64 {
                return Err(violation(close::TOO_BIG, "message too big"));
            }
            let header = 2 + ext + 4;
            let len = len as usize;
            if avail.len() < header + len {
                break;
            }
            let mask = [avail[2 + ext], avail[3 + ext], avail[4 + ext], avail[5 + ext]];
            let mut payload = avail[header..header + len].to_vec();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i & 3];
            }
            pos += header + len;
            match opcode {
                OP_PING => out.push(Incoming::Ping(Bytes::from(payload))),
                OP_PONG => out.push(Incoming::Pong),
                OP_CLOSE => {
                    out.push(Incoming::Close(parse_close(&payload)?));
                    self.closed = true;
                }
                OP_CONT => {
                    let Some(p) = self.partial.as_mut() else {
                        return Err(violation(close::PROTOCOL_ERROR, "continuation frame without a message"));
                    };
                    p.data.extend_from_slice(&payload);
                    if fin {
                        let p = self.partial.take().expect("checked above");
                        out.push(self.finish(*p)?);
                    }
                }
                _ => {
                    if self.partial.is_some() {
                        return Err(violation(close::PROTOCOL_ERROR, "new message before the previous one ended"));
                    }
                    if opcode == OP_BINARY && !self.allow_binary {
                        return Err(violation(
                            close::UNSUPPORTED_DATA,
                            "binary frames are not supported; send JSON text",
                        ));
                    }
                    let p = Partial { compressed: rsv1, binary: opcode == OP_BINARY, data: payload };
                    if fin {
                        out.push(self.finish(p)?);
                    } else {
                        self.partial = Some(Box::new(p));
                    }
                }
            }
        }
        Ok(pos)
    }

    fn finish(&self, p: Partial) -> Result<Incoming, Violation> {
        let data = if p.compressed {
            deflate::decompress(&p.data, self.max_message).map_err(|e| match e {
                deflate::InflateError::TooBig => violation(close::TOO_BIG, "message too big"),
                deflate::InflateError::Corrupt => violation(close::PROTOCOL_ERROR, "invalid compressed data"),
            })?
        } else {
            p.data
        };
        if p.binary {
            return Ok(Incoming::Binary(data));
        }
        String::from_utf8(data)
            .map(Incoming::Text)
            .map_err(|_| violation(close::INVALID_PAYLOAD, "text message is not valid UTF-8"))
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(violation(close::PROTOCOL_ERROR, "close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(violation(close::PROTOCOL_ERROR, "invalid close code"));
            }
            std::str::from_utf8(&payload[2..])
                .map_err(|_| violation(close::INVALID_PAYLOAD, "close reason is not valid UTF-8"))?;
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
mod linear {
    use super::*;

    fn masked_text(len: usize) -> Vec<u8> {
        let mut f = vec![0x81, 0x80 | 127];
        f.extend_from_slice(&(len as u64).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend(std::iter::repeat_n(b'a', len));
        f
    }

    #[test]
    fn a_large_frame_in_small_reads_is_parsed_in_linear_time() {
        // 8 MiB in 1 KiB reads: quadratic copying would move ~32 GB; linear moves ~8 MB.
        let len = 8 << 20;
        let frame = masked_text(len);
        let mut r = FrameReader::new(len + 16, false);
        let mut out = Vec::new();
        for chunk in frame.chunks(1024) {
            r.feed(chunk, &mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Incoming::Text(t) if t.len() == len));
        assert_eq!(r.buffered(), 0, "nothing held once the frame is complete");
        assert!(r.copied <= frame.len(), "{} bytes copied to parse a {}-byte frame", r.copied, frame.len());
    }

    #[test]
    fn frames_split_anywhere_parse_the_same() {
        let mut stream = Vec::new();
        for n in [0usize, 1, 125, 126, 127, 300, 70_000] {
            let mut f = vec![0x81];
            match n {
                n if n < 126 => f.push(0x80 | n as u8),
                n if n <= u16::MAX as usize => {
                    f.push(0x80 | 126);
                    f.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    f.push(0x80 | 127);
                    f.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            f.extend_from_slice(&[1, 2, 3, 4]);
            f.extend((0..n).map(|i| b'a' ^ [1u8, 2, 3, 4][i & 3]));
            stream.extend(f);
        }
        for step in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut r = FrameReader::new(1 << 20, false);
            let mut out = Vec::new();
            for chunk in stream.chunks(step) {
                r.feed(chunk, &mut out).unwrap();
            }
            let lens: Vec<usize> = out
                .iter()
                .map(|m| match m {
                    Incoming::Text(t) => t.len(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(lens, vec![0, 1, 125, 126, 127, 300, 70_000], "step {step}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut v = vec![first];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n < 65536 => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        v
    }

    fn parse_all(input: &[u8]) -> Result<Vec<Incoming>, Violation> {
        let mut r = FrameReader::new(1000, false);
        let mut out = vec![];
        r.feed(input, &mut out)?;
        Ok(out)
    }

    #[test]
    fn parses_masked_text_byte_by_byte() {
        let f = client(0x81, b"hello");
        let mut r = FrameReader::new(1000, false);
        let mut out = vec![];
        for b in &f {
            r.feed(&[*b], &mut out).unwrap();
        }
        assert_eq!(out, vec![Incoming::Text("hello".into())]);
        assert_eq!(r.buffered(), 0, "an idle reader must hold no buffer");
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control_frames() {
        let mut input = client(0x01, b"hel");
        input.extend(client(0x89, b"p"));
        input.extend(client(0x80, b"lo"));
        assert_eq!(
            parse_all(&input).unwrap(),
            vec![Incoming::Ping(Bytes::from_static(b"p")), Incoming::Text("hello".into())]
        );
    }

    #[test]
    fn violations_get_the_rfc_close_codes() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        assert_eq!(parse_all(&unmasked).unwrap_err().code, close::PROTOCOL_ERROR);
        assert_eq!(parse_all(&client(0xC1, b"x")).unwrap_err().code, close::PROTOCOL_ERROR, "RSV1 without deflate");
        assert_eq!(parse_all(&client(0xA1, b"x")).unwrap_err().code, close::PROTOCOL_ERROR, "RSV2");
        assert_eq!(parse_all(&client(0x83, b"x")).unwrap_err().code, close::PROTOCOL_ERROR, "reserved opcode");
        assert_eq!(parse_all(&client(0x09, b"x")).unwrap_err().code, close::PROTOCOL_ERROR, "fragmented ping");
        assert_eq!(parse_all(&client(0x89, &[0; 126])).unwrap_err().code, close::PROTOCOL_ERROR, "long ping");
        assert_eq!(parse_all(&client(0x80, b"x")).unwrap_err().code, close::PROTOCOL_ERROR, "lone continuation");
        let mut two = client(0x01, b"a");
        two.extend(client(0x81, b"b"));
        assert_eq!(parse_all(&two).unwrap_err().code, close::PROTOCOL_ERROR, "interrupted message");
        assert_eq!(parse_all(&client(0x82, b"x")).unwrap_err().code, close::UNSUPPORTED_DATA);
        assert_eq!(parse_all(&client(0x81, &[0xff, 0xfe])).unwrap_err().code, close::INVALID_PAYLOAD);
        assert_eq!(parse_all(&client(0x81, &[b'a'; 1001])).unwrap_err().code, close::TOO_BIG);
        assert_eq!(parse_all(&client(0x88, &[3])).unwrap_err().code, close::PROTOCOL_ERROR);
        assert_eq!(parse_all(&client(0x88, &[0x03, 0xEC])).unwrap_err().code, close::PROTOCOL_ERROR, "close 1004");
        assert_eq!(parse_all(&client(0x88, &[0x03, 0xE8, 0xff])).unwrap_err().code, close::INVALID_PAYLOAD);
    }

    #[test]
    fn oversize_messages_are_refused_from_the_header_alone() {
        // Only the header of a 2 GB frame: refused without waiting for the payload.
        let mut f = vec![0x81, 0x80 | 127];
        f.extend_from_slice(&(2u64 << 30).to_be_bytes());
        assert_eq!(parse_all(&f).unwrap_err().code, close::TOO_BIG);
        let mut parts = client(0x01, &[b'a'; 600]);
        parts.extend(client(0x80, &[b'a'; 600]));
        assert_eq!(parse_all(&parts).unwrap_err().code, close::TOO_BIG, "too big across fragments");
    }

    #[test]
    fn close_frames_are_parsed_and_end_parsing() {
        let mut input = client(0x88, &[0x03, 0xE8, b'o', b'k']);
        input.extend(client(0x81, b"after"));
        assert_eq!(parse_all(&input).unwrap(), vec![Incoming::Close(Some(1000))]);
        assert_eq!(parse_all(&client(0x88, b"")).unwrap(), vec![Incoming::Close(None)]);
    }

    #[test]
    fn compressed_messages_are_inflated_when_negotiated() {
        let z = deflate::compress(b"{\"cmd\":\"ping\",\"id\":1}");
        let mut r = FrameReader::new(1000, true);
        let mut out = vec![];
        r.feed(&client(0xC1, &z), &mut out).unwrap();
        assert_eq!(out, vec![Incoming::Text("{\"cmd\":\"ping\",\"id\":1}".into())]);
        let bomb = deflate::compress(&[b'a'; 5000]);
        assert_eq!(r.feed(&client(0xC1, &bomb), &mut out).unwrap_err().code, close::TOO_BIG);
    }

    #[test]
    fn server_frames_use_the_shortest_length_encoding() {
        assert_eq!(&text(b"hi")[..2], &[0x81, 2]);
        assert_eq!(&text(&[0; 200])[..4], &[0x81, 126, 0, 200]);
        assert_eq!(&text(&[0; 70000])[..2], &[0x81, 127]);
        assert_eq!(close_frame(1001, "bye")[..], [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']);
    }
}
