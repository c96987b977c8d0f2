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

fn file(content_type: &'static str, body: &'static str) -> Response {
    (StatusCode::OK, [("content-type", content_type), ("cache-control", "no-cache")], body).into_response()
}

pub async fn client_js() -> Response {
    file("text/javascript; charset=utf-8", CLIENT_JS)
}

pub async fn client_dts() -> Response {
    file("application/typescript; charset=utf-8", CLIENT_DTS)
}

pub async fn demo_chat(State(state): State<AppState>) -> Result<Response, ApiError> {
    if !state.dev {
        return Err(ApiError::new(Code::NotFound, "the demo is served under `switchboard serve --dev` only"));
    }
    Ok(file("text/html; charset=utf-8", DEMO_CHAT))
}
