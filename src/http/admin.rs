//! Admin endpoints (role `admin`): a user's quota, the users with live credentials,
//! and the app's totals.

use actix_web::{web, HttpResponse};

use serde::Deserialize;

use super::auth::{AdminRole, Authorized};
use super::error::ApiError;
use super::{check_openid, resource, AppState};
use crate::ledger;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/admin/users/{openid}/quota").route(web::get().to(quota)))
        .service(resource("/v1/admin/users").route(web::get().to(users)))
        .service(resource("/v1/admin/stats").route(web::get().to(stats)));
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

async fn stats(
    _auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    query: web::Query<AppQuery>,
) -> Result<HttpResponse, ApiError> {
    let app_id = state.resolve_app(query.app_id.as_deref())?;
    let stats = state
        .db
        .run(move |conn| ledger::stats(conn, &app_id, crate::time::now()))
        .await?;
    Ok(HttpResponse::Ok().json(stats))
}
