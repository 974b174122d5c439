//! Webhook administration (role `admin`): register, list and delete webhooks, read
//! their deliveries and retry a failed one. The secret is shown by the PUT that
//! sets it and never again.

use actix_web::{web, HttpResponse};
use base64::Engine;
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{AdminRole, Authorized};
use super::{resource, AppState};
use crate::auth::AppScope;
use crate::webhooks::{self, guard, DeliveryStatus, EventType, NewWebhook, Retried};

/// Whether a key acting on `scope` may see and change a webhook of `app_ids`
/// (None: every app): a key limited to apps sees only webhooks limited to them.
fn covers(scope: &AppScope, app_ids: Option<&[String]>) -> bool {
    match (scope, app_ids) {
        (AppScope::All, _) => true,
        (AppScope::Only(_), None) => false,
        (AppScope::Only(_), Some(ids)) => ids.iter().all(|id| scope.allows(id)),
    }
}

/// The webhook `name` if this key may see it (None: absent or not its apps').
async fn visible(
    state: &AppState,
    scope: &AppScope,
    name: &str,
) -> Result<Option<webhooks::WebhookView>, ApiError> {
    let name = name.to_string();
    let found = state
        .db
        .run(move |c| Ok(webhooks::list(c)?.into_iter().find(|w| w.name == name)))
        .await?;
    Ok(found.filter(|w| covers(scope, w.app_ids.as_deref())))
}

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/admin/webhooks").route(web::get().to(list)))
        .service(
            resource("/v1/admin/webhooks/{name}")
                .route(web::put().to(put))
                .route(web::delete().to(delete)),
        )
        .service(resource("/v1/admin/webhooks/{name}/deliveries").route(web::get().to(deliveries)))
        .service(resource("/v1/admin/webhook-deliveries/{id}/retry").route(web::post().to(retry)));
}

/// A secret given by the caller: at least this long.
const MIN_SECRET: usize = 32;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutWebhook {
    /// http(s) URL the events are POSTed to.
    url: String,
    /// Any of message.finished, message.delivery, subscription.exhausted.
    events: Vec<String>,
    /// Only these apps' events; absent: every app's.
    app_ids: Option<Vec<String>>,
    /// The signing secret (at least 32 characters); absent: one is generated.
    secret: Option<String>,
}

/// The answer to PUT: the webhook and its secret (shown this once).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct CreatedWebhook {
    name: String,
    url: String,
    events: Vec<EventType>,
    app_ids: Option<Vec<String>>,
    secret: String,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct WebhooksBody {
    webhooks: Vec<webhooks::WebhookView>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct DeliveriesBody {
    deliveries: Vec<webhooks::DeliveryView>,
}

/// A webhook's name: 1..64 of letters, digits, `-`, `_` and `.`.
fn check_name(name: &str) -> Result<(), ApiError> {
    let fine = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fine {
        Ok(())
    } else {
        Err(ApiError::invalid_request(
            "a webhook name is 1..64 letters, digits, '-', '_' or '.'",
        ))
    }
}

fn check_secret(secret: &str) -> Result<(), ApiError> {
    let fine =
        (MIN_SECRET..=256).contains(&secret.len()) && secret.chars().all(|c| c.is_ascii_graphic());
    if fine {
        Ok(())
    } else {
        Err(ApiError::invalid_request(format!(
            "secret must be {MIN_SECRET}..256 printable ASCII characters without white space"
        )))
    }
}

/// `whsec_` and 32 random bytes, base64url.
fn generate_secret() -> String {
    let raw: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    )
}

#[utoipa::path(put, path = "/v1/admin/webhooks/{name}", tag = "webhooks",
    params(("name" = String, Path, description = "1..64 letters, digits, '-', '_' or '.'")),
    request_body = PutWebhook,
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Created or replaced; the secret is returned by this call only", body = CreatedWebhook),
        (status = 400, description = "invalid_request: a bad name, URL (not http(s), or reaching a loopback, link-local or private address), event or secret", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 404, description = "unknown_app: an app_ids entry is not configured", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody)
    ))]
pub(crate) async fn put(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<PutWebhook>,
) -> Result<HttpResponse, ApiError> {
    let name = name.into_inner();
    check_name(&name)?;
    let PutWebhook {
        url,
        events,
        app_ids,
        secret,
    } = body.into_inner();
    let parsed = guard::parse_url(&url).map_err(ApiError::invalid_request)?;
    if events.is_empty() {
        return Err(ApiError::invalid_request(
            "events must name at least one event",
        ));
    }
    let mut types = Vec::new();
    for e in &events {
        let t = EventType::parse(e).ok_or_else(|| {
            ApiError::invalid_request(format!(
                "unknown event {e:?}: one of message.finished, message.delivery, subscription.exhausted"
            ))
        })?;
        if !types.contains(&t) {
            types.push(t);
        }
    }
    let app_ids = match app_ids {
        // A key limited to apps makes webhooks of its apps only.
        None => match &auth.apps {
            AppScope::All => None,
            AppScope::Only(apps) => Some(apps.clone()),
        },
        Some(ids) if ids.is_empty() => {
            return Err(ApiError::invalid_request(
                "app_ids must name at least one app (leave it out for every app)",
            ))
        }
        Some(ids) => {
            let mut resolved: Vec<String> = Vec::new();
            for id in ids {
                let id = auth.app(&state, Some(&id))?;
                if !resolved.contains(&id) {
                    resolved.push(id);
                }
            }
            Some(resolved)
        }
    };
    let secret = match secret {
        Some(s) => {
            check_secret(&s)?;
            s
        }
        None => generate_secret(),
    };
    let existing = {
        let name = name.clone();
        state
            .db
            .run(move |c| Ok(webhooks::list(c)?.into_iter().find(|w| w.name == name)))
            .await?
    };
    if existing.is_some_and(|w| !covers(&auth.apps, w.app_ids.as_deref())) {
        return Err(ApiError::new(
            actix_web::http::StatusCode::FORBIDDEN,
            "forbidden",
            "this webhook receives events of apps this key does not act on",
        ));
    }
    guard::check_host(&parsed, state.webhooks.config().allow_private)
        .await
        .map_err(ApiError::invalid_request)?;
    let new = NewWebhook {
        name,
        url: parsed.to_string(),
        events: types,
        app_ids,
        secret: secret.clone(),
    };
    let stored = state.db.run(move |c| webhooks::put(c, &new)).await?;
    log::info!(
        "webhook {} now receives {:?} at {}",
        stored.name,
        events,
        stored.url
    );
    Ok(HttpResponse::Ok().json(CreatedWebhook {
        name: stored.name,
        url: stored.url,
        events: stored.events,
        app_ids: stored.app_ids,
        secret,
    }))
}

#[utoipa::path(get, path = "/v1/admin/webhooks", tag = "webhooks",
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Every webhook (never a secret)", body = WebhooksBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody)
    ))]
pub(crate) async fn list(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut webhooks = state.db.run(webhooks::list).await?;
    webhooks.retain(|w| covers(&auth.apps, w.app_ids.as_deref()));
    Ok(HttpResponse::Ok().json(WebhooksBody { webhooks }))
}

#[utoipa::path(delete, path = "/v1/admin/webhooks/{name}", tag = "webhooks",
    params(("name" = String, Path, description = "The webhook")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 204, description = "Deleted, with its deliveries (pending ones are not sent)"),
        (status = 400, description = "invalid_request: a bad name", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 404, description = "not_found: no such webhook", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody)
    ))]
pub(crate) async fn delete(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = name.into_inner();
    check_name(&name)?;
    if visible(&state, &auth.apps, &name).await?.is_none() {
        return Err(ApiError::not_found("no such webhook"));
    }
    let removed = state.db.run(move |c| webhooks::delete(c, &name)).await?;
    if !removed {
        return Err(ApiError::not_found("no such webhook"));
    }
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeliveriesQuery {
    status: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/admin/webhooks/{name}/deliveries", tag = "webhooks",
    params(("name" = String, Path, description = "The webhook"),
        ("status" = Option<String>, Query, description = "pending, delivered or failed; absent: all"),
        ("limit" = Option<u32>, Query, description = "1..500, default 100")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "The webhook's latest deliveries, newest first", body = DeliveriesBody),
        (status = 400, description = "invalid_request: a bad name, status or limit", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 404, description = "not_found: no such webhook", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody)
    ))]
pub(crate) async fn deliveries(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    name: web::Path<String>,
    query: web::Query<DeliveriesQuery>,
) -> Result<HttpResponse, ApiError> {
    let name = name.into_inner();
    check_name(&name)?;
    if visible(&state, &auth.apps, &name).await?.is_none() {
        return Err(ApiError::not_found("no such webhook"));
    }
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(DeliveryStatus::parse(s).ok_or_else(|| {
            ApiError::invalid_request("status must be pending, delivered or failed")
        })?),
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid_request("limit must be 1..=500"));
    }
    let found = state
        .db
        .run(move |c| webhooks::deliveries(c, &name, status, limit))
        .await?;
    match found {
        Some(deliveries) => Ok(HttpResponse::Ok().json(DeliveriesBody { deliveries })),
        None => Err(ApiError::not_found("no such webhook")),
    }
}

#[utoipa::path(post, path = "/v1/admin/webhook-deliveries/{id}/retry", tag = "webhooks",
    params(("id" = String, Path, description = "The delivery's id")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Pending again, due now, retried for another window", body = webhooks::DeliveryView),
        (status = 400, description = "invalid_request: a bad id, or the delivery is not failed (only a failed one is retried by hand)", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 404, description = "not_found: no such delivery", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody)
    ))]
pub(crate) async fn retry(
    auth: Authorized<AdminRole>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id: i64 = id
        .parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::invalid_request("a delivery id is a positive integer"))?;
    let apps = auth.apps.clone();
    let retried = state
        .db
        .run(move |c| match webhooks::store::delivery(c, id)? {
            Some(d) if apps.allows(&d.app_id) => webhooks::retry(c, id),
            _ => Ok(Retried::NotFound),
        })
        .await?;
    match retried {
        Retried::Pending(view) => {
            state.webhooks.nudge();
            Ok(HttpResponse::Ok().json(view))
        }
        Retried::NotFound => Err(ApiError::not_found("no such delivery")),
        Retried::NotFailed(status) => Err(ApiError::invalid_request(format!(
            "only a failed delivery is retried by hand; this one is {}",
            status.as_str()
        ))),
    }
}
