-- Campaign recipients: statuses 'skipped' and 'cancelled' (final, nothing spent)
-- and the internal 'held' (made, not yet released by its campaign's pacer).
ALTER TABLE messages DROP CONSTRAINT messages_status_check;
ALTER TABLE messages ADD CONSTRAINT messages_status_check
    CHECK (status IN ('queued', 'sending', 'sent', 'no_quota', 'failed', 'skipped', 'cancelled', 'held'));
