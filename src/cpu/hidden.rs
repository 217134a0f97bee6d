//! Hidden-state MSE, `weight * mean_h (h_s - h_t)^2` per valid row, and its gradient
//! `grad_scale * weight * 2 (h_s - h_t) / H`: one pass per row, chunked and vectorized like the
//! loss.

use rayon::prelude::*;

use super::fastmath::MulAdd;
use super::simd::{self, hsum, Kernel, Lanes, SimdLevel, CHUNK, W};
use super::{narrow_into, row_of, widen};
use crate::dtype::{HostSlice, HostSliceMut};
use crate::semantics::{HiddenInputs, LossConfig};

/// Adds every valid row's weighted MSE to `row_loss` and writes the gradient (0 in invalid rows
/// and everywhere when the weight is 0, in which case the hidden states are not read).
pub(super) fn rows<G: Lanes>(
    level: SimdLevel,
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
        let row = HiddenRow {
            hs: row_of(h.student, r, size),
            ht: row_of(h.teacher, r, size),
            grad: grad.map(G::host_mut),
            grad_factor: grad_scale * weight * 2.0 / size as f32,
        };
        weight * (simd::run(level, row) / size as f32)
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

/// One row: returns `sum (h_s - h_t)^2`, writes `grad_factor (h_s - h_t)`.
struct HiddenRow<'a> {
    hs: HostSlice<'a>,
    ht: HostSlice<'a>,
    grad: Option<HostSliceMut<'a>>,
    grad_factor: f32,
}

impl Kernel for HiddenRow<'_> {
    type Output = f32;

    #[inline(always)]
    fn run<M: MulAdd>(mut self) -> f32 {
        let n = self.hs.len();
        let (mut ba, mut bb, mut bo) = ([0.0f32; CHUNK], [0.0f32; CHUNK], [0.0f32; CHUNK]);
        let mut total = 0.0f32;
        for start in (0..n).step_by(CHUNK) {
            let range = start..(start + CHUNK).min(n);
            // Padding with 0 in both: a difference of 0 adds nothing.
            let a = widen(self.hs, range.clone(), &mut ba, 0.0);
            let b = widen(self.ht, range.clone(), &mut bb, 0.0);
            let mut acc = [0.0f32; W];
            for ((ab, bb), ob) in a
                .chunks_exact(W)
                .zip(b.chunks_exact(W))
                .zip(bo.chunks_exact_mut(W))
            {
                for l in 0..W {
                    let d = ab[l] - bb[l];
                    acc[l] = M::mul_add(d, d, acc[l]);
                    ob[l] = self.grad_factor * d;
                }
            }
            total += hsum(acc);
            if let Some(g) = self.grad.as_mut() {
                narrow_into(&bo[..range.len()], g, range.start);
            }
        }
        total
    }
}
