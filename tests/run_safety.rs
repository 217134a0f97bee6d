//! Run safety through the `distill` binary: a run killed at any fsync of a save, killed at random
//! moments, or stopped by a full disk loses nothing complete and resumes to the same bits as an
//! uninterrupted run; a locked run directory is refused to a second run and changes nothing;
//! `--force` puts the previous run back when the new one fails or dies before its first
//! checkpoint; oversized settings fail before allocating; and the smaller refusals of the issue
//! are clear one-line errors that leave no temporaries behind.
//!
//! Every fault is injected through `DISTILL_FAULT` (see `src/train/files.rs`), `Child::kill`
//! (SIGKILL) or `kill -TERM/-STOP/-CONT`. Randomness is seeded; only the moments of the random
//! kills depend on the machine's speed, and every outcome of a kill is handled.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use distill_kernels::data::corpus::Corpus;
use distill_kernels::train::checkpoint::load_trainer_state;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

// ---------------------------------------------------------------------------------------------
// Running the binary

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_distill")
}

/// Runs `distill ARGS` with extra environment variables (and without an inherited
/// `DISTILL_FAULT`).
fn distill_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("DISTILL_FAULT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the distill binary runs")
}

fn distill<S: AsRef<OsStr>>(args: &[S]) -> Output {
    distill_env(args, &[])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last stderr line that starts with `error: `.
fn last_error_in(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .find(|l| l.starts_with("error: "))
        .map(str::to_string)
}

fn last_error(out: &Output) -> Option<String> {
    last_error_in(&stderr(out))
}

fn show<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command that must succeed; returns its output.
fn ok<S: AsRef<OsStr>>(args: &[S]) -> Output {
    let out = distill(args);
    assert!(
        out.status.success(),
        "distill {} failed ({:?}): {}",
        show(args),
        out.status,
        stderr(&out)
    );
    out
}

/// Checks that a finished command failed cleanly (status 1, no panic, no allocator abort) and
/// returns its last `error: ` line.
fn clean_failure(what: &str, out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected exit status 1, got {:?}: {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    assert!(
        !err.contains("memory allocation of"),
        "{what} aborted in the allocator: {err}"
    );
    last_error(out).unwrap_or_else(|| panic!("{what}: no `error: ` line on stderr: {err}"))
}

/// Runs a command that must fail cleanly; returns its last `error: ` line.
fn fails_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> String {
    let out = distill_env(args, env);
    clean_failure(&format!("distill {}", show(args)), &out)
}

fn fails<S: AsRef<OsStr>>(args: &[S]) -> String {
    fails_env(args, &[])
}

/// `distill train --data DATA --out OUT --steps STEPS` with the fast settings and `extra`.
fn train(data: &Path, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "train".into(),
        "--data".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--steps".into(),
        steps.to_string(),
    ];
    a.extend(FAST.iter().map(|s| s.to_string()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Small and fast: a run of a few steps takes a fraction of a second.
const FAST: [&str; 8] = [
    "--batch",
    "4",
    "--seq",
    "32",
    "--eval-every",
    "5",
    "--vocab-size",
    "300",
];

/// A child process that is SIGKILLed if the test ends (or panics) while it still runs.
struct Background(Option<Child>);

impl Background {
    fn spawn<S: AsRef<OsStr>>(args: &[S], log: &Path) -> Background {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(bin())
            .args(args)
            .env_remove("DISTILL_FAULT")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("the distill binary starts");
        Background(Some(child))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }

    /// SIGSTOP, returning once the kernel reports the process stopped.
    fn freeze(&self) {
        self.signal("STOP");
        let stat = format!("/proc/{}/stat", self.pid());
        wait_for("the process to stop", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&stat).unwrap_or_default();
            let state = text.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            state.is_some_and(|r| r.starts_with('T') || r.starts_with('t'))
        });
    }

    fn sigkill(&mut self) {
        let _ = self.0.as_mut().unwrap().kill();
    }

    fn wait(mut self) -> std::process::ExitStatus {
        self.0.take().unwrap().wait().unwrap()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `ready` every 10 ms until it holds; panics naming `what` after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Files

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dk-run-safety-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A text file of synthetic documents separated by blank lines.
fn write_corpus(path: &Path, seed: u64, docs: usize) {
    let c = Corpus::synthetic(seed, docs, 1);
    let text: Vec<&str> = c.train.iter().map(|d| d.text.as_str()).collect();
    std::fs::write(path, text.join("\n\n")).unwrap();
}

/// Copies a directory tree (hidden entries included).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Every file under `dir` (relative path -> bytes) and every directory (`path/` -> empty);
/// `.lock` is left out when `skip_lock`.
fn snapshot(dir: &Path, skip_lock: bool) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, skip_lock: bool, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in rd {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if skip_lock && rel == ".lock" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(root, &path, skip_lock, out);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, skip_lock, &mut out);
    out
}

/// What differs between two snapshots, for messages.
fn snapshot_diff(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) -> String {
    let mut lines = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => lines.push(format!("gone: {k}")),
            Some(w) if w != v => lines.push(format!("changed: {k}")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            lines.push(format!("new: {k}"));
        }
    }
    lines.join(", ")
}

/// Temporaries (`.NAME.PID.tmp`, files or directories) anywhere under `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    snapshot(dir, false)
        .keys()
        .filter(|k| {
            let name = k.trim_end_matches('/').rsplit('/').next().unwrap();
            name.starts_with('.') && name.ends_with(".tmp")
        })
        .cloned()
        .collect()
}

fn generation_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The steps of the complete generations in `run/checkpoints` (a `step-N` directory holding the
/// four checkpoint files), ascending.
fn complete_generations(run: &Path) -> Vec<u64> {
    let Ok(rd) = std::fs::read_dir(run.join("checkpoints")) else {
        return Vec::new();
    };
    let mut steps: Vec<u64> = rd
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
            let complete = [
                "config.json",
                "tokenizer.json",
                "model.safetensors",
                "trainer_state.safetensors",
            ]
            .iter()
            .all(|f| e.path().join(f).is_file());
            complete.then_some(step)
        })
        .collect();
    steps.sort();
    steps
}

/// The names in `run/checkpoints`, sorted.
fn checkpoint_names(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Compares two checkpoint generations: the model, config and tokenizer byte for byte; the
/// trainer state in everything but its wall-clock seconds (step, AdamW moments bit for bit, the
/// train and validation loss curves).
fn compare_generations(got: &Path, want: &Path) -> Result<(), String> {
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        let a = std::fs::read(got.join(file)).map_err(|e| format!("{file}: {e}"))?;
        let b = std::fs::read(want.join(file)).map_err(|e| format!("reference {file}: {e}"))?;
        if a != b {
            return Err(format!("{file} differs from the reference's"));
        }
    }
    let state = |dir: &Path| {
        load_trainer_state(&dir.join("trainer_state.safetensors"))
            .map_err(|e| format!("trainer state of {}: {e}", dir.display()))
    };
    let (x, y) = (state(got)?, state(want)?);
    if x.step != y.step {
        return Err(format!("trainer state step {} vs {}", x.step, y.step));
    }
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    if bits(&x.adam_m) != bits(&y.adam_m) {
        return Err("AdamW first moments differ".into());
    }
    if bits(&x.adam_v) != bits(&y.adam_v) {
        return Err("AdamW second moments differ".into());
    }
    for key in ["train", "val"] {
        if x.meta["history"][key] != y.meta["history"][key] {
            return Err(format!("the {key} loss curve differs"));
        }
    }
    Ok(())
}

/// Compares a finished run with a reference run: generation `step` as
/// [`compare_generations`] does, and the top-level copy of the model, which must be the newest
/// generation's.
fn compare_runs(got: &Path, want: &Path, step: u64) -> Result<(), String> {
    let g = format!("checkpoints/{}", generation_name(step));
    compare_generations(&got.join(&g), &want.join(&g)).map_err(|e| format!("{g}: {e}"))?;
    let top = |run: &Path| std::fs::read(run.join("model.safetensors"));
    match (top(got), top(want)) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Ok(a), Ok(_)) => {
            // Name the generation it is a copy of, if any.
            let older = (0..step).rev().find(|s| {
                let p = format!("checkpoints/{}/model.safetensors", generation_name(*s));
                [got, want]
                    .iter()
                    .any(|run| std::fs::read(run.join(&p)).is_ok_and(|b| b == a))
            });
            let what = match older {
                Some(s) => format!("it is the model of step {s}"),
                None => "it is no generation's model".into(),
            };
            Err(format!(
                "OUT/model.safetensors differs from the reference's: {what}, while the newest \
                 generation is {g}"
            ))
        }
        (a, b) => Err(format!(
            "OUT/model.safetensors: {:?} / reference {:?}",
            a.err(),
            b.err()
        )),
    }
}

fn assert_no_temporaries(run: &Path, when: &str) {
    let t = temporaries(run);
    assert!(
        t.is_empty(),
        "{when}: temporaries left in {}: {t:?}",
        run.display()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. A kill at every fsync of a save

#[test]
fn a_kill_at_every_fsync_of_a_save_loses_nothing_and_resumes_bit_exact() {
    let s = Scratch::new("kill-at-sync");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let base = s.path("base");
    ok(&train(
        &data,
        &base,
        6,
        &["--stop-at", "2", "--checkpoint-every", "1"],
    ));
    let resume = |out: &Path| {
        train(
            &data,
            out,
            6,
            &["--stop-at", "3", "--checkpoint-every", "1", "--resume"],
        )
    };
    let reference = s.path("reference");
    copy_dir(&base, &reference);
    ok(&resume(&reference));
    assert_eq!(complete_generations(&reference), vec![2, 3]);
    let base_gen2 = snapshot(&base.join("checkpoints/step-00000002"), false);

    let mut failures: Vec<String> = Vec::new();
    let (mut killed, mut resumed, mut exact) = (0usize, 0usize, 0usize);
    let mut finished_at = None;
    for n in 1..=200u64 {
        let run = s.path(&format!("kill-{n}"));
        copy_dir(&base, &run);
        let fault = format!("kill-at-sync={n}");
        let out = distill_env(&resume(&run), &[("DISTILL_FAULT", fault.as_str())]);
        if out.status.success() {
            // Past the last fsync of the command: every point was tried.
            finished_at = Some(n);
            let _ = std::fs::remove_dir_all(&run);
            break;
        }
        let point = |msg: String| format!("{fault}: {msg}");
        if out.status.signal() != Some(9) {
            failures.push(point(format!(
                "ended with {:?} instead of SIGKILL: {:?}",
                out.status,
                last_error(&out)
            )));
            continue;
        }
        killed += 1;
        // Nothing complete was lost: generation 2 is as it was, the newest is 2 or 3.
        let gen2 = snapshot(&run.join("checkpoints/step-00000002"), false);
        if gen2 != base_gen2 {
            failures.push(point(format!(
                "checkpoints/step-00000002 changed: {}",
                snapshot_diff(&base_gen2, &gen2)
            )));
        }
        let newest = complete_generations(&run).last().copied();
        if !matches!(newest, Some(2 | 3)) {
            failures.push(point(format!("newest complete generation is {newest:?}")));
            continue;
        }
        let newest = newest.unwrap();
        let again = distill(&resume(&run));
        if !again.status.success() {
            failures.push(point(format!(
                "the resume without fault failed: {:?}",
                last_error(&again)
            )));
            continue;
        }
        let said = format!(
            "resuming from checkpoints/{} (step {newest})",
            generation_name(newest)
        );
        if stderr(&again).contains(&said) {
            resumed += 1;
        } else {
            failures.push(point(format!(
                "the resume does not say `{said}`: {}",
                stderr(&again)
            )));
        }
        let mut fine = true;
        if let Err(e) = compare_runs(&run, &reference, 3) {
            failures.push(point(format!("after the resume: {e}")));
            fine = false;
        }
        let t = temporaries(&run);
        if !t.is_empty() {
            failures.push(point(format!("temporaries left after the resume: {t:?}")));
            fine = false;
        }
        exact += fine as usize;
        if fine {
            let _ = std::fs::remove_dir_all(&run);
        }
    }
    eprintln!("kill-at-sync: {killed} points, {resumed} resumed, {exact} bit-exact");
    assert!(
        finished_at.is_some(),
        "the command never finished without a kill"
    );
    assert!(
        killed >= 10,
        "only {killed} kill points: the save is not covered"
    );
    assert!(
        failures.is_empty(),
        "{} of {killed} kill points went wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Random kills during training

#[test]
fn random_kills_during_training_resume_to_the_bits_of_a_straight_run() {
    let s = Scratch::new("random-kills");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    // The straight run keeps every generation so that each one a killed run leaves can be
    // compared with the generation of the same step.
    let straight = s.path("straight");
    let t0 = Instant::now();
    ok(&train(
        &data,
        &straight,
        12,
        &["--checkpoint-every", "1", "--keep-checkpoints", "13"],
    ));
    let wall = t0.elapsed();
    assert_eq!(
        complete_generations(&straight),
        (1..=12).collect::<Vec<_>>()
    );

    // A resumed run is shorter than a fresh one, so one sequence of kills ends after a few;
    // sequences are repeated (each into a fresh directory) until MAX_KILLS kills have landed.
    const MAX_KILLS: usize = 10;
    const MAX_SEQUENCES: usize = 8;
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Mode {
        Fresh,
        Resume,
        Force,
    }
    let mut rng = StdRng::seed_from_u64(0x15_5AFE);
    let (mut kills, mut resumed, mut compared, mut exact) = (0usize, 0usize, 0usize, 0usize);
    let (mut sequences, mut finals_exact) = (0usize, 0usize);
    let mut failures: Vec<String> = Vec::new();
    while kills < MAX_KILLS && sequences < MAX_SEQUENCES {
        sequences += 1;
        let run = s.path(&format!("killed-{sequences}"));
        let mut mode = Mode::Fresh;
        let mut done = false;
        for attempt in 0..3 * MAX_KILLS + 5 {
            let mut extra = vec!["--checkpoint-every", "1"];
            match mode {
                Mode::Fresh => {}
                Mode::Resume => extra.push("--resume"),
                Mode::Force => extra.push("--force"),
            }
            let args = train(&data, &run, 12, &extra);
            let mut child = Command::new(bin())
                .args(&args)
                .env_remove("DISTILL_FAULT")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            if kills < MAX_KILLS {
                std::thread::sleep(wall.mul_f64(rng.gen::<f64>()));
                let _ = child.kill();
            }
            let out = child.wait_with_output().unwrap();
            let err = stderr(&out);
            if mode == Mode::Resume && err.contains("resuming from checkpoints/step-") {
                resumed += 1;
            }
            if out.status.signal() == Some(9) {
                kills += 1;
                // Every complete generation the killed run left equals the straight run's.
                for step in complete_generations(&run) {
                    let g = format!("checkpoints/{}", generation_name(step));
                    compared += 1;
                    match compare_generations(&run.join(&g), &straight.join(&g)) {
                        Ok(()) => exact += 1,
                        Err(e) => failures.push(format!(
                            "sequence {sequences}, after kill {kills}: {g}: {e}"
                        )),
                    }
                }
                mode = Mode::Resume;
                continue;
            }
            if out.status.success() {
                done = true;
                break;
            }
            let e = last_error(&out).unwrap_or_default();
            if mode == Mode::Resume && e.contains("holds no complete checkpoint") {
                // The kill landed before the first checkpoint: start afresh.
                mode = Mode::Force;
                continue;
            }
            failures.push(format!(
                "sequence {sequences}, attempt {attempt} ({mode:?}) failed with {:?}: {err}",
                out.status
            ));
            break;
        }
        if !done {
            failures.push(format!("sequence {sequences}: the run never completed"));
            continue;
        }
        compared += 1;
        match compare_runs(&run, &straight, 12) {
            Ok(()) => {
                exact += 1;
                finals_exact += 1;
            }
            Err(e) => failures.push(format!("sequence {sequences}, the finished run: {e}")),
        }
        let t = temporaries(&run);
        if !t.is_empty() {
            failures.push(format!(
                "sequence {sequences}: temporaries left by the finished run: {t:?}"
            ));
        }
    }
    eprintln!(
        "random kills: {kills} kills in {sequences} runs, {resumed} resumed, {exact} of \
         {compared} generations bit-exact, {finals_exact} of {sequences} finished runs bit-exact \
         (straight run {wall:?})"
    );
    assert!(kills >= 5, "only {kills} kills landed in {sequences} runs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 3. A full disk

#[test]
fn a_full_disk_at_any_byte_of_a_save_loses_nothing_and_the_resume_is_bit_exact() {
    let s = Scratch::new("enospc");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let base = s.path("base");
    ok(&train(
        &data,
        &base,
        6,
        &["--stop-at", "2", "--checkpoint-every", "1"],
    ));
    let resume = |out: &Path| {
        train(
            &data,
            out,
            6,
            &["--stop-at", "3", "--checkpoint-every", "1", "--resume"],
        )
    };
    let reference = s.path("reference");
    copy_dir(&base, &reference);
    ok(&resume(&reference));
    let base_gen2 = snapshot(&base.join("checkpoints/step-00000002"), false);
    let save_bytes: u64 = base_gen2.values().map(|v| v.len() as u64).sum();
    assert!(
        save_bytes > 100_000,
        "a generation holds {save_bytes} bytes"
    );

    let mut budgets = vec![0u64, 1, 1000];
    for f in [0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 2.0] {
        budgets.push((save_bytes as f64 * f) as u64);
    }
    let (mut full, mut succeeded, mut exact) = (0usize, 0usize, 0usize);
    let mut failures: Vec<String> = Vec::new();
    for &b in &budgets {
        let run = s.path(&format!("enospc-{b}"));
        copy_dir(&base, &run);
        let fault = format!("enospc-after={b}");
        let out = distill_env(&resume(&run), &[("DISTILL_FAULT", fault.as_str())]);
        let point = |msg: String| format!("{fault}: {msg}");
        if out.status.success() {
            succeeded += 1;
        } else {
            let e = last_error(&out).unwrap_or_default();
            let err = stderr(&out);
            if out.status.code() != Some(1)
                || !e.contains("No space left on device")
                || err.contains("panicked")
            {
                failures.push(point(format!(
                    "expected exit 1 with `No space left on device`, got {:?}: {err}",
                    out.status
                )));
                continue;
            }
            full += 1;
            // A failed write removes what it started.
            let t = temporaries(&run);
            if !t.is_empty() {
                failures.push(point(format!("temporaries left by the failed run: {t:?}")));
            }
        }
        let gen2 = snapshot(&run.join("checkpoints/step-00000002"), false);
        if gen2 != base_gen2 {
            failures.push(point(format!(
                "checkpoints/step-00000002 changed: {}",
                snapshot_diff(&base_gen2, &gen2)
            )));
        }
        let again = distill(&resume(&run));
        if !again.status.success() {
            failures.push(point(format!(
                "the resume without fault failed: {:?}",
                last_error(&again)
            )));
            continue;
        }
        let mut fine = true;
        if let Err(e) = compare_runs(&run, &reference, 3) {
            failures.push(point(format!("after the resume: {e}")));
            fine = false;
        }
        let t = temporaries(&run);
        if !t.is_empty() {
            failures.push(point(format!("temporaries left after the resume: {t:?}")));
            fine = false;
        }
        exact += fine as usize;
    }
    eprintln!(
        "full disk: {} budgets (a save is {save_bytes} bytes), {full} failed with ENOSPC, \
         {succeeded} succeeded, {exact} resumed bit-exact",
        budgets.len()
    );
    assert!(
        full >= 5,
        "only {full} budgets hit the full disk: {budgets:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 4. Two runs in one directory

fn lock_pid(run: &Path) -> String {
    std::fs::read_to_string(run.join(".lock"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn a_second_run_into_a_locked_directory_is_refused_and_changes_nothing() {
    let s = Scratch::new("locked");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let out = s.path("run");
    let long = train(&data, &out, 20000, &["--checkpoint-every", "20"]);
    let a = Background::spawn(&long, &s.path("a.log"));
    let pid = a.pid().to_string();
    wait_for("the run to take its lock", Duration::from_secs(60), || {
        lock_pid(&out) == pid
    });

    // With A frozen, B's attempts must leave every byte as it was.
    let attempts = |when: &str, with_checkpoint: bool| {
        a.freeze();
        let before = snapshot(&out, false);
        let mut tries: Vec<(&str, Vec<String>)> = vec![
            ("fresh", train(&data, &out, 3, &[])),
            ("--force", train(&data, &out, 3, &["--force"])),
        ];
        if with_checkpoint {
            tries.push((
                "--resume",
                train(
                    &data,
                    &out,
                    20000,
                    &["--checkpoint-every", "20", "--resume"],
                ),
            ));
        }
        for (name, args) in &tries {
            let e = fails(args);
            assert!(
                e.contains(&format!("is in use by process {pid}")),
                "{when}, B {name}: {e}"
            );
            let after = snapshot(&out, false);
            assert!(
                before == after,
                "{when}, B {name} changed the directory: {}",
                snapshot_diff(&before, &after)
            );
        }
        a.signal("CONT");
    };
    attempts("before A's first checkpoint", false);
    wait_for("A's first checkpoint", Duration::from_secs(120), || {
        !complete_generations(&out).is_empty()
    });
    attempts("after A's first checkpoint", true);

    // SIGTERM: A removes its temporaries and exits with 128 + 15.
    a.signal("TERM");
    let status = a.wait();
    let log = std::fs::read_to_string(s.path("a.log")).unwrap();
    assert_eq!(
        status.code(),
        Some(143),
        "A after SIGTERM: {status:?}: {log}"
    );
    let e = last_error_in(&log).unwrap_or_default();
    assert!(e.contains("interrupted by signal 15"), "{log}");
    assert_no_temporaries(&out, "after SIGTERM");
    assert!(!out.join(".replaced").exists());

    let newest = *complete_generations(&out).last().unwrap();
    let stop = (newest + 2).to_string();
    let r = ok(&train(
        &data,
        &out,
        20000,
        &["--checkpoint-every", "20", "--resume", "--stop-at", &stop],
    ));
    let said = format!(
        "resuming from checkpoints/{} (step {newest})",
        generation_name(newest)
    );
    assert!(stderr(&r).contains(&said), "{}", stderr(&r));
    assert_eq!(*complete_generations(&out).last().unwrap(), newest + 2);
    assert_no_temporaries(&out, "after the resume");
}

#[test]
fn a_lock_left_by_a_killed_run_is_taken_over_by_the_resume() {
    let s = Scratch::new("stale-lock");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let out = s.path("run");
    let long = train(&data, &out, 20000, &["--checkpoint-every", "10"]);
    let mut c = Background::spawn(&long, &s.path("c.log"));
    let pid = c.pid().to_string();
    wait_for(
        "the run's first checkpoint",
        Duration::from_secs(120),
        || !complete_generations(&out).is_empty(),
    );
    c.sigkill();
    let status = c.wait();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert_eq!(lock_pid(&out), pid, "the lock file names the dead run");

    let newest = *complete_generations(&out).last().unwrap();
    let stop = (newest + 1).to_string();
    let r = ok(&train(
        &data,
        &out,
        20000,
        &["--checkpoint-every", "10", "--resume", "--stop-at", &stop],
    ));
    let said = format!(
        "resuming from checkpoints/{} (step {newest})",
        generation_name(newest)
    );
    assert!(stderr(&r).contains(&said), "{}", stderr(&r));
    assert_ne!(lock_pid(&out), pid, "the resume took the lock over");
    assert_eq!(*complete_generations(&out).last().unwrap(), newest + 1);
    assert_no_temporaries(&out, "after the resume");
}

// ---------------------------------------------------------------------------------------------
// 5. --force

/// A finished run of 3 steps with a generation per step (the newest two are kept).
fn three_step_run(s: &Scratch, data: &Path, name: &str) -> PathBuf {
    let out = s.path(name);
    ok(&train(data, &out, 3, &["--checkpoint-every", "1"]));
    assert_eq!(complete_generations(&out), vec![2, 3]);
    out
}

#[test]
fn force_with_a_bad_option_fails_and_leaves_the_previous_run_byte_identical() {
    let s = Scratch::new("force-bad");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let out = three_step_run(&s, &data, "run");
    let before = snapshot(&out, true);
    // 12 two-word documents: the validation split is shorter than one window of 32 tokens.
    let tiny = s.path("tiny.txt");
    let docs: Vec<String> = (0..12).map(|i| format!("w{i} x{i}")).collect();
    std::fs::write(&tiny, docs.join("\n\n")).unwrap();

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("--steps 0", train(&data, &out, 0, &["--force"]), "steps"),
        (
            "--seq 100000",
            {
                let mut a = train(&data, &out, 3, &["--force"]);
                let i = a.iter().position(|x| x == "--seq").unwrap();
                a[i + 1] = "100000".into();
                a
            },
            "100000",
        ),
        (
            "data smaller than one window",
            train(&tiny, &out, 3, &["--force"]),
            "window",
        ),
        (
            "--keep-checkpoints 0",
            train(&data, &out, 3, &["--force", "--keep-checkpoints", "0"]),
            "keep-checkpoints",
        ),
    ];
    for (name, args, needle) in cases {
        let e = fails(&args);
        assert!(e.contains(needle), "--force with {name}: {e}");
        let after = snapshot(&out, true);
        assert!(
            before == after,
            "--force with {name} changed the previous run: {}",
            snapshot_diff(&before, &after)
        );
    }
}

#[test]
fn force_that_diverges_before_its_first_checkpoint_puts_the_previous_run_back() {
    let s = Scratch::new("force-nan");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let out = three_step_run(&s, &data, "run");
    let before = snapshot(&out, true);
    let args = train(
        &data,
        &out,
        50,
        &["--force", "--lr", "1e30", "--warmup", "0"],
    );
    let o = distill(&args);
    let e = clean_failure("--force --lr 1e30", &o);
    assert!(e.contains("training stopped at step"), "{e}");
    assert!(e.contains("no checkpoint was written yet"), "{e}");
    assert!(
        stderr(&o).contains("the previous run was put back"),
        "{}",
        stderr(&o)
    );
    let after = snapshot(&out, true);
    assert!(
        before == after,
        "the previous run is not as it was: {}",
        snapshot_diff(&before, &after)
    );
    assert!(!out.join(".replaced").exists());
    assert_no_temporaries(&out, "after the failed --force");
}

#[test]
fn force_killed_before_its_first_checkpoint_is_undone_by_the_next_run() {
    let s = Scratch::new("force-killed");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let old = three_step_run(&s, &data, "old");
    let old_files = |run: &Path| {
        let mut m = snapshot(&run.join("checkpoints"), false);
        for f in ["model.safetensors", "config.json", "tokenizer.json"] {
            m.insert(f.into(), std::fs::read(run.join(f)).unwrap_or_default());
        }
        m
    };
    let want = old_files(&old);
    let resume_old = |run: &Path| train(&data, run, 3, &["--checkpoint-every", "1", "--resume"]);
    let mut put_back = 0;
    let mut new_run_won = false;
    // Kill the replacing run at its 1st, 2nd, ... fsync (moving the old run aside, creating
    // checkpoints/, writing its first generation) until its first generation is complete.
    for n in 1..=60u64 {
        let run = s.path(&format!("kill-{n}"));
        copy_dir(&old, &run);
        let fault = format!("kill-at-sync={n}");
        let args = train(
            &data,
            &run,
            3,
            &["--checkpoint-every", "1", "--seed", "5", "--force"],
        );
        let o = distill_env(&args, &[("DISTILL_FAULT", fault.as_str())]);
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{fault}: the --force run was not killed: {}",
            stderr(&o)
        );
        if !complete_generations(&run).is_empty() {
            // The replacing run completed its first generation: the old run may go, and the
            // next run continues the new one.
            let r = ok(&train(
                &data,
                &run,
                3,
                &["--checkpoint-every", "1", "--seed", "5", "--resume"],
            ));
            assert!(
                stderr(&r).contains("resuming from checkpoints/step-00000001 (step 1)"),
                "{fault}: {}",
                stderr(&r)
            );
            assert!(!run.join(".replaced").exists(), "{fault}");
            assert_no_temporaries(&run, &fault);
            new_run_won = true;
            break;
        }
        let r = ok(&resume_old(&run));
        let err = stderr(&r);
        assert!(err.contains("put back"), "{fault}: {err}");
        assert!(
            err.contains("resuming from checkpoints/step-00000003 (step 3)"),
            "{fault}: {err}"
        );
        let got = old_files(&run);
        assert!(
            got == want,
            "{fault}: the old run is not intact: {}",
            snapshot_diff(&want, &got)
        );
        assert!(!run.join(".replaced").exists(), "{fault}");
        assert_no_temporaries(&run, &fault);
        put_back += 1;
        let _ = std::fs::remove_dir_all(&run);
    }
    assert!(new_run_won, "the --force run never completed a generation");
    assert!(
        put_back >= 3,
        "only {put_back} kill points before the first generation"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Oversized settings

fn assert_memory_error(what: &str, e: &str) {
    assert!(
        e.contains("needs") && e.contains("available"),
        "{what}: not a memory error: {e}"
    );
}

#[test]
fn an_oversized_sequence_fails_before_allocating() {
    let s = Scratch::new("oom-seq");
    // Enough text for one window of 100000 tokens in both splits.
    let data = s.path("big.txt");
    write_corpus(&data, 7, 7000);
    let out = s.path("run");
    let mut args = train(&data, &out, 3, &[]);
    let i = args.iter().position(|x| x == "--seq").unwrap();
    args[i + 1] = "100000".into();
    let e = fails(&args);
    assert_memory_error("--seq 100000", &e);
    assert!(e.contains("seq 100000"), "{e}");
    assert!(!out.exists(), "the refused run created {}", out.display());
}

#[test]
fn an_oversized_batch_fails_before_allocating() {
    let s = Scratch::new("oom-batch");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let out = s.path("run");
    let mut args = train(&data, &out, 3, &[]);
    let i = args.iter().position(|x| x == "--batch").unwrap();
    args[i + 1] = "100000000".into();
    let e = fails(&args);
    assert_memory_error("--batch 100000000", &e);
    assert!(e.contains("batch 100000000"), "{e}");
    assert!(!out.exists(), "the refused run created {}", out.display());
}

#[test]
fn an_oversized_teacher_fails_when_loaded() {
    let s = Scratch::new("oom-teacher");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let teacher = s.path("teacher");
    ok(&train(&data, &teacher, 2, &[]));
    let cfg_path = teacher.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["hidden_size"] = serde_json::json!(1048576);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let out = s.path("student");
    let mut args: Vec<String> = [
        "distill",
        "--teacher",
        &teacher.display().to_string(),
        "--data",
        &data.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--steps",
        "2",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.extend(FAST[..6].iter().map(|x| x.to_string()));
    let e = fails(&args);
    assert_memory_error("a teacher of hidden_size 1048576", &e);
    assert!(e.contains("parameters"), "{e}");
    assert!(!out.exists(), "the refused run created {}", out.display());
}

// ---------------------------------------------------------------------------------------------
// 7. Smaller cases

#[test]
fn resuming_on_other_data_is_refused_unless_allowed() {
    let s = Scratch::new("other-data");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let other = s.path("other.txt");
    write_corpus(&other, 8, 120);
    let out = s.path("run");
    ok(&train(&data, &out, 4, &["--stop-at", "2"]));
    let before = snapshot(&out, true);
    let e = fails(&train(&other, &out, 4, &["--resume"]));
    assert!(
        e.contains("the data differs") && e.contains("--allow-data-change"),
        "{e}"
    );
    let after = snapshot(&out, true);
    assert!(before == after, "{}", snapshot_diff(&before, &after));
    let r = ok(&train(
        &other,
        &out,
        4,
        &["--resume", "--allow-data-change"],
    ));
    assert!(
        stderr(&r).contains("--allow-data-change"),
        "the resume does not say the data changed: {}",
        stderr(&r)
    );
    assert_eq!(complete_generations(&out).last(), Some(&4));
}

#[test]
fn resuming_an_empty_or_missing_directory_is_refused() {
    let s = Scratch::new("resume-empty");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let empty = s.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = fails(&train(&data, &empty, 3, &["--resume"]));
    assert!(e.contains("holds no complete checkpoint to resume"), "{e}");
    let missing = s.path("missing");
    let e = fails(&train(&data, &missing, 3, &["--resume"]));
    assert!(e.contains("holds no complete checkpoint to resume"), "{e}");
    assert!(
        !missing.exists(),
        "the refused resume created the directory"
    );
}

#[test]
fn a_nan_loss_names_the_step_and_whether_a_checkpoint_is_kept() {
    let s = Scratch::new("nan");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let out = s.path("run");
    let e = fails(&train(&data, &out, 50, &["--lr", "1e30", "--warmup", "0"]));
    assert!(e.contains("training stopped at step"), "{e}");
    assert!(e.contains("no checkpoint was written yet"), "{e}");
    assert!(complete_generations(&out).is_empty());
    assert_no_temporaries(&out, "after the NaN");

    let out = s.path("run2");
    let e = fails(&train(
        &data,
        &out,
        50,
        &["--lr", "1e30", "--warmup", "0", "--checkpoint-every", "1"],
    ));
    let step: u64 = e
        .split("step ")
        .nth(1)
        .and_then(|x| x.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("the error names no step: {e}"));
    assert!(
        e.contains(&format!("the checkpoint of step {} is kept", step - 1)),
        "{e}"
    );
    assert_eq!(complete_generations(&out).last(), Some(&(step - 1)));
    assert_no_temporaries(&out, "after the NaN");
}

#[test]
fn data_smaller_than_one_sequence_is_refused_before_the_run_directory_exists() {
    let s = Scratch::new("tiny-data");
    let tiny = s.path("tiny.txt");
    let docs: Vec<String> = (0..12).map(|i| format!("w{i} x{i}")).collect();
    std::fs::write(&tiny, docs.join("\n\n")).unwrap();
    let out = s.path("run");
    let e = fails(&train(&tiny, &out, 3, &[]));
    assert!(e.contains("window") || e.contains("--seq"), "{e}");
    assert!(!out.exists(), "the refused run created {}", out.display());
}

#[test]
fn beta_without_jsd_is_refused_by_distill() {
    let s = Scratch::new("beta");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let teacher = s.path("teacher");
    ok(&train(&data, &teacher, 2, &[]));
    let out = s.path("student");
    let mut args: Vec<String> = [
        "distill",
        "--teacher",
        &teacher.display().to_string(),
        "--data",
        &data.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--steps",
        "2",
        "--beta",
        "0.3",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.extend(FAST[..6].iter().map(|x| x.to_string()));
    let e = fails(&args);
    assert!(e.contains("--beta 0.3 is only used by --kind jsd"), "{e}");
    assert!(!out.exists(), "the refused run created {}", out.display());
}

#[test]
fn stop_at_zero_leaves_a_run_that_resumes_bit_exact() {
    let s = Scratch::new("stop-at-0");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let out = s.path("run");
    ok(&train(&data, &out, 3, &["--stop-at", "0"]));
    assert_eq!(complete_generations(&out), vec![0]);
    let r = ok(&train(&data, &out, 3, &["--resume"]));
    assert!(
        stderr(&r).contains("resuming from checkpoints/step-00000000 (step 0)"),
        "{}",
        stderr(&r)
    );
    let straight = s.path("straight");
    ok(&train(&data, &straight, 3, &[]));
    compare_runs(&out, &straight, 3).unwrap();
}

#[test]
fn loss_refuses_a_device_file_as_input() {
    let s = Scratch::new("dev-zero");
    let output = s.path("out.safetensors");
    let e = fails(&[
        "loss",
        "--input",
        "/dev/zero",
        "--output",
        &output.display().to_string(),
    ]);
    assert!(
        e.contains("/dev/zero") && e.contains("not a regular file"),
        "{e}"
    );
    assert!(!output.exists());
    assert_no_temporaries(&s.0, "after the refusal");
}

/// `distill example` input with a NaN at row 3, column 5 of `student_logits`.
fn input_with_nan(s: &Scratch) -> PathBuf {
    let clean = s.path("clean.safetensors");
    ok(&[
        "example",
        "--output",
        &clean.display().to_string(),
        "--rows",
        "16",
        "--vocab",
        "64",
        "--hidden",
        "0",
    ]);
    let bytes = std::fs::read(&clean).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let student = tensors
        .iter_mut()
        .find(|t| t.0 == "student_logits")
        .expect("the example has student_logits");
    assert_eq!(student.1, safetensors::Dtype::F32);
    assert_eq!(student.2, vec![16, 64]);
    let at = (3 * 64 + 5) * 4;
    student.3[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, sh, b)| (n.clone(), TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    let path = s.path("nan.safetensors");
    std::fs::write(&path, safetensors::serialize(views, &None).unwrap()).unwrap();
    path
}

#[test]
fn loss_on_nan_logits_fails_by_default_and_propagates_when_asked() {
    let s = Scratch::new("nan-logits");
    let input = input_with_nan(&s);
    let out_dir = s.path("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let output = out_dir.join("out.safetensors");
    let base = |extra: &[&str]| {
        let mut a: Vec<String> = vec![
            "loss".into(),
            "--input".into(),
            input.display().to_string(),
            "--output".into(),
            output.display().to_string(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let e = fails(&base(&[]));
    assert!(
        e.contains("the loss is not finite (tensor `student_logits` holds NaN at row 3, column 5)"),
        "{e}"
    );
    assert!(!output.exists(), "an output was written for a NaN loss");
    assert_no_temporaries(&out_dir, "after the refused NaN loss");

    let o = ok(&base(&["--on-nonfinite", "propagate"]));
    let line = stdout(&o);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert!(v["loss"].is_null(), "{line}");
    assert!(output.is_file());
    assert_no_temporaries(&out_dir, "after the propagated NaN loss");
}

#[test]
fn sigterm_during_loss_removes_the_partial_output() {
    let s = Scratch::new("loss-sigterm");
    let input = s.path("big.safetensors");
    ok(&[
        "example",
        "--output",
        &input.display().to_string(),
        "--rows",
        "512",
        "--vocab",
        "32768",
        "--hidden",
        "0",
    ]);
    let out_dir = s.path("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let output = out_dir.join("out.safetensors");
    let args = [
        "loss".to_string(),
        "--input".into(),
        input.display().to_string(),
        "--output".into(),
        output.display().to_string(),
        "--device".into(),
        "reference".into(),
    ];
    let p = Background::spawn(&args, &s.path("loss.log"));
    // The temporary exists from the start of the command; wait for it, then a little more.
    wait_for("the output's temporary", Duration::from_secs(30), || {
        !temporaries(&out_dir).is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    p.signal("TERM");
    let status = p.wait();
    let log = std::fs::read_to_string(s.path("loss.log")).unwrap();
    assert_eq!(status.code(), Some(143), "{status:?}: {log}");
    let e = last_error_in(&log).unwrap_or_default();
    assert!(e.contains("interrupted by signal 15"), "{log}");
    assert_no_temporaries(&out_dir, "after SIGTERM");
    assert!(!output.exists(), "a partial output was left: {log}");
}

/// A pid that names no process.
fn dead_pid() -> u32 {
    let pid = 4_000_000;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} exists"
    );
    pid
}

#[test]
fn loss_removes_a_stale_temporary_of_a_dead_process() {
    let s = Scratch::new("loss-stale");
    let input = s.path("in.safetensors");
    ok(&[
        "example",
        "--output",
        &input.display().to_string(),
        "--rows",
        "16",
        "--vocab",
        "64",
        "--hidden",
        "0",
    ]);
    let out_dir = s.path("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let stale = out_dir.join(format!(".out.safetensors.{}.tmp", dead_pid()));
    std::fs::write(&stale, b"partial").unwrap();
    let output = out_dir.join("out.safetensors");
    ok(&[
        "loss",
        "--input",
        &input.display().to_string(),
        "--output",
        &output.display().to_string(),
    ]);
    assert!(!stale.exists(), "the stale temporary is still there");
    assert!(output.is_file());
    assert_no_temporaries(&out_dir, "after the loss");
}

#[test]
fn resume_removes_stale_temporaries_of_dead_processes() {
    let s = Scratch::new("run-stale");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let out = s.path("run");
    ok(&train(&data, &out, 4, &["--stop-at", "2"]));
    let pid = dead_pid();
    let stale_file = out.join(format!(".metrics.json.{pid}.tmp"));
    std::fs::write(&stale_file, b"{").unwrap();
    let stale_dir = out.join(format!("checkpoints/.step-00000009.{pid}.tmp"));
    std::fs::create_dir_all(&stale_dir).unwrap();
    std::fs::write(stale_dir.join("model.safetensors"), b"partial").unwrap();
    let r = ok(&train(&data, &out, 4, &["--resume"]));
    let err = stderr(&r);
    assert!(!stale_file.exists(), "{err}");
    assert!(!stale_dir.exists(), "{err}");
    for t in [&stale_file, &stale_dir] {
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            err.lines().any(|l| l.contains("removed")
                && l.contains(&name)
                && l.contains("interrupted run")),
            "no note about {name}: {err}"
        );
    }
    assert_eq!(complete_generations(&out).last(), Some(&4));
    assert_no_temporaries(&out, "after the resume");
}

#[test]
fn keep_checkpoints_keeps_exactly_the_newest_generations() {
    let s = Scratch::new("keep");
    let data = s.path("data.txt");
    write_corpus(&data, 7, 120);
    let out = s.path("run");
    ok(&train(
        &data,
        &out,
        5,
        &["--keep-checkpoints", "3", "--checkpoint-every", "1"],
    ));
    assert_eq!(
        checkpoint_names(&out),
        vec!["step-00000003", "step-00000004", "step-00000005"]
    );
    assert_eq!(complete_generations(&out), vec![3, 4, 5]);
    assert_no_temporaries(&out, "after the run");
}

#[test]
fn an_output_directory_inside_the_data_or_the_teacher_is_refused() {
    let s = Scratch::new("out-inside");
    std::fs::create_dir_all(s.path("corpus")).unwrap();
    let data = s.path("corpus/data.txt");
    write_corpus(&data, 7, 120);
    // Inside the data directory: the run's files would become training data.
    let out = s.path("corpus/run");
    let e = fails(&train(&s.path("corpus"), &out, 2, &[]));
    assert!(e.contains("inside the data"), "{e}");
    assert!(!out.exists(), "the refused run created {}", out.display());
    // Inside the teacher's run directory, even with --force.
    let teacher = s.path("teacher");
    ok(&train(&data, &teacher, 2, &[]));
    let before = snapshot(&teacher, true);
    let out = teacher.join("student");
    let mut args: Vec<String> = [
        "distill",
        "--teacher",
        &teacher.display().to_string(),
        "--data",
        &data.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--steps",
        "2",
        "--force",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.extend(FAST[..6].iter().map(|x| x.to_string()));
    let e = fails(&args);
    assert!(e.contains("teacher"), "{e}");
    assert!(!out.exists(), "the refused run created {}", out.display());
    assert_eq!(
        snapshot_diff(&before, &snapshot(&teacher, true)),
        "",
        "the teacher changed"
    );
}
