//! The HTTP face of the service: thin handlers that parse, authorize, call the
//! domain and map the result. One module per resource, each with `config`.

pub mod admin;
pub mod admin_page;
pub mod api_docs;
pub mod campaigns;
pub mod client;
pub mod credentials;
pub mod error;
pub mod extract;
pub mod health;
pub mod limits;
pub mod messages;
pub mod openapi;
pub mod push;
pub mod tokens;
pub mod webhooks;

use std::sync::Arc;

use actix_web::error::{JsonPayloadError, PayloadError};
use actix_web::{web, HttpRequest, HttpResponse};

use crate::auth::{KeyRing, SessionKey};
use crate::db::Db;
use crate::ledger::{self, Rules};
use crate::outbox::Sender;
use crate::reporting::Reporting;
use crate::settings::Settings;
use crate::tokens::TokenManager;
use crate::webhooks::Deliverer;
use crate::wechat::client::WechatClient;
use error::ApiError;

/// Largest request body the contract allows.
pub const BODY_LIMIT: usize = 64 * 1024;

/// What every handler may use, shared through `web::Data`.
pub struct AppState {
    pub db: Db,
    pub settings: Arc<Settings>,
    pub rules: Rules,
    pub keys: KeyRing,
    pub sessions: SessionKey,
    pub wechat: WechatClient,
    pub tokens: Arc<TokenManager>,
    pub sender: Arc<Sender>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub limits: limits::RateLimits,
    pub reporting: Reporting,
    pub webhooks: Arc<Deliverer>,
}

impl AppState {
    // Everything a handler reaches, built once by `startup`: a parameter each.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: Db,
        settings: Arc<Settings>,
        sessions: SessionKey,
        wechat: WechatClient,
        tokens: Arc<TokenManager>,
        sender: Arc<Sender>,
        metrics: Arc<crate::metrics::Metrics>,
        webhooks: Arc<Deliverer>,
    ) -> Self {
        let rules = Rules {
            prepay_id_uses: settings.prepay_id_uses,
            expiry_margin: chrono::TimeDelta::from_std(settings.expiry_margin)
                .unwrap_or(chrono::TimeDelta::minutes(10)),
            user_cap: settings.user_cap,
            subscription_templates_per_user: settings.subscription_templates_per_user,
        };
        AppState {
            reporting: Reporting::start(db.clone(), rules.clone(), sender.clone(), metrics.clone()),
            limits: limits::RateLimits::new(settings.limits),
            keys: KeyRing::new(&settings.api_keys),
            db,
            settings,
            rules,
            sessions,
            wechat,
            tokens,
            sender,
            metrics,
            webhooks,
        }
    }

    /// The app a request is about: the named one, or the only one configured.
    pub fn resolve_app(&self, app_id: Option<&str>) -> Result<String, ApiError> {
        match app_id {
            Some(id) => self
                .settings
                .app(id)
                .map(|a| a.app_id.clone())
                .ok_or_else(|| {
                    ApiError::new(
                        actix_web::http::StatusCode::NOT_FOUND,
                        "unknown_app",
                        format!("no app {id:?} is configured"),
                    )
                }),
            None => match self.settings.apps.as_slice() {
                [only] => Ok(only.app_id.clone()),
                _ => Err(ApiError::new(
                    actix_web::http::StatusCode::BAD_REQUEST,
                    "app_id_required",
                    "several apps are configured: say which with app_id",
                )),
            },
        }
    }
}

/// An openid as the ledger stores it: 1..128 printable ASCII, no white space.
pub fn check_openid(openid: &str) -> Result<(), ApiError> {
    if ledger::is_valid_value(openid) {
        Ok(())
    } else {
        Err(ApiError::invalid_request(
            "openid must be 1..128 printable ASCII characters without white space",
        ))
    }
}

/// Mounts every route but `/metrics` (see [`health::metrics_config`]) and the
/// extractor settings that give contract-shaped errors.
pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.app_data(json_config(BODY_LIMIT))
        .app_data(web::PayloadConfig::new(BODY_LIMIT))
        .app_data(
            web::QueryConfig::default()
                .error_handler(|err, _| ApiError::invalid_request(err.to_string()).into()),
        )
        .app_data(
            web::PathConfig::default()
                .error_handler(|err, _| ApiError::invalid_request(err.to_string()).into()),
        )
        .configure(health::config)
        .configure(credentials::config)
        .configure(client::config)
        .configure(tokens::config)
        .configure(messages::config)
        .configure(campaigns::config)
        .configure(push::config)
        .configure(openapi::config)
        .configure(admin::config)
        .configure(webhooks::config)
        .configure(admin_page::config)
        .configure(api_docs::config)
        .default_service(web::to(not_found));
}

/// JSON bodies up to `limit` bytes, with the contract's errors.
pub fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .content_type_required(false)
        .error_handler(move |err, _| json_error(err, limit).into())
}

fn json_error(err: JsonPayloadError, limit: usize) -> ApiError {
    match err {
        JsonPayloadError::Overflow { .. }
        | JsonPayloadError::OverflowKnownLength { .. }
        | JsonPayloadError::Payload(PayloadError::Overflow) => ApiError::payload_too_large(limit),
        JsonPayloadError::Deserialize(e) => ApiError::invalid_request(e.to_string()),
        other => ApiError::invalid_request(other.to_string()),
    }
}

/// A resource that answers a wrong method with the contract's JSON, not an empty 405.
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(|req: HttpRequest| async move {
        Err::<HttpResponse, _>(ApiError::new(
            actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not allowed here", req.method()),
        ))
    }))
}

/// The metrics address (`LEDGER_METRICS_BIND`): `/metrics` and nothing else.
pub fn metrics_only(cfg: &mut web::ServiceConfig) {
    cfg.configure(health::metrics_config)
        .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!("no route {}", req.path())))
}

/// The access log: one line per request (status, method, path, latency), `/healthz`
/// excluded. The path is logged without its query string: the sandbox calls its own
/// simulator with `js_code`, `secret` and `access_token` there.
pub fn access_log() -> actix_web::middleware::Logger {
    actix_web::middleware::Logger::new("%s %{request}xi %Dms")
        .custom_request_replace("request", |req| {
            format!("{} {} {:?}", req.method(), req.path(), req.version())
        })
        .exclude("/healthz")
}

/// Middleware: counts every request by route pattern (not path: openids stay out of
/// label values; no route at all is `unmatched`), method (invented ones are `other`)
/// and status, with its latency. Every label value has a bounded set.
pub async fn observe(
    metrics: Arc<crate::metrics::Metrics>,
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let res = next.call(req).await?;
    metrics.http_request(
        &route,
        method.as_str(),
        res.status().as_u16(),
        started.elapsed(),
    );
    Ok(res)
}
