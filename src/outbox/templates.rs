//! Which templates are subscription templates (sent with subscribe-send), and which
//! `data` keys a message of one may use. Three sources, in this order:
//! - WeChat's own list of the app's templates (getPrivateTemplateList), fetched at
//!   start and every `LEDGER_TEMPLATE_REFRESH_S` by [`spawn_refresher`]: the keys
//!   of each template come with it;
//! - templates named in configuration (`LEDGER_SUBSCRIPTION_TEMPLATES`), every app;
//! - templates an admin registered for an app (overrides, e.g. before WeChat lists
//!   a new template).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;

use super::Channel;
use crate::db::schema::subscription_templates::dsl as t;
use crate::db::schema::wechat_templates::dsl as w;
use crate::db::{write_tx, Db, DbConn, DbResult};
use crate::dispatch;
use crate::time::to_db;
use crate::tokens::TokenManager;
use crate::wechat::wire::PrivateTemplate;
use crate::wechat::WechatClient;

/// How a message of a template is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub channel: Channel,
    /// The `data` keys the template has, when WeChat listed it (None: not known,
    /// any key is passed on and WeChat judges).
    pub keys: Option<Vec<String>>,
}

/// How a message of `template_id` to a user of `app_id` is sent.
pub fn lookup(
    conn: &mut DbConn,
    configured: &[String],
    app_id: &str,
    template_id: &str,
) -> DbResult<Lookup> {
    let listed: Option<String> = dispatch!(conn, |c| w::wechat_templates
        .filter(w::app_id.eq(app_id))
        .filter(w::template_id.eq(template_id))
        .select(w::keys)
        .first(c)
        .optional())?;
    if let Some(keys) = listed {
        return Ok(Lookup {
            channel: Channel::Subscription,
            keys: Some(keys.split_whitespace().map(str::to_string).collect()),
        });
    }
    let subscription = configured.iter().any(|c| c == template_id) || {
        let registered: i64 = dispatch!(conn, |c| t::subscription_templates
            .filter(t::app_id.eq(app_id))
            .filter(t::template_id.eq(template_id))
            .count()
            .get_result(c))?;
        registered > 0
    };
    Ok(Lookup {
        channel: if subscription {
            Channel::Subscription
        } else {
            Channel::Template
        },
        keys: None,
    })
}

/// The channel of a message of `template_id` to a user of `app_id`.
pub fn channel_of(
    conn: &mut DbConn,
    configured: &[String],
    app_id: &str,
    template_id: &str,
) -> DbResult<Channel> {
    Ok(lookup(conn, configured, app_id, template_id)?.channel)
}

/// A template WeChat listed for the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ListedTemplate {
    pub template_id: String,
    pub title: String,
    pub keys: Vec<String>,
    /// 2: one-time, 3: long-term.
    pub kind: i32,
    #[serde(with = "crate::time::rfc3339")]
    pub fetched_at: DateTime<Utc>,
}

/// The app's templates as WeChat last listed them.
pub fn listed(conn: &mut DbConn, app_id: &str) -> DbResult<Vec<ListedTemplate>> {
    let rows: Vec<(String, String, String, i32, chrono::NaiveDateTime)> =
        dispatch!(conn, |c| w::wechat_templates
            .filter(w::app_id.eq(app_id))
            .order(w::template_id)
            .select((w::template_id, w::title, w::keys, w::kind, w::fetched_at))
            .load(c))?;
    Ok(rows
        .into_iter()
        .map(
            |(template_id, title, keys, kind, fetched_at)| ListedTemplate {
                template_id,
                title,
                keys: keys.split_whitespace().map(str::to_string).collect(),
                kind,
                fetched_at: fetched_at.and_utc(),
            },
        )
        .collect())
}

/// Replaces the app's listed templates with `list`, in one transaction (a template
/// WeChat no longer lists is no longer a subscription template by this source).
/// Entries whose id or keys the ledger could not store or send are skipped.
pub fn replace(
    conn: &mut DbConn,
    app_id: &str,
    list: &[PrivateTemplate],
    now: DateTime<Utc>,
) -> DbResult<usize> {
    let now = to_db(now);
    let rows: Vec<_> = list
        .iter()
        .filter(|p| crate::ledger::is_valid_value(&p.pri_tmpl_id))
        .map(|p| {
            (
                w::app_id.eq(app_id),
                w::template_id.eq(p.pri_tmpl_id.clone()),
                w::title.eq(p.title.chars().take(200).collect::<String>()),
                w::keys.eq(p.keys().join(" ")),
                w::kind.eq(i32::try_from(p.kind).unwrap_or(0)),
                w::fetched_at.eq(now),
            )
        })
        .collect();
    write_tx(conn, |conn| {
        dispatch!(conn, |c| diesel::delete(
            w::wechat_templates.filter(w::app_id.eq(app_id))
        )
        .execute(c))?;
        let mut stored = 0;
        // One row at a time: a list WeChat sends twice the same id is stored once.
        for row in &rows {
            stored += dispatch!(conn, |c| diesel::insert_into(w::wechat_templates)
                .values(row.clone())
                .on_conflict_do_nothing()
                .execute(c))?;
        }
        Ok(stored)
    })
}

/// Fetches each app's template list from WeChat and stores it: at once, then every
/// `every`; a failed fetch keeps the last list and is tried again after 1 s, then
/// 2 s, 4 s… up to a minute (the sandbox's WeChat starts with the server). Runs
/// until `stop` flips to true.
pub fn spawn_refresher(
    db: Db,
    wechat: WechatClient,
    tokens: Arc<TokenManager>,
    apps: Vec<String>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    const FIRST_RETRY: Duration = Duration::from_secs(1);
    tokio::spawn(async move {
        let mut retry = FIRST_RETRY;
        while !*stop.borrow() {
            let mut all_fetched = true;
            for app_id in &apps {
                match refresh(&db, &wechat, &tokens, app_id).await {
                    Ok(n) => log::debug!("app {app_id}: WeChat lists {n} subscription templates"),
                    Err(e) => {
                        all_fetched = false;
                        log::warn!("app {app_id}: could not read its subscription templates from WeChat: {e}");
                    }
                }
            }
            let wait = if all_fetched {
                retry = FIRST_RETRY;
                every
            } else {
                let wait = retry.min(every);
                retry = (retry * 2).min(Duration::from_secs(60));
                wait
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    });
}

async fn refresh(
    db: &Db,
    wechat: &WechatClient,
    tokens: &TokenManager,
    app_id: &str,
) -> Result<usize, String> {
    let token = tokens.current(app_id).await.map_err(|e| e.to_string())?;
    let list = wechat
        .private_templates(&token.token)
        .await
        .map_err(|e| e.message)?;
    let app_id = app_id.to_string();
    db.run(move |c| replace(c, &app_id, &list, crate::time::now()))
        .await
        .map_err(|e| e.to_string())
}

/// The app's registered subscription templates (configuration not included).
pub fn registered(conn: &mut DbConn, app_id: &str) -> DbResult<Vec<String>> {
    Ok(dispatch!(conn, |c| t::subscription_templates
        .filter(t::app_id.eq(app_id))
        .order(t::template_id)
        .select(t::template_id)
        .load(c))?)
}

/// Registers a subscription template; true if it was new.
pub fn register(conn: &mut DbConn, app_id: &str, template_id: &str) -> DbResult<bool> {
    let now = to_db(crate::time::now());
    let n = dispatch!(conn, |c| diesel::insert_into(t::subscription_templates)
        .values((
            t::app_id.eq(app_id),
            t::template_id.eq(template_id),
            t::created_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c))?;
    Ok(n == 1)
}

/// Unregisters a subscription template; true if it was registered.
pub fn unregister(conn: &mut DbConn, app_id: &str, template_id: &str) -> DbResult<bool> {
    let n = dispatch!(conn, |c| diesel::delete(
        t::subscription_templates
            .filter(t::app_id.eq(app_id))
            .filter(t::template_id.eq(template_id))
    )
    .execute(c))?;
    Ok(n == 1)
}
