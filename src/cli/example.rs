//! `distill example`: a deterministic synthetic input file that looks like one batch of a real
//! distillation run.
//!
//! - Every vocabulary entry gets a Zipf-like popularity bias `-1.1 ln(1 + rank)` (ranks are a
//!   seeded permutation), shared by all rows, so the distributions have a long tail.
//! - Teacher row i: `bias + 1.5 z` with z standard normal, plus a confident bump of +6 on the
//!   row's label (drawn with a preference for popular tokens).
//! - Student row i: `0.85 teacher + 0.9 z'`: clearly correlated with the teacher, less sharp and
//!   noisier, like a smaller model part-way through training.
//! - Labels: `--ignored` rows (default N / 8), chosen at random, are -100 (padding / prompt).
//! - Hidden states (H > 0): teacher `N(0, 1)`, student `0.9 teacher + 0.4 z`.
//!
//! Values are computed in f64 from basic arithmetic (see `rng`) and rounded once to the
//! requested dtypes, so a given command line writes the same bytes everywhere.

use distill_kernels::{Dtype, HostVec};

use super::io::{OutTensor, PendingOutput};
use super::json::JsonLine;
use super::rng::{ln, Draw, SplitMix64};
use super::{print_line, CliError, CliResult, ExampleArgs};

/// Bound on the generated element count (N x V), to keep a typo from filling the disk.
const MAX_ELEMENTS: usize = 1 << 30;

pub fn run(args: &ExampleArgs) -> CliResult<()> {
    let (rows, vocab, hidden) = (args.rows, args.vocab, args.hidden);
    if rows == 0 {
        return Err(CliError::new("--rows must be > 0"));
    }
    if vocab == 0 {
        return Err(CliError::new("--vocab must be > 0"));
    }
    if rows.checked_mul(vocab).is_none_or(|n| n > MAX_ELEMENTS)
        || rows.checked_mul(hidden).is_none_or(|n| n > MAX_ELEMENTS)
    {
        return Err(CliError::new(format!(
            "--rows {rows} with --vocab {vocab} / --hidden {hidden} is too large (at most \
             {MAX_ELEMENTS} elements per tensor)"
        )));
    }
    let ignored = args.ignored.unwrap_or(rows / 8);
    if args.no_labels && args.ignored.is_some() {
        return Err(CliError::new(
            "--ignored needs labels; it cannot be used with --no-labels",
        ));
    }
    if ignored > rows {
        return Err(CliError::new(format!(
            "--ignored {ignored} is larger than --rows {rows}"
        )));
    }
    let pending = PendingOutput::create(&args.output, &[])?;

    let teacher_dtype: Dtype = args.dtype.into();
    let student_dtype: Dtype = args.student_dtype.into();
    let data = generate(rows, vocab, hidden, ignored, args.seed);

    let mut tensors = vec![
        (
            "student_logits",
            OutTensor::host(
                vec![rows, vocab],
                &HostVec::from_f32(&data.student, student_dtype),
            ),
        ),
        (
            "teacher_logits",
            OutTensor::host(
                vec![rows, vocab],
                &HostVec::from_f32(&data.teacher, teacher_dtype),
            ),
        ),
    ];
    if !args.no_labels {
        tensors.push(("labels", OutTensor::i64(vec![rows], &data.labels)));
    }
    if hidden > 0 {
        tensors.push((
            "student_hidden",
            OutTensor::host(
                vec![rows, hidden],
                &HostVec::from_f32(&data.student_hidden, student_dtype),
            ),
        ));
        tensors.push((
            "teacher_hidden",
            OutTensor::host(
                vec![rows, hidden],
                &HostVec::from_f32(&data.teacher_hidden, teacher_dtype),
            ),
        ));
    }
    let labels_flag = if args.no_labels {
        "--no-labels".to_string()
    } else {
        format!("--ignored {ignored}")
    };
    let command = format!(
        "distill example --rows {rows} --vocab {vocab} --hidden {hidden} --seed {} --dtype {} \
         --student-dtype {} {labels_flag}",
        args.seed, teacher_dtype, student_dtype
    );
    pending.commit(&tensors, Some(("generator", command)))?;

    let valid = if args.no_labels { rows } else { rows - ignored };
    let line = JsonLine::new()
        .str("command", "example")
        .str("output", &args.output.display().to_string())
        .uint("rows", rows)
        .uint("vocab", vocab)
        .uint("hidden", hidden)
        .uint("valid_rows", valid)
        .str("teacher_dtype", teacher_dtype.suffix())
        .str("student_dtype", student_dtype.suffix())
        .finish();
    print_line(&line)
}

struct Synthetic {
    student: Vec<f32>,
    teacher: Vec<f32>,
    labels: Vec<i64>,
    student_hidden: Vec<f32>,
    teacher_hidden: Vec<f32>,
}

fn generate(rows: usize, vocab: usize, hidden: usize, ignored: usize, seed: u64) -> Synthetic {
    let mut rng = SplitMix64::new(seed);
    // Popularity rank of each vocabulary entry, and the entry of each rank.
    let by_rank = rng.permutation(vocab);
    let mut bias = vec![0f64; vocab];
    for (rank, &token) in by_rank.iter().enumerate() {
        bias[token] = -1.1 * ln(1.0 + rank as f64);
    }
    // Which rows are ignored: the first `ignored` entries of a random permutation of the rows.
    let mut is_ignored = vec![false; rows];
    for &r in rng.permutation(rows).iter().take(ignored) {
        is_ignored[r] = true;
    }

    let mut teacher = Vec::with_capacity(rows * vocab);
    let mut student = Vec::with_capacity(rows * vocab);
    let mut labels = Vec::with_capacity(rows);
    let mut row_t = vec![0f64; vocab];
    for &ignored_row in &is_ignored {
        // Cubing a uniform favours small ranks: labels are mostly popular tokens.
        let u = rng.uniform();
        let rank = ((u * u * u) * vocab as f64) as usize;
        let label = by_rank[rank.min(vocab - 1)];
        for (v, t) in row_t.iter_mut().enumerate() {
            *t = bias[v] + 1.5 * rng.normal();
        }
        row_t[label] += 6.0;
        for &t in &row_t {
            teacher.push(t as f32);
            student.push((0.85 * t + 0.9 * rng.normal()) as f32);
        }
        labels.push(if ignored_row { -100 } else { label as i64 });
    }

    let mut teacher_hidden = Vec::with_capacity(rows * hidden);
    let mut student_hidden = Vec::with_capacity(rows * hidden);
    for _ in 0..rows * hidden {
        let t = rng.normal();
        teacher_hidden.push(t as f32);
        student_hidden.push((0.9 * t + 0.4 * rng.normal()) as f32);
    }
    Synthetic {
        student,
        teacher,
        labels,
        student_hidden,
        teacher_hidden,
    }
}
