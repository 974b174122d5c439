//! Housekeeping: purge what is past its retention, in one instance at a time and
//! in bounded batches.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::jobs::dsl as j;
use crate::db::{purge_keyed, purge_where, single_write, Db, DbConn, DbResult};
use crate::dispatch;
use crate::ledger;
use crate::settings::Retention;
use crate::time::to_db;

/// Rows per DELETE: small enough that no statement holds a lock for long.
pub const BATCH: u32 = 1000;
const JOB: &str = "purge";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Purged {
    pub credentials: u64,
    pub subscription_results: u64,
    pub messages: u64,
    pub idempotency_keys: u64,
    pub app_pauses: u64,
    /// Webhook deliveries delivered or failed, after the message retention.
    pub webhook_deliveries: u64,
    /// Applied pushes remembered against WeChat's retries (seconds apart), and
    /// sent events that matched no message, kept as long as idempotency keys.
    pub push_receipts: u64,
}

fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now - TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// Purges (or with `dry_run` counts) everything past its retention.
pub fn purge(
    conn: &mut DbConn,
    retention: &Retention,
    now: DateTime<Utc>,
    dry_run: bool,
) -> DbResult<Purged> {
    Ok(Purged {
        credentials: ledger::purge(conn, before(now, retention.credentials), BATCH, dry_run)?,
        // Results not reported again within the credential retention: see
        // `ledger::purge_results`.
        subscription_results: ledger::purge_results(
            conn,
            before(now, retention.credentials),
            BATCH,
            dry_run,
        )?,
        messages: purge_where(
            conn,
            "messages",
            "status IN ('sent', 'no_quota', 'failed') AND created_at < $1",
            before(now, retention.messages),
            BATCH,
            dry_run,
        )?,
        idempotency_keys: purge_where(
            conn,
            "idempotency_keys",
            "created_at < $1",
            before(now, retention.idempotency_keys),
            BATCH,
            dry_run,
        )?,
        app_pauses: ended_pauses(conn, now, dry_run)?,
        webhook_deliveries: purge_where(
            conn,
            "webhook_deliveries",
            "status IN ('delivered', 'failed') AND created_at < $1",
            before(now, retention.messages),
            BATCH,
            dry_run,
        )?,
        push_receipts: purge_keyed(
            conn,
            "push_receipts",
            "app_id, identity",
            "received_at < $1",
            before(now, retention.idempotency_keys),
            BATCH,
            dry_run,
        )? + purge_keyed(
            conn,
            "unmatched_sent_events",
            "app_id, msgid",
            "received_at < $1",
            before(now, retention.idempotency_keys),
            BATCH,
            dry_run,
        )?,
    })
}

/// App pauses (45009) whose day is over; a handful of rows at most.
fn ended_pauses(conn: &mut DbConn, now: DateTime<Utc>, dry_run: bool) -> DbResult<u64> {
    use crate::db::schema::app_pauses::dsl as p;
    let ended = p::app_pauses.filter(p::until.lt(to_db(now)));
    let n: usize = dispatch!(conn, |c| if dry_run {
        ended.count().get_result::<i64>(c).map(|n| n as usize)
    } else {
        diesel::delete(ended).execute(c)
    })?;
    Ok(n as u64)
}

/// Takes the job's lease if it is free and the job is due; true if this instance
/// should run it now.
fn take_turn(
    conn: &mut DbConn,
    owner: &str,
    now: DateTime<Utc>,
    every: Duration,
) -> DbResult<bool> {
    let now_db = to_db(now);
    let due = to_db(before(now, every));
    let lease = to_db(now + TimeDelta::minutes(10));
    let changed = single_write(conn, |conn| {
        dispatch!(conn, |c| {
            diesel::insert_into(j::jobs)
                .values(j::name.eq(JOB))
                .on_conflict_do_nothing()
                .execute(c)?;
            diesel::update(
                j::jobs
                    .filter(j::name.eq(JOB))
                    .filter(j::lease_until.is_null().or(j::lease_until.lt(now_db)))
                    .filter(j::last_run_at.is_null().or(j::last_run_at.le(due))),
            )
            .set((j::lease_owner.eq(owner), j::lease_until.eq(lease)))
            .execute(c)
        })
    })?;
    Ok(changed == 1)
}

fn done(conn: &mut DbConn, owner: &str, now: DateTime<Utc>) -> DbResult<()> {
    dispatch!(conn, |c| diesel::update(
        j::jobs
            .filter(j::name.eq(JOB))
            .filter(j::lease_owner.eq(owner))
    )
    .set((
        j::lease_owner.eq(None::<String>),
        j::lease_until.eq(None::<chrono::NaiveDateTime>),
        j::last_run_at.eq(to_db(now)),
    ))
    .execute(c))?;
    Ok(())
}

/// Every `every`, in whichever instance gets the turn, purges what is past its
/// retention. Runs until `stop` flips to true.
pub fn spawn(
    db: Db,
    retention: Retention,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let owner = format!("housekeeper-{:016x}", rand::random::<u64>());
    tokio::spawn(async move {
        while !*stop.borrow() {
            let (o, r) = (owner.clone(), retention.clone());
            let run = db
                .run(move |c| {
                    let now = crate::time::now();
                    if !take_turn(c, &o, now, every)? {
                        return Ok(None);
                    }
                    let purged = purge(c, &r, now, false);
                    done(c, &o, crate::time::now())?;
                    purged.map(Some)
                })
                .await;
            match run {
                Ok(Some(p)) => log::info!(
                    "housekeeping: purged {} credentials, {} subscription results, {} messages, {} idempotency keys, {} push receipts",
                    p.credentials,
                    p.subscription_results,
                    p.messages,
                    p.idempotency_keys,
                    p.push_receipts
                ),
                Ok(None) => {}
                Err(e) => log::warn!("housekeeping: {e}"),
            }
            // Look again well within the interval; only the due instance runs.
            let nap = (every / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = stop.changed() => {}
            }
        }
    });
}
