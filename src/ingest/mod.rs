//! Dataset ingestion: a zip of folder-per-class photos is checked entry by entry (limits on
//! the bytes really inflated, unsafe names, symlinks, image sniffing and header dimensions,
//! a full decode) and the usable images are written, named by content hash, into a staging
//! folder. Nothing here knows about HTTP or the database.

mod layout;
mod names;
mod zip;

use std::path::PathBuf;

use serde::Serialize;
use utoipa::ToSchema;

pub use self::zip::ingest_zip;

/// Caps that protect the server from huge or hostile archives.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_entries: usize,
    /// Bytes inflated in total, counted as they are inflated.
    pub max_total_bytes: u64,
    /// Bytes one entry may inflate to.
    pub max_entry_bytes: u64,
    pub max_image_dimension: u32,
    pub min_images_per_class: usize,
}

/// Why a whole upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the upload is not a readable zip archive: {0}")]
    NotAZip(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("entry {name:?} is refused: {why}")]
    UnsafeEntry { name: String, why: &'static str },
    #[error("{0}")]
    Layout(String),
    #[error(
        "need at least 2 classes (one folder per class with images in it), found {found}: {classes:?}"
    )]
    TooFewClasses { found: usize, classes: Vec<String> },
    #[error("class {class:?} has {count} usable images, the minimum is {min}")]
    TooFewImages {
        class: String,
        count: usize,
        min: usize,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// An image kept from the archive, stored as `<sha256>.<ext>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    pub class: String,
    /// Path inside the archive, for people.
    pub original_name: String,
    pub sha256: String,
    /// `jpeg`, `png`, `webp`, `gif` or `bmp`.
    pub format: &'static str,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

impl StoredImage {
    /// The file name in the dataset folder.
    pub fn file_name(&self) -> String {
        format!("{}.{}", self.sha256, self.format)
    }
}

/// A file left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct SkippedFile {
    pub name: String,
    pub reason: String,
}

/// What came out of an archive.
#[derive(Debug, Clone)]
pub struct Ingested {
    /// Class names, sorted.
    pub classes: Vec<String>,
    pub images: Vec<StoredImage>,
    pub skipped: Vec<SkippedFile>,
    pub warnings: Vec<String>,
    /// Where the images were written.
    pub dir: PathBuf,
}

impl Ingested {
    /// Images per class, in class order.
    pub fn counts(&self) -> Vec<usize> {
        self.classes
            .iter()
            .map(|c| self.images.iter().filter(|i| &i.class == c).count())
            .collect()
    }
}

/// Images whose shorter side is below this are reported as tiny.
pub const TINY_SIDE: u32 = 64;
