//! The Llama model's numerical core: every op's backward against central finite differences in
//! f64, the whole model against finite differences and against a naive reference forward written
//! from the Hugging Face definitions, f32 against f64, RoPE against a hand-computed example,
//! causal masking, grouped-query head mapping, determinism across thread counts, and errors.
//!
//! Finite differences. Each derivative is the five-point central difference
//! `(8 (L(x+h) - L(x-h)) - (L(x+2h) - L(x-2h))) / 12h` in f64 with h = 1e-4: its truncation error is
//! about h^4 |L^(5)| / 30 (1e-17 per unit of fifth derivative) and its rounding error about
//! 1.5 eps |L| / h (eps = 1.1e-16; 2e-11 for the |L| <= 10 losses here), so the expected error is
//! near 1e-10. The bound 1e-7 * (1 + |g|) leaves about three orders of margin while a wrong term of
//! a gradient (typically off by O(|g|)) fails by six. Each test prints the largest error it saw.

use distill_kernels::model::ops::{self, AttnShape};
use distill_kernels::model::{
    Activations, HiddenPoint, Init, Llama, LlamaConfig, ParamLayout, Pass, Real,
};
use distill_kernels::train::TrainError as Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const H: f64 = 1e-4;
const FD_TOL: f64 = 1e-7;

fn rand_vec(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks `grad[i]` against the five-point central difference of `loss` in `x[i]` for every `i` in `idx`;
/// returns the largest error relative to `1 + |g|`.
fn fd_check(
    what: &str,
    x: &mut [f64],
    grad: &[f64],
    idx: impl IntoIterator<Item = usize>,
    mut loss: impl FnMut(&[f64]) -> f64,
) -> f64 {
    let mut worst: f64 = 0.0;
    for i in idx {
        let x0 = x[i];
        let mut at = |dx: f64| {
            x[i] = x0 + dx;
            loss(x)
        };
        let (p1, m1, p2, m2) = (at(H), at(-H), at(2.0 * H), at(-2.0 * H));
        x[i] = x0;
        let fd = (8.0 * (p1 - m1) - (p2 - m2)) / (12.0 * H);
        let err = (fd - grad[i]).abs() / (1.0 + grad[i].abs());
        assert!(
            err <= FD_TOL,
            "{what}[{i}]: backward {} vs finite difference {fd} (error {err:.2e})",
            grad[i]
        );
        worst = worst.max(err);
    }
    worst
}

/// A gradient buffer pre-filled with noise, so that a test of it also checks accumulation.
fn prefilled(rng: &mut StdRng, n: usize) -> (Vec<f64>, Vec<f64>) {
    let g = rand_vec(rng, n, 1.0);
    (g.clone(), g)
}

fn minus(after: &[f64], before: &[f64]) -> Vec<f64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

// ---------------------------------------------------------------------------------------------
// ops

#[test]
fn embedding_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(1);
    let (v, c) = (7, 5);
    let tokens = [3u32, 1, 3, 6, 0, 3];
    let n = tokens.len();
    let mut wte = rand_vec(&mut rng, v * c, 1.0);
    let w = rand_vec(&mut rng, n * c, 1.0);
    let mut out = vec![0.0; n * c];
    ops::embedding_forward(&mut out, &tokens, &wte, c);
    for (r, &t) in tokens.iter().enumerate() {
        assert_eq!(
            &out[r * c..(r + 1) * c],
            &wte[t as usize * c..(t as usize + 1) * c]
        );
    }
    let (mut g, g0) = prefilled(&mut rng, v * c);
    ops::embedding_backward(&mut g, &tokens, &w, c);
    let g = minus(&g, &g0);
    let loss = |x: &[f64]| {
        let mut o = vec![0.0; n * c];
        ops::embedding_forward(&mut o, &tokens, x, c);
        dot(&o, &w)
    };
    let e = fd_check("dwte", &mut wte, &g, 0..v * c, loss);
    // Row 3 (three uses) sums three rows of dout; rows 2, 4, 5 (unused) stay zero.
    assert!(g[2 * c..3 * c].iter().all(|&x| x == 0.0));
    println!("embedding: worst fd error {e:.1e}");
}

#[test]
fn rmsnorm_matches_definition_and_finite_differences() {
    let mut rng = StdRng::seed_from_u64(2);
    // The second shape spans several channel blocks (64 channels) of the weight gradient.
    for (n, c) in [(4, 6), (3, 150)] {
        let eps = 1e-5;
        let mut x = rand_vec(&mut rng, n * c, 2.0);
        let mut wt: Vec<f64> = rand_vec(&mut rng, c, 0.5).iter().map(|d| 1.0 + d).collect();
        let w = rand_vec(&mut rng, n * c, 1.0);
        let mut out = vec![0.0; n * c];
        let mut rstd = vec![0.0; n];
        ops::rmsnorm_forward(&mut out, &mut rstd, &x, &wt, eps);
        for r in 0..n {
            let row = &x[r * c..(r + 1) * c];
            let ms = row.iter().map(|a| a * a).sum::<f64>() / c as f64;
            for j in 0..c {
                let want = row[j] / (ms + eps).sqrt() * wt[j];
                assert!((out[r * c + j] - want).abs() < 1e-14);
            }
        }
        let (mut dx, dx0) = prefilled(&mut rng, n * c);
        let (mut dw, dw0) = prefilled(&mut rng, c);
        ops::rmsnorm_backward(&mut dx, &mut dw, &w, &x, &wt, &rstd);
        let (dx, dw) = (minus(&dx, &dx0), minus(&dw, &dw0));
        let run = |x: &[f64], wt: &[f64]| {
            let mut o = vec![0.0; n * c];
            let mut r = vec![0.0; n];
            ops::rmsnorm_forward(&mut o, &mut r, x, wt, eps);
            dot(&o, &w)
        };
        let wt_c = wt.clone();
        let e1 = fd_check("dx", &mut x, &dx, 0..n * c, |x| run(x, &wt_c));
        let x_c = x.clone();
        let e2 = fd_check("dweight", &mut wt, &dw, 0..c, |wt| run(&x_c, wt));
        println!("rmsnorm {n}x{c}: worst fd error {:.1e}", e1.max(e2));
    }
}

fn naive_linear(x: &[f64], w: &[f64], ic: usize, oc: usize) -> Vec<f64> {
    let n = x.len() / ic;
    let mut y = vec![0.0; n * oc];
    for r in 0..n {
        for o in 0..oc {
            y[r * oc + o] = (0..ic).map(|i| x[r * ic + i] * w[o * ic + i]).sum();
        }
    }
    y
}

#[test]
fn matmul_matches_naive_and_finite_differences() {
    let mut rng = StdRng::seed_from_u64(3);
    // The second shape spans several row blocks (64 rows) of both the input and the weight.
    for (n, ic, oc) in [(3, 5, 4), (130, 3, 70)] {
        let mut x = rand_vec(&mut rng, n * ic, 1.0);
        let mut wt = rand_vec(&mut rng, oc * ic, 1.0);
        let w = rand_vec(&mut rng, n * oc, 1.0);
        let mut y = vec![f64::NAN; n * oc]; // overwritten, never read
        ops::matmul_forward(&mut y, &x, &wt, ic, oc);
        let want = naive_linear(&x, &wt, ic, oc);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-13, "{a} vs {b}");
        }
        let (mut dx, dx0) = prefilled(&mut rng, n * ic);
        let (mut dwt, dwt0) = prefilled(&mut rng, oc * ic);
        ops::matmul_backward(&mut dx, &mut dwt, &w, &x, &wt, ic, oc);
        let (dx, dwt) = (minus(&dx, &dx0), minus(&dwt, &dwt0));
        let run = |x: &[f64], wt: &[f64]| {
            let mut y = vec![0.0; n * oc];
            ops::matmul_forward(&mut y, x, wt, ic, oc);
            dot(&y, &w)
        };
        let wt_c = wt.clone();
        let e1 = fd_check("dinp", &mut x, &dx, 0..n * ic, |x| run(x, &wt_c));
        let x_c = x.clone();
        let e2 = fd_check("dweight", &mut wt, &dwt, 0..oc * ic, |wt| run(&x_c, wt));
        println!("matmul {n}x{ic}->{oc}: worst fd error {:.1e}", e1.max(e2));
    }
}

#[test]
fn rope_is_rotate_half_on_a_hand_computed_example() {
    // head_dim 4, theta 10000: inv_freq = [1, 10000^(-1/2) = 0.01]. At position 1, x = [1, 2, 3, 4]:
    //   y0 = x0 cos 1    - x2 sin 1      y2 = x2 cos 1    + x0 sin 1
    //   y1 = x1 cos 0.01 - x3 sin 0.01   y3 = x3 cos 0.01 + x1 sin 0.01
    // (the interleaved GPT-J convention would pair x0 with x1 instead). The model forms the angle
    // 0.01 in f32 as HF does (0.0099999998); that moves y1, y3 by under 1e-9.
    let want = [
        -1.9841106485555495,
        1.959900667496664,
        2.4623779024123156,
        4.019799668334994,
    ];
    let (cos, sin) = ops::rope_tables::<f64>(2, 4, 10000.0);
    let mut x = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]; // positions 0 and 1, one head
    ops::rope_forward(&mut x, &cos, &sin, 2, 1, 4);
    assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0], "position 0 is not rotated");
    for (got, want) in x[4..].iter().zip(want) {
        assert!((got - want).abs() < 1e-8, "{got} vs {want}");
    }
    // f32 gives the same within f32 rounding.
    let (cos32, sin32) = ops::rope_tables::<f32>(2, 4, 10000.0);
    let mut x32 = vec![1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
    ops::rope_forward(&mut x32, &cos32, &sin32, 2, 1, 4);
    for (got, want) in x32[4..].iter().zip(want) {
        assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
    }
    // Tables: inv_freq = theta^(-2i/d) at a longer head and larger theta (Llama 3's 500000).
    let (cos, sin) = ops::rope_tables::<f64>(8, 8, 500000.0);
    for t in 0..8 {
        for i in 0..4 {
            let angle = t as f64 * 500000f64.powf(-((2 * i) as f64) / 8.0);
            assert!((cos[t * 4 + i] - angle.cos()).abs() < 1e-6);
            assert!((sin[t * 4 + i] - angle.sin()).abs() < 1e-6);
        }
    }
}

#[test]
fn rope_backward_matches_finite_differences_and_inverts_forward() {
    let mut rng = StdRng::seed_from_u64(4);
    let (b, t, heads, hd) = (2, 3, 2, 6);
    let n = b * t * heads * hd;
    let (cos, sin) = ops::rope_tables::<f64>(t, hd, 10000.0);
    let mut x = rand_vec(&mut rng, n, 1.0);
    let w = rand_vec(&mut rng, n, 1.0);
    let mut g = w.clone();
    ops::rope_backward(&mut g, &cos, &sin, t, heads, hd);
    let loss = |x: &[f64]| {
        let mut y = x.to_vec();
        ops::rope_forward(&mut y, &cos, &sin, t, heads, hd);
        dot(&y, &w)
    };
    let e = fd_check("dx", &mut x, &g, 0..n, loss);
    let mut y = x.clone();
    ops::rope_forward(&mut y, &cos, &sin, t, heads, hd);
    ops::rope_backward(&mut y, &cos, &sin, t, heads, hd);
    for (a, b) in y.iter().zip(&x) {
        assert!((a - b).abs() < 1e-14, "the rotation is orthogonal");
    }
    println!("rope: worst fd error {e:.1e}");
}

/// Attention written from the HF definition: full score matrix, causal mask to -inf, softmax,
/// weighted sum; key/value heads repeated as `repeat_kv` does.
fn naive_attention(q: &[f64], k: &[f64], v: &[f64], s: AttnShape) -> Vec<f64> {
    let AttnShape {
        batch,
        seq,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: d,
    } = s;
    let mut out = vec![0.0; batch * seq * nh * d];
    for b in 0..batch {
        for h in 0..nh {
            let g = h / (nh / nkv);
            for t in 0..seq {
                let qi = &q[((b * seq + t) * nh + h) * d..][..d];
                let scores: Vec<f64> = (0..seq)
                    .map(|j| {
                        if j > t {
                            f64::NEG_INFINITY
                        } else {
                            dot(qi, &k[((b * seq + j) * nkv + g) * d..][..d]) / (d as f64).sqrt()
                        }
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..seq {
                    for i in 0..d {
                        out[((b * seq + t) * nh + h) * d + i] +=
                            e[j] / z * v[((b * seq + j) * nkv + g) * d + i];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive_and_finite_differences_for_mha_gqa_mqa() {
    let mut rng = StdRng::seed_from_u64(5);
    for nkv in [4, 2, 1] {
        let s = AttnShape {
            batch: 2,
            seq: 5,
            n_heads: 4,
            n_kv_heads: nkv,
            head_dim: 3,
        };
        let nq = s.batch * s.seq * s.n_heads * s.head_dim;
        let nk = s.batch * s.seq * nkv * s.head_dim;
        let natt = s.batch * s.seq * s.n_heads * s.seq;
        let mut q = rand_vec(&mut rng, nq, 1.5);
        let mut k = rand_vec(&mut rng, nk, 1.5);
        let mut v = rand_vec(&mut rng, nk, 1.5);
        let w = rand_vec(&mut rng, nq, 1.0);
        let mut out = vec![f64::NAN; nq];
        let mut att = vec![f64::NAN; natt];
        ops::attention_forward(&mut out, &mut att, &q, &k, &v, s);
        let want = naive_attention(&q, &k, &v, s);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-13, "nkv {nkv}: {a} vs {b}");
        }
        for row in att.chunks(s.seq) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-14);
        }
        let (mut dq, dq0) = prefilled(&mut rng, nq);
        let (mut dk, dk0) = prefilled(&mut rng, nk);
        let (mut dv, dv0) = prefilled(&mut rng, nk);
        let mut scratch = vec![7.0; natt]; // overwritten
        ops::attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &mut scratch,
            &w,
            &q,
            &k,
            &v,
            &att,
            s,
        );
        let (dq, dk, dv) = (minus(&dq, &dq0), minus(&dk, &dk0), minus(&dv, &dv0));
        let run = |q: &[f64], k: &[f64], v: &[f64]| {
            let mut o = vec![0.0; nq];
            let mut a = vec![0.0; natt];
            ops::attention_forward(&mut o, &mut a, q, k, v, s);
            dot(&o, &w)
        };
        let (k_c, v_c) = (k.clone(), v.clone());
        let e1 = fd_check("dq", &mut q, &dq, 0..nq, |q| run(q, &k_c, &v_c));
        let q_c = q.clone();
        let e2 = fd_check("dk", &mut k, &dk, 0..nk, |k| run(&q_c, k, &v_c));
        let k_c = k.clone();
        let e3 = fd_check("dv", &mut v, &dv, 0..nk, |v| run(&q_c, &k_c, v));
        println!(
            "attention nh 4 nkv {nkv}: worst fd error {:.1e}",
            e1.max(e2).max(e3)
        );
    }
}

#[test]
fn attention_is_causal_and_groups_heads_like_repeat_kv() {
    let mut rng = StdRng::seed_from_u64(6);
    let s = AttnShape {
        batch: 2,
        seq: 6,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
    };
    let (nh, d, t_len) = (s.n_heads, s.head_dim, s.seq);
    let nq = s.batch * t_len * nh * d;
    let nk = s.batch * t_len * s.n_kv_heads * d;
    let natt = s.batch * t_len * nh * t_len;
    let (q, k, v) = (
        rand_vec(&mut rng, nq, 1.0),
        rand_vec(&mut rng, nk, 1.0),
        rand_vec(&mut rng, nk, 1.0),
    );
    let run = |q: &[f64], k: &[f64], v: &[f64]| {
        let mut o = vec![0.0; nq];
        let mut a = vec![0.0; natt];
        ops::attention_forward(&mut o, &mut a, q, k, v, s);
        (o, a)
    };
    let (out, att) = run(&q, &k, &v);
    // Probabilities above the diagonal are exactly zero.
    for (i, row) in att.chunks(t_len).enumerate() {
        let t = (i / nh) % t_len;
        assert!(row[t + 1..].iter().all(|&p| p == 0.0));
    }
    // Changing q, k and v at position 3 of sequence 0 leaves positions 0..3 of sequence 0, and all
    // of sequence 1, bit-identical.
    let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
    let at = 3;
    for x in &mut q2[at * nh * d..(at + 1) * nh * d] {
        *x += 1.0;
    }
    for x in k2[at * 2 * d..(at + 1) * 2 * d].iter_mut() {
        *x -= 2.0;
    }
    for x in v2[at * 2 * d..(at + 1) * 2 * d].iter_mut() {
        *x *= 3.0;
    }
    let (out2, _) = run(&q2, &k2, &v2);
    let row = nh * d;
    assert_eq!(
        &out[..at * row],
        &out2[..at * row],
        "past positions changed"
    );
    assert_ne!(
        &out[at * row..(at + 1) * row],
        &out2[at * row..(at + 1) * row]
    );
    assert_eq!(
        &out[t_len * row..],
        &out2[t_len * row..],
        "the other sequence changed"
    );
    // Position 0 attends only to itself: query head h returns value head h / 2.
    for h in 0..nh {
        assert_eq!(&out[h * d..(h + 1) * d], &v[(h / 2) * d..(h / 2 + 1) * d]);
    }
    // Grouped-query attention equals multi-head attention on explicitly repeated k/v heads.
    let repeat = |x: &[f64]| -> Vec<f64> {
        x.chunks(2 * d)
            .flat_map(|r| [&r[..d], &r[..d], &r[d..], &r[d..]].concat())
            .collect()
    };
    let mha = AttnShape { n_kv_heads: 4, ..s };
    let mut o4 = vec![0.0; nq];
    let mut a4 = vec![0.0; natt];
    ops::attention_forward(&mut o4, &mut a4, &q, &repeat(&k), &repeat(&v), mha);
    assert_eq!(out, o4);
}

#[test]
fn swiglu_matches_definition_and_finite_differences() {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 40;
    let mut gate = rand_vec(&mut rng, n, 8.0); // both tails of the sigmoid
    let mut up = rand_vec(&mut rng, n, 2.0);
    let w = rand_vec(&mut rng, n, 1.0);
    let mut out = vec![0.0; n];
    ops::swiglu_forward(&mut out, &gate, &up);
    for i in 0..n {
        let silu = gate[i] / (1.0 + (-gate[i]).exp());
        assert!((out[i] - silu * up[i]).abs() < 1e-14);
    }
    let (mut dg, dg0) = prefilled(&mut rng, n);
    let (mut du, du0) = prefilled(&mut rng, n);
    ops::swiglu_backward(&mut dg, &mut du, &w, &gate, &up);
    let (dg, du) = (minus(&dg, &dg0), minus(&du, &du0));
    let run = |g: &[f64], u: &[f64]| {
        let mut o = vec![0.0; n];
        ops::swiglu_forward(&mut o, g, u);
        dot(&o, &w)
    };
    let up_c = up.clone();
    let e1 = fd_check("dgate", &mut gate, &dg, 0..n, |g| run(g, &up_c));
    let gate_c = gate.clone();
    let e2 = fd_check("dup", &mut up, &du, 0..n, |u| run(&gate_c, u));
    println!("swiglu: worst fd error {:.1e}", e1.max(e2));
}

#[test]
fn residual_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(8);
    let n = 12;
    let mut a = rand_vec(&mut rng, n, 1.0);
    let b = rand_vec(&mut rng, n, 1.0);
    let w = rand_vec(&mut rng, n, 1.0);
    let (mut da, da0) = prefilled(&mut rng, n);
    let (mut db, db0) = prefilled(&mut rng, n);
    ops::residual_backward(&mut da, &mut db, &w);
    let (da, db) = (minus(&da, &da0), minus(&db, &db0));
    let run = |a: &[f64], b: &[f64]| {
        let mut o = vec![0.0; n];
        ops::residual_forward(&mut o, a, b);
        dot(&o, &w)
    };
    fd_check("da", &mut a, &da, 0..n, |a| run(a, &b));
    let a_c = a.clone();
    let mut b = b;
    fd_check("db", &mut b, &db, 0..n, |b| run(&a_c, b));
}

// ---------------------------------------------------------------------------------------------
// the whole model

fn tiny(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 11,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: None,
        max_position_embeddings: 8,
        initializer_range: 0.02,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: tied,
        qkv_bias: false,
    }
}

const BATCH: usize = 2;
const SEQ: usize = 5;
const TOKENS: [u32; 10] = [3, 0, 10, 7, 3, 5, 5, 1, 9, 2];

/// Parameters with O(1) activations (the 0.02 initialization would make the model nearly
/// linear and the check weak): linear weights uniform in +-0.5, norm weights in 1 +- 0.3.
fn fd_params(model: &Llama, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut p = vec![0.0; model.num_params()];
    for t in model.layout().tensors() {
        for x in t.span.of_mut(&mut p) {
            *x = match t.init {
                Init::Normal | Init::Zeros => rng.gen_range(-0.5..0.5),
                Init::Ones => 1.0 + rng.gen_range(-0.3..0.3),
            };
        }
    }
    p
}

/// `loss = sum(logits * wl) + sum_k sum(hidden_k * wh_k)` and its gradients on the parameters.
struct ModelCase {
    model: Llama,
    params: Vec<f64>,
    wl: Vec<f64>,
    wh: Vec<(HiddenPoint, Vec<f64>)>,
}

impl ModelCase {
    fn new(cfg: LlamaConfig, hidden: &[HiddenPoint], seed: u64) -> Self {
        let model = Llama::new(cfg).unwrap();
        let params = fd_params(&model, seed);
        let mut rng = StdRng::seed_from_u64(seed + 100);
        let n = BATCH * SEQ;
        let (c, v) = (model.config().hidden_size, model.config().vocab_size);
        let wl = rand_vec(&mut rng, n * v, 1.0);
        let wh = hidden
            .iter()
            .map(|&p| (p, rand_vec(&mut rng, n * c, 1.0)))
            .collect();
        ModelCase {
            model,
            params,
            wl,
            wh,
        }
    }

    fn loss(&self, params: &[f64], acts: &mut Activations<f64>) -> f64 {
        let logits = self.model.forward(params, &TOKENS, acts).unwrap();
        let mut l = dot(logits, &self.wl);
        for (p, w) in &self.wh {
            l += dot(acts.hidden(*p).unwrap(), w);
        }
        l
    }

    fn check(&mut self, label: &str) {
        let mut acts = Activations::new(&self.model, BATCH, SEQ).unwrap();
        self.model
            .forward(&self.params, &TOKENS, &mut acts)
            .unwrap();
        let mut rng = StdRng::seed_from_u64(99);
        let (mut grads, g0) = prefilled(&mut rng, self.model.num_params());
        let dh: Vec<(HiddenPoint, &[f64])> =
            self.wh.iter().map(|(p, w)| (*p, w.as_slice())).collect();
        self.model
            .backward_with_hidden(&self.params, &mut acts, Some(&self.wl), &dh, &mut grads)
            .unwrap();
        let grads = minus(&grads, &g0);
        let tensors = self.model.layout().tensors().to_vec();
        let mut worst: f64 = 0.0;
        let mut params = std::mem::take(&mut self.params);
        for t in &tensors {
            // first, last and 10 random elements of every tensor
            let sp = t.span;
            let mut idx = vec![sp.offset, sp.offset + sp.len - 1];
            idx.extend((0..10).map(|_| sp.offset + rng.gen_range(0..sp.len)));
            let e = fd_check(&t.name, &mut params, &grads, idx, |p| {
                self.loss(p, &mut acts)
            });
            worst = worst.max(e);
        }
        self.params = params;
        println!(
            "{label}: {} tensors, worst fd error {worst:.1e}",
            tensors.len()
        );
    }
}

#[test]
fn model_backward_matches_finite_differences_untied() {
    ModelCase::new(tiny(false), &[], 11).check("untied");
}

#[test]
fn model_backward_matches_finite_differences_tied() {
    ModelCase::new(tiny(true), &[], 12).check("tied");
}

#[test]
fn model_backward_matches_finite_differences_with_qkv_biases() {
    let cfg = LlamaConfig {
        qkv_bias: true,
        ..tiny(false)
    };
    ModelCase::new(cfg, &[], 14).check("qwen2 q/k/v biases");
}

#[test]
fn model_backward_matches_finite_differences_with_explicit_head_dim() {
    // q_dim = 4 * 6 = 24 != hidden_size; MQA (one kv head).
    let cfg = LlamaConfig {
        head_dim: Some(6),
        num_key_value_heads: 1,
        ..tiny(false)
    };
    ModelCase::new(cfg, &[], 13).check("head_dim 6, mqa");
}

#[test]
fn model_backward_matches_finite_differences_with_hidden_state_losses() {
    let points = [
        HiddenPoint::Embeddings,
        HiddenPoint::LayerOutput(0),
        HiddenPoint::LayerOutput(1),
        HiddenPoint::Final,
        HiddenPoint::Final,
    ];
    ModelCase::new(tiny(true), &points, 14).check("hidden-state losses");
}

#[test]
fn model_backward_from_hidden_states_alone() {
    // No logits gradient: lm_head's gradient stays as it was (zero here).
    let model = Llama::new(tiny(false)).unwrap();
    let params = fd_params(&model, 15);
    let mut acts = Activations::new(&model, BATCH, SEQ).unwrap();
    model.forward(&params, &TOKENS, &mut acts).unwrap();
    let dh = vec![1.0; BATCH * SEQ * 16];
    let mut grads = vec![0.0; model.num_params()];
    model
        .backward_with_hidden(
            &params,
            &mut acts,
            None,
            &[(HiddenPoint::LayerOutput(0), &dh)],
            &mut grads,
        )
        .unwrap();
    let l = model.layout();
    assert!(l.lm_head.of(&grads).iter().all(|&g| g == 0.0));
    assert!(l.norm.of(&grads).iter().all(|&g| g == 0.0));
    assert!(l.layers[1].q_proj.of(&grads).iter().all(|&g| g == 0.0));
    assert!(l.layers[0].q_proj.of(&grads).iter().any(|&g| g != 0.0));
}

/// The model written out naively from HF `LlamaForCausalLM`, reading weights by HF name: exact
/// f64 RoPE angles, a full masked score matrix, `repeat_kv`. Returns the logits and HF's
/// `output_hidden_states` tuple.
fn reference_forward(
    cfg: &LlamaConfig,
    layout: &ParamLayout,
    params: &[f64],
    tokens: &[u32],
    batch: usize,
    seq: usize,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let w = |name: &str| layout.get(name).unwrap().span.of(params);
    let (c, d) = (cfg.hidden_size, cfg.head_dim());
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let lin = |x: &[f64], name: &str| -> Vec<f64> {
        let t = layout.get(name).unwrap();
        let mut y = naive_linear(x, w(name), t.shape[1], t.shape[0]);
        // nn.Linear's bias, where the layout has one (Qwen2's q/k/v).
        if let Some(b) = layout.get(&name.replace(".weight", ".bias")) {
            let b = b.span.of(params);
            for row in y.chunks_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
        y
    };
    let rms = |x: &[f64], name: &str| -> Vec<f64> {
        let g = w(name);
        x.chunks(c)
            .flat_map(|r| {
                let ms = r.iter().map(|a| a * a).sum::<f64>() / c as f64;
                let s = 1.0 / (ms + cfg.rms_norm_eps).sqrt();
                r.iter().zip(g).map(move |(a, gi)| a * s * gi)
            })
            .collect()
    };
    let rope = |x: &mut [f64], heads: usize| {
        for (i, hv) in x.chunks_mut(d).enumerate() {
            let t = (i / heads) % seq;
            let half = d / 2;
            let rot: Vec<f64> = (0..d)
                .map(|j| {
                    if j < half {
                        -hv[j + half]
                    } else {
                        hv[j - half]
                    }
                })
                .collect();
            for j in 0..d {
                let f = cfg.rope_theta.powf(-((2 * (j % half)) as f64) / d as f64);
                let a = t as f64 * f;
                hv[j] = hv[j] * a.cos() + rot[j] * a.sin();
            }
        }
    };
    let mut h: Vec<f64> = tokens
        .iter()
        .flat_map(|&t| w("model.embed_tokens.weight")[t as usize * c..][..c].to_vec())
        .collect();
    let mut hidden = Vec::new();
    let shape = AttnShape {
        batch,
        seq,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: d,
    };
    for l in 0..cfg.num_hidden_layers {
        hidden.push(h.clone());
        let pre = format!("model.layers.{l}.");
        let x = rms(&h, &(pre.clone() + "input_layernorm.weight"));
        let mut q = lin(&x, &(pre.clone() + "self_attn.q_proj.weight"));
        let mut k = lin(&x, &(pre.clone() + "self_attn.k_proj.weight"));
        let v = lin(&x, &(pre.clone() + "self_attn.v_proj.weight"));
        rope(&mut q, nh);
        rope(&mut k, nkv);
        let a = naive_attention(&q, &k, &v, shape);
        let o = lin(&a, &(pre.clone() + "self_attn.o_proj.weight"));
        h = h.iter().zip(&o).map(|(x, y)| x + y).collect();
        let x = rms(&h, &(pre.clone() + "post_attention_layernorm.weight"));
        let g = lin(&x, &(pre.clone() + "mlp.gate_proj.weight"));
        let u = lin(&x, &(pre.clone() + "mlp.up_proj.weight"));
        let m: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let o = lin(&m, &(pre + "mlp.down_proj.weight"));
        h = h.iter().zip(&o).map(|(x, y)| x + y).collect();
    }
    let f = rms(&h, "model.norm.weight");
    hidden.push(f.clone());
    (lin(&f, "lm_head.weight"), hidden)
}

#[test]
fn model_forward_matches_naive_hf_reference() {
    for cfg in [
        tiny(false),
        tiny(true),
        LlamaConfig {
            head_dim: Some(6),
            num_hidden_layers: 3,
            ..tiny(false)
        },
        LlamaConfig {
            qkv_bias: true,
            ..tiny(true)
        },
    ] {
        let model = Llama::new(cfg.clone()).unwrap();
        let params = fd_params(&model, 21);
        let mut acts = Activations::new(&model, BATCH, SEQ).unwrap();
        let logits = model.forward(&params, &TOKENS, &mut acts).unwrap().to_vec();
        let (want, hidden) = reference_forward(&cfg, model.layout(), &params, &TOKENS, BATCH, SEQ);
        // The model forms RoPE angles in f32 as HF does (relative error 6e-8, under 5e-7 rad at
        // positions < 5); the reference uses exact angles. Values are O(1): 1e-5 bounds it.
        let err = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
        };
        assert!(err(&logits, &want) < 1e-5, "{}", err(&logits, &want));
        let ours = acts.hf_hidden_states();
        assert_eq!(ours.len(), cfg.num_hidden_layers + 1);
        for (i, (a, b)) in ours.iter().zip(&hidden).enumerate() {
            assert!(err(a, b) < 1e-5, "hidden state {i}: {}", err(a, b));
        }
        assert_eq!(
            acts.hidden(HiddenPoint::LayerOutput(cfg.num_hidden_layers - 1))
                .unwrap()
                .len(),
            BATCH * SEQ * cfg.hidden_size
        );
        assert!(acts
            .hidden(HiddenPoint::LayerOutput(cfg.num_hidden_layers))
            .is_none());
    }
}

#[test]
fn f32_forward_and_backward_match_f64() {
    for tied in [false, true] {
        let cfg = LlamaConfig {
            initializer_range: 0.2,
            ..tiny(tied)
        };
        let model = Llama::new(cfg).unwrap();
        let p64 = model.init_params::<f64>(5);
        let p32 = model.init_params::<f32>(5);
        assert!(p64.iter().zip(&p32).all(|(a, b)| *a as f32 == *b));
        let mut a64 = Activations::new(&model, BATCH, SEQ).unwrap();
        let mut a32 = Activations::new(&model, BATCH, SEQ).unwrap();
        let l64 = model.forward(&p64, &TOKENS, &mut a64).unwrap().to_vec();
        let l32 = model.forward(&p32, &TOKENS, &mut a32).unwrap().to_vec();
        let rel = |a: &[f32], b: &[f64]| {
            let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            a.iter()
                .zip(b)
                .map(|(x, y)| (*x as f64 - y).abs())
                .fold(0.0, f64::max)
                / scale
        };
        // f32 rounding (6e-8) grows by the reduction lengths (<= 32) and two layers: a few 1e-7
        // relative to the largest logit; 1e-5 leaves margin and still catches any f32-only bug.
        let e = rel(&l32, &l64);
        assert!(e < 1e-5, "logits: {e:.2e}");
        let mut rng = StdRng::seed_from_u64(3);
        let dl64 = rand_vec(&mut rng, l64.len(), 1.0);
        let dl32: Vec<f32> = dl64.iter().map(|&x| x as f32).collect();
        let mut g64 = vec![0.0; model.num_params()];
        let mut g32 = vec![0.0f32; model.num_params()];
        model.backward(&p64, &mut a64, &dl64, &mut g64).unwrap();
        model.backward(&p32, &mut a32, &dl32, &mut g32).unwrap();
        // Per tensor, relative to the tensor's largest gradient (a backward sums more terms,
        // with cancellation in the norms' gradients): 1e-4.
        let mut worst: f64 = 0.0;
        for t in model.layout().tensors() {
            let e = rel(t.span.of(&g32), t.span.of(&g64));
            assert!(e < 1e-4, "{}: {e:.2e}", t.name);
            worst = worst.max(e);
        }
        println!("f32 vs f64 (tied {tied}): logits {e:.1e}, gradients {worst:.1e}");
    }
}

fn run_f32(model: &Llama, seed: u64, batch: usize, seq: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let params = model.init_params::<f32>(seed);
    let mut acts = Activations::new(model, batch, seq).unwrap();
    let vocab = model.config().vocab_size as u32;
    let tokens: Vec<u32> = (0..batch * seq)
        .map(|i| (i as u32 * 7919) % vocab)
        .collect();
    let logits = model.forward(&params, &tokens, &mut acts).unwrap().to_vec();
    let dl: Vec<f32> = (0..logits.len())
        .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
        .collect();
    let mut grads = vec![0.0f32; model.num_params()];
    model.backward(&params, &mut acts, &dl, &mut grads).unwrap();
    (params, logits, grads)
}

#[test]
fn same_seed_is_bit_identical_whatever_the_thread_count() {
    // Big enough that every parallel split has several blocks: 96 rows (> 64 per matmul block),
    // a 2100 x 32 embedding (> 65536 elements per init stream), lm_head blocks of 64 rows.
    let cfg = LlamaConfig {
        vocab_size: 2100,
        hidden_size: 32,
        intermediate_size: 72,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 32,
        initializer_range: 0.2,
        ..LlamaConfig::default()
    };
    let model = Llama::new(cfg).unwrap();
    let runs: Vec<_> = [1, 2, 3]
        .iter()
        .map(|&threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| run_f32(&model, 77, 4, 24))
        })
        .collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for r in &runs[1..] {
        assert_eq!(bits(&runs[0].0), bits(&r.0), "parameters");
        assert_eq!(bits(&runs[0].1), bits(&r.1), "logits");
        assert_eq!(bits(&runs[0].2), bits(&r.2), "gradients");
    }
    assert!(runs[0].2.iter().all(|g| g.is_finite()));
    let other = model.init_params::<f32>(78);
    assert_ne!(bits(&runs[0].0), bits(&other), "another seed differs");
}

#[test]
fn init_follows_hf() {
    let cfg = LlamaConfig {
        vocab_size: 1000,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        ..LlamaConfig::default()
    };
    let model = Llama::new(cfg).unwrap();
    let p = model.init_params::<f64>(1);
    for t in model.layout().tensors() {
        let x = t.span.of(&p);
        match t.init {
            Init::Ones => assert!(x.iter().all(|&v| v == 1.0), "{}", t.name),
            Init::Zeros => assert!(x.iter().all(|&v| v == 0.0), "{}", t.name),
            Init::Normal => {
                let n = x.len() as f64;
                let mean = x.iter().sum::<f64>() / n;
                let std = (x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
                // std of the sample std is about 0.02 / sqrt(2n) <= 0.02 * 0.05 for n >= 4096
                assert!((std - 0.02).abs() < 0.02 * 0.05, "{}: std {std}", t.name);
                assert!(
                    mean.abs() < 5.0 * 0.02 / n.sqrt(),
                    "{}: mean {mean}",
                    t.name
                );
            }
        }
    }
}

#[test]
fn layout_uses_hf_names_shapes_and_order() {
    let model = Llama::new(tiny(false)).unwrap();
    let l = model.layout();
    let names: Vec<&str> = l.tensors().iter().map(|t| t.name.as_str()).collect();
    let mut want = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..2 {
        for s in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            want.push(format!("model.layers.{i}.{s}.weight"));
        }
    }
    want.push("model.norm.weight".into());
    want.push("lm_head.weight".into());
    assert_eq!(names, want);
    let shape = |n: &str| l.get(n).unwrap().shape.clone();
    assert_eq!(shape("model.embed_tokens.weight"), vec![11, 16]);
    assert_eq!(
        shape("model.layers.1.self_attn.q_proj.weight"),
        vec![16, 16]
    );
    assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), vec![8, 16]);
    assert_eq!(
        shape("model.layers.1.self_attn.o_proj.weight"),
        vec![16, 16]
    );
    assert_eq!(shape("model.layers.0.mlp.gate_proj.weight"), vec![32, 16]);
    assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), vec![16, 32]);
    assert_eq!(shape("model.norm.weight"), vec![16]);
    // Contiguous, in order, covering the buffer.
    let mut at = 0;
    for t in l.tensors() {
        assert_eq!(t.span.offset, at);
        assert_eq!(t.span.len, t.shape.iter().product::<usize>());
        at += t.span.len;
    }
    assert_eq!(at, model.num_params());
    assert_eq!(Some(at), model.config().param_count());
    assert_eq!(
        l.layers[1].k_proj,
        l.get("model.layers.1.self_attn.k_proj.weight")
            .unwrap()
            .span
    );

    let tied = Llama::new(tiny(true)).unwrap();
    let lt = tied.layout();
    assert_eq!(lt.tensors().len(), want.len() - 1);
    assert_eq!(lt.lm_head, lt.embed_tokens);
    assert_eq!(
        lt.get("lm_head.weight").unwrap().name,
        "model.embed_tokens.weight"
    );
    assert_eq!(tied.num_params(), model.num_params() - 11 * 16);
}

#[test]
fn bad_configurations_are_typed_errors_naming_the_field() {
    let field = |cfg: LlamaConfig| match Llama::new(cfg) {
        Err(Error::InvalidOption { name, .. }) => name,
        other => panic!("expected InvalidOption, got {other:?}"),
    };
    let base = tiny(false);
    assert_eq!(
        field(LlamaConfig {
            num_key_value_heads: 3,
            ..base.clone()
        }),
        "num_key_value_heads"
    );
    assert_eq!(
        field(LlamaConfig {
            hidden_size: 18,
            ..base.clone()
        }),
        "hidden_size"
    );
    assert_eq!(
        field(LlamaConfig {
            head_dim: Some(5),
            ..base.clone()
        }),
        "head_dim"
    );
    assert_eq!(
        field(LlamaConfig {
            vocab_size: 0,
            ..base.clone()
        }),
        "vocab_size"
    );
    assert_eq!(
        field(LlamaConfig {
            num_hidden_layers: 0,
            ..base.clone()
        }),
        "num_hidden_layers"
    );
    assert_eq!(
        field(LlamaConfig {
            rms_norm_eps: 0.0,
            ..base.clone()
        }),
        "rms_norm_eps"
    );
    assert_eq!(
        field(LlamaConfig {
            rope_theta: f64::NAN,
            ..base.clone()
        }),
        "rope_theta"
    );
    assert_eq!(
        field(LlamaConfig {
            initializer_range: -1.0,
            ..base.clone()
        }),
        "initializer_range"
    );
    assert_eq!(
        field(LlamaConfig {
            vocab_size: usize::MAX / 2,
            ..base.clone()
        }),
        "vocab_size"
    );
    assert_eq!(
        field(LlamaConfig {
            hidden_size: 1 << 40,
            num_attention_heads: 1 << 20,
            num_key_value_heads: 1 << 20,
            ..base.clone()
        }),
        "hidden_size"
    );
    assert!(LlamaConfig::default().validate().is_ok());
}

#[test]
fn bad_inputs_are_typed_errors() {
    let model = Llama::new(tiny(false)).unwrap();
    let params = model.init_params::<f32>(1);
    let mut acts = Activations::new(&model, BATCH, SEQ).unwrap();
    let mut grads = vec![0.0f32; model.num_params()];
    let dl = vec![0.0f32; BATCH * SEQ * 11];

    // backward before any forward
    assert!(matches!(
        model.backward(&params, &mut acts, &dl, &mut grads),
        Err(Error::InvalidOption {
            name: "activations",
            ..
        })
    ));
    // token count, token id, parameter count
    assert!(matches!(
        model.forward(&params, &TOKENS[..9], &mut acts),
        Err(Error::ShapeMismatch {
            tensor: "tokens",
            expected: 10,
            actual: 9,
            ..
        })
    ));
    let mut bad = TOKENS;
    bad[6] = 11;
    assert_eq!(
        model.forward(&params, &bad, &mut acts).unwrap_err(),
        Error::TokenOutOfRange {
            position: 6,
            token: 11,
            vocab: 11
        }
    );
    assert!(matches!(
        model.forward(&params[1..], &TOKENS, &mut acts),
        Err(Error::ShapeMismatch {
            tensor: "params",
            ..
        })
    ));
    // activations of another model
    let other = Llama::new(tiny(true)).unwrap();
    let mut other_acts = Activations::new(&other, BATCH, SEQ).unwrap();
    assert!(matches!(
        model.forward(&params, &TOKENS, &mut other_acts),
        Err(Error::InvalidOption {
            name: "activations",
            ..
        })
    ));
    // sequence length and batch
    assert!(matches!(
        Activations::<f32>::new(&model, 1, 9),
        Err(Error::InvalidOption { name: "seq", .. })
    ));
    assert!(matches!(
        Activations::<f32>::new(&model, 0, 4),
        Err(Error::InvalidOption { name: "batch", .. })
    ));
    // backward shapes
    model.forward(&params, &TOKENS, &mut acts).unwrap();
    assert!(matches!(
        model.backward(&params, &mut acts, &dl[1..], &mut grads),
        Err(Error::ShapeMismatch {
            tensor: "dlogits",
            ..
        })
    ));
    assert!(matches!(
        model.backward(&params, &mut acts, &dl, &mut grads[1..]),
        Err(Error::ShapeMismatch {
            tensor: "grads",
            ..
        })
    ));
    let dh = vec![0.0f32; BATCH * SEQ * 16];
    assert!(matches!(
        model.backward_with_hidden(
            &params,
            &mut acts,
            None,
            &[(HiddenPoint::LayerOutput(2), &dh)],
            &mut grads
        ),
        Err(Error::InvalidOption {
            name: "dhidden",
            ..
        })
    ));
    assert!(matches!(
        model.backward_with_hidden(
            &params,
            &mut acts,
            None,
            &[(HiddenPoint::Final, &dh[1..])],
            &mut grads
        ),
        Err(Error::ShapeMismatch {
            tensor: "dhidden",
            ..
        })
    ));
    // a forward rejected by validation leaves the previous forward's activations intact
    let _ = model.forward(&params, &bad, &mut acts);
    assert!(model.backward(&params, &mut acts, &dl, &mut grads).is_ok());
}

#[test]
fn hf_hidden_state_indices() {
    assert_eq!(
        HiddenPoint::from_hf_index(0, 3),
        Some(HiddenPoint::Embeddings)
    );
    assert_eq!(
        HiddenPoint::from_hf_index(2, 3),
        Some(HiddenPoint::LayerOutput(1))
    );
    assert_eq!(HiddenPoint::from_hf_index(3, 3), Some(HiddenPoint::Final));
    assert_eq!(HiddenPoint::from_hf_index(4, 3), None);
}

/// Generic code compiles for both element types through `Real`.
#[test]
fn real_trait_round_trips() {
    fn half<F: Real>(x: F) -> F {
        x / F::from_f64(2.0)
    }
    assert_eq!(half(3.0f32), 1.5);
    assert_eq!(half(3.0f64).to_f64(), 1.5);
}

#[test]
fn inference_buffers_give_the_training_forward_bit_for_bit_in_less_memory() {
    let model = Llama::new(tiny(false)).unwrap();
    let params: Vec<f32> = model.init_params(3);
    let (b, t) = (2, 5);
    let tokens: Vec<u32> = (0..b * t).map(|i| (i * 5 % 11) as u32).collect();
    let mut train = Activations::<f32>::new(&model, b, t).unwrap();
    let mut infer = Activations::<f32>::inference(&model, b, t).unwrap();
    let want = model
        .forward(&params, &tokens, &mut train)
        .unwrap()
        .to_vec();
    let got = model
        .forward(&params, &tokens, &mut infer)
        .unwrap()
        .to_vec();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&want), "logits");
    // Every hidden state a hidden-state loss reads is kept: each layer's output stays as written
    // while later layers reuse the shared spans.
    for i in 0..=model.config().num_hidden_layers {
        let p = HiddenPoint::from_hf_index(i, model.config().num_hidden_layers).unwrap();
        assert_eq!(
            bits(infer.hidden(p).unwrap()),
            bits(train.hidden(p).unwrap()),
            "hidden state {p:?}"
        );
    }
    let (ta, ts) = Activations::<f32>::buffer_elements(&model, b, t, Pass::Training).unwrap();
    let (ia, is) = Activations::<f32>::buffer_elements(&model, b, t, Pass::Inference).unwrap();
    assert_eq!(is, 0, "no backward scratch");
    assert!(ia < ta && ts > 0, "inference {ia} vs training {ta} + {ts}");
    assert_eq!(infer.len(), ia);
    // A backward on inference buffers is refused, naming why.
    let dl = vec![0.0f32; want.len()];
    let mut g = vec![0.0f32; params.len()];
    let e = model
        .backward(&params, &mut infer, &dl, &mut g)
        .unwrap_err();
    assert!(e.to_string().contains("inference buffers"), "{e}");
}
