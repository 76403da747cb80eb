//! What runs a compiled loss: validated batches, groupings, k-means, sampling, GEMM.

pub mod batch;
pub mod batch_eval;
pub mod cut;
pub mod engine;
pub mod error;
pub mod gemm;
pub mod groups;
pub mod kmeans;
pub mod real;
pub mod sample;
pub mod spare;
pub mod sparse;
pub mod synthetic;
pub mod tensors;
pub mod transpose;

pub use batch::{Batch, InputError};
pub use error::RunError;
pub use groups::GroupValues;
