//! The web page in a real headless Chromium (`tests/browser/e2e.mjs`, playwright-core): upload,
//! train, follow, evaluation, the dataset audit and a corrected dataset version, predict (a
//! foreign image is "none of the classes"), phone width, no console errors. Screenshots of
//! each step go to `target/browser-screenshots/`.
//!
//! It needs Node.js, Debian's `chromium` and `npm ci --prefix tests/browser`, so it is
//! `#[ignore]`d: a plain `cargo test` lists it as ignored rather than passing it silently.
//! `.ci/run` installs what it needs and runs it explicitly (`-- --ignored`); run by hand
//! without them, it fails and says what is missing.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "needs Debian's chromium, Node.js and `npm ci --prefix tests/browser`; .ci/run runs it with --ignored"]
fn web_page_end_to_end_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing: Vec<&str> = [
        (!Path::new(&chromium).exists()).then_some("chromium"),
        (!root
            .join("tests/browser/node_modules/playwright-core")
            .is_dir())
        .then_some("tests/browser/node_modules (npm ci --prefix tests/browser)"),
        Command::new("node")
            .arg("--version")
            .output()
            .is_err()
            .then_some("node"),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(
        missing.is_empty(),
        "the browser test needs {}",
        missing.join(", ")
    );
    let work = tempfile::tempdir().unwrap();
    // The pets plus a re-encoded copy of a cat filed under dog: the audit must find it.
    let zip = work.path().join("pets.zip");
    std::fs::write(&zip, common::pets_zip_with_near_duplicate()).unwrap();
    // A flat pattern (vertical stripes of two flat colours) that looks like neither class.
    let foreign = work.path().join("foreign.png");
    common::stripes(&foreign);
    let out = Command::new("node")
        .arg(root.join("tests/browser/e2e.mjs"))
        .env("TRANSFERD_BIN", env!("CARGO_BIN_EXE_transferd"))
        .env("TRANSFERD_WEIGHTS", common::weights_path())
        // The page's default backbone is `auto`, which picks Lite1 for the 25 fixture photos.
        .env(
            "TRANSFERD_WEIGHTS_LITE1",
            common::weights_of(transferd::ml::backbone::Backbone::Lite1),
        )
        .env("PETS_ZIP", &zip)
        .env("FOREIGN", &foreign)
        .env("SAMPLES", common::fixtures().join("samples"))
        .env("STATIC_DIR", root.join("static"))
        .env("SCREENSHOTS", root.join("target/browser-screenshots"))
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
}
