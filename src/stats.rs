//! An app's totals: live credentials and the last 24 h of messages (the admin
//! overview and `formid-ledger stats`).

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::db::{DbConn, DbResult};
use crate::{ledger, outbox};

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AppStats {
    #[serde(flatten)]
    pub credentials: ledger::Stats,
    #[serde(flatten)]
    pub messages: outbox::MessageStats,
}

pub fn app_stats(conn: &mut DbConn, app_id: &str, now: DateTime<Utc>) -> DbResult<AppStats> {
    Ok(AppStats {
        credentials: ledger::stats(conn, app_id, now)?,
        messages: outbox::stats(conn, app_id, now)?,
    })
}
