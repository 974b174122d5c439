-- One single-form_id ingest as the service issues it (src/ledger/record.rs,
-- store_user; statements copied from the server log with log_statement=all):
-- per-user advisory lock, live count for the cap, duplicate check, insert, one
-- transaction. pgbench -M prepared turns :vars into bind parameters, as diesel does.
-- Variables: -D app=… -D prefix=… -D users=N.
\set u random(0, :users - 1)
\set v random(1, 1000000000000000)
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(:app || chr(31) || (:prefix::text || :u::text), 0));
SELECT COUNT(*) FROM "credentials" WHERE ((((("credentials"."app_id" = :app) AND ("credentials"."openid" = (:prefix::text || :u::text))) AND ("credentials"."uses_left" > 0)) AND ("credentials"."invalid" = false)) AND (("credentials"."expires_at" IS NULL) OR ("credentials"."expires_at" > localtimestamp)));
SELECT "credentials"."value" FROM "credentials" WHERE (("credentials"."app_id" = :app) AND ("credentials"."value" = ANY(ARRAY['pgb-' || :client_id::text || '-' || :v::text])));
INSERT INTO "credentials" ("app_id", "openid", "kind", "value", "template_id", "uses_total", "uses_left", "issued_at", "expires_at", "created_at", "updated_at") VALUES (:app, (:prefix::text || :u::text), 'form_id', 'pgb-' || :client_id::text || '-' || :v::text, DEFAULT, 1, 1, localtimestamp, localtimestamp + interval '7 days' - interval '600 seconds', localtimestamp, localtimestamp) ON CONFLICT DO NOTHING;
END;
