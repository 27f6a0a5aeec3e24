//! Where things live under the data directory:
//!
//! ```text
//! <data-dir>/transferd.db            the database (default URL)
//! <data-dir>/weights/                the pretrained backbone
//! <data-dir>/datasets/<id>/          a dataset's images, <sha256>.<format>
//! <data-dir>/models/<id>/            a trained model (config, weights, metrics, evaluation)
//! <data-dir>/runs/<id>/              checkpoints that let a run resume after a restart
//! <data-dir>/tmp/                    uploads and staging folders, emptied at start-up
//! <data-dir>/quarantine/datasets/    dataset folders no database row pointed at (kept)
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

    pub fn models(&self) -> PathBuf {
        self.root.join("models")
    }

    pub fn model(&self, id: &str) -> PathBuf {
        self.models().join(id)
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

    /// Bytes free for this process on the data directory's filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.root.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid NUL-terminated string and `stat` a valid out-pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
    }

    /// Bytes held by datasets and models (what a quota counts).
    pub fn used_bytes(&self) -> io::Result<u64> {
        fn walk(dir: &Path) -> io::Result<u64> {
            let mut total = 0;
            if !dir.exists() {
                return Ok(0);
            }
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    total += walk(&entry.path())?;
                } else if kind.is_file() {
                    total += entry.metadata()?.len();
                }
            }
            Ok(total)
        }
        Ok(walk(&self.datasets())? + walk(&self.root.join("models"))?)
    }

    /// Where orphaned dataset folders are moved.
    pub fn quarantine(&self) -> PathBuf {
        self.root.join("quarantine").join("datasets")
    }

    /// Moves dataset folders the database does not know (a crash between the folder's
    /// rename and the insert's commit) to the quarantine folder; nothing is deleted. When the
    /// database knows no dataset at all but folders exist, it is more likely the wrong
    /// database (a mistyped `DATABASE_URL`) than a crash, so nothing is moved.
    pub fn quarantine_orphan_datasets(&self, known: &[String]) -> io::Result<Orphans> {
        let mut orphans = Vec::new();
        for entry in std::fs::read_dir(self.datasets())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                orphans.push(name);
            }
        }
        orphans.sort();
        if orphans.is_empty() {
            return Ok(Orphans::None);
        }
        if known.is_empty() {
            return Ok(Orphans::LeftAlone(orphans));
        }
        let quarantine = self.quarantine();
        std::fs::create_dir_all(&quarantine)?;
        for name in &orphans {
            // An earlier quarantine of the same id stays; this one gets a numbered name.
            let mut to = quarantine.join(name);
            let mut n = 1;
            while to.exists() {
                to = quarantine.join(format!("{name}.{n}"));
                n += 1;
            }
            std::fs::rename(self.dataset(name), to)?;
        }
        Ok(Orphans::Quarantined(orphans))
    }
}

/// What start-up did with dataset folders the database does not know.
#[derive(Debug, PartialEq, Eq)]
pub enum Orphans {
    None,
    /// Moved to [`Storage::quarantine`].
    Quarantined(Vec<String>),
    /// Left in place: the database has no dataset at all.
    LeftAlone(Vec<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphans_are_quarantined_never_deleted_and_an_empty_database_touches_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let storage = Storage::new(tmp.path());
        storage.prepare().unwrap();
        for id in ["a", "b"] {
            std::fs::create_dir_all(storage.dataset(id)).unwrap();
            std::fs::write(storage.dataset(id).join("x.jpeg"), b"photo").unwrap();
        }
        assert_eq!(
            storage.quarantine_orphan_datasets(&[]).unwrap(),
            Orphans::LeftAlone(vec!["a".into(), "b".into()])
        );
        assert!(storage.dataset("a").is_dir() && storage.dataset("b").is_dir());

        assert_eq!(
            storage.quarantine_orphan_datasets(&["a".into()]).unwrap(),
            Orphans::Quarantined(vec!["b".into()])
        );
        assert!(storage.dataset("a").is_dir());
        assert!(!storage.dataset("b").exists());
        assert_eq!(
            std::fs::read(storage.quarantine().join("b").join("x.jpeg")).unwrap(),
            b"photo"
        );
        assert_eq!(
            storage.quarantine_orphan_datasets(&["a".into()]).unwrap(),
            Orphans::None
        );
    }
}
