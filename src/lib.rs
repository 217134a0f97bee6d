//! Fused knowledge-distillation losses for language models: softmax with temperature, forward
//! KL, reverse KL and generalized JSD between teacher and student logits at vocabulary scale,
//! hard-label cross-entropy in the same pass, and hidden-state MSE, each with its gradient.
//!
//! The same contract ([`semantics`], DESIGN section 4 of the repository) runs on four devices:
//! an f64 [`mod@reference`], a multi-threaded [`cpu`] backend, and hand-written CUDA kernels on a
//! real GPU or on an emulated one (`cuda` module) that runs the same `.cu` source on the CPU.
//!
//! ```
//! use distill_kernels::cpu::Cpu;
//! use distill_kernels::half::bf16;
//! use distill_kernels::{DistillDevice, DistillInputs, GradOutputs, HostSliceMut, LossConfig};
//! use distill_kernels::{LossKind, Reduction};
//!
//! let (rows, vocab) = (2, 4);
//! let student = [0.1f32, 0.2, 0.3, 0.4, 1.0, 0.0, -1.0, 0.5];
//! let teacher = [bf16::from_f32(0.3); 8]; // teacher and student dtypes may differ
//! let labels = [3i64, -100]; // -100: an ignored row
//! let cfg = LossConfig::builder()
//!     .kind(LossKind::ReverseKl)
//!     .temperature(2.0)
//!     .alpha(0.5) // half soft loss, half cross-entropy on the labels
//!     .reduction(Reduction::Mean)
//!     .build()?;
//! let mut grad = vec![0.0f32; rows * vocab];
//! let inputs = DistillInputs {
//!     rows,
//!     vocab,
//!     student: student[..].into(),
//!     teacher: teacher[..].into(),
//!     labels: Some(&labels),
//!     hidden: None,
//! };
//! let grads = GradOutputs { logits: Some(HostSliceMut::F32(&mut grad)), hidden: None };
//! let loss = Cpu::new().distill_loss(&cfg, &inputs, grads)?;
//! assert_eq!(loss.valid_rows, 1);
//! assert!(grad[4..].iter().all(|&g| g == 0.0)); // the ignored row gets no gradient
//! # Ok::<(), distill_kernels::Error>(())
//! ```
//!
//! # Features
//! - default: `cuda`, `emulator`, `trainer`, `cli` (what the repository's demo and tests need).
//! - none (`default-features = false`): the reference and cpu losses only, about 20 crates, no
//!   C++ compiler, no nvcc.
//! - `cuda`: [`cuda::CudaKernels`] on cudarc buffers; nvcc compiles the kernels at build time
//!   when it is found. cudarc's linking is left to the application (`fallback-dynamic-loading`),
//!   so candle-core's `cuda` feature (which links the driver) can sit in the same program.
//! - `emulator`: the emulated GPU (Linux; needs a C++ compiler at build time).
//! - `trainer`: the Llama-style student/teacher, data pipeline and checkpoints ([`train`]).
//! - `cli`: the `distill` binary.
//! - `candle`: [`candle::distill_loss`] and [`candle::hidden_mse`], candle ops with a backward.
//! - `serde`: (de)serialization of [`LossConfig`] and its enums.
//!
//! Errors: the loss library returns [`Error`]; the trainer returns [`train::TrainError`],
//! which wraps it.
#![deny(missing_docs)]

pub(crate) mod abi;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "trainer")]
pub mod data;
pub mod device;
pub mod dtype;
pub mod error;
#[cfg(feature = "trainer")]
pub mod model;
pub mod reference;
#[cfg(feature = "trainer")]
pub mod rng;
pub mod semantics;
pub mod shapes;
pub mod topk;
#[cfg(feature = "trainer")]
pub mod train;

/// The `half` crate this one is built with: `f16` and `bf16` host elements.
pub use half;

pub use device::{open, DeviceKind, DistillDevice};
pub use dtype::{Dtype, Element, HostSlice, HostSliceMut, HostVec};
pub use error::{Error, Result};
pub use semantics::{
    DistillInputs, GradOutputs, HiddenInputs, LossConfig, LossConfigBuilder, LossKind, LossValue,
    Reduction, TopKInputs, TopKTeacher, MAX_TOP_K,
};
