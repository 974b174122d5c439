//! Access tokens: the classic and the stable endpoint, and revoking every token of an app.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;

use super::{authenticate, find_app, random_string, wx, SimError, State, ALNUM};
use crate::wechat::wire::{ApiStatus, StableTokenRequest, TokenQuery, TokenResponse};

/// Tokens are forgotten this long after they expired (then they answer 40001).
const FORGET_TOKENS_AFTER: Duration = Duration::from_secs(3600);

struct TokenInfo {
    appid: String,
    expires_at: Instant,
    /// Superseded or revoked: answers 40001 from then on.
    dies_at: Option<Instant>,
}

#[derive(Default)]
pub(super) struct Tokens(HashMap<String, TokenInfo>);

impl Tokens {
    fn issue(&mut self, rng: &mut StdRng, appid: &str, life: Duration, now: Instant) -> String {
        self.0
            .retain(|_, t| now < t.expires_at + FORGET_TOKENS_AFTER);
        let token = random_string(rng, 96, ALNUM);
        self.0.insert(
            token.clone(),
            TokenInfo {
                appid: appid.to_owned(),
                expires_at: now + life,
                dies_at: None,
            },
        );
        token
    }

    /// Makes `token` answer 40001 from `at` on (or earlier if it already was to).
    fn kill(&mut self, token: &str, at: Instant) {
        if let Some(t) = self.0.get_mut(token) {
            t.dies_at = Some(t.dies_at.map_or(at, |d| d.min(at)));
        }
    }

    /// The app of a token usable at `now`.
    pub(super) fn check(&self, token: &str, now: Instant) -> Result<&str, ApiStatus> {
        if token.is_empty() {
            return Err(wx(41001, "access_token missing"));
        }
        let Some(t) = self.0.get(token) else {
            let well_formed = token.len() >= 64
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            return Err(if well_formed {
                wx(
                    40001,
                    "invalid credential, access_token is invalid or not latest",
                )
            } else {
                wx(40014, "invalid access_token")
            });
        };
        if t.dies_at.is_some_and(|d| now >= d) {
            return Err(wx(
                40001,
                "invalid credential, access_token is invalid or not latest",
            ));
        }
        if now >= t.expires_at {
            return Err(wx(42001, "access_token expired"));
        }
        Ok(&t.appid)
    }

    /// Time left of a usable token.
    fn remaining(&self, token: &str, now: Instant) -> Option<Duration> {
        self.check(token, now).ok()?;
        self.0.get(token).map(|t| t.expires_at - now)
    }
}

impl State {
    pub(super) fn classic_token(
        &mut self,
        q: &TokenQuery,
        now: Instant,
    ) -> Result<TokenResponse, ApiStatus> {
        if q.grant_type != "client_credential" {
            return Err(wx(40002, "invalid grant_type"));
        }
        let app = authenticate(&mut self.apps, &q.appid, &q.secret)?;
        if app.token_calls >= self.cfg.token_daily_limit {
            return Err(wx(45009, "reach max api daily quota limit"));
        }
        app.token_calls += 1;
        let life = self.cfg.token_expires_in;
        let token = self.tokens.issue(&mut self.rng, &app.appid, life, now);
        if let Some(old) = app.classic.replace(token.clone()) {
            self.tokens.kill(&old, now + self.cfg.token_overlap);
        }
        Ok(TokenResponse {
            access_token: token,
            expires_in: secs_ceil(life),
        })
    }

    /// Normal mode: the current token while more than `min(300 s, life / 4)` of it
    /// is left; in that last stretch a new one, the old one living on to its expiry.
    /// `force_refresh`: the current token dies now and a new one is issued.
    pub(super) fn stable_token(
        &mut self,
        r: &StableTokenRequest,
        now: Instant,
    ) -> Result<TokenResponse, ApiStatus> {
        if r.grant_type != "client_credential" {
            return Err(wx(40002, "invalid grant_type"));
        }
        let app = authenticate(&mut self.apps, &r.appid, &r.secret)?;
        let life = self.cfg.token_expires_in;
        if r.force_refresh {
            if app.force_refreshes >= self.cfg.stable_force_daily_limit {
                return Err(wx(45009, "reach max api daily quota limit"));
            }
            if app
                .last_force
                .is_some_and(|t| now < t + self.cfg.stable_force_interval)
            {
                return Err(wx(
                    45011,
                    "api minute-quota reach limit, force refresh too often",
                ));
            }
            app.force_refreshes += 1;
            app.last_force = Some(now);
            if let Some(old) = app.stable.take() {
                self.tokens.kill(&old, now);
            }
        } else if let Some(current) = &app.stable {
            let window = (life / 4).min(Duration::from_secs(300));
            if let Some(left) = self.tokens.remaining(current, now).filter(|l| *l > window) {
                return Ok(TokenResponse {
                    access_token: current.clone(),
                    expires_in: secs_ceil(left),
                });
            }
        }
        let token = self.tokens.issue(&mut self.rng, &app.appid, life, now);
        app.stable = Some(token.clone());
        Ok(TokenResponse {
            access_token: token,
            expires_in: secs_ceil(life),
        })
    }

    /// Every token of the app (classic and stable, current or in overlap) dies now.
    /// Returns how many were still usable.
    pub(crate) fn invalidate_tokens(
        &mut self,
        appid: &str,
        now: Instant,
    ) -> Result<usize, SimError> {
        let app = find_app(&mut self.apps, appid)?;
        app.classic = None;
        app.stable = None;
        let mut killed = 0;
        for t in self.tokens.0.values_mut().filter(|t| t.appid == appid) {
            if t.dies_at.is_none_or(|d| d > now) && t.expires_at > now {
                killed += 1;
            }
            t.dies_at = Some(t.dies_at.map_or(now, |d| d.min(now)));
        }
        Ok(killed)
    }
}

fn secs_ceil(d: Duration) -> i64 {
    i64::try_from(d.as_millis().div_ceil(1000)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{classic, state, S};
    use super::*;
    use crate::sim::config::SimConfig;

    fn stable(st: &mut State, force_refresh: bool, now: Instant) -> Result<String, i64> {
        let r = StableTokenRequest {
            grant_type: "client_credential".into(),
            appid: "wxa".into(),
            secret: "s".into(),
            force_refresh,
        };
        st.stable_token(&r, now)
            .map(|t| t.access_token)
            .map_err(|e| e.errcode)
    }

    fn check(st: &State, token: &str, now: Instant) -> Result<(), i64> {
        st.tokens.check(token, now).map(drop).map_err(|e| e.errcode)
    }

    #[test]
    fn a_superseded_classic_token_works_for_the_overlap_only() {
        let mut st = state(SimConfig {
            token_overlap: S(10),
            token_expires_in: S(100),
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let a = classic(&mut st, t0);
        let b = classic(&mut st, t0 + S(5));
        assert_eq!(
            check(&st, &a, t0 + S(15) - Duration::from_millis(1)),
            Ok(())
        );
        assert_eq!(check(&st, &a, t0 + S(15)), Err(40001));
        assert_eq!(
            check(&st, &b, t0 + S(105) - Duration::from_millis(1)),
            Ok(())
        );
        assert_eq!(check(&st, &b, t0 + S(105)), Err(42001));
    }

    #[test]
    fn without_overlap_the_old_token_dies_at_once() {
        let mut st = state(SimConfig {
            token_overlap: Duration::ZERO,
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let a = classic(&mut st, t0);
        let _b = classic(&mut st, t0);
        assert_eq!(check(&st, &a, t0), Err(40001));
    }

    #[test]
    fn stable_token_renews_in_the_last_quarter_and_force_refresh_kills() {
        let mut st = state(SimConfig {
            token_expires_in: S(100),
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let a = stable(&mut st, false, t0).expect("a");
        assert_eq!(stable(&mut st, false, t0 + S(74)), Ok(a.clone()));
        let b = stable(&mut st, false, t0 + S(76)).expect("b");
        assert_ne!(a, b);
        assert_eq!(check(&st, &a, t0 + S(99)), Ok(()));
        assert_eq!(check(&st, &a, t0 + S(100)), Err(42001));
        assert_eq!(stable(&mut st, false, t0 + S(80)), Ok(b.clone()));

        let c = stable(&mut st, true, t0 + S(80)).expect("c");
        assert_eq!(check(&st, &b, t0 + S(80)), Err(40001));
        assert_eq!(stable(&mut st, true, t0 + S(109)), Err(45011));
        assert!(stable(&mut st, true, t0 + S(110)).is_ok_and(|d| d != c));
    }
}
