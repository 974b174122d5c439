//! Control of the simulator itself: its apps, its faults, the new day, and the
//! record of what it saw.

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{App, SimError, State};
use crate::secret::Secret;
use crate::sim::config::Faults;
use crate::sim::record::{Delivery, Stats, TokenFetch};

impl State {
    pub(crate) fn add_app(&mut self, appid: &str, secret: &Secret) {
        self.apps
            .entry(appid.to_owned())
            .and_modify(|a| a.secret = secret.clone())
            .or_insert_with(|| App::new(appid, secret));
    }

    pub(crate) fn set_faults(&mut self, faults: Faults) -> Result<(), SimError> {
        faults.send.check("send").map_err(SimError::Invalid)?;
        faults.token.check("token").map_err(SimError::Invalid)?;
        faults.login.check("login").map_err(SimError::Invalid)?;
        if let Some(seed) = faults.seed {
            self.rng = StdRng::seed_from_u64(seed);
        }
        self.faults = faults;
        Ok(())
    }

    pub(crate) fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// A new day: token, force-refresh and send counters of every app back to 0.
    pub(crate) fn reset_limits(&mut self) {
        for app in self.apps.values_mut() {
            app.token_calls = 0;
            app.force_refreshes = 0;
            app.last_force = None;
            app.sends = 0;
        }
    }

    pub(crate) fn deliveries(&self) -> Vec<Delivery> {
        self.record.deliveries.clone()
    }

    pub(crate) fn delivery_count(&self) -> usize {
        self.record.deliveries.len()
    }

    /// Deliveries from the `from`-th on.
    pub(crate) fn deliveries_since(&self, from: usize) -> Vec<Delivery> {
        self.record
            .deliveries
            .get(from..)
            .unwrap_or_default()
            .to_vec()
    }

    pub(crate) fn token_fetches(&self) -> Vec<TokenFetch> {
        self.record.token_fetches.clone()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.record.stats.clone()
    }
}
