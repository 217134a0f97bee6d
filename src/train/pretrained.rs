//! A pretrained model as users have it: a Hugging Face directory (`config.json`, safetensors,
//! `tokenizer.json`) or one llama.cpp GGUF file. Either gives the same three things: the
//! [`Llama`], its f32 parameters under HF names, and its tokenizer with the special tokens the
//! model itself names.
//!
//! GGUF (`general.architecture = "llama"`, which Llama and Mistral files use, or `"qwen2"`):
//! the hyper-parameters come from `llama.*` (`qwen2.*`) metadata, the tensors from llama.cpp's names, each
//! dequantized exactly as llama.cpp does ([`crate::model::quant`]), and the row permutation that
//! llama.cpp's converter applies to the Q and K projections (interleaving the two rotary halves
//! of each head) is undone, so the weights equal the HF checkpoint the file was made from up to
//! the quantization.

use std::path::Path;
use std::str::FromStr;

use serde_json::Value;

use crate::data::gguf_tokenizer::tokenizer_from_gguf;
use crate::data::{Specials, Tokenizer};
use crate::model::config::Llama3RopeScaling;
use crate::model::gguf::Gguf;
use crate::model::quant::dequantize;
use crate::model::{Llama, LlamaConfig};
use crate::train::checkpoint::load_model_dir;
use crate::train::error::{Result, TrainError as Error};
use crate::train::memory;

/// A model loaded for evaluation, sampling or as a teacher.
#[derive(Debug)]
pub struct Pretrained {
    /// Architecture and shapes.
    pub model: Llama,
    /// f32 parameters in the model's layout.
    pub params: Vec<f32>,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The tokenizer's `tokenizer.json` text (copied into students and caches).
    pub tokenizer_json: String,
}

fn file_err(path: &Path, message: impl Into<String>) -> Error {
    Error::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Loads `path`: a `.gguf` file (or any file starting with the GGUF magic) or an HF model
/// directory.
pub fn load(path: &Path) -> Result<Pretrained> {
    if path.is_dir() {
        return load_hf_dir(path);
    }
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .map(|_| &magic == b"GGUF")
        .unwrap_or(false);
    if is_gguf {
        return load_gguf(path);
    }
    if !path.exists() {
        return Err(Error::Io {
            path: path.display().to_string(),
            message: "no such file or directory".into(),
        });
    }
    Err(file_err(
        path,
        "neither a model directory (config.json, model.safetensors, tokenizer.json) nor a GGUF \
         file",
    ))
}

// ---------------------------------------------------------------------------------------------
// Hugging Face directories

/// An HF directory; EOS/BOS come from `config.json`, else `generation_config.json`, else
/// `tokenizer_config.json`, else the literal [`crate::data::EOS_TOKEN`].
pub fn load_hf_dir(dir: &Path) -> Result<Pretrained> {
    let (tokenizer, json) = load_tokenizer(dir)?;
    let (model, params) = load_model_dir(dir)?;
    check_vocab(dir, &model, &tokenizer)?;
    Ok(Pretrained {
        model,
        params,
        tokenizer,
        tokenizer_json: json,
    })
}

/// The `tokenizer.json` of directory `dir` with the special tokens its model files name (see
/// [`load_hf_dir`]), and the JSON text.
pub fn load_tokenizer(dir: &Path) -> Result<(Tokenizer, String)> {
    let tok_path = dir.join("tokenizer.json");
    let json = std::fs::read_to_string(&tok_path).map_err(|e| Error::Io {
        path: tok_path.display().to_string(),
        message: e.to_string(),
    })?;
    let inner = tokenizers::Tokenizer::from_str(&json)
        .map_err(|e| file_err(&tok_path, format!("not a valid tokenizer.json: {e}")))?;
    let specials = hf_specials(dir, &inner)?;
    let tokenizer = Tokenizer::from_parsed(inner, specials).map_err(|m| file_err(&tok_path, m))?;
    Ok((tokenizer, json))
}

/// `tokenizer_config.json` naming the special tokens of `tok`, in the form Hugging Face
/// writes, so that [`load_tokenizer`] and `transformers` find them in a directory that has no
/// model `config.json` (a teacher cache).
pub fn tokenizer_config_json(tok: &Tokenizer) -> String {
    let sp = tok.specials();
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).map(Value::from);
    let v = serde_json::json!({
        "eos_token": name(Some(sp.eos)),
        "bos_token": name(sp.bos),
        "add_bos_token": sp.add_bos,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

/// `generation_config.json` with the special-token ids of `tok`, as HF writes it.
pub fn generation_config_json(tok: &Tokenizer) -> String {
    let sp = tok.specials();
    let mut v = serde_json::json!({ "eos_token_id": sp.eos });
    if let Some(b) = sp.bos {
        v["bos_token_id"] = b.into();
    }
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

fn check_vocab(path: &Path, model: &Llama, tok: &Tokenizer) -> Result<()> {
    if model.config().vocab_size != tok.vocab_size() {
        return Err(file_err(
            path,
            format!(
                "the model has vocab_size {} but its tokenizer has {} tokens",
                model.config().vocab_size,
                tok.vocab_size()
            ),
        ));
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| file_err(path, format!("not valid JSON: {e}"))),
    }
}

/// An id field: an integer, or a list whose first element is one (HF allows several EOS ids).
fn id_field(v: &Value, key: &str) -> Option<u32> {
    match v.get(key)? {
        Value::Array(a) => a.first()?.as_u64(),
        x => x.as_u64(),
    }
    .and_then(|i| u32::try_from(i).ok())
}

/// A token field of `tokenizer_config.json`: a string or `{"content": string}`.
fn token_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    match v.get(key)? {
        Value::String(s) => Some(s),
        x => x.get("content")?.as_str(),
    }
}

fn hf_specials(dir: &Path, tokenizer: &tokenizers::Tokenizer) -> Result<Option<Specials>> {
    let files = ["config.json", "generation_config.json"]
        .map(|f| read_json(&dir.join(f)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let tok_cfg = read_json(&dir.join("tokenizer_config.json"))?;
    let lookup = |id_key: &str, token_key: &str| -> Option<u32> {
        files
            .iter()
            .flatten()
            .find_map(|v| id_field(v, id_key))
            .or_else(|| tokenizer.token_to_id(token_field(tok_cfg.as_ref()?, token_key)?))
    };
    let Some(eos) = lookup("eos_token_id", "eos_token") else {
        // No EOS named anywhere: the tokenizer's own `<|endoftext|>` (our trained tokenizers).
        return Ok(None);
    };
    let bos = lookup("bos_token_id", "bos_token");
    // `add_bos_token`, else whether tokenizer.json's post-processor puts BOS first (Llama 3 adds
    // it that way and says nothing in tokenizer_config.json).
    let add_bos = match tok_cfg
        .as_ref()
        .and_then(|v| v.get("add_bos_token"))
        .and_then(Value::as_bool)
    {
        Some(b) => b,
        None => bos.is_some_and(|b| {
            tokenizer
                .encode("a", true)
                .is_ok_and(|e| e.get_ids().first() == Some(&b))
        }),
    };
    Ok(Some(Specials { eos, bos, add_bos }))
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// The architectures whose GGUF tensors map onto [`Llama`]: `llama` (Llama and Mistral files,
/// Q and K rows permuted by the converter) and `qwen2` (q/k/v biases, rows as in HF).
const GGUF_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// A GGUF file: hyper-parameters, weights and tokenizer, all from the one file.
pub fn load_gguf(path: &Path) -> Result<Pretrained> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?
        .len();
    let mut plan = memory::MemoryPlan::new();
    plan.add("the GGUF file", usize::try_from(size).ok(), 1);
    plan.check(&format!("reading {}", path.display()))?;
    let g = Gguf::open(path).map_err(|m| file_err(path, m))?;
    let (tokenizer, tokenizer_json) = tokenizer_from_gguf(&g).map_err(|m| file_err(path, m))?;
    let cfg = gguf_config(&g, tokenizer.vocab_size()).map_err(|m| file_err(path, m))?;
    let model = Llama::new(cfg).map_err(|e| file_err(path, e.to_string()))?;
    let params = gguf_params(path, &g, &model)?;
    Ok(Pretrained {
        model,
        params,
        tokenizer,
        tokenizer_json,
    })
}

/// The [`LlamaConfig`] of a llama-architecture GGUF file whose tokenizer has `vocab` tokens.
pub fn gguf_config(g: &Gguf, vocab: usize) -> std::result::Result<LlamaConfig, String> {
    let arch = g.get_str("general.architecture")?;
    if !GGUF_ARCHITECTURES.contains(&arch) {
        return Err(format!(
            "general.architecture = {arch:?} is not supported (supported: {})",
            GGUF_ARCHITECTURES.join(", ")
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> std::result::Result<usize, String> {
        usize::try_from(g.get_u64(&key(k))?)
            .map_err(|_| format!("metadata {} is too large", key(k)))
    };
    let heads = int("attention.head_count")?;
    let hidden = int("embedding_length")?;
    let kv_heads = match g.metadata.get(&key("attention.head_count_kv")) {
        None => heads,
        Some(_) => int("attention.head_count_kv")?,
    };
    let head_dim = match g.metadata.get(&key("attention.key_length")) {
        None => None,
        Some(_) => Some(int("attention.key_length")?),
    };
    let d = head_dim.unwrap_or(hidden / heads.max(1));
    if let Some(rot) = g.metadata.get(&key("rope.dimension_count")) {
        if rot.as_u64() != Some(d as u64) {
            return Err(format!(
                "metadata {} = {rot:?}: rotary embedding on part of a head ({d} wide) is not \
                 supported",
                key("rope.dimension_count")
            ));
        }
    }
    if let Some(t) = g.metadata.get(&key("rope.scaling.type")) {
        if t.as_str() != Some("none") {
            return Err(format!(
                "metadata {} = {t:?}: RoPE scaling is not supported",
                key("rope.scaling.type")
            ));
        }
    }
    if let Some(v) = g.metadata.get(&key("vocab_size")) {
        if v.as_u64() != Some(vocab as u64) {
            return Err(format!(
                "metadata {} = {v:?} but tokenizer.ggml.tokens lists {vocab} tokens",
                key("vocab_size")
            ));
        }
    }
    let opt_f = |k: &str, default: f64| -> std::result::Result<f64, String> {
        match g.metadata.get(&key(k)) {
            None => Ok(default),
            Some(_) => g.get_f64(&key(k)),
        }
    };
    let rope_theta = opt_f("rope.freq_base", 10000.0)?;
    let original_context = match g.metadata.get(&key("rope.scaling.original_context_length")) {
        None => LLAMA3_ORIGINAL_CONTEXT,
        Some(_) => int("rope.scaling.original_context_length")?,
    };
    let rope_scaling = match g.tensor(ROPE_FREQS) {
        None => None,
        Some(t) => {
            if t.torch_shape() != [(d / 2) as u64] {
                return Err(format!(
                    "tensor rope_freqs.weight has shape {:?}, a head of {d} rotates {} \
                     frequencies",
                    t.torch_shape(),
                    d / 2
                ));
            }
            // Sized by the tensor (so by the file), not by the metadata alone.
            let mut factors = vec![0.0f32; d / 2];
            dequantize(t.ty, g.data(t), &mut factors)
                .map_err(|m| format!("tensor rope_freqs.weight: {m}"))?;
            llama3_from_rope_freqs(&factors, d, rope_theta, original_context)?
        }
    };
    Ok(LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: head_dim.filter(|&hd| hd != hidden / heads.max(1)),
        max_position_embeddings: int("context_length")?,
        rms_norm_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta,
        rope_scaling,
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        qkv_bias: arch == "qwen2",
        ..LlamaConfig::default()
    })
}

/// The tensor in which llama.cpp keeps Llama 3's RoPE scaling (one divisor per frequency).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The context Llama 3.1, 3.2 and 3.3 were pretrained at, and their `low_freq_factor` and
/// `high_freq_factor`: llama.cpp's converter keeps none of the three, only the per-frequency
/// divisors they produce (`rope_freqs.weight`).
const LLAMA3_ORIGINAL_CONTEXT: usize = 8192;
const LLAMA3_LOW_FREQ_FACTOR: f64 = 1.0;
const LLAMA3_HIGH_FREQ_FACTOR: f64 = 4.0;

/// The Llama 3 `rope_scaling` whose per-frequency divisors are `factors` (llama.cpp's
/// `rope_freqs.weight`: RoPE's frequency `i` is divided by `factors[i]`). Only `factor` varies
/// between releases (8 for 3.1, 32 for 3.2); it is read off a frequency the scaling divides
/// fully, else solved from an interpolated one, and then every divisor must agree with the one
/// [`LlamaConfig::rope_inv_freq`] implies (relative 1e-5, the converter rounds to f32). `None`
/// when every divisor is 1 (the scaling changes nothing).
fn llama3_from_rope_freqs(
    factors: &[f32],
    head_dim: usize,
    theta: f64,
    original_context: usize,
) -> std::result::Result<Option<Llama3RopeScaling>, String> {
    if let Some(i) = factors.iter().position(|f| !(f.is_finite() && *f >= 1.0)) {
        return Err(format!(
            "tensor rope_freqs.weight holds {} at index {i}; Llama 3's divisors are finite and \
             at least 1",
            factors[i]
        ));
    }
    if factors.iter().all(|&f| f == 1.0) {
        return Ok(None);
    }
    let (low, high) = (LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR);
    let old = original_context as f64;
    let base = crate::model::ops::rope_inv_freq(head_dim, theta);
    // smooth = 0 where the frequency is divided by `factor` in full, 1 where it is kept.
    let smooth = |f: f32| {
        let wavelen = 2.0 * std::f64::consts::PI / f as f64;
        ((old / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    };
    let full = base.iter().zip(factors).find(|(&f, _)| smooth(f) == 0.0);
    let factor = match full {
        Some((_, &r)) => r as f64,
        None => {
            // 1 / r = (1 - s) / factor + s, at the first interpolated frequency.
            let (s, r) = base
                .iter()
                .zip(factors)
                .map(|(&f, &r)| (smooth(f), r as f64))
                .find(|&(s, _)| s < 1.0)
                .unwrap_or((1.0, 1.0));
            ((1.0 - s) / (1.0 / r - s)) as f32 as f64
        }
    };
    let refused = |what: String| {
        format!(
            "tensor rope_freqs.weight {what}, unlike Llama 3's RoPE scaling (low_freq_factor \
             {low}, high_freq_factor {high}, original context {original_context}): other \
             rescalings are not supported"
        )
    };
    if !(factor.is_finite() && factor >= 1.0) {
        return Err(refused(format!("implies a factor of {factor}")));
    }
    let scaling = Llama3RopeScaling {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: original_context,
    };
    let cfg = LlamaConfig {
        head_dim: Some(head_dim),
        num_attention_heads: 1,
        hidden_size: head_dim,
        rope_theta: theta,
        rope_scaling: Some(scaling),
        ..LlamaConfig::default()
    };
    for (i, ((&b, &s), &r)) in base
        .iter()
        .zip(&cfg.rope_inv_freq())
        .zip(factors)
        .enumerate()
    {
        let implied = b as f64 / s as f64;
        if (implied - r as f64).abs() > 1e-5 * r as f64 {
            return Err(refused(format!(
                "divides frequency {i} by {r} where factor {factor} divides it by {implied}"
            )));
        }
    }
    Ok(Some(scaling))
}

/// llama.cpp's name of each HF tensor of layer `l` (`None`: a tensor outside the layers).
fn gguf_name(hf: &str) -> Option<String> {
    Some(match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (l, name) = rest.split_once('.')?;
            let (module, kind) = name.rsplit_once('.')?;
            let short = match module {
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                _ => return None,
            };
            if kind != "weight" && kind != "bias" {
                return None;
            }
            format!("blk.{l}.{short}.{kind}")
        }
    })
}

/// Undoes llama.cpp's `permute` of a Q or K projection `[heads * d, cols]`: its row
/// `h*d + 2*i + half` is HF's row `h*d + half*d/2 + i`.
fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let d = w.len() / cols / heads;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for half in 0..2 {
                let src = (h * d + 2 * i + half) * cols;
                let dst = (h * d + half * (d / 2) + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// The parameters of `model` from the tensors of `g` (the file at `path`, for errors); a tensor
/// of the file that the model has no place for is an error too.
fn gguf_params(path: &Path, g: &Gguf, model: &Llama) -> Result<Vec<f32>> {
    let cfg = model.config();
    let mut params = memory::filled(model.num_params(), 0.0f32, "the model's parameters")?;
    let err = |m: String| file_err(path, m);
    let permuted = g.get_str("general.architecture").map_err(err)? == "llama";
    let mut used = std::collections::HashSet::new();
    for t in model.layout().tensors() {
        let name = gguf_name(&t.name).ok_or_else(|| err(format!("no GGUF name for {}", t.name)))?;
        let gt = g
            .tensor(&name)
            .ok_or_else(|| err(format!("tensor {name} (HF {}) is missing", t.name)))?;
        let shape: Vec<u64> = t.shape.iter().map(|&s| s as u64).collect();
        if gt.torch_shape() != shape {
            return Err(err(format!(
                "tensor {name} has shape {:?}, the config implies {:?}",
                gt.torch_shape(),
                shape
            )));
        }
        let dst = t.span.of_mut(&mut params);
        dequantize(gt.ty, g.data(gt), dst).map_err(|m| err(format!("tensor {name}: {m}")))?;
        // Only the llama converter permutes (Qwen2's keeps HF's rows).
        let heads = if !permuted {
            0
        } else if name.ends_with("attn_q.weight") {
            cfg.num_attention_heads
        } else if name.ends_with("attn_k.weight") {
            cfg.num_key_value_heads
        } else {
            0
        };
        if heads > 0 {
            let cols = t.shape[1];
            let fixed = unpermute_rows(dst, heads, cols);
            dst.copy_from_slice(&fixed);
        }
        if let Some(i) = dst.iter().position(|x| !x.is_finite()) {
            return Err(err(format!(
                "tensor {name} holds a non-finite value ({}) at element {i}",
                dst[i]
            )));
        }
        used.insert(name);
    }
    // Read by `gguf_config` as the model's RoPE scaling.
    used.insert(ROPE_FREQS.to_string());
    if let Some(extra) = g.tensors.iter().find(|gt| !used.contains(&gt.name)) {
        return Err(err(format!(
            "tensor {} is not part of a Llama model (unsupported architecture variant?)",
            extra.name
        )));
    }
    Ok(params)
}

#[cfg(test)]
mod tests;
