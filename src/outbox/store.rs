//! The outbox tables: messages, their attempts, paused apps.

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamp};

use super::settle::{CredentialFate, Settlement};
use super::{Channel, Content, Status};
use crate::db::schema::{app_pauses, idempotency_keys, message_attempts, messages};
use crate::db::{
    cached, json_text, native_sql, single_write, skip_locked, write_tx, DbConn, DbError, DbResult,
};
use crate::dispatch;
use crate::ledger::{self, Kind};
use crate::time::to_db;
use crate::webhooks::{self, EventType};

#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = messages)]
pub struct MessageRow {
    pub id: i64,
    pub app_id: String,
    pub openid: String,
    pub template_id: String,
    pub channel: String,
    pub page: Option<String>,
    pub body: String,
    pub status: String,
    pub credential_id: Option<i64>,
    pub credential_kind: Option<String>,
    pub credential_value: Option<String>,
    pub credential_uses_total: Option<i32>,
    pub credential_created_at: Option<NaiveDateTime>,
    pub credentials_tried: i32,
    pub retries: i32,
    pub in_flight: bool,
    pub ambiguous: bool,
    pub error_code: Option<String>,
    pub wechat_errcode: Option<i32>,
    pub error_message: Option<String>,
    pub await_until: Option<NaiveDateTime>,
    pub next_attempt_at: NaiveDateTime,
    pub lease_owner: Option<String>,
    pub lease_until: Option<NaiveDateTime>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub finished_at: Option<NaiveDateTime>,
    /// The held credential's `issued_at` (None if claimed before the column existed).
    pub credential_issued_at: Option<NaiveDateTime>,
    /// Young-credential (41028) retries of this message, whatever credential.
    pub young_retries: i32,
    /// Credential reports for the user since the message was created; see
    /// [`wake_waiting_many`].
    pub wakes: i32,
    /// The message's id in the API (random; see the migration).
    pub public_id: String,
    /// The msgid subscribe/send returned.
    pub wechat_msgid: Option<String>,
    /// WeChat's sent event, as the JSON of a [`DeliveryView`](super::DeliveryView).
    pub delivery: Option<String>,
    /// Not sent before then (`send_at` of the request).
    pub send_at: Option<NaiveDateTime>,
    /// The campaign it is a recipient of.
    pub campaign_id: Option<i64>,
}

impl MessageRow {
    /// The kind of the credential it holds; an unknown one is logged with the
    /// message id and is an error.
    pub fn credential_kind(&self) -> DbResult<Option<Kind>> {
        self.credential_kind
            .as_deref()
            .map(Kind::from_db)
            .transpose()
            .map_err(|e| self.corrupt(e))
    }

    /// The stored status; an unknown one is logged with the message id and is an error.
    pub fn status(&self) -> DbResult<Status> {
        Status::try_from(self.status.as_str()).map_err(|e| self.corrupt(e))
    }

    /// The stored channel; an unknown one is logged with the message id and is an error.
    pub fn channel(&self) -> DbResult<Channel> {
        Channel::try_from(self.channel.as_str()).map_err(|e| self.corrupt(e))
    }

    /// The stored content. `submit` wrote it from this very type: an error means the
    /// row was damaged or written by something else, and the message must not be
    /// sent with a guess at its data.
    pub fn content(&self) -> Result<Content, serde_json::Error> {
        serde_json::from_str(&self.body)
    }

    fn corrupt(&self, e: DbError) -> DbError {
        log::error!("message {}: {e}", self.id);
        e
    }

    /// The credentials this message may use: its channel decides.
    pub fn pick(&self) -> DbResult<ledger::Pick<'_>> {
        Ok(self.channel()?.pick(&self.template_id))
    }
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = message_attempts)]
pub struct AttemptRow {
    pub at: NaiveDateTime,
    pub credential_id: Option<i64>,
    pub wechat_errcode: Option<i32>,
    pub outcome: String,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = messages)]
pub struct NewMessageRow {
    pub public_id: String,
    pub app_id: String,
    pub openid: String,
    pub template_id: String,
    pub channel: &'static str,
    pub page: Option<String>,
    pub body: String,
    pub status: &'static str,
    pub await_until: Option<NaiveDateTime>,
    pub next_attempt_at: NaiveDateTime,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub send_at: Option<NaiveDateTime>,
    pub campaign_id: Option<i64>,
    /// Set for a row stored final (a cancelled campaign's recipient).
    pub finished_at: Option<NaiveDateTime>,
}

/// An `Idempotency-Key` and the hash of the request it came with.
#[derive(Debug, Clone)]
pub struct IdempotencyRecord {
    pub scope: String,
    pub key: String,
    pub request_hash: String,
}

/// The result of storing a new message.
#[derive(Debug)]
pub enum Inserted {
    New(i64),
    /// The idempotency key was used before with the same request.
    Existing(i64),
    /// The idempotency key was used before with a different request.
    Mismatch,
}

/// Stores a message; with an idempotency key, at most one message per (scope, key)
/// however many requests race: the key's primary key decides, and a loser's message
/// is rolled back with its transaction.
pub fn insert(
    conn: &mut DbConn,
    row: &NewMessageRow,
    idempotency: Option<&IdempotencyRecord>,
) -> DbResult<Inserted> {
    use idempotency_keys::dsl as k;
    use messages::dsl as m;
    let existing = |conn: &mut DbConn, idem: &IdempotencyRecord| -> DbResult<Option<Inserted>> {
        let found: Option<(i64, String)> = dispatch!(conn, |c| k::idempotency_keys
            .filter(k::scope.eq(&idem.scope))
            .filter(k::key.eq(&idem.key))
            .select((k::message_id, k::request_hash))
            .first(c)
            .optional())?;
        Ok(found.map(|(id, hash)| {
            if hash == idem.request_hash {
                Inserted::Existing(id)
            } else {
                Inserted::Mismatch
            }
        }))
    };
    let attempt = write_tx(conn, |conn| {
        if let Some(idem) = idempotency {
            if let Some(found) = existing(conn, idem)? {
                return Ok(found);
            }
        }
        let id: i64 = dispatch!(conn, |c| diesel::insert_into(m::messages)
            .values(row)
            .returning(m::id)
            .get_result(c))?;
        if let Some(idem) = idempotency {
            let stored = dispatch!(conn, |c| diesel::insert_into(k::idempotency_keys)
                .values((
                    k::scope.eq(&idem.scope),
                    k::key.eq(&idem.key),
                    k::request_hash.eq(&idem.request_hash),
                    k::message_id.eq(id),
                    k::created_at.eq(row.created_at),
                ))
                .on_conflict_do_nothing()
                .execute(c))?;
            if stored == 0 {
                // A concurrent request with this key won: undo our message.
                return Err(DbError::Query(diesel::result::Error::RollbackTransaction));
            }
        }
        Ok(Inserted::New(id))
    });
    match (attempt, idempotency) {
        (Err(DbError::Query(diesel::result::Error::RollbackTransaction)), Some(idem)) => {
            existing(conn, idem)?.ok_or(DbError::Query(diesel::result::Error::NotFound))
        }
        (result, _) => result,
    }
}

pub fn load(conn: &mut DbConn, id: i64) -> DbResult<Option<(MessageRow, Vec<AttemptRow>)>> {
    use message_attempts::dsl as a;
    use messages::dsl as m;
    dispatch!(conn, |c| {
        let Some(row) = m::messages
            .filter(m::id.eq(id))
            .select(MessageRow::as_select())
            .first(c)
            .optional()?
        else {
            return Ok(None);
        };
        let attempts = a::message_attempts
            .filter(a::message_id.eq(id))
            .order(a::id)
            .select(AttemptRow::as_select())
            .load(c)?;
        Ok(Some((row, attempts)))
    })
}

/// The user's latest sent message of the app (when it finished) and how many were
/// sent since `day_start`, for the send policy.
pub fn user_sends(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    day_start: DateTime<Utc>,
) -> DbResult<(Option<DateTime<Utc>>, i64)> {
    use diesel::dsl::max;
    use messages::dsl as m;
    let sent = m::messages
        .filter(m::app_id.eq(app_id))
        .filter(m::openid.eq(openid))
        .filter(m::status.eq(Status::Sent.as_str()));
    let last: Option<NaiveDateTime> =
        dispatch!(conn, |c| sent.select(max(m::finished_at)).first(c))?;
    let today: i64 = dispatch!(conn, |c| sent
        .filter(m::finished_at.ge(to_db(day_start)))
        .count()
        .get_result(c))?;
    Ok((last.map(|t| t.and_utc()), today))
}

/// The internal id and app of the message with API id `public_id`.
pub fn find_public(conn: &mut DbConn, public_id: &str) -> DbResult<Option<(i64, String)>> {
    use messages::dsl as m;
    Ok(dispatch!(conn, |c| m::messages
        .filter(m::public_id.eq(public_id))
        .select((m::id, m::app_id))
        .first(c)
        .optional())?)
}

/// A user's most recent messages, newest first (with their attempts).
pub fn recent_for_user(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    limit: i64,
) -> DbResult<Vec<(MessageRow, Vec<AttemptRow>)>> {
    use messages::dsl as m;
    let ids: Vec<i64> = dispatch!(conn, |c| m::messages
        .filter(m::app_id.eq(app_id))
        .filter(m::openid.eq(openid))
        .order((m::created_at.desc(), m::id.desc()))
        .limit(limit)
        .select(m::id)
        .load(c))?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(found) = load(conn, id)? {
            out.push(found);
        }
    }
    Ok(out)
}

/// Leases the message that is due first; see [`lease_due`].
pub fn lease_next(
    conn: &mut DbConn,
    owner: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> DbResult<Option<MessageRow>> {
    Ok(lease_due(conn, owner, now, until, 1)?.into_iter().next())
}

/// Leases up to `limit` messages that are due first and not leased (or whose lease
/// ran out: its worker died), in one statement, at most one per user, and only of
/// users who have no other message leased: one send at a time per (app, openid), on
/// every instance (the partial unique index `messages_one_leased_per_user` settles a
/// race between two instances; the loser looks again). PostgreSQL: SKIP LOCKED, so
/// instances take different messages.
pub fn lease_due(
    conn: &mut DbConn,
    owner: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: usize,
) -> DbResult<Vec<MessageRow>> {
    let lock = skip_locked(conn);
    // The candidates are locked (PostgreSQL) in the CTE; of two candidates of one
    // user only the one due first is leased (the unique index would refuse both).
    let sql = native_sql(
        conn,
        &format!(
            "WITH cand AS (SELECT id, app_id, openid, next_attempt_at FROM messages m \
               WHERE status IN ('queued', 'sending') AND next_attempt_at <= $3 \
                 AND (lease_until IS NULL OR lease_until < $3) \
                 AND app_id NOT IN (SELECT app_id FROM app_pauses WHERE until > $3) \
                 AND NOT EXISTS (SELECT 1 FROM messages o \
                   WHERE o.app_id = m.app_id AND o.openid = m.openid \
                     AND o.lease_owner IS NOT NULL AND o.id <> m.id) \
               ORDER BY next_attempt_at LIMIT $4{lock}), \
             firsts AS (SELECT id FROM (SELECT id, row_number() OVER \
               (PARTITION BY app_id, openid ORDER BY next_attempt_at, id) AS n FROM cand) f \
               WHERE n = 1) \
             UPDATE messages SET lease_owner = $1, lease_until = $2 \
             WHERE id IN (SELECT id FROM firsts) \
             RETURNING *"
        ),
    );
    // A race lost to another instance (the unique index) rolls the whole statement
    // back: look again, the last times for one message only.
    let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
    for limit in [limit, limit, 1, 1, 1] {
        let leased: DbResult<Vec<MessageRow>> = single_write(conn, |conn| {
            Ok(dispatch!(conn, |c| diesel::sql_query(&sql)
                .bind::<Text, _>(owner)
                .bind::<Timestamp, _>(to_db(until))
                .bind::<Timestamp, _>(to_db(now))
                .bind::<BigInt, _>(limit)
                .load::<MessageRow>(c))?)
        });
        match leased {
            Err(DbError::Query(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            ))) => continue,
            other => return other,
        }
    }
    Ok(Vec::new())
}

/// When the next message not due yet becomes due (a retry, a `send_at`), if any:
/// how long an idle sender may sleep when another instance would wake it.
pub fn next_due(conn: &mut DbConn, now: DateTime<Utc>) -> DbResult<Option<DateTime<Utc>>> {
    use diesel::dsl::min;
    use messages::dsl as m;
    let at: Option<NaiveDateTime> = dispatch!(conn, |c| m::messages
        .filter(m::status.eq_any([Status::Queued.as_str(), Status::Sending.as_str()]))
        .filter(m::next_attempt_at.gt(to_db(now)))
        .select(min(m::next_attempt_at))
        .first(c))?;
    Ok(at.map(|t| t.and_utc()))
}

/// The PostgreSQL channel on which instances tell each other that a message is due.
pub const DUE_CHANNEL: &str = "ledger_outbox_due";

/// Tells the other instances (LISTEN [`DUE_CHANNEL`]) that a message is due now;
/// `payload` names the sender, which ignores its own. A hint, not a record: the
/// commit does not wait for the WAL flush. Nothing on SQLite.
pub fn notify_due(conn: &mut DbConn, payload: &str) -> DbResult<()> {
    if let DbConn::Pg(c) = conn {
        c.transaction(|c| {
            diesel::sql_query("SET LOCAL synchronous_commit = off").execute(c)?;
            diesel::sql_query("SELECT pg_notify($1, $2)")
                .bind::<Text, _>(DUE_CHANNEL)
                .bind::<Text, _>(payload)
                .execute(c)
        })?;
    }
    Ok(())
}

/// Starts listening on [`DUE_CHANNEL`] on this (PostgreSQL) connection; false on
/// SQLite, which has no notifications.
pub fn listen_due(conn: &mut DbConn) -> DbResult<bool> {
    match conn {
        DbConn::Pg(c) => {
            diesel::sql_query(format!("LISTEN {DUE_CHANNEL}")).execute(c)?;
            Ok(true)
        }
        DbConn::Sqlite(_) => Ok(false),
    }
}

/// Stops listening on this connection (before it goes back to the pool).
pub fn unlisten_due(conn: &mut DbConn) -> DbResult<()> {
    if let DbConn::Pg(c) = conn {
        diesel::sql_query("UNLISTEN *").execute(c)?;
    }
    Ok(())
}

/// The payloads of the notifications received on a listening connection since the
/// last look, without waiting (diesel's `notifications_iter`: libpq's
/// `PQconsumeInput` and `PQnotifies`).
pub fn received_due(conn: &mut DbConn) -> DbResult<Vec<String>> {
    match conn {
        DbConn::Pg(c) => Ok(c
            .notifications_iter()
            .map(|n| n.map(|n| n.payload))
            .collect::<Result<_, _>>()?),
        DbConn::Sqlite(_) => Ok(Vec::new()),
    }
}

/// A claim of [`claim_many`]: the message and the lease owner.
#[derive(Debug)]
pub struct ClaimJob {
    pub msg: MessageRow,
    pub owner: String,
}

/// [`claim_credential`] for several messages in one transaction (one commit); each
/// in a savepoint of its own, so one message's failure leaves the others' claims.
pub fn claim_many(
    conn: &mut DbConn,
    jobs: &[ClaimJob],
) -> DbResult<Vec<DbResult<Option<MessageRow>>>> {
    write_tx(conn, |conn| {
        let now = crate::time::now();
        // PostgreSQL: the group in three statements; what they did not claim (and
        // every claim on SQLite), one by one.
        let claimed = super::sets::claim(conn, jobs, now)?;
        Ok(jobs
            .iter()
            .zip(claimed)
            .map(|(j, claimed)| match claimed {
                Some(row) => Ok(Some(row)),
                None => claim_credential(conn, &j.msg, &j.owner, now),
            })
            .collect())
    })
}

/// A settlement of [`settle_many`].
#[derive(Debug)]
pub struct SettleJob {
    pub msg: MessageRow,
    pub owner: String,
    pub settlement: Settlement,
}

/// [`settle`] for several messages in one transaction (one commit), in message id
/// order; each in a savepoint of its own (a lost lease or a failure leaves the
/// others settled). A settlement that [`settles_alone`] does not belong here.
pub fn settle_many(conn: &mut DbConn, jobs: &[SettleJob]) -> DbResult<Vec<DbResult<bool>>> {
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| jobs[i].msg.id);
    write_tx(conn, |conn| {
        let now = crate::time::now();
        let mut results: Vec<Option<DbResult<bool>>> = jobs.iter().map(|_| None).collect();
        if matches!(conn, DbConn::Pg(_)) {
            let plain: Vec<usize> = order
                .iter()
                .copied()
                .filter(|&i| super::sets::plain(&jobs[i]))
                .collect();
            for (i, applied) in super::sets::settle(conn, jobs, &plain, now)? {
                results[i] = Some(Ok(applied));
            }
        }
        for i in order {
            if results[i].is_some() {
                continue;
            }
            let j = &jobs[i];
            results[i] = Some(settle(conn, &j.msg, &j.owner, &j.settlement, now));
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Ok(false)))
            .collect())
    })
}

/// A settlement that takes the user's lock (a sent event may have overtaken it, see
/// [`settle`]): written in a transaction of its own, so a group never holds several
/// users' locks in an order the push does not know.
pub fn settles_alone(msg: &MessageRow, s: &Settlement) -> bool {
    takes_user_lock(msg, s)
}

fn takes_user_lock(msg: &MessageRow, s: &Settlement) -> bool {
    let subscribed = msg.credential_kind.as_deref() == Some(Kind::Subscription.as_str());
    let outcome_unknown = subscribed
        && s.error.as_ref().map(|e| e.code)
            == Some(super::settle::MessageErrorCode::OutcomeUnknown);
    s.wechat_msgid.is_some() || outcome_unknown
}

/// Claims a use of the user's credential for the message and marks the call in
/// flight, in one transaction: a use is never spent without the message knowing.
/// Returns the message as it now stands (holding the credential); None if the user
/// has no live credential (or the lease was lost).
pub fn claim_credential(
    conn: &mut DbConn,
    msg: &MessageRow,
    owner: &str,
    now: DateTime<Utc>,
) -> DbResult<Option<MessageRow>> {
    use messages::dsl as m;
    write_tx(conn, |conn| {
        let Some(used) = ledger::claim(conn, &msg.app_id, &msg.openid, msg.pick()?, now)? else {
            return Ok(None);
        };
        let cred = &used.credential;
        let updated = dispatch!(conn, |c| cached(
            diesel::update(
                m::messages
                    .filter(m::id.eq(msg.id))
                    .filter(m::lease_owner.eq(owner))
            )
            .set((
                m::status.eq(Status::Sending.as_str()),
                m::credential_id.eq(cred.id),
                m::credential_kind.eq(cred.kind.as_str()),
                m::credential_value.eq(&cred.value),
                m::credential_uses_total.eq(cred.uses_total),
                m::credential_created_at.eq(to_db(cred.created_at)),
                m::credential_issued_at.eq(to_db(cred.issued_at)),
                m::credentials_tried.eq(m::credentials_tried + 1),
                m::retries.eq(0),
                m::ambiguous.eq(false),
                m::in_flight.eq(true),
                m::updated_at.eq(to_db(now)),
            ))
            .returning(MessageRow::as_returning())
        )
        .get_result(c)
        .optional())?;
        match updated {
            Some(row) => Ok(Some(row)),
            // Lease lost: roll the claim back with the transaction.
            None => Err(DbError::Query(diesel::result::Error::RollbackTransaction)),
        }
    })
    .or_else(|e| match e {
        DbError::Query(diesel::result::Error::RollbackTransaction) => Ok(None),
        e => Err(e),
    })
}

/// Marks a call with the held credential in flight; false if the lease was lost.
pub fn mark_in_flight(
    conn: &mut DbConn,
    id: i64,
    owner: &str,
    now: DateTime<Utc>,
) -> DbResult<bool> {
    use messages::dsl as m;
    // RETURNING, loaded to the end (in autocommit, SQLite commits when the statement
    // finishes): a statement run by `execute` is not kept prepared (db::cached).
    let changed = dispatch!(conn, |c| cached(
        diesel::update(
            m::messages
                .filter(m::id.eq(id))
                .filter(m::lease_owner.eq(owner))
        )
        .set((m::in_flight.eq(true), m::updated_at.eq(to_db(now))))
        .returning(m::id)
    )
    .get_results::<i64>(c))?;
    Ok(!changed.is_empty())
}

/// Applies a step's end if the lease is still ours; false if it was lost (another
/// worker took over after our lease ran out: it will redo this step).
pub fn settle(
    conn: &mut DbConn,
    msg: &MessageRow,
    owner: &str,
    s: &Settlement,
    now: DateTime<Utc>,
) -> DbResult<bool> {
    use app_pauses::dsl as p;
    use message_attempts::dsl as a;
    use messages::dsl as m;
    let now_db = to_db(now);
    // A sent event may have overtaken this settlement (see `delivery`): under the
    // user's lock (the push takes it first too), claim it after the row is written.
    let subscribed = msg.credential_kind.as_deref() == Some(Kind::Subscription.as_str());
    let outcome_unknown = subscribed
        && s.error.as_ref().map(|e| e.code)
            == Some(super::settle::MessageErrorCode::OutcomeUnknown);
    let pending = takes_user_lock(msg, s);
    write_tx(conn, |conn| {
        if pending {
            ledger::lock_user(conn, &msg.app_id, &msg.openid)?;
        }
        // When the ambiguous call began (marking it in flight set `updated_at`),
        // read before this settlement moves it.
        let call_began = if outcome_unknown {
            let at: NaiveDateTime = dispatch!(conn, |c| m::messages
                .filter(m::id.eq(msg.id))
                .select(m::updated_at)
                .first(c))?;
            Some(at.and_utc())
        } else {
            None
        };
        let keep = s.credential == CredentialFate::Keep;
        let final_status = s.status.is_final();
        let error = s.error.as_ref();
        let changed = dispatch!(conn, |c| cached(diesel::update(
            m::messages
                .filter(m::id.eq(msg.id))
                .filter(m::lease_owner.eq(owner))
        )
        .set((
            m::status.eq(s.status.as_str()),
            m::in_flight.eq(false),
            m::ambiguous.eq(keep && s.ambiguous),
            m::retries.eq(s.retries),
            m::young_retries.eq(m::young_retries + i32::from(s.is_young_retry())),
            m::error_code.eq(error.map(|e| e.code.as_str())),
            m::wechat_errcode.eq(error.and_then(|e| e.wechat_errcode)),
            m::error_message.eq(error.map(|e| e.message.as_str())),
            m::next_attempt_at.eq(to_db(s.next_attempt_at)),
            m::lease_owner.eq(None::<String>),
            m::lease_until.eq(None::<NaiveDateTime>),
            m::updated_at.eq(now_db),
            m::finished_at.eq(final_status.then_some(now_db)),
        ))
        .returning(m::id))
        .get_results::<i64>(c))?;
        if changed.is_empty() {
            return Err(DbError::Query(diesel::result::Error::RollbackTransaction));
        }
        if let Some(msgid) = &s.wechat_msgid {
            dispatch!(conn, |c| diesel::update(
                m::messages.filter(m::id.eq(msg.id))
            )
            .set(m::wechat_msgid.eq(msgid))
            .execute(c))?;
        }
        if s.awaits_report {
            // A report since the lease (see `wake_waiting_many`): due now, not later.
            dispatch!(conn, |c| diesel::update(
                m::messages
                    .filter(m::id.eq(msg.id))
                    .filter(m::wakes.ne(msg.wakes))
            )
            .set(m::next_attempt_at.eq(now_db))
            .execute(c))?;
        }
        if !keep && !final_status {
            dispatch!(conn, |c| diesel::update(
                m::messages.filter(m::id.eq(msg.id))
            )
            .set((
                m::credential_id.eq(None::<i64>),
                m::credential_kind.eq(None::<String>),
                m::credential_value.eq(None::<String>),
                m::credential_uses_total.eq(None::<i32>),
                m::credential_created_at.eq(None::<NaiveDateTime>),
                m::credential_issued_at.eq(None::<NaiveDateTime>),
            ))
            .execute(c))?;
        }
        if let Some(attempt) = s.attempt {
            dispatch!(conn, |c| diesel::insert_into(a::message_attempts)
                .values((
                    a::message_id.eq(msg.id),
                    a::at.eq(now_db),
                    a::credential_id.eq(msg.credential_id),
                    a::wechat_errcode.eq(attempt.wechat_errcode),
                    a::outcome.eq(attempt.outcome.as_str()),
                ))
                .execute(c))?;
        }
        if let Some(credential_id) = msg.credential_id {
            match s.credential {
                CredentialFate::Keep | CredentialFate::Spent => {}
                CredentialFate::Release => {
                    ledger::release_id(conn, credential_id, now)?;
                }
                CredentialFate::Invalidate(reason) => {
                    ledger::invalidate(conn, credential_id, reason, now)?;
                }
            }
        }
        if pending {
            let claimed = super::delivery::claim_pending(
                conn,
                msg.id,
                &msg.app_id,
                &msg.openid,
                &msg.template_id,
                s.wechat_msgid.as_deref(),
                call_began,
                now,
            )?;
            if claimed == super::delivery::Pending::Resolved {
                log::info!(
                    "message {}: an earlier sent event proves the ambiguous send was accepted; sent",
                    msg.id
                );
            }
            if claimed != super::delivery::Pending::None {
                message_event(conn, msg.id, &msg.app_id, EventType::MessageDelivery)?;
            }
        }
        if final_status {
            finished_event(conn, msg, s.status)?;
        }
        let grant_gone = matches!(
            s.credential,
            CredentialFate::Spent | CredentialFate::Invalidate(_)
        );
        if grant_gone && msg.credential_kind()? == Some(Kind::Subscription) {
            exhausted_event(conn, msg, now)?;
        }
        if let Some(until) = s.pause_until {
            let until = to_db(until);
            dispatch!(conn, |c| diesel::insert_into(p::app_pauses)
                .values((
                    p::app_id.eq(&msg.app_id),
                    p::until.eq(until),
                    p::reason.eq("45009")
                ))
                .on_conflict(p::app_id)
                .do_update()
                .set(p::until.eq(until))
                .execute(c))?;
        }
        Ok(true)
    })
    .or_else(|e| match e {
        DbError::Query(diesel::result::Error::RollbackTransaction) => Ok(false),
        e => Err(e),
    })
}

/// `message.finished` with the message resource as it now stands (in the settling
/// transaction: the event exists exactly when the final status does).
pub(super) fn finished_event(conn: &mut DbConn, msg: &MessageRow, status: Status) -> DbResult<()> {
    // The contract's event is for sent, no_quota and failed; a campaign's skipped
    // recipients show in its counts.
    if matches!(status, Status::Skipped | Status::Cancelled) {
        return Ok(());
    }
    message_event(conn, msg.id, &msg.app_id, EventType::MessageFinished)
}

/// Queues webhook event `event` (`message.finished` or `message.delivery`) with the
/// message resource as it stands in this transaction, if a webhook of message `id`'s
/// app `app_id` wants it (asked first: the resource is loaded only then).
pub fn message_event(conn: &mut DbConn, id: i64, app_id: &str, event: EventType) -> DbResult<()> {
    if !webhooks::wanted(conn, app_id, event)? {
        return Ok(());
    }
    let Some(view) = super::view(conn, id)? else {
        return Ok(());
    };
    let data = serde_json::to_value(&view)
        .map_err(|e| DbError::Corrupt(format!("message {id} does not serialise: {e}")))?;
    webhooks::enqueue(conn, &view.app_id, event, &data)?;
    Ok(())
}

/// `subscription.exhausted` if the subscription this message spent (or found
/// invalid) was the user's last grant of the template.
fn exhausted_event(conn: &mut DbConn, msg: &MessageRow, now: DateTime<Utc>) -> DbResult<()> {
    exhausted_if_last(
        conn,
        &msg.app_id,
        &msg.openid,
        &msg.template_id,
        Some(msg.id),
        now,
    )
}

/// Queues `subscription.exhausted` when the user has no live grant of the template
/// left and no message (but `except`) holds one (it would come back if that message
/// let go of it).
pub fn exhausted_if_last(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    template_id: &str,
    except: Option<i64>,
    now: DateTime<Utc>,
) -> DbResult<()> {
    use messages::dsl as m;
    if !webhooks::wanted(conn, app_id, EventType::SubscriptionExhausted)? {
        return Ok(());
    }
    if ledger::live_grants(conn, app_id, openid, template_id, now)? > 0 {
        return Ok(());
    }
    let held: i64 = dispatch!(conn, |c| m::messages
        .filter(m::app_id.eq(app_id))
        .filter(m::openid.eq(openid))
        .filter(m::template_id.eq(template_id))
        .filter(m::credential_kind.eq(Kind::Subscription.as_str()))
        .filter(m::status.eq_any([Status::Queued.as_str(), Status::Sending.as_str()]))
        .filter(m::id.ne(except.unwrap_or(0)))
        .count()
        .get_result(c))?;
    if held == 0 {
        webhooks::subscription_exhausted(conn, app_id, openid, template_id)?;
    }
    Ok(())
}

/// Users reported credentials: their messages waiting for one are due now.
///
/// Every such message's `wakes` moves, including one a sender has leased and is
/// about to settle as "wait" because it found nothing: [`settle`] then makes it due
/// at once. Both statements write the message row, so whichever commits second sees
/// the other (a wake is never lost between a sender's look and its settlement).
pub fn wake_waiting_many(
    conn: &mut DbConn,
    app_id: &str,
    openids: &[&str],
    now: DateTime<Utc>,
) -> DbResult<usize> {
    use diesel::sql_types::Array;
    // One statement text for any number of users (an array on PostgreSQL, a JSON
    // array on SQLite), kept prepared: this runs after every group of reports. The
    // woken ids are loaded, not counted by `execute` (which would prepare it anew).
    const SET: &str = "UPDATE messages SET wakes = wakes + 1, next_attempt_at = \
                       CASE WHEN next_attempt_at > $3 THEN $3 ELSE next_attempt_at END \
                       WHERE app_id = $1 AND status = 'queued' AND credential_id IS NULL";
    let now = to_db(now);
    let users = match conn {
        DbConn::Pg(_) => "openid = ANY($2)",
        DbConn::Sqlite(_) => "openid IN (SELECT value FROM json_each($2))",
    };
    let sql = native_sql(conn, &format!("{SET} AND {users} RETURNING id"));
    let woken: Vec<Returned> = match conn {
        DbConn::Pg(c) => cached(
            diesel::sql_query(sql)
                .bind::<Text, _>(app_id)
                .bind::<Array<Text>, _>(openids)
                .bind::<Timestamp, _>(now),
        )
        .load(c)?,
        DbConn::Sqlite(c) => cached(
            diesel::sql_query(sql)
                .bind::<Text, _>(app_id)
                .bind::<Text, _>(json_text(openids)?)
                .bind::<Timestamp, _>(now),
        )
        .load(c)?,
    };
    Ok(woken.len())
}

/// A row of `RETURNING id`, only counted.
#[derive(QueryableByName)]
struct Returned {
    #[diesel(sql_type = BigInt, column_name = id)]
    _id: i64,
}

/// Gives up the leases this worker set holds (graceful shutdown): another instance
/// (or this one after a restart) picks the messages up at once, not after the lease.
/// Messages with a call in flight keep it marked, so the next worker treats that
/// call as ambiguous.
pub fn release_leases(conn: &mut DbConn, owner: &str) -> DbResult<usize> {
    use messages::dsl as m;
    Ok(dispatch!(conn, |c| diesel::update(
        m::messages.filter(m::lease_owner.eq(owner))
    )
    .set((
        m::lease_owner.eq(None::<String>),
        m::lease_until.eq(None::<NaiveDateTime>),
    ))
    .execute(c))?)
}

/// Unfinished messages: the sender queue depth.
pub fn queue_depth(conn: &mut DbConn) -> DbResult<i64> {
    use messages::dsl as m;
    Ok(dispatch!(conn, |c| m::messages
        .filter(m::status.eq_any([Status::Queued.as_str(), Status::Sending.as_str()]))
        .count()
        .get_result(c))?)
}

#[derive(QueryableByName)]
struct HourStatusCount {
    #[diesel(sql_type = Text)]
    hour: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// (hour as RFC 3339, status, messages) of the app's messages created since `since`.
pub fn status_counts(
    conn: &mut DbConn,
    app_id: &str,
    since: DateTime<Utc>,
) -> DbResult<Vec<(String, String, i64)>> {
    // The one place the backends spell a date function differently.
    let hour = match conn {
        DbConn::Pg(_) => {
            "to_char(date_trunc('hour', created_at), 'YYYY-MM-DD\"T\"HH24:00:00.000\"Z\"')"
        }
        DbConn::Sqlite(_) => "strftime('%Y-%m-%dT%H:00:00.000Z', created_at)",
    };
    let sql = native_sql(
        conn,
        &format!(
            "SELECT {hour} AS hour, status, COUNT(*) AS n FROM messages \
             WHERE app_id = $1 AND created_at >= $2 GROUP BY 1, 2 ORDER BY 1"
        ),
    );
    let rows: Vec<HourStatusCount> = dispatch!(conn, |c| diesel::sql_query(&sql)
        .bind::<Text, _>(app_id)
        .bind::<Timestamp, _>(to_db(since))
        .load(c))?;
    Ok(rows.into_iter().map(|r| (r.hour, r.status, r.n)).collect())
}

/// The app's most frequent WeChat error codes since `since`.
pub fn top_errcodes(
    conn: &mut DbConn,
    app_id: &str,
    since: DateTime<Utc>,
    limit: i64,
) -> DbResult<Vec<(i32, i64)>> {
    use diesel::dsl::count_star;
    use message_attempts::dsl as a;
    use messages::dsl as m;
    let rows: Vec<(Option<i32>, i64)> = dispatch!(conn, |c| a::message_attempts
        .inner_join(m::messages)
        .filter(m::app_id.eq(app_id))
        .filter(a::at.ge(to_db(since)))
        .filter(a::wechat_errcode.ne(0))
        .group_by(a::wechat_errcode)
        .select((a::wechat_errcode, count_star()))
        .order(count_star().desc())
        .limit(limit)
        .load(c))?;
    Ok(rows
        .into_iter()
        .filter_map(|(code, n)| code.map(|c| (c, n)))
        .collect())
}
