//! One training run, llm.c style: parameters, gradients and optimizer moments each in one flat
//! buffer, one function per phase (`step`, `evaluate`, `save`). Hard-label training and
//! distillation share the step: the loss on the logits is always the crate's fused loss on the
//! `cpu` backend (alpha = 0 is plain cross-entropy and never reads a teacher).

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::cpu::Cpu;
use crate::data::batches::{train_batch, TokenStream};
use crate::device::DistillDevice;
use crate::dtype::HostSliceMut;
use crate::model::{normal_fill, ops, Activations, HiddenPoint, Llama, LlamaConfig, Pass};
use crate::semantics::{
    DistillInputs, GradOutputs, HiddenInputs, LossConfig, Reduction, TopKInputs,
};
use crate::train::checkpoint::{self, Checkpoint, ConfigExtras, TrainerState};
use crate::train::config::TrainConfig;
use crate::train::error::{Result, TrainError as Error};
use crate::train::memory::{self, MemoryPlan};
use crate::train::optim::{clip_grad_norm, AdamW, DecayMask, LrSchedule};

/// A frozen model whose logits (and hidden states) the student learns from.
pub struct Teacher {
    /// The teacher's architecture; its vocabulary must be the student's.
    pub model: Llama,
    /// Its flat f32 parameters, `[model.num_params()]`.
    pub params: Vec<f32>,
}

/// One hidden-state pair: where to read in each model, and the FitNets projection from the
/// student's width to the teacher's (`None` when the widths agree).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HiddenPair {
    pub(crate) student: HiddenPoint,
    pub(crate) teacher: HiddenPoint,
    /// Offset of the `[C_teacher, C_student]` projection in the trainer's parameter buffer.
    pub(crate) proj: Option<usize>,
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Steps done after this update (1 for the first).
    pub step: u64,
    /// The batch's training loss: the objective minimized, soft, hard-label and hidden-state terms
    /// combined.
    pub loss: f32,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f32,
    /// Learning rate of this update.
    pub lr: f32,
    /// Distillation temperature of this update (1 without distillation).
    pub temperature: f32,
}

/// Loss curves and counters of a run; saved with every checkpoint so that a resumed run
/// continues them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// (step after the update, training loss of that step)
    pub train: Vec<(u64, f64)>,
    /// (step, validation cross-entropy in nats per token)
    pub val: Vec<(u64, f64)>,
    /// Seconds spent in training steps (not evaluation or checkpoints).
    pub train_seconds: f64,
}

impl History {
    /// Training throughput so far: tokens of every recorded step over the seconds they took.
    pub fn tokens_per_s(&self, tokens_per_step: f64) -> f64 {
        tokens_per_step * self.train.len() as f64 / self.train_seconds.max(1e-9)
    }

    fn to_json(&self) -> Value {
        json!({ "train": self.train, "val": self.val, "train_seconds": self.train_seconds })
    }

    fn from_json(v: &Value) -> Option<History> {
        let curve = |key: &str| -> Option<Vec<(u64, f64)>> {
            v.get(key)?
                .as_array()?
                .iter()
                .map(|p| Some((p.get(0)?.as_u64()?, p.get(1)?.as_f64()?)))
                .collect()
        };
        Some(History {
            train: curve("train")?,
            val: curve("val")?,
            train_seconds: v.get("train_seconds")?.as_f64()?,
        })
    }
}

/// A student (or a model trained from scratch) and everything its training updates.
pub struct Trainer {
    cfg: TrainConfig,
    model: Llama,
    /// Model parameters `[0, n_model)`, then the hidden projections.
    params: Vec<f32>,
    grads: Vec<f32>,
    n_model: usize,
    pairs: Vec<HiddenPair>,
    adam: AdamW,
    decay: DecayMask,
    schedule: LrSchedule,
    acts: Activations<f32>,
    /// The live teachers and their inference buffers (several: a weighted ensemble).
    teachers: Vec<(Teacher, Activations<f32>)>,
    /// The offline teachers when distilling from caches (then `teachers` is empty).
    caches: Vec<crate::train::teacher_cache::TeacherCache>,
    dlogits: Vec<f32>,
    labels: Vec<i64>,
    step: u64,
    /// Loss curves so far; [`Trainer::resume`] restores them and every save stores them.
    pub history: History,
    /// The step on a CUDA device, once [`Trainer::use_device`] moved the run there; the host's
    /// parameters and optimizer state then lag until [`Trainer::sync_host`].
    #[cfg(feature = "cuda")]
    device: Option<Box<dyn crate::train::device_step::StepOnDevice>>,
}

fn hidden_point(
    index: usize,
    layers: usize,
    who: &str,
    pair: (usize, usize),
) -> Result<HiddenPoint> {
    HiddenPoint::from_hf_index(index, layers).ok_or_else(|| Error::InvalidOption {
        name: "hidden-layers",
        value: format!("{}:{}", pair.0, pair.1),
        reason: if who == "student" {
            "the student index is past the student's last hidden state (0 ..= num_hidden_layers)"
        } else {
            "the teacher index is past the teacher's last hidden state (0 ..= num_hidden_layers)"
        },
    })
}

impl Trainer {
    /// A fresh run: parameters initialized from the seed, projections included.
    pub fn new(cfg: TrainConfig, model_cfg: LlamaConfig, teacher: Option<Teacher>) -> Result<Self> {
        Self::build(cfg, model_cfg, teacher.into_iter().collect(), Vec::new())
    }

    /// A student distilled from several live teachers at once (one tokenizer): the soft loss
    /// is the sum of each teacher's, weighted by `DistillConfig::teacher_weights` (normalized to
    /// sum to 1). Hidden-state pairs need a single teacher.
    pub fn with_teachers(
        cfg: TrainConfig,
        model_cfg: LlamaConfig,
        teachers: Vec<Teacher>,
    ) -> Result<Self> {
        Self::build(cfg, model_cfg, teachers, Vec::new())
    }

    /// A student distilled from an offline teacher cache instead of a live teacher: each step's
    /// batch is a set of the cache's training windows, and the soft loss is the top-k loss
    /// ([`crate::TopKTeacher`]). Needs distillation options without hidden-state pairs (the
    /// cache holds no hidden states), `seq` equal to the cache's window and the same vocabulary.
    pub fn with_cache(
        cfg: TrainConfig,
        model_cfg: LlamaConfig,
        cache: crate::train::teacher_cache::TeacherCache,
    ) -> Result<Self> {
        Self::with_caches(cfg, model_cfg, vec![cache])
    }

    /// [`Trainer::with_cache`] with several caches, one per teacher of an ensemble (weighted as
    /// in [`Trainer::with_teachers`]). They must cover the same windows of the same data.
    pub fn with_caches(
        cfg: TrainConfig,
        model_cfg: LlamaConfig,
        caches: Vec<crate::train::teacher_cache::TeacherCache>,
    ) -> Result<Self> {
        let Some(cache) = caches.first() else {
            return Err(Error::InvalidOption {
                name: "teacher-cache",
                value: "(none)".into(),
                reason: "at least one teacher cache is needed",
            });
        };
        for other in &caches[1..] {
            let (a, b) = (&cache.manifest, &other.manifest);
            if a.seq != b.seq || a.vocab != b.vocab || a.split("train") != b.split("train") {
                return Err(Error::InvalidOption {
                    name: "teacher-cache",
                    value: other.dir.display().to_string(),
                    reason: "covers other windows than the first cache (every cache of an ensemble needs the same data, tokenizer and --seq)",
                });
            }
        }
        let m = &cache.manifest;
        if let (Some(d), Some(lo), Some(hi)) = (
            &cfg.distill,
            m.tail_temperatures.first(),
            m.tail_temperatures.last(),
        ) {
            for t in [Some(d.temperature), d.temperature_end]
                .into_iter()
                .flatten()
            {
                if t < *lo || t > *hi {
                    return Err(Error::InvalidOption {
                        name: "temperature",
                        value: format!(
                            "{t} (the cache holds its tail at T in {:?})",
                            m.tail_temperatures
                        ),
                        reason: "is outside the teacher cache's tail temperatures; rebuild it with --tail-temperatures covering the schedule",
                    });
                }
            }
        }
        let refuse = |name, value: String, reason| Error::InvalidOption {
            name,
            value,
            reason,
        };
        match &cfg.distill {
            None => {
                return Err(refuse(
                    "teacher-cache",
                    cache.dir.display().to_string(),
                    "a teacher cache is for distillation; train without it",
                ))
            }
            Some(d) if d.hidden_weight != 0.0 && !d.hidden_layers.is_empty() => {
                return Err(refuse(
                    "hidden-layers",
                    format!("{:?}", d.hidden_layers),
                    "a teacher cache holds no hidden states; distill them from a live --teacher",
                ))
            }
            Some(_) => {}
        }
        if cfg.seq != m.seq {
            return Err(refuse(
                "seq",
                cfg.seq.to_string(),
                "differs from the teacher cache's window length (pass its seq, or build a cache for this one)",
            ));
        }
        if model_cfg.vocab_size != m.vocab {
            return Err(refuse(
                "vocab_size",
                model_cfg.vocab_size.to_string(),
                "differs from the teacher cache's vocabulary",
            ));
        }
        Self::build(cfg, model_cfg, Vec::new(), caches)
    }

    fn build(
        cfg: TrainConfig,
        model_cfg: LlamaConfig,
        teachers: Vec<Teacher>,
        caches: Vec<crate::train::teacher_cache::TeacherCache>,
    ) -> Result<Self> {
        cfg.validate()?;
        if let Some(d) = &cfg.distill {
            let n = teachers.len().max(caches.len());
            if !d.teacher_weights.is_empty() && d.teacher_weights.len() != n {
                return Err(Error::InvalidOption {
                    name: "teacher-weights",
                    value: format!("{:?}", d.teacher_weights),
                    reason: "needs one weight per teacher",
                });
            }
            if n > 1 && !d.hidden_layers.is_empty() && d.hidden_weight != 0.0 {
                return Err(Error::InvalidOption {
                    name: "hidden-layers",
                    value: format!("{:?}", d.hidden_layers),
                    reason: "hidden-state pairs need a single teacher",
                });
            }
        }
        let teacher = teachers.first();
        let model = Llama::new(model_cfg)?;
        if cfg.seq > model.config().max_position_embeddings {
            return Err(Error::InvalidOption {
                name: "seq",
                value: cfg.seq.to_string(),
                reason: "exceeds the model's max_position_embeddings",
            });
        }
        let n_model = model.num_params();
        let (pairs, n_proj) = match caches.is_empty() {
            false => (Vec::new(), 0),
            true => Self::plan_hidden(&cfg, &model, teacher)?,
        };
        for t in teachers.iter().skip(1) {
            Self::plan_hidden(&cfg, &model, Some(t))?; // vocabulary and positions of each
        }
        Self::plan_memory(&cfg, &model, &teachers, n_model.checked_add(n_proj))?;
        let mut params = model.init_params::<f32>(cfg.seed);
        params.extend(init_projections(&model, teacher, n_proj, cfg.seed));
        let total = params.len();
        let mut decay = DecayMask::from_layout(model.layout());
        decay.push(total - n_model, true);
        let adam = AdamW::new(total, cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.weight_decay);
        let schedule = LrSchedule {
            peak: cfg.lr,
            warmup: cfg.warmup,
            total: cfg.steps,
            min_ratio: cfg.min_lr_ratio,
        };
        let acts = Activations::new(&model, cfg.batch, cfg.seq)?;
        let teachers = teachers
            .into_iter()
            .map(|t| {
                let acts = Activations::inference(&t.model, cfg.batch, cfg.seq)?;
                Ok((t, acts))
            })
            .collect::<Result<Vec<_>>>()?;
        let n = cfg.batch * cfg.seq;
        let v = model.config().vocab_size;
        Ok(Trainer {
            grads: memory::filled(total, 0.0, "the gradients")?,
            dlogits: memory::filled(n * v, 0.0, "the logit gradients")?,
            labels: vec![0; n],
            cfg,
            model,
            params,
            n_model,
            pairs,
            adam,
            decay,
            schedule,
            acts,
            teachers,
            caches,
            step: 0,
            history: History::default(),
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    /// Every buffer of a training step, added up and checked against the available memory
    /// before any is allocated (the teacher's weights are already loaded).
    fn plan_memory(
        cfg: &TrainConfig,
        model: &Llama,
        teachers: &[Teacher],
        trained: Option<usize>,
    ) -> Result<()> {
        let (batch, seq) = (cfg.batch, cfg.seq);
        let (acts, scratch) =
            Activations::<f32>::buffer_elements(model, batch, seq, Pass::Training)?;
        let mut plan = MemoryPlan::new();
        plan.add("parameters", trained, 4);
        plan.add("gradients", trained, 4);
        plan.add("AdamW moments", trained.and_then(|t| t.checked_mul(2)), 4);
        plan.add("activations", acts.checked_add(scratch), 4);
        for t in teachers {
            let (ta, ts) =
                Activations::<f32>::buffer_elements(&t.model, batch, seq, Pass::Inference)?;
            plan.add("teacher activations", ta.checked_add(ts), 4);
        }
        let n = batch.checked_mul(seq);
        let v = model.config().vocab_size;
        plan.add("logit gradients", n.and_then(|n| n.checked_mul(v)), 4);
        plan.add("labels", n, 8);
        plan.check(&format!("training at batch {batch} x seq {seq}"))
    }

    /// Checks the distillation settings against the two models and lays out the projections.
    fn plan_hidden(
        cfg: &TrainConfig,
        model: &Llama,
        teacher: Option<&Teacher>,
    ) -> Result<(Vec<HiddenPair>, usize)> {
        let Some(d) = &cfg.distill else {
            return Ok((Vec::new(), 0));
        };
        let Some(t) = teacher else {
            return Err(Error::InvalidOption {
                name: "teacher",
                value: "(none)".into(),
                reason: "distillation needs a teacher",
            });
        };
        let (sc, tc) = (model.config(), t.model.config());
        if sc.vocab_size != tc.vocab_size {
            return Err(Error::InvalidOption {
                name: "teacher",
                value: format!("vocab_size {}", tc.vocab_size),
                reason: "the teacher's vocabulary differs from the student's (they must share one tokenizer)",
            });
        }
        if cfg.seq > tc.max_position_embeddings {
            return Err(Error::InvalidOption {
                name: "seq",
                value: cfg.seq.to_string(),
                reason: "exceeds the teacher's max_position_embeddings",
            });
        }
        if d.hidden_weight == 0.0 {
            return Ok((Vec::new(), 0));
        }
        let (cs, ct) = (sc.hidden_size, tc.hidden_size);
        let mut offset = model.num_params();
        let mut pairs = Vec::new();
        for &pair in &d.hidden_layers {
            let student = hidden_point(pair.0, sc.num_hidden_layers, "student", pair)?;
            let teacher = hidden_point(pair.1, tc.num_hidden_layers, "teacher", pair)?;
            let proj = (cs != ct).then(|| {
                offset += ct * cs;
                offset - ct * cs
            });
            pairs.push(HiddenPair {
                student,
                teacher,
                proj,
            });
        }
        Ok((pairs, offset - model.num_params()))
    }

    /// The trained model (the student when distilling).
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Replaces the model's parameters (projections excluded) before training starts, e.g. with
    /// a student built from the teacher's layers; `params` must match the model's layout.
    pub fn set_model_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.n_model {
            return Err(Error::ShapeMismatch {
                tensor: "params",
                expected: self.n_model,
                actual: params.len(),
                shape: "the model's parameter count".into(),
            });
        }
        if self.step != 0 {
            return Err(Error::Training {
                step: self.step,
                message: "the initial weights can only be set before the first step".into(),
            });
        }
        self.params[..self.n_model].copy_from_slice(params);
        Ok(())
    }

    /// The model's parameters (projections excluded).
    pub fn params(&self) -> &[f32] {
        &self.params[..self.n_model]
    }

    /// The run's training options.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    fn temperature(&self) -> f32 {
        match &self.cfg.distill {
            Some(d) => d.temperature_at(self.step, self.cfg.steps),
            None => 1.0,
        }
    }

    fn loss_config(&self) -> LossConfig {
        match &self.cfg.distill {
            Some(d) => LossConfig {
                kind: d.kind,
                temperature: self.temperature(),
                alpha: d.alpha,
                t2_scale: d.t2_scale,
                hidden_weight: if self.pairs.is_empty() {
                    0.0
                } else {
                    d.hidden_weight
                },
                reduction: Reduction::Mean,
                ..LossConfig::default()
            },
            None => LossConfig {
                alpha: 0.0,
                reduction: Reduction::Mean,
                ..LossConfig::default()
            },
        }
    }

    /// One optimizer step on the training batch of the current step.
    pub fn step(&mut self, train: &TokenStream) -> Result<StepStats> {
        let started = Instant::now();
        let step = self.step;
        // Every cache of an ensemble covers the same windows: the first picks them.
        let cached = match self.caches.first() {
            Some(c) => {
                let windows = c.train_windows(self.cfg.seed, step, self.cfg.batch)?;
                self.caches
                    .iter()
                    .map(|c| c.train_batch(&windows))
                    .collect::<Result<Vec<_>>>()?
            }
            None => Vec::new(),
        };
        let (inputs, targets) = match cached.first() {
            Some(b) => (b.inputs.clone(), b.targets.clone()),
            None => train_batch(train, self.cfg.seed, step, self.cfg.batch, self.cfg.seq)?,
        };
        for (l, &t) in self.labels.iter_mut().zip(&targets) {
            *l = t as i64;
        }
        let lr = self.schedule.lr(step);
        let temperature = self.temperature();
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            return self.device_step(step, &inputs, &cached, lr, temperature, started);
        }
        self.grads.fill(0.0);
        let loss = self.forward_backward(&inputs, &cached)?;
        check_finite(step, "loss", loss)?;
        let grad_norm = clip_grad_norm(&mut self.grads, self.cfg.grad_clip);
        check_finite(step, "gradient norm", grad_norm)?;
        self.adam
            .update(&mut self.params, &self.grads, &self.decay, lr)?;
        self.step += 1;
        self.history.train.push((self.step, loss as f64));
        self.history.train_seconds += started.elapsed().as_secs_f64();
        Ok(StepStats {
            step: self.step,
            loss,
            grad_norm,
            lr,
            temperature,
        })
    }

    /// Moves the run's steps onto `dev` (a GPU or the emulated one): parameters, optimizer state
    /// and the teacher are uploaded, every buffer of a step allocated once after the plan was
    /// checked against the device's free memory. `dtype` is the storage type of the weights and
    /// activations on the device (bf16: mixed precision with f32 master weights). Returns the
    /// plan (allocation, bytes) for the start-up report.
    #[cfg(feature = "cuda")]
    pub fn use_device(
        &mut self,
        dev: crate::cuda::CudaKernels,
        dtype: crate::train::device_step::DeviceDtype,
    ) -> Result<Vec<(String, usize)>> {
        let teachers: Vec<(&Llama, &[f32])> = self
            .teachers
            .iter()
            .map(|(t, _)| (&t.model, t.params.as_slice()))
            .collect();
        let step = crate::train::device_step::open_step(
            dtype,
            dev,
            &self.model,
            &self.params,
            &self.adam,
            &teachers,
            &self.pairs,
            self.cfg.batch,
            self.cfg.seq,
        )?;
        let plan = step.plan().to_vec();
        self.device = Some(step);
        Ok(plan)
    }

    /// Copies the parameters and optimizer state from the device (after device steps) into the
    /// host's copies, which checkpoints, evaluation and [`Trainer::params`] read. A no-op on the
    /// cpu.
    pub fn sync_host(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            let (params, adam) = d.download()?;
            self.params = params;
            self.adam = adam;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn device_step(
        &mut self,
        step: u64,
        inputs: &[u32],
        cached: &[crate::train::teacher_cache::CachedBatch],
        lr: f32,
        temperature: f32,
        started: Instant,
    ) -> Result<StepStats> {
        let loss_cfg = self.loss_config();
        let distilling = self.reads_teacher();
        let teachers: Vec<&Llama> = self.teachers.iter().map(|(t, _)| &t.model).collect();
        let tails = cached
            .iter()
            .map(|b| b.tail_at(loss_cfg.temperature))
            .collect::<Result<Vec<_>>>()?;
        let cached: Vec<crate::semantics::TopKTeacher> = cached
            .iter()
            .zip(&tails)
            .map(|(b, t)| b.teacher(t))
            .collect();
        let weights = self.loss_weights(distilling);
        let d = self.device.as_mut().expect("device_step runs on a device");
        let loss = d.forward_backward(
            &self.model,
            &teachers,
            &cached,
            &weights,
            &loss_cfg,
            inputs,
            &self.labels,
            distilling,
        )?;
        check_finite(step, "loss", loss)?;
        let grad_norm = d.update(&self.decay, lr, self.cfg.grad_clip)?;
        check_finite(step, "gradient norm", grad_norm)?;
        self.step += 1;
        self.history.train.push((self.step, loss as f64));
        self.history.train_seconds += started.elapsed().as_secs_f64();
        Ok(StepStats {
            step: self.step,
            loss,
            grad_norm,
            lr,
            temperature,
        })
    }

    /// The weight of each loss call: the teachers' weights when distilling; one call of weight
    /// 1 (the whole cross-entropy) when no teacher is read.
    fn loss_weights(&self, distilling: bool) -> Vec<f32> {
        match distilling {
            true => self.teacher_weights(),
            false => vec![1.0],
        }
    }

    /// Whether a step needs the teachers' outputs: not for the hard-label baseline of a
    /// distillation run (alpha = 0 and no hidden-state term), whose teacher forwards would cost
    /// most of the step and change nothing.
    fn reads_teacher(&self) -> bool {
        self.cfg.distill.as_ref().is_some_and(|d| {
            d.alpha != 0.0 || (d.hidden_weight != 0.0 && !d.hidden_layers.is_empty())
        })
    }

    /// The teachers' weights in the soft loss, normalized to sum to 1 (equal when not given).
    fn teacher_weights(&self) -> Vec<f32> {
        let n = self.teachers.len().max(self.caches.len()).max(1);
        let given = self.cfg.distill.as_ref().map(|d| &d.teacher_weights);
        match given {
            Some(w) if w.len() == n => {
                let total: f32 = w.iter().sum();
                w.iter().map(|x| x / total).collect()
            }
            _ => vec![1.0 / n as f32; n],
        }
    }

    /// Teacher forwards (no gradient), student forward, fused loss, student backward into
    /// `self.grads`. Returns the loss. With several teachers (live or cached) the loss is one
    /// call per teacher: the first writes the logit gradient and the others add to it
    /// ([`LossConfig::accumulate`]), each scaled by its weight; with weights summing to 1 the
    /// cross-entropy that every call includes keeps its share `1 - alpha`.
    fn forward_backward(
        &mut self,
        inputs: &[u32],
        cached: &[crate::train::teacher_cache::CachedBatch],
    ) -> Result<f32> {
        let distilling = self.reads_teacher();
        let loss_cfg = self.loss_config();
        let weights = self.loss_weights(distilling);
        let (n, v) = (self.labels.len(), self.model.config().vocab_size);
        let (params, proj_params) = self.params.split_at(self.n_model);
        let (grads, proj_grads) = self.grads.split_at_mut(self.n_model);

        if distilling {
            for (t, acts) in &mut self.teachers {
                t.model.forward(&t.params, inputs, acts)?;
            }
        }
        self.model.forward(params, inputs, &mut self.acts)?;
        let logits = self.acts.logits();

        // Hidden states: every pair's (projected) student state and teacher state side by side
        // in one row, so one fused call averages the pairs' MSEs.
        let hidden = match (self.teachers.first(), self.pairs.is_empty() || !distilling) {
            (Some((t, t_acts)), false) => Some(HiddenBatch::gather(
                &self.pairs,
                &self.acts,
                t_acts,
                proj_params,
                self.n_model,
                self.model.config().hidden_size,
                t.model.config().hidden_size,
            )),
            _ => None,
        };
        let mut dhidden_cat = hidden.as_ref().map(|h| vec![0.0f32; h.student.len()]);
        let calls = match distilling {
            true => self.teachers.len().max(cached.len()).max(1),
            false => 1,
        };
        // Each cache's tail bucket at this step's temperature.
        let tails = cached
            .iter()
            .map(|b| b.tail_at(loss_cfg.temperature))
            .collect::<Result<Vec<_>>>()?;
        let mut loss = 0.0f32;
        for (i, &w) in weights.iter().enumerate().take(calls) {
            let cfg = LossConfig {
                grad_scale: w,
                accumulate: i > 0,
                hidden_weight: if i == 0 { loss_cfg.hidden_weight } else { 0.0 },
                ..loss_cfg
            };
            let value = match (cached.get(i), distilling) {
                (Some(b), true) => Cpu.distill_loss_topk(
                    &cfg,
                    &TopKInputs {
                        rows: n,
                        vocab: v,
                        student: logits.into(),
                        teacher: b.teacher(&tails[i]),
                        labels: Some(&self.labels),
                    },
                    Some(HostSliceMut::F32(&mut self.dlogits)),
                )?,
                _ => {
                    let teacher_logits = match (self.teachers.get(i), distilling) {
                        (Some((_, acts)), true) => acts.logits(),
                        _ => logits, // alpha = 0: the teacher is never read
                    };
                    Cpu.distill_loss(
                        &cfg,
                        &DistillInputs {
                            rows: n,
                            vocab: v,
                            student: logits.into(),
                            teacher: teacher_logits.into(),
                            labels: Some(&self.labels),
                            hidden: hidden.as_ref().filter(|_| i == 0).map(|h| HiddenInputs {
                                size: h.width,
                                student: h.student[..].into(),
                                teacher: h.teacher[..].into(),
                            }),
                        },
                        GradOutputs {
                            logits: Some(HostSliceMut::F32(&mut self.dlogits)),
                            hidden: match i {
                                0 => dhidden_cat.as_mut().map(|g| HostSliceMut::F32(g)),
                                _ => None,
                            },
                        },
                    )?
                }
            };
            loss += w * value.total();
        }

        let dstates = match (&hidden, &dhidden_cat) {
            (Some(h), Some(dcat)) => h.scatter_grad(
                &self.pairs,
                &self.acts,
                proj_params,
                proj_grads,
                self.n_model,
                dcat,
            ),
            _ => Vec::new(),
        };
        let dhidden: Vec<(HiddenPoint, &[f32])> = self
            .pairs
            .iter()
            .zip(&dstates)
            .map(|(p, g)| (p.student, &g[..]))
            .collect();
        self.model.backward_with_hidden(
            params,
            &mut self.acts,
            Some(&self.dlogits),
            &dhidden,
            grads,
        )?;
        Ok(loss)
    }

    /// Mean cross-entropy (nats per token) of the model on validation windows, at most
    /// `eval_windows` of them (evenly spread) when that option is set.
    pub fn evaluate(&mut self, windows: &[(Vec<u32>, Vec<u32>)]) -> Result<f64> {
        let picked = pick_windows(windows, self.cfg.eval_windows);
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            let (batch, seq) = (self.acts.batch(), self.acts.seq());
            let loss = d.evaluate(&self.model, &picked, batch, seq)?;
            self.history.val.push((self.step, loss));
            return Ok(loss);
        }
        let params = &self.params[..self.n_model];
        let loss = eval_loss(&self.model, params, &picked, &mut self.acts)?;
        self.history.val.push((self.step, loss));
        Ok(loss)
    }

    /// Writes a checkpoint (each file atomically, the trainer state last: a crash mid-save
    /// leaves at worst weights newer than the state, which resuming detects by the step).
    /// `tokenizer_json` (as `tokenizer.json`) and then `extra_files` (see
    /// [`Checkpoint::extra_files`]) are written beside `config.json`.
    pub fn save(
        &self,
        dir: &Path,
        tokenizer_json: &[u8],
        extra_files: &[(&str, &[u8])],
        extras: &ConfigExtras,
        meta: Value,
    ) -> Result<()> {
        let (ct, cs) = self.proj_shape();
        let extra = self
            .pairs
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let at = p.proj?;
                let data = self.params[at..at + ct * cs].to_vec();
                Some((format!("distill.hidden_proj.{i}"), vec![ct, cs], data))
            })
            .collect();
        let state = TrainerState {
            step: self.step,
            adam_m: self.adam.m.clone(),
            adam_v: self.adam.v.clone(),
            extra,
            meta: json!({
                "train_config": self.cfg.to_json(),
                "history": self.history.to_json(),
                "run": meta,
            }),
        };
        checkpoint::save_checkpoint(
            dir,
            &Checkpoint {
                model: &self.model,
                params: self.params(),
                step: self.step,
                config_extras: *extras,
                tokenizer_json: Some(tokenizer_json),
                extra_files,
                trainer_state: Some(&state),
            },
        )
    }

    fn proj_shape(&self) -> (usize, usize) {
        let cs = self.model.config().hidden_size;
        let ct = self
            .teachers
            .first()
            .map_or(cs, |(t, _)| t.model.config().hidden_size);
        (ct, cs)
    }

    /// Continues the run saved in `dir`: same model configuration and training options (else an
    /// error naming the difference), weights, projections, optimizer moments, step and history.
    /// Returns the run metadata that was passed to [`Trainer::save`].
    pub fn resume(&mut self, dir: &Path) -> Result<Value> {
        let ckpt_err = |file: &str, message: String| Error::Checkpoint {
            path: dir.join(file).display().to_string(),
            message,
        };
        let mismatch = |file: &str, message: String| Error::ResumeMismatch {
            path: dir.join(file).display().to_string(),
            message,
        };
        let cfg = checkpoint::load_config(&dir.join("config.json"))?;
        if &cfg != self.model.config() {
            return Err(mismatch(
                "config.json",
                "the saved model configuration differs from this run's".into(),
            ));
        }
        let (weights, state) = checkpoint::load_resume(dir, &self.model)?;
        let saved_cfg = state
            .meta
            .get("train_config")
            .cloned()
            .unwrap_or(Value::Null);
        if saved_cfg != self.cfg.to_json() {
            return Err(mismatch(
                "trainer_state.safetensors",
                format!(
                    "was written with other training options ({}); resume with the same options",
                    json_diff(&saved_cfg, &self.cfg.to_json())
                ),
            ));
        }
        if state.adam_m.len() != self.params.len() || state.adam_v.len() != self.params.len() {
            return Err(mismatch(
                "trainer_state.safetensors",
                format!(
                    "optimizer state has {} values, this run has {} parameters",
                    state.adam_m.len(),
                    self.params.len()
                ),
            ));
        }
        self.params[..self.n_model].copy_from_slice(&weights);
        let (ct, cs) = self.proj_shape();
        for (i, p) in self.pairs.iter().enumerate() {
            let Some(at) = p.proj else { continue };
            let name = format!("distill.hidden_proj.{i}");
            let found = state.extra.iter().find(|(n, _, _)| *n == name);
            match found {
                Some((_, shape, data)) if shape == &[ct, cs] && data.len() == ct * cs => {
                    self.params[at..at + ct * cs].copy_from_slice(data)
                }
                _ => {
                    return Err(ckpt_err(
                        "trainer_state.safetensors",
                        format!("lacks tensor {name} [{ct}, {cs}]"),
                    ))
                }
            }
        }
        self.adam.m = state.adam_m;
        self.adam.v = state.adam_v;
        self.adam.step = state.step;
        self.step = state.step;
        #[cfg(feature = "cuda")]
        if let Some(d) = &mut self.device {
            d.upload(&self.params, &self.adam)?;
        }
        self.history = state
            .meta
            .get("history")
            .and_then(History::from_json)
            .ok_or_else(|| ckpt_err("trainer_state.safetensors", "has no loss history".into()))?;
        Ok(state.meta.get("run").cloned().unwrap_or(Value::Null))
    }
}

/// A training failure at step `step + 1` when `value` is not finite.
fn check_finite(step: u64, what: &str, value: f32) -> Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    Err(Error::Training {
        step: step + 1,
        message: format!("the {what} is {value}"),
    })
}

/// The keys whose values differ between two JSON objects, as `key: saved -> now`.
fn json_diff(saved: &Value, now: &Value) -> String {
    let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) else {
        return "no saved options".into();
    };
    let mut diffs: Vec<String> = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {} -> {v}", a.get(k).unwrap_or(&Value::Null)))
        .collect();
    diffs.sort();
    diffs.join(", ")
}

/// Up to `max` windows spread evenly over all of them (all when `max` is 0).
fn pick_windows(windows: &[(Vec<u32>, Vec<u32>)], max: usize) -> Vec<&(Vec<u32>, Vec<u32>)> {
    if max == 0 || windows.len() <= max {
        return windows.iter().collect();
    }
    (0..max)
        .map(|i| &windows[i * windows.len() / max])
        .collect()
}

/// The evaluation windows of one batch as model inputs and labels, `[windows * seq]` each; an
/// error when a window does not hold `seq` tokens. Shared by the CPU and device evaluations.
pub(crate) fn window_batch(
    group: &[&(Vec<u32>, Vec<u32>)],
    seq: usize,
) -> Result<(Vec<u32>, Vec<i64>)> {
    let inputs: Vec<u32> = group.iter().flat_map(|w| w.0.iter().copied()).collect();
    let labels: Vec<i64> = group
        .iter()
        .flat_map(|w| w.1.iter().map(|&t| t as i64))
        .collect();
    if inputs.len() != group.len() * seq || labels.len() != inputs.len() {
        return Err(Error::Data(format!(
            "validation windows must hold {seq} tokens each"
        )));
    }
    Ok((inputs, labels))
}

/// Rows of logits made at once by an evaluation pass: 256 x 49152 f32 is 48 MiB.
const EVAL_LOGIT_ROWS: usize = 256;

/// Mean next-token cross-entropy over `windows` (each `seq` inputs and `seq` targets), in
/// batches of the activations' batch size (a smaller last batch gets its own buffers). With
/// [`Activations::evaluation`] buffers the logits are made 256 rows at a time.
pub fn eval_loss(
    model: &Llama,
    params: &[f32],
    windows: &[&(Vec<u32>, Vec<u32>)],
    acts: &mut Activations<f32>,
) -> Result<f64> {
    if windows.is_empty() {
        return Err(Error::Data(
            "no validation windows: the validation split is shorter than one sequence".into(),
        ));
    }
    let (batch, seq) = (acts.batch(), acts.seq());
    let v = model.config().vocab_size;
    let cfg = LossConfig {
        alpha: 0.0,
        reduction: Reduction::Sum,
        ..LossConfig::default()
    };
    let (mut total, mut count) = (0.0f64, 0usize);
    for group in windows.chunks(batch) {
        let (inputs, labels) = window_batch(group, seq)?;
        let mut small;
        let acts = if group.len() == batch {
            &mut *acts
        } else {
            small = match acts.pass() {
                Pass::Evaluation => Activations::evaluation(model, group.len(), seq)?,
                _ => Activations::inference(model, group.len(), seq)?,
            };
            &mut small
        };
        let hard_ce = |logits: &[f32], labels: &[i64]| -> Result<f64> {
            let loss = Cpu.distill_loss(
                &cfg,
                &DistillInputs {
                    rows: labels.len(),
                    vocab: v,
                    student: logits.into(),
                    teacher: logits.into(),
                    labels: Some(labels),
                    hidden: None,
                },
                GradOutputs::default(),
            )?;
            Ok(loss.total() as f64)
        };
        if acts.pass() == Pass::Evaluation {
            model.forward(params, &inputs, acts)?;
            let mut chunk = memory::filled(EVAL_LOGIT_ROWS.min(labels.len()) * v, 0.0, "logits")?;
            for start in (0..labels.len()).step_by(EVAL_LOGIT_ROWS) {
                let end = (start + EVAL_LOGIT_ROWS).min(labels.len());
                let out = &mut chunk[..(end - start) * v];
                model.logits_rows(params, acts, start..end, out)?;
                total += hard_ce(out, &labels[start..end])?;
            }
        } else {
            total += hard_ce(model.forward(params, &inputs, acts)?, &labels)?;
        }
        count += labels.len();
    }
    Ok(total / count as f64)
}

/// Projections start as `normal(0, 1/sqrt(C_student))` (variance-preserving), seeded like the
/// model's tensors on streams past the layout's.
fn init_projections(
    model: &Llama,
    teacher: Option<&Teacher>,
    n_proj: usize,
    seed: u64,
) -> Vec<f32> {
    let Some(t) = teacher else { return Vec::new() };
    let cs = model.config().hidden_size;
    let ct = t.model.config().hidden_size;
    let first_stream = model.layout().tensors().len() as u64;
    let mut out = vec![0.0f32; n_proj]; // counted in plan_memory
    for (k, chunk) in out.chunks_mut(ct * cs).enumerate() {
        normal_fill(
            chunk,
            1.0 / (cs as f64).sqrt(),
            seed,
            first_stream + k as u64,
        );
    }
    out
}

/// The hidden states of one step, every pair side by side: `[N, pairs * C_teacher]`.
struct HiddenBatch {
    width: usize,
    student: Vec<f32>,
    teacher: Vec<f32>,
    ct: usize,
    cs: usize,
}

impl HiddenBatch {
    fn gather(
        pairs: &[HiddenPair],
        s_acts: &Activations<f32>,
        t_acts: &Activations<f32>,
        proj_params: &[f32],
        n_model: usize,
        cs: usize,
        ct: usize,
    ) -> HiddenBatch {
        let n = s_acts.batch() * s_acts.seq();
        let width = pairs.len() * ct;
        let mut student = vec![0.0f32; n * width];
        let mut teacher = vec![0.0f32; n * width];
        let mut projected = vec![0.0f32; n * ct];
        for (k, p) in pairs.iter().enumerate() {
            let hs = s_acts.hidden(p.student).expect("pairs are checked");
            let ht = t_acts.hidden(p.teacher).expect("pairs are checked");
            let hs = match p.proj {
                Some(at) => {
                    let w = &proj_params[at - n_model..at - n_model + ct * cs];
                    ops::matmul_forward(&mut projected, hs, w, cs, ct);
                    &projected[..]
                }
                None => hs,
            };
            for row in 0..n {
                let dst = row * width + k * ct;
                student[dst..dst + ct].copy_from_slice(&hs[row * ct..(row + 1) * ct]);
                teacher[dst..dst + ct].copy_from_slice(&ht[row * ct..(row + 1) * ct]);
            }
        }
        HiddenBatch {
            width,
            student,
            teacher,
            ct,
            cs,
        }
    }

    /// From the gradient of the side-by-side projected states to each pair's gradient with
    /// respect to the student's hidden state (accumulating the projections' gradients).
    fn scatter_grad(
        &self,
        pairs: &[HiddenPair],
        s_acts: &Activations<f32>,
        proj_params: &[f32],
        proj_grads: &mut [f32],
        n_model: usize,
        dcat: &[f32],
    ) -> Vec<Vec<f32>> {
        let (ct, cs, width) = (self.ct, self.cs, self.width);
        let n = dcat.len() / width;
        let mut dproj = vec![0.0f32; n * ct];
        pairs
            .iter()
            .enumerate()
            .map(|(k, p)| {
                for row in 0..n {
                    let src = row * width + k * ct;
                    dproj[row * ct..(row + 1) * ct].copy_from_slice(&dcat[src..src + ct]);
                }
                match p.proj {
                    Some(at) => {
                        let hs = s_acts.hidden(p.student).expect("pairs are checked");
                        let range = at - n_model..at - n_model + ct * cs;
                        let mut dhs = vec![0.0f32; n * cs];
                        ops::matmul_backward(
                            &mut dhs,
                            &mut proj_grads[range.clone()],
                            &dproj,
                            hs,
                            &proj_params[range],
                            cs,
                            ct,
                        );
                        dhs
                    }
                    None => dproj.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::semantics::LossKind;
    use crate::train::config::DistillConfig;

    fn tiny(vocab: usize, width: usize, heads: usize, kv: usize) -> LlamaConfig {
        LlamaConfig {
            vocab_size: vocab,
            hidden_size: width,
            intermediate_size: 2 * width,
            num_hidden_layers: 2,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            max_position_embeddings: 8,
            initializer_range: 0.3,
            tie_word_embeddings: false,
            ..LlamaConfig::default()
        }
    }

    /// A wider random teacher (width 12 against the students' 8: projections are needed).
    fn teacher(vocab: usize) -> Teacher {
        let model = Llama::new(tiny(vocab, 12, 2, 2)).unwrap();
        Teacher {
            params: model.init_params(5),
            model,
        }
    }

    /// The loss and its gradient in `tr.grads` for one fixed batch.
    fn loss_at(tr: &mut Trainer, inputs: &[u32], targets: &[u32]) -> f64 {
        for (l, &t) in tr.labels.iter_mut().zip(targets) {
            *l = t as i64;
        }
        tr.grads.fill(0.0);
        tr.forward_backward(inputs, &[]).unwrap() as f64
    }

    /// At alpha = 0 a distillation run is the hard-label run, whatever its teachers and their
    /// weights: the same loss and gradient bit for bit (the teachers are not run, and the
    /// cross-entropy keeps its full weight rather than the first teacher's share).
    #[test]
    fn alpha_zero_is_the_hard_label_run() {
        let inputs: Vec<u32> = (0..12).map(|i| (i * 5 % 13) as u32).collect();
        let targets: Vec<u32> = (0..12).map(|i| (i * 7 % 13) as u32).collect();
        let base = TrainConfig {
            batch: 2,
            seq: 6,
            ..TrainConfig::default()
        };
        let mut hard = Trainer::new(base.clone(), tiny(13, 8, 2, 1), None).unwrap();
        let want = loss_at(&mut hard, &inputs, &targets);
        for weights in [vec![], vec![0.3, 0.7]] {
            let cfg = TrainConfig {
                distill: Some(DistillConfig {
                    alpha: 0.0,
                    teacher_weights: weights.clone(),
                    ..DistillConfig::default()
                }),
                ..base.clone()
            };
            let teachers = vec![teacher(13), teacher(13)];
            let mut tr = Trainer::with_teachers(cfg, tiny(13, 8, 2, 1), teachers).unwrap();
            assert!(!tr.reads_teacher());
            assert_eq!(loss_at(&mut tr, &inputs, &targets), want, "{weights:?}");
            assert_eq!(tr.grads[..tr.n_model], hard.grads[..hard.n_model]);
        }
    }

    /// A weighted ensemble is the weighted sum of its teachers' losses: two different teachers
    /// weighted 0.7 / 0.3 give 0.7 * (loss, gradient with the first alone) + 0.3 * (with the
    /// second alone), the cross-entropy counted once; unnormalized weights 7 / 3 mean the same.
    #[test]
    fn an_ensemble_is_the_weighted_sum_of_its_teachers() {
        let cfg = |weights: Vec<f32>| TrainConfig {
            batch: 2,
            seq: 6,
            distill: Some(DistillConfig {
                kind: LossKind::ReverseKl,
                temperature: 2.0,
                alpha: 0.6,
                teacher_weights: weights,
                ..DistillConfig::default()
            }),
            ..TrainConfig::default()
        };
        let other = || {
            let model = Llama::new(tiny(13, 8, 2, 1)).unwrap();
            Teacher {
                params: model.init_params(9),
                model,
            }
        };
        let inputs: Vec<u32> = (0..12).map(|i| (i * 5 % 13) as u32).collect();
        let targets: Vec<u32> = (0..12).map(|i| (i * 7 % 13) as u32).collect();
        let run = |teachers: Vec<Teacher>, weights: Vec<f32>| {
            let mut tr = Trainer::with_teachers(cfg(weights), tiny(13, 8, 2, 1), teachers).unwrap();
            let loss = loss_at(&mut tr, &inputs, &targets);
            (loss, tr.grads.clone())
        };
        let (la, ga) = run(vec![teacher(13)], vec![]);
        let (lb, gb) = run(vec![other()], vec![]);
        for weights in [vec![0.7, 0.3], vec![7.0, 3.0]] {
            let (l, g) = run(vec![teacher(13), other()], weights);
            let want = 0.7 * la + 0.3 * lb;
            assert!((l - want).abs() < 1e-5 * want, "{l} vs {want}");
            let scale = ga.iter().fold(0f32, |m, x| m.max(x.abs()));
            for ((x, a), b) in g.iter().zip(&ga).zip(&gb) {
                let want = 0.7 * a + 0.3 * b;
                assert!((x - want).abs() < 1e-5 * scale, "{x} vs {want}");
            }
        }
        // One weight per teacher, and hidden-state pairs only with one teacher.
        let e = Trainer::with_teachers(
            cfg(vec![1.0]),
            tiny(13, 8, 2, 1),
            vec![teacher(13), other()],
        );
        assert!(e
            .err()
            .unwrap()
            .to_string()
            .contains("one weight per teacher"));
    }

    /// Central differences of the whole distillation loss (soft + hard + hidden MSE through the
    /// projections) against the gradient the trainer applies, at the entries with the largest
    /// gradient: one in the projections, one in the student's model.
    #[test]
    fn distillation_gradient_matches_finite_differences() {
        let cfg = TrainConfig {
            batch: 2,
            seq: 6,
            distill: Some(DistillConfig {
                kind: LossKind::ReverseKl,
                temperature: 2.0,
                alpha: 0.6,
                hidden_weight: 0.7,
                hidden_layers: vec![(1, 1), (2, 2)],
                ..DistillConfig::default()
            }),
            ..TrainConfig::default()
        };
        let mut tr = Trainer::new(cfg, tiny(13, 8, 2, 1), Some(teacher(13))).unwrap();
        assert_eq!(tr.pairs.iter().filter(|p| p.proj.is_some()).count(), 2);
        let tokens: Vec<u32> = (0..40u32).map(|i| (i * 7 + 3) % 13).collect();
        let stream = TokenStream { tokens, docs: 1 };
        let (inputs, targets) = train_batch(&stream, 1, 0, 2, 6).unwrap();
        loss_at(&mut tr, &inputs, &targets);
        let grads = tr.grads.clone();
        let argmax = |range: std::ops::Range<usize>| {
            range
                .max_by(|&a, &b| grads[a].abs().total_cmp(&grads[b].abs()))
                .unwrap()
        };
        let n_model = tr.n_model;
        for i in [argmax(n_model..grads.len()), argmax(0..n_model)] {
            let h = 1e-2f32;
            let x = tr.params[i];
            tr.params[i] = x + h;
            let up = loss_at(&mut tr, &inputs, &targets);
            tr.params[i] = x - h;
            let down = loss_at(&mut tr, &inputs, &targets);
            tr.params[i] = x;
            let fd = (up - down) / (2.0 * h as f64);
            let g = grads[i] as f64;
            assert!(g.abs() > 1e-3, "param {i}: gradient {g} too small to test");
            assert!(
                (fd - g).abs() <= 2e-3 + 2e-2 * g.abs(),
                "param {i}: finite difference {fd} vs gradient {g}"
            );
        }
    }

    #[test]
    fn a_teacher_with_another_vocabulary_is_refused() {
        let cfg = TrainConfig {
            batch: 2,
            seq: 6,
            distill: Some(DistillConfig::default()),
            ..TrainConfig::default()
        };
        let e = Trainer::new(cfg, tiny(13, 8, 2, 1), Some(teacher(14)))
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("vocabulary"), "{e}");
    }
}
