//! Sender workers: pick a due message, take a step, settle it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{watch, Notify};

use super::policy::Policy;
pub use super::settle::next_beijing_midnight;
use super::settle::{self, Settlement};
use super::store::{self, MessageRow};
use super::waiters::{Waiter, Waiters};
use super::Content;
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
    waiters: Waiters,
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
            waiters: Waiters::default(),
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

    /// Waits for message `id` to reach a final status in this instance; only its own
    /// finish wakes it (see [`Waiters`]).
    pub fn waiter(&self, id: i64) -> Waiter {
        self.waiters.wait_for(id)
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

    /// What the send policy (gap between a user's messages, daily cap) says of this
    /// message now. Only one message per user is leased at a time, so no other send
    /// of the user can slip in between this look and the send.
    async fn policy_verdict(
        &self,
        msg: &MessageRow,
        now: DateTime<Utc>,
    ) -> DbResult<settle::PolicyVerdict> {
        let policy = &self.config.policy;
        if policy.user_min_gap.is_zero() && policy.user_daily_cap == 0 {
            return Ok(settle::PolicyVerdict::Go);
        }
        let (app_id, openid) = (msg.app_id.clone(), msg.openid.clone());
        let day_start = settle::beijing_day_start(now);
        let (last, today) = self
            .db
            .run(move |c| store::user_sends(c, &app_id, &openid, day_start))
            .await?;
        let campaign = msg.campaign_id.is_some();
        Ok(settle::policy_verdict(policy, last, today, campaign, now))
    }

    async fn process(&self, msg: MessageRow) -> DbResult<()> {
        let now = crate::time::now();
        if msg.in_flight {
            // The worker that made this call died (or lost its lease) before it
            // settled: WeChat may have delivered.
            return self.settle(&msg, settle::interrupted(&msg, now)?).await;
        }
        if msg.credential_id.is_none() {
            match self.policy_verdict(&msg, now).await? {
                settle::PolicyVerdict::Go => {}
                settle::PolicyVerdict::Wait(until) => {
                    return self
                        .settle(&msg, settle::held_by_policy(&msg, until)?)
                        .await;
                }
                settle::PolicyVerdict::Skip => {
                    return self.settle(&msg, settle::skipped(now)).await;
                }
            }
        }
        let content = match msg.content() {
            Ok(content) => content,
            Err(e) => {
                log::error!(
                    "message {}: stored body does not parse ({e}); failed, not sent",
                    msg.id
                );
                return self.settle(&msg, settle::corrupt_body(&msg, now)).await;
            }
        };
        let token = match self.tokens.current(&msg.app_id).await {
            Ok(t) => t.token,
            Err(e) => {
                // No token, no call: not an attempt on the credential.
                log::warn!("message {}: no access_token: {e}", msg.id);
                let policy = &self.config.policy;
                let settlement = settle::no_token(&msg, msg.status()?, policy, crate::time::now());
                return self.settle(&msg, settlement).await;
            }
        };
        let Some(msg) = self.hold_credential(msg, now).await? else {
            return Ok(());
        };
        let kind = msg.credential_kind()?;
        let sent = self
            .send_with_fresh_token(&msg, kind, &content, token)
            .await;
        let msgid = sent.as_ref().ok().copied().flatten();
        let result = sent.map(|_| ());
        let mut settlement =
            settle::outcome(&msg, &result, &self.config.policy, crate::time::now())?;
        settlement.wechat_msgid = msgid.map(|id| id.to_string());
        self.settle(&msg, settlement).await
    }

    /// The message holding a credential use with its call marked in flight: the use
    /// it holds, or a new one claimed. None if there is no call to make now: the
    /// user has no credential (settled here) or the lease was lost.
    async fn hold_credential(
        &self,
        msg: MessageRow,
        now: DateTime<Utc>,
    ) -> DbResult<Option<MessageRow>> {
        let owner = self.owner.clone();
        if msg.credential_id.is_some() {
            let id = msg.id;
            let ours = self
                .db
                .run(move |c| store::mark_in_flight(c, id, &owner, crate::time::now()))
                .await?;
            return Ok(ours.then_some(msg));
        }
        let m = msg.clone();
        let claimed = self
            .db
            .run(move |c| store::claim_credential(c, &m, &owner, crate::time::now()))
            .await?;
        let hit = if claimed.is_some() { "hit" } else { "miss" };
        self.metrics.claims.with_label_values(&[hit]).inc();
        if claimed.is_none() {
            self.settle(&msg, settle::no_credential(&msg, now)).await?;
        }
        Ok(claimed)
    }

    /// Calls WeChat; on a token error, compare-and-refresh and call again (bounded).
    async fn send_with_fresh_token(
        &self,
        msg: &MessageRow,
        kind: Option<Kind>,
        content: &Content,
        mut token: Secret,
    ) -> Result<Option<i64>, WechatError> {
        let mut refreshes = 0;
        loop {
            let result = self.send(msg, kind, content.clone(), &token).await;
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

    async fn send(
        &self,
        msg: &MessageRow,
        kind: Option<Kind>,
        content: Content,
        token: &Secret,
    ) -> Result<Option<i64>, WechatError> {
        if kind == Some(Kind::Subscription) {
            let body = SubscribeMessage {
                touser: msg.openid.clone(),
                template_id: msg.template_id.clone(),
                page: msg.page.clone(),
                data: content.data,
                miniprogram_state: content.miniprogram_state,
                lang: content.lang,
            };
            self.wechat.send_subscribe(token, &body).await
        } else {
            let body = TemplateMessage {
                touser: msg.openid.clone(),
                template_id: msg.template_id.clone(),
                page: msg.page.clone(),
                form_id: msg.credential_value.clone().unwrap_or_default(),
                data: content.data,
                emphasis_keyword: content.emphasis_keyword,
            };
            self.wechat.send_template(token, &body).await.map(|()| None)
        }
    }

    /// Writes the step's end; reports a final status, wakes a worker for a step due now.
    async fn settle(&self, msg: &MessageRow, settlement: Settlement) -> DbResult<()> {
        let (m, owner, s) = (msg.clone(), self.owner.clone(), settlement.clone());
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
        if let Some(until) = settlement.pause_until {
            log::warn!(
                "app {}: daily send limit (45009); sending paused until {until}",
                msg.app_id
            );
        }
        if settlement.status.is_final() {
            let (code, errcode) = settlement
                .error
                .as_ref()
                .map_or(("-", None), |e| (e.code.as_str(), e.wechat_errcode));
            log::info!(
                "message {} {} app={} openid={}… errcode={} code={}",
                msg.id,
                settlement.status.as_str(),
                msg.app_id,
                msg.openid.chars().take(6).collect::<String>(),
                errcode.map_or("-".to_string(), |e| e.to_string()),
                code,
            );
            self.metrics
                .messages_finished
                .with_label_values(&[settlement.status.as_str(), code])
                .inc();
            self.waiters.finished(msg.id);
        } else if settlement.next_attempt_at <= crate::time::now() {
            self.nudge();
        }
        Ok(())
    }
}
