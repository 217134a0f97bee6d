//! The one host-level interface every device implements: the tests, the CLI and the benchmarks
//! drive `reference`, `cpu`, `emulated` and `cuda` through it. Trainers that keep tensors on the
//! GPU use [`crate::cuda::CudaKernels`]'s device-buffer methods instead, which skip the copies.

use crate::dtype::{HostSlice, HostSliceMut};
use crate::error::{Error, Result};
use crate::semantics::{DistillInputs, GradOutputs, LossConfig, LossValue, TopKInputs};

/// A device that runs the crate's losses and softmax on host buffers:
/// [`crate::reference::Reference`], [`crate::cpu::Cpu`], or `crate::cuda::CudaKernels` (real or
/// emulated GPU; it copies in and out). Every implementation checks its arguments with the shared
/// rules of [`crate::semantics`] and returns the same errors for the same misuse.
pub trait DistillDevice: Send + Sync {
    /// `reference`, `cpu`, `emulated` or `cuda`.
    fn name(&self) -> &'static str;

    /// The fused loss of DESIGN section 4 over `[rows, vocab]` logits (plus hidden states when
    /// given); writes the gradients asked for in `grads`.
    fn distill_loss(
        &self,
        cfg: &LossConfig,
        inputs: &DistillInputs,
        grads: GradOutputs,
    ) -> Result<LossValue>;

    /// The fused loss against a top-k teacher ([`crate::TopKTeacher`] states the semantics):
    /// forward or reverse KL over the teacher's k + 1 buckets plus the hard-label
    /// cross-entropy; writes the gradient of the student logits into `grad` (f32 or the
    /// student's dtype) when given.
    fn distill_loss_topk(
        &self,
        cfg: &LossConfig,
        inputs: &TopKInputs,
        grad: Option<HostSliceMut>,
    ) -> Result<LossValue>;

    /// `output = softmax(input / T)` row by row, or `log_softmax` when `log`; output has the
    /// input's dtype.
    fn softmax(
        &self,
        input: HostSlice,
        rows: usize,
        vocab: usize,
        temperature: f32,
        log: bool,
        output: HostSliceMut,
    ) -> Result<()>;

    /// Backward of [`DistillDevice::softmax`]: given its `output` and the upstream `grad_output`,
    /// writes `grad_input` (all three of one dtype).
    #[allow(clippy::too_many_arguments)]
    fn softmax_backward(
        &self,
        output: HostSlice,
        grad_output: HostSlice,
        rows: usize,
        vocab: usize,
        temperature: f32,
        log: bool,
        grad_input: HostSliceMut,
    ) -> Result<()>;
}

/// Which device to run on, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The f64 reference (`reference`).
    Reference,
    /// The multi-threaded f32 CPU backend (`cpu`).
    Cpu,
    /// The CUDA kernels on the emulated GPU (`emulated`; needs the `emulator` feature).
    Emulated,
    /// The CUDA kernels on GPU 0 (`cuda`; needs the `cuda` feature, nvcc at build time, a driver
    /// and a GPU).
    Cuda,
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "reference" => Ok(DeviceKind::Reference),
            "cpu" => Ok(DeviceKind::Cpu),
            "emulated" => Ok(DeviceKind::Emulated),
            "cuda" => Ok(DeviceKind::Cuda),
            other => Err(format!(
                "unknown device `{other}` (expected reference, cpu, emulated or cuda)"
            )),
        }
    }
}

/// Opens a device. `cuda` and `emulated` return [`Error::DeviceUnavailable`] with the reason
/// when they cannot run here; they never panic.
pub fn open(kind: DeviceKind) -> Result<Box<dyn DistillDevice>> {
    match kind {
        DeviceKind::Reference => Ok(Box::new(crate::reference::Reference)),
        DeviceKind::Cpu => Ok(Box::new(crate::cpu::Cpu::new())),
        #[cfg(feature = "cuda")]
        DeviceKind::Emulated | DeviceKind::Cuda => {
            Ok(Box::new(crate::cuda::CudaKernels::open_kind(kind)?))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Emulated => Err(Error::DeviceUnavailable(
            "this build of distill-kernels has no emulated device (enable the `emulator` feature)"
                .into(),
        )),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => Err(Error::DeviceUnavailable(
            "this build of distill-kernels has no CUDA device (enable the `cuda` feature)".into(),
        )),
    }
}

/// Dtype agreement for the softmax entry points (one dtype per call, as the kernels take).
pub(crate) fn check_same_dtype(what: &'static str, a: HostSlice, b: &HostSliceMut) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::Dtype {
            tensor: what,
            dtype: format!("{} (must match the input's {})", b.dtype(), a.dtype()),
        });
    }
    Ok(())
}

/// The argument checks every backend's `softmax_backward` shares: shapes, temperature, and one
/// dtype for `output`, `grad_output` and `grad_input`.
pub(crate) fn check_softmax_backward(
    output: HostSlice,
    grad_output: HostSlice,
    grad_input: &HostSliceMut,
    rows: usize,
    vocab: usize,
    temperature: f32,
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
    check_same_dtype("grad_input", output, grad_input)?;
    if grad_output.dtype() != output.dtype() {
        return Err(Error::Dtype {
            tensor: "grad_output",
            dtype: format!(
                "{} (must match the output's {})",
                grad_output.dtype(),
                output.dtype()
            ),
        });
    }
    Ok(())
}
