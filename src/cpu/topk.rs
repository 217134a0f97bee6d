//! The fused loss against a top-k teacher ([`crate::TopKTeacher`] states the semantics), one row
//! per rayon task, in two passes over the student row.
//!
//! - Pass 1 gathers the student's running maximum `m` (over every entry) and the tail's sum
//!   `z_tail = sum_{v not in ids} 2^((s_v - m) log2 e / T)`: each chunk is copied with its top ids
//!   set to `-inf`, so the tail is summed over itself and keeps its precision when it is a tiny
//!   part of the row (`1 - sum Q_i` would cancel). The cross-entropy's statistics at T = 1 are
//!   gathered from the unmasked chunk (the same ones when T = 1).
//! - Between the passes, the k top entries are read once more (a gather): their exponentials
//!   complete `z = z_tail + sum_i e_i` (a sum of positive terms: no cancellation), and the
//!   teacher's k + 1 buckets are tempered and normalised.
//! - Pass 2 writes the gradient a chunk at a time: the tail's formula for every entry (linear in
//!   the entry's exponential), then the chunk's top ids and the label are overwritten with their
//!   own values before the chunk is narrowed and stored.

use rayon::prelude::*;

use super::fastmath::{exp2_nonpositive as exp2, log2, MulAdd};
use super::simd::{self, Kernel, Lanes, MaxSum, SimdLevel, CHUNK};
use super::{narrow_into, row_of, widen};
use crate::dtype::{HostSlice, HostSliceMut};
use crate::semantics::{LossConfig, LossKind, TopKInputs};
use std::f32::consts::{LN_2, LOG2_E};

const NEG_INF: f32 = f32::NEG_INFINITY;

/// Row-independent constants of a top-k call.
#[derive(Clone, Copy, Debug)]
pub(super) struct TopKParams {
    pub inv_t: f32,
    /// `log2 e / T`.
    pub scale2: f32,
    /// `None` when the soft loss is off (alpha = 0: the teacher is not read).
    pub soft: Option<LossKind>,
    pub soft_weight: f32,
    pub hard_weight: f32,
    /// The upstream gradient divided by D.
    pub grad_scale: f32,
}

impl TopKParams {
    pub fn new(cfg: &LossConfig, grad_scale: f32) -> Self {
        let soft_weight = cfg.soft_weight();
        let inv_t = 1.0 / cfg.temperature;
        TopKParams {
            inv_t,
            scale2: inv_t * LOG2_E,
            soft: (soft_weight != 0.0).then_some(cfg.kind),
            soft_weight,
            hard_weight: cfg.hard_weight(),
            grad_scale,
        }
    }
}

thread_local! {
    /// Each thread's (id, bucket) pairs of the current row, sorted by id.
    static SORTED: std::cell::RefCell<Vec<(u32, u32)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Every row's loss into `row_loss` (0 for ignored rows) and, with `grad`, its gradient.
pub(super) fn rows<G: Lanes>(
    level: SimdLevel,
    p: &TopKParams,
    cfg: &LossConfig,
    inputs: &TopKInputs,
    grad: Option<&mut [G]>,
    row_loss: &mut [f32],
) {
    let vocab = inputs.vocab;
    fn run<G: Lanes>(
        level: SimdLevel,
        p: &TopKParams,
        cfg: &LossConfig,
        inputs: &TopKInputs,
        r: usize,
        loss: &mut f32,
        g: Option<&mut [G]>,
    ) {
        let (vocab, k) = (inputs.vocab, inputs.teacher.k);
        let label = inputs.labels.map(|l| l[r]);
        if !cfg.row_is_valid(label) {
            *loss = 0.0;
            if let Some(g) = g {
                narrow_zero(g);
            }
            return;
        }
        SORTED.with(|cell| {
            let mut sorted = cell.borrow_mut();
            sorted.clear();
            let ids = &inputs.teacher.ids[r * k..(r + 1) * k];
            sorted.extend(ids.iter().enumerate().map(|(i, &id)| (id, i as u32)));
            sorted.sort_unstable();
            let row = TopKRow {
                p,
                x: row_of(inputs.student, r, vocab),
                ids,
                sorted: &sorted,
                values: row_of(inputs.teacher.values, r, k),
                tail: inputs.teacher.tail[r],
                label: label.map(|y| y as usize),
                grad: g.map(G::host_mut),
            };
            *loss = simd::run(level, row);
        });
    }
    match grad {
        Some(g) => g
            .par_chunks_mut(vocab)
            .zip(row_loss.par_iter_mut())
            .enumerate()
            .for_each(|(r, (g, loss))| {
                if cfg.accumulate {
                    let keep = cfg.row_is_valid(inputs.labels.map(|l| l[r]));
                    super::accumulate_row(g, keep, |buf| {
                        run(level, p, cfg, inputs, r, loss, Some(buf))
                    })
                } else {
                    run(level, p, cfg, inputs, r, loss, Some(g))
                }
            }),
        None => row_loss
            .par_iter_mut()
            .enumerate()
            .for_each(|(r, loss)| run::<G>(level, p, cfg, inputs, r, loss, None)),
    }
}

fn narrow_zero<G: Lanes>(g: &mut [G]) {
    let zeros = [0.0f32; CHUNK];
    for chunk in g.chunks_mut(CHUNK) {
        G::narrow(&zeros[..chunk.len()], chunk);
    }
}

struct TopKRow<'a> {
    p: &'a TopKParams,
    x: HostSlice<'a>,
    /// The row's ids in the caller's order (bucket i is `ids[i]`).
    ids: &'a [u32],
    /// (id, bucket), sorted by id.
    sorted: &'a [(u32, u32)],
    values: HostSlice<'a>,
    tail: f32,
    /// The label when the hard loss needs it (valid rows only).
    label: Option<usize>,
    grad: Option<HostSliceMut<'a>>,
}

/// `w * d` with `0 * anything = 0`.
fn xlogy(w: f32, d: f32) -> f32 {
    if w == 0.0 {
        0.0
    } else {
        w * d
    }
}

impl Kernel for TopKRow<'_> {
    type Output = f32;

    #[inline(always)]
    fn run<M: MulAdd>(mut self) -> f32 {
        let p = *self.p;
        let (x, n, k) = (self.x, self.x.len(), self.ids.len());
        let soft = p.soft;
        let hard = p.hard_weight != 0.0 && self.label.is_some();
        // The cross-entropy's statistics are the soft ones when T = 1.
        let hard_own = hard && (soft.is_none() || p.inv_t != 1.0);
        let mut bx = [0.0f32; CHUNK];
        let mut bm = [0.0f32; CHUNK];
        let mut be = [0.0f32; CHUNK];

        // ---- pass 1: max over the row, the tail's sum, the cross-entropy's statistics.
        let mut tail = MaxSum::EMPTY;
        let mut st1 = MaxSum::EMPTY;
        let mut next = 0; // first entry of `sorted` not yet passed
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let xs = widen(x, start..end, &mut bx, NEG_INF);
            if hard_own {
                st1.raise::<M>(simd::max(xs), LOG2_E);
                st1.add::<M>(xs, LOG2_E, &mut be);
            }
            if soft.is_some() {
                tail.raise::<M>(simd::max(xs), p.scale2);
                let masked = &mut bm[..xs.len()];
                masked.copy_from_slice(xs);
                while next < k && (self.sorted[next].0 as usize) < end {
                    masked[self.sorted[next].0 as usize - start] = NEG_INF;
                    next += 1;
                }
                tail.add::<M>(masked, p.scale2, &mut be);
            }
        }
        if hard && !hard_own {
            // T = 1 with the soft loss on: z_1 = z_tail + the top entries' share (below).
            st1 = tail;
        }

        // ---- the top entries, the teacher's buckets, the soft loss.
        let mut loss = 0.0f32;
        let mut log_z = 0.0f32; // natural log of z, relative to m
        let mut fkl_tail_coef = 0.0f32; // forward KL: p_tail / z_tail, the tail's pull per e_v
        let mut rkl_tail = 0.0f32; // reverse KL: log Q_tail - log p_tail - R
        let mut kl_rev = 0.0f32;
        let mut top = Vec::new(); // per bucket i: (s_i, log Q_i, log p_i)
        if let Some(kind) = soft {
            let m = tail.m;
            let s_top: Vec<f32> = self.ids.iter().map(|&id| x.get_f32(id as usize)).collect();
            let e_top: f32 = s_top.iter().map(|&s| exp2::<M>((s - m) * p.scale2)).sum();
            let z = tail.z + e_top;
            log_z = log2::<M>(z) * LN_2;
            let log_q_tail = log2::<M>(tail.z) * LN_2 - log_z;
            if hard && !hard_own {
                st1.z = z;
            }
            // The teacher's buckets at T, normalised: l / T for the ids, the tail as given at T.
            let c: Vec<f32> = (0..k)
                .map(|i| self.values.get_f32(i) * p.inv_t)
                .chain([self.tail])
                .collect();
            let lp = log_softmax(&c);
            let p_tail = lp[k].exp();
            top = (0..k)
                .map(|i| (s_top[i], (s_top[i] - m) * p.inv_t - log_z, lp[i]))
                .collect();
            match kind {
                LossKind::ForwardKl => {
                    loss = top
                        .iter()
                        .map(|&(_, lq, lp)| xlogy(lp.exp(), lp - lq))
                        .sum();
                    loss += xlogy(p_tail, lp[k] - log_q_tail);
                    fkl_tail_coef = if p_tail == 0.0 { 0.0 } else { p_tail / tail.z };
                }
                _ => {
                    kl_rev = top
                        .iter()
                        .map(|&(_, lq, lp)| xlogy(lq.exp(), lq - lp))
                        .sum();
                    kl_rev += xlogy(log_q_tail.exp(), log_q_tail - lp[k]);
                    rkl_tail = log_q_tail - lp[k] - kl_rev;
                    loss = kl_rev;
                }
            }
            loss *= p.soft_weight;
        }
        let log2_z1 = log2::<M>(st1.z);
        if hard {
            let y = self.label.expect("hard implies a label");
            let s_y = x.get_f32(y);
            loss += p.hard_weight * -((s_y - st1.m) - log2_z1 * LN_2);
        }

        // ---- pass 2: the gradient.
        let Some(grad) = self.grad.as_mut() else {
            return loss;
        };
        let w_soft = p.grad_scale * p.soft_weight * p.inv_t;
        let w_hard = p.grad_scale * p.hard_weight;
        let log2_z = log_z * LOG2_E;
        let inv_z = exp2::<M>(-log2_z);
        let m = tail.m;
        // One entry's gradient given its logit and bucket (k: tail) and whether it is the label.
        let entry = |s: f32, bucket: usize, is_label: bool| -> f32 {
            let mut g = 0.0f32;
            if let Some(kind) = soft {
                let q = exp2::<M>((s - m) * p.scale2 - log2_z);
                g += w_soft
                    * match (kind, bucket < k) {
                        (LossKind::ForwardKl, true) => q - top[bucket].2.exp(),
                        (LossKind::ForwardKl, false) => {
                            q - fkl_tail_coef * exp2::<M>((s - m) * p.scale2)
                        }
                        (_, true) => xlogy(q, top[bucket].1 - top[bucket].2 - kl_rev),
                        (_, false) => xlogy(q, rkl_tail),
                    };
            }
            if hard {
                let q1 = exp2::<M>((s - st1.m) * LOG2_E - log2_z1);
                g += w_hard * (q1 - if is_label { 1.0 } else { 0.0 });
            }
            g
        };
        let mut bg = [0.0f32; CHUNK];
        let mut next = 0;
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let xs = widen(x, start..end, &mut bx, NEG_INF);
            let gs = &mut bg[..xs.len()];
            gs.fill(0.0);
            if let Some(kind) = soft {
                // The tail's formula, linear in e = 2^((s - m) scale2) for forward KL.
                let e = &mut be[..xs.len()];
                for (o, &v) in e.iter_mut().zip(xs) {
                    *o = exp2::<M>((v - m) * p.scale2);
                }
                match kind {
                    LossKind::ForwardKl => {
                        let c = w_soft * (inv_z - fkl_tail_coef);
                        for (g, &e) in gs.iter_mut().zip(e.iter()) {
                            *g = c * e;
                        }
                    }
                    _ => {
                        let c = w_soft * inv_z;
                        for (g, &e) in gs.iter_mut().zip(e.iter()) {
                            let q = c * e;
                            *g = if e == 0.0 { 0.0 } else { q * rkl_tail };
                        }
                    }
                }
            }
            if hard {
                let e = &mut be[..xs.len()];
                for (o, &v) in e.iter_mut().zip(xs) {
                    *o = exp2::<M>(M::mul_add(v - st1.m, LOG2_E, -log2_z1));
                }
                for (g, &q1) in gs.iter_mut().zip(e.iter()) {
                    *g = M::mul_add(w_hard, q1, *g);
                }
            }
            // The chunk's top ids and the label get their own values.
            while next < k && (self.sorted[next].0 as usize) < end {
                let (id, b) = self.sorted[next];
                let is_label = self.label == Some(id as usize) && hard;
                gs[id as usize - start] = entry(x.get_f32(id as usize), b as usize, is_label);
                next += 1;
            }
            if let Some(y) = self.label.filter(|&y| hard && (start..end).contains(&y)) {
                if self
                    .sorted
                    .binary_search_by_key(&(y as u32), |e| e.0)
                    .is_err()
                {
                    gs[y - start] = entry(x.get_f32(y), k, true);
                }
            }
            narrow_into(&gs[..end - start], grad, start);
        }
        loss
    }
}

/// `x - logsumexp(x)` in f32 about the maximum; NaN everywhere for a NaN or an all `-inf` list.
fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(NEG_INF, f32::max);
    if x.iter().any(|v| v.is_nan()) || max == NEG_INF {
        return vec![f32::NAN; x.len()];
    }
    let sum: f32 = x.iter().map(|&v| (v - max).exp()).sum();
    let lse = max + sum.ln();
    x.iter().map(|&v| v - lse).collect()
}
