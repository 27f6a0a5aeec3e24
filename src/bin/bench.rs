//! Accuracy and speed benchmark of the default training run (not a test).
//!
//! `cargo run --release --bin bench -- [DATA_DIR] [--config FILE.json] [--baseline]`
//! trains with the default config on the tutorial's photos (default
//! `../shared/datasets/dogcat-sub`) and prints a markdown table: validation accuracy and wall
//! time per phase, backbone and fine-tune throughput, inference speed, peak RSS, and the
//! validation accuracy under perturbations that stand in for photos from elsewhere.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use image::RgbImage;
use transferd::ml::config::TrainConfig;
use transferd::ml::head::TransferModelConfig;
use transferd::ml::infer::Predictor;
use transferd::ml::preprocess::{self, Preprocessing};
use transferd::ml::train::{Cancel, TrainEvent};
use transferd::ml::{artifact, data, weights};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Perturbations standing in for photos from other sources.
fn perturbations() -> Vec<(&'static str, Box<dyn Fn(&RgbImage) -> RgbImage>)> {
    vec![
        ("clean", Box::new(|i: &RgbImage| i.clone())),
        ("mirrored", Box::new(|i: &RgbImage| image::imageops::flip_horizontal(i))),
        ("grayscale", Box::new(|i: &RgbImage| image::DynamicImage::ImageLuma8(image::imageops::grayscale(i)).into_rgb8())),
        ("dark x0.5", Box::new(|i: &RgbImage| {
            let mut o = i.clone();
            o.pixels_mut().for_each(|p| p.0.iter_mut().for_each(|c| *c /= 2));
            o
        })),
        ("low-res 48px", Box::new(|i: &RgbImage| {
            let (w, h) = i.dimensions();
            let s = 48.0 / w.min(h) as f32;
            let small = image::imageops::resize(i, (w as f32 * s) as u32, (h as f32 * s) as u32, image::imageops::FilterType::Triangle);
            image::imageops::resize(&small, w, h, image::imageops::FilterType::Triangle)
        })),
        ("tight crop 60%", Box::new(|i: &RgbImage| {
            let (w, h) = i.dimensions();
            image::imageops::crop_imm(i, w / 5, h / 5, w * 3 / 5, h * 3 / 5).to_image()
        })),
        ("rotated 20deg", Box::new(|i: &RgbImage| {
            imageproc::geometric_transformations::rotate_about_center(
                i, 20f32.to_radians(), imageproc::geometric_transformations::Interpolation::Bilinear, image::Rgb([127, 127, 127]))
        })),
    ]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data_dir = args.iter().find(|a| !a.starts_with("--") && !a.ends_with(".json")).map_or_else(
        || PathBuf::from("../shared/datasets/dogcat-sub"),
        PathBuf::from,
    );
    let mut config = match args.iter().position(|a| a == "--config") {
        Some(i) => transferd::cli::read_config(Some(std::path::Path::new(&args[i + 1])))?,
        None => TrainConfig::default(),
    };
    let device = Device::flex();
    let weights_path = weights::locate(std::path::Path::new("data"), true)?;
    let (backbone, _) = weights::load_backbone(&weights_path, &device)?;

    // Throughput of the building blocks.
    let s = config.input_size;
    let mut rows: Vec<(String, String)> = Vec::new();
    for batch in [1usize, 32] {
        let x = Tensor::<4>::zeros([batch, 3, s, s], &device);
        let _ = backbone.features(x.clone()).into_data();
        let reps = if batch == 1 { 10 } else { 2 };
        let t = Instant::now();
        for _ in 0..reps {
            let _ = backbone.features(x.clone()).into_data();
        }
        let secs = t.elapsed().as_secs_f64();
        rows.push((format!("backbone forward, batch {batch}"), format!("{:.1} img/s ({:.1} ms/img)", (batch * reps) as f64 / secs, secs * 1e3 / (batch * reps) as f64)));
    }
    {
        let k = config.finetune.unfreeze.first_block();
        let ad = device.clone().autodiff();
        let shape = transferd::ml::backbone::activation_shape(k, s);
        let mut top = TransferModelConfig::new(2).from_backbone(&backbone, k, &device).unfreeze().fork(&ad).train();
        let mut optim = AdamWConfig::new().init();
        let x = Tensor::<4>::zeros([32, shape[0], shape[1], shape[2]], &ad);
        let y = Tensor::<1, Int>::zeros([32], &ad);
        let loss_fn = CrossEntropyLossConfig::new().init(&ad);
        let t = Instant::now();
        for _ in 0..3 {
            let loss = loss_fn.forward(top.forward(x.clone()), y.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &top);
            top = optim.step(1e-4, top, grads);
        }
        let _ = top.valid();
        let secs = t.elapsed().as_secs_f64();
        rows.push((format!("fine-tune step (top from block {k}), batch 32"), format!("{:.1} img/s", 96.0 / secs)));
    }

    if args.iter().any(|a| a == "--baseline") {
        config.baseline.enabled = true;
    }
    let t_all = Instant::now();
    let ds = data::scan(&data_dir, config.max_image_dimension, config.min_images_per_class)?;
    let mut on_event = |e: TrainEvent| {
        if let TrainEvent::Epoch(m) = e {
            eprintln!("{:<8} epoch {:>3}  train {:.4}/{:.4}  val {:.4}/{:.4}  lr {:.1e}  {:.1}s", m.phase, m.epoch, m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy, m.learning_rate, m.seconds);
        }
    };
    let outcome = transferd::ml::train::train(&ds, &config, &backbone, &device, &mut on_event, &Cancel::default())?;
    let total = t_all.elapsed().as_secs_f64();

    println!("| measure | value |\n|---|---|");
    println!("| data | {} ({} train / {} val images, {} skipped) |", data_dir.display(), outcome.train_images, outcome.val_images, outcome.skipped.len());
    println!("| frozen pass (decode, augment, frozen backbone; {} views/train image) | {:.1} s |", config.views, outcome.cache_seconds);
    for p in &outcome.phases {
        println!("| {} | best epoch {}/{}, val acc {:.2}%, val loss {:.4}, {:.1} s |", p.phase, p.best_epoch, p.epochs_run, p.best_val_accuracy * 100.0, p.best_val_loss, p.seconds);
    }
    let e = &outcome.evaluation;
    println!("| **final validation accuracy** | **{:.2}%** ({} of {} wrong) |", e.accuracy * 100.0, e.misclassified.len(), outcome.val_images);
    println!("| calibration | T = {:.2}, ECE {:.4} → {:.4} |", e.calibration.temperature, e.calibration.ece_before, e.calibration.ece_after);
    println!("| **whole run** | **{total:.1} s** |");
    for (k, v) in &rows {
        println!("| {k} | {v} |");
    }

    // Robustness: the validation photos, perturbed, through the saved model.
    let tmp = tempfile::tempdir()?;
    let saved = artifact::save(&tmp.path().join("model"), &outcome, &config)?;
    let predictor = Predictor::new(saved, outcome.model.clone(), &device);
    let pre = Preprocessing::for_size(config.input_size);
    let labels: Vec<usize> = ds.samples.iter().map(|s| s.label).collect();
    let (_, val_idx) = data::stratified_split(&labels, config.val_fraction, config.seed);
    let images: Vec<(RgbImage, usize)> = val_idx
        .iter()
        .filter_map(|&i| {
            let b = std::fs::read(&ds.samples[i].path).ok()?;
            Some((preprocess::decode(&b, config.max_image_dimension).ok()?, ds.samples[i].label))
        })
        .collect();
    for (name, f) in perturbations() {
        let views: Vec<Vec<f32>> = images.iter().map(|(img, _)| preprocess::eval_view(&f(img), &pre)).collect();
        let probs = predictor.probabilities_of_views(views);
        let correct = probs.iter().zip(&images).filter(|(p, (_, y))| Predictor::best(p) == *y).count();
        println!("| val accuracy, {name} | {:.2}% |", 100.0 * correct as f64 / images.len() as f64);
    }
    println!("| peak RSS | {:.0} MiB |", peak_rss_mib());
    Ok(())
}
