//! The closed loop every timed HTTP scenario runs, its tallies and its JSON result,
//! and the HTTP helpers the scenarios share.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::procstat::{cpu_json, cpu_snap, vm_hwm_kb, CpuSnap};

/// What every timed HTTP scenario takes.
#[derive(Args, Clone)]
pub struct Common {
    /// Base URL of the service.
    #[arg(long)]
    pub url: String,
    /// API key (roles send+admin).
    #[arg(long)]
    pub key: String,
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 15.0)]
    pub duration: f64,
    /// Seconds run but not measured first.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Labels copied into the output.
    #[arg(long, default_value = "")]
    pub backend: String,
    #[arg(long, default_value = "")]
    pub phase: String,
    #[arg(long, default_value = "")]
    pub scenario: String,
    /// The service's pid: its CPU time over the window and VmHWM at the end.
    #[arg(long)]
    pub pid: Option<u32>,
    /// The simulator's pid (CPU time).
    #[arg(long)]
    pub sim_pid: Option<u32>,
}

pub fn client(pool: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// A unique tag per process so reruns against the same database never collide.
pub fn nonce() -> String {
    format!("{:08x}", rand::random::<u32>())
}

#[derive(Default)]
pub struct Tally {
    pub requests: u64,
    pub items: u64,
    pub errors: u64,
    pub error_sample: Option<String>,
    pub lat_us: Vec<u32>,
}

impl Tally {
    /// One measured operation: its items and latency, or its error.
    pub fn add(&mut self, result: Result<u64, String>, took: Duration) {
        match result {
            Ok(items) => {
                self.requests += 1;
                self.items += items;
                self.lat_us
                    .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
            }
            Err(e) => {
                self.errors += 1;
                self.error_sample.get_or_insert(e);
            }
        }
    }

    /// Adds another thread's or task's tally.
    pub fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.items += other.items;
        self.errors += other.errors;
        if self.error_sample.is_none() {
            self.error_sample = other.error_sample;
        }
        self.lat_us.extend(other.lat_us);
    }
}

pub struct LoopResult {
    pub tally: Tally,
    pub secs: f64,
    pub cpu: Value,
    pub started: u64,
}

pub fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// Runs `clients` loops of `op(seq)` for warm-up + duration; counts the requests
/// that started after the warm-up and finished before the end. `op` answers the
/// number of items it carried, or an error text. `stop_at` bounds the sequence.
pub async fn closed_loop<F, Fut>(c: &Common, stop_at: u64, op: F) -> LoopResult
where
    F: Fn(u64) -> Fut + Clone + 'static,
    Fut: Future<Output = Result<u64, String>> + 'static,
{
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(c.warmup);
    let end = measure_from + Duration::from_secs_f64(c.duration);
    let seq = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let snap: Arc<Mutex<Option<CpuSnap>>> = Arc::new(Mutex::new(None));
    let local = tokio::task::LocalSet::new();
    {
        let (pid, sim_pid, snap) = (c.pid, c.sim_pid, snap.clone());
        local.spawn_local(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            *snap.lock().unwrap() = Some(cpu_snap(pid, sim_pid));
        });
    }
    for _ in 0..c.clients {
        let (op, seq, tally) = (op.clone(), seq.clone(), tally.clone());
        local.spawn_local(async move {
            let mut mine = Tally::default();
            loop {
                let start = Instant::now();
                if start >= end {
                    break;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                if n >= stop_at {
                    break;
                }
                let r = op(n).await;
                let done = Instant::now();
                if start < measure_from || done > end {
                    continue;
                }
                mine.add(r, done - start);
            }
            tally.lock().unwrap().merge(mine);
        });
    }
    local.await;
    let finished = Instant::now().min(end);
    let after = cpu_snap(c.pid, c.sim_pid);
    let secs = (finished - measure_from).as_secs_f64().max(0.001);
    let before = snap.lock().unwrap().unwrap_or(after);
    let mut tally = std::mem::take(&mut *tally.lock().unwrap());
    tally.lat_us.sort_unstable();
    LoopResult {
        tally,
        secs,
        cpu: cpu_json(before, after, secs),
        started: seq.load(Ordering::Relaxed),
    }
}

pub fn result_json(c: &Common, r: &LoopResult, extra: Value) -> Value {
    let t = &r.tally;
    let mut v = json!({
        "backend": c.backend, "phase": c.phase, "scenario": c.scenario,
        "clients": c.clients, "secs": round2(r.secs),
        "requests": t.requests, "items": t.items, "errors": t.errors,
        "rps": round1(t.requests as f64 / r.secs),
        "items_per_s": round1(t.items as f64 / r.secs),
        "p50_ms": round2(pct(&t.lat_us, 0.50)),
        "p99_ms": round2(pct(&t.lat_us, 0.99)),
        "max_ms": round2(t.lat_us.last().map_or(0.0, |&x| f64::from(x) / 1000.0)),
        "cpu_cores": r.cpu,
        "rss_peak_kb": c.pid.and_then(vm_hwm_kb),
    });
    if let Some(e) = &t.error_sample {
        v["error_sample"] = json!(e);
    }
    if let (Value::Object(m), Value::Object(x)) = (&mut v, extra) {
        m.extend(x);
    }
    v
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// POSTs `body` as JSON with `Authorization: <auth>` and [`check`]s the answer.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    auth: &str,
    body: &Value,
) -> Result<Value, String> {
    check(
        http.post(url)
            .header("Authorization", auth)
            .json(body)
            .send()
            .await,
    )
    .await
}

pub async fn check(resp: Result<reqwest::Response, reqwest::Error>) -> Result<Value, String> {
    let resp = resp.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(200)
                .collect::<String>()
        ));
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}
