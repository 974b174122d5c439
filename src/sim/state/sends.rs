//! Messages: the two send endpoints, and the form_ids, prepay_ids and one-time
//! subscription grants they spend.

use std::time::{Duration, Instant};

use chrono::Utc;

use super::{random_string, user_app, wx, App, SimError, State, HEX, LOWER_ALNUM};
use crate::sim::record::{Delivery, MessageKind};
use crate::wechat::subscribe_data;
use crate::wechat::wire::{
    ApiStatus, PrivateTemplateList, SubscribeMessage, SubscribeSendResponse, TemplateMessage,
};

/// The most credentials or grants one control call may mint.
const MAX_MINT: u32 = 10_000;
/// msgids of subscribe sends are this plus the delivery's seq.
const MSGID_BASE: i64 = 3_000_000_000;

pub(super) struct Credential {
    openid: String,
    uses_left: u32,
    active_at: Instant,
    expires_at: Instant,
}

/// The fields of a send that every send checks.
struct Target<'m> {
    token: &'m str,
    template_id: &'m str,
    page: Option<&'m str>,
    touser: &'m str,
}

impl State {
    pub(super) fn send_template(
        &mut self,
        token: &str,
        msg: &TemplateMessage,
        now: Instant,
    ) -> Result<ApiStatus, ApiStatus> {
        let target = Target {
            token,
            template_id: &msg.template_id,
            page: msg.page.as_deref(),
            touser: &msg.touser,
        };
        if self.cfg.template_api_retired {
            self.tokens.check(token, now)?;
            return Err(wx(45103, "This API has been unsupported"));
        }
        let app = self.sender(&target, now)?;
        let credential = app
            .credentials
            .get_mut(&msg.form_id)
            .filter(|c| c.openid == msg.touser)
            .ok_or_else(|| wx(41028, "invalid form id"))?;
        if credential.uses_left == 0 {
            return Err(wx(41029, "form id used count reach limit"));
        }
        if now >= credential.expires_at || now < credential.active_at {
            return Err(wx(41028, "invalid form id"));
        }
        credential.uses_left -= 1;
        app.sends += 1;
        let appid = app.appid.clone();
        self.record.deliveries.push(Delivery {
            seq: self.record.next_seq(),
            at: Utc::now(),
            appid,
            touser: msg.touser.clone(),
            template_id: msg.template_id.clone(),
            kind: MessageKind::Template,
            credential: Some(msg.form_id.clone()),
            page: msg.page.clone(),
            data: msg.data.clone(),
            miniprogram_state: None,
            lang: None,
            msgid: None,
            response_dropped: false,
        });
        Ok(wx(0, "ok"))
    }

    pub(super) fn send_subscribe(
        &mut self,
        token: &str,
        msg: &SubscribeMessage,
        now: Instant,
    ) -> Result<SubscribeSendResponse, ApiStatus> {
        let target = Target {
            token,
            template_id: &msg.template_id,
            page: msg.page.as_deref(),
            touser: &msg.touser,
        };
        // A listed template takes only the keys of its content.
        let unlisted_key = self
            .cfg
            .subscription_templates
            .iter()
            .find(|t| t.pri_tmpl_id == msg.template_id)
            .and_then(|t| {
                let keys = t.keys();
                msg.data.keys().find(|k| !keys.contains(k)).cloned()
            });
        let app = self.sender(&target, now)?;
        if msg
            .miniprogram_state
            .as_deref()
            .is_some_and(|s| !matches!(s, "developer" | "trial" | "formal"))
        {
            return Err(wx(47003, "argument invalid! miniprogram_state"));
        }
        if msg
            .lang
            .as_deref()
            .is_some_and(|l| !matches!(l, "zh_CN" | "en_US" | "zh_HK" | "zh_TW"))
        {
            return Err(wx(47003, "argument invalid! lang"));
        }
        if let Some(field) = subscribe_data::first_invalid(&msg.data) {
            return Err(wx(47003, &format!("argument invalid! {field}")));
        }
        if let Some(key) = unlisted_key {
            return Err(wx(47003, &format!("argument invalid! data.{key}.value")));
        }
        let grants = app
            .grants
            .get_mut(&(msg.touser.clone(), msg.template_id.clone()))
            .filter(|n| **n > 0)
            .ok_or_else(|| wx(43101, "user refuse to accept the msg"))?;
        *grants -= 1;
        app.sends += 1;
        let appid = app.appid.clone();
        let seq = self.record.next_seq();
        let msgid = MSGID_BASE.saturating_add_unsigned(seq);
        self.record.deliveries.push(Delivery {
            seq,
            at: Utc::now(),
            appid,
            touser: msg.touser.clone(),
            template_id: msg.template_id.clone(),
            kind: MessageKind::Subscribe,
            credential: None,
            page: msg.page.clone(),
            data: msg.data.clone(),
            miniprogram_state: msg.miniprogram_state.clone(),
            lang: msg.lang.clone(),
            msgid: Some(msgid),
            response_dropped: false,
        });
        Ok(SubscribeSendResponse {
            errcode: 0,
            errmsg: "ok".into(),
            msgid: Some(msgid),
        })
    }

    /// The checks every send makes before looking at the credential, in WeChat's
    /// order of concerns: token, account quota, template, page, user.
    /// getPrivateTemplateList: the configured subscription templates, for any app
    /// with a valid token.
    pub(super) fn private_templates(
        &mut self,
        token: &str,
        now: Instant,
    ) -> Result<PrivateTemplateList, ApiStatus> {
        let appid = self.tokens.check(token, now)?;
        if !self.apps.contains_key(appid) {
            return Err(wx(40001, "invalid credential"));
        }
        Ok(PrivateTemplateList {
            errcode: 0,
            errmsg: "ok".into(),
            data: self.cfg.subscription_templates.clone(),
        })
    }

    fn sender(&mut self, t: &Target<'_>, now: Instant) -> Result<&mut App, ApiStatus> {
        let appid = self.tokens.check(t.token, now)?;
        let app = self
            .apps
            .get_mut(appid)
            .ok_or_else(|| wx(40001, "invalid credential"))?;
        if self.faults.daily_send_limit.is_some_and(|l| app.sends >= l) {
            return Err(wx(45009, "reach max api daily quota limit"));
        }
        let template_ok = match &self.cfg.templates {
            None => !t.template_id.is_empty(),
            Some(list) => list.iter().any(|x| x == t.template_id),
        };
        if !template_ok {
            return Err(wx(40037, "invalid template_id"));
        }
        let page_ok = match (&self.cfg.pages, t.page.filter(|p| !p.is_empty())) {
            (Some(list), Some(page)) => {
                let path = page.split('?').next().unwrap_or_default();
                list.iter().any(|x| x == path)
            }
            _ => true,
        };
        if !page_ok {
            return Err(wx(41030, "invalid page"));
        }
        if !app.known.contains(t.touser) {
            return Err(wx(40003, "invalid openid"));
        }
        Ok(app)
    }

    pub(crate) fn mint_form_ids(
        &mut self,
        appid: &str,
        openid: &str,
        count: u32,
        now: Instant,
    ) -> Result<Vec<String>, SimError> {
        let expires_at = now + self.cfg.form_id_life;
        let app = user_app(&mut self.apps, appid, openid)?;
        check_count(count)?;
        Ok((0..count)
            .map(|_| {
                let value = random_string(&mut self.rng, 32, HEX);
                app.credentials.insert(
                    value.clone(),
                    Credential {
                        openid: openid.to_owned(),
                        uses_left: 1,
                        active_at: now,
                        expires_at,
                    },
                );
                value
            })
            .collect())
    }

    pub(crate) fn mint_prepay_ids(
        &mut self,
        appid: &str,
        openid: &str,
        count: u32,
        uses: Option<u32>,
        activation_delay: Option<Duration>,
        now: Instant,
    ) -> Result<Vec<String>, SimError> {
        let uses = uses.unwrap_or(self.cfg.prepay_uses);
        let active_at = now + activation_delay.unwrap_or(self.cfg.prepay_activation_delay);
        let expires_at = now + self.cfg.form_id_life;
        let app = user_app(&mut self.apps, appid, openid)?;
        check_count(count)?;
        Ok((0..count)
            .map(|_| {
                let value = format!("wx{}", random_string(&mut self.rng, 32, LOWER_ALNUM));
                app.credentials.insert(
                    value.clone(),
                    Credential {
                        openid: openid.to_owned(),
                        uses_left: uses,
                        active_at,
                        expires_at,
                    },
                );
                value
            })
            .collect())
    }

    /// Adds `count` one-time grants; returns the grants now left.
    pub(crate) fn grant_subscriptions(
        &mut self,
        appid: &str,
        openid: &str,
        template_id: &str,
        count: u32,
    ) -> Result<u32, SimError> {
        let app = user_app(&mut self.apps, appid, openid)?;
        check_count(count)?;
        let n = app
            .grants
            .entry((openid.to_owned(), template_id.to_owned()))
            .or_default();
        *n = n.saturating_add(count);
        Ok(*n)
    }

    /// The user turned the template off in settings: the grants left are void
    /// (a send answers 43101). Returns how many there were.
    pub(crate) fn turn_off(
        &mut self,
        appid: &str,
        openid: &str,
        template_id: &str,
    ) -> Result<u32, SimError> {
        let app = user_app(&mut self.apps, appid, openid)?;
        Ok(app
            .grants
            .remove(&(openid.to_owned(), template_id.to_owned()))
            .unwrap_or(0))
    }
}

fn check_count(count: u32) -> Result<(), SimError> {
    if count == 0 || count > MAX_MINT {
        return Err(SimError::Invalid(format!("count must be 1..={MAX_MINT}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{classic, state, S};
    use super::*;
    use crate::sim::config::SimConfig;

    #[test]
    fn a_prepay_id_waits_for_activation_then_has_its_uses() {
        let mut st = state(SimConfig {
            token_expires_in: S(8 * 24 * 3600),
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let token = classic(&mut st, t0);
        let prepay = st
            .mint_prepay_ids("wxa", "o", 1, Some(2), Some(S(5)), t0)
            .expect("prepay")
            .remove(0);
        let fid = st.mint_form_ids("wxa", "o", 1, t0).expect("fid").remove(0);
        let mut send = |value: &str, at: Instant| {
            let msg = TemplateMessage {
                touser: "o".into(),
                template_id: "T".into(),
                form_id: value.into(),
                ..TemplateMessage::default()
            };
            st.send_template(&token, &msg, at)
                .map(drop)
                .map_err(|e| e.errcode)
        };
        assert_eq!(send(&prepay, t0 + S(4)), Err(41028));
        assert_eq!(send(&prepay, t0 + S(5)), Ok(()));
        assert_eq!(send(&prepay, t0 + S(6)), Ok(()));
        assert_eq!(send(&prepay, t0 + S(7)), Err(41029));
        // A form_id lives 7 days.
        assert_eq!(send(&fid, t0 + S(7 * 24 * 3600)), Err(41028));
    }
}
