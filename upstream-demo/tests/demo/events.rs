//! `/api/v1/events`: 202 at once, the same id for a repeated key (also concurrently, and after
//! Redis forgot the key), exactly one stored row, and 4xx on bad input.

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{json, Value};

use crate::harness::{eventually, One};

async fn post(t: &One, key: &str, payload: &Value) -> (u16, Value) {
    let r = t
        .http
        .post(t.url("/api/v1/events"))
        .header("Idempotency-Key", key)
        .json(payload)
        .send()
        .await
        .expect("POST /api/v1/events");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON body"))
}

async fn wait_stored(t: &One, id: &str) -> Value {
    let url = t.url(&format!("/api/v1/events/{id}"));
    eventually(Duration::from_secs(20), "event stored", || {
        let req = t.http.get(&url).send();
        async move {
            let v: Value = req.await.ok()?.json().await.ok()?;
            (v["status"] == "stored").then_some(v)
        }
    })
    .await
}

async fn rows_with_key(db: &sqlx::PgPool, key: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(db)
        .await
        .expect("count events")
}

#[tokio::test]
async fn a_repeated_key_gets_the_same_id_and_one_row() {
    let t = One::start().await;
    let db = t.stack.db().await;
    let payload = json!({"type": "signup", "user": 7});

    let (status, first) = post(&t, "order-1", &payload).await;
    assert_eq!(status, 202);
    assert_eq!(first["duplicate"], false);
    let id = first["eventId"].as_str().unwrap().to_string();
    let (status, again) = post(&t, "order-1", &json!({"type": "other"})).await;
    assert_eq!(status, 202);
    assert_eq!(again["eventId"], id.as_str());
    assert_eq!(again["duplicate"], true);

    let stored = wait_stored(&t, &id).await;
    assert_eq!(stored["payload"], payload, "the first body wins");
    assert_eq!(stored["idempotencyKey"], "order-1");
    assert_eq!(rows_with_key(&db, "order-1").await, 1);

    // Redis forgets the key (expiry, flush): Postgres still knows it.
    let mut redis = t.stack.redis().await;
    let _: () = redis.del("demo:{demo-events}:key:order-1").await.unwrap();
    let (status, later) = post(&t, "order-1", &payload).await;
    assert_eq!(status, 202);
    assert_eq!(later["eventId"], id.as_str());
    // Give the worker a chance to (wrongly) store a second copy before counting.
    let (_, probe) = post(&t, "probe-1", &payload).await;
    wait_stored(&t, probe["eventId"].as_str().unwrap()).await;
    assert_eq!(rows_with_key(&db, "order-1").await, 1);
}

#[tokio::test]
async fn concurrent_twins_share_one_id() {
    let t = One::start().await;
    let db = t.stack.db().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let http = t.http.clone();
        let url = t.url("/api/v1/events");
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .header("Idempotency-Key", "twin")
                .json(&json!({"attempt": i}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            let v: Value = r.json().await.unwrap();
            v["eventId"].as_str().unwrap().to_string()
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every twin got the same id: {ids:?}");
    wait_stored(&t, &ids[0]).await;
    assert_eq!(rows_with_key(&db, "twin").await, 1);
}

#[tokio::test]
async fn pending_then_stored_and_bad_input() {
    let t = One::start().await;
    let (_, v) = post(&t, "k-status", &json!({"n": 1})).await;
    let id = v["eventId"].as_str().unwrap();
    let s: Value = t
        .http
        .get(t.url(&format!("/api/v1/events/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(s["status"] == "pending" || s["status"] == "stored", "{s}");
    wait_stored(&t, id).await;

    let long_key = "k".repeat(201);
    let max_key = "k".repeat(200);
    let cases: Vec<(Option<&str>, &str, u16)> = vec![
        (None, r#"{"a":1}"#, 400),
        (Some(""), r#"{"a":1}"#, 400),
        (Some(&long_key), r#"{"a":1}"#, 400),
        (Some("k-bad-json"), r#"{"a":"#, 400),
        (Some("k-array"), r#"[1,2]"#, 422),
        (Some("k-nul"), r#"{"a":"\u0000"}"#, 422),
        (Some(&max_key), r#"{"a":1}"#, 202),
    ];
    for (key, payload, status) in cases {
        let mut req = t
            .http
            .post(t.url("/api/v1/events"))
            .header("content-type", "application/json")
            .body(payload.to_string());
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "{key:?} {payload}");
        let v: Value = r.json().await.unwrap();
        if status != 202 {
            assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
        }
    }
    let big = json!({"blob": "x".repeat(70 * 1024)});
    let (status, _) = post(&t, "k-big", &big).await;
    assert_eq!(status, 413);

    for (path, status) in [
        ("/api/v1/events/not-a-uuid", 400),
        ("/api/v1/events/00000000-0000-4000-8000-000000000000", 404),
    ] {
        let r = t.http.get(t.url(path)).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
    }
}
