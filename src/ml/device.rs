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
    #[error(
        "wgpu finds no graphics adapter at all (no Vulkan, Metal or DX12 driver); install one (e.g. Debian's mesa-vulkan-drivers for a software one) or use --device cpu"
    )]
    NoAdapter,
}

/// An adapter wgpu can see.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// "name (backend, type)", for logs.
    pub description: String,
    /// A discrete, integrated or virtual GPU rather than a CPU/software rasteriser.
    pub hardware: bool,
}

/// Every adapter visible to wgpu, without opening any of them.
#[cfg(feature = "wgpu")]
pub fn adapters() -> Vec<Adapter> {
    use wgpu::DeviceType;
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    adapters
        .iter()
        .map(|a| a.get_info())
        .map(|i| Adapter {
            description: format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type),
            hardware: matches!(
                i.device_type,
                DeviceType::DiscreteGpu | DeviceType::IntegratedGpu | DeviceType::VirtualGpu
            ),
        })
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
    let flex = || SelectedDevice {
        device: Device::flex(),
        backend: "flex",
        adapter: None,
    };
    match choice {
        DeviceChoice::Cpu => Ok(flex()),
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => {
            let found = adapters();
            // wgpu's default pick prefers hardware; name what it will most likely take.
            let adapter = found
                .iter()
                .find(|a| a.hardware)
                .or(found.first())
                .ok_or(DeviceError::NoAdapter)?;
            Ok(SelectedDevice {
                device: Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
                backend: "wgpu",
                adapter: Some(adapter.description.clone()),
            })
        }
        #[cfg(not(feature = "wgpu"))]
        DeviceChoice::Wgpu => Err(DeviceError::NoWgpu),
        DeviceChoice::Auto => {
            #[cfg(feature = "wgpu")]
            if let Some(adapter) = adapters().into_iter().find(|a| a.hardware) {
                return Ok(SelectedDevice {
                    device: Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
                    backend: "wgpu",
                    adapter: Some(adapter.description),
                });
            }
            Ok(flex())
        }
    }
}
