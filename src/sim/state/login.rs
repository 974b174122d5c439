//! Mini-program login: `wx.login()` codes, `jscode2session`, blocked users.

use std::time::{Duration, Instant};

use super::{authenticate, random_string, user_app, wx, SimError, State, ALNUM};
use crate::wechat::wire::{ApiStatus, Code2SessionQuery, Code2SessionResponse};

pub(super) struct Code {
    openid: String,
    expires_at: Instant,
}

impl State {
    pub(super) fn login(
        &mut self,
        q: &Code2SessionQuery,
        now: Instant,
    ) -> Result<Code2SessionResponse, ApiStatus> {
        let app = authenticate(&mut self.apps, &q.appid, &q.secret)?;
        if !q.grant_type.is_empty() && q.grant_type != "authorization_code" {
            return Err(wx(40002, "invalid grant_type"));
        }
        if q.js_code.is_empty() {
            return Err(wx(41008, "missing code"));
        }
        let openid = app
            .codes
            .get(&q.js_code)
            .filter(|c| now < c.expires_at)
            .map(|c| c.openid.clone())
            .ok_or_else(|| wx(40029, "invalid code"))?;
        // A rate-limited login leaves the code usable, as a retry would expect.
        let recent = app.logins.entry(openid.clone()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if recent.len() >= self.cfg.login_rate_per_minute as usize {
            return Err(wx(45011, "api minute-quota reach limit"));
        }
        recent.push_back(now);
        app.codes.remove(&q.js_code);
        if app.blocked.contains(&openid) {
            return Err(wx(40226, "high risk user blocked"));
        }
        Ok(Code2SessionResponse {
            openid,
            session_key: random_string(&mut self.rng, 24, ALNUM),
            unionid: None,
        })
    }

    pub(crate) fn mint_code(
        &mut self,
        appid: &str,
        openid: &str,
        now: Instant,
    ) -> Result<String, SimError> {
        let app = user_app(&mut self.apps, appid, openid)?;
        app.codes.retain(|_, c| now < c.expires_at);
        let code = random_string(&mut self.rng, 32, ALNUM);
        app.codes.insert(
            code.clone(),
            Code {
                openid: openid.to_owned(),
                expires_at: now + self.cfg.code_life,
            },
        );
        Ok(code)
    }

    pub(crate) fn block(&mut self, appid: &str, openid: &str) -> Result<(), SimError> {
        let app = user_app(&mut self.apps, appid, openid)?;
        app.blocked.insert(openid.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{state, S};
    use super::*;
    use crate::sim::config::SimConfig;

    #[test]
    fn logins_are_rate_limited_per_user_without_losing_the_code() {
        let mut st = state(SimConfig {
            login_rate_per_minute: 1,
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let login = |st: &mut State, code: &str, at: Instant| {
            let q = Code2SessionQuery {
                appid: "wxa".into(),
                secret: "s".into(),
                js_code: code.into(),
                grant_type: "authorization_code".into(),
            };
            st.login(&q, at).map(|r| r.openid).map_err(|e| e.errcode)
        };
        let first = st.mint_code("wxa", "o", t0).expect("code");
        let second = st.mint_code("wxa", "o", t0).expect("code");
        assert_eq!(login(&mut st, &first, t0), Ok("o".to_owned()));
        assert_eq!(login(&mut st, &second, t0 + S(59)), Err(45011));
        assert_eq!(login(&mut st, &second, t0 + S(60)), Ok("o".to_owned()));
        let late = st.mint_code("wxa", "o", t0).expect("code");
        assert_eq!(login(&mut st, &late, t0 + S(300)), Err(40029));
    }
}
