//! The transfer model: (part of) the Lite0 backbone, global average pooling, dropout and a new
//! `Linear(1280, n_classes)` head.
//!
//! The same struct serves three roles: the trainable top when only blocks `k..16` are
//! unfrozen (no stem, inputs are cached activations), the full network for whole-network
//! fine-tuning or the from-scratch baseline, and the saved classifier.

use burn::nn::conv::Conv2d;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu6;

use super::backbone::{EfficientNetLite0, EfficientNetLite0Config, FEATURES, MbConv, NUM_BLOCKS, pool};
use super::frozen_bn::FrozenBatchNorm;

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
    pub dropout: Dropout,
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
}

impl TransferModelConfig {
    /// The full network with random weights (the from-scratch baseline, or a shell to load a
    /// saved model into).
    pub fn init(&self, device: &Device) -> TransferModel {
        let backbone = EfficientNetLite0Config::new().init(device);
        self.from_backbone(&backbone, 0, device)
    }

    /// Blocks `first_block..16` of a (pretrained) backbone with a fresh head.
    pub fn from_backbone(&self, backbone: &EfficientNetLite0, first_block: usize, device: &Device) -> TransferModel {
        let stem = (first_block == 0).then(|| Stem { conv: backbone.conv_stem.clone(), bn: backbone.bn0.clone() });
        TransferModel {
            stem,
            blocks: backbone.blocks[first_block..].to_vec(),
            conv_head: backbone.conv_head.clone(),
            bn1: backbone.bn1.clone(),
            dropout: DropoutConfig::new(self.dropout).init(),
            head: LinearConfig::new(FEATURES, self.num_classes).init(device),
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
            x = relu6(stem.bn.forward(stem.conv.forward(x)));
        }
        for block in &self.blocks {
            x = block.forward(x);
        }
        pool(relu6(self.bn1.forward(self.conv_head.forward(x))))
    }

    /// Class logits (softmax is applied by the loss and by prediction).
    ///
    /// # Shapes
    /// - inputs as for [`Self::features`]
    /// - output `[batch, num_classes]`
    pub fn forward(&self, inputs: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.dropout.forward(self.features(inputs)))
    }

    /// Per-batch BatchNorm statistics everywhere (the from-scratch baseline).
    pub fn use_batch_statistics(self) -> Self {
        TransferModel {
            stem: self.stem.map(|s| Stem { conv: s.conv, bn: s.bn.use_batch_statistics() }),
            blocks: self.blocks.into_iter().map(MbConv::use_batch_statistics).collect(),
            bn1: self.bn1.use_batch_statistics(),
            ..self
        }
    }

    /// Puts the frozen bottom (blocks `0..first_block` and the stem of `backbone`) under this
    /// top, giving the full network that is saved and served.
    pub fn attach_bottom(self, backbone: &EfficientNetLite0) -> TransferModel {
        if self.first_block == 0 {
            return self;
        }
        let mut blocks = backbone.blocks[..self.first_block].to_vec();
        blocks.extend(self.blocks);
        debug_assert_eq!(blocks.len(), NUM_BLOCKS);
        TransferModel {
            stem: Some(Stem { conv: backbone.conv_stem.clone(), bn: backbone.bn0.clone() }),
            blocks,
            conv_head: self.conv_head,
            bn1: self.bn1,
            dropout: self.dropout,
            head: self.head,
            first_block: 0,
        }
    }
}
