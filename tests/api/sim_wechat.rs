//! The simulator on a real port, driven through the project's own WechatClient.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    eventually_some, get_json, post_json, sim, DataValue, ErrorClass, FaultSet, Faults, Latency,
    MessageKind, Secret, SimConfig, Simulator, SubscribeMessage, TemplateMessage, WechatClient,
    WechatError,
};

const APP: &str = "wxapp0000000000001";
const OTHER_APP: &str = "wxapp0000000000002";

fn secret() -> Secret {
    Secret::new("s3cret-of-app-1")
}

struct Harness {
    sim: Simulator,
    wx: WechatClient,
    base: String,
}

fn config() -> SimConfig {
    SimConfig {
        apps: vec![
            (APP.to_owned(), secret()),
            (OTHER_APP.to_owned(), Secret::new("other-secret")),
        ],
        seed: Some(7),
        ..SimConfig::default()
    }
}

fn start(cfg: SimConfig) -> Harness {
    start_with_timeout(cfg, Duration::from_secs(5))
}

fn start_with_timeout(cfg: SimConfig, total_timeout: Duration) -> Harness {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let sim = Simulator::new(cfg);
    tokio::spawn(sim::serve(listener, sim.clone()));
    let wx = WechatClient::new(&base, Duration::from_secs(2), total_timeout).expect("client");
    Harness { sim, wx, base }
}

impl Harness {
    async fn token(&self) -> Secret {
        self.wx
            .classic_token(APP, &secret())
            .await
            .expect("token")
            .token
    }

    /// A control call over HTTP.
    async fn control(&self, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        post_json(&reqwest::Client::new(), &url, None, &body).await
    }

    async fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.base);
        get_json(&reqwest::Client::new(), &url, None).await
    }

    /// The errcode of a send that passes the token check only if the token is good:
    /// 40003 (unknown openid) means the token was accepted.
    async fn probe(&self, token: &Secret) -> Option<i64> {
        let msg = template("nobody", "whatever");
        self.wx
            .send_template(token, &msg)
            .await
            .expect_err("probe cannot succeed")
            .errcode
    }
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, DataValue> {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                DataValue {
                    value: (*v).to_owned(),
                    color: None,
                },
            )
        })
        .collect()
}

fn template(touser: &str, form_id: &str) -> TemplateMessage {
    TemplateMessage {
        touser: touser.into(),
        template_id: "TPL_ORDER".into(),
        page: Some("pages/order/detail?id=1".into()),
        form_id: form_id.into(),
        data: data(&[("keyword1", "339208499")]),
        emphasis_keyword: None,
    }
}

fn subscribe(touser: &str, thing: &str) -> SubscribeMessage {
    SubscribeMessage {
        touser: touser.into(),
        template_id: "TPL_SHIPPED".into(),
        page: None,
        data: data(&[("thing1", thing), ("date2", "2026-11-27")]),
        miniprogram_state: Some("formal".into()),
        lang: None,
    }
}

fn assert_wx(err: &WechatError, class: ErrorClass, errcode: Option<i64>) {
    assert_eq!(
        (err.class, err.errcode),
        (class, errcode),
        "unexpected error {err}"
    );
}

#[tokio::test]
async fn classic_tokens_rotate_with_overlap_then_expire() {
    let h = start(SimConfig {
        token_overlap: Duration::from_secs(1),
        token_expires_in: Duration::from_secs(3),
        ..config()
    });
    let first = h.wx.classic_token(APP, &secret()).await.expect("token");
    assert_eq!(first.expires_in, 3);
    assert!(first.token.expose().len() >= 64);
    assert_eq!(h.probe(&first.token).await, Some(40003));

    let second = h.token().await;
    assert_ne!(second, first.token, "each classic call issues a new token");
    // Overlap: both work.
    assert_eq!(h.probe(&first.token).await, Some(40003));
    assert_eq!(h.probe(&second).await, Some(40003));

    // After the overlap the old one is "not latest" (40001), the new one still works.
    let code = eventually_some(Duration::from_secs(3), || async {
        h.probe(&first.token).await.filter(|c| *c != 40003)
    })
    .await
    .expect("the superseded token kept working past the overlap");
    assert_eq!(code, 40001);
    assert_eq!(h.probe(&second).await, Some(40003));

    // The current token expires: 42001, a Token error.
    let err = eventually_some(Duration::from_secs(4), || async {
        let err =
            h.wx.send_template(&second, &template("nobody", "x"))
                .await
                .expect_err("cannot succeed");
        (err.errcode != Some(40003)).then_some(err)
    })
    .await
    .expect("the token never expired");
    assert_wx(&err, ErrorClass::Token, Some(42001));

    // Not token-shaped at all: 40014.
    assert_eq!(h.probe(&Secret::new("garbage")).await, Some(40014));

    let fetches = h.sim.token_fetches();
    assert_eq!(fetches.len(), 2);
    assert!(fetches.iter().all(|f| f.appid == APP && f.outcome == "ok"));
}

#[tokio::test]
async fn token_calls_check_their_parameters() {
    let h = start(SimConfig {
        token_daily_limit: 1,
        ..config()
    });
    let err =
        h.wx.classic_token(APP, &Secret::new("wrong"))
            .await
            .expect_err("wrong secret");
    assert_wx(&err, ErrorClass::Caller, Some(40125));
    assert!(!err.message.contains("wrong"), "{err}");
    let err =
        h.wx.classic_token("wxnope", &secret())
            .await
            .expect_err("unknown app");
    assert_wx(&err, ErrorClass::Caller, Some(40013));
    for (query, errcode) in [
        ("appid=x&secret=y", 40002),
        ("grant_type=client_credential&secret=y", 41002),
        ("grant_type=client_credential&appid=x", 41004),
    ] {
        let body = h.get(&format!("/cgi-bin/token?{query}")).await;
        assert_eq!(body["errcode"], errcode, "{query}");
    }
    h.token().await;
    let err =
        h.wx.classic_token(APP, &secret())
            .await
            .expect_err("daily limit");
    assert_wx(&err, ErrorClass::Limit, Some(45009));
    h.sim.reset_limits();
    h.token().await;
}

#[tokio::test]
async fn stable_token_is_reused_renewed_near_expiry_and_force_refreshed() {
    let h = start(SimConfig {
        // Renewal window: min(300 s, 4 s / 4) = the last second.
        token_expires_in: Duration::from_secs(4),
        ..config()
    });
    let a = h.wx.stable_token(APP, &secret(), false).await.expect("a");
    let b = h.wx.stable_token(APP, &secret(), false).await.expect("b");
    assert_eq!(a.token, b.token, "normal mode returns the same token");
    assert!(b.expires_in <= a.expires_in);

    // Classic tokens are independent: a classic fetch does not touch the stable one.
    let classic = h.token().await;
    assert_ne!(classic, a.token);
    assert_eq!(h.probe(&a.token).await, Some(40003));

    // In its last second a new one is issued; the old one still works.
    let renewed = eventually_some(Duration::from_secs(5), || async {
        let t = h.wx.stable_token(APP, &secret(), false).await.expect("t");
        (t.token != a.token).then_some(t)
    })
    .await
    .expect("the stable token was never renewed");
    assert_eq!(renewed.expires_in, 4);
    assert_eq!(h.probe(&renewed.token).await, Some(40003));

    // force_refresh: the current token dies at once.
    let forced =
        h.wx.stable_token(APP, &secret(), true)
            .await
            .expect("forced");
    assert_ne!(forced.token, renewed.token);
    assert_eq!(h.probe(&renewed.token).await, Some(40001));
    assert_eq!(h.probe(&forced.token).await, Some(40003));
    // …and not again within 30 s.
    let err =
        h.wx.stable_token(APP, &secret(), true)
            .await
            .expect_err("too soon");
    assert_wx(&err, ErrorClass::Limit, Some(45011));

    let fetches = h.sim.token_fetches();
    let forced_calls = fetches.iter().filter(|f| f.force_refresh).count();
    assert_eq!(forced_calls, 2);
}

#[tokio::test]
async fn jscode2session_accepts_each_code_once_for_its_app() {
    let h = start(config());
    let code = h
        .control("/sim/codes", json!({"appid": APP, "openid": "o-alice"}))
        .await["code"]
        .as_str()
        .expect("code")
        .to_owned();
    let session =
        h.wx.code_to_session(APP, &secret(), &code)
            .await
            .expect("login");
    assert_eq!(session.openid, "o-alice");
    assert!(!session.session_key.expose().is_empty());

    let err =
        h.wx.code_to_session(APP, &secret(), &code)
            .await
            .expect_err("reused");
    assert_wx(&err, ErrorClass::Credential, Some(40029));

    let foreign = h.sim.mint_code(OTHER_APP, "o-bob").expect("code");
    let err =
        h.wx.code_to_session(APP, &secret(), &foreign)
            .await
            .expect_err("other app's code");
    assert_wx(&err, ErrorClass::Credential, Some(40029));

    h.control("/sim/block", json!({"appid": APP, "openid": "o-alice"}))
        .await;
    let code = h.sim.mint_code(APP, "o-alice").expect("code");
    let err =
        h.wx.code_to_session(APP, &secret(), &code)
            .await
            .expect_err("blocked");
    assert_wx(&err, ErrorClass::Caller, Some(40226));
}

#[tokio::test]
async fn template_send_spends_form_ids_and_prepay_ids() {
    let h = start(SimConfig {
        templates: Some(vec!["TPL_ORDER".into()]),
        pages: Some(vec!["pages/order/detail".into()]),
        ..config()
    });
    let token = h.token().await;
    let fids = h
        .control(
            "/sim/form-ids",
            json!({"appid": APP, "openid": "o-alice", "count": 2}),
        )
        .await;
    let fid = fids["form_ids"][0].as_str().expect("form_id").to_owned();
    let bob_fid = h.sim.mint_form_ids(APP, "o-bob", 1).expect("fid").remove(0);

    // Caller errors first, none of them spends the form_id.
    let mut wrong = template("o-alice", &fid);
    wrong.template_id = "TPL_UNKNOWN".into();
    let err = h.wx.send_template(&token, &wrong).await.expect_err("tpl");
    assert_wx(&err, ErrorClass::Caller, Some(40037));
    let mut wrong = template("o-alice", &fid);
    wrong.page = Some("pages/nowhere?x=1".into());
    let err = h.wx.send_template(&token, &wrong).await.expect_err("page");
    assert_wx(&err, ErrorClass::Caller, Some(41030));
    let err =
        h.wx.send_template(&token, &template("o-carol", &fid))
            .await
            .expect_err("unknown openid");
    assert_wx(&err, ErrorClass::Caller, Some(40003));

    h.wx.send_template(&token, &template("o-alice", &fid))
        .await
        .expect("send");
    let err =
        h.wx.send_template(&token, &template("o-alice", &fid))
            .await
            .expect_err("used");
    assert_wx(&err, ErrorClass::Credential, Some(41029));
    let err =
        h.wx.send_template(&token, &template("o-alice", &bob_fid))
            .await
            .expect_err("bob's form_id");
    assert_wx(&err, ErrorClass::Credential, Some(41028));

    // A prepay_id with 2 uses, not usable for its first 500 ms.
    let prepay = h
        .control(
            "/sim/prepay-ids",
            json!({"appid": APP, "openid": "o-alice", "uses": 2, "activation_delay_ms": 500}),
        )
        .await["prepay_ids"][0]
        .as_str()
        .expect("prepay_id")
        .to_owned();
    let err =
        h.wx.send_template(&token, &template("o-alice", &prepay))
            .await
            .expect_err("not active yet");
    assert_wx(&err, ErrorClass::Credential, Some(41028));
    eventually_some(Duration::from_secs(3), || async {
        h.wx.send_template(&token, &template("o-alice", &prepay))
            .await
            .ok()
    })
    .await
    .expect("the prepay_id never became usable");
    h.wx.send_template(&token, &template("o-alice", &prepay))
        .await
        .expect("second use");
    let err =
        h.wx.send_template(&token, &template("o-alice", &prepay))
            .await
            .expect_err("uses spent");
    assert_wx(&err, ErrorClass::Credential, Some(41029));

    let deliveries = h.sim.deliveries();
    let spent: Vec<_> = deliveries
        .iter()
        .map(|d| d.credential.clone().unwrap_or_default())
        .collect();
    assert_eq!(spent, [fid.clone(), prepay.clone(), prepay]);
    assert!(deliveries
        .iter()
        .all(|d| d.kind == MessageKind::Template && d.touser == "o-alice" && d.appid == APP));
    assert_eq!(
        deliveries.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // The record over HTTP says the same.
    let over_http = h.get("/sim/deliveries").await;
    assert_eq!(over_http.as_array().map(Vec::len), Some(3));
    assert_eq!(over_http[0]["credential"], fid.as_str());
    assert_eq!(h.sim.stats().count("template_send", "ok"), 3);
}

#[tokio::test]
async fn subscribe_send_needs_a_grant_and_valid_data() {
    let h = start(config());
    let token = h.token().await;
    h.sim.mint_form_ids(APP, "o-alice", 1).expect("known user");
    let err =
        h.wx.send_subscribe(&token, &subscribe("o-alice", "已发货"))
            .await
            .expect_err("no grant");
    assert_wx(&err, ErrorClass::Credential, Some(43101));

    let left = h
        .control(
            "/sim/subscriptions",
            json!({"appid": APP, "openid": "o-alice", "template_id": "TPL_SHIPPED"}),
        )
        .await;
    assert_eq!(left["grants_left"], 1);
    let err =
        h.wx.send_subscribe(
            &token,
            &subscribe("o-alice", "a thing far longer than twenty"),
        )
        .await
        .expect_err("thing too long");
    assert_wx(&err, ErrorClass::Caller, Some(47003));
    assert!(err.message.contains("data.thing1.value"), "{err}");

    let msgid =
        h.wx.send_subscribe(&token, &subscribe("o-alice", "已发货"))
            .await
            .expect("send");
    assert!(msgid.is_some());
    let err =
        h.wx.send_subscribe(&token, &subscribe("o-alice", "已发货"))
            .await
            .expect_err("grant spent");
    assert_wx(&err, ErrorClass::Credential, Some(43101));

    let deliveries = h.sim.deliveries();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].kind, MessageKind::Subscribe);
    assert_eq!(deliveries[0].msgid, msgid);
    assert_eq!(deliveries[0].credential, None);
}

fn send_faults(set: FaultSet) -> Faults {
    Faults {
        send: set,
        ..Faults::default()
    }
}

#[tokio::test]
async fn injected_faults_are_classified_and_recorded() {
    let h = start(config());
    let token = h.token().await;
    let fids = h.sim.mint_form_ids(APP, "o-alice", 3).expect("fids");

    // -1: transient, nothing delivered, the form_id still good.
    h.control("/sim/faults", json!({"send": {"busy": 1.0}}))
        .await;
    let err =
        h.wx.send_template(&token, &template("o-alice", &fids[0]))
            .await
            .expect_err("busy");
    assert_wx(&err, ErrorClass::Transient, Some(-1));

    // HTTP 500: transient, nothing delivered.
    h.sim
        .set_faults(send_faults(FaultSet {
            http_500: 1.0,
            ..FaultSet::default()
        }))
        .expect("faults");
    let err =
        h.wx.send_template(&token, &template("o-alice", &fids[0]))
            .await
            .expect_err("500");
    assert_wx(&err, ErrorClass::Transient, None);
    assert!(h.sim.deliveries().is_empty());

    // Dropped after read: delivered and spent, but the client cannot know.
    h.sim
        .set_faults(send_faults(FaultSet {
            drop_after_read: 1.0,
            ..FaultSet::default()
        }))
        .expect("faults");
    let err =
        h.wx.send_template(&token, &template("o-alice", &fids[0]))
            .await
            .expect_err("dropped");
    assert_wx(&err, ErrorClass::Ambiguous, None);
    assert!(!err.message.contains(token.expose()), "{err}");
    assert!(!err.message.contains("access_token"), "{err}");
    let deliveries = h.sim.deliveries();
    assert_eq!(deliveries.len(), 1);
    assert!(deliveries[0].response_dropped);
    assert_eq!(deliveries[0].credential.as_deref(), Some(fids[0].as_str()));

    // The safe probe: the same form_id again answers 41029, so it was delivered.
    h.sim.set_faults(Faults::default()).expect("faults");
    let err =
        h.wx.send_template(&token, &template("o-alice", &fids[0]))
            .await
            .expect_err("probe");
    assert_wx(&err, ErrorClass::Credential, Some(41029));

    // Faults on the token endpoints have their own knob.
    h.sim
        .set_faults(Faults {
            token: FaultSet {
                busy: 1.0,
                ..FaultSet::default()
            },
            ..Faults::default()
        })
        .expect("faults");
    let err =
        h.wx.classic_token(APP, &secret())
            .await
            .expect_err("token busy");
    assert_wx(&err, ErrorClass::Transient, Some(-1));
    h.wx.send_template(&token, &template("o-alice", &fids[1]))
        .await
        .expect("sends unaffected");

    let stats = h.get("/sim/stats").await;
    let sends = &stats["calls"]["template_send"];
    assert_eq!(sends["injected_busy"], 1);
    assert_eq!(sends["injected_http_500"], 1);
    assert_eq!(sends["dropped:ok"], 1);
    assert_eq!(sends["41029"], 1);
    assert_eq!(sends["ok"], 1);
    assert_eq!(stats["calls"]["token"]["injected_busy"], 1);
}

#[tokio::test]
async fn a_timeout_after_sending_is_ambiguous() {
    let h = start_with_timeout(config(), Duration::from_millis(300));
    let token = h.token().await;
    let fid = h
        .sim
        .mint_form_ids(APP, "o-alice", 1)
        .expect("fid")
        .remove(0);
    h.sim
        .set_faults(send_faults(FaultSet {
            latency_ms: Some(Latency::Fixed(1000)),
            ..FaultSet::default()
        }))
        .expect("faults");
    let err =
        h.wx.send_template(&token, &template("o-alice", &fid))
            .await
            .expect_err("timeout");
    assert_wx(&err, ErrorClass::Ambiguous, None);
    assert_eq!(h.sim.deliveries().len(), 1, "processed before the latency");
}

#[tokio::test]
async fn nothing_listening_is_transient() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let wx =
        WechatClient::new(&base, Duration::from_secs(1), Duration::from_secs(2)).expect("client");
    let err = wx
        .send_template(&Secret::new("t".repeat(64)), &template("o", "f"))
        .await
        .expect_err("refused");
    assert_wx(&err, ErrorClass::Transient, None);
}

#[tokio::test]
async fn daily_send_limit_answers_45009_until_reset() {
    let h = start(config());
    let token = h.token().await;
    let fids = h.sim.mint_form_ids(APP, "o-alice", 2).expect("fids");
    h.control("/sim/faults", json!({"daily_send_limit": 1}))
        .await;
    h.wx.send_template(&token, &template("o-alice", &fids[0]))
        .await
        .expect("first");
    let err =
        h.wx.send_template(&token, &template("o-alice", &fids[1]))
            .await
            .expect_err("limit");
    assert_wx(&err, ErrorClass::Limit, Some(45009));
    h.control("/sim/reset-limits", json!({})).await;
    h.wx.send_template(&token, &template("o-alice", &fids[1]))
        .await
        .expect("after reset");
    assert_eq!(h.sim.deliveries().len(), 2);
}

#[tokio::test]
async fn invalidated_tokens_answer_40001_and_bad_control_calls_are_json_errors() {
    let h = start(config());
    let token = h.token().await;
    let n = h
        .control("/sim/tokens/invalidate", json!({"appid": APP}))
        .await;
    assert_eq!(n["invalidated"], 1);
    assert_eq!(h.probe(&token).await, Some(40001));

    let resp = reqwest::Client::new()
        .post(format!("{}/sim/codes", h.base))
        .json(&json!({"appid": "wxnope", "openid": "o"}))
        .send()
        .await
        .expect("call");
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "unknown_app");

    let resp = reqwest::Client::new()
        .post(format!("{}/sim/faults", h.base))
        .json(&json!({"send": {"busy": 2.0}}))
        .send()
        .await
        .expect("call");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn concurrent_sends_to_one_user_answer_43108_when_enabled() {
    let h = start(config());
    let token = h.token().await;
    let fids = h.sim.mint_form_ids(APP, "o-alice", 3).expect("fids");
    h.control(
        "/sim/faults",
        json!({"reject_concurrent_sends": true, "send": {"latency_ms": 500}}),
    )
    .await;
    let (first, second) = (template("o-alice", &fids[0]), template("o-alice", &fids[1]));
    let (a, b) = tokio::join!(
        h.wx.send_template(&token, &first),
        h.wx.send_template(&token, &second),
    );
    let mut outcomes = [a.map_err(|e| e.errcode), b.map_err(|e| e.errcode)];
    outcomes.sort();
    assert_eq!(outcomes, [Ok(()), Err(Some(43108))]);
    assert_eq!(h.sim.deliveries().len(), 1);
    // Once the first answer is written the user can be sent to again.
    h.wx.send_template(&token, &template("o-alice", &fids[2]))
        .await
        .expect("sequential send");
}

/// getPrivateTemplateList lists the configured templates, as WeChat's example answer
/// is shaped (WECHAT.md §7), and a subscribe send of a listed template with a key its
/// content does not name is 47003 naming the key, grant untouched.
#[tokio::test]
async fn the_template_list_and_its_keys() {
    let listed = crate::helpers::PrivateTemplate {
        pri_tmpl_id: "TPL_SHIPPED".into(),
        title: "发货通知".into(),
        content: "物品名称:{{thing1.DATA}}\n发货时间:{{time2.DATA}}\n".into(),
        example: String::new(),
        kind: 2,
    };
    let h = start(SimConfig {
        subscription_templates: vec![listed.clone()],
        ..config()
    });
    let token = h.token().await;
    assert_eq!(
        h.wx.private_templates(&token).await.expect("list"),
        [listed]
    );
    let raw = get_json(
        &reqwest::Client::new(),
        &format!(
            "{}/wxaapi/newtmpl/gettemplate?access_token={}",
            h.base,
            token.expose()
        ),
        None,
    )
    .await;
    assert_eq!(raw["data"][0]["priTmplId"], "TPL_SHIPPED", "{raw}");
    let err =
        h.wx.private_templates(&Secret::new("not-a-token"))
            .await
            .expect_err("bad token");
    assert_eq!(err.errcode, Some(40014));

    h.sim.mint_form_ids(APP, "o-alice", 1).expect("known user");
    h.control(
        "/sim/subscriptions",
        json!({"appid": APP, "openid": "o-alice", "template_id": "TPL_SHIPPED"}),
    )
    .await;
    // `subscribe()` sends thing1 and date2: date2 is not a key of the listed template.
    let err =
        h.wx.send_subscribe(&token, &subscribe("o-alice", "已发货"))
            .await
            .expect_err("date2");
    assert_wx(&err, ErrorClass::Caller, Some(47003));
    assert!(err.message.contains("data.date2.value"), "{err}");
    let mut ok = subscribe("o-alice", "已发货");
    ok.data = data(&[("thing1", "已发货"), ("time2", "15:01")]);
    assert!(h
        .wx
        .send_subscribe(&token, &ok)
        .await
        .expect("its own keys")
        .is_some());
}
