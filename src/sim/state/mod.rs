//! The simulator's state and every rule the [`sim`](super) documentation lists, as
//! plain methods that take `now` and need no HTTP.
//!
//! By subject: [`tokens`], [`login`], [`sends`] and [`control`] (apps, faults, the new
//! day, the record), each an `impl State` block with its tests. Here: the state, the
//! path every WeChat call takes (faults, answer, record) and the helpers they share.

mod control;
mod login;
mod sends;
mod tokens;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::config::{FaultSet, Faults, Latency, SimConfig};
use super::record::{Delivery, Stats, TokenApi, TokenFetch};
use crate::secret::Secret;
use crate::wechat::wire::{
    ApiStatus, Code2SessionQuery, StableTokenRequest, SubscribeMessage, TemplateMessage, TokenQuery,
};
use login::Code;
use sends::Credential;
use tokens::Tokens;

/// A control request the simulator cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("unknown app {0}")]
    UnknownApp(String),
    #[error("{0}")]
    Invalid(String),
}

/// One call of a WeChat endpoint, parsed.
pub(crate) enum Call {
    ClassicToken(TokenQuery),
    StableToken(StableTokenRequest),
    Login(Code2SessionQuery),
    /// The body is `Err` when it was not valid JSON (WeChat answers 47001).
    Template {
        token: String,
        msg: Result<TemplateMessage, ApiStatus>,
    },
    Subscribe {
        token: String,
        msg: Result<SubscribeMessage, ApiStatus>,
    },
    /// getPrivateTemplateList.
    Templates {
        token: String,
    },
}

impl Call {
    fn api(&self) -> &'static str {
        match self {
            Call::ClassicToken(_) => "token",
            Call::StableToken(_) => "stable_token",
            Call::Login(_) => "jscode2session",
            Call::Template { .. } => "template_send",
            Call::Subscribe { .. } => "subscribe_send",
            Call::Templates { .. } => "gettemplate",
        }
    }

    fn faults<'f>(&self, faults: &'f Faults) -> &'f FaultSet {
        match self {
            Call::ClassicToken(_) | Call::StableToken(_) => &faults.token,
            Call::Login(_) => &faults.login,
            // Faults of the send API reach the template list too: the ledger must
            // keep its last list when WeChat fails.
            Call::Template { .. } | Call::Subscribe { .. } | Call::Templates { .. } => &faults.send,
        }
    }

    fn token_fetch(&self) -> Option<(String, TokenApi, bool)> {
        match self {
            Call::ClassicToken(q) => Some((q.appid.clone(), TokenApi::Classic, false)),
            Call::StableToken(r) => Some((r.appid.clone(), TokenApi::Stable, r.force_refresh)),
            _ => None,
        }
    }
}

/// What [`State::call`] decided.
pub(crate) struct Answer {
    pub(crate) reply: Reply,
    /// To add before writing the reply.
    pub(crate) latency: Duration,
    /// `(appid, openid)` of a send whose answer is not written yet: pass it to
    /// [`State::landed`] once it is.
    pub(crate) in_flight: Option<(String, String)>,
}

/// How to answer a call.
pub(crate) enum Reply {
    /// HTTP 200 with this JSON body.
    Json(Vec<u8>),
    /// HTTP 500 (injected).
    Http500,
    /// Start answering this body, then break the connection (injected).
    Dropped(Vec<u8>),
}

struct App {
    appid: String,
    secret: Secret,
    classic: Option<String>,
    stable: Option<String>,
    token_calls: u32,
    force_refreshes: u32,
    last_force: Option<Instant>,
    sends: u32,
    codes: HashMap<String, Code>,
    /// Login times within the last minute, per openid.
    logins: HashMap<String, VecDeque<Instant>>,
    known: HashSet<String>,
    blocked: HashSet<String>,
    /// form_ids and prepay_ids by value.
    credentials: HashMap<String, Credential>,
    /// One-time grants left per (openid, template_id).
    grants: HashMap<(String, String), u32>,
}

impl App {
    fn new(appid: &str, secret: &Secret) -> Self {
        App {
            appid: appid.to_owned(),
            secret: secret.clone(),
            classic: None,
            stable: None,
            token_calls: 0,
            force_refreshes: 0,
            last_force: None,
            sends: 0,
            codes: HashMap::new(),
            logins: HashMap::new(),
            known: HashSet::new(),
            blocked: HashSet::new(),
            credentials: HashMap::new(),
            grants: HashMap::new(),
        }
    }
}

#[derive(Default)]
struct Record {
    deliveries: Vec<Delivery>,
    token_fetches: Vec<TokenFetch>,
    stats: Stats,
}

impl Record {
    /// The seq of the next delivery.
    fn next_seq(&self) -> u64 {
        self.deliveries.len() as u64 + 1
    }
}

pub(crate) struct State {
    cfg: SimConfig,
    apps: HashMap<String, App>,
    tokens: Tokens,
    rng: StdRng,
    faults: Faults,
    record: Record,
    /// Sends per `(appid, openid)` processed but not yet answered.
    in_flight: HashMap<(String, String), u32>,
}

impl State {
    pub(crate) fn new(cfg: SimConfig) -> Self {
        let rng = cfg
            .seed
            .map_or_else(StdRng::from_os_rng, StdRng::seed_from_u64);
        let mut state = State {
            apps: HashMap::new(),
            tokens: Tokens::default(),
            rng,
            faults: cfg.faults.clone(),
            record: Record::default(),
            in_flight: HashMap::new(),
            cfg,
        };
        for (appid, secret) in state.cfg.apps.clone() {
            state.add_app(&appid, &secret);
        }
        state
    }

    /// Serves one WeChat call: rolls the faults, acts, records.
    pub(crate) fn call(&mut self, call: Call, now: Instant) -> Answer {
        let api = call.api();
        let fetch = call.token_fetch();
        let set = call.faults(&self.faults).clone();
        let latency = match set.latency_ms {
            None => 0,
            Some(Latency::Fixed(ms)) => ms,
            Some(Latency::Range(a, b)) => self.rng.random_range(a.min(b)..=a.max(b)),
        };
        let roll: f64 = self.rng.random();
        let mut in_flight = None;
        let (reply, outcome) = if roll < set.busy {
            (
                Reply::Json(to_json(&wx(-1, "system error"))),
                "injected_busy".to_owned(),
            )
        } else if roll < set.busy + set.http_500 {
            (Reply::Http500, "injected_http_500".to_owned())
        } else {
            let flight = self.flight_key(&call, now);
            if flight
                .as_ref()
                .is_some_and(|k| self.in_flight.contains_key(k))
            {
                let busy = wx(43108, "concurrent calls to the same openid");
                (Reply::Json(to_json(&busy)), "43108".to_owned())
            } else {
                if let Some(key) = &flight {
                    *self.in_flight.entry(key.clone()).or_default() += 1;
                }
                in_flight = flight;
                self.act(
                    call,
                    roll < set.busy + set.http_500 + set.drop_after_read,
                    now,
                )
            }
        };
        self.record.stats.add(api, &outcome);
        if let Some((appid, api, force_refresh)) = fetch {
            self.record.token_fetches.push(TokenFetch {
                at: Utc::now(),
                appid,
                api,
                force_refresh,
                outcome,
            });
        }
        Answer {
            reply,
            latency: Duration::from_millis(latency),
            in_flight,
        }
    }

    /// Processes a call; with `drop` the answer will be broken after processing.
    /// Returns the reply and the stats outcome.
    fn act(&mut self, call: Call, drop: bool, now: Instant) -> (Reply, String) {
        let delivered_before = self.record.deliveries.len();
        let (body, outcome) = match call {
            Call::ClassicToken(q) => encode(self.classic_token(&q, now)),
            Call::StableToken(r) => encode(self.stable_token(&r, now)),
            Call::Login(q) => encode(self.login(&q, now)),
            Call::Template { token, msg } => {
                encode(msg.and_then(|m| self.send_template(&token, &m, now)))
            }
            Call::Subscribe { token, msg } => {
                encode(msg.and_then(|m| self.send_subscribe(&token, &m, now)))
            }
            Call::Templates { token } => encode(self.private_templates(&token, now)),
        };
        if drop {
            for d in &mut self.record.deliveries[delivered_before..] {
                d.response_dropped = true;
            }
            (Reply::Dropped(body), format!("dropped:{outcome}"))
        } else {
            (Reply::Json(body), outcome)
        }
    }

    /// `(appid, openid)` of a send when `reject_concurrent_sends` is on.
    fn flight_key(&self, call: &Call, now: Instant) -> Option<(String, String)> {
        if !self.faults.reject_concurrent_sends {
            return None;
        }
        let (token, touser) = match call {
            Call::Template { token, msg: Ok(m) } => (token, &m.touser),
            Call::Subscribe { token, msg: Ok(m) } => (token, &m.touser),
            _ => return None,
        };
        let appid = self.tokens.check(token, now).ok()?;
        Some((appid.to_owned(), touser.clone()))
    }

    /// The answer to a send that was in flight has been written (or abandoned).
    pub(crate) fn landed(&mut self, key: &(String, String)) {
        if let Some(n) = self.in_flight.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(key);
            }
        }
    }
}

fn wx(errcode: i64, errmsg: &str) -> ApiStatus {
    ApiStatus {
        errcode,
        errmsg: errmsg.to_owned(),
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Our own plain types: serialising cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The body and the stats outcome of a result.
fn encode<T: Serialize>(result: Result<T, ApiStatus>) -> (Vec<u8>, String) {
    match result {
        Ok(v) => (to_json(&v), "ok".to_owned()),
        Err(e) => (to_json(&e), e.errcode.to_string()),
    }
}

fn authenticate<'a>(
    apps: &'a mut HashMap<String, App>,
    appid: &str,
    secret: &str,
) -> Result<&'a mut App, ApiStatus> {
    if appid.is_empty() {
        return Err(wx(41002, "appid missing"));
    }
    if secret.is_empty() {
        return Err(wx(41004, "appsecret missing"));
    }
    let app = apps
        .get_mut(appid)
        .ok_or_else(|| wx(40013, "invalid appid"))?;
    if app.secret.expose() != secret {
        return Err(wx(40125, "invalid appsecret"));
    }
    Ok(app)
}

fn find_app<'a>(apps: &'a mut HashMap<String, App>, appid: &str) -> Result<&'a mut App, SimError> {
    apps.get_mut(appid)
        .ok_or_else(|| SimError::UnknownApp(appid.to_owned()))
}

/// The app, for minting something for `openid`, who is known from then on.
fn user_app<'a>(
    apps: &'a mut HashMap<String, App>,
    appid: &str,
    openid: &str,
) -> Result<&'a mut App, SimError> {
    if openid.is_empty() || openid.chars().any(char::is_whitespace) {
        return Err(SimError::Invalid(
            "openid must be non-empty without white space".into(),
        ));
    }
    let app = find_app(apps, appid)?;
    app.known.insert(openid.to_owned());
    Ok(app)
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const LOWER_ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const HEX: &[u8] = b"0123456789abcdef";

fn random_string(rng: &mut StdRng, len: usize, charset: &[u8]) -> String {
    (0..len)
        .map(|_| char::from(charset[rng.random_range(0..charset.len())]))
        .collect()
}

#[cfg(test)]
mod testing {
    use super::*;

    pub(super) const S: fn(u64) -> Duration = Duration::from_secs;

    pub(super) fn state(cfg: SimConfig) -> State {
        State::new(SimConfig {
            apps: vec![("wxa".into(), Secret::new("s"))],
            seed: Some(1),
            ..cfg
        })
    }

    pub(super) fn classic(st: &mut State, now: Instant) -> String {
        let q = TokenQuery {
            grant_type: "client_credential".into(),
            appid: "wxa".into(),
            secret: "s".into(),
        };
        st.classic_token(&q, now).expect("token").access_token
    }
}
