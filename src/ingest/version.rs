//! A new version of a stored dataset: some of its images left out, some filed under another
//! class (the fixes a run's audit suggests). The images are linked (or copied) from the
//! original's folder, which is never touched, and the result passes the same class checks
//! as an upload.

use std::path::Path;

use super::pipeline::{finish, known_format};
use super::{IngestError, Ingested, Limits, StoredImage};

/// One image of the original that the version keeps, under `class`.
pub struct Kept {
    pub class: String,
    pub original_name: String,
    pub sha256: String,
    pub format: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

/// Links each kept image from `source` into `staging` (created here) and checks the classes.
pub fn derive_version(
    source: &Path,
    kept: Vec<Kept>,
    staging: &Path,
    warnings: Vec<String>,
    limits: &Limits,
) -> Result<Ingested, IngestError> {
    std::fs::create_dir_all(staging)?;
    let mut out = Ingested {
        classes: Vec::new(),
        images: Vec::with_capacity(kept.len()),
        skipped: Vec::new(),
        warnings,
        dir: staging.to_path_buf(),
    };
    for k in kept {
        let format = known_format(&k.format).ok_or_else(|| {
            IngestError::Layout(format!("stored image {} has an unknown format", k.sha256))
        })?;
        let image = StoredImage {
            class: k.class,
            original_name: k.original_name,
            sha256: k.sha256,
            format,
            width: k.width,
            height: k.height,
            bytes: k.bytes,
        };
        let name = image.file_name();
        let to = staging.join(&name);
        // Content-addressed and never rewritten, so a hard link is as good as a copy.
        if !to.exists() && std::fs::hard_link(source.join(&name), &to).is_err() {
            std::fs::copy(source.join(&name), &to)?;
        }
        out.images.push(image);
    }
    finish(out, limits)
}
