//! Webhooks: the backend hears about outcomes. An event is written, in the
//! transaction of the change it reports, as one row per subscribed webhook in
//! `webhook_deliveries`, the durable outbound HTTP queue; [`Deliverer`] workers on
//! every instance lease rows (one instance per row at a time), POST them with no
//! database connection held, and record the answer: at least once, retried with
//! backoff for a day, then `failed` and kept for a manual retry.
//!
//! Other rooms call [`enqueue`] (or [`subscription_exhausted`]) inside their own
//! transaction; nothing else is needed to emit an event.

pub mod deliver;
pub mod guard;
pub mod sign;
pub mod store;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::db::{write_tx, DbConn, DbError, DbResult};
use crate::time::to_db;
pub use deliver::Deliverer;
use store::{DeliveryRow, NewDelivery, WebhookRow};

/// The events a webhook may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum EventType {
    /// A message reached `sent`, `no_quota` or `failed`; data: the message resource.
    #[serde(rename = "message.finished")]
    MessageFinished,
    /// WeChat pushed the sent event of a message; data: the message resource.
    #[serde(rename = "message.delivery")]
    MessageDelivery,
    /// A user's last live grant of a template was used or removed; data:
    /// `{"openid", "template_id"}`.
    #[serde(rename = "subscription.exhausted")]
    SubscriptionExhausted,
}

impl EventType {
    pub const ALL: [EventType; 3] = [
        EventType::MessageFinished,
        EventType::MessageDelivery,
        EventType::SubscriptionExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::MessageFinished => "message.finished",
            EventType::MessageDelivery => "message.delivery",
            EventType::SubscriptionExhausted => "subscription.exhausted",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// How deliveries are made (`LEDGER_WEBHOOK_*`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Let URLs reach loopback, link-local and private addresses.
    pub allow_private: bool,
    /// Bound on one POST (the contract: 10 s).
    pub timeout: Duration,
    /// First retry delay (doubles, with jitter; the contract: 10 s).
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Retried this long after being queued (the contract: 24 h), then `failed`.
    pub retry_window: Duration,
    /// Delivery workers per instance.
    pub workers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            allow_private: false,
            timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(3600),
            retry_window: Duration::from_secs(86_400),
            workers: 4,
        }
    }
}

impl Config {
    /// An instance's hold on a delivery: longer than a POST can take, so a live
    /// instance is never overtaken; a dead one's deliveries are taken over after it.
    pub fn lease(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(2)
    }
}

/// The envelope POSTed for every event.
#[derive(Debug, Serialize)]
struct Envelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    #[serde(with = "crate::time::rfc3339")]
    created_at: DateTime<Utc>,
    app_id: &'a str,
    data: &'a serde_json::Value,
}

/// `evt_` and 32 random hex digits.
fn event_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("evt_{hex}")
}

/// Queues an event for every webhook that receives `event` for `app_id`, in the
/// caller's transaction (call it inside the transaction that makes the change the
/// event reports: a rollback or a crash then loses or invents nothing). Returns the
/// event's id, or None if no webhook receives it (nothing is written).
pub fn enqueue(
    conn: &mut DbConn,
    app_id: &str,
    event: EventType,
    data: &serde_json::Value,
) -> DbResult<Option<String>> {
    let receivers: Vec<String> = store::all(conn)?
        .into_iter()
        .filter(|w| receives(w, event, app_id))
        .map(|w| w.name)
        .collect();
    if receivers.is_empty() {
        return Ok(None);
    }
    let now = crate::time::now();
    let id = event_id();
    let body = serde_json::to_string(&Envelope {
        id: &id,
        event_type: event.as_str(),
        created_at: now,
        app_id,
        data,
    })
    .map_err(|e| DbError::Corrupt(format!("event does not serialise: {e}")))?;
    let rows: Vec<NewDelivery> = receivers
        .into_iter()
        .map(|webhook| NewDelivery {
            kind: "event",
            webhook: Some(webhook),
            url: None,
            event_id: Some(id.clone()),
            event_type: Some(event.as_str().to_string()),
            app_id: app_id.to_string(),
            content_type: "application/json".into(),
            body: body.clone(),
            status: "pending",
            next_attempt_at: to_db(now),
            retry_from: to_db(now),
            created_at: to_db(now),
            updated_at: to_db(now),
        })
        .collect();
    store::insert_deliveries(conn, &rows)?;
    Ok(Some(id))
}

/// Queues a raw body to be POSTed as it is (no envelope, no signature) to `url`,
/// with the same durability, retries and SSRF guard as an event: e.g. a WeChat push
/// forwarded to the business's own push handler. In the caller's transaction.
pub fn enqueue_forward(
    conn: &mut DbConn,
    app_id: &str,
    url: &str,
    content_type: &str,
    body: &str,
) -> DbResult<()> {
    enqueue_forward_leased(conn, app_id, url, content_type, body, None).map(|_| ())
}

/// [`enqueue_forward`], leased from the start by `lease` (owner, until) when given:
/// the caller POSTs it at once itself ([`Deliverer::forward_now`]) and no worker
/// takes it meanwhile; if the caller dies, the lease runs out and a worker
/// delivers it. Returns the delivery's id.
pub fn enqueue_forward_leased(
    conn: &mut DbConn,
    app_id: &str,
    url: &str,
    content_type: &str,
    body: &str,
    lease: Option<(&str, DateTime<Utc>)>,
) -> DbResult<i64> {
    let now = to_db(crate::time::now());
    let row = NewDelivery {
        kind: "forward",
        webhook: None,
        url: Some(url.to_string()),
        event_id: None,
        event_type: None,
        app_id: app_id.to_string(),
        content_type: content_type.to_string(),
        body: body.to_string(),
        status: "pending",
        next_attempt_at: now,
        retry_from: now,
        created_at: now,
        updated_at: now,
    };
    store::insert_leased(
        conn,
        &row,
        lease.map(|(owner, until)| (owner, to_db(until))),
    )
}

/// `subscription.exhausted` for (app, openid, template): call it, in the same
/// transaction, where a user's last live grant of a template was used or removed.
pub fn subscription_exhausted(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    template_id: &str,
) -> DbResult<Option<String>> {
    enqueue(
        conn,
        app_id,
        EventType::SubscriptionExhausted,
        &serde_json::json!({"openid": openid, "template_id": template_id}),
    )
}

/// Whether any webhook receives `event` for `app_id` (to skip building data no one
/// will get).
pub fn wanted(conn: &mut DbConn, app_id: &str, event: EventType) -> DbResult<bool> {
    Ok(store::all(conn)?.iter().any(|w| receives(w, event, app_id)))
}

fn receives(w: &WebhookRow, event: EventType, app_id: &str) -> bool {
    w.events.split(',').any(|e| e == event.as_str())
        && w.app_ids
            .as_deref()
            .is_none_or(|apps| apps.split(',').any(|a| a == app_id))
}

pub(crate) fn delta(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

/// A webhook as the admin API shows it: never its secret.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WebhookView {
    pub name: String,
    pub url: String,
    pub events: Vec<EventType>,
    /// The apps whose events it receives; null: every app.
    pub app_ids: Option<Vec<String>>,
    #[serde(with = "crate::time::rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339")]
    pub updated_at: DateTime<Utc>,
}

impl From<WebhookRow> for WebhookView {
    fn from(w: WebhookRow) -> Self {
        WebhookView {
            events: w.events.split(',').filter_map(EventType::parse).collect(),
            app_ids: w
                .app_ids
                .map(|a| a.split(',').map(str::to_string).collect()),
            created_at: w.created_at.and_utc(),
            updated_at: w.updated_at.and_utc(),
            name: w.name,
            url: w.url,
        }
    }
}

/// A webhook to create or replace, already validated.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub name: String,
    pub url: String,
    pub events: Vec<EventType>,
    pub app_ids: Option<Vec<String>>,
    pub secret: String,
}

/// Creates or replaces a webhook; its pending deliveries keep going to it (at its
/// new URL, signed with its new secret).
pub fn put(conn: &mut DbConn, w: &NewWebhook) -> DbResult<WebhookView> {
    let now = to_db(crate::time::now());
    let row = WebhookRow {
        name: w.name.clone(),
        url: w.url.clone(),
        events: w
            .events
            .iter()
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join(","),
        app_ids: w.app_ids.as_ref().map(|a| a.join(",")),
        secret: w.secret.clone(),
        created_at: now,
        updated_at: now,
    };
    write_tx(conn, |conn| {
        store::upsert(conn, &row)?;
        store::find(conn, &w.name)?
            .map(WebhookView::from)
            .ok_or(DbError::Query(diesel::result::Error::NotFound))
    })
}

pub fn list(conn: &mut DbConn) -> DbResult<Vec<WebhookView>> {
    Ok(store::all(conn)?
        .into_iter()
        .map(WebhookView::from)
        .collect())
}

pub fn exists(conn: &mut DbConn, name: &str) -> DbResult<bool> {
    Ok(store::find(conn, name)?.is_some())
}

pub fn delete(conn: &mut DbConn, name: &str) -> DbResult<bool> {
    store::delete(conn, name)
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// A delivery as the admin API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub id: String,
    pub webhook: Option<String>,
    pub event_id: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub app_id: String,
    pub status: DeliveryStatus,
    /// POSTs made so far.
    pub attempts: i32,
    /// What the last failed attempt got (an HTTP status or a connection error).
    pub last_error: Option<String>,
    #[serde(with = "crate::time::rfc3339")]
    pub next_attempt_at: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339::option")]
    pub delivered_at: Option<DateTime<Utc>>,
}

impl DeliveryView {
    fn new(d: DeliveryRow) -> DbResult<Self> {
        let status = DeliveryStatus::parse(&d.status).ok_or_else(|| {
            DbError::Corrupt(format!("delivery {}: unknown status {:?}", d.id, d.status))
        })?;
        Ok(DeliveryView {
            id: d.id.to_string(),
            webhook: d.webhook,
            event_id: d.event_id,
            event_type: d.event_type,
            app_id: d.app_id,
            status,
            attempts: d.attempts,
            last_error: d.last_error,
            next_attempt_at: d.next_attempt_at.and_utc(),
            created_at: d.created_at.and_utc(),
            delivered_at: d.delivered_at.map(|t| t.and_utc()),
        })
    }
}

/// A webhook's latest deliveries, newest first; None if there is no such webhook.
pub fn deliveries(
    conn: &mut DbConn,
    name: &str,
    status: Option<DeliveryStatus>,
    limit: u32,
) -> DbResult<Option<Vec<DeliveryView>>> {
    if !exists(conn, name)? {
        return Ok(None);
    }
    store::deliveries(conn, name, status.map(DeliveryStatus::as_str), limit.into())?
        .into_iter()
        .map(DeliveryView::new)
        .collect::<DbResult<Vec<_>>>()
        .map(Some)
}

/// What a manual retry came to.
#[derive(Debug)]
pub enum Retried {
    /// Pending again, due now.
    Pending(DeliveryView),
    NotFound,
    /// Only a failed delivery is retried by hand (a pending one is being retried).
    NotFailed(DeliveryStatus),
}

/// Makes a failed delivery pending again, due now, retried for another window.
pub fn retry(conn: &mut DbConn, id: i64) -> DbResult<Retried> {
    if store::retry(conn, id, crate::time::now())? {
        return match store::delivery(conn, id)? {
            Some(d) => Ok(Retried::Pending(DeliveryView::new(d)?)),
            None => Ok(Retried::NotFound),
        };
    }
    match store::delivery(conn, id)? {
        Some(d) => Ok(Retried::NotFailed(DeliveryView::new(d)?.status)),
        None => Ok(Retried::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_reads_back_as_itself() {
        for e in EventType::ALL {
            assert_eq!(EventType::parse(e.as_str()), Some(e));
            assert_eq!(
                serde_json::to_value(e).unwrap(),
                serde_json::json!(e.as_str())
            );
        }
        assert_eq!(EventType::parse("message.sent"), None);
    }

    #[test]
    fn a_webhook_receives_its_events_for_its_apps() {
        let w = |events: &str, apps: Option<&str>| WebhookRow {
            name: "n".into(),
            url: "https://example.com".into(),
            events: events.into(),
            app_ids: apps.map(str::to_string),
            secret: "s".into(),
            created_at: Default::default(),
            updated_at: Default::default(),
        };
        let f = EventType::MessageFinished;
        assert!(receives(&w("message.finished", None), f, "wxa"));
        assert!(!receives(&w("message.delivery", None), f, "wxa"));
        assert!(receives(
            &w("message.delivery,message.finished", Some("wxa,wxb")),
            f,
            "wxb"
        ));
        assert!(!receives(&w("message.finished", Some("wxa")), f, "wxab"));
    }
}
