-- The plain insert ceiling: one credential row per transaction, the plainest durable
-- write the service's ingest can be held against (autocommit, one statement,
-- ON CONFLICT DO NOTHING on the unique (app_id, value) index, every index of the
-- table maintained). pgbench -M prepared turns :vars into bind parameters.
-- Variables: -D app=… -D prefix=… -D users=N.
\set u random(0, :users - 1)
\set v random(1, 1000000000000000)
INSERT INTO credentials (app_id, openid, kind, value, uses_total, uses_left, issued_at, expires_at, created_at, updated_at) VALUES (:app, (:prefix::text || :u::text), 'form_id', 'pgp-' || :client_id::text || '-' || :v::text, 1, 1, localtimestamp, localtimestamp + interval '7 days' - interval '600 seconds', localtimestamp, localtimestamp) ON CONFLICT DO NOTHING;
