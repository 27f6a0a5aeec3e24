//! Backend choice: burn's wgpu backend on a real GPU, else the pure-Rust flex CPU backend.
//!
//! `auto` looks at the adapters wgpu can see without opening any of them and takes wgpu only
//! for a discrete, integrated or virtual GPU; a CPU/software adapter (Mesa's lavapipe, say)
//! is far slower than flex. `wgpu` forces it anyway (that is how tests reach lavapipe).

use burn::prelude::*;
use serde::Serialize;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Wgpu,
    Cpu,
}

/// The device picked, with what to log and show.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    /// `wgpu` or `flex`.
    pub backend: &'static str,
    /// Adapter name and graphics API, when known.
    pub adapter: Option<String>,
}

/// Why the requested device is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("this build has no wgpu support; rebuild with `--features wgpu` or use --device cpu")]
    NoWgpu,
}

/// Hardware adapters visible to wgpu, as "name (backend, type)".
#[cfg(feature = "wgpu")]
pub fn hardware_adapters() -> Vec<String> {
    use wgpu::DeviceType;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    adapters
        .iter()
        .map(|a| a.get_info())
        .filter(|i| matches!(i.device_type, DeviceType::DiscreteGpu | DeviceType::IntegratedGpu | DeviceType::VirtualGpu))
        .map(|i| format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type))
        .collect()
}

#[cfg(feature = "wgpu")]
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    // Native wgpu resolves this future immediately; a spin with a no-op waker is enough and
    // spares a dependency on an executor.
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// Picks the device for `choice`.
pub fn select(choice: DeviceChoice) -> Result<SelectedDevice, DeviceError> {
    let flex = || SelectedDevice { device: Device::flex(), backend: "flex", adapter: None };
    match choice {
        DeviceChoice::Cpu => Ok(flex()),
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => Ok(SelectedDevice {
            device: Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
            backend: "wgpu",
            adapter: hardware_adapters().into_iter().next(),
        }),
        #[cfg(not(feature = "wgpu"))]
        DeviceChoice::Wgpu => Err(DeviceError::NoWgpu),
        DeviceChoice::Auto => {
            #[cfg(feature = "wgpu")]
            if let Some(adapter) = hardware_adapters().into_iter().next() {
                return Ok(SelectedDevice {
                    device: Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
                    backend: "wgpu",
                    adapter: Some(adapter),
                });
            }
            Ok(flex())
        }
    }
}
