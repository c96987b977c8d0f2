//! Wildcard subscriptions: patterns over channel names, and the index that finds the
//! patterns matching a publication's channel without scanning them all.
//!
//! Syntax (MQTT's, so MQTT topics map onto it directly): a pattern is `namespace:` — a
//! literal namespace, so a pattern never reaches into another namespace — followed by
//! `/`-separated segments where `+` matches exactly one segment and `#`, only as the last
//! segment, matches any number of segments (zero included). `sensors:+/temp` matches
//! `sensors:room1/temp`; `sensors:#` matches every channel of `sensors`.
//!
//! Pattern subscriptions are live-only: they have no position and no replay.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::channel::{ChannelName, MAX_CHANNEL_LEN};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("a pattern starts with a literal namespace: `ns:` then segments, e.g. sensors:+/temp")]
    NoNamespace,
    #[error("the namespace of a pattern cannot contain wildcards")]
    WildNamespace,
    #[error("`#` may only be the last segment")]
    HashNotLast,
    #[error("a wildcard must be a whole segment (`+` or `#`, not {0:?})")]
    PartialWildcard(String),
    #[error("pattern is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("pattern contains {0:?}; allowed are channel characters, `+` and `#`")]
    BadChar(char),
}

/// Does `s` use wildcard syntax (and so is a pattern, not a channel name)?
pub fn is_pattern(s: &str) -> bool {
    s.contains(['+', '#'])
}

/// Whether a subscription to `name` — a channel, or a pattern — takes publications on
/// `channel`.
pub fn covers(name: &str, channel: &ChannelName) -> bool {
    name == channel.as_str() || (is_pattern(name) && Pattern::parse(name).is_ok_and(|p| p.matches(channel)))
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    raw: Arc<str>,
    ns_len: usize,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, PatternError> {
        if s.len() > MAX_CHANNEL_LEN {
            return Err(PatternError::TooLong);
        }
        if let Some(c) = s.chars().find(|c| {
            !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/' | '@' | '=' | '~' | '+' | '#'))
        }) {
            return Err(PatternError::BadChar(c));
        }
        let (ns, rest) = s.split_once(':').ok_or(PatternError::NoNamespace)?;
        if ns.is_empty() {
            return Err(PatternError::NoNamespace);
        }
        if is_pattern(ns) {
            return Err(PatternError::WildNamespace);
        }
        let segs: Vec<&str> = rest.split('/').collect();
        for (i, seg) in segs.iter().enumerate() {
            if *seg == "#" && i != segs.len() - 1 {
                return Err(PatternError::HashNotLast);
            }
            if seg.len() > 1 && is_pattern(seg) {
                return Err(PatternError::PartialWildcard(seg.to_string()));
            }
        }
        Ok(Pattern { raw: Arc::from(s), ns_len: ns.len() })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn namespace(&self) -> &str {
        &self.raw[..self.ns_len]
    }

    fn segments(&self) -> std::str::Split<'_, char> {
        self.raw[self.ns_len + 1..].split('/')
    }

    /// The literal segments before the first wildcard.
    pub fn literal_prefix(&self) -> Vec<&str> {
        self.segments().take_while(|s| !is_pattern(s)).collect()
    }

    /// Does this pattern match `channel`? (The index answers the same faster.)
    pub fn matches(&self, channel: &ChannelName) -> bool {
        let Some(rest) = channel_segments(channel, self.namespace()) else { return false };
        let chan: Vec<&str> = rest.split('/').collect();
        let pat: Vec<&str> = self.segments().collect();
        let mut i = 0;
        for p in &pat {
            match *p {
                "#" => return true,
                "+" if i < chan.len() => i += 1,
                lit if i < chan.len() && chan[i] == lit => i += 1,
                _ => return false,
            }
        }
        i == chan.len()
    }
}

/// The part of `channel` after `namespace:`, if the channel is in that namespace.
fn channel_segments<'a>(channel: &'a ChannelName, namespace: &str) -> Option<&'a str> {
    let s = channel.as_str();
    s.strip_prefix(namespace).and_then(|r| r.strip_prefix(':'))
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.raw, f)
    }
}

/// A trie of patterns over segments, per namespace. Matching walks only the branches a
/// channel's segments can take — literal child, `+` child, `#` here — so its cost
/// depends on the channel's depth and the patterns that share its prefixes, not on how
/// many patterns exist.
pub struct PatternIndex<T> {
    namespaces: HashMap<String, Node<T>>,
    len: usize,
}

struct Node<T> {
    children: HashMap<String, Node<T>>,
    plus: Option<Box<Node<T>>>,
    /// Patterns ending here with `#`.
    hash: Vec<(u64, T)>,
    /// Patterns ending exactly here.
    here: Vec<(u64, T)>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node { children: HashMap::new(), plus: None, hash: Vec::new(), here: Vec::new() }
    }
}

impl<T> Default for PatternIndex<T> {
    fn default() -> Self {
        PatternIndex { namespaces: HashMap::new(), len: 0 }
    }
}

impl<T: Clone> PatternIndex<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Patterns indexed in `namespace`.
    pub fn has_namespace(&self, namespace: &str) -> bool {
        self.namespaces.contains_key(namespace)
    }

    pub fn insert(&mut self, p: &Pattern, id: u64, value: T) {
        let mut node = self.namespaces.entry(p.namespace().to_string()).or_default();
        for seg in p.segments() {
            match seg {
                "#" => {
                    node.hash.push((id, value));
                    self.len += 1;
                    return;
                }
                "+" => node = node.plus.get_or_insert_with(Default::default),
                lit => node = node.children.entry(lit.to_string()).or_default(),
            }
        }
        node.here.push((id, value));
        self.len += 1;
    }

    /// Removes entry `id` of pattern `p`. Returns whether the namespace has no patterns
    /// left.
    pub fn remove(&mut self, p: &Pattern, id: u64) -> bool {
        let Some(root) = self.namespaces.get_mut(p.namespace()) else { return true };
        let segs: Vec<&str> = p.segments().collect();
        if remove_at(root, &segs, id) {
            self.len -= 1;
        }
        if root.is_empty() {
            self.namespaces.remove(p.namespace());
            return true;
        }
        false
    }

    /// Every value whose pattern matches `channel`.
    pub fn matches(&self, channel: &ChannelName, out: &mut Vec<T>) {
        let Some(root) = self.namespaces.get(channel.namespace()) else { return };
        let Some(rest) = channel_segments(channel, channel.namespace()) else { return };
        let segs: Vec<&str> = rest.split('/').collect();
        walk(root, &segs, out);
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.here.is_empty()
    }
}

fn walk<T: Clone>(node: &Node<T>, segs: &[&str], out: &mut Vec<T>) {
    out.extend(node.hash.iter().map(|(_, v)| v.clone()));
    match segs.split_first() {
        None => out.extend(node.here.iter().map(|(_, v)| v.clone())),
        Some((first, rest)) => {
            if let Some(child) = node.children.get(*first) {
                walk(child, rest, out);
            }
            if let Some(plus) = &node.plus {
                walk(plus, rest, out);
            }
        }
    }
}

fn remove_at<T>(node: &mut Node<T>, segs: &[&str], id: u64) -> bool {
    let removed = match segs.split_first() {
        None => retain_count(&mut node.here, id),
        Some((&"#", _)) => retain_count(&mut node.hash, id),
        Some((&"+", rest)) => {
            let Some(plus) = node.plus.as_mut() else { return false };
            let r = remove_at(plus, rest, id);
            if plus.is_empty() {
                node.plus = None;
            }
            r
        }
        Some((lit, rest)) => {
            let Some(child) = node.children.get_mut(*lit) else { return false };
            let r = remove_at(child, rest, id);
            if child.is_empty() {
                node.children.remove(*lit);
            }
            r
        }
    };
    removed
}

fn retain_count<T>(v: &mut Vec<(u64, T)>, id: u64) -> bool {
    let before = v.len();
    v.retain(|(i, _)| *i != id);
    v.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> ChannelName {
        ChannelName::parse(s).unwrap()
    }

    #[test]
    fn parses_and_rejects() {
        assert!(Pattern::parse("sensors:+/temp").is_ok());
        assert!(Pattern::parse("sensors:#").is_ok());
        assert!(Pattern::parse("a:b/+/#").is_ok());
        assert_eq!(Pattern::parse("+/temp"), Err(PatternError::NoNamespace));
        assert_eq!(Pattern::parse(":#"), Err(PatternError::NoNamespace));
        assert_eq!(Pattern::parse("s+:x"), Err(PatternError::WildNamespace));
        assert_eq!(Pattern::parse("a:#/x"), Err(PatternError::HashNotLast));
        assert_eq!(Pattern::parse("a:x+/y"), Err(PatternError::PartialWildcard("x+".into())));
        assert_eq!(Pattern::parse("a:x y"), Err(PatternError::BadChar(' ')));
    }

    #[test]
    fn matching_follows_mqtt() {
        let cases = [
            ("s:+/temp", "s:room1/temp", true),
            ("s:+/temp", "s:room1/hum", false),
            ("s:+/temp", "s:a/b/temp", false),
            ("s:+", "s:x", true),
            ("s:+", "s:x/y", false),
            ("s:#", "s:x", true),
            ("s:#", "s:x/y/z", true),
            ("s:a/#", "s:a", true),
            ("s:a/#", "s:a/b", true),
            ("s:a/#", "s:b", false),
            ("s:#", "t:x", false),
            ("s:#", "st:x", false),
        ];
        for (p, c, want) in cases {
            let pat = Pattern::parse(p).unwrap();
            assert_eq!(pat.matches(&ch(c)), want, "{p} vs {c}");
            let mut idx = PatternIndex::default();
            idx.insert(&pat, 1, p.to_string());
            let mut out = vec![];
            idx.matches(&ch(c), &mut out);
            assert_eq!(!out.is_empty(), want, "index: {p} vs {c}");
        }
    }

    #[test]
    fn index_removes_and_forgets_empty_namespaces() {
        let mut idx = PatternIndex::default();
        let a = Pattern::parse("s:+/t").unwrap();
        let b = Pattern::parse("s:#").unwrap();
        idx.insert(&a, 1, 1);
        idx.insert(&b, 2, 2);
        idx.insert(&a, 3, 3);
        let mut out = vec![];
        idx.matches(&ch("s:x/t"), &mut out);
        out.sort();
        assert_eq!(out, vec![1, 2, 3]);
        assert!(!idx.remove(&a, 1));
        assert!(!idx.remove(&b, 2));
        assert!(idx.remove(&a, 3));
        assert_eq!(idx.len(), 0);
        assert!(!idx.has_namespace("s"));
    }
}
