//! A conv's bias add and its ReLU6 as one differentiable op, for fine-tuning on flex.
//!
//! As burn ops they are three passes over the activations forward (add, two comparisons in
//! the clamp) and five backward (the clamp's two masks and two fills, the bias's sum). Here
//! the forward pass is one, and each gradient one pass reading the output's gradient and the
//! output itself, which says where the clamp let the gradient through (`0 < y < 6`). A backend
//! extension on flex and on autodiff over flex, like `depthwise_grad`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::prelude::*;
use burn_flex::FlexTensor;

use super::depthwise_grad::{dims, flex};

/// `clamp(x + bias[c], 0, 6)` for `x` `[b, c, h, w]` and `bias` `[c]`; differentiable on
/// autodiff over flex.
#[backend_extension(Flex, Autodiff)]
pub trait BiasRelu6Ops: Backend {
    fn bias_relu6(x: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The input's gradient, given the output `y` and its gradient.
    fn bias_relu6_grad_x(grad: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The bias's gradient, given the output `y` and its gradient.
    fn bias_relu6_grad_bias(grad: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Whether the clamp let the gradient through at output `y`.
fn passes(y: f32) -> bool {
    y > 0.0 && y < 6.0
}

/// `Σ g` where the clamp let it through, in eight partial sums (one vector register), which a
/// plain running sum would not be vectorised into.
fn passed_sum(g: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (gc, yc) = (g.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = gc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(g, y)| if passes(*y) { *g } else { 0.0 })
        .sum();
    for (g, y) in gc.zip(yc) {
        for l in 0..8 {
            acc[l] += if passes(y[l]) { g[l] } else { 0.0 };
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl BiasRelu6Ops for Flex {
    fn bias_relu6(x: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (x, bias) = (x.to_contiguous(), bias.to_contiguous());
        let [b, c, h, w] = dims(&x);
        let (xs, bs): (&[f32], &[f32]) = (x.storage(), bias.storage());
        assert_eq!(bs.len(), c, "one bias per channel");
        let mut out = vec![0f32; b * c * h * w];
        super::lanes::each_chunk(&mut out, h * w, |p, plane| {
            let bias = bs[p % c];
            let src = &xs[p * h * w..][..h * w];
            for (o, v) in plane.iter_mut().zip(src) {
                *o = (v + bias).clamp(0.0, 6.0);
            }
        });
        flex(out, [b, c, h, w])
    }

    fn bias_relu6_grad_x(grad: FlexTensor, y: FlexTensor) -> FlexTensor {
        let (grad, y) = (grad.to_contiguous(), y.to_contiguous());
        let shape = dims(&y);
        let (gs, ys): (&[f32], &[f32]) = (grad.storage(), y.storage());
        let mut out = vec![0f32; ys.len()];
        super::lanes::each_chunk(&mut out, shape[2] * shape[3], |p, plane| {
            let at = p * plane.len();
            let (g, y) = (&gs[at..][..plane.len()], &ys[at..][..plane.len()]);
            for ((o, g), y) in plane.iter_mut().zip(g).zip(y) {
                *o = if passes(*y) { *g } else { 0.0 };
            }
        });
        flex(out, shape)
    }

    fn bias_relu6_grad_bias(grad: FlexTensor, y: FlexTensor) -> FlexTensor {
        let (grad, y) = (grad.to_contiguous(), y.to_contiguous());
        let [b, c, h, w] = dims(&y);
        let (gs, ys): (&[f32], &[f32]) = (grad.storage(), y.storage());
        let mut out = vec![0f32; c];
        // One task per channel: its sum runs over every image.
        super::lanes::each_chunk(&mut out, 1, |ch, sum| {
            sum[0] = (0..b)
                .map(|i| {
                    let at = (i * c + ch) * h * w;
                    passed_sum(&gs[at..][..h * w], &ys[at..][..h * w])
                })
                .sum();
        });
        flex(out, [c])
    }
}

impl<B: Backend + BiasRelu6Ops, C: CheckpointStrategy> BiasRelu6Ops for Autodiff<B, C> {
    fn bias_relu6(x: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct BiasRelu6Backward;

        impl<B: Backend + BiasRelu6Ops> Backward<B, 2> for BiasRelu6Backward {
            /// The output.
            type State = B::FloatTensorPrimitive;

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let y = ops.state;
                let y_for_bias = y.clone();
                binary::<B, _, _>(
                    ops.parents,
                    ops.node,
                    grads,
                    |grad| B::bias_relu6_grad_x(grad, y),
                    |grad| B::bias_relu6_grad_bias(grad, y_for_bias),
                );
            }
        }

        let nodes = [x.node(), bias.node()];
        let out = B::bias_relu6(x.into_primitive(), bias.into_primitive());
        match BiasRelu6Backward
            .prepare::<C>(nodes)
            // Marked compute-bound so that the output is kept rather than recomputed, which a
            // memory-bound op would need a retro-forward for (this one has none).
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(out.clone(), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn bias_relu6_grad_x(_: FloatTensor<Self>, _: FloatTensor<Self>) -> FloatTensor<Self> {
        // The backward pass calls these on the inner backend; a second-order gradient of this
        // op would land here, and nothing in transferd takes one.
        unreachable!("called by the backward pass on the inner backend only")
    }

    fn bias_relu6_grad_bias(_: FloatTensor<Self>, _: FloatTensor<Self>) -> FloatTensor<Self> {
        unreachable!("called by the backward pass on the inner backend only")
    }
}

/// `clamp(x + bias[c], 0, 6)` through [`BiasRelu6Ops`]: `x` `[b, c, h, w]`, `bias` `[c]`.
pub fn bias_relu6(x: Tensor<4>, bias: Tensor<1>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as BiasRelu6Ops>::bias_relu6(
        x.into_dispatch(),
        bias.into_dispatch(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::activation::relu6;

    /// Output and both gradients against burn's own add and clamp, with values on both sides
    /// of 0 and 6.
    #[test]
    fn matches_burns_add_and_clamp() {
        let ad = Device::flex().autodiff();
        let x =
            Tensor::<4>::random([3, 5, 4, 7], Distribution::Normal(2.0, 4.0), &ad).require_grad();
        let bias = Tensor::<1>::random([5], Distribution::Normal(0.0, 2.0), &ad).require_grad();
        let ours = bias_relu6(x.clone(), bias.clone());
        let reference = relu6(x.clone() + bias.clone().reshape([1, 5, 1, 1]));
        let weights = Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &ad);
        let (go, gr) = (
            (ours.clone() * weights.clone()).sum().backward(),
            (reference.clone() * weights).sum().backward(),
        );
        let diff = |a: Tensor<4>, b: Tensor<4>| (a - b).abs().max().into_scalar::<f32>();
        assert!(diff(ours.clone(), reference.clone()) < 1e-6, "output");
        let clamped = ours
            .clone()
            .equal_elem(0.0)
            .int()
            .sum()
            .into_scalar::<i64>();
        let capped = ours.equal_elem(6.0).int().sum().into_scalar::<i64>();
        assert!(
            clamped > 0 && capped > 0,
            "both ends of the clamp are reached"
        );
        assert!(
            diff(x.grad(&go).unwrap(), x.grad(&gr).unwrap()) < 1e-6,
            "input gradient"
        );
        let gb = (bias.grad(&go).unwrap() - bias.grad(&gr).unwrap())
            .abs()
            .max();
        assert!(gb.into_scalar::<f32>() < 1e-4, "bias gradient");
    }
}
