//! SSE/poll query strings and cursors on arbitrary text: parsed or refused with a code,
//! and a parsed cursor formats back to one that parses the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard_server::cursor;
use switchboard_server::error::Code;
use switchboard_server::session::Query;

fuzz_target!(|data: &[u8]| {
    let [n, rest @ ..] = data else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let channels = *n as usize % 8 + 1;
    if let Ok(positions) = cursor::parse(text, channels) {
        assert_eq!(positions.len(), channels);
        let again = cursor::parse(&cursor::format(&positions), channels).expect("a formatted cursor parses");
        assert_eq!(again, positions);
    }
    if let Ok(p) = cursor::parse_position(text) {
        assert_eq!(cursor::parse_position(&cursor::format_position(&p)).expect("round trip"), p);
    }
    let q = Query::parse(Some(text));
    let _ = q.single_channel();
    let _ = q.all("sub_token");
    if let Ok(Some(v)) = q.int("limit", 1..=1000, Code::BadLimit) {
        assert!((1..=1000).contains(&v));
    }
    let _ = q.int("wait", 0..=u64::MAX, Code::BadWait);
});
