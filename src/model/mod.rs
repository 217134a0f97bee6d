//! A minimal Llama-style decoder with hand-written forward and backward, in the manner of llm.c's
//! `train_gpt2.c`: one forward and one backward function per op ([`ops`]), all parameters in one
//! flat buffer under Hugging Face's tensor names, all activations in one flat buffer
//! ([`llama`]), hyper-parameters named as in HF `LlamaConfig` ([`config`]).
//!
//! The math is Hugging Face's `LlamaForCausalLM`: RMSNorm `x * rsqrt(mean(x^2) + eps) * w`,
//! rotate-half RoPE with `inv_freq = theta^(-2i/d)`, grouped-query causal attention scaled by
//! `1/sqrt(d)`, SwiGLU `down(silu(gate(x)) * up(x))`, no biases, `lm_head` tied or not. Everything
//! is generic over `f32` (training) and `f64` (finite-difference checks) through [`ops::Real`].
//! The loss on the logits is not here: the crate's distillation losses produce `dlogits`.
//!
//! ```
//! use distill_kernels::model::{Activations, Llama, LlamaConfig};
//! let cfg = LlamaConfig { vocab_size: 11, hidden_size: 16, intermediate_size: 32,
//!     num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
//!     max_position_embeddings: 8, ..LlamaConfig::default() };
//! let model = Llama::new(cfg)?;
//! let params = model.init_params::<f32>(42);
//! let mut grads = vec![0.0f32; model.num_params()];
//! let mut acts = Activations::new(&model, 2, 5)?;
//! let tokens = [1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10];
//! let logits = model.forward(&params, &tokens, &mut acts)?;
//! let dlogits = vec![1.0f32; logits.len()];        // from a loss
//! model.backward(&params, &mut acts, &dlogits, &mut grads)?;
//! # Ok::<(), distill_kernels::train::TrainError>(())
//! ```

pub mod config;
pub mod decode;
pub mod exec;
#[cfg(feature = "cuda")]
pub mod exec_cuda;
pub mod gguf;
pub mod llama;
pub mod ops;
pub mod quant;

pub use config::LlamaConfig;
pub use decode::KvCache;
pub use llama::{
    normal_fill, Activations, HiddenPoint, Init, LayerParams, Llama, ParamLayout, Pass, Span,
    TensorInfo,
};
pub use ops::Real;
