//! The training loops: warm-up of the head on cached features, the optimisation step, and
//! the generic phase loop with early stopping that restores the best epoch (used by
//! fine-tuning and, in `streamed`, by the from-scratch baseline).

use std::time::Instant;

use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::backbone::FEATURES;
use super::cache::RowCache;
use super::config::TrainConfig;
use super::evaluate::argmax;
use super::events::{Cancel, EpochMetrics, Phase, PhaseSummary, TrainError, TrainEvent};
use super::head::{TransferModel, dropout_mask};

pub(crate) struct Trainer<'a> {
    pub(crate) config: &'a TrainConfig,
    pub(crate) device: Device,
    pub(crate) autodiff: Device,
    pub(crate) weights: Option<Vec<f32>>,
    pub(crate) events: &'a mut dyn FnMut(TrainEvent),
    pub(crate) cancel: &'a Cancel,
    pub(crate) metrics: Vec<EpochMetrics>,
    pub(crate) phases: Vec<PhaseSummary>,
    pub(crate) rng: ChaCha8Rng,
    /// When set, the running phase stops at the first step boundary past it.
    pub(crate) deadline: Option<Instant>,
    /// Sub-batches each training step is split into; grows when the device runs out of memory.
    pub(crate) step_parts: usize,
    /// Threads a step's sub-batches run on (`lanes::lanes` of the device).
    pub(crate) lanes: usize,
    /// Validation loss of the model as it entered the last phase that kept it as epoch 0.
    pub(crate) incoming_val_loss: Option<f64>,
}

/// Logits of `model` over every row of a cache (inputs for its first block), in order.
pub fn logits_of(
    model: &TransferModel,
    cache: &RowCache,
    batch: usize,
    device: &Device,
) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(cache.len());
    let idx: Vec<usize> = (0..cache.len()).collect();
    // Inference only: BatchNorm folded into the convs (see `fused`).
    let model = model.clone().folded();
    for chunk in idx.chunks(batch) {
        let b = cache.batch4(chunk, device);
        rows_into(model.forward(b.inputs), &mut out);
    }
    out
}

/// Pooled features of `model` over every row of a cache, as a cache of `[1280]` rows with the
/// same labels and samples.
pub fn features_of(
    model: &TransferModel,
    cache: &RowCache,
    batch: usize,
    device: &Device,
) -> RowCache {
    let mut out = RowCache::new(&[FEATURES]);
    let idx: Vec<usize> = (0..cache.len()).collect();
    let model = model.clone().folded();
    for chunk in idx.chunks(batch) {
        let b = cache.batch4(chunk, device);
        let labels: Vec<usize> = chunk.iter().map(|&i| cache.labels[i]).collect();
        let samples: Vec<usize> = chunk.iter().map(|&i| cache.samples[i]).collect();
        out.push_tensor(model.features(b.inputs), &labels, &samples);
    }
    out
}

pub(crate) fn rows_into(t: Tensor<2>, out: &mut Vec<Vec<f32>>) {
    let [_, d] = t.dims();
    let data = t.into_data();
    out.extend(
        data.as_slice::<f32>()
            .expect("float32")
            .chunks(d)
            .map(<[f32]>::to_vec),
    );
}

/// Mean cross-entropy and accuracy of logits, unweighted (validation is judged as it is).
pub(crate) fn loss_and_accuracy(logits: &[Vec<f32>], labels: &[usize]) -> (f64, f64) {
    let nll = super::evaluate::nll(logits, labels, 1.0);
    let correct = logits
        .iter()
        .zip(labels)
        .filter(|(l, y)| argmax(l) == **y)
        .count();
    (nll, correct as f64 / labels.len().max(1) as f64)
}

impl Trainer<'_> {
    pub(crate) fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    pub(crate) fn loss_fn(&self) -> CrossEntropyLoss {
        CrossEntropyLossConfig::new()
            .with_weights(self.weights.clone())
            .init(&self.autodiff)
    }

    /// `items` in a fresh random order (batches must never hold one class at a time).
    pub(crate) fn shuffled(&mut self, items: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut order: Vec<usize> = items.into_iter().collect();
        order.shuffle(&mut self.rng);
        order
    }

    pub(crate) fn record(&mut self, m: EpochMetrics) {
        (self.events)(TrainEvent::Epoch(m.clone()));
        self.metrics.push(m);
    }

    pub(crate) fn finish_phase(
        &mut self,
        phase: Phase,
        epochs_run: usize,
        best: Option<(usize, f64, f64)>,
        start: Instant,
    ) {
        let (best_epoch, best_val_loss, best_val_accuracy) =
            best.unwrap_or((0, f64::NAN, f64::NAN));
        let summary = PhaseSummary {
            phase,
            epochs_run,
            best_epoch,
            best_val_loss,
            best_val_accuracy,
            seconds: start.elapsed().as_secs_f64(),
        };
        (self.events)(TrainEvent::PhaseDone(summary.clone()));
        self.phases.push(summary);
    }

    /// One optimisation step of a transfer model; returns (model, summed loss, correct).
    ///
    /// When the device cannot allocate the batch, the step is retried as 2, 4, ... sub-batches
    /// whose gradients are accumulated, each weighted by its share of the batch, so the update
    /// matches the whole batch's and a small GPU trains more slowly instead of failing.
    pub(crate) fn step(
        &mut self,
        model: TransferModel,
        optim: &mut ModuleOptimizer,
        loss_fn: &CrossEntropyLoss,
        inputs: Tensor<4>,
        targets: Tensor<1, Int>,
        lr: f64,
    ) -> Result<(TransferModel, f64, usize), TrainError> {
        let rows = targets.dims()[0];
        loop {
            let parts = self.step_parts.clamp(1, rows);
            match self.accumulate(&model, loss_fn, &inputs, &targets, parts) {
                Ok((grads, loss_sum, correct)) => {
                    return Ok((optim.step(lr, model, grads), loss_sum, correct));
                }
                Err(e) if parts < rows => {
                    self.step_parts = parts * 2;
                    tracing::warn!(batch = rows, sub_batches = self.step_parts, error = %e, "device could not run the step; splitting it");
                }
                Err(e) => return Err(TrainError::Device(e.to_string())),
            }
        }
    }

    /// Gradients of the batch's mean loss, computed in `parts` sub-batches (at least one per
    /// CPU lane), each weighted by its share of the batch.
    ///
    /// On the CPU the sub-batches run at once, one thread per core, each through its own
    /// replica of the model: `valid().train()` gives the replica fresh autodiff leaves with
    /// the same parameter ids, so every sub-batch gets a graph of its own (graphs sharing a
    /// leaf would be merged and their backward passes serialised), and the gradients still
    /// add up by parameter id for the optimiser step on `model`.
    fn accumulate(
        &mut self,
        model: &TransferModel,
        loss_fn: &CrossEntropyLoss,
        inputs: &Tensor<4>,
        targets: &Tensor<1, Int>,
        parts: usize,
    ) -> Result<(GradientsParams, f64, usize), burn::tensor::ExecutionError> {
        let rows = targets.dims()[0];
        let lanes = super::lanes::background(self.lanes);
        let size = rows.div_ceil(parts.max(lanes.min(rows)));
        // Masks are drawn here, in sub-batch order, so a run stays reproducible.
        let slices: Vec<(usize, usize, Tensor<2>)> = (0..rows)
            .step_by(size)
            .map(|start| {
                let len = size.min(rows - start);
                let mask = dropout_mask(
                    &mut self.rng,
                    len,
                    FEATURES,
                    self.config.dropout,
                    &self.autodiff,
                );
                (start, len, mask)
            })
            .collect();
        let replicas = lanes > 1 && slices.len() > 1;
        let autodiff = &self.autodiff;
        let sub_batch = |(start, len, mask): &(usize, usize, Tensor<2>)| {
            let replica = if replicas {
                model.valid().train()
            } else {
                model.clone()
            };
            let x = inputs.clone().narrow(0, *start, *len);
            let y = targets.clone().narrow(0, *start, *len);
            let logits = replica.forward_train(x, mask.clone());
            let loss = loss_fn.forward(logits.clone(), y.clone());
            let mean = loss
                .clone()
                .try_into_data()?
                .as_slice::<f32>()
                .expect("float32")[0] as f64;
            let correct = count_correct(logits, y);
            let share = *len as f64 / rows as f64;
            let grads = GradientsParams::from_grads((loss * share).backward(), &replica);
            // Kernels run lazily: surface an allocation failure of the backward pass here,
            // before the next sub-batch queues more, while the step can still be retried
            // smaller.
            autodiff.sync()?;
            Ok::<_, burn::tensor::ExecutionError>((grads, mean * *len as f64, correct))
        };
        // One sub-batch per thread with replicas; otherwise all of them, in order, here.
        let lanes = if replicas { lanes } else { 1 };
        let results =
            super::lanes::map_slices(&slices, lanes, super::lanes::Work::Background, |s| {
                s.iter().map(&sub_batch).collect::<Result<Vec<_>, _>>()
            });
        let mut accumulator = GradientsAccumulator::<TransferModel>::new();
        let (mut loss_sum, mut correct) = (0.0, 0);
        for result in results {
            for (grads, loss, right) in result? {
                accumulator.accumulate(model, grads);
                loss_sum += loss;
                correct += right;
            }
        }
        Ok((accumulator.grads(), loss_sum, correct))
    }

    /// Trains a transfer model for a phase with early stopping on validation loss.
    /// `epoch_batches` runs one epoch of steps and returns (loss sum, correct, seen).
    pub(crate) fn train_phase(
        &mut self,
        phase: Phase,
        model: TransferModel,
        keep_incoming: bool,
        epochs: usize,
        patience: usize,
        lr_of: &dyn Fn(usize) -> f64,
        mut run_epoch: impl FnMut(
            &mut Self,
            TransferModel,
            usize,
            f64,
        ) -> Result<(TransferModel, f64, usize, usize), TrainError>,
        mut validate: impl FnMut(&Self, &TransferModel) -> Result<(f64, f64), TrainError>,
    ) -> Result<TransferModel, TrainError> {
        let start = Instant::now();
        let mut model = model.fork(&self.autodiff).train();
        // With `keep_incoming`, the model as it enters the phase (the warm-up's) is epoch 0:
        // a phase that only makes validation worse returns it unchanged.
        let incoming = model.valid();
        let initial = if keep_incoming {
            Some(validate(self, &incoming)?)
        } else {
            None
        };
        self.incoming_val_loss = initial.map(|(loss, _)| loss);
        let mut stopping = EarlyStopping::new(incoming, initial, patience);
        let mut epochs_run = 0;
        for epoch in 0..epochs {
            let t0 = Instant::now();
            let lr = lr_of(epoch);
            let (m, loss_sum, correct, seen) = run_epoch(self, model, epoch, lr)?;
            model = m;
            let valid = model.valid();
            let val = validate(self, &valid)?;
            epochs_run += 1;
            self.record(epoch_metrics(
                phase,
                epoch,
                (loss_sum, correct, seen),
                val,
                lr,
                t0,
            ));
            if stopping.observe(epoch + 1, val, valid) || self.past_deadline() {
                break;
            }
        }
        self.finish_phase(phase, epochs_run, stopping.best, start);
        Ok(stopping.model)
    }
}

/// Early stopping on validation loss that keeps the best model seen.
struct EarlyStopping<M> {
    /// (epoch, validation loss, validation accuracy) of `model`; epoch 0 is the incoming one.
    best: Option<(usize, f64, f64)>,
    model: M,
    since_best: usize,
    patience: usize,
}

impl<M> EarlyStopping<M> {
    fn new(model: M, initial: Option<(f64, f64)>, patience: usize) -> Self {
        Self {
            best: initial.map(|(l, a)| (0, l, a)),
            model,
            since_best: 0,
            patience,
        }
    }

    /// Records an epoch's result; true when training should stop.
    fn observe(&mut self, epoch: usize, (loss, accuracy): (f64, f64), model: M) -> bool {
        if self.best.is_none_or(|(_, best, _)| loss < best) {
            self.best = Some((epoch, loss, accuracy));
            self.model = model;
            self.since_best = 0;
            false
        } else {
            self.since_best += 1;
            self.since_best > self.patience
        }
    }
}

/// The row of a finished epoch: `train` is (loss sum, correct, seen), `val` (loss, accuracy).
fn epoch_metrics(
    phase: Phase,
    epoch: usize,
    train: (f64, usize, usize),
    val: (f64, f64),
    lr: f64,
    t0: Instant,
) -> EpochMetrics {
    let (loss_sum, correct, seen) = train;
    EpochMetrics {
        phase,
        epoch: epoch + 1,
        train_loss: loss_sum / seen.max(1) as f64,
        train_accuracy: correct as f64 / seen.max(1) as f64,
        val_loss: val.0,
        val_accuracy: val.1,
        learning_rate: lr,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

/// Number of rows whose arg-max matches the target (dtype-agnostic: flex's argmax is i32).
fn count_correct(logits: Tensor<2>, targets: Tensor<1, Int>) -> usize {
    let pred = logits.argmax(1).reshape([targets.dims()[0]]);
    pred.equal(targets).int().sum().into_scalar::<i64>() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::backbone::{Backbone, EfficientNetLiteConfig, activation_shape};
    use crate::ml::head::TransferModelConfig;

    /// The step's gradients on two threads (one replica each) add up to those of the
    /// sequential path, and the loss and accuracy match.
    #[test]
    fn a_step_on_two_lanes_matches_the_sequential_step() {
        let device = Device::flex();
        let config = TrainConfig::default();
        let cancel = Cancel::default();
        let mut events = |_: TrainEvent| {};
        let backbone = EfficientNetLiteConfig::new(Backbone::Lite0).init(&device);
        let k = 15;
        let ad = device.clone().autodiff();
        let model = TransferModelConfig::new(2)
            .from_backbone(&backbone, k, &device)
            .unfreeze()
            .fork(&ad)
            .train();
        let [c, h, w] = activation_shape(Backbone::Lite0, k, 64);
        let inputs = Tensor::<4>::random(
            [6, c, h, w],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &ad,
        );
        let targets = Tensor::<1, Int>::from_data([0, 1, 1, 0, 1, 0], &ad);
        let loss_fn = CrossEntropyLossConfig::new().init(&ad);
        let mut run = |lanes: usize| {
            let mut trainer = Trainer {
                config: &config,
                device: device.clone(),
                autodiff: ad.clone(),
                weights: None,
                events: &mut events,
                cancel: &cancel,
                metrics: Vec::new(),
                phases: Vec::new(),
                rng: rand::SeedableRng::seed_from_u64(7),
                deadline: None,
                step_parts: 1,
                lanes,
                incoming_val_loss: None,
            };
            let (grads, loss, correct) = trainer
                .accumulate(&model, &loss_fn, &inputs, &targets, 1)
                .expect("step");
            let weight = model.head.weight.clone();
            let g = grads
                .get::<2>(weight.id)
                .expect("the head has a gradient")
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            (g, loss, correct)
        };
        let (seq, seq_loss, seq_correct) = run(1);
        let (par, par_loss, par_correct) = run(2);
        assert!(
            (seq_loss - par_loss).abs() < 1e-5,
            "{seq_loss} vs {par_loss}"
        );
        assert_eq!(seq_correct, par_correct);
        let worst = seq
            .iter()
            .zip(&par)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let scale = seq.iter().map(|a| a.abs()).fold(0.0f32, f32::max);
        assert!(scale > 0.0, "the head's gradient is not all zero");
        assert!(
            worst <= 1e-4 * scale,
            "gradients differ by {worst} (scale {scale})"
        );
    }
}
