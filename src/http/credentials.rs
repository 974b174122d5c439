//! `POST /v1/credentials`: a business backend registers credentials server-side,
//! e.g. the prepay_id it got when WeChat Pay notified it of a payment.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{Authorized, SendRole};
use super::{check_openid, resource, AppState};
use crate::ledger::{self, Item, Kind, Report};

/// Most credentials one request may carry.
pub const MAX_BATCH: usize = 500;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/credentials").route(web::post().to(register)));
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ServerKind {
    FormId,
    PrepayId,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerCredential {
    app_id: Option<String>,
    #[schema(min_length = 1, max_length = 128, pattern = r"^[\x21-\x7E]+$")]
    openid: String,
    kind: ServerKind,
    value: String,
    issued_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Batch {
    /// Up to 500.
    credentials: Vec<ServerCredential>,
}

/// One credential, or a batch. (Documentation only: the body is told apart by the
/// `credentials` key so that errors name the offending field.)
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[serde(untagged)]
pub(crate) enum CredentialsRequest {
    One(ServerCredential),
    Batch(Batch),
}

/// One credential, or `{"credentials": [...]}` with up to [`MAX_BATCH`].
fn parse(body: serde_json::Value) -> Result<Vec<ServerCredential>, ApiError> {
    let invalid = |e: serde_json::Error| ApiError::invalid_request(e.to_string());
    let items = if body.get("credentials").is_some() {
        serde_json::from_value::<Batch>(body)
            .map_err(invalid)?
            .credentials
    } else {
        vec![serde_json::from_value::<ServerCredential>(body).map_err(invalid)?]
    };
    if items.len() > MAX_BATCH {
        return Err(ApiError::invalid_request(format!(
            "at most {MAX_BATCH} credentials per request, got {}",
            items.len()
        )));
    }
    Ok(items)
}

#[utoipa::path(post, path = "/v1/credentials", tag = "business",
    request_body = CredentialsRequest,
    security(("api_key" = [])),
    responses(
        (status = 429, description = "rate_limited: too many requests from this key, session or address (Retry-After)", body = ErrorBody),
        (status = 200, description = "Accepted, duplicates and rejections with their reasons", body = ledger::RecordOutcome),
        (status = 400, description = "invalid_request (the message names the problem), or app_id_required", body = ErrorBody),
        (status = 401, description = "unauthorized: missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "forbidden: the key lacks the role", body = ErrorBody),
        (status = 404, description = "unknown_app or not_found", body = ErrorBody),
        (status = 413, description = "payload_too_large: body over 64 KiB", body = ErrorBody),
        (status = 503, description = "unavailable: the database does not answer", body = ErrorBody)
    ))]
pub(crate) async fn register(
    auth: Authorized<SendRole>,
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let items = parse(body.into_inner())?;
    // Everything about the request is checked before anything is stored.
    let mut reports = Vec::with_capacity(items.len());
    for item in items {
        check_openid(&item.openid)?;
        reports.push(Report {
            app_id: auth.app(&state, item.app_id.as_deref())?,
            openid: item.openid,
            items: vec![Item::Token {
                kind: match item.kind {
                    ServerKind::FormId => Kind::FormId,
                    ServerKind::PrepayId => Kind::PrepayId,
                },
                value: item.value,
                issued_at: item.issued_at,
            }],
        });
    }
    let outcome = state.reporting.record(reports).await?;
    Ok(HttpResponse::Ok().json(outcome))
}
