//! The CPU backend (`cpu`): every kernel of the crate (fused KD loss with cross-entropy, hidden
//! MSE, softmax with temperature, forward and backward) in f32, rows in parallel with rayon.
//!
//! The algorithm is the GPU kernels' (kernels/kd_loss.cu): one thread owns a whole row and reads
//! it at most twice (JSD with a gradient makes a third pass over the row's scratch only), keeping
//! online statistics (running maxima, sums of exponentials, forward and reverse KL relative to the
//! running maxima) in pass 1 and writing the gradient (and JSD's loss terms) in pass 2. A row is processed in
//! chunks of `simd::CHUNK` (512) entries, widened from f16/bf16 into a stack buffer on the fly; the
//! exponentials of pass 1 are kept in a per-thread scratch of O(vocab) floats (never N x V) so
//! that pass 2 computes none. See `kd.rs` for the loss, `softmax.rs`, `hidden.rs`, `floor.rs`.
//!
//! Speed comes from loops that LLVM vectorizes: per-entry values are computed by plain loops
//! (vectorized as maps), sums by loops over `simd::W` (16) lanes with one accumulator per lane
//! (`simd::sum`), and the exponentials and logarithms are the branch-free polynomials of
//! [`fastmath`] (errors of at most 1.5 / 2.5 ulp, stated and tested there), in base 2 so that
//! `log2 e / T` folds into one scale. The loops are compiled three times, for AVX-512, AVX2+FMA and
//! the target's baseline, and the best level the CPU supports is picked at run time
//! ([`SimdLevel`]); no `-C target-cpu` is needed.
//!
//! Numerics: log-probabilities are `(x - max) / T - log z` (in base 2), centered before scaling,
//! so logits of magnitude 1e4 keep their differences. Sums along a row go into 16 lane
//! accumulators per chunk of 512 entries, and chunk sums into the row's total, so the rounding of
//! `log z` at V = 128k stays near 1e-7. The semantics, including the conventions for zeros,
//! infinities and NaN, are those of [`crate::reference`].
//!
//! Determinism: each row is computed by one thread in a fixed order, and the row losses are
//! summed in f64 in row order on the calling thread, so results are bit-identical whatever the
//! number of threads. The order of every floating-point operation is fixed by the source (no
//! reassociation, no contraction), so the AVX-512, AVX2 and aarch64 builds give the same bits;
//! only an x86_64 CPU without FMA (the portable level with separate multiply and add) may differ
//! in the last bits, within the same error bounds.

pub mod fastmath;
mod floor;
mod hidden;
mod kd;
mod simd;
mod softmax;
mod topk;

use std::ops::Range;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::device::{check_same_dtype, DistillDevice};
use crate::dtype::{HostSlice, HostSliceMut};
use crate::error::Result;
use crate::semantics::{
    check_inputs, check_softmax, check_topk_inputs, DistillInputs, GradOutputs, HiddenInputs,
    LossConfig, LossKind, LossValue, Reduction, TopKInputs,
};

pub use floor::memory_floor;

pub use simd::SimdLevel;

use kd::{HardMode, KdParams, KdRow, Soft};
use simd::{Lanes, CHUNK};

/// The multi-threaded CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Cpu {
    /// The CPU backend. It holds no state: rows run on rayon's global thread pool, with the
    /// [`SimdLevel`] detected for this CPU.
    pub fn new() -> Self {
        Cpu
    }

    /// The instruction set the hot loops use on this machine.
    pub fn simd_level(&self) -> SimdLevel {
        SimdLevel::detect()
    }
}

// ---------------------------------------------------------------------------------------------
// Rows of host slices, widened and narrowed a chunk at a time.

/// Row `r` of a `[rows, vocab]` tensor.
fn row_of(x: HostSlice, r: usize, vocab: usize) -> HostSlice {
    let range = r * vocab..(r + 1) * vocab;
    match x {
        HostSlice::F32(v) => HostSlice::F32(&v[range]),
        HostSlice::F16(v) => HostSlice::F16(&v[range]),
        HostSlice::Bf16(v) => HostSlice::Bf16(&v[range]),
    }
}

/// `x[range]` (at most [`CHUNK`] entries) as f32, padded with `pad` to a multiple of
/// [`simd::W`] (see [`Lanes::widen`]).
#[inline(always)]
fn widen<'a>(
    x: HostSlice<'a>,
    range: Range<usize>,
    buf: &'a mut [f32; CHUNK],
    pad: f32,
) -> &'a [f32] {
    match x {
        HostSlice::F32(v) => f32::widen(&v[range], buf, pad),
        HostSlice::F16(v) => f16::widen(&v[range], buf, pad),
        HostSlice::Bf16(v) => bf16::widen(&v[range], buf, pad),
    }
}

/// `dst[start..start + src.len()] = src`, rounded to `dst`'s dtype.
#[inline(always)]
fn narrow_into(src: &[f32], dst: &mut HostSliceMut, start: usize) {
    let range = start..start + src.len();
    match dst {
        HostSliceMut::F32(d) => f32::narrow(src, &mut d[range]),
        HostSliceMut::F16(d) => f16::narrow(src, &mut d[range]),
        HostSliceMut::Bf16(d) => bf16::narrow(src, &mut d[range]),
    }
}

thread_local! {
    /// Each thread's row scratch (see `kd.rs`): O(vocab) floats, kept between calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's copy of the student row an in-place call overwrites (4-byte words).
    static ROW_COPY: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Accumulate mode ([`LossConfig::accumulate`]): `f` writes the row's gradient into an f32 row of
/// this thread's, which is then added into `g` (each element rounded once to `G`); returns what
/// `f` returns. `keep = false` (an ignored row) leaves `g` as it is.
fn accumulate_row<G: Lanes, R>(g: &mut [G], keep: bool, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static ACC_ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    ACC_ROW.with(|cell| {
        let mut fresh = Vec::new();
        let mut held = cell.try_borrow_mut();
        let buf = match held.as_mut() {
            Ok(v) => v,
            Err(_) => &mut fresh,
        };
        if buf.len() < g.len() {
            buf.resize(g.len(), 0.0);
        }
        let row = &mut buf[..g.len()];
        let out = f(row);
        if keep {
            for (g, &d) in g.iter_mut().zip(row.iter()) {
                *g = G::from_f32(g.to_f32() + d);
            }
        }
        out
    })
}

/// Runs `f` with `len` floats of this thread's scratch (a fresh buffer if it is in use).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

// ---------------------------------------------------------------------------------------------
// The fused loss.

/// [`DistillDevice::distill_loss`] of [`Cpu`] with its hot loops compiled for `level` (lowered to
/// what this CPU supports). `Cpu` uses [`SimdLevel::detect`]; the other levels are for tests and
/// comparisons.
pub fn distill_loss_with(
    level: SimdLevel,
    cfg: &LossConfig,
    inputs: &DistillInputs,
    grads: GradOutputs,
) -> Result<LossValue> {
    let valid_rows = check_inputs(cfg, inputs, &grads)?;
    let (loss_scale, grad_scale) = cfg.scales(valid_rows);
    let params = kd_params(cfg, grad_scale as f32);
    let mut row_loss = vec![0.0f32; inputs.rows];
    let level = level.supported();
    match grads.logits {
        None => kd_rows::<f32>(level, &params, cfg, inputs, None, &mut row_loss),
        Some(HostSliceMut::F32(g)) => kd_rows(level, &params, cfg, inputs, Some(g), &mut row_loss),
        Some(HostSliceMut::F16(g)) => kd_rows(level, &params, cfg, inputs, Some(g), &mut row_loss),
        Some(HostSliceMut::Bf16(g)) => kd_rows(level, &params, cfg, inputs, Some(g), &mut row_loss),
    }
    if let Some(h) = &inputs.hidden {
        hidden_rows(
            level,
            cfg,
            h,
            inputs.labels,
            grad_scale as f32,
            grads.hidden,
            &mut row_loss,
        );
    }
    let values = reduce(cfg.reduction, &row_loss, loss_scale);
    Ok(LossValue { values, valid_rows })
}

/// [`DistillDevice::distill_loss_topk`] of [`Cpu`] with its hot loops compiled for `level`.
pub fn distill_loss_topk_with(
    level: SimdLevel,
    cfg: &LossConfig,
    inputs: &TopKInputs,
    grad: Option<HostSliceMut>,
) -> Result<LossValue> {
    let valid_rows = check_topk_inputs(cfg, inputs, grad.as_ref())?;
    let (loss_scale, grad_scale) = cfg.scales(valid_rows);
    let p = topk::TopKParams::new(cfg, grad_scale as f32);
    let mut row_loss = vec![0.0f32; inputs.rows];
    let level = level.supported();
    match grad {
        None => topk::rows::<f32>(level, &p, cfg, inputs, None, &mut row_loss),
        Some(HostSliceMut::F32(g)) => topk::rows(level, &p, cfg, inputs, Some(g), &mut row_loss),
        Some(HostSliceMut::F16(g)) => topk::rows(level, &p, cfg, inputs, Some(g), &mut row_loss),
        Some(HostSliceMut::Bf16(g)) => topk::rows(level, &p, cfg, inputs, Some(g), &mut row_loss),
    }
    let values = reduce(cfg.reduction, &row_loss, loss_scale);
    Ok(LossValue { values, valid_rows })
}

/// The per-call constants of the fused loss.
fn kd_params(cfg: &LossConfig, grad_scale: f32) -> KdParams {
    let soft_weight = cfg.soft_weight();
    let soft = if soft_weight == 0.0 {
        Soft::Off
    } else {
        match cfg.kind {
            LossKind::ForwardKl => Soft::ForwardKl,
            LossKind::ReverseKl => Soft::ReverseKl,
            LossKind::Jsd { beta } => Soft::Jsd { beta },
        }
    };
    let inv_t = 1.0 / cfg.temperature;
    KdParams {
        inv_t,
        scale2: inv_t * std::f32::consts::LOG2_E,
        soft,
        soft_weight,
        hard_weight: cfg.hard_weight(),
        grad_scale,
        hard_mode: HardMode::for_temperature(cfg.temperature, !matches!(soft, Soft::Off)),
    }
}

/// The hidden-state MSE of every row added into `row_loss`, its gradient into `grad`.
fn hidden_rows(
    level: SimdLevel,
    cfg: &LossConfig,
    h: &HiddenInputs,
    labels: Option<&[i64]>,
    gs: f32,
    grad: Option<HostSliceMut>,
    row_loss: &mut [f32],
) {
    match grad {
        None => hidden::rows::<f32>(level, cfg, h, labels, gs, None, row_loss),
        Some(HostSliceMut::F32(g)) => hidden::rows(level, cfg, h, labels, gs, Some(g), row_loss),
        Some(HostSliceMut::F16(g)) => hidden::rows(level, cfg, h, labels, gs, Some(g), row_loss),
        Some(HostSliceMut::Bf16(g)) => hidden::rows(level, cfg, h, labels, gs, Some(g), row_loss),
    }
}

/// The inputs of [`Cpu::distill_loss_in_place`]: all but the student logits, which the call
/// takes mutably (they become the gradient).
#[derive(Debug, Clone, Copy)]
pub struct InPlaceInputs<'a> {
    /// Rows (tokens) in the batch.
    pub rows: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// `[rows, vocab]` teacher logits.
    pub teacher: HostSlice<'a>,
    /// `[rows]` labels; required when `alpha < 1`.
    pub labels: Option<&'a [i64]>,
    /// Hidden states for the MSE term.
    pub hidden: Option<HiddenInputs<'a>>,
}

impl Cpu {
    /// The fused loss with the student gradient written over the `[rows, vocab]` student logits
    /// in their own dtype (f32, f16 or bf16): no second buffer of that size. Everything else is
    /// [`DistillDevice::distill_loss`]'s contract; on an argument error the logits are untouched.
    pub fn distill_loss_in_place(
        &self,
        cfg: &LossConfig,
        mut student: HostSliceMut,
        inputs: &InPlaceInputs,
        grad_hidden: Option<HostSliceMut>,
    ) -> Result<LossValue> {
        let grads = GradOutputs {
            logits: None,
            hidden: grad_hidden,
        };
        let view = DistillInputs {
            rows: inputs.rows,
            vocab: inputs.vocab,
            student: student.as_slice(),
            teacher: inputs.teacher,
            labels: inputs.labels,
            hidden: inputs.hidden,
        };
        let valid_rows = check_inputs(cfg, &view, &grads)?;
        if cfg.accumulate {
            return Err(crate::Error::Gradient(
                "accumulate = true cannot go with an in-place gradient (it would add to the logits)"
                    .into(),
            ));
        }
        let (loss_scale, grad_scale) = cfg.scales(valid_rows);
        let params = kd_params(cfg, grad_scale as f32);
        let level = SimdLevel::detect().supported();
        let mut row_loss = vec![0.0f32; inputs.rows];
        match &mut student {
            HostSliceMut::F32(s) => kd_rows_in_place(level, &params, cfg, inputs, s, &mut row_loss),
            HostSliceMut::F16(s) => kd_rows_in_place(level, &params, cfg, inputs, s, &mut row_loss),
            HostSliceMut::Bf16(s) => {
                kd_rows_in_place(level, &params, cfg, inputs, s, &mut row_loss)
            }
        }
        if let Some(h) = &inputs.hidden {
            let gs = grad_scale as f32;
            hidden_rows(
                level,
                cfg,
                h,
                inputs.labels,
                gs,
                grads.hidden,
                &mut row_loss,
            );
        }
        Ok(LossValue {
            values: reduce(cfg.reduction, &row_loss, loss_scale),
            valid_rows,
        })
    }
}

/// The row losses combined as `reduction` says, times `loss_scale`.
fn reduce(reduction: Reduction, row_loss: &[f32], loss_scale: f64) -> Vec<f32> {
    match reduction {
        Reduction::None => row_loss
            .iter()
            .map(|&l| (l as f64 * loss_scale) as f32)
            .collect(),
        Reduction::Sum | Reduction::Mean => {
            // One thread, row order: deterministic whatever the thread count.
            let total: f64 = row_loss.iter().map(|&l| l as f64).sum();
            vec![(total * loss_scale) as f32]
        }
    }
}

/// The hidden-state MSE term alone: `cfg.hidden_weight * mean_h (h_s - h_t)^2` per row whose
/// label is not `cfg.ignore_index` (every row without labels), reduced as `cfg.reduction` says,
/// with its gradient when `grad` is given (f32 or the student's dtype). The same term the fused
/// loss adds when given hidden states; labels are not range-checked (they only mask rows).
pub fn hidden_mse(
    cfg: &LossConfig,
    rows: usize,
    hidden: &HiddenInputs,
    labels: Option<&[i64]>,
    grad: Option<HostSliceMut>,
) -> Result<LossValue> {
    cfg.validate()?;
    if rows == 0 {
        return Err(crate::error::Error::Empty("rows = 0"));
    }
    crate::semantics::check_hidden(rows, hidden, grad.as_ref())?;
    if let Some(l) = labels {
        if l.len() != rows {
            return Err(crate::error::Error::ShapeMismatch {
                tensor: "labels",
                expected: rows,
                actual: l.len(),
                shape: format!("[{rows}]"),
            });
        }
    }
    let valid_rows = crate::semantics::valid_rows(cfg, labels, rows);
    let (loss_scale, grad_scale) = cfg.scales(valid_rows);
    let gs = grad_scale as f32;
    let level = SimdLevel::detect().supported();
    let mut row_loss = vec![0.0f32; rows];
    hidden_rows(level, cfg, hidden, labels, gs, grad, &mut row_loss);
    Ok(LossValue {
        values: reduce(cfg.reduction, &row_loss, loss_scale),
        valid_rows,
    })
}

/// The fused soft/hard loss of every row into `row_loss`, its gradient into `grad`; one row per
/// rayon task.
fn kd_rows<G: Lanes>(
    level: SimdLevel,
    p: &KdParams,
    cfg: &LossConfig,
    inputs: &DistillInputs,
    grad: Option<&mut [G]>,
    row_loss: &mut [f32],
) {
    let v = inputs.vocab;
    fn run<G: Lanes>(
        level: SimdLevel,
        p: &KdParams,
        cfg: &LossConfig,
        inputs: &DistillInputs,
        r: usize,
        grad: Option<&mut [G]>,
    ) -> f32 {
        let v = inputs.vocab;
        let label = inputs.labels.map(|l| l[r]);
        kd_row(
            level,
            p,
            cfg,
            row_of(inputs.student, r, v),
            row_of(inputs.teacher, r, v),
            label,
            grad,
        )
    }
    let run_g = |r: usize, g: &mut [G]| -> f32 {
        if cfg.accumulate {
            let keep = cfg.row_is_valid(inputs.labels.map(|l| l[r]));
            accumulate_row(g, keep, |buf| run(level, p, cfg, inputs, r, Some(buf)))
        } else {
            run(level, p, cfg, inputs, r, Some(g))
        }
    };
    let run = |r: usize, grad: Option<&mut [G]>| run(level, p, cfg, inputs, r, grad);
    match grad {
        Some(g) => g
            .par_chunks_mut(v)
            .zip(row_loss.par_iter_mut())
            .enumerate()
            .for_each(|(r, (g, l))| *l = run_g(r, g)),
        None => row_loss
            .par_iter_mut()
            .enumerate()
            .for_each(|(r, l)| *l = run(r, None)),
    }
}

/// As [`kd_rows`], with each row's gradient written over its student logits: the row is first
/// copied to this thread's buffer (a row of 128k f32 is 512 KiB, in L2 while the passes run),
/// so every kind reads the logits it had, whatever its passes write when.
fn kd_rows_in_place<G: Lanes + bytemuck::Pod>(
    level: SimdLevel,
    p: &KdParams,
    cfg: &LossConfig,
    inputs: &InPlaceInputs,
    student: &mut [G],
    row_loss: &mut [f32],
) {
    let v = inputs.vocab;
    student
        .par_chunks_mut(v)
        .zip(row_loss.par_iter_mut())
        .enumerate()
        .for_each(|(r, (row, l))| {
            ROW_COPY.with(|cell| {
                let mut buf = cell.borrow_mut();
                let words = (v * std::mem::size_of::<G>()).div_ceil(4);
                if buf.len() < words {
                    buf.resize(words, 0);
                }
                let copy: &mut [G] = &mut bytemuck::cast_slice_mut(&mut buf[..words])[..v];
                copy.copy_from_slice(row);
                let label = inputs.labels.map(|l| l[r]);
                let t = row_of(inputs.teacher, r, v);
                *l = kd_row(level, p, cfg, G::host(copy), t, label, Some(row));
            })
        });
}

/// One row of the fused loss: its value, and its gradient into `grad` when given.
fn kd_row<G: Lanes>(
    level: SimdLevel,
    p: &KdParams,
    cfg: &LossConfig,
    s: HostSlice,
    t: HostSlice,
    label: Option<i64>,
    grad: Option<&mut [G]>,
) -> f32 {
    if !cfg.row_is_valid(label) {
        if let Some(g) = grad {
            g.fill(G::from_f32(0.0));
        }
        return 0.0;
    }
    // A valid label is in [0, vocab) (checked by check_inputs).
    let label = if p.hard_weight > 0.0 {
        label.map(|y| y as usize)
    } else {
        None
    };
    with_scratch(kd::scratch_len(s.len()), |scratch| {
        simd::run(
            level,
            KdRow {
                p,
                s,
                t,
                label,
                grad: grad.map(G::host_mut),
                scratch,
            },
        )
    })
}

// ---------------------------------------------------------------------------------------------

impl DistillDevice for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn distill_loss(
        &self,
        cfg: &LossConfig,
        inputs: &DistillInputs,
        grads: GradOutputs,
    ) -> Result<LossValue> {
        distill_loss_with(SimdLevel::detect(), cfg, inputs, grads)
    }

    fn distill_loss_topk(
        &self,
        cfg: &LossConfig,
        inputs: &TopKInputs,
        grad: Option<HostSliceMut>,
    ) -> Result<LossValue> {
        distill_loss_topk_with(SimdLevel::detect(), cfg, inputs, grad)
    }

    fn softmax(
        &self,
        input: HostSlice,
        rows: usize,
        vocab: usize,
        temperature: f32,
        log: bool,
        output: HostSliceMut,
    ) -> Result<()> {
        check_softmax(
            rows,
            vocab,
            temperature,
            &[("input", input.len()), ("output", output.len())],
        )?;
        check_same_dtype("output", input, &output)?;
        let level = SimdLevel::detect();
        let inv_t = 1.0 / temperature;
        match output {
            HostSliceMut::F32(o) => softmax::rows(level, input, vocab, inv_t, log, o),
            HostSliceMut::F16(o) => softmax::rows(level, input, vocab, inv_t, log, o),
            HostSliceMut::Bf16(o) => softmax::rows(level, input, vocab, inv_t, log, o),
        }
        Ok(())
    }

    fn softmax_backward(
        &self,
        output: HostSlice,
        grad_output: HostSlice,
        rows: usize,
        vocab: usize,
        temperature: f32,
        log: bool,
        grad_input: HostSliceMut,
    ) -> Result<()> {
        crate::device::check_softmax_backward(
            output,
            grad_output,
            &grad_input,
            rows,
            vocab,
            temperature,
        )?;
        let level = SimdLevel::detect();
        let inv_t = 1.0 / temperature;
        let (y, dy) = (output, grad_output);
        match grad_input {
            HostSliceMut::F32(dx) => softmax::backward_rows(level, y, dy, vocab, inv_t, log, dx),
            HostSliceMut::F16(dx) => softmax::backward_rows(level, y, dy, vocab, inv_t, log, dx),
            HostSliceMut::Bf16(dx) => softmax::backward_rows(level, y, dy, vocab, inv_t, log, dx),
        }
        Ok(())
    }
}
