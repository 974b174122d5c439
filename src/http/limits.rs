//! Rate limits (429 `rate_limited`): per client session and per IP on the client
//! endpoints, per API key on the business and admin endpoints. In-process GCRA
//! buckets (governor): each instance limits on its own, so N instances allow N
//! times the rate — the limits are there to stop one abuser, not to meter.

use std::num::NonZeroU32;
use std::time::Duration;

use actix_web::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::ApiError;
use crate::settings::Limits;

pub struct RateLimits {
    session: Option<DefaultKeyedRateLimiter<String>>,
    ip: Option<DefaultKeyedRateLimiter<String>>,
    key: Option<DefaultKeyedRateLimiter<String>>,
}

fn limiter(quota: Option<Quota>) -> Option<DefaultKeyedRateLimiter<String>> {
    quota.map(RateLimiter::keyed)
}

impl RateLimits {
    pub fn new(limits: Limits) -> Self {
        RateLimits {
            session: limiter(NonZeroU32::new(limits.per_session_per_minute).map(Quota::per_minute)),
            ip: limiter(NonZeroU32::new(limits.per_ip_per_minute).map(Quota::per_minute)),
            key: limiter(NonZeroU32::new(limits.per_key_per_second).map(Quota::per_second)),
        }
    }

    fn check(limiter: &Option<DefaultKeyedRateLimiter<String>>, key: &str) -> Result<(), ApiError> {
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter.check_key(&key.to_string()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            rate_limited(wait)
        })
    }

    pub fn session(&self, app_id: &str, openid: &str) -> Result<(), ApiError> {
        Self::check(&self.session, &format!("{app_id}\u{1f}{openid}"))
    }

    pub fn ip(&self, ip: &str) -> Result<(), ApiError> {
        Self::check(&self.ip, ip)
    }

    pub fn key(&self, key_name: &str) -> Result<(), ApiError> {
        Self::check(&self.key, key_name)
    }

    /// Forgets buckets that are full again, so the maps do not grow without bound.
    pub fn shrink(&self) {
        for limiter in [&self.session, &self.ip, &self.key].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

fn rate_limited(wait: Duration) -> ApiError {
    let secs = wait.as_secs().max(1);
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests; retry in {secs} s"),
    );
    e.retry_after = Some(secs);
    e
}
