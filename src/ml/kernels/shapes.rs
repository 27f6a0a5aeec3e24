//! The shapes the kernels take: a pointwise conv's operands, a depthwise conv's geometry,
//! and the order a batch's planes lie in, which is the one statement of where a plane lies.

/// Shape of a pointwise convolution's operands.
#[derive(Debug, Clone, Copy)]
pub struct Pointwise {
    pub batch: usize,
    pub inputs: usize,
    pub outputs: usize,
    /// Pixels per image (h · w).
    pub spatial: usize,
}

impl Pointwise {
    /// The operands' shape, from the input's dims `[b, i, h, w]` and the weight's `[o, i, 1,
    /// 1]`.
    pub fn of(x: [usize; 4], weight: [usize; 4]) -> Self {
        assert_eq!(
            x[1], weight[1],
            "pointwise weight matches the input channels"
        );
        Self {
            batch: x[0],
            inputs: x[1],
            outputs: weight[0],
            spatial: x[2] * x[3],
        }
    }

    /// Panics unless there are channels and each operand given has this shape's size: the
    /// input `b · i · p`, the weight `o · i`, the output's gradient `b · o · p` (in image order
    /// for the inference kernel, channel-major for the fine-tune's, see [`Order`]).
    pub(super) fn check(
        &self,
        input: Option<&[f32]>,
        weight: Option<&[f32]>,
        grad: Option<&[f32]>,
    ) {
        // With no input channel the GEMM would leave the (unzeroed) output unwritten.
        assert!(
            self.inputs > 0 && self.outputs > 0,
            "pointwise conv with channels"
        );
        let (b, p) = (self.batch, self.spatial);
        for (operand, size, what) in [
            (input, b * self.inputs * p, "input"),
            (weight, self.outputs * self.inputs, "weight"),
            (grad, b * self.outputs * p, "gradient"),
        ] {
            if let Some(operand) = operand {
                assert_eq!(operand.len(), size, "pointwise {what} size");
            }
        }
    }
}

/// How a batch of `[b, c, h, w]` activations lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Image after image (NCHW), as burn lays out a tensor of that shape.
    Images,
    /// Channel after channel, each channel's planes image after image (`[c, b, h, w]`). The
    /// fine-tune's ops use it: a 1×1 conv and both its gradients are then one GEMM each over
    /// all the batch's pixels, where in image order they are a small GEMM per image, which
    /// packs the whole weight again for each.
    Channels,
}

impl Order {
    /// Where image `image`'s plane of `channel` lies, in planes, in a batch of `batch` images
    /// of `channels` channels.
    pub fn plane(self, batch: usize, channels: usize, image: usize, channel: usize) -> usize {
        match self {
            Self::Images => image * channels + channel,
            Self::Channels => channel * batch + image,
        }
    }

    /// The channel of the `plane`-th plane, in such a batch.
    pub fn channel(self, batch: usize, channels: usize, plane: usize) -> usize {
        match self {
            Self::Images => plane % channels,
            Self::Channels => plane / batch,
        }
    }
}

/// Shape and padding of a depthwise convolution (one k×k filter per channel).
#[derive(Debug, Clone, Copy)]
pub struct Depthwise {
    pub batch: usize,
    pub channels: usize,
    /// How the input's and the output's planes are ordered (the same for both).
    pub order: Order,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Zero rows above and columns left of the image; the bottom and right padding follow
    /// from the output size.
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl Depthwise {
    /// A square `kernel` conv over `x` (`[b, c, h, w]`) with `stride` and `padding` (top,
    /// bottom, left, right), its output size worked out from them (where the flex ops take a
    /// conv's geometry from its input; the input gradient's transposed geometry in
    /// `depthwise_grad` is the forward one's sizes swapped, so it states them).
    pub fn of(x: [usize; 4], kernel: usize, stride: usize, padding: [usize; 4]) -> Self {
        let [batch, channels, height, width] = x;
        let [top, bottom, left, right] = padding;
        Self {
            batch,
            channels,
            order: Order::Images,
            height,
            width,
            kernel,
            stride,
            pad_top: top,
            pad_left: left,
            out_height: (height + top + bottom - kernel) / stride + 1,
            out_width: (width + left + right - kernel) / stride + 1,
        }
    }

    /// The same conv over planes in `order`.
    pub fn in_order(self, order: Order) -> Self {
        Self { order, ..self }
    }

    /// The channel of the `plane`-th plane.
    pub fn channel(&self, plane: usize) -> usize {
        self.order.channel(self.batch, self.channels, plane)
    }

    /// Where image `image`'s plane of `channel` lies, in planes.
    pub fn plane(&self, image: usize, channel: usize) -> usize {
        self.order.plane(self.batch, self.channels, image, channel)
    }
}
