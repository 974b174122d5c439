-- Every requestSubscribeMessage result a user reported, counted per template:
-- only `accept` grants a send, but a user who keeps rejecting is worth knowing.
CREATE TABLE subscription_results (
    app_id      TEXT      NOT NULL,
    openid      TEXT      NOT NULL,
    template_id TEXT      NOT NULL,
    result      TEXT      NOT NULL,
    count       BIGINT    NOT NULL,
    last_at     TIMESTAMP NOT NULL,
    PRIMARY KEY (app_id, openid, template_id, result)
);

-- Templates sent with subscribe-send (registered by an admin; LEDGER_SUBSCRIPTION_TEMPLATES
-- adds more from configuration).
CREATE TABLE subscription_templates (
    app_id      TEXT      NOT NULL,
    template_id TEXT      NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (app_id, template_id)
);
