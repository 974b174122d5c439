//! `send-setup`: the credentials the `send` scenario spends, minted in the simulator
//! and registered with the service before the clock starts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};

use crate::load::{check, client, post_json, round2};

#[derive(Args)]
pub struct SendSetupArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    key: String,
    /// Base URL of the simulator.
    #[arg(long)]
    sim: String,
    #[arg(long)]
    app: String,
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    users: u64,
    /// form_ids per user (the user cap is 200 by default).
    #[arg(long, default_value_t = 200)]
    per_user: u32,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

pub async fn send_setup(a: SendSetupArgs) -> Result<Value, String> {
    let http = client(a.concurrency);
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let registered = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let local = tokio::task::LocalSet::new();
    for _ in 0..a.concurrency {
        let (http, next, registered, failed) = (
            http.clone(),
            next.clone(),
            registered.clone(),
            failed.clone(),
        );
        let (url, key, sim, app, prefix) = (
            a.url.clone(),
            a.key.clone(),
            a.sim.clone(),
            a.app.clone(),
            a.prefix.clone(),
        );
        let (users, per_user) = (a.users, a.per_user);
        local.spawn_local(async move {
            loop {
                let u = next.fetch_add(1, Ordering::Relaxed);
                if u >= users || failed.lock().unwrap().is_some() {
                    break;
                }
                let openid = format!("{prefix}{u}");
                let r = async {
                    let minted = check(
                        http.post(format!("{sim}/sim/form-ids"))
                            .json(&json!({"appid": app, "openid": openid, "count": per_user}))
                            .send()
                            .await,
                    )
                    .await?;
                    let ids = minted["form_ids"].as_array().cloned().unwrap_or_default();
                    let mut n = 0;
                    for chunk in ids.chunks(500) {
                        let items: Vec<Value> = chunk
                            .iter()
                            .map(|v| json!({"openid": openid, "kind": "form_id", "value": v}))
                            .collect();
                        let v = post_json(
                            &http,
                            &format!("{url}/v1/credentials"),
                            &format!("Bearer {key}"),
                            &json!({ "credentials": items }),
                        )
                        .await?;
                        n += v["accepted"].as_u64().unwrap_or(0);
                    }
                    Ok::<u64, String>(n)
                }
                .await;
                match r {
                    Ok(n) => {
                        registered.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => *failed.lock().unwrap() = Some(e),
                }
            }
        });
    }
    local.await;
    if let Some(e) = failed.lock().unwrap().take() {
        return Err(format!("send-setup: {e}"));
    }
    Ok(
        json!({"setup": "send", "users": a.users, "registered": registered.load(Ordering::Relaxed),
              "secs": round2(t0.elapsed().as_secs_f64())}),
    )
}
