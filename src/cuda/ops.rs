//! The launch sequences of the device-buffer API: what a trainer whose tensors already live on the
//! GPU calls. One call = dk_prepare -> dk_kd_* -> (dk_hidden_mse_*) -> (dk_reduce) on the device's
//! stream, then one synchronization to read the loss and the label check back.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg, SyncOnDrop};

use super::tensor::{DeviceTensor, DeviceTensorMut};
use super::CudaKernels;
use crate::abi::{
    DkHiddenParams, DkKdParams, DkPrepareParams, DkReduceParams, DkScalars, DkSoftmaxBwdParams,
    DkSoftmaxParams,
};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::semantics::{LossConfig, LossKind, LossValue, Reduction};

/// The student logits, and where their gradient goes.
pub enum Student<'a> {
    /// Read only; the gradient, if asked, goes into `grad` (f32 or the logits' dtype).
    Logits {
        /// `[rows, vocab]` student logits, f32, f16 or bf16.
        logits: &'a dyn DeviceTensor,
        /// `[rows, vocab]` gradient buffer; `None` computes the loss only.
        grad: Option<&'a mut dyn DeviceTensorMut>,
    },
    /// The gradient overwrites the logits (no extra `rows x vocab` buffer).
    InPlace(&'a mut dyn DeviceTensorMut),
}

/// Hidden states `[rows, size]` for the MSE term, and where the student's gradient goes.
pub struct DeviceHidden<'a> {
    /// Hidden size: elements per row.
    pub size: usize,
    /// `[rows, size]` student hidden states.
    pub student: &'a dyn DeviceTensor,
    /// `[rows, size]` teacher hidden states (may differ in dtype from the student's).
    pub teacher: &'a dyn DeviceTensor,
    /// `[rows, size]` gradient of the student hidden states, f32 or their dtype; `None`: not
    /// computed.
    pub grad: Option<&'a mut dyn DeviceTensorMut>,
}

/// One loss evaluation on device buffers, row-major `[rows, vocab]`.
pub struct DeviceInputs<'a> {
    /// Rows (token positions).
    pub rows: usize,
    /// Vocabulary size V: entries per row.
    pub vocab: usize,
    /// The student logits and where their gradient goes.
    pub student: Student<'a>,
    /// `[rows, vocab]` teacher logits, f32, f16 or bf16 (may differ from the student's).
    pub teacher: &'a dyn DeviceTensor,
    /// `[rows]` labels, each in `[0, vocab)` or `ignore_index`; required when `alpha < 1`. Checked
    /// on the device: a bad one fails the call with [`Error::LabelOutOfRange`] and no output is
    /// written.
    pub labels: Option<&'a CudaSlice<i64>>,
    /// Hidden states for the MSE term (weight `hidden_weight`), if any.
    pub hidden: Option<DeviceHidden<'a>>,
}

/// Threads per block for a row of `n` elements: about 8 elements per thread, a whole number of
/// warps (the reductions assume full warps), at most 1024.
pub(crate) fn threads_for(n: usize) -> u32 {
    (n.div_ceil(8).next_multiple_of(32)).clamp(32, 1024) as u32
}

fn row_grid(rows: usize, threads: u32) -> Result<LaunchConfig> {
    if rows > i32::MAX as usize {
        return Err(Error::InvalidOption {
            name: "rows",
            value: rows.to_string(),
            reason: "more than 2^31 - 1 rows do not fit one grid dimension",
        });
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn one_block(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: ((n.next_multiple_of(32)).clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_len(tensor: &'static str, actual: usize, expected: usize, shape: String) -> Result<()> {
    if actual != expected {
        return Err(Error::ShapeMismatch {
            tensor,
            expected,
            actual,
            shape,
        });
    }
    Ok(())
}

fn check_grad_dtype(what: &str, grad: Dtype, input: Dtype) -> Result<()> {
    if grad != Dtype::F32 && grad != input {
        return Err(Error::Gradient(format!(
            "{what} gradient dtype {grad} must be f32 or the input's dtype {input}"
        )));
    }
    Ok(())
}

fn kind_code(kind: LossKind) -> &'static str {
    match kind {
        LossKind::ForwardKl => "fkl",
        LossKind::ReverseKl => "rkl",
        LossKind::Jsd { .. } => "jsd",
    }
}

impl CudaKernels {
    fn launch<P: cudarc::driver::DeviceRepr>(
        &self,
        name: &str,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let f = self.function(name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(params);
        // SAFETY: every kernel takes exactly one parameter struct by value, declared in
        // kernels/abi.h and generated from it for Rust; the pointers in it were checked against
        // the shapes it describes.
        unsafe { b.launch(cfg) }.map_err(|e| self.cuda_error(name, e))?;
        Ok(())
    }

    /// The fused distillation loss on device buffers (DESIGN section 4). Writes the gradients
    /// asked for and returns the reduced loss (one value, or one per row for `Reduction::None`).
    /// A label outside `[0, V)` is found on the device and returned as an error; in that case
    /// no output (including an in-place gradient) is written.
    pub fn distill_loss_device(&self, cfg: &LossConfig, inputs: DeviceInputs) -> Result<LossValue> {
        cfg.validate()?;
        let DeviceInputs {
            rows,
            vocab,
            student,
            teacher,
            labels,
            hidden,
        } = inputs;
        if rows == 0 {
            return Err(Error::Empty("rows = 0"));
        }
        if vocab == 0 {
            return Err(Error::Empty("vocab = 0"));
        }
        let n = rows
            .checked_mul(vocab)
            .ok_or(Error::Empty("rows * vocab overflows"))?;
        let shape = || format!("[{rows}, {vocab}]");
        let stream = &*self.stream;
        let mut guards: Vec<SyncOnDrop> = Vec::new();

        // Student pointer, gradient pointer (maybe the same), and their dtypes.
        let (s_ptr, s_dtype, g_ptr, g_dtype) = match student {
            Student::Logits { logits, grad } => {
                check_len("student_logits", logits.len(), n, shape())?;
                let (sp, sg) = logits.read_ptr(stream);
                guards.push(sg);
                match grad {
                    Some(g) => {
                        check_len("grad_student_logits", g.len(), n, shape())?;
                        check_grad_dtype("logits", g.dtype(), logits.dtype())?;
                        let dt = g.dtype();
                        let (gp, gg) = g.write_ptr(stream);
                        guards.push(gg);
                        (sp, logits.dtype(), gp, dt)
                    }
                    None => (sp, logits.dtype(), 0, Dtype::F32),
                }
            }
            Student::InPlace(buf) => {
                check_len("student_logits", buf.len(), n, shape())?;
                let dt = buf.dtype();
                let (p, g) = buf.write_ptr(stream);
                guards.push(g);
                (p, dt, p, dt)
            }
        };
        check_len("teacher_logits", teacher.len(), n, shape())?;
        let (t_ptr, tg) = teacher.read_ptr(stream);
        guards.push(tg);
        let l_ptr = match labels {
            Some(l) => {
                check_len("labels", l.len(), rows, format!("[{rows}]"))?;
                let (p, g) = l.device_ptr(stream);
                guards.push(g);
                p
            }
            None if cfg.needs_labels() => return Err(Error::MissingLabels { alpha: cfg.alpha }),
            None => 0,
        };

        let map = |e| self.cuda_error("allocation", e);
        // Not zeroed: dk_prepare writes the scalars, every row kernel its row's loss, dk_reduce the
        // loss, before anything reads them (the emulator's initcheck holds the kernels to it).
        // SAFETY: plain-old-data types, read back only after the kernels wrote them.
        let (scalars, mut row_loss, mut loss) = unsafe {
            (
                self.stream.alloc::<DkScalars>(1).map_err(map)?,
                self.stream.alloc::<f32>(rows).map_err(map)?,
                self.stream.alloc::<f32>(1).map_err(map)?,
            )
        };
        let (sc_ptr, _g1) = scalars.device_ptr(stream);
        let (rl_ptr, _g2) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut row_loss, stream);

        self.launch(
            "dk_prepare",
            one_block(rows),
            &DkPrepareParams {
                labels: l_ptr as *const i64,
                scalars: sc_ptr as *mut DkScalars,
                rows: rows as i64,
                vocab: vocab as i64,
                ignore_index: cfg.ignore_index,
                reduction: cfg.reduction.code(),
                normalizer: cfg.normalizer.unwrap_or(0.0),
                upstream_scale: cfg.grad_scale,
            },
        )?;

        let kd = format!(
            "dk_kd_{}_{}_{}_{}",
            kind_code(cfg.kind),
            s_dtype,
            teacher.dtype(),
            g_dtype
        );
        self.launch(
            &kd,
            row_grid(rows, threads_for(vocab))?,
            &DkKdParams {
                student: s_ptr as *const _,
                teacher: t_ptr as *const _,
                labels: l_ptr as *const i64,
                grad: g_ptr as *mut _,
                row_loss: rl_ptr as *mut f32,
                scalars: sc_ptr as *const DkScalars,
                rows: rows as i64,
                vocab: vocab as i64,
                student_stride: vocab as i64,
                teacher_stride: vocab as i64,
                grad_stride: vocab as i64,
                ignore_index: cfg.ignore_index,
                inv_temperature: 1.0 / cfg.temperature,
                temperature: cfg.temperature,
                soft_weight: cfg.soft_weight(),
                hard_weight: cfg.hard_weight(),
                beta: cfg.kind.beta(),
                kind: cfg.kind.code(),
            },
        )?;

        if let Some(h) = hidden {
            let DeviceHidden {
                size,
                student: hs,
                teacher: ht,
                grad: hg,
            } = h;
            if size == 0 {
                return Err(Error::Hidden("hidden size is 0".into()));
            }
            let m = rows
                .checked_mul(size)
                .ok_or_else(|| Error::Hidden("rows * hidden overflows".into()))?;
            let hshape = || format!("[{rows}, {size}]");
            check_len("student_hidden", hs.len(), m, hshape())?;
            check_len("teacher_hidden", ht.len(), m, hshape())?;
            let (hs_ptr, g) = hs.read_ptr(stream);
            guards.push(g);
            let (ht_ptr, g) = ht.read_ptr(stream);
            guards.push(g);
            let (hg_ptr, hg_dtype) = match hg {
                Some(grad) => {
                    check_len("grad_student_hidden", grad.len(), m, hshape())?;
                    check_grad_dtype("hidden", grad.dtype(), hs.dtype())?;
                    let dt = grad.dtype();
                    let (p, g) = grad.write_ptr(stream);
                    guards.push(g);
                    (p, dt)
                }
                None => (0, Dtype::F32),
            };
            let name = format!("dk_hidden_mse_{}_{}_{}", hs.dtype(), ht.dtype(), hg_dtype);
            self.launch(
                &name,
                row_grid(rows, threads_for(size))?,
                &DkHiddenParams {
                    student: hs_ptr as *const _,
                    teacher: ht_ptr as *const _,
                    labels: l_ptr as *const i64,
                    grad: hg_ptr as *mut _,
                    row_loss: rl_ptr as *mut f32,
                    scalars: sc_ptr as *const DkScalars,
                    rows: rows as i64,
                    hidden: size as i64,
                    ignore_index: cfg.ignore_index,
                    weight: cfg.hidden_weight,
                },
            )?;
        }

        if cfg.reduction != Reduction::None {
            let (lp, _g3) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut loss, stream);
            self.launch(
                "dk_reduce",
                one_block(rows),
                &DkReduceParams {
                    row_loss: rl_ptr as *const f32,
                    scalars: sc_ptr as *const DkScalars,
                    loss: lp as *mut f32,
                    rows: rows as i64,
                },
            )?;
        }
        drop(guards);
        drop((_g1, _g2));

        let sc = self
            .stream
            .clone_dtoh(&scalars)
            .map_err(|e| self.cuda_error("synchronize", e))?[0];
        if sc.bad_label_row >= 0 {
            return Err(Error::LabelOutOfRange {
                row: sc.bad_label_row as usize,
                label: sc.bad_label,
                vocab,
                ignore_index: cfg.ignore_index,
            });
        }
        let values = match cfg.reduction {
            Reduction::None => self.stream.clone_dtoh(&row_loss),
            _ => self.stream.clone_dtoh(&loss),
        }
        .map_err(|e| self.cuda_error("copy of the loss", e))?;
        Ok(LossValue {
            values,
            valid_rows: sc.valid_rows as usize,
        })
    }

    /// `output = softmax(input / T)` (or `log_softmax`) on device buffers of one dtype.
    pub fn softmax_device(
        &self,
        input: &dyn DeviceTensor,
        output: &mut dyn DeviceTensorMut,
        rows: usize,
        vocab: usize,
        temperature: f32,
        log: bool,
    ) -> Result<()> {
        crate::semantics::check_softmax(
            rows,
            vocab,
            temperature,
            &[("input", input.len()), ("output", output.len())],
        )?;
        if input.dtype() != output.dtype() {
            return Err(Error::Dtype {
                tensor: "output",
                dtype: format!(
                    "{} (must match the input's {})",
                    output.dtype(),
                    input.dtype()
                ),
            });
        }
        let stream = &*self.stream;
        let (ip, _gi) = input.read_ptr(stream);
        let (op, _go) = output.write_ptr(stream);
        self.launch(
            &format!("dk_softmax_fwd_{}", input.dtype()),
            row_grid(rows, threads_for(vocab))?,
            &DkSoftmaxParams {
                input: ip as *const _,
                output: op as *mut _,
                rows: rows as i64,
                vocab: vocab as i64,
                inv_temperature: 1.0 / temperature,
                log_output: log as i32,
            },
        )
    }

    /// Backward of [`CudaKernels::softmax_device`]: `grad_input` from its `output` and `grad_output`.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_backward_device(
        &self,
        output: &dyn DeviceTensor,
        grad_output: &dyn DeviceTensor,
        grad_input: &mut dyn DeviceTensorMut,
        rows: usize,
        vocab: usize,
        temperature: f32,
        log: bool,
    ) -> Result<()> {
        crate::semantics::check_softmax(
            rows,
            vocab,
            temperature,
            &[
                ("output", output.len()),
                ("grad_output", grad_output.len()),
                ("grad_input", grad_input.len()),
            ],
        )?;
        let dt = output.dtype();
        if grad_output.dtype() != dt || grad_input.dtype() != dt {
            return Err(Error::Dtype {
                tensor: "grad_output/grad_input",
                dtype: format!(
                    "{}/{} (must match the output's {dt})",
                    grad_output.dtype(),
                    grad_input.dtype()
                ),
            });
        }
        let stream = &*self.stream;
        let (yp, _g1) = output.read_ptr(stream);
        let (dyp, _g2) = grad_output.read_ptr(stream);
        let (dxp, _g3) = grad_input.write_ptr(stream);
        self.launch(
            &format!("dk_softmax_bwd_{dt}"),
            row_grid(rows, threads_for(vocab))?,
            &DkSoftmaxBwdParams {
                output: yp as *const _,
                grad_output: dyp as *const _,
                grad_input: dxp as *mut _,
                rows: rows as i64,
                vocab: vocab as i64,
                inv_temperature: 1.0 / temperature,
                log_output: log as i32,
            },
        )
    }
}
