//! Timing harness of the CPU backend: the fused loss (forward + backward, alpha = 0.5 with labels,
//! T = 2, f32 gradient) against the memory floor (`cpu::memory_floor`: read both inputs once,
//! write a gradient-sized f32 output), for f32 and bf16 inputs. Median of `--runs` runs (default
//! 7) after 2 warm-up runs. `--loss-only` times the loss without a gradient (forward and reverse
//! KL: pass 1 alone), which shows how much of the time the gradient pass adds. With `--rows 4`
//! the inputs and the scratch stay in cache, which shows the compute cost alone.
//!
//! `cargo run --release --example cpu_timing -- [--rows 256] [--vocab 128256,32000] [--runs 7]
//!  [--kinds fkl,rkl,jsd] [--dtypes f32,bf16] [--level avx512|avx2|portable] [--loss-only]`
use std::time::Instant;

use distill_kernels::cpu::{self, SimdLevel};
use distill_kernels::*;

fn inputs(rows: usize, vocab: usize, dtype: Dtype) -> (HostVec, HostVec, Vec<i64>) {
    // Deterministic and cheap: a hashed index mapped to [-4, 4); the student is the teacher plus
    // noise, so the distributions are related like in a real distillation batch.
    let val = |i: usize, salt: u64| {
        let h = (i as u64 ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ((h >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
    };
    let t: Vec<f32> = (0..rows * vocab).map(|i| val(i, 2)).collect();
    let s: Vec<f32> = t
        .iter()
        .enumerate()
        .map(|(i, &t)| t + 0.5 * val(i, 1))
        .collect();
    let labels = (0..rows).map(|r| ((r * 7919) % vocab) as i64).collect();
    (
        HostVec::from_f32(&s, dtype),
        HostVec::from_f32(&t, dtype),
        labels,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time of this process's threads so far, in ms (Linux: /proc/self/task/*/schedstat); 0
/// elsewhere. With other programs competing for the cores, CPU time per run is steadier than
/// wall time.
fn cpu_ms() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e6
}

/// (median wall ms, min wall ms, median CPU ms) of `runs` runs after 2 warm-ups.
fn time(runs: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    for _ in 0..2 {
        f();
    }
    let (walls, cpus): (Vec<f64>, Vec<f64>) = (0..runs)
        .map(|_| {
            let c = cpu_ms();
            let t = Instant::now();
            f();
            (t.elapsed().as_secs_f64() * 1e3, cpu_ms() - c)
        })
        .unzip();
    let min = walls.iter().copied().fold(f64::INFINITY, f64::min);
    (median(walls), min, median(cpus))
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = arg(&args, "--rows").map_or(256, |v| v.parse().unwrap());
    let runs: usize = arg(&args, "--runs").map_or(7, |v| v.parse().unwrap());
    let vocabs: Vec<usize> = arg(&args, "--vocab")
        .unwrap_or_else(|| "128256,32000".into())
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    let dtypes: Vec<Dtype> = arg(&args, "--dtypes")
        .unwrap_or_else(|| "f32,bf16".into())
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    let kinds: Vec<(&str, LossKind)> = arg(&args, "--kinds")
        .unwrap_or_else(|| "fkl,rkl,jsd".into())
        .split(',')
        .map(|k| match k {
            "fkl" => ("forward-kl", LossKind::ForwardKl),
            "rkl" => ("reverse-kl", LossKind::ReverseKl),
            "jsd" => ("jsd(0.5)", LossKind::Jsd { beta: 0.5 }),
            other => panic!("unknown kind {other}"),
        })
        .collect();
    let loss_only = args.iter().any(|a| a == "--loss-only");
    let level = match arg(&args, "--level").as_deref() {
        None => SimdLevel::detect(),
        Some("avx512") => SimdLevel::Avx512,
        Some("avx2") => SimdLevel::Avx2,
        Some("portable") => SimdLevel::Portable,
        Some(other) => panic!("unknown level {other}"),
    };
    println!(
        "simd level {} (detected {}), {} rayon threads, median of {runs} runs after 2 warm-ups{}",
        level.supported().name(),
        SimdLevel::detect().name(),
        rayon::current_num_threads(),
        if loss_only { ", loss only" } else { "" }
    );
    println!(
        "{:>6} {:>7} {:>5} {:>11} {:>10} {:>8} {:>9} {:>8} {:>9}",
        "rows", "vocab", "dtype", "kind", "median ms", "min ms", "x floor", "cpu ms", "x floor"
    );
    for &vocab in &vocabs {
        for &dtype in &dtypes {
            let (s, t, labels) = inputs(rows, vocab, dtype);
            let mut grad = vec![0.0f32; rows * vocab];
            let (floor, floor_min, floor_cpu) = time(runs, || {
                cpu::memory_floor(s.as_slice(), t.as_slice(), rows, vocab, &mut grad)
            });
            println!(
                "{rows:>6} {vocab:>7} {:>5} {:>11} {floor:>10.2} {floor_min:>8.2} {:>9.2} \
                 {floor_cpu:>8.2} {:>9.2}",
                dtype.suffix(),
                "floor",
                1.0,
                1.0
            );
            for &(name, kind) in &kinds {
                let cfg = LossConfig::builder()
                    .kind(kind)
                    .alpha(0.5)
                    .temperature(2.0)
                    .build()
                    .unwrap();
                let inputs = DistillInputs {
                    rows,
                    vocab,
                    student: s.as_slice(),
                    teacher: t.as_slice(),
                    labels: Some(&labels),
                    hidden: None,
                };
                let (ms, min, cpu) = time(runs, || {
                    let grads = GradOutputs {
                        logits: (!loss_only).then_some(HostSliceMut::F32(&mut grad)),
                        hidden: None,
                    };
                    std::hint::black_box(
                        cpu::distill_loss_with(level, &cfg, &inputs, grads).unwrap(),
                    );
                });
                println!(
                    "{rows:>6} {vocab:>7} {:>5} {name:>11} {ms:>10.2} {min:>8.2} {:>9.2} \
                     {cpu:>8.2} {:>9.2}",
                    dtype.suffix(),
                    ms / floor,
                    cpu / floor_cpu
                );
            }
        }
    }
}
