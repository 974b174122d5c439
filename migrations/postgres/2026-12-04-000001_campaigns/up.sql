-- POST /v1/campaigns: "notify these users". A campaign row holds the request (the
-- content every recipient gets, the audience) and the runner's progress; each
-- recipient becomes an ordinary message (messages.campaign_id) in the background.
CREATE TABLE campaigns (
    id              BIGSERIAL PRIMARY KEY,
    -- The id in the API: "cmp_" and 128 random bits in hex.
    public_id       TEXT      NOT NULL,
    app_id          TEXT      NOT NULL,
    template_id     TEXT      NOT NULL,
    -- 'template' or 'subscription', decided once at creation.
    channel         TEXT      NOT NULL,
    page            TEXT,
    -- The outbox Content (data, miniprogram_state, lang) as JSON.
    body            TEXT      NOT NULL,
    -- "holding": every user holding a usable credential when the campaign starts;
    -- otherwise the explicit audience: its distinct openids in order, one per line
    -- (an openid has no white space), cleared once every recipient is made.
    holding         BOOLEAN   NOT NULL DEFAULT FALSE,
    audience        TEXT,
    -- scheduled | running | paused | done | cancelled
    status          TEXT      NOT NULL,
    rate_per_s      INTEGER,
    send_at         TIMESTAMP,
    -- Recipients: the audience's size, or for "holding" those found so far.
    targeted        BIGINT    NOT NULL DEFAULT 0,
    -- Recipients made into messages so far (an index into audience), and for
    -- "holding" the last openid taken; materialised when audience_done.
    materialised    BIGINT    NOT NULL DEFAULT 0,
    holders_after   TEXT,
    audience_done   BOOLEAN   NOT NULL DEFAULT FALSE,
    -- Pacing: recipients released to the sender so far; the allowance grows by
    -- rate_per_s from (pace_from, pace_base); paced_at is the runner's last tick.
    released        BIGINT    NOT NULL DEFAULT 0,
    pace_from       TIMESTAMP,
    pace_base       BIGINT    NOT NULL DEFAULT 0,
    paced_at        TIMESTAMP,
    -- The instance running it now (a lease), so exactly one does.
    runner          TEXT,
    runner_until    TIMESTAMP,
    -- Idempotency-Key (scoped to the API key's name) and the request's hash.
    idem_scope      TEXT,
    idem_key        TEXT,
    request_hash    TEXT,
    -- The counts (JSON) when it finished: its messages may be purged later.
    final_counts    TEXT,
    created_at      TIMESTAMP NOT NULL,
    updated_at      TIMESTAMP NOT NULL,
    started_at      TIMESTAMP,
    finished_at     TIMESTAMP
);
CREATE UNIQUE INDEX campaigns_public_id ON campaigns (public_id);
CREATE UNIQUE INDEX campaigns_idempotency ON campaigns (idem_scope, idem_key)
    WHERE idem_key IS NOT NULL;
-- The runners' look for work: campaigns not finished.
CREATE INDEX campaigns_active ON campaigns (id) WHERE finished_at IS NULL;

-- A campaign's recipients. Internal status 'held': made, not yet released by the
-- campaign's pacer (shown as queued; outside messages_due, so the sender never
-- scans it).
ALTER TABLE messages ADD COLUMN campaign_id BIGINT;
CREATE INDEX messages_campaign_status ON messages (campaign_id, status, id)
    WHERE campaign_id IS NOT NULL;
CREATE INDEX messages_campaign ON messages (campaign_id, id) WHERE campaign_id IS NOT NULL;
