//! The fused inference convolutions as a burn backend extension on flex: `FusedConvOps`
//! unwraps flex tensors, runs the raw kernels of `kernels` and wraps the result. Which conv
//! takes which path is decided in `fused`.

use burn::backend::{Flex, backend_extension, tensor::FloatTensor};
use burn_flex::FlexTensor;

use super::flex_tensor::{dims, flex, floats};
use super::kernels::{self, Depthwise, Epilogue, Pointwise};

/// Fused convolutions with BatchNorm already folded into `weight` and `bias`.
#[backend_extension(Flex)]
pub trait FusedConvOps: burn::backend::Backend {
    /// 1×1 conv, stride 1: `[b, i, h, w]` × `[o, i, 1, 1]` + bias, then ReLU6 if asked.
    fn pointwise_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu6: bool,
    ) -> FloatTensor<Self>;
    /// 1×1 conv, stride 1, + bias, + `residual` (shaped like the output).
    fn pointwise_conv_add(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// A k×k conv over few channels (the stem) as im2col + the pointwise kernel: `[b, i, h,
    /// w]` × `[o, i, k, k]` + bias, then ReLU6 if asked; `padding` as for depthwise.
    fn small_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: [usize; 4],
        relu6: bool,
    ) -> FloatTensor<Self>;
    /// Depthwise k×k conv: `[b, c, h, w]` × `[c, 1, k, k]` + bias, then ReLU6 if asked;
    /// `padding` is (top, bottom, left, right) in pixels.
    fn depthwise_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: [usize; 4],
        relu6: bool,
    ) -> FloatTensor<Self>;
}

/// A pointwise conv on flex tensors through `kernels::pointwise`: bias, then ReLU6 or the
/// residual, in the same pass.
fn pointwise_flex(
    x: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    relu6: bool,
    residual: Option<FlexTensor>,
) -> FlexTensor {
    let (x, weight, bias) = (floats(&x), floats(&weight), floats(&bias));
    let residual = residual.as_ref().map(floats);
    let [batch, _, h, w] = dims(&x);
    let shape = Pointwise::of(dims(&x), dims(&weight));
    let outputs = shape.outputs;
    let epi = Epilogue {
        bias: bias.storage(),
        relu6,
        residual: residual.as_ref().map(|r| r.storage()),
    };
    let out = kernels::pointwise(shape, x.storage(), weight.storage(), epi);
    flex(out, [batch, outputs, h, w])
}

impl FusedConvOps for Flex {
    fn pointwise_conv(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        relu6: bool,
    ) -> FlexTensor {
        pointwise_flex(x, weight, bias, relu6, None)
    }

    fn pointwise_conv_add(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        residual: FlexTensor,
    ) -> FlexTensor {
        pointwise_flex(x, weight, bias, false, Some(residual))
    }

    fn small_conv(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: usize,
        padding: [usize; 4],
        relu6: bool,
    ) -> FlexTensor {
        let (x, weight, bias) = (floats(&x), floats(&weight), floats(&bias));
        let [batch, channels, height, width] = dims(&x);
        let [outputs, _, kernel, _] = dims(&weight);
        let d = Depthwise::of([batch, channels, height, width], kernel, stride, padding);
        let columns = kernels::im2col(d, x.storage());
        let shape = Pointwise {
            batch,
            inputs: channels * kernel * kernel,
            outputs,
            spatial: d.out_height * d.out_width,
        };
        let epi = Epilogue {
            bias: bias.storage(),
            relu6,
            residual: None,
        };
        let out = kernels::pointwise(shape, &columns, weight.storage(), epi);
        flex(out, [batch, outputs, d.out_height, d.out_width])
    }

    fn depthwise_conv(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: usize,
        padding: [usize; 4],
        relu6: bool,
    ) -> FlexTensor {
        let (x, weight, bias) = (floats(&x), floats(&weight), floats(&bias));
        let d = Depthwise::of(dims(&x), dims(&weight)[2], stride, padding);
        let epi = Epilogue {
            bias: bias.storage(),
            relu6,
            residual: None,
        };
        let out = kernels::depthwise(d, x.storage(), weight.storage(), epi);
        flex(out, [d.batch, d.channels, d.out_height, d.out_width])
    }
}
