//! Where things live under the data directory:
//!
//! ```text
//! <data-dir>/transferd.db            the database (default URL)
//! <data-dir>/weights/                the pretrained backbone
//! <data-dir>/datasets/<id>/          a dataset's images, <sha256>.<format>
//! <data-dir>/models/<id>/            a trained model (config, weights, metrics, evaluation)
//! <data-dir>/runs/<id>/              checkpoints that let a run resume after a restart
//! <data-dir>/tmp/                    uploads and staging folders, emptied at start-up
//! ```
//!
//! Folders appear under their final name only by `rename`, so a crash never leaves a half
//! dataset or model where the database could point at it.

use std::io;
use std::path::{Path, PathBuf};

/// The layout of one data directory.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

impl Storage {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn datasets(&self) -> PathBuf {
        self.root.join("datasets")
    }

    pub fn dataset(&self, id: &str) -> PathBuf {
        self.datasets().join(id)
    }

    pub fn model(&self, id: &str) -> PathBuf {
        self.root.join("models").join(id)
    }

    /// The warm-up checkpoint of a run.
    pub fn warmup_checkpoint(&self, run_id: &str) -> PathBuf {
        self.root.join("runs").join(run_id).join("warmup-head.bpk")
    }

    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.root.join("runs").join(run_id)
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Creates the folders and empties `tmp/` (leftovers of uploads a crash interrupted).
    pub fn prepare(&self) -> io::Result<()> {
        let tmp = self.tmp();
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        for dir in [
            tmp,
            self.datasets(),
            self.root.join("models"),
            self.root.join("runs"),
        ] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }

    /// Removes dataset folders the database does not know (a crash between the folder's
    /// rename and the insert's commit). Returns how many went.
    pub fn remove_orphan_datasets(&self, known: &[String]) -> io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(self.datasets())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                std::fs::remove_dir_all(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
