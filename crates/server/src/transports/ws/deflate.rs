//! permessage-deflate (RFC 7692) with no context takeover in either direction: every
//! message is compressed on its own, so a publication is compressed once and the same
//! bytes go to every subscriber, and no connection keeps a compressor or a window.

use flate2::{Compress, Compression, FlushCompress};

/// The extension response the server sends when it accepts an offer.
pub const RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Picks an acceptable `permessage-deflate` offer from `Sec-WebSocket-Extensions` values.
pub fn negotiate<'a>(offers: impl Iterator<Item = &'a str>) -> bool {
    for header in offers {
        for offer in header.split(',') {
            let mut parts = offer.split(';').map(str::trim);
            if parts.next() != Some("permessage-deflate") {
                continue;
            }
            let acceptable = parts.all(|p| {
                let (name, value) =
                    p.split_once('=').map_or((p, None), |(n, v)| (n.trim(), Some(v.trim().trim_matches('"'))));
                match name {
                    "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
                    // We compress with a 32 KiB window; a smaller one cannot be honoured.
                    "server_max_window_bits" => value == Some("15"),
                    // Our inflater accepts any window the client uses.
                    "client_max_window_bits" => {
                        value.is_none_or(|v| v.parse::<u8>().is_ok_and(|b| (8..=15).contains(&b)))
                    }
                    _ => false,
                }
            });
            if acceptable {
                return true;
            }
        }
    }
    false
}

/// Compresses one message; the trailing `00 00 ff ff` of the sync flush is removed, as
/// RFC 7692 §7.2.1 requires.
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::fast(), false);
    let mut out = Vec::new();
    loop {
        let consumed = c.total_in() as usize;
        // Always leave room, so every call makes progress; when a call ends with room to
        // spare, all input is in and the sync flush is complete.
        out.reserve(data.len() - consumed + 64);
        c.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync).expect("deflate into memory cannot fail");
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&[0, 0, 0xff, 0xff]) {
        out.truncate(out.len() - 4);
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    TooBig,
    Corrupt,
}

/// Inflates one message, refusing to produce more than `max` bytes.
pub fn decompress(data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    use std::io::Read;
    // The sync-flush tail RFC 7692 removed, then an empty final block so the decoder
    // sees a complete stream.
    let tail: &[u8] = &[0, 0, 0xff, 0xff, 0x01, 0, 0, 0xff, 0xff];
    let mut decoder = flate2::read::DeflateDecoder::new(std::io::Read::chain(data, tail));
    let mut out = Vec::with_capacity((data.len() * 2).clamp(64, max + 1));
    decoder.by_ref().take(max as u64 + 1).read_to_end(&mut out).map_err(|_| InflateError::Corrupt)?;
    if out.len() > max {
        return Err(InflateError::TooBig);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for msg in [&b""[..], b"a", &[b'x'; 100_000], b"{\"pub\":{\"channel\":\"a\",\"data\":[1,2,3]}}"] {
            let z = compress(msg);
            assert!(!z.ends_with(&[0, 0, 0xff, 0xff]));
            assert_eq!(decompress(&z, 200_000).unwrap(), msg);
        }
    }

    #[test]
    fn negotiates_only_what_it_can_honour() {
        assert!(negotiate(["permessage-deflate; client_max_window_bits"].into_iter()));
        assert!(negotiate(["x-webkit-deflate-frame, permessage-deflate"].into_iter()));
        assert!(negotiate(["permessage-deflate; server_no_context_takeover; client_max_window_bits=12"].into_iter()));
        assert!(!negotiate(["permessage-deflate; server_max_window_bits=10"].into_iter()));
        assert!(negotiate(["permessage-deflate; server_max_window_bits=10, permessage-deflate"].into_iter()));
        assert!(!negotiate(["permessage-deflate; bogus"].into_iter()));
        assert!(!negotiate(["x-webkit-deflate-frame"].into_iter()));
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_hang() {
        assert!(decompress(&[0xff, 0xff, 0xff, 0xff, 0x00], 1000).is_err());
    }
}
