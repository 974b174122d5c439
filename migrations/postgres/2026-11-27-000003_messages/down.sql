DROP TABLE app_pauses;
DROP TABLE idempotency_keys;
DROP TABLE message_attempts;
DROP TABLE messages;
