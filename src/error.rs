//! The crate's one error type. Every misuse names the tensor, shape or value at fault.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    #[error("invalid option {name} = {value}: {reason}")]
    InvalidOption {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("tensor `{tensor}` has {actual} elements, expected {expected} ({shape})")]
    ShapeMismatch {
        tensor: &'static str,
        expected: usize,
        actual: usize,
        shape: String,
    },
    #[error("empty input: {0}")]
    Empty(&'static str),
    #[error(
        "label {label} at row {row} is outside [0, {vocab}) and is not ignore_index {ignore_index}"
    )]
    LabelOutOfRange {
        row: usize,
        label: i64,
        vocab: usize,
        ignore_index: i64,
    },
    #[error("token id {token} at position {position} is outside the vocabulary [0, {vocab})")]
    TokenOutOfRange {
        position: usize,
        token: u32,
        vocab: usize,
    },
    #[error("the hard-label loss is requested (alpha = {alpha} < 1) but no labels were given")]
    MissingLabels { alpha: f32 },
    #[error("hidden states: {0}")]
    Hidden(String),
    #[error("gradient buffer: {0}")]
    Gradient(String),
    #[error("row stride of `{tensor}` is {stride}, smaller than the vocabulary {vocab}")]
    Stride {
        tensor: &'static str,
        stride: usize,
        vocab: usize,
    },
    #[error("unsupported dtype for `{tensor}`: {dtype}")]
    Dtype { tensor: &'static str, dtype: String },
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),
    #[error("CUDA error: {0}")]
    Cuda(String),
    #[error("I/O error on {path}: {message}")]
    Io { path: String, message: String },
    #[error("invalid file {path}: {message}")]
    File { path: String, message: String },
    #[error("data: {0}")]
    Data(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("training stopped at step {step}: {message}")]
    Training { step: u64, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

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
