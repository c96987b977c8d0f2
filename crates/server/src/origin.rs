//! The Origin allowlist for browser handshakes (`/ws`, `/sse`).
//!
//! Browsers do not apply the same-origin policy to WebSockets: any page can open one to
//! any server, with the user's cookies (cross-site WebSocket hijacking). Checking
//! `Origin` before the upgrade stops that. Non-browser clients send no `Origin` and are
//! not affected.

/// Is `origin` (the header value) allowed by `allowed`?
///
/// Entries are origins — `https://app.example.com`, `http://localhost:3000` — or
/// patterns whose leftmost host label is `*`: `https://*.example.com` matches
/// `https://a.example.com` and `https://a.b.example.com`, not `https://example.com`. An
/// entry without a scheme (`*.example.com`) matches any scheme. `*` allows everything;
/// an empty list does too (the default — set one in production).
pub fn allowed(allowed: &[String], origin: Option<&str>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = origin else { return true };
    let origin = origin.trim().to_ascii_lowercase();
    let (scheme, host) = match origin.split_once("://") {
        Some((s, h)) => (s, h),
        None => return false, // "null" and other opaque origins
    };
    allowed.iter().any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        if entry == "*" {
            return true;
        }
        let (e_scheme, e_host) = match entry.split_once("://") {
            Some((s, h)) => (Some(s), h),
            None => (None, entry.as_str()),
        };
        if e_scheme.is_some_and(|s| s != scheme) {
            return false;
        }
        match e_host.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => host == e_host,
        }
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
}
