//! Data for the trainer: corpora from disk or the embedded [synthetic language](synthetic),
//! a byte-level BPE [`Tokenizer`], token streams and the batches cut from them.
//!
//! ```no_run
//! use distill_kernels::data::{train_batch, val_windows, Corpus, TokenStream, Tokenizer};
//! let corpus = Corpus::synthetic(0, 4000, 200);
//! let tok = Tokenizer::train(&corpus.train, 512)?;
//! let train = TokenStream::encode(&corpus.train, &tok)?;
//! let val = TokenStream::encode(&corpus.val, &tok)?;
//! let (inputs, targets) = train_batch(&train, 42, 0, 8, 64)?;
//! let windows = val_windows(&val, 64);
//! # Ok::<(), distill_kernels::train::TrainError>(())
//! ```

pub mod batches;
pub mod corpus;
pub mod gguf_tokenizer;
pub mod synthetic;
pub mod tokenizer;

pub use batches::{train_batch, val_windows, TokenStream};
pub use corpus::{Corpus, Document, Documents};
pub use synthetic::{entropy_floor, SyntheticLanguage};
pub use tokenizer::{Specials, Tokenizer, EOS_TOKEN};
