//! The trainer: a Llama-style student trained on hard labels or distilled from a teacher with the
//! crate's fused losses, on the `cpu` backend.

pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod device_optim;
#[cfg(feature = "cuda")]
pub mod device_step;
pub mod error;
pub mod files;
pub mod hf_config;
pub mod memory;
pub mod optim;
pub mod plot;
pub mod pretrained;
pub mod rundir;
pub mod session;
pub mod student_init;
pub mod teacher_cache;
pub mod trainer;

pub use error::{Result, TrainError};
