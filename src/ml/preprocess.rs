//! Decoding and the deterministic evaluation view.
//!
//! These are TensorFlow-trained weights, so pixels are normalised as TF did, `(x - 127) / 128`
//! on 0–255 RGB (ImageNet mean/std costs 1.4 points of accuracy on frozen features here).
//! The evaluation view resizes the shorter side to `size + 32` and centre-crops `size`, the
//! evaluation crop the EfficientNet-Lite weights were published with (224 from 256 for
//! Lite0, 240 from 272 for Lite1, 260 from 292 for Lite2).

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

/// Pixel value subtracted before scaling.
pub const MEAN: f32 = 127.0;
/// Divisor applied after the mean is subtracted.
pub const SCALE: f32 = 128.0;
/// Largest width or height accepted before decoding (guards against decompression bombs).
pub const DEFAULT_MAX_DIMENSION: u32 = 12_000;
/// Image formats transferd accepts, recognised by content.
pub const ACCEPTED: [ImageFormat; 3] = [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP];

/// How images become tensors; stored in each model's `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Side of the square network input.
    pub input_size: usize,
    /// Shorter side after resizing, before the centre crop.
    pub resize_shorter: usize,
    /// Subtracted from 0–255 RGB values.
    pub mean: f32,
    /// Divides the centred values.
    pub scale: f32,
}

impl Preprocessing {
    /// EfficientNet-Lite's evaluation crop at `input_size` (224 → resize 256, crop 224).
    pub fn for_size(input_size: usize) -> Self {
        Self {
            input_size,
            resize_shorter: input_size + 32,
            mean: MEAN,
            scale: SCALE,
        }
    }
}

/// Why an image could not be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ImageRejection {
    #[error("not an image (content is not JPEG, PNG or WebP)")]
    NotAnImage,
    #[error("unsupported image format {0}")]
    Unsupported(String),
    #[error("image is {width}x{height}, larger than the {max}px limit")]
    TooLarge { width: u32, height: u32, max: u32 },
    #[error("corrupt image: {0}")]
    Corrupt(String),
}

/// Recognises the format from the first bytes; the file name plays no part.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, ImageRejection> {
    let format = image::guess_format(bytes).map_err(|_| ImageRejection::NotAnImage)?;
    if ACCEPTED.contains(&format) {
        Ok(format)
    } else {
        Err(ImageRejection::Unsupported(format!("{format:?}")))
    }
}

/// Width and height from the header alone, without decoding pixels.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageRejection> {
    checked_header(bytes, u32::MAX).map(|(_, w, h)| (w, h))
}

/// Format and size from the header, refusing images over `max_dimension` on either side
/// before any pixel is allocated (the guard against decompression bombs).
pub fn checked_header(
    bytes: &[u8],
    max_dimension: u32,
) -> Result<(ImageFormat, u32, u32), ImageRejection> {
    let format = sniff(bytes)?;
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| ImageRejection::Corrupt(e.to_string()))?;
    if width > max_dimension || height > max_dimension {
        return Err(ImageRejection::TooLarge {
            width,
            height,
            max: max_dimension,
        });
    }
    Ok((format, width, height))
}

/// Whether a JPEG's image data is complete. The decoder is lenient and paints a truncated
/// file's missing rows grey, which would train on half-grey photos, so we look for the
/// end-of-image marker after the first start-of-scan. Scan data byte-stuffs every 0xFF, so
/// `FF D9` there can only be the real end marker; marker segments before the scan (EXIF
/// thumbnails included) are skipped by their lengths.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if marker == 0xDA {
            let scan = &bytes[(i + 2 + len).min(bytes.len())..];
            return scan.windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        i += 2 + len;
    }
    false
}

/// Decodes to RGB, refusing oversized images before any pixel is allocated, and applies the
/// EXIF orientation so phone photos are upright.
pub fn decode(bytes: &[u8], max_dimension: u32) -> Result<RgbImage, ImageRejection> {
    let (format, _, _) = checked_header(bytes, max_dimension)?;
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(ImageRejection::Corrupt(
            "truncated JPEG (no end-of-image marker)".into(),
        ));
    }
    let corrupt = |e: image::ImageError| ImageRejection::Corrupt(e.to_string());
    let mut decoder = ImageReader::with_format(Cursor::new(bytes), format)
        .into_decoder()
        .map_err(corrupt)?;
    let orientation = decoder.orientation().map_err(corrupt)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// The size `image` takes when its shorter side becomes `shorter`, keeping the aspect ratio.
fn shorter_size(image: &RgbImage, shorter: usize) -> (u32, u32) {
    let (w, h) = image.dimensions();
    let s = shorter as f64 / w.min(h) as f64;
    let nw = ((w as f64 * s).round() as u32).max(shorter as u32);
    let nh = ((h as f64 * s).round() as u32).max(shorter as u32);
    (nw, nh)
}

/// Resize so that the shorter side is `shorter`, keeping the aspect ratio.
pub fn resize_shorter(image: &RgbImage, shorter: usize) -> RgbImage {
    let (nw, nh) = shorter_size(image, shorter);
    image::imageops::resize(image, nw, nh, FilterType::Triangle)
}

/// The centre `size`×`size` square.
pub fn center_crop(image: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = image.dimensions();
    let s = size as u32;
    let x = (w.saturating_sub(s)) / 2;
    let y = (h.saturating_sub(s)) / 2;
    image::imageops::crop_imm(image, x, y, s.min(w), s.min(h)).to_image()
}

/// Normalised CHW floats of a square RGB image.
pub fn to_chw(image: &RgbImage) -> Vec<f32> {
    let (w, h) = image.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0.0; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (pixel[c] as f32 - MEAN) / SCALE;
        }
    }
    out
}

/// The deterministic view used for validation and prediction: `[3, size, size]` floats, the
/// centre crop of the photo resized to `resize_shorter` (only the kept pixels are resampled,
/// `resize::resized_centre`, with the same result as resizing the whole photo).
pub fn eval_view(image: &RgbImage, pre: &Preprocessing) -> Vec<f32> {
    let (nw, nh) = shorter_size(image, pre.resize_shorter);
    let size = pre.input_size as u32;
    match super::resize::resized_centre(image, nw, nh, size) {
        Some(rgb) => {
            let crop = RgbImage::from_raw(size, size, rgb).expect("size × size RGB bytes");
            to_chw(&crop)
        }
        None => to_chw(&center_crop(
            &resize_shorter(image, pre.resize_shorter),
            pre.input_size,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 200])
        });
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn eval_view_has_shape_and_range() {
        let img = decode(&png(300, 200), DEFAULT_MAX_DIMENSION).unwrap();
        let v = eval_view(&img, &Preprocessing::for_size(64));
        assert_eq!(v.len(), 3 * 64 * 64);
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert_eq!(Preprocessing::for_size(224).resize_shorter, 256);
    }

    #[test]
    fn rejects_by_content_not_name() {
        assert_eq!(sniff(b"hello, I am text"), Err(ImageRejection::NotAnImage));
        let bytes = png(40, 30);
        assert_eq!(dimensions(&bytes), Ok((40, 30)));
        assert!(matches!(
            decode(&bytes, 32),
            Err(ImageRejection::TooLarge { .. })
        ));
        assert!(matches!(
            decode(&bytes[..bytes.len() / 2], 100),
            Err(ImageRejection::Corrupt(_))
        ));
    }

    #[test]
    fn truncated_jpeg_is_corrupt() {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        assert!(jpeg_is_complete(&jpeg));
        assert!(decode(&jpeg, 100).is_ok());
        let cut = &jpeg[..jpeg.len() * 2 / 3];
        assert!(!jpeg_is_complete(cut));
        assert!(
            matches!(decode(cut, 100), Err(ImageRejection::Corrupt(m)) if m.contains("truncated"))
        );
    }
}
