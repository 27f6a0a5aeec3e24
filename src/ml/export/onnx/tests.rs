//! The ONNX export decoded back: the graph is closed and in order, the ops follow the
//! network, and padding, head weights and metadata are what the model and config say.

use std::collections::{HashMap, HashSet};

use burn::module::Param;
use burn::prelude::*;
use prost::Message;

use super::{INPUT, LOGITS, PROBABILITIES};
use crate::ml::backbone::{Backbone, block_specs};
use crate::ml::export::proto::{ModelProto, NodeProto, TensorProto};
use crate::ml::export::{ExportError, ExportFormat, export, test_config};
use crate::ml::head::TransferModelConfig;
use crate::ml::preprocess::Preprocessing;

const SIDE: usize = 64;
const TEMPERATURE: f64 = 2.0;

/// A random Lite0 with a head of 1.5s and bias `[1, -2]`, exported and decoded.
fn exported() -> ModelProto {
    let device = Device::flex();
    let mut model = TransferModelConfig::new(2).init(&device);
    model.head.weight = Param::from_tensor(Tensor::<2>::ones([1280, 2], &device).mul_scalar(1.5));
    model.head.bias = Some(Param::from_tensor(Tensor::<1>::from_floats(
        [1.0, -2.0],
        &device,
    )));
    let config = test_config(&["cat", "dog"], SIDE, TEMPERATURE);
    let bytes = export(&model, &config, ExportFormat::Onnx).unwrap();
    ModelProto::decode(bytes.as_slice()).expect("a ModelProto")
}

fn op(node: &NodeProto) -> &str {
    node.op_type.as_deref().unwrap_or("")
}

fn node<'a>(model: &'a ModelProto, name: &str) -> &'a NodeProto {
    let graph = model.graph.as_ref().unwrap();
    graph
        .node
        .iter()
        .find(|n| n.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn ints(node: &NodeProto, name: &str) -> Vec<i64> {
    let attribute = node
        .attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name));
    let attribute = attribute.unwrap_or_else(|| panic!("no attribute {name}"));
    match attribute.i {
        Some(i) => vec![i],
        None => attribute.ints.clone(),
    }
}

fn initializer<'a>(model: &'a ModelProto, name: &str) -> &'a TensorProto {
    let graph = model.graph.as_ref().unwrap();
    graph
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no initializer {name}"))
}

fn floats(tensor: &TensorProto) -> Vec<f32> {
    let raw = tensor.raw_data.as_deref().expect("raw_data");
    raw.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn graph_follows_the_network_and_is_closed() {
    let model = exported();
    assert_eq!(model.ir_version, Some(8));
    assert_eq!(model.opset_import[0].version, Some(13));
    let graph = model.graph.as_ref().unwrap();

    // Per block: expand conv + Clip when expanding, depthwise + Clip, project, Add on a skip.
    let blocks: usize = block_specs(Backbone::Lite0)
        .iter()
        .map(|b| {
            let skip = b.stride == 1 && b.input == b.output;
            2 * usize::from(b.expand != 1) + 3 + usize::from(skip)
        })
        .sum();
    assert_eq!(graph.node.len(), 2 + blocks + 2 + 4);
    let ops: Vec<&str> = graph.node.iter().map(op).collect();
    assert_eq!(ops[..2], ["Conv", "Clip"]);
    assert_eq!(
        ops[ops.len() - 4..],
        ["GlobalAveragePool", "Flatten", "Gemm", "Softmax"]
    );
    assert_eq!(ops.iter().filter(|o| **o == "Add").count(), 9);

    // Every input is the graph input, a constant or an earlier node's output.
    let mut defined: HashSet<&str> = graph
        .initializer
        .iter()
        .map(|t| t.name.as_deref().unwrap())
        .collect();
    assert_eq!(graph.input.len(), 1);
    defined.insert(graph.input[0].name.as_deref().unwrap());
    for n in &graph.node {
        for input in &n.input {
            assert!(
                defined.contains(input.as_str()),
                "{input} read before it exists"
            );
        }
        for output in &n.output {
            assert!(defined.insert(output.as_str()), "{output} defined twice");
        }
    }
    let outputs: Vec<&str> = graph
        .output
        .iter()
        .map(|o| o.name.as_deref().unwrap())
        .collect();
    assert_eq!(outputs, [PROBABILITIES, LOGITS]);
    assert!(outputs.iter().all(|o| defined.contains(o)));
    assert_eq!(graph.input[0].name.as_deref(), Some(INPUT));
    // BatchNorm folding gives every conv a bias.
    for conv in graph.node.iter().filter(|n| op(n) == "Conv") {
        assert_eq!(conv.input.len(), 3, "{:?}", conv.name);
    }
}

#[test]
fn convs_carry_burns_same_padding() {
    let model = exported();
    // The stem halves 64: 32 outputs need 65 pixels, the extra one at the bottom/right.
    let stem = node(&model, "stem.conv");
    assert_eq!(ints(stem, "pads"), [0, 0, 1, 1]);
    assert_eq!(ints(stem, "strides"), [2, 2]);
    assert_eq!(ints(stem, "kernel_shape"), [3, 3]);
    // Block 3 (5×5, stride 2) sees 16×16: 8 outputs need 19 pixels, so 1 before, 2 after.
    let block3 = node(&model, "blocks.3.depthwise_conv");
    assert_eq!(ints(block3, "pads"), [1, 1, 2, 2]);
    // Stride 1 keeps the size with symmetric padding; 1×1 convs have none.
    assert_eq!(
        ints(node(&model, "blocks.4.depthwise_conv"), "pads"),
        [2, 2, 2, 2]
    );
    assert_eq!(
        ints(node(&model, "blocks.4.project_conv"), "pads"),
        [0, 0, 0, 0]
    );
    // Depthwise: one group per channel.
    let weight = initializer(&model, "blocks.3.depthwise_conv.weight");
    assert_eq!(weight.dims[1], 1);
    assert_eq!(ints(block3, "group"), [weight.dims[0]]);
    assert_eq!(ints(node(&model, "blocks.3.expand_conv"), "group"), [1]);
}

#[test]
fn head_divides_by_the_temperature_and_metadata_describes_the_model() {
    let model = exported();
    let gemm = node(&model, LOGITS);
    assert_eq!(gemm.input[1..], ["head.weight", "head.bias"]);
    assert_eq!(ints(gemm, "transB"), [0]);
    let b = initializer(&model, "head.weight");
    assert_eq!(b.dims, [1280, 2]);
    assert!(floats(b).iter().all(|&w| w == 0.75), "1.5 / T");
    assert_eq!(floats(initializer(&model, "head.bias")), [0.5, -1.0]);
    assert_eq!(ints(node(&model, PROBABILITIES), "axis"), [1]);

    let meta: HashMap<&str, &str> = model
        .metadata_props
        .iter()
        .map(|e| (e.key.as_deref().unwrap(), e.value.as_deref().unwrap()))
        .collect();
    let classes: Vec<String> = serde_json::from_str(meta["classes"]).unwrap();
    assert_eq!(classes, ["cat", "dog"]);
    let pre: Preprocessing = serde_json::from_str(meta["preprocessing"]).unwrap();
    assert_eq!(pre, Preprocessing::for_size(SIDE));
    assert_eq!(meta["temperature"].parse::<f64>().unwrap(), TEMPERATURE);
    assert_eq!(meta["temperature_applied"], "true");
    assert_eq!(meta["backbone"], "lite0");
    assert_eq!(meta["transferd_version"], env!("CARGO_PKG_VERSION"));
    let doc = model.doc_string.as_deref().unwrap();
    assert!(
        doc.contains("(v - 127) / 128") && doc.contains("96 px"),
        "{doc}"
    );
}

#[test]
fn an_unusable_temperature_is_refused() {
    let model = TransferModelConfig::new(2).init(&Device::flex());
    for t in [0.0, -1.0, f64::NAN] {
        let config = test_config(&["a", "b"], SIDE, t);
        assert!(matches!(
            export(&model, &config, ExportFormat::Onnx),
            Err(ExportError::Unsupported(_))
        ));
    }
}
