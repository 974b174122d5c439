//! What the simulator saw: the oracle of the tests.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::wechat::wire::DataValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Template,
    Subscribe,
}

/// A message WeChat accepted (and would have shown the user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// 1, 2, … in acceptance order.
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub appid: String,
    pub touser: String,
    pub template_id: String,
    pub kind: MessageKind,
    /// The form_id / prepay_id spent; `None` for a subscribe message.
    pub credential: Option<String>,
    pub page: Option<String>,
    pub data: BTreeMap<String, DataValue>,
    /// A subscribe send's `miniprogram_state` and `lang`, as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miniprogram_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    /// The msgid answered to a subscribe send.
    pub msgid: Option<i64>,
    /// The answer was broken on purpose (`drop_after_read`): the sender cannot know.
    pub response_dropped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenApi {
    Classic,
    Stable,
}

/// One call of a token endpoint, whatever its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFetch {
    pub at: DateTime<Utc>,
    pub appid: String,
    pub api: TokenApi,
    pub force_refresh: bool,
    /// As in [`Stats`]: `ok`, an errcode, `injected_busy`, …
    pub outcome: String,
}

/// Calls per endpoint (`token`, `stable_token`, `jscode2session`, `template_send`,
/// `subscribe_send`) per outcome: `ok`, the errcode answered (`"41029"`),
/// `injected_busy`, `injected_http_500`, or `dropped:<outcome>` when the answer
/// was broken after processing. The counts of one endpoint add up to its calls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub calls: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Stats {
    /// Calls of `api` that ended in `outcome` (0 if none).
    pub fn count(&self, api: &str, outcome: &str) -> u64 {
        self.calls
            .get(api)
            .and_then(|m| m.get(outcome))
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn add(&mut self, api: &str, outcome: &str) {
        *self
            .calls
            .entry(api.to_owned())
            .or_default()
            .entry(outcome.to_owned())
            .or_default() += 1;
    }
}
