//! The blocking half of a run, on its own thread: the shared backbone, the frozen pass, the
//! phases (resuming after a checkpointed warm-up), and the model directory.

use std::path::PathBuf;

use tokio::sync::mpsc;

use super::worker::WorkerContext;
use crate::ml::artifact;
use crate::ml::config::TrainConfig;
use crate::ml::data::FolderDataset;
use crate::ml::events::{Cancel, EpochMetrics, PhaseSummary, TrainError, TrainEvent};
use crate::ml::train::{self, Resume};

/// Why the compute thread stopped without a model.
pub(super) enum Stopped {
    Cancelled,
    Failed(Failure),
}

/// A run's failure: what clients see (stored in `runs.error`, sent over SSE), and the
/// details with server paths and library errors, which only the log gets.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) public: String,
    pub(crate) detail: Option<String>,
}

impl Failure {
    /// A message that is safe and useful to show as it is.
    pub(crate) fn plain(message: impl Into<String>) -> Self {
        Self {
            public: message.into(),
            detail: None,
        }
    }

    /// `what` failed inside the server: clients learn that, the log learns why.
    pub(crate) fn internal(what: &str, err: impl std::fmt::Display) -> Self {
        Self {
            public: format!("{what} failed on the server; see the server log"),
            detail: Some(format!("{what}: {err}")),
        }
    }
}

impl From<TrainError> for Stopped {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Cancelled => Stopped::Cancelled,
            // Device and checkpoint errors carry library text and paths.
            TrainError::Device(_) => Stopped::Failed(Failure::internal(
                "the compute device (even at batch size 1)",
                e,
            )),
            TrainError::Checkpoint(_) => {
                Stopped::Failed(Failure::internal("checkpointing the warm-up", e))
            }
            other => Stopped::Failed(Failure::plain(other.to_string())),
        }
    }
}

/// What the compute thread hands back.
pub(super) struct Finished {
    pub(super) classes: Vec<String>,
    pub(super) accuracy: f64,
    pub(super) evaluation: String,
    pub(super) input_size: usize,
}

/// The blocking part: backbone, frozen pass, phases, model directory.
#[allow(clippy::too_many_arguments)]
pub(super) fn compute(
    ctx: &WorkerContext,
    id: &str,
    dataset: &FolderDataset,
    config: &TrainConfig,
    warm_checkpoint: Option<PathBuf>,
    (prior_metrics, prior_phases): (Vec<EpochMetrics>, Vec<PhaseSummary>),
    tx: mpsc::UnboundedSender<TrainEvent>,
    cancel: &Cancel,
) -> Result<Finished, Stopped> {
    let device = &ctx.device;
    let planned = train::plan(dataset, config).backbone;
    let backbone = ctx.backbones.get(planned, device).map_err(|e| {
        Stopped::Failed(Failure::internal(
            &format!("loading the pretrained {planned} weights"),
            e,
        ))
    })?;
    let mut events = |e: TrainEvent| {
        // The receiver only goes away when the worker itself is gone.
        let _ = tx.send(e);
    };
    let prepared = train::prepare(dataset, config, &backbone, device, &mut events, cancel)?;
    let warm_head = match warm_checkpoint {
        Some(path) => Some(
            artifact::load_head(&path, dataset.classes.len(), device).map_err(|e| {
                Stopped::Failed(Failure::internal("reading the warm-up checkpoint", e))
            })?,
        ),
        None => None,
    };
    let checkpoint_path = ctx.storage.warmup_checkpoint(id);
    let runtime = tokio::runtime::Handle::current();
    let mut save = |head: &burn::nn::Linear| {
        artifact::save_head(&checkpoint_path, head)
            .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        // Shared so that any worker can resume the run; losing it only costs a warm-up.
        if ctx.objects.is_shared()
            && let Err(e) = runtime.block_on(ctx.objects.publish_checkpoint(id))
        {
            tracing::warn!(error = %e, "could not store the warm-up checkpoint");
        }
        Ok(())
    };
    let resume = Resume {
        warm_head,
        on_warmup: Some(&mut save),
    };
    let mut outcome = train::fit(
        &prepared,
        dataset,
        config,
        &backbone,
        device,
        &mut events,
        cancel,
        resume,
    )?;
    outcome.metrics.splice(0..0, prior_metrics);
    outcome.phases.splice(0..0, prior_phases);
    cancel.check()?;
    artifact::save(&ctx.storage.model(id), &outcome, config)
        .map_err(|e| Stopped::Failed(Failure::internal("saving the model", e)))?;
    Ok(Finished {
        classes: outcome.classes.clone(),
        accuracy: outcome.evaluation.accuracy,
        input_size: outcome.preprocessing.input_size,
        evaluation: serde_json::to_string(&outcome.evaluation).expect("serialisable"),
    })
}
