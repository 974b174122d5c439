//! The timed HTTP scenarios: `ingest`, `quota` and `send`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::load::{
    check, client, closed_loop, nonce, post_json, result_json, round1, round2, Common,
};
use crate::procstat::{cpu_json, cpu_snap, vm_hwm_kb};

#[derive(Args)]
pub struct IngestArgs {
    #[command(flatten)]
    common: Common,
    /// form_ids per request (1: the single form; more: `{"credentials": [...]}`).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Users are `{prefix}{n}` with n = request number modulo `users`.
    #[arg(long)]
    prefix: String,
    #[arg(long, default_value_t = 100_000)]
    users: u64,
}

#[derive(Args)]
pub struct QuotaArgs {
    #[command(flatten)]
    common: Common,
    /// Reads `{prefix}{n}` for n uniformly random in [first, first + users).
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    users: u64,
    #[arg(long, default_value_t = 0)]
    first: u64,
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    sim: String,
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    users: u64,
    /// Never post more messages than this (the credentials registered by send-setup).
    #[arg(long)]
    messages: u64,
    /// After posting stops, wait at most this long for the backlog to be sent.
    #[arg(long, default_value_t = 60.0)]
    drain_timeout: f64,
    /// Drain mode: post exactly `messages` messages, each with `send_at` this many
    /// seconds after the start, and time the senders alone sending them from then.
    /// 0: messages are due at once and sent while the clients post.
    #[arg(long, default_value_t = 0.0)]
    due_in: f64,
}

pub async fn ingest(a: IngestArgs) -> Result<Value, String> {
    let http = client(a.common.clients);
    let url: Arc<str> = format!("{}/v1/credentials", a.common.url).into();
    let auth: Arc<str> = format!("Bearer {}", a.common.key).into();
    let tag: Arc<str> = format!("{}{}", a.common.scenario, nonce()).into();
    let prefix: Arc<str> = a.prefix.clone().into();
    let (batch, users) = (a.batch.max(1), a.users.max(1));
    let op = move |n: u64| {
        let (http, url, auth, tag, prefix) = (
            http.clone(),
            url.clone(),
            auth.clone(),
            tag.clone(),
            prefix.clone(),
        );
        async move {
            let openid = format!("{prefix}{}", n % users);
            let body = if batch == 1 {
                json!({"openid": openid, "kind": "form_id", "value": format!("{tag}-{n}")})
            } else {
                let items: Vec<Value> = (0..batch)
                    .map(|k| json!({"openid": openid, "kind": "form_id", "value": format!("{tag}-{n}-{k}")}))
                    .collect();
                json!({ "credentials": items })
            };
            let v = post_json(&http, &url, &auth, &body).await?;
            let accepted = v["accepted"].as_u64().unwrap_or(0);
            if accepted != batch as u64 {
                return Err(format!("accepted {accepted} of {batch}: {v}"));
            }
            Ok(accepted)
        }
    };
    let r = closed_loop(&a.common, u64::MAX, op).await;
    let touched = r.started.min(users);
    Ok(result_json(
        &a.common,
        &r,
        json!({"batch": batch, "users_touched": touched, "prefix": a.prefix}),
    ))
}

pub async fn quota(a: QuotaArgs) -> Result<Value, String> {
    let http = client(a.common.clients);
    let base: Arc<str> = format!("{}/v1/admin/users/", a.common.url).into();
    let auth: Arc<str> = format!("Bearer {}", a.common.key).into();
    let prefix: Arc<str> = a.prefix.clone().into();
    let (first, users) = (a.first, a.users.max(1));
    let nonzero = Arc::new(AtomicU64::new(0));
    let nz = nonzero.clone();
    let op = move |_n: u64| {
        let (http, base, auth, prefix, nz) = (
            http.clone(),
            base.clone(),
            auth.clone(),
            prefix.clone(),
            nz.clone(),
        );
        async move {
            let user = first + rand::random_range(0..users);
            let v = check(
                http.get(format!("{base}{prefix}{user}/quota"))
                    .header("Authorization", &*auth)
                    .send()
                    .await,
            )
            .await?;
            if v["sendable"].as_u64().unwrap_or(0) > 0 {
                nz.fetch_add(1, Ordering::Relaxed);
            }
            Ok(1)
        }
    };
    let r = closed_loop(&a.common, u64::MAX, op).await;
    Ok(result_json(
        &a.common,
        &r,
        json!({"users": users, "prefix": a.prefix,
               "nonzero_answers": nonzero.load(Ordering::Relaxed)}),
    ))
}

/// Template sends the simulator answered, by outcome.
pub async fn sim_outcomes(
    http: &reqwest::Client,
    sim: &str,
) -> Result<BTreeMap<String, u64>, String> {
    let v = check(http.get(format!("{sim}/sim/stats")).send().await).await?;
    Ok(v["calls"]["template_send"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default())
}

pub async fn send(a: SendArgs) -> Result<Value, String> {
    if a.due_in > 0.0 {
        return send_drain(a).await;
    }
    let c = a.common.clone();
    let http = client(c.clients);
    let poll_http = client(2);
    let base_out = sim_outcomes(&poll_http, &a.sim).await?;
    let base_ok = base_out.get("ok").copied().unwrap_or(0);
    // The oracle: the simulator's delivery count, sampled every 100 ms.
    let samples: Arc<Mutex<Vec<(f64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let poller = {
        let (samples, stop, sim, http) = (
            samples.clone(),
            stop.clone(),
            a.sim.clone(),
            poll_http.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(o) = sim_outcomes(&http, &sim).await {
                    let ok = o.get("ok").copied().unwrap_or(0) - base_ok;
                    samples
                        .lock()
                        .unwrap()
                        .push((t0.elapsed().as_secs_f64(), ok));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let url: Arc<str> = format!("{}/v1/messages", c.url).into();
    let auth: Arc<str> = format!("Bearer {}", c.key).into();
    let prefix: Arc<str> = a.prefix.clone().into();
    let users = a.users.max(1);
    let op = move |n: u64| {
        let (http, url, auth, prefix) = (http.clone(), url.clone(), auth.clone(), prefix.clone());
        async move {
            post_message(
                &http,
                &url,
                &auth,
                format!("{prefix}{}", n % users),
                n,
                None,
            )
            .await
        }
    };
    let r = closed_loop(&c, a.messages, op).await;
    let post_end = t0.elapsed().as_secs_f64();
    let posted = r.started.min(a.messages);
    // Drain: wait for the backlog (or until no progress for 5 s, or the timeout).
    let drain_deadline = Instant::now() + Duration::from_secs_f64(a.drain_timeout);
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now_ok = samples.lock().unwrap().last().map_or(0, |s| s.1);
        if now_ok >= posted || Instant::now() > drain_deadline {
            break;
        }
        if now_ok != last.1 {
            last = (Instant::now(), now_ok);
        } else if last.0.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let rss_end = c.pid.and_then(vm_hwm_kb);
    stop.store(true, Ordering::Relaxed);
    let _ = poller.await;
    let samples = samples.lock().unwrap().clone();
    let at = |t: f64| -> u64 {
        // Deliveries at time t (last sample at or before t).
        samples
            .iter()
            .take_while(|s| s.0 <= t)
            .last()
            .map_or(0, |s| s.1)
    };
    let (w0, w1) = (c.warmup, c.warmup + r.secs);
    let in_window = at(w1).saturating_sub(at(w0));
    let total = samples.last().map_or(0, |s| s.1);
    let last_change = samples
        .iter()
        .find(|s| s.1 == total)
        .map_or(post_end, |s| s.0);
    let drained = total.saturating_sub(at(post_end));
    let drain_secs = (last_change - post_end).max(0.0);
    let outcomes = sim_outcomes(&poll_http, &a.sim).await?;
    let non_ok: BTreeMap<String, u64> = outcomes
        .into_iter()
        .filter(|(k, _)| k != "ok")
        .map(|(k, v)| {
            let base = base_out.get(&k).copied().unwrap_or(0);
            (k, v - base)
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    let mut v = result_json(
        &c,
        &r,
        json!({
            "posted": posted,
            "sent_in_window": in_window,
            "sent_per_s": round1(in_window as f64 / r.secs),
            "sent_total": total,
            "drained_after_posting": drained,
            "drain_secs": round2(drain_secs),
            "drain_sent_per_s": if drain_secs > 0.5 { round1(drained as f64 / drain_secs) } else { 0.0 },
            "e2e_sent_per_s": round1(total as f64 / last_change.max(0.001)),
            "sim_non_ok": non_ok,
        }),
    );
    v["rss_peak_kb"] = json!(rss_end);
    Ok(v)
}

/// The senders alone: `messages` messages posted, all due at one `send_at`; from then
/// on nothing but the senders works. The rate is the deliveries (the simulator's
/// count, sampled every 50 ms) over the time from `send_at` to the last one.
async fn send_drain(a: SendArgs) -> Result<Value, String> {
    let mut c = a.common.clone();
    // Every message is posted, however long it takes (the check below says whether
    // that was before `send_at`).
    (c.warmup, c.duration) = (0.0, a.due_in + a.drain_timeout);
    let http = client(c.clients);
    let poll_http = client(2);
    let base_ok = sim_outcomes(&poll_http, &a.sim)
        .await?
        .get("ok")
        .copied()
        .unwrap_or(0);
    let t0 = Instant::now();
    let due = chrono::Utc::now() + chrono::TimeDelta::milliseconds((a.due_in * 1000.0) as i64);
    let send_at: Arc<str> = due
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        .into();
    let url: Arc<str> = format!("{}/v1/messages", c.url).into();
    let auth: Arc<str> = format!("Bearer {}", c.key).into();
    let prefix: Arc<str> = a.prefix.clone().into();
    let users = a.users.max(1);
    let op = move |n: u64| {
        let (http, url, auth, prefix, send_at) = (
            http.clone(),
            url.clone(),
            auth.clone(),
            prefix.clone(),
            send_at.clone(),
        );
        async move {
            let openid = format!("{prefix}{}", n % users);
            post_message(&http, &url, &auth, openid, n, Some(&send_at)).await
        }
    };
    let posting = closed_loop(&c, a.messages, op).await;
    let posted = posting.tally.requests;
    let posted_secs = t0.elapsed().as_secs_f64();
    let due_at = Duration::from_secs_f64(a.due_in);
    let early = sim_outcomes(&poll_http, &a.sim)
        .await?
        .get("ok")
        .copied()
        .unwrap_or(0)
        - base_ok;
    tokio::time::sleep(due_at.saturating_sub(t0.elapsed())).await;
    let before = cpu_snap(c.pid, c.sim_pid);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.drain_timeout);
    let (mut last, mut last_at) = (0u64, start);
    while last < posted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ok = sim_outcomes(&poll_http, &a.sim)
            .await?
            .get("ok")
            .copied()
            .unwrap_or(0)
            - base_ok;
        if ok != last {
            (last, last_at) = (ok, Instant::now());
        }
    }
    let secs = (last_at - start).as_secs_f64().max(0.001);
    let cpu = cpu_json(before, cpu_snap(c.pid, c.sim_pid), secs);
    let mut v = result_json(
        &c,
        &posting,
        json!({
            "posted": posted,
            "posted_secs": round2(posted_secs),
            "due_in_s": a.due_in,
            "posting_outlasted_send_at": posted_secs > a.due_in,
            "sent_before_send_at": early,
            "sent_total": last,
            "drain_secs": round2(secs),
            "drain_sent_per_s": round1(last as f64 / secs),
        }),
    );
    // The window that matters is the drain, not the posting.
    v["cpu_cores"] = cpu;
    v["rss_peak_kb"] = json!(c.pid.and_then(vm_hwm_kb));
    Ok(v)
}

/// Posts message `n` of the send scenarios to `openid`, due at `send_at` if given; 1
/// when the service answered with the message's id.
async fn post_message(
    http: &reqwest::Client,
    url: &str,
    auth: &str,
    openid: String,
    n: u64,
    send_at: Option<&str>,
) -> Result<u64, String> {
    let mut body = json!({"openid": openid, "template_id": "TPL_BENCH",
                          "data": {"keyword1": {"value": format!("order {n}")}}});
    if let Some(at) = send_at {
        body["send_at"] = json!(at);
    }
    let v = post_json(http, url, auth, &body).await?;
    if v["id"].is_null() {
        return Err(format!("no id: {v}"));
    }
    Ok(1)
}
