//! Taking credentials in: validation, duplicates, the per-user cap, one transaction.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;

use super::{is_valid_value, Kind, Rules, MOCK_FORM_ID, VALIDITY};
use crate::db::schema::credentials::dsl as c;
use crate::db::{write_tx, DbConn, DbError, DbResult};
use crate::dispatch;
use crate::time::to_db;

/// One reported item, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A form_id or prepay_id. `issued_at` may only move the expiry earlier.
    Token {
        kind: Kind,
        value: String,
        issued_at: Option<DateTime<Utc>>,
    },
    /// One result of `wx.requestSubscribeMessage` for one template.
    Subscription { template_id: String, result: String },
}

/// What one user reported.
#[derive(Debug, Clone)]
pub struct Report {
    pub app_id: String,
    pub openid: String,
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The devtools' `the formId is a mock one`.
    MockFormId,
    /// Not 1..128 printable ASCII characters without white space.
    InvalidFormat,
    /// The user already holds the configured number of live credentials.
    UserCap,
    /// A subscription result other than `accept`: counted, grants nothing.
    NotAccepted,
    /// `issued_at` is so old that the credential is no longer usable.
    Expired,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MockFormId => "mock_form_id",
            RejectReason::InvalidFormat => "invalid_format",
            RejectReason::UserCap => "user_cap",
            RejectReason::NotAccepted => "not_accepted",
            RejectReason::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Rejection {
    pub value: String,
    pub reason: RejectReason,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RecordOutcome {
    pub accepted: u32,
    pub duplicates: u32,
    pub rejected: Vec<Rejection>,
}

#[derive(Insertable)]
#[diesel(table_name = crate::db::schema::credentials)]
struct NewCredential<'a> {
    app_id: &'a str,
    openid: &'a str,
    kind: &'static str,
    value: Option<&'a str>,
    template_id: Option<&'a str>,
    uses_total: i32,
    uses_left: i32,
    issued_at: chrono::NaiveDateTime,
    expires_at: Option<chrono::NaiveDateTime>,
    created_at: chrono::NaiveDateTime,
    updated_at: chrono::NaiveDateTime,
}

/// A valid item, ready to store unless it is a duplicate or over the cap.
struct Candidate<'a> {
    kind: Kind,
    value: Option<&'a str>,
    template_id: Option<&'a str>,
    uses: i32,
    issued_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
}

/// Validates and stores what users reported, all in one transaction. Items are
/// judged in order: within one user, the cap admits the first ones.
pub fn record(
    conn: &mut DbConn,
    rules: &Rules,
    now: DateTime<Utc>,
    reports: &[Report],
) -> DbResult<RecordOutcome> {
    let mut outcomes = record_group(conn, rules, now, &[reports])?;
    Ok(outcomes.pop().unwrap_or_default())
}

/// Several independent reports (of concurrent requests) in ONE transaction — group
/// commit — each with its own outcome, as if recorded one after the other. On
/// PostgreSQL every user of the group is locked up front in one fixed order, so
/// concurrent groups cannot deadlock.
pub fn record_group(
    conn: &mut DbConn,
    rules: &Rules,
    now: DateTime<Utc>,
    groups: &[&[Report]],
) -> DbResult<Vec<RecordOutcome>> {
    let mut outcomes = vec![RecordOutcome::default(); groups.len()];
    let mut work = Vec::with_capacity(groups.len());
    for (reports, outcome) in groups.iter().zip(outcomes.iter_mut()) {
        work.push(prepare(reports, rules, now, outcome));
    }
    let mut locks: Vec<(&str, &str)> = work
        .iter()
        .flat_map(|(users, _)| users.keys().copied())
        .collect();
    locks.sort_unstable();
    locks.dedup();
    if locks.is_empty() && work.iter().all(|(_, results)| results.is_empty()) {
        return Ok(outcomes);
    }
    write_tx(conn, |conn| {
        lock_users(conn, &locks)?;
        for ((users, results), outcome) in work.iter().zip(outcomes.iter_mut()) {
            for ((app_id, openid), candidates) in users {
                store_user(conn, rules, now, app_id, openid, candidates, outcome)?;
            }
            count_results(conn, results, now)?;
        }
        Ok::<_, DbError>(())
    })?;
    Ok(outcomes)
}

type Users<'a> = BTreeMap<(&'a str, &'a str), Vec<Candidate<'a>>>;
type Results<'a> = BTreeMap<(&'a str, &'a str, &'a str, &'a str), i64>;

/// Validates one request's items: the valid ones grouped by user (in a fixed
/// order), the rest rejected into `outcome`; subscription results tallied.
fn prepare<'a>(
    reports: &'a [Report],
    rules: &Rules,
    now: DateTime<Utc>,
    outcome: &mut RecordOutcome,
) -> (Users<'a>, Results<'a>) {
    let mut users: Users<'a> = BTreeMap::new();
    // Every subscription result, accepted or not, counted per template.
    let mut results: Results<'a> = BTreeMap::new();
    for report in reports {
        let (app_id, openid) = (report.app_id.as_str(), report.openid.as_str());
        let candidates = users.entry((app_id, openid)).or_default();
        for item in &report.items {
            if let Item::Subscription {
                template_id,
                result,
            } = item
            {
                if is_valid_value(template_id) && is_valid_value(result) && result.len() <= 32 {
                    *results
                        .entry((app_id, openid, template_id, result))
                        .or_default() += 1;
                }
            }
            match validate(item, rules, now) {
                Ok(candidate) => candidates.push(candidate),
                Err(rejection) => outcome.rejected.push(rejection),
            }
        }
    }
    users.retain(|_, candidates| !candidates.is_empty());
    (users, results)
}

/// PostgreSQL: serialises reports of these users (sorted), so the per-user cap holds
/// under concurrency. SQLite's write transaction already serialises everything.
fn lock_users(conn: &mut DbConn, users: &[(&str, &str)]) -> DbResult<()> {
    if let DbConn::Pg(pg) = conn {
        for (app_id, openid) in users {
            diesel::sql_query(
                "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))",
            )
            .bind::<diesel::sql_types::Text, _>(app_id)
            .bind::<diesel::sql_types::Text, _>(openid)
            .execute(pg)?;
        }
    }
    Ok(())
}

fn count_results(conn: &mut DbConn, results: &Results<'_>, now: DateTime<Utc>) -> DbResult<()> {
    use crate::db::schema::subscription_results::dsl as r;
    use diesel::upsert::excluded;
    for ((app_id, openid, template_id, result), n) in results {
        dispatch!(conn, |c| diesel::insert_into(r::subscription_results)
            .values((
                r::app_id.eq(app_id),
                r::openid.eq(openid),
                r::template_id.eq(template_id),
                r::result.eq(result),
                r::count.eq(n),
                r::last_at.eq(to_db(now)),
            ))
            .on_conflict((r::app_id, r::openid, r::template_id, r::result))
            .do_update()
            .set((
                r::count.eq(r::count + excluded(r::count)),
                r::last_at.eq(excluded(r::last_at)),
            ))
            .execute(c))?;
    }
    Ok(())
}

fn validate<'a>(
    item: &'a Item,
    rules: &Rules,
    now: DateTime<Utc>,
) -> Result<Candidate<'a>, Rejection> {
    let reject = |value: &str, reason| Rejection {
        value: value.to_string(),
        reason,
    };
    match item {
        Item::Token {
            kind,
            value,
            issued_at,
        } => {
            if value == MOCK_FORM_ID {
                return Err(reject(value, RejectReason::MockFormId));
            }
            if !is_valid_value(value) {
                return Err(reject(value, RejectReason::InvalidFormat));
            }
            let issued_at = issued_at.map_or(now, |t| t.min(now));
            let expires_at = issued_at + VALIDITY - rules.expiry_margin;
            if expires_at <= now {
                return Err(reject(value, RejectReason::Expired));
            }
            let uses = match kind {
                Kind::PrepayId => rules.prepay_id_uses,
                _ => 1,
            };
            Ok(Candidate {
                kind: *kind,
                value: Some(value),
                template_id: None,
                uses: i32::try_from(uses).unwrap_or(i32::MAX),
                issued_at,
                expires_at: Some(expires_at),
            })
        }
        Item::Subscription {
            template_id,
            result,
        } => {
            if !is_valid_value(template_id) {
                return Err(reject(template_id, RejectReason::InvalidFormat));
            }
            if result != "accept" {
                return Err(reject(template_id, RejectReason::NotAccepted));
            }
            Ok(Candidate {
                kind: Kind::Subscription,
                value: None,
                template_id: Some(template_id),
                uses: 1,
                issued_at: now,
                expires_at: None,
            })
        }
    }
}

fn store_user(
    conn: &mut DbConn,
    rules: &Rules,
    now: DateTime<Utc>,
    app_id: &str,
    openid: &str,
    candidates: &[Candidate<'_>],
    outcome: &mut RecordOutcome,
) -> DbResult<()> {
    let now_db = to_db(now);
    let values: Vec<&str> = candidates.iter().filter_map(|c| c.value).collect();
    let (live, known): (i64, Vec<Option<String>>) = dispatch!(conn, |conn| {
        let live = c::credentials
            .filter(c::app_id.eq(app_id))
            .filter(c::openid.eq(openid))
            .filter(c::uses_left.gt(0))
            .filter(c::invalid.eq(false))
            .filter(c::expires_at.is_null().or(c::expires_at.gt(now_db)))
            .count()
            .get_result(conn)?;
        let known = if values.is_empty() {
            Vec::new()
        } else {
            c::credentials
                .filter(c::app_id.eq(app_id))
                .filter(c::value.eq_any(&values))
                .select(c::value)
                .load(conn)?
        };
        (live, known)
    });
    let mut seen: HashSet<&str> = known.iter().flatten().map(String::as_str).collect();
    let mut room = i64::from(rules.user_cap) - live;
    let mut rows = Vec::with_capacity(candidates.len());
    for cand in candidates {
        if let Some(value) = cand.value {
            if !seen.insert(value) {
                outcome.duplicates += 1;
                continue;
            }
        }
        if room <= 0 {
            outcome.rejected.push(Rejection {
                value: cand
                    .value
                    .or(cand.template_id)
                    .unwrap_or_default()
                    .to_string(),
                reason: RejectReason::UserCap,
            });
            continue;
        }
        room -= 1;
        rows.push(NewCredential {
            app_id,
            openid,
            kind: cand.kind.as_str(),
            value: cand.value,
            template_id: cand.template_id,
            uses_total: cand.uses,
            uses_left: cand.uses,
            issued_at: to_db(cand.issued_at),
            expires_at: cand.expires_at.map(to_db),
            created_at: now_db,
            updated_at: now_db,
        });
    }
    if rows.is_empty() {
        return Ok(());
    }
    // A value another transaction stored since we looked is a duplicate too.
    let inserted = match conn {
        DbConn::Pg(pg) => diesel::insert_into(c::credentials)
            .values(&rows)
            .on_conflict_do_nothing()
            .execute(pg)?,
        // SQLite has no multi-row INSERT … ON CONFLICT in diesel; row by row inside
        // the transaction costs no round trips in-process.
        DbConn::Sqlite(lite) => {
            let mut n = 0;
            for row in &rows {
                n += diesel::insert_into(c::credentials)
                    .values(row)
                    .on_conflict_do_nothing()
                    .execute(lite)?;
            }
            n
        }
    };
    let inserted = u32::try_from(inserted).unwrap_or(u32::MAX);
    let attempted = u32::try_from(rows.len()).unwrap_or(u32::MAX);
    outcome.accepted += inserted;
    outcome.duplicates += attempted - inserted;
    Ok(())
}
