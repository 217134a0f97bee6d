
pub mod optim;
