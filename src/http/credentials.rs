//! `POST /v1/credentials`: a business backend registers credentials server-side,
//! e.g. the prepay_id it got when WeChat Pay notified it of a payment.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::auth::{Authorized, SendRole};
use super::error::ApiError;
use super::{check_openid, resource, AppState};
use crate::ledger::{Item, Kind, Report};

/// Most credentials one request may carry.
pub const MAX_BATCH: usize = 500;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/credentials").route(web::post().to(register)));
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ServerKind {
    FormId,
    PrepayId,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerCredential {
    app_id: Option<String>,
    openid: String,
    kind: ServerKind,
    value: String,
    issued_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    credentials: Vec<ServerCredential>,
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

async fn register(
    _auth: Authorized<SendRole>,
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let items = parse(body.into_inner())?;
    // Everything about the request is checked before anything is stored.
    let mut reports = Vec::with_capacity(items.len());
    for item in items {
        check_openid(&item.openid)?;
        reports.push(Report {
            app_id: state.resolve_app(item.app_id.as_deref())?,
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
    let outcome = state.record(reports).await?;
    Ok(HttpResponse::Ok().json(outcome))
}
