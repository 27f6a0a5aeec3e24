//! A claimed run's lease, renewed in the background for as long as the worker has the run:
//! while it fetches the dataset, trains, stores the model and records it. Each heartbeat
//! also brings the run's cancel flag, so a cancel made through any API process stops the
//! run within one heartbeat; a heartbeat that finds the run taken from this worker (its
//! lease lapsed and it was reaped) stops the run and marks the lease lost, after which the
//! worker writes nothing more about it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::db::Db;
use crate::db::queue::{self, Lease};
use crate::ml::events::Cancel;

/// How often the lease is renewed: a third of it (two heartbeats can fail before it lapses),
/// at most every 2 s (cancels land within that).
pub(super) fn heartbeat_every(lease: Duration) -> Duration {
    (lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// The heartbeat of one claimed run; it stops when dropped.
pub(super) struct Held {
    lost: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Held {
    /// Renews `worker`'s lease on run `id` until dropped; cancels `cancel` when someone asks
    /// to cancel the run or the lease is lost.
    pub(super) fn start(
        db: Db,
        id: String,
        worker: String,
        lease: Duration,
        cancel: Cancel,
    ) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let task = tokio::spawn(async move {
            let mut beat = tokio::time::interval(heartbeat_every(lease));
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            beat.tick().await; // the first tick is now, and the claim just set the lease
            let mut renewed = tokio::time::Instant::now();
            loop {
                beat.tick().await;
                // Cut off from the database for a whole lease, the run must be presumed
                // reaped and taken by another worker.
                if renewed.elapsed() >= lease {
                    tracing::warn!(run_id = %id, "the lease could not be renewed for its whole \
                        length; presumed lost: stopping the run and writing nothing more");
                    flag.store(true, Ordering::SeqCst);
                    cancel.cancel();
                    return;
                }
                let answer = tokio::time::timeout(
                    heartbeat_every(lease),
                    queue::heartbeat(&db, &id, &worker, lease),
                );
                let Ok(answer) = answer.await else {
                    tracing::warn!(run_id = %id, "renewing the run's lease timed out");
                    continue;
                };
                if matches!(answer, Ok(Lease::Held { .. })) {
                    renewed = tokio::time::Instant::now();
                }
                match answer {
                    Ok(Lease::Held { cancel: true }) => cancel.cancel(),
                    Ok(Lease::Held { cancel: false }) => {}
                    Ok(Lease::Lost) => {
                        tracing::warn!(run_id = %id, "the run's lease was lost (it lapsed and \
                            the run was re-queued); stopping it and writing nothing more");
                        flag.store(true, Ordering::SeqCst);
                        cancel.cancel();
                        return;
                    }
                    // Keeps going: the lease outlives a couple of missed heartbeats.
                    Err(e) => {
                        tracing::warn!(run_id = %id, error = %e, "could not renew the run's lease")
                    }
                }
            }
        });
        Self { lost, task }
    }

    /// Whether the run was taken from this worker.
    pub(super) fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.task.abort();
    }
}
