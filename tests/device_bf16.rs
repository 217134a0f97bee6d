//! The bf16 storage variants of the model's kernels (`dk_<op>_bf16`: embedding, RMSNorm, SwiGLU,
//! residual, RoPE, the strided row copy and attention, forward and backward) on the emulated
//! device, against their f32 variants on the same values.
//!
//! The tolerance is derived from how the kernels are written, and it is zero: a bf16 kernel widens
//! every element to f32 on load (exact), runs the f32 kernel's arithmetic, and rounds each stored
//! element to nearest-even bf16 once. So on inputs that are bf16 values, a bf16 output must be
//! exactly `bf16(f32 output)`, and an f32 side output (RMSNorm's rstd, attention's log-sum-exp,
//! the f32 parameter gradients) exactly the f32 one. A kernel that rounds an intermediate, reads
//! a tensor with the wrong width or skips a store differs in the bits. How far bf16 training is
//! from f32 training is a separate question (tests/device_trainer.rs).
mod common;

use common::emulated;
use cudarc::driver::CudaSlice;
use distill_kernels::cuda::Storage;
use distill_kernels::model::ops;
use distill_kernels::shapes::AttnShape;
use distill_kernels::Element;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Values that bf16 holds exactly (so both variants see the same inputs).
fn bf16_values(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x = (0..4).map(|_| rng.gen::<f32>() - 0.5).sum::<f32>() * scale;
            bf16::from_f32(x).to_f32()
        })
        .collect()
}

fn up<T: Storage>(v: &[f32]) -> CudaSlice<T> {
    let host: Vec<T> = v.iter().map(|&x| Element::from_f32(x)).collect();
    emulated().stream().clone_htod(&host).unwrap()
}

fn down<T: Storage>(s: &CudaSlice<T>) -> Vec<f32> {
    let host = emulated().stream().clone_dtoh(s).unwrap();
    host.into_iter().map(Element::to_f32).collect()
}

/// `got` (a bf16 variant's output) is `want` (the f32 variant's) rounded to bf16, bit for bit.
fn assert_rounded(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let r = bf16::from_f32(w).to_f32();
        assert!(
            g.to_bits() == r.to_bits(),
            "{what}[{i}]: bf16 kernel {g:e}, f32 kernel {w:e} rounds to {r:e}"
        );
    }
}

fn assert_same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}[{i}]: {g:e} vs {w:e}");
    }
}

fn embedding<T: Storage>(tokens: &[u32], wte: &[f32], dout: &[f32], c: usize) -> [Vec<f32>; 2] {
    let dev = emulated();
    let n = tokens.len();
    let t = dev.stream().clone_htod(tokens).unwrap();
    let mut out = up::<T>(&vec![0.0; n * c]);
    dev.embedding_forward(&mut out, &t, tokens, &up::<T>(wte), c)
        .unwrap();
    // Gradients accumulate: start from a non-zero f32 gradient.
    let mut dwte = up::<f32>(&vec![0.25; wte.len()]);
    dev.embedding_backward(&mut dwte, &t, tokens, &up::<T>(dout), c)
        .unwrap();
    [down(&out), down(&dwte)]
}

#[test]
fn embedding_forward_and_backward() {
    let mut rng = StdRng::seed_from_u64(1);
    let (v, c) = (13, 37);
    let tokens: Vec<u32> = (0..23).map(|i| (i * 5 % v) as u32).collect();
    let wte = bf16_values(&mut rng, v * c, 1.0);
    let dout = bf16_values(&mut rng, tokens.len() * c, 1.0);
    let [out32, dwte32] = embedding::<f32>(&tokens, &wte, &dout, c);
    let [out16, dwte16] = embedding::<bf16>(&tokens, &wte, &dout, c);
    assert_rounded("embedding out", &out16, &out32);
    assert_same("embedding dwte (f32)", &dwte16, &dwte32);
}

fn rmsnorm<T: Storage>(x: &[f32], w: &[f32], dy: &[f32], dx0: &[f32]) -> [Vec<f32>; 4] {
    let dev = emulated();
    let (rows, c) = (x.len() / w.len(), w.len());
    let (xd, wd) = (up::<T>(x), up::<T>(w));
    let mut out = up::<T>(&vec![0.0; rows * c]);
    let mut rstd = up::<f32>(&vec![0.0; rows]);
    dev.rmsnorm_forward(&mut out, &mut rstd, &xd, &wd, 1e-5)
        .unwrap();
    let mut dx = up::<T>(dx0);
    let mut dw = up::<f32>(&vec![0.5; c]);
    dev.rmsnorm_backward(&mut dx, &mut dw, &up::<T>(dy), &xd, &wd, &rstd)
        .unwrap();
    [down(&out), down(&rstd), down(&dx), down(&dw)]
}

#[test]
fn rmsnorm_forward_and_backward() {
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, c) = (9, 300);
    let x = bf16_values(&mut rng, rows * c, 2.0);
    let w = bf16_values(&mut rng, c, 1.0);
    let dy = bf16_values(&mut rng, rows * c, 1.0);
    let dx0 = bf16_values(&mut rng, rows * c, 0.5);
    let [o32, r32, dx32, dw32] = rmsnorm::<f32>(&x, &w, &dy, &dx0);
    let [o16, r16, dx16, dw16] = rmsnorm::<bf16>(&x, &w, &dy, &dx0);
    assert_rounded("rmsnorm out", &o16, &o32);
    assert_same("rmsnorm rstd (f32)", &r16, &r32);
    assert_rounded("rmsnorm dinp (accumulated)", &dx16, &dx32);
    assert_same("rmsnorm dweight (f32)", &dw16, &dw32);
}

fn elementwise<T: Storage>(g: &[f32], u: &[f32], d: &[f32], acc: &[f32]) -> [Vec<f32>; 6] {
    let dev = emulated();
    let n = g.len();
    let (gd, ud, dd) = (up::<T>(g), up::<T>(u), up::<T>(d));
    let mut sw = up::<T>(&vec![0.0; n]);
    dev.swiglu_forward(&mut sw, &gd, &ud).unwrap();
    let (mut dg, mut du) = (up::<T>(acc), up::<T>(acc));
    dev.swiglu_backward(&mut dg, &mut du, &dd, &gd, &ud)
        .unwrap();
    let mut res = up::<T>(&vec![0.0; n]);
    dev.residual_forward(&mut res, &gd, &ud).unwrap();
    let (mut da, mut db) = (up::<T>(acc), up::<T>(g));
    dev.residual_backward(&mut da, &mut db, &dd).unwrap();
    [
        down(&sw),
        down(&dg),
        down(&du),
        down(&res),
        down(&da),
        down(&db),
    ]
}

#[test]
fn swiglu_and_residual() {
    let mut rng = StdRng::seed_from_u64(3);
    let n = 1001;
    let g = bf16_values(&mut rng, n, 4.0);
    let u = bf16_values(&mut rng, n, 1.0);
    let d = bf16_values(&mut rng, n, 1.0);
    let acc = bf16_values(&mut rng, n, 0.5);
    let want = elementwise::<f32>(&g, &u, &d, &acc);
    let got = elementwise::<bf16>(&g, &u, &d, &acc);
    let names = [
        "swiglu out",
        "swiglu dgate",
        "swiglu dup",
        "residual out",
        "residual da",
        "residual db",
    ];
    for ((name, g), w) in names.iter().zip(&got).zip(&want) {
        assert_rounded(name, g, w);
    }
}

fn rope<T: Storage>(x: &[f32], seq: usize, heads: usize, hd: usize) -> [Vec<f32>; 2] {
    let dev = emulated();
    let (cos, sin) = ops::rope_tables::<f32>(seq, hd, 10000.0);
    let (cd, sd) = (up::<f32>(&cos), up::<f32>(&sin));
    let mut y = up::<T>(x);
    dev.rope_forward(&mut y, &cd, &sd, seq, heads, hd).unwrap();
    let mut back = up::<T>(x);
    dev.rope_backward(&mut back, &cd, &sd, seq, heads, hd)
        .unwrap();
    [down(&y), down(&back)]
}

#[test]
fn rope_and_copy_rows() {
    let mut rng = StdRng::seed_from_u64(4);
    let (b, seq, heads, hd) = (2, 7, 3, 10);
    let x = bf16_values(&mut rng, b * seq * heads * hd, 1.0);
    let [y32, b32] = rope::<f32>(&x, seq, heads, hd);
    let [y16, b16] = rope::<bf16>(&x, seq, heads, hd);
    assert_rounded("rope forward", &y16, &y32);
    assert_rounded("rope backward", &b16, &b32);

    // The copy moves bf16 elements untouched (2-byte strides).
    let dev = emulated();
    let (rows, width, ss, ds) = (5, 3, 7, 4);
    let src = bf16_values(&mut rng, rows * ss, 3.0);
    let mut dst = up::<bf16>(&vec![-1.0; (rows - 1) * ds + width]);
    dev.copy_rows(&mut dst, ds, &up::<bf16>(&src), ss, rows, width)
        .unwrap();
    let got = down(&dst);
    for r in 0..rows {
        for j in 0..width {
            assert_eq!(got[r * ds + j].to_bits(), src[r * ss + j].to_bits());
        }
    }
}

/// Forward then backward; returns out, lse, delta, dq, dk, dv (widened).
fn attention<T: Storage>(
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    out_for_backward: Option<&[f32]>,
) -> [Vec<f32>; 6] {
    let dev = emulated();
    let (nq, nkv, rows) = (q.len(), k.len(), s.batch * s.seq * s.n_heads);
    let (qd, kd, vd) = (up::<T>(q), up::<T>(k), up::<T>(v));
    let mut out = up::<T>(&vec![0.0; nq]);
    let mut lse = up::<f32>(&vec![0.0; rows]);
    dev.attention_forward(&mut out, &mut lse, &qd, &kd, &vd, s)
        .unwrap();
    let fwd = down(&out);
    // The backward reads the forward's output: give both variants the same (bf16) values.
    let out_b = up::<T>(out_for_backward.unwrap_or(&fwd));
    let mut delta = up::<f32>(&vec![0.0; rows]);
    let (mut dq, mut dk, mut dv) = (
        up::<T>(&vec![0.0; nq]),
        up::<T>(&vec![0.0; nkv]),
        up::<T>(&vec![0.0; nkv]),
    );
    dev.attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        &mut delta,
        &up::<T>(dout),
        &qd,
        &kd,
        &vd,
        &out_b,
        &lse,
        s,
    )
    .unwrap();
    [
        fwd,
        down(&lse),
        down(&delta),
        down(&dq),
        down(&dk),
        down(&dv),
    ]
}

#[test]
fn attention_grouped_heads_odd_lengths() {
    for (seed, s) in [
        (5, (2, 13, 6, 2, 40)),
        (6, (1, 33, 3, 1, 17)),
        (7, (3, 1, 2, 2, 128)),
    ] {
        let (batch, seq, n_heads, n_kv_heads, head_dim) = s;
        let s = AttnShape {
            batch,
            seq,
            n_heads,
            n_kv_heads,
            head_dim,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let rows = batch * seq;
        let q = bf16_values(&mut rng, rows * n_heads * head_dim, 1.0);
        let k = bf16_values(&mut rng, rows * n_kv_heads * head_dim, 1.0);
        let v = bf16_values(&mut rng, rows * n_kv_heads * head_dim, 1.0);
        let dout = bf16_values(&mut rng, rows * n_heads * head_dim, 1.0);
        let [o16, l16, d16, dq16, dk16, dv16] = attention::<bf16>(s, &q, &k, &v, &dout, None);
        // The f32 variant's backward reads the bf16 forward's output, as the bf16 one did.
        let [o32, l32, d32, dq32, dk32, dv32] = attention::<f32>(s, &q, &k, &v, &dout, Some(&o16));
        let what = format!("{s:?}");
        assert_rounded(&format!("{what} out"), &o16, &o32);
        assert_same(&format!("{what} lse (f32)"), &l16, &l32);
        assert_same(&format!("{what} delta (f32)"), &d16, &d32);
        assert_rounded(&format!("{what} dq"), &dq16, &dq32);
        assert_rounded(&format!("{what} dk"), &dk16, &dk32);
        assert_rounded(&format!("{what} dv"), &dv16, &dv32);
    }
}
