-- Reports of a credential bump the counter of the user's messages that hold none.
-- A sender that found no credential settles "wait" only if the counter is what it
-- read when it leased the message; otherwise a report came in meanwhile and the
-- message is due at once (the wake-up is never lost to the settlement).
ALTER TABLE messages ADD COLUMN wakes INTEGER NOT NULL DEFAULT 0;
