//! Renames that survive a power cut. A rename is atomic, but without `fsync` the directory
//! entry can reach the disk before the file's data, so after a crash the database could say
//! "succeeded" next to an empty `model.bpk`. Files are synced before the rename, and the
//! directory that holds the new name after it.

use std::fs::File;
use std::io;
use std::path::Path;

/// Flushes a file's data and metadata.
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Flushes a directory's entries (the names in it).
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Flushes every regular file directly in `dir`, then `dir` itself.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            sync_file(&entry.path())?;
        }
    }
    sync_dir(dir)
}

/// Renames `from` (a file, or a folder of files) to `to`, syncing the data before and the
/// destination's directory after.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    if from.is_dir() {
        sync_tree(from)?;
    } else {
        sync_file(from)?;
    }
    std::fs::rename(from, to)?;
    match to.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_rename_moves_files_and_folders_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let staged = tmp.path().join("staged");
        std::fs::create_dir(&staged).unwrap();
        std::fs::write(staged.join("model.bpk"), b"weights").unwrap();
        let target = tmp.path().join("models").join("m1");
        std::fs::create_dir(target.parent().unwrap()).unwrap();
        rename(&staged, &target).unwrap();
        assert!(!staged.exists());
        assert_eq!(std::fs::read(target.join("model.bpk")).unwrap(), b"weights");

        let file = tmp.path().join("head.tmp");
        std::fs::write(&file, b"head").unwrap();
        rename(&file, &tmp.path().join("head.bpk")).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("head.bpk")).unwrap(), b"head");
        assert!(rename(&tmp.path().join("missing"), &tmp.path().join("x")).is_err());
    }
}
