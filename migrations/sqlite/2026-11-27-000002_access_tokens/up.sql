-- One row per app: the access_token every instance (and the business's other
-- servers, through the token endpoints) shares.
CREATE TABLE access_tokens (
    app_id      TEXT      PRIMARY KEY,
    -- '' until the first fetch. WeChat asks for room for at least 512 characters.
    token       TEXT      NOT NULL DEFAULT '',
    expires_at  TIMESTAMP NOT NULL,
    fetched_at  TIMESTAMP,
    -- A refresh in progress: the instance holding an unexpired lease calls WeChat;
    -- the others wait for the row to change. A crashed holder's lease runs out.
    lease_owner TEXT,
    lease_until TIMESTAMP,
    failures    INTEGER   NOT NULL DEFAULT 0,
    last_error  TEXT
);

-- Secrets the service generates itself and every instance must share (the key
-- that signs client sessions when LEDGER_SESSION_SECRET is not set).
CREATE TABLE service_secrets (
    name       TEXT      PRIMARY KEY,
    value      TEXT      NOT NULL,
    created_at TIMESTAMP NOT NULL
);
