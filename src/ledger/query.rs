//! Reading the ledger (quota, users, stats) and purging what is dead.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use diesel::prelude::*;
use serde::Serialize;

use super::{Kind, MAX_TEMPLATES_PER_USER, SUBSCRIPTION_RESULTS};
use crate::db::schema::credentials::dsl as c;
use crate::db::{cached, purge_keyed, purge_where, DbConn, DbError, DbResult};
use crate::dispatch;
use crate::time::to_db;

/// Live: uses left, not found invalid, not expired (subscriptions never expire).
macro_rules! live {
    ($query:expr, $now:expr) => {
        $query
            .filter(c::uses_left.gt(0))
            .filter(c::invalid.eq(false))
            .filter(c::expires_at.is_null().or(c::expires_at.gt($now)))
    };
}

/// Live subscriptions (grants) the user holds for the template.
pub fn live_grants(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    template_id: &str,
    now: DateTime<Utc>,
) -> DbResult<i64> {
    let now = to_db(now);
    Ok(dispatch!(conn, |conn| live!(
        c::credentials
            .filter(c::app_id.eq(app_id))
            .filter(c::openid.eq(openid))
            .filter(c::kind.eq(Kind::Subscription.as_str()))
            .filter(c::template_id.eq(template_id)),
        now
    )
    .count()
    .get_result(conn))?)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct KindQuota {
    pub credentials: u32,
    pub uses_left: u32,
    #[serde(with = "crate::time::rfc3339::option")]
    pub next_expiry: Option<DateTime<Utc>>,
}

impl KindQuota {
    fn add(&mut self, uses_left: i32, expires_at: Option<DateTime<Utc>>) {
        self.credentials += 1;
        self.uses_left += u32::try_from(uses_left).unwrap_or(0);
        if let Some(t) = expires_at {
            self.next_expiry = Some(self.next_expiry.map_or(t, |n| n.min(t)));
        }
    }
}

/// What one user can be sent, as the quota endpoint shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Quota {
    pub app_id: String,
    pub openid: String,
    /// Uses left of form_id and prepay_id credentials.
    pub sendable: u32,
    pub by_kind: BTreeMap<Kind, KindQuota>,
    /// Template id → sends left.
    pub subscriptions: BTreeMap<String, u32>,
    /// Template id → live grants WeChat itself pushed (message push), merged or not
    /// with a client report.
    pub subscriptions_confirmed: BTreeMap<String, u32>,
    /// Template id → result (`accept`, `reject`, `ban`, `filter`) → times reported.
    pub subscription_results: BTreeMap<String, BTreeMap<String, u64>>,
    pub expiring_within_24h: u32,
}

/// The user's live credentials, summed up. A user never seen has zeros.
pub fn quota(conn: &mut DbConn, app_id: &str, openid: &str, now: DateTime<Utc>) -> DbResult<Quota> {
    let (rows, counts) = quota_rows(conn, app_id, openid, to_db(now))?;
    let soon = now + TimeDelta::hours(24);
    let mut quota = Quota {
        app_id: app_id.into(),
        openid: openid.into(),
        sendable: 0,
        by_kind: [Kind::FormId, Kind::PrepayId]
            .into_iter()
            .map(|k| (k, KindQuota::default()))
            .collect(),
        subscriptions: BTreeMap::new(),
        subscriptions_confirmed: BTreeMap::new(),
        subscription_results: BTreeMap::new(),
        expiring_within_24h: 0,
    };
    for (template_id, result, n) in counts {
        quota
            .subscription_results
            .entry(template_id)
            .or_default()
            .insert(result, u64::try_from(n).unwrap_or(0));
    }
    for (kind, template_id, uses_left, expires_at, pushed_at) in rows {
        let expires_at = expires_at.map(|t| t.and_utc());
        let uses = u32::try_from(uses_left).unwrap_or(0);
        match Kind::from_db(&kind)? {
            Kind::Subscription => {
                let template_id = template_id.unwrap_or_default();
                if pushed_at.is_some() {
                    *quota
                        .subscriptions_confirmed
                        .entry(template_id.clone())
                        .or_default() += uses;
                }
                *quota.subscriptions.entry(template_id).or_default() += uses;
            }
            kind => {
                quota.sendable += uses;
                quota
                    .by_kind
                    .entry(kind)
                    .or_default()
                    .add(uses_left, expires_at);
            }
        }
        if expires_at.is_some_and(|t| t <= soon) {
            quota.expiring_within_24h += 1;
        }
    }
    Ok(quota)
}

/// A live credential as the quota reads it: kind, template, uses left, expiry, push.
type LiveRow = (
    String,
    Option<String>,
    i32,
    Option<NaiveDateTime>,
    Option<NaiveDateTime>,
);

/// Template, result, count.
type ResultCount = (String, String, i64);

/// The user's live credentials and subscription-result counts. The template cap
/// bounds what new reports store; the limit also bounds rows stored before it (the
/// most recent first), and unknown results of such rows are not shown.
fn quota_rows(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    now: NaiveDateTime,
) -> DbResult<(Vec<LiveRow>, Vec<ResultCount>)> {
    use crate::db::schema::subscription_results::dsl as r;
    let most = i64::from(MAX_TEMPLATES_PER_USER) * SUBSCRIPTION_RESULTS.len() as i64;
    match conn {
        // One call of `ledger_quota` (migration 2026-12-06-000001): the same two
        // reads, planned once per connection instead of on every execution.
        DbConn::Pg(pg) => {
            use diesel::sql_types::{Array, BigInt, Text, Timestamp};
            let rows: Vec<QuotaRow> = cached(
                diesel::sql_query("SELECT * FROM ledger_quota($1, $2, $3, $4, $5)")
                    .bind::<Text, _>(app_id)
                    .bind::<Text, _>(openid)
                    .bind::<Timestamp, _>(now)
                    .bind::<Array<Text>, _>(&SUBSCRIPTION_RESULTS[..])
                    .bind::<BigInt, _>(most),
            )
            .load(pg)?;
            let (mut live, mut counts) = (Vec::new(), Vec::new());
            for row in rows {
                match (row.result, row.kind, row.n, row.uses_left) {
                    (Some(result), _, Some(n), _) => {
                        counts.push((row.template_id.unwrap_or_default(), result, n))
                    }
                    (None, Some(kind), _, Some(uses_left)) => live.push((
                        kind,
                        row.template_id,
                        uses_left,
                        row.expires_at,
                        row.pushed_at,
                    )),
                    _ => return Err(DbError::Corrupt("a quota row without its fields".into())),
                }
            }
            Ok((live, counts))
        }
        DbConn::Sqlite(c) => {
            let live = live!(
                c::credentials
                    .filter(c::app_id.eq(app_id))
                    .filter(c::openid.eq(openid)),
                now
            )
            .select((
                c::kind,
                c::template_id,
                c::uses_left,
                c::expires_at,
                c::pushed_at,
            ))
            .load(c)?;
            let counts = r::subscription_results
                .filter(r::app_id.eq(app_id))
                .filter(r::openid.eq(openid))
                .filter(r::result.eq_any(SUBSCRIPTION_RESULTS))
                .order(r::last_at.desc())
                .limit(most)
                .select((r::template_id, r::result, r::count))
                .load(c)?;
            Ok((live, counts))
        }
    }
}

/// A row of `ledger_quota`: a live credential (`result` NULL) or a result count.
#[derive(QueryableByName)]
struct QuotaRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    kind: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    template_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    result: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    n: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Integer>)]
    uses_left: Option<i32>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    expires_at: Option<NaiveDateTime>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    pushed_at: Option<NaiveDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UserSummary {
    pub openid: String,
    /// Live credentials of every kind.
    pub credentials: u32,
    /// Uses left of every kind.
    pub uses_left: u32,
    #[serde(with = "crate::time::rfc3339::option")]
    pub next_expiry: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UserPage {
    pub users: Vec<UserSummary>,
    /// Pass as `cursor` for the next page; None on the last page.
    pub next_cursor: Option<String>,
}

/// Users of the app with live credentials, by openid, `limit` at a time after
/// `cursor` (the last openid of the previous page).
pub fn users(
    conn: &mut DbConn,
    app_id: &str,
    limit: u32,
    cursor: Option<&str>,
    now: DateTime<Utc>,
) -> DbResult<UserPage> {
    use diesel::dsl::{count_star, min, sum};
    let now_db = to_db(now);
    let after = cursor.unwrap_or("");
    let fetch = i64::from(limit) + 1;
    type Row = (String, i64, Option<i64>, Option<NaiveDateTime>);
    let mut rows: Vec<Row> = dispatch!(conn, |conn| live!(
        c::credentials
            .filter(c::app_id.eq(app_id))
            .filter(c::openid.gt(after)),
        now_db
    )
    .group_by(c::openid)
    .select((
        c::openid,
        count_star(),
        sum(c::uses_left),
        min(c::expires_at)
    ))
    .order(c::openid)
    .limit(fetch)
    .load(conn))?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let users: Vec<UserSummary> = rows
        .into_iter()
        .map(|(openid, n, uses, next)| UserSummary {
            openid,
            credentials: u32::try_from(n).unwrap_or(u32::MAX),
            uses_left: u32::try_from(uses.unwrap_or(0)).unwrap_or(u32::MAX),
            next_expiry: next.map(|t| t.and_utc()),
        })
        .collect();
    let next_cursor = more
        .then(|| users.last().map(|u| u.openid.clone()))
        .flatten();
    Ok(UserPage { users, next_cursor })
}

/// Up to `limit` users of the app, by openid after `after`, holding a live
/// credential that `pick` could spend now: a campaign's "holding" audience, a page
/// at a time.
pub fn holders(
    conn: &mut DbConn,
    app_id: &str,
    pick: super::Pick<'_>,
    after: &str,
    limit: i64,
    now: DateTime<Utc>,
) -> DbResult<Vec<String>> {
    use super::Pick;
    let tokens = [Kind::FormId.as_str(), Kind::PrepayId.as_str()];
    let (template, tokens_too) = match pick {
        Pick::Tokens => (None, true),
        Pick::SubscriptionFirst(t) => (Some(t), true),
        Pick::SubscriptionOnly(t) => (Some(t), false),
    };
    let subscribed = c::kind
        .eq(Kind::Subscription.as_str())
        .and(c::template_id.eq(template.unwrap_or("")))
        .and(template.is_some().into_sql::<diesel::sql_types::Bool>());
    let token = c::kind
        .eq_any(tokens)
        .and(tokens_too.into_sql::<diesel::sql_types::Bool>());
    Ok(dispatch!(conn, |conn| live!(
        c::credentials
            .filter(c::app_id.eq(app_id))
            .filter(c::openid.gt(after))
            .filter(subscribed.or(token)),
        to_db(now)
    )
    .select(c::openid)
    .distinct()
    .order(c::openid)
    .limit(limit)
    .load(conn))?)
}

/// Totals of one app's live credentials. (Message totals join these once messages exist.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub app_id: String,
    /// Kind → live credentials and their uses left.
    pub live: BTreeMap<Kind, KindTotals>,
    pub expiring_within_24h: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct KindTotals {
    pub credentials: u64,
    pub uses_left: u64,
}

pub fn stats(conn: &mut DbConn, app_id: &str, now: DateTime<Utc>) -> DbResult<Stats> {
    use diesel::dsl::{count_star, sum};
    let now_db = to_db(now);
    let soon = to_db(now + TimeDelta::hours(24));
    let (by_kind, expiring): (Vec<(String, i64, Option<i64>)>, i64) = dispatch!(conn, |conn| {
        let by_kind = live!(c::credentials.filter(c::app_id.eq(app_id)), now_db)
            .group_by(c::kind)
            .select((c::kind, count_star(), sum(c::uses_left)))
            .load(conn)?;
        let expiring = live!(c::credentials.filter(c::app_id.eq(app_id)), now_db)
            .filter(c::expires_at.le(soon))
            .count()
            .get_result(conn)?;
        (by_kind, expiring)
    });
    let mut live: BTreeMap<Kind, KindTotals> = [Kind::FormId, Kind::PrepayId, Kind::Subscription]
        .into_iter()
        .map(|k| (k, KindTotals::default()))
        .collect();
    for (kind, n, uses) in by_kind {
        live.insert(
            Kind::from_db(&kind)?,
            KindTotals {
                credentials: u64::try_from(n).unwrap_or(0),
                uses_left: u64::try_from(uses.unwrap_or(0)).unwrap_or(0),
            },
        );
    }
    Ok(Stats {
        app_id: app_id.into(),
        live,
        expiring_within_24h: u64::try_from(expiring).unwrap_or(0),
    })
}

/// Deletes credentials that expired, or were used up or found invalid, before
/// `older_than`, in batches (see [`crate::db::purge_where`]); `dry_run` only counts.
pub fn purge(
    conn: &mut DbConn,
    older_than: DateTime<Utc>,
    batch: u32,
    dry_run: bool,
) -> DbResult<u64> {
    let expired = "expires_at < $1";
    let used_up = "(uses_left = 0 OR invalid) AND updated_at < $1";
    if dry_run {
        // A row both expired and used up is counted once.
        let either = format!("{expired} OR ({used_up})");
        return purge_where(conn, "credentials", &either, older_than, batch, true);
    }
    // Deleted in two passes, each walking its own index (expires_at; the partial
    // index of dead rows), so no batch scans the table while holding the lock.
    let mut total = 0;
    for predicate in [expired, used_up] {
        total += purge_where(conn, "credentials", predicate, older_than, batch, false)?;
    }
    Ok(total)
}

/// Deletes subscription results no report touched since `older_than` (see
/// [`crate::db::purge_keyed`]); `dry_run` only counts. They only inform the quota,
/// and a user silent that long is as stale as the dead credentials purged with the
/// same retention; a new report counts afresh.
pub fn purge_results(
    conn: &mut DbConn,
    older_than: DateTime<Utc>,
    batch: u32,
    dry_run: bool,
) -> DbResult<u64> {
    purge_keyed(
        conn,
        "subscription_results",
        "app_id, openid, template_id, result",
        "last_at < $1",
        older_than,
        batch,
        dry_run,
    )
}
