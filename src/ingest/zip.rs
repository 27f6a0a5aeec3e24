//! A dataset zip as a [`Source`]: entries in archive order, read through the inflater so that
//! only bytes really inflated are counted.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use ::zip::ZipArchive;

use super::pipeline::{Entry, ReadEntry, Source, ingest, too_many_entries};
use super::{IngestError, Ingested, Limits};

struct ZipSource {
    archive: ZipArchive<BufReader<File>>,
    limits: Limits,
}

impl Source for ZipSource {
    fn entries(&mut self) -> Result<Vec<Entry>, IngestError> {
        let len = self.archive.len();
        if len > self.limits.max_entries {
            return Err(too_many_entries(len, &self.limits));
        }
        (0..len)
            .map(|i| {
                let entry = self
                    .archive
                    .by_index_raw(i)
                    .map_err(|e| IngestError::NotAZip(e.to_string()))?;
                Ok(Entry {
                    name: entry.name().to_string(),
                    is_dir: entry.is_dir(),
                    is_symlink: entry.is_symlink(),
                })
            })
            .collect()
    }

    fn read(&mut self, index: usize, cap: u64) -> ReadEntry {
        let mut entry = match self.archive.by_index(index) {
            Ok(e) => e,
            Err(e) => {
                return ReadEntry {
                    bytes: Vec::new(),
                    error: Some(format!("unreadable archive entry: {e}")),
                };
            }
        };
        let mut bytes = Vec::with_capacity(entry.size().min(cap) as usize);
        let read = (&mut entry).take(cap + 1).read_to_end(&mut bytes);
        ReadEntry {
            bytes,
            error: read.err().map(|e| format!("corrupt archive entry: {e}")),
        }
    }
}

/// Checks `zip_path` and writes every usable image into `dir` (created if needed) as
/// `<sha256>.<ext>`. On error the caller removes `dir`.
pub fn ingest_zip(zip_path: &Path, dir: &Path, limits: &Limits) -> Result<Ingested, IngestError> {
    let file = File::open(zip_path)?;
    let archive =
        ZipArchive::new(BufReader::new(file)).map_err(|e| IngestError::NotAZip(e.to_string()))?;
    let mut source = ZipSource {
        archive,
        limits: limits.clone(),
    };
    ingest(&mut source, dir, limits)
}
