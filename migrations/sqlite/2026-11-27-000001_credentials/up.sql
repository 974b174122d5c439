-- Same shape as the PostgreSQL schema; timestamps are diesel's UTC text
-- ('YYYY-MM-DD HH:MM:SS.f'), which sorts and compares correctly as text.
-- AUTOINCREMENT: a purged id is never handed out again (messages refer to ids).
CREATE TABLE credentials (
    id             INTEGER   PRIMARY KEY AUTOINCREMENT,
    app_id         TEXT      NOT NULL,
    openid         TEXT      NOT NULL,
    kind           TEXT      NOT NULL CHECK (kind IN ('form_id', 'prepay_id', 'subscription')),
    value          TEXT,
    template_id    TEXT,
    uses_total     INTEGER   NOT NULL CHECK (uses_total > 0),
    uses_left      INTEGER   NOT NULL CHECK (uses_left >= 0 AND uses_left <= uses_total),
    issued_at      TIMESTAMP NOT NULL,
    expires_at     TIMESTAMP,
    invalid        BOOLEAN   NOT NULL DEFAULT FALSE,
    invalid_reason TEXT,
    created_at     TIMESTAMP NOT NULL,
    updated_at     TIMESTAMP NOT NULL
);

CREATE UNIQUE INDEX credentials_app_value ON credentials (app_id, value);
CREATE INDEX credentials_user_expiry ON credentials (app_id, openid, expires_at, id);
CREATE INDEX credentials_expires_at ON credentials (expires_at);
CREATE INDEX credentials_dead ON credentials (updated_at) WHERE uses_left = 0 OR invalid;
