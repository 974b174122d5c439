-- The id a message has in the API: random ("msg_" and 32 hex digits), so one app's
-- key cannot count another app's messages from its own ids, nor guess them.
ALTER TABLE messages ADD COLUMN public_id TEXT;
UPDATE messages SET public_id = 'msg_' || replace(gen_random_uuid()::text, '-', '');
ALTER TABLE messages ALTER COLUMN public_id SET NOT NULL;
CREATE UNIQUE INDEX messages_public_id ON messages (public_id);
