//! Rate limits (429 `rate_limited`): per client session and per IP on the client
//! endpoints, logins (`jscode2session` calls) per IP and per app, per API key on the
//! business and admin endpoints, failed authentications per client address, and
//! `?wait` requests waiting per API key.
//! In-process (governor's GCRA buckets and two small maps): each instance limits on
//! its own, so N instances allow N times the rate — the limits are there to stop one
//! abuser, not to meter.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::ApiError;
use crate::settings::Limits;

pub struct RateLimits {
    session: Option<DefaultKeyedRateLimiter<String>>,
    ip: Option<DefaultKeyedRateLimiter<String>>,
    login_ip: Option<DefaultKeyedRateLimiter<String>>,
    login_app: Option<DefaultKeyedRateLimiter<String>>,
    key: Option<DefaultKeyedRateLimiter<String>>,
    auth_failures: Option<FailureBudget>,
    waiters: WaiterCap,
}

fn limiter(quota: Option<Quota>) -> Option<DefaultKeyedRateLimiter<String>> {
    quota.map(RateLimiter::keyed)
}

impl RateLimits {
    pub fn new(limits: Limits) -> Self {
        RateLimits {
            session: limiter(NonZeroU32::new(limits.per_session_per_minute).map(Quota::per_minute)),
            ip: limiter(NonZeroU32::new(limits.per_ip_per_minute).map(Quota::per_minute)),
            login_ip: limiter(
                NonZeroU32::new(limits.login_per_ip_per_minute).map(Quota::per_minute),
            ),
            login_app: limiter(
                NonZeroU32::new(limits.login_per_app_per_second).map(Quota::per_second),
            ),
            key: limiter(NonZeroU32::new(limits.per_key_per_second).map(Quota::per_second)),
            auth_failures: FailureBudget::per_minute(limits.auth_failures_per_minute),
            waiters: WaiterCap::new(limits.max_waiters_per_key),
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

    /// One more `jscode2session` call for `app_id` on behalf of `addr`: asked right
    /// before the call, so a refused login costs WeChat's per-app limits nothing.
    /// The address first: a flood from one address is refused by its own bucket and
    /// leaves the app's to everyone else.
    pub fn login(&self, app_id: &str, addr: &str) -> Result<(), ApiError> {
        Self::check(&self.login_ip, addr)?;
        Self::check(&self.login_app, app_id)
    }

    pub fn key(&self, key_name: &str) -> Result<(), ApiError> {
        Self::check(&self.key, key_name)
    }

    /// 429 while `addr` has spent its failed authentications: asked before any
    /// key or session is judged, so a limited address learns nothing, not even
    /// from a right key (else 429 vs 200 would go on answering its guesses).
    pub fn auth_allowed(&self, addr: &str) -> Result<(), ApiError> {
        match &self.auth_failures {
            Some(budget) => budget.check(addr, Instant::now()).map_err(rate_limited),
            None => Ok(()),
        }
    }

    /// `addr` presented a wrong key or session: spends one of its failures.
    pub fn auth_failed(&self, addr: &str) {
        if let Some(budget) = &self.auth_failures {
            budget.spend(addr, Instant::now());
        }
    }

    /// A place among the key's `?wait` requests, held until dropped; 429 when the
    /// key already has its maximum waiting.
    pub fn waiter(&self, key_name: &str) -> Result<WaiterSlot, ApiError> {
        self.waiters.enter(key_name).ok_or_else(|| {
            let mut e = rate_limited(Duration::from_secs(1));
            e.message = format!(
                "this key already has {} requests waiting (?wait); retry, or poll GET /v1/messages/{{id}}",
                self.waiters.max
            );
            e
        })
    }

    /// Forgets buckets that are full again, so the maps do not grow without bound.
    pub fn shrink(&self) {
        let limiters = [
            &self.session,
            &self.ip,
            &self.login_ip,
            &self.login_app,
            &self.key,
        ];
        for limiter in limiters.into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(budget) = &self.auth_failures {
            budget.shrink(Instant::now());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent whatever panicked while holding them.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Failed authentications per address, GCRA like governor's buckets (a burst of
/// `per_minute`, then one per `60 s / per_minute`), but one that can be looked at
/// without spending: only failures spend, every attempt looks. governor has no
/// look-without-spending, hence these few lines.
struct FailureBudget {
    /// What one failure costs.
    interval: Duration,
    /// How far ahead of now an address's next-free time may run: the burst.
    tolerance: Duration,
    /// Per address, when its failures are all paid back.
    paid_back_at: Mutex<HashMap<String, Instant>>,
}

impl FailureBudget {
    fn per_minute(per_minute: u32) -> Option<Self> {
        let burst = NonZeroU32::new(per_minute)?;
        let interval = Duration::from_secs(60) / burst.get();
        Some(FailureBudget {
            interval,
            tolerance: interval * (burst.get() - 1),
            paid_back_at: Mutex::new(HashMap::new()),
        })
    }

    /// Err(how long until one more failure is allowed) while the burst is spent.
    fn check(&self, addr: &str, now: Instant) -> Result<(), Duration> {
        match lock(&self.paid_back_at).get(addr) {
            Some(&at) if at > now + self.tolerance => Err(at - (now + self.tolerance)),
            _ => Ok(()),
        }
    }

    fn spend(&self, addr: &str, now: Instant) {
        let mut map = lock(&self.paid_back_at);
        let at = map.entry(addr.to_string()).or_insert(now);
        *at = (*at).max(now) + self.interval;
    }

    fn shrink(&self, now: Instant) {
        let mut map = lock(&self.paid_back_at);
        map.retain(|_, at| *at > now);
        map.shrink_to_fit();
    }
}

/// `?wait` requests in progress per API key: each holds the database's attention
/// (a re-check a second) and a connection now and then, so one key cannot hold
/// thousands.
struct WaiterCap {
    /// 0: no cap.
    max: u32,
    waiting: Arc<Mutex<HashMap<String, u32>>>,
}

/// One waiting request's place; leaving (answer, timeout, client gone) drops it.
pub struct WaiterSlot {
    key_name: String,
    waiting: Arc<Mutex<HashMap<String, u32>>>,
}

impl WaiterCap {
    fn new(max: u32) -> Self {
        WaiterCap {
            max,
            waiting: Arc::default(),
        }
    }

    fn enter(&self, key_name: &str) -> Option<WaiterSlot> {
        let mut waiting = lock(&self.waiting);
        let n = waiting.entry(key_name.to_string()).or_insert(0);
        if self.max != 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(WaiterSlot {
            key_name: key_name.to_string(),
            waiting: self.waiting.clone(),
        })
    }
}

impl Drop for WaiterSlot {
    fn drop(&mut self) {
        let mut waiting = lock(&self.waiting);
        if let Some(n) = waiting.get_mut(&self.key_name) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&self.key_name);
            }
        }
    }
}

fn rate_limited(wait: Duration) -> ApiError {
    // Rounded up: retrying after the header's seconds finds the bucket open.
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests; retry in {secs} s"),
    );
    e.retry_after = Some(secs);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_spend_a_burst_then_one_per_interval() {
        let budget = FailureBudget::per_minute(3).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(budget.check("a", t0), Ok(()));
            budget.spend("a", t0);
        }
        // The burst is spent: the next attempt waits one interval (20 s).
        assert_eq!(budget.check("a", t0), Err(Duration::from_secs(20)));
        assert_eq!(budget.check("b", t0), Ok(()), "another address has its own");
        // Looking does not spend.
        assert_eq!(budget.check("a", t0), Err(Duration::from_secs(20)));
        let later = t0 + Duration::from_secs(20);
        assert_eq!(budget.check("a", later), Ok(()));
        budget.spend("a", later);
        assert!(budget.check("a", later).is_err());
        // Paid back in full after the last failure's minute: forgotten.
        budget.shrink(later + Duration::from_secs(60));
        assert!(lock(&budget.paid_back_at).is_empty());
        assert!(FailureBudget::per_minute(0).is_none(), "0 is unlimited");
    }

    #[test]
    fn waiter_slots_are_capped_per_key_and_given_back_on_drop() {
        let cap = WaiterCap::new(2);
        let (a1, a2) = (cap.enter("a").unwrap(), cap.enter("a").unwrap());
        assert!(cap.enter("a").is_none());
        let b = cap.enter("b").unwrap();
        drop(a1);
        let a3 = cap.enter("a").unwrap();
        drop((a2, a3, b));
        assert!(lock(&cap.waiting).is_empty(), "no key lingers");
        let unlimited = WaiterCap::new(0);
        let many: Vec<_> = (0..1000).filter_map(|_| unlimited.enter("a")).collect();
        assert_eq!(many.len(), 1000);
    }
}
