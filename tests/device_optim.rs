//! The optimizer step on the emulated device (`kernels/optim.cu`): AdamW bit-identical to the CPU
//! optimizer, with and without clipping, and the gradient norm deterministic and equal to the
//! CPU's up to f64 rounding.
mod common;

use common::emulated;
use cudarc::driver::CudaSlice;
use distill_kernels::model::{Llama, LlamaConfig};
use distill_kernels::train::device_optim::{DeviceAdamW, GradClip};
use distill_kernels::train::optim::{clip_grad_norm, AdamW, DecayMask};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn normals(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Sums of uniforms: enough spread of exponents for the arithmetic to matter.
            let u: f32 = (0..4).map(|_| rng.gen::<f32>() - 0.5).sum();
            u * scale
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn upload(v: &[f32]) -> CudaSlice<f32> {
    emulated().stream().clone_htod(v).unwrap()
}

fn download(s: &CudaSlice<f32>) -> Vec<f32> {
    emulated().stream().clone_dtoh(s).unwrap()
}

/// A small Llama's decay mask: embedding and linear weights decay, norms do not.
fn llama_mask() -> DecayMask {
    let cfg = LlamaConfig {
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 16,
        ..LlamaConfig::default()
    };
    DecayMask::from_layout(Llama::new(cfg).unwrap().layout())
}

/// Five updates with a schedule of learning rates, with clipping that applies on some steps and
/// not on others: parameters and both moments agree with the CPU to the bit after every step.
#[test]
fn adamw_with_clipping_is_bit_identical_to_the_cpu() {
    let dev = emulated();
    let decay = llama_mask();
    let n = decay.len();
    assert!(
        decay.runs().count() > 3,
        "the mask has decaying and non-decaying runs"
    );
    let mut rng = StdRng::seed_from_u64(5);
    let mut cpu_params = normals(&mut rng, n, 0.1);
    let mut cpu = AdamW::new(n, 0.9, 0.95, 1e-8, 0.1);
    let mut gpu = DeviceAdamW::upload(dev, &cpu).unwrap();
    let mut gpu_params = upload(&cpu_params);
    let mut clip = GradClip::new(dev, n).unwrap();
    for (step, (lr, scale, max_norm)) in [
        (1e-3, 1.0, 1.0),  // norm ~ sqrt(n)/3 > 1: clipped
        (3e-3, 1e-3, 1.0), // small gradient: not clipped
        (2e-3, 10.0, 5.0),
        (1e-4, 1e-6, -1.0), // clipping off
        (5e-4, 3.0, f32::NAN),
    ]
    .into_iter()
    .enumerate()
    {
        let mut grads = normals(&mut rng, n, scale);
        let gpu_grads = upload(&grads);
        clip.enqueue(dev, &gpu_grads, max_norm).unwrap();
        let norm = clip_grad_norm(&mut grads, max_norm);
        cpu.update(&mut cpu_params, &grads, &decay, lr).unwrap();
        gpu.update(dev, &mut gpu_params, &gpu_grads, &decay, lr, Some(&clip))
            .unwrap();
        let gpu_norm = clip.norm(dev).unwrap();
        assert!(
            (gpu_norm - norm).abs() <= f32::EPSILON * norm,
            "step {step}: norm {gpu_norm} vs CPU {norm}"
        );
        let host = gpu.download(dev).unwrap();
        assert_eq!(host.step, cpu.step);
        assert!(
            bits(&host.m) == bits(&cpu.m),
            "step {step}: first moments differ"
        );
        assert!(
            bits(&host.v) == bits(&cpu.v),
            "step {step}: second moments differ"
        );
        assert!(
            bits(&download(&gpu_params)) == bits(&cpu_params),
            "step {step}: parameters differ"
        );
    }
}

/// Without a clip workspace the gradients are used as they are.
#[test]
fn adamw_without_clipping_is_bit_identical_to_the_cpu() {
    let dev = emulated();
    let n = 70_001; // several blocks of the grid-stride loop, a ragged end
    let decay = DecayMask::all(n);
    let mut rng = StdRng::seed_from_u64(9);
    let mut cpu_params = normals(&mut rng, n, 1.0);
    let mut cpu = AdamW::new(n, 0.8, 0.999, 1e-6, 0.01);
    cpu.m = normals(&mut rng, n, 0.01);
    cpu.v = normals(&mut rng, n, 0.01).iter().map(|x| x * x).collect();
    cpu.step = 41; // bias corrections of a later step
    let mut gpu = DeviceAdamW::upload(dev, &cpu).unwrap();
    let mut gpu_params = upload(&cpu_params);
    let grads = normals(&mut rng, n, 0.5);
    cpu.update(&mut cpu_params, &grads, &decay, 2e-3).unwrap();
    gpu.update(dev, &mut gpu_params, &upload(&grads), &decay, 2e-3, None)
        .unwrap();
    let host = gpu.download(dev).unwrap();
    assert!(bits(&host.m) == bits(&cpu.m));
    assert!(bits(&host.v) == bits(&cpu.v));
    assert!(bits(&download(&gpu_params)) == bits(&cpu_params));
}

/// The norm over many chunks (a ragged last one) equals the CPU's to f64 rounding and is the same
/// bits on every call.
#[test]
fn gradient_norm_is_deterministic_and_matches_the_cpu() {
    let dev = emulated();
    let n = 3 * 32768 + 1234;
    let mut rng = StdRng::seed_from_u64(3);
    let mut grads = normals(&mut rng, n, 2.0);
    let exact: f64 = grads
        .iter()
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt();
    let gpu_grads = upload(&grads);
    let mut clip = GradClip::new(dev, n).unwrap();
    clip.enqueue(dev, &gpu_grads, 1e30).unwrap();
    let first = clip.norm(dev).unwrap();
    for _ in 0..3 {
        clip.enqueue(dev, &gpu_grads, 1e30).unwrap();
        assert_eq!(clip.norm(dev).unwrap().to_bits(), first.to_bits());
    }
    assert!(
        ((first as f64) - exact).abs() <= 1e-6 * exact,
        "{first} vs {exact}"
    );
    assert_eq!(first, clip_grad_norm(&mut grads, 1e30));
    // The gradient on the device is not modified by the norm.
    assert!(bits(&download(&gpu_grads)) == bits(&grads));
}

/// A NaN or infinite gradient: the norm says so and the update writes nothing.
#[test]
fn a_non_finite_gradient_leaves_everything_untouched() {
    let dev = emulated();
    let n = 1000;
    let decay = DecayMask::all(n);
    let mut rng = StdRng::seed_from_u64(4);
    let params = normals(&mut rng, n, 1.0);
    let cpu = AdamW::new(n, 0.9, 0.999, 1e-8, 0.0);
    for bad in [f32::NAN, f32::INFINITY] {
        let mut grads = normals(&mut rng, n, 1.0);
        grads[517] = bad;
        let gpu_grads = upload(&grads);
        let mut gpu = DeviceAdamW::upload(dev, &cpu).unwrap();
        let mut gpu_params = upload(&params);
        let mut clip = GradClip::new(dev, n).unwrap();
        clip.enqueue(dev, &gpu_grads, 1.0).unwrap();
        gpu.update(dev, &mut gpu_params, &gpu_grads, &decay, 1e-3, Some(&clip))
            .unwrap();
        assert!(!clip.norm(dev).unwrap().is_finite());
        assert!(bits(&download(&gpu_params)) == bits(&params));
        let host = gpu.download(dev).unwrap();
        assert!(host.m.iter().chain(&host.v).all(|&x| x == 0.0));
    }
}

/// Bad arguments are errors naming what is wrong, before anything is launched.
#[test]
fn bad_arguments_are_refused() {
    let dev = emulated();
    let n = 64;
    let cpu = AdamW::new(n, 0.9, 0.999, 1e-8, 0.0);
    let mut gpu = DeviceAdamW::upload(dev, &cpu).unwrap();
    let mut params = upload(&vec![1.0; n]);
    let grads = upload(&vec![0.5; n + 1]);
    let e = gpu
        .update(dev, &mut params, &grads, &DecayMask::all(n), 1e-3, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("grads") && e.contains("65"), "{e}");
    let grads = upload(&vec![0.5; n]);
    let e = gpu
        .update(dev, &mut params, &grads, &DecayMask::all(n), f32::NAN, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr"), "{e}");
    let clip = GradClip::new(dev, n).unwrap();
    let e = gpu
        .update(
            dev,
            &mut params,
            &grads,
            &DecayMask::all(n),
            1e-3,
            Some(&clip),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("enqueued"), "{e}");
    assert!(clip.norm(dev).is_err());
    assert!(GradClip::new(dev, 0).is_err());
    assert_eq!(gpu.config.step, 0, "a refused update is not counted");
}
