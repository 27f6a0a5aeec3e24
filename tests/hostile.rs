//! Hostile and unusual uploads: real zip bombs, archives that lie about their sizes, images
//! whose headers claim absurd dimensions, and layouts that must still be accepted.

mod common;

use std::io::Write;

use axum::http::StatusCode;
use common::harness::{error_message, harness};
use serde_json::json;
use sqlx::SqlitePool;

/// A zip with one entry of `size` zero bytes, deflated (zeros compress about 1000:1).
fn zeros_zip(name: &str, size: u64) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(9))
        .large_file(size >= u32::MAX as u64);
    w.start_file(name, opts).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    w.finish().unwrap().into_inner()
}

/// Overwrites every little-endian u32 `from` at the size offsets of local (offset 22) and
/// central (offset 24) headers with `to`.
fn lie_about_sizes(zip: &mut [u8], from: u32, to: u32) -> usize {
    let mut patched = 0;
    for i in 0..zip.len().saturating_sub(30) {
        let at = match &zip[i..i + 4] {
            [0x50, 0x4b, 0x03, 0x04] => i + 22,
            [0x50, 0x4b, 0x01, 0x02] => i + 24,
            _ => continue,
        };
        if zip[at..at + 4] == from.to_le_bytes() {
            zip[at..at + 4].copy_from_slice(&to.to_le_bytes());
            patched += 1;
        }
    }
    patched
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG that claims `w`×`h` and holds no pixels.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // An empty IDAT and IEND, so a decoder gets as far as the pixel data.
    for chunk in [&b"IDAT"[..], &b"IEND"[..]] {
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(&crc32(chunk).to_be_bytes());
    }
    out
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn a_real_gigabyte_bomb_is_refused_by_the_bytes_inflated(pool: SqlitePool) {
    let h = harness(pool, |_| {});
    let (status, first) = h.upload(common::pets_zip()).await;
    assert_eq!(status, StatusCode::CREATED);
    let bomb = zeros_zip("dog/bomb.jpg", (1 << 30) + 1);
    assert!(bomb.len() < 3 << 20, "about a megabyte: {}", bomb.len());
    let (status, v) = h.upload(bomb).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(error_message(&v).contains("per-file limit"), "{v}");
    let (_, list) = h.get("/api/datasets").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], first["id"]);
    assert_eq!(h.dataset_dirs(), 1);
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn sizes_the_archive_lies_about_are_not_trusted(pool: SqlitePool) {
    let h = harness(pool, |s| s.limits.max_entry_bytes = 8 << 20);
    // 32 MiB of zeros among the pets, whose headers claim 100 bytes.
    let mut entries = common::pet_entries("");
    entries.push(("dog/liar.jpg".into(), vec![0u8; 32 << 20]));
    let refs: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    let mut liar = common::zip_of(&refs);
    assert!(lie_about_sizes(&mut liar, 32 << 20, 100) >= 2);
    let (status, v) = h.upload(liar).await;
    // Either the inflated bytes trip the per-file cap, or the entry fails its own checks and
    // is skipped; never is the declared size believed.
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            assert!(error_message(&v).contains("per-file limit"), "{v}");
            assert_eq!(h.dataset_dirs(), 0);
        }
        StatusCode::CREATED => {
            let skipped = v["skipped"].as_array().unwrap();
            assert!(skipped.iter().any(|s| s["name"] == "dog/liar.jpg"), "{v}");
            assert_eq!(v["total_images"], 24);
        }
        other => panic!("{other}: {v}"),
    }
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn absurd_dimensions_text_photos_and_three_classes(pool: SqlitePool) {
    let h = harness(pool, |_| {});
    let mut entries = common::pet_entries("");
    let birds: Vec<(String, Vec<u8>)> = entries
        .iter()
        .filter(|(n, _)| n.starts_with("cat/"))
        .take(4)
        .map(|(n, b)| {
            (n.replace("cat/", "bird/"), {
                // Different bytes, so they are not duplicates of the cats.
                let mut b = b.clone();
                b.extend_from_slice(b"bird");
                b
            })
        })
        .collect();
    entries.extend(birds);
    entries.push(("dog/huge.png".into(), png_header(60_000, 60_000)));
    entries.push(("cat/letter.jpg".into(), b"Dear cat, ...".to_vec()));
    let refs: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    let (status, v) = h.upload(common::zip_of(&refs)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["classes"],
        json!([{"name": "bird", "count": 4}, {"name": "cat", "count": 12}, {"name": "dog", "count": 12}])
    );
    let skipped = v["skipped"].as_array().unwrap();
    let reason = |n: &str| {
        skipped
            .iter()
            .find(|s| s["name"] == n)
            .map(|s| s["reason"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{n} not skipped: {skipped:?}"))
    };
    assert!(
        reason("dog/huge.png").contains("60000x60000"),
        "{skipped:?}"
    );
    assert!(reason("cat/letter.jpg").contains("not an image"));
    assert!(
        v["warnings"][0].as_str().unwrap().contains("imbalanced"),
        "{v}"
    );
}
