DROP INDEX messages_public_id;
ALTER TABLE messages DROP COLUMN public_id;
