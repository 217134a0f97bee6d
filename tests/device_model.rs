//! The Llama model's forward and backward on the emulated device (the device executor running the
//! model's one definition of its passes) against the CPU executor, both measured against the same
//! passes in f64: the device must be as accurate as the f32 CPU path. Criterion per tensor:
//! `max |device - f64| <= 4 max |cpu_f32 - f64| + 1e-6 max |f64|`: the two f32 backends sum in
//! different orders (cuBLAS-style GEMMs, flash attention), so neither is bit-identical to the other,
//! but a wrong op, a transposition or a missed accumulation shows up as errors orders of
//! magnitude larger than the f32 rounding both share.
mod common;

use common::emulated;
use distill_kernels::cuda::DeviceSpan;
use distill_kernels::model::config::LlamaConfig;
use distill_kernels::model::exec_cuda::DeviceActivations;
use distill_kernels::model::llama::{Activations, HiddenPoint, Llama};
use half::bf16;

fn config(tied: bool, kv_heads: usize, head_dim: Option<usize>) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 37,
        hidden_size: 48,
        intermediate_size: 80,
        num_hidden_layers: 2,
        num_attention_heads: 6,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: 16,
        initializer_range: 0.3,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: tied,
        qkv_bias: false,
    }
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn check(what: &str, device: &[f32], cpu: &[f32], exact: &[f64]) {
    assert_eq!(device.len(), exact.len(), "{what}: lengths");
    let scale = exact.iter().map(|x| x.abs()).fold(0.0, f64::max);
    let (dev_err, cpu_err) = (max_abs_diff(device, exact), max_abs_diff(cpu, exact));
    assert!(
        dev_err <= 4.0 * cpu_err + 1e-6 * scale,
        "{what}: device error {dev_err:e}, cpu f32 error {cpu_err:e}, scale {scale:e}"
    );
}

/// A bf16 pass against the f64 one: the relative L2 error of the whole tensor. Each stored bf16
/// element carries a rounding error of up to 2^-9 relative (8 significant bits), about 20 stores
/// lie on a pass's longest path, and the attention amplifies a score's rounding by exp (these
/// models have initializer_range 0.3, so their attention is sharp). Observed: 0.8% to 2% on
/// logits and most gradients, 5.3% at most (layer 1's q/k projection gradients with one KV
/// head). The bound 0.15 leaves a margin of about 3 over that, while the errors of a wrong
/// composition (a statistic read in the wrong dtype, a missed term, a stale copy) are O(1).
fn check_bf16(what: &str, got: &[f32], exact: &[f64]) {
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for (&g, &e) in got.iter().zip(exact) {
        err += (g as f64 - e).powi(2);
        norm += e * e;
    }
    let rel = (err / norm.max(f64::MIN_POSITIVE)).sqrt();
    assert!(rel <= 0.15, "{what}: relative L2 error {rel:e}");
}

fn run_case(cfg: LlamaConfig, batch: usize, seq: usize) {
    let dev = emulated();
    let model = Llama::new(cfg.clone()).unwrap();
    let mut params: Vec<f32> = model.init_params(5);
    // Biases (Qwen2's) start at zero; give them values so that the forward uses them.
    for t in model.layout().tensors() {
        if t.name.ends_with(".bias") {
            let b = t.span.of_mut(&mut params);
            for (i, x) in b.iter_mut().enumerate() {
                *x = ((i * 29 % 17) as f32 - 8.0) / 20.0;
            }
        }
    }
    let p64: Vec<f64> = params.iter().map(|&x| x as f64).collect();
    let n = batch * seq;
    let v = cfg.vocab_size;
    let tokens: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % v) as u32).collect();
    // A loss gradient with respect to the logits (any fixed values exercise the backward).
    let dlogits: Vec<f32> = (0..n * v)
        .map(|i| (((i * 37) % 101) as f32 - 50.0) / 500.0)
        .collect();
    let dl64: Vec<f64> = dlogits.iter().map(|&x| x as f64).collect();
    // Hidden-state gradients (hidden-state distillation) at three points of the residual stream.
    let c = cfg.hidden_size;
    let points = [
        HiddenPoint::Embeddings,
        HiddenPoint::LayerOutput(0),
        HiddenPoint::Final,
    ];
    let dh: Vec<Vec<f32>> = (0..points.len())
        .map(|k| {
            (0..n * c)
                .map(|i| ((((i + 11 * k) * 53) % 97) as f32 - 48.0) / 300.0)
                .collect()
        })
        .collect();
    let dh64: Vec<Vec<f64>> = dh
        .iter()
        .map(|g| g.iter().map(|&x| x as f64).collect())
        .collect();
    let dh_cpu: Vec<(HiddenPoint, &[f32])> = points
        .iter()
        .copied()
        .zip(dh.iter().map(|g| &g[..]))
        .collect();
    let dh_cpu64: Vec<(HiddenPoint, &[f64])> = points
        .iter()
        .copied()
        .zip(dh64.iter().map(|g| &g[..]))
        .collect();

    // CPU, f32 and f64.
    let mut acts32 = Activations::<f32>::new(&model, batch, seq).unwrap();
    let logits32 = model
        .forward(&params, &tokens, &mut acts32)
        .unwrap()
        .to_vec();
    let mut grads32 = vec![0.0f32; params.len()];
    model
        .backward_with_hidden(&params, &mut acts32, Some(&dlogits), &dh_cpu, &mut grads32)
        .unwrap();
    let mut acts64 = Activations::<f64>::new(&model, batch, seq).unwrap();
    let logits64 = model.forward(&p64, &tokens, &mut acts64).unwrap().to_vec();
    let mut grads64 = vec![0.0f64; params.len()];
    model
        .backward_with_hidden(&p64, &mut acts64, Some(&dl64), &dh_cpu64, &mut grads64)
        .unwrap();

    // The device.
    let s = dev.stream();
    let d_params = s.clone_htod(&params).unwrap();
    let mut d_grads = s.alloc_zeros::<f32>(params.len()).unwrap();
    let d_dlogits = s.clone_htod(&dlogits).unwrap();
    let mut acts = DeviceActivations::new(dev, &model, batch, seq).unwrap();
    acts.forward(dev, &model, &d_params, &tokens).unwrap();
    let logits = s.clone_dtoh(&acts.logits()).unwrap();
    let states: Vec<Vec<f32>> = points
        .iter()
        .map(|&p| s.clone_dtoh(&acts.hidden(p).unwrap()).unwrap())
        .collect();
    let d_dh: Vec<_> = dh.iter().map(|g| s.clone_htod(g).unwrap()).collect();
    let dh_dev: Vec<(HiddenPoint, DeviceSpan<f32>)> = points
        .iter()
        .copied()
        .zip(d_dh.iter().map(DeviceSpan::over))
        .collect();
    acts.backward(dev, &model, &d_params, &d_dlogits, &dh_dev, &mut d_grads)
        .unwrap();
    let grads = s.clone_dtoh(&d_grads).unwrap();

    // The same pass with bf16 weights, activations and their gradients (f32 parameter
    // gradients), from the same values.
    let to16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let up16 = |v: &[f32]| s.clone_htod(&to16(v)).unwrap();
    let down16 = |v: &cudarc::driver::CudaView<bf16>| -> Vec<f32> {
        s.clone_dtoh(v)
            .unwrap()
            .into_iter()
            .map(f32::from)
            .collect()
    };
    let p16 = up16(&params);
    let mut g16 = s.alloc_zeros::<f32>(params.len()).unwrap();
    let mut acts16 = DeviceActivations::<bf16>::new(dev, &model, batch, seq).unwrap();
    acts16.forward(dev, &model, &p16, &tokens).unwrap();
    let logits16 = down16(&acts16.logits());
    let d_dh16: Vec<_> = dh.iter().map(|g| up16(g)).collect();
    let dh16: Vec<(HiddenPoint, DeviceSpan<bf16>)> = points
        .iter()
        .copied()
        .zip(d_dh16.iter().map(DeviceSpan::over))
        .collect();
    acts16
        .backward(dev, &model, &p16, &up16(&dlogits), &dh16, &mut g16)
        .unwrap();
    let grads16 = s.clone_dtoh(&g16).unwrap();

    let what = format!(
        "kv {} tied {}",
        cfg.num_key_value_heads, cfg.tie_word_embeddings
    );
    check_bf16(&format!("{what} bf16 logits"), &logits16, &logits64);
    for t in model.layout().tensors() {
        let r = t.span.range();
        check_bf16(
            &format!("{what} bf16 grad {}", t.name),
            &grads16[r.clone()],
            &grads64[r],
        );
    }
    check(&format!("{what} logits"), &logits, &logits32, &logits64);
    for (k, &p) in points.iter().enumerate() {
        check(
            &format!("{what} hidden state {p:?}"),
            &states[k],
            acts32.hidden(p).unwrap(),
            acts64.hidden(p).unwrap(),
        );
    }
    for t in model.layout().tensors() {
        let r = t.span.range();
        check(
            &format!("{what} grad {}", t.name),
            &grads[r.clone()],
            &grads32[r.clone()],
            &grads64[r],
        );
    }
}

#[test]
fn forward_and_backward_match_the_cpu_with_grouped_query_heads() {
    run_case(config(false, 2, None), 2, 7);
}

#[test]
fn forward_and_backward_match_the_cpu_one_kv_head_tied_odd_head_dim() {
    run_case(config(true, 1, Some(10)), 3, 5);
}

#[test]
fn forward_and_backward_match_the_cpu_with_qkv_biases() {
    let cfg = LlamaConfig {
        qkv_bias: true,
        ..config(false, 2, None)
    };
    run_case(cfg, 2, 6);
}

#[test]
fn one_token_sequences() {
    run_case(config(false, 6, None), 2, 1);
}

#[test]
fn a_pass_on_mismatched_buffers_is_an_error() {
    let dev = emulated();
    let model = Llama::new(config(false, 2, None)).unwrap();
    let other = Llama::new(config(false, 3, None)).unwrap();
    let mut acts = DeviceActivations::new(dev, &model, 1, 4).unwrap();
    let s = dev.stream();
    let short = s.alloc_zeros::<f32>(10).unwrap();
    let e = acts.forward(dev, &model, &short, &[0; 4]).unwrap_err();
    assert!(e.to_string().contains("params"), "{e}");
    let params = s.clone_htod(&model.init_params::<f32>(1)).unwrap();
    let e = acts.forward(dev, &other, &params, &[0; 4]).unwrap_err();
    assert!(e.to_string().contains("another model"), "{e}");
    let e = acts
        .forward(dev, &model, &params, &[0, 1, 99, 2])
        .unwrap_err();
    assert!(e.to_string().contains("99"), "{e}");
    let dl = s.alloc_zeros::<f32>(4 * 37).unwrap();
    let mut g = s.alloc_zeros::<f32>(model.num_params()).unwrap();
    let e = acts
        .backward(dev, &model, &params, &dl, &[], &mut g)
        .unwrap_err();
    assert!(e.to_string().contains("forward"), "{e}");
    acts.forward(dev, &model, &params, &[0, 1, 2, 3]).unwrap();
    let wrong = s.alloc_zeros::<f32>(4 * 48 - 1).unwrap();
    let e = acts
        .backward(
            dev,
            &model,
            &params,
            &dl,
            &[(HiddenPoint::Final, DeviceSpan::over(&wrong))],
            &mut g,
        )
        .unwrap_err();
    assert!(e.to_string().contains("dhidden"), "{e}");
    let e = acts
        .backward(
            dev,
            &model,
            &params,
            &dl,
            &[(HiddenPoint::LayerOutput(2), DeviceSpan::over(&wrong))],
            &mut g,
        )
        .unwrap_err();
    assert!(e.to_string().contains("no such layer"), "{e}");
}

#[test]
fn inference_buffers_give_the_training_forward_bit_for_bit() {
    let dev = emulated();
    let model = Llama::new(config(false, 2, None)).unwrap();
    let (b, t) = (2, 5);
    let s = dev.stream();
    let params = s.clone_htod(&model.init_params::<f32>(2)).unwrap();
    let tokens: Vec<u32> = (0..b * t).map(|i| (i * 5 % 37) as u32).collect();
    let mut train = DeviceActivations::new(dev, &model, b, t).unwrap();
    let mut infer = DeviceActivations::inference(dev, &model, b, t).unwrap();
    train.forward(dev, &model, &params, &tokens).unwrap();
    infer.forward(dev, &model, &params, &tokens).unwrap();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(
        bits(s.clone_dtoh(&infer.logits()).unwrap()),
        bits(s.clone_dtoh(&train.logits()).unwrap()),
        "logits"
    );
    for p in [
        HiddenPoint::Embeddings,
        HiddenPoint::LayerOutput(0),
        HiddenPoint::Final,
    ] {
        assert_eq!(
            bits(s.clone_dtoh(&infer.hidden(p).unwrap()).unwrap()),
            bits(s.clone_dtoh(&train.hidden(p).unwrap()).unwrap()),
            "hidden state {p:?}"
        );
    }
    assert!(infer.bytes() < train.bytes());
    let dl = s.alloc_zeros::<f32>(b * t * 37).unwrap();
    let mut g = s.alloc_zeros::<f32>(model.num_params()).unwrap();
    let e = infer
        .backward(dev, &model, &params, &dl, &[], &mut g)
        .unwrap_err();
    assert!(e.to_string().contains("inference buffers"), "{e}");
}
