//! `distill loss`: options -> `LossConfig`, input file -> `DistillInputs`, one
//! `DistillDevice::distill_loss` call, gradients -> output file, one JSON line on stdout.

use std::time::Instant;

use distill_kernels::{
    DeviceKind, DistillInputs, Error, GradOutputs, HiddenInputs, HostSliceMut, LossConfig,
    LossKind, Reduction, TopKInputs, TopKTeacher,
};

use super::io::{
    float_tensor, id_tensor, label_tensor, shape_str, FloatTensor, InputFile, OutTensor,
    PendingOutput,
};
use super::json::JsonLine;
use super::{print_line, CliError, CliResult, KindArg, LossArgs, NonFiniteArg, ReductionArg};

/// Default JSD beta when `--kind jsd` is given without `--beta`.
const DEFAULT_BETA: f32 = 0.5;

pub fn run(args: &LossArgs) -> CliResult<()> {
    let started = Instant::now();

    // 1. Options, all checked before any file is touched.
    let device: DeviceKind = args.device.parse().map_err(CliError::new)?;
    let cfg = config(args)?;

    // 2. The output location (fails early on a missing directory or when it is the input).
    let pending = PendingOutput::create(&args.output, &[args.input.as_path()])?;

    // 3. The device: an unavailable one is reported before reading a possibly large input.
    let backend = distill_kernels::open(device).map_err(|e| match e {
        Error::DeviceUnavailable(_) => CliError::new(format!("--device {}: {e}", args.device)),
        other => CliError::new(format!("cannot open device {}: {other}", args.device)),
    })?;

    // 4. The input tensors, every shape and dtype checked by name.
    let file = InputFile::read(&args.input)?;
    let input = Input::load(&file)?;
    if cfg.needs_labels() && input.labels.is_none() {
        return Err(CliError::new(format!(
            "--alpha {} < 1 asks for the hard-label loss, but input {} has no `labels` tensor",
            cfg.alpha,
            file.path()
        )));
    }
    if cfg.hidden_weight > 0.0 && input.hidden.is_none() {
        return Err(CliError::new(format!(
            "--hidden-weight {} asks for the hidden-state loss, but input {} has no \
             `student_hidden`/`teacher_hidden` tensors",
            cfg.hidden_weight,
            file.path()
        )));
    }

    // 5. The loss and gradients.
    let (rows, vocab) = (input.rows, input.vocab);
    let mut grad_logits = zeros(rows * vocab, "grad_student_logits")?;
    let mut grad_hidden = match &input.hidden {
        Some((s, _)) => Some(zeros(rows * s.shape[1], "grad_student_hidden")?),
        None => None,
    };
    let t0 = Instant::now();
    let result = match &input.teacher {
        Teacher::Dense(teacher) => {
            let inputs = DistillInputs {
                rows,
                vocab,
                student: input.student.data.as_slice(),
                teacher: teacher.data.as_slice(),
                labels: input.labels.as_deref(),
                hidden: input.hidden.as_ref().map(|(s, t)| HiddenInputs {
                    size: s.shape[1],
                    student: s.data.as_slice(),
                    teacher: t.data.as_slice(),
                }),
            };
            let grads = GradOutputs {
                logits: Some(HostSliceMut::F32(&mut grad_logits)),
                hidden: grad_hidden.as_deref_mut().map(HostSliceMut::F32),
            };
            backend.distill_loss(&cfg, &inputs, grads)
        }
        Teacher::TopK {
            k,
            ids,
            values,
            tail,
        } => {
            let inputs = TopKInputs {
                rows,
                vocab,
                student: input.student.data.as_slice(),
                teacher: TopKTeacher {
                    k: *k,
                    ids,
                    values: values.data.as_slice(),
                    tail,
                },
                labels: input.labels.as_deref(),
            };
            let grad = Some(HostSliceMut::F32(&mut grad_logits));
            backend.distill_loss_topk(&cfg, &inputs, grad)
        }
    };
    let loss = result.map_err(|e| match e {
        Error::LabelOutOfRange { .. } => {
            CliError::new(format!("input {}: tensor `labels`: {e}", file.path()))
        }
        Error::TopKId { .. } => CliError::new(format!(
            "input {}: tensor `teacher_topk_ids`: {e}",
            file.path()
        )),
        other => CliError::new(format!("loss on device {}: {other}", backend.name())),
    })?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;

    // 6. A non-finite loss is refused unless asked for: exit 0 with "loss": null is easy to miss.
    if args.on_nonfinite == NonFiniteArg::Error && loss.values.iter().any(|v| !v.is_finite()) {
        return Err(CliError::new(format!(
            "input {}: the loss is not finite ({}); pass --on-nonfinite propagate to write it anyway",
            file.path(),
            nonfinite_cause(&input, &loss.values)
        )));
    }

    // 7. The output file, then the result line.
    let loss_shape = match cfg.reduction {
        Reduction::None => vec![rows],
        _ => vec![],
    };
    let expected_len = if cfg.reduction == Reduction::None {
        rows
    } else {
        1
    };
    if loss.values.len() != expected_len {
        return Err(CliError::new(format!(
            "device {} returned {} loss values, expected {expected_len}",
            backend.name(),
            loss.values.len()
        )));
    }
    let mut tensors = vec![
        ("loss", OutTensor::f32(loss_shape, &loss.values)),
        (
            "grad_student_logits",
            OutTensor::f32(vec![rows, vocab], &grad_logits),
        ),
    ];
    drop(grad_logits);
    if let (Some(g), Some((s, _))) = (&grad_hidden, &input.hidden) {
        tensors.push(("grad_student_hidden", OutTensor::f32(s.shape.clone(), g)));
    }
    let note = format!(
        "distill loss: device={} kind={} beta={} temperature={} alpha={} t2_scale={} \
         ignore_index={} reduction={} hidden_weight={} normalizer={}",
        backend.name(),
        cfg.kind.name(),
        cfg.kind.beta(),
        cfg.temperature,
        cfg.alpha,
        cfg.t2_scale,
        cfg.ignore_index,
        reduction_name(cfg.reduction),
        cfg.hidden_weight,
        cfg.normalizer
            .map_or("valid_rows".to_string(), |d| d.to_string()),
    );
    pending.commit(&tensors, Some(("distill", note)))?;

    let mut line = JsonLine::new()
        .str("command", "loss")
        .str("device", backend.name())
        .str("kind", cfg.kind.name())
        .str("reduction", reduction_name(cfg.reduction))
        .uint("rows", rows)
        .uint("vocab", vocab);
    line = match cfg.reduction {
        Reduction::None => line
            .uint("loss_len", loss.values.len())
            .f32("loss_sum", loss.total()),
        _ => line.f32("loss", loss.values[0]),
    };
    let line = line
        .uint("valid_rows", loss.valid_rows)
        .float("wall_ms", round3(wall_ms))
        .float("total_ms", round3(started.elapsed().as_secs_f64() * 1e3))
        .str("output", &args.output.display().to_string())
        .finish();
    print_line(&line)
}

/// The `LossConfig` the options describe, validated.
fn config(args: &LossArgs) -> CliResult<LossConfig> {
    let kind = match (args.kind, args.beta) {
        (KindArg::Jsd, beta) => LossKind::Jsd {
            beta: beta.unwrap_or(DEFAULT_BETA),
        },
        (other, Some(beta)) => {
            return Err(CliError::new(format!(
                "--beta {beta} is only used by --kind jsd, not --kind {}",
                other.name()
            )))
        }
        (KindArg::ForwardKl, None) => LossKind::ForwardKl,
        (KindArg::ReverseKl, None) => LossKind::ReverseKl,
    };
    let reduction = match args.reduction {
        ReductionArg::None => Reduction::None,
        ReductionArg::Sum => Reduction::Sum,
        ReductionArg::Mean => Reduction::Mean,
    };
    if let (Some(d), false) = (args.normalizer, reduction == Reduction::Mean) {
        return Err(CliError::new(format!(
            "--normalizer {d} is only used with --reduction mean, not --reduction {}",
            reduction_name(reduction)
        )));
    }
    // Every option set (the struct is non-exhaustive outside the crate); validated below.
    let mut cfg = LossConfig::default();
    cfg.kind = kind;
    cfg.temperature = args.temperature;
    cfg.alpha = args.alpha;
    cfg.t2_scale = !args.no_t2_scale;
    cfg.ignore_index = args.ignore_index;
    cfg.reduction = reduction;
    cfg.normalizer = args.normalizer;
    cfg.grad_scale = 1.0;
    cfg.hidden_weight = args.hidden_weight;
    cfg.validate().map_err(|e| match e {
        // Name the option as it is spelled on the command line, with the value as given.
        Error::InvalidOption { name, reason, .. } => {
            let value = match name {
                "temperature" => Some(cfg.temperature),
                "alpha" => Some(cfg.alpha),
                "beta" => Some(cfg.kind.beta()),
                "normalizer" => cfg.normalizer,
                "hidden_weight" => Some(cfg.hidden_weight),
                _ => None,
            };
            match value {
                Some(v) => CliError::new(format!(
                    "invalid --{} {}: {reason}",
                    name.replace('_', "-"),
                    show_f32(v)
                )),
                None => Error::InvalidOption {
                    name,
                    value: String::new(),
                    reason,
                }
                .into(),
            }
        }
        other => other.into(),
    })?;
    Ok(cfg)
}

/// A float as a user would write it: plain decimals, or scientific notation when tiny or huge.
fn show_f32(v: f32) -> String {
    if v != 0.0 && v.is_finite() && (v.abs() < 1e-4 || v.abs() >= 1e9) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

/// Milliseconds to the microsecond, for a readable result line.
fn round3(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}

fn reduction_name(r: Reduction) -> &'static str {
    match r {
        Reduction::None => "none",
        Reduction::Sum => "sum",
        Reduction::Mean => "mean",
    }
}

/// A zeroed f32 buffer; running out of memory is an error naming the buffer, not an abort.
fn zeros(len: usize, what: &str) -> CliResult<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        CliError::new(format!(
            "cannot allocate {len} f32 elements for `{what}` (out of memory)"
        ))
    })?;
    v.resize(len, 0.0);
    Ok(v)
}

/// The tensors of one input file, with every shape agreeing.
/// The first non-finite input element, or else the first row whose loss is not finite.
fn nonfinite_cause(input: &Input, losses: &[f32]) -> String {
    let mut tensors = vec![("student_logits", &input.student)];
    match &input.teacher {
        Teacher::Dense(t) => tensors.push(("teacher_logits", t)),
        Teacher::TopK { values, .. } => tensors.push(("teacher_topk_values", values)),
    }
    if let Some((s, t)) = &input.hidden {
        tensors.push(("student_hidden", s));
        tensors.push(("teacher_hidden", t));
    }
    for (name, t) in tensors {
        let x = t.data.as_slice();
        if let Some(i) = (0..x.len()).find(|&i| !x.get_f32(i).is_finite()) {
            let cols = t.shape.get(1).copied().unwrap_or(1).max(1);
            return format!(
                "tensor `{name}` holds {} at row {}, column {}",
                x.get_f32(i),
                i / cols,
                i % cols
            );
        }
    }
    match losses.iter().position(|v| !v.is_finite()) {
        Some(r) if losses.len() > 1 => format!(
            "row {r} has loss {} although every input is finite",
            losses[r]
        ),
        _ => format!(
            "the loss is {} although every input is finite",
            losses.first().copied().unwrap_or(f32::NAN)
        ),
    }
}

/// The teacher of an input file: dense logits, or its top-k entries per row.
enum Teacher {
    Dense(FloatTensor),
    TopK {
        k: usize,
        ids: Vec<u32>,
        values: FloatTensor,
        tail: Vec<f32>,
    },
}

struct Input {
    rows: usize,
    vocab: usize,
    student: FloatTensor,
    teacher: Teacher,
    labels: Option<Vec<i64>>,
    hidden: Option<(FloatTensor, FloatTensor)>,
}

impl Input {
    fn load(file: &InputFile) -> CliResult<Input> {
        let st = file.parse()?;
        let path = file.path();
        let required = |name: &str| -> CliResult<FloatTensor> {
            float_tensor(file, &st, name, 2, "[N, V]")?.ok_or_else(|| {
                CliError::new(format!(
                    "input {path}: missing tensor `{name}` ([N, V] logits, F32/F16/BF16)"
                ))
            })
        };
        let student = required("student_logits")?;
        let (rows, vocab) = (student.shape[0], student.shape[1]);
        if rows == 0 || vocab == 0 {
            return Err(CliError::new(format!(
                "input {path}: tensor `student_logits` has shape {}: N and V must be > 0",
                shape_str(&student.shape)
            )));
        }
        let dense = float_tensor(file, &st, "teacher_logits", 2, "[N, V]")?;
        let ids = id_tensor(file, &st, "teacher_topk_ids", 2, "[N, K]")?;
        let teacher = match (dense, ids) {
            (Some(_), Some(_)) => {
                return Err(CliError::new(format!(
                    "input {path}: give either `teacher_logits` or the top-k teacher \
                     (`teacher_topk_ids`, `teacher_topk_values`, `teacher_topk_tail`), not both"
                )))
            }
            (None, None) => {
                return Err(CliError::new(format!(
                    "input {path}: missing tensor `teacher_logits` ([N, V] logits, F32/F16/BF16) \
                     or `teacher_topk_ids` ([N, K] ids with `teacher_topk_values` and \
                     `teacher_topk_tail`)"
                )))
            }
            (Some(teacher), None) => {
                if teacher.shape != student.shape {
                    return Err(CliError::new(format!(
                        "input {path}: tensor `teacher_logits` has shape {}, expected {} to \
                         match `student_logits`",
                        shape_str(&teacher.shape),
                        shape_str(&student.shape)
                    )));
                }
                Teacher::Dense(teacher)
            }
            (None, Some((shape, ids))) => load_topk(file, &st, rows, shape, ids)?,
        };

        let labels = match label_tensor(file, &st, "labels")? {
            Some((shape, values)) => {
                if shape[0] != rows {
                    return Err(CliError::new(format!(
                        "input {path}: tensor `labels` has shape {}, expected [{rows}] (one per \
                         row of `student_logits`)",
                        shape_str(&shape)
                    )));
                }
                Some(values)
            }
            None => None,
        };

        let hs = float_tensor(file, &st, "student_hidden", 2, "[N, H]")?;
        if hs.is_some() && matches!(teacher, Teacher::TopK { .. }) {
            return Err(CliError::new(format!(
                "input {path}: hidden states cannot go with a top-k teacher (its loss has no \
                 hidden-state term); drop `student_hidden`/`teacher_hidden`"
            )));
        }
        let ht = float_tensor(file, &st, "teacher_hidden", 2, "[N, H]")?;
        let hidden = match (hs, ht) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(CliError::new(format!(
                    "input {path}: tensor `teacher_hidden` is missing; `student_hidden` was \
                     given and the hidden-state loss needs both"
                )))
            }
            (None, Some(_)) => {
                return Err(CliError::new(format!(
                    "input {path}: tensor `student_hidden` is missing; `teacher_hidden` was \
                     given and the hidden-state loss needs both"
                )))
            }
            (Some(s), Some(t)) => {
                if s.shape[0] != rows || s.shape[1] == 0 {
                    return Err(CliError::new(format!(
                        "input {path}: tensor `student_hidden` has shape {}, expected [{rows}, H] \
                         with H > 0 (one row per row of `student_logits`)",
                        shape_str(&s.shape)
                    )));
                }
                if t.shape != s.shape {
                    return Err(CliError::new(format!(
                        "input {path}: tensor `teacher_hidden` has shape {}, expected {} to \
                         match `student_hidden`",
                        shape_str(&t.shape),
                        shape_str(&s.shape)
                    )));
                }
                Some((s, t))
            }
        };
        Ok(Input {
            rows,
            vocab,
            student,
            teacher,
            labels,
            hidden,
        })
    }
}

/// The top-k teacher's three tensors, their shapes checked against `[rows, K]` ids.
fn load_topk(
    file: &InputFile,
    st: &safetensors::SafeTensors<'_>,
    rows: usize,
    shape: Vec<usize>,
    ids: Vec<u32>,
) -> CliResult<Teacher> {
    let path = file.path();
    if shape[0] != rows || shape[1] == 0 {
        return Err(CliError::new(format!(
            "input {path}: tensor `teacher_topk_ids` has shape {}, expected [{rows}, K] with \
             K > 0 (one row per row of `student_logits`)",
            shape_str(&shape)
        )));
    }
    let values = float_tensor(file, st, "teacher_topk_values", 2, "[N, K]")?.ok_or_else(|| {
        CliError::new(format!(
            "input {path}: missing tensor `teacher_topk_values` ([N, K] teacher \
             log-probabilities at T = 1 of the ids in `teacher_topk_ids`)"
        ))
    })?;
    if values.shape != shape {
        return Err(CliError::new(format!(
            "input {path}: tensor `teacher_topk_values` has shape {}, expected {} to match \
             `teacher_topk_ids`",
            shape_str(&values.shape),
            shape_str(&shape)
        )));
    }
    let tail = float_tensor(file, st, "teacher_topk_tail", 1, "[N]")?.ok_or_else(|| {
        CliError::new(format!(
            "input {path}: missing tensor `teacher_topk_tail` ([N]: the log of the teacher's \
             probability mass outside its top k, -inf when none)"
        ))
    })?;
    if tail.shape != [rows] {
        return Err(CliError::new(format!(
            "input {path}: tensor `teacher_topk_tail` has shape {}, expected [{rows}]",
            shape_str(&tail.shape)
        )));
    }
    Ok(Teacher::TopK {
        k: shape[1],
        ids,
        values,
        tail: tail.data.to_f32_vec(),
    })
}
