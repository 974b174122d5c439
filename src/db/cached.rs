//! Statements kept prepared although diesel would not keep them.
//!
//! diesel's statement cache is keyed by a query's type or, failing that, by its SQL
//! text, but it refuses every `UPDATE` and every `sql_query` outright: their text
//! *may* vary with the values bound (an `IN` list, a changeset with `None`s), and a
//! cache keyed by text would then grow with each variant. A hot statement whose
//! text is fixed — a claim, a settlement, an ingest insert — is then parsed
//! and planned again on every execution. On SQLite that was most of a message's
//! cost: `perf` of the drain (10,000 messages) found 37 % of the service's CPU in
//! `sqlite3_prepare_v3`, most of it the code generation of `RETURNING` clauses.
//!
//! [`Cached`] vouches for a statement: its text depends only on the code path, never
//! on the values, so it is prepared once per connection and text, and reused.
//! Never wrap a statement with `eq_any` (an `IN` list as long as the values) or a
//! multi-row insert: pass a list as one array (PostgreSQL) or JSON (SQLite) value.
//!
//! Only the loading calls keep it (`load`, `get_result`, `get_results`): diesel's
//! `execute` takes the statement by reference, and a reference asks the statement
//! inside, which says no. A statement whose changed rows matter returns them
//! (`RETURNING id`) and counts what it loads.

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::{QueryResult, RunQueryDsl};

/// A statement whose SQL text is fixed for its code path: kept in the connection's
/// statement cache, keyed by that text. Build it with [`cached`].
#[derive(Debug, Clone, Copy)]
pub struct Cached<Q>(Q);

/// Marks `query` as safe to keep prepared (see the module's documentation).
pub fn cached<Q>(query: Q) -> Cached<Q> {
    Cached(query)
}

impl<Q> QueryId for Cached<Q> {
    // Keyed by text: the same type may carry different SQL (per backend, per path).
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Cached<Q> {
    type SqlType = Q::SqlType;
}

impl<Q, DB> QueryFragment<DB> for Cached<Q>
where
    Q: QueryFragment<DB>,
    DB: Backend,
{
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &DB) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q, Conn> RunQueryDsl<Conn> for Cached<Q> {}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use diesel::connection::{Connection, InstrumentationEvent, SimpleConnection};
    use diesel::sql_types::Integer;
    use diesel::sqlite::SqliteConnection;
    use diesel::OptionalExtension;

    use super::*;

    /// Runs `statement` three times on a fresh connection; returns how many times
    /// diesel put a statement into its cache.
    fn cache_entries<T>(statement: impl Fn(&mut SqliteConnection) -> QueryResult<T>) -> usize {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        conn.batch_execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            .unwrap();
        let cached = Arc::new(Mutex::new(0));
        let count = cached.clone();
        conn.set_instrumentation(move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::CacheQuery { .. } = event {
                *count.lock().unwrap() += 1;
            }
        });
        for _ in 0..3 {
            statement(&mut conn).unwrap();
        }
        let entries = *cached.lock().unwrap();
        entries
    }

    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Integer, column_name = n)]
        _n: i32,
    }

    #[test]
    fn a_vouched_for_statement_is_prepared_once_and_kept() {
        let update =
            |by| diesel::sql_query("UPDATE t SET n = n + ? RETURNING n").bind::<Integer, _>(by);
        let load = |c: &mut SqliteConnection| update(1).load::<Row>(c);
        assert_eq!(
            cache_entries(load),
            0,
            "diesel alone prepares it every time"
        );
        let load = |c: &mut SqliteConnection| cached(update(1)).load::<Row>(c);
        assert_eq!(cache_entries(load), 1);
        let get = |c: &mut SqliteConnection| cached(update(1)).get_result::<Row>(c).optional();
        assert_eq!(cache_entries(get), 1);
    }
}
