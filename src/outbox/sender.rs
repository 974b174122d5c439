//! Sender: a dispatcher leases due messages in batches and gives each its own task,
//! which takes the message's step (policy hold, token, claim, call, settle) holding
//! no database connection during the WeChat call. The claims and the settlements of
//! the steps under way are written in groups, one transaction (one commit) each.
//! PostgreSQL instances wake each other with LISTEN/NOTIFY.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{oneshot, watch, Notify};

use super::policy::Policy;
pub use super::settle::next_beijing_midnight;
use super::settle::{self, Settlement};
use super::store::{self, ClaimJob, MessageRow, SettleJob};
use super::waiters::{Waiter, Waiters};
use super::Content;
use crate::db::{Backend, Db, DbConn, DbError, DbResult};
use crate::ledger::Kind;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::tokens::TokenManager;
use crate::wechat::client::{WechatClient, WechatError};
use crate::wechat::wire::{SubscribeMessage, TemplateMessage};

/// How often an idle sender looks for work another instance queued, when nothing
/// would tell it (SQLite, or PostgreSQL while its listener is down).
const IDLE_POLL: Duration = Duration::from_millis(100);
/// The longest an idle sender sleeps while it listens for other instances'
/// notifications (PostgreSQL): a lease of a dead instance running out wakes nobody.
const IDLE_LISTENING: Duration = Duration::from_secs(1);
/// How often the listener looks at its connection for notifications.
const LISTEN_POLL: Duration = Duration::from_millis(5);
/// The shortest gap between two notifications this instance sends (they coalesce).
const NOTIFY_GAP: Duration = Duration::from_millis(10);
/// Most messages leased by one statement.
const MAX_LEASE: usize = 256;
/// While at least this many calls are in flight, the dispatcher waits for this many
/// to be free before it leases: one lease statement per finished call would scan
/// the due queue once per message.
const LEASE_BATCH: usize = 32;
/// Most claims or settlements written by one transaction.
const MAX_GROUP: usize = 256;

#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Messages this instance works on at once (each a WeChat call in flight at
    /// most; a call holds no database connection).
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
    /// Claims of the steps under way, written together.
    claims: Arc<Group<ClaimJob, Option<MessageRow>>>,
    /// Settlements of the steps under way, written together.
    settles: Arc<Group<SettleJob, bool>>,
    /// Something is due: tell the other instances (PostgreSQL NOTIFY).
    publish: Notify,
    /// The listener for other instances' notifications is up.
    listening: AtomicBool,
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
            claims: Arc::new(Group::new(store::claim_many)),
            settles: Arc::new(Group::new(store::settle_many)),
            publish: Notify::new(),
            listening: AtomicBool::new(false),
        }
    }

    /// Starts the dispatcher (and on PostgreSQL the listener and the notifier); it
    /// stops taking new work when `stop` flips to true and the returned handle
    /// finishes once every step under way is settled.
    pub fn spawn(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        if self.db.backend() == Backend::Postgres {
            // A thread of its own, not the blocking pool: a runtime shut down
            // without `stop` (a test's) does not wait for it; it ends with the
            // sender.
            let (me, stop_listen) = (Arc::downgrade(self), stop.clone());
            let listener = std::thread::Builder::new()
                .name("sender-listen".into())
                .spawn(move || Sender::listen(&me, &stop_listen));
            if let Err(e) = listener {
                log::warn!("sender: cannot listen for other instances: {e}");
            }
            let (me, stop_notify) = (self.clone(), stop.clone());
            tokio::spawn(async move { me.notify_others(stop_notify).await });
        }
        let me = self.clone();
        vec![tokio::spawn(async move { me.dispatch(stop).await })]
    }

    /// Something is due now (a new message, a report): wake the dispatcher, and
    /// tell the other instances.
    pub fn nudge(&self) {
        self.wake.notify_one();
        self.publish.notify_one();
    }

    /// Most WeChat calls this instance keeps in flight.
    pub fn workers(&self) -> usize {
        self.config.workers.max(1)
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

    /// Leases as many due messages as there are free workers (once [`LEASE_BATCH`]
    /// are free, while that many are busy) and starts a step of each; waits for a
    /// nudge, a notification, a finished step (its user may have
    /// another message due) or the next message due.
    async fn dispatch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let workers = self.config.workers.max(1);
        let batch = LEASE_BATCH.min(workers);
        let mut steps = tokio::task::JoinSet::new();
        while !*stop.borrow() {
            while steps.try_join_next().is_some() {}
            let free = workers.saturating_sub(steps.len()).min(MAX_LEASE);
            let mut wait = IDLE_POLL;
            if free > 0 && (free >= batch || steps.len() < batch) {
                match self.lease(free).await {
                    Ok(leased) => {
                        let full = leased.len() == free;
                        for msg in leased {
                            let me = self.clone();
                            steps.spawn(async move {
                                let id = msg.id;
                                if let Err(e) = me.process(msg).await {
                                    log::warn!("sender: message {id}: {e}");
                                }
                            });
                        }
                        if full {
                            continue;
                        }
                        wait = self.idle_wait().await;
                    }
                    Err(e) => log::warn!("sender: {e}"),
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
                Some(_) = steps.join_next(), if !steps.is_empty() => {}
            }
        }
        while steps.join_next().await.is_some() {}
    }

    async fn lease(&self, limit: usize) -> DbResult<Vec<MessageRow>> {
        let owner = self.owner.clone();
        let lease = TimeDelta::from_std(self.config.lease).unwrap_or(TimeDelta::seconds(30));
        self.db
            .run(move |c| {
                let now = crate::time::now();
                store::lease_due(c, &owner, now, now + lease, limit)
            })
            .await
    }

    /// How long to sleep with nothing due: while other instances' notifications
    /// reach this one, until the next message is due (at most [`IDLE_LISTENING`]);
    /// otherwise [`IDLE_POLL`].
    async fn idle_wait(&self) -> Duration {
        if !self.listening.load(Ordering::Relaxed) {
            return IDLE_POLL;
        }
        let now = crate::time::now();
        match self.db.run(move |c| store::next_due(c, now)).await {
            Ok(Some(at)) => (at - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
                .clamp(Duration::from_millis(1), IDLE_LISTENING),
            Ok(None) => IDLE_LISTENING,
            Err(e) => {
                log::warn!("sender: {e}");
                IDLE_POLL
            }
        }
    }

    /// PostgreSQL: holds a connection that LISTENs for other instances' "due now"
    /// and wakes the dispatcher on each (diesel's `PgConnection` exposes no socket
    /// to wait on, so the connection is looked at every [`LISTEN_POLL`]: a
    /// non-blocking read). Runs on a thread of its own until `stop` or until the
    /// sender is gone.
    fn listen(me: &std::sync::Weak<Sender>, stop: &watch::Receiver<bool>) {
        let go_on = || !*stop.borrow() && stop.has_changed().is_ok();
        while go_on() {
            let Some(sender) = me.upgrade() else { return };
            let conn = sender.db.get();
            drop(sender);
            let mut conn = match conn {
                Ok(conn) => conn,
                Err(e) => {
                    log::warn!("sender: cannot listen for other instances: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            match store::listen_due(&mut conn) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    log::warn!("sender: cannot listen for other instances: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
            while go_on() {
                let Some(sender) = me.upgrade() else { return };
                if !sender.listening.swap(true, Ordering::Relaxed) {
                    // Whatever was notified before the LISTEN took effect.
                    sender.wake.notify_one();
                }
                match store::received_due(&mut conn) {
                    Ok(payloads) => {
                        if payloads.iter().any(|p| *p != sender.owner) {
                            sender.wake.notify_one();
                        }
                    }
                    Err(e) => {
                        log::warn!("sender: listening for other instances: {e}");
                        sender.listening.store(false, Ordering::Relaxed);
                        break;
                    }
                }
                drop(sender);
                std::thread::sleep(LISTEN_POLL);
            }
            if let Some(sender) = me.upgrade() {
                sender.listening.store(false, Ordering::Relaxed);
            }
            // The connection goes back to the pool: without the subscription.
            if let Err(e) = store::unlisten_due(&mut conn) {
                log::warn!("sender: {e}");
            }
        }
    }

    /// PostgreSQL: sends NOTIFY for the nudges of this instance, coalesced (at most
    /// one per [`NOTIFY_GAP`]), until `stop`.
    async fn notify_others(&self, mut stop: watch::Receiver<bool>) {
        while !*stop.borrow() {
            tokio::select! {
                _ = self.publish.notified() => {}
                _ = stop.changed() => continue,
            }
            let owner = self.owner.clone();
            if let Err(e) = self.db.run(move |c| store::notify_due(c, &owner)).await {
                log::warn!("sender: cannot notify other instances: {e}");
            }
            tokio::time::sleep(NOTIFY_GAP).await;
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
        let job = ClaimJob {
            msg: msg.clone(),
            owner,
        };
        let claimed = self.claims.submit(&self.db, job).await?;
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
        let alone = move |c: &mut DbConn| store::settle(c, &m, &owner, &s, crate::time::now());
        let applied = if store::settles_alone(msg, &settlement) {
            self.db.run(alone).await?
        } else {
            let job = SettleJob {
                msg: msg.clone(),
                owner: self.owner.clone(),
                settlement: settlement.clone(),
            };
            match self.settles.submit(&self.db, job).await {
                Ok(applied) => applied,
                Err(e) => {
                    // The group's transaction failed (or this settlement in it):
                    // once more in a transaction of its own. If the group did
                    // commit, the lease is gone and this finds it so.
                    log::warn!("message {}: settling in a group: {e}; alone", msg.id);
                    self.db.run(alone).await?
                }
            }
        };
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

type Reply<R> = oneshot::Sender<DbResult<R>>;
/// Writes a group in one transaction: the result of each job, in order.
type WriteGroup<J, R> = fn(&mut DbConn, &[J]) -> DbResult<Vec<DbResult<R>>>;

/// Group commit: jobs submitted while a group is being written wait for the next
/// group, which is written by one call of `write` (one transaction). The first job
/// to find no writer starts one; the writer stops when the queue is empty.
struct Group<J, R> {
    queue: Mutex<Queue<J, R>>,
    write: WriteGroup<J, R>,
}

struct Queue<J, R> {
    jobs: Vec<(J, Reply<R>)>,
    writing: bool,
}

impl<J: Send + 'static, R: Send + 'static> Group<J, R> {
    fn new(write: WriteGroup<J, R>) -> Self {
        Group {
            queue: Mutex::new(Queue {
                jobs: Vec::new(),
                writing: false,
            }),
            write,
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue<J, R>> {
        // A queue of jobs stays consistent whatever panicked while holding it.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job` and waits for the transaction that writes it.
    async fn submit(self: &Arc<Self>, db: &Db, job: J) -> DbResult<R> {
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut q = self.queue();
            q.jobs.push((job, reply));
            !std::mem::replace(&mut q.writing, true)
        };
        if lead {
            let (me, db) = (self.clone(), db.clone());
            tokio::spawn(async move { me.write_all(db).await });
        }
        answer.await.unwrap_or_else(|_| {
            Err(DbError::Unavailable(
                "the group's transaction did not run".into(),
            ))
        })
    }

    async fn write_all(self: Arc<Self>, db: Db) {
        loop {
            let group: Vec<(J, Reply<R>)> = {
                let mut q = self.queue();
                if q.jobs.is_empty() {
                    q.writing = false;
                    return;
                }
                let n = q.jobs.len().min(MAX_GROUP);
                q.jobs.drain(..n).collect()
            };
            let write = self.write;
            // No connection: the replies are dropped, and every job hears so.
            let _ = db
                .run(move |c| {
                    let (jobs, replies): (Vec<J>, Vec<Reply<R>>) = group.into_iter().unzip();
                    match write(c, &jobs) {
                        Ok(results) => {
                            for (reply, result) in replies.into_iter().zip(results) {
                                let _ = reply.send(result);
                            }
                        }
                        Err(e) => {
                            let e = e.to_string();
                            for reply in replies {
                                let _ = reply.send(Err(DbError::Unavailable(e.clone())));
                            }
                        }
                    }
                    Ok(())
                })
                .await;
        }
    }
}
