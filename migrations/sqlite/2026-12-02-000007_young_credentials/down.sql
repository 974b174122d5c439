ALTER TABLE messages DROP COLUMN young_retries;
ALTER TABLE messages DROP COLUMN credential_issued_at;
