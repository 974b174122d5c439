//! API keys: `Authorization: Bearer <key>`, each key with roles.
//!
//! Keys are kept as SHA-256 digests and every presented key is compared with every
//! known digest in constant time, so neither a key nor its length leaks by timing.

use std::future::{ready, Ready};
use std::marker::PhantomData;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::settings::{ApiKey, Role};

pub(crate) struct KeyEntry {
    name: String,
    roles: Vec<Role>,
    digest: [u8; 32],
}

/// The configured API keys, ready for lookup.
pub struct KeyRing {
    keys: Vec<KeyEntry>,
}

impl KeyRing {
    pub fn new(keys: &[ApiKey]) -> Self {
        KeyRing {
            keys: keys
                .iter()
                .map(|k| KeyEntry {
                    name: k.name.clone(),
                    roles: k.roles.clone(),
                    digest: Sha256::digest(k.key.expose().as_bytes()).into(),
                })
                .collect(),
        }
    }

    /// The key's name and roles, if `presented` is a configured key.
    fn find(&self, presented: &str) -> Option<&KeyEntry> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for entry in &self.keys {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found = Some(entry);
            }
        }
        found
    }
}

/// The token of an `Authorization: Bearer …` header, if there is one.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
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

/// Extractor: the request carries an API key with role `R` (401 / 403 otherwise).
/// Put it first among a handler's arguments so auth is judged before the body.
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
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal(&"application state missing"))?;
    let entry = bearer(req)
        .and_then(|presented| state.keys.find(presented))
        .ok_or_else(ApiError::unauthorized)?;
    if !entry.roles.contains(&role) {
        return Err(ApiError::forbidden(role.name()));
    }
    state.limits.key(&entry.name)?;
    Ok(entry.name.clone())
}
