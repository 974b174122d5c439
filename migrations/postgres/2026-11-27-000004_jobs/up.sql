-- Background jobs that one instance at a time runs (the purge): the instance
-- holding an unexpired lease runs it; a dead holder's lease runs out.
CREATE TABLE jobs (
    name        TEXT      PRIMARY KEY,
    lease_owner TEXT,
    lease_until TIMESTAMP,
    last_run_at TIMESTAMP
);
