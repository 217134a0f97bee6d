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
    /// Where the steps run: cpu, emulated or cuda (timed with CUDA events on the device's stream)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage type of the weights and activations on emulated/cuda: f32 or bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// The device a benchmark runs on: its context and stream (for events and memory), and the
/// device's free memory before the run's buffers were allocated.
struct OnDevice {
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    free_before: usize,
    plan_bytes: usize,
}

fn open_device(trainer: &mut Trainer, spelled: &str, dtype: &str) -> CliResult<Option<OnDevice>> {
    use distill_kernels::cuda::CudaKernels;
    use distill_kernels::train::config::DeviceDtype;
    use distill_kernels::{DeviceKind, Error};
    let kind: DeviceKind = spelled.parse().map_err(CliError::new)?;
    let dtype: DeviceDtype = dtype.parse().map_err(CliError::new)?;
    let dev = match kind {
        DeviceKind::Cpu if dtype == DeviceDtype::F32 => return Ok(None),
        DeviceKind::Cpu => return Err(CliError::new(
            "--dtype bf16: the cpu device trains in f32; bf16 runs on --device emulated or cuda",
        )),
        DeviceKind::Reference => {
            return Err(CliError::new(
                "--device reference: the f64 reference trains nothing (cpu, emulated or cuda)",
            ))
        }
        DeviceKind::Emulated | DeviceKind::Cuda => CudaKernels::open_kind(kind),
    }
    .map_err(|e| match e {
        Error::DeviceUnavailable(_) => CliError::new(format!("--device {spelled}: {e}")),
        other => CliError::new(format!("cannot open device {spelled}: {other}")),
    })?;
    let (ctx, stream) = (dev.context().clone(), dev.stream().clone());
    let free_before = ctx
        .mem_get_info()
        .map_err(|e| CliError::new(format!("cuMemGetInfo: {e}")))?
        .0;
    let plan = trainer.use_device(dev, dtype)?;
    Ok(Some(OnDevice {
        ctx,
        stream,
        free_before,
        plan_bytes: plan.iter().map(|(_, b)| b).sum(),
    }))
}

/// One step's milliseconds: CUDA events around it on the device (the stream is drained before
/// the end event is read), the wall clock on the cpu.
fn timed_step(
    trainer: &mut Trainer,
    stream: &TokenStream,
    on: Option<&OnDevice>,
) -> CliResult<f64> {
    let Some(d) = on else {
        let t = Instant::now();
        trainer.step(stream)?;
        return Ok(t.elapsed().as_secs_f64() * 1e3);
    };
    let event = |what: &str| {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        d.stream
            .record_event(flags)
            .map_err(|e| CliError::new(format!("recording the {what} event: {e}")))
    };
    let start = event("start")?;
    trainer.step(stream)?;
    let end = event("end")?;
    end.synchronize()
        .map_err(|e| CliError::new(format!("waiting for the step: {e}")))?;
    let ms = start
        .elapsed_ms(&end)
        .map_err(|e| CliError::new(format!("cuEventElapsedTime: {e}")))?;
    Ok(ms as f64)
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
    let on = open_device(&mut trainer, &a.device, &a.dtype)?;
    let mut times = Vec::new();
    for i in 0..total {
        let ms = timed_step(&mut trainer, &stream, on.as_ref())?;
        if i >= a.warmup_steps {
            times.push(ms);
        }
    }
    // Peak device memory: what the run took from the device's free memory (steps allocate
    // nothing, so the lowest free memory is the one after the first step).
    let device_mb = match &on {
        Some(d) => {
            let free = d
                .ctx
                .mem_get_info()
                .map_err(|e| CliError::new(format!("cuMemGetInfo: {e}")))?
                .0;
            Some(d.free_before.saturating_sub(free) as f64 / (1024.0 * 1024.0))
        }
        None => None,
    };
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
            "device": a.device,
            "dtype": a.dtype,
            "peak_device_mb": device_mb,
            "planned_device_mb": on.as_ref().map(|d| d.plan_bytes as f64 / (1024.0 * 1024.0)),
        })
        .to_string(),
    )
}
