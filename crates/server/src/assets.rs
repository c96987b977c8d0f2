//! Files the server serves itself: the JavaScript client (always, so a page can
//! `import` it with no build step) and the demo chat (under `--dev`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::error::{ApiError, Code};

const CLIENT_JS: &str = include_str!("../../../clients/js/switchboard.js");
const CLIENT_DTS: &str = include_str!("../../../clients/js/switchboard.d.ts");
const DEMO_CHAT: &str = include_str!("../../../clients/js/demo/chat.html");
const DEMO_CALL: &str = include_str!("../../../clients/js/demo/call.html");

fn file(content_type: &'static str, body: &'static str) -> Response {
    (StatusCode::OK, [("content-type", content_type), ("cache-control", "no-cache")], body).into_response()
}

/// A public file any page may load — `import` of a module script from another origin
/// needs CORS like any cross-origin read.
fn public_file(content_type: &'static str, body: &'static str) -> Response {
    let mut r = file(content_type, body);
    r.headers_mut().insert("access-control-allow-origin", axum::http::HeaderValue::from_static("*"));
    r
}

pub async fn client_js() -> Response {
    public_file("text/javascript; charset=utf-8", CLIENT_JS)
}

pub async fn client_dts() -> Response {
    public_file("application/typescript; charset=utf-8", CLIENT_DTS)
}

pub async fn demo_chat(State(state): State<AppState>) -> Result<Response, ApiError> {
    demo(&state, DEMO_CHAT)
}

/// `/demo/call`: a WebRTC call whose signaling is Switchboard's direct messages.
pub async fn demo_call(State(state): State<AppState>) -> Result<Response, ApiError> {
    demo(&state, DEMO_CALL)
}

fn demo(state: &AppState, page: &'static str) -> Result<Response, ApiError> {
    if !state.dev {
        return Err(ApiError::new(Code::NotFound, "the demo is served under `switchboard serve --dev` only"));
    }
    Ok(file("text/html; charset=utf-8", page))
}
