//! The trainer's error type: data, tokenizer, checkpoint and training failures, and the loss
//! library's errors wrapped with their source.

use thiserror::Error;

/// Everything the trainer (model, data, optimizer, checkpoints, the `distill` CLI) can fail with.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum TrainError {
    /// A loss, softmax or device call of the library failed.
    #[error(transparent)]
    Loss(#[from] crate::Error),
    /// A trainer option or model configuration value is out of range.
    #[error("invalid option {name} = {value}: {reason}")]
    InvalidOption {
        /// The option's name as the user spells it.
        name: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A tensor of the model has the wrong number of elements.
    #[error("tensor `{tensor}` has {actual} elements, expected {expected} ({shape})")]
    ShapeMismatch {
        /// The tensor's name.
        tensor: &'static str,
        /// Elements its shape needs.
        expected: usize,
        /// Elements it has.
        actual: usize,
        /// The shape, spelled out.
        shape: String,
    },
    /// A token id outside the model's vocabulary.
    #[error("token id {token} at position {position} is outside the vocabulary [0, {vocab})")]
    TokenOutOfRange {
        /// Its position in the sequence.
        position: usize,
        /// The id.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The system's message.
        message: String,
    },
    /// A file's contents are not what they must be.
    #[error("invalid file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The training data (corpus, batches) is unusable.
    #[error("data: {0}")]
    Data(String),
    /// The tokenizer failed to load or encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: String,
        /// What failed.
        message: String,
    },
    /// Training stopped (a non-finite loss, an interrupted run).
    #[error("training stopped at step {step}: {message}")]
    Training {
        /// The optimizer step it stopped at.
        step: u64,
        /// Why.
        message: String,
    },
    /// Another process holds the run directory's lock.
    #[error("run directory {path} is in use by process {pid}")]
    RunDirInUse {
        /// The run directory.
        path: String,
        /// The holder's process id as its lock file records it (`unknown` if unreadable).
        pid: String,
    },
    /// A saved run cannot be continued by this command (other options, model or data).
    #[error("cannot resume {path}: {message}")]
    ResumeMismatch {
        /// The checkpoint that was read.
        path: String,
        /// What differs.
        message: String,
    },
    /// A buffer the command asks for does not fit the memory that is available.
    #[error("{what} needs {needed} but {available}")]
    OutOfMemory {
        /// What would be allocated, with the sizes that make it up.
        what: String,
        /// The bytes needed, spelled out.
        needed: String,
        /// What is available (from /proc/meminfo and the cgroup limit), spelled out.
        available: String,
    },
}

/// The trainer's result type.
pub type Result<T> = std::result::Result<T, TrainError>;

/// Wording for the safetensors crate's errors (its Display is its Debug), for messages that name
/// the file themselves.
pub fn describe_safetensors(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError;
    match e {
        SafeTensorError::HeaderTooSmall => {
            "not a safetensors file: shorter than the 8-byte header length (empty or truncated)"
                .into()
        }
        SafeTensorError::HeaderTooLarge => {
            "not a safetensors file: the header length is over 100 MB (corrupt)".into()
        }
        SafeTensorError::InvalidHeaderLength => {
            "the header length exceeds the file size (truncated or corrupt file)".into()
        }
        SafeTensorError::InvalidHeader | SafeTensorError::InvalidHeaderStart => {
            "the header is not UTF-8 JSON (corrupt file)".into()
        }
        SafeTensorError::InvalidHeaderDeserialization => {
            "the header is not a valid safetensors tensor table (corrupt file)".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "the tensor data does not match the file size (truncated or padded file)".into()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}` has invalid data offsets in the header (corrupt file)")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data size does not match its shape and dtype (corrupt file)".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor shape overflows (corrupt file)".into(),
        SafeTensorError::TensorNotFound(name) => format!("tensor `{name}` not found"),
        SafeTensorError::IoError(io) => format!("I/O error: {io}"),
        SafeTensorError::JsonError(j) => format!("JSON error: {j}"),
        SafeTensorError::InvalidTensorView(dtype, shape, n) => {
            format!("{n} bytes do not make a {dtype:?} tensor of shape {shape:?}")
        }
    }
}
