//! The WebSocket frame reader, fed arbitrary bytes in arbitrary splits. Oracle: however
//! the bytes are split into reads, the messages and the verdict are the same, and a
//! message never exceeds the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard_server::transports::ws::frame::{FrameReader, Incoming};

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let [flags, step, input @ ..] = data else { return };
    let deflate = flags & 1 == 1;
    let binary = flags & 2 == 2;
    let reader = || {
        let r = FrameReader::new(MAX, deflate);
        if binary {
            r.allowing_binary()
        } else {
            r
        }
    };
    let (mut whole, mut split) = (reader(), reader());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let ra = whole.feed(input, &mut a);
    let rb = input.chunks(*step as usize % 97 + 1).try_for_each(|c| split.feed(c, &mut b));
    assert_eq!(ra, rb, "the verdict depends on how the bytes were split");
    assert_eq!(a, b, "the messages depend on how the bytes were split");
    for m in &a {
        match m {
            Incoming::Text(t) => assert!(t.len() <= MAX),
            Incoming::Binary(v) => assert!(binary && v.len() <= MAX),
            _ => {}
        }
    }
});
