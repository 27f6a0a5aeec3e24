//! Accuracy and speed benchmark of the default training run (not a test).
//!
//! `cargo run --release --bin bench -- [DATA_DIR] [--config FILE.json] [--sweep FILE.jsonl] [--baseline]
//!     [--device auto|wgpu|cpu] [--batches 1,32] [--inference-only] [--split-out FILE.json]`
//!
//! Trains on the tutorial's photos (default `../shared/datasets/dogcat-sub`) and prints a
//! markdown table: validation accuracy and wall time per phase, backbone and fine-tune
//! throughput, peak RSS, and the validation accuracy under perturbations that stand in for
//! photos from elsewhere (mirrored, grayscale, dark, low resolution, tight crop, rotated).
//! With `--sweep`, the frozen pass runs once and each line of the file (a partial training
//! config with the same cut, views and input size) is fitted on it, one table row each.
//! `--inference-only` prints the device and throughput rows and stops before training.
//! `--split-out` writes the run's stratified split (classes, train and validation photos with
//! their labels) as JSON and stops, so that a peer pipeline trains on the same photos.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use image::RgbImage;
use imageproc::geometric_transformations::{Interpolation, rotate_about_center};
use transferd::ingest;
use transferd::ml::backbone::{Backbone, EfficientNetLite, activation_shape};
use transferd::ml::cache::RowCache;
use transferd::ml::config::{BackboneChoice, TrainConfig};
use transferd::ml::data::{self, FolderDataset};
use transferd::ml::device::{DeviceChoice, select};
use transferd::ml::evaluate::argmax;
use transferd::ml::events::{Cancel, Phase, TrainEvent};
use transferd::ml::head::{TransferModel, TransferModelConfig};
use transferd::ml::lanes;
use transferd::ml::phases::logits_of;
use transferd::ml::preprocess::{self, Preprocessing};
use transferd::ml::train::{self, Resume, TrainOutcome};
use transferd::ml::weights;

// The same allocator as the service (see main.rs), so that the figures are the service's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The CPU as a table should state it: model, cores, and the vector extensions that decide
/// which GEMM kernels run.
fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let ext: Vec<&str> = ["avx2", "fma", "avx512f"]
        .into_iter()
        .filter(|f| has(f))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "{model}, {cores} cores, {}{}",
        ext.join(" "),
        if has("avx512f") { "" } else { " (no avx512f)" }
    )
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

type Perturbation = (&'static str, fn(&RgbImage) -> RgbImage);

/// Perturbations standing in for photos from other sources.
const PERTURBATIONS: [Perturbation; 6] = [
    ("mirrored", |i| image::imageops::flip_horizontal(i)),
    ("grayscale", |i| {
        image::DynamicImage::ImageLuma8(image::imageops::grayscale(i)).into_rgb8()
    }),
    ("dark x0.5", |i| {
        let mut o = i.clone();
        o.pixels_mut()
            .for_each(|p| p.0.iter_mut().for_each(|c| *c /= 2));
        o
    }),
    ("low-res 48px", |i| {
        let (w, h) = i.dimensions();
        let s = 48.0 / w.min(h) as f32;
        let small = image::imageops::resize(
            i,
            (w as f32 * s) as u32,
            (h as f32 * s) as u32,
            image::imageops::FilterType::Triangle,
        );
        image::imageops::resize(&small, w, h, image::imageops::FilterType::Triangle)
    }),
    ("tight crop 60%", |i| {
        let (w, h) = i.dimensions();
        image::imageops::crop_imm(i, w / 5, h / 5, w * 3 / 5, h * 3 / 5).to_image()
    }),
    ("rotated 20deg", |i| {
        rotate_about_center(
            i,
            20f32.to_radians(),
            Interpolation::Bilinear,
            image::Rgb([127, 127, 127]),
        )
    }),
];

/// Activations at block `k` of every validation photo under each perturbation.
fn perturbed_caches(
    ds: &FolderDataset,
    val: &[usize],
    config: &TrainConfig,
    backbone: &EfficientNetLite,
    k: usize,
    device: &Device,
) -> Vec<(&'static str, RowCache)> {
    let s = config.input_size_for(backbone.kind());
    let pre = Preprocessing::for_size(s);
    let images: Vec<(RgbImage, usize, usize)> = val
        .iter()
        .filter_map(|&i| {
            let b = std::fs::read(&ds.samples[i].path).ok()?;
            Some((
                preprocess::decode(&b, config.max_image_dimension).ok()?,
                ds.samples[i].label,
                i,
            ))
        })
        .collect();
    PERTURBATIONS
        .iter()
        .map(|(name, f)| {
            let mut cache = RowCache::new(&activation_shape(backbone.kind(), k, s));
            if k == 0 {
                cache = RowCache::new(&[3, s, s]);
            }
            for chunk in images.chunks(32) {
                let mut flat = Vec::new();
                for (img, _, _) in chunk {
                    flat.extend(preprocess::eval_view(&f(img), &pre));
                }
                let x =
                    Tensor::<4>::from_data(TensorData::new(flat, [chunk.len(), 3, s, s]), device);
                let labels: Vec<usize> = chunk.iter().map(|c| c.1).collect();
                let samples: Vec<usize> = chunk.iter().map(|c| c.2).collect();
                // With nothing frozen the model takes the image itself.
                let input = if k == 0 {
                    x
                } else {
                    backbone.forward_bottom(x, k)
                };
                cache.push_tensor(input, &labels, &samples);
            }
            (*name, cache)
        })
        .collect()
}

/// Accuracy of a full model's top (from block `k`) on a cache of activations.
fn accuracy(model: &TransferModel, k: usize, cache: &RowCache, device: &Device) -> f64 {
    let logits = logits_of(&model.top(k), cache, 32, device);
    let correct = logits
        .iter()
        .zip(&cache.labels)
        .filter(|(l, y)| argmax(l) == **y)
        .count();
    correct as f64 / cache.len().max(1) as f64
}

fn throughput(
    backbone: &EfficientNetLite,
    config: &TrainConfig,
    device: &Device,
    batches: &[usize],
) -> Vec<(String, String)> {
    let kind = backbone.kind();
    let s = config.input_size_for(kind);
    let mut rows = Vec::new();
    // As predictions and the frozen pass run it (see `ml::fused`).
    let folded = backbone.clone().folded();
    // As the frozen pass and predictions run it: a batch's slices on one thread per core.
    let lanes = lanes::lanes(device);
    let forward = |images: &[usize]| {
        lanes::map_slices(images, lanes, lanes::Work::Foreground, |slice| {
            let x = Tensor::<4>::zeros([slice.len(), 3, s, s], device);
            folded.features(x).into_data()
        })
    };
    for &batch in batches {
        let images: Vec<usize> = (0..batch).collect();
        let _ = forward(&images);
        let (reps, secs) = timed(|| {
            let _ = forward(&images);
        });
        let n = (batch * reps) as f64;
        rows.push((
            // A single image's layers spread over the pool, a batch's slices over the lanes:
            // either way, every core.
            format!(
                "backbone forward, batch {batch} ({lanes} thread{})",
                if lanes == 1 { "" } else { "s" }
            ),
            format!("{:.1} img/s ({:.1} ms/img)", n / secs, secs * 1e3 / n),
        ));
    }
    let k = config.finetune.unfreeze.first_block(kind.num_blocks());
    let ad = device.clone().autodiff();
    let shape = if k == 0 {
        [3, s, s]
    } else {
        activation_shape(kind, k, s)
    };
    let mut top = Some(
        TransferModelConfig::new(2)
            .with_backbone(kind)
            .from_backbone(backbone, k, device)
            .unfreeze()
            .fork(&ad)
            .train(),
    );
    let mut optim = AdamWConfig::new().init();
    let x = Tensor::<4>::zeros([32, shape[0], shape[1], shape[2]], &ad);
    let y = Tensor::<1, Int>::zeros([32], &ad);
    let loss_fn = CrossEntropyLossConfig::new().init(&ad);
    let mut step = || {
        let model = top.take().expect("a model between steps");
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let model = optim.step(1e-4, model, grads);
        let _ = model.valid().head.weight.val().into_data(); // wait for queued GPU work
        top = Some(model);
    };
    step();
    let (steps, secs) = timed(step);
    let what = if k == 0 {
        "full network".to_string()
    } else {
        format!("top from block {k}")
    };
    rows.push((
        format!("fine-tune step ({what}), batch 32"),
        format!("{:.1} img/s", (32 * steps) as f64 / secs),
    ));
    rows
}

/// Seconds each throughput row runs for (after one warm-up call), as the ONNX Runtime peer
/// runs its own (`bench/peers/onnx_peer.py`): long enough that this machine's swings of
/// speed average out.
const MEASURE_SECONDS: f64 = 10.0;

/// Calls `f` until [`MEASURE_SECONDS`] have passed (at least twice): (calls, seconds).
fn timed(mut f: impl FnMut()) -> (usize, f64) {
    let t = Instant::now();
    let mut calls = 0;
    while calls < 2 || t.elapsed().as_secs_f64() < MEASURE_SECONDS {
        f();
        calls += 1;
    }
    (calls, t.elapsed().as_secs_f64())
}

fn print_run(outcome: &TrainOutcome, config: &TrainConfig, data_dir: &Path, total: f64) {
    println!("| measure | value |\n|---|---|");
    println!(
        "| data | {} ({} train / {} val images, {} skipped) |",
        data_dir.display(),
        outcome.train_images,
        outcome.val_images,
        outcome.skipped.len()
    );
    println!(
        "| frozen pass (decode, augment, frozen backbone; {} views/train image) | {:.1} s |",
        config.views, outcome.cache_seconds
    );
    for p in &outcome.phases {
        println!(
            "| {} | best epoch {}/{}, val acc {:.2}%, val loss {:.4}, {:.1} s |",
            p.phase,
            p.best_epoch,
            p.epochs_run,
            p.best_val_accuracy * 100.0,
            p.best_val_loss,
            p.seconds
        );
    }
    let e = &outcome.evaluation;
    println!(
        "| **final validation accuracy** | **{:.2}%** ({} of {} wrong) |",
        e.accuracy * 100.0,
        e.misclassified.len(),
        outcome.val_images
    );
    println!(
        "| calibration | T = {:.2}, ECE {:.4} → {:.4} |",
        e.calibration.temperature, e.calibration.ece_before, e.calibration.ece_after
    );
    if let Some(t) = &e.training {
        println!(
            "| head | L2 {:.0e}, chosen among {} penalties on held-out photos |",
            t.head.l2.unwrap_or(f64::NAN),
            t.head.path.len()
        );
        println!("| fine-tune decision | {} |", t.finetune.reason);
        println!(
            "| estimate | {:?} on {} photos; served model trained on {} photos |",
            t.estimate, t.estimate_images, t.trained_on_images
        );
    }
    println!("| **whole run** | **{total:.1} s** |");
}

/// Writes the split a run with `config` makes of `data_dir`: the same scan (sorted paths,
/// duplicates dropped) and the same seeded stratified split as `train::prepare`.
fn write_split(data_dir: &Path, config: &TrainConfig, out: &Path) -> anyhow::Result<()> {
    let staged = ingest::stage_folder(data_dir, &ingest::Limits::local(config))?;
    let ds = staged.ingested.dataset();
    let labels: Vec<usize> = ds.samples.iter().map(|s| s.label).collect();
    let (train, val) = data::stratified_split(&labels, config.val_fraction, config.seed);
    // The peers read the photos where they are, not the staged copies.
    let images = &staged.ingested.images;
    let rows = |idx: &[usize]| -> anyhow::Result<Vec<serde_json::Value>> {
        idx.iter()
            .map(|&i| {
                Ok(serde_json::json!({
                    "path": std::fs::canonicalize(data_dir.join(&images[i].original_name))?,
                    "label": ds.samples[i].label,
                }))
            })
            .collect()
    };
    let split = serde_json::json!({
        "classes": ds.classes,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "train": rows(&train)?,
        "val": rows(&val)?,
    });
    std::fs::write(out, serde_json::to_vec_pretty(&split)?)?;
    eprintln!(
        "split of {}: {} train, {} validation photos -> {}",
        data_dir.display(),
        train.len(),
        val.len(),
        out.display()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let flag_values: Vec<String> = [
        "--config",
        "--sweep",
        "--device",
        "--batches",
        "--split-out",
    ]
    .iter()
    .filter_map(|f| value_of(f))
    .collect();
    let data_dir = args
        .iter()
        .find(|a| !a.starts_with("--") && !flag_values.contains(a))
        .map_or_else(
            || PathBuf::from("../shared/datasets/dogcat-sub"),
            PathBuf::from,
        );
    let config = transferd::cli::read_config(value_of("--config").as_deref().map(Path::new))?;
    if let Some(out) = value_of("--split-out") {
        return write_split(&data_dir, &config, Path::new(&out));
    }
    let choice = match value_of("--device").as_deref() {
        None | Some("cpu") => DeviceChoice::Cpu,
        Some("wgpu") => DeviceChoice::Wgpu,
        Some("auto") => DeviceChoice::Auto,
        Some(other) => anyhow::bail!("--device must be auto, wgpu or cpu, not {other}"),
    };
    let selected = select(choice)?;
    let device = selected.device.clone();
    let batches: Vec<usize> = value_of("--batches")
        .map_or(Ok(vec![1, 32]), |b| b.split(',').map(str::parse).collect())?;
    let load = |b: Backbone| -> anyhow::Result<EfficientNetLite> {
        Ok(weights::load_backbone(&weights::locate(Path::new("data"), b, true)?, b, &device)?.0)
    };
    // Throughput is measured on the configured backbone (Lite0 for `auto`, until the data
    // says otherwise).
    let mut backbone = load(match config.backbone {
        BackboneChoice::Fixed(b) => b,
        BackboneChoice::Auto => Backbone::Lite0,
    })?;
    let mut rows = vec![(
        "device".to_string(),
        format!(
            "{} {}, {} lane(s) · {}",
            selected.backend,
            selected.adapter.unwrap_or_default(),
            lanes::lanes(&device),
            cpu_description()
        ),
    )];
    rows.extend(throughput(&backbone, &config, &device, &batches));
    if args.iter().any(|a| a == "--inference-only") {
        println!("| measure | value |\n|---|---|");
        for (key, v) in &rows {
            println!("| {key} | {v} |");
        }
        return Ok(());
    }

    // Reading the folder stands in for the upload, which a service run does not time either.
    let staged = ingest::stage_folder(&data_dir, &ingest::Limits::local(&config))?;
    let ds = staged.ingested.dataset();
    let started = Instant::now();
    let mut log = |e: TrainEvent| {
        if let TrainEvent::Epoch(m) = e {
            eprintln!("{m}");
        }
    };
    let cancel = Cancel::default();
    let planned = train::plan(&ds, &config).backbone;
    if planned != backbone.kind() {
        backbone = load(planned)?;
    }
    let prepared = train::prepare(&ds, &config, &backbone, &device, &mut log, &cancel)?;
    let k = prepared.plan.cut;
    let prepare_seconds = started.elapsed().as_secs_f64();
    let mut candidates = vec![("default".to_string(), config.clone())];
    if let Some(path) = value_of("--sweep") {
        for line in std::fs::read_to_string(&path)?
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            let mut merged = serde_json::to_value(&config)?;
            merge(&mut merged, serde_json::from_str(line)?);
            candidates.push((line.to_string(), serde_json::from_value(merged)?));
        }
    }
    let perturbed = perturbed_caches(&ds, &prepared.val_ok, &config, &backbone, k, &device);
    let mut sweep_rows = Vec::new();
    let mut transfer_seconds = None;
    for (i, (name, cfg)) in candidates.iter().enumerate() {
        let t = Instant::now();
        let outcome = train::fit(
            &prepared,
            &ds,
            cfg,
            &backbone,
            &device,
            &mut log,
            &cancel,
            Resume::default(),
        )?;
        let fit_seconds = t.elapsed().as_secs_f64();
        // Perturbed validation photos are scored by the model as it was judged: the refit
        // trained on the clean validation photos themselves.
        let mut judged = outcome.model.clone();
        if let Some(head) = outcome.evaluated_head.clone() {
            judged.head = head;
        }
        let robust: Vec<f64> = perturbed
            .iter()
            .map(|(_, c)| accuracy(&judged, k, c, &device))
            .collect();
        if i == 0 {
            // Scan, frozen pass and fit: the perturbed caches are the benchmark's own cost.
            let run_seconds = prepare_seconds + fit_seconds;
            transfer_seconds = Some(run_seconds);
            print_run(&outcome, cfg, &data_dir, run_seconds);
            for (key, v) in &rows {
                println!("| {key} | {v} |");
            }
            for ((pname, _), acc) in perturbed.iter().zip(&robust) {
                println!(
                    "| val accuracy, {pname} (model before the refit) | {:.2}% |",
                    acc * 100.0
                );
            }
            println!("| peak RSS | {:.0} MiB |", peak_rss_mib());
            for m in &outcome.evaluation.misclassified {
                eprintln!(
                    "misclassified: {} (true {}, predicted {}, p {:?})",
                    m.path, m.true_label, m.predicted, m.probabilities
                );
            }
        }
        let mean = robust.iter().sum::<f64>() / robust.len() as f64;
        sweep_rows.push(format!(
            "| {name} | {:.2}% | {} | {:.4} | {:.2}% | {:.2}% | {fit_seconds:.1} s |",
            outcome.evaluation.accuracy * 100.0,
            outcome.evaluation.misclassified.len(),
            outcome.evaluation.calibration.nll_before,
            mean * 100.0,
            robust.iter().cloned().fold(f64::INFINITY, f64::min) * 100.0,
        ));
    }
    if args.iter().any(|a| a == "--baseline") {
        // The tutorial's claim, measured: the same architecture from random weights, given
        // the wall time the whole transfer run took.
        let budget = transfer_seconds.unwrap_or(300.0);
        let mut cfg = config.clone();
        cfg.warmup.enabled = false;
        cfg.finetune.enabled = transferd::ml::config::When::On;
        cfg.finetune.epochs = 0;
        cfg.baseline = transferd::ml::config::BaselineConfig {
            enabled: true,
            epochs: 50,
            learning_rate: 1e-3,
            max_seconds: Some(budget),
        };
        let outcome = train::fit(
            &prepared,
            &ds,
            &cfg,
            &backbone,
            &device,
            &mut log,
            &cancel,
            Resume::default(),
        )?;
        if let Some(p) = outcome.phases.iter().find(|p| p.phase == Phase::Baseline) {
            println!(
                "\n| from scratch, same budget ({budget:.0} s) | val acc {:.2}% after {} epoch(s) (best {}), {:.0} s |",
                p.best_val_accuracy * 100.0,
                p.epochs_run,
                p.best_epoch,
                p.seconds
            );
        }
    }
    if candidates.len() > 1 {
        println!(
            "\n| config | val acc | errors | val loss | perturbed mean | perturbed worst | fit time |\n|---|---|---|---|---|---|---|"
        );
        for r in sweep_rows {
            println!("{r}");
        }
    }
    Ok(())
}

/// Deep-merges `patch` into `base` (objects key by key, anything else replaced).
fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}
