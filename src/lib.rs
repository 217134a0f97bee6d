//! distill-kernels: fused knowledge-distillation losses as hand-written CUDA kernels, with an f64
//! reference, a multi-threaded CPU backend and an emulated GPU that runs the same kernel source.

pub mod abi;
pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod dtype;
pub mod error;
pub mod model;
pub mod reference;
pub mod rng;
pub mod semantics;
pub mod train;

pub use backend::{open, Backend, DeviceKind};
pub use dtype::{Dtype, Element, HostSlice, HostSliceMut, HostVec};
pub use error::{Error, Result};
pub use semantics::{
    DistillInputs, GradOutputs, HiddenInputs, LossConfig, LossKind, LossValue, Reduction,
};
