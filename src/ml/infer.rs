//! Prediction with a saved model: decode, evaluation view, batched forward, calibrated
//! softmax. Blocking by design; callers run it on a compute thread.

use std::path::Path;

use burn::module::Module;
use burn::prelude::*;

use super::artifact::{self, ArtifactError, ModelConfig};
use super::data::TensorBatcher;
use super::evaluate::softmax;
use super::head::TransferModel;
use super::lanes;
use super::ood::{Gaussians, OodSummary};
use super::preprocess::{self, ImageRejection};

/// Images decoded larger than this on either side are refused.
pub const MAX_DIMENSION: u32 = preprocess::DEFAULT_MAX_DIMENSION;
/// Largest batch [`Predictor::predict_bytes`] sends through the network at once (the service
/// passes its own `--predict-batch` to [`Predictor::probabilities_of_views`]).
pub const DEFAULT_MAX_BATCH: usize = 32;

/// A trained classifier ready to predict.
pub struct Predictor {
    pub config: ModelConfig,
    model: TransferModel,
    device: Device,
    /// The out-of-distribution statistics, for models that have them.
    ood: Option<(Gaussians, OodSummary)>,
}

/// What the network says about one view.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewPrediction {
    /// Calibrated class probabilities, in class order.
    pub probabilities: Vec<f32>,
    /// The out-of-distribution score and the model's stored threshold (see `ood`).
    pub ood: Option<(f64, f64)>,
}

impl ViewPrediction {
    /// The threshold in force (`threshold` when given, else the model's) and whether the
    /// photo is "none of the classes" under it: the one place answers decide it.
    pub fn unknown(&self, threshold: Option<f64>) -> (Option<f64>, bool) {
        let threshold = threshold.or(self.ood.map(|o| o.1));
        let unknown = self
            .ood
            .zip(threshold)
            .is_some_and(|((score, _), t)| super::ood::is_unknown(score, t));
        (threshold, unknown)
    }
}

impl Predictor {
    /// Loads a model directory onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ArtifactError> {
        let loaded = artifact::load(dir, device)?;
        Ok(Self::new(loaded.config, loaded.model, device).with_ood(loaded.ood))
    }

    /// Wraps an in-memory model (e.g. the one a run just produced).
    pub fn new(config: ModelConfig, model: TransferModel, device: &Device) -> Self {
        Self {
            config,
            // Folded once here, since a loaded model serves many predictions.
            model: model.valid().folded(),
            device: device.clone(),
            ood: None,
        }
    }

    /// Adds the statistics that score how far a photo is from every class.
    pub fn with_ood(mut self, ood: Option<(Gaussians, OodSummary)>) -> Self {
        self.ood = ood;
        self
    }

    /// Calibrated class probabilities (and out-of-distribution scores) of preprocessed
    /// `[3, s, s]` views, at most `max_batch` views per forward pass.
    pub fn probabilities_of_views(
        &self,
        views: &[Vec<f32>],
        max_batch: usize,
    ) -> Vec<ViewPrediction> {
        let s = self.config.preprocessing.input_size;
        let batcher = TensorBatcher { shape: [3, s, s] };
        let lanes = lanes::lanes(&self.device);
        // Training on this process takes one lane until this prediction is done.
        let _predicting = lanes::predicting();
        let c = self.config.classes.len();
        let mut out = Vec::with_capacity(views.len());
        for batch in views.chunks(max_batch.max(1)) {
            let results = lanes::map_slices(batch, lanes, lanes::Work::Foreground, |slice| {
                let slice: Vec<&[f32]> = slice.iter().map(Vec::as_slice).collect();
                let features = self.model.features(batcher.stack(&slice, &self.device));
                let logits = self.model.head.forward(features.clone()).into_data();
                let features = self.ood.as_ref().map(|_| features.into_data());
                (logits, features)
            });
            for (logits, features) in results {
                let logits = logits.as_slice::<f32>().expect("float32");
                let features = features
                    .as_ref()
                    .map(|f| f.as_slice::<f32>().expect("float32"));
                for (i, row) in logits.chunks(c).enumerate() {
                    let ood = self.ood.as_ref().zip(features).map(|((g, summary), f)| {
                        (g.score(&f[i * g.dim..(i + 1) * g.dim]), summary.threshold)
                    });
                    out.push(ViewPrediction {
                        probabilities: softmax(row, self.config.temperature),
                        ood,
                    });
                }
            }
        }
        out
    }

    /// Probabilities for encoded images; each image fails or succeeds on its own.
    pub fn predict_bytes(&self, images: &[Vec<u8>]) -> Vec<Result<ViewPrediction, ImageRejection>> {
        let mut views = Vec::with_capacity(images.len());
        let decoded: Vec<Result<(), ImageRejection>> = images
            .iter()
            .map(|b| {
                let image = preprocess::decode(b, MAX_DIMENSION)?;
                views.push(preprocess::eval_view(&image, &self.config.preprocessing));
                Ok(())
            })
            .collect();
        let mut probs = self
            .probabilities_of_views(&views, DEFAULT_MAX_BATCH)
            .into_iter();
        decoded
            .into_iter()
            .map(|r| r.map(|()| probs.next().expect("one result per view")))
            .collect()
    }
}
