//! permessage-deflate inflation of arbitrary bytes: never more than the limit, never a
//! hang; and what the server compresses inflates back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard_server::transports::ws::deflate::{compress, decompress};

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if let Ok(out) = decompress(data, MAX) {
        assert!(out.len() <= MAX);
    }
    if data.len() <= MAX {
        assert_eq!(decompress(&compress(data), MAX).as_deref(), Ok(data));
    }
});
