//! A WeChat simulator: answers the mini-program server API as WeChat does (the
//! endpoints, and what it does where WeChat's documentation leaves a choice, are
//! listed below) and records what it received, so tests, the sandbox and benchmarks
//! have a faithful peer.
//!
//! From the rest of the crate it uses the JSON shapes of the WeChat endpoints
//! ([`crate::wechat::wire`]), the subscribe-message value rules
//! ([`crate::wechat::subscribe_data`], the same the service applies when a message is
//! posted, so a mistake in them would not show up in tests against the simulator) and
//! [`crate::secret::Secret`] for app secrets; nothing else.
//!
//! Use it in-process ([`Simulator::configure`] mounts it on another app, e.g. the
//! service's sandbox mode) or standalone ([`serve`]).
//!
//! # WeChat endpoints
//! `GET /cgi-bin/token`, `POST /cgi-bin/stable_token`, `GET /sns/jscode2session`,
//! `POST /cgi-bin/message/wxopen/template/send`, `POST /cgi-bin/message/subscribe/send`,
//! as WeChat documents them; errors are HTTP 200 `{"errcode": N, "errmsg": "..."}`.
//! Where WeChat's documentation leaves a choice, the simulator:
//! - answers 40014 for a token that is not even token-shaped, 40001 for an unknown,
//!   superseded (after the overlap) or invalidated one, 42001 for an expired one;
//! - renews a `stable_token` (normal mode) in the last `min(300 s, expires_in / 4)`
//!   of its life, the old one living on to its own expiry (so short test expiries
//!   work); force refreshes are limited by `stable_force_interval` (→ 45011) and
//!   `stable_force_daily_limit` (→ 45009); only classic calls count against
//!   `token_daily_limit`;
//! - checks a send in this order: token, daily send limit (45009), template (40037),
//!   page (41030), openid (40003: known once anything was minted for it), then for a
//!   template message the form_id/prepay_id (41028 unknown / another user's /
//!   expired / not yet active, 41029 no use left — checked before expiry, so a
//!   repeated send of a spent credential answers 41029), for a subscribe message
//!   `miniprogram_state`, `lang` and data (47003, "argument invalid! data.thing1.value")
//!   and then the grant (43101);
//! - a body that is not JSON answers 47001; with `template_api_retired` every
//!   template send with a valid token answers 45103;
//! - more than `login_rate_per_minute` logins of one user in a minute answer 45011
//!   (the code stays usable);
//! - with the fault knob `reject_concurrent_sends`, a send to a user while another
//!   send to that user is still being answered answers 43108 (checked first);
//! - limits never reset by themselves: `POST /sim/reset-limits` is the new day.
//!
//! # Control and record endpoints (JSON; errors `{"error": {"code", "message"}}`,
//! 404 `unknown_app`, 400 `invalid_request`; unknown fields are rejected)
//! | endpoint | body | answer |
//! |---|---|---|
//! | `POST /sim/apps` | `{appid, secret}` | `{appid}` (adds, or changes the secret) |
//! | `POST /sim/codes` | `{appid, openid}` | `{code}`: a `wx.login()` code, single use, `code_life` |
//! | `POST /sim/form-ids` | `{appid, openid, count?}` | `{form_ids: [...]}`: 1 use, `form_id_life` |
//! | `POST /sim/prepay-ids` | `{appid, openid, count?, uses?, activation_delay_ms?}` | `{prepay_ids: [...]}` |
//! | `POST /sim/subscriptions` | `{appid, openid, template_id, count?}` | `{grants_left}`: adds one-time grants |
//! | `POST /sim/faults` / `GET /sim/faults` | [`Faults`] (replaces all of it) | the faults now |
//! | `POST /sim/tokens/invalidate` | `{appid}` | `{invalidated}`: every token of the app answers 40001 now |
//! | `POST /sim/reset-limits` | none | `{ok}`: token, force-refresh and send counters to 0 |
//! | `POST /sim/block` | `{appid, openid}` | `{ok}`: the user's logins answer 40226 |
//! | `GET /sim/deliveries` | | `[`[`Delivery`]`]` every accepted message |
//! | `GET /sim/token-fetches` | | `[`[`TokenFetch`]`]` every token call |
//! | `GET /sim/stats` | | [`Stats`]: calls per endpoint per outcome |
//!
//! `count` defaults to 1 (at most 10 000). The same operations exist as methods
//! of [`Simulator`].
//!
//! # Message push
//! With [`Simulator::set_push_target`] the simulator is WeChat's pusher for an app
//! ([`pusher`]): a popup event per minted grant, a sent event after each subscribe
//! delivery (also when its answer is dropped), signed and encrypted as WeChat does,
//! retried when no answer comes within 5 s.

pub mod config;
mod handlers;
pub mod pusher;
pub mod record;
mod state;

use std::fmt;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpServer};

pub use config::{FaultSet, Faults, Latency, SimConfig};
pub use pusher::{PushTarget, UserHabits};
pub use record::{Delivery, MessageKind, Stats, TokenApi, TokenFetch};
pub use state::SimError;

use crate::secret::Secret;
use state::State;

/// The simulator. Clones share one state.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<Mutex<State>>,
    pusher: pusher::Pusher,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Simulator")
    }
}

impl Simulator {
    pub fn new(cfg: SimConfig) -> Self {
        Simulator {
            state: Arc::new(Mutex::new(State::new(cfg))),
            pusher: pusher::Pusher::default(),
        }
    }

    /// WeChat's message push for the app: from now on the simulator pushes a popup
    /// event for each grant it mints and a sent event after each subscribe
    /// delivery, signed (and, with a key, encrypted) as WeChat does, retried when
    /// no answer comes within 5 s (3 tries in all).
    pub fn set_push_target(&self, appid: &str, target: PushTarget) {
        self.pusher.set_target(appid, target);
    }

    /// Pushes the target answered with a 2xx.
    pub fn pushes_answered(&self) -> u64 {
        self.pusher.answered()
    }

    /// Mounts the WeChat and `/sim/...` routes on an app.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        handlers::config(cfg, self);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No state method panics half-way; a poisoned lock still holds a sound state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an app, or changes its secret.
    pub fn add_app(&self, appid: &str, secret: &Secret) {
        self.lock().add_app(appid, secret);
    }

    /// A `wx.login()` code for the user.
    pub fn mint_code(&self, appid: &str, openid: &str) -> Result<String, SimError> {
        self.lock().mint_code(appid, openid, Instant::now())
    }

    pub fn mint_form_ids(
        &self,
        appid: &str,
        openid: &str,
        count: u32,
    ) -> Result<Vec<String>, SimError> {
        self.lock()
            .mint_form_ids(appid, openid, count, Instant::now())
    }

    /// `uses` and `activation_delay` default to the [`SimConfig`] values.
    pub fn mint_prepay_ids(
        &self,
        appid: &str,
        openid: &str,
        count: u32,
        uses: Option<u32>,
        activation_delay: Option<Duration>,
    ) -> Result<Vec<String>, SimError> {
        self.lock()
            .mint_prepay_ids(appid, openid, count, uses, activation_delay, Instant::now())
    }

    /// Adds `count` one-time grants ("accept" taps); returns the grants now left.
    pub fn grant_subscriptions(
        &self,
        appid: &str,
        openid: &str,
        template_id: &str,
        count: u32,
    ) -> Result<u32, SimError> {
        let left = self
            .lock()
            .grant_subscriptions(appid, openid, template_id, count)?;
        for _ in 0..count {
            self.pusher.popup(appid, openid, template_id);
        }
        Ok(left)
    }

    /// How the user behaves from now on: "always keep this choice" (grants without
    /// popup events) and refusing messages on the phone (refused sent events).
    pub fn set_habits(&self, appid: &str, openid: &str, habits: UserHabits) {
        self.pusher.set_habits(appid, openid, habits);
    }

    /// The user turns the template off in settings: the grants left are void and
    /// WeChat pushes a change event (`reject`). Returns the grants voided.
    pub fn turn_off(&self, appid: &str, openid: &str, template_id: &str) -> Result<u32, SimError> {
        let voided = self.lock().turn_off(appid, openid, template_id)?;
        self.pusher.change(appid, openid, template_id);
        Ok(voided)
    }

    /// Replaces the fault configuration.
    pub fn set_faults(&self, faults: Faults) -> Result<(), SimError> {
        self.lock().set_faults(faults)
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults()
    }

    /// Every token of the app dies now; returns how many were still usable.
    pub fn invalidate_tokens(&self, appid: &str) -> Result<usize, SimError> {
        self.lock().invalidate_tokens(appid, Instant::now())
    }

    /// A new day for every daily counter.
    pub fn reset_limits(&self) {
        self.lock().reset_limits();
    }

    /// The user's logins answer 40226 from now on.
    pub fn block(&self, appid: &str, openid: &str) -> Result<(), SimError> {
        self.lock().block(appid, openid)
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries()
    }

    pub fn token_fetches(&self) -> Vec<TokenFetch> {
        self.lock().token_fetches()
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats()
    }
}

/// Serves the simulator alone on `listener` until the server stops.
pub async fn serve(listener: TcpListener, sim: Simulator) -> std::io::Result<()> {
    // Built in its own statement: the `HttpServer` must not live across the await
    // (it is not `Send`, and callers spawn this future).
    let server = HttpServer::new(move || {
        let sim = sim.clone();
        App::new()
            .configure(move |cfg| sim.configure(cfg))
            .default_service(web::to(handlers::not_found))
    })
    .listen(listener)?
    .run();
    server.await
}
