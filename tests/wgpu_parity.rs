//! The GPU code path, checked without a GPU: burn's wgpu backend (WGSL shaders) on a software
//! adapter (Mesa's lavapipe or llvmpipe, which `.ci/run` installs) must agree with the flex
//! CPU backend, for inference at full size and for a few training steps at a small size.
#![cfg(feature = "wgpu")]

mod common;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use transferd::ml::device::{DeviceChoice, select};
use transferd::ml::head::TransferModelConfig;
use transferd::ml::preprocess::{self, Preprocessing};

fn wgpu() -> Device {
    select(DeviceChoice::Wgpu)
        .expect("a wgpu adapter: .ci/run installs mesa-vulkan-drivers")
        .device
}

/// Whether wgpu runs on a software adapter (Mesa's lavapipe, with its 128 MiB limit on one
/// buffer): no hardware adapter is visible.
fn software_adapter() -> bool {
    !transferd::ml::device::adapters().iter().any(|a| a.hardware)
}

fn view(name: &str, size: usize) -> Vec<f32> {
    let bytes = std::fs::read(common::fixtures().join("samples").join(name)).unwrap();
    let image = preprocess::decode(&bytes, 10_000).unwrap();
    preprocess::eval_view(&image, &Preprocessing::for_size(size))
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().as_slice::<f32>().unwrap().to_vec()
}

#[test]
fn imagenet_logits_match_flex_at_224() {
    let x = view("test_cat.jpg", 224);
    let logits = |device: &Device| {
        let backbone = common::backbone(device);
        to_vec(backbone.forward(Tensor::<4>::from_data(
            TensorData::new(x.clone(), [1, 3, 224, 224]),
            device,
        )))
    };
    let (cpu, gpu) = (logits(&Device::flex()), logits(&wgpu()));
    let worst = cpu
        .iter()
        .zip(&gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "largest logit difference {worst}");
}

#[test]
fn training_steps_match_flex_at_64() {
    // Head plus the top block and head conv, trained from the frozen bottom's activations,
    // exactly as fine-tuning does: the same loss curve on both backends.
    let images = [view("test_cat.jpg", 64), view("test_dog.jpg", 64)].concat();
    let losses = |device: &Device| {
        let backbone = common::backbone(device);
        let x = Tensor::<4>::from_data(TensorData::new(images.clone(), [2, 3, 64, 64]), device);
        let acts = backbone.forward_bottom(x, 15);
        let ad = device.clone().autodiff();
        let mut model = TransferModelConfig::new(2)
            .from_backbone(&backbone, 15, device)
            .unfreeze()
            .fork(&ad)
            .train();
        let mut optim = AdamWConfig::new().init();
        let loss_fn = CrossEntropyLossConfig::new().init(&ad);
        let acts = Tensor::<4>::from_data(acts.into_data(), &ad);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), &ad);
        (0..4)
            .map(|_| {
                let loss = loss_fn.forward(model.forward(acts.clone()), y.clone());
                let value = loss.clone().into_scalar::<f32>();
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(1e-3, model.clone(), grads);
                value
            })
            .collect::<Vec<f32>>()
    };
    let (cpu, gpu) = (losses(&Device::flex()), losses(&wgpu()));
    assert!(cpu[3] < cpu[0], "the loss goes down: {cpu:?}");
    for (a, b) in cpu.iter().zip(&gpu) {
        assert!(
            (a - b).abs() < 1e-3 * a.abs().max(1.0),
            "flex {cpu:?} vs wgpu {gpu:?}"
        );
    }
}

#[test]
fn a_batch_too_big_for_the_device_is_split_not_fatal() {
    // 32 views at 224 px need a 154 MB buffer in block 1: more than lavapipe's 128 MiB limit,
    // so there the frozen pass must halve the batch and go on. Either way the features must
    // match flex's.
    use transferd::ml::augment::AugmentConfig;
    use transferd::ml::cache::frozen_pass;
    use transferd::ml::data::ViewDataset;
    use transferd::ml::events::Cancel;
    let (_staged, ds) = common::read_folder(&common::fixtures().join("pets"), &Default::default());
    let features = |device: &Device| {
        let backbone = common::backbone(device);
        let views = ViewDataset {
            samples: &ds.samples,
            indices: (0..16).collect(),
            views: 2,
            clean_first: true,
            pre: Preprocessing::for_size(224),
            augment: AugmentConfig::default(),
            seed: 7,
            max_dimension: 10_000,
        };
        frozen_pass(
            &backbone,
            16,
            false,
            &views,
            32,
            device,
            &Cancel::default(),
            |_| {},
        )
        .unwrap()
    };
    let (cpu, gpu) = (features(&Device::flex()), features(&wgpu()));
    assert_eq!(cpu.splits, 0, "the CPU backend takes the whole batch");
    if software_adapter() {
        assert!(
            gpu.splits >= 1,
            "a 154 MB buffer exceeds lavapipe's 128 MiB limit, so the batch must be split"
        );
    }
    let (cpu, gpu) = (cpu.features, gpu.features);
    assert_eq!(cpu.labels, gpu.labels);
    assert_eq!(cpu.len(), 32);
    let worst = cpu
        .data
        .iter()
        .zip(&gpu.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "largest feature difference {worst}");
}
