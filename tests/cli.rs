//! End-to-end tests of the `distill` binary: happy paths on the reference and cpu devices (their
//! outputs must agree), the shipped example, the `example` generator, and one test per kind of
//! bad input, each of which must fail with exactly one `error: ...` line naming the culprit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "distill-cli-test-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn s(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    /// File names in the directory, sorted.
    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A tensor to put in a test input file.
struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn t_f32(name: &str, shape: &[usize], v: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn t_f16(name: &str, shape: &[usize], v: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::F16,
        shape: shape.to_vec(),
        bytes: v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
    }
}

fn t_bf16(name: &str, shape: &[usize], v: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        bytes: v
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
    }
}

fn t_i64(name: &str, shape: &[usize], v: &[i64]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::I64,
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn t_i32(name: &str, shape: &[usize], v: &[i32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::I32,
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn write_st(path: &Path, tensors: &[T]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, &None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Reads F32 tensor `name` from an output file: (shape, values).
fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{} has no tensor {name}", path.display()));
    assert_eq!(v.dtype(), Dtype::F32, "{name} must be F32");
    let values = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v.shape().to_vec(), values)
}

fn tensor_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    names
}

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        // A panic would print its backtrace: the assertions look for it.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("cannot run the distill binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "distill failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON line expected: {stdout}"
    );
    let line = stdout.trim().to_string();
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    line
}

/// The run failed with status 1 and exactly one stderr line `error: ...` containing every
/// needle; nothing panicked.
fn assert_error(out: &Output, needles: &[&str]) -> String {
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(!stderr.contains("stack backtrace"), "backtrace: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one stderr line expected, got: {stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "stderr does not mention `{n}`: {stderr}"
        );
    }
    lines[0].to_string()
}

/// A numeric field of the JSON result line.
fn json_number(line: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let start = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + pat.len();
    let rest = &line[start..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {line}"))
}

fn normals(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Box-Muller; a test-only generator.
            let u: f32 = rng.gen_range(1e-7..1.0);
            let v: f32 = rng.gen();
            scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

const N: usize = 6;
const V: usize = 50;
const H: usize = 8;
const LABELS: [i64; N] = [3, -100, 7, 49, 0, 12];

/// The standard test batch: correlated student/teacher logits, labels (one ignored row) and
/// hidden states.
struct Batch {
    student: Vec<f32>,
    teacher: Vec<f32>,
    hs: Vec<f32>,
    ht: Vec<f32>,
}

fn batch(seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let teacher = normals(&mut rng, N * V, 2.0);
    let noise = normals(&mut rng, N * V, 1.0);
    let student = teacher
        .iter()
        .zip(&noise)
        .map(|(t, z)| 0.8 * t + z)
        .collect();
    let ht = normals(&mut rng, N * H, 1.0);
    let hs = ht
        .iter()
        .zip(normals(&mut rng, N * H, 0.5))
        .map(|(t, z)| t + z)
        .collect();
    Batch {
        student,
        teacher,
        hs,
        ht,
    }
}

/// The standard input file (f32 logits, labels, hidden states) plus `extra` tensors.
fn standard_input(path: &Path, extra: Vec<T>) {
    let b = batch(1);
    let mut tensors = vec![
        t_f32("student_logits", &[N, V], &b.student),
        t_f32("teacher_logits", &[N, V], &b.teacher),
        t_i64("labels", &[N], &LABELS),
        t_f32("student_hidden", &[N, H], &b.hs),
        t_f32("teacher_hidden", &[N, H], &b.ht),
    ];
    tensors.extend(extra);
    write_st(path, &tensors);
}

/// `a` close to the reference `b`: rtol 1e-4, plus a floor of 1e-5 of b's largest magnitude
/// for elements near zero.
fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let tol = 1e-4 * y.abs() + 1e-5 * scale + 1e-12;
        assert!(
            (x - y).abs() <= tol,
            "{what}[{i}]: {x} vs reference {y} (tolerance {tol})"
        );
    }
}

/// Runs `distill loss` on `input` with `args` and returns the JSON line.
fn loss_ok(input: &Path, output: &Path, args: &[&str]) -> String {
    let (i, o) = (input.display().to_string(), output.display().to_string());
    let mut all = vec!["loss", "--input", &i, "--output", &o];
    all.extend_from_slice(args);
    assert_ok(&distill(&all))
}

/// Runs `distill loss` expecting failure.
fn loss_err(input: &Path, output: &Path, args: &[&str], needles: &[&str]) -> String {
    let (i, o) = (input.display().to_string(), output.display().to_string());
    let mut all = vec!["loss", "--input", &i, "--output", &o];
    all.extend_from_slice(args);
    let existed = output.exists();
    let out = distill(&all);
    let line = assert_error(&out, needles);
    assert!(
        existed || !output.exists(),
        "a failed run must not leave {}",
        output.display()
    );
    line
}

// ---------------------------------------------------------------------------------------------
// Happy paths
// ---------------------------------------------------------------------------------------------

#[test]
fn reference_and_cpu_agree_on_every_kind() {
    let s = Scratch::new("agree");
    let input = s.path("in.safetensors");
    standard_input(&input, vec![]);
    let cases: [&[&str]; 4] = [
        &[],
        &[
            "--kind",
            "reverse-kl",
            "--temperature",
            "2",
            "--alpha",
            "0.7",
            "--hidden-weight",
            "0.5",
        ],
        &[
            "--kind",
            "jsd",
            "--beta",
            "0.3",
            "--temperature",
            "1.5",
            "--alpha",
            "0.4",
            "--reduction",
            "sum",
            "--no-t2-scale",
        ],
        &[
            "--kind",
            "forward-kl",
            "--temperature",
            "4",
            "--alpha",
            "0",
            "--normalizer",
            "32",
            "--hidden-weight",
            "2",
        ],
    ];
    for (k, case) in cases.iter().enumerate() {
        let mut outs = Vec::new();
        for device in ["reference", "cpu"] {
            let out = s.path(&format!("out-{k}-{device}.safetensors"));
            let mut args = vec!["--device", device];
            args.extend_from_slice(case);
            let line = loss_ok(&input, &out, &args);
            assert!(line.contains(&format!("\"device\":\"{device}\"")), "{line}");
            assert_eq!(json_number(&line, "valid_rows"), (N - 1) as f64, "{line}");
            assert!(json_number(&line, "wall_ms") >= 0.0);
            outs.push(out);
        }
        let (ls, loss_ref) = read_f32(&outs[0], "loss");
        let (_, loss_cpu) = read_f32(&outs[1], "loss");
        assert_eq!(ls, Vec::<usize>::new(), "scalar loss has shape []");
        assert!(
            loss_ref[0].is_finite() && loss_ref[0] > 0.0,
            "case {k}: {loss_ref:?}"
        );
        assert_close(&format!("case {k} loss"), &loss_cpu, &loss_ref);

        let (gs, g_ref) = read_f32(&outs[0], "grad_student_logits");
        let (gs_cpu, g_cpu) = read_f32(&outs[1], "grad_student_logits");
        assert_eq!(gs, vec![N, V]);
        assert_eq!(gs_cpu, vec![N, V]);
        assert_close(&format!("case {k} grad_student_logits"), &g_cpu, &g_ref);
        // The ignored row has zero gradient.
        assert!(g_ref[V..2 * V].iter().all(|&g| g == 0.0));
        assert!(g_cpu[V..2 * V].iter().all(|&g| g == 0.0));

        let (hs, h_ref) = read_f32(&outs[0], "grad_student_hidden");
        let (_, h_cpu) = read_f32(&outs[1], "grad_student_hidden");
        assert_eq!(hs, vec![N, H]);
        assert_close(&format!("case {k} grad_student_hidden"), &h_cpu, &h_ref);
    }
    // Nothing but the input and the outputs in the directory: no temporary files left over.
    assert_eq!(s.listing().len(), 1 + 2 * cases.len(), "{:?}", s.listing());
}

#[test]
fn forward_kl_gradient_matches_the_closed_form() {
    // alpha = 1, T = 2, T^2 scaling on, mean over 5 valid rows: grad = T (p_s - p_t) / 5.
    let s = Scratch::new("closed-form");
    let input = s.path("in.safetensors");
    standard_input(&input, vec![]);
    let out = s.path("out.safetensors");
    loss_ok(
        &input,
        &out,
        &["--device", "reference", "--temperature", "2"],
    );
    let (_, g) = read_f32(&out, "grad_student_logits");
    let b = batch(1);
    let softmax = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = x.iter().map(|&v| ((v as f64 - m) / 2.0).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    };
    for row in 0..N {
        let ps = softmax(&b.student[row * V..(row + 1) * V]);
        let pt = softmax(&b.teacher[row * V..(row + 1) * V]);
        for v in 0..V {
            let want = if LABELS[row] == -100 {
                0.0
            } else {
                2.0 * (ps[v] - pt[v]) / 5.0
            };
            let got = g[row * V + v] as f64;
            assert!(
                (got - want).abs() < 1e-6,
                "row {row} v {v}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn reduction_none_gives_one_loss_per_row() {
    let s = Scratch::new("none");
    let input = s.path("in.safetensors");
    standard_input(&input, vec![]);
    let (ref_out, cpu_out) = (s.path("ref.safetensors"), s.path("cpu.safetensors"));
    let line = loss_ok(
        &input,
        &ref_out,
        &[
            "--device",
            "reference",
            "--reduction",
            "none",
            "--alpha",
            "0.5",
        ],
    );
    loss_ok(
        &input,
        &cpu_out,
        &["--device", "cpu", "--reduction", "none", "--alpha", "0.5"],
    );
    assert_eq!(json_number(&line, "loss_len"), N as f64, "{line}");
    let (shape, rows) = read_f32(&ref_out, "loss");
    assert_eq!(shape, vec![N]);
    assert_eq!(rows[1], 0.0, "the ignored row has loss 0");
    assert!(
        rows.iter().enumerate().all(|(i, &l)| i == 1 || l > 0.0),
        "{rows:?}"
    );
    let sum: f32 = rows.iter().sum();
    assert!((json_number(&line, "loss_sum") as f32 - sum).abs() <= 1e-5 * sum.abs());
    let (_, cpu_rows) = read_f32(&cpu_out, "loss");
    assert_close("per-row loss", &cpu_rows, &rows);
}

#[test]
fn hidden_gradient_is_written_only_with_hidden_states() {
    let s = Scratch::new("hidden");
    let with = s.path("with.safetensors");
    standard_input(&with, vec![]);
    let out = s.path("out.safetensors");
    loss_ok(&with, &out, &["--device", "cpu", "--hidden-weight", "1"]);
    assert_eq!(
        tensor_names(&out),
        ["grad_student_hidden", "grad_student_logits", "loss"]
    );
    // d/dh_s of mean over 5 valid rows of mean_h (h_s - h_t)^2 = 2 (h_s - h_t) / (H * 5).
    let (_, g) = read_f32(&out, "grad_student_hidden");
    let b = batch(1);
    assert_eq!(g.len(), N * H);
    for (i, &got) in g.iter().enumerate() {
        let want = if i / H == 1 {
            0.0
        } else {
            2.0 * (b.hs[i] - b.ht[i]) / (H as f32 * 5.0)
        };
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1e-2),
            "{i}: {got} vs {want}"
        );
    }

    let b = batch(2);
    let without = s.path("without.safetensors");
    write_st(
        &without,
        &[
            t_f32("student_logits", &[N, V], &b.student),
            t_f32("teacher_logits", &[N, V], &b.teacher),
        ],
    );
    let out2 = s.path("out2.safetensors");
    let line = loss_ok(&without, &out2, &["--device", "reference"]);
    assert_eq!(
        json_number(&line, "valid_rows"),
        N as f64,
        "no labels: every row is valid"
    );
    assert_eq!(tensor_names(&out2), ["grad_student_logits", "loss"]);
}

#[test]
fn mixed_dtypes_and_extra_tensors_are_accepted() {
    let s = Scratch::new("mixed");
    let b = batch(3);
    let input = s.path("in.safetensors");
    write_st(
        &input,
        &[
            t_f16("student_logits", &[N, V], &b.student),
            t_bf16("teacher_logits", &[N, V], &b.teacher),
            t_i64("labels", &[N], &LABELS),
            t_bf16("student_hidden", &[N, H], &b.hs),
            t_f16("teacher_hidden", &[N, H], &b.ht),
            // Unknown tensors, even of odd dtypes and ranks, are ignored.
            t_i32("attention_mask", &[N], &[1; N]),
            t_f32("something_else", &[2, 2, 2], &[0.0; 8]),
        ],
    );
    let (r, c) = (s.path("r.safetensors"), s.path("c.safetensors"));
    loss_ok(
        &input,
        &r,
        &[
            "--device",
            "reference",
            "--kind",
            "jsd",
            "--alpha",
            "0.8",
            "--hidden-weight",
            "0.1",
        ],
    );
    loss_ok(
        &input,
        &c,
        &[
            "--device",
            "cpu",
            "--kind",
            "jsd",
            "--alpha",
            "0.8",
            "--hidden-weight",
            "0.1",
        ],
    );
    for name in ["loss", "grad_student_logits", "grad_student_hidden"] {
        let (sr, vr) = read_f32(&r, name);
        let (sc, vc) = read_f32(&c, name);
        assert_eq!(sr, sc);
        assert_close(name, &vc, &vr);
    }
}

#[test]
fn existing_output_is_replaced() {
    let s = Scratch::new("replace");
    let input = s.path("in.safetensors");
    standard_input(&input, vec![]);
    let out = s.path("out.safetensors");
    std::fs::write(&out, b"old contents").unwrap();
    loss_ok(&input, &out, &["--device", "cpu", "--reduction", "sum"]);
    assert_eq!(read_f32(&out, "loss").0, Vec::<usize>::new());
    assert_eq!(s.listing(), ["in.safetensors", "out.safetensors"]);
}

// ---------------------------------------------------------------------------------------------
// The shipped example and the generator
// ---------------------------------------------------------------------------------------------

fn shipped_example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/example.safetensors")
}

#[test]
fn shipped_example_loads_and_runs() {
    let path = shipped_example();
    let size = std::fs::metadata(&path)
        .expect("examples/data/example.safetensors")
        .len();
    assert!(size < 300_000, "{size} bytes");
    let s = Scratch::new("shipped");
    let (r, c) = (s.path("r.safetensors"), s.path("c.safetensors"));
    let args = [
        "--temperature",
        "2",
        "--alpha",
        "0.5",
        "--hidden-weight",
        "0.1",
    ];
    let line = loss_ok(&path, &r, &[&["--device", "reference"][..], &args].concat());
    loss_ok(&path, &c, &[&["--device", "cpu"][..], &args].concat());
    assert_eq!(json_number(&line, "rows"), 16.0);
    assert_eq!(json_number(&line, "vocab"), 2048.0);
    assert_eq!(json_number(&line, "valid_rows"), 14.0);
    let loss = json_number(&line, "loss");
    assert!(loss.is_finite() && loss > 0.0, "{line}");
    assert_eq!(read_f32(&r, "grad_student_logits").0, vec![16, 2048]);
    assert_eq!(read_f32(&r, "grad_student_hidden").0, vec![16, 64]);
    for name in ["loss", "grad_student_logits", "grad_student_hidden"] {
        assert_close(name, &read_f32(&c, name).1, &read_f32(&r, name).1);
    }
    // The shipped file's layout: bf16 teacher, f32 student, I64 labels with 2 ignored rows.
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("teacher_logits").unwrap().dtype(), Dtype::BF16);
    assert_eq!(st.tensor("student_logits").unwrap().dtype(), Dtype::F32);
    let labels = st.tensor("labels").unwrap();
    let ignored = labels
        .data()
        .chunks_exact(8)
        .filter(|c| i64::from_le_bytes((*c).try_into().unwrap()) == -100)
        .count();
    assert_eq!(ignored, 2);
}

#[test]
fn example_generator_is_deterministic_and_reproduces_the_shipped_file() {
    let s = Scratch::new("example");
    let a = s.path("a.safetensors");
    let out = distill(&["example", "--output", &s.s("a.safetensors")]);
    let line = assert_ok(&out);
    assert!(line.contains("\"command\":\"example\""), "{line}");
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(shipped_example()).unwrap(),
        "`distill example` with default arguments must reproduce examples/data/example.safetensors"
    );
    // Another seed gives another file, the same seed the same bytes.
    let (b1, b2) = (s.s("b1.safetensors"), s.s("b2.safetensors"));
    for b in [&b1, &b2] {
        assert_ok(&distill(&[
            "example",
            "--output",
            b,
            "--seed",
            "7",
            "--rows",
            "5",
            "--vocab",
            "33",
            "--hidden",
            "0",
            "--dtype",
            "f16",
            "--student-dtype",
            "bf16",
        ]));
    }
    let (x, y) = (std::fs::read(&b1).unwrap(), std::fs::read(&b2).unwrap());
    assert_eq!(x, y);
    assert_ne!(x, std::fs::read(&a).unwrap());
    assert_eq!(
        tensor_names(Path::new(&b1)),
        ["labels", "student_logits", "teacher_logits"]
    );
    // And it is a valid input.
    let line = loss_ok(
        Path::new(&b1),
        &s.path("o.safetensors"),
        &["--device", "cpu", "--kind", "reverse-kl"],
    );
    assert_eq!(
        json_number(&line, "valid_rows"),
        5.0,
        "5 / 8 = 0 ignored rows: {line}"
    );

    // Without labels.
    let c = s.s("c.safetensors");
    assert_ok(&distill(&[
        "example",
        "--output",
        &c,
        "--no-labels",
        "--rows",
        "3",
        "--vocab",
        "10",
    ]));
    assert_eq!(
        tensor_names(Path::new(&c)),
        [
            "student_hidden",
            "student_logits",
            "teacher_hidden",
            "teacher_logits"
        ]
    );
}

#[test]
fn example_rejects_bad_sizes() {
    let s = Scratch::new("example-bad");
    let o = s.s("o.safetensors");
    assert_error(
        &distill(&["example", "--output", &o, "--rows", "0"]),
        &["--rows"],
    );
    assert_error(
        &distill(&["example", "--output", &o, "--vocab", "0"]),
        &["--vocab"],
    );
    assert_error(
        &distill(&["example", "--output", &o, "--rows", "4", "--ignored", "5"]),
        &["--ignored"],
    );
    assert_error(
        &distill(&[
            "example",
            "--output",
            &o,
            "--rows",
            "100000000",
            "--vocab",
            "100000000",
        ]),
        &["too large"],
    );
    let missing = s.s("no/such/dir/o.safetensors");
    assert_error(
        &distill(&["example", "--output", &missing]),
        &["output directory"],
    );
    assert!(s.listing().is_empty(), "{:?}", s.listing());
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: one clear line each
// ---------------------------------------------------------------------------------------------

/// Writes an input from the standard batch with `f` applied to the tensor list.
fn custom_input(s: &Scratch, f: impl FnOnce(&mut Vec<T>)) -> PathBuf {
    let b = batch(4);
    let mut tensors = vec![
        t_f32("student_logits", &[N, V], &b.student),
        t_f32("teacher_logits", &[N, V], &b.teacher),
        t_i64("labels", &[N], &LABELS),
        t_f32("student_hidden", &[N, H], &b.hs),
        t_f32("teacher_hidden", &[N, H], &b.ht),
    ];
    f(&mut tensors);
    let path = s.path("in.safetensors");
    write_st(&path, &tensors);
    path
}

fn remove(tensors: &mut Vec<T>, name: &str) {
    tensors.retain(|t| t.name != name);
}

fn replace(tensors: &mut Vec<T>, t: T) {
    remove(tensors, &t.name.clone());
    tensors.push(t);
}

#[test]
fn missing_student_logits() {
    let s = Scratch::new("missing-student");
    let input = custom_input(&s, |t| remove(t, "student_logits"));
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["student_logits", "missing"],
    );
}

#[test]
fn missing_teacher_logits() {
    let s = Scratch::new("missing-teacher");
    let input = custom_input(&s, |t| remove(t, "teacher_logits"));
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["teacher_logits", "missing"],
    );
}

#[test]
fn logits_of_wrong_rank() {
    let s = Scratch::new("rank");
    let input = custom_input(&s, |t| {
        replace(t, t_f32("student_logits", &[2, 3, V], &vec![0.0; 6 * V]))
    });
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["student_logits", "rank"],
    );
    let input = custom_input(&s, |t| {
        replace(t, t_f32("teacher_logits", &[N * V], &vec![0.0; N * V]))
    });
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["teacher_logits", "rank"],
    );
    let input = custom_input(&s, |t| replace(t, t_i64("labels", &[N, 1], &LABELS)));
    loss_err(&input, &s.path("o.safetensors"), &[], &["labels", "rank"]);
}

#[test]
fn teacher_shape_differs_from_student() {
    let s = Scratch::new("teacher-shape");
    let input = custom_input(&s, |t| {
        replace(
            t,
            t_f32("teacher_logits", &[N, V + 1], &vec![0.0; N * (V + 1)]),
        )
    });
    let line = loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["teacher_logits", "[6, 51]", "[6, 50]"],
    );
    assert!(line.contains("student_logits"), "{line}");
}

#[test]
fn empty_logits() {
    let s = Scratch::new("empty");
    let input = custom_input(&s, |t| {
        replace(t, t_f32("student_logits", &[N, 0], &[]));
        replace(t, t_f32("teacher_logits", &[N, 0], &[]));
    });
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["student_logits", "[6, 0]"],
    );
}

#[test]
fn labels_length_differs_from_rows() {
    let s = Scratch::new("labels-shape");
    let input = custom_input(&s, |t| {
        replace(t, t_i64("labels", &[N - 1], &LABELS[..N - 1]))
    });
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["labels", "[5]", "[6]"],
    );
}

#[test]
fn hidden_shapes_must_agree() {
    let s = Scratch::new("hidden-shape");
    let input = custom_input(&s, |t| {
        replace(
            t,
            t_f32("teacher_hidden", &[N, H + 2], &vec![0.0; N * (H + 2)]),
        )
    });
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--hidden-weight", "1"],
        &["teacher_hidden", "[6, 10]", "[6, 8]"],
    );
    let input = custom_input(&s, |t| {
        replace(
            t,
            t_f32("student_hidden", &[N + 1, H], &vec![0.0; (N + 1) * H]),
        )
    });
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["student_hidden", "[7, 8]"],
    );
    let input = custom_input(&s, |t| remove(t, "teacher_hidden"));
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["teacher_hidden", "missing"],
    );
    let input = custom_input(&s, |t| remove(t, "student_hidden"));
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["student_hidden", "missing"],
    );
}

#[test]
fn hidden_weight_without_hidden_states() {
    let s = Scratch::new("hidden-weight");
    let input = custom_input(&s, |t| {
        remove(t, "student_hidden");
        remove(t, "teacher_hidden");
    });
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--hidden-weight", "0.5"],
        &["--hidden-weight", "student_hidden"],
    );
    let input = custom_input(&s, |_| {});
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--hidden-weight", "-1"],
        &["--hidden-weight", "-1"],
    );
}

#[test]
fn labels_of_wrong_dtype() {
    let s = Scratch::new("labels-dtype");
    let input = custom_input(&s, |t| replace(t, t_f32("labels", &[N], &[1.0; N])));
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["labels", "F32", "I64"],
    );
    let input = custom_input(&s, |t| replace(t, t_i32("labels", &[N], &[1; N])));
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["labels", "I32", "I64"],
    );
}

#[test]
fn logits_of_wrong_dtype() {
    let s = Scratch::new("logits-dtype");
    let input = custom_input(&s, |t| {
        replace(t, t_i64("student_logits", &[N, V], &vec![0; N * V]))
    });
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["student_logits", "I64"],
    );
    let input = custom_input(&s, |t| {
        replace(t, t_i64("teacher_hidden", &[N, H], &vec![0; N * H]))
    });
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &[],
        &["teacher_hidden", "I64"],
    );
}

#[test]
fn label_out_of_range_names_row_and_value() {
    let s = Scratch::new("label-range");
    let mut labels = LABELS;
    labels[4] = V as i64; // one past the end
    let input = custom_input(&s, |t| replace(t, t_i64("labels", &[N], &labels)));
    let line = loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--device", "reference"],
        &["labels", "row 4", "50"],
    );
    assert!(line.contains("[0, 50)"), "{line}");
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--device", "cpu"],
        &["labels", "row 4", "50"],
    );
    // -100 is only special as the ignore index.
    let input = custom_input(&s, |_| {});
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--ignore-index", "-1"],
        &["labels", "row 1", "-100"],
    );
    // Nothing but the input is left behind.
    assert_eq!(s.listing(), ["in.safetensors"]);
}

#[test]
fn temperature_must_be_positive_and_finite() {
    let s = Scratch::new("temperature");
    let input = custom_input(&s, |_| {});
    for t in ["0", "-1", "nan", "inf", "-inf", "1e-45"] {
        loss_err(
            &input,
            &s.path("o.safetensors"),
            &["--temperature", t],
            &["--temperature"],
        );
    }
}

#[test]
fn alpha_must_be_in_unit_interval() {
    let s = Scratch::new("alpha");
    let input = custom_input(&s, |_| {});
    for a in ["1.5", "-0.1", "nan"] {
        loss_err(
            &input,
            &s.path("o.safetensors"),
            &["--alpha", a],
            &["alpha"],
        );
    }
}

#[test]
fn beta_must_be_in_open_unit_interval_and_only_with_jsd() {
    let s = Scratch::new("beta");
    let input = custom_input(&s, |_| {});
    for b in ["0", "1", "-0.5", "2", "nan"] {
        loss_err(
            &input,
            &s.path("o.safetensors"),
            &["--kind", "jsd", "--beta", b],
            &["beta"],
        );
    }
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--beta", "0.5"],
        &["--beta", "jsd"],
    );
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--kind", "reverse-kl", "--beta", "0.5"],
        &["--beta", "reverse-kl"],
    );
    // The default beta is fine.
    loss_ok(&input, &s.path("o.safetensors"), &["--kind", "jsd"]);
}

#[test]
fn normalizer_must_be_positive_and_only_with_mean() {
    let s = Scratch::new("normalizer");
    let input = custom_input(&s, |_| {});
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--normalizer", "0"],
        &["normalizer"],
    );
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--normalizer", "-3"],
        &["normalizer"],
    );
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--reduction", "sum", "--normalizer", "4"],
        &["--normalizer", "mean"],
    );
}

#[test]
fn hard_loss_without_labels() {
    let s = Scratch::new("no-labels");
    let input = custom_input(&s, |t| remove(t, "labels"));
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--alpha", "0.5"],
        &["labels", "alpha"],
    );
    // alpha = 1 needs no labels.
    loss_ok(&input, &s.path("o.safetensors"), &[]);
}

#[test]
fn missing_input_file() {
    let s = Scratch::new("no-file");
    loss_err(
        &s.path("nope.safetensors"),
        &s.path("o.safetensors"),
        &[],
        &["nope.safetensors"],
    );
}

#[test]
fn corrupt_and_truncated_files() {
    let s = Scratch::new("corrupt");
    let good = custom_input(&s, |_| {});
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut garbage_header = (20u64).to_le_bytes().to_vec();
    garbage_header.extend_from_slice(b"this is not JSON!!!!");
    let mut huge_header = (1u64 << 40).to_le_bytes().to_vec();
    huge_header.extend_from_slice(&[0; 64]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.safetensors", vec![]),
        ("short.safetensors", vec![1, 2, 3]),
        (
            "truncated-data.safetensors",
            bytes[..bytes.len() - 100].to_vec(),
        ),
        (
            "truncated-header.safetensors",
            bytes[..8 + header_len / 2].to_vec(),
        ),
        ("garbage.safetensors", garbage_header),
        ("huge-header.safetensors", huge_header),
        (
            "text.safetensors",
            b"hello, this is a text file and not tensors at all".to_vec(),
        ),
    ];
    for (name, contents) in cases {
        let path = s.path(name);
        std::fs::write(&path, contents).unwrap();
        loss_err(&path, &s.path("o.safetensors"), &[], &[name, "safetensors"]);
    }
    // A directory as input.
    let dir = s.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    loss_err(&dir, &s.path("o.safetensors"), &[], &["a-directory"]);
}

#[test]
fn output_in_missing_directory() {
    let s = Scratch::new("out-dir");
    let input = custom_input(&s, |_| {});
    loss_err(
        &input,
        &s.path("no-such-dir/o.safetensors"),
        &[],
        &["output directory", "no-such-dir"],
    );
    // An output path that is a directory.
    loss_err(&input, &s.dir, &[], &["output", "directory"]);
}

#[test]
fn output_must_not_be_the_input() {
    let s = Scratch::new("out-is-in");
    let input = custom_input(&s, |_| {});
    let before = std::fs::read(&input).unwrap();
    loss_err(&input, &input, &[], &["input", "overwrite"]);
    // Also when spelled differently.
    let other_spelling = s.dir.join(".").join("in.safetensors");
    loss_err(&input, &other_spelling, &[], &["input"]);
    assert_eq!(
        std::fs::read(&input).unwrap(),
        before,
        "the input must be untouched"
    );
    assert_eq!(s.listing(), ["in.safetensors"]);
}

#[test]
fn unknown_device() {
    let s = Scratch::new("device");
    let input = custom_input(&s, |_| {});
    loss_err(
        &input,
        &s.path("o.safetensors"),
        &["--device", "tpu"],
        &["device", "tpu"],
    );
}

#[test]
fn cuda_device_fails_cleanly_without_a_gpu() {
    let s = Scratch::new("cuda");
    let input = custom_input(&s, |_| {});
    let out = s.path("o.safetensors");
    let (i, o) = (input.display().to_string(), out.display().to_string());
    let result = distill(&["loss", "--input", &i, "--output", &o, "--device", "cuda"]);
    if result.status.success() {
        // A machine with a GPU and compiled kernels: the run must have produced the output.
        assert_eq!(read_f32(&out, "grad_student_logits").0, vec![N, V]);
    } else {
        assert_error(&result, &["cuda"]);
        assert!(!out.exists());
    }
}

#[test]
fn usage_errors_are_clap_errors() {
    let s = Scratch::new("usage");
    let input = custom_input(&s, |_| {});
    let i = input.display().to_string();
    let o = s.s("o.safetensors");
    for args in [
        vec!["loss", "--input", &i],
        vec!["loss", "--input", &i, "--output", &o, "--kind", "kl"],
        vec!["loss", "--input", &i, "--output", &o, "--reduction", "avg"],
        vec![
            "loss",
            "--input",
            &i,
            "--output",
            &o,
            "--temperature",
            "warm",
        ],
        vec!["frobnicate"],
    ] {
        let out = distill(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert_eq!(s.listing(), ["in.safetensors"]);
}

#[test]
fn ptxas_report_is_shown_or_reported_missing() {
    let out = distill(&["ptxas"]);
    if out.status.success() {
        // Built with nvcc: a table with one row per kernel and architecture.
        let stdout = text(&out.stdout);
        assert!(stdout.starts_with("arch"), "{stdout}");
        assert!(stdout.contains("dk_"), "{stdout}");
        // An architecture the build does not target is an error, not an empty pass.
        assert_error(
            &distill(&["ptxas", "--check", "--arch", "sm_75"]),
            &["sm_75"],
        );
    } else {
        assert_error(&out, &["ptxas report", "nvcc"]);
    }
}

/// The README's API example (examples/api.rs) runs.
#[test]
fn readme_api_example_runs() {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_distill"))
        .parent()
        .unwrap()
        .join("examples")
        .join("api");
    if !exe.exists() {
        // `cargo test` builds examples; a filtered run may not have.
        eprintln!("examples/api not built: {}", exe.display());
        return;
    }
    let out = std::process::Command::new(&exe).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("loss "));
}

// ---------------------------------------------------------------------------------------------
// A top-k teacher instead of teacher logits
// ---------------------------------------------------------------------------------------------

fn t_u32(name: &str, shape: &[usize], v: &[u32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::U32,
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// The standard batch with its teacher replaced by the teacher's top `k` (ids as U32 or I64).
fn topk_input(s: &Scratch, k: usize, ids_i64: bool) -> (PathBuf, distill_kernels::topk::TopKRows) {
    let b = batch(6);
    let top = distill_kernels::topk::TopKRows::from_logits(b.teacher[..].into(), N, V, k).unwrap();
    let ids = if ids_i64 {
        let wide: Vec<i64> = top.ids.iter().map(|&i| i as i64).collect();
        t_i64("teacher_topk_ids", &[N, k], &wide)
    } else {
        t_u32("teacher_topk_ids", &[N, k], &top.ids)
    };
    let path = s.path("topk.safetensors");
    write_st(
        &path,
        &[
            t_f32("student_logits", &[N, V], &b.student),
            ids,
            t_f16("teacher_topk_values", &[N, k], &top.values),
            t_f32("teacher_topk_tail", &[N], &top.tail),
            t_i64("labels", &[N], &LABELS),
        ],
    );
    (path, top)
}

#[test]
fn top_k_teacher_runs_on_every_device_and_matches_the_library() {
    let s = Scratch::new("topk");
    let k = 7;
    for ids_i64 in [false, true] {
        let (input, top) = topk_input(&s, k, ids_i64);
        let b = batch(6);
        let values: Vec<f16> = top.values.iter().map(|&v| f16::from_f32(v)).collect();
        let cfg = distill_kernels::LossConfig::builder()
            .kind(distill_kernels::LossKind::ReverseKl)
            .temperature(2.0)
            .alpha(0.6)
            .build()
            .unwrap();
        let want = distill_kernels::reference::distill_loss_topk_f64(
            &cfg,
            &distill_kernels::TopKInputs {
                rows: N,
                vocab: V,
                student: b.student[..].into(),
                teacher: distill_kernels::TopKTeacher {
                    k,
                    ids: &top.ids,
                    values: values[..].into(),
                    tail: &top.tail,
                },
                labels: Some(&LABELS),
            },
        )
        .unwrap();
        let want_grad: Vec<f32> = want.grad_logits.iter().map(|&g| g as f32).collect();
        for device in ["reference", "cpu", "emulated"] {
            let out = s.path(&format!("topk-{device}-{ids_i64}.safetensors"));
            let args = [
                "--device",
                device,
                "--kind",
                "reverse-kl",
                "--temperature",
                "2",
                "--alpha",
                "0.6",
            ];
            let line = loss_ok(&input, &out, &args);
            let loss = json_number(&line, "loss");
            assert!(
                (loss - want.loss[0]).abs() < 1e-5 * want.loss[0].abs(),
                "{device}: {line}"
            );
            let (_, grad) = read_f32(&out, "grad_student_logits");
            assert_close(&format!("{device} grad"), &grad, &want_grad);
        }
    }
}

#[test]
fn top_k_teacher_inputs_are_checked_by_name() {
    let s = Scratch::new("topk-bad");
    let (input, top) = topk_input(&s, 5, false);
    let out = s.path("o.safetensors");
    let st = std::fs::read(&input).unwrap();
    let parsed = SafeTensors::deserialize(&st).unwrap();
    let keep = |drop: &str, extra: Vec<T>| {
        let mut tensors: Vec<T> = parsed
            .tensors()
            .into_iter()
            .filter(|(n, _)| n != drop)
            .map(|(n, v)| T {
                name: n,
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                bytes: v.data().to_vec(),
            })
            .collect();
        tensors.extend(extra);
        let p = s.path(&format!("in-{drop}.safetensors"));
        write_st(&p, &tensors);
        p
    };
    let b = batch(6);
    let both = keep("", vec![t_f32("teacher_logits", &[N, V], &b.teacher)]);
    loss_err(
        &both,
        &out,
        &[],
        &["either `teacher_logits` or the top-k teacher"],
    );
    let no_tail = keep("teacher_topk_tail", vec![]);
    loss_err(&no_tail, &out, &[], &["missing tensor `teacher_topk_tail`"]);
    let mut ids = top.ids.clone();
    ids[6] = ids[5];
    let dup = keep(
        "teacher_topk_ids",
        vec![t_u32("teacher_topk_ids", &[N, 5], &ids)],
    );
    for device in ["cpu", "emulated"] {
        loss_err(
            &dup,
            &out,
            &["--device", device],
            &["teacher_topk_ids", "row 1", "appears twice"],
        );
    }
    loss_err(&input, &out, &["--kind", "jsd"], &["top-k"]);
    let hidden = keep(
        "",
        vec![
            t_f32("student_hidden", &[N, H], &b.hs),
            t_f32("teacher_hidden", &[N, H], &b.ht),
        ],
    );
    loss_err(
        &hidden,
        &out,
        &[],
        &["hidden states cannot go with a top-k teacher"],
    );
}
