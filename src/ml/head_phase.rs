//! The warm-up as a run sees it: the head solved on the frozen pass's pooled features, its
//! penalty chosen by k-fold (small sets) or on the validation split, and the metrics row and
//! held-out logits the rest of `fit` reports from.

use std::time::Instant;

use burn::nn::Linear;
use burn::prelude::*;

use super::cache::RowCache;
use super::config::TrainConfig;
use super::events::{Cancel, EpochMetrics, Phase, TrainError};
use super::head_fit::{self, L2_GRID, Standardizer};
use super::phases::rows_into;
use super::plan::EstimateMethod;
use super::plan::PathPoint;

/// What the head phase hands on.
pub(crate) struct HeadOutcome {
    /// Under k-fold the head fitted on every photo; under a holdout on the training split.
    pub linear: Linear,
    pub l2: f64,
    pub path: Vec<PathPoint>,
    /// k-fold only: (sample, logits) of each photo's clean view from a head that never saw it.
    pub held_out: Vec<(usize, Vec<f32>)>,
    /// The phase's one metrics row (the solver has no epochs).
    pub metrics: EpochMetrics,
    /// (epoch, held-out loss, held-out accuracy), as a phase summary reports it.
    pub best: (usize, f64, f64),
    pub started: Instant,
}

/// The frozen pass's features the head is solved on.
pub(crate) struct HeadInput<'a> {
    pub train: &'a RowCache,
    /// Empty under a k-fold estimate.
    pub val: &'a RowCache,
    /// Whether each training photo's first view is its clean one.
    pub train_clean_first: bool,
    pub estimate: EstimateMethod,
}

/// Solves the head; see the module header.
pub(crate) fn head_phase(
    input: HeadInput<'_>,
    config: &TrainConfig,
    class_weights: Option<&[f32]>,
    classes: usize,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
    cancel: &Cancel,
) -> Result<HeadOutcome, TrainError> {
    let started = Instant::now();
    let (train, val) = (input.train, input.val);
    let st = Standardizer::fit(&[train, val]);
    let rows = st.rows(
        &[(train, input.train_clean_first), (val, true)],
        class_weights,
    );
    let fixed;
    let grid: &[f64] = match config.warmup.l2 {
        Some(l2) => {
            fixed = [l2];
            &fixed
        }
        None => &L2_GRID,
    };
    let stop = || cancel.is_cancelled();
    let train_rows: Vec<usize> = (0..train.len()).collect();
    let (selection, linear, fitted_rows) = match input.estimate {
        EstimateMethod::Kfold => {
            let folds = config.warmup.folds;
            let sel =
                head_fit::select_kfold(&rows, classes, folds, config.seed, grid, progress, &stop);
            cancel.check()?;
            let all = head_fit::fit_rows(&rows, classes, None, sel.l2, None);
            (sel, all, (0..rows.len()).collect::<Vec<_>>())
        }
        EstimateMethod::Holdout => {
            let val_rows = (train.len()..rows.len()).collect();
            let sel = head_fit::select_holdout(
                &rows,
                classes,
                train_rows.clone(),
                val_rows,
                grid,
                progress,
                &stop,
            );
            cancel.check()?;
            // The search stops its fits early; the head that goes on is solved tightly.
            let searched = sel.model.clone().expect("a holdout search keeps its model");
            let model =
                head_fit::fit_rows(&rows, classes, Some(&train_rows), sel.l2, Some(&searched));
            (sel, model, train_rows)
        }
    };
    let clean: Vec<usize> = fitted_rows.into_iter().filter(|&i| rows.clean[i]).collect();
    let scored = if clean.is_empty() {
        (0..train.len()).collect()
    } else {
        clean
    };
    let (train_loss, train_accuracy) = head_fit::loss_and_accuracy(&linear, &rows, &scored);
    let chosen = selection
        .path
        .iter()
        .find(|p| p.l2 == selection.l2)
        .expect("the chosen penalty is on the path")
        .clone();
    let metrics = EpochMetrics {
        phase: Phase::Warmup,
        epoch: 1,
        train_loss,
        train_accuracy,
        val_loss: chosen.nll,
        val_accuracy: chosen.accuracy,
        learning_rate: 0.0,
        seconds: started.elapsed().as_secs_f64(),
    };
    let held_out = selection
        .held_out
        .into_iter()
        .map(|(row, logits)| (rows.groups[row], logits))
        .collect();
    Ok(HeadOutcome {
        linear: st.to_linear(&linear, device),
        l2: selection.l2,
        path: selection.path,
        held_out,
        metrics,
        best: (1, chosen.nll, chosen.accuracy),
        started,
    })
}

/// Logits of a head over cached pooled features, in row order.
pub fn head_logits(head: &Linear, features: &RowCache, device: &Device) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(features.len());
    let idx: Vec<usize> = (0..features.len()).collect();
    for chunk in idx.chunks(256) {
        let (x, _) = features.batch2(chunk, device);
        rows_into(head.forward(x), &mut out);
    }
    out
}
