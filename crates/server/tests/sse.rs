//! The delivery guarantees over Server-Sent Events, over real HTTP on loopback.

mod common;

use std::time::Duration;

use common::{channel, config, Sse, TestServer};
use serde_json::json;

#[tokio::test]
async fn delivers_every_publication_in_order_without_duplicates() {
    let s = TestServer::start(config("")).await;
    let ch = channel("news");
    let mut sse = Sse::connect(&s, &format!("channel={ch}"), None).await;
    let sub = sse.next_named("subscribed").await;
    assert_eq!(sub.json()["channels"][0]["offset"], 0);
    for i in 1..=100 {
        s.publish(&ch, json!({"i": i})).await;
    }
    for i in 1..=100u64 {
        let e = sse.next_named("message").await;
        let v = e.json();
        assert_eq!(v["offset"], i);
        assert_eq!(v["data"]["i"], i);
        assert_eq!(v["channel"], ch.as_str());
        assert_eq!(e.id.as_deref(), Some(format!("{}:{i}", v["epoch"].as_str().unwrap()).as_str()));
    }
}

#[tokio::test]
async fn sends_retry_once_and_keepalive_comments() {
    let s = TestServer::start(config("[sse]\nkeepalive_secs = 1\nretry_ms = 1234\n")).await;
    let mut sse = Sse::connect(&s, &format!("channel={}", channel("k")), None).await;
    let first = sse.next().await.unwrap();
    assert_eq!(first.event, "subscribed");
    assert_eq!(sse.retry, Some(1234), "retry: must come before the first event");
    let ch = channel("k");
    let mut sse2 = Sse::connect(&s, &format!("channel={ch}"), None).await;
    let _ = sse2.next().await;
    s.publish(&ch, json!(1)).await;
    let _ = sse2.next_named("message").await;
    assert_eq!(sse2.comments, 0);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.publish(&ch, json!(2)).await;
    let _ = sse2.next_named("message").await;
    assert!(sse2.comments >= 1, "no keepalive comment in 2.5 s with keepalive_secs = 1");
}

#[tokio::test]
async fn resume_with_last_event_id_replays_exactly_the_missed_then_goes_live() {
    let s = TestServer::start(config("")).await;
    let ch = channel("chat");
    let mut sse = Sse::connect(&s, &format!("channel={ch}"), None).await;
    for i in 1..=5 {
        s.publish(&ch, json!(i)).await;
    }
    assert_eq!(sse.offsets(5).await, vec![1, 2, 3, 4, 5]);
    let last = sse.last_id.clone().unwrap();
    drop(sse);
    for i in 6..=10 {
        s.publish(&ch, json!(i)).await;
    }
    let mut again = Sse::connect(&s, &format!("channel={ch}"), Some(&last)).await;
    let sub = again.next_named("subscribed").await;
    assert_eq!(sub.json()["channels"][0]["recovered"], true);
    assert_eq!(again.offsets(5).await, vec![6, 7, 8, 9, 10]);
    s.publish(&ch, json!(11)).await;
    assert_eq!(again.offsets(1).await, vec![11]);
}

#[tokio::test]
async fn resume_with_last_event_id_query_parameter() {
    let s = TestServer::start(config("")).await;
    let ch = channel("chat");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    s.publish(&ch, json!(2)).await;
    let mut sse = Sse::connect(&s, &format!("channel={ch}&last_event_id={epoch}:1"), None).await;
    assert_eq!(sse.offsets(1).await, vec![2]);
    // `since`, as the WebSocket URL and polling name it, does the same; a bad one is
    // refused as a bad `last_event_id` is.
    let mut sse = Sse::connect(&s, &format!("channel={ch}&since={epoch}:1"), None).await;
    assert_eq!(sse.offsets(1).await, vec![2]);
    let (st, v) = s.get_json(&format!("/sse?channel={ch}&since=garbage")).await;
    assert_eq!((st, v["error"]["code"].as_str()), (400, Some("bad_cursor")));
}

#[tokio::test]
async fn position_older_than_history_gets_an_explicit_reset() {
    let s = TestServer::start(config("[namespaces.short]\nhistory_size = 3\n")).await;
    let ch = channel("short");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    for i in 2..=10 {
        s.publish(&ch, json!(i)).await;
    }
    let mut sse = Sse::connect(&s, &format!("channel={ch}"), Some(&format!("{epoch}:2"))).await;
    let sub = sse.next_named("subscribed").await;
    assert_eq!(sub.json()["channels"][0]["recovered"], false);
    let reset = sse.next().await.unwrap();
    assert_eq!(reset.event, "reset");
    let v = reset.json();
    assert_eq!(v["offset"], 10);
    assert_eq!(v["epoch"], epoch.as_str());
    assert_eq!(v["reason"], "position_lost");
    assert_eq!(reset.id.as_deref(), Some(format!("{epoch}:10").as_str()));
    s.publish(&ch, json!(11)).await;
    assert_eq!(sse.offsets(1).await, vec![11]);
}

#[tokio::test]
async fn a_resume_further_behind_than_recovery_max_gets_a_reset_not_a_long_replay() {
    let s = TestServer::start(config("[namespaces.deep]\nhistory_size = 100\nrecovery_max = 3\n")).await;
    let ch = channel("deep");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    for i in 2..=10 {
        s.publish(&ch, json!(i)).await;
    }
    // Seven behind, three allowed: told to reset, at the top.
    let mut sse = Sse::connect(&s, &format!("channel={ch}"), Some(&format!("{epoch}:3"))).await;
    let reset = sse.next_named("reset").await;
    assert_eq!((reset.json()["offset"].as_u64(), reset.json()["reason"].as_str()), (Some(10), Some("position_lost")));
    s.publish(&ch, json!(11)).await;
    assert_eq!(sse.offsets(1).await, vec![11]);
    // Three behind: replayed.
    let mut sse = Sse::connect(&s, &format!("channel={ch}"), Some(&format!("{epoch}:8"))).await;
    assert_eq!(sse.offsets(3).await, vec![9, 10, 11]);
}

#[tokio::test]
async fn position_from_another_epoch_gets_an_explicit_reset() {
    let s = TestServer::start(config("")).await;
    let ch = channel("chat");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    let mut sse = Sse::connect(&s, &format!("channel={ch}"), Some("someoldepoch:1")).await;
    let reset = sse.next_named("reset").await;
    assert_eq!(reset.json()["epoch"], epoch.as_str());
    assert_eq!(reset.json()["offset"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_racing_a_resume_is_delivered_exactly_once() {
    let s = TestServer::start(config("[defaults]\nhistory_size = 1000\n")).await;
    for round in 0..5 {
        let ch = channel("race");
        let (epoch, _) = s.publish(&ch, json!(0)).await;
        let publisher = {
            let (http, url, ch) = (s.http.clone(), s.url("/api/publish"), ch.clone());
            tokio::spawn(async move {
                for i in 1..=150 {
                    let r = http.post(&url).json(&json!({"channel": ch, "data": i})).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        };
        // Subscribe while the publisher runs, resuming from the first publication.
        tokio::time::sleep(Duration::from_millis(5 * round)).await;
        let mut sse = Sse::connect(&s, &format!("channel={ch}"), Some(&format!("{epoch}:1"))).await;
        publisher.await.unwrap();
        assert_eq!(sse.offsets(150).await, (2..=151).collect::<Vec<_>>(), "round {round}");
    }
}

#[tokio::test]
async fn several_channels_share_one_stream_and_one_cursor() {
    let s = TestServer::start(config("")).await;
    let (a, b) = (channel("multi"), channel("multi"));
    let mut sse = Sse::connect(&s, &format!("channel={a}&channel={b}"), None).await;
    s.publish(&a, json!("a1")).await;
    s.publish(&b, json!("b1")).await;
    s.publish(&a, json!("a2")).await;
    let got: Vec<(String, u64)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let e = sse.next_named("message").await.json();
            v.push((e["channel"].as_str().unwrap().to_string(), e["offset"].as_u64().unwrap()));
        }
        v
    };
    assert_eq!(got, vec![(a.clone(), 1), (b.clone(), 1), (a.clone(), 2)]);
    let cursor = sse.last_id.clone().unwrap();
    assert_eq!(cursor.split(',').count(), 2);
    drop(sse);
    s.publish(&b, json!("b2")).await;
    s.publish(&a, json!("a3")).await;
    let mut again = Sse::connect(&s, &format!("channel={a}&channel={b}"), Some(&cursor)).await;
    let mut resumed = Vec::new();
    for _ in 0..2 {
        let e = again.next_named("message").await.json();
        resumed.push((e["channel"].as_str().unwrap().to_string(), e["offset"].as_u64().unwrap()));
    }
    resumed.sort();
    assert_eq!(resumed, vec![(a, 3), (b, 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_each_receive_a_whole_burst_in_order() {
    let s = TestServer::start(config("")).await;
    let ch = channel("crowd");
    let mut subs = Vec::new();
    for _ in 0..1000 {
        let mut sse = Sse::connect(&s, &format!("channel={ch}"), None).await;
        sse.next_named("subscribed").await;
        subs.push(sse);
    }
    let (_, channels) = s.get_json("/api/channels").await;
    assert_eq!(channels["channels"][0]["subscribers"], 1000);
    for i in 1..=50 {
        s.publish(&ch, json!({"i": i})).await;
    }
    let mut tasks = Vec::new();
    for mut sse in subs {
        tasks.push(tokio::spawn(async move { sse.offsets(50).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (1..=50).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn shutdown_tells_subscribers_to_reconnect() {
    let s = TestServer::start(config("")).await;
    let ch = channel("bye");
    let mut sse = Sse::connect(&s, &format!("channel={ch}"), None).await;
    sse.next_named("subscribed").await;
    s.publish(&ch, json!(1)).await;
    let stop = tokio::spawn(s.shutdown());
    let mut saw_message = false;
    let bye = loop {
        let e = sse.next().await.expect("stream ended without a disconnect event");
        if e.event == "message" {
            saw_message = true;
        }
        if e.event == "disconnect" {
            break e;
        }
    };
    assert!(saw_message, "queued message not flushed before the disconnect");
    assert_eq!(bye.json()["reason"], "shutdown");
    assert_eq!(bye.json()["reconnect"], true);
    assert!(bye.retry.is_some());
    assert!(sse.next().await.is_none());
    stop.await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_documented_errors() {
    let s = TestServer::start(config("strict_namespaces = true\n[namespaces.ok]\n[namespaces.priv]\nrequire_token = true\n[limits]\nmax_channels_per_request = 2\n")).await;
    let cases = [
        ("/sse", 400, "invalid_request"),
        ("/sse?channel=a%20b", 400, "invalid_channel"),
        ("/sse?channel=nope:1", 404, "unknown_namespace"),
        ("/sse?channel=ok:1&channel=ok:2&channel=ok:3", 400, "too_many_channels"),
        ("/sse?channel=ok:1&last_event_id=garbage", 400, "bad_cursor"),
        ("/sse?channel=ok:1&channel=ok:2&last_event_id=abc:1", 400, "bad_cursor"),
        ("/sse?channel=ok:1&channel=ok:1", 400, "invalid_request"),
        ("/sse?channel=priv:1", 401, "token_required"),
    ];
    for (path, status, code) in cases {
        let (st, body) = s.get_json(path).await;
        assert_eq!((st, body["error"]["code"].as_str().unwrap()), (status, code), "{path}: {body}");
    }
    let r = s.http.get(s.url("/sse?channel=ok:1")).header("Last-Event-ID", "x:y").send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn rewind_sends_the_last_n_before_live() {
    let s = TestServer::start(config("[namespaces.small]\nhistory_size = 3\n")).await;
    let ch = channel("rw");
    for i in 1..=5 {
        s.publish(&ch, json!(i)).await;
    }
    let mut sse = Sse::connect(&s, &format!("channel={ch}&rewind=2"), None).await;
    let sub = sse.next_named("subscribed").await;
    assert_eq!(sub.json()["channels"][0]["offset"], 3);
    assert_eq!(sse.offsets(2).await, vec![4, 5]);
    s.publish(&ch, json!(6)).await;
    assert_eq!(sse.offsets(1).await, vec![6]);
    let (st, v) = s.get_json(&format!("/sse?channel={}&rewind=4", channel("small"))).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (400, "bad_rewind"));
}

/// A bare HTTP/1.x client on one TCP connection, to see the bytes a browser or curl sees.
struct RawHttp {
    tcp: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawHttp {
    async fn connect(s: &TestServer) -> RawHttp {
        RawHttp { tcp: tokio::net::TcpStream::connect(s.addr).await.unwrap(), buf: Vec::new() }
    }

    async fn send(&mut self, head: &str) {
        use tokio::io::AsyncWriteExt;
        self.tcp.write_all(head.as_bytes()).await.unwrap();
    }

    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), self.tcp.read(&mut chunk))
            .await
            .expect("nothing from the server within 20 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next response head: its status line and headers (names lowercased).
    async fn head(&mut self) -> (String, Vec<(String, String)>) {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                let text = String::from_utf8(head).unwrap();
                let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
                let status = lines.next().unwrap().to_string();
                let headers = lines
                    .map(|l| {
                        let (k, v) = l.split_once(':').unwrap();
                        (k.trim().to_ascii_lowercase(), v.trim().to_string())
                    })
                    .collect();
                return (status, headers);
            }
            assert!(self.fill().await, "connection closed before a response head");
        }
    }

    /// Exactly `n` body bytes.
    async fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed inside a body");
        }
        self.buf.drain(..n).collect()
    }

    /// One chunk of a chunked body (empty: the last).
    async fn chunk(&mut self) -> Vec<u8> {
        let line = loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                break String::from_utf8(line).unwrap();
            }
            assert!(self.fill().await, "connection closed inside a chunked body");
        };
        let size = usize::from_str_radix(line.trim(), 16).unwrap_or_else(|_| panic!("bad chunk size {line:?}"));
        let data = self.bytes(size + 2).await;
        assert_eq!(&data[size..], b"\r\n");
        data[..size].to_vec()
    }

    /// Body text from chunks until it holds `needle`.
    async fn chunks_until(&mut self, needle: &str) -> String {
        let mut text = String::new();
        while !text.contains(needle) {
            let c = self.chunk().await;
            assert!(!c.is_empty(), "the stream ended before {needle:?}: {text}");
            text.push_str(std::str::from_utf8(&c).unwrap());
        }
        text
    }

    /// Everything until the server closes.
    async fn rest(&mut self) -> String {
        while self.fill().await {}
        String::from_utf8(std::mem::take(&mut self.buf)).unwrap()
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Waits (a minute at most) until `channel` has no subscriber left on the server.
async fn until_unsubscribed(s: &TestServer, channel: &str) -> bool {
    for _ in 0..3000 {
        let (_, v) = s.get_json("/api/channels").await;
        if !v["channels"].as_array().unwrap().iter().any(|c| c["channel"] == channel) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_stream_on_a_fresh_connection_is_chunked_and_its_client_leaving_is_seen_at_once() {
    // Keepalives an hour apart: nothing is written that could reveal the client's leaving.
    let s = TestServer::start(config("[sse]\nkeepalive_secs = 3600\n")).await;
    let ch = channel("news");
    let mut c = RawHttp::connect(&s).await;
    c.send(&format!("GET /sse?channel={ch} HTTP/1.1\r\nHost: x\r\nOrigin: http://example.com\r\n\r\n")).await;
    let (status, headers) = c.head().await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(header(&headers, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&headers, "transfer-encoding"), Some("chunked"));
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"), "the router's CORS layer ran");
    assert!(header(&headers, "date").is_some());
    c.chunks_until("event: subscribed").await;
    s.publish(&ch, json!("hello")).await;
    let text = c.chunks_until("event: message").await;
    assert!(text.contains("\"data\":\"hello\""), "{text}");
    drop(c);
    assert!(until_unsubscribed(&s, &ch).await, "a closed SSE client still subscribed after a minute");
    let after = s.http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(after.contains("switchboard_connections{transport=\"sse\"} 0\n"), "{after}");
}

#[tokio::test]
async fn http_1_0_clients_get_the_stream_delimited_by_the_close() {
    let s = TestServer::start(config("")).await;
    let ch = channel("news");
    s.publish(&ch, json!(1)).await;
    let mut c = RawHttp::connect(&s).await;
    c.send(&format!("GET /sse?channel={ch}&rewind=1 HTTP/1.0\r\n\r\n")).await;
    let (status, headers) = c.head().await;
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(header(&headers, "transfer-encoding"), None);
    assert_eq!(header(&headers, "connection"), Some("close"));
    while !String::from_utf8_lossy(&c.buf).contains("event: message") {
        assert!(c.fill().await);
    }
    s.shutdown().await;
    // The server's goodbye, unframed, and then the close.
    assert!(c.rest().await.contains("event: disconnect"));
}

#[tokio::test]
async fn an_sse_request_after_another_on_one_connection_is_served_too() {
    let s = TestServer::start(config("")).await;
    let ch = channel("news");
    let mut c = RawHttp::connect(&s).await;
    c.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (status, headers) = c.head().await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let len: usize = header(&headers, "content-length").unwrap().parse().unwrap();
    c.bytes(len).await;
    c.send(&format!("GET /sse?channel={ch} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
    let (status, headers) = c.head().await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(header(&headers, "content-type"), Some("text/event-stream"));
    c.chunks_until("event: subscribed").await;
    s.publish(&ch, json!("hello")).await;
    assert!(c.chunks_until("event: message").await.contains("\"data\":\"hello\""));
}

#[tokio::test]
async fn bad_heads_on_a_fresh_connection_get_json_errors_in_full() {
    let s = TestServer::start(config("")).await;
    let cases = [
        (
            "GET /sse?channel=bad%20name HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            "HTTP/1.1 400 Bad Request",
            "invalid_channel",
        ),
        (
            format!("GET /sse?channel=a&pad={} HTTP/1.1\r\nHost: x\r\n\r\n", "x".repeat(9000)),
            "HTTP/1.1 414 URI Too Long",
            "uri_too_long",
        ),
        (
            format!("GET /sse?channel=a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "x".repeat(40_000)),
            "HTTP/1.1 431 Request Header Fields Too Large",
            "headers_too_large",
        ),
        (
            "GET /sse?channel=a HTTP/1.1\r\nBad Header: x\r\n\r\n".to_string(),
            "HTTP/1.1 400 Bad Request",
            "invalid_request",
        ),
    ];
    for (request, want_status, want_code) in cases {
        let mut c = RawHttp::connect(&s).await;
        c.send(&request).await;
        let (status, headers) = c.head().await;
        assert_eq!(status, want_status, "{want_code}");
        assert_eq!(header(&headers, "connection"), Some("close"));
        let len: usize = header(&headers, "content-length").unwrap().parse().unwrap();
        let body: serde_json::Value = serde_json::from_slice(&c.bytes(len).await).unwrap();
        assert_eq!(body["error"]["code"], want_code);
        assert_eq!(c.rest().await, "", "nothing after the response but the close");
    }
    let text = s.http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for code in ["invalid_channel", "uri_too_long", "headers_too_large", "invalid_request"] {
        assert!(
            text.contains(&format!("switchboard_errors_total{{code=\"{code}\"}} 1\n")),
            "{code} not counted: {text}"
        );
    }
}
