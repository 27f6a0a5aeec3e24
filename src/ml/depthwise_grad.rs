//! A depthwise convolution with its own backward pass, for fine-tuning on flex.
//!
//! burn-flex overrides no conv backward, so burn's generic one runs: for a grouped conv it
//! computes the weight gradient with a slice, a conv and a slice-assign per group (1,152
//! groups in Lite0's last block), and the input gradient through a transposed conv. Here both
//! gradients run over each (image, channel) plane: the weight's through the forward kernel's
//! padded scratch (`kernels::depthwise_weight_grad`), the input's at stride 1 as the forward
//! kernel itself with the filter turned 180° (a direct loop at other strides); the forward
//! pass is the inference kernel of `kernels`. All of them read and write channel-major
//! activations, as `pointwise_grad` does. The operation is a burn backend extension on
//! flex and on autodiff over flex; the bias and ReLU6 after it are `bias_relu6`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::prelude::*;
use burn_flex::FlexTensor;

use super::flex_tensor::{channel_major, dims, flex, floats, from_channel_major};
use super::kernels::{self, Depthwise, Epilogue, Order};

/// `[b, c, h, w]` × `[c, 1, k, k]` with stride `stride` and `padding` (top, bottom, left,
/// right), no bias; differentiable on autodiff over flex.
#[backend_extension(Flex, Autodiff)]
pub trait DepthwiseOps: Backend {
    fn depthwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self>;
    /// Gradient of [`Self::depthwise`] with respect to `x`, given the output's gradient.
    fn depthwise_grad_x(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        x_shape: [usize; 4],
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self>;
    /// Gradient of [`Self::depthwise`] with respect to `weight`.
    fn depthwise_grad_weight(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self>;
}

/// For output column range of tap offset `j`: the outputs `o` whose input column
/// `o · s + j − left` lies in `0..width`.
fn valid(out: usize, s: usize, j: usize, left: usize, width: usize) -> std::ops::Range<usize> {
    let lo = left.saturating_sub(j).div_ceil(s);
    let hi = (width + left).saturating_sub(j).div_ceil(s).min(out);
    lo..hi.max(lo)
}

impl DepthwiseOps for Flex {
    fn depthwise(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: [usize; 4],
    ) -> FlexTensor {
        let d =
            Depthwise::of(dims(&x), dims(&weight)[2], stride, padding).in_order(Order::Channels);
        let (x, weight) = (channel_major(&x), floats(&weight));
        let bias = vec![0.0; d.channels];
        let epi = Epilogue::none(&bias);
        let out = kernels::depthwise(d, x.storage(), weight.storage(), epi);
        from_channel_major(out, [d.batch, d.channels, d.out_height, d.out_width])
    }

    fn depthwise_grad_x(
        grad: FlexTensor,
        weight: FlexTensor,
        x_shape: [usize; 4],
        stride: usize,
        padding: [usize; 4],
    ) -> FlexTensor {
        let (grad, weight) = (channel_major(&grad), floats(&weight));
        let k = dims(&weight)[2];
        let d = Depthwise::of(x_shape, k, stride, padding).in_order(Order::Channels);
        let (g, w): (&[f32], &[f32]) = (grad.storage(), weight.storage());
        let [top, _, left, _] = padding;
        if stride == 1 && top < k && left < k {
            // Each input pixel gathers from the outputs that read it: a stride-1 depthwise conv
            // of the gradient with each filter turned 180°, padded by k − 1 − the forward
            // pass's padding, which the inference kernel runs.
            let flipped: Vec<f32> = w
                .chunks_exact(k * k)
                .flat_map(|taps| taps.iter().rev().copied())
                .collect();
            let back = Depthwise {
                height: d.out_height,
                width: d.out_width,
                pad_top: k - 1 - top,
                pad_left: k - 1 - left,
                out_height: d.height,
                out_width: d.width,
                ..d
            };
            let zeros = vec![0.0; d.channels];
            let epi = Epilogue::none(&zeros);
            return from_channel_major(kernels::depthwise(back, g, &flipped, epi), x_shape);
        }
        let (plane_in, plane_out) = (d.height * d.width, d.out_height * d.out_width);
        let mut out = vec![0f32; d.batch * d.channels * plane_in];
        super::lanes::each_chunk(&mut out, plane_in, |p, gx| {
            let c = d.channel(p);
            let gp = &g[p * plane_out..][..plane_out];
            let taps = &w[c * k * k..][..k * k];
            // Each output pixel hands its gradient back to the k² inputs it read.
            for oy in 0..d.out_height {
                let grow = &gp[oy * d.out_width..][..d.out_width];
                for i in 0..k {
                    let Some(y) = (oy * stride + i)
                        .checked_sub(d.pad_top)
                        .filter(|&y| y < d.height)
                    else {
                        continue;
                    };
                    let row = &mut gx[y * d.width..][..d.width];
                    for j in 0..k {
                        let t = taps[i * k + j];
                        let range = valid(d.out_width, stride, j, d.pad_left, d.width);
                        // No output reads this tap from this row (a plane smaller than the
                        // kernel): nothing to hand back, and `x0` would lie past the row.
                        if range.is_empty() {
                            continue;
                        }
                        let x0 = (range.start * stride + j) - d.pad_left;
                        let dst = row[x0..].iter_mut().step_by(stride);
                        for (o, v) in dst.zip(&grow[range]) {
                            *o += t * v;
                        }
                    }
                }
            }
        });
        from_channel_major(out, x_shape)
    }

    fn depthwise_grad_weight(
        grad: FlexTensor,
        x: FlexTensor,
        kernel: usize,
        stride: usize,
        padding: [usize; 4],
    ) -> FlexTensor {
        let d = Depthwise::of(dims(&x), kernel, stride, padding).in_order(Order::Channels);
        let (grad, x) = (channel_major(&grad), channel_major(&x));
        let out = kernels::depthwise_weight_grad(d, x.storage(), grad.storage());
        flex(out, [d.channels, 1, kernel, kernel])
    }
}

impl<B: Backend + DepthwiseOps, C: CheckpointStrategy> DepthwiseOps for Autodiff<B, C> {
    fn depthwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DepthwiseBackward;

        impl<B: Backend + DepthwiseOps> Backward<B, 2> for DepthwiseBackward {
            type State = (
                B::FloatTensorPrimitive,
                B::FloatTensorPrimitive,
                usize,
                [usize; 4],
            );

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, weight, stride, padding) = ops.state;
                let x_shape = dims(&x);
                let kernel = dims(&weight)[2];
                binary::<B, _, _>(
                    ops.parents,
                    ops.node,
                    grads,
                    |grad| B::depthwise_grad_x(grad, weight, x_shape, stride, padding),
                    |grad| B::depthwise_grad_weight(grad, x, kernel, stride, padding),
                );
            }
        }

        let nodes = [x.node(), weight.node()];
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        let out = B::depthwise(x.clone(), weight.clone(), stride, padding);
        match DepthwiseBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, weight, stride, padding), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn depthwise_grad_x(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: [usize; 4],
        _: usize,
        _: [usize; 4],
    ) -> FloatTensor<Self> {
        // The backward pass calls these on the inner backend; a second-order gradient of this
        // op would land here, and nothing in transferd takes one.
        unreachable!("called by the backward pass on the inner backend only")
    }

    fn depthwise_grad_weight(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: usize,
        _: usize,
        _: [usize; 4],
    ) -> FloatTensor<Self> {
        unreachable!("called by the backward pass on the inner backend only")
    }
}

/// The depthwise conv through [`DepthwiseOps`]: `[b, c, h, w]` × `[c, 1, k, k]`.
pub fn depthwise(x: Tensor<4>, weight: Tensor<4>, stride: usize, padding: [usize; 4]) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as DepthwiseOps>::depthwise(
        x.into_dispatch(),
        weight.into_dispatch(),
        stride,
        padding,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;

    use crate::ml::flex_tensor::parity::assert_conv_matches;

    /// Output, input gradient and weight gradient of this op against burn's generic conv, on
    /// planes down to smaller than the kernel, odd widths, strides 1 and 2, uneven padding.
    #[test]
    fn gradients_match_burns_conv_on_every_geometry() {
        let ad = Device::flex().autodiff();
        for (h, w, k, s, [top, bottom, left, right]) in [
            (7, 7, 3, 1, [1, 1, 1, 1]),
            (9, 11, 5, 2, [1, 2, 2, 2]),
            (2, 2, 5, 2, [1, 2, 1, 2]),
            (1, 1, 5, 1, [2, 2, 2, 2]),
            (5, 3, 3, 2, [0, 1, 0, 1]),
            // Stride 1 (the input gradient as the forward kernel): rows of several vectors,
            // uneven and no padding.
            (13, 19, 5, 1, [2, 2, 2, 2]),
            (6, 10, 3, 1, [0, 2, 2, 0]),
            (6, 9, 3, 1, [0, 0, 0, 0]),
        ] {
            let c = 3;
            let x = Tensor::<4>::random([2, c, h, w], Distribution::Normal(0.0, 1.0), &ad)
                .require_grad();
            let wt = Tensor::<4>::random([c, 1, k, k], Distribution::Normal(0.0, 1.0), &ad)
                .require_grad();
            let padding = [top, bottom, left, right];
            let ours = depthwise(x.clone(), wt.clone(), s, padding);
            let options =
                ConvOptions::new_with_padding([s, s], [(top, bottom), (left, right)], [1, 1], c);
            let reference = conv2d(x.clone(), wt.clone(), None, options);
            assert_eq!(ours.dims(), reference.dims(), "{h}x{w} k{k} s{s}");
            assert_conv_matches(ours, reference, &x, &wt, &format!("{h}x{w} k{k} s{s}"));
        }
    }
}
