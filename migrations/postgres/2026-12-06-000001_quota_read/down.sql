DROP FUNCTION ledger_quota(text, text, timestamp, text[], bigint);
