//! The depthwise k×k kernel with its bias and ReLU6 (see the parent module for why it is
//! written out rather than left to burn-flex), and the padded scratch layout that the weight
//! gradient (`backward`) reads its inputs through too.

use std::mem::MaybeUninit;

use super::{Depthwise, Epilogue};

/// An output element not written yet.
type Uninit = MaybeUninit<f32>;

thread_local! {
    /// Each thread's padded copy of the plane it works on, kept between planes and calls.
    pub(super) static SCRATCH: std::cell::RefCell<Vec<f32>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[b, c, y, x] = epilogue(Σ_{i,j} w[c, i, j] · x[b, c, y·s + i − top, x·s + j − left])`
/// with zeros outside the image; one task per (image, channel) plane.
pub fn depthwise(shape: Depthwise, x: &[f32], weight: &[f32], epi: Epilogue<'_>) -> Vec<f32> {
    depthwise_with(shape, x, weight, epi, has_avx2())
}

/// [`depthwise`] with the hand-written AVX2 sums (`avx2`, taken only where the CPU has them)
/// or the plain ones (what other CPUs run; tests run both).
fn depthwise_with(
    shape: Depthwise,
    x: &[f32],
    weight: &[f32],
    epi: Epilogue<'_>,
    avx2: bool,
) -> Vec<f32> {
    let total = shape.batch * shape.channels * shape.out_height * shape.out_width;
    // Every output is written once by its plane's task, so the buffer is not zeroed first.
    let mut out: Vec<f32> = Vec::with_capacity(total);
    depthwise_into(
        shape,
        x,
        weight,
        epi,
        avx2,
        &mut out.spare_capacity_mut()[..total],
    );
    // SAFETY: `depthwise_into` wrote every element of the first `total`.
    unsafe { out.set_len(total) };
    out
}

/// [`depthwise_with`] into `out`, every element of which it writes.
fn depthwise_into(
    shape: Depthwise,
    x: &[f32],
    weight: &[f32],
    epi: Epilogue<'_>,
    avx2: bool,
    out: &mut [Uninit],
) {
    let d = shape;
    let plane_in = d.height * d.width;
    let plane_out = d.out_height * d.out_width;
    assert!(
        d.stride >= 1 && d.kernel >= 1,
        "depthwise stride and kernel"
    );
    assert_eq!(
        x.len(),
        d.batch * d.channels * plane_in,
        "depthwise input size"
    );
    assert_eq!(
        weight.len(),
        d.channels * d.kernel * d.kernel,
        "depthwise weight size"
    );
    assert_eq!(
        out.len(),
        d.batch * d.channels * plane_out,
        "depthwise output size"
    );
    assert_eq!(epi.bias.len(), d.channels, "depthwise bias size");
    assert!(
        epi.residual.is_none(),
        "no residual after a depthwise conv in MBConv"
    );
    let layout = Layout::new(&d);
    // Each plane's task writes every element of its plane (`sum_rows` and `sum_rows_avx2`
    // write each output of each row), and the planes cover `out`.
    crate::ml::lanes::each_chunk(out, plane_out, |plane, dst| {
        let c = plane % d.channels;
        let src = &x[plane * plane_in..][..plane_in];
        let taps = &weight[c * d.kernel * d.kernel..][..d.kernel * d.kernel];
        SCRATCH.with_borrow_mut(|scratch| {
            depthwise_plane(
                &layout,
                src,
                taps,
                epi.bias[c],
                epi.relu6,
                dst,
                scratch,
                avx2,
            )
        });
    });
}

versions!(fn depthwise_plane => depthwise_plane_body(
    layout: &Layout, src: &[f32], taps: &[f32], bias: f32, relu6: bool, dst: &mut [Uninit],
    scratch: &mut Vec<f32>, avx2: bool,
));

/// Outputs summed together in one vector register.
pub(super) const LANES: usize = 8;

/// How every plane of one call is copied into its scratch and read back: the same for all
/// planes, so worked out once per call.
///
/// The input is copied into the scratch with its zero padding and, for stride `s > 1`,
/// regrouped by `column mod s` (one "phase" per remainder), so that the columns one tap reads
/// for consecutive outputs are consecutive and always in bounds.
pub(super) struct Layout {
    pub(super) d: Depthwise,
    /// Padded rows the outputs read.
    rows: usize,
    /// A row of outputs rounded up to whole vectors of [`LANES`]: what each row's last run
    /// reads and computes.
    pub(super) width: usize,
    /// Width of one phase's padded row: enough for the last run's reads, past the image's
    /// right edge if need be.
    pub(super) phase_width: usize,
    /// Per phase p: its first padded column c that holds an image column (c · s + p − left),
    /// that image column (none if the phase holds none), and how many it holds, every s-th
    /// image column from that one on.
    phases: Vec<(usize, Option<usize>, usize)>,
    /// Per tap (i, j), where it reads for output (0, 0): phase j mod s, row i, column j / s.
    pub(super) offsets: Vec<usize>,
    /// One past the furthest scratch element any output reads; [`fill`] makes the scratch at
    /// least this long.
    pub(super) reach: usize,
}

impl Layout {
    pub(super) fn new(d: &Depthwise) -> Self {
        let (s, k, w) = (d.stride, d.kernel, d.width);
        let rows = (d.out_height - 1) * s + k;
        let width = d.out_width.next_multiple_of(LANES);
        let phase_width = width + (k - 1) / s;
        let phases = (0..s)
            .map(|p| {
                let first = d.pad_left.saturating_sub(p).div_ceil(s).min(phase_width);
                let x0 = (first * s + p).checked_sub(d.pad_left).filter(|&x| x < w);
                let n = x0.map_or(0, |x0| (w - x0).div_ceil(s).min(phase_width - first));
                (first, x0, n)
            })
            .collect();
        let offsets = (0..k * k)
            .map(|t| {
                let (i, j) = (t / k, t % k);
                ((j % s) * rows + i) * phase_width + j / s
            })
            .collect::<Vec<_>>();
        // Output row y reads from y · s · phase_width on; its last run reaches a whole vector
        // past the start of its last group of lanes, which the phase width leaves room for.
        let reach = offsets.iter().max().copied().unwrap_or(0)
            + (d.out_height - 1) * s * phase_width
            + width;
        assert!(
            reach <= s * rows * phase_width,
            "depthwise scratch holds every read"
        );
        Self {
            d: *d,
            rows,
            width,
            phase_width,
            phases,
            offsets,
            reach,
        }
    }
}

/// One plane: copied into `scratch` as [`Layout`] says, then every run of [`LANES`] outputs
/// of a row summed over all taps in registers and stored once ([`sum_rows`]).
#[inline(always)]
fn depthwise_plane_body(
    layout: &Layout,
    src: &[f32],
    taps: &[f32],
    bias: f32,
    relu6: bool,
    dst: &mut [Uninit],
    scratch: &mut Vec<f32>,
    avx2: bool,
) {
    fill(layout, src, scratch, avx2);
    let d = layout.d;
    let plan = Rows {
        offsets: &layout.offsets,
        taps,
        bias,
        relu6,
        row_step: d.stride * layout.phase_width,
        width: d.out_width,
    };
    assert!(
        layout.reach <= scratch.len(),
        "depthwise scratch holds every read"
    );
    assert_eq!(
        dst.len(),
        d.out_height * d.out_width,
        "depthwise plane size"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2 && has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA, and every read is in bounds (asserted above).
        // EfficientNet's 3×3 and 5×5 kernels get their own copies with the taps unrolled.
        match d.kernel {
            3 => return unsafe { sum_rows_avx2::<9>(&plan, scratch, dst) },
            5 => return unsafe { sum_rows_avx2::<25>(&plan, scratch, dst) },
            _ => {}
        }
    }
    sum_rows(&plan, scratch, dst);
}

/// Copies one input plane into `scratch` as `layout` says (AVX2 shuffles for stride 2 if
/// `avx2` and the CPU has them).
#[inline(always)]
pub(super) fn fill(layout: &Layout, src: &[f32], scratch: &mut Vec<f32>, avx2: bool) {
    let Layout {
        d,
        rows,
        phase_width,
        ..
    } = *layout;
    let (s, w) = (d.stride, d.width);
    // Every element of the scratch is overwritten below: zeros where the padding is, the
    // image elsewhere (so it is not cleared first, which would be one more pass; only a
    // scratch that grows gets its new part zeroed by `resize`).
    scratch.resize(s * rows * phase_width, 0.0);
    for (p, &(first, x0, n)) in layout.phases.iter().enumerate() {
        let phase = &mut scratch[p * rows * phase_width..][..rows * phase_width];
        for (r, out) in phase.chunks_exact_mut(phase_width).enumerate() {
            let row = r
                .checked_sub(d.pad_top)
                .filter(|&y| y < d.height)
                .map(|y| &src[y * w..][..w]);
            let (Some(row), Some(x0)) = (row, x0) else {
                out.fill(0.0);
                continue;
            };
            out[..first].fill(0.0);
            let (image, right) = out[first..].split_at_mut(n);
            if s == 1 {
                image.copy_from_slice(&row[x0..x0 + n]);
            } else if s == 2 {
                every_other(image, &row[x0..], avx2);
            } else {
                image
                    .iter_mut()
                    .zip(row[x0..].iter().step_by(s))
                    .for_each(|(o, v)| *o = *v);
            }
            right.fill(0.0);
        }
    }
}

/// `image[i] = row[2 · i]`: one phase of a stride-2 plane. Written for whole vectors
/// (the compiler does not vectorise a strided read on its own): two loads, a shuffle that
/// keeps the even elements of each, and a permute that puts them in order.
#[inline(always)]
fn every_other(image: &mut [f32], row: &[f32], avx2: bool) {
    assert!(
        row.len() > 2 * (image.len().max(1) - 1),
        "every other element is in the row"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if avx2 && has_avx2() {
        // Whole vectors of 8 outputs whose 16 inputs are all in the row.
        let whole = (row.len() / 16).min(image.len() / 8);
        // SAFETY: the CPU has AVX2; vector v reads row[16v..16v + 16] and writes
        // image[8v..8v + 8], in bounds by `whole`.
        unsafe { every_other_avx2(&mut image[..whole * 8], &row[..whole * 16]) };
        done = whole * 8;
    }
    for (i, o) in image.iter_mut().enumerate().skip(done) {
        *o = row[2 * i];
    }
}

/// [`every_other`] for whole vectors: `image` holds 8 floats per 16 of `row`.
///
/// # Safety
/// The CPU has AVX2, and `row.len() == 2 * image.len()`, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn every_other_avx2(image: &mut [f32], row: &[f32]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(row.len(), 2 * image.len());
    for (out, pair) in image.chunks_exact_mut(8).zip(row.chunks_exact(16)) {
        // SAFETY: `pair` holds 16 floats and `out` 8.
        unsafe {
            let a = _mm256_loadu_ps(pair.as_ptr());
            let b = _mm256_loadu_ps(pair.as_ptr().add(8));
            // [a0 a2 b0 b2 | a4 a6 b4 b6], then the 64-bit lanes reordered to a0 a2 a4 a6 b0...
            let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let ordered = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(even));
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_castpd_ps(ordered));
        }
    }
}

/// What [`sum_rows`] needs of one plane besides its scratch and output.
struct Rows<'a> {
    /// Per tap, where it reads in the scratch for output (0, 0).
    offsets: &'a [usize],
    taps: &'a [f32],
    bias: f32,
    relu6: bool,
    /// Scratch elements between the reads of consecutive output rows.
    row_step: usize,
    /// Outputs per row.
    width: usize,
}

/// `out[y, x] = epilogue(bias + Σ_t taps[t] · scratch[y · row_step + offsets[t] + x])`.
#[inline(always)]
fn sum_rows(plan: &Rows<'_>, scratch: &[f32], dst: &mut [Uninit]) {
    for (y, out_row) in dst.chunks_exact_mut(plan.width).enumerate() {
        let base = &scratch[y * plan.row_step..];
        for (x0, out) in out_row
            .chunks_mut(LANES)
            .enumerate()
            .map(|(r, o)| (r * LANES, o))
        {
            let mut run = [plan.bias; LANES];
            for (&o, &tap) in plan.offsets.iter().zip(plan.taps) {
                let input = &base[o + x0..][..LANES];
                run.iter_mut().zip(input).for_each(|(r, v)| *r += tap * v);
            }
            for (o, r) in out.iter_mut().zip(run) {
                o.write(if plan.relu6 { r.clamp(0.0, 6.0) } else { r });
            }
        }
    }
}

/// Whether the hand-written AVX2 + FMA code can run here (false off x86-64).
pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`sum_rows`] in AVX2 registers for a kernel of `KK` taps, written out because the
/// compiler's vectoriser does not keep these sums in registers on its own. The taps are
/// broadcast once per plane and unrolled; four independent sums per run take turns over them,
/// so that each FMA need not wait for the previous one's result; bias and ReLU6 are applied in
/// registers and full runs are stored straight into the output.
///
/// # Safety
/// The CPU has AVX2 and FMA, `plan` has `KK` taps, and `scratch` holds every read (see the
/// caller's assert).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_rows_avx2<const KK: usize>(plan: &Rows<'_>, scratch: &[f32], dst: &mut [Uninit]) {
    use std::arch::x86_64::*;
    let offsets: [usize; KK] = plan.offsets.try_into().expect("KK taps");
    let taps: [f32; KK] = plan.taps.try_into().expect("KK taps");
    let mut broadcast = [_mm256_setzero_ps(); KK];
    for (b, t) in broadcast.iter_mut().zip(taps) {
        *b = _mm256_set1_ps(t);
    }
    let taps = broadcast;
    let (zero, six, bias) = (
        _mm256_setzero_ps(),
        _mm256_set1_ps(6.0),
        _mm256_set1_ps(plan.bias),
    );
    for (y, out_row) in dst.chunks_exact_mut(plan.width).enumerate() {
        // SAFETY: in bounds by the caller's assert on the furthest read.
        let base = unsafe { scratch.as_ptr().add(y * plan.row_step) };
        let mut x0 = 0;
        while x0 < plan.width {
            // SAFETY: as above.
            let at = unsafe { base.add(x0) };
            let mut acc = [bias, zero, zero, zero];
            for t in 0..KK {
                // SAFETY: as above.
                let x = unsafe { _mm256_loadu_ps(at.add(offsets[t])) };
                acc[t % 4] = _mm256_fmadd_ps(taps[t], x, acc[t % 4]);
            }
            let mut sum =
                _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            if plan.relu6 {
                sum = _mm256_min_ps(_mm256_max_ps(sum, zero), six);
            }
            let left = plan.width - x0;
            if left >= LANES {
                // SAFETY: outputs x0..x0 + 8 of this row exist (written, never read).
                unsafe { _mm256_storeu_ps(out_row.as_mut_ptr().add(x0).cast::<f32>(), sum) };
            } else {
                let mut run = [0f32; LANES];
                // SAFETY: `run` holds 8 floats.
                unsafe { _mm256_storeu_ps(run.as_mut_ptr(), sum) };
                for (o, v) in out_row[x0..].iter_mut().zip(run) {
                    o.write(v);
                }
            }
            x0 += LANES;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::kernels::tests::lcg;

    /// The definition, written as plainly as possible.
    fn depthwise_reference(d: &Depthwise, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..d.batch {
            for c in 0..d.channels {
                for y in 0..d.out_height {
                    for xo in 0..d.out_width {
                        let mut acc = bias[c];
                        for i in 0..d.kernel {
                            for j in 0..d.kernel {
                                let yi = (y * d.stride + i) as isize - d.pad_top as isize;
                                let xi = (xo * d.stride + j) as isize - d.pad_left as isize;
                                if yi < 0
                                    || xi < 0
                                    || yi >= d.height as isize
                                    || xi >= d.width as isize
                                {
                                    continue;
                                }
                                let v = x[((b * d.channels + c) * d.height + yi as usize)
                                    * d.width
                                    + xi as usize];
                                acc += w[(c * d.kernel + i) * d.kernel + j] * v;
                            }
                        }
                        out.push(acc);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn depthwise_matches_the_definition_for_every_stride_kernel_and_padding() {
        // Widths past 8 outputs reach several runs per row and a partial last one.
        for (h, w, kernel, stride, top, left) in [
            (9, 7, 3, 1, 1, 1),
            (9, 7, 3, 2, 0, 0),
            (10, 11, 5, 2, 1, 2),
            (7, 7, 5, 1, 2, 2),
            (5, 6, 3, 3, 1, 0),
            (9, 37, 5, 2, 1, 2),
            (20, 20, 3, 1, 1, 1),
            (3, 45, 3, 1, 1, 1),
            (20, 37, 3, 2, 0, 1),
        ] {
            let oh = (h + stride - 1) / stride;
            let ow = (w + stride - 1) / stride;
            let d = Depthwise {
                batch: 2,
                channels: 3,
                height: h,
                width: w,
                kernel,
                stride,
                pad_top: top,
                pad_left: left,
                out_height: oh,
                out_width: ow,
            };
            let x = lcg(2 * 3 * h * w, 1);
            let wt = lcg(3 * kernel * kernel, 2);
            let bias = lcg(3, 3);
            let epi = Epilogue {
                bias: &bias,
                relu6: false,
                residual: None,
            };
            let want = depthwise_reference(&d, &x, &wt, &bias);
            // The plain sums everywhere; the AVX2 ones where this CPU has them. The output
            // starts as NaN, so an element the kernel failed to write cannot pass.
            let run = |epi: Epilogue<'_>, avx2: bool| {
                let mut out = vec![Uninit::new(f32::NAN); want.len()];
                depthwise_into(d, &x, &wt, epi, avx2, &mut out);
                // SAFETY: every element was initialised (to NaN) before the call.
                out.iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<f32>>()
            };
            for avx2 in [false, has_avx2()] {
                let got = run(epi, avx2);
                let clamped = run(Epilogue { relu6: true, ..epi }, avx2);
                for (g, e) in clamped.iter().zip(&want) {
                    assert!(
                        (g - e.clamp(0.0, 6.0)).abs() < 1e-5,
                        "{d:?} avx2 {avx2} relu6: {g} vs {e}"
                    );
                }
                assert_eq!(got.len(), want.len());
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() < 1e-5, "{d:?} avx2 {avx2}: {g} vs {e}");
                }
            }
            assert_eq!(depthwise(d, &x, &wt, epi).len(), want.len());
        }
    }
}
