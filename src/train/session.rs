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
use crate::train::rundir::{self, RunDir};
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
    /// A line worth telling the user: which checkpoint a resume starts from, what recovery
    /// repaired in the run directory, what `--force` moved aside.
    fn note(&mut self, _line: &str) {}
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
    /// The run directory (checkpoint generations, `metrics.json`, `loss.png`; see
    /// [`crate::train::rundir`]); [`check_out_dir`] says what it may already hold.
    pub out: &'a Path,
    /// The trained model's hyper-parameters; `vocab_size` must equal the tokenizer's.
    pub model: LlamaConfig,
    /// Initial weights for `model` (e.g. the teacher's layers); `None`: random from the seed.
    /// Unused when resuming.
    pub init_params: Option<Vec<f32>>,
    /// Training options: optimizer, schedule, batches, cadences and distillation.
    pub train: TrainConfig,
    /// The frozen teachers (several: an ensemble weighted by `DistillConfig::teacher_weights`);
    /// `train.distill` needs them or `teacher_caches`.
    pub teachers: Vec<Teacher>,
    /// Offline teacher caches to distill from instead of live teachers (see
    /// [`crate::train::teacher_cache`]); their training windows replace `train_stream`'s.
    pub teacher_caches: Vec<crate::train::teacher_cache::TeacherCache>,
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
    /// Complete checkpoints (generations) kept in `out/checkpoints`, at least 1; the newest
    /// replaces the oldest only once it is complete.
    pub keep_checkpoints: usize,
    /// A digest of the training data (e.g. [`crate::data::corpus::Corpus::fingerprint`]), stored
    /// with every checkpoint; resuming with data of another fingerprint is refused unless
    /// `allow_data_change`.
    pub data_fingerprint: Option<String>,
    /// Resume even if the data's fingerprint differs from the checkpoint's.
    pub allow_data_change: bool,
    /// Where the steps run: `cpu`, or `emulated` / `cuda` (the device step; evaluation and
    /// checkpoints stay on the host). `reference` is refused.
    pub device: crate::device::DeviceKind,
    /// The storage type of the weights and activations on `emulated` / `cuda` (bf16: mixed
    /// precision with f32 master weights); `cpu` trains in f32 and refuses bf16.
    pub dtype: crate::train::config::DeviceDtype,
}

/// The default of [`RunSpec::keep_checkpoints`]: the newest and the one before it.
pub const DEFAULT_KEEP_CHECKPOINTS: usize = 2;

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

/// An `--out` directory that cannot be used, and why.
fn bad_out(out: &Path, reason: &'static str) -> Error {
    Error::InvalidOption {
        name: "out",
        value: out.display().to_string(),
        reason,
    }
}

/// The checks of the output directory that need no lock and touch nothing: a command is refused
/// here, before any other work, when `out` is not a directory, is locked by another run, holds a
/// run and neither `resume` nor `force` is given, or holds nothing to resume. [`run`] repeats
/// them under the lock.
pub fn check_out_dir(out: &Path, resume: bool, force: bool) -> Result<()> {
    let bad = |reason| bad_out(out, reason);
    if out.exists() && !out.is_dir() {
        return Err(bad("exists and is not a directory"));
    }
    if let Some(pid) = rundir::lock_holder(out) {
        return Err(Error::RunDirInUse {
            path: out.display().to_string(),
            pid,
        });
    }
    check_contents(out, resume, force)
}

/// What `out` must hold for `resume` / `force` (the part of [`check_out_dir`] that is repeated
/// under the lock).
fn check_contents(out: &Path, resume: bool, force: bool) -> Result<()> {
    let bad = |reason| bad_out(out, reason);
    if resume {
        if rundir::resumable_generations(out)?.is_empty() {
            return Err(bad("holds no complete checkpoint to resume"));
        }
        return Ok(());
    }
    if !force && rundir::holds_run(out)? {
        return Err(bad(
            "is not empty (it may hold another run): pass --resume to continue it or --force to replace it",
        ));
    }
    Ok(())
}

/// Everything about a run that can be checked before the output directory is touched.
fn validate(spec: &RunSpec) -> Result<()> {
    check_out_dir(spec.out, spec.resume, spec.force)?;
    if spec.model.vocab_size != spec.tokenizer.vocab_size() {
        return Err(Error::InvalidOption {
            name: "vocab_size",
            value: spec.model.vocab_size.to_string(),
            reason: "differs from the tokenizer's vocabulary size",
        });
    }
    if spec.keep_checkpoints == 0 {
        return Err(Error::InvalidOption {
            name: "keep-checkpoints",
            value: "0".into(),
            reason: "at least one checkpoint must be kept",
        });
    }
    if spec.stop_at == Some(0) && spec.resume {
        return Err(Error::InvalidOption {
            name: "stop-at",
            value: "0".into(),
            reason: "a resumed run is already past step 0",
        });
    }
    let need = spec.train.seq + 1;
    if spec.train_stream.tokens.len() < need {
        return Err(Error::Data(format!(
            "the training split has {} tokens, fewer than one window of --seq {} plus its next-token target: give more data or a smaller --seq",
            spec.train_stream.tokens.len(),
            spec.train.seq
        )));
    }
    if spec.val_windows.is_empty() || spec.val_windows.iter().any(|w| w.0.len() != spec.train.seq) {
        let tokens = spec
            .val_windows
            .iter()
            .map(|w| w.0.len() + 1)
            .max()
            .unwrap_or(0);
        return Err(Error::Data(format!(
            "the validation split has {tokens} tokens, fewer than one window of --seq {} plus its next-token target: give more data or a smaller --seq",
            spec.train.seq
        )));
    }
    Ok(())
}

/// Continues from the newest generation that loads, saying which; an older one is tried only
/// when a newer one's files cannot be read (a mismatch of options or data is the same for all).
fn resume_newest(
    trainer: &mut Trainer,
    dir: &RunDir,
    spec: &RunSpec,
    progress: &mut dyn Progress,
) -> Result<()> {
    let gens = dir.generations()?;
    if gens.is_empty() {
        return Err(Error::InvalidOption {
            name: "out",
            value: spec.out.display().to_string(),
            reason: "holds no complete checkpoint to resume",
        });
    }
    let mut first_err = None;
    for g in &gens {
        match trainer.resume(&g.path) {
            Ok(run_meta) => {
                progress.note(&format!(
                    "resuming from {} (step {})",
                    g.describe(),
                    trainer.step_count()
                ));
                check_data(&g.path, &run_meta, spec, progress)?;
                return Ok(());
            }
            Err(e @ (Error::Checkpoint { .. } | Error::Io { .. } | Error::File { .. })) => {
                progress.note(&format!("cannot resume from {}: {e}", g.describe()));
                first_err.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(first_err.expect("at least one generation was tried"))
}

/// Refuses to continue on other data than the checkpoint's, unless allowed.
fn check_data(
    path: &Path,
    run_meta: &Value,
    spec: &RunSpec,
    progress: &mut dyn Progress,
) -> Result<()> {
    let saved = run_meta.get(DATA_FINGERPRINT_KEY).and_then(Value::as_str);
    let (Some(saved), Some(now)) = (saved, spec.data_fingerprint.as_deref()) else {
        return Ok(()); // a checkpoint from before fingerprints, or a caller without one
    };
    if saved == now {
        return Ok(());
    }
    if spec.allow_data_change {
        progress.note(&format!(
            "the data differs from the checkpoint's (fingerprint {saved} -> {now}); continuing as --allow-data-change asks"
        ));
        return Ok(());
    }
    Err(Error::ResumeMismatch {
        path: path.display().to_string(),
        message: format!(
            "the data differs from the data it was trained on (fingerprint {saved}, now {now}); pass --allow-data-change to continue on it anyway (a run made before --documents existed split files on blank lines: resume it with --documents blank-lines)"
        ),
    })
}

/// The key of the data fingerprint in the run metadata stored with each checkpoint.
const DATA_FINGERPRINT_KEY: &str = "data_fingerprint";

/// Runs (or resumes) a training run to its last step and writes its metrics.
///
/// Order: everything that can refuse the command is checked first (options, data, the output
/// directory, the memory plan of [`Trainer::new`]); then the directory is locked and repaired
/// ([`RunDir::open`]); `--force` moves the previous run aside, to be removed when this run's
/// first checkpoint is complete and put back if it fails before; checkpoints are generations
/// (see [`crate::train::rundir`]).
pub fn run(mut spec: RunSpec, progress: &mut dyn Progress) -> Result<RunSummary> {
    let wall = Instant::now();
    validate(&spec)?;
    let teachers = std::mem::take(&mut spec.teachers);
    let caches = std::mem::take(&mut spec.teacher_caches);
    let mut trainer = match caches.is_empty() {
        false => Trainer::with_caches(spec.train.clone(), spec.model.clone(), caches)?,
        true => Trainer::with_teachers(spec.train.clone(), spec.model.clone(), teachers)?,
    };
    if let Some(p) = spec.init_params.take() {
        trainer.set_model_params(&p)?;
    }
    open_device(&mut trainer, spec.device, spec.dtype, progress)?;
    let mut dir = RunDir::open(spec.out, &mut |line| progress.note(&line))?;
    // The same checks under the lock: another run may have finished in between.
    check_contents(spec.out, spec.resume, spec.force)?;
    if spec.force && !spec.resume && rundir::holds_run(spec.out)? {
        dir.move_aside()?;
        progress.note(&format!(
            "--force: the previous run in {} is moved to {}/ and removed once this run's first checkpoint is complete",
            spec.out.display(),
            rundir::REPLACED_DIR
        ));
    }
    let result = train_and_report(&spec, &mut trainer, &mut dir, progress, wall);
    if result.is_err() && dir.restore_replaced()? {
        progress.note("the previous run was put back: this run failed before its first checkpoint");
    }
    result
}

/// `--device reference`: the f64 oracle trains nothing.
/// The CPU executor trains in f32 only.
fn cpu_dtype(dtype: crate::train::config::DeviceDtype) -> Result<()> {
    match dtype {
        crate::train::config::DeviceDtype::F32 => Ok(()),
        other => Err(Error::InvalidOption {
            name: "dtype",
            value: other.to_string(),
            reason: "the cpu device trains in f32; bf16 runs on --device emulated or cuda",
        }),
    }
}

fn reference_refused() -> Error {
    Error::InvalidOption {
        name: "device",
        value: "reference".into(),
        reason: "the f64 reference computes losses only; train on cpu, emulated or cuda",
    }
}

#[cfg(not(feature = "cuda"))]
fn device_missing(kind: crate::device::DeviceKind) -> Error {
    Error::Loss(crate::Error::DeviceUnavailable(format!(
        "this build has no {kind:?} device (enable the `cuda`/`emulator` features)"
    )))
}

/// Moves the trainer's steps onto `kind` (nothing for `cpu`) and reports the device memory
/// plan; a device that cannot run here, or a plan that does not fit it, stops the command before
/// the run directory is touched.
#[cfg(feature = "cuda")]
fn open_device(
    trainer: &mut Trainer,
    kind: crate::device::DeviceKind,
    dtype: crate::train::config::DeviceDtype,
    progress: &mut dyn Progress,
) -> Result<()> {
    use crate::device::DeviceKind;
    let dev = match kind {
        DeviceKind::Cpu => return cpu_dtype(dtype),
        DeviceKind::Reference => return Err(reference_refused()),
        DeviceKind::Emulated | DeviceKind::Cuda => crate::cuda::CudaKernels::open_kind(kind)?,
    };
    let name = dev.name().unwrap_or_default();
    let plan = trainer.use_device(dev, dtype)?;
    let total: usize = plan.iter().map(|(_, b)| b).sum();
    let parts: Vec<String> = plan
        .iter()
        .map(|(what, b)| format!("{what} {}", crate::train::memory::human_bytes(*b as u128)))
        .collect();
    progress.note(&format!(
        "device {name}, {dtype}: {} allocated up front ({})",
        crate::train::memory::human_bytes(total as u128),
        parts.join(", ")
    ));
    Ok(())
}

/// Without the `cuda` feature only `cpu` trains.
#[cfg(not(feature = "cuda"))]
fn open_device(
    _trainer: &mut Trainer,
    kind: crate::device::DeviceKind,
    dtype: crate::train::config::DeviceDtype,
    _progress: &mut dyn Progress,
) -> Result<()> {
    use crate::device::DeviceKind;
    match kind {
        DeviceKind::Cpu => cpu_dtype(dtype),
        DeviceKind::Reference => Err(reference_refused()),
        other => Err(device_missing(other)),
    }
}

fn train_and_report(
    spec: &RunSpec,
    trainer: &mut Trainer,
    dir: &mut RunDir,
    progress: &mut dyn Progress,
    wall: Instant,
) -> Result<RunSummary> {
    let cfg = spec.train.clone();
    if spec.resume {
        resume_newest(trainer, dir, spec, progress)?;
    }
    let tokenizer_json = spec.tokenizer.to_json()?.into_bytes();
    let extras = ConfigExtras {
        bos_token_id: spec.tokenizer.bos_id(),
        eos_token_id: Some(spec.tokenizer.eos_id()),
    };
    // With these two the directory is a complete HF model: transformers' AutoTokenizer and
    // `generate` find the special tokens the teacher (or the trained tokenizer) defines.
    let tokenizer_config = crate::train::pretrained::tokenizer_config_json(spec.tokenizer);
    let generation_config = crate::train::pretrained::generation_config_json(spec.tokenizer);
    let extra_files: [(&str, &[u8]); 2] = [
        (
            checkpoint::TOKENIZER_CONFIG_FILE,
            tokenizer_config.as_bytes(),
        ),
        (
            checkpoint::GENERATION_CONFIG_FILE,
            generation_config.as_bytes(),
        ),
    ];
    let mut meta = spec.meta.clone();
    if let (Some(obj), Some(fp)) = (meta.as_object_mut(), &spec.data_fingerprint) {
        obj.insert(DATA_FINGERPRINT_KEY.into(), Value::from(fp.clone()));
    }
    let mut saved_step = dir.generations()?.first().and_then(|g| g.step);
    let save = |trainer: &mut Trainer, dir: &mut RunDir, saved: &mut Option<u64>| -> Result<()> {
        trainer.sync_host()?;
        dir.save_generation(trainer.step_count(), spec.keep_checkpoints, |path| {
            trainer.save(path, &tokenizer_json, &extra_files, &extras, meta.clone())
        })?;
        *saved = Some(trainer.step_count());
        Ok(())
    };
    let last = spec.stop_at.map_or(cfg.steps, |s| s.min(cfg.steps));
    let tokens_per_step = (cfg.batch * cfg.seq) as f64;
    progress.start(spec.name, cfg.steps, trainer.step_count());
    if trainer.history.val.is_empty() {
        let v = trainer.evaluate(spec.val_windows)?;
        progress.eval(0, v);
    }
    while trainer.step_count() < last {
        if let Some(sig) = crate::train::files::interrupted() {
            return Err(Error::Training {
                step: trainer.step_count(),
                message: format!("interrupted by signal {sig}"),
            });
        }
        let stats = match trainer.step(spec.train_stream) {
            Ok(stats) => stats,
            Err(Error::Training { step, message }) => {
                let kept = match saved_step {
                    Some(s) => format!("the checkpoint of step {s} is kept"),
                    None => "no checkpoint was written yet".into(),
                };
                return Err(Error::Training {
                    step,
                    message: format!("{message}; {kept}"),
                });
            }
            Err(e) => return Err(e),
        };
        progress.step(&stats, trainer.history.tokens_per_s(tokens_per_step));
        let s = stats.step;
        if s.is_multiple_of(cfg.eval_every) || s == cfg.steps {
            let v = trainer.evaluate(spec.val_windows)?;
            progress.eval(s, v);
        }
        if s.is_multiple_of(cfg.checkpoint_every) || s == last {
            save(&mut *trainer, dir, &mut saved_step)?;
        }
    }
    // A run stopped before its first step (--stop-at 0) still leaves a checkpoint to resume.
    if saved_step != Some(trainer.step_count()) {
        save(&mut *trainer, dir, &mut saved_step)?;
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
        "meta": meta,
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
