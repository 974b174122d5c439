-- POST /v1/messages {"send_at": …}: not sent before then (the message is due from
-- then on: next_attempt_at); kept to show in the message resource.
ALTER TABLE messages ADD COLUMN send_at TIMESTAMP;
