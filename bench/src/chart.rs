//! Chart: the JSONL of a run → an SVG of each scenario's throughput against the
//! plain ceiling measured in the same run (a bar per scenario and backend, its
//! length the ratio, the issue's target marked), for the README.

use std::fmt::Write as _;

use clap::Args;
use serde_json::Value;

use crate::report::{Targets, SEND_TARGET};

#[derive(Args)]
pub struct ChartArgs {
    /// The JSONL file of the run.
    pub file: String,
    /// The phase to draw (the report has every phase; a chart is one).
    #[arg(long, default_value = "empty")]
    pub phase: String,
}

/// One bar: what is measured, its key in the scenario's result, the ceiling it is
/// held against, and the target ratio (per backend).
struct Bar {
    scenario: &'static str,
    label: &'static str,
    key: &'static str,
    ceiling: &'static str,
    target: fn(&str) -> f64,
}

const BARS: &[Bar] = &[
    Bar {
        scenario: "ingest-single",
        label: "ingest, 1 per request",
        key: "rps",
        ceiling: "plain-insert",
        target: |b| Targets::of(b).single,
    },
    Bar {
        scenario: "ingest-batch",
        label: "ingest, 20 per request",
        key: "items_per_s",
        ceiling: "plain-insert",
        target: |_| 0.0,
    },
    Bar {
        scenario: "drain-0ms",
        label: "send, drained, WeChat 0 ms",
        key: "drain_sent_per_s",
        ceiling: "plain-claim",
        target: |_| SEND_TARGET,
    },
    Bar {
        scenario: "drain-50ms",
        label: "send, drained, WeChat 50 ms",
        key: "drain_sent_per_s",
        ceiling: "plain-claim",
        target: |_| SEND_TARGET,
    },
    Bar {
        scenario: "campaign",
        label: "campaign of 100,000",
        key: "sent_per_s",
        ceiling: "plain-claim",
        target: |_| 0.0,
    },
];

const BACKENDS: &[(&str, &str, &str)] = &[
    ("sqlite", "SQLite", "#3b7dd8"),
    ("postgres", "PostgreSQL", "#d8703b"),
];

pub fn chart(a: &ChartArgs) -> String {
    let text = std::fs::read_to_string(&a.file).unwrap_or_default();
    let rows: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let find = |backend: &str, scenario: &str| -> Option<&Value> {
        rows.iter().rev().find(|r| {
            r["backend"] == backend && r["phase"] == a.phase.as_str() && r["scenario"] == scenario
        })
    };
    // (label, backend name, colour, measured/s, ceiling/s, target)
    let mut bars = Vec::new();
    for bar in BARS {
        for &(backend, name, colour) in BACKENDS {
            let measured = find(backend, bar.scenario).and_then(|r| r[bar.key].as_f64());
            let ceiling = find(backend, bar.ceiling).and_then(|r| r["rps"].as_f64());
            if let (Some(m), Some(c)) = (measured, ceiling) {
                if c > 0.0 {
                    bars.push((bar, name, colour, m, c, (bar.target)(backend)));
                }
            }
        }
    }
    let max_ratio = bars
        .iter()
        .map(|b| (b.3 / b.4).max(b.5))
        .fold(1.0_f64, f64::max)
        .ceil();
    let (left, width, row, top) = (330.0, 420.0, 26.0, 46.0);
    let height = top + row * bars.len() as f64 + 50.0;
    let x = |ratio: f64| left + width * ratio / max_ratio;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = left + width + 140.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">Throughput ÷ the database's plain ceiling, same run ({})</text>"#,
        a.phase
    );
    let _ = writeln!(
        svg,
        r##"<text x="10" y="36" fill="#555">ingest against one plain INSERT per transaction; send against one plain claim UPDATE per transaction; | = target</text>"##
    );
    for tick in 0..=(max_ratio as u32) {
        let tx = x(f64::from(tick));
        let _ = writeln!(
            svg,
            r##"<line x1="{tx}" y1="{top}" x2="{tx}" y2="{y2}" stroke="#ccc"/><text x="{tx}" y="{ty}" text-anchor="middle" fill="#555">{tick}×</text>"##,
            y2 = height - 40.0,
            ty = height - 26.0
        );
    }
    for (i, (bar, name, colour, measured, ceiling, target)) in bars.iter().enumerate() {
        let y = top + row * i as f64;
        let ratio = measured / ceiling;
        let _ = writeln!(
            svg,
            r#"<text x="{lx}" y="{ty}" text-anchor="end">{name}: {label}</text>"#,
            lx = left - 8.0,
            ty = y + 15.0,
            label = bar.label
        );
        let _ = writeln!(
            svg,
            r#"<rect x="{left}" y="{ry}" width="{bw:.1}" height="{bh}" fill="{colour}"/>"#,
            ry = y + 4.0,
            bw = x(ratio) - left,
            bh = row - 8.0
        );
        if *target > 0.0 {
            let tx = x(*target);
            let _ = writeln!(
                svg,
                r#"<line x1="{tx}" y1="{y1}" x2="{tx}" y2="{y2}" stroke="black" stroke-width="2"/>"#,
                y1 = y + 1.0,
                y2 = y + row - 1.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{tx:.1}" y="{ty}">{ratio:.2}× ({m:.0}/s of {c:.0}/s)</text>"#,
            tx = x(ratio).max(x(*target)) + 6.0,
            ty = y + 15.0,
            m = measured,
            c = ceiling
        );
    }
    svg.push_str("</svg>\n");
    svg
}
