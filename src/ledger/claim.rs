//! Spending: take one use of the credential that expires first, give it back, or mark
//! a credential dead.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Text, Timestamp};

use super::{Credential, CredentialRow};
use crate::db::schema::credentials::dsl as c;
use crate::db::{native_sql, single_write, DbConn, DbResult};
use crate::dispatch;
use crate::time::to_db;

/// One use of a credential, taken by [`claim`]. Hand it back with [`release`] when the
/// message failed for a reason that is not the credential's; otherwise it is spent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a claimed use is spent unless it is released"]
pub struct Use {
    /// The credential as it was right after the use was taken.
    pub credential: Credential,
}

/// The subscription to the template, oldest first.
const SUBSCRIPTION: &str = "SELECT id FROM credentials \
     WHERE app_id = $1 AND openid = $2 AND kind = 'subscription' AND template_id = $4 \
       AND uses_left > 0 AND NOT invalid \
     ORDER BY id LIMIT 1";

/// The form_id / prepay_id that expires first; ties: the oldest report.
const SOONEST: &str = "SELECT id FROM credentials \
     WHERE app_id = $1 AND openid = $2 AND kind IN ('form_id', 'prepay_id') \
       AND uses_left > 0 AND NOT invalid AND expires_at > $3 \
     ORDER BY expires_at, id LIMIT 1";

/// Which credentials a claim may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick<'a> {
    /// form_ids and prepay_ids only.
    Tokens,
    /// A subscription to the template first (it never expires), then form_ids and
    /// prepay_ids: the template-message channel.
    SubscriptionFirst(&'a str),
    /// Only subscriptions to the template: the subscribe-message channel.
    SubscriptionOnly(&'a str),
}

/// Takes one use of the user's live credential that expires first, among those
/// `pick` allows. None when the user has nothing usable.
///
/// PostgreSQL: one `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED)` per try,
/// so concurrent claimers on any number of instances take different rows without
/// waiting; only if every candidate is locked by someone else does it wait for a row
/// lock (held for one statement), so a multi-use credential is not reported missing
/// just because another claim touched it. SQLite: the same statement in an immediate
/// transaction. The `uses_left > 0` guard on the UPDATE itself makes a double spend
/// impossible whatever the isolation level.
pub fn claim(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    pick: Pick<'_>,
    now: DateTime<Utc>,
) -> DbResult<Option<Use>> {
    let (pickers, template_id): (&[&str], Option<&str>) = match pick {
        Pick::Tokens => (&[SOONEST], None),
        Pick::SubscriptionFirst(t) => (&[SUBSCRIPTION, SOONEST], Some(t)),
        Pick::SubscriptionOnly(t) => (&[SUBSCRIPTION], Some(t)),
    };
    for &picker in pickers {
        let locks: &[&str] = match conn {
            // A subscription has one use: one locked by another claimer is being
            // spent, so waiting for it would only find it used up.
            DbConn::Pg(_) if picker == SUBSCRIPTION => &[" FOR UPDATE SKIP LOCKED"],
            DbConn::Pg(_) => &[" FOR UPDATE SKIP LOCKED", " FOR UPDATE"],
            DbConn::Sqlite(_) => &[""],
        };
        for lock in locks {
            let sql = spend_sql(conn, picker, lock);
            let row = single_write(conn, |conn| {
                dispatch!(conn, |conn| {
                    let query = diesel::sql_query(&sql)
                        .into_boxed()
                        .bind::<Text, _>(app_id)
                        .bind::<Text, _>(openid)
                        .bind::<Timestamp, _>(to_db(now));
                    // SQLite refuses a parameter the statement does not use.
                    let query = match template_id {
                        Some(t) if picker == SUBSCRIPTION => query.bind::<Text, _>(t),
                        _ => query,
                    };
                    query.get_result::<CredentialRow>(conn).optional()
                })
            })?;
            if let Some(row) = row {
                return Ok(Some(Use {
                    credential: row.try_into()?,
                }));
            }
        }
    }
    Ok(None)
}

/// `UPDATE … RETURNING` that spends one use of the row `picker` selects.
fn spend_sql(conn: &DbConn, picker: &str, lock: &str) -> String {
    native_sql(
        conn,
        &format!(
            "UPDATE credentials SET uses_left = uses_left - 1, updated_at = $3 \
             WHERE id = ({picker}{lock}) AND uses_left > 0 RETURNING *"
        ),
    )
}

/// Gives a claimed use back: the message failed for a reason that is not the
/// credential's. Returns false if there was nothing to give back (the row is gone).
pub fn release(conn: &mut DbConn, used: Use, now: DateTime<Utc>) -> DbResult<bool> {
    release_id(conn, used.credential.id, now)
}

/// [`release`] by credential id, for a use recorded elsewhere (the outbox keeps the
/// id of the use a message holds, across restarts).
pub fn release_id(conn: &mut DbConn, credential_id: i64, now: DateTime<Utc>) -> DbResult<bool> {
    let changed = dispatch!(conn, |conn| diesel::update(
        c::credentials
            .filter(c::id.eq(credential_id))
            .filter(c::uses_left.lt(c::uses_total))
    )
    .set((
        c::uses_left.eq(c::uses_left + 1),
        c::updated_at.eq(to_db(now))
    ))
    .execute(conn))?;
    Ok(changed == 1)
}

/// Marks a credential dead: WeChat said it is bad (expired, used up, withdrawn).
pub fn invalidate(
    conn: &mut DbConn,
    credential_id: i64,
    reason: &str,
    now: DateTime<Utc>,
) -> DbResult<bool> {
    let changed = dispatch!(conn, |conn| diesel::update(
        c::credentials.filter(c::id.eq(credential_id))
    )
    .set((
        c::invalid.eq(true),
        c::invalid_reason.eq(reason),
        c::updated_at.eq(to_db(now))
    ))
    .execute(conn))?;
    Ok(changed == 1)
}
