//! Prometheus metrics: one registry per running service (no globals, so several
//! instances in one test process each count their own).

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: 1 ms … 10 s.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
    pub credentials_recorded: IntCounterVec,
    pub credentials_rejected: IntCounterVec,
    pub claims: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub messages_finished: IntCounterVec,
    pub wechat_calls: IntCounterVec,
    pub wechat_seconds: HistogramVec,
    pub token_refreshes: IntCounterVec,
    pub token_forced_refreshes: IntCounterVec,
    pub webhook_deliveries: IntCounterVec,
    pub queue_depth: IntGauge,
    pub db_connections: IntGauge,
    pub db_idle_connections: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| unreachable!("metric {name} registered twice: {e}"));
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
    registry
        .register(Box::new(h.clone()))
        .unwrap_or_else(|e| unreachable!("metric {name} registered twice: {e}"));
    h
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| unreachable!("metric {name} registered twice: {e}"));
    g
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("ledger".into()), None)
            .unwrap_or_else(|e| unreachable!("a static prefix is valid: {e}"));
        Metrics {
            http_requests: counter(
                &r,
                "http_requests_total",
                "HTTP requests by route and status",
                &["route", "method", "status"],
            ),
            http_seconds: histogram(
                &r,
                "http_request_duration_seconds",
                "HTTP request latency",
                &["route", "method"],
            ),
            credentials_recorded: counter(
                &r,
                "credentials_recorded_total",
                "Reported credentials by outcome (accepted, duplicate)",
                &["outcome"],
            ),
            credentials_rejected: counter(
                &r,
                "credentials_rejected_total",
                "Reported credentials refused, by reason",
                &["reason"],
            ),
            claims: counter(
                &r,
                "claims_total",
                "Credential claims for messages: hit (a use was taken) or miss",
                &["result"],
            ),
            auth_failures: counter(
                &r,
                "auth_failures_total",
                "Requests refused at authentication, by what was presented (api_key, session) and the answer: unauthorized (judged wrong) or rate_limited (the address had spent its failures; not judged)",
                &["credential", "answer"],
            ),
            messages_finished: counter(
                &r,
                "messages_finished_total",
                "Messages reaching a final status",
                &["status", "code"],
            ),
            wechat_calls: counter(
                &r,
                "wechat_calls_total",
                "WeChat API calls by endpoint and errcode (0 ok; class name when no errcode)",
                &["endpoint", "errcode"],
            ),
            wechat_seconds: histogram(
                &r,
                "wechat_call_duration_seconds",
                "WeChat API call latency",
                &["endpoint"],
            ),
            token_refreshes: counter(
                &r,
                "token_refreshes_total",
                "access_token fetches by this instance, by result",
                &["app_id", "result"],
            ),
            token_forced_refreshes: counter(
                &r,
                "token_forced_refreshes_total",
                "Compare-and-refresh calls by result: fetched (WeChat issued a new token), \
                 caught_up (an unforced check found WeChat had replaced a young token), \
                 throttled (the stale token is younger than LEDGER_TOKEN_FORCE_INTERVAL_S: \
                 handed out again), not_current (already replaced), failed",
                &["app_id", "result"],
            ),
            webhook_deliveries: counter(
                &r,
                "webhook_deliveries_total",
                "Webhook delivery attempts by outcome: delivered (2xx), retry (anything else, \
                 retried later), failed (retried for the whole window: kept for a manual \
                 retry), lease_lost (this instance was too slow; another delivered)",
                &["outcome"],
            ),
            queue_depth: gauge(
                &r,
                "sender_queue_depth",
                "Messages queued or sending (all instances)",
            ),
            db_connections: gauge(
                &r,
                "db_pool_connections",
                "Open database connections in this instance's pool",
            ),
            db_idle_connections: gauge(
                &r,
                "db_pool_idle_connections",
                "Idle database connections in this instance's pool",
            ),
            registry: r,
        }
    }

    /// One WeChat call: its endpoint, outcome label and how long it took.
    pub fn wechat_call(&self, endpoint: &str, outcome: &str, took: Duration) {
        self.wechat_calls
            .with_label_values(&[endpoint, outcome])
            .inc();
        self.wechat_seconds
            .with_label_values(&[endpoint])
            .observe(took.as_secs_f64());
    }

    /// One HTTP request: its route pattern, method, status and latency. The caller
    /// passes a route *pattern* (never a path); the method goes through
    /// [`method_label`], so no label value comes from the client unchecked.
    pub fn http_request(&self, route: &str, method: &str, status: u16, took: Duration) {
        let method = method_label(method);
        self.http_requests
            .with_label_values(&[route, method, status.to_string().as_str()])
            .inc();
        self.http_seconds
            .with_label_values(&[route, method])
            .observe(took.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The `method` label: a standard method by name, anything else `other`. A client
/// inventing methods (`FOO`, `BAR1`, …) would otherwise create series forever.
pub fn method_label(method: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN
        .iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("DELETE"), "DELETE");
        for invented in ["FOO", "get", "PROPFIND", ""] {
            assert_eq!(method_label(invented), "other", "{invented}");
        }
    }
}
