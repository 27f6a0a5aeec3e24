//! The training configuration: every knob with its default, and range checks that name the
//! field at fault. A JSON file given to `train --config` may set any subset of the fields.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::augment::AugmentConfig;
use super::backbone::Backbone;

/// A configuration value out of range.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid config field `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn check(ok: bool, field: &str, message: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError {
            field: field.into(),
            message: message.into(),
        })
    }
}

/// How much of the backbone the fine-tune phase trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfreeze {
    /// The top `n` MBConv blocks plus the head conv (0 = head conv only). The frozen bottom
    /// runs once per view and its activations are cached.
    Top(usize),
    /// Every layer, stem included; views are decoded and augmented afresh each epoch.
    All,
}

impl Unfreeze {
    /// Index of the first trainable block of a backbone with `blocks` blocks (0 for `All`).
    pub fn first_block(self, blocks: usize) -> usize {
        match self {
            Unfreeze::Top(n) => blocks - n.min(blocks),
            Unfreeze::All => 0,
        }
    }
}

/// Which pretrained backbone a run uses: `"auto"` or a backbone's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackboneChoice {
    /// Chosen from the data (see `plan`).
    Auto,
    Fixed(Backbone),
}

impl Serialize for BackboneChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BackboneChoice::Auto => s.serialize_str("auto"),
            BackboneChoice::Fixed(b) => b.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for BackboneChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        if name == "auto" {
            return Ok(BackboneChoice::Auto);
        }
        Backbone::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .map(BackboneChoice::Fixed)
            .ok_or_else(|| {
                let names: Vec<&str> = Backbone::ALL.iter().map(|b| b.name()).collect();
                serde::de::Error::custom(format!(
                    "expected \"auto\" or one of {names:?}, got \"{name}\""
                ))
            })
    }
}

impl Serialize for Unfreeze {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Unfreeze::Top(n) => s.serialize_u64(*n as u64),
            Unfreeze::All => s.serialize_str("all"),
        }
    }
}

impl<'de> Deserialize<'de> for Unfreeze {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Unfreeze::Top(n)),
            Raw::S(s) if s == "all" => Ok(Unfreeze::All),
            Raw::S(s) => Err(serde::de::Error::custom(format!(
                "expected a block count or \"all\", got \"{s}\""
            ))),
        }
    }
}

/// Learning-rate schedule over the epochs of a phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Cosine decay from the base rate to 1% of it.
    Cosine,
    /// The tutorial's: constant for `constant_epochs`, then multiplied by `decay_rate` each epoch.
    ConstantThenExponential,
}

/// Class weights in the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClassWeighting {
    /// Inverse frequency when the classes are imbalanced ([`super::data::imbalanced`]).
    Auto,
    On,
    Off,
}

/// Warm-up: backbone frozen, only the new head trains, on cached pooled features. The head is
/// a convex problem there, so it is solved to convergence (`head_fit`), with its L2 penalty
/// chosen on held-out photos unless the config fixes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct WarmupConfig {
    pub enabled: bool,
    /// A fixed L2 penalty for the head; `null` chooses it by cross-validation.
    pub l2: Option<f64>,
    /// Folds of the cross-validation on small sets.
    pub folds: usize,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            l2: None,
            folds: 5,
        }
    }
}

/// A switch with an automatic setting: `"auto"`, `true` or `false` in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Auto,
    On,
    Off,
}

impl Serialize for When {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            When::Auto => s.serialize_str("auto"),
            When::On => s.serialize_bool(true),
            When::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for When {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            B(bool),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::B(true) => Ok(When::On),
            Raw::B(false) => Ok(When::Off),
            Raw::S(s) => match s.as_str() {
                "auto" => Ok(When::Auto),
                "true" => Ok(When::On),
                "false" => Ok(When::Off),
                _ => Err(serde::de::Error::custom(format!(
                    "expected \"auto\", true or false, got \"{s}\""
                ))),
            },
        }
    }
}

/// Fine-tune: the top of the backbone unfrozen, at a lower learning rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// `"auto"`: only on enough data, and kept only when it beats the head alone; or
    /// `true` / `false`.
    #[schema(value_type = String)]
    pub enabled: When,
    pub epochs: usize,
    pub learning_rate: f64,
    /// Top blocks to unfreeze (0–16 for Lite0, 0–21 for Lite1 and Lite2), or `"all"` for
    /// the whole network.
    #[schema(value_type = Object)]
    pub unfreeze: Unfreeze,
    pub schedule: Schedule,
    /// For `constant_then_exponential`: epochs at the base rate.
    pub constant_epochs: usize,
    /// For `constant_then_exponential`: factor per epoch after that.
    pub decay_rate: f64,
    pub patience: usize,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            enabled: When::Auto,
            epochs: 4,
            learning_rate: 1e-4,
            unfreeze: Unfreeze::Top(1),
            schedule: Schedule::Cosine,
            constant_epochs: 2,
            decay_rate: 0.5,
            patience: 2,
        }
    }
}

/// The from-scratch comparison: same architecture, random initialisation, no warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BaselineConfig {
    pub enabled: bool,
    pub epochs: usize,
    pub learning_rate: f64,
    /// Wall-time budget in seconds: training stops at the first step past it, so the
    /// comparison can be "the same budget as the transfer run".
    pub max_seconds: Option<f64>,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            epochs: 4,
            learning_rate: 1e-3,
            max_seconds: None,
        }
    }
}

/// Everything a run needs besides the data and the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The pretrained backbone: `lite0` (224 px), `lite1` (240 px), `lite2` (260 px) or
    /// `auto` (the default; see `plan`).
    #[schema(value_type = String)]
    pub backbone: BackboneChoice,
    /// Side of the square network input in pixels; `null` takes the backbone's own.
    pub input_size: Option<usize>,
    /// Fraction of each class held out for validation.
    pub val_fraction: f64,
    pub seed: u64,
    pub batch_size: usize,
    /// Views per training image in the cache: a clean centre crop plus `views - 1` augmented.
    pub views: usize,
    pub augment: AugmentConfig,
    pub dropout: f64,
    /// Decoupled weight decay (L2) of AdamW.
    pub weight_decay: f64,
    pub class_weighting: ClassWeighting,
    /// Images larger than this on either side are skipped.
    pub max_image_dimension: u32,
    /// Classes with fewer usable images are refused.
    pub min_images_per_class: usize,
    /// After the model is chosen, fit it again on every photo (training and validation).
    pub refit: bool,
    pub warmup: WarmupConfig,
    pub finetune: FinetuneConfig,
    pub baseline: BaselineConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneChoice::Auto,
            input_size: None,
            val_fraction: 0.2,
            seed: 42,
            batch_size: 32,
            views: 2,
            augment: AugmentConfig::default(),
            dropout: 0.5,
            weight_decay: 1e-4,
            class_weighting: ClassWeighting::Auto,
            max_image_dimension: super::preprocess::DEFAULT_MAX_DIMENSION,
            min_images_per_class: 2,
            refit: true,
            warmup: WarmupConfig::default(),
            finetune: FinetuneConfig::default(),
            baseline: BaselineConfig::default(),
        }
    }
}

impl TrainConfig {
    /// Range checks; the error names the first field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.input_size.is_none_or(|s| (32..=512).contains(&s)),
            "input_size",
            "must be between 32 and 512, or null for the backbone's own",
        )?;
        check(
            self.val_fraction > 0.0 && self.val_fraction < 0.9,
            "val_fraction",
            "must be in (0, 0.9)",
        )?;
        check(
            (1..=512).contains(&self.batch_size),
            "batch_size",
            "must be between 1 and 512",
        )?;
        check(
            (1..=16).contains(&self.views),
            "views",
            "must be between 1 and 16",
        )?;
        check(
            (0.0..0.95).contains(&self.dropout),
            "dropout",
            "must be in [0, 0.95)",
        )?;
        check(
            (0.0..=1.0).contains(&self.weight_decay),
            "weight_decay",
            "must be in [0, 1]",
        )?;
        check(
            self.max_image_dimension >= 32,
            "max_image_dimension",
            "must be at least 32",
        )?;
        check(
            self.min_images_per_class >= 2,
            "min_images_per_class",
            "must be at least 2",
        )?;
        self.augment.validate().map_err(|m| ConfigError {
            field: "augment".into(),
            message: m,
        })?;
        let lr = |v: f64| v > 0.0 && v <= 1.0;
        check(
            self.warmup.l2.is_none_or(|v| v > 0.0 && v <= 1e4),
            "warmup.l2",
            "must be in (0, 10000], or null to choose it by cross-validation",
        )?;
        check(
            (2..=20).contains(&self.warmup.folds),
            "warmup.folds",
            "must be between 2 and 20",
        )?;
        check(
            self.finetune.epochs <= 200,
            "finetune.epochs",
            "must be at most 200",
        )?;
        check(
            lr(self.finetune.learning_rate),
            "finetune.learning_rate",
            "must be in (0, 1]",
        )?;
        if let Unfreeze::Top(n) = self.finetune.unfreeze {
            // Lite0 has the fewest blocks; with `auto` it may be the one chosen.
            let blocks = match self.backbone {
                BackboneChoice::Fixed(b) => b.num_blocks(),
                BackboneChoice::Auto => Backbone::Lite0.num_blocks(),
            };
            check(
                n <= blocks,
                "finetune.unfreeze",
                &format!("must be a block count from 0 to {blocks}, or \"all\""),
            )?;
        }
        check(
            self.finetune.decay_rate > 0.0 && self.finetune.decay_rate <= 1.0,
            "finetune.decay_rate",
            "must be in (0, 1]",
        )?;
        check(
            self.baseline.epochs <= 200,
            "baseline.epochs",
            "must be at most 200",
        )?;
        check(
            lr(self.baseline.learning_rate),
            "baseline.learning_rate",
            "must be in (0, 1]",
        )?;
        check(
            self.baseline.max_seconds.is_none_or(|s| s > 0.0),
            "baseline.max_seconds",
            "must be positive",
        )?;
        check(
            self.warmup.enabled || self.finetune.enabled == When::On,
            "warmup.enabled",
            "the head is trained by the warm-up: switch it off only with finetune.enabled true",
        )?;
        Ok(())
    }

    /// The input side for `backbone`: the config's, else the backbone's own.
    pub fn input_size_for(&self, backbone: Backbone) -> usize {
        self.input_size.unwrap_or(backbone.input_size())
    }

    /// Learning rate of `epoch` (0-based) in a phase of `epochs` epochs.
    pub fn finetune_lr(&self, epoch: usize) -> f64 {
        let f = &self.finetune;
        match f.schedule {
            Schedule::Cosine => cosine(f.learning_rate, epoch, f.epochs),
            Schedule::ConstantThenExponential => {
                f.learning_rate
                    * f.decay_rate
                        .powi(epoch.saturating_sub(f.constant_epochs.saturating_sub(1)) as i32)
            }
        }
    }
}

/// Cosine decay from `base` at epoch 0 to `base / 100` at the last epoch.
pub fn cosine(base: f64, epoch: usize, epochs: usize) -> f64 {
    if epochs <= 1 {
        return base;
    }
    let t = epoch as f64 / (epochs - 1) as f64;
    let floor = base / 100.0;
    floor + (base - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_json_round_trips() {
        let c = TrainConfig::default();
        c.validate().unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<TrainConfig>(&json).unwrap(), c);
        let partial: TrainConfig =
            serde_json::from_str(r#"{"finetune": {"unfreeze": "all"}}"#).unwrap();
        assert_eq!(partial.finetune.unfreeze, Unfreeze::All);
        assert_eq!(partial.finetune.epochs, FinetuneConfig::default().epochs);
        for (json, when) in [
            ("\"auto\"", When::Auto),
            ("true", When::On),
            ("false", When::Off),
        ] {
            let c: TrainConfig =
                serde_json::from_str(&format!(r#"{{"finetune": {{"enabled": {json}}}}}"#)).unwrap();
            assert_eq!(c.finetune.enabled, when);
        }
        assert!(
            serde_json::from_str::<TrainConfig>(r#"{"finetune": {"enabled": "maybe"}}"#).is_err()
        );
        assert!(serde_json::from_str::<TrainConfig>(r#"{"refit": "yes"}"#).is_err());
        let lite2: TrainConfig = serde_json::from_str(r#"{"backbone": "lite2"}"#).unwrap();
        assert_eq!(lite2.backbone, BackboneChoice::Fixed(Backbone::Lite2));
        assert_eq!(lite2.input_size_for(Backbone::Lite2), 260);
        let auto: TrainConfig = serde_json::from_str(r#"{"backbone": "auto"}"#).unwrap();
        assert_eq!(serde_json::to_value(auto.backbone).unwrap(), "auto");
        let err = serde_json::from_str::<TrainConfig>(r#"{"backbone": "resnet50"}"#).unwrap_err();
        assert!(err.to_string().contains("lite1"), "{err}");
    }

    #[test]
    fn out_of_range_names_the_field() {
        let c = TrainConfig {
            batch_size: 0,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "batch_size");
        assert!(serde_json::from_str::<TrainConfig>(r#"{"bogus": 1}"#).is_err());
    }

    #[test]
    fn schedules() {
        assert!((cosine(1.0, 0, 5) - 1.0).abs() < 1e-12);
        assert!((cosine(1.0, 4, 5) - 0.01).abs() < 1e-12);
        let mut c = TrainConfig::default();
        c.finetune.schedule = Schedule::ConstantThenExponential;
        c.finetune.constant_epochs = 2;
        assert_eq!(c.finetune_lr(0), c.finetune_lr(1));
        assert!((c.finetune_lr(2) - c.finetune.learning_rate * 0.5).abs() < 1e-12);
    }
}
