//! Checkpoint directories in the layout Hugging Face `transformers` and other Llama tools read:
//!
//! | file | content |
//! |------|---------|
//! | `config.json` | HF `LlamaConfig` JSON ([`save_config`], [`load_config`]) |
//! | `model.safetensors` | f32 weights under HF names and shapes, `__metadata__` `{"format": "pt", "step": "N"}` |
//! | `tokenizer.json` | the tokenizer, bytes copied in by the caller ([`write_atomic`]) |
//! | `trainer_state.safetensors` | ours, for resuming: AdamW moments `adam.m`, `adam.v`, extra f32 tensors, `__metadata__` `{"format": "distill-trainer-state", "version": "1", "step": "N", "extra": [names], "meta": JSON}` |
//!
//! **Atomicity and ordering.** Every file is written as `.NAME.PID.tmp` in the same directory,
//! fsynced, renamed over `NAME`, and then the directory is fsynced ([`crate::train::files`]), so each rename is durable
//! before the next file is started. [`save_checkpoint`] writes `config.json`, `tokenizer.json`,
//! `model.safetensors` and `trainer_state.safetensors` in that order. After a crash at any point
//! every file is either its old or its new version, and a new trainer state implies new weights:
//! the state never loads as newer than the weights. The reverse (new weights, old state) is
//! possible, so the step is stored in both files and [`load_resume`] refuses to pair them when
//! they disagree. A training run never relies on this alone: it saves each checkpoint into a
//! fresh generation directory made current by one rename ([`crate::train::rundir`]).

use crate::model::{Llama, LlamaConfig, ParamLayout};
use crate::train::error::{describe_safetensors, Result, TrainError as Error};
pub use crate::train::files::write_atomic;
use crate::train::files::{commit_atomic, parent_dir, sync_dir, write_synced};
pub use crate::train::hf_config::{config_from_json, config_to_json, ConfigExtras};
use crate::train::memory;
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors, View};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// The model's Hugging Face `config.json` in a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The f32 weights of a single-file (unsharded) checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The tokenizer's Hugging Face `tokenizer.json`.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The tokenizer's special tokens, as HF's `tokenizer_config.json`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The special-token ids `generate` uses, as HF's `generation_config.json`.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// The resume state (optimizer moments, extra tensors, trainer JSON); absent from an export.
pub const TRAINER_STATE_FILE: &str = "trainer_state.safetensors";

const STATE_FORMAT: &str = "distill-trainer-state";
const STATE_VERSION: &str = "1";
const ADAM_M: &str = "adam.m";
const ADAM_V: &str = "adam.v";

/// Elements converted per parallel work item when decoding tensors.
const CHUNK: usize = 1 << 16;

fn shown(path: &Path) -> String {
    path.display().to_string()
}

fn ckpt_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: shown(path),
        message: message.into(),
    }
}

fn shape_str(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

// ---------------------------------------------------------------------------------------------
// Files

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Io {
        path: shown(path),
        message: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// config.json

/// Writes `config.json` (atomically).
pub fn save_config(path: &Path, cfg: &LlamaConfig, extras: &ConfigExtras) -> Result<()> {
    let mut text = serde_json::to_string_pretty(&config_to_json(cfg, extras))
        .map_err(|e| ckpt_err(path, e.to_string()))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Reads an HF `config.json` (see [`config_from_json`]); errors name the file and the field.
pub fn load_config(path: &Path) -> Result<LlamaConfig> {
    let bytes = read_file(path)?;
    let text =
        std::str::from_utf8(&bytes).map_err(|e| ckpt_err(path, format!("not UTF-8: {e}")))?;
    config_from_json(text).map_err(|e| match e {
        Error::Checkpoint { message, .. } => ckpt_err(path, message),
        other => ckpt_err(path, other.to_string()),
    })
}

// ---------------------------------------------------------------------------------------------
// safetensors helpers

/// An f32 tensor to be written; bytes are produced one tensor at a time while writing, so a
/// save needs memory for one tensor, not a second copy of the model.
struct F32Out<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl View for &F32Out<'_> {
    fn dtype(&self) -> StDtype {
        StDtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut bytes = vec![0u8; self.data.len() * 4];
        bytes
            .par_chunks_mut(CHUNK * 4)
            .zip(self.data.par_chunks(CHUNK))
            .for_each(|(b, x)| {
                for (dst, v) in b.chunks_exact_mut(4).zip(x) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
            });
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

fn save_safetensors(
    path: &Path,
    tensors: &[(String, F32Out<'_>)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let canonical = canonical_metadata(&metadata);
    let metadata = Some(metadata);
    commit_atomic(path, |tmp| {
        let views = tensors.iter().map(|(n, t)| (n.as_str(), t));
        let mut bytes =
            safetensors::serialize(views, &metadata).map_err(|e| describe_safetensors(&e))?;
        sort_metadata_keys(&mut bytes, &canonical)?;
        write_synced(tmp, &bytes).map_err(|e| e.to_string())
    })
}

/// The `__metadata__` object with its keys sorted.
fn canonical_metadata(metadata: &HashMap<String, String>) -> String {
    let sorted: std::collections::BTreeMap<&String, &String> = metadata.iter().collect();
    let fields: Vec<String> = sorted
        .iter()
        .map(|(k, v)| {
            let k = serde_json::to_string(k).expect("a string serializes");
            let v = serde_json::to_string(v).expect("a string serializes");
            format!("{k}:{v}")
        })
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// safetensors writes `__metadata__` first, in the order of a `HashMap`, which differs between
/// processes; the same checkpoint must give the same bytes (a resumed run is compared with a
/// straight one byte for byte). The sorted object has the same length, so it is swapped in place.
fn sort_metadata_keys(bytes: &mut [u8], canonical: &str) -> std::result::Result<(), String> {
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let start = 8 + PREFIX.len();
    let end = start + canonical.len();
    let unexpected = || "unexpected safetensors header layout".to_string();
    if bytes.len() < end || &bytes[8..start] != PREFIX {
        return Err(unexpected());
    }
    let original: HashMap<String, String> =
        serde_json::from_slice(&bytes[start..end]).map_err(|_| unexpected())?;
    let sorted: HashMap<String, String> =
        serde_json::from_str(canonical).map_err(|_| unexpected())?;
    if original != sorted {
        return Err(unexpected());
    }
    bytes[start..end].copy_from_slice(canonical.as_bytes());
    Ok(())
}

/// A parsed safetensors file: the tensor table and the `__metadata__` strings.
fn parse_safetensors<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<(SafeTensors<'a>, HashMap<String, String>)> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| ckpt_err(path, describe_safetensors(&e)))?;
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| ckpt_err(path, describe_safetensors(&e)))?;
    Ok((st, meta.metadata().clone().unwrap_or_default()))
}

/// Decodes a float tensor into `dst` (same element count, checked by the caller), converting
/// F16/BF16 to f32; non-finite values are rejected since no trained weight is NaN or infinite.
fn decode_into(
    view: &TensorView<'_>,
    dst: &mut [f32],
    allow: &[StDtype],
) -> std::result::Result<(), String> {
    let src = view.data();
    let dtype = view.dtype();
    if !allow.contains(&dtype) {
        let names: Vec<String> = allow.iter().map(|d| format!("{d:?}")).collect();
        return Err(format!(
            "has dtype {dtype:?}, expected {}",
            names.join(" or ")
        ));
    }
    let width = dtype.size();
    let convert = |b: &[u8]| -> f32 {
        match dtype {
            StDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StDtype::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            _ => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        }
    };
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK * width))
        .for_each(|(d, s)| {
            for (x, b) in d.iter_mut().zip(s.chunks_exact(width)) {
                *x = convert(b);
            }
        });
    if let Some(i) = dst.par_iter().position_first(|x| !x.is_finite()) {
        return Err(format!(
            "contains a non-finite value ({}) at element {i}",
            dst[i]
        ));
    }
    Ok(())
}

fn parse_step(path: &Path, meta: &HashMap<String, String>) -> Result<Option<u64>> {
    meta.get("step")
        .map(|s| {
            s.parse::<u64>().map_err(|_| {
                ckpt_err(
                    path,
                    format!("metadata `step` = \"{s}\" is not a non-negative integer"),
                )
            })
        })
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// model.safetensors

/// Writes the weights as f32 tensors under HF names and shapes (with tied embeddings only
/// `model.embed_tokens.weight`, as HF does), `__metadata__` `{"format": "pt", "step": "N"}`
/// (`format` is what `transformers` checks before loading).
pub fn save_weights(path: &Path, model: &Llama, params: &[f32], step: u64) -> Result<()> {
    if params.len() != model.num_params() {
        return Err(Error::ShapeMismatch {
            tensor: "params",
            expected: model.num_params(),
            actual: params.len(),
            shape: "the model's parameter count".into(),
        });
    }
    let tensors: Vec<(String, F32Out<'_>)> = model
        .layout()
        .tensors()
        .iter()
        .map(|t| {
            let out = F32Out {
                shape: t.shape.clone(),
                data: t.span.of(params),
            };
            (t.name.clone(), out)
        })
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    save_safetensors(path, &tensors, metadata)
}

/// Fills the tensors of `layout` found in `st` into `params`, marking them in `found`; extra
/// tensors are checked by [`check_extra`].
fn fill_params(
    path: &Path,
    st: &SafeTensors<'_>,
    layout: &ParamLayout,
    params: &mut [f32],
    found: &mut [bool],
) -> Result<()> {
    for (k, t) in layout.tensors().iter().enumerate() {
        let Ok(view) = st.tensor(&t.name) else {
            continue;
        };
        if view.shape() != t.shape.as_slice() {
            return Err(ckpt_err(
                path,
                format!(
                    "tensor `{}` has shape {}, expected {}",
                    t.name,
                    shape_str(view.shape()),
                    shape_str(&t.shape)
                ),
            ));
        }
        let allow = [StDtype::F32, StDtype::F16, StDtype::BF16];
        decode_into(&view, t.span.of_mut(params), &allow)
            .map_err(|m| ckpt_err(path, format!("tensor `{}` {m}", t.name)))?;
        found[k] = true;
    }
    Ok(())
}

/// Tensors a Llama file may hold besides the layout's: HF's non-persistent RoPE buffer, and
/// `lm_head.weight` next to tied embeddings (HF ignores it then). Anything else under `model.`
/// means the file and the configuration disagree (other depth, biases): an error rather than
/// weights silently dropped. Names outside `model.` and `lm_head.` are left to their owners.
fn check_extra(path: &Path, st: &SafeTensors<'_>, layout: &ParamLayout) -> Result<()> {
    for name in st.names() {
        if layout.get(name).is_some() || name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if name.starts_with("model.") || name.starts_with("lm_head.") {
            return Err(ckpt_err(
                path,
                format!(
                    "unexpected tensor `{name}`: not part of the model config.json describes \
                     (another layer count, biases, or a different architecture?)"
                ),
            ));
        }
    }
    Ok(())
}

fn missing_error(path: &Path, layout: &ParamLayout, found: &[bool]) -> Result<()> {
    if let Some(k) = found.iter().position(|f| !f) {
        let t = &layout.tensors()[k];
        let hint = if t.name == "lm_head.weight" {
            " (config.json has tie_word_embeddings = false, so the file must hold lm_head.weight)"
        } else {
            ""
        };
        return Err(ckpt_err(
            path,
            format!(
                "missing tensor `{}` of shape {}{hint}",
                t.name,
                shape_str(&t.shape)
            ),
        ));
    }
    Ok(())
}

/// Reads weights into one flat f32 buffer of `model`'s layout, mapping tensors by HF name and
/// converting F16/BF16. Returns the `step` of `__metadata__` when present. Every problem
/// (missing, misshapen, wrong dtype, non-finite, unexpected tensor, truncated or corrupt file)
/// is an [`Error::Checkpoint`] naming the file and the tensor.
pub fn load_weights(path: &Path, model: &Llama) -> Result<(Vec<f32>, Option<u64>)> {
    let bytes = read_file(path)?;
    let (st, meta) = parse_safetensors(path, &bytes)?;
    let layout = model.layout();
    let mut params = memory::filled(model.num_params(), 0.0f32, "the model's parameters")?;
    let mut found = vec![false; layout.tensors().len()];
    fill_params(path, &st, layout, &mut params, &mut found)?;
    check_extra(path, &st, layout)?;
    missing_error(path, layout, &found)?;
    Ok((params, parse_step(path, &meta)?))
}

/// Reads a sharded checkpoint through its `model.safetensors.index.json` (`weight_map`: tensor
/// name to shard file).
fn load_sharded_weights(index_path: &Path, model: &Llama) -> Result<Vec<f32>> {
    let bytes = read_file(index_path)?;
    let index: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ckpt_err(index_path, format!("invalid JSON: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ckpt_err(index_path, "no `weight_map` object"))?;
    let mut shards: Vec<&str> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| ckpt_err(index_path, format!("`weight_map.{name}` is not a string")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(ckpt_err(
                index_path,
                format!("`weight_map.{name}` = \"{file}\" is not a file name in this directory"),
            ));
        }
        if !shards.contains(&file) {
            shards.push(file);
        }
    }
    let dir = parent_dir(index_path);
    let layout = model.layout();
    let mut params = memory::filled(model.num_params(), 0.0f32, "the model's parameters")?;
    let mut found = vec![false; layout.tensors().len()];
    for shard in shards {
        let path = dir.join(shard);
        let bytes = read_file(&path)?;
        let (st, _) = parse_safetensors(&path, &bytes)?;
        fill_params(&path, &st, layout, &mut params, &mut found)?;
        check_extra(&path, &st, layout)?;
    }
    missing_error(index_path, layout, &found)?;
    Ok(params)
}

/// Loads `config.json` and the weights of a checkpoint directory: `model.safetensors`, or the
/// shards listed in `model.safetensors.index.json` when there is no single file.
pub fn load_model_dir(dir: &Path) -> Result<(Llama, Vec<f32>)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let cfg = load_config(&cfg_path)?;
    let model = Llama::new(cfg).map_err(|e| ckpt_err(&cfg_path, e.to_string()))?;
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join("model.safetensors.index.json");
    let params = if !single.exists() && index.exists() {
        load_sharded_weights(&index, &model)?
    } else {
        load_weights(&single, &model)?.0
    };
    Ok((model, params))
}

// ---------------------------------------------------------------------------------------------
// trainer_state.safetensors

/// What resuming needs beyond the weights. `adam_m`/`adam_v` are the optimizer's flat moments
/// (they may be longer than the model's parameters when the trainer optimizes extra tensors in
/// the same buffer); `extra` holds named f32 tensors `(name, shape, values)` such as a
/// distillation projection; `meta` is the trainer's own JSON (data position, RNG, options).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerState {
    /// Updates done; must equal the `step` stored with the weights for [`load_resume`] to pair
    /// them.
    pub step: u64,
    /// AdamW first moments, one per optimized scalar.
    pub adam_m: Vec<f32>,
    /// AdamW second moments; same length as `adam_m`.
    pub adam_v: Vec<f32>,
    /// Named f32 tensors `(name, shape, values)` beyond the moments; names unique and not
    /// `adam.m`/`adam.v`.
    pub extra: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// The trainer's own JSON, stored as metadata; [`Trainer`](crate::train::trainer::Trainer)
    /// keeps its options, loss history and run description there.
    pub meta: Value,
}

/// Writes the trainer state (atomically). Extra tensor names must be unique, must not be
/// `adam.m`/`adam.v`, and their shapes must match their lengths.
pub fn save_trainer_state(path: &Path, st: &TrainerState) -> Result<()> {
    if st.adam_m.len() != st.adam_v.len() {
        return Err(ckpt_err(
            path,
            format!(
                "adam_m has {} elements but adam_v has {}",
                st.adam_m.len(),
                st.adam_v.len()
            ),
        ));
    }
    let mut tensors = vec![
        (
            ADAM_M.to_string(),
            F32Out {
                shape: vec![st.adam_m.len()],
                data: &st.adam_m,
            },
        ),
        (
            ADAM_V.to_string(),
            F32Out {
                shape: vec![st.adam_v.len()],
                data: &st.adam_v,
            },
        ),
    ];
    let mut names = Vec::new();
    for (name, shape, data) in &st.extra {
        if name.is_empty() || name == "__metadata__" || tensors.iter().any(|(n, _)| n == name) {
            return Err(ckpt_err(
                path,
                format!("extra tensor name `{name}` is empty, reserved or used twice"),
            ));
        }
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(data.len()) {
            return Err(ckpt_err(
                path,
                format!(
                    "extra tensor `{name}` has {} elements, which does not match its shape {}",
                    data.len(),
                    shape_str(shape)
                ),
            ));
        }
        names.push(name.clone());
        tensors.push((
            name.clone(),
            F32Out {
                shape: shape.clone(),
                data,
            },
        ));
    }
    let metadata = HashMap::from([
        ("format".to_string(), STATE_FORMAT.to_string()),
        ("version".to_string(), STATE_VERSION.to_string()),
        ("step".to_string(), st.step.to_string()),
        ("extra".to_string(), Value::from(names).to_string()),
        ("meta".to_string(), st.meta.to_string()),
    ]);
    save_safetensors(path, &tensors, metadata)
}

/// Reads a trainer state written by [`save_trainer_state`]; every problem names the file and
/// the tensor or metadata key.
pub fn load_trainer_state(path: &Path) -> Result<TrainerState> {
    let bytes = read_file(path)?;
    let (st, meta) = parse_safetensors(path, &bytes)?;
    let key = |k: &str| {
        meta.get(k).ok_or_else(|| {
            ckpt_err(
                path,
                format!("metadata key `{k}` is missing (not a trainer state file?)"),
            )
        })
    };
    let format = key("format")?;
    if format != STATE_FORMAT {
        return Err(ckpt_err(
            path,
            format!("metadata `format` = \"{format}\", expected \"{STATE_FORMAT}\""),
        ));
    }
    let version = key("version")?;
    if version != STATE_VERSION {
        return Err(ckpt_err(
            path,
            format!(
                "metadata `version` = \"{version}\" is not supported (expected {STATE_VERSION})"
            ),
        ));
    }
    let step =
        parse_step(path, &meta)?.ok_or_else(|| ckpt_err(path, "metadata key `step` is missing"))?;
    let meta_json: Value = serde_json::from_str(key("meta")?)
        .map_err(|e| ckpt_err(path, format!("metadata `meta` is not JSON: {e}")))?;
    let names: Vec<String> = serde_json::from_str(key("extra")?).map_err(|e| {
        ckpt_err(
            path,
            format!("metadata `extra` is not a JSON list of names: {e}"),
        )
    })?;

    let read = |name: &str, rank1: bool| -> Result<(Vec<usize>, Vec<f32>)> {
        let view = st
            .tensor(name)
            .map_err(|_| ckpt_err(path, format!("missing tensor `{name}`")))?;
        let shape = view.shape().to_vec();
        if rank1 && shape.len() != 1 {
            return Err(ckpt_err(
                path,
                format!(
                    "tensor `{name}` has shape {}, expected rank 1",
                    shape_str(&shape)
                ),
            ));
        }
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let count = count
            .ok_or_else(|| ckpt_err(path, format!("tensor `{name}` has an overflowing shape")))?;
        let mut data = memory::filled(count, 0.0f32, "a trainer state tensor")?;
        decode_into(&view, &mut data, &[StDtype::F32])
            .map_err(|m| ckpt_err(path, format!("tensor `{name}` {m}")))?;
        Ok((shape, data))
    };
    let (_, adam_m) = read(ADAM_M, true)?;
    let (_, adam_v) = read(ADAM_V, true)?;
    if adam_m.len() != adam_v.len() {
        return Err(ckpt_err(
            path,
            format!(
                "tensor `{ADAM_V}` has {} elements but `{ADAM_M}` has {}",
                adam_v.len(),
                adam_m.len()
            ),
        ));
    }
    let mut extra = Vec::with_capacity(names.len());
    for name in &names {
        let (shape, data) = read(name, false)?;
        extra.push((name.clone(), shape, data));
    }
    if let Some(stray) = st
        .names()
        .into_iter()
        .find(|n| *n != ADAM_M && *n != ADAM_V && !names.contains(n))
    {
        return Err(ckpt_err(
            path,
            format!("unexpected tensor `{stray}` (not listed in metadata `extra`)"),
        ));
    }
    Ok(TrainerState {
        step,
        adam_m,
        adam_v,
        extra,
        meta: meta_json,
    })
}

// ---------------------------------------------------------------------------------------------
// Whole checkpoints

/// Everything one checkpoint save writes.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoint<'a> {
    /// The model whose configuration and tensor layout `params` follow.
    pub model: &'a Llama,
    /// Flat f32 parameters in the model's layout, `[model.num_params()]`; a mismatch is an error.
    pub params: &'a [f32],
    /// Updates done; stored in the weights and (when present) must equal the trainer state's.
    pub step: u64,
    /// Fields written to `config.json` beyond the model's hyper-parameters.
    pub config_extras: ConfigExtras,
    /// `tokenizer.json` bytes to copy in, if any.
    pub tokenizer_json: Option<&'a [u8]>,
    /// Other files written after `tokenizer.json`, by name (e.g. `tokenizer_config.json` and
    /// `generation_config.json`, which make the directory a complete HF model).
    pub extra_files: &'a [(&'a str, &'a [u8])],
    /// Written last; `None` for an export that is not meant to be resumed.
    pub trainer_state: Option<&'a TrainerState>,
}

/// Saves a checkpoint into `dir` (created if needed): `config.json`, `tokenizer.json`,
/// `model.safetensors`, `trainer_state.safetensors`, in that order, each atomically and durably
/// (see the module documentation for what a crash can leave).
pub fn save_checkpoint(dir: &Path, ckpt: &Checkpoint<'_>) -> Result<()> {
    if let Some(st) = ckpt.trainer_state {
        if st.step != ckpt.step {
            return Err(ckpt_err(
                dir,
                format!(
                    "trainer state step {} differs from the checkpoint step {}",
                    st.step, ckpt.step
                ),
            ));
        }
    }
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)
            .and_then(|()| sync_dir(&parent_dir(dir)))
            .map_err(|e| Error::Io {
                path: shown(dir),
                message: format!("cannot create the checkpoint directory: {e}"),
            })?;
    }
    save_config(
        &dir.join(CONFIG_FILE),
        ckpt.model.config(),
        &ckpt.config_extras,
    )?;
    if let Some(tok) = ckpt.tokenizer_json {
        write_atomic(&dir.join(TOKENIZER_FILE), tok)?;
    }
    for (name, bytes) in ckpt.extra_files {
        write_atomic(&dir.join(name), bytes)?;
    }
    save_weights(&dir.join(WEIGHTS_FILE), ckpt.model, ckpt.params, ckpt.step)?;
    if let Some(st) = ckpt.trainer_state {
        save_trainer_state(&dir.join(TRAINER_STATE_FILE), st)?;
    }
    Ok(())
}

/// Loads what resuming needs from `dir` for `model`: the weights and the trainer state, which
/// must carry the same step (a mismatch means the last save was interrupted between the two
/// files; the error says so rather than pairing new weights with old optimizer moments).
pub fn load_resume(dir: &Path, model: &Llama) -> Result<(Vec<f32>, TrainerState)> {
    let wpath = dir.join(WEIGHTS_FILE);
    let (params, wstep) = load_weights(&wpath, model)?;
    let spath = dir.join(TRAINER_STATE_FILE);
    let state = load_trainer_state(&spath)?;
    match wstep {
        Some(s) if s == state.step => Ok((params, state)),
        Some(s) => Err(ckpt_err(
            dir,
            format!(
                "{WEIGHTS_FILE} is at step {s} but {TRAINER_STATE_FILE} at step {}: the last save \
                 was interrupted; resume from an earlier checkpoint or restart the optimizer",
                state.step
            ),
        )),
        None => Err(ckpt_err(
            &wpath,
            "no `step` in the metadata: not written by this trainer, cannot be resumed",
        )),
    }
}
