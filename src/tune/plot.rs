//! Loss curves as PNG images, with no image dependencies: a small raster
//! (lines, points, a 3×5 pixel font for the axis numbers) and a PNG encoder
//! (rows filtered with PNG's "Up" filter, compressed with fixed-Huffman
//! deflate using runs of distance 1, zlib-wrapped, CRC-checked chunks).
use std::path::Path;

use crate::error::Result;

/// An RGB image.
#[derive(Clone, Debug)]
pub struct Canvas {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major RGB bytes.
    pub pixels: Vec<u8>,
}

impl Canvas {
    /// A canvas filled with `bg`.
    pub fn new(width: usize, height: usize, bg: [u8; 3]) -> Canvas {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            pixels.extend_from_slice(&bg);
        }
        Canvas {
            width,
            height,
            pixels,
        }
    }

    /// Sets one pixel (ignored outside the canvas).
    pub fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return;
        }
        let i = (y as usize * self.width + x as usize) * 3;
        self.pixels[i..i + 3].copy_from_slice(&c);
    }

    /// A filled rectangle, corners inclusive.
    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// A line of the given thickness (Bresenham, square pen).
    pub fn line(&mut self, p0: (i64, i64), p1: (i64, i64), thick: i64, c: [u8; 3]) {
        let (mut x, mut y) = p0;
        let (dx, dy) = ((p1.0 - x).abs(), -(p1.1 - y).abs());
        let (sx, sy) = (if x < p1.0 { 1 } else { -1 }, if y < p1.1 { 1 } else { -1 });
        let mut err = dx + dy;
        let h = thick / 2;
        loop {
            self.rect(x - h, y - h, x - h + thick - 1, y - h + thick - 1, c);
            if (x, y) == p1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the built-in 3×5 font (digits, `.`, `-`, `e`, space), scaled.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        let mut cx = x;
        for ch in s.chars() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let (px, py) = (cx + col * scale, y + row as i64 * scale);
                        self.rect(px, py, px + scale - 1, py + scale - 1, c);
                    }
                }
            }
            cx += 4 * scale;
        }
    }

    /// Encodes the canvas as PNG bytes.
    pub fn to_png(&self) -> Vec<u8> {
        encode_png(self.width, self.height, &self.pixels)
    }
}

fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => [0; 5],
    }
}

/// Short label for an axis value.
fn label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(0.01..10000.0).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws a loss curve: `train` (one value per step, raw in light blue and an
/// exponential moving average in dark blue) and optional `valid` points
/// `(step, loss)` in red. Steps are 1-based on the x axis.
pub fn loss_curve(train: &[f32], valid: &[(u64, f64)], width: usize, height: usize) -> Canvas {
    let (w, h) = (width.max(120) as i64, height.max(80) as i64);
    let mut cv = Canvas::new(w as usize, h as usize, [255, 255, 255]);
    let (l, r, t, b) = (70i64, w - 20, 20i64, h - 40);
    let finite = train
        .iter()
        .map(|&v| v as f64)
        .chain(valid.iter().map(|p| p.1));
    let (mut lo, mut hi) = finite
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);
    let n = (train.len() as u64)
        .max(valid.iter().map(|p| p.0).max().unwrap_or(0))
        .max(2);
    let px = |step: f64| l + ((step - 1.0) / (n as f64 - 1.0) * (r - l) as f64).round() as i64;
    let py = |v: f64| b - ((v - lo) / (hi - lo) * (b - t) as f64).round() as i64;
    // Grid and axes.
    for k in 0..=4 {
        let y = t + (b - t) * k / 4;
        cv.line((l, y), (r, y), 1, [225, 225, 225]);
        let v = hi - (hi - lo) * k as f64 / 4.0;
        cv.text(4, y - 5, &label(v), 2, [60, 60, 60]);
    }
    cv.line((l, t), (l, b), 2, [40, 40, 40]);
    cv.line((l, b), (r, b), 2, [40, 40, 40]);
    cv.text(l - 4, b + 10, "1", 2, [60, 60, 60]);
    let ns = n.to_string();
    cv.text(r - 8 * ns.len() as i64, b + 10, &ns, 2, [60, 60, 60]);
    // Raw train loss.
    let pts: Vec<(i64, i64)> = train
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (px(i as f64 + 1.0), py(v as f64)))
        .collect();
    for p in pts.windows(2) {
        cv.line(p[0], p[1], 1, [160, 190, 235]);
    }
    // Smoothed train loss.
    let alpha = (2.0 / (train.len() as f64 / 10.0 + 1.0)).clamp(0.02, 1.0);
    let mut ema: Option<f64> = None;
    let mut prev: Option<(i64, i64)> = None;
    for (i, &v) in train.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        let e = ema.map_or(v as f64, |e| e + alpha * (v as f64 - e));
        ema = Some(e);
        let p = (px(i as f64 + 1.0), py(e));
        if let Some(q) = prev {
            cv.line(q, p, 2, [20, 70, 170]);
        }
        prev = Some(p);
    }
    // Validation points.
    for &(s, v) in valid {
        if v.is_finite() {
            let (x, y) = (px(s.max(1) as f64), py(v));
            cv.rect(x - 3, y - 3, x + 3, y + 3, [210, 40, 40]);
        }
    }
    cv
}

/// Writes a loss-curve PNG (see [`loss_curve`]) atomically.
pub fn write_loss_png(path: &Path, train: &[f32], valid: &[(u64, f64)]) -> Result<()> {
    let png = loss_curve(train, valid, 800, 480).to_png();
    crate::tensors::write_atomic(path, &png)
}

// ---------------------------------------------------------------- PNG

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// Writes `len` bits of `v`, least significant first.
    fn bits(&mut self, v: u32, len: u32) {
        self.acc |= (v as u64) << self.n;
        self.n += len;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// Writes a Huffman code (most significant bit first).
    fn code(&mut self, code: u32, len: u32) {
        let rev = code.reverse_bits() >> (32 - len);
        self.bits(rev, len);
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

fn lit(w: &mut BitWriter, sym: u32) {
    match sym {
        0..=143 => w.code(0x30 + sym, 8),
        144..=255 => w.code(0x190 + sym - 144, 9),
        256..=279 => w.code(sym - 256, 7),
        _ => w.code(0xC0 + sym - 280, 8),
    }
}

const LEN_BASE: [u32; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u32; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];

/// A match of `len` (3..=258) bytes at distance 1.
fn run(w: &mut BitWriter, len: u32) {
    let i = LEN_BASE.iter().rposition(|&b| b <= len).unwrap_or(0);
    lit(w, 257 + i as u32);
    w.bits(len - LEN_BASE[i], LEN_EXTRA[i]);
    w.code(0, 5); // distance code 0 = distance 1
}

/// zlib stream (fixed-Huffman deflate, runs of repeated bytes as matches).
fn zlib(data: &[u8]) -> Vec<u8> {
    let mut w = BitWriter {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    w.bits(1, 1); // final block
    w.bits(1, 2); // fixed Huffman
    let mut i = 0;
    while i < data.len() {
        lit(&mut w, data[i] as u32);
        let mut j = i + 1;
        while j < data.len() && data[j] == data[i] && j - i <= 258 {
            j += 1;
        }
        let mut rep = (j - i - 1) as u32;
        while rep >= 3 {
            let l = rep.min(258);
            // Avoid leaving a remainder of 1 or 2 that cannot be a match.
            let l = if rep - l > 0 && rep - l < 3 { l - 3 } else { l };
            run(&mut w, l);
            rep -= l;
        }
        for _ in 0..rep {
            lit(&mut w, data[i] as u32);
        }
        i = j;
    }
    lit(&mut w, 256);
    let mut out = w.finish();
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Encodes 8-bit RGB pixels as a PNG file.
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
    let stride = width * 3;
    let mut raw = Vec::with_capacity(height * (stride + 1));
    for y in 0..height {
        let row = &rgb[y * stride..(y + 1) * stride];
        if y == 0 {
            raw.push(0);
            raw.extend_from_slice(row);
        } else {
            let up = &rgb[(y - 1) * stride..y * stride];
            raw.push(2); // "Up" filter
            raw.extend(row.iter().zip(up).map(|(a, b)| a.wrapping_sub(*b)));
        }
    }
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, filter 0, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &zlib(&raw));
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal inflate for fixed-Huffman blocks, to check the encoder.
    fn inflate_fixed(z: &[u8]) -> Vec<u8> {
        let d = &z[2..z.len() - 4];
        let mut pos = 0usize;
        let mut bit = |n: u32| -> u32 {
            let mut v = 0;
            for k in 0..n {
                let b = (d[pos / 8] >> (pos % 8)) & 1;
                v |= (b as u32) << k;
                pos += 1;
            }
            v
        };
        assert_eq!(bit(1), 1);
        assert_eq!(bit(2), 1);
        let mut out: Vec<u8> = Vec::new();
        loop {
            // Read a fixed-Huffman symbol, MSB first.
            let mut code = 0u32;
            let mut len = 0;
            let sym = loop {
                code = (code << 1) | bit(1);
                len += 1;
                match len {
                    7 if code <= 0x17 => break code + 256,
                    8 if (0x30..=0xBF).contains(&code) => break code - 0x30,
                    8 if (0xC0..=0xC7).contains(&code) => break code - 0xC0 + 280,
                    9 if code >= 0x190 => break code - 0x190 + 144,
                    _ => {}
                }
            };
            match sym {
                0..=255 => out.push(sym as u8),
                256 => break,
                _ => {
                    let i = (sym - 257) as usize;
                    let l = LEN_BASE[i] + bit(LEN_EXTRA[i]);
                    let mut dc = 0;
                    for _ in 0..5 {
                        dc = (dc << 1) | bit(1);
                    }
                    assert_eq!(dc, 0);
                    for _ in 0..l {
                        out.push(*out.last().unwrap());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn deflate_round_trips() {
        let mut data = vec![0u8; 1000];
        data.extend((0..=255u8).cycle().take(700));
        data.extend(vec![7u8; 261]);
        data.extend(vec![9u8; 4]);
        data.push(1);
        let z = zlib(&data);
        assert!(z.len() < data.len());
        assert_eq!(inflate_fixed(&z), data);
        assert_eq!(
            u32::from_be_bytes(z[z.len() - 4..].try_into().unwrap()),
            adler32(&data)
        );
    }

    #[test]
    fn crc_matches_the_reference_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn loss_curve_png_is_well_formed() {
        let train: Vec<f32> = (0..50).map(|i| 3.0 / (1.0 + i as f32 * 0.1)).collect();
        let png = loss_curve(&train, &[(1, 3.1), (50, 0.8)], 320, 200).to_png();
        assert_eq!(&png[..8], &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 320);
        assert!(
            png.len() < 320 * 200 * 3 / 4,
            "compressed size {}",
            png.len()
        );
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
    }
}
