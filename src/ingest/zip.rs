//! A dataset zip as a [`Source`]: entries in archive order, read through the inflater so that
//! only bytes really inflated are counted.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
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
    let mut file = File::open(zip_path)?;
    // The zip reader loads the whole central directory before anything can be counted: 45
    // million tiny entries would take gigabytes. Its end record says how big it is.
    let directory = directory_size(&mut file)?.ok_or_else(|| {
        IngestError::NotAZip(
            "no consistent end-of-directory record at the end of the file (a zip ends with \
             one)"
                .into(),
        )
    })?;
    check_directory(directory, limits)?;
    let archive =
        ZipArchive::new(BufReader::new(file)).map_err(|e| IngestError::NotAZip(e.to_string()))?;
    let mut source = ZipSource {
        archive,
        limits: limits.clone(),
    };
    ingest(&mut source, dir, limits)
}

/// Bytes one central-directory entry may take on average (46 fixed, a long name, extras).
const DIRECTORY_BYTES_PER_ENTRY: u64 = 512;

/// What the end-of-central-directory record (zip64's when present) declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Directory {
    entries: u64,
    bytes: u64,
}

fn check_directory(d: Directory, limits: &Limits) -> Result<(), IngestError> {
    if d.entries > limits.max_entries as u64 {
        return Err(too_many_entries(
            usize::try_from(d.entries).unwrap_or(usize::MAX),
            limits,
        ));
    }
    let max_bytes = limits.max_entries as u64 * DIRECTORY_BYTES_PER_ENTRY;
    if d.bytes > max_bytes {
        return Err(IngestError::TooLarge(format!(
            "the archive's directory takes {} bytes, more than {max_bytes} for {} entries",
            d.bytes, limits.max_entries
        )));
    }
    Ok(())
}

fn u16_at(b: &[u8], i: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[i], b[i + 1]]))
}

fn u32_at(b: &[u8], i: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// Reads the end record from the file's tail (it sits in the last 64 KiB + 22 bytes, and its
/// comment runs exactly to the end of the file), and the zip64 record it points to when its
/// fields are saturated. The directory it declares must end where the end records begin.
/// `None` when no such record exists: then the zip reader, which searches the whole file
/// and skips records it cannot use, could find another one we did not check, so the upload
/// is refused.
fn directory_size(file: &mut File) -> std::io::Result<Option<Directory>> {
    let len = file.metadata()?.len();
    let tail_len = len.min(65_535 + 22);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail)?;
    let tail_start = len - tail_len;
    let Some(at) = (0..tail.len().saturating_sub(21)).rev().find(|&i| {
        tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06]
            && i + 22 + u16_at(&tail, i + 20) as usize == tail.len()
    }) else {
        return Ok(None);
    };
    let record_at = tail_start + at as u64;
    let mut d = Directory {
        entries: u16_at(&tail, at + 10),
        bytes: u32_at(&tail, at + 12),
    };
    let mut directory_end = u32_at(&tail, at + 16) + d.bytes;
    let mut records_start = record_at;
    if d.entries == 0xFFFF || d.bytes == 0xFFFF_FFFF || directory_end > record_at {
        // Zip64: the locator is the 20 bytes before the end record.
        if at < 20 || tail[at - 20..at - 16] != [0x50, 0x4b, 0x06, 0x07] {
            return Ok(None);
        }
        let record = u64_at(&tail, at - 20 + 8);
        let mut buf = [0u8; 56];
        if record.checked_add(56).is_none_or(|end| end > len) {
            return Ok(None);
        }
        file.seek(SeekFrom::Start(record))?;
        file.read_exact(&mut buf)?;
        if buf[..4] != [0x50, 0x4b, 0x06, 0x06] {
            return Ok(None);
        }
        d = Directory {
            entries: u64_at(&buf, 32),
            bytes: u64_at(&buf, 40),
        };
        directory_end = u64_at(&buf, 48).saturating_add(d.bytes);
        records_start = record;
    }
    if directory_end != records_start {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(Some(d))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn end_record(entries: u16, bytes: u32, offset: u32) -> Vec<u8> {
        let mut r = vec![0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0];
        r.extend_from_slice(&entries.to_le_bytes());
        r.extend_from_slice(&entries.to_le_bytes());
        r.extend_from_slice(&bytes.to_le_bytes());
        r.extend_from_slice(&offset.to_le_bytes()); // directory offset
        r.extend_from_slice(&0u16.to_le_bytes()); // comment length
        r
    }

    /// A file of `gap` zero bytes (sparse: no disk is used) followed by `tail`.
    fn file_with(gap: u64, tail: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.zip");
        let mut f = File::create(&path).unwrap();
        f.set_len(gap).unwrap();
        f.seek(SeekFrom::Start(gap)).unwrap();
        f.write_all(tail).unwrap();
        (dir, path)
    }

    fn limits() -> Limits {
        Limits {
            max_entries: 100,
            ..Limits::DEFAULT
        }
    }

    #[test]
    fn the_end_record_is_read_and_checked_before_the_directory() {
        // A directory of 3 MB claiming 60,000 entries, right before its end record.
        let (_d, path) = file_with(3_000_000, &end_record(60_000, 3_000_000, 0));
        let d = directory_size(&mut File::open(&path).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            d,
            Directory {
                entries: 60_000,
                bytes: 3_000_000
            }
        );
        let err = ingest_zip(&path, &path.with_extension("out"), &limits()).unwrap_err();
        assert!(matches!(err, IngestError::TooLarge(_)), "{err}");
        assert!(err.to_string().contains("60000 entries"), "{err}");

        // Few entries, but a 4 GB directory.
        let (_d, path) = file_with(0xFFFF_FFF0, &end_record(10, 0xFFFF_FFF0, 0));
        let err = ingest_zip(&path, &path.with_extension("out"), &limits()).unwrap_err();
        assert!(err.to_string().contains("directory takes"), "{err}");
    }

    #[test]
    fn records_the_zip_reader_could_skip_are_refused() {
        // The real record, then a fake one appended: the fake's directory does not end where
        // it begins, so the reader would skip it for the real one we did not check.
        let mut tail = end_record(60_000, 3_000_000, 0);
        tail.extend_from_slice(&end_record(1, 10, 0));
        let (_d, path) = file_with(3_000_000, &tail);
        let err = ingest_zip(&path, &path.with_extension("out"), &limits()).unwrap_err();
        assert!(matches!(err, IngestError::NotAZip(_)), "{err}");
        // More than 64 KiB of junk after the record: no record in the tail at all.
        let mut tail = end_record(60_000, 3_000_000, 0);
        tail.extend_from_slice(&vec![7u8; 70_000]);
        let (_d, path) = file_with(3_000_000, &tail);
        let err = ingest_zip(&path, &path.with_extension("out"), &limits()).unwrap_err();
        assert!(matches!(err, IngestError::NotAZip(_)), "{err}");
    }

    #[test]
    fn zip64_counts_are_read_from_the_zip64_record() {
        // 45 million entries in a 2.07 GB directory (sparse), the zip64 end record right
        // after it, its locator, then a saturated end record.
        let directory = 45_000_000u64 * 46;
        let mut bytes = vec![0x50, 0x4b, 0x06, 0x06];
        bytes.extend_from_slice(&44u64.to_le_bytes()); // record size
        bytes.extend_from_slice(&[0u8; 4 + 4 + 4]); // versions, disk numbers
        bytes.extend_from_slice(&45_000_000u64.to_le_bytes()); // entries on this disk
        bytes.extend_from_slice(&45_000_000u64.to_le_bytes()); // entries
        bytes.extend_from_slice(&directory.to_le_bytes()); // directory bytes
        bytes.extend_from_slice(&0u64.to_le_bytes()); // directory offset
        assert_eq!(bytes.len(), 56);
        bytes.extend_from_slice(&[0x50, 0x4b, 0x06, 0x07, 0, 0, 0, 0]);
        bytes.extend_from_slice(&directory.to_le_bytes()); // the zip64 record's offset
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&end_record(0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF));
        let (_d, path) = file_with(directory, &bytes);
        let d = directory_size(&mut File::open(&path).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(d.entries, 45_000_000);
        let err = ingest_zip(&path, &path.with_extension("out"), &Limits::DEFAULT).unwrap_err();
        assert!(err.to_string().contains("45000000 entries"), "{err}");
    }

    #[test]
    fn a_real_archive_passes_the_check() {
        let mut w = ::zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for i in 0..3 {
            w.start_file(
                format!("c/{i}.txt"),
                ::zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
            w.write_all(b"x").unwrap();
        }
        let bytes = w.finish().unwrap().into_inner();
        let (_d, path) = file_with(0, &bytes);
        let d = directory_size(&mut File::open(&path).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(d.entries, 3);
    }
}
