-- Housekeeping purges subscription results nobody reported again within the
-- credential retention; this index lets each batch find them without a scan.
CREATE INDEX subscription_results_last_at ON subscription_results (last_at);
