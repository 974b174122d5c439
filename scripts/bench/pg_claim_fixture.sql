-- Users the claim ceiling draws from: 'oc0' .. 'oc<users-1>', :per_user form_ids each
-- (live for days). psql -v users=2000 -v per_user=200 -v app=wxbench -f pg_claim_fixture.sql
\set ON_ERROR_STOP on
INSERT INTO credentials (app_id, openid, kind, value, template_id, uses_total, uses_left,
                         issued_at, expires_at, invalid, created_at, updated_at)
SELECT :'app', 'oc' || (g % :users), 'form_id', 'claimfix-' || :'tag' || '-' || g, NULL, 1, 1,
       t, t + interval '7 days' - interval '600 seconds', false, t, t
FROM generate_series(1, :users * :per_user) AS g,
     LATERAL (SELECT (now() AT TIME ZONE 'UTC') - (g % 86400) * interval '1 second' AS t) AS ts;
ANALYZE credentials;
