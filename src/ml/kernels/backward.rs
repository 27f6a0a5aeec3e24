//! The fine-tune's kernels on flex: a pointwise (1×1) convolution and both its gradients over
//! channel-major activations ([`Order::Channels`](super::Order)), where each is one GEMM over
//! the whole batch's pixels, and a depthwise convolution's weight gradient, which reads its
//! inputs through the forward kernel's padded scratch. (A depthwise conv's input gradient is
//! the forward kernel itself, see `depthwise_grad`.)

use super::padded::{LANES, Layout, SCRATCH, fill};
use super::{Depthwise, Matrix, Pointwise, has_avx2, matmul_spread};

thread_local! {
    /// Each thread's copy of an output gradient plane, rows padded to whole vectors.
    static GRAD_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[o, n] = Σ_i weight[o, i] · x[i, n]` over the `n = b · p` pixels of channel-major
/// activations: a pointwise conv's sum (no bias), the output channel-major too.
pub fn pointwise_product(shape: Pointwise, x: &[f32], weight: &[f32]) -> Vec<f32> {
    shape.check(Some(x), Some(weight), None);
    let Pointwise {
        inputs, outputs, ..
    } = shape;
    let n = shape.batch * shape.spatial;
    let mut out: Vec<f32> = Vec::with_capacity(outputs * n);
    // SAFETY: the operands are in bounds by the asserts above; the GEMM writes every element
    // of `out` without reading it.
    unsafe {
        matmul_spread(
            (outputs, n, inputs),
            Matrix::rows(out.as_mut_ptr(), n),
            Matrix::rows(weight.as_ptr(), inputs),
            Matrix::rows(x.as_ptr(), n),
            false,
        );
        out.set_len(outputs * n);
    }
    out
}

/// `dx[i, n] = Σ_o weight[o, i] · grad[o, n]`: the input's gradient, channel-major like the
/// output's gradient `grad`.
pub fn pointwise_grad_x(shape: Pointwise, grad: &[f32], weight: &[f32]) -> Vec<f32> {
    shape.check(None, Some(weight), Some(grad));
    let Pointwise {
        inputs, outputs, ..
    } = shape;
    let n = shape.batch * shape.spatial;
    let mut out: Vec<f32> = Vec::with_capacity(inputs * n);
    // SAFETY: as in `pointwise_product`.
    unsafe {
        matmul_spread(
            (inputs, n, outputs),
            Matrix::rows(out.as_mut_ptr(), n),
            // weight transposed: element (i, o) at o · inputs + i.
            Matrix::transposed(weight.as_ptr(), inputs),
            Matrix::rows(grad.as_ptr(), n),
            false,
        );
        out.set_len(inputs * n);
    }
    out
}

/// `dw[o, i] = Σ_n grad[o, n] · x[i, n]`: the weight's gradient, from the channel-major output
/// gradient and input.
pub fn pointwise_grad_weight(shape: Pointwise, grad: &[f32], x: &[f32]) -> Vec<f32> {
    shape.check(Some(x), None, Some(grad));
    let Pointwise {
        inputs, outputs, ..
    } = shape;
    let n = shape.batch * shape.spatial;
    let mut out: Vec<f32> = Vec::with_capacity(outputs * inputs);
    // SAFETY: as in `pointwise_product`.
    unsafe {
        matmul_spread(
            (outputs, inputs, n),
            Matrix::rows(out.as_mut_ptr(), inputs),
            Matrix::rows(grad.as_ptr(), n),
            // x transposed: element (q, i) at i · n + q.
            Matrix::transposed(x.as_ptr(), n),
            false,
        );
        out.set_len(outputs * inputs);
    }
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
                    let p = d.plane(b, c);
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
    use crate::ml::kernels::Order;
    use crate::ml::kernels::tests::lcg;

    #[test]
    fn depthwise_weight_gradient_matches_its_definition() {
        // Rows wide enough for the AVX2 split of stride-2 planes, and narrower than a vector;
        // planes in either order.
        let geometries = [
            (9usize, 37usize, 5, 2usize, 1, 2),
            (20, 37, 3, 2, 0, 1),
            (13, 19, 5, 1, 2, 2),
            (5, 6, 3, 1, 1, 1),
        ];
        let orders = [Order::Images, Order::Channels];
        for ((h, w, k, s, top, left), order) in geometries
            .into_iter()
            .flat_map(|g| orders.map(move |o| (g, o)))
        {
            let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
            let d = Depthwise {
                batch: 2,
                channels: 3,
                order,
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
                        let p = match order {
                            Order::Images => b * 3 + c,
                            Order::Channels => c * 2 + b,
                        };
                        for (y, xo) in (0..oh).flat_map(|y| (0..ow).map(move |xo| (y, xo))) {
                            let yi = (y * s + i).checked_sub(top).filter(|&v| v < h);
                            let xi = (xo * s + j).checked_sub(left).filter(|&v| v < w);
                            if let (Some(yi), Some(xi)) = (yi, xi) {
                                want += g[(p * oh + y) * ow + xo] * x[(p * h + yi) * w + xi];
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

    /// A shape large enough that the `gemm` crate splits it between threads.
    const SHAPE: Pointwise = Pointwise {
        batch: 3,
        inputs: 70,
        outputs: 150,
        spatial: 49,
    };

    #[test]
    fn a_lane_computes_the_same_pointwise_products() {
        // On a lane each GEMM runs on its thread alone; on the pool, the gemm crate splits it
        // (over rows and columns, so the sums are the same): the results must not depend on
        // where they ran.
        assert_eq!(
            crate::ml::lanes::threads_for_one_task(),
            rayon::current_num_threads()
        );
        let shape = SHAPE;
        let n = shape.batch * shape.spatial;
        let (x, w, g) = (
            lcg(shape.inputs * n, 6),
            lcg(shape.outputs * shape.inputs, 7),
            lcg(shape.outputs * n, 8),
        );
        let all = || {
            [
                pointwise_product(shape, &x, &w),
                pointwise_grad_x(shape, &g, &w),
                pointwise_grad_weight(shape, &g, &x),
            ]
        };
        let pooled = all();
        let laned =
            crate::ml::lanes::map_slices(&[0, 1], 2, crate::ml::lanes::Work::Background, |_| {
                assert!(crate::ml::lanes::in_lane(), "runs as a lane");
                assert_eq!(
                    crate::ml::lanes::threads_for_one_task(),
                    1,
                    "one thread a lane"
                );
                all()
            });
        for products in laned {
            for (laned, pooled) in products.iter().zip(&pooled) {
                assert_eq!(laned.len(), pooled.len());
                for (a, b) in laned.iter().zip(pooled) {
                    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn the_product_and_both_gradients_match_their_definitions() {
        let Pointwise {
            inputs: ni,
            outputs: no,
            ..
        } = SHAPE;
        let n = SHAPE.batch * SHAPE.spatial;
        let (x, w, g) = (lcg(ni * n, 1), lcg(no * ni, 2), lcg(no * n, 3));
        let y = pointwise_product(SHAPE, &x, &w);
        let dx = pointwise_grad_x(SHAPE, &g, &w);
        let dw = pointwise_grad_weight(SHAPE, &g, &x);
        let close = |got: f32, want: f32, what: &str| {
            assert!((got - want).abs() < 1e-3, "{what}: {got} vs {want}");
        };
        for p in 0..n {
            for o in 0..no {
                let want: f32 = (0..ni).map(|i| w[o * ni + i] * x[i * n + p]).sum();
                close(y[o * n + p], want, &format!("y {o} {p}"));
            }
            for i in 0..ni {
                let want: f32 = (0..no).map(|o| w[o * ni + i] * g[o * n + p]).sum();
                close(dx[i * n + p], want, &format!("dx {i} {p}"));
            }
        }
        for o in 0..no {
            for i in 0..ni {
                let want: f32 = (0..n).map(|p| g[o * n + p] * x[i * n + p]).sum();
                close(dw[o * ni + i], want, &format!("dw {o} {i}"));
            }
        }
    }
}
