DROP TABLE unmatched_sent_events;
DROP TABLE push_receipts;
DROP INDEX messages_wechat_msgid;
ALTER TABLE messages DROP COLUMN delivery;
ALTER TABLE messages DROP COLUMN wechat_msgid;
ALTER TABLE credentials DROP COLUMN pushed_at;
ALTER TABLE credentials DROP COLUMN reported_at;
