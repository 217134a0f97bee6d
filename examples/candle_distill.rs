//! Distils a fixed random "teacher" into a tiny candle student with the fused loss:
//! `cargo run --release --features candle --example candle_distill`.
//!
//! The student maps features `x: [batch, d]` to logits `x W: [batch, vocab]` and hidden states
//! `x P: [batch, hidden]`; the teacher does the same with its own fixed weights. The objective is
//! the fused soft/hard loss on the logits (forward KL at T = 2, labels from the teacher's argmax) plus
//! the hidden-state MSE, minimised by plain SGD through candle's autograd.

use candle_core::{DType, Device, Tensor, Var, D};
use distill_kernels::candle::{distill_loss, hidden_mse};
use distill_kernels::{LossConfig, LossKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (batch, d, vocab, hidden) = (64, 16, 512, 8);
    let steps = 300;
    let lr = 2.0;

    let teacher_w = (Tensor::randn(0f32, 1.0, (d, vocab), &dev)? * 2.0)?;
    let teacher_p = Tensor::randn(0f32, 1.0, (d, hidden), &dev)?;
    let w = Var::zeros((d, vocab), DType::F32, &dev)?;
    let p = Var::zeros((d, hidden), DType::F32, &dev)?;

    let cfg = LossConfig::builder()
        .kind(LossKind::ForwardKl)
        .temperature(2.0)
        .alpha(0.8)
        .hidden_weight(0.1)
        .build()?;

    // Progress is judged on held-out inputs by the soft loss alone (the hard-label term has a
    // floor above 0: the teacher's labels are not what its softened distribution says).
    let soft_only = cfg.to_builder().alpha(1.0).hidden_weight(0.0).build()?;
    let x_eval = Tensor::randn(0f32, 1.0, (256, d), &dev)?;
    let t_eval = x_eval.matmul(&teacher_w)?;
    let eval = |w: &Var| -> candle_core::Result<f32> {
        distill_loss(&x_eval.matmul(w.as_tensor())?, &t_eval, None, &soft_only)?.to_scalar::<f32>()
    };
    let before = eval(&w)?;

    for step in 0..steps {
        let x = Tensor::randn(0f32, 1.0, (batch, d), &dev)?;
        let t_logits = x.matmul(&teacher_w)?;
        let t_hidden = x.matmul(&teacher_p)?;
        let labels = t_logits.argmax(D::Minus1)?.to_dtype(DType::I64)?;

        let s_logits = x.matmul(w.as_tensor())?;
        let s_hidden = x.matmul(p.as_tensor())?;
        let loss = (distill_loss(&s_logits, &t_logits, Some(&labels), &cfg)?
            + hidden_mse(&s_hidden, &t_hidden, Some(&labels), &cfg)?)?;

        let grads = loss.backward()?;
        for v in [&w, &p] {
            let g = grads.get(v.as_tensor()).ok_or("a weight got no gradient")?;
            v.set(&v.as_tensor().sub(&g.affine(lr, 0.0)?)?)?;
        }
        if step % 20 == 0 || step == steps - 1 {
            let train = loss.to_scalar::<f32>()?;
            println!(
                "step {step:4}  training loss {train:.4}  held-out KL {:.4}",
                eval(&w)?
            );
        }
    }
    let after = eval(&w)?;
    println!("held-out KL to the teacher: {before:.4} -> {after:.4}");
    // A NaN loss fails too.
    let learned = after < 0.25 * before;
    if !learned {
        return Err(format!("the student did not learn: held-out KL {before} -> {after}").into());
    }
    Ok(())
}
