//! candle integration (feature `candle`): the fused distillation loss and the hidden-state MSE as
//! candle ops that take part in candle's autograd.
//!
//! The forward pass computes the loss and, when the student tracks gradients, its gradient in the
//! same fused pass; `backward` scales that gradient by the upstream one. The teacher never gets a
//! gradient (it is a target). CPU tensors run on the [`crate::cpu`] backend; CUDA tensors are not
//! supported yet: candle's CUDA backend cannot be built on the machines this crate is tested on
//! (it needs nvcc for candle-kernels and links cuBLAS), so the device path would be untested.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use distill_kernels::{candle::distill_loss, LossConfig};
//!
//! let student = Var::new(&[[1.0f32, 2.0, 3.0], [0.5, 0.0, -1.0]], &Device::Cpu)?;
//! let teacher = Tensor::new(&[[3.0f32, 2.0, 1.0], [0.0, 0.0, 0.0]], &Device::Cpu)?;
//! let labels = Tensor::new(&[2i64, -100], &Device::Cpu)?;
//! let cfg = LossConfig::builder().temperature(2.0).alpha(0.5).build()?;
//! let loss = distill_loss(student.as_tensor(), &teacher, Some(&labels), &cfg)?;
//! let grads = loss.backward()?;
//! let g = grads.get(student.as_tensor()).expect("the student has a gradient");
//! assert_eq!(g.dims(), &[2, 3]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::cpu::Cpu;
use crate::device::DistillDevice;
use crate::dtype::{HostSlice, HostVec};
use crate::semantics::{DistillInputs, GradOutputs, HiddenInputs, LossConfig, Reduction};

/// The fused loss of DESIGN section 4 between `student` and `teacher` logits of shape
/// `[..., vocab]` (f32, f16 or bf16; the two dtypes may differ), with optional integer `labels`
/// of shape `[...]` (`ignore_index` rows take no part). Returns an f32 scalar for `Sum`/`Mean`,
/// or one loss per row, shaped `[...]`, for `Reduction::None`.
///
/// `cfg.grad_scale` must be 1: the upstream gradient comes from candle's backward pass.
pub fn distill_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: Option<&Tensor>,
    cfg: &LossConfig,
) -> candle_core::Result<Tensor> {
    let op = LossOp::new(Term::Logits, student, teacher, labels, cfg)?;
    student.contiguous()?.apply_op2(&teacher.contiguous()?, op)
}

/// The hidden-state MSE `cfg.hidden_weight * mean_h (h_s - h_t)^2` per row of `[..., hidden]`
/// states, masked and reduced like [`distill_loss`] (`cfg.kind`, `temperature` and `alpha` play
/// no part). Add it to the logits loss for the full objective.
pub fn hidden_mse(
    student: &Tensor,
    teacher: &Tensor,
    labels: Option<&Tensor>,
    cfg: &LossConfig,
) -> candle_core::Result<Tensor> {
    let op = LossOp::new(Term::Hidden, student, teacher, labels, cfg)?;
    student.contiguous()?.apply_op2(&teacher.contiguous()?, op)
}

fn err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

fn msg(m: String) -> candle_core::Error {
    candle_core::Error::Msg(m)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Term {
    Logits,
    Hidden,
}

/// One evaluation: the configuration, the labels on the host, and the gradient the forward pass
/// computed for the backward pass to take.
struct LossOp {
    term: Term,
    cfg: LossConfig,
    labels: Option<Vec<i64>>,
    /// The shape of one loss per row (`[...]`).
    row_shape: Shape,
    rows: usize,
    width: usize,
    want_grad: bool,
    grad: Mutex<Option<HostVec>>,
}

impl LossOp {
    fn new(
        term: Term,
        student: &Tensor,
        teacher: &Tensor,
        labels: Option<&Tensor>,
        cfg: &LossConfig,
    ) -> candle_core::Result<Self> {
        cfg.validate().map_err(err)?;
        if cfg.accumulate {
            return Err(msg(
                "accumulate = true: candle sums gradients itself; leave accumulate off".into(),
            ));
        }
        if cfg.grad_scale != 1.0 {
            return Err(msg(format!(
                "grad_scale = {} : under candle the upstream gradient scales the loss's \
                 gradient; leave grad_scale at 1",
                cfg.grad_scale
            )));
        }
        if student.dims() != teacher.dims() {
            return Err(msg(format!(
                "student {:?} and teacher {:?} must have the same shape",
                student.dims(),
                teacher.dims()
            )));
        }
        let dims = student.dims();
        let Some((&width, lead)) = dims.split_last() else {
            return Err(msg("the logits must have at least one dimension".into()));
        };
        let rows = lead.iter().product::<usize>();
        let labels = match labels {
            Some(l) => {
                if l.dims() != lead {
                    return Err(msg(format!(
                        "labels {:?} must have the logits' leading shape {lead:?}",
                        l.dims()
                    )));
                }
                Some(l.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?)
            }
            None => None,
        };
        Ok(LossOp {
            term,
            cfg: *cfg,
            labels,
            row_shape: Shape::from(lead.to_vec()),
            rows,
            width,
            want_grad: student.track_op(),
            grad: Mutex::new(None),
        })
    }

    /// Runs the cpu backend; returns the loss values and, when asked, the student gradient in
    /// the student's dtype.
    fn run(
        &self,
        student: HostSlice,
        teacher: HostSlice,
        want_grad: bool,
    ) -> crate::Result<(Vec<f32>, Option<HostVec>)> {
        let mut grad = want_grad.then(|| HostVec::zeros(student.dtype(), student.len()));
        let grad_slice = grad.as_mut().map(HostVec::as_mut_slice);
        let labels = self.labels.as_deref();
        let value = match self.term {
            Term::Logits => Cpu::new().distill_loss(
                &self.cfg,
                &DistillInputs {
                    rows: self.rows,
                    vocab: self.width,
                    student,
                    teacher,
                    labels,
                    hidden: None,
                },
                GradOutputs {
                    logits: grad_slice,
                    hidden: None,
                },
            )?,
            Term::Hidden => crate::cpu::hidden_mse(
                &self.cfg,
                self.rows,
                &HiddenInputs {
                    size: self.width,
                    student,
                    teacher,
                },
                labels,
                grad_slice,
            )?,
        };
        Ok((value.values, grad))
    }

    fn out_shape(&self) -> Shape {
        match self.cfg.reduction {
            Reduction::None => self.row_shape.clone(),
            Reduction::Sum | Reduction::Mean => Shape::from(()),
        }
    }
}

/// A contiguous candle CPU buffer as a host slice.
fn host_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<HostSlice<'a>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        return Err(msg(format!("{what} must be contiguous")));
    };
    Ok(match s {
        CpuStorage::F32(v) => HostSlice::F32(&v[start..end]),
        CpuStorage::F16(v) => HostSlice::F16(&v[start..end]),
        CpuStorage::BF16(v) => HostSlice::Bf16(&v[start..end]),
        other => {
            return Err(msg(format!(
                "{what} has dtype {:?}; the loss takes f32, f16 or bf16",
                other.dtype()
            )))
        }
    })
}

fn tensor_of(v: HostVec, shape: &[usize]) -> candle_core::Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    match v {
        HostVec::F32(v) => Tensor::from_vec(v, shape, &dev),
        HostVec::F16(v) => Tensor::from_vec(v, shape, &dev),
        HostVec::Bf16(v) => Tensor::from_vec(v, shape, &dev),
    }
}

impl CustomOp2 for LossOp {
    fn name(&self) -> &'static str {
        match self.term {
            Term::Logits => "distill-loss",
            Term::Hidden => "distill-hidden-mse",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let student = host_slice(s1, l1, "student")?;
        let teacher = host_slice(s2, l2, "teacher")?;
        let (values, grad) = self.run(student, teacher, self.want_grad).map_err(err)?;
        *self.grad.lock().unwrap_or_else(|p| p.into_inner()) = grad;
        Ok((CpuStorage::F32(values), self.out_shape()))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let cached = self.grad.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let grad = match cached {
            Some(g) => g,
            // The forward pass ran without gradient tracking: compute it now.
            None => {
                let (s, t) = (student.contiguous()?, teacher.contiguous()?);
                let (ss, sl) = s.storage_and_layout();
                let (ts, tl) = t.storage_and_layout();
                let (candle_core::Storage::Cpu(ss), candle_core::Storage::Cpu(ts)) = (&*ss, &*ts)
                else {
                    return Err(msg("the distillation ops run on CPU tensors only".into()));
                };
                let (_, g) = self
                    .run(
                        host_slice(ss, sl, "student")?,
                        host_slice(ts, tl, "teacher")?,
                        true,
                    )
                    .map_err(err)?;
                g.ok_or_else(|| msg("the backward pass computed no gradient".into()))?
            }
        };
        let grad = tensor_of(grad, student.dims())?;
        // The gradient is that of the reduced loss (or of the sum of row losses for `None`):
        // scale by the upstream gradient, per row for `None`.
        let upstream = grad_res.to_dtype(grad.dtype())?;
        let upstream = match self.cfg.reduction {
            Reduction::None => upstream.unsqueeze(upstream.rank())?,
            Reduction::Sum | Reduction::Mean => upstream,
        };
        Ok((Some(grad.broadcast_mul(&upstream)?), None))
    }
}
