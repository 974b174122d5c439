//! Sender workers: pick a due message, take a step, settle it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Days, FixedOffset, TimeDelta, Utc};
use tokio::sync::{broadcast, watch, Notify};

use super::policy::{self, decide, Action, Context, Policy};
use super::store::{self, CredentialFate, MessageRow, Settle};
use super::{Content, Status};
use crate::db::{Db, DbResult};
use crate::ledger::Kind;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::tokens::TokenManager;
use crate::wechat::client::{WechatClient, WechatError};
use crate::wechat::wire::{SubscribeMessage, TemplateMessage};

/// How often an idle worker looks for work another instance queued.
const IDLE_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub workers: usize,
    /// A worker's hold on a message; must outlast one WeChat call comfortably. A
    /// message of a worker that died is taken over after it.
    pub lease: Duration,
    pub policy: Policy,
}

pub struct Sender {
    db: Db,
    wechat: WechatClient,
    tokens: Arc<TokenManager>,
    config: SenderConfig,
    /// This instance, as lease owner.
    owner: String,
    wake: Notify,
    finished: broadcast::Sender<i64>,
    metrics: Arc<Metrics>,
}

impl Sender {
    pub fn new(
        db: Db,
        wechat: WechatClient,
        tokens: Arc<TokenManager>,
        config: SenderConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Sender {
            db,
            wechat,
            tokens,
            config,
            metrics,
            owner: format!("sender-{:016x}", rand::random::<u64>()),
            wake: Notify::new(),
            finished: broadcast::channel(1024).0,
        }
    }

    /// Starts the workers; they stop taking new work when `stop` flips to true and
    /// the returned handles finish once their current step is settled.
    pub fn spawn(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.config.workers.max(1))
            .map(|_| {
                let (me, stop) = (self.clone(), stop.clone());
                tokio::spawn(async move { me.work(stop).await })
            })
            .collect()
    }

    /// Something is due now (a new message, a report): wake an idle worker.
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    /// Message ids reaching a final status in this instance.
    pub fn finished(&self) -> broadcast::Receiver<i64> {
        self.finished.subscribe()
    }

    /// After the workers stopped: hand back every lease this instance holds.
    pub async fn release_leases(&self) -> DbResult<usize> {
        let owner = self.owner.clone();
        self.db.run(move |c| store::release_leases(c, &owner)).await
    }

    async fn work(&self, mut stop: watch::Receiver<bool>) {
        while !*stop.borrow() {
            match self.step().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => log::warn!("sender: {e}"),
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Takes one step of the message due first. False if nothing was due.
    async fn step(&self) -> DbResult<bool> {
        let owner = self.owner.clone();
        let lease = TimeDelta::from_std(self.config.lease).unwrap_or(TimeDelta::seconds(30));
        let picked = self
            .db
            .run(move |c| {
                let now = crate::time::now();
                store::lease_next(c, &owner, now, now + lease)
            })
            .await?;
        match picked {
            Some(msg) => {
                self.process(msg).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn process(&self, mut msg: MessageRow) -> DbResult<()> {
        let now = crate::time::now();
        if msg.in_flight {
            // The worker that made this call died (or lost its lease) before it
            // settled: WeChat may have delivered.
            let settle = if can_probe(&msg) {
                Settle {
                    attempt: Some((None, "interrupted")),
                    ..keep(Status::Sending, now, msg.retries, true)
                }
            } else {
                finish(
                    Status::Failed,
                    CredentialFate::Spent,
                    Some((None, "interrupted")),
                    outcome_unknown(None),
                    now,
                )
            };
            return self.settle(&msg, settle).await;
        }
        let token = match self.tokens.current(&msg.app_id).await {
            Ok(t) => t.token,
            Err(e) => {
                // No token, no call: not an attempt on the credential.
                log::warn!("message {}: no access_token: {e}", msg.id);
                let retries = msg.retries + 1;
                let settle = keep(
                    msg.status()?,
                    self.backoff_at(retries),
                    msg.retries,
                    msg.ambiguous,
                );
                return self.settle(&msg, settle).await;
            }
        };
        if msg.credential_id.is_none() {
            let (m, owner) = (msg.clone(), self.owner.clone());
            let claimed = self
                .db
                .run(move |c| store::claim_credential(c, &m, &owner, crate::time::now()))
                .await?;
            let hit = if claimed.is_some() { "hit" } else { "miss" };
            self.metrics.claims.with_label_values(&[hit]).inc();
            let Some(holding) = claimed else {
                return self.no_credential(&msg, now).await;
            };
            msg = holding;
        } else {
            let (id, owner) = (msg.id, self.owner.clone());
            let ours = self
                .db
                .run(move |c| store::mark_in_flight(c, id, &owner, crate::time::now()))
                .await?;
            if !ours {
                return Ok(());
            }
        }
        let result = self.send_with_fresh_token(&msg, token).await;
        let settle = self.outcome(&msg, &result);
        self.settle(&msg, settle).await
    }

    /// Calls WeChat; on a token error, compare-and-refresh and call again (bounded).
    async fn send_with_fresh_token(
        &self,
        msg: &MessageRow,
        mut token: Secret,
    ) -> Result<(), WechatError> {
        let mut refreshes = 0;
        loop {
            let result = self.send(msg, &token).await;
            let token_problem =
                matches!(&result, Err(e) if e.class == crate::wechat::errcode::ErrorClass::Token);
            if !token_problem || refreshes >= self.config.policy.max_token_refreshes {
                return result;
            }
            refreshes += 1;
            match self
                .tokens
                .compare_and_refresh(&msg.app_id, token.expose())
                .await
            {
                Ok((fresh, _)) => token = fresh.token,
                Err(_) => return result,
            }
        }
    }

    async fn send(&self, msg: &MessageRow, token: &Secret) -> Result<(), WechatError> {
        // The body was written by `submit` from this very type.
        let content: Content = serde_json::from_str(&msg.body).unwrap_or(Content {
            data: Default::default(),
            emphasis_keyword: None,
            miniprogram_state: None,
            lang: None,
        });
        if msg.credential_kind() == Some(Kind::Subscription) {
            let body = SubscribeMessage {
                touser: msg.openid.clone(),
                template_id: msg.template_id.clone(),
                page: msg.page.clone(),
                data: content.data,
                miniprogram_state: content.miniprogram_state,
                lang: content.lang,
            };
            self.wechat.send_subscribe(token, &body).await.map(|_| ())
        } else {
            let body = TemplateMessage {
                touser: msg.openid.clone(),
                template_id: msg.template_id.clone(),
                page: msg.page.clone(),
                form_id: msg.credential_value.clone().unwrap_or_default(),
                data: content.data,
                emphasis_keyword: content.emphasis_keyword,
            };
            self.wechat.send_template(token, &body).await
        }
    }

    /// The policy's action, as a settlement of this step.
    fn outcome(&self, msg: &MessageRow, result: &Result<(), WechatError>) -> Settle {
        let now = crate::time::now();
        let policy = &self.config.policy;
        let age = msg
            .credential_created_at
            .map(|c| (now - c.and_utc()).to_std().unwrap_or_default())
            .unwrap_or_default();
        let ctx = Context {
            credential_age: age,
            earlier_ambiguous: msg.ambiguous,
        };
        let errcode = result
            .as_ref()
            .err()
            .and_then(|e| e.errcode)
            .and_then(|c| i32::try_from(c).ok());
        let errmsg = result
            .as_ref()
            .err()
            .map(|e| e.message.clone())
            .unwrap_or_default();
        // Uses stay charged if any call with this credential may have delivered.
        let give_back = |ambiguous: bool| {
            if ambiguous || msg.ambiguous {
                CredentialFate::Spent
            } else {
                CredentialFate::Release
            }
        };
        match decide(result, ctx, policy) {
            Action::Sent => {
                let outcome = if result.is_ok() {
                    "sent"
                } else {
                    "delivered_earlier"
                };
                Settle {
                    attempt: Some((Some(errcode.unwrap_or(0)), outcome)),
                    ..finish(Status::Sent, CredentialFate::Spent, None, None, now)
                }
            }
            Action::RetrySame { after } => Settle {
                attempt: Some((errcode, "retry_later")),
                ..keep(Status::Sending, now + after, msg.retries, msg.ambiguous)
            },
            Action::NextCredential { invalidate } => {
                let attempt = Some((errcode, "credential_invalid"));
                if msg.credentials_tried
                    >= i32::try_from(policy.max_credentials).unwrap_or(i32::MAX)
                {
                    let error = (
                        "credentials_exhausted",
                        errcode,
                        format!("{} credentials tried, none usable", msg.credentials_tried),
                    );
                    finish(
                        Status::Failed,
                        CredentialFate::Invalidate(invalidate),
                        attempt,
                        Some(error),
                        now,
                    )
                } else {
                    Settle {
                        attempt,
                        ..drop_credential(CredentialFate::Invalidate(invalidate), now)
                    }
                }
            }
            // Token errors that outlived the refreshes are treated as transient.
            Action::RefreshToken | Action::Backoff { ambiguous: false } => {
                self.backoff(msg, errcode, errmsg, false)
            }
            Action::Backoff { ambiguous: true } => self.backoff(msg, errcode, errmsg, true),
            Action::Fail { code } => finish(
                Status::Failed,
                give_back(false),
                Some((errcode, "failed")),
                Some((code, errcode, errmsg)),
                now,
            ),
            Action::PauseApp => {
                let until = next_beijing_midnight(now);
                log::warn!(
                    "app {}: daily send limit (45009); sending paused until {until}",
                    msg.app_id
                );
                Settle {
                    attempt: Some((errcode, "app_paused")),
                    pause_until: Some(until),
                    status: Status::Queued,
                    next_attempt_at: until,
                    ..drop_credential(give_back(false), now)
                }
            }
        }
    }

    fn backoff(
        &self,
        msg: &MessageRow,
        errcode: Option<i32>,
        errmsg: String,
        ambiguous: bool,
    ) -> Settle {
        let now = crate::time::now();
        let outcome = if ambiguous { "ambiguous" } else { "retry" };
        let attempt = Some((errcode, outcome));
        if ambiguous && !can_probe(msg) {
            // A multi-use prepay_id or a subscription: another call could deliver a
            // second message, and 41029 would prove nothing.
            return finish(
                Status::Failed,
                CredentialFate::Spent,
                attempt,
                outcome_unknown(errcode),
                now,
            );
        }
        let retries = msg.retries + 1;
        if retries > i32::try_from(self.config.policy.max_retries).unwrap_or(i32::MAX) {
            if ambiguous || msg.ambiguous {
                // A call may have delivered and no probe could prove it either way.
                let unknown = outcome_unknown(errcode);
                return finish(Status::Failed, CredentialFate::Spent, attempt, unknown, now);
            }
            let error = (
                "retries_exhausted",
                errcode,
                format!("WeChat kept failing: {errmsg}"),
            );
            return finish(
                Status::Failed,
                CredentialFate::Release,
                attempt,
                Some(error),
                now,
            );
        }
        Settle {
            attempt,
            ..keep(
                Status::Sending,
                self.backoff_at(retries),
                retries,
                msg.ambiguous || ambiguous,
            )
        }
    }

    async fn no_credential(&self, msg: &MessageRow, now: DateTime<Utc>) -> DbResult<()> {
        let waiting_until = msg.await_until.map(|t| t.and_utc()).filter(|t| *t > now);
        let settle = match waiting_until {
            Some(until) => Settle {
                status: Status::Queued,
                next_attempt_at: until,
                ..drop_credential(CredentialFate::Keep, now)
            },
            None => {
                let error = (
                    "no_quota",
                    None,
                    "the user has no usable credential".to_string(),
                );
                finish(
                    Status::NoQuota,
                    CredentialFate::Keep,
                    None,
                    Some(error),
                    now,
                )
            }
        };
        self.settle(msg, settle).await
    }

    fn backoff_at(&self, retries: i32) -> DateTime<Utc> {
        let delay = policy::backoff(&self.config.policy, u32::try_from(retries).unwrap_or(1));
        crate::time::now() + TimeDelta::from_std(delay).unwrap_or(TimeDelta::seconds(1))
    }

    async fn settle(&self, msg: &MessageRow, settle: Settle) -> DbResult<()> {
        let (m, owner, s) = (msg.clone(), self.owner.clone(), settle.clone());
        let applied = self
            .db
            .run(move |c| store::settle(c, &m, &owner, &s, crate::time::now()))
            .await?;
        if !applied {
            log::warn!(
                "message {}: lease lost before settling; another worker redoes the step",
                msg.id
            );
            return Ok(());
        }
        if settle.status.is_final() {
            let (code, errcode) = settle
                .error
                .as_ref()
                .map(|(code, errcode, _)| (*code, *errcode))
                .unwrap_or(("-", None));
            log::info!(
                "message {} {} app={} openid={}… errcode={} code={}",
                msg.id,
                settle.status.as_str(),
                msg.app_id,
                msg.openid.chars().take(6).collect::<String>(),
                errcode.map_or("-".to_string(), |e| e.to_string()),
                code,
            );
            self.metrics
                .messages_finished
                .with_label_values(&[settle.status.as_str(), code])
                .inc();
            let _ = self.finished.send(msg.id);
        } else if settle.next_attempt_at <= crate::time::now() {
            self.nudge();
        }
        Ok(())
    }
}

/// Keep the credential for another try at `at`.
fn keep(status: Status, at: DateTime<Utc>, retries: i32, ambiguous: bool) -> Settle {
    Settle {
        attempt: None,
        credential: CredentialFate::Keep,
        status,
        error: None,
        next_attempt_at: at,
        retries,
        ambiguous,
        pause_until: None,
    }
}

/// Let go of the credential (by `fate`); try again now with the next one.
fn drop_credential(fate: CredentialFate, now: DateTime<Utc>) -> Settle {
    Settle {
        attempt: None,
        credential: fate,
        status: Status::Queued,
        error: None,
        next_attempt_at: now,
        retries: 0,
        ambiguous: false,
        pause_until: None,
    }
}

/// A final status.
fn finish(
    status: Status,
    fate: CredentialFate,
    attempt: Option<(Option<i32>, &'static str)>,
    error: Option<(&'static str, Option<i32>, String)>,
    now: DateTime<Utc>,
) -> Settle {
    Settle {
        attempt,
        credential: fate,
        status,
        error,
        next_attempt_at: now,
        retries: 0,
        ambiguous: false,
        pause_until: None,
    }
}

/// Can an ambiguous call be repeated with the same credential? Only if it has a
/// single use: then WeChat answers 41029 if the earlier call delivered.
fn can_probe(msg: &MessageRow) -> bool {
    msg.credential_kind() != Some(Kind::Subscription) && msg.credential_uses_total == Some(1)
}

fn outcome_unknown(errcode: Option<i32>) -> Option<(&'static str, Option<i32>, String)> {
    Some((
        "outcome_unknown",
        errcode,
        "the call may have reached WeChat and the credential cannot prove it; not sent again"
            .into(),
    ))
}

/// WeChat's daily limits reset at midnight, Beijing time (UTC+8).
pub fn next_beijing_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    let beijing =
        FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| unreachable!("+8 h is a valid offset"));
    let local = now.with_timezone(&beijing).date_naive();
    local
        .checked_add_days(Days::new(1))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .and_then(|t| t.and_local_timezone(beijing).single())
        .map_or(now + TimeDelta::days(1), |t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_daily_limit_resets_at_beijing_midnight() {
        // 15:59 UTC is 23:59 in Beijing: a minute to go.
        let now = Utc.with_ymd_and_hms(2026, 11, 27, 15, 59, 0).unwrap();
        assert_eq!(
            next_beijing_midnight(now),
            Utc.with_ymd_and_hms(2026, 11, 27, 16, 0, 0).unwrap()
        );
        // 16:00 UTC is midnight: the next one is a day later.
        let now = Utc.with_ymd_and_hms(2026, 11, 27, 16, 0, 0).unwrap();
        assert_eq!(
            next_beijing_midnight(now),
            Utc.with_ymd_and_hms(2026, 11, 28, 16, 0, 0).unwrap()
        );
    }
}
