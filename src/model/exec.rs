//! The seam between the model and the hardware. [`super::llama::Llama`] states the order of the
//! ops of a forward and a backward pass once, in terms of [`Slot`]s (a store and a span of it); an
//! [`Executor`] owns the stores and runs each op where they live: [`CpuExec`] on host slices with
//! `model::ops`, the device executor (`exec_cuda`) on device buffers with the crate's kernels. The
//! model knows no device, the executors know no model.

use std::marker::PhantomData;

use super::llama::Span;
use super::ops::{self, Real};
use crate::shapes::AttnShape;
use crate::train::error::Result;

/// Which of an executor's buffers a tensor lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The parameters (read only).
    Params,
    /// The parameter gradients (accumulated into).
    Grads,
    /// What the forward keeps for the backward.
    Acts,
    /// The backward's scratch, reused by every layer.
    Scratch,
    /// The `k`-th input of the call (the loss's gradients with respect to logits or hidden
    /// states; read only).
    Input(usize),
}

/// Where a tensor lives: a store and a span of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The buffer.
    pub store: Store,
    /// The elements of it.
    pub span: Span,
}

impl Slot {
    fn overlaps(&self, other: &Slot) -> bool {
        self.store == other.store
            && self.span.len > 0
            && other.span.len > 0
            && self.span.offset < other.span.offset + other.span.len
            && other.span.offset < self.span.offset + self.span.len
    }
}

/// What the attention keeps per layer for its backward and the scratch its backward needs, in
/// elements, for one shape: the CPU keeps the `[N, NH, T]` probabilities, the device one
/// log-sum-exp per query row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionState {
    /// Elements saved per layer by the forward.
    pub saved: usize,
    /// Elements of backward scratch.
    pub scratch: usize,
}

/// The ops of the model's passes, each the same function as in `model::ops` with its tensors
/// named by slot. Shapes were checked by the model before the first op; the embedding reads the
/// tokens the executor was given.
#[allow(clippy::too_many_arguments)]
pub trait Executor {
    /// Sizes of the attention's saved state and scratch for `shape` (fixed per executor kind).
    fn attention_state(shape: &AttnShape) -> AttentionState
    where
        Self: Sized;
    /// `out[n] = wte[tokens[n]]`.
    fn embedding_forward(&mut self, out: Slot, wte: Slot, c: usize) -> Result<()>;
    /// `dwte[tokens[n]] += dout[n]`, in position order.
    fn embedding_backward(&mut self, dwte: Slot, dout: Slot, c: usize) -> Result<()>;
    /// RMSNorm of every row, keeping `rstd`.
    fn rmsnorm_forward(
        &mut self,
        out: Slot,
        rstd: Slot,
        inp: Slot,
        w: Slot,
        eps: f64,
    ) -> Result<()>;
    /// `dinp +=`, `dweight +=` of RMSNorm.
    fn rmsnorm_backward(
        &mut self,
        dinp: Slot,
        dweight: Slot,
        dout: Slot,
        inp: Slot,
        weight: Slot,
        rstd: Slot,
    ) -> Result<()>;
    /// `out = inp W^T`.
    fn matmul_forward(&mut self, out: Slot, inp: Slot, w: Slot, ic: usize, oc: usize)
        -> Result<()>;
    /// `dinp += dout W`, `dweight += dout^T inp`.
    fn matmul_backward(
        &mut self,
        dinp: Slot,
        dweight: Slot,
        dout: Slot,
        inp: Slot,
        weight: Slot,
        ic: usize,
        oc: usize,
    ) -> Result<()>;
    /// Rotate-half RoPE in place; `inverse` for the backward.
    fn rope(
        &mut self,
        x: Slot,
        cos: Slot,
        sin: Slot,
        seq: usize,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()>;
    /// Causal attention: `out` written, `saved` kept for the backward.
    fn attention_forward(
        &mut self,
        out: Slot,
        saved: Slot,
        q: Slot,
        k: Slot,
        v: Slot,
        shape: AttnShape,
    ) -> Result<()>;
    /// `dq, dk, dv +=`; `scratch` overwritten.
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
    ) -> Result<()>;
    /// `out = silu(gate) * up`.
    fn swiglu_forward(&mut self, out: Slot, gate: Slot, up: Slot) -> Result<()>;
    /// `dgate +=`, `dup +=` of SwiGLU.
    fn swiglu_backward(
        &mut self,
        dgate: Slot,
        dup: Slot,
        dout: Slot,
        gate: Slot,
        up: Slot,
    ) -> Result<()>;
    /// `out[n, :] += bias` for every row of `out` `[N, oc]`.
    fn bias_forward(&mut self, out: Slot, bias: Slot, oc: usize) -> Result<()>;
    /// `dbias += sum_n dout[n, :]`, rows summed in order.
    fn bias_backward(&mut self, dbias: Slot, dout: Slot, oc: usize) -> Result<()>;
    /// `out = a + b`.
    fn residual_forward(&mut self, out: Slot, a: Slot, b: Slot) -> Result<()>;
    /// `dst += src`.
    fn add_into(&mut self, dst: Slot, src: Slot) -> Result<()>;
    /// `dst = 0`.
    fn zero(&mut self, dst: Slot) -> Result<()>;
}

/// The CPU executor: host buffers borrowed for one pass, `model::ops` on them.
pub struct CpuExec<'a, F> {
    params: &'a [F],
    grads: (*mut F, usize),
    acts: (*mut F, usize),
    scratch: (*mut F, usize),
    inputs: Vec<&'a [F]>,
    tokens: &'a [u32],
    _borrow: PhantomData<&'a mut [F]>,
}

impl<'a, F: Real> CpuExec<'a, F> {
    /// An executor over the given stores for one pass (`grads` and `scratch` may be empty for a
    /// forward).
    pub fn new(
        params: &'a [F],
        grads: &'a mut [F],
        acts: &'a mut [F],
        scratch: &'a mut [F],
        inputs: Vec<&'a [F]>,
        tokens: &'a [u32],
    ) -> Self {
        CpuExec {
            params,
            grads: (grads.as_mut_ptr(), grads.len()),
            acts: (acts.as_mut_ptr(), acts.len()),
            scratch: (scratch.as_mut_ptr(), scratch.len()),
            inputs,
            tokens,
            _borrow: PhantomData,
        }
    }

    fn base(&self, store: Store) -> (*const F, usize) {
        match store {
            Store::Params => (self.params.as_ptr(), self.params.len()),
            Store::Grads => (self.grads.0, self.grads.1),
            Store::Acts => (self.acts.0, self.acts.1),
            Store::Scratch => (self.scratch.0, self.scratch.1),
            Store::Input(k) => (self.inputs[k].as_ptr(), self.inputs[k].len()),
        }
    }

    /// Slices for one op: `reads` shared, `writes` exclusive. Panics (an internal invariant of the
    /// model's layout) when a span is out of its store, a write targets a read-only store, or a
    /// write overlaps any other slot of the op.
    fn views<const R: usize, const W: usize>(
        &mut self,
        reads: [Slot; R],
        writes: [Slot; W],
    ) -> ([&[F]; R], [&mut [F]; W]) {
        for (i, w) in writes.iter().enumerate() {
            assert!(
                matches!(w.store, Store::Grads | Store::Acts | Store::Scratch),
                "write to a read-only store: {w:?}"
            );
            let clash = reads.iter().any(|r| r.overlaps(w))
                || writes
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.overlaps(w));
            assert!(!clash, "a written slot overlaps another of the op: {w:?}");
        }
        let check = |s: &Slot| {
            let (_, len) = self.base(s.store);
            assert!(
                s.span.offset + s.span.len <= len,
                "slot out of its store: {s:?}"
            );
        };
        reads.iter().for_each(check);
        writes.iter().for_each(check);
        // SAFETY: every span lies inside its store (checked above); the stores are borrowed for
        // 'a by this executor (exclusively for the writable ones); the written spans overlap no
        // other span handed out by this call, and the slices do not outlive `&mut self`.
        let r = reads.map(|s| unsafe {
            let (p, _) = self.base(s.store);
            std::slice::from_raw_parts(p.add(s.span.offset), s.span.len)
        });
        let w = writes.map(|s| unsafe {
            let (p, _) = self.base(s.store);
            std::slice::from_raw_parts_mut((p as *mut F).add(s.span.offset), s.span.len)
        });
        (r, w)
    }
}

impl<F: Real> Executor for CpuExec<'_, F> {
    fn attention_state(s: &AttnShape) -> AttentionState {
        let probs = s.batch * s.seq * s.n_heads * s.seq;
        AttentionState {
            saved: probs,
            scratch: probs,
        }
    }
    fn embedding_forward(&mut self, out: Slot, wte: Slot, c: usize) -> Result<()> {
        let tokens = self.tokens;
        let ([wte], [out]) = self.views([wte], [out]);
        ops::embedding_forward(out, tokens, wte, c);
        Ok(())
    }
    fn embedding_backward(&mut self, dwte: Slot, dout: Slot, c: usize) -> Result<()> {
        let tokens = self.tokens;
        let ([dout], [dwte]) = self.views([dout], [dwte]);
        ops::embedding_backward(dwte, tokens, dout, c);
        Ok(())
    }
    fn rmsnorm_forward(
        &mut self,
        out: Slot,
        rstd: Slot,
        inp: Slot,
        w: Slot,
        eps: f64,
    ) -> Result<()> {
        let ([inp, w], [out, rstd]) = self.views([inp, w], [out, rstd]);
        ops::rmsnorm_forward(out, rstd, inp, w, eps);
        Ok(())
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
        let ([dout, inp, weight, rstd], [dinp, dweight]) =
            self.views([dout, inp, weight, rstd], [dinp, dweight]);
        ops::rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd);
        Ok(())
    }
    fn matmul_forward(
        &mut self,
        out: Slot,
        inp: Slot,
        w: Slot,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        let ([inp, w], [out]) = self.views([inp, w], [out]);
        ops::matmul_forward(out, inp, w, ic, oc);
        Ok(())
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
        let ([dout, inp, weight], [dinp, dweight]) =
            self.views([dout, inp, weight], [dinp, dweight]);
        ops::matmul_backward(dinp, dweight, dout, inp, weight, ic, oc);
        Ok(())
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
        let ([cos, sin], [x]) = self.views([cos, sin], [x]);
        if inverse {
            ops::rope_backward(x, cos, sin, seq, heads, head_dim);
        } else {
            ops::rope_forward(x, cos, sin, seq, heads, head_dim);
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
        let ([q, k, v], [out, att]) = self.views([q, k, v], [out, saved]);
        ops::attention_forward(out, att, q, k, v, shape);
        Ok(())
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
        _out: Slot,
        saved: Slot,
        shape: AttnShape,
    ) -> Result<()> {
        let ([dout, q, k, v, att], [dq, dk, dv, dpreatt]) =
            self.views([dout, q, k, v, saved], [dq, dk, dv, scratch]);
        ops::attention_backward(dq, dk, dv, dpreatt, dout, q, k, v, att, shape);
        Ok(())
    }
    fn swiglu_forward(&mut self, out: Slot, gate: Slot, up: Slot) -> Result<()> {
        let ([gate, up], [out]) = self.views([gate, up], [out]);
        ops::swiglu_forward(out, gate, up);
        Ok(())
    }
    fn swiglu_backward(
        &mut self,
        dgate: Slot,
        dup: Slot,
        dout: Slot,
        gate: Slot,
        up: Slot,
    ) -> Result<()> {
        let ([dout, gate, up], [dgate, dup]) = self.views([dout, gate, up], [dgate, dup]);
        ops::swiglu_backward(dgate, dup, dout, gate, up);
        Ok(())
    }
    fn bias_forward(&mut self, out: Slot, bias: Slot, oc: usize) -> Result<()> {
        let ([bias], [out]) = self.views([bias], [out]);
        ops::bias_forward(out, bias, oc);
        Ok(())
    }
    fn bias_backward(&mut self, dbias: Slot, dout: Slot, oc: usize) -> Result<()> {
        let ([dout], [dbias]) = self.views([dout], [dbias]);
        ops::bias_backward(dbias, dout, oc);
        Ok(())
    }
    fn residual_forward(&mut self, out: Slot, a: Slot, b: Slot) -> Result<()> {
        let ([a, b], [out]) = self.views([a, b], [out]);
        ops::residual_forward(out, a, b);
        Ok(())
    }
    fn add_into(&mut self, dst: Slot, src: Slot) -> Result<()> {
        let ([src], [dst]) = self.views([src], [dst]);
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
        Ok(())
    }
    fn zero(&mut self, dst: Slot) -> Result<()> {
        let ([], [dst]) = self.views([], [dst]);
        dst.fill(F::ZERO);
        Ok(())
    }
}
