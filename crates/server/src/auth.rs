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
use crate::session::Resolved;

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
    /// Subscription tokens only: the one channel this token grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

/// Who a connection is, once its token checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub user: String,
    pub exp: u64,
    pub channels: Option<Vec<String>>,
    pub info: Option<serde_json::Value>,
    pub jti: Option<String>,
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

    /// `exp` and `nbf` against the server's clock, each with the configured leeway.
    fn check_times(&self, c: &Claims) -> Result<(), ApiError> {
        let now = self.clock.now_secs();
        if c.exp.saturating_add(self.leeway) < now {
            return Err(ApiError::new(Code::TokenExpired, "token expired"));
        }
        if c.nbf.is_some_and(|nbf| nbf > now.saturating_add(self.leeway)) {
            return Err(ApiError::new(Code::TokenInvalid, "token not valid yet (nbf is in the future)"));
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
                ApiError::new(code, format!("{what}: {e}"))
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
        Ok(Identity { user: c.sub, exp: c.exp, channels: c.channels, info: c.info, jti: c.jti })
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

/// Why the check is being made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

/// The one place that decides whether `who` may subscribe to / publish on `r`.
pub fn authorize(
    who: Option<&Identity>,
    r: &Resolved,
    action: Action,
    sub_token: Option<&str>,
    verifier: Option<&Verifier>,
    deny: &DenyList,
) -> Result<(), ApiError> {
    let ns: &NamespaceOptions = &r.options;
    let channel = r.channel.as_str();
    if action == Action::Publish && !ns.allow_publish {
        return Err(ApiError::new(
            Code::PublishNotAllowed,
            format!("clients may not publish in namespace {:?}", r.channel.namespace()),
        ));
    }
    let needs_identity = ns.require_token || ns.user_limited || ns.private;
    let Some(who) = who else {
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
    if ns.private && action == Action::Subscribe {
        let token = sub_token.ok_or_else(|| {
            ApiError::new(
                Code::SubscriptionTokenRequired,
                format!("{channel:?} is private: subscribe with a subscription token"),
            )
        })?;
        let verifier =
            verifier.ok_or_else(|| ApiError::new(Code::SubscriptionTokenInvalid, "token auth is not configured"))?;
        verifier.subscription(token, &who.user, channel)?;
    }
    Ok(())
}

/// Authorizes a wildcard subscription: the pattern itself must be covered by the
/// token's `channels` claim (only prefix claims can cover a pattern), and it may not
/// reach into private namespaces or other users' channels — which makes every channel it
/// can match authorized too.
pub fn authorize_pattern(
    who: Option<&Identity>,
    p: &crate::session::ResolvedPattern,
    deny: &DenyList,
) -> Result<(), ApiError> {
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
        if !allowed.iter().any(|c| claim_matches(c, raw)) {
            return Err(ApiError::new(Code::PermissionDenied, format!("the token does not grant the pattern {raw:?}")));
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
}

const MAX_DENY_ENTRIES: usize = 1_000_000;

impl DenyList {
    fn key(kind: &str, id: &str) -> String {
        format!("{kind}\u{0}{id}")
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
        m.insert(key, now + ttl);
        Ok(())
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
        let who = Identity { user: "u".into(), exp: 0, channels: None, info: None, jti: Some("t1".into()) };
        d.check(&who).unwrap();
        d.revoke_token("t1", Duration::from_secs(60)).unwrap();
        assert_eq!(d.check(&who).unwrap_err().code, Code::TokenRevoked);
        d.revoke_user("v", Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        d.revoke_user("w", Duration::from_secs(1)).unwrap();
        assert_eq!(d.len(), 2, "expired entries are dropped");
    }
}
