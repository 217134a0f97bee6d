//! Hugging Face directories of the other supported architectures, as transformers 5.25 writes
//! them (`tests/reference/tiny_archs.py`): a tiny random Qwen2 (q/k/v biases, tied head) and a
//! tiny random Mistral (`sliding_window: 4096`). Each loads with nothing converted, gives the
//! logits transformers recorded, and goes through the CLI: eval, a student built from its
//! layers, sampling from that student. GGUF files of both (`tests/reference/tiny_gguf.py`) give
//! the logits and token ids that transformers' GGUF reader gives.

use std::path::{Path, PathBuf};

use distill_kernels::model::{Activations, KvCache};
use distill_kernels::train::checkpoint::{config_from_json, config_to_json};
use distill_kernels::train::pretrained;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    let a = v.as_array().unwrap();
    a.iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The `ids` and `logits` transformers recorded in a reference object.
fn ids_and_logits(v: &serde_json::Value) -> (Vec<u32>, Vec<f32>) {
    let logits = v["logits"].as_array().unwrap();
    (
        u32s(&v["ids"]),
        logits.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
    )
}

fn expected(dir: &Path) -> (Vec<u32>, Vec<f32>) {
    ids_and_logits(&read_json(&dir.join("expected.json")))
}

/// The model's logits for the recorded ids, from the training forward and from the KV-cache
/// decoder, both within 1e-5 of transformers' (values of order 1; the file keeps 6 decimals).
fn check_logits(name: &str) -> pretrained::Pretrained {
    let d = dir(name);
    let (ids, want) = expected(&d);
    check_logits_of(&d, &ids, &want)
}

fn check_logits_of(path: &Path, ids: &[u32], want: &[f32]) -> pretrained::Pretrained {
    let name = path.display();
    let p = pretrained::load(path).unwrap();
    let mut acts = Activations::inference(&p.model, 1, ids.len()).unwrap();
    let got = p.model.forward(&p.params, ids, &mut acts).unwrap().to_vec();
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    assert_eq!(got.len(), want.len());
    assert!(
        diff(&got, want) < 1e-5,
        "{name}: max |diff| {}",
        diff(&got, want)
    );
    let v = p.model.config().vocab_size;
    let mut cache = KvCache::new(&p.model, ids.len()).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        let step = p.model.decode_step(&p.params, id, &mut cache).unwrap();
        let w = &want[t * v..(t + 1) * v];
        assert!(diff(step, w) < 1e-5, "{name} decode {t}: {}", diff(step, w));
    }
    p
}

#[test]
fn qwen2_directory_matches_transformers() {
    let p = check_logits("tiny_qwen2");
    let cfg = p.model.config();
    assert!(cfg.qkv_bias && cfg.tie_word_embeddings);
    assert!(p
        .model
        .layout()
        .get("model.layers.1.self_attn.v_proj.bias")
        .is_some());
    // The config we write says Qwen2 and reads back to the same model.
    let json = config_to_json(cfg, &Default::default());
    assert_eq!(json["model_type"], "qwen2");
    assert_eq!(json["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(&config_from_json(&json.to_string()).unwrap(), cfg);
    // Qwen2 with its sliding window switched on is capped like Mistral.
    let mut on = json.clone();
    on["use_sliding_window"] = true.into();
    on["sliding_window"] = 16.into();
    assert_eq!(
        config_from_json(&on.to_string())
            .unwrap()
            .max_position_embeddings,
        16
    );
}

#[test]
fn mistral_directory_matches_transformers() {
    let p = check_logits("tiny_mistral");
    let cfg = p.model.config();
    assert!(!cfg.qkv_bias && !cfg.tie_word_embeddings);
    // Sequences of up to the window's 4096 tokens are exact; longer ones are refused.
    assert_eq!(cfg.max_position_embeddings, 4096);
    // As in transformers' MistralConfig: no `sliding_window` key means 4096, `null` no window.
    let text = std::fs::read_to_string(dir("tiny_mistral").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["max_position_embeddings"] = 32768.into();
    v.as_object_mut().unwrap().remove("sliding_window");
    let max = |v: &serde_json::Value| {
        config_from_json(&v.to_string())
            .unwrap()
            .max_position_embeddings
    };
    assert_eq!(max(&v), 4096);
    v["sliding_window"] = serde_json::Value::Null;
    assert_eq!(max(&v), 32768);
}

/// GGUF files of both architectures laid out as llama.cpp's converter does
/// (`tests/reference/tiny_gguf.py`: `qwen2` with its biases, and `llama` with Q and K rows
/// permuted), checked against transformers' own GGUF reader: the same logits, and the same token
/// ids for a text the `qwen2` and `llama-bpe` splits cut differently (digit runs, upper-case
/// contractions, CR LF, accents, CJK, an emoji, the end-of-text token).
#[test]
fn gguf_files_match_transformers_gguf_reader() {
    let e = read_json(&dir("tiny_gguf_expected.json"));
    let text = e["text"].as_str().unwrap();
    let mut splits = Vec::new();
    for (name, arch_bias) in [("tiny_qwen2.gguf", true), ("tiny_llama_bpe.gguf", false)] {
        let want = &e[name];
        let (ids, logits) = ids_and_logits(want);
        let p = check_logits_of(&dir(name), &ids, &logits);
        assert_eq!(p.model.config().qkv_bias, arch_bias, "{name}");
        let ids = p.tokenizer.encode(text).unwrap();
        assert_eq!(ids, u32s(&want["text_ids"]), "{name}");
        assert_eq!(p.tokenizer.decode(&ids).unwrap(), text, "{name}");
        splits.push(ids);
    }
    assert_ne!(splits[0], splits[1], "the text tells the two splits apart");
}

#[test]
fn unknown_architectures_are_named() {
    let text = std::fs::read_to_string(dir("tiny_qwen2").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
    let e = config_from_json(&v.to_string()).unwrap_err().to_string();
    assert!(
        e.contains("Qwen3ForCausalLM") && e.contains("architectures"),
        "{e}"
    );
    // Early Llama conversions spell the class LLaMAForCausalLM; transformers still loads them.
    v["architectures"] = serde_json::json!(["LLaMAForCausalLM"]);
    v["model_type"] = "llama".into();
    assert!(config_from_json(&v.to_string()).is_ok());
}

fn distill(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .output()
        .expect("the distill binary runs");
    assert!(
        out.status.success(),
        "distill {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// eval, a one-layer student from the teacher's layers (its directory keeps the architecture),
/// and sampling from it, for both directories.
#[test]
fn hf_directories_through_the_cli() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/two_cities.txt");
    for (name, model_type) in [("tiny_qwen2", "qwen2"), ("tiny_mistral", "llama")] {
        let d = dir(name);
        let teacher = d.to_str().unwrap();
        let out = distill(&[
            "eval", "--model", teacher, "--data", data, "--all", "--seq", "32",
        ]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let loss = v["val_loss"].as_f64().unwrap();
        // A random model over 300 tokens: near ln(300) = 5.7, far from a broken one's.
        assert!(
            loss.is_finite() && loss > 3.0 && loss < 12.0,
            "{name}: {loss}"
        );

        let tmp = std::env::temp_dir().join(format!("dk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let o = tmp.to_str().unwrap();
        distill(&[
            "distill",
            "--teacher",
            teacher,
            "--student-init",
            "teacher-layers:1",
            "--data",
            data,
            "--out",
            o,
            "--steps",
            "2",
            "--batch",
            "2",
            "--seq",
            "16",
        ]);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], model_type, "{name}");
        assert_eq!(cfg["num_hidden_layers"], 1);
        let student = pretrained::load(&tmp).unwrap();
        assert_eq!(student.model.config().qkv_bias, model_type == "qwen2");
        let s = distill(&[
            "sample",
            "--model",
            o,
            "--prompt",
            "It was",
            "--tokens",
            "4",
            "--temperature",
            "0",
        ]);
        assert!(s.starts_with("It was"), "{s}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
