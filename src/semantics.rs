//! The loss contract (DESIGN section 4), in one place: options, their validation, the derived
//! weights every backend uses, and the shape checks of the inputs. Backends only execute.

use crate::dtype::{HostSlice, HostSliceMut};
use crate::error::{Error, Result};

/// Which divergence between teacher and student distributions is the soft loss. With the
/// `serde` feature it reads and writes as `{"type": "forward-kl"}`, `{"type": "reverse-kl"}` or
/// `{"type": "jsd", "beta": 0.5}`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "type", rename_all = "kebab-case"))]
pub enum LossKind {
    /// `sum p_t (log p_t - log p_s)`
    ForwardKl,
    /// `sum p_s (log p_s - log p_t)`
    ReverseKl,
    /// `beta KL(p_t || m) + (1 - beta) KL(p_s || m)`, `m = beta p_t + (1 - beta) p_s`, `0 < beta < 1`.
    Jsd {
        /// The teacher's weight in the mixture `m`.
        beta: f32,
    },
}

impl LossKind {
    /// The ABI code (`DK_KIND_*` in kernels/abi.h).
    pub fn code(self) -> i32 {
        match self {
            LossKind::ForwardKl => crate::abi::DK_KIND_FORWARD_KL as i32,
            LossKind::ReverseKl => crate::abi::DK_KIND_REVERSE_KL as i32,
            LossKind::Jsd { .. } => crate::abi::DK_KIND_JSD as i32,
        }
    }

    /// The command-line name: `forward-kl`, `reverse-kl` or `jsd`.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::ForwardKl => "forward-kl",
            LossKind::ReverseKl => "reverse-kl",
            LossKind::Jsd { .. } => "jsd",
        }
    }

    /// JSD's `beta`; 0 for the KL kinds.
    pub fn beta(self) -> f32 {
        match self {
            LossKind::Jsd { beta } => beta,
            _ => 0.0,
        }
    }
}

/// How row losses become the returned loss (`"none"`, `"sum"`, `"mean"` with `serde`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Reduction {
    /// One loss per row (0 for ignored rows); the gradient is that of their sum.
    None,
    /// The sum of the row losses.
    Sum,
    /// Sum divided by D: the number of valid rows, or the explicit normalizer.
    Mean,
}

impl Reduction {
    /// The ABI code (`DK_REDUCTION_*` in kernels/abi.h).
    pub fn code(self) -> i32 {
        match self {
            Reduction::None => crate::abi::DK_REDUCTION_NONE as i32,
            Reduction::Sum => crate::abi::DK_REDUCTION_SUM as i32,
            Reduction::Mean => crate::abi::DK_REDUCTION_MEAN as i32,
        }
    }
}

/// Every option of the fused distillation loss. `Default` is the documented default (and the one
/// place defaults are written): forward KL, T = 1, alpha = 1, T^2 scaling on, ignore_index -100,
/// mean, no hidden loss.
///
/// Build one with [`LossConfig::builder`] (validated), or start from `LossConfig::default()` and
/// set fields; every loss call validates its configuration again. New options may be added, so
/// the struct cannot be written as a literal outside the crate. With the `serde` feature it
/// (de)serializes with the field names below; missing fields take their defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct LossConfig {
    /// The soft loss: forward KL, reverse KL or JSD.
    pub kind: LossKind,
    /// Softmax temperature T of both distributions in the soft loss (the hard loss uses T = 1).
    pub temperature: f32,
    /// Weight of the soft loss; the hard-label cross-entropy gets `1 - alpha`.
    pub alpha: f32,
    /// Multiply the soft loss by T^2 (Hinton et al.) so its gradient scale does not shrink with T.
    pub t2_scale: bool,
    /// Rows whose label equals this take no part in the loss and get a zero gradient.
    pub ignore_index: i64,
    /// How the row losses are combined.
    pub reduction: Reduction,
    /// Explicit D for `Mean` (gradient accumulation across micro-batches). `None`: valid rows.
    pub normalizer: Option<f32>,
    /// Multiplies every gradient (the upstream gradient of the reduced loss).
    pub grad_scale: f32,
    /// Weight of the hidden-state MSE; used when hidden states are given.
    pub hidden_weight: f32,
    /// Add the student-logit gradient into the gradient buffer instead of overwriting it, so
    /// that several teachers accumulate into one buffer: one call per teacher, `grad_scale`
    /// its weight (multi-teacher distillation). Rows labelled `ignore_index` are left as they
    /// are; a hidden-state gradient is still overwritten. Refused with an in-place gradient
    /// (which would add to the logits).
    pub accumulate: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            kind: LossKind::ForwardKl,
            temperature: 1.0,
            alpha: 1.0,
            t2_scale: true,
            ignore_index: -100,
            reduction: Reduction::Mean,
            normalizer: None,
            grad_scale: 1.0,
            hidden_weight: 0.0,
            accumulate: false,
        }
    }
}

/// Builds a [`LossConfig`] from the defaults, checking it in [`LossConfigBuilder::build`]:
///
/// ```
/// use distill_kernels::{LossConfig, LossKind};
/// let cfg = LossConfig::builder()
///     .kind(LossKind::Jsd { beta: 0.5 })
///     .temperature(2.0)
///     .alpha(0.7)
///     .build()?;
/// assert_eq!(cfg.hard_weight(), 1.0 - 0.7);
/// # Ok::<(), distill_kernels::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossConfigBuilder {
    cfg: LossConfig,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $t:ty),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $t) -> Self {
            self.cfg.$name = value;
            self
        }
    )*};
}

impl LossConfigBuilder {
    setters! {
        /// See [`LossConfig::kind`].
        kind: LossKind,
        /// See [`LossConfig::temperature`].
        temperature: f32,
        /// See [`LossConfig::alpha`].
        alpha: f32,
        /// See [`LossConfig::t2_scale`].
        t2_scale: bool,
        /// See [`LossConfig::ignore_index`].
        ignore_index: i64,
        /// See [`LossConfig::reduction`].
        reduction: Reduction,
        /// See [`LossConfig::normalizer`].
        normalizer: Option<f32>,
        /// See [`LossConfig::grad_scale`].
        grad_scale: f32,
        /// See [`LossConfig::hidden_weight`].
        hidden_weight: f32,
        /// See [`LossConfig::accumulate`].
        accumulate: bool,
    }

    /// The configuration, or [`Error::InvalidOption`] naming the first option out of range.
    pub fn build(self) -> Result<LossConfig> {
        self.cfg.validate()?;
        Ok(self.cfg)
    }
}

fn invalid(name: &'static str, value: impl ToString, reason: &'static str) -> Error {
    Error::InvalidOption {
        name,
        value: value.to_string(),
        reason,
    }
}

impl LossConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> LossConfigBuilder {
        LossConfigBuilder::default()
    }

    /// A builder starting from this configuration (to derive a variant of it).
    pub fn to_builder(self) -> LossConfigBuilder {
        LossConfigBuilder { cfg: self }
    }

    /// Checks every option on its own (shapes are checked by every loss call).
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(invalid("temperature", t, "must be finite and > 0"));
        }
        // 1/T and T^2 (the soft-loss scale) must be normal f32 numbers, or the soft loss would
        // silently vanish or overflow.
        if !((1.0 / t).is_normal() && (t * t).is_normal()) {
            return Err(invalid(
                "temperature",
                t,
                "is outside the f32 range where 1/T and T^2 are representable",
            ));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(invalid("alpha", self.alpha, "must be in [0, 1]"));
        }
        if let LossKind::Jsd { beta } = self.kind {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(invalid("beta", beta, "must be in (0, 1)"));
            }
        }
        if let Some(d) = self.normalizer {
            if !(d.is_finite() && d > 0.0) {
                return Err(invalid("normalizer", d, "must be finite and > 0"));
            }
        }
        if !self.grad_scale.is_finite() {
            return Err(invalid("grad_scale", self.grad_scale, "must be finite"));
        }
        if !(self.hidden_weight.is_finite() && self.hidden_weight >= 0.0) {
            return Err(invalid(
                "hidden_weight",
                self.hidden_weight,
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }

    /// Weight of the soft loss per row: alpha, times T^2 when scaling is on.
    pub fn soft_weight(&self) -> f32 {
        let t2 = if self.t2_scale {
            self.temperature * self.temperature
        } else {
            1.0
        };
        self.alpha * t2
    }

    /// Weight of the hard-label cross-entropy per row.
    pub fn hard_weight(&self) -> f32 {
        1.0 - self.alpha
    }

    /// Whether the hard-label term takes part (and labels are therefore required).
    pub fn needs_labels(&self) -> bool {
        self.alpha < 1.0
    }

    /// Whether row `label` takes part in the loss.
    pub fn row_is_valid(&self, label: Option<i64>) -> bool {
        match label {
            None => true,
            Some(y) => y != self.ignore_index,
        }
    }

    /// D for `Mean` given the number of valid rows; `Sum` and `None` use 1.
    pub fn normalizer_for(&self, valid_rows: usize) -> f64 {
        match self.reduction {
            Reduction::Mean => match self.normalizer {
                Some(d) => d as f64,
                None => valid_rows as f64,
            },
            _ => 1.0,
        }
    }

    /// (scale of the reduced loss, scale of every gradient). D = 0 gives (0, 0): loss 0,
    /// gradient 0, never NaN.
    pub fn scales(&self, valid_rows: usize) -> (f64, f64) {
        let d = self.normalizer_for(valid_rows);
        if d == 0.0 {
            (0.0, 0.0)
        } else {
            (1.0 / d, self.grad_scale as f64 / d)
        }
    }
}

/// Optional hidden states for the MSE term: `[rows, size]` each.
#[derive(Debug, Clone, Copy)]
pub struct HiddenInputs<'a> {
    /// Hidden size: elements per row.
    pub size: usize,
    /// `[rows, size]` student hidden states (the gradient is taken with respect to these).
    pub student: HostSlice<'a>,
    /// `[rows, size]` teacher hidden states; the dtype may differ from the student's.
    pub teacher: HostSlice<'a>,
}

/// The inputs of one loss evaluation on the host, row-major `[rows, vocab]`.
#[derive(Debug, Clone, Copy)]
pub struct DistillInputs<'a> {
    /// Rows (token positions).
    pub rows: usize,
    /// Vocabulary size V: entries per row.
    pub vocab: usize,
    /// `[rows, vocab]` student logits.
    pub student: HostSlice<'a>,
    /// `[rows, vocab]` teacher logits; the dtype may differ from the student's.
    pub teacher: HostSlice<'a>,
    /// `[rows]` labels: rows labelled `ignore_index` are skipped, the others must be in
    /// `[0, vocab)` and are the hard loss's targets. Required when `alpha < 1`.
    pub labels: Option<&'a [i64]>,
    /// Hidden states for the MSE term (weight `hidden_weight`), if any.
    pub hidden: Option<HiddenInputs<'a>>,
}

/// Where gradients go. `None` computes the loss only.
#[derive(Debug, Default)]
pub struct GradOutputs<'a> {
    /// `[rows, vocab]`, f32 or the student's dtype.
    pub logits: Option<HostSliceMut<'a>>,
    /// `[rows, hidden]`, f32 or the student hidden dtype.
    pub hidden: Option<HostSliceMut<'a>>,
}

/// The reduced loss: one value for `Sum`/`Mean`, one per row for `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct LossValue {
    /// `[1]` for `Sum`/`Mean`; `[rows]` for `None`, 0 for ignored rows.
    pub values: Vec<f32>,
    /// Rows that took part (label not `ignore_index`; all rows without labels): the D of `Mean`
    /// unless a normalizer was given.
    pub valid_rows: usize,
}

impl LossValue {
    /// The scalar loss (`Sum`/`Mean`), or the sum of the rows (`None`).
    pub fn total(&self) -> f32 {
        self.values.iter().sum()
    }
}

/// Checks that every shape agrees and every label is in range. The one shape check all backends
/// share; returns the number of valid rows.
pub(crate) fn check_inputs(
    cfg: &LossConfig,
    inputs: &DistillInputs,
    grads: &GradOutputs,
) -> Result<usize> {
    cfg.validate()?;
    let DistillInputs { rows, vocab, .. } = *inputs;
    let n = row_elements(rows, vocab)?;
    let shape = format!("[{rows}, {vocab}]");
    check_len("student_logits", inputs.student.len(), n, &shape)?;
    check_len("teacher_logits", inputs.teacher.len(), n, &shape)?;
    check_logit_grad(grads.logits.as_ref(), n, &shape, inputs.student.dtype())?;
    check_label_input(cfg, inputs.labels, rows, vocab)?;
    match (&inputs.hidden, &grads.hidden) {
        (Some(h), g) => check_hidden(rows, h, g.as_ref())?,
        (None, Some(_)) => {
            return Err(Error::Hidden(
                "a hidden-state gradient buffer was given without hidden states".into(),
            ))
        }
        (None, None) => {}
    }
    Ok(valid_rows(cfg, inputs.labels, rows))
}

/// A logit-gradient buffer: `n` elements, f32 or the student's dtype.
fn check_logit_grad(
    grad: Option<&HostSliceMut>,
    n: usize,
    shape: &str,
    student: crate::dtype::Dtype,
) -> Result<()> {
    if let Some(g) = grad {
        check_len("grad_student_logits", g.len(), n, shape)?;
        if g.dtype() != crate::dtype::Dtype::F32 && g.dtype() != student {
            return Err(Error::Gradient(format!(
                "dtype {} must be f32 or the student's dtype {student}",
                g.dtype()
            )));
        }
    }
    Ok(())
}

/// Labels: `[rows]`, each `ignore_index` or in `[0, vocab)`; required when `alpha < 1`.
pub(crate) fn check_label_input(
    cfg: &LossConfig,
    labels: Option<&[i64]>,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    match labels {
        Some(labels) => {
            check_len("labels", labels.len(), rows, &format!("[{rows}]"))?;
            check_labels(cfg, labels, vocab)
        }
        None if cfg.needs_labels() => Err(Error::MissingLabels { alpha: cfg.alpha }),
        None => Ok(()),
    }
}

/// `rows * vocab`: both nonzero, the product representable.
fn row_elements(rows: usize, vocab: usize) -> Result<usize> {
    if rows == 0 {
        return Err(Error::Empty("rows = 0"));
    }
    if vocab == 0 {
        return Err(Error::Empty("vocab = 0"));
    }
    rows.checked_mul(vocab).ok_or_else(|| {
        invalid(
            "rows * vocab",
            format!("{rows} * {vocab}"),
            "overflows usize",
        )
    })
}

/// Shapes and gradient dtype of `[rows, size]` hidden states.
pub(crate) fn check_hidden(
    rows: usize,
    h: &HiddenInputs,
    grad: Option<&HostSliceMut>,
) -> Result<()> {
    if h.size == 0 {
        return Err(Error::Hidden("hidden size is 0".into()));
    }
    let m = rows
        .checked_mul(h.size)
        .ok_or_else(|| Error::Hidden("rows * hidden overflows".into()))?;
    let hshape = format!("[{rows}, {}]", h.size);
    check_len("student_hidden", h.student.len(), m, &hshape)?;
    check_len("teacher_hidden", h.teacher.len(), m, &hshape)?;
    if let Some(g) = grad {
        check_len("grad_student_hidden", g.len(), m, &hshape)?;
        if g.dtype() != crate::dtype::Dtype::F32 && g.dtype() != h.student.dtype() {
            return Err(Error::Gradient(format!(
                "hidden gradient dtype {} must be f32 or the student hidden dtype {}",
                g.dtype(),
                h.student.dtype()
            )));
        }
    }
    Ok(())
}

/// Every label is `ignore_index` or in `[0, vocab)`.
pub(crate) fn check_labels(cfg: &LossConfig, labels: &[i64], vocab: usize) -> Result<()> {
    for (row, &label) in labels.iter().enumerate() {
        if label != cfg.ignore_index && !(0..vocab as i64).contains(&label) {
            return Err(Error::LabelOutOfRange {
                row,
                label,
                vocab,
                ignore_index: cfg.ignore_index,
            });
        }
    }
    Ok(())
}

/// Rows that take part in the loss: all `rows` without labels, else those whose label is not
/// `ignore_index` (labels are not range-checked here).
pub fn valid_rows(cfg: &LossConfig, labels: Option<&[i64]>, rows: usize) -> usize {
    match labels {
        None => rows,
        Some(l) => l.iter().filter(|&&y| cfg.row_is_valid(Some(y))).count(),
    }
}

fn check_len(tensor: &'static str, actual: usize, expected: usize, shape: &str) -> Result<()> {
    if actual != expected {
        return Err(Error::ShapeMismatch {
            tensor,
            expected,
            actual,
            shape: shape.to_string(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The sparse (top-k) teacher.

/// The most entries per row a top-k teacher may keep (the kernels hold a row's ids in shared
/// memory).
pub const MAX_TOP_K: usize = 1024;

/// A teacher known only through its top-k entries per row, as an offline teacher cache stores
/// it: the distribution over k + 1 *buckets*, the k ids and one tail bucket holding the rest of
/// the vocabulary.
///
/// # Semantics
/// Let `l_v = log p_v` be the teacher's log-probabilities at T = 1. At temperature T the teacher's
/// tempered distribution is `p_v^(1/T)` normalised, so its bucket logits at T are
/// `c = (l_(ids[0]) / T, ..., l_(ids[k-1]) / T, tail)` with
/// `tail = log sum_(u not in ids) p_u^(1/T)`, and its bucket distribution is `P = softmax(c)` over
/// the k + 1 buckets. `values` holds the `l` of the ids (the loss divides them by T); `tail` is
/// given *at the call's temperature*: at T = 1 it is the log of the teacher's mass outside the ids,
/// at other temperatures it needs the tail's own probabilities, which an offline cache stores on a
/// grid of temperatures ([`crate::train`]'s teacher cache interpolates between them). With the
/// exact tail at T the bucket masses are exact at every temperature. (Tempering the T = 1 tail as
/// `tail / T` instead would give `(sum p_u)^(1/T)`, less than `sum p_u^(1/T)` for T > 1 and far
/// less for a long tail: `distill bench topk` measures both.) Any constant added to all k + 1
/// logits of a row cancels.
///
/// The student keeps its full softmax at T, `q = softmax(s / T)` over the vocabulary, summed into
/// the same buckets: `Q_i = q[ids[i]]` and `Q_tail = sum_{v not in ids} q_v` (summed over the
/// tail itself, not taken as `1 - sum Q_i`, so a tiny tail keeps its precision). The soft loss is
/// the divergence between the bucket distributions, with the dense loss's conventions
/// (a zero-weight term is 0, a positive weight against a zero probability is `+inf`):
///
/// - forward KL `sum_b P_b (log P_b - log Q_b)`, gradient
///   `d/ds_v = (q_v - [v in ids] P_(i of v) - [v not in ids] P_tail q_v / Q_tail) / T`;
/// - reverse KL `R = sum_b Q_b (log Q_b - log P_b)`, gradient
///   `d/ds_v = q_v (log Q_(b of v) - log P_(b of v) - R) / T` where `b of v` is v's own bucket
///   when v is a top id and the tail otherwise.
///
/// What the buckets cannot see is how the tail's mass is spread inside the tail: the top-k
/// divergence is at most the dense one (the data-processing inequality), equal when the student's
/// tail is proportional to the teacher's. JSD is not defined for a top-k teacher. The hard-label
/// cross-entropy, the weights (alpha, T^2), `ignore_index`, the reductions, the gradient scale and
/// accumulation are those of the dense loss. With k = V - 1 the tail is a single id, the buckets
/// are the whole distribution, and the loss equals the dense loss at every T (its `tail` being that
/// id's `l / T`). k >= V is rejected: with every id kept, use the dense loss.
#[derive(Debug, Clone, Copy)]
pub struct TopKTeacher<'a> {
    /// Entries per row, `1..=MAX_TOP_K` and below the vocabulary size.
    pub k: usize,
    /// `[rows, k]` token ids, each in `[0, vocab)`, distinct within a row (in any order).
    pub ids: &'a [u32],
    /// `[rows, k]` the teacher's log-probabilities at T = 1 of those ids (f32, f16 or bf16).
    pub values: HostSlice<'a>,
    /// `[rows]` the tail bucket's logit at the call's temperature T:
    /// `log sum_(u not in ids) p_u^(1/T)` (at T = 1 the log of the teacher's mass outside `ids`;
    /// `-inf`: none).
    pub tail: &'a [f32],
}

/// The inputs of one top-k loss evaluation on the host: `[rows, vocab]` student logits against
/// a [`TopKTeacher`].
#[derive(Debug, Clone, Copy)]
pub struct TopKInputs<'a> {
    /// Rows (token positions).
    pub rows: usize,
    /// Vocabulary size V: entries per student row.
    pub vocab: usize,
    /// `[rows, vocab]` student logits.
    pub student: HostSlice<'a>,
    /// The teacher's top-k entries and tail per row.
    pub teacher: TopKTeacher<'a>,
    /// `[rows]` labels, as in [`DistillInputs::labels`]; required when `alpha < 1`.
    pub labels: Option<&'a [i64]>,
}

/// The options a top-k teacher accepts: JSD is refused, everything else is the dense loss's.
pub(crate) fn check_topk_config(cfg: &LossConfig) -> Result<()> {
    cfg.validate()?;
    if matches!(cfg.kind, LossKind::Jsd { .. }) {
        return Err(invalid(
            "kind",
            "jsd",
            "is not defined for a top-k teacher (use forward-kl or reverse-kl)",
        ));
    }
    Ok(())
}

/// The shape checks of a top-k call, k's range, and every row's ids (in range, distinct); the
/// labels as in the dense loss. Returns the number of valid rows.
pub(crate) fn check_topk_inputs(
    cfg: &LossConfig,
    inputs: &TopKInputs,
    grad: Option<&HostSliceMut>,
) -> Result<usize> {
    let TopKInputs {
        rows,
        vocab,
        teacher,
        ..
    } = *inputs;
    check_topk_shapes(
        cfg,
        (rows, vocab, teacher.k),
        inputs.student.len(),
        teacher.ids,
        teacher.values.len(),
        teacher.tail.len(),
        inputs.labels,
    )?;
    check_logit_grad(
        grad,
        rows * vocab,
        &format!("[{rows}, {vocab}]"),
        inputs.student.dtype(),
    )?;
    Ok(valid_rows(cfg, inputs.labels, rows))
}

/// The checks of a top-k call that do not depend on the element type (the f64 reference shares
/// them): options, sizes, k, every tensor's length, every row's ids, the labels.
pub(crate) fn check_topk_shapes(
    cfg: &LossConfig,
    (rows, vocab, k): (usize, usize, usize),
    student_len: usize,
    ids: &[u32],
    values_len: usize,
    tail_len: usize,
    labels: Option<&[i64]>,
) -> Result<()> {
    check_topk_config(cfg)?;
    let n = row_elements(rows, vocab)?;
    check_top_k(k, vocab)?;
    check_len(
        "student_logits",
        student_len,
        n,
        &format!("[{rows}, {vocab}]"),
    )?;
    let kshape = format!("[{rows}, {k}]");
    check_len("teacher_topk_ids", ids.len(), rows * k, &kshape)?;
    check_len("teacher_topk_values", values_len, rows * k, &kshape)?;
    check_len("teacher_tail", tail_len, rows, &format!("[{rows}]"))?;
    check_topk_ids(ids, k, vocab)?;
    check_label_input(cfg, labels, rows, vocab)
}

/// `k` in `1..=MAX_TOP_K` and below the vocabulary size.
pub fn check_top_k(k: usize, vocab: usize) -> Result<()> {
    if !(1..=MAX_TOP_K).contains(&k) {
        return Err(invalid("top_k", k, "must be in 1..=1024"));
    }
    if vocab > u32::MAX as usize {
        return Err(invalid(
            "vocab",
            vocab,
            "must be below 2^32 - 1 with a top-k teacher (its ids are u32)",
        ));
    }
    if k >= vocab {
        return Err(Error::InvalidOption {
            name: "top_k",
            value: format!("{k} (vocab {vocab})"),
            reason: "must be below the vocabulary size: with every id kept, use the dense loss",
        });
    }
    Ok(())
}

/// Every row of `[rows, k]` ids is in `[0, vocab)` and free of duplicates; the first offending
/// row is reported (rows labelled `ignore_index` are checked too: the ids are data).
pub fn check_topk_ids(ids: &[u32], k: usize, vocab: usize) -> Result<()> {
    let mut sorted = Vec::with_capacity(k);
    for (row, ids) in ids.chunks_exact(k).enumerate() {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::TopKId {
                row,
                id,
                vocab,
                reason: "is outside the vocabulary",
            });
        }
        sorted.clear();
        sorted.extend_from_slice(ids);
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::TopKId {
                row,
                id: w[0],
                vocab,
                reason: "appears twice in the row",
            });
        }
    }
    Ok(())
}

/// Checks for the standalone softmax kernels.
pub(crate) fn check_softmax(
    rows: usize,
    vocab: usize,
    temperature: f32,
    lens: &[(&'static str, usize)],
) -> Result<()> {
    if rows == 0 {
        return Err(Error::Empty("rows = 0"));
    }
    if vocab == 0 {
        return Err(Error::Empty("vocab = 0"));
    }
    if !(temperature.is_finite() && temperature > 0.0 && (1.0 / temperature).is_finite()) {
        return Err(invalid(
            "temperature",
            temperature,
            "must be finite and > 0",
        ));
    }
    let n = rows.checked_mul(vocab).ok_or_else(|| {
        invalid(
            "rows * vocab",
            format!("{rows} * {vocab}"),
            "overflows usize",
        )
    })?;
    let shape = format!("[{rows}, {vocab}]");
    for &(name, len) in lens {
        check_len(name, len, n, &shape)?;
    }
    Ok(())
}

#[cfg(all(test, feature = "serde", feature = "trainer"))]
mod serde_tests {
    use super::*;

    #[test]
    fn loss_config_round_trips_and_fills_defaults() {
        let cfg = LossConfig::builder()
            .kind(LossKind::Jsd { beta: 0.25 })
            .temperature(2.0)
            .reduction(Reduction::Sum)
            .normalizer(Some(8.0))
            .build()
            .unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(
            json.contains(r#""kind":{"type":"jsd","beta":0.25}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<LossConfig>(&json).unwrap(), cfg);
        // Missing fields take the defaults; unknown ones are an error, not ignored.
        let partial: LossConfig =
            serde_json::from_str(r#"{"kind":{"type":"reverse-kl"},"alpha":0.5}"#).unwrap();
        let want = LossConfig::builder()
            .kind(LossKind::ReverseKl)
            .alpha(0.5)
            .build()
            .unwrap();
        assert_eq!(partial, want);
        assert!(serde_json::from_str::<LossConfig>(r#"{"temprature":2.0}"#).is_err());
    }
}
