-- The plain claim ceiling: one claim statement per transaction, as the service
-- issues it (src/ledger/claim.rs, the SOONEST picker with FOR UPDATE SKIP LOCKED),
-- autocommit; on PostgreSQL the service's own claim is this same statement. Variables: -D app=… -D prefix=… -D users=N
-- (users that hold credentials: the claim fixture, pg_claim_fixture.sql).
\set u random(0, :users - 1)
UPDATE credentials SET uses_left = uses_left - 1, updated_at = localtimestamp WHERE id = (SELECT id FROM credentials WHERE app_id = :app AND openid = (:prefix::text || :u::text) AND kind IN ('form_id', 'prepay_id') AND uses_left > 0 AND NOT invalid AND expires_at > localtimestamp ORDER BY expires_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) AND uses_left > 0 RETURNING *;
