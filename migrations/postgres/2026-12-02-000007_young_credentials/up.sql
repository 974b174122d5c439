-- The held credential's issued_at: a 41028 is "young" by the time since it was
-- issued (the backend's issued_at when it gave one), not since it was reported.
-- NULL on rows claimed before this column existed: credential_created_at counts.
ALTER TABLE messages ADD COLUMN credential_issued_at TIMESTAMP;
-- Young-credential (41028) retries of the message, for their bound.
ALTER TABLE messages ADD COLUMN young_retries INTEGER NOT NULL DEFAULT 0;
