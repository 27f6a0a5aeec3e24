//! Runs whose worker died: a `running` run whose lease lapsed goes back to the queue, after
//! its warm-up when that finished and its checkpoint is stored, from the start otherwise;
//! at its [`MAX_LAPSES`]th lapse it fails with a message saying so (a graceful stop, which
//! re-queues the run itself, is not a lapse). Every process reaps at start-up and then
//! every [`REAP_EVERY`] ([`spawn_reaper`]), whatever its role and however busy its workers. Every worker reaps now
//! and then, and every process at start-up; runs that live workers hold (their leases
//! renewed) are never touched, so any number of processes can share the queue.

use super::Jobs;
use crate::db::queue::{self, Guard};
use crate::db::status::{RunStatus, restart_from};
use crate::db::{self, Db};
use crate::objects::Objects;

/// How often every process looks for lapsed leases. Leases are compared on the database's
/// clock, so processes with different `--lease-seconds` agree on which have lapsed.
pub const REAP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Reaps every [`REAP_EVERY`] until `shutdown`.
pub fn spawn_reaper(
    db: Db,
    objects: Objects,
    jobs: Jobs,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REAP_EVERY) => {}
            }
            match reap(&db, &objects, &jobs).await {
                Ok((0, 0)) => {}
                Ok((requeued, failed)) => {
                    tracing::warn!(requeued, failed, "reaped runs whose worker stopped")
                }
                Err(e) => tracing::warn!(error = %e, "could not look for lapsed leases"),
            }
        }
    })
}

/// Lease lapses a run may have: at the last one it fails instead of going back to the queue.
pub const MAX_LAPSES: i64 = 3;

/// The message of a run given up after [`MAX_LAPSES`].
pub fn gave_up(lapses: i64) -> String {
    format!(
        "gave up after {lapses} attempts: each time, the worker training this run stopped \
         renewing its lease (it crashed, was killed or lost the database)"
    )
}

/// Re-queues or fails the runs whose lease lapsed, announcing each change. Returns
/// (re-queued, failed).
pub async fn reap(db: &Db, objects: &Objects, jobs: &Jobs) -> Result<(usize, usize), sqlx::Error> {
    let (mut requeued, mut failed) = (0, 0);
    for lapsed in queue::lapsed(db).await? {
        let id = lapsed.id;
        let Some(run) = db::runs::get(db, &id).await? else {
            continue;
        };
        // Guard::Lapsed: a worker that renewed the lease since the query keeps the run.
        if lapsed.lapses + 1 >= MAX_LAPSES {
            let message = gave_up(lapsed.lapses + 1);
            if queue::finish(db, &id, RunStatus::Failed, Some(&message), Guard::Lapsed).await? {
                tracing::warn!(run_id = %id, lapses = lapsed.lapses + 1, "lease lapsed again: run failed");
                jobs.publish_status(&id, RunStatus::Failed, Some(message));
                failed += 1;
            }
            continue;
        }
        // A store that cannot answer now: start over rather than leave the run stuck.
        let checkpoint = objects.has_checkpoint(&id).await.unwrap_or_else(|e| {
            tracing::warn!(run_id = %id, error = %e, "cannot tell whether a checkpoint is stored");
            false
        });
        let from = restart_from(&run.phase_states(), checkpoint);
        if queue::requeue(db, &id, from, Guard::Lapsed).await? {
            tracing::warn!(run_id = %id, worker = ?run.worker_id, resume_from = %from,
                "the run's lease lapsed (its worker stopped): re-queued");
            jobs.publish_status(&id, RunStatus::Queued, None);
            requeued += 1;
        }
    }
    Ok((requeued, failed))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::db::status::PhaseStatus;
    use crate::ingest::Ingested;
    use crate::ml::config::TrainConfig;
    use crate::ml::events::{Phase, PhaseSummary};
    use crate::storage::Storage;

    /// A database with dataset `d`, and a local data directory.
    async fn setup(pool: sqlx::SqlitePool) -> (Db, tempfile::TempDir, Storage, Objects) {
        let db = Db::from(pool);
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::new(dir.path());
        storage.prepare().unwrap();
        let objects = Objects::local(storage.clone());
        let ingested = Ingested::empty(&["a", "b"]);
        db::datasets::insert(&db, "d", "d", &ingested, None)
            .await
            .unwrap();
        (db, dir, storage, objects)
    }

    #[sqlx::test(migrations = "migrations/sqlite")]
    async fn lapsed_runs_resume_after_the_warmup_or_start_over_and_live_ones_stay(
        pool: sqlx::SqlitePool,
    ) {
        let (db, _dir, storage, objects) = setup(pool).await;
        let config = TrainConfig::default();
        for id in ["early", "late", "live", "waiting"] {
            db::runs::create(&db, id, "d", &config).await.unwrap();
        }
        let gone = Duration::ZERO;
        let first = queue::claim_next(&db, "dead", gone).await.unwrap().unwrap();
        let second = queue::claim_next(&db, "dead", gone).await.unwrap().unwrap();
        assert_eq!(
            (first.id.as_str(), second.id.as_str()),
            ("early", "late"),
            "oldest first"
        );
        let live = queue::claim_next(&db, "alive", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(live.unwrap().id, "live");
        let summary = PhaseSummary {
            phase: Phase::Warmup,
            epochs_run: 3,
            best_epoch: 2,
            best_val_loss: 0.1,
            best_val_accuracy: 0.9,
            seconds: 1.0,
        };
        db::epochs::phase_done(&db, "late", "dead", &summary)
            .await
            .unwrap();
        let checkpoint = storage.warmup_checkpoint("late");
        std::fs::create_dir_all(checkpoint.parent().unwrap()).unwrap();
        std::fs::write(&checkpoint, b"head").unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;

        assert_eq!(reap(&db, &objects, &Jobs::new()).await.unwrap(), (2, 0));
        let early = db::runs::get(&db, "early").await.unwrap().unwrap();
        assert_eq!(
            early.status,
            RunStatus::Queued,
            "no checkpoint: starts over"
        );
        assert_eq!(
            early.phase_states()[0],
            (Phase::Warmup, PhaseStatus::Pending)
        );
        let late = db::runs::get(&db, "late").await.unwrap().unwrap();
        assert_eq!(late.status, RunStatus::Queued);
        assert_eq!(
            late.phase_states(),
            vec![
                (Phase::Warmup, PhaseStatus::Succeeded),
                (Phase::Finetune, PhaseStatus::Pending),
                (Phase::Baseline, PhaseStatus::Skipped)
            ]
        );
        let live = db::runs::get(&db, "live").await.unwrap().unwrap();
        assert_eq!(
            live.status,
            RunStatus::Running,
            "a renewed lease is left alone"
        );
        assert_eq!(live.worker_id.as_deref(), Some("alive"));
        let waiting = db::runs::get(&db, "waiting").await.unwrap().unwrap();
        assert_eq!(
            waiting.status,
            RunStatus::Queued,
            "queued runs are untouched"
        );

        // The dead worker's late writes are refused now that the run is not its own.
        assert!(
            !queue::finish(&db, "early", RunStatus::Failed, None, Guard::Holder("dead"))
                .await
                .unwrap()
        );
        assert_eq!(
            queue::heartbeat(&db, "early", "dead", gone).await.unwrap(),
            queue::Lease::Lost
        );
    }

    #[sqlx::test(migrations = "migrations/sqlite")]
    async fn a_run_whose_lease_keeps_lapsing_fails_at_the_last_lapse(pool: sqlx::SqlitePool) {
        let (db, _dir, _storage, objects) = setup(pool).await;
        db::runs::create(&db, "r", "d", &TrainConfig::default())
            .await
            .unwrap();
        // A graceful stop re-queues the run without counting as a lapse.
        queue::claim_next(&db, "w", Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        let from = Phase::Warmup;
        assert!(
            queue::requeue(&db, "r", from, Guard::Holder("w"))
                .await
                .unwrap()
        );
        let jobs = Jobs::new();
        let mut events = jobs.subscribe();
        for lapse in 1..=MAX_LAPSES {
            queue::claim_next(&db, "w", Duration::ZERO)
                .await
                .unwrap()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            let (expected, status) = if lapse < MAX_LAPSES {
                ((1, 0), RunStatus::Queued)
            } else {
                ((0, 1), RunStatus::Failed)
            };
            assert_eq!(reap(&db, &objects, &jobs).await.unwrap(), expected);
            let event = events.try_recv().expect("each reap is announced");
            assert!(
                matches!(event.kind, crate::jobs::events::EventKind::Status { status: s, .. } if s == status),
                "{event:?}"
            );
        }
        let run = db::runs::get(&db, "r").await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.attempts, MAX_LAPSES + 1);
        assert_eq!(run.error, Some(gave_up(MAX_LAPSES)));
        assert!(
            queue::claim_next(&db, "w", Duration::ZERO)
                .await
                .unwrap()
                .is_none()
        );
    }
}
