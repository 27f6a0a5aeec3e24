//! Any bytes as an uploaded zip: the validation must never panic, hang, or write outside its
//! folder, whatever the archive claims.
#![no_main]

#[path = "../../src/ingest/mod.rs"]
#[allow(dead_code, unused_imports)]
mod ingest;

#[path = "../../src/ml/preprocess.rs"]
#[allow(dead_code)]
mod preprocess;

// The ingest code names it `crate::ml::preprocess`.
mod ml {
    pub(crate) use super::preprocess;
}

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("upload.zip");
    std::fs::write(&zip, data).unwrap();
    let out = dir.path().join("dataset");
    let limits = ingest::Limits {
        max_entries: 256,
        max_total_bytes: 8 << 20,
        max_entry_bytes: 2 << 20,
        max_image_dimension: 2048,
        min_images_per_class: 1,
    };
    if let Ok(done) = ingest::ingest_zip(&zip, &out, &limits) {
        // Everything written stays inside the dataset folder, named by content hash.
        for image in &done.images {
            assert!(out.join(image.file_name()).is_file());
        }
        assert!(done.classes.len() >= 2);
    }
    // Nothing escaped the temporary folder.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(name == "upload.zip" || name == "dataset", "{name:?}");
    }
});
