//! transferd turns a folder (later: a zip upload) of labelled photos into an image classifier
//! by transfer learning from a pretrained EfficientNet-Lite0, then serves predictions.
//!
//! - [`ml`]: the learning core (backbone, data, training, evaluation, inference).
//! - [`cli`]: the command-line interface over it.

pub mod cli;
pub mod ml;
