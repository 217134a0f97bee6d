//! The trainer end to end through the `distill` binary: training and distillation write
//! Llama-compatible run directories, `--resume` is bit-exact, and every bad input named in the
//! issue fails with a clear message and loses nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use distill_kernels::data::corpus::Corpus;
use distill_kernels::train::checkpoint::load_trainer_state;

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .output()
        .expect("the distill binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = distill(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "distill {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs a command that must fail; returns its one-line error.
fn fails(args: &[&str]) -> String {
    let out = distill(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "distill {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Progress lines may come first; the error is the last line.
    let last = stderr.lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("error: "), "{stderr}");
    last
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dk-trainer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
    /// The JSON file at `rel`.
    fn json(&self, rel: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.path(rel)).unwrap()).unwrap()
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A text file of synthetic documents separated by blank lines.
fn write_corpus(path: &Path, docs: usize) {
    let c = Corpus::synthetic(7, docs, 1);
    let text: Vec<&str> = c.train.iter().map(|d| d.text.as_str()).collect();
    std::fs::write(path, text.join("\n\n")).unwrap();
}

/// Small and fast: every test run takes a few seconds.
const FAST: [&str; 6] = ["--batch", "4", "--seq", "32", "--eval-every", "5"];

fn train_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    let mut a = vec!["train", "--data", data, "--out", out, "--steps", steps];
    a.extend(FAST);
    a.extend(["--vocab-size", "300"]);
    a
}

#[test]
fn ten_steps_equal_five_plus_five_resumed_bit_for_bit() {
    let s = Scratch::new("resume");
    write_corpus(&s.path("data.txt"), 120);
    let data = s.s("data.txt");
    let (a, b) = (s.s("straight"), s.s("resumed"));
    ok(&train_args(&data, &a, "10"));
    let mut first = train_args(&data, &b, "10");
    first.extend(["--stop-at", "5"]);
    ok(&first);
    let mut second = train_args(&data, &b, "10");
    second.push("--resume");
    ok(&second);
    for file in ["model.safetensors", "tokenizer.json", "config.json"] {
        let x = std::fs::read(s.path("straight").join(file)).unwrap();
        let y = std::fs::read(s.path("resumed").join(file)).unwrap();
        assert!(
            x == y,
            "{file} differs between the straight and the resumed run"
        );
    }
    // The trainer state also holds wall-clock seconds; everything else must agree exactly.
    let state = |run: &str| {
        let newest = s.path(run).join("checkpoints/step-00000010");
        load_trainer_state(&newest.join("trainer_state.safetensors")).unwrap()
    };
    let (x, y) = (state("straight"), state("resumed"));
    assert_eq!(x.step, 10);
    assert_eq!(x.step, y.step);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&x.adam_m) == bits(&y.adam_m),
        "AdamW first moments differ"
    );
    assert!(
        bits(&x.adam_v) == bits(&y.adam_v),
        "AdamW second moments differ"
    );
    for key in ["train", "val"] {
        assert_eq!(
            x.meta["history"][key], y.meta["history"][key],
            "{key} loss curve"
        );
    }
    let metrics = s.json("resumed/metrics.json");
    let m = &metrics["metrics"];
    for key in [
        "val_loss",
        "val_ppl",
        "steps",
        "train_tokens",
        "tokens_per_s",
    ] {
        assert!(m.get(key).is_some(), "metrics.json lacks {key}: {metrics}");
    }
    assert_eq!(m["steps"], 10);
    assert!(s.path("resumed/loss.png").is_file());
}

#[test]
fn distillation_with_hidden_states_writes_a_llama_run_directory() {
    let s = Scratch::new("distill");
    write_corpus(&s.path("data.txt"), 120);
    let data = s.s("data.txt");
    let teacher = s.s("teacher");
    let mut t = train_args(&data, &teacher, "6");
    t.extend(["--config", "small"]);
    ok(&t);
    let student = s.s("student");
    let mut d = vec![
        "distill",
        "--teacher",
        &teacher,
        "--data",
        &data,
        "--out",
        &student,
        "--steps",
        "6",
        "--kind",
        "reverse-kl",
        "--temperature",
        "2",
        "--temperature-end",
        "1",
        "--alpha",
        "0.7",
        "--hidden-weight",
        "0.5",
        "--hidden-layers",
        "1:2,2:4",
    ];
    d.extend(FAST);
    let line = ok(&d);
    let summary: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert!(
        summary["val_loss"].as_f64().unwrap().is_finite(),
        "{summary}"
    );
    let cfg = s.json("student/config.json");
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["hidden_size"], 64);
    assert_eq!(cfg["vocab_size"], 300);
    // The student shares the teacher's tokenizer byte for byte.
    assert_eq!(
        std::fs::read(s.path("teacher/tokenizer.json")).unwrap(),
        std::fs::read(s.path("student/tokenizer.json")).unwrap()
    );
    // eval reproduces the run's final validation loss on the same split.
    let eval = ok(&["eval", "--model", &student, "--data", &data]);
    let e: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    let (a, b) = (
        e["val_loss"].as_f64().unwrap(),
        summary["val_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-5 * b, "eval {a} vs run {b}");
    let text = ok(&[
        "sample", "--model", &student, "--prompt", "The", "--tokens", "8",
    ]);
    assert!(text.starts_with("The"), "{text}");
}

#[test]
fn bad_inputs_fail_with_clear_errors_and_lose_nothing() {
    let s = Scratch::new("bad");
    write_corpus(&s.path("data.txt"), 120);
    let data = s.s("data.txt");
    let run = s.s("run");
    ok(&train_args(&data, &run, "3"));
    let before = std::fs::read(s.path("run/model.safetensors")).unwrap();

    // Missing and empty data, non-UTF-8 file (named).
    let e = fails(&train_args(&s.s("nope.txt"), &s.s("o1"), "3"));
    assert!(e.contains("nope.txt"), "{e}");
    std::fs::write(s.path("empty.txt"), "").unwrap();
    let e = fails(&train_args(&s.s("empty.txt"), &s.s("o2"), "3"));
    assert!(e.contains("empty.txt"), "{e}");
    std::fs::create_dir_all(s.path("dir")).unwrap();
    std::fs::copy(s.path("data.txt"), s.path("dir/a.txt")).unwrap();
    std::fs::write(s.path("dir/b.txt"), b"ok\xff\xfe").unwrap();
    let e = fails(&train_args(&s.s("dir"), &s.s("o3"), "3"));
    assert!(e.contains("b.txt") && e.contains("UTF-8"), "{e}");

    // An output directory that holds another run.
    let e = fails(&train_args(&data, &run, "3"));
    assert!(e.contains("--resume") && e.contains("--force"), "{e}");
    assert_eq!(
        before,
        std::fs::read(s.path("run/model.safetensors")).unwrap()
    );

    // --force with a bad option: refused before the previous run is removed.
    let mut forced = train_args(&data, &run, "0");
    forced.push("--force");
    let e = fails(&forced);
    assert!(e.contains("steps"), "{e}");
    assert_eq!(
        before,
        std::fs::read(s.path("run/model.safetensors")).unwrap(),
        "--force removed the run before checking the command"
    );

    // A student whose vocabulary differs from the teacher's.
    let cfg = std::fs::read_to_string(s.path("run/config.json")).unwrap();
    let other = cfg.replace("\"vocab_size\": 300", "\"vocab_size\": 301");
    assert_ne!(cfg, other, "config.json spells vocab_size as expected");
    std::fs::write(s.path("other.json"), other).unwrap();
    let distill_base = |out: &str, extra: &[&str]| {
        let mut d: Vec<String> = [
            "distill",
            "--teacher",
            &run,
            "--data",
            &data,
            "--out",
            out,
            "--steps",
            "2",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        d.extend(FAST.iter().map(|x| x.to_string()));
        d.extend(extra.iter().map(|x| x.to_string()));
        d
    };
    let args = distill_base(&s.s("o4"), &["--config", &s.s("other.json")]);
    let e = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("vocab"), "{e}");

    // A hidden-layer map out of range.
    let args = distill_base(
        &s.s("o5"),
        &["--hidden-weight", "1", "--hidden-layers", "1:9"],
    );
    let e = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("1:9"), "{e}");

    // The student written over its own teacher, even with --force.
    let args = distill_base(&run, &["--force"]);
    let e = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("teacher's directory"), "{e}");
    assert_eq!(
        before,
        std::fs::read(s.path("run/model.safetensors")).unwrap()
    );

    // A truncated checkpoint.
    std::fs::copy(s.path("run/model.safetensors"), s.path("keep.safetensors")).unwrap();
    std::fs::write(s.path("run/model.safetensors"), &before[..before.len() / 2]).unwrap();
    let args = distill_base(&s.s("o6"), &[]);
    let e = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(!s.path("o6/model.safetensors").exists());
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint() {
    let s = Scratch::new("nan");
    write_corpus(&s.path("data.txt"), 120);
    let data = s.s("data.txt");
    let run = s.s("run");
    let mut a = train_args(&data, &run, "50");
    a.extend(["--lr", "1e30", "--warmup", "0", "--checkpoint-every", "1"]);
    let e = fails(&a);
    assert!(e.contains("training stopped at step"), "{e}");
    let step: u64 = e
        .split("step ")
        .nth(1)
        .and_then(|x| x.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|x| x.parse().ok())
        .expect("the error names the step");
    let (_, params) = distill_kernels::train::checkpoint::load_model_dir(&s.path("run")).unwrap();
    assert!(
        params.iter().all(|x| x.is_finite()),
        "the kept checkpoint is good"
    );
    let (_, saved) = distill_kernels::train::checkpoint::load_weights(
        &s.path("run/model.safetensors"),
        &distill_kernels::train::checkpoint::load_model_dir(&s.path("run"))
            .unwrap()
            .0,
    )
    .unwrap();
    assert_eq!(
        saved,
        Some(step - 1),
        "the checkpoint is the last good step"
    );
}

#[test]
fn a_small_demo_writes_the_three_runs_and_the_comparison() {
    let s = Scratch::new("demo");
    let out = s.s("demo");
    let line = ok(&[
        "demo",
        "--out",
        &out,
        "--teacher-steps",
        "12",
        "--student-steps",
        "8",
        "--train-docs",
        "300",
        "--val-docs",
        "40",
    ]);
    let summary: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    let metrics = s.json("demo/metrics.json");
    for run in ["teacher", "student_hard", "student_kd"] {
        let m = &metrics[run];
        for key in [
            "val_loss",
            "val_ppl",
            "steps",
            "train_tokens",
            "tokens_per_s",
            "params",
            "wall_s",
        ] {
            assert!(m[key].is_number(), "{run}.{key} missing: {m}");
        }
        assert!(s.path("demo").join(run).join("model.safetensors").is_file());
        assert_eq!(
            metrics[run]["val_loss"],
            summary[format!("{run}_val_loss")],
            "the printed line and metrics.json agree"
        );
    }
    assert_eq!(metrics["teacher"]["steps"], 12);
    assert_eq!(metrics["student_kd"]["steps"], 8);
    let floor = metrics["entropy_floor"].as_f64().unwrap();
    assert!(floor > 0.1 && floor < metrics["teacher"]["val_loss"].as_f64().unwrap());
    assert!(s.path("demo/loss_curves.png").is_file());
    // A second demo into the same directory replaces its runs instead of refusing.
    ok(&[
        "demo",
        "--out",
        &out,
        "--teacher-steps",
        "2",
        "--student-steps",
        "2",
        "--train-docs",
        "300",
        "--val-docs",
        "40",
    ]);
}
