//! SQLite write turns: within this process, the write transactions of one database
//! begin in the order they asked.
//!
//! SQLite lets one writer in at a time and leaves the others to its busy handler,
//! which sleeps between tries (up to 100 ms a sleep): a writer that commits and
//! begins again at once keeps winning against one that sleeps. During a campaign's
//! making of 100,000 recipients (1,000 per transaction, back to back) a single
//! message waited up to 1.5 s for its writes (`scripts/bench.sh`, campaign
//! scenario, SQLite). With turns each waits for the writers ahead of it only.
//! Other processes (the CLI) still meet SQLite's busy timeout; so does a writer
//! whose turn does not come within [`TURN_WAIT`], so a turn never adds a failure.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Longest wait for a turn before the writer goes on to SQLite's own lock and
/// busy timeout (the same 10 s), as it would without turns.
pub const TURN_WAIT: Duration = Duration::from_secs(10);

/// The turns of one database: tickets served in order.
#[derive(Default)]
pub struct Turns {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket whose turn it is.
    serving: u64,
    /// Tickets whose holders stopped waiting: skipped when their turn comes.
    gone: BTreeSet<u64>,
}

/// A writer's turn; the next one's begins when this is dropped.
pub struct Turn<'a> {
    turns: &'a Turns,
}

impl Turns {
    /// The turns of the database file `path` (one set per file in the process).
    pub fn of(path: &str) -> Arc<Turns> {
        static ALL: LazyLock<Mutex<HashMap<String, Arc<Turns>>>> = LazyLock::new(Default::default);
        let mut all = ALL.lock().unwrap_or_else(PoisonError::into_inner);
        all.entry(path.to_string()).or_default().clone()
    }

    /// Waits until it is this caller's turn, at most `within`; None if the turn did
    /// not come by then (the caller goes on without one).
    pub fn take(&self, within: Duration) -> Option<Turn<'_>> {
        let deadline = Instant::now() + within;
        let mut state = self.lock();
        let ticket = state.next;
        state.next += 1;
        while state.serving != ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.gone.insert(ticket);
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Some(Turn { turns: self })
    }

    /// Callers waiting for a turn (tests).
    #[cfg(test)]
    fn waiting(&self) -> u64 {
        let state = self.lock();
        (state.next - state.serving).saturating_sub(1 + state.gone.len() as u64)
    }

    /// Polls until `n` callers wait (tests; no timing asserted: it only orders
    /// arrivals).
    #[cfg(test)]
    pub(super) fn until_waiting(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.waiting() != n {
            assert!(Instant::now() < deadline, "{n} callers never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut guard = self.turns.lock();
        let state = &mut *guard;
        state.serving += 1;
        while state.gone.remove(&state.serving) {
            state.serving += 1;
        }
        drop(guard);
        self.turns.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_come_in_the_order_they_were_asked_for() {
        let turns = Arc::new(Turns::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = turns.take(TURN_WAIT).expect("nobody else waits");
        let mut threads = Vec::new();
        for n in 0..8 {
            let (turns2, order) = (turns.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                let _turn = turns2.take(TURN_WAIT).expect("a turn within 10 s");
                order.lock().unwrap().push(n);
            }));
            turns.until_waiting(n + 1);
        }
        drop(first);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn a_caller_that_stopped_waiting_does_not_hold_up_the_next() {
        let turns = Arc::new(Turns::default());
        let first = turns.take(TURN_WAIT).expect("nobody else waits");
        // The second gives up while the first still writes...
        assert!(turns.take(Duration::from_millis(20)).is_none());
        // ...so the third's turn follows the first's.
        let third = std::thread::spawn({
            let turns = turns.clone();
            move || turns.take(TURN_WAIT).is_some()
        });
        turns.until_waiting(1);
        drop(first);
        assert!(third.join().unwrap(), "the third caller's turn never came");
    }
}
