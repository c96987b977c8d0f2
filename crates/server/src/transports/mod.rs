//! Transports: thin adapters from a wire format to the session and hub. None of them
//! knows another.

pub mod poll;
pub mod sse;
pub mod ws;

use crate::app::AppState;
use crate::error::{ApiError, Code};
use crate::session::Resolved;

/// Until connection tokens exist (auth issue), every client of these transports is
/// anonymous, so token-only namespaces are refused outright.
pub(crate) fn check_anonymous_access(_state: &AppState, channels: &[Resolved]) -> Result<(), ApiError> {
    if let Some(r) = channels.iter().find(|r| r.options.require_token) {
        return Err(ApiError::new(
            Code::TokenRequired,
            format!("namespace {:?} requires a token", r.channel.namespace()),
        ));
    }
    Ok(())
}
