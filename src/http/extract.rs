//! Extractors that apply [`crate::auth`] at the door: an API key with a role, or a
//! client session. Put one first among a handler's arguments so authentication is
//! judged before the body is read.

use std::borrow::Cow;
use std::future::{ready, Ready};
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};

use actix_web::dev::Payload;
use actix_web::http::{header, StatusCode};
use actix_web::{web, FromRequest, HttpRequest};
use ipnet::IpNet;

use super::error::ApiError;
use super::AppState;
use crate::auth::{AppScope, Denied, Role, SessionClaims};

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
    /// A key with any of these roles passes; a refusal names the first.
    const ROLES: &'static [Role];
}

pub struct SendRole;
pub struct AdminRole;
pub struct TokenRole;
/// `send`, or `admin` (campaigns: an admin may read, pause, resume and cancel).
pub struct SendOrAdminRole;

impl RequiredRole for SendRole {
    const ROLES: &'static [Role] = &[Role::Send];
}
impl RequiredRole for AdminRole {
    const ROLES: &'static [Role] = &[Role::Admin];
}
impl RequiredRole for TokenRole {
    const ROLES: &'static [Role] = &[Role::Token];
}
impl RequiredRole for SendOrAdminRole {
    const ROLES: &'static [Role] = &[Role::Send, Role::Admin];
}

/// The request carries an API key with role `R` (401 / 403 otherwise; 429 past the
/// key's rate limit, or from an address past its failed authentications).
pub struct Authorized<R> {
    pub key_name: String,
    /// The apps the key acts on: check every app a request names with [`Self::app`].
    pub apps: AppScope,
    role: PhantomData<R>,
}

impl<R> Authorized<R> {
    /// The app the request is about ([`AppState::resolve_app`]), if this key may act
    /// on it: 403 `forbidden` for an app outside the key's scope.
    pub fn app(&self, state: &AppState, app_id: Option<&str>) -> Result<String, ApiError> {
        let app = state.resolve_app(app_id)?;
        if self.apps.allows(&app) {
            Ok(app)
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this key does not act on app {app:?}"),
            ))
        }
    }

    /// Whether this key may see a stored thing of `app_id` (a message): callers
    /// answer 404 when not, so its existence is not revealed.
    pub fn sees(&self, app_id: &str) -> bool {
        self.apps.allows(app_id)
    }
}

impl<R: RequiredRole> FromRequest for Authorized<R> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authorize(req, R::ROLES).map(|(key_name, apps)| Authorized {
            key_name,
            apps,
            role: PhantomData,
        }))
    }
}

fn authorize(req: &HttpRequest, roles: &[Role]) -> Result<(String, AppScope), ApiError> {
    let state = state(req)?;
    let grant = at_the_door(state, req, "api_key", || {
        state
            .keys
            .authorize_any(bearer(req), roles)
            .map_err(|denied| match denied {
                Denied::UnknownKey => ApiError::unauthorized(),
                Denied::MissingRole(role) => ApiError::forbidden(role.name()),
            })
    })?;
    state.limits.key(grant.name)?;
    Ok((grant.name.to_string(), grant.apps.clone()))
}

/// Failed authentication is limited per client address ([`client_ip`],
/// `LEDGER_RATE_AUTH_FAIL_PER_MIN`) and counted (`ledger_auth_failures_total`): an
/// address that has spent its failures is refused (429) before `judge` runs, so a
/// right key does not pass either — otherwise its 200 among the 429s would go on
/// answering an attacker's guesses. A 401 from `judge` spends a failure; a right key
/// neither spends nor refunds (one known key must not buy guesses at another). A key
/// without the role (403) is not a failure: nothing was guessed.
fn at_the_door<T>(
    state: &AppState,
    req: &HttpRequest,
    credential: &str,
    judge: impl FnOnce() -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let addr = client_ip(state, req);
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
    state.limits.ip(&client_ip(state, req))?;
    state.limits.session(&claims.app_id, &claims.openid)?;
    Ok(ClientSession(claims))
}

/// The client's address, the key of every per-address limit (client requests,
/// logins, failed authentications). The peer's address, unless the peer is one of
/// `LEDGER_TRUSTED_PROXIES`: then the right-most `X-Forwarded-For` entry that is not
/// itself a trusted proxy. From any other peer the header is ignored, since anyone
/// can write it.
pub fn client_ip(state: &AppState, req: &HttpRequest) -> String {
    let Some(peer) = req.peer_addr() else {
        return "unknown".into();
    };
    // Lossy, not skipped: a line with bytes that are no text keeps the proxy's entry
    // at its right end, and its mangled rest ends the walk as no address does.
    let lines: Vec<Cow<str>> = req
        .headers()
        .get_all("x-forwarded-for")
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .collect();
    let forwarded: Vec<&str> = lines.iter().flat_map(|l| l.split(',')).collect();
    client_addr(peer.ip(), &forwarded, &state.settings.trusted_proxies).to_string()
}

/// [`client_ip`] on plain values: `forwarded` holds the `X-Forwarded-For` entries in
/// order (every header line, split at the commas).
fn client_addr(peer: IpAddr, forwarded: &[&str], trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer.to_canonical();
    // Right to left, each entry was appended by the hop to its right; we walk while
    // that hop is trusted. An entry that is no address ends the walk at the last
    // trusted hop: what is left of it is the client's own say.
    for entry in forwarded.iter().rev() {
        if !is_trusted(&client) {
            break;
        }
        match parse_entry(entry) {
            Some(ip) => client = ip,
            None => break,
        }
    }
    client
}

/// An `X-Forwarded-For` entry: an address, or an address with a port as some proxies
/// write it (`1.2.3.4:5678`, `[2001:db8::1]:443`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = nets(&["10.0.0.0/8"]);
        for peer in ["203.0.113.9", "2001:db8::9"] {
            assert_eq!(client_addr(addr(peer), &["1.2.3.4"], &trusted), addr(peer));
            assert_eq!(client_addr(addr(peer), &[], &[]), addr(peer));
        }
        // Nobody trusted (the default): the header never counts.
        assert_eq!(
            client_addr(addr("10.0.0.1"), &["1.2.3.4"], &[]),
            addr("10.0.0.1")
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_right_most_untrusted_entry() {
        let trusted = nets(&["10.0.0.0/8", "fd00::/8"]);
        let peer = addr("10.0.0.1");
        // The client's own forged entries sit left of what the proxies appended.
        let chain = ["6.6.6.6", " 198.51.100.7", "10.1.2.3 ", "fd00::5"];
        assert_eq!(client_addr(peer, &chain, &trusted), addr("198.51.100.7"));
        assert_eq!(
            client_addr(peer, &["2001:db8::7"], &trusted),
            addr("2001:db8::7")
        );
        // Without the header the proxy itself is the client; all trusted: the left-most.
        assert_eq!(client_addr(peer, &[], &trusted), peer);
        assert_eq!(
            client_addr(peer, &["10.9.9.9", "10.8.8.8"], &trusted),
            addr("10.9.9.9")
        );
        // Ports, as some proxies write them.
        assert_eq!(
            client_addr(peer, &["198.51.100.7:5678"], &trusted),
            addr("198.51.100.7")
        );
        assert_eq!(
            client_addr(peer, &["[2001:db8::7]:443"], &trusted),
            addr("2001:db8::7")
        );
        // Garbage ends the walk at the last trusted hop, never left of it.
        assert_eq!(client_addr(peer, &["6.6.6.6", "unknown"], &trusted), peer);
        assert_eq!(
            client_addr(peer, &["6.6.6.6", "", "10.1.2.3"], &trusted),
            addr("10.1.2.3")
        );
    }

    #[test]
    fn mapped_ipv6_addresses_are_their_ipv4_selves() {
        let trusted = nets(&["127.0.0.1/32"]);
        let mapped_peer = addr("::ffff:127.0.0.1");
        assert_eq!(
            client_addr(mapped_peer, &["::ffff:198.51.100.7"], &trusted),
            addr("198.51.100.7")
        );
        assert_eq!(
            client_addr(addr("::ffff:203.0.113.9"), &["1.2.3.4"], &trusted),
            addr("203.0.113.9")
        );
    }
}
