//! `campaign`: one `POST /v1/campaigns` naming `--users` openids (each holding a
//! form_id registered by `send-setup`), no `rate_per_s`: how long the request takes,
//! then recipients sent per second, from the simulator's delivery count (the oracle),
//! until the campaign is `done`. With `--probe-users`, single messages to other users
//! (each holding a form_id of its own) are posted one at a time, before the campaign
//! and while it runs, and timed from `POST ?wait=30` to `sent`: what the campaign
//! costs other traffic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::load::{check, client, post_json, round1, round2};
use crate::procstat::vm_hwm_kb;
use crate::scenarios::sim_outcomes;

#[derive(Args)]
pub struct CampaignArgs {
    /// Base URL of the service.
    #[arg(long)]
    url: String,
    /// API key with role send.
    #[arg(long)]
    key: String,
    /// Base URL of the simulator.
    #[arg(long)]
    sim: String,
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    users: u64,
    /// Give up waiting for `done` after this long.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    #[arg(long, default_value = "")]
    backend: String,
    #[arg(long, default_value = "")]
    phase: String,
    #[arg(long)]
    pid: Option<u32>,
    /// Openid prefix of the probe users (`<prefix>0`, `<prefix>1`, …).
    #[arg(long, default_value = "")]
    probe_prefix: String,
    /// Probe users, one single message each: a tenth before the campaign, the
    /// rest one at a time while it runs, each 200 ms after the previous one was
    /// sent. 0: no probes.
    #[arg(long, default_value_t = 0)]
    probe_users: u64,
}

/// Posts a single message to `openid` and waits for it: milliseconds until `sent`.
async fn probe(http: &reqwest::Client, url: &str, auth: &str, openid: &str) -> Result<f64, String> {
    let t0 = Instant::now();
    let m = post_json(
        http,
        &format!("{url}/v1/messages?wait=30"),
        auth,
        &json!({"openid": openid, "template_id": "TPL_BENCH_PROBE"}),
    )
    .await?;
    if m["status"] != "sent" {
        return Err(format!("probe message not sent: {m}"));
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// Median and largest of `ms`, rounded.
fn spread(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    match ms.last() {
        Some(max) => {
            json!({"n": ms.len(), "p50_ms": round1(ms[ms.len() / 2]), "max_ms": round1(*max)})
        }
        None => json!({"n": 0}),
    }
}

pub async fn campaign(a: CampaignArgs) -> Result<Value, String> {
    let http = client(4);
    let auth = format!("Bearer {}", a.key);
    let delivered = |http: reqwest::Client, sim: String| async move {
        Ok::<u64, String>(
            sim_outcomes(&http, &sim)
                .await?
                .get("ok")
                .copied()
                .unwrap_or(0),
        )
    };
    let idle_probes = a.probe_users / 10;
    let mut idle = Vec::new();
    for u in 0..idle_probes {
        idle.push(probe(&http, &a.url, &auth, &format!("{}{u}", a.probe_prefix)).await?);
    }
    let before = delivered(http.clone(), a.sim.clone()).await?;
    let openids: Vec<String> = (0..a.users).map(|u| format!("{}{u}", a.prefix)).collect();
    let body = json!({"template_id": "TPL_BENCH_CAMPAIGN", "audience": {"openids": openids},
                      "data": {"keyword1": {"value": "campaign"}}});
    let t0 = Instant::now();
    let created = post_json(&http, &format!("{}/v1/campaigns", a.url), &auth, &body).await?;
    let create_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let id = created["id"]
        .as_str()
        .ok_or_else(|| format!("no campaign id: {created}"))?
        .to_string();
    let deadline = t0 + Duration::from_secs_f64(a.timeout);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let probed = Arc::new(AtomicU64::new(0));
    let probes = {
        let (http, url, auth, prefix) = (
            http.clone(),
            a.url.clone(),
            auth.clone(),
            a.probe_prefix.clone(),
        );
        let probed = probed.clone();
        let users = idle_probes..a.probe_users;
        tokio::spawn(async move {
            let mut during = Vec::new();
            for u in users {
                if *stopped.borrow() {
                    break;
                }
                during.push(probe(&http, &url, &auth, &format!("{prefix}{u}")).await?);
                probed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok::<_, String>(during)
        })
    };
    let (mut first, mut last, mut sent) = (None::<f64>, 0.0, 0u64);
    let finished = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = (delivered(http.clone(), a.sim.clone()).await? - before)
            .saturating_sub(probed.load(Ordering::Relaxed));
        let at = t0.elapsed().as_secs_f64();
        if now > 0 && first.is_none() {
            first = Some(at);
        }
        if now != sent {
            (sent, last) = (now, at);
        }
        let c = check(
            http.get(format!("{}/v1/campaigns/{id}", a.url))
                .header("Authorization", &auth)
                .send()
                .await,
        )
        .await?;
        if !c["finished_at"].is_null() || Instant::now() > deadline {
            break c;
        }
    };
    let _ = stop.send(true);
    let during = probes.await.map_err(|e| e.to_string())??;
    // The simulator's count includes the probes sent while the campaign ran.
    let sent = (delivered(http.clone(), a.sim.clone()).await? - before)
        .saturating_sub(during.len() as u64);
    let counts = &finished["counts"];
    let span = (last - first.unwrap_or(0.0)).max(0.001);
    Ok(json!({
        "backend": a.backend, "phase": a.phase, "scenario": "campaign",
        "recipients": a.users, "status": finished["status"], "counts": counts,
        "create_ms": round1(create_ms),
        "first_sent_after_s": round2(first.unwrap_or(0.0)),
        "sent": sent,
        "sent_per_s": round1(sent as f64 / span),
        "e2e_sent_per_s": round1(sent as f64 / last.max(0.001)),
        "probe_idle": spread(idle),
        "probe_during": spread(during),
        "rss_peak_kb": a.pid.and_then(vm_hwm_kb),
    }))
}
