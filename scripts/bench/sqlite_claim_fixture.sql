-- Users the claim ceiling draws from: 'oc0' .. 'oc<@USERS@-1>', @PER_USER@ form_ids each.
.bail on
PRAGMA busy_timeout = 10000;
BEGIN IMMEDIATE;
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < @USERS@ * @PER_USER@),
     base(now_jd) AS (SELECT julianday('now'))
INSERT INTO credentials (app_id, openid, kind, value, template_id, uses_total, uses_left,
                         issued_at, expires_at, invalid, created_at, updated_at)
SELECT '@APP@', 'oc' || (n % @USERS@), 'form_id', 'claimfix-@TAG@-' || n, NULL, 1, 1,
       strftime('%Y-%m-%d %H:%M:%f', now_jd - (n % 86400) / 86400.0),
       strftime('%Y-%m-%d %H:%M:%f', now_jd - (n % 86400) / 86400.0 + 7 - 600 / 86400.0),
       0,
       strftime('%Y-%m-%d %H:%M:%f', now_jd - (n % 86400) / 86400.0),
       strftime('%Y-%m-%d %H:%M:%f', now_jd - (n % 86400) / 86400.0)
FROM g, base;
COMMIT;
ANALYZE;
