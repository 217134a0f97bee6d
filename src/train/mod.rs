//! Training support: the optimizer and schedule, checkpoints other Llama tools can read, and
//! loss-curve plots.

pub mod checkpoint;
pub mod optim;
pub mod plot;
