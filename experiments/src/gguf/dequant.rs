//! GGML tensor types → f32, as llama.cpp's `dequantize_row_*` (ggml-quants.c) and the `gguf`
//! Python package's `gguf.quants.dequantize` compute them.
//!
//! Block formats (little-endian; `d` and `m` are f16):
//! * `Q4_0`: 32 weights in 18 bytes: `d`, then 16 bytes of nibbles; `x[j] = (lo(q[j]) - 8)·d`
//!   and `x[j+16] = (hi(q[j]) - 8)·d`.
//! * `Q4_1`: 32 weights in 20 bytes: `d`, `m`, 16 bytes of nibbles; `x = q·d + m`.
//! * `Q5_0`: 32 weights in 22 bytes: `d`, a u32 of fifth bits, 16 bytes of nibbles; `(q - 16)·d`.
//! * `Q5_1`: 32 weights in 24 bytes: `d`, `m`, the fifth bits, the nibbles; `q·d + m`.
//! * `Q8_0`: 32 weights in 34 bytes: `d`, 32 signed bytes; `x = q·d`.
//! * `F32`, `F16`, `BF16`: plain little-endian values.
//!
//! The k-quants (`Q2_K`…`Q6_K`) and the i-quants are not implemented: a tensor of such a type
//! is an error naming it and the types that are.

use half::{bf16, f16};

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q5_0: u32 = 6;
pub const Q5_1: u32 = 7;
pub const Q8_0: u32 = 8;
pub const BF16: u32 = 30;

pub const SUPPORTED: &[&str] = &["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"];

/// GGML's name of a type id (for messages).
pub fn type_name(ty: u32) -> &'static str {
    match ty {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        _ => "unknown",
    }
}

/// (weights per block, bytes per block) of a supported type.
fn block(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        F32 => (1, 4),
        F16 | BF16 => (1, 2),
        Q4_0 => (32, 18),
        Q4_1 => (32, 20),
        Q5_0 => (32, 22),
        Q5_1 => (32, 24),
        Q8_0 => (32, 34),
        _ => return None,
    })
}

/// Bytes that `n` weights of type `ty` take, or None for a type ablate does not read.
pub fn byte_size(ty: u32, n: u64) -> Option<u64> {
    let (w, b) = block(ty)?;
    n.div_ceil(w).checked_mul(b)
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` weights of type `ty` from `bytes` (exactly [`byte_size`] long).
pub fn dequantize(ty: u32, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let (w, b) = block(ty).ok_or_else(|| format!("type {} is not supported", type_name(ty)))?;
    let (w, b) = (w as usize, b as usize);
    if !n.is_multiple_of(w) {
        return Err(format!(
            "{n} weights of type {} are not a whole number of {w}-weight blocks",
            type_name(ty)
        ));
    }
    if bytes.len() != n / w * b {
        return Err(format!(
            "{} bytes for {n} weights of type {}, expected {}",
            bytes.len(),
            type_name(ty),
            n / w * b
        ));
    }
    let mut out = vec![0f32; n];
    match ty {
        F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().expect("4"));
            }
        }
        F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (o, blk) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(b)) {
                dequant_block(ty, blk, o);
            }
        }
    }
    Ok(out)
}

fn dequant_block(ty: u32, blk: &[u8], o: &mut [f32]) {
    match ty {
        Q4_0 => {
            let d = half_at(blk, 0);
            let qs = &blk[2..18];
            for j in 0..16 {
                o[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                o[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        Q4_1 => {
            let (d, m) = (half_at(blk, 0), half_at(blk, 2));
            let qs = &blk[4..20];
            for j in 0..16 {
                o[j] = (qs[j] & 0x0F) as f32 * d + m;
                o[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        Q5_0 => {
            let d = half_at(blk, 0);
            let qh = u32::from_le_bytes(blk[2..6].try_into().expect("4"));
            let qs = &blk[6..22];
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                o[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
                o[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
            }
        }
        Q5_1 => {
            let (d, m) = (half_at(blk, 0), half_at(blk, 2));
            let qh = u32::from_le_bytes(blk[4..8].try_into().expect("4"));
            let qs = &blk[8..24];
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                o[j] = ((qs[j] & 0x0F) | h0) as f32 * d + m;
                o[j + 16] = ((qs[j] >> 4) | h1) as f32 * d + m;
            }
        }
        Q8_0 => {
            let d = half_at(blk, 0);
            for (j, &q) in blk[2..34].iter().enumerate() {
                o[j] = q as i8 as f32 * d;
            }
        }
        _ => unreachable!("dequantize checked the type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.5, m = -1.0, nibbles 0..15 in the low halves and 15..0 in the high halves.
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            blk.push(j | ((15 - j) << 4));
        }
        let x = dequantize(Q4_1, &blk, 32).unwrap();
        for j in 0..16 {
            assert_eq!(x[j], j as f32 * 0.5 - 1.0);
            assert_eq!(x[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q5_0_uses_the_fifth_bit() {
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16::from_f32(1.0).to_le_bytes());
        // Fifth bit set for weight 0 (bit 0) and weight 16 (bit 16).
        blk.extend_from_slice(&(1u32 | (1 << 16)).to_le_bytes());
        blk.extend_from_slice(&[0u8; 16]);
        let x = dequantize(Q5_0, &blk, 32).unwrap();
        assert_eq!(x[0], 0.0); // 16 - 16
        assert_eq!(x[1], -16.0);
        assert_eq!(x[16], 0.0);
        assert_eq!(x[17], -16.0);
    }

    #[test]
    fn wrong_sizes_and_types_are_errors() {
        assert!(dequantize(Q8_0, &[0u8; 33], 32).is_err());
        assert!(dequantize(Q8_0, &[0u8; 34], 31).is_err());
        let e = dequantize(14, &[0u8; 210], 256).unwrap_err();
        assert!(e.contains("Q6_K"), "{e}");
    }
}
