//! Test support: a fresh database per test (a temp SQLite file, or a new PostgreSQL
//! database dropped afterwards) and the real application on port 0.

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;

// Every path into the crate that the tests use is written here, once; the test
// modules import these from `crate::helpers`. When an item moves in src/, only
// this block follows it.
pub use formid_ledger::auth::{ApiKey, AppScope, Role, SessionKey};
pub use formid_ledger::db::{schema, Db, DbConn, RECHECK_AFTER};
pub use formid_ledger::dispatch;
pub use formid_ledger::housekeeping::{purge, Purged};
pub use formid_ledger::ledger;
pub use formid_ledger::outbox;
pub use formid_ledger::secret::Secret;
pub use formid_ledger::settings::{App, DatabaseUrl, PushApp, Retention, Settings, TokenApi};
pub use formid_ledger::sim::{
    self, FaultSet, Faults, Latency, MessageKind, PushTarget, SimConfig, Simulator,
    TokenApi as SimTokenApi, UserHabits,
};
pub use formid_ledger::startup::{Application, StartupError};
pub use formid_ledger::webhooks;
pub use formid_ledger::wechat::push_crypto::{self, PushKey};
pub use formid_ledger::wechat::wire::PrivateTemplate;
pub use formid_ledger::wechat::{
    DataValue, ErrorClass, SubscribeMessage, TemplateMessage, WechatClient, WechatError,
};

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("LEDGER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A direct connection (outside the service's pools), with OpenSSL set up first as
/// the pools set it up ([`formid_ledger::db::init_libpq_tls`]), whichever test
/// connects first. Every direct connection of the tests is made here.
pub fn pg_connect(url: &str) -> diesel::ConnectionResult<PgConnection> {
    formid_ledger::db::init_libpq_tls();
    PgConnection::establish(url)
}

/// Runs each test body once per backend: `mod name { fn sqlite(); fn postgres(); }`,
/// so `cargo test postgres` selects one backend and CI can count them.
macro_rules! backend_tests {
    ($( $(#[$meta:meta])* fn $name:ident($db:ident) $body:block )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn run($db: $crate::helpers::TestDb) $body
            $(#[$meta])* #[test]
            fn sqlite() { run($crate::helpers::TestDb::sqlite()) }
            $(#[$meta])* #[test]
            fn postgres() { run($crate::helpers::TestDb::postgres()) }
        }
    )*};
}

/// The same for async tests against the running app.
macro_rules! backend_app_tests {
    ($( $(#[$meta:meta])* async fn $name:ident($db:ident) $body:block )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn run($db: $crate::helpers::TestDb) $body
            $(#[$meta])* #[actix_web::test]
            async fn sqlite() { run($crate::helpers::TestDb::sqlite()).await }
            $(#[$meta])* #[actix_web::test]
            async fn postgres() { run($crate::helpers::TestDb::postgres()).await }
        }
    )*};
}
pub(crate) use {backend_app_tests, backend_tests};

/// A database of its own for one test.
pub enum TestDb {
    Sqlite {
        _dir: tempfile::TempDir,
        url: DatabaseUrl,
    },
    Postgres {
        name: String,
        url: DatabaseUrl,
    },
}

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = DatabaseUrl::Sqlite(dir.path().join("ledger.db"));
        TestDb::Sqlite { _dir: dir, url }
    }

    /// A new database on the test server. Fails the test if PostgreSQL is not
    /// reachable: a backend whose tests did not run must not pass silently.
    pub fn postgres() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let admin = postgres_admin_url();
        let name = format!(
            "ledger_test_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let mut conn = pg_connect(&admin).unwrap_or_else(|e| {
            panic!("PostgreSQL tests need a server at {admin} (set LEDGER_TEST_POSTGRES_URL): {e}")
        });
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .expect("create test database");
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = DatabaseUrl::Postgres(Secret::new(format!("{base}/{name}")));
        TestDb::Postgres { name, url }
    }

    pub fn url(&self) -> DatabaseUrl {
        match self {
            TestDb::Sqlite { url, .. } | TestDb::Postgres { url, .. } => url.clone(),
        }
    }

    /// A migrated pool on this database (call again for another "instance").
    pub fn connect(&self, pool_size: u32) -> Db {
        let db = Db::connect(&self.url(), pool_size).expect("connect");
        db.migrate().expect("migrate");
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { name, .. } = self {
            if let Ok(mut conn) = pg_connect(&postgres_admin_url()) {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn);
            }
        }
    }
}

pub const APP: &str = "wxtestapp0000001";
pub const APP_SECRET: &str = "test-app-secret";
pub const KEY_ALL: &str = "key-all-roles-000001";
pub const KEY_SEND: &str = "key-send-only-000001";
pub const KEY_ADMIN: &str = "key-admin-only-00001";
pub const KEY_TOKEN: &str = "key-token-only-00001";

/// Settings for a test app: one app, one key per role and one with every role.
pub fn test_settings(db: &TestDb) -> Settings {
    let key = |name: &str, roles: &[Role], key: &str| ApiKey {
        name: name.into(),
        roles: roles.to_vec(),
        key: Secret::new(key),
        apps: AppScope::All,
    };
    Settings {
        bind: "127.0.0.1:0".into(),
        database_url: db.url(),
        db_pool_size: 4,
        apps: vec![App {
            app_id: APP.into(),
            secret: Secret::new(APP_SECRET),
        }],
        api_keys: vec![
            key("all", &[Role::Send, Role::Admin, Role::Token], KEY_ALL),
            key("sender", &[Role::Send], KEY_SEND),
            key("admin", &[Role::Admin], KEY_ADMIN),
            key("token", &[Role::Token], KEY_TOKEN),
        ],
        session_secret: Some(Secret::new("test-session-secret-0123456789abcdef")),
        http_workers: 2,
        ..Settings::default()
    }
}

/// The WeChat simulator on a port of its own, knowing the test app.
#[derive(Clone)]
pub struct TestSim {
    pub sim: Simulator,
    pub base: String,
}

impl TestSim {
    pub fn spawn() -> TestSim {
        Self::spawn_with(|_| {})
    }

    pub fn spawn_with(tweak: impl FnOnce(&mut SimConfig)) -> TestSim {
        let mut cfg = SimConfig {
            apps: vec![(APP.to_string(), Secret::new(APP_SECRET))],
            ..SimConfig::default()
        };
        tweak(&mut cfg);
        let sim = Simulator::new(cfg);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        actix_web::rt::spawn(sim::serve(listener, sim.clone()));
        TestSim { sim, base }
    }
}

/// The real application, serving on a free port, talking to a simulator.
pub struct TestApp {
    pub base: String,
    /// Where `/metrics` answers when `metrics_bind` is set.
    pub metrics_base: Option<String>,
    pub http: reqwest::Client,
    pub db: Db,
    pub sim: TestSim,
    pub test_db: Arc<TestDb>,
}

impl TestApp {
    pub async fn spawn(test_db: TestDb) -> TestApp {
        Self::spawn_with(test_db, |_| {}).await
    }

    pub async fn spawn_with(test_db: TestDb, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        Self::start(Arc::new(test_db), TestSim::spawn(), tweak).await
    }

    /// One more instance: on a shared database and simulator, as a fleet would run.
    pub async fn start(
        test_db: Arc<TestDb>,
        sim: TestSim,
        tweak: impl FnOnce(&mut Settings),
    ) -> TestApp {
        let mut settings = test_settings(&test_db);
        settings.wechat_api_base = sim.base.clone();
        tweak(&mut settings);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let app = Application::build(settings, listener)
            .await
            .expect("build app");
        let base = format!("http://127.0.0.1:{}", app.port());
        let metrics_base = app
            .metrics_port()
            .map(|port| format!("http://127.0.0.1:{port}"));
        let db = app.db().clone();
        actix_web::rt::spawn(app.run_until_stopped());
        TestApp {
            base,
            metrics_base,
            http: reqwest::Client::new(),
            db,
            sim,
            test_db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POST JSON with a bearer key; returns (status, body as JSON or Null).
    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let mut req = self.http.post(self.url(path)).json(body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        read(req.send().await.expect("request")).await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> (u16, serde_json::Value) {
        let mut req = self.http.get(self.url(path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        read(req.send().await.expect("request")).await
    }

    /// Rows in the credentials table: "nothing stored" checks.
    /// Runs `sql` on the app's database: a count (`... AS n`), or rows changed. On the
    /// blocking pool, as the service's own queries run: the app shares the test's one
    /// async thread, which a query run in place would stall for its length at each poll.
    pub async fn sql(&self, sql: &str) -> i64 {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let sql = sql.to_string();
        let what = sql.clone();
        self.db
            .run(move |conn| {
                Ok(if sql.starts_with("SELECT") {
                    dispatch!(conn, |c| diesel::sql_query(&sql).get_result::<N>(c))?.n
                } else {
                    dispatch!(conn, |c| diesel::sql_query(&sql).execute(c))? as i64
                })
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    pub fn credential_count(&self) -> i64 {
        use schema::credentials::dsl::credentials;
        let mut conn = self.db.get().expect("connection");
        dispatch!(&mut *conn, |c| credentials.count().get_result(c)).expect("count")
    }

    /// Logs `openid` in through the simulator's code; returns the session.
    pub async fn login(&self, openid: &str) -> String {
        let code = self.sim.sim.mint_code(APP, openid).expect("mint code");
        let (status, res) = self
            .post(
                "/v1/client/session",
                None,
                &serde_json::json!({"code": code}),
            )
            .await;
        assert_eq!(status, 200, "login: {res}");
        res["session"].as_str().expect("session").to_string()
    }
}

/// A counter's value on /metrics, `series` being its name and labels; 0 while it
/// has not been counted.
pub async fn counter(app: &TestApp, series: &str) -> u64 {
    let res = app.http.get(app.url("/metrics")).send().await.unwrap();
    let text = res.text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Status and body of a response; the body as JSON, or Null if it is not JSON.
pub async fn read(res: reqwest::Response) -> (u16, serde_json::Value) {
    let status = res.status().as_u16();
    let text = res.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// GET `url` (with an API key if given); the body as JSON.
pub async fn get_json(http: &reqwest::Client, url: &str, key: Option<&str>) -> serde_json::Value {
    let mut req = http.get(url);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let res = req.send().await.expect("request");
    res.json().await.expect("JSON body")
}

/// POST JSON to `url` (with an API key if given); asserts a 2xx answer and
/// returns its body as JSON.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &serde_json::Value,
) -> serde_json::Value {
    let mut req = http.post(url).json(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let res = req.send().await.expect("request");
    assert!(res.status().is_success(), "POST {url}: {}", res.status());
    res.json().await.expect("JSON body")
}

/// How often the waiting helpers look again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `f` until it gives `Some` (its value) or `timeout` has passed (`None`).
/// The one poll loop of the suite: tests wait on a condition, never a fixed time.
pub async fn eventually_some<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        actix_web::rt::time::sleep(POLL).await;
    }
}

/// Polls `check` until it holds; whether it did before `timeout` passed.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(timeout, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Waits until GET `url` answers 2xx: a process (the service, the simulator) is up.
pub async fn wait_up(http: &reqwest::Client, url: &str) {
    let up = eventually(Duration::from_secs(20), || async {
        http.get(url)
            .send()
            .await
            .is_ok_and(|res| res.status().is_success())
    })
    .await;
    assert!(up, "{url} did not come up");
}

/// A port nobody listens on now (the OS's pick), for a process the test starts.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
