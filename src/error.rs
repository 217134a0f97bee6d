//! The loss library's error type. Every misuse names the tensor, shape or value at fault; driver
//! failures keep the driver's error as their source. The trainer has its own error type
//! (`train::TrainError`), which wraps this one.

use thiserror::Error;

/// Every way a call of the loss library can fail: misuse (options, shapes, labels, dtypes), an
/// unavailable device, or a driver failure.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// An option or size is out of range: a [`crate::LossConfig`] field failing
    /// [`crate::LossConfig::validate`], `rows * vocab` overflowing `usize`, or more than
    /// 2^31 - 1 rows on a CUDA device.
    #[error("invalid option {name} = {value}: {reason}")]
    InvalidOption {
        /// The option, as spelled in `LossConfig` (`temperature`, `beta`, ...) or `rows * vocab`.
        name: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// The rule it breaks (`must be in [0, 1]`).
        reason: &'static str,
    },
    /// A tensor's element count does not match the shape the other arguments imply.
    #[error("tensor `{tensor}` has {actual} elements, expected {expected} ({shape})")]
    ShapeMismatch {
        /// The tensor at fault (`student_logits`, `labels`, `grad_student_hidden`, ...).
        tensor: &'static str,
        /// Elements the shape requires.
        expected: usize,
        /// Elements given.
        actual: usize,
        /// The required shape with its numbers filled in (`[8, 32000]`).
        shape: String,
    },
    /// `rows` or `vocab` is 0 (the CUDA device-buffer path also reports an overflowing
    /// `rows * vocab` here); holds which.
    #[error("empty input: {0}")]
    Empty(&'static str),
    /// A label is neither `ignore_index` nor in `[0, vocab)`; found on the host, or on the device
    /// by the CUDA backends (which then write no output).
    #[error(
        "label {label} at row {row} is outside [0, {vocab}) and is not ignore_index {ignore_index}"
    )]
    LabelOutOfRange {
        /// The first row with a bad label.
        row: usize,
        /// Its label.
        label: i64,
        /// The vocabulary size V.
        vocab: usize,
        /// The configured `ignore_index`.
        ignore_index: i64,
    },
    /// A top-k teacher's id is outside the vocabulary or repeated within its row.
    #[error("top-k teacher id {id} at row {row} {reason} (vocab {vocab})")]
    TopKId {
        /// The first row at fault.
        row: usize,
        /// The id.
        id: u32,
        /// The vocabulary size V.
        vocab: usize,
        /// `is outside the vocabulary` or `appears twice in the row`.
        reason: &'static str,
    },
    /// `alpha < 1` asks for the hard-label cross-entropy but no labels were given.
    #[error("the hard-label loss is requested (alpha = {alpha} < 1) but no labels were given")]
    MissingLabels {
        /// The configured `alpha`.
        alpha: f32,
    },
    /// The hidden-state inputs are inconsistent: hidden size 0, `rows * size` overflowing, or a
    /// hidden gradient buffer given without hidden states. Length mismatches are
    /// [`Error::ShapeMismatch`].
    #[error("hidden states: {0}")]
    Hidden(String),
    /// A gradient buffer's dtype is neither f32 nor that of the input it is the gradient of.
    /// Length mismatches are [`Error::ShapeMismatch`].
    #[error("gradient buffer: {0}")]
    Gradient(String),
    /// A tensor's row stride is smaller than the vocabulary, so its rows would overlap. The
    /// kernels take row strides, but no entry point of this version accepts strided tensors,
    /// so nothing returns it yet.
    #[error("row stride of `{tensor}` is {stride}, smaller than the vocabulary {vocab}")]
    Stride {
        /// The tensor at fault.
        tensor: &'static str,
        /// Its row stride, in elements.
        stride: usize,
        /// The vocabulary size V.
        vocab: usize,
    },
    /// The softmax entry points take one dtype per call; a buffer's dtype differs from the
    /// input's (forward) or the output's (backward).
    #[error("unsupported dtype for `{tensor}`: {dtype}")]
    Dtype {
        /// The buffer at fault (`output`, `grad_input`, `grad_output`).
        tensor: &'static str,
        /// Its dtype and the one it must match, formatted (`f16 (must match the input's f32)`).
        dtype: String,
    },
    /// The device cannot run here: built without its feature or without nvcc, no CUDA driver,
    /// no GPU, or the emulator library failed to load. Holds the reason.
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),
    /// A CUDA driver call failed. `detail` carries the emulator's own message when there is one
    /// (barrier divergence, sanitizer report, trap).
    #[cfg(feature = "cuda")]
    #[error("CUDA error in {during}: {source}{detail}")]
    Cuda {
        /// What was being done: a kernel name (`dk_prepare`), `allocation`, `synchronize`, ...
        during: String,
        /// `": <message>"` from the emulator, or empty (always empty on a real GPU).
        detail: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call was refused (`CUBLAS_STATUS_*`): an argument it rejects, or a library
    /// failure. Work it did queue fails later as a [`Error::Cuda`] of the synchronising call.
    #[cfg(feature = "cuda")]
    #[error("cuBLAS error in {during}: {source:?}")]
    Cublas {
        /// The call and its shape (`matmul_forward sgemm m=.. n=.. k=..`).
        during: String,
        /// cuBLAS's status.
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// The device ran out of memory (`CUDA_ERROR_OUT_OF_MEMORY`): free buffers or use smaller
    /// batches; nothing was written.
    #[cfg(feature = "cuda")]
    #[error("CUDA out of memory in {during}: {source}")]
    OutOfMemory {
        /// What was being done when memory ran out (`allocation`, a kernel name, ...).
        during: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
}

/// The loss library's result type.
pub type Result<T> = std::result::Result<T, Error>;
