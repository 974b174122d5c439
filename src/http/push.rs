//! `GET|POST /v1/wechat/push/{app_id}`: the URL the business enters as the
//! mini-program's message-push server. No API key: WeChat's signature is the
//! authentication, and an `Authorization` header is never a substitute for it.
//!
//! Checks, in order: the app has `LEDGER_PUSH` (else 404); the query's `signature`
//! over (token, timestamp, nonce) and the timestamp within 300 s of our clock (else
//! 403 `bad_signature`); in safe and compatible mode (`encrypt_type=aes`) the
//! `msg_signature` over the `Encrypt` string and the decryption for this appid
//! (else 403); then the plaintext's shape (else 400). An app with an
//! EncodingAESKey takes only encrypted pushes: a plaintext body is not covered by
//! any signature, so a captured query string could carry a forged one.

use actix_web::http::header::{self, ContentType};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::{resource, AppState, BODY_LIMIT};
use crate::push;
use crate::settings::PushApp;
use crate::wechat::push::{fields, Push};
use crate::wechat::push_crypto::{self, PushKey};

/// WeChat's timestamp may be this far from our clock.
pub const MAX_SKEW_S: i64 = 300;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/v1/wechat/push/{app_id}")
            .route(web::get().to(verify_url))
            .route(web::post().to(receive)),
    );
}

/// The query WeChat adds to the push URL.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PushQuery {
    /// hex SHA-1 of the sorted token, timestamp and nonce.
    signature: Option<String>,
    /// Unix seconds; more than 300 s from the server clock is refused.
    timestamp: Option<String>,
    nonce: Option<String>,
    /// URL check only: echoed when the signature is right.
    echostr: Option<String>,
    /// `aes` in safe and compatible mode.
    encrypt_type: Option<String>,
    /// Safe and compatible mode: hex SHA-1 of the sorted token, timestamp, nonce
    /// and `Encrypt`.
    msg_signature: Option<String>,
    /// The user (WeChat adds it; the body says the same).
    #[allow(dead_code)]
    openid: Option<String>,
}

fn bad_signature(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "bad_signature",
        format!("not a push from WeChat for this app: {why}"),
    )
}

fn push_app<'a>(state: &'a AppState, app_id: &str) -> Result<&'a PushApp, ApiError> {
    state.settings.push_app(app_id).ok_or_else(|| {
        ApiError::not_found(format!("app {app_id:?} has no message push configured"))
    })
}

/// The query's signature and timestamp, checked.
fn check_signature(app: &PushApp, q: &PushQuery) -> Result<(String, String), ApiError> {
    let (Some(signature), Some(timestamp), Some(nonce)) = (&q.signature, &q.timestamp, &q.nonce)
    else {
        return Err(bad_signature("signature, timestamp and nonce are required"));
    };
    let token = app.token.expose();
    if !push_crypto::verify_signature(signature, &[token, timestamp, nonce]) {
        return Err(bad_signature("wrong signature"));
    }
    Ok((timestamp.clone(), nonce.clone()))
}

#[utoipa::path(get, path = "/v1/wechat/push/{app_id}", tag = "wechat",
    params(("app_id" = String, Path, description = "The app"), PushQuery),
    responses(
        (status = 200, description = "The URL check passed: `echostr`, as text", content_type = "text/plain", body = String),
        (status = 400, description = "invalid_request: no echostr", body = ErrorBody),
        (status = 403, description = "bad_signature: the signature is wrong or missing", body = ErrorBody),
        (status = 404, description = "not_found: the app has no message push configured", body = ErrorBody)
    ))]
pub(crate) async fn verify_url(
    state: web::Data<AppState>,
    app_id: web::Path<String>,
    query: web::Query<PushQuery>,
) -> Result<HttpResponse, ApiError> {
    let app = push_app(&state, &app_id)?;
    check_signature(app, &query)?;
    let echostr = query
        .echostr
        .as_deref()
        .ok_or_else(|| ApiError::invalid_request("echostr is required"))?;
    Ok(HttpResponse::Ok()
        .content_type(ContentType::plaintext())
        .body(echostr.to_string()))
}

#[utoipa::path(post, path = "/v1/wechat/push/{app_id}", tag = "wechat",
    params(("app_id" = String, Path, description = "The app"), PushQuery),
    request_body(content = String, description = "WeChat's push: XML or JSON, plaintext or with `Encrypt`", content_type = "text/xml"),
    responses(
        (status = 200, description = "Applied (or applied before): `success`, as text, after the effects committed", content_type = "text/plain", body = String),
        (status = 400, description = "invalid_request: the body is not a push", body = ErrorBody),
        (status = 403, description = "bad_signature: wrong signature or msg_signature, stale timestamp, undecryptable body, another app's ciphertext", body = ErrorBody),
        (status = 404, description = "not_found: the app has no message push configured", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody)
    ))]
pub(crate) async fn receive(
    state: web::Data<AppState>,
    req: HttpRequest,
    app_id: web::Path<String>,
    query: web::Query<PushQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let app = push_app(&state, &app_id)?;
    let (timestamp, nonce) = check_signature(app, &query)?;
    let sent_at: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| bad_signature("the timestamp is not a number"))?;
    if (crate::time::now().timestamp() - sent_at).abs() > MAX_SKEW_S {
        return Err(bad_signature(
            "the timestamp is more than 300 s from the server clock",
        ));
    }
    let body = read_body(&req, payload).await?;
    let body = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid_request("the body is not UTF-8"))?;
    let plain = match (&app.encoding_aes_key, query.encrypt_type.as_deref()) {
        (Some(key), Some("aes")) => {
            let encrypt = match fields(body)?.get("Encrypt") {
                Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
                _ => return Err(ApiError::invalid_request("the body has no Encrypt field")),
            };
            let msg_signature = query
                .msg_signature
                .as_deref()
                .ok_or_else(|| bad_signature("msg_signature is required"))?;
            let token = app.token.expose();
            if !push_crypto::verify_signature(msg_signature, &[token, &timestamp, &nonce, &encrypt])
            {
                return Err(bad_signature("wrong msg_signature"));
            }
            let key = PushKey::from_encoding_aes_key(key.expose()).map_err(|e| {
                ApiError::internal(&format!("LEDGER_PUSH key of {}: {e}", app.app_id))
            })?;
            let plain = push_crypto::decrypt(&key, &encrypt, &app.app_id)
                .map_err(|e| bad_signature(&e.to_string()))?;
            String::from_utf8(plain)
                .map_err(|_| bad_signature("the decrypted body is not UTF-8"))?
        }
        (None, Some("aes")) => {
            return Err(bad_signature(
                "no EncodingAESKey is configured for this app",
            ))
        }
        (Some(_), _) => {
            return Err(bad_signature(
                "this app takes encrypted pushes only (encrypt_type=aes)",
            ))
        }
        (None, _) => body.to_string(),
    };
    let push = Push::parse(&plain)?;
    let app_id = app.app_id.clone();
    let p = push.clone();
    // Anything that is not a subscribe-message event goes, unchanged (the body as
    // WeChat sent it, query string and Content-Type), to the business's own handler:
    // queued durably in the transaction that records the push (a retry of it is not
    // forwarded twice) and leased to this instance, which POSTs it at once. WeChat
    // gets the handler's answer when it comes within FORWARD_WITHIN, otherwise
    // `success`, and the queue retries it.
    let forward = state.settings.push_forward.get(&app_id).map(|url| {
        let url = match req.query_string() {
            "" => url.clone(),
            q => format!("{url}{}{q}", if url.contains('?') { '&' } else { '?' }),
        };
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/xml")
            .to_string();
        let until = crate::time::now()
            + chrono::TimeDelta::from_std(FORWARD_WITHIN * 2).unwrap_or(chrono::TimeDelta::MAX);
        push::Forward {
            url,
            content_type,
            body: body.to_string(),
            lease: (state.webhooks.owner().to_string(), until),
        }
    });
    let f = forward.clone();
    let (applied, queued) = state
        .db
        .run(move |c| push::apply_and_forward(c, &app_id, &p, f.as_ref(), crate::time::now()))
        .await?;
    if let (Some(id), Some(f)) = (queued, forward) {
        let answer = state
            .webhooks
            .forward_now(id, &f.url, &f.content_type, &f.body, FORWARD_WITHIN)
            .await?;
        if let Some((content_type, text)) = answer {
            return Ok(HttpResponse::Ok().content_type(content_type).body(text));
        }
    } else if applied.foreign {
        log::debug!(
            "push for {}: {} {} is not a subscribe-message event; no LEDGER_PUSH_FORWARD for the app",
            app.app_id,
            push.msg_type,
            push.event.as_deref().unwrap_or("-")
        );
    } else if applied.duplicate {
        log::debug!("push for {}: a retry of one applied before", app.app_id);
    }
    Ok(HttpResponse::Ok()
        .content_type(ContentType::plaintext())
        .body("success"))
}

/// How long WeChat waits for the forward's own answer before it gets `success`
/// (WeChat itself gives up after 5 s).
const FORWARD_WITHIN: std::time::Duration = std::time::Duration::from_secs(4);

/// The body, at most [`BODY_LIMIT`] bytes (413 otherwise, as everywhere).
async fn read_body(req: &HttpRequest, mut payload: web::Payload) -> Result<Vec<u8>, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT) {
        return Err(ApiError::payload_too_large(BODY_LIMIT));
    }
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid_request(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > BODY_LIMIT {
            return Err(ApiError::payload_too_large(BODY_LIMIT));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl From<crate::wechat::push::PushParseError> for ApiError {
    fn from(e: crate::wechat::push::PushParseError) -> Self {
        ApiError::invalid_request(format!("not a push: {e}"))
    }
}
