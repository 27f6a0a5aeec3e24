//! BatchNorm with frozen statistics.
//!
//! With ~1,000 training photos, batches of 16 give noisy batch statistics, and updating the
//! pretrained running mean and variance degrades the features. So BatchNorm always normalises
//! with the stored ImageNet statistics (they never receive gradients), while the affine scale
//! and shift stay trainable when their block is unfrozen. The parameter names match PyTorch's
//! `BatchNorm2d` so the pretrained file loads without adapters.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

/// Configuration of a [`FrozenBatchNorm`].
#[derive(Config, Debug)]
pub struct FrozenBatchNormConfig {
    /// Number of channels.
    pub channels: usize,
    /// Added to the variance for numerical stability.
    #[config(default = 1e-5)]
    pub epsilon: f64,
}

/// `y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`, per channel.
#[derive(Module, Debug)]
pub struct FrozenBatchNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: Param<Tensor<1>>,
    pub running_var: Param<Tensor<1>>,
    epsilon: f64,
    /// Normalise with the statistics of each batch instead (the from-scratch baseline only:
    /// random weights come with no meaningful stored statistics).
    batch_stats: bool,
    /// Already folded into the preceding conv's weights and bias (see [`Self::fold_into`]):
    /// the forward pass is the identity.
    folded: bool,
}

impl FrozenBatchNormConfig {
    /// Identity transform until weights are loaded.
    pub fn init(&self, device: &Device) -> FrozenBatchNorm {
        let c = self.channels;
        FrozenBatchNorm {
            weight: Param::from_tensor(Tensor::ones([c], device)),
            bias: Param::from_tensor(Tensor::zeros([c], device)),
            running_mean: Param::from_tensor(Tensor::zeros([c], device)).set_require_grad(false),
            running_var: Param::from_tensor(Tensor::ones([c], device)).set_require_grad(false),
            epsilon: self.epsilon,
            batch_stats: false,
            folded: false,
        }
    }
}

impl FrozenBatchNorm {
    /// # Shapes
    /// - input `[batch, channels, h, w]`
    /// - output `[batch, channels, h, w]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let channels = self.weight.dims()[0];
        if self.folded {
            return input;
        }
        if self.batch_stats {
            let weight = self.weight.val().reshape([1, channels, 1, 1]);
            let bias = self.bias.val().reshape([1, channels, 1, 1]);
            let mean = input.clone().mean_dim(0).mean_dim(2).mean_dim(3);
            let centered = input - mean;
            let var = centered
                .clone()
                .powf_scalar(2.0)
                .mean_dim(0)
                .mean_dim(2)
                .mean_dim(3);
            return centered / (var + self.epsilon).sqrt() * weight + bias;
        }
        // Reduced to one scale and one shift per channel first: two passes over the
        // activations instead of four, and those passes dominate a CPU forward pass.
        let (scale, shift) = self.scale_shift();
        input * scale.reshape([1, channels, 1, 1]) + shift.reshape([1, channels, 1, 1])
    }

    /// The per-channel affine map this BatchNorm applies: `y = x · scale + shift`.
    fn scale_shift(&self) -> (Tensor<1>, Tensor<1>) {
        // The statistics are detached so that no optimiser ever moves them, even after an
        // `unfreeze()` of the enclosing module marks every parameter as trainable.
        let mean = self.running_mean.val().detach();
        let var = self.running_var.val().detach();
        let scale = (var + self.epsilon).sqrt().recip() * self.weight.val();
        let shift = self.bias.val() - mean * scale.clone();
        (scale, shift)
    }

    /// The per-channel `(scale, shift)` this BatchNorm applies, differentiable in its affine
    /// parameters; `None` when it is folded (the identity) or uses batch statistics.
    pub fn affine(&self) -> Option<(Tensor<1>, Tensor<1>)> {
        (!self.folded && !self.batch_stats).then(|| self.scale_shift())
    }

    /// Whether [`Self::fold_into`] has moved this BatchNorm into its conv.
    pub fn is_folded(&self) -> bool {
        self.folded
    }

    /// Moves this BatchNorm into `conv` (whose outputs it normalises): the conv's weights are
    /// scaled per output channel and the shift becomes its bias, so inference makes one pass
    /// instead of three. Only for inference: the folded pair no longer trains as the original,
    /// and it is never saved. A BatchNorm on batch statistics is left as it is.
    pub fn fold_into(self, conv: Conv2d) -> (Conv2d, Self) {
        if self.batch_stats || self.folded {
            return (conv, self);
        }
        let (scale, shift) = self.scale_shift();
        let [outputs, _, _, _] = conv.weight.dims();
        let weight = conv.weight.val() * scale.clone().reshape([outputs, 1, 1, 1]);
        let bias = match &conv.bias {
            Some(b) => b.val() * scale + shift,
            None => shift,
        };
        let conv = Conv2d {
            weight: Param::from_tensor(weight.detach()).set_require_grad(false),
            bias: Some(Param::from_tensor(bias.detach()).set_require_grad(false)),
            ..conv
        };
        (
            conv,
            Self {
                folded: true,
                ..self
            },
        )
    }

    /// Switches to per-batch statistics (see the `batch_stats` field).
    pub fn use_batch_statistics(mut self) -> Self {
        self.batch_stats = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_with_running_statistics() {
        let device = Device::flex();
        let mut bn = FrozenBatchNormConfig::new(2)
            .with_epsilon(0.0)
            .init(&device);
        bn.running_mean = Param::from_tensor(Tensor::from_floats([1.0, -1.0], &device));
        bn.running_var = Param::from_tensor(Tensor::from_floats([4.0, 1.0], &device));
        bn.bias = Param::from_tensor(Tensor::from_floats([0.5, 0.0], &device));
        let x = Tensor::<1>::from_floats([3.0, 3.0, 1.0, 1.0], &device).reshape([1, 2, 2, 1]);
        let y = bn.forward(x).into_data();
        let y = y.as_slice::<f32>().unwrap();
        assert_eq!(y, &[1.5, 1.5, 2.0, 2.0]);
    }
}
