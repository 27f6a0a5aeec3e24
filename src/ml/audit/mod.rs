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
//!   [`DUPLICATE_SIMILARITY`] (measured by `bench/trust.sh`: resized, recompressed and
//!   slightly cropped copies against distinct photos).
//! - **Outliers** are photos whose mean cosine distance to their [`NEIGHBOURS`] nearest
//!   photos has a robust z-score (median and MAD, Iglewicz and Hoaglin's modified z-score)
//!   above [`OUTLIER_Z`]: low density in feature space, whatever the class.

use serde::{Deserialize, Serialize};

use super::cache::RowCache;
use super::config::TrainConfig;
use super::data::FolderDataset;
use super::train::Prepared;

mod confident;
mod neighbours;

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

    pub(super) fn cache(&self) -> RowCache {
        RowCache {
            shape: vec![self.dim],
            data: self.x.clone(),
            labels: self.labels.clone(),
            samples: self.samples.clone(),
        }
    }
}

pub use confident::{label_issues, out_of_fold};
pub use neighbours::{neighbours, robust_z};

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
mod tests;

/// Head penalty for the out-of-fold fits when the run solved no head (warm-up off): the
/// middle of the head's penalty grid, where most runs' chosen penalties fall.
pub const DEFAULT_L2: f64 = super::head_fit::L2_GRID[5];

/// The audit of every photo of a prepared run, at the run's head penalty `l2`. It reads
/// each photo's first cached view: the clean one, unless a holdout run caches a single
/// augmented view per training photo (`views = 1`, not the default).
pub fn audit_run(
    prepared: &Prepared,
    dataset: &FolderDataset,
    l2: f64,
    config: &TrainConfig,
) -> Audit {
    let rows = AuditRows::from_caches(&prepared.train.features, &prepared.val.features);
    audit(
        &rows,
        &dataset.classes,
        &|s| dataset.samples[s].path.display().to_string(),
        l2,
        config.seed,
    )
}
