//! The sender's group commits on PostgreSQL, set-based: the claims of a group, or
//! its plain settlements, in a handful of statements over arrays, whatever the
//! group's size, instead of a few statements (and a savepoint) per message. What
//! these do not take — a claim that found nothing free, a settlement with more to
//! it than a status — the caller writes message by message, as on SQLite, in the
//! same transaction.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Int4, Nullable, Text, Timestamp};

use super::settle::CredentialFate;
use super::store::{finished_event, ClaimJob, MessageRow, SettleJob};
use crate::db::{DbConn, DbError, DbResult};
use crate::ledger::{self, Kind};
use crate::time::to_db;
use crate::webhooks::{self, EventType};

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Claims for the jobs (all of one lease owner) whose messages are still leased
/// to it and whose user had a free use: the message as it now stands, holding the
/// use, at the job's position. In the caller's transaction; PostgreSQL only (on
/// SQLite every position stays None).
pub fn claim(
    conn: &mut DbConn,
    jobs: &[ClaimJob],
    now: DateTime<Utc>,
) -> DbResult<Vec<Option<MessageRow>>> {
    let mut claimed: Vec<Option<MessageRow>> = jobs.iter().map(|_| None).collect();
    let (DbConn::Pg(_), Some(first)) = (&*conn, jobs.first()) else {
        return Ok(claimed);
    };
    let owner = first.owner.clone();
    let ids: Vec<i64> = jobs
        .iter()
        .filter(|j| j.owner == owner)
        .map(|j| j.msg.id)
        .collect();
    // Still ours, and kept so until the commit: a use is never spent for a message
    // whose lease another worker took over.
    let ours: HashSet<i64> = diesel::sql_query(
        "SELECT id FROM messages WHERE id = ANY($1) AND lease_owner = $2 ORDER BY id FOR UPDATE",
    )
    .bind::<Array<BigInt>, _>(&ids)
    .bind::<Text, _>(&owner)
    .load::<Id>(pg(conn)?)?
    .into_iter()
    .map(|r| r.id)
    .collect();
    let mut wanting = Vec::new();
    let mut wants = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let Ok(pick) = job.msg.pick() else { continue };
        if job.owner == owner && ours.contains(&job.msg.id) {
            wanting.push(i);
            wants.push(ledger::Want {
                app_id: &job.msg.app_id,
                openid: &job.msg.openid,
                pick,
            });
        }
    }
    let taken = ledger::claim_each(conn, &wants, now)?;
    let mut held = Vec::new();
    for (i, used) in wanting.into_iter().zip(taken) {
        if let Some(used) = used {
            held.push((jobs[i].msg.id, used.credential));
        }
    }
    if held.is_empty() {
        return Ok(claimed);
    }
    let col = |f: &dyn Fn(&ledger::Credential) -> NaiveDateTime| -> Vec<NaiveDateTime> {
        held.iter().map(|(_, c)| f(c)).collect()
    };
    let rows: Vec<MessageRow> = diesel::sql_query(
        "UPDATE messages m SET status = 'sending', credential_id = t.cred, \
                   credential_kind = t.kind, credential_value = t.value, \
                   credential_uses_total = t.uses, credential_created_at = t.created, \
                   credential_issued_at = t.issued, credentials_tried = m.credentials_tried + 1, \
                   retries = 0, ambiguous = false, in_flight = true, updated_at = $8 \
                 FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::int4[], \
                             $6::timestamp[], $7::timestamp[]) \
                   AS t(id, cred, kind, value, uses, created, issued) \
                 WHERE m.id = t.id RETURNING m.*",
    )
    .bind::<Array<BigInt>, _>(held.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(held.iter().map(|(_, c)| c.id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(
        held.iter()
            .map(|(_, c)| c.kind.as_str())
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Nullable<Text>>, _>(
        held.iter()
            .map(|(_, c)| c.value.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Int4>, _>(held.iter().map(|(_, c)| c.uses_total).collect::<Vec<_>>())
    .bind::<Array<Timestamp>, _>(col(&|c| to_db(c.created_at)))
    .bind::<Array<Timestamp>, _>(col(&|c| to_db(c.issued_at)))
    .bind::<Timestamp, _>(to_db(now))
    .load(pg(conn)?)?;
    let mut by_id: HashMap<i64, MessageRow> = rows.into_iter().map(|r| (r.id, r)).collect();
    for (job, slot) in jobs.iter().zip(claimed.iter_mut()) {
        *slot = by_id.remove(&job.msg.id);
    }
    Ok(claimed)
}

/// A settlement that is only a status: no user lock, no msgid, no report to look
/// for, no credential to give back, mark or forget, no grant gone, no pause. The
/// common end of a step: sent, or a retry later with the use kept.
pub fn plain(job: &SettleJob) -> bool {
    let s = &job.settlement;
    let subscription = job.msg.credential_kind.as_deref() == Some(Kind::Subscription.as_str());
    // A msgid makes a settlement settle alone (it takes the user's lock).
    !super::store::settles_alone(&job.msg, s)
        && !s.awaits_report
        && s.pause_until.is_none()
        && match s.credential {
            CredentialFate::Keep => true,
            CredentialFate::Spent => s.status.is_final() && !subscription,
            CredentialFate::Release | CredentialFate::Invalidate(_) => false,
        }
}

/// Writes the [`plain`] settlements of `jobs` (those at `positions`): one update of
/// the messages still leased to the job's owner, one insert of their attempts, and
/// the `message.finished` events a webhook wants. Whether each was applied (false:
/// the lease was lost), at its position. In the caller's transaction; PostgreSQL.
pub fn settle(
    conn: &mut DbConn,
    jobs: &[SettleJob],
    positions: &[usize],
    now: DateTime<Utc>,
) -> DbResult<Vec<(usize, bool)>> {
    let mut mine: Vec<usize> = positions.to_vec();
    mine.sort_by_key(|&i| jobs[i].msg.id);
    let Some(&first) = mine.first() else {
        return Ok(Vec::new());
    };
    let owner = jobs[first].owner.clone();
    // Another owner's (never, from one sender): each alone by the caller.
    mine.retain(|&i| jobs[i].owner == owner);
    let s = |i: usize| &jobs[i].settlement;
    let now_db = to_db(now);
    let ids: Vec<i64> = mine.iter().map(|&i| jobs[i].msg.id).collect();
    let statuses: Vec<&str> = mine.iter().map(|&i| s(i).status.as_str()).collect();
    let ambiguous: Vec<bool> = mine
        .iter()
        .map(|&i| s(i).credential == CredentialFate::Keep && s(i).ambiguous)
        .collect();
    let retries: Vec<i32> = mine.iter().map(|&i| s(i).retries).collect();
    let young: Vec<i32> = mine
        .iter()
        .map(|&i| i32::from(s(i).is_young_retry()))
        .collect();
    let codes: Vec<Option<&str>> = mine
        .iter()
        .map(|&i| s(i).error.as_ref().map(|e| e.code.as_str()))
        .collect();
    let errcodes: Vec<Option<i32>> = mine
        .iter()
        .map(|&i| s(i).error.as_ref().and_then(|e| e.wechat_errcode))
        .collect();
    let texts: Vec<Option<&str>> = mine
        .iter()
        .map(|&i| s(i).error.as_ref().map(|e| e.message.as_str()))
        .collect();
    let next: Vec<NaiveDateTime> = mine.iter().map(|&i| to_db(s(i).next_attempt_at)).collect();
    let finals: Vec<bool> = mine.iter().map(|&i| s(i).status.is_final()).collect();
    let applied: HashSet<i64> = diesel::sql_query(
        "UPDATE messages m SET status = t.status, in_flight = false, \
                   ambiguous = t.ambiguous, retries = t.retries, \
                   young_retries = m.young_retries + t.young, error_code = t.code, \
                   wechat_errcode = t.errcode, error_message = t.text, \
                   next_attempt_at = t.next, lease_owner = NULL, lease_until = NULL, \
                   updated_at = $11, finished_at = CASE WHEN t.final THEN $11 END \
                 FROM unnest($1::int8[], $2::text[], $3::bool[], $4::int4[], $5::int4[], \
                             $6::text[], $7::int4[], $8::text[], $9::timestamp[], $10::bool[]) \
                   AS t(id, status, ambiguous, retries, young, code, errcode, text, next, final) \
                 WHERE m.id = t.id AND m.lease_owner = $12 RETURNING m.id",
    )
    .bind::<Array<BigInt>, _>(&ids)
    .bind::<Array<Text>, _>(&statuses)
    .bind::<Array<Bool>, _>(&ambiguous)
    .bind::<Array<Int4>, _>(&retries)
    .bind::<Array<Int4>, _>(&young)
    .bind::<Array<Nullable<Text>>, _>(&codes)
    .bind::<Array<Nullable<Int4>>, _>(&errcodes)
    .bind::<Array<Nullable<Text>>, _>(&texts)
    .bind::<Array<Timestamp>, _>(&next)
    .bind::<Array<Bool>, _>(&finals)
    .bind::<Timestamp, _>(now_db)
    .bind::<Text, _>(&owner)
    .load::<Id>(pg(conn)?)?
    .into_iter()
    .map(|r| r.id)
    .collect();
    let tried: Vec<usize> = mine
        .iter()
        .copied()
        .filter(|&i| applied.contains(&jobs[i].msg.id) && s(i).attempt.is_some())
        .collect();
    if !tried.is_empty() {
        let attempt = |i: usize| s(i).attempt.expect("filtered on attempts");
        diesel::sql_query(
                    "INSERT INTO message_attempts (message_id, at, credential_id, wechat_errcode, outcome) \
                     SELECT id, $5, cred, errcode, outcome \
                     FROM unnest($1::int8[], $2::int8[], $3::int4[], $4::text[]) \
                       AS t(id, cred, errcode, outcome)",
                )
                .bind::<Array<BigInt>, _>(tried.iter().map(|&i| jobs[i].msg.id).collect::<Vec<_>>())
                .bind::<Array<Nullable<BigInt>>, _>(
                    tried.iter().map(|&i| jobs[i].msg.credential_id).collect::<Vec<_>>(),
                )
                .bind::<Array<Nullable<Int4>>, _>(
                    tried.iter().map(|&i| attempt(i).wechat_errcode).collect::<Vec<_>>(),
                )
                .bind::<Array<Text>, _>(
                    tried.iter().map(|&i| attempt(i).outcome.as_str()).collect::<Vec<_>>(),
                )
                .bind::<Timestamp, _>(now_db)
                .execute(pg(conn)?)?;
    }
    // `message.finished`, as a settlement alone writes it; apps no webhook listens
    // to are asked once per group, not once per message.
    let mut wanted: HashMap<&str, bool> = HashMap::new();
    for &i in &mine {
        let (msg, status) = (&jobs[i].msg, s(i).status);
        if !status.is_final() || !applied.contains(&msg.id) {
            continue;
        }
        let app = msg.app_id.as_str();
        let wants = match wanted.get(app) {
            Some(&w) => w,
            None => {
                let w = webhooks::wanted(conn, app, EventType::MessageFinished)?;
                wanted.insert(app, w);
                w
            }
        };
        if wants {
            finished_event(conn, msg, status)?;
        }
    }
    Ok(mine
        .into_iter()
        .map(|i| (i, applied.contains(&jobs[i].msg.id)))
        .collect())
}

/// The PostgreSQL connection (the callers only come here on PostgreSQL).
fn pg(conn: &mut DbConn) -> DbResult<&mut diesel::PgConnection> {
    match conn {
        DbConn::Pg(pg) => Ok(pg),
        DbConn::Sqlite(_) => Err(DbError::Unavailable(
            "set-based group writes are for PostgreSQL".into(),
        )),
    }
}
