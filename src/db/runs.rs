//! `runs` (the queue), `run_phases`, `epoch_metrics` and `evaluations`.

use serde::Serialize;
use sqlx::{FromRow, SqliteConnection, SqlitePool};
use utoipa::ToSchema;

use super::json;
use super::status::{PhaseStatus, RunStatus};
use crate::ml::config::{TrainConfig, When};
use crate::ml::events::{Phase, Stage};

/// One phase of a run.
#[derive(Debug, Clone, FromRow, Serialize, ToSchema)]
pub struct RunPhase {
    #[serde(skip)]
    pub run_id: String,
    pub phase: Phase,
    pub status: PhaseStatus,
    pub epochs_planned: i64,
    pub epochs_run: i64,
    pub best_epoch: Option<i64>,
    pub best_val_loss: Option<f64>,
    pub best_val_accuracy: Option<f64>,
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone, FromRow)]
struct RunRow {
    id: String,
    dataset_id: Option<String>,
    status: RunStatus,
    config: String,
    phase: Option<String>,
    stage: Option<String>,
    step: Option<i64>,
    steps_total: Option<i64>,
    epoch: Option<i64>,
    epochs_total: Option<i64>,
    percent: f64,
    eta_seconds: Option<f64>,
    error: Option<String>,
    cancel_requested: bool,
    attempts: i64,
    started_at: Option<String>,
    finished_at: Option<String>,
    created_at: String,
    updated_at: String,
    /// Its model still exists (a model can be deleted; the run's record stays).
    has_model: bool,
}

/// A run row and whether its model exists.
const RUN_COLUMNS: &str =
    "runs.*, EXISTS (SELECT 1 FROM models m WHERE m.id = runs.id) AS has_model";

/// A training run as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Run {
    pub id: String,
    /// `None` once the dataset has been deleted.
    pub dataset_id: Option<String>,
    pub status: RunStatus,
    pub config: TrainConfig,
    /// The phase running now (`warmup`, `finetune`, `baseline`), or the stage before them
    /// (`frozen_pass`).
    #[schema(value_type = Option<String>)]
    pub phase: Option<Stage>,
    /// Steps done and planned in the current stage.
    pub step: Option<i64>,
    pub steps_total: Option<i64>,
    /// Epoch of the current phase (1-based) and the most it may run.
    pub epoch: Option<i64>,
    pub epochs_total: Option<i64>,
    /// Estimated share of the whole run that is done, 0–100.
    pub percent: f64,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
    /// Best validation accuracy of the model so far (warm-up or fine-tune).
    pub best_val_accuracy: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub error: Option<String>,
    pub cancel_requested: bool,
    /// How many times a worker has started it (more than 1 after a resumed restart).
    pub attempts: i64,
    pub phases: Vec<RunPhase>,
    /// The model this run produced, once it succeeded (and until the model is deleted).
    pub model_id: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl Run {
    /// Each phase with its status, as the resume rule reads them.
    pub fn phase_states(&self) -> Vec<(Phase, PhaseStatus)> {
        self.phases.iter().map(|p| (p.phase, p.status)).collect()
    }
}

impl RunRow {
    fn into_run(self, phases: Vec<RunPhase>) -> Result<Run, sqlx::Error> {
        let best = phases
            .iter()
            .filter(|p| p.phase != Phase::Baseline && p.best_val_accuracy.is_some())
            .max_by(|a, b| {
                a.best_val_accuracy
                    .partial_cmp(&b.best_val_accuracy)
                    .unwrap()
            });
        Ok(Run {
            model_id: self.has_model.then(|| self.id.clone()),
            best_val_accuracy: best.and_then(|p| p.best_val_accuracy),
            best_val_loss: best.and_then(|p| p.best_val_loss),
            config: json(&self.config)?,
            id: self.id,
            dataset_id: self.dataset_id,
            status: self.status,
            phase: self
                .phase
                .or(self.stage)
                .map(|s| s.parse())
                .transpose()
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            step: self.step,
            steps_total: self.steps_total,
            epoch: self.epoch,
            epochs_total: self.epochs_total,
            percent: self.percent,
            eta_seconds: self.eta_seconds,
            error: self.error,
            cancel_requested: self.cancel_requested,
            attempts: self.attempts,
            phases,
            started_at: self.started_at,
            finished_at: self.finished_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// The phases a config plans (in running order), with their epoch budgets.
pub fn planned_phases(config: &TrainConfig) -> Vec<(Phase, bool, usize)> {
    Phase::ALL
        .into_iter()
        .map(|phase| match phase {
            Phase::Warmup => (phase, config.warmup.enabled, 1),
            Phase::Finetune => (
                phase,
                config.finetune.enabled != When::Off,
                config.finetune.epochs,
            ),
            Phase::Baseline => (phase, config.baseline.enabled, config.baseline.epochs),
        })
        .collect()
}

/// A phase's place in the run, as stored in `run_phases.position`.
fn position(phase: Phase) -> i64 {
    Phase::ALL.iter().position(|p| *p == phase).expect("listed") as i64
}

/// Queues a new run.
pub async fn create(
    pool: &SqlitePool,
    id: &str,
    dataset_id: &str,
    config: &TrainConfig,
) -> Result<Run, sqlx::Error> {
    create_bounded(pool, id, dataset_id, config, usize::MAX)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

/// Queues a new run unless `max_queued` runs already wait (`None` then); the count and the
/// insert share one write transaction, so racing requests cannot both slip in.
pub async fn create_bounded(
    pool: &SqlitePool,
    id: &str,
    dataset_id: &str,
    config: &TrainConfig,
    max_queued: usize,
) -> Result<Option<Run>, sqlx::Error> {
    let mut tx = super::write(pool).await?;
    let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE status = ?")
        .bind(RunStatus::Queued)
        .fetch_one(&mut *tx)
        .await?;
    if queued >= i64::try_from(max_queued).unwrap_or(i64::MAX) {
        return Ok(None);
    }
    sqlx::query("INSERT INTO runs (id, dataset_id, status, config) VALUES (?, ?, ?, ?)")
        .bind(id)
        .bind(dataset_id)
        .bind(RunStatus::Queued)
        .bind(serde_json::to_string(config).expect("serialisable"))
        .execute(&mut *tx)
        .await?;
    for (phase, enabled, epochs) in planned_phases(config) {
        sqlx::query(
            "INSERT INTO run_phases (run_id, phase, position, status, epochs_planned) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(phase)
        .bind(position(phase))
        .bind(if enabled {
            PhaseStatus::Pending
        } else {
            PhaseStatus::Skipped
        })
        .bind(epochs as i64)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    get(pool, id).await
}

/// The phases of the runs `ids`.
async fn phases_of_runs(pool: &SqlitePool, ids: &[&str]) -> Result<Vec<RunPhase>, sqlx::Error> {
    sqlx::query_as(
        "SELECT run_id, phase, status, epochs_planned, epochs_run, best_epoch, best_val_loss, \
         best_val_accuracy, seconds FROM run_phases \
         WHERE run_id IN (SELECT value FROM json_each(?1)) ORDER BY run_id, position",
    )
    .bind(serde_json::to_string(ids).expect("serialisable"))
    .fetch_all(pool)
    .await
}

pub async fn get(pool: &SqlitePool, id: &str) -> Result<Option<Run>, sqlx::Error> {
    let Some(row) =
        sqlx::query_as::<_, RunRow>(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
            .bind(id)
            .fetch_optional(pool)
            .await?
    else {
        return Ok(None);
    };
    let phases = phases_of_runs(pool, &[id]).await?;
    row.into_run(phases).map(Some)
}

/// Runs, newest first, optionally only those of one status.
pub async fn list(
    pool: &SqlitePool,
    status: Option<RunStatus>,
    page: &super::Page,
) -> Result<Vec<Run>, sqlx::Error> {
    let rows = sqlx::query_as::<_, RunRow>(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE (?1 IS NULL OR status = ?1) AND {}",
        super::Page::clause(2)
    ))
    .bind(status)
    .bind(page.time())
    .bind(page.id())
    .bind(page.limit())
    .fetch_all(pool)
    .await?;
    // The page's phases in one query, grouped by run (ordered by run and position).
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let mut phases: std::collections::HashMap<String, Vec<RunPhase>> =
        std::collections::HashMap::new();
    for p in phases_of_runs(pool, &ids).await? {
        phases.entry(p.run_id.clone()).or_default().push(p);
    }
    rows.into_iter()
        .map(|row| {
            let mine = phases.remove(&row.id).unwrap_or_default();
            row.into_run(mine)
        })
        .collect()
}

/// A run the worker has claimed.
#[derive(Debug, Clone, FromRow)]
pub struct Claimed {
    pub id: String,
    pub dataset_id: Option<String>,
    pub config: String,
    pub attempts: i64,
}

/// Atomically moves the oldest queued run to `running` and returns it.
pub async fn claim_next(pool: &SqlitePool) -> Result<Option<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE runs SET status = ?1, attempts = attempts + 1, error = NULL, \
         started_at = COALESCE(started_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')), \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE id = (SELECT id FROM runs WHERE status = ?2 ORDER BY created_at, id LIMIT 1) \
         RETURNING id, dataset_id, config, attempts",
    )
    .bind(RunStatus::Running)
    .bind(RunStatus::Queued)
    .fetch_optional(pool)
    .await
}

/// Ends a run with `status` (one that [`RunStatus::is_over`]). Phases that never finished
/// end with it too, as [`PhaseStatus::on_run_end`] says.
pub async fn finish(
    pool: &SqlitePool,
    id: &str,
    status: RunStatus,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    let mut tx = super::write(pool).await?;
    finish_in(&mut tx, id, status, error).await?;
    tx.commit().await
}

/// [`finish`] inside a caller's transaction.
pub async fn finish_in(
    conn: &mut SqliteConnection,
    id: &str,
    status: RunStatus,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    debug_assert!(status.is_over(), "{status} does not end a run");
    sqlx::query(
        // sqlx numbers plain `?` apart from `?N`, so a statement uses one style only.
        "UPDATE runs SET status = ?1, error = ?2, eta_seconds = NULL, \
         percent = CASE WHEN ?1 = ?4 THEN 100 ELSE percent END, \
         finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?3",
    )
    .bind(status)
    .bind(error)
    .bind(id)
    .bind(RunStatus::Succeeded)
    .execute(&mut *conn)
    .await?;
    let (running_to, pending_to) = PhaseStatus::on_run_end(status);
    sqlx::query(
        "UPDATE run_phases SET status = CASE status WHEN ?3 THEN ?1 ELSE ?2 END, \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE run_id = ?5 AND status IN (?3, ?4)",
    )
    .bind(running_to)
    .bind(pending_to)
    .bind(PhaseStatus::Running)
    .bind(PhaseStatus::Pending)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Puts a run back in the queue, keeping the phases before `from_phase` (their metrics and
/// status) and forgetting everything from it on.
pub async fn requeue(pool: &SqlitePool, id: &str, from_phase: Phase) -> Result<(), sqlx::Error> {
    let mut tx = super::write(pool).await?;
    sqlx::query(
        "UPDATE runs SET status = ?, phase = NULL, stage = NULL, step = NULL, \
         steps_total = NULL, epoch = NULL, epochs_total = NULL, eta_seconds = NULL, \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
    )
    .bind(RunStatus::Queued)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    reset_phases_in(&mut tx, id, from_phase).await?;
    tx.commit().await
}

/// Forgets the phases from `from_phase` on (status back to pending, their epochs deleted),
/// before a run starts them again.
pub async fn reset_phases_from(
    pool: &SqlitePool,
    id: &str,
    from_phase: Phase,
) -> Result<(), sqlx::Error> {
    let mut tx = super::write(pool).await?;
    reset_phases_in(&mut tx, id, from_phase).await?;
    tx.commit().await
}

async fn reset_phases_in(
    conn: &mut SqliteConnection,
    id: &str,
    from_phase: Phase,
) -> Result<(), sqlx::Error> {
    let position = position(from_phase);
    sqlx::query(
        "DELETE FROM epoch_metrics WHERE run_id = ?1 AND phase IN \
         (SELECT phase FROM run_phases WHERE run_id = ?1 AND position >= ?2)",
    )
    .bind(id)
    .bind(position)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE run_phases SET status = ?1, epochs_run = 0, best_epoch = NULL, \
         best_val_loss = NULL, best_val_accuracy = NULL, seconds = NULL, \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE run_id = ?2 AND position >= ?3 AND status != ?4",
    )
    .bind(PhaseStatus::Pending)
    .bind(id)
    .bind(position)
    .bind(PhaseStatus::Skipped)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What a cancel request did.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    NotFound,
    /// It was queued and is now cancelled.
    Cancelled,
    /// It is running; the worker stops it at the next step boundary.
    Requested,
    /// It had already ended with this status.
    AlreadyEnded(RunStatus),
}

pub async fn cancel(pool: &SqlitePool, id: &str) -> Result<CancelOutcome, sqlx::Error> {
    // One transaction: a worker cannot claim the run between the check and the end.
    let mut tx = super::write(pool).await?;
    let queued = sqlx::query("UPDATE runs SET cancel_requested = 1 WHERE id = ? AND status = ?")
        .bind(id)
        .bind(RunStatus::Queued)
        .execute(&mut *tx)
        .await?;
    if queued.rows_affected() == 1 {
        finish_in(&mut tx, id, RunStatus::Cancelled, None).await?;
        tx.commit().await?;
        return Ok(CancelOutcome::Cancelled);
    }
    tx.commit().await?;
    let running = sqlx::query(
        "UPDATE runs SET cancel_requested = 1, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE id = ? AND status = ?",
    )
    .bind(id)
    .bind(RunStatus::Running)
    .execute(pool)
    .await?;
    if running.rows_affected() == 1 {
        return Ok(CancelOutcome::Requested);
    }
    let status: Option<RunStatus> = sqlx::query_scalar("SELECT status FROM runs WHERE id = ?")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(status.map_or(CancelOutcome::NotFound, CancelOutcome::AlreadyEnded))
}

/// Whether someone asked to cancel the run.
pub async fn cancel_requested(pool: &SqlitePool, id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT cancel_requested FROM runs WHERE id = ?")
        .bind(id)
        .fetch_one(pool)
        .await
}

/// Runs left `running` (by a process that died), with their phases.
pub async fn running(pool: &SqlitePool) -> Result<Vec<Run>, sqlx::Error> {
    list(pool, Some(RunStatus::Running), &super::Page::ALL).await
}

/// How many runs are in each status (statuses with none are left out).
pub async fn count_by_status(pool: &SqlitePool) -> Result<Vec<(RunStatus, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT status, COUNT(*) FROM runs GROUP BY status")
        .fetch_all(pool)
        .await
}
