//! The HTTP contract of the ledger core, against the real app on both backends.

use serde_json::{json, Value};

use crate::helpers::{
    self, backend_app_tests, TestApp, APP, KEY_ADMIN, KEY_ALL, KEY_SEND, KEY_TOKEN,
};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// (method, path, role it needs, a valid body)
fn endpoints() -> Vec<(&'static str, String, &'static str, Value)> {
    vec![
        (
            "POST",
            "/v1/credentials".into(),
            "send",
            json!({"openid": "o-auth", "kind": "form_id", "value": "auth-f1"}),
        ),
        (
            "GET",
            "/v1/admin/users/o-auth/quota".into(),
            "admin",
            Value::Null,
        ),
        ("GET", "/v1/admin/users".into(), "admin", Value::Null),
        ("GET", "/v1/admin/stats".into(), "admin", Value::Null),
        (
            "GET",
            format!("/v1/apps/{APP}/access-token"),
            "token",
            Value::Null,
        ),
        (
            "POST",
            format!("/v1/apps/{APP}/access-token/refresh"),
            "token",
            json!({"stale_token": "not-the-current-token"}),
        ),
    ]
}

async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut req = match method {
        "POST" => app.http.post(app.url(path)).json(body),
        _ => app.http.get(app.url(path)),
    };
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    helpers::read(req.send().await.unwrap()).await
}

backend_app_tests! {
    async fn authentication_matrix(tdb) {
        // Dozens of failed authentications from one address: more than the default
        // allows (that limit is tested in abuse.rs).
        let app = TestApp::spawn_with(tdb, |s| s.limits.auth_failures_per_minute = 0).await;
        let keys = [("send", KEY_SEND), ("admin", KEY_ADMIN), ("token", KEY_TOKEN)];
        for (method, path, role, body) in endpoints() {
            // No key, an unknown key, a key in the wrong scheme, a session-shaped
            // token, a known key with trailing garbage: 401.
            let bad = [
                None,
                Some("Bearer not-a-key-at-all".to_string()),
                Some(format!("Basic {KEY_ALL}")),
                Some(format!("Bearer {KEY_ALL}x")),
                Some("Bearer v1.eyJhcHAiOiJ3eCJ9.c2lnbmF0dXJl".to_string()),
                Some("Bearer".to_string()),
            ];
            for auth in &bad {
                let (status, res) = call(&app, method, &path, auth.as_deref(), &body).await;
                assert_eq!((status, code(&res)), (401, "unauthorized"), "{method} {path} {auth:?}");
            }
            for (key_role, key) in keys {
                let (status, res) = call(&app, method, &path, Some(&format!("Bearer {key}")), &body).await;
                if key_role == role {
                    assert_eq!(status, 200, "{method} {path} with {key_role}: {res}");
                } else {
                    assert_eq!((status, code(&res)), (403, "forbidden"), "{method} {path} with {key_role}");
                }
            }
            // The scheme is case-insensitive; a key with every role passes.
            let (status, _) = call(&app, method, &path, Some(&format!("bearer {KEY_ALL}")), &body).await;
            assert_eq!(status, 200, "{method} {path}");
        }
        // Only the two accepted registrations of "auth-f1" count: one stored row.
        assert_eq!(app.credential_count(), 1);
    }

    /// The ingest writers have connections of their own, beside the pool. With one
    /// pooled connection to share (on PostgreSQL the sender's LISTEN holds a second),
    /// reports and reads still both go through; writers that kept a pooled
    /// connection between groups would leave the read waiting for the pool's
    /// timeout (5 s) and answering 503.
    async fn ingest_writers_leave_the_pool_to_others(tdb) {
        let pool = match &tdb {
            crate::helpers::TestDb::Sqlite { .. } => 1,
            crate::helpers::TestDb::Postgres { .. } => 2,
        };
        let app = TestApp::spawn_with(tdb, |s| s.db_pool_size = pool).await;
        for i in 1..=3u64 {
            let body = json!({"openid": "pooled", "kind": "form_id", "value": format!("f{i}")});
            let (status, res) = app.post("/v1/credentials", Some(KEY_SEND), &body).await;
            assert_eq!((status, res["accepted"].as_u64()), (200, Some(1)), "{res}");
            let (status, q) = app.get("/v1/admin/users/pooled/quota", Some(KEY_ADMIN)).await;
            assert_eq!((status, q["sendable"].as_u64()), (200, Some(i)), "{q}");
        }
    }

    async fn registering_and_reading_a_quota(tdb) {
        let app = TestApp::spawn_with(tdb, |s| s.prepay_id_uses = 3).await;
        let (status, res) = app
            .post("/v1/credentials", Some(KEY_SEND), &json!({
                "app_id": APP, "openid": "o1", "kind": "prepay_id", "value": "wx27prepay001"
            }))
            .await;
        assert_eq!(status, 200, "{res}");
        assert_eq!(res, json!({"accepted": 1, "duplicates": 0, "rejected": []}));
        let issued = (chrono::Utc::now() - chrono::TimeDelta::days(6)).to_rfc3339();
        let (status, res) = app
            .post("/v1/credentials", Some(KEY_SEND), &json!({"credentials": [
                {"openid": "o1", "kind": "form_id", "value": "form-a", "issued_at": issued},
                {"openid": "o1", "kind": "form_id", "value": "form-b"},
                {"openid": "o1", "kind": "form_id", "value": "form-b"},
                {"openid": "o1", "kind": "form_id", "value": "the formId is a mock one"},
                {"openid": "o1", "kind": "form_id", "value": "bad value"},
                {"openid": "o2", "kind": "form_id", "value": "form-c"}
            ]}))
            .await;
        assert_eq!(status, 200, "{res}");
        assert_eq!(res["accepted"], 3);
        assert_eq!(res["duplicates"], 1);
        assert_eq!(res["rejected"], json!([
            {"value": "the formId is a mock one", "reason": "mock_form_id"},
            {"value": "bad value", "reason": "invalid_format"}
        ]));

        let (status, q) = app.get("/v1/admin/users/o1/quota", Some(KEY_ADMIN)).await;
        assert_eq!(status, 200, "{q}");
        assert_eq!(q["app_id"], APP);
        assert_eq!(q["openid"], "o1");
        assert_eq!(q["sendable"], 5);
        assert_eq!(q["by_kind"]["form_id"]["credentials"], 2);
        assert_eq!(q["by_kind"]["form_id"]["uses_left"], 2);
        assert_eq!(q["by_kind"]["prepay_id"]["uses_left"], 3);
        assert_eq!(q["subscriptions"], json!({}));
        assert_eq!(q["expiring_within_24h"], 1);
        let next = q["by_kind"]["form_id"]["next_expiry"].as_str().unwrap();
        let next = chrono::DateTime::parse_from_rfc3339(next).unwrap();
        let hours_left = (next.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_minutes();
        assert!((23 * 60..24 * 60).contains(&hours_left), "{hours_left} minutes left");

        // A user never seen answers zeros, not 404.
        let (status, q) = app.get(&format!("/v1/admin/users/nobody/quota?app_id={APP}"), Some(KEY_ADMIN)).await;
        assert_eq!(status, 200);
        assert_eq!(q["sendable"], 0);
        assert_eq!(q["by_kind"]["form_id"], json!({"credentials": 0, "uses_left": 0, "next_expiry": null}));

        let (status, page) = app.get("/v1/admin/users?limit=1", Some(KEY_ADMIN)).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["users"][0]["openid"], "o1");
        assert_eq!(page["next_cursor"], "o1");
        let (_, page) = app.get("/v1/admin/users?limit=1&cursor=o1", Some(KEY_ADMIN)).await;
        assert_eq!(page["users"][0]["openid"], "o2");
        assert_eq!(page["next_cursor"], Value::Null);

        let (status, stats) = app.get("/v1/admin/stats", Some(KEY_ADMIN)).await;
        assert_eq!(status, 200, "{stats}");
        assert_eq!(stats["live"]["form_id"]["credentials"], 3);
        assert_eq!(stats["live"]["prepay_id"]["uses_left"], 3);
        assert_eq!(stats["expiring_within_24h"], 1);
    }

    async fn bad_registrations_are_refused_whole_and_store_nothing(tdb) {
        let app = TestApp::spawn(tdb).await;
        let ok = json!({"openid": "o1", "kind": "form_id", "value": "f"});
        let many: Vec<Value> = (0..501).map(|i| json!({"openid": "o", "kind": "form_id", "value": format!("v{i}")})).collect();
        let cases: Vec<(Value, u16, &str)> = vec![
            (json!({"openid": "o1", "kind": "form_id", "value": "f", "extra": 1}), 400, "invalid_request"),
            (json!({"credentials": [ok.clone(), {"openid": "o1", "kind": "form_id", "value": "g", "colour": "red"}]}), 400, "invalid_request"),
            (json!({"credentials": [ok.clone()], "app_id": APP}), 400, "invalid_request"),
            (json!({"kind": "form_id", "value": "f"}), 400, "invalid_request"),
            (json!({"openid": "o1", "value": "f"}), 400, "invalid_request"),
            (json!({"openid": "o1", "kind": "subscription", "value": "f"}), 400, "invalid_request"),
            (json!({"openid": "o1", "kind": "form_id", "value": 5}), 400, "invalid_request"),
            (json!({"openid": "o 1", "kind": "form_id", "value": "f"}), 400, "invalid_request"),
            (json!({"openid": "", "kind": "form_id", "value": "f"}), 400, "invalid_request"),
            (json!({"credentials": [ok.clone(), {"openid": "bad\nid", "kind": "form_id", "value": "g"}]}), 400, "invalid_request"),
            (json!({"openid": "o1", "kind": "form_id", "value": "f", "issued_at": "yesterday"}), 400, "invalid_request"),
            (json!({"credentials": many}), 400, "invalid_request"),
            (json!({"credentials": "all of them"}), 400, "invalid_request"),
            (json!([ok.clone()]), 400, "invalid_request"),
            (json!({"app_id": "wxnope", "openid": "o1", "kind": "form_id", "value": "f"}), 404, "unknown_app"),
            (json!({"credentials": [ok.clone(), {"app_id": "wxnope", "openid": "o1", "kind": "form_id", "value": "g"}]}), 404, "unknown_app"),
        ];
        for (body, status, expected) in cases {
            let (got, res) = app.post("/v1/credentials", Some(KEY_SEND), &body).await;
            assert_eq!((got, code(&res)), (status, expected), "{body}: {res}");
            assert!(res["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        // The message names the unknown field.
        let (_, res) = app.post("/v1/credentials", Some(KEY_SEND), &json!({"openid": "o", "kind": "form_id", "value": "f", "extra": 1})).await;
        assert!(res["error"]["message"].as_str().unwrap().contains("extra"), "{res}");

        // Not JSON, not UTF-8, too large.
        let raw = |body: Vec<u8>| app.http.post(app.url("/v1/credentials")).bearer_auth(KEY_SEND).header("content-type", "application/json").body(body);
        let (status, res) = helpers::read(raw(b"{\"openid\": ".to_vec()).send().await.unwrap()).await;
        assert_eq!((status, code(&res)), (400, "invalid_request"));
        let (status, res) = helpers::read(raw(b"{\"openid\": \"\xff\xfe\", \"kind\": \"form_id\", \"value\": \"f\"}".to_vec()).send().await.unwrap()).await;
        assert_eq!((status, code(&res)), (400, "invalid_request"));
        let mut big = br#"{"openid": "o", "kind": "form_id", "value": ""#.to_vec();
        big.extend(std::iter::repeat_n(b'a', 70 * 1024));
        big.extend(br#""}"#);
        let (status, res) = helpers::read(raw(big).send().await.unwrap()).await;
        assert_eq!((status, code(&res)), (413, "payload_too_large"));
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let (status, res) = helpers::read(raw(deep.into_bytes()).send().await.unwrap()).await;
        assert_eq!((status, code(&res)), (400, "invalid_request"));

        assert_eq!(app.credential_count(), 0, "a refused request stored something");
    }

    async fn admin_queries_are_checked(tdb) {
        let app = TestApp::spawn(tdb).await;
        let cases = [
            ("/v1/admin/users?limit=0", 400, "invalid_request"),
            ("/v1/admin/users?limit=501", 400, "invalid_request"),
            ("/v1/admin/users?limit=many", 400, "invalid_request"),
            ("/v1/admin/users?app_id=wxnope", 404, "unknown_app"),
            ("/v1/admin/stats?app_id=wxnope", 404, "unknown_app"),
            ("/v1/admin/users/o1/quota?app_id=wxnope", 404, "unknown_app"),
            ("/v1/admin/users/o%201/quota", 400, "invalid_request"),
            ("/v1/admin/nothing", 404, "not_found"),
        ];
        for (path, status, expected) in cases {
            let (got, res) = app.get(path, Some(KEY_ADMIN)).await;
            assert_eq!((got, code(&res)), (status, expected), "{path}: {res}");
        }
        let res = app.http.delete(app.url("/v1/admin/stats")).bearer_auth(KEY_ADMIN).send().await.unwrap();
        let (status, res) = helpers::read(res).await;
        assert_eq!((status, code(&res)), (405, "method_not_allowed"));
    }

    async fn several_apps_need_an_app_id(tdb) {
        let app = TestApp::spawn_with(tdb, |s| {
            let mut second = s.apps[0].clone();
            second.app_id = "wxsecondapp".into();
            s.apps.push(second);
        })
        .await;
        let body = json!({"openid": "o1", "kind": "form_id", "value": "f"});
        let (status, res) = app.post("/v1/credentials", Some(KEY_SEND), &body).await;
        assert_eq!((status, code(&res)), (400, "app_id_required"));
        let (status, res) = app.get("/v1/admin/users/o1/quota", Some(KEY_ADMIN)).await;
        assert_eq!((status, code(&res)), (400, "app_id_required"));
        assert_eq!(app.credential_count(), 0);
        // With app_id the same value can live in each app.
        for app_id in [APP, "wxsecondapp"] {
            let body = json!({"app_id": app_id, "openid": "o1", "kind": "form_id", "value": "f"});
            let (status, res) = app.post("/v1/credentials", Some(KEY_SEND), &body).await;
            assert_eq!((status, res["accepted"].as_u64()), (200, Some(1)), "{res}");
            let (_, q) = app.get(&format!("/v1/admin/users/o1/quota?app_id={app_id}"), Some(KEY_ADMIN)).await;
            assert_eq!(q["sendable"], 1);
        }
    }

    /// Concurrent single reports are committed in groups; each request still gets
    /// its own outcome, the cap holds across a group, and a value reported twice in
    /// one group is one credential and one duplicate.
    async fn concurrent_reports_are_group_committed_and_each_answered(tdb) {
        let app = std::sync::Arc::new(TestApp::spawn_with(tdb, |s| s.user_cap = 50).await);
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let app = app.clone();
                // Values 0..99 twice each: every second pair collides.
                let body = json!({"openid": "busy", "kind": "form_id", "value": format!("v{}", i % 100)});
                actix_web::rt::spawn(async move { app.post("/v1/credentials", Some(KEY_SEND), &body).await })
            })
            .collect();
        let (mut accepted, mut duplicates, mut capped) = (0, 0, 0);
        for call in calls {
            let (status, res) = call.await.unwrap();
            assert_eq!(status, 200, "{res}");
            let (a, d, r) = (res["accepted"].as_u64().unwrap(), res["duplicates"].as_u64().unwrap(), res["rejected"].as_array().unwrap().len());
            assert_eq!(a + d + r as u64, 1, "each request answered for its own item: {res}");
            accepted += a;
            duplicates += d;
            capped += r;
        }
        // 50 values fit the cap; the other report of each of those is a duplicate;
        // both reports of the other 50 values are over the cap (a refused value is
        // not known, so its second report is judged afresh).
        assert_eq!(accepted, 50);
        assert_eq!(duplicates, 50);
        assert_eq!(capped, 100);
        assert_eq!(app.credential_count(), 50);
    }

    async fn health_and_readiness(tdb) {
        let app = TestApp::spawn(tdb).await;
        assert_eq!(app.get("/healthz", None).await, (200, json!({"status": "ok"})));
        assert_eq!(app.get("/readyz", None).await, (200, json!({"status": "ready"})));
    }

    async fn metrics_count_what_happened(tdb) {
        let app = TestApp::spawn(tdb).await;
        let body = json!({"credentials": [
            {"openid": "o1", "kind": "form_id", "value": "m1"},
            {"openid": "o1", "kind": "form_id", "value": "m1"},
            {"openid": "o1", "kind": "form_id", "value": "the formId is a mock one"}
        ]});
        app.post("/v1/credentials", Some(KEY_SEND), &body).await;
        app.get("/v1/admin/users/o1/quota", None).await;
        let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        for line in [
            r#"ledger_credentials_recorded_total{outcome="accepted"} 1"#,
            r#"ledger_credentials_recorded_total{outcome="duplicate"} 1"#,
            r#"ledger_credentials_rejected_total{reason="mock_form_id"} 1"#,
            r#"ledger_http_requests_total{method="POST",route="/v1/credentials",status="200"} 1"#,
            r#"ledger_http_requests_total{method="GET",route="/v1/admin/users/{openid}/quota",status="401"} 1"#,
            "ledger_sender_queue_depth 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("ledger_http_request_duration_seconds_bucket"));
        assert!(text.contains("ledger_db_pool_connections"));
        assert!(!text.contains("o1"), "an openid leaked into a label");
    }
}

/// The database goes away: readiness says so, liveness does not care.
#[actix_web::test]
async fn readiness_fails_when_postgres_is_gone() {
    let tdb = helpers::TestDb::postgres();
    let app = TestApp::spawn(tdb).await;
    assert_eq!(app.get("/readyz", None).await.0, 200);
    let helpers::TestDb::Postgres { name, .. } = &*app.test_db else {
        unreachable!()
    };
    use diesel::prelude::*;
    let mut admin = helpers::pg_connect(&helpers::postgres_admin_url()).unwrap();
    diesel::sql_query(format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .unwrap();
    let (status, res) = app.get("/readyz", None).await;
    assert_eq!((status, code(&res)), (503, "unavailable"), "{res}");
    assert_eq!(app.get("/healthz", None).await.0, 200);
    let (status, res) = app.get("/v1/admin/stats", Some(KEY_ADMIN)).await;
    assert_eq!((status, code(&res)), (503, "unavailable"), "{res}");
}
