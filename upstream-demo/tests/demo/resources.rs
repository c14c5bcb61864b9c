//! `/api/v1/resources`: CRUD, pagination bounds, field selection, and 4xx (never 5xx) on bad input.

use serde_json::{json, Value};

use crate::harness::One;

async fn body(r: reqwest::Response) -> Value {
    r.json().await.expect("JSON body")
}

#[tokio::test]
async fn crud_round_trip_records_the_owner() {
    let t = One::start().await;
    let r = t
        .http
        .post(t.url("/api/v1/resources"))
        .header("X-Consumer-Id", "acme")
        .json(&json!({"name": "  Widget ", "description": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let created = body(r).await;
    let id = created["id"].as_i64().expect("id");
    assert!(id > 5, "ids continue after the seed rows: {id}");
    assert_eq!(location, format!("/api/v1/resources/{id}"));
    assert_eq!(created["name"], "Widget");
    assert_eq!(created["owner"], "acme");

    let got = body(t.http.get(t.url(&location)).send().await.unwrap()).await;
    assert_eq!(got, created);

    let r = t
        .http
        .put(t.url(&location))
        .json(&json!({"name": "Gadget"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let replaced = body(r).await;
    assert_eq!(replaced["name"], "Gadget");
    assert_eq!(
        replaced["description"],
        Value::Null,
        "PUT replaces the whole resource"
    );
    assert_eq!(replaced["owner"], "acme", "PUT keeps the owner");

    let r = t.http.delete(t.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    for r in [
        t.http.get(t.url(&location)).send().await.unwrap(),
        t.http.delete(t.url(&location)).send().await.unwrap(),
        t.http
            .put(t.url(&location))
            .json(&json!({"name": "x"}))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.status(), 404);
        assert_eq!(body(r).await["error"], "not_found");
    }

    // Without a forwarded consumer there is no owner.
    let r = t
        .http
        .post(t.url("/api/v1/resources"))
        .json(&json!({"name": "Anonymous"}))
        .send()
        .await
        .unwrap();
    assert_eq!(body(r).await["owner"], Value::Null);
}

#[tokio::test]
async fn pagination_and_field_selection() {
    let t = One::start().await;
    for i in 0..7 {
        let r = t
            .http
            .post(t.url("/api/v1/resources"))
            .json(&json!({"name": format!("item {i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    // 5 seeded + 7 created = 12 rows: pages of 5 hold 5, 5, 2.
    let mut seen = Vec::new();
    for (page, expect) in [(1, 5), (2, 5), (3, 2), (4, 0)] {
        let v = body(
            t.http
                .get(t.url(&format!("/api/v1/resources?page={page}&per_page=5")))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(v["total"], 12);
        assert_eq!(v["totalPages"], 3);
        assert_eq!(v["perPage"], 5);
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), expect, "page {page}");
        seen.extend(data.iter().map(|r| r["id"].as_i64().unwrap()));
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "pages are ordered and do not overlap");

    let v = body(t.http.get(t.url("/api/v1/resources")).send().await.unwrap()).await;
    assert_eq!(v["perPage"], 20);
    assert_eq!(v["data"].as_array().unwrap().len(), 12);

    let v = body(
        t.http
            .get(t.url("/api/v1/resources?fields=id,name&per_page=2"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    for r in v["data"].as_array().unwrap() {
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 2, "{r}");
        assert!(r["id"].is_i64() && r["name"].is_string(), "{r}");
    }
    let one = body(
        t.http
            .get(t.url("/api/v1/resources/1?fields=name"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(one, json!({"name": "Getting started"}));

    for query in [
        "fields=id,password",
        "fields=",
        "page=0",
        "page=abc",
        "page=-1",
        "per_page=0",
        "per_page=101",
        "page=99999999999",
    ] {
        let r = t
            .http
            .get(t.url(&format!("/api/v1/resources?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let v = body(r).await;
        assert!(
            v["error"].is_string() && v["message"].is_string(),
            "{query}: {v}"
        );
    }
}

#[tokio::test]
async fn bad_input_is_4xx_never_5xx() {
    let t = One::start().await;
    let long = "x".repeat(201);
    let cases: Vec<(reqwest::Method, String, Option<String>, u16)> = vec![
        (
            reqwest::Method::GET,
            "/api/v1/resources/abc".into(),
            None,
            400,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/resources/99999999999999999999".into(),
            None,
            400,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/resources/1.5".into(),
            None,
            400,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/resources/-7".into(),
            None,
            404,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/resources/424242".into(),
            None,
            404,
        ),
        (
            reqwest::Method::DELETE,
            "/api/v1/resources/abc".into(),
            None,
            400,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(r#"{"name":""}"#.into()),
            422,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(r#"{"name":"   "}"#.into()),
            422,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(format!(r#"{{"name":"{long}"}}"#)),
            422,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(r#"{"name":"a\u0000b"}"#.into()),
            422,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(r#"{"name":7}"#.into()),
            422,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(r#"{"name":"x","extra":1}"#.into()),
            422,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(r#"{"description":"no name"}"#.into()),
            422,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(r#"["name"]"#.into()),
            422,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(r#"{"name": "x""#.into()),
            400,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/resources".into(),
            Some(format!(
                r#"{{"name":"x","description":"{}"}}"#,
                "d".repeat(2001)
            )),
            422,
        ),
        (
            reqwest::Method::PUT,
            "/api/v1/resources/1".into(),
            Some(r#"{"name":null}"#.into()),
            422,
        ),
        (
            reqwest::Method::PATCH,
            "/api/v1/resources/1".into(),
            None,
            405,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/nothing-here".into(),
            None,
            404,
        ),
    ];
    for (method, path, payload, status) in cases {
        let mut req = t.http.request(method.clone(), t.url(&path));
        if let Some(p) = &payload {
            req = req
                .header("content-type", "application/json")
                .body(p.clone());
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "{method} {path} {payload:?}");
        let v = body(r).await;
        assert!(
            v["error"].is_string() && v["message"].is_string(),
            "{method} {path}: {v}"
        );
    }
    // Too large for the body limit.
    let huge = format!(r#"{{"name":"{}"}}"#, "x".repeat(300 * 1024));
    let r = t
        .http
        .post(t.url("/api/v1/resources"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Over-long forwarded identity.
    let r = t
        .http
        .post(t.url("/api/v1/resources"))
        .header("X-Consumer-Id", "c".repeat(300))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
