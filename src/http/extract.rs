//! Extractors that apply [`crate::auth`] at the door: an API key with a role, or a
//! client session. Put one first among a handler's arguments so authentication is
//! judged before the body is read.

use std::future::{ready, Ready};
use std::marker::PhantomData;

use actix_web::dev::Payload;
use actix_web::http::{header, StatusCode};
use actix_web::{web, FromRequest, HttpRequest};

use super::error::ApiError;
use super::AppState;
use crate::auth::{Denied, Role, SessionClaims};

/// The token of an `Authorization: Bearer …` header, if there is one.
fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal(&"application state missing"))
}

/// A role an endpoint requires, as a type.
pub trait RequiredRole {
    const ROLE: Role;
}

pub struct SendRole;
pub struct AdminRole;
pub struct TokenRole;

impl RequiredRole for SendRole {
    const ROLE: Role = Role::Send;
}
impl RequiredRole for AdminRole {
    const ROLE: Role = Role::Admin;
}
impl RequiredRole for TokenRole {
    const ROLE: Role = Role::Token;
}

/// The request carries an API key with role `R` (401 / 403 otherwise; 429 past the
/// key's rate limit, or from an address past its failed authentications).
pub struct Authorized<R> {
    pub key_name: String,
    role: PhantomData<R>,
}

impl<R: RequiredRole> FromRequest for Authorized<R> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authorize(req, R::ROLE).map(|key_name| Authorized {
            key_name,
            role: PhantomData,
        }))
    }
}

fn authorize(req: &HttpRequest, role: Role) -> Result<String, ApiError> {
    let state = state(req)?;
    let name = at_the_door(state, req, "api_key", || {
        state
            .keys
            .authorize(bearer(req), role)
            .map_err(|denied| match denied {
                Denied::UnknownKey => ApiError::unauthorized(),
                Denied::MissingRole(role) => ApiError::forbidden(role.name()),
            })
    })?;
    state.limits.key(name)?;
    Ok(name.to_string())
}

/// Failed authentication is limited per peer address (`LEDGER_RATE_AUTH_FAIL_PER_MIN`)
/// and counted (`ledger_auth_failures_total`): an address that has spent its failures
/// is refused (429) before `judge` runs, so a right key does not pass either —
/// otherwise its 200 among the 429s would go on answering an attacker's guesses. A
/// 401 from `judge` spends a failure; a right key neither spends nor refunds (one
/// known key must not buy guesses at another). A key without the role (403) is not
/// a failure: nothing was guessed.
fn at_the_door<T>(
    state: &AppState,
    req: &HttpRequest,
    credential: &str,
    judge: impl FnOnce() -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let addr = peer_ip(req);
    let count = |answer: &str| {
        state
            .metrics
            .auth_failures
            .with_label_values(&[credential, answer])
            .inc()
    };
    if let Err(limited) = state.limits.auth_allowed(&addr) {
        count("rate_limited");
        return Err(limited);
    }
    let judged = judge();
    if matches!(&judged, Err(e) if e.status == StatusCode::UNAUTHORIZED) {
        state.limits.auth_failed(&addr);
        count("unauthorized");
    }
    judged
}

/// A valid client session (401 otherwise; 429 past the session's or the address's
/// rate limit, or its failed authentications). API keys are not sessions.
pub struct ClientSession(pub SessionClaims);

impl FromRequest for ClientSession {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(client_session(req))
    }
}

fn client_session(req: &HttpRequest) -> Result<ClientSession, ApiError> {
    let state = state(req)?;
    let claims = at_the_door(state, req, "session", || {
        bearer(req)
            .and_then(|token| state.sessions.verify(token, crate::time::now()).ok())
            // A session of an app no longer configured is worthless.
            .filter(|claims| state.settings.app(&claims.app_id).is_some())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing, forged or expired session: log in again",
                )
            })
    })?;
    state.limits.ip(&peer_ip(req))?;
    state.limits.session(&claims.app_id, &claims.openid)?;
    Ok(ClientSession(claims))
}

/// The client's address as this server sees it (a proxy in front makes every client
/// one address: raise LEDGER_RATE_IP_PER_MIN and LEDGER_RATE_AUTH_FAIL_PER_MIN or
/// set them to 0 there).
pub fn peer_ip(req: &HttpRequest) -> String {
    req.peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}
