//! Channel names, client ids and keys as NATS subject tokens.

/// `s` as one subject token (also a valid key of a JetStream KV bucket): ASCII letters,
/// digits and `-` as they are, every other byte as `_` and two hex digits; the empty
/// string as `_`. Unambiguous, so [`untoken`] gives `s` back.
pub fn token(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push('_');
            out.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0').to_ascii_uppercase());
            out.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0').to_ascii_uppercase());
        }
    }
    out
}

/// The string a [`token`] was made from; `None` for what `token` cannot have made.
pub fn untoken(t: &str) -> Option<String> {
    if t == "_" {
        return Some(String::new());
    }
    let b = t.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'_' {
            let hex = t.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A stream name from the prefix: letters, digits, `-` and `_`, upper-cased.
pub fn stream_name(prefix: &str, what: &str) -> String {
    let p: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c.to_ascii_uppercase() } else { '_' })
        .collect();
    format!("{p}_{what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_hold_no_subject_separators() {
        for s in ["", "_", "chat:room.1", "a/b@c=d~e", "plain-name", "x_41", "é"] {
            let t = token(s);
            assert!(!t.is_empty());
            assert!(!t.contains(['.', '*', '>', ' ', ':']), "{t}");
            assert_eq!(untoken(&t).as_deref(), Some(s), "{s} → {t}");
        }
        assert_ne!(token("_"), token(""));
        assert_eq!(untoken("_4"), None);
    }
}
