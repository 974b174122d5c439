//! Admin endpoints (role `admin`): a user's quota, the users with live credentials,
//! and the app's totals.

use actix_web::{web, HttpResponse};

use serde::Deserialize;

use super::auth::{AdminRole, Authorized};
use super::error::ApiError;
use super::openapi::ErrorBody;
use super::{check_openid, resource, AppState};
use crate::{ledger, outbox};

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/admin/users/{openid}/quota").route(web::get().to(quota)))
        .service(resource("/v1/admin/users/{openid}/messages").route(web::get().to(user_messages)))
        .service(resource("/v1/admin/users").route(web::get().to(users)))
        .service(resource("/v1/admin/stats").route(web::get().to(stats)))
        .service(resource("/v1/admin/apps").route(web::get().to(apps)));
}

#[derive(Debug, Deserialize)]
pub(crate) struct AppQuery {
    app_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/admin/users/{openid}/quota", tag = "admin",
    params(("openid" = String, Path, description = "The user's openid"), ("app_id" = Option<String>, Query, description = "Required when several apps are configured")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "What the user can be sent (zeros for a user never seen)", body = ledger::Quota),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn quota(
    _auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    openid: web::Path<String>,
    query: web::Query<AppQuery>,
) -> Result<HttpResponse, ApiError> {
    let openid = openid.into_inner();
    check_openid(&openid)?;
    let app_id = state.resolve_app(query.app_id.as_deref())?;
    let quota = state
        .db
        .run(move |conn| ledger::quota(conn, &app_id, &openid, crate::time::now()))
        .await?;
    Ok(HttpResponse::Ok().json(quota))
}

/// Default and largest page of `GET /v1/admin/users`.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

#[derive(Debug, Deserialize)]
pub(crate) struct UsersQuery {
    app_id: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/admin/users", tag = "admin",
    params(("app_id" = Option<String>, Query, description = "Required when several apps are configured"), ("limit" = Option<u32>, Query, description = "1..500, default 50"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Users with live credentials, by openid", body = ledger::UserPage),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn users(
    _auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    query: web::Query<UsersQuery>,
) -> Result<HttpResponse, ApiError> {
    let UsersQuery {
        app_id,
        limit,
        cursor,
    } = query.into_inner();
    let app_id = state.resolve_app(app_id.as_deref())?;
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid_request(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    let page = state
        .db
        .run(move |conn| ledger::users(conn, &app_id, limit, cursor.as_deref(), crate::time::now()))
        .await?;
    Ok(HttpResponse::Ok().json(page))
}

/// Credential totals and, over the last 24 h, messages by status, the top WeChat
/// error codes and messages per hour.
#[utoipa::path(get, path = "/v1/admin/stats", tag = "admin",
    params(("app_id" = Option<String>, Query, description = "Required when several apps are configured")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Credential totals and the last 24 h of messages", body = crate::stats::AppStats),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn stats(
    _auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    query: web::Query<AppQuery>,
) -> Result<HttpResponse, ApiError> {
    let app_id = state.resolve_app(query.app_id.as_deref())?;
    let stats = state
        .db
        .run(move |conn| crate::stats::app_stats(conn, &app_id, crate::time::now()))
        .await?;
    Ok(HttpResponse::Ok().json(stats))
}

#[derive(Debug, Deserialize)]
pub(crate) struct MessagesQuery {
    app_id: Option<String>,
    limit: Option<u32>,
}

/// A user's latest messages (none for a user never seen).
#[utoipa::path(get, path = "/v1/admin/users/{openid}/messages", tag = "admin",
    params(("openid" = String, Path, description = "The user's openid"), ("app_id" = Option<String>, Query, description = "Required when several apps are configured"), ("limit" = Option<u32>, Query, description = "1..100, default 20")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The user's latest messages, newest first", body = MessagesBody),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn user_messages(
    _auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    openid: web::Path<String>,
    query: web::Query<MessagesQuery>,
) -> Result<HttpResponse, ApiError> {
    let openid = openid.into_inner();
    check_openid(&openid)?;
    let app_id = state.resolve_app(query.app_id.as_deref())?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid_request("limit must be 1..=100"));
    }
    let messages = state
        .db
        .run(move |conn| outbox::recent(conn, &app_id, &openid, limit))
        .await?;
    Ok(HttpResponse::Ok().json(MessagesBody { messages }))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct MessagesBody {
    messages: Vec<outbox::MessageView>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct AppView {
    app_id: String,
    #[serde(with = "crate::time::rfc3339::option")]
    token_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    token_last_error: Option<String>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct AppsBody {
    apps: Vec<AppView>,
}

/// The configured apps and their access_token state (never the token itself).
#[utoipa::path(get, path = "/v1/admin/apps", tag = "admin",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Configured apps and their access_token expiry", body = AppsBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn apps(
    _auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut apps = Vec::new();
    for app in &state.settings.apps {
        let stored = state.tokens.stored(&app.app_id).await?;
        apps.push(AppView {
            app_id: app.app_id.clone(),
            token_expires_at: (!stored.token.is_empty()).then_some(stored.expires_at),
            token_last_error: stored.last_error,
        });
    }
    Ok(HttpResponse::Ok().json(AppsBody { apps }))
}
