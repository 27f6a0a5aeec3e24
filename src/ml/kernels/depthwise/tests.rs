//! The depthwise kernel against its definition, plain and AVX2.

use super::*;
use crate::ml::kernels::Order;
use crate::ml::kernels::tests::lcg;

/// The definition, written as plainly as possible, for planes in either order.
fn depthwise_reference(d: &Depthwise, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let (oh, ow) = (d.out_height, d.out_width);
    let mut out = vec![0.0; d.batch * d.channels * oh * ow];
    for b in 0..d.batch {
        for c in 0..d.channels {
            let plane = match d.order {
                Order::Images => b * d.channels + c,
                Order::Channels => c * d.batch + b,
            };
            for y in 0..oh {
                for xo in 0..ow {
                    let mut acc = bias[c];
                    for i in 0..d.kernel {
                        for j in 0..d.kernel {
                            let yi = (y * d.stride + i) as isize - d.pad_top as isize;
                            let xi = (xo * d.stride + j) as isize - d.pad_left as isize;
                            if yi < 0 || xi < 0 || yi >= d.height as isize || xi >= d.width as isize
                            {
                                continue;
                            }
                            let v = x[(plane * d.height + yi as usize) * d.width + xi as usize];
                            acc += w[(c * d.kernel + i) * d.kernel + j] * v;
                        }
                    }
                    out[(plane * oh + y) * ow + xo] = acc;
                }
            }
        }
    }
    out
}

#[test]
fn depthwise_matches_the_definition_for_every_stride_kernel_padding_and_order() {
    // Widths past 8 outputs reach several runs per row and a partial last one.
    for geometry in [
        (9, 7, 3, 1, 1, 1),
        (9, 7, 3, 2, 0, 0),
        (10, 11, 5, 2, 1, 2),
        (7, 7, 5, 1, 2, 2),
        (5, 6, 3, 3, 1, 0),
        (9, 37, 5, 2, 1, 2),
        (20, 20, 3, 1, 1, 1),
        (3, 45, 3, 1, 1, 1),
        (20, 37, 3, 2, 0, 1),
        // Rows of 1, 2 and exactly 8 outputs: a narrow last run stored whole spills over
        // several later rows, and at the plane's end it must not.
        (5, 1, 3, 1, 1, 1),
        (6, 2, 3, 1, 1, 1),
        (5, 3, 3, 2, 1, 1),
        (4, 8, 3, 1, 1, 1),
    ]
    .into_iter()
    .flat_map(|g| [(g, Order::Images), (g, Order::Channels)])
    {
        let ((h, w, kernel, stride, top, left), order) = geometry;
        let oh = (h + stride - 1) / stride;
        let ow = (w + stride - 1) / stride;
        let d = Depthwise {
            batch: 2,
            channels: 3,
            order,
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
        // starts as NaN, so an element the kernel failed to write cannot pass, and so do
        // the elements past its end, which a store past the last plane would change.
        let run = |epi: Epilogue<'_>, avx2: bool| {
            let mut out = vec![Uninit::new(f32::NAN); want.len() + 2 * LANES];
            depthwise_into(d, &x, &wt, epi, avx2, &mut out[..want.len()]);
            // SAFETY: every element was initialised (to NaN) before the call.
            let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert!(
                out[want.len()..].iter().all(|v| v.is_nan()),
                "{d:?} avx2 {avx2}: written past the output"
            );
            out[..want.len()].to_vec()
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
