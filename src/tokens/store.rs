//! The `access_tokens` rows: one per app, shared by every instance, with a lease
//! that lets exactly one instance at a time call WeChat for a new token.

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use diesel::prelude::*;

use crate::db::schema::access_tokens::dsl as t;
use crate::db::{single_write, DbConn, DbResult};
use crate::dispatch;
use crate::time::to_db;

/// The longest a stored error message may be (it is shown to admins).
const MAX_ERROR_LEN: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// Empty until the first fetch.
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub fetched_at: Option<DateTime<Utc>>,
    pub failures: i32,
    pub last_error: Option<String>,
}

/// When a refresh is wanted; checked against the row under the lease.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// The token expires before this instant (or there is none).
    ExpiresBefore(DateTime<Utc>),
    /// The token is still `stale` (compare-and-refresh) and, with `fetched_before`,
    /// was fetched no later than that: a young token is not replaced (WeChat allows
    /// ~20 forced refreshes a day, 30 s apart), whichever instance fetched it.
    StillCurrent {
        stale: &'a str,
        fetched_before: Option<DateTime<Utc>>,
    },
}

impl Need<'_> {
    pub fn holds(&self, row: &StoredToken) -> bool {
        match self {
            Need::ExpiresBefore(at) => row.token.is_empty() || row.expires_at <= *at,
            Need::StillCurrent {
                stale,
                fetched_before,
            } => {
                row.token == *stale
                    && fetched_before.is_none_or(|b| row.fetched_at.is_none_or(|f| f <= b))
            }
        }
    }
}

/// Creates the row of each app (with no token yet) if it is missing.
pub fn ensure_rows(conn: &mut DbConn, app_ids: &[String]) -> DbResult<()> {
    let never = DateTime::<Utc>::UNIX_EPOCH.naive_utc();
    for app_id in app_ids {
        dispatch!(conn, |c| diesel::insert_into(t::access_tokens)
            .values((t::app_id.eq(app_id), t::expires_at.eq(never)))
            .on_conflict_do_nothing()
            .execute(c))?;
    }
    Ok(())
}

pub fn load(conn: &mut DbConn, app_id: &str) -> DbResult<Option<StoredToken>> {
    type Row = (
        String,
        NaiveDateTime,
        Option<NaiveDateTime>,
        i32,
        Option<String>,
    );
    let row: Option<Row> = dispatch!(conn, |c| t::access_tokens
        .filter(t::app_id.eq(app_id))
        .select((
            t::token,
            t::expires_at,
            t::fetched_at,
            t::failures,
            t::last_error
        ))
        .first(c)
        .optional())?;
    Ok(row.map(
        |(token, expires_at, fetched_at, failures, last_error)| StoredToken {
            token,
            expires_at: expires_at.and_utc(),
            fetched_at: fetched_at.map(|f| f.and_utc()),
            failures,
            last_error,
        },
    ))
}

/// Takes the refresh lease if nobody holds an unexpired one and the refresh is still
/// needed, in one statement: of N instances racing, one wins.
pub fn take_lease(
    conn: &mut DbConn,
    app_id: &str,
    owner: &str,
    need: Need<'_>,
    now: DateTime<Utc>,
    lease: TimeDelta,
) -> DbResult<bool> {
    let now_db = to_db(now);
    let until = to_db(now + lease);
    let changed = single_write(conn, |conn| {
        dispatch!(conn, |c| {
            let free = t::access_tokens
                .filter(t::app_id.eq(app_id))
                .filter(t::lease_until.is_null().or(t::lease_until.lt(now_db)));
            let target = (t::lease_owner.eq(owner), t::lease_until.eq(until));
            match need {
                Need::ExpiresBefore(at) => {
                    diesel::update(free.filter(t::token.eq("").or(t::expires_at.le(to_db(at)))))
                        .set(target)
                        .execute(c)
                }
                Need::StillCurrent {
                    stale,
                    fetched_before: None,
                } => diesel::update(free.filter(t::token.eq(stale)))
                    .set(target)
                    .execute(c),
                // The age is decided here, in the shared row, so the limit holds
                // across instances.
                Need::StillCurrent {
                    stale,
                    fetched_before: Some(before),
                } => diesel::update(
                    free.filter(t::token.eq(stale))
                        .filter(t::fetched_at.is_null().or(t::fetched_at.le(to_db(before)))),
                )
                .set(target)
                .execute(c),
            }
        })
    })?;
    Ok(changed == 1)
}

/// The app's row while `owner` holds its lease.
#[diesel::dsl::auto_type(no_type_alias)]
fn leased_row<'a>(app_id: &'a str, owner: &'a str) -> _ {
    t::access_tokens
        .filter(t::app_id.eq(app_id))
        .filter(t::lease_owner.eq(owner))
}

/// The assignments that give the lease up.
#[diesel::dsl::auto_type(no_type_alias)]
fn lease_freed() -> _ {
    let nobody: Option<String> = None;
    let never: Option<NaiveDateTime> = None;
    (t::lease_owner.eq(nobody), t::lease_until.eq(never))
}

/// Stores a fetched token and gives the lease up. False if the lease was lost (it
/// ran out and someone else took it): then the token is not stored.
pub fn store(
    conn: &mut DbConn,
    app_id: &str,
    owner: &str,
    token: &str,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> DbResult<bool> {
    let changed = dispatch!(conn, |c| diesel::update(leased_row(app_id, owner))
        .set((
            t::token.eq(token),
            t::expires_at.eq(to_db(expires_at)),
            t::fetched_at.eq(to_db(now)),
            lease_freed(),
            t::failures.eq(0),
            t::last_error.eq(None::<String>),
        ))
        .execute(c))?;
    Ok(changed == 1)
}

/// Gives the lease up leaving the row as it was (WeChat confirmed the stored token).
pub fn release(conn: &mut DbConn, app_id: &str, owner: &str) -> DbResult<()> {
    dispatch!(conn, |c| diesel::update(leased_row(app_id, owner))
        .set(lease_freed())
        .execute(c))?;
    Ok(())
}

/// Records a failed fetch and gives the lease up; the old token stays.
pub fn fail(conn: &mut DbConn, app_id: &str, owner: &str, error: &str) -> DbResult<()> {
    let error: String = error.chars().take(MAX_ERROR_LEN).collect();
    dispatch!(conn, |c| diesel::update(leased_row(app_id, owner))
        .set((
            lease_freed(),
            t::failures.eq(t::failures + 1),
            t::last_error.eq(error),
        ))
        .execute(c))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(token: &str, fetched_at: Option<DateTime<Utc>>) -> StoredToken {
        StoredToken {
            token: token.into(),
            expires_at: DateTime::<Utc>::UNIX_EPOCH,
            fetched_at,
            failures: 0,
            last_error: None,
        }
    }

    #[test]
    fn compare_and_refresh_needs_the_stale_token_and_an_old_enough_fetch() {
        let now = crate::time::now();
        let cutoff = Some(now - TimeDelta::seconds(30));
        let need = |stale, fetched_before| Need::StillCurrent {
            stale,
            fetched_before,
        };
        let old = Some(now - TimeDelta::seconds(31));
        let young = Some(now - TimeDelta::seconds(1));
        assert!(need("a", cutoff).holds(&row("a", old)));
        assert!(need("a", cutoff).holds(&row("a", None)), "never fetched");
        assert!(
            !need("a", cutoff).holds(&row("a", young)),
            "fetched within the interval"
        );
        assert!(
            !need("a", cutoff).holds(&row("b", old)),
            "not the current token"
        );
        assert!(need("a", None).holds(&row("a", young)), "no limit");
        assert!(!need("a", None).holds(&row("b", young)));
    }
}
