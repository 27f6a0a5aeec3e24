//! The data directory as a bounded cache of the shared store: dataset and model folders
//! fetched from it are kept up to a byte budget, and the least recently used ones beyond it
//! are deleted. A folder in use (a run training on its dataset, a prediction loading its
//! model) is pinned and never deleted; any folder deleted from outside is fetched again
//! when next needed, so the whole directory is safe to delete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

#[derive(Debug)]
pub(super) struct Cache {
    budget: u64,
    pins: Mutex<HashMap<PathBuf, usize>>,
}

/// Keeps a folder from being evicted while it lives.
pub struct Pin {
    cache: Arc<Cache>,
    dir: PathBuf,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.cache.pins.lock().expect("not poisoned");
        if let Some(n) = pins.get_mut(&self.dir) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.dir);
            }
        }
    }
}

fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl Cache {
    pub(super) fn new(budget: u64) -> Self {
        Self {
            budget,
            pins: Mutex::new(HashMap::new()),
        }
    }

    /// Pins `dir` and marks it used now.
    pub(super) fn pin(self: &Arc<Self>, dir: &Path) -> Pin {
        *self
            .pins
            .lock()
            .expect("not poisoned")
            .entry(dir.to_path_buf())
            .or_default() += 1;
        // The folder's modification time is its "last used" mark.
        if let Ok(f) = std::fs::File::open(dir) {
            let _ = f.set_modified(SystemTime::now());
        }
        Pin {
            cache: self.clone(),
            dir: dir.to_path_buf(),
        }
    }

    /// Deletes the least recently used unpinned folders of `roots` until what is left fits
    /// the budget. Returns the folders deleted.
    pub(super) fn trim(&self, roots: &[PathBuf]) -> Vec<PathBuf> {
        let mut folders: Vec<(SystemTime, u64, PathBuf)> = roots
            .iter()
            .filter_map(|root| std::fs::read_dir(root).ok())
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| {
                let used = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                (used, size_of(&e.path()), e.path())
            })
            .collect();
        let mut total: u64 = folders.iter().map(|f| f.1).sum();
        folders.sort();
        let mut evicted = Vec::new();
        for (_, size, dir) in folders {
            if total <= self.budget {
                break;
            }
            // Checked and deleted under the lock: no pin can slip in between.
            let pins = self.pins.lock().expect("not poisoned");
            if pins.contains_key(&dir) {
                continue;
            }
            if std::fs::remove_dir_all(&dir).is_ok() {
                total -= size;
                evicted.push(dir);
            }
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unpinned_folders_go_first_until_the_rest_fits() {
        let root = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::new(2_500));
        let mut dirs = Vec::new();
        for (i, name) in ["old", "pinned", "recent"].iter().enumerate() {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("f"), vec![0u8; 1_000]).unwrap();
            let f = std::fs::File::open(&dir).unwrap();
            let when = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i as u64);
            f.set_modified(when).unwrap();
            dirs.push(dir);
        }
        let pin = cache.pin(&dirs[1]); // also the most recently used now
        let evicted = cache.trim(&[root.path().to_path_buf()]);
        assert_eq!(
            evicted,
            vec![dirs[0].clone()],
            "3,000 bytes over a 2,500 budget: one goes"
        );
        let tight = Arc::new(Cache::new(0));
        let _same_pin = tight.pin(&dirs[1]);
        assert_eq!(
            tight.trim(&[root.path().to_path_buf()]),
            vec![dirs[2].clone()]
        );
        assert!(dirs[1].is_dir(), "a pinned folder stays even over budget");
        drop(pin);
    }
}
