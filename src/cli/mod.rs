//! The command line of the `distill` binary: argument definitions, the error type every command
//! returns, and dispatch. The library stays free of CLI code; this module tree belongs to the
//! binary only.

mod bench;
mod bench_topk;
mod bench_train;
mod cache;
mod demo;
mod example;
mod io;
mod json;
mod loss;
mod progress;
mod ptxas;
mod rng;
mod train;

use std::fmt;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A failure of a command: one human-readable line naming the tensor, option or file at fault.
#[derive(Debug)]
pub struct CliError(String);

impl CliError {
    pub fn new(message: impl Into<String>) -> Self {
        CliError(message.into())
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<distill_kernels::Error> for CliError {
    fn from(e: distill_kernels::Error) -> Self {
        CliError(e.to_string())
    }
}

impl From<distill_kernels::train::TrainError> for CliError {
    fn from(e: distill_kernels::train::TrainError) -> Self {
        CliError(e.to_string())
    }
}

pub type CliResult<T> = std::result::Result<T, CliError>;

/// Collapses a message onto one line (library and OS messages may carry newlines).
pub fn one_line(message: &str) -> String {
    let parts: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    parts.join("; ")
}

#[derive(Debug, Parser)]
#[command(
    name = "distill",
    version,
    about = "Knowledge-distillation losses (forward/reverse KL, JSD, hard-label CE, hidden MSE) \
             on safetensors inputs, on the reference, cpu, emulated or cuda device"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job on the embedded synthetic language: train a teacher, then two smaller
    /// students for the same steps (hard labels only, and distilled), and compare their
    /// validation loss with the entropy floor. Writes runs/demo/{metrics.json,loss_curves.png}.
    Demo(demo::DemoArgs),
    /// Train a model on hard labels (a byte-level BPE tokenizer is trained on the data first).
    Train(train::TrainArgs),
    /// Distill a teacher run into a student with the fused loss (and hidden-state MSE).
    Distill(train::DistillArgs),
    /// Run a teacher once over the data and store its top-k log-probabilities per position (a
    /// resumable, sharded cache); `distill distill --teacher-cache` trains students from it
    /// without the teacher.
    CacheTeacher(cache::CacheTeacherArgs),
    /// Validation loss of a run on data, as one JSON line with val_loss and val_ppl.
    Eval(train::EvalArgs),
    /// Continue a prompt with a trained model.
    Sample(train::SampleArgs),
    /// Compute the fused distillation loss and the gradient of the student logits (and hidden
    /// states) for the tensors in a safetensors file.
    ///
    /// IN holds `student_logits` and `teacher_logits` ([N, V], F32/F16/BF16), optionally
    /// `labels` ([N], I64) and `student_hidden` + `teacher_hidden` ([N, H], F32/F16/BF16); other
    /// tensors are ignored. OUT receives `loss` (F32, [] for mean/sum, [N] for none),
    /// `grad_student_logits` ([N, V], F32) and, with hidden states, `grad_student_hidden`
    /// ([N, H], F32). One JSON line with the result is printed on stdout.
    Loss(LossArgs),
    /// Write a deterministic synthetic input file for `distill loss` (correlated student and
    /// teacher logits, labels with a few ignored rows, optional hidden states). The same
    /// arguments give the same bytes on every machine.
    Example(ExampleArgs),
    /// Show ptxas's register, spill and shared-memory report for every compiled kernel; with
    /// --check, fail if any kernel spills registers (on sm_80 and sm_90 unless --arch is given).
    Ptxas(PtxasArgs),
    /// Time one measurement and print it as a JSON line: `bench loss` (the fused forward +
    /// backward a trainer runs) or `bench floor` (a pass that only reads both inputs and writes
    /// a gradient-sized output: the memory floor of this machine).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time the fused distillation loss, forward + backward (alpha = 0.5, hard labels, none
    /// ignored, f32 gradient), on synthetic inputs generated before timing. Prints one JSON
    /// line: device, rows, vocab, dtype, kind, median_ms, min_ms, melem_per_s, peak_rss_mb, ...
    ///
    /// On emulated and cuda the inputs are uploaded once and the device-buffer API is timed,
    /// so host-device copies are excluded.
    Loss(BenchLossArgs),
    /// Time the memory floor on the cpu: read student and teacher once, write an f32
    /// [rows, vocab] output. Prints one JSON line like `bench loss`.
    Floor(BenchFloorArgs),
    /// Time training steps of a distilled student (teacher forward, student forward and
    /// backward, fused loss, clipping, AdamW) on random tokens. Prints one JSON line with
    /// tokens_per_s and ms_per_step.
    Train(bench_train::BenchTrainArgs),
    /// The top-k loss next to the dense loss on a real teacher and student (validation
    /// windows): for every k and temperature, the soft loss, its relative error and the
    /// gradient's relative L2 error and cosine. One JSON line each.
    Topk(bench_topk::BenchTopKArgs),
}

#[derive(Debug, Args)]
pub struct BenchLossArgs {
    /// Rows N (token positions)
    #[arg(long)]
    pub rows: usize,
    /// Vocabulary size V
    #[arg(long)]
    pub vocab: usize,
    /// Dtype of the student and teacher logits (the gradient is f32)
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Soft loss between the teacher and student distributions (jsd uses beta = 0.5)
    #[arg(long, value_enum, default_value_t = KindArg::ForwardKl)]
    pub kind: KindArg,
    /// Device: reference, cpu, emulated or cuda
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: String,
    /// Softmax temperature T > 0 of the soft loss
    #[arg(long, default_value_t = 2.0, allow_hyphen_values = true)]
    pub temperature: f32,
    /// Timed runs (the median and minimum are reported)
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed runs before the timed ones
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Seed of the input generator
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads of the cpu backend [default: one per core]
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct BenchFloorArgs {
    /// Rows N (token positions)
    #[arg(long)]
    pub rows: usize,
    /// Vocabulary size V
    #[arg(long)]
    pub vocab: usize,
    /// Dtype of the two inputs (the output is f32)
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Timed runs (the median and minimum are reported)
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed runs before the timed ones
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Seed of the input generator
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads [default: one per core]
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// sum p_t (log p_t - log p_s)
    ForwardKl,
    /// sum p_s (log p_s - log p_t)
    ReverseKl,
    /// beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s
    Jsd,
}

impl KindArg {
    /// The spelling on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KindArg::ForwardKl => "forward-kl",
            KindArg::ReverseKl => "reverse-kl",
            KindArg::Jsd => "jsd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReductionArg {
    /// One loss per row (0 for ignored rows)
    None,
    Sum,
    /// Sum divided by the number of valid rows (or --normalizer)
    Mean,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for distill_kernels::Dtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => distill_kernels::Dtype::F32,
            DtypeArg::F16 => distill_kernels::Dtype::F16,
            DtypeArg::Bf16 => distill_kernels::Dtype::Bf16,
        }
    }
}

#[derive(Debug, Args)]
pub struct LossArgs {
    /// Input safetensors file
    #[arg(long, value_name = "IN.safetensors")]
    pub input: PathBuf,
    /// Output safetensors file (written atomically; never the input)
    #[arg(long, value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// Device: reference, cpu, emulated or cuda
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: String,
    /// Soft loss between the teacher and student distributions
    #[arg(long, value_enum, default_value_t = KindArg::ForwardKl)]
    pub kind: KindArg,
    /// JSD weight of the teacher, in (0, 1); only with --kind jsd [default: 0.5]
    #[arg(long, allow_hyphen_values = true)]
    pub beta: Option<f32>,
    /// Softmax temperature T > 0 of the soft loss
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub temperature: f32,
    /// Weight of the soft loss in [0, 1]; the hard-label cross-entropy gets 1 - alpha
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub alpha: f32,
    /// Do not multiply the soft loss by T^2
    #[arg(long)]
    pub no_t2_scale: bool,
    /// Label value of rows that take no part in the loss
    #[arg(long, default_value_t = -100, allow_negative_numbers = true)]
    pub ignore_index: i64,
    /// How the row losses are reduced
    #[arg(long, value_enum, default_value_t = ReductionArg::Mean)]
    pub reduction: ReductionArg,
    /// Weight of the hidden-state MSE (needs student_hidden and teacher_hidden in the input)
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub hidden_weight: f32,
    /// Explicit divisor D of --reduction mean (gradient accumulation); default: valid rows
    #[arg(long, allow_hyphen_values = true)]
    pub normalizer: Option<f32>,
    /// A NaN or infinite loss: `error` exits 1 naming the first non-finite input or row and
    /// writes no output; `propagate` writes it (as PyTorch would) with "loss": null on stdout
    #[arg(long, value_enum, default_value_t = NonFiniteArg::Error)]
    pub on_nonfinite: NonFiniteArg,
}

/// What `distill loss` does with a non-finite loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NonFiniteArg {
    /// Refuse: exit 1, no output file
    Error,
    /// Write the NaN/inf loss and gradients, exit 0
    Propagate,
}

#[derive(Debug, Args)]
pub struct ExampleArgs {
    /// Output safetensors file
    #[arg(long, value_name = "PATH")]
    pub output: PathBuf,
    /// Rows N (token positions)
    #[arg(long, default_value_t = 16)]
    pub rows: usize,
    /// Vocabulary size V
    #[arg(long, default_value_t = 2048)]
    pub vocab: usize,
    /// Hidden size H of student_hidden/teacher_hidden (0: no hidden states)
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Seed of the generator
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Dtype of the teacher tensors
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    pub dtype: DtypeArg,
    /// Dtype of the student tensors
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub student_dtype: DtypeArg,
    /// Number of rows labelled -100 (ignored) [default: rows / 8]
    #[arg(long)]
    pub ignored: Option<usize>,
    /// Write no `labels` tensor
    #[arg(long)]
    pub no_labels: bool,
}

#[derive(Debug, Args)]
pub struct PtxasArgs {
    /// Fail (exit 1) when a kernel spills registers, instead of printing the table
    #[arg(long)]
    pub check: bool,
    /// Architectures to show or check, e.g. `80,90` or `sm_86` [default: all for the table,
    /// 80 and 90 for --check]
    #[arg(long, value_delimiter = ',')]
    pub arch: Vec<String>,
}

/// Parses the command line (clap prints its own usage errors and exits with 2) and runs it.
pub fn run() -> CliResult<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Train(args) => train::run_train(&args),
        Command::Distill(args) => train::run_distill(&args),
        Command::CacheTeacher(args) => cache::run(&args),
        Command::Eval(args) => train::run_eval(&args),
        Command::Sample(args) => train::run_sample(&args),
        Command::Loss(args) => loss::run(&args),
        Command::Example(args) => example::run(&args),
        Command::Ptxas(mut args) => {
            if args.check && args.arch.is_empty() {
                args.arch = vec!["80".into(), "90".into()];
            }
            ptxas::run(&args)
        }
        Command::Bench(BenchCommand::Loss(args)) => bench::run_loss(&args),
        Command::Bench(BenchCommand::Floor(args)) => bench::run_floor(&args),
        Command::Bench(BenchCommand::Train(args)) => bench_train::run(&args),
        Command::Bench(BenchCommand::Topk(args)) => bench_topk::run(&args),
    }
}

/// Prints one line on stdout; a closed stdout is an error, not a panic.
fn print_line(line: &str) -> CliResult<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| CliError::new(format!("cannot write to stdout: {e}")))
}
