-- The app's subscription templates as WeChat lists them (getPrivateTemplateList),
-- refreshed at start and hourly: a template listed here is sent with subscribe-send
-- without registration, and a message's data may use only its keys.
CREATE TABLE wechat_templates (
    app_id TEXT NOT NULL,
    template_id TEXT NOT NULL,
    title TEXT NOT NULL,
    -- The template's data keys in order, space-separated: "thing1 time2".
    keys TEXT NOT NULL,
    -- 2: one-time, 3: long-term.
    kind INTEGER NOT NULL,
    fetched_at TIMESTAMP NOT NULL,
    PRIMARY KEY (app_id, template_id)
);
