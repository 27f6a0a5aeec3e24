//! EfficientNet-Lite0, the pretrained ImageNet backbone, as a burn module.
//!
//! The field names mirror lukemelas' EfficientNet-PyTorch (minus the leading underscores) so
//! that the published `.pth` loads with a single key-remapping rule (see `weights.rs`).
//! Lite0 differs from EfficientNet-B0: no squeeze-excitation, ReLU6 everywhere, and a fixed
//! stem and head. Every conv uses TensorFlow "SAME" padding because the weights were trained
//! in TensorFlow: with symmetric padding the strided convs would shift the features by a pixel.
//!
//! The network is split at a block boundary so that training can run the frozen bottom once,
//! cache its activations and fine-tune only the top (`forward_bottom` / `forward_top`).

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu6;

use super::frozen_bn::{FrozenBatchNorm, FrozenBatchNormConfig};

/// Channels of the pooled feature vector that the transfer head sees.
pub const FEATURES: usize = 1280;
/// Number of MBConv blocks in Lite0.
pub const NUM_BLOCKS: usize = 16;
/// The TensorFlow EfficientNet BatchNorm epsilon.
const BN_EPS: f64 = 1e-3;

/// One stage of Lite0: (repeats, kernel, stride, expand ratio, in channels, out channels).
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// The shape of one MBConv block, expanded from `STAGES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    pub kernel: usize,
    pub stride: usize,
    pub expand: usize,
    pub input: usize,
    pub output: usize,
}

/// All 16 blocks in order: repeats after the first of a stage take stride 1 and the stage's
/// output width as input, exactly as the reference implementation builds them.
pub fn block_specs() -> Vec<BlockSpec> {
    let mut specs = Vec::with_capacity(NUM_BLOCKS);
    for (repeats, kernel, stride, expand, input, output) in STAGES {
        for r in 0..repeats {
            specs.push(BlockSpec {
                kernel,
                stride: if r == 0 { stride } else { 1 },
                expand,
                input: if r == 0 { input } else { output },
                output,
            });
        }
    }
    specs
}

/// Channels and spatial divisor of the activation entering block `k` (`k == NUM_BLOCKS`
/// means the input of the head conv).
pub fn activation_shape(k: usize, input_size: usize) -> [usize; 3] {
    let specs = block_specs();
    let (channels, stride) = if k == NUM_BLOCKS {
        (specs[NUM_BLOCKS - 1].output, 32)
    } else {
        let s: usize = 2 * specs[..k].iter().map(|b| b.stride).product::<usize>();
        (specs[k].input, s)
    };
    let side = input_size.div_ceil(stride);
    [channels, side, side]
}

fn conv(
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    Conv2dConfig::new([input, output], [kernel, kernel])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(PaddingConfig2d::Same)
        .with_bias(false)
        .init(device)
}

fn bn(channels: usize, device: &Device) -> FrozenBatchNorm {
    FrozenBatchNormConfig::new(channels)
        .with_epsilon(BN_EPS)
        .init(device)
}

/// Inverted-residual block: 1×1 expand, depthwise k×k, 1×1 project, with an identity skip
/// when the shape is kept.
#[derive(Module, Debug)]
pub struct MbConv {
    expand_conv: Option<Conv2d>,
    bn0: Option<FrozenBatchNorm>,
    depthwise_conv: Conv2d,
    bn1: FrozenBatchNorm,
    project_conv: Conv2d,
    bn2: FrozenBatchNorm,
    skip: bool,
}

impl MbConv {
    fn new(spec: BlockSpec, device: &Device) -> Self {
        let hidden = spec.input * spec.expand;
        let (expand_conv, bn0) = if spec.expand != 1 {
            (
                Some(conv(spec.input, hidden, 1, 1, 1, device)),
                Some(bn(hidden, device)),
            )
        } else {
            (None, None)
        };
        Self {
            expand_conv,
            bn0,
            depthwise_conv: conv(hidden, hidden, spec.kernel, spec.stride, hidden, device),
            bn1: bn(hidden, device),
            project_conv: conv(hidden, spec.output, 1, 1, 1, device),
            bn2: bn(spec.output, device),
            skip: spec.stride == 1 && spec.input == spec.output,
        }
    }

    /// Per-batch BatchNorm statistics (from-scratch training only).
    pub fn use_batch_statistics(self) -> Self {
        Self {
            bn0: self.bn0.map(FrozenBatchNorm::use_batch_statistics),
            bn1: self.bn1.use_batch_statistics(),
            bn2: self.bn2.use_batch_statistics(),
            ..self
        }
    }

    /// # Shapes
    /// - input `[batch, in, h, w]`
    /// - output `[batch, out, h / stride, w / stride]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let (Some(conv), Some(bn)) = (&self.expand_conv, &self.bn0) {
            x = relu6(bn.forward(conv.forward(x)));
        }
        x = relu6(self.bn1.forward(self.depthwise_conv.forward(x)));
        x = self.bn2.forward(self.project_conv.forward(x));
        if self.skip { x + input } else { x }
    }
}

/// Configuration of the backbone: only the size of the ImageNet classifier varies.
#[derive(Config, Debug)]
pub struct EfficientNetLite0Config {
    /// Outputs of the original classifier; 1000 for the ImageNet weights.
    #[config(default = 1000)]
    pub num_classes: usize,
    /// Dropout before the classifier, as in the reference (only active when training).
    #[config(default = 0.2)]
    pub dropout: f64,
}

/// EfficientNet-Lite0 with its ImageNet classifier (`fc`).
#[derive(Module, Debug)]
pub struct EfficientNetLite0 {
    pub conv_stem: Conv2d,
    pub bn0: FrozenBatchNorm,
    pub blocks: Vec<MbConv>,
    pub conv_head: Conv2d,
    pub bn1: FrozenBatchNorm,
    pub dropout: Dropout,
    pub fc: Linear,
}

impl EfficientNetLite0Config {
    /// A randomly initialised network; load the pretrained weights into it with `weights::load`.
    pub fn init(&self, device: &Device) -> EfficientNetLite0 {
        EfficientNetLite0 {
            conv_stem: conv(3, 32, 3, 2, 1, device),
            bn0: bn(32, device),
            blocks: block_specs()
                .into_iter()
                .map(|s| MbConv::new(s, device))
                .collect(),
            conv_head: conv(320, FEATURES, 1, 1, 1, device),
            bn1: bn(FEATURES, device),
            dropout: DropoutConfig::new(self.dropout).init(),
            fc: LinearConfig::new(FEATURES, self.num_classes).init(device),
        }
    }
}

impl EfficientNetLite0 {
    /// Runs the stem and blocks `0..k`: the frozen part when the top `16 - k` blocks train.
    ///
    /// # Shapes
    /// - images `[batch, 3, s, s]`, normalised as in `preprocess`
    /// - output `[batch, c_k, s / d_k, s / d_k]`, see [`activation_shape`]
    pub fn forward_bottom(&self, images: Tensor<4>, k: usize) -> Tensor<4> {
        let mut x = relu6(self.bn0.forward(self.conv_stem.forward(images)));
        for block in &self.blocks[..k] {
            x = block.forward(x);
        }
        x
    }

    /// Runs blocks `k..16`, the head conv and global average pooling.
    ///
    /// # Shapes
    /// - activations `[batch, c_k, h, w]` from [`Self::forward_bottom`]
    /// - output `[batch, 1280]`
    pub fn forward_top(&self, activations: Tensor<4>, k: usize) -> Tensor<2> {
        let mut x = activations;
        for block in &self.blocks[k..] {
            x = block.forward(x);
        }
        pool(relu6(self.bn1.forward(self.conv_head.forward(x))))
    }

    /// Pooled features of whole images.
    ///
    /// # Shapes
    /// - images `[batch, 3, s, s]`
    /// - output `[batch, 1280]`
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward_top(self.forward_bottom(images, 0), 0)
    }

    /// ImageNet logits with the original classifier.
    ///
    /// # Shapes
    /// - images `[batch, 3, s, s]`
    /// - output `[batch, 1000]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.fc.forward(self.dropout.forward(self.features(images)))
    }
}

/// Global average pooling: `[batch, c, h, w]` to `[batch, c]`.
pub fn pool(x: Tensor<4>) -> Tensor<2> {
    let [batch, channels, _, _] = x.dims();
    x.mean_dim(3).mean_dim(2).reshape([batch, channels])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_match_lite0() {
        let specs = block_specs();
        assert_eq!(specs.len(), NUM_BLOCKS);
        assert_eq!(specs[0].expand, 1);
        assert_eq!(specs[15].output, 320);
        assert_eq!(activation_shape(0, 224), [32, 112, 112]);
        assert_eq!(activation_shape(15, 224), [192, 7, 7]);
        assert_eq!(activation_shape(16, 224), [320, 7, 7]);
        assert_eq!(activation_shape(11, 64), [112, 4, 4]);
    }

    #[test]
    fn shapes_flow_through_the_split() {
        let device = Device::flex();
        let net = EfficientNetLite0Config::new().init(&device);
        let x = Tensor::<4>::zeros([2, 3, 64, 64], &device);
        let act = net.forward_bottom(x.clone(), 14);
        assert_eq!(act.dims(), [2, 192, 2, 2]);
        assert_eq!(act.dims()[1..], activation_shape(14, 64));
        assert_eq!(net.forward_top(act, 14).dims(), [2, FEATURES]);
        assert_eq!(net.forward(x).dims(), [2, 1000]);
    }
}
