//! A whole run: the output directory's safety rules, the step loop with evaluation and
//! checkpoints on their cadence, and the run's `metrics.json` and loss-curve PNG.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::data::batches::TokenStream;
use crate::data::tokenizer::Tokenizer;
use crate::model::LlamaConfig;
use crate::train::checkpoint::{self, ConfigExtras};
use crate::train::config::TrainConfig;
use crate::train::error::{Result, TrainError as Error};
use crate::train::plot::{plot_losses, Series};
use crate::train::trainer::{History, StepStats, Teacher, Trainer};

/// What a run reports as it goes; the command line draws a progress bar or prints lines.
pub trait Progress {
    /// The run `name` begins: `total_steps` in all, of which `done_steps` are already done (nonzero
    /// when resuming).
    fn start(&mut self, name: &str, total_steps: u64, done_steps: u64);
    /// An optimizer step finished; `tokens_per_s` is the run's training throughput so far.
    fn step(&mut self, stats: &StepStats, tokens_per_s: f64);
    /// Validation after `step` steps gave `val_loss` (mean cross-entropy, nats per token).
    fn eval(&mut self, step: u64, val_loss: f64);
    /// The step loop is over; metrics and the plot are written after this.
    fn finish(&mut self);
}

/// Reports nothing (tests, library users).
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: &str, _: u64, _: u64) {}
    fn step(&mut self, _: &StepStats, _: f64) {}
    fn eval(&mut self, _: u64, _: f64) {}
    fn finish(&mut self) {}
}

/// Everything one run needs.
pub struct RunSpec<'a> {
    /// Shown by the progress display ("teacher", "student_kd", ...).
    pub name: &'a str,
    /// Output directory for checkpoints, `metrics.json` and `loss.png`; [`prepare_out_dir`] says
    /// what it may already hold.
    pub out: &'a Path,
    /// The trained model's hyper-parameters; `vocab_size` must equal the tokenizer's.
    pub model: LlamaConfig,
    /// Training options: optimizer, schedule, batches, cadences and distillation.
    pub train: TrainConfig,
    /// The frozen teacher; required when `train.distill` is set.
    pub teacher: Option<Teacher>,
    /// The tokenizer the streams were encoded with; copied into every checkpoint.
    pub tokenizer: &'a Tokenizer,
    /// Training tokens; each step reads random windows of it.
    pub train_stream: &'a TokenStream,
    /// Validation windows `(inputs, targets)`, e.g. from [`crate::data::batches::val_windows`].
    pub val_windows: &'a [(Vec<u32>, Vec<u32>)],
    /// Continue the run saved in `out`.
    pub resume: bool,
    /// Start afresh even if `out` holds another run (its run files are replaced).
    pub force: bool,
    /// Stop (with a checkpoint) after this many steps, as an interruption would; the schedule
    /// still spans `train.steps`.
    pub stop_at: Option<u64>,
    /// Free-form description of the data and the command, stored with the checkpoint.
    pub meta: Value,
}

/// The numbers `metrics.json` holds.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Last validation loss, nats per token (NaN if never evaluated).
    pub val_loss: f64,
    /// Validation perplexity, `exp(val_loss)`.
    pub val_ppl: f64,
    /// Optimizer steps done (fewer than `train.steps` when stopped early).
    pub steps: u64,
    /// Tokens trained on, resumed steps included: `steps * batch * seq`.
    pub train_tokens: u64,
    /// Training throughput over the recorded steps, evaluation and checkpoints excluded.
    pub tokens_per_s: f64,
    /// Number of model parameters (distillation projections excluded).
    pub params: usize,
    /// Wall-clock seconds of this invocation, evaluation and saving included.
    pub wall_s: f64,
    /// Loss curves, including those of resumed steps.
    pub history: History,
}

impl RunSummary {
    /// The `metrics` object of `metrics.json`: these numbers plus the train and validation curves.
    pub fn to_json(&self) -> Value {
        json!({
            "val_loss": self.val_loss,
            "val_ppl": self.val_ppl,
            "steps": self.steps,
            "train_tokens": self.train_tokens,
            "tokens_per_s": self.tokens_per_s,
            "params": self.params,
            "wall_s": self.wall_s,
            "train_curve": self.history.train,
            "val_curve": self.history.val,
        })
    }
}

/// The files a run writes; `--force` removes exactly these.
pub const RUN_FILES: [&str; 6] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "trainer_state.safetensors",
    "metrics.json",
    "loss.png",
];

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Refuses to write into a directory that holds anything unless resuming (then it must hold a
/// run) or forced (then the run files are removed, nothing else).
pub fn prepare_out_dir(out: &Path, resume: bool, force: bool) -> Result<()> {
    check_out_dir(out, resume, force)?;
    if force && !resume {
        for f in RUN_FILES {
            let p = out.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))
}

/// The checks of [`prepare_out_dir`], touching nothing: a run validates everything else before
/// `--force` removes a previous run's files.
pub fn check_out_dir(out: &Path, resume: bool, force: bool) -> Result<()> {
    let bad = |reason: &'static str| Error::InvalidOption {
        name: "out",
        value: out.display().to_string(),
        reason,
    };
    if out.exists() && !out.is_dir() {
        return Err(bad("exists and is not a directory"));
    }
    let entries = match std::fs::read_dir(out) {
        Ok(rd) => rd.count(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(out, e)),
    };
    if resume {
        if !out.join("trainer_state.safetensors").is_file() {
            return Err(bad("holds no run to resume (no trainer_state.safetensors)"));
        }
        return Ok(());
    }
    if entries > 0 && !force {
        return Err(bad(
            "is not empty (it may hold another run): pass --resume to continue it or --force to replace it",
        ));
    }
    Ok(())
}

/// Runs (or resumes) a training run to its last step and writes its metrics.
pub fn run(spec: RunSpec, progress: &mut dyn Progress) -> Result<RunSummary> {
    let wall = Instant::now();
    // Everything that can refuse the run is checked before the output directory is touched:
    // `--force` must not remove a run for a command that then fails.
    check_out_dir(spec.out, spec.resume, spec.force)?;
    let tokenizer_json = spec.tokenizer.to_json()?.into_bytes();
    let extras = ConfigExtras {
        bos_token_id: None,
        eos_token_id: Some(spec.tokenizer.eos_id()),
    };
    if spec.model.vocab_size != spec.tokenizer.vocab_size() {
        return Err(Error::InvalidOption {
            name: "vocab_size",
            value: spec.model.vocab_size.to_string(),
            reason: "differs from the tokenizer's vocabulary size",
        });
    }
    let cfg = spec.train.clone();
    let mut trainer = Trainer::new(cfg.clone(), spec.model.clone(), spec.teacher)?;
    prepare_out_dir(spec.out, spec.resume, spec.force)?;
    if spec.resume {
        trainer.resume(spec.out)?;
    }
    let last = spec.stop_at.map_or(cfg.steps, |s| s.min(cfg.steps));
    let tokens_per_step = (cfg.batch * cfg.seq) as f64;
    progress.start(spec.name, cfg.steps, trainer.step_count());
    if trainer.history.val.is_empty() {
        let v = trainer.evaluate(spec.val_windows)?;
        progress.eval(0, v);
    }
    while trainer.step_count() < last {
        let stats = trainer.step(spec.train_stream)?;
        progress.step(&stats, trainer.history.tokens_per_s(tokens_per_step));
        let s = stats.step;
        if s.is_multiple_of(cfg.eval_every) || s == cfg.steps {
            let v = trainer.evaluate(spec.val_windows)?;
            progress.eval(s, v);
        }
        if s.is_multiple_of(cfg.checkpoint_every) || s == last {
            trainer.save(spec.out, &tokenizer_json, &extras, spec.meta.clone())?;
        }
    }
    progress.finish();
    let h = trainer.history.clone();
    let val_loss = h.val.last().map_or(f64::NAN, |v| v.1);
    let summary = RunSummary {
        val_loss,
        val_ppl: val_loss.exp(),
        steps: trainer.step_count(),
        train_tokens: trainer.step_count() * tokens_per_step as u64,
        tokens_per_s: h.tokens_per_s(tokens_per_step),
        params: trainer.model().num_params(),
        wall_s: wall.elapsed().as_secs_f64(),
        history: h,
    };
    let metrics = json!({
        "run": spec.name,
        "metrics": summary.to_json(),
        "model": checkpoint::config_to_json(trainer.model().config(), &extras),
        "train_config": cfg.to_json(),
        "meta": spec.meta,
    });
    let text = serde_json::to_string_pretty(&metrics).expect("metrics are plain JSON");
    checkpoint::write_atomic(&spec.out.join("metrics.json"), text.as_bytes())?;
    plot_run(
        &spec.out.join("loss.png"),
        spec.name,
        &summary.history,
        None,
    )?;
    Ok(summary)
}

/// Training loss (thin) and validation loss (thick) of one run.
pub fn plot_run(path: &Path, title: &str, h: &History, floor: Option<f64>) -> Result<()> {
    let series = [
        Series {
            name: "train".into(),
            points: smooth(&h.train),
            rgb: [120, 160, 220],
            dashed: false,
        },
        Series {
            name: "validation".into(),
            points: h.val.iter().map(|&(s, v)| (s as f64, v)).collect(),
            rgb: [200, 60, 40],
            dashed: false,
        },
    ];
    let hlines: Vec<(String, f64, [u8; 3])> = floor
        .map(|f| ("entropy floor".to_string(), f, [0, 0, 0]))
        .into_iter()
        .collect();
    plot_losses(path, title, &series, &hlines, 800, 500)
}

/// A moving average over 20 steps: the per-step training loss is noisy.
pub fn smooth(curve: &[(u64, f64)]) -> Vec<(f64, f64)> {
    const WINDOW: usize = 20;
    let mut out = Vec::with_capacity(curve.len());
    let mut sum = 0.0;
    for (i, &(s, v)) in curve.iter().enumerate() {
        sum += v;
        if i >= WINDOW {
            sum -= curve[i - WINDOW].1;
        }
        out.push((s as f64, sum / (i + 1).min(WINDOW) as f64));
    }
    out
}
