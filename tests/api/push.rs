//! WeChat's message push: `GET|POST /v1/wechat/push/{app_id}`, with pushes signed and
//! encrypted here as WeChat does (WXBizMsgCrypt), every bad input refused with
//! nothing applied, and the events applied once: popup grants under the merge rule,
//! change removals, sent events as `delivery`, and `outcome_unknown` resolved.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    self, backend_app_tests, push_crypto, FaultSet, Faults, PushApp, PushKey, Secret, TestApp, APP,
    KEY_ADMIN, KEY_ALL, KEY_SEND,
};

pub const TOKEN: &str = "pushToken2026";
pub const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const SUB: &str = "TPL_SHIPPED";
const PATH: &str = "/v1/wechat/push/wxtestapp0000001";

pub async fn spawn(tdb: helpers::TestDb, encrypted: bool) -> TestApp {
    TestApp::spawn_with(tdb, |s| {
        s.push = vec![PushApp {
            app_id: APP.into(),
            token: Secret::new(TOKEN),
            encoding_aes_key: encrypted.then(|| Secret::new(KEY)),
        }];
        s.subscription_templates = vec![SUB.into()];
        s.send_backoff_base = Duration::from_millis(50);
        s.young_window = Duration::ZERO;
    })
    .await
}

/// A push as WeChat sends it: the query and the body.
pub struct Signed {
    pub query: Vec<(String, String)>,
    pub body: String,
}

/// Where the simulator pushes: `url`, in safe mode with the test's Token and key.
fn target(url: String) -> helpers::PushTarget {
    helpers::PushTarget {
        url,
        more_urls: Vec::new(),
        token: TOKEN.into(),
        encoding_aes_key: Some(KEY.into()),
    }
}

pub fn now_ts() -> String {
    chrono::Utc::now().timestamp().to_string()
}

/// A distinct CreateTime per push (the identity of an event).
fn create_time() -> i64 {
    static NEXT: AtomicI64 = AtomicI64::new(1_700_000_000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub fn plaintext(body: &str, ts: &str) -> Signed {
    let nonce = "1320562132";
    Signed {
        query: vec![
            (
                "signature".into(),
                push_crypto::signature(&[TOKEN, ts, nonce]),
            ),
            ("timestamp".into(), ts.into()),
            ("nonce".into(), nonce.into()),
            ("openid".into(), "u1".into()),
        ],
        body: body.into(),
    }
}

/// Safe mode: the body encrypted for `appid`, in an envelope of the body's format.
pub fn safe(body: &str, ts: &str, appid: &str) -> Signed {
    let key = PushKey::from_encoding_aes_key(KEY).unwrap();
    let encrypt = push_crypto::encrypt(&key, body.as_bytes(), appid, rand::random());
    let mut signed = plaintext(&envelope(body, &encrypt), ts);
    let nonce = "1320562132";
    signed.query.push(("encrypt_type".into(), "aes".into()));
    signed.query.push((
        "msg_signature".into(),
        push_crypto::signature(&[TOKEN, ts, nonce, &encrypt]),
    ));
    signed
}

fn envelope(plain: &str, encrypt: &str) -> String {
    if plain.trim_start().starts_with('{') {
        json!({"ToUserName": "gh_test", "Encrypt": encrypt}).to_string()
    } else {
        format!("<xml><ToUserName><![CDATA[gh_test]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>")
    }
}

pub async fn post(app: &TestApp, s: &Signed) -> (u16, String) {
    let res = app
        .http
        .post(app.url(PATH))
        .query(&s.query)
        .header("content-type", "text/xml")
        .body(s.body.clone())
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

fn items_xml(items: &[(&str, &str)]) -> String {
    items
        .iter()
        .map(|(t, s)| format!("<List><TemplateId><![CDATA[{t}]]></TemplateId><SubscribeStatusString><![CDATA[{s}]]></SubscribeStatusString><PopupScene>0</PopupScene></List>"))
        .collect()
}

pub fn popup_at(openid: &str, ct: i64, items: &[(&str, &str)]) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_test]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
<CreateTime>{ct}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe_msg_popup_event]]></Event>\
<SubscribeMsgPopupEvent>{}</SubscribeMsgPopupEvent></xml>",
        items_xml(items)
    )
}

pub fn popup(openid: &str, items: &[(&str, &str)]) -> String {
    popup_at(openid, create_time(), items)
}

pub fn change(openid: &str, template: &str) -> String {
    json!({"ToUserName": "gh_test", "FromUserName": openid, "CreateTime": create_time(),
           "MsgType": "event", "Event": "subscribe_msg_change_event",
           "SubscribeMsgChangeEvent": {"List": {"TemplateId": template, "SubscribeStatusString": "reject"}}})
    .to_string()
}

pub fn sent(openid: &str, template: &str, msgid: &str, code: &str, status: &str) -> String {
    json!({"ToUserName": "gh_test", "FromUserName": openid, "CreateTime": create_time(),
           "MsgType": "event", "Event": "subscribe_msg_sent_event",
           "SubscribeMsgSentEvent": {"List": [{"TemplateId": template, "MsgID": msgid, "ErrorCode": code, "ErrorStatus": status}]}})
    .to_string()
}

async fn ok(app: &TestApp, s: &Signed) {
    let (status, body) = post(app, s).await;
    assert_eq!((status, body.as_str()), (200, "success"));
}

pub async fn quota(app: &TestApp, openid: &str) -> Value {
    let (status, q) = app
        .get(&format!("/v1/admin/users/{openid}/quota"), Some(KEY_ADMIN))
        .await;
    assert_eq!(status, 200, "{q}");
    q
}

async fn report_accept(app: &TestApp, session: &str, n: usize) {
    let subs: Vec<Value> = (0..n)
        .map(|_| json!({"template_id": SUB, "result": "accept"}))
        .collect();
    let (status, res) = app
        .post(
            "/v1/client/credentials",
            Some(session),
            &json!({"subscriptions": subs}),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["accepted"], n, "{res}");
}

fn error_code(res: &str) -> String {
    serde_json::from_str::<Value>(res).map_or_else(
        |_| format!("not JSON: {res}"),
        |v| v["error"]["code"].as_str().unwrap_or_default().to_string(),
    )
}

async fn send(app: &TestApp, openid: &str) -> Value {
    let (status, m) = app
        .post(
            "/v1/messages?wait=20",
            Some(KEY_SEND),
            &json!({"openid": openid, "template_id": SUB, "data": {"thing1": {"value": "Your parcel left"}}}),
        )
        .await;
    assert_eq!(status, 200, "{m}");
    m
}

backend_app_tests! {
    /// WeChat's URL check: the echo with the right signature, 403 otherwise, 404
    /// for an app without LEDGER_PUSH.
    async fn the_url_check_echoes_only_a_signed_request(tdb) {
        let app = spawn(tdb, true).await;
        let ts = now_ts();
        let mut s = plaintext("", &ts);
        s.query.push(("echostr".into(), "shr5ch".into()));
        let res = app.http.get(app.url(PATH)).query(&s.query).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 200);
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        assert_eq!(res.text().await.unwrap(), "shr5ch");
        s.query[0].1 = push_crypto::signature(&["otherToken", &ts, "1320562132"]);
        let res = app.http.get(app.url(PATH)).query(&s.query).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 403);
        assert_eq!(error_code(&res.text().await.unwrap()), "bad_signature");
        let res = app.http.get(app.url("/v1/wechat/push/wxother")).query(&s.query).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 404);
        assert_eq!(error_code(&res.text().await.unwrap()), "not_found");
    }

    /// Every kind of bad push: the contract's status and code, nothing applied;
    /// then a good one applies.
    async fn bad_pushes_are_refused_and_apply_nothing(tdb) {
        let app = spawn(tdb, true).await;
        let ts = now_ts();
        let good = popup("u1", &[(SUB, "accept")]);
        let mut cases: Vec<(&str, Signed, u16, &str)> = Vec::new();
        let mut wrong_sig = safe(&good, &ts, APP);
        wrong_sig.query[0].1 = push_crypto::signature(&["wrongToken", &ts, "1320562132"]);
        cases.push(("wrong signature", wrong_sig, 403, "bad_signature"));
        let mut no_sig = safe(&good, &ts, APP);
        no_sig.query.retain(|(k, _)| k != "signature");
        cases.push(("no signature", no_sig, 403, "bad_signature"));
        let stale = (chrono::Utc::now().timestamp() - 301).to_string();
        cases.push(("stale timestamp", safe(&good, &stale, APP), 403, "bad_signature"));
        let future = (chrono::Utc::now().timestamp() + 400).to_string();
        cases.push(("future timestamp", safe(&good, &future, APP), 403, "bad_signature"));
        let mut wrong_msg_sig = safe(&good, &ts, APP);
        let last = wrong_msg_sig.query.len() - 1;
        wrong_msg_sig.query[last].1 = "0".repeat(40);
        cases.push(("wrong msg_signature", wrong_msg_sig, 403, "bad_signature"));
        cases.push(("another app's ciphertext", safe(&good, &ts, "wxsomeoneelse"), 403, "bad_signature"));
        // A ciphertext that does not decrypt, correctly signed.
        let broken = "bm90IGEgY2lwaGVydGV4dA==";
        let mut undecryptable = plaintext(&envelope(&good, broken), &ts);
        undecryptable.query.push(("encrypt_type".into(), "aes".into()));
        undecryptable.query.push(("msg_signature".into(), push_crypto::signature(&[TOKEN, &ts, "1320562132", broken])));
        cases.push(("undecryptable body", undecryptable, 403, "bad_signature"));
        cases.push(("plaintext to an encrypted app", plaintext(&good, &ts), 403, "bad_signature"));
        cases.push(("malformed XML", safe("<xml><FromUserName>u1</FromUserName>", &ts, APP), 400, "invalid_request"));
        cases.push(("malformed JSON", safe("{\"FromUserName\": ", &ts, APP), 400, "invalid_request"));
        cases.push(("popup without its list", safe(&good.replace("SubscribeMsgPopupEvent", "Other"), &ts, APP), 400, "invalid_request"));
        let mut no_encrypt = safe(&good, &ts, APP);
        no_encrypt.body = "<xml><ToUserName>gh</ToUserName></xml>".into();
        cases.push(("envelope without Encrypt", no_encrypt, 400, "invalid_request"));
        let mut huge = safe(&good, &ts, APP);
        huge.body = format!("<xml><Encrypt>{}</Encrypt></xml>", "A".repeat(70 * 1024));
        cases.push(("oversized body", huge, 413, "payload_too_large"));
        for (what, signed, status, code) in &cases {
            let (got, body) = post(&app, signed).await;
            assert_eq!((got, error_code(&body).as_str()), (*status, *code), "{what}: {body}");
            assert_eq!(app.credential_count(), 0, "{what} applied something");
        }
        // An API key is never a substitute for the signature.
        let mut keyed = safe(&good, &ts, APP);
        keyed.query.retain(|(k, _)| k != "signature" && k != "msg_signature");
        let res = app.http.post(app.url(PATH)).query(&keyed.query).bearer_auth(KEY_ALL)
            .body(keyed.body.clone()).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 403);
        assert_eq!(app.credential_count(), 0);
        // The same push, signed and encrypted right, applies.
        ok(&app, &safe(&good, &ts, APP)).await;
        assert_eq!(app.credential_count(), 1);
        assert_eq!(quota(&app, "u1").await["subscriptions_confirmed"], json!({SUB: 1}));
    }

    /// Plaintext mode, XML and JSON; an app without an EncodingAESKey refuses
    /// encrypted pushes it cannot read.
    async fn plaintext_pushes_in_xml_and_json(tdb) {
        let app = spawn(tdb, false).await;
        let ts = now_ts();
        ok(&app, &plaintext(&popup("u1", &[(SUB, "accept"), ("TPL_OTHER", "reject")]), &ts)).await;
        let json_popup = json!({"FromUserName": "u1", "CreateTime": create_time(), "MsgType": "event",
            "Event": "subscribe_msg_popup_event",
            "SubscribeMsgPopupEvent": {"List": {"TemplateId": SUB, "SubscribeStatusString": "accept", "PopupScene": "0"}}});
        ok(&app, &plaintext(&json_popup.to_string(), &ts)).await;
        let q = quota(&app, "u1").await;
        assert_eq!(q["subscriptions"], json!({SUB: 2}), "{q}");
        assert_eq!(q["subscriptions_confirmed"], json!({SUB: 2}), "{q}");
        assert_eq!(q["subscription_results"], json!({SUB: {"accept": 2}, "TPL_OTHER": {"reject": 1}}), "{q}");
        let (status, body) = post(&app, &safe(&popup("u1", &[(SUB, "accept")]), &ts, APP)).await;
        assert_eq!((status, error_code(&body).as_str()), (403, "bad_signature"));
        // Not a subscribe-message event: answered, not applied.
        let text = "<xml><ToUserName>gh</ToUserName><FromUserName>u1</FromUserName><CreateTime>1</CreateTime>\
<MsgType>text</MsgType><Content>hello</Content><MsgId>77</MsgId></xml>";
        ok(&app, &plaintext(text, &ts)).await;
        assert_eq!(quota(&app, "u1").await["subscriptions"], json!({SUB: 2}));
    }

    /// WeChat's retries repeat the identity: applied once, answered each time.
    async fn a_retried_push_is_applied_once(tdb) {
        let app = spawn(tdb, true).await;
        let body = popup("u1", &[(SUB, "accept"), (SUB, "accept")]);
        for _ in 0..3 {
            ok(&app, &safe(&body, &now_ts(), APP)).await;
        }
        let q = quota(&app, "u1").await;
        assert_eq!(q["subscriptions"], json!({SUB: 2}), "{q}");
        assert_eq!(q["subscription_results"], json!({SUB: {"accept": 2}}), "{q}");
    }

    /// The merge rule, both orders: a client accept and a pushed accept within
    /// 120 s are one grant, matched one to one; an unmatched client accept counts.
    async fn client_and_pushed_accepts_are_one_grant(tdb) {
        let app = spawn(tdb, true).await;
        // Client first (twice), then WeChat pushes one: 2 grants, 1 confirmed.
        let s1 = app.login("u1").await;
        report_accept(&app, &s1, 2).await;
        ok(&app, &safe(&popup("u1", &[(SUB, "accept")]), &now_ts(), APP)).await;
        let q = quota(&app, "u1").await;
        assert_eq!((&q["subscriptions"], &q["subscriptions_confirmed"]), (&json!({SUB: 2}), &json!({SUB: 1})), "{q}");
        assert_eq!(q["subscription_results"], json!({SUB: {"accept": 2}}), "{q}");
        // WeChat first (twice), then the client reports one: 2 grants, both confirmed.
        let s2 = app.login("u2").await;
        ok(&app, &safe(&popup("u2", &[(SUB, "accept"), (SUB, "accept")]), &now_ts(), APP)).await;
        report_accept(&app, &s2, 1).await;
        let q = quota(&app, "u2").await;
        assert_eq!((&q["subscriptions"], &q["subscriptions_confirmed"]), (&json!({SUB: 2}), &json!({SUB: 2})), "{q}");
        assert_eq!(q["subscription_results"], json!({SUB: {"accept": 2}}), "{q}");
        // One each side, three times: three grants, not six.
        let s3 = app.login("u3").await;
        for _ in 0..3 {
            report_accept(&app, &s3, 1).await;
            ok(&app, &safe(&popup("u3", &[(SUB, "accept")]), &now_ts(), APP)).await;
        }
        let q = quota(&app, "u3").await;
        assert_eq!((&q["subscriptions"], &q["subscriptions_confirmed"]), (&json!({SUB: 3}), &json!({SUB: 3})), "{q}");
    }

    /// A change event's reject removes the live subscriptions to the template.
    async fn a_change_reject_removes_the_templates_subscriptions(tdb) {
        let app = spawn(tdb, true).await;
        let s = app.login("u1").await;
        report_accept(&app, &s, 2).await;
        ok(&app, &safe(&popup("u1", &[("TPL_KEPT", "accept")]), &now_ts(), APP)).await;
        ok(&app, &safe(&change("u1", SUB), &now_ts(), APP)).await;
        let q = quota(&app, "u1").await;
        assert_eq!(q["subscriptions"], json!({"TPL_KEPT": 1}), "{q}");
        assert_eq!(q["subscription_results"][SUB], json!({"accept": 2, "reject": 1}), "{q}");
        // Nothing left to send with: no_quota, and WeChat was not called.
        let m = send(&app, "u1").await;
        assert_eq!(m["status"], "no_quota", "{m}");
        assert!(app.sim.sim.deliveries().is_empty());
    }

    /// subscribe/send's msgid is stored and shown; the sent event sets `delivery`
    /// on that message (delivered, refused).
    async fn sent_events_set_the_delivery_of_the_message_by_msgid(tdb) {
        let app = spawn(tdb, true).await;
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 2).unwrap();
        ok(&app, &safe(&popup("u1", &[(SUB, "accept"), (SUB, "accept")]), &now_ts(), APP)).await;
        let first = send(&app, "u1").await;
        let second = send(&app, "u1").await;
        assert_eq!((first["status"].as_str(), second["status"].as_str()), (Some("sent"), Some("sent")));
        let msgids: Vec<String> = app.sim.sim.deliveries().iter().map(|d| d.msgid.unwrap().to_string()).collect();
        assert_eq!(first["wechat_msgid"], msgids[0].as_str(), "{first}");
        assert_eq!(second["wechat_msgid"], msgids[1].as_str(), "{second}");
        assert!(first.get("delivery").is_none());
        ok(&app, &safe(&sent("u1", SUB, &msgids[0], "0", "success"), &now_ts(), APP)).await;
        ok(&app, &safe(&sent("u1", SUB, &msgids[1], "43101", "fail:user refuse to accept the msg"), &now_ts(), APP)).await;
        let (_, m1) = app.get(&format!("/v1/messages/{}", first["id"].as_str().unwrap()), Some(KEY_SEND)).await;
        let (_, m2) = app.get(&format!("/v1/messages/{}", second["id"].as_str().unwrap()), Some(KEY_SEND)).await;
        assert_eq!((m1["delivery"]["status"].as_str(), m1["delivery"]["error_status"].as_str()), (Some("delivered"), Some("success")), "{m1}");
        assert_eq!(m2["delivery"]["status"], "refused", "{m2}");
        assert!(m1["delivery"]["at"].is_string());
        // An unknown msgid changes nothing.
        ok(&app, &safe(&sent("u1", SUB, "999", "0", "success"), &now_ts(), APP)).await;
    }

    /// The answer to a subscribe send is lost: outcome_unknown, the use spent.
    /// WeChat's sent event for that user and template proves the send: the message
    /// is sent, with its delivery; the use stays charged (one delivery at WeChat,
    /// none left in the ledger); a second event does not settle anything else.
    async fn a_sent_event_resolves_outcome_unknown(tdb) {
        let app = spawn(tdb, true).await;
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 1).unwrap();
        ok(&app, &safe(&popup("u1", &[(SUB, "accept")]), &now_ts(), APP)).await;
        app.sim.sim.set_faults(Faults { send: FaultSet { drop_after_read: 1.0, ..FaultSet::default() }, ..Faults::default() }).unwrap();
        let m = send(&app, "u1").await;
        assert_eq!((m["status"].as_str(), m["error"]["code"].as_str()), (Some("failed"), Some("outcome_unknown")), "{m}");
        assert!(m.get("wechat_msgid").is_none(), "{m}");
        app.sim.sim.set_faults(Faults::default()).unwrap();
        let deliveries = app.sim.sim.deliveries();
        assert_eq!(deliveries.len(), 1);
        assert!(deliveries[0].response_dropped);
        let msgid = deliveries[0].msgid.unwrap().to_string();
        // A sent event for another template settles nothing.
        ok(&app, &safe(&sent("u1", "TPL_OTHER", &msgid, "0", "success"), &now_ts(), APP)).await;
        let id = m["id"].as_str().unwrap();
        let (_, still) = app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await;
        assert_eq!(still["status"], "failed", "{still}");
        ok(&app, &safe(&sent("u1", SUB, &msgid, "0", "success"), &now_ts(), APP)).await;
        let (_, m) = app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await;
        assert_eq!((m["status"].as_str(), m["wechat_msgid"].as_str()), (Some("sent"), Some(msgid.as_str())), "{m}");
        assert_eq!(m["delivery"]["status"], "delivered", "{m}");
        assert!(m.get("error").is_none(), "{m}");
        assert_eq!(m["credential"]["kind"], "subscription", "{m}");
        let q = quota(&app, "u1").await;
        assert_eq!(q["subscriptions"], json!({}), "the use stays charged: {q}");
        assert_eq!(app.sim.sim.deliveries().len(), 1, "never sent again");
        let (_, stats) = app.get("/v1/admin/stats", Some(KEY_ADMIN)).await;
        assert_eq!(stats["messages_24h"]["sent"], 1, "{stats}");
        assert_eq!(stats["messages_24h"]["failed"], 0, "{stats}");
    }
}

backend_app_tests! {
    /// A sent event names only (openid, template), so it settles an outcome_unknown
    /// only when it cannot be another send's: not with two ambiguous candidates, not
    /// while another send to the user and template is in flight (its event may
    /// overtake its answer). The chaos run caught the in-flight case making an
    /// undelivered message `sent`.
    async fn a_sent_event_that_may_be_another_sends_settles_nothing(tdb) {
        use diesel::prelude::*;
        use helpers::schema::messages::dsl as m;
        let app = spawn(tdb, true).await;
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 2).unwrap();
        ok(&app, &safe(&popup("u1", &[(SUB, "accept"), (SUB, "accept")]), &now_ts(), APP)).await;
        app.sim.sim.set_faults(Faults { send: FaultSet { drop_after_read: 1.0, ..FaultSet::default() }, ..Faults::default() }).unwrap();
        let (a, b) = (send(&app, "u1").await, send(&app, "u1").await);
        for x in [&a, &b] {
            assert_eq!(x["error"]["code"], "outcome_unknown", "{x}");
        }
        let msgids: Vec<String> = app.sim.sim.deliveries().iter().map(|d| d.msgid.unwrap().to_string()).collect();
        assert_eq!(msgids.len(), 2);
        let status = |x: &Value| {
            let id = x["id"].as_str().unwrap().to_string();
            let app = &app;
            async move { app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await.1["status"].clone() }
        };
        // Two candidates: the event may be either's.
        ok(&app, &safe(&sent("u1", SUB, &msgids[0], "0", "success"), &now_ts(), APP)).await;
        assert_eq!((status(&a).await, status(&b).await), (json!("failed"), json!("failed")));
        // One candidate, but another send to the user and template in flight.
        let mut conn = app.db.get().unwrap();
        let b_id = b["id"].as_str().unwrap().to_string();
        helpers::dispatch!(&mut *conn, |c| diesel::update(m::messages.filter(m::public_id.eq(&b_id)))
            .set((m::status.eq("sending"), m::error_code.eq(None::<String>), m::in_flight.eq(true)))
            .execute(c))
        .unwrap();
        ok(&app, &safe(&sent("u1", SUB, &msgids[1], "0", "success"), &now_ts(), APP)).await;
        assert_eq!(status(&a).await, json!("failed"), "an in-flight send's event settles nothing else");
    }
}

backend_app_tests! {
    /// The merge rule under concurrency: 12 client accepts and 8 pushed accepts for
    /// one user and template, all at once, are 12 grants (each push matched one
    /// client accept, whichever came first), 8 of them confirmed, counted 12 times.
    async fn the_merge_rule_holds_under_concurrency(tdb) {
        let app = spawn(tdb, true).await;
        let app = &app;
        let session = app.login("u1").await;
        let clients = (0..12).map(|_| report_accept(app, &session, 1));
        let pushes = (0..8).map(|_| {
            let s = safe(&popup("u1", &[(SUB, "accept")]), &now_ts(), APP);
            async move { ok(app, &s).await }
        });
        futures_util::future::join(
            futures_util::future::join_all(clients),
            futures_util::future::join_all(pushes),
        )
        .await;
        let q = quota(app, "u1").await;
        assert_eq!(q["subscriptions"], json!({SUB: 12}), "{q}");
        assert_eq!(q["subscriptions_confirmed"], json!({SUB: 8}), "{q}");
        assert_eq!(q["subscription_results"], json!({SUB: {"accept": 12}}), "{q}");
        assert_eq!(app.credential_count(), 12);
    }

    /// Applied pushes are remembered as long as idempotency keys, then purged.
    async fn push_receipts_are_purged_with_the_idempotency_keys(tdb) {
        let app = spawn(tdb, true).await;
        ok(&app, &safe(&popup("u1", &[(SUB, "accept")]), &now_ts(), APP)).await;
        let mut conn = app.db.get().unwrap();
        let retention = helpers::Retention::default();
        let now = chrono::Utc::now();
        let kept = helpers::purge(&mut conn, &retention, now, false).unwrap();
        assert_eq!(kept.push_receipts, 0);
        let later = now + chrono::TimeDelta::hours(25);
        let purged = helpers::purge(&mut conn, &retention, later, false).unwrap();
        assert_eq!(purged.push_receipts, 1);
    }
}

backend_app_tests! {
    /// The simulator as WeChat's pusher (safe mode): a grant it mints arrives as a
    /// confirmed grant, a subscribe delivery as the message's `delivery`.
    async fn the_simulator_pushes_grants_and_deliveries(tdb) {
        let app = spawn(tdb, true).await;
        app.sim.sim.set_push_target(APP, target(app.url(PATH)));
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 2).unwrap();
        let confirmed = helpers::eventually(Duration::from_secs(10), || async {
            quota(&app, "u1").await["subscriptions_confirmed"] == json!({SUB: 2})
        })
        .await;
        assert!(confirmed, "{}", quota(&app, "u1").await);
        let m = send(&app, "u1").await;
        assert_eq!(m["status"], "sent", "{m}");
        let id = m["id"].as_str().unwrap().to_string();
        let delivered = helpers::eventually(Duration::from_secs(10), || async {
            app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await.1["delivery"]["status"] == "delivered"
        })
        .await;
        assert!(delivered);
        // The simulator counts a push when its answer arrives, after the effects
        // are committed: wait for it rather than race it.
        let answered = helpers::eventually(Duration::from_secs(10), || async {
            app.sim.sim.pushes_answered() == 3
        })
        .await;
        assert!(answered, "{} pushes answered", app.sim.sim.pushes_answered());
    }

    /// The simulator is told how users behave, and pushes what WeChat would: no
    /// popup for an "always keep" user (the client's report alone is the grant), a
    /// change event when a user turns a template off (grants gone on both sides),
    /// and refused sent events for a user who refuses messages.
    async fn the_simulator_pushes_what_users_do(tdb) {
        let app = spawn(tdb, true).await;
        app.sim.sim.set_push_target(APP, target(app.url(PATH)));
        let habits = |always_keep, refuses| helpers::UserHabits { always_keep, refuses };
        app.sim.sim.set_habits(APP, "keeper", habits(true, false));
        app.sim.sim.set_habits(APP, "refuser", habits(false, true));
        for user in ["keeper", "fickle", "refuser"] {
            app.sim.sim.grant_subscriptions(APP, user, SUB, 1).unwrap();
        }
        // Popups of fickle and refuser; none of keeper.
        let answered = helpers::eventually(Duration::from_secs(10), || async { app.sim.sim.pushes_answered() >= 2 });
        assert!(answered.await);
        assert_eq!(quota(&app, "fickle").await["subscriptions_confirmed"], json!({SUB: 1}));
        let session = app.login("keeper").await;
        report_accept(&app, &session, 1).await;
        let q = quota(&app, "keeper").await;
        assert_eq!((q["subscriptions"].clone(), q["subscriptions_confirmed"].clone()), (json!({SUB: 1}), json!({})), "{q}");
        // fickle turns the template off: the simulator voids the grant and pushes
        // the change; the ledger removes it.
        assert_eq!(app.sim.sim.turn_off(APP, "fickle", SUB).unwrap(), 1);
        let removed = helpers::eventually(Duration::from_secs(10), || async {
            quota(&app, "fickle").await["subscriptions"] == json!({})
        });
        assert!(removed.await, "{}", quota(&app, "fickle").await);
        // refuser's message is accepted by WeChat, and refused on the phone.
        let m = send(&app, "refuser").await;
        assert_eq!(m["status"], "sent", "{m}");
        let id = m["id"].as_str().unwrap().to_string();
        let refused = helpers::eventually(Duration::from_secs(10), || async {
            app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await.1["delivery"]["status"] == "refused"
        });
        assert!(refused.await);
        // The simulator counts an answer after it has read it, which can be a moment
        // after the ledger committed what the push said.
        let counted = helpers::eventually(Duration::from_secs(5), || async { app.sim.sim.pushes_answered() >= 4 });
        assert!(counted.await, "{} answered", app.sim.sim.pushes_answered());
        assert_eq!(app.sim.sim.pushes_answered(), 4, "2 popups, 1 change, 1 sent event");
    }
}

/// The sandbox wires the simulator's pusher to itself: a minted grant shows up
/// confirmed with no setup.
#[actix_web::test]
async fn the_sandbox_pushes_to_itself() {
    let db = helpers::TestDb::sqlite();
    let settings = helpers::Settings {
        database_url: db.url(),
        db_pool_size: 2,
        ..helpers::Settings::default()
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = helpers::Application::build(settings, listener)
        .await
        .expect("sandbox");
    let sandbox = app.sandbox().expect("sandbox mode");
    let (sim, key) = (
        sandbox.simulator.clone(),
        sandbox.api_key.clone().expect("generated key"),
    );
    let base = format!("http://127.0.0.1:{}", app.port());
    actix_web::rt::spawn(app.run_until_stopped());
    let http = reqwest::Client::new();
    helpers::wait_up(&http, &format!("{base}/healthz")).await;
    sim.grant_subscriptions("wxsandbox", "o-demo", "TPL_SHIPPED", 1)
        .unwrap();
    let url = format!("{base}/v1/admin/users/o-demo/quota");
    let confirmed = helpers::eventually(Duration::from_secs(10), || async {
        helpers::get_json(&http, &url, Some(key.expose())).await["subscriptions_confirmed"]
            == json!({"TPL_SHIPPED": 1})
    })
    .await;
    assert!(
        confirmed,
        "{}",
        helpers::get_json(&http, &url, Some(key.expose())).await
    );
}

backend_app_tests! {
    /// The standalone simulator (`formid-ledger sim --push … --push-url …`) is the
    /// service's pusher: the grants it mints arrive confirmed. The first URL answers
    /// nothing (an instance that is down): pushes go round-robin over the URLs and a
    /// retry goes to the next, so every grant still arrives, exactly once.
    async fn the_standalone_simulator_pushes_round_robin(tdb) {
        let app = spawn(tdb, true).await;
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_formid-ledger"))
            .env_clear()
            .env("RUST_LOG", "warn")
            .env("LEDGER_SIM_PUSH", format!("{APP}:{TOKEN}:{KEY}"))
            .args([
                "sim",
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--apps",
                &format!("{APP}:{}", helpers::APP_SECRET),
                "--push-url",
                &format!("http://127.0.0.1:{dead},{}", app.url("")),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the simulator");
        let http = reqwest::Client::new();
        let sim = format!("http://127.0.0.1:{port}");
        helpers::wait_up(&http, &format!("{sim}/sim/stats")).await;
        let grant = json!({"appid": APP, "openid": "u1", "template_id": SUB, "count": 3});
        helpers::post_json(&http, &format!("{sim}/sim/subscriptions"), None, &grant).await;
        let confirmed = helpers::eventually(Duration::from_secs(15), || async {
            quota(&app, "u1").await["subscriptions_confirmed"] == json!({SUB: 3})
        })
        .await;
        let q = quota(&app, "u1").await;
        let _ = child.kill();
        let _ = child.wait();
        assert!(confirmed, "{q}");
        assert_eq!(q["subscriptions"], json!({SUB: 3}), "{q}");
    }
}

/// The simulator's first subscribe delivery answers this msgid (its msgids are a
/// base plus the delivery's sequence number).
const FIRST_MSGID: &str = "3000000001";

backend_app_tests! {
    /// A sent event can overtake the settlement of the send it reports: it is kept
    /// and the settlement takes it (by msgid), so the delivery is not lost.
    async fn a_sent_event_that_overtakes_its_send_is_kept_for_it(tdb) {
        let app = spawn(tdb, true).await;
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 1).unwrap();
        ok(&app, &safe(&popup("u1", &[(SUB, "accept")]), &now_ts(), APP)).await;
        ok(&app, &safe(&sent("u1", SUB, FIRST_MSGID, "0", "success"), &now_ts(), APP)).await;
        let m = send(&app, "u1").await;
        assert_eq!((m["status"].as_str(), m["wechat_msgid"].as_str()), (Some("sent"), Some(FIRST_MSGID)), "{m}");
        assert_eq!(m["delivery"]["status"], "delivered", "{m}");
    }

    /// The same for an ambiguous send: the simulator pushes the sent event as it
    /// delivers and holds the (then broken) answer 300 ms, so the event overtakes
    /// the settlement and settles the outcome_unknown as it is written. (An event
    /// received before the call began could not be this send's: it would not.)
    async fn an_earlier_sent_event_resolves_the_outcome_unknown_it_reports(tdb) {
        let app = spawn(tdb, true).await;
        app.sim.sim.set_push_target(APP, target(app.url(PATH)));
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 1).unwrap();
        let confirmed = helpers::eventually(Duration::from_secs(10), || async {
            quota(&app, "u1").await["subscriptions_confirmed"] == json!({SUB: 1})
        })
        .await;
        assert!(confirmed);
        app.sim.sim.set_faults(Faults { send: FaultSet { drop_after_read: 1.0, latency_ms: Some(helpers::Latency::Fixed(300)), ..FaultSet::default() }, ..Faults::default() }).unwrap();
        let m = send(&app, "u1").await;
        let id = m["id"].as_str().unwrap().to_string();
        let sent = helpers::eventually(Duration::from_secs(10), || async {
            app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await.1["status"] == "sent"
        })
        .await;
        let (_, m) = app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await;
        assert!(sent, "{m}");
        assert_eq!((m["status"].as_str(), m["wechat_msgid"].as_str()), (Some("sent"), Some(FIRST_MSGID)), "{m}");
        assert_eq!(m["delivery"]["status"], "delivered", "{m}");
        assert_eq!(app.sim.sim.deliveries().len(), 1);
        assert_eq!(quota(&app, "u1").await["subscriptions"], json!({}));
    }
}

/// WeChat's retry, as the simulator does it: a push that got no answer within 5 s
/// is sent again with the same body (so the same identity), 3 tries in all. The
/// receiver here holds its first answer for 6 s.
#[actix_web::test]
async fn the_simulator_retries_a_push_that_got_no_answer_in_5_s() {
    use std::sync::{Arc, Mutex};
    let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = bodies.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/push", listener.local_addr().unwrap());
    let server = actix_web::HttpServer::new(move || {
        let seen = seen.clone();
        actix_web::App::new().default_service(actix_web::web::to(move |body: String| {
            let seen = seen.clone();
            async move {
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(body);
                    seen.len() == 1
                };
                if first {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                }
                "success"
            }
        }))
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    actix_web::rt::spawn(server);
    let sim = helpers::TestSim::spawn();
    sim.sim.set_push_target(APP, target(url));
    sim.sim.grant_subscriptions(APP, "u1", SUB, 1).unwrap();
    let answered = helpers::eventually(Duration::from_secs(20), || async {
        sim.sim.pushes_answered() == 1
    });
    assert!(answered.await);
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2, "one try, no answer in 5 s, one retry");
    assert_eq!(bodies[0], bodies[1], "the retry repeats the push");
}
