//! Process-level behaviour: /health follows Redis, concurrent starts migrate once, a SIGTERM
//! loses no accepted event, and /external fails or stalls as configured (or as told at runtime).

use std::time::Duration;

use serde_json::{json, Value};

use tokio::task::JoinHandle;

use crate::harness::{eventually, http_client, Demo, One, Stack};

#[tokio::test]
async fn health_is_503_while_redis_is_down() {
    let mut t = One::start().await;
    let v: Value = t
        .http
        .get(t.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["checks"]["redis"]["status"], "ok");
    assert_eq!(v["checks"]["postgres"]["status"], "ok");

    t.stack.redis.stop();
    let url = t.url("/health");
    let v = eventually(Duration::from_secs(10), "/health = 503", || {
        let req = t.http.get(&url).send();
        async move {
            let r = req.await.ok()?;
            (r.status() == 503).then_some(())?;
            r.json::<Value>().await.ok()
        }
    })
    .await;
    assert_eq!(v["checks"]["redis"]["status"], "error", "{v}");
    assert_eq!(v["checks"]["postgres"]["status"], "ok", "{v}");
    assert!(v["message"].as_str().unwrap().contains("redis"), "{v}");

    // Events cannot be accepted without Redis: a clean 503, not a 500 or a hang.
    let r = t
        .http
        .post(t.url("/api/v1/events"))
        .header("Idempotency-Key", "while-down")
        .json(&json!({"a": 1}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    t.stack.redis.restart();
    eventually(Duration::from_secs(20), "/health = 200 again", || {
        let req = t.http.get(&url).send();
        async move { (req.await.ok()?.status() == 200).then_some(()) }
    })
    .await;
}

/// Clients that post events (distinct keys) until their first non-202 answer; each returns the
/// keys that were accepted.
fn flood(t: &One, clients: usize, per_client: usize) -> Vec<JoinHandle<Vec<String>>> {
    (0..clients)
        .map(|client| {
            let http = t.http.clone();
            let url = t.url("/api/v1/events");
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                for i in 0..per_client {
                    let key = format!("c{client}-{i}");
                    let r = http
                        .post(&url)
                        .header("Idempotency-Key", &key)
                        .json(&json!({"client": client, "i": i}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 202 => accepted.push(key),
                        _ => break,
                    }
                }
                accepted
            })
        })
        .collect()
}

async fn stream_len(t: &One) -> i64 {
    let mut r = t.stack.redis().await;
    redis::cmd("XLEN")
        .arg("demo:{demo-events}:stream")
        .query_async(&mut r)
        .await
        .expect("XLEN")
}

/// Accepted keys that have no row.
async fn unstored(db: &sqlx::PgPool, accepted: &[String]) -> Vec<String> {
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM events WHERE idempotency_key = ANY($1)")
            .bind(accepted)
            .fetch_all(db)
            .await
            .expect("select stored keys");
    accepted
        .iter()
        .filter(|k| !stored.contains(k))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_loses_no_accepted_event() {
    let mut t = One::start().await;
    let db = t.stack.db().await;
    // Hold the worker back: its INSERT waits on this lock, so accepted events pile up on the
    // stream and the SIGTERM arrives with a batch in hand and a backlog behind it.
    let mut lock = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let clients = flood(&t, 4, 1000);
    eventually(
        Duration::from_secs(30),
        "a backlog on the stream",
        || async { (stream_len(&t).await >= 200).then_some(()) },
    )
    .await;

    t.demo.signal("TERM");
    let mut accepted = Vec::new();
    for c in clients {
        accepted.extend(c.await.unwrap());
    }
    assert!(
        t.demo.exited().is_none(),
        "the process waits to store what it accepted"
    );
    lock.commit().await.unwrap();

    let status = t.demo.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "clean exit: {status:?}\n{}", t.demo.log());
    let missing = unstored(&db, &accepted).await;
    assert!(
        missing.is_empty(),
        "{} of {} accepted events were not stored when the process exited: {missing:?}\n{}",
        missing.len(),
        accepted.len(),
        t.demo.log()
    );
    let log = t.demo.log();
    let drained = log
        .lines()
        .find_map(|l| {
            l.split_once("event worker drained entries=")
                .map(|(_, n)| n.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no drain line in:\n{log}"));
    assert_ne!(drained, "0", "the drain had work to do");
    assert_eq!(
        stream_len(&t).await,
        0,
        "everything stored was acknowledged and deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_catches_up_after_restart() {
    let mut t = One::start().await;
    let db = t.stack.db().await;
    let mut lock = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let clients = flood(&t, 2, 1000);
    eventually(
        Duration::from_secs(30),
        "a backlog on the stream",
        || async { (stream_len(&t).await >= 150).then_some(()) },
    )
    .await;
    // No goodbye: the batch in hand stays pending (delivered, unacknowledged) on the stream.
    t.demo.signal("KILL");
    let mut accepted = Vec::new();
    for c in clients {
        accepted.extend(c.await.unwrap());
    }
    t.demo.wait_exit(Duration::from_secs(10)).await;
    lock.commit().await.unwrap();
    assert!(
        !unstored(&db, &accepted).await.is_empty(),
        "the crash left work behind"
    );

    // The same consumer name comes back and reads its pending entries first.
    t.demo = Demo::start(&t.stack, "test-1", &[]).await;
    eventually(
        Duration::from_secs(30),
        "every accepted event stored",
        || {
            let db = db.clone();
            let accepted = accepted.clone();
            async move { unstored(&db, &accepted).await.is_empty().then_some(()) }
        },
    )
    .await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db)
        .await
        .unwrap();
    // Each client may have had one request in flight at the kill: stored, but never answered.
    let rows = rows as usize;
    assert!(
        (accepted.len()..=accepted.len() + 2).contains(&rows),
        "{rows} rows for {} accepted events",
        accepted.len()
    );
}

#[tokio::test]
async fn three_instances_start_together_on_a_fresh_database() {
    let stack = Stack::start();
    let (a, b, c) = tokio::join!(
        Demo::start(&stack, "demo-1", &[]),
        Demo::start(&stack, "demo-2", &[]),
        Demo::start(&stack, "demo-3", &[]),
    );
    let http = http_client();
    for d in [&a, &b, &c] {
        let v: Value = http
            .get(d.url("/api/v1/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["instanceId"], d.instance.as_str());
        assert!(v["uptimeSeconds"].is_u64(), "{v}");
    }
    let db = stack.db().await;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(users, 2, "seeded once");
    let migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db)
        .await
        .unwrap();
    let files = std::fs::read_dir(crate::harness::schema_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    assert_eq!(migrations, files as i64);
}

#[tokio::test]
async fn external_fails_and_stalls_as_configured() {
    let stack = Stack::start();
    let http = http_client();
    let (ok, failing, stalling, controlled) = tokio::join!(
        Demo::start(&stack, "ok", &[]),
        Demo::start(&stack, "failing", &[("EXTERNAL_FAIL_RATE", "1")]),
        Demo::start(&stack, "stalling", &[("EXTERNAL_STALL_RATE", "1")]),
        Demo::start(
            &stack,
            "controlled",
            &[("EXTERNAL_CONTROL", "1"), ("EXTERNAL_FAIL_RATE", "1")]
        ),
    );
    for _ in 0..5 {
        let r = http.get(ok.url("/api/v1/external")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = http
            .get(failing.url("/api/v1/external"))
            .send()
            .await
            .unwrap();
        assert!(r.status() == 500 || r.status() == 503, "{}", r.status());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "external_failed");
    }
    let r = http
        .get(stalling.url("/api/v1/external"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        r.is_err_and(|e| e.is_timeout()),
        "a stalled call outlives a 2 s timeout"
    );

    // Without EXTERNAL_CONTROL the mode route does not exist.
    for method in [reqwest::Method::GET, reqwest::Method::PUT] {
        let r = http
            .request(method.clone(), ok.url("/api/v1/external/mode"))
            .json(&json!({"failRate": 0, "stallRate": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{method}");
    }

    // With it: the start rates are shown, and a PUT changes what the next calls do.
    let mode_url = controlled.url("/api/v1/external/mode");
    let v: Value = http
        .get(&mode_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v,
        json!({"failRate": 1.0, "stallRate": 0.0, "instanceId": "controlled"})
    );
    let external = controlled.url("/api/v1/external");
    for _ in 0..3 {
        let status = http.get(&external).send().await.unwrap().status();
        assert!(status == 500 || status == 503, "{status}");
    }
    let r = http
        .put(&mode_url)
        .json(&json!({"failRate": 0, "stallRate": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["failRate"].as_f64(), v["stallRate"].as_f64()),
        (Some(0.0), Some(0.0))
    );
    for _ in 0..5 {
        let r = http.get(&external).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["outcome"], "ok");
    }
    // Bad bodies change nothing.
    for body in [
        json!({"failRate": 1.5, "stallRate": 0}),
        json!({"failRate": -0.1, "stallRate": 0}),
        json!({"failRate": 1}),
        json!({"failRate": 1, "stallRate": 0, "extra": true}),
        json!([1, 0]),
    ] {
        let r = http.put(&mode_url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 422, "{body}");
    }
    let status = http.get(&external).send().await.unwrap().status();
    assert_eq!(status, 200, "a refused PUT left the rates alone");
}
