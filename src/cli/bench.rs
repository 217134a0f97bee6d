//! `distill bench`: one timed measurement per command, for the benchmark tables.
//!
//! - `bench loss` times the whole pass a trainer runs: the fused forward + backward of the
//!   distillation loss with alpha = 0.5 and labels (none ignored), writing an f32 gradient. On
//!   `cpu` (and `reference`) it calls `DistillDevice::distill_loss` on host slices; on `emulated` and
//!   `cuda` it uploads the inputs once and times `CudaKernels::distill_loss_device` on device
//!   buffers, so host-device copies are not in the figure.
//! - `bench floor` times the memory floor of this machine: a pass that reads both inputs once
//!   and writes a gradient-sized f32 output, and nothing else.
//!
//! Inputs are generated deterministically before timing starts; `--warmup` untimed runs come
//! first, then `--iters` timed ones. The last line on stdout is one JSON object with the
//! median and minimum time, the throughput and the peak resident memory of the process.

use std::hint::black_box;
use std::time::Instant;

use distill_kernels::cuda::{CudaKernels, DeviceInputs, DeviceVec, Student};
use distill_kernels::{
    DeviceKind, DistillInputs, Dtype, Element, Error, GradOutputs, HostSlice, HostSliceMut,
    LossConfig, LossKind, Reduction,
};
use half::{bf16, f16};

use super::json::JsonLine;
use super::rng::{Draw, SplitMix64};
use super::{print_line, BenchFloorArgs, BenchLossArgs, CliError, CliResult, KindArg};

/// Weight of the soft loss: the hard-label cross-entropy gets the other half.
const ALPHA: f32 = 0.5;
/// JSD weight of the teacher for `--kind jsd`.
const JSD_BETA: f32 = 0.5;
/// Bound on N x V, so that a typo does not try to allocate the whole machine.
const MAX_ELEMENTS: usize = 1 << 31;

pub fn run_loss(args: &BenchLossArgs) -> CliResult<()> {
    let device: DeviceKind = args.device.parse().map_err(CliError::new)?;
    let (rows, vocab) = check_shape(args.rows, args.vocab)?;
    check_iters(args.iters)?;
    let kind = match args.kind {
        KindArg::ForwardKl => LossKind::ForwardKl,
        KindArg::ReverseKl => LossKind::ReverseKl,
        KindArg::Jsd => LossKind::Jsd { beta: JSD_BETA },
    };
    // Every option set (the struct is non-exhaustive outside the crate); validated below.
    let mut cfg = LossConfig::default();
    cfg.kind = kind;
    cfg.temperature = args.temperature;
    cfg.alpha = ALPHA;
    cfg.t2_scale = true;
    cfg.ignore_index = -100;
    cfg.reduction = Reduction::Mean;
    cfg.normalizer = None;
    cfg.grad_scale = 1.0;
    cfg.hidden_weight = 0.0;
    cfg.validate().map_err(|e| match e {
        Error::InvalidOption {
            name: "temperature",
            reason,
            ..
        } => CliError::new(format!(
            "invalid --temperature {}: {reason}",
            args.temperature
        )),
        other => other.into(),
    })?;
    let dtype: Dtype = args.dtype.into();

    with_threads(args.threads, |threads| {
        let baseline = memory_status();
        // The device first: an unavailable one is reported before generating large inputs.
        let runner = Runner::open(device, &args.device)?;
        let data = Inputs::generate(rows, vocab, dtype, args.seed)?;
        let mut grad = zeros(rows * vocab, "gradient")?;
        let timing = runner.time(&cfg, &data, &mut grad, args.warmup, args.iters)?;
        let peak = memory_status();

        let line = result_line("bench-loss", runner.name(), rows, vocab, dtype, &timing)
            .str("kind", kind.name())
            .float("temperature", args.temperature as f64)
            .float("alpha", ALPHA as f64)
            .f32("loss", timing.last_loss)
            .uint("threads", threads);
        print_line(&memory_fields(line, baseline, peak, rows, vocab, dtype).finish())
    })
}

pub fn run_floor(args: &BenchFloorArgs) -> CliResult<()> {
    let (rows, vocab) = check_shape(args.rows, args.vocab)?;
    check_iters(args.iters)?;
    let dtype: Dtype = args.dtype.into();

    with_threads(args.threads, |threads| {
        let baseline = memory_status();
        let data = Inputs::generate(rows, vocab, dtype, args.seed)?;
        let mut out = zeros(rows * vocab, "output")?;
        let (student, teacher) = (data.student.as_slice(), data.teacher.as_slice());
        let mut pass = || memory_floor(student, teacher, rows, vocab, &mut out);
        for _ in 0..args.warmup {
            pass()?;
        }
        let mut times = Vec::with_capacity(args.iters);
        for _ in 0..args.iters {
            let t0 = Instant::now();
            pass()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        black_box(&out);
        let timing = Timing::new(times, f32::NAN);
        let peak = memory_status();

        let line = result_line("bench-floor", "cpu", rows, vocab, dtype, &timing)
            .str("pass", "read student + teacher, write f32 [rows, vocab]")
            .uint("threads", threads);
        print_line(&memory_fields(line, baseline, peak, rows, vocab, dtype).finish())
    })
}

fn check_shape(rows: usize, vocab: usize) -> CliResult<(usize, usize)> {
    if rows == 0 {
        return Err(CliError::new("--rows must be > 0"));
    }
    if vocab == 0 {
        return Err(CliError::new("--vocab must be > 0"));
    }
    if rows.checked_mul(vocab).is_none_or(|n| n > MAX_ELEMENTS) {
        return Err(CliError::new(format!(
            "--rows {rows} x --vocab {vocab} is too large (at most {MAX_ELEMENTS} elements)"
        )));
    }
    Ok((rows, vocab))
}

fn check_iters(iters: usize) -> CliResult<()> {
    if iters == 0 {
        return Err(CliError::new("--iters must be > 0"));
    }
    Ok(())
}

/// Runs `f` on a rayon pool of `threads` threads (the global pool when `None`), passing the
/// number of threads it runs with.
fn with_threads(
    threads: Option<usize>,
    f: impl FnOnce(usize) -> CliResult<()> + Send,
) -> CliResult<()> {
    match threads {
        None => f(rayon::current_num_threads()),
        Some(0) => Err(CliError::new("--threads must be > 0")),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| CliError::new(format!("cannot start {n} threads: {e}")))?;
            pool.install(|| f(n))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// Student and teacher logits of one dtype, and one label per row (none ignored).
struct Inputs {
    student: Logits,
    teacher: Logits,
    labels: Vec<i64>,
}

enum Logits {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Logits {
    fn as_slice(&self) -> HostSlice<'_> {
        match self {
            Logits::F32(v) => HostSlice::F32(v),
            Logits::F16(v) => HostSlice::F16(v),
            Logits::Bf16(v) => HostSlice::Bf16(v),
        }
    }
}

impl Inputs {
    /// Teacher logits `2 z`, student `0.8 teacher + z'` (z, z' about standard normal), labels
    /// uniform in `[0, V)`. Written straight into vectors of the requested dtype, so generation
    /// needs no memory beyond the inputs themselves.
    fn generate(rows: usize, vocab: usize, dtype: Dtype, seed: u64) -> CliResult<Inputs> {
        let n = rows * vocab;
        let mut rng = SplitMix64::new(seed);
        let labels = (0..rows).map(|_| rng.index(vocab) as i64).collect();
        let (student, teacher) = match dtype {
            Dtype::F32 => {
                let (s, t) = logits::<f32>(n, &mut rng)?;
                (Logits::F32(s), Logits::F32(t))
            }
            Dtype::F16 => {
                let (s, t) = logits::<f16>(n, &mut rng)?;
                (Logits::F16(s), Logits::F16(t))
            }
            Dtype::Bf16 => {
                let (s, t) = logits::<bf16>(n, &mut rng)?;
                (Logits::Bf16(s), Logits::Bf16(t))
            }
        };
        Ok(Inputs {
            student,
            teacher,
            labels,
        })
    }

    fn host(&self, rows: usize, vocab: usize) -> DistillInputs<'_> {
        DistillInputs {
            rows,
            vocab,
            student: self.student.as_slice(),
            teacher: self.teacher.as_slice(),
            labels: Some(&self.labels),
            hidden: None,
        }
    }
}

fn logits<T: Element>(n: usize, rng: &mut SplitMix64) -> CliResult<(Vec<T>, Vec<T>)> {
    let mut s = reserve::<T>(n, "student logits")?;
    let mut t = reserve::<T>(n, "teacher logits")?;
    for _ in 0..n {
        let teacher = 2.0 * approx_normal(rng.next_u64());
        let student = 0.8 * teacher + approx_normal(rng.next_u64());
        t.push(T::from_f32(teacher));
        s.push(T::from_f32(student));
    }
    Ok((s, t))
}

/// About standard normal from 64 random bits: the sum of four 16-bit uniforms (Irwin-Hall),
/// centred and scaled to unit variance. Fast, and plenty for synthetic logits.
fn approx_normal(bits: u64) -> f32 {
    let sum = (bits & 0xffff) + ((bits >> 16) & 0xffff) + ((bits >> 32) & 0xffff) + (bits >> 48);
    // Each uniform has variance 1/12 (in units of 2^16), four of them 1/3: scale by sqrt(3).
    (sum as f32 / 65536.0 - 2.0) * 1.732_050_8
}

fn reserve<T>(n: usize, what: &str) -> CliResult<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        CliError::new(format!(
            "cannot allocate {n} elements for the {what} (out of memory)"
        ))
    })?;
    Ok(v)
}

fn zeros(n: usize, what: &str) -> CliResult<Vec<f32>> {
    let mut v = reserve::<f32>(n, what)?;
    v.resize(n, 0.0);
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

enum Runner {
    /// `reference` and `cpu`: host slices through `DistillDevice::distill_loss`.
    Host(Box<dyn distill_kernels::DistillDevice>),
    /// `emulated` and `cuda`: device buffers through `CudaKernels::distill_loss_device`.
    Device(CudaKernels),
}

impl Runner {
    fn open(kind: DeviceKind, spelled: &str) -> CliResult<Runner> {
        let unavailable = |e: Error| match e {
            Error::DeviceUnavailable(_) => CliError::new(format!("--device {spelled}: {e}")),
            other => CliError::new(format!("cannot open device {spelled}: {other}")),
        };
        Ok(match kind {
            DeviceKind::Reference | DeviceKind::Cpu => {
                Runner::Host(distill_kernels::open(kind).map_err(unavailable)?)
            }
            DeviceKind::Emulated | DeviceKind::Cuda => {
                Runner::Device(CudaKernels::open_kind(kind).map_err(unavailable)?)
            }
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Runner::Host(b) => b.name(),
            Runner::Device(d) if d.is_emulated() => "emulated",
            Runner::Device(_) => "cuda",
        }
    }

    /// `warmup` untimed calls, then `iters` timed ones.
    fn time(
        &self,
        cfg: &LossConfig,
        data: &Inputs,
        grad: &mut [f32],
        warmup: usize,
        iters: usize,
    ) -> CliResult<Timing> {
        let (rows, vocab) = (data.labels.len(), grad.len() / data.labels.len());
        let failed = |e: Error| CliError::new(format!("loss on device {}: {e}", self.name()));
        let mut times = Vec::with_capacity(iters);
        let mut last = f32::NAN;
        match self {
            Runner::Host(backend) => {
                let inputs = data.host(rows, vocab);
                for i in 0..warmup + iters {
                    let grads = GradOutputs {
                        logits: Some(HostSliceMut::F32(grad)),
                        hidden: None,
                    };
                    let t0 = Instant::now();
                    let loss = backend.distill_loss(cfg, &inputs, grads).map_err(failed)?;
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    if i >= warmup {
                        times.push(ms);
                    }
                    last = loss.total();
                }
            }
            Runner::Device(dev) => {
                let stream = dev.stream();
                let copy = |e: cudarc::driver::DriverError| {
                    CliError::new(format!(
                        "device {}: cannot set up the input buffers: {e}",
                        self.name()
                    ))
                };
                let student = DeviceVec::upload(stream, data.student.as_slice()).map_err(copy)?;
                let teacher = DeviceVec::upload(stream, data.teacher.as_slice()).map_err(copy)?;
                let labels = stream.clone_htod(&data.labels).map_err(copy)?;
                let mut dgrad = DeviceVec::zeros(stream, Dtype::F32, grad.len()).map_err(copy)?;
                stream.synchronize().map_err(copy)?;
                for i in 0..warmup + iters {
                    let inputs = DeviceInputs {
                        strides: Default::default(),
                        rows,
                        vocab,
                        student: Student::Logits {
                            logits: &student,
                            grad: Some(&mut dgrad),
                        },
                        teacher: &teacher,
                        labels: Some(&labels),
                        hidden: None,
                    };
                    // `distill_loss_device` synchronizes once to read the loss back, so the
                    // wall time covers the whole pass on the device.
                    let t0 = Instant::now();
                    let loss = dev.distill_loss_device(cfg, inputs).map_err(failed)?;
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    if i >= warmup {
                        times.push(ms);
                    }
                    last = loss.total();
                }
                // The gradient comes back once, outside the timing, as a trainer would use it.
                if let DeviceVec::F32(g) = &dgrad {
                    stream.memcpy_dtoh(g, grad).map_err(copy)?;
                    stream.synchronize().map_err(copy)?;
                }
            }
        }
        black_box(&*grad);
        Ok(Timing::new(times, last))
    }
}

// ---------------------------------------------------------------------------------------------
// The memory floor
// ---------------------------------------------------------------------------------------------

/// The library's memory floor: reads both inputs once and writes a gradient-sized f32 output,
/// with the cpu backend's row parallelism and dtype conversion.
fn memory_floor(
    student: HostSlice,
    teacher: HostSlice,
    rows: usize,
    vocab: usize,
    out: &mut [f32],
) -> CliResult<()> {
    // The lengths agree by construction (`memory_floor` panics otherwise).
    distill_kernels::cpu::memory_floor(student, teacher, rows, vocab, out);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

struct Timing {
    median_ms: f64,
    min_ms: f64,
    mean_ms: f64,
    max_ms: f64,
    iters: usize,
    last_loss: f32,
}

impl Timing {
    fn new(mut times: Vec<f64>, last_loss: f32) -> Timing {
        times.sort_by(f64::total_cmp);
        let n = times.len();
        let median_ms = if n % 2 == 1 {
            times[n / 2]
        } else {
            0.5 * (times[n / 2 - 1] + times[n / 2])
        };
        Timing {
            median_ms,
            min_ms: times[0],
            mean_ms: times.iter().sum::<f64>() / n as f64,
            max_ms: times[n - 1],
            iters: n,
            last_loss,
        }
    }
}

/// Bytes a pass must move at the least: both inputs read once, the f32 gradient written once.
fn io_bytes(rows: usize, vocab: usize, dtype: Dtype) -> f64 {
    (rows * vocab) as f64 * (2 * dtype.size_bytes() + 4) as f64
}

fn result_line(
    command: &str,
    device: &str,
    rows: usize,
    vocab: usize,
    dtype: Dtype,
    t: &Timing,
) -> JsonLine {
    let elements = (rows * vocab) as f64;
    JsonLine::new()
        .str("command", command)
        .str("device", device)
        .uint("rows", rows)
        .uint("vocab", vocab)
        .str("dtype", dtype.suffix())
        .uint("iters", t.iters)
        .float("median_ms", round3(t.median_ms))
        .float("min_ms", round3(t.min_ms))
        .float("mean_ms", round3(t.mean_ms))
        .float("max_ms", round3(t.max_ms))
        .float("melem_per_s", round3(elements / t.median_ms / 1e3))
        .float(
            "gb_per_s",
            round3(io_bytes(rows, vocab, dtype) / t.median_ms / 1e6),
        )
}

fn memory_fields(
    line: JsonLine,
    baseline: Memory,
    peak: Memory,
    rows: usize,
    vocab: usize,
    dtype: Dtype,
) -> JsonLine {
    let mb = |kb: Option<u64>| kb.map_or(f64::NAN, |kb| round3(kb as f64 / 1024.0));
    line.float(
        "io_mb",
        round3(io_bytes(rows, vocab, dtype) / (1 << 20) as f64),
    )
    .float("baseline_rss_mb", mb(baseline.rss_kb))
    .float("peak_rss_mb", mb(peak.hwm_kb))
}

/// Resident memory of this process from `/proc/self/status` (Linux; `None` elsewhere).
#[derive(Clone, Copy)]
pub(super) struct Memory {
    /// VmRSS: resident now.
    pub rss_kb: Option<u64>,
    /// VmHWM: the peak resident size so far.
    pub hwm_kb: Option<u64>,
}

pub(super) fn memory_status() -> Memory {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
    };
    Memory {
        rss_kb: field("VmRSS:"),
        hwm_kb: field("VmHWM:"),
    }
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}
