//! What a run does with the data it has, decided from the class counts before the frozen
//! pass, and the report of what it decided and why (stored with the evaluation).
//!
//! The rules follow the tutorial's own strategy table: with little data per class, train
//! only the head on frozen features; with plenty, warm up and then fine-tune the top of the
//! backbone, keeping the fine-tuned network only when it measurably beats the head alone on
//! the validation photos.

use serde::{Deserialize, Serialize};

use super::backbone::Backbone;
use super::config::{BackboneChoice, TrainConfig, Unfreeze, When};

/// Below this many photos in its smallest class a set is "small": a held-out fifth of it is
/// too few photos to choose or judge a model on, so every photo is used for training and the
/// estimate comes from k-fold cross-validation, and fine-tuning (which over-fits a few
/// photos per class in a couple of epochs) is skipped.
pub const SMALL_PER_CLASS: usize = 50;

/// `auto`'s backbone on small data, and on data large enough to fine-tune (bench/README.md,
/// "Choosing the backbone", has the measurements behind the choice: Lite1 3–4 points ahead
/// of Lite0 on small data, and first of the three on issue 13's 37 fine-grained classes).
pub const AUTO_SMALL: Backbone = Backbone::Lite1;
pub const AUTO_LARGE: Backbone = Backbone::Lite0;

/// How the reported accuracy is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EstimateMethod {
    /// Stratified k-fold over photos: each photo scored by a head that never saw it.
    Kfold,
    /// The validation split, scored by a model trained on the training split only.
    Holdout,
}

/// The decisions of a run, fixed before the frozen pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub backbone: Backbone,
    /// Why this backbone, in words.
    pub backbone_reason: String,
    /// Side of the network input.
    pub input_size: usize,
    pub estimate: EstimateMethod,
    pub finetune: bool,
    /// Why fine-tuning does or does not run, in words.
    pub reason: String,
    /// First trainable block: where the frozen pass cuts the network.
    pub cut: usize,
}

impl Plan {
    pub fn new(config: &TrainConfig, counts: &[usize]) -> Self {
        let smallest = counts.iter().copied().min().unwrap_or(0);
        let small = smallest < SMALL_PER_CLASS;
        let (backbone, backbone_reason) = match config.backbone {
            BackboneChoice::Fixed(b) => (b, format!("{b} was asked for in the config")),
            BackboneChoice::Auto if small => (
                AUTO_SMALL,
                format!(
                    "auto: small data, so the more accurate {AUTO_SMALL} (its frozen pass over few photos is cheap)"
                ),
            ),
            BackboneChoice::Auto => (
                AUTO_LARGE,
                format!("auto: enough data to fine-tune, so the fastest backbone, {AUTO_LARGE}"),
            ),
        };
        let blocks = backbone.num_blocks();
        let (finetune, reason) = match config.finetune.enabled {
            When::Off => (
                false,
                "fine-tuning is switched off in the config".to_string(),
            ),
            When::On => (true, "fine-tuning is switched on in the config".to_string()),
            When::Auto if small => (
                false,
                format!(
                    "small data: the smallest class has {smallest} photos (under {SMALL_PER_CLASS}), so only the head is trained"
                ),
            ),
            When::Auto => (
                true,
                format!(
                    "enough data ({smallest} or more photos per class): fine-tuned, and kept only if validation loss improves"
                ),
            ),
        };
        // The from-scratch baseline compares on the validation split, so it needs one.
        let estimate = if small && !finetune && config.refit && !config.baseline.enabled {
            EstimateMethod::Kfold
        } else {
            EstimateMethod::Holdout
        };
        let cut = match (finetune, config.finetune.unfreeze) {
            (false, _) => blocks,
            (true, Unfreeze::Top(n)) => blocks - n.min(blocks),
            (true, Unfreeze::All) => 0,
        };
        Self {
            backbone,
            backbone_reason,
            input_size: config.input_size_for(backbone),
            estimate,
            finetune,
            reason,
            cut,
        }
    }

    /// Bytes the frozen pass will cache for `counts` photos per class under `config`: the
    /// pooled features of every view, and the activations at the cut when fine-tuning
    /// trains from cached activations (the validation side keeps its own). Mirrors
    /// `train::prepare`, so the service can refuse a run that cannot fit before it starts.
    pub fn cache_bytes(&self, config: &TrainConfig, counts: &[usize]) -> u64 {
        let labels: Vec<usize> = counts
            .iter()
            .enumerate()
            .flat_map(|(class, &n)| std::iter::repeat_n(class, n))
            .collect();
        let (train, val) = match self.estimate {
            EstimateMethod::Kfold => (labels.len(), 0),
            EstimateMethod::Holdout => {
                let (t, v) = super::data::stratified_split(&labels, config.val_fraction, 0);
                (t.len(), v.len())
            }
        };
        let train_views = (train * config.views) as u64;
        let val_views = val as u64;
        let feature = (super::backbone::FEATURES * 4) as u64;
        let activation = if self.cut == 0 {
            (3 * self.input_size * self.input_size * 4) as u64
        } else {
            let [c, h, w] =
                super::backbone::activation_shape(self.backbone, self.cut, self.input_size);
            (c * h * w * 4) as u64
        };
        let keep_train = self.finetune && self.cut != 0;
        let keep_val = self.finetune;
        (train_views + val_views) * feature
            + u64::from(keep_train) * train_views * activation
            + u64::from(keep_val) * val_views * activation
    }
}

/// One point of the head's regularisation path (`head_fit` walks it), as measured on
/// held-out photos.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PathPoint {
    pub l2: f64,
    /// Mean cross-entropy of the held-out photos' clean views.
    pub nll: f64,
    pub accuracy: f64,
}

/// How the served head was chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeadReport {
    /// The L2 penalty used (per mean loss, on unit-variance features); absent when the
    /// warm-up was off and fine-tuning trained the head.
    pub l2: Option<f64>,
    /// Held-out loss and accuracy at each penalty tried (one point when the config fixed it).
    pub path: Vec<PathPoint>,
}

/// Whether fine-tuning ran, whether its network was kept, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FinetuneDecision {
    pub ran: bool,
    pub kept: bool,
    pub reason: String,
    /// Validation loss of the head alone, and of the best fine-tuned network.
    pub val_loss_head_only: Option<f64>,
    pub val_loss_finetuned: Option<f64>,
}

/// What a run decided and how its figures were measured; part of the evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainingReport {
    pub backbone: Backbone,
    pub backbone_reason: String,
    pub estimate: EstimateMethod,
    /// Folds of the k-fold estimate.
    pub folds: Option<usize>,
    /// Photos the reported figures were measured on.
    pub estimate_images: usize,
    pub head: HeadReport,
    pub finetune: FinetuneDecision,
    /// Photos the served model was fitted on (training plus validation photos after a refit).
    pub trained_on_images: usize,
    pub refit: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_config_is_estimated_at_tens_of_gigabytes() {
        // The hardening issue's kind of example: 512 px, 16 views, all but Lite0's first
        // block trained from cached activations, on 1,000 photos. (Top(16) would unfreeze
        // every block of Lite0, and a run with nothing frozen streams instead of caching.)
        let mut config = TrainConfig {
            input_size: Some(512),
            views: 16,
            backbone: BackboneChoice::Fixed(Backbone::Lite0),
            ..Default::default()
        };
        config.finetune.unfreeze = Unfreeze::Top(15);
        config.finetune.enabled = When::On;
        let counts = [500, 500];
        let plan = Plan::new(&config, &counts);
        let gib = plan.cache_bytes(&config, &counts) as f64 / (1u64 << 30) as f64;
        assert!(gib > 30.0, "{gib:.1} GiB");
        let small = TrainConfig::default();
        let gib =
            Plan::new(&small, &counts).cache_bytes(&small, &counts) as f64 / (1u64 << 30) as f64;
        assert!(
            gib < 4.0,
            "the default config on 1,000 photos: {gib:.1} GiB"
        );
    }

    #[test]
    fn small_sets_train_the_head_only_and_estimate_by_kfold() {
        let config = TrainConfig::default();
        let p = Plan::new(&config, &[12, 30, 49]);
        assert!(!p.finetune);
        assert_eq!(p.estimate, EstimateMethod::Kfold);
        assert_eq!(p.backbone, AUTO_SMALL, "the default backbone is auto");
        assert_eq!(
            p.cut, 21,
            "nothing trainable: the cut is after Lite1's last block"
        );
        assert!(p.reason.contains("12 photos"), "{}", p.reason);

        let p = Plan::new(&config, &[700, 699]);
        assert!(p.finetune);
        assert_eq!(p.estimate, EstimateMethod::Holdout);
        assert_eq!(p.cut, 15, "the default unfreezes the top block");

        let mut forced = TrainConfig::default();
        forced.finetune.enabled = When::On;
        let p = Plan::new(&forced, &[10, 10]);
        assert!(p.finetune && p.estimate == EstimateMethod::Holdout, "{p:?}");

        let mut no_refit = TrainConfig::default();
        no_refit.refit = false;
        assert_eq!(
            Plan::new(&no_refit, &[10, 10]).estimate,
            EstimateMethod::Holdout
        );
    }

    #[test]
    fn the_backbone_and_its_input_size_follow_the_config() {
        let mut config = TrainConfig::default();
        assert_eq!(config.backbone, BackboneChoice::Auto, "the default");
        config.backbone = BackboneChoice::Fixed(Backbone::Lite0);
        assert_eq!(Plan::new(&config, &[10, 10]).backbone, Backbone::Lite0);
        assert_eq!(Plan::new(&config, &[10, 10]).input_size, 224);
        config.backbone = BackboneChoice::Fixed(Backbone::Lite2);
        let p = Plan::new(&config, &[10, 10]);
        assert_eq!((p.backbone, p.input_size), (Backbone::Lite2, 260));
        config.input_size = Some(128);
        assert_eq!(Plan::new(&config, &[10, 10]).input_size, 128);
        config.backbone = BackboneChoice::Auto;
        let small = Plan::new(&config, &[10, 10]);
        let large = Plan::new(&config, &[500, 500]);
        assert_eq!((small.backbone, large.backbone), (AUTO_SMALL, AUTO_LARGE));
        assert!(
            small.backbone_reason.starts_with("auto"),
            "{}",
            small.backbone_reason
        );
        config.backbone = BackboneChoice::Fixed(Backbone::Lite1);
        config.finetune.enabled = When::On;
        assert_eq!(Plan::new(&config, &[10, 10]).cut, 20, "Lite1 has 21 blocks");
    }
}
