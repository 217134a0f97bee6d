//! `distill bench loss` and `distill bench floor` on tiny shapes: the last line on stdout is one
//! JSON object with the documented fields, on the cpu and emulated devices; bad options fail with
//! exactly one `error: ...` line and exit status 1.

use std::collections::BTreeMap;
use std::process::{Command, Output};

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("cannot run the distill binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A JSON value of a flat object: enough for the result line.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
}

/// Parses one flat JSON object (string keys; string, number, boolean or null values) strictly:
/// anything else, or trailing text, is an error.
fn parse_object(s: &str) -> Result<BTreeMap<String, Value>, String> {
    let mut p = Parser {
        b: s.trim().as_bytes(),
        i: 0,
    };
    let mut map = BTreeMap::new();
    p.expect(b'{')?;
    p.ws();
    if p.peek() == Some(b'}') {
        p.i += 1;
    } else {
        loop {
            p.ws();
            let key = p.string()?;
            p.ws();
            p.expect(b':')?;
            p.ws();
            let value = p.value()?;
            if map.insert(key.clone(), value).is_some() {
                return Err(format!("duplicate key {key}"));
            }
            p.ws();
            match p.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                other => return Err(format!("expected , or }} at {}: {other:?}", p.i)),
            }
        }
    }
    p.ws();
    if p.i != p.b.len() {
        return Err(format!("trailing text at {}", p.i));
    }
    Ok(map)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        match self.next() {
            Some(x) if x == c => Ok(()),
            other => Err(format!("expected {:?} at {}: {other:?}", c as char, self.i)),
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err("unterminated string".into()),
                Some(b'"') => return Ok(out),
                Some(b'\\') => match self.next() {
                    Some(b'"') => out.push('"'),
                    Some(b'\\') => out.push('\\'),
                    Some(b'/') => out.push('/'),
                    Some(b'n') => out.push('\n'),
                    Some(b'r') => out.push('\r'),
                    Some(b't') => out.push('\t'),
                    Some(b'u') => {
                        let hex = self.b.get(self.i..self.i + 4).ok_or("short \\u escape")?;
                        let code = u32::from_str_radix(std::str::from_utf8(hex).unwrap(), 16)
                            .map_err(|e| e.to_string())?;
                        out.push(char::from_u32(code).ok_or("bad \\u escape")?);
                        self.i += 4;
                    }
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some(c) if c < 0x20 => return Err("control character in string".into()),
                Some(c) => {
                    // Copy a whole UTF-8 sequence.
                    let start = self.i - 1;
                    let mut end = self.i;
                    while end < self.b.len() && (self.b[end] & 0xc0) == 0x80 {
                        end += 1;
                    }
                    let _ = c;
                    out.push_str(
                        std::str::from_utf8(&self.b[start..end]).map_err(|e| e.to_string())?,
                    );
                    self.i = end;
                }
            }
        }
    }
    fn value(&mut self) -> Result<Value, String> {
        match self.peek() {
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b't') => self.word("true", Value::Bool(true)),
            Some(b'f') => self.word("false", Value::Bool(false)),
            Some(b'n') => self.word("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                while matches!(
                    self.peek(),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                ) {
                    self.i += 1;
                }
                let s = std::str::from_utf8(&self.b[start..self.i]).unwrap();
                let digits = s.trim_start_matches('-');
                if digits.len() > 1 && digits.starts_with('0') && !digits.starts_with("0.") {
                    return Err(format!("leading zero in {s}"));
                }
                s.parse::<f64>()
                    .map(Value::Num)
                    .map_err(|e| format!("bad number {s}: {e}"))
            }
            other => Err(format!("unexpected {other:?} at {}", self.i)),
        }
    }
    fn word(&mut self, w: &str, v: Value) -> Result<Value, String> {
        if self.b[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(v)
        } else {
            Err(format!("bad literal at {}", self.i))
        }
    }
}

/// Runs a bench command that must succeed; returns its last stdout line parsed.
fn bench_ok(args: &[&str]) -> BTreeMap<String, Value> {
    let out = distill(args);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "{args:?} failed: stderr {stderr}, stdout {stdout}"
    );
    let last = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{args:?}: no output"));
    parse_object(last).unwrap_or_else(|e| panic!("{args:?}: last line is not JSON ({e}): {last}"))
}

fn num(obj: &BTreeMap<String, Value>, key: &str) -> f64 {
    match obj.get(key) {
        Some(Value::Num(x)) => *x,
        other => panic!("field {key}: expected a number, got {other:?} in {obj:?}"),
    }
}

fn string<'a>(obj: &'a BTreeMap<String, Value>, key: &str) -> &'a str {
    match obj.get(key) {
        Some(Value::Str(s)) => s,
        other => panic!("field {key}: expected a string, got {other:?} in {obj:?}"),
    }
}

/// The fields every bench line has, with plausible values.
fn check_common(obj: &BTreeMap<String, Value>, device: &str, dtype: &str, iters: f64) {
    assert_eq!(string(obj, "device"), device, "{obj:?}");
    assert_eq!(num(obj, "rows"), 4.0);
    assert_eq!(num(obj, "vocab"), 1000.0);
    assert_eq!(string(obj, "dtype"), dtype);
    assert_eq!(num(obj, "iters"), iters);
    let (median, min) = (num(obj, "median_ms"), num(obj, "min_ms"));
    assert!(min >= 0.0 && median >= min, "{obj:?}");
    assert!(num(obj, "max_ms") >= median, "{obj:?}");
    assert!(num(obj, "melem_per_s") > 0.0, "{obj:?}");
    // Inputs of `dtype` plus an f32 gradient.
    let elem = if dtype == "f32" { 4.0 } else { 2.0 };
    let io_mb = 4000.0 * (2.0 * elem + 4.0) / (1 << 20) as f64;
    assert!((num(obj, "io_mb") - io_mb).abs() < 1e-3, "{obj:?}");
    if cfg!(target_os = "linux") {
        let peak = num(obj, "peak_rss_mb");
        assert!(peak > 0.0 && peak >= num(obj, "baseline_rss_mb"), "{obj:?}");
    }
}

#[test]
fn bench_loss_cpu_every_dtype_and_kind() {
    for dtype in ["f32", "f16", "bf16"] {
        for kind in ["forward-kl", "reverse-kl", "jsd"] {
            let obj = bench_ok(&[
                "bench", "loss", "--rows", "4", "--vocab", "1000", "--iters", "2", "--dtype",
                dtype, "--kind", kind, "--device", "cpu",
            ]);
            check_common(&obj, "cpu", dtype, 2.0);
            assert_eq!(string(&obj, "kind"), kind);
            assert_eq!(string(&obj, "command"), "bench-loss");
            assert_eq!(num(&obj, "temperature"), 2.0);
            assert_eq!(num(&obj, "alpha"), 0.5);
            let loss = num(&obj, "loss");
            assert!(loss.is_finite() && loss > 0.0, "{obj:?}");
        }
    }
}

#[test]
fn bench_loss_defaults() {
    // --dtype f32, --kind forward-kl, --device cpu, --iters 10.
    let obj = bench_ok(&["bench", "loss", "--rows", "4", "--vocab", "1000"]);
    check_common(&obj, "cpu", "f32", 10.0);
    assert_eq!(string(&obj, "kind"), "forward-kl");
}

#[test]
fn bench_loss_emulated_matches_cpu() {
    for kind in ["forward-kl", "jsd"] {
        let args = |device: &'static str| {
            vec![
                "bench", "loss", "--rows", "4", "--vocab", "1000", "--iters", "2", "--warmup", "1",
                "--dtype", "bf16", "--kind", kind, "--seed", "3", "--device", device,
            ]
        };
        let emu = bench_ok(&args("emulated"));
        check_common(&emu, "emulated", "bf16", 2.0);
        let cpu = bench_ok(&args("cpu"));
        // Same generated inputs, same loss up to f32 rounding.
        let (a, b) = (num(&emu, "loss"), num(&cpu, "loss"));
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "{kind}: {a} vs {b}"
        );
    }
}

#[test]
fn bench_loss_threads_and_seed() {
    let a = bench_ok(&[
        "bench",
        "loss",
        "--rows",
        "4",
        "--vocab",
        "1000",
        "--iters",
        "1",
        "--threads",
        "1",
        "--seed",
        "7",
        "--temperature",
        "1.5",
    ]);
    assert_eq!(num(&a, "threads"), 1.0);
    assert_eq!(num(&a, "temperature"), 1.5);
    let b = bench_ok(&[
        "bench",
        "loss",
        "--rows",
        "4",
        "--vocab",
        "1000",
        "--iters",
        "1",
        "--seed",
        "7",
        "--temperature",
        "1.5",
    ]);
    // Deterministic inputs: the same seed gives the same loss, whatever the thread count.
    assert!((num(&a, "loss") - num(&b, "loss")).abs() <= 1e-5 * num(&b, "loss").abs());
}

#[test]
fn bench_floor_cpu() {
    for dtype in ["f32", "bf16"] {
        let obj = bench_ok(&[
            "bench", "floor", "--rows", "4", "--vocab", "1000", "--iters", "2", "--dtype", dtype,
        ]);
        check_common(&obj, "cpu", dtype, 2.0);
        assert_eq!(string(&obj, "command"), "bench-floor");
    }
}

/// Runs a command that must fail with one `error: ...` line naming `needle`, exit status 1.
fn assert_error(args: &[&str], needle: &str) {
    let out = distill(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: stderr {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: `{needle}` not in {stderr}"
    );
    assert!(text(&out.stdout).is_empty(), "{args:?}: stdout on failure");
}

#[test]
fn bench_bad_options_fail_cleanly() {
    let base = ["bench", "loss", "--vocab", "10"];
    assert_error(&[&base[..], &["--rows", "0"]].concat(), "--rows");
    assert_error(&["bench", "loss", "--rows", "2", "--vocab", "0"], "--vocab");
    assert_error(
        &[&base[..], &["--rows", "2", "--iters", "0"]].concat(),
        "--iters",
    );
    assert_error(
        &[&base[..], &["--rows", "2", "--threads", "0"]].concat(),
        "--threads",
    );
    assert_error(
        &[&base[..], &["--rows", "2", "--device", "tpu"]].concat(),
        "tpu",
    );
    assert_error(
        &[&base[..], &["--rows", "2", "--temperature", "-1"]].concat(),
        "--temperature",
    );
    assert_error(
        &[&base[..], &["--rows", "2", "--temperature", "0"]].concat(),
        "--temperature",
    );
    assert_error(
        &[
            "bench",
            "loss",
            "--rows",
            "4294967296",
            "--vocab",
            "4294967296",
        ],
        "too large",
    );
    assert_error(
        &["bench", "floor", "--rows", "0", "--vocab", "10"],
        "--rows",
    );
    assert_error(
        &[
            "bench", "floor", "--rows", "2", "--vocab", "10", "--iters", "0",
        ],
        "--iters",
    );
}

#[test]
fn bench_cuda_without_gpu_is_an_error() {
    let out = distill(&[
        "bench", "loss", "--rows", "2", "--vocab", "10", "--device", "cuda",
    ]);
    if out.status.success() {
        // A machine with a GPU and compiled kernels: the result line must still be right.
        let stdout = text(&out.stdout);
        let obj = parse_object(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(string(&obj, "device"), "cuda");
        return;
    }
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: --device cuda"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn bench_usage_errors_are_clap_errors() {
    // Missing required options and unknown values are clap's usage errors (exit 2).
    for args in [
        &["bench", "loss", "--vocab", "10"][..],
        &[
            "bench", "loss", "--rows", "2", "--vocab", "10", "--dtype", "f64",
        ],
        &[
            "bench", "loss", "--rows", "2", "--vocab", "10", "--kind", "kl",
        ],
        &["bench", "floor", "--rows", "2"],
        &["bench"],
    ] {
        let out = distill(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!text(&out.stderr).contains("panicked"));
    }
}

#[test]
fn json_parser_is_strict() {
    assert!(parse_object(r#"{"a":1,"b":"x","c":null,"d":true}"#).is_ok());
    assert!(parse_object(r#"{"a":1,}"#).is_err());
    assert!(parse_object(r#"{"a":NaN}"#).is_err());
    assert!(parse_object(r#"{"a":1} x"#).is_err());
    assert!(parse_object(r#"{"a":01}"#).is_err());
}

#[test]
fn bench_train_on_the_emulated_device_reports_device_memory() {
    let args = [
        "bench",
        "train",
        "--device",
        "emulated",
        "--batch",
        "2",
        "--seq",
        "16",
        "--vocab",
        "64",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
    ];
    let obj = bench_ok(&args);
    assert_eq!(string(&obj, "device"), "emulated");
    assert!(num(&obj, "tokens_per_s") > 0.0);
    // Steps allocate nothing: what the run took from the device is its plan (up to the
    // emulator's allocation rounding).
    let (peak, plan) = (num(&obj, "peak_device_mb"), num(&obj, "planned_device_mb"));
    assert!(
        plan > 0.0 && peak >= plan && peak < plan * 1.05 + 0.01,
        "peak {peak} MB, plan {plan} MB"
    );
    let obj = bench_ok(&[
        "bench", "train", "--batch", "2", "--seq", "16", "--vocab", "64", "--steps", "2",
    ]);
    assert_eq!(string(&obj, "device"), "cpu");
}
