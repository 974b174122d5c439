//! Delivery workers: lease a due delivery, POST it (no database connection held),
//! record the answer. A delivery is leased by one instance at a time; an instance
//! killed mid-POST leaves its lease to run out, and another instance delivers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::store::{self, Attempted, DeliveryRow};
use super::{delta, guard, sign, Config};
use crate::db::{Db, DbResult};
use crate::metrics::Metrics;

/// How often an idle worker looks for work (another instance's events, retries
/// coming due).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// At most this much of a receiver's answer is kept as `last_error`.
const ERROR_BODY: usize = 200;

pub struct Deliverer {
    db: Db,
    http: reqwest::Client,
    config: Config,
    /// This instance, as lease owner.
    owner: String,
    wake: Notify,
    metrics: Arc<Metrics>,
}

impl Deliverer {
    pub fn new(db: Db, config: Config, metrics: Arc<Metrics>) -> Result<Self, String> {
        let mut http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // A redirect could lead anywhere, the guard's refusals included: a 3xx
            // is an answer that is not 2xx, retried like any other.
            .redirect(reqwest::redirect::Policy::none())
            // No proxy from the environment: the guard judges the receiver itself.
            .no_proxy()
            .user_agent(concat!(
                "formid-ledger-webhooks/",
                env!("CARGO_PKG_VERSION")
            ));
        if let Some(resolver) = guard::resolver(config.allow_private) {
            http = http.dns_resolver(resolver);
        }
        Ok(Deliverer {
            db,
            http: http.build().map_err(|e| e.to_string())?,
            config,
            owner: format!("webhooks-{:016x}", rand::random::<u64>()),
            wake: Notify::new(),
            metrics,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This instance as lease owner (for a delivery it takes at once itself).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// POSTs forward `id` (leased by this instance, see
    /// [`super::enqueue_forward_leased`]) at once, waiting at most `within`. A 2xx
    /// answer in time is recorded as delivered and returned (Content-Type, body) for
    /// WeChat; otherwise the delivery is handed to the workers (due now, retried as
    /// any other) and None is returned.
    pub async fn forward_now(
        &self,
        id: i64,
        url: &str,
        content_type: &str,
        body: &str,
        within: Duration,
    ) -> DbResult<Option<(String, String)>> {
        let answer = async {
            let res = self
                .request(url, content_type, body)?
                .timeout(within)
                .send()
                .await
                .map_err(describe)?;
            if !res.status().is_success() {
                return Err(format!("HTTP {}", res.status().as_u16()));
            }
            let content_type = res
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("text/plain")
                .to_string();
            let text = res.text().await.map_err(describe)?;
            Ok::<_, String>((content_type, text))
        }
        .await;
        let now = crate::time::now();
        let attempted = match &answer {
            Ok(_) => Attempted::Delivered,
            Err(error) => Attempted::Retry {
                error: error.clone(),
                at: now,
            },
        };
        let owner = self.owner.clone();
        self.db
            .run(move |c| store::record(c, id, &owner, &attempted, now))
            .await?;
        self.metrics
            .webhook_deliveries
            .with_label_values(&[if answer.is_ok() { "delivered" } else { "retry" }])
            .inc();
        if answer.is_err() {
            self.nudge();
        }
        Ok(answer.ok())
    }

    /// Starts the workers; they stop taking new work when `stop` flips to true.
    pub fn spawn(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.config.workers.max(1))
            .map(|_| {
                let (me, stop) = (self.clone(), stop.clone());
                tokio::spawn(async move { me.work(stop).await })
            })
            .collect()
    }

    /// Something is due now (an event was queued, a delivery retried): wake a worker.
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    /// After the workers stopped: hand back every lease this instance holds.
    pub async fn release_leases(&self) -> DbResult<usize> {
        let owner = self.owner.clone();
        self.db.run(move |c| store::release_leases(c, &owner)).await
    }

    async fn work(&self, mut stop: watch::Receiver<bool>) {
        while !*stop.borrow() {
            match self.step().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => log::warn!("webhooks: {e}"),
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL.min(self.config.backoff_base)) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Delivers the delivery due first. False if nothing was due.
    async fn step(&self) -> DbResult<bool> {
        let owner = self.owner.clone();
        let lease = delta(self.config.lease());
        // The lease and the webhook's URL and secret, read in one visit; the
        // connection goes back to the pool before the POST.
        let picked = self
            .db
            .run(move |c| {
                let now = crate::time::now();
                let Some(d) = store::lease_next(c, &owner, now, now + lease)? else {
                    return Ok(None);
                };
                let target = match &d.webhook {
                    Some(name) => store::find(c, name)?.map(|w| (w.url, Some(w.secret))),
                    None => d.url.clone().map(|url| (url, None)),
                };
                Ok(Some((d, target)))
            })
            .await?;
        let Some((d, target)) = picked else {
            return Ok(false);
        };
        let attempted = match target {
            Some((url, secret)) => self.post(&d, &url, secret.as_deref()).await,
            // The webhook was deleted after the lease (its deliveries go with it).
            None => return Ok(true),
        };
        let outcome = match &attempted {
            Attempted::Delivered => "delivered",
            Attempted::Retry { .. } => "retry",
            Attempted::Failed { .. } => "failed",
        };
        let (id, owner) = (d.id, self.owner.clone());
        let recorded = {
            let attempted = attempted.clone();
            self.db
                .run(move |c| store::record(c, id, &owner, &attempted, crate::time::now()))
                .await?
        };
        if !recorded {
            // Our lease ran out and another instance took the delivery over: it
            // answers for it (the receiver may see this event twice: at least once).
            self.metrics
                .webhook_deliveries
                .with_label_values(&["lease_lost"])
                .inc();
            return Ok(true);
        }
        self.metrics
            .webhook_deliveries
            .with_label_values(&[outcome])
            .inc();
        match &attempted {
            Attempted::Delivered => {}
            Attempted::Retry { error, at } => log::info!(
                "webhook delivery {id} ({}): {error}; retrying at {at}",
                d.webhook.as_deref().unwrap_or("forward")
            ),
            Attempted::Failed { error } => log::warn!(
                "webhook delivery {id} ({}) failed for good after {} attempts: {error}",
                d.webhook.as_deref().unwrap_or("forward"),
                d.attempts + 1
            ),
        }
        Ok(true)
    }

    /// One POST and what it came to.
    async fn post(&self, d: &DeliveryRow, url: &str, secret: Option<&str>) -> Attempted {
        match self.send(d, url, secret).await {
            Ok(()) => Attempted::Delivered,
            Err(error) => self.after_failure(d, error),
        }
    }

    async fn send(&self, d: &DeliveryRow, url: &str, secret: Option<&str>) -> Result<(), String> {
        let mut req = self.request(url, &d.content_type, &d.body)?;
        if let Some(secret) = secret {
            let t = crate::time::now().timestamp();
            req = req.header(
                "Ledger-Signature",
                sign::signature(secret, t, d.body.as_bytes()),
            );
        }
        let res = req.send().await.map_err(describe)?;
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        let body = res.text().await.unwrap_or_default();
        let snippet: String = body.chars().take(ERROR_BODY).collect();
        Err(format!("HTTP {}: {snippet}", status.as_u16()))
    }

    /// A POST of `body` to `url`, if the SSRF guard lets it through: an address
    /// literal is judged here, a name by the client's resolver.
    fn request(
        &self,
        url: &str,
        content_type: &str,
        body: &str,
    ) -> Result<reqwest::RequestBuilder, String> {
        let parsed = guard::parse_url(url)?;
        if !self.config.allow_private {
            if let Some(ip) = guard::literal_refused(&parsed) {
                return Err(format!(
                    "refused: {ip} is a loopback, link-local or private address"
                ));
            }
        }
        Ok(self
            .http
            .post(parsed)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body.to_string()))
    }

    /// The next attempt after `d`'s failure: base × 2^(attempts), with jitter, at
    /// most `backoff_max`; `failed` once that would fall after the retry window.
    fn after_failure(&self, d: &DeliveryRow, error: String) -> Attempted {
        let now = crate::time::now();
        let delay = backoff(&self.config, d.attempts, rand::random::<f64>());
        let at = now + delta(delay);
        let window_ends = d.retry_from.and_utc() + delta(self.config.retry_window);
        if at > window_ends {
            Attempted::Failed { error }
        } else {
            Attempted::Retry { error, at }
        }
    }
}

/// The delay before retry number `attempts + 1`: `base × 2^attempts`, at most
/// `max`, scaled by a jitter of 0.8..1.2 from `unit` (0..1).
fn backoff(config: &Config, attempts: i32, unit: f64) -> Duration {
    let doubling = 2f64.powi(attempts.clamp(0, 30));
    let raw = config.backoff_base.as_secs_f64() * doubling;
    let capped = raw.min(config.backoff_max.as_secs_f64());
    Duration::from_secs_f64(capped * (0.8 + 0.4 * unit.clamp(0.0, 1.0)))
}

/// A connection-level failure, without the URL's query (it could carry a token the
/// receiver put there).
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {cause}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_the_base_doubles_and_is_capped() {
        let config = Config::default();
        let ms = |n, unit| backoff(&config, n, unit).as_millis();
        assert_eq!(ms(0, 0.5), 10_000);
        assert_eq!(ms(1, 0.5), 20_000);
        assert_eq!(ms(5, 0.5), 320_000);
        assert_eq!(ms(20, 0.5), 3_600_000);
        // Jitter: ±20 %.
        assert_eq!(ms(0, 0.0), 8_000);
        assert!((11_999..=12_000).contains(&ms(0, 1.0)));
    }

    #[test]
    fn a_day_of_retries_ends_in_failed() {
        // Doubling from 10 s with a 1 h cap: about 34 attempts fit in 24 h.
        let config = Config::default();
        let mut elapsed = Duration::ZERO;
        let mut attempts = 0;
        while elapsed + backoff(&config, attempts, 0.5) <= config.retry_window {
            elapsed += backoff(&config, attempts, 0.5);
            attempts += 1;
        }
        assert!((25..40).contains(&attempts), "{attempts}");
    }
}
