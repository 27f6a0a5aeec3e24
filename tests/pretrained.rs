//! The pretrained backbone is loaded completely and classifies ImageNet photos correctly.

mod common;

use burn::prelude::*;
use transferd::ml::backbone::Backbone;
use transferd::ml::{imagenet, weights};

#[test]
fn every_backbone_loads_without_missing_tensors() {
    for pinned in &weights::PINNED {
        let path = common::weights_of(pinned.backbone);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), pinned.size);
        let (net, report) =
            weights::load_backbone(&path, pinned.backbone, &Device::flex()).unwrap();
        assert_eq!(net.kind(), pinned.backbone);
        assert_eq!(
            report.applied, pinned.tensors,
            "{}: every model tensor is applied",
            pinned.backbone
        );
        assert!(
            report.missing.is_empty(),
            "{}: missing {:?}",
            pinned.backbone,
            report.missing
        );
        assert!(
            report.unused.is_empty(),
            "{}: unused {:?}",
            pinned.backbone,
            report.unused
        );
    }
}

/// Lite1 and Lite2 at their own input sizes put the sample photos in their ImageNet class
/// ranges (tabby/tiger cat 281–285, dog breeds 151–268), with the golden retriever on top.
#[test]
fn lite1_and_lite2_pass_the_imagenet_sanity_check() {
    let device = Device::flex();
    let read = |name: &str| std::fs::read(common::fixtures().join("samples").join(name)).unwrap();
    for backbone in [Backbone::Lite1, Backbone::Lite2] {
        let (net, _) =
            weights::load_backbone(&common::weights_of(backbone), backbone, &device).unwrap();
        let cat = imagenet::top5(&net, &read("test_cat.jpg"), &device).unwrap();
        assert!(
            (281..=285).contains(&cat[0].class),
            "{backbone} cat top-1 {:?}",
            cat[0]
        );
        let dog = imagenet::top5(&net, &read("test_dog.jpg"), &device).unwrap();
        assert!(
            (151..=268).contains(&dog[0].class),
            "{backbone} dog top-1 {:?}",
            dog[0]
        );
        assert_eq!(dog[0].label, "golden retriever", "{backbone}: {dog:?}");
        assert!(dog[0].probability > 0.3, "{backbone}: {dog:?}");
    }
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
    let err = weights::load_backbone(&fake, Backbone::Lite0, &Device::flex())
        .expect_err("garbage must not load");
    assert!(err.to_string().contains("fake.pth"));
    let err = weights::verify(&fake, Backbone::Lite1).expect_err("not the Lite1 file");
    assert!(
        err.to_string()
            .contains(weights::pinned(Backbone::Lite1).sha256),
        "{err}"
    );
    // The Lite0 file is not the Lite2 file either.
    assert!(weights::verify(&common::weights_path(), Backbone::Lite2).is_err());
}
