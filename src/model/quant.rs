//! Block-quantized weights of a 4-bit model folder (`crayon-export --precision q4`), decoded and encoded
//! exactly as the exporter (`onnx-export/crayon_export/quant.py`) and the graph's `MatMulNBits` read them.
//!
//! A 4-bit matrix `W` [out, in] is stored per row in blocks of `block` values along `in`:
//! `W[r, b*block + j] = scale[r, b] * (q - 8) + offset[r, b]`, q in 0..15 — llama.cpp's Q4_1 (scale and
//! min) rewritten around MatMulNBits' default zero point 8 (offset = min + 8 scale). Tensors:
//! `NAME.q4` u8 [out, blocks, block/2] (value 2i in the low nibble of byte i), `NAME.scales` f32
//! [out, blocks], `NAME.offsets` f32 [out, blocks]. The embedding is 8-bit (Q8_0):
//! `NAME.q8` u8 [rows, blocks, block] with `W = scale * (u - 128)`, `NAME.scales` f32 [rows, blocks].
//!
//! A merged customization re-encodes `dequantize(W) + delta` with fresh per-block minimum and maximum
//! (llama.cpp's Q4_1 rounding): see [`encode_q4`].

/// Suffixes of the three tensors that hold one 4-bit matrix.
pub const Q4_SUFFIXES: [&str; 3] = [".q4", ".scales", ".offsets"];

/// A 4-bit matrix in the stored layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Q4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub block: usize,
    /// [rows, cols/block, block/2]
    pub packed: Vec<u8>,
    /// [rows, cols/block]
    pub scales: Vec<f32>,
    /// [rows, cols/block]
    pub offsets: Vec<f32>,
}

impl Q4Matrix {
    pub fn blocks(&self) -> usize {
        self.cols / self.block
    }

    /// Shapes of the `.q4`, `.scales` and `.offsets` tensors.
    pub fn shapes(rows: usize, cols: usize, block: usize) -> [Vec<usize>; 3] {
        let nb = cols / block;
        [vec![rows, nb, block / 2], vec![rows, nb], vec![rows, nb]]
    }

    /// The rows of `parts` one after the other (all with the same columns and block), as a fused
    /// projection stores them. Every tensor is row-major with rows first, so this is concatenation.
    pub fn stack(parts: &[&Q4Matrix]) -> Q4Matrix {
        let first = parts[0];
        Q4Matrix {
            rows: parts.iter().map(|m| m.rows).sum(),
            cols: first.cols,
            block: first.block,
            packed: parts.iter().flat_map(|m| m.packed.iter().copied()).collect(),
            scales: parts.iter().flat_map(|m| m.scales.iter().copied()).collect(),
            offsets: parts.iter().flat_map(|m| m.offsets.iter().copied()).collect(),
        }
    }

    /// The float32 values, row-major [rows, cols].
    pub fn decode(&self) -> Vec<f32> {
        decode_q4(&self.packed, &self.scales, &self.offsets, self.rows, self.cols, self.block)
    }
}

/// Decodes a stored 4-bit matrix into row-major f32 [rows, cols].
pub fn decode_q4(packed: &[u8], scales: &[f32], offsets: &[f32], rows: usize, cols: usize, block: usize) -> Vec<f32> {
    let nb = cols / block;
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for b in 0..nb {
            let (s, o) = (scales[r * nb + b], offsets[r * nb + b]);
            let bytes = &packed[(r * nb + b) * block / 2..(r * nb + b + 1) * block / 2];
            let dst = &mut out[r * cols + b * block..r * cols + (b + 1) * block];
            for (i, &byte) in bytes.iter().enumerate() {
                dst[2 * i] = s * (f32::from(byte & 0x0F) - 8.0) + o;
                dst[2 * i + 1] = s * (f32::from(byte >> 4) - 8.0) + o;
            }
        }
    }
    out
}

/// Encodes row-major f32 [rows, cols] as 4-bit blocks: per block, scale = (max - min) / 15 and
/// q = round((w - min) / scale), as llama.cpp quantizes Q4_1. `cols` must be a multiple of `block`
/// (checked by the caller against the model's own tensors).
pub fn encode_q4(w: &[f32], rows: usize, cols: usize, block: usize) -> Q4Matrix {
    let nb = cols / block;
    let mut packed = vec![0u8; rows * nb * block / 2];
    let mut scales = vec![0f32; rows * nb];
    let mut offsets = vec![0f32; rows * nb];
    for r in 0..rows {
        for b in 0..nb {
            let x = &w[r * cols + b * block..r * cols + (b + 1) * block];
            let (lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            let d = (hi - lo) / 15.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = |v: f32| ((v - lo) * inv + 0.5).floor().clamp(0.0, 15.0) as u8;
            let dst = &mut packed[(r * nb + b) * block / 2..(r * nb + b + 1) * block / 2];
            for (i, byte) in dst.iter_mut().enumerate() {
                *byte = q(x[2 * i]) | (q(x[2 * i + 1]) << 4);
            }
            scales[r * nb + b] = d;
            offsets[r * nb + b] = lo + 8.0 * d;
        }
    }
    Q4Matrix { rows, cols, block, packed, scales, offsets }
}

/// Row `row` of an 8-bit (Q8_0) table `u8 [rows, blocks, block]` with `scales` [rows, blocks].
pub fn decode_q8_row(data: &[u8], scales: &[f32], cols: usize, block: usize, row: usize) -> Vec<f32> {
    let nb = cols / block;
    (0..cols).map(|c| scales[row * nb + c / block] * (f32::from(data[row * cols + c]) - 128.0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_within_half_a_step_and_keeps_exact_grids() {
        let (rows, cols, block) = (3, 64, 32);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let m = encode_q4(&w, rows, cols, block);
        let back = m.decode();
        for r in 0..rows {
            for c in 0..cols {
                let s = m.scales[r * 2 + c / block];
                assert!((back[r * cols + c] - w[r * cols + c]).abs() <= 0.5 * s + 1e-6, "row {r} col {c}");
            }
        }
        // Values already on a block's grid come back unchanged, so re-encoding is stable.
        let again = encode_q4(&back, rows, cols, block).decode();
        for (a, b) in again.iter().zip(&back) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn constant_blocks_encode_without_dividing_by_zero() {
        let w = vec![0.25f32; 32];
        let m = encode_q4(&w, 1, 32, 32);
        assert_eq!(m.scales, vec![0.0]);
        assert!(m.decode().iter().all(|&v| v == 0.25));
    }

    #[test]
    fn q8_rows_decode_around_128_with_their_blocks_scale() {
        // 2 rows x 32 columns in blocks of 16: four scales.
        let data: Vec<u8> = (0..64).map(|i| (i * 4) as u8).collect();
        let scales = vec![0.5, 1.0, 2.0, 4.0];
        let row = decode_q8_row(&data, &scales, 32, 16, 1);
        assert_eq!(row[0], 2.0 * (f32::from(data[32]) - 128.0));
        assert_eq!(row[16], 4.0 * (f32::from(data[48]) - 128.0));
    }
}
