//! Sending: "notify user X" as a durable outbox. A message is stored, then sender
//! workers on every instance pick it, claim one use of the user's credential,
//! call WeChat and settle the outcome by the one policy table ([`policy`]).
//!
//! One use sends at most one message: the use is claimed in the transaction that
//! records it on the message, a call is marked in flight before it is made, and a
//! call whose worker died is treated as ambiguous — a single-use credential is
//! probed with the same value (WeChat's 41029 then proves delivery), anything else
//! is recorded as `outcome_unknown` rather than sent again.

pub mod delivery;
pub mod policy;
pub mod recipients;
pub mod sender;
mod sets;
pub mod settle;
pub mod store;
pub mod templates;
pub mod waiters;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::db::{DbConn, DbError, DbResult};
use crate::time::to_db;
use crate::wechat::wire::DataValue;
pub use sender::Sender;
use store::{AttemptRow, IdempotencyRecord, Inserted, MessageRow, NewMessageRow};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Sending,
    Sent,
    NoQuota,
    Failed,
    /// A campaign recipient the send policy left out (daily cap); nothing spent.
    Skipped,
    /// A campaign recipient its campaign's cancel reached before it was sent.
    Cancelled,
}

/// The stored status of a campaign recipient its campaign has not released yet
/// (paced, paused or not started): outside the sender's due index, shown as
/// `queued`.
pub const HELD: &str = "held";

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Queued,
        Status::Sending,
        Status::Sent,
        Status::NoQuota,
        Status::Failed,
        Status::Skipped,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::NoQuota => "no_quota",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Sending)
    }
}

impl TryFrom<&str> for Status {
    type Error = DbError;

    fn try_from(s: &str) -> Result<Status, DbError> {
        if s == HELD {
            return Ok(Status::Queued);
        }
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| unknown("status", s))
    }
}

/// How a message reaches the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Template message with a form_id or prepay_id (a subscription to the template
    /// is used first if the user has one).
    Template,
    /// Subscribe message: a registered subscription template, sent only with the
    /// user's subscriptions to it.
    Subscription,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Template => "template",
            Channel::Subscription => "subscription",
        }
    }
}

impl Channel {
    /// The credentials a message of this channel and template may spend.
    pub fn pick(self, template_id: &str) -> crate::ledger::Pick<'_> {
        match self {
            Channel::Subscription => crate::ledger::Pick::SubscriptionOnly(template_id),
            Channel::Template => crate::ledger::Pick::SubscriptionFirst(template_id),
        }
    }
}

impl TryFrom<&str> for Channel {
    type Error = DbError;

    fn try_from(s: &str) -> Result<Channel, DbError> {
        match s {
            "template" => Ok(Channel::Template),
            "subscription" => Ok(Channel::Subscription),
            _ => Err(unknown("channel", s)),
        }
    }
}

/// A value read from the database that this version does not know (a row written by
/// hand or by a newer version): an error the operator sees, never a guess.
fn unknown(column: &str, value: &str) -> DbError {
    DbError::Corrupt(format!("unknown {column} {value:?}"))
}

/// What is sent to WeChat besides the user, template and page (stored as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub data: BTreeMap<String, DataValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emphasis_keyword: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miniprogram_state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
}

/// A validated "notify user X" request.
#[derive(Debug, Clone, Serialize)]
pub struct NewMessage {
    pub app_id: String,
    pub openid: String,
    pub template_id: String,
    pub channel: Channel,
    pub page: Option<String>,
    pub content: Content,
    /// Wait this long for a credential if the user has none now (from `send_at`
    /// when given).
    pub await_credential_s: u32,
    /// Not sent before then.
    pub send_at: Option<DateTime<Utc>>,
}

/// The `Idempotency-Key` of a request, scoped to the API key that sent it.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub scope: String,
    pub key: String,
}

#[derive(Debug)]
pub enum Submitted {
    /// The message (new, or the one an earlier request with the same key made).
    Message(i64),
    /// The idempotency key was used with a different request.
    Mismatch,
}

/// Stores a new message as `queued`.
pub fn submit(
    conn: &mut DbConn,
    msg: &NewMessage,
    idempotency: Option<&IdempotencyKey>,
    now: DateTime<Utc>,
) -> DbResult<Submitted> {
    // Serialising plain strings and maps cannot fail.
    let request = serde_json::to_vec(msg).unwrap_or_default();
    let due = msg.send_at.map_or(now, |at| at.max(now));
    let row = NewMessageRow {
        public_id: new_public_id("msg"),
        app_id: msg.app_id.clone(),
        openid: msg.openid.clone(),
        template_id: msg.template_id.clone(),
        channel: msg.channel.as_str(),
        page: msg.page.clone(),
        body: serde_json::to_string(&msg.content)
            .map_err(|e| DbError::Corrupt(format!("message body does not serialise: {e}")))?,
        status: Status::Queued.as_str(),
        await_until: (msg.await_credential_s > 0)
            .then(|| to_db(due + chrono::TimeDelta::seconds(msg.await_credential_s.into()))),
        next_attempt_at: to_db(due),
        created_at: to_db(now),
        updated_at: to_db(now),
        send_at: msg.send_at.map(to_db),
        campaign_id: None,
        finished_at: None,
    };
    let idempotency = idempotency.map(|k| IdempotencyRecord {
        scope: k.scope.clone(),
        key: k.key.clone(),
        request_hash: format!("{:x}", Sha256::digest(&request)),
    });
    Ok(match store::insert(conn, &row, idempotency.as_ref())? {
        Inserted::New(id) | Inserted::Existing(id) => Submitted::Message(id),
        Inserted::Mismatch => Submitted::Mismatch,
    })
}

/// An id in the API: `prefix`, "_" and 128 random bits in hex ("msg_…" for a
/// message, "cmp_…" for a campaign). Random rather than the row's sequence number, so
/// a key cannot count other apps' messages between two of its own, nor guess
/// another's id.
pub fn new_public_id(prefix: &str) -> String {
    let bits: u128 = rand::random();
    format!("{prefix}_{bits:032x}")
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorView {
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wechat_errcode: Option<i32>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CredentialRef {
    pub kind: String,
    pub id: i64,
}

/// WeChat's sent event for the message (message push).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub status: delivery::DeliveryStatus,
    /// WeChat's `ErrorStatus` (`success`, `fail:user refuse to accept the msg`, …).
    pub error_status: String,
    /// When the ledger received the sent event.
    #[serde(serialize_with = "crate::time::rfc3339::serialize")]
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    #[serde(with = "crate::time::rfc3339")]
    pub at: DateTime<Utc>,
    pub credential_id: Option<i64>,
    pub wechat_errcode: Option<i32>,
    pub outcome: String,
}

/// The message resource of the contract.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MessageView {
    pub id: String,
    pub app_id: String,
    pub openid: String,
    pub template_id: String,
    pub channel: Channel,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialRef>,
    pub attempts: Vec<AttemptView>,
    /// The `msgid` WeChat returned for a subscribe send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wechat_msgid: Option<String>,
    /// WeChat's sent event, when it pushed one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryView>,
    /// Not sent before then (when the request gave `send_at`).
    #[serde(
        with = "crate::time::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub send_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::time::rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(
        with = "crate::time::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<DateTime<Utc>>,
}

impl MessageView {
    fn new(row: MessageRow, attempts: Vec<AttemptRow>) -> DbResult<Self> {
        let (status, channel) = (row.status()?, row.channel()?);
        let error = match status {
            Status::Failed | Status::NoQuota | Status::Skipped => Some(ErrorView {
                code: row.error_code.clone().ok_or_else(|| {
                    DbError::Corrupt(format!(
                        "message {} is {} without an error code",
                        row.id,
                        status.as_str()
                    ))
                })?,
                wechat_errcode: row.wechat_errcode,
                message: row.error_message.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        let credential = match (&row.credential_kind, row.credential_id) {
            (Some(kind), Some(id)) => Some(CredentialRef {
                kind: kind.clone(),
                id,
            }),
            _ => None,
        };
        let delivery = row
            .delivery
            .as_deref()
            .map(serde_json::from_str::<DeliveryView>)
            .transpose()
            .map_err(|e| DbError::Corrupt(format!("message {}: stored delivery: {e}", row.id)))?;
        Ok(MessageView {
            id: row.public_id.clone(),
            wechat_msgid: row.wechat_msgid.clone(),
            delivery,
            channel,
            status,
            error,
            credential,
            attempts: attempts
                .into_iter()
                .map(|a| AttemptView {
                    at: a.at.and_utc(),
                    credential_id: a.credential_id,
                    wechat_errcode: a.wechat_errcode,
                    outcome: a.outcome,
                })
                .collect(),
            created_at: row.created_at.and_utc(),
            finished_at: row.finished_at.map(|t| t.and_utc()),
            send_at: row.send_at.map(|t| t.and_utc()),
            app_id: row.app_id,
            openid: row.openid,
            template_id: row.template_id,
        })
    }
}

/// The message resource, if it exists.
pub fn view(conn: &mut DbConn, id: i64) -> DbResult<Option<MessageView>> {
    store::load(conn, id)?
        .map(|(row, attempts)| MessageView::new(row, attempts))
        .transpose()
}

/// The message resource by its API id, if it exists and `visible` admits its app
/// (an invisible one is reported as absent: its existence is not revealed).
pub fn view_public(
    conn: &mut DbConn,
    public_id: &str,
    visible: impl Fn(&str) -> bool,
) -> DbResult<Option<MessageView>> {
    match store::find_public(conn, public_id)? {
        Some((id, app_id)) if visible(&app_id) => view(conn, id),
        _ => Ok(None),
    }
}

/// A user's latest messages, newest first.
pub fn recent(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    limit: u32,
) -> DbResult<Vec<MessageView>> {
    store::recent_for_user(conn, app_id, openid, limit.into())?
        .into_iter()
        .map(|(row, attempts)| MessageView::new(row, attempts))
        .collect()
}

/// A campaign's recipients after internal id `after` (0: from the first), in the
/// order they were made.
pub fn recipients_page(
    conn: &mut DbConn,
    campaign_id: i64,
    after: i64,
    limit: u32,
) -> DbResult<Vec<MessageView>> {
    recipients::page(conn, campaign_id, after, limit.into())?
        .into_iter()
        .map(|(row, attempts)| MessageView::new(row, attempts))
        .collect()
}

/// Message totals of one app over the last 24 h, for the admin overview.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MessageStats {
    pub messages_24h: BTreeMap<&'static str, i64>,
    pub top_errcodes: Vec<ErrcodeCount>,
    pub messages_per_hour: Vec<HourCount>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrcodeCount {
    pub errcode: i32,
    pub count: i64,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct HourCount {
    /// The hour's start, RFC 3339 UTC.
    pub hour: String,
    pub sent: i64,
    pub failed: i64,
    pub no_quota: i64,
    pub pending: i64,
    /// Campaign recipients skipped by the policy or cancelled.
    pub not_sent: i64,
}

pub fn stats(conn: &mut DbConn, app_id: &str, now: DateTime<Utc>) -> DbResult<MessageStats> {
    let since = now - chrono::TimeDelta::hours(24);
    let rows = store::status_counts(conn, app_id, since)?;
    let mut messages_24h: BTreeMap<&'static str, i64> =
        Status::ALL.into_iter().map(|s| (s.as_str(), 0)).collect();
    let mut hours: BTreeMap<String, HourCount> = BTreeMap::new();
    for (hour, status, n) in rows {
        let status = Status::try_from(status.as_str()).inspect_err(|e| {
            log::error!("messages of app {app_id}: {e}");
        })?;
        *messages_24h.entry(status.as_str()).or_default() += n;
        let bucket = hours.entry(hour.clone()).or_insert_with(|| HourCount {
            hour,
            ..HourCount::default()
        });
        match status {
            Status::Sent => bucket.sent += n,
            Status::Failed => bucket.failed += n,
            Status::NoQuota => bucket.no_quota += n,
            Status::Queued | Status::Sending => bucket.pending += n,
            Status::Skipped | Status::Cancelled => bucket.not_sent += n,
        }
    }
    let top_errcodes = store::top_errcodes(conn, app_id, since, 10)?
        .into_iter()
        .map(|(errcode, count)| ErrcodeCount { errcode, count })
        .collect();
    Ok(MessageStats {
        messages_24h,
        top_errcodes,
        messages_per_hour: hours.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_reads_back_as_itself() {
        for status in Status::ALL {
            assert_eq!(Status::try_from(status.as_str()).unwrap(), status);
        }
        for channel in [Channel::Template, Channel::Subscription] {
            assert_eq!(Channel::try_from(channel.as_str()).unwrap(), channel);
        }
    }

    #[test]
    fn an_unknown_status_or_channel_is_an_error_not_a_default() {
        for unknown in ["", "Queued", "sent ", "delivered"] {
            let e = Status::try_from(unknown).unwrap_err();
            let expected = format!("unknown status {unknown:?}");
            assert!(matches!(e, DbError::Corrupt(m) if m == expected));
        }
        let e = Channel::try_from("sms").unwrap_err();
        assert!(matches!(e, DbError::Corrupt(m) if m == "unknown channel \"sms\""));
    }
}
