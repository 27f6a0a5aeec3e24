//! A conv's bias add and its ReLU6 as one differentiable op, for fine-tuning on flex.
//!
//! As burn ops they are three passes over the activations forward (add, two comparisons in
//! the clamp) and five backward (the clamp's two masks and two fills, the bias's sum). Here
//! the forward pass is one, and the backward one pass too: it reads the output's gradient and the
//! output itself, which says where the clamp let the gradient through (`0 < y < 6`), writes the
//! input's gradient and sums its channel's bias gradient on the way (two passes, the second
//! strided across images, were among the largest costs of a fine-tune step after its GEMMs).
//! Channel-major, as the convs before it (`pointwise_grad`), so each channel is one run over
//! every image. A backend extension on flex and on autodiff over flex, like `depthwise_grad`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::prelude::*;
use burn_flex::FlexTensor;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU32, Ordering};

use super::flex_tensor::{channel_major, dims, flex, floats, from_channel_major};

/// `clamp(x + bias[c], 0, 6)` for `x` `[b, c, h, w]` and `bias` `[c]`; differentiable on
/// autodiff over flex.
#[backend_extension(Flex, Autodiff)]
pub trait BiasRelu6Ops: Backend {
    fn bias_relu6(x: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The input's and the bias's gradients, given the output `y` and its gradient.
    fn bias_relu6_grads(
        grad: FloatTensor<Self>,
        y: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether the clamp let the gradient through at output `y`.
fn passes(y: f32) -> bool {
    y > 0.0 && y < 6.0
}

/// Writes `g` where the clamp let it through (else 0) into `out` and returns the sum of what
/// it wrote, in eight partial sums (one vector register), which a plain running sum would not
/// be vectorised into.
fn pass_through(out: &mut [MaybeUninit<f32>], g: &[f32], y: &[f32]) -> f32 {
    // Every element of `out` is written only if the three are as long (the caller relies on it).
    assert!(
        g.len() == out.len() && y.len() == out.len(),
        "gradient, output and destination of one channel's run"
    );
    let whole = out.len() / 8 * 8;
    let (main, rest) = out.split_at_mut(whole);
    let mut acc = [0f32; 8];
    for ((o, g), y) in main
        .chunks_exact_mut(8)
        .zip(g.chunks_exact(8))
        .zip(y.chunks_exact(8))
    {
        for l in 0..8 {
            let v = if passes(y[l]) { g[l] } else { 0.0 };
            o[l].write(v);
            acc[l] += v;
        }
    }
    let mut tail = 0.0f32;
    for ((o, g), y) in rest.iter_mut().zip(&g[whole..]).zip(&y[whole..]) {
        let v = if passes(*y) { *g } else { 0.0 };
        o.write(v);
        tail += v;
    }
    acc.iter().sum::<f32>() + tail
}

impl BiasRelu6Ops for Flex {
    fn bias_relu6(x: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let shape = dims(&x);
        let [b, c, h, w] = shape;
        let (x, bias) = (channel_major(&x), floats(&bias));
        let (xs, bs): (&[f32], &[f32]) = (x.storage(), bias.storage());
        assert_eq!(bs.len(), c, "one bias per channel");
        // Channel-major: each channel's values, every image's, in one run.
        let run = b * h * w;
        let total = c * run;
        let mut out: Vec<f32> = Vec::with_capacity(total);
        super::lanes::each_chunk(&mut out.spare_capacity_mut()[..total], run, |ch, dst| {
            let bias = bs[ch];
            for (o, v) in dst.iter_mut().zip(&xs[ch * run..][..run]) {
                o.write((v + bias).clamp(0.0, 6.0));
            }
        });
        // SAFETY: the runs cover the buffer and each element of each was written above.
        unsafe { out.set_len(total) };
        from_channel_major(out, shape)
    }

    fn bias_relu6_grads(grad: FlexTensor, y: FlexTensor) -> (FlexTensor, FlexTensor) {
        let shape = dims(&y);
        let [b, c, h, w] = shape;
        let (grad, y) = (channel_major(&grad), channel_major(&y));
        let (gs, ys): (&[f32], &[f32]) = (grad.storage(), y.storage());
        let run = b * h * w;
        // Each channel's bias gradient, written once by the task of its run (f32 bits in an
        // atomic, so no lock).
        let sums: Vec<AtomicU32> = (0..c).map(|_| AtomicU32::new(0)).collect();
        // Not zeroed first: every element is written below.
        let mut gx: Vec<f32> = Vec::with_capacity(ys.len());
        super::lanes::each_chunk(&mut gx.spare_capacity_mut()[..ys.len()], run, |ch, out| {
            let at = ch * run;
            let sum = pass_through(out, &gs[at..][..run], &ys[at..][..run]);
            sums[ch].store(sum.to_bits(), Ordering::Relaxed);
        });
        // SAFETY: the runs cover the buffer and `pass_through` wrote each element of each.
        unsafe { gx.set_len(ys.len()) };
        let gbias: Vec<f32> = sums
            .iter()
            .map(|s| f32::from_bits(s.load(Ordering::Relaxed)))
            .collect();
        (from_channel_major(gx, shape), flex(gbias, [c]))
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
                let [x, bias] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (gx, gbias) = B::bias_relu6_grads(grad, ops.state);
                if let Some(node) = x {
                    grads.register::<B>(node.id, gx);
                }
                if let Some(node) = bias {
                    grads.register::<B>(node.id, gbias);
                }
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

    fn bias_relu6_grads(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
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

    use crate::ml::flex_tensor::parity::{max_diff, weighted_backward};

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
        let (go, gr) = weighted_backward(&ours, &reference);
        assert!(max_diff(ours.clone(), reference.clone()) < 1e-6, "output");
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
            max_diff(x.grad(&go).unwrap(), x.grad(&gr).unwrap()) < 1e-6,
            "input gradient"
        );
        assert!(
            max_diff(bias.grad(&go).unwrap(), bias.grad(&gr).unwrap()) < 1e-4,
            "bias gradient"
        );
    }

    /// The fused backward against the two passes it replaced (the masked gradient, then each
    /// channel's sum over every image in eight partial sums, channel-major): the same bits, on
    /// channels whose run is narrower than a vector and wider with a tail, from image-order
    /// tensors (which the op reads channel-major).
    #[test]
    fn one_pass_gives_the_bits_of_the_two() {
        // Several images, values of mixed magnitudes: another order of the sums gives other
        // bits (checked: summing each channel image by image fails this test).
        for shape in [[5, 4, 1, 5], [6, 3, 3, 7]] {
            let [b, c, h, w] = shape;
            let n = b * c * h * w;
            let y: Vec<f32> = (0..n).map(|i| ((i * 37 % 17) as f32) * 0.5 - 1.5).collect();
            let g: Vec<f32> = (0..n)
                .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * (1 + i % 7) as f32 * 3.7)
                .collect();
            let (gx, gbias) = <Flex as BiasRelu6Ops>::bias_relu6_grads(
                flex(g.clone(), shape),
                flex(y.clone(), shape),
            );
            let gx = floats(&gx);
            let (gx, gbias): (&[f32], &[f32]) = (gx.storage(), gbias.storage());
            let masked: Vec<f32> = g
                .iter()
                .zip(&y)
                .map(|(g, y)| if passes(*y) { *g } else { 0.0 })
                .collect();
            assert_eq!(gx, &masked[..], "{shape:?}: input gradient");
            let plane = h * w;
            for ch in 0..c {
                // The channel's masked values, image after image.
                let run: Vec<f32> = (0..b)
                    .flat_map(|i| masked[(i * c + ch) * plane..][..plane].to_vec())
                    .collect();
                let chunks = run.chunks_exact(8);
                let tail: f32 = chunks.remainder().iter().sum();
                let mut acc = [0f32; 8];
                for v in chunks {
                    for l in 0..8 {
                        acc[l] += v[l];
                    }
                }
                let want = acc.iter().sum::<f32>() + tail;
                assert_eq!(
                    gbias[ch].to_bits(),
                    want.to_bits(),
                    "{shape:?}: channel {ch}"
                );
                assert!(want != 0.0, "the sums are not trivially zero");
            }
        }
    }

    /// Only one of the two inputs tracked: it alone gets its gradient, the same as burn's.
    #[test]
    fn either_input_alone_gets_its_gradient() {
        let ad = Device::flex().autodiff();
        let x = Tensor::<4>::random([2, 3, 2, 3], Distribution::Normal(2.0, 4.0), &ad);
        let bias = Tensor::<1>::random([3], Distribution::Normal(0.0, 2.0), &ad);
        for track_x in [true, false] {
            let (x, bias) = if track_x {
                (x.clone().require_grad(), bias.clone())
            } else {
                (x.clone(), bias.clone().require_grad())
            };
            let ours = bias_relu6(x.clone(), bias.clone()).sum().backward();
            let reference = relu6(x.clone() + bias.clone().reshape([1, 3, 1, 1]))
                .sum()
                .backward();
            if track_x {
                assert!(bias.grad(&ours).is_none(), "the bias is not tracked");
                let d = max_diff(x.grad(&ours).unwrap(), x.grad(&reference).unwrap());
                assert!(d < 1e-6, "input gradient");
            } else {
                assert!(x.grad(&ours).is_none(), "the input is not tracked");
                let d = max_diff(bias.grad(&ours).unwrap(), bias.grad(&reference).unwrap());
                assert!(d < 1e-4, "bias gradient");
            }
        }
    }
}
