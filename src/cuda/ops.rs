//! The launch sequences of the device-buffer API: what a trainer whose tensors already live on the
//! GPU calls. One call = dk_prepare -> dk_kd_* -> (dk_hidden_mse_*) -> (dk_reduce) on the device's
//! stream into a [`LossWorkspace`]; reading the loss and the label check back is the one
//! synchronization, and a trainer that keeps the loss on the device skips it.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg, SyncOnDrop};

use super::row_schedule::{fused_threads, RowPlan, RowSchedule, RowShape, SPLIT_MAX_BLOCKS};
use super::tensor::{DeviceLabels, DeviceTensor, DeviceTensorMut};
use super::CudaKernels;
use crate::abi::{
    DkHiddenParams, DkKdParams, DkPrepareParams, DkReduceParams, DkScalars, DkSoftmaxBwdParams,
    DkSoftmaxParams, DK_KD_PARTIAL_FLOATS, DK_KD_PHASE_APPLY, DK_KD_PHASE_CLUSTER,
    DK_KD_PHASE_FINISH, DK_KD_PHASE_FUSED, DK_KD_PHASE_JSD_GRAD, DK_KD_PHASE_STATS,
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

/// Row strides of the logits, in elements between the starts of consecutive rows (a
/// `logits[:, :-1]`-style view of a longer row has stride > vocab). `None` is contiguous
/// (`vocab`). An in-place gradient has the student's stride.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowStrides {
    /// Stride of the student logits.
    pub student: Option<usize>,
    /// Stride of the teacher logits.
    pub teacher: Option<usize>,
    /// Stride of a separate gradient buffer.
    pub grad: Option<usize>,
}

/// One loss evaluation on device buffers, row-major `[rows, vocab]` (with [`RowStrides`]).
pub struct DeviceInputs<'a> {
    /// Rows (tokens) in the batch.
    pub rows: usize,
    /// Vocabulary size: elements per row that take part.
    pub vocab: usize,
    /// The student logits, and where their gradient goes.
    pub student: Student<'a>,
    /// The teacher logits (any of the three dtypes).
    pub teacher: &'a dyn DeviceTensor,
    /// `[rows]` labels, `i64` or `i32`; required when `alpha < 1`.
    pub labels: Option<&'a dyn DeviceLabels>,
    /// Hidden states for the MSE term.
    pub hidden: Option<DeviceHidden<'a>>,
    /// Row strides of the logits (default: contiguous).
    pub strides: RowStrides,
}

/// The device memory one loss call needs besides its inputs and outputs, allocated once with
/// [`CudaKernels::workspace`] for up to `rows` rows, so that
/// [`CudaKernels::distill_loss_enqueue`] allocates nothing and does not synchronize (it can be
/// captured in a CUDA graph, with cudarc's event tracking off as cudarc's graphs require).
/// After a call, [`LossWorkspace::loss`] is the loss on the device and
/// [`CudaKernels::read_loss`] copies it to the host with the label check.
pub struct LossWorkspace {
    capacity: usize,
    pub(super) scalars: CudaSlice<DkScalars>,
    pub(super) row_loss: CudaSlice<f32>,
    pub(super) loss: CudaSlice<f32>,
    pub(super) labels: CudaSlice<i64>,
    /// A split row's per-block results (`DK_KD_PARTIAL_FLOATS` floats per block).
    pub(super) partials: CudaSlice<f32>,
    pub(super) last: Option<Enqueued>,
}

/// What the last call into a workspace was, for reading its result.
#[derive(Clone, Copy)]
pub(super) struct Enqueued {
    rows: usize,
    vocab: usize,
    reduction: Reduction,
    ignore_index: i64,
}

impl Enqueued {
    pub(super) fn of(cfg: &LossConfig, rows: usize, vocab: usize) -> Self {
        Enqueued {
            rows,
            vocab,
            reduction: cfg.reduction,
            ignore_index: cfg.ignore_index,
        }
    }
}

/// The checks every enqueued loss call starts with: rows and vocabulary nonzero, their product
/// representable, the workspace large enough.
pub(super) fn check_call(rows: usize, vocab: usize, ws: &LossWorkspace) -> Result<()> {
    if rows == 0 {
        return Err(Error::Empty("rows = 0"));
    }
    if vocab == 0 {
        return Err(Error::Empty("vocab = 0"));
    }
    rows.checked_mul(vocab)
        .ok_or(Error::Empty("rows * vocab overflows"))?;
    if rows > ws.capacity {
        return Err(Error::InvalidOption {
            name: "workspace",
            value: format!("{} rows", ws.capacity),
            reason: "holds fewer rows than the call has",
        });
    }
    Ok(())
}

/// The labels' pointer and whether they are int32, checked against `rows`; `(0, false)`
/// without labels, which is an error when the hard loss needs them.
pub(super) fn label_pointer<'g, 'l: 'g>(
    stream: &'g cudarc::driver::CudaStream,
    cfg: &LossConfig,
    labels: Option<&'l dyn DeviceLabels>,
    rows: usize,
    guards: &mut Vec<SyncOnDrop<'g>>,
) -> Result<(u64, bool)> {
    Ok(match labels {
        Some(l) => {
            check_len("labels", l.len(), rows, format!("[{rows}]"))?;
            let (p, g) = l.read_ptr(stream);
            guards.push(g);
            (p, l.is_i32())
        }
        None if cfg.needs_labels() => return Err(Error::MissingLabels { alpha: cfg.alpha }),
        None => (0, false),
    })
}

impl std::fmt::Debug for LossWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossWorkspace")
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl LossWorkspace {
    /// The most rows a call may have.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The loss of the last enqueued call, on the device: one f32 for `Sum`/`Mean`, `rows` for
    /// `Reduction::None`. Valid once the work before it on the stream has run; 0 (and nothing
    /// written) when a label was out of range. `None` before the first call.
    pub fn loss(&self) -> Option<CudaView<'_, f32>> {
        let e = self.last?;
        Some(match e.reduction {
            Reduction::None => self.row_loss.slice(..e.rows),
            Reduction::Sum | Reduction::Mean => self.loss.slice(..1),
        })
    }
}

/// Threads per block for a row of `n` elements: about 8 elements per thread, a whole number of
/// warps (the reductions assume full warps), at most 1024.
pub(crate) fn threads_for(n: usize) -> u32 {
    (n.div_ceil(8).next_multiple_of(32)).clamp(32, 1024) as u32
}

/// A one-dimensional grid of `rows` blocks (one block per row, or any grid-stride count).
pub(crate) fn row_grid(rows: usize, threads: u32) -> Result<LaunchConfig> {
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

pub(super) fn one_block(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: ((n.next_multiple_of(32)).clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn check_len(
    tensor: &'static str,
    actual: usize,
    expected: usize,
    shape: String,
) -> Result<()> {
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

/// A `[rows, vocab]` tensor with row stride `stride` (`None`: contiguous, exact length).
pub(crate) fn check_rows(
    tensor: &'static str,
    len: usize,
    rows: usize,
    vocab: usize,
    stride: Option<usize>,
) -> Result<usize> {
    let shape = format!("[{rows}, {vocab}]");
    let Some(stride) = stride else {
        check_len(tensor, len, rows * vocab, shape)?;
        return Ok(vocab);
    };
    if stride < vocab {
        return Err(Error::Stride {
            tensor,
            stride,
            vocab,
        });
    }
    let needed = (rows - 1)
        .checked_mul(stride)
        .and_then(|n| n.checked_add(vocab))
        .ok_or(Error::Empty("rows * stride overflows"))?;
    if len < needed {
        return Err(Error::ShapeMismatch {
            tensor,
            expected: needed,
            actual: len,
            shape: format!("{shape} with row stride {stride}"),
        });
    }
    Ok(stride)
}

/// The student's pointer, row stride and dtype, and the gradient's (the same buffer in place; a
/// null pointer for a loss without gradient), checked against `[rows, vocab]` and `strides`.
#[allow(clippy::type_complexity)]
pub(super) fn student_pointers<'g, 's: 'g, 'b: 'g>(
    stream: &'s cudarc::driver::CudaStream,
    student: Student<'b>,
    rows: usize,
    vocab: usize,
    strides: RowStrides,
    accumulate: bool,
    guards: &mut Vec<SyncOnDrop<'g>>,
) -> Result<(u64, usize, Dtype, u64, usize, Dtype)> {
    if accumulate && matches!(student, Student::InPlace(_)) {
        return Err(Error::Gradient(
            "accumulate = true cannot go with an in-place gradient (it would add to the logits)"
                .into(),
        ));
    }
    Ok(match student {
        Student::Logits { logits, grad } => {
            let ss = check_rows("student_logits", logits.len(), rows, vocab, strides.student)?;
            let (sp, sg) = logits.read_ptr(stream);
            guards.push(sg);
            match grad {
                Some(g) => {
                    let gs = check_rows("grad_student_logits", g.len(), rows, vocab, strides.grad)?;
                    check_grad_dtype("logits", g.dtype(), logits.dtype())?;
                    let dt = g.dtype();
                    let (gp, gg) = g.write_ptr(stream);
                    guards.push(gg);
                    (sp, ss, logits.dtype(), gp, gs, dt)
                }
                None => (sp, ss, logits.dtype(), 0, vocab, Dtype::F32),
            }
        }
        Student::InPlace(buf) => {
            if strides.grad.is_some() && strides.grad != strides.student {
                return Err(Error::Gradient(
                    "an in-place gradient has the student's row stride; leave strides.grad unset"
                        .into(),
                ));
            }
            let ss = check_rows("student_logits", buf.len(), rows, vocab, strides.student)?;
            let dt = buf.dtype();
            let (p, g) = buf.write_ptr(stream);
            guards.push(g);
            (p, ss, dt, p, ss, dt)
        }
    })
}

fn check_grad_dtype(what: &str, grad: Dtype, input: Dtype) -> Result<()> {
    if grad != Dtype::F32 && grad != input {
        return Err(Error::Gradient(format!(
            "{what} gradient dtype {grad} must be f32 or the input's dtype {input}"
        )));
    }
    Ok(())
}

/// Whether every row starts at the same offset modulo 16 bytes in each of the buffers (device
/// address, row stride in elements of `size` bytes; a null address is absent).
fn rows_aligned_alike(size: usize, rows: &[(u64, usize)]) -> bool {
    let present = || rows.iter().filter(|(p, _)| *p != 0);
    let same = |f: &dyn Fn(&(u64, usize)) -> u64| {
        let mut v = present().map(f);
        let first = v.next();
        v.all(|x| Some(x) == first)
    };
    same(&|(p, _)| p % 16) && same(&|(_, stride)| (stride * size) as u64 % 16)
}

fn kind_code(kind: LossKind) -> &'static str {
    match kind {
        LossKind::ForwardKl => "fkl",
        LossKind::ReverseKl => "rkl",
        LossKind::Jsd { .. } => "jsd",
    }
}

impl CudaKernels {
    pub(crate) fn launch<P: cudarc::driver::DeviceRepr>(
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

    /// Launches kernel `name` in thread-block clusters of `cluster` blocks, with
    /// `cfg.shared_mem_bytes` of dynamic shared memory per block (raised past the default 48 KiB).
    pub(crate) fn launch_in_clusters<P: cudarc::driver::DeviceRepr>(
        &self,
        name: &str,
        cfg: LaunchConfig,
        cluster: u32,
        smem_limit: usize,
        params: &P,
    ) -> Result<()> {
        let f = self.function(name)?;
        // The limit is the function's, shared by every thread launching it: always the largest
        // any launch may ask for (`RowShape::max_block_smem`), so that no caller lowers it under
        // another's launch.
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem_limit as i32,
        )
        .map_err(|e| self.cuda_error(name, e))?;
        let mut args = [params as *const P as *mut std::ffi::c_void];
        // SAFETY: as in `launch`: one parameter struct by value, declared in kernels/abi.h, its
        // pointers checked against the shapes it describes and kept alive by the caller's guards.
        unsafe { super::launch_cluster(&self.stream, &f, cfg, cluster, &mut args) }
            .map_err(|e| self.cuda_error(name, e))
    }

    /// The fused distillation loss on device buffers (DESIGN section 4). Writes the gradients
    /// asked for and returns the reduced loss (one value, or one per row for `Reduction::None`).
    /// A label outside `[0, V)` is found on the device and returned as an error; in that case
    /// no output (including an in-place gradient) is written. Allocates a workspace and
    /// synchronizes once; see [`CudaKernels::distill_loss_enqueue`] for neither.
    pub fn distill_loss_device(&self, cfg: &LossConfig, inputs: DeviceInputs) -> Result<LossValue> {
        let mut ws = self.workspace(inputs.rows.max(1))?;
        self.distill_loss_enqueue(cfg, inputs, &mut ws)?;
        self.read_loss(&ws)
    }

    /// Device memory for calls of up to `rows` rows (see [`LossWorkspace`]).
    pub fn workspace(&self, rows: usize) -> Result<LossWorkspace> {
        if rows == 0 {
            return Err(Error::Empty("a workspace for 0 rows"));
        }
        let map = |e| self.cuda_error("workspace allocation", e);
        // Not zeroed: dk_prepare writes the scalars (and widened labels), every row kernel its
        // row's loss, dk_reduce the loss, before anything reads them (the emulator's initcheck
        // holds the kernels to it).
        // SAFETY: plain-old-data types, read back only after the kernels wrote them.
        unsafe {
            Ok(LossWorkspace {
                capacity: rows,
                scalars: self.stream.alloc::<DkScalars>(1).map_err(map)?,
                row_loss: self.stream.alloc::<f32>(rows).map_err(map)?,
                loss: self.stream.alloc::<f32>(1).map_err(map)?,
                labels: self.stream.alloc::<i64>(rows).map_err(map)?,
                partials: self
                    .stream
                    .alloc::<f32>(SPLIT_MAX_BLOCKS * DK_KD_PARTIAL_FLOATS as usize)
                    .map_err(map)?,
                last: None,
            })
        }
    }

    /// Enqueues the fused loss on the device's stream into `ws`, without allocating or
    /// synchronizing: the loss stays on the device ([`LossWorkspace::loss`]) and the gradients
    /// are written in stream order. Argument errors are returned at once; a label out of range
    /// is found on the device, makes every kernel write nothing, and is returned by
    /// [`CudaKernels::read_loss`].
    pub fn distill_loss_enqueue(
        &self,
        cfg: &LossConfig,
        inputs: DeviceInputs,
        ws: &mut LossWorkspace,
    ) -> Result<()> {
        cfg.validate()?;
        let DeviceInputs {
            rows,
            vocab,
            student,
            teacher,
            labels,
            hidden,
            strides,
        } = inputs;
        check_call(rows, vocab, ws)?;
        if vocab > i32::MAX as usize {
            return Err(Error::InvalidOption {
                name: "vocab",
                value: vocab.to_string(),
                reason: "the fused loss kernels index a row with 32-bit offsets (at most 2^31 - 1)",
            });
        }
        let stream = &*self.stream;
        let mut guards: Vec<SyncOnDrop> = Vec::new();

        // Student pointer and stride, gradient pointer (maybe the same) and stride, dtypes.
        let (s_ptr, s_stride, s_dtype, g_ptr, g_stride, g_dtype) = student_pointers(
            stream,
            student,
            rows,
            vocab,
            strides,
            cfg.accumulate,
            &mut guards,
        )?;
        let t_stride = check_rows(
            "teacher_logits",
            teacher.len(),
            rows,
            vocab,
            strides.teacher,
        )?;
        let (t_ptr, tg) = teacher.read_ptr(stream);
        guards.push(tg);
        let (l_ptr, l_i32) = label_pointer(stream, cfg, labels, rows, &mut guards)?;
        let hidden = match hidden {
            Some(h) => {
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
                if let Some(grad) = &hg {
                    check_len("grad_student_hidden", grad.len(), m, hshape())?;
                    check_grad_dtype("hidden", grad.dtype(), hs.dtype())?;
                }
                Some((size, hs, ht, hg))
            }
            None => None,
        };

        // int32 labels are widened into the workspace by dk_prepare; the row kernels read those.
        // The workspace buffer is touched (and its write event recorded) only when it is used.
        let (widened, _gl) = if l_i32 {
            let (p, g) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut ws.labels, stream);
            (p, Some(g))
        } else {
            (0, None)
        };
        let row_labels = if l_i32 { widened } else { l_ptr };
        let (sc_ptr, _g1) = ws.scalars.device_ptr(stream);
        let (rl_ptr, _g2) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut ws.row_loss, stream);

        self.enqueue_prepare(cfg, (l_ptr, l_i32, widened), sc_ptr, rows, vocab)?;

        let kd = format!(
            "dk_kd_{}_{}_{}_{}",
            kind_code(cfg.kind),
            s_dtype,
            teacher.dtype(),
            g_dtype
        );
        let attribute = |a, what| self.ctx.attribute(a).map_err(|e| self.cuda_error(what, e));
        use cudarc::driver::sys::CUdevice_attribute as A;
        let sms = attribute(
            A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "the multiprocessor count",
        )?;
        let cc_major = attribute(
            A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            "the compute capability",
        )?;
        // The row-on-chip kernels: one dtype for all, and rows whose student, teacher and
        // gradient sit at one alignment (their vector chunks start at the same element).
        let one_dtype = (s_dtype == teacher.dtype()
            && (g_ptr == 0 || g_dtype == s_dtype)
            && rows_aligned_alike(
                s_dtype.size_bytes(),
                &[(s_ptr, s_stride), (t_ptr, t_stride), (g_ptr, g_stride)],
            ))
        .then_some(s_dtype);
        let smem_optin = attribute(
            A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "the shared memory per block",
        )?;
        let shape = RowShape {
            rows,
            vocab,
            sms: sms.max(1) as usize,
            cc_major,
            one_dtype,
            // (kernels/kd_loss.cu keeps the mixture when the call has a soft loss: `kKeepMix`.)
            jsd_grad: g_ptr != 0
                && matches!(cfg.kind, LossKind::Jsd { .. })
                && cfg.soft_weight() != 0.0,
            smem_optin: smem_optin.max(0) as usize,
        };
        let plan = self.row_schedule().plan(&shape)?;
        self.note_row_layout(match plan {
            RowPlan::Fused => RowSchedule::Fused,
            RowPlan::Split(n) => RowSchedule::Split(n),
            RowPlan::Cluster { blocks, .. } => RowSchedule::Cluster(blocks),
        });
        let (split, stash_elems) = match plan {
            RowPlan::Fused => (1, 0),
            RowPlan::Split(n) => (n, 0),
            RowPlan::Cluster {
                blocks,
                stash_elems,
                ..
            } => (blocks, stash_elems),
        };
        let (partials, _gp) = if matches!(plan, RowPlan::Split(_)) {
            let (p, g) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut ws.partials, stream);
            (p, Some(g))
        } else {
            (0, None)
        };
        let params = |phase: u32| DkKdParams {
            student: s_ptr as *const _,
            teacher: t_ptr as *const _,
            labels: row_labels as *const i64,
            grad: g_ptr as *mut _,
            row_loss: rl_ptr as *mut f32,
            scalars: sc_ptr as *const DkScalars,
            rows: rows as i64,
            vocab: vocab as i64,
            student_stride: s_stride as i64,
            teacher_stride: t_stride as i64,
            grad_stride: g_stride as i64,
            ignore_index: cfg.ignore_index,
            inv_temperature: 1.0 / cfg.temperature,
            temperature: cfg.temperature,
            soft_weight: cfg.soft_weight(),
            hard_weight: cfg.hard_weight(),
            beta: cfg.kind.beta(),
            kind: cfg.kind.code(),
            accumulate: cfg.accumulate as i32,
            partials: partials as *mut f32,
            split: split as i32,
            phase: phase as i32,
            stash_elems: stash_elems as i32,
        };
        if let RowPlan::Cluster {
            blocks,
            threads,
            smem,
            ..
        } = plan
        {
            let name = format!(
                "dk_kdc_{}_{s_dtype}_{s_dtype}_{s_dtype}",
                kind_code(cfg.kind)
            );
            let mut grid = row_grid(rows * blocks, threads)?;
            grid.shared_mem_bytes = smem as u32;
            self.launch_in_clusters(
                &name,
                grid,
                blocks as u32,
                shape.max_block_smem(),
                &params(DK_KD_PHASE_CLUSTER),
            )?;
        } else if split == 1 {
            let threads = fused_threads(rows, vocab, sms.max(1) as usize);
            self.launch(&kd, row_grid(rows, threads)?, &params(DK_KD_PHASE_FUSED))?;
        } else {
            // Few long rows: each row's passes spread over `split` blocks, one launch per pass
            // (kernels/abi.h). Reverse KL without a gradient has nothing to apply.
            let slice = vocab.div_ceil(split);
            let parts = row_grid(rows * split, threads_for(slice))?;
            self.launch(&kd, parts, &params(DK_KD_PHASE_STATS))?;
            if g_ptr != 0 || !matches!(cfg.kind, LossKind::ReverseKl) {
                self.launch(&kd, parts, &params(DK_KD_PHASE_APPLY))?;
            }
            if g_ptr != 0 && matches!(cfg.kind, LossKind::Jsd { .. }) {
                self.launch(&kd, parts, &params(DK_KD_PHASE_JSD_GRAD))?;
            }
            self.launch(&kd, row_grid(rows, 32)?, &params(DK_KD_PHASE_FINISH))?;
        }

        if let Some((size, hs, ht, hg)) = hidden {
            let (hs_ptr, g) = hs.read_ptr(stream);
            guards.push(g);
            let (ht_ptr, g) = ht.read_ptr(stream);
            guards.push(g);
            let (hg_ptr, hg_dtype) = match hg {
                Some(grad) => {
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
                    labels: row_labels as *const i64,
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

        self.enqueue_reduce(cfg, &mut ws.loss, rl_ptr, sc_ptr, rows)?;
        drop(guards);
        ws.last = Some(Enqueued::of(cfg, rows, vocab));
        Ok(())
    }

    /// `dk_prepare`: the label check, D and the scales into the workspace's scalars; int32
    /// labels widened into `widened` (0 otherwise).
    pub(super) fn enqueue_prepare(
        &self,
        cfg: &LossConfig,
        (labels, labels_i32, widened): (u64, bool, u64),
        scalars: u64,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        self.launch(
            "dk_prepare",
            one_block(rows),
            &DkPrepareParams {
                labels: labels as *const _,
                labels_out: widened as *mut i64, // NULL unless the labels are int32
                scalars: scalars as *mut DkScalars,
                rows: rows as i64,
                vocab: vocab as i64,
                ignore_index: cfg.ignore_index,
                reduction: cfg.reduction.code(),
                labels_i32: labels_i32 as i32,
                normalizer: cfg.normalizer.unwrap_or(0.0),
                upstream_scale: cfg.grad_scale,
            },
        )
    }

    /// `dk_reduce` of the row losses into `loss`, unless the reduction is `None`.
    pub(super) fn enqueue_reduce(
        &self,
        cfg: &LossConfig,
        loss: &mut CudaSlice<f32>,
        row_loss: u64,
        scalars: u64,
        rows: usize,
    ) -> Result<()> {
        if cfg.reduction == Reduction::None {
            return Ok(());
        }
        let (lp, _g) = cudarc::driver::DevicePtrMut::device_ptr_mut(loss, &self.stream);
        self.launch(
            "dk_reduce",
            one_block(rows),
            &DkReduceParams {
                row_loss: row_loss as *const f32,
                scalars: scalars as *const DkScalars,
                loss: lp as *mut f32,
                rows: rows as i64,
            },
        )
    }

    /// The result of the last call enqueued into `ws`: waits for it (one synchronization of the
    /// device's stream), then returns the loss, or the out-of-range label it found.
    pub fn read_loss(&self, ws: &LossWorkspace) -> Result<LossValue> {
        let Some(e) = ws.last else {
            return Err(Error::Empty("nothing was enqueued into this workspace"));
        };
        let sc = self
            .stream
            .clone_dtoh(&ws.scalars)
            .map_err(|err| self.cuda_error("synchronize", err))?[0];
        if sc.bad_topk != i64::MAX {
            let (row, id) = ((sc.bad_topk >> 32) as usize, sc.bad_topk as u32);
            return Err(Error::TopKId {
                row,
                id,
                vocab: e.vocab,
                reason: if id as usize >= e.vocab {
                    "is outside the vocabulary"
                } else {
                    "appears twice in the row"
                },
            });
        }
        if sc.bad_label_row >= 0 {
            return Err(Error::LabelOutOfRange {
                row: sc.bad_label_row as usize,
                label: sc.bad_label,
                vocab: e.vocab,
                ignore_index: e.ignore_index,
            });
        }
        let values = match e.reduction {
            Reduction::None => self.stream.clone_dtoh(&ws.row_loss.slice(..e.rows)),
            _ => self.stream.clone_dtoh(&ws.loss),
        }
        .map_err(|err| self.cuda_error("copy of the loss", err))?;
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
