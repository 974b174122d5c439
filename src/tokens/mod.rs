//! access_token central control: one place fetches, caches and refreshes each app's
//! token, shared by every instance (through the database) and by the business's
//! other servers (through the token endpoints).
//!
//! - The token lives in the `access_tokens` row of its app. A refresh is done by the
//!   one instance holding the row's lease ([`store::take_lease`], one UPDATE, so of N
//!   instances racing exactly one wins); the others wait for the row to change and
//!   use the new token. Within one process a per-app mutex makes concurrent callers
//!   share one refresh.
//! - A background task per app refreshes the token `refresh_margin` before it
//!   expires; a failed refresh is retried with backoff while the old token is served.
//! - Compare-and-refresh: given a token WeChat just refused, refresh only if it is
//!   still the current one; otherwise hand out the current one without calling WeChat.
//!   A token fetched less than `force_interval` ago (by any instance: the age is
//!   checked in the row) is not replaced: a caller looping "get, refresh" would
//!   otherwise spend the app's daily quota (stable `force_refresh`: 20 a day, 30 s
//!   apart). With the stable API such a young token is checked at most once per
//!   [`CHECK_EVERY`] per instance with a normal (not forced) call, which catches a
//!   token replaced outside the service without spending the force quota.

pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::Mutex;

use crate::db::{Db, DbError};
use crate::secret::Secret;
use crate::settings::{App, TokenApi};
use crate::wechat::client::{AccessToken, WechatClient, WechatError};
use store::{Need, StoredToken};

/// How long a refresher may hold the lease before others may take over.
const LEASE: TimeDelta = TimeDelta::seconds(30);
/// How often a waiting instance looks at the row while another one refreshes.
const POLL: Duration = Duration::from_millis(50);
/// How often, at most, one instance checks a young refused token with a normal
/// `stable_token` call. WeChat allows 10,000 such calls a minute and 500,000 a day;
/// once a second per instance stays far below, and catches a token replaced outside
/// the service before the sender's retries run out (the chaos run kills tokens every
/// few seconds: checking once per force interval left most sends failing with 40001).
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a token read from the database is reused without reading it again.
const CACHE_FOR: Duration = Duration::from_secs(2);
/// Backoff of the background refresher after a failure: first and longest wait.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A token as handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentToken {
    pub token: Secret,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no app {0:?} is configured")]
    UnknownApp(String),
    /// WeChat could not give a token and there is no valid one.
    #[error("WeChat did not issue a token: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

pub struct TokenManager {
    db: Db,
    client: WechatClient,
    api: TokenApi,
    refresh_margin: TimeDelta,
    /// The youngest token compare-and-refresh replaces; zero: no limit.
    force_interval: TimeDelta,
    /// This instance, as lease owner.
    owner: String,
    apps: HashMap<String, AppSlot>,
    metrics: Arc<crate::metrics::Metrics>,
}

struct AppSlot {
    secret: Secret,
    /// One refresh at a time per app in this process.
    flight: Mutex<()>,
    /// The last failed fetch of this process: callers that queued behind it get its
    /// error instead of each asking WeChat again.
    last_failure: std::sync::Mutex<Option<(Instant, String)>>,
    /// The row as last read, for [`CACHE_FOR`]: a send needs no database round trip
    /// for its token. A token another instance replaced stays valid for WeChat's
    /// overlap, and a refused one is compare-and-refreshed anyway.
    cached: std::sync::Mutex<Option<(Instant, StoredToken)>>,
    /// When this process last asked WeChat (not forced) whether a young token it was
    /// told is stale is still WeChat's current one.
    last_check: std::sync::Mutex<Option<Instant>>,
}

/// Whether a refresh may force a new stable token (WeChat allows ~20 a day).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Force {
    Allowed,
    Never,
}

/// What one compare-and-refresh did, as the metric's `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ForcedOutcome {
    /// WeChat issued a new token (classic, or a forced stable refresh).
    Fetched,
    /// The token was young, and a normal stable call showed WeChat had already
    /// replaced it (someone outside the service refreshed): the new one is stored.
    CaughtUp,
    /// The token is the stale one but young: handed out again, WeChat not asked to
    /// replace it.
    Throttled,
    /// Someone already replaced the stale token: the current one is handed out.
    NotCurrent,
    Failed,
}

impl ForcedOutcome {
    fn label(self) -> &'static str {
        match self {
            ForcedOutcome::Fetched => "fetched",
            ForcedOutcome::CaughtUp => "caught_up",
            ForcedOutcome::Throttled => "throttled",
            ForcedOutcome::NotCurrent => "not_current",
            ForcedOutcome::Failed => "failed",
        }
    }
}

impl AppSlot {
    fn failed_since(&self, since: Instant) -> Option<String> {
        let last = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, e)| e.clone())
    }

    /// The cached row if it is recent and its token still valid at `now`.
    fn fresh(&self, now: DateTime<Utc>) -> Option<StoredToken> {
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .as_ref()
            .filter(|(at, row)| at.elapsed() < CACHE_FOR && !Need::ExpiresBefore(now).holds(row))
            .map(|(_, row)| row.clone())
    }

    fn forget(&self) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn remember(&self, row: &StoredToken) {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        *cached = Some((Instant::now(), row.clone()));
    }

    /// True at most once per `every` in this process: the caller may check a young
    /// token with WeChat.
    fn take_check(&self, every: Duration) -> bool {
        let mut last = self.last_check.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < every) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    fn set_failure(&self, error: &str) {
        let mut last = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some((Instant::now(), error.to_string()));
    }
}

impl TokenManager {
    pub fn new(
        db: Db,
        client: WechatClient,
        apps: &[App],
        api: TokenApi,
        refresh_margin: Duration,
        force_interval: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        TokenManager {
            metrics,
            db,
            client,
            api,
            refresh_margin: TimeDelta::from_std(refresh_margin).unwrap_or(TimeDelta::minutes(5)),
            force_interval: TimeDelta::from_std(force_interval).unwrap_or(TimeDelta::seconds(30)),
            owner: format!("{:016x}", rand::random::<u64>()),
            apps: apps
                .iter()
                .map(|a| {
                    let slot = AppSlot {
                        secret: a.secret.clone(),
                        flight: Mutex::new(()),
                        last_failure: std::sync::Mutex::new(None),
                        cached: std::sync::Mutex::new(None),
                        last_check: std::sync::Mutex::new(None),
                    };
                    (a.app_id.clone(), slot)
                })
                .collect(),
        }
    }

    /// Creates the apps' rows; call once at start.
    pub async fn init(&self) -> Result<(), TokenError> {
        let ids: Vec<String> = self.apps.keys().cloned().collect();
        self.db.run(move |c| store::ensure_rows(c, &ids)).await?;
        Ok(())
    }

    /// The app's valid token, fetching one if there is none.
    pub async fn current(&self, app_id: &str) -> Result<CurrentToken, TokenError> {
        let now = crate::time::now();
        if let Some(row) = self.apps.get(app_id).and_then(|slot| slot.fresh(now)) {
            return Ok(handed_out(row));
        }
        let row = self.load(app_id).await?;
        if !Need::ExpiresBefore(now).holds(&row) {
            return Ok(handed_out(row));
        }
        self.refresh(app_id, Need::ExpiresBefore(now), Force::Never)
            .await
            .map(|(t, _)| t)
    }

    /// Compare-and-refresh: a new token if `stale` is still the current one and was
    /// fetched at least `force_interval` ago, else the current one. The flag says
    /// whether this call stored a new token.
    pub async fn compare_and_refresh(
        &self,
        app_id: &str,
        stale: &str,
    ) -> Result<(CurrentToken, bool), TokenError> {
        let slot = self
            .apps
            .get(app_id)
            .ok_or_else(|| TokenError::UnknownApp(app_id.into()))?;
        let limited = self.force_interval > TimeDelta::zero();
        let need = Need::StillCurrent {
            stale,
            fetched_before: limited.then(|| crate::time::now() - self.force_interval),
        };
        let mut result = self.refresh(app_id, need, Force::Allowed).await;
        let mut outcome = classify(&result, stale, ForcedOutcome::Fetched);
        if outcome == ForcedOutcome::Throttled
            && self.api == TokenApi::Stable
            && slot.take_check(CHECK_EVERY)
        {
            // A young token refused by WeChat is most likely one someone outside the
            // service replaced: a normal stable call returns WeChat's current token
            // and spends none of the 20 forced refreshes a day.
            let check = Need::StillCurrent {
                stale,
                fetched_before: None,
            };
            match self.refresh(app_id, check, Force::Never).await {
                Ok(checked) => {
                    result = Ok(checked);
                    outcome = classify(&result, stale, ForcedOutcome::CaughtUp);
                }
                Err(e) => log::warn!("app {app_id}: checking a young token with WeChat: {e}"),
            }
        }
        self.metrics
            .token_forced_refreshes
            .with_label_values(&[app_id, outcome.label()])
            .inc();
        log::info!("app {app_id}: compare-and-refresh: {}", outcome.label());
        result
    }

    /// The stored row, whatever its state (for the CLI and the admin page).
    pub async fn stored(&self, app_id: &str) -> Result<StoredToken, TokenError> {
        self.load(app_id).await
    }

    async fn load(&self, app_id: &str) -> Result<StoredToken, TokenError> {
        let slot = self
            .apps
            .get(app_id)
            .ok_or_else(|| TokenError::UnknownApp(app_id.into()))?;
        let id = app_id.to_string();
        let row = self
            .db
            .run(move |c| store::load(c, &id))
            .await?
            .ok_or_else(|| {
                TokenError::Unavailable("no token row; the service did not start".into())
            })?;
        slot.remember(&row);
        Ok(row)
    }

    /// Refreshes if `need` still holds once this process and then this database
    /// have agreed who does it.
    async fn refresh(
        &self,
        app_id: &str,
        need: Need<'_>,
        force: Force,
    ) -> Result<(CurrentToken, bool), TokenError> {
        let slot = self
            .apps
            .get(app_id)
            .ok_or_else(|| TokenError::UnknownApp(app_id.into()))?;
        let queued = Instant::now();
        let _flight = slot.flight.lock().await;
        loop {
            let row = self.load(app_id).await?;
            if !need.holds(&row) {
                return Ok((handed_out(row), false));
            }
            if let Some(error) = slot.failed_since(queued) {
                return still_valid(need, &row).ok_or(TokenError::Unavailable(error));
            }
            let (id, owner, need_owned) = (
                app_id.to_string(),
                self.owner.clone(),
                OwnedNeed::from(need),
            );
            let leased = self
                .db
                .run(move |c| {
                    store::take_lease(
                        c,
                        &id,
                        &owner,
                        need_owned.as_need(),
                        crate::time::now(),
                        LEASE,
                    )
                })
                .await?;
            if !leased {
                // Another instance is fetching: its token will be in the row shortly.
                tokio::time::sleep(POLL).await;
                continue;
            }
            return self.fetch_and_store(app_id, slot, need, force, &row).await;
        }
    }

    async fn fetch_and_store(
        &self,
        app_id: &str,
        slot: &AppSlot,
        need: Need<'_>,
        force: Force,
        old: &StoredToken,
    ) -> Result<(CurrentToken, bool), TokenError> {
        let fetched = self.fetch(app_id, &slot.secret, need, force, old).await;
        let result = if fetched.is_ok() { "ok" } else { "error" };
        self.metrics
            .token_refreshes
            .with_label_values(&[app_id, result])
            .inc();
        let (id, owner) = (app_id.to_string(), self.owner.clone());
        match fetched {
            Ok(token)
                if matches!(need, Need::StillCurrent { .. })
                    && token.token.expose() == old.token =>
            {
                // WeChat says the stale token is still its current one (an unforced
                // check): nothing to store, and its fetch time stays as it was.
                self.db.run(move |c| store::release(c, &id, &owner)).await?;
                Ok((handed_out(old.clone()), false))
            }
            Ok(token) => {
                let now = crate::time::now();
                let expires_at = now + TimeDelta::seconds(token.expires_in.max(0));
                let value = token.token.clone();
                let stored = self
                    .db
                    .run(move |c| store::store(c, &id, &owner, value.expose(), expires_at, now))
                    .await?;
                if !stored {
                    log::warn!(
                        "app {app_id}: token lease ran out during the fetch; kept the newer row"
                    );
                }
                slot.forget();
                log::info!("app {app_id}: new access_token, expires at {expires_at}");
                Ok((
                    CurrentToken {
                        token: token.token,
                        expires_at,
                    },
                    true,
                ))
            }
            Err(e) => {
                log::warn!("app {app_id}: access_token refresh failed: {e}");
                let message = e.to_string();
                slot.set_failure(&message);
                self.db
                    .run(move |c| store::fail(c, &id, &owner, &message))
                    .await?;
                still_valid(need, old).ok_or(TokenError::Unavailable(e.to_string()))
            }
        }
    }

    async fn fetch(
        &self,
        app_id: &str,
        secret: &Secret,
        need: Need<'_>,
        force: Force,
        old: &StoredToken,
    ) -> Result<AccessToken, WechatError> {
        match self.api {
            TokenApi::Classic => self.client.classic_token(app_id, secret).await,
            TokenApi::Stable => {
                let token = self.client.stable_token(app_id, secret, false).await?;
                // The stable API keeps handing out a token WeChat refused until it
                // is forced; force only then (WeChat allows ~20 a day).
                if force == Force::Allowed
                    && matches!(need, Need::StillCurrent { .. })
                    && token.token.expose() == old.token
                {
                    self.client.stable_token(app_id, secret, true).await
                } else {
                    Ok(token)
                }
            }
        }
    }

    /// Keeps every app's token fresh until `stop` flips to true.
    pub fn spawn_refreshers(self: &Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        for app_id in self.apps.keys() {
            let (me, app_id, stop) = (self.clone(), app_id.clone(), stop.clone());
            tokio::spawn(async move { me.refresh_loop(&app_id, stop).await });
        }
    }

    async fn refresh_loop(&self, app_id: &str, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        while !*stop.borrow() {
            let wait = match self.refresh_due(app_id).await {
                Ok(wait) => {
                    backoff = BACKOFF_MIN;
                    wait
                }
                Err(e) => {
                    log::warn!("app {app_id}: token refresher: {e}; retrying in {backoff:?}");
                    let wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Refreshes the token if it is due; returns how long until it is due next.
    async fn refresh_due(&self, app_id: &str) -> Result<Duration, TokenError> {
        let now = crate::time::now();
        let due = now + self.refresh_margin;
        let row = self.load(app_id).await?;
        let row = if Need::ExpiresBefore(due).holds(&row) {
            let (token, _) = self
                .refresh(app_id, Need::ExpiresBefore(due), Force::Never)
                .await?;
            if token.expires_at <= crate::time::now() + self.refresh_margin {
                // WeChat handed back a token that is already due (the stable API does
                // until its last minutes): look again shortly rather than spin.
                return Ok(BACKOFF_MIN);
            }
            StoredToken {
                expires_at: token.expires_at,
                ..row
            }
        } else {
            row
        };
        let until_due = row.expires_at - self.refresh_margin - crate::time::now();
        // Wake at least every 30 s: another instance may have changed the row.
        Ok(until_due
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(30)))
    }
}

/// After a failed refresh: the old token, if the caller only needs a valid one and
/// it still is.
fn still_valid(need: Need<'_>, old: &StoredToken) -> Option<(CurrentToken, bool)> {
    let valid = !old.token.is_empty() && old.expires_at > crate::time::now();
    (matches!(need, Need::ExpiresBefore(_)) && valid).then(|| (handed_out(old.clone()), false))
}

/// What a compare-and-refresh of `stale` did, from its result; `stored` names a
/// call that stored a new token.
fn classify(
    result: &Result<(CurrentToken, bool), TokenError>,
    stale: &str,
    stored: ForcedOutcome,
) -> ForcedOutcome {
    match result {
        Ok((_, true)) => stored,
        Ok((token, false)) if token.token.expose() == stale => ForcedOutcome::Throttled,
        Ok(_) => ForcedOutcome::NotCurrent,
        Err(_) => ForcedOutcome::Failed,
    }
}

fn handed_out(row: StoredToken) -> CurrentToken {
    CurrentToken {
        token: Secret::new(row.token),
        expires_at: row.expires_at,
    }
}

/// [`Need`] without the borrow, to move into a blocking database task.
enum OwnedNeed {
    ExpiresBefore(DateTime<Utc>),
    StillCurrent(String, Option<DateTime<Utc>>),
}

impl OwnedNeed {
    fn as_need(&self) -> Need<'_> {
        match self {
            OwnedNeed::ExpiresBefore(at) => Need::ExpiresBefore(*at),
            OwnedNeed::StillCurrent(stale, fetched_before) => Need::StillCurrent {
                stale,
                fetched_before: *fetched_before,
            },
        }
    }
}

impl From<Need<'_>> for OwnedNeed {
    fn from(need: Need<'_>) -> Self {
        match need {
            Need::ExpiresBefore(at) => OwnedNeed::ExpiresBefore(at),
            Need::StillCurrent {
                stale,
                fetched_before,
            } => OwnedNeed::StillCurrent(stale.to_string(), fetched_before),
        }
    }
}
