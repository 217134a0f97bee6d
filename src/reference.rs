//! The oracle: DESIGN section 4 transcribed into f64, written for obviousness rather than speed.
//!
//! Every quantity is computed the plain way: `a = s / T`, `log p = a - logsumexp(a)` (the
//! log-sum-exp taken about the row maximum), the divergences summed term by term, the gradients
//! written out in closed form. No online softmax, no fusion, no cleverness: this module is what the
//! other backends are checked against, so it must be easy to check by eye.
//!
//! Conventions that the other backends must reproduce:
//! - A divergence term whose weighting probability is exactly 0 (its log-probability is `-inf`)
//!   contributes exactly 0, whatever it is multiplied by (`0 * log 0 = 0`, `0 * (+-inf) = 0`).
//!   A term with a positive weight against a zero probability is `+inf`.
//! - NaN anywhere in a valid row's inputs makes that row's loss NaN. A row whose logits are all
//!   `-inf` has no distribution: its log-probabilities are NaN, and so is its loss.
//! - A loss term whose weight is exactly 0 is skipped entirely, in the loss and in the gradient:
//!   `alpha = 1` never looks at the labels' log-probability, `alpha = 0` never looks at the
//!   teacher, `hidden_weight = 0` never looks at the hidden states. So no NaN or `inf` from a term
//!   that is switched off leaks in through `0 * inf`.
//! - Gradient values in a row whose loss is infinite are unspecified (they may be `inf`, NaN or
//!   finite); the row's loss is `+inf` and the reduced loss says so.
//! - Rows that are not valid (label == `ignore_index`) contribute 0 loss and 0 gradient, whatever
//!   their inputs hold.

use half::{bf16, f16};

use crate::device::{check_same_dtype, DistillDevice};
use crate::dtype::{HostSlice, HostSliceMut};
use crate::error::{Error, Result};
use crate::semantics::{
    check_inputs, check_labels, check_softmax, check_topk_inputs, check_topk_shapes, DistillInputs,
    GradOutputs, LossConfig, LossKind, LossValue, Reduction, TopKInputs,
};

/// The f64 reference backend (`reference`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reference;

/// Everything the reference computes for one loss evaluation, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct RefOutput {
    /// `[rows]`: the combined loss of each row, 0 for invalid rows, not divided by D.
    pub row_loss: Vec<f64>,
    /// `[1]` for `Sum`/`Mean`, `[rows]` for `None`.
    pub loss: Vec<f64>,
    /// `[rows * vocab]`: d(reduced loss)/d(student logits), times `grad_scale`.
    pub grad_logits: Vec<f64>,
    /// `[rows * hidden]` when hidden states were given.
    pub grad_hidden: Option<Vec<f64>>,
    /// Rows that take part: those whose label is not `ignore_index` (all rows without labels).
    pub valid_rows: usize,
}

/// Hidden states in f64, `[rows, size]` each.
#[derive(Debug, Clone, Copy)]
pub struct F64Hidden<'a> {
    /// Hidden size: elements per row.
    pub size: usize,
    /// `[rows, size]` student hidden states (the gradient is taken with respect to these).
    pub student: &'a [f64],
    /// `[rows, size]` teacher hidden states.
    pub teacher: &'a [f64],
}

/// The inputs of [`distill_loss_f64_slices`]: like [`DistillInputs`], but in f64, so that finite
/// differences can perturb them at full f64 precision.
#[derive(Debug, Clone, Copy)]
pub struct F64Inputs<'a> {
    /// Rows (token positions).
    pub rows: usize,
    /// Vocabulary size V: entries per row.
    pub vocab: usize,
    /// `[rows, vocab]` student logits.
    pub student: &'a [f64],
    /// `[rows, vocab]` teacher logits.
    pub teacher: &'a [f64],
    /// `[rows]` labels, each in `[0, vocab)` or `ignore_index`; required when `alpha < 1`.
    pub labels: Option<&'a [i64]>,
    /// Hidden states for the MSE term, if any.
    pub hidden: Option<F64Hidden<'a>>,
}

/// The loss, per-row losses and gradients of DESIGN section 4 in f64. Inputs are validated with
/// the crate's input checks and widened exactly to f64.
pub fn distill_loss_f64(cfg: &LossConfig, inputs: &DistillInputs) -> Result<RefOutput> {
    check_inputs(cfg, inputs, &GradOutputs::default())?;
    let student = widen(inputs.student);
    let teacher = widen(inputs.teacher);
    let hidden = inputs
        .hidden
        .map(|h| (h.size, widen(h.student), widen(h.teacher)));
    let f64_inputs = F64Inputs {
        rows: inputs.rows,
        vocab: inputs.vocab,
        student: &student,
        teacher: &teacher,
        labels: inputs.labels,
        hidden: hidden.as_ref().map(|(size, s, t)| F64Hidden {
            size: *size,
            student: s,
            teacher: t,
        }),
    };
    Ok(compute(cfg, &f64_inputs))
}

/// [`distill_loss_f64`] on f64 inputs. Validates the options, the labels and every length with
/// the same rules and error variants as the crate's input checks (which take host slices and so cannot be
/// called here).
pub fn distill_loss_f64_slices(cfg: &LossConfig, inputs: &F64Inputs) -> Result<RefOutput> {
    check_f64_inputs(cfg, inputs)?;
    Ok(compute(cfg, inputs))
}

/// `softmax(input / T)` row by row (or `log_softmax` when `log`), in f64.
///
/// # Panics
/// When `input.len() != rows * vocab` (the backends validate before calling).
pub fn softmax_f64(
    input: &[f64],
    rows: usize,
    vocab: usize,
    temperature: f64,
    log: bool,
) -> Vec<f64> {
    assert_eq!(input.len(), rows * vocab, "softmax_f64: input length");
    let mut out = Vec::with_capacity(input.len());
    for row in input.chunks(vocab.max(1)) {
        let scaled: Vec<f64> = row.iter().map(|&x| x / temperature).collect();
        let logp = log_softmax(&scaled);
        out.extend(logp.into_iter().map(|l| if log { l } else { l.exp() }));
    }
    out
}

/// Backward of [`softmax_f64`]: given its output `y` and the upstream gradient `dy`, the gradient
/// with respect to its input. softmax: `y (dy - sum(y dy)) / T`; log_softmax:
/// `(dy - exp(y) sum(dy)) / T`.
///
/// # Panics
/// When a length is not `rows * vocab`.
pub fn softmax_backward_f64(
    output: &[f64],
    grad_output: &[f64],
    rows: usize,
    vocab: usize,
    temperature: f64,
    log: bool,
) -> Vec<f64> {
    assert_eq!(
        output.len(),
        rows * vocab,
        "softmax_backward_f64: output length"
    );
    assert_eq!(
        grad_output.len(),
        rows * vocab,
        "softmax_backward_f64: grad_output length"
    );
    let mut dx = Vec::with_capacity(output.len());
    for (y, dy) in output
        .chunks(vocab.max(1))
        .zip(grad_output.chunks(vocab.max(1)))
    {
        if log {
            let sum_dy: f64 = dy.iter().sum();
            dx.extend(
                y.iter()
                    .zip(dy)
                    .map(|(&y, &dy)| (dy - y.exp() * sum_dy) / temperature),
            );
        } else {
            let dot: f64 = y.iter().zip(dy).map(|(&y, &dy)| y * dy).sum();
            dx.extend(
                y.iter()
                    .zip(dy)
                    .map(|(&y, &dy)| y * (dy - dot) / temperature),
            );
        }
    }
    dx
}

// ---------------------------------------------------------------------------------------------
// The computation.

/// `log_softmax(x)`: `x - logsumexp(x)`, the log-sum-exp taken about the maximum. NaN anywhere
/// gives NaN everywhere; a row that is all `-inf` gives NaN (there is no distribution).
fn log_softmax(x: &[f64]) -> Vec<f64> {
    let nan = vec![f64::NAN; x.len()];
    if x.iter().any(|v| v.is_nan()) {
        return nan;
    }
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return nan;
    }
    // With max = +inf, exp(inf - inf) is NaN and so is everything: also the honest answer.
    let sum: f64 = x.iter().map(|&v| (v - max).exp()).sum();
    let lse = max + sum.ln();
    x.iter().map(|&v| v - lse).collect()
}

/// One term of a KL divergence: `w * (log w - log o)` with `w = exp(log_w)`, where a zero weight
/// contributes exactly 0 and a positive weight against a zero `o` gives `+inf`.
fn kl_term(log_w: f64, log_o: f64) -> f64 {
    if log_w.is_nan() || log_o.is_nan() {
        f64::NAN
    } else if log_w == f64::NEG_INFINITY {
        0.0
    } else if log_o == f64::NEG_INFINITY {
        f64::INFINITY
    } else {
        log_w.exp() * (log_w - log_o)
    }
}

/// `log m = log(beta p_t + (1 - beta) p_s)` from the two log-probabilities, taken about the
/// larger one: `l_hi + log(w_hi + w_lo exp(l_lo - l_hi))`. When `p_s == p_t` this is exactly
/// `log p_t` (`beta + (1 - beta)` rounds to exactly 1), so identical distributions give a JSD of
/// exactly 0.
fn log_mixture(beta: f64, lpt: f64, lps: f64) -> f64 {
    if lpt.is_nan() || lps.is_nan() {
        return f64::NAN;
    }
    if lpt == f64::NEG_INFINITY && lps == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    if lpt >= lps {
        lpt + (beta + (1.0 - beta) * (lps - lpt).exp()).ln()
    } else {
        lps + ((1.0 - beta) + beta * (lpt - lps).exp()).ln()
    }
}

/// The soft loss of one row and its gradient with respect to the scaled logits `a = s / T`
/// (the caller multiplies by `da/ds = 1/T`).
fn soft_row(kind: LossKind, lps: &[f64], lpt: &[f64]) -> (f64, Vec<f64>) {
    let v = lps.len();
    match kind {
        LossKind::ForwardKl => {
            // KL(p_t || p_s) = sum p_t (log p_t - log p_s); d/da_j = p_s(j) - p_t(j).
            let loss = (0..v).map(|j| kl_term(lpt[j], lps[j])).sum();
            let grad = (0..v).map(|j| lps[j].exp() - lpt[j].exp()).collect();
            (loss, grad)
        }
        LossKind::ReverseKl => {
            // R = KL(p_s || p_t) = sum p_s (log p_s - log p_t);
            // d/da_j = p_s(j) (log p_s(j) - log p_t(j) - R).
            let loss: f64 = (0..v).map(|j| kl_term(lps[j], lpt[j])).sum();
            let grad = (0..v)
                .map(|j| {
                    if lps[j] == f64::NEG_INFINITY {
                        0.0
                    } else {
                        lps[j].exp() * (lps[j] - lpt[j] - loss)
                    }
                })
                .collect();
            (loss, grad)
        }
        LossKind::Jsd { beta } => {
            // m = beta p_t + (1 - beta) p_s;
            // J = beta KL(p_t || m) + (1 - beta) KL(p_s || m).
            // As a function of p_s: dJ/dp_s(k) = (1 - beta) (log p_s(k) - log m(k)) =: g_k, and
            // through the softmax d/da_j = p_s(j) (g_j - sum_k p_s(k) g_k).
            let beta = beta as f64;
            let lm: Vec<f64> = (0..v).map(|j| log_mixture(beta, lpt[j], lps[j])).collect();
            let kl_t_m: f64 = (0..v).map(|j| kl_term(lpt[j], lm[j])).sum();
            let kl_s_m: f64 = (0..v).map(|j| kl_term(lps[j], lm[j])).sum();
            let loss = beta * kl_t_m + (1.0 - beta) * kl_s_m;
            let g: Vec<f64> = (0..v).map(|j| (1.0 - beta) * (lps[j] - lm[j])).collect();
            let g_mean: f64 = (0..v)
                .filter(|&j| lps[j] != f64::NEG_INFINITY)
                .map(|j| lps[j].exp() * g[j])
                .sum();
            let grad = (0..v)
                .map(|j| {
                    if lps[j] == f64::NEG_INFINITY {
                        0.0
                    } else {
                        lps[j].exp() * (g[j] - g_mean)
                    }
                })
                .collect();
            (loss, grad)
        }
    }
}

/// The hard-label cross-entropy of one row at T = 1, weighted: returns its loss and adds its
/// gradient (times `grad_scale`) into `grad`.
fn hard_row(s: &[f64], y: usize, hard_weight: f64, grad_scale: f64, grad: &mut [f64]) -> f64 {
    let logp = log_softmax(s);
    for (j, g) in grad.iter_mut().enumerate() {
        let onehot = if j == y { 1.0 } else { 0.0 };
        *g += grad_scale * hard_weight * (logp[j].exp() - onehot);
    }
    hard_weight * -logp[y]
}

/// The row losses as `reduction` returns them, times `loss_scale`.
fn reduce_rows(reduction: Reduction, row_loss: &[f64], loss_scale: f64) -> Vec<f64> {
    match reduction {
        Reduction::None => row_loss.iter().map(|&l| l * loss_scale).collect(),
        Reduction::Sum | Reduction::Mean => vec![row_loss.iter().sum::<f64>() * loss_scale],
    }
}

/// The whole computation on validated f64 inputs.
fn compute(cfg: &LossConfig, inputs: &F64Inputs) -> RefOutput {
    let F64Inputs { rows, vocab, .. } = *inputs;
    let temperature = cfg.temperature as f64;
    let soft_weight = cfg.soft_weight() as f64;
    let hard_weight = cfg.hard_weight() as f64;
    let hidden_weight = cfg.hidden_weight as f64;

    let label_of = |r: usize| inputs.labels.map(|l| l[r]);
    let valid_rows = (0..rows).filter(|&r| cfg.row_is_valid(label_of(r))).count();
    let (loss_scale, grad_scale) = cfg.scales(valid_rows);

    let mut row_loss = vec![0.0; rows];
    let mut grad_logits = vec![0.0; rows * vocab];
    let mut grad_hidden = inputs.hidden.map(|h| vec![0.0; rows * h.size]);

    for r in 0..rows {
        let label = label_of(r);
        if !cfg.row_is_valid(label) {
            continue; // 0 loss, 0 gradient
        }
        let s = &inputs.student[r * vocab..(r + 1) * vocab];
        let t = &inputs.teacher[r * vocab..(r + 1) * vocab];
        let grad = &mut grad_logits[r * vocab..(r + 1) * vocab];
        let mut loss = 0.0;

        if soft_weight != 0.0 {
            let a: Vec<f64> = s.iter().map(|&x| x / temperature).collect();
            let b: Vec<f64> = t.iter().map(|&x| x / temperature).collect();
            let (soft, soft_grad_a) = soft_row(cfg.kind, &log_softmax(&a), &log_softmax(&b));
            loss += soft_weight * soft;
            for (g, ga) in grad.iter_mut().zip(&soft_grad_a) {
                *g += grad_scale * soft_weight * ga / temperature;
            }
        }

        if hard_weight != 0.0 {
            // The checks guarantee labels (alpha < 1) and a label in [0, vocab) (valid row).
            let y = label.expect("labels are present when the hard loss is on") as usize;
            loss += hard_row(s, y, hard_weight, grad_scale, grad);
        }

        if let (Some(h), Some(gh)) = (inputs.hidden, grad_hidden.as_mut()) {
            if hidden_weight != 0.0 {
                let size = h.size;
                let hs = &h.student[r * size..(r + 1) * size];
                let ht = &h.teacher[r * size..(r + 1) * size];
                let mse = hs
                    .iter()
                    .zip(ht)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    / size as f64;
                loss += hidden_weight * mse;
                let gh = &mut gh[r * size..(r + 1) * size];
                for ((g, a), b) in gh.iter_mut().zip(hs).zip(ht) {
                    *g = grad_scale * hidden_weight * 2.0 * (a - b) / size as f64;
                }
            }
        }

        row_loss[r] = loss;
    }

    let loss = reduce_rows(cfg.reduction, &row_loss, loss_scale);
    RefOutput {
        row_loss,
        loss,
        grad_logits,
        grad_hidden,
        valid_rows,
    }
}

// ---------------------------------------------------------------------------------------------
// The top-k teacher (semantics::TopKTeacher).

/// The inputs of [`distill_loss_topk_f64_slices`]: like [`TopKInputs`], in f64.
#[derive(Debug, Clone, Copy)]
pub struct F64TopKInputs<'a> {
    /// Rows (token positions).
    pub rows: usize,
    /// Vocabulary size V.
    pub vocab: usize,
    /// Entries per row of the teacher.
    pub k: usize,
    /// `[rows, vocab]` student logits.
    pub student: &'a [f64],
    /// `[rows, k]` the teacher's ids.
    pub ids: &'a [u32],
    /// `[rows, k]` the teacher's log-probabilities at T = 1.
    pub values: &'a [f64],
    /// `[rows]` the tail bucket's logit at the call's temperature.
    pub tail: &'a [f64],
    /// `[rows]` labels; required when `alpha < 1`.
    pub labels: Option<&'a [i64]>,
}

/// The top-k loss, per-row losses and the student-logit gradient in f64 (`grad_hidden` is
/// `None`). Inputs are validated with the crate's checks and widened exactly to f64.
pub fn distill_loss_topk_f64(cfg: &LossConfig, inputs: &TopKInputs) -> Result<RefOutput> {
    check_topk_inputs(cfg, inputs, None)?;
    let student = widen(inputs.student);
    let values = widen(inputs.teacher.values);
    let tail: Vec<f64> = inputs.teacher.tail.iter().map(|&x| x as f64).collect();
    Ok(compute_topk(
        cfg,
        &F64TopKInputs {
            rows: inputs.rows,
            vocab: inputs.vocab,
            k: inputs.teacher.k,
            student: &student,
            ids: inputs.teacher.ids,
            values: &values,
            tail: &tail,
            labels: inputs.labels,
        },
    ))
}

/// [`distill_loss_topk_f64`] on f64 inputs (for finite differences), with the same checks.
pub fn distill_loss_topk_f64_slices(cfg: &LossConfig, inputs: &F64TopKInputs) -> Result<RefOutput> {
    let F64TopKInputs { rows, vocab, k, .. } = *inputs;
    check_topk_shapes(
        cfg,
        (rows, vocab, k),
        inputs.student.len(),
        inputs.ids,
        inputs.values.len(),
        inputs.tail.len(),
        inputs.labels,
    )?;
    Ok(compute_topk(cfg, inputs))
}

/// `log sum exp(x)` about the maximum; `-inf` for an empty or all `-inf` list, NaN with a NaN.
fn log_sum_exp(x: impl Iterator<Item = f64> + Clone) -> f64 {
    if x.clone().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let max = x.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + x.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// The soft loss of one row against a top-k teacher and its gradient with respect to `a = s / T`.
/// `lq`: the student's log-softmax at T over the vocabulary; `ids`: the row's top ids;
/// `lp`: the teacher's bucket log-probabilities at T, the tail last.
fn soft_row_topk(kind: LossKind, lq: &[f64], ids: &[u32], lp: &[f64]) -> (f64, Vec<f64>) {
    let k = ids.len();
    let mut bucket = vec![k; lq.len()]; // each id's bucket: its index among the ids, k = tail
    for (i, &id) in ids.iter().enumerate() {
        bucket[id as usize] = i;
    }
    // The student's bucket log-masses: its own entries, and the tail summed over the tail.
    let mut lqb: Vec<f64> = ids.iter().map(|&id| lq[id as usize]).collect();
    lqb.push(log_sum_exp(
        (0..lq.len()).filter(|&v| bucket[v] == k).map(|v| lq[v]),
    ));
    match kind {
        LossKind::ForwardKl => {
            let loss = (0..=k).map(|b| kl_term(lp[b], lqb[b])).sum();
            let p_tail = lp[k].exp();
            let grad = (0..lq.len())
                .map(|v| {
                    let target = match bucket[v] {
                        b if b < k => lp[b].exp(),
                        _ if p_tail == 0.0 => 0.0, // an empty teacher tail pulls nothing
                        _ => p_tail * (lq[v] - lqb[k]).exp(),
                    };
                    lq[v].exp() - target
                })
                .collect();
            (loss, grad)
        }
        LossKind::ReverseKl => {
            let loss: f64 = (0..=k).map(|b| kl_term(lqb[b], lp[b])).sum();
            let grad = (0..lq.len())
                .map(|v| {
                    if lq[v] == f64::NEG_INFINITY {
                        0.0
                    } else {
                        let b = bucket[v];
                        lq[v].exp() * (lqb[b] - lp[b] - loss)
                    }
                })
                .collect();
            (loss, grad)
        }
        LossKind::Jsd { .. } => unreachable!("check_topk_config refuses JSD"),
    }
}

/// The whole top-k computation on validated f64 inputs.
fn compute_topk(cfg: &LossConfig, inputs: &F64TopKInputs) -> RefOutput {
    let F64TopKInputs { rows, vocab, k, .. } = *inputs;
    let temperature = cfg.temperature as f64;
    let soft_weight = cfg.soft_weight() as f64;
    let hard_weight = cfg.hard_weight() as f64;
    let label_of = |r: usize| inputs.labels.map(|l| l[r]);
    let valid_rows = (0..rows).filter(|&r| cfg.row_is_valid(label_of(r))).count();
    let (loss_scale, grad_scale) = cfg.scales(valid_rows);
    let mut row_loss = vec![0.0; rows];
    let mut grad_logits = vec![0.0; rows * vocab];

    for r in 0..rows {
        let label = label_of(r);
        if !cfg.row_is_valid(label) {
            continue;
        }
        let s = &inputs.student[r * vocab..(r + 1) * vocab];
        let grad = &mut grad_logits[r * vocab..(r + 1) * vocab];
        let mut loss = 0.0;
        if soft_weight != 0.0 {
            let a: Vec<f64> = s.iter().map(|&x| x / temperature).collect();
            let mut c: Vec<f64> = inputs.values[r * k..(r + 1) * k]
                .iter()
                .map(|&x| x / temperature)
                .collect();
            c.push(inputs.tail[r]); // already at T
            let ids = &inputs.ids[r * k..(r + 1) * k];
            let (soft, ga) = soft_row_topk(cfg.kind, &log_softmax(&a), ids, &log_softmax(&c));
            loss += soft_weight * soft;
            for (g, ga) in grad.iter_mut().zip(&ga) {
                *g += grad_scale * soft_weight * ga / temperature;
            }
        }
        if hard_weight != 0.0 {
            // The checks guarantee labels (alpha < 1) and a label in [0, vocab) (valid row).
            let y = label.expect("labels are present when the hard loss is on") as usize;
            loss += hard_row(s, y, hard_weight, grad_scale, grad);
        }
        row_loss[r] = loss;
    }
    let loss = reduce_rows(cfg.reduction, &row_loss, loss_scale);
    RefOutput {
        row_loss,
        loss,
        grad_logits,
        grad_hidden: None,
        valid_rows,
    }
}

// ---------------------------------------------------------------------------------------------
// Validation of f64 inputs (the same rules as `semantics::check_inputs`).

fn check_f64_inputs(cfg: &LossConfig, inputs: &F64Inputs) -> Result<()> {
    cfg.validate()?;
    let F64Inputs { rows, vocab, .. } = *inputs;
    if rows == 0 {
        return Err(Error::Empty("rows = 0"));
    }
    if vocab == 0 {
        return Err(Error::Empty("vocab = 0"));
    }
    let n = rows
        .checked_mul(vocab)
        .ok_or_else(|| Error::InvalidOption {
            name: "rows * vocab",
            value: format!("{rows} * {vocab}"),
            reason: "overflows usize",
        })?;
    let shape = format!("[{rows}, {vocab}]");
    check_len("student_logits", inputs.student.len(), n, &shape)?;
    check_len("teacher_logits", inputs.teacher.len(), n, &shape)?;
    match inputs.labels {
        Some(labels) => {
            check_len("labels", labels.len(), rows, &format!("[{rows}]"))?;
            check_labels(cfg, labels, vocab)?;
        }
        None if cfg.needs_labels() => return Err(Error::MissingLabels { alpha: cfg.alpha }),
        None => {}
    }
    if let Some(h) = inputs.hidden {
        if h.size == 0 {
            return Err(Error::Hidden("hidden size is 0".into()));
        }
        let m = rows
            .checked_mul(h.size)
            .ok_or_else(|| Error::Hidden("rows * hidden overflows".into()))?;
        let hshape = format!("[{rows}, {}]", h.size);
        check_len("student_hidden", h.student.len(), m, &hshape)?;
        check_len("teacher_hidden", h.teacher.len(), m, &hshape)?;
    }
    Ok(())
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
// Host conversions.

/// Every element widened to f64 (exact for f32, f16 and bf16).
fn widen(x: HostSlice) -> Vec<f64> {
    (0..x.len()).map(|i| x.get_f32(i) as f64).collect()
}

/// Adds f64 values into `out` (rows of `vocab` whose `keep` is false are left alone): the sum
/// in f64 of the value held and the new one, rounded once to `out`'s dtype.
fn accumulate_into(values: &[f64], out: HostSliceMut, vocab: usize, keep: impl Fn(usize) -> bool) {
    let mut sum: Vec<f64> = (0..values.len())
        .map(|i| out.as_slice().get_f32(i) as f64)
        .collect();
    for (i, s) in sum.iter_mut().enumerate() {
        if keep(i / vocab) {
            *s += values[i];
        }
    }
    narrow_into(&sum, out);
}

/// Writes f64 values into `out`: rounded to f32, then (for f16/bf16) to nearest even.
fn narrow_into(values: &[f64], out: HostSliceMut) {
    match out {
        HostSliceMut::F32(o) => {
            for (o, &v) in o.iter_mut().zip(values) {
                *o = v as f32;
            }
        }
        HostSliceMut::F16(o) => {
            for (o, &v) in o.iter_mut().zip(values) {
                *o = f16::from_f32(v as f32);
            }
        }
        HostSliceMut::Bf16(o) => {
            for (o, &v) in o.iter_mut().zip(values) {
                *o = bf16::from_f32(v as f32);
            }
        }
    }
}

/// The logit gradient into `g`: written, or added into it with `cfg.accumulate` (valid rows
/// only).
fn write_grad(
    cfg: &LossConfig,
    grad: &[f64],
    g: HostSliceMut,
    vocab: usize,
    labels: Option<&[i64]>,
) {
    if cfg.accumulate {
        accumulate_into(grad, g, vocab, |r| cfg.row_is_valid(labels.map(|l| l[r])));
    } else {
        narrow_into(grad, g);
    }
}

impl DistillDevice for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn distill_loss(
        &self,
        cfg: &LossConfig,
        inputs: &DistillInputs,
        grads: GradOutputs,
    ) -> Result<LossValue> {
        check_inputs(cfg, inputs, &grads)?;
        let out = distill_loss_f64(cfg, inputs)?;
        if let Some(g) = grads.logits {
            write_grad(cfg, &out.grad_logits, g, inputs.vocab, inputs.labels);
        }
        if let (Some(g), Some(gh)) = (grads.hidden, out.grad_hidden.as_ref()) {
            narrow_into(gh, g);
        }
        Ok(LossValue {
            values: out.loss.iter().map(|&v| v as f32).collect(),
            valid_rows: out.valid_rows,
        })
    }

    fn distill_loss_topk(
        &self,
        cfg: &LossConfig,
        inputs: &TopKInputs,
        grad: Option<HostSliceMut>,
    ) -> Result<LossValue> {
        check_topk_inputs(cfg, inputs, grad.as_ref())?;
        let out = distill_loss_topk_f64(cfg, inputs)?;
        if let Some(g) = grad {
            write_grad(cfg, &out.grad_logits, g, inputs.vocab, inputs.labels);
        }
        Ok(LossValue {
            values: out.loss.iter().map(|&v| v as f32).collect(),
            valid_rows: out.valid_rows,
        })
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
        check_softmax(
            rows,
            vocab,
            temperature,
            &[("input", input.len()), ("output", output.len())],
        )?;
        check_same_dtype("output", input, &output)?;
        let y = softmax_f64(&widen(input), rows, vocab, temperature as f64, log);
        narrow_into(&y, output);
        Ok(())
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
        let dx = softmax_backward_f64(
            &widen(output),
            &widen(grad_output),
            rows,
            vocab,
            temperature as f64,
            log,
        );
        narrow_into(&dx, grad_input);
        Ok(())
    }
}
