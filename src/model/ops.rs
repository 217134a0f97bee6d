//! The ops of a Llama decoder, llm.c style: one forward and one backward function per op, on flat
//! row-major slices, generic over `f32` (training) and `f64` (finite-difference checks).
//!
//! Conventions, shared by every function here:
//! - `N = B * T` rows (one per token position, batch-major); `C` the hidden size.
//! - A linear weight is `[out, in]` as in PyTorch's `nn.Linear`, and `y = x W^T`.
//! - Backward functions **accumulate** (`+=`) into every gradient they produce, so the caller zeroes
//!   a gradient once and branches that feed the same tensor add up. Two exceptions, named on the
//!   functions: `rope_backward` rotates a gradient in place, and `attention_backward` overwrites its
//!   `dpreatt` scratch.
//! - Slice lengths are the caller's contract, checked with `assert!`: a mismatch is a broken internal
//!   invariant (the model validates user input, token ids included, before calling an op).
//! - Work is split over rows (or heads) with rayon in blocks whose boundaries never depend on the
//!   number of threads, and every sum runs in a fixed order: results are bit-identical whatever the
//!   thread count.

use rayon::prelude::*;

use crate::cpu::fastmath::{self, Unfused};
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// The element types the model computes in: `f32` and `f64`.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// Round to nearest (`as`).
    fn from_f64(v: f64) -> Self;
    /// Exact widening to `f64`.
    fn to_f64(self) -> f64;
    /// `e^x`: for `f32` the crate's polynomial approximation (`cpu::fastmath::exp`), for `f64` the
    /// standard library's.
    fn exp(self) -> Self;
    /// Square root, correctly rounded.
    fn sqrt(self) -> Self;
    /// `C <- alpha A B + beta C` for an `m x k` matrix A, a `k x n` matrix B and an `m x n` matrix
    /// C, each given by a pointer and a row and a column stride (the `matrixmultiply` crate).
    ///
    /// # Safety
    /// Every element the strides address must be inside its allocation, and C's strides must not
    /// alias two of its elements. When `beta` is zero C is not read.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

macro_rules! impl_real {
    ($t:ty, $gemm:path, $exp:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            unsafe fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                // SAFETY: forwarded contract (see the trait).
                unsafe { $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
            }
        }
    };
}
// f32 training takes the crate's branch-free exp (at most 2 ulp, tests/fastmath.rs), which LLVM
// vectorizes inside the softmax and SwiGLU loops where libm's `expf` is a call per element; the
// unfused flavour gives the same bits on every CPU. f64 (the finite-difference checks) keeps libm.
impl_real!(f32, matrixmultiply::sgemm, fastmath::exp::<Unfused>);
impl_real!(f64, matrixmultiply::dgemm, f64::exp);

/// Rows of a matmul (one gemm call), or channels of a norm's weight gradient, per rayon task.
const ROW_BLOCK: usize = 64;
/// Elements of an elementwise op per rayon task.
const ELEM_BLOCK: usize = 4096;
/// Attention (row, head) pairs handed to one rayon task at least.
const HEAD_BLOCK: usize = 8;

fn dot<F: Real>(a: &[F], b: &[F]) -> F {
    a.iter().zip(b).fold(F::ZERO, |acc, (&x, &y)| acc + x * y)
}

// ---------------------------------------------------------------------------------------------
// embedding

/// `out[n, :] = wte[tokens[n], :]`. out `[N, C]`, wte `[V, C]`.
pub fn embedding_forward<F: Real>(out: &mut [F], tokens: &[u32], wte: &[F], c: usize) {
    assert_eq!(out.len(), tokens.len() * c, "embedding_forward: out");
    assert_eq!(wte.len() % c, 0, "embedding_forward: wte");
    let vocab = wte.len() / c;
    out.par_chunks_mut(c)
        .zip(tokens.par_iter())
        .for_each(|(o, &t)| {
            let t = t as usize;
            assert!(t < vocab, "embedding_forward: token {t} >= vocab {vocab}");
            o.copy_from_slice(&wte[t * c..(t + 1) * c]);
        });
}

/// `dwte[tokens[n], :] += dout[n, :]`, in position order (a token seen twice sums its rows).
pub fn embedding_backward<F: Real>(dwte: &mut [F], tokens: &[u32], dout: &[F], c: usize) {
    assert_eq!(dout.len(), tokens.len() * c, "embedding_backward: dout");
    assert_eq!(dwte.len() % c, 0, "embedding_backward: dwte");
    let vocab = dwte.len() / c;
    for (&t, d) in tokens.iter().zip(dout.chunks_exact(c)) {
        let t = t as usize;
        assert!(t < vocab, "embedding_backward: token {t} >= vocab {vocab}");
        for (g, &x) in dwte[t * c..(t + 1) * c].iter_mut().zip(d) {
            *g += x;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rmsnorm

/// `out = x * rsqrt(mean(x^2) + eps) * weight` per row (HF `LlamaRMSNorm`); keeps `rstd[n]`, the
/// row's `rsqrt(mean(x^2) + eps)`, for the backward. x, out `[N, C]`, weight `[C]`, rstd `[N]`.
pub fn rmsnorm_forward<F: Real>(out: &mut [F], rstd: &mut [F], inp: &[F], weight: &[F], eps: f64) {
    let c = weight.len();
    assert_eq!(inp.len(), rstd.len() * c, "rmsnorm_forward: inp");
    assert_eq!(out.len(), inp.len(), "rmsnorm_forward: out");
    let eps = F::from_f64(eps);
    let inv_c = F::from_f64(1.0 / c as f64);
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(inp.par_chunks(c))
        .for_each(|((o, r), x)| {
            let ms = dot(x, x) * inv_c;
            *r = F::ONE / (ms + eps).sqrt();
            for ((oi, &xi), &wi) in o.iter_mut().zip(x).zip(weight) {
                *oi = xi * *r * wi;
            }
        });
}

/// With `xh = x * rstd`: `dx += rstd * (dy*w - xh * mean(dy*w*xh))`, `dweight += sum_n dy * xh`.
pub fn rmsnorm_backward<F: Real>(
    dinp: &mut [F],
    dweight: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    rstd: &[F],
) {
    let c = weight.len();
    assert_eq!(inp.len(), rstd.len() * c, "rmsnorm_backward: inp");
    assert_eq!(dinp.len(), inp.len(), "rmsnorm_backward: dinp");
    assert_eq!(dout.len(), inp.len(), "rmsnorm_backward: dout");
    assert_eq!(dweight.len(), c, "rmsnorm_backward: dweight");
    let inv_c = F::from_f64(1.0 / c as f64);
    dinp.par_chunks_mut(c)
        .zip(dout.par_chunks(c))
        .zip(inp.par_chunks(c).zip(rstd.par_iter()))
        .for_each(|((dx, dy), (x, &r))| {
            // mean over the row of (dy * w) * xh
            let m = x
                .iter()
                .zip(dy)
                .zip(weight)
                .fold(F::ZERO, |acc, ((&xi, &di), &wi)| acc + di * wi * xi * r)
                * inv_c;
            for (((g, &xi), &di), &wi) in dx.iter_mut().zip(x).zip(dy).zip(weight) {
                *g += r * (di * wi - xi * r * m);
            }
        });
    // dweight: each block of channels sums over all rows in row order.
    dweight
        .par_chunks_mut(ROW_BLOCK)
        .enumerate()
        .for_each(|(blk, dw)| {
            let c0 = blk * ROW_BLOCK;
            for ((x, dy), &r) in inp.chunks_exact(c).zip(dout.chunks_exact(c)).zip(rstd) {
                for (j, g) in dw.iter_mut().enumerate() {
                    *g += dy[c0 + j] * x[c0 + j] * r;
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// matmul (nn.Linear without bias)

/// `out = inp W^T`: inp `[N, IC]`, weight `[OC, IC]`, out `[N, OC]` (overwritten).
pub fn matmul_forward<F: Real>(out: &mut [F], inp: &[F], weight: &[F], ic: usize, oc: usize) {
    assert!(ic > 0 && oc > 0, "matmul_forward: empty weight");
    assert_eq!(weight.len(), oc * ic, "matmul_forward: weight");
    assert_eq!(inp.len() % ic, 0, "matmul_forward: inp");
    assert_eq!(out.len(), inp.len() / ic * oc, "matmul_forward: out");
    out.par_chunks_mut(ROW_BLOCK * oc)
        .zip(inp.par_chunks(ROW_BLOCK * ic))
        .for_each(|(o, x)| {
            let rows = x.len() / ic;
            // SAFETY: A = x is rows x ic (strides ic, 1), B = W^T is ic x oc read from the
            // [oc, ic] weight (strides 1, ic), C = o is rows x oc (strides oc, 1); every
            // addressed element lies inside the asserted lengths, and C's strides don't alias.
            unsafe {
                F::gemm(
                    rows,
                    ic,
                    oc,
                    F::ONE,
                    x.as_ptr(),
                    ic as isize,
                    1,
                    weight.as_ptr(),
                    1,
                    ic as isize,
                    F::ZERO,
                    o.as_mut_ptr(),
                    oc as isize,
                    1,
                )
            }
        });
}

/// `out[n, :] += bias` for every row n of `out` `[N, oc]` (a linear layer's bias, added after
/// its matmul as the device does).
pub fn bias_forward<F: Real>(out: &mut [F], bias: &[F], oc: usize) {
    assert!(oc > 0 && bias.len() == oc, "bias_forward: bias");
    assert_eq!(out.len() % oc, 0, "bias_forward: out");
    out.par_chunks_mut(ROW_BLOCK * oc).for_each(|rows| {
        for row in rows.chunks_exact_mut(oc) {
            for (o, &b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    });
}

/// `dbias += sum_n dout[n, :]`, the rows added one at a time in order, each sum rounded to f32
/// (the device's per-channel loop makes the same sums).
pub fn bias_backward<F: Real>(dbias: &mut [F], dout: &[F], oc: usize) {
    assert!(oc > 0 && dbias.len() == oc, "bias_backward: dbias");
    assert_eq!(dout.len() % oc, 0, "bias_backward: dout");
    for row in dout.chunks_exact(oc) {
        for (g, &d) in dbias.iter_mut().zip(row) {
            *g += d;
        }
    }
}

/// `dinp += dout W` and `dweight += dout^T inp`.
pub fn matmul_backward<F: Real>(
    dinp: &mut [F],
    dweight: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    ic: usize,
    oc: usize,
) {
    assert!(ic > 0 && oc > 0, "matmul_backward: empty weight");
    assert_eq!(weight.len(), oc * ic, "matmul_backward: weight");
    assert_eq!(dweight.len(), oc * ic, "matmul_backward: dweight");
    assert_eq!(inp.len() % ic, 0, "matmul_backward: inp");
    let n = inp.len() / ic;
    assert_eq!(dinp.len(), inp.len(), "matmul_backward: dinp");
    assert_eq!(dout.len(), n * oc, "matmul_backward: dout");
    // dinp: blocks of rows.
    dinp.par_chunks_mut(ROW_BLOCK * ic)
        .zip(dout.par_chunks(ROW_BLOCK * oc))
        .for_each(|(dx, dy)| {
            let rows = dy.len() / oc;
            // SAFETY: A = dy rows x oc (oc, 1), B = W oc x ic (ic, 1), C = dx rows x ic (ic, 1).
            unsafe {
                F::gemm(
                    rows,
                    oc,
                    ic,
                    F::ONE,
                    dy.as_ptr(),
                    oc as isize,
                    1,
                    weight.as_ptr(),
                    ic as isize,
                    1,
                    F::ONE,
                    dx.as_mut_ptr(),
                    ic as isize,
                    1,
                )
            }
        });
    // dweight: blocks of output channels, each summing over all N rows.
    dweight
        .par_chunks_mut(ROW_BLOCK * ic)
        .enumerate()
        .for_each(|(blk, dw)| {
            let o0 = blk * ROW_BLOCK;
            let rows = dw.len() / ic;
            // SAFETY: A = dout^T restricted to channels o0..o0+rows: element (i, r) is
            // dout[r * oc + o0 + i] (strides 1, oc), largest index (n-1)*oc + oc-1 < dout.len();
            // B = inp n x ic (ic, 1); C = dw rows x ic (ic, 1).
            unsafe {
                F::gemm(
                    rows,
                    n,
                    ic,
                    F::ONE,
                    dout.as_ptr().add(o0),
                    1,
                    oc as isize,
                    inp.as_ptr(),
                    ic as isize,
                    1,
                    F::ONE,
                    dw.as_mut_ptr(),
                    ic as isize,
                    1,
                )
            }
        });
}

// ---------------------------------------------------------------------------------------------
// rope

/// The RoPE tables `cos[t, i]`, `sin[t, i]` for positions `t < seq` and frequencies
/// `i < head_dim / 2`, each `[seq, head_dim / 2]`. The angle is formed exactly as Hugging Face
/// does, in f32: `inv_freq[i] = 1 / theta^((2i) / head_dim)` and `angle = f32(t) * inv_freq[i]`;
/// its cosine and sine are then taken in f64, so f32 and f64 models share one table.
pub fn rope_tables<F: Real>(seq: usize, head_dim: usize, theta: f64) -> (Vec<F>, Vec<F>) {
    assert!(head_dim.is_multiple_of(2), "rope_tables: odd head_dim");
    rope_tables_from(seq, &rope_inv_freq(head_dim, theta))
}

/// RoPE's `inv_freq[i] = 1 / theta^((2i) / head_dim)`, `i < head_dim / 2`, in f32 as Hugging
/// Face forms it.
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// [`rope_tables`] for given frequencies (e.g. [`crate::model::LlamaConfig::rope_inv_freq`],
/// rescaled for Llama 3): `angle = f32(t) * inv_freq[i]`, cosine and sine in f64.
pub fn rope_tables_from<F: Real>(seq: usize, inv_freq: &[f32]) -> (Vec<F>, Vec<F>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(seq * half);
    let mut sin = Vec::with_capacity(seq * half);
    for t in 0..seq {
        for &f in inv_freq {
            let angle = (t as f32 * f) as f64;
            cos.push(F::from_f64(angle.cos()));
            sin.push(F::from_f64(angle.sin()));
        }
    }
    (cos, sin)
}

/// Rotate-half RoPE in place (HF `apply_rotary_pos_emb`). x is `[N, heads, head_dim]`, row n is
/// position `n % seq`; with `h = head_dim / 2`, for i < h:
/// `y[i] = x[i] cos - x[i+h] sin`, `y[i+h] = x[i+h] cos + x[i] sin`.
pub fn rope_forward<F: Real>(
    x: &mut [F],
    cos: &[F],
    sin: &[F],
    seq: usize,
    heads: usize,
    head_dim: usize,
) {
    rope_rotate(x, cos, sin, seq, heads, head_dim, false);
}

/// The transposed (= inverse) rotation, in place: turns `dL/dy` into `dL/dx`. Not accumulating.
pub fn rope_backward<F: Real>(
    d: &mut [F],
    cos: &[F],
    sin: &[F],
    seq: usize,
    heads: usize,
    head_dim: usize,
) {
    rope_rotate(d, cos, sin, seq, heads, head_dim, true);
}

fn rope_rotate<F: Real>(
    x: &mut [F],
    cos: &[F],
    sin: &[F],
    seq: usize,
    heads: usize,
    head_dim: usize,
    inverse: bool,
) {
    let half = head_dim / 2;
    assert!(
        head_dim.is_multiple_of(2) && half > 0 && heads > 0,
        "rope: head_dim"
    );
    assert!(
        cos.len() >= seq * half && sin.len() >= seq * half,
        "rope: tables"
    );
    assert_eq!(x.len() % (seq * heads * head_dim), 0, "rope: x");
    x.par_chunks_mut(head_dim)
        .enumerate()
        .with_min_len(HEAD_BLOCK)
        .for_each(|(i, v)| {
            let t = (i / heads) % seq;
            let (c, s) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            let (lo, hi) = v.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (lo[j], hi[j]);
                let sn = if inverse { -s[j] } else { s[j] };
                lo[j] = a * c[j] - b * sn;
                hi[j] = b * c[j] + a * sn;
            }
        });
}

// ---------------------------------------------------------------------------------------------
// causal self-attention with grouped-query heads

pub use crate::shapes::AttnShape;

impl AttnShape {
    fn check(&self, q: usize, k: usize, v: usize, att: usize) {
        let rows = self.batch * self.seq;
        assert!(
            self.n_kv_heads > 0 && self.n_heads.is_multiple_of(self.n_kv_heads),
            "attention: heads"
        );
        assert_eq!(q, rows * self.n_heads * self.head_dim, "attention: q");
        assert_eq!(k, rows * self.n_kv_heads * self.head_dim, "attention: k");
        assert_eq!(v, k, "attention: v");
        assert_eq!(att, rows * self.n_heads * self.seq, "attention: att");
    }
}

/// A strided matrix view for [`gemm_acc`]: element (r, c) at `ptr + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct View<F> {
    ptr: *const F,
    rs: usize,
    cs: usize,
}

/// `c = alpha * a b + beta * c` with `a` m x k, `b` k x n, `c` m x n (strided views).
///
/// # Safety
/// Every element the views address must lie inside live buffers, and `c` must not alias `a` or
/// `b` nor be written by another thread meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_acc<F: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: F,
    a: View<F>,
    b: View<F>,
    beta: F,
    c: *mut F,
    rsc: usize,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        F::gemm(
            m,
            k,
            n,
            alpha,
            a.ptr,
            a.rs as isize,
            a.cs as isize,
            b.ptr,
            b.rs as isize,
            b.cs as isize,
            beta,
            c,
            rsc as isize,
            1,
        )
    }
}

/// Causal softmax attention. q and out `[B, T, NH, D]`, k and v `[B, T, NKV, D]`; `att` `[B, T, NH,
/// T]` receives the probabilities `softmax_j<=t(q_t . k_j / sqrt(D))` (zero for j > t), kept for the
/// backward. Parallel over sequences; per head, the scores and the output are two GEMMs
/// (`S = Q K^T / sqrt(D)`, `O = P V`) and the causal softmax runs row by row in between.
pub fn attention_forward<F: Real>(
    out: &mut [F],
    att: &mut [F],
    q: &[F],
    k: &[F],
    v: &[F],
    s: AttnShape,
) {
    s.check(q.len(), k.len(), v.len(), att.len());
    assert_eq!(out.len(), q.len(), "attention_forward: out");
    let AttnShape {
        seq: t_len,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        ..
    } = s;
    let rep = nh / nkv;
    let scale = F::from_f64(1.0 / (hd as f64).sqrt());
    let (q_seq, kv_seq, att_seq) = (t_len * nh * hd, t_len * nkv * hd, t_len * nh * t_len);
    out.par_chunks_mut(q_seq)
        .zip(att.par_chunks_mut(att_seq))
        .enumerate()
        .for_each(|(b, (o, a))| {
            let (qb, kb, vb) = (&q[b * q_seq..], &k[b * kv_seq..], &v[b * kv_seq..]);
            for h in 0..nh {
                let g = h / rep;
                let a_h = &mut a[h * t_len..];
                // SAFETY: Q_h is T x D at rows of stride NH*D inside this sequence's q, K_g^T is
                // D x T read from k (strides 1, NKV*D); S lands in this task's att rows (stride
                // NH*T); the largest offsets are (T-1)*NH*D + (NH-1)*D + D-1 < q_seq and
                // (T-1)*NH*T + (NH-1)*T + T-1 < att_seq.
                unsafe {
                    gemm_acc(
                        t_len,
                        hd,
                        t_len,
                        scale,
                        View {
                            ptr: qb.as_ptr().add(h * hd),
                            rs: nh * hd,
                            cs: 1,
                        },
                        View {
                            ptr: kb.as_ptr().add(g * hd),
                            rs: 1,
                            cs: nkv * hd,
                        },
                        F::ZERO,
                        a_h.as_mut_ptr(),
                        nh * t_len,
                    )
                };
                for t in 0..t_len {
                    causal_softmax_row(&mut a_h[t * nh * t_len..t * nh * t_len + t_len], t);
                }
            }
            for h in 0..nh {
                let g = h / rep;
                // SAFETY: P_h is T x T at rows of stride NH*T in this task's att, V_g is T x D
                // (stride NKV*D) in v, O_h is T x D (stride NH*D) in this task's out.
                unsafe {
                    gemm_acc(
                        t_len,
                        t_len,
                        hd,
                        F::ONE,
                        View {
                            ptr: a.as_ptr().add(h * t_len),
                            rs: nh * t_len,
                            cs: 1,
                        },
                        View {
                            ptr: vb.as_ptr().add(g * hd),
                            rs: nkv * hd,
                            cs: 1,
                        },
                        F::ZERO,
                        o.as_mut_ptr().add(h * hd),
                        nh * hd,
                    )
                };
            }
        });
}

/// Scores of positions `0..=t` to probabilities, later positions to exact zeros.
fn causal_softmax_row<F: Real>(row: &mut [F], t: usize) {
    let (live, masked) = row.split_at_mut(t + 1);
    let max = live.iter().fold(
        F::from_f64(f64::NEG_INFINITY),
        |m, &x| if x > m { x } else { m },
    );
    for x in live.iter_mut() {
        *x = (*x - max).exp();
    }
    let sum = live.iter().fold(F::ZERO, |acc, &x| acc + x);
    let inv = F::ONE / sum;
    for x in live.iter_mut() {
        *x *= inv;
    }
    masked.fill(F::ZERO);
}

/// Backward of [`attention_forward`]: `dq`, `dk`, `dv` accumulate; `dpreatt` `[B, T, NH, T]` is
/// scratch, overwritten with the gradient of the pre-softmax scores. Parallel over sequences; per
/// head five GEMMs: `dP = dO V^T`, then `dS = P (dP - rowsum(P dP))` row by row, `dQ += dS K / sqrt(D)`,
/// `dK += dS^T Q / sqrt(D)`, `dV += P^T dO`; the heads of a group add into their key/value head in
/// head order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Real>(
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    dpreatt: &mut [F],
    dout: &[F],
    q: &[F],
    k: &[F],
    v: &[F],
    att: &[F],
    s: AttnShape,
) {
    s.check(q.len(), k.len(), v.len(), att.len());
    assert_eq!(dq.len(), q.len(), "attention_backward: dq");
    assert_eq!(dout.len(), q.len(), "attention_backward: dout");
    assert_eq!(dk.len(), k.len(), "attention_backward: dk");
    assert_eq!(dv.len(), v.len(), "attention_backward: dv");
    assert_eq!(dpreatt.len(), att.len(), "attention_backward: dpreatt");
    let AttnShape {
        seq: t_len,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        ..
    } = s;
    let rep = nh / nkv;
    let scale = F::from_f64(1.0 / (hd as f64).sqrt());
    let (q_seq, kv_seq, att_seq) = (t_len * nh * hd, t_len * nkv * hd, t_len * nh * t_len);
    dq.par_chunks_mut(q_seq)
        .zip(dk.par_chunks_mut(kv_seq).zip(dv.par_chunks_mut(kv_seq)))
        .zip(dpreatt.par_chunks_mut(att_seq))
        .enumerate()
        .for_each(|(b, ((dqb, (dkb, dvb)), ds))| {
            let (qb, kb, vb) = (&q[b * q_seq..], &k[b * kv_seq..], &v[b * kv_seq..]);
            let (dob, pb) = (&dout[b * q_seq..], &att[b * att_seq..]);
            for h in 0..nh {
                let g = h / rep;
                let (q_h, kv_g, p_h) = (h * hd, g * hd, h * t_len);
                let row = |ptr: *const F, at: usize, rs: usize| View {
                    // SAFETY (of the pointer arithmetic): `at` is inside the sequence's block.
                    ptr: unsafe { ptr.add(at) },
                    rs,
                    cs: 1,
                };
                let col = |ptr: *const F, at: usize, cs: usize| View {
                    // SAFETY: as above.
                    ptr: unsafe { ptr.add(at) },
                    rs: 1,
                    cs,
                };
                // SAFETY (all five GEMMs): every view addresses T x D or T x T elements of this
                // sequence's blocks with the strides of their layouts (NH*D for q, dout, dq; NKV*D
                // for k, v, dk, dv; NH*T for att, dpreatt), as in the forward; the outputs are
                // this task's chunks and never alias an input.
                unsafe {
                    // dP = dO_h V_g^T into dpreatt.
                    gemm_acc(
                        t_len,
                        hd,
                        t_len,
                        F::ONE,
                        row(dob.as_ptr(), q_h, nh * hd),
                        col(vb.as_ptr(), kv_g, nkv * hd),
                        F::ZERO,
                        ds.as_mut_ptr().add(p_h),
                        nh * t_len,
                    );
                }
                for t in 0..t_len {
                    let at = t * nh * t_len + p_h;
                    let p = &pb[at..at + t_len];
                    let d = &mut ds[at..at + t_len];
                    let pd = dot(&p[..=t], &d[..=t]);
                    for (dj, &pj) in d[..=t].iter_mut().zip(&p[..=t]) {
                        *dj = pj * (*dj - pd);
                    }
                    d[t + 1..].fill(F::ZERO);
                }
                unsafe {
                    // dQ_h += scale dS K_g
                    gemm_acc(
                        t_len,
                        t_len,
                        hd,
                        scale,
                        row(ds.as_ptr(), p_h, nh * t_len),
                        row(kb.as_ptr(), kv_g, nkv * hd),
                        F::ONE,
                        dqb.as_mut_ptr().add(q_h),
                        nh * hd,
                    );
                    // dK_g += scale dS^T Q_h
                    gemm_acc(
                        t_len,
                        t_len,
                        hd,
                        scale,
                        col(ds.as_ptr(), p_h, nh * t_len),
                        row(qb.as_ptr(), q_h, nh * hd),
                        F::ONE,
                        dkb.as_mut_ptr().add(kv_g),
                        nkv * hd,
                    );
                    // dV_g += P_h^T dO_h
                    gemm_acc(
                        t_len,
                        t_len,
                        hd,
                        F::ONE,
                        col(pb.as_ptr(), p_h, nh * t_len),
                        row(dob.as_ptr(), q_h, nh * hd),
                        F::ONE,
                        dvb.as_mut_ptr().add(kv_g),
                        nkv * hd,
                    );
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

fn sigmoid<F: Real>(x: F) -> F {
    F::ONE / (F::ONE + (-x).exp())
}

/// `out = silu(gate) * up`, `silu(x) = x * sigmoid(x)` (the inside of HF `LlamaMLP`,
/// `down_proj(act_fn(gate_proj(x)) * up_proj(x))`). All `[N, I]`.
pub fn swiglu_forward<F: Real>(out: &mut [F], gate: &[F], up: &[F]) {
    assert_eq!(gate.len(), out.len(), "swiglu_forward: gate");
    assert_eq!(up.len(), out.len(), "swiglu_forward: up");
    out.par_chunks_mut(ELEM_BLOCK)
        .zip(gate.par_chunks(ELEM_BLOCK).zip(up.par_chunks(ELEM_BLOCK)))
        .for_each(|(o, (g, u))| {
            for ((oi, &gi), &ui) in o.iter_mut().zip(g).zip(u) {
                *oi = gi * sigmoid(gi) * ui;
            }
        });
}

/// `dgate += dout * up * silu'(gate)` with `silu'(x) = s (1 + x (1 - s))`, `s = sigmoid(x)`;
/// `dup += dout * silu(gate)`.
pub fn swiglu_backward<F: Real>(dgate: &mut [F], dup: &mut [F], dout: &[F], gate: &[F], up: &[F]) {
    let n = dout.len();
    assert!(
        dgate.len() == n && dup.len() == n && gate.len() == n && up.len() == n,
        "swiglu_backward: lengths"
    );
    let blk = ELEM_BLOCK;
    dgate
        .par_chunks_mut(blk)
        .zip(dup.par_chunks_mut(blk))
        .zip(
            dout.par_chunks(blk)
                .zip(gate.par_chunks(blk).zip(up.par_chunks(blk))),
        )
        .for_each(|((dg, du), (d, (g, u)))| {
            for i in 0..d.len() {
                let s = sigmoid(g[i]);
                dg[i] += d[i] * u[i] * s * (F::ONE + g[i] * (F::ONE - s));
                du[i] += d[i] * g[i] * s;
            }
        });
}

// ---------------------------------------------------------------------------------------------
// residual

/// `out = a + b`.
pub fn residual_forward<F: Real>(out: &mut [F], a: &[F], b: &[F]) {
    assert!(
        a.len() == out.len() && b.len() == out.len(),
        "residual_forward: lengths"
    );
    out.par_chunks_mut(ELEM_BLOCK)
        .zip(a.par_chunks(ELEM_BLOCK).zip(b.par_chunks(ELEM_BLOCK)))
        .for_each(|(o, (a, b))| {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = x + y;
            }
        });
}

/// `da += dout`, `db += dout`.
pub fn residual_backward<F: Real>(da: &mut [F], db: &mut [F], dout: &[F]) {
    assert!(
        da.len() == dout.len() && db.len() == dout.len(),
        "residual_backward: lengths"
    );
    for ((x, y), &d) in da.iter_mut().zip(db.iter_mut()).zip(dout) {
        *x += d;
        *y += d;
    }
}
