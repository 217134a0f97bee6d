//! The device API for real trainers: strided logits (`logits[:, :-1]`-style views), int32
//! labels, and a caller-owned workspace with a call that neither allocates nor synchronizes.
mod common;

use common::*;
use cudarc::driver::CudaSlice;
use distill_kernels::cuda::{CudaKernels, DeviceInputs, LossWorkspace, RowStrides, Student};
use distill_kernels::*;

const ROWS: usize = 5;
const VOCAB: usize = 300;

fn upload<T: cudarc::driver::DeviceRepr>(dev: &CudaKernels, v: &[T]) -> CudaSlice<T> {
    dev.stream().clone_htod(v).unwrap()
}

fn cfg() -> LossConfig {
    LossConfig::builder()
        .kind(LossKind::ReverseKl)
        .temperature(1.5)
        .alpha(0.6)
        .build()
        .unwrap()
}

/// Loss and gradient of the contiguous call, the baseline every variant must reproduce.
fn contiguous(dev: &CudaKernels, s: &[f32], t: &[f32], labels: &[i64]) -> (LossValue, Vec<f32>) {
    let (s, t, l) = (upload(dev, s), upload(dev, t), upload(dev, labels));
    let mut g = dev.stream().alloc_zeros::<f32>(ROWS * VOCAB).unwrap();
    let v = dev
        .distill_loss_device(
            &cfg(),
            DeviceInputs {
                rows: ROWS,
                vocab: VOCAB,
                student: Student::Logits {
                    logits: &s,
                    grad: Some(&mut g),
                },
                teacher: &t,
                labels: Some(&l),
                hidden: None,
                strides: RowStrides::default(),
            },
        )
        .unwrap();
    (v, dev.stream().clone_dtoh(&g).unwrap())
}

fn inputs() -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let b = batch(ROWS, VOCAB, Dtype::F32, Dtype::F32, 3.0, 21);
    let mut labels = b.labels.clone();
    labels[1] = -100;
    (widen(&b.student), widen(&b.teacher), labels)
}

/// A strided row is the contiguous row's numbers summed in another order: the fused loss reads
/// 16-byte vectors from the first aligned element, so a row's 16-byte phase (which the strides
/// change) decides which elements each thread sums. The row statistics, and through them every
/// gradient element, may then differ by an ulp or two (f32 epsilon is 1.2e-7); anything a
/// wrong element or a read of the padding would do is orders of magnitude larger. For one
/// layout the bits are fixed (`same_layout_same_bits`).
fn same_up_to_order(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 4e-6 * b.abs() + 1e-7 * scale,
            "{what}: element {i} is {a}, contiguous {b}"
        );
    }
}

/// The same call on fresh buffers of the same layout gives the same bits (allocations are
/// 256-byte aligned, so the rows' 16-byte phases repeat).
#[test]
fn same_layout_same_bits() {
    let dev = emulated();
    let (s, t, labels) = inputs();
    let (a, ga) = contiguous(dev, &s, &t, &labels);
    let (b, gb) = contiguous(dev, &s, &t, &labels);
    assert_eq!(a.values, b.values);
    assert_eq!(ga, gb);
}

#[test]
fn strided_rows_match_contiguous_ones() {
    let dev = emulated();
    let (s, t, labels) = inputs();
    let (want, want_grad) = contiguous(dev, &s, &t, &labels);
    let (ss, ts, gs) = (VOCAB + 1, VOCAB + 37, VOCAB + 8);
    let s_dev = upload(dev, &padded(&s, VOCAB, ss));
    let t_dev = upload(dev, &padded(&t, VOCAB, ts));
    let l = upload(dev, &labels);
    let mut g = upload(dev, &vec![7.0f32; (ROWS - 1) * gs + VOCAB]);
    let got = dev
        .distill_loss_device(
            &cfg(),
            DeviceInputs {
                rows: ROWS,
                vocab: VOCAB,
                student: Student::Logits {
                    logits: &s_dev,
                    grad: Some(&mut g),
                },
                teacher: &t_dev,
                labels: Some(&l),
                hidden: None,
                strides: RowStrides {
                    student: Some(ss),
                    teacher: Some(ts),
                    grad: Some(gs),
                },
            },
        )
        .unwrap();
    same_up_to_order("loss of the strided call", &got.values, &want.values);
    let g = dev.stream().clone_dtoh(&g).unwrap();
    for r in 0..ROWS {
        same_up_to_order(
            &format!("gradient row {r}"),
            &g[r * gs..r * gs + VOCAB],
            &want_grad[r * VOCAB..(r + 1) * VOCAB],
        );
        if r + 1 < ROWS {
            assert!(
                g[r * gs + VOCAB..(r + 1) * gs].iter().all(|&x| x == 7.0),
                "the gradient's row padding must be left alone (row {r})"
            );
        }
    }

    // In place over a strided student: the same gradient, in the student's rows.
    let mut s_in = upload(dev, &padded(&s, VOCAB, ss));
    let got = dev
        .distill_loss_device(
            &cfg(),
            DeviceInputs {
                rows: ROWS,
                vocab: VOCAB,
                student: Student::InPlace(&mut s_in),
                teacher: &t_dev,
                labels: Some(&l),
                hidden: None,
                strides: RowStrides {
                    student: Some(ss),
                    teacher: Some(ts),
                    grad: None,
                },
            },
        )
        .unwrap();
    same_up_to_order("loss in place", &got.values, &want.values);
    let s_in = dev.stream().clone_dtoh(&s_in).unwrap();
    for r in 0..ROWS {
        same_up_to_order(
            &format!("in-place gradient row {r}"),
            &s_in[r * ss..r * ss + VOCAB],
            &want_grad[r * VOCAB..(r + 1) * VOCAB],
        );
    }
}

#[test]
fn bad_strides_are_errors() {
    let dev = emulated();
    let (s, t, labels) = inputs();
    let (s_dev, t_dev, l) = (upload(dev, &s), upload(dev, &t), upload(dev, &labels));
    let run = |strides: RowStrides, in_place: bool| {
        let mut s_copy = upload(dev, &s);
        let student = if in_place {
            Student::InPlace(&mut s_copy)
        } else {
            Student::Logits {
                logits: &s_dev,
                grad: None,
            }
        };
        dev.distill_loss_device(
            &cfg(),
            DeviceInputs {
                rows: ROWS,
                vocab: VOCAB,
                student,
                teacher: &t_dev,
                labels: Some(&l),
                hidden: None,
                strides,
            },
        )
        .unwrap_err()
    };
    let narrow = RowStrides {
        student: Some(VOCAB - 1),
        ..RowStrides::default()
    };
    assert!(matches!(
        run(narrow, false),
        Error::Stride {
            tensor: "student_logits",
            ..
        }
    ));
    // A stride whose last row would run past the buffer.
    let long = RowStrides {
        teacher: Some(VOCAB + 10),
        ..RowStrides::default()
    };
    let e = run(long, false);
    assert!(
        matches!(
            e,
            Error::ShapeMismatch {
                tensor: "teacher_logits",
                ..
            }
        ),
        "{e}"
    );
    let split = RowStrides {
        grad: Some(VOCAB + 1),
        ..RowStrides::default()
    };
    assert!(matches!(run(split, true), Error::Gradient(_)));
}

#[test]
fn int32_labels_match_int64_ones() {
    let dev = emulated();
    let (s, t, labels) = inputs();
    let (want, want_grad) = contiguous(dev, &s, &t, &labels);
    let (s_dev, t_dev) = (upload(dev, &s), upload(dev, &t));
    let l32: Vec<i32> = labels.iter().map(|&y| y as i32).collect();
    let l = upload(dev, &l32);
    let mut g = dev.stream().alloc_zeros::<f32>(ROWS * VOCAB).unwrap();
    let got = dev
        .distill_loss_device(
            &cfg(),
            DeviceInputs {
                rows: ROWS,
                vocab: VOCAB,
                student: Student::Logits {
                    logits: &s_dev,
                    grad: Some(&mut g),
                },
                teacher: &t_dev,
                labels: Some(&l.slice(..)),
                hidden: None,
                strides: RowStrides::default(),
            },
        )
        .unwrap();
    assert_eq!(got, want);
    assert_eq!(dev.stream().clone_dtoh(&g).unwrap(), want_grad);

    // An out-of-range int32 label is reported with its value; nothing is written.
    let mut bad = l32.clone();
    bad[3] = VOCAB as i32 + 5;
    let l = upload(dev, &bad);
    let mut s_in = upload(dev, &s);
    let e = dev
        .distill_loss_device(
            &cfg(),
            DeviceInputs {
                rows: ROWS,
                vocab: VOCAB,
                student: Student::InPlace(&mut s_in),
                teacher: &t_dev,
                labels: Some(&l),
                hidden: None,
                strides: RowStrides::default(),
            },
        )
        .unwrap_err();
    assert_eq!(
        e,
        Error::LabelOutOfRange {
            row: 3,
            label: VOCAB as i64 + 5,
            vocab: VOCAB,
            ignore_index: -100
        }
    );
    assert_eq!(dev.stream().clone_dtoh(&s_in).unwrap(), s);
}

#[test]
fn workspace_calls_leave_the_loss_on_the_device() {
    let dev = emulated();
    let (s, t, labels) = inputs();
    let (want, _) = contiguous(dev, &s, &t, &labels);
    let (s_dev, t_dev, l) = (upload(dev, &s), upload(dev, &t), upload(dev, &labels));
    let enqueue = |ws: &mut LossWorkspace, cfg: &LossConfig| {
        dev.distill_loss_enqueue(
            cfg,
            DeviceInputs {
                rows: ROWS,
                vocab: VOCAB,
                student: Student::Logits {
                    logits: &s_dev,
                    grad: None,
                },
                teacher: &t_dev,
                labels: Some(&l),
                hidden: None,
                strides: RowStrides::default(),
            },
            ws,
        )
    };
    let mut mean = dev.workspace(ROWS + 3).unwrap();
    let mut per_row = dev.workspace(ROWS).unwrap();
    assert!(mean.loss().is_none());
    assert!(dev.read_loss(&mean).is_err(), "nothing enqueued yet");
    enqueue(&mut mean, &cfg()).unwrap();
    let none = cfg()
        .to_builder()
        .reduction(Reduction::None)
        .build()
        .unwrap();
    enqueue(&mut per_row, &none).unwrap();
    // Both are on the device; reading is the one synchronization.
    let on_device = dev.stream().clone_dtoh(&mean.loss().unwrap()).unwrap();
    assert_eq!(on_device, want.values);
    assert_eq!(dev.read_loss(&mean).unwrap(), want);
    let rows = dev.read_loss(&per_row).unwrap();
    assert_eq!(rows.values.len(), ROWS);
    assert_eq!(
        dev.stream().clone_dtoh(&per_row.loss().unwrap()).unwrap(),
        rows.values
    );
    assert_eq!(rows.values[1], 0.0, "the ignored row");
    // A workspace too small for the call.
    let mut small = dev.workspace(ROWS - 1).unwrap();
    assert!(matches!(
        enqueue(&mut small, &cfg()).unwrap_err(),
        Error::InvalidOption {
            name: "workspace",
            ..
        }
    ));
    assert!(dev.workspace(0).is_err());
    // More than the device holds: its own error variant, with the driver's error as the source.
    let e = dev.workspace(1 << 42).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
    assert!(std::error::Error::source(&e).is_some());
}
