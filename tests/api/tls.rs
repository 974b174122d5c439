//! TLS to PostgreSQL. Each test starts a PostgreSQL server of its own (never the
//! machine's one on 5432): `initdb` into a temp folder, `ssl = on` with a CA and a
//! server certificate for localhost/127.0.0.1 made here (rcgen), and a `pg_hba.conf`
//! of `hostssl` lines only, so a connection that works is an encrypted one. The real
//! service binary then connects with `sslmode=require` or `verify-full`.
//!
//! The server programs come from /usr/lib/postgresql/*/bin (Debian's `postgresql`
//! package), or `initdb` on PATH; without them these tests fail, never skip.
//! As root (CI is), the server runs as the `postgres` user: it refuses root.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;

use crate::helpers::{
    eventually_some, free_port, pg_connect, wait_up, APP, APP_SECRET, KEY_ADMIN, KEY_SEND,
};

const BIN: &str = env!("CARGO_BIN_EXE_formid-ledger");
/// The service's role and its password (scram-sha-256 over TLS).
const ROLE: &str = "ledger";
const PASSWORD: &str = "tls-Test-pw-7Qx2";

/// The folder of PostgreSQL's server programs; panics (the test fails) without one.
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return bin;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .unwrap_or_else(|| {
            panic!(
                "the TLS tests need PostgreSQL's server programs (initdb, pg_ctl): \
                 none in /usr/lib/postgresql/*/bin nor on PATH (Debian: apt-get install postgresql)"
            )
        })
}

/// `id ARGS` as a number.
fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().expect("run id");
    assert!(out.status.success(), "id {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("id prints a number")
}

/// The (uid, gid) the server runs as: `postgres` when we are root, else ourselves.
fn server_user() -> Option<(u32, u32)> {
    (id(&["-u"]) == 0).then(|| (id(&["-u", "postgres"]), id(&["-g", "postgres"])))
}

/// A CA: its certificate (PEM) and what signs with it.
fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A PostgreSQL server of the test's own, stopped (immediate) when dropped.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    data: PathBuf,
    user: Option<(u32, u32)>,
    port: u16,
    /// The CA that signed the server's certificate, and one that did not.
    ca: PathBuf,
    other_ca: PathBuf,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        let bin = pg_bin();
        let user = server_user();
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if let Some((uid, gid)) = user {
            // The server's user must reach its data folder (and nothing else here).
            set_mode(dir.path(), 0o755);
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
        }
        let mut pg = PrivatePostgres {
            ca: dir.path().join("ca.crt"),
            other_ca: dir.path().join("other-ca.crt"),
            dir,
            bin,
            data,
            user,
            port: 0,
        };
        pg.run(
            "initdb",
            &[
                "-U",
                "postgres",
                "--auth=trust",
                "--locale=C",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ],
            &[pg.data.as_path()],
        );

        // Certificates: the server's for localhost and 127.0.0.1, signed by `ca`.
        let (ca_pem, issuer) = new_ca("formid-ledger test CA");
        let (other_pem, _) = new_ca("some other CA");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_key = KeyPair::generate().unwrap();
        let server_cert = params.signed_by(&server_key, &issuer).unwrap();
        std::fs::write(&pg.ca, &ca_pem).unwrap();
        std::fs::write(&pg.other_ca, &other_pem).unwrap();
        pg.server_file("server.crt", &server_cert.pem());
        pg.server_file("server.key", &server_key.serialize_pem());

        pg.port = free_port();
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             fsync = off\nmax_connections = 40\n",
            pg.port
        );
        let mut postgresql_conf = std::fs::read_to_string(pg.data.join("postgresql.conf")).unwrap();
        postgresql_conf.push_str(&conf);
        std::fs::write(pg.data.join("postgresql.conf"), postgresql_conf).unwrap();
        // hostssl only: a connection without TLS matches no line and is refused.
        pg.server_file(
            "pg_hba.conf",
            &format!(
                "hostssl all postgres 127.0.0.1/32 trust\n\
                 hostssl all {ROLE} 127.0.0.1/32 scram-sha-256\n"
            ),
        );
        let log = pg.data.join("server.log");
        pg.run(
            "pg_ctl",
            &["-w", "-t", "60", "-l"],
            &[
                log.as_path(),
                Path::new("-D"),
                pg.data.as_path(),
                Path::new("start"),
            ],
        );

        let mut admin = pg_connect(&pg.admin_url()).expect("connect as postgres over TLS");
        diesel::sql_query(format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'"))
            .execute(&mut admin)
            .unwrap();
        diesel::sql_query(format!("CREATE DATABASE {ROLE} OWNER {ROLE}"))
            .execute(&mut admin)
            .unwrap();
        pg
    }

    /// Runs one of the server programs (as the server's user); panics on failure.
    fn run(&self, program: &str, args: &[&str], paths: &[&Path]) {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args).args(paths).current_dir(self.dir.path());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        let log = std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "{program} failed: {out:?}\nserver log:\n{log}"
        );
    }

    /// A file in the data folder, the server user's own, readable by it alone (the
    /// server refuses a key others can read).
    fn server_file(&self, name: &str, text: &str) {
        let path = self.data.join(name);
        std::fs::write(&path, text).unwrap();
        set_mode(&path, 0o600);
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        }
    }

    fn admin_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
            self.port
        )
    }

    /// The service's URL, with `params` (the sslmode and its options).
    fn url(&self, params: &str) -> String {
        format!(
            "postgres://{ROLE}:{PASSWORD}@127.0.0.1:{}/{ROLE}?{params}",
            self.port
        )
    }

    /// (encrypted, clear) connections of the service's role, as the server sees them.
    fn role_connections(&self) -> (i64, i64) {
        #[derive(QueryableByName)]
        struct Counts {
            #[diesel(sql_type = BigInt)]
            encrypted: i64,
            #[diesel(sql_type = BigInt)]
            clear: i64,
        }
        let mut admin = pg_connect(&self.admin_url()).expect("connect as postgres");
        let counts: Counts = diesel::sql_query(format!(
            "SELECT count(*) FILTER (WHERE s.ssl) AS encrypted, \
                    count(*) FILTER (WHERE NOT s.ssl) AS clear \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = '{ROLE}'"
        ))
        .get_result(&mut admin)
        .unwrap();
        (counts.encrypted, counts.clear)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        cmd.args(["-w", "-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let _ = cmd.status();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The service binary on a free port; killed when dropped. Its stderr goes to a file
/// (`stderr()` reads it).
struct Service {
    child: Child,
    base: String,
    stderr: PathBuf,
}

impl Service {
    fn start(database_url: &str, dir: &Path) -> Service {
        let port = free_port();
        let stderr = dir.join(format!("service-{port}.log"));
        let child = Command::new(BIN)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("LEDGER_BIND", format!("127.0.0.1:{port}"))
            .env("LEDGER_DATABASE_URL", database_url)
            .env("LEDGER_APPS", format!("{APP}:{APP_SECRET}"))
            .env(
                "LEDGER_API_KEYS",
                format!("ops:send+admin:{KEY_SEND},adm:admin:{KEY_ADMIN}"),
            )
            // Nothing is sent in these tests; nothing listens there.
            .env("LEDGER_WECHAT_API_BASE", "http://127.0.0.1:9")
            .env("LEDGER_HTTP_WORKERS", "2")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start the service");
        Service {
            child,
            base: format!("http://127.0.0.1:{port}"),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A credential reported and the user's quota read back: the service works on this
/// database (it migrated it, and reads and writes it).
async fn report_and_read_quota(http: &reqwest::Client, service: &Service, openid: &str) {
    let res = http
        .post(format!("{}/v1/credentials", service.base))
        .bearer_auth(KEY_SEND)
        .json(&json!({"app_id": APP, "openid": openid, "kind": "form_id", "value": "tls-form-1"}))
        .send()
        .await
        .expect("report");
    assert_eq!(res.status(), 200, "{}", service.stderr());
    let res: serde_json::Value = res.json().await.unwrap();
    assert_eq!(res["accepted"], 1, "{res}");
    let quota: serde_json::Value = http
        .get(format!("{}/v1/admin/users/{openid}/quota", service.base))
        .bearer_auth(KEY_ADMIN)
        .send()
        .await
        .expect("quota")
        .json()
        .await
        .unwrap();
    assert_eq!(quota["by_kind"]["form_id"]["credentials"], 1, "{quota}");
}

#[actix_web::test]
async fn sslmode_require_encrypts_every_connection() {
    let pg = PrivatePostgres::start();

    // Without TLS the server refuses this role: a connection that works is encrypted.
    let clear = pg_connect(&pg.url("sslmode=disable"))
        .err()
        .expect("a connection without TLS is refused");
    assert!(clear.to_string().contains("no encryption"), "{clear}");

    let service = Service::start(&pg.url("sslmode=require"), pg.dir.path());
    let http = reqwest::Client::new();
    wait_up(&http, &format!("{}/readyz", service.base)).await;
    report_and_read_quota(&http, &service, "o-tls-require").await;

    let (encrypted, clear) = pg.role_connections();
    assert!(encrypted > 0, "the service holds no connection");
    assert_eq!(clear, 0, "a connection of the service is not encrypted");

    // The same question from a connection of the role itself.
    #[derive(QueryableByName)]
    struct Ssl {
        #[diesel(sql_type = Bool)]
        ssl: bool,
    }
    let mut conn = pg_connect(&pg.url("sslmode=require")).unwrap();
    let own: Ssl = diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .get_result(&mut conn)
        .unwrap();
    assert!(own.ssl);
}

#[actix_web::test]
async fn sslmode_verify_full_accepts_the_servers_ca() {
    let pg = PrivatePostgres::start();
    let url = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        pg.ca.display()
    ));
    let service = Service::start(&url, pg.dir.path());
    let http = reqwest::Client::new();
    wait_up(&http, &format!("{}/readyz", service.base)).await;
    report_and_read_quota(&http, &service, "o-tls-verify").await;
    let (encrypted, clear) = pg.role_connections();
    assert!(
        encrypted > 0 && clear == 0,
        "{encrypted} encrypted, {clear} clear"
    );
}

#[actix_web::test]
async fn sslmode_verify_full_refuses_another_ca() {
    let pg = PrivatePostgres::start();
    let url = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        pg.other_ca.display()
    ));
    let mut service = Service::start(&url, pg.dir.path());
    // It cannot connect, so it does not start: it exits with the reason.
    let status = eventually_some(Duration::from_secs(60), || {
        let exited = service.child.try_wait().expect("wait for the service");
        async move { exited }
    })
    .await
    .expect("the service exits when its database's certificate does not verify");
    assert!(!status.success());
    let stderr = service.stderr();
    assert!(stderr.contains("certificate verify failed"), "{stderr}");
    assert!(
        !stderr.contains(PASSWORD),
        "the password reached the log: {stderr}"
    );
}
