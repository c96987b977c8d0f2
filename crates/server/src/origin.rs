//! The Origin allowlist for browser handshakes (`/ws`, `/sse`).
//!
//! Browsers do not apply the same-origin policy to WebSockets: any page can open one to
//! any server, with the user's cookies (cross-site WebSocket hijacking). Checking
//! `Origin` before the upgrade stops that. Non-browser clients send no `Origin` and are
//! not affected.
//!
//! Both the header and the allowlist entries are parsed into scheme, host and port
//! before they are compared — never matched as strings — so `https://evil.com@a.example.com`,
//! `https://a.example.com.evil.com` or `https://a.example.com:8443` cannot pass for
//! `https://*.example.com` (the first is not an origin at all).

/// An origin: `scheme://host[:port]`, lower-cased, with the scheme's default port filled
/// in when none is written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Parses `scheme://host[:port]` — exactly that: no user info, path, query or fragment.
/// `allow_wildcard` lets the host start with `*.` (allowlist entries).
fn parse(s: &str, allow_wildcard: bool) -> Option<Origin> {
    let s = s.trim().to_ascii_lowercase();
    let (scheme, rest) = s.split_once("://")?;
    if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
        return None;
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6.split_once(']')?;
        addr.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{addr}]"), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|_| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))?),
        None => default_port(scheme),
    };
    let name = if allow_wildcard { host.strip_prefix("*.").unwrap_or(&host) } else { &host };
    let valid_name = host.starts_with('[')
        || (!name.is_empty()
            && name
                .split('.')
                .all(|label| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')));
    valid_name.then(|| Origin { scheme: scheme.to_string(), host, port })
}

/// Is `origin` (the header value) allowed by `allowed`?
///
/// Entries are origins — `https://app.example.com`, `http://localhost:3000` — or
/// patterns whose leftmost host label is `*`: `https://*.example.com` matches
/// `https://a.example.com` and `https://a.b.example.com`, not `https://example.com`. An
/// entry without a scheme (`*.example.com`) matches any scheme (on its default port). A
/// port must match exactly; an entry without one means the scheme's default. `*` allows
/// everything; an empty list does too (the default — set one in production).
pub fn allowed(allowed: &[String], origin: Option<&str>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = origin else { return true };
    if allowed.iter().any(|e| e.trim() == "*") {
        return true;
    }
    // "null" and other opaque or malformed origins match no entry.
    let Some(o) = parse(origin, false) else { return false };
    allowed.iter().any(|entry| {
        let entry = entry.trim();
        let any_scheme = !entry.contains("://");
        let e = if any_scheme { parse(&format!("{}://{entry}", o.scheme), true) } else { parse(entry, true) };
        let Some(e) = e else { return false };
        let host_ok = match e.host.strip_prefix("*.") {
            Some(suffix) => o.host.len() > suffix.len() + 1 && o.host.ends_with(&format!(".{suffix}")),
            None => o.host == e.host,
        };
        e.scheme == o.scheme && host_ok && e.port == o.port
    })
}

#[cfg(test)]
mod tests {
    use super::allowed;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exact_and_wildcard_origins() {
        let l = list(&["https://app.example.com", "https://*.corp.example", "*.any.example", "http://localhost:3000"]);
        assert!(allowed(&l, Some("https://app.example.com")));
        assert!(allowed(&l, Some("HTTPS://APP.EXAMPLE.COM")));
        assert!(allowed(&l, Some("https://app.example.com:443")), "the default port, written out");
        assert!(!allowed(&l, Some("http://app.example.com")), "scheme differs");
        assert!(!allowed(&l, Some("https://evil.com")));
        assert!(!allowed(&l, Some("https://app.example.com.evil.com")));
        assert!(allowed(&l, Some("https://a.corp.example")));
        assert!(allowed(&l, Some("https://a.b.corp.example")));
        assert!(!allowed(&l, Some("https://corp.example")), "the bare domain is not a subdomain");
        assert!(!allowed(&l, Some("https://xcorp.example")));
        assert!(allowed(&l, Some("http://x.any.example")));
        assert!(allowed(&l, Some("http://localhost:3000")));
        assert!(!allowed(&l, Some("http://localhost:3001")));
        assert!(!allowed(&l, Some("null")));
        assert!(allowed(&l, None), "non-browser clients send no Origin");
        assert!(allowed(&[], Some("https://evil.com")), "no list: open");
        assert!(allowed(&list(&["*"]), Some("https://evil.com")));
    }

    #[test]
    fn strings_that_merely_end_like_an_allowed_origin_are_not_one() {
        let l = list(&["https://*.example.com", "https://app.example.com"]);
        for bad in [
            "https://evil.com@a.example.com",
            "https://evil.com#.example.com",
            "https://evil.com/.example.com",
            "https://evil.com?.example.com",
            "https://a.example.com:8443",
            "https://a.example.com.",
            "https://a..example.com",
            "https://app.example.com/",
            "https://app.example.com:99999",
            "https://app.example.com:",
            "https:// app.example.com",
        ] {
            assert!(!allowed(&l, Some(bad)), "{bad}");
        }
        assert!(allowed(&list(&["http://[::1]:8080"]), Some("http://[::1]:8080")));
        assert!(!allowed(&list(&["http://[::1]:8080"]), Some("http://[::2]:8080")));
    }
}
