//! Criterion microbenchmarks of the fused distillation loss (forward + backward, alpha = 0.5 with
//! labels: the whole pass a trainer runs) on every device present. The emulated device measures
//! the emulator, not a GPU: its numbers only compare emulator versions. A real GPU is benchmarked
//! when one is present; otherwise a one-line notice.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use distill_kernels::*;

fn inputs(rows: usize, vocab: usize) -> (HostVec, HostVec, Vec<i64>) {
    // Deterministic, cheap, not constant: a hashed index mapped to [-4, 4).
    let val = |i: usize, salt: u64| {
        let h = (i as u64 ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ((h >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
    };
    let s: Vec<f32> = (0..rows * vocab).map(|i| val(i, 1)).collect();
    let t: Vec<f32> = (0..rows * vocab).map(|i| val(i, 2)).collect();
    let labels = (0..rows).map(|r| ((r * 7919) % vocab) as i64).collect();
    (
        HostVec::from_f32(&s, Dtype::Bf16),
        HostVec::from_f32(&t, Dtype::Bf16),
        labels,
    )
}

fn bench_device(c: &mut Criterion, dev: &dyn DistillDevice, shapes: &[(usize, usize)]) {
    let mut group = c.benchmark_group(format!("kd_fwd_bwd/{}", dev.name()));
    group.sample_size(10);
    for &(rows, vocab) in shapes {
        let (s, t, labels) = inputs(rows, vocab);
        let mut grad = vec![0.0f32; rows * vocab];
        for kind in [
            LossKind::ForwardKl,
            LossKind::ReverseKl,
            LossKind::Jsd { beta: 0.5 },
        ] {
            let cfg = LossConfig::builder()
                .kind(kind)
                .alpha(0.5)
                .temperature(2.0)
                .build()
                .unwrap();
            group.throughput(Throughput::Elements((rows * vocab) as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("{kind:?}"), format!("{rows}x{vocab}/bf16")),
                &(),
                |b, _| {
                    b.iter(|| {
                        dev.distill_loss(
                            &cfg,
                            &DistillInputs {
                                rows,
                                vocab,
                                student: s.as_slice(),
                                teacher: t.as_slice(),
                                labels: Some(&labels),
                                hidden: None,
                            },
                            GradOutputs {
                                logits: Some(HostSliceMut::F32(&mut grad)),
                                hidden: None,
                            },
                        )
                        .unwrap()
                    })
                },
            );
        }
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_device(c, &cpu::Cpu::new(), &[(256, 32_000), (256, 128_256)]);
    match cuda::CudaKernels::new(0) {
        Ok(dev) => bench_device(c, &dev, &[(256, 32_000), (4096, 128_256)]),
        Err(e) => eprintln!("no CUDA GPU benchmarked: {e}"),
    }
}

criterion_group!(kernels, benches);
criterion_main!(kernels);
