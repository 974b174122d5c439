//! `webhooks`: how fast the service delivers webhook events. A receiver in this
//! process (answers 200 at once, keeps the first arrival of each event id) is
//! registered for `message.finished`; clients then post messages as `send` does, for
//! users `send-setup` registered, and every message's final status becomes one
//! event. The rate is first arrivals over time; at the end every posted message's
//! event must have arrived. The webhook is deleted afterwards.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use clap::Args;
use serde_json::{json, Value};

use crate::load::{check, client, closed_loop, post_json, result_json, round1, round2, Common};
use crate::scenarios::sim_outcomes;

#[derive(Args)]
pub struct WebhooksArgs {
    #[command(flatten)]
    common: Common,
    /// Users `{prefix}{n}` holding credentials from `send-setup`.
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    users: u64,
    /// Never post more messages than this (the credentials registered).
    #[arg(long)]
    messages: u64,
    /// After posting stops, wait at most this long for the remaining events.
    #[arg(long, default_value_t = 60.0)]
    drain_timeout: f64,
    /// Base URL of the simulator: its count of accepted sends beside the events
    /// shows whether the events follow the sends or lag behind them.
    #[arg(long)]
    sim: String,
    /// The webhook's name (replaced if it exists; deleted at the end).
    #[arg(long, default_value = "bench")]
    name: String,
}

/// What the receiver heard: per event id, its first arrival (seconds since the
/// start) and the message it is about; and how many deliveries repeated an id.
#[derive(Default)]
struct Heard {
    first: HashMap<String, (f64, String)>,
    repeats: u64,
    bad: u64,
}

/// Starts the receiver on its own thread (its own actix system, one worker) and
/// answers its URL.
fn start_receiver(heard: Arc<Mutex<Heard>>, t0: Instant) -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        let run = actix_web::rt::System::new().block_on(async move {
            HttpServer::new(move || {
                let heard = heard.clone();
                App::new().default_service(web::to(move |body: web::Bytes| {
                    let heard = heard.clone();
                    async move {
                        let at = t0.elapsed().as_secs_f64();
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let mut h = heard.lock().unwrap();
                        match v["id"].as_str() {
                            Some(id) => {
                                if h.first.contains_key(id) {
                                    h.repeats += 1;
                                } else {
                                    let msg = v["data"]["id"].as_str().unwrap_or("").to_string();
                                    h.first.insert(id.to_string(), (at, msg));
                                }
                            }
                            None => h.bad += 1,
                        }
                        HttpResponse::Ok().finish()
                    }
                }))
            })
            .workers(1)
            .disable_signals()
            .listen(listener)?
            .run()
            .await
        });
        if let Err(e) = run {
            eprintln!("ledger-load: webhook receiver: {e}");
        }
    });
    Ok(format!("http://127.0.0.1:{port}/hook"))
}

pub async fn webhooks(a: WebhooksArgs) -> Result<Value, String> {
    let c = a.common.clone();
    let http = client(c.clients);
    let auth = format!("Bearer {}", c.key);
    let t0 = Instant::now();
    let heard = Arc::new(Mutex::new(Heard::default()));
    let hook_url = start_receiver(heard.clone(), t0)?;
    let admin = format!("{}/v1/admin/webhooks/{}", c.url, a.name);
    check(
        http.put(&admin)
            .header("Authorization", &auth)
            .json(&json!({"url": hook_url, "events": ["message.finished"]}))
            .send()
            .await,
    )
    .await?;
    let sim_ok = |o: std::collections::BTreeMap<String, u64>| o.get("ok").copied().unwrap_or(0);
    let sim_base = sim_ok(sim_outcomes(&http, &a.sim).await?);
    let posted_ids: Arc<Mutex<HashSet<String>>> = Arc::default();
    let url: Arc<str> = format!("{}/v1/messages", c.url).into();
    let auth_arc: Arc<str> = auth.clone().into();
    let prefix: Arc<str> = a.prefix.clone().into();
    let users = a.users.max(1);
    let op = {
        let (posted_ids, http) = (posted_ids.clone(), http.clone());
        move |n: u64| {
            let (http, url, auth, prefix, ids) = (
                http.clone(),
                url.clone(),
                auth_arc.clone(),
                prefix.clone(),
                posted_ids.clone(),
            );
            async move {
                let body = json!({"openid": format!("{prefix}{}", n % users), "template_id": "TPL_BENCH",
                                  "data": {"keyword1": {"value": format!("order {n}")}}});
                let v = post_json(&http, &url, &auth, &body).await?;
                let Some(id) = v["id"].as_str() else {
                    return Err(format!("no id: {v}"));
                };
                ids.lock().unwrap().insert(id.to_string());
                Ok(1)
            }
        }
    };
    let r = closed_loop(&c, a.messages, op).await;
    let post_end = t0.elapsed().as_secs_f64();
    let posted = posted_ids.lock().unwrap().len() as u64;
    let sent_at_post_end = sim_ok(sim_outcomes(&http, &a.sim).await?) - sim_base;
    let events_at_post_end = heard.lock().unwrap().first.len() as u64;
    // Drain: until every posted message's event arrived, no progress for 10 s, or
    // the timeout.
    let deadline = Instant::now() + Duration::from_secs_f64(a.drain_timeout);
    let mut last = (Instant::now(), 0usize);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = heard.lock().unwrap().first.len();
        if n as u64 >= posted || Instant::now() > deadline {
            break;
        }
        if n != last.1 {
            last = (Instant::now(), n);
        } else if last.0.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    // Late repeats would show now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deleted = http
        .delete(&admin)
        .header("Authorization", &auth)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    let sent_total = sim_ok(sim_outcomes(&http, &a.sim).await?) - sim_base;
    let h = heard.lock().unwrap();
    let mut times: Vec<f64> = h.first.values().map(|v| v.0).collect();
    times.sort_by(f64::total_cmp);
    let count = |from: f64, to: f64| times.iter().filter(|&&t| t >= from && t < to).count() as u64;
    let (w0, w1) = (c.warmup, c.warmup + r.secs);
    let in_window = count(w0, w1);
    let total = times.len() as u64;
    let last_arrival = times.last().copied().unwrap_or(post_end);
    let drained = count(post_end, f64::INFINITY);
    let drain_secs = (last_arrival - post_end).max(0.0);
    let first_arrival = times.first().copied().unwrap_or(0.0);
    let about: HashSet<&str> = h.first.values().map(|v| v.1.as_str()).collect();
    let ids = posted_ids.lock().unwrap();
    let missing = ids.iter().filter(|id| !about.contains(id.as_str())).count() as u64;
    Ok(result_json(
        &c,
        &r,
        json!({
            "posted": posted,
            "events_total": total,
            "events_in_window": in_window,
            "events_per_s": round1(in_window as f64 / r.secs),
            "drained_after_posting": drained,
            "drain_secs": round2(drain_secs),
            "drain_events_per_s": if drain_secs > 0.5 { round1(drained as f64 / drain_secs) } else { 0.0 },
            "e2e_events_per_s": round1(total as f64 / (last_arrival - first_arrival).max(0.001)),
            "sim_sent_at_post_end": sent_at_post_end,
            "events_at_post_end": events_at_post_end,
            "sim_sent_total": sent_total,
            "finished_events_missing": missing,
            "all_events_arrived": missing == 0,
            "repeated_deliveries": h.repeats,
            "unreadable_deliveries": h.bad,
            "webhook_deleted_status": deleted,
        }),
    ))
}
