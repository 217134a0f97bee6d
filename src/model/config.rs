//! The model's hyper-parameters, named and defaulted like Hugging Face's `LlamaConfig` so that a
//! `config.json` maps onto it field by field.

use crate::train::error::{Result, TrainError as Error};

/// A Llama-style decoder's hyper-parameters. Field names and meanings are those of Hugging Face
/// `transformers.LlamaConfig`; `Default` gives its defaults (Llama 2 7B shapes). Fields of
/// `LlamaConfig` that are not here have one supported value: `hidden_act = "silu"`,
/// `attention_bias = mlp_bias = false`; `rope_scaling` is `None` or Llama 3's. `qkv_bias` is
/// Qwen2's one difference from Llama: biases on the query, key and value projections.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Number of token ids, V: rows of `embed_tokens` and of `lm_head`; at most 2^32 (ids are
    /// `u32`).
    pub vocab_size: usize,
    /// Width of the residual stream, C.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP, I.
    pub intermediate_size: usize,
    /// Decoder layers, L.
    pub num_hidden_layers: usize,
    /// Query heads, NH.
    pub num_attention_heads: usize,
    /// Key/value heads, NKV (grouped-query attention); must divide `num_attention_heads`.
    /// Query head `h` reads key/value head `h / (NH / NKV)`, as HF `repeat_kv` does.
    pub num_key_value_heads: usize,
    /// Per-head width; `None` means `hidden_size / num_attention_heads` (HF's default).
    pub head_dim: Option<usize>,
    /// Longest sequence the model accepts.
    pub max_position_embeddings: usize,
    /// Standard deviation of the normal initialization of every linear and embedding weight.
    pub initializer_range: f64,
    /// RMSNorm: `x * rsqrt(mean(x^2) + eps) * weight`.
    pub rms_norm_eps: f64,
    /// RoPE base: `inv_freq[i] = rope_theta^(-2i / head_dim)`.
    pub rope_theta: f64,
    /// Llama 3.1's frequency-dependent rescaling of `inv_freq` (`rope_scaling` of type
    /// `llama3`); `None` is plain RoPE.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// When true, `lm_head.weight` is `model.embed_tokens.weight` (one tensor, one gradient).
    pub tie_word_embeddings: bool,
    /// Qwen2's attention: `q_proj`, `k_proj` and `v_proj` have biases (`o_proj` has none).
    /// Written and read as `model_type: "qwen2"` in `config.json`.
    pub qkv_bias: bool,
}

impl Default for LlamaConfig {
    /// Hugging Face's `LlamaConfig()` defaults.
    fn default() -> Self {
        LlamaConfig {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: None,
            max_position_embeddings: 2048,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            qkv_bias: false,
        }
    }
}

/// `rope_scaling = {"rope_type": "llama3", ...}` (Llama 3.1 and later): low frequencies (long
/// wavelengths) are divided by `factor`, high ones kept, and the band between interpolated, as
/// transformers' `_compute_llama3_parameters` does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Divisor of the lowest frequencies (8 for Llama 3.1).
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context the model was pretrained at (8192 for Llama 3.1).
    pub original_max_position_embeddings: usize,
}

fn invalid(name: &'static str, value: impl std::fmt::Display, reason: &'static str) -> Error {
    Error::InvalidOption {
        name,
        value: value.to_string(),
        reason,
    }
}

impl LlamaConfig {
    /// Per-head width D: `head_dim`, or `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Width of the concatenated query heads, `NH * D` (rows of `q_proj.weight`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// Width of the concatenated key (or value) heads, `NKV * D` (rows of `k_proj.weight`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    /// Query heads per key/value head, `NH / NKV` (HF `num_key_value_groups`).
    pub fn num_key_value_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// Every hyper-parameter is usable: sizes positive, heads grouped evenly, the head width even
    /// (RoPE rotates pairs), the float parameters finite and in range, the parameter count
    /// representable. The error names the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(invalid(name, value, "must be positive"));
            }
        }
        if self.vocab_size as u64 > u32::MAX as u64 + 1 {
            return Err(invalid(
                "vocab_size",
                self.vocab_size,
                "token ids are u32: at most 2^32",
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(invalid(
                "num_key_value_heads",
                self.num_key_value_heads,
                "must divide num_attention_heads",
            ));
        }
        match self.head_dim {
            Some(0) => return Err(invalid("head_dim", 0, "must be positive")),
            Some(_) => {}
            None => {
                if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
                    return Err(invalid(
                        "hidden_size",
                        self.hidden_size,
                        "must be a multiple of num_attention_heads when head_dim is not given",
                    ));
                }
            }
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                self.head_dim(),
                "must be even (RoPE rotates pairs of channels)",
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(invalid(
                "rms_norm_eps",
                self.rms_norm_eps,
                "must be finite and > 0",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid(
                "rope_theta",
                self.rope_theta,
                "must be finite and > 0",
            ));
        }
        if let Some(r) = self.rope_scaling {
            let ok = r.factor.is_finite()
                && r.factor > 0.0
                && r.low_freq_factor > 0.0
                && r.high_freq_factor.is_finite()
                && r.high_freq_factor > r.low_freq_factor
                && r.original_max_position_embeddings > 0;
            if !ok {
                return Err(invalid(
                    "rope_scaling",
                    format!("{r:?}"),
                    "needs factor > 0, 0 < low_freq_factor < high_freq_factor and \
                     original_max_position_embeddings > 0",
                ));
            }
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(invalid(
                "initializer_range",
                self.initializer_range,
                "must be finite and >= 0",
            ));
        }
        if self.param_count().is_none() {
            return Err(invalid(
                "hidden_size",
                self.hidden_size,
                "the parameter count overflows usize",
            ));
        }
        Ok(())
    }

    /// RoPE's `inv_freq[i]`, `i < head_dim / 2`, in f32 as transformers computes it:
    /// `1 / theta^(2i / head_dim)`, then Llama 3's rescaling when `rope_scaling` is set (every
    /// step in f32, in transformers' order).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let inv = super::ops::rope_inv_freq(self.head_dim(), self.rope_theta);
        let Some(r) = self.rope_scaling else {
            return inv;
        };
        let (factor, low, high) = (
            r.factor as f32,
            r.low_freq_factor as f32,
            r.high_freq_factor as f32,
        );
        let old = r.original_max_position_embeddings as f32;
        let (low_wavelen, high_wavelen) = (old / low, old / high);
        inv.iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                let scaled = if wavelen > low_wavelen { f / factor } else { f };
                if wavelen < high_wavelen || wavelen > low_wavelen {
                    return scaled;
                }
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            })
            .collect()
    }

    /// Number of scalar parameters (the tied `lm_head` counted once), `None` on overflow.
    pub fn param_count(&self) -> Option<usize> {
        let (c, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads.checked_mul(self.head_dim())?,
            self.num_key_value_heads.checked_mul(self.head_dim())?,
        );
        let attn = c.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        let mlp = c.checked_mul(i)?.checked_mul(3)?;
        let bias = if self.qkv_bias {
            q.checked_add(kv.checked_mul(2)?)?
        } else {
            0
        };
        let layer = attn
            .checked_add(mlp)?
            .checked_add(c.checked_mul(2)?)?
            .checked_add(bias)?;
        let embed = v.checked_mul(c)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        layer
            .checked_mul(self.num_hidden_layers)?
            .checked_add(embed)?
            .checked_add(head)?
            .checked_add(c)
    }
}
