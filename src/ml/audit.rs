//! The dataset audit of a run: photos whose label is probably wrong, near-duplicate pairs
//! (across classes, or across the training/validation split) and outliers, all from the
//! pooled features the frozen pass already cached, so it costs a few head fits and one pass
//! over the pairs, never another pass through the network.
//!
//! - **Label errors** follow confident learning (Northcutt, Jiang and Chuang, "Confident
//!   Learning: Estimating Uncertainty in Dataset Labels", JAIR 70, 2021): each photo is
//!   scored out of fold by a head that never saw it; class `j`'s threshold `t_j` is the mean
//!   out-of-fold probability of `j` over the photos labelled `j`; a photo labelled `i` is
//!   flagged when the most probable class among those whose probability reaches their
//!   threshold is some `j ≠ i` (an off-diagonal entry of the confident joint); the
//!   calibrated joint says how many photos per pair of classes to flag, chosen by margin
//!   ([`label_issues`]). Flagged photos are ranked by self-confidence (the out-of-fold
//!   probability of the given label, lowest first), cleanlab's default ranking.
//! - **Near-duplicates** are pairs whose centred features have a cosine similarity at or above
//!   [`DUPLICATE_SIMILARITY`] (measured by `bench/audit.sh`: resized, recompressed and
//!   slightly cropped copies against distinct photos).
//! - **Outliers** are photos whose mean cosine distance to their [`NEIGHBOURS`] nearest
//!   photos has a robust z-score (median and MAD, Iglewicz and Hoaglin's modified z-score)
//!   above [`OUTLIER_Z`]: low density in feature space, whatever the class.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::cache::RowCache;
use super::evaluate::softmax;
use super::head_fit::{self, Standardizer};

/// Cosine similarity of centred pooled features at or above which two photos are
/// near-duplicates.
pub const DUPLICATE_SIMILARITY: f64 = 0.80;
/// Neighbours whose mean distance measures a photo's density.
pub const NEIGHBOURS: usize = 5;
/// Modified z-score above which a photo's neighbour distance makes it an outlier.
pub const OUTLIER_Z: f64 = 3.5;
/// Folds of the out-of-fold label check.
pub const FOLDS: usize = 5;
/// Longest list kept of each kind of finding (the counts cover every one).
pub const MAX_LISTED: usize = 200;

/// Which side of the run's split a photo was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Validation,
}

/// One photo the audit names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditPhoto {
    /// Path of the image as the run read it (its stored file name identifies it).
    pub path: String,
    pub label: String,
    pub split: Split,
}

/// A photo whose given label is probably wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LabelIssue {
    pub photo: AuditPhoto,
    pub suggested: String,
    /// Out-of-fold probability of the given label.
    pub given_probability: f64,
    pub suggested_probability: f64,
}

/// What a near-duplicate pair means for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PairKind {
    /// The two photos carry different labels: at least one is wrong.
    CrossClass,
    /// Same label, one in training and one in validation: the reported accuracy is inflated.
    TrainVal,
    SameClass,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NearDuplicate {
    pub a: AuditPhoto,
    pub b: AuditPhoto,
    pub similarity: f64,
    pub kind: PairKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Outlier {
    pub photo: AuditPhoto,
    /// Modified z-score of the photo's mean distance to its nearest neighbours.
    pub score: f64,
}

/// The thresholds the findings were drawn with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditThresholds {
    pub duplicate_similarity: f64,
    pub outlier_score: f64,
    /// Per class, in class order: the confident-learning thresholds `t_j`.
    pub class_thresholds: Vec<f64>,
}

/// Everything the audit found, each list ranked most suspicious first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Audit {
    pub photos: usize,
    pub label_issues: Vec<LabelIssue>,
    pub near_duplicates: Vec<NearDuplicate>,
    pub outliers: Vec<Outlier>,
    /// Totals before the lists were cut to [`MAX_LISTED`].
    pub counts: AuditCounts,
    pub thresholds: AuditThresholds,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditCounts {
    pub label_issues: usize,
    pub near_duplicates: usize,
    pub cross_class: usize,
    pub train_val: usize,
    pub outliers: usize,
}

/// One photo's features and where it came from, in the order the audit reports them.
pub struct AuditRows {
    /// One row per photo (its first cached view), `n × dim`.
    pub x: Vec<f32>,
    pub dim: usize,
    pub labels: Vec<usize>,
    pub samples: Vec<usize>,
    pub splits: Vec<Split>,
}

impl AuditRows {
    /// The first view of each photo of the two sides of a split.
    pub fn from_caches(train: &RowCache, val: &RowCache) -> Self {
        let dim = train.shape.iter().product();
        let mut out = AuditRows {
            x: Vec::new(),
            dim,
            labels: Vec::new(),
            samples: Vec::new(),
            splits: Vec::new(),
        };
        for (cache, split) in [(train, Split::Train), (val, Split::Validation)] {
            let mut seen = std::collections::HashSet::new();
            for r in 0..cache.len() {
                if seen.insert(cache.samples[r]) {
                    out.x.extend_from_slice(cache.row(r));
                    out.labels.push(cache.labels[r]);
                    out.samples.push(cache.samples[r]);
                    out.splits.push(split);
                }
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn cache(&self) -> RowCache {
        RowCache {
            shape: vec![self.dim],
            data: self.x.clone(),
            labels: self.labels.clone(),
            samples: self.samples.clone(),
        }
    }
}

/// Out-of-fold class probabilities of every photo, from heads at penalty `l2` fitted on the
/// other folds (row order of `rows`).
pub fn out_of_fold(rows: &AuditRows, classes: usize, l2: f64, seed: u64) -> Vec<Vec<f32>> {
    let cache = rows.cache();
    let st = Standardizer::fit(&[&cache]);
    let data = st.rows(&[(&cache, true)], None);
    let folds = FOLDS.min(smallest_class(&rows.labels, classes)).max(2);
    let selection =
        head_fit::select_kfold(&data, classes, folds, seed, &[l2], &mut |_, _| {}, &|| {
            false
        });
    let mut probs = vec![vec![1.0 / classes as f32; classes]; rows.len()];
    for (row, logits) in selection.held_out {
        probs[row] = softmax(&logits, 1.0);
    }
    probs
}

fn smallest_class(labels: &[usize], classes: usize) -> usize {
    let mut counts = vec![0; classes];
    labels.iter().for_each(|&y| counts[y] += 1);
    counts.into_iter().min().unwrap_or(0)
}

/// Confident learning's flagged photos: (row, suggested class), ranked by self-confidence,
/// and the per-class thresholds. The confident joint `C[i][j]` (photos labelled `i` whose
/// most probable class above its threshold is `j`), calibrated so each row sums to the
/// class's photo count, says how many photos labelled `i` really are `j`; that many of the
/// photos labelled `i` with the largest margin `p_j − p_i` are flagged ("prune by noise
/// rate", cleanlab's default), except those whose most probable class is their label.
pub fn label_issues(
    probs: &[Vec<f32>],
    labels: &[usize],
    classes: usize,
) -> (Vec<(usize, usize)>, Vec<f64>) {
    let mut sum = vec![0.0; classes];
    let mut count = vec![0usize; classes];
    for (p, &y) in probs.iter().zip(labels) {
        sum[y] += p[y] as f64;
        count[y] += 1;
    }
    let t: Vec<f64> = sum
        .iter()
        .zip(&count)
        .map(|(s, &c)| s / c.max(1) as f64)
        .collect();
    let mut joint = vec![vec![0usize; classes]; classes];
    for (p, &y) in probs.iter().zip(labels) {
        let best = (0..classes)
            .filter(|&j| p[j] as f64 >= t[j])
            .max_by(|&a, &b| p[a].total_cmp(&p[b]));
        if let Some(j) = best {
            joint[y][j] += 1;
        }
    }
    let mut flagged: Vec<(usize, usize)> = Vec::new();
    let mut taken = vec![false; probs.len()];
    for i in 0..classes {
        let row: usize = joint[i].iter().sum();
        if row == 0 {
            continue;
        }
        for j in (0..classes).filter(|&j| j != i) {
            let n = (joint[i][j] as f64 * count[i] as f64 / row as f64).round() as usize;
            let mut members: Vec<usize> = (0..probs.len()).filter(|&r| labels[r] == i).collect();
            let margin = |r: usize| probs[r][j] - probs[r][i];
            members.sort_by(|&a, &b| margin(b).total_cmp(&margin(a)));
            for r in members.into_iter().take(n) {
                let predicted = super::evaluate::argmax(&probs[r]);
                if predicted != i && !taken[r] {
                    taken[r] = true;
                    flagged.push((r, j));
                }
            }
        }
    }
    flagged.sort_by(|a, b| probs[a.0][labels[a.0]].total_cmp(&probs[b.0][labels[b.0]]));
    (flagged, t)
}

/// Near-duplicate pairs (i < j, similarity) and each photo's mean cosine distance to its
/// nearest neighbours, from features centred on their mean.
pub fn neighbours(rows: &AuditRows, threshold: f64) -> (Vec<(usize, usize, f64)>, Vec<f64>) {
    let (n, d) = (rows.len(), rows.dim);
    let mut mean = vec![0.0f64; d];
    for r in rows.x.chunks(d) {
        mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    let unit: Vec<f32> = rows
        .x
        .par_chunks(d)
        .flat_map_iter(|r| {
            let c: Vec<f64> = r.iter().zip(&mean).map(|(&v, m)| v as f64 - m).collect();
            let norm = c.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            c.into_iter().map(move |v| (v / norm) as f32)
        })
        .collect();
    let row = |i: usize| &unit[i * d..(i + 1) * d];
    let per_photo: Vec<(Vec<(usize, usize, f64)>, f64)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let mut nearest: Vec<f64> = Vec::with_capacity(NEIGHBOURS + 1);
            let mut pairs = Vec::new();
            for j in 0..n {
                if j == i {
                    continue;
                }
                let s = dot(row(i), row(j));
                if j > i && s >= threshold {
                    pairs.push((i, j, s));
                }
                if nearest.len() < NEIGHBOURS || s > nearest[nearest.len() - 1] {
                    let at = nearest.partition_point(|&v| v >= s);
                    nearest.insert(at, s);
                    nearest.truncate(NEIGHBOURS);
                }
            }
            let distance =
                nearest.iter().map(|s| 1.0 - s).sum::<f64>() / nearest.len().max(1) as f64;
            (pairs, distance)
        })
        .collect();
    let mut pairs = Vec::new();
    let mut distances = Vec::with_capacity(n);
    for (p, d) in per_photo {
        pairs.extend(p);
        distances.push(d);
    }
    (pairs, distances)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    // Eight partial sums so the compiler can keep them in one vector register.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    (acc.iter().sum::<f32>() + tail) as f64
}

/// Modified z-scores `0.6745·(x − median) / MAD` (0 everywhere when the MAD is 0).
pub fn robust_z(values: &[f64]) -> Vec<f64> {
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            0.0
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let m = median(&mut values.to_vec());
    let mad = median(&mut values.iter().map(|v| (v - m).abs()).collect());
    values
        .iter()
        .map(|v| {
            if mad > 0.0 {
                0.6745 * (v - m) / mad
            } else {
                0.0
            }
        })
        .collect()
}

/// Runs the whole audit. `paths[s]` and `classes` name sample `s` and the labels; `l2` is the
/// head penalty the run chose.
pub fn audit(
    rows: &AuditRows,
    classes: &[String],
    paths: &dyn Fn(usize) -> String,
    l2: f64,
    seed: u64,
) -> Audit {
    let k = classes.len();
    let photo = |i: usize| AuditPhoto {
        path: paths(rows.samples[i]),
        label: classes[rows.labels[i]].clone(),
        split: rows.splits[i],
    };
    let probs = out_of_fold(rows, k, l2, seed);
    let (flagged, class_thresholds) = label_issues(&probs, &rows.labels, k);
    let (mut pairs, distances) = neighbours(rows, DUPLICATE_SIMILARITY);
    let kind = |i: usize, j: usize| {
        if rows.labels[i] != rows.labels[j] {
            PairKind::CrossClass
        } else if rows.splits[i] != rows.splits[j] {
            PairKind::TrainVal
        } else {
            PairKind::SameClass
        }
    };
    pairs.sort_by(|a, b| {
        let rank = |k: PairKind| k as u8;
        rank(kind(a.0, a.1))
            .cmp(&rank(kind(b.0, b.1)))
            .then(b.2.total_cmp(&a.2))
    });
    let z = robust_z(&distances);
    let mut outliers: Vec<usize> = (0..rows.len()).filter(|&i| z[i] > OUTLIER_Z).collect();
    outliers.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
    let counts = AuditCounts {
        label_issues: flagged.len(),
        near_duplicates: pairs.len(),
        cross_class: pairs
            .iter()
            .filter(|p| kind(p.0, p.1) == PairKind::CrossClass)
            .count(),
        train_val: pairs
            .iter()
            .filter(|p| kind(p.0, p.1) == PairKind::TrainVal)
            .count(),
        outliers: outliers.len(),
    };
    Audit {
        photos: rows.len(),
        label_issues: flagged
            .iter()
            .take(MAX_LISTED)
            .map(|&(i, j)| LabelIssue {
                photo: photo(i),
                suggested: classes[j].clone(),
                given_probability: probs[i][rows.labels[i]] as f64,
                suggested_probability: probs[i][j] as f64,
            })
            .collect(),
        near_duplicates: pairs
            .iter()
            .take(MAX_LISTED)
            .map(|&(i, j, s)| NearDuplicate {
                a: photo(i),
                b: photo(j),
                similarity: s,
                kind: kind(i, j),
            })
            .collect(),
        outliers: outliers
            .iter()
            .take(MAX_LISTED)
            .map(|&i| Outlier {
                photo: photo(i),
                score: z[i],
            })
            .collect(),
        counts,
        thresholds: AuditThresholds {
            duplicate_similarity: DUPLICATE_SIMILARITY,
            outlier_score: OUTLIER_Z,
            class_thresholds,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Three Gaussian classes in 16 dimensions, 30 photos each; photo 5 (class 0) is filed
    /// under class 1, photo 40 is a jittered copy of photo 41 filed under class 2, and photo
    /// 89 lies far from everything.
    fn synthetic() -> (AuditRows, Vec<String>) {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let d = 16;
        let mut x = Vec::new();
        let mut labels = Vec::new();
        for i in 0..90 {
            let y = i / 30;
            let mut row: Vec<f32> = (0..d)
                .map(|j| if j == y { 4.0 } else { 0.0 } + rng.random_range(-1.0..1.0f32))
                .collect();
            if i % 10 == 9 && i != 89 {
                // A hard photo, halfway to the next class: real data has some.
                row[(y + 1) % 3] = 2.0;
                row[y] = 2.0;
            }
            if i == 89 {
                row.iter_mut().for_each(|v| *v = 0.0);
                row[d - 1] = 40.0;
            }
            x.extend(row);
            labels.push(y);
        }
        labels[5] = 1;
        let copy: Vec<f32> = x[41 * d..42 * d].iter().map(|v| v + 0.01).collect();
        x[40 * d..41 * d].copy_from_slice(&copy);
        labels[40] = 2;
        let rows = AuditRows {
            x,
            dim: d,
            labels,
            samples: (0..90).collect(),
            splits: (0..90)
                .map(|i| {
                    if i % 5 == 0 {
                        Split::Validation
                    } else {
                        Split::Train
                    }
                })
                .collect(),
        };
        (rows, vec!["a".into(), "b".into(), "c".into()])
    }

    #[test]
    fn finds_the_planted_label_error_duplicate_and_outlier() {
        let (rows, classes) = synthetic();
        let a = audit(&rows, &classes, &|s| format!("p{s}"), 1e-2, 1);
        let flagged: Vec<&str> = a
            .label_issues
            .iter()
            .map(|l| l.photo.path.as_str())
            .collect();
        assert!(flagged.contains(&"p5"), "{flagged:?}");
        let p5 = a
            .label_issues
            .iter()
            .find(|l| l.photo.path == "p5")
            .unwrap();
        assert_eq!((p5.photo.label.as_str(), p5.suggested.as_str()), ("b", "a"));
        assert!(p5.given_probability < 0.5, "{p5:?}");
        assert!(a.label_issues.len() <= 4, "few false alarms: {flagged:?}");
        let first = &a.near_duplicates[0];
        assert_eq!(
            (first.a.path.as_str(), first.b.path.as_str()),
            ("p40", "p41")
        );
        assert_eq!(first.kind, PairKind::CrossClass);
        assert_eq!(a.counts.cross_class, 1, "{:?}", a.near_duplicates);
        assert_eq!(
            a.outliers.first().map(|o| o.photo.path.as_str()),
            Some("p89")
        );
        // Only the planted outlier and the lone halfway photos lie in empty space.
        assert!(
            a.outliers.iter().all(|o| o.photo.path.ends_with('9')),
            "{:?}",
            a.outliers
        );
    }

    #[test]
    fn a_pair_across_the_split_is_leakage() {
        let (mut rows, classes) = synthetic();
        rows.labels[40] = rows.labels[41];
        rows.splits[40] = Split::Validation;
        rows.splits[41] = Split::Train;
        let a = audit(&rows, &classes, &|s| format!("p{s}"), 1e-2, 1);
        assert_eq!(a.near_duplicates[0].kind, PairKind::TrainVal);
        assert_eq!(a.counts.train_val, 1);
        assert_eq!(a.counts.cross_class, 0);
    }

    #[test]
    fn robust_z_scores_the_far_value_only() {
        let z = robust_z(&[1.0, 1.1, 0.9, 1.05, 0.95, 5.0]);
        assert!(
            z[5] > OUTLIER_Z && z[..5].iter().all(|v| v.abs() < 2.0),
            "{z:?}"
        );
        assert_eq!(robust_z(&[2.0; 4]), vec![0.0; 4]);
    }
}
