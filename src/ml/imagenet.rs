//! The sanity tool: ImageNet top-5 with the backbone's original 1000-class head.
//!
//! Labels are the standard ImageNet-1k class names (credited in the README).

use burn::prelude::*;
use serde::Serialize;

use super::backbone::EfficientNetLite;
use super::evaluate::softmax;
use super::preprocess::{self, ImageRejection, Preprocessing};

const LABELS: &str = include_str!("imagenet_labels.txt");

/// Name of ImageNet class `index`.
pub fn label(index: usize) -> &'static str {
    LABELS.lines().nth(index).unwrap_or("unknown")
}

/// One of the top-5 classes.
#[derive(Debug, Clone, Serialize)]
pub struct Top {
    pub class: usize,
    pub label: &'static str,
    pub probability: f32,
}

/// The five most probable ImageNet classes of an encoded image at 224 px.
pub fn top5(
    backbone: &EfficientNetLite,
    bytes: &[u8],
    device: &Device,
) -> Result<Vec<Top>, ImageRejection> {
    let image = preprocess::decode(bytes, preprocess::DEFAULT_MAX_DIMENSION)?;
    let size = backbone.kind().input_size();
    let view = preprocess::eval_view(&image, &Preprocessing::for_size(size));
    let x = Tensor::<4>::from_data(TensorData::new(view, [1, 3, size, size]), device);
    let logits = backbone.forward(x).into_data();
    let probs = softmax(logits.as_slice::<f32>().expect("float32"), 1.0);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    Ok(order
        .into_iter()
        .take(5)
        .map(|c| Top {
            class: c,
            label: label(c),
            probability: probs[c],
        })
        .collect())
}
