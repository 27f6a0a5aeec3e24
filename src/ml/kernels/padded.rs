//! The padded scratch an input plane is copied into before a depthwise conv reads it: the
//! forward kernel (`depthwise`) and the weight gradient (`backward`) both read through it, so
//! that every tap reads contiguous, in-bounds inputs.

use super::Depthwise;
#[cfg(target_arch = "x86_64")]
use super::has_avx2;

thread_local! {
    /// Each thread's padded copy of the plane it works on, kept between planes and calls.
    pub(super) static SCRATCH: std::cell::RefCell<Scratch> =
        const { std::cell::RefCell::new(Scratch { data: Vec::new(), zeros_of: None }) };
}

/// A padded plane and which layout's padding it holds.
pub(super) struct Scratch {
    data: Vec<f32>,
    /// The layout whose zero padding `data` holds. Every plane of one layout has its image in
    /// the same places, so once the padding is zero a fill only copies the image: for a 7 × 7
    /// plane the zeros were most of the writes, made by many short `memset` calls.
    zeros_of: Option<Padding>,
}

/// Where a layout puts the image in the scratch (everything else is padding): what decides
/// whether a scratch's zeros can be kept for the next plane.
#[derive(Clone, PartialEq)]
pub(super) struct Padding {
    /// Padded rows the outputs read.
    pub(super) rows: usize,
    /// Width of one phase's padded row: enough for the last run's reads, past the image's
    /// right edge if need be.
    pub(super) phase_width: usize,
    /// Padded row r holds image row r − `pad_top`, for the image's `height` rows.
    pad_top: usize,
    height: usize,
    /// Per phase p (one per stride step): its first padded column c that holds an image
    /// column (c · s + p − left), that image column (none if the phase holds none), and how
    /// many it holds, every s-th image column from that one on.
    phases: Vec<(usize, Option<usize>, usize)>,
}

impl Padding {
    /// Scratch elements: a phase per stride step, of `rows` rows of `phase_width`.
    fn len(&self) -> usize {
        self.phases.len() * self.rows * self.phase_width
    }
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
    /// A row of outputs rounded up to whole vectors of [`LANES`]: what each row's last run
    /// reads and computes.
    pub(super) width: usize,
    /// Where the image and the padding lie in the scratch.
    pub(super) padding: Padding,
    /// Per tap (i, j), where it reads for output (0, 0) ([`tap_offset`]).
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
            .map(|t| tap_offset(t / k, t % k, s, rows, phase_width))
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
            width,
            padding: Padding {
                rows,
                phase_width,
                pad_top: d.pad_top,
                height: d.height,
                phases,
            },
            offsets,
            reach,
        }
    }
}

/// Where tap (i, j) of a stride-`s` kernel reads for output (0, 0) in a scratch of `rows`
/// padded rows of `phase_width` per phase: phase j mod s, row i, column j / s. The one
/// statement of it: `Layout::offsets` is built from it, and the AVX2 depthwise sums, which
/// address their reads from each phase's and row's pointer, call it with constant `i`, `j`
/// and `s`.
#[inline(always)]
pub(super) fn tap_offset(i: usize, j: usize, s: usize, rows: usize, phase_width: usize) -> usize {
    ((j % s) * rows + i) * phase_width + j / s
}

/// Copies one input plane into `scratch` as `layout` says (AVX2 shuffles for stride 2 if
/// `avx2` and the CPU has them), and returns the padded plane.
#[inline(always)]
pub(super) fn fill<'a>(
    layout: &Layout,
    src: &[f32],
    scratch: &'a mut Scratch,
    avx2: bool,
) -> &'a [f32] {
    let (d, padding) = (layout.d, &layout.padding);
    let (s, w, rows, phase_width) = (d.stride, d.width, padding.rows, padding.phase_width);
    let len = padding.len();
    if scratch.zeros_of.as_ref() != Some(padding) {
        // A layout this thread has not padded yet: zeros everywhere once; from here on only
        // the image's places are written, and the padding stays zero.
        scratch.data.clear();
        scratch.data.resize(len, 0.0);
        scratch.zeros_of = Some(padding.clone());
    }
    let data = &mut scratch.data[..len];
    for (p, &(first, x0, n)) in padding.phases.iter().enumerate() {
        let Some(x0) = x0 else { continue };
        let phase = &mut data[p * rows * phase_width..][..rows * phase_width];
        // Padded row r holds image row r − top, where there is one.
        for (r, out) in phase
            .chunks_exact_mut(phase_width)
            .enumerate()
            .skip(d.pad_top)
            .take(d.height)
        {
            let row = &src[(r - d.pad_top) * w..][..w];
            if s == 1 {
                copy_row(&mut out[first..], &row[x0..x0 + n], avx2);
                continue;
            }
            let image = &mut out[first..first + n];
            if s == 2 {
                every_other(image, &row[x0..], avx2);
            } else {
                image
                    .iter_mut()
                    .zip(row[x0..].iter().step_by(s))
                    .for_each(|(o, v)| *o = *v);
            }
        }
    }
    &scratch.data[..len]
}

/// `dst[..src.len()] = src`, leaving the rest of `dst` zero (it is padding, which it already
/// is), in whole vectors (AVX2 if `avx2` and the CPU has it): a `memcpy` call costs more
/// than the copy itself for the short rows of the late layers (7 and 14 floats). A last partial vector is read masked (its
/// lanes past the row read as zero) and stored whole when `dst` has room, since a masked
/// store is slow on AMD's cores.
#[inline(always)]
fn copy_row(dst: &mut [f32], src: &[f32], avx2: bool) {
    assert!(dst.len() >= src.len(), "the row fits its padded row");
    #[cfg(target_arch = "x86_64")]
    if avx2 && has_avx2() {
        // SAFETY: the CPU has AVX2, and `dst` holds `src`.
        return unsafe { copy_row_avx2(dst, src) };
    }
    dst[..src.len()].copy_from_slice(src);
}

/// [`copy_row`] in AVX2.
///
/// # Safety
/// The CPU has AVX2, and `dst` is at least as long as `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_row_avx2(dst: &mut [f32], src: &[f32]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
    let mut i = 0;
    while i + LANES <= n {
        // SAFETY: elements i..i + 8 of both are in bounds.
        unsafe { _mm256_storeu_ps(d.add(i), _mm256_loadu_ps(s.add(i))) };
        i += LANES;
    }
    if i < n {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((n - i) as i32), lane);
        // SAFETY: the mask keeps elements i..n of `src`, in bounds; the others read as zero.
        let v = unsafe { _mm256_maskload_ps(s.add(i), mask) };
        if i + LANES <= dst.len() {
            // SAFETY: elements i..i + 8 of `dst` are in bounds; those past n get zeros.
            unsafe { _mm256_storeu_ps(d.add(i), v) };
        } else {
            // SAFETY: the mask keeps elements i..n, in bounds.
            unsafe { _mm256_maskstore_ps(d.add(i), mask, v) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::kernels::tests::lcg;

    /// The padded layout by its definition: phase p, row r, column c holds image row r − top,
    /// column c · s + p − left, or zero where that is outside the image.
    fn padded(layout: &Layout, src: &[f32]) -> Vec<f32> {
        let (d, s) = (layout.d, layout.d.stride);
        let mut out = Vec::new();
        for p in 0..s {
            for r in 0..layout.padding.rows {
                for c in 0..layout.padding.phase_width {
                    let y = r.checked_sub(d.pad_top).filter(|&y| y < d.height);
                    let x = (c * s + p).checked_sub(d.pad_left).filter(|&x| x < d.width);
                    out.push(y.zip(x).map_or(0.0, |(y, x)| src[y * d.width + x]));
                }
            }
        }
        out
    }

    /// One scratch through planes of several layouts in turn, each with new values: every
    /// fill is the padded plane, with zeros wherever an earlier plane or layout left
    /// something (the scratch starts as NaN, so padding never written fails). Consecutive
    /// layouts of the same size that put the image elsewhere (another top or left padding)
    /// check that the scratch's key tells them apart; the plain copy runs first, since the
    /// AVX2 one rewrites a row's right padding anyway. The layout without padding reaches the
    /// AVX2 copy's masked store (a row's padded row has no room for a whole last vector).
    #[test]
    fn a_fill_after_other_planes_and_layouts_is_the_padded_plane() {
        let mut scratch = Scratch {
            data: vec![f32::NAN; 4096],
            zeros_of: None,
        };
        // (height, width, kernel, stride, [top, bottom, left, right])
        let geometries = [
            (7, 7, 5, 1, [2, 2, 2, 2]),
            (14, 14, 3, 1, [1, 1, 1, 1]),
            (7, 7, 5, 1, [2, 2, 2, 2]),
            (7, 7, 3, 1, [0, 2, 1, 1]),
            (7, 7, 3, 1, [1, 1, 1, 1]),
            (7, 7, 3, 1, [1, 1, 0, 2]),
            (8, 9, 3, 2, [0, 1, 0, 1]),
            (8, 9, 3, 2, [1, 0, 1, 0]),
            (15, 13, 3, 2, [0, 2, 1, 1]),
            (9, 20, 5, 2, [1, 3, 2, 2]),
            (3, 10, 3, 1, [0, 0, 0, 0]),
            (14, 14, 3, 1, [1, 1, 1, 1]),
        ];
        let mut sizes = Vec::new();
        for (n, &(h, w, kernel, stride, pad)) in geometries.iter().enumerate() {
            let layout = Layout::new(&Depthwise::of([1, 1, h, w], kernel, stride, pad));
            sizes.push(layout.padding.len());
            for plane in 0..2 {
                let src = lcg(h * w, (10 * n + plane) as u64);
                for avx2 in [false, true] {
                    let got = fill(&layout, &src, &mut scratch, avx2).to_vec();
                    assert_eq!(
                        got,
                        padded(&layout, &src),
                        "{h}x{w} k{kernel} s{stride} {pad:?}, plane {plane}, avx2 {avx2}"
                    );
                }
            }
        }
        // The pairs above are the same size, or they would not test the key.
        assert_eq!(sizes[3], sizes[4]);
        assert_eq!(sizes[4], sizes[5]);
        assert_eq!(sizes[6], sizes[7]);
    }
}
