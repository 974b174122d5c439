-- Campaign recipients: statuses 'skipped' and 'cancelled' (final, nothing spent)
-- and the internal 'held' (made, not yet released by its campaign's pacer).
-- SQLite cannot change a CHECK constraint in place: the table is rebuilt as its
-- manual says (https://www.sqlite.org/lang_altertable.html#otheralter), with
-- foreign keys off so that dropping the old table does not cascade to
-- message_attempts (hence run_in_transaction = false and our own transaction).
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;
CREATE TABLE messages_new (
    id                    INTEGER   PRIMARY KEY AUTOINCREMENT,
    app_id                TEXT      NOT NULL,
    openid                TEXT      NOT NULL,
    template_id           TEXT      NOT NULL,
    -- 'template' (form_id/prepay_id, a subscription of the template first) or
    -- 'subscription' (a registered subscription template: subscriptions only).
    channel               TEXT      NOT NULL DEFAULT 'template'
        CHECK (channel IN ('template', 'subscription')),
    page                  TEXT,
    -- The request's data, emphasis_keyword, miniprogram_state and lang, as JSON.
    body                  TEXT      NOT NULL,
    status                TEXT      NOT NULL
        CHECK (status IN ('queued', 'sending', 'sent', 'no_quota', 'failed', 'skipped', 'cancelled', 'held')),
    credential_id         BIGINT,
    credential_kind       TEXT,
    credential_value      TEXT,
    credential_uses_total INTEGER,
    credential_created_at TIMESTAMP,
    credentials_tried     INTEGER   NOT NULL DEFAULT 0,
    -- Transient failures with the held credential, for the backoff and its bound.
    retries               INTEGER   NOT NULL DEFAULT 0,
    -- A WeChat call is (or was, if the worker died) under way with the credential.
    in_flight             BOOLEAN   NOT NULL DEFAULT FALSE,
    -- An earlier call with the held credential may have delivered (dropped, timed out).
    ambiguous             BOOLEAN   NOT NULL DEFAULT FALSE,
    error_code            TEXT,
    wechat_errcode        INTEGER,
    error_message         TEXT,
    -- Wait for a credential to be reported until then (await_credential_s).
    await_until           TIMESTAMP,
    next_attempt_at       TIMESTAMP NOT NULL,
    lease_owner           TEXT,
    lease_until           TIMESTAMP,
    created_at            TIMESTAMP NOT NULL,
    updated_at            TIMESTAMP NOT NULL,
    finished_at           TIMESTAMP,
    credential_issued_at  TIMESTAMP,
    young_retries         INTEGER   NOT NULL DEFAULT 0,
    wakes                 INTEGER   NOT NULL DEFAULT 0,
    public_id             TEXT      NOT NULL DEFAULT '',
    wechat_msgid          TEXT,
    delivery              TEXT,
    send_at               TIMESTAMP,
    campaign_id           INTEGER
);
INSERT INTO messages_new (id, app_id, openid, template_id, channel, page, body, status, credential_id, credential_kind, credential_value, credential_uses_total, credential_created_at, credentials_tried, retries, in_flight, ambiguous, error_code, wechat_errcode, error_message, await_until, next_attempt_at, lease_owner, lease_until, created_at, updated_at, finished_at, credential_issued_at, young_retries, wakes, public_id, wechat_msgid, delivery, send_at, campaign_id)
    SELECT id, app_id, openid, template_id, channel, page, body, status, credential_id, credential_kind, credential_value, credential_uses_total, credential_created_at, credentials_tried, retries, in_flight, ambiguous, error_code, wechat_errcode, error_message, await_until, next_attempt_at, lease_owner, lease_until, created_at, updated_at, finished_at, credential_issued_at, young_retries, wakes, public_id, wechat_msgid, delivery, send_at, campaign_id FROM messages;
-- AUTOINCREMENT: ids of purged messages are never handed out again.
UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0))
    WHERE name = 'messages_new';
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;
CREATE INDEX messages_due ON messages (next_attempt_at) WHERE status IN ('queued', 'sending');
CREATE INDEX messages_user ON messages (app_id, openid, created_at);
CREATE INDEX messages_created ON messages (created_at);
CREATE UNIQUE INDEX messages_public_id ON messages (public_id);
CREATE INDEX messages_wechat_msgid ON messages (app_id, wechat_msgid) WHERE wechat_msgid IS NOT NULL;
CREATE UNIQUE INDEX messages_one_leased_per_user ON messages (app_id, openid)
    WHERE lease_owner IS NOT NULL;
CREATE INDEX messages_campaign_status ON messages (campaign_id, status, id)
    WHERE campaign_id IS NOT NULL;
CREATE INDEX messages_campaign ON messages (campaign_id, id) WHERE campaign_id IS NOT NULL;
COMMIT;
PRAGMA foreign_keys = ON;
