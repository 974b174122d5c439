//! Abuse: rate limits, hostile values, the role × endpoint matrix of SECURITY.md,
//! what a client can make the service keep (metric series, log lines), and who
//! else on the machine can read the SQLite file.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    self, backend_app_tests, counter, Application, StartupError, TestApp, APP, KEY_ADMIN, KEY_ALL,
    KEY_SEND, KEY_TOKEN,
};

fn code(body: &Value) -> Option<&str> {
    body["error"]["code"].as_str()
}

const OTHER_APP: &str = "wxtestapp0000002";
const KEY_SHOP: &str = "key-shop-scoped-00001";
const KEY_OTHER: &str = "key-other-scoped-0001";

/// Two apps; `shop` acts on APP only, `other` on OTHER_APP only (every role each).
async fn two_scoped_apps(tdb: helpers::TestDb) -> TestApp {
    TestApp::spawn_with(tdb, |s| {
        s.apps.push(helpers::App {
            app_id: OTHER_APP.into(),
            secret: helpers::Secret::new("other-secret"),
        });
        let scoped = |name: &str, key: &str, app: &str| helpers::ApiKey {
            name: name.into(),
            roles: vec![
                helpers::Role::Send,
                helpers::Role::Admin,
                helpers::Role::Token,
            ],
            key: helpers::Secret::new(key),
            apps: helpers::AppScope::Only(vec![app.into()]),
        };
        s.api_keys.push(scoped("shop", KEY_SHOP, APP));
        s.api_keys.push(scoped("other", KEY_OTHER, OTHER_APP));
        s.webhooks.allow_private = true;
    })
    .await
}

backend_app_tests! {
    /// Contract v2, "App scope of API keys": a key limited to apps is 403 on every
    /// endpoint naming another app, 404 on another app's message, and its lists show
    /// only its apps; message ids reveal nothing about other apps' traffic.
    async fn a_key_acts_only_on_its_apps(tdb) {
        let app = two_scoped_apps(tdb).await;
        let msg = |app_id: &str| json!({"app_id": app_id, "openid": "o1", "template_id": "T"});
        let (status, theirs) = app.post("/v1/messages", Some(KEY_OTHER), &msg(OTHER_APP)).await;
        assert_eq!(status, 202, "{theirs}");
        let (status, mine) = app.post("/v1/messages", Some(KEY_SHOP), &msg(APP)).await;
        assert_eq!(status, 202, "{mine}");
        let (theirs, mine) = (theirs["id"].as_str().unwrap(), mine["id"].as_str().unwrap());
        // Another app's message does not exist for this key; its own does; a key of
        // every app sees both.
        let (status, body) = app.get(&format!("/v1/messages/{theirs}"), Some(KEY_SHOP)).await;
        assert_eq!((status, code(&body)), (404, Some("not_found")), "{body}");
        assert_eq!(app.get(&format!("/v1/messages/{mine}"), Some(KEY_SHOP)).await.0, 200);
        assert_eq!(app.get(&format!("/v1/messages/{theirs}"), Some(KEY_ALL)).await.0, 200);
        // Every endpoint naming the other app: 403, and nothing stored.
        let forbidden = [
            ("POST", "/v1/messages".to_string(), msg(OTHER_APP)),
            ("POST", "/v1/credentials".into(), json!({"app_id": OTHER_APP, "openid": "o1", "kind": "form_id", "value": "v-other"})),
            ("POST", "/v1/credentials".into(), json!({"credentials": [
                {"app_id": APP, "openid": "o1", "kind": "form_id", "value": "v-mine"},
                {"app_id": OTHER_APP, "openid": "o1", "kind": "form_id", "value": "v-other"}]})),
            ("GET", format!("/v1/admin/users/o1/quota?app_id={OTHER_APP}"), Value::Null),
            ("GET", format!("/v1/admin/users/o1/messages?app_id={OTHER_APP}"), Value::Null),
            ("GET", format!("/v1/admin/users?app_id={OTHER_APP}"), Value::Null),
            ("GET", format!("/v1/admin/stats?app_id={OTHER_APP}"), Value::Null),
            ("GET", format!("/v1/apps/{OTHER_APP}/access-token"), Value::Null),
            ("POST", format!("/v1/apps/{OTHER_APP}/access-token/refresh"), json!({"stale_token": "x"})),
        ];
        let stored = app.credential_count();
        for (method, path, body) in forbidden {
            let (status, res) = match method {
                "POST" => app.post(&path, Some(KEY_SHOP), &body).await,
                _ => app.get(&path, Some(KEY_SHOP)).await,
            };
            assert_eq!((status, code(&res)), (403, Some("forbidden")), "{method} {path}: {res}");
        }
        assert_eq!(app.credential_count(), stored, "a refused batch stored nothing, not even its own app's part");
        let (_, page) = app.get(&format!("/v1/admin/users/o1/messages?app_id={OTHER_APP}"), Some(KEY_OTHER)).await;
        assert_eq!(page["messages"].as_array().map(Vec::len), Some(1), "the refused message was not stored: {page}");
        // The same requests for its own app pass.
        assert_eq!(app.get(&format!("/v1/admin/stats?app_id={APP}"), Some(KEY_SHOP)).await.0, 200);
        assert_eq!(app.get(&format!("/v1/apps/{APP}/access-token"), Some(KEY_SHOP)).await.0, 200);
        // Lists show only its apps.
        let (_, apps) = app.get("/v1/admin/apps", Some(KEY_SHOP)).await;
        let listed: Vec<&str> = apps["apps"].as_array().unwrap().iter().map(|a| a["app_id"].as_str().unwrap()).collect();
        assert_eq!(listed, [APP]);
        let (_, apps) = app.get("/v1/admin/apps", Some(KEY_ALL)).await;
        assert_eq!(apps["apps"].as_array().unwrap().len(), 2);
        // Campaigns: another app's is 404 for every route, and not listed; naming
        // another app in a new one is 403 and stores nothing.
        let cmp = |app_id: &str| json!({"app_id": app_id, "template_id": "T", "audience": {"openids": ["o1"]}, "send_at": (chrono::Utc::now() + chrono::TimeDelta::days(1)).to_rfc3339()});
        let (status, theirs_cmp) = app.post("/v1/campaigns", Some(KEY_OTHER), &cmp(OTHER_APP)).await;
        assert_eq!(status, 202, "{theirs_cmp}");
        let theirs_cmp = theirs_cmp["id"].as_str().unwrap();
        let (status, res) = app.post("/v1/campaigns", Some(KEY_SHOP), &cmp(OTHER_APP)).await;
        assert_eq!((status, code(&res)), (403, Some("forbidden")), "{res}");
        for path in [format!("/v1/campaigns/{theirs_cmp}"), format!("/v1/messages?campaign_id={theirs_cmp}")] {
            let (status, res) = app.get(&path, Some(KEY_SHOP)).await;
            assert_eq!((status, code(&res)), (404, Some("not_found")), "{path}: {res}");
        }
        let (status, res) = app.post(&format!("/v1/campaigns/{theirs_cmp}/cancel"), Some(KEY_SHOP), &json!({})).await;
        assert_eq!((status, code(&res)), (404, Some("not_found")), "{res}");
        let (_, page) = app.get("/v1/campaigns", Some(KEY_SHOP)).await;
        assert_eq!(page["campaigns"].as_array().map(Vec::len), Some(0), "{page}");
        let (_, page) = app.get("/v1/campaigns", Some(KEY_ALL)).await;
        assert_eq!(page["campaigns"].as_array().map(Vec::len), Some(1), "{page}");
        assert_eq!(app.get(&format!("/v1/campaigns/{theirs_cmp}"), Some(KEY_OTHER)).await.1["status"], "scheduled");
        // Ids: "msg_" and 32 hex digits, not a sequence a key could count others by.
        for id in [mine, theirs] {
            assert!(id.len() == 36 && id.starts_with("msg_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        // Numbers, the old sequential ids, find nothing, even for a key of every app.
        let (status, _) = app.get("/v1/messages/1", Some(KEY_ALL)).await;
        assert_eq!(status, 404);
        // Webhooks: a scoped key's webhook hears its apps only; it cannot name another
        // app, see or change a webhook of every app.
        let put = |key: &'static str, name: &'static str, body: Value| {
            let req = app.http.put(app.url(&format!("/v1/admin/webhooks/{name}"))).bearer_auth(key).json(&body);
            async move { helpers::read(req.send().await.unwrap()).await }
        };
        let hook = |apps: Option<&str>| {
            let mut body = json!({"url": "http://127.0.0.1:9/hook", "events": ["message.finished"]});
            if let Some(app_id) = apps {
                body["app_ids"] = json!([app_id]);
            }
            body
        };
        let (status, body) = put(KEY_SHOP, "shop-hook", hook(None)).await;
        assert_eq!((status, body["app_ids"].clone()), (200, json!([APP])), "{body}");
        let (status, body) = put(KEY_SHOP, "sneaky", hook(Some(OTHER_APP))).await;
        assert_eq!((status, code(&body)), (403, Some("forbidden")), "{body}");
        assert_eq!(put(KEY_ALL, "everything", hook(None)).await.0, 200);
        let (status, body) = put(KEY_SHOP, "everything", hook(Some(APP))).await;
        assert_eq!((status, code(&body)), (403, Some("forbidden")), "an all-apps webhook is not the shop's to take over: {body}");
        let (_, list) = app.get("/v1/admin/webhooks", Some(KEY_SHOP)).await;
        let names: Vec<&str> = list["webhooks"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["shop-hook"], "{list}");
        let (status, _) = app.get("/v1/admin/webhooks/everything/deliveries", Some(KEY_SHOP)).await;
        assert_eq!(status, 404);
        let res = app.http.delete(app.url("/v1/admin/webhooks/everything")).bearer_auth(KEY_SHOP).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 404);
        let (_, list) = app.get("/v1/admin/webhooks", Some(KEY_ALL)).await;
        assert_eq!(list["webhooks"].as_array().unwrap().len(), 2, "{list}");
    }

    async fn clients_and_keys_are_rate_limited(tdb) {
        let app = TestApp::spawn_with(tdb, |s| {
            s.limits.per_session_per_minute = 3;
            s.limits.per_ip_per_minute = 7;
            s.limits.per_key_per_second = 2;
        })
        .await;
        let alice = app.login("alice").await;
        for i in 0..3 {
            let (status, _) = app.post("/v1/client/credentials", Some(&alice), &json!({"form_ids": [format!("a{i}")]})).await;
            assert_eq!(status, 200);
        }
        let res = app.http.post(app.url("/v1/client/credentials")).bearer_auth(&alice).json(&json!({"form_ids": ["a9"]})).send().await.unwrap();
        assert!(res.headers().get("retry-after").is_some());
        let (status, body) = helpers::read(res).await;
        assert_eq!((status, code(&body)), (429, Some("rate_limited")), "{body}");
        // Another user's session has its own bucket (the IP allows 7 a minute:
        // alice's login and 4 reports, bob's login and one report).
        let bob = app.login("bob").await;
        let (status, _) = app.post("/v1/client/credentials", Some(&bob), &json!({"form_ids": ["b1"]})).await;
        assert_eq!(status, 200);
        // The IP is spent now: logins from it are refused too.
        let code_c = app.sim.sim.mint_code(APP, "carol").unwrap();
        let (status, body) = app.post("/v1/client/session", None, &json!({"code": code_c})).await;
        assert_eq!((status, code(&body)), (429, Some("rate_limited")), "{body}");
        // Per key: a burst of 2 a second.
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(app.get("/v1/admin/stats", Some(KEY_ADMIN)).await.0);
        }
        assert_eq!(&statuses[..2], &[200, 200]);
        assert!(statuses[2..].contains(&429), "{statuses:?}");
        // Another key is not affected.
        assert_eq!(app.get("/v1/admin/stats", Some(KEY_ALL)).await.0, 200);
        assert_eq!(app.credential_count(), 4, "refused reports stored nothing");
    }

    /// Guessing keys (or sessions) from one address: its failures are limited, and
    /// once they are spent even a right key is refused there — a 200 among the
    /// 429s would go on answering the guesses. Other addresses are not affected.
    async fn failed_authentication_is_limited_per_address(tdb) {
        let app = TestApp::spawn_with(tdb, |s| s.limits.auth_failures_per_minute = 3).await;
        let wrong = "not-a-key-0123456789";
        // A key without the role is not a guess: it spends nothing.
        for _ in 0..5 {
            assert_eq!(app.get("/v1/admin/stats", Some(KEY_SEND)).await.0, 403);
        }
        for _ in 0..2 {
            let (status, body) = app.get("/v1/admin/stats", Some(wrong)).await;
            assert_eq!((status, code(&body)), (401, Some("unauthorized")), "{body}");
        }
        // A forged session is a failure of the same address.
        let (status, _) = app.post("/v1/client/credentials", Some("v1.forged.session"), &json!({})).await;
        assert_eq!(status, 401);
        // Three failures spent: the next attempt is not judged, right key or wrong.
        let res = app.http.get(app.url("/v1/admin/stats")).bearer_auth(wrong).send().await.unwrap();
        let retry_after: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=20).contains(&retry_after), "{retry_after}");
        let (status, body) = helpers::read(res).await;
        assert_eq!((status, code(&body)), (429, Some("rate_limited")), "{body}");
        let (status, body) = app.get("/v1/admin/stats", Some(KEY_ADMIN)).await;
        assert_eq!((status, code(&body)), (429, Some("rate_limited")), "{body}");
        let session = app.login("u").await; // logging in presents nothing to guess
        assert_eq!(app.post("/v1/client/credentials", Some(&session), &json!({})).await.0, 429);
        // Another address has its own budget.
        let elsewhere = reqwest::Client::builder()
            .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
            .build()
            .unwrap();
        let res = elsewhere.get(app.url("/v1/admin/stats")).bearer_auth(KEY_ADMIN).send().await.unwrap();
        assert_eq!(res.status(), 200);
        // Counted: what was judged wrong, and what was refused unjudged.
        let series = |credential: &str, answer: &str| format!(r#"ledger_auth_failures_total{{answer="{answer}",credential="{credential}"}}"#);
        assert_eq!(counter(&app, &series("api_key", "unauthorized")).await, 2);
        assert_eq!(counter(&app, &series("session", "unauthorized")).await, 1);
        assert_eq!(counter(&app, &series("api_key", "rate_limited")).await, 2);
        assert_eq!(counter(&app, &series("session", "rate_limited")).await, 1);
    }

    /// `?wait` requests waiting at once are capped per key: past the cap 429 before
    /// anything is stored; other keys, and requests that do not wait, are not affected;
    /// the places come back when the waiters are answered.
    async fn waiting_requests_are_capped_per_key(tdb) {
        let app = TestApp::spawn_with(tdb, |s| s.limits.max_waiters_per_key = 2).await;
        // u holds no credential: its messages wait for one (await_credential_s).
        let waiting = json!({"openid": "u", "template_id": "TPL", "await_credential_s": 600});
        let held: Vec<_> = (0..2)
            .map(|_| {
                let req = app.http.post(app.url("/v1/messages?wait=30")).bearer_auth(KEY_SEND).json(&waiting).send();
                actix_web::rt::spawn(async move { helpers::read(req.await.unwrap()).await })
            })
            .collect();
        let stored = |n: usize| {
            let app = &app;
            async move {
                let (_, page) = app.get("/v1/admin/users/u/messages", Some(KEY_ADMIN)).await;
                page["messages"].as_array().map(Vec::len) == Some(n)
            }
        };
        // A place is taken before a message is stored: two stored, two places held.
        assert!(helpers::eventually(Duration::from_secs(10), || stored(2)).await);
        let res = app.http.post(app.url("/v1/messages?wait=5")).bearer_auth(KEY_SEND).json(&waiting).send().await.unwrap();
        assert!(res.headers().get("retry-after").is_some());
        let (status, body) = helpers::read(res).await;
        assert_eq!((status, code(&body)), (429, Some("rate_limited")), "{body}");
        assert!(stored(2).await, "the refused request stored nothing");
        // Without ?wait nothing waits; another key has places of its own.
        let quick = json!({"openid": "w", "template_id": "TPL"});
        assert_eq!(app.post("/v1/messages", Some(KEY_SEND), &quick).await.0, 202);
        let (status, body) = app.post("/v1/messages?wait=30", Some(KEY_ALL), &quick).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("no_quota")), "{body}");
        // Credentials arrive (whether or not the sender has looked yet: a report
        // between its look and its "wait" still wakes the message): both waiters are
        // answered with their final status…
        let forms: Vec<Value> = app.sim.sim.mint_form_ids(APP, "u", 2).unwrap().into_iter()
            .map(|v| json!({"openid": "u", "kind": "form_id", "value": v}))
            .collect();
        let (status, body) = app.post("/v1/credentials", Some(KEY_SEND), &json!({"credentials": forms})).await;
        assert_eq!((status, body["accepted"].as_u64()), (200, Some(2)), "{body}");
        for h in held {
            let (status, body) = h.await.unwrap();
            assert_eq!((status, body["status"].as_str()), (200, Some("sent")), "{body}");
        }
        // …and their places are free again.
        let (status, body) = app.post("/v1/messages?wait=30", Some(KEY_SEND), &quick).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("no_quota")), "{body}");
    }

    async fn hostile_values_are_refused_or_stored_verbatim(tdb) {
        let app = TestApp::spawn(tdb).await;
        // Header injection and control characters in an openid or template id.
        for openid in ["a\r\nX-Injected: 1", "tab\tbed", "nul\u{0}"] {
            let (status, res) = app.post("/v1/credentials", Some(KEY_SEND), &json!({"openid": openid, "kind": "form_id", "value": "v"})).await;
            assert_eq!((status, code(&res)), (400, Some("invalid_request")), "{openid:?}");
            let (status, res) = app.post("/v1/messages", Some(KEY_SEND), &json!({"openid": "u", "template_id": openid})).await;
            assert_eq!((status, code(&res)), (400, Some("invalid_request")), "{openid:?}");
        }
        let (status, _) = app.get("/v1/admin/users/a%0d%0aX-Injected:%201/quota", Some(KEY_ADMIN)).await;
        assert_eq!(status, 400);
        // SQL-looking values are data: stored verbatim, harmless.
        let sql_openid = "x');DELETE/**/FROM/**/credentials;--";
        let sql_value = "'OR'1'='1";
        let (status, res) = app.post("/v1/credentials", Some(KEY_SEND), &json!({"openid": sql_openid, "kind": "form_id", "value": sql_value})).await;
        assert_eq!((status, res["accepted"].as_u64()), (200, Some(1)), "{res}");
        let path = format!("/v1/admin/users/{}/quota", sql_openid.replace('/', "%2F").replace(';', "%3B"));
        let (status, q) = app.get(&path, Some(KEY_ADMIN)).await;
        assert_eq!((status, q["openid"].as_str(), q["sendable"].as_u64()), (200, Some(sql_openid), Some(1)), "{q}");
        let (_, page) = app.get("/v1/admin/users", Some(KEY_ADMIN)).await;
        assert_eq!(page["users"][0]["openid"], sql_openid);
        assert_eq!(app.credential_count(), 1);
        // A huge array of tiny items is refused whole, not truncated.
        let many: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
        let session = app.login("u").await;
        let (status, res) = app.post("/v1/client/credentials", Some(&session), &json!({"form_ids": many})).await;
        assert_eq!((status, code(&res)), (400, Some("invalid_request")));
        assert_eq!(app.credential_count(), 1);
    }
}

/// A client whose requests come from 127.0.0.`n`.
fn client_from(n: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
        .build()
        .unwrap()
}

/// One login of `openid` with a fresh code through `http`, with `X-Forwarded-For`
/// if given: its status and error code, and that a 429 says when to retry.
async fn try_login(
    app: &TestApp,
    http: &reqwest::Client,
    openid: &str,
    forwarded_for: Option<&str>,
) -> (u16, Option<String>) {
    let wx_code = app.sim.sim.mint_code(APP, openid).unwrap();
    let mut req = http
        .post(app.url("/v1/client/session"))
        .json(&json!({"code": wx_code}));
    if let Some(xff) = forwarded_for {
        req = req.header("x-forwarded-for", xff);
    }
    let res = req.send().await.unwrap();
    if res.status() == 429 {
        assert!(
            res.headers().get("retry-after").is_some(),
            "429 without Retry-After"
        );
    }
    let (status, body) = helpers::read(res).await;
    (status, code(&body).map(String::from))
}

/// The calls WeChat (the simulator) received at `jscode2session`, whatever it answered.
fn jscode2session_calls(app: &TestApp) -> u64 {
    app.sim
        .sim
        .stats()
        .calls
        .get("jscode2session")
        .map_or(0, |by_outcome| by_outcome.values().sum())
}

fn refused() -> (u16, Option<String>) {
    (429, Some("rate_limited".into()))
}

/// A flood of logins from one address: past its bound 429 and WeChat is not called;
/// a forged `X-Forwarded-For` (the peer is no trusted proxy) does not escape it, and
/// another address has its own bound.
#[actix_web::test]
async fn logins_are_bounded_per_address_before_wechat() {
    let app = TestApp::spawn_with(helpers::TestDb::sqlite(), |s| {
        s.limits.login_per_ip_per_minute = 3;
        s.limits.login_per_app_per_second = 0;
    })
    .await;
    let here = client_from(1);
    for i in 0..3 {
        assert_eq!(
            try_login(&app, &here, &format!("u{i}"), None).await,
            (200, None)
        );
    }
    for i in 0..10 {
        let forged = format!("198.51.100.{i}");
        let xff = (i % 2 == 0).then_some(forged.as_str());
        assert_eq!(
            try_login(&app, &here, &format!("f{i}"), xff).await,
            refused(),
            "{i}"
        );
    }
    assert_eq!(
        jscode2session_calls(&app),
        3,
        "no refused login reached WeChat"
    );
    assert_eq!(
        try_login(&app, &client_from(2), "elsewhere", None).await,
        (200, None)
    );
    assert_eq!(jscode2session_calls(&app), 4);
}

/// Logins from many addresses are bounded per app in all. A per-second bound refills
/// as the test runs: WeChat may have seen one more call per whole second elapsed,
/// never more, and every other login was refused without a call.
#[actix_web::test]
async fn logins_are_bounded_in_all_from_any_number_of_addresses() {
    let app = TestApp::spawn_with(helpers::TestDb::sqlite(), |s| {
        s.limits.login_per_ip_per_minute = 0;
        s.limits.login_per_app_per_second = 1;
    })
    .await;
    let started = std::time::Instant::now();
    let mut answers = Vec::new();
    for n in 2..=5 {
        let http = client_from(n);
        for i in 0..4 {
            answers.push(try_login(&app, &http, &format!("u{n}-{i}"), None).await);
        }
    }
    let bound = 1 + started.elapsed().as_secs();
    let calls = jscode2session_calls(&app);
    let ok = answers.iter().filter(|a| a.0 == 200).count() as u64;
    assert!(
        calls <= bound,
        "{calls} calls to WeChat, at most {bound} allowed"
    );
    assert_eq!(ok, calls, "{answers:?}");
    assert!(
        answers.iter().all(|a| *a == (200, None) || *a == refused()),
        "{answers:?}"
    );
}

/// Behind a trusted proxy (127.0.0.1 here) the right-most `X-Forwarded-For` entry
/// that is no trusted proxy is the client: two clients there have separate login and
/// failed-authentication budgets, and what a client writes into the header itself
/// (left of the proxy's entry) changes nothing. From an untrusted peer (127.0.0.2)
/// the header is ignored.
#[actix_web::test]
async fn forwarded_for_names_the_client_only_from_a_trusted_proxy() {
    let app = TestApp::spawn_with(helpers::TestDb::sqlite(), |s| {
        s.limits.login_per_ip_per_minute = 2;
        s.limits.login_per_app_per_second = 0;
        s.limits.auth_failures_per_minute = 1;
        s.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let proxy = client_from(1);
    for client in ["198.51.100.1", "198.51.100.2"] {
        for i in 0..2 {
            assert_eq!(
                try_login(&app, &proxy, &format!("{client}-{i}"), Some(client)).await,
                (200, None)
            );
        }
        assert_eq!(
            try_login(&app, &proxy, "again", Some(client)).await,
            refused(),
            "{client}"
        );
        // The client's own entry sits left of the one the proxy appended.
        let forged = format!("203.0.113.77, {client}");
        assert_eq!(
            try_login(&app, &proxy, "forged", Some(&forged)).await,
            refused(),
            "{forged}"
        );
    }
    // From an untrusted peer every header names the peer itself.
    let direct = client_from(2);
    for i in 0..2 {
        assert_eq!(
            try_login(
                &app,
                &direct,
                &format!("d{i}"),
                Some(&format!("198.51.100.{}", 10 + i))
            )
            .await,
            (200, None)
        );
    }
    assert_eq!(
        try_login(&app, &direct, "d9", Some("198.51.100.99")).await,
        refused()
    );
    assert_eq!(jscode2session_calls(&app), 6);
    // The failed-authentication limit keys on the same address.
    let wrong_key = |client: &'static str| {
        proxy
            .get(app.url("/v1/admin/stats"))
            .bearer_auth("not-a-key-0123456789")
            .header("x-forwarded-for", client)
            .send()
    };
    assert_eq!(wrong_key("198.51.100.1").await.unwrap().status(), 401);
    assert_eq!(wrong_key("198.51.100.1").await.unwrap().status(), 429);
    assert_eq!(wrong_key("198.51.100.2").await.unwrap().status(), 401);
}

/// The role × endpoint matrix of SECURITY.md, walked: each cell is the status a
/// key with that one role gets (200/202 or 403), and a client session gets 401
/// everywhere a key is required.
#[actix_web::test]
async fn roles_by_endpoint_matrix() {
    // Its sessions at key endpoints and keys at the client endpoint are 16 failed
    // authentications from one address: more than the default allows a minute.
    let app = TestApp::spawn_with(helpers::TestDb::sqlite(), |s| {
        s.limits.auth_failures_per_minute = 0;
    })
    .await;
    let session = app.login("o1").await;
    let (_, message) = app
        .post(
            "/v1/messages",
            Some(KEY_SEND),
            &json!({"openid": "o1", "template_id": "T"}),
        )
        .await;
    let message = format!("/v1/messages/{}", message["id"].as_str().unwrap());
    let later = (chrono::Utc::now() + chrono::TimeDelta::days(1)).to_rfc3339();
    let new_campaign =
        json!({"template_id": "T", "audience": {"openids": ["o1"]}, "send_at": later});
    let (_, campaign) = app
        .post("/v1/campaigns", Some(KEY_SEND), &new_campaign)
        .await;
    let campaign = campaign["id"].as_str().unwrap().to_string();
    // (method, path, body, which roles pass)
    let rows: Vec<(&str, String, Value, &str)> = vec![
        (
            "POST",
            "/v1/credentials".into(),
            json!({"openid": "o1", "kind": "form_id", "value": "m1"}),
            "send",
        ),
        (
            "POST",
            "/v1/messages".into(),
            json!({"openid": "o1", "template_id": "T"}),
            "send",
        ),
        ("GET", message, Value::Null, "send"),
        ("POST", "/v1/campaigns".into(), new_campaign, "send"),
        ("GET", "/v1/campaigns".into(), Value::Null, "send+admin"),
        (
            "GET",
            format!("/v1/campaigns/{campaign}"),
            Value::Null,
            "send+admin",
        ),
        (
            "GET",
            format!("/v1/messages?campaign_id={campaign}"),
            Value::Null,
            "send+admin",
        ),
        (
            "POST",
            format!("/v1/campaigns/{campaign}/pause"),
            json!({}),
            "send+admin",
        ),
        (
            "GET",
            "/v1/admin/users/o1/quota".into(),
            Value::Null,
            "admin",
        ),
        (
            "GET",
            "/v1/admin/users/o1/messages".into(),
            Value::Null,
            "admin",
        ),
        ("GET", "/v1/admin/users".into(), Value::Null, "admin"),
        ("GET", "/v1/admin/stats".into(), Value::Null, "admin"),
        ("GET", "/v1/admin/apps".into(), Value::Null, "admin"),
        (
            "GET",
            "/v1/admin/subscription-templates".into(),
            Value::Null,
            "admin",
        ),
        (
            "PUT",
            "/v1/admin/subscription-templates/T".into(),
            Value::Null,
            "admin",
        ),
        ("GET", "/v1/admin/webhooks".into(), Value::Null, "admin"),
        (
            "GET",
            format!("/v1/apps/{APP}/access-token"),
            Value::Null,
            "token",
        ),
        (
            "POST",
            format!("/v1/apps/{APP}/access-token/refresh"),
            json!({"stale_token": "x"}),
            "token",
        ),
    ];
    for (method, path, body, role) in rows {
        for (key_role, key) in [
            ("send", KEY_SEND),
            ("admin", KEY_ADMIN),
            ("token", KEY_TOKEN),
        ] {
            let req = match method {
                "POST" => app.http.post(app.url(&path)).json(&body),
                "PUT" => app.http.put(app.url(&path)),
                _ => app.http.get(app.url(&path)),
            };
            let status = req.bearer_auth(key).send().await.unwrap().status().as_u16();
            if role.split('+').any(|r| r == key_role) {
                assert!(
                    [200, 202].contains(&status),
                    "{method} {path} with {key_role}: {status}"
                );
            } else {
                assert_eq!(status, 403, "{method} {path} with {key_role}");
            }
        }
        let req = match method {
            "POST" => app.http.post(app.url(&path)).json(&body),
            "PUT" => app.http.put(app.url(&path)),
            _ => app.http.get(app.url(&path)),
        };
        assert_eq!(
            req.bearer_auth(&session)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            401,
            "{method} {path} with a session"
        );
    }
    // The client endpoints take a session, never a key.
    for key in [KEY_SEND, KEY_ADMIN, KEY_TOKEN, KEY_ALL] {
        let (status, _) = app
            .post("/v1/client/credentials", Some(key), &json!({}))
            .await;
        assert_eq!(status, 401);
    }
    let (status, _) = app
        .post("/v1/client/credentials", Some(&session), &json!({}))
        .await;
    assert_eq!(status, 200);
}

/// The text of `/metrics` at `base`.
async fn metrics_text(app: &TestApp, base: &str) -> (u16, String) {
    let res = app
        .http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

/// Invented methods and paths cannot create metric series: the method label is
/// `other`, the route label a pattern or `unmatched`, never what the client sent.
#[actix_web::test]
async fn invented_methods_and_paths_do_not_become_metric_labels() {
    let app = TestApp::spawn(helpers::TestDb::sqlite()).await;
    for (method, path) in [
        ("FOO", "/healthz"),
        ("FOO", "/v1/invented-path-4711"),
        ("BAR", "/v1/admin/users/o-4711/quota"),
        ("GET", "/v1/invented-path-4712?x=4713"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = app
            .http
            .request(method, app.url(path))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_client_error(), "{path}: {}", res.status());
    }
    let (status, text) = metrics_text(&app, &app.base).await;
    assert_eq!(status, 200);
    for line in [
        r#"ledger_http_requests_total{method="other",route="/healthz",status="405"} 1"#,
        r#"ledger_http_requests_total{method="other",route="unmatched",status="404"} 1"#,
        r#"ledger_http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // Only the label sets: a value such as a duration sum may hold "4711" by chance.
    let labels: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some(&l[l.find('{')?..=l.rfind('}')?]))
        .collect();
    assert!(!labels.is_empty(), "no labelled series in\n{text}");
    for raw in ["FOO", "BAR", "4711", "4712", "4713", "invented"] {
        let hit = labels.iter().find(|l| l.contains(raw));
        assert!(hit.is_none(), "{raw:?} became a label in {hit:?}");
    }
}

/// With `LEDGER_METRICS_BIND`, `/metrics` answers on that address (and nothing
/// else does), and no longer on the public one.
#[actix_web::test]
async fn metrics_bind_moves_metrics_off_the_public_address() {
    let app = TestApp::spawn_with(helpers::TestDb::sqlite(), |s| {
        s.metrics_bind = Some("127.0.0.1:0".into());
    })
    .await;
    let metrics = app.metrics_base.clone().expect("a metrics address");
    assert_eq!(app.get("/healthz", None).await.0, 200);
    let (status, text) = metrics_text(&app, &metrics).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains(r#"route="/healthz""#),
        "the public server's requests are counted:\n{text}"
    );
    let (status, body) = app.get("/metrics", None).await;
    assert_eq!((status, code(&body)), (404, Some("not_found")), "{body}");
    let (status, body) = helpers::read(
        app.http
            .get(format!("{metrics}/v1/admin/stats"))
            .bearer_auth(KEY_ADMIN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code(&body)), (404, Some("not_found")), "{body}");
}

/// The access log's lines, captured from here on: the test binary's logger, which
/// keeps only what actix's `Logger` middleware writes.
fn access_log_lines() -> &'static Mutex<Vec<String>> {
    struct Capture(Mutex<Vec<String>>);
    impl log::Log for Capture {
        fn enabled(&self, meta: &log::Metadata) -> bool {
            meta.target().starts_with("actix_web::middleware::logger")
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                if let Ok(mut lines) = self.0.lock() {
                    lines.push(record.args().to_string());
                }
            }
        }
        fn flush(&self) {}
    }
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    let capture = CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(capture).expect("no other logger in the test binary");
        log::set_max_level(log::LevelFilter::Info);
        capture
    });
    &capture.0
}

/// The access log writes the path without its query string: `js_code`, `secret`
/// and `access_token` travel there (the sandbox calls its own simulator so).
#[actix_web::test]
async fn the_access_log_leaves_query_strings_out() {
    let lines = access_log_lines();
    let app = TestApp::spawn(helpers::TestDb::sqlite()).await;
    let path = "/readyz?js_code=CODE-4715&secret=SECRET-4715&access_token=TOKEN-4715";
    assert_eq!(app.get(path, None).await.0, 200);
    let logged = |l: &String| l.contains("GET /readyz ");
    let seen = helpers::eventually(Duration::from_secs(5), || async {
        lines.lock().unwrap().iter().any(logged)
    })
    .await;
    assert!(seen, "no access log line for /readyz");
    let lines = lines.lock().unwrap();
    for line in lines.iter().filter(|l| logged(l)) {
        assert!(line.starts_with("200 GET /readyz HTTP/1.1 "), "{line}");
        for secret in ["?", "CODE-4715", "SECRET-4715", "TOKEN-4715"] {
            assert!(!line.contains(secret), "{secret:?} logged: {line}");
        }
    }
}

/// The mode bits of a file or folder.
#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    meta.permissions().mode() & 0o777
}

/// The SQLite file holds the session secret and access_tokens: a folder the service
/// creates is 0700, the file and its -wal and -shm are 0600; a folder the operator
/// made keeps its mode, but a database file found there is made owner-only.
#[cfg(unix)]
#[test]
fn the_sqlite_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data").join("ledger");
    let file = dir.join("ledger.db");
    let db = helpers::Db::connect(&helpers::DatabaseUrl::Sqlite(file.clone()), 2).unwrap();
    db.migrate().unwrap();
    let with = |suffix: &str| dir.join(format!("ledger.db{suffix}"));
    assert!(with("-wal").exists() && with("-shm").exists(), "WAL mode");
    assert_eq!(mode(&tmp.path().join("data")), 0o700);
    assert_eq!(mode(&dir), 0o700);
    for suffix in ["", "-wal", "-shm"] {
        assert_eq!(mode(&with(suffix)), 0o600, "ledger.db{suffix}");
    }
    drop(db);

    // The operator's folder, with a database file others could read.
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = theirs.join("ledger.db");
    std::fs::copy(with(""), &file).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let db = helpers::Db::connect(&helpers::DatabaseUrl::Sqlite(file.clone()), 2).unwrap();
    db.migrate().unwrap();
    assert_eq!(mode(&theirs), 0o755, "the operator's folder is left alone");
    assert_eq!(mode(&file), 0o600);
}

/// Settings that start the sandbox (no app, no key) on `db`.
fn sandbox_settings(db: &helpers::TestDb) -> helpers::Settings {
    helpers::Settings {
        database_url: db.url(),
        db_pool_size: 2,
        ..helpers::Settings::default()
    }
}

/// With no app configured the sandbox (unauthenticated `/sim`, a generated key with
/// every role) starts only on a loopback address, unless LEDGER_SANDBOX=true forces
/// it. Binding the unspecified address sends no traffic anywhere.
#[actix_web::test]
async fn the_sandbox_does_not_start_on_a_public_address_by_accident() {
    let db = helpers::TestDb::sqlite();
    let public = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let refused = Application::build(sandbox_settings(&db), public).await;
    assert!(
        matches!(refused, Err(StartupError::SandboxNotLoopback(_))),
        "{:?}",
        refused.err()
    );
    let message = StartupError::SandboxNotLoopback([0, 0, 0, 0].into()).to_string();
    assert!(message.contains("LEDGER_APPS") && message.contains("LEDGER_SANDBOX=true"));

    let public = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let forced = helpers::Settings {
        sandbox: true,
        ..sandbox_settings(&db)
    };
    let app = Application::build(forced, public)
        .await
        .expect("forced sandbox");
    assert!(app.sandbox().is_some());

    let loopback = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = Application::build(sandbox_settings(&db), loopback)
        .await
        .expect("sandbox");
    assert!(app.sandbox().is_some());
}

backend_app_tests! {
    /// A database that holds a real app's rows is never opened in sandbox mode (a
    /// forgotten LEDGER_APPS would otherwise serve it with a printed all-role key).
    async fn the_sandbox_never_uses_a_real_apps_database(tdb) {
        let app = TestApp::spawn(tdb).await; // the real app's token row exists now
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let refused = Application::build(sandbox_settings(&app.test_db), listener).await;
        match refused {
            Err(StartupError::SandboxOnRealData(found)) => assert_eq!(found, APP),
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }
}
