//! [`DistillDevice`] for the CUDA device: host slices are uploaded, the device-buffer API runs, and the
//! gradients come back. Convenient for tests, the CLI and validation; trainers should keep their
//! tensors on the device and call the `*_device` methods.

use super::ops::{DeviceHidden, DeviceInputs, Student};
use super::tensor::{DeviceLabels, DeviceTensor, DeviceVec};
use super::topk::{DeviceTopK, DeviceTopKInputs};
use super::CudaKernels;
use crate::device::{check_same_dtype, DistillDevice};
use crate::dtype::{Dtype, HostSlice, HostSliceMut};
use crate::error::Result;
use crate::semantics::{
    check_inputs, check_topk_inputs, DistillInputs, GradOutputs, LossConfig, LossValue, TopKInputs,
};

impl CudaKernels {
    fn upload(&self, data: HostSlice) -> Result<DeviceVec> {
        DeviceVec::upload(&self.stream, data).map_err(|e| self.cuda_error("upload", e))
    }

    /// An output buffer, not zeroed: the kernels write every element (gradients: zeros on ignored
    /// rows), and the emulator fills fresh memory with NaN, so an element a kernel forgets shows up.
    fn output(&self, dtype: Dtype, len: usize) -> Result<DeviceVec> {
        DeviceVec::uninit(&self.stream, dtype, len).map_err(|e| self.cuda_error("allocation", e))
    }

    fn download(&self, src: &DeviceVec, dst: HostSliceMut) -> Result<()> {
        let r = match (src, dst) {
            (DeviceVec::F32(s), HostSliceMut::F32(d)) => self.stream.memcpy_dtoh(s, d),
            (DeviceVec::F16(s), HostSliceMut::F16(d)) => self.stream.memcpy_dtoh(s, d),
            (DeviceVec::Bf16(s), HostSliceMut::Bf16(d)) => self.stream.memcpy_dtoh(s, d),
            _ => unreachable!("download buffers are allocated with the destination's dtype"),
        };
        r.map_err(|e| self.cuda_error("download", e))?;
        self.stream
            .synchronize()
            .map_err(|e| self.cuda_error("synchronize", e))
    }
}

impl DistillDevice for CudaKernels {
    fn name(&self) -> &'static str {
        if self.emulated {
            "emulated"
        } else {
            "cuda"
        }
    }

    fn distill_loss(
        &self,
        cfg: &LossConfig,
        inputs: &DistillInputs,
        grads: GradOutputs,
    ) -> Result<LossValue> {
        // Host inputs are checked here, labels included, so the device sees only valid calls.
        check_inputs(cfg, inputs, &grads)?;
        let s = self.upload(inputs.student)?;
        let t = self.upload(inputs.teacher)?;
        let labels = match inputs.labels {
            Some(l) => Some(
                self.stream
                    .clone_htod(l)
                    .map_err(|e| self.cuda_error("upload", e))?,
            ),
            None => None,
        };
        let GradOutputs {
            logits: g_logits,
            hidden: g_hidden,
        } = grads;
        // Accumulating adds to the caller's gradient, so the device starts from its values.
        let mut g = match &g_logits {
            Some(g) if cfg.accumulate => Some(self.upload(g.as_slice())?),
            Some(g) => Some(self.output(g.dtype(), g.len())?),
            None => None,
        };
        let hidden_bufs = match &inputs.hidden {
            Some(h) => Some((h.size, self.upload(h.student)?, self.upload(h.teacher)?)),
            None => None,
        };
        let mut hg = match &g_hidden {
            Some(g) => Some(self.output(g.dtype(), g.len())?),
            None => None,
        };
        let value = self.distill_loss_device(
            cfg,
            DeviceInputs {
                strides: Default::default(),
                rows: inputs.rows,
                vocab: inputs.vocab,
                student: Student::Logits {
                    logits: &s,
                    grad: g.as_mut().map(|g| g as _),
                },
                teacher: &t,
                labels: labels.as_ref().map(|l| l as &dyn DeviceLabels),
                hidden: hidden_bufs.as_ref().map(|(size, hs, ht)| DeviceHidden {
                    size: *size,
                    student: hs as &dyn DeviceTensor,
                    teacher: ht as &dyn DeviceTensor,
                    grad: hg.as_mut().map(|g| g as _),
                }),
            },
        )?;
        if let (Some(src), Some(dst)) = (&g, g_logits) {
            self.download(src, dst)?;
        }
        if let (Some(src), Some(dst)) = (&hg, g_hidden) {
            self.download(src, dst)?;
        }
        Ok(value)
    }

    fn distill_loss_topk(
        &self,
        cfg: &LossConfig,
        inputs: &TopKInputs,
        grad: Option<HostSliceMut>,
    ) -> Result<LossValue> {
        // Checked on the host (ids included), so the device sees only valid calls.
        check_topk_inputs(cfg, inputs, grad.as_ref())?;
        let s = self.upload(inputs.student)?;
        let t = &inputs.teacher;
        let map = |e| self.cuda_error("upload", e);
        let ids = self.stream.clone_htod(t.ids).map_err(map)?;
        let values = self.upload(t.values)?;
        let tail = self.stream.clone_htod(t.tail).map_err(map)?;
        let labels = match inputs.labels {
            Some(l) => Some(self.stream.clone_htod(l).map_err(map)?),
            None => None,
        };
        let mut g = match &grad {
            Some(g) if cfg.accumulate => Some(self.upload(g.as_slice())?),
            Some(g) => Some(self.output(g.dtype(), g.len())?),
            None => None,
        };
        let value = self.distill_loss_topk_device(
            cfg,
            DeviceTopKInputs {
                rows: inputs.rows,
                vocab: inputs.vocab,
                student: Student::Logits {
                    logits: &s,
                    grad: g.as_mut().map(|g| g as _),
                },
                teacher: DeviceTopK {
                    k: t.k,
                    ids: ids.as_view(),
                    values: &values,
                    tail: tail.as_view(),
                },
                labels: labels.as_ref().map(|l| l as &dyn DeviceLabels),
                strides: Default::default(),
            },
        )?;
        if let (Some(src), Some(dst)) = (&g, grad) {
            self.download(src, dst)?;
        }
        Ok(value)
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
        check_same_dtype("output", input, &output)?;
        crate::semantics::check_softmax(
            rows,
            vocab,
            temperature,
            &[("input", input.len()), ("output", output.len())],
        )?;
        let x = self.upload(input)?;
        let mut y = self.output(output.dtype(), output.len())?;
        self.softmax_device(&x, &mut y, rows, vocab, temperature, log)?;
        self.download(&y, output)
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
        let y = self.upload(output)?;
        let dy = self.upload(grad_output)?;
        let mut dx = self.output(grad_input.dtype(), grad_input.len())?;
        self.softmax_backward_device(&y, &dy, &mut dx, rows, vocab, temperature, log)?;
        self.download(&dx, grad_input)
    }
}
