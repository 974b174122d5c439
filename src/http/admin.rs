//! Admin endpoints (role `admin`): a user's quota, the users with live credentials,
//! and the app's totals.

use actix_web::{web, HttpResponse};

use serde::Deserialize;

use super::auth::{AdminRole, Authorized};
use super::error::ApiError;
use super::{check_openid, resource, AppState};
use crate::{ledger, outbox};
use serde_json::json;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/admin/users/{openid}/quota").route(web::get().to(quota)))
        .service(resource("/v1/admin/users/{openid}/messages").route(web::get().to(user_messages)))
        .service(resource("/v1/admin/users").route(web::get().to(users)))
        .service(resource("/v1/admin/stats").route(web::get().to(stats)))
        .service(resource("/v1/admin/apps").route(web::get().to(apps)));
}

#[derive(Debug, Deserialize)]
struct AppQuery {
    app_id: Option<String>,
}

async fn quota(
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
struct UsersQuery {
    app_id: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn users(
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
async fn stats(
    _auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    query: web::Query<AppQuery>,
) -> Result<HttpResponse, ApiError> {
    let app_id = state.resolve_app(query.app_id.as_deref())?;
    let (credentials, messages) = state
        .db
        .run(move |conn| {
            let now = crate::time::now();
            Ok((
                ledger::stats(conn, &app_id, now)?,
                outbox::stats(conn, &app_id, now)?,
            ))
        })
        .await?;
    let mut body = serde_json::to_value(credentials).map_err(|e| ApiError::internal(&e))?;
    let messages = serde_json::to_value(messages).map_err(|e| ApiError::internal(&e))?;
    if let (Some(body), serde_json::Value::Object(messages)) = (body.as_object_mut(), messages) {
        body.extend(messages);
    }
    Ok(HttpResponse::Ok().json(body))
}

#[derive(Debug, Deserialize)]
struct MessagesQuery {
    app_id: Option<String>,
    limit: Option<u32>,
}

/// A user's latest messages (none for a user never seen).
async fn user_messages(
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
    Ok(HttpResponse::Ok().json(json!({ "messages": messages })))
}

/// The configured apps and their access_token state (never the token itself).
async fn apps(
    _auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut apps = Vec::new();
    for app in &state.settings.apps {
        let stored = state.tokens.stored(&app.app_id).await?;
        apps.push(json!({
            "app_id": app.app_id,
            "token_expires_at": (!stored.token.is_empty())
                .then(|| crate::time::rfc3339::format(&stored.expires_at)),
            "token_last_error": stored.last_error,
        }));
    }
    Ok(HttpResponse::Ok().json(json!({ "apps": apps })))
}
