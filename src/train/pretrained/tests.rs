//! GGUF files written here from a random model and a trained tokenizer load back to the same
//! weights (Q and K permuted as llama.cpp's converter does, then un-permuted), the same config
//! and the same tokenization; bad files get one clear error each.

use super::*;
use crate::data::Corpus;
use crate::model::gguf::{write, MetaValue};
use crate::model::quant::GgmlType;

fn s(x: &str) -> MetaValue {
    MetaValue::Str(x.into())
}

fn int(x: usize) -> MetaValue {
    MetaValue::Int(x as i128)
}

/// llama.cpp's `permute`: HF row `h*d + half*d/2 + i` goes to row `h*d + 2*i + half`.
fn permute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let d = w.len() / cols / heads;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for half in 0..2 {
                let hf = (h * d + half * (d / 2) + i) * cols;
                let gg = (h * d + 2 * i + half) * cols;
                out[gg..gg + cols].copy_from_slice(&w[hf..hf + cols]);
            }
        }
    }
    out
}

struct Fixture {
    tok: Tokenizer,
    model: Llama,
    params: Vec<f32>,
    meta: Vec<(&'static str, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

fn fixture(tied: bool) -> Fixture {
    fixture_of("llama", tied)
}

/// A random model of GGUF architecture `arch` (`llama` or `qwen2`) as its converter writes it.
fn fixture_of(arch: &'static str, tied: bool) -> Fixture {
    let corpus = Corpus::synthetic(3, 200, 20);
    let tok = Tokenizer::train(&corpus.train, 300).unwrap();
    let tj: Value = serde_json::from_str(&tok.to_json().unwrap()).unwrap();
    let v = tok.vocab_size();
    let tokens: Vec<MetaValue> = (0..v as u32)
        .map(|i| s(&tok.id_to_token(i).unwrap()))
        .collect();
    let merges: Vec<MetaValue> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(x) => s(x),
            Value::Array(p) => s(&format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            _ => unreachable!(),
        })
        .collect();
    let eos = tok.eos_id() as usize;
    let types: Vec<MetaValue> = (0..v).map(|i| int(if i == eos { 3 } else { 1 })).collect();
    let cfg = LlamaConfig {
        vocab_size: v,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 5000.0,
        tie_word_embeddings: tied,
        qkv_bias: arch == "qwen2",
        ..LlamaConfig::default()
    };
    let model = Llama::new(cfg.clone()).unwrap();
    let mut params = model.init_params::<f32>(7);
    for t in model.layout().tensors() {
        if t.name.ends_with(".bias") {
            crate::model::llama::normal_fill(t.span.of_mut(&mut params), 0.1, 9, 0);
        }
    }
    let key = |k: &str| -> &'static str { Box::leak(format!("{arch}.{k}").into_boxed_str()) };
    let meta = vec![
        ("general.architecture", s(arch)),
        (key("block_count"), int(2)),
        (key("context_length"), int(64)),
        (key("embedding_length"), int(16)),
        (key("feed_forward_length"), int(32)),
        (key("attention.head_count"), int(4)),
        (key("attention.head_count_kv"), int(2)),
        (key("rope.freq_base"), MetaValue::Float(5000.0)),
        (
            key("attention.layer_norm_rms_epsilon"),
            MetaValue::Float(1e-5),
        ),
        (key("rope.dimension_count"), int(4)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt-2")),
        ("tokenizer.ggml.tokens", MetaValue::Array(tokens)),
        ("tokenizer.ggml.token_type", MetaValue::Array(types)),
        ("tokenizer.ggml.merges", MetaValue::Array(merges)),
        ("tokenizer.ggml.eos_token_id", int(eos)),
    ];
    let tensors = model
        .layout()
        .tensors()
        .iter()
        .map(|t| {
            let mut w = t.span.of(&params).to_vec();
            let permuted = arch == "llama" && t.name.ends_with(".weight");
            if permuted && t.name.contains("q_proj") {
                w = permute_rows(&w, 4, t.shape[1]);
            } else if permuted && t.name.contains("k_proj") {
                w = permute_rows(&w, 2, t.shape[1]);
            }
            let dims = t.shape.iter().rev().map(|&d| d as u64).collect();
            let bytes = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            (gguf_name(&t.name).unwrap(), dims, GgmlType::F32, bytes)
        })
        .collect();
    Fixture {
        tok,
        model,
        params,
        meta,
        tensors,
    }
}

fn save(f: &Fixture, name: &str) -> std::path::PathBuf {
    let tensors: Vec<_> = f
        .tensors
        .iter()
        .map(|(n, d, t, b)| (n.as_str(), d.clone(), *t, b.clone()))
        .collect();
    let dir = std::env::temp_dir().join(format!("dk-gguf-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    std::fs::write(&path, write(&f.meta, &tensors)).unwrap();
    path
}

#[test]
fn gguf_round_trips_weights_config_and_tokenizer() {
    for (arch, tied) in [("llama", false), ("llama", true), ("qwen2", true)] {
        let f = fixture_of(arch, tied);
        let p = load(&save(&f, &format!("rt{arch}{tied}"))).unwrap();
        assert_eq!(p.model.config().qkv_bias, arch == "qwen2");
        assert_eq!(p.model.config(), f.model.config());
        assert_eq!(p.params, f.params, "tied {tied}");
        assert_eq!(p.tokenizer.eos_id(), f.tok.eos_id());
        let text = "the quick brown fox, 12345 times.\n\nAnd <|endoftext|> again";
        assert_eq!(
            p.tokenizer.encode(text).unwrap(),
            f.tok.encode(text).unwrap()
        );
        let ids = p.tokenizer.encode(text).unwrap();
        assert_eq!(p.tokenizer.decode(&ids).unwrap(), text);
    }
}

fn load_err(f: &Fixture, name: &str) -> String {
    load(&save(f, name)).unwrap_err().to_string()
}

fn set(f: &mut Fixture, key: &'static str, v: MetaValue) {
    f.meta.retain(|(k, _)| *k != key);
    f.meta.push((key, v));
}

#[test]
fn bad_gguf_files_get_one_clear_error_each() {
    let mut f = fixture(false);
    set(&mut f, "general.architecture", s("gemma"));
    let e = load_err(&f, "arch");
    assert!(
        e.contains("general.architecture = \"gemma\" is not supported"),
        "{e}"
    );

    let mut f = fixture(false);
    set(&mut f, "tokenizer.ggml.model", s("llama"));
    let e = load_err(&f, "spm");
    assert!(e.contains("SentencePiece"), "{e}");

    let mut f = fixture(false);
    set(&mut f, "tokenizer.ggml.pre", s("viking"));
    let e = load_err(&f, "pre");
    assert!(
        e.contains("tokenizer.ggml.pre = \"viking\" is not supported"),
        "{e}"
    );

    let mut f = fixture(false);
    // A 16-wide norm cannot be Q8_0 (blocks of 32).
    assert!(f.tensors[8].0.ends_with("attn_norm.weight"));
    f.tensors[8].2 = GgmlType::Q8_0;
    let e = load_err(&f, "size");
    assert!(e.contains("not a whole number of Q8_0 blocks of 32"), "{e}");

    let mut f = fixture(false);
    f.tensors.remove(2);
    let e = load_err(&f, "missing");
    assert!(e.contains("is missing"), "{e}");

    let mut f = fixture(false);
    set(&mut f, "llama.embedding_length", int(32));
    set(&mut f, "llama.rope.dimension_count", int(8));
    let e = load_err(&f, "shape");
    assert!(e.contains("has shape"), "{e}");

    // Truncation anywhere is an error naming the problem, never a panic.
    let f = fixture(false);
    let path = save(&f, "trunc");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [3, 10, 40, 200, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("truncated") || e.contains("not a GGUF") || e.contains("neither"),
            "cut {cut}: {e}"
        );
    }
    // An unsupported tensor type is named.
    let mut bad = bytes.clone();
    let name = b"blk.0.attn_q.weight";
    let at = bad.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let ty = at + 4 + 2 * 8;
    bad[ty..ty + 4].copy_from_slice(&13u32.to_le_bytes());
    std::fs::write(&path, &bad).unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(e.contains("tensor type Q5_K is not supported"), "{e}");
}

/// An HF directory whose tokenizer.json puts BOS first through its post-processor (as Llama 3's
/// does, with no `add_bos_token` in tokenizer_config.json) asks for BOS; without the
/// post-processor it does not; `add_bos_token` wins when present.
#[test]
fn hf_bos_from_the_post_processor() {
    let f = fixture(false);
    let mut tj: Value = serde_json::from_str(&f.tok.to_json().unwrap()).unwrap();
    let bos = 5u32;
    let bos_text = f.tok.id_to_token(bos).unwrap();
    let dir = std::env::temp_dir().join(format!("dk-hf-bos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = serde_json::json!({"eos_token_id": f.tok.eos_id(), "bos_token_id": bos});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    assert!(!load_tokenizer(&dir).unwrap().0.specials().add_bos);
    tj["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_text.clone(): {"id": bos_text, "ids": [bos], "tokens": [bos_text]}},
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let sp = load_tokenizer(&dir).unwrap().0.specials();
    assert_eq!(
        (sp.eos, sp.bos, sp.add_bos),
        (f.tok.eos_id(), Some(bos), true)
    );
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false}"#,
    )
    .unwrap();
    assert!(!load_tokenizer(&dir).unwrap().0.specials().add_bos);
    let _ = std::fs::remove_dir_all(&dir);
}

/// llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel`) on a `rope_type: llama3`
/// model: the divisor of each RoPE frequency (frequencies in f32 as torch makes them, the rest
/// in Python floats, stored as f32).
fn converter_rope_freqs(head_dim: usize, theta: f64, scaling: Llama3RopeScaling) -> Vec<f32> {
    let old = scaling.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (
        old / scaling.low_freq_factor,
        old / scaling.high_freq_factor,
    );
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
            let r = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                scaling.factor
            } else {
                let smooth = (old / wavelen - scaling.low_freq_factor)
                    / (scaling.high_freq_factor - scaling.low_freq_factor);
                1.0 / ((1.0 - smooth) / scaling.factor + smooth)
            };
            r as f32
        })
        .collect()
}

fn with_rope_freqs(theta: f64, factors: &[f32]) -> Fixture {
    let mut f = fixture(false);
    set(&mut f, "llama.rope.freq_base", MetaValue::Float(theta));
    let bytes = factors.iter().flat_map(|x| x.to_le_bytes()).collect();
    f.tensors.push((
        "rope_freqs.weight".into(),
        vec![factors.len() as u64],
        GgmlType::F32,
        bytes,
    ));
    f
}

/// A Llama 3.1-style GGUF file (RoPE scaling kept only as `rope_freqs.weight`) loads as the
/// `rope_scaling` that makes the same frequencies: factor read off a fully divided frequency
/// (theta 5e7, factor 32, Llama 3.2's) or solved from an interpolated one (theta 5e5, factor
/// 8, Llama 3.1's); the weights are untouched. Divisors no Llama 3 scaling makes are refused.
#[test]
fn gguf_rope_freqs_become_llama3_rope_scaling() {
    for (theta, factor) in [(5e7, 32.0), (5e5, 8.0)] {
        let truth = Llama3RopeScaling {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let factors = converter_rope_freqs(4, theta, truth);
        assert!(factors[0] == 1.0 && factors[1] > 1.0, "{factors:?}");
        let f = with_rope_freqs(theta, &factors);
        let p = load(&save(&f, &format!("rf{factor}"))).unwrap();
        let got = p.model.config().rope_scaling.expect("rope_scaling set");
        assert!((got.factor - factor).abs() < 1e-5 * factor, "{got:?}");
        assert_eq!((got.low_freq_factor, got.high_freq_factor), (1.0, 4.0));
        assert_eq!(got.original_max_position_embeddings, 8192);
        let want = LlamaConfig {
            rope_theta: theta,
            rope_scaling: Some(truth),
            ..f.model.config().clone()
        };
        for (a, b) in p
            .model
            .config()
            .rope_inv_freq()
            .iter()
            .zip(want.rope_inv_freq())
        {
            assert!((a - b).abs() <= 1e-6 * b, "{a} vs {b}");
        }
        assert_eq!(p.params, f.params);
    }
    // A file whose context was not Llama 3's 8192 says so in its metadata.
    let truth = Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    };
    let mut f = with_rope_freqs(5e5, &converter_rope_freqs(4, 5e5, truth));
    let e = load_err(&f, "rf16");
    assert!(e.contains("other rescalings are not supported"), "{e}");
    set(
        &mut f,
        "llama.rope.scaling.original_context_length",
        int(16),
    );
    let p = load(&save(&f, "rf16ok")).unwrap();
    assert_eq!(
        p.model
            .config()
            .rope_scaling
            .unwrap()
            .original_max_position_embeddings,
        16
    );
    // All ones: no scaling at all.
    let p = load(&save(&with_rope_freqs(5e5, &[1.0, 1.0]), "rf1")).unwrap();
    assert_eq!(p.model.config().rope_scaling, None);
    // Bad divisors, each named.
    for (factors, want) in [
        (vec![2.0, 8.0], "other rescalings are not supported"),
        (vec![1.0, 0.5], "at least 1"),
        (vec![1.0, f32::NAN], "at least 1"),
        (vec![1.0, 8.0, 8.0], "has shape [3]"),
    ] {
        let e = load_err(&with_rope_freqs(5e7, &factors), "rfbad");
        assert!(e.contains(want), "{factors:?}: {e}");
    }
}
