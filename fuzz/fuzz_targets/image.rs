//! Any bytes as an image: sniffing, the header dimension check and decoding must never panic
//! or allocate for dimensions over the cap.
#![no_main]

#[path = "../../src/ml/preprocess.rs"]
#[allow(dead_code)]
mod preprocess;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = preprocess::decode(data, 1024) {
        assert!(image.width() <= 1024 && image.height() <= 1024);
        let view = preprocess::eval_view(&image, &preprocess::Preprocessing::for_size(32));
        assert_eq!(view.len(), 3 * 32 * 32);
    }
});
