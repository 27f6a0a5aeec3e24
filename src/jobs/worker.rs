//! The training workers: each claims the oldest queued run under a lease (renewed by
//! `jobs::lease` for as long as it holds the run), trains it on a blocking thread, turns the
//! trainer's events into rows and live events (`jobs::record`), and ends it
//! (`jobs::outcome`). Runs whose lease lapsed are reaped by `jobs::recovery`.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Jobs;
use super::compute::{Failure, Stopped, compute};
use super::lease::Held;
use super::outcome;
use super::progress::Tracker;
use super::record::{PROGRESS_EVERY, on_event};
use crate::db::queue::{self, Claimed, Guard};
use crate::db::status::{RunStatus, resumes_after_warmup};
use crate::db::{self, Db};
use crate::ml::config::TrainConfig;
use crate::ml::data::{FolderDataset, Sample};
use crate::ml::events::{Cancel, Phase, PhaseSummary, TrainEvent};
use crate::objects::ObjectError;
use crate::storage::Storage;

/// How often an idle worker looks at the queue even without a wake-up.
const POLL: Duration = Duration::from_secs(2);
/// The failure of a run whose dataset was deleted.
const DATASET_GONE: &str = "its dataset was deleted";

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

async fn work(ctx: &WorkerContext, me: &str, shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
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
        // Renewed from the claim until the run is over here, whatever it is doing.
        let cancel = Cancel::default();
        let held = Held::start(
            ctx.db.clone(),
            id.clone(),
            me.to_string(),
            ctx.lease,
            cancel.clone(),
        );
        if let Err(e) = execute(ctx, me, run, &held, cancel, shutdown)
            .instrument(span)
            .await
        {
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

/// Why a run's dataset could not be loaded.
enum Loading {
    /// The run cannot train (its dataset is gone, the database failed).
    Failed(Failure),
    /// The object store cannot be reached now; the run can wait in the queue.
    Store(ObjectError),
}

impl From<Failure> for Loading {
    fn from(f: Failure) -> Self {
        Loading::Failed(f)
    }
}

/// Builds the trainer's dataset from the database rows and the files on disk (fetched from
/// the shared store first, and kept in the local cache while the pin lives).
async fn load_dataset(
    ctx: &WorkerContext,
    dataset_id: &str,
) -> Result<(FolderDataset, Option<crate::objects::Pin>), Loading> {
    let dataset = db::datasets::get(&ctx.db, dataset_id)
        .await
        .map_err(|e| Failure::internal("reading the dataset", e))?
        .ok_or_else(|| Failure::plain(DATASET_GONE))?;
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
        .map_err(|e| match e {
            e if e.is_outage() => Loading::Store(e),
            e => Loading::Failed(Failure::internal("fetching the dataset", e)),
        })?;
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
    held: &Held,
    cancel: Cancel,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let id = run.id.clone();
    tracing::info!("run started");
    ctx.jobs.publish_status(&id, RunStatus::Running, None);
    let config: TrainConfig = serde_json::from_str(&run.config).context("stored run config")?;
    let dataset = match run.dataset_id.as_deref() {
        Some(d) => load_dataset(ctx, d).await,
        None => Err(Loading::Failed(Failure::plain(DATASET_GONE))),
    };
    let (dataset, _kept) = match dataset {
        Ok(d) => d,
        Err(Loading::Failed(e)) => return outcome::fail(ctx, me, &id, &e).await,
        Err(Loading::Store(e)) => {
            tracing::warn!(error = %e, "could not fetch the dataset");
            let why = "the object store failed while fetching the dataset";
            return outcome::back_to_queue(ctx, me, (&id, run.attempts), why).await;
        }
    };

    // Resume after the warm-up when an earlier attempt finished it and left its checkpoint.
    let checkpoint = ctx.storage.warmup_checkpoint(&id);
    let before = db::runs::get(&ctx.db, &id)
        .await?
        .context("claimed run vanished")?;
    let stored = match ctx.objects.fetch_checkpoint(&id).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(error = %e, "could not fetch the warm-up checkpoint");
            let why = "the object store failed while fetching the checkpoint";
            return outcome::back_to_queue(ctx, me, (&id, run.attempts), why).await;
        }
    };
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
        if !queue::reset_phases_from(&ctx.db, &id, me, Phase::Warmup).await? {
            return Ok(()); // no longer ours
        }
        (Vec::new(), Vec::new())
    };

    ctx.jobs.register(&id, cancel.clone());
    // A cancel that came between the claim and the registration.
    if crate::db::cancel::cancel_requested(&ctx.db, &id).await? {
        cancel.cancel();
    }
    // The model folder the compute writes stays out of the cache's evictions until stored.
    let _model_kept = ctx.objects.keep(crate::objects::Kind::Model, &id);
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
                if held.lost() {
                    continue; // the run is someone else's now: record nothing more
                }
                let recorded = on_event(ctx, &id, me, event, &mut tracker, &mut last_write, config.batch_size).await;
                if let Err(e) = recorded {
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
    if held.lost() {
        return Ok(());
    }
    match result {
        Ok(Ok(done)) => {
            let claim = (id.as_str(), run.attempts);
            outcome::succeeded(ctx, me, claim, run.dataset_id.as_deref(), &done, held).await
        }
        Ok(Err(Stopped::Cancelled)) => outcome::stopped(ctx, me, &id, stopping_for_shutdown).await,
        Ok(Err(Stopped::Failed(f))) => outcome::fail(ctx, me, &id, &f).await,
        Err(join) => {
            tracing::error!(error = %join, "training thread panicked");
            let failure = Failure::plain("internal error: the training thread crashed");
            outcome::fail(ctx, me, &id, &failure).await
        }
    }
}
