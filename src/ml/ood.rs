//! "None of the classes": an out-of-distribution score for every prediction, the Mahalanobis
//! distance of the photo's pooled features from the nearest training class under one shared
//! covariance (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
//! Samples and Adversarial Attacks", NeurIPS 2018), without their input perturbation, on
//! features scaled to unit length: a flat or blank picture has small activations that sit
//! near the class means in raw Mahalanobis distance, but points elsewhere (both measured in
//! bench/README.md, "Trust").
//!
//! The covariance of 1280 features is estimated from a few hundred photos, so it is shrunk
//! towards a scaled identity (`(1−α)·Σ + α·tr(Σ)/d·I`, α by Ledoit–Wolf; `bench/trust.sh`
//! compares fixed weights), which also keeps it invertible. Scores are squared distances divided by
//! the dimension, so 1 is "as far as a typical training photo along every direction".
//! The threshold is the [`QUANTILE`] of scores of photos the fit never saw (the validation
//! split, or out of fold for small sets), so about 95% of in-distribution photos pass.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::cache::RowCache;
use super::head_fit::stratified_folds;
use super::softmax::matmul;

/// How much of the covariance is replaced by a scaled identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shrinkage {
    /// Ledoit and Wolf's estimate of the best weight for these samples ("A well-conditioned
    /// estimator for large-dimensional covariance matrices", 2004), as scikit-learn's
    /// `LedoitWolf` computes it: strong for a few photos, weak for many.
    LedoitWolf,
    Fixed(f64),
}
/// Rows per block of the covariance sum.
const FIT_ROWS: usize = 512;
/// Share of held-out in-distribution photos whose score the threshold lets through.
pub const QUANTILE: f64 = 0.95;

/// The rule every answer follows: a score above the threshold is "none of the classes".
pub fn is_unknown(score: f64, threshold: f64) -> bool {
    score > threshold
}

/// Class means and the Cholesky factor of the shared, shrunk covariance.
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussians {
    pub dim: usize,
    /// Lower-triangular `L` with `L·Lᵀ = Σ`, packed by rows (`i·(i+1)/2 + j`, `j ≤ i`).
    pub lower: Vec<f32>,
    /// `L⁻¹·μ_c` per class.
    pub means: Vec<Vec<f32>>,
}

/// What a model directory stores besides the factor (`ood.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OodSummary {
    /// `mahalanobis`.
    pub method: String,
    /// Scores above it are "unknown".
    pub threshold: f64,
    /// Share of held-out in-distribution photos at or below the threshold.
    pub quantile: f64,
    pub shrinkage: f64,
    /// Held-out photos the threshold was calibrated on.
    pub calibration_photos: usize,
}

impl Gaussians {
    /// Fits class means and the shared covariance on `rows` (`n × dim`, row-major); returns
    /// the shrinkage weight used too.
    pub fn fit(
        rows: &[f32],
        dim: usize,
        labels: &[usize],
        classes: usize,
        shrinkage: Shrinkage,
    ) -> (Self, f64) {
        let n = labels.len();
        let mut mean = vec![vec![0.0f64; dim]; classes];
        let mut count = vec![0usize; classes];
        for (r, &y) in rows.chunks(dim).zip(labels) {
            mean[y]
                .iter_mut()
                .zip(unit(r))
                .for_each(|(m, v)| *m += v as f64);
            count[y] += 1;
        }
        for (m, &c) in mean.iter_mut().zip(&count) {
            m.iter_mut().for_each(|v| *v /= c.max(1) as f64);
        }
        // `ZᵀZ` and `Σᵢ‖zᵢ‖⁴` over blocks of rows on the rayon pool, so that memory holds a
        // block of centred rows at a time, never all of them.
        let (mut cov, z4) = rows
            .par_chunks(FIT_ROWS * dim)
            .zip(labels.par_chunks(FIT_ROWS))
            .map(|(block, ys)| {
                let z: Vec<f64> = block
                    .chunks(dim)
                    .zip(ys)
                    .flat_map(|(r, &y)| {
                        unit(r)
                            .into_iter()
                            .zip(&mean[y])
                            .map(|(v, m)| v as f64 - m)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let mut part = vec![0.0; dim * dim];
                matmul(&mut part, [dim, dim, ys.len()], &z, [1, dim], &z, [dim, 1]);
                let z4: f64 = z
                    .chunks(dim)
                    .map(|r| r.iter().map(|v| v * v).sum::<f64>().powi(2))
                    .sum();
                (part, z4)
            })
            .reduce(
                || (vec![0.0; dim * dim], 0.0),
                |(mut a, x), (b, y)| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    (a, x + y)
                },
            );
        let n_f = n.max(1) as f64;
        cov.iter_mut().for_each(|v| *v /= n_f);
        let mu: f64 = (0..dim).map(|i| cov[i * dim + i]).sum::<f64>() / dim as f64;
        let alpha = match shrinkage {
            Shrinkage::Fixed(a) => a,
            Shrinkage::LedoitWolf => {
                // With S = ZᵀZ/n: Σᵢ‖zᵢzᵢᵀ − S‖² = Σᵢ‖zᵢ‖⁴ − n‖S‖², and ‖S − μI‖² = ‖S‖² − dμ².
                let s2: f64 = cov.iter().map(|v| v * v).sum();
                let delta = (s2 - dim as f64 * mu * mu).max(1e-30);
                let beta = ((z4 - n_f * s2) / (n_f * n_f)).clamp(0.0, delta);
                beta / delta
            }
        };
        let ridge = alpha * mu.max(1e-12);
        for (i, v) in cov.iter_mut().enumerate() {
            *v = (1.0 - alpha) * *v + if i % (dim + 1) == 0 { ridge } else { 0.0 };
        }
        let lower = cholesky(&mut cov, dim);
        let means = mean
            .iter()
            .map(|m| {
                solve_lower(&lower, dim, m)
                    .into_iter()
                    .map(|v| v as f32)
                    .collect()
            })
            .collect();
        (
            Self {
                dim,
                lower: pack(&lower, dim),
                means,
            },
            alpha,
        )
    }

    /// Squared Mahalanobis distance to the nearest class mean, over the dimension: a forward
    /// substitution through the factor, then the nearest whitened mean.
    pub fn score(&self, x: &[f32]) -> f64 {
        let d = self.dim;
        let x = unit(x);
        let mut y = vec![0.0f64; d];
        for i in 0..d {
            let row = &self.lower[i * (i + 1) / 2..i * (i + 1) / 2 + i + 1];
            y[i] = (x[i] as f64 - dot(&row[..i], &y[..i])) / row[i] as f64;
        }
        self.means
            .iter()
            .map(|m| {
                m.iter()
                    .zip(&y)
                    .map(|(&a, b)| (b - a as f64).powi(2))
                    .sum::<f64>()
            })
            .fold(f64::INFINITY, f64::min)
            / d as f64
    }

    /// Little-endian `f32`s: the packed factor, then each class mean (`ood.bin`).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lower
            .iter()
            .chain(self.means.iter().flatten())
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// Reads [`Self::to_bytes`] back for `dim` features and `classes` classes.
    pub fn from_bytes(bytes: &[u8], dim: usize, classes: usize) -> Option<Self> {
        let packed = dim * (dim + 1) / 2;
        if bytes.len() != 4 * (packed + classes * dim) {
            return None;
        }
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Some(Self {
            dim,
            lower: v[..packed].to_vec(),
            means: v[packed..].chunks(dim).map(<[f32]>::to_vec).collect(),
        })
    }
}

/// Fits the served Gaussians on every photo of `train` and `val` (all cached views) and
/// calibrates the threshold on photos the fit did not see: the validation split, or (with
/// no validation split) out of fold over `folds` stratified folds of photos. `None` when no
/// photo could be held out.
pub fn calibrate(
    train: &RowCache,
    val: &RowCache,
    classes: usize,
    folds: usize,
    seed: u64,
) -> Option<(Gaussians, OodSummary)> {
    if train.is_empty() {
        return None;
    }
    let dim = train.shape.iter().product::<usize>();
    let fit = |caches: &[(&RowCache, &dyn Fn(usize) -> bool)]| {
        let (mut rows, mut labels) = (Vec::new(), Vec::new());
        for (c, keep) in caches {
            for r in (0..c.len()).filter(|&r| keep(c.samples[r])) {
                rows.extend_from_slice(c.row(r));
                labels.push(c.labels[r]);
            }
        }
        Gaussians::fit(&rows, dim, &labels, classes, Shrinkage::LedoitWolf)
    };
    let first_views = |c: &RowCache| {
        let mut seen = std::collections::HashSet::new();
        (0..c.len())
            .filter(|&r| seen.insert(c.samples[r]))
            .collect::<Vec<_>>()
    };
    let all = |_: usize| true;
    let mut scores = Vec::new();
    if !val.is_empty() {
        let (g, _) = fit(&[(train, &all)]);
        scores.extend(first_views(val).into_iter().map(|r| g.score(val.row(r))));
    } else {
        let scored = first_views(train);
        let photos: Vec<(usize, usize)> = scored
            .iter()
            .map(|&r| (train.samples[r], train.labels[r]))
            .collect();
        let fold_of = stratified_folds(&photos, folds.max(2), seed ^ 0x6f6f_64);
        for f in 0..folds.max(2) {
            // A fold holding every photo (a one-photo set) has nothing to fit on.
            if photos.iter().all(|(s, _)| fold_of[s] == f) {
                continue;
            }
            let (g, _) = fit(&[(train, &|s| fold_of[&s] != f)]);
            scores.extend(
                scored
                    .iter()
                    .filter(|&&r| fold_of[&train.samples[r]] == f)
                    .map(|&r| g.score(train.row(r))),
            );
        }
    }
    if scores.is_empty() {
        return None;
    }
    let (served, shrinkage) = fit(&[(train, &all), (val, &all)]);
    let summary = OodSummary {
        method: "mahalanobis".into(),
        threshold: quantile(&scores, QUANTILE),
        quantile: QUANTILE,
        shrinkage,
        calibration_photos: scores.len(),
    };
    Some((served, summary))
}

/// `Σ a[k]·b[k]` in f64, over eight running sums: with one chained sum, each of the forward
/// substitution's rows (1,280 for Lite0's features) waited on every addition in turn.
fn dot(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot of equal lengths");
    let mut sums = [0.0f64; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(&l, v)| f64::from(l) * v)
        .sum();
    for (l, v) in a8.zip(b8) {
        for k in 0..8 {
            sums[k] += f64::from(l[k]) * v[k];
        }
    }
    sums.iter().sum::<f64>() + tail
}

/// `x` scaled to unit length (a photo's features are compared by direction, see the module
/// header).
fn unit(x: &[f32]) -> Vec<f32> {
    let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    x.iter().map(|v| v / norm).collect()
}

/// The `q`-quantile of `scores` (nearest rank), infinity for none.
pub fn quantile(scores: &[f64], q: f64) -> f64 {
    if scores.is_empty() {
        return f64::INFINITY;
    }
    let mut s = scores.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// In-place Cholesky of a symmetric positive-definite `a` (`d × d`, row-major); returns
/// `L` (row-major, upper part zero).
fn cholesky(a: &mut [f64], d: usize) -> Vec<f64> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = l[i * d..i * d + j]
                .iter()
                .zip(&l[j * d..j * d + j])
                .map(|(x, y)| x * y)
                .sum();
            let v = a[i * d + j] - s;
            l[i * d + j] = if i == j {
                v.max(1e-12).sqrt()
            } else {
                v / l[j * d + j]
            };
        }
    }
    l
}

fn solve_lower(l: &[f64], d: usize, b: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; d];
    for i in 0..d {
        let s: f64 = l[i * d..i * d + i]
            .iter()
            .zip(&y[..i])
            .map(|(a, b)| a * b)
            .sum();
        y[i] = (b[i] - s) / l[i * d + i];
    }
    y
}

fn pack(l: &[f64], d: usize) -> Vec<f32> {
    (0..d)
        .flat_map(|i| l[i * d..i * d + i + 1].iter().map(|&v| v as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn dot_sums_every_product_with_and_without_a_tail() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for n in [0, 1, 7, 8, 9, 17, 1280] {
            let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, y)| f64::from(x) * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-12, "n {n}");
        }
        assert_eq!(dot(&[2.0; 9], &[0.5; 9]), 9.0);
    }

    #[test]
    fn near_points_score_low_far_points_high_and_bytes_round_trip() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let d = 8;
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..200 {
            let y = i % 2;
            // Positive, like pooled post-ReLU features; class 1 stands out on feature 0.
            rows.extend((0..d).map(|j| {
                3.0 + if j == 0 { 5.0 * y as f32 } else { 0.0 } + rng.random_range(-1.0..1.0f32)
            }));
            labels.push(y);
        }
        let (g, alpha) = Gaussians::fit(&rows, d, &labels, 2, Shrinkage::LedoitWolf);
        assert!(
            alpha > 0.0 && alpha < 0.5,
            "200 samples in 8 dimensions need little: {alpha}"
        );
        let near = g.score(&vec![3.0; d]);
        // Only the direction counts: the same picture at twice the activation is as near.
        assert!((g.score(&vec![6.0; d]) - near).abs() < 1e-6);
        let far = g.score(&[6.0, 6.0, 6.0, 6.0, 0.0, 0.0, 0.0, 0.0]);
        assert!(near < 2.0 && far > 20.0, "near {near}, far {far}");
        let back = Gaussians::from_bytes(&g.to_bytes(), d, 2).unwrap();
        assert_eq!(back, g);
        assert!(Gaussians::from_bytes(&g.to_bytes()[4..], d, 2).is_none());
        assert!(g.score(&[8.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]) < 2.0);
    }

    /// scikit-learn 1.9.1, `ledoit_wolf_shrinkage(U)` for these six rows scaled to unit
    /// length (one class, so the class mean is the centre it takes): 0.3498952289293611.
    #[test]
    fn ledoit_wolf_weight_matches_scikit_learn() {
        let rows = [
            1.0, 2.0, 3.0, 2.0, 1.0, 0.5, 0.3, 2.0, 2.0, 1.5, 1.5, 1.0, 2.0, 3.0, 1.0, 0.5, 0.5,
            2.0,
        ];
        let (_, alpha) = Gaussians::fit(&rows, 3, &[0; 6], 1, Shrinkage::LedoitWolf);
        assert!((alpha - 0.3498952289293611).abs() < 1e-6, "{alpha}");
    }

    /// Held-out scores set the threshold: about 95% of in-distribution photos pass it, on
    /// a validation split and out of fold.
    #[test]
    fn calibration_lets_about_95_percent_of_held_out_photos_pass() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let d = 6;
        let mut cache = |n: usize, offset: usize| {
            let mut c = RowCache::new(&[d]);
            for i in 0..n {
                let y = i % 2;
                let row: Vec<f32> = (0..d)
                    .map(|j| 3.0 + if j == y { 2.0 } else { 0.0 } + rng.random_range(-1.0..1.0f32))
                    .collect();
                c.push_rows(&row, &[y], &[offset + i]).unwrap();
            }
            c
        };
        let (train, val, fresh) = (cache(400, 0), cache(200, 400), cache(1000, 600));
        for (val, photos) in [(&val, 200), (&RowCache::new(&[d]), 400)] {
            let (g, summary) = calibrate(&train, val, 2, 5, 1).expect("scores to calibrate on");
            assert_eq!(summary.calibration_photos, photos);
            let passing = (0..fresh.len())
                .filter(|&r| !is_unknown(g.score(fresh.row(r)), summary.threshold))
                .count() as f64
                / fresh.len() as f64;
            assert!((0.9..=0.99).contains(&passing), "{passing} pass");
        }
        assert!(calibrate(&RowCache::new(&[d]), &RowCache::new(&[d]), 2, 5, 1).is_none());
    }

    #[test]
    fn quantile_is_nearest_rank() {
        let s: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&s, 0.95), 19.0);
        assert_eq!(quantile(&s, 1.0), 20.0);
        assert_eq!(quantile(&[], 0.95), f64::INFINITY);
    }
}
