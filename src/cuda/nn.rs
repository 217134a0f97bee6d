//! The model's element-wise and row ops on device buffers (`kernels/model_ops.cu`): each the
//! device twin of the function of the same name in `crate::model::ops` (the CPU executor's), with
//! the same shapes and the same accumulate-into-the-gradient convention. They know no model; an
//! executor decides the order. Every call only enqueues work on the device's stream.
//!
//! Each op is generic over the [`Storage`] type `T` of the tensors the model passes between ops
//! (f32 or bf16; the kernel `dk_<op>_<T>`); parameter gradients, RMSNorm's `rstd` and the RoPE
//! tables are f32 whatever `T` is.

use std::ffi::c_void;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use super::ops::{check_len as check, check_rows, row_grid as grid};
use super::{CudaKernels, Storage};
use crate::abi::{
    DkBiasParams, DkCopyRowsParams, DkElementwiseParams, DkEmbeddingParams, DkRmsNormParams,
    DkRopeParams,
};
use crate::error::{Error, Result};

/// Threads of the element-wise and per-channel kernels (their `__launch_bounds__`).
const THREADS: u32 = 256;
/// At most this many blocks for a grid-stride loop.
const MAX_BLOCKS: usize = 4096;

fn nonzero(what: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::Empty(what));
    }
    Ok(())
}

fn row_threads(c: usize) -> u32 {
    (c.next_multiple_of(32)).clamp(32, 1024) as u32
}

fn elementwise_grid(n: usize) -> Result<LaunchConfig> {
    grid(n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS), THREADS)
}

fn per_channel_grid(c: usize) -> Result<LaunchConfig> {
    grid(c.div_ceil(THREADS as usize), THREADS)
}

impl CudaKernels {
    /// `out[n, :] = wte[tokens[n], :]`: out `[N, C]`, wte `[V, C]`. Every token must be below V
    /// (checked on the host: `tokens_host` is the same ids as `tokens`).
    pub fn embedding_forward<T: Storage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        tokens: &CudaSlice<u32>,
        tokens_host: &[u32],
        wte: &impl DevicePtr<T>,
        c: usize,
    ) -> Result<()> {
        let (n, vocab) = self.check_embedding(tokens, tokens_host, wte.len(), c)?;
        check("out", out.len(), n * c, format!("[{n}, {c}]"))?;
        let s = self.stream();
        let (t, _t) = tokens.device_ptr(s);
        let (w, _w) = wte.device_ptr(s);
        let (o, _o) = out.device_ptr_mut(s);
        let p = DkEmbeddingParams {
            tokens: t as *const u32,
            wte: w as *const c_void,
            out: o as *mut c_void,
            dout: std::ptr::null(),
            dwte: std::ptr::null_mut(),
            n: n as i64,
            c: c as i64,
            vocab: vocab as i64,
        };
        self.launch(
            &format!("dk_embedding_fwd_{}", T::SUFFIX),
            grid(n, row_threads(c))?,
            &p,
        )
    }

    /// `dwte[tokens[n], :] += dout[n, :]` in position order (bit-identical to the CPU's sum).
    pub fn embedding_backward<T: Storage>(
        &self,
        dwte: &mut impl DevicePtrMut<f32>,
        tokens: &CudaSlice<u32>,
        tokens_host: &[u32],
        dout: &impl DevicePtr<T>,
        c: usize,
    ) -> Result<()> {
        let (n, vocab) = self.check_embedding(tokens, tokens_host, dwte.len(), c)?;
        check("dout", dout.len(), n * c, format!("[{n}, {c}]"))?;
        let s = self.stream();
        let (t, _t) = tokens.device_ptr(s);
        let (d, _d) = dout.device_ptr(s);
        let (g, _g) = dwte.device_ptr_mut(s);
        let p = DkEmbeddingParams {
            tokens: t as *const u32,
            wte: std::ptr::null(),
            out: std::ptr::null_mut(),
            dout: d as *const c_void,
            dwte: g as *mut f32,
            n: n as i64,
            c: c as i64,
            vocab: vocab as i64,
        };
        self.launch(
            &format!("dk_embedding_bwd_{}", T::SUFFIX),
            per_channel_grid(c)?,
            &p,
        )
    }

    fn check_embedding(
        &self,
        tokens: &CudaSlice<u32>,
        tokens_host: &[u32],
        table_len: usize,
        c: usize,
    ) -> Result<(usize, usize)> {
        nonzero("c = 0", c)?;
        let n = tokens.len();
        nonzero("no tokens", n)?;
        check("tokens_host", tokens_host.len(), n, format!("[{n}]"))?;
        if !table_len.is_multiple_of(c) {
            return Err(Error::ShapeMismatch {
                tensor: "wte",
                expected: table_len.next_multiple_of(c),
                actual: table_len,
                shape: format!("[V, {c}]"),
            });
        }
        let vocab = table_len / c;
        if let Some((i, &t)) = tokens_host
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(Error::InvalidOption {
                name: "tokens",
                value: format!("{t} at position {i}"),
                reason: "is outside the embedding table",
            });
        }
        Ok((n, vocab))
    }

    fn rmsnorm_params(
        &self,
        rows: usize,
        c: usize,
        inp: usize,
        weight: usize,
        rstd: usize,
    ) -> Result<()> {
        nonzero("rows = 0", rows)?;
        nonzero("c = 0", c)?;
        check("inp", inp, rows * c, format!("[{rows}, {c}]"))?;
        check("weight", weight, c, format!("[{c}]"))?;
        check("rstd", rstd, rows, format!("[{rows}]"))
    }

    /// `out = x * rsqrt(mean(x^2) + eps) * weight` per row, keeping `rstd[n]`: x, out `[N, C]`,
    /// weight `[C]`, rstd `[N]` (N = `rstd.len()`).
    pub fn rmsnorm_forward<T: Storage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        rstd: &mut impl DevicePtrMut<f32>,
        inp: &impl DevicePtr<T>,
        weight: &impl DevicePtr<T>,
        eps: f64,
    ) -> Result<()> {
        let (rows, c) = (rstd.len(), weight.len());
        self.rmsnorm_params(rows, c, inp.len(), weight.len(), rstd.len())?;
        check("out", out.len(), rows * c, format!("[{rows}, {c}]"))?;
        let s = self.stream();
        let (x, _x) = inp.device_ptr(s);
        let (w, _w) = weight.device_ptr(s);
        let (o, _o) = out.device_ptr_mut(s);
        let (r, _r) = rstd.device_ptr_mut(s);
        let p = DkRmsNormParams {
            inp: x as *const c_void,
            weight: w as *const c_void,
            out: o as *mut c_void,
            rstd: r as *mut f32,
            dout: std::ptr::null(),
            dinp: std::ptr::null_mut(),
            dweight: std::ptr::null_mut(),
            rows: rows as i64,
            c: c as i64,
            eps: eps as f32,
        };
        self.launch(
            &format!("dk_rmsnorm_fwd_{}", T::SUFFIX),
            grid(rows, row_threads(c))?,
            &p,
        )
    }

    /// With `xh = x * rstd`: `dinp += rstd * (dy*w - xh * mean(dy*w*xh))`,
    /// `dweight += sum_n dy * xh` (rows in order, bit-identical to the CPU's sum).
    pub fn rmsnorm_backward<T: Storage>(
        &self,
        dinp: &mut impl DevicePtrMut<T>,
        dweight: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<T>,
        inp: &impl DevicePtr<T>,
        weight: &impl DevicePtr<T>,
        rstd: &impl DevicePtr<f32>,
    ) -> Result<()> {
        let (rows, c) = (rstd.len(), weight.len());
        self.rmsnorm_params(rows, c, inp.len(), weight.len(), rstd.len())?;
        check("dinp", dinp.len(), rows * c, format!("[{rows}, {c}]"))?;
        check("dout", dout.len(), rows * c, format!("[{rows}, {c}]"))?;
        check("dweight", dweight.len(), c, format!("[{c}]"))?;
        let s = self.stream();
        let (x, _x) = inp.device_ptr(s);
        let (w, _w) = weight.device_ptr(s);
        let (r, _r) = rstd.device_ptr(s);
        let (d, _d) = dout.device_ptr(s);
        let (dx, _dx) = dinp.device_ptr_mut(s);
        let (dw, _dw) = dweight.device_ptr_mut(s);
        let p = DkRmsNormParams {
            inp: x as *const c_void,
            weight: w as *const c_void,
            out: std::ptr::null_mut(),
            rstd: r as *mut f32,
            dout: d as *const c_void,
            dinp: dx as *mut c_void,
            dweight: dw as *mut f32,
            rows: rows as i64,
            c: c as i64,
            eps: 0.0,
        };
        self.launch(
            &format!("dk_rmsnorm_bwd_dx_{}", T::SUFFIX),
            grid(rows, row_threads(c))?,
            &p,
        )?;
        self.launch(
            &format!("dk_rmsnorm_bwd_dw_{}", T::SUFFIX),
            per_channel_grid(c)?,
            &p,
        )
    }

    /// Rotate-half RoPE in place: x `[N, heads, head_dim]`, row n at position `n % seq`, tables
    /// `cos`, `sin` `[seq, head_dim / 2]` (from `model::ops::rope_tables`). Bit-identical to
    /// `model::ops::rope_forward`.
    pub fn rope_forward<T: Storage>(
        &self,
        x: &mut impl DevicePtrMut<T>,
        cos: &impl DevicePtr<f32>,
        sin: &impl DevicePtr<f32>,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.rope(x, cos, sin, seq, heads, head_dim, false)
    }

    /// The transposed rotation in place: turns `dL/dy` into `dL/dx` (not accumulating), like
    /// `model::ops::rope_backward`.
    pub fn rope_backward<T: Storage>(
        &self,
        d: &mut impl DevicePtrMut<T>,
        cos: &impl DevicePtr<f32>,
        sin: &impl DevicePtr<f32>,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.rope(d, cos, sin, seq, heads, head_dim, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn rope<T: Storage>(
        &self,
        x: &mut impl DevicePtrMut<T>,
        cos: &impl DevicePtr<f32>,
        sin: &impl DevicePtr<f32>,
        seq: usize,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        nonzero("seq = 0", seq)?;
        nonzero("heads = 0", heads)?;
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::InvalidOption {
                name: "head_dim",
                value: head_dim.to_string(),
                reason: "RoPE rotates halves: the head size must be even and positive",
            });
        }
        let half = head_dim / 2;
        // Tables for longer sequences serve shorter ones (rows t < seq are read), as on the CPU.
        for (name, len) in [("cos", cos.len()), ("sin", sin.len())] {
            if len < seq * half || !len.is_multiple_of(half) {
                return Err(Error::ShapeMismatch {
                    tensor: name,
                    expected: seq * half,
                    actual: len,
                    shape: format!("[>= {seq}, {half}]"),
                });
            }
        }
        let row = heads * head_dim;
        if x.is_empty() || !x.len().is_multiple_of(row) {
            return Err(Error::ShapeMismatch {
                tensor: "x",
                expected: x.len().next_multiple_of(row).max(row),
                actual: x.len(),
                shape: format!("[N, {heads}, {head_dim}]"),
            });
        }
        let vectors = x.len() / head_dim;
        let s = self.stream();
        let (c, _c) = cos.device_ptr(s);
        let (sn, _s) = sin.device_ptr(s);
        let (xp, _x) = x.device_ptr_mut(s);
        let p = DkRopeParams {
            x: xp as *mut c_void,
            cos: c as *const f32,
            sin: sn as *const f32,
            vectors: vectors as i64,
            heads: heads as i64,
            seq: seq as i64,
            half: half as i64,
            inverse: inverse as i32,
        };
        self.launch(
            &format!("dk_rope_{}", T::SUFFIX),
            elementwise_grid(vectors * half)?,
            &p,
        )
    }

    /// `dst[r * dst_stride + j] = src[r * src_stride + j]` for `r < rows`, `j < width`: moves a
    /// `[rows, width]` block between row-major buffers with different row strides (each
    /// buffer starts at the block's first element; `dst` and `src` must not overlap).
    pub fn copy_rows<T: Storage>(
        &self,
        dst: &mut impl DevicePtrMut<T>,
        dst_stride: usize,
        src: &impl DevicePtr<T>,
        src_stride: usize,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        nonzero("rows = 0", rows)?;
        nonzero("width = 0", width)?;
        for (name, len, stride) in [
            ("dst", dst.len(), dst_stride),
            ("src", src.len(), src_stride),
        ] {
            if stride < width {
                return Err(Error::InvalidOption {
                    name: "row stride",
                    value: format!("{name}: {stride}"),
                    reason: "a row stride below the block's width would overlap its rows",
                });
            }
            check_rows(name, len, rows, width, Some(stride))?;
        }
        let s = self.stream();
        let (sp, _s) = src.device_ptr(s);
        let (dp, _d) = dst.device_ptr_mut(s);
        let p = DkCopyRowsParams {
            dst: dp as *mut c_void,
            src: sp as *const c_void,
            rows: rows as i64,
            width: width as i64,
            dst_stride: dst_stride as i64,
            src_stride: src_stride as i64,
        };
        self.launch(
            &format!("dk_copy_rows_{}", T::SUFFIX),
            elementwise_grid(rows * width)?,
            &p,
        )
    }

    /// `out[n, :] += bias` for every row of `out` `[N, C]`, `bias` `[C]` (a linear layer's bias
    /// after its matmul). Bit-identical to `model::ops::bias_forward`.
    pub fn bias_forward<T: Storage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        bias: &impl DevicePtr<T>,
    ) -> Result<()> {
        let c = bias.len();
        nonzero("bias of 0 channels", c)?;
        let n = out.len() / c;
        nonzero("out of 0 rows", n)?;
        check("out", out.len(), n * c, format!("[{n}, {c}]"))?;
        let s = self.stream();
        let (b, _b) = bias.device_ptr(s);
        let (o, _o) = out.device_ptr_mut(s);
        let p = DkBiasParams {
            out: o as *mut c_void,
            bias: b as *const c_void,
            dout: std::ptr::null(),
            dbias: std::ptr::null_mut(),
            n: n as i64,
            c: c as i64,
        };
        self.launch(
            &format!("dk_bias_fwd_{}", T::SUFFIX),
            elementwise_grid(n * c)?,
            &p,
        )
    }

    /// `dbias += sum_n dout[n, :]` over the rows of `dout` `[N, C]` in order, `dbias` `[C]`
    /// (bit-identical to `model::ops::bias_backward`).
    pub fn bias_backward<T: Storage>(
        &self,
        dbias: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<T>,
    ) -> Result<()> {
        let c = dbias.len();
        nonzero("dbias of 0 channels", c)?;
        let n = dout.len() / c;
        nonzero("dout of 0 rows", n)?;
        check("dout", dout.len(), n * c, format!("[{n}, {c}]"))?;
        let s = self.stream();
        let (d, _d) = dout.device_ptr(s);
        let (g, _g) = dbias.device_ptr_mut(s);
        let p = DkBiasParams {
            out: std::ptr::null_mut(),
            bias: std::ptr::null(),
            dout: d as *const c_void,
            dbias: g as *mut f32,
            n: n as i64,
            c: c as i64,
        };
        self.launch(
            &format!("dk_bias_bwd_{}", T::SUFFIX),
            per_channel_grid(c)?,
            &p,
        )
    }

    /// One element-wise kernel: the three inputs (gate, up, dout slots) and three outputs (out,
    /// dgate, dup slots) of [`DkElementwiseParams`], each with the name the caller's signature
    /// gives it, for errors.
    fn elementwise<T: Storage>(
        &self,
        kernel: &str,
        n: usize,
        inputs: [(&'static str, Option<&dyn DevicePtr<T>>); 3],
        outputs: [(&'static str, Option<&mut dyn DevicePtrMut<T>>); 3],
    ) -> Result<()> {
        nonzero("n = 0", n)?;
        for (name, t) in &inputs {
            if let Some(t) = t {
                check(name, t.len(), n, format!("[{n}]"))?;
            }
        }
        for (name, t) in &outputs {
            if let Some(t) = t {
                check(name, t.len(), n, format!("[{n}]"))?;
            }
        }
        let inputs = inputs.map(|(_, t)| t);
        let outputs = outputs.map(|(_, t)| t);
        let s = self.stream();
        let ins: Vec<_> = inputs.iter().map(|t| t.map(|t| t.device_ptr(s))).collect();
        let mut outputs = outputs;
        let outs: Vec<_> = outputs
            .iter_mut()
            .map(|t| t.as_mut().map(|t| t.device_ptr_mut(s)))
            .collect();
        let inp = |k: usize| ins[k].as_ref().map_or(0, |(p, _)| *p) as *const c_void;
        let out = |k: usize| outs[k].as_ref().map_or(0, |(p, _)| *p) as *mut c_void;
        let p = DkElementwiseParams {
            gate: inp(0),
            up: inp(1),
            dout: inp(2),
            out: out(0),
            dgate: out(1),
            dup: out(2),
            n: n as i64,
        };
        self.launch(&format!("{kernel}_{}", T::SUFFIX), elementwise_grid(n)?, &p)
    }

    /// `out = silu(gate) * up`, all `[N]`.
    pub fn swiglu_forward<T: Storage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        gate: &impl DevicePtr<T>,
        up: &impl DevicePtr<T>,
    ) -> Result<()> {
        let n = out.len();
        self.elementwise(
            "dk_swiglu_fwd",
            n,
            [("gate", Some(gate)), ("up", Some(up)), ("", None)],
            [("out", Some(out)), ("", None), ("", None)],
        )
    }

    /// `dgate += dout * up * silu'(gate)`, `dup += dout * silu(gate)`.
    pub fn swiglu_backward<T: Storage>(
        &self,
        dgate: &mut impl DevicePtrMut<T>,
        dup: &mut impl DevicePtrMut<T>,
        dout: &impl DevicePtr<T>,
        gate: &impl DevicePtr<T>,
        up: &impl DevicePtr<T>,
    ) -> Result<()> {
        let n = dout.len();
        self.elementwise(
            "dk_swiglu_bwd",
            n,
            [("gate", Some(gate)), ("up", Some(up)), ("dout", Some(dout))],
            [("", None), ("dgate", Some(dgate)), ("dup", Some(dup))],
        )
    }

    /// `out = a + b`.
    pub fn residual_forward<T: Storage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
    ) -> Result<()> {
        let n = out.len();
        self.elementwise(
            "dk_residual_fwd",
            n,
            [("a", Some(a)), ("b", Some(b)), ("", None)],
            [("out", Some(out)), ("", None), ("", None)],
        )
    }

    /// `da += dout`, `db += dout`.
    pub fn residual_backward<T: Storage>(
        &self,
        da: &mut impl DevicePtrMut<T>,
        db: &mut impl DevicePtrMut<T>,
        dout: &impl DevicePtr<T>,
    ) -> Result<()> {
        let n = dout.len();
        self.elementwise(
            "dk_residual_bwd",
            n,
            [("", None), ("", None), ("dout", Some(dout))],
            [("", None), ("da", Some(da)), ("db", Some(db))],
        )
    }
}
