//! The device-buffer API trainers use (buffers on the caller's stream, gradient in place), the
//! device-side label check, the emulator's misuse reports, and the build's ptxas report.
mod common;

use common::*;
use cudarc::driver::CudaSlice;
use distill_kernels::cuda::{CudaKernels, DeviceInputs, Student};
use distill_kernels::reference::distill_loss_f64;
use distill_kernels::*;
use half::{bf16, f16};

fn upload<T: cudarc::driver::DeviceRepr>(dev: &CudaKernels, v: &[T]) -> CudaSlice<T> {
    dev.stream().clone_htod(v).unwrap()
}

/// The gradient written over the student logits, in each student dtype, equals the reference
/// up to the rounding of the stored dtype.
#[test]
fn in_place_gradient_every_dtype() {
    let dev = emulated();
    let (rows, vocab) = (7, 1000);
    for kind in [
        LossKind::ForwardKl,
        LossKind::ReverseKl,
        LossKind::Jsd { beta: 0.4 },
    ] {
        for sd in Dtype::ALL {
            let b = batch(rows, vocab, sd, Dtype::Bf16, 4.0, 11);
            let mut labels = b.labels.clone();
            labels[2] = -100;
            let cfg = LossConfig::builder()
                .kind(kind)
                .alpha(0.5)
                .temperature(2.0)
                .build()
                .unwrap();
            let reference = distill_loss_f64(
                &cfg,
                &DistillInputs {
                    rows,
                    vocab,
                    student: b.student.as_slice(),
                    teacher: b.teacher.as_slice(),
                    labels: Some(&labels),
                    hidden: None,
                },
            )
            .unwrap();
            let HostVec::Bf16(t) = &b.teacher else {
                unreachable!()
            };
            let teacher = upload(dev, t);
            let l = upload(dev, &labels);
            let (value, got): (LossValue, Vec<f32>) = match &b.student {
                HostVec::F32(s) => {
                    let mut s = upload(dev, s);
                    let v = run_in_place(dev, &cfg, rows, vocab, &mut s, &teacher, &l);
                    (v, dev.stream().clone_dtoh(&s).unwrap())
                }
                HostVec::F16(s) => {
                    let mut s = upload(dev, s);
                    let v = run_in_place(dev, &cfg, rows, vocab, &mut s, &teacher, &l);
                    (
                        v,
                        dev.stream()
                            .clone_dtoh(&s)
                            .unwrap()
                            .iter()
                            .map(|x: &f16| x.to_f32())
                            .collect(),
                    )
                }
                HostVec::Bf16(s) => {
                    let mut s = upload(dev, s);
                    let v = run_in_place(dev, &cfg, rows, vocab, &mut s, &teacher, &l);
                    (
                        v,
                        dev.stream()
                            .clone_dtoh(&s)
                            .unwrap()
                            .iter()
                            .map(|x: &bf16| x.to_f32())
                            .collect(),
                    )
                }
            };
            assert_close("loss", &value.values, &reference.loss, 1e-4, 1e-5 * 4.0);
            // Stored-dtype rounding: half an ulp relative (2^-11 f16, 2^-8 bf16), plus the
            // f32 arithmetic error of the kernels (see tests/kernels.rs).
            let rtol = match sd {
                Dtype::F32 => 1e-4,
                Dtype::F16 => 2f64.powi(-11) * 1.01,
                Dtype::Bf16 => 2f64.powi(-8) * 1.01,
            };
            let unit = (cfg.soft_weight() / cfg.temperature + cfg.hard_weight()) as f64
                / value.valid_rows as f64;
            assert_close(
                &format!("{kind:?} {sd} in-place grad"),
                &got,
                &reference.grad_logits,
                rtol,
                1e-5 * unit,
            );
        }
    }
}

fn run_in_place<S: Element>(
    dev: &CudaKernels,
    cfg: &LossConfig,
    rows: usize,
    vocab: usize,
    student: &mut CudaSlice<S>,
    teacher: &CudaSlice<bf16>,
    labels: &CudaSlice<i64>,
) -> LossValue {
    dev.distill_loss_device(
        cfg,
        DeviceInputs {
            strides: Default::default(),
            rows,
            vocab,
            student: Student::InPlace(student),
            teacher,
            labels: Some(labels),
            hidden: None,
        },
    )
    .unwrap()
}

/// A label outside [0, V) reaching the device is reported with its row and value, and nothing
/// is written: the in-place logits survive the failed call.
#[test]
fn device_label_check_loses_nothing() {
    let dev = emulated();
    let (rows, vocab) = (4, 50);
    let b = batch(rows, vocab, Dtype::F32, Dtype::F32, 2.0, 3);
    let HostVec::F32(s_host) = &b.student else {
        unreachable!()
    };
    let HostVec::F32(t_host) = &b.teacher else {
        unreachable!()
    };
    let mut s = upload(dev, s_host);
    let t = upload(dev, t_host);
    let labels = upload(dev, &[1i64, -100, 50, 3][..]);
    let err = dev
        .distill_loss_device(
            &LossConfig::builder().alpha(0.5).build().unwrap(),
            DeviceInputs {
                strides: Default::default(),
                rows,
                vocab,
                student: Student::InPlace(&mut s),
                teacher: &t,
                labels: Some(&labels),
                hidden: None,
            },
        )
        .unwrap_err();
    assert_eq!(
        err,
        Error::LabelOutOfRange {
            row: 2,
            label: 50,
            vocab,
            ignore_index: -100
        }
    );
    assert_eq!(
        &dev.stream().clone_dtoh(&s).unwrap(),
        s_host,
        "in-place logits were modified"
    );
}

/// Shapes and dtypes are checked before anything is launched.
#[test]
fn device_api_rejects_bad_shapes() {
    let dev = emulated();
    let s = upload(dev, &[0.0f32; 12][..]);
    let short = upload(dev, &[0.0f32; 10][..]);
    let t = upload(dev, &[0.0f32; 12][..]);
    let run = |t: &CudaSlice<f32>, g: &mut dyn distill_kernels::cuda::DeviceTensorMut| {
        dev.distill_loss_device(
            &LossConfig::default(),
            DeviceInputs {
                strides: Default::default(),
                rows: 3,
                vocab: 4,
                student: Student::Logits {
                    logits: &s,
                    grad: Some(g),
                },
                teacher: t,
                labels: None,
                hidden: None,
            },
        )
    };
    let mut g32 = dev.stream().alloc_zeros::<f32>(12).unwrap();
    let mut g16 = dev.stream().alloc_zeros::<bf16>(12).unwrap();
    let mut g_short = dev.stream().alloc_zeros::<f32>(11).unwrap();
    assert!(matches!(
        run(&short, &mut g32),
        Err(Error::ShapeMismatch {
            tensor: "teacher_logits",
            ..
        })
    ));
    assert!(matches!(
        run(&t, &mut g_short),
        Err(Error::ShapeMismatch {
            tensor: "grad_student_logits",
            ..
        })
    ));
    assert!(
        matches!(run(&t, &mut g16), Err(Error::Gradient(_))),
        "bf16 gradient for f32 logits"
    );
    assert!(run(&t, &mut g32).is_ok());
}

fn launch_selftest(dev: &CudaKernels, name: &str, threads: u32) -> Result<Vec<f32>> {
    selftest::launch(dev, name, 1, threads, selftest::Output::Zeroed)
}

/// A thread that never reaches the barrier is reported as barrier divergence naming the kernel,
/// a partial-warp shuffle likewise, and the device keeps working afterwards.
#[test]
fn emulator_reports_divergence_and_recovers() {
    // A private device: this test's failed launches must not disturb the shared one.
    let dev = CudaKernels::emulated().unwrap();
    let e = launch_selftest(&dev, "dk_selftest_divergence", 64).unwrap_err();
    let msg = distill_kernels::cuda::emulator_last_error().unwrap_or_default();
    assert!(
        msg.contains("divergence") && msg.contains("dk_selftest_divergence"),
        "{e}: {msg}"
    );
    let e = launch_selftest(&dev, "dk_selftest_partial_shuffle", 32).unwrap_err();
    let msg = distill_kernels::cuda::emulator_last_error().unwrap_or_default();
    assert!(msg.contains("dk_selftest_partial_shuffle"), "{e}: {msg}");
    let ok =
        launch_selftest(&dev, "dk_selftest_ok", 96).expect("a correct kernel runs after failures");
    assert!(ok.iter().all(|&v| v == 96.0), "{ok:?}");
}

/// Thread-block clusters on the emulated device: cuLaunchKernelEx's cluster dimension, co-resident
/// blocks that meet at cluster.sync() and read each other's shared memory through
/// map_shared_rank, and the errors of a broken cluster kernel (on every schedule: CI runs this
/// under three seeds).
#[test]
fn emulator_runs_thread_block_clusters() {
    use selftest::{launch_in_clusters, Output};
    let dev = CudaKernels::emulated().unwrap();
    // (48 threads: every block of the cluster ends in a partial warp of its own.)
    for (cluster, clusters, threads) in [
        (1u32, 3u32, 64u32),
        (2, 2, 48),
        (2, 2, 96),
        (4, 1, 32),
        (8, 2, 128),
    ] {
        let out = launch_in_clusters(
            &dev,
            "dk_selftest_cluster_ok",
            cluster * clusters,
            threads,
            cluster,
            Output::Zeroed,
        )
        .unwrap();
        // Rank 0 of every cluster adds its sums.
        let n = cluster as f32;
        for (t, &v) in out.iter().enumerate() {
            let want = clusters as f32 * (500.0 * n * (n - 1.0) + n * t as f32);
            assert_eq!(v, want, "cluster {cluster}, thread {t}");
        }
    }
    let error = |name: &str, grid: u32, cluster: u32| {
        let e = launch_in_clusters(&dev, name, grid, 64, cluster, Output::Zeroed).unwrap_err();
        let msg = distill_kernels::cuda::emulator_last_error().unwrap_or_default();
        format!("{e}: {msg}")
    };
    let e = error("dk_selftest_cluster_ok", 6, 4);
    assert!(
        e.contains("CLUSTER_SIZE") && e.contains("cluster dimension (4,1,1)"),
        "{e}"
    );
    let e = error("dk_selftest_cluster_ok", 16, 16);
    assert!(e.contains("1 to 8 blocks"), "{e}");
    let e = error("dk_selftest_cluster_divergence", 2, 2);
    assert!(
        e.contains("barrier divergence") && e.contains("wait at cluster.sync()"),
        "{e}"
    );
    // (Mapping the memory of an exited block is tested in tests/sanitizers.rs, on the default
    // schedule only: under a seeded one, block 0 may run to its read before block 1 exits.)
    let ok = launch_selftest(&dev, "dk_selftest_ok", 64).expect("the device works after failures");
    assert!(ok.iter().all(|&v| v == 64.0), "{ok:?}");
}

/// Asynchronous copies (cp.async, kernels/common.cuh's dk_cp_async16): a copy lands when a wait
/// retires its commit group, and a thread may not exit with copies pending.
#[test]
fn emulator_runs_asynchronous_copies() {
    use selftest::{launch_in_clusters, Output};
    let dev = CudaKernels::emulated().unwrap();
    for threads in [8, 64, 256] {
        let out = launch_in_clusters(&dev, "dk_selftest_async_ok", 1, threads, 1, Output::Zeroed)
            .unwrap();
        for (t, &v) in out.iter().enumerate() {
            assert_eq!(v, t as f32 + 1.0, "{threads} threads, thread {t}");
        }
    }
    let e = launch_in_clusters(&dev, "dk_selftest_async_pending", 1, 64, 1, Output::Zeroed)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("exited with 1 asynchronous copies not waited for"),
        "{e}"
    );
    let ok = launch_selftest(&dev, "dk_selftest_ok", 64).expect("the device works after failures");
    assert!(ok.iter().all(|&v| v == 64.0), "{ok:?}");
}

/// With nvcc, the build records ptxas's numbers for every kernel, and none spills on the
/// architectures the kernels are tuned for. CI builds with DISTILL_REQUIRE_NVCC=1.
#[test]
fn ptxas_report_has_no_spills() {
    let report = distill_kernels::cuda::PTXAS_REPORT;
    if !distill_kernels::cuda::HAS_FATBIN {
        assert!(option_env!("DISTILL_REQUIRE_NVCC") != Some("1"));
        eprintln!("built without nvcc: no ptxas report to check");
        return;
    }
    let mut kernels = 0;
    for line in report.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 7, "{line}");
        if f[0] == "sm_80" || f[0] == "sm_90" {
            kernels += 1;
            assert_eq!((f[3], f[4]), ("0", "0"), "{} spills on {}", f[1], f[0]);
        }
    }
    // 103 loss, optimizer and model kernels, 9 row-on-chip loss kernels (a trap on sm_80), 10
    // top-k KD and the top-k id check, on two architectures.
    assert_eq!(kernels, 2 * 123, "{report}");
}

/// The opt-in AddressSanitizer build of the emulator catches an out-of-bounds read inside a
/// kernel (a deliberately broken one that only this check builds), and the in-bounds variant runs
/// clean under the sanitizer.
#[test]
fn address_sanitizer_catches_out_of_bounds_read() {
    let dir = std::env::temp_dir().join(format!("distill-asan-{}", std::process::id()));
    let out = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/kernels/emulator/tests/asan_check.sh"
        ))
        .arg(&dir)
        .output()
        .expect("bash runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "asan_check.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A trainer's own stream: the loss runs on it, and the result equals the default-stream one.
#[test]
fn runs_on_the_callers_stream() {
    let base = emulated();
    let stream = base.context().new_stream().unwrap();
    let dev = CudaKernels::on_stream(stream.clone()).unwrap();
    let b = batch(3, 100, Dtype::F32, Dtype::F32, 2.0, 9);
    let HostVec::F32(s) = &b.student else {
        unreachable!()
    };
    let HostVec::F32(t) = &b.teacher else {
        unreachable!()
    };
    let s_dev = stream.clone_htod(s).unwrap();
    let t_dev = stream.clone_htod(t).unwrap();
    let mut g = stream.alloc_zeros::<f32>(300).unwrap();
    let cfg = LossConfig::builder()
        .kind(LossKind::ReverseKl)
        .build()
        .unwrap();
    let on_stream = dev
        .distill_loss_device(
            &cfg,
            DeviceInputs {
                strides: Default::default(),
                rows: 3,
                vocab: 100,
                student: Student::Logits {
                    logits: &s_dev,
                    grad: Some(&mut g),
                },
                teacher: &t_dev,
                labels: None,
                hidden: None,
            },
        )
        .unwrap();
    let mut g_host = vec![0.0f32; 300];
    let default = base
        .distill_loss(
            &cfg,
            &DistillInputs {
                rows: 3,
                vocab: 100,
                student: b.student.as_slice(),
                teacher: b.teacher.as_slice(),
                labels: None,
                hidden: None,
            },
            GradOutputs {
                logits: Some(HostSliceMut::F32(&mut g_host)),
                hidden: None,
            },
        )
        .unwrap();
    assert_eq!(on_stream, default);
    assert_eq!(stream.clone_dtoh(&g).unwrap(), g_host);
}
