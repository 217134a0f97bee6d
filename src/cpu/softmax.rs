//! `softmax(x / T)` and `log_softmax(x / T)` row by row, and their backward, with the chunked
//! two-pass scheme of the fused loss: pass 1 gathers the running maximum and sum of
//! exponentials, pass 2 writes `(x - max) / T - log z` (or its exponential).

use rayon::prelude::*;

use super::fastmath::{exp, exp2_nonpositive, log2, MulAdd};
use super::simd::{self, hsum, Kernel, Lanes, MaxSum, SimdLevel, CHUNK, W};
use super::{narrow_into, row_of, widen};
use crate::dtype::{HostSlice, HostSliceMut};
use std::f32::consts::{LN_2, LOG2_E};

const NEG_INF: f32 = f32::NEG_INFINITY;

/// Every row of `input` into `output` (same dtype), one row per rayon task.
pub(super) fn rows<E: Lanes>(
    level: SimdLevel,
    input: HostSlice,
    vocab: usize,
    inv_t: f32,
    log: bool,
    output: &mut [E],
) {
    output
        .par_chunks_mut(vocab)
        .enumerate()
        .for_each(|(r, out)| {
            let row = SoftmaxRow {
                x: row_of(input, r, vocab),
                out: E::host_mut(out),
                inv_t,
                log,
            };
            simd::run(level, row)
        });
}

struct SoftmaxRow<'a> {
    x: HostSlice<'a>,
    out: HostSliceMut<'a>,
    inv_t: f32,
    log: bool,
}

impl Kernel for SoftmaxRow<'_> {
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd>(mut self) {
        let (x, inv_t, n) = (self.x, self.inv_t, self.x.len());
        let scale2 = inv_t * LOG2_E;
        let mut bx = [0.0f32; CHUNK];
        let mut bo = [0.0f32; CHUNK];
        let mut st = MaxSum::EMPTY;
        for start in (0..n).step_by(CHUNK) {
            let xs = widen(x, start..(start + CHUNK).min(n), &mut bx, NEG_INF);
            st.raise::<M>(simd::max(xs), scale2);
            st.add::<M>(xs, scale2, &mut bo);
        }
        let log2_z = log2::<M>(st.z);
        let log_z = log2_z * LN_2;
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let xs = widen(x, start..end, &mut bx, NEG_INF);
            if self.log {
                for (o, &v) in bo.iter_mut().zip(xs) {
                    *o = M::mul_add(v - st.m, inv_t, -log_z);
                }
            } else {
                for (o, &v) in bo.iter_mut().zip(xs) {
                    *o = exp2_nonpositive::<M>(M::mul_add(v - st.m, scale2, -log2_z));
                }
            }
            narrow_into(&bo[..end - start], &mut self.out, start);
        }
    }
}

/// The backward of every row: softmax `y (dy - sum(y dy)) / T`, log_softmax
/// `(dy - exp(y) sum(dy)) / T`; one row per rayon task.
pub(super) fn backward_rows<E: Lanes>(
    level: SimdLevel,
    y: HostSlice,
    dy: HostSlice,
    vocab: usize,
    inv_t: f32,
    log: bool,
    dx: &mut [E],
) {
    dx.par_chunks_mut(vocab).enumerate().for_each(|(r, dx)| {
        let row = BackwardRow {
            y: row_of(y, r, vocab),
            dy: row_of(dy, r, vocab),
            dx: E::host_mut(dx),
            inv_t,
            log,
        };
        simd::run(level, row)
    });
}

struct BackwardRow<'a> {
    y: HostSlice<'a>,
    dy: HostSlice<'a>,
    dx: HostSliceMut<'a>,
    inv_t: f32,
    log: bool,
}

impl Kernel for BackwardRow<'_> {
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd>(mut self) {
        let (inv_t, n) = (self.inv_t, self.y.len());
        let (mut by, mut bd, mut bo) = ([0.0f32; CHUNK], [0.0f32; CHUNK], [0.0f32; CHUNK]);
        // Pass 1: sum(dy) (log_softmax) or sum(y dy) (softmax); padding with 0 adds nothing.
        let mut total = 0.0f32;
        for start in (0..n).step_by(CHUNK) {
            let range = start..(start + CHUNK).min(n);
            let ds = widen(self.dy, range.clone(), &mut bd, 0.0);
            if self.log {
                total += simd::sum(ds);
            } else {
                let ys = widen(self.y, range, &mut by, 0.0);
                let mut acc = [0.0f32; W];
                for (yb, db) in ys.chunks_exact(W).zip(ds.chunks_exact(W)) {
                    for l in 0..W {
                        acc[l] = M::mul_add(yb[l], db[l], acc[l]);
                    }
                }
                total += hsum(acc);
            }
        }
        // Pass 2: the gradient.
        for start in (0..n).step_by(CHUNK) {
            let range = start..(start + CHUNK).min(n);
            let ys = widen(self.y, range.clone(), &mut by, 0.0);
            let ds = widen(self.dy, range.clone(), &mut bd, 0.0);
            if self.log {
                for ((o, &y), &d) in bo.iter_mut().zip(ys).zip(ds) {
                    *o = (d - exp::<M>(y) * total) * inv_t;
                }
            } else {
                for ((o, &y), &d) in bo.iter_mut().zip(ys).zip(ds) {
                    *o = y * (d - total) * inv_t;
                }
            }
            narrow_into(&bo[..range.len()], &mut self.dx, range.start);
        }
    }
}
