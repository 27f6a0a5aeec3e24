//! The safetensors export: every weight of the network as trained (BatchNorm not folded)
//! under its burn module path, with the model's `config.json` in the header, so that
//! another tool can rebuild the classifier, or fine-tune it further, from one file.
//!
//! The format (huggingface/safetensors) is small enough to write by hand: an 8-byte
//! little-endian header length, a JSON header mapping each tensor name to its dtype, shape
//! and `[begin, end)` byte offsets into the data, plus `__metadata__` string pairs, then the
//! data, little-endian. The header is padded with spaces to a multiple of 8 so the data
//! stays aligned, as the reference writer pads it.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use serde_json::{Map, Value, json};

use super::{ExportError, read};
use crate::ml::artifact::ModelConfig;
use crate::ml::backbone::BN_EPS;
use crate::ml::frozen_bn::FrozenBatchNorm;
use crate::ml::head::TransferModel;

/// `format` in the header's metadata.
pub const FORMAT: &str = "transferd";

/// How to read the tensors back, for the header's metadata.
const LAYOUT: &str = "float32, row-major. Convs: weight [out, in / groups, kh, kw], \
    TensorFlow SAME padding (odd pixel at the bottom/right), each followed by its BatchNorm \
    y = (x - running_mean) / sqrt(running_var + bn_epsilon) * weight + bias, then ReLU6 \
    except after a project conv; a BatchNorm without tensors here is already folded into \
    the conv before it. Head: logits = pooled_features @ head.weight + head.bias with \
    head.weight [in, out] (burn's Linear layout, the transpose of PyTorch's); probabilities \
    = softmax(logits / config.temperature).";

/// One tensor on its way into the file.
struct Entry {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// The `.safetensors` file of `model`, a whole network (checked by `export::export`).
pub fn encode(model: &TransferModel, config: &ModelConfig) -> Result<Vec<u8>, ExportError> {
    let tensors = entries(model)?;
    let mut header = Map::new();
    let config_json =
        serde_json::to_string(config).map_err(|e| ExportError::Encode(format!("config: {e}")))?;
    header.insert(
        "__metadata__".into(),
        json!({
            "config": config_json,
            "format": FORMAT,
            "bn_epsilon": BN_EPS.to_string(),
            "layout": LAYOUT,
        }),
    );
    let mut offset = 0;
    for entry in &tensors {
        let end = offset + 4 * entry.values.len();
        let described = json!({
            "dtype": "F32",
            "shape": entry.shape,
            "data_offsets": [offset, end],
        });
        if header.insert(entry.name.clone(), described).is_some() {
            return Err(ExportError::Encode(format!("{} written twice", entry.name)));
        }
        offset = end;
    }
    let mut text = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| ExportError::Encode(format!("header: {e}")))?;
    text.resize(text.len().next_multiple_of(8), b' ');

    let mut out = Vec::with_capacity(8 + text.len() + offset);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    for entry in &tensors {
        out.extend(entry.values.iter().flat_map(|v| v.to_le_bytes()));
    }
    debug_assert_eq!(out.len(), 8 + text.len() + offset);
    Ok(out)
}

/// Every tensor, in the network's order, named by its burn module path.
fn entries(model: &TransferModel) -> Result<Vec<Entry>, ExportError> {
    let mut w = Walk::default();
    if let Some(stem) = &model.stem {
        w.conv("stem.conv", &stem.conv)?;
        w.bn("stem.bn", &stem.bn)?;
    }
    for (i, block) in model.blocks.iter().enumerate() {
        let p = format!("blocks.{}", model.first_block + i);
        let (expand, (depthwise, bn1), (project, bn2), _) = block.parts();
        if let Some((conv, bn0)) = expand {
            w.conv(&format!("{p}.expand_conv"), conv)?;
            w.bn(&format!("{p}.bn0"), bn0)?;
        }
        w.conv(&format!("{p}.depthwise_conv"), depthwise)?;
        w.bn(&format!("{p}.bn1"), bn1)?;
        w.conv(&format!("{p}.project_conv"), project)?;
        w.bn(&format!("{p}.bn2"), bn2)?;
    }
    w.conv("conv_head", &model.conv_head)?;
    w.bn("bn1", &model.bn1)?;
    w.param("head.weight", &model.head.weight)?;
    if let Some(bias) = &model.head.bias {
        w.param("head.bias", bias)?;
    }
    Ok(w.entries)
}

#[derive(Default)]
struct Walk {
    entries: Vec<Entry>,
}

impl Walk {
    fn param<const D: usize>(
        &mut self,
        name: &str,
        param: &Param<Tensor<D>>,
    ) -> Result<(), ExportError> {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        self.entries.push(Entry {
            name: name.to_string(),
            shape,
            values: read(tensor)?,
        });
        Ok(())
    }

    fn conv(&mut self, prefix: &str, conv: &Conv2d) -> Result<(), ExportError> {
        self.param(&format!("{prefix}.weight"), &conv.weight)?;
        match &conv.bias {
            Some(bias) => self.param(&format!("{prefix}.bias"), bias),
            None => Ok(()),
        }
    }

    fn bn(&mut self, prefix: &str, bn: &FrozenBatchNorm) -> Result<(), ExportError> {
        // Folded: the conv's weights and bias already apply it, so its tensors would be
        // applied twice by a reader.
        if bn.is_folded() {
            return Ok(());
        }
        self.param(&format!("{prefix}.weight"), &bn.weight)?;
        self.param(&format!("{prefix}.bias"), &bn.bias)?;
        self.param(&format!("{prefix}.running_mean"), &bn.running_mean)?;
        self.param(&format!("{prefix}.running_var"), &bn.running_var)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::export::{ExportFormat, export, test_config};
    use crate::ml::head::TransferModelConfig;

    /// The header parsed back: length, JSON, metadata, and offsets that tile the data.
    #[test]
    fn header_describes_contiguous_tensors_and_carries_the_config() {
        let device = Device::flex();
        let model = TransferModelConfig::new(3).init(&device);
        let config = test_config(&["a", "b", "c"], 64, 1.5);
        let bytes = export(&model, &config, ExportFormat::Safetensors).unwrap();

        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];

        let meta = header["__metadata__"].as_object().unwrap();
        assert_eq!(meta["format"], FORMAT);
        assert_eq!(meta["bn_epsilon"], "0.001");
        let back: ModelConfig = serde_json::from_str(meta["config"].as_str().unwrap()).unwrap();
        assert_eq!(back, config);

        let mut spans = Vec::new();
        for (name, t) in header.iter().filter(|(k, _)| *k != "__metadata__") {
            assert_eq!(t["dtype"], "F32", "{name}");
            let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
            let [begin, end]: [usize; 2] =
                serde_json::from_value(t["data_offsets"].clone()).unwrap();
            assert_eq!(end - begin, 4 * shape.iter().product::<usize>(), "{name}");
            spans.push((begin, end, name.as_str(), shape));
        }
        spans.sort();
        let mut at = 0;
        for (begin, end, name, _) in &spans {
            assert_eq!(
                *begin, at,
                "{name} does not start where the last tensor ended"
            );
            at = *end;
        }
        assert_eq!(at, data.len());

        // 49 convs, each with a BatchNorm's 4 tensors, and the head's weight and bias: the
        // 247 tensors of the pretrained file, with the new head in place of `fc`.
        assert_eq!(spans.len(), 247);
        let find = |name: &str| {
            let span = spans.iter().find(|s| s.2 == name);
            span.map(|s| (s.0, s.1, s.3.clone()))
        };
        assert_eq!(find("stem.conv.weight").unwrap().2, [32, 3, 3, 3]);
        assert_eq!(find("head.weight").unwrap().2, [1280, 3]);
        assert_eq!(find("blocks.15.bn2.running_var").unwrap().2, [320]);
        assert!(
            find("blocks.0.expand_conv.weight").is_none(),
            "block 0 does not expand"
        );
        assert!(find("blocks.1.expand_conv.weight").is_some());

        // The bytes are the model's own values.
        let (begin, end, _) = find("stem.conv.weight").unwrap();
        let stored: Vec<f32> = data[begin..end]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let stem = &model.stem.as_ref().unwrap().conv.weight;
        assert_eq!(stored, stem.val().into_data().try_to_vec::<f32>().unwrap());

        // The same model gives the same file.
        assert_eq!(
            export(&model, &config, ExportFormat::Safetensors).unwrap(),
            bytes
        );
    }
}
