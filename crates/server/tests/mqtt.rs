//! MQTT 3.1.1 and 5 on the server's channels, with Mosquitto's own clients
//! (`mosquitto_pub`, `mosquitto_sub`) end to end beside SSE and WebSocket subscribers, and
//! a raw client (tests/common/mqtt.rs) for reason codes, retained flags, QoS flows, wills
//! and malformed packets.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::mqtt::{packet, props_block, str16_of, Mqtt, Via};
use common::{channel, config, Sse, TestServer};
use serde_json::{json, Value};
use switchboard_client::Connection;
use tokio::io::{AsyncBufReadExt, BufReader};

const CONFIG: &str = "[mqtt]\nlisten = \"127.0.0.1:0\"\n\
    [namespaces.sensors]\nallow_publish = true\nhistory_size = 100\n\
    [namespaces.readonly]\nhistory_size = 10\n";

async fn server() -> TestServer {
    TestServer::start(config(CONFIG)).await
}

/// `mosquitto_sub` printing `topic payload` lines, for `count` messages.
fn mosquitto_sub(s: &TestServer, version: &str, filter: &str, count: usize) -> tokio::process::Child {
    let port = s.mqtt.unwrap().port().to_string();
    tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-t", filter, "-v", "-C", &count.to_string()])
        .args(["-W", "60"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (Debian: mosquitto-clients; ./scripts/test installs it)")
}

async fn mosquitto_pub(s: &TestServer, version: &str, topic: &str, message: &str, qos: u8) -> bool {
    let port = s.mqtt.unwrap().port().to_string();
    tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-t", topic, "-m", message, "-q", &qos.to_string()])
        .status()
        .await
        .unwrap()
        .success()
}

/// A name part unique across tests and across runs (the NATS nodes share their streams
/// with earlier runs).
fn unique_id() -> String {
    format!("{}-{}", channel("x").replace("x:", ""), fastrand::u32(..))
}

/// A configured device (`[[mqtt.users]]`) with this password, and `more` of its entry.
fn configured_user(name: &str, password: &str, more: &str) -> String {
    let hash = switchboard_server::auth::hex(ring::digest::digest(&ring::digest::SHA256, password.as_bytes()).as_ref());
    format!("[[mqtt.users]]\nname = \"{name}\"\npassword_sha256 = \"{hash}\"\n{more}")
}

/// Waits until `channel` has `n` subscribers on this node (subscriptions are live).
async fn subscribers(s: &TestServer, channel: &str, n: u64) {
    for _ in 0..600 {
        let (_, v) = s.get_json("/api/channels?scope=node").await;
        let count = v["channels"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["channel"] == channel).and_then(|c| c["subscribers"].as_u64()));
        if count.unwrap_or(0) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{channel} never had {n} subscribers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_of_both_versions_share_channels_with_sse_and_websocket() {
    let s = server().await;
    let id = channel("x").replace("x:", "");
    let ch = format!("sensors:{id}/temp");
    let topic = format!("sensors/{id}/temp");
    // Subscribers: MQTT 3.1.1 on a wildcard, MQTT 5 on the topic, SSE, WebSocket.
    let mut v311 = mosquitto_sub(&s, "mqttv311", &format!("sensors/{id}/+"), 4);
    let mut v5 = mosquitto_sub(&s, "mqttv5", &topic, 4);
    let mut sse = Sse::connect(&s, &format!("channel={ch}"), None).await;
    let mut ws = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    ws.subscribe(&ch, None).await.unwrap();
    subscribers(&s, &ch, 3).await; // the pattern subscription is not counted per channel
                                   // A long-poll client's cursor from before the publications.
    let (_, first) = s.get_json(&format!("/poll?channel={ch}")).await;
    let cursor = first["cursor"].as_str().unwrap().to_string();
    // Publishers: MQTT 3.1.1 at QoS 0 and 1, MQTT 5 at QoS 2, the server API.
    assert!(mosquitto_pub(&s, "mqttv311", &topic, "hello", 0).await);
    assert!(mosquitto_pub(&s, "mqttv311", &topic, "{\"c\":21.5}", 1).await);
    assert!(mosquitto_pub(&s, "mqttv5", &topic, "42", 2).await);
    s.publish(&ch, json!("from the API")).await;
    let want_data = vec![json!("hello"), json!({"c": 21.5}), json!(42), json!("from the API")];
    let want_lines: Vec<String> =
        ["hello", "{\"c\":21.5}", "42", "from the API"].iter().map(|p| format!("{topic} {p}")).collect();
    for (name, child) in [("3.1.1", &mut v311), ("5", &mut v5)] {
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut got = Vec::new();
        while let Some(l) = lines.next_line().await.unwrap() {
            got.push(l);
        }
        assert_eq!(got, want_lines, "mosquitto_sub MQTT {name}");
    }
    let events: Vec<Value> = {
        let mut v = Vec::new();
        while v.len() < 4 {
            let e = sse.next().await.expect("SSE event");
            if e.event == "message" {
                v.push(e.json()["data"].clone());
            }
        }
        v
    };
    assert_eq!(events, want_data, "SSE");
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(ws.next_pub().await.unwrap()["data"].clone());
    }
    assert_eq!(got, want_data, "WebSocket");
    let (_, polled) = s.get_json(&format!("/poll?channel={ch}&since={cursor}")).await;
    let data: Vec<Value> = polled["messages"].as_array().unwrap().iter().map(|m| m["data"].clone()).collect();
    assert_eq!(data, want_data, "long polling");
}

#[tokio::test]
async fn retained_publications_qos_flows_and_exactly_once_for_qos2() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let id = channel("x").replace("x:", "");
    let topic = format!("sensors/{id}");
    s.publish(&format!("sensors:{id}"), json!({"v": 1})).await;
    s.publish(&format!("sensors:{id}"), json!({"v": 2})).await;
    let mut latest = b"{\"v\":2}".to_vec();
    for v5 in [false, true] {
        let mut c = Mqtt::connect(addr, v5, &format!("ret-{v5}"), None).await.unwrap();
        assert_eq!(c.subscribe(&topic, None).await.0, 0);
        // The latest publication, flagged retained; then live ones, not.
        assert_eq!(c.next_publish().await.unwrap(), (topic.clone(), latest.clone(), true));
        let mut p = Mqtt::connect(addr, v5, &format!("pub-{v5}"), None).await.unwrap();
        assert_eq!(p.publish(&topic, b"live", 1, None).await.unwrap().0, 0);
        assert_eq!(c.next_publish().await.unwrap(), (topic.clone(), b"live".to_vec(), false));
        assert_eq!(p.publish(&topic, b"twice?", 2, None).await.unwrap().0, 0);
        assert_eq!(c.next_publish().await.unwrap().1, b"twice?");
        latest = b"twice?".to_vec();
    }
    // Each subscriber's retained message is counted.
    assert_eq!(s.metric("switchboard_mqtt_retained_sent_total").await, 2);
    // A QoS 2 PUBLISH sent again with DUP (a client that lost the PUBREC) is stored once.
    let (_, before) = s.get_json(&format!("/api/history?channel=sensors:{id}")).await;
    let mut p = Mqtt::connect(addr, true, "dup", None).await.unwrap();
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&77u16.to_be_bytes());
    body.push(0);
    body.extend_from_slice(b"once");
    p.send(&packet(0x34, &body)).await;
    assert_eq!(p.read().await.unwrap().0 >> 4, 5, "PUBREC");
    p.send(&packet(0x3C, &body)).await; // DUP
    assert_eq!(p.read().await.unwrap().0 >> 4, 5, "PUBREC again");
    p.send(&packet(0x62, &77u16.to_be_bytes())).await;
    assert_eq!(p.read().await.unwrap().0 >> 4, 7, "PUBCOMP");
    let (_, after) = s.get_json(&format!("/api/history?channel=sensors:{id}")).await;
    assert_eq!(after["offset"].as_u64().unwrap(), before["offset"].as_u64().unwrap() + 1);
}

#[tokio::test]
async fn refusals_carry_mqtt_reason_codes_and_the_servers_error() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let mut c = Mqtt::connect(addr, true, "refused", None).await.unwrap();
    // It counts among the server's connections, as an MQTT one.
    let metrics = s.http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "switchboard_connections{transport=\"mqtt\"} 1"), "{metrics}");
    assert_eq!(c.subscribe("$share//sensors/x", None).await.0, 0x8F);
    assert_eq!(c.subscribe("$share/g+/sensors/x", None).await.0, 0x8F);
    assert_eq!(c.subscribe("#", None).await.0, 0x8F);
    assert_eq!(c.subscribe("sensors/bad name", None).await.0, 0x8F);
    let (code, why) = c.publish("readonly/x", b"1", 1, None).await.unwrap();
    assert_eq!((code, why.split(':').next().unwrap()), (0x87, "publish_not_allowed"), "{why}");
    let (code, why) = c.publish("sensors/x", &[0xff, 0xfe], 1, None).await.unwrap();
    assert_eq!((code, why.split(':').next().unwrap()), (0x99, "invalid_json"), "{why}");
    let big = vec![b'x'; 70 * 1024];
    let (code, _) = c.publish("sensors/x", &big, 1, None).await.unwrap();
    assert_eq!(code, 0x95);
    // The connection is still usable after refusals.
    assert_eq!(c.publish("sensors/x", b"ok", 1, None).await.unwrap().0, 0);
    // MQTT 3.1.1 has no negative PUBACK: a refused QoS 1 publication closes.
    let mut old = Mqtt::connect(addr, false, "refused-311", None).await.unwrap();
    assert_eq!(old.subscribe("#", None).await.0, 0x80);
    assert!(old.publish("readonly/x", b"1", 1, None).await.is_none());
    // A bad connection token: CONNACK 0x86 (3.1.1: 4), with the reason.
    let (code, why) = Mqtt::connect(addr, true, "t", Some("not.a.jwt")).await.err().unwrap();
    assert_eq!((code, why.split(':').next().unwrap()), (0x86, "token_invalid"), "{why}");
    assert_eq!(Mqtt::connect(addr, false, "t", Some("not.a.jwt")).await.err().unwrap().0, 4);
}

#[tokio::test]
async fn the_will_is_published_when_a_client_vanishes_not_when_it_disconnects() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let id = channel("x").replace("x:", "");
    let will_topic = format!("sensors/{id}/status");
    let mut watcher = Mqtt::connect(addr, true, "watcher", None).await.unwrap();
    assert_eq!(watcher.subscribe(&will_topic, None).await.0, 0);
    // A clean DISCONNECT: no will.
    let mut polite =
        Mqtt::connect_with(addr, true, "polite", None, 60, Some((&will_topic, b"polite gone"))).await.unwrap();
    polite.send(&packet(0xE0, &[0, 0])).await;
    assert!(polite.read().await.is_none());
    // Vanishing (the socket closes without DISCONNECT): the will, to the watcher.
    let rude = Mqtt::connect_with(addr, false, "rude", None, 60, Some((&will_topic, b"offline"))).await.unwrap();
    drop(rude);
    assert_eq!(watcher.next_publish().await.unwrap().1, b"offline");
    // Keep-alive: a client silent for 1.5 × its keep-alive is closed, and its will sent.
    let mut quiet = Mqtt::connect_with(addr, true, "quiet", None, 1, Some((&will_topic, b"timed out"))).await.unwrap();
    assert!(quiet.read().await.is_none(), "closed by the server");
    assert_eq!(watcher.next_publish().await.unwrap().1, b"timed out");
    let (_, h) = s.get_json(&format!("/api/history?channel=sensors:{id}/status")).await;
    let data: Vec<Value> = h["publications"].as_array().unwrap().iter().map(|p| p["data"].clone()).collect();
    assert_eq!(data, vec![json!("offline"), json!("timed out")]);
}

/// A keep-alive longer than the heartbeat wheel's interval (crate::heartbeat): the wheel's
/// beats watch it and the connection's own timer takes over for the last interval — a
/// silent client is still closed, and its will sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_longer_than_the_heartbeat_interval_still_closes_a_silent_client() {
    let s = TestServer::start(config(&format!("{CONFIG}[ws]\nping_interval_secs = 1\n"))).await;
    let addr = s.mqtt.unwrap();
    let id = channel("x").replace("x:", "");
    let will_topic = format!("sensors/{id}/status");
    let mut watcher = Mqtt::connect(addr, true, &format!("watcher-{id}"), None).await.unwrap();
    assert_eq!(watcher.subscribe(&will_topic, None).await.0, 0);
    let will = Some((will_topic.as_str(), &b"timed out"[..]));
    let mut quiet = Mqtt::connect_with(addr, true, &format!("quiet-{id}"), None, 3, will).await.unwrap();
    assert!(quiet.read().await.is_none(), "closed by the server");
    assert_eq!(watcher.next_publish().await.unwrap().1, b"timed out");
}

/// An MQTT connection with nothing to do is parked: no task of its own, its socket,
/// queue and timers hold the waker that starts one (`switchboard_parked_connections`
/// counts them). Parked, over TCP (QoS 0 from the fan-out, QoS 1 with its
/// acknowledgements) and over WebSocket, a connection still gets every publication in
/// order, answers PINGREQ, has its will sent when it vanishes, is closed by the API, and
/// says goodbye at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_wake_for_everything_they_wait_on() {
    let password = "parked-device-secret";
    let cfg = format!("{CONFIG}[ws]\nping_interval_secs = 1\n{}", configured_user("dev-p", password, ""));
    let s = TestServer::start(config(&cfg)).await;
    let (addr, ws) = (s.mqtt.unwrap(), Via::WebSocket(s.addr));
    let id = unique_id();
    let (ch, topic, will_topic) = (format!("sensors:{id}"), format!("sensors/{id}"), format!("sensors/{id}/will"));
    let mut q0 = Mqtt::connect(addr, true, &format!("q0-{id}"), None).await.unwrap();
    assert_eq!(q0.subscribe(&topic, None).await.0, 0);
    let mut q1 = Mqtt::connect(addr, false, &format!("q1-{id}"), None).await.unwrap();
    assert_eq!(q1.subscribe_qos(&topic, None, 1).await.0, 1);
    let mut over_ws = Mqtt::connect_via(ws, true, &format!("ws-{id}"), None).await.unwrap();
    assert_eq!(over_ws.subscribe(&topic, None).await.0, 0);
    let mut watcher = Mqtt::connect(addr, true, &format!("watcher-{id}"), None).await.unwrap();
    assert_eq!(watcher.subscribe(&will_topic, None).await.0, 0);
    let rude = Mqtt::connect_with(addr, false, &format!("rude-{id}"), None, 60, Some((&will_topic, b"offline")))
        .await
        .unwrap();
    let mut device = Mqtt::connect_as(addr, true, &format!("dev-{id}"), "dev-p", Some(password)).await.unwrap();
    s.parked("mqtt", 6).await;
    for n in 1..=3 {
        s.publish(&ch, json!(n)).await;
    }
    for c in [&mut q0, &mut q1, &mut over_ws] {
        for n in 1..=3 {
            assert_eq!(c.next_publish().await.unwrap().1, n.to_string().into_bytes());
        }
    }
    // Quiet again: parked again.
    s.parked("mqtt", 6).await;
    q0.send(&packet(0xC0, &[])).await;
    assert_eq!(q0.read().await.map(|(first, _)| first), Some(0xD0), "PINGRESP");
    drop(rude);
    assert_eq!(watcher.next_publish().await.unwrap().1, b"offline");
    let r = s.http.post(s.url("/api/disconnect")).json(&json!({"user": "dev-p"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(device.last_before_close().await, Some((0xE0, 0x98)), "DISCONNECT 0x98 by the API");
    s.parked("mqtt", 4).await;
    let stop = tokio::spawn(s.shutdown());
    for c in [&mut q0, &mut over_ws, &mut watcher] {
        assert_eq!(c.last_before_close().await, Some((0xE0, 0x8B)), "DISCONNECT 0x8B");
    }
    assert!(q1.read().await.is_none(), "MQTT 3.1.1: closed");
    stop.await.unwrap();
}

/// At shutdown an MQTT 5 client is told why (DISCONNECT 0x8B Server shutting down) and
/// an MQTT 3.1.1 one is closed — over TCP and over the WebSocket endpoint; the server
/// finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_disconnects_mqtt_clients_with_server_shutting_down() {
    let s = server().await;
    let (tcp, ws) = (Via::Tcp(s.mqtt.unwrap()), Via::WebSocket(s.addr));
    let mut clients = Vec::new();
    for (via, v5) in [(tcp, true), (tcp, false), (ws, true)] {
        let id = format!("bye-{}-{v5}-{}", clients.len(), fastrand::u32(..));
        let mut c = Mqtt::connect_via(via, v5, &id, None).await.unwrap();
        assert_eq!(c.subscribe(&format!("sensors/{id}"), None).await.0, 0);
        clients.push((c, v5));
    }
    let stop = tokio::spawn(s.shutdown());
    for (mut c, v5) in clients {
        let last = c.last_before_close().await;
        match v5 {
            true => assert_eq!(last, Some((0xE0, 0x8B)), "DISCONNECT 0x8B, then the close"),
            false => assert_eq!(last, None, "MQTT 3.1.1: closed"),
        }
    }
    stop.await.unwrap();
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_it_over() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let mut first = Mqtt::connect(addr, true, "same-id", None).await.unwrap();
    let _second = Mqtt::connect(addr, true, "same-id", None).await.unwrap();
    let (kind, body) = first.read().await.expect("a DISCONNECT");
    assert_eq!((kind, body[0]), (0xE0, 0x8E), "DISCONNECT, session taken over");
    assert!(first.read().await.is_none());
}

#[tokio::test]
async fn malformed_packets_end_the_connection_with_a_reason_and_nothing_else_breaks() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let raw = |bytes: Vec<u8>| async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut c, &bytes).await.unwrap();
        let mut out = Vec::new();
        let r =
            tokio::time::timeout(Duration::from_secs(30), tokio::io::AsyncReadExt::read_to_end(&mut c, &mut out)).await;
        assert!(r.is_ok(), "the server left the connection open");
        out
    };
    // Not MQTT at all: closed without an answer.
    assert!(raw(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await.is_empty());
    // A packet before CONNECT: closed.
    assert!(raw(packet(0xC0, &[])).await.is_empty());
    // CONNECT of an unknown protocol level: CONNACK "unacceptable protocol version".
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 3, 2, 0, 60, 0, 1, b'a'];
    assert_eq!(raw(packet(0x10, &body)).await, vec![0x20, 2, 0, 1]);
    // MQTT 5 CONNECT with the reserved flag: CONNACK 0x81 Malformed Packet.
    body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 3, 0, 60, 0, 0, 1, b'a'];
    let out = raw(packet(0x10, &body)).await;
    assert_eq!(&out[..4], &[0x20, out[1], 0, 0x81]);
    // After CONNECT: a packet over the size limit, and a malformed SUBSCRIBE.
    for bad in [vec![0x30, 0xff, 0xff, 0xff, 0x7f], packet(0x80, &[0, 1, 0, 1, b'x', 0])] {
        let mut c = Mqtt::connect(addr, true, "bad", None).await.unwrap();
        c.send(&bad).await;
        let (kind, body) = c.read().await.expect("a DISCONNECT");
        assert_eq!(kind, 0xE0);
        assert!(body[0] == 0x95 || body[0] == 0x81, "reason {:#x}", body[0]);
        assert!(c.read().await.is_none());
    }
    assert_eq!(s.state.metrics.task_panics.load(std::sync::atomic::Ordering::Relaxed), 0);
    let mut ok = Mqtt::connect(addr, true, "still-fine", None).await.unwrap();
    assert_eq!(ok.publish("sensors/x", b"1", 1, None).await.unwrap().0, 0);
}

#[tokio::test]
async fn a_packet_flood_is_refused_then_closed() {
    let s = TestServer::start(config(&format!("{CONFIG}[ws]\nmax_commands_per_sec = 1\n"))).await;
    let mut c = Mqtt::connect(s.mqtt.unwrap(), true, "flood", None).await.unwrap();
    // 20 QoS 1 PUBLISH packets at once: a burst of 2 passes, then refusals, then the close.
    for id in 1..=20u16 {
        let mut body = vec![0, 9];
        body.extend_from_slice(b"sensors/f");
        body.extend_from_slice(&id.to_be_bytes());
        body.push(0);
        body.extend_from_slice(b"1");
        c.send(&packet(0x32, &body)).await;
    }
    let (mut ok, mut refused, mut disconnect) = (0, 0, None);
    while let Some((kind, body)) = c.read().await {
        match kind >> 4 {
            4 if body.len() > 2 && body[2] == 0x96 => refused += 1,
            4 => ok += 1,
            14 => disconnect = Some(body[0]),
            _ => {}
        }
    }
    assert!(ok >= 1 && refused >= 1, "{ok} accepted, {refused} refused");
    assert_eq!(disconnect, Some(0x96), "closed for its rate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_over_tls_and_paho_over_websocket_exchange_messages() {
    let dir = std::env::temp_dir().join(format!("sb-mqtt-tls-{}", std::process::id()));
    let d = switchboard_server::tls::dev_certificate(&dir, false).unwrap();
    let s = TestServer::start(config(
        &format!(
            "{CONFIG}[tls]\ncert = {:?}\nkey = {:?}\nhttp_listen = \"127.0.0.1:0\"\nhttp_mode = \"serve\"\n",
            d.cert, d.key
        )
        .replace(
            "[mqtt]\nlisten = \"127.0.0.1:0\"\n",
            "[mqtt]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n",
        ),
    ))
    .await;
    let ca = d.ca.to_str().unwrap().to_string();
    let mqtts = s.mqtt_tls.unwrap().port().to_string();
    let id = channel("x").replace("x:", "");
    let topic = format!("sensors/{id}");
    // mosquitto_sub over mqtts://.
    let mut sub = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &mqtts, "--cafile", &ca, "-t", &topic, "-C", "2", "-W", "60"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    subscribers(&s, &format!("sensors:{id}"), 1).await;
    // Paho over wss://…/mqtt: subscribes, publishes "from paho", waits for both.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/mqtt_paho.py");
    let port = s.addr.port().to_string();
    let paho = tokio::process::Command::new("python3")
        .args([script, "localhost", &port, &topic, &ca, "5", "from paho", "from mqtts"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with paho-mqtt (./scripts/test installs it)");
    subscribers(&s, &format!("sensors:{id}"), 2).await;
    let status = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &mqtts, "--cafile", &ca, "-t", &topic, "-m", "from mqtts", "-q", "1"])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let out = paho.wait_with_output().await.unwrap();
    assert!(out.status.success(), "paho: {}", String::from_utf8_lossy(&out.stdout));
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    let mut got = Vec::new();
    while let Some(l) = lines.next_line().await.unwrap() {
        got.push(l);
    }
    got.sort();
    assert_eq!(got, vec!["from mqtts", "from paho"]);
    // Both came over TLS: the plain MQTT listener saw nobody.
    assert!(s.state.metrics.tls_handshakes.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_persistent_session_resumes_with_what_was_published_meanwhile() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    for v5 in [false, true] {
        let id = channel("x").replace("x:", "");
        let (ch, topic, client) = (format!("sensors:{id}"), format!("sensors/{id}"), format!("device-{id}"));
        // 3.1.1: clean session 0. MQTT 5: clean start 0 and a session expiry.
        let (mut c, present) = Mqtt::connect_session(addr, v5, &client, false, 3600).await;
        assert!(!present, "a new session");
        assert_eq!(c.subscribe(&topic, None).await.0, 0);
        s.publish(&ch, json!(1)).await;
        assert_eq!(c.next_publish().await.unwrap().1, b"1");
        c.disconnect().await;
        // Published while the device is away.
        s.publish(&ch, json!(2)).await;
        s.publish(&ch, json!(3)).await;
        // Back: the session is there, its subscription too, and the two it missed come,
        // in order, then live ones — without subscribing again.
        let (mut c, present) = Mqtt::connect_session(addr, v5, &client, false, 3600).await;
        assert!(present, "session present");
        assert_eq!(c.next_publish().await.unwrap().1, b"2");
        assert_eq!(c.next_publish().await.unwrap().1, b"3");
        s.publish(&ch, json!(4)).await;
        assert_eq!(c.next_publish().await.unwrap().1, b"4");
        c.disconnect().await;
        // Clean start throws the session away.
        let (c, present) = Mqtt::connect_session(addr, v5, &client, true, 0).await;
        assert!(!present);
        c.disconnect().await;
        let (c, present) = Mqtt::connect_session(addr, v5, &client, false, 3600).await;
        assert!(!present, "nothing kept after a clean session");
        c.disconnect().await;
    }
    // MQTT 5 with session expiry 0: nothing is kept.
    let (mut c, _) = Mqtt::connect_session(addr, true, "no-expiry", false, 0).await;
    assert_eq!(c.subscribe("sensors/none", None).await.0, 0);
    c.disconnect().await;
    assert!(!Mqtt::connect_session(addr, true, "no-expiry", false, 0).await.1);
}

#[tokio::test]
async fn mosquitto_sub_with_a_persistent_session_gets_what_it_missed() {
    let s = server().await;
    let port = s.mqtt.unwrap().port().to_string();
    let id = channel("x").replace("x:", "");
    let (ch, topic) = (format!("sensors:{id}"), format!("sensors/{id}"));
    let sub = |count: &str| {
        let (port, topic, id) = (port.clone(), topic.clone(), id.clone());
        let count = count.to_string();
        async move {
            let out = tokio::process::Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &port, "-c", "-i", &format!("m-{id}"), "-q", "1", "-t", &topic])
                .args(["-C", &count, "-W", "60"])
                .output()
                .await
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let first = tokio::spawn(sub("1"));
    subscribers(&s, &ch, 1).await;
    s.publish(&ch, json!("a")).await;
    assert_eq!(first.await.unwrap(), "a\n");
    s.publish(&ch, json!("b")).await;
    s.publish(&ch, json!("c")).await;
    // `-c` (clean session off) with the same client id: what it missed, in order.
    assert_eq!(sub("2").await, "b\nc\n");
}

#[tokio::test]
async fn qos_1_subscriptions_are_acknowledged_within_the_clients_window_and_redelivered_in_a_session() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let id = channel("x").replace("x:", "");
    let (ch, topic) = (format!("sensors:{id}"), format!("sensors/{id}"));
    // QoS 1 is granted as asked (3.1.1 and 5).
    let mut old = Mqtt::connect(addr, false, "q-311", None).await.unwrap();
    assert_eq!(old.subscribe_qos(&topic, None, 1).await.0, 1);
    // MQTT 5 with a receive maximum of 2 and a persistent session.
    let (mut c, _) = Mqtt::connect_session_with(addr, true, "q-5", false, 3600, Some(2)).await;
    assert_eq!(c.subscribe_qos(&topic, None, 1).await.0, 1);
    for n in 1..=4 {
        s.publish(&ch, json!(n)).await;
    }
    // Two come, unacknowledged: the window is full, the third waits.
    let a = c.next_publish_unacked().await.unwrap();
    let b = c.next_publish_unacked().await.unwrap();
    assert_eq!((a.qos, &a.payload[..], &b.payload[..]), (1, &b"1"[..], &b"2"[..]));
    // The other subscriber (window 32) has all four, acknowledging as it goes.
    for n in 1..=4 {
        assert_eq!(old.next_publish().await.unwrap().1, n.to_string().into_bytes());
    }
    // One PUBACK lets the third out; the second stays unacknowledged.
    c.puback(a.packet_id.unwrap()).await;
    let third = c.next_publish_unacked().await.unwrap();
    assert_eq!(third.payload, b"3");
    assert!(third.packet_id.is_some() && third.packet_id != a.packet_id && third.packet_id != b.packet_id);
    // The connection drops with 2 and 3 unacknowledged: the session resumes from the last
    // acknowledged one, so they come again (at least once), then 4, then live ones.
    let saves = s.state.mqtt_sessions.saves();
    drop(c);
    kept(&s, saves).await;
    let (mut c, present) = Mqtt::connect_session_with(addr, true, "q-5", false, 3600, Some(10)).await;
    assert!(present);
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(c.next_publish().await.unwrap().1);
    }
    assert_eq!(again, vec![b"2".to_vec(), b"3".to_vec(), b"4".to_vec()]);
    s.publish(&ch, json!(5)).await;
    assert_eq!(c.next_publish().await.unwrap().1, b"5");
}

/// A QoS 0 subscriber's publications are written from the fan-out (the direct path); a
/// QoS 1 subscription on the same connection takes its publications back to the
/// connection's task (packet ids, PUBACK) without reordering anything, and once it is
/// gone QoS 0 goes on as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_0_subscriber_takes_a_qos_1_subscription_and_back_keeping_order() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let id = channel("x").replace("x:", "");
    let (a_ch, a) = (format!("sensors:{id}/a"), format!("sensors/{id}/a"));
    let (b_ch, b) = (format!("sensors:{id}/b"), format!("sensors/{id}/b"));
    let mut c = Mqtt::connect(addr, true, &format!("mix-{id}"), None).await.unwrap();
    assert_eq!(c.subscribe_qos(&a, None, 0).await.0, 0);
    for n in 0..50 {
        s.publish(&a_ch, json!(n)).await;
    }
    for n in 0..50 {
        let p = c.next_publish_unacked().await.unwrap();
        assert_eq!((p.qos, p.payload), (0, n.to_string().into_bytes()));
    }
    assert_eq!(c.subscribe_qos(&b, None, 1).await.0, 1);
    for n in 0..40 {
        s.publish(if n % 2 == 0 { &a_ch } else { &b_ch }, json!(n)).await;
    }
    let mut ids = std::collections::HashSet::new();
    for n in 0..40 {
        let p = c.next_publish_unacked().await.unwrap();
        let (topic, qos) = if n % 2 == 0 { (&a, 0) } else { (&b, 1) };
        assert_eq!((&p.topic, p.qos, p.payload.clone()), (topic, qos, n.to_string().into_bytes()), "#{n}");
        if let Some(id) = p.packet_id {
            assert!(ids.insert(id), "packet id {id} used twice while in flight");
        }
    }
    for id in ids {
        c.puback(id).await;
    }
    // UNSUBSCRIBE b (MQTT 5: packet id, no properties, the filter); then only a, QoS 0.
    let mut body = vec![0, 99, 0];
    body.extend_from_slice(&(b.len() as u16).to_be_bytes());
    body.extend_from_slice(b.as_bytes());
    c.send(&packet(0xA2, &body)).await;
    loop {
        let (first, body) = c.read().await.expect("UNSUBACK");
        if first >> 4 == 11 {
            assert_eq!(&body[..2], &[0, 99]);
            break;
        }
    }
    for n in 0..20 {
        s.publish(&b_ch, json!(-n)).await;
        s.publish(&a_ch, json!(n)).await;
    }
    for n in 0..20 {
        let p = c.next_publish_unacked().await.unwrap();
        assert_eq!((&p.topic, p.qos, p.payload), (&a, 0, n.to_string().into_bytes()));
    }
}

/// A clean QoS 1 subscriber (written to from the fan-out, packet ids and its window
/// kept there): never more unacknowledged publications than its receive maximum, each
/// acknowledgement lets the next out, ids are never reused while in flight, and order
/// holds throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_qos_1_subscriber_gets_everything_in_order_within_its_window() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let id = channel("x").replace("x:", "");
    let (ch, topic) = (format!("sensors:{id}"), format!("sensors/{id}"));
    let (mut c, _) = Mqtt::connect_session_with(addr, true, &format!("w-{id}"), true, 0, Some(3)).await;
    assert_eq!(c.subscribe_qos(&topic, None, 1).await.0, 1);
    // Published before the subscriber reads: three go out at once, the rest wait for
    // acknowledgements in the connection.
    let total = 200;
    for n in 0..total {
        s.publish(&ch, json!(n)).await;
    }
    let mut unacked: std::collections::VecDeque<u16> = Default::default();
    for n in 0..total {
        let p = c.next_publish_unacked().await.unwrap();
        assert_eq!((p.qos, p.payload), (1, n.to_string().into_bytes()), "#{n}");
        let id = p.packet_id.unwrap();
        assert!(!unacked.contains(&id), "packet id {id} reused while in flight");
        unacked.push_back(id);
        assert!(unacked.len() <= 3, "more in flight than the receive maximum");
        // Acknowledge late, keeping the window full: each PUBACK lets exactly one out.
        if unacked.len() == 3 {
            c.puback(unacked.pop_front().unwrap()).await;
        }
    }
    // Two in flight now: of three more, one comes, and the next only after a PUBACK.
    for n in 0..3 {
        s.publish(&ch, json!(total + n)).await;
    }
    assert_eq!(c.next_publish_unacked().await.unwrap().payload, total.to_string().into_bytes());
    // The window is full: three publications in flight, as the server counts them.
    assert_eq!(s.metric("switchboard_mqtt_inflight").await, 3);
    // (A negative check: it can only pass wrongly on a slow machine, never fail wrongly.)
    let early = tokio::time::timeout(Duration::from_millis(300), c.next_publish_unacked()).await;
    assert!(early.is_err(), "a publication beyond the receive maximum");
    c.puback(unacked.pop_front().unwrap()).await;
    assert_eq!(c.next_publish_unacked().await.unwrap().payload, (total + 1).to_string().into_bytes());
}

/// A QoS 1 publication over the client's maximum packet size is not sent (MQTT-3.1.2-25)
/// — and does not keep a place in its window: what follows still comes.
#[tokio::test]
async fn a_qos_1_publication_too_large_for_the_client_is_left_out_without_blocking_its_window() {
    let s = server().await;
    // Receive maximum 1, maximum packet size 64 bytes; without a session (written from
    // the fan-out) and with one (written by the connection's task).
    for expiry in [0u8, 60] {
        let id = channel("x").replace("x:", "");
        let (ch, topic) = (format!("sensors:{id}"), format!("sensors/{id}"));
        let props = [0x21, 0, 1, 0x27, 0, 0, 0, 64, 0x11, 0, 0, 0, expiry];
        let mut c = Mqtt::connect_v5_props(s.mqtt.unwrap(), &format!("big-{id}-{expiry}"), &props).await.unwrap();
        assert_eq!(c.subscribe_qos(&topic, None, 1).await.0, 1);
        s.publish(&ch, json!("x".repeat(100))).await;
        for n in 0..3 {
            s.publish(&ch, json!(n)).await;
        }
        for n in 0..3 {
            // (Bounded: with the large one holding the only place, this would wait forever.)
            let p = tokio::time::timeout(Duration::from_secs(60), c.next_publish_unacked()).await;
            let p = p.expect("the publications after the large one").unwrap();
            assert_eq!(p.payload, n.to_string().into_bytes(), "session expiry {expiry}");
            c.puback(p.packet_id.unwrap()).await;
        }
    }
}

#[tokio::test]
async fn a_shared_subscription_deals_each_publication_to_one_member_in_turn() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let id = channel("x").replace("x:", "");
    let (ch, topic) = (format!("sensors:{id}"), format!("sensors/{id}"));
    let shared = format!("$share/workers/{topic}");
    let mut workers = Vec::new();
    for (n, v5) in [(1, true), (2, true), (3, false)] {
        let mut w = Mqtt::connect(addr, v5, &format!("worker-{n}"), None).await.unwrap();
        assert_eq!(w.subscribe(&shared, None).await.0, 0);
        workers.push(w);
    }
    // An ordinary subscriber beside the group gets everything.
    let mut watcher = Mqtt::connect(addr, true, "watcher", None).await.unwrap();
    assert_eq!(watcher.subscribe(&topic, None).await.0, 0);
    // The group is one subscription at the hub (plus the watcher's).
    subscribers(&s, &ch, 2).await;
    for n in 0..30 {
        s.publish(&ch, json!(n)).await;
    }
    for n in 0..30 {
        assert_eq!(watcher.next_publish().await.unwrap().1, n.to_string().into_bytes());
    }
    // Each worker gets its turn: 10 each, in order, and together every one once.
    let mut all = Vec::new();
    for w in workers.iter_mut() {
        let mut mine = Vec::new();
        for _ in 0..10 {
            let p = w.next_publish().await.unwrap().1;
            mine.push(String::from_utf8(p).unwrap().parse::<u32>().unwrap());
        }
        assert!(mine.windows(2).all(|p| p[0] < p[1]), "in order: {mine:?}");
        all.extend(mine);
    }
    all.sort();
    assert_eq!(all, (0..30).collect::<Vec<_>>());
    // Members leave; the last one standing gets everything.
    let last = workers.pop().unwrap();
    drop(workers);
    let mut last = last;
    for _ in 0..600 {
        let n = s.state.mqtt_groups.members(&ch);
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.publish(&ch, json!("only")).await;
    assert_eq!(last.next_publish().await.unwrap().1, b"only");
}

/// `$SYS/broker/…`: the node's statistics, sent flagged retained right after the SUBACK
/// and then every interval; who may subscribe is `mqtt.sys_topics`; no one may publish
/// there.
#[tokio::test]
async fn sys_topics_report_the_node_to_whom_the_configuration_allows() {
    let open = CONFIG.replace("[mqtt]\n", "[mqtt]\nsys_topics = \"all\"\nsys_interval_secs = 1\n");
    let s = TestServer::start(config(&open)).await;
    let mut c = Mqtt::connect(s.mqtt.unwrap(), true, "sys-watcher", None).await.unwrap();
    assert_eq!(c.subscribe("$SYS/broker/clients/+", None).await.0, 0);
    let mut now = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let p = c.next_publish_unacked().await.unwrap();
        assert!(p.retain, "the current values come flagged retained: {p:?}");
        now.insert(p.topic, String::from_utf8(p.payload).unwrap());
    }
    assert_eq!(now.keys().collect::<Vec<_>>(), ["$SYS/broker/clients/connected", "$SYS/broker/clients/mqtt"]);
    assert!(now.values().all(|v| v.parse::<u64>().unwrap() >= 1), "{now:?}");
    // Then every interval, not retained.
    let next = c.next_publish_unacked().await.unwrap();
    assert!(next.topic.starts_with("$SYS/broker/clients/") && !next.retain);
    // Nobody publishes there.
    assert_eq!(c.publish("$SYS/broker/uptime", b"0", 1, None).await.unwrap().0, 0x90);
    // By default only clients that connected with a token may subscribe; "off": no one.
    let s = server().await;
    let mut anon = Mqtt::connect(s.mqtt.unwrap(), true, "sys-anon", None).await.unwrap();
    let (code, why) = anon.subscribe("$SYS/#", None).await;
    assert_eq!((code, why.split(':').next().unwrap()), (0x87, "token_required"), "{why}");
    let off = CONFIG.replace("[mqtt]\n", "[mqtt]\nsys_topics = \"off\"\n");
    let s = TestServer::start(config(&off)).await;
    let mut old = Mqtt::connect(s.mqtt.unwrap(), false, "sys-off", None).await.unwrap();
    assert_eq!(old.subscribe("$SYS/#", None).await.0, 0x80);
}

/// Two nodes sharing a Redis broker (`SWITCHBOARD_TEST_REDIS`, default the local one)
/// under a prefix of their own.
async fn two_redis_nodes() -> (TestServer, TestServer) {
    let url = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbmqtt-{}-{}", std::process::id(), fastrand::u32(..));
    let cfg = format!("{CONFIG}[broker]\nkind = \"redis\"\nredis_url = \"{url}\"\nredis_prefix = \"{prefix}\"\n");
    (TestServer::start(config(&cfg)).await, TestServer::start(config(&cfg)).await)
}

/// Two nodes sharing a NATS broker (`SWITCHBOARD_TEST_NATS`, default the local one), under
/// the prefix the MQTT tests share (their streams are made once; names and ids are the
/// tests' own).
async fn two_nats_nodes() -> (TestServer, TestServer) {
    let url = std::env::var("SWITCHBOARD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let cfg = format!("{CONFIG}[broker]\nkind = \"nats\"\nnats_url = \"{url}\"\nnats_prefix = \"sbtest-mqtt\"\n");
    (TestServer::start(config(&cfg)).await, TestServer::start(config(&cfg)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_redis_broker_a_session_resumes_on_another_node() {
    a_session_resumes_on_another_node(two_redis_nodes().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_nats_broker_a_session_resumes_on_another_node() {
    a_session_resumes_on_another_node(two_nats_nodes().await).await;
}

async fn a_session_resumes_on_another_node((a, b): (TestServer, TestServer)) {
    let id = unique_id();
    let (ch, topic, client) = (format!("sensors:{id}"), format!("sensors/{id}"), format!("roamer-{id}"));
    // On node A: a persistent session, one publication received, then gone.
    let (mut c, present) = Mqtt::connect_session(a.mqtt.unwrap(), true, &client, false, 600).await;
    assert!(!present);
    assert_eq!(c.subscribe_qos(&topic, None, 1).await.0, 1);
    a.publish(&ch, json!(1)).await;
    assert_eq!(c.next_publish().await.unwrap().1, b"1");
    c.disconnect().await;
    // Published on node B while the device is away.
    b.publish(&ch, json!(2)).await;
    b.publish(&ch, json!(3)).await;
    // The device comes back to node B: its session is there (kept in the backplane).
    let (mut c, present) = Mqtt::connect_session(b.mqtt.unwrap(), true, &client, false, 600).await;
    assert!(present, "the session resumes on another node");
    assert_eq!(c.next_publish().await.unwrap().1, b"2");
    assert_eq!(c.next_publish().await.unwrap().1, b"3");
    a.publish(&ch, json!(4)).await;
    assert_eq!(c.next_publish().await.unwrap().1, b"4", "live, from the other node");
}

/// A persistent session keeps its `$presence/…` watches: after the client comes back, a
/// join reaches it as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_presence_watch() {
    let cfg = format!("{CONFIG}[namespaces.rooms]\npresence = true\njoin_leave = true\n");
    let s = TestServer::start(config(&cfg)).await;
    let addr = s.mqtt.unwrap();
    let id = unique_id();
    let (topic, client) = (format!("rooms/{id}"), format!("keeper-{id}"));
    let (mut c, _) = Mqtt::connect_session(addr, true, &client, false, 600).await;
    assert_eq!(c.subscribe(&format!("$presence/{topic}"), None).await.0, 0);
    c.disconnect().await;
    let (mut c, present) = Mqtt::connect_session(addr, true, &client, false, 600).await;
    assert!(present, "the session resumes");
    let mut member = Mqtt::connect(addr, true, &format!("m-{id}"), None).await.unwrap();
    assert_eq!(member.subscribe(&topic, None).await.0, 0);
    let (t, payload, _) = c.next_publish().await.expect("the join");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        (t, v["event"].as_str(), v["client"].as_str()),
        (format!("$presence/{topic}"), Some("join"), Some(format!("mqtt:m-{id}").as_str()))
    );
}

/// Devices configured with a user name and password (`[[mqtt.users]]`): the right
/// password connects as that user, allowed what its entry says; a wrong or missing one is
/// refused (MQTT 5: 0x86, 3.1.1: 0x04); another user name leaves the password a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_devices_connect_with_a_user_name_and_password() {
    let password = "long-random-device-secret-7";
    let cfg = format!("{CONFIG}{}", configured_user("dev-7", password, "channels = [\"sensors:dev7*\"]\n"));
    let s = TestServer::start(config(&cfg)).await;
    let addr = s.mqtt.unwrap();
    for v5 in [true, false] {
        let mut c = Mqtt::connect_as(addr, v5, &format!("d7-{v5}"), "dev-7", Some(password)).await.unwrap();
        // Its channels, and no others (as a token's `channels` claim says).
        assert_eq!(c.subscribe(&format!("sensors/dev7-{v5}"), None).await.0, 0);
        let (code, why) = c.subscribe("sensors/other", None).await;
        assert_eq!(code, if v5 { 0x87 } else { 0x80 }, "{why}");
        assert!(!v5 || why.starts_with("permission_denied"), "{why}");
        // A wrong password, or none: refused.
        for wrong in [Some("guess"), None] {
            let refused = Mqtt::connect_as(addr, v5, &format!("d7x-{v5}"), "dev-7", wrong).await.err();
            let want = if v5 { 0x86 } else { 0x04 };
            assert_eq!(refused.as_ref().map(|r| r.0), Some(want), "{wrong:?}: {refused:?}");
            assert!(!v5 || refused.unwrap().1.starts_with("token_invalid"));
        }
    }
    // It is the user dev-7 in presence and for the server API (`/api/disconnect`).
    let mut c = Mqtt::connect_as(addr, true, "d7-presence", "dev-7", Some(password)).await.unwrap();
    assert_eq!(c.subscribe("sensors/dev7-p", None).await.0, 0);
    let r = s.http.post(s.url("/api/disconnect")).json(&json!({"user": "dev-7"})).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(c.last_before_close().await, Some((0xE0, 0x98)), "DISCONNECT 0x98 by the API");
    // Another user name: the password is a token as ever (this one is none).
    let (code, _) = Mqtt::connect_as(addr, true, "other", "someone", Some(password)).await.err().unwrap();
    assert_eq!(code, 0x86);
}

/// `$presence/{topic}`: an MQTT client watches a channel's presence — the joins and
/// leaves of WebSocket and MQTT members, as JSON on that topic — without joining it and
/// without the channel's publications; the gate and the namespace's rules hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_topics_carry_a_channels_joins_and_leaves_to_mqtt_clients() {
    let cfg = format!("{CONFIG}[namespaces.rooms]\npresence = true\njoin_leave = true\nallow_publish = true\n");
    let s = TestServer::start(config(&cfg)).await;
    let addr = s.mqtt.unwrap();
    let id = unique_id();
    let (ch, topic) = (format!("rooms:{id}"), format!("rooms/{id}"));
    let watch = format!("$presence/{topic}");
    let mut watcher = Mqtt::connect(addr, true, &format!("watch-{id}"), None).await.unwrap();
    assert_eq!(watcher.subscribe(&watch, None).await.0, 0);
    let next = async |w: &mut Mqtt| {
        let (t, payload, _) = w.next_publish().await.expect("a presence event");
        assert_eq!(t, watch);
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["channel"], ch.as_str());
        (v["event"].as_str().unwrap().to_string(), v["client"].as_str().unwrap().to_string())
    };
    // A WebSocket member joins; then an MQTT one.
    let mut ws = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    ws.subscribe(&ch, None).await.unwrap();
    let (event, ws_client) = next(&mut watcher).await;
    assert_eq!(event, "join");
    // (Anonymous, with a user name: it says who it is, unverified.)
    let mut member = Mqtt::connect_as(addr, true, &format!("member-{id}"), "ada", None).await.unwrap();
    assert_eq!(member.subscribe(&topic, None).await.0, 0);
    assert_eq!(next(&mut watcher).await, ("join".to_string(), format!("mqtt:member-{id}")));
    // A publication is not a presence event: the watcher does not get it (the member does).
    s.publish(&ch, json!("hello")).await;
    assert_eq!(member.next_publish().await.unwrap().1, b"hello");
    drop(ws);
    assert_eq!(next(&mut watcher).await, ("leave".to_string(), ws_client));
    // The watcher is no member.
    let (_, p) = s.get_json(&format!("/api/presence?channel={ch}")).await;
    let members: Vec<(&str, &Value)> =
        p["clients"].as_array().unwrap().iter().map(|c| (c["client"].as_str().unwrap(), &c["info"])).collect();
    let claimed = json!({"unverified": {"username": "ada"}});
    assert_eq!(members, vec![(format!("mqtt:member-{id}").as_str(), &claimed)]);
    // Refused: a namespace without join/leave events, a wildcard, an unknown namespace's
    // rules as for any channel (sensors has no presence).
    let (code, why) = watcher.subscribe("$presence/sensors/x", None).await;
    assert_eq!(code, 0x80, "{why}");
    assert!(why.starts_with("presence_disabled"), "{why}");
    assert_eq!(watcher.subscribe("$presence/rooms/+", None).await.0, 0x8F);
    // UNSUBSCRIBE ends the watch: a member leaving afterwards is not told; a marker on a
    // topic it subscribes to comes first.
    watcher.send(&packet(0xA2, &[[0, 9, 0].as_slice(), &str16_of(watch.as_bytes())].concat())).await;
    loop {
        let (first, body) = watcher.read().await.expect("UNSUBACK");
        if first >> 4 == 11 {
            assert_eq!(body[body.len() - 1], 0, "UNSUBACK success");
            break;
        }
    }
    let marker = format!("rooms/{id}-marker");
    assert_eq!(watcher.subscribe(&marker, None).await.0, 0);
    let mut observer = Mqtt::connect(addr, true, &format!("observer-{id}"), None).await.unwrap();
    assert_eq!(observer.subscribe(&watch, None).await.0, 0);
    member.disconnect().await;
    // (Once the observer has the leave, a watch still in place would have it queued too.)
    assert_eq!(next(&mut observer).await, ("leave".to_string(), format!("mqtt:member-{id}")));
    s.publish(&marker.replacen('/', ":", 1), json!("marker")).await;
    let (t, payload, _) = watcher.next_publish().await.unwrap();
    assert_eq!((t.as_str(), payload.as_slice()), (marker.as_str(), &b"marker"[..]));
}

/// MQTT 5 publication properties (docs/protocol.md, Publication properties): what one
/// node's MQTT publisher sets reaches another node's MQTT 5 subscriber byte for byte, and
/// SSE as the publication's `meta`; the broker keeps them in history; and the server
/// API's `meta` reaches MQTT as those properties — with each broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_properties_cross_transports_with_the_memory_broker() {
    let s = server().await;
    publication_properties_cross(&s, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_properties_cross_nodes_with_the_redis_broker() {
    let (a, b) = two_redis_nodes().await;
    publication_properties_cross(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_properties_cross_nodes_with_the_nats_broker() {
    let (a, b) = two_nats_nodes().await;
    publication_properties_cross(&a, &b).await;
}

async fn publication_properties_cross(a: &TestServer, b: &TestServer) {
    let id = unique_id();
    let (ch, topic) = (format!("sensors:{id}"), format!("sensors/{id}"));
    let mut sub = Mqtt::connect(b.mqtt.unwrap(), true, &format!("psub-{id}"), None).await.unwrap();
    assert_eq!(sub.subscribe_qos(&topic, None, 1).await.0, 1);
    let mut sse = Sse::connect(b, &format!("channel={ch}"), None).await;
    sse.next_named("subscribed").await;
    // In the order the server writes them (payload format, content type, response topic,
    // correlation data, user properties), so what goes out is what came in.
    let mut props = vec![0x01, 1, 0x03];
    props.extend(str16_of(b"application/json"));
    props.push(0x08);
    props.extend(str16_of(b"sensors/replies"));
    props.push(0x09);
    props.extend(str16_of(&[0, 0xff, 7]));
    for (k, v) in [("unit", "C"), ("unit", "K"), ("a", "")] {
        props.push(0x26);
        props.extend(str16_of(k.as_bytes()));
        props.extend(str16_of(v.as_bytes()));
    }
    let mut publisher = Mqtt::connect(a.mqtt.unwrap(), true, &format!("ppub-{id}"), None).await.unwrap();
    assert_eq!(publisher.publish_props(&topic, b"21.5", 1, &props_block(&props)).await, Some((0, String::new())));
    let got = sub.next_publish_unacked().await.unwrap();
    assert_eq!((got.payload.as_slice(), got.props.as_slice(), got.retain), (&b"21.5"[..], props.as_slice(), false));
    sub.puback(got.packet_id.unwrap()).await;
    let meta = json!({"format": 1, "content_type": "application/json", "response_topic": "sensors/replies",
        "correlation": "AP8H", "headers": [["unit", "C"], ["unit", "K"], ["a", ""]]});
    let event = loop {
        let e = sse.next().await.expect("SSE event");
        if e.event == "message" {
            break e.json();
        }
    };
    assert_eq!((&event["meta"], &event["data"]), (&meta, &json!(21.5)), "SSE");
    // Kept with the publication: node B reads it back from the broker's history.
    let (_, h) = b.get_json(&format!("/api/history?channel={ch}")).await;
    assert_eq!(h["publications"][0]["meta"], meta, "history");
    // The other way: the server API's meta reaches MQTT 5 as properties — the expiry as
    // what is left of it, the retain flag only with Retain As Published (not asked here).
    let body = json!({"channel": ch, "data": "x", "meta": {"ttl": 600, "retain": true, "headers": [["k", "v"]]}});
    let r = a.http.post(a.url("/api/publish")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let got = sub.next_publish_unacked().await.unwrap();
    assert_eq!((got.payload.as_slice(), got.retain, got.props[0]), (&b"x"[..], false, 0x02));
    let left = u32::from_be_bytes(got.props[1..5].try_into().unwrap());
    assert!(left > 0 && left <= 600, "expiry left: {left}");
    let mut user = vec![0x26];
    user.extend(str16_of(b"k"));
    user.extend(str16_of(b"v"));
    assert_eq!(&got.props[5..], user.as_slice());
    // A WebSocket client's publish command takes a meta too.
    let mut ws = Connection::connect(&format!("ws://{}/ws", b.addr)).await.unwrap();
    let cmd = json!({"cmd": "publish", "channel": ch, "data": 2, "meta": {"content_type": "text/plain"}});
    ws.call(cmd).await.unwrap();
    let got = sub.next_publish_unacked().await.unwrap();
    let mut ct = vec![0x03];
    ct.extend(str16_of(b"text/plain"));
    assert_eq!((got.payload.as_slice(), got.props.as_slice()), (&b"2"[..], ct.as_slice()));
    let refused = ws.call(json!({"cmd": "publish", "channel": ch, "data": 2, "meta": {"format": 7}})).await;
    assert!(format!("{refused:?}").contains("invalid_request"), "{refused:?}");
    // A meta the server cannot pass on is refused, and nothing is published.
    for (bad, code) in [
        (json!({"format": 2}), "invalid_request"),
        (json!({"response_topic": "a/#"}), "invalid_request"),
        (json!({"correlation": "not base64!"}), "invalid_request"),
        (json!({"expires": 5}), "invalid_request"),
    ] {
        let r = a.http.post(a.url("/api/publish")).json(&json!({"channel": ch, "data": 1, "meta": bad})).send().await;
        let v: Value = r.unwrap().json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{bad}: {v}");
    }
    let (_, h) = b.get_json(&format!("/api/history?channel={ch}")).await;
    assert_eq!(h["publications"].as_array().map(Vec::len), Some(3), "nothing more was published");
}

/// MQTT 5 topic aliases from the server: a client that takes them (Topic Alias Maximum)
/// gets a topic whole once, with an alias, and then the alias alone; topics past its
/// maximum go whole. At QoS 0 and 1, over TCP and over the WebSocket endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sends_topic_aliases_to_a_client_that_takes_them() {
    let s = server().await;
    for (via, qos) in [(Via::Tcp(s.mqtt.unwrap()), 0), (Via::Tcp(s.mqtt.unwrap()), 1), (Via::WebSocket(s.addr), 1)] {
        let id = unique_id();
        let (a, b) = (format!("sensors/{id}/a"), format!("sensors/{id}/b"));
        // Topic Alias Maximum 1: one alias for this client.
        let mut c = Mqtt::connect_v5_via(via, &format!("alias-{id}"), &[0x22, 0, 1]).await;
        for t in [&a, &b] {
            assert_eq!(c.subscribe_qos(t, None, qos).await.0, qos);
        }
        for (t, n) in [(&a, 1), (&a, 2), (&b, 3), (&b, 4), (&a, 5)] {
            s.publish(&t.replacen('/', ":", 1), json!(n)).await;
        }
        let mut got = Vec::new();
        for _ in 0..5 {
            let p = c.next_publish_unacked().await.unwrap();
            if let Some(id) = p.packet_id {
                c.puback(id).await;
            }
            let alias = p.props.windows(3).find(|w| w[0] == 0x23).map(|w| u16::from_be_bytes([w[1], w[2]]));
            got.push((p.topic, String::from_utf8(p.payload).unwrap(), alias));
        }
        let want = vec![
            (a.clone(), "1".to_string(), Some(1)), // defines alias 1
            (String::new(), "2".into(), Some(1)),  // uses it
            (b.clone(), "3".into(), None),         // past the maximum: whole
            (b.clone(), "4".into(), None),
            (String::new(), "5".into(), Some(1)),
        ];
        assert_eq!(got, want, "{via:?} QoS {qos}");
    }
}

/// A shared subscription with members on two nodes (the Redis broker, the NATS broker):
/// each publication goes to one member of the group across the cluster — none twice, none
/// to no one — while an ordinary subscriber gets them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_across_two_nodes_delivers_each_publication_once() {
    shared_subscription_across_two_nodes(two_redis_nodes().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_nats_broker_a_shared_subscription_across_two_nodes_delivers_each_publication_once() {
    shared_subscription_across_two_nodes(two_nats_nodes().await).await;
}

async fn shared_subscription_across_two_nodes((a, b): (TestServer, TestServer)) {
    let id = unique_id();
    let (ch, topic) = (format!("sensors:{id}"), format!("sensors/{id}"));
    let shared = format!("$share/workers/{topic}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (node, s) in [("a", &a), ("b", &b)] {
        let mut w = Mqtt::connect(s.mqtt.unwrap(), true, &format!("worker-{node}-{id}"), None).await.unwrap();
        assert_eq!(w.subscribe(&shared, None).await.0, 0);
        subscribers(s, &ch, 1).await;
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            while let Some((_, payload, _)) = w.next_publish().await {
                let _ = tx.send((node, String::from_utf8(payload).unwrap().parse::<u32>().unwrap()));
            }
        }));
    }
    let mut watcher = Mqtt::connect(b.mqtt.unwrap(), true, &format!("watcher-{id}"), None).await.unwrap();
    assert_eq!(watcher.subscribe(&topic, None).await.0, 0);
    let total = 100;
    for n in 0..total {
        // Published on either node.
        if n % 2 == 0 { &a } else { &b }.publish(&ch, json!(n)).await;
    }
    for n in 0..total {
        assert_eq!(watcher.next_publish().await.unwrap().1, n.to_string().into_bytes());
    }
    let mut got = Vec::new();
    let mut per_node: HashMap<&str, Vec<u32>> = HashMap::new();
    while got.len() < total as usize {
        // (Bounded: a publication no member got would leave this waiting.)
        let next = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
        let (node, n) = next.expect("every publication reaches one member").unwrap();
        got.push(n);
        per_node.entry(node).or_default().push(n);
    }
    for (node, mine) in &per_node {
        assert!(mine.windows(2).all(|p| p[0] < p[1]), "node {node}'s member in order: {mine:?}");
    }
    got.sort();
    assert_eq!(got, (0..total).collect::<Vec<_>>(), "each once");
    for r in readers {
        r.abort();
    }
}

/// Waits until the server saved a session after `before` saves (it does when it sees a
/// connection close).
async fn kept(s: &TestServer, before: u64) {
    for _ in 0..600 {
        if s.state.mqtt_sessions.saves() > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no session kept");
}

/// Drops the connection without DISCONNECT, waits until the server kept the session, and
/// resumes it (MQTT 5, clean start 0).
async fn drop_and_resume(s: &TestServer, c: Mqtt, client: &str) -> Mqtt {
    let saves = s.state.mqtt_sessions.saves();
    drop(c);
    kept(s, saves).await;
    let (c, present) = Mqtt::connect_session(s.mqtt.unwrap(), true, client, false, 600).await;
    assert!(present, "session present");
    c
}

#[tokio::test]
async fn qos_2_to_subscribers_completes_once_and_resumes_with_dup_and_the_same_packet_id() {
    let s = server().await;
    let addr = s.mqtt.unwrap();
    let id = channel("x").replace("x:", "");
    let (ch, topic) = (format!("sensors:{id}"), format!("sensors/{id}"));
    let (mut c, _) = Mqtt::connect_session(addr, true, "q2", false, 600).await;
    assert_eq!(c.subscribe_qos(&topic, None, 2).await.0, 2, "QoS 2 granted");
    s.publish(&ch, json!("one")).await;
    // PUBLISH (QoS 2) → PUBREC → PUBREL → PUBCOMP.
    let p = c.next_publish_unacked().await.unwrap();
    assert_eq!((p.qos, &p.payload[..]), (2, &b"one"[..]));
    let pid = p.packet_id.unwrap();
    c.send(&packet(0x50, &pid.to_be_bytes())).await;
    let (kind, body) = c.read().await.unwrap();
    assert_eq!((kind, u16::from_be_bytes([body[0], body[1]])), (0x62, pid), "PUBREL");
    c.send(&packet(0x70, &pid.to_be_bytes())).await;
    // Next: received but not acknowledged when the connection drops.
    s.publish(&ch, json!("two")).await;
    let p = c.next_publish_unacked().await.unwrap();
    assert_eq!(p.payload, b"two");
    let two = p.packet_id.unwrap();
    // Resumed: "two" again, DUP set, the same packet id; PUBREC, then it drops again.
    let mut c = drop_and_resume(&s, c, "q2").await;
    let (kind, body) = c.read().await.unwrap();
    assert_eq!(kind & 0xF8, 0x38, "PUBLISH with DUP");
    assert_eq!(u16::from_be_bytes([body[2 + topic.len()], body[3 + topic.len()]]), two);
    c.send(&packet(0x50, &two.to_be_bytes())).await;
    let (kind, _) = c.read().await.unwrap();
    assert_eq!(kind, 0x62, "PUBREL");
    // Resumed after PUBREL: only PUBREL comes again (the message is not sent twice).
    let mut c = drop_and_resume(&s, c, "q2").await;
    let (kind, body) = c.read().await.unwrap();
    assert_eq!((kind, u16::from_be_bytes([body[0], body[1]])), (0x62, two), "PUBREL again");
    c.send(&packet(0x70, &two.to_be_bytes())).await;
    s.publish(&ch, json!("three")).await;
    let p = c.next_publish_unacked().await.unwrap();
    assert_eq!((p.qos, &p.payload[..], p.retain), (2, &b"three"[..], false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_survives_its_node_being_killed_and_resumes_on_another() {
    let url = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbmqttkill-{}-{}", std::process::id(), fastrand::u32(..));
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (http, mqtt) = (free(), free());
    // Node A: a real process, killed with SIGKILL below.
    let mut a = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{http}")])
        .env("SWITCHBOARD_BROKER__KIND", "redis")
        .env("SWITCHBOARD_BROKER__REDIS_URL", &url)
        .env("SWITCHBOARD_BROKER__REDIS_PREFIX", &prefix)
        .env("SWITCHBOARD_MQTT__LISTEN", format!("127.0.0.1:{mqtt}"))
        .env("SWITCHBOARD_NAMESPACES__SENSORS__ALLOW_PUBLISH", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mqtt_a: std::net::SocketAddr = format!("127.0.0.1:{mqtt}").parse().unwrap();
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(mqtt_a).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Node B: in this process, same Redis.
    let cfg = format!("{CONFIG}[broker]\nkind = \"redis\"\nredis_url = \"{url}\"\nredis_prefix = \"{prefix}\"\n");
    let b = TestServer::start(config(&cfg)).await;
    let id = channel("x").replace("x:", "");
    let (ch, topic, client) = (format!("sensors:{id}"), format!("sensors/{id}"), format!("survivor-{id}"));
    let (mut c, _) = Mqtt::connect_session(mqtt_a, true, &client, false, 600).await;
    assert_eq!(c.subscribe_qos(&topic, None, 1).await.0, 1);
    // Node A's subscription reaches the cluster before anything is published.
    let mut live = false;
    for _ in 0..600 {
        let (_, v) = b.get_json("/api/channels").await;
        live = v["channels"].as_array().is_some_and(|a| a.iter().any(|c| c["channel"] == ch.as_str()));
        if live {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(live, "node A's subscription is known to the cluster");
    b.publish(&ch, json!(1)).await;
    assert_eq!(c.next_publish().await.unwrap().1, b"1");
    // Node A dies without a goodbye; 2 and 3 are published meanwhile.
    a.kill().unwrap();
    a.wait().unwrap();
    drop(c);
    b.publish(&ch, json!(2)).await;
    b.publish(&ch, json!(3)).await;
    // The device reconnects to node B: the session is there; nothing is missing (what
    // node A had not saved comes again: at least once).
    let (mut c, present) = Mqtt::connect_session(b.mqtt.unwrap(), true, &client, false, 600).await;
    assert!(present, "the session outlives its node");
    let mut got = Vec::new();
    while got.last() != Some(&3) {
        let p = c.next_publish().await.unwrap().1;
        got.push(String::from_utf8(p).unwrap().parse::<u32>().unwrap());
    }
    assert!(got == vec![2, 3] || got == vec![1, 2, 3], "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_3_1_1_over_ws_and_mosquitto_over_tcp_exchange_messages() {
    let s = server().await;
    let id = channel("x").replace("x:", "");
    let (ch, topic) = (format!("sensors:{id}"), format!("sensors/{id}"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/mqtt_paho.py");
    let port = s.addr.port().to_string();
    let paho = tokio::process::Command::new("python3")
        .args([script, "127.0.0.1", &port, &topic, "-", "3.1.1", "from paho", "from mosquitto"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with paho-mqtt (./scripts/test installs it)");
    subscribers(&s, &ch, 1).await;
    assert!(mosquitto_pub(&s, "mqttv311", &topic, "from mosquitto", 1).await);
    let out = paho.wait_with_output().await.unwrap();
    assert!(out.status.success(), "paho: {}", String::from_utf8_lossy(&out.stdout));
}

/// The conformance catalogue (`tests/interop/mqtt_conformance.py`): one check per
/// normative statement of MQTT 3.1.1 and 5 that the server implements, with Paho where
/// a real client can express it and raw packets where it cannot (docs/mqtt.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_catalogue_of_normative_statements_holds() {
    let s = TestServer::start(config(
        "[mqtt]\nlisten = \"127.0.0.1:0\"\n[namespaces.conf]\nallow_publish = true\nhistory_size = 100\n",
    ))
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/mqtt_conformance.py");
    let port = s.mqtt.unwrap().port().to_string();
    let run = tokio::process::Command::new("python3").args([script, "127.0.0.1", &port]).kill_on_drop(true).output();
    // Every wait inside is bounded (30 s); this bounds the whole.
    let out = tokio::time::timeout(Duration::from_secs(900), run)
        .await
        .expect("the catalogue finishes")
        .expect("python3 with paho-mqtt (./scripts/test installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = report.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(out.status.success() && failed.is_empty(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary = report.lines().last().unwrap_or_default();
    assert!(summary.contains(" 0 failed") && !summary.contains(" 0 checks run"), "{summary}");
}
