//! Multinomial logistic regression with an L2 penalty, solved to convergence by L-BFGS in f64.
//!
//! With the backbone frozen, the head is a convex problem: a few hundred SGD epochs only
//! approach the optimum that a quasi-Newton method reaches in tens of iterations over the
//! same cached features. Plain Rust: blocks of rows on rayon threads, each block's logits and
//! gradient two f64 GEMMs (the `gemm` crate flex itself uses); the problem is a few thousand
//! rows of 1280 features, far too small to be worth a tensor backend.
//!
//! The objective is `Σᵢ wᵢ·CE(softmax(W xᵢ + b), yᵢ) / Σᵢ wᵢ + λ/2·‖W‖²` (the bias is not
//! penalised), the same problem scikit-learn's `LogisticRegression` solves with `C = 1/(λ·n)`.

use rayon::prelude::*;

/// The rows `rows` of a feature matrix, with their labels and weights. `x` is row-major,
/// `n × dim`; `labels` and `weights` are indexed like its rows, so folds share one matrix.
pub struct Problem<'a> {
    pub x: &'a [f64],
    pub dim: usize,
    pub labels: &'a [usize],
    pub weights: &'a [f64],
    pub rows: &'a [usize],
    pub classes: usize,
}

/// A fitted linear classifier: `logits = W x + b`, `w` row-major `classes × dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct Softmax {
    pub w: Vec<f64>,
    pub b: Vec<f64>,
    pub dim: usize,
    pub classes: usize,
}

/// How the solver stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Convergence {
    pub iterations: usize,
    /// Final objective.
    pub objective: f64,
    /// Largest absolute gradient entry at the end.
    pub gradient: f64,
    pub converged: bool,
}

/// When the solver stops: every gradient entry below `tolerance` (the objective is a mean, so
/// this does not depend on the number of rows), or `max_iterations`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub tolerance: f64,
    pub max_iterations: usize,
}

impl Limits {
    /// The served head: solved tightly.
    pub const FINAL: Limits = Limits {
        tolerance: 1e-6,
        max_iterations: 1000,
    };
    /// Points of a penalty search: their held-out predictions stop moving long before the
    /// weakest penalties on separable folds converge, and those fits are most of its time.
    pub const SEARCH: Limits = Limits {
        tolerance: 1e-5,
        max_iterations: 100,
    };
}
/// Correction pairs kept by L-BFGS.
const MEMORY: usize = 10;

impl Softmax {
    /// Logits of one row.
    pub fn logits(&self, row: &[f64]) -> Vec<f64> {
        (0..self.classes)
            .map(|c| dot(&self.w[c * self.dim..(c + 1) * self.dim], row) + self.b[c])
            .collect()
    }

    fn to_flat(&self) -> Vec<f64> {
        let mut v = self.w.clone();
        v.extend_from_slice(&self.b);
        v
    }

    fn from_flat(flat: &[f64], dim: usize, classes: usize) -> Self {
        Self {
            w: flat[..dim * classes].to_vec(),
            b: flat[dim * classes..].to_vec(),
            dim,
            classes,
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    // Four accumulators let the compiler vectorise without reassociating one sum.
    let mut acc = [0.0f64; 4];
    let chunks = a.len() / 4 * 4;
    for (x, y) in a[..chunks].chunks_exact(4).zip(b[..chunks].chunks_exact(4)) {
        for i in 0..4 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f64 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    acc[0] + acc[1] + acc[2] + acc[3] + tail
}

/// Log-sum-exp and softmax of `z`, in place (`z` becomes the probabilities).
pub fn softmax_in_place(z: &mut [f64]) -> f64 {
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in z.iter_mut() {
        *v /= sum;
    }
    max + sum.ln()
}

impl Problem<'_> {
    /// Objective and its gradient (flat: `W` then `b`) at `theta`.
    fn evaluate(&self, theta: &[f64], lambda: f64) -> (f64, Vec<f64>) {
        let (d, k) = (self.dim, self.classes);
        let (w, b) = theta.split_at(d * k);
        let total: f64 = self
            .rows
            .iter()
            .map(|&i| self.weights[i])
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
        // Rows per task: a block of features (2.6 MB at 1280) and its logits.
        const BLOCK: usize = 256;
        let (loss, mut grad) = self
            .rows
            .par_chunks(BLOCK)
            .map(|rows| {
                let m = rows.len();
                let mut x = Vec::with_capacity(m * d);
                for &i in rows {
                    x.extend_from_slice(&self.x[i * d..(i + 1) * d]);
                }
                // Logits: z (m × k) = x (m × d) · Wᵀ (W is k × d, row-major).
                let mut z = vec![0.0; m * k];
                matmul(&mut z, [m, k, d], &x, [d, 1], w, [1, d]);
                let mut loss = 0.0;
                for (zr, &i) in z.chunks_mut(k).zip(rows) {
                    zr.iter_mut().zip(b).for_each(|(v, bc)| *v += bc);
                    let y = self.labels[i];
                    let zy = zr[y];
                    let lse = softmax_in_place(zr);
                    let weight = self.weights[i] / total;
                    loss += weight * (lse - zy);
                    // The residual (p − onehot(y)), weighted, is the gradient of the logits.
                    zr[y] -= 1.0;
                    zr.iter_mut().for_each(|v| *v *= weight);
                }
                let mut g = vec![0.0; d * k + k];
                // ∂W (k × d) = residualᵀ (k × m) · x (m × d).
                matmul(&mut g[..d * k], [k, d, m], &z, [1, k], &x, [d, 1]);
                for zr in z.chunks(k) {
                    g[d * k..].iter_mut().zip(zr).for_each(|(gb, r)| *gb += r);
                }
                (loss, g)
            })
            .collect::<Vec<_>>()
            .into_iter()
            // Summed in block order, whatever thread ran a block: runs are reproducible.
            .fold((0.0, vec![0.0; d * k + k]), |(la, mut ga), (lb, gb)| {
                for (a, b) in ga.iter_mut().zip(&gb) {
                    *a += b;
                }
                (la + lb, ga)
            });
        let wsq: f64 = theta[..d * k].iter().map(|v| v * v).sum();
        for (g, t) in grad[..d * k].iter_mut().zip(&theta[..d * k]) {
            *g += lambda * t;
        }
        (loss + 0.5 * lambda * wsq, grad)
    }
}

/// Minimises the penalised objective from `start` (warm start) or zeros.
pub fn fit(
    problem: &Problem<'_>,
    lambda: f64,
    start: Option<&Softmax>,
    limits: Limits,
) -> (Softmax, Convergence) {
    let (d, k) = (problem.dim, problem.classes);
    let mut theta = start.map_or_else(|| vec![0.0; d * k + k], Softmax::to_flat);
    let (mut f, mut g) = problem.evaluate(&theta, lambda);
    let mut history: Vec<(Vec<f64>, Vec<f64>, f64)> = Vec::with_capacity(MEMORY);
    let mut iterations = 0;
    let norm_inf = |g: &[f64]| g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    while iterations < limits.max_iterations && norm_inf(&g) > limits.tolerance {
        iterations += 1;
        let mut dir = two_loop(&g, &history);
        let mut slope = dot(&dir, &g);
        if slope >= 0.0 {
            // Not a descent direction (numerical trouble): restart from steepest descent.
            history.clear();
            dir = g.iter().map(|v| -v).collect();
            slope = dot(&dir, &g);
        }
        // The first step has no curvature estimate: scale it to a unit move.
        let mut step = if history.is_empty() {
            1.0 / norm_inf(&g).max(1.0)
        } else {
            1.0
        };
        let (mut f_new, mut g_new, mut theta_new);
        // Backtracking to the Armijo condition.
        loop {
            theta_new = theta
                .iter()
                .zip(&dir)
                .map(|(t, p)| t + step * p)
                .collect::<Vec<_>>();
            (f_new, g_new) = problem.evaluate(&theta_new, lambda);
            if f_new <= f + 1e-4 * step * slope || step < 1e-12 {
                break;
            }
            step *= 0.5;
        }
        if step < 1e-12 {
            break;
        }
        let s: Vec<f64> = theta_new.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 {
            if history.len() == MEMORY {
                history.remove(0);
            }
            history.push((s, y, 1.0 / sy));
        }
        let decrease = f - f_new;
        (theta, f, g) = (theta_new, f_new, g_new);
        if decrease.abs() <= 1e-14 * f.abs().max(1.0) {
            break;
        }
    }
    let gradient = norm_inf(&g);
    (
        Softmax::from_flat(&theta, d, k),
        Convergence {
            iterations,
            objective: f,
            gradient,
            converged: gradient <= limits.tolerance * 10.0,
        },
    )
}

/// `dst (m × n, row-major) = a (m × p) · b (p × n)`, where `[m, n, p]` are the sizes and each
/// operand's element `[i, j]` is at `i * strides[0] + j * strides[1]`. Single-threaded: the
/// callers run it on rayon threads of their own. For `f64` (the solver, covariances) and
/// `f32` (the audit's similarities).
pub(crate) fn matmul<T: Copy + From<u8> + 'static>(
    dst: &mut [T],
    [m, n, p]: [usize; 3],
    a: &[T],
    a_strides: [usize; 2],
    b: &[T],
    b_strides: [usize; 2],
) {
    let last = |rows: usize, cols: usize, s: [usize; 2]| {
        (rows.max(1) - 1) * s[0] + (cols.max(1) - 1) * s[1]
    };
    assert!(dst.len() >= m * n, "destination too small");
    assert!(a.len() > last(m, p, a_strides), "left operand too small");
    assert!(b.len() > last(p, n, b_strides), "right operand too small");
    if m == 0 || n == 0 {
        return;
    }
    if p == 0 {
        dst[..m * n].fill(T::from(0));
        return;
    }
    // SAFETY: every element the strides reach lies inside its slice (checked above), `dst`
    // is borrowed mutably and disjoint from the operands, and `read_dst` is false, so the
    // destination is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            p,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_strides[1] as isize,
            a_strides[0] as isize,
            b.as_ptr(),
            b_strides[1] as isize,
            b_strides[0] as isize,
            T::from(0),
            T::from(1),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The L-BFGS two-loop recursion: an approximation of `-H⁻¹ g`.
fn two_loop(g: &[f64], history: &[(Vec<f64>, Vec<f64>, f64)]) -> Vec<f64> {
    let mut q: Vec<f64> = g.to_vec();
    let mut alphas = Vec::with_capacity(history.len());
    for (s, y, rho) in history.iter().rev() {
        let a = rho * dot(s, &q);
        for (qi, yi) in q.iter_mut().zip(y) {
            *qi -= a * yi;
        }
        alphas.push(a);
    }
    if let Some((s, y, _)) = history.last() {
        let gamma = dot(s, y) / dot(y, y);
        q.iter_mut().for_each(|v| *v *= gamma);
    }
    for ((s, y, rho), a) in history.iter().zip(alphas.into_iter().rev()) {
        let b = rho * dot(y, &q);
        for (qi, si) in q.iter_mut().zip(s) {
            *qi += (a - b) * si;
        }
    }
    q.iter_mut().for_each(|v| *v = -*v);
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [usize; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

    fn problem<'a>(x: &'a [f64], labels: &'a [usize], weights: &'a [f64]) -> Problem<'a> {
        Problem {
            x,
            dim: x.len() / labels.len(),
            labels,
            weights,
            rows: &ALL[..labels.len()],
            classes: 1 + labels.iter().max().unwrap(),
        }
    }

    /// A separable toy set with almost no penalty: the loss goes to (nearly) zero.
    #[test]
    fn separable_data_is_fitted_to_a_tiny_loss() {
        let x = [
            2.0, 0.0, 1.5, 0.5, 0.0, 2.0, 0.5, 1.5, -2.0, -2.0, -1.5, -1.0,
        ];
        let labels = [0, 0, 1, 1, 2, 2];
        let weights = [1.0; 6];
        let p = problem(&x, &labels, &weights);
        let (model, conv) = fit(&p, 1e-6, None, Limits::FINAL);
        assert!(conv.objective < 1e-2, "{conv:?}");
        for (i, &y) in labels.iter().enumerate() {
            let mut z = model.logits(&x[i * 2..i * 2 + 2]);
            softmax_in_place(&mut z);
            assert!(z[y] > 0.95, "row {i}: {z:?}");
        }
    }

    /// Against a one-dimensional reference: one feature, two classes, one row each, placed
    /// symmetrically, so the optimum reduces to one unknown found by bisection.
    #[test]
    fn matches_a_one_dimensional_reference() {
        let x = [1.0, -1.0];
        let labels = [1, 0];
        let weights = [1.0, 1.0];
        let lambda = 0.1;
        let (model, conv) = fit(&problem(&x, &labels, &weights), lambda, None, Limits::FINAL);
        assert!(conv.converged, "{conv:?}");
        // Logit margin m = w1 - w0 = 2u with w1 = u, w0 = -u by symmetry; per row the loss
        // is ln(1 + e^{-2u}) and the penalty λ/2·2u². Stationarity: -2/(1+e^{2u}) + 2λu = 0.
        let h = |u: f64| -2.0 / (1.0 + (2.0 * u).exp()) + 2.0 * lambda * u;
        let (mut lo, mut hi) = (0.0, 10.0);
        for _ in 0..200 {
            let mid = (lo + hi) / 2.0;
            if h(mid) > 0.0 { hi = mid } else { lo = mid }
        }
        let u = (lo + hi) / 2.0;
        assert!((model.w[1] - u).abs() < 1e-5, "w {:?} vs u {u}", model.w);
        assert!((model.w[0] + u).abs() < 1e-5, "w {:?} vs u {u}", model.w);
        assert!(
            model.b[0].abs() < 1e-5 && model.b[1].abs() < 1e-5,
            "b {:?}",
            model.b
        );
    }

    /// A warm start from the optimum stops at once; the gradient check holds.
    #[test]
    fn gradient_matches_finite_differences_and_warm_starts_are_free() {
        let x: Vec<f64> = (0..40)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let labels: Vec<usize> = (0..10).map(|i| i % 3).collect();
        let weights: Vec<f64> = (0..10).map(|i| 1.0 + (i % 2) as f64).collect();
        let p = problem(&x, &labels, &weights);
        let theta: Vec<f64> = (0..(4 * 3 + 3)).map(|i| (i as f64 * 0.37).sin()).collect();
        let (_, g) = p.evaluate(&theta, 0.3);
        for j in 0..theta.len() {
            let mut t = theta.clone();
            t[j] += 1e-6;
            let (fp, _) = p.evaluate(&t, 0.3);
            t[j] -= 2e-6;
            let (fm, _) = p.evaluate(&t, 0.3);
            let numeric = (fp - fm) / 2e-6;
            assert!(
                (numeric - g[j]).abs() < 1e-6,
                "coordinate {j}: {numeric} vs {}",
                g[j]
            );
        }
        let (model, _) = fit(&p, 0.3, None, Limits::FINAL);
        let (_, again) = fit(&p, 0.3, Some(&model), Limits::FINAL);
        assert!(again.iterations <= 1, "{again:?}");
    }
}
