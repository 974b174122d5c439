//! The campaign runner: on every instance a task looks for campaigns to run and
//! takes a lease on each (exactly one instance runs a campaign; one that died is
//! replaced when its lease runs out). A tick of a campaign starts it at `send_at`,
//! makes its next recipients, releases those its pace allows and ends it when every
//! recipient is final.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use tokio::sync::watch;

use super::store::{self, CampaignRow};
use crate::db::{Db, DbError, DbResult};
use crate::outbox::Sender;

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// How often the runner looks at its campaigns (also the pacer's step).
    pub tick: Duration,
    /// A runner's hold on a campaign; another instance takes over after it.
    pub lease: Duration,
    /// Recipients made per transaction.
    pub batch: usize,
    /// Most time a tick spends making recipients, so releases keep their pace.
    pub make_budget: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            tick: Duration::from_millis(100),
            lease: Duration::from_secs(10),
            batch: 1000,
            make_budget: Duration::from_millis(300),
        }
    }
}

pub struct Runner {
    db: Db,
    sender: Arc<Sender>,
    config: RunnerConfig,
    owner: String,
    /// Explicit audiences read once per campaign (they can be megabytes).
    audiences: Mutex<HashMap<i64, Arc<Vec<String>>>>,
}

impl Runner {
    pub fn new(db: Db, sender: Arc<Sender>, config: RunnerConfig) -> Self {
        Runner {
            db,
            sender,
            config,
            owner: format!("campaigns-{:016x}", rand::random::<u64>()),
            audiences: Mutex::new(HashMap::new()),
        }
    }

    /// Runs until `stop` flips to true, then hands its campaigns back.
    pub fn spawn(self: &Arc<Self>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            while !*stop.borrow() {
                if let Err(e) = me.tick().await {
                    log::warn!("campaigns: {e}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(me.config.tick) => {}
                    _ = stop.changed() => {}
                }
            }
            let owner = me.owner.clone();
            match me.db.run(move |c| store::release_leases(c, &owner)).await {
                Ok(n) if n > 0 => log::info!("campaigns: handed back {n} campaigns"),
                Ok(_) => {}
                Err(e) => log::warn!("campaigns: handing back: {e}"),
            }
        })
    }

    async fn tick(&self) -> DbResult<()> {
        let owner = self.owner.clone();
        let ids = self
            .db
            .run(move |c| store::runnable(c, &owner, crate::time::now()))
            .await?;
        for id in ids {
            if let Err(e) = self.run(id).await {
                log::warn!("campaign {id}: {e}");
            }
        }
        Ok(())
    }

    async fn run(&self, id: i64) -> DbResult<()> {
        let (owner, lease) = (self.owner.clone(), self.lease());
        let leased = self
            .db
            .run(move |c| {
                let now = crate::time::now();
                let Some(row) = store::lease(c, id, &owner, now, now + lease)? else {
                    return Ok(None);
                };
                if row.status == "scheduled" && row.send_at.is_none_or(|t| t.and_utc() <= now) {
                    if store::start(c, id, now)? {
                        log::info!("campaign {} started", row.public_id);
                    }
                    return store::load(c, id);
                }
                Ok(Some(row))
            })
            .await?;
        let Some(mut row) = leased else {
            return Ok(());
        };
        if !row.audience_done && (row.started_at.is_some() || row.status == "cancelled") {
            row = self.make(row).await?;
        }
        if row.status == "running" {
            let window = self.window();
            let released = self
                .db
                .run(move |c| super::release(c, id, window, crate::time::now()))
                .await?;
            if released > 0 {
                // One nudge wakes the dispatcher, which leases as many as it has room for.
                self.sender.nudge();
            }
        }
        let ended = self
            .db
            .run(move |c| super::finish_if_complete(c, &row, crate::time::now()))
            .await?;
        if ended {
            self.forget(id);
            log::info!("campaign {id} finished");
        }
        Ok(())
    }

    /// Makes recipients for up to the tick's budget; the campaign as it then stands.
    async fn make(&self, mut row: CampaignRow) -> DbResult<CampaignRow> {
        let audience = self.audience(&row).await?;
        let started = Instant::now();
        let batch = self.config.batch;
        loop {
            let (r, a) = (row.clone(), audience.clone());
            let more = self
                .db
                .run(move |c| {
                    super::materialise(
                        c,
                        &r,
                        a.as_deref().map(Vec::as_slice),
                        batch,
                        crate::time::now(),
                    )
                })
                .await?;
            let id = row.id;
            row = match self.db.run(move |c| store::load(c, id)).await? {
                Some(r) => r,
                None => return Ok(row),
            };
            if !more || started.elapsed() >= self.config.make_budget {
                if row.audience_done {
                    self.forget(id);
                }
                return Ok(row);
            }
        }
    }

    /// The campaign's explicit audience (None: "holding").
    async fn audience(&self, row: &CampaignRow) -> DbResult<Option<Arc<Vec<String>>>> {
        if row.holding {
            return Ok(None);
        }
        let id = row.id;
        if let Some(found) = self
            .audiences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Some(found.clone()));
        }
        let stored = self.db.run(move |c| store::audience(c, id)).await?;
        let text = stored.ok_or_else(|| {
            DbError::Corrupt(format!(
                "campaign {id}: recipients left to make, no audience"
            ))
        })?;
        let openids = Arc::new(super::split_audience(&text));
        self.audiences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, openids.clone());
        Ok(Some(openids))
    }

    fn forget(&self, id: i64) {
        self.audiences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Most recipients of one campaign released and not yet final at once: enough
    /// to keep every worker busy until the next tick, few enough that a message
    /// posted meanwhile (due after them) waits for this many at most, not for the
    /// whole campaign. Measured with the bench's campaign probes on 2 cores
    /// (sends/s; a single message's p50 while the campaign ran): four per worker
    /// SQLite 2,907, 628 ms, PostgreSQL 3,967, 370 ms; one per worker 3,103,
    /// 178 ms and 2,724, 66 ms; two per worker 3,484, 280 ms and 3,491, 148 ms.
    fn window(&self) -> i64 {
        (2 * self.sender.workers()).max(256) as i64
    }

    fn lease(&self) -> TimeDelta {
        TimeDelta::from_std(self.config.lease).unwrap_or(TimeDelta::seconds(10))
    }
}
