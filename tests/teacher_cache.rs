//! `distill cache-teacher` and `distill distill --teacher-cache`: the cache is byte-identical
//! however often its build is killed (`kill -9`) and restarted, a student trains from it on the
//! cpu and on the emulated device with the same loss curve, and a cache that does not fit the
//! data, the options or the window length is refused with an error that says why.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use distill_kernels::data::corpus::Corpus;
use rand::{Rng, SeedableRng};

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .output()
        .expect("the distill binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = distill(args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "distill {args:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn fails(args: &[&str]) -> String {
    let out = distill(args);
    assert!(!out.status.success(), "distill {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dk-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn s(&self, rel: &str) -> String {
        self.0.join(rel).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_corpus(path: &str, seed: u64, docs: usize) {
    let c = Corpus::synthetic(seed, docs, 1);
    let text: Vec<&str> = c.train.iter().map(|d| d.text.as_str()).collect();
    std::fs::write(path, text.join("\n\n")).unwrap();
}

/// A teacher trained for a few steps on `data`.
fn teacher(s: &Scratch, data: &str) -> String {
    let out = s.s("teacher");
    ok(&[
        "train",
        "--data",
        data,
        "--out",
        &out,
        "--steps",
        "4",
        "--batch",
        "4",
        "--seq",
        "32",
        "--vocab-size",
        "300",
        "--config",
        "small",
    ]);
    out
}

/// Every file of a directory, by name, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn cache_args<'a>(teacher: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "cache-teacher",
        "--teacher",
        teacher,
        "--data",
        data,
        "--out",
        out,
        "--top-k",
        "8",
        "--seq",
        "32",
        "--windows-per-shard",
        "3",
        "--batch",
        "2",
    ]
}

#[test]
fn a_cache_killed_at_random_moments_resumes_to_the_same_bytes() {
    let s = Scratch::new("resume");
    let data = s.s("data.txt");
    write_corpus(&data, 7, 60);
    let teacher = teacher(&s, &data);
    let whole = s.s("whole");
    let line = ok(&cache_args(&teacher, &data, &whole));
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let shards = v["shards"].as_u64().unwrap();
    assert!(shards >= 6, "{line}");
    assert_eq!(v["shards_computed"], v["shards"], "{line}");

    // The same cache, its build killed with SIGKILL after a random delay, again and again.
    let killed = s.s("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut kills = 0;
    for _ in 0..6 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_distill"))
            .args(cache_args(&teacher, &data, &killed))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..400)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    let line = ok(&cache_args(&teacher, &data, &killed));
    assert!(
        kills > 0,
        "no build was interrupted: make the corpus larger"
    );
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert!(v["shards_computed"].as_u64().unwrap() < shards, "{line}");
    assert_eq!(files(Path::new(&whole)), files(Path::new(&killed)));

    // A student trains from it on the cpu and on the emulated device, the same curve.
    let mut losses = Vec::new();
    for device in ["cpu", "emulated"] {
        let out = s.s(&format!("student-{device}"));
        let line = ok(&[
            "distill",
            "--teacher-cache",
            &whole,
            "--data",
            &data,
            "--out",
            &out,
            "--steps",
            "5",
            "--batch",
            "4",
            "--eval-every",
            "5",
            "--temperature",
            "2",
            "--alpha",
            "0.7",
            "--device",
            device,
        ]);
        let sum: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
        assert!(sum["val_loss"].as_f64().unwrap().is_finite(), "{line}");
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(Path::new(&out).join("metrics.json")).unwrap())
                .unwrap();
        let train: Vec<f64> = metrics["metrics"]["train_curve"]
            .as_array()
            .unwrap_or_else(|| panic!("{metrics}"))
            .iter()
            .map(|p| p[1].as_f64().unwrap())
            .collect();
        assert_eq!(train.len(), 5, "{metrics}");
        losses.push(train);
    }
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "cpu {a} vs emulated {b}");
    }
}

#[test]
fn a_cache_that_does_not_fit_is_refused() {
    let s = Scratch::new("refuse");
    let data = s.s("data.txt");
    write_corpus(&data, 7, 30);
    let teacher = teacher(&s, &data);
    let cache = s.s("cache");
    ok(&cache_args(&teacher, &data, &cache));
    let student = s.s("student");
    let base = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "distill",
            "--teacher-cache",
            &cache,
            "--out",
            &student,
            "--steps",
            "2",
            "--batch",
            "2",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |args: Vec<String>| fails(&args.iter().map(|x| x.as_str()).collect::<Vec<_>>());

    let other = s.s("other.txt");
    write_corpus(&other, 8, 30);
    let mut a = base(&[]);
    a.extend(["--data".into(), other.clone()]);
    let e = run(a);
    assert!(e.contains("made from other data"), "{e}");

    let mut a = base(&["--seq", "16"]);
    a.extend(["--data".into(), data.clone()]);
    let e = run(a);
    assert!(e.contains("holds windows of 32 tokens"), "{e}");

    let mut a = base(&["--hidden-weight", "1", "--hidden-layers", "1:1"]);
    a.extend(["--data".into(), data.clone()]);
    let e = run(a);
    assert!(e.contains("holds no hidden states"), "{e}");

    // Another k into the same directory: the settings differ from the manifest's.
    let mut args = cache_args(&teacher, &data, &cache);
    args[8] = "4";
    let e = fails(&args);
    assert!(
        e.contains("other settings") && e.contains("k differ"),
        "{e}"
    );

    // A shard lost: the cache is incomplete, and the same command finishes it.
    std::fs::remove_file(Path::new(&cache).join("train-00001.safetensors")).unwrap();
    let mut a = base(&[]);
    a.extend(["--data".into(), data.clone()]);
    let e = run(a);
    assert!(
        e.contains("incomplete") && e.contains("cache-teacher"),
        "{e}"
    );
    let line = ok(&cache_args(&teacher, &data, &cache));
    assert!(line.contains("\"shards_computed\":1"), "{line}");

    let e = fails(&["distill", "--data", &data, "--out", &student]);
    assert!(e.contains("--teacher"), "{e}");
}

/// The train-loss curve of a finished run.
fn curve(out: &str) -> Vec<f64> {
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(out).join("metrics.json")).unwrap())
            .unwrap();
    metrics["metrics"]["train_curve"]
        .as_array()
        .unwrap_or_else(|| panic!("{metrics}"))
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect()
}

#[test]
fn an_ensemble_of_two_teachers_live_or_cached_trains_alike_on_every_device() {
    let s = Scratch::new("ensemble");
    let data = s.s("data.txt");
    write_corpus(&data, 7, 40);
    let a = teacher(&s, &data);
    let b = s.s("teacher_b");
    ok(&[
        "train",
        "--data",
        &data,
        "--out",
        &b,
        "--steps",
        "3",
        "--batch",
        "4",
        "--seq",
        "32",
        "--vocab-size",
        "300",
        "--seed",
        "9",
    ]);
    let (ca, cb) = (s.s("cache_a"), s.s("cache_b"));
    ok(&cache_args(&a, &data, &ca));
    ok(&cache_args(&b, &data, &cb));
    let common = [
        "--data",
        &data,
        "--steps",
        "4",
        "--batch",
        "4",
        "--seq",
        "32",
        "--eval-every",
        "4",
        "--temperature",
        "2",
        "--alpha",
        "0.7",
        "--teacher-weights",
        "0.7,0.3",
    ];
    for (name, teachers) in [
        ("live", ["--teacher", a.as_str(), "--teacher", b.as_str()]),
        (
            "cached",
            [
                "--teacher-cache",
                ca.as_str(),
                "--teacher-cache",
                cb.as_str(),
            ],
        ),
    ] {
        let mut curves = Vec::new();
        for device in ["cpu", "emulated"] {
            let out = s.s(&format!("{name}-{device}"));
            let mut args = vec!["distill", "--out", &out, "--device", device];
            args.extend(teachers);
            args.extend(common);
            ok(&args);
            curves.push(curve(&out));
        }
        assert_eq!(curves[0].len(), 4);
        for (x, y) in curves[0].iter().zip(&curves[1]) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs(),
                "{name}: cpu {x} vs emulated {y}"
            );
        }
    }
    // One weight per teacher.
    let e = fails(&[
        "distill",
        "--teacher",
        &a,
        "--teacher",
        &b,
        "--teacher-weights",
        "1",
        "--data",
        &data,
        "--out",
        &s.s("bad"),
    ]);
    assert!(e.contains("2 teachers"), "{e}");
}

#[test]
fn a_run_from_a_cache_resumes_bit_for_bit() {
    // Six steps straight, and three then three more resumed: the same weights, the same loss
    // curves (the history goes through JSON and back exactly).
    let s = Scratch::new("cache-resume");
    let data = s.s("data.txt");
    write_corpus(&data, 7, 30);
    let teacher = teacher(&s, &data);
    let cache = s.s("cache");
    ok(&cache_args(&teacher, &data, &cache));
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "distill",
            "--teacher-cache",
            &cache,
            "--data",
            &data,
            "--out",
            out,
            "--steps",
            "6",
            "--batch",
            "2",
            "--eval-every",
            "3",
            "--temperature",
            "2",
            "--alpha",
            "0.5",
        ];
        args.extend_from_slice(extra);
        ok(&args);
    };
    let (straight, resumed) = (s.s("straight"), s.s("resumed"));
    run(&straight, &[]);
    run(&resumed, &["--stop-at", "3"]);
    run(&resumed, &["--resume"]);
    let read = |dir: &str, f: &str| std::fs::read(Path::new(dir).join(f)).unwrap();
    assert!(read(&straight, "model.safetensors") == read(&resumed, "model.safetensors"));
    let curves = |dir: &str| {
        let m: serde_json::Value = serde_json::from_slice(&read(dir, "metrics.json")).unwrap();
        (
            m["metrics"]["train_curve"].clone(),
            m["metrics"]["val_curve"].clone(),
        )
    };
    assert_eq!(curves(&straight), curves(&resumed));
}
