//! The ledger: credentials per (app, openid), the rules for taking them in, and the
//! one place a use is spent. Knows nothing of HTTP or WeChat.
//!
//! Every per-user query is keyed by (app_id, openid), so the table can be sharded by
//! user without rewriting a query.

mod claim;
mod grants;
mod query;
mod record;

pub use claim::{claim, claim_each, invalidate, release, release_id, Pick, Use, Want};
pub use grants::{lock_user, record_pushed, PushedResults, MERGE_WINDOW};
pub use query::{
    holders, live_grants, purge, purge_results, quota, stats, users, KindQuota, Quota, Stats,
    UserPage, UserSummary,
};
pub use record::{record, record_group, Item, RecordOutcome, RejectReason, Rejection, Report};

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::db::schema::credentials;
use crate::db::DbError;

/// WeChat's validity of a form_id / prepay_id.
pub const VALIDITY: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// The value WeChat's devtools hand out instead of a real form_id.
pub const MOCK_FORM_ID: &str = "the formId is a mock one";

/// The results `wx.requestSubscribeMessage` gives per template; only `accept`
/// grants a send.
pub const SUBSCRIPTION_RESULTS: [&str; 4] = ["accept", "reject", "ban", "filter"];

/// Largest `subscription_templates_per_user` the settings admit: with the four
/// results, it bounds a quota's `subscription_results` whatever the rows hold.
pub const MAX_TEMPLATES_PER_USER: u32 = 1000;

/// Longest credential value, template id or openid the ledger accepts.
pub const MAX_VALUE_LEN: usize = 128;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    FormId,
    PrepayId,
    Subscription,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::FormId => "form_id",
            Kind::PrepayId => "prepay_id",
            Kind::Subscription => "subscription",
        }
    }

    /// The kind a stored `kind` column names. The column's CHECK constraint admits
    /// nothing else, so anything else is a corrupt row, never a guess.
    pub fn from_db(s: &str) -> Result<Kind, DbError> {
        [Kind::FormId, Kind::PrepayId, Kind::Subscription]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| DbError::Corrupt(format!("unknown credential kind {s:?}")))
    }
}

/// The rules the ledger applies when it takes credentials in.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Uses of one prepay_id (WeChat's seed text says 1, its own page said 3).
    pub prepay_id_uses: u32,
    /// The ledger stops using a credential this long before WeChat's 7 days end.
    pub expiry_margin: chrono::TimeDelta,
    /// Live credentials one user may hold.
    pub user_cap: u32,
    /// Distinct templates one user may have subscription results for.
    pub subscription_templates_per_user: u32,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            prepay_id_uses: 1,
            expiry_margin: chrono::TimeDelta::minutes(10),
            user_cap: 200,
            subscription_templates_per_user: 100,
        }
    }
}

/// A value is 1..128 printable ASCII characters without white space.
pub fn is_valid_value(value: &str) -> bool {
    (1..=MAX_VALUE_LEN).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic())
}

/// One stored credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Credential {
    pub id: i64,
    pub app_id: String,
    pub openid: String,
    pub kind: Kind,
    /// None for subscriptions.
    pub value: Option<String>,
    pub template_id: Option<String>,
    pub uses_total: i32,
    pub uses_left: i32,
    #[serde(with = "crate::time::rfc3339")]
    pub issued_at: DateTime<Utc>,
    /// When the ledger stops using it; None: never (subscriptions).
    #[serde(with = "crate::time::rfc3339::option")]
    pub expires_at: Option<DateTime<Utc>>,
    pub invalid: bool,
    pub invalid_reason: Option<String>,
    #[serde(with = "crate::time::rfc3339")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, diesel::Queryable, diesel::QueryableByName, diesel::Selectable)]
#[diesel(table_name = credentials)]
pub(crate) struct CredentialRow {
    id: i64,
    app_id: String,
    openid: String,
    kind: String,
    value: Option<String>,
    template_id: Option<String>,
    uses_total: i32,
    uses_left: i32,
    issued_at: NaiveDateTime,
    expires_at: Option<NaiveDateTime>,
    invalid: bool,
    invalid_reason: Option<String>,
    created_at: NaiveDateTime,
    #[allow(dead_code)]
    updated_at: NaiveDateTime,
    #[allow(dead_code)]
    reported_at: Option<NaiveDateTime>,
    #[allow(dead_code)]
    pushed_at: Option<NaiveDateTime>,
}

impl TryFrom<CredentialRow> for Credential {
    type Error = DbError;

    fn try_from(r: CredentialRow) -> Result<Self, DbError> {
        Ok(Credential {
            id: r.id,
            kind: Kind::from_db(&r.kind)?,
            app_id: r.app_id,
            openid: r.openid,
            value: r.value,
            template_id: r.template_id,
            uses_total: r.uses_total,
            uses_left: r.uses_left,
            issued_at: r.issued_at.and_utc(),
            expires_at: r.expires_at.map(|t| t.and_utc()),
            invalid: r.invalid,
            invalid_reason: r.invalid_reason,
            created_at: r.created_at.and_utc(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_printable_ascii_without_white_space() {
        assert!(is_valid_value("wx2017033010242291fcfe0db70013231072"));
        assert!(is_valid_value(&"a".repeat(128)));
        assert!(!is_valid_value(""));
        assert!(!is_valid_value(&"a".repeat(129)));
        assert!(!is_valid_value("two words"));
        assert!(!is_valid_value("tab\there"));
        assert!(!is_valid_value("ünïcode"));
        assert!(!is_valid_value("nul\0"));
    }

    #[test]
    fn an_unknown_stored_kind_is_an_error_not_a_guess() {
        for kind in [Kind::FormId, Kind::PrepayId, Kind::Subscription] {
            assert_eq!(Kind::from_db(kind.as_str()).ok(), Some(kind));
        }
        assert!(matches!(
            Kind::from_db("subscriptoin"),
            Err(DbError::Corrupt(m)) if m.contains("subscriptoin")
        ));
    }
}
