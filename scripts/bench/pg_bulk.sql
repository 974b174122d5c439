-- Bulk load for the scale scenarios (PostgreSQL): :rows live credentials over :users
-- users of app :'app', straight into the service's schema (migrations/postgres), not
-- through HTTP. Indexes are dropped first and rebuilt afterwards with the very
-- definitions of the migration (faster than maintaining them row by row).
-- Users are 'ob0' .. 'ob<users-1>' (rows/users credentials each, 1 in 10 a prepay_id);
-- values 'bulk-<n>'; issued over the last 5 days, so every row is live for > 2 days.
-- psql -v rows=10000000 -v users=1000000 -v app=wxbench -f pg_bulk.sql
\set ON_ERROR_STOP on
\timing on
SET maintenance_work_mem = '1GB';
SET synchronous_commit = off;
DROP INDEX IF EXISTS credentials_app_value;
DROP INDEX IF EXISTS credentials_user_expiry;
DROP INDEX IF EXISTS credentials_expires_at;
DROP INDEX IF EXISTS credentials_dead;
INSERT INTO credentials (app_id, openid, kind, value, template_id, uses_total, uses_left,
                         issued_at, expires_at, invalid, created_at, updated_at)
SELECT :'app', 'ob' || (g % :users),
       CASE WHEN g % 10 = 0 THEN 'prepay_id' ELSE 'form_id' END,
       'bulk-' || g, NULL, 1, 1,
       t, t + interval '7 days' - interval '600 seconds', false, t, t
FROM generate_series(1, :rows) AS g,
     LATERAL (SELECT (now() AT TIME ZONE 'UTC') - (g % 432000) * interval '1 second' AS t) AS ts;
CREATE UNIQUE INDEX credentials_app_value ON credentials (app_id, value);
CREATE INDEX credentials_user_expiry ON credentials (app_id, openid, expires_at, id);
CREATE INDEX credentials_expires_at ON credentials (expires_at);
CREATE INDEX credentials_dead ON credentials (updated_at) WHERE uses_left = 0 OR invalid;
VACUUM ANALYZE credentials;
CHECKPOINT;
