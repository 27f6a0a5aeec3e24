//! The head on cached pooled features: the L2 strength chosen on held-out photos (stratified
//! k-fold cross-validation, or the validation split), then the final fit, then the burn
//! `Linear` that the saved network carries.
//!
//! Features are centred per channel and scaled by one global factor (unit mean variance), not
//! per channel: a global scale only moves the penalty's units, so the grid below means the
//! same for every backbone, while the relative scale of the channels, which the pretrained
//! network chose, is kept (per-channel scaling would blow up near-dead channels' noise).
//! The statistics come from every row, labels unseen, so no fold learns anything from them.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::cache::RowCache;
use super::plan::PathPoint;
use super::softmax::{self, Problem, Softmax};

/// Penalties tried, strongest first, so each fit warm-starts from the previous optimum. In
/// units of the mean loss on unit-variance features; scikit-learn's `C` is `1 / (λ·n)`.
pub const L2_GRID: [f64; 11] = [
    1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5,
];
/// The path stops once held-out loss has been worse than its best for this many penalties in
/// a row: the curve has one minimum, and the weakest penalties are the slowest to fit.
const PATH_PATIENCE: usize = 2;

/// Cached feature rows prepared for the solver.
pub struct Rows {
    /// Standardised, row-major `n × dim`.
    pub x: Vec<f64>,
    pub dim: usize,
    pub labels: Vec<usize>,
    /// The photo each row is a view of: folds never split a photo's views.
    pub groups: Vec<usize>,
    /// Whether the row is a photo's clean (unaugmented) view: only those are scored.
    pub clean: Vec<bool>,
    /// Class weight over the photo's view count, so every photo counts once.
    pub weights: Vec<f64>,
}

/// Centring and the global scale, kept to map the fitted head back to raw features.
#[derive(Debug, Clone)]
pub struct Standardizer {
    pub mean: Vec<f64>,
    pub scale: f64,
}

impl Standardizer {
    /// From every row of `caches` (rows of equal width).
    pub fn fit(caches: &[&RowCache]) -> Self {
        let dim = caches[0].shape.iter().product::<usize>();
        let n: usize = caches.iter().map(|c| c.len()).sum();
        let mut mean = vec![0.0; dim];
        for c in caches {
            for r in 0..c.len() {
                for (m, &v) in mean.iter_mut().zip(c.row(r)) {
                    *m += v as f64;
                }
            }
        }
        mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
        let mut var = 0.0;
        for c in caches {
            for r in 0..c.len() {
                var += c
                    .row(r)
                    .iter()
                    .zip(&mean)
                    .map(|(&v, m)| (v as f64 - m).powi(2))
                    .sum::<f64>();
            }
        }
        let mean_var = var / (n.max(1) * dim) as f64;
        Self {
            mean,
            scale: 1.0 / mean_var.sqrt().max(1e-12),
        }
    }

    /// The standardised rows of `caches`, in order. A row is clean when it is the first of
    /// its photo in a cache whose first view is the clean one.
    pub fn rows(&self, caches: &[(&RowCache, bool)], class_weights: Option<&[f32]>) -> Rows {
        let dim = self.mean.len();
        let mut out = Rows {
            x: Vec::new(),
            dim,
            labels: Vec::new(),
            groups: Vec::new(),
            clean: Vec::new(),
            weights: Vec::new(),
        };
        let mut views: BTreeMap<usize, usize> = BTreeMap::new();
        for (cache, clean_first) in caches {
            let mut seen = std::collections::HashSet::new();
            for r in 0..cache.len() {
                out.x.extend(
                    cache
                        .row(r)
                        .iter()
                        .zip(&self.mean)
                        .map(|(&v, m)| (v as f64 - m) * self.scale),
                );
                let group = cache.samples[r];
                out.labels.push(cache.labels[r]);
                out.groups.push(group);
                out.clean.push(*clean_first && seen.insert(group));
                *views.entry(group).or_default() += 1;
            }
        }
        out.weights = out
            .labels
            .iter()
            .zip(&out.groups)
            .map(|(&y, g)| class_weights.map_or(1.0, |w| w[y] as f64) / views[g] as f64)
            .collect();
        out
    }

    /// The head on raw features: `W·(x − μ)·s + b = (s·W)·x + (b − s·W·μ)`.
    pub fn to_linear(&self, model: &Softmax, device: &Device) -> Linear {
        let (d, k) = (model.dim, model.classes);
        let mut weight = vec![0.0f32; d * k];
        let mut bias = model.b.clone();
        for c in 0..k {
            for j in 0..d {
                let w = model.w[c * d + j] * self.scale;
                weight[j * k + c] = w as f32;
                bias[c] -= w * self.mean[j];
            }
        }
        let bias: Vec<f32> = bias.iter().map(|&b| b as f32).collect();
        Linear {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(weight, [d, k]), device)),
            bias: Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(bias, [k]),
                device,
            ))),
        }
    }
}

impl Rows {
    fn problem<'a>(&'a self, rows: &'a [usize], classes: usize) -> Problem<'a> {
        Problem {
            x: &self.x,
            dim: self.dim,
            labels: &self.labels,
            weights: &self.weights,
            rows,
            classes,
        }
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.x[i * self.dim..(i + 1) * self.dim]
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Assigns each photo (group) to one of `k` folds, stratified: each class's photos, in a
/// seeded random order, are dealt round-robin, continuing where the previous class stopped so
/// that fold sizes stay even too.
pub fn stratified_folds(groups: &[(usize, usize)], k: usize, seed: u64) -> BTreeMap<usize, usize> {
    let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(group, label) in groups {
        by_class.entry(label).or_default().push(group);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x666f_6c64);
    let mut next = 0;
    let mut fold_of = BTreeMap::new();
    for members in by_class.values_mut() {
        members.sort_unstable();
        members.dedup();
        members.shuffle(&mut rng);
        for &g in members.iter() {
            fold_of.insert(g, next % k);
            next += 1;
        }
    }
    fold_of
}

/// What the penalty search found.
pub struct Selection {
    pub l2: f64,
    pub path: Vec<PathPoint>,
    /// Logits of each scored row at the chosen penalty, from a head that never saw its photo.
    pub held_out: Vec<(usize, Vec<f32>)>,
    /// Holdout search only: the head fitted on the training rows at the chosen penalty.
    pub model: Option<Softmax>,
}

/// Mean loss and accuracy of `model` on `rows` of `data`.
pub fn loss_and_accuracy(model: &Softmax, data: &Rows, rows: &[usize]) -> (f64, f64) {
    let (nll, correct, _) = score(model, data, rows);
    let n = rows.len().max(1) as f64;
    (nll / n, correct as f64 / n)
}

/// Held-out loss and accuracy of `model` on `rows` of `data`, with the logits.
fn score(model: &Softmax, data: &Rows, rows: &[usize]) -> (f64, usize, Vec<(usize, Vec<f32>)>) {
    let (mut nll, mut correct, mut logits) = (0.0, 0, Vec::with_capacity(rows.len()));
    for &i in rows {
        let z = model.logits(data.row(i));
        let mut p = z.clone();
        let lse = softmax::softmax_in_place(&mut p);
        nll += lse - z[data.labels[i]];
        correct += usize::from(super::evaluate::argmax(&p) == data.labels[i]);
        logits.push((i, z.iter().map(|&v| v as f32).collect()));
    }
    (nll, correct, logits)
}

/// Walks the penalty grid: `fits` are (training rows, scored rows) pairs with their warm
/// starts; the best penalty is the one with the lowest mean held-out loss.
fn walk(
    data: &Rows,
    classes: usize,
    splits: &[(Vec<usize>, Vec<usize>)],
    grid: &[f64],
    progress: &mut dyn FnMut(usize, usize),
    cancel: &dyn Fn() -> bool,
) -> Selection {
    let scored: usize = splits.iter().map(|s| s.1.len()).sum();
    let mut starts: Vec<Option<Softmax>> = vec![None; splits.len()];
    let mut best: Option<(usize, f64)> = None;
    let mut best_logits = Vec::new();
    let mut best_models = Vec::new();
    let mut path = Vec::new();
    for (step, &l2) in grid.iter().enumerate() {
        if cancel() {
            break;
        }
        let (mut nll, mut correct, mut logits) = (0.0, 0, Vec::new());
        for ((train, test), start) in splits.iter().zip(starts.iter_mut()) {
            let (model, _) = softmax::fit(
                &data.problem(train, classes),
                l2,
                start.as_ref(),
                softmax::Limits::SEARCH,
            );
            let (l, c, z) = score(&model, data, test);
            (nll, correct) = (nll + l, correct + c);
            logits.extend(z);
            *start = Some(model);
        }
        progress(step + 1, grid.len());
        let point = PathPoint {
            l2,
            nll: nll / scored.max(1) as f64,
            accuracy: correct as f64 / scored.max(1) as f64,
        };
        if best.is_none_or(|(_, b)| point.nll < b) {
            best = Some((path.len(), point.nll));
            best_logits = logits;
            best_models = starts.clone();
        }
        path.push(point);
        if path.len() - 1 - best.map_or(0, |b| b.0) >= PATH_PATIENCE {
            break;
        }
    }
    let chosen = best.map_or(0, |b| b.0);
    Selection {
        l2: grid[chosen],
        path,
        held_out: best_logits,
        model: best_models.into_iter().next().flatten(),
    }
}

/// Stratified k-fold over photos: every photo is scored once by a head fitted without it.
pub fn select_kfold(
    data: &Rows,
    classes: usize,
    folds: usize,
    seed: u64,
    grid: &[f64],
    progress: &mut dyn FnMut(usize, usize),
    cancel: &dyn Fn() -> bool,
) -> Selection {
    let groups: Vec<(usize, usize)> = data
        .groups
        .iter()
        .copied()
        .zip(data.labels.iter().copied())
        .collect();
    let fold_of = stratified_folds(&groups, folds, seed);
    let splits: Vec<(Vec<usize>, Vec<usize>)> = (0..folds)
        .map(|f| {
            let train = (0..data.len())
                .filter(|&i| fold_of[&data.groups[i]] != f)
                .collect();
            let test = (0..data.len())
                .filter(|&i| fold_of[&data.groups[i]] == f && data.clean[i])
                .collect();
            (train, test)
        })
        .filter(|(_, test): &(Vec<usize>, Vec<usize>)| !test.is_empty())
        .collect();
    let mut selection = walk(data, classes, &splits, grid, progress, cancel);
    selection.model = None;
    selection.held_out.sort_by_key(|(i, _)| *i);
    selection
}

/// The validation split decides: rows `train` fit, clean rows `val` score.
pub fn select_holdout(
    data: &Rows,
    classes: usize,
    train: Vec<usize>,
    val: Vec<usize>,
    grid: &[f64],
    progress: &mut dyn FnMut(usize, usize),
    cancel: &dyn Fn() -> bool,
) -> Selection {
    let val = val.into_iter().filter(|&i| data.clean[i]).collect();
    walk(data, classes, &[(train, val)], grid, progress, cancel)
}

/// The head fitted on `rows` (all of them by default) at penalty `l2`.
pub fn fit_rows(
    data: &Rows,
    classes: usize,
    rows: Option<&[usize]>,
    l2: f64,
    start: Option<&Softmax>,
) -> Softmax {
    let all: Vec<usize>;
    let rows = match rows {
        Some(r) => r,
        None => {
            all = (0..data.len()).collect();
            &all
        }
    };
    let (model, convergence) = softmax::fit(
        &data.problem(rows, classes),
        l2,
        start,
        softmax::Limits::FINAL,
    );
    if !convergence.converged {
        tracing::warn!(?convergence, "the head fit stopped before full convergence");
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_stratified_seeded_and_keep_photos_whole() {
        // 3 classes of 10, 7 and 5 photos.
        let groups: Vec<(usize, usize)> = (0..22)
            .map(|g| {
                (
                    g,
                    if g < 10 {
                        0
                    } else if g < 17 {
                        1
                    } else {
                        2
                    },
                )
            })
            .collect();
        let a = stratified_folds(&groups, 5, 1);
        assert_eq!(a, stratified_folds(&groups, 5, 1), "same seed, same folds");
        assert_ne!(
            a,
            stratified_folds(&groups, 5, 2),
            "another seed, other folds"
        );
        for class in 0..3 {
            let mut per_fold = [0usize; 5];
            for &(g, y) in &groups {
                if y == class {
                    per_fold[a[&g]] += 1;
                }
            }
            let (lo, hi) = (
                per_fold.iter().min().unwrap(),
                per_fold.iter().max().unwrap(),
            );
            assert!(
                hi - lo <= 1,
                "class {class} spread over folds as {per_fold:?}"
            );
        }
        let sizes = (0..5)
            .map(|f| a.values().filter(|&&x| x == f).count())
            .collect::<Vec<_>>();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }

    /// Two noisy Gaussian classes: the path stops at a finite penalty, every photo is scored
    /// once, and the raw-feature head gives the same logits as the standardised one.
    #[test]
    fn the_path_scores_every_photo_once_and_maps_back_to_raw_features() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut cache = RowCache::new(&[6]);
        for photo in 0..40 {
            let y = photo % 2;
            for _view in 0..2 {
                let row: Vec<f32> = (0..6)
                    .map(|j| {
                        5.0 + if j == 0 { y as f32 * 1.5 } else { 0.0 }
                            + rand::Rng::random_range(&mut rng, -1.0..1.0f32)
                    })
                    .collect();
                cache.push_rows(&row, &[y], &[photo]).unwrap();
            }
        }
        let st = Standardizer::fit(&[&cache]);
        let data = st.rows(&[(&cache, true)], None);
        assert_eq!(data.clean.iter().filter(|&&c| c).count(), 40);
        let sel = select_kfold(&data, 2, 5, 7, &L2_GRID, &mut |_, _| {}, &|| false);
        assert_eq!(
            sel.held_out.len(),
            40,
            "each photo's clean view scored once"
        );
        assert!(sel.path.len() >= 3 && sel.path.len() <= L2_GRID.len());
        let best = sel.path.iter().map(|p| p.nll).fold(f64::INFINITY, f64::min);
        assert_eq!(sel.path.iter().find(|p| p.l2 == sel.l2).unwrap().nll, best);
        assert!(sel.path.iter().any(|p| p.accuracy > 0.7), "{:?}", sel.path);

        let model = fit_rows(&data, 2, None, sel.l2, None);
        let linear = st.to_linear(&model, &Device::flex());
        let raw = Tensor::<2>::from_data(
            TensorData::new(cache.row(0).to_vec(), [1, 6]),
            &Device::flex(),
        );
        let got = linear.forward(raw).into_data().try_to_vec::<f32>().unwrap();
        let want = model.logits(&data.x[..6]);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
    }
}
