//! JSON shapes of the WeChat endpoints this project uses: `token` and
//! `stable_token`, `jscode2session`, the template-message send and
//! `subscribeMessage.send` (see docs/API.md for how the service uses each).
//!
//! The client and the simulator speak them; the outbox builds the two message
//! bodies and keeps their `data` values ([`DataValue`]). Request fields the
//! simulator must be able to find missing are `#[serde(default)]` strings (empty
//! = missing), as WeChat answers a missing field with an errcode, not a parse error.
//! Types that carry a secret, a token or a session key have no `Debug`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The status part of every answer: absent or `0` means success.
/// Also the whole body of an error and of a template-send success.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiStatus {
    #[serde(default)]
    pub errcode: i64,
    #[serde(default)]
    pub errmsg: String,
}

/// Query of `GET /cgi-bin/token`.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct TokenQuery {
    #[serde(default)]
    pub grant_type: String,
    #[serde(default)]
    pub appid: String,
    #[serde(default)]
    pub secret: String,
}

/// Body of `POST /cgi-bin/stable_token`.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct StableTokenRequest {
    #[serde(default)]
    pub grant_type: String,
    #[serde(default)]
    pub appid: String,
    #[serde(default)]
    pub secret: String,
    #[serde(default)]
    pub force_refresh: bool,
}

/// Success of both token endpoints.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub expires_in: i64,
}

/// Query of `GET /sns/jscode2session`.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Code2SessionQuery {
    #[serde(default)]
    pub appid: String,
    #[serde(default)]
    pub secret: String,
    #[serde(default)]
    pub js_code: String,
    #[serde(default)]
    pub grant_type: String,
}

/// Success of `GET /sns/jscode2session`.
#[derive(Clone, Serialize, Deserialize)]
pub struct Code2SessionResponse {
    pub openid: String,
    pub session_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unionid: Option<String>,
}

/// One entry of a message's `data`: `{"value": "...", "color": "#173177"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataValue {
    #[serde(default)]
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
}

/// Body of `POST /cgi-bin/message/wxopen/template/send`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMessage {
    #[serde(default)]
    pub touser: String,
    #[serde(default)]
    pub template_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    /// A form_id or a prepay_id.
    #[serde(default)]
    pub form_id: String,
    #[serde(default)]
    pub data: BTreeMap<String, DataValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emphasis_keyword: Option<String>,
}

/// Body of `POST /cgi-bin/message/subscribe/send`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeMessage {
    #[serde(default)]
    pub touser: String,
    #[serde(default)]
    pub template_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    #[serde(default)]
    pub data: BTreeMap<String, DataValue>,
    /// `developer`, `trial` or `formal` (WeChat's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miniprogram_state: Option<String>,
    /// `zh_CN` (WeChat's default), `en_US`, `zh_HK` or `zh_TW`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
}

/// Success of `POST /cgi-bin/message/subscribe/send`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeSendResponse {
    #[serde(default)]
    pub errcode: i64,
    #[serde(default)]
    pub errmsg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msgid: Option<i64>,
}
