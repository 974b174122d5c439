//! Mini-program endpoints: log in with a `wx.login()` code, then report credentials
//! with the session that login returned.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{client_ip, ClientSession};
use super::{check_openid, resource, AppState};
use crate::auth::SessionClaims;
use crate::ledger::{self, Item, Kind, Report};
use crate::wechat::errcode::LoginRefusal;

/// Most items one report may carry.
pub const MAX_ITEMS: usize = 50;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/client/session").route(web::post().to(login)))
        .service(resource("/v1/client/credentials").route(web::post().to(report)));
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginBody {
    app_id: Option<String>,
    #[schema(min_length = 1, max_length = 128, pattern = r"^[\x21-\x7E]+$")]
    code: String,
}

#[utoipa::path(post, path = "/v1/client/session", tag = "client",
    request_body = LoginBody,
    responses(
        (status = 200, description = "A session bound to the user", body = SessionResponse),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 413, description = "payload_too_large: body over 64 KiB", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody),
        (status = 401, description = "invalid_code (WeChat 40029)", body = ErrorBody),
        (status = 403, description = "user_blocked (WeChat 40226)", body = ErrorBody),
        (status = 429, description = "rate_limited: too many logins from this address or for this app (Retry-After; WeChat was not called), or WeChat's own limit for the user (45011)", body = ErrorBody),
        (status = 502, description = "wechat_unavailable", body = ErrorBody)
    ))]
pub(crate) async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<LoginBody>,
) -> Result<HttpResponse, ApiError> {
    let addr = client_ip(&state, &req);
    state.limits.ip(&addr)?;
    let LoginBody { app_id, code } = body.into_inner();
    let app_id = state.resolve_app(app_id.as_deref())?;
    if !ledger::is_valid_value(&code) {
        return Err(ApiError::invalid_request(
            "code must be the 1..128 character value wx.login() returned",
        ));
    }
    let secret = state
        .settings
        .app(&app_id)
        .map(|a| a.secret.clone())
        .ok_or_else(|| ApiError::internal(&"resolved app has no secret"))?;
    state.limits.login(&app_id, &addr)?;
    let login = state
        .wechat
        .code_to_session(&app_id, &secret, &code)
        .await
        .map_err(|e| {
            let (status, code, message) = match LoginRefusal::of(e.errcode, e.class) {
                LoginRefusal::InvalidCode => (
                    StatusCode::UNAUTHORIZED,
                    "invalid_code",
                    "the code is invalid, used or expired: call wx.login() again",
                ),
                LoginRefusal::UserBlocked => (
                    StatusCode::FORBIDDEN,
                    "user_blocked",
                    "WeChat blocked this user as high-risk",
                ),
                LoginRefusal::RateLimited => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "WeChat's login rate limit for this user: try again in a minute",
                ),
                LoginRefusal::Unavailable => (
                    StatusCode::BAD_GATEWAY,
                    "wechat_unavailable",
                    "WeChat did not answer; try again",
                ),
                LoginRefusal::Refused => {
                    log::error!("app {app_id}: jscode2session refused: {e}");
                    (
                        StatusCode::BAD_GATEWAY,
                        "wechat_unavailable",
                        "WeChat refused the login; see the service log",
                    )
                }
            };
            ApiError::new(status, code, message)
        })?;
    // login.session_key is dropped here: it is neither stored, logged nor returned.
    check_openid(&login.openid).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "wechat_unavailable",
            "WeChat returned no usable openid",
        )
    })?;
    let expires_at = crate::time::now()
        + chrono::TimeDelta::from_std(state.settings.session_ttl)
            .unwrap_or(chrono::TimeDelta::days(30));
    let session = state.sessions.sign(&app_id, &login.openid, expires_at);
    Ok(HttpResponse::Ok().json(SessionResponse {
        session: session.expose().to_string(),
        openid: login.openid,
        expires_at,
    }))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct SessionResponse {
    /// Send as `Authorization: Bearer <session>` to the client endpoints.
    session: String,
    openid: String,
    #[serde(with = "crate::time::rfc3339")]
    expires_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubscriptionResult {
    template_id: String,
    result: String,
}

/// At most 50 items in all.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientReport {
    #[serde(default)]
    form_ids: Vec<String>,
    #[serde(default)]
    prepay_ids: Vec<String>,
    #[serde(default)]
    subscriptions: Vec<SubscriptionResult>,
}

#[utoipa::path(post, path = "/v1/client/credentials", tag = "client",
    request_body = ClientReport,
    security(("client_session" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Accepted, duplicates and rejections with their reasons", body = ledger::RecordOutcome),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 413, description = "payload_too_large: body over 64 KiB", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn report(
    session: ClientSession,
    state: web::Data<AppState>,
    body: web::Json<ClientReport>,
) -> Result<HttpResponse, ApiError> {
    let ClientReport {
        form_ids,
        prepay_ids,
        subscriptions,
    } = body.into_inner();
    let total = form_ids.len() + prepay_ids.len() + subscriptions.len();
    if total > MAX_ITEMS {
        return Err(ApiError::invalid_request(format!(
            "at most {MAX_ITEMS} items per report, got {total}"
        )));
    }
    let token = |kind| {
        move |value| Item::Token {
            kind,
            value,
            issued_at: None,
        }
    };
    let items: Vec<Item> = form_ids
        .into_iter()
        .map(token(Kind::FormId))
        .chain(prepay_ids.into_iter().map(token(Kind::PrepayId)))
        .chain(subscriptions.into_iter().map(|s| Item::Subscription {
            template_id: s.template_id,
            result: s.result,
        }))
        .collect();
    let SessionClaims { app_id, openid, .. } = session.0;
    let reports = [Report {
        app_id,
        openid,
        items,
    }];
    let outcome = state.reporting.record(reports.into()).await?;
    Ok(HttpResponse::Ok().json(outcome))
}
