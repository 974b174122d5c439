//! The database: one binary, SQLite or PostgreSQL chosen by the URL.
//!
//! Queries are written once against concrete connections through [`dispatch!`]; a
//! backend-specific branch exists only where the SQL differs (locking, transactions).

mod cached;
pub mod schema;
mod turns;

pub use cached::cached;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::prelude::*;
use diesel::r2d2::{CustomizeConnection, ManageConnection, Pool, PooledConnection, R2D2Connection};
use diesel::result::DatabaseErrorKind;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::secret::Secret;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// A connection that did its last work without an error less than this long ago is
/// used again without the `SELECT 1` that tests it, in the pool ([`PoolConn`]) and
/// in the ingest writers: under load that test was one round trip of every
/// request's two or three. After a longer pause, or an error, it is tested first.
pub const RECHECK_AFTER: Duration = Duration::from_millis(250);

/// Any lock id will do as long as it is this service's own.
const MIGRATION_LOCK: i64 = 0x666f_726d_6964; // "formid"

/// Where the database is (`LEDGER_DATABASE_URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH` (relative paths are relative to the working directory).
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`, passed to libpq as is (so `sslmode`,
    /// `sslrootcert` and every other libpq parameter work).
    Postgres(Secret),
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("sqlite:// needs a file path, e.g. sqlite://data/ledger.db".into());
            }
            Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(Secret::new(url)))
        } else {
            Err("expected sqlite://PATH or postgres://…".into())
        }
    }
}

#[derive(diesel::MultiConnection)]
pub enum DbConn {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

/// Runs `$body` with `$c` bound to the concrete connection of either backend, so a
/// query is written once and compiled for both. `$conn` is a `&mut DbConn` or
/// anything that derefs to one (a pooled connection).
#[macro_export]
macro_rules! dispatch {
    ($conn:expr, |$c:ident| $body:expr) => {
        match {
            let conn: &mut $crate::db::DbConn = $conn;
            conn
        } {
            $crate::db::DbConn::Pg($c) => $body,
            $crate::db::DbConn::Sqlite($c) => $body,
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection within the pool's timeout, or the database does not answer.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Query(diesel::result::Error),
    /// A stored row the code cannot read (an unknown kind or status, a body that does
    /// not parse): a bug or a hand-edited database, reported, never guessed around.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type DbResult<T> = Result<T, DbError>;

impl From<diesel::result::Error> for DbError {
    /// A connection the server closed (a restart, a dropped database, a network
    /// cut) is the database not answering, wherever the query ran.
    fn from(e: diesel::result::Error) -> Self {
        match e {
            diesel::result::Error::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
                DbError::Unavailable(info.message().to_string())
            }
            e => DbError::Query(e),
        }
    }
}

/// SQLite: WAL pages past which a commit checkpoints them itself (SQLite's own
/// default is 1,000, about 4 MB).
const WAL_BACKSTOP_PAGES: u32 = 10_000;

/// SQLite: how often the checkpoint thread moves the WAL into the database file.
const WAL_CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Per-connection settings. SQLite: WAL so readers never wait for the writer, a busy
/// timeout so writers queue instead of failing, foreign keys on. PostgreSQL: custom
/// plans (below).
#[derive(Debug, Clone, Copy)]
struct ConnectionSetup;

impl CustomizeConnection<PoolConn, diesel::r2d2::Error> for ConnectionSetup {
    fn on_acquire(&self, conn: &mut PoolConn) -> Result<(), diesel::r2d2::Error> {
        self.on_acquire(&mut conn.conn)
    }
}

impl CustomizeConnection<DbConn, diesel::r2d2::Error> for ConnectionSetup {
    fn on_acquire(&self, conn: &mut DbConn) -> Result<(), diesel::r2d2::Error> {
        if let DbConn::Pg(c) = conn {
            // Every per-user statement is prepared once per connection; a generic
            // plan chosen while the table was empty or unanalyzed would scan the
            // whole app for each of them (measured: 7,597 seq scans over 29.7 M rows
            // for 8,000 ingests). Planning each execution for its values costs
            // ~0.05 ms and keeps every query on its index.
            c.batch_execute("SET plan_cache_mode = force_custom_plan")
                .map_err(diesel::r2d2::Error::QueryError)?;
        }
        if let DbConn::Sqlite(c) = conn {
            // synchronous=NORMAL in WAL mode: a commit survives the process being
            // killed (what the chaos tests do); only an OS crash can lose the last ones.
            // The WAL is moved into the database file by a thread of its own
            // (`Db::spawn_wal_checkpoints`), not by the commit that crosses
            // SQLite's 1,000 pages; a commit still does it past the backstop, should
            // that thread fall behind or not run (the CLI, a test's Db).
            c.batch_execute(&format!(
                "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
                 PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
                 PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES};"
            ))
            .map_err(diesel::r2d2::Error::QueryError)?;
        }
        Ok(())
    }
}

/// Initialises the OpenSSL that libpq uses, without OpenSSL's exit handler; call
/// before any PostgreSQL connection (the pool's manager does). By default OpenSSL 3
/// frees its global state in an `atexit` handler while other threads may still be
/// in it (a pool's worker opening a connection, the sender's LISTEN thread): the
/// test binary died "double free or corruption (fasttop)" at exit, after every test
/// had passed, once in seven runs here (gdb: `OPENSSL_cleanup` under `exit` with
/// `r2d2-worker-*` and `sender-listen` threads alive). The first initialisation
/// decides, and `openssl_sys::init` asks for `OPENSSL_INIT_NO_ATEXIT`; the OS frees
/// the memory at exit anyway.
pub fn init_libpq_tls() {
    openssl_sys::init();
}

/// Opens connections of the URL's backend. diesel's `ConnectionManager<DbConn>` (the
/// `MultiConnection` derive) tries each backend in turn and reports only "Invalid
/// connection url for multiconnection", hiding libpq's reason: a wrong password, a
/// server certificate that does not verify. This one keeps the reason (with the
/// URL's secrets redacted by the callers).
#[derive(Clone)]
pub struct Manager {
    url: String,
    backend: Backend,
}

impl Manager {
    fn open(&self) -> Result<DbConn, diesel::r2d2::Error> {
        match self.backend {
            Backend::Postgres => {
                init_libpq_tls();
                PgConnection::establish(&self.url).map(DbConn::Pg)
            }
            Backend::Sqlite => SqliteConnection::establish(&self.url).map(DbConn::Sqlite),
        }
        .map_err(diesel::r2d2::Error::ConnectionError)
    }
}

impl ManageConnection for Manager {
    type Connection = PoolConn;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<PoolConn, Self::Error> {
        self.open().map(|conn| PoolConn {
            conn,
            answered: None,
        })
    }

    /// The test at checkout, skipped for a connection that answered [`Db::run`]
    /// within [`RECHECK_AFTER`]. A checkout spends that mark, so whoever takes the
    /// connection next after [`Db::get`] (whose user may have met an error) tests it.
    fn is_valid(&self, conn: &mut PoolConn) -> Result<(), Self::Error> {
        if conn
            .answered
            .take()
            .is_some_and(|at| at.elapsed() < RECHECK_AFTER)
        {
            return Ok(());
        }
        conn.conn.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut PoolConn) -> bool {
        std::thread::panicking() || conn.conn.is_broken()
    }
}

/// A connection of the pool, and when it last finished a [`Db::run`] without an
/// error. Used as the [`DbConn`] it holds.
pub struct PoolConn {
    conn: DbConn,
    answered: Option<Instant>,
}

impl Deref for PoolConn {
    type Target = DbConn;

    fn deref(&self) -> &DbConn {
        &self.conn
    }
}

impl DerefMut for PoolConn {
    fn deref_mut(&mut self) -> &mut DbConn {
        &mut self.conn
    }
}

/// The parts of a PostgreSQL URL that must not reach a log: the password of its user
/// part and the values of its `password` and `sslpassword` parameters, as written and
/// percent-decoded. libpq quotes a malformed URL whole, or its bad token, in its error
/// messages ("invalid percent-encoded token: …", "unexpected character … in URI: …"),
/// and r2d2 logs every failed connection, so each such message passes through
/// [`Redactions::apply`]. The URL is scanned leniently by hand: a URL parser would
/// reject exactly the malformed URLs whose passwords libpq echoes.
#[derive(Clone, Default)]
struct Redactions(Arc<[String]>);

impl Redactions {
    fn of(url: &str) -> Redactions {
        let mut found: Vec<&str> = Vec::new();
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        // The user part ends at the last '@' before the query; with none there, a raw
        // '?' in the password split it, and the last '@' of all is the one.
        let scope = if before_query.contains('@') {
            before_query
        } else {
            rest
        };
        if let Some((userinfo, _)) = scope.rsplit_once('@') {
            if let Some((_, password)) = userinfo.split_once(':') {
                found.push(password);
            }
        }
        for pair in query.split('&') {
            if let Some((key, value)) = pair.split_once('=') {
                if key == "password" || key == "sslpassword" {
                    found.push(value);
                }
            }
        }
        let mut all: Vec<String> = found
            .iter()
            .flat_map(|raw| [raw.to_string(), percent_decoded(raw)])
            .filter(|s| !s.is_empty())
            .collect();
        // Longest first, so a password containing another is replaced whole.
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
        all.dedup();
        Redactions(all.into())
    }

    /// `text` with every secret replaced (and libpq's trailing newline trimmed).
    fn apply(&self, mut text: String) -> String {
        for secret in self.0.iter() {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "[redacted]");
            }
        }
        text.truncate(text.trim_end().len());
        text
    }

    /// The database is unavailable, for the reason `error` gives, secrets removed.
    fn unavailable(&self, error: impl fmt::Display) -> DbError {
        DbError::Unavailable(self.apply(error.to_string()))
    }
}

impl fmt::Debug for Redactions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactions({} redacted)", self.0.len())
    }
}

/// `%XX` decoded; anything else (a bad escape included) kept as it is.
fn percent_decoded(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// r2d2 logs each failed connection attempt; this logs it with the URL's secrets
/// redacted (r2d2's own handler would print libpq's message as is).
#[derive(Debug)]
struct LogRedacted(Redactions);

impl diesel::r2d2::HandleError<diesel::r2d2::Error> for LogRedacted {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        log::error!(
            "database connection failed: {}",
            self.0.apply(error.to_string())
        );
    }
}

/// The pool, shared by every request and background task of one instance.
#[derive(Clone)]
pub struct Db {
    /// The pool, and how its errors are told.
    checkout: Checkout,
    /// The queue of [`Db::run`]: served in arrival order by threads of their own,
    /// one per pooled connection ([`start_runners`]).
    runs: tokio::sync::mpsc::UnboundedSender<Run>,
    /// Opens the connections of [`Db::dedicated`].
    manager: Manager,
    backend: Backend,
}

/// How long a connection may take: the pool's checkout, and libpq's own connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Db::run`] in the queue, given the pool by the thread that takes it.
type Run = Box<dyn FnOnce(&Checkout) + Send>;

/// What a thread needs to check out connections: the pool, and the URL's secrets to
/// keep out of its errors.
#[derive(Clone)]
struct Checkout {
    pool: Pool<Manager>,
    redactions: Redactions,
}

impl Checkout {
    fn within(&self, timeout: Duration) -> DbResult<PooledConnection<Manager>> {
        self.pool
            .get_timeout(timeout)
            .map_err(|e| self.redactions.unavailable(e))
    }
}

/// Starts the `n` threads that serve [`Db::run`]: each takes the oldest waiting run,
/// checks out a connection, runs it and answers, then takes the next one at once if
/// another is waiting. Under load a run costs no hand-over to a blocking pool and
/// no turn to be woken for, and no newcomer takes a connection before a run that
/// waited. The threads end when the last [`Db`] (the queue's sender) is gone.
fn start_runners(checkout: &Checkout, n: u32) -> DbResult<tokio::sync::mpsc::UnboundedSender<Run>> {
    let (runs, queue) = tokio::sync::mpsc::unbounded_channel::<Run>();
    let queue = Arc::new(Mutex::new(queue));
    for i in 0..n {
        let (checkout, queue) = (checkout.clone(), Arc::clone(&queue));
        std::thread::Builder::new()
            .name(format!("db-run-{i}"))
            .spawn(move || loop {
                let next = queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .blocking_recv();
                let Some(run) = next else { return };
                // A panic inside a run drops its answer (the caller sees the run
                // fail); the thread goes on with the next one.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(|| run(&checkout)));
            })
            .map_err(|e| DbError::Unavailable(format!("no database thread: {e}")))?;
    }
    Ok(runs)
}

/// Where a [`Db::run`] stands: waiting, taken by a thread, or given up by its caller
/// (a thread that meets it then skips it).
const WAITING: u8 = 0;
const TAKEN: u8 = 1;
const GIVEN_UP: u8 = 2;

/// The PostgreSQL URL with libpq's `connect_timeout`, unless it sets its own. Without
/// one, libpq waits for a server that accepted the connection but does not answer
/// (or a host that drops packets) as long as the OS lets it: the pool's checkout
/// gives up after [`CONNECT_TIMEOUT`], but a connection of its own
/// ([`Db::dedicated`], an ingest writer's) would hang, and reports queue behind it.
fn with_connect_timeout(url: &str) -> String {
    let timeout = format!("connect_timeout={}", CONNECT_TIMEOUT.as_secs());
    let Some(start) = query_start(url) else {
        return format!("{url}?{timeout}");
    };
    let query = &url[start + 1..];
    if query
        .split('&')
        .any(|pair| pair.starts_with("connect_timeout="))
    {
        return url.to_string();
    }
    let separator = if query.is_empty() || query.ends_with('&') {
        ""
    } else {
        "&"
    };
    format!("{url}{separator}{timeout}")
}

/// Where the query of a PostgreSQL URL starts (its `?`), found as libpq finds it: the
/// user's credentials end at an `@` met before any `/`, so a raw `?` in a password
/// is not the query's.
fn query_start(url: &str) -> Option<usize> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let host = match url[start..].find(['@', '/']) {
        Some(i) if url[start + i..].starts_with('@') => start + i + 1,
        _ => start,
    };
    url[host..].find('?').map(|i| host + i)
}

impl Db {
    /// Builds the pool (and for SQLite creates the file and its folder, owner-only).
    /// Does not connect
    /// eagerly beyond one connection, so a down database is reported at once.
    pub fn connect(url: &DatabaseUrl, max_size: u32) -> DbResult<Db> {
        let (conn_url, backend, redactions) = match url {
            DatabaseUrl::Sqlite(path) => {
                owner_only_sqlite_file(path)?;
                let url = format!("sqlite://{}", path.display());
                (url, Backend::Sqlite, Redactions::default())
            }
            DatabaseUrl::Postgres(url) => {
                let url = url.expose();
                (
                    with_connect_timeout(url),
                    Backend::Postgres,
                    Redactions::of(url),
                )
            }
        };
        let manager = Manager {
            url: conn_url,
            backend,
        };
        let pool = Pool::builder()
            .max_size(max_size)
            .min_idle(Some(1))
            .connection_timeout(CONNECT_TIMEOUT)
            .connection_customizer(Box::new(ConnectionSetup))
            .error_handler(Box::new(LogRedacted(redactions.clone())))
            .build(manager.clone())
            .map_err(|e| redactions.unavailable(e))?;
        let checkout = Checkout { pool, redactions };
        let runs = start_runners(&checkout, max_size)?;
        Ok(Db {
            checkout,
            runs,
            manager,
            backend,
        })
    }

    /// (open connections, idle connections) of this pool.
    pub fn pool_state(&self) -> (u32, u32) {
        let state = self.checkout.pool.state();
        (state.connections, state.idle_connections)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A connection for synchronous code (CLI, tests, background threads).
    pub fn get(&self) -> DbResult<PooledConnection<Manager>> {
        self.checkout.within(CONNECT_TIMEOUT)
    }

    /// A connection of its own, beside the pool and set up as the pool's are, for a
    /// thread that writes all the time (the ingest writers): it neither waits for
    /// the pool nor takes a connection from the pool's other users. Its owner tests
    /// it after a pause ([`Db::answers`]) and drops it after an error.
    pub fn dedicated(&self) -> DbResult<DbConn> {
        let unavailable = |e| self.checkout.redactions.unavailable(e);
        let mut conn = self.manager.open().map_err(unavailable)?;
        ConnectionSetup.on_acquire(&mut conn).map_err(unavailable)?;
        Ok(conn)
    }

    /// SQLite: checkpoints the WAL every [`WAL_CHECKPOINT_EVERY`] on a connection of
    /// its own until `stop` says so (or its sender is gone); PostgreSQL: nothing.
    ///
    /// Left to SQLite, the commit that crosses 1,000 WAL pages copies them into the
    /// database file and syncs it before it returns: on the ingest writer, about
    /// every tenth group of a busy moment waited for that. A passive checkpoint
    /// here waits for no writer and no reader, and a writer appends meanwhile.
    pub fn spawn_wal_checkpoints(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<std::thread::JoinHandle<()>> {
        if self.backend != Backend::Sqlite {
            return None;
        }
        let db = self.clone();
        let spawned = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let mut conn: Option<DbConn> = None;
                loop {
                    std::thread::sleep(WAL_CHECKPOINT_EVERY);
                    if *stop.borrow() || stop.has_changed().is_err() {
                        return;
                    }
                    if conn.is_none() {
                        match db.dedicated() {
                            Ok(c) => conn = Some(c),
                            Err(e) => {
                                log::warn!("WAL checkpoints: no connection: {e}");
                                continue;
                            }
                        }
                    }
                    let Some(DbConn::Sqlite(c)) = conn.as_mut() else {
                        return;
                    };
                    if let Err(e) = c.batch_execute("PRAGMA wal_checkpoint(PASSIVE)") {
                        log::warn!("WAL checkpoint failed: {e}");
                        conn = None;
                    }
                }
            });
        match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                log::warn!("no WAL checkpoint thread ({e}): commits checkpoint past the backstop");
                None
            }
        }
    }

    /// Whether a connection still answers: the test the pool makes at checkout.
    pub fn answers(&self, conn: &mut DbConn) -> bool {
        conn.ping().is_ok()
    }

    /// Runs `f` with a pooled connection on a thread of the pool's own, never on an
    /// async worker, after the runs that asked before it. No connection within
    /// [`CONNECT_TIMEOUT`] (the wait for a thread and the checkout together), or a
    /// connection the server closed, is [`DbError::Unavailable`]; a run that was not
    /// taken within it never runs. A caller that goes away before its run is taken
    /// (a client hung up) leaves nothing to run either.
    pub async fn run<T, F>(&self, f: F) -> DbResult<T>
    where
        F: FnOnce(&mut DbConn) -> DbResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let asked = Instant::now();
        let state = Arc::new(AtomicU8::new(WAITING));
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        let run: Run = Box::new({
            let state = Arc::clone(&state);
            move |checkout| {
                let taken =
                    state.compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire);
                if taken.is_err() || reply.is_closed() {
                    return;
                }
                let result = checkout
                    .within(CONNECT_TIMEOUT.saturating_sub(asked.elapsed()))
                    .and_then(|mut conn| {
                        let result = f(&mut conn);
                        if result.is_ok() {
                            conn.answered = Some(Instant::now());
                        }
                        result
                    });
                let _ = reply.send(result);
            }
        });
        let failed = |_| DbError::Unavailable("database run failed".into());
        self.runs
            .send(run)
            .map_err(|_| DbError::Unavailable("database threads stopped".into()))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, &mut answer).await {
            Ok(answered) => answered.map_err(failed)?,
            Err(_) => {
                let gave_up =
                    state.compare_exchange(WAITING, GIVEN_UP, Ordering::AcqRel, Ordering::Acquire);
                if gave_up.is_ok() {
                    return Err(DbError::Unavailable(format!(
                        "no connection free within {CONNECT_TIMEOUT:?}: every one is in use"
                    )));
                }
                // Taken already: it runs to its end, and its caller learns how it went.
                answer.await.map_err(failed)?
            }
        }
    }

    /// Applies the embedded migrations of this backend. On PostgreSQL several
    /// instances may start at once: an advisory lock lets one migrate at a time.
    pub fn migrate(&self) -> DbResult<Vec<String>> {
        let mut conn = self.get()?;
        let applied = match &mut **conn {
            DbConn::Pg(c) => {
                diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
                    .execute(c)?;
                let result = c.run_pending_migrations(PG_MIGRATIONS).map(names);
                diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
                    .execute(c)?;
                result
            }
            DbConn::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS).map(names),
        };
        applied.map_err(|e| DbError::Unavailable(format!("migration failed: {e}")))
    }
}

/// The SQLite file holds the session secret and access_tokens, so only its owner may
/// read it. A folder the service creates is 0700 (a folder that already exists is the
/// operator's choice and stays as it is); the file is created 0600, and made 0600 if
/// it exists, as are its `-wal` and `-shm` (SQLite gives those the file's mode when it
/// creates them). The path is the part of the URL before any `?` (SQLite's URI
/// parameters); an in-memory database has no file.
fn owner_only_sqlite_file(path: &Path) -> DbResult<()> {
    let text = path.to_string_lossy();
    let (file, params) = text.split_once('?').unwrap_or((&text, ""));
    if file.is_empty() || file == ":memory:" || params.contains("mode=memory") {
        return Ok(());
    }
    let file = Path::new(file);
    let failed = |what: &Path, e: std::io::Error| {
        DbError::Unavailable(format!("cannot create {}: {e}", what.display()))
    };
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut folder = std::fs::DirBuilder::new();
        folder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut folder, 0o700);
        folder.create(dir).map_err(|e| failed(dir, e))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // An empty file is a database SQLite fills on first use; another instance
        // creating it at the same moment is as good.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed(file, e)),
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut name = file.as_os_str().to_owned();
            name.push(suffix);
            let path = Path::new(&name);
            let owner_only = std::fs::Permissions::from_mode(0o600);
            match std::fs::set_permissions(path, owner_only) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot make {} owner-only: {e}", path.display()),
            }
        }
    }
    Ok(())
}

/// `SELECT 1`: does the database answer?
pub fn ping(conn: &mut DbConn) -> DbResult<()> {
    dispatch!(conn, |c| diesel::sql_query("SELECT 1").execute(c))?;
    Ok(())
}

fn names(versions: Vec<diesel::migration::MigrationVersion<'_>>) -> Vec<String> {
    versions.into_iter().map(|v| v.to_string()).collect()
}

/// Runs `f` in a write transaction: `BEGIN IMMEDIATE` on SQLite, so a read-then-write
/// takes the write lock up front and never fails on a lock upgrade, and begins after
/// the writers of this process that asked before it (`turns`); an ordinary
/// transaction on PostgreSQL (row locks do the rest there).
pub fn write_tx<T, E, F>(conn: &mut DbConn, f: F) -> Result<T, E>
where
    F: FnOnce(&mut DbConn) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    if sqlite_in_transaction(conn)?.unwrap_or(true) {
        // PostgreSQL, or already inside a (write) transaction: a savepoint suffices.
        return conn.transaction(f);
    }
    // SqliteConnection::immediate_transaction, but `f` gets the enum back. The state
    // lives in the inner connection's transaction manager, so nested transactions
    // inside `f` become savepoints as usual.
    fn inner(conn: &mut DbConn) -> &mut SqliteConnection {
        match conn {
            DbConn::Sqlite(c) => c,
            DbConn::Pg(_) => unreachable!("checked above"),
        }
    }
    // In this process, write transactions of one database begin in arrival order.
    let turns = turns_of(inner(conn))?;
    let _turn = turns.as_deref().and_then(|t| t.take(turns::TURN_WAIT));
    AnsiTransactionManager::begin_transaction_sql(inner(conn), "BEGIN IMMEDIATE")?;
    match f(conn) {
        Ok(value) => {
            AnsiTransactionManager::commit_transaction(inner(conn))?;
            Ok(value)
        }
        Err(e) => {
            AnsiTransactionManager::rollback_transaction(inner(conn))?;
            Err(e)
        }
    }
}

/// The write turns of a SQLite connection's database file (none for a database in
/// memory, which has no other connection).
fn turns_of(conn: &mut SqliteConnection) -> diesel::QueryResult<Option<Arc<turns::Turns>>> {
    #[derive(QueryableByName)]
    struct File {
        #[diesel(sql_type = diesel::sql_types::Text)]
        file: String,
    }
    let files: Vec<File> = cached(diesel::sql_query(
        "SELECT file FROM pragma_database_list WHERE name = 'main'",
    ))
    .load(conn)?;
    Ok(files
        .into_iter()
        .find(|f| !f.file.is_empty())
        .map(|f| turns::Turns::of(&f.file)))
}

/// Whether a SQLite connection is inside a transaction; None on PostgreSQL.
fn sqlite_in_transaction(conn: &mut DbConn) -> diesel::QueryResult<Option<bool>> {
    match conn {
        DbConn::Sqlite(c) => Ok(Some(
            AnsiTransactionManager::transaction_manager_status_mut(c)
                .transaction_depth()?
                .is_some(),
        )),
        DbConn::Pg(_) => Ok(None),
    }
}

/// Runs one read-then-write statement. SQLite: in an immediate transaction (a
/// deferred one could fail on upgrading its read snapshot), or as it is inside one
/// already (a statement is atomic: a savepoint would only add two statements).
/// PostgreSQL: as it is; a single statement is atomic and a transaction would only
/// add round trips.
pub fn single_write<T, E, F>(conn: &mut DbConn, f: F) -> Result<T, E>
where
    F: FnOnce(&mut DbConn) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    // Inside a transaction already, the statement is atomic without a savepoint.
    if sqlite_in_transaction(conn)? == Some(false) {
        write_tx(conn, f)
    } else {
        f(conn)
    }
}

/// The tail of a queue's "take the next due row" subquery: on PostgreSQL
/// `FOR UPDATE SKIP LOCKED`, so instances take different rows without waiting for
/// each other; on SQLite nothing (a write transaction is the whole database's).
pub fn skip_locked(conn: &DbConn) -> &'static str {
    match conn {
        DbConn::Pg(_) => " FOR UPDATE SKIP LOCKED",
        DbConn::Sqlite(_) => "",
    }
}

/// `value` as one JSON text: how a list reaches SQLite in a single parameter (read
/// back with `json_each`), so a statement's text does not grow with the list.
pub fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> diesel::QueryResult<String> {
    serde_json::to_string(value).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))
}

/// Raw SQL is written with PostgreSQL's `$N` parameters; SQLite numbers `$N` by first
/// appearance, so it gets the positional `?N` instead.
pub fn native_sql(conn: &DbConn, sql: &str) -> String {
    match conn {
        DbConn::Pg(_) => sql.to_string(),
        DbConn::Sqlite(_) => sql.replace('$', "?"),
    }
}

/// A secret the service generated and every instance shares (kept in the database:
/// the data folder on SQLite, the shared database on PostgreSQL). The first caller's
/// `fresh` value wins; everyone reads the stored one.
pub fn service_secret(
    conn: &mut DbConn,
    name: &str,
    fresh: impl FnOnce() -> String,
) -> DbResult<Secret> {
    use schema::service_secrets::dsl as s;
    let value = fresh();
    let now = crate::time::to_db(crate::time::now());
    let stored: String = dispatch!(conn, |c| {
        diesel::insert_into(s::service_secrets)
            .values((s::name.eq(name), s::value.eq(&value), s::created_at.eq(now)))
            .on_conflict_do_nothing()
            .execute(c)?;
        s::service_secrets
            .filter(s::name.eq(name))
            .select(s::value)
            .first(c)?
    });
    Ok(Secret::new(stored))
}

/// An app other than `app_id` that has rows in this database (a token, a credential
/// or a message), if any.
pub fn other_app(conn: &mut DbConn, app_id: &str) -> DbResult<Option<String>> {
    use schema::{access_tokens as t, credentials as c, messages as m};
    dispatch!(conn, |conn| {
        let token = t::table
            .filter(t::app_id.ne(app_id))
            .select(t::app_id)
            .first::<String>(conn)
            .optional()?;
        if token.is_some() {
            return Ok(token);
        }
        let credential = c::table
            .filter(c::app_id.ne(app_id))
            .select(c::app_id)
            .first::<String>(conn)
            .optional()?;
        if credential.is_some() {
            return Ok(credential);
        }
        Ok(m::table
            .filter(m::app_id.ne(app_id))
            .select(m::app_id)
            .first::<String>(conn)
            .optional()?)
    })
}

/// Deletes the rows of `table` matching `predicate` (raw SQL with `$1` bound to
/// `cutoff`), `batch` rows per statement so no lock is held for long; with
/// `dry_run`, only counts them. Returns how many rows (would) go.
pub fn purge_where(
    conn: &mut DbConn,
    table: &str,
    predicate: &str,
    cutoff: chrono::DateTime<chrono::Utc>,
    batch: u32,
    dry_run: bool,
) -> DbResult<u64> {
    purge_keyed(conn, table, "id", predicate, cutoff, batch, dry_run)
}

/// [`purge_where`] for a table whose rows are named by `key`: a column, or the
/// primary key's columns separated by commas (a row value, which both backends
/// compare with `IN`).
pub fn purge_keyed(
    conn: &mut DbConn,
    table: &str,
    key: &str,
    predicate: &str,
    cutoff: chrono::DateTime<chrono::Utc>,
    batch: u32,
    dry_run: bool,
) -> DbResult<u64> {
    use diesel::sql_types::{BigInt, Timestamp};
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let cutoff = crate::time::to_db(cutoff);
    if dry_run {
        let sql = native_sql(
            conn,
            &format!("SELECT COUNT(*) AS n FROM {table} WHERE {predicate}"),
        );
        let count: Count = dispatch!(conn, |c| diesel::sql_query(&sql)
            .bind::<Timestamp, _>(cutoff)
            .get_result(c))?;
        return Ok(u64::try_from(count.n).unwrap_or(0));
    }
    let sql = native_sql(
        conn,
        &format!(
            "DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {predicate} LIMIT $2)"
        ),
    );
    let mut total = 0u64;
    loop {
        let n = dispatch!(conn, |c| diesel::sql_query(&sql)
            .bind::<Timestamp, _>(cutoff)
            .bind::<BigInt, _>(i64::from(batch))
            .execute(c))?;
        total += n as u64;
        if n < batch as usize {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redactions_cover_the_password_as_written_and_decoded() {
        let r = Redactions::of(
            "postgres://ledger:pa%2Fss@db.example:5432/ledger?sslmode=require&sslpassword=keypass",
        );
        let message = r.apply("\"postgres://ledger:pa%2Fss@db.example\" pa/ss keypass".into());
        assert_eq!(
            message,
            "\"postgres://ledger:[redacted]@db.example\" [redacted] [redacted]"
        );
        // Raw delimiters in a password (malformed, and so echoed by libpq).
        let r = Redactions::of("postgres://ledger:a/b?c@db.example/ledger");
        assert_eq!(r.apply("x a/b?c y".into()), "x [redacted] y");
        let r = Redactions::of("postgresql://ledger@db.example/ledger?password=p%41ss");
        assert_eq!(r.apply("p%41ss pAss".into()), "[redacted] [redacted]");
        // No password: the user and host stay readable.
        let r = Redactions::of("postgres://ledger@db.example/ledger?sslmode=verify-full");
        assert_eq!(r.apply("ledger@db.example".into()), "ledger@db.example");
    }

    #[test]
    fn a_postgres_url_gets_a_connect_timeout_unless_it_has_one() {
        assert_eq!(
            with_connect_timeout("postgres://u@h/db"),
            "postgres://u@h/db?connect_timeout=5"
        );
        assert_eq!(
            with_connect_timeout("postgres://u@h/db?sslmode=require"),
            "postgres://u@h/db?sslmode=require&connect_timeout=5"
        );
        let own = "postgres://u@h/db?sslmode=require&connect_timeout=30";
        assert_eq!(with_connect_timeout(own), own);
        // A raw '?' in the password (libpq accepts it) is not the query.
        assert_eq!(
            with_connect_timeout("postgres://u:p?ss@h/db"),
            "postgres://u:p?ss@h/db?connect_timeout=5"
        );
        let own = "postgres://u:p?ss@h/db?connect_timeout=30";
        assert_eq!(with_connect_timeout(own), own);
        // An empty query, or one ending in '&', takes no extra separator.
        assert_eq!(
            with_connect_timeout("postgres://u@h/db?"),
            "postgres://u@h/db?connect_timeout=5"
        );
        assert_eq!(
            with_connect_timeout("postgres://u@h/db?sslmode=require&"),
            "postgres://u@h/db?sslmode=require&connect_timeout=5"
        );
    }

    /// Commits leave the WAL alone below the backstop (more pages than SQLite's
    /// default of 1,000 would have let them), and the checkpoint thread moves it
    /// into the database file, then stops when told.
    #[test]
    fn sqlite_wal_is_checkpointed_by_its_own_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let db = Db::connect(&DatabaseUrl::Sqlite(path.clone()), 2).unwrap();
        let mut conn = db.get().unwrap();
        conn.batch_execute("CREATE TABLE t (b BLOB NOT NULL)")
            .unwrap();
        let file_size = || std::fs::metadata(&path).unwrap().len();
        let before = file_size();
        // 600 commits of 6 kB each: about 1,800 WAL pages, each commit its own.
        for _ in 0..600 {
            conn.batch_execute("INSERT INTO t VALUES (randomblob(6000))")
                .unwrap();
        }
        assert_eq!(
            file_size(),
            before,
            "a commit checkpointed below the backstop"
        );

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let thread = db
            .spawn_wal_checkpoints(stopped)
            .expect("SQLite has the thread");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while file_size() < before + 3_000_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            file_size() >= before + 3_000_000,
            "the WAL was not checkpointed"
        );
        stop.send(true).unwrap();
        thread.join().unwrap();
    }

    /// Write transactions of one SQLite database, each on a connection of its own,
    /// begin in the order they asked (`turns`), not as SQLite's busy handler lets
    /// its sleepers in.
    #[test]
    fn sqlite_write_transactions_begin_in_the_order_they_asked() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseUrl::Sqlite(dir.path().join("ledger.db")), 1).unwrap();
        let mut first = db.dedicated().unwrap();
        first
            .batch_execute("CREATE TABLE t (n INTEGER NOT NULL)")
            .unwrap();
        let turns = match &mut first {
            DbConn::Sqlite(c) => turns_of(c).unwrap().expect("a file has turns"),
            DbConn::Pg(_) => unreachable!(),
        };
        let insert = |conn: &mut DbConn, n: i32| {
            write_tx(conn, |c| {
                c.batch_execute(&format!("INSERT INTO t VALUES ({n})"))
            })
        };
        // The first writer holds its transaction open until told.
        let (began, has_begun) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            write_tx(&mut first, |c| {
                c.batch_execute("INSERT INTO t VALUES (0)")?;
                began.send(()).unwrap();
                released.recv().unwrap();
                Ok::<_, diesel::result::Error>(())
            })
        });
        has_begun.recv().unwrap();
        let mut writers = Vec::new();
        for n in 1..=8 {
            let mut conn = db.dedicated().unwrap();
            writers.push(std::thread::spawn(move || insert(&mut conn, n)));
            turns.until_waiting(n as u64);
        }
        release.send(()).unwrap();
        holder.join().unwrap().unwrap();
        for w in writers {
            w.join().unwrap().unwrap();
        }
        let order: Vec<i32> = match &mut db.dedicated().unwrap() {
            DbConn::Sqlite(c) => {
                diesel::dsl::sql::<diesel::sql_types::Integer>("SELECT n FROM t ORDER BY rowid")
                    .load(c)
                    .unwrap()
            }
            DbConn::Pg(_) => unreachable!(),
        };
        assert_eq!(order, (0..=8).collect::<Vec<_>>());
    }

    /// A server that accepts the TCP connection and never answers (the kernel
    /// completes the handshake for a listener that never accepts): a connect with
    /// the URL as `Db::connect` rewrites it gives up (libpq's connect_timeout)
    /// instead of waiting for ever, as `Db::dedicated`'s would.
    #[test]
    fn a_postgres_connect_to_a_silent_server_gives_up() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "postgres://postgres@{}/ledger",
            silent.local_addr().unwrap()
        );
        let manager = Manager {
            url: with_connect_timeout(&url),
            backend: Backend::Postgres,
        };
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(manager.connect().is_ok());
        });
        // A bound on the test, not a timing claim: without the timeout it hangs.
        let connected = outcome.recv_timeout(Duration::from_secs(60));
        assert_eq!(
            connected,
            Ok(false),
            "the connect neither failed nor returned"
        );
        drop(silent);
    }

    /// libpq quotes these URLs (whole, or the bad token) in its error message.
    #[test]
    fn a_malformed_url_fails_without_its_password() {
        for (url, secret, says) in [
            (
                "postgres://ledger:se%zzcret@127.0.0.1:1/ledger",
                "se%zzcret",
                "percent-encoded",
            ),
            (
                "postgres://ledger:s3cret@[::1]x:1/ledger",
                "s3cret",
                "unexpected character",
            ),
        ] {
            let url = DatabaseUrl::parse(url).unwrap();
            let error = Db::connect(&url, 1).err().expect("a malformed URL fails");
            let error = error.to_string();
            assert!(error.contains(says), "{error}");
            assert!(error.contains("[redacted]"), "{error}");
            assert!(!error.contains(secret), "{error}");
        }
    }

    /// A pool of one connection, held by a run until the returned sender says
    /// release; the run's task answers once it has let go.
    async fn hold_the_only_connection(
        dir: &Path,
    ) -> (
        Db,
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<DbResult<()>>,
    ) {
        let db = Db::connect(&DatabaseUrl::Sqlite(dir.join("ledger.db")), 1).unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (took, taken) = tokio::sync::oneshot::channel();
        let busy = tokio::spawn({
            let db = db.clone();
            async move {
                db.run(move |_| {
                    took.send(()).unwrap();
                    held.recv().unwrap();
                    Ok(())
                })
                .await
            }
        });
        taken.await.unwrap();
        (db, release, busy)
    }

    /// Polls a run once: it has then asked, and waits behind the runs before it.
    fn ask<F: std::future::Future<Output = DbResult<()>>>(run: &mut std::pin::Pin<Box<F>>) {
        use std::task::{Context, Poll, Waker};
        let polled = run.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert!(matches!(polled, Poll::Pending));
    }

    /// While every connection is busy, a run waits for its turn, but no longer
    /// than a checkout would: it gives up as unavailable (503) while the busy run
    /// still holds the only connection, and the next run after it gets one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_that_gets_no_turn_gives_up_as_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let (db, release, busy) = hold_the_only_connection(dir.path()).await;
        let waited = db.run(ping).await;
        assert!(matches!(waited, Err(DbError::Unavailable(_))), "{waited:?}");
        assert!(
            !busy.is_finished(),
            "the busy run ended before the wait gave up"
        );
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        db.run(ping)
            .await
            .expect("a turn once the connection is back");
    }

    /// While every connection is busy, the runs that wait are served in the order
    /// they asked, not in whatever order threads happen to wake for a connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_runs_are_served_in_the_order_they_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (db, release, busy) = hold_the_only_connection(dir.path()).await;
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for i in 0..20 {
            let served = Arc::clone(&served);
            let mut run = Box::pin(db.run(move |_| {
                served.lock().unwrap().push(i);
                Ok(())
            }));
            ask(&mut run);
            waiting.push(run);
        }
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        for run in waiting {
            run.await.unwrap();
        }
        assert_eq!(*served.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    /// A caller that goes away while its run waits (a client hung up) leaves
    /// nothing to run: the run is skipped when its turn comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_whose_caller_left_before_its_turn_never_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (db, release, busy) = hold_the_only_connection(dir.path()).await;
        let ran = Arc::new(Mutex::new(false));
        let mut left = Box::pin(db.run({
            let ran = Arc::clone(&ran);
            move |_| {
                *ran.lock().unwrap() = true;
                Ok(())
            }
        }));
        ask(&mut left);
        drop(left);
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        // The run queued after it runs, so the one before it has had its turn.
        db.run(ping).await.expect("the next run");
        assert!(!*ran.lock().unwrap(), "a run nobody waits for ran");
    }
}
