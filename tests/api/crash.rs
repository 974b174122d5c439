//! kill -9 in the middle: real processes (the simulator and the service binary),
//! an instance killed while its calls are in flight and a new one started on the
//! same database. The simulator's record is the oracle.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use serde_json::{json, Value};

use crate::helpers::{
    backend_app_tests, eventually, eventually_some, free_port, get_json, pg_connect, post_json,
    postgres_admin_url, wait_up, DatabaseUrl, Db, DbConn, Proc, TestDb, APP, APP_SECRET, KEY_ADMIN,
    KEY_SEND, RECHECK_AFTER,
};

const BIN: &str = env!("CARGO_BIN_EXE_formid-ledger");

fn service(db: &DatabaseUrl, sim: &str, port: u16) -> Proc {
    let url = match db {
        DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
        DatabaseUrl::Postgres(url) => url.expose().to_string(),
    };
    let child = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("LEDGER_BIND", format!("127.0.0.1:{port}"))
        .env("LEDGER_DATABASE_URL", url)
        .env("LEDGER_APPS", format!("{APP}:{APP_SECRET}"))
        .env(
            "LEDGER_API_KEYS",
            format!("ops:send+admin:{KEY_SEND},adm:admin:{KEY_ADMIN}"),
        )
        .env("LEDGER_WECHAT_API_BASE", sim)
        .env("LEDGER_WECHAT_TIMEOUT_S", "2")
        .env("LEDGER_SENDER_LEASE_S", "3")
        .env("LEDGER_SENDER_WORKERS", "8")
        .env("LEDGER_HTTP_WORKERS", "2")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the service");
    Proc(child)
}

/// The simulator as a process, each send taking 300..600 ms so that plenty of calls
/// are in flight when an instance is stopped.
async fn slow_simulator(http: &reqwest::Client) -> (Proc, String) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let sim = Proc(
        Command::new(BIN)
            .args([
                "sim",
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--apps",
                &format!("{APP}:{APP_SECRET}"),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_up(http, &format!("{base}/sim/stats")).await;
    post_json(
        http,
        &format!("{base}/sim/faults"),
        None,
        &json!({"send": {"latency_ms": [300, 600]}}),
    )
    .await;
    (sim, base)
}

/// The simulator's record of every send it received.
async fn deliveries(http: &reqwest::Client, sim_base: &str) -> Vec<Value> {
    match get_json(http, &format!("{sim_base}/sim/deliveries"), None).await {
        Value::Array(deliveries) => deliveries,
        other => panic!("/sim/deliveries: {other}"),
    }
}

/// Waits until the simulator has received a send. The slow simulator holds each
/// send 300..600 ms before answering, so the service has a call in flight now.
async fn wait_for_a_call_in_flight(http: &reqwest::Client, sim_base: &str) {
    let sending = eventually(Duration::from_secs(20), || async {
        !deliveries(http, sim_base).await.is_empty()
    })
    .await;
    assert!(sending, "no send reached the simulator");
}

/// Polls the message until it is final (or the deadline passes) and returns it.
async fn final_message(http: &reqwest::Client, base: &str, id: &str, deadline: Instant) -> Value {
    let url = format!("{base}/v1/messages/{id}");
    let left = deadline.saturating_duration_since(Instant::now());
    let finished = eventually_some(left, || async {
        let m = get_json(http, &url, Some(KEY_SEND)).await;
        let status = m["status"].as_str().unwrap_or("");
        ["sent", "no_quota", "failed"]
            .contains(&status)
            .then_some(m)
    })
    .await;
    match finished {
        Some(m) => m,
        None => {
            let m = get_json(http, &url, Some(KEY_SEND)).await;
            panic!("message {id} never finished: {m}")
        }
    }
}

/// Mints `count` form_ids for `openid` in the simulator and registers them with the
/// service at `base`; returns how many it accepted.
async fn register_minted(
    http: &reqwest::Client,
    sim_base: &str,
    base: &str,
    openid: &str,
    count: usize,
) -> usize {
    let minted = post_json(
        http,
        &format!("{sim_base}/sim/form-ids"),
        None,
        &json!({"appid": APP, "openid": openid, "count": count}),
    )
    .await;
    let items: Vec<Value> = minted["form_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| json!({"openid": openid, "kind": "form_id", "value": f}))
        .collect();
    let res = post_json(
        http,
        &format!("{base}/v1/credentials"),
        Some(KEY_SEND),
        &json!({"credentials": items}),
    )
    .await;
    res["accepted"].as_u64().unwrap() as usize
}

async fn kill_in_flight(tdb: TestDb) {
    let http = reqwest::Client::new();
    let (_sim, sim_base) = slow_simulator(&http).await;

    let url = tdb.url();
    let port_a = free_port();
    let base_a = format!("http://127.0.0.1:{port_a}");
    let a = service(&url, &sim_base, port_a);
    wait_up(&http, &format!("{base_a}/readyz")).await;

    let mut recorded = 0;
    for u in 0..20 {
        let accepted = register_minted(&http, &sim_base, &base_a, &format!("user{u}"), 5).await;
        assert_eq!(accepted, 5);
        recorded += accepted;
    }
    let mut ids = Vec::new();
    for i in 0..120 {
        let m = post_json(
            &http,
            &format!("{base_a}/v1/messages"),
            Some(KEY_SEND),
            &json!({"openid": format!("user{}", i % 20), "template_id": "TPL"}),
        )
        .await;
        ids.push(m["id"].as_str().unwrap().to_string());
    }
    wait_for_a_call_in_flight(&http, &sim_base).await;
    drop(a); // SIGKILL, mid-flight
    let delivered_at_kill = deliveries(&http, &sim_base).await.len();
    assert!(
        delivered_at_kill < 100,
        "everything was sent before the kill ({delivered_at_kill})"
    );

    let port_b = free_port();
    let base_b = format!("http://127.0.0.1:{port_b}");
    let _b = service(&url, &sim_base, port_b);
    wait_up(&http, &format!("{base_b}/readyz")).await;

    let mut by_status: HashMap<String, usize> = HashMap::new();
    let mut interrupted = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    for id in &ids {
        let m = final_message(&http, &base_b, id, deadline).await;
        let status = m["status"].as_str().unwrap_or_default();
        let code = m["error"]["code"].as_str().unwrap_or("");
        let attempts = m["attempts"].as_array().unwrap();
        interrupted += usize::from(attempts.iter().any(|a| a["outcome"] == "interrupted"));
        *by_status.entry(format!("{status}/{code}")).or_default() += 1;
    }
    let deliveries = deliveries(&http, &sim_base).await;
    let mut per_credential: HashMap<String, usize> = HashMap::new();
    for d in &deliveries {
        *per_credential
            .entry(d["credential"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(
        per_credential.values().all(|n| *n == 1),
        "a form_id was used twice at WeChat: {per_credential:?}"
    );
    assert!(
        interrupted > 0,
        "no call was in flight at the kill: {by_status:?}"
    );
    let sent = by_status.get("sent/").copied().unwrap_or(0);
    let unknown = by_status
        .get("failed/outcome_unknown")
        .copied()
        .unwrap_or(0);
    assert_eq!(
        unknown, 0,
        "single-use form_ids are probed, never unknown: {by_status:?}"
    );
    assert_eq!(deliveries.len(), sent, "sent ⇔ delivered: {by_status:?}");
    assert_eq!(sent, 100, "every use was spent on a message: {by_status:?}");
    assert_eq!(
        by_status.get("no_quota/no_quota"),
        Some(&20),
        "{by_status:?}"
    );
    let mut left = 0;
    for u in 0..20 {
        let q = get_json(
            &http,
            &format!("{base_b}/v1/admin/users/user{u}/quota"),
            Some(KEY_ADMIN),
        )
        .await;
        left += q["sendable"].as_u64().unwrap() as usize;
    }
    assert_eq!(
        left + deliveries.len(),
        recorded,
        "uses left + uses spent = uses recorded"
    );
}

backend_app_tests! {
    async fn kill_9_mid_flight(tdb) {
        kill_in_flight(tdb).await;
    }
}

/// SIGTERM while calls are in flight: the process finishes them (no call is left
/// in doubt), hands its leases back and exits cleanly; a new instance finishes the
/// rest at once.
async fn sigterm_in_flight(tdb: TestDb) {
    let http = reqwest::Client::new();
    let (_sim, sim_base) = slow_simulator(&http).await;
    let url = tdb.url();
    let port_a = free_port();
    let base_a = format!("http://127.0.0.1:{port_a}");
    let mut a = service(&url, &sim_base, port_a);
    wait_up(&http, &format!("{base_a}/readyz")).await;
    let minted = post_json(
        &http,
        &format!("{sim_base}/sim/form-ids"),
        None,
        &json!({"appid": APP, "openid": "u", "count": 60}),
    )
    .await;
    let items: Vec<Value> = minted["form_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| json!({"openid": "u", "kind": "form_id", "value": f}))
        .collect();
    post_json(
        &http,
        &format!("{base_a}/v1/credentials"),
        Some(KEY_SEND),
        &json!({"credentials": items}),
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..60 {
        let m = post_json(
            &http,
            &format!("{base_a}/v1/messages"),
            Some(KEY_SEND),
            &json!({"openid": "u", "template_id": "TPL"}),
        )
        .await;
        ids.push(m["id"].as_str().unwrap().to_string());
    }
    wait_for_a_call_in_flight(&http, &sim_base).await;
    let pid = a.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exited = eventually_some(Duration::from_secs(30), || {
        std::future::ready(a.0.try_wait().expect("the process's status"))
    })
    .await;
    let status = exited.expect("no exit after SIGTERM");
    assert!(status.success(), "exit after SIGTERM: {status}");

    let port_b = free_port();
    let base_b = format!("http://127.0.0.1:{port_b}");
    let _b = service(&url, &sim_base, port_b);
    wait_up(&http, &format!("{base_b}/readyz")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    for id in &ids {
        let m = final_message(&http, &base_b, id, deadline).await;
        let attempts = m["attempts"].as_array().unwrap();
        assert!(
            attempts.iter().all(|a| a["outcome"] != "interrupted"),
            "a graceful stop left a call in doubt: {m}"
        );
        sent += usize::from(m["status"] == "sent");
    }
    assert_eq!(sent, 60);
    let deliveries = deliveries(&http, &sim_base).await;
    assert_eq!(deliveries.len(), 60, "each message delivered once");
}

backend_app_tests! {
    async fn sigterm_mid_flight(tdb) {
        sigterm_in_flight(tdb).await;
    }
}

/// Contract v2, campaigns: 2,000 recipients over three instances, the instance
/// running the campaign killed with SIGKILL in the middle. Another instance takes
/// the campaign over (its lease runs out) and every recipient ends in exactly one
/// final status; the simulator's record shows one message per spent form_id and
/// one per sent recipient.
async fn kill_a_campaigns_runner(tdb: TestDb) {
    let http = reqwest::Client::new();
    let (_sim, sim_base) = slow_simulator(&http).await;
    post_json(
        &http,
        &format!("{sim_base}/sim/faults"),
        None,
        &json!({"send": {"latency_ms": [5, 30]}}),
    )
    .await;
    let url = tdb.url();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let bases: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let a = service(&url, &sim_base, ports[0]);
    wait_up(&http, &format!("{}/readyz", bases[0])).await;

    // 1,900 users with one form_id each; 100 with none.
    let openids: Vec<String> = (0..2000).map(|i| format!("c{i:04}")).collect();
    let mut items = Vec::new();
    for openid in &openids[..1900] {
        let minted = post_json(
            &http,
            &format!("{sim_base}/sim/form-ids"),
            None,
            &json!({"appid": APP, "openid": openid, "count": 1}),
        )
        .await;
        items.push(json!({"openid": openid, "kind": "form_id", "value": minted["form_ids"][0]}));
    }
    for chunk in items.chunks(50) {
        let res = post_json(
            &http,
            &format!("{}/v1/credentials", bases[0]),
            Some(KEY_SEND),
            &json!({"credentials": chunk}),
        )
        .await;
        assert_eq!(res["accepted"], chunk.len());
    }
    // Only A runs when the campaign starts, so A is its runner.
    let c = post_json(
        &http,
        &format!("{}/v1/campaigns", bases[0]),
        Some(KEY_SEND),
        &json!({"template_id": "TPL", "audience": {"openids": openids}, "rate_per_s": 200}),
    )
    .await;
    let id = c["id"].as_str().unwrap().to_string();
    let campaign = |base: String| {
        let (http, id) = (http.clone(), id.clone());
        async move { get_json(&http, &format!("{base}/v1/campaigns/{id}"), Some(KEY_SEND)).await }
    };
    let started = eventually(Duration::from_secs(20), || async {
        campaign(bases[0].clone()).await["status"] == "running"
    })
    .await;
    assert!(started, "{}", campaign(bases[0].clone()).await);
    let _b = service(&url, &sim_base, ports[1]);
    let _c = service(&url, &sim_base, ports[2]);
    for base in &bases[1..] {
        wait_up(&http, &format!("{base}/readyz")).await;
    }
    let midway = eventually(Duration::from_secs(30), || async {
        deliveries(&http, &sim_base).await.len() >= 500
    })
    .await;
    assert!(midway, "the campaign did not get going");
    drop(a); // SIGKILL: the campaign's runner, and a third of the senders
    let at_kill = deliveries(&http, &sim_base).await.len();
    assert!(
        at_kill < 1500,
        "nearly everything was sent before the kill ({at_kill})"
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let c = campaign(bases[1].clone()).await;
        let n = |k: &str| c["counts"][k].as_i64().unwrap();
        let parts: i64 = [
            "queued",
            "sent",
            "no_quota",
            "failed",
            "skipped",
            "cancelled",
        ]
        .iter()
        .map(|k| n(k))
        .sum();
        assert_eq!(n("targeted"), parts, "counts add up at every moment: {c}");
        if c["status"] == "done" || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(done["status"], "done", "never finished: {done}");

    let mut statuses: HashMap<String, usize> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut cursor = String::new();
    loop {
        let page = get_json(
            &http,
            &format!(
                "{}/v1/messages?campaign_id={id}&limit=500{cursor}",
                bases[2]
            ),
            Some(KEY_SEND),
        )
        .await;
        for m in page["messages"].as_array().unwrap() {
            assert!(
                seen.insert(m["openid"].as_str().unwrap().to_string()),
                "two messages for one recipient: {m}"
            );
            let code = m["error"]["code"].as_str().unwrap_or("");
            *statuses
                .entry(format!("{}/{code}", m["status"].as_str().unwrap()))
                .or_default() += 1;
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 2000, "every recipient is a message");
    let delivered = deliveries(&http, &sim_base).await;
    let mut per_credential: HashMap<String, usize> = HashMap::new();
    for d in &delivered {
        *per_credential
            .entry(d["credential"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(
        per_credential.values().all(|n| *n == 1),
        "a form_id reached WeChat twice"
    );
    let sent = statuses.get("sent/").copied().unwrap_or(0);
    assert_eq!(delivered.len(), sent, "sent ⇔ delivered: {statuses:?}");
    assert_eq!(
        sent, 1900,
        "every form_id was spent on its recipient: {statuses:?}"
    );
    assert_eq!(
        statuses.get("no_quota/no_quota"),
        Some(&100),
        "{statuses:?}"
    );
    assert_eq!(done["counts"]["sent"], 1900, "{done}");
}

backend_app_tests! {
    async fn kill_9_a_campaigns_runner(tdb) {
        kill_a_campaigns_runner(tdb).await;
    }
}

/// Contract v2, scheduling: a campaign scheduled on an instance that is then killed
/// starts at its `send_at` on the instances that remain, once: two of them race for
/// it and every recipient gets exactly one message, none before `send_at`.
async fn a_scheduled_campaign_survives_its_instance(tdb: TestDb) {
    let http = reqwest::Client::new();
    let (_sim, sim_base) = slow_simulator(&http).await;
    post_json(&http, &format!("{sim_base}/sim/faults"), None, &json!({})).await;
    let url = tdb.url();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let base = |i: usize| format!("http://127.0.0.1:{}", ports[i]);
    let a = service(&url, &sim_base, ports[0]);
    wait_up(&http, &format!("{}/readyz", base(0))).await;
    let openids: Vec<String> = (0..40).map(|i| format!("s{i:02}")).collect();
    for openid in &openids {
        assert_eq!(
            register_minted(&http, &sim_base, &base(0), openid, 2).await,
            2
        );
    }
    let send_at = chrono::Utc::now() + chrono::TimeDelta::seconds(4);
    let c = post_json(
        &http,
        &format!("{}/v1/campaigns", base(0)),
        Some(KEY_SEND),
        &json!({"template_id": "TPL", "audience": {"holding": true}, "send_at": send_at.to_rfc3339()}),
    )
    .await;
    let id = c["id"].as_str().unwrap().to_string();
    // A single message with the same send_at, to a user of the campaign: it gets
    // both, the campaign's first (one send per user at a time), neither early.
    let single = post_json(
        &http,
        &format!("{}/v1/messages", base(0)),
        Some(KEY_SEND),
        &json!({"openid": "s00", "template_id": "TPL_SINGLE", "send_at": send_at.to_rfc3339()}),
    )
    .await;
    let single = single["id"].as_str().unwrap().to_string();
    drop(a); // SIGKILL before send_at
    let _b = service(&url, &sim_base, ports[1]);
    let _c = service(&url, &sim_base, ports[2]);
    for i in 1..3 {
        wait_up(&http, &format!("{}/readyz", base(i))).await;
    }
    let done = eventually_some(Duration::from_secs(60), || async {
        let c = get_json(
            &http,
            &format!("{}/v1/campaigns/{id}", base(2)),
            Some(KEY_SEND),
        )
        .await;
        (c["status"] == "done").then_some(c)
    })
    .await
    .expect("the campaign never finished");
    assert_eq!(done["counts"]["sent"], 40, "{done}");
    let m = final_message(
        &http,
        &base(1),
        &single,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    assert_eq!(m["status"], "sent", "{m}");
    let mut delivered = deliveries(&http, &sim_base).await;
    let singles = delivered
        .iter()
        .filter(|d| d["template_id"] == "TPL_SINGLE")
        .count();
    assert_eq!(
        singles, 1,
        "the scheduled single message reached WeChat once"
    );
    for d in &delivered {
        let at: chrono::DateTime<chrono::Utc> = d["at"].as_str().unwrap().parse().unwrap();
        assert!(
            at >= send_at,
            "{} sent at {at}, before send_at {send_at}",
            d["template_id"]
        );
    }
    delivered.retain(|d| d["template_id"] != "TPL_SINGLE");
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for d in &delivered {
        *per_user
            .entry(d["touser"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_user.len(), 40);
    assert!(
        per_user.values().all(|n| *n == 1),
        "a recipient got two messages: {per_user:?}"
    );
}

backend_app_tests! {
    async fn a_scheduled_campaign_outlives_a_kill_9(tdb) {
        a_scheduled_campaign_survives_its_instance(tdb).await;
    }
}

/// The server process behind a pooled connection, as PostgreSQL numbers it.
async fn backend_pid(db: &Db) -> Result<i32, String> {
    db.run(|conn| {
        let DbConn::Pg(c) = conn else {
            unreachable!("a PostgreSQL pool")
        };
        Ok(
            diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>(
                "pg_backend_pid()",
            ))
            .get_result::<i32>(c)?,
        )
    })
    .await
    .map_err(|e| e.to_string())
}

/// Ends a server process, as a PostgreSQL restart or an administrator would, and
/// waits until it is gone.
async fn terminate(pid: i32) {
    let mut admin = pg_connect(&postgres_admin_url()).expect("admin connection");
    diesel::sql_query(format!("SELECT pg_terminate_backend({pid})"))
        .execute(&mut admin)
        .expect("terminate");
    let gone = eventually(Duration::from_secs(5), || {
        let alive: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
            "(SELECT count(*) FROM pg_stat_activity WHERE pid = {pid})"
        )))
        .get_result(&mut admin)
        .expect("pg_stat_activity");
        async move { alive == 0 }
    })
    .await;
    assert!(gone, "server process {pid} still there");
}

/// A connection that answered a `Db::run` less than `RECHECK_AFTER` ago goes back
/// out without the checkout's `SELECT 1`. One the server has closed is still
/// replaced: after a pause, because the checkout tests it again (without that test
/// the second run fails), and at once after a run that failed on it (diesel marks
/// a connection the server closed as broken and the pool drops it; a failed run
/// also leaves no mark, so the next checkout would test it anyway).
#[actix_web::test]
async fn a_pooled_connection_the_server_closed_is_replaced_postgres() {
    let tdb = TestDb::postgres();
    let db = tdb.connect(1);
    let first = backend_pid(&db).await.expect("a first run");
    terminate(first).await;
    tokio::time::sleep(RECHECK_AFTER).await;
    let second = backend_pid(&db)
        .await
        .expect("after a pause the checkout tested the closed connection and replaced it");
    assert_ne!(second, first);

    terminate(second).await;
    // Within RECHECK_AFTER of its last run the closed connection goes out untested
    // and fails this run, as a database that does not answer (503 through HTTP);
    // the next one must not fail.
    if let Err(e) = backend_pid(&db).await {
        assert!(e.starts_with("database unavailable"), "{e}");
    }
    let third = backend_pid(&db)
        .await
        .expect("the run after a failed one had its connection tested");
    assert_ne!(third, second);
}
