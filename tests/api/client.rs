//! Mini-program login and reporting, against the simulator.

use chrono::{TimeDelta, Utc};
use serde_json::{json, Value};

use crate::helpers::{
    backend_app_tests, FaultSet, Faults, Secret, SessionKey, TestApp, APP, KEY_ADMIN, KEY_ALL,
    KEY_SEND,
};

fn code(body: &Value) -> Option<&str> {
    body["error"]["code"].as_str()
}

async fn login_with(app: &TestApp, body: Value) -> (u16, Value) {
    app.post("/v1/client/session", None, &body).await
}

async fn report(app: &TestApp, session: &str, body: Value) -> (u16, Value) {
    app.post("/v1/client/credentials", Some(session), &body)
        .await
}

async fn sendable(app: &TestApp, openid: &str, app_id: &str) -> u64 {
    let (status, q) = app
        .get(
            &format!("/v1/admin/users/{openid}/quota?app_id={app_id}"),
            Some(KEY_ADMIN),
        )
        .await;
    assert_eq!(status, 200, "{q}");
    q["sendable"].as_u64().unwrap()
        + q["subscriptions"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>()
}

backend_app_tests! {
    async fn login_exchanges_a_code_once(tdb) {
        let app = TestApp::spawn(tdb).await;
        app.sim.sim.add_app("wxotherapp", &Secret::new("other-secret"));
        let code_a = app.sim.sim.mint_code(APP, "o-alice").unwrap();
        let (status, res) = login_with(&app, json!({"code": code_a})).await;
        assert_eq!(status, 200, "{res}");
        assert_eq!(res["openid"], "o-alice");
        assert!(res["session"].as_str().unwrap().starts_with("v1."));
        let expires = chrono::DateTime::parse_from_rfc3339(res["expires_at"].as_str().unwrap()).unwrap();
        let days = (expires.with_timezone(&Utc) - Utc::now()).num_hours() / 24;
        assert_eq!(days, 29, "a session lasts 30 days by default");
        assert!(!res.to_string().contains("session_key"));
        let keys: Vec<&String> = res.as_object().unwrap().keys().collect();
        assert_eq!(keys, vec!["expires_at", "openid", "session"]);

        // Reused, unknown, and minted for another app: 401 invalid_code.
        let other = app.sim.sim.mint_code("wxotherapp", "o-alice").unwrap();
        for (c, what) in [(code_a.as_str(), "reused"), ("no-such-code", "unknown"), (other.as_str(), "other app")] {
            let (status, res) = login_with(&app, json!({"code": c})).await;
            assert_eq!((status, code(&res)), (401, Some("invalid_code")), "{what}: {res}");
        }
        // Blocked user: 403; bad bodies: 400.
        app.sim.sim.block(APP, "o-mallory").unwrap();
        let blocked = app.sim.sim.mint_code(APP, "o-mallory").unwrap();
        let (status, res) = login_with(&app, json!({"code": blocked})).await;
        assert_eq!((status, code(&res)), (403, Some("user_blocked")), "{res}");
        for body in [json!({}), json!({"code": ""}), json!({"code": "a b"}), json!({"code": "x", "openid": "o"}), json!({"code": 5})] {
            let (status, res) = login_with(&app, body.clone()).await;
            assert_eq!((status, code(&res)), (400, Some("invalid_request")), "{body}");
        }
        let (status, res) = login_with(&app, json!({"app_id": "wxnope", "code": "x"})).await;
        assert_eq!((status, code(&res)), (404, Some("unknown_app")));
        // WeChat down: 502.
        app.sim.sim.set_faults(Faults { login: FaultSet { busy: 1.0, ..FaultSet::default() }, ..Faults::default() }).unwrap();
        let down = app.sim.sim.mint_code(APP, "o-bob").unwrap();
        let (status, res) = login_with(&app, json!({"code": down})).await;
        assert_eq!((status, code(&res)), (502, Some("wechat_unavailable")), "{res}");
    }

    async fn reporting_lands_in_the_ledger_by_the_contract(tdb) {
        let app = TestApp::spawn(tdb).await;
        let session = app.login("o-alice").await;
        let forms = app.sim.sim.mint_form_ids(APP, "o-alice", 3).unwrap();
        let (status, res) = report(&app, &session, json!({
            "form_ids": [forms[0], forms[1], forms[1], "the formId is a mock one", "with space"],
            "prepay_ids": ["wx27prepay0001"],
            "subscriptions": [
                {"template_id": "TPL_A", "result": "accept"},
                {"template_id": "TPL_B", "result": "reject"},
                {"template_id": "TPL_C", "result": "ban"}
            ]
        })).await;
        assert_eq!(status, 200, "{res}");
        assert_eq!(res["accepted"], 4);
        assert_eq!(res["duplicates"], 1);
        assert_eq!(res["rejected"], json!([
            {"value": "the formId is a mock one", "reason": "mock_form_id"},
            {"value": "with space", "reason": "invalid_format"},
            {"value": "TPL_B", "reason": "not_accepted"},
            {"value": "TPL_C", "reason": "not_accepted"}
        ]));
        let (_, q) = app.get("/v1/admin/users/o-alice/quota", Some(KEY_ADMIN)).await;
        assert_eq!(q["by_kind"]["form_id"]["uses_left"], 2);
        assert_eq!(q["by_kind"]["prepay_id"]["uses_left"], 1);
        assert_eq!(q["subscriptions"], json!({"TPL_A": 1}));
        // An empty report is fine and changes nothing.
        let (status, res) = report(&app, &session, json!({})).await;
        assert_eq!((status, res["accepted"].as_u64()), (200, Some(0)));
    }

    async fn a_session_speaks_only_for_its_own_user_and_app(tdb) {
        let app = TestApp::spawn_with(tdb, |s| {
            let mut second = s.apps[0].clone();
            second.app_id = "wxsecondapp".into();
            s.apps.push(second);
        })
        .await;
        let login_code = app.sim.sim.mint_code(APP, "o-alice").unwrap();
        let (status, res) = login_with(&app, json!({"app_id": APP, "code": login_code})).await;
        assert_eq!(status, 200, "{res}");
        let session = res["session"].as_str().unwrap().to_string();
        // No field can redirect a report to another user or app.
        for body in [json!({"form_ids": ["f1"], "openid": "o-bob"}), json!({"form_ids": ["f1"], "app_id": "wxsecondapp"})] {
            let (status, res) = report(&app, &session, body.clone()).await;
            assert_eq!((status, code(&res)), (400, Some("invalid_request")), "{body}");
        }
        let (status, _) = report(&app, &session, json!({"form_ids": ["f1"]})).await;
        assert_eq!(status, 200);
        assert_eq!(sendable(&app, "o-alice", APP).await, 1);
        assert_eq!(sendable(&app, "o-alice", "wxsecondapp").await, 0);
        assert_eq!(sendable(&app, "o-bob", APP).await, 0);
        // Filling a user to the cap only ever fills one's own quota.
        let many: Vec<String> = (0..50).map(|i| format!("spam{i}")).collect();
        for _ in 0..5 {
            report(&app, &session, json!({"form_ids": many})).await;
        }
        assert_eq!(sendable(&app, "o-bob", APP).await, 0);
    }

    async fn forged_expired_and_misplaced_credentials_are_refused(tdb) {
        let app = TestApp::spawn(tdb).await;
        let session = app.login("o-alice").await;
        let test_key = SessionKey::new(Secret::new("test-session-secret-0123456789abcdef"));
        let other_key = SessionKey::new(Secret::new("some-other-secret-0123456789abcdef"));
        let expired = test_key.sign(APP, "o-alice", Utc::now() - TimeDelta::minutes(1));
        let forged = other_key.sign(APP, "o-alice", Utc::now() + TimeDelta::days(1));
        let unknown_app = test_key.sign("wxnope", "o-alice", Utc::now() + TimeDelta::days(1));
        let mut tampered = session.clone();
        tampered.insert(5, if tampered.as_bytes()[5] == b'A' { 'B' } else { 'A' });
        let body = json!({"form_ids": ["f1"]});
        for bad in [expired.expose(), forged.expose(), unknown_app.expose(), &tampered, KEY_ALL, KEY_SEND, "", "v1.x.y"] {
            let (status, res) = report(&app, bad, body.clone()).await;
            assert_eq!((status, code(&res)), (401, Some("unauthorized")), "{bad}");
        }
        let (status, _) = report(&app, &session, body.clone()).await;
        assert_eq!(status, 200);
        // A session is never an API key.
        let (status, res) = app.post("/v1/credentials", Some(&session), &json!({"openid": "o", "kind": "form_id", "value": "v"})).await;
        assert_eq!((status, code(&res)), (401, Some("unauthorized")));
        let (status, _) = app.get("/v1/admin/users/o-alice/quota", Some(&session)).await;
        assert_eq!(status, 401);
        assert_eq!(app.credential_count(), 1);
    }

    async fn oversized_reports_store_nothing(tdb) {
        let app = TestApp::spawn(tdb).await;
        let session = app.login("o-alice").await;
        let forms: Vec<String> = (0..30).map(|i| format!("f{i}")).collect();
        let prepays: Vec<String> = (0..21).map(|i| format!("p{i}")).collect();
        let cases = [
            json!({"form_ids": forms, "prepay_ids": prepays}),
            json!({"form_ids": "f1"}),
            json!({"subscriptions": [{"template_id": "T"}]}),
            json!({"subscriptions": [{"template_id": "T", "result": "accept", "extra": 1}]}),
            json!({"formids": ["f1"]}),
        ];
        for body in cases {
            let (status, res) = report(&app, &session, body.clone()).await;
            assert_eq!((status, code(&res)), (400, Some("invalid_request")), "{body}");
        }
        assert_eq!(app.credential_count(), 0);
    }
}
