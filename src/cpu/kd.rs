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

// ---------------------------------------------------------------------------------------------
// Pass 1.

/// The row statistics of pass 1 (exponentials are computed as `2^(d log2 e / T)`).
struct Stats {
    /// Raw maximum of the student logits (`max(s / T) = max(s) / T`).
    ms: f32,
    /// `sum exp((s - ms) / T)` (soft loss on).
    zs: f32,
    /// `sum exp(s - ms)` (hard loss on).
    z1: f32,
    t: MaxSum,
    /// Forward KL: `sum exp(tc) (tc - sc)`; reverse KL: `sum exp(sc) (sc - tc)` (see the module
    /// documentation), with `sc`, `tc` in base-2 units (`(s - ms) log2 e / T`).
    sd: f32,
    /// A positive probability of the KL's weighting side against a `-inf` of the other side (the
    /// KL is `+inf`): a teacher entry against a student `-inf` (forward), or the reverse.
    hole: bool,
}

#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

#[inline(always)]
fn pass1<M: MulAdd>(
    p: &KdParams,
    hard: bool,
    s: HostSlice,
    t: HostSlice,
    sc: &mut Scratch,
) -> Stats {
    let s2 = p.scale2;
    let soft = !matches!(p.soft, Soft::Off);
    let forward = matches!(p.soft, Soft::ForwardKl);
    let reverse = matches!(p.soft, Soft::ReverseKl);
    // What the student's chunk sums add to z1 (see `z1_term`): nothing (no hard loss, or T = 1
    // where z1 is z_s), its own exponentials (1), or powers of the soft ones (2..=4).
    let z1_mode = match (hard, p.hard_mode) {
        (false, _) | (true, HardMode::Pow(1)) => 0,
        (true, HardMode::Exp) => 1,
        (true, HardMode::Pow(n)) => n,
    };
    let mut st = Stats {
        ms: NEG_INF,
        zs: 0.0,
        z1: 0.0,
        t: MaxSum::EMPTY,
        sd: 0.0,
        hole: false,
    };
    let (mut bs, mut bt) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
    let (mut tmp, mut terms, mut et_tmp) = ([0.0f32; CHUNK], [0.0f32; CHUNK], [0.0f32; CHUNK]);
    let n = s.len();
    for c in 0..n.div_ceil(CHUNK) {
        let range = c * CHUNK..((c + 1) * CHUNK).min(n);
        let next = range.end..range.end + CHUNK;
        simd::prefetch(s, next.clone());
        if soft {
            simd::prefetch(t, next);
        }
        let xs = widen(s, range.clone(), &mut bs, NEG_INF);
        let ms = larger(st.ms, simd::max(xs));
        let ys: &[f32] = if soft {
            widen(t, range, &mut bt, NEG_INF)
        } else {
            &[]
        };
        if soft {
            let mt = larger(st.t.m, simd::max(ys));
            if reverse && st.zs != 0.0 && (ms > st.ms || mt > st.t.m) {
                // Every recorded sc - tc moves by -shift, every weight exp(sc) by exp(ms' - ms).
                let shift = ((ms - st.ms) - (mt - st.t.m)) * s2;
                st.sd = (st.sd - shift * st.zs) * exp2::<M>((st.ms - ms) * s2);
            }
            if forward && st.t.z != 0.0 && (ms > st.ms || mt > st.t.m) {
                // Every recorded tc - sc moves by -shift, every weight exp(tc) by exp(mt' - mt).
                let shift = ((mt - st.t.m) - (ms - st.ms)) * s2;
                st.sd = (st.sd - shift * st.t.z) * exp2::<M>((st.t.m - mt) * s2);
            }
            st.t.raise::<M>(mt, s2);
            // Reverse KL's pass 2 needs no teacher probability: its slot keeps log ratios.
            let et = if reverse {
                &mut et_tmp[..]
            } else {
                slot(sc.et, c)
            };
            st.t.add::<M>(ys, s2, et);
            sc.mt[c] = st.t.m;
        }
        if ms > st.ms {
            // The same arithmetic as MaxSum::raise, so identical inputs give identical sums.
            st.zs *= exp2::<M>((st.ms - ms) * s2);
            st.z1 *= exp2::<M>((st.ms - ms) * LOG2_E);
            st.ms = ms;
        }
        sc.ms[c] = st.ms;
        let es = slot(sc.es, c);
        if st.ms == NEG_INF {
            if simd::has_nan(xs) {
                (st.zs, st.z1) = (f32::NAN, f32::NAN);
            }
            // Only -inf so far: a teacher entry above -inf is a forward-KL hole, and reverse
            // KL's log ratios are -inf (zero gradient).
            if forward && ys.iter().any(|&y| y > NEG_INF) {
                st.hole = true;
            }
            if reverse {
                slot(sc.et, c).fill(NEG_INF);
            }
            es.fill(0.0);
            continue;
        }
        if reverse {
            let d = slot(sc.et, c);
            let c = with_const!(z1_mode, Z1, {
                rkl_sums::<M, Z1>(xs, ys, st.ms, st.t.m, s2, es, d, &mut tmp, &mut terms)
            });
            st.zs += c.z;
            st.z1 += c.z1;
            st.sd += c.sd;
            st.hole |= c.hole;
        } else if forward {
            let (z, z1) = with_const!(z1_mode, Z1, exp_sums::<M, Z1>(xs, st.ms, s2, es, &mut tmp));
            st.zs += z;
            st.z1 += z1;
            let (sd, hole) = fkl_sums(xs, ys, slot(sc.et, c), st.ms, st.t.m, s2, &mut terms);
            st.sd += sd;
            st.hole |= hole;
        } else if soft {
            let (z, z1) = with_const!(z1_mode, Z1, exp_sums::<M, Z1>(xs, st.ms, s2, es, &mut tmp));
            st.zs += z;
            st.z1 += z1;
        } else {
            // The cross-entropy alone: its exponentials go to the scratch.
            st.z1 += simd::exp2_sum::<M>(xs, st.ms, LOG2_E, es);
        }
    }
    if hard && z1_mode == 0 {
        st.z1 = st.zs;
    }
    st
}

/// Writes `e = 2^((x - m) * scale2)` of every entry of `xs` to `out` and returns `(sum e, z1)`,
/// z1 being (`Z1 = 0`) nothing, (`1`) `sum exp(x - m)` (its own exponentials, through `tmp`)
/// or (`2..=4`) `sum e^Z1` (see [`HardMode`]). Student and teacher take this same code, so
/// identical inputs give identical sums.
#[inline(always)]
fn exp_sums<M: MulAdd, const Z1: u32>(
    xs: &[f32],
    m: f32,
    scale2: f32,
    out: &mut [f32],
    tmp: &mut [f32; CHUNK],
) -> (f32, f32) {
    let z = simd::exp2_sum::<M>(xs, m, scale2, out);
    let z1 = match Z1 {
        0 => 0.0,
        1 => simd::exp2_sum::<M>(xs, m, LOG2_E, tmp),
        2 => simd::sum_pow::<2>(&out[..xs.len()]),
        3 => simd::sum_pow::<3>(&out[..xs.len()]),
        _ => simd::sum_pow::<4>(&out[..xs.len()]),
    };
    (z, z1)
}

struct RklSums {
    z: f32,
    z1: f32,
    sd: f32,
    hole: bool,
}

/// Pass-1 sums of reverse KL over one chunk, relative to the running maxima `ms`, `mt`: `z_s` and
/// z1 as in [`exp_sums`] (the student's exponentials go to `out`), `sd`, and whether a student
/// entry meets a teacher `-inf`. Each entry's log ratio `sc - tc` goes to `d` (`-inf` for a
/// student `-inf`, whose gradient is 0) for pass 2, which adds the chunk's offset.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rkl_sums<M: MulAdd, const Z1: u32>(
    xs: &[f32],
    ys: &[f32],
    ms: f32,
    mt: f32,
    s2: f32,
    out: &mut [f32],
    d: &mut [f32],
    tmp: &mut [f32; CHUNK],
    terms: &mut [f32; CHUNK],
) -> RklSums {
    let n = xs.len();
    let (ys, out, d, terms) = (&ys[..n], &mut out[..n], &mut d[..n], &mut terms[..n]);
    let mut hole = 0u32;
    for j in 0..n {
        let (x, y) = (xs[j], ys[j]);
        let sc = (x - ms) * s2;
        let e = exp2::<M>(sc);
        out[j] = e;
        let ratio = sc - (y - mt) * s2;
        // A select through the bits: written as an `if`, LLVM stores each side with a masked
        // store (`vmaskmovps`), which is microcoded and slow on AMD.
        let masked = ((x == NEG_INF) as u32).wrapping_neg();
        d[j] = f32::from_bits((ratio.to_bits() & !masked) | (NEG_INF.to_bits() & masked));
        let term = e * ratio;
        // A zero student probability contributes 0; a teacher zero makes the row +inf.
        let skip = x == NEG_INF || y == NEG_INF;
        terms[j] = if skip { 0.0 } else { term };
        hole |= (x > NEG_INF && y == NEG_INF) as u32;
    }
    let z = simd::sum(out);
    let z1 = match Z1 {
        0 => 0.0,
        1 => simd::exp2_sum::<M>(xs, ms, LOG2_E, tmp),
        2 => simd::sum_pow::<2>(out),
        3 => simd::sum_pow::<3>(out),
        _ => simd::sum_pow::<4>(out),
    };
    RklSums {
        z,
        z1,
        sd: simd::sum(terms),
        hole: hole != 0,
    }
}

/// Pass-1 sum of forward KL over one chunk, relative to the running maxima `ms`, `mt`:
/// `sum et (tc - sc)` over the teacher's exponentials `et`, and whether a teacher entry above
/// `-inf` meets a student `-inf`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fkl_sums(
    xs: &[f32],
    ys: &[f32],
    et: &[f32],
    ms: f32,
    mt: f32,
    s2: f32,
    terms: &mut [f32; CHUNK],
) -> (f32, bool) {
    let n = xs.len();
    let (ys, et, terms) = (&ys[..n], &et[..n], &mut terms[..n]);
    let mut hole = 0u32;
    for j in 0..n {
        let (x, y) = (xs[j], ys[j]);
        let term = et[j] * ((y - mt) * s2 - (x - ms) * s2);
        // A zero teacher probability contributes 0; a student zero makes the row +inf.
        let skip = x == NEG_INF || y == NEG_INF;
        terms[j] = if skip { 0.0 } else { term };
        hole |= (x == NEG_INF && y > NEG_INF) as u32;
    }
    (simd::sum(terms), hole != 0)
}

// ---------------------------------------------------------------------------------------------
// Pass 2 (and 3): per-entry terms.

/// Everything pass 2 needs, per row. Logarithms are in base 2 (`log2 p = ln p / ln 2`): the
/// loss terms are summed in base-2 units and the row's sum converted once.
#[derive(Clone, Copy)]
struct Consts {
    ms: f32,
    mt: f32,
    /// `log2 e / T`.
    scale2: f32,
    /// `log2 z_s`, `log2 z_t`, `log2 z_1`.
    log_zs: f32,
    log_zt: f32,
    log_z1: f32,
    /// `grad_scale * soft_weight / T`: the soft part's factor (d a / d s = 1 / T).
    a: f32,
    /// `a ln 2`: the factor of gradients written with base-2 log-probabilities.
    a2: f32,
    /// `grad_scale * hard_weight`.
    b: f32,
    /// [`HardMode::Pow`]: `softmax(s) = (p_s c)^T`, `c = exp(log z_s - log z_1 / T)`.
    c: f32,
    beta: f32,
    one_minus_beta: f32,
    /// JSD: `a2 (1 - beta)`, the factor of the gradient's `p_s (log2 p_s - log2 m)`.
    aj: f32,
    /// JSD: `-aj sum_k p_s(k) (log2 p_s(k) - log2 m(k))`, the factor of the gradient's `p_s`
    /// (known after pass 2).
    ajk: f32,
}

/// Per chunk: the factors that turn the scratch's exponentials into probabilities,
/// `exp((m_c - m) / T) / z` (or at T = 1 for the cross-entropy alone); after pass 1 they replace
/// the chunk maxima in the scratch. Reverse KL has no teacher probabilities: `ft` is the offset
/// that turns the chunk's kept log ratios into `log2 p_s - log2 p_t - KL_r` (see
/// [`ReverseKl`]).
#[derive(Clone, Copy)]
struct ChunkFactors {
    fs: f32,
    ft: f32,
}

impl Consts {
    /// `log2 p_s = (s - m_s) log2 e / T - log2 z_s`, centered before scaling.
    #[inline(always)]
    fn log_ps<M: MulAdd>(&self, x: f32) -> f32 {
        M::mul_add(x - self.ms, self.scale2, -self.log_zs)
    }

    #[inline(always)]
    fn log_pt<M: MulAdd>(&self, y: f32) -> f32 {
        M::mul_add(y - self.mt, self.scale2, -self.log_zt)
    }

    /// The cross-entropy's gradient `b (softmax(s) - onehot)` at the entry with student logit
    /// `x` and soft probability `ps`: `Q = 1` from an exponential of its own
    /// ([`HardMode::Exp`]), `Q = n + 1` as `(ps c)^n` ([`HardMode::Pow`]).
    #[inline(always)]
    fn hard_grad<M: MulAdd, const Q: u32>(&self, x: f32, ps: f32, onehot: f32) -> f32 {
        let q = match Q {
            1 => exp2::<M>(M::mul_add(x - self.ms, LOG2_E, -self.log_z1)),
            2 => ps * self.c,
            3 => pow::<2>(ps * self.c),
            4 => pow::<3>(ps * self.c),
            _ => pow::<4>(ps * self.c),
        };
        self.b * (q - onehot)
    }

    /// `log2 m = log2(beta p_t + (1 - beta) p_s)` from the probabilities themselves: one
    /// multiply-add and one logarithm, no exponential. `m` is clamped below at the smallest normal
    /// f32, so `log2 m >= -126` is finite even where both probabilities underflow (then `p_s,
    /// p_t <= 2^-126 / min(beta, 1 - beta)`, and the terms `p (log2 p - log2 m)` they weight are
    /// off by less than `2^-126 / min(beta, 1 - beta) * 150`, far below an f32 loss's rounding;
    /// a zero probability still weights its term by exactly 0). NaN stays NaN.
    #[inline(always)]
    fn log_mixture<M: MulAdd>(&self, ps: f32, pt: f32) -> f32 {
        let m = M::mul_add(self.beta, pt, self.one_minus_beta * ps);
        let m = if m < f32::MIN_POSITIVE {
            f32::MIN_POSITIVE
        } else {
            m
        };
        log2_normal::<M>(m)
    }
}

/// What one entry of a pass produces: up to two loss terms, the gradient (without the label's
/// one-hot, which the caller passes as `onehot` for the label entry only), and a value to leave
/// in the teacher's scratch slot.
struct Out {
    terms: [f32; 2],
    grad: f32,
    keep: f32,
}

/// Which inputs a pass reads; the others are read from the scratch only.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    Scratch,
    Student,
    Both,
}

/// One entry of a pass, from the student and teacher logits `x`, `y` and the scratch values
/// `es`, `et` of the entry (`x`, `y` are meaningless where [`Entry::READS`] leaves them out).
trait Entry: Copy {
    /// How many of the two terms are summed.
    const SUMS: usize;
    const READS: Reads;
    /// Whether `keep` is written back to the teacher's scratch slot.
    const KEEP: bool = false;
    #[allow(clippy::too_many_arguments)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        x: f32,
        y: f32,
        es: f32,
        et: f32,
        onehot: f32,
    ) -> Out;
}

/// Forward KL, pass 2 (the loss came from pass 1): the gradient `a (p_s - p_t)` from the
/// scratch alone. `Q`: the cross-entropy's gradient, 0 for none, else as in
/// [`Consts::hard_grad`] (so for the other entries; only `Q = 1` reads the student again).
#[derive(Clone, Copy)]
struct ForwardKl<const Q: u32>;

impl<const Q: u32> Entry for ForwardKl<Q> {
    const SUMS: usize = 0;
    const READS: Reads = if Q == 1 {
        Reads::Student
    } else {
        Reads::Scratch
    };
    #[inline(always)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        x: f32,
        _: f32,
        es: f32,
        et: f32,
        onehot: f32,
    ) -> Out {
        let (ps, pt) = (es * f.fs, et * f.ft);
        let d = ps - pt;
        let grad = if Q > 0 {
            M::mul_add(c.a, d, c.hard_grad::<M, Q>(x, ps, onehot))
        } else {
            c.a * d
        };
        Out {
            terms: [0.0, 0.0],
            grad,
            keep: 0.0,
        }
    }
}

/// Reverse KL, pass 2 (the loss came from pass 1): the gradient
/// `a p_s (log p_s - log p_t - KL_r)` from the scratch alone: pass 1 kept each entry's log ratio
/// `dc` relative to its chunk's running maxima in the teacher's slot, and `f.ft` holds the
/// chunk's offset `(m_s,c - m_s - m_t,c + m_t) log2 e / T + log2 z_t - log2 z_s - KL_r`. A
/// student `-inf` (kept as `dc = -inf`) has gradient 0.
#[derive(Clone, Copy)]
struct ReverseKl<const Q: u32>;

impl<const Q: u32> Entry for ReverseKl<Q> {
    const SUMS: usize = 0;
    const READS: Reads = if Q == 1 {
        Reads::Student
    } else {
        Reads::Scratch
    };
    #[inline(always)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        x: f32,
        _: f32,
        es: f32,
        dc: f32,
        onehot: f32,
    ) -> Out {
        let ps = es * f.fs;
        let gs = c.a2 * (ps * (dc + f.ft));
        let gs = if dc == NEG_INF { 0.0 } else { gs };
        let grad = if Q > 0 {
            gs + c.hard_grad::<M, Q>(x, ps, onehot)
        } else {
            gs
        };
        Out {
            terms: [0.0, 0.0],
            grad,
            keep: 0.0,
        }
    }
}

/// JSD, pass 2: `p_t (log p_t - log m)` and `p_s (log p_s - log m)`. With `G` (a gradient is
/// wanted) it keeps in the teacher's slot the gradient without its mean term,
/// `aj p_s (log2 p_s - log2 m)` plus the cross-entropy's (`Q` as in [`Consts::hard_grad`]),
/// for [`jsd_grad`] to finish.
#[derive(Clone, Copy)]
struct JsdLoss<const G: bool, const Q: u32>;

impl<const G: bool, const Q: u32> Entry for JsdLoss<G, Q> {
    const SUMS: usize = 2;
    const READS: Reads = Reads::Both;
    const KEEP: bool = G;
    #[inline(always)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        x: f32,
        y: f32,
        es: f32,
        et: f32,
        onehot: f32,
    ) -> Out {
        let (ls, lt) = (c.log_ps::<M>(x), c.log_pt::<M>(y));
        let (ps, pt) = (es * f.fs, et * f.ft);
        let lm = c.log_mixture::<M>(ps, pt);
        // Equal probabilities are their own mixture: both log ratios are exactly 0 (so identical
        // distributions give exactly 0), not the rounding of the log-probabilities' difference
        // from `log2 m`.
        let same = ps == pt;
        let ta = if same { 0.0 } else { pt * (lt - lm) };
        let tb = if same { 0.0 } else { ps * (ls - lm) };
        let ta = if lt == NEG_INF { 0.0 } else { ta };
        let tb = if ls == NEG_INF { 0.0 } else { tb };
        let keep = if G {
            let gs = c.aj * tb;
            if Q > 0 {
                gs + c.hard_grad::<M, Q>(x, ps, onehot)
            } else {
                gs
            }
        } else {
            0.0
        };
        Out {
            terms: [ta, tb],
            grad: 0.0,
            keep,
        }
    }
}

/// JSD, pass 3: the gradient `keep - aj KL(p_s || m) p_s` from the scratch alone (the inputs are
/// not read again): `keep` from the teacher's slot ([`JsdLoss`]), `p_s` from the student's.
/// A zero student exponential (a `-inf` logit) leaves `keep` as it is, so a masked entry's
/// gradient is exactly 0.
#[inline(always)]
fn jsd_grad<M: MulAdd>(c: &Consts, sc: &Scratch, n: usize, grad: &mut HostSliceMut) {
    let mut bg = [0.0f32; CHUNK];
    for ci in 0..n.div_ceil(CHUNK) {
        let range = ci * CHUNK..((ci + 1) * CHUNK).min(n);
        let m = range.len();
        let fs = sc.ms[ci];
        let es = &sc.es[ci * CHUNK..ci * CHUNK + m];
        let keep = &sc.et[ci * CHUNK..ci * CHUNK + m];
        let direct = match grad {
            HostSliceMut::F32(d) => Some(&mut d[range.clone()]),
            _ => None,
        };
        let in_place = direct.is_some();
        let out: &mut [f32] = match direct {
            Some(d) => d,
            None => &mut bg[..m],
        };
        let out = &mut out[..m];
        for j in 0..m {
            let g = M::mul_add(es[j] * fs, c.ajk, keep[j]);
            out[j] = if es[j] == 0.0 { keep[j] } else { g };
        }
        if !in_place {
            narrow_into(&bg[..m], grad, range.start);
        }
    }
}

/// The cross-entropy alone (alpha = 0): its gradient `b (exp(s - m) / z_1 - onehot)` from the
/// exponentials pass 1 kept; the teacher is not read.
#[derive(Clone, Copy)]
struct HardOnly;

impl Entry for HardOnly {
    const SUMS: usize = 0;
    const READS: Reads = Reads::Scratch;
    #[inline(always)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        _: f32,
        _: f32,
        es: f32,
        _: f32,
        onehot: f32,
    ) -> Out {
        Out {
            terms: [0.0, 0.0],
            grad: c.b * (es * f.fs - onehot),
            keep: 0.0,
        }
    }
}

/// The row's inputs, of which a pass reads what its [`Entry::READS`] says.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    s: HostSlice<'a>,
    t: HostSlice<'a>,
}

/// One pass over a row: the sums of `e`'s terms, and (when `grad` is given) its gradient written
/// a chunk at a time. The label entry's gradient is recomputed with its one-hot.
#[inline(always)]
fn row_pass<M: MulAdd, E: Entry>(
    e: E,
    c: &Consts,
    input: Inputs,
    sc: &mut Scratch,
    label: Option<usize>,
    grad: Option<&mut HostSliceMut>,
) -> [f32; 2] {
    // Separate loops with and without the gradient: the loss terms are the same code in both, so
    // the loss-only path gives the same bits.
    match grad {
        Some(g) => chunks::<M, E, true>(e, c, input, sc, label, Some(g)),
        None => chunks::<M, E, false>(e, c, input, sc, label, None),
    }
}

#[inline(always)]
fn chunks<M: MulAdd, E: Entry, const GRAD: bool>(
    e: E,
    c: &Consts,
    input: Inputs,
    sc: &mut Scratch,
    label: Option<usize>,
    mut grad: Option<&mut HostSliceMut>,
) -> [f32; 2] {
    let (mut bs, mut bt, mut bg) = ([0.0f32; CHUNK], [0.0f32; CHUNK], [0.0f32; CHUNK]);
    let (mut b0, mut b1) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
    let (mut total0, mut total1) = (0.0f32, 0.0f32);
    let n = input.s.len();
    for ci in 0..n.div_ceil(CHUNK) {
        let range = ci * CHUNK..((ci + 1) * CHUNK).min(n);
        let f = ChunkFactors {
            fs: sc.ms[ci],
            ft: sc.mt[ci],
        };
        // What is not read is never looked at: the chunk's padded length of zeros stands in.
        let xs = match E::READS {
            Reads::Scratch => &bs[..range.len().next_multiple_of(W)],
            Reads::Student | Reads::Both => widen(input.s, range.clone(), &mut bs, NEG_INF),
        };
        let ys = match E::READS {
            Reads::Both => widen(input.t, range.clone(), &mut bt, NEG_INF),
            Reads::Scratch | Reads::Student => xs,
        };
        // An f32 gradient is written in place when the chunk needs no padding; otherwise into
        // `bg`, narrowed (or copied) afterwards.
        let direct = match grad.as_deref_mut() {
            Some(HostSliceMut::F32(d)) if range.len().is_multiple_of(W) => {
                Some(&mut d[range.clone()])
            }
            _ => None,
        };
        let in_place = direct.is_some();
        let out: &mut [f32] = match direct {
            Some(d) => d,
            None => &mut bg[..],
        };
        // A plain loop over the entries (vectorized as a map), the terms summed afterwards
        // (see `simd::sum`). Equal lengths let LLVM drop the bounds checks.
        let m = xs.len();
        let (ys, es, et) = (&ys[..m], &slot(sc.es, ci)[..m], &mut slot(sc.et, ci)[..m]);
        let (out, t0, t1) = (&mut out[..m], &mut b0[..m], &mut b1[..m]);
        // The label entry (when a gradient or a kept value needs its one-hot), with what the
        // loop reads in the teacher's slot before a kept value replaces it.
        let lab = if GRAD || E::KEEP {
            label
                .filter(|y| range.contains(y))
                .map(|y| (y - range.start, et[y - range.start]))
        } else {
            None
        };
        for j in 0..m {
            let o = e.eval::<M>(c, f, xs[j], ys[j], es[j], et[j], 0.0);
            if E::SUMS > 0 {
                t0[j] = o.terms[0];
            }
            if E::SUMS > 1 {
                t1[j] = o.terms[1];
            }
            if GRAD {
                out[j] = o.grad;
            }
            if E::KEEP {
                et[j] = o.keep;
            }
        }
        if E::SUMS > 0 {
            total0 += simd::sum(t0);
        }
        if E::SUMS > 1 {
            total1 += simd::sum(t1);
        }
        if let Some((j, et_j)) = lab {
            let o = e.eval::<M>(c, f, xs[j], ys[j], es[j], et_j, 1.0);
            if GRAD {
                out[j] = o.grad;
            }
            if E::KEEP {
                et[j] = o.keep;
            }
        }
        if GRAD && !in_place {
            if let Some(g) = grad.as_deref_mut() {
                narrow_into(&bg[..range.len()], g, range.start);
            }
        }
    }
    [total0, total1]
}

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
