//! The optimizer step on a CUDA device (`kernels/optim.cu`): the global gradient norm with its
//! clipping factor, and AdamW, on buffers that stay on the device. The update is bit-identical
//! to [`AdamW::update`] after [`clip_grad_norm`](crate::train::optim::clip_grad_norm) (same
//! scalars from [`AdamW::scalars`], every operation rounded on its own); the norm is a
//! deterministic f64 reduction over fixed chunks, equal to the CPU's up to f64 rounding.
//!
//! Nothing here synchronizes except [`GradClip::norm`], which copies the norm to the host; the
//! clipping factor goes from the norm kernel to AdamW on the device.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use crate::abi::{DkAdamWParams, DkClipParams, DkClipResult, DkSumSqParams, DK_NORM_CHUNK};
use crate::cuda::CudaKernels;
use crate::train::error::{Result, TrainError as Error};
use crate::train::optim::{AdamW, DecayMask};

/// Threads of the element-wise and partial-sum kernels (their `__launch_bounds__`).
const THREADS: u32 = 256;
/// At most this many blocks for AdamW's grid-stride loop.
const MAX_BLOCKS: usize = 4096;

fn empty(what: &'static str) -> Error {
    Error::Loss(crate::Error::Empty(what))
}

/// The gradient norm and clipping factor of the last [`GradClip::enqueue`], on the device.
pub struct GradClip {
    len: usize,
    partials: CudaSlice<f64>,
    result: CudaSlice<DkClipResult>,
    enqueued: bool,
}

impl GradClip {
    /// Device memory for the norm of a gradient of `len` elements.
    pub fn new(dev: &CudaKernels, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(empty("a gradient of 0 elements"));
        }
        let blocks = len.div_ceil(DK_NORM_CHUNK as usize);
        let stream = dev.stream();
        let map = |e| Error::Loss(dev.cuda_error("gradient-norm workspace allocation", e));
        // Not zeroed: the kernels write both before anything reads them (the emulator's
        // initcheck holds them to it), and `norm` refuses before the first enqueue.
        // SAFETY: plain-old-data types, read only after a kernel wrote them.
        let (partials, result) = unsafe {
            (
                stream.alloc::<f64>(blocks).map_err(map)?,
                stream.alloc::<DkClipResult>(1).map_err(map)?,
            )
        };
        Ok(GradClip {
            len,
            partials,
            result,
            enqueued: false,
        })
    }

    /// Enqueues the L2 norm of `grads` and the factor `max_norm / norm` (1 when the norm is at
    /// most `max_norm`, or `max_norm` is negative or NaN) that [`DeviceAdamW::update`] applies.
    /// The gradient itself is not modified.
    pub fn enqueue(
        &mut self,
        dev: &CudaKernels,
        grads: &CudaSlice<f32>,
        max_norm: f32,
    ) -> Result<()> {
        if grads.len() != self.len {
            return Err(Error::ShapeMismatch {
                tensor: "grads",
                expected: self.len,
                actual: grads.len(),
                shape: "the length the GradClip was made for".into(),
            });
        }
        let stream = dev.stream();
        let blocks = self.partials.len();
        {
            let (g, _g) = grads.device_ptr(stream);
            let (pp, _p) = self.partials.device_ptr_mut(stream);
            let params = DkSumSqParams {
                grads: g as *const f32,
                partials: pp as *mut f64,
                n: self.len as i64,
            };
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            dev.launch("dk_sumsq_partial", cfg, &params)?;
        }
        let (pp, _p) = self.partials.device_ptr(stream);
        let (r, _r) = self.result.device_ptr_mut(stream);
        let params = DkClipParams {
            partials: pp as *const f64,
            result: r as *mut DkClipResult,
            blocks: blocks as i64,
            max_norm,
        };
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("dk_clip_finish", cfg, &params)?;
        self.enqueued = true;
        Ok(())
    }

    /// The norm before clipping, copied to the host (waits for the stream). NaN or infinite when
    /// a gradient is; [`DeviceAdamW::update`] then writes nothing.
    pub fn norm(&self, dev: &CudaKernels) -> Result<f32> {
        if !self.enqueued {
            return Err(empty("no gradient norm was enqueued"));
        }
        let host = dev
            .stream()
            .clone_dtoh(&self.result)
            .map_err(|e| Error::Loss(dev.cuda_error("reading the gradient norm", e)))?;
        Ok(host[0].norm)
    }
}

/// AdamW's moments on the device, with the hyper-parameters and step count of the host
/// [`AdamW`] they came from.
pub struct DeviceAdamW {
    /// Hyper-parameters and updates done; its host moments are left empty.
    pub config: AdamW,
    /// First moments, one per parameter.
    pub m: CudaSlice<f32>,
    /// Second moments, one per parameter.
    pub v: CudaSlice<f32>,
}

impl DeviceAdamW {
    /// Copies `host`'s moments to the device.
    pub fn upload(dev: &CudaKernels, host: &AdamW) -> Result<Self> {
        host.validate()?;
        let stream = dev.stream();
        let map = |e| Error::Loss(dev.cuda_error("uploading the AdamW moments", e));
        let m = stream.clone_htod(&host.m).map_err(map)?;
        let v = stream.clone_htod(&host.v).map_err(map)?;
        let mut config = host.clone();
        config.m = Vec::new();
        config.v = Vec::new();
        Ok(DeviceAdamW { config, m, v })
    }

    /// The state as a host [`AdamW`] (waits for the stream).
    pub fn download(&self, dev: &CudaKernels) -> Result<AdamW> {
        let stream = dev.stream();
        let map = |e| Error::Loss(dev.cuda_error("reading the AdamW moments", e));
        let mut host = self.config.clone();
        host.m = stream.clone_dtoh(&self.m).map_err(map)?;
        host.v = stream.clone_dtoh(&self.v).map_err(map)?;
        Ok(host)
    }

    /// One update with learning rate `lr`, as [`AdamW::update`]; with `clip`, every gradient is
    /// first multiplied by the clipping factor [`GradClip::enqueue`] computed, and nothing is
    /// written when the norm was not finite. One launch per run of the decay mask; nothing is
    /// allocated and nothing synchronizes.
    pub fn update(
        &mut self,
        dev: &CudaKernels,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        decay: &DecayMask,
        lr: f32,
        clip: Option<&GradClip>,
    ) -> Result<()> {
        self.update_with_copy(dev, params, None, grads, decay, lr, clip)
    }

    /// [`DeviceAdamW::update`] that also writes the updated parameters rounded to bf16 into
    /// `bf16_copy` (the working copy a mixed-precision model reads), in the same pass.
    #[allow(clippy::too_many_arguments)]
    pub fn update_with_copy(
        &mut self,
        dev: &CudaKernels,
        params: &mut CudaSlice<f32>,
        bf16_copy: Option<&mut CudaSlice<half::bf16>>,
        grads: &CudaSlice<f32>,
        decay: &DecayMask,
        lr: f32,
        clip: Option<&GradClip>,
    ) -> Result<()> {
        let n = self.m.len();
        if let Some(c) = &bf16_copy {
            if c.len() != n {
                return Err(crate::Error::ShapeMismatch {
                    tensor: "bf16_copy",
                    expected: n,
                    actual: c.len(),
                    shape: format!("[{n}]"),
                }
                .into());
            }
        }
        let lengths = [
            ("params", params.len()),
            ("grads", grads.len()),
            ("adam_v", self.v.len()),
            ("decay_mask", decay.len()),
        ];
        self.config.check_update(n, &lengths, lr)?;
        if let Some(c) = clip {
            if c.len != n || !c.enqueued {
                return Err(Error::InvalidOption {
                    name: "clip",
                    value: format!("{} elements", c.len),
                    reason: "must be enqueued on this gradient before the update",
                });
            }
        }
        let s = self.config.scalars(lr, self.config.step + 1);
        let stream = dev.stream();
        let (p, _p) = params.device_ptr_mut(stream);
        let (g, _g) = grads.device_ptr(stream);
        let (m, _m) = self.m.device_ptr_mut(stream);
        let (v, _v) = self.v.device_ptr_mut(stream);
        let clip_ptr = clip.map(|c| c.result.device_ptr(stream));
        let mut bf16_copy = bf16_copy;
        let copy_ptr = bf16_copy.as_mut().map(|c| c.device_ptr_mut(stream));
        let c = self.config.clone();
        for (range, decays) in decay.runs() {
            let params = DkAdamWParams {
                params: p as *mut f32,
                grads: g as *const f32,
                m: m as *mut f32,
                v: v as *mut f32,
                clip: clip_ptr
                    .as_ref()
                    .map_or(std::ptr::null(), |(r, _)| *r as *const DkClipResult),
                bf16_copy: copy_ptr
                    .as_ref()
                    .map_or(std::ptr::null_mut(), |(c, _)| *c as *mut std::ffi::c_void),
                begin: range.start as i64,
                end: range.end as i64,
                beta1: c.beta1,
                beta2: c.beta2,
                one_minus_beta1: 1.0 - c.beta1,
                one_minus_beta2: 1.0 - c.beta2,
                eps: c.eps,
                step_size: s.step_size,
                bc2_sqrt: s.bc2_sqrt,
                shrink: if decays { s.shrink } else { 1.0 },
            };
            let blocks = range.len().div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            dev.launch("dk_adamw_f32", cfg, &params)?;
        }
        self.config.step += 1;
        Ok(())
    }
}
