//! Admin endpoints (role `admin`): a user's quota, the users with live credentials,
//! and the app's totals.

use actix_web::{web, HttpResponse};

use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{AdminRole, Authorized};
use super::{check_openid, resource, AppState};
use crate::{ledger, outbox};

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/admin/users/{openid}/quota").route(web::get().to(quota)))
        .service(resource("/v1/admin/users/{openid}/messages").route(web::get().to(user_messages)))
        .service(resource("/v1/admin/users").route(web::get().to(users)))
        .service(resource("/v1/admin/stats").route(web::get().to(stats)))
        .service(resource("/v1/admin/apps").route(web::get().to(apps)))
        .service(resource("/v1/admin/subscription-templates").route(web::get().to(list_templates)))
        .service(
            resource("/v1/admin/subscription-templates/{template_id}")
                .route(web::put().to(register_template))
                .route(web::delete().to(unregister_template)),
        );
}

#[derive(Debug, Deserialize)]
pub(crate) struct AppQuery {
    app_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/admin/users/{openid}/quota", tag = "admin",
    params(("openid" = String, Path, description = "The user's openid"), ("app_id" = Option<String>, Query, description = "Required when several apps are configured")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "What the user can be sent (zeros for a user never seen)", body = ledger::Quota),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn quota(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    openid: web::Path<String>,
    query: web::Query<AppQuery>,
) -> Result<HttpResponse, ApiError> {
    let openid = openid.into_inner();
    check_openid(&openid)?;
    let app_id = auth.app(&state, query.app_id.as_deref())?;
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
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Users with live credentials, by openid", body = ledger::UserPage),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn users(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    query: web::Query<UsersQuery>,
) -> Result<HttpResponse, ApiError> {
    let UsersQuery {
        app_id,
        limit,
        cursor,
    } = query.into_inner();
    let app_id = auth.app(&state, app_id.as_deref())?;
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
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Credential totals and the last 24 h of messages", body = crate::stats::AppStats),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn stats(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    query: web::Query<AppQuery>,
) -> Result<HttpResponse, ApiError> {
    let app_id = auth.app(&state, query.app_id.as_deref())?;
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
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "The user's latest messages, newest first", body = MessagesBody),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn user_messages(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    openid: web::Path<String>,
    query: web::Query<MessagesQuery>,
) -> Result<HttpResponse, ApiError> {
    let openid = openid.into_inner();
    check_openid(&openid)?;
    let app_id = auth.app(&state, query.app_id.as_deref())?;
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
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Configured apps and their access_token expiry", body = AppsBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn apps(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut apps = Vec::new();
    for app in state.settings.apps.iter().filter(|a| auth.sees(&a.app_id)) {
        let stored = state.tokens.stored(&app.app_id).await?;
        apps.push(AppView {
            app_id: app.app_id.clone(),
            token_expires_at: (!stored.token.is_empty()).then_some(stored.expires_at),
            token_last_error: stored.last_error,
        });
    }
    Ok(HttpResponse::Ok().json(AppsBody { apps }))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct TemplatesBody {
    app_id: String,
    /// Every subscription template of the app, from whichever source knows it.
    templates: Vec<TemplateView>,
    /// From LEDGER_SUBSCRIPTION_TEMPLATES, for every app.
    configured: Vec<String>,
    /// Registered for this app through this API.
    registered: Vec<String>,
}

/// One subscription template: where the ledger knows it from and, when WeChat
/// listed it, its title and data keys.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct TemplateView {
    template_id: String,
    /// `wechat` (getPrivateTemplateList), `configured` or `registered`; a template
    /// WeChat lists is shown as `wechat` whatever else names it.
    source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
    /// The data keys a message of it may use (WeChat's list only).
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    #[serde(with = "crate::time::rfc3339::option")]
    fetched_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[utoipa::path(get, path = "/v1/admin/subscription-templates", tag = "admin",
    params(("app_id" = Option<String>, Query, description = "Required when several apps are configured")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Templates sent with subscribe-send", body = TemplatesBody),
        (status = 400, description = "invalid_request or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 404, description = "unknown_app", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody)
    ))]
pub(crate) async fn list_templates(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    query: web::Query<AppQuery>,
) -> Result<HttpResponse, ApiError> {
    let app_id = auth.app(&state, query.app_id.as_deref())?;
    let id = app_id.clone();
    let (listed, registered) = state
        .db
        .run(move |c| {
            Ok((
                outbox::templates::listed(c, &id)?,
                outbox::templates::registered(c, &id)?,
            ))
        })
        .await?;
    let configured = state.settings.subscription_templates.clone();
    let mut templates: Vec<TemplateView> = listed
        .into_iter()
        .map(|t| TemplateView {
            template_id: t.template_id,
            source: "wechat",
            title: Some(t.title),
            keys: Some(t.keys),
            fetched_at: Some(t.fetched_at),
        })
        .collect();
    let others = (configured.iter().map(|t| (t, "configured")))
        .chain(registered.iter().map(|t| (t, "registered")));
    for (template_id, source) in others {
        if !templates.iter().any(|t| &t.template_id == template_id) {
            templates.push(TemplateView {
                template_id: template_id.clone(),
                source,
                title: None,
                keys: None,
                fetched_at: None,
            });
        }
    }
    Ok(HttpResponse::Ok().json(TemplatesBody {
        app_id,
        templates,
        configured,
        registered,
    }))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct TemplateBody {
    app_id: String,
    template_id: String,
    registered: bool,
}

fn template_id(path: &str) -> Result<String, ApiError> {
    if ledger::is_valid_value(path) {
        Ok(path.to_string())
    } else {
        Err(ApiError::invalid_request(
            "template_id must be 1..128 printable ASCII characters",
        ))
    }
}

#[utoipa::path(put, path = "/v1/admin/subscription-templates/{template_id}", tag = "admin",
    params(("template_id" = String, Path, description = "The subscribe-message template"),
        ("app_id" = Option<String>, Query, description = "Required when several apps are configured")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Registered: messages of this template go by subscribe-send", body = TemplateBody),
        (status = 400, description = "invalid_request or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 404, description = "unknown_app", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody)
    ))]
pub(crate) async fn register_template(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<AppQuery>,
) -> Result<HttpResponse, ApiError> {
    let template_id = template_id(&path)?;
    let app_id = auth.app(&state, query.app_id.as_deref())?;
    let (a, t) = (app_id.clone(), template_id.clone());
    state
        .db
        .run(move |c| outbox::templates::register(c, &a, &t))
        .await?;
    Ok(HttpResponse::Ok().json(TemplateBody {
        app_id,
        template_id,
        registered: true,
    }))
}

#[utoipa::path(delete, path = "/v1/admin/subscription-templates/{template_id}", tag = "admin",
    params(("template_id" = String, Path, description = "The subscribe-message template"),
        ("app_id" = Option<String>, Query, description = "Required when several apps are configured")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Unregistered (configured templates stay)", body = TemplateBody),
        (status = 400, description = "invalid_request or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 404, description = "unknown_app, or not_found: the template was not registered", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody)
    ))]
pub(crate) async fn unregister_template(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<AppQuery>,
) -> Result<HttpResponse, ApiError> {
    let template_id = template_id(&path)?;
    let app_id = auth.app(&state, query.app_id.as_deref())?;
    let (a, t) = (app_id.clone(), template_id.clone());
    let removed = state
        .db
        .run(move |c| outbox::templates::unregister(c, &a, &t))
        .await?;
    if !removed {
        return Err(ApiError::not_found("the template is not registered"));
    }
    Ok(HttpResponse::Ok().json(TemplateBody {
        app_id,
        template_id,
        registered: false,
    }))
}
