//! Causal grouped-query attention on the emulated device (`kernels/attention.cu`) against the
//! CPU's `model::ops::attention_{forward,backward}` run in f64 as the reference, on odd shapes: one
//! token, one head, GQA 3:1, 2:1 and 1:1, sequence lengths and head sizes that are not powers of
//! two, head sizes up to 128.
//!
//! Tolerances come from the f32 arithmetic: every output is a sum of at most `T + D` rounded
//! terms, so within `gamma(T + D + 16)` (u = 2^-24, 16 ulps for the exponentials and the final
//! scaling) of the exact value relative to the sum of its terms' magnitudes, computed here in f64.
//! A probability's exponent carries the score's rounding error, at most `gamma(D)` times the
//! score's magnitude `sigma = scale sum |q k|`, which becomes a relative error of the probability
//! (twice, for the score and the log-sum-exp): hence the extra `4 gamma(D) sigma_max`.
mod common;

use common::emulated;
use cudarc::driver::CudaSlice;
use distill_kernels::model::ops::{self, AttnShape};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn normals(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (0..4).map(|_| rng.gen::<f32>() - 0.5).sum::<f32>() * scale)
        .collect()
}

fn up(v: &[f32]) -> CudaSlice<f32> {
    emulated().stream().clone_htod(v).unwrap()
}

fn down(s: &CudaSlice<f32>) -> Vec<f32> {
    emulated().stream().clone_dtoh(s).unwrap()
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(n: usize) -> f64 {
    let t = n as f64 * U;
    t / (1.0 - t)
}

fn assert_bounded(what: &str, got: &[f32], exact: &[f64], mag: &[f64], rel: f64) {
    assert_eq!(got.len(), exact.len(), "{what}: lengths");
    for (i, ((&g, &e), &m)) in got.iter().zip(exact).zip(mag).enumerate() {
        let err = (g as f64 - e).abs();
        assert!(
            err <= rel * m + 1e-30,
            "{what}[{i}]: device {g} vs exact {e} (error {err:e}, bound {:e})",
            rel * m
        );
    }
}

fn check_case(s: AttnShape, seed: u64) {
    let dev = emulated();
    let AttnShape {
        batch: b,
        seq: t_len,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
    } = s;
    let (nq, nk, nrows) = (b * t_len * nh * hd, b * t_len * nkv * hd, b * t_len * nh);
    let mut rng = StdRng::seed_from_u64(seed);
    let q = normals(&mut rng, nq, 1.0);
    let k = normals(&mut rng, nk, 1.0);
    let v = normals(&mut rng, nk, 1.0);
    let dout = normals(&mut rng, nq, 1.0);
    let dq0 = normals(&mut rng, nq, 0.25);
    let dk0 = normals(&mut rng, nk, 0.25);
    let dv0 = normals(&mut rng, nk, 0.25);

    // The f64 reference.
    let (q64, k64, v64, do64) = (wide(&q), wide(&k), wide(&v), wide(&dout));
    let mut out64 = vec![0.0; nq];
    let mut att64 = vec![0.0; nrows * t_len];
    ops::attention_forward::<f64>(&mut out64, &mut att64, &q64, &k64, &v64, s);
    let (mut dq64, mut dk64, mut dv64) = (wide(&dq0), wide(&dk0), wide(&dv0));
    let mut dpre64 = vec![0.0; nrows * t_len];
    ops::attention_backward::<f64>(
        &mut dq64,
        &mut dk64,
        &mut dv64,
        &mut dpre64,
        &do64,
        &q64,
        &k64,
        &v64,
        &att64,
        s,
    );

    // The device.
    let (d_q, d_k, d_v, d_do) = (up(&q), up(&k), up(&v), up(&dout));
    let mut d_out = up(&vec![f32::NAN; nq]);
    let mut d_lse = up(&vec![f32::NAN; nrows]);
    dev.attention_forward(&mut d_out, &mut d_lse, &d_q, &d_k, &d_v, s)
        .unwrap();
    let (mut d_dq, mut d_dk, mut d_dv) = (up(&dq0), up(&dk0), up(&dv0));
    let mut d_delta = up(&vec![f32::NAN; nrows]);
    dev.attention_backward(
        &mut d_dq,
        &mut d_dk,
        &mut d_dv,
        &mut d_delta,
        &d_do,
        &d_q,
        &d_k,
        &d_v,
        &d_out,
        &d_lse,
        s,
    )
    .unwrap();

    // Magnitudes of every sum's terms, and the largest score magnitude.
    let scale = 1.0 / (hd as f64).sqrt();
    let rep = nh / nkv;
    let mut sigma_max: f64 = 0.0;
    let mut lse_exact = vec![0.0; nrows];
    let mut lse_mag = vec![0.0; nrows];
    let mut out_mag = vec![0.0; nq];
    let mut dq_mag: Vec<f64> = dq0.iter().map(|x| (*x as f64).abs()).collect();
    let mut dk_mag: Vec<f64> = dk0.iter().map(|x| (*x as f64).abs()).collect();
    let mut dv_mag: Vec<f64> = dv0.iter().map(|x| (*x as f64).abs()).collect();
    for bi in 0..b {
        for t in 0..t_len {
            for h in 0..nh {
                let r = (bi * t_len + t) * nh + h;
                let g = h / rep;
                let qr = &q64[r * hd..(r + 1) * hd];
                let dor = &do64[r * hd..(r + 1) * hd];
                let o = &out64[r * hd..(r + 1) * hd];
                let delta_mag: f64 = dor.iter().zip(o).map(|(a, b)| (a * b).abs()).sum();
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        let kr = &k64[((bi * t_len + j) * nkv + g) * hd..][..hd];
                        scale * qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lse_exact[r] = m + scores.iter().map(|s| (s - m).exp()).sum::<f64>().ln();
                lse_mag[r] = 1.0 + lse_exact[r].abs();
                for j in 0..=t {
                    let kvr = ((bi * t_len + j) * nkv + g) * hd;
                    let (kr, vr) = (&k64[kvr..kvr + hd], &v64[kvr..kvr + hd]);
                    let sig = scale * qr.iter().zip(kr).map(|(a, b)| (a * b).abs()).sum::<f64>();
                    sigma_max = sigma_max.max(sig);
                    let p = att64[r * t_len + j];
                    let dp_mag: f64 = dor.iter().zip(vr).map(|(a, b)| (a * b).abs()).sum();
                    let ds_mag = p * (dp_mag + delta_mag);
                    for d in 0..hd {
                        out_mag[r * hd + d] += p * vr[d].abs();
                        dq_mag[r * hd + d] += scale * ds_mag * kr[d].abs();
                        dk_mag[kvr + d] += scale * ds_mag * qr[d].abs();
                        dv_mag[kvr + d] += p * dor[d].abs();
                    }
                }
            }
        }
    }
    let rel = gamma(t_len + hd + 16) + 4.0 * gamma(hd) * sigma_max;
    let what = format!("B={b} T={t_len} NH={nh} NKV={nkv} D={hd}");
    assert_bounded(&format!("{what} out"), &down(&d_out), &out64, &out_mag, rel);
    assert_bounded(
        &format!("{what} lse"),
        &down(&d_lse),
        &lse_exact,
        &lse_mag,
        rel,
    );
    assert_bounded(&format!("{what} dq"), &down(&d_dq), &dq64, &dq_mag, rel);
    assert_bounded(&format!("{what} dk"), &down(&d_dk), &dk64, &dk_mag, rel);
    assert_bounded(&format!("{what} dv"), &down(&d_dv), &dv64, &dv_mag, rel);

    // The f32 CPU executor meets the same bounds (the two backends are interchangeable).
    let mut out32 = vec![0.0f32; nq];
    let mut att32 = vec![0.0f32; nrows * t_len];
    ops::attention_forward::<f32>(&mut out32, &mut att32, &q, &k, &v, s);
    assert_bounded(&format!("{what} cpu out"), &out32, &out64, &out_mag, rel);
}

#[test]
fn one_token_one_head() {
    check_case(
        AttnShape {
            batch: 1,
            seq: 1,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 32,
        },
        1,
    );
}

#[test]
fn grouped_query_three_to_one_with_odd_lengths() {
    check_case(
        AttnShape {
            batch: 2,
            seq: 7,
            n_heads: 3,
            n_kv_heads: 1,
            head_dim: 40,
        },
        2,
    );
    check_case(
        AttnShape {
            batch: 1,
            seq: 33,
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 96,
        },
        3,
    );
}

#[test]
fn one_to_one_heads_up_to_128_and_odd_head_sizes() {
    check_case(
        AttnShape {
            batch: 1,
            seq: 13,
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 128,
        },
        4,
    );
    check_case(
        AttnShape {
            batch: 2,
            seq: 5,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 17,
        },
        5,
    );
}

#[test]
fn bad_shapes_are_refused_with_the_dimension_named() {
    let dev = emulated();
    let s = AttnShape {
        batch: 1,
        seq: 2,
        n_heads: 3,
        n_kv_heads: 2,
        head_dim: 8,
    };
    let z = |n| up(&vec![0.0; n]);
    let e = dev
        .attention_forward(&mut z(48), &mut z(6), &z(48), &z(32), &z(32), s)
        .unwrap_err();
    assert!(e.to_string().contains("n_kv_heads"), "{e}");
    let s = AttnShape {
        head_dim: 129,
        n_kv_heads: 1,
        ..s
    };
    let e = dev
        .attention_forward(&mut z(774), &mut z(6), &z(774), &z(258), &z(258), s)
        .unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");
    let s = AttnShape { head_dim: 8, ..s };
    let e = dev
        .attention_forward(&mut z(48), &mut z(5), &z(48), &z(16), &z(16), s)
        .unwrap_err();
    assert!(e.to_string().contains("lse"), "{e}");
}
