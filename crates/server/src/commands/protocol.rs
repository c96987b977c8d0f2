//! The `switchboard.v1` command protocol: wire JSON in, typed commands out; replies and
//! pushes as JSON text. docs/protocol.md is the reference.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::Operation;
use crate::error::{ApiError, Code};

/// Every command name. The authorization matrix test walks this list: a new command
/// must say there whether it touches a channel (and so goes through the gate).
pub const COMMANDS: &[&str] = &[
    "connect",
    "refresh",
    "subscribe",
    "unsubscribe",
    "publish",
    "history",
    "presence",
    "presence_stats",
    "send",
    "ping",
];

/// The target of a direct message: one connection, or every connection of a user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub client: Option<String>,
    pub user: Option<String>,
}

/// A command, parsed and checked for its required fields. `token` on a channel command
/// is a subscription token, for private channels.
#[derive(Debug)]
pub enum Command<'a> {
    Connect {
        token: Option<String>,
        client: Option<serde_json::Value>,
    },
    /// `datagrams`: over WebTransport, this subscription's volatile publications as
    /// datagrams (the other transports have none and ignore it).
    Subscribe {
        channel: String,
        since: Option<String>,
        rewind: Option<u64>,
        token: Option<String>,
        datagrams: bool,
    },
    Refresh {
        token: String,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        data: &'a RawValue,
        volatile: Option<bool>,
        key: Option<String>,
        token: Option<String>,
        meta: Option<Box<switchboard_core::Meta>>,
    },
    PresenceStats {
        channel: String,
        token: Option<String>,
    },
    History {
        channel: String,
        since: Option<String>,
        limit: Option<u64>,
        token: Option<String>,
    },
    Presence {
        channel: String,
        token: Option<String>,
    },
    /// A direct message (not a channel's).
    Send {
        to: To,
        data: &'a RawValue,
    },
    Ping,
}

impl Command<'_> {
    /// The channel operation the command performs — decided by [`crate::auth::gate`] —
    /// or `None` for commands that read and write no channel.
    pub fn operation(&self) -> Option<Operation> {
        match self {
            Command::Subscribe { .. } => Some(Operation::Subscribe),
            Command::Publish { .. } => Some(Operation::Publish),
            Command::History { .. } => Some(Operation::History),
            Command::Presence { .. } => Some(Operation::Presence),
            Command::PresenceStats { .. } => Some(Operation::PresenceStats),
            // Unsubscribe only ends what the gate let in.
            Command::Connect { .. }
            | Command::Refresh { .. }
            | Command::Unsubscribe { .. }
            | Command::Send { .. }
            | Command::Ping => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    id: Option<u64>,
    cmd: String,
    channel: Option<String>,
    since: Option<String>,
    limit: Option<u64>,
    rewind: Option<u64>,
    volatile: Option<bool>,
    key: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    token: Option<String>,
    #[serde(borrow)]
    client: Option<&'a RawValue>,
    to: Option<To>,
    datagrams: Option<bool>,
    meta: Option<Box<switchboard_core::Meta>>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<u64>,
}

/// Commands (other than errors) errors are reported under: the `id` if it could be read.
pub type Parsed<'a> = Result<(Option<u64>, Command<'a>), (Option<u64>, ApiError)>;

pub fn parse(text: &str) -> Parsed<'_> {
    let w: Wire = match serde_json::from_str(text) {
        Ok(w) => w,
        Err(e) => {
            let id = serde_json::from_str::<IdOnly>(text).ok().and_then(|i| i.id);
            return Err((id, crate::api::json_error("command", &e)));
        }
    };
    let id = w.id;
    let need = |field: Option<String>, name: &str| {
        field.ok_or_else(|| (id, ApiError::new(Code::InvalidRequest, format!("`{}` needs `{name}`", w.cmd))))
    };
    let cmd = match w.cmd.as_str() {
        "connect" => {
            let client = w.client.and_then(|c| serde_json::from_str(c.get()).ok());
            Command::Connect { token: w.token, client }
        }
        "subscribe" => Command::Subscribe {
            channel: need(w.channel, "channel")?,
            since: w.since,
            rewind: w.rewind,
            token: w.token,
            datagrams: w.datagrams.unwrap_or(false),
        },
        "refresh" => Command::Refresh { token: need(w.token, "token")? },
        "unsubscribe" => Command::Unsubscribe { channel: need(w.channel, "channel")? },
        "publish" => {
            let channel = need(w.channel, "channel")?;
            let data = w.data.ok_or_else(|| (id, ApiError::new(Code::InvalidRequest, "`publish` needs `data`")))?;
            Command::Publish { channel, data, volatile: w.volatile, key: w.key, token: w.token, meta: w.meta }
        }
        "history" => {
            Command::History { channel: need(w.channel, "channel")?, since: w.since, limit: w.limit, token: w.token }
        }
        "presence" => Command::Presence { channel: need(w.channel, "channel")?, token: w.token },
        "presence_stats" => Command::PresenceStats { channel: need(w.channel, "channel")?, token: w.token },
        "send" => {
            let bad = |m: &str| (id, ApiError::new(Code::InvalidRequest, m.to_string()));
            let to = w.to.ok_or_else(|| bad("`send` needs `to`: {\"client\":…} or {\"user\":…}"))?;
            if to.client.is_some() == to.user.is_some() {
                return Err(bad("`to` names exactly one of `client` or `user`"));
            }
            let data = w.data.ok_or_else(|| bad("`send` needs `data`"))?;
            Command::Send { to, data }
        }
        "ping" => Command::Ping,
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err((id, ApiError::new(Code::UnknownCommand, format!("unknown command {shown:?}"))));
        }
    };
    Ok((id, cmd))
}

fn id_json(id: Option<u64>) -> String {
    id.map_or_else(|| "null".to_string(), |i| i.to_string())
}

/// `{"id":…,"ok":<ok>}` where `ok` is JSON text.
pub fn ok(id: Option<u64>, ok: &str) -> String {
    format!("{{\"id\":{},\"ok\":{ok}}}", id_json(id))
}

/// `{"id":…,"error":{"code","message"}}`.
pub fn error(id: Option<u64>, e: &ApiError) -> String {
    let err = serde_json::json!({"code": e.code.as_str(), "message": e.message});
    format!("{{\"id\":{},\"error\":{err}}}", id_json(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_names_what_is_missing() {
        let (id, c) = parse(r#"{"id":3,"cmd":"subscribe","channel":"a","since":"e:1"}"#).unwrap();
        assert_eq!(id, Some(3));
        assert!(
            matches!(c, Command::Subscribe { ref channel, since: Some(_), rewind: None, token: None, datagrams: false } if channel == "a")
        );
        let (id, e) = parse(r#"{"id":4,"cmd":"subscribe"}"#).unwrap_err();
        assert_eq!((id, e.code), (Some(4), Code::InvalidRequest));
        let (id, e) = parse(r#"{"id":5,"cmd":"dance"}"#).unwrap_err();
        assert_eq!((id, e.code), (Some(5), Code::UnknownCommand));
        let (id, e) = parse(r#"{"id":6,"cmd":"ping","bogus":1}"#).unwrap_err();
        assert_eq!((id, e.code), (Some(6), Code::InvalidRequest));
        let (id, e) = parse(r#"{"id":"x","cmd":"ping"}"#).unwrap_err();
        assert_eq!((id, e.code), (None, Code::InvalidRequest));
        let (id, e) = parse("{nope").unwrap_err();
        assert_eq!((id, e.code), (None, Code::InvalidJson));
        let (_, e) = parse(r#"{"id":1,"cmd":"publish","channel":"a"}"#).unwrap_err();
        assert_eq!(e.code, Code::InvalidRequest);
    }

    #[test]
    fn every_listed_command_parses_and_no_other_does() {
        for name in COMMANDS {
            let text = format!(r#"{{"id":1,"cmd":"{name}","channel":"a","token":"t","data":1}}"#);
            if let Err((_, e)) = parse(&text) {
                assert_ne!(e.code, Code::UnknownCommand, "{name}");
            }
        }
        let (_, e) = parse(r#"{"id":1,"cmd":"unlisted"}"#).unwrap_err();
        assert_eq!(e.code, Code::UnknownCommand);
    }

    #[test]
    fn replies_are_json_with_the_id() {
        let v: serde_json::Value = serde_json::from_str(&ok(Some(9), "{}")).unwrap();
        assert_eq!(v["id"], 9);
        let v: serde_json::Value =
            serde_json::from_str(&error(None, &ApiError::new(Code::InvalidJson, "bad \"x\""))).unwrap();
        assert_eq!(v["id"], serde_json::Value::Null);
        assert_eq!(v["error"]["code"], "invalid_json");
    }
}
