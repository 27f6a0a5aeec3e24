//! EfficientNet-Lite0, Lite1 and Lite2, the pretrained ImageNet backbones, as a burn module.
//!
//! The field names mirror lukemelas' EfficientNet-PyTorch (minus the leading underscores) so
//! that the published `.pth` loads with a single key-remapping rule (see `weights.rs`).
//! EfficientNet-Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 everywhere,
//! and a stem and head kept at 32 and 1280 channels whatever the scaling. Lite1 and Lite2
//! deepen the middle stages (21 blocks against 16) and Lite2 widens them by 1.1. Every conv uses TensorFlow "SAME" padding because the weights were trained
//! in TensorFlow: with symmetric padding the strided convs would shift the features by a pixel.
//!
//! The network is split at a block boundary so that training can run the frozen bottom once,
//! cache its activations and fine-tune only the top (`forward_bottom` / `forward_top`).

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::frozen_bn::{FrozenBatchNorm, FrozenBatchNormConfig};
use super::fused::{After, conv_bn, fold};

/// Channels of the pooled feature vector that the transfer head sees.
pub const FEATURES: usize = 1280;
/// Channels out of the stem, the same for every Lite variant.
const STEM: usize = 32;
/// The TensorFlow EfficientNet BatchNorm epsilon (recorded by the safetensors export).
pub(crate) const BN_EPS: f64 = 1e-3;

/// The pretrained backbones on offer.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Backbone {
    /// EfficientNet-Lite0 at 224 px: the fastest.
    #[serde(alias = "efficientnet-lite0")]
    Lite0,
    /// EfficientNet-Lite1 at 240 px: deeper.
    #[serde(alias = "efficientnet-lite1")]
    Lite1,
    /// EfficientNet-Lite2 at 260 px: deeper and wider.
    #[serde(alias = "efficientnet-lite2")]
    Lite2,
}

/// Per stage: (kernel, stride, expand ratio); the same for every variant.
const STAGE_SHAPES: [(usize, usize, usize); 7] = [
    (3, 1, 1),
    (3, 2, 6),
    (5, 2, 6),
    (3, 2, 6),
    (5, 1, 6),
    (5, 2, 6),
    (3, 1, 6),
];

impl Backbone {
    pub const ALL: [Backbone; 3] = [Backbone::Lite0, Backbone::Lite1, Backbone::Lite2];

    /// `lite0`, `lite1` or `lite2`, as in configs and URLs.
    pub fn name(self) -> &'static str {
        match self {
            Backbone::Lite0 => "lite0",
            Backbone::Lite1 => "lite1",
            Backbone::Lite2 => "lite2",
        }
    }

    /// The input side the ImageNet weights were trained at.
    pub fn input_size(self) -> usize {
        match self {
            Backbone::Lite0 => 224,
            Backbone::Lite1 => 240,
            Backbone::Lite2 => 260,
        }
    }

    /// Repeats and output channels of each stage (the published depth and width scaling,
    /// with the first and last stages' repeats fixed as the Lite builder fixes them).
    fn stages(self) -> ([usize; 7], [usize; 7]) {
        const LITE0_WIDTHS: [usize; 7] = [16, 24, 40, 80, 112, 192, 320];
        match self {
            Backbone::Lite0 => ([1, 2, 2, 3, 3, 4, 1], LITE0_WIDTHS),
            Backbone::Lite1 => ([1, 3, 3, 4, 4, 5, 1], LITE0_WIDTHS),
            Backbone::Lite2 => ([1, 3, 3, 4, 4, 5, 1], [16, 24, 48, 88, 120, 208, 352]),
        }
    }

    /// Number of MBConv blocks.
    pub fn num_blocks(self) -> usize {
        self.stages().0.iter().sum()
    }
}

impl std::fmt::Display for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The shape of one MBConv block, expanded from `STAGES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    pub kernel: usize,
    pub stride: usize,
    pub expand: usize,
    pub input: usize,
    pub output: usize,
}

/// Every block in order: repeats after the first of a stage take stride 1 and the stage's
/// output width as input, exactly as the reference implementation builds them.
pub fn block_specs(backbone: Backbone) -> Vec<BlockSpec> {
    let (repeats, widths) = backbone.stages();
    let mut specs = Vec::with_capacity(backbone.num_blocks());
    let mut input = STEM;
    for ((&(kernel, stride, expand), &n), &output) in STAGE_SHAPES.iter().zip(&repeats).zip(&widths)
    {
        for r in 0..n {
            specs.push(BlockSpec {
                kernel,
                stride: if r == 0 { stride } else { 1 },
                expand,
                input: if r == 0 { input } else { output },
                output,
            });
        }
        input = output;
    }
    specs
}

/// Channels and spatial divisor of the activation entering block `k` (`k` equal to the
/// block count means the input of the head conv).
pub fn activation_shape(backbone: Backbone, k: usize, input_size: usize) -> [usize; 3] {
    let specs = block_specs(backbone);
    let blocks = specs.len();
    let (channels, stride) = if k == blocks {
        (specs[blocks - 1].output, 32)
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

    /// The weights of its convs, in order (for tests that compare gradients).
    pub fn conv_weights(&self) -> Vec<Tensor<4>> {
        let expand = self.expand_conv.iter().map(|c| c.weight.val());
        let rest = [&self.depthwise_conv, &self.project_conv].map(|c| c.weight.val());
        expand.chain(rest).collect()
    }

    /// BatchNorm's affine parameters (scale and shift of each of its BatchNorms), in order.
    pub fn norm_weights(&self) -> Vec<Tensor<1>> {
        let norms = self.bn0.iter().chain([&self.bn1, &self.bn2]);
        norms
            .flat_map(|bn| [bn.weight.val(), bn.bias.val()])
            .collect()
    }

    /// Its layers, for code that walks them one by one (`export`): the expand conv and its
    /// BatchNorm (absent when the expand ratio is 1), the depthwise and project convs with
    /// theirs, and whether the block adds its input to the output.
    #[allow(clippy::type_complexity)]
    pub(crate) fn parts(
        &self,
    ) -> (
        Option<(&Conv2d, &FrozenBatchNorm)>,
        (&Conv2d, &FrozenBatchNorm),
        (&Conv2d, &FrozenBatchNorm),
        bool,
    ) {
        (
            self.expand_conv.as_ref().zip(self.bn0.as_ref()),
            (&self.depthwise_conv, &self.bn1),
            (&self.project_conv, &self.bn2),
            self.skip,
        )
    }

    /// This block with every BatchNorm folded into its conv (inference only, see `fused`).
    pub fn folded(self) -> Self {
        let (expand_conv, bn0) = match (self.expand_conv, self.bn0) {
            (Some(conv), Some(bn)) => {
                let (conv, bn) = fold(bn, conv);
                (Some(conv), Some(bn))
            }
            other => other,
        };
        let (depthwise_conv, bn1) = fold(self.bn1, self.depthwise_conv);
        let (project_conv, bn2) = fold(self.bn2, self.project_conv);
        Self {
            expand_conv,
            bn0,
            depthwise_conv,
            bn1,
            project_conv,
            bn2,
            skip: self.skip,
        }
    }

    /// # Shapes
    /// - input `[batch, in, h, w]`
    /// - output `[batch, out, h / stride, w / stride]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let (Some(conv), Some(bn)) = (&self.expand_conv, &self.bn0) {
            x = conv_bn(conv, bn, x, After::Relu6, None);
        }
        x = conv_bn(&self.depthwise_conv, &self.bn1, x, After::Relu6, None);
        let skip = self.skip.then_some(input);
        conv_bn(&self.project_conv, &self.bn2, x, After::Nothing, skip)
    }
}

/// Configuration of the backbone: the variant and the size of the ImageNet classifier.
#[derive(Config, Debug)]
pub struct EfficientNetLiteConfig {
    pub backbone: Backbone,
    /// Outputs of the original classifier; 1000 for the ImageNet weights.
    #[config(default = 1000)]
    pub num_classes: usize,
    /// Dropout before the classifier, as in the reference (only active when training).
    #[config(default = 0.2)]
    pub dropout: f64,
}

/// An EfficientNet-Lite with its ImageNet classifier (`fc`).
#[derive(Module, Debug)]
pub struct EfficientNetLite {
    pub conv_stem: Conv2d,
    pub bn0: FrozenBatchNorm,
    pub blocks: Vec<MbConv>,
    pub conv_head: Conv2d,
    pub bn1: FrozenBatchNorm,
    pub dropout: Dropout,
    pub fc: Linear,
}

impl EfficientNetLiteConfig {
    /// A randomly initialised network; load the pretrained weights into it with `weights::load`.
    pub fn init(&self, device: &Device) -> EfficientNetLite {
        let specs = block_specs(self.backbone);
        let top = specs.last().expect("blocks").output;
        EfficientNetLite {
            conv_stem: conv(3, STEM, 3, 2, 1, device),
            bn0: bn(STEM, device),
            blocks: specs.into_iter().map(|s| MbConv::new(s, device)).collect(),
            conv_head: conv(top, FEATURES, 1, 1, 1, device),
            bn1: bn(FEATURES, device),
            dropout: DropoutConfig::new(self.dropout).init(),
            fc: LinearConfig::new(FEATURES, self.num_classes).init(device),
        }
    }
}

impl EfficientNetLite {
    /// Which variant this is, told by its depth and width.
    pub fn kind(&self) -> Backbone {
        let top = self.conv_head.weight.dims()[1];
        *Backbone::ALL
            .iter()
            .find(|b| {
                b.num_blocks() == self.blocks.len()
                    && block_specs(**b).last().unwrap().output == top
            })
            .expect("one of the offered variants")
    }

    /// Runs the stem and blocks `0..k`: the frozen part when the blocks from `k` on train.
    ///
    /// # Shapes
    /// - images `[batch, 3, s, s]`, normalised as in `preprocess`
    /// - output `[batch, c_k, s / d_k, s / d_k]`, see [`activation_shape`]
    pub fn forward_bottom(&self, images: Tensor<4>, k: usize) -> Tensor<4> {
        let mut x = conv_bn(&self.conv_stem, &self.bn0, images, After::Relu6, None);
        for block in &self.blocks[..k] {
            x = block.forward(x);
        }
        x
    }

    /// Runs blocks `k..`, the head conv and global average pooling.
    ///
    /// # Shapes
    /// - activations `[batch, c_k, h, w]` from [`Self::forward_bottom`]
    /// - output `[batch, 1280]`
    pub fn forward_top(&self, activations: Tensor<4>, k: usize) -> Tensor<2> {
        let mut x = activations;
        for block in &self.blocks[k..] {
            x = block.forward(x);
        }
        pool(conv_bn(&self.conv_head, &self.bn1, x, After::Relu6, None))
    }

    /// This network with every BatchNorm folded into its conv: what predictions and the
    /// frozen pass run (see `fused`). Never saved, never trained.
    pub fn folded(self) -> Self {
        let (conv_stem, bn0) = fold(self.bn0, self.conv_stem);
        let (conv_head, bn1) = fold(self.bn1, self.conv_head);
        Self {
            conv_stem,
            bn0,
            blocks: self.blocks.into_iter().map(MbConv::folded).collect(),
            conv_head,
            bn1,
            ..self
        }
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

/// Global average pooling: `[batch, c, h, w]` to `[batch, c]`; on flex one op that reads the
/// fine-tune's channel-major activations where they lie (`channel_ops`).
pub fn pool(x: Tensor<4>) -> Tensor<2> {
    if super::fused::own_ops(&x.device()) {
        return super::channel_ops::pool(x);
    }
    let [batch, channels, _, _] = x.dims();
    x.mean_dim(3).mean_dim(2).reshape([batch, channels])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_match_lite0() {
        let specs = block_specs(Backbone::Lite0);
        assert_eq!(specs.len(), 16);
        assert_eq!(specs[0].expand, 1);
        assert_eq!(specs[15].output, 320);
        assert_eq!(activation_shape(Backbone::Lite0, 0, 224), [32, 112, 112]);
        assert_eq!(activation_shape(Backbone::Lite0, 15, 224), [192, 7, 7]);
        assert_eq!(activation_shape(Backbone::Lite0, 16, 224), [320, 7, 7]);
        assert_eq!(activation_shape(Backbone::Lite0, 11, 64), [112, 4, 4]);
        assert_eq!(Backbone::Lite1.num_blocks(), 21);
        assert_eq!(Backbone::Lite2.num_blocks(), 21);
        assert_eq!(block_specs(Backbone::Lite2)[20].output, 352);
        assert_eq!(activation_shape(Backbone::Lite1, 21, 240), [320, 8, 8]);
    }

    #[test]
    fn shapes_flow_through_the_split() {
        let device = Device::flex();
        let net = EfficientNetLiteConfig::new(Backbone::Lite0).init(&device);
        assert_eq!(net.kind(), Backbone::Lite0);
        let x = Tensor::<4>::zeros([2, 3, 64, 64], &device);
        let act = net.forward_bottom(x.clone(), 14);
        assert_eq!(act.dims(), [2, 192, 2, 2]);
        assert_eq!(act.dims()[1..], activation_shape(Backbone::Lite0, 14, 64));
        assert_eq!(net.forward_top(act, 14).dims(), [2, FEATURES]);
        assert_eq!(net.forward(x).dims(), [2, 1000]);
    }
}
