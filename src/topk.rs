//! A teacher's top-k entries per row, taken from its dense logits: what an offline teacher cache
//! stores and what [`crate::TopKTeacher`] reads. Computed on the host in f64, so the values and
//! the tail are the exact log-probabilities rounded once.

use crate::dtype::HostSlice;
use crate::error::Result;
use crate::semantics::{check_top_k, TopKTeacher};

/// Owned top-k rows: `[rows, k]` ids and log-probabilities at T = 1, `[rows]` tail log-masses.
#[derive(Debug, Clone, PartialEq)]
pub struct TopKRows {
    /// Entries per row.
    pub k: usize,
    /// `[rows, k]` ids, each row in descending order of probability (ties: smaller id first).
    pub ids: Vec<u32>,
    /// `[rows, k]` the teacher's log-probabilities at T = 1 of those ids.
    pub values: Vec<f32>,
    /// `[rows]` the log of the teacher's mass on every other id (`-inf` when it has none).
    pub tail: Vec<f32>,
}

impl TopKRows {
    /// The top `k` of each row of `[rows, vocab]` logits. A row with a NaN gets NaN values and
    /// tail (its ids are then the first k by the order above with NaN sorted last).
    pub fn from_logits(logits: HostSlice, rows: usize, vocab: usize, k: usize) -> Result<Self> {
        check_top_k(k, vocab)?;
        if logits.len() != rows * vocab {
            return Err(crate::Error::ShapeMismatch {
                tensor: "teacher_logits",
                expected: rows * vocab,
                actual: logits.len(),
                shape: format!("[{rows}, {vocab}]"),
            });
        }
        let mut out = TopKRows {
            k,
            ids: Vec::with_capacity(rows * k),
            values: Vec::with_capacity(rows * k),
            tail: Vec::with_capacity(rows),
        };
        let mut row = vec![0.0f64; vocab];
        let mut order: Vec<u32> = Vec::with_capacity(vocab);
        for r in 0..rows {
            for (j, x) in row.iter_mut().enumerate() {
                *x = logits.get_f32(r * vocab + j) as f64;
            }
            let lse = log_sum_exp(&row);
            order.clear();
            order.extend(0..vocab as u32);
            // Descending value, NaN last, ties by id: a total order, so the choice is unique.
            let key = |&i: &u32| {
                let v = row[i as usize];
                (
                    if v.is_nan() { f64::NEG_INFINITY } else { v },
                    std::cmp::Reverse(i),
                )
            };
            let cmp = |a: &u32, b: &u32| key(b).partial_cmp(&key(a)).expect("no NaN keys");
            order.select_nth_unstable_by(k - 1, cmp);
            order[..k].sort_unstable_by(cmp);
            for &i in &order[..k] {
                out.ids.push(i);
                out.values.push((row[i as usize] - lse) as f32);
            }
            let rest: Vec<f64> = order[k..].iter().map(|&i| row[i as usize]).collect();
            out.tail.push((log_sum_exp(&rest) - lse) as f32);
        }
        Ok(out)
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.tail.len()
    }

    /// The rows as the loss's teacher input.
    pub fn teacher(&self) -> TopKTeacher<'_> {
        TopKTeacher {
            k: self.k,
            ids: &self.ids,
            values: HostSlice::F32(&self.values),
            tail: &self.tail,
        }
    }
}

/// `log sum exp(x)` in f64 about the maximum: `-inf` for an empty or all `-inf` slice, NaN with a
/// NaN, `+inf` with a `+inf`.
fn log_sum_exp(x: &[f64]) -> f64 {
    if x.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max.is_infinite() {
        return max;
    }
    max + x.iter().map(|&v| (v - max).exp()).sum::<f64>().ln()
}
