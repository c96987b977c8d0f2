//! The `switchboard.v1` command parser on arbitrary text: a typed command or a
//! documented error, and every command that names a channel says which gate it takes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard_server::transports::ws::protocol::{self, Command};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match protocol::parse(text) {
        Ok((_, cmd)) => {
            let names_a_channel = matches!(
                cmd,
                Command::Subscribe { .. }
                    | Command::Publish { .. }
                    | Command::History { .. }
                    | Command::Presence { .. }
                    | Command::PresenceStats { .. }
            );
            assert_eq!(names_a_channel, cmd.operation().is_some());
        }
        Err((_, e)) => {
            let _ = protocol::error(None, &e);
        }
    }
});
