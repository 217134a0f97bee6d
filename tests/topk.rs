//! The loss against a top-k teacher (`TopKTeacher`) on every device (cpu, and the emulated GPU
//! running kernels/kd_topk.cu through cudarc) against the f64 reference, the reference against
//! the dense loss and finite differences, and the edge cases the semantics name.
//!
//! Tolerances are those of tests/kernels.rs: inputs are rounded to their dtype before the
//! reference sees them, so what remains is f32 arithmetic: a row loss within 3e-5 per unit of
//! loss weight (log-probabilities of size < 30 carry a few f32 ulps), a gradient element within
//! 1e-5 of its weight `grad_scale / D * (soft_weight / T + hard_weight)`, plus the output's own
//! rounding (2^-8 relative for bf16, 2^-11 for f16).
mod common;

use common::*;
use distill_kernels::reference::{
    distill_loss_f64, distill_loss_topk_f64, distill_loss_topk_f64_slices, F64TopKInputs,
};
use distill_kernels::topk::TopKRows;
use distill_kernels::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KINDS: [LossKind; 2] = [LossKind::ForwardKl, LossKind::ReverseKl];

fn cfg(kind: LossKind, alpha: f32, temperature: f32, reduction: Reduction) -> LossConfig {
    LossConfig::builder()
        .kind(kind)
        .alpha(alpha)
        .temperature(temperature)
        .reduction(reduction)
        .build()
        .unwrap()
}

/// A dense batch and its teacher's top k (values rounded to `vd`).
struct Case {
    batch: Batch,
    topk: TopKRows,
    values: HostVec,
}

impl Case {
    fn new(rows: usize, vocab: usize, k: usize, sd: Dtype, vd: Dtype, seed: u64) -> Case {
        let batch = batch(rows, vocab, sd, Dtype::F32, 3.0, seed);
        let topk = TopKRows::from_logits(batch.teacher.as_slice(), rows, vocab, k).unwrap();
        let values = HostVec::from_f32(&topk.values, vd);
        Case {
            batch,
            topk,
            values,
        }
    }

    fn inputs(&self, labels: bool) -> TopKInputs<'_> {
        TopKInputs {
            rows: self.batch.rows,
            vocab: self.batch.vocab,
            student: self.batch.student.as_slice(),
            teacher: TopKTeacher {
                k: self.topk.k,
                ids: &self.topk.ids,
                values: self.values.as_slice(),
                tail: &self.topk.tail,
            },
            labels: labels.then_some(&self.batch.labels[..]),
        }
    }
}

fn grad_unit(cfg: &LossConfig, valid_rows: usize) -> f64 {
    let (_, gs) = cfg.scales(valid_rows);
    gs.abs() * (cfg.soft_weight() as f64 / cfg.temperature as f64 + cfg.hard_weight() as f64)
}

/// One call on `dev` with a gradient of dtype `gd`, compared with the reference.
fn check(dev: &dyn DistillDevice, cfg: &LossConfig, inputs: &TopKInputs, gd: Dtype, what: &str) {
    let what = format!("{} {what} {:?} grad {gd}", dev.name(), cfg.kind);
    let want = distill_loss_topk_f64(cfg, inputs).unwrap();
    let mut grad = HostVec::from_f32(&vec![f32::NAN; inputs.rows * inputs.vocab], gd);
    let got = dev
        .distill_loss_topk(cfg, inputs, Some(grad.as_mut_slice()))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got.valid_rows, want.valid_rows, "{what}: valid rows");
    let weight = (cfg.soft_weight().max(cfg.hard_weight()) as f64).max(1.0);
    let (loss_scale, _) = cfg.scales(want.valid_rows);
    let atol = 3e-5 * weight * loss_scale.max(1e-30) * inputs.rows as f64;
    assert_close(
        &format!("{what}: loss"),
        &got.values,
        &want.loss,
        1e-5,
        atol,
    );
    let rtol = match gd {
        Dtype::F32 => 0.0,
        Dtype::F16 => 1.0 / 2048.0,
        Dtype::Bf16 => 1.0 / 256.0,
    };
    let unit = grad_unit(cfg, want.valid_rows);
    assert_close(
        &format!("{what}: grad"),
        &widen(&grad),
        &want.grad_logits,
        rtol,
        1e-5 * unit + 1e-30,
    );
}

#[test]
fn every_device_matches_the_reference() {
    // (vocab, k): k = 1, odd k, k = V - 1 (a one-id tail), a vocabulary that is not a multiple
    // of the block or the chunk, k at its maximum.
    let shapes = [
        (7, 1),
        (33, 5),
        (33, 32),
        (1000, 17),
        (5003, 128),
        (3000, 1024),
    ];
    let dtypes = [
        (Dtype::F32, Dtype::F32, Dtype::F32),
        (Dtype::Bf16, Dtype::F16, Dtype::F32),
        (Dtype::F16, Dtype::Bf16, Dtype::F16),
        (Dtype::Bf16, Dtype::F32, Dtype::Bf16),
    ];
    let mut seed = 1;
    for &(vocab, k) in &shapes {
        for &(sd, vd, gd) in &dtypes {
            seed += 1;
            let mut case = Case::new(3, vocab, k, sd, vd, seed);
            case.batch.labels[1] = -100; // an ignored row
            for kind in KINDS {
                for (alpha, t) in [(1.0, 1.0), (0.6, 2.0), (0.0, 0.7), (0.3, 0.5)] {
                    for reduction in [Reduction::None, Reduction::Mean] {
                        let cfg = cfg(kind, alpha, t, reduction);
                        let what = format!("V {vocab} k {k} {sd}/{vd} a {alpha} T {t}");
                        for dev in subjects() {
                            check(dev, &cfg, &case.inputs(true), gd, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn reference_with_a_one_id_tail_is_the_dense_loss() {
    // k = V - 1: the buckets are the whole distribution, so the loss is the dense one at every T.
    let case = Case::new(4, 40, 39, Dtype::F32, Dtype::F32, 7);
    for kind in KINDS {
        // Powers of two: the one-id tail's l / T is then exact in f32, as the dense logit is.
        for t in [0.5, 1.0, 2.0, 4.0] {
            let cfg = cfg(kind, 0.7, t, Reduction::None);
            // The dense teacher whose log-softmax the top-k rows hold (f32-rounded values).
            let mut dense = vec![0.0f32; 4 * 40];
            for r in 0..4 {
                for i in 0..39 {
                    dense[r * 40 + case.topk.ids[r * 39 + i] as usize] =
                        case.topk.values[r * 39 + i];
                }
                let missing = (0..40)
                    .find(|v| !case.topk.ids[r * 39..(r + 1) * 39].contains(&(*v as u32)))
                    .unwrap();
                dense[r * 40 + missing] = case.topk.tail[r];
            }
            // The one-id tail's logit at T is that id's l / T.
            let tail: Vec<f32> = case.topk.tail.iter().map(|&l| l / t).collect();
            let mut inputs = case.inputs(true);
            inputs.teacher.tail = &tail;
            let sparse = distill_loss_topk_f64(&cfg, &inputs).unwrap();
            let d = distill_loss_f64(
                &cfg,
                &DistillInputs {
                    rows: 4,
                    vocab: 40,
                    student: case.batch.student.as_slice(),
                    teacher: dense[..].into(),
                    labels: Some(&case.batch.labels),
                    hidden: None,
                },
            )
            .unwrap();
            for (a, b) in sparse.loss.iter().zip(&d.loss) {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    "{kind:?} T {t}: {a} vs {b}"
                );
            }
            for (a, b) in sparse.grad_logits.iter().zip(&d.grad_logits) {
                assert!((a - b).abs() <= 1e-13, "{kind:?} T {t}: grad {a} vs {b}");
            }
        }
    }
}

#[test]
fn reference_at_t1_never_exceeds_the_dense_kl() {
    // Summing the vocabulary into buckets can only lose divergence (the data-processing
    // inequality), so at T = 1, where the buckets are exact, the top-k KL is at most the dense.
    let case = Case::new(6, 300, 8, Dtype::F32, Dtype::F32, 11);
    for kind in KINDS {
        let cfg = cfg(kind, 1.0, 1.0, Reduction::None);
        let sparse = distill_loss_topk_f64(&cfg, &case.inputs(false)).unwrap();
        let dense = distill_loss_f64(
            &cfg,
            &DistillInputs {
                rows: 6,
                vocab: 300,
                student: case.batch.student.as_slice(),
                teacher: case.batch.teacher.as_slice(),
                labels: None,
                hidden: None,
            },
        )
        .unwrap();
        for (r, (s, d)) in sparse.loss.iter().zip(&dense.loss).enumerate() {
            assert!(*s <= d + 1e-6, "{kind:?} row {r}: top-k {s} > dense {d}");
            assert!(*s > 0.0, "{kind:?} row {r}: top-k loss {s}");
        }
    }
}

#[test]
fn reference_gradient_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, vocab, k) = (2, 11, 3);
    let student: Vec<f64> = (0..rows * vocab)
        .map(|_| rng.gen_range(-2.0..2.0))
        .collect();
    let ids: Vec<u32> = vec![4, 0, 9, 2, 10, 7];
    let values: Vec<f64> = vec![-0.5, -1.5, -2.0, -0.3, -2.5, -1.0];
    let tail: Vec<f64> = vec![-1.9, -2.2];
    let labels = [3i64, 10];
    for kind in KINDS {
        let cfg = cfg(kind, 0.6, 1.7, Reduction::Sum);
        let run = |s: &[f64]| {
            distill_loss_topk_f64_slices(
                &cfg,
                &F64TopKInputs {
                    rows,
                    vocab,
                    k,
                    student: s,
                    ids: &ids,
                    values: &values,
                    tail: &tail,
                    labels: Some(&labels),
                },
            )
            .unwrap()
        };
        let base = run(&student);
        for i in 0..rows * vocab {
            let h = 1e-6;
            let (mut up, mut down) = (student.clone(), student.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (run(&up).loss[0] - run(&down).loss[0]) / (2.0 * h);
            let g = base.grad_logits[i];
            assert!(
                (fd - g).abs() < 1e-7,
                "{kind:?} [{i}]: analytic {g}, numeric {fd}"
            );
        }
    }
}

/// Runs `inputs` on every device and the reference, all with f32 gradients.
fn check_all(cfg: &LossConfig, inputs: &TopKInputs, what: &str) {
    for dev in subjects() {
        check(dev, cfg, inputs, Dtype::F32, what);
    }
}

#[test]
fn edge_cases_follow_the_reference() {
    let (rows, vocab, k) = (4, 50, 5);
    let mut case = Case::new(rows, vocab, k, Dtype::F32, Dtype::F32, 21);
    // Row 0: -inf student entries at a top id and in the tail. Row 1: an empty teacher tail.
    // Row 2: a student whose tail is tiny (1e-30 of its mass): summed, not subtracted.
    // Row 3: the label is one of the top ids.
    let HostVec::F32(s) = &mut case.batch.student else {
        unreachable!()
    };
    s[case.topk.ids[1] as usize] = f32::NEG_INFINITY;
    let tail_id = (0..vocab as u32)
        .find(|v| !case.topk.ids[..k].contains(v))
        .unwrap();
    s[tail_id as usize] = f32::NEG_INFINITY;
    case.topk.tail[1] = f32::NEG_INFINITY;
    for j in 0..vocab {
        let top = case.topk.ids[2 * k..3 * k].contains(&(j as u32));
        s[2 * vocab + j] = if top { 40.0 } else { -30.0 };
    }
    case.batch.labels[3] = case.topk.ids[3 * k + 2] as i64;
    case.batch.labels[0] = tail_id as i64 + 1;
    for kind in KINDS {
        for (alpha, t) in [(1.0, 1.0), (0.5, 2.0)] {
            let cfg = cfg(kind, alpha, t, Reduction::None);
            // Row 0 forward KL: the teacher's mass on the -inf top id makes the loss +inf and
            // its gradient unspecified; check the other rows with row 0 ignored there.
            let mut c2 = cfg;
            let mut labels = case.batch.labels.clone();
            if kind == LossKind::ForwardKl {
                labels[0] = c2.ignore_index;
            }
            c2.reduction = Reduction::None;
            let mut inputs = case.inputs(true);
            inputs.labels = Some(&labels);
            check_all(&c2, &inputs, &format!("edge a {alpha} T {t}"));
        }
    }
    // Forward KL row 0 alone: +inf on every device.
    let cfg = cfg(LossKind::ForwardKl, 1.0, 1.0, Reduction::None);
    for dev in subjects() {
        let v = dev
            .distill_loss_topk(&cfg, &case.inputs(false), None)
            .unwrap();
        assert_eq!(v.values[0], f32::INFINITY, "{}", dev.name());
        assert!(
            v.values[1..].iter().all(|x| x.is_finite()),
            "{}",
            dev.name()
        );
    }
}

#[test]
fn all_rows_ignored_and_hard_only() {
    let mut case = Case::new(3, 64, 4, Dtype::Bf16, Dtype::F16, 31);
    // Every row ignored: loss 0, gradient 0, D = 0.
    let labels = vec![-100i64; 3];
    let cfg_mean = cfg(LossKind::ReverseKl, 0.5, 2.0, Reduction::Mean);
    for dev in subjects() {
        let mut inputs = case.inputs(true);
        inputs.labels = Some(&labels);
        let mut g = vec![f32::NAN; 3 * 64];
        let v = dev
            .distill_loss_topk(&cfg_mean, &inputs, Some(HostSliceMut::F32(&mut g)))
            .unwrap();
        assert_eq!((v.values[0], v.valid_rows), (0.0, 0), "{}", dev.name());
        assert!(g.iter().all(|&x| x == 0.0), "{}", dev.name());
    }
    // alpha = 0 never reads the teacher: NaN values change nothing.
    case.values = HostVec::from_f32(&[f32::NAN; 3 * 4], Dtype::F16);
    let cfg0 = cfg(LossKind::ForwardKl, 0.0, 3.0, Reduction::Sum);
    check_all(&cfg0, &case.inputs(true), "hard only, NaN teacher");
}

#[test]
fn bad_ids_and_options_are_refused_alike_everywhere() {
    let case = Case::new(2, 30, 4, Dtype::F32, Dtype::F32, 41);
    let mut devices: Vec<&dyn DistillDevice> = subjects();
    devices.push(&distill_kernels::reference::Reference);
    let fkl = cfg(LossKind::ForwardKl, 1.0, 1.0, Reduction::Mean);
    for dev in devices {
        let mut ids = case.topk.ids.clone();
        ids[5] = ids[6]; // row 1 repeats an id
        let mut inputs = case.inputs(false);
        inputs.teacher.ids = &ids;
        let e = dev.distill_loss_topk(&fkl, &inputs, None).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TopKId {
                    row: 1,
                    reason: "appears twice in the row",
                    ..
                }
            ),
            "{}: {e}",
            dev.name()
        );
        ids[5] = 30;
        let mut inputs = case.inputs(false);
        inputs.teacher.ids = &ids;
        let e = dev.distill_loss_topk(&fkl, &inputs, None).unwrap_err();
        assert!(
            matches!(e, Error::TopKId { row: 1, id: 30, .. }),
            "{}: {e}",
            dev.name()
        );
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");

        let jsd = cfg(LossKind::Jsd { beta: 0.5 }, 1.0, 1.0, Reduction::Mean);
        let e = dev
            .distill_loss_topk(&jsd, &case.inputs(false), None)
            .unwrap_err();
        assert!(e.to_string().contains("top-k"), "{}: {e}", dev.name());

        for k in [0, 30, 1025] {
            let mut inputs = case.inputs(false);
            inputs.teacher.k = k;
            let e = dev.distill_loss_topk(&fkl, &inputs, None).unwrap_err();
            assert!(
                matches!(e, Error::InvalidOption { name: "top_k", .. }),
                "{} k {k}: {e}",
                dev.name()
            );
        }
        let mut inputs = case.inputs(false);
        inputs.teacher.tail = &case.topk.tail[..1];
        let e = dev.distill_loss_topk(&fkl, &inputs, None).unwrap_err();
        assert!(
            matches!(
                e,
                Error::ShapeMismatch {
                    tensor: "teacher_tail",
                    ..
                }
            ),
            "{}: {e}",
            dev.name()
        );
    }
}

#[test]
fn the_device_finds_bad_ids_and_writes_nothing() {
    use distill_kernels::cuda::{DeviceTopK, DeviceTopKInputs, Student};
    let dev = emulated();
    let stream = dev.stream();
    let case = Case::new(3, 40, 6, Dtype::F32, Dtype::F32, 51);
    let student = widen(&case.batch.student);
    for (bad_row, bad_slot, bad_id, reason) in [
        (2, 3, 40u32, "is outside the vocabulary"),
        (1, 4, case.topk.ids[6 + 1], "appears twice in the row"),
    ] {
        let mut ids = case.topk.ids.clone();
        ids[bad_row * 6 + bad_slot] = bad_id;
        let d_ids = stream.clone_htod(&ids).unwrap();
        let d_values = stream.clone_htod(&case.topk.values).unwrap();
        let d_tail = stream.clone_htod(&case.topk.tail).unwrap();
        let mut d_s = stream.clone_htod(&student).unwrap();
        let cfg = cfg(LossKind::ReverseKl, 1.0, 2.0, Reduction::Mean);
        let e = dev
            .distill_loss_topk_device(
                &cfg,
                DeviceTopKInputs {
                    rows: 3,
                    vocab: 40,
                    student: Student::InPlace(&mut d_s),
                    teacher: DeviceTopK {
                        k: 6,
                        ids: d_ids.as_view(),
                        values: &d_values,
                        tail: d_tail.as_view(),
                    },
                    labels: None,
                    strides: Default::default(),
                },
            )
            .unwrap_err();
        match e {
            Error::TopKId {
                row, id, reason: r, ..
            } => assert_eq!((row, id, r), (bad_row, bad_id, reason)),
            other => panic!("{other}"),
        }
        let after = stream.clone_dtoh(&d_s).unwrap();
        assert_eq!(
            after, student,
            "an in-place gradient overwrote the logits of a failed call"
        );
    }
}

#[test]
fn a_million_entry_vocabulary_with_k_1024() {
    // V = 1,000,003 (prime: no block or chunk divides it), k = 1024, bf16 student.
    let (rows, vocab, k) = (2, 1_000_003, 1024);
    let case = Case::new(rows, vocab, k, Dtype::Bf16, Dtype::F16, 61);
    let cfg = cfg(LossKind::ForwardKl, 0.8, 2.0, Reduction::Mean);
    check_all(&cfg, &case.inputs(true), "V 1000003 k 1024");
}

#[test]
fn the_tail_at_t_is_exact_on_its_grid_and_bounded_between() {
    // k = V - 1 with tails kept at T = 2 and 4: the loss at those T is the dense loss; at
    // T = 3 the interpolated tail is an upper bound of the exact one (convex in 1 / T).
    let b = batch(3, 30, Dtype::F32, Dtype::F32, 3.0, 71);
    let top = TopKRows::from_logits_at(b.teacher.as_slice(), 3, 30, 29, &[4.0, 2.0]).unwrap();
    let exact3 = TopKRows::from_logits_at(b.teacher.as_slice(), 3, 30, 29, &[3.0]).unwrap();
    for t in [2.0, 4.0] {
        let tail = top.tail_at(t).unwrap();
        let cfg = cfg(LossKind::ForwardKl, 1.0, t, Reduction::Sum);
        let inputs = TopKInputs {
            rows: 3,
            vocab: 30,
            student: b.student.as_slice(),
            teacher: top.teacher_with(&tail),
            labels: None,
        };
        let sparse = distill_loss_topk_f64(&cfg, &inputs).unwrap().loss[0];
        let dense = distill_loss_f64(
            &cfg,
            &DistillInputs {
                rows: 3,
                vocab: 30,
                student: b.student.as_slice(),
                teacher: b.teacher.as_slice(),
                labels: None,
                hidden: None,
            },
        )
        .unwrap()
        .loss[0];
        assert!(
            (sparse - dense).abs() < 1e-6 * dense,
            "T {t}: {sparse} vs {dense}"
        );
    }
    let (mid, want) = (top.tail_at(3.0).unwrap(), exact3.tail_at(3.0).unwrap());
    for (m, w) in mid.iter().zip(&want) {
        assert!(
            *m >= *w - 1e-6 && *m < *w + 0.05,
            "interpolated {m} vs exact {w}"
        );
    }
    // Outside the grid: an error naming the temperature, not a guess.
    let e = top.tail_at(0.5).unwrap_err().to_string();
    assert!(e.contains("temperature") && e.contains("0.5"), "{e}");
    assert!(top.tail_at(5.0).is_err());
}
