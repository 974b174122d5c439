//! The simulator as WeChat's message pusher: for an app with a push target it POSTs
//! a `subscribe_msg_popup_event` for each grant it mints and a
//! `subscribe_msg_sent_event` after each subscribe delivery, signed (and with an
//! EncodingAESKey, encrypted: safe mode) as WeChat does, and retries a push that got
//! no answer within 5 s, 3 tries in all, repeating its body (so its identity).
//! A target may name several URLs (the instances behind one load balancer): each
//! push starts at the next one and each retry goes to the one after.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::wechat::push_crypto::{self, PushKey};

/// WeChat waits this long for an answer before it retries.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Tries of one push in all.
const TRIES: u32 = 3;

/// Where and how to push an app's events: the URL, Token and EncodingAESKey the
/// mini-program console holds.
#[derive(Clone)]
pub struct PushTarget {
    pub url: String,
    /// More URLs of the same receiver (its instances): pushes go round-robin and a
    /// retry goes to the next one, as a load balancer would spread them.
    pub more_urls: Vec<String>,
    pub token: String,
    /// None: plaintext mode.
    pub encoding_aes_key: Option<String>,
}

impl std::fmt::Debug for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushTarget")
            .field("url", &self.url)
            .field("more_urls", &self.more_urls)
            .finish_non_exhaustive()
    }
}

/// How a user behaves in the simulated WeChat client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserHabits {
    /// "Always keep this choice" was ticked: grants are added with no popup, so
    /// WeChat pushes no popup event for them.
    pub always_keep: bool,
    /// The user refuses messages on the phone: sent events say
    /// `fail:user refuse to accept the msg`.
    pub refuses: bool,
}

#[derive(Clone, Default)]
pub(crate) struct Pusher {
    targets: Arc<Mutex<HashMap<String, PushTarget>>>,
    /// (appid, openid) of users with habits; everyone else has the defaults.
    habits: Arc<Mutex<HashMap<(String, String), UserHabits>>>,
    http: reqwest::Client,
    answered: Arc<AtomicU64>,
    last_time: Arc<AtomicI64>,
    /// Round-robin position over a target's URLs.
    turn: Arc<AtomicU64>,
}

impl Pusher {
    pub(crate) fn set_target(&self, appid: &str, target: PushTarget) {
        self.targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(appid.to_string(), target);
    }

    pub(crate) fn set_habits(&self, appid: &str, openid: &str, habits: UserHabits) {
        self.habits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((appid.to_string(), openid.to_string()), habits);
    }

    fn habits(&self, appid: &str, openid: &str) -> UserHabits {
        self.habits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(appid.to_string(), openid.to_string()))
            .copied()
            .unwrap_or_default()
    }

    pub(crate) fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// A distinct CreateTime per event: WeChat's identity of an event is
    /// (FromUserName, CreateTime, Event), so two taps in one second would be one
    /// event to the receiver. Unix seconds, strictly increasing in this simulator
    /// (a burst runs a few seconds ahead of the clock).
    fn create_time(&self) -> i64 {
        let now = chrono::Utc::now().timestamp();
        let prev = self
            .last_time
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(last.max(now - 1) + 1)
            })
            .unwrap_or(now);
        prev.max(now - 1) + 1
    }

    pub(crate) fn popup(&self, appid: &str, openid: &str, template_id: &str) {
        if self.habits(appid, openid).always_keep {
            return;
        }
        let xml = format!(
            "<xml><ToUserName><![CDATA[gh_sim]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
<CreateTime>{}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe_msg_popup_event]]></Event>\
<SubscribeMsgPopupEvent><List><TemplateId><![CDATA[{template_id}]]></TemplateId>\
<SubscribeStatusString><![CDATA[accept]]></SubscribeStatusString><PopupScene>0</PopupScene></List>\
</SubscribeMsgPopupEvent></xml>",
            self.create_time()
        );
        self.push(appid, xml);
    }

    pub(crate) fn sent(&self, appid: &str, openid: &str, template_id: &str, msgid: i64) {
        let (code, status) = if self.habits(appid, openid).refuses {
            ("43101", "fail:user refuse to accept the msg")
        } else {
            ("0", "success")
        };
        let xml = format!(
            "<xml><ToUserName><![CDATA[gh_sim]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
<CreateTime>{}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe_msg_sent_event]]></Event>\
<SubscribeMsgSentEvent><List><TemplateId><![CDATA[{template_id}]]></TemplateId><MsgID>{msgid}</MsgID>\
<ErrorCode>{code}</ErrorCode><ErrorStatus><![CDATA[{status}]]></ErrorStatus></List></SubscribeMsgSentEvent></xml>",
            self.create_time()
        );
        self.push(appid, xml);
    }

    /// The user turned a template off in settings: a change event with `reject`.
    pub(crate) fn change(&self, appid: &str, openid: &str, template_id: &str) {
        let xml = format!(
            "<xml><ToUserName><![CDATA[gh_sim]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
<CreateTime>{}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe_msg_change_event]]></Event>\
<SubscribeMsgChangeEvent><List><TemplateId><![CDATA[{template_id}]]></TemplateId>\
<SubscribeStatusString><![CDATA[reject]]></SubscribeStatusString></List></SubscribeMsgChangeEvent></xml>",
            self.create_time()
        );
        self.push(appid, xml);
    }

    /// Sends one push in the background (nothing without a target or a runtime).
    fn push(&self, appid: &str, plain: String) {
        let target = self
            .targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(appid)
            .cloned();
        let (Some(target), Ok(runtime)) = (target, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let Some((query, body)) = sign(&target, appid, &plain) else {
            log::warn!("sim: the push target of {appid} has an unusable EncodingAESKey");
            return;
        };
        let (http, answered) = (self.http.clone(), self.answered.clone());
        let urls: Vec<String> = std::iter::once(target.url.clone())
            .chain(target.more_urls.iter().cloned())
            .collect();
        let first = self.turn.fetch_add(1, Ordering::Relaxed) as usize;
        runtime.spawn(async move {
            for attempt in 1..=TRIES {
                let url = &urls[first.wrapping_add(attempt as usize - 1) % urls.len()];
                let res = http
                    .post(url)
                    .query(&query)
                    .header("content-type", "text/xml")
                    .body(body.clone())
                    .timeout(ANSWER_WITHIN)
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        answered.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(r) if r.status().is_client_error() => {
                        log::warn!("sim: push to {url} refused: {}", r.status());
                        return;
                    }
                    Ok(r) => log::debug!("sim: push try {attempt} to {url}: {}", r.status()),
                    Err(e) => log::debug!("sim: push try {attempt} to {url}: {e}"),
                }
            }
            log::warn!(
                "sim: push to {} got no answer in {TRIES} tries",
                urls.join(" / ")
            );
        });
    }
}

/// The query and body of a push: plaintext, or safe mode with a key.
fn sign(target: &PushTarget, appid: &str, plain: &str) -> Option<(Vec<(String, String)>, String)> {
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let nonce = rand::random::<u32>().to_string();
    let token = target.token.as_str();
    let mut query = vec![
        (
            "signature".to_string(),
            push_crypto::signature(&[token, &timestamp, &nonce]),
        ),
        ("timestamp".to_string(), timestamp.clone()),
        ("nonce".to_string(), nonce.clone()),
    ];
    let Some(key) = &target.encoding_aes_key else {
        return Some((query, plain.to_string()));
    };
    let key = PushKey::from_encoding_aes_key(key).ok()?;
    let encrypt = push_crypto::encrypt(&key, plain.as_bytes(), appid, rand::random());
    query.push(("encrypt_type".into(), "aes".into()));
    query.push((
        "msg_signature".into(),
        push_crypto::signature(&[token, &timestamp, &nonce, &encrypt]),
    ));
    let body = format!(
        "<xml><ToUserName><![CDATA[gh_sim]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    );
    Some((query, body))
}
