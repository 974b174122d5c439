//! access_token endpoints (role `token`): other servers of the business ask here
//! instead of fetching from WeChat themselves and knocking each other out.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{Authorized, TokenRole};
use super::{resource, AppState};
use crate::tokens::{CurrentToken, TokenError};

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/apps/{app_id}/access-token").route(web::get().to(current)))
        .service(resource("/v1/apps/{app_id}/access-token/refresh").route(web::post().to(refresh)));
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::UnknownApp(app) => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_app",
                format!("no app {app:?} is configured"),
            ),
            TokenError::Unavailable(why) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "wechat_unavailable",
                format!("no valid access_token and WeChat did not issue one: {why}"),
            ),
            TokenError::Db(e) => e.into(),
        }
    }
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct TokenBody {
    access_token: String,
    #[serde(with = "crate::time::rfc3339")]
    expires_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct RefreshedBody {
    #[serde(flatten)]
    token: TokenBody,
    /// Whether this call fetched a new token from WeChat.
    refreshed: bool,
}

fn body(token: &CurrentToken) -> TokenBody {
    TokenBody {
        access_token: token.token.expose().to_string(),
        expires_at: token.expires_at,
    }
}

#[utoipa::path(get, path = "/v1/apps/{app_id}/access-token", tag = "token",
    params(("app_id" = String, Path, description = "The app")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "The current access_token", body = TokenBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "wechat_unavailable or unavailable", body = ErrorBody)
    ))]
pub(crate) async fn current(
    auth: Authorized<TokenRole>,
    state: web::Data<AppState>,
    app_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let app_id = auth.app(&state, Some(&app_id))?;
    let token = state.tokens.current(&app_id).await?;
    Ok(HttpResponse::Ok().json(body(&token)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshBody {
    stale_token: String,
}

#[utoipa::path(post, path = "/v1/apps/{app_id}/access-token/refresh", tag = "token",
    params(("app_id" = String, Path, description = "The app")),
    request_body = RefreshBody,
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "The new token if stale_token was current and at least LEDGER_TOKEN_FORCE_INTERVAL_S old, else the current one (refreshed: false)", body = RefreshedBody),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 413, description = "payload_too_large: body over 64 KiB", body = ErrorBody),
        (status = 503, description = "wechat_unavailable or unavailable", body = ErrorBody)
    ))]
pub(crate) async fn refresh(
    auth: Authorized<TokenRole>,
    state: web::Data<AppState>,
    app_id: web::Path<String>,
    req: web::Json<RefreshBody>,
) -> Result<HttpResponse, ApiError> {
    let app_id = auth.app(&state, Some(&app_id))?;
    let (token, refreshed) = state
        .tokens
        .compare_and_refresh(&app_id, &req.stale_token)
        .await?;
    Ok(HttpResponse::Ok().json(RefreshedBody {
        token: body(&token),
        refreshed,
    }))
}
