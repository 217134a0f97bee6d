//! Every kernel on every device under test (cpu, and the emulated GPU running the CUDA source
//! through cudarc) against the f64 reference (DESIGN section 4).
//!
//! Tolerances. Inputs are rounded to their dtype *before* the reference sees them, so input
//! rounding is not error: what remains is f32 arithmetic. A row's loss is a sum of V terms
//! `p * (log p - log q)` whose log-probabilities are formed as `(x - max) / T - log z`, each with
//! an absolute error of a few f32 ulps of |log p| (< 30 for the inputs here), weighted by
//! probabilities that sum to 1: hence an absolute error of order 1e-5 per unit of loss weight,
//! plus 1e-4 relative for the final f32 sums. A gradient element is a difference of
//! probability-sized terms times its weight w = grad_scale / D * (soft_weight / T + hard_weight):
//! its absolute error is a few ulps of 1 times w (reverse KL and JSD multiply a probability by a
//! log-ratio, so allow 1e-5 w). Gradients written in f16/bf16 add the rounding of the output,
//! 2^-11 / 2^-8 relative.
mod common;

use common::*;
use distill_kernels::reference::distill_loss_f64;
use distill_kernels::*;

const KINDS: [LossKind; 4] = [
    LossKind::ForwardKl,
    LossKind::ReverseKl,
    LossKind::Jsd { beta: 0.3 },
    LossKind::Jsd { beta: 0.7 },
];
const REDUCTIONS: [Reduction; 3] = [Reduction::None, Reduction::Sum, Reduction::Mean];
const ALPHAS: [f32; 3] = [0.0, 0.3, 1.0];
const TEMPERATURES: [f32; 4] = [0.5, 1.0, 2.0, 4.5];
const DTYPE_PAIRS: [(Dtype, Dtype); 6] = [
    (Dtype::F32, Dtype::F32),
    (Dtype::F16, Dtype::F16),
    (Dtype::Bf16, Dtype::Bf16),
    (Dtype::F32, Dtype::Bf16),
    (Dtype::Bf16, Dtype::F32),
    (Dtype::F16, Dtype::Bf16),
];

fn cfg(kind: LossKind, reduction: Reduction, alpha: f32, temperature: f32) -> LossConfig {
    LossConfig::builder()
        .kind(kind)
        .reduction(reduction)
        .alpha(alpha)
        .temperature(temperature)
        .build()
        .unwrap()
}

/// Weight of one probability-sized gradient term (see the header comment).
fn grad_unit(cfg: &LossConfig, valid_rows: usize) -> f64 {
    let (_, gs) = cfg.scales(valid_rows);
    gs.abs() * (cfg.soft_weight() as f64 / cfg.temperature as f64 + cfg.hard_weight() as f64)
}

/// Runs one case on `backend` and compares loss and gradients with the reference.
fn check(backend: &dyn DistillDevice, cfg: &LossConfig, inputs: &DistillInputs, label: &str) {
    let what = format!("{} {label} {:?}", backend.name(), cfg);
    let reference = distill_loss_f64(cfg, inputs).expect("reference accepts the case");
    let mut grad = vec![f32::NAN; inputs.rows * inputs.vocab];
    let hidden_len = inputs.hidden.map(|h| h.size * inputs.rows);
    let mut grad_h = vec![f32::NAN; hidden_len.unwrap_or(0)];
    let value = backend
        .distill_loss(
            cfg,
            inputs,
            GradOutputs {
                logits: Some(HostSliceMut::F32(&mut grad)),
                hidden: hidden_len.map(|_| HostSliceMut::F32(&mut grad_h)),
            },
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(value.valid_rows, reference.valid_rows, "{what}: valid rows");
    let loss_weight = (cfg.soft_weight().max(cfg.hard_weight()) as f64).max(1.0);
    let (loss_scale, _) = cfg.scales(reference.valid_rows);
    let per_loss_atol = 2e-5
        * loss_weight
        * if cfg.reduction == Reduction::Sum {
            inputs.rows as f64
        } else {
            loss_scale * inputs.rows as f64
        }
        .max(1.0);
    assert_close(
        &format!("{what} loss"),
        &value.values,
        &reference.loss,
        1e-4,
        per_loss_atol,
    );
    // Gradients are compared only in rows whose loss is finite (infinite rows are unspecified).
    let unit = grad_unit(cfg, reference.valid_rows);
    for r in 0..inputs.rows {
        if !reference.row_loss[r].is_finite() {
            continue;
        }
        let span = r * inputs.vocab..(r + 1) * inputs.vocab;
        assert_close(
            &format!("{what} grad row {r}"),
            &grad[span.clone()],
            &reference.grad_logits[span],
            1e-4,
            1e-5 * unit + 1e-30,
        );
    }
    if let (Some(h), Some(rh)) = (inputs.hidden, reference.grad_hidden.as_ref()) {
        let (_, gs) = cfg.scales(reference.valid_rows);
        let unit = gs.abs() * cfg.hidden_weight as f64 * 2.0 / h.size as f64 * 8.0;
        assert_close(
            &format!("{what} hidden grad"),
            &grad_h,
            rh,
            1e-4,
            1e-6 * unit + 1e-30,
        );
    }
}

fn inputs<'a>(b: &'a Batch, labels: Option<&'a [i64]>) -> DistillInputs<'a> {
    DistillInputs {
        rows: b.rows,
        vocab: b.vocab,
        student: b.student.as_slice(),
        teacher: b.teacher.as_slice(),
        labels,
        hidden: None,
    }
}

/// Every kind x reduction x alpha x T x dtype pair on the tiny shapes.
#[test]
fn full_matrix_on_tiny_shapes() {
    for (rows, vocab) in [(1, 1), (3, 7)] {
        for (di, &(sd, td)) in DTYPE_PAIRS.iter().enumerate() {
            let mut b = batch(rows, vocab, sd, td, 4.0, 7 + di as u64);
            if rows == 3 {
                b.labels = vec![0, -100, vocab as i64 - 1];
            }
            for kind in KINDS {
                for reduction in REDUCTIONS {
                    for alpha in ALPHAS {
                        for t in TEMPERATURES {
                            let c = cfg(kind, reduction, alpha, t);
                            for dev in subjects() {
                                check(
                                    dev,
                                    &c,
                                    &inputs(&b, Some(&b.labels)),
                                    &format!("{rows}x{vocab} {sd}/{td}"),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// 41 x 1271 (odd V: partial last stride, block of 160 threads): every kind, dtype pair and
/// alpha, with T and the reduction cycling so each value of each appears with each kind.
#[test]
fn medium_shape_all_kinds_dtypes_alphas() {
    let mut n = 0usize;
    for (ki, kind) in KINDS.iter().enumerate() {
        for (di, &(sd, td)) in DTYPE_PAIRS.iter().enumerate() {
            let mut b = batch(41, 1271, sd, td, 6.0, 100 + (ki * 10 + di) as u64);
            b.labels[3] = -100;
            b.labels[5] = 0;
            b.labels[7] = 1270;
            for alpha in ALPHAS {
                let c = cfg(*kind, REDUCTIONS[n % 3], alpha, TEMPERATURES[n % 4]);
                n += 1;
                for dev in subjects() {
                    check(
                        dev,
                        &c,
                        &inputs(&b, Some(&b.labels)),
                        &format!("41x1271 {sd}/{td}"),
                    );
                }
            }
        }
    }
}

/// Vocabularies of real models and beyond a million: one block per row loops over the row with
/// no per-thread array sized by V.
#[test]
fn large_vocabularies() {
    let cases = [
        (
            128_256usize,
            Dtype::Bf16,
            Dtype::Bf16,
            LossKind::ForwardKl,
            0.3f32,
            2.0f32,
        ),
        (
            128_256,
            Dtype::F32,
            Dtype::F16,
            LossKind::ReverseKl,
            1.0,
            1.0,
        ),
        (
            262_144,
            Dtype::F16,
            Dtype::F32,
            LossKind::Jsd { beta: 0.5 },
            0.3,
            4.5,
        ),
        (
            1_000_003,
            Dtype::F32,
            Dtype::Bf16,
            LossKind::ForwardKl,
            0.3,
            2.0,
        ),
        (
            1_000_003,
            Dtype::Bf16,
            Dtype::Bf16,
            LossKind::ReverseKl,
            0.0,
            1.0,
        ),
    ];
    for (i, &(vocab, sd, td, kind, alpha, t)) in cases.iter().enumerate() {
        let b = batch(2, vocab, sd, td, 8.0, 900 + i as u64);
        let c = cfg(kind, Reduction::Mean, alpha, t);
        for dev in subjects() {
            check(
                dev,
                &c,
                &inputs(&b, Some(&b.labels)),
                &format!("2x{vocab} {sd}/{td}"),
            );
        }
    }
}

/// Few long rows are split over several blocks per row (partial statistics, then the passes,
/// then a finishing launch: `split_for` in src/cuda/ops.rs): 1 to 3 rows, vocabularies up to
/// 1,000,003 with misaligned row starts, every kind and dtype pair, gradients written and
/// accumulated, labels at the row's ends and ignored. 264 rows of 16,400 take the one-block path
/// (two rows per SM of the emulated 132 fill the GPU) for comparison.
#[test]
fn split_rows_few_long_rows() {
    let mut n = 0usize;
    for (ki, kind) in KINDS.iter().enumerate() {
        for (di, &(sd, td)) in DTYPE_PAIRS.iter().enumerate() {
            let rows = 1 + n % 3;
            let vocab = [65_537, 40_000, 16_385][n % 3];
            let mut b = batch(rows, vocab, sd, td, 6.0, 700 + (ki * 10 + di) as u64);
            b.labels[0] = if n.is_multiple_of(2) {
                0
            } else {
                vocab as i64 - 1
            };
            if rows == 3 {
                b.labels[1] = -100;
            }
            let c = cfg(*kind, REDUCTIONS[n % 3], ALPHAS[n % 3], TEMPERATURES[n % 4]);
            n += 1;
            for dev in subjects() {
                check(
                    dev,
                    &c,
                    &inputs(&b, Some(&b.labels)),
                    &format!("split {rows}x{vocab} {sd}/{td}"),
                );
            }
        }
    }
    let cases = [
        // (large_vocabularies covers 2 x 1,000,003 for the KL kinds)
        (
            1usize,
            1_000_003usize,
            LossKind::Jsd { beta: 0.4 },
            Dtype::F16,
            Dtype::F32,
        ),
        (264, 16_400, LossKind::ReverseKl, Dtype::Bf16, Dtype::Bf16),
    ];
    for (i, &(rows, vocab, kind, sd, td)) in cases.iter().enumerate() {
        let b = batch(rows, vocab, sd, td, 8.0, 800 + i as u64);
        let c = cfg(kind, Reduction::Mean, 0.3, 2.0);
        for dev in subjects() {
            check(
                dev,
                &c,
                &inputs(&b, Some(&b.labels)),
                &format!("{rows}x{vocab} {sd}/{td}"),
            );
        }
    }
    // Reverse KL's loss alone skips the split row's apply launch: the loss comes from pass 1.
    let b = batch(2, 50_000, Dtype::Bf16, Dtype::Bf16, 6.0, 901);
    let c = cfg(LossKind::ReverseKl, Reduction::None, 0.6, 1.5);
    let inp = inputs(&b, Some(&b.labels));
    let reference = distill_loss_f64(&c, &inp).unwrap();
    for dev in subjects() {
        let v = dev.distill_loss(&c, &inp, GradOutputs::default()).unwrap();
        assert_close(
            &format!("{} rkl loss only", dev.name()),
            &v.values,
            &reference.loss,
            1e-4,
            2e-5,
        );
    }
}

/// `-inf` in both inputs at the same positions (a masked vocabulary) must behave like the
/// entries are absent: no NaN from 0 * log 0.
#[test]
fn masked_vocabulary() {
    for (ki, kind) in KINDS.iter().enumerate() {
        let (rows, vocab) = (5, 300);
        let b = batch(rows, vocab, Dtype::F32, Dtype::F32, 5.0, 40 + ki as u64);
        let mut s = widen(&b.student);
        let mut t = widen(&b.teacher);
        let mut labels = b.labels.clone();
        for r in 0..rows {
            for v in 0..vocab {
                if (v * 7 + r).is_multiple_of(5) {
                    s[r * vocab + v] = f32::NEG_INFINITY;
                    t[r * vocab + v] = f32::NEG_INFINITY;
                }
            }
            // keep the label on an unmasked entry
            if (labels[r] as usize * 7 + r).is_multiple_of(5) {
                labels[r] = (labels[r] + 1) % vocab as i64;
            }
        }
        for (sd, td) in [(Dtype::F32, Dtype::F32), (Dtype::Bf16, Dtype::F16)] {
            let (sv, tv) = (HostVec::from_f32(&s, sd), HostVec::from_f32(&t, td));
            for alpha in [0.3, 1.0] {
                let c = cfg(*kind, Reduction::Sum, alpha, 2.0);
                let inp = DistillInputs {
                    rows,
                    vocab,
                    student: sv.as_slice(),
                    teacher: tv.as_slice(),
                    labels: Some(&labels),
                    hidden: None,
                };
                for dev in subjects() {
                    check(dev, &c, &inp, "masked");
                }
            }
        }
    }
}

/// Logits of magnitude 1e4 (with the student a shifted teacher: soft loss exactly 0 in math),
/// constant rows, labels at 0 and V-1, rows ignored and a batch with every row ignored.
#[test]
fn extreme_values_and_ignored_rows() {
    let (rows, vocab) = (6, 513);
    let b = batch(rows, vocab, Dtype::F32, Dtype::F32, 1.0, 5);
    let mut s = widen(&b.student);
    let mut t = widen(&b.teacher);
    for v in 0..vocab {
        // row 0: huge logits, student = teacher + 1e4 (shift invariance)
        t[v] = 1e4 + 30.0 * ((v * 37 % 101) as f32 / 101.0);
        s[vocab + v] = -1e4 + 25.0 * ((v * 53 % 97) as f32 / 97.0);
        s[v] = t[v] + 1e4;
        // row 2: constant rows
        s[2 * vocab + v] = 3.0;
        t[2 * vocab + v] = -7.0;
    }
    let labels = vec![0, vocab as i64 - 1, 17, -100, 0, vocab as i64 - 1];
    let ignored = vec![-100i64; rows];
    for (sd, td) in [(Dtype::F32, Dtype::F32), (Dtype::Bf16, Dtype::Bf16)] {
        let (sv, tv) = (HostVec::from_f32(&s, sd), HostVec::from_f32(&t, td));
        for kind in KINDS {
            for reduction in REDUCTIONS {
                let c = cfg(kind, reduction, 0.3, 2.0);
                for l in [&labels, &ignored] {
                    let inp = DistillInputs {
                        rows,
                        vocab,
                        student: sv.as_slice(),
                        teacher: tv.as_slice(),
                        labels: Some(l),
                        hidden: None,
                    };
                    for dev in subjects() {
                        check(dev, &c, &inp, "extreme");
                    }
                }
            }
        }
    }
    // Every row ignored: loss 0 and gradient 0, not NaN.
    let c = cfg(LossKind::ForwardKl, Reduction::Mean, 0.5, 1.0);
    let (sv, tv) = (
        HostVec::from_f32(&s, Dtype::F32),
        HostVec::from_f32(&t, Dtype::F32),
    );
    for dev in subjects() {
        let mut g = vec![f32::NAN; rows * vocab];
        let v = dev
            .distill_loss(
                &c,
                &DistillInputs {
                    rows,
                    vocab,
                    student: sv.as_slice(),
                    teacher: tv.as_slice(),
                    labels: Some(&ignored),
                    hidden: None,
                },
                GradOutputs {
                    logits: Some(HostSliceMut::F32(&mut g)),
                    hidden: None,
                },
            )
            .unwrap();
        assert_eq!(v.values, vec![0.0], "{}", dev.name());
        assert_eq!(v.valid_rows, 0);
        assert!(
            g.iter().all(|&x| x == 0.0),
            "{}: gradient not all zero",
            dev.name()
        );
    }
}

/// Hidden-state MSE with the same row mask, alone and mixed with the logits loss, and an explicit
/// normalizer and upstream scale.
#[test]
fn hidden_mse_and_scales() {
    let (rows, vocab, hsize) = (9, 257, 96);
    for (i, &(sd, td)) in DTYPE_PAIRS.iter().enumerate() {
        let b = batch(rows, vocab, sd, td, 3.0, 300 + i as u64);
        let hb = batch(rows, hsize, sd, td, 2.0, 400 + i as u64);
        let mut labels = b.labels.clone();
        labels[4] = -100;
        for (reduction, normalizer, grad_scale) in [
            (Reduction::Mean, None, 1.0),
            (Reduction::Mean, Some(32.0), 0.5),
            (Reduction::Sum, None, 2.0),
            (Reduction::None, None, 1.0),
        ] {
            let c = LossConfig::builder()
                .kind(KINDS[i % 4])
                .reduction(reduction)
                .normalizer(normalizer)
                .grad_scale(grad_scale)
                .hidden_weight(0.7)
                .alpha(0.6)
                .temperature(1.5)
                .build()
                .unwrap();
            let inp = DistillInputs {
                hidden: Some(HiddenInputs {
                    size: hsize,
                    student: hb.student.as_slice(),
                    teacher: hb.teacher.as_slice(),
                }),
                ..inputs(&b, Some(&labels))
            };
            for dev in subjects() {
                check(dev, &c, &inp, &format!("hidden {sd}/{td}"));
            }
        }
    }
}

/// Softmax and log-softmax with temperature, forward and backward, every dtype.
#[test]
fn softmax_forward_backward() {
    use distill_kernels::reference::{softmax_backward_f64, softmax_f64};
    for (rows, vocab) in [(1, 1), (3, 7), (17, 1271), (2, 131_072)] {
        for dtype in Dtype::ALL {
            let b = batch(rows, vocab, dtype, dtype, 5.0, 77);
            let x = widen(&b.student);
            let dy_v = widen(&b.teacher);
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            for log in [false, true] {
                for t in [0.5f32, 2.0] {
                    let want = softmax_f64(&x64, rows, vocab, t as f64, log);
                    for dev in subjects() {
                        let mut y = HostVec::from_f32(&vec![0.0; rows * vocab], dtype);
                        let out = match &mut y {
                            HostVec::F32(v) => HostSliceMut::F32(v),
                            HostVec::F16(v) => HostSliceMut::F16(v),
                            HostVec::Bf16(v) => HostSliceMut::Bf16(v),
                        };
                        dev.softmax(b.student.as_slice(), rows, vocab, t, log, out)
                            .unwrap();
                        // Output rounding dominates for f16/bf16 outputs.
                        let rtol = match dtype {
                            Dtype::F32 => 2e-5,
                            Dtype::F16 => 2f64.powi(-10),
                            Dtype::Bf16 => 2f64.powi(-7),
                        };
                        let atol = if log {
                            1e-5 * (1.0 + max_abs(&want))
                        } else {
                            1e-7
                        };
                        let got = y.to_f32_vec();
                        assert_close(
                            &format!(
                                "{} softmax log={log} T={t} {dtype} {rows}x{vocab}",
                                dev.name()
                            ),
                            &got,
                            &want,
                            rtol,
                            atol,
                        );

                        // backward: feed the reference forward output (rounded to dtype)
                        let y_in = HostVec::from_f32(
                            &want.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                            dtype,
                        );
                        let y64: Vec<f64> = y_in.to_f32_vec().iter().map(|&v| v as f64).collect();
                        let dy64: Vec<f64> = dy_v.iter().map(|&v| v as f64).collect();
                        let want_dx = softmax_backward_f64(&y64, &dy64, rows, vocab, t as f64, log);
                        let mut dx = HostVec::from_f32(&vec![0.0; rows * vocab], dtype);
                        let out = match &mut dx {
                            HostVec::F32(v) => HostSliceMut::F32(v),
                            HostVec::F16(v) => HostSliceMut::F16(v),
                            HostVec::Bf16(v) => HostSliceMut::Bf16(v),
                        };
                        dev.softmax_backward(
                            y_in.as_slice(),
                            b.teacher.as_slice(),
                            rows,
                            vocab,
                            t,
                            log,
                            out,
                        )
                        .unwrap();
                        let scale = max_abs(&want_dx).max(max_abs(&dy64) / t as f64);
                        assert_close(
                            &format!(
                                "{} softmax_bwd log={log} T={t} {dtype} {rows}x{vocab}",
                                dev.name()
                            ),
                            &dx.to_f32_vec(),
                            &want_dx,
                            rtol,
                            2e-5 * scale * if log { vocab as f64 } else { 1.0 }.sqrt(),
                        );
                    }
                }
            }
        }
    }
}
