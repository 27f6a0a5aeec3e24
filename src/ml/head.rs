//! The transfer model: (part of) an EfficientNet-Lite backbone, global average pooling, dropout and a new
//! `Linear(1280, n_classes)` head.
//!
//! The same struct serves three roles: the trainable top when only blocks `k..16` are
//! unfrozen (no stem, inputs are cached activations), the full network for whole-network
//! fine-tuning or the from-scratch baseline, and the saved classifier.

use burn::nn::conv::Conv2d;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;

use super::backbone::{Backbone, EfficientNetLite, EfficientNetLiteConfig, FEATURES, MbConv, pool};
use super::frozen_bn::FrozenBatchNorm;
use super::fused::{After, conv_bn, fold};

/// The stem conv and its BatchNorm.
#[derive(Module, Debug)]
pub struct Stem {
    pub conv: Conv2d,
    pub bn: FrozenBatchNorm,
}

/// Backbone from block `first_block` on, plus the classification head.
#[derive(Module, Debug)]
pub struct TransferModel {
    pub stem: Option<Stem>,
    pub blocks: Vec<MbConv>,
    pub conv_head: Conv2d,
    pub bn1: FrozenBatchNorm,
    /// Dropout rate before the head. Training draws the masks from the run's own seeded RNG
    /// (see [`dropout_mask`]) rather than the backend's global one, so runs are reproducible
    /// even when several train in one process.
    pub dropout: f64,
    pub head: Linear,
    /// Index of the first block held; 0 for the full network.
    pub first_block: usize,
}

/// Shape of a transfer model; enough to rebuild it before loading saved weights.
#[derive(Config, Debug)]
pub struct TransferModelConfig {
    pub num_classes: usize,
    #[config(default = 0.2)]
    pub dropout: f64,
    #[config(default = "Backbone::Lite0")]
    pub backbone: Backbone,
}

impl TransferModelConfig {
    /// The full network with random weights (the from-scratch baseline, or a shell to load a
    /// saved model into).
    pub fn init(&self, device: &Device) -> TransferModel {
        let backbone = EfficientNetLiteConfig::new(self.backbone).init(device);
        self.from_backbone(&backbone, 0, device)
    }

    /// Blocks from `first_block` on of a (pretrained) backbone with a fresh head.
    pub fn from_backbone(
        &self,
        backbone: &EfficientNetLite,
        first_block: usize,
        device: &Device,
    ) -> TransferModel {
        let stem = (first_block == 0).then(|| Stem {
            conv: backbone.conv_stem.clone(),
            bn: backbone.bn0.clone(),
        });
        TransferModel {
            stem,
            blocks: backbone.blocks[first_block..].to_vec(),
            conv_head: backbone.conv_head.clone(),
            bn1: backbone.bn1.clone(),
            dropout: self.dropout,
            // A zero head starts every class at equal probability (loss ln n) instead of the
            // large random logits that 1280 ReLU6 features would give, which steadies warm-up.
            head: LinearConfig::new(FEATURES, self.num_classes)
                .with_initializer(Initializer::Zeros)
                .init(device),
            first_block,
        }
    }
}

impl TransferModel {
    /// Pooled features, before dropout.
    ///
    /// # Shapes
    /// - inputs `[batch, 3, s, s]` images for the full network, or `[batch, c_k, h, w]`
    ///   activations entering block `first_block`
    /// - output `[batch, 1280]`
    pub fn features(&self, inputs: Tensor<4>) -> Tensor<2> {
        let mut x = inputs;
        if let Some(stem) = &self.stem {
            x = conv_bn(&stem.conv, &stem.bn, x, After::Relu6, None);
        }
        for block in &self.blocks {
            x = block.forward(x);
        }
        pool(conv_bn(&self.conv_head, &self.bn1, x, After::Relu6, None))
    }

    /// This model with every BatchNorm folded into its conv, for inference only (see
    /// `fused`): predictions load a model once and run it many times. Never saved or trained.
    pub fn folded(self) -> Self {
        let (conv_head, bn1) = fold(self.bn1, self.conv_head);
        TransferModel {
            stem: self.stem.map(|s| {
                let (conv, bn) = fold(s.bn, s.conv);
                Stem { conv, bn }
            }),
            blocks: self.blocks.into_iter().map(MbConv::folded).collect(),
            conv_head,
            bn1,
            ..self
        }
    }

    /// Class logits for inference (softmax is applied by the loss and by prediction).
    ///
    /// # Shapes
    /// - inputs as for [`Self::features`]
    /// - output `[batch, num_classes]`
    pub fn forward(&self, inputs: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.features(inputs))
    }

    /// Class logits for training, with an inverted-dropout `mask` on the pooled features.
    ///
    /// # Shapes
    /// - inputs as for [`Self::features`]
    /// - mask `[batch, 1280]` of 0 and `1 / (1 - p)`
    /// - output `[batch, num_classes]`
    pub fn forward_train(&self, inputs: Tensor<4>, mask: Tensor<2>) -> Tensor<2> {
        self.head.forward(self.features(inputs) * mask)
    }

    /// Per-batch BatchNorm statistics everywhere (the from-scratch baseline).
    pub fn use_batch_statistics(self) -> Self {
        TransferModel {
            stem: self.stem.map(|s| Stem {
                conv: s.conv,
                bn: s.bn.use_batch_statistics(),
            }),
            blocks: self
                .blocks
                .into_iter()
                .map(MbConv::use_batch_statistics)
                .collect(),
            bn1: self.bn1.use_batch_statistics(),
            ..self
        }
    }

    /// The part of this full network from block `k` on, sharing its tensors: what runs on
    /// activations cached at block `k` (the whole network when `k` is 0).
    pub fn top(&self, k: usize) -> TransferModel {
        debug_assert_eq!(self.first_block, 0, "top() splits a full network");
        if k == 0 {
            return self.clone();
        }
        TransferModel {
            stem: None,
            blocks: self.blocks[k..].to_vec(),
            first_block: k,
            ..self.clone()
        }
    }

    /// Puts the frozen bottom (blocks `0..first_block` and the stem of `backbone`) under this
    /// top, giving the full network that is saved and served.
    pub fn attach_bottom(self, backbone: &EfficientNetLite) -> TransferModel {
        if self.first_block == 0 {
            return self;
        }
        let mut blocks = backbone.blocks[..self.first_block].to_vec();
        blocks.extend(self.blocks);
        debug_assert_eq!(blocks.len(), backbone.blocks.len());
        TransferModel {
            stem: Some(Stem {
                conv: backbone.conv_stem.clone(),
                bn: backbone.bn0.clone(),
            }),
            blocks,
            conv_head: self.conv_head,
            bn1: self.bn1,
            dropout: self.dropout,
            head: self.head,
            first_block: 0,
        }
    }
}

/// An inverted-dropout mask `[rows, cols]` drawn from `rng`: each entry is 0 with
/// probability `p`, else `1 / (1 - p)`.
pub fn dropout_mask(
    rng: &mut impl rand::Rng,
    rows: usize,
    cols: usize,
    p: f64,
    device: &Device,
) -> Tensor<2> {
    let keep = (1.0 / (1.0 - p)) as f32;
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| if rng.random_bool(p) { 0.0 } else { keep })
        .collect();
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}
