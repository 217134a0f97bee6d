//! The candle ops against the f64 reference: loss values, the gradient candle's backward pass
//! produces (with upstream scaling), finite differences, the hidden MSE, and bad input.

use candle_core::{DType, Device, Tensor, Var};
use distill_kernels::candle::{distill_loss, hidden_mse};
use distill_kernels::reference::Reference;
use distill_kernels::{
    DistillDevice, DistillInputs, GradOutputs, HiddenInputs, HostSlice, HostSliceMut, LossConfig,
    LossKind, Reduction,
};
use rand::{Rng, SeedableRng};

const ROWS: usize = 6;
const VOCAB: usize = 37;

fn randn(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

fn labels() -> Vec<i64> {
    vec![3, -100, 0, 36, 12, 5]
}

/// The reference loss and gradient (f64 inside, f32 out).
fn reference(cfg: &LossConfig, s: &[f32], t: &[f32], y: Option<&[i64]>) -> (Vec<f32>, Vec<f32>) {
    let mut grad = vec![0.0f32; s.len()];
    let loss = Reference
        .distill_loss(
            cfg,
            &DistillInputs {
                rows: ROWS,
                vocab: VOCAB,
                student: HostSlice::F32(s),
                teacher: HostSlice::F32(t),
                labels: y,
                hidden: None,
            },
            GradOutputs {
                logits: Some(HostSliceMut::F32(&mut grad)),
                hidden: None,
            },
        )
        .unwrap();
    (loss.values, grad)
}

fn configs() -> Vec<LossConfig> {
    let mut out = Vec::new();
    for kind in [
        LossKind::ForwardKl,
        LossKind::ReverseKl,
        LossKind::Jsd { beta: 0.3 },
    ] {
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            for alpha in [1.0, 0.4] {
                out.push(
                    LossConfig::builder()
                        .kind(kind)
                        .temperature(1.7)
                        .alpha(alpha)
                        .reduction(reduction)
                        .build()
                        .unwrap(),
                );
            }
        }
    }
    out
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs reference {y}"
        );
    }
}

#[test]
fn loss_and_backward_match_the_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let dev = Device::Cpu;
    let s = randn(&mut rng, ROWS * VOCAB, 3.0);
    let t = randn(&mut rng, ROWS * VOCAB, 3.0);
    let y = labels();
    for cfg in configs() {
        let student = Var::from_vec(s.clone(), (2, 3, VOCAB), &dev).unwrap();
        let teacher = Tensor::from_vec(t.clone(), (2, 3, VOCAB), &dev).unwrap();
        let lab = Tensor::from_vec(y.clone(), (2, 3), &dev).unwrap();
        let loss = distill_loss(student.as_tensor(), &teacher, Some(&lab), &cfg).unwrap();
        let (want, want_grad) = reference(&cfg, &s, &t, Some(&y));
        let what = format!("{cfg:?}");
        close(
            &loss.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &want,
            2e-5,
            &what,
        );
        match cfg.reduction {
            Reduction::None => assert_eq!(loss.dims(), &[2, 3]),
            _ => assert_eq!(loss.dims(), &[] as &[usize]),
        }

        // Upstream scaling: 2.5 * loss for the reduced kinds; a weight per row for `None`.
        let weights: Vec<f32> = (0..ROWS).map(|r| 0.5 + r as f32).collect();
        let objective = match cfg.reduction {
            Reduction::None => (loss * Tensor::from_vec(weights.clone(), (2, 3), &dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap(),
            _ => (loss * 2.5).unwrap(),
        };
        let grads = objective.backward().unwrap();
        let g = grads.get(student.as_tensor()).unwrap();
        assert_eq!(g.dims(), &[2, 3, VOCAB]);
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want_scaled: Vec<f32> = want_grad
            .iter()
            .enumerate()
            .map(|(i, &v)| match cfg.reduction {
                Reduction::None => v * weights[i / VOCAB],
                _ => v * 2.5,
            })
            .collect();
        close(&g, &want_scaled, 2e-5, &format!("grad {what}"));
        assert!(grads.get(&teacher).is_none(), "the teacher is a target");
    }
}

#[test]
fn gradient_matches_finite_differences() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let dev = Device::Cpu;
    let s = randn(&mut rng, ROWS * VOCAB, 2.0);
    let t = randn(&mut rng, ROWS * VOCAB, 2.0);
    let y = labels();
    let lab = Tensor::from_vec(y.clone(), ROWS, &dev).unwrap();
    let teacher = Tensor::from_vec(t, (ROWS, VOCAB), &dev).unwrap();
    let cfg = LossConfig::builder()
        .kind(LossKind::Jsd { beta: 0.5 })
        .temperature(2.0)
        .alpha(0.6)
        .build()
        .unwrap();
    let eval = |v: &[f32]| -> f64 {
        let st = Tensor::from_vec(v.to_vec(), (ROWS, VOCAB), &dev).unwrap();
        distill_loss(&st, &teacher, Some(&lab), &cfg)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let student = Var::from_vec(s.clone(), (ROWS, VOCAB), &dev).unwrap();
    let loss = distill_loss(student.as_tensor(), &teacher, Some(&lab), &cfg).unwrap();
    let g = loss.backward().unwrap();
    let g = g.get(student.as_tensor()).unwrap();
    let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eps = 1e-2f32;
    for i in [0, 5, VOCAB + 3, 2 * VOCAB + 36, 5 * VOCAB + 10] {
        let mut up = s.clone();
        up[i] += eps;
        let mut down = s.clone();
        down[i] -= eps;
        let fd = (eval(&up) - eval(&down)) / (2.0 * eps as f64);
        assert!(
            (fd - g[i] as f64).abs() < 2e-3,
            "d loss / d s[{i}]: finite differences {fd}, backward {}",
            g[i]
        );
    }
}

#[test]
fn half_precision_students_get_gradients_in_their_dtype() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let dev = Device::Cpu;
    let s = randn(&mut rng, ROWS * VOCAB, 2.0);
    let t = randn(&mut rng, ROWS * VOCAB, 2.0);
    for dtype in [DType::F16, DType::BF16] {
        let student = Var::from_tensor(
            &Tensor::from_vec(s.clone(), (ROWS, VOCAB), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let teacher = Tensor::from_vec(t.clone(), (ROWS, VOCAB), &dev).unwrap();
        let cfg = LossConfig::default();
        let loss = distill_loss(student.as_tensor(), &teacher, None, &cfg).unwrap();
        assert_eq!(loss.dtype(), DType::F32);
        let grads = loss.backward().unwrap();
        let g = grads.get(student.as_tensor()).unwrap();
        assert_eq!(g.dtype(), dtype);
        // Against the reference on the rounded student.
        let s_rounded = student
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (want, want_grad) = reference(&cfg, &s_rounded, &t, None);
        close(&[loss.to_scalar::<f32>().unwrap()], &want, 1e-4, "loss");
        let g = g.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        // One rounding of each gradient element to the student's dtype.
        close(&g.to_vec1::<f32>().unwrap(), &want_grad, 1e-2, "grad");
    }
}

#[test]
fn hidden_mse_matches_the_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let dev = Device::Cpu;
    let h = 24;
    let hs = randn(&mut rng, ROWS * h, 1.0);
    let ht = randn(&mut rng, ROWS * h, 1.0);
    let y = labels();
    let cfg = LossConfig::builder().hidden_weight(0.7).build().unwrap();
    // The reference has no MSE-only entry: a vocabulary of 1 makes the logits term exactly 0
    // (labels only mask rows here, so every kept label becomes class 0).
    let zeros = vec![0.0f32; ROWS];
    let y1: Vec<i64> = y.iter().map(|&l| if l == -100 { l } else { 0 }).collect();
    let mut want_grad = vec![0.0f32; ROWS * h];
    let want = Reference
        .distill_loss(
            &cfg,
            &DistillInputs {
                rows: ROWS,
                vocab: 1,
                student: HostSlice::F32(&zeros),
                teacher: HostSlice::F32(&zeros),
                labels: Some(&y1),
                hidden: Some(HiddenInputs {
                    size: h,
                    student: HostSlice::F32(&hs),
                    teacher: HostSlice::F32(&ht),
                }),
            },
            GradOutputs {
                logits: None,
                hidden: Some(HostSliceMut::F32(&mut want_grad)),
            },
        )
        .unwrap();
    let student = Var::from_vec(hs, (ROWS, h), &dev).unwrap();
    let teacher = Tensor::from_vec(ht, (ROWS, h), &dev).unwrap();
    let lab = Tensor::from_vec(y, ROWS, &dev).unwrap();
    let loss = hidden_mse(student.as_tensor(), &teacher, Some(&lab), &cfg).unwrap();
    close(
        &[loss.to_scalar::<f32>().unwrap()],
        &want.values,
        1e-5,
        "mse",
    );
    let grads = loss.backward().unwrap();
    let g = grads.get(student.as_tensor()).unwrap();
    close(
        &g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &want_grad,
        1e-5,
        "mse grad",
    );
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dev = Device::Cpu;
    let s = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
    let t3 = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    let cfg = LossConfig::default();
    let e = distill_loss(&s, &t3, None, &cfg).unwrap_err().to_string();
    assert!(e.contains("same shape"), "{e}");

    let ints = Tensor::zeros((2, 5), DType::U32, &dev).unwrap();
    let e = distill_loss(&ints, &ints, None, &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("f32, f16 or bf16"), "{e}");

    let bad_labels = Tensor::new(&[1i64, 9], &dev).unwrap();
    let hard = LossConfig::builder().alpha(0.5).build().unwrap();
    let e = distill_loss(&s, &s, Some(&bad_labels), &hard)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 9 at row 1"), "{e}");

    let e = distill_loss(&s, &s, None, &hard).unwrap_err().to_string();
    assert!(e.contains("no labels"), "{e}");

    let mut scaled = LossConfig::default();
    scaled.grad_scale = 2.0;
    let e = distill_loss(&s, &s, None, &scaled).unwrap_err().to_string();
    assert!(e.contains("grad_scale"), "{e}");

    let wrong_rows = Tensor::new(&[1i64, 2, 3], &dev).unwrap();
    let e = distill_loss(&s, &s, Some(&wrong_rows), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("leading shape"), "{e}");
}
