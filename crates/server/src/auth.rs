//! Tokens and authorization.
//!
//! Clients prove who they are with a JWT signed by the application (the *connection
//! token*). The algorithm and key come from `[auth]` in the config — never from the token
//! header, so a token cannot pick `none` or switch RS256 for HS256 (alg confusion). Every
//! subscribe and publish is authorized against the namespace's options and the token's
//! claims, not only the connect. docs/security.md has the threat model and the claims.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::config::{AuthConfig, NamespaceOptions};
use crate::error::{ApiError, Code};
use crate::session::{Resolved, ResolvedPattern};
use switchboard_core::pattern::{is_pattern, Pattern};

/// The claims Switchboard reads. Unknown claims are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not valid before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the Unix epoch (a token from the future is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Channels (exact names, or prefixes ending in `*`) the client may use. Absent:
    /// whatever the namespaces allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// Public user info, shown to others in presence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    /// Token id, for revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Subscription tokens only: the one channel this token grants. It is what tells
    /// the two kinds apart: a token with `channel` never opens a connection, and one
    /// without never grants a private channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// May send direct messages under `[direct] policy = "claim"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
}

/// Who a connection is, once its token checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub user: String,
    pub exp: u64,
    pub channels: Option<Vec<String>>,
    pub info: Option<serde_json::Value>,
    pub jti: Option<String>,
    /// The token's `direct` claim (`[direct] policy = "claim"`).
    pub direct: bool,
}

impl Identity {
    /// When the token expires, in milliseconds since the Unix epoch.
    pub fn expires_at_ms(&self) -> u64 {
        self.exp.saturating_mul(1000)
    }

    /// Milliseconds until the token expires on `clock` (0 if it already has).
    pub fn expires_in_ms(&self, clock: &Clock) -> u64 {
        self.expires_at_ms().saturating_sub(clock.now_ms())
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` bytes from the system's secure random source, in hex: secrets and ids that must not
/// be guessed.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("the system's random source");
    hex(&b)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Verifies tokens with the configured algorithm and key, and their times against the
/// server's [`Clock`].
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    leeway: u64,
    clock: Arc<Clock>,
}

impl Verifier {
    /// `None` when no algorithm is configured (token auth off).
    pub fn from_config(c: &AuthConfig, clock: Arc<Clock>) -> Result<Option<Verifier>, String> {
        let Some(alg) = c.algorithm.as_deref() else { return Ok(None) };
        let (algorithm, key) = match alg {
            "HS256" => {
                let secret = c.hmac_secret.as_deref().ok_or("auth.hmac_secret is required for HS256")?;
                if secret.len() < 32 {
                    return Err("auth.hmac_secret must be at least 32 bytes".into());
                }
                (Algorithm::HS256, DecodingKey::from_secret(secret.as_bytes()))
            }
            "RS256" | "ES256" => {
                let pem = match (&c.public_key_pem, &c.public_key_file) {
                    (Some(p), None) => p.clone(),
                    (None, Some(f)) => {
                        std::fs::read_to_string(f).map_err(|e| format!("auth.public_key_file {f}: {e}"))?
                    }
                    _ => return Err(format!("{alg} needs exactly one of auth.public_key_pem, auth.public_key_file")),
                };
                if alg == "RS256" {
                    let k = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| format!("auth public key: {e}"))?;
                    (Algorithm::RS256, k)
                } else {
                    let k = DecodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| format!("auth public key: {e}"))?;
                    (Algorithm::ES256, k)
                }
            }
            other => return Err(format!("auth.algorithm {other:?}: expected HS256, RS256 or ES256")),
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Times are checked by `check_times`, against the server's clock and with
        // checked arithmetic.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        match &c.audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        if let Some(i) = &c.issuer {
            validation.set_issuer(&[i]);
        }
        Ok(Some(Verifier { key, validation, leeway: c.leeway_secs, clock }))
    }

    /// `exp`, `nbf` and `iat` against the server's clock, each with the configured
    /// leeway, in arithmetic that cannot overflow whatever the token says.
    fn check_times(&self, c: &Claims) -> Result<(), ApiError> {
        let now = self.clock.now_secs();
        if c.exp.saturating_add(self.leeway) < now {
            return Err(ApiError::new(Code::TokenExpired, "token expired"));
        }
        let future = |t: Option<u64>| t.is_some_and(|t| t > now.saturating_add(self.leeway));
        if future(c.nbf) {
            return Err(ApiError::new(Code::TokenInvalid, "token not valid yet (nbf is in the future)"));
        }
        if future(c.iat) {
            return Err(ApiError::new(Code::TokenInvalid, "token issued in the future (iat)"));
        }
        Ok(())
    }

    fn decode(&self, token: &str) -> Result<Claims, ApiError> {
        use jsonwebtoken::errors::ErrorKind as K;
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map(|d| d.claims).map_err(|e| {
                let (code, what) = match e.kind() {
                    K::ExpiredSignature => (Code::TokenExpired, "token expired"),
                    K::InvalidAlgorithm => (Code::TokenInvalid, "token algorithm is not the configured one"),
                    K::InvalidSignature => (Code::TokenInvalid, "token signature does not verify"),
                    K::MissingRequiredClaim(_) => (Code::TokenInvalid, "token lacks a required claim (sub, exp)"),
                    K::InvalidAudience | K::InvalidIssuer => (Code::TokenInvalid, "token audience or issuer mismatch"),
                    _ => (Code::TokenInvalid, "malformed token"),
                };
                // The library's own wording stays in the debug log: clients get ours.
                tracing::debug!("token refused: {e}");
                ApiError::new(code, what)
            })?;
        self.check_times(&claims)?;
        Ok(claims)
    }

    /// Checks a connection token.
    pub fn connection(&self, token: &str) -> Result<Identity, ApiError> {
        let c = self.decode(token)?;
        if c.sub.is_empty() {
            return Err(ApiError::new(Code::TokenInvalid, "token `sub` is empty"));
        }
        if c.channel.is_some() {
            return Err(ApiError::new(
                Code::TokenInvalid,
                "this is a subscription token (it has a `channel` claim): it cannot open a connection",
            ));
        }
        let direct = c.direct.unwrap_or(false);
        Ok(Identity { user: c.sub, exp: c.exp, channels: c.channels, info: c.info, jti: c.jti, direct })
    }

    /// Checks a subscription token for `channel`, issued to `user`.
    pub fn subscription(&self, token: &str, user: &str, channel: &str) -> Result<(), ApiError> {
        let c = self.decode(token).map_err(|e| {
            let code = if e.code == Code::TokenExpired { Code::TokenExpired } else { Code::SubscriptionTokenInvalid };
            ApiError::new(code, format!("subscription {}", e.message))
        })?;
        if c.channel.as_deref() != Some(channel) {
            return Err(ApiError::new(Code::SubscriptionTokenInvalid, "subscription token is for another channel"));
        }
        if c.sub != user {
            return Err(ApiError::new(Code::SubscriptionTokenInvalid, "subscription token is for another user"));
        }
        Ok(())
    }
}

/// Signs tokens (the `switchboard token` helper and tests).
pub fn sign<T: Serialize>(alg: &str, key_pem_or_secret: &str, claims: &T) -> Result<String, String> {
    let (algorithm, key) = match alg {
        "HS256" => (Algorithm::HS256, EncodingKey::from_secret(key_pem_or_secret.as_bytes())),
        "RS256" => {
            (Algorithm::RS256, EncodingKey::from_rsa_pem(key_pem_or_secret.as_bytes()).map_err(|e| e.to_string())?)
        }
        "ES256" => {
            (Algorithm::ES256, EncodingKey::from_ec_pem(key_pem_or_secret.as_bytes()).map_err(|e| e.to_string())?)
        }
        other => return Err(format!("unsupported algorithm {other}")),
    };
    jsonwebtoken::encode(&Header::new(algorithm), claims, &key).map_err(|e| e.to_string())
}

/// Does `channel` match a `channels` claim entry (exact, or prefix ending in `*`)?
pub fn claim_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => pattern == channel,
    }
}

/// Every operation a client can perform on a channel. Each one, on every transport,
/// is decided by [`gate`] — and the authorization matrix test walks this list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Receive a channel's publications (subscribe, SSE, poll).
    Subscribe,
    /// Read a channel's retained publications.
    History,
    /// Read who is in a channel.
    Presence,
    /// Read how many are in a channel.
    PresenceStats,
    /// Publish to a channel.
    Publish,
}

impl Operation {
    pub const ALL: [Operation; 5] =
        [Operation::Subscribe, Operation::History, Operation::Presence, Operation::PresenceStats, Operation::Publish];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Subscribe => "subscribe",
            Operation::History => "history",
            Operation::Presence => "presence",
            Operation::PresenceStats => "presence_stats",
            Operation::Publish => "publish",
        }
    }
}

/// What a client presents for one operation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// Its connection token, verified.
    pub who: Option<&'a Identity>,
    /// Subscription tokens it offers for private channels (the first that fits is used).
    pub sub_tokens: &'a [String],
    /// Its connection already holds a subscription to the channel (authorized with a
    /// subscription token if the channel is private), so it need not show one again.
    pub subscribed: bool,
}

/// The one door: may a client with `c` perform `op` on `r`? Every command, endpoint and
/// transport that reads or writes a channel asks here (docs/security.md has the matrix).
///
/// - Namespaces with `require_token`, `user_limited` or `private` need a token.
/// - A revoked token or user is refused.
/// - A token with a `channels` claim reaches only the channels the claim lists.
/// - `user_limited` channels (`ns:<user>`, `ns:<user>/…`) belong to their user alone.
/// - `private` channels need a subscription token for that channel and user, for reads
///   and writes alike — unless the connection already subscribed with one.
/// - Publishing needs a namespace that allows client publishing.
pub fn gate(
    verifier: Option<&Verifier>,
    deny: &DenyList,
    op: Operation,
    r: &Resolved,
    c: &Credentials<'_>,
) -> Result<(), ApiError> {
    let ns: &NamespaceOptions = &r.options;
    let channel = r.channel.as_str();
    if op == Operation::Publish && !ns.allow_publish {
        return Err(ApiError::new(
            Code::PublishNotAllowed,
            format!("clients may not publish in namespace {:?}", r.channel.namespace()),
        ));
    }
    let needs_identity = ns.require_token || ns.user_limited || ns.private;
    let Some(who) = c.who else {
        if needs_identity {
            return Err(ApiError::new(
                Code::TokenRequired,
                format!("namespace {:?} requires a token", r.channel.namespace()),
            ));
        }
        return Ok(());
    };
    deny.check(who)?;
    if let Some(allowed) = &who.channels {
        if !allowed.iter().any(|p| claim_matches(p, channel)) {
            return Err(ApiError::new(Code::PermissionDenied, format!("the token does not grant {channel:?}")));
        }
    }
    if ns.user_limited {
        // `ns:<user>` or `ns:<user>/…`: only that user.
        let rest = channel.split_once(':').map_or("", |(_, r)| r);
        let owner = rest.split('/').next().unwrap_or("");
        if owner != who.user {
            return Err(ApiError::new(Code::PermissionDenied, format!("{channel:?} belongs to another user")));
        }
    }
    if ns.private && !c.subscribed {
        if c.sub_tokens.is_empty() {
            return Err(ApiError::new(
                Code::SubscriptionTokenRequired,
                format!("{channel:?} is private: present a subscription token for it"),
            ));
        }
        let verifier =
            verifier.ok_or_else(|| ApiError::new(Code::SubscriptionTokenInvalid, "token auth is not configured"))?;
        let mut last = None;
        for t in c.sub_tokens {
            match verifier.subscription(t, &who.user, channel) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        return Err(last.expect("at least one subscription token was tried"));
    }
    Ok(())
}

impl crate::app::AppState {
    /// [`gate`] with this server's verifier and deny list.
    pub fn gate(&self, op: Operation, r: &Resolved, c: &Credentials<'_>) -> Result<(), ApiError> {
        gate(self.verifier.as_ref(), &self.deny, op, r, c)
    }
}

/// The part every channel matched by `p` starts with: its namespace and literal
/// segments, with the `/` that follows them only when at least one more segment must
/// come (`+`). `#` also matches zero segments, so `ns:x/#` matches `ns:x` itself: its
/// common prefix is `ns:x`, not `ns:x/`.
fn pattern_common_prefix(p: &Pattern) -> String {
    let raw = p.as_str();
    let (_, rest) = raw.split_once(':').expect("a pattern has a namespace");
    let segs: Vec<&str> = rest.split('/').collect();
    let literal = segs.iter().take_while(|s| !is_pattern(s)).count();
    let mut out = format!("{}:{}", p.namespace(), segs[..literal].join("/"));
    if literal > 0 && segs.get(literal) == Some(&"+") {
        out.push('/');
    }
    out
}

/// Authorizes a wildcard subscription (live-only: patterns only subscribe). A pattern
/// reaches every channel it can match, so it is allowed only when each of those would
/// be: a token's `channels` claim must cover them all (only a prefix claim can, and only
/// one that every match starts with), it may not reach into private namespaces, and in
/// `user_limited` namespaces it must stay inside the user's own channels.
pub fn gate_pattern(who: Option<&Identity>, p: &ResolvedPattern, deny: &DenyList) -> Result<(), ApiError> {
    let ns = &p.options;
    let raw = p.pattern.as_str();
    if ns.private {
        return Err(ApiError::new(Code::PermissionDenied, "private channels cannot be subscribed by pattern"));
    }
    let needs_identity = ns.require_token || ns.user_limited;
    let Some(who) = who else {
        if needs_identity {
            return Err(ApiError::new(
                Code::TokenRequired,
                format!("namespace {:?} requires a token", p.pattern.namespace()),
            ));
        }
        return Ok(());
    };
    deny.check(who)?;
    if let Some(allowed) = &who.channels {
        let common = pattern_common_prefix(&p.pattern);
        let covered = allowed.iter().any(|c| c.strip_suffix('*').is_some_and(|prefix| common.starts_with(prefix)));
        if !covered {
            return Err(ApiError::new(
                Code::PermissionDenied,
                format!("the token does not grant every channel the pattern {raw:?} matches"),
            ));
        }
    }
    if ns.user_limited && p.pattern.literal_prefix().first().copied() != Some(who.user.as_str()) {
        return Err(ApiError::new(Code::PermissionDenied, format!("{raw:?} reaches other users' channels")));
    }
    Ok(())
}

/// Revoked token ids and users, each until its own expiry. Bounded: entries expire,
/// and at most `MAX_ENTRIES` are kept.
#[derive(Default)]
pub struct DenyList {
    entries: Mutex<HashMap<String, Instant>>,
    /// With durable history (`--data-dir`): every revocation is appended (and synced) here
    /// before it is answered, and read back at start.
    log: Mutex<Option<std::fs::File>>,
}

const MAX_DENY_ENTRIES: usize = 1_000_000;

impl DenyList {
    /// The key a revocation is kept under: `user` or `jti`, and the id.
    pub fn key(kind: &str, id: &str) -> String {
        format!("{kind}\u{0}{id}")
    }

    /// Puts revocations made on other nodes (kept by the broker) in force here, each until
    /// its own expiry (Unix milliseconds); a later expiry already here stays. Their count.
    pub fn adopt(&self, kept: &[(String, u64)]) -> usize {
        let (now_ms, now) = (switchboard_core::now_millis(), Instant::now());
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for (key, until) in kept.iter().filter(|(_, until)| *until > now_ms) {
            if m.len() >= MAX_DENY_ENTRIES && !m.contains_key(key) {
                break;
            }
            let at = now + Duration::from_millis(until - now_ms);
            let e = m.entry(key.clone()).or_insert(at);
            *e = (*e).max(at);
            n += 1;
        }
        n
    }

    pub fn revoke_user(&self, user: &str, ttl: Duration) -> Result<(), ApiError> {
        self.insert(Self::key("user", user), ttl)
    }

    pub fn revoke_token(&self, jti: &str, ttl: Duration) -> Result<(), ApiError> {
        self.insert(Self::key("jti", jti), ttl)
    }

    fn insert(&self, key: String, ttl: Duration) -> Result<(), ApiError> {
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, until| *until > now);
        if m.len() >= MAX_DENY_ENTRIES && !m.contains_key(&key) {
            return Err(ApiError::new(Code::InvalidRequest, "deny list is full"));
        }
        m.insert(key.clone(), now + ttl);
        drop(m);
        if let Some(f) = self.log.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let until = switchboard_core::now_millis() + ttl.as_millis() as u64;
            let line = serde_json::json!({"key": key, "until": until}).to_string() + "\n";
            use std::io::Write;
            f.write_all(line.as_bytes()).and_then(|()| f.sync_data()).map_err(|e| {
                tracing::error!("revocation not written to its file: {e}");
                ApiError::new(Code::StorageFull, "the revocation is in force but could not be stored on disk")
            })?;
        }
        Ok(())
    }

    /// Keeps revocations in the file at `path` from now on: those it holds that have not
    /// expired are in force again (the file is rewritten with only them). Their count.
    pub fn persist(&self, path: &std::path::Path) -> std::io::Result<usize> {
        let now_ms = switchboard_core::now_millis();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut live: HashMap<String, u64> = HashMap::new();
        // (A torn last line, from a crash mid-write, does not parse and is skipped.)
        for v in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            if let (Some(k), Some(until)) = (v["key"].as_str(), v["until"].as_u64()) {
                let e = live.entry(k.to_string()).or_insert(until);
                *e = (*e).max(until);
            }
        }
        live.retain(|_, until| *until > now_ms);
        let tmp = path.with_extension("tmp");
        let mut out = String::new();
        for (k, until) in &live {
            out.push_str(&serde_json::json!({"key": k, "until": until}).to_string());
            out.push('\n');
        }
        std::fs::write(&tmp, out)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let now = Instant::now();
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for (k, until) in &live {
            m.insert(k.clone(), now + Duration::from_millis(until - now_ms));
        }
        drop(m);
        *self.log.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::fs::OpenOptions::new().append(true).open(path)?);
        Ok(live.len())
    }

    fn denied(&self, key: &str) -> bool {
        let m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key).is_some_and(|until| *until > Instant::now())
    }

    pub fn check(&self, who: &Identity) -> Result<(), ApiError> {
        let revoked = self.denied(&Self::key("user", &who.user))
            || who.jti.as_deref().is_some_and(|j| self.denied(&Self::key("jti", j)));
        if revoked {
            return Err(ApiError::new(Code::TokenRevoked, "this token or user has been revoked"));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_patterns_are_exact_or_prefix() {
        assert!(claim_matches("chat:room1", "chat:room1"));
        assert!(!claim_matches("chat:room1", "chat:room10"));
        assert!(claim_matches("chat:*", "chat:room10"));
        assert!(!claim_matches("chat:*", "news:1"));
        assert!(claim_matches("*", "anything"));
    }

    #[test]
    fn deny_entries_expire() {
        let d = DenyList::default();
        let who =
            Identity { user: "u".into(), exp: 0, channels: None, info: None, jti: Some("t1".into()), direct: false };
        d.check(&who).unwrap();
        d.revoke_token("t1", Duration::from_secs(60)).unwrap();
        assert_eq!(d.check(&who).unwrap_err().code, Code::TokenRevoked);
        d.revoke_user("v", Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        d.revoke_user("w", Duration::from_secs(1)).unwrap();
        assert_eq!(d.len(), 2, "expired entries are dropped");
    }
}
