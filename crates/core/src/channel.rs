//! Channel names and namespaces.
//!
//! A channel name is 1..=255 bytes of `[A-Za-z0-9_\-.:/@=~]`. The part before the first
//! `:` is its namespace (`chat:room42` → `chat`); a name without `:` is in the default
//! namespace `""`. The characters `*`, `#`, `+`, `,`, whitespace and quotes are reserved:
//! wildcards and cursors use them, and keeping them out of names lets the server embed a
//! name in JSON and in SSE ids without escaping.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {0} bytes long; the limit is {MAX_CHANNEL_LEN}")]
    TooLong(usize),
    #[error("channel name contains {0:?}; allowed are letters, digits and _ - . : / @ = ~")]
    BadChar(char),
}

/// A validated channel name. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Parses a channel name, rejecting anything outside the documented alphabet.
    pub fn parse(s: &str) -> Result<Self, ChannelError> {
        validate(s)?;
        Ok(ChannelName(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace: the part before the first `:`, or `""`.
    pub fn namespace(&self) -> &str {
        namespace_of(&self.0)
    }
}

/// The namespace of a (not necessarily validated) channel name.
pub fn namespace_of(s: &str) -> &str {
    match s.find(':') {
        Some(i) => &s[..i],
        None => "",
    }
}

fn validate(s: &str) -> Result<(), ChannelError> {
    if s.is_empty() {
        return Err(ChannelError::Empty);
    }
    if s.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong(s.len()));
    }
    for c in s.chars() {
        let ok = c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/' | '@' | '=' | '~');
        if !ok {
            return Err(ChannelError::BadChar(c));
        }
    }
    Ok(())
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for ChannelName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_the_part_before_the_first_colon() {
        assert_eq!(ChannelName::parse("chat:room:42").unwrap().namespace(), "chat");
        assert_eq!(ChannelName::parse("plain").unwrap().namespace(), "");
        assert_eq!(ChannelName::parse(":x").unwrap().namespace(), "");
    }

    #[test]
    fn reserved_and_unsafe_characters_are_rejected() {
        for bad in ["a b", "a*", "a#", "a+b", "a,b", "a\"b", "a\\b", "é", "a\nb"] {
            assert!(ChannelName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(ChannelName::parse(""), Err(ChannelError::Empty));
        assert_eq!(ChannelName::parse(&"a".repeat(256)), Err(ChannelError::TooLong(256)));
        assert!(ChannelName::parse(&"a".repeat(255)).is_ok());
        assert!(ChannelName::parse("user:alice@example.com/x=1~y_z-w.v").is_ok());
    }
}
