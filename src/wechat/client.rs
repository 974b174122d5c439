//! [`WechatClient`]: one `reqwest::Client` for every app and endpoint.
//!
//! How a failure is classified ([`ErrorClass`]):
//! - `errcode` ≠ 0 → [`classify`] (the table in `errcode.rs`);
//! - HTTP 5xx → `Transient`; any other non-2xx status → `Caller` (a wrong base URL);
//! - connect error or connect timeout → `Transient` (surely not sent);
//! - any other failure (timeout waiting for the answer, connection closed, body
//!   unreadable or not the expected JSON) → `Ambiguous` for the two message sends,
//!   because WeChat may have delivered. For the token and login calls the same
//!   failures are `Transient`: repeating them is harmless for the ledger (a repeated
//!   token fetch only issues another token; a repeated login at worst answers 40029
//!   and the mini-program logs in again), and a caller of those only needs "retry".
//!
//! Error messages never hold a URL (it may carry `access_token`), a secret, a token
//! or a session key; nothing is logged above `debug`.

use std::error::Error as _;
use std::time::Duration;

use log::debug;
use serde::de::DeserializeOwned;

use super::errcode::{classify, ErrorClass};
use super::wire::{
    ApiStatus, Code2SessionQuery, Code2SessionResponse, PrivateTemplate, PrivateTemplateList,
    StableTokenRequest, SubscribeMessage, SubscribeSendResponse, TemplateMessage, TokenQuery,
    TokenResponse,
};
use crate::secret::Secret;

/// A failed WeChat call. `message` is safe to log and to show an admin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("WeChat {class:?} error{}: {message}", errcode.map(|c| format!(" {c}")).unwrap_or_default())]
pub struct WechatError {
    pub class: ErrorClass,
    /// WeChat's errcode when WeChat answered one.
    pub errcode: Option<i64>,
    pub message: String,
}

impl WechatError {
    fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        WechatError {
            class,
            errcode: None,
            message: message.into(),
        }
    }
}

/// An access token as WeChat issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub token: Secret,
    /// Seconds from issue; WeChat may change it, never assume 7200.
    pub expires_in: i64,
}

/// The result of a mini-program login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginSession {
    pub openid: String,
    pub unionid: Option<String>,
    pub session_key: Secret,
}

/// Whether WeChat acting twice on the request would matter (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Token and login calls: an in-doubt failure is `Transient`.
    Repeatable,
    /// Message sends: an in-doubt failure is `Ambiguous`.
    Delivers,
}

impl Effect {
    fn in_doubt(self) -> ErrorClass {
        match self {
            Effect::Repeatable => ErrorClass::Transient,
            Effect::Delivers => ErrorClass::Ambiguous,
        }
    }
}

/// The WeChat server API client. Cheap to clone (one shared connection pool).
#[derive(Debug, Clone)]
pub struct WechatClient {
    http: reqwest::Client,
    base: String,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl WechatClient {
    /// `base_url` is `https://api.weixin.qq.com` in production, the simulator in tests.
    /// `total_timeout` bounds a whole call, `connect_timeout` the TCP/TLS connect.
    pub fn new(
        base_url: &str,
        connect_timeout: Duration,
        total_timeout: Duration,
    ) -> Result<Self, WechatError> {
        let parsed = reqwest::Url::parse(base_url)
            .map_err(|e| WechatError::new(ErrorClass::Caller, format!("invalid base URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(WechatError::new(
                ErrorClass::Caller,
                "base URL must be http or https",
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(total_timeout)
            .build()
            .map_err(|e| WechatError::new(ErrorClass::Caller, describe(&e.without_url(), &[])))?;
        Ok(WechatClient {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            metrics: None,
        })
    }

    /// Counts every call (endpoint, errcode) and its latency.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// `GET /cgi-bin/token`: a NEW token each call (the previous one dies ~5 min later).
    pub async fn classic_token(
        &self,
        appid: &str,
        secret: &Secret,
    ) -> Result<AccessToken, WechatError> {
        let query = TokenQuery {
            grant_type: "client_credential".into(),
            appid: appid.into(),
            secret: secret.expose().into(),
        };
        let req = self.http.get(self.url("/cgi-bin/token")).query(&query);
        let res: TokenResponse = self
            .call("token", req, Effect::Repeatable, &[secret.expose()])
            .await?;
        Ok(AccessToken {
            token: Secret::new(res.access_token),
            expires_in: res.expires_in,
        })
    }

    /// `POST /cgi-bin/stable_token`: the same token while valid unless `force_refresh`.
    pub async fn stable_token(
        &self,
        appid: &str,
        secret: &Secret,
        force_refresh: bool,
    ) -> Result<AccessToken, WechatError> {
        let body = StableTokenRequest {
            grant_type: "client_credential".into(),
            appid: appid.into(),
            secret: secret.expose().into(),
            force_refresh,
        };
        let req = self
            .http
            .post(self.url("/cgi-bin/stable_token"))
            .json(&body);
        let res: TokenResponse = self
            .call("stable_token", req, Effect::Repeatable, &[secret.expose()])
            .await?;
        Ok(AccessToken {
            token: Secret::new(res.access_token),
            expires_in: res.expires_in,
        })
    }

    /// `GET /sns/jscode2session`: exchanges a `wx.login()` code for the user's openid.
    pub async fn code_to_session(
        &self,
        appid: &str,
        secret: &Secret,
        js_code: &str,
    ) -> Result<LoginSession, WechatError> {
        let query = Code2SessionQuery {
            appid: appid.into(),
            secret: secret.expose().into(),
            js_code: js_code.into(),
            grant_type: "authorization_code".into(),
        };
        let req = self.http.get(self.url("/sns/jscode2session")).query(&query);
        let res: Code2SessionResponse = self
            .call(
                "jscode2session",
                req,
                Effect::Repeatable,
                &[secret.expose(), js_code],
            )
            .await?;
        Ok(LoginSession {
            openid: res.openid,
            unionid: res.unionid,
            session_key: Secret::new(res.session_key),
        })
    }

    /// `POST /cgi-bin/message/wxopen/template/send`.
    pub async fn send_template(
        &self,
        token: &Secret,
        msg: &TemplateMessage,
    ) -> Result<(), WechatError> {
        let req = self
            .http
            .post(self.url("/cgi-bin/message/wxopen/template/send"))
            .query(&[("access_token", token.expose())])
            .json(msg);
        let _: ApiStatus = self
            .call("template_send", req, Effect::Delivers, &[token.expose()])
            .await?;
        Ok(())
    }

    /// `POST /cgi-bin/message/subscribe/send`; returns WeChat's `msgid` when it gives one.
    pub async fn send_subscribe(
        &self,
        token: &Secret,
        msg: &SubscribeMessage,
    ) -> Result<Option<i64>, WechatError> {
        let req = self
            .http
            .post(self.url("/cgi-bin/message/subscribe/send"))
            .query(&[("access_token", token.expose())])
            .json(msg);
        let res: SubscribeSendResponse = self
            .call("subscribe_send", req, Effect::Delivers, &[token.expose()])
            .await?;
        Ok(res.msgid)
    }

    /// `GET /wxaapi/newtmpl/gettemplate` (getPrivateTemplateList): the app's
    /// subscription templates.
    pub async fn private_templates(
        &self,
        token: &Secret,
    ) -> Result<Vec<PrivateTemplate>, WechatError> {
        let req = self
            .http
            .get(self.url("/wxaapi/newtmpl/gettemplate"))
            .query(&[("access_token", token.expose())]);
        let res: PrivateTemplateList = self
            .call("gettemplate", req, Effect::Repeatable, &[token.expose()])
            .await?;
        Ok(res.data)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends, reads the whole body, checks `errcode`, then decodes `T`.
    /// `secrets` are scrubbed from any error message (belt and braces: the
    /// messages are built without the URL already).
    async fn call<T: DeserializeOwned>(
        &self,
        api: &'static str,
        req: reqwest::RequestBuilder,
        effect: Effect,
        secrets: &[&str],
    ) -> Result<T, WechatError> {
        let started = std::time::Instant::now();
        let result = self.exchange(api, req, effect, secrets).await;
        if let Some(metrics) = &self.metrics {
            let outcome = match &result {
                Ok(_) => "0".to_string(),
                Err(WechatError {
                    errcode: Some(code),
                    ..
                }) => code.to_string(),
                Err(e) => format!("{:?}", e.class).to_lowercase(),
            };
            metrics.wechat_call(api, &outcome, started.elapsed());
        }
        result
    }

    async fn exchange<T: DeserializeOwned>(
        &self,
        api: &'static str,
        req: reqwest::RequestBuilder,
        effect: Effect,
        secrets: &[&str],
    ) -> Result<T, WechatError> {
        let resp = req.send().await.map_err(|e| {
            let class = if e.is_connect() {
                ErrorClass::Transient
            } else {
                effect.in_doubt()
            };
            let err = WechatError::new(class, describe(&e.without_url(), secrets));
            debug!("wechat {api}: {err}");
            err
        })?;
        let status = resp.status();
        if !status.is_success() {
            let class = if status.is_server_error() {
                ErrorClass::Transient
            } else {
                ErrorClass::Caller
            };
            debug!("wechat {api}: HTTP {status}");
            return Err(WechatError::new(class, format!("HTTP {status}")));
        }
        let body = resp.bytes().await.map_err(|e| {
            let err = WechatError::new(effect.in_doubt(), describe(&e.without_url(), secrets));
            debug!("wechat {api}: {err}");
            err
        })?;
        let unreadable = |what: &str| {
            debug!("wechat {api}: {what} ({} bytes)", body.len());
            WechatError::new(effect.in_doubt(), what.to_owned())
        };
        let status: ApiStatus =
            serde_json::from_slice(&body).map_err(|_| unreadable("response is not JSON"))?;
        if status.errcode != 0 {
            debug!("wechat {api}: errcode {}", status.errcode);
            return Err(WechatError {
                class: classify(status.errcode),
                errcode: Some(status.errcode),
                message: scrub(status.errmsg, secrets),
            });
        }
        serde_json::from_slice(&body).map_err(|_| unreadable("unexpected response shape"))
    }
}

/// The error and its causes in one line, with `secrets` replaced.
fn describe(e: &reqwest::Error, secrets: &[&str]) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    scrub(text, secrets)
}

fn scrub(mut text: String, secrets: &[&str]) -> String {
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(s, "[redacted]");
    }
    text
}
