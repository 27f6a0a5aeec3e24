//! A pointwise (1×1) convolution with its own backward pass, for fine-tuning on flex.
//!
//! burn's conv backward computes a 1×1 conv's weight gradient as one matrix–vector product per
//! input channel; as a matmul over `[c, b·h·w]` it needs the activations copied into that
//! layout and back, forward and backward. Here the activations stay channel-major between the
//! fine-tune's ops (`kernels::Order::Channels`), so the forward pass and both gradients are
//! one GEMM each over the whole batch (`kernels::backward`). A backend extension on flex and
//! on autodiff over flex, like `depthwise_grad`; the bias stays outside (`bias_relu6`, or
//! `channel_ops::bias_add`).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::prelude::*;
use burn_flex::FlexTensor;

use super::flex_tensor::{channel_major, dims, flex, floats, from_channel_major};
use super::kernels::{self, Pointwise};

/// `[b, i, h, w]` × `[o, i, 1, 1]`, no bias; differentiable on autodiff over flex.
#[backend_extension(Flex, Autodiff)]
pub trait PointwiseOps: Backend {
    fn pointwise(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Gradient of [`Self::pointwise`] with respect to `x`, given the output's gradient.
    fn pointwise_grad_x(grad: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Gradient of [`Self::pointwise`] with respect to `weight`.
    fn pointwise_grad_weight(grad: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl PointwiseOps for Flex {
    fn pointwise(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        let [b, _, h, w] = dims(&x);
        let shape = Pointwise::of(dims(&x), dims(&weight));
        let (x, weight) = (channel_major(&x), floats(&weight));
        let out = kernels::pointwise_product(shape, x.storage(), weight.storage());
        from_channel_major(out, [b, shape.outputs, h, w])
    }

    fn pointwise_grad_x(grad: FlexTensor, weight: FlexTensor) -> FlexTensor {
        let [b, o, h, w] = dims(&grad);
        let inputs = dims(&weight)[1];
        let shape = Pointwise::of([b, inputs, h, w], dims(&weight));
        assert_eq!(o, shape.outputs, "pointwise gradient matches the weight");
        let (grad, weight) = (channel_major(&grad), floats(&weight));
        let out = kernels::pointwise_grad_x(shape, grad.storage(), weight.storage());
        from_channel_major(out, [b, inputs, h, w])
    }

    fn pointwise_grad_weight(grad: FlexTensor, x: FlexTensor) -> FlexTensor {
        let [_, o, _, _] = dims(&grad);
        let shape = Pointwise::of(dims(&x), [o, dims(&x)[1], 1, 1]);
        let (grad, x) = (channel_major(&grad), channel_major(&x));
        let out = kernels::pointwise_grad_weight(shape, grad.storage(), x.storage());
        flex(out, [o, shape.inputs, 1, 1])
    }
}

impl<B: Backend + PointwiseOps, C: CheckpointStrategy> PointwiseOps for Autodiff<B, C> {
    fn pointwise(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PointwiseBackward;

        impl<B: Backend + PointwiseOps> Backward<B, 2> for PointwiseBackward {
            /// The input and the weight.
            type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, weight) = ops.state;
                binary::<B, _, _>(
                    ops.parents,
                    ops.node,
                    grads,
                    |grad| B::pointwise_grad_x(grad, weight),
                    |grad| B::pointwise_grad_weight(grad, x),
                );
            }
        }

        let nodes = [x.node(), weight.node()];
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        let out = B::pointwise(x.clone(), weight.clone());
        match PointwiseBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, weight), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn pointwise_grad_x(_: FloatTensor<Self>, _: FloatTensor<Self>) -> FloatTensor<Self> {
        // The backward pass calls these on the inner backend; a second-order gradient of this
        // op would land here, and nothing in transferd takes one.
        unreachable!("called by the backward pass on the inner backend only")
    }

    fn pointwise_grad_weight(_: FloatTensor<Self>, _: FloatTensor<Self>) -> FloatTensor<Self> {
        unreachable!("called by the backward pass on the inner backend only")
    }
}

/// The 1×1 conv through [`PointwiseOps`]: `[b, i, h, w]` × `[o, i, 1, 1]`.
pub fn pointwise(x: Tensor<4>, weight: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as PointwiseOps>::pointwise(
        x.into_dispatch(),
        weight.into_dispatch(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;

    use crate::ml::flex_tensor::parity::assert_conv_matches;

    /// Output, input gradient and weight gradient against burn's generic conv.
    #[test]
    fn gradients_match_burns_conv() {
        let ad = Device::flex().autodiff();
        for (b, i, o, h, w) in [(3, 5, 70, 7, 7), (2, 16, 9, 3, 11)] {
            let x = Tensor::<4>::random([b, i, h, w], Distribution::Normal(0.0, 1.0), &ad)
                .require_grad();
            let wt = Tensor::<4>::random([o, i, 1, 1], Distribution::Normal(0.0, 1.0), &ad)
                .require_grad();
            let ours = pointwise(x.clone(), wt.clone());
            let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
            let reference = conv2d(x.clone(), wt.clone(), None, options);
            assert_conv_matches(ours, reference, &x, &wt, &format!("{b}x{i}x{h}x{w} to {o}"));
        }
    }
}
