//! Start-up recovery of runs a dead process left `running`: re-queued after the warm-up when
//! its checkpoint is on disk, otherwise failed as `interrupted`. Nothing else is touched.

use sqlx::SqlitePool;

use crate::db;
use crate::db::status::{RunStatus, resumes_after_warmup};
use crate::ml::events::Phase;
use crate::storage::Storage;

/// The message of a run that cannot resume.
pub const INTERRUPTED: &str = "interrupted: the server stopped while this run was training and it had no finished phase to resume from";

/// Returns (re-queued, failed).
pub async fn recover(pool: &SqlitePool, storage: &Storage) -> Result<(usize, usize), sqlx::Error> {
    let (mut requeued, mut failed) = (0, 0);
    for run in db::runs::running(pool).await? {
        if resumes_after_warmup(&run.phase_states(), &storage.warmup_checkpoint(&run.id)) {
            db::runs::requeue(pool, &run.id, Phase::Finetune).await?;
            tracing::warn!(run_id = %run.id, "run interrupted by a restart: re-queued after its warm-up");
            requeued += 1;
        } else {
            db::runs::finish(pool, &run.id, RunStatus::Failed, Some(INTERRUPTED)).await?;
            tracing::warn!(run_id = %run.id, "run interrupted by a restart: marked failed");
            failed += 1;
        }
    }
    Ok((requeued, failed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::status::PhaseStatus;
    use crate::ingest::Ingested;
    use crate::ml::config::TrainConfig;
    use crate::ml::events::PhaseSummary;

    #[sqlx::test]
    async fn interrupted_runs_resume_after_the_warmup_or_fail(pool: SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::new(dir.path());
        storage.prepare().unwrap();
        let ingested = Ingested {
            classes: vec!["a".into(), "b".into()],
            images: Vec::new(),
            skipped: Vec::new(),
            warnings: Vec::new(),
            dir: dir.path().into(),
        };
        db::datasets::insert(&pool, "d", "d", &ingested)
            .await
            .unwrap();
        let config = TrainConfig::default();
        db::runs::create(&pool, "early", "d", &config)
            .await
            .unwrap();
        db::runs::create(&pool, "late", "d", &config).await.unwrap();
        db::runs::create(&pool, "waiting", "d", &config)
            .await
            .unwrap();
        let first = db::runs::claim_next(&pool).await.unwrap().unwrap();
        let second = db::runs::claim_next(&pool).await.unwrap().unwrap();
        assert_eq!(
            (first.id.as_str(), second.id.as_str()),
            ("early", "late"),
            "oldest first"
        );
        let summary = PhaseSummary {
            phase: Phase::Warmup,
            epochs_run: 3,
            best_epoch: 2,
            best_val_loss: 0.1,
            best_val_accuracy: 0.9,
            seconds: 1.0,
        };
        db::epochs::phase_done(&pool, "late", &summary)
            .await
            .unwrap();
        let checkpoint = storage.warmup_checkpoint("late");
        std::fs::create_dir_all(checkpoint.parent().unwrap()).unwrap();
        std::fs::write(&checkpoint, b"head").unwrap();

        assert_eq!(recover(&pool, &storage).await.unwrap(), (1, 1));
        let early = db::runs::get(&pool, "early").await.unwrap().unwrap();
        assert_eq!(early.status, RunStatus::Failed);
        assert_eq!(early.error.as_deref(), Some(INTERRUPTED));
        let late = db::runs::get(&pool, "late").await.unwrap().unwrap();
        assert_eq!(late.status, RunStatus::Queued);
        assert_eq!(
            late.phase_states(),
            vec![
                (Phase::Warmup, PhaseStatus::Succeeded),
                (Phase::Finetune, PhaseStatus::Pending),
                (Phase::Baseline, PhaseStatus::Skipped)
            ]
        );
        let waiting = db::runs::get(&pool, "waiting").await.unwrap().unwrap();
        assert_eq!(
            waiting.status,
            RunStatus::Queued,
            "queued runs are untouched"
        );
    }
}
