//! The campaigns table.

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::dsl::case_when;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Nullable, Text};

use crate::db::schema::{app_pauses, campaigns};
use crate::db::{DbConn, DbError, DbResult};
use crate::dispatch;
use crate::time::to_db;

/// A campaign as stored, without its audience (which can be megabytes: read it
/// with [`audience`]).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = campaigns)]
pub struct CampaignRow {
    pub id: i64,
    pub public_id: String,
    pub app_id: String,
    pub template_id: String,
    pub channel: String,
    pub page: Option<String>,
    pub body: String,
    pub holding: bool,
    pub status: String,
    pub rate_per_s: Option<i32>,
    pub send_at: Option<NaiveDateTime>,
    pub targeted: i64,
    pub materialised: i64,
    pub holders_after: Option<String>,
    pub audience_done: bool,
    pub released: i64,
    pub pace_from: Option<NaiveDateTime>,
    pub pace_base: i64,
    pub paced_at: Option<NaiveDateTime>,
    pub runner: Option<String>,
    pub runner_until: Option<NaiveDateTime>,
    /// The counts (JSON) when it finished.
    pub final_counts: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub finished_at: Option<NaiveDateTime>,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = campaigns)]
pub struct NewCampaignRow {
    pub public_id: String,
    pub app_id: String,
    pub template_id: String,
    pub channel: &'static str,
    pub page: Option<String>,
    pub body: String,
    pub holding: bool,
    pub audience: Option<String>,
    pub status: &'static str,
    pub rate_per_s: Option<i32>,
    pub send_at: Option<NaiveDateTime>,
    pub targeted: i64,
    pub idem_scope: Option<String>,
    pub idem_key: Option<String>,
    pub request_hash: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// The result of storing a new campaign.
#[derive(Debug)]
pub enum Inserted {
    /// The new campaign, or the one an earlier request with the same key made.
    Campaign(i64),
    /// The idempotency key was used before with a different request.
    Mismatch,
}

/// Stores a campaign; with an idempotency key, at most one per (scope, key) however
/// many requests race: the unique index decides, and a loser reads the winner.
pub fn insert(conn: &mut DbConn, row: &NewCampaignRow) -> DbResult<Inserted> {
    use campaigns::dsl as k;
    let existing = |conn: &mut DbConn| -> DbResult<Option<Inserted>> {
        let (Some(scope), Some(key)) = (&row.idem_scope, &row.idem_key) else {
            return Ok(None);
        };
        let found: Option<(i64, Option<String>)> = dispatch!(conn, |c| k::campaigns
            .filter(k::idem_scope.eq(scope))
            .filter(k::idem_key.eq(key))
            .select((k::id, k::request_hash))
            .first(c)
            .optional())?;
        Ok(found.map(|(id, hash)| {
            if hash == row.request_hash {
                Inserted::Campaign(id)
            } else {
                Inserted::Mismatch
            }
        }))
    };
    if let Some(found) = existing(conn)? {
        return Ok(found);
    }
    let stored: DbResult<i64> = dispatch!(conn, |c| diesel::insert_into(k::campaigns)
        .values(row)
        .returning(k::id)
        .get_result(c))
    .map_err(DbError::from);
    match stored {
        Ok(id) => Ok(Inserted::Campaign(id)),
        Err(DbError::Query(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _,
        ))) if row.idem_key.is_some() => {
            existing(conn)?.ok_or(DbError::Query(diesel::result::Error::NotFound))
        }
        Err(e) => Err(e),
    }
}

pub fn load(conn: &mut DbConn, id: i64) -> DbResult<Option<CampaignRow>> {
    use campaigns::dsl as k;
    Ok(dispatch!(conn, |c| k::campaigns
        .filter(k::id.eq(id))
        .select(CampaignRow::as_select())
        .first(c)
        .optional())?)
}

pub fn find_public(conn: &mut DbConn, public_id: &str) -> DbResult<Option<CampaignRow>> {
    use campaigns::dsl as k;
    Ok(dispatch!(conn, |c| k::campaigns
        .filter(k::public_id.eq(public_id))
        .select(CampaignRow::as_select())
        .first(c)
        .optional())?)
}

/// The explicit audience, one openid per line (None: "holding", or every recipient
/// is made).
pub fn audience(conn: &mut DbConn, id: i64) -> DbResult<Option<String>> {
    use campaigns::dsl as k;
    Ok(dispatch!(conn, |c| k::campaigns
        .filter(k::id.eq(id))
        .select(k::audience)
        .first::<Option<String>>(c))?)
}

/// Campaigns of `apps` (None: every app), newest first, `limit` after internal id
/// `before` (exclusive), optionally of one stored status.
pub fn list(
    conn: &mut DbConn,
    apps: Option<&[String]>,
    status: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> DbResult<Vec<CampaignRow>> {
    use campaigns::dsl as k;
    Ok(dispatch!(conn, |c| {
        let mut query = k::campaigns
            .select(CampaignRow::as_select())
            .order(k::id.desc())
            .limit(limit)
            .into_boxed();
        if let Some(apps) = apps {
            query = query.filter(k::app_id.eq_any(apps));
        }
        if let Some(status) = status {
            query = query.filter(k::status.eq(status));
        }
        if let Some(before) = before {
            query = query.filter(k::id.lt(before));
        }
        query.load(c)
    })?)
}

/// Sets the status of campaign `id` to `to` if it is one of `from`, in the caller's
/// transaction (the row stays locked until it ends: see the runner). Returns the
/// row as it now stands if it changed.
pub fn change_status(
    conn: &mut DbConn,
    id: i64,
    from: &[&str],
    to: &str,
    now: DateTime<Utc>,
) -> DbResult<Option<CampaignRow>> {
    use campaigns::dsl as k;
    Ok(dispatch!(conn, |c| diesel::update(
        k::campaigns
            .filter(k::id.eq(id))
            .filter(k::status.eq_any(from))
    )
    .set((k::status.eq(to), k::updated_at.eq(to_db(now))))
    .returning(CampaignRow::as_returning())
    .get_result(c)
    .optional())?)
}

/// Ids of campaigns a runner may work on now: not finished, and started or due.
pub fn runnable(conn: &mut DbConn, owner: &str, now: DateTime<Utc>) -> DbResult<Vec<i64>> {
    use campaigns::dsl as k;
    let now_db = to_db(now);
    Ok(dispatch!(conn, |c| k::campaigns
        .filter(k::finished_at.is_null())
        .filter(
            k::status
                .ne("scheduled")
                .or(k::send_at.is_null())
                .or(k::send_at.le(now_db))
        )
        .filter(
            k::runner
                .is_null()
                .or(k::runner.eq(owner))
                .or(k::runner_until.lt(now_db))
        )
        .select(k::id)
        .order(k::id)
        .load(c))?)
}

/// Takes (or renews) the runner's lease on campaign `id`: exactly one instance runs
/// a campaign; one that died is replaced when its lease runs out.
pub fn lease(
    conn: &mut DbConn,
    id: i64,
    owner: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> DbResult<Option<CampaignRow>> {
    use campaigns::dsl as k;
    let now_db = to_db(now);
    Ok(dispatch!(conn, |c| diesel::update(
        k::campaigns.filter(k::id.eq(id)).filter(
            k::runner
                .is_null()
                .or(k::runner.eq(owner))
                .or(k::runner_until.lt(now_db))
        )
    )
    .set((k::runner.eq(owner), k::runner_until.eq(to_db(until))))
    .returning(CampaignRow::as_returning())
    .get_result(c)
    .optional())?)
}

/// Gives up this runner's leases (graceful shutdown): another instance takes over
/// at once.
pub fn release_leases(conn: &mut DbConn, owner: &str) -> DbResult<usize> {
    use campaigns::dsl as k;
    Ok(dispatch!(conn, |c| diesel::update(
        k::campaigns.filter(k::runner.eq(owner))
    )
    .set((
        k::runner.eq(None::<String>),
        k::runner_until.eq(None::<NaiveDateTime>),
    ))
    .execute(c))?)
}

/// When the app's sending is paused by WeChat's daily limit (45009), if it is now.
pub fn app_paused_until(
    conn: &mut DbConn,
    app_id: &str,
    now: DateTime<Utc>,
) -> DbResult<Option<DateTime<Utc>>> {
    use app_pauses::dsl as p;
    let until: Option<NaiveDateTime> = dispatch!(conn, |c| p::app_pauses
        .filter(p::app_id.eq(app_id))
        .filter(p::until.gt(to_db(now)))
        .select(p::until)
        .first(c)
        .optional())?;
    Ok(until.map(|t| t.and_utc()))
}

/// Nothing (more) to make into recipients.
pub fn audience_complete(conn: &mut DbConn, id: i64) -> DbResult<()> {
    use campaigns::dsl as k;
    dispatch!(conn, |c| diesel::update(k::campaigns.filter(k::id.eq(id)))
        .set(k::audience_done.eq(true))
        .execute(c))?;
    Ok(())
}

/// A scheduled campaign whose time has come starts: `running`, paced from now.
pub fn start(conn: &mut DbConn, id: i64, now: DateTime<Utc>) -> DbResult<bool> {
    use campaigns::dsl as k;
    let now_db = to_db(now);
    let changed = dispatch!(conn, |c| diesel::update(
        k::campaigns
            .filter(k::id.eq(id))
            .filter(k::status.eq("scheduled"))
    )
    .set((
        k::status.eq("running"),
        k::started_at.eq(now_db),
        k::pace_from.eq(now_db),
        k::pace_base.eq(k::released),
        k::paced_at.eq(now_db),
        k::updated_at.eq(now_db),
    ))
    .execute(c))?;
    Ok(changed == 1)
}

/// The pace starts anew from now: the allowance so far is what was released.
pub fn repace(conn: &mut DbConn, id: i64, now: DateTime<Utc>) -> DbResult<()> {
    use campaigns::dsl as k;
    let now_db = to_db(now);
    dispatch!(conn, |c| diesel::update(k::campaigns.filter(k::id.eq(id)))
        .set((
            k::pace_from.eq(now_db),
            k::pace_base.eq(k::released),
            k::paced_at.eq(now_db),
        ))
        .execute(c))?;
    Ok(())
}

/// `released` moves by `n` (negative: recipients held again by a pause).
pub fn add_released(conn: &mut DbConn, id: i64, n: i64) -> DbResult<()> {
    use campaigns::dsl as k;
    dispatch!(conn, |c| diesel::update(k::campaigns.filter(k::id.eq(id)))
        .set(k::released.eq(k::released + n))
        .execute(c))?;
    Ok(())
}

/// A running campaign's pacer tick: takes the row (locked until the transaction
/// ends, so a pause or cancel waits for the release or comes before it) and
/// returns it as it was before this tick's `paced_at`. None: not running.
pub fn tick(conn: &mut DbConn, id: i64, now: DateTime<Utc>) -> DbResult<Option<CampaignRow>> {
    use campaigns::dsl as k;
    let before = dispatch!(conn, |c| diesel::update(
        k::campaigns
            .filter(k::id.eq(id))
            .filter(k::status.eq("running"))
    )
    .set(k::updated_at.eq(k::updated_at))
    .returning(CampaignRow::as_returning())
    .get_result::<CampaignRow>(c)
    .optional())?;
    if before.is_some() {
        dispatch!(conn, |c| diesel::update(k::campaigns.filter(k::id.eq(id)))
            .set(k::paced_at.eq(to_db(now)))
            .execute(c))?;
    }
    Ok(before)
}

/// One batch of recipients made.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Recipients in the batch.
    pub made: i64,
    /// "holding": the last openid taken.
    pub holders_after: Option<String>,
    /// "holding": recipients found (added to `targeted`).
    pub found: i64,
    /// Nothing is left to make.
    pub complete: bool,
}

/// Records a batch if the campaign's progress is still `materialised` (else another
/// runner made it: None). Returns the campaign's status, read under the row's lock.
pub fn advance(
    conn: &mut DbConn,
    id: i64,
    materialised: i64,
    p: &Progress,
) -> DbResult<Option<String>> {
    use campaigns::dsl as k;
    Ok(dispatch!(conn, |c| diesel::update(
        k::campaigns
            .filter(k::id.eq(id))
            .filter(k::materialised.eq(materialised))
    )
    .set((
        k::materialised.eq(k::materialised + p.made),
        k::targeted.eq(k::targeted + p.found),
        k::holders_after.eq(&p.holders_after),
        k::audience_done.eq(p.complete),
        // Every recipient made: the (possibly megabytes of) audience is not needed.
        k::audience.eq(case_when(
            p.complete.into_sql::<Bool>(),
            None::<String>.into_sql::<Nullable<Text>>(),
        )
        .otherwise(k::audience)),
    ))
    .returning(k::status)
    .get_result(c)
    .optional())?)
}

/// Ends a campaign whose recipients are all final, keeping `counts` (JSON): `done`,
/// or a cancelled one gets its `finished_at`. A paused one stays paused. Returns
/// whether it ended.
pub fn finish(conn: &mut DbConn, id: i64, counts: &str, now: DateTime<Utc>) -> DbResult<bool> {
    use campaigns::dsl as k;
    let now_db = to_db(now);
    let ended = dispatch!(conn, |c| diesel::update(
        k::campaigns
            .filter(k::id.eq(id))
            .filter(k::status.eq_any(["running", "cancelled"]))
            .filter(k::finished_at.is_null())
    )
    .set((
        k::status
            .eq(case_when(k::status.eq("running"), "done".into_sql::<Text>()).otherwise(k::status)),
        k::final_counts.eq(counts),
        k::finished_at.eq(now_db),
        k::updated_at.eq(now_db),
    ))
    .execute(c))?;
    Ok(ended > 0)
}
