-- Leases: a claimed run names the worker that holds it and when that claim lapses (Unix
-- milliseconds). The worker renews it while it trains; a run whose lease lapsed goes back
-- to the queue (db::runs::reap_expired).
ALTER TABLE runs ADD COLUMN worker_id TEXT;
ALTER TABLE runs ADD COLUMN lease_expires_at INTEGER;
CREATE INDEX runs_leases ON runs (status, lease_expires_at);
