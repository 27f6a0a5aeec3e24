//! The frozen part of the backbone, run once per view, and its cached outputs.
//!
//! Decoding and augmentation run on rayon threads in a producer thread while the calling
//! thread runs the backbone, so the two overlap. For each batch the pass keeps the pooled
//! features (what warm-up trains on) and, optionally, the activations entering the first
//! trainable block (what fine-tuning trains on), so neither phase pays for the frozen bottom
//! again.

use std::sync::mpsc::sync_channel;

use burn::data::dataset::Dataset;
use burn::prelude::*;
use rayon::prelude::*;

use super::backbone::EfficientNetLite;
use super::data::{InputBatch, SampleError, TensorBatcher, ViewDataset};
use super::events::{Cancel, TrainError};
use super::lanes::Work;

/// Rows of equal shape, with the label and sample index of each.
#[derive(Debug, Clone, Default)]
pub struct RowCache {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub labels: Vec<usize>,
    pub samples: Vec<usize>,
}

impl RowCache {
    pub fn new(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    fn row_len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        let n = self.row_len();
        &self.data[i * n..(i + 1) * n]
    }

    /// Appends the rows of a `[n, ...]` tensor.
    pub fn push_tensor<const D: usize>(
        &mut self,
        t: Tensor<D>,
        labels: &[usize],
        samples: &[usize],
    ) {
        let data = t.into_data();
        self.data
            .extend_from_slice(data.as_slice::<f32>().expect("float32 tensor"));
        self.labels.extend_from_slice(labels);
        self.samples.extend_from_slice(samples);
    }

    /// Appends flat rows (`labels.len()` of them, each of this cache's shape). Growing the cache is the one allocation a run makes that scales with
    /// the data, so it is fallible: out of memory fails the run, not the process.
    pub fn push_rows(
        &mut self,
        data: &[f32],
        labels: &[usize],
        samples: &[usize],
    ) -> Result<(), TrainError> {
        debug_assert_eq!(data.len(), labels.len() * self.row_len());
        self.data.try_reserve(data.len()).map_err(|_| {
            TrainError::OutOfMemory(format!(
                "caching {} more MiB of activations (already {} MiB)",
                data.len() * 4 >> 20,
                self.data.len() * 4 >> 20
            ))
        })?;
        self.data.extend_from_slice(data);
        self.labels.extend_from_slice(labels);
        self.samples.extend_from_slice(samples);
        Ok(())
    }

    /// Rows `indices` as a `[n, c, h, w]` batch (the cache must hold 3-D rows).
    pub fn batch4(&self, indices: &[usize], device: &Device) -> InputBatch {
        let shape: [usize; 3] = self.shape.as_slice().try_into().expect("3-D rows");
        let rows: Vec<&[f32]> = indices.iter().map(|&i| self.row(i)).collect();
        InputBatch {
            inputs: TensorBatcher { shape }.stack(&rows, device),
            targets: TensorBatcher::targets(indices.iter().map(|&i| self.labels[i]), device),
        }
    }

    /// Rows `indices` as a `[n, d]` tensor with their labels (the cache must hold 1-D rows).
    pub fn batch2(&self, indices: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let d = self.row_len();
        let mut flat = Vec::with_capacity(indices.len() * d);
        for &i in indices {
            flat.extend_from_slice(self.row(i));
        }
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i] as i64).collect();
        (
            Tensor::from_data(TensorData::new(flat, [indices.len(), d]), device),
            Tensor::from_data(TensorData::new(labels, [indices.len()]), device),
        )
    }
}

/// A flat view with its label and sample index.
pub type ViewRow = (Vec<f32>, usize, usize);

/// Streams every view of `dataset` in batches of `batch_size` to `on_batch`, decoding in
/// parallel ahead of the consumer. Samples that fail to decode are returned, not fatal.
pub fn stream_views(
    dataset: &ViewDataset<'_>,
    batch_size: usize,
    cancel: &Cancel,
    mut on_batch: impl FnMut(Vec<ViewRow>) -> Result<(), TrainError>,
) -> Result<Vec<SampleError>, TrainError> {
    let per_chunk = (batch_size / dataset.views.max(1)).max(2);
    let (tx, rx) = sync_channel::<Vec<Result<_, SampleError>>>(2);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let indices: Vec<usize> = (0..dataset.len()).collect();
            for chunk in indices.chunks(per_chunk) {
                let decoded: Vec<_> = chunk.par_iter().map(|&i| dataset.get(i)).collect();
                if tx.send(decoded).is_err() {
                    return; // the consumer stopped (error or cancel)
                }
            }
        });
        // Owned here so that an early return (error, cancel) drops the receiver before the
        // scope joins the producer, which then sees its send fail and stops.
        let rx = rx;
        let mut failures = Vec::new();
        let mut pending: Vec<ViewRow> = Vec::with_capacity(2 * batch_size);
        for chunk in rx.iter() {
            cancel.check()?;
            for item in chunk {
                match item {
                    Ok(views) => {
                        for v in views.views {
                            pending.push((v, views.label, views.sample));
                        }
                    }
                    Err(e) => failures.push(e),
                }
            }
            while pending.len() >= batch_size {
                let rest = pending.split_off(batch_size);
                on_batch(std::mem::replace(&mut pending, rest))?;
            }
        }
        if !pending.is_empty() {
            on_batch(pending)?;
        }
        Ok(failures)
    })
}

/// Output of one frozen pass.
pub struct FrozenPass {
    /// Pooled features `[1280]` per view.
    pub features: RowCache,
    /// Activations entering block `k` per view, when asked for.
    pub activations: Option<RowCache>,
    pub failures: Vec<SampleError>,
    /// How many times a batch was halved because the device could not allocate it.
    pub splits: usize,
}

/// Runs the pretrained backbone over every view of `dataset`: bottom up to block `k`, then
/// the pretrained top for the pooled features. The kept activations are what a model
/// trained from block `k` takes as input (the images themselves when `k` is 0).
pub fn frozen_pass(
    backbone: &EfficientNetLite,
    k: usize,
    keep_activations: bool,
    dataset: &ViewDataset<'_>,
    batch_size: usize,
    device: &Device,
    cancel: &Cancel,
    mut progress: impl FnMut(usize),
) -> Result<FrozenPass, TrainError> {
    let size = dataset.pre.input_size;
    // Nothing in the frozen pass trains: BatchNorm goes into the convs (see `fused`).
    let backbone = &backbone.clone().folded();
    let batcher = TensorBatcher {
        shape: [3, size, size],
    };
    // With nothing frozen (k = 0) the trainable model starts at the stem, so what it needs
    // cached is the image itself.
    let act_shape = if k == 0 {
        [3, size, size]
    } else {
        super::backbone::activation_shape(backbone.kind(), k, size)
    };
    let mut features = RowCache::new(&[super::backbone::FEATURES]);
    let mut activations = keep_activations.then(|| RowCache::new(&act_shape));
    // The largest batch the device has accepted; lowered when an allocation fails.
    let mut limit = batch_size;
    let mut splits = 0;
    let failures = stream_views(dataset, batch_size, cancel, |rows| {
        let n = rows.len();
        let labels: Vec<usize> = rows.iter().map(|r| r.1).collect();
        let samples: Vec<usize> = rows.iter().map(|r| r.2).collect();
        let views: Vec<&[f32]> = rows.iter().map(|r| r.0.as_slice()).collect();
        let (acts, feats) = forward_adaptive(
            backbone,
            k,
            &batcher,
            &views,
            &mut limit,
            &mut splits,
            device,
        )?;
        if let Some(cache) = activations.as_mut() {
            cache.push_rows(&acts, &labels, &samples)?;
        }
        features.push_rows(&feats, &labels, &samples)?;
        progress(n);
        Ok(())
    })?;
    Ok(FrozenPass {
        features,
        activations,
        failures,
        splits,
    })
}

/// Frozen forward of `views` in chunks of at most `limit`, halving the chunk (and `limit`)
/// whenever the device cannot allocate it, so a small GPU slows a run down rather than
/// failing it. Returns the flat activations to keep and the flat pooled features.
fn forward_adaptive(
    backbone: &EfficientNetLite,
    k: usize,
    batcher: &TensorBatcher,
    views: &[&[f32]],
    limit: &mut usize,
    splits: &mut usize,
    device: &Device,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let (mut acts, mut feats) = (Vec::new(), Vec::new());
    let lanes = super::lanes::lanes(device);
    let mut start = 0;
    while start < views.len() {
        let end = (start + *limit).min(views.len());
        let lanes = super::lanes::background(lanes);
        let parts =
            super::lanes::map_slices(&views[start..end], lanes, Work::Background, |slice| {
                let inputs = batcher.stack(slice, device);
                let bottom = backbone.forward_bottom(inputs.clone(), k);
                let pooled = backbone.forward_top(bottom.clone(), k);
                let kept = if k == 0 { inputs } else { bottom };
                match (kept.try_into_data(), pooled.try_into_data()) {
                    (Ok(a), Ok(f)) => Ok((a, f)),
                    (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
                }
            });
        match parts.into_iter().collect::<Result<Vec<_>, String>>() {
            Ok(parts) => {
                for (a, f) in parts {
                    acts.extend_from_slice(a.as_slice::<f32>().expect("float32"));
                    feats.extend_from_slice(f.as_slice::<f32>().expect("float32"));
                }
                start = end;
            }
            Err(e) => {
                if *limit == 1 {
                    return Err(TrainError::Device(e.to_string()));
                }
                *limit = (*limit / 2).max(1);
                *splits += 1;
                tracing::warn!(batch = end - start, retry_with = *limit, error = %e, "device could not run the batch; splitting it");
            }
        }
    }
    Ok((acts, feats))
}
