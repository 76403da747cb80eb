//! Backward products with a sparse adjoint. A mined loss (batch-hard, contrastive with
//! a margin, a triplet loss) writes a few entries of each row of `G = dL/dS`; then
//! `dA += G B` and `dB += Gᵀ A` cost `O(nnz · d)` as sums of scaled rows, where the dense
//! GEMMs (and the `G + Gᵀ` pass before them) cost `O(n · m · d)`.
//!
//! Each output row is a sum over its row (or column) of `G` in index order, whatever the
//! number of threads, so results stay bitwise identical for any thread count.

use super::gemm::run_tasks;
use super::real::Real;
use ndarray::{ArrayView2, ArrayViewMut2, Axis};

/// A matrix takes the sparse products when at most this fraction of its entries are
/// nonzero: there a sum of scaled rows beats the GEMM (and the transpose pass before it).
const MAX_DENSITY: f64 = 1.0 / 16.0;
/// Entries tested at once when looking for nonzeros (a vector compare, no branch).
const CHUNK: usize = 16;
/// Output rows per task of the products.
const ROWS_PER_TASK: usize = 64;

/// The nonzero entries of a matrix, row by row, in column order.
pub struct Compressed<F> {
    /// Row `i`'s entries are `starts[i]..starts[i + 1]`.
    starts: Vec<usize>,
    columns: Vec<u32>,
    values: Vec<F>,
}

impl<F: Real> Compressed<F> {
    /// `g`'s nonzero entries (a NaN counts as one), or `None` when more than
    /// [`MAX_DENSITY`] of them are nonzero.
    pub fn of(g: ArrayView2<'_, F>) -> Option<Self> {
        let limit = (g.len() as f64 * MAX_DENSITY) as usize;
        // A dense adjoint shows in its first rows: give up there rather than at the limit.
        let early_limit = |rows: usize| (4.0 * MAX_DENSITY * (rows * g.ncols()) as f64) as usize;
        let mut starts = Vec::with_capacity(g.nrows() + 1);
        starts.push(0);
        let (mut columns, mut values) = (Vec::new(), Vec::new());
        for row in g.rows() {
            let row = row.to_slice()?;
            for (c, chunk) in row.chunks(CHUNK).enumerate() {
                if chunk.iter().fold(false, |any, &v| any | (v != F::ZERO)) {
                    for (k, &v) in chunk.iter().enumerate() {
                        if v != F::ZERO {
                            columns.push((c * CHUNK + k) as u32);
                            values.push(v);
                        }
                    }
                    if values.len() > limit {
                        return None;
                    }
                }
            }
            starts.push(values.len());
            if values.len() > early_limit(starts.len() - 1) {
                return None;
            }
        }
        Some(Compressed {
            starts,
            columns,
            values,
        })
    }

    /// Calls `f(row, column, entry)` on every entry.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(usize, usize, &mut F)) {
        for (i, range) in self.starts.windows(2).enumerate() {
            for k in range[0]..range[1] {
                f(i, self.columns[k] as usize, &mut self.values[k]);
            }
        }
    }

    /// The same entries by column: the rows of the transpose, each in row order.
    pub fn transpose(&self, columns: usize) -> Self {
        let mut starts = vec![0; columns + 1];
        for &c in &self.columns {
            starts[c as usize + 1] += 1;
        }
        for c in 0..columns {
            starts[c + 1] += starts[c];
        }
        let mut next = starts.clone();
        let mut rows = vec![0; self.values.len()];
        let mut values = vec![F::ZERO; self.values.len()];
        for (i, range) in self.starts.windows(2).enumerate() {
            for k in range[0]..range[1] {
                let at = &mut next[self.columns[k] as usize];
                rows[*at] = i as u32;
                values[*at] = self.values[k];
                *at += 1;
            }
        }
        Compressed {
            starts,
            columns: rows,
            values,
        }
    }

    /// `out += self · rhs`: each output row the sum of the rows of `rhs` its entries name,
    /// scaled by them.
    pub fn accumulate(
        &self,
        rhs: ArrayView2<'_, F>,
        mut out: ArrayViewMut2<'_, F>,
        threads: usize,
    ) {
        let tasks: Vec<_> = out
            .axis_chunks_iter_mut(Axis(0), ROWS_PER_TASK)
            .enumerate()
            .collect();
        let threads = if self.values.len() * rhs.ncols() < 1 << 20 {
            1
        } else {
            threads
        };
        run_tasks(tasks, threads, |(task, mut rows)| {
            for (r, mut row) in rows.rows_mut().into_iter().enumerate() {
                let i = task * ROWS_PER_TASK + r;
                for k in self.starts[i]..self.starts[i + 1] {
                    let scale = self.values[k];
                    row.zip_mut_with(&rhs.row(self.columns[k] as usize), |acc, &x| {
                        *acc = *acc + scale * x
                    });
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// A matrix with `per_row` nonzeros per row at pseudo-random columns.
    fn sparse_matrix(rows: usize, cols: usize, per_row: usize) -> Array2<f64> {
        let mut g = Array2::zeros((rows, cols));
        for i in 0..rows {
            for k in 0..per_row {
                let j = (i * 7919 + k * 104_729) % cols;
                g[(i, j)] = (i as f64 + 1.0) / (k as f64 + 2.0) - 3.0;
            }
        }
        g
    }

    #[test]
    fn products_match_the_dense_ones() {
        let g = sparse_matrix(90, 70, 3);
        let a = Array2::from_shape_fn((90, 5), |(i, k)| ((i * 5 + k) as f64).sin());
        let b = Array2::from_shape_fn((70, 5), |(j, k)| ((j * 3 + k) as f64).cos());
        let by_row = Compressed::of(g.view()).expect("3 in 70 is sparse");
        let by_column = by_row.transpose(g.ncols());
        for threads in [1, 2, 3] {
            let (mut da, mut db) = (Array2::zeros(a.dim()), Array2::zeros(b.dim()));
            by_row.accumulate(b.view(), da.view_mut(), threads);
            by_column.accumulate(a.view(), db.view_mut(), threads);
            let (want_a, want_b) = (g.dot(&b), g.t().dot(&a));
            assert!(da.iter().zip(&want_a).all(|(x, y)| (x - y).abs() < 1e-12));
            assert!(db.iter().zip(&want_b).all(|(x, y)| (x - y).abs() < 1e-12));
        }
    }

    #[test]
    fn dense_matrices_are_refused() {
        let g = sparse_matrix(64, 64, 8);
        assert!(Compressed::of(g.view()).is_none(), "8 in 64 is above 1/16");
        let mut nan = Array2::<f64>::zeros((64, 64));
        nan[(3, 5)] = f64::NAN;
        let kept = Compressed::of(nan.view()).expect("one entry");
        assert_eq!(kept.values.len(), 1, "a NaN counts as a nonzero entry");
    }
}
