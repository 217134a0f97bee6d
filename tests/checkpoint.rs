//! Checkpoint directories: bit-exact round trips, HF-style inputs (half precision, extra tensors,
//! real config.json files), and clear errors for damaged or mismatched files.

use distill_kernels::model::{Llama, LlamaConfig};
use distill_kernels::train::checkpoint::*;
use distill_kernels::train::TrainError as Error;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("distill-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 11,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 32,
        tie_word_embeddings: tied,
        ..LlamaConfig::default()
    }
}

fn model(tied: bool) -> (Llama, Vec<f32>) {
    let m = Llama::new(config(tied)).unwrap();
    let p = m.init_params::<f32>(7);
    (m, p)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn message(e: &Error) -> String {
    match e {
        Error::Checkpoint { path, message } => format!("{path}: {message}"),
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

fn no_tmp_files(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "temporary file {name} left behind");
    }
}

/// Writes a weights file of the given tensors (name, shape, dtype, f32 values converted).
fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Dtype, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, dtype, v)| match dtype {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::F16 => v
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
            Dtype::BF16 => v
                .iter()
                .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
            Dtype::F64 => v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect(),
            other => panic!("test helper does not write {other:?}"),
        })
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, d, _), b)| (n.as_str(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let data = safetensors::serialize(views, &None).unwrap();
    std::fs::write(path, data).unwrap();
}

/// The model's tensors as (name, shape, dtype, values).
fn hf_tensors(m: &Llama, p: &[f32], dtype: Dtype) -> Vec<(String, Vec<usize>, Dtype, Vec<f32>)> {
    m.layout()
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.clone(),
                dtype,
                t.span.of(p).to_vec(),
            )
        })
        .collect()
}

fn state(n: usize, step: u64) -> TrainerState {
    TrainerState {
        step,
        adam_m: (0..n).map(|i| i as f32 * 1e-3).collect(),
        adam_v: (0..n).map(|i| (i as f32).sqrt() * 1e-7).collect(),
        extra: vec![(
            "distill.hidden_proj.0".into(),
            vec![3, 2],
            vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE, 0.0, -0.0],
        )],
        meta: json!({"data_cursor": 1234, "rng": [1, 2, 3], "note": "résumé"}),
    }
}

#[test]
fn round_trip_is_bit_exact_tied_and_untied() {
    for tied in [true, false] {
        let dir = tmpdir(&format!("roundtrip-{tied}"));
        let (m, p) = model(tied);
        let st = state(m.num_params() + 6, 42);
        let extras = ConfigExtras {
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        };
        save_checkpoint(
            &dir,
            &Checkpoint {
                model: &m,
                params: &p,
                step: 42,
                config_extras: extras,
                tokenizer_json: Some(b"{\"version\": \"1.0\"}"),
                extra_files: &[("generation_config.json", b"{}")],
                trainer_state: Some(&st),
            },
        )
        .unwrap();
        let (m2, p2) = load_model_dir(&dir).unwrap();
        assert_eq!(m2.config(), m.config());
        assert_eq!(bits(&p2), bits(&p));
        let (p3, st2) = load_resume(&dir, &m).unwrap();
        assert_eq!(bits(&p3), bits(&p));
        assert_eq!(bits(&st2.adam_m), bits(&st.adam_m));
        assert_eq!(bits(&st2.adam_v), bits(&st.adam_v));
        assert_eq!(st2, st);
        assert_eq!(
            std::fs::read(dir.join(TOKENIZER_FILE)).unwrap(),
            b"{\"version\": \"1.0\"}"
        );

        // What HF reads: tensor names, lm_head only when untied, the "pt" format marker.
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let md = meta.metadata().clone().unwrap();
        assert_eq!(md["format"], "pt");
        assert_eq!(md["step"], "42");
        let st_file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st_file.tensor("lm_head.weight").is_ok(), !tied);
        assert_eq!(
            st_file
                .tensor("model.layers.1.self_attn.k_proj.weight")
                .unwrap()
                .shape(),
            [8, 16]
        );
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(cfg["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(cfg["model_type"], "llama");
        assert_eq!(cfg["num_key_value_heads"], 2);
        assert_eq!(cfg["tie_word_embeddings"], tied);
        assert_eq!(cfg["rope_scaling"], serde_json::Value::Null);
        assert_eq!(cfg["eos_token_id"], 2);
        no_tmp_files(&dir);
    }
}

#[test]
fn explicit_head_dim_round_trips() {
    let dir = tmpdir("head-dim");
    let cfg = LlamaConfig {
        head_dim: Some(8),
        ..config(false)
    };
    save_config(&dir.join(CONFIG_FILE), &cfg, &ConfigExtras::default()).unwrap();
    assert_eq!(load_config(&dir.join(CONFIG_FILE)).unwrap(), cfg);
}

#[test]
fn half_precision_files_load_and_harmless_extras_are_ignored() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let dir = tmpdir(&format!("half-{dtype:?}"));
        let (m, p) = model(true);
        let mut tensors = hf_tensors(&m, &p, dtype);
        // HF sometimes stores the RoPE buffer, and the tied head next to the embedding.
        tensors.push((
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            vec![2],
            Dtype::F32,
            vec![1.0, 0.01],
        ));
        tensors.push(("lm_head.weight".into(), vec![11, 16], dtype, vec![0.5; 176]));
        let path = dir.join(WEIGHTS_FILE);
        write_tensors(&path, &tensors);
        let (loaded, step) = load_weights(&path, &m).unwrap();
        assert_eq!(step, None);
        for (a, b) in loaded.iter().zip(&p) {
            let want = if dtype == Dtype::BF16 {
                bf16::from_f32(*b).to_f32()
            } else {
                f16::from_f32(*b).to_f32()
            };
            assert_eq!(a.to_bits(), want.to_bits());
        }
    }
}

#[test]
fn truncated_file_is_a_clear_error_naming_the_path() {
    let dir = tmpdir("truncated");
    let (m, p) = model(false);
    let path = dir.join(WEIGHTS_FILE);
    save_weights(&path, &m, &p, 3).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() / 2, 4, 0] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_weights(&path, &m).unwrap_err();
        let msg = message(&err);
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("truncated"), "{msg}");
    }
    let err = load_weights(&dir.join("absent.safetensors"), &m).unwrap_err();
    assert!(matches!(err, Error::Io { ref path, .. } if path.contains("absent.safetensors")));
}

#[test]
fn wrong_shape_missing_tensor_and_wrong_dtype_name_the_tensor() {
    let dir = tmpdir("bad-tensors");
    let path = dir.join(WEIGHTS_FILE);
    let (m, p) = model(false);
    let good = hf_tensors(&m, &p, Dtype::F32);
    let name = "model.layers.1.mlp.down_proj.weight";
    let k = good.iter().position(|t| t.0 == name).unwrap();

    let mut wrong_shape = good.clone();
    wrong_shape[k].1 = vec![24, 16]; // transposed [16, 24]
    write_tensors(&path, &wrong_shape);
    let msg = message(&load_weights(&path, &m).unwrap_err());
    assert!(
        msg.contains(name) && msg.contains("[24, 16]") && msg.contains("[16, 24]"),
        "{msg}"
    );

    let mut missing = good.clone();
    missing.remove(k);
    write_tensors(&path, &missing);
    let msg = message(&load_weights(&path, &m).unwrap_err());
    assert!(msg.contains("missing") && msg.contains(name), "{msg}");

    let untied_without_head: Vec<_> = good
        .iter()
        .filter(|t| t.0 != "lm_head.weight")
        .cloned()
        .collect();
    write_tensors(&path, &untied_without_head);
    let msg = message(&load_weights(&path, &m).unwrap_err());
    assert!(
        msg.contains("lm_head.weight") && msg.contains("tie_word_embeddings"),
        "{msg}"
    );

    let mut wrong_dtype = good.clone();
    wrong_dtype[k].2 = Dtype::F64;
    write_tensors(&path, &wrong_dtype);
    let msg = message(&load_weights(&path, &m).unwrap_err());
    assert!(msg.contains(name) && msg.contains("F64"), "{msg}");

    let mut deeper = good.clone();
    deeper.push((
        "model.layers.2.input_layernorm.weight".into(),
        vec![16],
        Dtype::F32,
        vec![1.0; 16],
    ));
    write_tensors(&path, &deeper);
    let msg = message(&load_weights(&path, &m).unwrap_err());
    assert!(
        msg.contains("model.layers.2.input_layernorm.weight"),
        "{msg}"
    );

    let mut nan = good;
    nan[k].3[5] = f32::NAN;
    write_tensors(&path, &nan);
    let msg = message(&load_weights(&path, &m).unwrap_err());
    assert!(msg.contains(name) && msg.contains("non-finite"), "{msg}");
}

const TINYLLAMA_CONFIG: &str = r#"{
  "_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5632,
  "max_position_embeddings": 2048,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 22,
  "num_key_value_heads": 4,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.35.0",
  "use_cache": true,
  "vocab_size": 32000
}"#;

#[test]
fn real_llama_config_json_loads() {
    let dir = tmpdir("tinyllama");
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, TINYLLAMA_CONFIG).unwrap();
    let cfg = load_config(&path).unwrap();
    assert_eq!(
        cfg,
        LlamaConfig {
            vocab_size: 32000,
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 22,
            num_attention_heads: 32,
            num_key_value_heads: 4,
            head_dim: None,
            max_position_embeddings: 2048,
            initializer_range: 0.02,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            qkv_bias: false,
        }
    );
    assert_eq!(cfg.head_dim(), 64);

    // HF defaults: no num_key_value_heads means one per query head; head_dim null means derived.
    let mut v: serde_json::Value = serde_json::from_str(TINYLLAMA_CONFIG).unwrap();
    v.as_object_mut().unwrap().remove("num_key_value_heads");
    v["head_dim"] = serde_json::Value::Null;
    v["eos_token_id"] = json!([128001, 128009]);
    let cfg = config_from_json(&v.to_string()).unwrap();
    assert_eq!((cfg.num_key_value_heads, cfg.head_dim), (32, None));
}

#[test]
fn unsupported_config_fields_are_rejected_by_name() {
    let dir = tmpdir("bad-config");
    let path = dir.join(CONFIG_FILE);
    let base: serde_json::Value = serde_json::from_str(TINYLLAMA_CONFIG).unwrap();
    let cases = [
        ("rope_scaling", json!({"type": "linear", "factor": 2.0})),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0}),
        ),
        ("hidden_act", json!("gelu")),
        ("attention_bias", json!(true)),
        ("mlp_bias", json!(true)),
        ("model_type", json!("gemma")),
        ("architectures", json!(["GemmaForCausalLM"])),
        ("num_key_value_heads", json!(3)),
        ("hidden_size", json!("2048")),
        ("rms_norm_eps", json!(-1.0)),
    ];
    for (field, value) in cases {
        let mut v = base.clone();
        v[field] = value.clone();
        std::fs::write(&path, v.to_string()).unwrap();
        let msg = message(&load_config(&path).unwrap_err());
        assert!(msg.contains(field), "{field} = {value}: {msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
    std::fs::write(&path, "{ not json").unwrap();
    assert!(message(&load_config(&path).unwrap_err()).contains("invalid JSON"));
}

#[test]
fn resume_refuses_weights_newer_than_the_trainer_state() {
    let dir = tmpdir("interrupted");
    let (m, p) = model(true);
    let st = state(m.num_params(), 5);
    let ckpt = Checkpoint {
        model: &m,
        params: &p,
        step: 5,
        config_extras: ConfigExtras::default(),
        tokenizer_json: None,
        extra_files: &[],
        trainer_state: Some(&st),
    };
    save_checkpoint(&dir, &ckpt).unwrap();
    // A crash after the weights of step 6 were renamed but before the trainer state was.
    save_weights(&dir.join(WEIGHTS_FILE), &m, &p, 6).unwrap();
    let msg = message(&load_resume(&dir, &m).unwrap_err());
    assert!(
        msg.contains("step 6") && msg.contains("step 5") && msg.contains("interrupted"),
        "{msg}"
    );

    // The state of a checkpoint must be of its step.
    let bad = Checkpoint { step: 7, ..ckpt };
    assert!(save_checkpoint(&dir, &bad).is_err());
}

#[test]
fn trainer_state_errors() {
    let dir = tmpdir("state-errors");
    let path = dir.join(TRAINER_STATE_FILE);
    let mut st = state(10, 1);
    st.extra.push(("adam.m".into(), vec![1], vec![0.0]));
    assert!(message(&save_trainer_state(&path, &st).unwrap_err()).contains("adam.m"));
    let mut st = state(10, 1);
    st.extra[0].1 = vec![4, 2];
    assert!(message(&save_trainer_state(&path, &st).unwrap_err()).contains("distill.hidden_proj.0"));
    assert!(!path.exists());
    no_tmp_files(&dir);

    // A weights file is not a trainer state.
    let (m, p) = model(true);
    save_weights(&path, &m, &p, 1).unwrap();
    let msg = message(&load_trainer_state(&path).unwrap_err());
    assert!(msg.contains("format"), "{msg}");
}

#[test]
fn atomic_writes_leave_no_temporary_files() {
    let dir = tmpdir("atomic");
    let path = dir.join("tokenizer.json");
    write_atomic(&path, b"first").unwrap();
    write_atomic(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    no_tmp_files(&dir);
    let err = write_atomic(&dir.join("no-such-dir").join("x.json"), b"x").unwrap_err();
    assert!(matches!(err, Error::Io { ref path, .. } if path.contains("no-such-dir")));
    let err = write_atomic(&dir, b"x").unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    no_tmp_files(&dir);
}

#[test]
fn sharded_checkpoint_loads_through_its_index() {
    let dir = tmpdir("sharded");
    let (m, p) = model(false);
    save_config(&dir.join(CONFIG_FILE), m.config(), &ConfigExtras::default()).unwrap();
    let all = hf_tensors(&m, &p, Dtype::F32);
    let (a, b) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        write_tensors(&dir.join(shard), part);
        for t in part {
            map.insert(t.0.clone(), json!(shard));
        }
    }
    let index = json!({"metadata": {"total_size": 4 * p.len()}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (_, loaded) = load_model_dir(&dir).unwrap();
    assert_eq!(bits(&loaded), bits(&p));

    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_model_dir(&dir).unwrap_err();
    assert!(matches!(err, Error::Io { ref path, .. } if path.contains("model-00002-of-00002")));
}

#[test]
fn the_same_weights_give_the_same_bytes_every_time() {
    // safetensors orders `__metadata__` by a randomly seeded HashMap; the files must not vary.
    let dir = tmpdir("same-bytes");
    let (m, p) = model(true);
    let path = dir.join("model.safetensors");
    save_weights(&path, &m, &p, 3).unwrap();
    let first = std::fs::read(&path).unwrap();
    for _ in 0..16 {
        save_weights(&path, &m, &p, 3).unwrap();
        assert!(std::fs::read(&path).unwrap() == first, "the bytes changed");
    }
    let (loaded, step) = load_weights(&path, &m).unwrap();
    assert_eq!((bits(&loaded), step), (bits(&p), Some(3)));
}
