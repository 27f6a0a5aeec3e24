//! Building blocks of the exported ONNX graph: float constants, nodes, attributes, typed
//! values, and a burn conv with its BatchNorm folded in and its padding spelt out.
//!
//! burn's `PaddingConfig2d::Same` is not ONNX's `auto_pad` (deprecated, and not every
//! runtime agrees on it), so each conv gets the explicit `pads` burn itself computes at the
//! input size the graph is built for.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;

use super::proto::{
    AttributeProto, AttributeType, DataType, NodeProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, tensor_shape_proto, type_proto,
};
use super::{ExportError, read};
use crate::ml::frozen_bn::FrozenBatchNorm;

/// Names of the two scalar constants every ReLU6 (`Clip`) reads.
pub const RELU6_MIN: &str = "relu6.min";
pub const RELU6_MAX: &str = "relu6.max";

/// Nodes and constants in the order they were added. Each node reads only values added
/// before it, so the order is the topological one ONNX requires.
#[derive(Default)]
pub struct Graph {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
}

impl Graph {
    /// Adds a float32 constant (`dims` empty for a scalar) and returns its name.
    pub fn constant(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), values.len());
        self.initializers.push(TensorProto {
            name: Some(name.to_string()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(DataType::Float as i32),
            raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
        name.to_string()
    }

    /// Adds a node running `op` on `inputs`, returning the name of its one output, which is
    /// the node's own `name` (nodes and values have separate namespaces in ONNX).
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.to_string()],
            name: Some(name.to_string()),
            op_type: Some(op.to_string()),
            attribute: attributes,
            ..Default::default()
        });
        name.to_string()
    }

    /// `min(max(x, 0), 6)`, burn's `relu6`; needs the [`RELU6_MIN`] and [`RELU6_MAX`]
    /// constants (opset 11 on, `Clip` takes its bounds as inputs, not attributes).
    pub fn relu6(&mut self, name: &str, input: &str) -> String {
        self.node("Clip", name, &[input, RELU6_MIN, RELU6_MAX], vec![])
    }

    /// Adds `conv` followed by `bn` as one ONNX `Conv` named `name`: BatchNorm is folded
    /// into the weights and bias as inference folds it (`FrozenBatchNorm::fold_into`).
    /// `size` is the `[height, width]` of `input` and becomes that of the output.
    pub fn conv_bn(
        &mut self,
        name: &str,
        input: &str,
        conv: &Conv2d,
        bn: &FrozenBatchNorm,
        size: &mut [usize; 2],
    ) -> Result<String, ExportError> {
        // Folding an already folded BatchNorm changes nothing, so this also covers a model
        // that `TransferModel::folded` left unfolded (the generic path, `fused::GENERIC_ENV`).
        let (conv, bn) = bn.clone().fold_into(conv.clone());
        if !bn.is_folded() {
            return Err(ExportError::Unsupported(format!(
                "{name}: its BatchNorm normalises with per-batch statistics, which a fixed \
                 graph cannot reproduce"
            )));
        }
        let weight = conv.weight.val();
        let dims = weight.dims();
        let weight = self.constant(&format!("{name}.weight"), &dims, &read(weight)?);
        let bias = match &conv.bias {
            Some(b) => Some(self.constant(&format!("{name}.bias"), &[dims[0]], &read(b.val())?)),
            None => None,
        };
        let padding = pads(&conv.padding, conv.kernel_size, conv.stride, *size);
        for axis in 0..2 {
            let span = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1;
            let padded = size[axis] + padding[axis] + padding[axis + 2];
            if padded < span || conv.stride[axis] == 0 {
                return Err(ExportError::Unsupported(format!(
                    "{name}: a {size:?} input is smaller than the kernel"
                )));
            }
            size[axis] = (padded - span) / conv.stride[axis] + 1;
        }
        let mut inputs = vec![input, weight.as_str()];
        if let Some(bias) = &bias {
            inputs.push(bias.as_str());
        }
        let attributes = vec![
            ints("kernel_shape", &conv.kernel_size),
            ints("strides", &conv.stride),
            ints("pads", &padding),
            ints("dilations", &conv.dilation),
            int("group", conv.groups as i64),
        ];
        Ok(self.node("Conv", name, &inputs, attributes))
    }
}

/// ONNX `pads` (`[top, left, bottom, right]`) giving what burn's `Conv2d::forward` pads an
/// input of `size` (`[height, width]`) with.
pub fn pads(
    padding: &PaddingConfig2d,
    kernel: [usize; 2],
    stride: [usize; 2],
    size: [usize; 2],
) -> [usize; 4] {
    match padding {
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [*top, *left, *bottom, *right],
        PaddingConfig2d::Same => {
            let (top, bottom) = same(kernel[0], stride[0], size[0]);
            let (left, right) = same(kernel[1], stride[1], size[1]);
            [top, left, bottom, right]
        }
    }
}

/// burn 0.22.1's "same" padding of one axis (`burn-nn` `padding.rs`, private there): enough
/// for `ceil(size / stride)` outputs, half before and the odd pixel after, as TensorFlow's
/// "SAME" (and ONNX's `SAME_UPPER`) place it.
pub fn same(kernel: usize, stride: usize, size: usize) -> (usize, usize) {
    let outputs = size.div_ceil(stride);
    let total = match outputs {
        0 => 0,
        n => ((n - 1) * stride + kernel).saturating_sub(size),
    };
    (total / 2, total - total / 2)
}

/// An `INT` attribute.
pub fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

/// An `INTS` attribute.
pub fn ints(name: &str, values: &[usize]) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.iter().map(|&v| v as i64).collect(),
        ..Default::default()
    }
}

/// One axis of a graph input or output's shape.
pub enum Dim {
    /// Known when the graph is built.
    Fixed(usize),
    /// Chosen by the caller at run time (the batch), under this name.
    Named(&'static str),
}

/// A float32 graph input or output of shape `dims`.
pub fn float_value(name: &str, dims: &[Dim], doc: &str) -> ValueInfoProto {
    use tensor_shape_proto::{Dimension, dimension::Value};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => Value::DimValue(*n as i64),
                Dim::Named(s) => Value::DimParam(s.to_string()),
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        doc_string: Some(doc.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::conv::Conv2dConfig;
    use burn::prelude::*;

    use super::*;

    #[test]
    fn same_padding_puts_the_odd_pixel_after() {
        // Stride 1 and an odd kernel: symmetric whatever the size.
        assert_eq!(same(3, 1, 7), (1, 1));
        assert_eq!(same(5, 1, 8), (2, 2));
        // Lite0's stem at 224: 112 outputs need 225 pixels, one more than there are.
        assert_eq!(same(3, 2, 224), (0, 1));
        assert_eq!(same(3, 2, 225), (1, 1));
        assert_eq!(same(5, 2, 28), (1, 2));
        assert_eq!(same(1, 1, 9), (0, 0));
    }

    /// The explicit pads give burn's own "same" conv output, at even and odd sizes.
    #[test]
    fn explicit_pads_reproduce_burns_same_conv() {
        let device = Device::flex();
        for (kernel, stride, side) in [(3, 2, 8), (3, 2, 7), (5, 2, 9), (5, 2, 10), (3, 1, 6)] {
            let same = Conv2dConfig::new([2, 3], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Same)
                .init(&device);
            let [top, left, bottom, right] =
                pads(&same.padding, same.kernel_size, same.stride, [side, side]);
            let explicit = Conv2d {
                padding: PaddingConfig2d::Explicit(top, left, bottom, right),
                ..same.clone()
            };
            let values: Vec<f32> = (0..2 * side * side).map(|i| (i % 7) as f32 - 3.0).collect();
            let x = Tensor::<4>::from_data(TensorData::new(values, [1, 2, side, side]), &device);
            let a = same.forward(x.clone());
            let b = explicit.forward(x);
            assert_eq!(a.dims(), b.dims(), "k{kernel} s{stride} n{side}");
            let (a, b) = (a.into_data(), b.into_data());
            assert_eq!(
                a.as_slice::<f32>().unwrap(),
                b.as_slice::<f32>().unwrap(),
                "k{kernel} s{stride} n{side}"
            );
            // The asymmetric cases really are asymmetric, so the test can tell them apart.
            if stride == 2 && side % 2 == 0 {
                assert!(top < bottom && left < right, "k{kernel} n{side}");
            }
        }
    }
}
