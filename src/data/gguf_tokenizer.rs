//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, rebuilt as a Hugging
//! Face `tokenizer.json` so that the rest of the crate (and Python) uses it unchanged.
//!
//! Supported: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the pre-tokenizers below,
//! named as llama.cpp names them in `tokenizer.ggml.pre` and splitting text as llama.cpp's
//! `llama-vocab.cpp` does for each (but `default`, see the table). Checked against a reference:
//! `smollm` on SmolLM2's own file, `qwen2` and `llama-bpe` on tiny files read by transformers'
//! GGUF reader (`tests/hf_archs.rs`). SentencePiece vocabularies (`"llama"`, Llama 2 and Mistral
//! v0.1 files) are refused with an error that says so.
//!
//! | `tokenizer.ggml.pre` | split |
//! |----|----|
//! | `default` (also a file without `tokenizer.ggml.pre`) | llama.cpp's own set, applied in turn (each splits the pieces of the one before, keeping matches and gaps): runs of punctuation and `$+<=>^~\|`; GPT-2's regex; digit runs; three ASCII digits at a time |
//! | `gpt-2` | GPT-2's regex |
//! | `smollm`, `starcoder`, `refact`, `codeshell` | every digit alone, then GPT-2's regex |
//! | `llama3`, `llama-v3`, `llama-bpe`, `smaug-bpe`, `dbrx` | Llama 3's regex |
//! | `qwen2`, `deepseek-r1-qwen` | Qwen2's regex |
//!
//! Token types (`tokenizer.ggml.token_type`) follow llama.cpp: 3 (control) tokens become special
//! added tokens and 4 (user-defined) ones plain added tokens, both matched whole in the text.

use serde_json::{json, Map, Value};

use super::tokenizer::{Specials, Tokenizer};
use crate::model::gguf::{Gguf, MetaValue};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's `default` pre-tokenizer (`llama-vocab.cpp`, the `default:` case of the BPE
/// regex switch): four regexes, each splitting the pieces the one before left.
const DEFAULT_SPLITS: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// Each regex in turn splits every piece into its matches and the gaps between them (llama.cpp's
/// `unicode_regex_split`), then the pieces are byte-encoded.
fn splits_then_bytes(regexes: &[&str]) -> Value {
    let mut steps: Vec<Value> = regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    steps.push(byte_level(false));
    json!({"type": "Sequence", "pretokenizers": steps})
}

/// The `pre_tokenizer` of `tokenizer.json` for llama.cpp's pre-tokenizer `name`.
fn pre_tokenizer(name: &str) -> Result<Value, String> {
    Ok(match name {
        "default" => splits_then_bytes(&DEFAULT_SPLITS),
        "gpt-2" | "gpt2" => byte_level(true),
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]})
        }
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" => {
            splits_then_bytes(&[LLAMA3_SPLIT])
        }
        "qwen2" | "deepseek-r1-qwen" => splits_then_bytes(&[QWEN2_SPLIT]),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre = {other:?} is not supported (supported: default, gpt-2, \
                 smollm, starcoder, refact, codeshell, llama3, llama-v3, llama-bpe, smaug-bpe, \
                 dbrx, qwen2, deepseek-r1-qwen)"
            ))
        }
    })
}

fn special_id(g: &Gguf, key: &str, vocab: usize) -> Result<Option<u32>, String> {
    match g.metadata.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
            _ => Err(format!(
                "metadata {key} = {v:?} is not a token id below the vocabulary size {vocab}"
            )),
        },
    }
}

/// The tokenizer of `g` and its `tokenizer.json` text.
pub fn tokenizer_from_gguf(g: &Gguf) -> Result<(Tokenizer, String), String> {
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model = {model:?} is not supported: only byte-level BPE (\"gpt2\") \
             vocabularies are; SentencePiece (\"llama\") ones are not yet"
        ));
    }
    let pre = match g.metadata.get("tokenizer.ggml.pre") {
        None => "default",
        Some(v) => v
            .as_str()
            .ok_or("metadata tokenizer.ggml.pre is not a string")?,
    };
    let tokens = g.get_strings("tokenizer.ggml.tokens")?;
    let merges = g.get_strings("tokenizer.ggml.merges")?;
    let types: Vec<i128> = match g.metadata.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| match x {
                        MetaValue::Int(i) => Some(*i),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| {
                format!(
                    "metadata tokenizer.ggml.token_type is not {} integers",
                    tokens.len()
                )
            })?,
    };
    let mut vocab = Map::new();
    for (id, t) in tokens.iter().enumerate() {
        if vocab.insert(t.to_string(), id.into()).is_some() {
            return Err(format!(
                "tokenizer.ggml.tokens: token {t:?} appears twice (again at id {id})"
            ));
        }
    }
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
        .map(|(id, (t, &ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": ty == 3})
        })
        .collect();
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let text = serde_json::to_string(&tj).map_err(|e| e.to_string())?;
    let n = tokens.len();
    let eos = special_id(g, "tokenizer.ggml.eos_token_id", n)?.ok_or(
        "metadata tokenizer.ggml.eos_token_id is missing: the model names no end-of-text token",
    )?;
    let bos = special_id(g, "tokenizer.ggml.bos_token_id", n)?;
    let add_bos = match g.metadata.get("tokenizer.ggml.add_bos_token") {
        Some(MetaValue::Bool(b)) => *b,
        Some(v) => {
            return Err(format!(
                "metadata tokenizer.ggml.add_bos_token = {v:?} is not a bool"
            ))
        }
        None => false,
    };
    let tok = Tokenizer::from_json(&text, Some(Specials { eos, bos, add_bos }))?;
    if tok.vocab_size() != n {
        return Err(format!(
            "the tokenizer built from tokenizer.ggml.tokens has {} ids, the file lists {n} tokens",
            tok.vocab_size()
        ));
    }
    Ok((tok, text))
}

#[cfg(test)]
mod tests {
    use super::pre_tokenizer;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let p: tokenizers::PreTokenizerWrapper =
            serde_json::from_value(pre_tokenizer(pre).unwrap()).unwrap();
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        // (The pieces themselves are byte-encoded: read them back from the text.)
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, (a, b), _)| text[a..b].to_string())
            .collect()
    }

    /// llama.cpp's `default` set, worked by hand from its four regexes (not run against
    /// llama.cpp): punctuation and `$+<=>^~|` runs first, so `" $"` is not one piece as under
    /// GPT-2's regex; digit runs are cut into threes from the left.
    #[test]
    fn the_default_pre_tokenizer_is_llama_cpp_s_regex_set() {
        let text = "Hello, world! 12345 $x+=1 don't";
        assert_eq!(
            pieces("default", text),
            [
                "Hello", ",", " world", "!", " ", "123", "45", " ", "$", "x", "+=", "1", " don",
                "'", "t"
            ]
        );
        assert_eq!(
            pieces("gpt-2", text),
            ["Hello", ",", " world", "!", " 12345", " $", "x", "+=", "1", " don", "'t"]
        );
        // The fourth regex is ASCII only: other digits stay one run.
        assert_eq!(pieces("default", "١٢٣٤"), ["١٢٣٤"]);
        assert_eq!(pieces("default", "a  b"), ["a", " ", " b"]);
    }
}
