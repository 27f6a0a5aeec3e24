//! A folder on disk as a [`Source`], so that `transferd train --data DIR` and the benchmarks
//! read photos exactly as an upload of the same folder zipped would be read: the same
//! layout rules, skips, duplicate check and messages.
//!
//! Symbolic links are followed, as `zip -r` follows them when it builds an archive: a local
//! folder of links to photos is a common way to assemble a dataset. Entry names are the
//! paths relative to the folder, as a zip made inside the folder would name them.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::names::is_litter;
use super::pipeline::{Entry, ReadEntry, Source, ingest, too_many_entries};
use super::{IngestError, Ingested, Limits};

/// Deepest folder nesting walked; deeper (or a link cycle) is refused.
const MAX_DEPTH: usize = 32;

struct FolderSource {
    root: PathBuf,
    files: Vec<PathBuf>,
    limits: Limits,
}

impl FolderSource {
    /// Every entry below `dir`, sorted by name so a scan is reproducible.
    fn walk(&mut self, dir: &Path, depth: usize, out: &mut Vec<Entry>) -> Result<(), IngestError> {
        if depth > MAX_DEPTH {
            return Err(IngestError::Layout(format!(
                "folders nest deeper than {MAX_DEPTH} levels below {} (a link cycle?)",
                self.root.display()
            )));
        }
        let children: Vec<PathBuf> = fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        for path in children {
            if out.len() >= self.limits.max_entries {
                return Err(too_many_entries(out.len() + 1, &self.limits));
            }
            let name = path
                .strip_prefix(&self.root)
                .expect("walked below the root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            // `metadata` follows links; a dangling link is an unreadable file.
            let is_dir = fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
            // Hidden folders (`.git`, `__MACOSX`) are litter: not walked at all.
            let litter = is_dir && is_litter(&[name.rsplit('/').next().unwrap_or("")]);
            out.push(Entry {
                name,
                is_dir,
                is_symlink: false,
            });
            self.files.push(path.clone());
            if is_dir && !litter {
                self.walk(&path, depth + 1, out)?;
            }
        }
        Ok(())
    }
}

impl Source for FolderSource {
    fn entries(&mut self) -> Result<Vec<Entry>, IngestError> {
        let mut out = Vec::new();
        let root = self.root.clone();
        self.walk(&root, 0, &mut out)?;
        // By full name, as a zip tool lists them sorted: the order decides which copy of a
        // duplicate is kept, and the split.
        let mut order: Vec<usize> = (0..out.len()).collect();
        order.sort_by(|&a, &b| out[a].name.cmp(&out[b].name));
        let mut entries: Vec<Option<Entry>> = out.into_iter().map(Some).collect();
        let files = std::mem::take(&mut self.files);
        self.files = order.iter().map(|&i| files[i].clone()).collect();
        Ok(order
            .into_iter()
            .map(|i| entries[i].take().expect("each once"))
            .collect())
    }

    fn read(&mut self, index: usize, cap: u64) -> ReadEntry {
        let path = &self.files[index];
        let mut bytes = Vec::new();
        // A FIFO or a device would block or never end: only regular files are read.
        let error = match fs::metadata(path) {
            Ok(m) if !m.is_file() => Some("not a regular file".to_string()),
            Ok(_) => File::open(path)
                .and_then(|f| f.take(cap + 1).read_to_end(&mut bytes))
                .err()
                .map(|e| format!("unreadable file: {e}")),
            Err(e) => Some(format!("unreadable file: {e}")),
        };
        ReadEntry { bytes, error }
    }
}

/// Checks the folder-per-class dataset at `src` and writes every usable image into `dir`
/// (created if needed) as `<sha256>.<ext>`, as [`super::ingest_zip`] does for a zip of it.
pub fn ingest_folder(src: &Path, dir: &Path, limits: &Limits) -> Result<Ingested, IngestError> {
    if !src.is_dir() {
        return Err(IngestError::NotAFolder(src.to_path_buf()));
    }
    let mut source = FolderSource {
        root: src.to_path_buf(),
        files: Vec::new(),
        limits: limits.clone(),
    };
    ingest(&mut source, dir, limits)
}

/// A folder ingested into a temporary staging folder, removed when this is dropped: how the
/// CLI and the benchmarks read a local dataset.
pub struct Staged {
    pub ingested: Ingested,
    _dir: tempfile::TempDir,
}

/// Ingests `src` into a fresh temporary folder (see [`ingest_folder`]).
pub fn stage_folder(src: &Path, limits: &Limits) -> Result<Staged, IngestError> {
    let dir = tempfile::Builder::new()
        .prefix("transferd-data-")
        .tempdir()?;
    let ingested = ingest_folder(src, dir.path(), limits)?;
    Ok(Staged {
        ingested,
        _dir: dir,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::ingest::ingest_zip;

    fn pet(name: &str) -> Vec<u8> {
        let pets = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pets");
        fs::read(pets.join(name)).unwrap()
    }

    /// Writes `files` under `root`, and a zip of them named as a zip made inside `root`
    /// would name them (sorted, as `zip -r` walks).
    fn folder_and_zip(root: &Path, files: &[(&str, Vec<u8>)]) -> PathBuf {
        let mut sorted: Vec<_> = files.iter().collect();
        sorted.sort_by_key(|(n, _)| *n);
        let zip_path = root.with_extension("zip");
        let mut w = ::zip::ZipWriter::new(File::create(&zip_path).unwrap());
        for (name, bytes) in sorted {
            let path = root.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, bytes).unwrap();
            w.start_file(*name, ::zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap();
        zip_path
    }

    fn limits() -> Limits {
        Limits {
            min_images_per_class: 2,
            ..Limits::DEFAULT
        }
    }

    #[test]
    fn a_folder_and_a_zip_of_it_give_the_same_dataset_skips_and_warnings() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        let files = [
            ("cat/cat.0.jpg", pet("cat/cat.0.jpg")),
            ("cat/cat.1.jpg", pet("cat/cat.1.jpg")),
            ("cat/more/cat.2.jpg", pet("cat/cat.2.jpg")),
            ("cat/notes.jpg", b"this is not a photo".to_vec()),
            ("cat/Thumbs.db", b"litter".to_vec()),
            ("dog/.DS_Store", b"litter".to_vec()),
            ("dog/dog.0.jpg", pet("dog/dog.0.jpg")),
            ("dog/dog.1.jpg", pet("dog/dog.1.jpg")),
            ("dog/dog.3.jpg", pet("dog/dog.3.jpg")),
            ("dog/dog.4.jpg", pet("dog/dog.4.jpg")),
            ("dog/copy.jpg", pet("cat/cat.0.jpg")),
            ("readme.txt", b"loose".to_vec()),
        ];
        let zip = folder_and_zip(&root, &files);
        let a = ingest_folder(&root, &tmp.path().join("a"), &limits()).unwrap();
        let b = ingest_zip(&zip, &tmp.path().join("b"), &limits()).unwrap();

        assert_eq!(a.classes, vec!["cat", "dog"]);
        assert_eq!(a.classes, b.classes);
        assert_eq!(a.images, b.images);
        assert_eq!(a.skipped, b.skipped);
        assert_eq!(a.warnings, b.warnings);
        assert_eq!(a.dataset().counts(), vec![3, 4]);
        let reasons: Vec<(&str, &str)> = a
            .skipped
            .iter()
            .map(|s| (s.name.as_str(), s.reason.as_str()))
            .collect();
        assert!(
            reasons
                .iter()
                .any(|(n, r)| *n == "cat/notes.jpg" && r.contains("not an image")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|(n, r)| *n == "dog/copy.jpg" && *r == "duplicate of cat/cat.0.jpg"),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|(n, r)| *n == "readme.txt" && *r == "not inside a class folder"),
            "{reasons:?}"
        );
        assert!(
            !reasons
                .iter()
                .any(|(n, _)| n.contains("Thumbs") || n.contains("DS_Store"))
        );
        // The staged files are the dataset's samples, byte for byte.
        for (image, sample) in a.images.iter().zip(a.dataset().samples) {
            assert_eq!(sample.path, a.dir.join(image.file_name()));
            assert!(sample.path.is_file());
        }
    }

    #[test]
    fn a_folder_and_its_zip_are_refused_with_the_same_message() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("one");
        let zip = folder_and_zip(
            &root,
            &[
                ("cat/cat.0.jpg", pet("cat/cat.0.jpg")),
                ("cat/cat.1.jpg", pet("cat/cat.1.jpg")),
            ],
        );
        let a = ingest_folder(&root, &tmp.path().join("a"), &limits()).unwrap_err();
        let b = ingest_zip(&zip, &tmp.path().join("b"), &limits()).unwrap_err();
        assert!(
            matches!(a, IngestError::TooFewClasses { found: 1, .. }),
            "{a}"
        );
        assert_eq!(a.to_string(), b.to_string());

        let missing = ingest_folder(&tmp.path().join("nope"), &tmp.path().join("c"), &limits());
        assert!(matches!(missing, Err(IngestError::NotAFolder(_))));
    }

    #[test]
    fn special_files_are_skipped_not_read_and_hidden_folders_not_walked() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        folder_and_zip(
            &root,
            &[
                ("cat/cat.0.jpg", pet("cat/cat.0.jpg")),
                ("cat/cat.1.jpg", pet("cat/cat.1.jpg")),
                ("dog/dog.0.jpg", pet("dog/dog.0.jpg")),
                ("dog/dog.1.jpg", pet("dog/dog.1.jpg")),
                (".git/objects/a", b"x".to_vec()),
                (".git/objects/b", b"x".to_vec()),
            ],
        );
        // Reading a FIFO would block for ever.
        let fifo = root.join("dog/pipe.jpg");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let capped = Limits {
            // The root's two class folders, four photos, the FIFO and `.git` itself: the
            // `.git` contents are never walked, so they do not count.
            max_entries: 8,
            ..limits()
        };
        let got = ingest_folder(&root, &tmp.path().join("a"), &capped).unwrap();
        assert_eq!(got.dataset().counts(), vec![2, 2]);
        assert!(
            got.skipped
                .iter()
                .any(|s| s.name == "dog/pipe.jpg" && s.reason == "not a regular file"),
            "{:?}",
            got.skipped
        );
    }

    #[test]
    fn a_folder_over_the_entry_cap_is_refused_before_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("many");
        for i in 0..6 {
            fs::create_dir_all(root.join(format!("c{i}"))).unwrap();
        }
        let capped = Limits {
            max_entries: 5,
            ..limits()
        };
        let err = ingest_folder(&root, &tmp.path().join("a"), &capped).unwrap_err();
        assert!(err.to_string().contains("the limit is 5"), "{err}");
    }
}
