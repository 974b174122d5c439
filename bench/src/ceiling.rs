//! The in-process ceilings on the service's own pool (its pragmas: WAL,
//! `synchronous=NORMAL` on SQLite), with no HTTP:
//!
//! - `ingest` / `claim`: the service's own `ledger::record` / `ledger::claim` in a
//!   tight loop ("own SQL": only says how fast the service's own statements are);
//! - `plain-insert` / `plain-claim`: the plain ceilings, the database doing the
//!   plainest durable write per row: one `INSERT … ON CONFLICT DO NOTHING` of a
//!   credential row, or one claim `UPDATE … RETURNING`, each its own (autocommit)
//!   transaction. On PostgreSQL pgbench measures the same statements
//!   (`scripts/bench/pgbench_plain_insert.sql`, `pgbench_claim.sql`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use diesel::sql_types::{Text, Timestamp};
use diesel::RunQueryDsl;
use formid_ledger::db::{native_sql, Db, DbConn};
use formid_ledger::ledger::{self, Item, Kind, Report, Rules};
use formid_ledger::settings::DatabaseUrl;

use crate::load::{nonce, pct, round1, round2, Tally};

#[derive(Args)]
pub struct CeilingArgs {
    /// `sqlite://PATH` or `postgres://…` (the service's own pool and pragmas).
    #[arg(long)]
    db: String,
    /// `ingest` (ledger::record of one form_id), `claim` (ledger::claim),
    /// `plain-insert` (one INSERT … ON CONFLICT DO NOTHING per transaction) or
    /// `plain-claim` (one claim UPDATE … RETURNING per transaction).
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

/// One credential row, as the service stores a form_id; a value known already is
/// skipped by the unique index (app_id, value).
const PLAIN_INSERT: &str = "INSERT INTO credentials (app_id, openid, kind, value, uses_total, \
     uses_left, issued_at, expires_at, created_at, updated_at) \
     VALUES ($1, $2, 'form_id', $3, 1, 1, $4, $5, $4, $4) ON CONFLICT DO NOTHING";

/// The claim statement as the service issues it (src/ledger/claim.rs, SOONEST), alone.
const PLAIN_CLAIM: &str = "UPDATE credentials SET uses_left = uses_left - 1, updated_at = $3 \
     WHERE id = (SELECT id FROM credentials WHERE app_id = $1 AND openid = $2 \
       AND kind IN ('form_id', 'prepay_id') AND uses_left > 0 AND NOT invalid \
       AND expires_at > $3 ORDER BY expires_at, id LIMIT 1) AND uses_left > 0";

/// One plain statement in autocommit: rows it wrote.
fn plain(
    conn: &mut DbConn,
    sql: &str,
    binds: &[&str],
    times: &[chrono::NaiveDateTime],
) -> Result<u64, String> {
    let sql = native_sql(conn, sql);
    let n = formid_ledger::dispatch!(conn, |c| {
        let mut q = diesel::sql_query(&sql).into_boxed();
        for b in binds {
            q = q.bind::<Text, _>(b.to_string());
        }
        for t in times {
            q = q.bind::<Timestamp, _>(*t);
        }
        q.execute(c)
    })
    .map_err(|e| e.to_string())?;
    Ok(n as u64)
}

pub fn ceiling(a: CeilingArgs) -> Result<Value, String> {
    if !["ingest", "claim", "plain-insert", "plain-claim"].contains(&a.op.as_str()) {
        return Err(format!("unknown --op {}", a.op));
    }
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
                let r: Result<u64, String> = if op == "plain-insert" {
                    let now = formid_ledger::time::to_db(now);
                    let expires = now + ledger::VALIDITY - Rules::default().expiry_margin;
                    plain(
                        &mut conn,
                        PLAIN_INSERT,
                        &[
                            &app,
                            &format!("{prefix}{}", n % users),
                            &format!("{tag}-{n}"),
                        ],
                        &[now, expires],
                    )
                } else if op == "plain-claim" {
                    let openid = format!("{prefix}{}", first + rand::random_range(0..users));
                    plain(
                        &mut conn,
                        PLAIN_CLAIM,
                        &[&app, &openid],
                        &[formid_ledger::time::to_db(now)],
                    )
                } else if op == "ingest" {
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
        "tool": if a.op.starts_with("plain") {
            format!("ledger-load ceiling --op {} (in-process, one statement per transaction)", a.op)
        } else {
            format!("ledger-load ceiling --op {} (in-process, the service's own SQL)", a.op)
        },
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
