//! `POST /v1/messages` ("notify user X") and `GET /v1/messages/{id}` (role `send`).

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{Authorized, SendRole};
use super::{check_openid, resource, AppState};
use crate::ledger;
use crate::outbox::{
    self, templates, Channel, Content, IdempotencyKey, MessageView, NewMessage, Submitted,
};
use crate::wechat::subscribe_data;
use crate::wechat::wire::DataValue;

/// Longest `?wait=` and `await_credential_s` the contract allows.
const MAX_WAIT_S: u64 = 30;
const MAX_AWAIT_CREDENTIAL_S: u32 = 600;
const MAX_IDEMPOTENCY_KEY: usize = 255;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/v1/messages")
            .route(web::post().to(create))
            .route(web::get().to(super::campaigns::messages)),
    )
    .service(resource("/v1/messages/{id}").route(web::get().to(get)));
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DataIn {
    value: String,
    color: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MessageIn {
    app_id: Option<String>,
    #[schema(min_length = 1, max_length = 128, pattern = r"^[\x21-\x7E]+$")]
    openid: String,
    #[schema(min_length = 1, max_length = 128, pattern = r"^[\x21-\x7E]+$")]
    template_id: String,
    #[schema(max_length = 1024)]
    page: Option<String>,
    #[serde(default)]
    data: BTreeMap<String, DataIn>,
    emphasis_keyword: Option<String>,
    #[serde(default)]
    #[schema(maximum = 600)]
    await_credential_s: u32,
    miniprogram_state: Option<String>,
    lang: Option<String>,
    /// RFC 3339; not sent before then (at most 30 days ahead; a past time: now).
    #[schema(format = DateTime)]
    send_at: Option<String>,
}

/// How far ahead `send_at` may be.
const MAX_SEND_AHEAD_DAYS: i64 = 30;

#[derive(Debug, Deserialize)]
pub(crate) struct WaitQuery {
    wait: Option<u64>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(message)
}

/// Everything WeChat would refuse as the caller's mistake whatever the credential,
/// refused here before a use is spent.
fn validate(
    state: &AppState,
    auth: &Authorized<SendRole>,
    m: MessageIn,
) -> Result<NewMessage, ApiError> {
    check_openid(&m.openid)?;
    let app_id = auth.app(state, m.app_id.as_deref())?;
    check_content(
        &m.template_id,
        m.page.as_deref(),
        &m.data,
        m.miniprogram_state.as_deref(),
        m.lang.as_deref(),
    )?;
    if m.await_credential_s > MAX_AWAIT_CREDENTIAL_S {
        return Err(invalid(format!(
            "await_credential_s must be 0..={MAX_AWAIT_CREDENTIAL_S}"
        )));
    }
    let send_at = parse_send_at(m.send_at.as_deref())?;
    Ok(NewMessage {
        app_id,
        openid: m.openid,
        template_id: m.template_id,
        channel: Channel::Template,
        page: m.page,
        content: content(m.data, m.emphasis_keyword, m.miniprogram_state, m.lang),
        await_credential_s: m.await_credential_s,
        send_at,
    })
}

/// The parts of a message's content WeChat would refuse whatever the user (a
/// message's, or every recipient's of a campaign).
pub(crate) fn check_content(
    template_id: &str,
    page: Option<&str>,
    data: &BTreeMap<String, DataIn>,
    miniprogram_state: Option<&str>,
    lang: Option<&str>,
) -> Result<(), ApiError> {
    if !ledger::is_valid_value(template_id) {
        return Err(invalid(
            "template_id must be 1..128 printable ASCII characters",
        ));
    }
    if let Some(page) = page {
        if page.len() > 1024 || page.chars().any(char::is_control) {
            return Err(invalid(
                "page must be at most 1024 characters, no control characters",
            ));
        }
    }
    for (key, v) in data {
        let key_ok = (1..=64).contains(&key.len())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !key_ok {
            return Err(invalid(format!(
                "data key {key:?} must be 1..64 letters, digits or _"
            )));
        }
        if v.value.chars().count() > 1024 {
            return Err(invalid(format!(
                "data.{key}.value is longer than 1024 characters"
            )));
        }
    }
    if let Some(s) = miniprogram_state {
        if !["developer", "trial", "formal"].contains(&s) {
            return Err(invalid(
                "miniprogram_state must be developer, trial or formal",
            ));
        }
    }
    if let Some(lang) = lang {
        if !["zh_CN", "en_US", "zh_HK", "zh_TW"].contains(&lang) {
            return Err(invalid("lang must be zh_CN, en_US, zh_HK or zh_TW"));
        }
    }
    Ok(())
}

/// `send_at` of a request: RFC 3339, at most [`MAX_SEND_AHEAD_DAYS`] ahead.
pub(crate) fn parse_send_at(raw: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let at = DateTime::parse_from_rfc3339(raw)
        .map_err(|_| invalid("send_at must be an RFC 3339 time, e.g. 2026-12-24T01:00:00Z"))?
        .with_timezone(&Utc);
    if at > crate::time::now() + chrono::TimeDelta::days(MAX_SEND_AHEAD_DAYS) {
        return Err(invalid(format!(
            "send_at must be at most {MAX_SEND_AHEAD_DAYS} days ahead"
        )));
    }
    Ok(Some(at))
}

pub(crate) fn content(
    data: BTreeMap<String, DataIn>,
    emphasis_keyword: Option<String>,
    miniprogram_state: Option<String>,
    lang: Option<String>,
) -> Content {
    Content {
        data: data
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    DataValue {
                        value: v.value,
                        color: v.color,
                    },
                )
            })
            .collect(),
        emphasis_keyword,
        miniprogram_state,
        lang,
    }
}

/// The channel of the app's template, with the data checked against what WeChat
/// listed of it: only the template's keys, and for a subscribe message each value
/// by its type's rule (WeChat would answer 47003 after a subscription is spent).
pub(crate) async fn channel_for(
    state: &AppState,
    app_id: &str,
    template_id: &str,
    content: &Content,
) -> Result<Channel, ApiError> {
    let configured = state.settings.subscription_templates.clone();
    let (app_id, id) = (app_id.to_string(), template_id.to_string());
    let template = state
        .db
        .run(move |c| templates::lookup(c, &configured, &app_id, &id))
        .await?;
    if let Some(keys) = &template.keys {
        if let Some(key) = content.data.keys().find(|k| !keys.contains(k)) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "data_invalid",
                format!(
                    "data key {key:?} is not a key of template {template_id:?} (its keys: {})",
                    keys.join(", ")
                ),
            ));
        }
    }
    if template.channel == Channel::Subscription {
        if let Some(field) = subscribe_data::first_invalid(&content.data) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "data_invalid",
                format!("{field} breaks its type's rule for subscribe messages"),
            ));
        }
    }
    Ok(template.channel)
}

pub(crate) fn idempotency_key(
    req: &HttpRequest,
    scope: &str,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = req.headers().get("Idempotency-Key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| {
            (1..=MAX_IDEMPOTENCY_KEY).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            invalid(format!(
                "Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY} printable ASCII characters"
            ))
        })?;
    Ok(Some(IdempotencyKey {
        scope: scope.to_string(),
        key: key.to_string(),
    }))
}

fn wait_for(query: &WaitQuery) -> Result<Duration, ApiError> {
    match query.wait {
        Some(s) if s > MAX_WAIT_S => Err(invalid(format!("wait must be 0..={MAX_WAIT_S}"))),
        s => Ok(Duration::from_secs(s.unwrap_or(0))),
    }
}

#[utoipa::path(post, path = "/v1/messages", tag = "business",
    request_body = MessageIn,
    params(("wait" = Option<u64>, Query, maximum = 30, description = "Wait up to N (0..30) seconds for a final status"),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = r"^[\x21-\x7E]+$", description = "Same key and body: the same message; ≤ 255 characters")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Final within ?wait", body = MessageView),
        (status = 202, description = "Stored; the current state", body = MessageView),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 413, description = "payload_too_large: body over 64 KiB", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody),
        (status = 422, description = "idempotency_mismatch", body = ErrorBody)
    ))]
pub(crate) async fn create(
    auth: Authorized<SendRole>,
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<WaitQuery>,
    body: web::Json<MessageIn>,
) -> Result<HttpResponse, ApiError> {
    let wait = wait_for(&query)?;
    let idempotency = idempotency_key(&req, &auth.key_name)?;
    let mut message = validate(&state, &auth, body.into_inner())?;
    message.channel = channel_for(
        &state,
        &message.app_id,
        &message.template_id,
        &message.content,
    )
    .await?;
    // The key's place among waiters is taken before anything is stored, so a 429
    // here leaves nothing behind and a retry cannot make a second message.
    let waiting = if wait.is_zero() {
        None
    } else {
        Some(state.limits.waiter(&auth.key_name)?)
    };
    let submitted = state
        .db
        .run(move |c| outbox::submit(c, &message, idempotency.as_ref(), crate::time::now()))
        .await?;
    let id = match submitted {
        Submitted::Message(id) => id,
        Submitted::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_mismatch",
                "this Idempotency-Key was used with a different request",
            ))
        }
    };
    state.sender.nudge();
    match waiting {
        Some(_slot) => respond(&state, id, wait).await,
        None => Ok(HttpResponse::Accepted().json(load(&state, id).await?)),
    }
}

#[utoipa::path(get, path = "/v1/messages/{id}", tag = "business",
    params(("id" = String, Path, description = "Message id")),
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "The message resource", body = MessageView),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn get(
    auth: Authorized<SendRole>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let apps = auth.apps;
    let view = state
        .db
        .run(move |c| outbox::view_public(c, &id, |app| apps.allows(app)))
        .await?
        .ok_or_else(|| ApiError::not_found("no such message"))?;
    Ok(HttpResponse::Ok().json(view))
}

async fn load(state: &AppState, id: i64) -> Result<MessageView, ApiError> {
    state
        .db
        .run(move |c| outbox::view(c, id))
        .await?
        .ok_or_else(|| ApiError::not_found("no such message"))
}

/// How often a waiter reads its message again although nothing woke it.
const RECHECK: Duration = Duration::from_secs(1);

/// 200 with the final state if it comes within `wait`, else 202 with the current.
///
/// A finish in this instance wakes this waiter alone ([`outbox::waiters`]). A message
/// finished by another instance cannot be signalled in-process, so the waiter also
/// reads it again every [`RECHECK`]: on a multi-instance deployment `?wait` answers
/// up to that much later, and each waiter costs at most one read a second (the
/// per-key cap bounds how many there are). `await_credential_s` keeps no waiter in
/// process at all: the message waits as a row, and a report makes it due in the
/// database (`store::wake_waiting_many`) and nudges a sender worker.
async fn respond(state: &AppState, id: i64, wait: Duration) -> Result<HttpResponse, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    // Registered before the first read, so a finish after that read is not missed.
    // Dropped on every way out — answer, timeout, or the client going away (actix
    // drops this future) — which takes the registry entry with it.
    let mut waiter = state.sender.waiter(id);
    loop {
        let view = load(state, id).await?;
        if view.status.is_final() {
            return Ok(HttpResponse::Ok().json(view));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(HttpResponse::Accepted().json(view));
        }
        tokio::select! {
            _ = waiter.finished() => {}
            _ = tokio::time::sleep(RECHECK) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}
