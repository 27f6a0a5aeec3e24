//! Exporting a trained model for use outside transferd: the whole network as one ONNX file
//! (BatchNorm folded, calibrated softmax included, preprocessing documented in its
//! metadata), or its weights as safetensors with the model's `config.json` inside.
//!
//! Both return the file's bytes; where they go (an HTTP response, a file) is the caller's
//! business, so this layer knows nothing of either.

mod graph;
pub mod onnx;
pub mod proto;
pub mod safetensors;

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;

use super::artifact::ModelConfig;
use super::head::TransferModel;

/// The file formats a model exports to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    /// The whole network, preprocessed image in, calibrated probabilities out (opset 13).
    Onnx,
    /// The unfolded weights under their burn module paths, `config.json` in the metadata.
    Safetensors,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 2] = [ExportFormat::Onnx, ExportFormat::Safetensors];

    /// `onnx` or `safetensors`, as in URLs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Onnx => "onnx",
            ExportFormat::Safetensors => "safetensors",
        }
    }

    /// File extension, without the dot: the format's name.
    pub fn extension(self) -> &'static str {
        self.name()
    }

    /// Media type of the file (neither format has a registered one).
    pub fn media_type(self) -> &'static str {
        "application/octet-stream"
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A format name that is none of [`ExportFormat::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFormat(pub String);

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = ExportFormat::ALL.iter().map(|e| e.name()).collect();
        write!(
            f,
            "unknown export format {:?}; formats: {}",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownFormat {}

impl FromStr for ExportFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExportFormat::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| UnknownFormat(s.to_string()))
    }
}

/// Why a model could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The model is not something the format can represent (a partial network, per-batch
    /// BatchNorm, an unusable temperature, classes that do not match the head).
    #[error("model cannot be exported: {0}")]
    Unsupported(String),
    /// Reading a weight or writing the file failed.
    #[error("export failed: {0}")]
    Encode(String),
}

/// The file bytes of `model` (a full network: `first_block == 0`, with its stem) described
/// by `config`, in `format`.
pub fn export(
    model: &TransferModel,
    config: &ModelConfig,
    format: ExportFormat,
) -> Result<Vec<u8>, ExportError> {
    check(model, config)?;
    match format {
        // Folded here as predictions fold it; `onnx` folds again whatever this leaves.
        ExportFormat::Onnx => onnx::encode(&model.valid().folded(), config),
        ExportFormat::Safetensors => safetensors::encode(model, config),
    }
}

/// The file bytes of the model saved in `dir`, in `format` (loaded on the CPU: exporting
/// is a few reads of the weights).
pub fn export_dir(dir: &std::path::Path, format: ExportFormat) -> Result<Vec<u8>, ExportError> {
    let loaded = super::artifact::load(dir, &Device::flex())
        .map_err(|e| ExportError::Encode(format!("loading the model: {e}")))?;
    export(&loaded.model, &loaded.config, format)
}

/// What both formats need: the whole network, and a config that describes its head.
fn check(model: &TransferModel, config: &ModelConfig) -> Result<(), ExportError> {
    if model.first_block != 0 || model.stem.is_none() {
        return Err(ExportError::Unsupported(format!(
            "only a whole network exports; this one starts at block {} {} its stem",
            model.first_block,
            if model.stem.is_some() {
                "with"
            } else {
                "without"
            }
        )));
    }
    let [_, outputs] = model.head.weight.dims();
    if outputs != config.classes.len() {
        return Err(ExportError::Unsupported(format!(
            "the head has {outputs} outputs but the config names {} classes",
            config.classes.len()
        )));
    }
    Ok(())
}

/// The values of a float tensor, row-major, as f32.
fn read<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>, ExportError> {
    tensor
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| ExportError::Encode(format!("reading a weight: {e}")))
}

/// A `config.json` for tests: `classes`, Lite0 at `input_size`, temperature `temperature`.
#[cfg(test)]
pub(crate) fn test_config(classes: &[&str], input_size: usize, temperature: f64) -> ModelConfig {
    use super::backbone::Backbone;
    use super::config::TrainConfig;
    use super::preprocess::Preprocessing;

    ModelConfig {
        format_version: super::artifact::FORMAT_VERSION,
        transferd_version: env!("CARGO_PKG_VERSION").to_string(),
        backbone: Backbone::Lite0,
        backbone_weights_sha256: "0".repeat(64),
        classes: classes.iter().map(|c| c.to_string()).collect(),
        preprocessing: Preprocessing::for_size(input_size),
        dropout: 0.2,
        temperature,
        seed: 7,
        training: TrainConfig::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::head::TransferModelConfig;

    #[test]
    fn formats_parse_by_name_and_list_the_valid_ones() {
        for format in ExportFormat::ALL {
            assert_eq!(format.name().parse::<ExportFormat>(), Ok(format));
        }
        let err = "pth".parse::<ExportFormat>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown export format \"pth\"; formats: onnx, safetensors"
        );
        assert!("ONNX".parse::<ExportFormat>().is_err());
    }

    #[test]
    fn partial_networks_and_mismatched_configs_are_refused() {
        let model = TransferModelConfig::new(2).init(&Device::flex());
        let config = test_config(&["a", "b"], 32, 1.0);
        for format in ExportFormat::ALL {
            let top = model.top(3);
            assert!(matches!(
                export(&top, &config, format),
                Err(ExportError::Unsupported(_))
            ));
            let three = test_config(&["a", "b", "c"], 32, 1.0);
            assert!(matches!(
                export(&model, &three, format),
                Err(ExportError::Unsupported(_))
            ));
        }
    }
}
