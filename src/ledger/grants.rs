//! Subscription grants WeChat pushed (message push), and the merge rule that makes
//! a grant count once whether the mini-program reported the `accept`, WeChat pushed
//! it, or both.
//!
//! A subscription row remembers who told the ledger: `reported_at` (the client) and
//! `pushed_at` (WeChat). A client accept and a pushed accept for the same (app,
//! openid, template) within [`MERGE_WINDOW`] of each other are one row with both
//! set; each side matches at most one of the other (the column it fills must be
//! empty), the oldest unmatched first. Whichever arrives first inserts the row and
//! the second fills in its column; both run under the user's lock (PostgreSQL: the
//! advisory lock the reports take; SQLite: the one write transaction), so two
//! arrivals never match the same row nor miss each other.

use chrono::{DateTime, TimeDelta, Utc};
use diesel::prelude::*;

use super::record::{count_results, lock_users};
use super::{Kind, MAX_VALUE_LEN, SUBSCRIPTION_RESULTS};
use crate::db::schema::credentials::dsl as c;
use crate::db::{DbConn, DbResult};
use crate::dispatch;
use crate::time::to_db;

/// A client accept and a pushed accept this close are one grant.
pub const MERGE_WINDOW: TimeDelta = TimeDelta::seconds(120);

/// Why a subscription was invalidated by WeChat's change event.
pub const UNSUBSCRIBED: &str = "unsubscribed";

/// Serialises this user's reports and pushes (PostgreSQL; SQLite's write
/// transaction already does). Call inside the transaction.
pub fn lock_user(conn: &mut DbConn, app_id: &str, openid: &str) -> DbResult<()> {
    lock_users(conn, &[(app_id, openid)])
}

/// The client reported an accept: fills in the oldest row WeChat pushed within the
/// window that no client accept matched yet. False if there is none (the caller
/// stores a new row).
pub(super) fn match_reported(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    template_id: &str,
    now: DateTime<Utc>,
) -> DbResult<bool> {
    let since = to_db(now - MERGE_WINDOW);
    let found: Option<i64> = dispatch!(conn, |conn| c::credentials
        .filter(c::app_id.eq(app_id))
        .filter(c::openid.eq(openid))
        .filter(c::kind.eq(Kind::Subscription.as_str()))
        .filter(c::template_id.eq(template_id))
        .filter(c::reported_at.is_null())
        .filter(c::pushed_at.ge(since))
        .order((c::pushed_at, c::id))
        .select(c::id)
        .first(conn)
        .optional())?;
    let Some(id) = found else { return Ok(false) };
    dispatch!(conn, |conn| diesel::update(
        c::credentials.filter(c::id.eq(id))
    )
    .set(c::reported_at.eq(to_db(now)))
    .execute(conn))?;
    Ok(true)
}

/// What a pushed popup or change event did to one user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushedResults {
    /// Pushed accepts that confirmed a grant the client had reported.
    pub merged: u32,
    /// Pushed accepts with no client report: new grants.
    pub granted: u32,
    /// Live subscriptions a `reject` change removed.
    pub removed: u32,
}

/// Applies what WeChat pushed for one user: `(template, status)` items of a popup
/// (`removes` false) or a change event (`removes` true). Every item with one of the
/// four results is counted in `subscription_results` (an accept once per grant: not
/// again when it merges with a client report); a popup's `accept` is a grant
/// under the merge rule; a change's `reject` removes the user's live subscriptions
/// to the template (WeChat would only answer 43101 to them). Call inside a write
/// transaction; takes the user's lock.
pub fn record_pushed(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    items: &[(&str, &str)],
    removes: bool,
    now: DateTime<Utc>,
) -> DbResult<PushedResults> {
    lock_user(conn, app_id, openid)?;
    let mut out = PushedResults::default();
    let mut counted = std::collections::BTreeMap::new();
    for &(template_id, status) in items {
        if template_id.is_empty() || template_id.len() > MAX_VALUE_LEN {
            continue;
        }
        let mut count = SUBSCRIPTION_RESULTS.contains(&status);
        match (removes, status) {
            (false, "accept") => {
                if grant(conn, app_id, openid, template_id, now)? {
                    // The client's report of this accept was counted already.
                    out.merged += 1;
                    count = false;
                } else {
                    out.granted += 1;
                }
            }
            (true, "reject") => {
                out.removed += unsubscribe(conn, app_id, openid, template_id, now)?;
            }
            _ => {}
        }
        if count {
            *counted.entry((template_id, status)).or_insert(0i64) += 1;
        }
    }
    count_results(conn, app_id, openid, &counted, now)?;
    Ok(out)
}

/// A pushed accept: fills in the oldest client-reported row within the window that
/// no push matched yet (true), or stores a new grant (false).
fn grant(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    template_id: &str,
    now: DateTime<Utc>,
) -> DbResult<bool> {
    let now_db = to_db(now);
    let since = to_db(now - MERGE_WINDOW);
    let found: Option<i64> = dispatch!(conn, |conn| c::credentials
        .filter(c::app_id.eq(app_id))
        .filter(c::openid.eq(openid))
        .filter(c::kind.eq(Kind::Subscription.as_str()))
        .filter(c::template_id.eq(template_id))
        .filter(c::pushed_at.is_null())
        .filter(c::reported_at.ge(since))
        .order((c::reported_at, c::id))
        .select(c::id)
        .first(conn)
        .optional())?;
    if let Some(id) = found {
        dispatch!(conn, |conn| diesel::update(
            c::credentials.filter(c::id.eq(id))
        )
        .set(c::pushed_at.eq(now_db))
        .execute(conn))?;
        return Ok(true);
    }
    dispatch!(conn, |conn| diesel::insert_into(c::credentials)
        .values((
            c::app_id.eq(app_id),
            c::openid.eq(openid),
            c::kind.eq(Kind::Subscription.as_str()),
            c::template_id.eq(template_id),
            c::uses_total.eq(1),
            c::uses_left.eq(1),
            c::issued_at.eq(now_db),
            c::created_at.eq(now_db),
            c::updated_at.eq(now_db),
            c::pushed_at.eq(now_db),
        ))
        .execute(conn))?;
    Ok(false)
}

/// The user turned the template off: its live subscriptions are invalid.
fn unsubscribe(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    template_id: &str,
    now: DateTime<Utc>,
) -> DbResult<u32> {
    let n = dispatch!(conn, |conn| diesel::update(
        c::credentials
            .filter(c::app_id.eq(app_id))
            .filter(c::openid.eq(openid))
            .filter(c::kind.eq(Kind::Subscription.as_str()))
            .filter(c::template_id.eq(template_id))
            .filter(c::uses_left.gt(0))
            .filter(c::invalid.eq(false))
    )
    .set((
        c::invalid.eq(true),
        c::invalid_reason.eq(UNSUBSCRIBED),
        c::updated_at.eq(to_db(now)),
    ))
    .execute(conn))?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}
