//! What a run records as it trains: live progress, one row per epoch, each phase's best
//! epoch, and the final evaluation. Every write names the worker that trains the run and
//! lands only while that worker still holds the run's lease, so a worker that lost its run
//! cannot overwrite what the run's new holder records.

use super::status::{PhaseStatus, RunStatus};
use super::{Db, now, on_pool, on_tx};
use crate::ml::events::{EpochMetrics, Phase, PhaseSummary, Stage};

/// Live progress of a running run.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub stage: Option<Stage>,
    pub step: Option<i64>,
    pub steps_total: Option<i64>,
    pub epoch: Option<i64>,
    pub epochs_total: Option<i64>,
    pub percent: f64,
    pub eta_seconds: Option<f64>,
}

pub async fn set_progress(
    db: &Db,
    id: &str,
    worker: &str,
    p: &Progress,
) -> Result<(), sqlx::Error> {
    let time = now();
    on_pool!(db, pool => sqlx::query(
        "UPDATE runs SET phase = $1, stage = $2, step = $3, steps_total = $4, epoch = $5, \
         epochs_total = $6, percent = $7, eta_seconds = $8, updated_at = $11 \
         WHERE id = $9 AND status = $10 AND worker_id = $12",
    )
    // `phase` holds the phase; `stage` names the stage, the frozen pass included.
    .bind(p.stage.and_then(|s| match s {
        Stage::Phase(phase) => Some(phase),
        Stage::FrozenPass => None,
    }))
    .bind(p.stage.map(Stage::as_str))
    .bind(p.step)
    .bind(p.steps_total)
    .bind(p.epoch)
    .bind(p.epochs_total)
    .bind(p.percent)
    .bind(p.eta_seconds)
    .bind(id)
    .bind(RunStatus::Running)
    .bind(&time)
    .bind(worker)
    .execute(pool)
    .await
    .map(|_| ()))?;
    Ok(())
}

/// Records a finished epoch and marks its phase running.
/// The condition "run `$run` is still held by worker `$worker`", for the writes below.
fn held(run: usize, worker: usize, running: usize) -> String {
    format!(
        "EXISTS (SELECT 1 FROM runs WHERE id = ${run} AND worker_id = ${worker} \
         AND status = ${running})"
    )
}

pub async fn add_epoch(
    db: &Db,
    id: &str,
    worker: &str,
    m: &EpochMetrics,
) -> Result<(), sqlx::Error> {
    let insert = format!(
        "INSERT INTO epoch_metrics (run_id, phase, epoch, train_loss, train_accuracy, \
         val_loss, val_accuracy, learning_rate, seconds, created_at, updated_at) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10 WHERE {} \
         ON CONFLICT (run_id, phase, epoch) DO UPDATE SET \
         train_loss = excluded.train_loss, train_accuracy = excluded.train_accuracy, \
         val_loss = excluded.val_loss, val_accuracy = excluded.val_accuracy, \
         learning_rate = excluded.learning_rate, seconds = excluded.seconds, \
         updated_at = excluded.updated_at",
        held(1, 11, 12)
    );
    let update = format!(
        "UPDATE run_phases SET status = $1, epochs_run = $2, updated_at = $5 \
         WHERE run_id = $3 AND phase = $4 AND {}",
        held(3, 6, 7)
    );
    let time = now();
    let mut tx = super::write(db).await?;
    on_tx!(&mut tx, conn => {
        sqlx::query(&insert)
        .bind(id)
        .bind(m.phase)
        .bind(m.epoch as i64)
        .bind(m.train_loss)
        .bind(m.train_accuracy)
        .bind(m.val_loss)
        .bind(m.val_accuracy)
        .bind(m.learning_rate)
        .bind(m.seconds)
        .bind(&time)
        .bind(worker)
        .bind(RunStatus::Running)
        .execute(&mut *conn)
        .await?;
        sqlx::query(&update)
        .bind(PhaseStatus::Running)
        .bind(m.epoch as i64)
        .bind(id)
        .bind(m.phase)
        .bind(&time)
        .bind(worker)
        .bind(RunStatus::Running)
        .execute(&mut *conn)
        .await?;
    });
    tx.commit().await
}

pub async fn phase_done(
    db: &Db,
    id: &str,
    worker: &str,
    s: &PhaseSummary,
) -> Result<(), sqlx::Error> {
    let time = now();
    let sql = format!(
        "UPDATE run_phases SET status = $1, epochs_run = $2, best_epoch = $3, \
         best_val_loss = $4, best_val_accuracy = $5, seconds = $6, updated_at = $9 \
         WHERE run_id = $7 AND phase = $8 AND {}",
        held(7, 10, 11)
    );
    on_pool!(db, pool => {
        sqlx::query(&sql)
        .bind(PhaseStatus::Succeeded)
        .bind(s.epochs_run as i64)
        .bind(s.best_epoch as i64)
        .bind(s.best_val_loss)
        .bind(s.best_val_accuracy)
        .bind(s.seconds)
        .bind(id)
        .bind(s.phase)
        .bind(&time)
        .bind(worker)
        .bind(RunStatus::Running)
        .execute(pool)
        .await
        .map(|_| ())
    })?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct EpochRow {
    phase: Phase,
    epoch: i64,
    train_loss: f64,
    train_accuracy: f64,
    val_loss: f64,
    val_accuracy: f64,
    learning_rate: f64,
    seconds: f64,
}

impl From<EpochRow> for EpochMetrics {
    fn from(r: EpochRow) -> Self {
        EpochMetrics {
            phase: r.phase,
            epoch: r.epoch.max(0) as usize,
            train_loss: r.train_loss,
            train_accuracy: r.train_accuracy,
            val_loss: r.val_loss,
            val_accuracy: r.val_accuracy,
            learning_rate: r.learning_rate,
            seconds: r.seconds,
        }
    }
}

pub async fn metrics(db: &Db, id: &str) -> Result<Vec<EpochMetrics>, sqlx::Error> {
    let rows: Vec<EpochRow> = on_pool!(db, pool => {
        sqlx::query_as(
            "SELECT m.phase, m.epoch, m.train_loss, m.train_accuracy, m.val_loss, \
             m.val_accuracy, m.learning_rate, m.seconds FROM epoch_metrics m \
             JOIN run_phases p ON p.run_id = m.run_id AND p.phase = m.phase \
             WHERE m.run_id = $1 ORDER BY p.position, m.epoch",
        )
        .bind(id)
        .fetch_all(pool)
        .await
    })?;
    Ok(rows.into_iter().map(EpochMetrics::from).collect())
}

pub async fn evaluation(db: &Db, id: &str) -> Result<Option<String>, sqlx::Error> {
    on_pool!(db, pool => {
        sqlx::query_scalar("SELECT report FROM evaluations WHERE run_id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
    })
}
