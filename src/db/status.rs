//! The states a run and its phases move through, as stored and as the API shows them, and
//! the rules about them. Every module that reads or writes a status uses these types; SQL
//! text names a status only through [`RunStatus::as_str`] and [`PhaseStatus::as_str`] binds.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ml::events::Phase;

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Waiting for a worker.
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// The run is over: nothing will change it again, and its event stream ends.
    pub fn is_over(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }

    /// Parses a status name, as the API's `?status=` filter gives it.
    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::str::FromStr for RunStatus {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        RunStatus::parse(s).ok_or_else(|| UnknownName(s.to_string()))
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one phase of a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PhaseStatus {
    Pending,
    Running,
    Succeeded,
    /// Not planned by the config, or never reached because the run ended first.
    Skipped,
    Failed,
    Cancelled,
}

impl PhaseStatus {
    pub const ALL: [PhaseStatus; 6] = [
        PhaseStatus::Pending,
        PhaseStatus::Running,
        PhaseStatus::Succeeded,
        PhaseStatus::Skipped,
        PhaseStatus::Failed,
        PhaseStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PhaseStatus::Pending => "pending",
            PhaseStatus::Running => "running",
            PhaseStatus::Succeeded => "succeeded",
            PhaseStatus::Skipped => "skipped",
            PhaseStatus::Failed => "failed",
            PhaseStatus::Cancelled => "cancelled",
        }
    }

    /// What a phase that had not finished becomes when its run ends with `run`:
    /// (the running phase, the pending ones).
    pub fn on_run_end(run: RunStatus) -> (PhaseStatus, PhaseStatus) {
        match run {
            RunStatus::Cancelled => (PhaseStatus::Cancelled, PhaseStatus::Cancelled),
            RunStatus::Succeeded => (PhaseStatus::Succeeded, PhaseStatus::Skipped),
            _ => (PhaseStatus::Failed, PhaseStatus::Skipped),
        }
    }
}

/// Whether a run can go on after its warm-up instead of starting over: the warm-up
/// succeeded and its checkpoint is stored (`checkpoint`). The worker (on a claim, and at shutdown) and
/// start-up recovery all decide with this.
pub fn resumes_after_warmup(phases: &[(Phase, PhaseStatus)], checkpoint: bool) -> bool {
    phases
        .iter()
        .any(|&(p, s)| p == Phase::Warmup && s == PhaseStatus::Succeeded)
        && checkpoint
}

/// Where a run that goes back to the queue starts again: after its warm-up when it
/// [`resumes_after_warmup`], from the warm-up otherwise.
pub fn restart_from(phases: &[(Phase, PhaseStatus)], checkpoint: bool) -> Phase {
    if resumes_after_warmup(phases, checkpoint) {
        Phase::Finetune
    } else {
        Phase::Warmup
    }
}

impl std::str::FromStr for PhaseStatus {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        PhaseStatus::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownName(s.to_string()))
    }
}

/// A stored status name this program does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownName(String);

/// Stores each type as its name (TEXT on both engines), through its `as_str` and `FromStr`.
/// `ml` stays free of sqlx, so `Phase`'s mapping lives here with the statuses'.
macro_rules! text_column {
    ($($ty:ty),*) => {$(
        text_column!(@on $ty, sqlx::Sqlite);
        text_column!(@on $ty, sqlx::Postgres);
    )*};
    (@on $ty:ty, $db:ty) => {
        impl sqlx::Type<$db> for $ty {
            fn type_info() -> <$db as sqlx::Database>::TypeInfo {
                <str as sqlx::Type<$db>>::type_info()
            }
            fn compatible(ty: &<$db as sqlx::Database>::TypeInfo) -> bool {
                <str as sqlx::Type<$db>>::compatible(ty)
            }
        }
        impl<'q> sqlx::Encode<'q, $db> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut <$db as sqlx::Database>::ArgumentBuffer<'q>,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'q, $db>>::encode(self.as_str(), buf)
            }
        }
        impl<'r> sqlx::Decode<'r, $db> for $ty {
            fn decode(
                value: <$db as sqlx::Database>::ValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(<&str as sqlx::Decode<'r, $db>>::decode(value)?.parse()?)
            }
        }
    };
}

text_column!(RunStatus, PhaseStatus, Phase);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_ends_are_over() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert_eq!(RunStatus::parse("done"), None);
        let over: Vec<_> = RunStatus::ALL.into_iter().filter(|s| s.is_over()).collect();
        assert_eq!(
            over,
            [
                RunStatus::Succeeded,
                RunStatus::Failed,
                RunStatus::Cancelled
            ]
        );
    }

    #[test]
    fn resuming_needs_a_finished_warmup_and_its_checkpoint() {
        let done = [(Phase::Warmup, PhaseStatus::Succeeded)];
        assert!(!resumes_after_warmup(&done, false), "no checkpoint yet");
        assert!(resumes_after_warmup(&done, true));
        let running = [(Phase::Warmup, PhaseStatus::Running)];
        assert!(!resumes_after_warmup(&running, true));
        let other = [(Phase::Finetune, PhaseStatus::Succeeded)];
        assert!(!resumes_after_warmup(&other, true));
    }
}
