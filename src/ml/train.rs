//! A training run: split and frozen pass (`prepare`), then warm-up, fine-tune, optional
//! from-scratch baseline and evaluation (`fit`). Runs on the calling thread (never an async executor), reports through a
//! callback and stops at the next step boundary when cancelled.

use std::collections::HashSet;
use std::time::Instant;

use burn::nn::Linear;
use burn::optim::AdamWConfig;
use burn::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::audit;
use super::backbone::{Backbone, EfficientNetLite};
use super::cache::{FrozenPass, frozen_pass};
use super::config::{ClassWeighting, TrainConfig};
use super::data::{FolderDataset, Skipped, ViewDataset, imbalanced, stratified_split};
use super::evaluate::{Evaluation, evaluate};
use super::events::{Cancel, EpochMetrics, Phase, PhaseSummary, Stage, TrainError, TrainEvent};
use super::head::{TransferModel, TransferModelConfig};
use super::head_fit::{self, Standardizer};
use super::head_phase::{HeadInput, head_logits, head_phase};
use super::ood::{self, Gaussians, OodSummary};
use super::phases::{Trainer, features_of, logits_of, loss_and_accuracy};
use super::plan::{EstimateMethod, FinetuneDecision, HeadReport, Plan, TrainingReport};
use super::preprocess::Preprocessing;
use super::streamed::{baseline, stream_epoch};

/// Called with the warm-up's head so the caller can checkpoint it.
pub type OnWarmup<'h> = &'h mut dyn FnMut(&Linear) -> Result<(), TrainError>;

/// Lets a long-lived caller (the service) checkpoint a run between phases and resume it
/// after a restart without repeating the warm-up.
#[derive(Default)]
pub struct Resume<'h> {
    /// A head from an earlier warm-up of this same run (same data, split and seed). The head
    /// is solved again (it takes seconds, and its penalty search yields the reported
    /// figures), and this head is used in its place, so a resumed run fine-tunes from the
    /// head it checkpointed.
    pub warm_head: Option<Linear>,
    /// Called with the head as soon as the warm-up is finished.
    pub on_warmup: Option<OnWarmup<'h>>,
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
    pub backbone: Backbone,
    /// How images become the model's input.
    pub preprocessing: Preprocessing,
    /// The out-of-distribution statistics of the served network, when its features could be
    /// computed (not after a streamed whole-network fine-tune).
    pub ood: Option<(Gaussians, OodSummary)>,
    /// Under a holdout with a refit: the head the evaluation judged, before the refit on the
    /// validation photos replaced it (benchmarks score perturbed validation photos with it).
    pub evaluated_head: Option<Linear>,
}

/// Inverse-frequency weights, normalised to mean 1, when the config asks for them.
pub fn class_weights(counts: &[usize], mode: ClassWeighting) -> Option<Vec<f32>> {
    counts.iter().max()?;
    let on = match mode {
        ClassWeighting::On => true,
        ClassWeighting::Off => false,
        ClassWeighting::Auto => imbalanced(counts),
    };
    if !on {
        return None;
    }
    let inv: Vec<f64> = counts.iter().map(|&c| 1.0 / c.max(1) as f64).collect();
    let mean = inv.iter().sum::<f64>() / inv.len() as f64;
    Some(inv.iter().map(|w| (w / mean) as f32).collect())
}

/// The frozen pass of a run, reusable by several `fit`s with other head/fine-tune settings.
pub struct Prepared {
    /// What the run does with this data (the cut, the estimate, whether it fine-tunes).
    pub plan: Plan,
    pub train: FrozenPass,
    /// Empty under a k-fold estimate: every photo is on the training side.
    pub val: FrozenPass,
    /// Sample indices that decoded, per side of the split.
    pub train_ok: Vec<usize>,
    pub val_ok: Vec<usize>,
    pub skipped: Vec<Skipped>,
    pub cache_seconds: f64,
    /// Whether each training photo's first cached view is its clean one.
    pub train_clean_first: bool,
}

/// The plan of a run of `config` on `dataset`: callers load `plan.backbone` before `prepare`.
pub fn plan(dataset: &FolderDataset, config: &TrainConfig) -> Plan {
    Plan::new(config, &dataset.counts())
}

fn view_dataset<'d>(
    dataset: &'d FolderDataset,
    config: &TrainConfig,
    input_size: usize,
    indices: Vec<usize>,
    views: usize,
    clean_first: bool,
    seed: u64,
) -> ViewDataset<'d> {
    ViewDataset {
        samples: &dataset.samples,
        indices,
        views,
        clean_first,
        pre: Preprocessing::for_size(input_size),
        augment: config.augment.clone(),
        seed,
        max_dimension: config.max_image_dimension,
    }
}

/// Plans the run, splits the data (or keeps it whole for a k-fold estimate) and runs the
/// frozen backbone over every view once.
pub fn prepare(
    dataset: &FolderDataset,
    config: &TrainConfig,
    backbone: &EfficientNetLite,
    device: &Device,
    events: &mut dyn FnMut(TrainEvent),
    cancel: &Cancel,
) -> Result<Prepared, TrainError> {
    config.validate()?;
    let plan = plan(dataset, config);
    if backbone.kind() != plan.backbone {
        return Err(TrainError::WrongBackbone {
            planned: plan.backbone,
            given: backbone.kind(),
        });
    }
    let labels: Vec<usize> = dataset.samples.iter().map(|s| s.label).collect();
    let kfold = plan.estimate == EstimateMethod::Kfold;
    let (train_idx, val_idx) = if kfold {
        ((0..labels.len()).collect(), Vec::new())
    } else {
        stratified_split(&labels, config.val_fraction, config.seed)
    };
    let k = plan.cut;
    let stream_finetune = plan.finetune && k == 0;
    // Held-out photos are scored on their clean view, so k-fold needs one for every photo.
    let train_clean_first = config.views > 1 || kfold;
    let train_ds = view_dataset(
        dataset,
        config,
        plan.input_size,
        train_idx.clone(),
        config.views,
        train_clean_first,
        config.seed,
    );
    let val_ds = view_dataset(
        dataset,
        config,
        plan.input_size,
        val_idx.clone(),
        1,
        true,
        config.seed,
    );
    let total = train_ds.indices.len() * config.views + val_ds.indices.len();
    let mut done = 0;
    let started = Instant::now();
    let mut report = |n: usize, events: &mut dyn FnMut(TrainEvent)| {
        done += n;
        events(TrainEvent::Progress {
            stage: Stage::FrozenPass,
            done,
            total,
        });
    };
    let batch = config.batch_size;
    let keep = plan.finetune && !stream_finetune;
    let train = frozen_pass(backbone, k, keep, &train_ds, batch, device, cancel, |n| {
        report(n, events)
    })?;
    let val = frozen_pass(
        backbone,
        k,
        plan.finetune,
        &val_ds,
        batch,
        device,
        cancel,
        |n| report(n, events),
    )?;

    let mut skipped = dataset.skipped.clone();
    let failed: HashSet<usize> = train
        .failures
        .iter()
        .chain(&val.failures)
        .map(|f| f.sample)
        .collect();
    for f in train.failures.iter().chain(&val.failures) {
        skipped.push(Skipped {
            name: f.path.clone(),
            reason: f.reason.clone(),
        });
    }
    let train_ok: Vec<usize> = train_idx
        .into_iter()
        .filter(|i| !failed.contains(i))
        .collect();
    let val_ok: Vec<usize> = val_idx
        .into_iter()
        .filter(|i| !failed.contains(i))
        .collect();
    for (c, name) in dataset.classes.iter().enumerate() {
        let has = |v: &[usize]| v.iter().any(|&i| labels[i] == c);
        if !has(&train_ok) || (!kfold && !has(&val_ok)) {
            return Err(TrainError::EmptyClass(name.clone()));
        }
    }
    Ok(Prepared {
        plan,
        train,
        val,
        train_ok,
        val_ok,
        skipped,
        cache_seconds: started.elapsed().as_secs_f64(),
        train_clean_first,
    })
}

/// Head, fine-tune, evaluation, refit (and the baseline when asked) on a prepared frozen
/// pass, resuming from (and checkpointing) the warm-up as `resume` says
/// (`Resume::default()` for neither). `config` may differ from the one `prepared` was made
/// with in anything that leaves its plan unchanged.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    prepared: &Prepared,
    dataset: &FolderDataset,
    config: &TrainConfig,
    backbone: &EfficientNetLite,
    device: &Device,
    events: &mut dyn FnMut(TrainEvent),
    cancel: &Cancel,
    resume: Resume<'_>,
) -> Result<TrainOutcome, TrainError> {
    config.validate()?;
    let plan = plan(dataset, config);
    if backbone.kind() != plan.backbone {
        return Err(TrainError::WrongBackbone {
            planned: plan.backbone,
            given: backbone.kind(),
        });
    }
    if plan.cut != prepared.plan.cut
        || plan.estimate != prepared.plan.estimate
        || plan.finetune != prepared.plan.finetune
        || plan.input_size != prepared.plan.input_size
    {
        return Err(TrainError::CutMismatch {
            prepared: prepared.plan.cut,
            config: plan.cut,
        });
    }
    device.seed(config.seed);
    let n_classes = dataset.classes.len();
    let k = prepared.plan.cut;
    let mut train_counts = vec![0; n_classes];
    for &i in &prepared.train_ok {
        train_counts[dataset.samples[i].label] += 1;
    }
    let weights = class_weights(&train_counts, config.class_weighting);
    let batch = config.batch_size;
    let model_cfg = TransferModelConfig::new(n_classes)
        .with_dropout(config.dropout)
        .with_backbone(plan.backbone);
    let mut top = model_cfg.from_backbone(backbone, k, device);
    let paths_of = |samples: &[usize]| -> Vec<String> {
        samples
            .iter()
            .map(|&i| dataset.samples[i].path.display().to_string())
            .collect()
    };

    // The head, solved on the cached pooled features.
    let head = if config.warmup.enabled {
        let mut progress = |done, total| {
            events(TrainEvent::Progress {
                stage: Stage::Phase(Phase::Warmup),
                done,
                total,
            })
        };
        let input = HeadInput {
            train: &prepared.train.features,
            val: &prepared.val.features,
            train_clean_first: prepared.train_clean_first,
            estimate: prepared.plan.estimate,
        };
        Some(head_phase(
            input,
            config,
            weights.as_deref(),
            n_classes,
            device,
            &mut progress,
            cancel,
        )?)
    } else {
        None
    };
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
        deadline: None,
        step_parts: 1,
        lanes: super::lanes::lanes(device),
        incoming_val_loss: None,
    };
    if let Some(h) = &head {
        trainer.record(h.metrics.clone());
        trainer.finish_phase(Phase::Warmup, 1, Some(h.best), h.started);
        top.head = match resume.warm_head {
            Some(warm) => warm,
            None => h.linear.clone(),
        };
        if let Some(on_warmup) = resume.on_warmup {
            on_warmup(&top.head)?;
        }
    }

    let mut decision = FinetuneDecision {
        ran: false,
        kept: false,
        reason: plan.reason.clone(),
        val_loss_head_only: None,
        val_loss_finetuned: None,
    };
    let view_ds = |indices: Vec<usize>, views: usize, clean_first: bool, seed: u64| {
        view_dataset(
            dataset,
            config,
            plan.input_size,
            indices,
            views,
            clean_first,
            seed,
        )
    };
    if plan.finetune {
        let val_cache = prepared
            .val
            .activations
            .as_ref()
            .expect("validation activations are kept when fine-tuning");
        let epochs = config.finetune.epochs;
        let lr_of = |e: usize| config.finetune_lr(e);
        top = top.unfreeze();
        let mut optim = AdamWConfig::new()
            .with_weight_decay(config.weight_decay as f32)
            .init();
        let loss_fn = trainer.loss_fn();
        let validate = |t: &Trainer, m: &TransferModel| {
            let logits = logits_of(m, val_cache, batch, &t.device);
            Ok(loss_and_accuracy(&logits, &val_cache.labels))
        };
        let patience = config.finetune.patience;
        let metrics_before = trainer.metrics.len();
        top = if let Some(train_cache) = prepared.train.activations.as_ref() {
            trainer.train_phase(
                Phase::Finetune,
                top,
                true,
                epochs,
                patience,
                &lr_of,
                |t, mut model, _, lr| {
                    let order = t.shuffled(0..train_cache.len());
                    let (mut loss_sum, mut correct) = (0.0, 0);
                    let steps = order.len().div_ceil(batch);
                    for (s, chunk) in order.chunks(batch).enumerate() {
                        t.cancel.check()?;
                        let b = train_cache.batch4(chunk, &t.autodiff);
                        let (m, l, c) =
                            t.step(model, &mut optim, &loss_fn, b.inputs, b.targets, lr)?;
                        (model, loss_sum, correct) = (m, loss_sum + l, correct + c);
                        (t.events)(TrainEvent::Progress {
                            stage: Stage::Phase(Phase::Finetune),
                            done: s + 1,
                            total: steps,
                        });
                    }
                    Ok((model, loss_sum, correct, order.len()))
                },
                validate,
            )?
        } else {
            trainer.train_phase(
                Phase::Finetune,
                top,
                true,
                epochs,
                patience,
                &lr_of,
                |t, model, epoch, lr| {
                    let ds = view_ds(
                        t.shuffled(prepared.train_ok.iter().copied()),
                        1,
                        false,
                        config.seed.wrapping_add(1 + epoch as u64),
                    );
                    stream_epoch(t, model, &mut optim, &loss_fn, &ds, lr, Phase::Finetune)
                },
                validate,
            )?
        };
        let summary = trainer
            .phases
            .last()
            .expect("the fine-tune phase just finished");
        decision.ran = true;
        decision.kept = summary.best_epoch > 0;
        decision.val_loss_head_only = trainer.incoming_val_loss;
        decision.val_loss_finetuned = trainer.metrics[metrics_before..]
            .iter()
            .map(|m| m.val_loss)
            .reduce(f64::min);
        let verdict = if decision.kept {
            "validation loss improved, so the fine-tuned network is used"
        } else {
            "validation loss did not improve, so the head-only network is used"
        };
        decision.reason = format!("{}; {verdict}", plan.reason);
    }
    let mut model = top.valid().attach_bottom(backbone);

    // The evaluation describes the model as it was judged: out of fold for k-fold, the
    // training-split model on the validation photos for a holdout.
    let (logits, labels, samples) = match (&head, plan.estimate) {
        (Some(h), EstimateMethod::Kfold) => {
            let samples: Vec<usize> = h.held_out.iter().map(|r| r.0).collect();
            let logits = h.held_out.iter().map(|r| r.1.clone()).collect();
            let labels = samples.iter().map(|&i| dataset.samples[i].label).collect();
            (logits, labels, samples)
        }
        _ => {
            let val = &prepared.val.features;
            let logits = match prepared.val.activations.as_ref() {
                Some(acts) => logits_of(&model.top(k), acts, batch, device),
                None => head_logits(&model.head, val, device),
            };
            (logits, val.labels.clone(), val.samples.clone())
        }
    };
    let mut evaluation = evaluate(&dataset.classes, &logits, &labels, &paths_of(&samples));

    // Refit: the served head sees every photo.
    let mut trained_on = prepared.train_ok.len();
    let mut evaluated_head = None;
    // The served network's pooled features (the frozen ones unless a fine-tune was kept).
    let served = if decision.kept {
        let top = model.top(k);
        prepared
            .train
            .activations
            .as_ref()
            .zip(prepared.val.activations.as_ref())
            .map(|(t, v)| {
                (
                    features_of(&top, t, batch, device),
                    features_of(&top, v, batch, device),
                )
            })
    } else {
        Some((
            prepared.train.features.clone(),
            prepared.val.features.clone(),
        ))
    };
    cancel.check()?;
    evaluation.audit = Some(audit::audit_run(
        prepared,
        dataset,
        head.as_ref().map_or(audit::DEFAULT_L2, |h| h.l2),
        config,
    ));
    cancel.check()?;
    let ood = served.as_ref().and_then(|(train_f, val_f)| {
        ood::calibrate(train_f, val_f, n_classes, config.warmup.folds, config.seed)
    });
    evaluation.ood = ood.as_ref().map(|o| o.1.clone());
    if let (Some(h), true, EstimateMethod::Holdout) = (&head, config.refit, plan.estimate) {
        if let Some((train_f, val_f)) = served {
            let st = Standardizer::fit(&[&train_f, &val_f]);
            let rows = st.rows(
                &[(&train_f, prepared.train_clean_first), (&val_f, true)],
                weights.as_deref(),
            );
            // The fine-tuned network's features are not the frozen ones the penalty was
            // chosen on: choose it again on them, on the same split, before the refit.
            let l2 = if decision.kept && config.warmup.l2.is_none() {
                let split = train_f.len();
                head_fit::select_holdout(
                    &rows,
                    n_classes,
                    (0..split).collect(),
                    (split..rows.len()).collect(),
                    &head_fit::L2_GRID,
                    &mut |_, _| {},
                    &|| cancel.is_cancelled(),
                )
                .l2
            } else {
                h.l2
            };
            cancel.check()?;
            let refit = head_fit::fit_rows(&rows, n_classes, None, l2, None);
            evaluated_head = Some(std::mem::replace(
                &mut model.head,
                st.to_linear(&refit, device),
            ));
            trained_on += prepared.val_ok.len();
        }
    }
    evaluation.training = Some(TrainingReport {
        backbone: plan.backbone,
        backbone_reason: plan.backbone_reason.clone(),
        estimate: plan.estimate,
        folds: (plan.estimate == EstimateMethod::Kfold).then_some(config.warmup.folds),
        estimate_images: labels.len(),
        head: HeadReport {
            l2: head.as_ref().map(|h| h.l2),
            path: head.as_ref().map(|h| h.path.clone()).unwrap_or_default(),
        },
        finetune: decision,
        trained_on_images: trained_on,
        // Whether the served model saw photos the estimate held out.
        refit: plan.estimate == EstimateMethod::Kfold || evaluated_head.is_some(),
    });

    if config.baseline.enabled {
        baseline(
            &mut trainer,
            &model_cfg,
            &view_ds,
            &prepared.train_ok,
            &prepared.val_ok,
        )?;
    }
    Ok(TrainOutcome {
        model,
        classes: dataset.classes.clone(),
        metrics: trainer.metrics,
        phases: trainer.phases,
        evaluation,
        skipped: prepared.skipped.clone(),
        train_images: prepared.train_ok.len(),
        val_images: prepared.val_ok.len(),
        cache_seconds: prepared.cache_seconds,
        class_weights: weights,
        backbone: plan.backbone,
        preprocessing: Preprocessing::for_size(plan.input_size),
        evaluated_head,
        ood,
    })
}

/// Runs a whole training run. `backbone` must hold the pretrained weights of the plan's
/// backbone ([`plan`]) on `device`.
pub fn train(
    dataset: &FolderDataset,
    config: &TrainConfig,
    backbone: &EfficientNetLite,
    device: &Device,
    events: &mut dyn FnMut(TrainEvent),
    cancel: &Cancel,
) -> Result<TrainOutcome, TrainError> {
    let prepared = prepare(dataset, config, backbone, device, events, cancel)?;
    fit(
        &prepared,
        dataset,
        config,
        backbone,
        device,
        events,
        cancel,
        Resume::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_weights_follow_the_imbalance_rule() {
        assert_eq!(
            class_weights(&[100, 80], ClassWeighting::Auto),
            None,
            "1.25:1 is balanced enough"
        );
        let w = class_weights(&[100, 50], ClassWeighting::Auto).expect("2:1 is weighted");
        assert!(
            (w[0] - 2.0 / 3.0).abs() < 1e-6 && (w[1] - 4.0 / 3.0).abs() < 1e-6,
            "{w:?}"
        );
        assert_eq!(class_weights(&[100, 50], ClassWeighting::Off), None);
        assert!(class_weights(&[10, 10], ClassWeighting::On).is_some_and(|w| w == vec![1.0, 1.0]));
    }
}
