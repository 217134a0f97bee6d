//! The CPU backend (`cpu`): the loss of DESIGN section 4 in f32, rows in parallel with rayon.
//!
//! Per row, forward and reverse KL read each input twice:
//! 1. online statistics: the raw maxima of `s` and `t` and the sums `sum exp((x - max) / T)`
//!    (and `sum exp(s - max)` at T = 1 when the hard loss is on; `max(s / T) = max(s) / T`, so one
//!    maximum serves both), plus, for reverse KL, `sum p_s (log p_s - log p_t)` accumulated online;
//! 2. per-element log-probabilities, the loss terms and the gradient.
//!
//! JSD's gradient needs `sum_k p_s(k) g_k`, which depends on both normalizers, so it reads the
//! row three times: statistics; that sum and the loss; the gradient.
//!
//! Numerics: log-probabilities are `(x - max) / T - log(sum)` (centered first, so logits of
//! magnitude 1e4 keep their differences); a divergence term whose weighting probability is 0
//! contributes exactly 0; terms whose weight is 0 are skipped entirely. Sums along a row are
//! accumulated in f32 in runs of 512 entries merged into the row's total, which keeps the
//! rounding of `log Z` at V = 128k near 1e-6 instead of 1e-4. Each row is computed by one thread
//! in a fixed order and the row losses are summed (in f64, O(rows)) in row order on the calling
//! thread, so results are bit-identical whatever the number of threads. Memory beyond the
//! outputs is O(rows). The semantics, including the conventions for zeros, infinities and NaN,
//! are those of [`crate::reference`].

use rayon::prelude::*;

use crate::backend::{check_same_dtype, Backend};
use crate::dtype::{Element, HostSlice, HostSliceMut};
use crate::error::{Error, Result};
use crate::semantics::{
    check_inputs, check_softmax, DistillInputs, GradOutputs, HiddenInputs, LossConfig, LossKind,
    LossValue, Reduction,
};
use half::{bf16, f16};

const NEG_INF: f32 = f32::NEG_INFINITY;

/// The multi-threaded CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers, shared by every kernel below.

/// One term of a KL divergence, `w * (log w - log o)` with `w = exp(log_w)`: exactly 0 for a zero
/// weight, `+inf` for a positive weight against a zero `o`, NaN for NaN.
#[inline]
fn kl_term(log_w: f32, log_o: f32) -> f32 {
    if log_w.is_nan() || log_o.is_nan() {
        f32::NAN
    } else if log_w == NEG_INF {
        0.0
    } else if log_o == NEG_INF {
        f32::INFINITY
    } else {
        log_w.exp() * (log_w - log_o)
    }
}

/// `log(beta p_t + (1 - beta) p_s)` from `log p_t` and `log p_s`, taken about the larger:
/// `l_hi + log(w_hi + w_lo exp(l_lo - l_hi))`. Exactly `log p_t` when the two are equal
/// (`beta + (1 - beta)` rounds to exactly 1), so identical distributions give a JSD of exactly 0.
#[inline]
fn log_mixture(beta: f32, one_minus_beta: f32, lpt: f32, lps: f32) -> f32 {
    if lpt.is_nan() || lps.is_nan() {
        return f32::NAN;
    }
    if lpt == NEG_INF && lps == NEG_INF {
        return NEG_INF;
    }
    if lpt >= lps {
        lpt + (beta + one_minus_beta * (lps - lpt).exp()).ln()
    } else {
        lps + (one_minus_beta + beta * (lpt - lps).exp()).ln()
    }
}

/// Online maximum and sum of `exp((x - max) * scale)`.
///
/// `-inf` entries contribute nothing; NaN makes the sum NaN; the first finite entry sets the
/// maximum (the rescale factor `exp(-inf)` of the empty sum is 0).
#[derive(Clone, Copy)]
struct Online {
    max: f32,
    sum: f32,
}

impl Online {
    const EMPTY: Online = Online {
        max: NEG_INF,
        sum: 0.0,
    };

    #[inline]
    fn push(&mut self, x: f32, scale: f32) {
        if x > self.max {
            self.sum = self.sum * ((self.max - x) * scale).exp() + 1.0;
            self.max = x;
        } else if x != NEG_INF {
            // Also NaN, which poisons the sum.
            self.sum += ((x - self.max) * scale).exp();
        }
    }

    /// The state of both runs together (`-inf` maxima guarded like in `push`).
    #[inline]
    fn merge(self, o: Online, scale: f32) -> Online {
        let max = self.max.max(o.max);
        if max == NEG_INF {
            return Online {
                max,
                sum: self.sum + o.sum,
            };
        }
        let part = |a: Online| {
            if a.sum == 0.0 {
                0.0
            } else {
                a.sum * ((a.max - max) * scale).exp()
            }
        };
        Online {
            max,
            sum: part(self) + part(o),
        }
    }

    /// Online statistics of `x` in runs of [`CHUNK`] (see there for why).
    fn of_row<E: Element>(x: &[E], scale: f32) -> Online {
        x.chunks(CHUNK).fold(Online::EMPTY, |acc, run| {
            let mut st = Online::EMPTY;
            for &v in run {
                st.push(v.to_f32(), scale);
            }
            acc.merge(st, scale)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The fused loss, one row at a time.

#[derive(Clone, Copy)]
enum Soft {
    /// alpha = 0: the teacher is not read.
    Off,
    ForwardKl,
    ReverseKl,
    Jsd {
        beta: f32,
    },
}

/// Row-independent parameters of the fused loss.
#[derive(Clone, Copy)]
struct KdParams {
    vocab: usize,
    inv_t: f32,
    soft: Soft,
    soft_weight: f32,
    /// 0 when the hard loss is off.
    hard_weight: f32,
    grad_scale: f32,
}

/// Entries are accumulated in f32 in runs of this many, each run into its own partial sums,
/// which are then merged into the row's: the rounding error of a sum then grows with
/// `CHUNK + vocab / CHUNK` instead of `vocab` (for V = 128k, ~750 instead of 128k additions).
const CHUNK: usize = 512;

/// What pass 1 must gather.
#[derive(Clone, Copy)]
struct Need {
    inv_t: f32,
    soft: bool,
    hard: bool,
    reverse: bool,
}

/// Pass-1 statistics of a run of entries, about the run's own raw maxima. `max(s / T)` is
/// `max(s) / T`, so one maximum serves both temperatures of the student.
#[derive(Clone, Copy)]
struct Partial {
    max_s: f32,
    /// `sum exp((s - max_s) / T)`.
    z_s: f32,
    /// `sum exp(s - max_s)`: the hard loss's normalizer.
    z_1: f32,
    max_t: f32,
    /// `sum exp((t - max_t) / T)`.
    z_t: f32,
    /// Reverse KL: `sum exp(sc) (sc - tc)` with `sc = (s - max_s) / T`, `tc = (t - max_t) / T`.
    /// When the maxima move up by `(ds, dt)`, every `sc - tc` shifts by `-(ds - dt) / T` and
    /// every weight scales by `exp(-ds / T)`.
    sd: f32,
    /// Reverse KL: a student entry with positive probability against a teacher `-inf`.
    hole: bool,
}

impl Partial {
    const EMPTY: Partial = Partial {
        max_s: NEG_INF,
        z_s: 0.0,
        z_1: 0.0,
        max_t: NEG_INF,
        z_t: 0.0,
        sd: 0.0,
        hole: false,
    };

    /// Adds one entry: student logit `x`, teacher logit `y` (read only when the soft loss is on).
    #[inline]
    fn push(&mut self, n: &Need, x: f32, y: f32) {
        let inv_t = n.inv_t;
        if n.soft {
            if n.reverse {
                let new_max_s = if x > self.max_s { x } else { self.max_s };
                let new_max_t = if y > self.max_t { y } else { self.max_t };
                if self.z_s > 0.0 && (new_max_s > self.max_s || new_max_t > self.max_t) {
                    let shift = ((new_max_s - self.max_s) - (new_max_t - self.max_t)) * inv_t;
                    self.sd =
                        (self.sd - shift * self.z_s) * ((self.max_s - new_max_s) * inv_t).exp();
                }
                if x > NEG_INF {
                    if y == NEG_INF {
                        self.hole = true;
                    } else {
                        let sc = (x - new_max_s) * inv_t;
                        let tc = (y - new_max_t) * inv_t;
                        self.sd += sc.exp() * (sc - tc);
                    }
                }
            }
            let mut t = Online {
                max: self.max_t,
                sum: self.z_t,
            };
            t.push(y, inv_t);
            (self.max_t, self.z_t) = (t.max, t.sum);
        }
        if n.hard {
            if x > self.max_s {
                self.z_1 = self.z_1 * (self.max_s - x).exp() + 1.0;
            } else if x != NEG_INF {
                self.z_1 += (x - self.max_s).exp();
            }
        }
        let mut s = Online {
            max: self.max_s,
            sum: self.z_s,
        };
        s.push(x, inv_t);
        (self.max_s, self.z_s) = (s.max, s.sum);
    }

    /// Combines the statistics of two runs. Empty parts (sum 0) contribute nothing; a NaN sum
    /// is carried through.
    fn merge(&self, o: &Partial, n: &Need) -> Partial {
        let inv_t = n.inv_t;
        let max_s = if o.max_s > self.max_s {
            o.max_s
        } else {
            self.max_s
        };
        let max_t = if o.max_t > self.max_t {
            o.max_t
        } else {
            self.max_t
        };
        let mut out = Partial {
            max_s,
            max_t,
            hole: self.hole || o.hole,
            ..Partial::EMPTY
        };
        for part in [self, o] {
            if part.z_s != 0.0 {
                let rs = ((part.max_s - max_s) * inv_t).exp();
                out.z_s += part.z_s * rs;
                if n.hard {
                    out.z_1 += part.z_1 * (part.max_s - max_s).exp();
                }
                if n.reverse {
                    // With a hole the sum is meaningless (and ignored): reverse KL is +inf.
                    let shift = ((max_s - part.max_s) - (max_t - part.max_t)) * inv_t;
                    out.sd += (part.sd - shift * part.z_s) * rs;
                }
            }
            if part.z_t != 0.0 {
                out.z_t += part.z_t * ((part.max_t - max_t) * inv_t).exp();
            }
        }
        out
    }
}

/// The per-row statistics of pass 1, as log-normalizers.
struct RowStats {
    /// Raw maximum of the student logits.
    max_s: f32,
    /// `log sum exp((s - max_s) / T)`.
    log_z_s: f32,
    /// `log sum exp(s - max_s)`, when the hard loss is on.
    log_z_1: f32,
    max_t: f32,
    log_z_t: f32,
    /// Reverse KL only: `sum p_s (log p_s - log p_t)`.
    reverse_kl: f32,
}

/// Pass 1 over a row, in chunks of [`CHUNK`] entries.
fn row_stats<S: Element, T: Element>(p: &KdParams, s: &[S], t: &[T]) -> RowStats {
    let need = Need {
        inv_t: p.inv_t,
        soft: !matches!(p.soft, Soft::Off),
        hard: p.hard_weight > 0.0,
        reverse: matches!(p.soft, Soft::ReverseKl),
    };
    let mut row = Partial::EMPTY;
    for start in (0..s.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(s.len());
        let mut part = Partial::EMPTY;
        for j in start..end {
            let y = if need.soft { t[j].to_f32() } else { 0.0 };
            part.push(&need, s[j].to_f32(), y);
        }
        row = row.merge(&part, &need);
    }

    let log_z_s = row.z_s.ln();
    let log_z_t = row.z_t.ln();
    let reverse_kl = if !need.reverse {
        0.0
    } else if row.hole {
        f32::INFINITY
    } else {
        row.sd / row.z_s - log_z_s + log_z_t
    };
    RowStats {
        max_s: row.max_s,
        log_z_s,
        log_z_1: row.z_1.ln(),
        max_t: row.max_t,
        log_z_t,
        reverse_kl,
    }
}

/// `f(j)` summed over `0..n` in f32, in runs of [`CHUNK`] (see there).
#[inline]
fn chunked_sum(n: usize, mut f: impl FnMut(usize) -> f32) -> f32 {
    let mut total = 0.0f32;
    for start in (0..n).step_by(CHUNK) {
        let mut part = 0.0f32;
        for j in start..(start + CHUNK).min(n) {
            part += f(j);
        }
        total += part;
    }
    total
}

/// The combined (soft and hard, weighted) loss of one valid row; writes
/// `grad_scale * d loss / d s` into `grad` when given.
fn kd_row<S: Element, T: Element, G: Element>(
    p: &KdParams,
    s: &[S],
    t: &[T],
    label: Option<usize>,
    mut grad: Option<&mut [G]>,
) -> f32 {
    let inv_t = p.inv_t;
    let st = row_stats(p, s, t);
    let hard = p.hard_weight > 0.0;
    let y = if hard { label } else { None };

    // log p_s(j) and log p_t(j), centered before scaling.
    let lps = |x: f32| (x - st.max_s) * inv_t - st.log_z_s;
    let lpt = |x: f32| (x - st.max_t) * inv_t - st.log_z_t;
    // The hard part of the gradient (before grad_scale) at entry j.
    let hard_grad = |j: usize, x: f32| {
        let onehot = if Some(j) == y { 1.0 } else { 0.0 };
        p.hard_weight * (((x - st.max_s) - st.log_z_1).exp() - onehot)
    };
    let hard_loss = match y {
        Some(y) => -((s[y].to_f32() - st.max_s) - st.log_z_1),
        None => 0.0,
    };

    let soft_loss = match p.soft {
        Soft::Off => {
            if let Some(g) = grad.as_deref_mut() {
                for (j, g) in g.iter_mut().enumerate() {
                    *g = G::from_f32(p.grad_scale * hard_grad(j, s[j].to_f32()));
                }
            }
            0.0
        }
        Soft::ForwardKl | Soft::ReverseKl => {
            let forward = matches!(p.soft, Soft::ForwardKl);
            let soft_scale = p.soft_weight * inv_t;
            chunked_sum(s.len(), |j| {
                let x = s[j].to_f32();
                let ls = lps(x);
                let lt = lpt(t[j].to_f32());
                let (term, g_soft) = if forward {
                    (kl_term(lt, ls), ls.exp() - lt.exp())
                } else if ls == NEG_INF {
                    (0.0, 0.0)
                } else {
                    (kl_term(ls, lt), ls.exp() * ((ls - lt) - st.reverse_kl))
                };
                if let Some(g) = grad.as_deref_mut() {
                    let mut v = soft_scale * g_soft;
                    if hard {
                        v += hard_grad(j, x);
                    }
                    g[j] = G::from_f32(p.grad_scale * v);
                }
                term
            })
        }
        Soft::Jsd { beta } => {
            // Pass 2: the loss and g_mean = sum_k p_s(k) g_k, g_k = (1 - beta)(log p_s - log m).
            let one_minus_beta = 1.0 - beta;
            let log_m = |ls: f32, lt: f32| log_mixture(beta, one_minus_beta, lt, ls);
            let (mut kl_t_m, mut kl_s_m, mut g_mean) = (0.0f32, 0.0f32, 0.0f32);
            for start in (0..s.len()).step_by(CHUNK) {
                let (mut a, mut b, mut c) = (0.0f32, 0.0f32, 0.0f32);
                for j in start..(start + CHUNK).min(s.len()) {
                    let ls = lps(s[j].to_f32());
                    let lt = lpt(t[j].to_f32());
                    let lm = log_m(ls, lt);
                    a += kl_term(lt, lm);
                    b += kl_term(ls, lm);
                    if ls != NEG_INF {
                        c += ls.exp() * (one_minus_beta * (ls - lm));
                    }
                }
                kl_t_m += a;
                kl_s_m += b;
                g_mean += c;
            }
            // Pass 3: the gradient p_s(j) (g_j - g_mean) / T.
            if let Some(g) = grad {
                let soft_scale = p.soft_weight * inv_t;
                for (j, g) in g.iter_mut().enumerate() {
                    let x = s[j].to_f32();
                    let ls = lps(x);
                    let mut v = if ls == NEG_INF {
                        0.0
                    } else {
                        let lm = log_m(ls, lpt(t[j].to_f32()));
                        soft_scale * ls.exp() * (one_minus_beta * (ls - lm) - g_mean)
                    };
                    if hard {
                        v += hard_grad(j, x);
                    }
                    *g = G::from_f32(p.grad_scale * v);
                }
            }
            beta * kl_t_m + one_minus_beta * kl_s_m
        }
    };

    let mut loss = 0.0;
    if !matches!(p.soft, Soft::Off) {
        loss += p.soft_weight * soft_loss;
    }
    if hard {
        loss += p.hard_weight * hard_loss;
    }
    loss
}

/// The fused soft/hard loss of every row into `row_loss`, and its gradient into `grad`.
fn kd_rows<S: Element, T: Element, G: Element>(
    p: &KdParams,
    cfg: &LossConfig,
    s: &[S],
    t: &[T],
    labels: Option<&[i64]>,
    grad: Option<&mut [G]>,
    row_loss: &mut [f32],
) {
    let v = p.vocab;
    let run = |r: usize, grad: Option<&mut [G]>| -> f32 {
        let label = labels.map(|l| l[r]);
        if !cfg.row_is_valid(label) {
            if let Some(g) = grad {
                g.fill(G::from_f32(0.0));
            }
            return 0.0;
        }
        // A valid label is in [0, vocab) (checked by check_inputs).
        let label = label.map(|y| y as usize);
        kd_row(
            p,
            &s[r * v..(r + 1) * v],
            &t[r * v..(r + 1) * v],
            label,
            grad,
        )
    };
    match grad {
        Some(g) => g
            .par_chunks_mut(v)
            .zip(row_loss.par_iter_mut())
            .enumerate()
            .for_each(|(r, (g, l))| *l = run(r, Some(g))),
        None => row_loss
            .par_iter_mut()
            .enumerate()
            .for_each(|(r, l)| *l = run(r, None)),
    }
}

/// Dispatches [`kd_rows`] on the gradient's dtype.
fn kd_rows_grad<S: Element, T: Element>(
    p: &KdParams,
    cfg: &LossConfig,
    s: &[S],
    t: &[T],
    labels: Option<&[i64]>,
    grad: Option<HostSliceMut>,
    row_loss: &mut [f32],
) {
    match grad {
        None => kd_rows::<S, T, f32>(p, cfg, s, t, labels, None, row_loss),
        Some(HostSliceMut::F32(g)) => kd_rows(p, cfg, s, t, labels, Some(g), row_loss),
        Some(HostSliceMut::F16(g)) => kd_rows(p, cfg, s, t, labels, Some(g), row_loss),
        Some(HostSliceMut::Bf16(g)) => kd_rows(p, cfg, s, t, labels, Some(g), row_loss),
    }
}

/// Dispatches [`kd_rows`] on the input dtypes.
fn kd_dispatch(
    p: &KdParams,
    cfg: &LossConfig,
    inputs: &DistillInputs,
    grad: Option<HostSliceMut>,
    row_loss: &mut [f32],
) {
    use HostSlice as H;
    let l = inputs.labels;
    match (inputs.student, inputs.teacher) {
        (H::F32(s), H::F32(t)) => kd_rows_grad(p, cfg, s, t, l, grad, row_loss),
        (H::F32(s), H::F16(t)) => kd_rows_grad(p, cfg, s, t, l, grad, row_loss),
        (H::F32(s), H::Bf16(t)) => kd_rows_grad(p, cfg, s, t, l, grad, row_loss),
        (H::F16(s), H::F32(t)) => kd_rows_grad(p, cfg, s, t, l, grad, row_loss),
        (H::F16(s), H::F16(t)) => kd_rows_grad(p, cfg, s, t, l, grad, row_loss),
        (H::F16(s), H::Bf16(t)) => kd_rows_grad(p, cfg, s, t, l, grad, row_loss),
        (H::Bf16(s), H::F32(t)) => kd_rows_grad(p, cfg, s, t, l, grad, row_loss),
        (H::Bf16(s), H::F16(t)) => kd_rows_grad(p, cfg, s, t, l, grad, row_loss),
        (H::Bf16(s), H::Bf16(t)) => kd_rows_grad(p, cfg, s, t, l, grad, row_loss),
    }
}

// ---------------------------------------------------------------------------------------------
// Hidden-state MSE.

/// Adds `weight * mean_h (h_s - h_t)^2` of every valid row to `row_loss`; writes the gradient.
/// Hidden states are small next to the logits: they are read through [`HostSlice::get_f32`].
fn hidden_rows<G: Element>(
    cfg: &LossConfig,
    h: &HiddenInputs,
    labels: Option<&[i64]>,
    grad_scale: f32,
    grad: Option<&mut [G]>,
    row_loss: &mut [f32],
) {
    let size = h.size;
    let weight = cfg.hidden_weight;
    let run = |r: usize, grad: Option<&mut [G]>| -> f32 {
        let valid = cfg.row_is_valid(labels.map(|l| l[r]));
        if !valid || weight == 0.0 {
            if let Some(g) = grad {
                g.fill(G::from_f32(0.0));
            }
            return 0.0;
        }
        let diff = |k: usize| h.student.get_f32(r * size + k) - h.teacher.get_f32(r * size + k);
        if let Some(g) = grad {
            let scale = grad_scale * weight * 2.0 / size as f32;
            for (k, g) in g.iter_mut().enumerate() {
                *g = G::from_f32(scale * diff(k));
            }
        }
        let sum: f32 = (0..size).map(|k| diff(k) * diff(k)).sum();
        weight * (sum / size as f32)
    };
    match grad {
        Some(g) => g
            .par_chunks_mut(size)
            .zip(row_loss.par_iter_mut())
            .enumerate()
            .for_each(|(r, (g, l))| *l += run(r, Some(g))),
        None => row_loss
            .par_iter_mut()
            .enumerate()
            .for_each(|(r, l)| *l += run(r, None)),
    }
}

// ---------------------------------------------------------------------------------------------
// Standalone softmax.

fn softmax_rows<E: Element>(input: &[E], vocab: usize, inv_t: f32, log: bool, output: &mut [E]) {
    output
        .par_chunks_mut(vocab)
        .zip(input.par_chunks(vocab))
        .for_each(|(out, x)| {
            let st = Online::of_row(x, inv_t);
            let log_z = st.sum.ln();
            for (o, &v) in out.iter_mut().zip(x) {
                let lp = (v.to_f32() - st.max) * inv_t - log_z;
                *o = E::from_f32(if log { lp } else { lp.exp() });
            }
        });
}

fn softmax_backward_rows<E: Element>(
    y: &[E],
    dy: &[E],
    vocab: usize,
    inv_t: f32,
    log: bool,
    dx: &mut [E],
) {
    dx.par_chunks_mut(vocab)
        .zip(y.par_chunks(vocab).zip(dy.par_chunks(vocab)))
        .for_each(|(dx, (y, dy))| {
            if log {
                let sum = chunked_sum(dy.len(), |j| dy[j].to_f32());
                for ((o, y), dy) in dx.iter_mut().zip(y).zip(dy) {
                    *o = E::from_f32((dy.to_f32() - y.to_f32().exp() * sum) * inv_t);
                }
            } else {
                let dot = chunked_sum(y.len(), |j| y[j].to_f32() * dy[j].to_f32());
                for ((o, y), dy) in dx.iter_mut().zip(y).zip(dy) {
                    *o = E::from_f32(y.to_f32() * (dy.to_f32() - dot) * inv_t);
                }
            }
        });
}

fn dtype_error(tensor: &'static str, got: crate::dtype::Dtype, want: crate::dtype::Dtype) -> Error {
    Error::Dtype {
        tensor,
        dtype: format!("{got} (must match the output's {want})"),
    }
}

// ---------------------------------------------------------------------------------------------

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn distill_loss(
        &self,
        cfg: &LossConfig,
        inputs: &DistillInputs,
        grads: GradOutputs,
    ) -> Result<LossValue> {
        let valid_rows = check_inputs(cfg, inputs, &grads)?;
        let (loss_scale, grad_scale) = cfg.scales(valid_rows);
        let soft_weight = cfg.soft_weight();
        let soft = if soft_weight == 0.0 {
            Soft::Off
        } else {
            match cfg.kind {
                LossKind::ForwardKl => Soft::ForwardKl,
                LossKind::ReverseKl => Soft::ReverseKl,
                LossKind::Jsd { beta } => Soft::Jsd { beta },
            }
        };
        let params = KdParams {
            vocab: inputs.vocab,
            inv_t: 1.0 / cfg.temperature,
            soft,
            soft_weight,
            hard_weight: cfg.hard_weight(),
            grad_scale: grad_scale as f32,
        };

        let mut row_loss = vec![0.0f32; inputs.rows];
        kd_dispatch(&params, cfg, inputs, grads.logits, &mut row_loss);
        if let Some(h) = &inputs.hidden {
            let (gs, l) = (grad_scale as f32, inputs.labels);
            match grads.hidden {
                None => hidden_rows::<f32>(cfg, h, l, gs, None, &mut row_loss),
                Some(HostSliceMut::F32(g)) => hidden_rows(cfg, h, l, gs, Some(g), &mut row_loss),
                Some(HostSliceMut::F16(g)) => hidden_rows(cfg, h, l, gs, Some(g), &mut row_loss),
                Some(HostSliceMut::Bf16(g)) => hidden_rows(cfg, h, l, gs, Some(g), &mut row_loss),
            }
        }

        let values = match cfg.reduction {
            Reduction::None => row_loss
                .iter()
                .map(|&l| (l as f64 * loss_scale) as f32)
                .collect(),
            Reduction::Sum | Reduction::Mean => {
                // One thread, row order: deterministic whatever the thread count.
                let total: f64 = row_loss.iter().map(|&l| l as f64).sum();
                vec![(total * loss_scale) as f32]
            }
        };
        Ok(LossValue { values, valid_rows })
    }

    fn softmax(
        &self,
        input: HostSlice,
        rows: usize,
        vocab: usize,
        temperature: f32,
        log: bool,
        output: HostSliceMut,
    ) -> Result<()> {
        check_softmax(
            rows,
            vocab,
            temperature,
            &[("input", input.len()), ("output", output.len())],
        )?;
        check_same_dtype("output", input, &output)?;
        let inv_t = 1.0 / temperature;
        match (input, output) {
            (HostSlice::F32(x), HostSliceMut::F32(o)) => softmax_rows(x, vocab, inv_t, log, o),
            (HostSlice::F16(x), HostSliceMut::F16(o)) => softmax_rows(x, vocab, inv_t, log, o),
            (HostSlice::Bf16(x), HostSliceMut::Bf16(o)) => softmax_rows(x, vocab, inv_t, log, o),
            (x, o) => return Err(dtype_error("output", o.dtype(), x.dtype())),
        }
        Ok(())
    }

    fn softmax_backward(
        &self,
        output: HostSlice,
        grad_output: HostSlice,
        rows: usize,
        vocab: usize,
        temperature: f32,
        log: bool,
        grad_input: HostSliceMut,
    ) -> Result<()> {
        check_softmax(
            rows,
            vocab,
            temperature,
            &[
                ("output", output.len()),
                ("grad_output", grad_output.len()),
                ("grad_input", grad_input.len()),
            ],
        )?;
        check_same_dtype("grad_input", output, &grad_input)?;
        let inv_t = 1.0 / temperature;
        use HostSlice as H;
        use HostSliceMut as M;
        match (output, grad_output, grad_input) {
            (H::F32(y), H::F32(dy), M::F32(dx)) => {
                softmax_backward_rows::<f32>(y, dy, vocab, inv_t, log, dx)
            }
            (H::F16(y), H::F16(dy), M::F16(dx)) => {
                softmax_backward_rows::<f16>(y, dy, vocab, inv_t, log, dx)
            }
            (H::Bf16(y), H::Bf16(dy), M::Bf16(dx)) => {
                softmax_backward_rows::<bf16>(y, dy, vocab, inv_t, log, dx)
            }
            (y, dy, _) => return Err(dtype_error("grad_output", dy.dtype(), y.dtype())),
        }
        Ok(())
    }
}
