//! Training on views decoded and augmented afresh each epoch instead of a cache: whole-network
//! fine-tuning (`"unfreeze": "all"`) and the from-scratch baseline.

use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::{AdamWConfig, ModuleOptimizer};
use rand::seq::SliceRandom;

use super::cache::stream_views;
use super::config::cosine;
use super::data::{TensorBatcher, ViewDataset};
use super::events::{Phase, Stage, TrainError, TrainEvent};
use super::head::{TransferModel, TransferModelConfig};
use super::phases::{Trainer, loss_and_accuracy, rows_into};

/// One epoch over freshly decoded and augmented views.
pub(crate) fn stream_epoch(
    t: &mut Trainer<'_>,
    model: TransferModel,
    optim: &mut ModuleOptimizer,
    loss_fn: &CrossEntropyLoss,
    ds: &ViewDataset<'_>,
    lr: f64,
    phase: Phase,
) -> Result<(TransferModel, f64, usize, usize), TrainError> {
    let size = ds.pre.input_size;
    let batcher = TensorBatcher {
        shape: [3, size, size],
    };
    let mut slot = Some(model);
    let (mut loss_sum, mut correct, mut seen) = (0.0, 0, 0);
    let total = ds.indices.len();
    let batch = t.config.batch_size;
    let cancel = t.cancel.clone();
    let streamed = stream_views(ds, batch, &cancel, |rows| {
        if t.past_deadline() {
            return Err(TrainError::BudgetSpent);
        }
        let n = rows.len();
        let b = batcher.batch(
            rows.into_iter().map(|(v, l, _)| (v, l)).collect(),
            &t.autodiff,
        );
        let (m, l, c) = t.step(
            slot.take().expect("model"),
            optim,
            loss_fn,
            b.inputs,
            b.targets,
            lr,
        )?;
        slot = Some(m);
        (loss_sum, correct, seen) = (loss_sum + l, correct + c, seen + n);
        (t.events)(TrainEvent::Progress {
            stage: Stage::Phase(phase),
            done: seen,
            total,
        });
        Ok(())
    });
    match streamed {
        Ok(_) | Err(TrainError::BudgetSpent) => {}
        Err(e) => return Err(e),
    }
    Ok((slot.expect("model"), loss_sum, correct, seen))
}

/// The from-scratch comparison: random weights, no warm-up, whole network trained on
/// streamed views. BatchNorm uses batch statistics, since random weights have no stored ones.
pub(crate) fn baseline<'d>(
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
    let mut optim = AdamWConfig::new()
        .with_weight_decay(t.config.weight_decay as f32)
        .init();
    let loss_fn = t.loss_fn();
    // Mixed-class validation batches: batch statistics of a one-class batch would leak it.
    let mut val_order = val_ok.to_vec();
    val_order.shuffle(&mut t.rng);
    let val = view_ds(val_order, 1, true, seed);
    let lr_of = |e: usize| cosine(cfg.learning_rate, e, cfg.epochs);
    t.deadline = cfg
        .max_seconds
        .map(|s| Instant::now() + std::time::Duration::from_secs_f64(s));
    let result = t.train_phase(
        Phase::Baseline,
        model,
        false,
        cfg.epochs,
        cfg.epochs,
        &lr_of,
        |t, model, epoch, lr| {
            let ds = view_ds(
                t.shuffled(train_ok.iter().copied()),
                1,
                false,
                seed.wrapping_add(1000 + epoch as u64),
            );
            stream_epoch(t, model, &mut optim, &loss_fn, &ds, lr, Phase::Baseline)
        },
        |t, m| {
            let size = val.pre.input_size;
            let batcher = TensorBatcher {
                shape: [3, size, size],
            };
            let (mut logits, mut labels) = (Vec::new(), Vec::new());
            stream_views(&val, batch, t.cancel, |rows| {
                labels.extend(rows.iter().map(|r| r.1));
                let b = batcher.batch(
                    rows.into_iter().map(|(v, l, _)| (v, l)).collect(),
                    &t.device,
                );
                rows_into(m.forward(b.inputs), &mut logits);
                Ok(())
            })?;
            Ok(loss_and_accuracy(&logits, &labels))
        },
    );
    t.deadline = None;
    result.map(|_| ())
}
