//! JWT handling: arbitrary token strings, and arbitrary claims signed with the right key
//! (so the claim checks themselves run: times at the edges of u64, kinds, empty users).
//! Never a panic; an accepted connection token has a user and no `channel` claim.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use switchboard_server::auth::{sign, Verifier};
use switchboard_server::clock::Clock;
use switchboard_server::config::AuthConfig;

const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789";

fn verifier() -> &'static Verifier {
    static V: std::sync::OnceLock<Verifier> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let c = AuthConfig {
            algorithm: Some("HS256".into()),
            hmac_secret: Some(SECRET.into()),
            leeway_secs: 5,
            ..Default::default()
        };
        Verifier::from_config(&c, Arc::new(Clock::default())).unwrap().unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let v = verifier();
    let token = if mode & 1 == 0 {
        text.to_string()
    } else {
        let Ok(claims) = serde_json::from_str::<serde_json::Value>(text) else { return };
        sign("HS256", SECRET, &claims).unwrap()
    };
    if let Ok(who) = v.connection(&token) {
        assert!(!who.user.is_empty());
        let _ = who.expires_in_ms(&Clock::default());
    }
    let _ = v.subscription(&token, "alice", "vip:lounge");
});
