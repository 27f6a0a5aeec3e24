//! Pairwise cosine similarity of centred features: near-duplicate pairs and each photo's
//! density (mean distance to its nearest neighbours), and the robust z-score of outliers.

use rayon::prelude::*;

use super::super::softmax::matmul;
use super::{AuditRows, NEIGHBOURS};

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
    // Similarities a block of rows at a time, each block one GEMM against every row: the
    // scan is bound by multiply-adds, not by reading the features once per pair.
    let starts: Vec<usize> = (0..n).step_by(BLOCK).collect();
    let per_photo: Vec<(Vec<(usize, usize, f64)>, f64)> = starts
        .into_par_iter()
        .flat_map_iter(|start| {
            let rows = BLOCK.min(n - start);
            let mut sims = vec![0.0f32; rows * n];
            matmul(
                &mut sims,
                [rows, n, d],
                &unit[start * d..],
                [d, 1],
                &unit,
                [1, d],
            );
            (0..rows)
                .map(|r| scan(start + r, &sims[r * n..(r + 1) * n], threshold))
                .collect::<Vec<_>>()
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

/// Rows of similarities computed per GEMM (a block times every photo, in f32).
const BLOCK: usize = 128;

/// Photo `i`'s pairs with later photos at or above `threshold`, and its mean distance to its
/// nearest neighbours, from its row of similarities.
fn scan(i: usize, sims: &[f32], threshold: f64) -> (Vec<(usize, usize, f64)>, f64) {
    let mut nearest: Vec<f64> = Vec::with_capacity(NEIGHBOURS + 1);
    let mut pairs = Vec::new();
    for (j, &s) in sims.iter().enumerate() {
        if j == i {
            continue;
        }
        let s = s as f64;
        if j > i && s >= threshold {
            pairs.push((i, j, s));
        }
        if nearest.len() < NEIGHBOURS || s > nearest[nearest.len() - 1] {
            let at = nearest.partition_point(|&v| v >= s);
            nearest.insert(at, s);
            nearest.truncate(NEIGHBOURS);
        }
    }
    let distance = nearest.iter().map(|s| 1.0 - s).sum::<f64>() / nearest.len().max(1) as f64;
    (pairs, distance)
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
