//! Webhooks: the admin endpoints, every event type arriving signed at a real local
//! receiver, a receiver down then up, failed then retried by hand, the SSRF guard
//! (at registration and at delivery), two instances delivering each event once,
//! and a kill -9 of the delivering instance losing nothing.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::{
    self, backend_app_tests, counter, dispatch, eventually, free_port, schema, wait_up, webhooks,
    DatabaseUrl, Faults, Proc, Settings, TestApp, TestDb, TestSim, APP, APP_SECRET, KEY_ADMIN,
    KEY_SEND,
};

const SUB: &str = "TPL_SHIPPED";

/// What the receiver got: the raw body and the signature header.
#[derive(Debug, Clone)]
struct Got {
    body: String,
    signature: Option<String>,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

/// A webhook receiver on a local port: records every POST on arrival, waits
/// `delay_ms`, answers `status`.
#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    url: String,
}

impl Receiver {
    /// Listening on `port` (0: any free one).
    fn start(port: u16) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        let port = listener.local_addr().unwrap().port();
        let r = Receiver {
            got: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            delay_ms: Arc::default(),
            url: format!("http://127.0.0.1:{port}/hook"),
        };
        let shared = r.clone();
        let server = HttpServer::new(move || {
            let r = shared.clone();
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let r = r.clone();
                async move {
                    r.got.lock().unwrap().push(Got {
                        body: String::from_utf8_lossy(&body).into_owned(),
                        signature: req
                            .headers()
                            .get("Ledger-Signature")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string),
                    });
                    let delay = r.delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        actix_web::rt::time::sleep(Duration::from_millis(delay)).await;
                    }
                    let code = r.status.load(Ordering::SeqCst);
                    HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap())
                        .content_type("text/plain")
                        .body("received")
                }
            }))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)
        .expect("listen")
        .run();
        actix_web::rt::spawn(server);
        r
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// How many times each event id arrived.
    fn ids(&self) -> HashMap<String, usize> {
        let mut ids = HashMap::new();
        for g in self.got() {
            *ids.entry(g.json()["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        ids
    }

    async fn wait_for_ids(&self, n: usize) -> bool {
        eventually(Duration::from_secs(60), || async { self.ids().len() >= n }).await
    }
}

/// The receiver's check, written from the contract and the hmac crate alone (not
/// the service's code): `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
fn signature_valid(secret: &str, got: &Got) -> bool {
    let Some(header) = &got.signature else {
        return false;
    };
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = Some(value.to_string()),
            Some(("v1", value)) => v1 = Some(value.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{}", got.body).as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let fresh = t
        .parse::<i64>()
        .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
    expected == v1 && fresh
}

/// The test app's message push, safe mode (the keys of tests/api/push.rs).
fn push_app() -> helpers::PushApp {
    helpers::PushApp {
        app_id: APP.into(),
        token: helpers::Secret::new(crate::push::TOKEN),
        encoding_aes_key: Some(helpers::Secret::new(crate::push::KEY)),
    }
}

/// Fast retries; private addresses allowed (the receiver is on 127.0.0.1).
fn quick(s: &mut Settings) {
    s.webhooks.allow_private = true;
    s.webhooks.backoff_base = Duration::from_millis(50);
    s.webhooks.timeout = Duration::from_secs(2);
    s.send_backoff_base = Duration::from_millis(50);
    s.young_window = Duration::ZERO;
}

async fn put_webhook(app: &TestApp, name: &str, body: Value) -> (u16, Value) {
    let res = app
        .http
        .put(app.url(&format!("/v1/admin/webhooks/{name}")))
        .bearer_auth(KEY_ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    helpers::read(res).await
}

/// Registers a webhook for every event; returns its secret.
async fn register(app: &TestApp, name: &str, url: &str) -> String {
    let (status, res) = put_webhook(
        app,
        name,
        json!({"url": url, "events": ["message.finished", "message.delivery", "subscription.exhausted"]}),
    )
    .await;
    assert_eq!(status, 200, "{res}");
    res["secret"].as_str().unwrap().to_string()
}

/// `n` events queued straight into the database, as the push side will queue them.
fn enqueue(db: &helpers::Db, n: usize) -> Vec<String> {
    let mut conn = db.get().unwrap();
    (0..n)
        .map(|i| {
            webhooks::enqueue(
                &mut conn,
                APP,
                webhooks::EventType::MessageDelivery,
                &json!({"n": i}),
            )
            .unwrap()
            .expect("a webhook receives it")
        })
        .collect()
}

fn deliveries_by_status(db: &helpers::Db, status: &str) -> i64 {
    let mut conn = db.get().unwrap();
    webhooks::store::count_by_status(&mut conn, status).unwrap()
}

backend_app_tests! {
    async fn webhooks_are_managed_by_admins_and_secrets_are_shown_once(tdb) {
        let app = TestApp::spawn_with(tdb, quick).await;
        let url = "http://127.0.0.1:9/hook";
        let (status, res) = put_webhook(&app, "backend", json!({"url": url, "events": ["message.finished"]})).await;
        assert_eq!(status, 200, "{res}");
        let generated = res["secret"].as_str().unwrap().to_string();
        assert!(generated.len() >= 32, "{res}");
        assert_eq!((res["name"].as_str(), res["url"].as_str()), (Some("backend"), Some(url)));
        assert_eq!(res["events"], json!(["message.finished"]));
        assert_eq!(res["app_ids"], Value::Null);

        let given = "s".repeat(40);
        let (status, res) = put_webhook(&app, "ops.2", json!({"url": url, "events": ["subscription.exhausted"],
            "app_ids": [APP], "secret": given})).await;
        assert_eq!((status, res["secret"].as_str()), (200, Some(given.as_str())), "{res}");

        // Listing: both, and neither secret (nor the field).
        let res = app.http.get(app.url("/v1/admin/webhooks")).bearer_auth(KEY_ADMIN).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        assert!(!text.contains(&generated) && !text.contains(&given) && !text.contains("secret"), "{text}");
        let list: Value = serde_json::from_str(&text).unwrap();
        let names: Vec<&str> = list["webhooks"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["backend", "ops.2"]);
        assert_eq!(list["webhooks"][1]["app_ids"], json!([APP]));

        // Bad input: 400 invalid_request (404 unknown_app), nothing stored.
        for (name, body) in [
            ("bad name!", json!({"url": url, "events": ["message.finished"]})),
            ("x", json!({"url": url, "events": ["message.sent"]})),
            ("x", json!({"url": url, "events": []})),
            ("x", json!({"url": "ftp://example.com/", "events": ["message.finished"]})),
            ("x", json!({"url": "file:///etc/passwd", "events": ["message.finished"]})),
            ("x", json!({"url": "https://u:p@example.com/", "events": ["message.finished"]})),
            ("x", json!({"url": "not a url", "events": ["message.finished"]})),
            ("x", json!({"url": url, "events": ["message.finished"], "secret": "short"})),
            ("x", json!({"url": url, "events": ["message.finished"], "app_ids": []})),
            ("x", json!({"url": url, "events": ["message.finished"], "color": "red"})),
        ] {
            let (status, res) = put_webhook(&app, name, body.clone()).await;
            assert_eq!((status, res["error"]["code"].as_str()), (400, Some("invalid_request")), "{body}: {res}");
        }
        let (status, res) = put_webhook(&app, "x", json!({"url": url, "events": ["message.finished"], "app_ids": ["wxnope"]})).await;
        assert_eq!((status, res["error"]["code"].as_str()), (404, Some("unknown_app")), "{res}");
        // Not an admin: 403.
        let res = app.http.get(app.url("/v1/admin/webhooks")).bearer_auth(KEY_SEND).send().await.unwrap();
        assert_eq!(res.status(), 403);

        let (status, res) = app.get("/v1/admin/webhooks/backend/deliveries?status=bogus", Some(KEY_ADMIN)).await;
        assert_eq!(status, 400, "{res}");
        let (status, _) = app.get("/v1/admin/webhooks/nobody/deliveries", Some(KEY_ADMIN)).await;
        assert_eq!(status, 404);
        let res = app.http.delete(app.url("/v1/admin/webhooks/backend")).bearer_auth(KEY_ADMIN).send().await.unwrap();
        assert_eq!(res.status(), 204);
        let res = app.http.delete(app.url("/v1/admin/webhooks/backend")).bearer_auth(KEY_ADMIN).send().await.unwrap();
        assert_eq!(res.status(), 404);
        let (_, list) = app.get("/v1/admin/webhooks", Some(KEY_ADMIN)).await;
        assert_eq!(list["webhooks"].as_array().unwrap().len(), 1, "{list}");
    }

    async fn each_event_type_arrives_signed(tdb) {
        let receiver = Receiver::start(0);
        let app = TestApp::spawn_with(tdb, quick).await;
        let secret = register(&app, "backend", &receiver.url).await;
        let res = app.http.put(app.url(&format!("/v1/admin/subscription-templates/{SUB}")))
            .bearer_auth(KEY_ADMIN).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let session = app.login("u1").await;
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 1).unwrap();
        let (status, res) = app.post("/v1/client/credentials", Some(&session),
            &json!({"subscriptions": [{"template_id": SUB, "result": "accept"}]})).await;
        assert_eq!(status, 200, "{res}");
        let (status, m) = app.post("/v1/messages?wait=20", Some(KEY_SEND), &json!({"openid": "u1", "template_id": SUB,
            "data": {"thing1": {"value": "Your parcel left"}, "date2": {"value": "2026-11-27"}}})).await;
        assert_eq!((status, m["status"].as_str()), (200, Some("sent")), "{m}");
        // message.delivery: queued as the push side will queue it.
        let id = m["id"].as_str().unwrap().to_string();
        {
            let mut conn = app.db.get().unwrap();
            let (row_id, _) = helpers::outbox::store::find_public(&mut conn, &id).unwrap().unwrap();
            let view = helpers::outbox::view(&mut conn, row_id).unwrap().unwrap();
            webhooks::enqueue(&mut conn, APP, webhooks::EventType::MessageDelivery,
                &serde_json::to_value(view).unwrap()).unwrap();
        }
        assert!(receiver.wait_for_ids(3).await, "got {:?}", receiver.got());
        let got = receiver.got();
        let (_, resource) = app.get(&format!("/v1/messages/{id}"), Some(KEY_SEND)).await;
        let mut types = HashSet::new();
        for g in &got {
            assert!(signature_valid(&secret, g), "bad signature on {g:?}");
            assert!(!signature_valid("another-secret-of-at-least-32-chars", g));
            let e = g.json();
            let keys: HashSet<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys, HashSet::from(["id", "type", "created_at", "app_id", "data"]), "{e}");
            assert!(e["id"].as_str().unwrap().starts_with("evt_"));
            assert_eq!(e["app_id"], APP);
            match e["type"].as_str().unwrap() {
                "message.finished" | "message.delivery" => assert_eq!(e["data"], resource, "{e}"),
                "subscription.exhausted" => assert_eq!(e["data"], json!({"openid": "u1", "template_id": SUB})),
                other => panic!("unexpected event {other}"),
            }
            types.insert(e["type"].as_str().unwrap().to_string());
        }
        assert_eq!(types.len(), 3, "{got:?}");
        // Changing a signed byte breaks the signature.
        let mut forged = got[0].clone();
        forged.body = forged.body.replacen(APP, "wxother", 1);
        assert!(!signature_valid(&secret, &forged));
        assert!(eventually(Duration::from_secs(10), || async {
            counter(&app, "ledger_webhook_deliveries_total{outcome=\"delivered\"}").await >= 3
        }).await);
        let (_, d) = app.get("/v1/admin/webhooks/backend/deliveries?status=delivered", Some(KEY_ADMIN)).await;
        assert_eq!(d["deliveries"].as_array().unwrap().len(), 3, "{d}");
        assert!(!d.to_string().contains(&secret));
    }

    async fn a_message_that_ends_no_quota_is_finished_too_and_a_form_id_exhausts_nothing(tdb) {
        let receiver = Receiver::start(0);
        let app = TestApp::spawn_with(tdb, quick).await;
        register(&app, "backend", &receiver.url).await;
        let form = app.sim.sim.mint_form_ids(APP, "u2", 1).unwrap().remove(0);
        let (status, _) = app.post("/v1/credentials", Some(KEY_SEND), &json!({"openid": "u2", "kind": "form_id", "value": form})).await;
        assert_eq!(status, 200);
        for expected in ["sent", "no_quota"] {
            let (status, m) = app.post("/v1/messages?wait=20", Some(KEY_SEND), &json!({"openid": "u2", "template_id": "TPL"})).await;
            assert_eq!((status, m["status"].as_str()), (200, Some(expected)), "{m}");
        }
        assert!(receiver.wait_for_ids(2).await);
        let types: Vec<String> = receiver.got().iter().map(|g| g.json()["type"].as_str().unwrap().to_string()).collect();
        assert_eq!(types, ["message.finished", "message.finished"]);
    }

    async fn a_receiver_down_then_up_gets_every_event(tdb) {
        let app = TestApp::spawn_with(tdb, quick).await;
        let port = free_port();
        register(&app, "backend", &format!("http://127.0.0.1:{port}/hook")).await;
        let ids = enqueue(&app.db, 10);
        // Every delivery has been tried against the dead port at least once.
        let tried = eventually(Duration::from_secs(30), || async {
            let (_, d) = app.get("/v1/admin/webhooks/backend/deliveries?status=pending", Some(KEY_ADMIN)).await;
            let d = d["deliveries"].as_array().cloned().unwrap_or_default();
            d.len() == 10 && d.iter().all(|d| d["attempts"].as_i64() >= Some(1) && d["last_error"].is_string())
        }).await;
        assert!(tried, "the deliveries were not tried while the receiver was down");
        let receiver = Receiver::start(port);
        assert!(receiver.wait_for_ids(10).await, "got {:?}", receiver.ids());
        let got = receiver.ids();
        assert_eq!(got.keys().cloned().collect::<HashSet<_>>(), ids.into_iter().collect::<HashSet<_>>());
        // No kill: each event arrived once.
        assert!(got.values().all(|n| *n == 1), "{got:?}");
        assert!(eventually(Duration::from_secs(10), || async { deliveries_by_status(&app.db, "delivered") == 10 }).await);
    }

    async fn a_delivery_retried_for_its_window_fails_and_is_retried_by_hand(tdb) {
        let receiver = Receiver::start(0);
        receiver.status.store(500, Ordering::SeqCst);
        let app = TestApp::spawn_with(tdb, |s| {
            quick(s);
            s.webhooks.retry_window = Duration::from_millis(300);
        }).await;
        register(&app, "backend", &receiver.url).await;
        enqueue(&app.db, 1);
        let failed = helpers::eventually_some(Duration::from_secs(30), || async {
            let (_, d) = app.get("/v1/admin/webhooks/backend/deliveries?status=failed", Some(KEY_ADMIN)).await;
            d["deliveries"].as_array().and_then(|d| d.first().cloned())
        }).await.expect("the delivery never failed");
        assert!(failed["attempts"].as_i64() >= Some(1), "{failed}");
        assert!(failed["last_error"].as_str().unwrap().starts_with("HTTP 500"), "{failed}");
        let id = failed["id"].as_str().unwrap();
        // Bad ids.
        let (status, _) = app.post("/v1/admin/webhook-deliveries/abc/retry", Some(KEY_ADMIN), &json!({})).await;
        assert_eq!(status, 400);
        let (status, _) = app.post("/v1/admin/webhook-deliveries/999999/retry", Some(KEY_ADMIN), &json!({})).await;
        assert_eq!(status, 404);
        // The receiver is fixed; the failed delivery is retried by hand.
        receiver.status.store(204, Ordering::SeqCst);
        let before = receiver.got().len();
        let (status, res) = app.post(&format!("/v1/admin/webhook-deliveries/{id}/retry"), Some(KEY_ADMIN), &json!({})).await;
        assert_eq!((status, res["status"].as_str()), (200, Some("pending")), "{res}");
        assert!(eventually(Duration::from_secs(30), || async { deliveries_by_status(&app.db, "delivered") == 1 }).await);
        assert!(receiver.got().len() > before);
        // Only a failed delivery is retried by hand.
        let (status, res) = app.post(&format!("/v1/admin/webhook-deliveries/{id}/retry"), Some(KEY_ADMIN), &json!({})).await;
        assert_eq!((status, res["error"]["code"].as_str()), (400, Some("invalid_request")), "{res}");
        assert!(counter(&app, "ledger_webhook_deliveries_total{outcome=\"failed\"}").await >= 1);
    }

    async fn loopback_private_and_link_local_urls_are_refused(tdb) {
        let app = TestApp::spawn(tdb).await;
        for url in [
            "http://127.0.0.1:9/hook",
            "http://10.1.2.3/hook",
            "http://192.168.0.10/hook",
            "http://172.20.0.1/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:8080/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "http://[fe80::1]/hook",
            "http://localhost:9/hook",
        ] {
            let (status, res) = put_webhook(&app, "x", json!({"url": url, "events": ["message.finished"]})).await;
            assert_eq!((status, res["error"]["code"].as_str()), (400, Some("invalid_request")), "{url}: {res}");
        }
        let (_, list) = app.get("/v1/admin/webhooks", Some(KEY_ADMIN)).await;
        assert_eq!(list["webhooks"], json!([]));
    }

    /// A name that resolves to loopback when the delivery is made (DNS rebinding: it
    /// may have resolved elsewhere when it was registered) is refused at delivery,
    /// and so is a loopback address written into the table behind the API's back.
    async fn a_url_reaching_loopback_at_delivery_time_is_refused(tdb) {
        let receiver = Receiver::start(0);
        let port = receiver.url.rsplit(':').next().unwrap().trim_end_matches("/hook").to_string();
        let app = TestApp::spawn(tdb).await;
        for (name, url) in [("rebound", format!("http://localhost:{port}/hook")), ("literal", format!("http://127.0.0.1:{port}/hook"))] {
            let mut conn = app.db.get().unwrap();
            let now = chrono::Utc::now().naive_utc();
            use diesel::prelude::*;
            use schema::webhooks::dsl as w;
            dispatch!(&mut *conn, |c| diesel::insert_into(w::webhooks).values((
                w::name.eq(name), w::url.eq(&url), w::events.eq("message.delivery"),
                w::secret.eq("x".repeat(32)), w::created_at.eq(now), w::updated_at.eq(now),
            )).execute(c)).unwrap();
        }
        enqueue(&app.db, 1);
        for name in ["rebound", "literal"] {
            let tried = helpers::eventually_some(Duration::from_secs(30), || async {
                let (_, d) = app.get(&format!("/v1/admin/webhooks/{name}/deliveries"), Some(KEY_ADMIN)).await;
                d["deliveries"].as_array().and_then(|d| d.first().cloned()).filter(|d| d["attempts"].as_i64() >= Some(1))
            }).await.expect("never tried");
            assert_eq!(tried["status"], "pending", "{tried}");
            assert!(tried["last_error"].as_str().unwrap().contains("refused"), "{tried}");
        }
        assert!(receiver.got().is_empty(), "a refused address was reached: {:?}", receiver.got());
    }

    async fn two_instances_deliver_each_event_once(tdb) {
        let receiver = Receiver::start(0);
        receiver.delay_ms.store(20, Ordering::SeqCst);
        let tdb = Arc::new(tdb);
        let sim = TestSim::spawn();
        let a = TestApp::start(tdb.clone(), sim.clone(), quick).await;
        let _b = TestApp::start(tdb.clone(), sim, quick).await;
        register(&a, "backend", &receiver.url).await;
        let ids = enqueue(&a.db, 60);
        assert!(receiver.wait_for_ids(60).await, "got {}", receiver.ids().len());
        assert!(eventually(Duration::from_secs(20), || async { deliveries_by_status(&a.db, "delivered") == 60 }).await);
        let got = receiver.ids();
        assert_eq!(got.keys().cloned().collect::<HashSet<_>>(), ids.into_iter().collect::<HashSet<_>>());
        let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "delivered more than once with no instance killed: {twice:?}");
    }

    /// The queue also carries raw bodies (the push side's forward): POSTed as they
    /// are, unsigned.
    async fn a_forward_is_posted_raw_and_unsigned(tdb) {
        let receiver = Receiver::start(0);
        let app = TestApp::spawn_with(tdb, quick).await;
        let body = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName></xml>";
        {
            let mut conn = app.db.get().unwrap();
            webhooks::enqueue_forward(&mut conn, APP, &receiver.url, "text/xml", body).unwrap();
        }
        assert!(eventually(Duration::from_secs(30), || async { !receiver.got().is_empty() }).await);
        let got = receiver.got();
        assert_eq!((got.len(), got[0].body.as_str(), got[0].signature.as_deref()), (1, body, None));
    }

    async fn a_kill_9_of_the_delivering_instance_loses_no_event(tdb) {
        kill_mid_delivery(tdb).await;
    }
}

fn service(db: &DatabaseUrl, sim: &str, port: u16, log: &std::path::Path) -> Proc {
    let url = match db {
        DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
        DatabaseUrl::Postgres(url) => url.expose().to_string(),
    };
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_formid-ledger"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("LEDGER_BIND", format!("127.0.0.1:{port}"))
        .env("LEDGER_DATABASE_URL", url)
        .env("LEDGER_APPS", format!("{APP}:{APP_SECRET}"))
        .env("LEDGER_API_KEYS", format!("adm:admin:{KEY_ADMIN}"))
        .env("LEDGER_WECHAT_API_BASE", sim)
        .env("LEDGER_HTTP_WORKERS", "2")
        .env("LEDGER_WEBHOOK_ALLOW_PRIVATE", "true")
        .env("LEDGER_WEBHOOK_TIMEOUT_S", "2")
        .env("LEDGER_WEBHOOK_BACKOFF_BASE_MS", "100")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the service");
    Proc(child)
}

async fn kill_mid_delivery(tdb: TestDb) {
    let http = reqwest::Client::new();
    let sim = TestSim::spawn();
    let receiver = Receiver::start(0);
    // Each POST takes 400 ms: the instance has deliveries in flight when killed.
    receiver.delay_ms.store(400, Ordering::SeqCst);
    let logs = tempfile::tempdir().unwrap();
    let port_a = free_port();
    let base_a = format!("http://127.0.0.1:{port_a}");
    let a = service(&tdb.url(), &sim.base, port_a, &logs.path().join("a.log"));
    wait_up(&http, &format!("{base_a}/readyz")).await;
    let secret = "kill-test-secret-0123456789abcdefghij";
    let res = http
        .put(format!("{base_a}/v1/admin/webhooks/backend"))
        .bearer_auth(KEY_ADMIN)
        .json(&json!({"url": receiver.url, "events": ["message.delivery"], "secret": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let db = tdb.connect(2);
    let ids = enqueue(&db, 30);
    assert!(
        eventually(Duration::from_secs(20), || async {
            !receiver.got().is_empty()
        })
        .await,
        "no delivery reached the receiver"
    );
    drop(a); // SIGKILL, mid-delivery
    let at_kill = receiver.ids().len();
    assert!(at_kill < 30, "everything was delivered before the kill");

    let port_b = free_port();
    let _b = service(&tdb.url(), &sim.base, port_b, &logs.path().join("b.log"));
    wait_up(&http, &format!("http://127.0.0.1:{port_b}/readyz")).await;
    assert!(
        receiver.wait_for_ids(30).await,
        "got {} of 30",
        receiver.ids().len()
    );
    let got = receiver.ids();
    assert_eq!(
        got.keys().cloned().collect::<HashSet<_>>(),
        ids.into_iter().collect::<HashSet<_>>()
    );
    assert!(receiver.got().iter().all(|g| signature_valid(secret, g)));
    assert!(
        eventually(Duration::from_secs(30), || async {
            deliveries_by_status(&db, "delivered") == 30
        })
        .await
    );
    // The secret is in no log line of either instance.
    for name in ["a.log", "b.log"] {
        let log = std::fs::read_to_string(logs.path().join(name)).unwrap();
        assert!(!log.contains(secret), "{name} shows the secret");
    }
}

/// Webhook events delivered per second by one instance to a local receiver that
/// answers at once (the measurement; not a check). Run with
/// `cargo test --test api webhook_throughput -- --ignored --nocapture`.
async fn throughput(tdb: TestDb) {
    const N: usize = 2000;
    let receiver = Receiver::start(0);
    let app = TestApp::spawn_with(tdb, quick).await;
    register(&app, "backend", &receiver.url).await;
    let started = std::time::Instant::now();
    enqueue(&app.db, N);
    let queued = started.elapsed();
    assert!(
        eventually(Duration::from_secs(600), || async {
            receiver.ids().len() >= N
        })
        .await
    );
    let took = started.elapsed();
    println!(
        "webhook throughput: {N} events queued in {queued:?}, all received after {took:?}: {:.0} events/s",
        N as f64 / took.as_secs_f64()
    );
}

mod webhook_throughput {
    use super::*;

    #[ignore = "a measurement, not a check"]
    #[actix_web::test]
    async fn sqlite() {
        throughput(TestDb::sqlite()).await
    }

    #[ignore = "a measurement, not a check"]
    #[actix_web::test]
    async fn postgres() {
        throughput(TestDb::postgres()).await
    }
}

backend_app_tests! {
    /// WeChat's pushes become webhook events (contract v2): a sent event is
    /// `message.delivery`; one that proves an `outcome_unknown` send is also a
    /// `message.finished` with status sent; a change that removes the user's last
    /// grant of a template is `subscription.exhausted`. Pushes are signed and
    /// encrypted as WeChat does (tests/api/push.rs).
    async fn pushes_become_webhook_events(tdb) {
        use crate::push::{change, now_ts, popup, post, safe, sent};
        let receiver = Receiver::start(0);
        let app = TestApp::spawn_with(tdb, |s| {
            quick(s);
            s.push = vec![push_app()];
            s.subscription_templates = vec![SUB.into()];
        })
        .await;
        let secret = register(&app, "backend", &receiver.url).await;
        let pushed = |body: String| {
            let signed = safe(&body, &now_ts(), APP);
            let app = &app;
            async move {
                let (status, text) = post(app, &signed).await;
                assert_eq!((status, text.as_str()), (200, "success"));
            }
        };
        // u1: one grant, a send whose answer is lost, then WeChat's sent event.
        app.sim.sim.grant_subscriptions(APP, "u1", SUB, 1).unwrap();
        pushed(popup("u1", &[(SUB, "accept")])).await;
        app.sim.sim.set_faults(Faults { send: helpers::FaultSet { drop_after_read: 1.0, ..Default::default() }, ..Faults::default() }).unwrap();
        let (status, m) = app.post("/v1/messages?wait=20", Some(KEY_SEND), &json!({"openid": "u1", "template_id": SUB,
            "data": {"thing1": {"value": "Your parcel left"}}})).await;
        assert_eq!((status, m["error"]["code"].as_str()), (200, Some("outcome_unknown")), "{m}");
        app.sim.sim.set_faults(Faults::default()).unwrap();
        let msgid = app.sim.sim.deliveries()[0].msgid.unwrap().to_string();
        pushed(sent("u1", SUB, &msgid, "0", "success")).await;
        // u2: two grants, both removed by the user in settings.
        app.sim.sim.grant_subscriptions(APP, "u2", SUB, 2).unwrap();
        pushed(popup("u2", &[(SUB, "accept"), (SUB, "accept")])).await;
        pushed(change("u2", SUB)).await;
        // finished (outcome_unknown), exhausted (u1's grant spent), finished (sent),
        // delivery, exhausted (u2).
        assert!(receiver.wait_for_ids(5).await, "got {:?}", receiver.got().iter().map(|g| g.json()).collect::<Vec<_>>());
        let events: Vec<Value> = receiver.got().iter().map(|g| { assert!(signature_valid(&secret, g)); g.json() }).collect();
        let of = |t: &str| events.iter().filter(|e| e["type"] == t).cloned().collect::<Vec<_>>();
        let finished: Vec<String> = of("message.finished").iter().map(|e| e["data"]["status"].as_str().unwrap().to_string()).collect();
        let finished: Vec<&str> = finished.iter().map(String::as_str).collect();
        assert!(finished.contains(&"failed") && finished.contains(&"sent"), "{events:?}");
        let delivery = of("message.delivery");
        assert_eq!(delivery.len(), 1, "{events:?}");
        assert_eq!((delivery[0]["data"]["id"].as_str(), delivery[0]["data"]["delivery"]["status"].as_str()), (m["id"].as_str(), Some("delivered")));
        let exhausted: Vec<Value> = of("subscription.exhausted").iter().map(|e| e["data"].clone()).collect();
        assert!(exhausted.contains(&json!({"openid": "u2", "template_id": SUB})), "{events:?}");
    }
}

backend_app_tests! {
    /// Contract v2: a push that is not a subscribe-message event (here a customer
    /// message) goes unchanged to the app's LEDGER_PUSH_FORWARD; WeChat gets the
    /// handler's own answer when it comes within 4 s, else `success`, and the
    /// durable queue delivers it after all. WeChat's retry of a push (same MsgId)
    /// is not forwarded again.
    async fn other_pushes_are_forwarded_once(tdb) {
        use crate::push::{now_ts, post, safe};
        let receiver = Receiver::start(0);
        let app = TestApp::spawn_with(tdb, |s| {
            quick(s);
            s.push = vec![push_app()];
            s.push_forward = [(APP.to_string(), receiver.url.clone())].into();
        })
        .await;
        let text = |msg_id: u64| format!("<xml><ToUserName><![CDATA[gh_test]]></ToUserName><FromUserName><![CDATA[u1]]></FromUserName>\
<CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello]]></Content>\
<MsgId>{msg_id}</MsgId></xml>");
        let signed = safe(&text(23456789012345678), &now_ts(), APP);
        let (status, answer) = post(&app, &signed).await;
        assert_eq!((status, answer.as_str()), (200, "received"), "the handler's own answer");
        let (status, answer) = post(&app, &signed).await;
        assert_eq!((status, answer.as_str()), (200, "success"), "a retry, applied before");
        let got = receiver.got();
        assert_eq!(got.len(), 1, "forwarded once: {got:?}");
        assert_eq!(got[0].body, signed.body, "the body exactly as WeChat sent it");
        assert_eq!(got[0].signature, None);
        // A handler slower than 4 s: WeChat gets `success`, and the queue delivers.
        receiver.delay_ms.store(4500, Ordering::SeqCst);
        let slow = safe(&text(23456789012345679), &now_ts(), APP);
        let (status, answer) = post(&app, &slow).await;
        assert_eq!((status, answer.as_str()), (200, "success"));
        receiver.delay_ms.store(0, Ordering::SeqCst);
        let delivered = eventually(Duration::from_secs(30), || async {
            let mut conn = app.db.get().unwrap();
            let pending: i64 = dispatch!(&mut *conn, |c| {
                use diesel::prelude::*;
                schema::webhook_deliveries::table
                    .filter(schema::webhook_deliveries::status.ne("delivered"))
                    .count()
                    .get_result(c)
            })
            .unwrap();
            pending == 0
        });
        assert!(delivered.await, "the slow forward was delivered by the queue");
        assert!(receiver.got().iter().filter(|g| g.body == slow.body).count() >= 1);
    }
}
