//! The fine-tune's per-channel ops besides `bias_relu6`, on the channel-major activations the
//! convs hand over (`pointwise_grad`): a conv's bias add where no ReLU6 follows (a projection
//! conv), and the global average pool. burn's add and mean would read those tensors through
//! their strides and hand back image-order ones, which the next conv, or the ReLU6's backward
//! behind the pool's gradient, would copy to channel-major again. A backend extension on flex
//! and on autodiff over flex, like `bias_relu6`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::prelude::*;
use burn_flex::FlexTensor;

use super::flex_tensor::{channel_major, dims, flex, floats, from_channel_major};
use super::kernels::Order;
use super::lanes::each_chunk;

/// Per-channel ops of `[b, c, h, w]` activations; differentiable on autodiff over flex.
#[backend_extension(Flex, Autodiff)]
pub trait ChannelOps: Backend {
    /// `x + bias[c]` for `bias` `[c]`.
    fn bias_add(x: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Each channel's sum over every image and pixel (`[c]`): the bias's gradient.
    fn channel_sums(grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The mean of each image's plane of each channel: `[b, c, h, w]` to `[b, c]`.
    fn pool(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The gradient of [`Self::pool`] for an input of `shape`, given the output's: each plane
    /// filled with its mean's gradient over the plane's size.
    fn pool_grad(grad: FloatTensor<Self>, shape: [usize; 4]) -> FloatTensor<Self>;
}

/// Sum of `v` in eight partial sums, which a plain running sum would not be vectorised into.
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl ChannelOps for Flex {
    fn bias_add(x: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let shape = dims(&x);
        let [b, c, h, w] = shape;
        let (x, bias) = (channel_major(&x), floats(&bias));
        let (xs, bs): (&[f32], &[f32]) = (x.storage(), bias.storage());
        assert_eq!(bs.len(), c, "one bias per channel");
        // Each channel's values, every image's, in one run.
        let run = b * h * w;
        let mut out = vec![0f32; c * run];
        each_chunk(&mut out, run, |ch, dst| {
            for (o, v) in dst.iter_mut().zip(&xs[ch * run..][..run]) {
                *o = v + bs[ch];
            }
        });
        from_channel_major(out, shape)
    }

    fn channel_sums(grad: FlexTensor) -> FlexTensor {
        let [b, c, h, w] = dims(&grad);
        let grad = channel_major(&grad);
        let gs: &[f32] = grad.storage();
        let run = b * h * w;
        let mut out = vec![0f32; c];
        each_chunk(&mut out, 1, |ch, s| s[0] = sum(&gs[ch * run..][..run]));
        flex(out, [c])
    }

    fn pool(x: FlexTensor) -> FlexTensor {
        let [b, c, h, w] = dims(&x);
        let plane = h * w;
        // Either order is read where it lies: image order from the inference kernels,
        // channel-major from the fine-tune's.
        let (order, x) = if x.is_contiguous() && x.layout().start_offset() == 0 {
            (Order::Images, floats(&x))
        } else {
            (Order::Channels, channel_major(&x))
        };
        let xs: &[f32] = x.storage();
        let mut out = vec![0f32; b * c];
        each_chunk(&mut out, c, |image, means| {
            for (ch, m) in means.iter_mut().enumerate() {
                let p = order.plane(b, c, image, ch);
                *m = sum(&xs[p * plane..][..plane]) / plane as f32;
            }
        });
        flex(out, [b, c])
    }

    fn pool_grad(grad: FlexTensor, shape: [usize; 4]) -> FlexTensor {
        let [b, c, h, w] = shape;
        let plane = h * w;
        let grad = floats(&grad);
        let gs: &[f32] = grad.storage();
        assert_eq!(gs.len(), b * c, "one gradient per image and channel");
        let mut out = vec![0f32; b * c * plane];
        each_chunk(&mut out, b * plane, |ch, run| {
            for (image, dst) in run.chunks_exact_mut(plane).enumerate() {
                dst.fill(gs[image * c + ch] / plane as f32);
            }
        });
        from_channel_major(out, shape)
    }
}

impl<B: Backend + ChannelOps, C: CheckpointStrategy> ChannelOps for Autodiff<B, C> {
    fn bias_add(x: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct BiasAddBackward;

        impl<B: Backend + ChannelOps> Backward<B, 2> for BiasAddBackward {
            type State = ();

            fn backward(self, ops: Ops<(), 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [x, bias] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = bias {
                    grads.register::<B>(node.id, B::channel_sums(grad.clone()));
                }
                if let Some(node) = x {
                    grads.register::<B>(node.id, grad);
                }
            }
        }

        let nodes = [x.node(), bias.node()];
        let out = B::bias_add(x.into_primitive(), bias.into_primitive());
        BiasAddBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateless(out)
    }

    fn channel_sums(_: FloatTensor<Self>) -> FloatTensor<Self> {
        unreachable!("called by the backward pass on the inner backend only")
    }

    fn pool(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PoolBackward;

        impl<B: Backend + ChannelOps> Backward<B, 1> for PoolBackward {
            /// The input's shape.
            type State = [usize; 4];

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let shape = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::pool_grad(grad, shape)
                });
            }
        }

        let shape = dims(&x);
        let nodes = [x.node()];
        let out = B::pool(x.into_primitive());
        match PoolBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(shape, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn pool_grad(_: FloatTensor<Self>, _: [usize; 4]) -> FloatTensor<Self> {
        unreachable!("called by the backward pass on the inner backend only")
    }
}

/// `x + bias[c]` through [`ChannelOps`]: `x` `[b, c, h, w]`, `bias` `[c]`.
pub fn bias_add(x: Tensor<4>, bias: Tensor<1>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as ChannelOps>::bias_add(
        x.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// Global average pooling through [`ChannelOps`]: `[b, c, h, w]` to `[b, c]`.
pub fn pool(x: Tensor<4>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as ChannelOps>::pool(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    use crate::ml::flex_tensor::parity::{max_diff, weighted_backward};

    /// Output and both gradients against burn's broadcast add.
    #[test]
    fn bias_add_matches_burns_add() {
        let ad = Device::flex().autodiff();
        let x =
            Tensor::<4>::random([3, 5, 4, 7], Distribution::Normal(0.0, 2.0), &ad).require_grad();
        let bias = Tensor::<1>::random([5], Distribution::Normal(0.0, 2.0), &ad).require_grad();
        let ours = bias_add(x.clone(), bias.clone());
        let reference = x.clone() + bias.clone().reshape([1, 5, 1, 1]);
        let (go, gr) = weighted_backward(&ours, &reference);
        assert!(max_diff(ours, reference) < 1e-6, "output");
        let dx = max_diff(x.grad(&go).unwrap(), x.grad(&gr).unwrap());
        assert!(dx < 1e-6, "input gradient differs by {dx}");
        let db = max_diff(bias.grad(&go).unwrap(), bias.grad(&gr).unwrap());
        assert!(db < 1e-4, "bias gradient differs by {db}");
    }

    /// Only one of the bias add's inputs tracked: it alone gets its gradient, the same as
    /// burn's.
    #[test]
    fn either_input_of_bias_add_alone_gets_its_gradient() {
        let ad = Device::flex().autodiff();
        let x = Tensor::<4>::random([2, 3, 2, 3], Distribution::Normal(0.0, 2.0), &ad);
        let bias = Tensor::<1>::random([3], Distribution::Normal(0.0, 2.0), &ad);
        let weights = Tensor::<4>::random([2, 3, 2, 3], Distribution::Normal(0.0, 1.0), &ad);
        for track_x in [true, false] {
            let (x, bias) = if track_x {
                (x.clone().require_grad(), bias.clone())
            } else {
                (x.clone(), bias.clone().require_grad())
            };
            let ours = (bias_add(x.clone(), bias.clone()) * weights.clone())
                .sum()
                .backward();
            let reference = ((x.clone() + bias.clone().reshape([1, 3, 1, 1])) * weights.clone())
                .sum()
                .backward();
            if track_x {
                assert!(bias.grad(&ours).is_none(), "the bias is not tracked");
                let d = max_diff(x.grad(&ours).unwrap(), x.grad(&reference).unwrap());
                assert!(d < 1e-6, "input gradient differs by {d}");
            } else {
                assert!(x.grad(&ours).is_none(), "the input is not tracked");
                let d = max_diff(bias.grad(&ours).unwrap(), bias.grad(&reference).unwrap());
                assert!(d < 1e-5, "bias gradient differs by {d}");
            }
        }
    }

    /// The pool and its gradient against burn's means, on an image-order input (as the
    /// inference kernels give it) and on a channel-major one (as the fine-tune's ops do).
    #[test]
    fn pool_matches_burns_mean_in_either_order() {
        let ad = Device::flex().autodiff();
        let x =
            Tensor::<4>::random([3, 5, 4, 7], Distribution::Normal(0.0, 2.0), &ad).require_grad();
        let zeros = Tensor::<1>::zeros([5], &ad);
        for channel_major_input in [false, true] {
            // bias_add hands its output over channel-major; adding zeros changes no value. One
            // input per side: a backward pass consumes the graph behind it.
            let input = || {
                if channel_major_input {
                    bias_add(x.clone(), zeros.clone())
                } else {
                    x.clone()
                }
            };
            let ours = pool(input());
            let reference = input().mean_dim(3).mean_dim(2).reshape([3, 5]);
            let weights = Tensor::<2>::random([3, 5], Distribution::Normal(0.0, 1.0), &ad);
            let go = (ours.clone() * weights.clone()).sum().backward();
            let gr = (reference.clone() * weights).sum().backward();
            let case = format!("channel-major input: {channel_major_input}");
            assert!(max_diff(ours, reference) < 1e-6, "{case}: output");
            let dx = max_diff(x.grad(&go).unwrap(), x.grad(&gr).unwrap());
            assert!(dx < 1e-6, "{case}: input gradient differs by {dx}");
        }
    }

    /// The fine-tune's ops hand their outputs on channel-major, so the next one reads them
    /// without a copy; an image-order tensor is read in channel-major order by a copy.
    #[test]
    fn a_channel_major_output_is_read_where_it_lies() {
        let x: Vec<f32> = (0..2 * 3 * 4).map(|v| v as f32).collect();
        let image_order = flex(x.clone(), [2, 3, 2, 2]);
        let bias = flex(vec![0.0; 3], [3]);
        let out = <Flex as ChannelOps>::bias_add(image_order.clone(), bias);
        let read = channel_major(&out);
        assert_eq!(
            read.storage::<f32>().as_ptr(),
            out.storage::<f32>().as_ptr(),
            "no copy"
        );
        // Channel 1's planes of images 0 and 1, one after the other.
        assert_eq!(
            &read.storage::<f32>()[8..16],
            &[4., 5., 6., 7., 16., 17., 18., 19.]
        );
        assert_eq!(
            floats(&out).storage::<f32>(),
            &x[..],
            "the values, in image order"
        );
        let copied = channel_major(&image_order);
        assert_eq!(copied.storage::<f32>(), read.storage::<f32>());
    }
}
