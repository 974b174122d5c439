//! A campaign's recipients: ordinary messages with `campaign_id`, made a batch at a
//! time by the campaign's runner. A recipient is stored [`HELD`] (outside the
//! sender's due index) until the campaign's pacer releases it as `queued`; from then
//! on it is a message like any other. Pausing holds the released ones no sender has
//! taken yet; cancelling ends every one not yet being sent as `cancelled`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Timestamp};

use super::store::{self, AttemptRow, MessageRow, NewMessageRow};
use super::{new_public_id, Channel, Status, HELD};
use crate::db::schema::messages;
use crate::db::{native_sql, DbConn, DbResult};
use crate::dispatch;
use crate::time::to_db;

/// What every recipient of one campaign gets.
#[derive(Debug, Clone)]
pub struct Blueprint<'a> {
    pub campaign_id: i64,
    pub app_id: &'a str,
    pub template_id: &'a str,
    pub channel: Channel,
    pub page: Option<&'a str>,
    /// The stored [`Content`](super::Content), as JSON.
    pub body: &'a str,
}

/// Stores a message for each of `openids`: held, or `cancelled` (final, never
/// sent) when the campaign was cancelled before they were made.
pub fn insert(
    conn: &mut DbConn,
    blueprint: &Blueprint<'_>,
    openids: &[String],
    cancelled: bool,
    now: DateTime<Utc>,
) -> DbResult<usize> {
    let now_db = to_db(now);
    let rows: Vec<NewMessageRow> = openids
        .iter()
        .map(|openid| NewMessageRow {
            public_id: new_public_id("msg"),
            app_id: blueprint.app_id.to_string(),
            openid: openid.clone(),
            template_id: blueprint.template_id.to_string(),
            channel: blueprint.channel.as_str(),
            page: blueprint.page.map(str::to_string),
            body: blueprint.body.to_string(),
            status: if cancelled {
                Status::Cancelled.as_str()
            } else {
                HELD
            },
            await_until: None,
            next_attempt_at: now_db,
            created_at: now_db,
            updated_at: now_db,
            send_at: None,
            campaign_id: Some(blueprint.campaign_id),
            finished_at: cancelled.then_some(now_db),
        })
        .collect();
    // 16 columns a row: 1,000 rows stay under both backends' bound-parameter limits.
    let mut stored = 0;
    for chunk in rows.chunks(1000) {
        stored += dispatch!(conn, |c| diesel::insert_into(messages::table)
            .values(chunk)
            .execute(c))?;
    }
    Ok(stored)
}

/// Releases up to `n` held recipients, in the order they were made, to the sender
/// (due now). Returns how many.
pub fn release(conn: &mut DbConn, campaign_id: i64, n: i64, now: DateTime<Utc>) -> DbResult<usize> {
    let sql = native_sql(
        conn,
        "UPDATE messages SET status = 'queued', next_attempt_at = $1, updated_at = $1 \
         WHERE id IN (SELECT id FROM messages \
           WHERE campaign_id = $2 AND status = 'held' ORDER BY id LIMIT $3)",
    );
    Ok(dispatch!(conn, |c| diesel::sql_query(&sql)
        .bind::<Timestamp, _>(to_db(now))
        .bind::<BigInt, _>(campaign_id)
        .bind::<BigInt, _>(n)
        .execute(c))?)
}

/// How many of the campaign's recipients are released and not yet final.
pub fn queued(conn: &mut DbConn, campaign_id: i64) -> DbResult<i64> {
    use messages::dsl as m;
    Ok(dispatch!(conn, |c| m::messages
        .filter(m::campaign_id.eq(campaign_id))
        .filter(m::status.eq(Status::Queued.as_str()))
        .count()
        .get_result(c))?)
}

/// Holds again the released recipients no sender has taken (not leased, no
/// credential claimed): a paused campaign sends nothing new. Returns how many.
pub fn hold(conn: &mut DbConn, campaign_id: i64, now: DateTime<Utc>) -> DbResult<usize> {
    use messages::dsl as m;
    Ok(dispatch!(conn, |c| diesel::update(
        m::messages
            .filter(m::campaign_id.eq(campaign_id))
            .filter(m::status.eq(Status::Queued.as_str()))
            .filter(m::lease_owner.is_null())
            .filter(m::credential_id.is_null())
    )
    .set((m::status.eq(HELD), m::updated_at.eq(to_db(now))))
    .execute(c))?)
}

/// Ends as `cancelled` every recipient not yet being sent: held or queued, with no
/// credential claimed and no call in flight. A sender that leased one and has not
/// claimed yet loses its lease here, so its claim rolls back. Returns how many.
pub fn cancel(conn: &mut DbConn, campaign_id: i64, now: DateTime<Utc>) -> DbResult<usize> {
    use messages::dsl as m;
    let now_db = to_db(now);
    Ok(dispatch!(conn, |c| diesel::update(
        m::messages
            .filter(m::campaign_id.eq(campaign_id))
            .filter(m::status.eq_any([HELD, Status::Queued.as_str()]))
            .filter(m::credential_id.is_null())
            .filter(m::in_flight.eq(false))
    )
    .set((
        m::status.eq(Status::Cancelled.as_str()),
        m::lease_owner.eq(None::<String>),
        m::lease_until.eq(None::<chrono::NaiveDateTime>),
        m::updated_at.eq(now_db),
        m::finished_at.eq(Some(now_db)),
    ))
    .execute(c))?)
}

/// The campaign's recipients made so far, by stored status (`held` among them).
pub fn counts(conn: &mut DbConn, campaign_id: i64) -> DbResult<Vec<(String, i64)>> {
    use diesel::dsl::count_star;
    use messages::dsl as m;
    Ok(dispatch!(conn, |c| m::messages
        .filter(m::campaign_id.eq(campaign_id))
        .group_by(m::status)
        .select((m::status, count_star()))
        .load(c))?)
}

/// Whether any recipient made so far is not final.
pub fn any_pending(conn: &mut DbConn, campaign_id: i64) -> DbResult<bool> {
    use messages::dsl as m;
    let pending = [HELD, Status::Queued.as_str(), Status::Sending.as_str()];
    Ok(dispatch!(conn, |c| diesel::select(diesel::dsl::exists(
        m::messages
            .filter(m::campaign_id.eq(campaign_id))
            .filter(m::status.eq_any(pending))
    ))
    .get_result(c))?)
}

/// The internal id of recipient `public_id` of the campaign, if it is one.
pub fn find(conn: &mut DbConn, campaign_id: i64, public_id: &str) -> DbResult<Option<i64>> {
    use messages::dsl as m;
    Ok(dispatch!(conn, |c| m::messages
        .filter(m::public_id.eq(public_id))
        .filter(m::campaign_id.eq(campaign_id))
        .select(m::id)
        .first(c)
        .optional())?)
}

/// Up to `limit` recipients after internal id `after`, in the order they were made.
pub fn page(
    conn: &mut DbConn,
    campaign_id: i64,
    after: i64,
    limit: i64,
) -> DbResult<Vec<(MessageRow, Vec<AttemptRow>)>> {
    use messages::dsl as m;
    let ids: Vec<i64> = dispatch!(conn, |c| m::messages
        .filter(m::campaign_id.eq(campaign_id))
        .filter(m::id.gt(after))
        .order(m::id)
        .limit(limit)
        .select(m::id)
        .load(c))?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(found) = store::load(conn, id)? {
            out.push(found);
        }
    }
    Ok(out)
}
