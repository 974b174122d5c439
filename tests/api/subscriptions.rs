//! Subscribe messages, first-class: registered subscription templates go by
//! subscribe-send with the user's subscriptions only; data is checked before a
//! subscription is spent; results are counted per template.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{self, backend_app_tests, MessageKind, TestApp, APP, KEY_ADMIN, KEY_SEND};

const SUB: &str = "TPL_SHIPPED";

async fn setup(tdb: helpers::TestDb) -> (TestApp, String) {
    let app = TestApp::spawn_with(tdb, |s| {
        s.send_backoff_base = Duration::from_millis(50);
        s.young_window = Duration::ZERO;
    })
    .await;
    let (status, res) = app
        .http
        .put(app.url(&format!("/v1/admin/subscription-templates/{SUB}")))
        .bearer_auth(KEY_ADMIN)
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(status, 200, "{:?}", helpers::read(res).await);
    let session = app.login("u1").await;
    (app, session)
}

async fn report(app: &TestApp, session: &str, body: Value) -> Value {
    let (status, res) = app
        .post("/v1/client/credentials", Some(session), &body)
        .await;
    assert_eq!(status, 200, "{res}");
    res
}

async fn send_and_wait(app: &TestApp, body: Value) -> Value {
    let (status, res) = app
        .post("/v1/messages?wait=20", Some(KEY_SEND), &body)
        .await;
    assert_eq!(status, 200, "{res}");
    res
}

fn shipped(thing: &str) -> Value {
    json!({"openid": "u1", "template_id": SUB, "data": {"thing1": {"value": thing}, "date2": {"value": "2026-11-27"}},
           "miniprogram_state": "trial", "lang": "en_US"})
}

backend_app_tests! {
    async fn a_subscription_template_uses_subscriptions_only(tdb) {
        let (app, session) = setup(tdb).await;
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 2).unwrap();
        let form = app.sim.sim.mint_form_ids(APP, "u1", 1).unwrap().remove(0);
        report(&app, &session, json!({
            "form_ids": [form],
            "subscriptions": [{"template_id": SUB, "result": "accept"}, {"template_id": SUB, "result": "accept"}]
        })).await;
        for _ in 0..2 {
            let m = send_and_wait(&app, shipped("Your parcel left")).await;
            assert_eq!((m["status"].as_str(), m["channel"].as_str()), (Some("sent"), Some("subscription")), "{m}");
            assert_eq!(m["credential"]["kind"], "subscription");
        }
        // No subscription left: no_quota, and the form_id is NOT used for it.
        let m = send_and_wait(&app, shipped("Your parcel arrived")).await;
        assert_eq!(m["status"], "no_quota", "{m}");
        let deliveries = app.sim.sim.deliveries();
        assert_eq!(deliveries.len(), 2);
        assert!(deliveries.iter().all(|d| d.kind == MessageKind::Subscribe && d.credential.is_none() && d.template_id == SUB));
        // miniprogram_state and lang pass through; the data arrives as sent.
        let d = &deliveries[0];
        assert_eq!((d.miniprogram_state.as_deref(), d.lang.as_deref()), (Some("trial"), Some("en_US")));
        assert_eq!(d.data["thing1"].value, "Your parcel left");
        let (_, q) = app.get("/v1/admin/users/u1/quota", Some(KEY_ADMIN)).await;
        assert_eq!(q["by_kind"]["form_id"]["uses_left"], 1);
        assert_eq!(q["subscriptions"], json!({}));
    }

    async fn bad_data_is_refused_before_a_subscription_is_spent(tdb) {
        let (app, session) = setup(tdb).await;
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 1).unwrap();
        report(&app, &session, json!({"subscriptions": [{"template_id": SUB, "result": "accept"}]})).await;
        let cases = [
            ("thing1", json!({"thing1": {"value": "this is far longer than twenty characters"}})),
            ("date2", json!({"thing1": {"value": "ok"}, "date2": {"value": "tomorrow"}})),
            ("amount3", json!({"amount3": {"value": "12 dollars"}})),
            ("phrase4", json!({"phrase4": {"value": "not cjk"}})),
        ];
        for (field, data) in cases {
            let (status, res) = app.post("/v1/messages", Some(KEY_SEND), &json!({"openid": "u1", "template_id": SUB, "data": data})).await;
            assert_eq!((status, res["error"]["code"].as_str()), (400, Some("data_invalid")), "{res}");
            assert!(res["error"]["message"].as_str().unwrap().contains(&format!("data.{field}.value")), "{res}");
        }
        let (_, q) = app.get("/v1/admin/users/u1/quota", Some(KEY_ADMIN)).await;
        assert_eq!(q["subscriptions"][SUB], 1, "a refused message spent the subscription");
        // A template-message template is not held to the subscribe rules.
        let (status, _) = app.post("/v1/messages", Some(KEY_SEND), &json!({"openid": "u1", "template_id": "OTHER", "data": {"thing1": {"value": "this is far longer than twenty characters"}}})).await;
        assert_eq!(status, 202);
        let m = send_and_wait(&app, shipped("ok")).await;
        assert_eq!(m["status"], "sent", "{m}");
    }

    /// 43101: the subscription is gone at WeChat; it is removed and the user's next
    /// subscription to the template is tried.
    async fn a_withdrawn_subscription_is_removed_and_the_next_tried(tdb) {
        let (app, session) = setup(tdb).await;
        report(&app, &session, json!({"subscriptions": [{"template_id": SUB, "result": "accept"}, {"template_id": SUB, "result": "accept"}]})).await;
        let m = send_and_wait(&app, shipped("ok")).await;
        let codes: Vec<i64> = m["attempts"].as_array().unwrap().iter().map(|a| a["wechat_errcode"].as_i64().unwrap()).collect();
        assert_eq!(codes, vec![43101, 43101], "{m}");
        let creds: std::collections::HashSet<i64> = m["attempts"].as_array().unwrap().iter().map(|a| a["credential_id"].as_i64().unwrap()).collect();
        assert_eq!(creds.len(), 2, "the second attempt used the next subscription");
        assert_eq!(m["status"], "no_quota", "{m}");
        let (_, q) = app.get("/v1/admin/users/u1/quota", Some(KEY_ADMIN)).await;
        assert_eq!(q["subscriptions"], json!({}));
        // Granted again: a new accept works.
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 1).unwrap();
        report(&app, &session, json!({"subscriptions": [{"template_id": SUB, "result": "accept"}]})).await;
        assert_eq!(send_and_wait(&app, shipped("ok")).await["status"], "sent");
    }

    async fn results_are_counted_per_template(tdb) {
        let (app, session) = setup(tdb).await;
        let res = report(&app, &session, json!({"subscriptions": [
            {"template_id": SUB, "result": "accept"},
            {"template_id": SUB, "result": "reject"},
            {"template_id": "TPL_PROMO", "result": "reject"},
            {"template_id": "TPL_PROMO", "result": "ban"}
        ]})).await;
        assert_eq!(res["accepted"], 1);
        report(&app, &session, json!({"subscriptions": [{"template_id": "TPL_PROMO", "result": "reject"}]})).await;
        let (_, q) = app.get("/v1/admin/users/u1/quota", Some(KEY_ADMIN)).await;
        assert_eq!(q["subscriptions"], json!({SUB: 1}));
        assert_eq!(q["subscription_results"], json!({
            SUB: {"accept": 1, "reject": 1},
            "TPL_PROMO": {"ban": 1, "reject": 2}
        }));
    }

    async fn subscription_templates_are_managed_by_admins(tdb) {
        let (app, _) = setup(tdb).await;
        let (status, res) = app.get("/v1/admin/subscription-templates", Some(KEY_ADMIN)).await;
        assert_eq!(status, 200);
        assert_eq!(res["registered"], json!([SUB]));
        let del = |key: &'static str, t: &'static str| {
            let req = app.http.delete(app.url(&format!("/v1/admin/subscription-templates/{t}"))).bearer_auth(key);
            async move { helpers::read(req.send().await.unwrap()).await }
        };
        assert_eq!(del(KEY_SEND, SUB).await.0, 403);
        assert_eq!(del(KEY_ADMIN, SUB).await.0, 200);
        let (status, res) = del(KEY_ADMIN, SUB).await;
        assert_eq!((status, res["error"]["code"].as_str()), (404, Some("not_found")));
        let (_, res) = app.get("/v1/admin/subscription-templates", Some(KEY_ADMIN)).await;
        assert_eq!(res["registered"], json!([]));
        // Unregistered, the template goes the template-message way again.
        let (_, m) = app.post("/v1/messages", Some(KEY_SEND), &json!({"openid": "u1", "template_id": SUB})).await;
        assert_eq!(m["channel"], "template");
    }

    /// Issue 14.4: a session cannot grow its user's subscription results without
    /// bound: unknown results are refused, new templates past the cap too, and the
    /// quota shows the capped set.
    async fn invented_results_and_templates_are_refused_and_the_quota_stays_bounded(tdb) {
        let app = TestApp::spawn_with(tdb, |s| s.subscription_templates_per_user = 3).await;
        let session = app.login("u1").await;
        let res = report(&app, &session, json!({"subscriptions": [
            {"template_id": "T1", "result": "reject"},
            {"template_id": "T2", "result": "accept"},
            {"template_id": "T3", "result": "filter"},
            {"template_id": "T4", "result": "reject"},
            {"template_id": "T1", "result": "maybe"}
        ]})).await;
        assert_eq!(res["accepted"], 1, "{res}");
        assert_eq!(res["rejected"], json!([
            {"value": "T1", "reason": "invalid_result"},
            {"value": "T1", "reason": "not_accepted"},
            {"value": "T3", "reason": "not_accepted"},
            {"value": "T4", "reason": "template_cap"}
        ]));
        let invented: Vec<Value> = (0..50).map(|i| json!({"template_id": format!("X{i}"), "result": "ban"})).collect();
        let res = report(&app, &session, json!({"subscriptions": invented})).await;
        let reasons: Vec<&str> = res["rejected"].as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap()).collect();
        assert_eq!(reasons, vec!["template_cap"; 50], "{res}");
        let (_, q) = app.get("/v1/admin/users/u1/quota", Some(KEY_ADMIN)).await;
        assert_eq!(q["subscription_results"], json!({
            "T1": {"reject": 1}, "T2": {"accept": 1}, "T3": {"filter": 1}
        }));
    }
}

/// getPrivateTemplateList as the simulated WeChat answers it for every app.
fn listed_template(id: &str) -> helpers::PrivateTemplate {
    helpers::PrivateTemplate {
        pri_tmpl_id: id.into(),
        title: "发货通知".into(),
        content: "物品名称:{{thing1.DATA}}\n发货时间:{{time2.DATA}}\n".into(),
        example: "物品名称:咖啡\n发货时间:2026年12月1日 15:01\n".into(),
        kind: 2,
    }
}

const LISTED: &str = "TPL_LISTED_BY_WECHAT";

async fn listed_templates(app: &TestApp) -> Value {
    let (status, body) = app
        .get("/v1/admin/subscription-templates", Some(KEY_ADMIN))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

backend_app_tests! {
    /// Contract v2, "Templates from WeChat": a template WeChat lists needs no
    /// registration, and its data may use only its own keys (400 data_invalid naming
    /// the key, nothing spent); a failed list keeps the last one.
    async fn templates_come_from_wechat_with_their_keys(tdb) {
        let sim = helpers::TestSim::spawn_with(|c| c.subscription_templates = vec![listed_template(LISTED)]);
        let app = TestApp::start(std::sync::Arc::new(tdb), sim, |s| {
            s.template_refresh = Duration::from_secs(1);
        })
        .await;
        let listed = helpers::eventually(Duration::from_secs(10), || async {
            listed_templates(&app).await["templates"].as_array().is_some_and(|t| !t.is_empty())
        });
        assert!(listed.await, "the list was read from WeChat at start");
        let body = listed_templates(&app).await;
        let t = &body["templates"][0];
        assert_eq!((t["template_id"].as_str(), t["source"].as_str(), t["title"].as_str()), (Some(LISTED), Some("wechat"), Some("发货通知")), "{body}");
        assert_eq!(t["keys"], json!(["thing1", "time2"]));
        // A key the template does not have: refused before anything is spent.
        let session = app.login("u1").await;
        app.sim.sim.grant_subscriptions(APP, "u1", LISTED, 1).unwrap();
        report(&app, &session, json!({"subscriptions": [{"template_id": LISTED, "result": "accept"}]})).await;
        let bad = json!({"openid": "u1", "template_id": LISTED, "data": {"thing1": {"value": "Coffee"}, "date9": {"value": "2026-12-01"}}});
        let (status, res) = app.post("/v1/messages", Some(KEY_SEND), &bad).await;
        assert_eq!((status, res["error"]["code"].as_str()), (400, Some("data_invalid")), "{res}");
        assert!(res["error"]["message"].as_str().unwrap().contains("date9"), "{res}");
        let (_, q) = app.get("/v1/admin/users/u1/quota", Some(KEY_ADMIN)).await;
        assert_eq!(q["subscriptions"][LISTED], 1, "nothing spent: {q}");
        // Its own keys: sent by subscribe-send with the user's grant, no registration.
        let good = json!({"openid": "u1", "template_id": LISTED, "data": {"thing1": {"value": "Coffee"}, "time2": {"value": "15:01"}}});
        let m = send_and_wait(&app, good).await;
        assert_eq!((m["status"].as_str(), m["channel"].as_str()), (Some("sent"), Some("subscription")), "{m}");
        assert_eq!(app.sim.sim.deliveries().len(), 1);
        // WeChat failing the list: the last list stays (after at least two failed reads).
        app.sim.sim.set_faults(helpers::Faults { send: helpers::FaultSet { busy: 1.0, ..Default::default() }, ..Default::default() }).unwrap();
        let failed_twice = helpers::eventually(Duration::from_secs(130), || async {
            app.sim.sim.stats().count("gettemplate", "injected_busy") >= 2
        });
        assert!(failed_twice.await);
        let body = listed_templates(&app).await;
        assert_eq!(body["templates"][0]["template_id"], LISTED, "{body}");
    }
}
