//! Reading a dataset zip safely. Names and symlinks are checked for every entry before any
//! byte is inflated; sizes are counted as bytes are really inflated, so an archive that lies
//! about its sizes in the central directory gains nothing.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::path::Path;

use ::zip::ZipArchive;
use image::ImageFormat;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::layout::resolve;
use super::names::{check_entry_name, is_litter};
use super::{IngestError, Ingested, Limits, SkippedFile, StoredImage, TINY_SIDE};
use crate::ml::preprocess;

/// Entries inflated before their images are checked in parallel.
const CHUNK_ENTRIES: usize = 64;
const CHUNK_BYTES: usize = 256 << 20;

struct Pending {
    name: String,
    class: String,
    bytes: Vec<u8>,
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Png => "png",
        ImageFormat::WebP => "webp",
        ImageFormat::Gif => "gif",
        ImageFormat::Bmp => "bmp",
        _ => "bin",
    }
}

/// Checks `zip_path` and writes every usable image into `dir` (created if needed) as
/// `<sha256>.<ext>`. On error the caller removes `dir`.
pub fn ingest_zip(zip_path: &Path, dir: &Path, limits: &Limits) -> Result<Ingested, IngestError> {
    let file = File::open(zip_path)?;
    let mut archive =
        ZipArchive::new(BufReader::new(file)).map_err(|e| IngestError::NotAZip(e.to_string()))?;
    if archive.len() > limits.max_entries {
        return Err(IngestError::TooLarge(format!(
            "the archive has {} entries, the limit is {}",
            archive.len(),
            limits.max_entries
        )));
    }

    // Pass 1: names only. One unsafe entry refuses the whole archive.
    let mut files: Vec<(usize, String)> = Vec::new();
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
            .map_err(|e| IngestError::NotAZip(e.to_string()))?;
        let name = entry.name().to_string();
        let parts = check_entry_name(&name)?;
        if entry.is_symlink() {
            return Err(IngestError::UnsafeEntry {
                name,
                why: "symbolic links are not allowed",
            });
        }
        if entry.is_dir() || parts.is_empty() || is_litter(&parts) {
            continue;
        }
        files.push((i, name));
    }
    let parts: Vec<Vec<&str>> = files
        .iter()
        .map(|(_, n)| check_entry_name(n).expect("checked above"))
        .collect();
    let layout = resolve(&parts)?;

    // Pass 2: inflate, check and store.
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
            out.skipped.push(SkippedFile {
                name,
                reason: "not inside a class folder".into(),
            });
            continue;
        };
        let mut entry = match archive.by_index(index) {
            Ok(e) => e,
            Err(e) => {
                out.skipped.push(SkippedFile {
                    name,
                    reason: format!("unreadable archive entry: {e}"),
                });
                continue;
            }
        };
        let mut bytes = Vec::with_capacity(entry.size().min(limits.max_entry_bytes) as usize);
        let read = (&mut entry)
            .take(limits.max_entry_bytes + 1)
            .read_to_end(&mut bytes);
        total += bytes.len() as u64;
        if bytes.len() as u64 > limits.max_entry_bytes {
            return Err(IngestError::TooLarge(format!(
                "entry {name:?} inflates to more than {} bytes, the per-file limit",
                limits.max_entry_bytes
            )));
        }
        if total > limits.max_total_bytes {
            return Err(IngestError::TooLarge(format!(
                "the archive inflates to more than {} bytes, the limit",
                limits.max_total_bytes
            )));
        }
        if let Err(e) = read {
            out.skipped.push(SkippedFile {
                name,
                reason: format!("corrupt archive entry: {e}"),
            });
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

/// Checks a chunk of inflated entries in parallel, then writes the new ones.
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
                out.skipped.push(SkippedFile {
                    name: p.name,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        if let Some(first) = seen.get(&sha256) {
            out.skipped.push(SkippedFile {
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
fn finish(mut out: Ingested, limits: &Limits) -> Result<Ingested, IngestError> {
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
    let counts = out.counts();
    for (class, &count) in out.classes.iter().zip(&counts) {
        if count < limits.min_images_per_class {
            return Err(IngestError::TooFewImages {
                class: class.clone(),
                count,
                min: limits.min_images_per_class,
            });
        }
    }
    let (min, max) = (
        *counts.iter().min().expect("2 classes"),
        *counts.iter().max().expect("2 classes"),
    );
    if max as f64 > 1.5 * min as f64 {
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
