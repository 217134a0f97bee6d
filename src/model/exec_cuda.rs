//! The device executor: the model's passes (`Llama::forward_ops`, `Llama::backward_ops`) on
//! device buffers, through the crate's kernels and cuBLAS, on a real GPU or the emulated one.
//! The forward's activations and the backward's scratch are one allocation each, sized up front
//! from the configuration, batch and sequence length; a pass allocates nothing.
//!
//! Generic over the [`Storage`] type `T` of the weights the pass reads, the activations and
//! their gradients (f32, or bf16 for mixed precision); the parameter gradients are f32 either
//! way, and so are the statistics inside the activation buffers (RoPE tables, RMSNorm's rstd,
//! the attention's log-sum-exps and deltas), laid out at `4 / size_of::<T>()` elements each.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceSlice};

use super::config::LlamaConfig;
use super::exec::{AttentionState, Executor, Slot, Store};
use super::llama::{layouts, no_backward, ActLayout, GradLayout, HiddenPoint, Llama, Pass, Span};
use super::ops;
use crate::cuda::{CudaKernels, DeviceSpan, Storage};
use crate::shapes::AttnShape;
use crate::train::error::{Result, TrainError as Error};

/// The executor over one pass's device stores.
pub struct DeviceExec<'a, T> {
    dev: &'a CudaKernels,
    params: DeviceSpan<T>,
    grads: Option<DeviceSpan<f32>>,
    acts: DeviceSpan<T>,
    scratch: Option<DeviceSpan<T>>,
    inputs: Vec<DeviceSpan<T>>,
    tokens: &'a CudaSlice<u32>,
    tokens_host: &'a [u32],
}

/// Buffer elements per f32 statistic in a buffer of `T`.
fn stat_width<T>() -> usize {
    (4 / std::mem::size_of::<T>()).max(1)
}

fn missing(what: &'static str) -> Error {
    Error::InvalidOption {
        name: "executor",
        value: what.into(),
        reason: "this pass was given no such buffer",
    }
}

impl<T: Storage> DeviceExec<'_, T> {
    /// A tensor of the storage type: weights, activations, their gradients, the call's inputs.
    fn span(&self, s: Slot) -> Result<DeviceSpan<T>> {
        let store = match s.store {
            Store::Params => &self.params,
            Store::Acts => &self.acts,
            Store::Scratch => self.scratch.as_ref().ok_or_else(|| missing("scratch"))?,
            Store::Input(k) => self.inputs.get(k).ok_or_else(|| missing("input"))?,
            Store::Grads => {
                return Err(Error::InvalidOption {
                    name: "executor",
                    value: "grads".into(),
                    reason: "parameter gradients are f32, not a storage-type tensor",
                })
            }
        };
        Ok(store.sub(s.span.offset, s.span.len)?)
    }

    /// A parameter gradient (f32).
    fn grad(&self, s: Slot) -> Result<DeviceSpan<f32>> {
        match s.store {
            Store::Grads => {
                let g = self.grads.as_ref().ok_or_else(|| missing("grads"))?;
                Ok(g.sub(s.span.offset, s.span.len)?)
            }
            _ => Err(Error::InvalidOption {
                name: "executor",
                value: format!("{:?}", s.store),
                reason: "a parameter gradient must be in the gradient store",
            }),
        }
    }

    /// f32 statistics inside a storage-type buffer (laid out `stat_width` elements each).
    fn stat(&self, s: Slot) -> Result<DeviceSpan<f32>> {
        let w = stat_width::<T>();
        Ok(self.span(s)?.cast::<f32>(s.span.len / w))
    }
}

impl<T: Storage> Executor for DeviceExec<'_, T> {
    fn attention_state(s: &AttnShape) -> AttentionState {
        let rows = s.batch * s.seq * s.n_heads;
        AttentionState {
            saved: rows,
            scratch: rows,
        }
    }
    fn embedding_forward(&mut self, out: Slot, wte: Slot, c: usize) -> Result<()> {
        let (mut o, w) = (self.span(out)?, self.span(wte)?);
        Ok(self
            .dev
            .embedding_forward(&mut o, self.tokens, self.tokens_host, &w, c)?)
    }
    fn embedding_backward(&mut self, dwte: Slot, dout: Slot, c: usize) -> Result<()> {
        let (mut g, d) = (self.grad(dwte)?, self.span(dout)?);
        Ok(self
            .dev
            .embedding_backward(&mut g, self.tokens, self.tokens_host, &d, c)?)
    }
    fn rmsnorm_forward(
        &mut self,
        out: Slot,
        rstd: Slot,
        inp: Slot,
        w: Slot,
        eps: f64,
    ) -> Result<()> {
        let (mut o, mut r) = (self.span(out)?, self.stat(rstd)?);
        Ok(self
            .dev
            .rmsnorm_forward(&mut o, &mut r, &self.span(inp)?, &self.span(w)?, eps)?)
    }
    fn rmsnorm_backward(
        &mut self,
        dinp: Slot,
        dweight: Slot,
        dout: Slot,
        inp: Slot,
        weight: Slot,
        rstd: Slot,
    ) -> Result<()> {
        let (mut dx, mut dw) = (self.span(dinp)?, self.grad(dweight)?);
        Ok(self.dev.rmsnorm_backward(
            &mut dx,
            &mut dw,
            &self.span(dout)?,
            &self.span(inp)?,
            &self.span(weight)?,
            &self.stat(rstd)?,
        )?)
    }
    fn matmul_forward(
        &mut self,
        out: Slot,
        inp: Slot,
        w: Slot,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        let mut o = self.span(out)?;
        Ok(self
            .dev
            .matmul_forward(&mut o, &self.span(inp)?, &self.span(w)?, ic, oc)?)
    }
    fn matmul_backward(
        &mut self,
        dinp: Slot,
        dweight: Slot,
        dout: Slot,
        inp: Slot,
        weight: Slot,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        let (mut dx, mut dw) = (self.span(dinp)?, self.grad(dweight)?);
        Ok(self.dev.matmul_backward(
            &mut dx,
            &mut dw,
            &self.span(dout)?,
            &self.span(inp)?,
            &self.span(weight)?,
            ic,
            oc,
        )?)
    }
    fn rope(
        &mut self,
        x: Slot,
        cos: Slot,
        sin: Slot,
        seq: usize,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        let mut x = self.span(x)?;
        let (c, s) = (self.stat(cos)?, self.stat(sin)?);
        if inverse {
            self.dev
                .rope_backward(&mut x, &c, &s, seq, heads, head_dim)?;
        } else {
            self.dev
                .rope_forward(&mut x, &c, &s, seq, heads, head_dim)?;
        }
        Ok(())
    }
    fn attention_forward(
        &mut self,
        out: Slot,
        saved: Slot,
        q: Slot,
        k: Slot,
        v: Slot,
        shape: AttnShape,
    ) -> Result<()> {
        let (mut o, mut lse) = (self.span(out)?, self.stat(saved)?);
        Ok(self.dev.attention_forward(
            &mut o,
            &mut lse,
            &self.span(q)?,
            &self.span(k)?,
            &self.span(v)?,
            shape,
        )?)
    }
    fn attention_backward(
        &mut self,
        dq: Slot,
        dk: Slot,
        dv: Slot,
        scratch: Slot,
        dout: Slot,
        q: Slot,
        k: Slot,
        v: Slot,
        out: Slot,
        saved: Slot,
        shape: AttnShape,
    ) -> Result<()> {
        let (mut dq, mut dk, mut dv) = (self.span(dq)?, self.span(dk)?, self.span(dv)?);
        let mut delta = self.stat(scratch)?;
        Ok(self.dev.attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &mut delta,
            &self.span(dout)?,
            &self.span(q)?,
            &self.span(k)?,
            &self.span(v)?,
            &self.span(out)?,
            &self.stat(saved)?,
            shape,
        )?)
    }
    fn swiglu_forward(&mut self, out: Slot, gate: Slot, up: Slot) -> Result<()> {
        let mut o = self.span(out)?;
        Ok(self
            .dev
            .swiglu_forward(&mut o, &self.span(gate)?, &self.span(up)?)?)
    }
    fn swiglu_backward(
        &mut self,
        dgate: Slot,
        dup: Slot,
        dout: Slot,
        gate: Slot,
        up: Slot,
    ) -> Result<()> {
        let (mut dg, mut du) = (self.span(dgate)?, self.span(dup)?);
        Ok(self.dev.swiglu_backward(
            &mut dg,
            &mut du,
            &self.span(dout)?,
            &self.span(gate)?,
            &self.span(up)?,
        )?)
    }
    fn bias_forward(&mut self, out: Slot, bias: Slot, oc: usize) -> Result<()> {
        let mut o = self.span(out)?;
        let b = self.span(bias)?;
        debug_assert_eq!(b.len(), oc);
        Ok(self.dev.bias_forward(&mut o, &b)?)
    }
    fn bias_backward(&mut self, dbias: Slot, dout: Slot, oc: usize) -> Result<()> {
        let mut g = self.grad(dbias)?;
        debug_assert_eq!(g.len(), oc);
        Ok(self.dev.bias_backward(&mut g, &self.span(dout)?)?)
    }
    fn residual_forward(&mut self, out: Slot, a: Slot, b: Slot) -> Result<()> {
        let mut o = self.span(out)?;
        Ok(self
            .dev
            .residual_forward(&mut o, &self.span(a)?, &self.span(b)?)?)
    }
    fn add_into(&mut self, dst: Slot, src: Slot) -> Result<()> {
        // dst = dst + src: the residual add in place (element-wise, each element read then
        // written by its own thread), rounded like the CPU's `+=`.
        let (mut d, a) = (self.span(dst)?, self.span(dst)?);
        Ok(self.dev.residual_forward(&mut d, &a, &self.span(src)?)?)
    }
    fn zero(&mut self, dst: Slot) -> Result<()> {
        let mut d = self.span(dst)?;
        self.dev
            .stream()
            .memset_zeros(&mut d)
            .map_err(|e| self.dev.cuda_error("memset", e).into())
    }
}

/// Everything a device forward keeps for the backward, the backward's scratch and the tokens,
/// each one allocation sized for (batch, seq) when made.
pub struct DeviceActivations<T = f32> {
    config: LlamaConfig,
    batch: usize,
    seq: usize,
    layout: ActLayout,
    grad_layout: GradLayout,
    buf: CudaSlice<T>,
    grad_buf: CudaSlice<T>,
    tokens: CudaSlice<u32>,
    tokens_host: Vec<u32>,
    ready: bool,
}

impl<T: Storage> DeviceActivations<T> {
    /// Device buffers for a forward and backward of `batch` sequences of `seq` tokens of
    /// `model`, with the RoPE tables uploaded; an error (nothing kept) when the device cannot
    /// hold them.
    pub fn new(dev: &CudaKernels, model: &Llama, batch: usize, seq: usize) -> Result<Self> {
        Self::with_pass(dev, model, batch, seq, Pass::Training)
    }

    /// Device buffers for forwards only (see [`Pass::Inference`]: a frozen teacher, an
    /// evaluation); a backward on them is an error.
    pub fn inference(dev: &CudaKernels, model: &Llama, batch: usize, seq: usize) -> Result<Self> {
        Self::with_pass(dev, model, batch, seq, Pass::Inference)
    }

    fn with_pass(
        dev: &CudaKernels,
        model: &Llama,
        batch: usize,
        seq: usize,
        pass: Pass,
    ) -> Result<Self> {
        let shape = model.attention_shape(batch, seq);
        let state = DeviceExec::<T>::attention_state(&shape);
        let (layout, grad_layout, total) =
            layouts(model, batch, seq, state, pass, stat_width::<T>())?;
        let cfg = model.config();
        let s = dev.stream();
        let alloc = |n: usize, what: &str| {
            s.alloc_zeros::<T>(n.max(1))
                .map_err(|e| dev.cuda_error(what, e))
        };
        let mut buf = alloc(total, "the activation buffer")?;
        // `max(1)` in `alloc`: an inference layout has no scratch, and the driver allocates no
        // empty buffers.
        let grad_buf = alloc(grad_layout.total, "the backward scratch buffer")?;
        let tokens = s
            .alloc_zeros::<u32>(batch * seq)
            .map_err(|e| dev.cuda_error("the token buffer", e))?;
        let (cos, sin) = ops::rope_tables_from::<f32>(seq, &cfg.rope_inv_freq());
        let whole = DeviceSpan::over_mut(&mut buf);
        for (span, table) in [(layout.rope_cos, &cos), (layout.rope_sin, &sin)] {
            let mut dst = whole.sub(span.offset, span.len)?.cast::<f32>(table.len());
            s.memcpy_htod(table.as_slice(), &mut dst)
                .map_err(|e| dev.cuda_error("the RoPE tables", e))?;
        }
        Ok(DeviceActivations {
            config: cfg.clone(),
            batch,
            seq,
            layout,
            grad_layout,
            buf,
            grad_buf,
            tokens,
            tokens_host: vec![0; batch * seq],
            ready: false,
        })
    }

    /// Device bytes [`DeviceActivations::new`] (`Pass::Training`) or
    /// [`DeviceActivations::inference`] allocates for `model` at `batch` x `seq`.
    pub fn bytes_for(model: &Llama, batch: usize, seq: usize, pass: Pass) -> Result<usize> {
        let state = DeviceExec::<T>::attention_state(&model.attention_shape(batch, seq));
        let (_, grad_layout, total) = layouts(model, batch, seq, state, pass, stat_width::<T>())?;
        let width = std::mem::size_of::<T>();
        Ok(width * (total.max(1) + grad_layout.total.max(1)) + 4 * batch * seq)
    }

    /// `[B*T, V]`: the last forward's logits (a view of the activation buffer).
    pub fn logits(&self) -> cudarc::driver::CudaView<'_, T> {
        self.buf.slice(self.layout.logits.range())
    }

    /// Token rows (`batch * seq`) these buffers are sized for.
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<T>() * (self.buf.len() + self.grad_buf.len()) + 4 * self.tokens.len()
    }

    /// `[B*T, C]`: the last forward's hidden state at `point` (a view of the activation buffer);
    /// `None` for a layer the model does not have.
    pub fn hidden(&self, point: HiddenPoint) -> Option<CudaView<'_, T>> {
        Some(self.buf.slice(self.layout.hidden(point)?.range()))
    }

    /// Runs `model` on `tokens` (`[B*T]`) with `params` (a slice, a view or a span: exactly the
    /// model's parameters) on the device; the logits and everything the backward needs stay in
    /// these buffers.
    pub fn forward(
        &mut self,
        dev: &CudaKernels,
        model: &Llama,
        params: &impl DevicePtr<T>,
        tokens: &[u32],
    ) -> Result<()> {
        self.check(model, params.len(), "params")?;
        model.check_tokens(tokens, self.batch, self.seq)?;
        self.ready = false;
        self.tokens_host.copy_from_slice(tokens);
        dev.stream()
            .memcpy_htod(tokens, &mut self.tokens)
            .map_err(|e| dev.cuda_error("the tokens", e))?;
        let mut ex = DeviceExec {
            dev,
            params: DeviceSpan::over(params),
            grads: None,
            acts: DeviceSpan::over(&self.buf),
            scratch: None,
            inputs: Vec::new(),
            tokens: &self.tokens,
            tokens_host: &self.tokens_host,
        };
        model.forward_ops(&mut ex, &self.layout, self.batch, self.seq)?;
        self.ready = true;
        Ok(())
    }

    /// Accumulates into `grads` the gradient of a loss whose gradient with respect to the last
    /// forward's logits is `dlogits` (`[B*T, V]` on the device) and, for each `(point, g)` of
    /// `dhidden`, with respect to the hidden state at `point` is `g` (`[B*T, C]`).
    pub fn backward(
        &mut self,
        dev: &CudaKernels,
        model: &Llama,
        params: &impl DevicePtr<T>,
        dlogits: &impl DevicePtr<T>,
        dhidden: &[(HiddenPoint, DeviceSpan<T>)],
        grads: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        self.check(model, params.len(), "params")?;
        self.check(model, grads.len(), "grads")?;
        if self.layout.pass != Pass::Training {
            return Err(no_backward());
        }
        if !self.ready {
            return Err(Error::InvalidOption {
                name: "activations",
                value: "no forward".into(),
                reason: "backward needs a forward on these activations first",
            });
        }
        let n = self.batch * self.seq;
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        model.check_len("dlogits", dlogits.len(), n * v, format!("[{n}, {v}]"))?;
        let mut inputs = vec![DeviceSpan::over(dlogits)];
        let mut dh = Vec::with_capacity(dhidden.len());
        for (point, g) in dhidden {
            if self.layout.hidden(*point).is_none() {
                return Err(Error::InvalidOption {
                    name: "dhidden",
                    value: format!("{point:?}"),
                    reason: "no such layer",
                });
            }
            model.check_len("dhidden", g.len(), n * c, format!("[{n}, {c}]"))?;
            let slot = Slot {
                store: Store::Input(inputs.len()),
                span: Span {
                    offset: 0,
                    len: n * c,
                },
            };
            inputs.push(g.clone());
            dh.push((*point, slot));
        }
        let mut ex = DeviceExec {
            dev,
            params: DeviceSpan::over(params),
            grads: Some(DeviceSpan::over_mut(grads)),
            acts: DeviceSpan::over(&self.buf),
            scratch: Some(DeviceSpan::over(&self.grad_buf)),
            inputs,
            tokens: &self.tokens,
            tokens_host: &self.tokens_host,
        };
        let dl = Slot {
            store: Store::Input(0),
            span: Span {
                offset: 0,
                len: n * v,
            },
        };
        model.backward_ops(
            &mut ex,
            &self.layout,
            &self.grad_layout,
            self.batch,
            self.seq,
            Some(dl),
            &dh,
        )
    }

    fn check(&self, model: &Llama, len: usize, tensor: &'static str) -> Result<()> {
        model.check_buffers_for(&self.config, self.batch, self.seq)?;
        model.check_params(tensor, len)
    }
}
