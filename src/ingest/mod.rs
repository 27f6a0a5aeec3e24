//! Dataset ingestion, the one road from files to a dataset: a zip (uploads) or a folder (the
//! CLI and the benchmarks) of folder-per-class photos is checked entry by entry (limits on
//! the bytes really read, unsafe names, symlinks in archives, image sniffing and header
//! dimensions, a full decode, duplicates by content) and the usable images are written,
//! named by content hash, into a staging folder. Nothing here knows about HTTP or the
//! database.

mod folder;
mod layout;
mod names;
mod pipeline;
mod version;
mod zip;

use std::path::PathBuf;

pub use self::folder::{Staged, ingest_folder, stage_folder};
pub use self::version::{Kept, derive_version};
pub use self::zip::ingest_zip;
pub use crate::ml::data::Skipped;

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
    /// Most classes (class folders) a dataset may have.
    pub max_classes: usize,
}

impl Limits {
    /// The defaults of `transferd serve`, and the CLI's limits for a local folder.
    pub const DEFAULT: Limits = Limits {
        max_entries: 50_000,
        max_total_bytes: 4 << 30,
        max_entry_bytes: 64 << 20,
        max_image_dimension: crate::ml::preprocess::DEFAULT_MAX_DIMENSION,
        min_images_per_class: 5,
        max_classes: 1_000,
    };

    /// Limits for a local folder trained with `config`: its image rules, the default caps.
    pub fn local(config: &crate::ml::config::TrainConfig) -> Limits {
        Limits {
            max_image_dimension: config.max_image_dimension,
            min_images_per_class: config.min_images_per_class,
            ..Limits::DEFAULT
        }
    }
}

/// Why a whole upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the upload is not a readable zip archive: {0}")]
    NotAZip(String),
    #[error("data folder {0} does not exist or is not a directory")]
    NotAFolder(PathBuf),
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
    #[error("the dataset has {found} class folders, the limit is {max}")]
    TooManyClasses { found: usize, max: usize },
    #[error("class folder {folder:?} cannot be a class name: {why}")]
    BadClassName { folder: String, why: String },
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
        stored_name(&self.sha256, self.format)
    }
}

/// The name an image is stored under in its dataset folder: its content hash and format.
pub fn stored_name(sha256: &str, format: &str) -> String {
    format!("{sha256}.{format}")
}

/// What came out of an archive.
#[derive(Debug, Clone)]
pub struct Ingested {
    /// Class names, sorted.
    pub classes: Vec<String>,
    pub images: Vec<StoredImage>,
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<String>,
    /// Where the images were written.
    pub dir: PathBuf,
}

impl Ingested {
    /// Classes and no image: datasets rows for tests and benchmarks of the queue.
    pub fn empty(classes: &[&str]) -> Self {
        Self {
            classes: classes.iter().map(|c| c.to_string()).collect(),
            images: Vec::new(),
            skipped: Vec::new(),
            warnings: Vec::new(),
            dir: PathBuf::from("."),
        }
    }
}

/// Images whose shorter side is below this are reported as tiny.
pub const TINY_SIDE: u32 = 64;
