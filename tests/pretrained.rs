//! The pretrained backbone is loaded completely and classifies ImageNet photos correctly.

mod common;

use burn::prelude::*;
use transferd::ml::{imagenet, weights};

#[test]
fn weights_load_without_missing_tensors() {
    let (_, report) = weights::load_backbone(&common::weights_path(), &Device::flex()).unwrap();
    assert_eq!(report.applied, 247, "every model tensor is applied");
    assert!(report.missing.is_empty(), "missing: {:?}", report.missing);
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
}

#[test]
fn imagenet_sanity_matches_the_reference() {
    let device = Device::flex();
    let backbone = common::backbone(&device);
    let read = |name: &str| std::fs::read(common::fixtures().join("samples").join(name)).unwrap();

    let cat = imagenet::top5(&backbone, &read("test_cat.jpg"), &device).unwrap();
    assert!(
        (281..=285).contains(&cat[0].class),
        "cat top-1 {:?}",
        cat[0]
    );
    let p = |top: &[imagenet::Top], class: usize| {
        top.iter()
            .find(|t| t.class == class)
            .map_or(0.0, |t| t.probability)
    };
    // Reference: ONNX Runtime on the same weights and preprocessing.
    assert!(
        (p(&cat, 281) - 0.40).abs() < 0.06,
        "cat p(281) = {}",
        p(&cat, 281)
    );
    assert!(
        (p(&cat, 285) - 0.33).abs() < 0.06,
        "cat p(285) = {}",
        p(&cat, 285)
    );

    let dog = imagenet::top5(&backbone, &read("test_dog.jpg"), &device).unwrap();
    assert!(
        (151..=268).contains(&dog[0].class),
        "dog top-1 {:?}",
        dog[0]
    );
    assert_eq!(dog[0].class, 207);
    assert!(
        (dog[0].probability - 0.69).abs() < 0.06,
        "dog p(207) = {}",
        dog[0].probability
    );
    assert_eq!(dog[0].label, "golden retriever");
}

#[test]
fn a_wrong_file_is_refused_by_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake.pth");
    std::fs::write(&fake, b"not weights").unwrap();
    let err = weights::load_backbone(&fake, &Device::flex()).expect_err("garbage must not load");
    assert!(err.to_string().contains("fake.pth"));
    assert!(weights::sha256_file(&fake).unwrap() != weights::SHA256);
}
