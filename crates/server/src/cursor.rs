//! Cursors: the positions a client hands back to resume (SSE `id:`/`Last-Event-ID`, poll
//! `since`).
//!
//! A cursor holds one `epoch:offset` per channel of the request, in the order the
//! channels were given, joined by `,` — `k3f9x0a1bz:42` for one channel,
//! `k3f9x0a1bz:42,p0q1r2s3t4:7` for two. Epochs and offsets never contain `:` or `,`, so
//! the format needs no escaping, and the same URL always gives the same order.

use std::sync::Arc;

use switchboard_core::publication::is_valid_epoch;
use switchboard_core::StreamPosition;

use crate::error::{ApiError, Code};

/// One position in `epoch:offset` form.
pub fn format_position(p: &StreamPosition) -> String {
    format!("{}:{}", p.epoch, p.offset)
}

pub fn format(positions: &[StreamPosition]) -> String {
    let mut s = String::with_capacity(positions.len() * 16);
    for (i, p) in positions.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&p.epoch);
        s.push(':');
        s.push_str(itoa(p.offset).as_str());
    }
    s
}

fn itoa(n: u64) -> String {
    n.to_string()
}

pub fn parse_position(s: &str) -> Result<StreamPosition, ApiError> {
    let bad = || ApiError::new(Code::BadCursor, format!("bad position {:?}: expected epoch:offset", truncate(s)));
    let (epoch, offset) = s.split_once(':').ok_or_else(bad)?;
    if !is_valid_epoch(epoch) {
        return Err(bad());
    }
    let offset: u64 = offset.parse().map_err(|_| bad())?;
    Ok(StreamPosition { epoch: Arc::from(epoch), offset })
}

/// Parses a cursor for a request on `channels` channels.
pub fn parse(s: &str, channels: usize) -> Result<Vec<StreamPosition>, ApiError> {
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() != channels {
        return Err(ApiError::new(
            Code::BadCursor,
            format!("cursor has {} positions but the request names {channels} channels", parts.len()),
        ));
    }
    parts.into_iter().map(parse_position).collect()
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let ps = vec![
            StreamPosition { epoch: Arc::from("abc123"), offset: 0 },
            StreamPosition { epoch: Arc::from("zz9"), offset: u64::MAX },
        ];
        assert_eq!(parse(&format(&ps), 2).unwrap(), ps);
    }

    #[test]
    fn malformed_cursors_are_rejected() {
        for bad in ["", "abc", "abc:", ":1", "ABC:1", "abc:-1", "abc:1:2", "abc:1x", "a b:1"] {
            assert_eq!(parse(bad, 1).unwrap_err().code, Code::BadCursor, "{bad:?}");
        }
        assert_eq!(parse("a:1", 2).unwrap_err().code, Code::BadCursor);
        assert_eq!(parse("a:1,b:2", 1).unwrap_err().code, Code::BadCursor);
    }
}
