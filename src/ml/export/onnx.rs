//! The ONNX export: the whole network as one opset-13 graph, from a preprocessed image to
//! calibrated class probabilities, so that a runtime needs no code of ours beyond the
//! preprocessing, which the model's metadata spells out.
//!
//! BatchNorm is folded into each conv and the calibration temperature into the head, as
//! prediction folds them, so the graph is Conv/Clip/Add throughout, then pooling, one Gemm
//! and the softmax. The "unknown" (out-of-distribution) answer that transferd's own
//! predictions can give is not part of the graph.

use prost::Message;

use super::graph::{Dim, Graph, RELU6_MAX, RELU6_MIN, float_value, int};
use super::proto::{GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto};
use super::{ExportError, read};
use crate::ml::artifact::ModelConfig;
use crate::ml::head::TransferModel;
use crate::ml::preprocess::Preprocessing;

/// ONNX IR version 8 (onnx 1.10): every runtime of the last years reads it.
pub const IR_VERSION: i64 = 8;
/// The default-domain operator set: 13 has `Clip` with input bounds and `Softmax` over one
/// axis, all the graph needs.
pub const OPSET: i64 = 13;
/// The graph input: preprocessed images `[N, 3, S, S]`.
pub const INPUT: &str = "image";
/// The graph's first output: calibrated probabilities `[N, classes]`.
pub const PROBABILITIES: &str = "probabilities";
/// The graph's second output: the logits already divided by the temperature `[N, classes]`.
pub const LOGITS: &str = "logits";
/// Name of the batch axis.
const BATCH: &str = "N";

/// The `.onnx` file of `model`, a whole network (checked by the caller, `export::export`).
pub fn encode(model: &TransferModel, config: &ModelConfig) -> Result<Vec<u8>, ExportError> {
    Ok(model_proto(model, config)?.encode_to_vec())
}

/// The ONNX model of `model` as a message (what [`encode`] serialises).
pub fn model_proto(model: &TransferModel, config: &ModelConfig) -> Result<ModelProto, ExportError> {
    let stem = model
        .stem
        .as_ref()
        .ok_or_else(|| ExportError::Unsupported("the network has no stem".into()))?;
    let temperature = config.temperature;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(ExportError::Unsupported(format!(
            "calibration temperature {temperature} is not a positive number"
        )));
    }
    let side = config.preprocessing.input_size;
    let classes = config.classes.len();

    let mut g = Graph::default();
    g.constant(RELU6_MIN, &[], &[0.0]);
    g.constant(RELU6_MAX, &[], &[6.0]);
    let mut size = [side, side];
    let mut x = g.conv_bn("stem.conv", INPUT, &stem.conv, &stem.bn, &mut size)?;
    x = g.relu6("stem.relu6", &x);
    for (i, block) in model.blocks.iter().enumerate() {
        let p = format!("blocks.{}", model.first_block + i);
        let (expand, (depthwise, bn1), (project, bn2), skip) = block.parts();
        let input = x.clone();
        if let Some((conv, bn0)) = expand {
            x = g.conv_bn(&format!("{p}.expand_conv"), &x, conv, bn0, &mut size)?;
            x = g.relu6(&format!("{p}.expand_relu6"), &x);
        }
        x = g.conv_bn(
            &format!("{p}.depthwise_conv"),
            &x,
            depthwise,
            bn1,
            &mut size,
        )?;
        x = g.relu6(&format!("{p}.depthwise_relu6"), &x);
        x = g.conv_bn(&format!("{p}.project_conv"), &x, project, bn2, &mut size)?;
        if skip {
            x = g.node(
                "Add",
                &format!("{p}.add"),
                &[x.as_str(), input.as_str()],
                vec![],
            );
        }
    }
    x = g.conv_bn("conv_head", &x, &model.conv_head, &model.bn1, &mut size)?;
    x = g.relu6("conv_head.relu6", &x);
    x = g.node("GlobalAveragePool", "pool", &[x.as_str()], vec![]);
    x = g.node("Flatten", "flatten", &[x.as_str()], vec![int("axis", 1)]);

    // burn's Linear holds its weight as [in, out], which is Gemm's B without transposing.
    // Prediction divides the logits by the temperature; dividing B and C gives the same.
    let weight = model.head.weight.val();
    let dims = weight.dims();
    let scale = |v: f32| (v as f64 / temperature) as f32;
    let b: Vec<f32> = read(weight)?.into_iter().map(scale).collect();
    let b = g.constant("head.weight", &dims, &b);
    let mut gemm_inputs = vec![x.as_str(), b.as_str()];
    let c = match &model.head.bias {
        Some(bias) => {
            let c: Vec<f32> = read(bias.val())?.into_iter().map(scale).collect();
            Some(g.constant("head.bias", &[dims[1]], &c))
        }
        None => None,
    };
    if let Some(c) = &c {
        gemm_inputs.push(c.as_str());
    }
    let attributes = vec![int("transA", 0), int("transB", 0)];
    let logits = g.node("Gemm", LOGITS, &gemm_inputs, attributes);
    g.node(
        "Softmax",
        PROBABILITIES,
        &[logits.as_str()],
        vec![int("axis", 1)],
    );

    let input_doc = format!("preprocessed images: {}", describe(&config.preprocessing));
    let by_class = [Dim::Named(BATCH), Dim::Fixed(classes)];
    let graph = GraphProto {
        node: g.nodes,
        name: Some(format!("transferd_{}", config.backbone.name())),
        initializer: g.initializers,
        input: vec![float_value(
            INPUT,
            &[
                Dim::Named(BATCH),
                Dim::Fixed(3),
                Dim::Fixed(side),
                Dim::Fixed(side),
            ],
            &input_doc,
        )],
        output: vec![
            float_value(
                PROBABILITIES,
                &by_class,
                "softmax(logits), classes in metadata order",
            ),
            float_value(LOGITS, &by_class, "class logits divided by the temperature"),
        ],
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("transferd".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(doc(config)),
        graph: Some(graph),
        metadata_props: metadata(config)?,
        ..Default::default()
    })
}

/// How an image becomes the `image` input, precisely enough to reimplement (this is
/// `preprocess::decode` then `preprocess::eval_view`).
pub fn describe(pre: &Preprocessing) -> String {
    let (s, r) = (pre.input_size, pre.resize_shorter);
    format!(
        "decode to 8-bit RGB (EXIF orientation applied, alpha dropped, grey replicated); \
         resize so that the shorter side is {r} px, keeping the aspect ratio (each side \
         rounded to the nearest pixel, at least {r}) with a triangle (bilinear) filter that \
         widens with the scale factor when shrinking (image-rs FilterType::Triangle); crop \
         the centre {s}x{s} square (offsets floor((width - {s}) / 2) and floor((height - \
         {s}) / 2)); map each channel value v in 0..=255 to (v - {m}) / {k}; lay out as \
         float32 [3, {s}, {s}], channels R, G, B first (NCHW), rows top to bottom",
        m = pre.mean,
        k = pre.scale,
    )
}

/// The model's `doc_string`.
fn doc(config: &ModelConfig) -> String {
    let s = config.preprocessing.input_size;
    format!(
        "Image classifier trained by transferd (EfficientNet-{backbone} backbone, {n} \
         classes: metadata `classes`, in output order). Input `{INPUT}`: float32 [N, 3, {s}, \
         {s}], already preprocessed as follows: {pre}. Output `{PROBABILITIES}`: float32 \
         [N, {n}], softmax(logits / T) with the calibration temperature T = {t} already \
         applied (folded into the final Gemm); output `{LOGITS}`: those logits / T. \
         BatchNorm is folded into the convolutions.",
        backbone = config.backbone.name(),
        n = config.classes.len(),
        pre = describe(&config.preprocessing),
        t = config.temperature,
    )
}

/// `metadata_props`: what a runtime needs to use the outputs and feed the input.
fn metadata(config: &ModelConfig) -> Result<Vec<StringStringEntryProto>, ExportError> {
    let json = |e: serde_json::Error| ExportError::Encode(format!("metadata: {e}"));
    let entries = [
        (
            "classes",
            serde_json::to_string(&config.classes).map_err(json)?,
        ),
        (
            "preprocessing",
            serde_json::to_string(&config.preprocessing).map_err(json)?,
        ),
        ("preprocessing_description", describe(&config.preprocessing)),
        ("temperature", config.temperature.to_string()),
        // The outputs already include it: a reader must not divide again.
        ("temperature_applied", "true".to_string()),
        ("backbone", config.backbone.name().to_string()),
        ("transferd_version", config.transferd_version.clone()),
        ("input", INPUT.to_string()),
        ("output", PROBABILITIES.to_string()),
    ];
    Ok(entries
        .into_iter()
        .map(|(key, value)| StringStringEntryProto {
            key: Some(key.to_string()),
            value: Some(value),
        })
        .collect())
}

#[cfg(test)]
mod tests;
