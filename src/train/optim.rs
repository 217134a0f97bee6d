//! AdamW, gradient clipping and the learning-rate schedule. Everything here works on the flat
//! parameter/gradient buffers of [`crate::model::Llama`] and is bit-deterministic: element-wise
//! updates do not depend on how rayon splits them, and the one reduction (the gradient norm) is
//! summed over fixed chunks in a fixed order.

use crate::model::ParamLayout;
use crate::train::error::{Result, TrainError as Error};
use rayon::prelude::*;
use std::ops::Range;

/// Elements per parallel work item: large enough that scheduling is negligible, small enough
/// that a few-million-parameter model still spreads over every core. The norm's partial sums are
/// taken over chunks of exactly this size, so it must never depend on the thread count.
const CHUNK: usize = 1 << 15;

/// Which parameters get weight decay, as runs of consecutive indices (a per-element `Vec<bool>`
/// would cost a byte per parameter for what is a handful of tensor boundaries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecayMask {
    /// `(end, decay)`: the run `previous end .. end` decays iff `decay`. Adjacent runs differ.
    runs: Vec<(usize, bool)>,
}

impl DecayMask {
    /// Decay the 2-D tensors (embedding and linear weights) and not the 1-D RMSNorm weights,
    /// as the common GPT/Llama recipes do: decaying a norm's gain towards 0 only hurts.
    pub fn from_layout(layout: &ParamLayout) -> Self {
        let mut tensors: Vec<_> = layout.tensors().iter().collect();
        tensors.sort_by_key(|t| t.span.offset);
        let mut mask = DecayMask { runs: Vec::new() };
        for t in tensors {
            mask.push(t.span.len, t.shape.len() >= 2);
        }
        mask
    }

    /// Every one of `n` parameters decays.
    pub fn all(n: usize) -> Self {
        let mut mask = DecayMask { runs: Vec::new() };
        mask.push(n, true);
        mask
    }

    /// None of `n` parameters decays.
    pub fn none(n: usize) -> Self {
        let mut mask = DecayMask { runs: Vec::new() };
        mask.push(n, false);
        mask
    }

    /// Appends `len` parameters with the given decay flag (for trainable tensors the trainer
    /// keeps after the model's parameters in the same buffer).
    pub fn push(&mut self, len: usize, decay: bool) {
        if len == 0 {
            return;
        }
        let end = self.len() + len;
        match self.runs.last_mut() {
            Some(last) if last.1 == decay => last.0 = end,
            _ => self.runs.push((end, decay)),
        }
    }

    /// Number of parameters the mask covers.
    pub fn len(&self) -> usize {
        self.runs.last().map_or(0, |r| r.0)
    }

    /// Whether the mask covers no parameters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether parameter `i` decays (`false` beyond the end).
    pub fn decays(&self, i: usize) -> bool {
        let k = self.runs.partition_point(|r| r.0 <= i);
        self.runs.get(k).is_some_and(|r| r.1)
    }

    /// The runs as index ranges with their flag, in order.
    pub fn runs(&self) -> impl Iterator<Item = (Range<usize>, bool)> + '_ {
        let starts = std::iter::once(0).chain(self.runs.iter().map(|r| r.0));
        starts.zip(self.runs.iter()).map(|(s, &(e, d))| (s..e, d))
    }
}

/// AdamW (Loshchilov & Hutter): bias-corrected moments, weight decay decoupled from the
/// gradient (`p -= lr * wd * p`, applied only where the mask says so), f32 state, one flat
/// buffer like the params. The arithmetic follows PyTorch's `torch.optim.AdamW`
/// (`p *= 1 - lr*wd`, then `p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`), so runs compare.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    /// First-moment decay, in [0, 1).
    pub beta1: f32,
    /// Second-moment decay, in [0, 1).
    pub beta2: f32,
    /// Added to the bias-corrected `sqrt(v)` in the denominator; finite and > 0.
    pub eps: f32,
    /// Decoupled decay: masked parameters are multiplied by `1 - lr * weight_decay` each update;
    /// finite and >= 0.
    pub weight_decay: f32,
    /// First moment, one per parameter.
    pub m: Vec<f32>,
    /// Second moment, one per parameter.
    pub v: Vec<f32>,
    /// Updates done so far; the next update is number `step + 1` for the bias correction.
    pub step: u64,
}

fn invalid(name: &'static str, value: impl std::fmt::Display, reason: &'static str) -> Error {
    Error::InvalidOption {
        name,
        value: value.to_string(),
        reason,
    }
}

impl AdamW {
    /// Fresh state for `num_params` parameters: zero moments, step 0. The hyper-parameters are
    /// checked on each [`AdamW::update`], not here.
    pub fn new(num_params: usize, beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            m: vec![0.0; num_params],
            v: vec![0.0; num_params],
            step: 0,
        }
    }

    /// The hyper-parameters are usable (checked on every update, since the fields are public).
    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(invalid(name, b, "must be in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid("eps", self.eps, "must be finite and > 0"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(
                "weight_decay",
                self.weight_decay,
                "must be finite and >= 0",
            ));
        }
        if self.m.len() != self.v.len() {
            return Err(Error::ShapeMismatch {
                tensor: "adam_v",
                expected: self.m.len(),
                actual: self.v.len(),
                shape: "one second moment per first moment".into(),
            });
        }
        Ok(())
    }

    /// One update with learning rate `lr`; `decay` says which parameters get weight decay.
    /// Nothing is modified when an argument is rejected.
    pub fn update(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        decay: &DecayMask,
        lr: f32,
    ) -> Result<()> {
        let lengths = [
            ("params", params.len()),
            ("grads", grads.len()),
            ("decay_mask", decay.len()),
        ];
        self.check_update(self.m.len(), &lengths, lr)?;
        self.step += 1;
        let AdamWScalars {
            step_size,
            bc2_sqrt,
            shrink,
        } = self.scalars(lr, self.step);
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        for (range, decays) in decay.runs() {
            let shrink = if decays { shrink } else { 1.0 };
            params[range.clone()]
                .par_chunks_mut(CHUNK)
                .zip(grads[range.clone()].par_chunks(CHUNK))
                .zip(self.m[range.clone()].par_chunks_mut(CHUNK))
                .zip(self.v[range].par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for i in 0..p.len() {
                        let gi = g[i];
                        m[i] = b1 * m[i] + (1.0 - b1) * gi;
                        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                        let denom = v[i].sqrt() / bc2_sqrt + eps;
                        p[i] = p[i] * shrink - step_size * (m[i] / denom);
                    }
                });
        }
        Ok(())
    }
}

/// The per-update numbers of AdamW that do not depend on the element, computed once on the host:
/// the CPU update and the device kernel (`dk_adamw_f32`) both take them from
/// [`AdamW::scalars`], so they agree to the bit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    /// `1 - lr * weight_decay`: the factor of a decaying parameter.
    pub shrink: f32,
}

impl AdamW {
    /// The scalars of update number `t` (1-based) at learning rate `lr`.
    pub fn scalars(&self, lr: f32, t: u64) -> AdamWScalars {
        // Bias corrections in f64: beta^t underflows gracefully and t may exceed i32.
        let t = t as f64;
        let bc1 = 1.0 - (self.beta1 as f64).powf(t);
        let bc2 = 1.0 - (self.beta2 as f64).powf(t);
        AdamWScalars {
            step_size: (lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            shrink: 1.0 - lr * self.weight_decay,
        }
    }

    /// The checks of [`AdamW::update`] on its arguments, for an update whose buffers live
    /// elsewhere (the device optimizer): hyper-parameters, `lr`, and `n` elements everywhere.
    pub fn check_update(&self, n: usize, lengths: &[(&'static str, usize)], lr: f32) -> Result<()> {
        self.validate()?;
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(invalid("lr", lr, "must be finite and >= 0"));
        }
        for &(tensor, len) in lengths {
            if len != n {
                return Err(Error::ShapeMismatch {
                    tensor,
                    expected: n,
                    actual: len,
                    shape: "one per parameter of the optimizer".into(),
                });
            }
        }
        Ok(())
    }
}

/// Global L2 norm of the gradient (accumulated in f64 over fixed chunks summed in order, so it
/// is independent of the thread count), and scales in place so the norm is at most `max_norm`;
/// returns the norm before clipping. A non-finite norm leaves the gradient untouched (the caller
/// decides whether to skip the step), and so does a `max_norm` that is NaN or negative.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let partial: Vec<f64> = grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
        .collect();
    let norm = partial.iter().sum::<f64>().sqrt();
    if norm.is_finite() && max_norm >= 0.0 && norm > max_norm as f64 {
        let scale = (max_norm as f64 / norm) as f32;
        grads
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= scale));
    }
    norm as f32
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `peak * min_ratio`
/// at `total` steps, constant after. Step 0 is the first update; like Hugging Face's
/// `get_cosine_with_min_lr_schedule_with_warmup`, `lr(0) = 0` when there is a warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Learning rate at the end of warm-up.
    pub peak: f32,
    /// Steps of linear warm-up from 0; at most `total`.
    pub warmup: u64,
    /// Step at which the cosine reaches `peak * min_ratio`.
    pub total: u64,
    /// Final learning rate as a fraction of `peak`, in [0, 1].
    pub min_ratio: f32,
}

impl LrSchedule {
    /// The schedule is meaningful: `peak` finite and >= 0, `min_ratio` in [0, 1],
    /// `warmup <= total`.
    pub fn validate(&self) -> Result<()> {
        if !(self.peak.is_finite() && self.peak >= 0.0) {
            return Err(invalid("peak", self.peak, "must be finite and >= 0"));
        }
        if !(0.0..=1.0).contains(&self.min_ratio) {
            return Err(invalid("min_ratio", self.min_ratio, "must be in [0, 1]"));
        }
        if self.warmup > self.total {
            return Err(invalid(
                "warmup",
                self.warmup,
                "must not exceed the total number of steps",
            ));
        }
        Ok(())
    }

    /// Learning rate of update `step` (0-based). Does not validate: call [`LrSchedule::validate`]
    /// first.
    pub fn lr(&self, step: u64) -> f32 {
        let peak = self.peak as f64;
        if step < self.warmup {
            return (peak * step as f64 / self.warmup as f64) as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let min = self.min_ratio as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (peak * (min + (1.0 - min) * cosine)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Llama, LlamaConfig};

    /// Scalar f64 AdamW, written from the paper's algorithm.
    fn reference(p: &mut f64, m: &mut f64, v: &mut f64, g: f64, t: i32, lr: f64, wd: f64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        let mhat = *m / (1.0 - b1.powi(t));
        let vhat = *v / (1.0 - b2.powi(t));
        *p -= lr * (mhat / (vhat.sqrt() + eps) + wd * *p);
    }

    #[test]
    fn adamw_matches_scalar_f64_reference() {
        let n = 5;
        let mut opt = AdamW::new(n, 0.9, 0.999, 1e-8, 0.1);
        let mut params = vec![0.5f32, -1.0, 2.0, 0.0, 3.0];
        let mut refp: Vec<f64> = params.iter().map(|&p| p as f64).collect();
        let mut refm = vec![0.0f64; n];
        let mut refv = vec![0.0f64; n];
        let lr = 1e-2f32;
        for t in 1..=4 {
            let grads: Vec<f32> = (0..n).map(|i| (i as f32 - 2.0) * 0.3 * t as f32).collect();
            opt.update(&mut params, &grads, &DecayMask::all(n), lr)
                .unwrap();
            for i in 0..n {
                reference(
                    &mut refp[i],
                    &mut refm[i],
                    &mut refv[i],
                    grads[i] as f64,
                    t,
                    lr as f64,
                    0.1,
                );
            }
            for i in 0..n {
                assert!(
                    (params[i] as f64 - refp[i]).abs() < 1e-6,
                    "step {t} param {i}: {} vs {}",
                    params[i],
                    refp[i]
                );
            }
            if t == 1 {
                // With bias correction the first step moves every param with a non-zero
                // gradient by lr (times sign) plus decay; without it the move would be ~lr/3.
                let moved = params[0] as f64 - 0.5 * (1.0 - 1e-2 * 0.1);
                assert!((moved - 1e-2).abs() < 1e-6, "first-step move {moved}");
            }
        }
        assert_eq!(opt.step, 4);
    }

    #[test]
    fn decay_only_on_masked_params() {
        let mut mask = DecayMask::none(2);
        mask.push(2, true);
        assert_eq!(mask.len(), 4);
        assert_eq!(
            (0..5).map(|i| mask.decays(i)).collect::<Vec<_>>(),
            [false, false, true, true, false]
        );
        let mut opt = AdamW::new(4, 0.9, 0.999, 1e-8, 0.5);
        let mut params = vec![1.0f32; 4];
        opt.update(&mut params, &[0.0; 4], &mask, 0.1).unwrap();
        assert_eq!(params, [1.0, 1.0, 0.95, 0.95]);
    }

    #[test]
    fn mask_from_layout_decays_matrices_only() {
        let cfg = LlamaConfig {
            vocab_size: 7,
            hidden_size: 4,
            intermediate_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            tie_word_embeddings: true,
            ..LlamaConfig::default()
        };
        let model = Llama::new(cfg).unwrap();
        let mask = DecayMask::from_layout(model.layout());
        assert_eq!(mask.len(), model.num_params());
        for t in model.layout().tensors() {
            for i in t.span.range() {
                assert_eq!(mask.decays(i), !t.name.contains("norm"), "{}", t.name);
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors_and_change_nothing() {
        let mut opt = AdamW::new(3, 0.9, 0.999, 1e-8, 0.0);
        let mut p = vec![1.0f32; 3];
        assert!(opt
            .update(&mut p, &[1.0; 2], &DecayMask::all(3), 0.1)
            .is_err());
        assert!(opt
            .update(&mut p, &[1.0; 3], &DecayMask::all(2), 0.1)
            .is_err());
        assert!(opt
            .update(&mut p, &[1.0; 3], &DecayMask::all(3), f32::NAN)
            .is_err());
        opt.beta2 = 1.0;
        assert!(opt
            .update(&mut p, &[1.0; 3], &DecayMask::all(3), 0.1)
            .is_err());
        assert_eq!(p, [1.0; 3]);
        assert_eq!(opt.step, 0);
    }

    #[test]
    fn update_is_bit_identical_across_thread_counts() {
        let n = 3 * CHUNK + 17;
        let grads: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut g = grads.clone();
                let norm = clip_grad_norm(&mut g, 1.0);
                let mut opt = AdamW::new(n, 0.9, 0.95, 1e-8, 0.1);
                let mut p = vec![0.25f32; n];
                let mut mask = DecayMask::all(n / 2);
                mask.push(n - n / 2, false);
                for _ in 0..3 {
                    opt.update(&mut p, &g, &mask, 1e-3).unwrap();
                }
                (
                    norm.to_bits(),
                    p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                )
            })
        };
        assert_eq!(run(1), run(4));
    }

    #[test]
    fn clip_scales_to_max_norm_exactly() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert_eq!(g, [0.6, 0.8]);
        let mut small = vec![0.3f32, 0.4];
        assert_eq!(clip_grad_norm(&mut small, 1.0), 0.5);
        assert_eq!(small, [0.3, 0.4]);
        let mut big: Vec<f32> = (0..100_000).map(|i| (i % 13) as f32 - 6.0).collect();
        let before = clip_grad_norm(&mut big, 2.5);
        assert!(before > 2.5);
        let after = clip_grad_norm(&mut big, f32::INFINITY);
        assert!(
            (after - 2.5).abs() < 2.5 * 1e-6,
            "norm after clipping {after}"
        );
    }

    #[test]
    fn clip_leaves_non_finite_gradients_alone() {
        let mut g = vec![1.0f32, f32::NAN, 2.0];
        assert!(clip_grad_norm(&mut g, 1.0).is_nan());
        assert_eq!((g[0], g[2]), (1.0, 2.0));
        let mut g = vec![f32::INFINITY, 2.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), f32::INFINITY);
        assert_eq!(g[1], 2.0);
        assert_eq!(clip_grad_norm(&mut [], 1.0), 0.0);
    }

    #[test]
    fn schedule_endpoints_and_monotonicity() {
        let s = LrSchedule {
            peak: 1e-3,
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        };
        s.validate().unwrap();
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-9);
        assert!((s.lr(10) - 1e-3).abs() < 1e-9);
        assert!((s.lr(60) - 1e-3 * 0.55).abs() < 1e-9);
        assert!((s.lr(110) - 1e-4).abs() < 1e-10);
        assert_eq!(s.lr(110), s.lr(10_000));
        for t in 0..10 {
            assert!(s.lr(t) < s.lr(t + 1), "warm-up must rise at {t}");
        }
        for t in 10..110 {
            assert!(s.lr(t) > s.lr(t + 1), "decay must fall at {t}");
        }
        let flat = LrSchedule {
            peak: 2.0,
            warmup: 0,
            total: 0,
            min_ratio: 1.0,
        };
        assert_eq!((flat.lr(0), flat.lr(99)), (2.0, 2.0));
        assert!(LrSchedule {
            warmup: 5,
            total: 4,
            ..flat
        }
        .validate()
        .is_err());
        assert!(LrSchedule {
            min_ratio: 1.5,
            ..s
        }
        .validate()
        .is_err());
    }
}
