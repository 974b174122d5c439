//! Who is waiting for which message to finish (`?wait`): a finish wakes the waiters
//! of that message only. The registry holds an entry per message that somebody
//! waits for, and the entry goes when its last waiter leaves — answered, timed out,
//! or dropped with a request whose client went away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// Message id → a flag its waiters watch, flipped once when it finishes.
#[derive(Clone, Default)]
pub struct Waiters {
    slots: Arc<Mutex<HashMap<i64, watch::Sender<bool>>>>,
}

/// One waiter of one message. Register before reading the message, then a finish
/// after the read is never missed (a finish before it is in what was read).
pub struct Waiter {
    id: i64,
    finished: watch::Receiver<bool>,
    slots: Arc<Mutex<HashMap<i64, watch::Sender<bool>>>>,
}

fn lock(
    slots: &Mutex<HashMap<i64, watch::Sender<bool>>>,
) -> MutexGuard<'_, HashMap<i64, watch::Sender<bool>>> {
    // A map of flags stays consistent whatever panicked while holding it.
    slots
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Waiters {
    pub fn wait_for(&self, id: i64) -> Waiter {
        let finished = lock(&self.slots)
            .entry(id)
            .or_insert_with(|| watch::channel(false).0)
            .subscribe();
        Waiter {
            id,
            finished,
            slots: self.slots.clone(),
        }
    }

    /// Message `id` reached a final status in this instance: wake its waiters, if any.
    pub fn finished(&self, id: i64) {
        if let Some(flag) = lock(&self.slots).get(&id) {
            flag.send_replace(true);
        }
    }
}

impl Waiter {
    /// Whether this instance finished the message since the waiter registered.
    pub fn is_finished(&self) -> bool {
        *self.finished.borrow()
    }

    /// Returns when this instance finishes the message (never, if another does, or
    /// if it finished before this waiter registered — the reader saw that already).
    /// Once: after it returned, it waits for good, so a caller's loop cannot spin.
    pub async fn finished(&mut self) {
        // The sender lives in the registry as long as this waiter does, so the
        // channel does not close under us; if it did, waiting on is still right.
        if self.finished.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        // This waiter's receiver is still alive here: 1 means it is the last.
        if slots
            .get(&self.id)
            .is_some_and(|flag| flag.receiver_count() <= 1)
        {
            slots.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages somebody is waiting for now.
    fn entries(waiters: &Waiters) -> usize {
        lock(&waiters.slots).len()
    }

    #[test]
    fn a_finish_wakes_only_the_waiters_of_its_message() {
        let waiters = Waiters::default();
        let a = waiters.wait_for(1);
        let a_again = waiters.wait_for(1);
        let b = waiters.wait_for(2);
        waiters.finished(1);
        assert!(a.is_finished() && a_again.is_finished());
        assert!(
            !b.is_finished(),
            "message 2's waiter was not woken by message 1"
        );
        assert!(!b.finished.has_changed().unwrap(), "nor notified at all");
        waiters.finished(3); // nobody waits: nothing is kept for it
        assert_eq!(entries(&waiters), 2);
    }

    #[test]
    fn the_entry_goes_with_its_last_waiter() {
        let waiters = Waiters::default();
        let (a, a_again, b) = (
            waiters.wait_for(1),
            waiters.wait_for(1),
            waiters.wait_for(2),
        );
        drop(a);
        assert_eq!(entries(&waiters), 2, "message 1 still has a waiter");
        drop(a_again);
        drop(b);
        assert_eq!(entries(&waiters), 0);
        // A waiter registering after a finish starts unfinished: it reads the
        // message's final status from the database instead.
        waiters.finished(1);
        assert!(!waiters.wait_for(1).is_finished());
    }

    #[tokio::test]
    async fn finished_returns_once_the_message_finishes() {
        let waiters = Waiters::default();
        let mut a = waiters.wait_for(1);
        waiters.finished(1);
        a.finished().await;
        assert!(a.is_finished());
    }
}
