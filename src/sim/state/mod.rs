//! The simulator's state and every rule of WECHAT.md, as plain methods that take
//! `now` and need no HTTP.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::config::{FaultSet, Faults, Latency, SimConfig};
use super::record::{Delivery, MessageKind, Stats, TokenApi, TokenFetch};
use crate::secret::Secret;
use crate::wechat::subscribe_data;
use crate::wechat::wire::{
    ApiStatus, Code2SessionQuery, Code2SessionResponse, StableTokenRequest, SubscribeMessage,
    SubscribeSendResponse, TemplateMessage, TokenQuery, TokenResponse,
};

/// Tokens are forgotten this long after they expired (then they answer 40001).
const FORGET_TOKENS_AFTER: Duration = Duration::from_secs(3600);
/// The most credentials or grants one control call may mint.
const MAX_MINT: u32 = 10_000;
/// msgids of subscribe sends are this plus the delivery's seq.
const MSGID_BASE: i64 = 3_000_000_000;

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
}

impl Call {
    fn api(&self) -> &'static str {
        match self {
            Call::ClassicToken(_) => "token",
            Call::StableToken(_) => "stable_token",
            Call::Login(_) => "jscode2session",
            Call::Template { .. } => "template_send",
            Call::Subscribe { .. } => "subscribe_send",
        }
    }

    fn faults<'f>(&self, faults: &'f Faults) -> &'f FaultSet {
        match self {
            Call::ClassicToken(_) | Call::StableToken(_) => &faults.token,
            Call::Login(_) => &faults.login,
            Call::Template { .. } | Call::Subscribe { .. } => &faults.send,
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

struct TokenInfo {
    appid: String,
    expires_at: Instant,
    /// Superseded or revoked: answers 40001 from then on.
    dies_at: Option<Instant>,
}

#[derive(Default)]
struct Tokens(HashMap<String, TokenInfo>);

impl Tokens {
    fn issue(&mut self, rng: &mut StdRng, appid: &str, life: Duration, now: Instant) -> String {
        self.0
            .retain(|_, t| now < t.expires_at + FORGET_TOKENS_AFTER);
        let token = random_string(rng, 96, ALNUM);
        self.0.insert(
            token.clone(),
            TokenInfo {
                appid: appid.to_owned(),
                expires_at: now + life,
                dies_at: None,
            },
        );
        token
    }

    /// Makes `token` answer 40001 from `at` on (or earlier if it already was to).
    fn kill(&mut self, token: &str, at: Instant) {
        if let Some(t) = self.0.get_mut(token) {
            t.dies_at = Some(t.dies_at.map_or(at, |d| d.min(at)));
        }
    }

    /// The app of a token usable at `now`.
    fn check(&self, token: &str, now: Instant) -> Result<&str, ApiStatus> {
        if token.is_empty() {
            return Err(wx(41001, "access_token missing"));
        }
        let Some(t) = self.0.get(token) else {
            let well_formed = token.len() >= 64
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            return Err(if well_formed {
                wx(
                    40001,
                    "invalid credential, access_token is invalid or not latest",
                )
            } else {
                wx(40014, "invalid access_token")
            });
        };
        if t.dies_at.is_some_and(|d| now >= d) {
            return Err(wx(
                40001,
                "invalid credential, access_token is invalid or not latest",
            ));
        }
        if now >= t.expires_at {
            return Err(wx(42001, "access_token expired"));
        }
        Ok(&t.appid)
    }

    /// Time left of a usable token.
    fn remaining(&self, token: &str, now: Instant) -> Option<Duration> {
        self.check(token, now).ok()?;
        self.0.get(token).map(|t| t.expires_at - now)
    }
}

struct Code {
    openid: String,
    expires_at: Instant,
}

struct Credential {
    openid: String,
    uses_left: u32,
    active_at: Instant,
    expires_at: Instant,
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

/// The fields of a send that every send checks.
struct Target<'m> {
    token: &'m str,
    template_id: &'m str,
    page: Option<&'m str>,
    touser: &'m str,
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

    fn classic_token(&mut self, q: &TokenQuery, now: Instant) -> Result<TokenResponse, ApiStatus> {
        if q.grant_type != "client_credential" {
            return Err(wx(40002, "invalid grant_type"));
        }
        let app = authenticate(&mut self.apps, &q.appid, &q.secret)?;
        if app.token_calls >= self.cfg.token_daily_limit {
            return Err(wx(45009, "reach max api daily quota limit"));
        }
        app.token_calls += 1;
        let life = self.cfg.token_expires_in;
        let token = self.tokens.issue(&mut self.rng, &app.appid, life, now);
        if let Some(old) = app.classic.replace(token.clone()) {
            self.tokens.kill(&old, now + self.cfg.token_overlap);
        }
        Ok(TokenResponse {
            access_token: token,
            expires_in: secs_ceil(life),
        })
    }

    /// Normal mode: the current token while more than `min(300 s, life / 4)` of it
    /// is left; in that last stretch a new one, the old one living on to its expiry.
    /// `force_refresh`: the current token dies now and a new one is issued.
    fn stable_token(
        &mut self,
        r: &StableTokenRequest,
        now: Instant,
    ) -> Result<TokenResponse, ApiStatus> {
        if r.grant_type != "client_credential" {
            return Err(wx(40002, "invalid grant_type"));
        }
        let app = authenticate(&mut self.apps, &r.appid, &r.secret)?;
        let life = self.cfg.token_expires_in;
        if r.force_refresh {
            if app.force_refreshes >= self.cfg.stable_force_daily_limit {
                return Err(wx(45009, "reach max api daily quota limit"));
            }
            if app
                .last_force
                .is_some_and(|t| now < t + self.cfg.stable_force_interval)
            {
                return Err(wx(
                    45011,
                    "api minute-quota reach limit, force refresh too often",
                ));
            }
            app.force_refreshes += 1;
            app.last_force = Some(now);
            if let Some(old) = app.stable.take() {
                self.tokens.kill(&old, now);
            }
        } else if let Some(current) = &app.stable {
            let window = (life / 4).min(Duration::from_secs(300));
            if let Some(left) = self.tokens.remaining(current, now).filter(|l| *l > window) {
                return Ok(TokenResponse {
                    access_token: current.clone(),
                    expires_in: secs_ceil(left),
                });
            }
        }
        let token = self.tokens.issue(&mut self.rng, &app.appid, life, now);
        app.stable = Some(token.clone());
        Ok(TokenResponse {
            access_token: token,
            expires_in: secs_ceil(life),
        })
    }

    fn login(
        &mut self,
        q: &Code2SessionQuery,
        now: Instant,
    ) -> Result<Code2SessionResponse, ApiStatus> {
        let app = authenticate(&mut self.apps, &q.appid, &q.secret)?;
        if !q.grant_type.is_empty() && q.grant_type != "authorization_code" {
            return Err(wx(40002, "invalid grant_type"));
        }
        if q.js_code.is_empty() {
            return Err(wx(41008, "missing code"));
        }
        let openid = app
            .codes
            .get(&q.js_code)
            .filter(|c| now < c.expires_at)
            .map(|c| c.openid.clone())
            .ok_or_else(|| wx(40029, "invalid code"))?;
        // A rate-limited login leaves the code usable, as a retry would expect.
        let recent = app.logins.entry(openid.clone()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if recent.len() >= self.cfg.login_rate_per_minute as usize {
            return Err(wx(45011, "api minute-quota reach limit"));
        }
        recent.push_back(now);
        app.codes.remove(&q.js_code);
        if app.blocked.contains(&openid) {
            return Err(wx(40226, "high risk user blocked"));
        }
        Ok(Code2SessionResponse {
            openid,
            session_key: random_string(&mut self.rng, 24, ALNUM),
            unionid: None,
        })
    }

    fn send_template(
        &mut self,
        token: &str,
        msg: &TemplateMessage,
        now: Instant,
    ) -> Result<ApiStatus, ApiStatus> {
        let target = Target {
            token,
            template_id: &msg.template_id,
            page: msg.page.as_deref(),
            touser: &msg.touser,
        };
        if self.cfg.template_api_retired {
            self.tokens.check(token, now)?;
            return Err(wx(45103, "This API has been unsupported"));
        }
        let app = self.sender(&target, now)?;
        let credential = app
            .credentials
            .get_mut(&msg.form_id)
            .filter(|c| c.openid == msg.touser)
            .ok_or_else(|| wx(41028, "invalid form id"))?;
        if credential.uses_left == 0 {
            return Err(wx(41029, "form id used count reach limit"));
        }
        if now >= credential.expires_at || now < credential.active_at {
            return Err(wx(41028, "invalid form id"));
        }
        credential.uses_left -= 1;
        app.sends += 1;
        let appid = app.appid.clone();
        self.record.deliveries.push(Delivery {
            seq: self.record.next_seq(),
            at: Utc::now(),
            appid,
            touser: msg.touser.clone(),
            template_id: msg.template_id.clone(),
            kind: MessageKind::Template,
            credential: Some(msg.form_id.clone()),
            page: msg.page.clone(),
            data: msg.data.clone(),
            miniprogram_state: None,
            lang: None,
            msgid: None,
            response_dropped: false,
        });
        Ok(wx(0, "ok"))
    }

    fn send_subscribe(
        &mut self,
        token: &str,
        msg: &SubscribeMessage,
        now: Instant,
    ) -> Result<SubscribeSendResponse, ApiStatus> {
        let target = Target {
            token,
            template_id: &msg.template_id,
            page: msg.page.as_deref(),
            touser: &msg.touser,
        };
        let app = self.sender(&target, now)?;
        if msg
            .miniprogram_state
            .as_deref()
            .is_some_and(|s| !matches!(s, "developer" | "trial" | "formal"))
        {
            return Err(wx(47003, "argument invalid! miniprogram_state"));
        }
        if msg
            .lang
            .as_deref()
            .is_some_and(|l| !matches!(l, "zh_CN" | "en_US" | "zh_HK" | "zh_TW"))
        {
            return Err(wx(47003, "argument invalid! lang"));
        }
        if let Some(field) = subscribe_data::first_invalid(&msg.data) {
            return Err(wx(47003, &format!("argument invalid! {field}")));
        }
        let grants = app
            .grants
            .get_mut(&(msg.touser.clone(), msg.template_id.clone()))
            .filter(|n| **n > 0)
            .ok_or_else(|| wx(43101, "user refuse to accept the msg"))?;
        *grants -= 1;
        app.sends += 1;
        let appid = app.appid.clone();
        let seq = self.record.next_seq();
        let msgid = MSGID_BASE.saturating_add_unsigned(seq);
        self.record.deliveries.push(Delivery {
            seq,
            at: Utc::now(),
            appid,
            touser: msg.touser.clone(),
            template_id: msg.template_id.clone(),
            kind: MessageKind::Subscribe,
            credential: None,
            page: msg.page.clone(),
            data: msg.data.clone(),
            miniprogram_state: msg.miniprogram_state.clone(),
            lang: msg.lang.clone(),
            msgid: Some(msgid),
            response_dropped: false,
        });
        Ok(SubscribeSendResponse {
            errcode: 0,
            errmsg: "ok".into(),
            msgid: Some(msgid),
        })
    }

    /// The checks every send makes before looking at the credential, in WeChat's
    /// order of concerns: token, account quota, template, page, user.
    fn sender(&mut self, t: &Target<'_>, now: Instant) -> Result<&mut App, ApiStatus> {
        let appid = self.tokens.check(t.token, now)?;
        let app = self
            .apps
            .get_mut(appid)
            .ok_or_else(|| wx(40001, "invalid credential"))?;
        if self.faults.daily_send_limit.is_some_and(|l| app.sends >= l) {
            return Err(wx(45009, "reach max api daily quota limit"));
        }
        let template_ok = match &self.cfg.templates {
            None => !t.template_id.is_empty(),
            Some(list) => list.iter().any(|x| x == t.template_id),
        };
        if !template_ok {
            return Err(wx(40037, "invalid template_id"));
        }
        let page_ok = match (&self.cfg.pages, t.page.filter(|p| !p.is_empty())) {
            (Some(list), Some(page)) => {
                let path = page.split('?').next().unwrap_or_default();
                list.iter().any(|x| x == path)
            }
            _ => true,
        };
        if !page_ok {
            return Err(wx(41030, "invalid page"));
        }
        if !app.known.contains(t.touser) {
            return Err(wx(40003, "invalid openid"));
        }
        Ok(app)
    }

    // ----- control -----

    pub(crate) fn add_app(&mut self, appid: &str, secret: &Secret) {
        self.apps
            .entry(appid.to_owned())
            .and_modify(|a| a.secret = secret.clone())
            .or_insert_with(|| App::new(appid, secret));
    }

    pub(crate) fn mint_code(
        &mut self,
        appid: &str,
        openid: &str,
        now: Instant,
    ) -> Result<String, SimError> {
        let app = user_app(&mut self.apps, appid, openid)?;
        app.codes.retain(|_, c| now < c.expires_at);
        let code = random_string(&mut self.rng, 32, ALNUM);
        app.codes.insert(
            code.clone(),
            Code {
                openid: openid.to_owned(),
                expires_at: now + self.cfg.code_life,
            },
        );
        Ok(code)
    }

    pub(crate) fn mint_form_ids(
        &mut self,
        appid: &str,
        openid: &str,
        count: u32,
        now: Instant,
    ) -> Result<Vec<String>, SimError> {
        let expires_at = now + self.cfg.form_id_life;
        let app = user_app(&mut self.apps, appid, openid)?;
        check_count(count)?;
        Ok((0..count)
            .map(|_| {
                let value = random_string(&mut self.rng, 32, HEX);
                app.credentials.insert(
                    value.clone(),
                    Credential {
                        openid: openid.to_owned(),
                        uses_left: 1,
                        active_at: now,
                        expires_at,
                    },
                );
                value
            })
            .collect())
    }

    pub(crate) fn mint_prepay_ids(
        &mut self,
        appid: &str,
        openid: &str,
        count: u32,
        uses: Option<u32>,
        activation_delay: Option<Duration>,
        now: Instant,
    ) -> Result<Vec<String>, SimError> {
        let uses = uses.unwrap_or(self.cfg.prepay_uses);
        let active_at = now + activation_delay.unwrap_or(self.cfg.prepay_activation_delay);
        let expires_at = now + self.cfg.form_id_life;
        let app = user_app(&mut self.apps, appid, openid)?;
        check_count(count)?;
        Ok((0..count)
            .map(|_| {
                let value = format!("wx{}", random_string(&mut self.rng, 32, LOWER_ALNUM));
                app.credentials.insert(
                    value.clone(),
                    Credential {
                        openid: openid.to_owned(),
                        uses_left: uses,
                        active_at,
                        expires_at,
                    },
                );
                value
            })
            .collect())
    }

    /// Adds `count` one-time grants; returns the grants now left.
    pub(crate) fn grant_subscriptions(
        &mut self,
        appid: &str,
        openid: &str,
        template_id: &str,
        count: u32,
    ) -> Result<u32, SimError> {
        let app = user_app(&mut self.apps, appid, openid)?;
        check_count(count)?;
        let n = app
            .grants
            .entry((openid.to_owned(), template_id.to_owned()))
            .or_default();
        *n = n.saturating_add(count);
        Ok(*n)
    }

    pub(crate) fn set_faults(&mut self, faults: Faults) -> Result<(), SimError> {
        faults.send.check("send").map_err(SimError::Invalid)?;
        faults.token.check("token").map_err(SimError::Invalid)?;
        faults.login.check("login").map_err(SimError::Invalid)?;
        if let Some(seed) = faults.seed {
            self.rng = StdRng::seed_from_u64(seed);
        }
        self.faults = faults;
        Ok(())
    }

    pub(crate) fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// Every token of the app (classic and stable, current or in overlap) dies now.
    /// Returns how many were still usable.
    pub(crate) fn invalidate_tokens(
        &mut self,
        appid: &str,
        now: Instant,
    ) -> Result<usize, SimError> {
        let app = find_app(&mut self.apps, appid)?;
        app.classic = None;
        app.stable = None;
        let mut killed = 0;
        for t in self.tokens.0.values_mut().filter(|t| t.appid == appid) {
            if t.dies_at.is_none_or(|d| d > now) && t.expires_at > now {
                killed += 1;
            }
            t.dies_at = Some(t.dies_at.map_or(now, |d| d.min(now)));
        }
        Ok(killed)
    }

    /// A new day: token, force-refresh and send counters of every app back to 0.
    pub(crate) fn reset_limits(&mut self) {
        for app in self.apps.values_mut() {
            app.token_calls = 0;
            app.force_refreshes = 0;
            app.last_force = None;
            app.sends = 0;
        }
    }

    pub(crate) fn block(&mut self, appid: &str, openid: &str) -> Result<(), SimError> {
        let app = user_app(&mut self.apps, appid, openid)?;
        app.blocked.insert(openid.to_owned());
        Ok(())
    }

    pub(crate) fn deliveries(&self) -> Vec<Delivery> {
        self.record.deliveries.clone()
    }

    pub(crate) fn token_fetches(&self) -> Vec<TokenFetch> {
        self.record.token_fetches.clone()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.record.stats.clone()
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

fn secs_ceil(d: Duration) -> i64 {
    i64::try_from(d.as_millis().div_ceil(1000)).unwrap_or(i64::MAX)
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

fn check_count(count: u32) -> Result<(), SimError> {
    if count == 0 || count > MAX_MINT {
        return Err(SimError::Invalid(format!("count must be 1..={MAX_MINT}")));
    }
    Ok(())
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
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn state(cfg: SimConfig) -> State {
        State::new(SimConfig {
            apps: vec![("wxa".into(), Secret::new("s"))],
            seed: Some(1),
            ..cfg
        })
    }

    fn classic(st: &mut State, now: Instant) -> String {
        let q = TokenQuery {
            grant_type: "client_credential".into(),
            appid: "wxa".into(),
            secret: "s".into(),
        };
        st.classic_token(&q, now).expect("token").access_token
    }

    fn stable(st: &mut State, force_refresh: bool, now: Instant) -> Result<String, i64> {
        let r = StableTokenRequest {
            grant_type: "client_credential".into(),
            appid: "wxa".into(),
            secret: "s".into(),
            force_refresh,
        };
        st.stable_token(&r, now)
            .map(|t| t.access_token)
            .map_err(|e| e.errcode)
    }

    fn check(st: &State, token: &str, now: Instant) -> Result<(), i64> {
        st.tokens.check(token, now).map(drop).map_err(|e| e.errcode)
    }

    #[test]
    fn a_superseded_classic_token_works_for_the_overlap_only() {
        let mut st = state(SimConfig {
            token_overlap: S(10),
            token_expires_in: S(100),
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let a = classic(&mut st, t0);
        let b = classic(&mut st, t0 + S(5));
        assert_eq!(
            check(&st, &a, t0 + S(15) - Duration::from_millis(1)),
            Ok(())
        );
        assert_eq!(check(&st, &a, t0 + S(15)), Err(40001));
        assert_eq!(
            check(&st, &b, t0 + S(105) - Duration::from_millis(1)),
            Ok(())
        );
        assert_eq!(check(&st, &b, t0 + S(105)), Err(42001));
    }

    #[test]
    fn without_overlap_the_old_token_dies_at_once() {
        let mut st = state(SimConfig {
            token_overlap: Duration::ZERO,
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let a = classic(&mut st, t0);
        let _b = classic(&mut st, t0);
        assert_eq!(check(&st, &a, t0), Err(40001));
    }

    #[test]
    fn stable_token_renews_in_the_last_quarter_and_force_refresh_kills() {
        let mut st = state(SimConfig {
            token_expires_in: S(100),
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let a = stable(&mut st, false, t0).expect("a");
        assert_eq!(stable(&mut st, false, t0 + S(74)), Ok(a.clone()));
        let b = stable(&mut st, false, t0 + S(76)).expect("b");
        assert_ne!(a, b);
        assert_eq!(check(&st, &a, t0 + S(99)), Ok(()));
        assert_eq!(check(&st, &a, t0 + S(100)), Err(42001));
        assert_eq!(stable(&mut st, false, t0 + S(80)), Ok(b.clone()));

        let c = stable(&mut st, true, t0 + S(80)).expect("c");
        assert_eq!(check(&st, &b, t0 + S(80)), Err(40001));
        assert_eq!(stable(&mut st, true, t0 + S(109)), Err(45011));
        assert!(stable(&mut st, true, t0 + S(110)).is_ok_and(|d| d != c));
    }

    #[test]
    fn a_prepay_id_waits_for_activation_then_has_its_uses() {
        let mut st = state(SimConfig {
            token_expires_in: S(8 * 24 * 3600),
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let token = classic(&mut st, t0);
        let prepay = st
            .mint_prepay_ids("wxa", "o", 1, Some(2), Some(S(5)), t0)
            .expect("prepay")
            .remove(0);
        let fid = st.mint_form_ids("wxa", "o", 1, t0).expect("fid").remove(0);
        let mut send = |value: &str, at: Instant| {
            let msg = TemplateMessage {
                touser: "o".into(),
                template_id: "T".into(),
                form_id: value.into(),
                ..TemplateMessage::default()
            };
            st.send_template(&token, &msg, at)
                .map(drop)
                .map_err(|e| e.errcode)
        };
        assert_eq!(send(&prepay, t0 + S(4)), Err(41028));
        assert_eq!(send(&prepay, t0 + S(5)), Ok(()));
        assert_eq!(send(&prepay, t0 + S(6)), Ok(()));
        assert_eq!(send(&prepay, t0 + S(7)), Err(41029));
        // A form_id lives 7 days.
        assert_eq!(send(&fid, t0 + S(7 * 24 * 3600)), Err(41028));
    }

    #[test]
    fn logins_are_rate_limited_per_user_without_losing_the_code() {
        let mut st = state(SimConfig {
            login_rate_per_minute: 1,
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let login = |st: &mut State, code: &str, at: Instant| {
            let q = Code2SessionQuery {
                appid: "wxa".into(),
                secret: "s".into(),
                js_code: code.into(),
                grant_type: "authorization_code".into(),
            };
            st.login(&q, at).map(|r| r.openid).map_err(|e| e.errcode)
        };
        let first = st.mint_code("wxa", "o", t0).expect("code");
        let second = st.mint_code("wxa", "o", t0).expect("code");
        assert_eq!(login(&mut st, &first, t0), Ok("o".to_owned()));
        assert_eq!(login(&mut st, &second, t0 + S(59)), Err(45011));
        assert_eq!(login(&mut st, &second, t0 + S(60)), Ok("o".to_owned()));
        let late = st.mint_code("wxa", "o", t0).expect("code");
        assert_eq!(login(&mut st, &late, t0 + S(300)), Err(40029));
    }
}
