//! A training run: split, frozen pass, warm-up, fine-tune, optional from-scratch baseline,
//! evaluation. Runs on the calling thread (never an async executor), reports through a
//! callback and stops at the next step boundary when cancelled.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::backbone::{EfficientNetLite0, FEATURES, NUM_BLOCKS};
use super::cache::{RowCache, frozen_pass, stream_views};
use super::config::{ClassWeighting, TrainConfig, Unfreeze, cosine};
use super::data::{FolderDataset, Skipped, TensorBatcher, ViewDataset, stratified_split};
use super::evaluate::{Evaluation, evaluate};
use super::head::{TransferModel, TransferModelConfig, dropout_mask};
use super::preprocess::Preprocessing;
use burn::data::dataloader::batcher::Batcher;

/// Shared stop flag, checked at every step boundary.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn check(&self) -> Result<(), TrainError> {
        if self.is_cancelled() { Err(TrainError::Cancelled) } else { Ok(()) }
    }
}

/// Why a run stopped without a model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error("cancelled")]
    Cancelled,
    #[error("after skipping unreadable images, class '{0}' has no training or validation image left")]
    EmptyClass(String),
}

/// One row per epoch, as stored and plotted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// `warmup`, `finetune` or `baseline`.
    pub phase: String,
    /// 1-based.
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub learning_rate: f64,
    pub seconds: f64,
}

/// What a phase ended with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseSummary {
    pub phase: String,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    pub best_val_accuracy: f64,
    pub seconds: f64,
}

/// Progress reports.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// `done` of `total` units (views or steps) of a stage.
    Progress { stage: &'static str, done: usize, total: usize },
    Epoch(EpochMetrics),
    PhaseDone(PhaseSummary),
}

/// A finished run.
pub struct TrainOutcome {
    /// The full classifier, restored to the best epoch, without autodiff.
    pub model: TransferModel,
    pub classes: Vec<String>,
    pub metrics: Vec<EpochMetrics>,
    pub phases: Vec<PhaseSummary>,
    pub evaluation: Evaluation,
    /// Files left out while scanning or decoding.
    pub skipped: Vec<Skipped>,
    pub train_images: usize,
    pub val_images: usize,
    /// Seconds spent in the frozen pass (decoding, augmenting, running the frozen backbone).
    pub cache_seconds: f64,
    pub class_weights: Option<Vec<f32>>,
}

/// Inverse-frequency weights, normalised to mean 1, when the config asks for them.
pub fn class_weights(counts: &[usize], mode: ClassWeighting) -> Option<Vec<f32>> {
    let max = *counts.iter().max()? as f64;
    let min = *counts.iter().min()? as f64;
    let on = match mode {
        ClassWeighting::On => true,
        ClassWeighting::Off => false,
        ClassWeighting::Auto => min > 0.0 && max / min > 1.5,
    };
    if !on {
        return None;
    }
    let inv: Vec<f64> = counts.iter().map(|&c| 1.0 / c.max(1) as f64).collect();
    let mean = inv.iter().sum::<f64>() / inv.len() as f64;
    Some(inv.iter().map(|w| (w / mean) as f32).collect())
}

struct Trainer<'a> {
    config: &'a TrainConfig,
    device: Device,
    autodiff: Device,
    weights: Option<Vec<f32>>,
    events: &'a mut dyn FnMut(TrainEvent),
    cancel: &'a Cancel,
    metrics: Vec<EpochMetrics>,
    phases: Vec<PhaseSummary>,
    rng: ChaCha8Rng,
}

/// Logits of `model` over every row of a cache, in order.
fn logits_of(model: &TransferModel, cache: &RowCache, batch: usize, device: &Device) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(cache.len());
    let idx: Vec<usize> = (0..cache.len()).collect();
    for chunk in idx.chunks(batch) {
        let b = cache.batch4(chunk, device);
        rows_into(model.forward(b.inputs), &mut out);
    }
    out
}

fn rows_into(t: Tensor<2>, out: &mut Vec<Vec<f32>>) {
    let [_, d] = t.dims();
    let data = t.into_data();
    out.extend(data.as_slice::<f32>().expect("float32").chunks(d).map(<[f32]>::to_vec));
}

/// Mean cross-entropy and accuracy of logits, unweighted (validation is judged as it is).
fn loss_and_accuracy(logits: &[Vec<f32>], labels: &[usize]) -> (f64, f64) {
    let nll = super::evaluate::nll(logits, labels, 1.0);
    let correct = logits
        .iter()
        .zip(labels)
        .filter(|(l, y)| l.iter().enumerate().all(|(i, v)| i == **y || *v < l[**y]))
        .count();
    (nll, correct as f64 / labels.len().max(1) as f64)
}

impl Trainer<'_> {
    fn loss_fn(&self) -> CrossEntropyLoss {
        CrossEntropyLossConfig::new().with_weights(self.weights.clone()).init(&self.autodiff)
    }

    fn shuffled(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut self.rng);
        order
    }

    fn record(&mut self, m: EpochMetrics) {
        (self.events)(TrainEvent::Epoch(m.clone()));
        self.metrics.push(m);
    }

    fn finish_phase(&mut self, phase: &str, epochs_run: usize, best: Option<(usize, f64, f64)>, start: Instant) {
        let (best_epoch, best_val_loss, best_val_accuracy) = best.unwrap_or((0, f64::NAN, f64::NAN));
        let summary = PhaseSummary {
            phase: phase.into(),
            epochs_run,
            best_epoch,
            best_val_loss,
            best_val_accuracy,
            seconds: start.elapsed().as_secs_f64(),
        };
        (self.events)(TrainEvent::PhaseDone(summary.clone()));
        self.phases.push(summary);
    }

    /// Warm-up: only the head, on cached pooled features. Returns the best head.
    fn warmup(&mut self, head: burn::nn::Linear, train: &RowCache, val: &RowCache) -> Result<burn::nn::Linear, TrainError> {
        let cfg = self.config.warmup.clone();
        let start = Instant::now();
        let mut model = head.fork(&self.autodiff).train();
        let mut optim = AdamWConfig::new().with_weight_decay(self.config.weight_decay as f32).init();
        let loss_fn = self.loss_fn();
        let (val_x, _) = val.batch2(&(0..val.len()).collect::<Vec<_>>(), &self.device);
        let val_labels = val.labels.clone();
        let mut best: Option<(usize, f64, f64)> = None;
        let mut best_model = model.valid();
        let mut since_best = 0;
        let mut epochs_run = 0;
        for epoch in 0..cfg.epochs {
            let t0 = Instant::now();
            let lr = cosine(cfg.learning_rate, epoch, cfg.epochs);
            let order = self.shuffled(train.len());
            let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
            for chunk in order.chunks(self.config.batch_size) {
                self.cancel.check()?;
                let (x, y) = train.batch2(chunk, &self.autodiff);
                let mask = dropout_mask(&mut self.rng, chunk.len(), FEATURES, self.config.dropout, &self.autodiff);
                let logits = model.forward(x * mask);
                let loss = loss_fn.forward(logits.clone(), y.clone());
                correct += count_correct(logits, y);
                seen += chunk.len();
                loss_sum += loss.clone().into_scalar::<f32>() as f64 * chunk.len() as f64;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(lr, model, grads);
            }
            let valid = model.valid();
            let mut logits = Vec::new();
            rows_into(valid.forward(val_x.clone()), &mut logits);
            let (val_loss, val_acc) = loss_and_accuracy(&logits, &val_labels);
            epochs_run += 1;
            self.record(EpochMetrics {
                phase: "warmup".into(),
                epoch: epoch + 1,
                train_loss: loss_sum / seen.max(1) as f64,
                train_accuracy: correct as f64 / seen.max(1) as f64,
                val_loss,
                val_accuracy: val_acc,
                learning_rate: lr,
                seconds: t0.elapsed().as_secs_f64(),
            });
            if best.is_none_or(|(_, l, _)| val_loss < l) {
                best = Some((epoch + 1, val_loss, val_acc));
                best_model = valid;
                since_best = 0;
            } else {
                since_best += 1;
                if since_best > cfg.patience {
                    break;
                }
            }
        }
        self.finish_phase("warmup", epochs_run, best, start);
        Ok(best_model)
    }

    /// One optimisation step of a transfer model; returns (model, summed loss, correct).
    fn step(
        &mut self,
        model: TransferModel,
        optim: &mut ModuleOptimizer,
        loss_fn: &CrossEntropyLoss,
        inputs: Tensor<4>,
        targets: Tensor<1, Int>,
        lr: f64,
    ) -> (TransferModel, f64, usize) {
        let rows = targets.dims()[0];
        let n = rows as f64;
        let mask = dropout_mask(&mut self.rng, rows, FEATURES, self.config.dropout, &self.autodiff);
        let logits = model.forward_train(inputs, mask);
        let loss = loss_fn.forward(logits.clone(), targets.clone());
        let correct = count_correct(logits, targets);
        let loss_value = loss.clone().into_scalar::<f32>() as f64 * n;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        (optim.step(lr, model, grads), loss_value, correct)
    }

    /// Trains a transfer model for a phase with early stopping on validation loss.
    /// `epoch_batches` runs one epoch of steps and returns (loss sum, correct, seen).
    fn train_phase(
        &mut self,
        phase: &'static str,
        model: TransferModel,
        epochs: usize,
        patience: usize,
        lr_of: &dyn Fn(usize) -> f64,
        mut run_epoch: impl FnMut(&mut Self, TransferModel, usize, f64) -> Result<(TransferModel, f64, usize, usize), TrainError>,
        mut validate: impl FnMut(&Self, &TransferModel) -> Result<(f64, f64), TrainError>,
    ) -> Result<TransferModel, TrainError> {
        let start = Instant::now();
        let mut model = model.fork(&self.autodiff).train();
        let mut best: Option<(usize, f64, f64)> = None;
        let mut best_model = model.valid();
        let mut since_best = 0;
        let mut epochs_run = 0;
        for epoch in 0..epochs {
            let t0 = Instant::now();
            let lr = lr_of(epoch);
            let (m, loss_sum, correct, seen) = run_epoch(self, model, epoch, lr)?;
            model = m;
            let valid = model.valid();
            let (val_loss, val_acc) = validate(self, &valid)?;
            epochs_run += 1;
            self.record(EpochMetrics {
                phase: phase.into(),
                epoch: epoch + 1,
                train_loss: loss_sum / seen.max(1) as f64,
                train_accuracy: correct as f64 / seen.max(1) as f64,
                val_loss,
                val_accuracy: val_acc,
                learning_rate: lr,
                seconds: t0.elapsed().as_secs_f64(),
            });
            if best.is_none_or(|(_, l, _)| val_loss < l) {
                best = Some((epoch + 1, val_loss, val_acc));
                best_model = valid;
                since_best = 0;
            } else {
                since_best += 1;
                if since_best > patience {
                    break;
                }
            }
        }
        self.finish_phase(phase, epochs_run, best, start);
        Ok(best_model)
    }
}

/// Number of rows whose arg-max matches the target (dtype-agnostic: flex's argmax is i32).
fn count_correct(logits: Tensor<2>, targets: Tensor<1, Int>) -> usize {
    let pred = logits.argmax(1).reshape([targets.dims()[0]]);
    pred.equal(targets).int().sum().into_scalar::<i64>() as usize
}

/// Runs a whole training run. `backbone` must hold the pretrained weights on `device`.
pub fn train(
    dataset: &FolderDataset,
    config: &TrainConfig,
    backbone: &EfficientNetLite0,
    device: &Device,
    events: &mut dyn FnMut(TrainEvent),
    cancel: &Cancel,
) -> Result<TrainOutcome, TrainError> {
    config.validate()?;
    device.seed(config.seed);
    let n_classes = dataset.classes.len();
    let labels: Vec<usize> = dataset.samples.iter().map(|s| s.label).collect();
    let (train_idx, val_idx) = stratified_split(&labels, config.val_fraction, config.seed);
    let pre = Preprocessing::for_size(config.input_size);
    let finetune = config.finetune.enabled;
    // Where the network is cut: the frozen bottom runs once, the top trains from its output.
    let k = if finetune { config.finetune.unfreeze.first_block() } else { NUM_BLOCKS };
    let stream_finetune = finetune && config.finetune.unfreeze == Unfreeze::All;
    let view_ds = |indices: Vec<usize>, views: usize, clean_first: bool, seed: u64| ViewDataset {
        samples: &dataset.samples,
        indices,
        views,
        clean_first,
        pre,
        augment: config.augment.clone(),
        seed,
        max_dimension: config.max_image_dimension,
    };
    let train_ds = view_ds(train_idx.clone(), config.views, config.views > 1, config.seed);
    let val_ds = view_ds(val_idx.clone(), 1, true, config.seed);
    let total_views = train_ds.indices.len() * config.views + val_ds.indices.len();
    let mut done = 0;
    let t_cache = Instant::now();
    let mut report = |n: usize, events: &mut dyn FnMut(TrainEvent)| {
        done += n;
        events(TrainEvent::Progress { stage: "frozen_pass", done, total: total_views });
    };
    let batch = config.batch_size;
    let train_pass = frozen_pass(backbone, k, !stream_finetune, &train_ds, batch, device, cancel, |n| report(n, events))?;
    let val_pass = frozen_pass(backbone, k, true, &val_ds, batch, device, cancel, |n| report(n, events))?;
    let cache_seconds = t_cache.elapsed().as_secs_f64();

    let mut skipped = dataset.skipped.clone();
    let failed: HashSet<usize> = train_pass.failures.iter().chain(&val_pass.failures).map(|f| f.sample).collect();
    for f in train_pass.failures.iter().chain(&val_pass.failures) {
        skipped.push(Skipped { path: f.path.clone(), reason: f.reason.clone() });
    }
    let train_ok: Vec<usize> = train_idx.iter().copied().filter(|i| !failed.contains(i)).collect();
    let val_ok: Vec<usize> = val_idx.iter().copied().filter(|i| !failed.contains(i)).collect();
    for (c, name) in dataset.classes.iter().enumerate() {
        let has = |v: &[usize]| v.iter().any(|&i| labels[i] == c);
        if !has(&train_ok) || !has(&val_ok) {
            return Err(TrainError::EmptyClass(name.clone()));
        }
    }
    let mut train_counts = vec![0; n_classes];
    for &i in &train_ok {
        train_counts[labels[i]] += 1;
    }
    let weights = class_weights(&train_counts, config.class_weighting);

    let mut trainer = Trainer {
        config,
        device: device.clone(),
        autodiff: device.clone().autodiff(),
        weights: weights.clone(),
        events,
        cancel,
        metrics: Vec::new(),
        phases: Vec::new(),
        rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x7472_616e_7366_6572),
    };
    let model_cfg = TransferModelConfig::new(n_classes).with_dropout(config.dropout);
    let mut top = model_cfg.from_backbone(backbone, k, device);
    if config.warmup.enabled {
        top.head = trainer.warmup(top.head.clone(), &train_pass.features, &val_pass.features)?;
    }
    let val_cache = val_pass.activations.expect("validation activations are always kept");
    if finetune {
        let epochs = config.finetune.epochs;
        let lr_of = |e: usize| config.finetune_lr(e);
        top = top.unfreeze();
        let mut optim = AdamWConfig::new().with_weight_decay(config.weight_decay as f32).init();
        let loss_fn = trainer.loss_fn();
        let validate = |t: &Trainer, m: &TransferModel| {
            let logits = logits_of(m, &val_cache, batch, &t.device);
            Ok(loss_and_accuracy(&logits, &val_cache.labels))
        };
        top = if let Some(train_cache) = train_pass.activations.as_ref() {
            trainer.train_phase("finetune", top, epochs, config.finetune.patience, &lr_of, |t, mut model, _, lr| {
                let order = t.shuffled(train_cache.len());
                let (mut loss_sum, mut correct) = (0.0, 0);
                let steps = order.len().div_ceil(batch);
                for (s, chunk) in order.chunks(batch).enumerate() {
                    t.cancel.check()?;
                    let b = train_cache.batch4(chunk, &t.autodiff);
                    let (m, l, c) = t.step(model, &mut optim, &loss_fn, b.inputs, b.targets, lr);
                    (model, loss_sum, correct) = (m, loss_sum + l, correct + c);
                    (t.events)(TrainEvent::Progress { stage: "finetune", done: s + 1, total: steps });
                }
                Ok((model, loss_sum, correct, order.len()))
            }, validate)?
        } else {
            let train_ok = train_ok.clone();
            trainer.train_phase("finetune", top, epochs, config.finetune.patience, &lr_of, |t, model, epoch, lr| {
                let ds = view_ds(train_ok.clone(), 1, false, config.seed.wrapping_add(1 + epoch as u64));
                stream_epoch(t, model, &mut optim, &loss_fn, &ds, lr, "finetune")
            }, validate)?
        };
    }
    let model = top.valid().attach_bottom(backbone);

    // The evaluation always describes the model that is returned.
    let logits = if k == 0 {
        logits_of(&model, &val_cache, batch, device)
    } else {
        let top = model_top(&model, k);
        logits_of(&top, &val_cache, batch, device)
    };
    let paths: Vec<String> = val_cache.samples.iter().map(|&i| dataset.samples[i].path.display().to_string()).collect();
    let evaluation = evaluate(&dataset.classes, &logits, &val_cache.labels, &paths);

    if config.baseline.enabled {
        baseline(&mut trainer, &model_cfg, &view_ds, &train_ok, &val_ok)?;
    }
    Ok(TrainOutcome {
        model,
        classes: dataset.classes.clone(),
        metrics: trainer.metrics,
        phases: trainer.phases,
        evaluation,
        skipped,
        train_images: train_ok.len(),
        val_images: val_ok.len(),
        cache_seconds,
        class_weights: weights,
    })
}

/// The part of a full model from block `k` on (shares its tensors).
fn model_top(model: &TransferModel, k: usize) -> TransferModel {
    TransferModel {
        stem: None,
        blocks: model.blocks[k..].to_vec(),
        conv_head: model.conv_head.clone(),
        bn1: model.bn1.clone(),
        dropout: model.dropout,
        head: model.head.clone(),
        first_block: k,
    }
}

/// One epoch over freshly decoded and augmented views.
fn stream_epoch(
    t: &mut Trainer<'_>,
    model: TransferModel,
    optim: &mut ModuleOptimizer,
    loss_fn: &CrossEntropyLoss,
    ds: &ViewDataset<'_>,
    lr: f64,
    stage: &'static str,
) -> Result<(TransferModel, f64, usize, usize), TrainError> {
    let size = ds.pre.input_size;
    let batcher = TensorBatcher { shape: [3, size, size] };
    let mut slot = Some(model);
    let (mut loss_sum, mut correct, mut seen) = (0.0, 0, 0);
    let total = ds.indices.len();
    let batch = t.config.batch_size;
    let cancel = t.cancel.clone();
    stream_views(ds, batch, &cancel, |rows| {
        let n = rows.len();
        let b = batcher.batch(rows.into_iter().map(|(v, l, _)| (v, l)).collect(), &t.autodiff);
        let (m, l, c) = t.step(slot.take().expect("model"), optim, loss_fn, b.inputs, b.targets, lr);
        slot = Some(m);
        (loss_sum, correct, seen) = (loss_sum + l, correct + c, seen + n);
        (t.events)(TrainEvent::Progress { stage, done: seen, total });
        Ok(())
    })?;
    Ok((slot.expect("model"), loss_sum, correct, seen))
}

/// The from-scratch comparison: random weights, no warm-up, whole network trained on
/// streamed views. BatchNorm uses batch statistics, since random weights have no stored ones.
fn baseline<'d>(
    t: &mut Trainer<'_>,
    model_cfg: &TransferModelConfig,
    view_ds: &dyn Fn(Vec<usize>, usize, bool, u64) -> ViewDataset<'d>,
    train_ok: &[usize],
    val_ok: &[usize],
) -> Result<(), TrainError> {
    let cfg = t.config.baseline.clone();
    let seed = t.config.seed;
    let batch = t.config.batch_size;
    let model = model_cfg.init(&t.device).use_batch_statistics();
    let mut optim = AdamWConfig::new().with_weight_decay(t.config.weight_decay as f32).init();
    let loss_fn = t.loss_fn();
    let val = view_ds(val_ok.to_vec(), 1, true, seed);
    let lr_of = |e: usize| cosine(cfg.learning_rate, e, cfg.epochs);
    t.train_phase("baseline", model, cfg.epochs, cfg.epochs, &lr_of, |t, model, epoch, lr| {
        let ds = view_ds(train_ok.to_vec(), 1, false, seed.wrapping_add(1000 + epoch as u64));
        stream_epoch(t, model, &mut optim, &loss_fn, &ds, lr, "baseline")
    }, |t, m| {
        let size = val.pre.input_size;
        let batcher = TensorBatcher { shape: [3, size, size] };
        let (mut logits, mut labels) = (Vec::new(), Vec::new());
        stream_views(&val, batch, t.cancel, |rows| {
            labels.extend(rows.iter().map(|r| r.1));
            let b = batcher.batch(rows.into_iter().map(|(v, l, _)| (v, l)).collect(), &t.device);
            rows_into(m.forward(b.inputs), &mut logits);
            Ok(())
        })?;
        Ok(loss_and_accuracy(&logits, &labels))
    })?;
    Ok(())
}
