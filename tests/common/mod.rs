//! Shared test helpers: seeded inputs rounded to a dtype, tolerances, comparisons.
#![allow(dead_code)]

pub mod selftest;

use distill_kernels::{Dtype, HostVec};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::OnceLock;

/// The emulated device, opened once per test binary (each `open` costs a module load).
pub fn emulated() -> &'static distill_kernels::cuda::CudaKernels {
    static DEV: OnceLock<distill_kernels::cuda::CudaKernels> = OnceLock::new();
    DEV.get_or_init(|| {
        distill_kernels::cuda::CudaKernels::emulated()
            .expect("the emulated device must open in tests")
    })
}

pub fn cpu() -> &'static distill_kernels::cpu::Cpu {
    static CPU: OnceLock<distill_kernels::cpu::Cpu> = OnceLock::new();
    CPU.get_or_init(distill_kernels::cpu::Cpu::new)
}

/// Every backend under test (the reference is the oracle, not a subject).
pub fn subjects() -> Vec<&'static dyn distill_kernels::DistillDevice> {
    vec![cpu(), emulated()]
}

/// Student/teacher logit pairs that look like a real distillation batch: the student is the
/// teacher plus noise, with a per-row offset (softmax must be shift-invariant).
pub struct Batch {
    pub rows: usize,
    pub vocab: usize,
    pub student: HostVec,
    pub teacher: HostVec,
    pub labels: Vec<i64>,
}

pub fn batch(rows: usize, vocab: usize, sd: Dtype, td: Dtype, scale: f32, seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s = Vec::with_capacity(rows * vocab);
    let mut t = Vec::with_capacity(rows * vocab);
    for _ in 0..rows {
        let offset: f32 = rng.gen_range(-3.0..3.0);
        for _ in 0..vocab {
            let tv: f32 = rng.gen_range(-1.0f32..1.0) * scale;
            let noise: f32 = rng.gen_range(-0.5f32..0.5) * scale;
            t.push(tv);
            s.push(tv + noise + offset);
        }
    }
    let labels = (0..rows).map(|_| rng.gen_range(0..vocab as i64)).collect();
    Batch {
        rows,
        vocab,
        student: HostVec::from_f32(&s, sd),
        teacher: HostVec::from_f32(&t, td),
        labels,
    }
}

/// f32 copies of an input (exact: every dtype widens to f32 exactly).
pub fn widen(v: &HostVec) -> Vec<f32> {
    v.to_f32_vec()
}

/// `|a - r| <= atol + rtol |r|` elementwise, with infinities required to match exactly and NaN
/// only where the reference is NaN. Panics with the first offending index.
pub fn assert_close(what: &str, actual: &[f32], reference: &[f64], rtol: f64, atol: f64) {
    assert_eq!(actual.len(), reference.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&a, &r)) in actual.iter().zip(reference).enumerate() {
        let a = a as f64;
        if r.is_nan() {
            assert!(a.is_nan(), "{what}[{i}]: expected NaN, got {a}");
            continue;
        }
        if r.is_infinite() {
            assert_eq!(a, r, "{what}[{i}]: expected {r}, got {a}");
            continue;
        }
        let err = (a - r).abs();
        let bound = atol + rtol * r.abs();
        assert!(
            err <= bound,
            "{what}[{i}]: got {a}, reference {r}, error {err:.3e} > bound {bound:.3e}"
        );
        if err > worst.0 {
            worst = (err, i);
        }
    }
}

pub fn max_abs(v: &[f64]) -> f64 {
    v.iter()
        .filter(|x| x.is_finite())
        .fold(0.0, |m, x| m.max(x.abs()))
}

/// `rows` rows of `vocab` values placed `stride` apart; the padding is NaN, so a kernel that
/// reads it poisons the loss.
pub fn padded(v: &[f32], vocab: usize, stride: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; (v.len() / vocab - 1) * stride + vocab];
    for (r, row) in v.chunks(vocab).enumerate() {
        out[r * stride..r * stride + vocab].copy_from_slice(row);
    }
    out
}
