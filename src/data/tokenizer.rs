//! Byte-level BPE (GPT-2 style) trained on the training split, through Hugging Face's
//! `tokenizers`, so the saved `tokenizer.json` loads unchanged in Python.

use std::path::Path;
use std::str::FromStr;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use super::corpus::Document;
use crate::train::error::{Result, TrainError as Error};

/// The one special token: separates documents in a token stream.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// 256 byte tokens (so every UTF-8 text can be encoded) plus [`EOS_TOKEN`].
pub const MIN_VOCAB: usize = 257;
/// Far beyond what BPE on a local corpus produces; larger requests are mistakes.
pub const MAX_VOCAB: usize = 1 << 20;

/// A trained byte-level BPE tokenizer. Encoding then decoding any UTF-8 text gives it back
/// exactly (the literal text `<|endoftext|>` is encoded as the EOS token, as in GPT-2).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Learns merges from `docs` until the vocabulary has `vocab_size` entries (EOS and the 256
    /// byte tokens included), or fewer if the text has no pair left to merge: use
    /// [`Tokenizer::vocab_size`] for the model, not the request. Deterministic: the same
    /// documents and size give a byte-identical `tokenizer.json`.
    pub fn train(docs: &[Document], vocab_size: usize) -> Result<Tokenizer> {
        check_vocab_size(vocab_size)?;
        if docs.is_empty() {
            return Err(Error::Tokenizer(
                "cannot train on an empty set of documents".to_string(),
            ));
        }
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
            // All 256 byte symbols, seen or not, so no text is ever out of vocabulary.
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        // No prefix space: decode(encode(x)) must be x itself.
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner
            .train(&mut trainer, docs.iter().map(|d| d.text.as_str()))
            .map_err(|e| Error::Tokenizer(format!("BPE training failed: {e}")))?;
        Self::from_inner(inner).map_err(Error::Tokenizer)
    }

    /// The `tokenizer.json` text (Hugging Face format); the same tokenizer always gives the same
    /// bytes, whether trained or loaded.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(format!("cannot serialize: {e}")))
    }

    /// Writes `tokenizer.json` (Hugging Face format).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.to_json()?;
        std::fs::write(path, json).map_err(|e| Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Reads a `tokenizer.json`; it must define [`EOS_TOKEN`].
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let json = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let file_error = |message: String| Error::File {
            path: path.display().to_string(),
            message,
        };
        let inner = tokenizers::Tokenizer::from_str(&json)
            .map_err(|e| file_error(format!("not a valid tokenizer.json: {e}")))?;
        Self::from_inner(inner).map_err(file_error)
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> std::result::Result<Tokenizer, String> {
        let eos = inner
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| format!("the vocabulary has no {EOS_TOKEN} token"))?;
        Ok(Tokenizer { inner, eos })
    }

    /// Number of token ids, EOS included: the model's `vocab_size` must equal it.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of [`EOS_TOKEN`], the document separator.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Token ids of `text`, with no EOS appended (a literal `<|endoftext|>` in the text becomes the
    /// EOS id). Errors only if the underlying `tokenizers` encoder fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, EOS included as `<|endoftext|>`. A sequence that cuts a multi-byte
    /// character decodes that character as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some((position, &token)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab)
        {
            return Err(Error::TokenOutOfRange {
                position,
                token,
                vocab,
            });
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }
}

fn check_vocab_size(vocab_size: usize) -> Result<()> {
    let reason = if vocab_size < MIN_VOCAB {
        "must be at least 257 (256 byte tokens and <|endoftext|>)"
    } else if vocab_size > MAX_VOCAB {
        "must be at most 1048576"
    } else {
        return Ok(());
    };
    Err(Error::InvalidOption {
        name: "vocab_size",
        value: vocab_size.to_string(),
        reason,
    })
}
