//! A convolution followed by its BatchNorm, ReLU6 and residual add, as MBConv uses them, run
//! as one fused operation on flex when it can be.
//!
//! Inference never trains BatchNorm, so [`FrozenBatchNorm::fold_into`] folds it into the conv's
//! weights and bias once, when a model is loaded for predictions or for the frozen pass. On a
//! plain flex tensor the folded pointwise, depthwise and stem (few-channel, im2col) convs then
//! run through the backend extension `fused_ops::FusedConvOps` (kernels in `kernels`). While
//! training on flex, 1×1 and depthwise convs run with their own backward (`pointwise_grad`,
//! `depthwise_grad`), because burn's generic conv backward is slow for both, and a conv's
//! bias and ReLU6 as one op (`bias_relu6`), or its bias alone (`channel_ops::bias_add`); all of
//! them on channel-major activations. wgpu keeps burn's own ops throughout.

use burn::backend::Dispatch;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::relu6;

use super::bias_relu6::bias_relu6;
use super::channel_ops::bias_add;
use super::depthwise_grad::depthwise;
use super::frozen_bn::FrozenBatchNorm;
use super::fused_ops::FusedConvOps;
use super::pointwise_grad::pointwise;

thread_local! {
    /// Set by [`generic_only`]: the reference the fused paths are tested against.
    static GENERIC_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Set to `1`, the whole process runs the generic path (nothing folded, no fused kernel, no
/// own backward, no fused bias and ReLU6): how the benchmarks measure "before" and "after"
/// side by side in one run with one binary.
pub const GENERIC_ENV: &str = "TRANSFERD_GENERIC_CONVS";

/// Runs `f` with every conv on burn's generic ops (no fused inference kernel, no own backward,
/// no fused bias and ReLU6) on this thread: the reference for parity tests. Thread-local: it
/// does not reach the threads `lanes::map_slices` runs slices on.
pub fn generic_only<T>(f: impl FnOnce() -> T) -> T {
    /// Clears the switch however `f` ends, a panic included.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            GENERIC_ONLY.with(|g| g.set(false));
        }
    }
    GENERIC_ONLY.with(|g| g.set(true));
    let _reset = Reset;
    f()
}

fn generic() -> bool {
    static PROCESS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    GENERIC_ONLY.with(|g| g.get())
        || *PROCESS.get_or_init(|| std::env::var_os(GENERIC_ENV).is_some_and(|v| v == "1"))
}

/// Whether tensors on `device` go through transferd's own ops outside the fused inference
/// convs: the fine-tune's convs, bias and ReLU6, and the pool on every path (flex, plain or
/// under autodiff, unless the generic path is asked for). wgpu keeps burn's own ops (its
/// kernels are another matter entirely).
pub(crate) fn own_ops(device: &Device) -> bool {
    (*device == Device::flex() || *device == Device::flex().autodiff()) && !generic()
}

/// Folds `bn` into `conv` for inference ([`FrozenBatchNorm::fold_into`]), unless the generic
/// path is asked for.
pub fn fold(bn: FrozenBatchNorm, conv: Conv2d) -> (Conv2d, FrozenBatchNorm) {
    if generic() {
        (conv, bn)
    } else {
        bn.fold_into(conv)
    }
}

/// What follows a conv and its BatchNorm in an MBConv network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Relu6,
    Nothing,
}

/// `after(bn(conv(x))) [+ residual]`, fused on flex when `bn` has been folded into `conv`.
pub fn conv_bn(
    conv: &Conv2d,
    bn: &FrozenBatchNorm,
    x: Tensor<4>,
    after: After,
    residual: Option<Tensor<4>>,
) -> Tensor<4> {
    if let Some(y) = try_fused(conv, bn, &x, after, &residual) {
        return y;
    }
    let (y, bias) = conv_bn_generic(conv, bn, x);
    let y = match (bias, after) {
        (Some(bias), After::Relu6) => bias_relu6(y, bias),
        (Some(bias), After::Nothing) => bias_add(y, bias),
        (None, After::Relu6) => relu6(y),
        (None, After::Nothing) => y,
    };
    match residual {
        Some(r) => y + r,
        None => y,
    }
}

/// `bn(conv(x))` with burn's generic ops, except for two convs whose generic backward is slow
/// and that run on flex with their own backward: a 1×1 conv (`pointwise_grad`: its gradients
/// as GEMMs, where burn's conv backward makes one matrix–vector product per input channel)
/// and a depthwise conv (`depthwise_grad`).
/// In both, BatchNorm's scale goes into the weights and its shift into the bias before the
/// conv, inside the autodiff graph, so that gradients still reach both the conv and
/// BatchNorm's affine parameters; that bias is handed back (`[c]`) for the caller to add,
/// with the ReLU6 after it when there is one (`bias_relu6`, else `channel_ops::bias_add`): one
/// pass over the activations instead of the four of BatchNorm and the clamp, forward and
/// backward.
fn conv_bn_generic(
    conv: &Conv2d,
    bn: &FrozenBatchNorm,
    x: Tensor<4>,
) -> (Tensor<4>, Option<Tensor<1>>) {
    let plain = |x| (bn.forward(conv.forward(x)), None);
    if !own_ops(&x.device()) {
        return plain(x);
    }
    let [outputs, per_group, kh, kw] = conv.weight.dims();
    let [_, channels, height, width] = x.dims();
    let square = kh == kw && conv.dilation == [1, 1];
    let is_depthwise = per_group == 1 && conv.groups == channels && outputs == channels;
    let is_pointwise =
        kh == 1 && conv.stride == [1, 1] && conv.groups == 1 && per_group == channels;
    let depthwise_padding = padding_of(conv, kh, height, width).filter(|_| is_depthwise);
    if !square || !(is_pointwise || depthwise_padding.is_some()) {
        return plain(x);
    }
    let (weight, bias) = match bn.affine() {
        Some((scale, shift)) => {
            let weight = conv.weight.val() * scale.clone().reshape([outputs, 1, 1, 1]);
            let bias = match &conv.bias {
                Some(b) => b.val() * scale + shift,
                None => shift,
            };
            (weight, Some(bias))
        }
        // Already folded (inference on a path the fused kernels do not take): the identity.
        None if bn.is_folded() => (conv.weight.val(), conv.bias.as_ref().map(|b| b.val())),
        // Statistics of each batch: BatchNorm has to see the conv's output.
        None => return plain(x),
    };
    let y = match depthwise_padding {
        Some(padding) => depthwise(x, weight, conv.stride[0], padding),
        None => pointwise(x, weight),
    };
    (y, bias)
}

fn try_fused(
    conv: &Conv2d,
    bn: &FrozenBatchNorm,
    x: &Tensor<4>,
    after: After,
    residual: &Option<Tensor<4>>,
) -> Option<Tensor<4>> {
    if !bn.is_folded() || x.device() != Device::flex() || generic() || conv.dilation != [1, 1] {
        return None;
    }
    let bias = conv.bias.as_ref()?.val();
    let weight = conv.weight.val();
    let [outputs, per_group, kh, kw] = weight.dims();
    let [_, channels, height, width] = x.dims();
    let relu = after == After::Relu6;
    let pointwise = kh == 1 && kw == 1 && conv.stride == [1, 1] && conv.groups == 1;
    let depthwise = per_group == 1 && conv.groups == channels && outputs == channels && kh == kw;
    let out = if pointwise && residual.is_none() {
        <Dispatch as FusedConvOps>::pointwise_conv(
            x.clone().into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            relu,
        )
    } else if pointwise && !relu {
        <Dispatch as FusedConvOps>::pointwise_conv_add(
            x.clone().into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            residual.clone()?.into_dispatch(),
        )
    } else if depthwise && residual.is_none() {
        let [top, bottom, left, right] = padding_of(conv, kh, height, width)?;
        <Dispatch as FusedConvOps>::depthwise_conv(
            x.clone().into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            conv.stride[0],
            [top, bottom, left, right],
            relu,
        )
    } else if conv.groups == 1
        && kh == kw
        && per_group * kh * kw <= MAX_IM2COL
        && residual.is_none()
    {
        // The stem: few input channels, so its im2col matrix is small.
        let padding = padding_of(conv, kh, height, width)?;
        <Dispatch as FusedConvOps>::small_conv(
            x.clone().into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            conv.stride[0],
            padding,
            relu,
        )
    } else {
        return None;
    };
    Some(Tensor::from_dispatch(out))
}

/// Largest `channels · k · k` of a conv run as im2col + GEMM ([`FusedConvOps::small_conv`]):
/// Lite's stem (3 · 3 · 3) and nothing wide, whose copied matrix would be large.
const MAX_IM2COL: usize = 64;

/// (top, bottom, left, right) of a square conv with "SAME" padding; `None` for any other.
fn padding_of(conv: &Conv2d, kernel: usize, height: usize, width: usize) -> Option<[usize; 4]> {
    if !matches!(conv.padding, PaddingConfig2d::Same) || conv.stride[0] != conv.stride[1] {
        return None;
    }
    let s = conv.stride[0];
    let (top, bottom) = same_padding(kernel, s, height);
    let (left, right) = same_padding(kernel, s, width);
    Some([top, bottom, left, right])
}

/// TensorFlow's "SAME" padding of one axis, as burn's `PaddingConfig2d::Same` computes it
/// (burn keeps its own helper private): the odd pixel goes to the end.
fn same_padding(kernel: usize, stride: usize, size: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = (out.saturating_sub(1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}
