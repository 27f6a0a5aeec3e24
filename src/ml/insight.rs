//! What a run learns about its data besides the classifier: the dataset audit over the
//! frozen pass's pooled features (see `audit`), computed once the model is chosen.

use super::audit::{self, Audit, AuditRows};
use super::config::TrainConfig;
use super::data::FolderDataset;
use super::train::Prepared;

/// Head penalty for the audit's out-of-fold fits when the run solved no head (warm-up off):
/// the middle of `head_fit::L2_GRID`, where most runs' chosen penalties fall.
pub const DEFAULT_L2: f64 = 3e-3;

/// The audit of every photo of a prepared run, at the run's head penalty `l2`.
pub fn audit_run(
    prepared: &Prepared,
    dataset: &FolderDataset,
    l2: f64,
    config: &TrainConfig,
) -> Audit {
    let rows = AuditRows::from_caches(&prepared.train.features, &prepared.val.features);
    audit::audit(
        &rows,
        &dataset.classes,
        &|s| dataset.samples[s].path.display().to_string(),
        l2,
        config.seed,
    )
}
