//! Report: the JSONL the other subcommands wrote → Markdown tables.

use clap::Args;
use serde_json::Value;

#[derive(Args)]
pub struct ReportArgs {
    /// The JSONL file the other subcommands' outputs were appended to.
    pub file: String,
}

/// The send rate held against the claim ceiling: with a backlog after posting
/// stopped (the senders alone), else the rate while 64 clients were posting.
fn send_metric(r: &Value) -> &'static str {
    if r["drain_sent_per_s"].as_f64().unwrap_or(0.0) > 0.0 {
        "drain_sent_per_s"
    } else {
        "sent_per_s"
    }
}

/// The `send` scenario in drain mode (`drain-0ms`, `drain-50ms`: the simulator's
/// latency): every message due at one `send_at`, the senders alone.
fn is_drain(scenario: &str) -> bool {
    scenario.starts_with("drain-")
}

/// The webhook delivery rate of the `webhooks` scenario: after posting stopped when
/// there was a backlog, else while the clients were posting.
fn webhook_metric(r: &Value) -> &'static str {
    if r["drain_events_per_s"].as_f64().unwrap_or(0.0) > 0.0 {
        "drain_events_per_s"
    } else {
        "events_per_s"
    }
}

/// The targets for one backend (the report's and the chart's).
pub struct Targets {
    /// ingest-single ≥ this × the plain insert ceiling.
    pub single: f64,
    /// ingest-batch credentials/s at least.
    pub batch: f64,
}

/// Sending, drained, ≥ this × the plain claim ceiling (both backends).
pub const SEND_TARGET: f64 = 0.4;

impl Targets {
    pub fn of(backend: &str) -> Targets {
        match backend {
            "sqlite" => Targets {
                single: 1.5,
                batch: 100_000.0,
            },
            _ => Targets {
                single: 1.0,
                batch: 50_000.0,
            },
        }
    }
}

fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let (k, r) = (n / 1000, n % 1000);
    if k == 0 {
        format!("{r}")
    } else {
        format!("{k},{r:03}")
    }
}

/// A scenario's name in the tables: the own-SQL ceilings say so.
fn label(scenario: &str) -> String {
    match scenario {
        "ceiling-ingest" | "ceiling-claim" | "ceiling-ingest-inproc" | "ceiling-claim-inproc" => {
            format!("{scenario} (own SQL)")
        }
        _ => scenario.to_string(),
    }
}

pub fn report(file: &str) {
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
                // Which ceiling the scenario is held against: the plain one; an
                // older results file without it, the own-SQL one, so labelled.
                let (ceil_names, own): (&[&str], &str) = match sc {
                    "ingest-single" => (&["plain-insert", "ceiling-ingest"], "rps"),
                    "ingest-batch" => (&["plain-insert", "ceiling-ingest"], "items_per_s"),
                    "send" => (&["plain-claim", "ceiling-claim"], send_metric(r)),
                    _ if is_drain(sc) => (&["plain-claim", "ceiling-claim"], "drain_sent_per_s"),
                    _ => (&[], "rps"),
                };
                let ceiling = ceil_names
                    .iter()
                    .find_map(|name| find(b, ph, name).map(|c| (*name, c)));
                let ceil_val = ceiling.and_then(|(_, c)| c["rps"].as_f64());
                let own_val = r[own].as_f64();
                let ratio = match (own_val, ceil_val) {
                    (Some(o), Some(c)) if c > 0.0 => format!("{:.2}×", o / c),
                    _ => "–".into(),
                };
                let ceil_txt = match (ceiling, ceil_val) {
                    (Some((name, _)), Some(c)) => format!("{} {c:.0}/s", label(name)),
                    _ => "–".into(),
                };
                let items = if sc == "send" {
                    format!(
                        "{} sent/s ({} while posting)",
                        f(&r[send_metric(r)]),
                        f(&r["sent_per_s"])
                    )
                } else if is_drain(sc) {
                    format!(
                        "{} sent/s drained ({} posted, simulator at {} ms)",
                        f(&r["drain_sent_per_s"]),
                        r["posted"],
                        r["sim_latency_ms"]
                    )
                } else if sc == "webhooks" {
                    format!(
                        "{} events/s ({} while posting)",
                        f(&r[webhook_metric(r)]),
                        f(&r["events_per_s"])
                    )
                } else if sc == "push" {
                    format!("{} applied/s", f(&r["items_per_s"]))
                } else if sc == "mixed-drain" {
                    format!(
                        "{} sent/s drained ({} posted) beside reporters",
                        f(&r["drain_sent_per_s"]),
                        r["posted"]
                    )
                } else if sc == "campaign" {
                    format!(
                        "{} sent/s ({} recipients, created in {} ms)",
                        f(&r["sent_per_s"]),
                        r["recipients"],
                        f(&r["create_ms"])
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
                let sc = label(sc);
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
        let t = Targets::of(b);
        for ph in &phases {
            let plain_insert = num(ph, "plain-insert", "rps");
            let plain_claim = num(ph, "plain-claim", "rps");
            match (num(ph, "ingest-single", "rps"), plain_insert) {
                (Some(s), Some(c)) => println!(
                    "| {ph} | ingest single ≥ {:.1}× plain insert ceiling ({c:.0}/s) | {s:.0}/s = {:.2}× | {} |",
                    t.single,
                    s / c,
                    yes(s >= t.single * c)
                ),
                (Some(s), None) => println!(
                    "| {ph} | ingest single ≥ {:.1}× plain insert ceiling | {s:.0}/s, no plain ceiling measured | **no** |",
                    t.single
                ),
                _ => {}
            }
            if let Some(bt) = num(ph, "ingest-batch", "items_per_s") {
                println!(
                    "| {ph} | ingest batch ≥ {} credentials/s | {bt:.0}/s | {} |",
                    thousands(t.batch),
                    yes(bt >= t.batch)
                );
            }
            if let Some(r) = find(b, ph, "send") {
                let sent = r[send_metric(r)].as_f64().unwrap_or(0.0);
                match plain_claim {
                    Some(c) => println!(
                        "| {ph} | send ≥ 0.4× plain claim ceiling ({c:.0}/s) | {sent:.0}/s = {:.2}× | {} |",
                        sent / c,
                        yes(sent >= SEND_TARGET * c)
                    ),
                    None => println!(
                        "| {ph} | send ≥ 0.4× plain claim ceiling | {sent:.0}/s, no plain ceiling measured | **no** |"
                    ),
                }
            }
            for r in rows.iter().filter(|r| {
                r["backend"] == b.as_str()
                    && r["phase"] == ph.as_str()
                    && r["scenario"].as_str().is_some_and(is_drain)
            }) {
                let sent = r["drain_sent_per_s"].as_f64().unwrap_or(0.0);
                let lat = &r["sim_latency_ms"];
                let late = if r["posting_outlasted_send_at"] == true {
                    " (posting outlasted send_at: not the senders alone)"
                } else {
                    ""
                };
                match plain_claim {
                    Some(c) => println!(
                        "| {ph} | send drained, simulator at {lat} ms, ≥ 0.4× plain claim ceiling ({c:.0}/s) | {sent:.0}/s = {:.2}×{late} | {} |",
                        sent / c,
                        yes(sent >= SEND_TARGET * c && late.is_empty())
                    ),
                    None => println!(
                        "| {ph} | send drained, simulator at {lat} ms, ≥ 0.4× plain claim ceiling | {sent:.0}/s, no plain ceiling measured | **no** |"
                    ),
                }
            }
            for sc in ["ingest-single", "quota", "quota-bulk"] {
                if let Some(p99) = num(ph, sc, "p99_ms") {
                    println!(
                        "| {ph} | p99 of {sc} < 20 ms | {p99:.1} ms | {} |",
                        yes(p99 < 20.0)
                    );
                }
            }
            if let Some(r) = find(b, ph, "push") {
                println!(
                    "| {ph} | push: every acknowledged push applied (receipts, grants / acknowledged) | {}, {} / {} | {} |",
                    r["push_receipts"], r["pushed_grants"], r["acknowledged_total"],
                    yes(r["applied_equals_acknowledged"] == true)
                );
            }
            if let Some(r) = find(b, ph, "webhooks") {
                let posted = r["posted"].as_u64().unwrap_or(0);
                let missing = r["finished_events_missing"].as_u64().unwrap_or(0);
                println!(
                    "| {ph} | webhooks: every posted message's message.finished arrived | {} / {posted} | {} |",
                    posted.saturating_sub(missing),
                    yes(r["all_events_arrived"] == true)
                );
            }
            if let Some(r) = find(b, ph, "campaign") {
                campaign_targets(ph, r, find(b, ph, "send"));
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
        // p99 against clients (BENCH_CLIENT_CURVE), with Little's law: in a closed
        // loop the mean latency is clients / rate, so p99 < 20 ms needs at least
        // clients / 20 ms requests per second.
        for ph in &phases {
            for sc in ["ingest-single", "quota"] {
                let mut points: Vec<(u64, &Value)> = rows
                    .iter()
                    .filter(|r| r["backend"] == b.as_str() && r["phase"] == ph.as_str())
                    .filter(|r| {
                        let name = r["scenario"].as_str().unwrap_or("");
                        name == sc
                            || name
                                .strip_prefix(sc)
                                .and_then(|rest| rest.strip_prefix("-c"))
                                .is_some_and(|n| n.parse::<u64>().is_ok())
                    })
                    .filter_map(|r| r["clients"].as_u64().map(|c| (c, r)))
                    .collect();
                if points.len() < 2 {
                    continue;
                }
                points.sort_by_key(|(c, _)| *c);
                points.dedup_by_key(|(c, _)| *c);
                println!("\np99 against clients ({b}, {ph}, {sc})\n");
                println!("| clients | req/s | p50 ms | p99 ms | mean ms = clients / rate (Little) | rate p99 < 20 ms needs at least (clients / 20 ms) |");
                println!("|---:|---:|---:|---:|---:|---:|");
                for (c, r) in points {
                    let rps = r["rps"].as_f64().unwrap_or(0.0);
                    let mean = if rps > 0.0 {
                        c as f64 / rps * 1000.0
                    } else {
                        f64::NAN
                    };
                    println!(
                        "| {c} | {} | {} | {} | {mean:.2} | {:.0}/s |",
                        f(&r["rps"]),
                        f2(&r["p50_ms"]),
                        f2(&r["p99_ms"]),
                        c as f64 / 0.020
                    );
                }
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

/// The campaign scenario's lines of the targets table: its request answers within a
/// second, every recipient is sent, single messages posted meanwhile are not held up
/// by it, and its rate beside the send scenario's.
fn campaign_targets(ph: &str, r: &Value, send: Option<&Value>) {
    let yes = |ok: bool| if ok { "yes" } else { "**no**" };
    let create_ms = r["create_ms"].as_f64().unwrap_or(f64::MAX);
    println!(
        "| {ph} | campaign of {} recipients: POST answers < 1 s | {create_ms:.0} ms | {} |",
        r["recipients"],
        yes(create_ms < 1000.0)
    );
    let sent = r["sent"].as_u64().unwrap_or(0);
    println!(
        "| {ph} | campaign: every recipient sent (simulator) | {sent} / {} | {} |",
        r["recipients"],
        yes(Some(sent) == r["recipients"].as_u64())
    );
    let (idle, during) = (&r["probe_idle"], &r["probe_during"]);
    if let Some(max) = during["max_ms"].as_f64() {
        println!(
            "| {ph} | campaign leaves room: {} single messages posted while it ran, sent in p50 {} / max {max:.0} ms (idle: p50 {} ms); max < 1 s | {max:.0} ms | {} |",
            during["n"],
            during["p50_ms"],
            idle["p50_ms"],
            yes(max < 1000.0)
        );
    }
    if let Some(s) = send {
        let rate = s[send_metric(s)].as_f64().unwrap_or(0.0);
        let ours = r["sent_per_s"].as_f64().unwrap_or(0.0);
        println!(
            "| {ph} | campaign sent/s against the send scenario's ({rate:.1}/s) | {:.2}× | – |",
            ours / rate.max(0.001)
        );
    }
}
