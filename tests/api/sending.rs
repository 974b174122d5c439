//! Sending against the simulator, whose own record of what WeChat received is the
//! oracle: each row of the policy table, concurrency, faults, idempotency.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    self, backend_app_tests, counter, FaultSet, Faults, Settings, SimConfig, TestApp, TestSim, APP,
    KEY_ADMIN, KEY_SEND,
};

/// Fast retries for tests.
pub(crate) fn quick(s: &mut Settings) {
    s.sender_workers = 4;
    s.young_retry = Duration::from_millis(500);
    s.send_backoff_base = Duration::from_millis(50);
    s.wechat_timeout = Duration::from_secs(2);
    s.sender_lease = Duration::from_secs(4);
}

/// An app with its own simulator (tweaked by `sim`), with [`quick`] retries.
pub(crate) async fn spawn(
    tdb: helpers::TestDb,
    sim: impl FnOnce(&mut SimConfig),
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    let sim = TestSim::spawn_with(sim);
    TestApp::start(Arc::new(tdb), sim, |s| {
        quick(s);
        tweak(s);
    })
    .await
}

async fn register(app: &TestApp, openid: &str, kind: &str, value: &str) {
    let (status, res) = app
        .post(
            "/v1/credentials",
            Some(KEY_SEND),
            &json!({"openid": openid, "kind": kind, "value": value}),
        )
        .await;
    assert_eq!((status, res["accepted"].as_u64()), (200, Some(1)), "{res}");
}

/// Form_ids minted by the simulator for the user and registered in the ledger.
async fn forms(app: &TestApp, openid: &str, n: u32) -> Vec<String> {
    let values = app.sim.sim.mint_form_ids(APP, openid, n).unwrap();
    for v in &values {
        register(app, openid, "form_id", v).await;
    }
    values
}

async fn post_message(app: &TestApp, body: Value) -> Value {
    let (status, res) = app.post("/v1/messages", Some(KEY_SEND), &body).await;
    assert_eq!(status, 202, "{res}");
    res
}

async fn message(app: &TestApp, id: &str) -> Value {
    let (status, res) = app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await;
    assert_eq!(status, 200, "{res}");
    res
}

async fn final_state(app: &TestApp, id: &str) -> Value {
    let finished = helpers::eventually_some(Duration::from_secs(30), || async {
        let m = message(app, id).await;
        ["sent", "no_quota", "failed"]
            .contains(&m["status"].as_str().unwrap())
            .then_some(m)
    })
    .await;
    match finished {
        Some(m) => m,
        None => panic!("message never finished: {}", message(app, id).await),
    }
}

/// Posts a message to `openid` and waits for its final state.
async fn notify(app: &TestApp, openid: &str, template: &str) -> Value {
    let m = post_message(app, json!({"openid": openid, "template_id": template, "data": {"keyword1": {"value": "339208499"}}})).await;
    final_state(app, m["id"].as_str().unwrap()).await
}

async fn quota(app: &TestApp, openid: &str) -> Value {
    app.get(&format!("/v1/admin/users/{openid}/quota"), Some(KEY_ADMIN))
        .await
        .1
}

/// (credential value → deliveries) at the simulator.
fn delivered(app: &TestApp) -> HashMap<String, usize> {
    let mut by_credential = HashMap::new();
    for d in app.sim.sim.deliveries() {
        *by_credential
            .entry(
                d.credential
                    .unwrap_or_else(|| format!("sub:{}:{}", d.touser, d.template_id)),
            )
            .or_default() += 1;
    }
    by_credential
}

fn outcomes(m: &Value) -> Vec<String> {
    m["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap().to_string())
        .collect()
}

fn error_code(m: &Value) -> &str {
    m["error"]["code"].as_str().unwrap_or("")
}

backend_app_tests! {
    async fn sent_spends_the_soonest_expiring_use(tdb) {
        let app = spawn(tdb, |_| {}, |_| {}).await;
        let f = forms(&app, "u1", 2).await;
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!(m["status"], "sent", "{m}");
        assert_eq!(m["credential"]["kind"], "form_id");
        assert_eq!(outcomes(&m), vec!["sent"]);
        assert_eq!(delivered(&app), HashMap::from([(f[0].clone(), 1)]));
        let d = &app.sim.sim.deliveries()[0];
        assert_eq!((d.touser.as_str(), d.template_id.as_str()), ("u1", "TPL"));
        assert_eq!(quota(&app, "u1").await["sendable"], 1);
        // No credential: no_quota, nothing sent.
        notify(&app, "u1", "TPL").await;
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!((m["status"].as_str(), error_code(&m)), (Some("no_quota"), "no_quota"), "{m}");
        assert_eq!(app.sim.sim.deliveries().len(), 2);
    }

    /// A fresh prepay_id answers 41028 for its first seconds: the same prepay_id is
    /// tried again and delivers; nothing else is spent.
    async fn a_fresh_prepay_id_is_retried_not_burnt(tdb) {
        let app = spawn(tdb, |_| {}, |_| {}).await;
        let prepay = app.sim.sim.mint_prepay_ids(APP, "u1", 1, None, Some(Duration::from_secs(3))).unwrap().remove(0);
        register(&app, "u1", "prepay_id", &prepay).await;
        let form = forms(&app, "u1", 1).await.remove(0);
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!(m["status"], "sent", "{m}");
        assert_eq!(m["credential"]["kind"], "prepay_id");
        let o = outcomes(&m);
        assert!(o.len() >= 2 && o[..o.len() - 1].iter().all(|x| x == "retry_later"), "{o:?}");
        assert_eq!(delivered(&app), HashMap::from([(prepay, 1)]));
        let q = quota(&app, "u1").await;
        assert_eq!(q["by_kind"]["form_id"]["uses_left"], 1, "the form_id {form} was spent");
        assert_eq!(q["by_kind"]["prepay_id"]["uses_left"], 0);
    }

    /// Issue 14.10: a prepay_id the backend says was issued 2 h ago is not young,
    /// however recently it was reported: its 41028 costs one call, and the message
    /// moves on to the next credential.
    async fn a_prepay_id_issued_long_ago_is_not_retried_as_young(tdb) {
        let app = spawn(tdb, |_| {}, |_| {}).await;
        let prepay = app.sim.sim.mint_prepay_ids(APP, "u1", 1, None, Some(Duration::from_secs(3600))).unwrap().remove(0);
        let issued_at = (chrono::Utc::now() - chrono::TimeDelta::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let (status, res) = app.post("/v1/credentials", Some(KEY_SEND), &json!({"openid": "u1", "kind": "prepay_id", "value": prepay, "issued_at": issued_at})).await;
        assert_eq!((status, res["accepted"].as_u64()), (200, Some(1)), "{res}");
        let form = forms(&app, "u1", 1).await.remove(0);
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!(m["status"], "sent", "{m}");
        assert_eq!(outcomes(&m), vec!["credential_invalid", "sent"]);
        assert_eq!(app.sim.sim.stats().count("template_send", "41028"), 1, "the old prepay_id was called once");
        assert_eq!(delivered(&app), HashMap::from([(form, 1)]));
    }

    /// Issue 14.10: a credential that stays "young" (41028) within the window is
    /// retried at most LEDGER_YOUNG_MAX_RETRIES (6) times for a message, then given
    /// up as invalid.
    async fn young_retries_of_a_message_stop_at_the_bound(tdb) {
        let app = spawn(tdb, |_| {}, |s| s.young_window = Duration::from_secs(3600)).await;
        let prepay = app.sim.sim.mint_prepay_ids(APP, "u1", 1, None, Some(Duration::from_secs(3600))).unwrap().remove(0);
        register(&app, "u1", "prepay_id", &prepay).await;
        let form = forms(&app, "u1", 1).await.remove(0);
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!(m["status"], "sent", "{m}");
        let mut expected = vec!["retry_later"; 6];
        expected.extend(["credential_invalid", "sent"]);
        assert_eq!(outcomes(&m), expected);
        assert_eq!(app.sim.sim.stats().count("template_send", "41028"), 7, "one call and six young retries");
        assert_eq!(delivered(&app), HashMap::from([(form, 1)]));
    }

    /// 41028 past the young window, 41029 without an ambiguous call of ours, 43101:
    /// the credential is dead, the next one is used.
    async fn bad_credentials_are_invalidated_and_the_next_is_used(tdb) {
        let app = spawn(tdb, |_| {}, |s| s.young_window = Duration::ZERO).await;
        // Unknown to WeChat (41028), already used elsewhere (41029), a subscription
        // WeChat does not know (43101) — then a good one.
        register(&app, "u1", "form_id", "never-minted-form-id").await;
        let used = app.sim.sim.mint_form_ids(APP, "u1", 1).unwrap().remove(0);
        let token = app.get(&format!("/v1/apps/{APP}/access-token"), Some(helpers::KEY_TOKEN)).await.1["access_token"].as_str().unwrap().to_string();
        let res: Value = app.http.post(format!("{}/cgi-bin/message/wxopen/template/send?access_token={token}", app.sim.base))
            .json(&json!({"touser": "u1", "template_id": "OTHER", "form_id": used, "data": {}}))
            .send().await.unwrap().json().await.unwrap();
        assert_eq!(res["errcode"], 0, "spending it outside the ledger: {res}");
        register(&app, "u1", "form_id", &used).await;
        let session = app.login("u1").await;
        let (_, res) = app.post("/v1/client/credentials", Some(&session), &json!({"subscriptions": [{"template_id": "TPL", "result": "accept"}]})).await;
        assert_eq!(res["accepted"], 1);
        let good = forms(&app, "u1", 1).await.remove(0);
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!(m["status"], "sent", "{m}");
        let codes: Vec<i64> = m["attempts"].as_array().unwrap().iter().map(|a| a["wechat_errcode"].as_i64().unwrap()).collect();
        assert_eq!(codes, vec![43101, 41028, 41029, 0]);
        assert_eq!(outcomes(&m), vec!["credential_invalid", "credential_invalid", "credential_invalid", "sent"]);
        let d = delivered(&app);
        assert_eq!(d.get(&good), Some(&1));
        assert_eq!(d.get(&used), Some(&1), "only the send made outside the ledger");
        let q = quota(&app, "u1").await;
        assert_eq!((q["sendable"].as_u64(), q["subscriptions"].clone()), (Some(0), json!({})));
    }

    /// At most five credentials are tried for one message.
    async fn at_most_five_credentials_per_message(tdb) {
        let app = spawn(tdb, |_| {}, |s| s.young_window = Duration::ZERO).await;
        app.sim.sim.mint_code(APP, "u1").unwrap(); // WeChat knows the user
        for i in 0..7 {
            register(&app, "u1", "form_id", &format!("unknown-{i}")).await;
        }
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!((m["status"].as_str(), error_code(&m)), (Some("failed"), "credentials_exhausted"), "{m}");
        assert_eq!(m["attempts"].as_array().unwrap().len(), 5);
        assert_eq!(quota(&app, "u1").await["sendable"], 2);
        assert!(app.sim.sim.deliveries().is_empty());
    }

    /// The caller's mistakes fail the message with the contract's code and give
    /// the use back.
    async fn caller_errors_fail_and_release_the_use(tdb) {
        let app = spawn(tdb, |c| {
            c.templates = Some(vec!["TPL".into()]);
            c.pages = Some(vec!["index".into()]);
        }, |_| {}).await;
        forms(&app, "u1", 1).await;
        register(&app, "stranger", "form_id", "stranger-form").await;
        let cases = [
            (json!({"openid": "u1", "template_id": "NOPE"}), "template_invalid", 40037),
            (json!({"openid": "u1", "template_id": "TPL", "page": "nowhere"}), "page_invalid", 41030),
            (json!({"openid": "stranger", "template_id": "TPL"}), "openid_invalid", 40003),
        ];
        for (body, code, errcode) in cases {
            let m = post_message(&app, body.clone()).await;
            let m = final_state(&app, m["id"].as_str().unwrap()).await;
            assert_eq!((m["status"].as_str(), error_code(&m)), (Some("failed"), code), "{body}: {m}");
            assert_eq!(m["error"]["wechat_errcode"], errcode);
        }
        assert_eq!(quota(&app, "u1").await["sendable"], 1, "a caller's error cost the user a use");
        assert_eq!(quota(&app, "stranger").await["sendable"], 1);
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!(m["status"], "sent");
    }

    /// A refused token is compare-and-refreshed and the send goes through; the
    /// refusal is no attempt on the credential.
    async fn token_errors_refresh_and_retry(tdb) {
        let app = spawn(tdb, |_| {}, |_| {}).await;
        forms(&app, "u1", 1).await;
        let before = app.sim.sim.token_fetches().len();
        app.sim.sim.invalidate_tokens(APP).unwrap();
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!(m["status"], "sent", "{m}");
        assert_eq!(outcomes(&m), vec!["sent"]);
        assert!(app.sim.sim.token_fetches().len() > before);
        assert_eq!(app.sim.sim.deliveries().len(), 1);
    }

    /// WeChat busy every time: bounded retries, then failed, the use given back.
    async fn transient_errors_are_retried_then_given_up(tdb) {
        let app = spawn(tdb, |_| {}, |s| s.send_max_retries = 2).await;
        forms(&app, "u1", 1).await;
        app.sim.sim.set_faults(Faults { send: FaultSet { busy: 0.5, http_500: 0.5, ..FaultSet::default() }, ..Faults::default() }).unwrap();
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!((m["status"].as_str(), error_code(&m)), (Some("failed"), "retries_exhausted"), "{m}");
        assert_eq!(outcomes(&m), vec!["retry", "retry", "retry"]);
        assert_eq!(quota(&app, "u1").await["sendable"], 1);
        assert!(app.sim.sim.deliveries().is_empty());
    }

    /// The connection drops after WeChat delivered: the same form_id is probed,
    /// 41029 proves the delivery, the message is sent once.
    async fn an_ambiguous_call_is_proven_by_41029(tdb) {
        let app = spawn(tdb, |_| {}, |s| s.send_backoff_base = Duration::from_millis(300)).await;
        let f = forms(&app, "u1", 2).await;
        app.sim.sim.set_faults(Faults { send: FaultSet { drop_after_read: 1.0, ..FaultSet::default() }, ..Faults::default() }).unwrap();
        let m = post_message(&app, json!({"openid": "u1", "template_id": "TPL"})).await;
        let id = m["id"].as_str().unwrap().to_string();
        let dropped = helpers::eventually(Duration::from_secs(10), || async { outcomes(&message(&app, &id).await).contains(&"ambiguous".to_string()) }).await;
        assert!(dropped);
        app.sim.sim.set_faults(Faults::default()).unwrap();
        let m = final_state(&app, &id).await;
        assert_eq!(m["status"], "sent", "{m}");
        assert_eq!(outcomes(&m).last().map(String::as_str), Some("delivered_earlier"));
        assert_eq!(delivered(&app), HashMap::from([(f[0].clone(), 1)]));
        assert_eq!(quota(&app, "u1").await["sendable"], 1);
    }

    /// A multi-use prepay_id whose call may have delivered is not sent again.
    async fn an_ambiguous_multi_use_credential_is_outcome_unknown(tdb) {
        let app = spawn(tdb, |c| c.prepay_uses = 3, |s| s.prepay_id_uses = 3).await;
        let prepay = app.sim.sim.mint_prepay_ids(APP, "u1", 1, None, None).unwrap().remove(0);
        register(&app, "u1", "prepay_id", &prepay).await;
        app.sim.sim.set_faults(Faults { send: FaultSet { drop_after_read: 1.0, ..FaultSet::default() }, ..Faults::default() }).unwrap();
        let m = notify(&app, "u1", "TPL").await;
        assert_eq!((m["status"].as_str(), error_code(&m)), (Some("failed"), "outcome_unknown"), "{m}");
        assert_eq!(delivered(&app), HashMap::from([(prepay, 1)]), "sent exactly once, never again");
        assert_eq!(quota(&app, "u1").await["by_kind"]["prepay_id"]["uses_left"], 2, "the possibly spent use stays charged");
    }

    /// 45009: the app pauses, the message stays queued, the use goes back.
    async fn the_daily_limit_pauses_the_app(tdb) {
        let app = spawn(tdb, |c| c.faults.daily_send_limit = Some(0), |_| {}).await;
        forms(&app, "u1", 1).await;
        let m = post_message(&app, json!({"openid": "u1", "template_id": "TPL"})).await;
        let id = m["id"].as_str().unwrap().to_string();
        let paused = helpers::eventually(Duration::from_secs(10), || async { outcomes(&message(&app, &id).await) == vec!["app_paused"] }).await;
        assert!(paused, "{}", message(&app, &id).await);
        // A fixed interval on purpose: what is tested is that nothing happens in it.
        // 500 ms is ten send backoffs and five idle polls of the sender; an app that
        // was not really paused would have been called again within it.
        actix_web::rt::time::sleep(Duration::from_millis(500)).await;
        let m = message(&app, &id).await;
        assert_eq!(m["status"], "queued", "{m}");
        assert_eq!(outcomes(&m), vec!["app_paused"], "the paused app kept sending");
        assert_eq!(quota(&app, "u1").await["sendable"], 1);
    }

    /// The payment case: "notify" arrives before the prepay_id; the report wakes it.
    async fn a_message_waits_for_a_credential_and_is_woken_by_the_report(tdb) {
        let app = spawn(tdb, |_| {}, |_| {}).await;
        let m = post_message(&app, json!({"openid": "u1", "template_id": "TPL", "await_credential_s": 60})).await;
        let id = m["id"].as_str().unwrap().to_string();
        // The sender has looked for a credential for it and found none…
        let looked = helpers::eventually(Duration::from_secs(10), || async { counter(&app, r#"ledger_claims_total{result="miss"}"#).await >= 1 }).await;
        assert!(looked, "the sender never looked for a credential");
        // …and the message waits instead of failing with no_quota.
        assert_eq!(message(&app, &id).await["status"], "queued");
        let prepay = app.sim.sim.mint_prepay_ids(APP, "u1", 1, None, None).unwrap().remove(0);
        register(&app, "u1", "prepay_id", &prepay).await;
        // Long before the 60 s wait runs out.
        let sent = helpers::eventually(Duration::from_secs(10), || async { message(&app, &id).await["status"] == "sent" }).await;
        assert!(sent, "{}", message(&app, &id).await);
        assert_eq!(delivered(&app), HashMap::from([(prepay, 1)]));
    }

    /// 20 concurrent POSTs with one Idempotency-Key: one message, one send.
    async fn idempotent_posts_make_one_message(tdb) {
        let app = Arc::new(spawn(tdb, |_| {}, |_| {}).await);
        forms(&app, "u1", 5).await;
        let body = json!({"openid": "u1", "template_id": "TPL", "data": {"k": {"value": "v"}}});
        let calls: Vec<_> = (0..20).map(|_| {
            let (app, body) = (app.clone(), body.clone());
            actix_web::rt::spawn(async move {
                let res = app.http.post(app.url("/v1/messages")).bearer_auth(KEY_SEND).header("Idempotency-Key", "order-42").json(&body).send().await.unwrap();
                helpers::read(res).await
            })
        }).collect();
        let mut ids = HashSet::new();
        for call in calls {
            let (status, res) = call.await.unwrap();
            assert_eq!(status, 202, "{res}");
            ids.insert(res["id"].as_str().unwrap().to_string());
        }
        assert_eq!(ids.len(), 1);
        final_state(&app, ids.iter().next().unwrap()).await;
        assert_eq!(app.sim.sim.deliveries().len(), 1);
        let (status, res) = app.http.post(app.url("/v1/messages")).bearer_auth(KEY_SEND).header("Idempotency-Key", "order-42")
            .json(&json!({"openid": "u1", "template_id": "OTHER"})).send().await.map(|r| (r.status().as_u16(), r)).unwrap();
        assert_eq!(status, 422, "{:?}", helpers::read(res).await);
        assert_eq!(quota(&app, "u1").await["sendable"], 4);
    }

    async fn bad_messages_are_refused_and_store_nothing(tdb) {
        let app = spawn(tdb, |_| {}, |_| {}).await;
        let cases = [
            json!({"template_id": "T"}),
            json!({"openid": "u1"}),
            json!({"openid": "u 1", "template_id": "T"}),
            json!({"openid": "u1", "template_id": "T", "extra": 1}),
            json!({"openid": "u1", "template_id": "T", "await_credential_s": 601}),
            json!({"openid": "u1", "template_id": "T", "data": {"k": "v"}}),
            json!({"openid": "u1", "template_id": "T", "data": {"bad key": {"value": "v"}}}),
            json!({"openid": "u1", "template_id": "T", "miniprogram_state": "prod"}),
            json!({"openid": "u1", "template_id": "T", "lang": "fr"}),
            json!({"openid": "u1", "template_id": "T", "page": "a\nb"}),
        ];
        for body in cases {
            let (status, res) = app.post("/v1/messages", Some(KEY_SEND), &body).await;
            assert_eq!((status, error_code(&res)), (400, "invalid_request"), "{body}: {res}");
        }
        let (status, res) = app.post("/v1/messages?wait=31", Some(KEY_SEND), &json!({"openid": "u1", "template_id": "T"})).await;
        assert_eq!((status, error_code(&res)), (400, "invalid_request"));
        let res = app.http.post(app.url("/v1/messages")).bearer_auth(KEY_SEND).header("Idempotency-Key", "x".repeat(256)).json(&json!({"openid": "u1", "template_id": "T"})).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 400);
        let (status, res) = app.post("/v1/messages", Some(KEY_ADMIN), &json!({"openid": "u1", "template_id": "T"})).await;
        assert_eq!((status, error_code(&res)), (403, "forbidden"));
        for id in ["999", "abc", "-1"] {
            let (status, res) = app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await;
            assert_eq!((status, error_code(&res)), (404, "not_found"), "{id}");
        }
        let (_, page) = app.get("/v1/admin/users/u1/quota", Some(KEY_ADMIN)).await;
        assert_eq!(page["sendable"], 0);
        // ?wait returns the final state with 200.
        let (status, res) = app.post("/v1/messages?wait=5", Some(KEY_SEND), &json!({"openid": "u1", "template_id": "T"})).await;
        assert_eq!((status, res["status"].as_str()), (200, Some("no_quota")), "{res}");
    }

    /// 20 % faults on 500 messages: every message ends, no credential is used twice
    /// at the simulator, and every use is accounted for.
    async fn faults_never_double_spend(tdb) {
        let app = spawn(tdb, |c| c.seed = Some(7), |s| {
            s.sender_workers = 8;
            s.send_max_retries = 3;
        }).await;
        let users: Vec<String> = (0..50).map(|i| format!("user{i}")).collect();
        let mut recorded = 0;
        for u in &users {
            recorded += forms(&app, u, 8).await.len();
        }
        app.sim.sim.set_faults(Faults {
            send: FaultSet { busy: 0.07, http_500: 0.07, drop_after_read: 0.06, ..FaultSet::default() },
            seed: Some(11),
            ..Faults::default()
        }).unwrap();
        let mut ids = Vec::new();
        for i in 0..500 {
            let m = post_message(&app, json!({"openid": users[i % users.len()], "template_id": "TPL"})).await;
            ids.push(m["id"].as_str().unwrap().to_string());
        }
        let mut by_status: HashMap<String, usize> = HashMap::new();
        for id in &ids {
            let m = final_state(&app, id).await;
            *by_status.entry(format!("{}/{}", m["status"].as_str().unwrap(), error_code(&m))).or_default() += 1;
        }
        let d = delivered(&app);
        assert!(d.values().all(|n| *n == 1), "a credential was used twice at WeChat");
        let sent = by_status.get("sent/").copied().unwrap_or(0);
        // Only a probe that kept failing leaves a delivery unproven.
        let unknown = by_status.get("failed/outcome_unknown").copied().unwrap_or(0);
        assert!(unknown <= 5, "{by_status:?}");
        assert!(d.len() >= sent && d.len() <= sent + unknown, "sent in the ledger ⇔ delivered at WeChat: {} deliveries, {by_status:?}", d.len());
        let mut left = 0;
        for u in &users {
            left += quota(&app, u).await["sendable"].as_u64().unwrap() as usize;
        }
        assert_eq!(left + d.len(), recorded, "uses left + uses spent = uses recorded");
        assert!(sent > 300, "{by_status:?}");
    }
}

backend_app_tests! {
    /// Contract v2, send policy: at most one send in flight per (app, openid), on any
    /// number of instances. The simulated WeChat answers 43108 to a send that
    /// overlaps another to the same user (and holds each send 30 ms): with two
    /// instances of 4 workers each and 30 messages for one user, its record must show
    /// no 43108 and 30 deliveries.
    async fn one_send_at_a_time_per_user_across_instances(tdb) {
        let tdb = Arc::new(tdb);
        let sim = TestSim::spawn();
        sim.sim.set_faults(Faults {
            reject_concurrent_sends: true,
            send: FaultSet { latency_ms: Some(helpers::Latency::Fixed(30)), ..FaultSet::default() },
            ..Faults::default()
        }).unwrap();
        let a = TestApp::start(tdb.clone(), sim.clone(), quick).await;
        let b = TestApp::start(tdb.clone(), sim.clone(), quick).await;
        forms(&a, "busy-user", 30).await;
        forms(&a, "other-user", 10).await;
        let mut ids = Vec::new();
        for i in 0..40 {
            let (app, openid) = match i % 4 {
                3 => (&b, "other-user"),
                n if n % 2 == 0 => (&a, "busy-user"),
                _ => (&b, "busy-user"),
            };
            let m = post_message(app, json!({"openid": openid, "template_id": "TPL"})).await;
            ids.push(m["id"].as_str().unwrap().to_string());
        }
        for id in &ids {
            let m = final_state(&a, id).await;
            assert_eq!(m["status"], "sent", "{m}");
        }
        let stats = a.sim.sim.stats();
        assert_eq!(stats.count("template_send", "43108"), 0, "{:?}", stats.calls);
        assert_eq!(a.sim.sim.deliveries().len(), 40);
    }
}

backend_app_tests! {
    /// Contract v2, send policy: `send_at` (at most 30 days ahead) holds a message
    /// until then; the simulator's record shows when WeChat got it. Bad values are
    /// 400 and store nothing.
    async fn send_at_holds_a_message_until_then(tdb) {
        let app = spawn(tdb, |_| {}, |_| {}).await;
        forms(&app, "u1", 1).await;
        for bad in ["tomorrow", "2026-13-01T00:00:00Z", &(chrono::Utc::now() + chrono::TimeDelta::days(31)).to_rfc3339()] {
            let (status, res) = app.post("/v1/messages", Some(KEY_SEND), &json!({"openid": "u1", "template_id": "TPL", "send_at": bad})).await;
            assert_eq!((status, res["error"]["code"].as_str()), (400, Some("invalid_request")), "{bad}: {res}");
        }
        let at = chrono::Utc::now() + chrono::TimeDelta::seconds(2);
        let m = post_message(&app, json!({"openid": "u1", "template_id": "TPL", "send_at": at.to_rfc3339()})).await;
        let id = m["id"].as_str().unwrap().to_string();
        assert_eq!(m["status"], "queued", "{m}");
        let echoed: chrono::DateTime<chrono::Utc> = m["send_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(echoed.timestamp_millis(), at.timestamp_millis());
        let m = final_state(&app, &id).await;
        assert_eq!(m["status"], "sent", "{m}");
        let d = app.sim.sim.deliveries();
        assert_eq!(d.len(), 1, "the bad requests stored nothing");
        assert!(d[0].at >= at, "WeChat got it at {}, before send_at {at}", d[0].at);
    }

    /// LEDGER_USER_MIN_GAP_S: a user's messages reach WeChat at least the gap apart
    /// (the simulator's record); another user is not held by it.
    async fn the_user_gap_spaces_a_users_messages(tdb) {
        let app = spawn(tdb, |_| {}, |s| s.user_min_gap = Duration::from_secs(2)).await;
        forms(&app, "u1", 3).await;
        forms(&app, "u2", 1).await;
        let mut ids = Vec::new();
        for openid in ["u1", "u1", "u1", "u2"] {
            ids.push(post_message(&app, json!({"openid": openid, "template_id": "TPL"})).await["id"].as_str().unwrap().to_string());
        }
        for id in &ids {
            assert_eq!(final_state(&app, id).await["status"], "sent");
        }
        let mut u1: Vec<_> = app.sim.sim.deliveries().into_iter().filter(|d| d.touser == "u1").map(|d| d.at).collect();
        u1.sort();
        assert_eq!(u1.len(), 3);
        for pair in u1.windows(2) {
            assert!(pair[1] - pair[0] >= chrono::TimeDelta::seconds(2), "{u1:?}");
        }
    }

    /// LEDGER_USER_DAILY_CAP: past the cap a single message waits for the next
    /// Beijing day (queued, nothing spent); another user is not held by it.
    async fn the_daily_cap_holds_a_users_next_message_until_tomorrow(tdb) {
        let app = spawn(tdb, |_| {}, |s| s.user_daily_cap = 2).await;
        forms(&app, "u1", 3).await;
        forms(&app, "u2", 1).await;
        let mut ids = Vec::new();
        for openid in ["u1", "u1", "u1", "u2"] {
            ids.push(post_message(&app, json!({"openid": openid, "template_id": "TPL"})).await["id"].as_str().unwrap().to_string());
        }
        let sent = helpers::eventually(Duration::from_secs(30), || async { app.sim.sim.deliveries().len() == 3 });
        assert!(sent.await, "{:?}", app.sim.sim.deliveries().len());
        // WeChat records a send before the service settles it: wait for the settling.
        let statuses = || async {
            let mut statuses = Vec::new();
            for id in &ids {
                statuses.push(message(&app, id).await["status"].as_str().unwrap().to_string());
            }
            statuses.sort();
            statuses
        };
        helpers::eventually(Duration::from_secs(10), || async { !statuses().await.contains(&"sending".to_string()) }).await;
        assert_eq!(statuses().await, ["queued", "sent", "sent", "sent"]);
        assert_eq!(quota(&app, "u1").await["sendable"], 1, "the held message spent nothing");
        let u1 = app.sim.sim.deliveries().iter().filter(|d| d.touser == "u1").count();
        assert_eq!(u1, 2);
    }
}

/// 200 concurrent messages for one user holding 50 credentials, on 3 instances
/// sharing one PostgreSQL: exactly 50 sent, each credential once at WeChat.
#[actix_web::test]
async fn three_instances_postgres_send_each_use_once() {
    let tdb = Arc::new(helpers::TestDb::postgres());
    let sim = TestSim::spawn();
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(Arc::new(
            TestApp::start(tdb.clone(), sim.clone(), quick).await,
        ));
    }
    let f = forms(&apps[0], "hot", 50).await;
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let app = apps[i % 3].clone();
            actix_web::rt::spawn(async move {
                let (status, m) = app
                    .post(
                        "/v1/messages",
                        Some(KEY_SEND),
                        &json!({"openid": "hot", "template_id": "TPL"}),
                    )
                    .await;
                assert_eq!(status, 202, "{m}");
                m["id"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for call in calls {
        ids.push(call.await.unwrap());
    }
    let mut statuses: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let m = final_state(&apps[0], id).await;
        *statuses
            .entry(m["status"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(statuses.get("sent"), Some(&50), "{statuses:?}");
    assert_eq!(statuses.get("no_quota"), Some(&150), "{statuses:?}");
    let d = delivered(&apps[0]);
    assert_eq!(d.len(), 50);
    assert!(d.values().all(|n| *n == 1));
    assert_eq!(
        d.keys().cloned().collect::<HashSet<_>>(),
        f.into_iter().collect::<HashSet<_>>()
    );
}
