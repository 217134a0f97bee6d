//! Causal grouped-query attention on device buffers (`kernels/attention.cu`), in the [`Storage`]
//! type `T` (f32 or bf16; `lse` and `delta` are f32 in both): the device twin
//! of `model::ops::attention_{forward,backward}` with the flash-style saved state. Where the CPU
//! keeps the `[B, T, NH, T]` probabilities for the backward, the device keeps one log-sum-exp per
//! query row (`lse`, `[B, T, NH]`) and recomputes the probabilities from it; the gradients
//! accumulate (`+=`) as on the CPU.

use std::ffi::c_void;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::ops::{check_len as check, row_grid};
use super::{CudaKernels, Storage};
use crate::abi::DkAttentionParams;
use crate::error::{Error, Result};
use crate::shapes::AttnShape;

/// The widest head the kernels hold in registers (32 lanes x 4 elements).
pub const MAX_HEAD_DIM: usize = 128;
/// Threads per block: 8 warps, one row each.
const THREADS: u32 = 256;
const ROWS_PER_BLOCK: usize = THREADS as usize / 32;

fn warps_grid(rows: usize) -> Result<LaunchConfig> {
    row_grid(rows.div_ceil(ROWS_PER_BLOCK), THREADS)
}

/// Lengths of q (= out, dout, dq), k (= v, dk, dv) and lse (= delta) for `s`; every dimension
/// checked.
fn lengths(s: &AttnShape) -> Result<(usize, usize, usize)> {
    let bad = |name: &'static str, value: usize, reason: &'static str| Error::InvalidOption {
        name,
        value: value.to_string(),
        reason,
    };
    for (name, v) in [("batch", s.batch), ("seq", s.seq), ("n_heads", s.n_heads)] {
        if v == 0 {
            return Err(bad(name, v, "attention needs at least one"));
        }
    }
    if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Err(bad(
            "n_kv_heads",
            s.n_kv_heads,
            "must divide the number of query heads",
        ));
    }
    if s.head_dim == 0 || s.head_dim > MAX_HEAD_DIM {
        return Err(bad(
            "head_dim",
            s.head_dim,
            "the device attention takes head sizes 1..=128",
        ));
    }
    let rows = s.batch * s.seq;
    Ok((
        rows * s.n_heads * s.head_dim,
        rows * s.n_kv_heads * s.head_dim,
        rows * s.n_heads,
    ))
}

fn shape_q(s: &AttnShape) -> String {
    format!("[{}, {}, {}, {}]", s.batch, s.seq, s.n_heads, s.head_dim)
}
fn shape_kv(s: &AttnShape) -> String {
    format!("[{}, {}, {}, {}]", s.batch, s.seq, s.n_kv_heads, s.head_dim)
}
fn shape_rows(s: &AttnShape) -> String {
    format!("[{}, {}, {}]", s.batch, s.seq, s.n_heads)
}

impl CudaKernels {
    /// Causal softmax attention: `out` `[B, T, NH, D]` and `lse` `[B, T, NH]` (each query row's
    /// log-sum-exp of its scaled scores, for the backward) written from q `[B, T, NH, D]`, k and v
    /// `[B, T, NKV, D]`. Scale `1 / sqrt(D)` rounded to f32 as the CPU does.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward<T: Storage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        s: AttnShape,
    ) -> Result<()> {
        let (nq, nkv, nrows) = lengths(&s)?;
        check("q", q.len(), nq, shape_q(&s))?;
        check("k", k.len(), nkv, shape_kv(&s))?;
        check("v", v.len(), nkv, shape_kv(&s))?;
        check("out", out.len(), nq, shape_q(&s))?;
        check("lse", lse.len(), nrows, shape_rows(&s))?;
        let st = self.stream();
        let (qp, _q) = q.device_ptr(st);
        let (kp, _k) = k.device_ptr(st);
        let (vp, _v) = v.device_ptr(st);
        let (op, _o) = out.device_ptr_mut(st);
        let (lp, _l) = lse.device_ptr_mut(st);
        let mut p = params(&s);
        p.q = qp as *const c_void;
        p.k = kp as *const c_void;
        p.v = vp as *const c_void;
        p.out_w = op as *mut c_void;
        p.lse = lp as *mut f32;
        self.launch(
            &format!("dk_attention_fwd_{}", T::SUFFIX),
            warps_grid(nrows)?,
            &p,
        )
    }

    /// Backward of [`CudaKernels::attention_forward`]: `dq`, `dk`, `dv` accumulate; `delta`
    /// `[B, T, NH]` is scratch (overwritten with each row's `dout . out`). `out` and `lse` are
    /// the forward's.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: Storage>(
        &self,
        dq: &mut impl DevicePtrMut<T>,
        dk: &mut impl DevicePtrMut<T>,
        dv: &mut impl DevicePtrMut<T>,
        delta: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<T>,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        out: &impl DevicePtr<T>,
        lse: &impl DevicePtr<f32>,
        s: AttnShape,
    ) -> Result<()> {
        let (nq, nkv, nrows) = lengths(&s)?;
        for (name, len) in [("q", q.len()), ("out", out.len()), ("dout", dout.len())] {
            check(name, len, nq, shape_q(&s))?;
        }
        check("dq", dq.len(), nq, shape_q(&s))?;
        for (name, len) in [("k", k.len()), ("v", v.len())] {
            check(name, len, nkv, shape_kv(&s))?;
        }
        check("dk", dk.len(), nkv, shape_kv(&s))?;
        check("dv", dv.len(), nkv, shape_kv(&s))?;
        check("lse", lse.len(), nrows, shape_rows(&s))?;
        check("delta", delta.len(), nrows, shape_rows(&s))?;
        let st = self.stream();
        let (qp, _q) = q.device_ptr(st);
        let (kp, _k) = k.device_ptr(st);
        let (vp, _v) = v.device_ptr(st);
        let (op, _o) = out.device_ptr(st);
        let (gp, _g) = dout.device_ptr(st);
        let (lp, _l) = lse.device_ptr(st);
        let (dp, _d) = delta.device_ptr_mut(st);
        let (dqp, _dq) = dq.device_ptr_mut(st);
        let (dkp, _dk) = dk.device_ptr_mut(st);
        let (dvp, _dv) = dv.device_ptr_mut(st);
        let mut p = params(&s);
        p.q = qp as *const c_void;
        p.k = kp as *const c_void;
        p.v = vp as *const c_void;
        p.out = op as *const c_void;
        p.dout = gp as *const c_void;
        p.lse = lp as *mut f32; // read only by the backward kernels
        p.delta = dp as *mut f32;
        p.dq = dqp as *mut c_void;
        p.dk = dkp as *mut c_void;
        p.dv = dvp as *mut c_void;
        self.launch(
            &format!("dk_attention_bwd_dq_{}", T::SUFFIX),
            warps_grid(nrows)?,
            &p,
        )?;
        self.launch(
            &format!("dk_attention_bwd_dkv_{}", T::SUFFIX),
            warps_grid(s.batch * s.seq * s.n_kv_heads)?,
            &p,
        )
    }
}

/// The shape fields and scale; every pointer null until the caller sets the ones its kernels use.
fn params(s: &AttnShape) -> DkAttentionParams {
    DkAttentionParams {
        q: std::ptr::null(),
        k: std::ptr::null(),
        v: std::ptr::null(),
        out: std::ptr::null(),
        dout: std::ptr::null(),
        out_w: std::ptr::null_mut(),
        lse: std::ptr::null_mut(),
        delta: std::ptr::null_mut(),
        dq: std::ptr::null_mut(),
        dk: std::ptr::null_mut(),
        dv: std::ptr::null_mut(),
        batch: s.batch as i64,
        seq: s.seq as i64,
        n_heads: s.n_heads as i64,
        n_kv_heads: s.n_kv_heads as i64,
        head_dim: s.head_dim as i64,
        scale: (1.0 / (s.head_dim as f64).sqrt()) as f32,
    }
}
