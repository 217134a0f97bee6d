//! The fused distillation loss of one row (DESIGN section 4): the algorithm of
//! kernels/kd_loss.cu, run by one thread over a row in chunks of [`CHUNK`] entries.
//!
//! - Pass 1 reads student and teacher once. Per chunk: widen to f32 (f16/bf16 are converted on the
//!   fly into a stack buffer), take the chunk maxima, raise the row's running maxima (rescaling
//!   the sums gathered so far), then add the chunk's `exp((x - max) / T)` sums relative to the
//!   running maxima: `z_s`, `z_t`, `z_1` (student at T = 1, for the cross-entropy) and the KL
//!   itself, `sd = sum exp(tc) (tc - sc)` (forward) or `sum exp(sc) (sc - tc)` (reverse) with
//!   `sc = (s - m_s) / T`, `tc = (t - m_t) / T`, shifted when a maximum moves: then
//!   `KL_f = sd / z_t - log z_t + log z_s` and `KL_r = sd / z_s - log z_s + log z_t` from centered
//!   quantities only. The next chunk is prefetched meanwhile.
//! - Pass 2 writes the gradient. Forward and reverse KL read only the scratch below (from L2/L3;
//!   the inputs are not read again unless the cross-entropy needs `exp(s - m)` of its own).
//!   JSD reads the inputs again, forms every log-probability `(x - max) / T - log z` and the
//!   mixture, and sums its two KL terms.
//! - JSD's gradient needs `sum_k p_s(k) (log p_s(k) - log m(k))`, known only after a whole pass,
//!   so JSD with a gradient makes a third pass, over the scratch below only: pass 2 leaves there
//!   the gradient without that mean term, pass 3 subtracts `a (1 - beta) KL(p_s || m) p_s`.
//!
//! Exponentials are most of the work, so none is computed twice. Pass 1 keeps each entry's
//! `exp((x - m_c) / T)`, taken relative to the running maximum `m_c` of its chunk, in a per-thread
//! scratch of O(V) floats (the row's "softmax numerators"; 1 MiB at V = 128k, in L2/L3, never
//! N x V); pass 2 turns them into probabilities with one multiply by the chunk's factor
//! `exp((m_c - m) / T) / z`. Reverse KL needs no teacher probability there: its teacher slot
//! keeps each entry's log ratio `sc - tc` instead. JSD's pass 2 leaves its partial gradient in
//! the teacher's slot. And at
//! the usual distillation temperatures T = 1, 2, 3, 4 the cross-entropy's `exp(s - m)` is the
//! T-th power of `exp((s - m) / T)` ([`HardMode::Pow`]): `z_1 = sum e^T` in pass 1 and
//! `softmax(s) = (p_s c)^T` with `c = z_s / z_1^(1/T)` in pass 2. So forward and reverse KL with
//! the cross-entropy take two exponentials per entry, JSD two and one logarithm: its mixture
//! `m = beta p_t + (1 - beta) p_s` is formed from the probabilities pass 2 has anyway (one
//! multiply-add), and only `log2 m` is taken (see [`Consts::log_mixture`]). The power is
//! as accurate as the exponential it replaces (its argument `s - m` has the same rounding), and
//! the base `p_s c` is scaled so that the power underflows only where `softmax(s)` itself does.
//!
//! Terms whose weight is 0 are skipped (alpha = 0 never reads the teacher, the cross-entropy runs
//! only when alpha < 1); `0 * log 0 = 0` and `+inf` for a positive weight against a zero
//! probability are selects on the log-probabilities, NaN propagates through the sums.

use super::fastmath::{exp, exp2_nonpositive as exp2, log2, log2_normal, MulAdd};
use super::simd::{self, Kernel, MaxSum, CHUNK, W};
use super::{narrow_into, widen};
use crate::dtype::{HostSlice, HostSliceMut};
use std::f32::consts::{LN_2, LOG2_E};

const NEG_INF: f32 = f32::NEG_INFINITY;
const INF: f32 = f32::INFINITY;

/// The soft loss, `Off` when its weight is 0 (alpha = 0: the teacher is not read).
#[derive(Clone, Copy, Debug)]
pub(super) enum Soft {
    Off,
    ForwardKl,
    ReverseKl,
    Jsd { beta: f32 },
}

/// Row-independent parameters of the fused loss.
#[derive(Clone, Copy, Debug)]
pub(super) struct KdParams {
    pub inv_t: f32,
    /// `log2 e / T`: exponentials are `2^((x - max) * scale2)`, log-probabilities kept in base 2.
    pub scale2: f32,
    pub soft: Soft,
    /// alpha (times T^2 with scaling on); used when `soft` is not `Off`.
    pub soft_weight: f32,
    /// 1 - alpha; 0 when the hard loss is off.
    pub hard_weight: f32,
    /// The upstream gradient divided by D.
    pub grad_scale: f32,
    /// How the cross-entropy's exponentials are obtained (when it is on).
    pub hard_mode: HardMode,
}

/// How the cross-entropy's sums `z_1 = sum exp(s - m)` and probabilities `softmax(s)` are
/// computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum HardMode {
    /// Exponentials of their own (kept in the scratch when the soft loss is off).
    Exp,
    /// `exp(s - m) = exp((s - m) / T)^n` with `T = n`, an integer in 1..=4, and the soft loss on.
    Pow(u32),
}

impl HardMode {
    /// `Pow(T)` when the soft loss is on and T is 1, 2, 3 or 4; `Exp` otherwise.
    pub fn for_temperature(temperature: f32, soft: bool) -> HardMode {
        if soft && temperature.fract() == 0.0 && (1.0..=4.0).contains(&temperature) {
            HardMode::Pow(temperature as u32)
        } else {
            HardMode::Exp
        }
    }
}

/// `e^N` for N in 1..=4 (by multiplication).
#[inline(always)]
fn pow<const N: u32>(e: f32) -> f32 {
    match N {
        2 => e * e,
        3 => e * e * e,
        4 => {
            let e2 = e * e;
            e2 * e2
        }
        _ => e,
    }
}

/// Runs `$body` with `$N` a `const u32` equal to `$n` (in 0..=5).
macro_rules! with_const {
    ($n:expr, $N:ident, $body:expr) => {
        match $n {
            0 => {
                const $N: u32 = 0;
                $body
            }
            1 => {
                const $N: u32 = 1;
                $body
            }
            2 => {
                const $N: u32 = 2;
                $body
            }
            3 => {
                const $N: u32 = 3;
                $body
            }
            4 => {
                const $N: u32 = 4;
                $body
            }
            _ => {
                const $N: u32 = 5;
                $body
            }
        }
    };
}

/// Floats of scratch one row of `vocab` entries needs (see [`Scratch`]).
pub(super) fn scratch_len(vocab: usize) -> usize {
    let chunks = vocab.div_ceil(CHUNK);
    2 * chunks * CHUNK + 2 * chunks
}

/// A thread's scratch for one row: per chunk `c`, the student's and the teacher's exponentials
/// (CHUNK slots each, padded) and the running maxima they are relative to.
struct Scratch<'a> {
    es: &'a mut [f32],
    et: &'a mut [f32],
    ms: &'a mut [f32],
    mt: &'a mut [f32],
}

impl<'a> Scratch<'a> {
    fn new(buf: &'a mut [f32], vocab: usize) -> Scratch<'a> {
        let chunks = vocab.div_ceil(CHUNK);
        let (es, rest) = buf.split_at_mut(chunks * CHUNK);
        let (et, rest) = rest.split_at_mut(chunks * CHUNK);
        let (ms, rest) = rest.split_at_mut(chunks);
        Scratch {
            es,
            et,
            ms,
            mt: &mut rest[..chunks],
        }
    }
}

/// The `CHUNK` slots of chunk `c`.
#[inline(always)]
fn slot(v: &mut [f32], c: usize) -> &mut [f32] {
    &mut v[c * CHUNK..(c + 1) * CHUNK]
}

/// One valid row of the fused loss: returns the row's weighted loss (soft and hard), writes
/// `grad_scale * d loss / d s` into `grad` when given.
pub(super) struct KdRow<'a> {
    pub p: &'a KdParams,
    pub s: HostSlice<'a>,
    pub t: HostSlice<'a>,
    /// The row's label; `None` when the hard loss is off.
    pub label: Option<usize>,
    pub grad: Option<HostSliceMut<'a>>,
    /// At least [`scratch_len`] floats.
    pub scratch: &'a mut [f32],
}

impl Kernel for KdRow<'_> {
    type Output = f32;
    #[inline(always)]
    fn run<M: MulAdd>(self) -> f32 {
        kd_row::<M>(self)
    }
}

mod pass1;
mod pass2;

use pass1::pass1;
use pass2::*;

// ---------------------------------------------------------------------------------------------
// The row.

#[inline(always)]
fn kd_row<M: MulAdd>(row: KdRow) -> f32 {
    let KdRow {
        p,
        s,
        t,
        label,
        mut grad,
        scratch,
    } = row;
    let mut sc = Scratch::new(scratch, s.len());
    let hard = p.hard_weight > 0.0 && label.is_some();
    let soft = !matches!(p.soft, Soft::Off);
    let st = pass1::<M>(p, hard, s, t, &mut sc);

    let (beta, one_minus_beta) = match p.soft {
        Soft::Jsd { beta } => (beta, 1.0 - beta),
        _ => (0.0, 0.0),
    };
    let log_zs = log2::<M>(st.zs);
    let log_zt = log2::<M>(st.t.z);
    let log_z1 = log2::<M>(st.z1);
    let c = match p.hard_mode {
        // At T = 1, z1 is z_s: c = exp(0) = 1 exactly.
        HardMode::Pow(n) if hard => exp::<M>((log_zs - log_z1 / n as f32) * LN_2),
        _ => 0.0,
    };
    // Forward or reverse KL of the row in base-2 units, from pass 1's `sd` weighted by the
    // teacher's (forward) or the student's (reverse) exponentials. NaN in either input, or a side
    // without a finite logit (no distribution: z = 0), gives NaN, even with a hole.
    let kl = |z_w: f32, log_zw: f32, log_zo: f32| {
        if !(st.zs > 0.0 && st.t.z > 0.0) {
            f32::NAN
        } else if st.hole {
            INF
        } else {
            st.sd / z_w - log_zw + log_zo
        }
    };
    let kl = match p.soft {
        Soft::ForwardKl => kl(st.t.z, log_zt, log_zs),
        Soft::ReverseKl => kl(st.zs, log_zs, log_zt),
        _ => 0.0,
    };
    let a = p.grad_scale * p.soft_weight * p.inv_t;
    let mut c = Consts {
        ms: st.ms,
        mt: st.t.m,
        scale2: p.scale2,
        log_zs,
        log_zt,
        log_z1,
        a,
        a2: a * LN_2,
        b: p.grad_scale * p.hard_weight,
        c,
        beta,
        one_minus_beta,
        aj: a * LN_2 * one_minus_beta,
        ajk: 0.0,
    };
    // The chunk maxima become the factors exp((m_c - m) / T) / z (at T = 1 for the
    // cross-entropy alone) that turn the kept exponentials into probabilities.
    // (Plain loops over the chunks, vectorized.)
    if let Soft::ReverseKl = p.soft {
        // The teacher's chunk maxima become reverse KL's chunk offsets (see [`ReverseKl`]).
        let off = log_zt - log_zs - kl;
        for (f, &m_s) in sc.mt.iter_mut().zip(sc.ms.iter()) {
            *f = M::mul_add(m_s - st.ms, p.scale2, off) - (*f - st.t.m) * p.scale2;
        }
    }
    if soft {
        for f in sc.ms.iter_mut() {
            *f = exp2::<M>((*f - st.ms) * p.scale2) / st.zs;
        }
    }
    if soft && !matches!(p.soft, Soft::ReverseKl) {
        for f in sc.mt.iter_mut() {
            *f = exp2::<M>((*f - st.t.m) * p.scale2) / st.t.z;
        }
    }
    if !soft {
        for f in sc.ms.iter_mut() {
            *f = exp2::<M>((*f - st.ms) * LOG2_E) / st.z1;
        }
    }

    // The cross-entropy's gradient, as the const parameter Q of the entries (0: none; the loss
    // alone never needs it).
    let q = match (hard && grad.is_some(), p.hard_mode) {
        (false, _) => 0,
        (true, HardMode::Exp) => 1,
        (true, HardMode::Pow(n)) => n + 1,
    };
    let g_label = if q > 0 { label } else { None };
    let both = Inputs { s, t };
    let g = grad.as_mut();
    let soft_loss = match p.soft {
        Soft::Off => {
            if let Some(g) = g {
                let label = if hard { label } else { None };
                row_pass::<M, _>(HardOnly, &c, both, &mut sc, label, Some(g));
            }
            0.0
        }
        // Forward and reverse KL take their loss from pass 1; pass 2 only writes the gradient.
        Soft::ForwardKl => {
            if let Some(g) = g {
                with_const!(q, Q, {
                    row_pass::<M, _>(ForwardKl::<Q>, &c, both, &mut sc, g_label, Some(g))
                });
            }
            kl
        }
        Soft::ReverseKl => {
            if let Some(g) = g {
                with_const!(q, Q, {
                    row_pass::<M, _>(ReverseKl::<Q>, &c, both, &mut sc, g_label, Some(g))
                });
            }
            kl
        }
        Soft::Jsd { .. } => {
            let [kl_t_m, kl_s_m] = match g {
                Some(g) => {
                    let [kl_t_m, kl_s_m] = with_const!(q, Q, {
                        row_pass::<M, _>(JsdLoss::<true, Q>, &c, both, &mut sc, g_label, None)
                    });
                    c.ajk = -c.aj * kl_s_m;
                    jsd_grad::<M>(&c, &sc, s.len(), g);
                    [kl_t_m, kl_s_m]
                }
                None => row_pass::<M, _>(JsdLoss::<false, 0>, &c, both, &mut sc, None, None),
            };
            beta * kl_t_m + one_minus_beta * kl_s_m
        }
    };

    let mut loss = 0.0;
    if soft {
        // The terms were summed in base-2 units.
        loss += p.soft_weight * (soft_loss * LN_2);
    }
    if let (true, Some(y)) = (hard, label) {
        let sy = s.get_f32(y);
        loss += p.hard_weight * -((sy - st.ms) - c.log_z1 * LN_2);
    }
    loss
}
