//! The fast CPU backend at scale: bit-identical results whatever the thread count and whatever
//! the instruction set (AVX-512, AVX2; the portable level where it fuses multiply-adds too),
//! every temperature path (T = 1..4 take the cross-entropy's exponentials as powers, other
//! temperatures their own) against the f64 reference, vocabularies that are not a multiple of
//! the chunk or lane width, and the memory floor.

use distill_kernels::cpu::{self, Cpu, SimdLevel};
use distill_kernels::reference::distill_loss_f64;
use distill_kernels::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KINDS: [LossKind; 3] = [
    LossKind::ForwardKl,
    LossKind::ReverseKl,
    LossKind::Jsd { beta: 0.4 },
];

fn logits(rng: &mut StdRng, rows: usize, vocab: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let mut s = Vec::with_capacity(rows * vocab);
    let mut t = Vec::with_capacity(rows * vocab);
    for _ in 0..rows * vocab {
        let tv: f32 = rng.gen_range(-scale..scale);
        t.push(tv);
        s.push(tv + rng.gen_range(-scale..scale) * 0.5);
    }
    (s, t)
}

type Bits = (Vec<u32>, Vec<u32>);

fn run_bits(
    f: &dyn Fn(&LossConfig, &DistillInputs, GradOutputs) -> Result<LossValue>,
    cfg: &LossConfig,
    inputs: &DistillInputs,
) -> Bits {
    let mut grad = vec![f32::NAN; inputs.rows * inputs.vocab];
    let loss = f(
        cfg,
        inputs,
        GradOutputs {
            logits: Some(HostSliceMut::F32(&mut grad)),
            hidden: None,
        },
    )
    .unwrap();
    (
        loss.values.iter().map(|v| v.to_bits()).collect(),
        grad.iter().map(|v| v.to_bits()).collect(),
    )
}

fn cpu_loss(cfg: &LossConfig, inputs: &DistillInputs, grads: GradOutputs) -> Result<LossValue> {
    Cpu::new().distill_loss(cfg, inputs, grads)
}

#[test]
fn bit_identical_in_pools_of_1_2_and_3_threads() {
    // A Llama-3 vocabulary and one that is neither a multiple of the 512-entry chunk nor of the
    // 16 lanes (GPT-2's), f32 and bf16, every kind, with an ignored row.
    let mut rng = StdRng::seed_from_u64(41);
    for (rows, vocab) in [(5, 128_256), (7, 50_257)] {
        let (s, t) = logits(&mut rng, rows, vocab, 8.0);
        let mut labels: Vec<i64> = (0..rows).map(|_| rng.gen_range(0..vocab as i64)).collect();
        labels[1] = -100;
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let (sv, tv) = (HostVec::from_f32(&s, dtype), HostVec::from_f32(&t, dtype));
            let inputs = DistillInputs {
                rows,
                vocab,
                student: sv.as_slice(),
                teacher: tv.as_slice(),
                labels: Some(&labels),
                hidden: None,
            };
            for kind in KINDS {
                let cfg = LossConfig::builder()
                    .kind(kind)
                    .alpha(0.5)
                    .temperature(2.0)
                    .build()
                    .unwrap();
                let first = run_bits(&cpu_loss, &cfg, &inputs);
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let again = pool.install(|| run_bits(&cpu_loss, &cfg, &inputs));
                    assert!(
                        first == again,
                        "{kind:?} {dtype} {rows}x{vocab}: {threads} threads differ"
                    );
                }
            }
        }
    }
}

#[test]
fn instruction_sets_agree_bit_for_bit() {
    let detected = SimdLevel::detect();
    println!("detected SIMD level: {}", detected.name());
    let mut rng = StdRng::seed_from_u64(42);
    let (rows, vocab) = (4, 20_011);
    let (s, t) = logits(&mut rng, rows, vocab, 10.0);
    let labels: Vec<i64> = (0..rows).map(|_| rng.gen_range(0..vocab as i64)).collect();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let (sv, tv) = (HostVec::from_f32(&s, dtype), HostVec::from_f32(&t, dtype));
        let inputs = DistillInputs {
            rows,
            vocab,
            student: sv.as_slice(),
            teacher: tv.as_slice(),
            labels: Some(&labels),
            hidden: None,
        };
        for kind in KINDS {
            for temperature in [1.0, 2.0, 1.7] {
                let cfg = LossConfig::builder()
                    .kind(kind)
                    .alpha(0.3)
                    .temperature(temperature)
                    .build()
                    .unwrap();
                let at = |level: SimdLevel| {
                    run_bits(
                        &|c, i, g| cpu::distill_loss_with(level, c, i, g),
                        &cfg,
                        &inputs,
                    )
                };
                let best = at(detected);
                // Every fused level gives the same bits (the portable level fuses on aarch64 and
                // in builds with FMA enabled; on x86_64 without, it may differ in the last bits).
                if detected >= SimdLevel::Avx512 {
                    assert!(
                        best == at(SimdLevel::Avx2),
                        "{kind:?} {dtype} T={temperature}"
                    );
                }
                let portable = at(SimdLevel::Portable);
                if cfg!(any(target_arch = "aarch64", target_feature = "fma")) {
                    assert!(best == portable, "{kind:?} {dtype} T={temperature}");
                } else {
                    // Separate roundings: the same bounds, not the same bits. Gradients are
                    // compared relative to the largest of the row (they cancel near 0).
                    let (lb, gb) = &best;
                    let (lp, gp) = &portable;
                    let f = |v: &[u32]| v.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>();
                    let (lb, lp, gb, gp) = (f(lb), f(lp), f(gb), f(gp));
                    for (a, b) in lb.iter().zip(&lp) {
                        assert!((a - b).abs() <= 1e-5 * a.abs(), "loss {a} vs {b}");
                    }
                    for (r, (ra, rb)) in gb.chunks(vocab).zip(gp.chunks(vocab)).enumerate() {
                        let big = ra.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        for (j, (a, b)) in ra.iter().zip(rb).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5 * big,
                                "{kind:?} {dtype} T={temperature} grad[{r}][{j}] {a:e} vs {b:e}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Loss and gradient against the reference: loss to 1e-4 relative plus 1e-5 per unit of weight,
/// gradient to 1e-5 of its unit (grad_scale / D times soft_weight / T + hard_weight) plus 1e-4
/// relative (the tolerances of tests/kernels.rs).
fn check_against_reference(cfg: &LossConfig, inputs: &DistillInputs, what: &str) {
    let reference = distill_loss_f64(cfg, inputs).unwrap();
    let mut grad = vec![f32::NAN; inputs.rows * inputs.vocab];
    let loss = Cpu::new()
        .distill_loss(
            cfg,
            inputs,
            GradOutputs {
                logits: Some(HostSliceMut::F32(&mut grad)),
                hidden: None,
            },
        )
        .unwrap();
    let weight = (cfg.soft_weight() + cfg.hard_weight()) as f64;
    for (&got, &want) in loss.values.iter().zip(&reference.loss) {
        let err = (got as f64 - want).abs();
        assert!(
            err <= 1e-4 * want.abs() + 1e-5 * weight,
            "{what} {cfg:?}: loss {got} vs {want}"
        );
    }
    let (_, gs) = cfg.scales(reference.valid_rows);
    let unit =
        gs.abs() * (cfg.soft_weight() as f64 / cfg.temperature as f64 + cfg.hard_weight() as f64);
    for (i, (&got, &want)) in grad.iter().zip(&reference.grad_logits).enumerate() {
        let err = (got as f64 - want).abs();
        assert!(
            err <= 1e-5 * unit + 1e-4 * want.abs(),
            "{what} {cfg:?}: grad[{i}] {got:e} vs {want:e}"
        );
    }
}

#[test]
fn every_temperature_path_matches_the_reference() {
    // T = 1..4 take the cross-entropy's exponentials as powers of the soft ones; 0.5, 1.5 and 7
    // take their own. Labels at both ends, an ignored row, and alpha 0 (no teacher), 0.5, 1.
    let mut rng = StdRng::seed_from_u64(43);
    let (rows, vocab) = (4, 3001);
    let (s, t) = logits(&mut rng, rows, vocab, 9.0);
    let labels = [0i64, vocab as i64 - 1, -100, 1234];
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let (sv, tv) = (HostVec::from_f32(&s, dtype), HostVec::from_f32(&t, dtype));
        let inputs = DistillInputs {
            rows,
            vocab,
            student: sv.as_slice(),
            teacher: tv.as_slice(),
            labels: Some(&labels),
            hidden: None,
        };
        for kind in KINDS {
            for temperature in [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 7.0] {
                for alpha in [0.0, 0.5, 1.0] {
                    let cfg = LossConfig::builder()
                        .kind(kind)
                        .alpha(alpha)
                        .temperature(temperature)
                        .reduction(Reduction::Sum)
                        .build()
                        .unwrap();
                    check_against_reference(&cfg, &inputs, &format!("{dtype}"));
                }
            }
        }
    }
}

#[test]
fn peaked_rows_at_temperature_4_keep_small_probabilities() {
    // A very peaked student at T = 4: the cross-entropy's probabilities (a fourth power of the
    // soft ones) span many decades; the power must underflow no earlier than softmax itself.
    let (rows, vocab) = (2, 1000);
    let mut s = vec![0.0f32; rows * vocab];
    let mut t = vec![0.0f32; rows * vocab];
    for j in 0..vocab {
        s[j] = -(j as f32) * 0.09; // row 0: softmax(s) spans e^-90
        t[j] = -(j as f32) * 0.01;
        s[vocab + j] = if j == 3 { 30.0 } else { (j % 7) as f32 };
        t[vocab + j] = (j % 5) as f32;
    }
    let labels = [5i64, 3];
    let inputs = DistillInputs {
        rows,
        vocab,
        student: HostSlice::F32(&s),
        teacher: HostSlice::F32(&t),
        labels: Some(&labels),
        hidden: None,
    };
    for kind in KINDS {
        let cfg = LossConfig::builder()
            .kind(kind)
            .alpha(0.5)
            .temperature(4.0)
            .build()
            .unwrap();
        check_against_reference(&cfg, &inputs, "peaked");
    }
}

#[test]
fn loss_only_equals_loss_with_gradient_at_scale() {
    let mut rng = StdRng::seed_from_u64(44);
    let (rows, vocab) = (3, 70_001);
    let (s, t) = logits(&mut rng, rows, vocab, 6.0);
    let labels = [7i64, -100, 69_999];
    let (sv, tv) = (
        HostVec::from_f32(&s, Dtype::Bf16),
        HostVec::from_f32(&t, Dtype::F16),
    );
    let inputs = DistillInputs {
        rows,
        vocab,
        student: sv.as_slice(),
        teacher: tv.as_slice(),
        labels: Some(&labels),
        hidden: None,
    };
    for kind in KINDS {
        for temperature in [1.0, 2.0, 2.5] {
            let cfg = LossConfig::builder()
                .kind(kind)
                .alpha(0.7)
                .temperature(temperature)
                .reduction(Reduction::None)
                .build()
                .unwrap();
            let (with_grad, _) = run_bits(&cpu_loss, &cfg, &inputs);
            let alone = Cpu::new()
                .distill_loss(&cfg, &inputs, GradOutputs::default())
                .unwrap();
            let alone: Vec<u32> = alone.values.iter().map(|v| v.to_bits()).collect();
            assert_eq!(with_grad, alone, "{kind:?} T={temperature}");
        }
    }
}

#[test]
fn masked_and_extreme_logits_at_scale() {
    // Scattered -inf in both inputs (masked vocabulary), whole masked chunks at the start of a
    // row, logits of magnitude 1e4, a row whose teacher is -inf where the student is not, and
    // rows whose student is -inf where the teacher is not (forward KL's +inf, found in pass 1):
    // one entry mid-row, and the first 1024 entries (whole chunks of the `cpu` backend, read
    // before the student has any maximum).
    let (rows, vocab) = (5, 5000);
    let mut rng = StdRng::seed_from_u64(45);
    let (mut s, mut t) = logits(&mut rng, rows, vocab, 5.0);
    for j in 0..vocab {
        if j < 1100 || j % 13 == 0 {
            s[j] = f32::NEG_INFINITY;
            t[j] = f32::NEG_INFINITY;
        }
        s[vocab + j] += 1e4;
        t[vocab + j] -= 1e4;
    }
    t[2 * vocab + 17] = f32::NEG_INFINITY;
    s[3 * vocab + 2500] = f32::NEG_INFINITY;
    s[4 * vocab..4 * vocab + 1024].fill(f32::NEG_INFINITY);
    let labels = [2000i64, 3, 4, 5, 4000];
    let inputs = DistillInputs {
        rows,
        vocab,
        student: HostSlice::F32(&s),
        teacher: HostSlice::F32(&t),
        labels: Some(&labels),
        hidden: None,
    };
    for kind in KINDS {
        for temperature in [1.0, 2.0, 0.7] {
            let cfg = LossConfig::builder()
                .kind(kind)
                .alpha(0.5)
                .temperature(temperature)
                .reduction(Reduction::None)
                .build()
                .unwrap();
            let reference = distill_loss_f64(&cfg, &inputs).unwrap();
            let mut grad = vec![f32::NAN; rows * vocab];
            let loss = Cpu::new()
                .distill_loss(
                    &cfg,
                    &inputs,
                    GradOutputs {
                        logits: Some(HostSliceMut::F32(&mut grad)),
                        hidden: None,
                    },
                )
                .unwrap();
            for r in 0..rows {
                let (got, want) = (loss.values[r] as f64, reference.loss[r]);
                if want.is_infinite() {
                    assert_eq!(got, want, "{kind:?} T={temperature} row {r}");
                } else {
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs() + 1e-4,
                        "{kind:?} T={temperature} row {r}: {got} vs {want}"
                    );
                }
            }
            for j in 0..vocab {
                if s[j] == f32::NEG_INFINITY {
                    assert_eq!(grad[j], 0.0, "{kind:?} masked entry {j}");
                }
            }
            // Where the reference gradient is finite, ours matches it (rows with a +inf loss
            // included: forward KL's gradient p_s - p_t stays finite there).
            for (i, (&g, &w)) in grad.iter().zip(&reference.grad_logits).enumerate() {
                if w.is_finite() {
                    assert!(
                        (g as f64 - w).abs() <= 1e-6 + 1e-4 * w.abs(),
                        "{kind:?} T={temperature} gradient {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn memory_floor_writes_the_difference() {
    let mut rng = StdRng::seed_from_u64(46);
    let (rows, vocab) = (3, 1037);
    let (s, t) = logits(&mut rng, rows, vocab, 4.0);
    for (sd, td) in [
        (Dtype::F32, Dtype::F32),
        (Dtype::Bf16, Dtype::Bf16),
        (Dtype::F16, Dtype::F32),
    ] {
        let (sv, tv) = (HostVec::from_f32(&s, sd), HostVec::from_f32(&t, td));
        let mut out = vec![f32::NAN; rows * vocab];
        cpu::memory_floor(sv.as_slice(), tv.as_slice(), rows, vocab, &mut out);
        let (sw, tw) = (sv.to_f32_vec(), tv.to_f32_vec());
        for i in 0..rows * vocab {
            assert_eq!(out[i], sw[i] - tw[i], "{sd}/{td} [{i}]");
        }
    }
}

#[test]
#[should_panic(expected = "memory_floor: output length")]
fn memory_floor_checks_lengths() {
    let s = [0.0f32; 6];
    let mut out = [0.0f32; 5];
    cpu::memory_floor(HostSlice::F32(&s), HostSlice::F32(&s), 2, 3, &mut out);
}

#[test]
fn softmax_at_llama3_vocabulary() {
    let mut rng = StdRng::seed_from_u64(47);
    let (rows, vocab) = (2, 128_256);
    let (x, _) = logits(&mut rng, rows, vocab, 12.0);
    for log in [false, true] {
        let mut out = vec![0.0f32; rows * vocab];
        Cpu::new()
            .softmax(
                HostSlice::F32(&x),
                rows,
                vocab,
                2.0,
                log,
                HostSliceMut::F32(&mut out),
            )
            .unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let want = distill_kernels::reference::softmax_f64(&x64, rows, vocab, 2.0, log);
        for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
            let tol = if log {
                2e-6 * (1.0 + w.abs())
            } else {
                1e-5 * w.abs() + 1e-12
            };
            assert!(
                (g as f64 - w).abs() <= tol,
                "log={log} [{i}] {g:e} vs {w:e}"
            );
        }
    }
}

/// The gradient written over the student logits equals the one written into a separate buffer
/// of the student's dtype, bit for bit, for every kind and dtype, hidden states included; an
/// argument error leaves the logits as they were.
#[test]
fn in_place_gradient_equals_a_separate_buffer() {
    use distill_kernels::cpu::InPlaceInputs;
    let mut rng = StdRng::seed_from_u64(77);
    let (rows, vocab, h) = (9, 1500, 40);
    let (s, t) = logits(&mut rng, rows, vocab, 4.0);
    let hs: Vec<f32> = (0..rows * h).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let ht: Vec<f32> = (0..rows * h).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut labels: Vec<i64> = (0..rows).map(|_| rng.gen_range(0..vocab as i64)).collect();
    labels[4] = -100;
    for kind in [
        LossKind::ForwardKl,
        LossKind::ReverseKl,
        LossKind::Jsd { beta: 0.3 },
    ] {
        for dtype in Dtype::ALL {
            let cfg = LossConfig::builder()
                .kind(kind)
                .temperature(2.0)
                .alpha(0.7)
                .hidden_weight(0.5)
                .build()
                .unwrap();
            let student = HostVec::from_f32(&s, dtype);
            let teacher = HostVec::from_f32(&t, Dtype::Bf16);
            let hidden = HiddenInputs {
                size: h,
                student: HostSlice::F32(&hs),
                teacher: HostSlice::F32(&ht),
            };
            let mut grad = HostVec::zeros(dtype, rows * vocab);
            let mut grad_h = vec![0.0f32; rows * h];
            let want = Cpu::new()
                .distill_loss(
                    &cfg,
                    &DistillInputs {
                        rows,
                        vocab,
                        student: student.as_slice(),
                        teacher: teacher.as_slice(),
                        labels: Some(&labels),
                        hidden: Some(hidden),
                    },
                    GradOutputs {
                        logits: Some(grad.as_mut_slice()),
                        hidden: Some(HostSliceMut::F32(&mut grad_h)),
                    },
                )
                .unwrap();
            let inputs = InPlaceInputs {
                rows,
                vocab,
                teacher: teacher.as_slice(),
                labels: Some(&labels),
                hidden: Some(hidden),
            };
            let mut in_place = student.clone();
            let mut got_h = vec![0.0f32; rows * h];
            let got = Cpu::new()
                .distill_loss_in_place(
                    &cfg,
                    in_place.as_mut_slice(),
                    &inputs,
                    Some(HostSliceMut::F32(&mut got_h)),
                )
                .unwrap();
            assert_eq!(got, want, "{kind:?} {dtype} loss");
            assert_eq!(in_place, grad, "{kind:?} {dtype} gradient");
            assert_eq!(got_h, grad_h, "{kind:?} {dtype} hidden gradient");

            // A label out of range: an error, and the logits are untouched.
            let mut bad = labels.clone();
            bad[2] = vocab as i64;
            let mut untouched = student.clone();
            let e = Cpu::new()
                .distill_loss_in_place(
                    &cfg,
                    untouched.as_mut_slice(),
                    &InPlaceInputs {
                        labels: Some(&bad),
                        ..inputs
                    },
                    None,
                )
                .unwrap_err();
            assert!(matches!(e, Error::LabelOutOfRange { row: 2, .. }), "{e}");
            assert_eq!(untouched, student);
        }
    }
}
