//! Every block format against blocks packed by hand here, following the layouts in
//! llama.cpp's `ggml-common.h`; extreme scales (f16's largest, negative, zero) and the minimum
//! and maximum quants included. The K-quant cases also carry values that gguf-py's
//! `gguf.quants.dequantize` (llama.cpp's own Python) gave for the same bytes.

use super::*;

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

fn decode(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let mut y = vec![0.0; b.len() / ty.block_bytes() * ty.block_elements()];
    dequantize(ty, b, &mut y).unwrap();
    y
}

#[test]
fn plain_floats() {
    let v = [1.5f32, -0.0, 65504.0, f32::MIN_POSITIVE];
    let f32_bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(decode(GgmlType::F32, &f32_bytes), v);
    let f16_bytes: Vec<u8> = [1.5f32, -2.0, 65504.0].iter().flat_map(|&x| h(x)).collect();
    assert_eq!(decode(GgmlType::F16, &f16_bytes), [1.5, -2.0, 65504.0]);
    let bf: Vec<u8> = [1.5f32, -3.0e38]
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    assert_eq!(
        decode(GgmlType::BF16, &bf),
        [1.5, bf16::from_f32(-3.0e38).to_f32()]
    );
}

#[test]
fn q8_0_is_d_times_signed_byte() {
    for d in [0.5f32, -65504.0, 0.0, 6.1e-5] {
        let mut b = h(d).to_vec();
        let qs: Vec<i8> = (0..32)
            .map(|j| if j == 0 { -128 } else { (j * 8 - 129) as i8 })
            .collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let y = decode(GgmlType::Q8_0, &b);
        let d16 = f16::from_f32(d).to_f32();
        for j in 0..32 {
            assert_eq!(y[j], qs[j] as f32 * d16, "d {d} j {j}");
        }
    }
}

#[test]
fn q4_0_low_nibbles_first_then_high() {
    let d = 2.5f32;
    let mut b = h(d).to_vec();
    // byte j: low nibble j (0..15), high nibble 15 - j: the minimum (0 -> -8) and maximum (15 -> 7).
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = decode(GgmlType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * d);
        assert_eq!(y[j + 16], (7.0 - j as f32) * d);
    }
    assert_eq!(y[0], -20.0);
}

#[test]
fn q4_1_is_q_times_d_plus_m() {
    let (d, m) = (0.25f32, -3.0f32);
    let mut b = h(d).to_vec();
    b.extend(h(m));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = decode(GgmlType::Q4_1, &b);
    for j in 0..16 {
        assert_eq!(y[j], j as f32 * d + m);
        assert_eq!(y[j + 16], (15 - j) as f32 * d + m);
    }
}

/// Packs eight 6-bit scales and mins the way llama.cpp's `quantize_row_q4_K_ref` does.
fn pack_k4(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    s
}

fn q4_k_block(d: f32, dmin: f32, sc: [u8; 8], m: [u8; 8], q: &[u8; 256]) -> Vec<u8> {
    let mut b = h(d).to_vec();
    b.extend(h(dmin));
    b.extend(pack_k4(sc, m));
    // 32 bytes per pair of groups: group 2c in the low nibbles, group 2c + 1 in the high.
    for c in 0..4 {
        for l in 0..32 {
            b.push(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
        }
    }
    b
}

fn q4_k_case() -> (f32, f32, [u8; 8], [u8; 8], [u8; 256]) {
    let sc = [63, 0, 1, 17, 32, 48, 62, 63];
    let m = [0, 63, 5, 33, 63, 16, 1, 40];
    let q: [u8; 256] = std::array::from_fn(|i| ((i * 7 + i / 32) % 16) as u8);
    (1.5e-3, 2.0e-2, sc, m, q)
}

#[test]
fn q4_k_groups_of_32_with_6_bit_scales_and_mins() {
    for (d, dmin) in [(1.5e-3f32, 2.0e-2f32), (65504.0, -65504.0), (0.0, 1.0)] {
        let (_, _, sc, m, q) = q4_k_case();
        let y = decode(GgmlType::Q4K, &q4_k_block(d, dmin, sc, m, &q));
        let (d, dmin) = (f16::from_f32(d).to_f32(), f16::from_f32(dmin).to_f32());
        for i in 0..256 {
            let g = i / 32;
            let want = d * sc[g] as f32 * q[i] as f32 - dmin * m[g] as f32;
            assert_eq!(y[i].to_bits(), want.to_bits(), "element {i}");
        }
    }
}

fn q6_k_block(d: f32, sc: [i8; 16], q: &[u8; 256]) -> Vec<u8> {
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    // Halves of 128; within one, element l + 32k (k = 0..3) shares ql/qh byte l (k = 0, 2) or
    // l + 32 (k = 1, 3) and takes qh bits 2k..2k+1.
    for half in 0..2 {
        for l in 0..32 {
            let v = |k: usize| q[128 * half + l + 32 * k];
            ql[64 * half + l] = (v(0) & 0x0F) | ((v(2) & 0x0F) << 4);
            ql[64 * half + l + 32] = (v(1) & 0x0F) | ((v(3) & 0x0F) << 4);
            qh[32 * half + l] =
                (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
        }
    }
    let mut b = ql.to_vec();
    b.extend(qh);
    b.extend(sc.iter().map(|&s| s as u8));
    b.extend(h(d));
    b
}

fn q6_k_case() -> ([i8; 16], [u8; 256]) {
    let sc = [
        -128, 127, 0, 1, -1, 64, -64, 33, 5, -7, 100, -100, 12, 13, -14, 2,
    ];
    let q: [u8; 256] = std::array::from_fn(|i| ((i * 13 + i / 64) % 64) as u8);
    (sc, q)
}

#[test]
fn q6_k_groups_of_16_with_signed_scales() {
    for d in [3.0e-4f32, -65504.0, 0.0] {
        let (sc, q) = q6_k_case();
        let y = decode(GgmlType::Q6K, &q6_k_block(d, sc, &q));
        let d = f16::from_f32(d).to_f32();
        for i in 0..256 {
            let want = d * sc[i / 16] as f32 * (q[i] as i32 - 32) as f32;
            assert_eq!(y[i].to_bits(), want.to_bits(), "element {i}");
        }
    }
}

#[test]
fn many_blocks_decode_in_order_and_sizes_are_checked() {
    let (d, dmin, sc, m, q) = q4_k_case();
    let one = q4_k_block(d, dmin, sc, m, &q);
    let mut many = Vec::new();
    for _ in 0..40 {
        many.extend(&one);
    }
    let y = decode(GgmlType::Q4K, &many);
    let first = decode(GgmlType::Q4K, &one);
    for c in y.chunks(256) {
        assert_eq!(c, &first[..]);
    }
    let mut out = vec![0.0; 256];
    let err = dequantize(GgmlType::Q4K, &one[..143], &mut out).unwrap_err();
    assert!(err.contains("expected 144 bytes"), "{err}");
    let mut odd = vec![0.0; 100];
    let err = dequantize(GgmlType::Q8_0, &[0; 34], &mut odd).unwrap_err();
    assert!(
        err.contains("not a whole number of Q8_0 blocks of 32"),
        "{err}"
    );
}

#[test]
fn unsupported_types_are_named() {
    assert!(GgmlType::from_id(13).unwrap_err().contains("Q5_K"));
    assert!(GgmlType::from_id(99)
        .unwrap_err()
        .contains("unknown ggml type 99"));
    for (id, ty) in [
        (0, GgmlType::F32),
        (12, GgmlType::Q4K),
        (30, GgmlType::BF16),
    ] {
        assert_eq!(GgmlType::from_id(id).unwrap(), ty);
    }
}
/// Values gguf-py 0.19.0 (`gguf.quants.dequantize`) gives for the blocks of `q4_k_case` and
/// `q6_k_case` (d = 3e-4): four elements and the f64 sum of all 256 (it matched every element
/// bit for bit when recorded).
#[test]
fn k_quants_match_gguf_py() {
    let (d, dmin, sc, m, q) = q4_k_case();
    let y = decode(GgmlType::Q4K, &q4_k_block(d, dmin, sc, m, &q));
    let picked = [y[0], y[37], y[100], y[255]].map(f64::from);
    assert_eq!(
        picked,
        [
            0.0,
            -1.2602691650390625,
            -0.27760791778564453,
            -0.8001708984375
        ]
    );
    assert_eq!(
        y.iter().map(|&x| x as f64).sum::<f64>(),
        -38.501312255859375
    );
    let (sc, q) = q6_k_case();
    let y = decode(GgmlType::Q6K, &q6_k_block(3.0e-4, sc, &q));
    let picked = [y[0], y[37], y[100], y[255]].map(f64::from);
    assert_eq!(
        picked,
        [1.228515625f64, 0.0, 0.211151123046875, 0.013196945190429688]
    );
    assert_eq!(y.iter().map(|&x| x as f64).sum::<f64>(), 3.011302947998047);
}
