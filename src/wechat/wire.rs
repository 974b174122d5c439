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

/// Success of `GET /wxaapi/newtmpl/gettemplate` (getPrivateTemplateList): the
/// app's subscription templates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateTemplateList {
    #[serde(default)]
    pub errcode: i64,
    #[serde(default)]
    pub errmsg: String,
    #[serde(default)]
    pub data: Vec<PrivateTemplate>,
}

/// One template of the app, as WeChat lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateTemplate {
    #[serde(rename = "priTmplId")]
    pub pri_tmpl_id: String,
    #[serde(default)]
    pub title: String,
    /// One line per key: `物品名称:{{thing1.DATA}}`.
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub example: String,
    /// 2: one-time, 3: long-term.
    #[serde(default, rename = "type")]
    pub kind: i64,
}

impl PrivateTemplate {
    /// The `data` keys a send of this template uses, in the template's order: each
    /// `{{KEY.DATA}}` of `content`.
    pub fn keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut rest = self.content.as_str();
        while let Some(start) = rest.find("{{") {
            rest = &rest[start + 2..];
            let Some(end) = rest.find("}}") else { break };
            if let Some(key) = rest[..end].strip_suffix(".DATA") {
                if !key.is_empty() && !keys.iter().any(|k| k == key) {
                    keys.push(key.to_string());
                }
            }
            rest = &rest[end + 2..];
        }
        keys
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// WeChat's own example answer of getPrivateTemplateList (WECHAT.md §7).
    #[test]
    fn template_keys_come_from_its_content() {
        let list: PrivateTemplateList = serde_json::from_str(
            r#"{"errcode": 0, "errmsg": "ok", "data": [{"priTmplId": "9Aw5ZV1j9xdWTFEkqCpZ7mIBbSC34khK55OtzUPl0rU",
                "title": "报名结果通知", "content": "物品名称:{{thing1.DATA}}\n发货时间:{{time2.DATA}}\n",
                "example": "物品名称:咖啡\n发货时间:2019年10月1日 15:01\n", "type": 2}]}"#,
        )
        .unwrap();
        let t = &list.data[0];
        assert_eq!(t.pri_tmpl_id, "9Aw5ZV1j9xdWTFEkqCpZ7mIBbSC34khK55OtzUPl0rU");
        assert_eq!(t.kind, 2);
        assert_eq!(t.keys(), ["thing1", "time2"]);
        let odd = PrivateTemplate {
            content: "a:{{thing1.DATA}} {{thing1.DATA}} {{broken} {{x}} {{.DATA}} {{date3.DATA"
                .into(),
            ..PrivateTemplate::default()
        };
        assert_eq!(odd.keys(), ["thing1"]);
    }
}
