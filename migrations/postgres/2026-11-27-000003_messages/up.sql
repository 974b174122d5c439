-- The outbox: "notify user X" requests, worked off by sender workers on every
-- instance. A message holds at most one credential use at a time (credential_*),
-- claimed in the same transaction that records it here, so a crash never loses
-- track of a spent use.
CREATE TABLE messages (
    id                    BIGSERIAL PRIMARY KEY,
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
        CHECK (status IN ('queued', 'sending', 'sent', 'no_quota', 'failed')),
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
    finished_at           TIMESTAMP
);

-- Work to pick: unfinished messages by due time.
CREATE INDEX messages_due ON messages (next_attempt_at) WHERE status IN ('queued', 'sending');
-- A user's messages (admin page; waking those waiting for a credential).
CREATE INDEX messages_user ON messages (app_id, openid, created_at);
-- Stats over the last 24 h and the purge.
CREATE INDEX messages_created ON messages (created_at);

CREATE TABLE message_attempts (
    id             BIGSERIAL PRIMARY KEY,
    message_id     BIGINT    NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    at             TIMESTAMP NOT NULL,
    credential_id  BIGINT,
    wechat_errcode INTEGER,
    outcome        TEXT      NOT NULL
);
CREATE INDEX message_attempts_message ON message_attempts (message_id, id);

-- Idempotency-Key of POST /v1/messages, per API key; kept at least 24 h (the
-- purge keeps them longer than the retention, never shorter).
CREATE TABLE idempotency_keys (
    id           BIGSERIAL PRIMARY KEY,
    scope        TEXT      NOT NULL,
    key          TEXT      NOT NULL,
    request_hash TEXT      NOT NULL,
    message_id   BIGINT    NOT NULL,
    created_at   TIMESTAMP NOT NULL
);
CREATE UNIQUE INDEX idempotency_keys_scope_key ON idempotency_keys (scope, key);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- An app whose daily send limit (45009) is reached sends nothing until `until`.
CREATE TABLE app_pauses (
    app_id TEXT      PRIMARY KEY,
    until  TIMESTAMP NOT NULL,
    reason TEXT      NOT NULL
);
