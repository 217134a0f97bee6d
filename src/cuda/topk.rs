//! The loss against a top-k teacher on device buffers: `dk_prepare` -> `dk_topk_check` ->
//! `dk_topk_<kind>_*` -> (`dk_reduce`) into a [`LossWorkspace`], like the dense loss. A bad id or
//! label is found on the device, makes every kernel write nothing, and is returned by
//! [`CudaKernels::read_loss`].

use cudarc::driver::{CudaView, DevicePtr, DevicePtrMut, SyncOnDrop};

use super::ops::{
    check_call, check_len, label_pointer, row_grid, student_pointers, threads_for, Enqueued,
    Student,
};
use super::tensor::{DeviceLabels, DeviceTensor};
use super::{CudaKernels, LossWorkspace, RowStrides};
use crate::abi::{DkScalars, DkTopKCheckParams, DkTopKParams};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::semantics::{check_top_k, check_topk_config, LossConfig, LossKind, LossValue};

/// A top-k teacher on the device (see [`crate::TopKTeacher`] for the meaning of each part).
pub struct DeviceTopK<'a> {
    /// Entries per row.
    pub k: usize,
    /// `[rows, k]` token ids, in `[0, vocab)` and distinct within a row (checked on the device).
    pub ids: CudaView<'a, u32>,
    /// `[rows, k]` bucket logits at T = 1, f32, f16 or bf16.
    pub values: &'a dyn DeviceTensor,
    /// `[rows]` the tail bucket's logit at T = 1.
    pub tail: CudaView<'a, f32>,
}

/// One top-k loss evaluation on device buffers.
pub struct DeviceTopKInputs<'a> {
    /// Rows (tokens) in the batch.
    pub rows: usize,
    /// Vocabulary size of the student logits.
    pub vocab: usize,
    /// The student logits, and where their gradient goes.
    pub student: Student<'a>,
    /// The teacher's top-k entries.
    pub teacher: DeviceTopK<'a>,
    /// `[rows]` labels, `i64` or `i32`; required when `alpha < 1`.
    pub labels: Option<&'a dyn DeviceLabels>,
    /// Row strides of the student logits and a separate gradient (the teacher's are `k`).
    pub strides: RowStrides,
}

fn dtype_code(d: Dtype) -> i32 {
    match d {
        Dtype::F32 => crate::abi::DK_DTYPE_F32 as i32,
        Dtype::F16 => crate::abi::DK_DTYPE_F16 as i32,
        Dtype::Bf16 => crate::abi::DK_DTYPE_BF16 as i32,
    }
}

impl CudaKernels {
    /// The loss against a top-k teacher on device buffers; see
    /// [`CudaKernels::distill_loss_topk_enqueue`]. Allocates a workspace and synchronizes once.
    pub fn distill_loss_topk_device(
        &self,
        cfg: &LossConfig,
        inputs: DeviceTopKInputs,
    ) -> Result<LossValue> {
        let mut ws = self.workspace(inputs.rows.max(1))?;
        self.distill_loss_topk_enqueue(cfg, inputs, &mut ws)?;
        self.read_loss(&ws)
    }

    /// Enqueues the loss against a top-k teacher into `ws` without allocating or synchronizing.
    /// Shapes and options are checked at once; ids and labels on the device (a bad one makes
    /// every kernel write nothing and is returned by [`CudaKernels::read_loss`]).
    pub fn distill_loss_topk_enqueue(
        &self,
        cfg: &LossConfig,
        inputs: DeviceTopKInputs,
        ws: &mut LossWorkspace,
    ) -> Result<()> {
        check_topk_config(cfg)?;
        let DeviceTopKInputs {
            rows,
            vocab,
            student,
            teacher,
            labels,
            strides,
        } = inputs;
        check_call(rows, vocab, ws)?;
        check_top_k(teacher.k, vocab)?;
        let k = teacher.k;
        let kshape = || format!("[{rows}, {k}]");
        check_len("teacher_topk_ids", teacher.ids.len(), rows * k, kshape())?;
        check_len(
            "teacher_topk_values",
            teacher.values.len(),
            rows * k,
            kshape(),
        )?;
        check_len(
            "teacher_tail",
            teacher.tail.len(),
            rows,
            format!("[{rows}]"),
        )?;
        let stream = &*self.stream;
        let mut guards: Vec<SyncOnDrop> = Vec::new();
        let (s_ptr, s_stride, s_dtype, g_ptr, g_stride, g_dtype) = student_pointers(
            stream,
            student,
            rows,
            vocab,
            strides,
            cfg.accumulate,
            &mut guards,
        )?;
        let (l_ptr, l_i32) = label_pointer(stream, cfg, labels, rows, &mut guards)?;
        let (ids_ptr, g) = teacher.ids.device_ptr(stream);
        guards.push(g);
        let (v_ptr, g) = teacher.values.read_ptr(stream);
        guards.push(g);
        let (tail_ptr, g) = teacher.tail.device_ptr(stream);
        guards.push(g);

        // int32 labels are widened into the workspace by dk_prepare, as in the dense loss.
        let (widened, _gl) = if l_i32 {
            let (p, g) = ws.labels.device_ptr_mut(stream);
            (p, Some(g))
        } else {
            (0, None)
        };
        let row_labels = if l_i32 { widened } else { l_ptr };
        let (sc_ptr, _g1) = ws.scalars.device_ptr(stream);
        let (rl_ptr, _g2) = ws.row_loss.device_ptr_mut(stream);
        self.enqueue_prepare(cfg, (l_ptr, l_i32, widened), sc_ptr, rows, vocab)?;
        self.launch(
            "dk_topk_check",
            row_grid(rows, threads_for(2 * k))?,
            &DkTopKCheckParams {
                ids: ids_ptr as *const u32,
                scalars: sc_ptr as *mut DkScalars,
                rows: rows as i64,
                vocab: vocab as i64,
                k: k as i32,
            },
        )?;
        let kind = match cfg.kind {
            LossKind::ForwardKl => "fkl",
            _ => "rkl",
        };
        self.launch(
            &format!("dk_topk_{kind}_{s_dtype}_{g_dtype}"),
            row_grid(rows, threads_for(vocab))?,
            &DkTopKParams {
                student: s_ptr as *const _,
                ids: ids_ptr as *const u32,
                values: v_ptr as *const _,
                tail: tail_ptr as *const f32,
                labels: row_labels as *const i64,
                grad: g_ptr as *mut _,
                row_loss: rl_ptr as *mut f32,
                scalars: sc_ptr as *const DkScalars,
                rows: rows as i64,
                vocab: vocab as i64,
                student_stride: s_stride as i64,
                grad_stride: g_stride as i64,
                ignore_index: cfg.ignore_index,
                k: k as i32,
                values_dtype: dtype_code(teacher.values.dtype()),
                inv_temperature: 1.0 / cfg.temperature,
                soft_weight: cfg.soft_weight(),
                hard_weight: cfg.hard_weight(),
                accumulate: cfg.accumulate as i32,
            },
        )?;
        self.enqueue_reduce(cfg, &mut ws.loss, rl_ptr, sc_ptr, rows)?;
        drop(guards);
        ws.last = Some(Enqueued::of(cfg, rows, vocab));
        Ok(())
    }
}
