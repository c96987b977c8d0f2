//! The MQTT packet decoder on arbitrary bytes, as a connection feeds it: a CONNECT first
//! (its version decides the rest), then packets, in arbitrary splits. Decoding never
//! panics, never claims more bytes than it was given, and gives the same packets however
//! the bytes are split.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard_server::transports::mqtt::codec::{decode, Packet, Version};

/// Decodes everything in `bytes`, fed `step` bytes at a time.
fn run(bytes: &[u8], step: usize) -> (Vec<Packet>, bool) {
    let mut buf = Vec::new();
    let mut version: Option<Version> = None;
    let mut out = Vec::new();
    for chunk in bytes.chunks(step.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match decode(&buf, version, 4096) {
                Ok(Some((p, n))) => {
                    assert!(n > 0 && n <= buf.len());
                    if let Packet::Connect(c) = &p {
                        version = Some(c.version);
                    }
                    buf.drain(..n);
                    out.push(p);
                }
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else { return };
    let whole = run(bytes, bytes.len());
    let split = run(bytes, step as usize % 17 + 1);
    assert_eq!(whole, split);
});
