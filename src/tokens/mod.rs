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
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        TokenManager {
            metrics,
            db,
            client,
            api,
            refresh_margin: TimeDelta::from_std(refresh_margin).unwrap_or(TimeDelta::minutes(5)),
            owner: format!("{:016x}", rand::random::<u64>()),
            apps: apps
                .iter()
                .map(|a| {
                    let slot = AppSlot {
                        secret: a.secret.clone(),
                        flight: Mutex::new(()),
                        last_failure: std::sync::Mutex::new(None),
                        cached: std::sync::Mutex::new(None),
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
        self.refresh(app_id, Need::ExpiresBefore(now))
            .await
            .map(|(t, _)| t)
    }

    /// Compare-and-refresh: a new token if `stale` is still the current one, else the
    /// current one. The flag says whether this call fetched.
    pub async fn compare_and_refresh(
        &self,
        app_id: &str,
        stale: &str,
    ) -> Result<(CurrentToken, bool), TokenError> {
        let stale = stale.to_string();
        self.refresh(app_id, Need::StillCurrent(&stale)).await
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
            return self.fetch_and_store(app_id, slot, need, &row).await;
        }
    }

    async fn fetch_and_store(
        &self,
        app_id: &str,
        slot: &AppSlot,
        need: Need<'_>,
        old: &StoredToken,
    ) -> Result<(CurrentToken, bool), TokenError> {
        let fetched = self.fetch(app_id, &slot.secret, need, old).await;
        let result = if fetched.is_ok() { "ok" } else { "error" };
        self.metrics
            .token_refreshes
            .with_label_values(&[app_id, result])
            .inc();
        let (id, owner) = (app_id.to_string(), self.owner.clone());
        match fetched {
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
        old: &StoredToken,
    ) -> Result<AccessToken, WechatError> {
        match self.api {
            TokenApi::Classic => self.client.classic_token(app_id, secret).await,
            TokenApi::Stable => {
                let token = self.client.stable_token(app_id, secret, false).await?;
                // The stable API keeps handing out a token WeChat refused until it
                // is forced; force only then (WeChat allows ~20 a day).
                if matches!(need, Need::StillCurrent(_)) && token.token.expose() == old.token {
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
            let (token, _) = self.refresh(app_id, Need::ExpiresBefore(due)).await?;
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

fn handed_out(row: StoredToken) -> CurrentToken {
    CurrentToken {
        token: Secret::new(row.token),
        expires_at: row.expires_at,
    }
}

/// [`Need`] without the borrow, to move into a blocking database task.
enum OwnedNeed {
    ExpiresBefore(DateTime<Utc>),
    StillCurrent(String),
}

impl OwnedNeed {
    fn as_need(&self) -> Need<'_> {
        match self {
            OwnedNeed::ExpiresBefore(at) => Need::ExpiresBefore(*at),
            OwnedNeed::StillCurrent(t) => Need::StillCurrent(t),
        }
    }
}

impl From<Need<'_>> for OwnedNeed {
    fn from(need: Need<'_>) -> Self {
        match need {
            Need::ExpiresBefore(at) => OwnedNeed::ExpiresBefore(at),
            Need::StillCurrent(t) => OwnedNeed::StillCurrent(t.to_string()),
        }
    }
}
