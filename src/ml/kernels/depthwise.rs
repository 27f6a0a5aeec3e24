//! The depthwise k×k kernel with its bias and ReLU6 (see the parent module for why it is
//! written out rather than left to burn-flex).

use super::{Depthwise, Epilogue};

thread_local! {
    /// Each thread's padded copy of the plane it works on, kept between planes and calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest depthwise kernel side the kernel takes (EfficientNet uses 3 and 5).
const MAX_KERNEL: usize = 11;

/// `out[b, c, y, x] = epilogue(Σ_{i,j} w[c, i, j] · x[b, c, y·s + i − top, x·s + j − left])`
/// with zeros outside the image; one task per (image, channel) plane.
pub fn depthwise(shape: Depthwise, x: &[f32], weight: &[f32], epi: Epilogue<'_>) -> Vec<f32> {
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
    assert_eq!(epi.bias.len(), d.channels, "depthwise bias size");
    assert!(
        epi.residual.is_none(),
        "no residual after a depthwise conv in MBConv"
    );
    let mut out = vec![0f32; d.batch * d.channels * plane_out];
    crate::ml::lanes::each_chunk(&mut out, plane_out, |plane, dst| {
        let c = plane % d.channels;
        let src = &x[plane * plane_in..][..plane_in];
        let taps = &weight[c * d.kernel * d.kernel..][..d.kernel * d.kernel];
        SCRATCH.with_borrow_mut(|scratch| {
            depthwise_plane(&d, src, taps, epi.bias[c], epi.relu6, dst, scratch)
        });
    });
    out
}

versions!(fn depthwise_plane => depthwise_plane_body(
    d: &Depthwise, src: &[f32], taps: &[f32], bias: f32, relu6: bool, dst: &mut [f32],
    scratch: &mut Vec<f32>,
));

/// One plane. The input is first copied into `scratch` with its zero padding and, for stride
/// `s > 1`, regrouped by `column mod s`, so that the columns one tap reads for consecutive
/// outputs are consecutive and always in bounds. Each run of `N` outputs of a row is then
/// summed over every tap in registers and stored once.
#[inline(always)]
fn depthwise_plane_body(
    d: &Depthwise,
    src: &[f32],
    taps: &[f32],
    bias: f32,
    relu6: bool,
    dst: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    if d.out_width > 8 {
        plane_in_runs::<16>(d, src, taps, bias, relu6, dst, scratch)
    } else {
        plane_in_runs::<8>(d, src, taps, bias, relu6, dst, scratch)
    }
}

#[inline(always)]
fn plane_in_runs<const N: usize>(
    d: &Depthwise,
    src: &[f32],
    taps: &[f32],
    bias: f32,
    relu6: bool,
    dst: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (s, k, w) = (d.stride, d.kernel, d.width);
    let runs = d.out_width.div_ceil(N);
    // Padded rows the outputs read, and the width of one phase's padded row: enough for the
    // last run's reads, past the image's right edge if need be.
    let rows = (d.out_height - 1) * s + k;
    let phase_width = runs * N + (k - 1) / s;
    // Every element of the scratch is overwritten below: zeros where the padding is, the
    // image elsewhere (so it is not cleared first, which would be one more pass; only a
    // scratch that grows gets its new part zeroed by `resize`).
    scratch.resize(s * rows * phase_width, 0.0);
    for r in 0..rows {
        let row = r
            .checked_sub(d.pad_top)
            .filter(|&y| y < d.height)
            .map(|y| &src[y * w..][..w]);
        for p in 0..s {
            let out = &mut scratch[(p * rows + r) * phase_width..][..phase_width];
            // Padded column c · s + p holds image column c · s + p − left: the first c with a
            // column in the image, then every s-th column from there.
            let first = d.pad_left.saturating_sub(p).div_ceil(s).min(phase_width);
            let x0 = (first * s + p).checked_sub(d.pad_left).filter(|&x| x < w);
            let (Some(row), Some(x0)) = (row, x0) else {
                out.fill(0.0);
                continue;
            };
            let n = (w - x0).div_ceil(s).min(phase_width - first);
            out[..first].fill(0.0);
            let (image, right) = out[first..].split_at_mut(n);
            if s == 1 {
                image.copy_from_slice(&row[x0..x0 + n]);
            } else {
                image
                    .iter_mut()
                    .zip(row[x0..].iter().step_by(s))
                    .for_each(|(o, v)| *o = *v);
            }
            right.fill(0.0);
        }
    }
    // Where tap column j starts in the scratch, relative to a row of phase j mod s.
    let mut column = [0usize; MAX_KERNEL];
    assert!(k <= MAX_KERNEL, "depthwise kernel up to {MAX_KERNEL}");
    for (j, c) in column.iter_mut().enumerate().take(k) {
        *c = (j % s) * rows * phase_width + j / s;
    }
    let ow = d.out_width;
    let avx2 = has_avx2();
    let mut from = [0usize; MAX_KERNEL * MAX_KERNEL];
    let from = &mut from[..k * k];
    for (y, out_row) in dst.chunks_exact_mut(ow).enumerate() {
        for (i, row) in from.chunks_exact_mut(k).enumerate() {
            let start = (y * s + i) * phase_width;
            for (f, c) in row.iter_mut().zip(&column) {
                *f = c + start;
            }
        }
        let reach = from.iter().copied().max().unwrap_or(0);
        let mut run = [0f32; N];
        for r in 0..runs {
            sum_taps::<N>(avx2, scratch, from, reach, taps, r * N, bias, &mut run);
            if relu6 {
                run.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
            }
            let x0 = r * N;
            let n = N.min(ow - x0);
            out_row[x0..x0 + n].copy_from_slice(&run[..n]);
        }
    }
}

/// `out[l] = bias + Σ_t taps[t] · scratch[from[t] + at + l]` for `l < N`; `reach` is the
/// largest of `from`; `avx2` says whether this CPU has AVX2 and FMA ([`has_avx2`]).
#[inline(always)]
fn sum_taps<const N: usize>(
    avx2: bool,
    scratch: &[f32],
    from: &[usize],
    reach: usize,
    taps: &[f32],
    at: usize,
    bias: f32,
    out: &mut [f32; N],
) {
    assert!(
        reach + at + N <= scratch.len(),
        "depthwise scratch holds every read"
    );
    #[cfg(target_arch = "x86_64")]
    if N % 8 == 0 && avx2 {
        // SAFETY: the CPU has AVX2 and FMA, and every read is in bounds (asserted above).
        unsafe { sum_taps_avx2(scratch, from, taps, at, bias, out) };
        return;
    }
    out.fill(bias);
    for (&f, &tap) in from.iter().zip(taps) {
        let input = &scratch[f + at..][..N];
        for (o, v) in out.iter_mut().zip(input) {
            *o += tap * v;
        }
    }
}

/// Whether the hand-written AVX2 + FMA sums can run here (false off x86-64).
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

/// [`sum_taps`] in AVX2 registers, written out because the compiler's vectoriser does not
/// keep these sums in registers on its own. Four independent sums per vector of outputs take
/// turns over the taps, so that each FMA need not wait for the previous one's result.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_taps_avx2<const N: usize>(
    scratch: &[f32],
    from: &[usize],
    taps: &[f32],
    at: usize,
    bias: f32,
    out: &mut [f32; N],
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller checked every read against the scratch length.
    unsafe {
        let base = scratch.as_ptr().add(at);
        for v in (0..N).step_by(8) {
            let mut acc = [_mm256_setzero_ps(); 4];
            acc[0] = _mm256_set1_ps(bias);
            let mut t = 0;
            while t + 4 <= from.len() {
                for (u, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(base.add(from[t + u] + v));
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(taps[t + u]), x, *a);
                }
                t += 4;
            }
            while t < from.len() {
                let x = _mm256_loadu_ps(base.add(from[t] + v));
                acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(taps[t]), x, acc[0]);
                t += 1;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            _mm256_storeu_ps(out.as_mut_ptr().add(v), sum);
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
        // Widths past 8 and 16 outputs reach the 16-wide sums and a partial last run.
        for (h, w, kernel, stride, top, left) in [
            (9, 7, 3, 1, 1, 1),
            (9, 7, 3, 2, 0, 0),
            (10, 11, 5, 2, 1, 2),
            (7, 7, 5, 1, 2, 2),
            (5, 6, 3, 3, 1, 0),
            (9, 37, 5, 2, 1, 2),
            (20, 20, 3, 1, 1, 1),
            (3, 45, 3, 1, 1, 1),
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
            let got = depthwise(d, &x, &wt, epi);
            let want = depthwise_reference(&d, &x, &wt, &bias);
            let clamped = depthwise(d, &x, &wt, Epilogue { relu6: true, ..epi });
            for (g, e) in clamped.iter().zip(&want) {
                assert!(
                    (g - e.clamp(0.0, 6.0)).abs() < 1e-5,
                    "{d:?} relu6: {g} vs {e}"
                );
            }
            assert_eq!(got.len(), want.len());
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5, "{d:?}: {g} vs {e}");
            }
        }
    }
}
