//! Datasets on disk: a folder with one sub-folder per class, the stratified split, and the burn
//! `Dataset`/`Batcher` pair that turns photos into batches.
//!
//! Files are recognised by content, never by extension. Anything unusable is skipped with a
//! reason, and the caller reports it; one bad file never stops a run.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::augment::{AugmentConfig, augmented_view, view_seed};
use super::preprocess::{self, Preprocessing};

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// A file that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Problems that stop a dataset from being used at all.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data folder {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "need at least 2 classes (one sub-folder per class with images in it), found {found}: {classes:?}"
    )]
    TooFewClasses { found: usize, classes: Vec<String> },
    #[error("class '{class}' has {count} usable images, the minimum is {min}")]
    TooFewImages {
        class: String,
        count: usize,
        min: usize,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A scanned folder-per-class dataset.
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

fn is_hidden(name: &str) -> bool {
    name.starts_with('.') || name == "__MACOSX" || name == "Thumbs.db"
}

/// Every regular file below `dir`, sorted so scans are reproducible.
fn files_below(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_below(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Scans `dir`: each sub-folder is a class, each file in it (at any depth) a candidate image.
/// Files are sniffed and their header dimensions checked; exact duplicates (by content) are
/// kept once, so the same photo can never land in both training and validation.
pub fn scan(
    dir: &Path,
    max_dimension: u32,
    min_per_class: usize,
) -> Result<FolderDataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::NotADirectory(dir.to_path_buf()));
    }
    let mut classes = Vec::new();
    let mut skipped = Vec::new();
    let mut top: Vec<_> = fs::read_dir(dir)
        .map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    top.sort();
    let mut candidates = Vec::new();
    for path in top {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if is_hidden(&name) {
            continue;
        }
        if path.is_dir() {
            let mut files = Vec::new();
            files_below(&path, &mut files)?;
            candidates.push((name, files));
        } else {
            skipped.push(Skipped {
                path: path.display().to_string(),
                reason: "not inside a class folder".into(),
            });
        }
    }
    let mut samples = Vec::new();
    let mut seen: HashMap<[u8; 32], PathBuf> = HashMap::new();
    for (class, files) in candidates {
        let label = classes.len();
        let mut usable = 0;
        for path in files {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if is_hidden(&name) {
                skipped.push(Skipped {
                    path: path.display().to_string(),
                    reason: "hidden file".into(),
                });
                continue;
            }
            let bytes = fs::read(&path).map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            if let Err(reason) = preprocess::checked_header(&bytes, max_dimension) {
                skipped.push(Skipped {
                    path: path.display().to_string(),
                    reason: reason.to_string(),
                });
                continue;
            }
            let hash: [u8; 32] = Sha256::digest(&bytes).into();
            if let Some(first) = seen.get(&hash) {
                let reason = format!("duplicate of {}", first.display());
                skipped.push(Skipped {
                    path: path.display().to_string(),
                    reason,
                });
                continue;
            }
            seen.insert(hash, path.clone());
            samples.push(Sample { path, label });
            usable += 1;
        }
        if usable > 0 {
            classes.push(class);
        }
    }
    if classes.len() < 2 {
        return Err(DataError::TooFewClasses {
            found: classes.len(),
            classes,
        });
    }
    let ds = FolderDataset {
        classes,
        samples,
        skipped,
    };
    for (class, count) in ds.classes.iter().zip(ds.counts()) {
        if count < min_per_class {
            return Err(DataError::TooFewImages {
                class: class.clone(),
                count,
                min: min_per_class,
            });
        }
    }
    Ok(ds)
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
