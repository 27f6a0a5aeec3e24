//! Training-time augmentation: random zoom crop, rotation, brightness and horizontal flip.
//!
//! Each view draws from its own RNG seeded by (run seed, image, view), so results do not
//! depend on which thread produced the view or in which order.

use image::imageops::FilterType;
use image::{Rgb, RgbImage};
use imageproc::geometric_transformations::{Interpolation, rotate_about_center};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::preprocess::{MEAN, Preprocessing, eval_view, to_chw};

/// Augmentation settings; every transform can be switched off on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Master switch: `false` makes every view the plain evaluation view.
    pub enabled: bool,
    /// Smallest crop side as a fraction of the image's shorter side (the tutorial's zoom 0.5).
    /// 1.0 disables the zoom.
    pub zoom_min: f32,
    /// Largest rotation in degrees, either way. 0 disables it.
    pub rotation_degrees: f32,
    /// Brightness factor range; `[1, 1]` disables it.
    pub brightness: [f32; 2],
    /// Mirror left-right with probability 1/2.
    pub flip: bool,
    /// Probability of a resolution drop: the view is shrunk to 25–60% of its side and
    /// scaled back up, as a small or heavily compressed photo would be. 0 disables it.
    pub low_res_probability: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            zoom_min: 0.5,
            rotation_degrees: 15.0,
            brightness: [0.8, 1.2],
            flip: true,
            low_res_probability: 0.3,
        }
    }
}

impl AugmentConfig {
    /// Range checks, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.1..=1.0).contains(&self.zoom_min) {
            return Err("augment.zoom_min must be in [0.1, 1]".into());
        }
        if !(0.0..=45.0).contains(&self.rotation_degrees) {
            return Err("augment.rotation_degrees must be in [0, 45]".into());
        }
        let [lo, hi] = self.brightness;
        if !(0.1..=1.0).contains(&lo) || !(1.0..=3.0).contains(&hi) {
            return Err(
                "augment.brightness must be [low, high] with 0.1 <= low <= 1 <= high <= 3".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.low_res_probability) {
            return Err("augment.low_res_probability must be in [0, 1]".into());
        }
        Ok(())
    }
}

/// Seed of one view; SplitMix64-style mixing so neighbouring images get unrelated streams.
pub fn view_seed(seed: u64, image: usize, view: usize) -> u64 {
    let mut z = seed
        ^ (image as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (view as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One augmented `[3, size, size]` view of `image`.
pub fn augmented_view(
    image: &RgbImage,
    pre: &Preprocessing,
    config: &AugmentConfig,
    seed: u64,
) -> Vec<f32> {
    if !config.enabled {
        return eval_view(image, pre);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let size = pre.input_size as u32;
    let (w, h) = image.dimensions();
    let short = w.min(h) as f32;
    // Zoom: a random square whose side is a random fraction of the shorter side, anywhere in
    // the image. At zoom 1 this is a random square crop along the longer side.
    let frac = if config.zoom_min < 1.0 {
        rng.random_range(config.zoom_min..=1.0)
    } else {
        1.0
    };
    let side = ((short * frac).round() as u32).clamp(1, w.min(h));
    let x = rng.random_range(0..=w - side);
    let y = rng.random_range(0..=h - side);
    let crop = image::imageops::crop_imm(image, x, y, side, side).to_image();
    let mut view = image::imageops::resize(&crop, size, size, FilterType::Triangle);
    if config.rotation_degrees > 0.0 {
        let degrees = rng.random_range(-config.rotation_degrees..=config.rotation_degrees);
        // The corners left uncovered are filled with the normalisation mean, i.e. zeros after
        // preprocessing, which the network treats as "no signal".
        let fill = Rgb([MEAN as u8; 3]);
        view = rotate_about_center(&view, degrees.to_radians(), Interpolation::Bilinear, fill);
    }
    let [lo, hi] = config.brightness;
    if hi > lo {
        let factor = rng.random_range(lo..=hi);
        for p in view.pixels_mut() {
            for c in 0..3 {
                p[c] = (p[c] as f32 * factor).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    if config.flip && rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut view);
    }
    if config.low_res_probability > 0.0 && rng.random_bool(config.low_res_probability as f64) {
        let small = ((size as f32 * rng.random_range(0.25..=0.6)).round() as u32).max(8);
        let shrunk = image::imageops::resize(&view, small, small, FilterType::Triangle);
        view = image::imageops::resize(&shrunk, size, size, FilterType::Triangle);
    }
    to_chw(&view)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo() -> RgbImage {
        RgbImage::from_fn(120, 90, |x, y| {
            Rgb([(x * 2) as u8, (y * 2) as u8, ((x + y) % 256) as u8])
        })
    }

    #[test]
    fn views_are_seeded_and_shaped() {
        let pre = Preprocessing::for_size(48);
        let cfg = AugmentConfig::default();
        let a = augmented_view(&photo(), &pre, &cfg, view_seed(7, 3, 1));
        let b = augmented_view(&photo(), &pre, &cfg, view_seed(7, 3, 1));
        let c = augmented_view(&photo(), &pre, &cfg, view_seed(7, 3, 2));
        assert_eq!(a.len(), 3 * 48 * 48);
        assert_eq!(a, b, "same seed, same view");
        assert_ne!(a, c, "another view differs");
        assert!(a.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn disabled_augmentation_is_the_eval_view() {
        let pre = Preprocessing::for_size(32);
        let cfg = AugmentConfig {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(
            augmented_view(&photo(), &pre, &cfg, 1),
            eval_view(&photo(), &pre)
        );
        assert!(
            AugmentConfig {
                zoom_min: 0.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            AugmentConfig {
                low_res_probability: 1.5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn a_resolution_drop_blurs_the_view() {
        let pre = Preprocessing::for_size(48);
        let sharp = AugmentConfig {
            zoom_min: 1.0,
            rotation_degrees: 0.0,
            brightness: [1.0, 1.0],
            flip: false,
            ..Default::default()
        };
        let blurred = AugmentConfig {
            low_res_probability: 1.0,
            ..sharp.clone()
        };
        let a = augmented_view(&photo(), &pre, &sharp, 3);
        let b = augmented_view(&photo(), &pre, &blurred, 3);
        assert_eq!(a.len(), b.len());
        assert_ne!(a, b);
    }
}
