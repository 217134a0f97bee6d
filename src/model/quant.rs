//! The ggml tensor types a GGUF teacher may store, decoded to f32 exactly as llama.cpp's
//! `ggml-quants.c` (`dequantize_row_*`) defines them: the same block layouts and the same f32
//! operations in the same order, so every weight equals llama.cpp's own dequantization bit for
//! bit.
//!
//! | type | block | bytes | value |
//! |------|-------|-------|-------|
//! | F32, F16, BF16 | 1 | 4, 2, 2 | the number |
//! | Q8_0 | 32 | 34 | `d * q`, `q` an i8 |
//! | Q4_0 | 32 | 18 | `(q - 8) * d`, `q` a nibble |
//! | Q4_1 | 32 | 20 | `q * d + m` |
//! | Q4_K | 256 | 144 | eight 32-value groups with 6-bit scales and mins: `d*sc * q - dmin*m` |
//! | Q6_K | 256 | 210 | sixteen 16-value groups with i8 scales: `d * sc * (q - 32)`, `q` 6 bits |
//!
//! A value of 32 or 256 elements is one block; element `0` of a row is element `0` of its first
//! block (rows are whole blocks, as ggml requires).

use half::{bf16, f16};
use rayon::prelude::*;

/// A ggml tensor type, by its number in `ggml.h` (`enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// `GGML_TYPE_F32` (0).
    F32,
    /// `GGML_TYPE_F16` (1).
    F16,
    /// `GGML_TYPE_Q4_0` (2).
    Q4_0,
    /// `GGML_TYPE_Q4_1` (3).
    Q4_1,
    /// `GGML_TYPE_Q8_0` (8).
    Q8_0,
    /// `GGML_TYPE_Q4_K` (12).
    Q4K,
    /// `GGML_TYPE_Q6_K` (14).
    Q6K,
    /// `GGML_TYPE_BF16` (30).
    BF16,
}

/// The decoded types by their number in `ggml.h`: the one mapping both ways.
const SUPPORTED: [(u32, GgmlType); 8] = [
    (0, GgmlType::F32),
    (1, GgmlType::F16),
    (2, GgmlType::Q4_0),
    (3, GgmlType::Q4_1),
    (8, GgmlType::Q8_0),
    (12, GgmlType::Q4K),
    (14, GgmlType::Q6K),
    (30, GgmlType::BF16),
];

/// Names of the ggml types this crate does not decode, for the error that refuses them.
const UNSUPPORTED_NAMES: &[(u32, &str)] = &[
    (6, "Q5_0"),
    (7, "Q5_1"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (13, "Q5_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl GgmlType {
    /// The type numbered `id`; the error names it (when ggml has it) and lists what is supported.
    pub fn from_id(id: u32) -> Result<GgmlType, String> {
        if let Some((_, ty)) = SUPPORTED.iter().find(|(i, _)| *i == id) {
            return Ok(*ty);
        }
        let name = UNSUPPORTED_NAMES
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| format!("unknown ggml type {id}"), |(_, n)| n.to_string());
        Err(format!(
            "tensor type {name} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, \
             Q4_K, Q6_K)"
        ))
    }

    /// The type's number in `ggml.h`.
    pub fn id(self) -> u32 {
        SUPPORTED
            .iter()
            .find(|(_, t)| *t == self)
            .map_or(u32::MAX, |(i, _)| *i)
    }

    /// The name llama.cpp prints.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block.
    pub fn block_elements(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of `elements` values, or an error when they are not whole blocks (or overflow).
    pub fn bytes_for(self, elements: u64) -> Result<u64, String> {
        let per = self.block_elements() as u64;
        if !elements.is_multiple_of(per) {
            return Err(format!(
                "{elements} elements are not a whole number of {} blocks of {per}",
                self.name()
            ));
        }
        (elements / per)
            .checked_mul(self.block_bytes() as u64)
            .ok_or_else(|| format!("{elements} {} elements overflow a byte count", self.name()))
    }
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Decodes `src` (whole blocks of `ty`) into `dst`, whose length must be the element count
/// (checked: `src.len()` must be exactly the bytes of `dst.len()` elements).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), String> {
    let want = ty.bytes_for(dst.len() as u64)?;
    if src.len() as u64 != want {
        return Err(format!(
            "{} bytes hold {} {} elements, expected {want} bytes",
            src.len(),
            dst.len(),
            ty.name()
        ));
    }
    let (be, bb) = (ty.block_elements(), ty.block_bytes());
    // Blocks are independent: split the work in runs of whole blocks.
    let per_task = be * (4096 / be).max(1);
    dst.par_chunks_mut(per_task)
        .zip(src.par_chunks(per_task / be * bb))
        .for_each(|(d, s)| {
            for (y, b) in d.chunks_exact_mut(be).zip(s.chunks_exact(bb)) {
                decode_block(ty, b, y);
            }
        });
    Ok(())
}

/// One block `b` of `ty` into `y` (`block_elements` values).
pub fn decode_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = half_at(b, 0),
        GgmlType::BF16 => y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        GgmlType::Q8_0 => {
            let d = half_at(b, 0);
            for (x, &q) in y.iter_mut().zip(&b[2..34]) {
                *x = (q as i8) as f32 * d;
            }
        }
        GgmlType::Q4_0 => {
            let d = half_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (half_at(b, 0), half_at(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0x0F) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q4K => decode_q4_k(b, y),
        GgmlType::Q6K => decode_q6_k(b, y),
    }
}

/// Scale and min `j` (0..8) of a Q4_K block, 6 bits each, packed in 12 bytes
/// (llama.cpp's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K`: `d` f16, `dmin` f16, `scales[12]`, `qs[128]`.
fn decode_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let q = &qs[32 * chunk..32 * chunk + 32];
        let out = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `block_q6_K`: `ql[128]` (low 4 bits), `qh[64]` (high 2 bits), `scales[16]` i8, `d` f16 last.
fn decode_q6_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| sc[is + k] as i8 as f32;
            out[l] = d * s(0) * q1 as f32;
            out[l + 32] = d * s(2) * q2 as f32;
            out[l + 64] = d * s(4) * q3 as f32;
            out[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests;
