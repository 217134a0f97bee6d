//! The mapping between Hugging Face's `config.json` for Llama models and [`LlamaConfig`]: what we
//! write so that `transformers` builds the same model, and what we accept from real checkpoints
//! (HF defaults for missing fields, errors naming any field our math does not implement). File I/O
//! is in [`crate::train::checkpoint`].

use crate::model::config::Llama3RopeScaling;
use crate::model::LlamaConfig;
use crate::train::error::{Result, TrainError as Error};
use serde_json::{json, Map, Value};

/// The fields of an HF `config.json` that [`LlamaConfig`] does not hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigExtras {
    /// `bos_token_id` to write; `None` leaves it out.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` to write (the tokenizer's EOS id for our runs); `None` leaves it out.
    pub eos_token_id: Option<u32>,
}

/// The HF `config.json` object of `cfg`: every field under its HF name, plus the fixed values
/// of what our math implements (`silu`, no MLP or output biases; q/k/v biases only as Qwen2,
/// RoPE scaling only as Llama 3's) so that HF builds the same model. `head_dim` is written only
/// when set, so a default head width round-trips as `None`.
pub fn config_to_json(cfg: &LlamaConfig, extras: &ConfigExtras) -> Value {
    let mut v = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "use_cache": true,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    });
    let obj = v.as_object_mut().expect("a JSON object literal");
    if cfg.qkv_bias {
        // Qwen2: the same math plus q/k/v biases, which only its own config class expresses.
        obj.insert("architectures".into(), json!(["Qwen2ForCausalLM"]));
        obj.insert("model_type".into(), "qwen2".into());
        obj.remove("attention_bias");
        obj.remove("mlp_bias");
        obj.insert("use_sliding_window".into(), false.into());
        obj.insert("sliding_window".into(), Value::Null);
        obj.insert("max_window_layers".into(), cfg.num_hidden_layers.into());
    }
    if let Some(d) = cfg.head_dim {
        obj.insert("head_dim".into(), d.into());
    }
    let rope_scaling = match cfg.rope_scaling {
        None => Value::Null,
        Some(r) => json!({
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        }),
    };
    obj.insert("rope_scaling".into(), rope_scaling);
    if let Some(id) = extras.bos_token_id {
        obj.insert("bos_token_id".into(), id.into());
    }
    if let Some(id) = extras.eos_token_id {
        obj.insert("eos_token_id".into(), id.into());
    }
    v
}

/// A field of a config object; JSON `null` counts as absent, as HF's defaults treat it.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

/// A field of type `T` read by `get`, absent or `null` as `None`; a value of another type is an
/// error naming the field, its value and `what` it should be.
fn typed_field<'a, T>(
    obj: &'a Map<String, Value>,
    name: &str,
    get: impl FnOnce(&'a Value) -> Option<T>,
    what: &str,
) -> std::result::Result<Option<T>, String> {
    field(obj, name)
        .map(|v| get(v).ok_or_else(|| format!("field `{name}` = {v} is not {what}")))
        .transpose()
}

fn usize_field(obj: &Map<String, Value>, name: &str) -> std::result::Result<Option<usize>, String> {
    let get = |v: &Value| v.as_u64().and_then(|x| usize::try_from(x).ok());
    typed_field(obj, name, get, "a non-negative integer")
}

fn f64_field(obj: &Map<String, Value>, name: &str) -> std::result::Result<Option<f64>, String> {
    typed_field(obj, name, Value::as_f64, "a number")
}

fn bool_field(obj: &Map<String, Value>, name: &str) -> std::result::Result<Option<bool>, String> {
    typed_field(obj, name, Value::as_bool, "true or false")
}

fn str_field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
) -> std::result::Result<Option<&'a str>, String> {
    typed_field(obj, name, Value::as_str, "a string")
}

/// The RoPE variant named by a `rope_scaling` / `rope_parameters` object (`rope_type`, or the
/// older `type`).
fn rope_type(v: &Value) -> Option<&str> {
    v.get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
}

/// A `rope_scaling` (or `rope_parameters`) object: `default` is plain RoPE, `llama3` Llama 3.1's
/// rescaling; any other type is refused, naming it.
fn parse_rope_scaling(
    v: &Value,
    name: &str,
) -> std::result::Result<Option<Llama3RopeScaling>, String> {
    match rope_type(v) {
        // `rope_parameters` may hold only rope_theta; a `rope_scaling` must say its type.
        None if name == "rope_scaling" && !v.as_object().is_some_and(|o| o.is_empty()) => {
            Err(format!(
                "field `rope_scaling` = {v} names no rope_type (default and llama3 are supported)"
            ))
        }
        None | Some("default") => Ok(None),
        Some("llama3") => {
            let o = v
                .as_object()
                .ok_or_else(|| format!("field `{name}` = {v} is not an object"))?;
            let need = |key: &str| -> std::result::Result<f64, String> {
                f64_field(o, key)?
                    .ok_or_else(|| format!("field `{name}.{key}` is missing (rope_type llama3)"))
            };
            let orig = usize_field(o, "original_max_position_embeddings")?.ok_or_else(|| {
                format!("field `{name}.original_max_position_embeddings` is missing")
            })?;
            Ok(Some(Llama3RopeScaling {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: orig,
            }))
        }
        Some(t) => Err(format!(
            "field `{name}` has rope_type \"{t}\", which is not supported (default and llama3 are)"
        )),
    }
}

/// The `architectures` of `config.json` whose math [`LlamaConfig`] describes.
pub const SUPPORTED_ARCHITECTURES: [&str; 3] =
    ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// Older spellings transformers still maps to a supported class (early Llama conversions).
const LEGACY_ARCHITECTURES: [&str; 1] = ["LLaMAForCausalLM"];

/// transformers' `MistralConfig.sliding_window` when `config.json` leaves it out (an explicit
/// `null` means no window).
const MISTRAL_DEFAULT_WINDOW: usize = 4096;

fn parse_config(text: &str) -> std::result::Result<LlamaConfig, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or("the top level is not a JSON object")?;

    if let Some(archs) = field(obj, "architectures") {
        let names = archs
            .as_array()
            .ok_or_else(|| format!("field `architectures` = {archs} is not a list"))?;
        for name in names {
            let known = name.as_str().is_some_and(|n| {
                SUPPORTED_ARCHITECTURES.contains(&n) || LEGACY_ARCHITECTURES.contains(&n)
            });
            if !known {
                return Err(format!(
                    "field `architectures` names {name}, which is not supported ({} are)",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ));
            }
        }
    }
    let model_type = str_field(obj, "model_type")?;
    let qkv_bias = match model_type {
        None | Some("llama") | Some("mistral") => false,
        Some("qwen2") => true,
        Some(other) => {
            return Err(format!(
                "field `model_type` = \"{other}\" is not supported (llama, mistral or qwen2 \
                 expected)"
            ))
        }
    };
    let mut max_positions = usize_field(obj, "max_position_embeddings")?;
    // A sliding window W changes nothing for sequences of at most W tokens, so such a model is
    // accepted with W as its longest sequence. Mistral's window applies to every layer when
    // set; Qwen2's only with `use_sliding_window`.
    let window = match model_type {
        Some("mistral") if !obj.contains_key("sliding_window") => Some(MISTRAL_DEFAULT_WINDOW),
        Some("mistral") => usize_field(obj, "sliding_window")?,
        Some("qwen2") if bool_field(obj, "use_sliding_window")? == Some(true) => {
            usize_field(obj, "sliding_window")?
        }
        _ => None,
    };
    if let Some(w) = window {
        let max = max_positions.unwrap_or(LlamaConfig::default().max_position_embeddings);
        max_positions = Some(max.min(w));
    }
    if let Some(act) = str_field(obj, "hidden_act")? {
        if act != "silu" {
            return Err(format!(
                "field `hidden_act` = \"{act}\" is not supported (only silu is implemented)"
            ));
        }
    }
    for name in ["attention_bias", "mlp_bias"] {
        if bool_field(obj, name)? == Some(true) {
            return Err(format!(
                "field `{name}` = true is not supported (the model has no biases)"
            ));
        }
    }
    if let Some(p) = f64_field(obj, "attention_dropout")? {
        if p != 0.0 {
            return Err(format!(
                "field `attention_dropout` = {p} is not supported (no dropout is implemented)"
            ));
        }
    }
    let mut rope_scaling = None;
    if let Some(rs) = field(obj, "rope_scaling") {
        rope_scaling = parse_rope_scaling(rs, "rope_scaling")?;
    }
    // transformers 5 moves rope_theta (and the scaling) into `rope_parameters`.
    let mut rope_theta = f64_field(obj, "rope_theta")?;
    if let Some(rp) = field(obj, "rope_parameters") {
        let rp_obj = rp
            .as_object()
            .ok_or_else(|| format!("field `rope_parameters` = {rp} is not an object"))?;
        if rope_scaling.is_none() {
            rope_scaling = parse_rope_scaling(rp, "rope_parameters")?;
        }
        if rope_theta.is_none() {
            rope_theta = f64_field(rp_obj, "rope_theta")
                .map_err(|e| e.replace("`rope_theta`", "`rope_parameters.rope_theta`"))?;
        }
    }

    let d = LlamaConfig::default();
    let num_attention_heads =
        usize_field(obj, "num_attention_heads")?.unwrap_or(d.num_attention_heads);
    let cfg = LlamaConfig {
        vocab_size: usize_field(obj, "vocab_size")?.unwrap_or(d.vocab_size),
        hidden_size: usize_field(obj, "hidden_size")?.unwrap_or(d.hidden_size),
        intermediate_size: usize_field(obj, "intermediate_size")?.unwrap_or(d.intermediate_size),
        num_hidden_layers: usize_field(obj, "num_hidden_layers")?.unwrap_or(d.num_hidden_layers),
        num_attention_heads,
        // HF: `if num_key_value_heads is None: num_key_value_heads = num_attention_heads`.
        num_key_value_heads: usize_field(obj, "num_key_value_heads")?
            .unwrap_or(num_attention_heads),
        head_dim: usize_field(obj, "head_dim")?,
        max_position_embeddings: max_positions.unwrap_or(d.max_position_embeddings),
        initializer_range: f64_field(obj, "initializer_range")?.unwrap_or(d.initializer_range),
        rms_norm_eps: f64_field(obj, "rms_norm_eps")?.unwrap_or(d.rms_norm_eps),
        rope_theta: rope_theta.unwrap_or(d.rope_theta),
        rope_scaling,
        tie_word_embeddings: bool_field(obj, "tie_word_embeddings")?
            .unwrap_or(d.tie_word_embeddings),
        qkv_bias,
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Parses an HF `config.json` text (Llama, Mistral or Qwen2): unknown fields are ignored,
/// missing ones take HF's defaults, and what the model does not implement (another architecture
/// or activation, Llama's biases, another RoPE scaling, dropout) is rejected naming the field.
/// A sliding window caps `max_position_embeddings` at its width. The result is validated.
pub fn config_from_json(text: &str) -> Result<LlamaConfig> {
    parse_config(text).map_err(|message| Error::Checkpoint {
        path: "config.json".into(),
        message,
    })
}
