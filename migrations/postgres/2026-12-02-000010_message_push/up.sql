-- WeChat's message push (issue 12).
-- A subscription grant is counted once whether the mini-program reported the accept
-- (reported_at), WeChat pushed it (pushed_at), or both within 120 s (the merge rule).
-- Rows from before this column: client reports.
ALTER TABLE credentials ADD COLUMN reported_at TIMESTAMP;
ALTER TABLE credentials ADD COLUMN pushed_at TIMESTAMP;
UPDATE credentials SET reported_at = created_at WHERE kind = 'subscription';

-- The msgid subscribe/send returned, and the sent event WeChat pushed for it, as
-- JSON {"status": "delivered"|"refused"|"failed", "error_status", "at"} (one
-- column: diesel's table! stops at 32).
ALTER TABLE messages ADD COLUMN wechat_msgid TEXT;
ALTER TABLE messages ADD COLUMN delivery TEXT;
CREATE INDEX messages_wechat_msgid ON messages (app_id, wechat_msgid) WHERE wechat_msgid IS NOT NULL;

-- Pushes already applied: WeChat retries a push it got no answer to, and each is
-- applied once. identity: `msg:<MsgId>` or `evt:<FromUserName>:<CreateTime>:<Event>`.
CREATE TABLE push_receipts (
    app_id      TEXT      NOT NULL,
    identity    TEXT      NOT NULL,
    received_at TIMESTAMP NOT NULL,
    PRIMARY KEY (app_id, identity)
);
CREATE INDEX push_receipts_received_at ON push_receipts (received_at);

-- Sent events that named no message yet: the push can overtake the sender's
-- settlement of the very send it reports. Settling that send takes its event.
CREATE TABLE unmatched_sent_events (
    app_id      TEXT      NOT NULL,
    msgid       TEXT      NOT NULL,
    openid      TEXT      NOT NULL,
    template_id TEXT      NOT NULL,
    delivery    TEXT      NOT NULL,
    received_at TIMESTAMP NOT NULL,
    PRIMARY KEY (app_id, msgid)
);
CREATE INDEX unmatched_sent_events_user ON unmatched_sent_events (app_id, openid, template_id, received_at);
CREATE INDEX unmatched_sent_events_received_at ON unmatched_sent_events (received_at);
