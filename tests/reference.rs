//! The f64 reference against calculus (finite differences) and hand-computed values, and the
//! CPU backend against the reference.

use distill_kernels::cpu::Cpu;
use distill_kernels::reference::{
    distill_loss_f64, distill_loss_f64_slices, softmax_backward_f64, softmax_f64, F64Hidden,
    F64Inputs, RefOutput, Reference,
};
use distill_kernels::{
    DistillDevice, DistillInputs, Dtype, Error, GradOutputs, HiddenInputs, HostSlice, HostSliceMut,
    HostVec, LossConfig, LossKind, LossValue, Reduction,
};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KINDS: [LossKind; 4] = [
    LossKind::ForwardKl,
    LossKind::ReverseKl,
    LossKind::Jsd { beta: 0.3 },
    LossKind::Jsd { beta: 0.7 },
];
const REDUCTIONS: [Reduction; 3] = [Reduction::None, Reduction::Sum, Reduction::Mean];
const ALPHAS: [f32; 3] = [0.0, 0.3, 1.0];
const TEMPERATURES: [f32; 4] = [0.5, 1.0, 2.0, 4.5];

/// Every combination of kind, reduction, alpha, temperature and T^2 scaling.
fn all_configs() -> Vec<LossConfig> {
    let mut out = Vec::new();
    for kind in KINDS {
        for reduction in REDUCTIONS {
            for alpha in ALPHAS {
                for temperature in TEMPERATURES {
                    for t2_scale in [false, true] {
                        out.push(
                            LossConfig::builder()
                                .kind(kind)
                                .reduction(reduction)
                                .alpha(alpha)
                                .temperature(temperature)
                                .t2_scale(t2_scale)
                                .build()
                                .unwrap(),
                        );
                    }
                }
            }
        }
    }
    out
}

fn uniform(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn uniform_f32(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn total(out: &RefOutput) -> f64 {
    out.loss.iter().sum()
}

// ---------------------------------------------------------------------------------------------
// Finite differences.

/// Central difference of `f` at `x[i]` with a step of about 1e-5 relative.
fn central_difference(x: &mut [f64], i: usize, f: &mut dyn FnMut(&[f64]) -> f64) -> f64 {
    let x0 = x[i];
    let h = 1e-5 * x0.abs().max(1.0);
    x[i] = x0 + h;
    let up = f(x);
    let xp = x[i];
    x[i] = x0 - h;
    let down = f(x);
    let xm = x[i];
    x[i] = x0;
    (up - down) / (xp - xm)
}

/// Central differences with h = 1e-5 have truncation error h^2 |f'''| / 6 and rounding error
/// about eps |f| / h. Here |f| <= ~100 (T^2 = 20 times a few rows), so rounding is <= ~1e-9,
/// and |f'''| is bounded by ~(1/T)^3 times the weights (<= ~50 at T = 0.5), so truncation is
/// <= ~1e-9 too; the worst error measured is 2e-10. 5e-9 absolute plus 1e-7 relative leaves a
/// margin of 25 while any wrong term (a missing 1/T or T^2, a sign, a dropped weight, a wrong
/// `R` in reverse KL) gives errors of 1e-3 or more.
const FD_ATOL: f64 = 5e-9;
const FD_RTOL: f64 = 1e-7;

fn assert_fd(what: &str, analytic: f64, fd: f64) {
    let err = (analytic - fd).abs();
    assert!(
        err <= FD_ATOL + FD_RTOL * fd.abs(),
        "{what}: analytic {analytic:e}, finite difference {fd:e}, error {err:e}"
    );
}

#[test]
fn gradients_match_finite_differences() {
    let (rows, vocab, hsize) = (3, 5, 4);
    let mut rng = StdRng::seed_from_u64(7);
    let student = uniform(&mut rng, rows * vocab, 3.0);
    let teacher = uniform(&mut rng, rows * vocab, 3.0);
    let hs = uniform(&mut rng, rows * hsize, 1.0);
    let ht = uniform(&mut rng, rows * hsize, 1.0);
    // Row 1 is ignored; the labels touch both ends of the vocabulary.
    let labels = [vocab as i64 - 1, -100, 0];

    let mut checked = 0;
    for base in all_configs() {
        let cfg = base
            .to_builder()
            .hidden_weight(0.7)
            .grad_scale(1.5)
            .build()
            .unwrap();
        let eval = |s: &[f64], h: &[f64]| {
            let inputs = F64Inputs {
                rows,
                vocab,
                student: s,
                teacher: &teacher,
                labels: Some(&labels),
                hidden: Some(F64Hidden {
                    size: hsize,
                    student: h,
                    teacher: &ht,
                }),
            };
            distill_loss_f64_slices(&cfg, &inputs).unwrap()
        };
        let out = eval(&student, &hs);
        assert_eq!(out.valid_rows, 2);
        let gs = cfg.grad_scale as f64;
        let grad_h = out.grad_hidden.as_ref().unwrap();

        let mut s = student.clone();
        for i in 0..s.len() {
            let fd = gs * central_difference(&mut s, i, &mut |s| total(&eval(s, &hs)));
            assert_fd(&format!("{cfg:?} d/ds[{i}]"), out.grad_logits[i], fd);
            if i / vocab == 1 {
                assert_eq!(out.grad_logits[i], 0.0, "ignored row has gradient 0");
            }
            checked += 1;
        }
        let mut h = hs.clone();
        for (i, &analytic) in grad_h.iter().enumerate() {
            let fd = gs * central_difference(&mut h, i, &mut |h| total(&eval(&student, h)));
            assert_fd(&format!("{cfg:?} d/dh[{i}]"), analytic, fd);
            checked += 1;
        }
    }
    assert_eq!(checked, all_configs().len() * (rows * vocab + rows * hsize));
}

#[test]
fn gradients_match_finite_differences_with_masks_and_large_t() {
    // Masked (-inf in both) entries and a label-free configuration: the gradient of the masked
    // entries is exactly 0 and the others match finite differences.
    let (rows, vocab) = (2, 6);
    let mut rng = StdRng::seed_from_u64(11);
    let mut student = uniform(&mut rng, rows * vocab, 4.0);
    let mut teacher = uniform(&mut rng, rows * vocab, 4.0);
    for i in [1, 4, 6 + 5] {
        student[i] = f64::NEG_INFINITY;
        teacher[i] = f64::NEG_INFINITY;
    }
    for kind in KINDS {
        for temperature in [0.7, 3.0] {
            let cfg = LossConfig::builder()
                .kind(kind)
                .temperature(temperature)
                .reduction(Reduction::Sum)
                .build()
                .unwrap();
            let eval = |s: &[f64]| {
                let inputs = F64Inputs {
                    rows,
                    vocab,
                    student: s,
                    teacher: &teacher,
                    labels: None,
                    hidden: None,
                };
                distill_loss_f64_slices(&cfg, &inputs).unwrap()
            };
            let out = eval(&student);
            assert!(total(&out).is_finite());
            let mut s = student.clone();
            for i in 0..s.len() {
                if s[i] == f64::NEG_INFINITY {
                    assert_eq!(out.grad_logits[i], 0.0);
                    continue;
                }
                let fd = central_difference(&mut s, i, &mut |s| total(&eval(s)));
                assert_fd(&format!("{cfg:?} d/ds[{i}]"), out.grad_logits[i], fd);
            }
        }
    }
}

#[test]
fn softmax_backward_matches_finite_differences() {
    let (rows, vocab) = (3, 6);
    let mut rng = StdRng::seed_from_u64(3);
    let x = uniform(&mut rng, rows * vocab, 3.0);
    let dy = uniform(&mut rng, rows * vocab, 1.0);
    for log in [false, true] {
        for temperature in TEMPERATURES {
            let t = temperature as f64;
            let y = softmax_f64(&x, rows, vocab, t, log);
            let dx = softmax_backward_f64(&y, &dy, rows, vocab, t, log);
            // f(x) = <softmax(x / T), dy>; its gradient is the backward of dy.
            let mut f = |x: &[f64]| {
                let y = softmax_f64(x, rows, vocab, t, log);
                y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
            };
            let mut xm = x.clone();
            for (i, &analytic) in dx.iter().enumerate() {
                let fd = central_difference(&mut xm, i, &mut f);
                assert_fd(&format!("log={log} T={t} dx[{i}]"), analytic, fd);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Known values.

fn f32_inputs<'a>(
    rows: usize,
    vocab: usize,
    s: &'a [f32],
    t: &'a [f32],
    labels: Option<&'a [i64]>,
) -> DistillInputs<'a> {
    DistillInputs {
        rows,
        vocab,
        student: HostSlice::F32(s),
        teacher: HostSlice::F32(t),
        labels,
        hidden: None,
    }
}

/// Runs a backend with an f32 gradient buffer.
fn run_f32(
    backend: &dyn DistillDevice,
    cfg: &LossConfig,
    inputs: &DistillInputs,
) -> (LossValue, Vec<f32>) {
    let mut grad = vec![f32::NAN; inputs.rows * inputs.vocab];
    let loss = backend
        .distill_loss(
            cfg,
            inputs,
            GradOutputs {
                logits: Some(HostSliceMut::F32(&mut grad)),
                hidden: None,
            },
        )
        .unwrap();
    (loss, grad)
}

fn backends() -> [Box<dyn DistillDevice>; 2] {
    [Box::new(Reference), Box::new(Cpu::new())]
}

#[test]
fn identical_distributions_give_zero_soft_loss_and_gradient() {
    let (rows, vocab) = (4, 9);
    let mut rng = StdRng::seed_from_u64(5);
    let s = uniform_f32(&mut rng, rows * vocab, 5.0);
    for kind in KINDS {
        for temperature in TEMPERATURES {
            let cfg = LossConfig::builder()
                .kind(kind)
                .temperature(temperature)
                .reduction(Reduction::Sum)
                .build()
                .unwrap();
            let inputs = f32_inputs(rows, vocab, &s, &s, None);
            // Exactly 0: both log-probabilities come out of the same arithmetic, and the JSD
            // mixture of two equal log-probabilities is that log-probability exactly.
            let out = distill_loss_f64(&cfg, &inputs).unwrap();
            assert_eq!(total(&out), 0.0, "{cfg:?}");
            assert!(out.grad_logits.iter().all(|&g| g == 0.0), "{cfg:?}");
            for backend in backends() {
                let (loss, grad) = run_f32(backend.as_ref(), &cfg, &inputs);
                assert_eq!(loss.total(), 0.0, "{} {cfg:?}", backend.name());
                assert!(grad.iter().all(|&g| g == 0.0), "{} {cfg:?}", backend.name());
            }
        }
    }
}

#[test]
fn two_class_forward_and_reverse_kl_by_hand() {
    // s = [0, ln 3]: p_s = [1/4, 3/4]; t = [0, 0]: p_t = [1/2, 1/2].
    let s = [0.0, 3f32.ln()];
    let t = [0.0f32, 0.0];
    let (ps, pt) = ([0.25, 0.75], [0.5, 0.5]);
    let labels = [1i64];
    for backend in backends() {
        let tol = if backend.name() == "cpu" { 1e-6 } else { 1e-7 };
        let inputs = f32_inputs(1, 2, &s, &t, Some(&labels));

        // Forward KL, T = 1: KL = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3).
        let cfg = LossConfig::default();
        let (loss, grad) = run_f32(backend.as_ref(), &cfg, &inputs);
        assert!((loss.values[0] as f64 - 0.5 * (4.0f64 / 3.0).ln()).abs() < tol);
        for j in 0..2 {
            assert!((grad[j] as f64 - (ps[j] - pt[j])).abs() < tol);
        }

        // Reverse KL: 1/4 ln(1/2) + 3/4 ln(3/2); gradient p_s (log p_s - log p_t - R).
        let cfg = LossConfig::builder()
            .kind(LossKind::ReverseKl)
            .build()
            .unwrap();
        let r = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        let (loss, grad) = run_f32(backend.as_ref(), &cfg, &inputs);
        assert!((loss.values[0] as f64 - r).abs() < tol);
        for j in 0..2 {
            let want = ps[j] * ((ps[j] / pt[j]).ln() - r);
            assert!(
                (grad[j] as f64 - want).abs() < tol,
                "{} {j}",
                backend.name()
            );
        }

        // Forward KL at T = 2 with T^2 scaling, plus the hard loss with alpha = 0.25:
        // p_s = [1, sqrt 3] / (1 + sqrt 3); loss = 0.25 * 4 * KL - 0.75 * ln(3/4);
        // gradient = 0.25 * 2 * (p_s - p_t) + 0.75 * (softmax(s) - onehot(1)).
        let cfg = LossConfig::builder()
            .temperature(2.0)
            .alpha(0.25)
            .build()
            .unwrap();
        let r3 = 3f64.sqrt();
        let ps2 = [1.0 / (1.0 + r3), r3 / (1.0 + r3)];
        let kl = 0.5 * (0.5 / ps2[0]).ln() + 0.5 * (0.5 / ps2[1]).ln();
        let want_loss = 0.25 * 4.0 * kl - 0.75 * 0.75f64.ln();
        let (loss, grad) = run_f32(backend.as_ref(), &cfg, &inputs);
        assert!((loss.values[0] as f64 - want_loss).abs() < tol);
        let onehot = [0.0, 1.0];
        for j in 0..2 {
            let want = 0.25 * 2.0 * (ps2[j] - pt[j]) + 0.75 * (ps[j] - onehot[j]);
            assert!((grad[j] as f64 - want).abs() < tol);
        }
    }
}

#[test]
fn vocabulary_of_one_gives_zero() {
    let s = [3.5f32, -1.0];
    let t = [-7.0f32, 2.0];
    let labels = [0i64, 0];
    for backend in backends() {
        for kind in KINDS {
            for alpha in ALPHAS {
                let cfg = LossConfig::builder()
                    .kind(kind)
                    .alpha(alpha)
                    .temperature(2.0)
                    .build()
                    .unwrap();
                let (loss, grad) = run_f32(
                    backend.as_ref(),
                    &cfg,
                    &f32_inputs(2, 1, &s, &t, Some(&labels)),
                );
                assert_eq!(loss.values, vec![0.0], "{} {cfg:?}", backend.name());
                assert_eq!(grad, vec![0.0, 0.0], "{} {cfg:?}", backend.name());
            }
        }
    }
}

#[test]
fn all_rows_ignored_gives_zero_not_nan() {
    let (rows, vocab) = (3, 4);
    let mut rng = StdRng::seed_from_u64(1);
    let s = uniform_f32(&mut rng, rows * vocab, 2.0);
    let t = uniform_f32(&mut rng, rows * vocab, 2.0);
    let labels = [-100i64; 3];
    for backend in backends() {
        for kind in KINDS {
            for reduction in REDUCTIONS {
                let cfg = LossConfig::builder()
                    .kind(kind)
                    .reduction(reduction)
                    .alpha(0.5)
                    .build()
                    .unwrap();
                let (loss, grad) = run_f32(
                    backend.as_ref(),
                    &cfg,
                    &f32_inputs(rows, vocab, &s, &t, Some(&labels)),
                );
                assert_eq!(loss.valid_rows, 0);
                assert!(loss.values.iter().all(|&v| v == 0.0), "{}", backend.name());
                assert!(grad.iter().all(|&g| g == 0.0), "{}", backend.name());
            }
        }
    }
}

#[test]
fn explicit_normalizer_divides_by_it() {
    let (rows, vocab) = (4, 10);
    let mut rng = StdRng::seed_from_u64(2);
    let s = uniform_f32(&mut rng, rows * vocab, 3.0);
    let t = uniform_f32(&mut rng, rows * vocab, 3.0);
    let labels = [3i64, -100, 9, 0];
    for kind in KINDS {
        let sum_cfg = LossConfig::builder()
            .kind(kind)
            .alpha(0.4)
            .temperature(1.7)
            .reduction(Reduction::Sum)
            .build()
            .unwrap();
        let inputs = f32_inputs(rows, vocab, &s, &t, Some(&labels));
        let sum = distill_loss_f64(&sum_cfg, &inputs).unwrap();
        for (normalizer, d) in [(Some(7.0), 7.0), (None, 3.0)] {
            let cfg = sum_cfg
                .to_builder()
                .reduction(Reduction::Mean)
                .normalizer(normalizer)
                .build()
                .unwrap();
            let mean = distill_loss_f64(&cfg, &inputs).unwrap();
            assert!((mean.loss[0] - sum.loss[0] / d).abs() < 1e-12);
            for (a, b) in mean.grad_logits.iter().zip(&sum.grad_logits) {
                assert!((a - b / d).abs() < 1e-12);
            }
            let (loss, _) = run_f32(&Cpu::new(), &cfg, &inputs);
            assert!((loss.values[0] as f64 - sum.loss[0] / d).abs() < 1e-5);
        }
    }
}

#[test]
fn masked_columns_equal_dropped_columns() {
    // -inf at the same positions in both inputs is the same as a smaller vocabulary.
    let (rows, vocab) = (3, 8);
    let masked_cols = [0usize, 3, 7];
    let kept: Vec<usize> = (0..vocab).filter(|j| !masked_cols.contains(j)).collect();
    let mut rng = StdRng::seed_from_u64(9);
    let mut s = uniform_f32(&mut rng, rows * vocab, 3.0);
    let mut t = uniform_f32(&mut rng, rows * vocab, 3.0);
    for r in 0..rows {
        for &j in &masked_cols {
            s[r * vocab + j] = f32::NEG_INFINITY;
            t[r * vocab + j] = f32::NEG_INFINITY;
        }
    }
    let small = |x: &[f32]| -> Vec<f32> {
        (0..rows)
            .flat_map(|r| kept.iter().map(move |&j| x[r * vocab + j]))
            .collect()
    };
    let (s_small, t_small) = (small(&s), small(&t));
    // Labels on kept columns: 1 -> 0, 6 -> 4, and an ignored row.
    let labels = [1i64, 6, -100];
    let labels_small = [0i64, 4, -100];
    for backend in backends() {
        for kind in KINDS {
            for alpha in ALPHAS {
                for temperature in [0.5, 2.0] {
                    let cfg = LossConfig::builder()
                        .kind(kind)
                        .alpha(alpha)
                        .temperature(temperature)
                        .reduction(Reduction::None)
                        .build()
                        .unwrap();
                    let (full, g_full) = run_f32(
                        backend.as_ref(),
                        &cfg,
                        &f32_inputs(rows, vocab, &s, &t, Some(&labels)),
                    );
                    let (part, g_part) = run_f32(
                        backend.as_ref(),
                        &cfg,
                        &f32_inputs(rows, kept.len(), &s_small, &t_small, Some(&labels_small)),
                    );
                    for (a, b) in full.values.iter().zip(&part.values) {
                        assert!(a.is_finite() && (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
                    }
                    for r in 0..rows {
                        for &j in &masked_cols {
                            assert_eq!(g_full[r * vocab + j], 0.0);
                        }
                        for (k, &j) in kept.iter().enumerate() {
                            let (a, b) = (g_full[r * vocab + j], g_part[r * kept.len() + k]);
                            assert!((a - b).abs() <= 1e-6, "{} {cfg:?}", backend.name());
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn zero_probability_against_positive_probability_is_infinite() {
    // Teacher -inf where the student is finite: reverse KL is +inf; JSD stays finite.
    // Student -inf where the teacher is finite: forward KL is +inf.
    let s = [1.0f32, 0.5, -0.25, 2.0];
    let mut t = [0.0f32, 1.0, -1.0, 0.5];
    t[2] = f32::NEG_INFINITY;
    let mut s_hole = s;
    s_hole[1] = f32::NEG_INFINITY;
    let t_full = [0.0f32, 1.0, -1.0, 0.5];
    for backend in backends() {
        let name = backend.name();
        let run = |kind, s: &[f32], t: &[f32]| {
            let cfg = LossConfig::builder().kind(kind).build().unwrap();
            run_f32(backend.as_ref(), &cfg, &f32_inputs(1, 4, s, t, None))
                .0
                .values[0]
        };
        assert_eq!(run(LossKind::ReverseKl, &s, &t), f32::INFINITY, "{name}");
        assert_eq!(
            run(LossKind::ForwardKl, &s_hole, &t_full),
            f32::INFINITY,
            "{name}"
        );
        // Forward KL ignores a teacher zero; reverse KL ignores a student zero.
        assert!(run(LossKind::ForwardKl, &s, &t).is_finite(), "{name}");
        assert!(
            run(LossKind::ReverseKl, &s_hole, &t_full).is_finite(),
            "{name}"
        );
        for beta in [0.3, 0.7] {
            assert!(run(LossKind::Jsd { beta }, &s, &t).is_finite(), "{name}");
            assert!(
                run(LossKind::Jsd { beta }, &s_hole, &t_full).is_finite(),
                "{name}"
            );
        }
    }
}

#[test]
fn nan_input_gives_nan_loss() {
    let (rows, vocab, hsize) = (2, 5, 3);
    let mut rng = StdRng::seed_from_u64(4);
    let s = uniform_f32(&mut rng, rows * vocab, 2.0);
    let t = uniform_f32(&mut rng, rows * vocab, 2.0);
    let hs = uniform_f32(&mut rng, rows * hsize, 1.0);
    let ht = uniform_f32(&mut rng, rows * hsize, 1.0);
    let labels = [2i64, -100];
    let poison = |x: &[f32], i: usize| {
        let mut x = x.to_vec();
        x[i] = f32::NAN;
        x
    };
    let cfg = |kind| {
        LossConfig::builder()
            .kind(kind)
            .alpha(0.5)
            .hidden_weight(0.5)
            .build()
            .unwrap()
    };
    let run = |backend: &dyn DistillDevice, cfg: &LossConfig, s: &[f32], t: &[f32], hs: &[f32]| {
        let inputs = DistillInputs {
            hidden: Some(HiddenInputs {
                size: hsize,
                student: HostSlice::F32(hs),
                teacher: HostSlice::F32(&ht),
            }),
            ..f32_inputs(rows, vocab, s, t, Some(&labels))
        };
        backend
            .distill_loss(cfg, &inputs, GradOutputs::default())
            .unwrap()
            .values[0]
    };
    for backend in backends() {
        let b = backend.as_ref();
        for kind in KINDS {
            let cfg = cfg(kind);
            assert!(run(b, &cfg, &s, &t, &hs).is_finite());
            assert!(
                run(b, &cfg, &poison(&s, 3), &t, &hs).is_nan(),
                "{}",
                b.name()
            );
            assert!(
                run(b, &cfg, &s, &poison(&t, 0), &hs).is_nan(),
                "{}",
                b.name()
            );
            assert!(
                run(b, &cfg, &s, &t, &poison(&hs, 1)).is_nan(),
                "{}",
                b.name()
            );
            // NaN in an ignored row (row 1) is not looked at.
            assert!(run(b, &cfg, &poison(&s, 7), &poison(&t, 8), &poison(&hs, 4)).is_finite());
        }
    }
}

#[test]
fn row_of_all_neg_inf_gives_nan() {
    let s = [f32::NEG_INFINITY; 3];
    let t = [0.0f32, 1.0, 2.0];
    for backend in backends() {
        for kind in KINDS {
            let cfg = LossConfig::builder().kind(kind).build().unwrap();
            let (loss, _) = run_f32(backend.as_ref(), &cfg, &f32_inputs(1, 3, &s, &t, None));
            assert!(loss.values[0].is_nan(), "{} {kind:?}", backend.name());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU backend against the reference.

/// Tolerances of the CPU backend (f32 arithmetic) against the f64 reference, given inputs that
/// are already exactly representable in their dtype (the reference sees the same rounded values,
/// so input rounding is not part of the error).
///
/// Loss: every log-probability is formed as `(x - max) / T - log Z` in f32, with a rounding error
/// of a few eps (6e-8) of its own size (|log p| <= ~30 here), and the terms are summed in f32 in
/// runs of 512 (error growing like `512 + V / 512` additions at worst). A relative 4e-5 plus an
/// absolute 4e-6 per unit of loss weight per row covers every case here with a margin of about
/// 10 over the worst error measured, and is far below the effect of any real mistake.
///
/// Gradients are differences of terms that can cancel almost completely (reverse KL's
/// `p_s (log p_s - log p_t - R)` with all three of size ~5 and a difference of 1e-5), so the
/// error of each element is bounded relative to the size of the terms it is made of, not to its
/// value: `GRAD_TERM_RTOL * scale_j` (see [`grad_term_scale`]), 1e-5, i.e. ~170 f32 eps, which
/// covers the rounding of `log Z` accumulated over the row (worst measured: a sixth of it).
/// Gradients stored in f16/bf16 are in addition rounded to nearest, which alone costs up to half
/// an ulp (a relative 2^-11 for f16, 2^-8 for bf16; measured: 98% of that); we allow a full ulp
/// (2^-10, 2^-7) so the bound is not tight, plus the f16 subnormal spacing 2^-24 absolute.
#[derive(Clone, Copy, Debug)]
struct Tolerance {
    loss_rtol: f64,
    loss_atol: f64,
    grad_term_rtol: f64,
    grad_rtol: f64,
    grad_atol: f64,
}

const GRAD_TERM_RTOL: f64 = 1e-5;

fn tolerance(cfg: &LossConfig, grad_dtype: Dtype, rows_in_loss: f64) -> Tolerance {
    let weight = (cfg.soft_weight() + cfg.hard_weight() + cfg.hidden_weight) as f64;
    let (rounding, subnormal) = match grad_dtype {
        Dtype::F32 => (0.0, 0.0),
        Dtype::F16 => (2f64.powi(-10), 2f64.powi(-24)),
        Dtype::Bf16 => (2f64.powi(-7), 0.0),
    };
    Tolerance {
        loss_rtol: 4e-5,
        loss_atol: 4e-6 * weight * rows_in_loss.max(1.0),
        grad_term_rtol: GRAD_TERM_RTOL,
        grad_rtol: rounding,
        grad_atol: subnormal + 1e-30,
    }
}

/// `p * (1 + |log p| + |log q|)`, 0 where `p` is 0.
fn weighted(lp: f64, lq: f64) -> f64 {
    if lp == f64::NEG_INFINITY {
        0.0
    } else {
        let lq = if lq.is_finite() { lq.abs() } else { 0.0 };
        lp.exp() * (1.0 + lp.abs() + lq)
    }
}

/// For each gradient element, the size of the terms it is computed from (before they cancel):
/// `|grad_scale| (soft_weight / T (p_s (1 + 2 |log p_s| + 2 |log p_t|) + p_t)
///  + hard_weight (q + onehot))` for the logits, with `q = softmax(s)`, and
/// `|grad_scale| hidden_weight 2 (|h_s| + |h_t|) / H` for the hidden states. The factors 2 cover
/// `R` (reverse KL) and `log m` (JSD), which are bounded by the same log-probabilities.
fn grad_term_scale(cfg: &LossConfig, inputs: &DistillInputs) -> (Vec<f64>, Option<Vec<f64>>) {
    let (rows, vocab) = (inputs.rows, inputs.vocab);
    let s = to_f64_vec(inputs.student);
    let t = to_f64_vec(inputs.teacher);
    let gs = cfg.grad_scale.abs() as f64;
    let sw = cfg.soft_weight() as f64 / cfg.temperature as f64;
    let hw = cfg.hard_weight() as f64;
    let temperature = cfg.temperature as f64;
    let mut scale = vec![0.0; rows * vocab];
    for r in 0..rows {
        let label = inputs.labels.map(|l| l[r]);
        if !cfg.row_is_valid(label) {
            continue;
        }
        let range = r * vocab..(r + 1) * vocab;
        let lps = softmax_f64(&s[range.clone()], 1, vocab, temperature, true);
        let lpt = softmax_f64(&t[range.clone()], 1, vocab, temperature, true);
        let q = softmax_f64(&s[range.clone()], 1, vocab, 1.0, false);
        for j in 0..vocab {
            let mut v = 0.0;
            if sw > 0.0 {
                let pt = if lpt[j] == f64::NEG_INFINITY {
                    0.0
                } else {
                    lpt[j].exp()
                };
                v += sw * (2.0 * weighted(lps[j], lpt[j]) + pt);
            }
            if hw > 0.0 {
                let onehot = if label == Some(j as i64) { 1.0 } else { 0.0 };
                v += hw * (q[j] + onehot);
            }
            scale[r * vocab + j] = gs * v;
        }
    }
    let hidden = inputs.hidden.map(|h| {
        let (hs, ht) = (to_f64_vec(h.student), to_f64_vec(h.teacher));
        let w = gs * cfg.hidden_weight as f64 * 2.0 / h.size as f64;
        (0..rows * h.size)
            .map(|i| {
                let valid = cfg.row_is_valid(inputs.labels.map(|l| l[i / h.size]));
                if valid {
                    w * (hs[i].abs() + ht[i].abs())
                } else {
                    0.0
                }
            })
            .collect()
    });
    (scale, hidden)
}

fn to_f64_vec(x: HostSlice) -> Vec<f64> {
    (0..x.len()).map(|i| x.get_f32(i) as f64).collect()
}

struct Case<'a> {
    rows: usize,
    vocab: usize,
    student: &'a [f32],
    teacher: &'a [f32],
    labels: Option<&'a [i64]>,
    hidden: Option<(usize, &'a [f32], &'a [f32])>,
}

fn to_f32_vec(x: HostSlice) -> Vec<f32> {
    (0..x.len()).map(|i| x.get_f32(i)).collect()
}

fn grad_buffer(dtype: Dtype, n: usize) -> HostVec {
    HostVec::from_f32(&vec![f32::NAN; n], dtype)
}

fn as_mut(v: &mut HostVec) -> HostSliceMut<'_> {
    match v {
        HostVec::F32(x) => HostSliceMut::F32(x),
        HostVec::F16(x) => HostSliceMut::F16(x),
        HostVec::Bf16(x) => HostSliceMut::Bf16(x),
    }
}

/// Rounds the case's inputs to the dtypes, runs the reference (f64) and the CPU backend, and
/// compares loss, logits gradient and hidden gradient. Returns the CPU's outputs.
fn compare_cpu(
    cfg: &LossConfig,
    case: &Case,
    dtypes: (Dtype, Dtype),
    grad_in_student_dtype: bool,
) -> (LossValue, HostVec, Option<HostVec>) {
    let (sd, td) = dtypes;
    let s = HostVec::from_f32(case.student, sd);
    let t = HostVec::from_f32(case.teacher, td);
    let hidden = case
        .hidden
        .map(|(size, hs, ht)| (size, HostVec::from_f32(hs, sd), HostVec::from_f32(ht, td)));
    let inputs = DistillInputs {
        rows: case.rows,
        vocab: case.vocab,
        student: s.as_slice(),
        teacher: t.as_slice(),
        labels: case.labels,
        hidden: hidden.as_ref().map(|(size, hs, ht)| HiddenInputs {
            size: *size,
            student: hs.as_slice(),
            teacher: ht.as_slice(),
        }),
    };
    let reference = distill_loss_f64(cfg, &inputs).unwrap();

    let gd = if grad_in_student_dtype {
        sd
    } else {
        Dtype::F32
    };
    let mut grad = grad_buffer(gd, case.rows * case.vocab);
    let mut grad_h = hidden
        .as_ref()
        .map(|(size, _, _)| grad_buffer(gd, case.rows * size));
    let cpu = Cpu::new()
        .distill_loss(
            cfg,
            &inputs,
            GradOutputs {
                logits: Some(as_mut(&mut grad)),
                hidden: grad_h.as_mut().map(as_mut),
            },
        )
        .unwrap();

    let what = format!("{cfg:?} {}x{} {sd}/{td} grad {gd}", case.rows, case.vocab);
    assert_eq!(cpu.valid_rows, reference.valid_rows, "{what}");
    assert_eq!(cpu.values.len(), reference.loss.len(), "{what}");
    let rows_in_loss = match cfg.reduction {
        Reduction::None => 1.0,
        _ => reference.valid_rows as f64 * cfg.scales(reference.valid_rows).0,
    };
    let tol = tolerance(cfg, gd, rows_in_loss);
    for (i, (&c, &r)) in cpu.values.iter().zip(&reference.loss).enumerate() {
        let err = (c as f64 - r).abs();
        assert!(
            err <= tol.loss_atol + tol.loss_rtol * r.abs(),
            "{what}: loss[{i}] cpu {c:e} reference {r:e} error {err:e} ({tol:?})"
        );
    }
    let (scale, scale_h) = grad_term_scale(cfg, &inputs);
    let check_grad = |name: &str, got: &HostVec, want: &[f64], scale: &[f64]| {
        let got = to_f32_vec(got.as_slice());
        for (i, ((c, &r), &sc)) in got.iter().zip(want).zip(scale).enumerate() {
            let err = (*c as f64 - r).abs();
            let bound = tol.grad_term_rtol * sc + tol.grad_rtol * r.abs() + tol.grad_atol;
            assert!(
                err <= bound,
                "{what}: {name}[{i}] cpu {c:e} reference {r:e} error {err:e} bound {bound:e}"
            );
        }
    };
    check_grad("grad_logits", &grad, &reference.grad_logits, &scale);
    if let (Some(g), Some(r), Some(sc)) = (&grad_h, &reference.grad_hidden, &scale_h) {
        check_grad("grad_hidden", g, r, sc);
    }

    // The loss-only path computes the same loss, bit for bit.
    let loss_only = Cpu::new()
        .distill_loss(cfg, &inputs, GradOutputs::default())
        .unwrap();
    assert_eq!(
        loss_only
            .values
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        cpu.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{what}: loss-only path"
    );
    (cpu, grad, grad_h)
}

const DTYPE_PAIRS: [(Dtype, Dtype); 5] = [
    (Dtype::F32, Dtype::F32),
    (Dtype::F16, Dtype::F16),
    (Dtype::Bf16, Dtype::Bf16),
    (Dtype::Bf16, Dtype::F32),
    (Dtype::F16, Dtype::Bf16),
];

#[test]
fn cpu_matches_reference_on_small_shapes_every_option() {
    let mut rng = StdRng::seed_from_u64(21);
    let s1 = uniform_f32(&mut rng, 1, 3.0);
    let t1 = uniform_f32(&mut rng, 1, 3.0);
    let (rows, vocab, hsize) = (3, 7, 5);
    let s = uniform_f32(&mut rng, rows * vocab, 4.0);
    let t = uniform_f32(&mut rng, rows * vocab, 4.0);
    let hs = uniform_f32(&mut rng, rows * hsize, 1.0);
    let ht = uniform_f32(&mut rng, rows * hsize, 1.0);
    let labels = [0i64, vocab as i64 - 1, -100];
    let cases = [
        Case {
            rows: 1,
            vocab: 1,
            student: &s1,
            teacher: &t1,
            labels: Some(&[0]),
            hidden: None,
        },
        Case {
            rows,
            vocab,
            student: &s,
            teacher: &t,
            labels: Some(&labels),
            hidden: None,
        },
        Case {
            rows,
            vocab,
            student: &s,
            teacher: &t,
            labels: Some(&labels),
            hidden: Some((hsize, &hs, &ht)),
        },
    ];
    for (c, case) in cases.iter().enumerate() {
        for base in all_configs() {
            let cfg = base
                .to_builder()
                .hidden_weight(if case.hidden.is_some() { 0.5 } else { 0.0 })
                .grad_scale(0.75)
                .build()
                .unwrap();
            for (d, &dtypes) in DTYPE_PAIRS.iter().enumerate() {
                compare_cpu(&cfg, case, dtypes, (c + d) % 2 == 1);
            }
        }
    }
}

#[test]
fn cpu_matches_reference_without_labels() {
    let mut rng = StdRng::seed_from_u64(22);
    let (rows, vocab) = (5, 33);
    let s = uniform_f32(&mut rng, rows * vocab, 6.0);
    let t = uniform_f32(&mut rng, rows * vocab, 6.0);
    let case = Case {
        rows,
        vocab,
        student: &s,
        teacher: &t,
        labels: None,
        hidden: None,
    };
    for kind in KINDS {
        for reduction in REDUCTIONS {
            for temperature in TEMPERATURES {
                let cfg = LossConfig::builder()
                    .kind(kind)
                    .reduction(reduction)
                    .temperature(temperature)
                    .normalizer(Some(3.0))
                    .build()
                    .unwrap();
                compare_cpu(&cfg, &case, (Dtype::F32, Dtype::F32), false);
            }
        }
    }
}

#[test]
fn cpu_matches_reference_on_medium_shape() {
    let mut rng = StdRng::seed_from_u64(23);
    let (rows, vocab, hsize) = (41, 1271, 16);
    let s = uniform_f32(&mut rng, rows * vocab, 8.0);
    let t = uniform_f32(&mut rng, rows * vocab, 8.0);
    let hs = uniform_f32(&mut rng, rows * hsize, 2.0);
    let ht = uniform_f32(&mut rng, rows * hsize, 2.0);
    let labels: Vec<i64> = (0..rows)
        .map(|r| match r % 5 {
            0 => 0,
            1 => vocab as i64 - 1,
            2 => -100,
            _ => rng.gen_range(0..vocab as i64),
        })
        .collect();
    let case = Case {
        rows,
        vocab,
        student: &s,
        teacher: &t,
        labels: Some(&labels),
        hidden: Some((hsize, &hs, &ht)),
    };
    for (i, kind) in KINDS.into_iter().enumerate() {
        for alpha in ALPHAS {
            for temperature in [1.0, 4.5] {
                let cfg = LossConfig::builder()
                    .kind(kind)
                    .alpha(alpha)
                    .temperature(temperature)
                    .reduction(REDUCTIONS[i % 3])
                    .hidden_weight(0.25)
                    .build()
                    .unwrap();
                let dtypes = DTYPE_PAIRS[i % DTYPE_PAIRS.len()];
                compare_cpu(&cfg, &case, dtypes, alpha == 0.3);
                compare_cpu(&cfg, &case, (Dtype::F32, Dtype::F32), false);
            }
        }
    }
}

#[test]
fn cpu_matches_reference_on_llama3_vocabulary() {
    let mut rng = StdRng::seed_from_u64(24);
    let (rows, vocab) = (4, 128256);
    let s = uniform_f32(&mut rng, rows * vocab, 10.0);
    let t = uniform_f32(&mut rng, rows * vocab, 10.0);
    let labels = [0i64, vocab as i64 - 1, -100, 77_777];
    let case = Case {
        rows,
        vocab,
        student: &s,
        teacher: &t,
        labels: Some(&labels),
        hidden: None,
    };
    for kind in KINDS {
        let cfg = LossConfig::builder()
            .kind(kind)
            .alpha(0.3)
            .temperature(2.0)
            .build()
            .unwrap();
        compare_cpu(&cfg, &case, (Dtype::Bf16, Dtype::F32), false);
    }
}

#[test]
fn cpu_matches_reference_on_large_logits_and_constant_rows() {
    let (rows, vocab) = (4, 300);
    let mut rng = StdRng::seed_from_u64(25);
    // Rows 0-1: logits around 1e4 (student) and -1e4 (teacher); row 2: both around 1e4 with
    // the differences of ordinary logits; row 3: constant rows.
    let mut s = Vec::new();
    let mut t = Vec::new();
    for r in 0..rows {
        for _ in 0..vocab {
            let (a, b): (f32, f32) = (rng.gen_range(-6.0..6.0), rng.gen_range(-6.0..6.0));
            match r {
                0 | 1 => {
                    s.push(1e4 + a);
                    t.push(-1e4 + b);
                }
                2 => {
                    s.push(1e4 + a);
                    t.push(1e4 + b);
                }
                _ => {
                    s.push(1e4);
                    t.push(-3.0);
                }
            }
        }
    }
    let labels = [5i64, 0, vocab as i64 - 1, 17];
    let case = Case {
        rows,
        vocab,
        student: &s,
        teacher: &t,
        labels: Some(&labels),
        hidden: None,
    };
    for kind in KINDS {
        for alpha in ALPHAS {
            for temperature in TEMPERATURES {
                let cfg = LossConfig::builder()
                    .kind(kind)
                    .alpha(alpha)
                    .temperature(temperature)
                    .reduction(Reduction::None)
                    .build()
                    .unwrap();
                for dtypes in DTYPE_PAIRS {
                    let (cpu, _, _) = compare_cpu(&cfg, &case, dtypes, false);
                    assert!(cpu.values.iter().all(|v| v.is_finite()));
                }
            }
        }
    }
}

#[test]
fn cpu_matches_reference_with_masked_vocabulary() {
    let (rows, vocab) = (6, 200);
    let mut rng = StdRng::seed_from_u64(26);
    let mut s = uniform_f32(&mut rng, rows * vocab, 5.0);
    let mut t = uniform_f32(&mut rng, rows * vocab, 5.0);
    for r in 0..rows {
        for j in 0..vocab {
            // The first entries (max candidates are met late), the tail, and a scatter.
            if !(3..190).contains(&j) || (j * 7 + r) % 11 == 0 {
                s[r * vocab + j] = f32::NEG_INFINITY;
                t[r * vocab + j] = f32::NEG_INFINITY;
            }
        }
    }
    let labels = [3i64, 100, -100, 189, 4, 5];
    let case = Case {
        rows,
        vocab,
        student: &s,
        teacher: &t,
        labels: Some(&labels),
        hidden: None,
    };
    for cfg in all_configs().into_iter().step_by(5) {
        for dtypes in [(Dtype::F32, Dtype::F32), (Dtype::Bf16, Dtype::F16)] {
            let (cpu, grad, _) = compare_cpu(&cfg, &case, dtypes, true);
            assert!(cpu.values.iter().all(|v| v.is_finite()), "{cfg:?}");
            let grad = grad.to_f32_vec();
            for (i, g) in grad.iter().enumerate() {
                if s[i] == f32::NEG_INFINITY {
                    assert_eq!(*g, 0.0);
                }
            }
        }
    }
}

fn bits(loss: &LossValue, grad: &HostVec) -> (Vec<u32>, Vec<u32>) {
    (
        loss.values.iter().map(|v| v.to_bits()).collect(),
        grad.to_f32_vec().iter().map(|v| v.to_bits()).collect(),
    )
}

#[test]
fn cpu_is_deterministic_whatever_the_thread_count() {
    let (rows, vocab, hsize) = (41, 1271, 8);
    let mut rng = StdRng::seed_from_u64(27);
    let s = HostVec::from_f32(&uniform_f32(&mut rng, rows * vocab, 8.0), Dtype::Bf16);
    let t = HostVec::from_f32(&uniform_f32(&mut rng, rows * vocab, 8.0), Dtype::F32);
    let hs = uniform_f32(&mut rng, rows * hsize, 1.0);
    let ht = uniform_f32(&mut rng, rows * hsize, 1.0);
    let labels: Vec<i64> = (0..rows as i64)
        .map(|r| if r % 4 == 0 { -100 } else { r })
        .collect();
    let inputs = DistillInputs {
        rows,
        vocab,
        student: s.as_slice(),
        teacher: t.as_slice(),
        labels: Some(&labels),
        hidden: Some(HiddenInputs {
            size: hsize,
            student: HostSlice::F32(&hs),
            teacher: HostSlice::F32(&ht),
        }),
    };
    for kind in KINDS {
        let cfg = LossConfig::builder()
            .kind(kind)
            .alpha(0.6)
            .temperature(2.0)
            .hidden_weight(0.3)
            .build()
            .unwrap();
        let run = || {
            let mut grad = grad_buffer(Dtype::F32, rows * vocab);
            let mut grad_h = vec![0.0f32; rows * hsize];
            let loss = Cpu::new()
                .distill_loss(
                    &cfg,
                    &inputs,
                    GradOutputs {
                        logits: Some(as_mut(&mut grad)),
                        hidden: Some(HostSliceMut::F32(&mut grad_h)),
                    },
                )
                .unwrap();
            let (l, g) = bits(&loss, &grad);
            (l, g, grad_h.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        let first = run();
        assert_eq!(first, run(), "{kind:?}: two runs");
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            assert_eq!(first, pool.install(run), "{kind:?}: {threads} threads");
        }
    }
}

#[test]
fn softmax_backends_agree_with_f64() {
    let (rows, vocab) = (5, 257);
    let mut rng = StdRng::seed_from_u64(28);
    let mut x = uniform_f32(&mut rng, rows * vocab, 8.0);
    x[3] = f32::NEG_INFINITY;
    for v in &mut x[vocab..2 * vocab] {
        *v += 1e4; // large logits
    }
    let dy = uniform_f32(&mut rng, rows * vocab, 1.0);
    for dtype in Dtype::ALL {
        let xv = HostVec::from_f32(&x, dtype);
        let dyv = HostVec::from_f32(&dy, dtype);
        let x64: Vec<f64> = xv.to_f32_vec().iter().map(|&v| v as f64).collect();
        let dy64: Vec<f64> = dyv.to_f32_vec().iter().map(|&v| v as f64).collect();
        // Outputs are stored in the input dtype: half an ulp relative, plus f32 arithmetic.
        let rtol = match dtype {
            Dtype::F32 => 1e-5,
            Dtype::F16 => 2f64.powi(-11) + 1e-5,
            Dtype::Bf16 => 2f64.powi(-8) + 1e-5,
        };
        for log in [false, true] {
            for temperature in [0.5f32, 1.0, 3.0] {
                let want = softmax_f64(&x64, rows, vocab, temperature as f64, log);
                // The backward takes the forward output as it is stored.
                let y =
                    HostVec::from_f32(&want.iter().map(|&v| v as f32).collect::<Vec<_>>(), dtype);
                let y64: Vec<f64> = y.to_f32_vec().iter().map(|&v| v as f64).collect();
                let want_dx =
                    softmax_backward_f64(&y64, &dy64, rows, vocab, temperature as f64, log);
                for backend in backends() {
                    let mut out = grad_buffer(dtype, rows * vocab);
                    backend
                        .softmax(
                            xv.as_slice(),
                            rows,
                            vocab,
                            temperature,
                            log,
                            as_mut(&mut out),
                        )
                        .unwrap();
                    for (i, (g, w)) in out.to_f32_vec().iter().zip(&want).enumerate() {
                        let err = (*g as f64 - w).abs();
                        // log-probabilities of size ~|x|/T: absolute error of that many eps.
                        let atol = if log { 1e-5 * (1.0 + w.abs()) } else { 1e-7 };
                        assert!(
                            err <= atol + rtol * w.abs() || (g.is_infinite() && *w == *g as f64),
                            "{} {dtype} log={log} T={temperature} y[{i}] {g} vs {w}",
                            backend.name()
                        );
                    }
                    let mut dx = grad_buffer(dtype, rows * vocab);
                    backend
                        .softmax_backward(
                            y.as_slice(),
                            dyv.as_slice(),
                            rows,
                            vocab,
                            temperature,
                            log,
                            as_mut(&mut dx),
                        )
                        .unwrap();
                    let dmax = want_dx.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    for (i, (g, w)) in dx.to_f32_vec().iter().zip(&want_dx).enumerate() {
                        let err = (*g as f64 - w).abs();
                        assert!(
                            err <= 1e-5 * dmax + rtol * w.abs(),
                            "{} {dtype} log={log} T={temperature} dx[{i}] {g} vs {w}",
                            backend.name()
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

#[test]
fn bad_inputs_give_typed_errors_on_both_backends() {
    let (rows, vocab) = (2, 3);
    let s = [0.5f32; 6];
    let t = [0.25f32; 6];
    let short = [0.0f32; 5];
    let labels = [0i64, 2];
    let ok_cfg = LossConfig::builder().alpha(0.5).build().unwrap();
    let ok = f32_inputs(rows, vocab, &s, &t, Some(&labels));
    let bad_label = [0i64, 3];
    let neg_label = [-1i64, 0];
    let short_labels = [0i64];
    let with_cfg = |f: &dyn Fn(&mut LossConfig)| {
        let mut c = ok_cfg;
        f(&mut c);
        c
    };

    type Check = fn(&Error) -> bool;
    let option: Check = |e| matches!(e, Error::InvalidOption { .. });
    let shape: Check = |e| matches!(e, Error::ShapeMismatch { .. });
    let label: Check = |e| matches!(e, Error::LabelOutOfRange { .. });
    let missing: Check = |e| matches!(e, Error::MissingLabels { .. });
    let empty: Check = |e| matches!(e, Error::Empty(_));
    let hidden: Check = |e| matches!(e, Error::Hidden(_));
    let gradient: Check = |e| matches!(e, Error::Gradient(_));

    let hs = [0.0f32; 4];
    let hs_short = [0.0f32; 3];
    let cases: Vec<(&str, LossConfig, DistillInputs, Check)> = vec![
        (
            "short student",
            ok_cfg,
            DistillInputs {
                student: HostSlice::F32(&short),
                ..ok
            },
            shape,
        ),
        (
            "short teacher",
            ok_cfg,
            DistillInputs {
                teacher: HostSlice::F32(&short),
                ..ok
            },
            shape,
        ),
        (
            "short labels",
            ok_cfg,
            DistillInputs {
                labels: Some(&short_labels),
                ..ok
            },
            shape,
        ),
        (
            "label = V",
            ok_cfg,
            DistillInputs {
                labels: Some(&bad_label),
                ..ok
            },
            label,
        ),
        (
            "label = -1",
            ok_cfg,
            DistillInputs {
                labels: Some(&neg_label),
                ..ok
            },
            label,
        ),
        (
            "no labels, alpha < 1",
            ok_cfg,
            DistillInputs { labels: None, ..ok },
            missing,
        ),
        ("rows = 0", ok_cfg, DistillInputs { rows: 0, ..ok }, empty),
        ("vocab = 0", ok_cfg, DistillInputs { vocab: 0, ..ok }, empty),
        ("T = 0", with_cfg(&|c| c.temperature = 0.0), ok, option),
        ("T < 0", with_cfg(&|c| c.temperature = -1.0), ok, option),
        ("T NaN", with_cfg(&|c| c.temperature = f32::NAN), ok, option),
        (
            "T inf",
            with_cfg(&|c| c.temperature = f32::INFINITY),
            ok,
            option,
        ),
        ("alpha < 0", with_cfg(&|c| c.alpha = -0.1), ok, option),
        ("alpha > 1", with_cfg(&|c| c.alpha = 1.5), ok, option),
        ("alpha NaN", with_cfg(&|c| c.alpha = f32::NAN), ok, option),
        (
            "beta 0",
            with_cfg(&|c| c.kind = LossKind::Jsd { beta: 0.0 }),
            ok,
            option,
        ),
        (
            "beta 1",
            with_cfg(&|c| c.kind = LossKind::Jsd { beta: 1.0 }),
            ok,
            option,
        ),
        (
            "beta NaN",
            with_cfg(&|c| c.kind = LossKind::Jsd { beta: f32::NAN }),
            ok,
            option,
        ),
        (
            "normalizer 0",
            with_cfg(&|c| c.normalizer = Some(0.0)),
            ok,
            option,
        ),
        (
            "grad_scale NaN",
            with_cfg(&|c| c.grad_scale = f32::NAN),
            ok,
            option,
        ),
        (
            "hidden_weight < 0",
            with_cfg(&|c| c.hidden_weight = -1.0),
            ok,
            option,
        ),
        (
            "short hidden",
            ok_cfg,
            DistillInputs {
                hidden: Some(HiddenInputs {
                    size: 2,
                    student: HostSlice::F32(&hs_short),
                    teacher: HostSlice::F32(&hs),
                }),
                ..ok
            },
            shape,
        ),
        (
            "hidden size 0",
            ok_cfg,
            DistillInputs {
                hidden: Some(HiddenInputs {
                    size: 0,
                    student: HostSlice::F32(&[]),
                    teacher: HostSlice::F32(&[]),
                }),
                ..ok
            },
            hidden,
        ),
    ];
    for backend in backends() {
        let name = backend.name();
        for (what, cfg, inputs, check) in &cases {
            let err = backend
                .distill_loss(cfg, inputs, GradOutputs::default())
                .expect_err(what);
            assert!(check(&err), "{name}: {what}: unexpected {err:?}");
            // The reference's f64 entry point validates the same way.
            if name == "reference" {
                let err = distill_loss_f64(cfg, inputs).expect_err(what);
                assert!(check(&err), "distill_loss_f64: {what}: unexpected {err:?}");
            }
        }

        // Gradient buffers: wrong length, wrong dtype, hidden gradient without hidden states.
        let mut g = vec![0.0f32; 5];
        let err = backend
            .distill_loss(
                &ok_cfg,
                &ok,
                GradOutputs {
                    logits: Some(HostSliceMut::F32(&mut g)),
                    hidden: None,
                },
            )
            .unwrap_err();
        assert!(shape(&err), "{name}: {err:?}");
        let mut g = vec![f16::ZERO; 6];
        let err = backend
            .distill_loss(
                &ok_cfg,
                &ok,
                GradOutputs {
                    logits: Some(HostSliceMut::F16(&mut g)),
                    hidden: None,
                },
            )
            .unwrap_err();
        assert!(gradient(&err), "{name}: {err:?}");
        let mut g = vec![0.0f32; 4];
        let err = backend
            .distill_loss(
                &ok_cfg,
                &ok,
                GradOutputs {
                    logits: None,
                    hidden: Some(HostSliceMut::F32(&mut g)),
                },
            )
            .unwrap_err();
        assert!(hidden(&err), "{name}: {err:?}");

        // Softmax entry points.
        let mut out = vec![0.0f32; 6];
        for bad_t in [0.0, -2.0, f32::NAN] {
            let err = backend
                .softmax(
                    HostSlice::F32(&s),
                    rows,
                    vocab,
                    bad_t,
                    false,
                    HostSliceMut::F32(&mut out),
                )
                .unwrap_err();
            assert!(option(&err), "{name}: {err:?}");
        }
        let mut short_out = vec![0.0f32; 5];
        let err = backend
            .softmax(
                HostSlice::F32(&s),
                rows,
                vocab,
                1.0,
                true,
                HostSliceMut::F32(&mut short_out),
            )
            .unwrap_err();
        assert!(shape(&err), "{name}: {err:?}");
        let mut out16 = vec![bf16::ZERO; 6];
        let err = backend
            .softmax(
                HostSlice::F32(&s),
                rows,
                vocab,
                1.0,
                true,
                HostSliceMut::Bf16(&mut out16),
            )
            .unwrap_err();
        assert!(matches!(err, Error::Dtype { .. }), "{name}: {err:?}");
        let dy16 = vec![f16::ZERO; 6];
        let err = backend
            .softmax_backward(
                HostSlice::F32(&s),
                HostSlice::F16(&dy16),
                rows,
                vocab,
                1.0,
                false,
                HostSliceMut::F32(&mut out),
            )
            .unwrap_err();
        assert!(matches!(err, Error::Dtype { .. }), "{name}: {err:?}");
        let err = backend
            .softmax_backward(
                HostSlice::F32(&s),
                HostSlice::F32(&short),
                rows,
                vocab,
                1.0,
                false,
                HostSliceMut::F32(&mut out),
            )
            .unwrap_err();
        assert!(shape(&err), "{name}: {err:?}");
    }

    // The f64 entry point checks the same things.
    let s64 = [0.0f64; 6];
    let short64 = [0.0f64; 5];
    let f64_ok = F64Inputs {
        rows,
        vocab,
        student: &s64,
        teacher: &s64,
        labels: Some(&labels),
        hidden: None,
    };
    assert!(distill_loss_f64_slices(&ok_cfg, &f64_ok).is_ok());
    let e = distill_loss_f64_slices(
        &ok_cfg,
        &F64Inputs {
            teacher: &short64,
            ..f64_ok
        },
    )
    .unwrap_err();
    assert!(shape(&e));
    let e = distill_loss_f64_slices(
        &ok_cfg,
        &F64Inputs {
            labels: Some(&bad_label),
            ..f64_ok
        },
    )
    .unwrap_err();
    assert!(label(&e));
    let e = distill_loss_f64_slices(
        &ok_cfg,
        &F64Inputs {
            labels: None,
            ..f64_ok
        },
    )
    .unwrap_err();
    assert!(missing(&e));
    let e = distill_loss_f64_slices(&with_cfg(&|c| c.temperature = f32::NAN), &f64_ok).unwrap_err();
    assert!(option(&e));
}

#[test]
fn custom_ignore_index_is_respected() {
    let (rows, vocab) = (3, 4);
    let mut rng = StdRng::seed_from_u64(30);
    let s = uniform_f32(&mut rng, rows * vocab, 2.0);
    let t = uniform_f32(&mut rng, rows * vocab, 2.0);
    // With ignore_index = 3, the label 3 ignores its row; -100 is then out of range.
    let labels = [3i64, 1, 0];
    let cfg = LossConfig::builder()
        .alpha(0.5)
        .ignore_index(3)
        .build()
        .unwrap();
    for backend in backends() {
        let (loss, grad) = run_f32(
            backend.as_ref(),
            &cfg,
            &f32_inputs(rows, vocab, &s, &t, Some(&labels)),
        );
        assert_eq!(loss.valid_rows, 2);
        assert!(grad[..vocab].iter().all(|&g| g == 0.0));
        let bad = [-100i64, 1, 0];
        let err = backend
            .distill_loss(
                &cfg,
                &f32_inputs(rows, vocab, &s, &t, Some(&bad)),
                GradOutputs::default(),
            )
            .unwrap_err();
        assert!(matches!(
            err,
            Error::LabelOutOfRange {
                row: 0,
                label: -100,
                ..
            }
        ));
    }
}
