//! access_token endpoints (role `token`): other servers of the business ask here
//! instead of fetching from WeChat themselves and knocking each other out.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::auth::{Authorized, TokenRole};
use super::error::ApiError;
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

fn body(token: &CurrentToken) -> serde_json::Value {
    json!({
        "access_token": token.token.expose(),
        "expires_at": crate::time::rfc3339::format(&token.expires_at),
    })
}

async fn current(
    _auth: Authorized<TokenRole>,
    state: web::Data<AppState>,
    app_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let token = state.tokens.current(&app_id).await?;
    Ok(HttpResponse::Ok().json(body(&token)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    stale_token: String,
}

async fn refresh(
    _auth: Authorized<TokenRole>,
    state: web::Data<AppState>,
    app_id: web::Path<String>,
    req: web::Json<RefreshBody>,
) -> Result<HttpResponse, ApiError> {
    let (token, refreshed) = state
        .tokens
        .compare_and_refresh(&app_id, &req.stale_token)
        .await?;
    let mut res = body(&token);
    res["refreshed"] = refreshed.into();
    Ok(HttpResponse::Ok().json(res))
}
