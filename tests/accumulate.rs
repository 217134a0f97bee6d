//! `LossConfig::accumulate`: every device adds the logit gradient into the buffer it is given
//! (dense and top-k losses, f32 and bf16 buffers), leaves ignored rows untouched, and two
//! teachers accumulated with weights give the weighted sum of their separate gradients.
mod common;

use common::*;
use distill_kernels::reference::{distill_loss_f64, distill_loss_topk_f64};
use distill_kernels::topk::TopKRows;
use distill_kernels::*;
use rand::{Rng, SeedableRng};

fn devices() -> Vec<&'static dyn DistillDevice> {
    let mut v = subjects();
    v.push(&distill_kernels::reference::Reference);
    v
}

fn cfg(kind: LossKind, weight: f32) -> LossConfig {
    LossConfig::builder()
        .kind(kind)
        .temperature(2.0)
        .alpha(0.6)
        .grad_scale(weight)
        .accumulate(true)
        .build()
        .unwrap()
}

/// A gradient buffer already holding values, in `dtype`.
fn held(len: usize, dtype: Dtype, seed: u64) -> HostVec {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..len).map(|_| rng.gen_range(-0.01f32..0.01)).collect();
    HostVec::from_f32(&v, dtype)
}

#[test]
fn the_gradient_is_added_and_ignored_rows_are_kept() {
    // 3 x 20,000 takes the device's split-row path (several blocks per row).
    for (rows, vocab) in [(4, 300), (3, 20_000)] {
        added_and_kept(rows, vocab);
    }
}

fn added_and_kept(rows: usize, vocab: usize) {
    let k = 16;
    let mut b = batch(rows, vocab, Dtype::Bf16, Dtype::F32, 2.0, 9);
    b.labels[2] = -100;
    let top = TopKRows::from_logits(b.teacher.as_slice(), rows, vocab, k).unwrap();
    for kind in [LossKind::ForwardKl, LossKind::ReverseKl] {
        let c = cfg(kind, 0.3);
        let dense = DistillInputs {
            rows,
            vocab,
            student: b.student.as_slice(),
            teacher: b.teacher.as_slice(),
            labels: Some(&b.labels),
            hidden: None,
        };
        let sparse = TopKInputs {
            rows,
            vocab,
            student: b.student.as_slice(),
            teacher: top.teacher(),
            labels: Some(&b.labels),
        };
        let want_dense = distill_loss_f64(&c, &dense).unwrap().grad_logits;
        let want_sparse = distill_loss_topk_f64(&c, &sparse).unwrap().grad_logits;
        for dev in devices() {
            for gd in [Dtype::F32, Dtype::Bf16] {
                for (name, want) in [("dense", &want_dense), ("top-k", &want_sparse)] {
                    let before = held(rows * vocab, gd, 3);
                    let mut g = before.clone();
                    match name {
                        "dense" => dev
                            .distill_loss(
                                &c,
                                &dense,
                                GradOutputs {
                                    logits: Some(g.as_mut_slice()),
                                    hidden: None,
                                },
                            )
                            .unwrap(),
                        _ => dev
                            .distill_loss_topk(&c, &sparse, Some(g.as_mut_slice()))
                            .unwrap(),
                    };
                    let (b0, g1) = (widen(&before), widen(&g));
                    let what = format!("{} {name} {kind:?} {gd}", dev.name());
                    // Ignored row 2: bit for bit what it held.
                    assert_eq!(
                        &g1[2 * vocab..3 * vocab],
                        &b0[2 * vocab..3 * vocab],
                        "{what}"
                    );
                    let expected: Vec<f64> = b0
                        .iter()
                        .zip(want.iter())
                        .map(|(&h, &w)| h as f64 + w)
                        .collect();
                    // One rounding of the sum in the buffer's dtype, plus f32 arithmetic.
                    let rtol = if gd == Dtype::Bf16 { 1.0 / 256.0 } else { 1e-6 };
                    assert_close(&what, &g1, &expected, rtol, 1e-6);
                }
            }
        }
    }
}

#[test]
fn two_teachers_accumulate_to_their_weighted_sum() {
    let (rows, vocab) = (3, 200);
    let a = batch(rows, vocab, Dtype::F32, Dtype::F32, 2.0, 1);
    let b = batch(rows, vocab, Dtype::F32, Dtype::F32, 2.0, 2);
    let teachers = [(&a.teacher, 0.7f32), (&b.teacher, 0.3f32)];
    for dev in devices() {
        let mut acc = vec![0.0f32; rows * vocab];
        let mut sum = vec![0.0f64; rows * vocab];
        for (i, (t, w)) in teachers.iter().enumerate() {
            let inputs = DistillInputs {
                rows,
                vocab,
                student: a.student.as_slice(),
                teacher: t.as_slice(),
                labels: Some(&a.labels),
                hidden: None,
            };
            let mut c = cfg(LossKind::ForwardKl, *w);
            c.accumulate = i > 0; // the first teacher overwrites whatever the buffer held
            dev.distill_loss(
                &c,
                &inputs,
                GradOutputs {
                    logits: Some(HostSliceMut::F32(&mut acc)),
                    hidden: None,
                },
            )
            .unwrap();
            let one = distill_loss_f64(&c, &inputs).unwrap().grad_logits;
            for (s, g) in sum.iter_mut().zip(one) {
                *s += g;
            }
        }
        assert_close(dev.name(), &acc, &sum, 1e-5, 1e-7);
    }
}

#[test]
fn accumulating_in_place_is_refused() {
    let b = batch(2, 50, Dtype::F32, Dtype::F32, 1.0, 4);
    let c = cfg(LossKind::ForwardKl, 1.0);
    let mut s = widen(&b.student);
    let e = cpu()
        .distill_loss_in_place(
            &c,
            HostSliceMut::F32(&mut s),
            &distill_kernels::cpu::InPlaceInputs {
                rows: 2,
                vocab: 50,
                teacher: b.teacher.as_slice(),
                labels: Some(&b.labels),
                hidden: None,
            },
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("in-place"), "{e}");
    assert_eq!(s, widen(&b.student), "the logits were touched");
    let stream = emulated().stream();
    let mut d_s = stream.clone_htod(&widen(&b.student)).unwrap();
    let d_t = stream.clone_htod(&widen(&b.teacher)).unwrap();
    let d_l = stream.clone_htod(&b.labels).unwrap();
    let e = emulated()
        .distill_loss_device(
            &c,
            distill_kernels::cuda::DeviceInputs {
                rows: 2,
                vocab: 50,
                student: distill_kernels::cuda::Student::InPlace(&mut d_s),
                teacher: &d_t,
                labels: Some(&d_l),
                hidden: None,
                strides: Default::default(),
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("in-place"), "{e}");
}
