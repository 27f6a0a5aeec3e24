//! Plain flex tensors as the CPU extension ops (`fused_ops`, `pointwise_grad`,
//! `depthwise_grad`, `bias_relu6`, `channel_ops`) take and give them: an operand as the contiguous `f32`
//! storage their kernels read (in image order, or channel-major for the fine-tune's ops), its
//! `[b, c, h, w]` dims, and a new tensor from a buffer their kernels filled.

use burn::prelude::*;
use burn_flex::FlexTensor;

/// The four dims of a rank-4 tensor: a flex one, or any backend's (an autodiff op's saved
/// input).
pub(crate) fn dims(t: &impl burn::backend::TensorMetadata) -> [usize; 4] {
    let s = t.shape();
    [s[0], s[1], s[2], s[3]]
}

/// A flex tensor of `shape` holding `data`.
pub(crate) fn flex(data: Vec<f32>, shape: impl Into<burn::tensor::Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// `t` as dense `f32` storage, which every kernel reads (a strided view is copied; another
/// float type is a bug in the caller, so it panics).
pub(crate) fn floats(t: &FlexTensor) -> FlexTensor {
    assert_eq!(
        t.dtype(),
        burn::tensor::DType::F32,
        "the CPU extension ops run in f32"
    );
    t.to_contiguous()
}

/// `t` (`[b, c, h, w]`, f32) as dense storage in channel-major order (`[c, b, h, w]`,
/// `kernels::Order::Channels`), which the fine-tune's ops compute in: the storage itself when
/// it lies so already (the output of one of them, or a single image), else a copy.
pub(crate) fn channel_major(t: &FlexTensor) -> FlexTensor {
    floats(&t.transpose(0, 1))
}

/// The `[b, c, h, w]` tensor whose channel-major storage is `data` (see [`channel_major`]):
/// burn's ops see the usual shape, and the next fine-tune op reads `data` without a copy.
pub(crate) fn from_channel_major(data: Vec<f32>, [b, c, h, w]: [usize; 4]) -> FlexTensor {
    flex(data, [c, b, h, w]).transpose(0, 1)
}

/// What the extension ops' tests compare them with burn's own ops by.
#[cfg(test)]
pub(crate) mod parity {
    use burn::prelude::*;
    use burn::tensor::{Distribution, Gradients};

    /// The gradients through `ours` and through `reference` (the same shape), each reached by
    /// one weighted sum of its outputs with the same random weights, so that every output's
    /// gradient differs.
    pub(crate) fn weighted_backward(
        ours: &Tensor<4>,
        reference: &Tensor<4>,
    ) -> (Gradients, Gradients) {
        let weights =
            Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &ours.device());
        (
            (ours.clone() * weights.clone()).sum().backward(),
            (reference.clone() * weights).sum().backward(),
        )
    }

    /// The largest absolute difference between two tensors of the same shape.
    pub(crate) fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Output, input gradient and weight gradient of a conv `ours` against `reference`, both
    /// computed from `x` and `weight` (tracked), each within 1e-4; `case` names the geometry in
    /// a failure.
    pub(crate) fn assert_conv_matches(
        ours: Tensor<4>,
        reference: Tensor<4>,
        x: &Tensor<4>,
        weight: &Tensor<4>,
        case: &str,
    ) {
        let (go, gr) = weighted_backward(&ours, &reference);
        let close = |a: Tensor<4>, b: Tensor<4>, what: &str| {
            let diff = max_diff(a, b);
            assert!(diff < 1e-4, "{case}: {what} differs by {diff}");
        };
        close(ours, reference, "output");
        close(x.grad(&go).unwrap(), x.grad(&gr).unwrap(), "input gradient");
        close(
            weight.grad(&go).unwrap(),
            weight.grad(&gr).unwrap(),
            "weight gradient",
        );
    }
}
