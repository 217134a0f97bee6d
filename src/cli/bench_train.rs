//! `distill bench train`: the distilled student's training throughput (teacher forward, student
//! forward and backward, fused loss, clipping, AdamW) on random tokens, for the peer script
//! `benches/peers/train.sh` to set next to PyTorch.

use std::time::Instant;

use clap::Args;
use serde_json::json;

use distill_kernels::data::batches::TokenStream;
use distill_kernels::model::Llama;
use distill_kernels::train::config::{preset, DistillConfig, TrainConfig};
use distill_kernels::train::trainer::{Teacher, Trainer};

use super::rng::{Draw, SplitMix64};
use super::{print_line, CliError, CliResult, KindArg};

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Student size: tiny or small
    #[arg(long, default_value = "tiny")]
    pub config: String,
    /// Teacher size: tiny or small; `none` times hard-label training without a teacher
    #[arg(long, default_value = "small")]
    pub teacher_config: String,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    #[arg(long, default_value_t = 512)]
    pub vocab: usize,
    /// Timed steps (the median is reported)
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
    /// Untimed steps first
    #[arg(long, default_value_t = 3)]
    pub warmup_steps: u64,
    #[arg(long, value_enum, default_value_t = KindArg::ForwardKl)]
    pub kind: KindArg,
    #[arg(long, default_value_t = 2.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f32,
    /// Worker threads [default: one per core]
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(a: &BenchTrainArgs) -> CliResult<()> {
    match a.threads {
        Some(0) => Err(CliError::new("--threads 0: must be at least 1")),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| CliError::new(format!("--threads {n}: {e}")))?
            .install(|| measure(a)),
        None => measure(a),
    }
}

fn measure(a: &BenchTrainArgs) -> CliResult<()> {
    if a.steps == 0 {
        return Err(CliError::new("--steps 0: must be at least 1"));
    }
    let student = preset(&a.config, a.vocab, a.seq)?;
    let teacher = match a.teacher_config.as_str() {
        "none" => None,
        name => {
            let model = Llama::new(preset(name, a.vocab, a.seq)?)?;
            let params = model.init_params::<f32>(2);
            Some(Teacher { model, params })
        }
    };
    let kind = super::train::loss_kind(a.kind, 0.5);
    let total = a.warmup_steps + a.steps;
    let cfg = TrainConfig {
        steps: total,
        batch: a.batch,
        seq: a.seq,
        warmup: 0,
        distill: teacher.as_ref().map(|_| DistillConfig {
            kind,
            temperature: a.temperature,
            alpha: a.alpha,
            ..DistillConfig::default()
        }),
        ..TrainConfig::default()
    };
    let mut rng = SplitMix64::new(1);
    let tokens: Vec<u32> = (0..(a.batch * (a.seq + 1) * 64).max(100_000))
        .map(|_| rng.index(a.vocab) as u32)
        .collect();
    let stream = TokenStream { tokens, docs: 1 };
    let mut trainer = Trainer::new(cfg, student, teacher)?;
    let mut times = Vec::new();
    for i in 0..total {
        let t = Instant::now();
        trainer.step(&stream)?;
        if i >= a.warmup_steps {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (a.batch * a.seq) as f64;
    print_line(
        &json!({
            "side": "distill",
            "config": a.config,
            "teacher_config": a.teacher_config,
            "batch": a.batch,
            "seq": a.seq,
            "vocab": a.vocab,
            "steps": a.steps,
            "threads": rayon::current_num_threads(),
            "ms_per_step": median,
            "min_ms_per_step": times[0],
            "tokens_per_s": tokens / (median / 1e3),
            "params": trainer.model().num_params(),
            "peak_rss_mb": super::bench::memory_status().hwm_kb.map(|kb| kb as f64 / 1024.0),
        })
        .to_string(),
    )
}
