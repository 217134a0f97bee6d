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

/// The end-of-text token of the tokenizers this crate trains, and the fallback EOS of a
/// `tokenizer.json` whose model names none.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// 256 byte tokens (so every UTF-8 text can be encoded) plus [`EOS_TOKEN`].
pub const MIN_VOCAB: usize = 257;
/// Far beyond what BPE on a local corpus produces; larger requests are mistakes.
pub const MAX_VOCAB: usize = 1 << 20;

/// The special tokens a model defines, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Specials {
    /// End of sequence: what the model emits after a document, and the separator the token
    /// stream puts after each one.
    pub eos: u32,
    /// Beginning of sequence, if the model has one.
    pub bos: Option<u32>,
    /// Whether the model expects BOS before every document (`add_bos_token`).
    pub add_bos: bool,
}

/// A byte-level BPE tokenizer, trained here or a model's own. Encoding then decoding any UTF-8
/// text gives it back exactly (the literal text of a special token is encoded as that token).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    specials: Specials,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials)
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

    /// Reads a `tokenizer.json` whose EOS is [`EOS_TOKEN`] (the tokenizers this crate trains);
    /// a model directory's tokenizer, whose special tokens the model names, is
    /// [`Tokenizer::load_with`].
    pub fn load(path: &Path) -> Result<Tokenizer> {
        Self::load_with(path, None)
    }

    /// Reads a `tokenizer.json` with the given special tokens (`None`: EOS is [`EOS_TOKEN`], no
    /// BOS). Every id must be in the vocabulary.
    pub fn load_with(path: &Path, specials: Option<Specials>) -> Result<Tokenizer> {
        let json = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let file_error = |message: String| Error::File {
            path: path.display().to_string(),
            message,
        };
        Self::from_json(&json, specials).map_err(file_error)
    }

    /// A tokenizer from `tokenizer.json` text and its special tokens (see [`Tokenizer::load_with`]).
    pub fn from_json(
        json: &str,
        specials: Option<Specials>,
    ) -> std::result::Result<Tokenizer, String> {
        let inner = tokenizers::Tokenizer::from_str(json)
            .map_err(|e| format!("not a valid tokenizer.json: {e}"))?;
        Self::from_parsed(inner, specials)
    }

    /// [`Tokenizer::from_json`] for an already parsed `tokenizer.json`.
    pub(crate) fn from_parsed(
        inner: tokenizers::Tokenizer,
        specials: Option<Specials>,
    ) -> std::result::Result<Tokenizer, String> {
        match specials {
            None => Self::from_inner(inner),
            Some(sp) => Self::with_specials(inner, sp),
        }
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> std::result::Result<Tokenizer, String> {
        let eos = inner
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| format!("the vocabulary has no {EOS_TOKEN} token"))?;
        let specials = Specials {
            eos,
            bos: None,
            add_bos: false,
        };
        Ok(Tokenizer { inner, specials })
    }

    fn with_specials(
        inner: tokenizers::Tokenizer,
        specials: Specials,
    ) -> std::result::Result<Tokenizer, String> {
        let vocab = inner.get_vocab_size(true);
        for (name, id) in [("eos", Some(specials.eos)), ("bos", specials.bos)] {
            if let Some(id) = id.filter(|&i| i as usize >= vocab) {
                return Err(format!(
                    "the {name} token id {id} is outside the vocabulary of {vocab} tokens"
                ));
            }
        }
        if specials.add_bos && specials.bos.is_none() {
            return Err("add_bos_token is set but the model names no bos token".into());
        }
        Ok(Tokenizer { inner, specials })
    }

    /// The special tokens.
    pub fn specials(&self) -> Specials {
        self.specials
    }

    /// The text of token `id`, if it is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the token spelled `token`, if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of token ids, EOS included: the model's `vocab_size` must equal it.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The model's end-of-sequence id, the document separator ([`EOS_TOKEN`] for the
    /// tokenizers trained here).
    pub fn eos_id(&self) -> u32 {
        self.specials.eos
    }

    /// The model's beginning-of-sequence id, if it has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.specials.bos
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
