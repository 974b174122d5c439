-- One row per credential: one right to message one user of one app.
-- Times are UTC (timestamp without time zone).
CREATE TABLE credentials (
    id             BIGSERIAL PRIMARY KEY,
    app_id         TEXT      NOT NULL,
    openid         TEXT      NOT NULL,
    kind           TEXT      NOT NULL CHECK (kind IN ('form_id', 'prepay_id', 'subscription')),
    -- NULL for subscriptions: they have no value, only a template.
    value          TEXT,
    template_id    TEXT,
    uses_total     INTEGER   NOT NULL CHECK (uses_total > 0),
    uses_left      INTEGER   NOT NULL CHECK (uses_left >= 0 AND uses_left <= uses_total),
    issued_at      TIMESTAMP NOT NULL,
    -- When the ledger stops using it (WeChat's 7 days minus the safety margin);
    -- NULL: never (subscriptions).
    expires_at     TIMESTAMP,
    invalid        BOOLEAN   NOT NULL DEFAULT FALSE,
    invalid_reason TEXT,
    created_at     TIMESTAMP NOT NULL,
    -- Last change of uses_left or invalid: purge keeps dead rows this long past it.
    updated_at     TIMESTAMP NOT NULL
);

-- "Is this value already known for this app" (and duplicates are refused by it).
CREATE UNIQUE INDEX credentials_app_value ON credentials (app_id, value);
-- "Live credentials of this user, soonest expiry first": every per-user query
-- (claim, quota, cap) starts with (app_id, openid).
CREATE INDEX credentials_user_expiry ON credentials (app_id, openid, expires_at, id);
-- Purge: expired rows, and used-up or invalid rows past their retention.
CREATE INDEX credentials_expires_at ON credentials (expires_at);
CREATE INDEX credentials_dead ON credentials (updated_at) WHERE uses_left = 0 OR invalid;
