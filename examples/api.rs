//! The README's API example, compiled (and run) by `cargo test` so it cannot rot.
use distill_kernels::{cpu::Cpu, DistillDevice};
use distill_kernels::{DistillInputs, GradOutputs, HostSliceMut, LossConfig, LossKind, Reduction};

fn main() -> distill_kernels::Result<()> {
    let (rows, vocab) = (2, 4);
    let student = [0.1f32, 0.2, 0.3, 0.4, 1.0, 0.0, -1.0, 0.5];
    let teacher = [half::bf16::from_f32(0.3); 8]; // teacher and student dtypes may differ
    let labels = [3i64, -100]; // -100: ignored row
    let cfg = LossConfig::builder()
        .kind(LossKind::ReverseKl)
        .temperature(2.0)
        .alpha(0.5)
        .reduction(Reduction::Mean)
        .build()
        .unwrap();
    let mut grad = vec![0.0f32; rows * vocab];
    let loss = Cpu::new().distill_loss(
        &cfg,
        &DistillInputs {
            rows,
            vocab,
            student: student[..].into(),
            teacher: teacher[..].into(),
            labels: Some(&labels),
            hidden: None,
        },
        GradOutputs {
            logits: Some(HostSliceMut::F32(&mut grad)),
            hidden: None,
        },
    )?;
    println!(
        "loss {} over {} valid rows",
        loss.values[0], loss.valid_rows
    );
    Ok(())
}
