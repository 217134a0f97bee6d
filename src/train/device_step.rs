//! The training step on a CUDA device (a GPU or the emulated one): teacher forward, student
//! forward, the fused distillation loss, student backward, gradient clipping and AdamW, all on
//! device buffers allocated once when the step is made (`DeviceStep::new`); a step allocates
//! nothing and synchronizes twice, to read the loss and the gradient norm (the CPU trainer's
//! checks of both). The host `Trainer` keeps the run (schedule, history, checkpoints) and
//! mirrors parameters and optimizer state to and from the device around checkpoints.
//!
//! Mixed precision (`DeviceDtype::Bf16`): the model's weights, activations and their gradients
//! are bf16 (GEMMs accumulate in f32), the parameter gradients, the f32 master weights and the
//! AdamW moments f32; the optimizer writes the master weights and their bf16 working copy in
//! one pass. bf16 has f32's exponent range, so no loss scaling is needed. The teacher's weights
//! and activations are bf16 too, and its bf16 logits go straight into the fused loss.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};

use crate::cuda::{
    CudaKernels, DeviceHidden, DeviceInputs, DeviceSpan, DeviceTopK, DeviceTopKInputs,
    LossWorkspace, RowStrides, Storage, Student,
};
use crate::dtype::HostSlice;
use crate::model::exec_cuda::DeviceActivations;
use crate::model::llama::{HiddenPoint, Llama, Pass};
use crate::semantics::{LossConfig, TopKTeacher};
pub use crate::train::config::DeviceDtype;
use crate::train::device_optim::{DeviceAdamW, GradClip};
use crate::train::error::{Result, TrainError as Error};
use crate::train::memory::MemoryPlan;
use crate::train::optim::{AdamW, DecayMask};
use crate::train::trainer::HiddenPair;

/// The step on the device as the trainer drives it, whatever its dtype.
pub trait StepOnDevice {
    /// Whether this is the emulated device.
    fn is_emulated(&self) -> bool;
    /// The device memory plan, one line per allocation, for the start-up report.
    fn plan(&self) -> &[(String, usize)];
    /// Gradients of the loss `cfg` on `inputs` (labels `labels`) into the device gradient buffer
    /// (zeroed first); returns the loss. The teachers run only when `distilling`; the
    /// hidden-state pairs (single teacher) take part when `cfg.hidden_weight` is not 0. With
    /// `cached` (teacher caches' rows for this batch) the soft loss is the top-k loss and no
    /// teacher runs. One loss call per teacher, weighted by `weights` and accumulated into one
    /// logit gradient.
    #[allow(clippy::too_many_arguments)]
    fn forward_backward(
        &mut self,
        model: &Llama,
        teachers: &[&Llama],
        cached: &[TopKTeacher<'_>],
        weights: &[f32],
        cfg: &LossConfig,
        inputs: &[u32],
        labels: &[i64],
        distilling: bool,
    ) -> Result<f32>;
    /// Clips the gradient to `max_norm` and applies one AdamW update at `lr`; returns the norm
    /// before clipping. A non-finite norm is returned without updating.
    fn update(&mut self, decay: &DecayMask, lr: f32, max_norm: f32) -> Result<f32>;
    /// Mean cross-entropy of the current parameters on validation windows, on the device (see
    /// [`eval_loss_device`]), in batches of at most `batch` windows of `seq` tokens.
    fn evaluate(
        &self,
        model: &Llama,
        windows: &[&(Vec<u32>, Vec<u32>)],
        batch: usize,
        seq: usize,
    ) -> Result<f64>;
    /// The parameters and the optimizer state, copied to the host (for checkpoints and
    /// evaluation).
    fn download(&self) -> Result<(Vec<f32>, AdamW)>;
    /// Replaces the device's parameters and optimizer state (after a resume).
    fn upload(&mut self, params: &[f32], adam: &AdamW) -> Result<()>;
}

/// A [`DeviceStep`] of `dtype` (see `DeviceStep::new`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_step(
    dtype: DeviceDtype,
    dev: CudaKernels,
    model: &Llama,
    params: &[f32],
    adam: &AdamW,
    teachers: &[(&Llama, &[f32])],
    pairs: &[HiddenPair],
    batch: usize,
    seq: usize,
) -> Result<Box<dyn StepOnDevice>> {
    Ok(match dtype {
        DeviceDtype::F32 => Box::new(DeviceStep::<f32>::new(
            dev, model, params, adam, teachers, pairs, batch, seq,
        )?),
        DeviceDtype::Bf16 => Box::new(DeviceStep::<bf16>::new(
            dev, model, params, adam, teachers, pairs, batch, seq,
        )?),
    })
}

/// What a step on the device needs besides the host's schedule and history; `T` is the
/// storage type of the model's weights and activations.
pub struct DeviceStep<T: Storage> {
    dev: CudaKernels,
    /// The f32 master weights (what AdamW updates and checkpoints hold).
    params: CudaSlice<f32>,
    /// Their bf16 working copy, when `T` is bf16 (for f32 the master weights are read).
    work: Option<CudaSlice<bf16>>,
    grads: CudaSlice<f32>,
    dlogits: CudaSlice<T>,
    labels: CudaSlice<i64>,
    acts: DeviceActivations<T>,
    /// Each teacher's weights and inference buffers.
    teachers: Vec<(CudaSlice<T>, DeviceActivations<T>)>,
    hidden: Option<HiddenStates<T>>,
    /// A teacher cache's rows of one batch (ids, f16 values, tails), allocated at the first
    /// cached step.
    topk: Option<(CudaSlice<u32>, CudaSlice<f16>, CudaSlice<f32>)>,
    ws: LossWorkspace,
    clip: GradClip,
    adam: DeviceAdamW,
    /// The device memory plan, one line per allocation, for the start-up report.
    plan: Vec<(String, usize)>,
}

/// Device bytes of a step for `model` (and `teacher`) at `batch` x `seq` in the storage type
/// `T`, by allocation.
pub(crate) fn plan<T: Storage>(
    model: &Llama,
    teachers: &[&Llama],
    pairs: &[HiddenPair],
    n_params: usize,
    batch: usize,
    seq: usize,
) -> Result<Vec<(String, usize)>> {
    let n = n_params;
    let (b, t) = (batch, seq);
    let rows = b * t;
    let v = model.config().vocab_size;
    let w = std::mem::size_of::<T>();
    let mut plan = vec![("parameters".to_string(), 4 * n)];
    if w != 4 {
        plan.push((format!("{} working copy", T::SUFFIX), w * n));
    }
    plan.extend([
        ("gradients".to_string(), 4 * n),
        ("optimizer state (AdamW m, v)".to_string(), 8 * n),
        (
            "activations and backward scratch".to_string(),
            DeviceActivations::<T>::bytes_for(model, b, t, Pass::Training)?,
        ),
        ("logit gradients".to_string(), w * rows * v),
        ("labels and loss workspace".to_string(), 8 * rows + 8 * rows),
    ]);
    for (i, tm) in teachers.iter().enumerate() {
        let name = |what: &str| match teachers.len() {
            1 => format!("teacher {what}"),
            _ => format!("teacher {} {what}", i + 1),
        };
        plan.push((name("parameters"), w * tm.num_params()));
        plan.push((
            name("activations"),
            DeviceActivations::<T>::bytes_for(tm, b, t, Pass::Inference)?,
        ));
        if i == 0 && !pairs.is_empty() {
            let (cs, ct) = (model.config().hidden_size, tm.config().hidden_size);
            plan.push((
                format!("hidden-state pairs ({})", pairs.len()),
                HiddenStates::<T>::bytes(pairs.len(), rows, cs, ct),
            ));
        }
    }
    Ok(plan)
}

/// `host` rounded to `T` (the identity for f32).
fn to_storage<T: Storage>(host: &[f32]) -> Vec<T> {
    host.iter().map(|&x| T::from_f32(x)).collect()
}

impl<T: Storage> DeviceStep<T> {
    /// Uploads the student's parameters (the model's, then the hidden-state projections of
    /// `pairs`) and optimizer state (and the teacher's parameters) and allocates every buffer of
    /// a step, after checking the plan against the device's free memory: a run that does not
    /// fit stops here with the sizes named.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dev: CudaKernels,
        model: &Llama,
        params: &[f32],
        adam: &AdamW,
        teachers: &[(&Llama, &[f32])],
        pairs: &[HiddenPair],
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        let models: Vec<&Llama> = teachers.iter().map(|t| t.0).collect();
        let plan = plan::<T>(model, &models, pairs, params.len(), batch, seq)?;
        let (free, _total) = dev
            .context()
            .mem_get_info()
            .map_err(|e| Error::Loss(dev.cuda_error("cuMemGetInfo", e)))?;
        let mut p = MemoryPlan::new();
        for (what, bytes) in &plan {
            p.add(what.clone(), Some(*bytes), 1);
        }
        p.check_against(
            &format!("training on the device at batch {batch} x seq {seq}"),
            Some(free as u128),
        )?;
        let s = dev.stream().clone();
        let d = &dev;
        let map = |what: &'static str| move |e| Error::Loss(d.cuda_error(what, e));
        let rows = batch * seq;
        let v = model.config().vocab_size;
        let params_d = s
            .clone_htod(params)
            .map_err(map("uploading the parameters"))?;
        let work = match std::mem::size_of::<T>() {
            4 => None,
            _ => Some(
                s.clone_htod(&to_storage::<bf16>(params))
                    .map_err(map("uploading the bf16 working copy"))?,
            ),
        };
        let grads = s
            .alloc_zeros::<f32>(params.len())
            .map_err(map("the gradients"))?;
        let dlogits = s
            .alloc_zeros::<T>(rows * v)
            .map_err(map("the logit gradients"))?;
        let labels = s.alloc_zeros::<i64>(rows).map_err(map("the labels"))?;
        let acts = DeviceActivations::new(&dev, model, batch, seq)?;
        let hidden = match (teachers.first(), pairs.is_empty()) {
            (Some((tm, _)), false) => {
                let (cs, ct) = (model.config().hidden_size, tm.config().hidden_size);
                Some(HiddenStates::new(&dev, pairs, rows, cs, ct)?)
            }
            _ => None,
        };
        let teachers = teachers
            .iter()
            .map(|(tm, tp)| {
                let p = s
                    .clone_htod(&to_storage::<T>(tp))
                    .map_err(map("uploading the teacher"))?;
                Ok((p, DeviceActivations::inference(&dev, tm, batch, seq)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let ws = dev.workspace(rows)?;
        let clip = GradClip::new(&dev, params.len())?;
        let adam = DeviceAdamW::upload(&dev, adam)?;
        Ok(DeviceStep {
            dev,
            params: params_d,
            work,
            grads,
            dlogits,
            labels,
            acts,
            teachers,
            hidden,
            topk: None,
            ws,
            clip,
            adam,
            plan,
        })
    }

    /// [`StepOnDevice::forward_backward`] against teacher caches' rows: the student runs once,
    /// then for each cache its batch's ids, values and tails are copied up and the top-k loss
    /// writes (first) or adds (the others) its weighted logit gradient.
    fn forward_backward_topk(
        &mut self,
        model: &Llama,
        cached: &[TopKTeacher<'_>],
        weights: &[f32],
        cfg: &LossConfig,
        inputs: &[u32],
        labels: &[i64],
    ) -> Result<f32> {
        self.begin(labels)?;
        let dev = &self.dev;
        let s = dev.stream();
        let map = |what: &'static str| move |e| Error::Loss(dev.cuda_error(what, e));
        let rows = labels.len();
        let n_model = model.num_params();
        let all_params = self.working();
        let params = all_params.sub(0, n_model)?;
        self.acts.forward(dev, model, &params, inputs)?;
        let logits = self.acts.logits();
        let mut loss = 0.0f32;
        for (i, top) in cached.iter().enumerate() {
            let HostSlice::F16(values) = top.values else {
                return Err(Error::Data("a teacher cache's values are f16".into()));
            };
            if self
                .topk
                .as_ref()
                .is_none_or(|(ids, _, _)| ids.len() != top.ids.len())
            {
                self.topk = Some((
                    s.alloc_zeros(top.ids.len()).map_err(map("the top-k ids"))?,
                    s.alloc_zeros(values.len())
                        .map_err(map("the top-k values"))?,
                    s.alloc_zeros(rows).map_err(map("the top-k tails"))?,
                ));
            }
            let (d_ids, d_values, d_tail) = self.topk.as_mut().expect("allocated above");
            s.memcpy_htod(top.ids, d_ids)
                .map_err(map("the top-k ids"))?;
            s.memcpy_htod(values, d_values)
                .map_err(map("the top-k values"))?;
            s.memcpy_htod(top.tail, d_tail)
                .map_err(map("the top-k tails"))?;
            let cfg = LossConfig {
                grad_scale: weights[i],
                accumulate: i > 0,
                ..*cfg
            };
            dev.distill_loss_topk_enqueue(
                &cfg,
                DeviceTopKInputs {
                    rows,
                    vocab: model.config().vocab_size,
                    student: Student::Logits {
                        logits: &logits,
                        grad: Some(&mut self.dlogits),
                    },
                    teacher: DeviceTopK {
                        k: top.k,
                        ids: d_ids.as_view(),
                        values: &*d_values,
                        tail: d_tail.as_view(),
                    },
                    labels: Some(&self.labels),
                    strides: RowStrides::default(),
                },
                &mut self.ws,
            )?;
            loss += weights[i] * dev.read_loss(&self.ws)?.total();
        }
        let mut grads = DeviceSpan::over_mut(&mut self.grads).sub(0, n_model)?;
        self.acts
            .backward(dev, model, &params, &self.dlogits, &[], &mut grads)?;
        Ok(loss)
    }

    /// The start of a step: the labels copied up, the gradient buffer zeroed.
    fn begin(&mut self, labels: &[i64]) -> Result<()> {
        let dev = &self.dev;
        let s = dev.stream();
        let map = |what: &'static str| move |e| Error::Loss(dev.cuda_error(what, e));
        s.memcpy_htod(labels, &mut self.labels)
            .map_err(map("the labels"))?;
        s.memset_zeros(&mut self.grads)
            .map_err(map("zeroing the gradients"))
    }

    /// The weights the model reads: the bf16 working copy, or the f32 master weights.
    fn working(&self) -> DeviceSpan<T> {
        match &self.work {
            Some(w) => DeviceSpan::over(w).cast::<T>(w.len()),
            None => DeviceSpan::over(&self.params).cast::<T>(self.params.len()),
        }
    }
}

/// Mean cross-entropy (nats per token) of `model` with `params` on validation windows, on the
/// device: the same windows, batches and sum as `trainer::eval_loss` on the CPU executor, each
/// batch's forward and loss on `dev` (buffers for at most `batch` windows allocated once).
pub fn eval_loss_device(
    dev: &CudaKernels,
    model: &Llama,
    params: &[f32],
    windows: &[&(Vec<u32>, Vec<u32>)],
    batch: usize,
    seq: usize,
) -> Result<f64> {
    let d_params = dev
        .stream()
        .clone_htod(params)
        .map_err(|e| Error::Loss(dev.cuda_error("uploading the parameters", e)))?;
    eval_on_device(
        dev,
        model,
        &DeviceSpan::over(&d_params),
        windows,
        batch,
        seq,
    )
}

/// [`eval_loss_device`] with the parameters already on the device.
fn eval_on_device<T: Storage>(
    dev: &CudaKernels,
    model: &Llama,
    d_params: &DeviceSpan<T>,
    windows: &[&(Vec<u32>, Vec<u32>)],
    batch: usize,
    seq: usize,
) -> Result<f64> {
    if windows.is_empty() {
        return Err(Error::Data(
            "no validation windows: the validation split is shorter than one sequence".into(),
        ));
    }
    let s = dev.stream();
    let map = |what: &'static str| move |e| Error::Loss(dev.cuda_error(what, e));
    let v = model.config().vocab_size;
    let cfg = LossConfig {
        alpha: 0.0,
        reduction: crate::semantics::Reduction::Sum,
        ..LossConfig::default()
    };
    let mut acts: Option<DeviceActivations<T>> = None;
    let mut ws = dev.workspace(batch * seq)?;
    let mut labels_d = s
        .alloc_zeros::<i64>(batch * seq)
        .map_err(map("the labels"))?;
    let (mut total, mut count) = (0.0f64, 0usize);
    for group in windows.chunks(batch) {
        let (inputs, labels) = crate::train::trainer::window_batch(group, seq)?;
        // Buffers for this group's size (the last group may be smaller).
        if acts.as_ref().is_none_or(|a| a.rows() != inputs.len()) {
            acts = Some(DeviceActivations::inference(dev, model, group.len(), seq)?);
        }
        let a = acts.as_mut().expect("made above");
        a.forward(dev, model, d_params, &inputs)?;
        let mut lab = labels_d.slice_mut(0..labels.len());
        s.memcpy_htod(&labels, &mut lab)
            .map_err(map("the labels"))?;
        let logits = a.logits();
        dev.distill_loss_enqueue(
            &cfg,
            DeviceInputs {
                rows: labels.len(),
                vocab: v,
                student: Student::Logits {
                    logits: &logits,
                    grad: None,
                },
                teacher: &logits,
                labels: Some(&lab),
                hidden: None,
                strides: RowStrides::default(),
            },
            &mut ws,
        )?;
        total += dev.read_loss(&ws)?.total() as f64;
        count += labels.len();
    }
    Ok(total / count as f64)
}

/// The model's logits after the last token of a window, on the device, for sampling: inference
/// buffers for one sequence of `len` tokens allocated once; each window is padded at the end to
/// `len` (attention is causal, so the padding changes no earlier row) and only the window's last
/// row of logits is copied back.
pub struct LastLogits {
    params: CudaSlice<f32>,
    acts: DeviceActivations,
    padded: Vec<u32>,
}

impl LastLogits {
    /// Uploads `params` and allocates the buffers for windows of up to `len` tokens.
    pub fn new(dev: &CudaKernels, model: &Llama, params: &[f32], len: usize) -> Result<Self> {
        let params = dev
            .stream()
            .clone_htod(params)
            .map_err(|e| Error::Loss(dev.cuda_error("uploading the parameters", e)))?;
        Ok(LastLogits {
            params,
            acts: DeviceActivations::inference(dev, model, 1, len)?,
            padded: vec![0; len],
        })
    }

    /// `[V]`: the logits after the last token of `window` (1 to `len` tokens).
    pub fn after(&mut self, dev: &CudaKernels, model: &Llama, window: &[u32]) -> Result<Vec<f32>> {
        let n = window.len();
        if n == 0 || n > self.padded.len() {
            return Err(Error::InvalidOption {
                name: "window",
                value: format!("{n} tokens"),
                reason: "must be 1 to the length the buffers were made for",
            });
        }
        self.padded[..n].copy_from_slice(window);
        self.padded[n..].fill(0);
        self.acts.forward(dev, model, &self.params, &self.padded)?;
        let v = model.config().vocab_size;
        let logits = self.acts.logits();
        dev.stream()
            .clone_dtoh(&logits.slice((n - 1) * v..n * v))
            .map_err(|e| Error::Loss(dev.cuda_error("reading the logits", e)))
    }
}

/// Hidden-state distillation on the device, laid out as on the CPU: every pair's (projected)
/// student state and its teacher state side by side in rows of `[N, pairs * C_teacher]`, so one
/// fused loss call averages the pairs' MSEs over the valid rows; the FitNets projections live in
/// the step's parameter buffer after the model's parameters (their gradients likewise).
struct HiddenStates<T> {
    pairs: Vec<HiddenPair>,
    rows: usize,
    cs: usize,
    ct: usize,
    /// `[N, pairs * C_teacher]`: the students' states, projected where the widths differ.
    student: CudaSlice<T>,
    /// `[N, pairs * C_teacher]`: the teacher's states.
    teacher: CudaSlice<T>,
    /// `[N, pairs * C_teacher]`: the loss's gradient with respect to `student`.
    grad: CudaSlice<T>,
    /// `[N, C_teacher]`: one pair's projected state or its gradient, in turn.
    projected: CudaSlice<T>,
    /// `[pairs, N, C_student]`: each pair's gradient with respect to the student's state.
    dstates: CudaSlice<T>,
}

impl<T: Storage> HiddenStates<T> {
    fn bytes(pairs: usize, rows: usize, cs: usize, ct: usize) -> usize {
        std::mem::size_of::<T>() * (3 * rows * pairs * ct + rows * ct + pairs * rows * cs)
    }

    fn new(
        dev: &CudaKernels,
        pairs: &[HiddenPair],
        rows: usize,
        cs: usize,
        ct: usize,
    ) -> Result<Self> {
        let s = dev.stream();
        let alloc = |n: usize, what: &'static str| {
            s.alloc_zeros::<T>(n)
                .map_err(|e| Error::Loss(dev.cuda_error(what, e)))
        };
        let w = pairs.len() * ct;
        Ok(HiddenStates {
            pairs: pairs.to_vec(),
            rows,
            cs,
            ct,
            student: alloc(rows * w, "the student hidden states")?,
            teacher: alloc(rows * w, "the teacher hidden states")?,
            grad: alloc(rows * w, "the hidden-state gradients")?,
            projected: alloc(rows * ct, "the projected hidden state")?,
            dstates: alloc(
                pairs.len() * rows * cs,
                "the student hidden-state gradients",
            )?,
        })
    }

    fn width(&self) -> usize {
        self.pairs.len() * self.ct
    }

    /// The gathered states as the fused loss's hidden inputs, the gradient into `grad`.
    fn loss_inputs(&mut self) -> DeviceHidden<'_> {
        DeviceHidden {
            size: self.width(),
            student: &self.student,
            teacher: &self.teacher,
            grad: Some(&mut self.grad),
        }
    }

    /// Fills `student` and `teacher` from the last forwards (projecting with the weights in
    /// `params`).
    fn gather(
        &mut self,
        dev: &CudaKernels,
        params: &DeviceSpan<T>,
        s_acts: &DeviceActivations<T>,
        t_acts: &DeviceActivations<T>,
    ) -> Result<()> {
        let (n, w, cs, ct) = (self.rows, self.width(), self.cs, self.ct);
        let student = DeviceSpan::over_mut(&mut self.student);
        let teacher = DeviceSpan::over_mut(&mut self.teacher);
        for (k, p) in self.pairs.iter().enumerate() {
            let hs = state(s_acts, p.student, "student")?;
            let ht = state(t_acts, p.teacher, "teacher")?;
            // Pair k's columns: the block starting at column k * ct, rows `w` apart.
            let mut dst = student.sub(k * ct, n * w - k * ct)?;
            match p.proj {
                Some(at) => {
                    let weight = params.sub(at, ct * cs)?;
                    dev.matmul_forward(&mut self.projected, &hs, &weight, cs, ct)?;
                    dev.copy_rows(&mut dst, w, &self.projected, ct, n, ct)?;
                }
                None => dev.copy_rows(&mut dst, w, &hs, ct, n, ct)?,
            }
            let mut dst = teacher.sub(k * ct, n * w - k * ct)?;
            dev.copy_rows(&mut dst, w, &ht, ct, n, ct)?;
        }
        Ok(())
    }

    /// From `grad` to each pair's gradient with respect to the student's state (returned, by
    /// point), accumulating the projections' gradients into `grads`.
    fn scatter(
        &mut self,
        dev: &CudaKernels,
        params: &DeviceSpan<T>,
        grads: &DeviceSpan<f32>,
        s_acts: &DeviceActivations<T>,
    ) -> Result<Vec<(HiddenPoint, DeviceSpan<T>)>> {
        let (n, w, cs, ct) = (self.rows, self.width(), self.cs, self.ct);
        let grad = DeviceSpan::over(&self.grad);
        let dstates = DeviceSpan::over_mut(&mut self.dstates);
        let mut out = Vec::with_capacity(self.pairs.len());
        for (k, p) in self.pairs.iter().enumerate() {
            let src = grad.sub(k * ct, n * w - k * ct)?;
            let mut dst = dstates.sub(k * n * cs, n * cs)?;
            match p.proj {
                Some(at) => {
                    dev.copy_rows(&mut self.projected, ct, &src, w, n, ct)?;
                    dev.stream()
                        .memset_zeros(&mut dst)
                        .map_err(|e| Error::Loss(dev.cuda_error("memset", e)))?;
                    let hs = state(s_acts, p.student, "student")?;
                    dev.matmul_backward(
                        &mut dst,
                        &mut grads.sub(at, ct * cs)?,
                        &self.projected,
                        &hs,
                        &params.sub(at, ct * cs)?,
                        cs,
                        ct,
                    )?;
                }
                None => dev.copy_rows(&mut dst, cs, &src, w, n, ct)?,
            }
            out.push((p.student, dst));
        }
        Ok(out)
    }
}

/// The hidden state at `point` of the last forward on `acts`.
fn state<'a, T: Storage>(
    acts: &'a DeviceActivations<T>,
    point: HiddenPoint,
    model: &str,
) -> Result<cudarc::driver::CudaView<'a, T>> {
    acts.hidden(point).ok_or_else(|| Error::InvalidOption {
        name: "hidden-layers",
        value: format!("{model} {point:?}"),
        reason: "the model has no such hidden state",
    })
}

impl<T: Storage> StepOnDevice for DeviceStep<T> {
    fn is_emulated(&self) -> bool {
        self.dev.is_emulated()
    }
    fn plan(&self) -> &[(String, usize)] {
        &self.plan
    }

    fn forward_backward(
        &mut self,
        model: &Llama,
        teachers: &[&Llama],
        cached: &[TopKTeacher<'_>],
        weights: &[f32],
        cfg: &LossConfig,
        inputs: &[u32],
        labels: &[i64],
        distilling: bool,
    ) -> Result<f32> {
        if distilling && !cached.is_empty() {
            return self.forward_backward_topk(model, cached, weights, cfg, inputs, labels);
        }
        self.begin(labels)?;
        let dev = &self.dev;
        let n_model = model.num_params();
        let all_params = self.working();
        let params = all_params.sub(0, n_model)?;
        if distilling {
            for ((tp, tacts), tm) in self.teachers.iter_mut().zip(teachers) {
                tacts.forward(dev, tm, tp, inputs)?;
            }
        }
        self.acts.forward(dev, model, &params, inputs)?;
        let use_hidden = distilling && cfg.hidden_weight != 0.0;
        let hidden = match (&mut self.hidden, self.teachers.first(), use_hidden) {
            (Some(h), Some((_, tacts)), true) => {
                h.gather(dev, &all_params, &self.acts, tacts)?;
                Some(h)
            }
            _ => None,
        };
        let logits = self.acts.logits();
        let (rows, vocab) = (labels.len(), model.config().vocab_size);
        let with_hidden = hidden.is_some();
        let mut hidden = hidden;
        // One call per teacher: the first writes the logit gradient, the others add to it.
        let calls = if distilling {
            self.teachers.len().max(1)
        } else {
            1
        };
        let mut loss = 0.0f32;
        for i in 0..calls {
            let teacher_logits = match (self.teachers.get(i), distilling) {
                (Some((_, tacts)), true) => tacts.logits(),
                _ => self.acts.logits(), // alpha = 0: the teacher is never read
            };
            let w = weights.get(i).copied().unwrap_or(1.0);
            let cfg = LossConfig {
                grad_scale: w,
                accumulate: i > 0,
                hidden_weight: if i == 0 { cfg.hidden_weight } else { 0.0 },
                ..*cfg
            };
            dev.distill_loss_enqueue(
                &cfg,
                DeviceInputs {
                    rows,
                    vocab,
                    student: Student::Logits {
                        logits: &logits,
                        grad: Some(&mut self.dlogits),
                    },
                    teacher: &teacher_logits,
                    labels: Some(&self.labels),
                    hidden: match i {
                        0 => hidden.as_deref_mut().map(HiddenStates::loss_inputs),
                        _ => None,
                    },
                    strides: RowStrides::default(),
                },
                &mut self.ws,
            )?;
            loss += w * dev.read_loss(&self.ws)?.total();
        }
        let all_grads = DeviceSpan::over_mut(&mut self.grads);
        let dstates = match (&mut self.hidden, with_hidden) {
            (Some(h), true) => h.scatter(dev, &all_params, &all_grads, &self.acts)?,
            _ => Vec::new(),
        };
        let mut grads = all_grads.sub(0, n_model)?;
        self.acts
            .backward(dev, model, &params, &self.dlogits, &dstates, &mut grads)?;
        Ok(loss)
    }

    fn update(&mut self, decay: &DecayMask, lr: f32, max_norm: f32) -> Result<f32> {
        self.clip.enqueue(&self.dev, &self.grads, max_norm)?;
        let norm = self.clip.norm(&self.dev)?;
        if !norm.is_finite() {
            return Ok(norm);
        }
        self.adam.update_with_copy(
            &self.dev,
            &mut self.params,
            self.work.as_mut(),
            &self.grads,
            decay,
            lr,
            Some(&self.clip),
        )?;
        Ok(norm)
    }

    fn evaluate(
        &self,
        model: &Llama,
        windows: &[&(Vec<u32>, Vec<u32>)],
        batch: usize,
        seq: usize,
    ) -> Result<f64> {
        let params = self.working().sub(0, model.num_params())?;
        eval_on_device(&self.dev, model, &params, windows, batch, seq)
    }

    fn download(&self) -> Result<(Vec<f32>, AdamW)> {
        let params = self
            .dev
            .stream()
            .clone_dtoh(&self.params)
            .map_err(|e| Error::Loss(self.dev.cuda_error("reading the parameters", e)))?;
        Ok((params, self.adam.download(&self.dev)?))
    }

    fn upload(&mut self, params: &[f32], adam: &AdamW) -> Result<()> {
        self.dev
            .stream()
            .memcpy_htod(params, &mut self.params)
            .map_err(|e| Error::Loss(self.dev.cuda_error("uploading the parameters", e)))?;
        if let Some(w) = &mut self.work {
            self.dev
                .stream()
                .memcpy_htod(&to_storage::<bf16>(params), w)
                .map_err(|e| Error::Loss(self.dev.cuda_error("uploading the parameters", e)))?;
        }
        self.adam = DeviceAdamW::upload(&self.dev, adam)?;
        Ok(())
    }
}
