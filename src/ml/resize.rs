//! The evaluation view's resize and centre crop in one pass over only the pixels the crop
//! keeps.
//!
//! `image::imageops::resize` with `FilterType::Triangle` resamples the whole photo through
//! generic per-pixel access, then the crop throws most of it away; for a prediction of one
//! photo that took about a third of the model's own time. Here the same sampler (its weights,
//! its order of sums, its rounding: image 0.25's `vertical_sample` then `horizontal_sample`)
//! runs only for the rows and columns that survive the crop, so the result is the same to the
//! bit, which a test checks against `image` itself.

use image::RgbImage;

/// The triangle (bilinear) kernel, as image's sampler defines it.
fn triangle(x: f32) -> f32 {
    if x.abs() < 1.0 { 1.0 - x.abs() } else { 0.0 }
}

/// For output coordinate `out` of an axis resized from `src` to `dst` pixels: the first source
/// pixel it reads and the normalised weights of it and the ones after, as image's sampler
/// computes them.
fn weights(src: u32, dst: u32, out: u32) -> (usize, Vec<f32>) {
    let ratio = src as f32 / dst as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio;
    let centre = (out as f32 + 0.5) * ratio;
    let left = ((centre - support).floor() as i64).clamp(0, i64::from(src) - 1);
    let right = ((centre + support).ceil() as i64).clamp(left + 1, i64::from(src));
    let centre = centre - 0.5;
    let mut ws: Vec<f32> = (left..right)
        .map(|i| triangle((i as f32 - centre) / sratio))
        .collect();
    let sum = ws.iter().fold(0.0f32, |s, w| s + w);
    ws.iter_mut().for_each(|w| *w /= sum);
    (left as usize, ws)
}

/// `v.clamp(0, 255).round() as u8`, without the library call `round` becomes on baseline
/// x86-64 (one per output byte showed up in profiles of predictions): for `0 ≤ v ≤ 255` the
/// fraction `v − ⌊v⌋` is exact in f32, so comparing it with ½ rounds halves away from zero
/// exactly as `round` does (and NaN gives 0 in both).
#[inline]
fn to_byte(v: f32) -> u8 {
    let v = v.clamp(0.0, 255.0);
    let whole = v as u8;
    whole + u8::from(v - f32::from(whole) >= 0.5)
}

/// The centre `size`×`size` square of `image` resized to `width`×`height` with the triangle
/// filter, as RGB bytes row by row; `None` when the resized image would not hold the square
/// or the photo is empty (the caller then takes the general path).
pub fn resized_centre(image: &RgbImage, width: u32, height: u32, size: u32) -> Option<Vec<u8>> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 || width < size || height < size {
        return None;
    }
    let (x0, y0) = ((width - size) / 2, (height - size) / 2);
    if (width, height) == (w, h) {
        // image copies rather than resamples an image of the same size.
        let mut out = Vec::with_capacity((size * size * 3) as usize);
        for y in y0..y0 + size {
            let row = &image.as_raw()[((y * w + x0) * 3) as usize..][..(size * 3) as usize];
            out.extend_from_slice(row);
        }
        return Some(out);
    }
    let columns: Vec<(usize, Vec<f32>)> = (x0..x0 + size).map(|x| weights(w, width, x)).collect();
    // The source columns the kept output columns read.
    let first = columns[0].0;
    let last = columns
        .iter()
        .map(|(l, ws)| l + ws.len())
        .max()
        .expect("size > 0");
    let span = last - first;
    let raw = image.as_raw();
    let stride = w as usize * 3;
    let row_len = span * 3;
    // Vertical pass over the kept rows and the columns they need, in f32 as image keeps it.
    // Each element's sum still runs over the taps in order from zero (the same additions as
    // image's loop, so the same bits); the loops are turned so the inner one runs along a
    // row, which the compiler vectorises.
    let mut tmp = vec![0f32; size as usize * row_len];
    for (dst, y) in tmp.chunks_exact_mut(row_len).zip(y0..y0 + size) {
        let (top, ws) = weights(h, height, y);
        for (i, &weight) in ws.iter().enumerate() {
            let src = &raw[(top + i) * stride + first * 3..][..row_len];
            for (t, &v) in dst.iter_mut().zip(src) {
                *t += f32::from(v) * weight;
            }
        }
    }
    // Horizontal pass: each kept output pixel, rounded to the nearest byte after clamping.
    let mut out = Vec::with_capacity((size * size * 3) as usize);
    for row in tmp.chunks_exact(row_len) {
        for (left, ws) in &columns {
            let taps = &row[(left - first) * 3..][..ws.len() * 3];
            let mut t = [0.0f32; 3];
            for (p, &weight) in taps.chunks_exact(3).zip(ws) {
                for c in 0..3 {
                    t[c] += p[c] * weight;
                }
            }
            out.extend(t.map(to_byte));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::imageops::{self, FilterType};

    #[test]
    fn to_byte_rounds_as_round_does() {
        let mut values = vec![
            -3.0f32,
            -0.5,
            -0.0,
            0.0,
            255.0,
            255.4,
            255.5,
            300.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for k in 0..256 {
            let half = k as f32 + 0.5;
            // Halves and their neighbours, where a shortcut like ⌊v + ½⌋ goes wrong.
            values.extend([
                half,
                half.next_down(),
                half.next_up(),
                k as f32,
                (k as f32).next_down(),
            ]);
        }
        values.extend((0..100_000).map(|i| i as f32 * 0.002_557));
        for v in values {
            assert_eq!(to_byte(v), v.clamp(0.0, 255.0).round() as u8, "{v}");
        }
    }

    /// Bit for bit what image's resize and a centre crop give, down and up, odd sizes
    /// included, on noisy photos (every weight and rounding matters).
    #[test]
    fn matches_images_resize_then_crop() {
        let mut s = 7u64;
        for (w, h, width, height, size) in [
            (500, 375, 341, 256, 224),
            (375, 500, 256, 341, 224),
            (256, 473, 256, 473, 224),
            (100, 80, 320, 256, 224),
            (1001, 997, 257, 256, 240),
            (260, 260, 260, 260, 260),
        ] {
            let photo = RgbImage::from_fn(w, h, |_, _| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (s >> 40).to_le_bytes();
                image::Rgb([b[0], b[1], b[2]])
            });
            let resized = imageops::resize(&photo, width, height, FilterType::Triangle);
            let (x0, y0) = ((width - size) / 2, (height - size) / 2);
            let want = imageops::crop_imm(&resized, x0, y0, size, size).to_image();
            let got = resized_centre(&photo, width, height, size).expect("fits");
            assert_eq!(
                got,
                want.into_raw(),
                "{w}x{h} -> {width}x{height}, crop {size}"
            );
        }
        let tiny = RgbImage::new(300, 300);
        assert!(
            resized_centre(&tiny, 200, 300, 224).is_none(),
            "too small to crop"
        );
    }
}
