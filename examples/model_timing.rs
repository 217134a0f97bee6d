//! Where a training step's time goes: forward and backward of the demo's models, and the
//! attention and matmul ops alone at their shapes. `cargo run --release --example model_timing`
use std::time::Instant;

use distill_kernels::model::ops::{self, AttnShape};
use distill_kernels::model::{Activations, Llama};
use distill_kernels::train::config::preset;

fn time(label: &str, iters: usize, mut f: impl FnMut()) {
    f();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    println!(
        "{label:<40} {:8.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / iters as f64
    );
}

fn main() {
    let (b, t) = (16, 64);
    for size in ["tiny", "small"] {
        let m = Llama::new(preset(size, 512, t).unwrap()).unwrap();
        let p = m.init_params::<f32>(1);
        let toks: Vec<u32> = (0..(b * t) as u32).map(|i| i * 7 % 512).collect();
        let mut acts = Activations::new(&m, b, t).unwrap();
        let mut g = vec![0f32; m.num_params()];
        time(&format!("{size} forward"), 10, || {
            m.forward(&p, &toks, &mut acts).unwrap();
        });
        let dl = vec![1e-3f32; b * t * 512];
        time(&format!("{size} backward"), 10, || {
            m.backward(&p, &mut acts, &dl, &mut g).unwrap();
        });
        let c = m.config();
        let s = AttnShape {
            batch: b,
            seq: t,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
        };
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let n = b * t;
        let q = vec![0.1f32; n * qd];
        let k = vec![0.2f32; n * kvd];
        let v = vec![0.3f32; n * kvd];
        let mut out = vec![0f32; n * qd];
        let mut att = vec![0f32; n * c.num_attention_heads * t];
        time(&format!("{size} attention_forward (1 layer)"), 20, || {
            ops::attention_forward(&mut out, &mut att, &q, &k, &v, s)
        });
        let (mut dq, mut dk, mut dv) =
            (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut dpre = vec![0f32; att.len()];
        time(&format!("{size} attention_backward (1 layer)"), 20, || {
            ops::attention_backward(
                &mut dq, &mut dk, &mut dv, &mut dpre, &out, &q, &k, &v, &att, s,
            )
        });
        let (ci, ii) = (c.hidden_size, c.intermediate_size);
        let x = vec![0.1f32; n * ci];
        let w = vec![0.01f32; ii * ci];
        let mut y = vec![0f32; n * ii];
        time(&format!("{size} matmul_forward {n}x{ci}->{ii}"), 20, || {
            ops::matmul_forward(&mut y, &x, &w, ci, ii)
        });
        let mut dx = vec![0f32; n * ci];
        let mut dw = vec![0f32; ii * ci];
        time(
            &format!("{size} matmul_backward {n}x{ci}->{ii}"),
            20,
            || ops::matmul_backward(&mut dx, &mut dw, &y, &x, &w, ci, ii),
        );
        let gate = vec![0.3f32; n * ii];
        time(&format!("{size} swiglu_forward {n}x{ii}"), 20, || {
            ops::swiglu_forward(&mut y, &gate, &gate)
        });
        let (cos, sin) = ops::rope_tables::<f32>(t, c.head_dim(), 10000.0);
        let mut qq = q.clone();
        time(&format!("{size} rope_forward q"), 20, || {
            ops::rope_forward(&mut qq, &cos, &sin, t, c.num_attention_heads, c.head_dim())
        });
        let mut rstd = vec![0f32; n];
        let wn = vec![1f32; ci];
        let mut xo = vec![0f32; n * ci];
        time(&format!("{size} rmsnorm_forward"), 20, || {
            ops::rmsnorm_forward(&mut xo, &mut rstd, &x, &wn, 1e-5)
        });
        let gflop = 2.0 * (n * ci * ii) as f64 / 1e9;
        println!("  ({gflop:.3} GFLOP per matmul forward)");
    }
}
