//! Llama 3.1's RoPE scaling against transformers: a tiny random model with
//! `rope_type: llama3` saved by transformers 5.25 (`tests/reference/tiny_llama3.py`) gives, for
//! a sequence three times longer than its `original_max_position_embeddings`, the logits
//! transformers recorded.

use distill_kernels::model::{Activations, Llama, LlamaConfig};
use distill_kernels::train::checkpoint::{config_from_json, config_to_json, load_model_dir};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tiny_llama3");

fn logits(model: &Llama, params: &[f32], ids: &[u32]) -> Vec<f32> {
    let mut acts = Activations::inference(model, 1, ids.len()).unwrap();
    model.forward(params, ids, &mut acts).unwrap().to_vec()
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    let (model, params) = load_model_dir(std::path::Path::new(DIR)).unwrap();
    let r = model
        .config()
        .rope_scaling
        .expect("rope_type llama3 is read");
    assert_eq!(
        (
            r.factor,
            r.low_freq_factor,
            r.high_freq_factor,
            r.original_max_position_embeddings
        ),
        (8.0, 1.0, 4.0, 16)
    );
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/expected.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = expected["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<f32> = expected["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let max_diff = |got: &[f32]| {
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    let got = logits(&model, &params, &ids);
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(
        max_diff(&got) < 1e-5 * scale.max(1.0),
        "max |diff| {} (scale {scale})",
        max_diff(&got)
    );
    // Without the rescaling the logits are far off: the test sees the scaling.
    let plain = Llama::new(LlamaConfig {
        rope_scaling: None,
        ..model.config().clone()
    })
    .unwrap();
    assert!(max_diff(&logits(&plain, &params, &ids)) > 1e-2);
    // config.json round trip, and the writer's form is what transformers 4 reads.
    let json = config_to_json(model.config(), &Default::default());
    assert_eq!(json["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(
        &config_from_json(&json.to_string()).unwrap(),
        model.config()
    );
    // Another RoPE type is one clear error.
    let mut bad = json.clone();
    bad["rope_scaling"]["rope_type"] = "yarn".into();
    let e = config_from_json(&bad.to_string()).unwrap_err().to_string();
    assert!(e.contains("rope_type \"yarn\""), "{e}");
    // A scaling that names no type is not silently plain RoPE.
    bad["rope_scaling"] = serde_json::json!({"factor": 4.0});
    let e = config_from_json(&bad.to_string()).unwrap_err().to_string();
    assert!(e.contains("names no rope_type"), "{e}");
}
