//! CORS: pages of allowed origins may use every browser-facing endpoint, others are
//! refused before anything happens, preflights are answered, and the server API stays
//! server to server. (The same in a real browser: tests/browser/cors.test.mjs.)

mod common;

use common::{channel, config, TestServer};
use serde_json::json;

const PAGE: &str = "https://app.example.com";

async fn listed() -> TestServer {
    TestServer::start(config(&format!(
        "[security]\nallowed_origins = [\"{PAGE}\"]\n[namespaces.chat]\nallow_publish = true\npresence = true\n"
    )))
    .await
}

#[tokio::test]
async fn a_listed_origin_gets_cors_with_credentials_on_every_browser_endpoint() {
    let s = listed().await;
    let ch = channel("chat");
    s.publish(&ch, json!(1)).await;
    for path in
        [format!("/poll?channel={ch}"), format!("/history?channel={ch}"), format!("/presence_stats?channel={ch}")]
    {
        let r = s.http.get(s.url(&path)).header("origin", PAGE).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["access-control-allow-origin"], PAGE, "{path}");
        assert_eq!(r.headers()["access-control-allow-credentials"], "true", "{path}");
        assert!(r.headers().get_all("vary").iter().any(|v| v == "Origin"), "{path}");
    }
    let sse = s.http.get(s.url(&format!("/sse?channel={ch}"))).header("origin", PAGE).send().await.unwrap();
    assert_eq!((sse.status().as_u16(), sse.headers()["access-control-allow-origin"].to_str().unwrap()), (200, PAGE));
    let r = s
        .http
        .post(s.url("/publish"))
        .header("origin", PAGE)
        .json(&json!({"channel": ch, "data": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["access-control-allow-origin"].to_str().unwrap()), (200, PAGE));
}

#[tokio::test]
async fn preflights_are_answered_for_listed_origins_and_refused_for_others() {
    let s = listed().await;
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, s.url("/publish"))
        .header("origin", PAGE)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], PAGE);
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    let allowed = h["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type") && allowed.contains("last-event-id"));
    assert_eq!(h["access-control-max-age"], "600");
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, s.url("/poll"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn another_origin_is_refused_before_anything_is_published() {
    let s = listed().await;
    let ch = channel("chat");
    let r = s
        .http
        .post(s.url("/publish"))
        .header("origin", "https://evil.example")
        .json(&json!({"channel": ch, "data": "forged"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "origin_not_allowed");
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}")).await;
    assert_eq!(h["publications"], json!([]), "nothing was published");
    for path in [format!("/poll?channel={ch}"), format!("/sse?channel={ch}"), format!("/history?channel={ch}")] {
        let r = s.http.get(s.url(&path)).header("origin", "https://evil.example").send().await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
}

#[tokio::test]
async fn without_a_list_any_page_may_read_without_credentials() {
    let s = TestServer::start(config("")).await;
    let r = s
        .http
        .get(s.url(&format!("/poll?channel={}", channel("news"))))
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers().get("access-control-allow-credentials").is_none());
    // The client library can be imported from any page; the server API sends no CORS.
    let js = s.http.get(s.url("/client.js")).header("origin", "http://localhost:5173").send().await.unwrap();
    assert_eq!(js.headers()["access-control-allow-origin"], "*");
    let api = s
        .http
        .post(s.url("/api/publish"))
        .header("origin", "http://localhost:5173")
        .json(&json!({"channel": "news:x", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 200);
    assert!(api.headers().get("access-control-allow-origin").is_none());
}
