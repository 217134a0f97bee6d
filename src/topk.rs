//! A teacher's top-k entries per row, taken from its dense logits: what an offline teacher cache
//! stores and what [`crate::TopKTeacher`] reads. Computed on the host in f64, so the values and
//! the tails are the exact quantities rounded once. The tail bucket's logit depends on the
//! temperature (`log sum_tail p_u^(1/T)`), so it is kept on a grid of temperatures and
//! interpolated between them ([`tail_at`]).

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
    /// `[rows]` the log of the teacher's mass on every other id (`-inf` when it has none): the
    /// tail bucket's logit at T = 1.
    pub tail: Vec<f32>,
    /// The tail bucket's logits at other temperatures: `(T, [rows] log sum_tail p_u^(1/T))`,
    /// in ascending T (from [`TopKRows::from_logits_at`]).
    pub tempered: Vec<(f32, Vec<f32>)>,
}

impl TopKRows {
    /// The top `k` of each row of `[rows, vocab]` logits. A row with a NaN gets NaN values and
    /// tail (its ids are then the first k by the order above with NaN sorted last).
    pub fn from_logits(logits: HostSlice, rows: usize, vocab: usize, k: usize) -> Result<Self> {
        Self::from_logits_at(logits, rows, vocab, k, &[])
    }

    /// [`TopKRows::from_logits`], with the tail's logit also at each of `temperatures` (T = 1 is
    /// always kept; the others are sorted and deduplicated).
    pub fn from_logits_at(
        logits: HostSlice,
        rows: usize,
        vocab: usize,
        k: usize,
        temperatures: &[f32],
    ) -> Result<Self> {
        check_top_k(k, vocab)?;
        let mut temps: Vec<f32> = temperatures.iter().copied().filter(|&t| t != 1.0).collect();
        if let Some(&t) = temps.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
            return Err(crate::Error::InvalidOption {
                name: "temperature",
                value: t.to_string(),
                reason: "must be finite and > 0",
            });
        }
        temps.sort_by(|a, b| a.total_cmp(b));
        temps.dedup();
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
            tempered: temps
                .iter()
                .map(|&t| (t, Vec::with_capacity(rows)))
                .collect(),
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
            // The tail's log-probabilities l_u; at T its logit is log sum exp(l_u / T).
            let mut rest: Vec<f64> = order[k..].iter().map(|&i| row[i as usize] - lse).collect();
            out.tail.push(log_sum_exp(&rest) as f32);
            for (t, tail) in &mut out.tempered {
                let inv_t = 1.0 / *t as f64;
                rest.iter_mut().zip(order[k..].iter()).for_each(|(x, &i)| {
                    *x = (row[i as usize] - lse) * inv_t;
                });
                tail.push(log_sum_exp(&rest) as f32);
            }
        }
        Ok(out)
    }

    /// The tail bucket's logits at temperature `t`: exact at T = 1 and at the temperatures
    /// kept, interpolated between them ([`tail_at`]).
    pub fn tail_at(&self, t: f32) -> Result<Vec<f32>> {
        let mut temps = vec![1.0f32];
        let mut grid = vec![&self.tail];
        for (tt, tail) in &self.tempered {
            temps.push(*tt);
            grid.push(tail);
        }
        let mut order: Vec<usize> = (0..temps.len()).collect();
        order.sort_by(|&a, &b| temps[a].total_cmp(&temps[b]));
        let temps: Vec<f32> = order.iter().map(|&i| temps[i]).collect();
        let n = temps.len();
        let mut tails = vec![0.0f32; self.rows() * n];
        for (j, &i) in order.iter().enumerate() {
            for (r, &v) in grid[i].iter().enumerate() {
                tails[r * n + j] = v;
            }
        }
        tail_at(&temps, &tails, t)
    }

    /// The rows as the loss's teacher input at the temperature `tail` was taken at (from
    /// [`TopKRows::tail_at`]).
    pub fn teacher_with<'a>(&'a self, tail: &'a [f32]) -> TopKTeacher<'a> {
        TopKTeacher {
            k: self.k,
            ids: &self.ids,
            values: HostSlice::F32(&self.values),
            tail,
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.tail.len()
    }

    /// The rows as the loss's teacher input at T = 1.
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

/// The tail bucket's logits at temperature `t` from `tails` `[rows, n]` known at the ascending
/// `temperatures` `[n]`: exact at a temperature of the grid; between two, linear in `1 / T`
/// (the logit `log sum_tail exp(l_u / T)` is a convex function of `1 / T`, so the interpolation
/// is an upper bound, tight at the grid points). A temperature outside the grid is an error:
/// extrapolating would be a guess.
pub fn tail_at(temperatures: &[f32], tails: &[f32], t: f32) -> Result<Vec<f32>> {
    let n = temperatures.len();
    let outside = || crate::Error::InvalidOption {
        name: "temperature",
        value: format!("{t} (the tail is known at T in {temperatures:?})"),
        reason: "is outside the temperatures the top-k teacher's tail was stored at; rebuild \
                 the cache with --tail-temperatures covering it",
    };
    if n == 0 || !tails.len().is_multiple_of(n) {
        return Err(outside());
    }
    let hi = temperatures
        .iter()
        .position(|&x| x >= t)
        .ok_or_else(outside)?;
    let rows = tails.chunks_exact(n);
    if temperatures[hi] == t {
        return Ok(rows.map(|r| r[hi]).collect());
    }
    if hi == 0 {
        return Err(outside());
    }
    let lo = hi - 1;
    let (b, b0, b1) = (
        1.0 / t as f64,
        1.0 / temperatures[lo] as f64,
        1.0 / temperatures[hi] as f64,
    );
    let w = (b - b1) / (b0 - b1); // weight of the lower temperature's value
    Ok(rows
        .map(|r| {
            let (f0, f1) = (r[lo] as f64, r[hi] as f64);
            if f0 == f1 {
                f0 as f32 // both -inf (an empty tail) or equal
            } else {
                (w * f0 + (1.0 - w) * f1) as f32
            }
        })
        .collect())
}
