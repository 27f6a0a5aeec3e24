//! The training workers: each claims the oldest queued run under a lease, trains it on a
//! blocking thread while renewing the lease (which also carries cancels made through any
//! API process), and turns the trainer's events into database rows and live events.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Jobs;
use super::compute::{Failure, Stopped, compute};
use super::events::{EventKind, RunEvent};
use super::progress::Tracker;
use crate::db::queue::{self, Claimed, Guard, Lease};
use crate::db::status::{RunStatus, resumes_after_warmup};
use crate::db::{self, Db, models::Success};
use crate::ml::config::TrainConfig;
use crate::ml::data::{FolderDataset, Sample};
use crate::ml::events::{Cancel, Phase, PhaseSummary, Stage, TrainEvent};
use crate::objects::Kind;
use crate::storage::Storage;

/// Least time between two progress writes of one run.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How often an idle worker looks at the queue even without a wake-up.
const POLL: Duration = Duration::from_secs(2);

/// What a worker needs.
#[derive(Clone)]
pub struct WorkerContext {
    pub db: Db,
    pub objects: crate::objects::Objects,
    /// This process's worker name (each worker adds its number): host, process id and a
    /// random part, so that a restarted process never reuses a dead one's name.
    pub name: String,
    /// How long a claim lasts without a heartbeat.
    pub lease: Duration,
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
                let me = format!("{}-{n}", ctx.name);
                work(&ctx, &me, &shutdown).await;
                tracing::info!(worker = n, "worker stopped");
            })
        })
        .collect()
}

/// A worker name for this process.
pub fn process_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
    format!("{host}-{}-{tag}", std::process::id())
}

/// How often a training worker renews its lease and looks for a cancel: a third of the
/// lease (so two heartbeats can fail before it lapses), at most every 2 s (cancels land
/// within that).
fn heartbeat_every(lease: Duration) -> Duration {
    (lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// How often an idle or busy worker looks for runs whose lease lapsed: every half lease, at
/// least every 5 s (other processes' leases may be shorter than this one's).
fn reap_every(lease: Duration) -> Duration {
    (lease / 2).min(Duration::from_secs(5))
}

async fn work(ctx: &WorkerContext, me: &str, shutdown: &CancellationToken) {
    let mut next_reap = Instant::now();
    while !shutdown.is_cancelled() {
        if Instant::now() >= next_reap {
            next_reap = Instant::now() + reap_every(ctx.lease);
            match super::reap(&ctx.db, &ctx.objects).await {
                Ok((0, 0)) => {}
                Ok((requeued, failed)) => {
                    tracing::warn!(requeued, failed, "reaped runs whose worker stopped")
                }
                Err(e) => tracing::warn!(error = %e, "could not look for lapsed leases"),
            }
        }
        let claimed = match queue::claim_next(&ctx.db, me, ctx.lease).await {
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
        let span = tracing::info_span!("run", run_id = %id, attempt = run.attempts, worker = me);
        if let Err(e) = execute(ctx, me, run, shutdown).instrument(span).await {
            // A database failure mid-run: the run cannot be trusted to resume.
            tracing::error!(run_id = %id, error = format!("{e:#}"), "run aborted by an internal error");
            ctx.jobs.unregister(&id);
            let message = "internal error while training; see the server log";
            let ended = queue::finish(
                &ctx.db,
                &id,
                RunStatus::Failed,
                Some(message),
                Guard::Holder(me),
            );
            if ended.await.unwrap_or(false) {
                ctx.jobs
                    .publish_status(&id, RunStatus::Failed, Some(message.into()));
            }
        }
    }
}

/// Builds the trainer's dataset from the database rows and the files on disk (fetched from
/// the shared store first, and kept in the local cache while the pin lives).
async fn load_dataset(
    ctx: &WorkerContext,
    dataset_id: &str,
) -> Result<(FolderDataset, Option<crate::objects::Pin>), Failure> {
    let dataset = db::datasets::get(&ctx.db, dataset_id)
        .await
        .map_err(|e| Failure::internal("reading the dataset", e))?
        .ok_or_else(|| Failure::plain("its dataset was deleted"))?;
    let classes: Vec<String> = dataset.classes.iter().map(|c| c.name.clone()).collect();
    let dir = ctx.storage.dataset(dataset_id);
    let files = db::datasets::files(&ctx.db, dataset_id)
        .await
        .map_err(|e| Failure::internal("reading the dataset's files", e))?;
    let names: Vec<String> = files.iter().map(|f| f.file_name()).collect();
    let pin = ctx
        .objects
        .fetch_dataset(dataset_id, &names)
        .await
        .map_err(|e| Failure::internal("fetching the dataset from the object store", e))?;
    let samples = files
        .into_iter()
        .map(|f| Sample {
            path: dir.join(f.file_name()),
            label: classes.iter().position(|c| *c == f.class).unwrap_or(0),
        })
        .collect();
    let dataset = FolderDataset {
        classes,
        samples,
        skipped: Vec::new(),
    };
    Ok((dataset, pin))
}

async fn execute(
    ctx: &WorkerContext,
    me: &str,
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
    let (dataset, _kept) = match dataset {
        Ok(d) => d,
        Err(e) => return fail(ctx, me, &id, &e).await,
    };

    // Resume after the warm-up when an earlier attempt finished it and left its checkpoint.
    let checkpoint = ctx.storage.warmup_checkpoint(&id);
    let before = db::runs::get(&ctx.db, &id)
        .await?
        .context("claimed run vanished")?;
    let stored = ctx.objects.fetch_checkpoint(&id).await?;
    let resume = resumes_after_warmup(&before.phase_states(), stored);
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
        queue::reset_phases_from(&ctx.db, &id, Phase::Warmup).await?;
        (Vec::new(), Vec::new())
    };

    let cancel = Cancel::default();
    ctx.jobs.register(&id, cancel.clone());
    // A cancel that came between the claim and the registration.
    if queue::cancel_requested(&ctx.db, &id).await? {
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
    let mut lost = false;
    let mut heartbeat = tokio::time::interval(heartbeat_every(ctx.lease));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = heartbeat.tick(), if !lost => {
                match queue::heartbeat(&ctx.db, &id, me, ctx.lease).await {
                    Ok(Lease::Held { cancel: true }) => cancel.cancel(),
                    Ok(Lease::Held { cancel: false }) => {}
                    Ok(Lease::Lost) => {
                        tracing::warn!("the run's lease was lost (it lapsed and the run was \
                            re-queued); stopping it and writing nothing more");
                        lost = true;
                        cancel.cancel();
                    }
                    // Keeps training: the lease outlives a couple of missed heartbeats.
                    Err(e) => tracing::warn!(error = %e, "could not renew the run's lease"),
                }
            }
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
    if lost {
        return Ok(());
    }
    match result {
        Ok(Ok(done)) => {
            // Stored before the row that points at it.
            if let Err(e) = ctx.objects.publish_model(&id).await {
                let _ = std::fs::remove_dir_all(ctx.storage.model(&id));
                let failure = Failure::internal("storing the model in the object store", e);
                return fail(ctx, me, &id, &failure).await;
            }
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
            let recorded = loop {
                match db::models::record_success(&ctx.db, &success, me).await {
                    Ok(recorded) => break recorded,
                    Err(e) if attempt == RECORD_ATTEMPTS => {
                        // No row will ever point at the model: do not leave it behind.
                        forget(ctx, Kind::Model, &id).await;
                        return Err(e.into());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "recording the model failed; retrying");
                        tokio::time::sleep(wait).await;
                        (wait, attempt) = (wait * 2, attempt + 1);
                    }
                }
            };
            if !recorded {
                tracing::warn!("the run's lease was lost before its model was recorded; discarded");
                forget(ctx, Kind::Model, &id).await;
                return Ok(());
            }
            forget(ctx, Kind::Run, &id).await;
            tracing::info!(val_accuracy = done.accuracy, "run succeeded");
            ctx.jobs.publish_status(&id, RunStatus::Succeeded, None);
        }
        Ok(Err(Stopped::Cancelled)) => {
            let user = queue::cancel_requested(&ctx.db, &id).await?;
            if stopping_for_shutdown && !user {
                let now = db::runs::get(&ctx.db, &id)
                    .await?
                    .context("running run vanished")?;
                let stored = ctx.objects.has_checkpoint(&id).await.unwrap_or(false);
                let from = if resumes_after_warmup(&now.phase_states(), stored) {
                    Phase::Finetune
                } else {
                    Phase::Warmup
                };
                queue::requeue(&ctx.db, &id, from, Guard::Holder(me)).await?;
                tracing::info!(
                    resume_from = %from,
                    "run left queued to resume at the next start"
                );
                ctx.jobs.publish_status(&id, RunStatus::Queued, None);
            } else {
                queue::finish(&ctx.db, &id, RunStatus::Cancelled, None, Guard::Holder(me)).await?;
                forget(ctx, Kind::Run, &id).await;
                tracing::info!("run cancelled");
                ctx.jobs.publish_status(&id, RunStatus::Cancelled, None);
            }
        }
        Ok(Err(Stopped::Failed(f))) => fail(ctx, me, &id, &f).await?,
        Err(join) => {
            tracing::error!(error = %join, "training thread panicked");
            fail(
                ctx,
                me,
                &id,
                &Failure::plain("internal error: the training thread crashed"),
            )
            .await?
        }
    }
    Ok(())
}

async fn fail(ctx: &WorkerContext, me: &str, id: &str, failure: &Failure) -> anyhow::Result<()> {
    match &failure.detail {
        Some(detail) => tracing::error!(error = %detail, "run failed"),
        None => tracing::warn!(error = %failure.public, "run failed"),
    }
    let message = failure.public.as_str();
    queue::finish(
        &ctx.db,
        id,
        RunStatus::Failed,
        Some(message),
        Guard::Holder(me),
    )
    .await?;
    forget(ctx, Kind::Run, id).await;
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

/// Deletes a run's checkpoints or an unrecorded model, locally and in the store; a failure
/// only leaves garbage behind, so it is logged.
async fn forget(ctx: &WorkerContext, what: Kind, id: &str) {
    if let Err(e) = ctx.objects.remove(what, id).await {
        tracing::warn!(error = %e, ?what, "could not delete leftover files");
    }
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
