//! The configuration loader on arbitrary TOML and environment overrides: a config or an
//! error naming the key, never a panic; a loaded config answers for any namespace.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard_server::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // TOML, then optionally a NUL and `KEY=value` lines for the environment.
    let (toml, env) = text.split_once('\0').unwrap_or((text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("SWITCHBOARD_{k}"), v.to_string()))
        .collect();
    if let Ok(c) = Config::parse(toml, "fuzz.toml", env) {
        for ns in c.namespaces.keys().map(String::as_str).chain(["", "other"]) {
            let _ = c.namespace(ns);
        }
    }
});
