-- Webhooks: where the backend hears about outcomes (docs/API.md, "Webhooks").
CREATE TABLE webhooks (
    name       TEXT      PRIMARY KEY,
    url        TEXT      NOT NULL,
    -- The event types it receives, comma-separated.
    events     TEXT      NOT NULL,
    -- The apps whose events it receives, comma-separated; NULL: every app.
    app_ids    TEXT,
    -- HMAC key of Ledger-Signature. Never returned but by the PUT that set it.
    secret     TEXT      NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);

-- The durable outbound HTTP queue: one row per (event, receiver), delivered at
-- least once by whichever instance leases it. kind 'event' is a signed webhook
-- event POSTed to its webhook's URL; other kinds (e.g. a raw push body forwarded
-- to a fixed URL) carry their own url and content type and no signature.
CREATE TABLE webhook_deliveries (
    id              INTEGER   PRIMARY KEY AUTOINCREMENT,
    kind            TEXT      NOT NULL DEFAULT 'event' CHECK (kind IN ('event', 'forward')),
    -- kind 'event': the webhook it goes to (its url and secret are read at delivery).
    webhook         TEXT      REFERENCES webhooks (name) ON DELETE CASCADE,
    -- kind 'forward': where it goes.
    url             TEXT,
    event_id        TEXT,
    event_type      TEXT,
    app_id          TEXT      NOT NULL,
    content_type    TEXT      NOT NULL,
    -- The exact bytes POSTed (and signed).
    body            TEXT      NOT NULL,
    status          TEXT      NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER   NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TIMESTAMP NOT NULL,
    -- Retries go on for LEDGER_WEBHOOK_RETRY_WINDOW_S (24 h) from here: when it
    -- was queued, or retried by hand.
    retry_from      TIMESTAMP NOT NULL,
    lease_owner     TEXT,
    lease_until     TIMESTAMP,
    created_at      TIMESTAMP NOT NULL,
    updated_at      TIMESTAMP NOT NULL,
    delivered_at    TIMESTAMP,
    CHECK ((kind = 'event' AND webhook IS NOT NULL) OR (kind <> 'event' AND url IS NOT NULL))
);
-- Work to pick: pending deliveries by due time.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
-- A webhook's deliveries, newest first (admin listing).
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook, status, id);
