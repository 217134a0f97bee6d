//! `distill train`, `distill distill`, `distill eval` and `distill sample`: the trainer on text
//! data, with checkpoints in run directories that Llama-compatible tools can read.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use distill_kernels::data::batches::{val_windows, TokenStream};
use distill_kernels::data::corpus::{Corpus, Documents};
use distill_kernels::data::tokenizer::Tokenizer;
use distill_kernels::model::{Activations, KvCache, Llama, LlamaConfig};
use distill_kernels::train::checkpoint::load_config;
use distill_kernels::train::config::{parse_hidden_layers, preset, DistillConfig, TrainConfig};
use distill_kernels::train::device_step::LastLogits;
use distill_kernels::train::pretrained;
use distill_kernels::train::rundir;
use distill_kernels::train::session::{self, RunSpec, RunSummary};
use distill_kernels::train::student_init::{student_from_teacher, StudentInit};
use distill_kernels::train::teacher_cache::{self, TeacherCache};
use distill_kernels::train::trainer::{eval_loss, Teacher};
use distill_kernels::LossKind;

use super::progress::Display;
use super::rng::SplitMix64;
use super::{print_line, CliError, CliResult, KindArg};

/// The validation share of the data and the seed of the split: fixed, so that `eval` sees the
/// split `train` saw, whatever the training seed.
pub const VAL_FRACTION: f64 = 0.1;
pub const SPLIT_SEED: u64 = 0;

/// Options every training command shares.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Text data: a UTF-8 file or a directory of them (split into train and validation by file
    /// or document), or `synthetic[:SEED]` for the demo's embedded language
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// Where documents end (each gets the model's EOS): `file` (one file, one document: no EOS
    /// inside running prose), `blank-lines` (every paragraph is a document) or `separator:STR`
    #[arg(long, default_value = "file", value_name = "HOW")]
    pub documents: String,
    /// Run directory (checkpoint, metrics.json, loss.png)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Model size: tiny, small, or a Hugging Face config.json [default: tiny]
    #[arg(long)]
    pub config: Option<String>,
    /// Optimizer steps
    #[arg(long)]
    pub steps: Option<u64>,
    /// Seed of the initialization and of the order of training windows
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sequences per step
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence
    #[arg(long)]
    pub seq: Option<usize>,
    /// Peak learning rate
    #[arg(long)]
    pub lr: Option<f32>,
    /// Warm-up steps [default: 30, at most a tenth of --steps]
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Evaluate every N steps
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Checkpoint every N steps
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Continue the run in --out from its last checkpoint (same options)
    #[arg(long)]
    pub resume: bool,
    /// Replace the run in --out
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Stop after this many steps with a checkpoint, as an interruption would (the schedule
    /// still spans --steps); continue later with --resume
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Complete checkpoints kept in DIR/checkpoints (the newest replaces the oldest only once
    /// it is complete)
    #[arg(long, default_value_t = session::DEFAULT_KEEP_CHECKPOINTS)]
    pub keep_checkpoints: usize,
    /// With --resume: continue even if --data differs from the data the run was trained on
    #[arg(long, requires = "resume")]
    pub allow_data_change: bool,
    /// Where the training steps run: cpu, emulated (the CUDA kernels on the emulated GPU) or cuda
    /// (GPU 0); evaluation and checkpoints stay on the host
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage type of the weights and activations on emulated/cuda: f32, or bf16 (mixed
    /// precision: f32 master weights, gradients and optimizer state)
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Vocabulary size of the byte-level BPE tokenizer trained on the training split
    #[arg(long, default_value_t = 512)]
    pub vocab_size: usize,
}

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// The teacher's run directory (config.json, model.safetensors, tokenizer.json); repeat for
    /// an ensemble of teachers sharing one tokenizer
    #[arg(long, value_name = "DIR", required_unless_present = "teacher_cache")]
    pub teacher: Vec<PathBuf>,
    /// Distill from a teacher cache made by `distill cache-teacher` instead of a live teacher
    /// (top-k loss; the cache's tokenizer, windows and --seq); repeat for an ensemble
    #[arg(long, value_name = "DIR", conflicts_with = "teacher")]
    pub teacher_cache: Vec<PathBuf>,
    /// Weights of the teachers' soft losses, in the order given (normalized to sum to 1)
    /// [default: equal]
    #[arg(long, value_delimiter = ',')]
    pub teacher_weights: Vec<f32>,
    #[command(flatten)]
    pub run: RunArgs,
    /// Soft loss between teacher and student
    #[arg(long, value_enum, default_value_t = KindArg::ForwardKl)]
    pub kind: KindArg,
    /// JSD weight of the teacher, in (0, 1) [default: 0.5; only with --kind jsd]
    #[arg(long)]
    pub beta: Option<f32>,
    /// Softmax temperature of the soft loss [default: 1]
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Temperature at the last step (linear decay from --temperature)
    #[arg(long)]
    pub temperature_end: Option<f32>,
    /// Weight of the soft loss in [0, 1]; the hard-label cross-entropy gets 1 - alpha [default: 1]
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Do not multiply the soft loss by T^2
    #[arg(long)]
    pub no_t2_scale: bool,
    /// Weight of the hidden-state MSE between mapped layers
    #[arg(long, default_value_t = 0.0)]
    pub hidden_weight: f32,
    /// Student:teacher hidden-state pairs, HF output_hidden_states indices (e.g. 1:2,2:4)
    #[arg(long)]
    pub hidden_layers: Option<String>,
    /// The student's starting weights: `random` (the --config architecture) or the first
    /// teacher's own layers, `teacher-layers` (every second one), `teacher-layers:every=N` or
    /// `teacher-layers:I,J,...` (the teacher's width, embeddings, head and context; no --config)
    #[arg(long, default_value = "random", value_name = "HOW")]
    pub student_init: String,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run directory of the model
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Text data (its validation split is used unless --all)
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// Where documents end (each gets the model's EOS): `file` (one file, one document: no EOS
    /// inside running prose), `blank-lines` (every paragraph is a document) or `separator:STR`
    #[arg(long, default_value = "file", value_name = "HOW")]
    pub documents: String,
    /// Evaluate on all of the data, not only its validation split
    #[arg(long)]
    pub all: bool,
    /// Tokens per window [default: the model's max_position_embeddings, at most 512]
    #[arg(long)]
    pub seq: Option<usize>,
    /// Where the forward passes run: cpu, emulated or cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Run directory of the model
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Text to continue
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Sampling temperature (0: greedy)
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Seed of the sampler
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON line instead of the text: the prompt's token ids, the generated ids, their
    /// log-probabilities under the model (at temperature 1) and the text
    #[arg(long)]
    pub json: bool,
    /// On cpu: run the whole window for every new token instead of using the key/value cache
    /// (slower; the reference the cache is checked against)
    #[arg(long)]
    pub no_kv_cache: bool,
    /// Where the forward passes run: cpu, emulated or cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The training options: defaults, overridden by what the command line gives.
pub fn train_config(a: &RunArgs, distill: Option<DistillConfig>) -> TrainConfig {
    let d = TrainConfig::default();
    let steps = a.steps.unwrap_or(d.steps);
    TrainConfig {
        steps,
        seed: a.seed.unwrap_or(d.seed),
        batch: a.batch.unwrap_or(d.batch),
        seq: a.seq.unwrap_or(d.seq),
        lr: a.lr.unwrap_or(d.lr),
        // The default warm-up is at most a tenth of the run, so short runs reach their peak rate.
        warmup: a.warmup.unwrap_or(d.warmup.min(steps / 10)),
        eval_every: a.eval_every.unwrap_or(d.eval_every),
        checkpoint_every: a.checkpoint_every.unwrap_or(d.checkpoint_every),
        distill,
        ..d
    }
}

/// `tiny`, `small` or a config.json; the vocabulary is the tokenizer's and the context is at
/// least the training sequence.
fn model_config(name: &str, vocab: usize, seq: usize) -> CliResult<LlamaConfig> {
    if name.ends_with(".json") || Path::new(name).is_file() {
        let cfg = load_config(Path::new(name))?;
        if cfg.vocab_size != vocab {
            return Err(CliError::new(format!(
                "--config {name}: vocab_size {} differs from the tokenizer's {vocab}",
                cfg.vocab_size
            )));
        }
        return Ok(cfg);
    }
    Ok(preset(name, vocab, seq)?)
}

/// The corpus `--data` names: a text file or directory, or (when no such path exists)
/// `synthetic` / `synthetic:SEED` for the demo's embedded language with the demo's split (seed
/// 1 by default: the corpus `distill demo` trains on).
fn parse_documents(documents: &str) -> CliResult<Documents> {
    documents
        .parse()
        .map_err(|e| CliError::new(format!("--documents {e}")))
}

pub fn load_corpus(path: &Path, documents: &str) -> CliResult<Corpus> {
    let documents = parse_documents(documents)?;
    let text = path.to_string_lossy();
    if !path.exists() {
        if let Some(rest) = text.strip_prefix("synthetic") {
            let seed = match rest.strip_prefix(':') {
                Some(n) => n.parse::<u64>().map_err(|_| {
                    CliError::new(format!(
                        "--data {text}: expected synthetic:SEED with an integer seed"
                    ))
                })?,
                None if rest.is_empty() => 1,
                None => {
                    return Ok(Corpus::load_with(
                        path,
                        VAL_FRACTION,
                        SPLIT_SEED,
                        &documents,
                    )?)
                }
            };
            return Ok(Corpus::synthetic(
                seed,
                super::demo::DEMO_TRAIN_DOCS,
                super::demo::DEMO_VAL_DOCS,
            ));
        }
    }
    Ok(Corpus::load_with(
        path,
        VAL_FRACTION,
        SPLIT_SEED,
        &documents,
    )?)
}

/// The data's two splits, tokenized.
pub struct Prepared {
    pub train: TokenStream,
    pub val: Vec<(Vec<u32>, Vec<u32>)>,
    pub train_docs: usize,
    pub val_docs: usize,
}

pub fn prepare(corpus: &Corpus, tok: &Tokenizer, seq: usize) -> CliResult<Prepared> {
    let train = TokenStream::encode(&corpus.train, tok)?;
    let val_stream = TokenStream::encode(&corpus.val, tok)?;
    let val = val_windows(&val_stream, seq);
    if val.first().is_none_or(|w| w.0.len() != seq) {
        return Err(CliError::new(format!(
            "the validation split ({} documents, {} tokens) is shorter than one window of {seq} tokens plus its next-token target: give more data or a smaller --seq",
            corpus.val.len(),
            val_stream.tokens.len()
        )));
    }
    Ok(Prepared {
        train,
        val,
        train_docs: corpus.train.len(),
        val_docs: corpus.val.len(),
    })
}

fn print_summary(name: &str, out: &Path, s: &RunSummary) -> CliResult<()> {
    print_line(
        &json!({
            "run": name,
            "out": out.display().to_string(),
            "val_loss": s.val_loss,
            "val_ppl": s.val_ppl,
            "steps": s.steps,
            "train_tokens": s.train_tokens,
            "tokens_per_s": s.tokens_per_s,
            "params": s.params,
        })
        .to_string(),
    )
}

/// The newest complete checkpoint of the run in `out`, for what must be read before the run
/// starts (the tokenizer); the run itself picks it again under the lock.
fn resume_source(out: &Path) -> CliResult<PathBuf> {
    session::check_out_dir(out, true, false)?;
    let gens = rundir::resumable_generations(out)?;
    Ok(gens
        .first()
        .map(|g| g.path.clone())
        .unwrap_or_else(|| out.to_path_buf()))
}

/// What every training command checks before it loads anything.
fn check_run_args(r: &RunArgs) -> CliResult<()> {
    let steps = r.steps.unwrap_or(TrainConfig::default().steps);
    if let Some(w) = r.warmup.filter(|&w| w > steps) {
        return Err(CliError::new(format!(
            "--warmup {w} exceeds the {steps} steps of the run: the learning rate would never \
             reach --lr"
        )));
    }
    session::check_out_dir(&r.out, r.resume, r.force)?;
    Ok(())
}

pub fn run_train(a: &TrainArgs) -> CliResult<()> {
    let r = &a.run;
    let cfg = train_config(r, None);
    if is_inside(&r.out, &r.data) {
        return Err(CliError::new(format!(
            "--out {} is inside the data ({}): a run must not write there",
            r.out.display(),
            r.data.display()
        )));
    }
    check_run_args(r)?;
    let corpus = load_corpus(&r.data, &r.documents)?;
    // A resumed run keeps its tokenizer (training it again would give the same, but loading is
    // the check that the directory is what it claims).
    let tok = match r.resume {
        true => pretrained::load_tokenizer(&resume_source(&r.out)?)?.0,
        false => Tokenizer::train(&corpus.train, a.vocab_size)?,
    };
    let model = model_config(
        r.config.as_deref().unwrap_or("tiny"),
        tok.vocab_size(),
        cfg.seq,
    )?;
    let data = prepare(&corpus, &tok, cfg.seq)?;
    let summary = session::run(
        RunSpec {
            name: "train",
            out: &r.out,
            model,
            init_params: None,
            train: cfg,
            teachers: Vec::new(),
            teacher_caches: Vec::new(),
            tokenizer: &tok,
            train_stream: &data.train,
            val_windows: &data.val,
            resume: r.resume,
            force: r.force,
            stop_at: r.stop_at,
            meta: json!({ "data": r.data.display().to_string() }),
            keep_checkpoints: r.keep_checkpoints,
            data_fingerprint: Some(corpus.fingerprint()),
            allow_data_change: r.allow_data_change,
            device: r.device.parse().map_err(CliError::new)?,
            dtype: r.dtype.parse().map_err(CliError::new)?,
        },
        &mut Display::new(),
    )?;
    print_summary("train", &r.out, &summary)
}

/// Loads a teacher (a model directory or a GGUF file): its model and the tokenizer the student
/// must share.
pub fn load_teacher(path: &Path) -> CliResult<(Teacher, Tokenizer)> {
    let p = pretrained::load(path)?;
    let teacher = Teacher {
        model: p.model,
        params: p.params,
    };
    Ok((teacher, p.tokenizer))
}

pub fn loss_kind(kind: KindArg, beta: f32) -> LossKind {
    match kind {
        KindArg::ForwardKl => LossKind::ForwardKl,
        KindArg::ReverseKl => LossKind::ReverseKl,
        KindArg::Jsd => LossKind::Jsd { beta },
    }
}

pub fn distill_config(a: &DistillArgs) -> CliResult<DistillConfig> {
    let d = DistillConfig::default();
    let beta = match (a.kind, a.beta) {
        (KindArg::Jsd, beta) => beta.unwrap_or(0.5),
        (_, None) => 0.5,
        (other, Some(beta)) => {
            return Err(CliError::new(format!(
                "--beta {beta} is only used by --kind jsd, not --kind {}",
                other.name()
            )))
        }
    };
    let kind = loss_kind(a.kind, beta);
    let hidden_layers = match &a.hidden_layers {
        Some(text) => parse_hidden_layers(text)?,
        None => Vec::new(),
    };
    Ok(DistillConfig {
        kind,
        temperature: a.temperature.unwrap_or(d.temperature),
        temperature_end: a.temperature_end,
        alpha: a.alpha.unwrap_or(d.alpha),
        t2_scale: !a.no_t2_scale,
        hidden_weight: a.hidden_weight,
        hidden_layers,
        teacher_weights: a.teacher_weights.clone(),
    })
}

/// Whether two paths name the same existing directory (after resolving links and `..`).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Whether `out` is `other` or lies inside it (`out` need not exist yet: its nearest existing
/// ancestor is resolved and the rest appended).
fn is_inside(out: &Path, other: &Path) -> bool {
    let Ok(other) = other.canonicalize() else {
        return false;
    };
    let mut existing = out.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let full = rest.iter().rev().fold(c, |p: PathBuf, n| p.join(n));
            return full.starts_with(&other);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = if parent.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    parent.to_path_buf()
                };
            }
            _ => return false,
        }
    }
}

pub fn run_distill(a: &DistillArgs) -> CliResult<()> {
    let r = &a.run;
    let mut cfg = train_config(r, Some(distill_config(a)?));
    let sources: Vec<&PathBuf> = a.teacher.iter().chain(&a.teacher_cache).collect();
    if sources.is_empty() {
        return Err(CliError::new("give --teacher DIR or --teacher-cache DIR"));
    }
    if !a.teacher_weights.is_empty() && a.teacher_weights.len() != sources.len() {
        return Err(CliError::new(format!(
            "--teacher-weights has {} weights for {} teachers",
            a.teacher_weights.len(),
            sources.len()
        )));
    }
    for source in &sources {
        // Replacing a teacher's directory with the student (`--out` = `--teacher`, with
        // --force) would destroy the model being distilled.
        if same_dir(&r.out, source) {
            return Err(CliError::new(format!(
                "--out {} is the teacher's directory: the student would overwrite its teacher",
                r.out.display()
            )));
        }
        if is_inside(&r.out, source) || is_inside(&r.out, &r.data) {
            return Err(CliError::new(format!(
                "--out {} is inside the teacher's directory or the data: a run must not write \
                 there",
                r.out.display()
            )));
        }
    }
    check_run_args(r)?;
    let corpus = load_corpus(&r.data, &r.documents)?;
    let mut teachers = Vec::new();
    let mut caches = Vec::new();
    let mut tok: Option<(Tokenizer, &PathBuf)> = None;
    // Every teacher of an ensemble must speak the same tokenizer, byte for byte.
    for dir in &a.teacher {
        let (teacher, t) = load_teacher(dir)?;
        teachers.push(teacher);
        check_same_tokenizer(&mut tok, t, dir)?;
    }
    for dir in &a.teacher_cache {
        let (cache, t) = open_cache(dir, &corpus)?;
        match r.seq {
            None => cfg.seq = cache.manifest.seq,
            Some(seq) if seq != cache.manifest.seq => {
                return Err(CliError::new(format!(
                    "--seq {seq}: the teacher cache {} holds windows of {} tokens; train at \
                     that length or build a cache with --seq {seq}",
                    dir.display(),
                    cache.manifest.seq
                )))
            }
            Some(_) => {}
        }
        caches.push(cache);
        check_same_tokenizer(&mut tok, t, dir)?;
    }
    let tok = tok.expect("one teacher at least (checked above)").0;
    let init: StudentInit = a
        .student_init
        .parse()
        .map_err(|e| CliError::new(format!("--student-init {e}")))?;
    let (model, init_params) = match (&init, teachers.first()) {
        (StudentInit::Random, _) => {
            let name = r.config.as_deref().unwrap_or("tiny");
            (model_config(name, tok.vocab_size(), cfg.seq)?, None)
        }
        (_, None) => {
            return Err(CliError::new(format!(
                "--student-init {}: needs a live --teacher (a cache holds no weights)",
                a.student_init
            )))
        }
        (_, Some(t)) => {
            if let Some(c) = &r.config {
                return Err(CliError::new(format!(
                    "--config {c}: the student's architecture comes from the teacher with \
                     --student-init {}",
                    a.student_init
                )));
            }
            let layers = init
                .layers(t.model.config().num_hidden_layers)?
                .expect("not random");
            let (c, p) = student_from_teacher(&t.model, &t.params, &layers)?;
            (c, Some(p))
        }
    };
    let data = prepare(&corpus, &tok, cfg.seq)?;
    for c in &caches {
        let want = &c
            .manifest
            .split("train")
            .expect("open_cache checks")
            .tokens_hash;
        if &teacher_cache::hash_tokens(&data.train.tokens) != want {
            return Err(CliError::new(format!(
                "--teacher-cache {}: the training split tokenizes to other tokens than the \
                 cache was made from",
                c.dir.display()
            )));
        }
    }
    let summary = session::run(
        RunSpec {
            name: "distill",
            out: &r.out,
            model,
            init_params,
            train: cfg,
            teachers,
            teacher_caches: caches,
            tokenizer: &tok,
            train_stream: &data.train,
            val_windows: &data.val,
            resume: r.resume,
            force: r.force,
            stop_at: r.stop_at,
            meta: json!({
                "data": r.data.display().to_string(),
                "teacher": a.teacher.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "teacher_cache": a.teacher_cache.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            }),
            keep_checkpoints: r.keep_checkpoints,
            data_fingerprint: Some(corpus.fingerprint()),
            allow_data_change: r.allow_data_change,
            device: r.device.parse().map_err(CliError::new)?,
            dtype: r.dtype.parse().map_err(CliError::new)?,
        },
        &mut Display::new(),
    )?;
    print_summary("distill", &r.out, &summary)
}

/// Keeps the first teacher's tokenizer; a later teacher must have the same one.
fn check_same_tokenizer<'a>(
    first: &mut Option<(Tokenizer, &'a PathBuf)>,
    tok: Tokenizer,
    dir: &'a PathBuf,
) -> CliResult<()> {
    match first {
        None => *first = Some((tok, dir)),
        Some((t, first_dir)) => {
            if t.to_json()? != tok.to_json()? || t.specials() != tok.specials() {
                return Err(CliError::new(format!(
                    "teachers {} and {} have different tokenizers: an ensemble needs one",
                    first_dir.display(),
                    dir.display()
                )));
            }
        }
    }
    Ok(())
}

/// Opens a teacher cache for `corpus`: its manifest must name this data, and its tokenizer
/// must be the one it was made with.
fn open_cache(dir: &Path, corpus: &Corpus) -> CliResult<(TeacherCache, Tokenizer)> {
    let m = teacher_cache::read_manifest(dir)?;
    let fp = corpus.fingerprint();
    if m.data_fingerprint != fp {
        return Err(CliError::new(format!(
            "--teacher-cache {}: it was made from other data (fingerprint {}, --data has {fp}; a \
             cache made before --documents existed split files on blank lines: --documents \
             blank-lines)",
            dir.display(),
            m.data_fingerprint
        )));
    }
    let tok_path = dir.join(teacher_cache::TOKENIZER);
    let bytes = std::fs::read(&tok_path)
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", tok_path.display())))?;
    if teacher_cache::hash_bytes([&bytes[..]]) != m.tokenizer_hash {
        return Err(CliError::new(format!(
            "--teacher-cache {}: {} is not the tokenizer the cache was made with",
            dir.display(),
            tok_path.display()
        )));
    }
    let json = String::from_utf8(bytes)
        .map_err(|_| CliError::new(format!("{} is not UTF-8", tok_path.display())))?;
    let tok = Tokenizer::from_json(&json, m.specials.map(Into::into))
        .map_err(|e| CliError::new(format!("{}: {e}", tok_path.display())))?;
    if tok.vocab_size() != m.vocab {
        return Err(CliError::new(format!(
            "--teacher-cache {}: its tokenizer has {} tokens, the manifest says {}",
            dir.display(),
            tok.vocab_size(),
            m.vocab
        )));
    }
    if m.split("train").is_none() {
        return Err(CliError::new(format!(
            "--teacher-cache {}: it has no train split",
            dir.display()
        )));
    }
    Ok((TeacherCache::open(dir)?, tok))
}

pub fn run_eval(a: &EvalArgs) -> CliResult<()> {
    let pretrained::Pretrained {
        model,
        params,
        tokenizer: tok,
        ..
    } = pretrained::load(&a.model)?;
    let seq = a
        .seq
        .unwrap_or(model.config().max_position_embeddings.min(512));
    let docs = match a.all && a.data.exists() {
        true => Corpus::documents(&a.data, &parse_documents(&a.documents)?)?,
        false => {
            let corpus = load_corpus(&a.data, &a.documents)?;
            match a.all {
                true => corpus.train.into_iter().chain(corpus.val).collect(),
                false => corpus.val,
            }
        }
    };
    let stream = TokenStream::encode(&docs, &tok)?;
    let windows = val_windows(&stream, seq);
    // A split shorter than one window is evaluated as the one window it makes.
    let seq = windows.first().map_or(seq, |w| w.0.len());
    let picked: Vec<_> = windows.iter().collect();
    let batch = 8.min(picked.len().max(1));
    let device: distill_kernels::DeviceKind = a.device.parse().map_err(CliError::new)?;
    let loss = match device {
        distill_kernels::DeviceKind::Cpu => {
            let mut acts = Activations::evaluation(&model, batch, seq)?;
            eval_loss(&model, &params, &picked, &mut acts)?
        }
        distill_kernels::DeviceKind::Reference => {
            return Err(CliError::new(
                "--device reference: evaluation runs on cpu, emulated or cuda",
            ))
        }
        kind => {
            let dev = distill_kernels::cuda::CudaKernels::open_kind(kind)
                .map_err(|e| CliError::new(format!("--device {}: {e}", a.device)))?;
            distill_kernels::train::device_step::eval_loss_device(
                &dev, &model, &params, &picked, batch, seq,
            )?
        }
    };
    print_line(
        &json!({
            "model": a.model.display().to_string(),
            "val_loss": loss,
            "val_ppl": loss.exp(),
            "tokens": picked.len() * seq,
            "split": if a.all { "all" } else { "val" },
        })
        .to_string(),
    )
}

pub fn run_sample(a: &SampleArgs) -> CliResult<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        return Err(CliError::new(format!(
            "--temperature {}: must be a finite number >= 0",
            a.temperature
        )));
    }
    let pretrained::Pretrained {
        model,
        params,
        tokenizer: tok,
        ..
    } = pretrained::load(&a.model)?;
    let mut ids = tok.encode(&a.prompt)?;
    if ids.is_empty() {
        // An empty prompt starts a text: from BOS, or the EOS that ends the one before.
        ids.push(tok.bos_id().unwrap_or(tok.eos_id()));
    }
    let prompt_ids = ids.clone();
    let device: distill_kernels::DeviceKind = a.device.parse().map_err(CliError::new)?;
    let generated = match device {
        distill_kernels::DeviceKind::Cpu => {
            // A key/value cache: each token after the first pass costs one pass of the weights.
            // When the window slides past the context, the cache restarts from the new window.
            let ctx = model.config().max_position_embeddings;
            let mut cache = KvCache::new(&model, ids.len().saturating_add(a.tokens).clamp(1, ctx))?;
            let mut cached: Vec<u32> = Vec::new();
            let next = |window: &[u32]| -> CliResult<Vec<f32>> {
                if a.no_kv_cache {
                    let mut acts = Activations::inference(&model, 1, window.len())?;
                    let logits = model.forward(&params, window, &mut acts)?;
                    let v = model.config().vocab_size;
                    return Ok(logits[(window.len() - 1) * v..].to_vec());
                }
                // Reuse only when the window extends the cached tokens (a slid window that
                // happens to repeat them, as a looping greedy decode does, is not an extension).
                if window.len() <= cached.len() || !window.starts_with(&cached) {
                    cache.clear();
                    cached.clear();
                }
                let mut last = Vec::new();
                for &t in &window[cached.len()..] {
                    last = model.decode_step(&params, t, &mut cache)?.to_vec();
                    cached.push(t);
                }
                Ok(last)
            };
            generate(&model, next, &mut ids, a.tokens, a.temperature, a.seed)?
        }
        distill_kernels::DeviceKind::Reference => {
            return Err(CliError::new(
                "--device reference: sampling runs on cpu, emulated or cuda",
            ))
        }
        kind => {
            let dev = distill_kernels::cuda::CudaKernels::open_kind(kind)
                .map_err(|e| CliError::new(format!("--device {}: {e}", a.device)))?;
            let ctx = model.config().max_position_embeddings;
            let len = (ids.len() + a.tokens).min(ctx);
            let mut fwd = LastLogits::new(&dev, &model, &params, len)?;
            let next = |window: &[u32]| Ok(fwd.after(&dev, &model, window)?);
            generate(&model, next, &mut ids, a.tokens, a.temperature, a.seed)?
        }
    };
    let new_ids: Vec<u32> = generated.iter().map(|g| g.0).collect();
    let text = format!("{}{}", a.prompt, tok.decode(&new_ids)?);
    match a.json {
        true => print_line(
            &json!({
                "prompt_ids": prompt_ids,
                "ids": new_ids,
                "logprobs": generated.iter().map(|g| g.1).collect::<Vec<_>>(),
                "text": text,
            })
            .to_string(),
        ),
        false => print_line(&text),
    }
}

/// Appends `count` sampled tokens to `ids` and returns them with their log-probabilities at
/// temperature 1; `next_logits` gives the model's logits after the last token of a window (the
/// last `max_position_embeddings` tokens, recomputed for each token: no KV cache yet).
fn generate(
    model: &Llama,
    mut next_logits: impl FnMut(&[u32]) -> CliResult<Vec<f32>>,
    ids: &mut Vec<u32>,
    count: usize,
    temperature: f32,
    seed: u64,
) -> CliResult<Vec<(u32, f64)>> {
    let ctx = model.config().max_position_embeddings;
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let window = &ids[ids.len().saturating_sub(ctx)..];
        let last = next_logits(window)?;
        let token = pick_token(&last, temperature, &mut rng);
        ids.push(token);
        out.push((token, log_softmax_at(&last, token as usize)));
    }
    Ok(out)
}

fn log_softmax_at(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits[i] as f64 - max - sum.ln()
}

fn pick_token(logits: &[f32], temperature: f32, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0 as u32
    };
    if temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&x| (((x - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, w) in weights.iter().enumerate() {
        u -= w;
        if u < 0.0 {
            return i as u32;
        }
    }
    argmax()
}
