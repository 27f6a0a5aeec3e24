//! What every part of a run shares: its phases, how it reports (events, epoch rows, phase
//! summaries), how it is stopped (`Cancel`) and why it fails (`TrainError`). These live here,
//! apart from `train`, so that `train`, `phases`, `streamed`, `cache` and `head_phase` import
//! this module and not each other.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::backbone::Backbone;

/// The phases of a run, in the order they run.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The head solved on the frozen backbone's features.
    Warmup,
    /// The top of the backbone trained with the head, at a lower learning rate.
    Finetune,
    /// The same architecture trained from scratch, for comparison.
    Baseline,
}

impl Phase {
    /// Every phase, in running order.
    pub const ALL: [Phase; 3] = [Phase::Warmup, Phase::Finetune, Phase::Baseline];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Warmup => "warmup",
            Phase::Finetune => "finetune",
            Phase::Baseline => "baseline",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a phase.
#[derive(Debug, thiserror::Error)]
#[error("unknown phase {0:?}")]
pub struct UnknownPhase(pub String);

impl FromStr for Phase {
    type Err = UnknownPhase;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPhase(s.to_string()))
    }
}

/// Shared stop flag, checked at every step boundary.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn check(&self) -> Result<(), TrainError> {
        if self.is_cancelled() {
            Err(TrainError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Why a run stopped without a model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error("cancelled")]
    Cancelled,
    #[error("the compute device failed even at batch size 1: {0}")]
    Device(String),
    /// Internal: a phase's time budget ran out mid-epoch (never escapes `fit`).
    #[error("time budget spent")]
    BudgetSpent,
    #[error(
        "the frozen pass was prepared for another plan (cut before block {prepared}; this config cuts before block {config}, or differs in estimate, fine-tuning or input size)"
    )]
    CutMismatch { prepared: usize, config: usize },
    #[error(
        "after skipping unreadable images, class '{0}' has no training or validation image left"
    )]
    EmptyClass(String),
    #[error("could not checkpoint the warm-up: {0}")]
    Checkpoint(String),
    #[error(
        "out of memory while {0}: lower views, input_size or finetune.unfreeze, or train on a machine with more memory"
    )]
    OutOfMemory(String),
    #[error("the run plans backbone {planned} but was given {given}")]
    WrongBackbone { planned: Backbone, given: Backbone },
}

/// One row per epoch, as stored and plotted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EpochMetrics {
    pub phase: Phase,
    /// 1-based.
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub learning_rate: f64,
    pub seconds: f64,
}

impl fmt::Display for EpochMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<8} epoch {:>3}  train loss {:.4} acc {:.4}  val loss {:.4} acc {:.4}  lr {:.2e}  {:.1}s",
            self.phase.as_str(),
            self.epoch,
            self.train_loss,
            self.train_accuracy,
            self.val_loss,
            self.val_accuracy,
            self.learning_rate,
            self.seconds
        )
    }
}

/// What a phase ended with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseSummary {
    pub phase: Phase,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    pub best_val_accuracy: f64,
    pub seconds: f64,
}

/// Progress reports.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// `done` of `total` units (views or steps) of a stage.
    Progress {
        stage: Stage,
        done: usize,
        total: usize,
    },
    Epoch(EpochMetrics),
    PhaseDone(PhaseSummary),
}

/// What a run is doing now: the frozen pass before the phases, or a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Decoding, augmenting and running the frozen backbone once over every view.
    FrozenPass,
    Phase(Phase),
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::FrozenPass => "frozen_pass",
            Stage::Phase(p) => p.as_str(),
        }
    }
}

impl FromStr for Stage {
    type Err = UnknownPhase;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "frozen_pass" => Ok(Stage::FrozenPass),
            phase => phase.parse().map(Stage::Phase),
        }
    }
}

/// As its name: `frozen_pass`, `warmup`, `finetune` or `baseline`.
impl Serialize for Stage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Stage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}
