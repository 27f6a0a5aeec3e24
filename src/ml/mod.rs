//! The learning core, split the way burn's guide splits it: model (`backbone`, `head`),
//! data (`data`, `preprocess`, `augment`, `cache`), training (`config`, `train`,
//! `evaluate`) and inference (`infer`, `artifact`, `imagenet`, with the fused CPU kernels in
//! `fused` and `kernels`).

pub mod artifact;
pub mod audit;
pub mod augment;
pub mod backbone;
pub mod backbones;
pub mod bias_relu6;
pub mod cache;
pub mod channel_ops;
pub mod config;
pub mod data;
pub mod depthwise_grad;
pub mod device;
pub mod evaluate;
pub mod events;
pub mod export;
mod flex_tensor;
pub mod frozen_bn;
pub mod fused;
pub mod fused_ops;
pub mod head;
pub mod head_fit;
pub mod head_phase;
pub mod imagenet;
pub mod infer;
pub mod kernels;
pub mod lanes;
pub mod ood;
pub mod phases;
pub mod plan;
pub mod pointwise_grad;
pub mod preprocess;
pub mod resize;
pub mod softmax;
pub mod streamed;
pub mod train;
pub mod weights;
