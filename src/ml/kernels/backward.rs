//! The two gradients of a pointwise (1×1) convolution on NCHW data, as GEMMs that read the
//! images where they lie: no copy into another layout, and no per-image weight gradients
//! summed afterwards (each task adds every image into its own block of the gradient).

use super::{Out, Pointwise};

/// `dx[b, i, p] = Σ_o weight[o, i] · grad[b, o, p]`: the input's gradient, one GEMM per image.
pub fn pointwise_grad_x(shape: Pointwise, grad: &[f32], weight: &[f32]) -> Vec<f32> {
    let Pointwise {
        batch,
        inputs,
        outputs,
        spatial,
    } = shape;
    assert!(inputs > 0 && outputs > 0, "pointwise conv with channels");
    assert_eq!(
        grad.len(),
        batch * outputs * spatial,
        "pointwise gradient size"
    );
    assert_eq!(weight.len(), outputs * inputs, "pointwise weight size");
    let total = batch * inputs * spatial;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let dst = Out(out.as_mut_ptr());
    crate::ml::lanes::each_task(batch, |b| {
        let dst = dst;
        // SAFETY: image b's block of the output is written by this task alone, and every
        // operand is in bounds by the asserts above; the GEMM writes every element of the block
        // without reading it.
        unsafe {
            gemm::gemm(
                inputs,
                spatial,
                outputs,
                dst.0.add(b * inputs * spatial),
                1,
                spatial as isize,
                false,
                // weight transposed: element (i, o) at o · inputs + i.
                weight.as_ptr(),
                inputs as isize,
                1,
                grad.as_ptr().add(b * outputs * spatial),
                1,
                spatial as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    // SAFETY: every image's block was written above.
    unsafe { out.set_len(total) };
    out
}

/// `dw[o, i] = Σ_{b, p} grad[b, o, p] · x[b, i, p]`: the weight's gradient. One task per block
/// of output channels, which adds each image's GEMM into its block in turn. Each task packs
/// every image's input again, so there are only as many as keep the cores busy: two per
/// thread of the pool, or one on a lane's own thread.
pub fn pointwise_grad_weight(shape: Pointwise, grad: &[f32], x: &[f32]) -> Vec<f32> {
    let Pointwise {
        batch,
        inputs,
        outputs,
        spatial,
    } = shape;
    assert!(inputs > 0 && outputs > 0, "pointwise conv with channels");
    assert_eq!(
        grad.len(),
        batch * outputs * spatial,
        "pointwise gradient size"
    );
    assert_eq!(x.len(), batch * inputs * spatial, "pointwise input size");
    let tasks = if crate::ml::lanes::in_lane() {
        1
    } else {
        2 * rayon::current_num_threads()
    };
    let rows = outputs.div_ceil(tasks).next_multiple_of(16).min(outputs);
    let mut out = vec![0f32; outputs * inputs];
    let dst = Out(out.as_mut_ptr());
    crate::ml::lanes::each_task(outputs.div_ceil(rows), |block| {
        let dst = dst;
        let r0 = block * rows;
        let m = rows.min(outputs - r0);
        for b in 0..batch {
            // SAFETY: rows r0..r0 + m of the output belong to this task alone, and every
            // operand is in bounds by the asserts above.
            unsafe {
                gemm::gemm(
                    m,
                    inputs,
                    spatial,
                    dst.0.add(r0 * inputs),
                    1,
                    inputs as isize,
                    b > 0,
                    grad.as_ptr().add((b * outputs + r0) * spatial),
                    1,
                    spatial as isize,
                    // x transposed: element (p, i) at i · spatial + p.
                    x.as_ptr().add(b * inputs * spatial),
                    spatial as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::kernels::tests::lcg;

    #[test]
    fn both_gradients_match_their_definitions() {
        // 150 output channels: several row blocks (on two or more threads), a partial last
        // one.
        let shape = Pointwise {
            batch: 3,
            inputs: 7,
            outputs: 150,
            spatial: 13,
        };
        let (x, w, g) = (lcg(3 * 7 * 13, 1), lcg(150 * 7, 2), lcg(3 * 150 * 13, 3));
        let dx = pointwise_grad_x(shape, &g, &w);
        let dw = pointwise_grad_weight(shape, &g, &x);
        for b in 0..3 {
            for i in 0..7 {
                for p in 0..13 {
                    let want: f32 = (0..150)
                        .map(|o| w[o * 7 + i] * g[(b * 150 + o) * 13 + p])
                        .sum();
                    let got = dx[(b * 7 + i) * 13 + p];
                    assert!((got - want).abs() < 1e-4, "dx {b} {i} {p}: {got} vs {want}");
                }
            }
        }
        for o in 0..150 {
            for i in 0..7 {
                let want: f32 = (0..3)
                    .flat_map(|b| (0..13).map(move |p| (b, p)))
                    .map(|(b, p)| g[(b * 150 + o) * 13 + p] * x[(b * 7 + i) * 13 + p])
                    .sum();
                let got = dw[o * 7 + i];
                assert!((got - want).abs() < 1e-4, "dw {o} {i}: {got} vs {want}");
            }
        }
    }
}
