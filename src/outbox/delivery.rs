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
//!
//! The event names only (openid, template), so it settles a message only when it
//! cannot be another send's: no other subscribe send to that user and template is
//! in flight (its event may overtake its answer), exactly one message is a
//! candidate, and (claimed at settlement) it came after the ambiguous call began.
//! Otherwise the message stays `outcome_unknown`: the ledger never calls a message
//! sent on an event that may be another's.

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
    let json = delivery_json(e.status, e.error_status, now)?;
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
    // No message has this msgid: the one outcome_unknown subscribe send to this
    // user and template whose ambiguous attempt is within the window, if no other
    // send to them is in flight (whose answer this event may have overtaken).
    let sql = native_sql(
        conn,
        "SELECT m.id AS id FROM messages m \
         WHERE m.app_id = $1 AND m.openid = $2 AND m.template_id = $3 \
           AND m.status = $4 AND m.error_code = $5 AND m.credential_kind = $6 \
           AND m.wechat_msgid IS NULL \
           AND EXISTS (SELECT 1 FROM message_attempts a WHERE a.message_id = m.id \
             AND a.outcome IN ($7, $8) AND a.at >= $9 AND a.at <= $10) \
         ORDER BY m.id LIMIT 2",
    );
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    let found: Vec<Id> = dispatch!(conn, |c| diesel::sql_query(&sql)
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
        .load(c))?;
    let single = match found.as_slice() {
        [one] if !send_in_flight(conn, e.app_id, e.openid, e.template_id, one.id)? => Some(one.id),
        _ => None,
    };
    let Some(id) = single else {
        // Kept for the settlement of the send it reports, which it may have
        // overtaken (see `claim_pending`).
        use crate::db::schema::unmatched_sent_events::dsl as u;
        let json = delivery_json(e.status, e.error_status, now)?;
        dispatch!(conn, |c| diesel::insert_into(u::unmatched_sent_events)
            .values((
                u::app_id.eq(e.app_id),
                u::msgid.eq(e.msgid),
                u::openid.eq(e.openid),
                u::template_id.eq(e.template_id),
                u::delivery.eq(&json),
                u::received_at.eq(now_db),
            ))
            .on_conflict_do_nothing()
            .execute(c))?;
        return Ok(Delivered::Unmatched);
    };
    resolve(
        conn,
        id,
        e.msgid,
        delivery_json(e.status, e.error_status, now)?,
        now,
    )?;
    Ok(Delivered::Resolved(id))
}

fn delivery_json(
    status: DeliveryStatus,
    error_status: &str,
    at: DateTime<Utc>,
) -> DbResult<String> {
    let view = super::DeliveryView {
        status,
        error_status: error_status.to_string(),
        at,
    };
    serde_json::to_string(&view)
        .map_err(|e| crate::db::DbError::Corrupt(format!("delivery does not serialise: {e}")))
}

/// An outcome_unknown message proven sent by a sent event.
fn resolve(
    conn: &mut DbConn,
    id: i64,
    msgid: &str,
    delivery: String,
    now: DateTime<Utc>,
) -> DbResult<()> {
    use messages::dsl as m;
    dispatch!(conn, |c| diesel::update(
        m::messages
            .filter(m::id.eq(id))
            .filter(m::status.eq(Status::Failed.as_str()))
    )
    .set((
        m::delivery.eq(Some(delivery)),
        m::updated_at.eq(to_db(now)),
        m::status.eq(Status::Sent.as_str()),
        m::wechat_msgid.eq(msgid),
        m::error_code.eq(None::<String>),
        m::wechat_errcode.eq(None::<i32>),
        m::error_message.eq(None::<String>),
    ))
    .execute(c))?;
    Ok(())
}

/// Whether a subscribe send to the user and template other than `except` is in
/// flight: a sent event may be its, overtaking the answer.
fn send_in_flight(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    template_id: &str,
    except: i64,
) -> DbResult<bool> {
    use messages::dsl as m;
    let n: i64 = dispatch!(conn, |c| m::messages
        .filter(m::app_id.eq(app_id))
        .filter(m::openid.eq(openid))
        .filter(m::template_id.eq(template_id))
        .filter(m::in_flight.eq(true))
        .filter(m::id.ne(except))
        .count()
        .get_result(c))?;
    Ok(n > 0)
}

/// What a settling send took from the sent events that came before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    None,
    /// Its own event (by msgid): the message has its delivery.
    Delivery,
    /// An outcome_unknown subscribe send proven sent by an earlier event.
    Resolved,
}

/// Called in the transaction that settles message `id` (after its row is
/// written, under the user's lock): a sent event that overtook the settlement is
/// applied now. `msgid`: the one WeChat answered; `outcome_unknown`: the send ended
/// outcome_unknown with a subscription, its call having begun at `call_began` (an
/// event received before cannot be its own).
#[allow(clippy::too_many_arguments)]
pub fn claim_pending(
    conn: &mut DbConn,
    id: i64,
    app_id: &str,
    openid: &str,
    template_id: &str,
    msgid: Option<&str>,
    outcome_unknown: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DbResult<Pending> {
    use crate::db::schema::unmatched_sent_events::dsl as u;
    use messages::dsl as m;
    let found: Option<(String, String)> = match (msgid, outcome_unknown) {
        (Some(msgid), _) => dispatch!(conn, |c| u::unmatched_sent_events
            .filter(u::app_id.eq(app_id))
            .filter(u::msgid.eq(msgid))
            .select((u::msgid, u::delivery))
            .first(c)
            .optional())?,
        (None, Some(call_began)) => {
            let since = call_began.max(now - AMBIGUITY_WINDOW);
            let events: Vec<(String, String)> = dispatch!(conn, |c| u::unmatched_sent_events
                .filter(u::app_id.eq(app_id))
                .filter(u::openid.eq(openid))
                .filter(u::template_id.eq(template_id))
                .filter(u::received_at.ge(to_db(since)))
                .order((u::received_at, u::msgid))
                .select((u::msgid, u::delivery))
                .limit(2)
                .load(c))?;
            match <[_; 1]>::try_from(events) {
                Ok([one]) if !send_in_flight(conn, app_id, openid, template_id, id)? => Some(one),
                _ => None,
            }
        }
        (None, None) => None,
    };
    let Some((event_msgid, delivery)) = found else {
        return Ok(Pending::None);
    };
    dispatch!(conn, |c| diesel::delete(
        u::unmatched_sent_events
            .filter(u::app_id.eq(app_id))
            .filter(u::msgid.eq(&event_msgid))
    )
    .execute(c))?;
    if msgid.is_some() {
        dispatch!(conn, |c| diesel::update(m::messages.filter(m::id.eq(id)))
            .set(m::delivery.eq(Some(delivery)))
            .execute(c))?;
        Ok(Pending::Delivery)
    } else {
        resolve(conn, id, &event_msgid, delivery, now)?;
        Ok(Pending::Resolved)
    }
}
