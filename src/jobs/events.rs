//! Live run events, broadcast to SSE subscribers (across processes through `jobs::notify`
//! on PostgreSQL).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::status::RunStatus;
use crate::ml::events::{EpochMetrics, PhaseSummary, Stage};

/// Something that happened to a run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunEvent {
    pub run_id: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The event itself; `type` is also the SSE event name.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// Steps done in the current stage, and the estimate for the whole run.
    Progress {
        /// The stage: `frozen_pass`, or the phase.
        #[schema(value_type = Option<String>)]
        phase: Option<Stage>,
        step: usize,
        steps_total: usize,
        epoch: Option<usize>,
        epochs_total: Option<usize>,
        percent: f64,
        eta_seconds: Option<f64>,
    },
    /// An epoch finished.
    Epoch { metrics: EpochMetrics },
    /// A phase finished; its best epoch is what the run keeps.
    PhaseFinished { summary: PhaseSummary },
    /// The run's status changed (`running`, `queued` again after a shutdown, or an end).
    Status {
        status: RunStatus,
        error: Option<String>,
    },
}

impl EventKind {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Progress { .. } => "progress",
            Self::Epoch { .. } => "epoch",
            Self::PhaseFinished { .. } => "phase_finished",
            Self::Status { .. } => "status",
        }
    }

    /// Whether this event ends the run's stream.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Status { status, .. } if status.is_over())
    }
}
