//! The README's CPU example, as a downstream crate would write it.
use distill_kernels::cpu::Cpu;
use distill_kernels::{
    DistillDevice, DistillInputs, GradOutputs, HostSliceMut, LossConfig, LossKind, Reduction,
};

fn main() -> Result<(), distill_kernels::Error> {
    let (rows, vocab) = (2, 4);
    let student = [0.1f32, 0.2, 0.3, 0.4, 1.0, 0.0, -1.0, 0.5];
    let teacher = [distill_kernels::half::bf16::from_f32(0.3); 8];
    let labels = [3i64, -100];
    let cfg = LossConfig::builder()
        .kind(LossKind::ReverseKl)
        .temperature(2.0)
        .alpha(0.5)
        .reduction(Reduction::Mean)
        .build()?;
    let mut grad = vec![0.0f32; rows * vocab];
    let inputs = DistillInputs {
        rows,
        vocab,
        student: student[..].into(),
        teacher: teacher[..].into(),
        labels: Some(&labels),
        hidden: None,
    };
    let grads = GradOutputs {
        logits: Some(HostSliceMut::F32(&mut grad)),
        hidden: None,
    };
    let loss = Cpu::new().distill_loss(&cfg, &inputs, grads)?;
    assert!(loss.values[0].is_finite());
    // Without the cuda feature the GPU devices say so instead of failing to link.
    let err = distill_kernels::open(distill_kernels::DeviceKind::Cuda).err();
    println!("loss {} ({})", loss.values[0], err.map(|e| e.to_string()).unwrap_or_default());
    Ok(())
}
