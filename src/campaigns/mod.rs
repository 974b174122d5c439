//! Campaigns: "notify these users". A campaign is stored at once (its audience as
//! one value); a runner on exactly one instance ([`runner`]) then makes every
//! recipient an ordinary message in batches, releases them to the sender at the
//! campaign's pace, and ends it when every recipient is final. Every ledger
//! guarantee holds because a recipient is just a message; what a campaign adds is
//! when its messages may go (send_at, rate, pause, cancel, WeChat's daily limit).

pub mod runner;
pub mod store;

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::db::{write_tx, DbConn, DbError, DbResult};
use crate::ledger;
use crate::outbox::recipients::{self, Blueprint};
use crate::outbox::{new_public_id, Channel, Content, IdempotencyKey, Status};
use crate::time::to_db;
use store::{CampaignRow, NewCampaignRow};

/// Most openids an explicit audience may name.
pub const MAX_AUDIENCE: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    /// Waiting for `send_at`.
    Scheduled,
    Running,
    /// Paused by a caller: nothing new is sent until resumed.
    Paused,
    /// Every recipient reached a final status.
    Done,
    Cancelled,
}

impl CampaignStatus {
    pub const ALL: [CampaignStatus; 5] = [
        CampaignStatus::Scheduled,
        CampaignStatus::Running,
        CampaignStatus::Paused,
        CampaignStatus::Done,
        CampaignStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Scheduled => "scheduled",
            CampaignStatus::Running => "running",
            CampaignStatus::Paused => "paused",
            CampaignStatus::Done => "done",
            CampaignStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<CampaignStatus> {
        CampaignStatus::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Who a campaign is for.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// These users (distinct, in the caller's order).
    Openids(Vec<String>),
    /// Every user of the app holding a credential usable for the template when
    /// the campaign starts.
    Holding,
}

/// A validated "notify these users" request.
#[derive(Debug, Clone, Serialize)]
pub struct NewCampaign {
    pub app_id: String,
    pub template_id: String,
    pub channel: Channel,
    pub page: Option<String>,
    pub content: Content,
    pub audience: Audience,
    /// Recipients released per second; None: as fast as the sender goes.
    pub rate_per_s: Option<u32>,
    pub send_at: Option<DateTime<Utc>>,
}

#[derive(Debug)]
pub enum Created {
    /// The campaign (new, or the one an earlier request with the same key made).
    Campaign(i64),
    /// The idempotency key was used with a different request.
    Mismatch,
}

/// Stores a new campaign (`scheduled`; its runner starts it at `send_at`).
pub fn create(
    conn: &mut DbConn,
    new: &NewCampaign,
    idempotency: Option<&IdempotencyKey>,
    now: DateTime<Utc>,
) -> DbResult<Created> {
    // Serialising plain strings and maps cannot fail.
    let request = serde_json::to_vec(new).unwrap_or_default();
    let (holding, audience, targeted) = match &new.audience {
        Audience::Openids(openids) => (false, Some(openids.join("\n")), openids.len() as i64),
        Audience::Holding => (true, None, 0),
    };
    let row = NewCampaignRow {
        public_id: new_public_id("cmp"),
        app_id: new.app_id.clone(),
        template_id: new.template_id.clone(),
        channel: new.channel.as_str(),
        page: new.page.clone(),
        body: serde_json::to_string(&new.content)
            .map_err(|e| DbError::Corrupt(format!("campaign body does not serialise: {e}")))?,
        holding,
        audience,
        status: CampaignStatus::Scheduled.as_str(),
        rate_per_s: new.rate_per_s.map(|r| i32::try_from(r).unwrap_or(i32::MAX)),
        send_at: new.send_at.map(to_db),
        targeted,
        idem_scope: idempotency.map(|k| k.scope.clone()),
        idem_key: idempotency.map(|k| k.key.clone()),
        request_hash: idempotency.map(|_| format!("{:x}", Sha256::digest(&request))),
        created_at: to_db(now),
        updated_at: to_db(now),
    };
    Ok(match store::insert(conn, &row)? {
        store::Inserted::Campaign(id) => Created::Campaign(id),
        store::Inserted::Mismatch => Created::Mismatch,
    })
}

/// A campaign's recipients by outcome. `targeted` is always the sum of the others:
/// `queued` counts every recipient not final yet, made into a message or not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Counts {
    pub targeted: i64,
    pub queued: i64,
    pub sent: i64,
    pub no_quota: i64,
    pub failed: i64,
    pub skipped: i64,
    pub cancelled: i64,
}

impl Counts {
    fn new(targeted: i64, by_status: &[(String, i64)]) -> DbResult<Counts> {
        let mut counts = Counts {
            targeted,
            ..Counts::default()
        };
        for (status, n) in by_status {
            match Status::try_from(status.as_str())? {
                Status::Queued | Status::Sending => {}
                Status::Sent => counts.sent += n,
                Status::NoQuota => counts.no_quota += n,
                Status::Failed => counts.failed += n,
                Status::Skipped => counts.skipped += n,
                Status::Cancelled => counts.cancelled += n,
            }
        }
        let finished =
            counts.sent + counts.no_quota + counts.failed + counts.skipped + counts.cancelled;
        counts.queued = (targeted - finished).max(0);
        Ok(counts)
    }
}

/// The campaign resource of the contract.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CampaignView {
    pub id: String,
    pub app_id: String,
    pub status: CampaignStatus,
    pub template_id: String,
    pub channel: Channel,
    /// `openids` or `holding`.
    pub audience: String,
    #[serde(with = "crate::time::rfc3339::option")]
    pub send_at: Option<DateTime<Utc>>,
    pub rate_per_s: Option<u32>,
    pub counts: Counts,
    /// WeChat's daily limit (45009) holds the app's sending, so this campaign's,
    /// until then; it continues by itself afterwards.
    #[serde(
        with = "crate::time::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub paused_until: Option<DateTime<Utc>>,
    #[serde(with = "crate::time::rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339::option")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::time::rfc3339::option")]
    pub finished_at: Option<DateTime<Utc>>,
}

impl CampaignRow {
    pub fn status(&self) -> DbResult<CampaignStatus> {
        CampaignStatus::parse(&self.status).ok_or_else(|| {
            DbError::Corrupt(format!("campaign {}: status {:?}", self.id, self.status))
        })
    }

    pub fn channel(&self) -> DbResult<Channel> {
        Channel::try_from(self.channel.as_str())
    }

    fn blueprint(&self) -> DbResult<Blueprint<'_>> {
        Ok(Blueprint {
            campaign_id: self.id,
            app_id: &self.app_id,
            template_id: &self.template_id,
            channel: self.channel()?,
            page: self.page.as_deref(),
            body: &self.body,
        })
    }

    /// The credentials a recipient may spend, as its messages will (for "holding").
    fn pick(&self) -> DbResult<ledger::Pick<'_>> {
        Ok(self.channel()?.pick(&self.template_id))
    }
}

fn view_of(conn: &mut DbConn, row: CampaignRow, now: DateTime<Utc>) -> DbResult<CampaignView> {
    let status = row.status()?;
    let counts = match &row.final_counts {
        // Finished: its recipients may have been purged since.
        Some(stored) => serde_json::from_str(stored)
            .map_err(|e| DbError::Corrupt(format!("campaign {}: final counts: {e}", row.id)))?,
        None => counts_now(conn, &row)?,
    };
    let paused_until = match status {
        CampaignStatus::Running | CampaignStatus::Scheduled => {
            store::app_paused_until(conn, &row.app_id, now)?
        }
        _ => None,
    };
    Ok(CampaignView {
        id: row.public_id.clone(),
        channel: row.channel()?,
        audience: if row.holding { "holding" } else { "openids" }.into(),
        status,
        counts,
        paused_until,
        send_at: row.send_at.map(|t| t.and_utc()),
        rate_per_s: row.rate_per_s.and_then(|r| u32::try_from(r).ok()),
        created_at: row.created_at.and_utc(),
        started_at: row.started_at.map(|t| t.and_utc()),
        finished_at: row.finished_at.map(|t| t.and_utc()),
        app_id: row.app_id,
        template_id: row.template_id,
    })
}

fn counts_now(conn: &mut DbConn, row: &CampaignRow) -> DbResult<Counts> {
    Counts::new(row.targeted, &recipients::counts(conn, row.id)?)
}

/// The campaign resource by internal id.
pub fn view(conn: &mut DbConn, id: i64, now: DateTime<Utc>) -> DbResult<Option<CampaignView>> {
    store::load(conn, id)?
        .map(|row| view_of(conn, row, now))
        .transpose()
}

/// The internal id of campaign `public_id` if it exists and `visible` admits its app
/// (an invisible one is reported as absent).
pub fn find(
    conn: &mut DbConn,
    public_id: &str,
    visible: impl Fn(&str) -> bool,
) -> DbResult<Option<i64>> {
    Ok(store::find_public(conn, public_id)?
        .filter(|row| visible(&row.app_id))
        .map(|row| row.id))
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CampaignPage {
    pub campaigns: Vec<CampaignView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Campaigns of `apps` (None: all), newest first, a page after `cursor` (the last
/// campaign id of the previous page).
pub fn list(
    conn: &mut DbConn,
    apps: Option<&[String]>,
    status: Option<CampaignStatus>,
    cursor: Option<&str>,
    limit: u32,
    now: DateTime<Utc>,
) -> DbResult<CampaignPage> {
    let before = match cursor {
        Some(c) => match store::find_public(conn, c)? {
            Some(row) => Some(row.id),
            None => {
                return Ok(CampaignPage {
                    campaigns: vec![],
                    next_cursor: None,
                })
            }
        },
        None => None,
    };
    let mut rows = store::list(
        conn,
        apps,
        status.map(CampaignStatus::as_str),
        before,
        i64::from(limit) + 1,
    )?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let campaigns = rows
        .into_iter()
        .map(|row| view_of(conn, row, now))
        .collect::<DbResult<Vec<_>>>()?;
    let next_cursor = more
        .then(|| campaigns.last().map(|c| c.id.clone()))
        .flatten();
    Ok(CampaignPage {
        campaigns,
        next_cursor,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Cancel,
}

#[derive(Debug)]
pub enum Acted {
    /// The campaign as it now stands (also when it already was so).
    Now(Box<CampaignView>),
    /// A finished campaign cannot be paused, resumed or cancelled.
    Finished(CampaignStatus),
}

/// Pauses, resumes or cancels campaign `id`. Each takes the campaign row first, in
/// one transaction with its recipients, so the runner (which takes the row too
/// before it makes or releases recipients) never slips a recipient past it:
/// - pause: recipients released but not taken by a sender are held again;
/// - resume: the pace starts anew from now;
/// - cancel: every recipient not yet being sent ends `cancelled`, now and as the
///   runner makes the rest; a send in flight finishes.
pub fn act(conn: &mut DbConn, id: i64, action: Action, now: DateTime<Utc>) -> DbResult<Acted> {
    use CampaignStatus::{Cancelled, Done, Paused, Running, Scheduled};
    let live = [Scheduled.as_str(), Running.as_str(), Paused.as_str()];
    write_tx(conn, |conn| -> DbResult<()> {
        match action {
            Action::Pause => {
                let from = [Scheduled.as_str(), Running.as_str()];
                if store::change_status(conn, id, &from, Paused.as_str(), now)?.is_some() {
                    let held = recipients::hold(conn, id, now)?;
                    store::add_released(conn, id, -(held as i64))?;
                }
                Ok(())
            }
            Action::Resume => {
                let Some(row) = store::load(conn, id)? else {
                    return Ok(());
                };
                let to = if row.started_at.is_some() {
                    Running
                } else {
                    Scheduled
                };
                if store::change_status(conn, id, &[Paused.as_str()], to.as_str(), now)?.is_some() {
                    store::repace(conn, id, now)?;
                }
                Ok(())
            }
            Action::Cancel => {
                let Some(row) = store::change_status(conn, id, &live, Cancelled.as_str(), now)?
                else {
                    return Ok(());
                };
                recipients::cancel(conn, id, now)?;
                if row.started_at.is_none() && row.holding {
                    // Never started: a "holding" audience was never drawn.
                    store::audience_complete(conn, id)?;
                }
                Ok(())
            }
        }
    })?;
    let Some(view) = view(conn, id, now)? else {
        return Err(DbError::Query(diesel::result::Error::NotFound));
    };
    Ok(match view.status {
        Done => Acted::Finished(Done),
        Cancelled if action != Action::Cancel => Acted::Finished(Cancelled),
        _ => Acted::Now(Box::new(view)),
    })
}

/// Makes the next batch of recipients (up to `batch`) into messages. `audience` is
/// the explicit audience (None: "holding"). Returns false when there was nothing
/// (more) to make. A batch and the campaign's progress commit together, guarded by
/// the progress read before: after a runner change, no batch is made twice.
fn materialise(
    conn: &mut DbConn,
    row: &CampaignRow,
    audience: Option<&[String]>,
    batch: usize,
    now: DateTime<Utc>,
) -> DbResult<bool> {
    let openids: Vec<String> = match audience {
        Some(all) => {
            let from = usize::try_from(row.materialised)
                .unwrap_or(usize::MAX)
                .min(all.len());
            all[from..(from + batch).min(all.len())].to_vec()
        }
        None => ledger::holders(
            conn,
            &row.app_id,
            row.pick()?,
            row.holders_after.as_deref().unwrap_or(""),
            batch as i64,
            now,
        )?,
    };
    let n = openids.len() as i64;
    let complete = match audience {
        Some(all) => row.materialised + n >= all.len() as i64,
        None => openids.len() < batch,
    };
    write_tx(conn, |conn| {
        let progress = store::Progress {
            made: n,
            holders_after: if audience.is_none() {
                openids.last().cloned().or(row.holders_after.clone())
            } else {
                None
            },
            found: if audience.is_none() { n } else { 0 },
            complete,
        };
        let Some(status) = store::advance(conn, row.id, row.materialised, &progress)? else {
            // Another runner made this batch meanwhile.
            return Ok(false);
        };
        let cancelled = status == CampaignStatus::Cancelled.as_str();
        recipients::insert(conn, &row.blueprint()?, &openids, cancelled, now)?;
        Ok(!complete)
    })
}

/// Releases the recipients the campaign's pace allows by now (all made, without a
/// rate), keeping at most `window` of them released and not yet final, so the
/// campaign never stands in front of other messages with more than that. Nothing
/// while the app is paused by WeChat's daily limit; the pace starts anew after a
/// gap in the runner's ticks (a runner change, the daily limit), so a backlog of
/// allowance never goes out as a burst. Returns how many it released.
fn release(conn: &mut DbConn, id: i64, window: i64, now: DateTime<Utc>) -> DbResult<usize> {
    write_tx(conn, |conn| {
        let Some(row) = store::tick(conn, id, now)? else {
            return Ok(0);
        };
        let stale = row
            .paced_at
            .is_none_or(|t| now - t.and_utc() > TimeDelta::seconds(2))
            || row.pace_from.is_none();
        let paused = store::app_paused_until(conn, &row.app_id, now)?.is_some();
        if stale || paused {
            store::repace(conn, id, now)?;
        }
        if paused {
            return Ok(0);
        }
        let allowance = match (row.rate_per_s, stale) {
            (None, _) => i64::MAX,
            (Some(_), true) => row.released,
            (Some(rate), false) => {
                let from = row.pace_from.map_or(now, |t| t.and_utc());
                let elapsed = (now - from).num_milliseconds().max(0) as f64 / 1000.0;
                row.pace_base + (elapsed * f64::from(rate)).floor() as i64
            }
        };
        let due = (allowance - row.released).min(10_000);
        if due <= 0 {
            return Ok(0);
        }
        let due = due.min(window - recipients::queued(conn, id)?);
        if due <= 0 {
            return Ok(0);
        }
        let released = recipients::release(conn, id, due, now)?;
        store::add_released(conn, id, released as i64)?;
        Ok(released)
    })
}

/// Ends the campaign (`done`, or the `cancelled` one's `finished_at`) once every
/// recipient is made and final. Returns whether it ended.
fn finish_if_complete(conn: &mut DbConn, row: &CampaignRow, now: DateTime<Utc>) -> DbResult<bool> {
    if !row.audience_done || recipients::any_pending(conn, row.id)? {
        return Ok(false);
    }
    // Every recipient is final: the counts cannot move any more.
    let counts = serde_json::to_string(&counts_now(conn, row)?)
        .map_err(|e| DbError::Corrupt(format!("campaign {}: counts: {e}", row.id)))?;
    store::finish(conn, row.id, &counts, now)
}

/// Openids of an explicit audience as stored.
fn split_audience(stored: &str) -> Vec<String> {
    stored
        .split('\n')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Distinct openids in first-seen order.
pub fn distinct(openids: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::with_capacity(openids.len());
    openids
        .into_iter()
        .filter(|o| seen.insert(o.clone()))
        .collect()
}
