//! Delivery: WeChat's `subscribe_msg_sent_event` tells, after the fact, what became
//! of a subscribe send. It names the message by the `msgid` subscribe/send returned
//! ([`MessageRow::wechat_msgid`](super::store::MessageRow)); the message gets its
//! `delivery`.
//!
//! It also settles an ambiguity: a subscribe send whose answer was lost ended
//! `failed` with `outcome_unknown` and no msgid. A sent event for the same (app,
//! openid, template), within [`AMBIGUITY_WINDOW`] of that ambiguous attempt and
//! naming a msgid no other message has, proves the send was accepted: the message
//! becomes `sent`. Its credential's use stays charged, as it already was: the
//! `outcome_unknown` settlement spent it (`CredentialFate::Spent`), and a use is
//! charged exactly when WeChat accepted the message, which it now has said it did.

use chrono::{DateTime, TimeDelta, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Text, Timestamp};

use super::settle::{AttemptOutcome, MessageErrorCode};
use super::Status;
use crate::db::schema::messages;
use crate::db::{native_sql, DbConn, DbResult};
use crate::dispatch;
use crate::ledger::Kind;
use crate::time::to_db;

/// A sent event this close to an ambiguous subscribe attempt may settle it.
pub const AMBIGUITY_WINDOW: TimeDelta = TimeDelta::minutes(10);

/// WeChat's word on a subscribe send that it accepted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// `ErrorCode` 0.
    Delivered,
    /// `ErrorStatus` "fail:user refuse to accept the msg".
    Refused,
    /// Any other failure (`fail:system failed`, …).
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Refused => "refused",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// The contract's reading of a sent event's `ErrorCode` and `ErrorStatus`.
    pub fn of(error_code: &str, error_status: &str) -> DeliveryStatus {
        if error_code.trim() == "0" {
            DeliveryStatus::Delivered
        } else if error_status == "fail:user refuse to accept the msg" {
            DeliveryStatus::Refused
        } else {
            DeliveryStatus::Failed
        }
    }
}

/// One sent event, as the push reports it.
#[derive(Debug, Clone)]
pub struct SentEvent<'a> {
    pub app_id: &'a str,
    pub openid: &'a str,
    pub template_id: &'a str,
    pub msgid: &'a str,
    pub status: DeliveryStatus,
    pub error_status: &'a str,
}

/// What a sent event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The message with that msgid has its delivery.
    Message(i64),
    /// An `outcome_unknown` message was proven sent by it.
    Resolved(i64),
    /// No message matches (sent by someone else, or purged).
    Unmatched,
}

/// Applies a sent event, in the caller's transaction (the push's, under the
/// user's lock, so two events never settle the same ambiguous message).
pub fn apply_sent(conn: &mut DbConn, e: &SentEvent<'_>, now: DateTime<Utc>) -> DbResult<Delivered> {
    use messages::dsl as m;
    let now_db = to_db(now);
    let view = super::DeliveryView {
        status: e.status,
        error_status: e.error_status.to_string(),
        at: now,
    };
    let json = serde_json::to_string(&view)
        .map_err(|e| crate::db::DbError::Corrupt(format!("delivery does not serialise: {e}")))?;
    let delivery = (m::delivery.eq(Some(json)), m::updated_at.eq(now_db));
    let known: Option<i64> = dispatch!(conn, |c| m::messages
        .filter(m::app_id.eq(e.app_id))
        .filter(m::wechat_msgid.eq(e.msgid))
        .select(m::id)
        .order(m::id)
        .first(c)
        .optional())?;
    if let Some(id) = known {
        dispatch!(conn, |c| diesel::update(m::messages.filter(m::id.eq(id)))
            .set(delivery)
            .execute(c))?;
        return Ok(Delivered::Message(id));
    }
    // No message has this msgid: the oldest outcome_unknown subscribe send to this
    // user and template whose ambiguous attempt is within the window.
    let sql = native_sql(
        conn,
        "SELECT m.id AS id FROM messages m \
         WHERE m.app_id = $1 AND m.openid = $2 AND m.template_id = $3 \
           AND m.status = $4 AND m.error_code = $5 AND m.credential_kind = $6 \
           AND m.wechat_msgid IS NULL \
           AND EXISTS (SELECT 1 FROM message_attempts a WHERE a.message_id = m.id \
             AND a.outcome IN ($7, $8) AND a.at >= $9 AND a.at <= $10) \
         ORDER BY m.id LIMIT 1",
    );
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    let found: Option<Id> = dispatch!(conn, |c| diesel::sql_query(&sql)
        .bind::<Text, _>(e.app_id)
        .bind::<Text, _>(e.openid)
        .bind::<Text, _>(e.template_id)
        .bind::<Text, _>(Status::Failed.as_str())
        .bind::<Text, _>(MessageErrorCode::OutcomeUnknown.as_str())
        .bind::<Text, _>(Kind::Subscription.as_str())
        .bind::<Text, _>(AttemptOutcome::Ambiguous.as_str())
        .bind::<Text, _>(AttemptOutcome::Interrupted.as_str())
        .bind::<Timestamp, _>(to_db(now - AMBIGUITY_WINDOW))
        .bind::<Timestamp, _>(to_db(now + AMBIGUITY_WINDOW))
        .get_result(c)
        .optional())?;
    let Some(Id { id }) = found else {
        return Ok(Delivered::Unmatched);
    };
    dispatch!(conn, |c| diesel::update(
        m::messages
            .filter(m::id.eq(id))
            .filter(m::status.eq(Status::Failed.as_str()))
    )
    .set((
        delivery,
        m::status.eq(Status::Sent.as_str()),
        m::wechat_msgid.eq(e.msgid),
        m::error_code.eq(None::<String>),
        m::wechat_errcode.eq(None::<i32>),
        m::error_message.eq(None::<String>),
    ))
    .execute(c))?;
    Ok(Delivered::Resolved(id))
}
