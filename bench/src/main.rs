//! `ledger-load`: the load generator and helpers behind `scripts/bench.sh`.
//!
//! Every subcommand prints one JSON object on stdout (one line) so the script can
//! collect them into a JSONL file; `report` turns that file into Markdown tables.
//!
//! - `ingest`   64 closed-loop clients `POST /v1/credentials` (1 or N form_ids per request,
//!   distinct values, many users), for a fixed time.
//! - `quota`    closed-loop `GET /v1/admin/users/{openid}/quota` over a set of users.
//! - `send-setup` mints form_ids in the simulator and registers them (not timed).
//! - `send`     clients `POST /v1/messages`; the simulator's delivery count over time
//!   (`GET /sim/stats`, `template_send`/`ok`) is the oracle of messages reaching `sent`.
//! - `ceiling`  the service's own `ledger::record` / `ledger::claim` in a tight
//!   in-process loop (no HTTP): the SQLite ceiling (and a PostgreSQL cross-check).
//! - `report`   JSONL → Markdown.
//!
//! The generator runs on a single-threaded tokio runtime so it takes at most one core
//! of the machine away from the service; it reports its own CPU time and that of the
//! service, the simulator and PostgreSQL over the measured window.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "ledger-load", about = "formid-ledger benchmark load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Ingest(IngestArgs),
    Quota(QuotaArgs),
    SendSetup(SendSetupArgs),
    Send(SendArgs),
    Ceiling(CeilingArgs),
    Report(ReportArgs),
}

/// What every timed HTTP scenario takes.
#[derive(Args, Clone)]
struct Common {
    /// Base URL of the service.
    #[arg(long)]
    url: String,
    /// API key (roles send+admin).
    #[arg(long)]
    key: String,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 15.0)]
    duration: f64,
    /// Seconds run but not measured first.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Labels copied into the output.
    #[arg(long, default_value = "")]
    backend: String,
    #[arg(long, default_value = "")]
    phase: String,
    #[arg(long, default_value = "")]
    scenario: String,
    /// The service's pid: its CPU time over the window and VmHWM at the end.
    #[arg(long)]
    pid: Option<u32>,
    /// The simulator's pid (CPU time).
    #[arg(long)]
    sim_pid: Option<u32>,
}

#[derive(Args)]
struct IngestArgs {
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
struct QuotaArgs {
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
struct SendSetupArgs {
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

#[derive(Args)]
struct SendArgs {
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
}

#[derive(Args)]
struct CeilingArgs {
    /// `sqlite://PATH` or `postgres://…` (the service's own pool and pragmas).
    #[arg(long)]
    db: String,
    /// `ingest` (ledger::record of one form_id) or `claim` (ledger::claim).
    #[arg(long)]
    op: String,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 15.0)]
    duration: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    #[arg(long)]
    app: String,
    /// ingest: users `{prefix}{n}`, n = op number modulo `users`;
    /// claim: n uniformly random in [first, first + users).
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    users: u64,
    #[arg(long, default_value_t = 0)]
    first: u64,
    #[arg(long, default_value = "")]
    backend: String,
    #[arg(long, default_value = "")]
    phase: String,
    #[arg(long, default_value = "")]
    scenario: String,
}

#[derive(Args)]
struct ReportArgs {
    /// The JSONL file the other subcommands' outputs were appended to.
    file: String,
}

fn main() {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Ingest(a) => rt().block_on(ingest(a)),
        Cmd::Quota(a) => rt().block_on(quota(a)),
        Cmd::SendSetup(a) => rt().block_on(send_setup(a)),
        Cmd::Send(a) => rt().block_on(send(a)),
        Cmd::Ceiling(a) => ceiling(a),
        Cmd::Report(a) => {
            report(&a.file);
            return;
        }
    };
    match out {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("ledger-load: {e}");
            std::process::exit(1);
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn client(pool: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// A unique tag per process so reruns against the same database never collide.
fn nonce() -> String {
    format!("{:08x}", rand::random::<u32>())
}

// ---------------------------------------------------------------------------------
// CPU and memory accounting from /proc

const TICKS: f64 = 100.0;

fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the full line: utime, stime (index 11, 12 after the name).
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / TICKS)
}

/// CPU seconds of every process whose name is `comm` (PostgreSQL's backends).
fn comm_cpu(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == comm)
                .unwrap_or(false)
        })
        .filter_map(proc_cpu)
        .sum()
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[derive(Clone, Copy)]
struct CpuSnap {
    service: f64,
    sim: f64,
    postgres: f64,
    gen: f64,
    /// Busy CPU seconds of the whole machine (/proc/stat), to see other load.
    machine: f64,
}

fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: busy = all but idle and iowait.
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle) / TICKS
}

fn cpu_snap(c: &Common) -> CpuSnap {
    CpuSnap {
        service: c.pid.and_then(proc_cpu).unwrap_or(0.0),
        sim: c.sim_pid.and_then(proc_cpu).unwrap_or(0.0),
        postgres: comm_cpu("postgres"),
        gen: proc_cpu(std::process::id()).unwrap_or(0.0),
        machine: machine_busy(),
    }
}

fn cpu_json(a: CpuSnap, b: CpuSnap, secs: f64) -> Value {
    let share = |x: f64, y: f64| ((y - x) / secs * 100.0).round() / 100.0;
    json!({
        "service": share(a.service, b.service),
        "postgres": share(a.postgres, b.postgres),
        "sim": share(a.sim, b.sim),
        "generator": share(a.gen, b.gen),
        "machine": share(a.machine, b.machine),
    })
}

// ---------------------------------------------------------------------------------
// The closed loop

#[derive(Default)]
struct Tally {
    requests: u64,
    items: u64,
    errors: u64,
    error_sample: Option<String>,
    lat_us: Vec<u32>,
}

impl Tally {
    /// One measured operation: its items and latency, or its error.
    fn add(&mut self, result: Result<u64, String>, took: Duration) {
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
    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.items += other.items;
        self.errors += other.errors;
        if self.error_sample.is_none() {
            self.error_sample = other.error_sample;
        }
        self.lat_us.extend(other.lat_us);
    }
}

struct LoopResult {
    tally: Tally,
    secs: f64,
    cpu: Value,
    started: u64,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// Runs `clients` loops of `op(seq)` for warm-up + duration; counts the requests
/// that started after the warm-up and finished before the end. `op` answers the
/// number of items it carried, or an error text. `stop_at` bounds the sequence.
async fn closed_loop<F, Fut>(c: &Common, stop_at: u64, op: F) -> LoopResult
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
        let (c2, snap) = (c.clone(), snap.clone());
        local.spawn_local(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            *snap.lock().unwrap() = Some(cpu_snap(&c2));
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
    let after = cpu_snap(c);
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

fn result_json(c: &Common, r: &LoopResult, extra: Value) -> Value {
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

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn check(resp: Result<reqwest::Response, reqwest::Error>) -> Result<Value, String> {
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

// ---------------------------------------------------------------------------------
// Scenarios

async fn ingest(a: IngestArgs) -> Result<Value, String> {
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
            let v = check(
                http.post(&*url)
                    .header("Authorization", &*auth)
                    .json(&body)
                    .send()
                    .await,
            )
            .await?;
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

async fn quota(a: QuotaArgs) -> Result<Value, String> {
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

async fn send_setup(a: SendSetupArgs) -> Result<Value, String> {
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
                        let v = check(
                            http.post(format!("{url}/v1/credentials"))
                                .header("Authorization", format!("Bearer {key}"))
                                .json(&json!({ "credentials": items }))
                                .send()
                                .await,
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

/// Template sends the simulator answered, by outcome.
async fn sim_outcomes(http: &reqwest::Client, sim: &str) -> Result<BTreeMap<String, u64>, String> {
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

async fn send(a: SendArgs) -> Result<Value, String> {
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
            let body = json!({"openid": format!("{prefix}{}", n % users), "template_id": "TPL_BENCH",
                              "data": {"keyword1": {"value": format!("order {n}")}}});
            let v = check(
                http.post(&*url)
                    .header("Authorization", &*auth)
                    .json(&body)
                    .send()
                    .await,
            )
            .await?;
            if v["id"].is_null() {
                return Err(format!("no id: {v}"));
            }
            Ok(1)
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

// ---------------------------------------------------------------------------------
// The in-process ceiling

fn ceiling(a: CeilingArgs) -> Result<Value, String> {
    use formid_ledger::db::Db;
    use formid_ledger::ledger::{self, Item, Kind, Report, Rules};
    use formid_ledger::settings::DatabaseUrl;

    let url = DatabaseUrl::parse(&a.db)?;
    let db = Db::connect(&url, a.threads as u32 + 1).map_err(|e| e.to_string())?;
    db.migrate().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(a.warmup);
    let end = measure_from + Duration::from_secs_f64(a.duration);
    let seq = Arc::new(AtomicU64::new(0));
    let tag = format!("{}{}", a.scenario, nonce());
    let rules = Rules::default();
    let mut handles = Vec::new();
    for _ in 0..a.threads.max(1) {
        let (db, seq, tag, rules) = (db.clone(), seq.clone(), tag.clone(), rules.clone());
        let (op, app, prefix, users, first) = (
            a.op.clone(),
            a.app.clone(),
            a.prefix.clone(),
            a.users.max(1),
            a.first,
        );
        handles.push(std::thread::spawn(move || -> Result<Tally, String> {
            let mut conn = db.get().map_err(|e| e.to_string())?;
            let mut t = Tally::default();
            loop {
                let start = Instant::now();
                if start >= end {
                    break;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let now = formid_ledger::time::now();
                let r: Result<u64, String> = if op == "ingest" {
                    let report = Report {
                        app_id: app.clone(),
                        openid: format!("{prefix}{}", n % users),
                        items: vec![Item::Token {
                            kind: Kind::FormId,
                            value: format!("{tag}-{n}"),
                            issued_at: None,
                        }],
                    };
                    ledger::record(&mut conn, &rules, now, &[report])
                        .map(|o| u64::from(o.accepted))
                        .map_err(|e| e.to_string())
                } else {
                    let openid = format!("{prefix}{}", first + rand::random_range(0..users));
                    ledger::claim(&mut conn, &app, &openid, ledger::Pick::Tokens, now)
                        .map(|u| u64::from(u.is_some()))
                        .map_err(|e| e.to_string())
                };
                let done = Instant::now();
                if start < measure_from || done > end {
                    continue;
                }
                t.add(r, done - start);
            }
            Ok(t)
        }));
    }
    let mut all = Tally::default();
    for h in handles {
        let t = h.join().map_err(|_| "thread panicked".to_string())??;
        all.merge(t);
    }
    all.lat_us.sort_unstable();
    let secs = a.duration;
    let mut v = json!({
        "backend": a.backend, "phase": a.phase, "scenario": a.scenario,
        "tool": "ledger-load ceiling (in-process ledger::record/claim)",
        "threads": a.threads, "secs": secs,
        "requests": all.requests, "items": all.items, "errors": all.errors,
        "rps": round1(all.requests as f64 / secs),
        "items_per_s": round1(all.items as f64 / secs),
        "p50_ms": round2(pct(&all.lat_us, 0.50)),
        "p99_ms": round2(pct(&all.lat_us, 0.99)),
    });
    if let Some(e) = all.error_sample {
        v["error_sample"] = json!(e);
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------
// Report: JSONL → Markdown

/// The send rate held against the claim ceiling: with a backlog after posting
/// stopped (the senders alone), else the rate while 64 clients were posting.
fn send_metric(r: &Value) -> &'static str {
    if r["drain_sent_per_s"].as_f64().unwrap_or(0.0) > 0.0 {
        "drain_sent_per_s"
    } else {
        "sent_per_s"
    }
}

fn report(file: &str) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let rows: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let find = |backend: &str, phase: &str, scenario: &str| -> Option<&Value> {
        rows.iter()
            .rev()
            .find(|r| r["backend"] == backend && r["phase"] == phase && r["scenario"] == scenario)
    };
    let mut backends: Vec<String> = Vec::new();
    for r in &rows {
        if let Some(b) = r["backend"].as_str() {
            if !b.is_empty() && !backends.iter().any(|x| x == b) {
                backends.push(b.to_string());
            }
        }
    }
    let f = |v: &Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.1}"));
    let f2 = |v: &Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.2}"));
    for b in &backends {
        println!("\n### {b}\n");
        println!("| phase | scenario | req/s | items/s | p50 ms | p99 ms | errors | ceiling | ratio | peak RSS MB | CPU cores svc/pg/sim/gen (machine) |");
        println!("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|");
        let phases: Vec<String> = {
            let mut p: Vec<String> = Vec::new();
            for r in rows.iter().filter(|r| r["backend"] == b.as_str()) {
                let ph = r["phase"].as_str().unwrap_or("").to_string();
                if !p.contains(&ph) {
                    p.push(ph);
                }
            }
            p
        };
        for ph in &phases {
            for r in rows.iter().filter(|r| {
                r["backend"] == b.as_str() && r["phase"] == ph.as_str() && r["scenario"].is_string()
            }) {
                let sc = r["scenario"].as_str().unwrap_or("");
                // Which ceiling the scenario is held against.
                let (ceil_name, ceil_metric, own) = match sc {
                    "ingest-single" => ("ceiling-ingest", "rps", "rps"),
                    "ingest-batch" => ("ceiling-ingest", "rps", "items_per_s"),
                    "send" => ("ceiling-claim", "rps", send_metric(r)),
                    _ => ("", "", "rps"),
                };
                let ceiling = if ceil_name.is_empty() {
                    None
                } else {
                    find(b, ph, ceil_name)
                };
                let ceil_val = ceiling.and_then(|c| c[ceil_metric].as_f64());
                let own_val = r[own].as_f64();
                let ratio = match (own_val, ceil_val) {
                    (Some(o), Some(c)) if c > 0.0 => format!("{:.2}×", o / c),
                    _ => "–".into(),
                };
                let ceil_txt = ceil_val.map_or("–".into(), |c| format!("{ceil_name} {c:.0}/s"));
                let items = if sc == "send" {
                    format!(
                        "{} sent/s ({} while posting)",
                        f(&r[send_metric(r)]),
                        f(&r["sent_per_s"])
                    )
                } else {
                    f(&r["items_per_s"])
                };
                let rss = r["rss_peak_kb"]
                    .as_f64()
                    .map_or("–".into(), |k| format!("{:.1}", k / 1024.0));
                let cpu = &r["cpu_cores"];
                let cpu_txt = if cpu.is_object() {
                    format!(
                        "{}/{}/{}/{} ({})",
                        f2(&cpu["service"]),
                        f2(&cpu["postgres"]),
                        f2(&cpu["sim"]),
                        f2(&cpu["generator"]),
                        f2(&cpu["machine"])
                    )
                } else {
                    "–".into()
                };
                println!(
                    "| {ph} | {sc} | {} | {items} | {} | {} | {} | {ceil_txt} | {ratio} | {rss} | {cpu_txt} |",
                    f(&r["rps"]),
                    f2(&r["p50_ms"]),
                    f2(&r["p99_ms"]),
                    r["errors"].as_u64().unwrap_or(0),
                );
            }
        }
        // The targets, per phase.
        println!("\nTargets ({b})\n");
        println!("| phase | target | measured | met |");
        println!("|---|---|---:|---|");
        let num = |ph: &str, sc: &str, key: &str| find(b, ph, sc).and_then(|r| r[key].as_f64());
        let yes = |ok: bool| if ok { "yes" } else { "**no**" };
        for ph in &phases {
            if let (Some(s), Some(c)) = (
                num(ph, "ingest-single", "rps"),
                num(ph, "ceiling-ingest", "rps"),
            ) {
                println!(
                    "| {ph} | ingest single ≥ 1.0× ingest ceiling | {:.2}× | {} |",
                    s / c,
                    yes(s >= c)
                );
            }
            if let (Some(bt), Some(s)) = (
                num(ph, "ingest-batch", "items_per_s"),
                num(ph, "ingest-single", "rps"),
            ) {
                println!(
                    "| {ph} | ingest batch ≥ 5× single (credentials/s) | {:.2}× | {} |",
                    bt / s,
                    yes(bt >= 5.0 * s)
                );
            }
            if let (Some(r), Some(c)) = (find(b, ph, "send"), num(ph, "ceiling-claim", "rps")) {
                let sent = r[send_metric(r)].as_f64().unwrap_or(0.0);
                println!(
                    "| {ph} | send ≥ 0.4× claim ceiling | {:.2}× | {} |",
                    sent / c,
                    yes(sent >= 0.4 * c)
                );
            }
            for sc in ["ingest-single", "ingest-batch", "quota", "quota-bulk"] {
                if let Some(p99) = num(ph, sc, "p99_ms") {
                    println!(
                        "| {ph} | p99 of {sc} < 20 ms | {p99:.1} ms | {} |",
                        yes(p99 < 20.0)
                    );
                }
            }
            let rss = rows
                .iter()
                .filter(|r| r["backend"] == b.as_str() && r["phase"] == ph.as_str())
                .filter_map(|r| r["rss_peak_kb"].as_f64())
                .fold(0.0f64, f64::max);
            if rss > 0.0 {
                println!(
                    "| {ph} | peak RSS < 100 MB | {:.1} MB | {} |",
                    rss / 1024.0,
                    yes(rss < 100.0 * 1024.0)
                );
            }
        }
        // Scale: each scenario at size vs empty.
        let big: Vec<&String> = phases.iter().filter(|p| p.as_str() != "empty").collect();
        for ph in big {
            println!("\nScale ({b}): rate at `{ph}` / rate on the empty database\n");
            println!("| scenario | empty | {ph} | ratio |");
            println!("|---|---:|---:|---:|");
            for sc in ["ingest-single", "ingest-batch", "send", "quota"] {
                let metric = |r: &Value| match sc {
                    "ingest-batch" => "items_per_s",
                    "send" => send_metric(r),
                    _ => "rps",
                };
                let e = find(b, "empty", sc).and_then(|r| r[metric(r)].as_f64());
                let s = find(b, ph, sc).and_then(|r| r[metric(r)].as_f64());
                let metric = find(b, ph, sc).map_or("rps", metric);
                if let (Some(e), Some(s)) = (e, s) {
                    let ratio = s / e.max(0.001);
                    let met = if ratio >= 0.8 {
                        ""
                    } else {
                        " **(> 20 % slower)**"
                    };
                    println!("| {sc} ({metric}) | {e:.1} | {s:.1} | {ratio:.2}{met} |");
                }
            }
        }
    }
}
