//! What a worker records as its run trains: each trainer event becomes database rows
//! (epochs, phases, progress at most every half second) and a live event.

use std::time::{Duration, Instant};

use super::events::{EventKind, RunEvent};
use super::progress::Tracker;
use super::worker::WorkerContext;
use crate::db;
use crate::ml::events::{Stage, TrainEvent};

/// Least time between two progress writes of one run.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(500);

pub(super) async fn on_event(
    ctx: &WorkerContext,
    id: &str,
    me: &str,
    event: TrainEvent,
    tracker: &mut Tracker,
    last_write: &mut Instant,
    batch_size: usize,
) -> anyhow::Result<()> {
    let mut force = false;
    match event {
        TrainEvent::Progress { stage, done, total } => {
            tracker.step(stage, done, total);
            if let Some(per_second) = tracker.rate(done) {
                // Frozen-pass steps are views; training steps are batches.
                let images = if stage == Stage::FrozenPass {
                    1
                } else {
                    batch_size
                };
                metrics::gauge!("transferd_training_images_per_second", "stage" => stage.as_str())
                    .set(per_second * images as f64);
            }
        }
        TrainEvent::Epoch(m) => {
            metrics::counter!("transferd_training_epochs_total", "phase" => m.phase.as_str())
                .increment(1);
            tracing::info!(phase = %m.phase, epoch = m.epoch, train_loss = m.train_loss,
                val_loss = m.val_loss, val_accuracy = m.val_accuracy, seconds = m.seconds, "epoch");
            tracker.epoch(m.phase, m.epoch);
            best_effort(
                "recording an epoch",
                db::epochs::add_epoch(&ctx.db, id, me, &m).await,
            );
            ctx.jobs.publish(RunEvent {
                run_id: id.to_string(),
                kind: EventKind::Epoch { metrics: m },
            });
            force = true;
        }
        TrainEvent::PhaseDone(summary) => {
            tracker.phase_done(summary.phase);
            best_effort(
                "recording a phase",
                db::epochs::phase_done(&ctx.db, id, me, &summary).await,
            );
            tracing::info!(phase = %summary.phase, best_epoch = summary.best_epoch,
                val_accuracy = summary.best_val_accuracy, "phase finished");
            ctx.jobs.publish(RunEvent {
                run_id: id.to_string(),
                kind: EventKind::PhaseFinished { summary },
            });
            force = true;
        }
    }
    if force || last_write.elapsed() >= PROGRESS_EVERY {
        *last_write = Instant::now();
        let p = &tracker.last;
        best_effort(
            "recording progress",
            db::epochs::set_progress(&ctx.db, id, me, p).await,
        );
        ctx.jobs.publish(RunEvent {
            run_id: id.to_string(),
            kind: EventKind::Progress {
                phase: p.stage,
                step: p.step.unwrap_or(0) as usize,
                steps_total: p.steps_total.unwrap_or(0) as usize,
                epoch: p.epoch.map(|e| e as usize),
                epochs_total: p.epochs_total.map(|e| e as usize),
                percent: p.percent,
                eta_seconds: p.eta_seconds,
            },
        });
    }
    Ok(())
}

/// Progress is worth recording, not worth a run: a write that fails (a busy or full disk)
/// is logged and counted, and training goes on.
fn best_effort(what: &'static str, result: Result<(), sqlx::Error>) {
    if let Err(e) = result {
        metrics::counter!("transferd_progress_write_failures_total").increment(1);
        tracing::warn!(error = %e, what, "a progress write failed; the run goes on");
    }
}
