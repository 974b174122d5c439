//! Reporting: credentials in. Every report, a mini-program's (`POST
//! /v1/client/credentials`) or a backend's (`POST /v1/credentials`), goes through
//! [`Reporting::record`]:
//!
//! 1. group commit: concurrent requests' reports are recorded together in one
//!    transaction (a commit per group, not per request), and each request is
//!    answered only after that commit, so an acknowledged report is durable;
//! 2. the ledger's rules for taking credentials in ([`ledger::record_group`]:
//!    validation, duplicates, the per-user cap);
//! 3. messages waiting for these users are made due ([`wake_waiting_many`], one
//!    statement per app: on PostgreSQL right after that commit, on SQLite inside
//!    the same transaction) and this instance's sender is nudged;
//! 4. the metrics of what was accepted, duplicate or rejected.
//!
//! Writers take whatever has queued while the previous group committed (at most
//! [`MAX_REPORTS`] items), so under load groups grow and under light load a report
//! goes alone with no added wait.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::db::{write_tx, Backend, Db, DbConn, DbError, DbResult, RECHECK_AFTER};
use crate::ledger::{self, RecordOutcome, Report, Rules};
use crate::metrics::Metrics;
use crate::outbox::store::wake_waiting_many;
use crate::outbox::Sender;

/// Items one group carries at most.
const MAX_REPORTS: usize = 1000;
/// Requests waiting for a writer before new ones wait for room.
const QUEUE: usize = 4096;

struct Job {
    reports: Vec<Report>,
    reply: oneshot::Sender<DbResult<(RecordOutcome, usize)>>,
}

/// The reporting service of one instance.
pub struct Reporting {
    queue: mpsc::Sender<Job>,
    sender: Arc<Sender>,
    metrics: Arc<Metrics>,
}

impl Reporting {
    /// Starts the writers: one on SQLite (it has one writer anyway), two on
    /// PostgreSQL: one group commits while the next one forms, and users are locked
    /// in one order. More writers make smaller groups, which cost PostgreSQL more
    /// per report than they gain in parallelism on a small machine (BENCHMARKS.md:
    /// 1, 2, 3 and 4 writers measured). Each writer is a thread of its own with a
    /// connection of its own, beside the pool ([`Db::dedicated`]): a group costs
    /// neither a wait for [`Db::run`]'s threads nor a checkout (with its ping), and
    /// the writers take none of the pool's connections from the sender and the reads.
    pub fn start(db: Db, rules: Rules, sender: Arc<Sender>, metrics: Arc<Metrics>) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let writers = match db.backend() {
            Backend::Sqlite => 1,
            Backend::Postgres => 2,
        };
        for n in 0..writers {
            let (db, rules, rx) = (db.clone(), rules.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("report-writer-{n}"))
                .spawn(move || write_groups(&db, &rules, &rx))
                .expect("the OS starts a thread");
        }
        Reporting {
            queue,
            sender,
            metrics,
        }
    }

    /// Records the reports (with those of concurrent callers), wakes the messages
    /// waiting for these users, and counts the outcome.
    pub async fn record(&self, reports: Vec<Report>) -> DbResult<RecordOutcome> {
        let (reply, answer) = oneshot::channel();
        let gone = || DbError::Unavailable("the reporting writer stopped".into());
        self.queue
            .send(Job { reports, reply })
            .await
            .map_err(|_| gone())?;
        let (outcome, woken) = answer.await.map_err(|_| gone())??;
        for _ in 0..woken {
            self.sender.nudge();
        }
        self.count(&outcome);
        Ok(outcome)
    }

    fn count(&self, outcome: &RecordOutcome) {
        let recorded = &self.metrics.credentials_recorded;
        recorded
            .with_label_values(&["accepted"])
            .inc_by(outcome.accepted.into());
        recorded
            .with_label_values(&["duplicate"])
            .inc_by(outcome.duplicates.into());
        for r in &outcome.rejected {
            self.metrics
                .credentials_rejected
                .with_label_values(&[r.reason.as_str()])
                .inc();
        }
    }
}

/// A writer: takes what has queued, records it as one group, answers each request.
/// Returns when the service is gone (every sender of the queue dropped).
fn write_groups(db: &Db, rules: &Rules, rx: &Mutex<mpsc::Receiver<Job>>) {
    // The writer's connection and when it was last used.
    let mut own: Option<(DbConn, Instant)> = None;
    loop {
        let jobs = {
            let mut rx = rx.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let Some(first) = rx.blocking_recv() else {
                return;
            };
            let mut items: usize = first.reports.iter().map(|r| r.items.len()).sum();
            let mut jobs = vec![first];
            while items < MAX_REPORTS {
                let Ok(next) = rx.try_recv() else { break };
                items += next.reports.iter().map(|r| r.items.len()).sum::<usize>();
                jobs.push(next);
            }
            jobs
        };
        let (replies, groups): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.reply, j.reports)).unzip();
        let stale = own
            .as_mut()
            .is_some_and(|(conn, used)| used.elapsed() >= RECHECK_AFTER && !db.answers(conn));
        if stale {
            own = None;
        }
        let result = match own.take() {
            Some((conn, _)) => Ok(conn),
            None => db.dedicated(),
        }
        .and_then(|mut conn| {
            let recorded = record(&mut conn, rules, &groups);
            // After an error the connection may be broken: the next group opens another.
            if recorded.is_ok() {
                own = Some((conn, Instant::now()));
            }
            recorded
        });
        match result {
            Ok((outcomes, woken)) => {
                // The wake-up count goes to the first request (it only nudges workers).
                let mut woken = Some(woken);
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok((outcome, woken.take().unwrap_or(0))));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for reply in replies {
                    let again = match &e {
                        DbError::Unavailable(_) => DbError::Unavailable(message.clone()),
                        DbError::Query(_) | DbError::Corrupt(_) => {
                            DbError::Unavailable(format!("recording failed: {message}"))
                        }
                    };
                    let _ = reply.send(Err(again));
                }
            }
        }
    }
}

/// One group: the ledger's rules, then the messages waiting for its users made due.
/// On SQLite both in one write transaction: an autocommit wake-up after the commit
/// would need the write lock again, and while a sender's transaction holds it that
/// statement waits in SQLite's busy handler (sleeps of 1 ms and up), holding up the
/// next group; write turns ([`write_tx`]) order transactions, not lone statements.
/// On PostgreSQL after the commit, so the group's transaction locks no messages.
fn record(
    conn: &mut DbConn,
    rules: &Rules,
    groups: &[Vec<Report>],
) -> DbResult<(Vec<RecordOutcome>, usize)> {
    match conn {
        DbConn::Sqlite(_) => write_tx(conn, |conn| record_and_wake(conn, rules, groups)),
        DbConn::Pg(_) => record_and_wake(conn, rules, groups),
    }
}

fn record_and_wake(
    conn: &mut DbConn,
    rules: &Rules,
    groups: &[Vec<Report>],
) -> DbResult<(Vec<RecordOutcome>, usize)> {
    let now = crate::time::now();
    let slices: Vec<&[Report]> = groups.iter().map(Vec::as_slice).collect();
    let outcomes = ledger::record_group(conn, rules, now, &slices)?;
    // Messages waiting for these users go now: one statement per app.
    let mut waiting: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (reports, outcome) in groups.iter().zip(&outcomes) {
        if outcome.accepted > 0 {
            for r in reports {
                waiting
                    .entry(r.app_id.as_str())
                    .or_default()
                    .push(r.openid.as_str());
            }
        }
    }
    let mut woken = 0;
    for (app_id, openids) in waiting {
        woken += wake_waiting_many(conn, app_id, &openids, now)?;
    }
    Ok((outcomes, woken))
}
