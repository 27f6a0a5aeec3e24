//! The padded scratch an input plane is copied into before a depthwise conv reads it: the
//! forward kernel (`depthwise`) and the weight gradient (`backward`) both read through it, so
//! that every tap reads contiguous, in-bounds inputs.

use super::Depthwise;
#[cfg(target_arch = "x86_64")]
use super::has_avx2;

thread_local! {
    /// Each thread's padded copy of the plane it works on, kept between planes and calls.
    pub(super) static SCRATCH: std::cell::RefCell<Vec<f32>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

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
