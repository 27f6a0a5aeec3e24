//! What a run records as it trains: live progress, one row per epoch, each phase's best
//! epoch, and the final evaluation.

use sqlx::SqlitePool;

use super::status::{PhaseStatus, RunStatus};
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

pub async fn set_progress(pool: &SqlitePool, id: &str, p: &Progress) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE runs SET phase = ?, stage = ?, step = ?, steps_total = ?, epoch = ?, \
         epochs_total = ?, percent = ?, eta_seconds = ?, \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ? AND status = ?",
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
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a finished epoch and marks its phase running.
pub async fn add_epoch(pool: &SqlitePool, id: &str, m: &EpochMetrics) -> Result<(), sqlx::Error> {
    let mut tx = super::write(pool).await?;
    sqlx::query(
        "INSERT OR REPLACE INTO epoch_metrics (run_id, phase, epoch, train_loss, train_accuracy, \
         val_loss, val_accuracy, learning_rate, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(&m.phase)
    .bind(m.epoch as i64)
    .bind(m.train_loss)
    .bind(m.train_accuracy)
    .bind(m.val_loss)
    .bind(m.val_accuracy)
    .bind(m.learning_rate)
    .bind(m.seconds)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE run_phases SET status = ?, epochs_run = ?, \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE run_id = ? AND phase = ?",
    )
    .bind(PhaseStatus::Running)
    .bind(m.epoch as i64)
    .bind(id)
    .bind(m.phase)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Records a finished phase with its best epoch.
pub async fn phase_done(pool: &SqlitePool, id: &str, s: &PhaseSummary) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE run_phases SET status = ?, epochs_run = ?, best_epoch = ?, \
         best_val_loss = ?, best_val_accuracy = ?, seconds = ?, \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE run_id = ? AND phase = ?",
    )
    .bind(PhaseStatus::Succeeded)
    .bind(s.epochs_run as i64)
    .bind(s.best_epoch as i64)
    .bind(s.best_val_loss)
    .bind(s.best_val_accuracy)
    .bind(s.seconds)
    .bind(id)
    .bind(s.phase)
    .execute(pool)
    .await?;
    Ok(())
}

/// An `epoch_metrics` row; `ml` knows nothing of rows.
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

pub async fn metrics(pool: &SqlitePool, id: &str) -> Result<Vec<EpochMetrics>, sqlx::Error> {
    let rows: Vec<EpochRow> = sqlx::query_as(
        "SELECT m.phase, m.epoch, m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy, \
         m.learning_rate, m.seconds FROM epoch_metrics m \
         JOIN run_phases p ON p.run_id = m.run_id AND p.phase = m.phase \
         WHERE m.run_id = ? ORDER BY p.position, m.epoch",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(EpochMetrics::from).collect())
}

/// The stored evaluation JSON of a run.
pub async fn evaluation(pool: &SqlitePool, id: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT report FROM evaluations WHERE run_id = ?")
        .bind(id)
        .fetch_optional(pool)
        .await
}
