//! Token-by-token generation with a key/value cache: each new token costs one pass of the
//! weights (matrix-vector products) and attention over the cached positions, instead of a
//! forward over the whole window. The math is the forward's ([`super::ops`] for the norms,
//! projections, RoPE tables and SwiGLU), one position at a time; attention is written here for
//! one query row. f32, on the CPU.

use rayon::prelude::*;

use super::{ops, Llama, LlamaConfig};
use crate::train::error::{Result, TrainError as Error};

/// The keys (after RoPE) and values of every layer for positions `0 .. len`, with room for
/// `capacity` positions, and the per-token scratch.
#[derive(Debug, Clone)]
pub struct KvCache {
    config: LlamaConfig,
    capacity: usize,
    len: usize,
    /// `[layers, capacity, NKV * D]` each.
    k: Vec<f32>,
    v: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    x: Vec<f32>,
    ln: Vec<f32>,
    q: Vec<f32>,
    kv: Vec<f32>,
    att: Vec<f32>,
    scores: Vec<f32>,
    branch: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    swiglu: Vec<f32>,
    logits: Vec<f32>,
}

impl KvCache {
    /// A cache for `model` holding up to `capacity` positions (at most its
    /// `max_position_embeddings`).
    pub fn new(model: &Llama, capacity: usize) -> Result<KvCache> {
        let cfg = model.config();
        if capacity == 0 || capacity > cfg.max_position_embeddings {
            return Err(Error::InvalidOption {
                name: "capacity",
                value: capacity.to_string(),
                reason: "must be between 1 and max_position_embeddings",
            });
        }
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let per = cfg
            .num_hidden_layers
            .checked_mul(capacity)
            .and_then(|n| n.checked_mul(kvd));
        let per = per.ok_or(Error::InvalidOption {
            name: "capacity",
            value: capacity.to_string(),
            reason: "the cache size overflows",
        })?;
        let mut plan = crate::train::memory::MemoryPlan::new();
        plan.add("the key/value cache", per.checked_mul(2), 4);
        plan.check(&format!("a key/value cache of {capacity} positions"))?;
        let (cos, sin) = ops::rope_tables_from::<f32>(capacity, &cfg.rope_inv_freq());
        Ok(KvCache {
            config: cfg.clone(),
            capacity,
            len: 0,
            k: vec![0.0; per],
            v: vec![0.0; per],
            cos,
            sin,
            x: vec![0.0; c],
            ln: vec![0.0; c],
            q: vec![0.0; qd],
            kv: vec![0.0; kvd],
            att: vec![0.0; qd],
            scores: vec![0.0; capacity],
            branch: vec![0.0; c],
            gate: vec![0.0; i],
            up: vec![0.0; i],
            swiglu: vec![0.0; i],
            logits: vec![0.0; v],
        })
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Output rows per parallel task of [`matvec`].
const MATVEC_ROWS: usize = 64;

/// `out = W x` for one input row: weight `[OC, IC]`. A one-row GEMM would run on one thread;
/// this splits the output rows across threads instead. Each output is an 8-lane dot product
/// (the lanes summed at the end), so the result differs from the GEMM's only in rounding.
fn matvec(out: &mut [f32], x: &[f32], weight: &[f32], ic: usize, oc: usize) {
    debug_assert_eq!(weight.len(), ic * oc);
    debug_assert_eq!(out.len(), oc);
    out.par_chunks_mut(MATVEC_ROWS)
        .zip(weight.par_chunks(MATVEC_ROWS * ic))
        .for_each(|(o, w)| {
            for (oi, row) in o.iter_mut().zip(w.chunks_exact(ic)) {
                *oi = dot8(x, row);
            }
        });
}

fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

impl Llama {
    /// Runs `token` at the next position of `cache` and returns its logits `[V]` (the next
    /// token's distribution); the token's keys and values join the cache. An error when the
    /// cache is full, the token is outside the vocabulary or `params` is not this model's.
    pub fn decode_step<'a>(
        &self,
        params: &[f32],
        token: u32,
        cache: &'a mut KvCache,
    ) -> Result<&'a [f32]> {
        let cfg = self.config();
        if params.len() != self.num_params() {
            return Err(Error::ShapeMismatch {
                tensor: "params",
                expected: self.num_params(),
                actual: params.len(),
                shape: "the model's parameter count".into(),
            });
        }
        if cache.config != *cfg {
            return Err(Error::InvalidOption {
                name: "cache",
                value: format!("{} positions", cache.capacity),
                reason: "was made for another model",
            });
        }
        if token as usize >= cfg.vocab_size {
            return Err(Error::TokenOutOfRange {
                position: cache.len,
                token,
                vocab: cfg.vocab_size,
            });
        }
        let pos = cache.len;
        if pos >= cache.capacity {
            return Err(Error::InvalidOption {
                name: "cache",
                value: format!("{} positions", cache.capacity),
                reason: "is full: the sequence reached the cache's capacity",
            });
        }
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let (qd, kvd, half) = (cfg.q_dim(), cfg.kv_dim(), hd / 2);
        let eps = cfg.rms_norm_eps;
        let pl = self.layout();
        let KvCache {
            capacity,
            k: kc,
            v: vc,
            cos,
            sin,
            x,
            ln,
            q,
            kv,
            att,
            scores,
            branch,
            gate,
            up,
            swiglu,
            logits,
            ..
        } = cache;
        let (cos, sin) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        let mut rstd = [0.0f32];
        ops::embedding_forward(x, &[token], pl.embed_tokens.of(params), c);
        let scale = 1.0 / (hd as f64).sqrt() as f32;
        let rep = nh / nkv;
        for (l, lp) in pl.layers.iter().enumerate() {
            let layer_k = &mut kc[l * *capacity * kvd..(l + 1) * *capacity * kvd];
            let layer_v = &mut vc[l * *capacity * kvd..(l + 1) * *capacity * kvd];
            ops::rmsnorm_forward(ln, &mut rstd, x, lp.input_layernorm.of(params), eps);
            let bias = |out: &mut [f32], k: usize| {
                if let Some(b) = lp.qkv_bias {
                    ops::bias_forward(out, b[k].of(params), out.len());
                }
            };
            matvec(q, ln, lp.q_proj.of(params), c, qd);
            bias(q, 0);
            ops::rope_forward(q, cos, sin, 1, nh, hd);
            matvec(kv, ln, lp.k_proj.of(params), c, kvd);
            bias(kv, 1);
            ops::rope_forward(kv, cos, sin, 1, nkv, hd);
            layer_k[pos * kvd..(pos + 1) * kvd].copy_from_slice(kv);
            matvec(kv, ln, lp.v_proj.of(params), c, kvd);
            bias(kv, 2);
            layer_v[pos * kvd..(pos + 1) * kvd].copy_from_slice(kv);
            for h in 0..nh {
                let g = h / rep;
                let qh = &q[h * hd..(h + 1) * hd];
                let s = &mut scores[..=pos];
                for (j, sj) in s.iter_mut().enumerate() {
                    let kj = &layer_k[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    *sj = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                }
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                for sj in s.iter_mut() {
                    *sj = (*sj - max).exp();
                }
                let inv = 1.0 / s.iter().sum::<f32>();
                let out = &mut att[h * hd..(h + 1) * hd];
                out.fill(0.0);
                for (j, &p) in s.iter().enumerate() {
                    let vj = &layer_v[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    for (o, &vv) in out.iter_mut().zip(vj) {
                        *o += p * inv * vv;
                    }
                }
            }
            matvec(branch, att, lp.o_proj.of(params), qd, c);
            x.iter_mut().zip(branch.iter()).for_each(|(a, &b)| *a += b);
            ops::rmsnorm_forward(
                ln,
                &mut rstd,
                x,
                lp.post_attention_layernorm.of(params),
                eps,
            );
            matvec(gate, ln, lp.gate_proj.of(params), c, i);
            matvec(up, ln, lp.up_proj.of(params), c, i);
            ops::swiglu_forward(swiglu, gate, up);
            matvec(branch, swiglu, lp.down_proj.of(params), i, c);
            x.iter_mut().zip(branch.iter()).for_each(|(a, &b)| *a += b);
        }
        ops::rmsnorm_forward(ln, &mut rstd, x, pl.norm.of(params), eps);
        matvec(logits, ln, pl.lm_head.of(params), c, v);
        cache.len += 1;
        Ok(&cache.logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activations, LlamaConfig};

    #[test]
    fn cached_steps_give_the_forwards_logits() {
        for (tied, kv, qkv_bias) in [(true, 2, false), (false, 4, false), (true, 2, true)] {
            let cfg = LlamaConfig {
                vocab_size: 37,
                hidden_size: 32,
                intermediate_size: 48,
                num_hidden_layers: 3,
                num_attention_heads: 4,
                num_key_value_heads: kv,
                max_position_embeddings: 16,
                rope_theta: 500.0,
                tie_word_embeddings: tied,
                qkv_bias,
                ..LlamaConfig::default()
            };
            let model = Llama::new(cfg).unwrap();
            let mut params = model.init_params::<f32>(11);
            // Biases start at zero; make them matter.
            for t in model.layout().tensors() {
                if t.name.ends_with(".bias") {
                    crate::model::llama::normal_fill(t.span.of_mut(&mut params), 0.5, 3, 0);
                }
            }
            let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 37).collect();
            let mut acts = Activations::inference(&model, 1, tokens.len()).unwrap();
            let full = model.forward(&params, &tokens, &mut acts).unwrap().to_vec();
            let mut cache = KvCache::new(&model, 12).unwrap();
            for (t, &tok) in tokens.iter().enumerate() {
                let step = model.decode_step(&params, tok, &mut cache).unwrap();
                let want = &full[t * 37..(t + 1) * 37];
                let err = step
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < 1e-5, "position {t}: max |diff| {err}");
            }
            assert_eq!(cache.len(), 12);
            let e = model.decode_step(&params, 1, &mut cache).unwrap_err();
            assert!(e.to_string().contains("is full"), "{e}");
            cache.clear();
            assert!(model.decode_step(&params, 37, &mut cache).is_err());
            // A cache made for another model is refused, not indexed out of bounds.
            let deeper = Llama::new(LlamaConfig {
                num_hidden_layers: 4,
                ..model.config().clone()
            })
            .unwrap();
            let p4 = deeper.init_params::<f32>(1);
            let e = deeper.decode_step(&p4, 1, &mut cache).unwrap_err();
            assert!(e.to_string().contains("another model"), "{e}");
        }
    }
}
