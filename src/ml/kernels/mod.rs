//! CPU kernels for the convolutions of an MBConv network on NCHW `f32` data: for inference,
//! with BatchNorm folded in, pointwise (1×1) and depthwise convs, each with its bias, ReLU6 and
//! residual add done in the same pass (the "epilogue"); for fine-tuning, their gradients
//! (`backward`).
//!
//! Why not burn-flex's own convs: flex runs the GEMM over the whole image, then adds the bias
//! in a second pass, and BatchNorm, the clamp and the residual add are three to four more
//! passes over memory. Here the GEMM runs per block of spatial columns and the epilogue runs
//! while that block is still in cache. flex's depthwise path is scalar for stride 2; here each
//! plane is copied once, padded and (for stride 2) split into its even and odd columns, so
//! every tap reads contiguous inputs, summed in AVX2 registers by hand-written intrinsics (the
//! compiler's vectoriser did not keep these sums in registers).
//!
//! These are raw-slice functions with no burn types (the depthwise kernel is in `depthwise`);
//! `fused_ops` exposes the inference ones as a burn backend extension on flex, and
//! `pointwise_grad` and `depthwise_grad` the ones fine-tuning uses. They spread over the rayon
//! pool, except on a thread that is one of several `lanes` (each core already has its own
//! slice of the batch there).

/// What follows the convolution's sum, per output element.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// One per output channel.
    pub bias: &'a [f32],
    /// Clamp to [0, 6] after the bias.
    pub relu6: bool,
    /// Added last (after the clamp, which is never used together with it in MBConv), laid
    /// out like the output.
    pub residual: Option<&'a [f32]>,
}

impl<'a> Epilogue<'a> {
    /// Nothing after the sum (a conv whose bias is added elsewhere): `zeros` holds one zero
    /// per output channel.
    pub fn none(zeros: &'a [f32]) -> Self {
        Self {
            bias: zeros,
            relu6: false,
            residual: None,
        }
    }
}

/// Floats of input and output columns a pointwise block aims to keep in a core's L2 cache.
const BLOCK_FLOATS: usize = 48 * 1024;

/// Raw output pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a region no other task touches (see the callers).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Declares `$name` that calls `$body` compiled with AVX-512, with AVX2 + FMA, or plainly,
/// whichever this CPU supports: the kernels' loops are plain Rust, so the same source is
/// vectorised three ways and the choice is made at run time (the binary stays portable).
macro_rules! versions {
    ($vis:vis fn $name:ident => $body:ident ($($arg:ident : $ty:ty),* $(,)?)) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) { $body($($arg),*) }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

mod backward;
mod depthwise;
pub use backward::{depthwise_weight_grad, pointwise_grad_weight, pointwise_grad_x};
pub use depthwise::depthwise;

/// Shape of a pointwise convolution's operands.
#[derive(Debug, Clone, Copy)]
pub struct Pointwise {
    pub batch: usize,
    pub inputs: usize,
    pub outputs: usize,
    /// Pixels per image (h · w).
    pub spatial: usize,
}

impl Pointwise {
    /// The operands' shape, from the input's dims `[b, i, h, w]` and the weight's `[o, i, 1,
    /// 1]`.
    pub fn of(x: [usize; 4], weight: [usize; 4]) -> Self {
        assert_eq!(
            x[1], weight[1],
            "pointwise weight matches the input channels"
        );
        Self {
            batch: x[0],
            inputs: x[1],
            outputs: weight[0],
            spatial: x[2] * x[3],
        }
    }

    /// Panics unless there are channels and each operand given has this shape's size: the
    /// input `[b, i, p]`, the weight `[o, i]`, the output's gradient `[b, o, p]`.
    fn check(&self, input: Option<&[f32]>, weight: Option<&[f32]>, grad: Option<&[f32]>) {
        // With no input channel the GEMM would leave the (unzeroed) output unwritten.
        assert!(
            self.inputs > 0 && self.outputs > 0,
            "pointwise conv with channels"
        );
        let (b, p) = (self.batch, self.spatial);
        for (operand, size, what) in [
            (input, b * self.inputs * p, "input"),
            (weight, self.outputs * self.inputs, "weight"),
            (grad, b * self.outputs * p, "gradient"),
        ] {
            if let Some(operand) = operand {
                assert_eq!(operand.len(), size, "pointwise {what} size");
            }
        }
    }
}

/// `out[b, o, p] = epilogue(Σ_i weight[o, i] · x[b, i, p])`.
///
/// The work is cut into (image, block of columns, block of output rows) tasks: columns so
/// that the input panel and the output block stay in cache for the epilogue, rows only when
/// there are too few column blocks to keep every core busy (small late-stage images).
pub fn pointwise(shape: Pointwise, x: &[f32], weight: &[f32], epi: Epilogue<'_>) -> Vec<f32> {
    let Pointwise {
        batch,
        inputs,
        outputs,
        spatial,
    } = shape;
    shape.check(Some(x), Some(weight), None);
    assert_eq!(epi.bias.len(), outputs, "pointwise bias size");
    let total = batch * outputs * spatial;
    if let Some(r) = epi.residual {
        assert_eq!(r.len(), total, "pointwise residual size");
    }
    let cols = (BLOCK_FLOATS / (inputs + outputs))
        .max(16)
        .min(spatial.max(1));
    let col_blocks = spatial.div_ceil(cols);
    let want = 2 * rayon::current_num_threads();
    let row_parts = (want.div_ceil(batch * col_blocks)).clamp(1, outputs.div_ceil(16).max(1));
    let rows = outputs.div_ceil(row_parts).next_multiple_of(8).min(outputs);
    let row_blocks = outputs.div_ceil(rows);

    // Every element is written by the GEMM (which does not read it) before the epilogue, so
    // the buffer is not zeroed first: that would be one more pass over the output.
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let dst = Out(out.as_mut_ptr());
    let tasks = batch * col_blocks * row_blocks;
    let run = |task: usize| {
        let rb = task % row_blocks;
        let cb = (task / row_blocks) % col_blocks;
        let b = task / (row_blocks * col_blocks);
        let (r0, c0) = (rb * rows, cb * cols);
        let (m, n) = (rows.min(outputs - r0), cols.min(spatial - c0));
        let at = b * outputs * spatial + r0 * spatial + c0;
        let dst = dst;
        // SAFETY: the operands are in bounds by the asserts above (rows r0..r0+m of the
        // weight, columns c0..c0+n of image b), and each task's output block is disjoint.
        unsafe {
            gemm::gemm(
                m,
                n,
                inputs,
                dst.0.add(at),
                1,
                spatial as isize,
                false,
                weight.as_ptr().add(r0 * inputs),
                1,
                inputs as isize,
                x.as_ptr().add(b * inputs * spatial + c0),
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
        for o in 0..m {
            let row = at + o * spatial;
            // SAFETY: as above; this row segment belongs to this task alone.
            let block = unsafe { std::slice::from_raw_parts_mut(dst.0.add(row), n) };
            let residual = epi.residual.map(|r| &r[row..row + n]);
            finish(block, epi.bias[r0 + o], epi.relu6, residual);
        }
    };
    super::lanes::each_task(tasks, run);
    // SAFETY: the tasks above cover every (image, row, column) once, and each wrote its block.
    unsafe { out.set_len(total) };
    out
}

versions!(fn finish => finish_body(
    out: &mut [f32], bias: f32, relu6: bool, residual: Option<&[f32]>,
));

#[inline(always)]
fn finish_body(out: &mut [f32], bias: f32, relu6: bool, residual: Option<&[f32]>) {
    match (relu6, residual) {
        (true, None) => out
            .iter_mut()
            .for_each(|v| *v = (*v + bias).clamp(0.0, 6.0)),
        (false, None) => out.iter_mut().for_each(|v| *v += bias),
        (relu6, Some(r)) => out.iter_mut().zip(r).for_each(|(v, r)| {
            let y = *v + bias;
            *v = if relu6 { y.clamp(0.0, 6.0) } else { y } + r;
        }),
    }
}

/// The im2col matrix of a k×k conv with the geometry `d` (its `channels` are the conv's
/// inputs): `[b, c · k · k, oh · ow]`, rows ordered (channel, kernel row, kernel column) as a
/// conv weight `[o, c, k, k]` is, zeros where a tap falls in the padding.
pub fn im2col(d: Depthwise, x: &[f32]) -> Vec<f32> {
    let (k, s) = (d.kernel, d.stride);
    let (plane_in, plane_out) = (d.height * d.width, d.out_height * d.out_width);
    assert_eq!(
        x.len(),
        d.batch * d.channels * plane_in,
        "im2col input size"
    );
    let rows = d.channels * k * k;
    let mut out = vec![0f32; d.batch * rows * plane_out];
    let fill = |r: usize, dst: &mut [f32]| {
        let (b, row) = (r / rows, r % rows);
        let (c, i, j) = (row / (k * k), row / k % k, row % k);
        let src = &x[(b * d.channels + c) * plane_in..][..plane_in];
        for (oy, out_row) in dst.chunks_exact_mut(d.out_width).enumerate() {
            let Some(y) = (oy * s + i)
                .checked_sub(d.pad_top)
                .filter(|&y| y < d.height)
            else {
                continue;
            };
            let line = &src[y * d.width..][..d.width];
            for (ox, v) in out_row.iter_mut().enumerate() {
                if let Some(xi) = (ox * s + j)
                    .checked_sub(d.pad_left)
                    .filter(|&xi| xi < d.width)
                {
                    *v = line[xi];
                }
            }
        }
    };
    super::lanes::each_chunk(&mut out, plane_out, fill);
    out
}

/// Shape and padding of a depthwise convolution (one k×k filter per channel).
#[derive(Debug, Clone, Copy)]
pub struct Depthwise {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Zero rows above and columns left of the image; the bottom and right padding follow
    /// from the output size.
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_height: usize,
    pub out_width: usize,
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    pub(super) fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn pointwise_matches_the_definition_with_each_epilogue() {
        let shape = Pointwise {
            batch: 2,
            inputs: 5,
            outputs: 37,
            spatial: 2500,
        };
        // 2,500 columns: more than one block of columns, with a partial last one.
        let x = lcg(2 * 5 * 2500, 4);
        let w = lcg(37 * 5, 5);
        let bias: Vec<f32> = lcg(37, 6).iter().map(|v| v * 8.0).collect();
        let residual = lcg(2 * 37 * 2500, 7);
        for (relu6, res) in [(false, None), (true, None), (false, Some(&residual[..]))] {
            let got = pointwise(
                shape,
                &x,
                &w,
                Epilogue {
                    bias: &bias,
                    relu6,
                    residual: res,
                },
            );
            for b in 0..2 {
                for o in 0..37 {
                    for p in 0..2500 {
                        let mut y = bias[o];
                        for i in 0..5 {
                            y += w[o * 5 + i] * x[(b * 5 + i) * 2500 + p];
                        }
                        if relu6 {
                            y = y.clamp(0.0, 6.0);
                        }
                        let at = (b * 37 + o) * 2500 + p;
                        if let Some(r) = res {
                            y += r[at];
                        }
                        assert!((got[at] - y).abs() < 1e-5, "{relu6} {b} {o} {p}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_lane_runs_the_kernels_on_its_own_thread_with_the_same_results() {
        let shape = Pointwise {
            batch: 1,
            inputs: 8,
            outputs: 24,
            spatial: 200,
        };
        let d = Depthwise {
            batch: 1,
            channels: 4,
            height: 12,
            width: 12,
            kernel: 5,
            stride: 2,
            pad_top: 1,
            pad_left: 1,
            out_height: 6,
            out_width: 6,
        };
        let (x, w, bias) = (lcg(8 * 200, 8), lcg(24 * 8, 9), lcg(24, 10));
        let epi = Epilogue {
            bias: &bias,
            relu6: true,
            residual: None,
        };
        let (dx, dw) = (lcg(4 * 144, 11), lcg(4 * 25, 12));
        let dwe = Epilogue {
            bias: &bias[..4],
            ..epi
        };
        let pooled = (pointwise(shape, &x, &w, epi), depthwise(d, &dx, &dw, dwe));
        assert!(!crate::ml::lanes::in_lane());
        let laned =
            crate::ml::lanes::map_slices(&[0, 1], 2, crate::ml::lanes::Work::Background, |_| {
                assert!(crate::ml::lanes::in_lane(), "runs as a lane");
                (pointwise(shape, &x, &w, epi), depthwise(d, &dx, &dw, dwe))
            });
        assert_eq!(laned.len(), 2);
        for r in laned {
            assert_eq!(r, pooled);
        }
    }
}
