//! Learning-curve benchmark (not a test): accuracy against photos per class, several seeds,
//! on photos no run trained on.
//!
//! `cargo run --release --bin learning_curve -- [DATA_DIR] [--sizes 5,10,20,50,100,all]
//!     [--seeds 3] [--test-fraction 0.25] [--out DIR] [--config FILE.json]
//!     [--peer-backbone lite0]`
//!
//! A fixed stratified test split (seed 1000) is set aside. For each size and seed, that many
//! photos per class are drawn from the rest and a default run (or `--config`) trains on
//! them (with whichever backbone its plan picks); its model is scored on the test photos. The
//! clean pooled features of every photo from `--peer-backbone` (Lite0 by default; the same
//! preprocessing) and the draws go to `--out`
//! (`features.f32`, `index.json`), so that `bench/peers/linear_probe.py` fits its peer on
//! exactly the same photos. Prints one markdown row per run, with the test accuracy also
//! under test-time augmentation (the logits of the centre view and its mirror averaged).

use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use transferd::ingest;
use transferd::ml::backbone::Backbone;
use transferd::ml::cache::{RowCache, frozen_pass};
use transferd::ml::config::TrainConfig;
use transferd::ml::data::{FolderDataset, ViewDataset, stratified_split};
use transferd::ml::device::{DeviceChoice, select};
use transferd::ml::evaluate::argmax;
use transferd::ml::events::{Cancel, Phase};
use transferd::ml::head_phase::head_logits;
use transferd::ml::phases::logits_of;
use transferd::ml::preprocess::Preprocessing;
use transferd::ml::train;
use transferd::ml::weights;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Frozen pass over `indices` (clean views): pooled features, and the images when `images`.
fn clean_pass(
    ds: &FolderDataset,
    indices: &[usize],
    config: &TrainConfig,
    backbone: &transferd::ml::backbone::EfficientNetLite,
    input_size: usize,
    images: bool,
    device: &Device,
) -> anyhow::Result<(RowCache, Option<RowCache>)> {
    let view = ViewDataset {
        samples: &ds.samples,
        indices: indices.to_vec(),
        views: 1,
        clean_first: true,
        pre: Preprocessing::for_size(input_size),
        augment: config.augment.clone(),
        seed: 0,
        max_dimension: config.max_image_dimension,
    };
    let k = if images { 0 } else { backbone.blocks.len() };
    let pass = frozen_pass(
        backbone,
        k,
        images,
        &view,
        32,
        device,
        &Cancel::default(),
        |_| {},
    )?;
    anyhow::ensure!(
        pass.failures.is_empty(),
        "undecodable photos: {:?}",
        pass.failures
    );
    Ok((pass.features, pass.activations))
}

/// The test photos through one backbone: clean and mirrored, as images and pooled features.
struct TestSet {
    backbone: transferd::ml::backbone::EfficientNetLite,
    features: RowCache,
    images: RowCache,
    mirrored_images: RowCache,
    mirrored_features: RowCache,
}

/// Each preprocessed `[3, s, s]` image mirrored left to right.
fn mirrored(images: &RowCache) -> RowCache {
    let mut out = images.clone();
    let s = images.shape[2];
    for row in out.data.chunks_mut(s) {
        row.reverse();
    }
    out
}

/// Pooled features of the pretrained backbone over cached images, as a `[1280]` cache.
fn features_of_images(
    backbone: &transferd::ml::backbone::EfficientNetLite,
    images: &RowCache,
    device: &Device,
) -> RowCache {
    let mut out = RowCache::new(&[1280]);
    for chunk in (0..images.len()).collect::<Vec<_>>().chunks(32) {
        let b = images.batch4(chunk, device);
        let labels: Vec<usize> = chunk.iter().map(|&i| images.labels[i]).collect();
        let samples: Vec<usize> = chunk.iter().map(|&i| images.samples[i]).collect();
        out.push_tensor(backbone.features(b.inputs), &labels, &samples);
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data_dir = args.first().filter(|a| !a.starts_with("--")).map_or_else(
        || PathBuf::from("../shared/datasets/dogcat-sub"),
        PathBuf::from,
    );
    let sizes: Vec<Option<usize>> = flag(&args, "--sizes")
        .unwrap_or("5,10,20,50,100,all")
        .split(',')
        .map(|s| {
            if s == "all" {
                None
            } else {
                Some(s.parse().expect("a size"))
            }
        })
        .collect();
    let seeds: u64 = flag(&args, "--seeds").map_or(3, |s| s.parse().expect("a seed count"));
    let test_fraction: f64 =
        flag(&args, "--test-fraction").map_or(0.25, |s| s.parse().expect("a fraction"));
    let out = PathBuf::from(flag(&args, "--out").unwrap_or("target/learning-curve"));
    let config: TrainConfig = match flag(&args, "--config") {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
        None => TrainConfig::default(),
    };
    std::fs::create_dir_all(&out)?;

    let device = select(DeviceChoice::Cpu)?.device;
    let staged = ingest::stage_folder(&data_dir, &ingest::Limits::local(&config))?;
    let ds = staged.ingested.dataset();
    let labels: Vec<usize> = ds.samples.iter().map(|s| s.label).collect();
    let (pool, test) = stratified_split(&labels, test_fraction, 1000);
    let peer_kind = match flag(&args, "--peer-backbone").unwrap_or("lite0") {
        "lite0" => Backbone::Lite0,
        "lite1" => Backbone::Lite1,
        "lite2" => Backbone::Lite2,
        other => anyhow::bail!("--peer-backbone must be lite0, lite1 or lite2, not {other}"),
    };
    // Per backbone a run may pick: the network, and the test photos through it.
    let mut tests: HashMap<Backbone, Rc<TestSet>> = HashMap::new();
    let mut test_set = |kind: Backbone| -> anyhow::Result<Rc<TestSet>> {
        if let Some(t) = tests.get(&kind) {
            return Ok(t.clone());
        }
        let started = Instant::now();
        let backbone = weights::load_backbone(
            &weights::locate(&PathBuf::from("data"), kind, true)?,
            kind,
            &device,
        )?
        .0;
        let size = config.input_size_for(kind);
        let (features, images) = clean_pass(&ds, &test, &config, &backbone, size, true, &device)?;
        let images = images.expect("images kept");
        let mirrored_images = mirrored(&images);
        let mirrored_features = features_of_images(&backbone, &mirrored_images, &device);
        eprintln!(
            "{kind}: the test photos through it in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let t = Rc::new(TestSet {
            backbone,
            features,
            images,
            mirrored_images,
            mirrored_features,
        });
        tests.insert(kind, t.clone());
        Ok(t)
    };
    let peer = test_set(peer_kind)?;
    let (pool_features, _) = clean_pass(
        &ds,
        &pool,
        &config,
        &peer.backbone,
        config.input_size_for(peer_kind),
        false,
        &device,
    )?;
    let test_features = peer.features.clone();

    // Every photo's features, in dataset order, for the peer.
    let mut features = vec![0f32; ds.samples.len() * 1280];
    for cache in [&test_features, &pool_features] {
        for r in 0..cache.len() {
            let i = cache.samples[r];
            features[i * 1280..(i + 1) * 1280].copy_from_slice(cache.row(r));
        }
    }
    let bytes: Vec<u8> = features.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out.join("features.f32"), bytes)?;

    println!(
        "| photos per class | seed | backbone | transferd test accuracy | with TTA | estimate | fine-tune | L2 | run time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut runs = Vec::new();
    for size in &sizes {
        for seed in 0..seeds {
            let mut rng = ChaCha8Rng::seed_from_u64(seed * 7919 + 13);
            let mut chosen = Vec::new();
            for c in 0..ds.classes.len() {
                let mut members: Vec<usize> =
                    pool.iter().copied().filter(|&i| labels[i] == c).collect();
                members.shuffle(&mut rng);
                members.truncate(size.unwrap_or(usize::MAX));
                chosen.extend(members);
            }
            chosen.sort_unstable();
            let subset = FolderDataset {
                classes: ds.classes.clone(),
                samples: chosen.iter().map(|&i| ds.samples[i].clone()).collect(),
                skipped: Vec::new(),
            };
            let mut cfg = config.clone();
            cfg.seed = seed;
            let size_name = size.map_or("all".to_string(), |s| s.to_string());
            let t = Instant::now();
            let planned = train::plan(&subset, &cfg).backbone;
            let set = test_set(planned)?;
            let TestSet {
                backbone,
                features: test_features,
                images: test_images,
                mirrored_images,
                mirrored_features,
            } = &*set;
            let outcome = train::train(
                &subset,
                &cfg,
                backbone,
                &device,
                &mut |_| {},
                &Cancel::default(),
            )?;
            let seconds = t.elapsed().as_secs_f64();
            let report = outcome.evaluation.training.clone().expect("report");
            let score = |images: &RowCache, features: &RowCache| {
                if report.finetune.kept {
                    logits_of(&outcome.model, images, 32, &device)
                } else {
                    head_logits(&outcome.model.head, features, &device)
                }
            };
            let logits = score(test_images, test_features);
            let flipped = score(mirrored_images, mirrored_features);
            let averaged: Vec<Vec<f32>> = logits
                .iter()
                .zip(&flipped)
                .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect())
                .collect();
            let accuracy_of = |logits: &[Vec<f32>]| {
                let correct = logits
                    .iter()
                    .zip(&test_features.labels)
                    .filter(|(l, y)| argmax(l) == **y)
                    .count();
                correct as f64 / logits.len() as f64
            };
            let (accuracy, tta) = (accuracy_of(&logits), accuracy_of(&averaged));
            let head_seconds = outcome
                .phases
                .iter()
                .find(|p| p.phase == Phase::Warmup)
                .map_or(0.0, |p| p.seconds);
            println!(
                "| {size_name} | {seed} | {planned} | {:.2}% | {:.2}% | {:?} ({:.2}%) | {} | {:.0e} | {seconds:.1} s (head {head_seconds:.1} s) |",
                accuracy * 100.0,
                tta * 100.0,
                report.estimate,
                outcome.evaluation.accuracy * 100.0,
                if report.finetune.kept {
                    "kept"
                } else if report.finetune.ran {
                    "ran, not kept"
                } else {
                    "skipped"
                },
                report.head.l2.unwrap_or(f64::NAN),
            );
            runs.push(serde_json::json!({
                "size": size_name, "seed": seed, "train": chosen,
                "transferd": {"backbone": planned, "accuracy": accuracy, "tta_accuracy": tta, "estimate": report.estimate,
                    "estimated_accuracy": outcome.evaluation.accuracy,
                    "finetune_kept": report.finetune.kept, "l2": report.head.l2, "seconds": seconds,
                    "head_seconds": head_seconds},
            }));
        }
    }
    let index = serde_json::json!({
        "dataset": data_dir, "classes": ds.classes,
        "labels": labels, "test": test_features.samples, "runs": runs, "peer_backbone": peer_kind,
        "config": config,
    });
    std::fs::write(out.join("index.json"), serde_json::to_string(&index)?)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
