//! A batch to evaluate a loss on, and the checks every backend runs before touching it.

use super::real::{Real, all_finite_on_threads};
use crate::ir::{Grouping, Module};
use ndarray::ArrayView2;

/// Embeddings (float64 unless said otherwise), labels and any named inputs
/// (`--input groups=F.npy`).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a, F = f64> {
    pub x: ArrayView2<'a, F>,
    pub labels: &'a [i64],
    pub inputs: &'a [(String, Vec<i64>)],
    /// The seed of k-means, sampling and random partitions.
    pub seed: u64,
}

/// A batch that does not fit the loss.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("the batch is empty: x has 0 rows")]
    NoRows,
    #[error("x has 0 columns")]
    NoColumns,
    #[error("x has {rows} rows but there are {labels} labels")]
    LabelCount { rows: usize, labels: usize },
    #[error("x[{row}, {col}] is {value}: embeddings must be finite")]
    NotFinite { row: usize, col: usize, value: f64 },
    #[error("the loss has no input named `{name}`{}", known_inputs(known))]
    UnknownInput { name: String, known: Vec<String> },
    #[error("input `{name}` has {len} entries but x has {rows} rows")]
    InputLength {
        name: String,
        len: usize,
        rows: usize,
    },
    #[error("input `{name}` has the negative group {value} at row {row}")]
    NegativeGroup {
        name: String,
        row: usize,
        value: i64,
    },
    #[error("input `{name}` is given twice")]
    DuplicateInput { name: String },
}

fn known_inputs(known: &[String]) -> String {
    if known.is_empty() {
        " (it takes none)".into()
    } else {
        format!(" (it takes: {})", known.join(", "))
    }
}

impl<F: Real> Batch<'_, F> {
    pub fn rows(&self) -> usize {
        self.x.nrows()
    }

    /// Checks the batch against the loss: shapes, finiteness (in blocks on `threads`),
    /// inputs.
    pub fn validate(&self, module: &Module, threads: usize) -> Result<(), InputError> {
        let (rows, cols) = self.x.dim();
        if rows == 0 {
            return Err(InputError::NoRows);
        }
        if cols == 0 {
            return Err(InputError::NoColumns);
        }
        if self.labels.len() != rows {
            return Err(InputError::LabelCount {
                rows,
                labels: self.labels.len(),
            });
        }
        // The first non-finite value is looked for once there is one.
        let finite = (self.x.as_slice_memory_order())
            .is_some_and(|values| all_finite_on_threads(values, threads));
        if !finite {
            for ((row, col), &value) in self.x.indexed_iter() {
                if !value.is_finite() {
                    return Err(InputError::NotFinite {
                        row,
                        col,
                        value: value.to_f64(),
                    });
                }
            }
        }
        for (index, (name, values)) in self.inputs.iter().enumerate() {
            if self.inputs[..index].iter().any(|(other, _)| other == name) {
                return Err(InputError::DuplicateInput { name: name.clone() });
            }
            if !module.inputs.iter().any(|i| i.name == *name) {
                let known = module.inputs.iter().map(|i| i.name.clone()).collect();
                return Err(InputError::UnknownInput {
                    name: name.clone(),
                    known,
                });
            }
            if values.len() != rows {
                return Err(InputError::InputLength {
                    name: name.clone(),
                    len: values.len(),
                    rows,
                });
            }
            if let Some((row, &value)) = values.iter().enumerate().find(|(_, v)| **v < 0) {
                return Err(InputError::NegativeGroup {
                    name: name.clone(),
                    row,
                    value,
                });
            }
        }
        Ok(())
    }

    /// The supplied values of a named input, if any.
    pub fn input(&self, name: &str) -> Option<&[i64]> {
        self.inputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Whether a grouping comes from the caller rather than from its default.
    pub fn supplies(&self, grouping: &Grouping) -> bool {
        matches!(grouping, Grouping::Input { name, .. } if self.input(name).is_some())
    }
}
