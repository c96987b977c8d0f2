//! The HTTP error shape: `{"error":{"code":…,"message":…}}` with a documented code.
//! Every code is listed in `docs/errors.md`; keep the two in step.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use switchboard_core::{BrokerError, ChannelError, HubError};

/// Machine-readable error codes (the `code` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidJson,
    InvalidRequest,
    InvalidChannel,
    UnknownNamespace,
    TooManyChannels,
    MessageTooLarge,
    BadCursor,
    BadWait,
    BadLimit,
    BadRewind,
    InvalidIdempotencyKey,
    InvalidPattern,
    HistoryDisabled,
    TokenRequired,
    Unauthorized,
    TransportDisabled,
    NotFound,
    MethodNotAllowed,
    BrokerUnavailable,
    StorageFull,
    UpgradeRequired,
    UnknownCommand,
    AlreadySubscribed,
    NotSubscribed,
    PublishNotAllowed,
    TooManySubscriptions,
    RateLimited,
    PresenceDisabled,
    TokenInvalid,
    TokenExpired,
    TokenRevoked,
    PermissionDenied,
    SubscriptionTokenRequired,
    SubscriptionTokenInvalid,
    OriginNotAllowed,
    ServerBusy,
    TooManyConnections,
    TooManyConnectionsFromIp,
    UriTooLong,
    HeadersTooLarge,
    TlsRequired,
    ClientCertificateRequired,
    TargetNotConnected,
}

impl Code {
    /// Every code (docs/errors.md must list each).
    pub const ALL: [Code; 43] = [
        Code::InvalidJson,
        Code::InvalidRequest,
        Code::InvalidChannel,
        Code::UnknownNamespace,
        Code::TooManyChannels,
        Code::MessageTooLarge,
        Code::BadCursor,
        Code::BadWait,
        Code::BadLimit,
        Code::BadRewind,
        Code::InvalidIdempotencyKey,
        Code::InvalidPattern,
        Code::HistoryDisabled,
        Code::TokenRequired,
        Code::Unauthorized,
        Code::TransportDisabled,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::BrokerUnavailable,
        Code::StorageFull,
        Code::UpgradeRequired,
        Code::UnknownCommand,
        Code::AlreadySubscribed,
        Code::NotSubscribed,
        Code::PublishNotAllowed,
        Code::TooManySubscriptions,
        Code::RateLimited,
        Code::PresenceDisabled,
        Code::TokenInvalid,
        Code::TokenExpired,
        Code::TokenRevoked,
        Code::PermissionDenied,
        Code::SubscriptionTokenRequired,
        Code::SubscriptionTokenInvalid,
        Code::OriginNotAllowed,
        Code::ServerBusy,
        Code::TooManyConnections,
        Code::TooManyConnectionsFromIp,
        Code::UriTooLong,
        Code::HeadersTooLarge,
        Code::TlsRequired,
        Code::ClientCertificateRequired,
        Code::TargetNotConnected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidJson => "invalid_json",
            Code::InvalidRequest => "invalid_request",
            Code::InvalidChannel => "invalid_channel",
            Code::UnknownNamespace => "unknown_namespace",
            Code::TooManyChannels => "too_many_channels",
            Code::MessageTooLarge => "message_too_large",
            Code::BadCursor => "bad_cursor",
            Code::BadWait => "bad_wait",
            Code::BadLimit => "bad_limit",
            Code::BadRewind => "bad_rewind",
            Code::InvalidIdempotencyKey => "invalid_idempotency_key",
            Code::InvalidPattern => "invalid_pattern",
            Code::HistoryDisabled => "history_disabled",
            Code::TokenRequired => "token_required",
            Code::Unauthorized => "unauthorized",
            Code::TransportDisabled => "transport_disabled",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::BrokerUnavailable => "broker_unavailable",
            Code::StorageFull => "storage_full",
            Code::UpgradeRequired => "upgrade_required",
            Code::UnknownCommand => "unknown_command",
            Code::AlreadySubscribed => "already_subscribed",
            Code::NotSubscribed => "not_subscribed",
            Code::PublishNotAllowed => "publish_not_allowed",
            Code::TooManySubscriptions => "too_many_subscriptions",
            Code::RateLimited => "rate_limited",
            Code::PresenceDisabled => "presence_disabled",
            Code::TokenInvalid => "token_invalid",
            Code::TokenExpired => "token_expired",
            Code::TokenRevoked => "token_revoked",
            Code::PermissionDenied => "permission_denied",
            Code::SubscriptionTokenRequired => "subscription_token_required",
            Code::SubscriptionTokenInvalid => "subscription_token_invalid",
            Code::OriginNotAllowed => "origin_not_allowed",
            Code::ServerBusy => "server_busy",
            Code::TooManyConnections => "too_many_connections",
            Code::TooManyConnectionsFromIp => "too_many_connections_from_ip",
            Code::UriTooLong => "uri_too_long",
            Code::HeadersTooLarge => "headers_too_large",
            Code::TlsRequired => "tls_required",
            Code::ClientCertificateRequired => "client_certificate_required",
            Code::TargetNotConnected => "target_not_connected",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidJson
            | Code::InvalidRequest
            | Code::InvalidChannel
            | Code::TooManyChannels
            | Code::BadCursor
            | Code::BadWait
            | Code::BadLimit
            | Code::BadRewind
            | Code::InvalidIdempotencyKey
            | Code::InvalidPattern => StatusCode::BAD_REQUEST,
            Code::UnknownNamespace | Code::NotFound | Code::TransportDisabled => StatusCode::NOT_FOUND,
            Code::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::HistoryDisabled => StatusCode::CONFLICT,
            Code::TokenRequired | Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::BrokerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            Code::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Code::UnknownCommand | Code::TooManySubscriptions => StatusCode::BAD_REQUEST,
            Code::AlreadySubscribed | Code::NotSubscribed | Code::PresenceDisabled => StatusCode::CONFLICT,
            Code::PublishNotAllowed => StatusCode::FORBIDDEN,
            Code::RateLimited | Code::TooManyConnectionsFromIp => StatusCode::TOO_MANY_REQUESTS,
            Code::TokenInvalid | Code::TokenExpired | Code::TokenRevoked => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied
            | Code::SubscriptionTokenRequired
            | Code::SubscriptionTokenInvalid
            | Code::OriginNotAllowed => StatusCode::FORBIDDEN,
            Code::ServerBusy | Code::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            Code::UriTooLong => StatusCode::URI_TOO_LONG,
            Code::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Code::TlsRequired => StatusCode::BAD_REQUEST,
            Code::ClientCertificateRequired => StatusCode::UNAUTHORIZED,
            Code::TargetNotConnected => StatusCode::NOT_FOUND,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// Seconds the client should wait before retrying (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), retry_after: None }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn channel(name: &str, e: ChannelError) -> Self {
        let shown: String = name.chars().take(64).collect();
        ApiError::new(Code::InvalidChannel, format!("invalid channel {shown:?}: {e}"))
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({"error": {"code": self.code.as_str(), "message": self.message}}).to_string()
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        // The backing store's own words (a socket error, a Redis reply) go to the log.
        tracing::debug!("broker error: {e}");
        if let BrokerError::StorageFull(why) = &e {
            tracing::error!("the durable broker cannot write its journal: {why}");
            return ApiError::new(
                Code::StorageFull,
                "the server cannot store the publication (its disk is full); it was not published",
            );
        }
        ApiError::new(Code::BrokerUnavailable, "the broker cannot be reached right now; retry with backoff")
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        match e {
            HubError::Broker(b) => b.into(),
        }
    }
}

/// Marks a response as carrying this error code, so the router's error-counting layer
/// ([`crate::app::router`]) can count it in the server's own metrics.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub Code);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.code.status(), [("content-type", "application/json")], self.body()).into_response();
        r.extensions_mut().insert(ErrorCode(self.code));
        if let Some(secs) = self.retry_after {
            r.headers_mut().insert("retry-after", axum::http::HeaderValue::from(secs));
        }
        if self.code == Code::Unauthorized {
            r.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    #[test]
    fn every_code_is_documented_in_errors_md() {
        let doc = include_str!("../../../docs/errors.md");
        for c in Code::ALL {
            assert!(doc.contains(&format!("`{}`", c.as_str())), "docs/errors.md does not list `{}`", c.as_str());
        }
    }
}
