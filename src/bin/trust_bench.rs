//! Measures the trust features on a folder-per-class dataset (`bench/trust.sh`): the label
//! audit against injected label noise (precision and recall of the flagged list, accuracy
//! of a head retrained after the fixes), the near-duplicate threshold (edited copies against
//! distinct photos), "unknown" answers (AUROC and FPR at 95% TPR against photos of other
//! subjects and a held-out class) and the export's size and time per backbone.
//!
//! Usage: `trust_bench DATA_DIR FOREIGN_DIR` (frozen Lite0 features, the default views).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use transferd::ingest;
use transferd::ml::audit::{self, AuditRows, Split};
use transferd::ml::backbone::{Backbone, EfficientNetLite, FEATURES};
use transferd::ml::cache::RowCache;
use transferd::ml::config::{BackboneChoice, TrainConfig};
use transferd::ml::events::Cancel;
use transferd::ml::export::{self, ExportFormat};
use transferd::ml::head::TransferModelConfig;
use transferd::ml::head_fit::{self, Standardizer};
use transferd::ml::ood::{self, Gaussians, Shrinkage};
use transferd::ml::preprocess::{self, Preprocessing};
use transferd::ml::{evaluate, train, weights};

fn features(
    backbone: &EfficientNetLite,
    views: &[Vec<f32>],
    s: usize,
    device: &Device,
) -> Vec<Vec<f32>> {
    let backbone = backbone.clone().folded();
    let mut out = Vec::new();
    for chunk in views.chunks(16) {
        let data: Vec<f32> = chunk.iter().flatten().copied().collect();
        let x = Tensor::<4>::from_data(TensorData::new(data, [chunk.len(), 3, s, s]), device);
        let f = backbone.features(x).into_data();
        out.extend(
            f.as_slice::<f32>()
                .unwrap()
                .chunks(FEATURES)
                .map(<[f32]>::to_vec),
        );
    }
    out
}

/// AUROC (in-distribution scores low, foreign high) and the FPR at 95% TPR (the share of
/// in-distribution photos above the threshold that flags 95% of the foreign ones... here
/// stated the usual way: foreign photos passing when 95% of in-distribution ones pass).
fn auroc_fpr(inside: &[f64], outside: &[f64]) -> (f64, f64) {
    let mut wins = 0.0;
    for &o in outside {
        for &i in inside {
            wins += if o > i {
                1.0
            } else if o == i {
                0.5
            } else {
                0.0
            };
        }
    }
    let t = ood::quantile(inside, 0.95);
    let passing = outside.iter().filter(|&&o| o <= t).count() as f64;
    (
        wins / (inside.len() * outside.len()) as f64,
        passing / outside.len() as f64,
    )
}

/// Seconds the audit's pair scan takes over `n` photos of random 1280-wide features.
fn pair_scan_seconds(n: usize) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let rows = AuditRows {
        x: (0..n * FEATURES)
            .map(|_| rng.random_range(0.0..6.0f32))
            .collect(),
        dim: FEATURES,
        labels: vec![0; n],
        samples: (0..n).collect(),
        splits: vec![Split::Train; n],
    };
    let t = Instant::now();
    let _ = audit::neighbours(&rows, audit::DUPLICATE_SIMILARITY);
    t.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args[1] == "--pair-scan" {
        // `trust_bench --pair-scan N…`: only the audit's pair scan, at each size.
        println!("| photos | pair scan |\n|---|---|");
        for n in &args[2..] {
            println!("| {n} | {:.2} s |", pair_scan_seconds(n.parse()?));
        }
        return Ok(());
    }
    let (data_dir, foreign_dir) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    let device = Device::flex();
    let mut config = TrainConfig {
        backbone: BackboneChoice::Fixed(Backbone::Lite0),
        ..Default::default()
    };
    config.finetune.enabled = transferd::ml::config::When::Off;
    config.refit = false;
    let b = Backbone::Lite0;
    let backbone =
        weights::load_backbone(&weights::locate(Path::new("data"), b, true)?, b, &device)?.0;
    let staged = ingest::stage_folder(&data_dir, &ingest::Limits::local(&config))?;
    let ds = staged.ingested.dataset();
    let started = Instant::now();
    let prepared = train::prepare(
        &ds,
        &config,
        &backbone,
        &device,
        &mut |_| {},
        &Cancel::default(),
    )?;
    eprintln!("frozen pass: {:.1} s", started.elapsed().as_secs_f64());
    let classes = ds.classes.len();
    let train_rows = AuditRows::from_caches(&prepared.train.features, &RowCache::new(&[FEATURES]));
    let val_rows = AuditRows::from_caches(&RowCache::new(&[FEATURES]), &prepared.val.features);
    println!(
        "CPU: see `bench/trust.sh` header; dataset {} photos ({} train, {} validation), {classes} classes\n",
        ds.samples.len(),
        train_rows.len(),
        val_rows.len()
    );

    // 1. Label noise.
    println!(
        "| flipped | flagged | precision | recall | accuracy, clean labels | noisy | after the suggested fixes | audit time |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let head_accuracy = |rows: &AuditRows, labels: &[usize], keep: &[bool]| {
        let mut cache = RowCache::new(&[FEATURES]);
        for i in (0..rows.len()).filter(|&i| keep[i]) {
            cache
                .push_rows(
                    &rows.x[i * FEATURES..(i + 1) * FEATURES],
                    &[labels[i]],
                    &[rows.samples[i]],
                )
                .unwrap();
        }
        let st = Standardizer::fit(&[&cache]);
        let data = st.rows(&[(&cache, true)], None);
        let model = head_fit::fit_rows(&data, classes, None, audit::DEFAULT_L2, None);
        let linear = st.to_linear(&model, &device);
        let logits =
            transferd::ml::head_phase::head_logits(&linear, &prepared.val.features, &device);
        let correct = logits
            .iter()
            .zip(&prepared.val.features.labels)
            .filter(|(l, y)| evaluate::argmax(l) == **y)
            .count();
        correct as f64 / logits.len() as f64
    };
    let all = vec![true; train_rows.len()];
    let clean_accuracy = head_accuracy(&train_rows, &train_rows.labels, &all);
    for rate in [0.02, 0.05, 0.10] {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let mut order: Vec<usize> = (0..train_rows.len()).collect();
        order.shuffle(&mut rng);
        let flipped: HashSet<usize> = order[..(rate * train_rows.len() as f64).round() as usize]
            .iter()
            .copied()
            .collect();
        let mut noisy = train_rows.labels.clone();
        for &i in &flipped {
            noisy[i] = (noisy[i] + rng.random_range(1..classes)) % classes;
        }
        let rows = AuditRows {
            labels: noisy.clone(),
            x: train_rows.x.clone(),
            dim: FEATURES,
            samples: train_rows.samples.clone(),
            splits: vec![Split::Train; train_rows.len()],
        };
        let t = Instant::now();
        let probs = audit::out_of_fold(&rows, classes, audit::DEFAULT_L2, 1);
        let (flagged, _) = audit::label_issues(&probs, &noisy, classes);
        let seconds = t.elapsed().as_secs_f64();
        let hits = flagged.iter().filter(|(i, _)| flipped.contains(i)).count();
        let mut fixed = noisy.clone();
        for &(i, j) in &flagged {
            fixed[i] = j;
        }
        println!(
            "| {:.0}% ({}) | {} | {:.1}% | {:.1}% | {:.2}% | {:.2}% | {:.2}% | {:.1} s |",
            rate * 100.0,
            flipped.len(),
            flagged.len(),
            100.0 * hits as f64 / flagged.len().max(1) as f64,
            100.0 * hits as f64 / flipped.len().max(1) as f64,
            100.0 * clean_accuracy,
            100.0 * head_accuracy(&rows, &noisy, &all),
            100.0 * head_accuracy(&rows, &fixed, &all),
            seconds,
        );
    }

    // 2. Near-duplicates: an edited copy of each of 100 validation photos.
    let pre = Preprocessing::for_size(Backbone::Lite0.input_size());
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut originals = Vec::new();
    let mut copies = Vec::new();
    for &s in prepared.val_ok.iter().take(100) {
        let bytes = std::fs::read(&ds.samples[s].path)?;
        let image = preprocess::decode(&bytes, 4096)?;
        let (w, h) = image.dimensions();
        let scale = rng.random_range(0.6..0.9);
        let crop = (w / 25, h / 25);
        let cropped =
            image::imageops::crop_imm(&image, crop.0, crop.1, w - 2 * crop.0, h - 2 * crop.1)
                .to_image();
        let small = image::imageops::resize(
            &cropped,
            (w as f64 * scale) as u32,
            (h as f64 * scale) as u32,
            image::imageops::FilterType::Triangle,
        );
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 60).encode_image(&small)?;
        let copy = preprocess::decode(&jpeg, 4096)?;
        originals.push(preprocess::eval_view(&image, &pre));
        copies.push(preprocess::eval_view(&copy, &pre));
    }
    let s = pre.input_size;
    let (fa, fb) = (
        features(&backbone, &originals, s, &device),
        features(&backbone, &copies, s, &device),
    );
    let mut all_rows = AuditRows::from_caches(&prepared.train.features, &prepared.val.features);
    let n = all_rows.len();
    for (a, b) in fa.iter().zip(&fb) {
        all_rows.x.extend(a);
        all_rows.x.extend(b);
    }
    let m = fa.len();
    all_rows.labels.extend(std::iter::repeat_n(0, 2 * m));
    all_rows.samples.extend(0..2 * m);
    all_rows
        .splits
        .extend(std::iter::repeat_n(Split::Train, 2 * m));
    let (pairs, _) = audit::neighbours(&all_rows, 0.0);
    let mut copy_sims = Vec::new();
    let mut distinct_max = vec![f64::NEG_INFINITY; n];
    for &(i, j, sim) in &pairs {
        if i >= n && j == i + 1 && (i - n) % 2 == 0 {
            copy_sims.push(sim);
        } else if i < n && j < n {
            distinct_max[i] = distinct_max[i].max(sim);
            distinct_max[j] = distinct_max[j].max(sim);
        }
    }
    copy_sims.sort_by(f64::total_cmp);
    let above = pairs
        .iter()
        .filter(|p| p.0 < n && p.1 < n && p.2 >= audit::DUPLICATE_SIMILARITY)
        .count();
    println!("\n| near-duplicates | value |\n|---|---|");
    println!(
        "| edited copies (crop 4%, resize 60–90%, JPEG q60): lowest / 5th percentile / median similarity | {:.3} / {:.3} / {:.3} |",
        copy_sims[0],
        ood::quantile(&copy_sims, 0.05),
        ood::quantile(&copy_sims, 0.5)
    );
    println!(
        "| copies found at the threshold {} | {} of {} |",
        audit::DUPLICATE_SIMILARITY,
        copy_sims
            .iter()
            .filter(|&&v| v >= audit::DUPLICATE_SIMILARITY)
            .count(),
        copy_sims.len()
    );
    println!(
        "| dataset photos: 99th percentile / highest of each photo's most similar other photo | {:.3} / {:.3} |",
        ood::quantile(&distinct_max, 0.99),
        distinct_max
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max)
    );
    println!(
        "| dataset pairs flagged at the threshold (look at them: real duplicates or not) | {above} |"
    );

    // 3. Unknown answers.
    let mut foreign = Vec::new();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&foreign_dir)? {
        let path = entry?.path();
        if let Ok(image) = std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(preprocess::decode(&b, 8192)?))
        {
            foreign.push(preprocess::eval_view(&image, &pre));
            names.push(path.file_name().unwrap().to_string_lossy().to_string());
        }
    }
    let foreign_f = features(&backbone, &foreign, s, &device);
    let tr = &prepared.train.features;
    let val_first: Vec<usize> = (0..prepared.val.features.len()).collect();
    println!("\n{} foreign photos: {}\n", names.len(), names.join(", "));
    println!(
        "| score | shrinkage | AUROC, other subjects | FPR at 95% TPR | AUROC, held-out class ({}) | FPR at 95% TPR |",
        ds.classes[classes - 1]
    );
    println!("|---|---|---|---|---|---|");
    let st = Standardizer::fit(&[tr]);
    let data = st.rows(&[(tr, true)], None);
    let head = st.to_linear(
        &head_fit::fit_rows(&data, classes, None, audit::DEFAULT_L2, None),
        &device,
    );
    let msp = |rows: &[&[f32]]| -> Vec<f64> {
        let mut c = RowCache::new(&[FEATURES]);
        for r in rows {
            c.push_rows(r, &[0], &[0]).unwrap();
        }
        transferd::ml::head_phase::head_logits(&head, &c, &device)
            .iter()
            .map(|l| {
                -(evaluate::softmax(l, 1.0)
                    .iter()
                    .cloned()
                    .fold(0.0f32, f32::max) as f64)
            })
            .collect()
    };
    let val_refs: Vec<&[f32]> = val_first
        .iter()
        .map(|&r| prepared.val.features.row(r))
        .collect();
    let foreign_refs: Vec<&[f32]> = foreign_f.iter().map(Vec::as_slice).collect();
    let (a, f) = auroc_fpr(&msp(&val_refs), &msp(&foreign_refs));
    println!(
        "| max softmax probability (baseline) | – | {a:.3} | {:.1}% | – | – |",
        100.0 * f
    );
    for (name, shrink) in [
        ("Ledoit–Wolf", Shrinkage::LedoitWolf),
        ("0.1", Shrinkage::Fixed(0.1)),
        ("0.5", Shrinkage::Fixed(0.5)),
        ("0.9", Shrinkage::Fixed(0.9)),
    ] {
        let (g, alpha) = Gaussians::fit(&tr.data, FEATURES, &tr.labels, classes, shrink);
        let inside: Vec<f64> = val_refs.iter().map(|r| g.score(r)).collect();
        let outside: Vec<f64> = foreign_refs.iter().map(|r| g.score(r)).collect();
        let (a, f) = auroc_fpr(&inside, &outside);
        // Held-out class: fitted without the last class, scored on validation photos.
        let keep: Vec<usize> = (0..tr.len())
            .filter(|&r| tr.labels[r] != classes - 1)
            .collect();
        let rows: Vec<f32> = keep.iter().flat_map(|&r| tr.row(r).to_vec()).collect();
        let labels: Vec<usize> = keep.iter().map(|&r| tr.labels[r]).collect();
        let (h, _) = Gaussians::fit(&rows, FEATURES, &labels, classes - 1, shrink);
        let v = &prepared.val.features;
        let known: Vec<f64> = (0..v.len())
            .filter(|&r| v.labels[r] != classes - 1)
            .map(|r| h.score(v.row(r)))
            .collect();
        let held: Vec<f64> = (0..v.len())
            .filter(|&r| v.labels[r] == classes - 1)
            .map(|r| h.score(v.row(r)))
            .collect();
        let (ha, hf) = auroc_fpr(&known, &held);
        println!(
            "| Mahalanobis | {name} (α = {alpha:.3}) | {a:.3} | {:.1}% | {ha:.3} | {:.1}% |",
            100.0 * f,
            100.0 * hf
        );
    }
    let (_, summary) =
        ood::calibrate(tr, &prepared.val.features, classes, 5, 1).expect("validation photos");
    println!(
        "\nThe served threshold (calibrated on the validation photos, α = {:.3}): {:.3}",
        summary.shrinkage, summary.threshold
    );

    // 4. Export size and time.
    println!("\n| photos | audit pair scan (random features) |\n|---|---|");
    for n in [2_000, 8_000] {
        println!("| {n} | {:.2} s |", pair_scan_seconds(n));
    }

    println!(
        "\n| backbone | ONNX size | ONNX time | safetensors size | safetensors time |\n|---|---|---|---|---|"
    );
    for b in [Backbone::Lite0, Backbone::Lite1, Backbone::Lite2] {
        let bb =
            weights::load_backbone(&weights::locate(Path::new("data"), b, true)?, b, &device)?.0;
        let model = TransferModelConfig::new(2)
            .with_backbone(b)
            .from_backbone(&bb, 0, &device);
        let config = transferd::ml::artifact::ModelConfig {
            format_version: transferd::ml::artifact::FORMAT_VERSION,
            transferd_version: env!("CARGO_PKG_VERSION").into(),
            backbone: b,
            backbone_weights_sha256: weights::pinned(b).sha256.into(),
            classes: vec!["a".into(), "b".into()],
            preprocessing: Preprocessing::for_size(b.input_size()),
            dropout: 0.2,
            temperature: 1.0,
            seed: 1,
            training: TrainConfig::default(),
        };
        let mut row = format!("| {} |", b.name());
        for format in ExportFormat::ALL {
            let t = Instant::now();
            let bytes = export::export(&model, &config, format)?;
            row += &format!(
                " {:.1} MB | {:.2} s |",
                bytes.len() as f64 / 1e6,
                t.elapsed().as_secs_f64()
            );
        }
        println!("{row}");
    }
    Ok(())
}
