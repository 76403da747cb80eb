//! What runs a compiled loss: validated batches, groupings, k-means, sampling, GEMM.

pub mod batch;
pub mod error;
pub mod groups;
pub mod kmeans;
pub mod sample;
pub mod synthetic;

pub use batch::{Batch, InputError};
pub use error::RunError;
pub use groups::GroupValues;
