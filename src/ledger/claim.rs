//! Spending: take one use of the credential that expires first, give it back, or mark
//! a credential dead.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Text, Timestamp};

use super::{Credential, CredentialRow};
use crate::db::schema::credentials::dsl as c;
use crate::db::{cached, native_sql, single_write, DbConn, DbResult};
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

/// How a claim picks the row it spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Picker {
    /// The subscription to the template, oldest first.
    Subscription,
    /// The form_id / prepay_id that expires first; ties: the oldest report.
    Soonest,
}

impl Picker {
    /// The subquery selecting the row's id, for the user `app`, `openid` (and template
    /// `template`) at `now`: SQL expressions, parameters or columns, so one rule
    /// serves [`claim`] and [`claim_each`].
    fn sql(self, app: &str, openid: &str, now: &str, template: &str) -> String {
        match self {
            Picker::Subscription => format!(
                "SELECT id FROM credentials \
                 WHERE app_id = {app} AND openid = {openid} AND kind = 'subscription' \
                   AND template_id = {template} AND uses_left > 0 AND NOT invalid \
                 ORDER BY id LIMIT 1"
            ),
            Picker::Soonest => format!(
                "SELECT id FROM credentials \
                 WHERE app_id = {app} AND openid = {openid} AND kind IN ('form_id', 'prepay_id') \
                   AND uses_left > 0 AND NOT invalid AND expires_at > {now} \
                 ORDER BY expires_at, id LIMIT 1"
            ),
        }
    }
}

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
/// just because another claim touched it. SQLite: one statement (the subscription,
/// else the soonest token: `COALESCE`) in an immediate transaction. The
/// `uses_left > 0` guard on the UPDATE itself makes a double spend impossible
/// whatever the isolation level.
pub fn claim(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    pick: Pick<'_>,
    now: DateTime<Utc>,
) -> DbResult<Option<Use>> {
    let (pickers, template_id): (&[Picker], Option<&str>) = match pick {
        Pick::Tokens => (&[Picker::Soonest], None),
        Pick::SubscriptionFirst(t) => (&[Picker::Subscription, Picker::Soonest], Some(t)),
        Pick::SubscriptionOnly(t) => (&[Picker::Subscription], Some(t)),
    };
    // Each try: the pickers its statement takes in turn, and the row lock. SQLite
    // has no row locks: one statement takes the subscription, else the soonest token.
    let tries: Vec<(&[Picker], &str)> = match conn {
        DbConn::Sqlite(_) => vec![(pickers, "")],
        // A subscription has one use: one locked by another claimer is being spent,
        // so waiting for it would only find it used up.
        DbConn::Pg(_) => pickers
            .iter()
            .flat_map(|picker| {
                let locks: &[&str] = match picker {
                    Picker::Subscription => &[" FOR UPDATE SKIP LOCKED"],
                    Picker::Soonest => &[" FOR UPDATE SKIP LOCKED", " FOR UPDATE"],
                };
                locks
                    .iter()
                    .map(move |lock| (std::slice::from_ref(picker), *lock))
            })
            .collect(),
    };
    for (pickers, lock) in tries {
        let sql = spend_sql(conn, pickers, lock);
        let row = single_write(conn, |conn| {
            dispatch!(conn, |conn| {
                let query = diesel::sql_query(&sql)
                    .into_boxed()
                    .bind::<Text, _>(app_id)
                    .bind::<Text, _>(openid)
                    .bind::<Timestamp, _>(to_db(now));
                // SQLite refuses a parameter the statement does not use.
                let query = match template_id {
                    Some(t) if pickers.contains(&Picker::Subscription) => query.bind::<Text, _>(t),
                    _ => query,
                };
                cached(query).get_result::<CredentialRow>(conn).optional()
            })
        })?;
        if let Some(row) = row {
            return Ok(Some(Use {
                credential: row.try_into()?,
            }));
        }
    }
    Ok(None)
}

/// The columns of [`CredentialRow`], named: the spend statement is kept prepared
/// (`db::cached`), and PostgreSQL refuses to reuse a prepared `RETURNING *` once a
/// migration of another instance added a column ("cached plan must not change
/// result type").
const CREDENTIAL_COLUMNS: &str = "id, app_id, openid, kind, value, template_id, uses_total, \
     uses_left, issued_at, expires_at, invalid, invalid_reason, created_at, updated_at, \
     reported_at, pushed_at";

/// `UPDATE … RETURNING` that spends one use of the row the first of `pickers` that
/// finds one selects.
fn spend_sql(conn: &DbConn, pickers: &[Picker], lock: &str) -> String {
    let subqueries: Vec<String> = pickers
        .iter()
        .map(|p| format!("({}{lock})", p.sql("$1", "$2", "$3", "$4")))
        .collect();
    let picked = match subqueries.as_slice() {
        [one] => one.clone(),
        more => format!("COALESCE({})", more.join(", ")),
    };
    native_sql(
        conn,
        &format!(
            "UPDATE credentials SET uses_left = uses_left - 1, updated_at = $3 \
             WHERE id = {picked} AND uses_left > 0 RETURNING {CREDENTIAL_COLUMNS}"
        ),
    )
}

/// One user's claim of [`claim_each`].
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    pub app_id: &'a str,
    pub openid: &'a str,
    pub pick: Pick<'a>,
}

#[derive(QueryableByName)]
struct Taken {
    /// The want's position (1-based).
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
    #[diesel(embed)]
    row: CredentialRow,
}

/// [`claim`] for many users in one statement, in the caller's transaction: the use
/// taken for each want, where one was free. PostgreSQL only, over arrays, with
/// `SKIP LOCKED` and no waiting: a None is not "the user has nothing", so the caller
/// asks [`claim`] for those (it waits for a locked multi-use row and says whether
/// anything is left). SQLite: None for every want ([`claim`] one by one costs no
/// round trip there).
pub fn claim_each(
    conn: &mut DbConn,
    wants: &[Want<'_>],
    now: DateTime<Utc>,
) -> DbResult<Vec<Option<Use>>> {
    use diesel::sql_types::{Array, Int4};
    let mut taken: Vec<Option<Use>> = wants.iter().map(|_| None).collect();
    let DbConn::Pg(pg) = conn else {
        return Ok(taken);
    };
    if wants.is_empty() {
        return Ok(taken);
    }
    let (mut apps, mut openids, mut modes, mut templates) = (vec![], vec![], vec![], vec![]);
    for w in wants {
        let (mode, template) = match w.pick {
            Pick::Tokens => (0, ""),
            Pick::SubscriptionFirst(t) => (1, t),
            Pick::SubscriptionOnly(t) => (2, t),
        };
        apps.push(w.app_id);
        openids.push(w.openid);
        modes.push(mode);
        templates.push(template);
    }
    let subscription = Picker::Subscription.sql("w.a", "w.o", "$5", "w.t");
    let soonest = Picker::Soonest.sql("w.a", "w.o", "$5", "w.t");
    // COALESCE stops at its first non-null argument: the subscription first, the
    // tokens only if there is none.
    let sql = format!(
        "WITH p AS (SELECT w.n, COALESCE( \
             CASE WHEN w.m > 0 THEN ({subscription} FOR UPDATE SKIP LOCKED) END, \
             CASE WHEN w.m < 2 THEN ({soonest} FOR UPDATE SKIP LOCKED) END) AS id \
           FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[]) \
             WITH ORDINALITY AS w(a, o, m, t, n)) \
         UPDATE credentials c SET uses_left = c.uses_left - 1, updated_at = $5 \
         FROM p WHERE c.id = p.id AND c.uses_left > 0 \
         RETURNING p.n, c.*"
    );
    let rows: Vec<Taken> = diesel::sql_query(sql)
        .bind::<Array<Text>, _>(&apps)
        .bind::<Array<Text>, _>(&openids)
        .bind::<Array<Int4>, _>(&modes)
        .bind::<Array<Text>, _>(&templates)
        .bind::<Timestamp, _>(to_db(now))
        .load(pg)?;
    for t in rows {
        // Two wants of one user may pick one row: it is spent once, for one of them.
        if let Some(slot) = usize::try_from(t.n - 1).ok().and_then(|i| taken.get_mut(i)) {
            *slot = Some(Use {
                credential: t.row.try_into()?,
            });
        }
    }
    Ok(taken)
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
