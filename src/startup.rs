//! Builds the whole service from [`Settings`] and a bound listener (port 0 in tests).

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{middleware, web, App, HttpServer};
use base64::Engine;

use crate::auth::{ApiKey, AppScope, Role, SessionKey};
use crate::campaigns::runner::{Runner, RunnerConfig};
use crate::db::{Db, DbError};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::outbox::policy::Policy;
use crate::outbox::sender::SenderConfig;
use crate::outbox::Sender;
use crate::secret::Secret;
use crate::settings::{Retention, Settings};
use crate::sim::{SimConfig, Simulator};
use crate::tokens::{TokenError, TokenManager};
use crate::webhooks::Deliverer;
use crate::wechat::client::WechatClient;
use crate::wechat::wire::PrivateTemplate;

/// The app sandbox mode serves, backed by the built-in simulator.
pub const SANDBOX_APP: &str = "wxsandbox";

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot listen on {addr} (LEDGER_METRICS_BIND): {source}")]
    MetricsBind {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "no LEDGER_APPS, and sandbox mode serves only a loopback address, not {0}: \
         set LEDGER_APPS=appid:secret, or LEDGER_SANDBOX=true to run the sandbox there"
    )]
    SandboxNotLoopback(IpAddr),
    #[error(
        "no LEDGER_APPS, and the database holds rows of app {0}: sandbox mode never uses a \
         real app's database; set LEDGER_APPS, or LEDGER_DATABASE_URL to another database"
    )]
    SandboxOnRealData(String),
    #[error("invalid setting LEDGER_WECHAT_API_BASE: {0}")]
    Wechat(String),
    #[error(transparent)]
    Tokens(#[from] TokenError),
    #[error("cannot make the webhook client: {0}")]
    Webhooks(String),
}

/// What sandbox mode set up, for the start-up banner.
pub struct Sandbox {
    pub simulator: Simulator,
    /// The generated key with every role, if no key was configured.
    pub api_key: Option<Secret>,
}

pub struct Application {
    port: u16,
    server: Server,
    /// `/metrics` on its own address (`LEDGER_METRICS_BIND`): its port and server.
    metrics_server: Option<(u16, Server)>,
    db: Db,
    sandbox: Option<Sandbox>,
    tokens: Arc<TokenManager>,
    sender: Arc<Sender>,
    campaigns: Arc<Runner>,
    webhooks: Arc<Deliverer>,
    shutdown_timeout: Duration,
    purge_interval: Duration,
    retention: Retention,
    state: web::Data<AppState>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Application {
    /// Connects to the database, applies pending migrations, starts the background
    /// tasks and binds the HTTP server. With no app configured: sandbox mode.
    pub async fn build(
        mut settings: Settings,
        listener: TcpListener,
    ) -> Result<Self, StartupError> {
        let addr = listener.local_addr()?;
        let sandbox = sandbox(&mut settings, addr.ip(), addr.port())?;
        let settings = Arc::new(settings);
        let (db, sender_db, session_secret) = {
            let settings = settings.clone();
            let sandboxed = sandbox.is_some();
            tokio::task::spawn_blocking(move || -> Result<(Db, Db, Secret), StartupError> {
                let db = Db::connect(&settings.database_url, settings.db_pool_size)?;
                for version in db.migrate()? {
                    log::info!("applied migration {version}");
                }
                if sandboxed {
                    if let Some(app) = crate::db::other_app(&mut *db.get()?, SANDBOX_APP)? {
                        return Err(StartupError::SandboxOnRealData(app));
                    }
                }
                let secret = match &settings.session_secret {
                    Some(s) => s.clone(),
                    None => crate::db::service_secret(&mut *db.get()?, "session_secret", || {
                        random_secret(32)
                    })?,
                };
                // The sender's own connections: a flood of requests cannot starve
                // sending (measured: 73 sent/s while 64 clients posted, 380 after).
                // Its workers hold none during a call; the leases, the claim and the
                // settlement groups, the listener and the odd single step share these.
                let workers = u32::try_from(settings.sender_workers).unwrap_or(u32::MAX);
                let sender_db = Db::connect(&settings.database_url, workers.clamp(1, 4) + 4)?;
                Ok((db, sender_db, secret))
            })
            .await
            .map_err(|e| DbError::Unavailable(e.to_string()))??
        };
        let metrics = Arc::new(Metrics::new());
        let wechat = WechatClient::new(
            &settings.wechat_api_base,
            (settings.wechat_timeout / 3).max(Duration::from_secs(1)),
            settings.wechat_timeout,
        )
        .map_err(|e| StartupError::Wechat(e.message))?
        .with_metrics(metrics.clone());
        let tokens = Arc::new(TokenManager::new(
            db.clone(),
            wechat.clone(),
            &settings.apps,
            settings.token_api,
            settings.token_refresh_margin,
            settings.token_force_interval,
            metrics.clone(),
        ));
        tokens.init().await?;
        let sender = Arc::new(Sender::new(
            sender_db,
            wechat.clone(),
            tokens.clone(),
            SenderConfig {
                workers: settings.sender_workers,
                lease: settings.sender_lease,
                policy: Policy {
                    young_window: settings.young_window,
                    young_retry_delay: settings.young_retry,
                    young_max_retries: settings.young_max_retries,
                    max_retries: settings.send_max_retries,
                    backoff_base: settings.send_backoff_base,
                    user_min_gap: settings.user_min_gap,
                    user_daily_cap: settings.user_daily_cap,
                    ..Policy::default()
                },
            },
            metrics.clone(),
        ));

        let campaigns = Arc::new(Runner::new(
            db.clone(),
            sender.clone(),
            RunnerConfig::default(),
        ));
        let webhooks = Arc::new(
            Deliverer::new(db.clone(), settings.webhooks.clone(), metrics.clone())
                .map_err(StartupError::Webhooks)?,
        );
        let state = web::Data::new(AppState::new(
            db.clone(),
            settings.clone(),
            SessionKey::new(session_secret),
            wechat,
            tokens.clone(),
            sender.clone(),
            metrics.clone(),
            webhooks.clone(),
        ));
        let simulator = sandbox.as_ref().map(|s| s.simulator.clone());
        let shared = state.clone();
        let metrics_server = match &settings.metrics_bind {
            Some(addr) => Some(metrics_server(addr, state.clone())?),
            None => None,
        };
        let metrics_public = metrics_server.is_none();
        let mut server = HttpServer::new(move || {
            let simulator = simulator.clone();
            let metrics = metrics.clone();
            App::new()
                .wrap(middleware::from_fn(move |req, next| {
                    http::observe(metrics.clone(), req, next)
                }))
                .wrap(http::access_log())
                .app_data(state.clone())
                .configure(move |cfg| {
                    if let Some(sim) = &simulator {
                        sim.configure(cfg);
                    }
                })
                .configure(http::config)
                .configure(|cfg| {
                    if metrics_public {
                        http::health::metrics_config(cfg);
                    }
                })
        })
        .listen(listener)?;
        if settings.http_workers > 0 {
            server = server.workers(settings.http_workers);
        }
        let (stop, _) = tokio::sync::watch::channel(false);
        Ok(Application {
            port: addr.port(),
            server: server.run(),
            metrics_server,
            db,
            sandbox,
            tokens,
            sender,
            campaigns,
            webhooks,
            shutdown_timeout: settings.shutdown_timeout,
            purge_interval: settings.purge_interval,
            retention: settings.retention.clone(),
            state: shared,
            stop,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port `/metrics` is served on when `LEDGER_METRICS_BIND` is set.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_server.as_ref().map(|(port, _)| *port)
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn sandbox(&self) -> Option<&Sandbox> {
        self.sandbox.as_ref()
    }

    pub fn tokens(&self) -> &Arc<TokenManager> {
        &self.tokens
    }

    pub fn sender(&self) -> &Arc<Sender> {
        &self.sender
    }

    /// Serves until SIGINT/SIGTERM, with the token refreshers and sender workers
    /// running alongside. Shutdown: actix stops accepting and finishes in-flight
    /// requests; then the workers stop claiming and finish their current step
    /// (within the shutdown timeout), and the leases they hold are handed back so
    /// another instance picks those messages up at once.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.tokens.spawn_refreshers(self.stop.subscribe());
        let mut workers = self.sender.spawn(self.stop.subscribe());
        workers.extend(self.webhooks.spawn(self.stop.subscribe()));
        workers.push(self.campaigns.spawn(self.stop.subscribe()));
        let (state, mut stop) = (self.state.clone(), self.stop.subscribe());
        tokio::spawn(async move {
            // Rate-limit buckets of clients gone quiet are forgotten.
            while !*stop.borrow() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => state.limits.shrink(),
                    _ = stop.changed() => {}
                }
            }
        });
        crate::outbox::templates::spawn_refresher(
            self.db.clone(),
            self.state.wechat.clone(),
            self.tokens.clone(),
            self.state
                .settings
                .apps
                .iter()
                .map(|a| a.app_id.clone())
                .collect(),
            self.state.settings.template_refresh,
            self.stop.subscribe(),
        );
        self.db.spawn_wal_checkpoints(self.stop.subscribe());
        crate::housekeeping::spawn(
            self.db.clone(),
            self.retention.clone(),
            self.purge_interval,
            self.stop.subscribe(),
        );
        let metrics_server = self.metrics_server.map(|(_, server)| {
            let handle = server.handle();
            actix_web::rt::spawn(server);
            handle
        });
        let result = self.server.await;
        if let Some(handle) = metrics_server {
            handle.stop(true).await;
        }
        log::info!("shutting down: letting in-flight sends finish");
        let _ = self.stop.send(true);
        let all = futures_util::future::join_all(workers);
        if tokio::time::timeout(self.shutdown_timeout, all)
            .await
            .is_err()
        {
            log::warn!(
                "sends still in flight after {:?}; their leases are handed back",
                self.shutdown_timeout
            );
        }
        match self.sender.release_leases().await {
            Ok(n) if n > 0 => log::info!("handed back {n} message leases"),
            Ok(_) => {}
            Err(e) => log::warn!("could not hand back message leases: {e}"),
        }
        match self.webhooks.release_leases().await {
            Ok(n) if n > 0 => log::info!("handed back {n} webhook delivery leases"),
            Ok(_) => {}
            Err(e) => log::warn!("could not hand back webhook delivery leases: {e}"),
        }
        result
    }
}

/// The server of `/metrics` alone, on its own address: one worker, and no signal
/// handling of its own (the main server's shutdown stops it).
fn metrics_server(addr: &str, state: web::Data<AppState>) -> Result<(u16, Server), StartupError> {
    let bind_error = |source| StartupError::MetricsBind {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).map_err(bind_error)?;
    let port = listener.local_addr().map_err(bind_error)?.port();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(http::metrics_only)
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .map_err(bind_error)?
    .run();
    Ok((port, server))
}

/// Sandbox mode: with no app configured, one app `wxsandbox` served by the built-in
/// simulator on this very port, and (if none is configured) a generated API key with
/// every role. Never used when apps are configured; only on a loopback address
/// unless `LEDGER_SANDBOX=true` forces it (its `/sim` routes and generated key are
/// for one machine), and never on a database that holds a real app's rows.
fn sandbox(
    settings: &mut Settings,
    ip: IpAddr,
    port: u16,
) -> Result<Option<Sandbox>, StartupError> {
    if !settings.apps.is_empty() {
        return Ok(None);
    }
    if !ip.is_loopback() && !settings.sandbox {
        return Err(StartupError::SandboxNotLoopback(ip));
    }
    let secret = Secret::new(random_secret(24));
    settings.apps = vec![crate::settings::App {
        app_id: SANDBOX_APP.into(),
        secret: secret.clone(),
    }];
    let host = if ip.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        ip
    };
    settings.wechat_api_base = match host {
        IpAddr::V4(v4) => format!("http://{v4}:{port}"),
        IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
    };
    let api_key = settings.api_keys.is_empty().then(|| {
        let key = Secret::new(format!("sandbox-{}", random_secret(24)));
        settings.api_keys = vec![ApiKey {
            name: "sandbox".into(),
            roles: vec![Role::Send, Role::Admin, Role::Token],
            key: key.clone(),
            apps: AppScope::All,
        }];
        key
    });
    let simulator = Simulator::new(SimConfig {
        apps: vec![(SANDBOX_APP.to_string(), secret)],
        subscription_templates: sandbox_templates(),
        ..SimConfig::default()
    });
    // The simulator pushes to this very service, as WeChat would to the push URL
    // entered in the console: safe mode with a generated Token and EncodingAESKey
    // (or the ones LEDGER_PUSH gives for the sandbox app).
    if settings.push_app(SANDBOX_APP).is_none() {
        let token: String = random_secret(24)
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(24)
            .collect();
        let raw: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
        let key = base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw);
        settings.push.push(crate::settings::PushApp {
            app_id: SANDBOX_APP.into(),
            token: Secret::new(token),
            encoding_aes_key: Some(Secret::new(key)),
        });
    }
    if let Some(push) = settings.push_app(SANDBOX_APP) {
        simulator.set_push_target(
            SANDBOX_APP,
            crate::sim::PushTarget {
                url: format!("{}/v1/wechat/push/{SANDBOX_APP}", settings.wechat_api_base),
                more_urls: Vec::new(),
                token: push.token.expose().to_string(),
                encoding_aes_key: push
                    .encoding_aes_key
                    .as_ref()
                    .map(|k| k.expose().to_string()),
            },
        );
    }
    Ok(Some(Sandbox { simulator, api_key }))
}

/// The sandbox app's subscription templates, as its simulated WeChat lists them.
fn sandbox_templates() -> Vec<PrivateTemplate> {
    let template = |id: &str, title: &str, content: &str, example: &str| PrivateTemplate {
        pri_tmpl_id: id.into(),
        title: title.into(),
        content: content.into(),
        example: example.into(),
        kind: 2,
    };
    vec![
        template(
            "TPL_SHIPPED",
            "发货通知",
            "物品名称:{{thing1.DATA}}\n发货时间:{{time2.DATA}}\n",
            "物品名称:咖啡\n发货时间:2026年12月1日 15:01\n",
        ),
        template(
            "TPL_PROMO",
            "活动提醒",
            "活动名称:{{thing1.DATA}}\n开始时间:{{date2.DATA}}\n",
            "活动名称:双十二\n开始时间:2026年12月12日\n",
        ),
    ]
}

/// `bytes` random bytes, base64url.
fn random_secret(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}
