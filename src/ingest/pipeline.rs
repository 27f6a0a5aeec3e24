//! The one road from a source of files (a zip, a folder) to a stored dataset. Names and
//! symlinks are checked for every entry before any byte is read; sizes are counted as bytes
//! are really read, so a source that lies about its sizes gains nothing. Usable images are
//! written, named by content hash, into a staging folder.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use image::ImageFormat;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::layout::resolve;
use super::names::{check_entry_name, is_litter};
use super::{IngestError, Ingested, Limits, Skipped, StoredImage, TINY_SIDE};
use crate::ml::data::{FolderDataset, imbalanced};
use crate::ml::preprocess;

/// Entries read before their images are checked in parallel.
const CHUNK_ENTRIES: usize = 64;
const CHUNK_BYTES: usize = 256 << 20;

/// One entry of a source, before it is read.
pub(super) struct Entry {
    /// Path inside the source, components separated by `/`.
    pub name: String,
    pub is_dir: bool,
    pub is_symlink: bool,
}

/// What reading one entry gave: the bytes read (at most the cap plus one, so an oversized
/// entry is noticed), and the reason it could not be read to the end, if any.
pub(super) struct ReadEntry {
    pub bytes: Vec<u8>,
    pub error: Option<String>,
}

/// A zip archive or a folder, seen as a list of entries.
pub(super) trait Source {
    /// Every entry, in a stable order; the source refuses itself when it holds more than
    /// `limits.max_entries`.
    fn entries(&mut self) -> Result<Vec<Entry>, IngestError>;
    /// Reads entry `index` of [`Source::entries`], stopping after `cap + 1` bytes.
    fn read(&mut self, index: usize, cap: u64) -> ReadEntry;
}

struct Pending {
    name: String,
    class: String,
    bytes: Vec<u8>,
}

/// The refusal for a source with too many entries, worded once for every source.
pub(super) fn too_many_entries(found: usize, limits: &Limits) -> IngestError {
    IngestError::TooLarge(format!(
        "the dataset has {found} entries, the limit is {}",
        limits.max_entries
    ))
}

/// Checks every entry of `source` and writes every usable image into `dir` (created if
/// needed) as `<sha256>.<ext>`. On error the caller removes `dir`.
pub(super) fn ingest(
    source: &mut dyn Source,
    dir: &Path,
    limits: &Limits,
) -> Result<Ingested, IngestError> {
    let entries = source.entries()?;
    if entries.len() > limits.max_entries {
        return Err(too_many_entries(entries.len(), limits));
    }

    // Pass 1: names only. One unsafe entry refuses the whole source.
    let mut files: Vec<(usize, String)> = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let parts = check_entry_name(&entry.name)?;
        if entry.is_symlink {
            return Err(IngestError::UnsafeEntry {
                name: entry.name,
                why: "symbolic links are not allowed",
            });
        }
        if entry.is_dir || parts.is_empty() || is_litter(&parts) {
            continue;
        }
        files.push((i, entry.name));
    }
    let parts: Vec<Vec<&str>> = files
        .iter()
        .map(|(_, n)| check_entry_name(n).expect("checked above"))
        .collect();
    let layout = resolve(&parts)?;
    check_classes(&layout.classes, limits)?;

    // Pass 2: read, check and store.
    fs::create_dir_all(dir)?;
    let mut out = Ingested {
        classes: Vec::new(),
        images: Vec::new(),
        skipped: Vec::new(),
        warnings: layout.warnings,
        dir: dir.to_path_buf(),
    };
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut total = 0u64;
    let mut pending = Vec::new();
    let mut pending_bytes = 0usize;
    for ((index, name), class) in files.into_iter().zip(layout.classes) {
        let Some(class) = class else {
            out.skipped.push(Skipped {
                name,
                reason: "not inside a class folder".into(),
            });
            continue;
        };
        let ReadEntry { bytes, error } = source.read(index, limits.max_entry_bytes);
        total += bytes.len() as u64;
        if bytes.len() as u64 > limits.max_entry_bytes {
            return Err(IngestError::TooLarge(format!(
                "entry {name:?} inflates to more than {} bytes, the per-file limit",
                limits.max_entry_bytes
            )));
        }
        if total > limits.max_total_bytes {
            return Err(IngestError::TooLarge(format!(
                "the dataset inflates to more than {} bytes, the limit",
                limits.max_total_bytes
            )));
        }
        if let Some(reason) = error {
            out.skipped.push(Skipped { name, reason });
            continue;
        }
        pending_bytes += bytes.len();
        pending.push(Pending { name, class, bytes });
        if pending.len() >= CHUNK_ENTRIES || pending_bytes >= CHUNK_BYTES {
            store(std::mem::take(&mut pending), limits, &mut seen, &mut out)?;
            pending_bytes = 0;
        }
    }
    store(pending, limits, &mut seen, &mut out)?;
    finish(out, limits)
}

/// Longest class name, in characters.
pub const MAX_CLASS_NAME: usize = 100;

/// Class names become labels on every page, API answer and export: before any byte is read,
/// each must be printable and short, and there must not be more than `limits.max_classes`.
fn check_classes(classes: &[Option<String>], limits: &Limits) -> Result<(), IngestError> {
    let mut names: Vec<&str> = classes.iter().flatten().map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    if names.len() > limits.max_classes {
        return Err(IngestError::TooManyClasses {
            found: names.len(),
            max: limits.max_classes,
        });
    }
    for name in names {
        let why = if name.chars().count() > MAX_CLASS_NAME {
            Some(format!("longer than {MAX_CLASS_NAME} characters"))
        } else if name.chars().any(|c| c.is_control() || is_bidi_control(c)) {
            Some("it holds control or text-direction characters".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            let shown: String = name.chars().take(40).filter(|c| !c.is_control()).collect();
            return Err(IngestError::BadClassName {
                folder: shown.escape_debug().to_string(),
                why,
            });
        }
    }
    Ok(())
}

/// Characters that reorder text when shown (they can disguise one label as another).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The formats datasets store, under the names their files and rows carry.
const FORMATS: [(ImageFormat, &str); 5] = [
    (ImageFormat::Jpeg, "jpeg"),
    (ImageFormat::Png, "png"),
    (ImageFormat::WebP, "webp"),
    (ImageFormat::Gif, "gif"),
    (ImageFormat::Bmp, "bmp"),
];

/// The stored format name of a format name read back from the database.
pub(super) fn known_format(name: &str) -> Option<&'static str> {
    FORMATS.iter().map(|f| f.1).find(|f| *f == name)
}

fn format_name(format: ImageFormat) -> &'static str {
    FORMATS
        .iter()
        .find(|f| f.0 == format)
        .map_or("bin", |f| f.1)
}

/// Checks a chunk of read entries in parallel, then writes the new ones.
fn store(
    chunk: Vec<Pending>,
    limits: &Limits,
    seen: &mut HashMap<String, String>,
    out: &mut Ingested,
) -> Result<(), IngestError> {
    let checked: Vec<_> = chunk
        .into_par_iter()
        .map(|p| {
            let verdict = preprocess::decode(&p.bytes, limits.max_image_dimension)
                .and_then(|_| preprocess::checked_header(&p.bytes, limits.max_image_dimension));
            let sha = hex::encode(Sha256::digest(&p.bytes));
            (p, verdict, sha)
        })
        .collect();
    for (p, verdict, sha256) in checked {
        let (format, width, height) = match verdict {
            Ok(v) => v,
            Err(e) => {
                out.skipped.push(Skipped {
                    name: p.name,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        if let Some(first) = seen.get(&sha256) {
            out.skipped.push(Skipped {
                name: p.name,
                reason: format!("duplicate of {first}"),
            });
            continue;
        }
        seen.insert(sha256.clone(), p.name.clone());
        let image = StoredImage {
            class: p.class,
            original_name: p.name,
            sha256,
            format: format_name(format),
            width,
            height,
            bytes: p.bytes.len() as u64,
        };
        write_atomic(&out.dir, &image.file_name(), &p.bytes)?;
        out.images.push(image);
    }
    Ok(())
}

/// Temp file + rename: a crash never leaves a half-written image under its final name.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), IngestError> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_data()?;
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    Ok(())
}

/// Class list, the per-class minimum, and the warnings.
pub(super) fn finish(mut out: Ingested, limits: &Limits) -> Result<Ingested, IngestError> {
    let mut classes: Vec<String> = out.images.iter().map(|i| i.class.clone()).collect();
    classes.sort();
    classes.dedup();
    out.classes = classes;
    if out.classes.len() < 2 {
        return Err(IngestError::TooFewClasses {
            found: out.classes.len(),
            classes: out.classes,
        });
    }
    let counts = out.dataset().counts();
    for (class, &count) in out.classes.iter().zip(&counts) {
        if count < limits.min_images_per_class {
            return Err(IngestError::TooFewImages {
                class: class.clone(),
                count,
                min: limits.min_images_per_class,
            });
        }
    }
    if imbalanced(&counts) {
        let (min, max) = (
            counts.iter().min().expect("2 classes"),
            counts.iter().max().expect("2 classes"),
        );
        out.warnings.push(format!(
            "classes are imbalanced ({min} to {max} images); training weights the classes to \
             compensate, but more images of the small classes would help more"
        ));
    }
    let tiny = out
        .images
        .iter()
        .filter(|i| i.width.min(i.height) < TINY_SIDE)
        .count();
    if tiny > 0 {
        out.warnings.push(format!(
            "{tiny} image(s) are smaller than {TINY_SIDE} px on a side; they are upscaled and \
             carry little detail"
        ));
    }
    Ok(out)
}

impl Ingested {
    /// The training view of what was stored: every image under its stored name, labelled
    /// by its class's index.
    pub fn dataset(&self) -> FolderDataset {
        let samples = self
            .images
            .iter()
            .map(|i| crate::ml::data::Sample {
                path: self.dir.join(i.file_name()),
                label: self
                    .classes
                    .iter()
                    .position(|c| *c == i.class)
                    .expect("every image's class is listed"),
            })
            .collect();
        FolderDataset {
            classes: self.classes.clone(),
            samples,
            skipped: self.skipped.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(names: &[&str]) -> Vec<Option<String>> {
        names
            .iter()
            .map(|n| Some(n.to_string()))
            .chain([None])
            .collect()
    }

    #[test]
    fn class_names_must_be_short_printable_and_few() {
        let limits = Limits {
            max_classes: 3,
            ..Limits::DEFAULT
        };
        assert!(check_classes(&classes(&["cat", "dog", "cat", "hot dog 🌭"]), &limits).is_ok());
        let many = check_classes(&classes(&["a", "b", "c", "d"]), &limits).unwrap_err();
        assert!(
            matches!(many, IngestError::TooManyClasses { found: 4, max: 3 }),
            "{many}"
        );
        let long = "x".repeat(MAX_CLASS_NAME + 1);
        let err = check_classes(&classes(&["cat", &long]), &limits).unwrap_err();
        assert!(err.to_string().contains("longer than 100"), "{err}");
        assert!(check_classes(&classes(&[&"x".repeat(MAX_CLASS_NAME)]), &limits).is_ok());
        for bad in ["cat\u{202E}gpj", "dog\u{0007}", "a\nb", "\u{2066}x"] {
            let err = check_classes(&classes(&["cat", bad]), &limits).unwrap_err();
            assert!(
                matches!(err, IngestError::BadClassName { ref why, .. } if why.contains("control")),
                "{bad:?}: {err}"
            );
        }
    }
}
