//! `distill cache-teacher`: the teacher run once over a corpus, its top-k log-probabilities per
//! position written to a cache directory (format: [`distill_kernels::train::teacher_cache`]),
//! resumable after an interruption. Students train from it with `distill distill
//! --teacher-cache`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use distill_kernels::data::batches::TokenStream;
use distill_kernels::train::config::TrainConfig;
use distill_kernels::train::teacher_cache::{self, CacheManifest};

use super::train::{load_corpus, load_teacher};
use super::{print_line, CliError, CliResult};
use distill_kernels::train::trainer::Teacher;

#[derive(Debug, Args)]
pub struct CacheTeacherArgs {
    /// The teacher: a model directory (config.json, safetensors, tokenizer.json) or a GGUF file
    #[arg(long, value_name = "PATH")]
    pub teacher: PathBuf,
    /// Text data, split into train and validation as the training commands split it
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// Where documents end (each gets the model's EOS): `file` (one file, one document: no EOS
    /// inside running prose), `blank-lines` (every paragraph is a document) or `separator:STR`
    #[arg(long, default_value = "file", value_name = "HOW")]
    pub documents: String,
    /// The cache directory (created; an interrupted cache there is completed)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Entries kept per position (1..=1024, below the vocabulary size)
    #[arg(long)]
    pub top_k: usize,
    /// Tokens per window: the --seq of the students trained from the cache [default: the
    /// training default]
    #[arg(long)]
    pub seq: Option<usize>,
    /// Largest shard file, in MiB (a shard holds whole windows)
    #[arg(long, default_value_t = 64)]
    pub shard_mib: usize,
    /// Temperatures at which the tail bucket's logit is stored (1 is always added): a student
    /// distills at temperatures in their range, exactly at these and interpolated between
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub tail_temperatures: Vec<f32>,
    /// Windows per shard, instead of what --shard-mib allows
    #[arg(long)]
    pub windows_per_shard: Option<usize>,
    /// Windows per teacher forward pass
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

/// `sha256:` of the teacher's config (its JSON) and its f32 parameters: the same for a model
/// however it is stored.
fn teacher_hash(teacher: &Teacher) -> String {
    let cfg = distill_kernels::train::hf_config::config_to_json(
        teacher.model.config(),
        &Default::default(),
    )
    .to_string();
    let params: &[u8] = bytemuck::cast_slice(&teacher.params);
    teacher_cache::hash_bytes([cfg.as_bytes(), params])
}

pub fn run(a: &CacheTeacherArgs) -> CliResult<()> {
    let started = Instant::now();
    let seq = a.seq.unwrap_or(TrainConfig::default().seq);
    if seq == 0 || a.batch == 0 || a.shard_mib == 0 {
        return Err(CliError::new(
            "--seq, --batch and --shard-mib must be at least 1",
        ));
    }
    let (teacher, tok) = load_teacher(&a.teacher)?;
    let vocab = tok.vocab_size();
    distill_kernels::semantics::check_top_k(a.top_k, vocab)
        .map_err(|e| CliError::new(format!("--top-k {}: {e}", a.top_k)))?;
    if seq > teacher.model.config().max_position_embeddings {
        return Err(CliError::new(format!(
            "--seq {seq} exceeds the teacher's max_position_embeddings {}",
            teacher.model.config().max_position_embeddings
        )));
    }
    let mut temps = a.tail_temperatures.clone();
    temps.push(1.0);
    temps.sort_by(|x, y| x.total_cmp(y));
    temps.dedup();
    teacher_cache::check_tail_temperatures(&temps)
        .map_err(|e| CliError::new(format!("--tail-temperatures: {e}")))?;
    let tokenizer_json = tok.to_json()?.into_bytes();
    let corpus = load_corpus(&a.data, &a.documents)?;
    let train = TokenStream::encode(&corpus.train, &tok)?;
    let val = TokenStream::encode(&corpus.val, &tok)?;
    let wps = match a.windows_per_shard {
        Some(0) => return Err(CliError::new("--windows-per-shard must be at least 1")),
        Some(w) => w,
        None => {
            let per_window = seq * CacheManifest::bytes_per_position(a.top_k, temps.len());
            ((a.shard_mib << 20) / per_window).max(1)
        }
    };
    let manifest = CacheManifest {
        format: teacher_cache::FORMAT,
        teacher: a.teacher.display().to_string(),
        teacher_hash: teacher_hash(&teacher),
        tokenizer_hash: teacher_cache::hash_bytes([&tokenizer_json[..]]),
        specials: Some(tok.specials().into()),
        data_fingerprint: corpus.fingerprint(),
        vocab,
        k: a.top_k,
        seq,
        values: teacher_cache::VALUES.into(),
        tail_temperatures: temps.clone(),
        windows_per_shard: wps,
        splits: vec![
            teacher_cache::split_manifest("train", &train, seq, wps),
            teacher_cache::split_manifest("val", &val, seq, wps),
        ],
    };
    if manifest.splits[0].windows == 0 {
        return Err(CliError::new(format!(
            "the training split has {} tokens, fewer than one window of --seq {seq} plus its \
             next-token target",
            train.tokens.len()
        )));
    }
    let positions: u64 = manifest
        .splits
        .iter()
        .map(|s| (s.windows * seq) as u64)
        .sum();
    let shards: usize = manifest.splits.iter().map(|s| s.shards).sum();
    eprintln!(
        "cache-teacher: k {} at seq {seq}: {} train + {} val windows, {positions} positions, \
         about {:.1} MiB in {shards} shards of at most {wps} windows ({} B per position)",
        a.top_k,
        manifest.splits[0].windows,
        manifest.splits[1].windows,
        manifest.total_bytes() as f64 / (1u64 << 20) as f64,
        CacheManifest::bytes_per_position(a.top_k, temps.len()),
    );

    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(positions);
        let style = ProgressStyle::with_template(
            "cache-teacher [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar
    });
    let mut last_line = Instant::now();
    let t0 = Instant::now();
    let mut progress = |done: u64, total: u64| match &bar {
        Some(b) => b.set_position(done),
        None if last_line.elapsed().as_secs_f64() >= 5.0 || done == total => {
            last_line = Instant::now();
            let rate = done as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            eprintln!("cache-teacher: {done}/{total} tokens, {rate:.0} tokens/s");
        }
        None => {}
    };
    let streams = [&train, &val];
    let computed = teacher_cache::build(
        &a.out,
        &manifest,
        &tokenizer_json,
        &teacher,
        &streams,
        a.batch,
        &mut progress,
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let seconds = t0.elapsed().as_secs_f64();
    let bytes: u64 = std::fs::read_dir(&a.out)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    print_line(
        &json!({
            "command": "cache-teacher",
            "out": a.out.display().to_string(),
            "k": a.top_k,
            "seq": seq,
            "positions": positions,
            "shards": shards,
            "shards_computed": computed,
            "bytes": bytes,
            "bytes_per_position": bytes as f64 / positions as f64,
            "tokens_per_s": positions as f64 / seconds.max(1e-9),
            "seconds": started.elapsed().as_secs_f64(),
        })
        .to_string(),
    )
}
