//! Taking credentials in: validation, duplicates, the per-user cap, one transaction.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde::Serialize;

use super::{is_valid_value, Kind, Rules, MOCK_FORM_ID, SUBSCRIPTION_RESULTS, VALIDITY};
use crate::db::schema::credentials::dsl as c;
use crate::db::{cached, json_text, write_tx, DbConn, DbError, DbResult};
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
    /// A subscription result other than `accept`, `reject`, `ban` or `filter`.
    InvalidResult,
    /// A template new to the user, who already has results for the configured
    /// number of templates: neither counted nor granted.
    TemplateCap,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MockFormId => "mock_form_id",
            RejectReason::InvalidFormat => "invalid_format",
            RejectReason::UserCap => "user_cap",
            RejectReason::NotAccepted => "not_accepted",
            RejectReason::Expired => "expired",
            RejectReason::InvalidResult => "invalid_result",
            RejectReason::TemplateCap => "template_cap",
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
    reported_at: Option<chrono::NaiveDateTime>,
    pushed_at: Option<chrono::NaiveDateTime>,
}

/// A valid item, ready to store unless it is a duplicate or over the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate<'a> {
    kind: Kind,
    value: Option<&'a str>,
    template_id: Option<&'a str>,
    uses: i32,
    issued_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
}

/// A valid item: a form_id or prepay_id to store, or a subscription result to count
/// (and, if `accept`, a subscription to store) once the user's templates admit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Valid<'a> {
    Token(Candidate<'a>),
    Result {
        template_id: &'a str,
        result: &'a str,
    },
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
/// commit — each with its own outcome, as if recorded one after the other (in some
/// order: they were concurrent). On PostgreSQL every user of the group is locked up
/// front in one fixed order by one statement, so concurrent groups cannot deadlock
/// and the cap holds.
///
/// Set-based: the form_ids and prepay_ids of the group — every (request, user) whose
/// items are tokens only, the common case — are stored by a handful of statements
/// whatever the group's size ([`store_tokens`]: on PostgreSQL one statement for the
/// users far from the cap; the users' live counts, the values already known, one
/// insert for the rest); only a user's report with subscription results takes
/// the per-user path (its templates, the merge rule, the result counts).
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
        .flat_map(|users| users.keys().copied())
        .collect();
    locks.sort_unstable();
    locks.dedup();
    if locks.is_empty() {
        return Ok(outcomes);
    }
    write_tx(conn, |conn| {
        lock_users(conn, &locks)?;
        let mut tokens = Vec::new();
        let mut others = Vec::new();
        for (request, users) in work.iter().enumerate() {
            for ((app_id, openid), items) in users {
                let mut candidates = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Valid::Token(candidate) => candidates.push(*candidate),
                        Valid::Result { .. } => break,
                    }
                }
                if candidates.len() == items.len() {
                    tokens.push(Tokens {
                        request,
                        app_id,
                        openid,
                        candidates,
                    });
                } else {
                    others.push((request, *app_id, *openid, items));
                }
            }
        }
        store_tokens(conn, rules, now, &tokens, &mut outcomes)?;
        for (request, app_id, openid, items) in others {
            let outcome = &mut outcomes[request];
            let templates = known_templates(conn, app_id, openid, items)?;
            let (candidates, results) = admit(items, &templates, rules, now, outcome);
            store_user(conn, rules, now, app_id, openid, &candidates, outcome)?;
            count_results(conn, app_id, openid, &results, now)?;
        }
        Ok::<_, DbError>(())
    })?;
    Ok(outcomes)
}

/// One request's form_ids and prepay_ids for one user, in the order reported.
struct Tokens<'a> {
    request: usize,
    app_id: &'a str,
    openid: &'a str,
    candidates: Vec<Candidate<'a>>,
}

/// The tokens of a whole group, set-based, under the users' locks. On PostgreSQL the
/// users whose reports fit under the cap whatever they hold are stored first, by
/// [`store_roomy`]'s one statement, which also counts the others' live credentials.
/// For the others (and every user on SQLite): one statement for the users' live
/// credentials (per app: nearly always one; SQLite only), one for the values
/// already known — only those of users the group could take to the cap, where a
/// duplicate must not take room — then the rules applied in order (a value known or
/// seen earlier in the group is a duplicate, a user's first ones fill the room under
/// the cap, the rest are `user_cap`) and one insert, whose conflicts are the other
/// duplicates. Same rules, same order, same outcome as [`store_user`] per user,
/// without its per-user statements.
fn store_tokens(
    conn: &mut DbConn,
    rules: &Rules,
    now: DateTime<Utc>,
    tokens: &[Tokens<'_>],
    outcomes: &mut [RecordOutcome],
) -> DbResult<()> {
    if tokens.is_empty() {
        return Ok(());
    }
    let now_db = to_db(now);
    let cap = i64::from(rules.user_cap);
    // PostgreSQL: users whose report cannot reach the cap are settled by one
    // statement; the rest (their live counts known) follow the rules below.
    let mut live: HashMap<(&str, &str), i64> = HashMap::new();
    let tokens: Vec<&Tokens<'_>> = match conn {
        DbConn::Pg(pg) => store_roomy(pg, cap, now_db, tokens, outcomes, &mut live)?,
        DbConn::Sqlite(_) => tokens.iter().collect(),
    };
    if tokens.is_empty() {
        return Ok(());
    }
    // Per app, per user: the values reported.
    let mut apps: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for t in &tokens {
        let values = apps
            .entry(t.app_id)
            .or_default()
            .entry(t.openid)
            .or_default();
        values.extend(t.candidates.iter().filter_map(|c| c.value));
    }
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for (&app_id, users) in &apps {
        if let DbConn::Sqlite(lite) = conn {
            // The users as one JSON array: one statement text for any number of
            // users, kept prepared.
            let openids: Vec<&str> = users.keys().copied().collect();
            let openids = json_text(&openids)?;
            let counts: Vec<LiveCount> = cached(
                diesel::sql_query(
                    "SELECT openid, count(*) AS n FROM credentials \
                     WHERE app_id = ?1 AND openid IN (SELECT value FROM json_each(?2)) \
                       AND uses_left > 0 AND NOT invalid \
                       AND (expires_at IS NULL OR expires_at > ?3) \
                     GROUP BY openid",
                )
                .bind::<diesel::sql_types::Text, _>(app_id)
                .bind::<diesel::sql_types::Text, _>(openids)
                .bind::<diesel::sql_types::Timestamp, _>(now_db),
            )
            .load(lite)?;
            // Keyed by the reports' strings, not the rows'.
            for LiveCount { openid, n } in counts {
                if let Some((&openid, _)) = users.get_key_value(openid.as_str()) {
                    live.insert((app_id, openid), n);
                }
            }
        }
        // Users who could reach the cap: their duplicates must be known first.
        let mut tight: Vec<&str> = Vec::new();
        for (&openid, values) in users {
            let held = live.get(&(app_id, openid)).copied().unwrap_or(0);
            if held + values.len() as i64 > cap {
                tight.extend(values.iter().copied());
            }
        }
        if tight.is_empty() {
            continue;
        }
        let known: Vec<Option<String>> = dispatch!(conn, |conn| c::credentials
            .filter(c::app_id.eq(app_id))
            .filter(c::value.eq_any(&tight))
            .select(c::value)
            .load(conn))?;
        let reported: HashSet<&str> = tight.iter().copied().collect();
        for value in known.iter().flatten() {
            if let Some(v) = reported.get(value.as_str()) {
                seen.insert((app_id, *v));
            }
        }
    }
    // The rules, in order.
    let mut room: HashMap<(&str, &str), i64> = HashMap::new();
    let mut rows: Vec<(usize, NewCredential<'_>)> = Vec::new();
    for t in tokens {
        let outcome = &mut outcomes[t.request];
        let user = (t.app_id, t.openid);
        let left = room
            .entry(user)
            .or_insert_with(|| cap - live.get(&user).copied().unwrap_or(0));
        for cand in &t.candidates {
            let value = cand.value.unwrap_or_default();
            if seen.contains(&(t.app_id, value)) {
                outcome.duplicates += 1;
                continue;
            }
            // A refused value is not known: its next report is judged afresh.
            if *left <= 0 {
                outcome.rejected.push(Rejection {
                    value: value.to_string(),
                    reason: RejectReason::UserCap,
                });
                continue;
            }
            seen.insert((t.app_id, value));
            *left -= 1;
            rows.push((
                t.request,
                NewCredential {
                    app_id: t.app_id,
                    openid: t.openid,
                    kind: cand.kind.as_str(),
                    value: cand.value,
                    template_id: None,
                    uses_total: cand.uses,
                    uses_left: cand.uses,
                    issued_at: to_db(cand.issued_at),
                    expires_at: cand.expires_at.map(to_db),
                    created_at: now_db,
                    updated_at: now_db,
                    reported_at: None,
                    pushed_at: None,
                },
            ));
        }
    }
    // A value another transaction stored since we looked is a duplicate too.
    let stored = insert_tokens(conn, now_db, &rows)?;
    for ((request, _), stored) in rows.iter().zip(stored) {
        if stored {
            outcomes[*request].accepted += 1;
        } else {
            outcomes[*request].duplicates += 1;
        }
    }
    Ok(())
}

/// [`store_roomy`]'s statement: one row per token, in the group's order, with its
/// user's number. A query with a static id, unlike a `sql_query`, is prepared once
/// per connection and kept in diesel's statement cache: each group then skips
/// parsing and analysis (ingest-single on PostgreSQL +4 to 8%, two runs). It is
/// planned once per connection too ([`store_roomy`]). A user's live credentials
/// are those with `COALESCE(expires_at, 'infinity') > now`, the `live!` rule
/// written so that no plan can AND a bitmap of `credentials_expires_at` into the
/// count (`expires_at > now` matches nearly every row).
#[derive(Default)]
struct RoomyStatement<'q> {
    users: Vec<i32>,
    apps: Vec<&'q str>,
    openids: Vec<&'q str>,
    kinds: Vec<&'q str>,
    values: Vec<&'q str>,
    uses: Vec<i32>,
    issued: Vec<chrono::NaiveDateTime>,
    expires: Vec<chrono::NaiveDateTime>,
    now: chrono::NaiveDateTime,
    cap: i64,
}

impl diesel::query_builder::QueryId for RoomyStatement<'_> {
    type QueryId = RoomyStatement<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for RoomyStatement<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl<Conn> RunQueryDsl<Conn> for RoomyStatement<'_> {}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for RoomyStatement<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Array, BigInt, Int4, Text, Timestamp};
        // Each bind is its own parameter: `now` three times, `cap` twice.
        out.push_sql("WITH t AS (SELECT * FROM unnest(");
        out.push_bind_param::<Array<Int4>, _>(&self.users)?;
        out.push_sql("::int4[], ");
        out.push_bind_param::<Array<Text>, _>(&self.apps)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Text>, _>(&self.openids)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Text>, _>(&self.kinds)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Text>, _>(&self.values)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Int4>, _>(&self.uses)?;
        out.push_sql("::int4[], ");
        out.push_bind_param::<Array<Timestamp>, _>(&self.issued)?;
        out.push_sql("::timestamp[], ");
        out.push_bind_param::<Array<Timestamp>, _>(&self.expires)?;
        out.push_sql(
            "::timestamp[]) WITH ORDINALITY AS t(n, a, o, k, v, u, i, e, ord)), \
             users AS (SELECT n, a, o, count(*) AS reported, \
                       (SELECT count(*) FROM credentials c \
                        WHERE c.app_id = t.a AND c.openid = t.o AND c.uses_left > 0 \
                        AND NOT c.invalid AND COALESCE(c.expires_at, 'infinity') > ",
        );
        out.push_bind_param::<Timestamp, _>(&self.now)?;
        out.push_sql(
            ") AS held FROM t GROUP BY n, a, o), \
             ins AS (INSERT INTO credentials (app_id, openid, kind, value, uses_total, \
                     uses_left, issued_at, expires_at, created_at, updated_at) \
                     SELECT t.a, t.o, t.k, t.v, t.u, t.u, t.i, t.e, ",
        );
        out.push_bind_param::<Timestamp, _>(&self.now)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamp, _>(&self.now)?;
        out.push_sql(" FROM t JOIN users s ON s.n = t.n WHERE s.held + s.reported <= ");
        out.push_bind_param::<BigInt, _>(&self.cap)?;
        out.push_sql(
            " ORDER BY t.ord ON CONFLICT DO NOTHING RETURNING app_id, value) \
             SELECT n AS user_no, held, NULL::text AS app_id, NULL::text AS value \
             FROM users WHERE held + reported > ",
        );
        out.push_bind_param::<BigInt, _>(&self.cap)?;
        out.push_sql(" UNION ALL SELECT NULL, NULL, app_id, value FROM ins");
        Ok(())
    }
}

/// A row of [`store_roomy`]'s answer: a user left to the rules (`user_no`, `held`) or
/// a value stored (`app_id`, `value`).
#[derive(QueryableByName)]
struct Settled {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Int4>)]
    user_no: Option<i32>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    held: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    app_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    value: Option<String>,
}

/// PostgreSQL, under the users' locks: ONE statement counts each user's live
/// credentials and stores the tokens of every user whose report fits under the cap
/// whatever it holds (live + reported ≤ cap), in the group's order, `ON CONFLICT DO
/// NOTHING`. For such a user the rules cannot refuse anything for the cap, so each
/// token is accepted if stored and a duplicate if not (known before, or earlier in
/// the group) — what the rules decide one by one, without a statement to count
/// first. Returns the tokens of the other users, whose live counts go into `live`
/// for the rules. (The count runs in the same statement as the insert, so it sees
/// what committed before the locks were granted; the lock statement came first.)
fn store_roomy<'t, 'a>(
    pg: &mut PgConnection,
    cap: i64,
    now_db: chrono::NaiveDateTime,
    tokens: &'t [Tokens<'a>],
    outcomes: &mut [RecordOutcome],
    live: &mut HashMap<(&'a str, &'a str), i64>,
) -> DbResult<Vec<&'t Tokens<'a>>> {
    // Users numbered in order of appearance.
    let mut number: HashMap<(&str, &str), i32> = HashMap::new();
    let mut users: Vec<(&str, &str)> = Vec::new();
    let mut statement = RoomyStatement {
        now: now_db,
        cap,
        ..RoomyStatement::default()
    };
    for t in tokens {
        let user = *number.entry((t.app_id, t.openid)).or_insert_with(|| {
            users.push((t.app_id, t.openid));
            users.len() as i32 - 1
        });
        for cand in &t.candidates {
            statement.users.push(user);
            statement.apps.push(t.app_id);
            statement.openids.push(t.openid);
            statement.kinds.push(cand.kind.as_str());
            statement.values.push(cand.value.unwrap_or_default());
            statement.uses.push(cand.uses);
            statement.issued.push(to_db(cand.issued_at));
            statement
                .expires
                .push(cand.expires_at.map_or(now_db, to_db));
        }
    }
    // Planned once per connection, not at every group as the session's
    // `force_custom_plan` would (custom planning took 0.44 ms a group, about as long
    // as running it): the plan depends on none of the values, and the only right
    // one counts each user through `credentials_user_expiry`. A generic plan is
    // made at the first execution, maybe on a nearly empty table, where a
    // sequential scan looks cheapest and would then stay (seen with auto_explain:
    // ingest fell by a third); without sequential scans the plan is the index
    // whatever the table held. Both settings end with this statement.
    pg.batch_execute(
        "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off",
    )?;
    let settled: Vec<Settled> = statement.load(pg)?;
    pg.batch_execute(
        "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_seqscan = on",
    )?;
    // App → values stored.
    let mut stored: HashMap<String, HashSet<String>> = HashMap::new();
    for row in settled {
        match (row.user_no, row.held, row.app_id, row.value) {
            (Some(user), Some(held), _, _) => {
                let user = usize::try_from(user).ok().and_then(|n| users.get(n));
                let user =
                    user.ok_or_else(|| DbError::Corrupt("a user the group does not have".into()))?;
                live.insert(*user, held);
            }
            (_, _, Some(app_id), Some(value)) => {
                stored.entry(app_id).or_default().insert(value);
            }
            _ => {
                return Err(DbError::Corrupt(
                    "an unexpected row of the ingest statement".into(),
                ))
            }
        }
    }
    let mut rest = Vec::new();
    for t in tokens {
        if live.contains_key(&(t.app_id, t.openid)) {
            rest.push(t);
            continue;
        }
        let outcome = &mut outcomes[t.request];
        let mut app = stored.get_mut(t.app_id);
        for cand in &t.candidates {
            // The first report of a value took it; a later one is a duplicate.
            let value = cand.value.unwrap_or_default();
            if app.as_mut().is_some_and(|values| values.remove(value)) {
                outcome.accepted += 1;
            } else {
                outcome.duplicates += 1;
            }
        }
    }
    Ok(rest)
}

/// A user's live credentials, counted on SQLite.
#[derive(QueryableByName)]
struct LiveCount {
    #[diesel(sql_type = diesel::sql_types::Text)]
    openid: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct StoredValue {
    #[diesel(sql_type = diesel::sql_types::Text)]
    app_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

/// Inserts token rows (values set, no template, not pushed); for each, whether it was
/// stored (false: its value was there already). One statement whatever the number
/// of rows, `ON CONFLICT DO NOTHING RETURNING` the stored ones: PostgreSQL over
/// arrays (`unnest`), SQLite over one JSON array (`json_each`). (Row by row through
/// diesel, building and binding each insert took most of SQLite's one writer.)
fn insert_tokens(
    conn: &mut DbConn,
    now_db: chrono::NaiveDateTime,
    rows: &[(usize, NewCredential<'_>)],
) -> DbResult<Vec<bool>> {
    use diesel::sql_types::{Array, Int4, Text, Timestamp};
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    fn value<'a>(r: &NewCredential<'a>) -> &'a str {
        r.value.unwrap_or_default()
    }
    let expires = |r: &NewCredential<'_>| r.expires_at.unwrap_or(now_db);
    let stored: Vec<StoredValue> = match conn {
        DbConn::Pg(pg) => {
            let apps: Vec<&str> = rows.iter().map(|(_, r)| r.app_id).collect();
            let openids: Vec<&str> = rows.iter().map(|(_, r)| r.openid).collect();
            let kinds: Vec<&str> = rows.iter().map(|(_, r)| r.kind).collect();
            let values: Vec<&str> = rows.iter().map(|(_, r)| value(r)).collect();
            let uses: Vec<i32> = rows.iter().map(|(_, r)| r.uses_total).collect();
            let issued: Vec<chrono::NaiveDateTime> =
                rows.iter().map(|(_, r)| r.issued_at).collect();
            let expires: Vec<chrono::NaiveDateTime> =
                rows.iter().map(|(_, r)| expires(r)).collect();
            let insert = diesel::sql_query(
                "INSERT INTO credentials (app_id, openid, kind, value, uses_total, uses_left, \
                 issued_at, expires_at, created_at, updated_at) \
                 SELECT a, o, k, v, u, u, i, e, $8, $8 \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], \
                             $6::timestamp[], $7::timestamp[]) AS t(a, o, k, v, u, i, e) \
                 ON CONFLICT DO NOTHING RETURNING app_id, value",
            )
            .bind::<Array<Text>, _>(&apps)
            .bind::<Array<Text>, _>(&openids)
            .bind::<Array<Text>, _>(&kinds)
            .bind::<Array<Text>, _>(&values)
            .bind::<Array<Int4>, _>(uses)
            .bind::<Array<Timestamp>, _>(issued)
            .bind::<Array<Timestamp>, _>(expires)
            .bind::<Timestamp, _>(now_db);
            cached(insert).load(pg)?
        }
        DbConn::Sqlite(lite) => {
            // Timestamps as diesel writes them on SQLite; a group's rows share most.
            let mut text = SqliteTimestamps::default();
            let json: Vec<_> = rows
                .iter()
                .map(|(_, r)| {
                    let issued = text.format(r.issued_at);
                    let expires = text.format(expires(r));
                    (
                        r.app_id,
                        r.openid,
                        r.kind,
                        value(r),
                        r.uses_total,
                        issued,
                        expires,
                    )
                })
                .collect();
            let json = json_text(&json)?;
            // `WHERE true`: SQLite's INSERT … SELECT needs one before an upsert clause.
            let insert = diesel::sql_query(
                "INSERT INTO credentials (app_id, openid, kind, value, uses_total, uses_left, \
                 issued_at, expires_at, created_at, updated_at) \
                 SELECT r->>0, r->>1, r->>2, r->>3, r->>4, r->>4, r->>5, r->>6, ?2, ?2 \
                 FROM (SELECT value AS r, key FROM json_each(?1)) WHERE true ORDER BY key \
                 ON CONFLICT DO NOTHING RETURNING app_id, value",
            )
            .bind::<Text, _>(json)
            .bind::<Timestamp, _>(now_db);
            cached(insert).load(lite)?
        }
    };
    let stored: HashSet<(String, String)> =
        stored.into_iter().map(|s| (s.app_id, s.value)).collect();
    Ok(rows
        .iter()
        .map(|(_, r)| stored.contains(&(r.app_id.to_string(), value(r).to_string())))
        .collect())
}

/// `NaiveDateTime`s in the text diesel stores on SQLite (`%F %T%.f`), the format
/// parsed once and the last value of each distinct instant reused.
#[derive(Default)]
struct SqliteTimestamps {
    items: Vec<chrono::format::Item<'static>>,
    last: Vec<(chrono::NaiveDateTime, String)>,
}

impl SqliteTimestamps {
    fn format(&mut self, t: chrono::NaiveDateTime) -> String {
        if let Some((_, s)) = self.last.iter().find(|(at, _)| *at == t) {
            return s.clone();
        }
        if self.items.is_empty() {
            self.items = chrono::format::StrftimeItems::new("%F %T%.f")
                .parse_to_owned()
                .unwrap_or_default();
        }
        let s = t.format_with_items(self.items.iter()).to_string();
        if self.last.len() >= 8 {
            self.last.remove(0);
        }
        self.last.push((t, s.clone()));
        s
    }
}

type Users<'a> = BTreeMap<(&'a str, &'a str), Vec<Valid<'a>>>;
/// (template id, result) → times reported, for one user.
type Results<'a> = BTreeMap<(&'a str, &'a str), i64>;

/// Validates one request's items: the valid ones grouped by user (in a fixed
/// order), the rest rejected into `outcome`.
fn prepare<'a>(
    reports: &'a [Report],
    rules: &Rules,
    now: DateTime<Utc>,
    outcome: &mut RecordOutcome,
) -> Users<'a> {
    let mut users: Users<'a> = BTreeMap::new();
    for report in reports {
        let (app_id, openid) = (report.app_id.as_str(), report.openid.as_str());
        let items = users.entry((app_id, openid)).or_default();
        for item in &report.items {
            match validate(item, rules, now) {
                Ok(valid) => items.push(valid),
                Err(rejection) => outcome.rejected.push(rejection),
            }
        }
    }
    users.retain(|_, items| !items.is_empty());
    users
}

/// What the user's stored results say about the templates of `items`: how many
/// distinct templates the user has, and which of these are among them. Bounded
/// by the report, however many templates an old row set holds.
struct KnownTemplates {
    count: i64,
    reported: HashSet<String>,
}

fn known_templates(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    items: &[Valid<'_>],
) -> DbResult<KnownTemplates> {
    use crate::db::schema::subscription_results::dsl as r;
    let mut templates: Vec<&str> = items
        .iter()
        .filter_map(|item| match item {
            Valid::Result { template_id, .. } => Some(*template_id),
            Valid::Token(_) => None,
        })
        .collect();
    if templates.is_empty() {
        return Ok(KnownTemplates {
            count: 0,
            reported: HashSet::new(),
        });
    }
    templates.sort_unstable();
    templates.dedup();
    let (count, reported): (i64, Vec<String>) = dispatch!(conn, |c| {
        let user = r::subscription_results
            .filter(r::app_id.eq(app_id))
            .filter(r::openid.eq(openid));
        let count = user
            .select(diesel::dsl::count(r::template_id).aggregate_distinct())
            .get_result(c)?;
        let reported = user
            .filter(r::template_id.eq_any(&templates))
            .select(r::template_id)
            .distinct()
            .load(c)?;
        (count, reported)
    });
    Ok(KnownTemplates {
        count,
        reported: reported.into_iter().collect(),
    })
}

/// One user's valid items, in order, against the cap on distinct templates: a
/// result for a template the user already has, or for a new one while there is
/// room, is counted (and an `accept` becomes a subscription to store); a result for
/// a new template beyond the cap is rejected (`template_cap`) and counted nowhere.
/// Returns the credentials to store and the results to count.
fn admit<'a>(
    items: &[Valid<'a>],
    known: &KnownTemplates,
    rules: &Rules,
    now: DateTime<Utc>,
    outcome: &mut RecordOutcome,
) -> (Vec<Candidate<'a>>, Results<'a>) {
    let mut room = i64::from(rules.subscription_templates_per_user) - known.count;
    let mut admitted: HashSet<&str> = HashSet::new();
    let mut candidates = Vec::with_capacity(items.len());
    let mut results = Results::new();
    let reject = |template_id: &str, reason| Rejection {
        value: template_id.to_string(),
        reason,
    };
    for item in items {
        let (template_id, result) = match *item {
            Valid::Token(candidate) => {
                candidates.push(candidate);
                continue;
            }
            Valid::Result {
                template_id,
                result,
            } => (template_id, result),
        };
        if !known.reported.contains(template_id) && !admitted.contains(template_id) {
            if room <= 0 {
                outcome
                    .rejected
                    .push(reject(template_id, RejectReason::TemplateCap));
                continue;
            }
            room -= 1;
            admitted.insert(template_id);
        }
        *results.entry((template_id, result)).or_default() += 1;
        if result == "accept" {
            candidates.push(Candidate {
                kind: Kind::Subscription,
                value: None,
                template_id: Some(template_id),
                uses: 1,
                issued_at: now,
                expires_at: None,
            });
        } else {
            outcome
                .rejected
                .push(reject(template_id, RejectReason::NotAccepted));
        }
    }
    (candidates, results)
}

/// PostgreSQL: serialises reports of these users (sorted), so the per-user cap holds
/// under concurrency: one statement for all of them, which takes the locks in the
/// order given (unnest yields its rows in array order). SQLite's write transaction
/// already serialises everything.
pub(super) fn lock_users(conn: &mut DbConn, users: &[(&str, &str)]) -> DbResult<()> {
    use diesel::sql_types::{Array, Text};
    if let DbConn::Pg(pg) = conn {
        let (apps, openids): (Vec<&str>, Vec<&str>) = users.iter().copied().unzip();
        diesel::sql_query(
            "SELECT pg_advisory_xact_lock(hashtextextended(a || chr(31) || o, 0)) \
             FROM unnest($1::text[], $2::text[]) AS u(a, o)",
        )
        .bind::<Array<Text>, _>(apps)
        .bind::<Array<Text>, _>(openids)
        .execute(pg)?;
    }
    Ok(())
}

pub(super) fn count_results(
    conn: &mut DbConn,
    app_id: &str,
    openid: &str,
    results: &Results<'_>,
    now: DateTime<Utc>,
) -> DbResult<()> {
    use crate::db::schema::subscription_results::dsl as r;
    use diesel::upsert::excluded;
    for ((template_id, result), n) in results {
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

fn validate<'a>(item: &'a Item, rules: &Rules, now: DateTime<Utc>) -> Result<Valid<'a>, Rejection> {
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
            Ok(Valid::Token(Candidate {
                kind: *kind,
                value: Some(value),
                template_id: None,
                uses: i32::try_from(uses).unwrap_or(i32::MAX),
                issued_at,
                expires_at: Some(expires_at),
            }))
        }
        Item::Subscription {
            template_id,
            result,
        } => {
            if !is_valid_value(template_id) {
                return Err(reject(template_id, RejectReason::InvalidFormat));
            }
            if !SUBSCRIPTION_RESULTS.contains(&result.as_str()) {
                return Err(reject(template_id, RejectReason::InvalidResult));
            }
            Ok(Valid::Result {
                template_id,
                result,
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
        if let (Kind::Subscription, Some(template_id)) = (cand.kind, cand.template_id) {
            // The merge rule: WeChat pushed this grant already; it is one grant.
            if super::grants::match_reported(conn, app_id, openid, template_id, now)? {
                // The push counted this accept in the results: once per grant.
                let once = Results::from([((template_id, "accept"), -1)]);
                count_results(conn, app_id, openid, &once, now)?;
                outcome.accepted += 1;
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
            reported_at: (cand.kind == Kind::Subscription).then_some(now_db),
            pushed_at: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 8, 0, 0).unwrap()
    }

    fn sub(template_id: &str, result: &str) -> Item {
        Item::Subscription {
            template_id: template_id.into(),
            result: result.into(),
        }
    }

    #[test]
    fn only_the_four_subscription_results_are_taken() {
        let rules = Rules::default();
        for result in SUBSCRIPTION_RESULTS {
            let item = sub("TPL", result);
            assert_eq!(
                validate(&item, &rules, now()),
                Ok(Valid::Result {
                    template_id: "TPL",
                    result
                })
            );
        }
        for result in ["Accept", "accepted", "x", "", "rejectban"] {
            let rejection = validate(&sub("TPL", result), &rules, now()).unwrap_err();
            assert_eq!(
                (rejection.value.as_str(), rejection.reason),
                ("TPL", RejectReason::InvalidResult),
                "{result:?}"
            );
        }
        let bad_template = validate(&sub("has space", "accept"), &rules, now()).unwrap_err();
        assert_eq!(bad_template.reason, RejectReason::InvalidFormat);
    }

    #[test]
    fn new_templates_beyond_the_cap_are_neither_counted_nor_granted() {
        let rules = Rules {
            subscription_templates_per_user: 3,
            ..Rules::default()
        };
        let result = |template_id, result| Valid::Result {
            template_id,
            result,
        };
        // The user has results for 2 templates, OLD among them: room for one more.
        let known = KnownTemplates {
            count: 2,
            reported: HashSet::from(["OLD".to_string()]),
        };
        let items = [
            result("NEW1", "reject"),
            result("NEW2", "accept"),
            result("OLD", "accept"),
            result("NEW1", "accept"),
            result("NEW3", "ban"),
        ];
        let mut outcome = RecordOutcome::default();
        let (candidates, results) = admit(&items, &known, &rules, now(), &mut outcome);
        let granted: Vec<_> = candidates.iter().map(|c| c.template_id).collect();
        assert_eq!(granted, vec![Some("OLD"), Some("NEW1")]);
        assert_eq!(
            results,
            Results::from([
                (("NEW1", "accept"), 1),
                (("NEW1", "reject"), 1),
                (("OLD", "accept"), 1),
            ])
        );
        let rejected: Vec<_> = outcome
            .rejected
            .iter()
            .map(|r| (r.value.as_str(), r.reason))
            .collect();
        assert_eq!(
            rejected,
            vec![
                ("NEW1", RejectReason::NotAccepted),
                ("NEW2", RejectReason::TemplateCap),
                ("NEW3", RejectReason::TemplateCap),
            ]
        );
        // A user already at (or, from rows stored before the cap, over) the cap
        // still reports for the templates they have.
        let full = KnownTemplates {
            count: 500,
            reported: HashSet::from(["OLD".to_string()]),
        };
        let mut outcome = RecordOutcome::default();
        let (candidates, results) = admit(&items, &full, &rules, now(), &mut outcome);
        assert_eq!(candidates.len(), 1);
        assert_eq!(results, Results::from([(("OLD", "accept"), 1)]));
        assert_eq!(outcome.rejected.len(), 4);
    }

    /// The JSON insert writes timestamps as text itself: it must be the text diesel
    /// binds everywhere else, or SQLite's text comparisons (`expires_at > ?`) and the
    /// oldest-first order would be wrong for these rows.
    #[test]
    fn sqlite_timestamps_are_the_text_diesel_binds() {
        use diesel::sql_types::{Text, Timestamp};
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = Text)]
            t: String,
        }
        let mut conn = diesel::SqliteConnection::establish(":memory:").unwrap();
        let mut ours = SqliteTimestamps::default();
        for nanos in [0, 5_000_000, 123_456_000, 1, 999_999_999] {
            let at = to_db(now()) + chrono::Duration::nanoseconds(nanos);
            let theirs: Row = diesel::sql_query("SELECT CAST(? AS TEXT) AS t")
                .bind::<Timestamp, _>(at)
                .get_result(&mut conn)
                .unwrap();
            assert_eq!(ours.format(at), theirs.t, "{nanos} ns");
            assert_eq!(ours.format(at), theirs.t, "{nanos} ns, reused");
        }
    }
}
