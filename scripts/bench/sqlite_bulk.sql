-- Bulk load for the scale scenarios (SQLite): @ROWS@ live credentials over @USERS@
-- users of app '@APP@', in one transaction: a single INSERT … SELECT from a recursive
-- CTE, indexes dropped first and rebuilt with the migration's definitions
-- (migrations/sqlite). Same data as pg_bulk.sql. Timestamps in diesel's text form.
-- bench.sh substitutes @ROWS@, @USERS@, @APP@ and runs it with the sqlite3 shell.
.bail on
.timer on
PRAGMA journal_mode = WAL;
PRAGMA synchronous = OFF;
PRAGMA cache_size = -1048576;
PRAGMA temp_store = MEMORY;
BEGIN IMMEDIATE;
DROP INDEX IF EXISTS credentials_app_value;
DROP INDEX IF EXISTS credentials_user_expiry;
DROP INDEX IF EXISTS credentials_expires_at;
DROP INDEX IF EXISTS credentials_dead;
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < @ROWS@),
     base(now_jd) AS (SELECT julianday('now'))
INSERT INTO credentials (app_id, openid, kind, value, template_id, uses_total, uses_left,
                         issued_at, expires_at, invalid, created_at, updated_at)
SELECT '@APP@', 'ob' || (n % @USERS@),
       CASE WHEN n % 10 = 0 THEN 'prepay_id' ELSE 'form_id' END,
       'bulk-' || n, NULL, 1, 1,
       strftime('%Y-%m-%d %H:%M:%f', now_jd - (n % 432000) / 86400.0),
       strftime('%Y-%m-%d %H:%M:%f', now_jd - (n % 432000) / 86400.0 + 7 - 600 / 86400.0),
       0,
       strftime('%Y-%m-%d %H:%M:%f', now_jd - (n % 432000) / 86400.0),
       strftime('%Y-%m-%d %H:%M:%f', now_jd - (n % 432000) / 86400.0)
FROM g, base;
CREATE UNIQUE INDEX credentials_app_value ON credentials (app_id, value);
CREATE INDEX credentials_user_expiry ON credentials (app_id, openid, expires_at, id);
CREATE INDEX credentials_expires_at ON credentials (expires_at);
CREATE INDEX credentials_dead ON credentials (updated_at) WHERE uses_left = 0 OR invalid;
COMMIT;
ANALYZE;
PRAGMA wal_checkpoint(TRUNCATE);
