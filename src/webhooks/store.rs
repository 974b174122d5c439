//! The webhook tables: `webhooks` (who hears what) and `webhook_deliveries` (the
//! durable outbound queue).

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Text, Timestamp};

use crate::db::schema::{webhook_deliveries, webhooks};
use crate::db::{native_sql, single_write, skip_locked, write_tx, DbConn, DbResult};
use crate::dispatch;
use crate::time::to_db;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = webhooks)]
pub struct WebhookRow {
    pub name: String,
    pub url: String,
    pub events: String,
    pub app_ids: Option<String>,
    pub secret: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = webhook_deliveries)]
pub struct DeliveryRow {
    pub id: i64,
    pub kind: String,
    pub webhook: Option<String>,
    pub url: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub app_id: String,
    pub content_type: String,
    pub body: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: NaiveDateTime,
    pub retry_from: NaiveDateTime,
    pub lease_owner: Option<String>,
    pub lease_until: Option<NaiveDateTime>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub delivered_at: Option<NaiveDateTime>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = webhook_deliveries)]
pub struct NewDelivery {
    pub kind: &'static str,
    pub webhook: Option<String>,
    pub url: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub app_id: String,
    pub content_type: String,
    pub body: String,
    pub status: &'static str,
    pub next_attempt_at: NaiveDateTime,
    pub retry_from: NaiveDateTime,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// Creates or replaces the webhook named `row.name` (keeping its `created_at`).
pub fn upsert(conn: &mut DbConn, row: &WebhookRow) -> DbResult<()> {
    use webhooks::dsl as w;
    dispatch!(conn, |c| diesel::insert_into(w::webhooks)
        .values(row)
        .on_conflict(w::name)
        .do_update()
        .set((
            w::url.eq(&row.url),
            w::events.eq(&row.events),
            w::app_ids.eq(&row.app_ids),
            w::secret.eq(&row.secret),
            w::updated_at.eq(row.updated_at),
        ))
        .execute(c))?;
    Ok(())
}

pub fn all(conn: &mut DbConn) -> DbResult<Vec<WebhookRow>> {
    use webhooks::dsl as w;
    Ok(dispatch!(conn, |c| w::webhooks
        .order(w::name)
        .select(WebhookRow::as_select())
        .load(c))?)
}

pub fn find(conn: &mut DbConn, name: &str) -> DbResult<Option<WebhookRow>> {
    use webhooks::dsl as w;
    Ok(dispatch!(conn, |c| w::webhooks
        .filter(w::name.eq(name))
        .select(WebhookRow::as_select())
        .first(c)
        .optional())?)
}

/// Deletes the webhook and (cascading) its deliveries; false if there was none.
pub fn delete(conn: &mut DbConn, name: &str) -> DbResult<bool> {
    use webhook_deliveries::dsl as d;
    use webhooks::dsl as w;
    write_tx(conn, |conn| {
        // Explicitly as well as by the foreign key: SQLite connections opened
        // without foreign_keys would keep them otherwise.
        dispatch!(conn, |c| diesel::delete(
            d::webhook_deliveries.filter(d::webhook.eq(name))
        )
        .execute(c))?;
        let n = dispatch!(conn, |c| diesel::delete(
            w::webhooks.filter(w::name.eq(name))
        )
        .execute(c))?;
        Ok(n == 1)
    })
}

pub fn insert_deliveries(conn: &mut DbConn, rows: &[NewDelivery]) -> DbResult<()> {
    use webhook_deliveries::dsl as d;
    if rows.is_empty() {
        return Ok(());
    }
    for row in rows {
        dispatch!(conn, |c| diesel::insert_into(d::webhook_deliveries)
            .values(row)
            .execute(c))?;
    }
    Ok(())
}

/// Inserts one delivery, leased to `lease` (owner, until) from the start when
/// given; returns its id.
pub fn insert_leased(
    conn: &mut DbConn,
    row: &NewDelivery,
    lease: Option<(&str, NaiveDateTime)>,
) -> DbResult<i64> {
    use webhook_deliveries::dsl as d;
    let id: i64 = dispatch!(conn, |c| diesel::insert_into(d::webhook_deliveries)
        .values(row)
        .returning(d::id)
        .get_result(c))?;
    if let Some((owner, until)) = lease {
        dispatch!(conn, |c| diesel::update(
            d::webhook_deliveries.filter(d::id.eq(id))
        )
        .set((d::lease_owner.eq(owner), d::lease_until.eq(until)))
        .execute(c))?;
    }
    Ok(id)
}

/// Leases the pending delivery that is due first and not leased (or whose lease
/// ran out: its instance died mid-delivery). PostgreSQL: SKIP LOCKED, so instances
/// take different deliveries.
pub fn lease_next(
    conn: &mut DbConn,
    owner: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> DbResult<Option<DeliveryRow>> {
    let lock = skip_locked(conn);
    let sql = native_sql(
        conn,
        &format!(
            "UPDATE webhook_deliveries SET lease_owner = $1, lease_until = $2 \
             WHERE id = (SELECT id FROM webhook_deliveries \
               WHERE status = 'pending' AND next_attempt_at <= $3 \
                 AND (lease_until IS NULL OR lease_until < $3) \
               ORDER BY next_attempt_at LIMIT 1{lock}) \
             RETURNING *"
        ),
    );
    single_write(conn, |conn| {
        Ok(dispatch!(conn, |c| diesel::sql_query(&sql)
            .bind::<Text, _>(owner)
            .bind::<Timestamp, _>(to_db(until))
            .bind::<Timestamp, _>(to_db(now))
            .get_result::<DeliveryRow>(c)
            .optional())?)
    })
}

/// How one delivery attempt ended.
#[derive(Debug, Clone)]
pub enum Attempted {
    Delivered,
    /// Try again at this time.
    Retry {
        error: String,
        at: DateTime<Utc>,
    },
    /// Retried for long enough: kept as `failed` for a manual retry.
    Failed {
        error: String,
    },
}

/// Records an attempt if the lease is still ours; false if it was lost (another
/// instance took the delivery over and answers for it).
pub fn record(
    conn: &mut DbConn,
    id: i64,
    owner: &str,
    attempted: &Attempted,
    now: DateTime<Utc>,
) -> DbResult<bool> {
    use webhook_deliveries::dsl as d;
    let now = to_db(now);
    let (status, error, next, delivered_at) = match attempted {
        Attempted::Delivered => ("delivered", None, None, Some(now)),
        Attempted::Retry { error, at } => ("pending", Some(error.as_str()), Some(to_db(*at)), None),
        Attempted::Failed { error } => ("failed", Some(error.as_str()), None, None),
    };
    let target = d::webhook_deliveries
        .filter(d::id.eq(id))
        .filter(d::lease_owner.eq(owner))
        .filter(d::status.eq("pending"));
    let changed = dispatch!(conn, |c| diesel::update(target)
        .set((
            d::status.eq(status),
            d::attempts.eq(d::attempts + 1),
            d::last_error.eq(error),
            d::next_attempt_at.eq(next.unwrap_or(now)),
            d::lease_owner.eq(None::<String>),
            d::lease_until.eq(None::<NaiveDateTime>),
            d::updated_at.eq(now),
            d::delivered_at.eq(delivered_at),
        ))
        .execute(c))?;
    Ok(changed == 1)
}

/// Gives up this instance's leases (graceful shutdown): another instance delivers
/// them at once rather than after the lease.
pub fn release_leases(conn: &mut DbConn, owner: &str) -> DbResult<usize> {
    use webhook_deliveries::dsl as d;
    Ok(dispatch!(conn, |c| diesel::update(
        d::webhook_deliveries.filter(d::lease_owner.eq(owner))
    )
    .set((
        d::lease_owner.eq(None::<String>),
        d::lease_until.eq(None::<NaiveDateTime>),
    ))
    .execute(c))?)
}

/// A webhook's deliveries, newest first, of one status if given.
pub fn deliveries(
    conn: &mut DbConn,
    webhook: &str,
    status: Option<&str>,
    limit: i64,
) -> DbResult<Vec<DeliveryRow>> {
    use webhook_deliveries::dsl as d;
    Ok(dispatch!(conn, |c| {
        let mut q = d::webhook_deliveries
            .filter(d::webhook.eq(webhook))
            .select(DeliveryRow::as_select())
            .order(d::id.desc())
            .limit(limit)
            .into_boxed();
        if let Some(status) = status {
            q = q.filter(d::status.eq(status));
        }
        q.load(c)
    })?)
}

pub fn delivery(conn: &mut DbConn, id: i64) -> DbResult<Option<DeliveryRow>> {
    use webhook_deliveries::dsl as d;
    Ok(dispatch!(conn, |c| d::webhook_deliveries
        .filter(d::id.eq(id))
        .select(DeliveryRow::as_select())
        .first(c)
        .optional())?)
}

/// A failed delivery is pending again, due now, with a new retry window from now;
/// false if it is not failed (it may have just been retried by someone else).
pub fn retry(conn: &mut DbConn, id: i64, now: DateTime<Utc>) -> DbResult<bool> {
    use webhook_deliveries::dsl as d;
    let changed = dispatch!(conn, |c| diesel::update(
        d::webhook_deliveries
            .filter(d::id.eq(id))
            .filter(d::status.eq("failed"))
    )
    .set((
        d::status.eq("pending"),
        d::next_attempt_at.eq(to_db(now)),
        d::retry_from.eq(to_db(now)),
        d::updated_at.eq(to_db(now)),
    ))
    .execute(c))?;
    Ok(changed == 1)
}

/// Deliveries by status (all webhooks): for tests and the operator.
pub fn count_by_status(conn: &mut DbConn, status: &str) -> DbResult<i64> {
    use webhook_deliveries::dsl as d;
    Ok(dispatch!(conn, |c| d::webhook_deliveries
        .filter(d::status.eq(status))
        .count()
        .get_result(c))?)
}
