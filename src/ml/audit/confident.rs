//! Confident learning over out-of-fold probabilities (see the module header of `audit`).

use super::super::evaluate::softmax;
use super::super::head_fit::{self, Standardizer};
use super::{AuditRows, FOLDS};

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
                let predicted = super::super::evaluate::argmax(&probs[r]);
                if predicted != i && !taken[r] {
                    taken[r] = true;
                    // With three classes or more the photo may sit in several pairs' lists:
                    // the suggestion is its most probable other class, whichever list took it.
                    let other = (0..classes)
                        .filter(|&c| c != i)
                        .max_by(|&a, &b| probs[r][a].total_cmp(&probs[r][b]))
                        .expect("two classes at least");
                    flagged.push((r, other));
                }
            }
        }
    }
    flagged.sort_by(|a, b| probs[a.0][labels[a.0]].total_cmp(&probs[b.0][labels[b.0]]));
    (flagged, t)
}
