-- A user's quota in one call, planned once per connection.
--
-- Every pooled connection runs `plan_cache_mode = force_custom_plan` (src/db/mod.rs)
-- so that no per-user statement keeps a generic plan made while a table was empty.
-- These two reads only ever walk credentials_user_expiry and the primary key of
-- subscription_results whatever the values, and planning them again on every call
-- was most of PostgreSQL's cost of a quota read (pgbench, 64 clients: the
-- credentials read 8,133 tps custom against 15,623 tps generic). The function's own
-- setting applies to its statements only.
--
-- "Live" is the rule of `live!` in src/ledger/query.rs: uses left, not found
-- invalid, not expired (a NULL expiry never expires). The quota tests run on both
-- backends and hold the two to the same answers.
CREATE FUNCTION ledger_quota(
    p_app text, p_openid text, p_now timestamp, p_results text[], p_most bigint
) RETURNS TABLE (
    kind text, template_id text, result text, n bigint,
    uses_left integer, expires_at timestamp, pushed_at timestamp
)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        SELECT c.kind, c.template_id, NULL::text, NULL::bigint,
               c.uses_left, c.expires_at, c.pushed_at
        FROM credentials c
        WHERE c.app_id = p_app AND c.openid = p_openid
          AND c.uses_left > 0 AND NOT c.invalid
          AND (c.expires_at IS NULL OR c.expires_at > p_now);
    -- The most recent first: rows stored before a lower template cap are cut off.
    RETURN QUERY
        SELECT NULL::text, r.template_id, r.result, r.count,
               NULL::integer, NULL::timestamp, NULL::timestamp
        FROM subscription_results r
        WHERE r.app_id = p_app AND r.openid = p_openid AND r.result = ANY (p_results)
        ORDER BY r.last_at DESC
        LIMIT p_most;
END
$$;
