//! Training support: the optimizer and schedule, checkpoints other Llama tools can read, and

pub mod checkpoint;
pub mod optim;
