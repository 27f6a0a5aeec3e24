//! Gradients for fine-tuning on flex: those of a pointwise (1×1) convolution on NCHW data, as
//! GEMMs that read the images where they lie (no copy into another layout, and no per-image
//! weight gradients summed afterwards: each task adds every image into its own block), and a
//! depthwise convolution's weight gradient, which reads its inputs through the forward
//! kernel's padded scratch. (A depthwise conv's input gradient is the forward kernel itself,
//! see `depthwise_grad`.)

use super::padded::{LANES, Layout, SCRATCH, fill};
use super::{Depthwise, Matrix, Out, Pointwise, has_avx2, matmul};

thread_local! {
    /// Each thread's copy of an output gradient plane, rows padded to whole vectors.
    static GRAD_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dx[b, i, p] = Σ_o weight[o, i] · grad[b, o, p]`: the input's gradient, one GEMM per image.
pub fn pointwise_grad_x(shape: Pointwise, grad: &[f32], weight: &[f32]) -> Vec<f32> {
    let Pointwise {
        batch,
        inputs,
        outputs,
        spatial,
    } = shape;
    shape.check(None, Some(weight), Some(grad));
    let total = batch * inputs * spatial;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let dst = Out(out.as_mut_ptr());
    crate::ml::lanes::each_task(batch, |b| {
        let dst = dst;
        // SAFETY: image b's block of the output is written by this task alone, and every
        // operand is in bounds by the asserts above; the GEMM writes every element of the block
        // without reading it.
        unsafe {
            matmul(
                (inputs, spatial, outputs),
                Matrix::rows(dst.0.add(b * inputs * spatial), spatial),
                // weight transposed: element (i, o) at o · inputs + i.
                Matrix::transposed(weight.as_ptr(), inputs),
                Matrix::rows(grad.as_ptr().add(b * outputs * spatial), spatial),
                false,
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
    shape.check(Some(x), None, Some(grad));
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
                matmul(
                    (m, inputs, spatial),
                    Matrix::rows(dst.0.add(r0 * inputs), inputs),
                    Matrix::rows(grad.as_ptr().add((b * outputs + r0) * spatial), spatial),
                    // x transposed: element (p, i) at i · spatial + p.
                    Matrix::transposed(x.as_ptr().add(b * inputs * spatial), spatial),
                    b > 0,
                );
            }
        }
    });
    out
}

/// Gradient of [`depthwise`](super::depthwise)'s sum (no bias) with respect to its weight, given the output's
/// gradient `grad` (`[b, c, oh, ow]`): `gw[c, i, j] = Σ_{b, y, x} grad[b, c, y, x] · x[b, c,
/// y·s + i − top, x·s + j − left]`. One task per channel, whose sums run over every image (so
/// no two tasks share one); the input is read through the forward pass's padded scratch, so
/// every tap's products are whole vectors.
pub fn depthwise_weight_grad(shape: Depthwise, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let d = shape;
    let (plane_in, plane_out) = (d.height * d.width, d.out_height * d.out_width);
    let kk = d.kernel * d.kernel;
    assert_eq!(
        x.len(),
        d.batch * d.channels * plane_in,
        "depthwise input size"
    );
    assert_eq!(
        grad.len(),
        d.batch * d.channels * plane_out,
        "depthwise gradient size"
    );
    let layout = Layout::new(&d);
    let width = layout.width;
    let avx2 = has_avx2();
    let mut out = vec![0f32; d.channels * kk];
    crate::ml::lanes::each_chunk(&mut out, kk, |c, gw| {
        SCRATCH.with_borrow_mut(|scratch| {
            GRAD_ROWS.with_borrow_mut(|rows| {
                // Zeros past each row's last output: they cancel whatever the scratch holds
                // there.
                rows.clear();
                rows.resize(d.out_height * width, 0.0);
                for b in 0..d.batch {
                    let p = b * d.channels + c;
                    let scratch = fill(&layout, &x[p * plane_in..][..plane_in], scratch, avx2);
                    let g = &grad[p * plane_out..][..plane_out];
                    for (row, g) in rows
                        .chunks_exact_mut(width)
                        .zip(g.chunks_exact(d.out_width))
                    {
                        row[..d.out_width].copy_from_slice(g);
                    }
                    tap_sums(&layout, scratch, rows, gw);
                }
            })
        })
    });
    out
}

versions!(fn tap_sums => tap_sums_body(
    layout: &Layout, scratch: &[f32], rows: &[f32], gw: &mut [f32],
));

/// `gw[t] += Σ_{y, x} rows[y, x] · scratch[y · s · phase_width + offsets[t] + x]` over rows
/// padded to whole vectors, in [`LANES`] partial sums (which the compiler vectorises).
#[inline(always)]
fn tap_sums_body(layout: &Layout, scratch: &[f32], rows: &[f32], gw: &mut [f32]) {
    let (d, width) = (layout.d, layout.width);
    let step = d.stride * layout.padding.phase_width;
    assert!(
        layout.reach <= scratch.len(),
        "depthwise scratch holds every read"
    );
    for (&offset, sum) in layout.offsets.iter().zip(gw.iter_mut()) {
        let mut acc = [0f32; LANES];
        for (y, g) in rows.chunks_exact(width).enumerate() {
            let xs = &scratch[y * step + offset..][..width];
            for (g, x) in g.chunks_exact(LANES).zip(xs.chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += g[l] * x[l];
                }
            }
        }
        *sum += acc.iter().sum::<f32>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::kernels::tests::lcg;

    #[test]
    fn depthwise_weight_gradient_matches_its_definition() {
        // Rows wide enough for the AVX2 split of stride-2 planes, and narrower than a vector.
        for (h, w, k, s, top, left) in [
            (9usize, 37usize, 5, 2usize, 1, 2),
            (20, 37, 3, 2, 0, 1),
            (13, 19, 5, 1, 2, 2),
            (5, 6, 3, 1, 1, 1),
        ] {
            let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
            let d = Depthwise {
                batch: 2,
                channels: 3,
                height: h,
                width: w,
                kernel: k,
                stride: s,
                pad_top: top,
                pad_left: left,
                out_height: oh,
                out_width: ow,
            };
            let (x, g) = (lcg(2 * 3 * h * w, 4), lcg(2 * 3 * oh * ow, 5));
            let got = depthwise_weight_grad(d, &x, &g);
            for c in 0..3 {
                for (i, j) in (0..k).flat_map(|i| (0..k).map(move |j| (i, j))) {
                    let mut want = 0f32;
                    for b in 0..2 {
                        for (y, xo) in (0..oh).flat_map(|y| (0..ow).map(move |xo| (y, xo))) {
                            let yi = (y * s + i).checked_sub(top).filter(|&v| v < h);
                            let xi = (xo * s + j).checked_sub(left).filter(|&v| v < w);
                            if let (Some(yi), Some(xi)) = (yi, xi) {
                                want += g[((b * 3 + c) * oh + y) * ow + xo]
                                    * x[((b * 3 + c) * h + yi) * w + xi];
                            }
                        }
                    }
                    let at = (c * k + i) * k + j;
                    assert!(
                        (got[at] - want).abs() < 1e-4,
                        "{d:?} tap {c} {i} {j}: {} vs {want}",
                        got[at]
                    );
                }
            }
        }
    }

    #[test]
    fn a_lane_computes_the_same_pointwise_gradients() {
        // In a lane the weight gradient is one task over every row; on the pool, several.
        let shape = Pointwise {
            batch: 2,
            inputs: 9,
            outputs: 100,
            spatial: 20,
        };
        let (x, w, g) = (lcg(2 * 9 * 20, 6), lcg(100 * 9, 7), lcg(2 * 100 * 20, 8));
        let pooled = (
            pointwise_grad_x(shape, &g, &w),
            pointwise_grad_weight(shape, &g, &x),
        );
        let laned =
            crate::ml::lanes::map_slices(&[0, 1], 2, crate::ml::lanes::Work::Background, |_| {
                assert!(crate::ml::lanes::in_lane(), "runs as a lane");
                (
                    pointwise_grad_x(shape, &g, &w),
                    pointwise_grad_weight(shape, &g, &x),
                )
            });
        for (dx, dw) in laned {
            assert_eq!(dx, pooled.0);
            // The same sums, in the same order per element.
            for (a, b) in dw.iter().zip(&pooled.1) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

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
