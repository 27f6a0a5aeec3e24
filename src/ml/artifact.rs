//! The model directory: `config.json` (classes, preprocessing, backbone, training config,
//! seed, calibration), `model.bpk` (the burn record of the full network), `metrics.json`,
//! `evaluation.json`, and for "unknown" answers `ood.json` (method, threshold) and `ood.bin`
//! (the class Gaussians, see `ood`). Written to a temporary sibling and renamed into place, so a crash
//! never leaves a half-written model under the final name.

use std::fs;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::store::ModuleRecord;
use serde::{Deserialize, Serialize};

use super::backbone::Backbone;
use super::config::TrainConfig;
use super::evaluate::Evaluation;
use super::events::{EpochMetrics, PhaseSummary};
use super::head::{TransferModel, TransferModelConfig};
use super::ood::{Gaussians, OodSummary};
use super::preprocess::Preprocessing;
use super::train::TrainOutcome;
use super::weights;

/// Version of the directory layout; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;
const WEIGHTS_FILE: &str = "model.bpk";
/// The out-of-distribution threshold and method (`OodSummary`), and the Gaussians' bytes.
const OOD_SUMMARY: &str = "ood.json";
const OOD_FACTOR: &str = "ood.bin";

/// `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub format_version: u32,
    pub transferd_version: String,
    pub backbone: Backbone,
    pub backbone_weights_sha256: String,
    pub classes: Vec<String>,
    pub preprocessing: Preprocessing,
    pub dropout: f64,
    /// Temperature fitted on the validation set; predictions divide logits by it.
    pub temperature: f64,
    pub seed: u64,
    pub training: TrainConfig,
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsFile {
    pub epochs: Vec<EpochMetrics>,
    pub phases: Vec<PhaseSummary>,
    pub train_images: usize,
    pub val_images: usize,
    pub cache_seconds: f64,
    pub class_weights: Option<Vec<f32>>,
    pub skipped: Vec<super::data::Skipped>,
}

/// Why a model directory could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid model file: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ArtifactError> {
    let text = serde_json::to_string_pretty(value).expect("serialisable");
    fs::write(path, text).map_err(io(path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ArtifactError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| ArtifactError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The `config.json` for a finished run.
pub fn model_config(outcome: &TrainOutcome, training: &TrainConfig) -> ModelConfig {
    ModelConfig {
        format_version: FORMAT_VERSION,
        transferd_version: env!("CARGO_PKG_VERSION").to_string(),
        backbone: outcome.backbone,
        backbone_weights_sha256: weights::pinned(outcome.backbone).sha256.into(),
        classes: outcome.classes.clone(),
        preprocessing: outcome.preprocessing,
        dropout: training.dropout,
        temperature: outcome.evaluation.calibration.temperature,
        seed: training.seed,
        training: training.clone(),
    }
}

/// Saves a finished run to `dir` (replacing an existing model there).
pub fn save(
    dir: &Path,
    outcome: &TrainOutcome,
    training: &TrainConfig,
) -> Result<ModelConfig, ArtifactError> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".model-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    let config = model_config(outcome, training);
    write_json(&staging.path().join("config.json"), &config)?;
    let metrics = MetricsFile {
        epochs: outcome.metrics.clone(),
        phases: outcome.phases.clone(),
        train_images: outcome.train_images,
        val_images: outcome.val_images,
        cache_seconds: outcome.cache_seconds,
        class_weights: outcome.class_weights.clone(),
        skipped: outcome.skipped.clone(),
    };
    write_json(&staging.path().join("metrics.json"), &metrics)?;
    write_json(&staging.path().join("evaluation.json"), &outcome.evaluation)?;
    if let Some((gaussians, summary)) = &outcome.ood {
        write_json(&staging.path().join(OOD_SUMMARY), summary)?;
        let path = staging.path().join(OOD_FACTOR);
        fs::write(&path, gaussians.to_bytes()).map_err(io(&path))?;
    }
    let weights_path = staging.path().join(WEIGHTS_FILE);
    outcome
        .model
        .clone()
        .into_record()
        .save(&weights_path)
        .map_err(|e| ArtifactError::Invalid {
            path: weights_path.clone(),
            message: e.to_string(),
        })?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    let staged = staging.keep();
    crate::durable::rename(&staged, dir).map_err(io(dir))?;
    Ok(config)
}

/// A model read back from its directory.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub model: TransferModel,
    /// Absent for models trained before "unknown" answers existed.
    pub ood: Option<(Gaussians, OodSummary)>,
}

/// Loads `config.json` and the weights onto `device`.
pub fn load(dir: &Path, device: &Device) -> Result<LoadedModel, ArtifactError> {
    let config_path = dir.join("config.json");
    let config: ModelConfig = read_json(&config_path)?;
    if config.format_version != FORMAT_VERSION {
        return Err(ArtifactError::Invalid {
            path: config_path,
            message: format!(
                "format version {} is not supported (expected {FORMAT_VERSION})",
                config.format_version
            ),
        });
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        return Err(ArtifactError::Invalid {
            path: weights_path,
            message: "missing".into(),
        });
    }
    let invalid = |e: burn::store::RecordError| ArtifactError::Invalid {
        path: weights_path.clone(),
        message: e.to_string(),
    };
    let record = ModuleRecord::load(&weights_path).map_err(invalid)?;
    let model = TransferModelConfig::new(config.classes.len())
        .with_dropout(config.dropout)
        .with_backbone(config.backbone)
        .init(device)
        .try_load_record(record)
        .map_err(invalid)?;
    let ood = load_ood(dir, config.classes.len())?;
    Ok(LoadedModel { config, model, ood })
}

/// `ood.json` and `ood.bin`, when the model has them.
fn load_ood(dir: &Path, classes: usize) -> Result<Option<(Gaussians, OodSummary)>, ArtifactError> {
    let summary_path = dir.join(OOD_SUMMARY);
    if !summary_path.is_file() {
        return Ok(None);
    }
    let summary: OodSummary = read_json(&summary_path)?;
    let path = dir.join(OOD_FACTOR);
    let bytes = fs::read(&path).map_err(io(&path))?;
    let gaussians =
        Gaussians::from_bytes(&bytes, super::backbone::FEATURES, classes).ok_or_else(|| {
            ArtifactError::Invalid {
                path: path.clone(),
                message: "wrong size for the model's features and classes".into(),
            }
        })?;
    Ok(Some((gaussians, summary)))
}

/// Reads `evaluation.json`.
pub fn load_evaluation(dir: &Path) -> Result<Evaluation, ArtifactError> {
    read_json(&dir.join("evaluation.json"))
}

/// Saves a warm-up head as a checkpoint (temp file + rename, so a crash never leaves half a
/// file behind).
pub fn save_head(path: &Path, head: &burn::nn::Linear) -> Result<(), ArtifactError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = path.with_extension("partial");
    head.clone()
        .into_record()
        .save(&tmp)
        .map_err(|e| ArtifactError::Invalid {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
    crate::durable::rename(&tmp, path).map_err(io(path))
}

/// Loads a head saved by [`save_head`] for `num_classes` classes.
pub fn load_head(
    path: &Path,
    num_classes: usize,
    device: &Device,
) -> Result<burn::nn::Linear, ArtifactError> {
    let invalid = |e: burn::store::RecordError| ArtifactError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let record = ModuleRecord::load(path).map_err(invalid)?;
    burn::nn::LinearConfig::new(super::backbone::FEATURES, num_classes)
        .init(device)
        .try_load_record(record)
        .map_err(invalid)
}
