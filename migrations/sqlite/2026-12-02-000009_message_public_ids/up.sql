-- The id a message has in the API: random ("msg_" and 32 hex digits), so one app's
-- key cannot count another app's messages from its own ids, nor guess them.
ALTER TABLE messages ADD COLUMN public_id TEXT NOT NULL DEFAULT '';
UPDATE messages SET public_id = 'msg_' || lower(hex(randomblob(16)));
CREATE UNIQUE INDEX messages_public_id ON messages (public_id);
