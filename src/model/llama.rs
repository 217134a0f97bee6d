//! The Llama decoder, llm.c style: every parameter in one contiguous buffer laid out under Hugging
//! Face's tensor names, every activation of a forward pass in one contiguous buffer sized for
//! (batch, seq), and a hand-written forward and backward that call the ops of [`super::ops`] in
//! order.
//!
//! ```text
//! h_0 = embed_tokens[tokens]                                        (embeddings)
//! for each layer l:
//!     a   = h_l + o_proj(attention(rope(q_proj(x)), rope(k_proj(x)), v_proj(x))),  x = rmsnorm_1(h_l)
//!           (Qwen2: q_proj, k_proj and v_proj add their biases)
//!     h_l+1 = a + down_proj(silu(gate_proj(y)) * up_proj(y)),                      y = rmsnorm_2(a)
//! logits = lm_head(norm(h_L))
//! ```

use super::config::LlamaConfig;
use super::exec::{AttentionState, CpuExec, Executor, Slot, Store};
use super::ops::{self, AttnShape, Real};
use crate::train::error::{Result, TrainError as Error};
use crate::train::memory::{self, MemoryPlan};
use rayon::prelude::*;

use crate::rng::SplitMix64;
use std::ops::Range;

/// A tensor's place in a flat buffer: elements `offset .. offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    /// Index of the tensor's first element in the buffer.
    pub offset: usize,
    /// Number of elements (the product of the tensor's shape).
    pub len: usize,
}

impl Span {
    /// The span as an index range into its buffer.
    pub fn range(self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
    /// The span's elements of `buf`; panics if `buf` is shorter than `offset + len`.
    pub fn of<F>(self, buf: &[F]) -> &[F] {
        &buf[self.range()]
    }
    /// The span's elements of `buf`, mutably; panics like [`Span::of`].
    pub fn of_mut<F>(self, buf: &mut [F]) -> &mut [F] {
        &mut buf[self.range()]
    }
}

/// How a parameter tensor is initialized (HF `LlamaPreTrainedModel._init_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// `normal(0, initializer_range)`: embeddings and linear weights.
    Normal,
    /// All ones: RMSNorm weights.
    Ones,
    /// All zeros: Qwen2's projection biases.
    Zeros,
}

/// One named parameter tensor. `shape` is PyTorch's (`[out, in]` for a linear weight), row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Hugging Face `state_dict` name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// PyTorch shape; its product is `span.len`.
    pub shape: Vec<usize>,
    /// Where the tensor lives in the parameter (and gradient) buffer.
    pub span: Span,
    /// How [`Llama::init_params`] fills it.
    pub init: Init,
}

/// The parameters of decoder layer `i` (`model.layers.{i}.…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerParams {
    /// `self_attn.q_proj.weight` `[NH*D, C]`
    pub q_proj: Span,
    /// `self_attn.k_proj.weight` `[NKV*D, C]`
    pub k_proj: Span,
    /// `self_attn.v_proj.weight` `[NKV*D, C]`
    pub v_proj: Span,
    /// `self_attn.o_proj.weight` `[C, NH*D]`
    pub o_proj: Span,
    /// `mlp.gate_proj.weight` `[I, C]`
    pub gate_proj: Span,
    /// `mlp.up_proj.weight` `[I, C]`
    pub up_proj: Span,
    /// `mlp.down_proj.weight` `[C, I]`
    pub down_proj: Span,
    /// `input_layernorm.weight` `[C]`
    pub input_layernorm: Span,
    /// `post_attention_layernorm.weight` `[C]`
    pub post_attention_layernorm: Span,
    /// `self_attn.{q,k,v}_proj.bias` `[NH*D]`, `[NKV*D]`, `[NKV*D]` (Qwen2's `qkv_bias`).
    pub qkv_bias: Option<[Span; 3]>,
}

/// Where every parameter lives in the one flat parameter buffer (and, identically, in the
/// gradient buffer). Tensors are stored in the order of HF's `state_dict()`. With tied embeddings
/// `lm_head` is the same span as `embed_tokens` and `lm_head.weight` is not listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    /// `model.embed_tokens.weight` `[V, C]`
    pub embed_tokens: Span,
    /// The decoder layers' weights, layer 0 first.
    pub layers: Vec<LayerParams>,
    /// `model.norm.weight` `[C]`
    pub norm: Span,
    /// `lm_head.weight` `[V, C]`, or `embed_tokens` when tied.
    pub lm_head: Span,
    tensors: Vec<TensorInfo>,
    total: usize,
}

impl ParamLayout {
    fn new(cfg: &LlamaConfig) -> Self {
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let mut tensors = Vec::new();
        let mut total = 0;
        let mut push = |name: String, shape: Vec<usize>, init: Init| {
            let span = Span {
                offset: total,
                len: shape.iter().product(),
            };
            total += span.len;
            tensors.push(TensorInfo {
                name,
                shape,
                span,
                init,
            });
            span
        };
        let embed_tokens = push("model.embed_tokens.weight".into(), vec![v, c], Init::Normal);
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                // HF's state_dict order: each bias right after its weight.
                let mut proj = |name: &str, out: usize, inp: usize, bias: bool| {
                    let w = push(
                        format!("model.layers.{l}.{name}.weight"),
                        vec![out, inp],
                        Init::Normal,
                    );
                    let b = bias.then(|| {
                        push(
                            format!("model.layers.{l}.{name}.bias"),
                            vec![out],
                            Init::Zeros,
                        )
                    });
                    (w, b)
                };
                let qkv = cfg.qkv_bias;
                let (q_proj, q_bias) = proj("self_attn.q_proj", qd, c, qkv);
                let (k_proj, k_bias) = proj("self_attn.k_proj", kvd, c, qkv);
                let (v_proj, v_bias) = proj("self_attn.v_proj", kvd, c, qkv);
                let (o_proj, _) = proj("self_attn.o_proj", c, qd, false);
                let (gate_proj, _) = proj("mlp.gate_proj", i, c, false);
                let (up_proj, _) = proj("mlp.up_proj", i, c, false);
                let (down_proj, _) = proj("mlp.down_proj", c, i, false);
                let qkv_bias = q_bias.zip(k_bias).zip(v_bias).map(|((q, k), v)| [q, k, v]);
                let mut norm = |name: &str| {
                    push(
                        format!("model.layers.{l}.{name}.weight"),
                        vec![c],
                        Init::Ones,
                    )
                };
                LayerParams {
                    qkv_bias,
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj,
                    gate_proj,
                    up_proj,
                    down_proj,
                    input_layernorm: norm("input_layernorm"),
                    post_attention_layernorm: norm("post_attention_layernorm"),
                }
            })
            .collect();
        let norm = push("model.norm.weight".into(), vec![c], Init::Ones);
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens
        } else {
            push("lm_head.weight".into(), vec![v, c], Init::Normal)
        };
        ParamLayout {
            embed_tokens,
            layers,
            norm,
            lm_head,
            tensors,
            total,
        }
    }

    /// Every stored tensor, in buffer (= HF `state_dict`) order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor of that HF name; `lm_head.weight` resolves to the embedding when tied.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .or_else(|| match name {
                "lm_head.weight" if self.lm_head == self.embed_tokens => self.tensors.first(),
                _ => None,
            })
    }

    /// Number of scalars in the parameter (and gradient) buffer.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// A point of the residual stream whose value a forward exposes and whose gradient a backward
/// accepts (hidden-state distillation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenPoint {
    /// The token embeddings, input of layer 0.
    Embeddings,
    /// The output of decoder layer `l` (input of layer `l + 1`), before any norm.
    LayerOutput(usize),
    /// `model.norm` of the last layer's output: what `lm_head` reads.
    Final,
}

impl HiddenPoint {
    /// Entry `i` of HF's `output_hidden_states=True` tuple (length `num_layers + 1`): the
    /// embeddings, the outputs of layers `0 .. num_layers - 1`, then the final normed state.
    pub fn from_hf_index(i: usize, num_layers: usize) -> Option<Self> {
        match i {
            0 => Some(HiddenPoint::Embeddings),
            i if i < num_layers => Some(HiddenPoint::LayerOutput(i - 1)),
            i if i == num_layers => Some(HiddenPoint::Final),
            _ => None,
        }
    }
}

/// Activations of one decoder layer, `[N, ·]` with `N = batch * seq` rows.
#[derive(Debug, Clone, Copy)]
struct LayerActs {
    ln1: Span,      // [N, C]    input_layernorm(h)
    ln1_rstd: Span, // [N]
    q: Span,        // [N, NH*D] after RoPE
    k: Span,        // [N, NKV*D] after RoPE
    v: Span,        // [N, NKV*D]
    att: Span,      // the attention's saved state (CPU: [B, T, NH, T] probabilities)
    atty: Span,     // [N, NH*D] attention output, o_proj's input
    res2: Span,     // [N, C]    h + attention branch
    ln2: Span,      // [N, C]    post_attention_layernorm(res2)
    ln2_rstd: Span, // [N]
    gate: Span,     // [N, I]
    up: Span,       // [N, I]
    swiglu: Span,   // [N, I]    silu(gate) * up, down_proj's input
    out: Span,      // [N, C]    res2 + MLP branch: the layer's output
}

#[derive(Debug, Clone)]
pub(crate) struct ActLayout {
    /// What the buffers are for (an inference layout has no backward).
    pub(crate) pass: Pass,
    pub(crate) rope_cos: Span, // [T, D/2]
    pub(crate) rope_sin: Span, // [T, D/2]
    encoded: Span,             // [N, C] embeddings
    layers: Vec<LayerActs>,
    branch: Span, // [N, C] o_proj / down_proj output before the residual add (not kept)
    lnf: Span,    // [N, C] final norm
    lnf_rstd: Span, // [N]
    pub(crate) logits: Span, // [N, V]
}

impl ActLayout {
    /// Where the hidden state at `point` lives; `None` for a layer the model does not have.
    pub(crate) fn hidden(&self, point: HiddenPoint) -> Option<Span> {
        Some(match point {
            HiddenPoint::Embeddings => self.encoded,
            HiddenPoint::LayerOutput(l)
                if self.pass == Pass::Evaluation && l + 1 != self.layers.len() =>
            {
                return None
            }
            HiddenPoint::LayerOutput(l) => self.layers.get(l)?.out,
            HiddenPoint::Final => self.lnf,
        })
    }
}

/// Backward scratch, reused by every layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GradLayout {
    dres: Span,    // [N, C] gradient of the residual stream
    dln: Span,     // [N, C] gradient of a norm's output
    dq: Span,      // [N, NH*D]
    dk: Span,      // [N, NKV*D]
    dv: Span,      // [N, NKV*D]
    datty: Span,   // [N, NH*D]
    dpreatt: Span, // [B, T, NH, T]
    dswiglu: Span, // [N, I]
    dgate: Span,   // [N, I]
    dup: Span,     // [N, I]
    pub(crate) total: usize,
}

/// The error of a backward on buffers made for inference.
pub(crate) fn no_backward() -> Error {
    Error::InvalidOption {
        name: "activations",
        value: "inference buffers".into(),
        reason: "buffers made for forwards only hold no backward state: make them for training",
    }
}

/// What a pass's buffers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Everything the backward reads: every layer's intermediate tensors, and a backward
    /// scratch.
    Training,
    /// A forward only (evaluation, sampling, a frozen teacher): the layers' intermediate tensors
    /// share one set of spans, overwritten layer by layer; every layer's output (the hidden
    /// states a hidden-state loss reads), the final norm and the logits are kept. No backward.
    Inference,
    /// A forward for evaluation at real-model size: as [`Pass::Inference`], but the layers'
    /// outputs alternate between two spans (only the last layer's and the final norm's survive)
    /// and the logits are not made; the caller applies `lm_head` to the final norm a few rows at
    /// a time ([`Llama::logits_rows`]). Activations hold about one layer's tensors, whatever the
    /// depth and the vocabulary.
    Evaluation,
}

/// Lays spans end to end; `None` when a size overflows.
struct Bump(Option<usize>);

impl Bump {
    fn take(&mut self, dims: &[usize]) -> Span {
        let len = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let offset = self.0.unwrap_or(0);
        self.0 = match (self.0, len) {
            (Some(at), Some(len)) => at.checked_add(len),
            _ => None,
        };
        Span {
            offset,
            len: len.unwrap_or(0),
        }
    }

    /// A span of f32 statistics (RMSNorm's rstd, the attention state, the RoPE tables) in a
    /// buffer whose elements may be narrower: `width` elements per value (2 in a bf16 buffer),
    /// starting at a multiple of `width` so the values are aligned.
    fn take_stat(&mut self, dims: &[usize], width: usize) -> Span {
        self.0 = self.0.and_then(|at| at.checked_next_multiple_of(width));
        let mut wide = dims.to_vec();
        wide.push(width);
        self.take(&wide)
    }
}

/// The layouts of the forward's buffer and the backward's scratch for `batch` x `seq`, with the
/// attention's state sized by the executor (`state`, from [`Executor::attention_state`]), and the
/// forward buffer's total; checked for overflow. The f32 statistics (RoPE tables, RMSNorm's rstd,
/// the attention state) take `stat_width` buffer elements per value: 1 in an f32 or f64 buffer,
/// 2 in a bf16 one.
pub(crate) fn layouts(
    model: &Llama,
    batch: usize,
    seq: usize,
    state: AttentionState,
    pass: Pass,
    stat_width: usize,
) -> Result<(ActLayout, GradLayout, usize)> {
    let cfg = model.config();
    let invalid = |name, value: usize, reason| Error::InvalidOption {
        name,
        value: value.to_string(),
        reason,
    };
    if batch == 0 {
        return Err(invalid("batch", batch, "must be positive"));
    }
    if seq == 0 {
        return Err(invalid("seq", seq, "must be positive"));
    }
    if seq > cfg.max_position_embeddings {
        return Err(invalid("seq", seq, "exceeds max_position_embeddings"));
    }
    let n = batch.checked_mul(seq);
    let n = n.ok_or_else(|| invalid("batch", batch, "batch * seq overflows"))?;
    let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim());

    let mut a = Bump(Some(0));
    let w = stat_width;
    let rope_cos = a.take_stat(&[seq, hd / 2], w);
    let rope_sin = a.take_stat(&[seq, hd / 2], w);
    let encoded = a.take(&[n, c]);
    let layer = |a: &mut Bump| LayerActs {
        ln1: a.take(&[n, c]),
        ln1_rstd: a.take_stat(&[n], w),
        q: a.take(&[n, qd]),
        k: a.take(&[n, kvd]),
        v: a.take(&[n, kvd]),
        att: a.take_stat(&[state.saved], w),
        atty: a.take(&[n, qd]),
        res2: a.take(&[n, c]),
        ln2: a.take(&[n, c]),
        ln2_rstd: a.take_stat(&[n], w),
        gate: a.take(&[n, i]),
        up: a.take(&[n, i]),
        swiglu: a.take(&[n, i]),
        out: a.take(&[n, c]),
    };
    let shared = (pass != Pass::Training).then(|| layer(&mut a));
    // Evaluation: layer l writes its output to the span of l % 2, reading l - 1's from the other.
    let second_out = shared
        .filter(|_| pass == Pass::Evaluation)
        .map(|s| [s.out, a.take(&[n, c])]);
    let layers = (0..cfg.num_hidden_layers)
        .map(|l| match (shared, second_out) {
            (Some(s), Some(outs)) => LayerActs {
                out: outs[l % 2],
                ..s
            },
            // Layer 0 owns the shared spans (and its own output); the others add an output.
            (Some(s), None) if l > 0 => LayerActs {
                out: a.take(&[n, c]),
                ..s
            },
            (Some(s), None) => s,
            (None, _) => layer(&mut a),
        })
        .collect();
    let branch = a.take(&[n, c]);
    let lnf = a.take(&[n, c]);
    let lnf_rstd = a.take_stat(&[n], w);
    let logits = match pass {
        Pass::Evaluation => a.take(&[0]),
        _ => a.take(&[n, v]),
    };
    let total = a.0;

    let mut g = Bump(Some(0));
    let grad_layout = GradLayout {
        dres: g.take(&[n, c]),
        dln: g.take(&[n, c]),
        dq: g.take(&[n, qd]),
        dk: g.take(&[n, kvd]),
        dv: g.take(&[n, kvd]),
        datty: g.take(&[n, qd]),
        dpreatt: g.take_stat(&[state.scratch], w),
        dswiglu: g.take(&[n, i]),
        dgate: g.take(&[n, i]),
        dup: g.take(&[n, i]),
        total: g.0.unwrap_or(0),
    };
    let (Some(total), Some(_)) = (total, g.0) else {
        return Err(invalid("batch", batch, "activation size overflows usize"));
    };
    let grad_layout = match pass {
        Pass::Training => grad_layout,
        Pass::Inference | Pass::Evaluation => GradLayout {
            total: 0,
            ..grad_layout
        },
    };
    let layout = ActLayout {
        pass,
        rope_cos,
        rope_sin,
        encoded,
        layers,
        branch,
        lnf,
        lnf_rstd,
        logits,
    };
    Ok((layout, grad_layout, total))
}

/// The CPU executor's attention state for `batch` x `seq`.
fn cpu_attention(model: &Llama, batch: usize, seq: usize) -> AttentionState {
    CpuExec::<f32>::attention_state(&model.attn_shape(batch, seq))
}

/// Everything a forward pass keeps for the backward, for one (batch, seq), in one contiguous
/// buffer; the backward's scratch is a second buffer, allocated by the first backward.
#[derive(Debug, Clone)]
pub struct Activations<F> {
    config: LlamaConfig,
    batch: usize,
    seq: usize,
    layout: ActLayout,
    grad_layout: GradLayout,
    buf: Vec<F>,
    grad_buf: Vec<F>,
    tokens: Vec<u32>,
    ready: bool,
}

impl<F: Real> Activations<F> {
    /// Elements of the forward buffer and of the backward's scratch for `batch` sequences of
    /// `seq` tokens for `pass` (what [`Activations::new`] or [`Activations::inference`] and the
    /// first backward allocate), checked for overflow; nothing is allocated.
    pub fn buffer_elements(
        model: &Llama,
        batch: usize,
        seq: usize,
        pass: Pass,
    ) -> Result<(usize, usize)> {
        let state = cpu_attention(model, batch, seq);
        let (_, grad_layout, total) = layouts(model, batch, seq, state, pass, 1)?;
        Ok((total, grad_layout.total))
    }

    /// Buffers for a forward and backward of `batch` sequences of `seq` tokens
    /// (`seq <= max_position_embeddings`); an error when they do not fit the available memory
    /// (backward scratch included).
    pub fn new(model: &Llama, batch: usize, seq: usize) -> Result<Self> {
        Self::with_pass(model, batch, seq, Pass::Training)
    }

    /// Buffers for forwards only (see [`Pass::Inference`]): about `2 + layers` hidden-state
    /// tensors and the logits instead of every layer's intermediate tensors; a backward on them
    /// is an error.
    pub fn inference(model: &Llama, batch: usize, seq: usize) -> Result<Self> {
        Self::with_pass(model, batch, seq, Pass::Inference)
    }

    /// Buffers for evaluation (see [`Pass::Evaluation`]): about one layer's tensors; the
    /// logits come from [`Llama::logits_rows`], no hidden state but the last layer's output
    /// and the final norm is kept, and a backward is an error.
    pub fn evaluation(model: &Llama, batch: usize, seq: usize) -> Result<Self> {
        Self::with_pass(model, batch, seq, Pass::Evaluation)
    }

    /// What the buffers are for.
    pub fn pass(&self) -> Pass {
        self.layout.pass
    }

    fn with_pass(model: &Llama, batch: usize, seq: usize, pass: Pass) -> Result<Self> {
        let (layout, grad_layout, total) =
            layouts(model, batch, seq, cpu_attention(model, batch, seq), pass, 1)?;
        let cfg = model.config();
        let mut plan = MemoryPlan::new();
        let width = std::mem::size_of::<F>();
        plan.add("activations", Some(total), width);
        plan.add("backward scratch", Some(grad_layout.total), width);
        let what = match pass {
            Pass::Training => "a forward and backward pass",
            Pass::Inference | Pass::Evaluation => "a forward pass",
        };
        plan.check(&format!("{what} at batch {batch} x seq {seq}"))?;
        let mut buf = memory::filled(total, F::ZERO, "the activation buffer")?;
        let (cos, sin) = ops::rope_tables_from::<F>(seq, &cfg.rope_inv_freq());
        layout.rope_cos.of_mut(&mut buf).copy_from_slice(&cos);
        layout.rope_sin.of_mut(&mut buf).copy_from_slice(&sin);
        Ok(Activations {
            config: cfg.clone(),
            batch,
            seq,
            layout,
            grad_layout,
            buf,
            grad_buf: Vec::new(),
            tokens: Vec::new(),
            ready: false,
        })
    }

    /// Sequences per forward, B, that the buffers are sized for.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Tokens per sequence, T, that the buffers are sized for.
    pub fn seq(&self) -> usize {
        self.seq
    }
    /// Scalars held: the forward buffer and (once a backward ran) its scratch.
    pub fn len(&self) -> usize {
        self.buf.len() + self.grad_buf.len()
    }
    /// Whether no scalars are held; never true for buffers from [`Activations::new`].
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The tokens of the last forward, `[B*T]`.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// `[B*T, V]`: the last forward's logits.
    pub fn logits(&self) -> &[F] {
        self.layout.logits.of(&self.buf)
    }
    /// `[B*T, C]`: the residual stream at `point` in the last forward; `None` for a layer index
    /// past the last layer.
    pub fn hidden(&self, point: HiddenPoint) -> Option<&[F]> {
        Some(self.layout.hidden(point)?.of(&self.buf))
    }
    /// The `num_layers + 1` states HF returns with `output_hidden_states=True`, each `[B*T, C]`.
    pub fn hf_hidden_states(&self) -> Vec<&[F]> {
        let layers = self.layout.layers.len();
        (0..=layers)
            .filter_map(|i| self.hidden(HiddenPoint::from_hf_index(i, layers)?))
            .collect()
    }
}

fn slot(store: Store, span: Span) -> Slot {
    Slot { store, span }
}

fn input_slot(k: usize, len: usize) -> Slot {
    slot(Store::Input(k), Span { offset: 0, len })
}

/// Elements per independently seeded stream of the initialization (so it can run in parallel
/// and still not depend on the thread count).
const INIT_CHUNK: usize = 1 << 16;

/// Fills `dst` with `normal(0, std)` values drawn in f64 and rounded to `F`, from streams seeded
/// by (seed, stream, chunk): the same arguments give the same values whatever the thread count.
/// [`Llama::init_params`] uses stream = tensor index; other trainable tensors (e.g. a trainer's
/// projections) take streams past the layout's.
pub fn normal_fill<F: Real>(dst: &mut [F], std: f64, seed: u64, stream: u64) {
    dst.par_chunks_mut(INIT_CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let s = SplitMix64::new(seed).next_u64() ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            let s = SplitMix64::new(s).next_u64() ^ (ci as u64);
            let mut rng = SplitMix64::new(SplitMix64::new(s).next_u64());
            // Box-Muller: two normals per two uniforms.
            for pair in chunk.chunks_mut(2) {
                let r = (-2.0 * rng.unit().ln()).sqrt();
                let theta = 2.0 * std::f64::consts::PI * rng.unit();
                pair[0] = F::from_f64(std * r * theta.cos());
                if let Some(x) = pair.get_mut(1) {
                    *x = F::from_f64(std * r * theta.sin());
                }
            }
        });
}

/// A Llama-style decoder: a validated configuration and its parameter layout. Parameters,
/// gradients and activations are buffers the caller owns.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    layout: ParamLayout,
}

impl Llama {
    /// The model of `config`; errors when [`LlamaConfig::validate`] rejects it.
    pub fn new(config: LlamaConfig) -> Result<Self> {
        config.validate()?;
        // Any use of the model holds its parameters (f32 at least); a configuration whose
        // parameters cannot fit is refused before its tensor table is even built.
        let count = config.param_count();
        let mut plan = MemoryPlan::new();
        plan.add("f32 parameters", count, 4);
        plan.check(&format!(
            "a model of {} parameters (hidden_size {}, num_hidden_layers {}, vocab_size {})",
            count.unwrap_or(usize::MAX),
            config.hidden_size,
            config.num_hidden_layers,
            config.vocab_size
        ))?;
        let layout = ParamLayout::new(&config);
        Ok(Llama { config, layout })
    }

    /// The validated hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Where each parameter tensor lives in the flat parameter and gradient buffers.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Length of the parameter (and gradient) buffer.
    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    /// Fresh parameters: norms at one, every other tensor `normal(0, initializer_range)`. The
    /// values are drawn in f64 and rounded to `F`, from streams seeded by (seed, tensor, chunk):
    /// the same seed gives the same parameters whatever the thread count, and the f32 parameters
    /// are the f64 ones rounded.
    pub fn init_params<F: Real>(&self, seed: u64) -> Vec<F> {
        let std = self.config.initializer_range;
        let mut params = vec![F::ZERO; self.layout.total];
        for (ti, t) in self.layout.tensors.iter().enumerate() {
            let dst = t.span.of_mut(&mut params);
            match t.init {
                Init::Ones => dst.fill(F::ONE),
                Init::Zeros => dst.fill(F::ZERO),
                Init::Normal => normal_fill(dst, std, seed, ti as u64),
            }
        }
        params
    }

    /// `[B*T]` tokens, each below the vocabulary size.
    pub(crate) fn check_tokens(&self, tokens: &[u32], b: usize, t: usize) -> Result<()> {
        self.check_len(
            "tokens",
            tokens.len(),
            b * t,
            format!("[batch {b}, seq {t}]"),
        )?;
        let vocab = self.config.vocab_size;
        if let Some((position, &token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &x)| x as usize >= vocab)
        {
            return Err(Error::TokenOutOfRange {
                position,
                token,
                vocab,
            });
        }
        Ok(())
    }

    /// The attention's shape at `batch` x `seq`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn attention_shape(&self, batch: usize, seq: usize) -> AttnShape {
        self.attn_shape(batch, seq)
    }

    fn attn_shape(&self, batch: usize, seq: usize) -> AttnShape {
        AttnShape {
            batch,
            seq,
            n_heads: self.config.num_attention_heads,
            n_kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim(),
        }
    }

    pub(crate) fn check_len(
        &self,
        tensor: &'static str,
        actual: usize,
        expected: usize,
        shape: String,
    ) -> Result<()> {
        match actual == expected {
            true => Ok(()),
            false => Err(Error::ShapeMismatch {
                tensor,
                expected,
                actual,
                shape,
            }),
        }
    }

    /// `params` or `grads`: one scalar per parameter of the layout.
    pub(crate) fn check_params(&self, tensor: &'static str, len: usize) -> Result<()> {
        let shape = format!(
            "{} tensors of the parameter layout",
            self.layout.tensors.len()
        );
        self.check_len(tensor, len, self.layout.total, shape)
    }

    fn check_acts<F>(&self, acts: &Activations<F>) -> Result<()> {
        self.check_buffers_for(&acts.config, acts.batch, acts.seq)
    }

    /// Activation buffers (of any executor) made for `config` at `batch` x `seq` belong to this
    /// model.
    pub(crate) fn check_buffers_for(
        &self,
        config: &LlamaConfig,
        batch: usize,
        seq: usize,
    ) -> Result<()> {
        if config != &self.config {
            return Err(Error::InvalidOption {
                name: "activations",
                value: format!("batch {batch} seq {seq}"),
                reason: "were made for another model configuration",
            });
        }
        Ok(())
    }

    /// Runs the model on `tokens` (`[B*T]`, row-major by sequence, each sequence at positions
    /// `0 .. T`) and returns the logits `[B*T, V]`; every activation the backward needs, and the
    /// hidden states of [`Activations::hidden`], stay in `acts`.
    pub fn forward<'a, F: Real>(
        &self,
        params: &[F],
        tokens: &[u32],
        acts: &'a mut Activations<F>,
    ) -> Result<&'a [F]> {
        self.check_params("params", params.len())?;
        self.check_acts(acts)?;
        let (b, t) = (acts.batch, acts.seq);
        self.check_tokens(tokens, b, t)?;
        acts.ready = false;
        acts.tokens.clear();
        acts.tokens.extend_from_slice(tokens);

        let Activations {
            layout,
            buf,
            tokens,
            ..
        } = acts;
        let mut ex = CpuExec::new(params, &mut [], buf, &mut [], Vec::new(), tokens);
        self.forward_ops(&mut ex, layout, b, t)?;
        acts.ready = true;
        Ok(acts.layout.logits.of(&acts.buf))
    }

    /// Accumulates into `grads` (same layout as the parameters) the gradient of a loss whose
    /// gradient with respect to the last forward's logits is `dlogits` `[B*T, V]`.
    pub fn backward<F: Real>(
        &self,
        params: &[F],
        acts: &mut Activations<F>,
        dlogits: &[F],
        grads: &mut [F],
    ) -> Result<()> {
        self.backward_with_hidden(params, acts, Some(dlogits), &[], grads)
    }

    /// [`Llama::backward`] for a loss that also reads hidden states: `dhidden` lists gradients
    /// `[B*T, C]` with respect to points of the residual stream (a point may appear more than
    /// once; the gradients add). `dlogits` may be absent when the loss reads only hidden states.
    pub fn backward_with_hidden<F: Real>(
        &self,
        params: &[F],
        acts: &mut Activations<F>,
        dlogits: Option<&[F]>,
        dhidden: &[(HiddenPoint, &[F])],
        grads: &mut [F],
    ) -> Result<()> {
        let cfg = &self.config;
        self.check_params("params", params.len())?;
        self.check_params("grads", grads.len())?;
        self.check_acts(acts)?;
        if acts.layout.pass != Pass::Training {
            return Err(no_backward());
        }
        if !acts.ready {
            return Err(Error::InvalidOption {
                name: "activations",
                value: "no forward".into(),
                reason: "backward needs a forward on these activations first",
            });
        }
        let (b, t) = (acts.batch, acts.seq);
        let n = b * t;
        let (c, v, layers) = (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers);
        if let Some(dl) = dlogits {
            self.check_len("dlogits", dl.len(), n * v, format!("[{n}, {v}]"))?;
        }
        for (point, g) in dhidden {
            if let HiddenPoint::LayerOutput(l) = *point {
                if l >= layers {
                    return Err(Error::InvalidOption {
                        name: "dhidden",
                        value: format!("LayerOutput({l})"),
                        reason: "no such layer",
                    });
                }
            }
            self.check_len("dhidden", g.len(), n * c, format!("[{n}, {c}]"))?;
        }
        let Activations {
            layout,
            grad_layout,
            buf,
            grad_buf,
            tokens,
            ..
        } = acts;
        if grad_buf.len() != grad_layout.total {
            *grad_buf = memory::filled(grad_layout.total, F::ZERO, "the backward scratch buffer")?;
        }
        // The loss's gradients are the call's inputs: dlogits first, then each hidden state's.
        let mut inputs: Vec<&[F]> = Vec::new();
        let dl = dlogits.map(|d| {
            inputs.push(d);
            input_slot(0, d.len())
        });
        let dh: Vec<(HiddenPoint, Slot)> = dhidden
            .iter()
            .map(|(point, g)| {
                inputs.push(g);
                (*point, input_slot(inputs.len() - 1, g.len()))
            })
            .collect();
        let mut ex = CpuExec::new(params, grads, buf, grad_buf, inputs, tokens);
        self.backward_ops(&mut ex, layout, grad_layout, b, t, dl, &dh)
    }

    /// The forward pass, op by op: the one definition both executors run.
    pub(crate) fn forward_ops<E: Executor>(
        &self,
        ex: &mut E,
        la: &ActLayout,
        b: usize,
        t: usize,
    ) -> Result<()> {
        let cfg = &self.config;
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps;
        let shape = self.attn_shape(b, t);
        let pl = &self.layout;
        let p = |span| slot(Store::Params, span);
        let a = |span| slot(Store::Acts, span);
        let (cos, sin) = (a(la.rope_cos), a(la.rope_sin));

        ex.embedding_forward(a(la.encoded), p(pl.embed_tokens), c)?;
        for (l, (lp, lay)) in pl.layers.iter().zip(&la.layers).enumerate() {
            let inp = a(if l == 0 {
                la.encoded
            } else {
                la.layers[l - 1].out
            });
            let (ln1, q, k, vv, atty, branch) = (
                a(lay.ln1),
                a(lay.q),
                a(lay.k),
                a(lay.v),
                a(lay.atty),
                a(la.branch),
            );
            let (res2, ln2, gate, up, sw) = (
                a(lay.res2),
                a(lay.ln2),
                a(lay.gate),
                a(lay.up),
                a(lay.swiglu),
            );
            // attention block
            ex.rmsnorm_forward(ln1, a(lay.ln1_rstd), inp, p(lp.input_layernorm), eps)?;
            ex.matmul_forward(q, ln1, p(lp.q_proj), c, qd)?;
            ex.matmul_forward(k, ln1, p(lp.k_proj), c, kvd)?;
            ex.matmul_forward(vv, ln1, p(lp.v_proj), c, kvd)?;
            if let Some([qb, kb, vb]) = lp.qkv_bias {
                ex.bias_forward(q, p(qb), qd)?;
                ex.bias_forward(k, p(kb), kvd)?;
                ex.bias_forward(vv, p(vb), kvd)?;
            }
            ex.rope(q, cos, sin, t, nh, hd, false)?;
            ex.rope(k, cos, sin, t, nkv, hd, false)?;
            ex.attention_forward(atty, a(lay.att), q, k, vv, shape)?;
            ex.matmul_forward(branch, atty, p(lp.o_proj), qd, c)?;
            ex.residual_forward(res2, inp, branch)?;
            // MLP block
            ex.rmsnorm_forward(
                ln2,
                a(lay.ln2_rstd),
                res2,
                p(lp.post_attention_layernorm),
                eps,
            )?;
            ex.matmul_forward(gate, ln2, p(lp.gate_proj), c, i)?;
            ex.matmul_forward(up, ln2, p(lp.up_proj), c, i)?;
            ex.swiglu_forward(sw, gate, up)?;
            ex.matmul_forward(branch, sw, p(lp.down_proj), i, c)?;
            ex.residual_forward(a(lay.out), res2, branch)?;
        }
        let last = a(la.layers[la.layers.len() - 1].out);
        ex.rmsnorm_forward(a(la.lnf), a(la.lnf_rstd), last, p(pl.norm), eps)?;
        if la.pass == Pass::Evaluation {
            return Ok(());
        }
        ex.matmul_forward(a(la.logits), a(la.lnf), p(pl.lm_head), c, v)
    }

    /// The logits `[rows.len(), V]` of rows `rows` of the last forward, into `out`: `lm_head`
    /// applied to the final norm, as the forward computes them. For [`Pass::Evaluation`]
    /// buffers, whose forward leaves the logits out so that no `[B*T, V]` tensor is ever held.
    pub fn logits_rows<F: Real>(
        &self,
        params: &[F],
        acts: &Activations<F>,
        rows: Range<usize>,
        out: &mut [F],
    ) -> Result<()> {
        self.check_params("params", params.len())?;
        self.check_acts(acts)?;
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        let n = acts.batch * acts.seq;
        if !acts.ready || rows.start > rows.end || rows.end > n || out.len() != rows.len() * v {
            return Err(Error::InvalidOption {
                name: "rows",
                value: format!("{rows:?}"),
                reason: "needs a forward first, rows within batch * seq and out of rows * vocab",
            });
        }
        let lnf = &acts.layout.lnf.of(&acts.buf)[rows.start * c..rows.end * c];
        ops::matmul_forward(out, lnf, self.layout.lm_head.of(params), c, v);
        Ok(())
    }

    /// The backward pass, op by op (the residual stream's gradient `dres` passes through each
    /// residual add unchanged, so it is kept in place and each branch's backward reads it as its
    /// output gradient and adds its input gradient into it). `dlogits` and `dhidden` are slots of
    /// the call's inputs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_ops<E: Executor>(
        &self,
        ex: &mut E,
        la: &ActLayout,
        gl: &GradLayout,
        b: usize,
        t: usize,
        dlogits: Option<Slot>,
        dhidden: &[(HiddenPoint, Slot)],
    ) -> Result<()> {
        let cfg = &self.config;
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim());
        let (nh, nkv, layers) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.num_hidden_layers,
        );
        let shape = self.attn_shape(b, t);
        let pl = &self.layout;
        let p = |span| slot(Store::Params, span);
        let g = |span| slot(Store::Grads, span);
        let a = |span| slot(Store::Acts, span);
        let sc = |span| slot(Store::Scratch, span);
        let (cos, sin) = (a(la.rope_cos), a(la.rope_sin));
        let extra = |ex: &mut E, dst: Slot, at: HiddenPoint| -> Result<()> {
            for (_, src) in dhidden.iter().filter(|(pt, _)| *pt == at) {
                ex.add_into(dst, *src)?;
            }
            Ok(())
        };
        let (dres, dln, dq, dk, dv) = (sc(gl.dres), sc(gl.dln), sc(gl.dq), sc(gl.dk), sc(gl.dv));
        let (datty, dpreatt, dsw, dgate, dup) = (
            sc(gl.datty),
            sc(gl.dpreatt),
            sc(gl.dswiglu),
            sc(gl.dgate),
            sc(gl.dup),
        );

        // lm_head and the final norm
        ex.zero(dln)?;
        if let Some(dl) = dlogits {
            ex.matmul_backward(dln, g(pl.lm_head), dl, a(la.lnf), p(pl.lm_head), c, v)?;
        }
        extra(ex, dln, HiddenPoint::Final)?;
        ex.zero(dres)?;
        let last = a(la.layers[layers - 1].out);
        ex.rmsnorm_backward(dres, g(pl.norm), dln, last, p(pl.norm), a(la.lnf_rstd))?;

        for l in (0..layers).rev() {
            let (lp, lay) = (&pl.layers[l], &la.layers[l]);
            let input = a(if l == 0 {
                la.encoded
            } else {
                la.layers[l - 1].out
            });
            extra(ex, dres, HiddenPoint::LayerOutput(l))?;
            // MLP block
            ex.zero(dsw)?;
            ex.matmul_backward(
                dsw,
                g(lp.down_proj),
                dres,
                a(lay.swiglu),
                p(lp.down_proj),
                i,
                c,
            )?;
            ex.zero(dgate)?;
            ex.zero(dup)?;
            ex.swiglu_backward(dgate, dup, dsw, a(lay.gate), a(lay.up))?;
            ex.zero(dln)?;
            ex.matmul_backward(
                dln,
                g(lp.gate_proj),
                dgate,
                a(lay.ln2),
                p(lp.gate_proj),
                c,
                i,
            )?;
            ex.matmul_backward(dln, g(lp.up_proj), dup, a(lay.ln2), p(lp.up_proj), c, i)?;
            ex.rmsnorm_backward(
                dres,
                g(lp.post_attention_layernorm),
                dln,
                a(lay.res2),
                p(lp.post_attention_layernorm),
                a(lay.ln2_rstd),
            )?;
            // attention block
            ex.zero(datty)?;
            ex.matmul_backward(datty, g(lp.o_proj), dres, a(lay.atty), p(lp.o_proj), qd, c)?;
            ex.zero(dq)?;
            ex.zero(dk)?;
            ex.zero(dv)?;
            ex.attention_backward(
                dq,
                dk,
                dv,
                dpreatt,
                datty,
                a(lay.q),
                a(lay.k),
                a(lay.v),
                a(lay.atty),
                a(lay.att),
                shape,
            )?;
            ex.rope(dq, cos, sin, t, nh, hd, true)?;
            ex.rope(dk, cos, sin, t, nkv, hd, true)?;
            if let Some([qb, kb, vb]) = lp.qkv_bias {
                ex.bias_backward(g(qb), dq, qd)?;
                ex.bias_backward(g(kb), dk, kvd)?;
                ex.bias_backward(g(vb), dv, kvd)?;
            }
            ex.zero(dln)?;
            ex.matmul_backward(dln, g(lp.q_proj), dq, a(lay.ln1), p(lp.q_proj), c, qd)?;
            ex.matmul_backward(dln, g(lp.k_proj), dk, a(lay.ln1), p(lp.k_proj), c, kvd)?;
            ex.matmul_backward(dln, g(lp.v_proj), dv, a(lay.ln1), p(lp.v_proj), c, kvd)?;
            ex.rmsnorm_backward(
                dres,
                g(lp.input_layernorm),
                dln,
                input,
                p(lp.input_layernorm),
                a(lay.ln1_rstd),
            )?;
        }
        extra(ex, dres, HiddenPoint::Embeddings)?;
        ex.embedding_backward(g(pl.embed_tokens), dres, c)
    }
}
