//! The offline teacher cache: the teacher run once over a tokenized corpus, its top-k
//! log-probabilities per position stored, and students trained from the store without the
//! teacher (`distill cache-teacher`, then `distill distill --teacher-cache`).
//!
//! # Format (a directory)
//! - `manifest.json`: [`CacheManifest`], written first; the teacher, tokenizer and data it was
//!   made from (hashes), k, the value dtype, the window length, and each split's windows and
//!   shard count.
//! - `tokenizer.json`: the teacher's tokenizer, which a student trained from the cache uses.
//! - `<split>-<index:05>.safetensors`, one per shard of at most `windows_per_shard` windows:
//!   `tokens` U32 `[w, seq + 1]` (window i of a split is tokens `i*seq ..= i*seq + seq` of its
//!   stream), `ids` U32 `[w * seq, k]` (descending probability), `values` F16 `[w * seq, k]`
//!   (the teacher's log-probabilities at T = 1 of those ids) and `tail` F32 `[w * seq, n]` (the
//!   tail bucket's logit `log sum_(u not in ids) p_u^(1/T)` at each of the manifest's
//!   `tail_temperatures`; at T = 1 the log of its mass on every other id), row `i*seq + t` being
//!   the teacher's prediction after token `t` of window `i`. No metadata, no timestamps: the same inputs give the same bytes.
//!
//! Values are f16 log-probabilities: their rounding error is at most `2^-11 |log p|`, so a
//! probability carries a relative error of `2^-11 |log p|` and an absolute one of at most
//! `2^-11 / e` (about 1.8e-4; the maximum of `p |log p|`). bf16 would be 8 times coarser for the
//! same 2 bytes; f32 would add 2 bytes per entry for precision the loss does not need.
//!
//! Resuming: each shard is written to a temporary file, synced, and renamed into place, so a
//! shard that exists is complete. A run killed at any moment (even `kill -9`) and started again
//! with the same inputs recomputes only the missing shards, and the cache is byte-identical to one
//! made in one go (the teacher's forward pass is deterministic).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::f16;
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::data::batches::TokenStream;
use crate::dtype::HostSlice;
use crate::model::Activations;
use crate::rng::SplitMix64;
use crate::semantics::{check_top_k, check_topk_ids, TopKTeacher};
use crate::topk::TopKRows;
use crate::train::error::{Result, TrainError as Error};
use crate::train::trainer::Teacher;

/// The manifest's file name in a cache directory.
pub const MANIFEST: &str = "manifest.json";
/// The tokenizer's file name in a cache directory.
pub const TOKENIZER: &str = "tokenizer.json";
/// The format version this build writes and reads.
pub const FORMAT: u32 = 1;
/// What the stored values are.
pub const VALUES: &str = "f16 log-probabilities at T = 1";

/// What a cache holds and what it was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheManifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The teacher as given on the command line (informational).
    pub teacher: String,
    /// `sha256:` of the teacher's config and f32 parameters.
    pub teacher_hash: String,
    /// `sha256:` of the tokenizer's JSON.
    pub tokenizer_hash: String,
    /// The teacher's special tokens (`tokenizer.json` alone does not say which is EOS); absent
    /// in caches made before they were recorded, which used `<|endoftext|>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specials: Option<CacheSpecials>,
    /// The corpus fingerprint ([`crate::data::corpus::Corpus::fingerprint`]).
    pub data_fingerprint: String,
    /// Vocabulary size of teacher and tokenizer.
    pub vocab: usize,
    /// Entries kept per position.
    pub k: usize,
    /// Tokens per window (the student's `--seq`).
    pub seq: usize,
    /// [`VALUES`].
    pub values: String,
    /// Ascending temperatures (1 among them) at which the tail's logit is stored; a student's
    /// temperatures must lie in their range (between them the logit is interpolated).
    pub tail_temperatures: Vec<f32>,
    /// Windows per shard (the last shard of a split may hold fewer).
    pub windows_per_shard: usize,
    /// The splits, in the order they are computed.
    pub splits: Vec<SplitManifest>,
}

/// The special tokens of a cache's tokenizer ([`crate::data::Specials`] as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSpecials {
    /// End of sequence.
    pub eos_token_id: u32,
    /// Beginning of sequence, if any.
    pub bos_token_id: Option<u32>,
    /// Whether BOS starts every document.
    pub add_bos_token: bool,
}

impl From<crate::data::Specials> for CacheSpecials {
    fn from(s: crate::data::Specials) -> Self {
        CacheSpecials {
            eos_token_id: s.eos,
            bos_token_id: s.bos,
            add_bos_token: s.add_bos,
        }
    }
}

impl From<CacheSpecials> for crate::data::Specials {
    fn from(s: CacheSpecials) -> Self {
        crate::data::Specials {
            eos: s.eos_token_id,
            bos: s.bos_token_id,
            add_bos: s.add_bos_token,
        }
    }
}

/// One split of the corpus in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitManifest {
    /// `train` or `val`.
    pub name: String,
    /// Tokens in the split's stream.
    pub tokens: usize,
    /// `sha256:` of the stream's token ids: the student's data must tokenize to exactly these.
    pub tokens_hash: String,
    /// Windows of `seq + 1` tokens: `(tokens - 1) / seq`.
    pub windows: usize,
    /// Shard files.
    pub shards: usize,
}

impl CacheManifest {
    /// Bytes of one cached position: k ids (4 B) and values (2 B), the tail at each of
    /// `temperatures` temperatures (4 B), and the window's tokens (4 B per position, about).
    pub fn bytes_per_position(k: usize, temperatures: usize) -> usize {
        6 * k + 4 * temperatures + 4
    }

    /// Bytes of the whole cache, about (shard headers left out).
    pub fn total_bytes(&self) -> u64 {
        let positions: u64 = self
            .splits
            .iter()
            .map(|s| (s.windows * self.seq) as u64)
            .sum();
        positions * Self::bytes_per_position(self.k, self.tail_temperatures.len()) as u64
    }

    /// The split named `name`.
    pub fn split(&self, name: &str) -> Option<&SplitManifest> {
        self.splits.iter().find(|s| s.name == name)
    }
}

/// Tail temperatures must be finite, > 0, strictly ascending, and include 1.
pub fn check_tail_temperatures(t: &[f32]) -> std::result::Result<(), String> {
    if t.iter().any(|x| !(x.is_finite() && *x > 0.0)) || t.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "tail temperatures {t:?} must be finite, > 0 and strictly ascending"
        ));
    }
    if !t.contains(&1.0) {
        return Err(format!("tail temperatures {t:?} must include 1"));
    }
    Ok(())
}

/// `sha256:<first 16 hex digits>` of `parts` in order.
pub fn hash_bytes<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The hash of a token stream (its ids as little-endian u32).
pub fn hash_tokens(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    hash_bytes([&bytes[..]])
}

/// Windows of `seq + 1` tokens a stream of `tokens` tokens holds.
pub fn windows_in(tokens: usize, seq: usize) -> usize {
    tokens.saturating_sub(1) / seq.max(1)
}

/// A split's manifest entry for `stream`.
pub fn split_manifest(name: &str, stream: &TokenStream, seq: usize, wps: usize) -> SplitManifest {
    let windows = windows_in(stream.tokens.len(), seq);
    SplitManifest {
        name: name.to_string(),
        tokens: stream.tokens.len(),
        tokens_hash: hash_tokens(&stream.tokens),
        windows,
        shards: windows.div_ceil(wps.max(1)),
    }
}

fn shard_name(split: &str, index: usize) -> String {
    format!("{split}-{index:05}.safetensors")
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn cache_err(dir: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Data(format!("teacher cache {}: {msg}", dir.display()))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename: `path` is complete or
/// absent, whenever the process dies.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all(); // the rename itself durable; best effort where unsupported
        }
    }
    Ok(())
}

/// Progress of a cache build: called after each shard with (positions done, positions total).
pub type CacheProgress<'a> = dyn FnMut(u64, u64) + 'a;

/// Builds (or completes) the cache in `dir` for `manifest`, running `teacher` over the windows of
/// `streams` (one per split of the manifest, in order). A directory that already holds a
/// manifest must hold this one (same teacher, tokenizer, data, k, seq and shards): its complete
/// shards are kept and only the missing ones computed. Returns the number of shards computed.
pub fn build(
    dir: &Path,
    manifest: &CacheManifest,
    tokenizer_json: &[u8],
    teacher: &Teacher,
    streams: &[&TokenStream],
    batch_windows: usize,
    progress: &mut CacheProgress,
) -> Result<usize> {
    check_top_k(manifest.k, manifest.vocab)?;
    check_tail_temperatures(&manifest.tail_temperatures).map_err(|e| cache_err(dir, e))?;
    if streams.len() != manifest.splits.len() {
        return Err(cache_err(dir, "one token stream per split is needed"));
    }
    if teacher.model.config().vocab_size != manifest.vocab {
        return Err(cache_err(
            dir,
            "the teacher's vocabulary differs from the manifest's",
        ));
    }
    let manifest_path = dir.join(MANIFEST);
    if manifest_path.exists() {
        let found = read_manifest(dir)?;
        if &found != manifest {
            return Err(cache_err(
                dir,
                format!(
                    "holds a cache made with other settings ({}); use another --out or remove it",
                    manifest_diff(&found, manifest)
                ),
            ));
        }
    } else {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let json = serde_json::to_string_pretty(manifest).expect("the manifest serializes");
        write_atomic(&dir.join(TOKENIZER), tokenizer_json)?;
        write_atomic(&manifest_path, json.as_bytes())?;
    }
    let (seq, k) = (manifest.seq, manifest.k);
    let total: u64 = manifest
        .splits
        .iter()
        .map(|s| (s.windows * seq) as u64)
        .sum();
    let mut done = 0u64;
    let mut computed = 0;
    let bw = batch_windows.clamp(1, manifest.windows_per_shard);
    let mut acts = Activations::inference(&teacher.model, bw, seq)?;
    for (split, stream) in manifest.splits.iter().zip(streams) {
        if hash_tokens(&stream.tokens) != split.tokens_hash {
            return Err(cache_err(
                dir,
                format!(
                    "the {} split's tokens differ from the manifest's",
                    split.name
                ),
            ));
        }
        for shard in 0..split.shards {
            let first = shard * manifest.windows_per_shard;
            let count = manifest.windows_per_shard.min(split.windows - first);
            let path = dir.join(shard_name(&split.name, shard));
            if !path.exists() {
                let bytes = compute_shard(
                    teacher,
                    &mut acts,
                    stream,
                    (first, count),
                    (seq, k),
                    &manifest.tail_temperatures,
                    bw,
                )?;
                write_atomic(&path, &bytes)?;
                computed += 1;
            }
            done += (count * seq) as u64;
            progress(done, total);
        }
    }
    // Temporary files of an interrupted run are rewritten before use; none is left behind.
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(computed)
}

/// One shard's bytes: the teacher over windows `first .. first + count`, `bw` windows per
/// forward pass (the last pass padded with repeats of the last window, whose rows are dropped).
#[allow(clippy::too_many_arguments)]
fn compute_shard(
    teacher: &Teacher,
    acts: &mut Activations<f32>,
    stream: &TokenStream,
    (first, count): (usize, usize),
    (seq, k): (usize, usize),
    temperatures: &[f32],
    bw: usize,
) -> Result<Vec<u8>> {
    let vocab = teacher.model.config().vocab_size;
    let nt = temperatures.len();
    let mut tokens = Vec::with_capacity(count * (seq + 1));
    let mut ids = Vec::with_capacity(count * seq * k);
    let mut vals = Vec::with_capacity(count * seq * k);
    let mut tails = Vec::with_capacity(count * seq * nt);
    let window = |w: usize| &stream.tokens[w * seq..w * seq + seq + 1];
    for start in (0..count).step_by(bw) {
        let n = bw.min(count - start);
        let mut inputs = Vec::with_capacity(bw * seq);
        for i in 0..bw {
            let w = first + start + i.min(n - 1);
            inputs.extend_from_slice(&window(w)[..seq]);
        }
        teacher.model.forward(&teacher.params, &inputs, acts)?;
        let logits = &acts.logits()[..n * seq * vocab];
        let top =
            TopKRows::from_logits_at(HostSlice::F32(logits), n * seq, vocab, k, temperatures)?;
        ids.extend_from_slice(&top.ids);
        vals.extend_from_slice(&top.values);
        for r in 0..n * seq {
            for &t in temperatures {
                tails.push(match top.tempered.iter().find(|(tt, _)| *tt == t) {
                    Some((_, tail)) => tail[r],
                    None => top.tail[r], // T = 1
                });
            }
        }
        for i in 0..n {
            tokens.extend_from_slice(window(first + start + i));
        }
    }
    let values: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
    let le = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (tok_b, ids_b) = (le(&tokens), le(&ids));
    let val_b: Vec<u8> = values
        .iter()
        .flat_map(|x| x.to_bits().to_le_bytes())
        .collect();
    let tail_b: Vec<u8> = tails.iter().flat_map(|x| x.to_le_bytes()).collect();
    let p = count * seq;
    fn view(dt: StDtype, shape: Vec<usize>, b: &[u8]) -> TensorView<'_> {
        TensorView::new(dt, shape, b).expect("shapes match the data")
    }
    let tensors = vec![
        ("ids", view(StDtype::U32, vec![p, k], &ids_b)),
        ("tail", view(StDtype::F32, vec![p, nt], &tail_b)),
        ("tokens", view(StDtype::U32, vec![count, seq + 1], &tok_b)),
        ("values", view(StDtype::F16, vec![p, k], &val_b)),
    ];
    safetensors::serialize(tensors, &None)
        .map_err(|e| Error::Data(format!("serializing a cache shard: {e}")))
}

/// Reads and parses `dir/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<CacheManifest> {
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let m: CacheManifest = serde_json::from_str(&text)
        .map_err(|e| cache_err(dir, format!("{MANIFEST} is not a cache manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(cache_err(
            dir,
            format!("format {} (this build reads {FORMAT})", m.format),
        ));
    }
    check_tail_temperatures(&m.tail_temperatures).map_err(|e| cache_err(dir, e))?;
    Ok(m)
}

/// The first differing fields of two manifests, named.
fn manifest_diff(a: &CacheManifest, b: &CacheManifest) -> String {
    let fields = [
        ("teacher_hash", a.teacher_hash != b.teacher_hash),
        ("tokenizer_hash", a.tokenizer_hash != b.tokenizer_hash),
        ("data_fingerprint", a.data_fingerprint != b.data_fingerprint),
        ("k", a.k != b.k),
        ("seq", a.seq != b.seq),
        (
            "windows_per_shard",
            a.windows_per_shard != b.windows_per_shard,
        ),
        (
            "tail_temperatures",
            a.tail_temperatures != b.tail_temperatures,
        ),
        ("splits", a.splits != b.splits),
        ("specials", a.specials != b.specials),
    ];
    let names: Vec<&str> = fields.iter().filter(|f| f.1).map(|f| f.0).collect();
    if names.is_empty() {
        "the teacher's path".into()
    } else {
        format!("{} differ", names.join(", "))
    }
}

/// One split of a loaded cache: every window's tokens and the teacher's top-k rows.
#[derive(Debug, Clone)]
pub struct CachedSplit {
    /// `[windows, seq + 1]` tokens.
    pub tokens: Vec<u32>,
    /// `[windows * seq, k]` ids.
    pub ids: Vec<u32>,
    /// `[windows * seq, k]` log-probabilities.
    pub values: Vec<f16>,
    /// `[windows * seq, tail temperatures]` the tail's logits.
    pub tail: Vec<f32>,
}

/// A training batch from the cache: `batch` windows and the teacher's rows for them.
#[derive(Debug, Clone)]
pub struct CachedBatch {
    /// `[batch * seq]` input tokens.
    pub inputs: Vec<u32>,
    /// `[batch * seq]` next-token targets.
    pub targets: Vec<u32>,
    /// `[batch * seq, k]` ids.
    pub ids: Vec<u32>,
    /// `[batch * seq, k]` log-probabilities.
    pub values: Vec<f16>,
    /// `[batch * seq, temperatures]` the tail's logits at the cache's tail temperatures.
    pub tails: Vec<f32>,
    /// The cache's tail temperatures.
    pub temperatures: Vec<f32>,
    /// Entries per row.
    pub k: usize,
}

impl CachedBatch {
    /// The tail bucket's logits at temperature `t` (see [`crate::topk::tail_at`]).
    pub fn tail_at(&self, t: f32) -> Result<Vec<f32>> {
        Ok(crate::topk::tail_at(&self.temperatures, &self.tails, t)?)
    }

    /// The batch's rows as the loss's teacher input, with `tail` from [`CachedBatch::tail_at`].
    pub fn teacher<'a>(&'a self, tail: &'a [f32]) -> TopKTeacher<'a> {
        TopKTeacher {
            k: self.k,
            ids: &self.ids,
            values: HostSlice::F16(&self.values),
            tail,
        }
    }
}

/// Salt of the cache's window order (apart from other uses of the seed).
const CACHE_BATCH_SALT: u64 = 0xcac4_e0b5_7e11_0001;

/// A cache loaded into memory, checked shard by shard.
#[derive(Debug, Clone)]
pub struct TeacherCache {
    /// What it holds.
    pub manifest: CacheManifest,
    /// Where it was read from.
    pub dir: PathBuf,
    splits: Vec<CachedSplit>,
}

impl TeacherCache {
    /// Loads every shard of `dir`, checking shapes and ids; a missing shard means an
    /// interrupted `cache-teacher`, which the error says how to finish.
    pub fn open(dir: &Path) -> Result<TeacherCache> {
        let manifest = read_manifest(dir)?;
        // Loaded whole: a cache larger than the memory available stops here, sizes named.
        let mut plan = crate::train::memory::MemoryPlan::new();
        plan.add(
            "the teacher cache",
            usize::try_from(manifest.total_bytes()).ok(),
            1,
        );
        plan.check(&format!("loading the teacher cache {}", dir.display()))?;
        let (seq, k) = (manifest.seq, manifest.k);
        check_top_k(k, manifest.vocab)?;
        let mut splits = Vec::new();
        for s in &manifest.splits {
            let mut out = CachedSplit {
                tokens: Vec::with_capacity(s.windows * (seq + 1)),
                ids: Vec::with_capacity(s.windows * seq * k),
                values: Vec::with_capacity(s.windows * seq * k),
                tail: Vec::with_capacity(s.windows * seq * manifest.tail_temperatures.len()),
            };
            for shard in 0..s.shards {
                let path = dir.join(shard_name(&s.name, shard));
                if !path.exists() {
                    return Err(cache_err(
                        dir,
                        format!(
                            "shard {} is missing: the cache is incomplete; run the same \
                             `distill cache-teacher` command again to finish it",
                            path.display()
                        ),
                    ));
                }
                let count = manifest
                    .windows_per_shard
                    .min(s.windows - shard * manifest.windows_per_shard);
                let dims = (seq, k, manifest.tail_temperatures.len());
                read_shard(&path, count, dims, manifest.vocab, &mut out)?;
            }
            splits.push(out);
        }
        Ok(TeacherCache {
            manifest,
            dir: dir.to_path_buf(),
            splits,
        })
    }

    /// The split named `name` (`train`, `val`).
    pub fn split(&self, name: &str) -> Option<&CachedSplit> {
        let i = self.manifest.splits.iter().position(|s| s.name == name)?;
        Some(&self.splits[i])
    }

    /// Step `step`'s training windows: `batch` of them drawn uniformly (with replacement) from
    /// `(seed, step)` alone, so a resumed run sees the same batches.
    pub fn train_windows(&self, seed: u64, step: u64, batch: usize) -> Result<Vec<usize>> {
        let windows = self.train_split()?.tokens.len() / (self.manifest.seq + 1);
        if windows == 0 {
            return Err(cache_err(&self.dir, "its train split has no window"));
        }
        let mut rng = SplitMix64::from_parts(&[CACHE_BATCH_SALT, seed, step]);
        Ok((0..batch)
            .map(|_| rng.below(windows as u64) as usize)
            .collect())
    }

    /// The batch of the given training windows (from [`TeacherCache::train_windows`]).
    pub fn train_batch(&self, windows: &[usize]) -> Result<CachedBatch> {
        let s = self.train_split()?;
        let (seq, k) = (self.manifest.seq, self.manifest.k);
        let batch = windows.len();
        let mut b = CachedBatch {
            inputs: Vec::with_capacity(batch * seq),
            targets: Vec::with_capacity(batch * seq),
            ids: Vec::with_capacity(batch * seq * k),
            values: Vec::with_capacity(batch * seq * k),
            tails: Vec::with_capacity(batch * seq * self.manifest.tail_temperatures.len()),
            temperatures: self.manifest.tail_temperatures.clone(),
            k,
        };
        for &w in windows {
            if (w + 1) * (seq + 1) > s.tokens.len() {
                return Err(cache_err(&self.dir, format!("has no training window {w}")));
            }
            let tok = &s.tokens[w * (seq + 1)..(w + 1) * (seq + 1)];
            b.inputs.extend_from_slice(&tok[..seq]);
            b.targets.extend_from_slice(&tok[1..]);
            let rows = w * seq..(w + 1) * seq;
            b.ids
                .extend_from_slice(&s.ids[rows.start * k..rows.end * k]);
            b.values
                .extend_from_slice(&s.values[rows.start * k..rows.end * k]);
            let nt = self.manifest.tail_temperatures.len();
            b.tails
                .extend_from_slice(&s.tail[rows.start * nt..rows.end * nt]);
        }
        Ok(b)
    }

    fn train_split(&self) -> Result<&CachedSplit> {
        self.split("train")
            .ok_or_else(|| cache_err(&self.dir, "has no train split"))
    }
}

fn read_shard(
    path: &Path,
    count: usize,
    (seq, k, nt): (usize, usize, usize),
    vocab: usize,
    out: &mut CachedSplit,
) -> Result<()> {
    let bytes = fs::read(path).map_err(|e| io_err(path, e))?;
    let bad = |msg: String| Error::Data(format!("teacher cache shard {}: {msg}", path.display()));
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let p = count * seq;
    let get = |name: &str, dt: StDtype, shape: Vec<usize>| -> Result<Vec<u8>> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("no tensor `{name}`")))?;
        if t.dtype() != dt || t.shape() != shape.as_slice() {
            return Err(bad(format!(
                "tensor `{name}` is {:?} {:?}, expected {dt:?} {shape:?}",
                t.dtype(),
                t.shape()
            )));
        }
        Ok(t.data().to_vec())
    };
    let u32s = |b: Vec<u8>| -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let tokens = u32s(get("tokens", StDtype::U32, vec![count, seq + 1])?);
    let ids = u32s(get("ids", StDtype::U32, vec![p, k])?);
    check_topk_ids(&ids, k, vocab).map_err(|e| bad(e.to_string()))?;
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(bad(format!(
            "token {t} is outside the vocabulary of {vocab}"
        )));
    }
    let values = get("values", StDtype::F16, vec![p, k])?;
    let tail = get("tail", StDtype::F32, vec![p, nt])?;
    out.tokens.extend(tokens);
    out.ids.extend(ids);
    out.values.extend(
        values
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))),
    );
    out.tail.extend(
        tail.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(())
}
