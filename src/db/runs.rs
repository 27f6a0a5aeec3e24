//! `runs` and `run_phases`: creating, reading and listing runs. What moves a run through
//! the queue (claims, leases, ends) is `db::queue`.

use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;

use super::status::{PhaseStatus, RunStatus};
use super::{Db, json, on_pool, on_tx};
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
    worker_id: Option<String>,
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
    /// The worker that holds (or last held) the run's lease.
    pub worker_id: Option<String>,
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
            worker_id: self.worker_id,
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
pub(super) fn position(phase: Phase) -> i64 {
    Phase::ALL.iter().position(|p| *p == phase).expect("listed") as i64
}

/// Queues a new run.
pub async fn create(
    db: &Db,
    id: &str,
    dataset_id: &str,
    config: &TrainConfig,
) -> Result<Run, sqlx::Error> {
    create_bounded(db, id, dataset_id, config, usize::MAX)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

/// Queues a new run unless `max_queued` runs already wait (`None` then); the count and the
/// insert share one write transaction, so racing requests cannot both slip in.
pub async fn create_bounded(
    db: &Db,
    id: &str,
    dataset_id: &str,
    config: &TrainConfig,
    max_queued: usize,
) -> Result<Option<Run>, sqlx::Error> {
    let mut tx = super::write(db).await?;
    let now = super::now();
    on_tx!(&mut tx, conn => {
        let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE status = $1")
            .bind(RunStatus::Queued)
            .fetch_one(&mut *conn)
            .await?;
        if queued >= i64::try_from(max_queued).unwrap_or(i64::MAX) {
            return Ok(None);
        }
        sqlx::query(
            "INSERT INTO runs (id, dataset_id, status, config, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(id)
        .bind(dataset_id)
        .bind(RunStatus::Queued)
        .bind(serde_json::to_string(config).expect("serialisable"))
        .bind(&now)
        .execute(&mut *conn)
        .await?;
        for (phase, enabled, epochs) in planned_phases(config) {
            sqlx::query(
                "INSERT INTO run_phases (run_id, phase, position, status, epochs_planned, \
                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
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
            .bind(&now)
            .execute(&mut *conn)
            .await?;
        }
    });
    tx.commit().await?;
    get(db, id).await
}

/// The phases of the runs `ids`, ordered by run and position.
async fn phases_of_runs(db: &Db, ids: &[&str]) -> Result<Vec<RunPhase>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    on_pool!(db, pool => {
        let mut query = sqlx::QueryBuilder::new(
            "SELECT run_id, phase, status, epochs_planned, epochs_run, best_epoch, \
             best_val_loss, best_val_accuracy, seconds FROM run_phases WHERE run_id IN (",
        );
        let mut list = query.separated(", ");
        for id in ids {
            list.push_bind(*id);
        }
        query.push(") ORDER BY run_id, position");
        query.build_query_as().fetch_all(pool).await
    })
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Run>, sqlx::Error> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
    let row: Option<RunRow> =
        on_pool!(db, pool => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let phases = phases_of_runs(db, &[id]).await?;
    row.into_run(phases).map(Some)
}

/// Runs, newest first, optionally only those of one status.
pub async fn list(
    db: &Db,
    status: Option<RunStatus>,
    page: &super::Page,
) -> Result<Vec<Run>, sqlx::Error> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE ($1 IS NULL OR status = $1) AND {}",
        super::Page::clause(2)
    );
    let rows: Vec<RunRow> = on_pool!(db, pool => {
        sqlx::query_as(&sql)
            .bind(status)
            .bind(page.time())
            .bind(page.id())
            .bind(page.limit())
            .fetch_all(pool)
            .await
    })?;
    // The page's phases in one query, grouped by run (ordered by run and position).
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let mut phases: std::collections::HashMap<String, Vec<RunPhase>> =
        std::collections::HashMap::new();
    for p in phases_of_runs(db, &ids).await? {
        phases.entry(p.run_id.clone()).or_default().push(p);
    }
    rows.into_iter()
        .map(|row| {
            let mine = phases.remove(&row.id).unwrap_or_default();
            row.into_run(mine)
        })
        .collect()
}

/// How many runs are in each status (statuses with none are left out).
pub async fn count_by_status(db: &Db) -> Result<Vec<(RunStatus, i64)>, sqlx::Error> {
    on_pool!(db, pool => {
        sqlx::query_as("SELECT status, COUNT(*) FROM runs GROUP BY status")
            .fetch_all(pool)
            .await
    })
}
