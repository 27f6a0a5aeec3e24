//! Datasets as training sees them: labelled photos (made by `ingest`, the one road from
//! files to a dataset), the stratified split, and the burn `Dataset`/`Batcher` pair that
//! turns photos into batches.

use std::fs;
use std::path::PathBuf;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::augment::{AugmentConfig, augmented_view, view_seed};
use super::preprocess::{self, Preprocessing};

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// A file that was left out, and why: by ingestion (unusable, a duplicate, outside a class
/// folder) or by a run's frozen pass (it failed to decode there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Skipped {
    /// The file's path inside the upload or folder. (Models saved before this field was
    /// renamed call it `path`.)
    #[serde(alias = "path")]
    pub name: String,
    pub reason: String,
}

/// A folder-per-class dataset, as ingestion stored it.
#[derive(Debug, Clone)]
pub struct FolderDataset {
    /// Class names, sorted; a label is an index into this list.
    pub classes: Vec<String>,
    pub samples: Vec<Sample>,
    pub skipped: Vec<Skipped>,
}

impl FolderDataset {
    /// Images per class, in class order.
    pub fn counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for s in &self.samples {
            counts[s.label] += 1;
        }
        counts
    }
}

/// Largest class over smallest class above which classes count as imbalanced: the upload
/// warns, and `class_weighting: auto` weights the classes.
pub const IMBALANCE_RATIO: f64 = 1.5;

/// Whether the per-class counts are imbalanced (see [`IMBALANCE_RATIO`]).
pub fn imbalanced(counts: &[usize]) -> bool {
    match (counts.iter().min(), counts.iter().max()) {
        (Some(&min), Some(&max)) => min > 0 && max as f64 > IMBALANCE_RATIO * min as f64,
        _ => false,
    }
}

/// Stratified, seeded split: each class contributes `round(n * val_fraction)` images to
/// validation (at least one when it has two or more). Returns (train, validation) indices.
pub fn stratified_split(
    labels: &[usize],
    val_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let n_classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for class in 0..n_classes {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        idx.shuffle(&mut rng);
        let mut n_val = (idx.len() as f64 * val_fraction).round() as usize;
        if idx.len() >= 2 {
            n_val = n_val.clamp(1, idx.len() - 1);
        }
        val.extend_from_slice(&idx[..n_val]);
        train.extend_from_slice(&idx[n_val..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// The views of one image, ready to batch.
#[derive(Debug, Clone)]
pub struct ImageViews {
    /// Index into the samples list.
    pub sample: usize,
    pub label: usize,
    /// Each `[3, s, s]` as flat CHW floats.
    pub views: Vec<Vec<f32>>,
}

/// Why one sample could not be turned into views.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct SampleError {
    pub sample: usize,
    pub path: String,
    pub reason: String,
}

/// A burn `Dataset` over some of the samples: `get` decodes one photo and produces its views.
/// View 0 is the plain evaluation view when `clean_first` is set, the others are augmented.
pub struct ViewDataset<'a> {
    pub samples: &'a [Sample],
    pub indices: Vec<usize>,
    pub views: usize,
    pub clean_first: bool,
    pub pre: Preprocessing,
    pub augment: AugmentConfig,
    /// Mixed into every view's seed; differs per epoch when views are streamed.
    pub seed: u64,
    pub max_dimension: u32,
}

impl Dataset<ImageViews, SampleError> for ViewDataset<'_> {
    fn get(&self, index: usize) -> Result<ImageViews, SampleError> {
        let sample_index = self.indices[index];
        let sample = &self.samples[sample_index];
        let fail = |reason: String| SampleError {
            sample: sample_index,
            path: sample.path.display().to_string(),
            reason,
        };
        let bytes = fs::read(&sample.path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let image =
            preprocess::decode(&bytes, self.max_dimension).map_err(|e| fail(e.to_string()))?;
        let views = (0..self.views)
            .map(|v| {
                if v == 0 && self.clean_first {
                    preprocess::eval_view(&image, &self.pre)
                } else {
                    augmented_view(
                        &image,
                        &self.pre,
                        &self.augment,
                        view_seed(self.seed, sample_index, v),
                    )
                }
            })
            .collect();
        Ok(ImageViews {
            sample: sample_index,
            label: sample.label,
            views,
        })
    }

    fn len(&self) -> usize {
        self.indices.len()
    }
}

/// A batch of network inputs (images or cached activations) with their labels.
#[derive(Debug, Clone)]
pub struct InputBatch {
    /// `[batch, c, h, w]`
    pub inputs: Tensor<4>,
    /// `[batch]`
    pub targets: Tensor<1, Int>,
}

/// Stacks flat `[c, h, w]` rows into a tensor batch; serves images and activations alike.
#[derive(Debug, Clone, Copy)]
pub struct TensorBatcher {
    pub shape: [usize; 3],
}

impl TensorBatcher {
    /// Stacks borrowed `[c, h, w]` rows into one `[n, c, h, w]` tensor, copying each once.
    pub fn stack(&self, rows: &[&[f32]], device: &Device) -> Tensor<4> {
        let [c, h, w] = self.shape;
        let mut flat = Vec::with_capacity(rows.len() * c * h * w);
        for row in rows {
            debug_assert_eq!(row.len(), c * h * w);
            flat.extend_from_slice(row);
        }
        Tensor::from_data(TensorData::new(flat, [rows.len(), c, h, w]), device)
    }

    /// Labels as an `[n]` integer tensor.
    pub fn targets(
        labels: impl ExactSizeIterator<Item = usize>,
        device: &Device,
    ) -> Tensor<1, Int> {
        let n = labels.len();
        let labels: Vec<i64> = labels.map(|l| l as i64).collect();
        Tensor::from_data(TensorData::new(labels, [n]), device)
    }
}

impl Batcher<(Vec<f32>, usize), InputBatch> for TensorBatcher {
    fn batch(&self, items: Vec<(Vec<f32>, usize)>, device: &Device) -> InputBatch {
        let rows: Vec<&[f32]> = items.iter().map(|(row, _)| row.as_slice()).collect();
        InputBatch {
            inputs: self.stack(&rows, device),
            targets: Self::targets(items.iter().map(|(_, label)| *label), device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stratified_disjoint_and_seeded() {
        let labels: Vec<usize> = (0..100).map(|i| usize::from(i >= 70)).collect();
        let (train, val) = stratified_split(&labels, 0.2, 42);
        assert_eq!(train.len() + val.len(), 100);
        assert!(train.iter().all(|i| !val.contains(i)));
        assert_eq!(val.iter().filter(|&&i| labels[i] == 0).count(), 14);
        assert_eq!(val.iter().filter(|&&i| labels[i] == 1).count(), 6);
        assert_eq!(
            stratified_split(&labels, 0.2, 42),
            (train.clone(), val.clone())
        );
        assert_ne!(stratified_split(&labels, 0.2, 43).1, val);
    }
}
