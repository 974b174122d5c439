//! What a simulator is started with, and the fault knobs that can change later.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;
use crate::wechat::wire::PrivateTemplate;

/// Start-up settings. Durations accept sub-second values so tests can expire
/// tokens, credentials and codes in seconds.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// `(appid, secret)` of the known apps; more can be added at run time.
    pub apps: Vec<(String, Secret)>,
    /// Life of an access token (WeChat: 7200 s).
    pub token_expires_in: Duration,
    /// How long a classic token still works after a newer one was issued (WeChat: ~5 min).
    pub token_overlap: Duration,
    /// Successful `/cgi-bin/token` calls per app until `/sim/reset-limits` (WeChat: ~2000/day).
    pub token_daily_limit: u32,
    /// Minimum spacing of `stable_token` force refreshes (WeChat: 30 s) → 45011.
    pub stable_force_interval: Duration,
    /// Force refreshes per app until `/sim/reset-limits` (WeChat: 20/day) → 45009.
    pub stable_force_daily_limit: u32,
    /// Uses of a minted prepay_id (the seed says 1, WeChat's page said 3).
    pub prepay_uses: u32,
    /// How long after minting a prepay_id still answers 41028.
    pub prepay_activation_delay: Duration,
    /// Allowed page paths (the part before `?`); `None` = any page. Else unknown → 41030.
    pub pages: Option<Vec<String>>,
    /// Allowed template ids; `None` = any. Else unknown → 40037.
    pub templates: Option<Vec<String>>,
    /// The subscription templates every app has, as getPrivateTemplateList lists
    /// them; a subscribe send of one of them with a `data` key its content does
    /// not name → 47003.
    pub subscription_templates: Vec<PrivateTemplate>,
    /// Life of a form_id and a prepay_id (WeChat: 7 days).
    pub form_id_life: Duration,
    /// Life of a `wx.login()` code (WeChat: 5 min).
    pub code_life: Duration,
    /// Logins per user per minute (WeChat: 100) → 45011.
    pub login_rate_per_minute: u32,
    /// The template-message API answers 45103, as for mini-programs created after
    /// 2020-01-10.
    pub template_api_retired: bool,
    /// Seed of the simulator's RNG (ids, tokens, fault rolls); `None` = from the OS.
    pub seed: Option<u64>,
    /// Faults active from the start.
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            apps: Vec::new(),
            token_expires_in: Duration::from_secs(7200),
            token_overlap: Duration::from_secs(300),
            token_daily_limit: 2000,
            stable_force_interval: Duration::from_secs(30),
            stable_force_daily_limit: 20,
            prepay_uses: 1,
            prepay_activation_delay: Duration::ZERO,
            pages: None,
            templates: None,
            subscription_templates: Vec::new(),
            form_id_life: Duration::from_secs(7 * 24 * 3600),
            code_life: Duration::from_secs(300),
            login_rate_per_minute: 100,
            template_api_retired: false,
            seed: None,
            faults: Faults::default(),
        }
    }
}

/// Injected faults. Set as a whole (`POST /sim/faults`, [`super::Simulator::set_faults`]);
/// every field may be left out (= no fault).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// For `template/send` and `subscribe/send`.
    pub send: FaultSet,
    /// For `/cgi-bin/token` and `/cgi-bin/stable_token`.
    pub token: FaultSet,
    /// For `/sns/jscode2session`.
    pub login: FaultSet,
    /// Accepted sends per app until `/sim/reset-limits`; then 45009.
    pub daily_send_limit: Option<u32>,
    /// A send to a user while another send to that user is still being answered
    /// (see `latency_ms`) answers 43108 without acting, as WeChat does.
    pub reject_concurrent_sends: bool,
    /// Reseeds the RNG when set, so the fault rolls that follow are reproducible.
    pub seed: Option<u64>,
}

/// Faults of one group of endpoints. The fractions are probabilities per call
/// (0..=1, summing to at most 1), rolled in this order:
/// - `busy`: answer `{"errcode":-1}` without acting;
/// - `http_500`: answer HTTP 500 without acting;
/// - `drop_after_read`: act on the request (deliver, spend the credential) and
///   then break the connection in the middle of the answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSet {
    /// Added after the request was processed, before the answer is written, so a
    /// client that times out leaves a delivered message behind (the ambiguous case).
    pub latency_ms: Option<Latency>,
    pub busy: f64,
    pub http_500: f64,
    pub drop_after_read: f64,
}

/// `50` (fixed) or `[10, 200]` (uniform in the range), in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Latency {
    Fixed(u64),
    Range(u64, u64),
}

impl FaultSet {
    pub(crate) fn check(&self, name: &str) -> Result<(), String> {
        let fractions = [self.busy, self.http_500, self.drop_after_read];
        if fractions.iter().any(|f| !(0.0..=1.0).contains(f)) || fractions.iter().sum::<f64>() > 1.0
        {
            return Err(format!(
                "{name}: fractions must be within 0..=1 and sum to at most 1"
            ));
        }
        Ok(())
    }
}
