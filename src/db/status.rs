//! The states a run and its phases move through, as stored and as the API shows them, and
//! the rules about them. Every module that reads or writes a status uses these types; SQL
//! text names a status only through [`RunStatus::as_str`] and [`PhaseStatus::as_str`] binds.

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{Sqlite, SqliteArgumentValue, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, Type};
use utoipa::ToSchema;

use crate::ml::events::Phase;

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
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

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one phase of a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
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
/// succeeded and its checkpoint is on disk. The worker (on a claim, and at shutdown) and
/// start-up recovery all decide with this.
pub fn resumes_after_warmup(phases: &[(Phase, PhaseStatus)], checkpoint: &std::path::Path) -> bool {
    phases
        .iter()
        .any(|&(p, s)| p == Phase::Warmup && s == PhaseStatus::Succeeded)
        && checkpoint.is_file()
}

// Phase names are stored as text; `ml` stays free of sqlx, so the mapping lives here.
impl Type<Sqlite> for Phase {
    fn type_info() -> SqliteTypeInfo {
        <str as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <str as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Phase {
    fn encode_by_ref(
        &self,
        buf: &mut Vec<SqliteArgumentValue<'q>>,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as Encode<'q, Sqlite>>::encode(self.as_str(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Phase {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as Decode<'r, Sqlite>>::decode(value)?;
        Ok(text.parse()?)
    }
}

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
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("warmup.bpk");
        let done = [(Phase::Warmup, PhaseStatus::Succeeded)];
        assert!(!resumes_after_warmup(&done, &file), "no checkpoint yet");
        std::fs::write(&file, b"x").unwrap();
        assert!(resumes_after_warmup(&done, &file));
        let running = [(Phase::Warmup, PhaseStatus::Running)];
        assert!(!resumes_after_warmup(&running, &file));
        let other = [(Phase::Finetune, PhaseStatus::Succeeded)];
        assert!(!resumes_after_warmup(&other, &file));
    }
}
