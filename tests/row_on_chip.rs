//! The row-on-chip loss (`RowSchedule::Cluster`: thread-block clusters of sm_90, on the emulated
//! device) against the two-pass kernels on the same inputs: every kind, each same-dtype triple,
//! in place, into a separate gradient, accumulated and loss only, cluster sizes 1 to 8 (not only
//! powers of two), rows whose 16-byte phase varies (odd strides), rows shorter than the cluster
//! has vector chunks, labels at either end, ignored rows.
//!
//! The two paths differ only in the order of the sums (the cluster merges its blocks' partial
//! statistics), so f32 outputs agree to a few ulps; a 16-bit output may round to the neighbouring
//! value. The two-pass kernels are checked against the f64 reference in tests/kernels.rs; the
//! losses here are checked against it too.
mod common;

use common::*;
use distill_kernels::cuda::{
    CudaKernels, DeviceInputs, DeviceVec, RowSchedule, RowStrides, Student,
};
use distill_kernels::reference::distill_loss_f64;
use distill_kernels::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    InPlace,
    Separate,
    Accumulate,
    LossOnly,
}

fn download(dev: &CudaKernels, v: &DeviceVec) -> Vec<f32> {
    let s = dev.stream();
    match v {
        DeviceVec::F32(x) => s.clone_dtoh(x).unwrap(),
        DeviceVec::F16(x) => s
            .clone_dtoh(x)
            .unwrap()
            .iter()
            .map(|h| h.to_f32())
            .collect(),
        DeviceVec::Bf16(x) => s
            .clone_dtoh(x)
            .unwrap()
            .iter()
            .map(|h| h.to_f32())
            .collect(),
    }
}

struct Case<'a> {
    cfg: &'a LossConfig,
    rows: usize,
    vocab: usize,
    stride: usize,
    dtype: Dtype,
    student: &'a [f32],
    teacher: &'a [f32],
    labels: &'a [i64],
    mode: Mode,
}

/// One call under `schedule`: the loss values and the gradient rows (f32), or the error.
fn run(dev: &CudaKernels, c: &Case, schedule: RowSchedule) -> Result<(Vec<f32>, Vec<f32>)> {
    dev.set_row_schedule(schedule);
    let up = |v: &[f32]| {
        let host = HostVec::from_f32(&padded(v, c.vocab, c.stride), c.dtype);
        DeviceVec::upload(dev.stream(), host.as_slice()).unwrap()
    };
    let mut s = up(c.student);
    let t = up(c.teacher);
    let held: Vec<f32> = (0..c.rows * c.vocab)
        .map(|i| (i % 7) as f32 * 1e-3)
        .collect();
    let mut g = up(&held);
    let l = dev.stream().clone_htod(c.labels).unwrap();
    let strides = RowStrides {
        student: Some(c.stride),
        teacher: Some(c.stride),
        grad: (c.mode != Mode::InPlace).then_some(c.stride),
    };
    let student = match c.mode {
        Mode::InPlace => Student::InPlace(&mut s),
        Mode::Separate | Mode::Accumulate => Student::Logits {
            logits: &s,
            grad: Some(&mut g),
        },
        Mode::LossOnly => Student::Logits {
            logits: &s,
            grad: None,
        },
    };
    let value = dev.distill_loss_device(
        c.cfg,
        DeviceInputs {
            rows: c.rows,
            vocab: c.vocab,
            student,
            teacher: &t,
            labels: Some(&l),
            hidden: None,
            strides,
        },
    );
    dev.set_row_schedule(RowSchedule::Auto);
    let value = value?;
    let grad = match c.mode {
        Mode::InPlace => download(dev, &s),
        Mode::LossOnly => Vec::new(),
        _ => download(dev, &g),
    };
    let rows: Vec<f32> = grad
        .chunks(c.stride)
        .flat_map(|r| r[..c.vocab].to_vec())
        .collect();
    Ok((value.values, rows))
}

/// Same numbers up to summation order: a few f32 ulps, or one step of a 16-bit output.
fn agree(what: &str, got: &[f32], want: &[f32], dtype: Dtype) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let rel = match dtype {
        Dtype::F32 => 4e-6,
        Dtype::F16 => 1.0 / 1024.0,
        Dtype::Bf16 => 1.0 / 128.0,
    };
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let ok = a == b || (a - b).abs() <= rel * b.abs() + 1e-7 * scale + 6e-8;
        assert!(ok, "{what}: element {i} is {a}, two-pass {b}");
    }
}

#[test]
fn the_cluster_path_matches_the_two_pass_path() {
    let dev = CudaKernels::emulated().unwrap();
    let kinds = [
        LossKind::ForwardKl,
        LossKind::ReverseKl,
        LossKind::Jsd { beta: 0.3 },
        LossKind::Jsd { beta: 0.7 },
    ];
    let dtypes = [Dtype::F32, Dtype::F16, Dtype::Bf16];
    let modes = [
        Mode::InPlace,
        Mode::Separate,
        Mode::Accumulate,
        Mode::LossOnly,
    ];
    // (rows, vocab, blocks): a row shorter than one chunk per block, odd lengths, 3 and 5 blocks.
    let shapes = [
        (3, 7, 8),
        (2, 100, 3),
        (4, 1000, 2),
        (1, 4099, 5),
        (2, 2500, 1),
        (1, 9000, 8),
    ];
    let mut n = 0usize;
    for (ki, &kind) in kinds.iter().enumerate() {
        for &dtype in &dtypes {
            for &mode in &modes {
                let (rows, vocab, blocks) = shapes[n % shapes.len()];
                // Odd strides give the rows different 16-byte phases.
                let stride = vocab + [0, 1, 3, 5][n % 4];
                let b = batch(rows, vocab, dtype, dtype, 5.0, 40 + n as u64);
                let mut labels = b.labels.clone();
                labels[0] = [0, vocab as i64 - 1][n % 2];
                if rows > 2 {
                    labels[1] = -100;
                }
                let cfg = LossConfig::builder()
                    .kind(kind)
                    .alpha([0.0, 0.4, 1.0][(n + ki) % 3])
                    .temperature([1.0, 2.0, 0.7][n % 3])
                    .reduction([Reduction::None, Reduction::Mean, Reduction::Sum][n % 3])
                    .accumulate(mode == Mode::Accumulate)
                    .build()
                    .unwrap();
                n += 1;
                let (s, t) = (widen(&b.student), widen(&b.teacher));
                let case = Case {
                    cfg: &cfg,
                    rows,
                    vocab,
                    stride,
                    dtype,
                    student: &s,
                    teacher: &t,
                    labels: &labels,
                    mode,
                };
                let what = format!(
                    "{kind:?} {dtype} {mode:?} {rows}x{vocab} stride {stride} cluster {blocks}"
                );
                let (want_loss, want_grad) = run(&dev, &case, RowSchedule::Fused).unwrap();
                let (loss, grad) = run(&dev, &case, RowSchedule::Cluster(blocks))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(dev.last_row_layout(), Some(RowSchedule::Cluster(blocks)));
                agree(&format!("{what}: loss"), &loss, &want_loss, Dtype::F32);
                agree(&format!("{what}: gradient"), &grad, &want_grad, dtype);
                let inputs = DistillInputs {
                    rows,
                    vocab,
                    student: b.student.as_slice(),
                    teacher: b.teacher.as_slice(),
                    labels: Some(&labels),
                    hidden: None,
                };
                let reference = distill_loss_f64(&cfg, &inputs).unwrap();
                assert_close(
                    &format!("{what}: loss vs f64"),
                    &loss,
                    &reference.loss,
                    1e-4,
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn cluster_schedules_that_cannot_run_are_refused() {
    let dev = CudaKernels::emulated().unwrap();
    let cfg = LossConfig::builder().alpha(0.5).build().unwrap();
    let b = batch(2, 300, Dtype::F32, Dtype::F32, 3.0, 5);
    let (s, t) = (widen(&b.student), widen(&b.teacher));
    let case = |stride| Case {
        cfg: &cfg,
        rows: 2,
        vocab: 300,
        stride,
        dtype: Dtype::F32,
        student: &s,
        teacher: &t,
        labels: &b.labels,
        mode: Mode::Separate,
    };
    for blocks in [0, 9] {
        let e = run(&dev, &case(300), RowSchedule::Cluster(blocks)).unwrap_err();
        assert!(e.to_string().contains("1 to 8 blocks"), "{e}");
    }
    // Too long for 2 blocks of 227 KiB: 2 x 60,000 f32 per block.
    let long = batch(1, 120_000, Dtype::F32, Dtype::F32, 3.0, 6);
    let (ls, lt) = (widen(&long.student), widen(&long.teacher));
    let c = Case {
        rows: 1,
        vocab: 120_000,
        stride: 120_000,
        student: &ls,
        teacher: &lt,
        labels: &long.labels,
        ..case(300)
    };
    let e = run(&dev, &c, RowSchedule::Cluster(2)).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    // Mixed dtypes take the two-pass kernels only.
    let mixed = batch(2, 300, Dtype::F32, Dtype::Bf16, 3.0, 7);
    let s32 = dev.stream().clone_htod(&widen(&mixed.student)).unwrap();
    let t16 = DeviceVec::upload(dev.stream(), mixed.teacher.as_slice()).unwrap();
    let l = dev.stream().clone_htod(&mixed.labels).unwrap();
    dev.set_row_schedule(RowSchedule::Cluster(2));
    let e = dev
        .distill_loss_device(
            &cfg,
            DeviceInputs {
                rows: 2,
                vocab: 300,
                student: Student::Logits {
                    logits: &s32,
                    grad: None,
                },
                teacher: &t16,
                labels: Some(&l),
                hidden: None,
                strides: RowStrides::default(),
            },
        )
        .unwrap_err();
    dev.set_row_schedule(RowSchedule::Auto);
    assert!(e.to_string().contains("one dtype"), "{e}");
}

/// `RowSchedule::Auto` takes the row-on-chip kernels where they apply (same dtype, compute
/// capability 9.0, long rows, enough rows to fill the SMs): the same numbers as the two-pass path.
#[test]
fn auto_takes_the_cluster_path_for_long_same_dtype_rows() {
    let dev = CudaKernels::emulated().unwrap();
    let (rows, vocab) = (132, 16_384);
    let b = batch(rows, vocab, Dtype::Bf16, Dtype::Bf16, 5.0, 77);
    let cfg = LossConfig::builder()
        .kind(LossKind::ForwardKl)
        .alpha(0.5)
        .temperature(2.0)
        .build()
        .unwrap();
    let (s, t) = (widen(&b.student), widen(&b.teacher));
    let case = Case {
        cfg: &cfg,
        rows,
        vocab,
        stride: vocab,
        dtype: Dtype::Bf16,
        student: &s,
        teacher: &t,
        labels: &b.labels,
        mode: Mode::InPlace,
    };
    let (want_loss, want_grad) = run(&dev, &case, RowSchedule::Fused).unwrap();
    assert_eq!(dev.last_row_layout(), Some(RowSchedule::Fused));
    let (loss, grad) = run(&dev, &case, RowSchedule::Auto).unwrap();
    // bf16 pairs of 16,384 logits: one 512-thread block per row holds it (68 KiB).
    assert_eq!(dev.last_row_layout(), Some(RowSchedule::Cluster(1)));
    agree("auto: loss", &loss, &want_loss, Dtype::F32);
    agree("auto: gradient", &grad, &want_grad, Dtype::Bf16);
}
