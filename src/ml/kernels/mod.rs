//! CPU kernels for the convolutions of an MBConv network on `f32` data: for inference, on
//! NCHW data with BatchNorm folded in, pointwise (1×1) and depthwise convs, each with its bias,
//! ReLU6 and residual add done in the same pass (the "epilogue"); for fine-tuning, on
//! channel-major data (`Order::Channels`), a 1×1 conv's product and both its gradients as one
//! GEMM each, and a depthwise conv's weight gradient (`backward`).
//!
//! Why not burn-flex's own convs: flex runs the GEMM over the whole image, then adds the bias
//! in a second pass, and BatchNorm, the clamp and the residual add are three to four more
//! passes over memory. Here the GEMM runs per block of spatial columns and the epilogue runs
//! while that block is still in cache. flex's depthwise path is scalar for stride 2; here each
//! plane is copied once, padded and (for stride 2) split into its even and odd columns, so
//! every tap reads contiguous inputs, summed in AVX2 registers by hand-written intrinsics (the
//! compiler's vectoriser did not keep these sums in registers).
//!
//! These are raw-slice functions with no burn types (the pointwise kernel is in `pointwise`,
//! the depthwise one in `depthwise` with the padded scratch it reads through in `padded`, the
//! fine-tune's in `backward`, the shapes in `shapes`; im2col and the GEMM wrappers here);
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

/// Raw output pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a region no other task touches (see the callers).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// A matrix in memory for [`matmul`]: its first element and the distance, in elements,
/// between consecutive rows and between consecutive columns.
#[derive(Clone, Copy)]
struct Matrix<P> {
    at: P,
    row: isize,
    col: isize,
}

impl<P> Matrix<P> {
    /// Rows `stride` apart, columns contiguous.
    fn rows(at: P, stride: usize) -> Self {
        Self {
            at,
            row: stride as isize,
            col: 1,
        }
    }

    /// The transpose of [`Matrix::rows`]`(at, stride)`: element (r, c) at `c · stride + r`.
    fn transposed(at: P, stride: usize) -> Self {
        Self {
            at,
            row: 1,
            col: stride as isize,
        }
    }
}

/// The most terms of each dot product that one call of the `gemm` crate sums in [`matmul`].
///
/// `gemm` cuts a long sum into runs and adds each run into `dst`, and where it cuts depends
/// on the block's size: `min(k, 512)` when both `m` and `n` are at most 64, its cache model
/// (which spreads `k` evenly, 672 as 336 + 336) otherwise. The callers size their blocks by
/// the batch they are given, and that depends on whether a prediction ran beside training
/// (`lanes::background`), so the same image's features came out a few ulps apart: the
/// same-seed training test failed now and then under load. Runs of at most 512 are summed
/// in one go by either branch, so each output element is summed the same way in any block.
const DEPTH: usize = 512;

/// `dst = lhs · rhs` for an `m × k` by `k × n` product, or `dst += lhs · rhs` when `add`, on
/// the calling thread (the callers cut the work into tasks themselves). Each element gets
/// the same bits whatever `m` and `n` are ([`DEPTH`]).
///
/// # Safety
/// Every element the shapes and strides reach is in bounds, no one else touches `dst`'s
/// meanwhile, and unless `add` they need not be initialised (the GEMM does not read them).
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: Matrix<*mut f32>,
    lhs: Matrix<*const f32>,
    rhs: Matrix<*const f32>,
    add: bool,
) {
    let runs = k.div_ceil(DEPTH).max(1);
    let depth = k.div_ceil(runs);
    for run in 0..runs {
        let (k0, kn) = (run * depth, depth.min(k - run * depth));
        // SAFETY: as the caller promises; columns k0.. of lhs and rows k0.. of rhs are the
        // next run of the same sums, added to what the runs before wrote.
        unsafe {
            let lhs = Matrix {
                at: lhs.at.offset(k0 as isize * lhs.col),
                ..lhs
            };
            let rhs = Matrix {
                at: rhs.at.offset(k0 as isize * rhs.row),
                ..rhs
            };
            product(
                (m, n, kn),
                dst,
                lhs,
                rhs,
                add || run > 0,
                gemm::Parallelism::None,
            )
        }
    }
}

/// [`matmul`] for one large product that the caller does not cut into tasks: the `gemm` crate
/// spreads it over the pool's threads itself, or runs it on this thread on a lane.
///
/// # Safety
/// As for [`matmul`].
unsafe fn matmul_spread(
    dims: (usize, usize, usize),
    dst: Matrix<*mut f32>,
    lhs: Matrix<*const f32>,
    rhs: Matrix<*const f32>,
    add: bool,
) {
    let parallelism = match crate::ml::lanes::threads_for_one_task() {
        1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    };
    // SAFETY: as the caller promises.
    unsafe { product(dims, dst, lhs, rhs, add, parallelism) }
}

/// The one place these kernels call the `gemm` crate (the head's solver has its own generic
/// wrapper in `softmax`), behind [`matmul`] and [`matmul_spread`].
///
/// # Safety
/// As for [`matmul`].
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: Matrix<*mut f32>,
    lhs: Matrix<*const f32>,
    rhs: Matrix<*const f32>,
    add: bool,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: as the caller promises. `gemm` takes column strides before row strides, and
    // computes alpha · dst + beta · lhs · rhs, reading dst only when asked to.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.at,
            dst.col,
            dst.row,
            add,
            lhs.at,
            lhs.col,
            lhs.row,
            rhs.at,
            rhs.col,
            rhs.row,
            if add { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

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
mod padded;
mod pointwise;
mod shapes;
pub use backward::{
    depthwise_weight_grad, pointwise_grad_weight, pointwise_grad_x, pointwise_product,
};
pub use depthwise::depthwise;
pub use pointwise::pointwise;
pub use shapes::{Depthwise, Order, Pointwise};

/// Whether the hand-written AVX2 + FMA code can run here (false off x86-64).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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
        let src = &x[d.plane(b, c) * plane_in..][..plane_in];
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
    fn a_convs_output_size_follows_its_stride_and_padding() {
        let size = |x, k, s, p| {
            let d = Depthwise::of(x, k, s, p);
            (d.out_height, d.out_width, d.pad_top, d.pad_left)
        };
        // "SAME" at stride 2 on an even side: the odd padding pixel goes to the end.
        assert_eq!(size([1, 8, 224, 224], 3, 2, [0, 1, 0, 1]), (112, 112, 0, 0));
        assert_eq!(size([2, 3, 7, 9], 5, 1, [2, 2, 2, 2]), (7, 9, 2, 2));
        assert_eq!(size([1, 1, 7, 7], 3, 2, [1, 1, 1, 1]), (4, 4, 1, 1));
        assert_eq!(size([1, 1, 6, 6], 3, 1, [0, 0, 0, 0]), (4, 4, 0, 0));
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
            order: Order::Images,
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
