//! Publication sources against the real PostgreSQL on this machine (127.0.0.1:5432, trust
//! auth; `SWITCHBOARD_TEST_POSTGRES` to point elsewhere): an outbox table with the DDL of
//! docs/sources.md. Committed rows arrive, in order, woken by NOTIFY; rolled-back rows
//! never do; two nodes on one table publish each row once; poison rows are moved aside
//! and the rest flows; a killed database connection is reconnected.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{config, TestServer};
use serde_json::{json, Value};
use switchboard_client::Connection;

fn pg_url() -> String {
    std::env::var("SWITCHBOARD_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn pg() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (./scripts/test starts it)");
    tokio::spawn(conn);
    client
}

/// A fresh outbox table (and its notify trigger), as docs/sources.md creates it.
async fn outbox(db: &tokio_postgres::Client, extra: &str) -> String {
    let t = format!("sb_outbox_{}", fastrand::u32(..));
    let ddl = doc_ddl().replace("switchboard_outbox", &t);
    db.batch_execute(&ddl).await.unwrap();
    if !extra.is_empty() {
        db.batch_execute(&extra.replace("$T", &t)).await.unwrap();
    }
    t
}

/// The DDL block of docs/sources.md.
fn doc_ddl() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/sources.md")).unwrap();
    let block = doc.split("```sql\n").nth(1).unwrap();
    block.split("\n```").next().unwrap().to_string()
}

fn source(table: &str, extra: &str) -> String {
    format!(
        "[[sources]]\nkind = \"postgres_outbox\"\nurl = \"{}\"\ntable = \"{table}\"\nnotify = \"{table}\"\n\
         poll_ms = 600000\n{extra}",
        pg_url()
    )
}

async fn metric(s: &TestServer, name: &str) -> u64 {
    let text = s.http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

async fn until_connected(s: &TestServer) {
    for _ in 0..600 {
        if metric(s, "switchboard_source_connected").await == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the source never connected to {}", pg_url());
}

async fn subscriber(s: &TestServer, channel: &str) -> Connection {
    let mut c = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    c.call(json!({"cmd": "subscribe", "channel": channel})).await.unwrap();
    c
}

/// The data of the next `n` publications `c` receives.
async fn receive(c: &mut Connection, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), c.next_push()).await.expect("a publication within 30 s");
        if let Some(p) = m.unwrap().get("pub") {
            out.push(p["data"].clone());
        }
    }
    out
}

async fn insert(db: &mut tokio_postgres::Client, table: &str, channel: &str, ns: std::ops::Range<i64>, commit: bool) {
    let tx = db.transaction().await.unwrap();
    for n in ns {
        let data = json!({"n": n}).to_string();
        tx.execute(&format!("INSERT INTO {table} (channel, data) VALUES ($1, $2::text::jsonb)"), &[&channel, &data])
            .await
            .unwrap();
    }
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_arrive_in_order_woken_by_notify_and_rolled_back_ones_never() {
    let mut db = pg().await;
    let t = outbox(&db, "").await;
    let s = TestServer::start(config(&source(&t, ""))).await;
    until_connected(&s).await;
    let mut c = subscriber(&s, "news:outbox").await;
    // (poll_ms is 10 minutes: what arrives within the test came by NOTIFY.)
    insert(&mut db, &t, "news:outbox", 0..20, true).await;
    insert(&mut db, &t, "news:outbox", 20..25, false).await;
    insert(&mut db, &t, "news:outbox", 25..55, true).await;
    let got: Vec<i64> = receive(&mut c, 50).await.iter().map(|d| d["n"].as_i64().unwrap()).collect();
    let want: Vec<i64> = (0..20).chain(25..55).collect();
    assert_eq!(got, want);
    // Nothing else comes: the next publication is one made after them.
    s.publish("news:outbox", json!("marker")).await;
    assert_eq!(receive(&mut c, 1).await, [json!("marker")]);
    let left: i64 = db.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "published rows are deleted");
    assert_eq!(metric(&s, "switchboard_source_rows_published").await, 50);
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_table_publish_each_row_once() {
    let mut db = pg().await;
    let t = outbox(&db, "").await;
    let a = TestServer::start(config(&source(&t, "batch = 7\n"))).await;
    let b = TestServer::start(config(&source(&t, "batch = 7\n"))).await;
    until_connected(&a).await;
    until_connected(&b).await;
    // Each node has its own (memory) broker: a row shows on the node that published it.
    let (mut ca, mut cb) = (subscriber(&a, "news:shared").await, subscriber(&b, "news:shared").await);
    for k in 0..10 {
        insert(&mut db, &t, "news:shared", k * 20..k * 20 + 20, true).await;
    }
    let mut seen_a = BTreeSet::new();
    let mut seen_b = BTreeSet::new();
    for _ in 0..600 {
        let published = metric(&a, "switchboard_source_rows_published").await
            + metric(&b, "switchboard_source_rows_published").await;
        if published >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (na, nb) =
        (metric(&a, "switchboard_source_rows_published").await, metric(&b, "switchboard_source_rows_published").await);
    assert_eq!(na + nb, 200, "each row published by exactly one node ({na} + {nb})");
    for d in receive(&mut ca, na as usize).await {
        assert!(seen_a.insert(d["n"].as_i64().unwrap()));
    }
    for d in receive(&mut cb, nb as usize).await {
        assert!(seen_b.insert(d["n"].as_i64().unwrap()));
    }
    assert!(seen_a.is_disjoint(&seen_b));
    assert_eq!(seen_a.union(&seen_b).copied().collect::<Vec<_>>(), (0..200).collect::<Vec<_>>());
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_are_moved_aside_and_a_killed_connection_is_reconnected() {
    let mut db = pg().await;
    let t = outbox(&db, "CREATE TABLE $T_dead (LIKE $T);").await;
    let s = TestServer::start(config(&source(&t, &format!("dead_table = \"{t}_dead\"\n")))).await;
    until_connected(&s).await;
    let mut c = subscriber(&s, "news:p").await;
    insert(&mut db, &t, "news:p", 0..3, true).await;
    insert(&mut db, &t, "not a channel!", 3..4, true).await;
    insert(&mut db, &t, "news:p", 4..6, true).await;
    let got: Vec<i64> = receive(&mut c, 5).await.iter().map(|d| d["n"].as_i64().unwrap()).collect();
    assert_eq!(got, [0, 1, 2, 4, 5]);
    // (Publications go out before the claim's transaction commits: wait for the commit.)
    let mut dead: Vec<String> = Vec::new();
    for _ in 0..600 {
        dead =
            db.query(&format!("SELECT channel FROM {t}_dead"), &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead, ["not a channel!"]);
    assert_eq!(metric(&s, "switchboard_source_rows_poison").await, 1);
    // The database drops the source's connection (as a restart would): it comes back.
    let killed: i64 = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("switchboard postgres_outbox:{t}")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    for _ in 0..600 {
        if metric(&s, "switchboard_source_errors").await >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_connected(&s).await;
    insert(&mut db, &t, "news:p", 6..8, true).await;
    let got: Vec<i64> = receive(&mut c, 2).await.iter().map(|d| d["n"].as_i64().unwrap()).collect();
    assert_eq!(got, [6, 7]);
    db.batch_execute(&format!("DROP TABLE {t}; DROP TABLE {t}_dead")).await.unwrap();
}

#[test]
fn bad_source_configuration_is_refused_with_the_key() {
    let bad = [
        ("url = \"mysql://x\"", "sources[0].url"),
        ("url = \"postgres://x\"\ntable = \"drop table x;\"", "sources[0].table"),
    ];
    for (body, key) in bad {
        let file = std::env::temp_dir().join(format!("sb-sources-{}.toml", fastrand::u64(..)));
        std::fs::write(&file, format!("[[sources]]\nkind = \"postgres_outbox\"\n{body}\n")).unwrap();
        let e = switchboard_server::config::Config::load(Some(&file), Vec::new()).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
}
