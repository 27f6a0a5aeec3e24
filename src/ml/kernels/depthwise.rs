//! The depthwise k×k kernel with its bias and ReLU6 (see the parent module for why it is
//! written out rather than left to burn-flex): each plane is copied into its padded scratch
//! (`padded`), then summed over the taps in registers.

use std::mem::MaybeUninit;

use super::padded::{LANES, Layout, SCRATCH, Scratch, fill, tap_offset};
use super::{Depthwise, Epilogue, has_avx2};

/// An output element not written yet.
type Uninit = MaybeUninit<f32>;

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
    // The AVX2 sums compute their reads with `tap_offset`; the bound on `offsets` (`reach`)
    // covers them only while the two agree.
    let (k, pad) = (d.kernel, &layout.padding);
    for (t, &o) in layout.offsets.iter().enumerate() {
        assert_eq!(
            o,
            tap_offset(t / k, t % k, d.stride, pad.rows, pad.phase_width),
            "tap offsets"
        );
    }
    // Each plane's task writes every element of its plane (`sum_rows` and `sum_rows_avx2`
    // write each output of each row), and the planes cover `out`.
    crate::ml::lanes::each_chunk(out, plane_out, |plane, dst| {
        let c = d.channel(plane);
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
    scratch: &mut Scratch, avx2: bool,
));

/// One plane: copied into `scratch` as [`Layout`] says, then every run of [`LANES`] outputs
/// of a row summed over all taps in registers and stored ([`sum_rows`]).
#[inline(always)]
fn depthwise_plane_body(
    layout: &Layout,
    src: &[f32],
    taps: &[f32],
    bias: f32,
    relu6: bool,
    dst: &mut [Uninit],
    scratch: &mut Scratch,
    avx2: bool,
) {
    let scratch = fill(layout, src, scratch, avx2);
    let d = layout.d;
    let plan = Rows {
        offsets: &layout.offsets,
        taps,
        bias,
        relu6,
        row_step: d.stride * layout.padding.phase_width,
        width: d.out_width,
        rows: layout.padding.rows,
        phase_width: layout.padding.phase_width,
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
        match (d.kernel, d.stride) {
            (3, 1) => return unsafe { sum_rows_avx2::<3, 9, 1>(&plan, scratch, dst) },
            (3, 2) => return unsafe { sum_rows_avx2::<3, 9, 2>(&plan, scratch, dst) },
            (5, 1) => return unsafe { sum_rows_avx2::<5, 25, 1>(&plan, scratch, dst) },
            (5, 2) => return unsafe { sum_rows_avx2::<5, 25, 2>(&plan, scratch, dst) },
            _ => {}
        }
    }
    sum_rows(&plan, scratch, dst);
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
    /// The scratch's padded rows and their width, per phase ([`tap_offset`]).
    rows: usize,
    phase_width: usize,
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

/// [`sum_rows`] in AVX2 registers for a `K` × `K` kernel (`KK` taps), written out because the
/// compiler's vectoriser does not keep these sums in registers on its own. The taps are
/// broadcast once per plane and unrolled; up to four independent sums per run take turns over
/// a kernel row's taps, so that each FMA need not wait for the previous one's result; bias and
/// ReLU6 are applied in registers and each run is stored straight into the output (see below
/// for a row's narrow last run).
///
/// # Safety
/// The CPU has AVX2 and FMA, `plan` has `KK` taps of a stride-`S` layout, and `scratch`
/// holds every read (see the caller's assert).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_rows_avx2<const K: usize, const KK: usize, const S: usize>(
    plan: &Rows<'_>,
    scratch: &[f32],
    dst: &mut [Uninit],
) {
    use std::arch::x86_64::*;
    assert_eq!(K * K, KK, "a k × k kernel");
    assert_eq!(plan.offsets.len(), KK, "KK taps");
    assert_eq!(plan.row_step, S * plan.phase_width, "a stride-S layout");
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
    let rows = dst.len() / plan.width.max(1);
    for y in 0..rows {
        let row0 = y * plan.width;
        // SAFETY: in bounds by the caller's assert on the furthest read.
        let base = unsafe { scratch.as_ptr().add(y * plan.row_step) };
        let mut x0 = 0;
        while x0 < plan.width {
            // SAFETY: as above.
            let at = unsafe { base.add(x0) };
            let mut acc = [bias, zero, zero, zero];
            // Tap (i, j) reads at `tap_offset` (what `offsets` holds) from `at`: with `i`,
            // `j` and `S` constant that is a phase's and row's pointer plus a constant, where
            // the offsets table, which with 25 taps does not fit in registers, costs a load
            // per tap. The sums take turns by column, so that they stay in registers whether
            // or not the rows unroll.
            for i in 0..K {
                for j in 0..K {
                    let offset = tap_offset(i, j, S, plan.rows, plan.phase_width);
                    // SAFETY: as above (`offsets` holds these, and the caller's bound covers
                    // them).
                    let x = unsafe { _mm256_loadu_ps(at.add(offset)) };
                    acc[j % 4] = _mm256_fmadd_ps(taps[i * K + j], x, acc[j % 4]);
                }
            }
            let mut sum =
                _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            if plan.relu6 {
                sum = _mm256_min_ps(_mm256_max_ps(sum, zero), six);
            }
            // A row's last run may be narrower than a vector (a 7 × 7 plane's always is). It
            // is stored whole anyway while the plane has room: what spills into the following
            // rows (several, for rows under 4 wide) is overwritten when they are written,
            // since rows go in order. Runs that would reach past the plane, which borders
            // another task's, are stored element by element.
            let at = row0 + x0;
            if at + LANES <= dst.len() {
                // SAFETY: outputs at..at + 8 of this plane exist (written, never read).
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(at).cast::<f32>(), sum) };
            } else {
                let mut run = [0f32; LANES];
                // SAFETY: `run` holds 8 floats.
                unsafe { _mm256_storeu_ps(run.as_mut_ptr(), sum) };
                for (o, v) in dst[at..row0 + plan.width].iter_mut().zip(run) {
                    o.write(v);
                }
            }
            x0 += LANES;
        }
    }
}

#[cfg(test)]
mod tests;
