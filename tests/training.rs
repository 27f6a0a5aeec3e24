//! A tiny end-to-end run: warm-up and fine-tune on 24 fixture photos at 64 px.

mod common;

use burn::prelude::*;
use transferd::ingest::{self, IngestError};
use transferd::ml::artifact;
use transferd::ml::events::{Cancel, Phase, TrainError, TrainEvent};
use transferd::ml::infer::Predictor;
use transferd::ml::train::train;

fn run(
    dir: &std::path::Path,
    config: &transferd::ml::config::TrainConfig,
) -> transferd::ml::train::TrainOutcome {
    let device = Device::flex();
    let backbone = common::backbone(&device);
    let (_staged, ds) = common::read_folder(dir, config);
    train(
        &ds,
        config,
        &backbone,
        &device,
        &mut |_| {},
        &Cancel::default(),
    )
    .unwrap()
}

#[test]
fn tiny_run_learns_saves_and_round_trips() {
    let pets = common::pets_copy();
    // Two bad files, skipped when the folder is read: text named .jpg, and a truncated JPEG
    // (its header reads, its decode fails).
    std::fs::write(pets.path().join("cat/notes.jpg"), b"this is not a photo").unwrap();
    let good = std::fs::read(pets.path().join("dog/dog.0.jpg")).unwrap();
    std::fs::write(
        pets.path().join("dog/truncated.jpg"),
        &good[..good.len() / 3],
    )
    .unwrap();

    let config = common::tiny_config();
    let device = Device::flex();
    let backbone = common::backbone(&device);
    let (_staged, ds) = common::read_folder(pets.path(), &config);
    assert_eq!(ds.classes, vec!["cat", "dog"]);
    assert_eq!(ds.samples.len(), 24);
    assert!(
        ds.skipped
            .iter()
            .any(|s| s.name == "cat/notes.jpg" && s.reason.contains("not an image")),
        "{:?}",
        ds.skipped
    );
    assert!(
        ds.skipped.iter().any(|s| s.name == "dog/truncated.jpg"),
        "{:?}",
        ds.skipped
    );
    // A stored photo that vanishes before the run (a disk fault) is skipped by the frozen
    // pass, and the run goes on without it.
    let lost = ds
        .samples
        .iter()
        .find(|s| s.label == 1)
        .unwrap()
        .path
        .clone();
    std::fs::remove_file(&lost).unwrap();
    let mut epochs = Vec::new();
    let outcome = train(
        &ds,
        &config,
        &backbone,
        &device,
        &mut |e| {
            if let TrainEvent::Epoch(m) = e {
                epochs.push(m);
            }
        },
        &Cancel::default(),
    )
    .unwrap();
    assert!(
        outcome
            .skipped
            .iter()
            .any(|s| s.name == lost.display().to_string() && s.reason.contains("cannot read")),
        "{:?}",
        outcome.skipped
    );
    assert_eq!(outcome.train_images + outcome.val_images, 23);

    let warm: Vec<_> = epochs.iter().filter(|m| m.phase == Phase::Warmup).collect();
    let fine: Vec<_> = epochs
        .iter()
        .filter(|m| m.phase == Phase::Finetune)
        .collect();
    assert!(warm.len() == 1 && !fine.is_empty(), "{epochs:?}");
    assert!(
        warm[0].train_loss < 0.5 * 2f64.ln(),
        "the solved head fits its training photos far below chance loss: {warm:?}"
    );
    assert!(
        epochs
            .iter()
            .all(|m| m.val_loss.is_finite() && m.seconds >= 0.0)
    );
    let e = &outcome.evaluation;
    assert_eq!(
        e.confusion.iter().flatten().sum::<usize>(),
        outcome.val_images
    );
    assert!(
        e.accuracy >= 0.8,
        "pretrained features separate cats from dogs: {}",
        e.accuracy
    );
    assert!(e.calibration.temperature > 0.0);
    // Fine-tuning was forced on, so it ran, and the decision says whether it was kept; the
    // refit then trained the served head on every photo that decoded.
    let report = e.training.as_ref().expect("the run records its decisions");
    assert!(report.finetune.ran, "{report:?}");
    assert!(report.finetune.val_loss_head_only.is_some(), "{report:?}");
    assert!(report.finetune.reason.contains("switched on"), "{report:?}");
    assert_eq!(report.trained_on_images, 23, "{report:?}");
    assert_eq!(report.estimate_images, outcome.val_images);

    // Saved model predicts exactly what the in-memory model predicts.
    let out = tempfile::tempdir().unwrap();
    let model_dir = out.path().join("model");
    let saved = artifact::save(&model_dir, &outcome, &config).unwrap();
    let in_memory =
        Predictor::new(saved.clone(), outcome.model.clone(), &device).with_ood(outcome.ood.clone());
    let loaded = Predictor::load(&model_dir, &device).unwrap();
    assert_eq!(loaded.config, saved);
    let images: Vec<Vec<u8>> = ["cat/cat.3.jpg", "dog/dog.5.jpg"]
        .iter()
        .map(|p| std::fs::read(pets.path().join(p)).unwrap())
        .collect();
    let a = in_memory.predict_bytes(&images);
    let b = loaded.predict_bytes(&images);
    for (x, y) in a.iter().zip(&b) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        assert!(
            x.probabilities
                .iter()
                .zip(&y.probabilities)
                .all(|(p, q)| (p - q).abs() < 1e-5),
            "{x:?} vs {y:?}"
        );
        assert!((x.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        // The out-of-distribution statistics survive the model directory (ood.json, ood.bin).
        let (sx, tx) = x.ood.expect("a new model scores how foreign a photo is");
        let (sy, ty) = y.ood.expect("and so does the loaded one");
        // JSON keeps the threshold to about the last bit (serde_json parses floats fast, not
        // exactly).
        assert!(
            (sx - sy).abs() < 1e-4 * sx.max(1.0) && (tx - ty).abs() < 1e-12 * tx,
            "{x:?} vs {y:?}"
        );
    }
    for f in [
        "config.json",
        "metrics.json",
        "evaluation.json",
        "model.bpk",
    ] {
        assert!(model_dir.join(f).is_file(), "{f}");
    }

    // The service's inference thread: a forward pass that panics (views of the wrong size
    // for this model) fails its own request only; the thread lives on and answers the next.
    {
        use transferd::jobs::inference::{Inference, InferenceError};
        let inference = Inference::start(device.clone(), 1, 32, 64);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let predict = |views: Vec<Vec<f32>>| {
            let admitted = inference.admit(views.len()).unwrap();
            rt.block_on(inference.predict(admitted, "m", model_dir.clone(), views))
        };
        let broken = predict(vec![vec![0.0; 10]]);
        assert!(
            matches!(broken, Err(InferenceError::Model(ref m)) if m.contains("crashed")),
            "{broken:?}"
        );
        assert!(rt.block_on(inference.responds(std::time::Duration::from_secs(5))));
        let s = saved.preprocessing.input_size;
        let fine = predict(vec![vec![0.0; 3 * s * s]]).unwrap();
        assert_eq!(fine.len(), 1);
        assert!((fine[0].probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert_eq!(
            inference.queued(),
            0,
            "answered requests give their places back"
        );
    }
    // An unreadable image fails alone.
    let mixed = loaded.predict_bytes(&[b"garbage".to_vec(), images[0].clone()]);
    assert!(mixed[0].is_err() && mixed[1].is_ok());
}

#[test]
fn same_seed_same_split_and_metrics() {
    let pets = common::pets_copy();
    let mut config = common::tiny_config();
    config.finetune.enabled = transferd::ml::config::When::Off;
    let a = run(pets.path(), &config);
    let b = run(pets.path(), &config);
    assert_eq!(a.metrics.len(), b.metrics.len());
    for (x, y) in a.metrics.iter().zip(&b.metrics) {
        assert_eq!(
            (x.train_loss, x.val_loss, x.val_accuracy),
            (y.train_loss, y.val_loss, y.val_accuracy)
        );
    }
    assert_eq!(a.evaluation.confusion, b.evaluation.confusion);
}

#[test]
fn whole_network_fine_tuning_streams_fresh_views() {
    // `"all"`: the GPU default. Nothing is frozen, views are decoded afresh every epoch.
    let pets = common::pets_copy();
    let mut config = common::tiny_config();
    config.input_size = Some(64);
    config.finetune.unfreeze = transferd::ml::config::Unfreeze::All;
    config.finetune.epochs = 1;
    let outcome = run(pets.path(), &config);
    assert!(outcome.metrics.iter().any(|m| m.phase == Phase::Finetune));
    assert_eq!(
        outcome.evaluation.confusion.iter().flatten().sum::<usize>(),
        outcome.val_images
    );
    assert_eq!(outcome.model.first_block, 0);
}

#[test]
fn three_classes_give_three_probabilities() {
    // Split the cats into two classes: any number of classes >= 2 works.
    let pets = common::pets_copy();
    let kittens = pets.path().join("kitten");
    std::fs::create_dir(&kittens).unwrap();
    for i in 0..6 {
        let name = format!("cat.{i}.jpg");
        std::fs::rename(pets.path().join("cat").join(&name), kittens.join(&name)).unwrap();
    }
    let mut config = common::tiny_config();
    config.finetune.enabled = transferd::ml::config::When::Off;
    let outcome = run(pets.path(), &config);
    assert_eq!(outcome.classes, vec!["cat", "dog", "kitten"]);
    assert_eq!(outcome.evaluation.confusion.len(), 3);
    assert_eq!(outcome.evaluation.per_class.len(), 3);
    let device = Device::flex();
    let saved = artifact::model_config(&outcome, &config);
    let predictor = Predictor::new(saved, outcome.model, &device);
    let photo = std::fs::read(common::fixtures().join("samples/test_cat.jpg")).unwrap();
    let p = predictor
        .predict_bytes(&[photo])
        .remove(0)
        .unwrap()
        .probabilities;
    assert_eq!(p.len(), 3);
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    assert!(
        p[1] < 0.2,
        "the sample cat is a cat or a kitten, not a dog: {p:?}"
    );
}

/// Small data, default config: head only, every photo scored out of fold, and the served
/// head fitted on all of them; the sample photos get their labels.
#[test]
fn small_data_trains_the_head_only_and_estimates_by_kfold() {
    let pets = common::pets_copy();
    let mut config = common::tiny_config();
    config.finetune.enabled = transferd::ml::config::When::Auto;
    let outcome = run(pets.path(), &config);
    let report = outcome
        .evaluation
        .training
        .clone()
        .expect("decisions recorded");
    assert_eq!(report.estimate, transferd::ml::plan::EstimateMethod::Kfold);
    assert_eq!(report.folds, Some(5));
    assert!(!report.finetune.ran, "{report:?}");
    assert!(report.finetune.reason.contains("small data"), "{report:?}");
    assert_eq!(report.estimate_images, 24, "every photo is scored once");
    assert_eq!(
        report.trained_on_images, 24,
        "every photo trains the served head"
    );
    assert_eq!(
        outcome.evaluation.confusion.iter().flatten().sum::<usize>(),
        24
    );
    assert!(report.head.path.len() >= 3, "{report:?}");
    assert!(!outcome.metrics.iter().any(|m| m.phase == Phase::Finetune));
    assert!(
        outcome.evaluation.accuracy >= 0.8,
        "{}",
        outcome.evaluation.accuracy
    );
    let device = Device::flex();
    let saved = artifact::model_config(&outcome, &config);
    let predictor = Predictor::new(saved, outcome.model, &device);
    let photos: Vec<Vec<u8>> = ["test_cat.jpg", "test_dog.jpg"]
        .iter()
        .map(|f| std::fs::read(common::fixtures().join("samples").join(f)).unwrap())
        .collect();
    let p = predictor.predict_bytes(&photos);
    let (cat, dog) = (
        &p[0].as_ref().unwrap().probabilities,
        &p[1].as_ref().unwrap().probabilities,
    );
    assert!(cat[0] > 0.5 && dog[1] > 0.5, "cat {cat:?}, dog {dog:?}");
}

#[test]
fn one_class_is_a_clear_error() {
    let pets = common::pets_copy();
    std::fs::remove_dir_all(pets.path().join("dog")).unwrap();
    let staging = tempfile::tempdir().unwrap();
    let limits = ingest::Limits::local(&Default::default());
    match ingest::ingest_folder(pets.path(), staging.path(), &limits) {
        Err(e @ IngestError::TooFewClasses { found: 1, .. }) => {
            assert!(e.to_string().contains("at least 2 classes"))
        }
        other => panic!("expected TooFewClasses, got {other:?}"),
    }
}

#[test]
fn cancellation_stops_the_run() {
    let pets = common::pets_copy();
    let device = Device::flex();
    let backbone = common::backbone(&device);
    let (_staged, ds) = common::read_folder(pets.path(), &common::tiny_config());
    let cancel = Cancel::default();
    cancel.cancel();
    let r = train(
        &ds,
        &common::tiny_config(),
        &backbone,
        &device,
        &mut |_| {},
        &cancel,
    );
    assert!(matches!(r, Err(TrainError::Cancelled)));
}

#[test]
fn the_cache_estimate_is_what_the_frozen_pass_caches() {
    // The service refuses a run whose estimate is over its budget; the estimate must be the
    // real size, for a run that caches activations and for one that streams.
    let pets = common::pets_copy();
    let device = Device::flex();
    let backbone = common::backbone(&device);
    let (_staged, ds) = common::read_folder(pets.path(), &common::tiny_config());
    let bytes = |c: &transferd::ml::cache::RowCache| (c.data.len() * 4) as u64;
    for unfreeze in [
        transferd::ml::config::Unfreeze::Top(1),
        transferd::ml::config::Unfreeze::All,
    ] {
        let mut config = common::tiny_config();
        config.input_size = Some(64);
        config.finetune.unfreeze = unfreeze;
        let prepared = transferd::ml::train::prepare(
            &ds,
            &config,
            &backbone,
            &device,
            &mut |_| {},
            &Cancel::default(),
        )
        .unwrap();
        let cached: u64 = [&prepared.train, &prepared.val]
            .iter()
            .map(|p| bytes(&p.features) + p.activations.as_ref().map_or(0, bytes))
            .sum();
        let estimate = prepared.plan.cache_bytes(&config, &ds.counts());
        assert_eq!(estimate, cached, "{unfreeze:?}");
        assert!(cached > 0);
    }
}
