DROP INDEX messages_campaign;
DROP INDEX messages_campaign_status;
ALTER TABLE messages DROP COLUMN campaign_id;
DROP INDEX campaigns_active;
DROP INDEX campaigns_idempotency;
DROP INDEX campaigns_public_id;
DROP TABLE campaigns;
