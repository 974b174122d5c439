//! Settings: every value from a `LEDGER_*` environment variable, optionally from the
//! TOML file named by `LEDGER_CONFIG` (same names, lower case, without the prefix);
//! the environment wins. A bad value is a [`SettingsError`] naming the setting.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::auth::{ApiKey, AppScope, Role};
pub use crate::db::DatabaseUrl;
use crate::secret::Secret;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid setting {name}: {problem}")]
pub struct SettingsError {
    pub name: String,
    pub problem: String,
}

impl SettingsError {
    fn new(key: &str, problem: impl Into<String>) -> Self {
        SettingsError {
            name: env_name(key),
            problem: problem.into(),
        }
    }
}

fn env_name(key: &str) -> String {
    format!("LEDGER_{}", key.to_ascii_uppercase())
}

/// A mini-program the service serves: its appid and app secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub app_id: String,
    pub secret: Secret,
}

/// An app's WeChat message push (`LEDGER_PUSH`): the Token and, for the
/// compatible and safe modes, the EncodingAESKey entered in the mini-program console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushApp {
    pub app_id: String,
    /// 3..32 letters or digits.
    pub token: Secret,
    /// Exactly 43 base64 characters; None: plaintext mode only.
    pub encoding_aes_key: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenApi {
    Classic,
    Stable,
}

impl TokenApi {
    fn parse(raw: &str) -> Result<Self, String> {
        match raw {
            "classic" => Ok(TokenApi::Classic),
            "stable" => Ok(TokenApi::Stable),
            _ => Err(format!("{raw:?} is neither classic nor stable")),
        }
    }
}

/// How long housekeeping keeps things.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Used-up, invalid or expired credentials, after they died; subscription
    /// results, after they were last reported.
    pub credentials: Duration,
    /// Finished messages (with their attempts), after they were created.
    pub messages: Duration,
    /// Idempotency keys (the contract promises at least 24 h).
    pub idempotency_keys: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            credentials: Duration::from_secs(7 * 86_400),
            messages: Duration::from_secs(30 * 86_400),
            idempotency_keys: Duration::from_secs(86_400),
        }
    }
}

/// Rate limits of the HTTP endpoints (0: unlimited).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_session_per_minute: u32,
    pub per_ip_per_minute: u32,
    pub per_key_per_second: u32,
    /// Logins (`jscode2session` calls) per client address. The default (2 a second)
    /// leaves room for the many users one carrier-grade NAT address stands for,
    /// and still stops a flood from one address.
    pub login_per_ip_per_minute: u32,
    /// Logins (`jscode2session` calls) per app, from all addresses together.
    pub login_per_app_per_second: u32,
    /// Failed authentications (unknown API key, bad session) per client address.
    pub auth_failures_per_minute: u32,
    /// `?wait` requests one API key may have waiting at once.
    pub max_waiters_per_key: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_session_per_minute: 120,
            per_ip_per_minute: 1200,
            per_key_per_second: 10_000,
            login_per_ip_per_minute: 120,
            login_per_app_per_second: 50,
            auth_failures_per_minute: 10,
            max_waiters_per_key: 100,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: String,
    /// Serve `/metrics` on this address only (and not on `bind`); `None`: on `bind`.
    pub metrics_bind: Option<String>,
    pub database_url: DatabaseUrl,
    pub db_pool_size: u32,
    pub wechat_api_base: String,
    /// Empty: sandbox mode (on a loopback address, or anywhere with `sandbox`).
    pub apps: Vec<App>,
    /// `LEDGER_SANDBOX=true`: run the sandbox even on a non-loopback address.
    pub sandbox: bool,
    pub api_keys: Vec<ApiKey>,
    pub session_secret: Option<Secret>,
    pub prepay_id_uses: u32,
    pub token_api: TokenApi,
    /// Live credentials one user may hold.
    pub user_cap: u32,
    /// Distinct templates one user may have subscription results for.
    pub subscription_templates_per_user: u32,
    /// The ledger stops using a credential this long before WeChat's 7 days end.
    pub expiry_margin: Duration,
    /// HTTP worker threads; 0 means one per core.
    pub http_workers: usize,
    /// Refresh an app's access_token this long before it expires.
    pub token_refresh_margin: Duration,
    /// Compare-and-refresh does not replace a token fetched less than this ago
    /// (WeChat: forced stable refreshes 30 s apart, 20 a day); zero: no limit.
    pub token_force_interval: Duration,
    /// Lifetime of a client session.
    pub session_ttl: Duration,
    /// Bound on one WeChat call (connect is bounded by a third of it).
    pub wechat_timeout: Duration,
    /// Messages one instance sends at once (WeChat calls in flight; none holds a
    /// database connection).
    pub sender_workers: usize,
    /// A worker's hold on a message; a dead worker's messages are taken over after it.
    pub sender_lease: Duration,
    /// 41028 from a credential issued less than this ago: retry it (fresh prepay_id).
    pub young_window: Duration,
    /// Delay before that retry.
    pub young_retry: Duration,
    /// Young-credential (41028) retries of one message.
    pub young_max_retries: u32,
    /// A user gets no two messages of one app closer than this.
    pub user_min_gap: Duration,
    /// Messages per user and app per Beijing day (0: no cap).
    pub user_daily_cap: u32,
    /// Transient failures retried with one credential before a message fails.
    pub send_max_retries: u32,
    /// First backoff after a transient failure (doubles, with jitter, up to 60 s).
    pub send_backoff_base: Duration,
    /// On SIGTERM, how long in-flight sends may take before their leases are handed back.
    pub shutdown_timeout: Duration,
    /// How often (in whichever instance gets the turn) housekeeping purges.
    pub purge_interval: Duration,
    pub retention: Retention,
    /// Templates sent with subscribe-send in every app (more can be registered per
    /// app through the admin API).
    pub subscription_templates: Vec<String>,
    /// How often each app's template list is read from WeChat again.
    pub template_refresh: Duration,
    /// Rate limits (0: unlimited).
    pub limits: Limits,
    /// Peers whose `X-Forwarded-For` is believed (reverse proxies); empty: nobody's.
    pub trusted_proxies: Vec<IpNet>,
    /// Webhook deliveries: SSRF guard, timeout, backoff and retry window.
    pub webhooks: crate::webhooks::Config,
    /// Apps whose WeChat message push this service receives.
    pub push: Vec<PushApp>,
    /// Where pushes that are not subscribe-message events go, per app
    /// (`LEDGER_PUSH_FORWARD` = `appid=url[,…]`): the business's own push handler.
    pub push_forward: BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: "127.0.0.1:8080".into(),
            metrics_bind: None,
            database_url: DatabaseUrl::Sqlite(PathBuf::from("data/ledger.db")),
            db_pool_size: 10,
            wechat_api_base: "https://api.weixin.qq.com".into(),
            apps: Vec::new(),
            sandbox: false,
            api_keys: Vec::new(),
            session_secret: None,
            prepay_id_uses: 1,
            token_api: TokenApi::Stable,
            user_cap: 200,
            subscription_templates_per_user: 100,
            expiry_margin: Duration::from_secs(600),
            http_workers: 0,
            token_refresh_margin: Duration::from_secs(300),
            token_force_interval: Duration::from_secs(30),
            session_ttl: Duration::from_secs(30 * 86_400),
            wechat_timeout: Duration::from_secs(10),
            sender_workers: 512,
            sender_lease: Duration::from_secs(30),
            young_window: Duration::from_secs(60),
            young_retry: Duration::from_secs(5),
            young_max_retries: 6,
            user_min_gap: Duration::ZERO,
            user_daily_cap: 0,
            send_max_retries: 5,
            send_backoff_base: Duration::from_millis(500),
            shutdown_timeout: Duration::from_secs(20),
            purge_interval: Duration::from_secs(600),
            retention: Retention::default(),
            subscription_templates: Vec::new(),
            template_refresh: Duration::from_secs(3600),
            limits: Limits::default(),
            trusted_proxies: Vec::new(),
            webhooks: crate::webhooks::Config::default(),
            push: Vec::new(),
            push_forward: BTreeMap::new(),
        }
    }
}

impl Settings {
    /// Reads the process environment (and the file `LEDGER_CONFIG` names).
    pub fn from_env() -> Result<Self, SettingsError> {
        let env: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("LEDGER_"))
            .collect();
        let file = match env.get("LEDGER_CONFIG") {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| SettingsError {
                name: "LEDGER_CONFIG".into(),
                problem: format!("cannot read {path}: {e}"),
            })?),
            None => None,
        };
        Self::from_sources(file.as_deref(), &env)
    }

    /// Builds settings from a TOML text (if any) and `LEDGER_*` variables.
    pub fn from_sources(
        toml_text: Option<&str>,
        env: &HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let mut values = match toml_text {
            Some(text) => toml_values(text)?,
            None => BTreeMap::new(),
        };
        for setting in SETTINGS {
            if let Some(v) = env.get(&env_name(setting.name)) {
                values.insert(setting.name.to_string(), v.clone());
            }
        }
        if let Some(unknown) = env.keys().find(|name| is_unknown_variable(name)) {
            return Err(SettingsError {
                name: unknown.clone(),
                problem: unknown_variable(unknown),
            });
        }
        let mut s = Settings::default();
        for (key, raw) in &values {
            let setting = by_name(key).ok_or_else(|| SettingsError::new(key, "unknown setting"))?;
            (setting.apply)(&mut s, raw.trim())
                .map_err(|problem| SettingsError::new(key, problem))?;
        }
        s.check_consistency()?;
        Ok(s)
    }

    fn check_consistency(&self) -> Result<(), SettingsError> {
        if self.sender_lease <= self.wechat_timeout {
            return Err(SettingsError::new(
                "sender_lease_s",
                "must be longer than LEDGER_WECHAT_TIMEOUT_S, or a slow call would be taken over mid-flight",
            ));
        }
        if self.sandbox && !self.apps.is_empty() {
            return Err(SettingsError::new(
                "sandbox",
                "LEDGER_SANDBOX=true and LEDGER_APPS are both set: the sandbox serves only its own simulated app",
            ));
        }
        // (The sandbox configures its own app later: its keys are not checked here.)
        for key in self.api_keys.iter().filter(|_| !self.apps.is_empty()) {
            if let AppScope::Only(apps) = &key.apps {
                if apps.iter().any(|a| self.app(a).is_none()) {
                    return Err(SettingsError::new(
                        "api_keys",
                        format!(
                            "key `{}`: its 4th field names an app that LEDGER_APPS does not configure (a key may not contain ':')",
                            key.name
                        ),
                    ));
                }
            }
        }
        if !self.apps.is_empty() && self.api_keys.is_empty() {
            return Err(SettingsError::new(
                "api_keys",
                "apps are configured but no API key is: nobody could send, read quotas or fetch tokens",
            ));
        }
        if !self.apps.is_empty() {
            if let Some(n) = self.push.iter().position(|p| self.app(&p.app_id).is_none()) {
                return Err(SettingsError::new(
                    "push",
                    format!("entry {}: the appid is not one of LEDGER_APPS", n + 1),
                ));
            }
        }
        Ok(())
    }

    /// The app's message-push configuration, if it has one.
    pub fn push_app(&self, app_id: &str) -> Option<&PushApp> {
        self.push.iter().find(|p| p.app_id == app_id)
    }

    pub fn app(&self, app_id: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.app_id == app_id)
    }
}

/// One setting: its name (the TOML file's key; `LEDGER_` and the name in capitals in
/// the environment) and how its text becomes a field of [`Settings`].
pub struct Setting {
    pub name: &'static str,
    apply: fn(&mut Settings, &str) -> Result<(), String>,
}

/// Declares [`SETTINGS`], one line per setting: `name => |settings, text| assignment`.
macro_rules! settings {
    ($($name:ident => |$s:ident, $v:ident| $assign:expr;)*) => {
        /// Every setting the service reads. Adding one is a line here, a field of
        /// [`Settings`] and its default.
        pub const SETTINGS: &[Setting] = &[$(Setting {
            name: stringify!($name),
            apply: |$s, $v| {
                $assign;
                Ok(())
            },
        }),*];
    };
}

settings! {
    bind => |s, v| s.bind = socket_address(v)?;
    metrics_bind => |s, v| s.metrics_bind = Some(socket_address(v)?);
    database_url => |s, v| s.database_url = DatabaseUrl::parse(v)?;
    db_pool_size => |s, v| s.db_pool_size = int(v, 1, 1000)?;
    wechat_api_base => |s, v| s.wechat_api_base = http_url(v)?;
    apps => |s, v| s.apps = parse_apps(v)?;
    sandbox => |s, v| s.sandbox = boolean(v)?;
    api_keys => |s, v| s.api_keys = parse_api_keys(v)?;
    session_secret => |s, v| s.session_secret = Some(session_secret(v)?);
    prepay_id_uses => |s, v| s.prepay_id_uses = int(v, 1, 100)?;
    token_api => |s, v| s.token_api = TokenApi::parse(v)?;
    user_cap => |s, v| s.user_cap = int(v, 1, 100_000)?;
    subscription_templates_per_user => |s, v| s.subscription_templates_per_user = int(v, 1, crate::ledger::MAX_TEMPLATES_PER_USER)?;
    young_max_retries => |s, v| s.young_max_retries = int(v, 0, 1000)?;
    user_min_gap_s => |s, v| s.user_min_gap = secs(v, 0, 86_400)?;
    user_daily_cap => |s, v| s.user_daily_cap = int(v, 0, 10_000)?;
    expiry_margin_s => |s, v| s.expiry_margin = secs(v, 0, 86_400)?;
    http_workers => |s, v| s.http_workers = int(v, 0, 256)? as usize;
    token_refresh_margin_s => |s, v| s.token_refresh_margin = secs(v, 0, 3600)?;
    token_force_interval_s => |s, v| s.token_force_interval = secs(v, 0, 86_400)?;
    session_ttl_s => |s, v| s.session_ttl = secs(v, 60, 365 * 86_400)?;
    wechat_timeout_s => |s, v| s.wechat_timeout = secs(v, 1, 120)?;
    sender_workers => |s, v| s.sender_workers = int(v, 1, 4096)? as usize;
    sender_lease_s => |s, v| s.sender_lease = secs(v, 2, 3600)?;
    young_window_s => |s, v| s.young_window = secs(v, 0, 3600)?;
    young_retry_s => |s, v| s.young_retry = secs(v, 0, 600)?;
    send_max_retries => |s, v| s.send_max_retries = int(v, 0, 100)?;
    send_backoff_base_ms => |s, v| s.send_backoff_base = Duration::from_millis(int(v, 1, 60_000)?.into());
    shutdown_timeout_s => |s, v| s.shutdown_timeout = secs(v, 0, 600)?;
    purge_interval_s => |s, v| s.purge_interval = secs(v, 1, 86_400)?;
    credential_retention_s => |s, v| s.retention.credentials = secs(v, 0, u32::MAX)?;
    message_retention_s => |s, v| s.retention.messages = secs(v, 3600, u32::MAX)?;
    // The contract keeps idempotency keys at least 24 h.
    idempotency_retention_s => |s, v| s.retention.idempotency_keys = secs(v, 86_400, u32::MAX)?;
    subscription_templates => |s, v| s.subscription_templates = template_ids(v)?;
    template_refresh_s => |s, v| s.template_refresh = secs(v, 1, 86_400)?;
    rate_session_per_min => |s, v| s.limits.per_session_per_minute = int(v, 0, 1_000_000)?;
    rate_ip_per_min => |s, v| s.limits.per_ip_per_minute = int(v, 0, 10_000_000)?;
    rate_login_ip_per_min => |s, v| s.limits.login_per_ip_per_minute = int(v, 0, 1_000_000)?;
    rate_login_per_s => |s, v| s.limits.login_per_app_per_second = int(v, 0, 1_000_000)?;
    trusted_proxies => |s, v| s.trusted_proxies = networks(v)?;
    rate_key_per_s => |s, v| s.limits.per_key_per_second = int(v, 0, 10_000_000)?;
    rate_auth_fail_per_min => |s, v| s.limits.auth_failures_per_minute = int(v, 0, 1_000_000)?;
    max_waiters_per_key => |s, v| s.limits.max_waiters_per_key = int(v, 0, 1_000_000)?;
    webhook_allow_private => |s, v| s.webhooks.allow_private = boolean(v)?;
    webhook_timeout_s => |s, v| s.webhooks.timeout = secs(v, 1, 60)?;
    webhook_backoff_base_ms => |s, v| s.webhooks.backoff_base = Duration::from_millis(int(v, 1, 3_600_000)?.into());
    webhook_retry_window_s => |s, v| s.webhooks.retry_window = secs(v, 1, 30 * 86_400)?;
    webhook_workers => |s, v| s.webhooks.workers = int(v, 1, 64)? as usize;
    push => |s, v| s.push = parse_push(v)?;
    push_forward => |s, v| s.push_forward = parse_push_forward(v)?;
}

/// `LEDGER_*` variables that are not settings of the service: the file of settings,
/// the `sim` command's own flags, and the project's test and CI scripts' variables
/// (which the processes they start inherit).
pub const OTHER_VARIABLES: &[&str] = &[
    "LEDGER_CONFIG",
    "LEDGER_SIM_BIND",
    "LEDGER_SIM_APPS",
    "LEDGER_SIM_PUSH",
    "LEDGER_SIM_PUSH_URL",
    "LEDGER_BIN",
    "LEDGER_TEST_POSTGRES_URL",
];

/// A `LEDGER_*` variable that names no setting: a misspelling is an error, since a
/// setting silently left at its default (e.g. `LEDGER_APP` for `LEDGER_APPS`, which
/// starts the sandbox) is worse than a service that does not start.
fn is_unknown_variable(name: &str) -> bool {
    name.starts_with("LEDGER_")
        && !OTHER_VARIABLES.contains(&name)
        && by_name(&name["LEDGER_".len()..].to_ascii_lowercase()).is_none()
}

fn unknown_variable(name: &str) -> String {
    let closest = SETTINGS
        .iter()
        .map(|s| env_name(s.name))
        .min_by_key(|known| strsim::levenshtein(known, name))
        .filter(|known| strsim::levenshtein(known, name) <= 3);
    match closest {
        Some(known) => format!("no such setting; did you mean {known}?"),
        None => "no such setting (docs/API.md lists them)".into(),
    }
}

fn boolean(raw: &str) -> Result<bool, String> {
    match raw {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{raw:?} is neither true nor false")),
    }
}

fn by_name(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// Flattens the TOML file into `key → text`; numbers and booleans become text so the
/// file and the environment go through one parser.
fn toml_values(text: &str) -> Result<BTreeMap<String, String>, SettingsError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| SettingsError {
        name: "LEDGER_CONFIG".into(),
        problem: format!("not valid TOML: {}", e.message()),
    })?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        if by_name(&key).is_none() {
            return Err(SettingsError {
                name: "LEDGER_CONFIG".into(),
                problem: format!("unknown setting {key:?}"),
            });
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| SettingsError::new(&key, "an array may only hold strings"))?
                .join(","),
            _ => return Err(SettingsError::new(&key, "expected a string or a number")),
        };
        out.insert(key, text);
    }
    Ok(out)
}

fn int(raw: &str, min: u32, max: u32) -> Result<u32, String> {
    match raw.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{raw:?} is not a whole number in {min}..={max}")),
    }
}

/// Whole seconds in `min..=max`.
fn secs(raw: &str, min: u32, max: u32) -> Result<Duration, String> {
    Ok(Duration::from_secs(int(raw, min, max)?.into()))
}

fn socket_address(raw: &str) -> Result<String, String> {
    raw.to_socket_addrs()
        .map_err(|e| format!("{raw:?} is not host:port ({e})"))?;
    Ok(raw.into())
}

fn http_url(raw: &str) -> Result<String, String> {
    if !(raw.starts_with("http://") || raw.starts_with("https://")) {
        return Err(format!("{raw:?} is not an http(s) URL"));
    }
    Ok(raw.trim_end_matches('/').into())
}

fn session_secret(raw: &str) -> Result<Secret, String> {
    if raw.len() < 32 {
        return Err("must be at least 32 characters".into());
    }
    Ok(Secret::new(raw))
}

/// A comma-separated list of template ids, each a value as the ledger takes it.
fn template_ids(raw: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect();
    if let Some(bad) = list.iter().find(|t| !crate::ledger::is_valid_value(t)) {
        return Err(format!("{bad:?} is not a template id"));
    }
    Ok(list)
}

/// A comma-separated list of networks in CIDR notation (`10.0.0.0/8`, `fd00::/8`);
/// a bare address is a network of one.
fn networks(raw: &str) -> Result<Vec<IpNet>, String> {
    entries(raw)
        .map(|(n, entry)| {
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("entry {n}: {entry:?} is not an address or a CIDR network"))
        })
        .collect()
}

fn is_plain_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b',' && b != b':')
}

/// `appid:secret[,appid:secret…]`. Errors name an entry by its position: with
/// swapped fields, the appid would be the secret.
pub fn parse_apps(raw: &str) -> Result<Vec<App>, String> {
    let mut apps: Vec<App> = Vec::new();
    for (n, entry) in entries(raw) {
        let (app_id, secret) = entry
            .split_once(':')
            .ok_or("expected appid:secret[,appid:secret…]")?;
        if !is_plain_token(app_id) || app_id.len() > 64 {
            return Err(format!(
                "entry {n}: the appid must be 1..64 printable characters without ',' or ':'"
            ));
        }
        if !is_plain_token(secret) {
            return Err(format!("entry {n}: the secret is empty or malformed"));
        }
        if apps.iter().any(|a| a.app_id == app_id) {
            return Err(format!("entry {n}: the appid is listed twice"));
        }
        apps.push(App {
            app_id: app_id.into(),
            secret: Secret::new(secret),
        });
    }
    Ok(apps)
}

/// `appid:token[:encoding_aes_key][,…]`: the token 3..32 letters or digits, the key
/// exactly 43 base64 characters. Errors name an entry by its position and never
/// quote a token or a key.
/// `LEDGER_PUSH_FORWARD`: `appid=url[,…]`, http(s) URLs, one per app.
fn parse_push_forward(raw: &str) -> Result<BTreeMap<String, String>, String> {
    let mut forward = BTreeMap::new();
    for (n, entry) in entries(raw) {
        let Some((app_id, url)) = entry.split_once('=') else {
            return Err(format!("entry {n}: expected appid=url[,…]"));
        };
        let parsed = url::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if parsed.is_none() {
            return Err(format!("entry {n}: the URL must be http(s)://host/…"));
        }
        if forward
            .insert(app_id.to_string(), url.to_string())
            .is_some()
        {
            return Err(format!("entry {n}: the appid is listed twice"));
        }
    }
    Ok(forward)
}

pub fn parse_push(raw: &str) -> Result<Vec<PushApp>, String> {
    let mut push: Vec<PushApp> = Vec::new();
    for (n, entry) in entries(raw) {
        let mut parts = entry.split(':');
        let (Some(app_id), Some(token), key, None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "entry {n}: expected appid:token[:encoding_aes_key][,…]"
            ));
        };
        if !is_plain_token(app_id) || app_id.len() > 64 {
            return Err(format!(
                "entry {n}: the appid must be 1..64 printable characters without ',' or ':'"
            ));
        }
        if !(3..=32).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!(
                "entry {n}: the token must be 3..32 letters or digits"
            ));
        }
        let base64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
        if let Some(key) = key {
            if key.len() != 43 || !key.bytes().all(base64) {
                return Err(format!(
                    "entry {n}: the EncodingAESKey must be exactly 43 characters of A-Z a-z 0-9 + /"
                ));
            }
        }
        if push.iter().any(|p| p.app_id == app_id) {
            return Err(format!("entry {n}: the appid is listed twice"));
        }
        push.push(PushApp {
            app_id: app_id.into(),
            token: Secret::new(token),
            encoding_aes_key: key.map(Secret::new),
        });
    }
    Ok(push)
}

/// The non-empty entries of a comma-separated list, numbered from 1.
fn entries(raw: &str) -> impl Iterator<Item = (usize, &str)> {
    raw.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .enumerate()
        .map(|(i, e)| (i + 1, e))
}

/// `name:role+role:key[,…]`. Errors quote nothing of an entry, only its position:
/// with swapped fields (`shop:KEY:send`) the key sits where a name or role belongs.
fn parse_api_keys(raw: &str) -> Result<Vec<ApiKey>, String> {
    let mut keys: Vec<ApiKey> = Vec::new();
    for (n, entry) in entries(raw) {
        let mut parts = entry.splitn(4, ':');
        let (Some(name), Some(roles), Some(key)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "entry {n}: expected name:role+role:key[:app+app][,…]"
            ));
        };
        if !is_plain_token(name) {
            return Err(format!(
                "entry {n}: the name must be printable characters without ',' or ':'"
            ));
        }
        let mut parsed = Vec::new();
        for r in roles.split('+') {
            let role = Role::parse(r).ok_or_else(|| {
                format!("entry {n}: unknown role (roles are send, admin, token, joined by +)")
            })?;
            if !parsed.contains(&role) {
                parsed.push(role);
            }
        }
        if key.len() < 16 || !key.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return Err(format!(
                "entry {n}: the key must be at least 16 printable characters"
            ));
        }
        // The 4th field (none: every app). Checked against LEDGER_APPS in `validate`;
        // never echoed, since a key that itself holds ':' spills into it.
        let apps = match parts.next() {
            None => AppScope::All,
            Some(apps) => {
                let apps: Vec<String> = apps.split('+').map(str::to_string).collect();
                if apps.iter().any(|a| !crate::ledger::is_valid_value(a)) {
                    return Err(format!(
                        "entry {n}: the 4th field must be app ids joined by + (a key may not contain ':')"
                    ));
                }
                AppScope::Only(apps)
            }
        };
        if let Some(first) = keys.iter().position(|k| k.name == name) {
            return Err(format!("entry {n}: the same name as entry {}", first + 1));
        }
        keys.push(ApiKey {
            name: name.into(),
            roles: parsed,
            key: Secret::new(key),
            apps,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn push_entries_are_checked_and_errors_never_echo_the_key() {
        const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
        let push = parse_push(&format!("wxa:tok3n, wxb:spamtest:{KEY}")).unwrap();
        assert_eq!(push.len(), 2);
        assert_eq!(push[0].token.expose(), "tok3n");
        assert!(push[0].encoding_aes_key.is_none());
        assert_eq!(
            push[1].encoding_aes_key.as_ref().map(|k| k.expose()),
            Some(KEY)
        );
        let short_key = &KEY[..42];
        let bad_key = KEY.replace('a', "-");
        for bad in [
            "wxa".to_string(),
            "wxa:to".to_string(),
            format!("wxa:{}", "t".repeat(33)),
            "wxa:tok-en".to_string(),
            format!("wxa:token:{short_key}"),
            format!("wxa:token:{bad_key}"),
            format!("wxa:token:{KEY}:more"),
            format!("wxa:token:{KEY},wxa:other"),
        ] {
            let e = parse_push(&bad).unwrap_err();
            assert!(!e.contains(short_key) && !e.contains("bcdefghij"), "{e}");
            assert!(!e.contains("token:") && !e.contains("tok-en"), "{e}");
        }
        // Through the settings: the push app must be a configured one.
        let e = Settings::from_sources(
            None,
            &env(&[
                ("LEDGER_APPS", "wxa:secret"),
                ("LEDGER_API_KEYS", "k:send:0123456789abcdef0"),
                ("LEDGER_PUSH", "wxb:token"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.name, "LEDGER_PUSH");
        let e = Settings::from_sources(
            None,
            &env(&[("LEDGER_PUSH", &format!("wxa:token:{short_key}"))]),
        )
        .unwrap_err();
        assert!(!e.to_string().contains(short_key), "{e}");
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::from_sources(None, &env(&[])).unwrap();
        assert_eq!(s.bind, "127.0.0.1:8080");
        assert_eq!(s.metrics_bind, None);
        assert_eq!(
            s.database_url,
            DatabaseUrl::Sqlite(PathBuf::from("data/ledger.db"))
        );
        assert_eq!(s.wechat_api_base, "https://api.weixin.qq.com");
        assert!(s.apps.is_empty());
        assert_eq!(s.prepay_id_uses, 1);
        assert_eq!(s.token_api, TokenApi::Stable);
        assert_eq!(s.user_cap, 200);
        assert_eq!(s.subscription_templates_per_user, 100);
        assert_eq!(s.young_max_retries, 6);
        assert_eq!(s.expiry_margin, Duration::from_secs(600));
    }

    #[test]
    fn environment_wins_over_the_file() {
        let file = "prepay_id_uses = 3\nuser_cap = 5\napps = [\"wxa:s1\", \"wxb:s2\"]\napi_keys = \"ops:admin:0123456789abcdef\"\n";
        let s =
            Settings::from_sources(Some(file), &env(&[("LEDGER_PREPAY_ID_USES", "2")])).unwrap();
        assert_eq!(s.prepay_id_uses, 2);
        assert_eq!(s.user_cap, 5);
        assert_eq!(s.apps.len(), 2);
        assert_eq!(s.apps[1].app_id, "wxb");
        assert_eq!(s.api_keys[0].roles, vec![Role::Admin]);
    }

    #[test]
    fn api_keys_carry_roles() {
        let s = Settings::from_sources(
            None,
            &env(&[
                ("LEDGER_APPS", "wx1:sec"),
                (
                    "LEDGER_API_KEYS",
                    "shop:send+admin+token:s3cr3t-s3cr3t-s3cr3t,ops:admin:0123456789abcdef",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.api_keys[0].name, "shop");
        assert_eq!(
            s.api_keys[0].roles,
            vec![Role::Send, Role::Admin, Role::Token]
        );
        assert_eq!(s.api_keys[0].key.expose(), "s3cr3t-s3cr3t-s3cr3t");
        assert_eq!(s.api_keys[1].name, "ops");
    }

    #[test]
    fn the_fourth_field_limits_a_key_to_apps() {
        let s = Settings::from_sources(
            None,
            &env(&[
                ("LEDGER_APPS", "wxa:sec,wxb:sec,wxc:sec"),
                (
                    "LEDGER_API_KEYS",
                    "shop:send:0123456789abcdef:wxa+wxb,ops:admin:fedcba9876543210",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.api_keys[0].apps,
            AppScope::Only(vec!["wxa".into(), "wxb".into()])
        );
        assert_eq!(s.api_keys[0].key.expose(), "0123456789abcdef");
        assert_eq!(s.api_keys[1].apps, AppScope::All);
        // An app LEDGER_APPS does not know (or a key holding ':', which spills into
        // the 4th field) is an error that names the key, never its parts.
        for keys in [
            "shop:send:0123456789abcdef:wxz",
            "shop:send:0123456789:abcdef",
            "shop:send:0123456789abcdef:",
        ] {
            let err = Settings::from_sources(
                None,
                &env(&[("LEDGER_APPS", "wxa:sec"), ("LEDGER_API_KEYS", keys)]),
            )
            .unwrap_err();
            assert_eq!(err.name, "LEDGER_API_KEYS", "{keys}");
            let shown = err.to_string();
            assert!(
                !shown.contains("0123456789")
                    && !shown.contains("abcdef")
                    && !shown.contains("wxz"),
                "{shown}"
            );
        }
    }

    #[test]
    fn a_bad_value_names_the_setting_and_hides_secrets() {
        let cases = [
            ("LEDGER_PREPAY_ID_USES", "many"),
            ("LEDGER_DATABASE_URL", "mysql://x"),
            ("LEDGER_TOKEN_API", "fast"),
            ("LEDGER_APPS", "wx1"),
            ("LEDGER_API_KEYS", "shop:sudo:0123456789abcdef"),
            ("LEDGER_API_KEYS", "shop:send:short"),
            ("LEDGER_BIND", "nowhere"),
            ("LEDGER_WECHAT_API_BASE", "ftp://x"),
        ];
        for (name, value) in cases {
            let err = Settings::from_sources(None, &env(&[(name, value)])).unwrap_err();
            assert_eq!(err.name, name, "{value}");
        }
        let err = Settings::from_sources(
            None,
            &env(&[("LEDGER_API_KEYS", "shop:sudo:topsecretvalue123")]),
        )
        .unwrap_err();
        assert!(!err.to_string().contains("topsecretvalue123"), "{err}");
    }

    /// Swapped or misplaced fields put a key (or an app secret) where a name, a role
    /// or an appid belongs; the error must not quote it, not even in part.
    #[test]
    fn a_misplaced_key_is_never_echoed() {
        const KEY: &str = "0123456789abcdef";
        let cases = [
            ("LEDGER_API_KEYS", format!("shop:{KEY}:send")),
            (
                "LEDGER_API_KEYS",
                format!("shop:send+{KEY}:longenoughkey-0001"),
            ),
            ("LEDGER_API_KEYS", format!("{KEY}:send:shop")),
            (
                "LEDGER_API_KEYS",
                format!("{KEY}:send:longenoughkey-0001,{KEY}:admin:longenoughkey-0002"),
            ),
            ("LEDGER_API_KEYS", KEY.to_string()),
            ("LEDGER_APPS", format!("{}:wx1", KEY.repeat(5))),
            ("LEDGER_APPS", format!("{KEY}:")),
            ("LEDGER_APPS", format!("{KEY}:wx1,{KEY}:wx2")),
        ];
        for (name, value) in &cases {
            let err = Settings::from_sources(None, &env(&[(name, value)])).unwrap_err();
            assert_eq!(&err.name, name, "{value}");
            let text = err.to_string();
            for part in KEY.as_bytes().windows(4) {
                let part = std::str::from_utf8(part).unwrap();
                assert!(!text.contains(part), "{value:?} gave {text:?}");
            }
        }
    }

    #[test]
    fn apps_without_keys_are_refused() {
        let err = Settings::from_sources(None, &env(&[("LEDGER_APPS", "wx1:sec")])).unwrap_err();
        assert_eq!(err.name, "LEDGER_API_KEYS");
    }

    #[test]
    fn each_setting_is_declared_once_and_read_from_its_variable() {
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len(), "a setting is declared twice");
        // A bad value is reported under the variable's name: the table reached it.
        for setting in SETTINGS {
            let name = env_name(setting.name);
            let err =
                Settings::from_sources(None, &env(&[(name.as_str(), "\u{7f}")])).expect_err(&name);
            assert_eq!(err.name, name);
        }
    }

    #[test]
    fn a_misspelled_variable_is_an_error_naming_the_setting_meant() {
        let err = Settings::from_sources(None, &env(&[("LEDGER_APP", "wx1:sec")])).unwrap_err();
        assert_eq!(err.name, "LEDGER_APP");
        assert!(err.problem.contains("did you mean LEDGER_APPS?"), "{err}");
        let err = Settings::from_sources(None, &env(&[("LEDGER_FROBNICATE", "1")])).unwrap_err();
        assert_eq!(err.name, "LEDGER_FROBNICATE");
        // The scripts' own variables are not settings, and not errors.
        let tools: Vec<(&str, &str)> = OTHER_VARIABLES.iter().map(|v| (*v, "x")).collect();
        let tools: HashMap<String, String> = env(&tools)
            .into_iter()
            .filter(|(k, _)| k != "LEDGER_CONFIG")
            .collect();
        Settings::from_sources(None, &tools).expect("tool variables are accepted");
    }

    #[test]
    fn the_sandbox_is_forced_only_without_apps() {
        let s = Settings::from_sources(None, &env(&[("LEDGER_SANDBOX", "true")])).unwrap();
        assert!(s.sandbox);
        let err = Settings::from_sources(
            None,
            &env(&[
                ("LEDGER_SANDBOX", "true"),
                ("LEDGER_APPS", "wx1:sec"),
                ("LEDGER_API_KEYS", "ops:admin:0123456789abcdef"),
            ]),
        )
        .unwrap_err();
        assert_eq!(err.name, "LEDGER_SANDBOX");
    }

    #[test]
    fn trusted_proxies_are_a_cidr_list() {
        let s = Settings::from_sources(
            None,
            &env(&[(
                "LEDGER_TRUSTED_PROXIES",
                " 10.0.0.0/8, 192.168.1.7,2001:db8::/32 ,::1,172.16.5.9/12",
            )]),
        )
        .unwrap();
        let nets: Vec<String> = s.trusted_proxies.iter().map(|n| n.to_string()).collect();
        // A bare address is a network of one; host bits are dropped.
        assert_eq!(
            nets,
            [
                "10.0.0.0/8",
                "192.168.1.7/32",
                "2001:db8::/32",
                "::1/128",
                "172.16.0.0/12"
            ]
        );
        let toml = Settings::from_sources(
            Some("trusted_proxies = [\"10.1.0.0/16\", \"fd00::/8\"]"),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(toml.trusted_proxies.len(), 2);
        assert!(Settings::from_sources(None, &env(&[]))
            .unwrap()
            .trusted_proxies
            .is_empty());
        for bad in [
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0",
            "proxy.local",
            "10.0.0.0/8;rm",
            "::1/-1",
        ] {
            let err = Settings::from_sources(None, &env(&[("LEDGER_TRUSTED_PROXIES", bad)]))
                .expect_err(bad);
            assert_eq!(err.name, "LEDGER_TRUSTED_PROXIES", "{bad}");
        }
    }

    #[test]
    fn login_limits_default_and_read() {
        let s = Settings::from_sources(None, &env(&[])).unwrap();
        assert_eq!(s.limits.login_per_ip_per_minute, 120);
        assert_eq!(s.limits.login_per_app_per_second, 50);
        let s = Settings::from_sources(
            None,
            &env(&[
                ("LEDGER_RATE_LOGIN_IP_PER_MIN", "0"),
                ("LEDGER_RATE_LOGIN_PER_S", "7"),
            ]),
        )
        .unwrap();
        assert_eq!(s.limits.login_per_ip_per_minute, 0);
        assert_eq!(s.limits.login_per_app_per_second, 7);
    }

    #[test]
    fn the_file_rejects_unknown_keys() {
        let err = Settings::from_sources(Some("prepay_uses = 2"), &env(&[])).unwrap_err();
        assert_eq!(err.name, "LEDGER_CONFIG");
        assert!(err.problem.contains("prepay_uses"));
    }
}
