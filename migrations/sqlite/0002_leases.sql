-- Leases: a claimed run names the worker that holds it and when that claim lapses (Unix
-- milliseconds, on the database's clock). The worker renews it while it trains; a run whose
-- lease lapsed goes back to the queue (jobs::recovery::reap), and `lapses` counts how many
-- times that happened (a run fails after too many).
ALTER TABLE runs ADD COLUMN worker_id TEXT;
ALTER TABLE runs ADD COLUMN lease_expires_at INTEGER;
ALTER TABLE runs ADD COLUMN lapses INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_leases ON runs (status, lease_expires_at);
