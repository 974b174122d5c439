//! `/v1/campaigns` ("notify these users", role `send`; an `admin` key may also read,
//! pause, resume and cancel) and `GET /v1/messages?campaign_id=…` (its recipients).

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorBody};
use super::extract::{Authorized, SendOrAdminRole, SendRole};
use super::messages::{
    channel_for, check_content, content, idempotency_key, parse_send_at, DataIn,
};
use super::{check_openid, AppState};
use crate::auth::AppScope;
use crate::campaigns::{
    self, Acted, Action, Audience, CampaignPage, CampaignStatus, CampaignView, Created,
    NewCampaign, MAX_AUDIENCE,
};
use crate::outbox::{self, MessageView};

/// A campaign's body may carry 100,000 openids of up to 128 characters.
pub const CAMPAIGN_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// Most recipients released per second a campaign may ask for.
const MAX_RATE_PER_S: u32 = 10_000;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        super::resource("/v1/campaigns")
            .app_data(super::json_config(CAMPAIGN_BODY_LIMIT))
            .app_data(web::PayloadConfig::new(CAMPAIGN_BODY_LIMIT))
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(super::resource("/v1/campaigns/{id}").route(web::get().to(get)))
    .service(super::resource("/v1/campaigns/{id}/{action}").route(web::post().to(act)));
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AudienceIn {
    /// Up to 100,000 openids (duplicates count once).
    openids: Option<Vec<String>>,
    /// Every user holding a credential usable for the template when it starts.
    holding: Option<bool>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CampaignIn {
    app_id: Option<String>,
    #[schema(min_length = 1, max_length = 128, pattern = r"^[\x21-\x7E]+$")]
    template_id: String,
    #[schema(max_length = 1024)]
    page: Option<String>,
    #[serde(default)]
    data: BTreeMap<String, DataIn>,
    miniprogram_state: Option<String>,
    lang: Option<String>,
    audience: AudienceIn,
    /// Recipients sent per second at most (1..10000); absent: as fast as it goes.
    #[schema(minimum = 1, maximum = 10000)]
    rate_per_s: Option<u32>,
    /// RFC 3339; starts then (at most 30 days ahead; a past time: now).
    #[schema(format = DateTime)]
    send_at: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(message)
}

fn audience(a: AudienceIn) -> Result<Audience, ApiError> {
    match (a.openids, a.holding) {
        (Some(openids), None | Some(false)) => {
            if openids.is_empty() || openids.len() > MAX_AUDIENCE {
                return Err(invalid(format!(
                    "audience.openids must name 1..={MAX_AUDIENCE} openids"
                )));
            }
            for openid in &openids {
                check_openid(openid)?;
            }
            Ok(Audience::Openids(campaigns::distinct(openids)))
        }
        (None, Some(true)) => Ok(Audience::Holding),
        _ => Err(invalid(
            "audience must be {\"openids\": [...]} or {\"holding\": true}",
        )),
    }
}

#[utoipa::path(post, path = "/v1/campaigns", tag = "business",
    request_body = CampaignIn,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = r"^[\x21-\x7E]+$", description = "Same key and body: the same campaign; ≤ 255 characters")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 202, description = "Stored; its recipients are made in the background", body = CampaignView),
        (status = 400, description = "invalid_request, data_invalid or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role or the app", body = ErrorBody),
        (status = 404, description = "unknown_app", body = ErrorBody),
        (status = 413, description = "payload_too_large: body over 16 MiB", body = ErrorBody),
        (status = 422, description = "idempotency_mismatch", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn create(
    auth: Authorized<SendRole>,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<CampaignIn>,
) -> Result<HttpResponse, ApiError> {
    let idempotency = idempotency_key(&req, &auth.key_name)?;
    let c = body.into_inner();
    let app_id = auth.app(&state, c.app_id.as_deref())?;
    check_content(
        &c.template_id,
        c.page.as_deref(),
        &c.data,
        c.miniprogram_state.as_deref(),
        c.lang.as_deref(),
    )?;
    if let Some(rate) = c.rate_per_s {
        if !(1..=MAX_RATE_PER_S).contains(&rate) {
            return Err(invalid(format!("rate_per_s must be 1..={MAX_RATE_PER_S}")));
        }
    }
    let send_at = parse_send_at(c.send_at.as_deref())?;
    let audience = audience(c.audience)?;
    let content = content(c.data, None, c.miniprogram_state, c.lang);
    let channel = channel_for(&state, &app_id, &c.template_id, &content).await?;
    let campaign = NewCampaign {
        app_id,
        template_id: c.template_id,
        channel,
        page: c.page,
        content,
        audience,
        rate_per_s: c.rate_per_s,
        send_at,
    };
    let created = state
        .db
        .run(move |conn| {
            campaigns::create(conn, &campaign, idempotency.as_ref(), crate::time::now())
        })
        .await?;
    let id = match created {
        Created::Campaign(id) => id,
        Created::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_mismatch",
                "this Idempotency-Key was used with a different request",
            ))
        }
    };
    let view = state
        .db
        .run(move |conn| campaigns::view(conn, id, crate::time::now()))
        .await?
        .ok_or_else(|| ApiError::not_found("no such campaign"))?;
    Ok(HttpResponse::Accepted().json(view))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(invalid(format!("limit must be 1..={MAX_PAGE}")))
    }
}

#[utoipa::path(get, path = "/v1/campaigns", tag = "business",
    params(("status" = Option<String>, Query, description = "scheduled, running, paused, done or cancelled"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
        ("limit" = Option<u32>, Query, description = "1..500, default 50")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Campaigns, newest first", body = CampaignPage),
        (status = 400, description = "invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn list(
    auth: Authorized<SendOrAdminRole>,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let ListQuery {
        status,
        cursor,
        limit,
    } = query.into_inner();
    let limit = page_limit(limit)?;
    let status = status
        .map(|s| {
            CampaignStatus::parse(&s).ok_or_else(|| {
                invalid("status must be scheduled, running, paused, done or cancelled")
            })
        })
        .transpose()?;
    let apps = match auth.apps {
        AppScope::All => None,
        AppScope::Only(apps) => Some(apps),
    };
    let page = state
        .db
        .run(move |conn| {
            campaigns::list(
                conn,
                apps.as_deref(),
                status,
                cursor.as_deref(),
                limit,
                crate::time::now(),
            )
        })
        .await?;
    Ok(HttpResponse::Ok().json(page))
}

/// The internal id of the campaign the path names, if this key may see it.
async fn find<R>(
    state: &AppState,
    auth: Authorized<R>,
    public_id: String,
) -> Result<i64, ApiError> {
    let apps = auth.apps;
    state
        .db
        .run(move |conn| campaigns::find(conn, &public_id, |app| apps.allows(app)))
        .await?
        .ok_or_else(|| ApiError::not_found("no such campaign"))
}

#[utoipa::path(get, path = "/v1/campaigns/{id}", tag = "business",
    params(("id" = String, Path, description = "Campaign id")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "The campaign resource", body = CampaignView),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn get(
    auth: Authorized<SendOrAdminRole>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = find(&state, auth, id.into_inner()).await?;
    let view = state
        .db
        .run(move |conn| campaigns::view(conn, id, crate::time::now()))
        .await?
        .ok_or_else(|| ApiError::not_found("no such campaign"))?;
    Ok(HttpResponse::Ok().json(view))
}

#[utoipa::path(post, path = "/v1/campaigns/{id}/{action}", tag = "business",
    params(("id" = String, Path, description = "Campaign id"),
        ("action" = String, Path, description = "pause, resume or cancel")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "The campaign as it now stands (also if it already was so)", body = CampaignView),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "not_found: no such campaign or action", body = ErrorBody),
        (status = 409, description = "conflict: the campaign has finished", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn act(
    auth: Authorized<SendOrAdminRole>,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, action) = path.into_inner();
    let action = match action.as_str() {
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "cancel" => Action::Cancel,
        other => return Err(ApiError::not_found(format!("no campaign action {other:?}"))),
    };
    let id = find(&state, auth, id).await?;
    let acted = state
        .db
        .run(move |conn| campaigns::act(conn, id, action, crate::time::now()))
        .await?;
    match acted {
        Acted::Now(view) => Ok(HttpResponse::Ok().json(view)),
        Acted::Finished(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("the campaign is {}: it cannot change", status.as_str()),
        )),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct MessagesQuery {
    campaign_id: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct MessagePage {
    messages: Vec<MessageView>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/messages", tag = "business",
    params(("campaign_id" = String, Query, description = "The campaign whose recipients to list"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
        ("limit" = Option<u32>, Query, description = "1..500, default 50")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "The campaign's recipients, in the order they were made", body = MessagePage),
        (status = 400, description = "invalid_request (campaign_id missing, a bad cursor or limit)", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "not_found: no such campaign", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn messages(
    auth: Authorized<SendOrAdminRole>,
    state: web::Data<AppState>,
    query: web::Query<MessagesQuery>,
) -> Result<HttpResponse, ApiError> {
    let MessagesQuery {
        campaign_id,
        cursor,
        limit,
    } = query.into_inner();
    let limit = page_limit(limit)?;
    let campaign_id = campaign_id.ok_or_else(|| invalid("campaign_id is required"))?;
    let id = find(&state, auth, campaign_id).await?;
    let page = state
        .db
        .run(move |conn| {
            let after = match &cursor {
                Some(c) => match outbox::recipients::find(conn, id, c)? {
                    Some(after) => after,
                    None => return Ok(None),
                },
                None => 0,
            };
            let mut messages = outbox::recipients_page(conn, id, after, limit + 1)?;
            let more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            let next_cursor = more
                .then(|| messages.last().map(|m| m.id.clone()))
                .flatten();
            Ok(Some(MessagePage {
                messages,
                next_cursor,
            }))
        })
        .await?
        .ok_or_else(|| invalid("cursor is not a message of this campaign"))?;
    Ok(HttpResponse::Ok().json(page))
}
