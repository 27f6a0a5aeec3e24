//! The training workers: each claims the oldest queued run, trains it on a blocking thread,
//! and turns the trainer's events into database rows and live events.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::SqlitePool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Jobs;
use super::compute::{Failure, Stopped, compute};
use super::events::{EventKind, RunEvent};
use super::progress::Tracker;
use crate::db::status::{RunStatus, resumes_after_warmup};
use crate::db::{self, models::Success, runs::Claimed};
use crate::ml::config::TrainConfig;
use crate::ml::data::{FolderDataset, Sample};
use crate::ml::events::{Cancel, Phase, PhaseSummary, Stage, TrainEvent};
use crate::storage::Storage;

/// Least time between two progress writes of one run.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How often an idle worker looks at the queue even without a wake-up.
const POLL: Duration = Duration::from_secs(2);

/// What a worker needs.
#[derive(Clone)]
pub struct WorkerContext {
    pub db: SqlitePool,
    pub jobs: Jobs,
    pub storage: Storage,
    pub device: burn::prelude::Device,
    pub backbones: crate::ml::backbones::Backbones,
}

/// Starts `count` workers; they stop taking runs once `shutdown` fires and stop the run they
/// are training at its next step boundary, leaving it queued to resume.
pub fn spawn_workers(
    ctx: WorkerContext,
    count: usize,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    (0..count)
        .map(|n| {
            let ctx = ctx.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                work(&ctx, &shutdown).await;
                tracing::info!(worker = n, "worker stopped");
            })
        })
        .collect()
}

async fn work(ctx: &WorkerContext, shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
        let claimed = match db::runs::claim_next(&ctx.db).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "could not claim a queued run; retrying");
                None
            }
        };
        let Some(run) = claimed else {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = ctx.jobs.inner.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
            continue;
        };
        let id = run.id.clone();
        let span = tracing::info_span!("run", run_id = %id, attempt = run.attempts);
        if let Err(e) = execute(ctx, run, shutdown).instrument(span).await {
            // A database failure mid-run: the run cannot be trusted to resume.
            tracing::error!(run_id = %id, error = format!("{e:#}"), "run aborted by an internal error");
            ctx.jobs.unregister(&id);
            let message = "internal error while training; see the server log";
            if db::runs::finish(&ctx.db, &id, RunStatus::Failed, Some(message))
                .await
                .is_ok()
            {
                ctx.jobs
                    .publish_status(&id, RunStatus::Failed, Some(message.into()));
            }
        }
    }
}

/// Builds the trainer's dataset from the database rows and the files on disk.
async fn load_dataset(ctx: &WorkerContext, dataset_id: &str) -> Result<FolderDataset, Failure> {
    let dataset = db::datasets::get(&ctx.db, dataset_id)
        .await
        .map_err(|e| Failure::internal("reading the dataset", e))?
        .ok_or_else(|| Failure::plain("its dataset was deleted"))?;
    let classes: Vec<String> = dataset.classes.iter().map(|c| c.name.clone()).collect();
    let dir = ctx.storage.dataset(dataset_id);
    let samples = db::datasets::files(&ctx.db, dataset_id)
        .await
        .map_err(|e| Failure::internal("reading the dataset's files", e))?
        .into_iter()
        .map(|f| Sample {
            path: dir.join(f.file_name()),
            label: classes.iter().position(|c| *c == f.class).unwrap_or(0),
        })
        .collect();
    Ok(FolderDataset {
        classes,
        samples,
        skipped: Vec::new(),
    })
}

async fn execute(
    ctx: &WorkerContext,
    run: Claimed,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let id = run.id.clone();
    tracing::info!("run started");
    ctx.jobs.publish_status(&id, RunStatus::Running, None);
    let config: TrainConfig = serde_json::from_str(&run.config).context("stored run config")?;
    let dataset = match run.dataset_id.as_deref() {
        Some(d) => load_dataset(ctx, d).await,
        None => Err(Failure::plain("its dataset was deleted")),
    };
    let dataset = match dataset {
        Ok(d) => d,
        Err(e) => return fail(ctx, &id, &e).await,
    };

    // Resume after the warm-up when an earlier attempt finished it and left its checkpoint.
    let checkpoint = ctx.storage.warmup_checkpoint(&id);
    let before = db::runs::get(&ctx.db, &id)
        .await?
        .context("claimed run vanished")?;
    let resume = resumes_after_warmup(&before.phase_states(), &checkpoint);
    let (prior_metrics, prior_phases) = if resume {
        tracing::info!("resuming after the warm-up from its checkpoint");
        let metrics = db::epochs::metrics(&ctx.db, &id).await?;
        let phases = before
            .phases
            .iter()
            .filter(|p| p.phase == Phase::Warmup)
            .map(|p| PhaseSummary {
                phase: p.phase,
                epochs_run: p.epochs_run as usize,
                best_epoch: p.best_epoch.unwrap_or(0) as usize,
                best_val_loss: p.best_val_loss.unwrap_or(f64::NAN),
                best_val_accuracy: p.best_val_accuracy.unwrap_or(f64::NAN),
                seconds: p.seconds.unwrap_or(0.0),
            })
            .collect();
        (metrics, phases)
    } else {
        db::runs::reset_phases_from(&ctx.db, &id, Phase::Warmup).await?;
        (Vec::new(), Vec::new())
    };

    let cancel = Cancel::default();
    ctx.jobs.register(&id, cancel.clone());
    // A cancel that came between the claim and the registration.
    if db::runs::cancel_requested(&ctx.db, &id).await? {
        cancel.cancel();
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<TrainEvent>();
    let compute = {
        let ctx = ctx.clone();
        let id = id.clone();
        let cancel = cancel.clone();
        let config = config.clone();
        let warm_start = resume.then(|| checkpoint.clone());
        tokio::task::spawn_blocking(move || {
            compute(
                &ctx,
                &id,
                &dataset,
                &config,
                warm_start,
                (prior_metrics, prior_phases),
                tx,
                &cancel,
            )
        })
    };

    let mut tracker = Tracker::new(&config, resume.then_some(Phase::Finetune));
    let mut last_write = Instant::now() - PROGRESS_EVERY;
    let mut stopping_for_shutdown = false;
    loop {
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                if let Err(e) = on_event(ctx, &id, event, &mut tracker, &mut last_write, config.batch_size).await {
                    // Stop the compute too: its results could no longer be recorded.
                    cancel.cancel();
                    let _ = compute.await;
                    ctx.jobs.unregister(&id);
                    return Err(e);
                }
            }
            _ = shutdown.cancelled(), if !stopping_for_shutdown => {
                tracing::info!("shutting down: stopping the run at the next step");
                stopping_for_shutdown = true;
                cancel.cancel();
            }
        }
    }
    let result = compute.await;
    ctx.jobs.unregister(&id);
    match result {
        Ok(Ok(done)) => {
            let success = Success {
                run_id: &id,
                dataset_id: run.dataset_id.as_deref(),
                classes: &done.classes,
                input_size: done.input_size,
                val_accuracy: done.accuracy,
                evaluation: &done.evaluation,
            };
            // The model is on disk: a passing database fault must not orphan it.
            let mut wait = Duration::from_millis(250);
            let mut attempt = 1;
            while let Err(e) = db::models::record_success(&ctx.db, &success).await {
                if attempt == RECORD_ATTEMPTS {
                    // No row will ever point at the model: do not leave it behind.
                    let _ = std::fs::remove_dir_all(ctx.storage.model(&id));
                    return Err(e.into());
                }
                tracing::warn!(error = %e, attempt, "recording the model failed; retrying");
                tokio::time::sleep(wait).await;
                (wait, attempt) = (wait * 2, attempt + 1);
            }
            let _ = std::fs::remove_dir_all(ctx.storage.run_dir(&id));
            tracing::info!(val_accuracy = done.accuracy, "run succeeded");
            ctx.jobs.publish_status(&id, RunStatus::Succeeded, None);
        }
        Ok(Err(Stopped::Cancelled)) => {
            let user = db::runs::cancel_requested(&ctx.db, &id).await?;
            if stopping_for_shutdown && !user {
                let now = db::runs::get(&ctx.db, &id)
                    .await?
                    .context("running run vanished")?;
                let from = if resumes_after_warmup(&now.phase_states(), &checkpoint) {
                    Phase::Finetune
                } else {
                    Phase::Warmup
                };
                db::runs::requeue(&ctx.db, &id, from).await?;
                tracing::info!(
                    resume_from = %from,
                    "run left queued to resume at the next start"
                );
                ctx.jobs.publish_status(&id, RunStatus::Queued, None);
            } else {
                db::runs::finish(&ctx.db, &id, RunStatus::Cancelled, None).await?;
                let _ = std::fs::remove_dir_all(ctx.storage.run_dir(&id));
                tracing::info!("run cancelled");
                ctx.jobs.publish_status(&id, RunStatus::Cancelled, None);
            }
        }
        Ok(Err(Stopped::Failed(f))) => fail(ctx, &id, &f).await?,
        Err(join) => {
            tracing::error!(error = %join, "training thread panicked");
            fail(
                ctx,
                &id,
                &Failure::plain("internal error: the training thread crashed"),
            )
            .await?
        }
    }
    Ok(())
}

async fn fail(ctx: &WorkerContext, id: &str, failure: &Failure) -> anyhow::Result<()> {
    match &failure.detail {
        Some(detail) => tracing::error!(error = %detail, "run failed"),
        None => tracing::warn!(error = %failure.public, "run failed"),
    }
    let message = failure.public.as_str();
    db::runs::finish(&ctx.db, id, RunStatus::Failed, Some(message)).await?;
    let _ = std::fs::remove_dir_all(ctx.storage.run_dir(id));
    ctx.jobs
        .publish_status(id, RunStatus::Failed, Some(message.to_string()));
    Ok(())
}

async fn on_event(
    ctx: &WorkerContext,
    id: &str,
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
                db::epochs::add_epoch(&ctx.db, id, &m).await,
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
                db::epochs::phase_done(&ctx.db, id, &summary).await,
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
            db::epochs::set_progress(&ctx.db, id, p).await,
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

/// Tries to record a finished model before the run is given up (0.25 s, then doubling).
const RECORD_ATTEMPTS: u32 = 6;

/// Progress is worth recording, not worth a run: a write that fails (a busy or full disk)
/// is logged and counted, and training goes on.
fn best_effort(what: &'static str, result: Result<(), sqlx::Error>) {
    if let Err(e) = result {
        metrics::counter!("transferd_progress_write_failures_total").increment(1);
        tracing::warn!(error = %e, what, "a progress write failed; the run goes on");
    }
}
