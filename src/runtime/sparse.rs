//! Backward products with a sparse adjoint. A mined loss (batch-hard, contrastive with
//! a margin, a triplet loss) writes a few entries of each row of `G = dL/dS`; then
//! `dA += G B` and `dB += Gᵀ A` cost `O(nnz · d)` as sums of scaled rows, where the dense
//! GEMMs (and the `G + Gᵀ` pass before them) cost `O(n · m · d)`.
//!
//! Each output row is a sum over its row (or column) of `G` in index order (for
//! `(G + Gᵀ) X`, its row's entries, then the column's the row lacks), whatever the number
//! of threads, so results stay bitwise identical for any thread count. The entries come
//! from a scan of `G`, or from the row pass that wrote it, which scans its rows as it goes.

use super::gemm::run_tasks;
use super::real::Real;
use multiversion::multiversion;
use ndarray::{ArrayView2, ArrayViewMut2, Axis};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

/// A matrix takes the sparse products when at most this fraction of its entries are
/// nonzero: there a sum of scaled rows beats the GEMM (and the transpose pass before it).
/// Measured at n = 1024, d = 256 on 2 threads: nca's 3 % adjoint takes 1.5 ms sparse against
/// 3.4 dense, grad_nca's 6.25 % 4.1 ms against 3.7.
const MAX_DENSITY: f64 = 1.0 / 20.0;
/// Entries tested at once when looking for nonzeros (a vector compare into a mask).
const CHUNK: usize = 32;
/// One row in this many is counted before the scan, to tell a dense adjoint at once.
const SAMPLE_STRIDE: usize = 16;
/// A sample of rows this much over `MAX_DENSITY` tells a dense matrix. Near the limit the
/// two products cost about the same, so a sample's error is harmless.
const DENSE_SAMPLE: f64 = 1.2;
/// Output rows per task of the products.
const ROWS_PER_TASK: usize = 64;

/// What a scan found of a matrix's entries.
pub enum Scan<F> {
    Sparse(Compressed<F>),
    /// Too many nonzero entries for the sparse products to pay.
    Dense,
}

/// The nonzero entries of a matrix, row by row, in column order.
pub struct Compressed<F> {
    /// Row `i`'s entries are `starts[i]..starts[i + 1]`.
    starts: Vec<usize>,
    columns: Vec<u32>,
    values: Vec<F>,
}

impl<F: Real> Compressed<F> {
    /// `g`'s nonzero entries (a NaN counts as one), or `None` when more than
    /// `MAX_DENSITY` (1/20) of them are nonzero. Blocks of rows are scanned on the threads and
    /// joined in row order.
    pub fn of(g: ArrayView2<'_, F>, threads: usize) -> Option<Self> {
        let (rows, cols) = g.dim();
        // Rows may be padded (adjoints are), but each must be a slice.
        let row_slices: Vec<&[F]> = g
            .rows()
            .into_iter()
            .map(|row| row.to_slice())
            .collect::<Option<_>>()?;
        // A sample of the rows over the density is dense: no scan (a scan that collects an
        // eighth of a million entries, only to drop them, costs 0.9 ms).
        let sample: Vec<&[F]> = row_slices.iter().copied().step_by(SAMPLE_STRIDE).collect();
        let sampled: usize = sample.iter().map(|row| count_nonzeros(row)).sum();
        if sampled as f64 > DENSE_SAMPLE * MAX_DENSITY * (sample.len() * cols) as f64 {
            return None;
        }
        let dense = AtomicBool::new(false);
        let mut blocks: Vec<Compressed<F>> = (0..rows.div_ceil(ROWS_PER_TASK).max(1))
            .map(|_| Compressed::empty())
            .collect();
        let tasks: Vec<_> = blocks
            .iter_mut()
            .zip(row_slices.chunks(ROWS_PER_TASK))
            .collect();
        run_tasks(tasks, threads, |(block, rows)| {
            block.append_rows(rows.iter().copied(), &dense);
        });
        if dense.into_inner() {
            return None;
        }
        let pieces = blocks.iter().map(|block| (block, 0..block.rows()));
        Self::join(pieces, (rows, cols))
    }

    /// No rows yet.
    pub fn empty() -> Self {
        Compressed {
            starts: vec![0],
            columns: Vec::new(),
            values: Vec::new(),
        }
    }

    /// How many rows.
    pub fn rows(&self) -> usize {
        self.starts.len() - 1
    }

    /// Whether its rows, as a sample of a matrix with `cols` columns, tell a dense one.
    pub fn tells_dense(&self, cols: usize) -> bool {
        self.values.len() as f64 > DENSE_SAMPLE * MAX_DENSITY * (self.rows() * cols) as f64
    }

    /// Appends the nonzero entries of a block of rows (of equal length), unless `dense` is
    /// set, which they set when they pass four times `MAX_DENSITY`: a dense matrix shows in
    /// any block, and stops the other blocks' scans.
    pub fn append_rows<'r>(
        &mut self,
        rows: impl ExactSizeIterator<Item = &'r [F]>,
        dense: &AtomicBool,
    ) {
        let (count, first) = (rows.len(), self.values.len());
        for row in rows {
            if dense.load(Ordering::Relaxed) {
                return;
            }
            push_nonzeros(row, &mut self.columns, &mut self.values);
            self.starts.push(self.values.len());
            if (self.values.len() - first) as f64 > 4.0 * MAX_DENSITY * (count * row.len()) as f64 {
                dense.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    /// The rows `range` of each piece, in turn, as the rows of one `rows x cols` matrix;
    /// `None` when a piece lacks rows of its range, they are not `rows` rows, or more than
    /// `MAX_DENSITY` of the entries are nonzero.
    pub fn join<'p>(
        pieces: impl Iterator<Item = (&'p Self, Range<usize>)> + Clone,
        (rows, cols): (usize, usize),
    ) -> Option<Self>
    where
        F: 'p,
    {
        let span = |(piece, range): &(&Self, Range<usize>)| {
            piece.starts[range.start]..piece.starts[range.end]
        };
        if pieces
            .clone()
            .any(|(piece, range)| range.end > piece.rows())
        {
            return None;
        }
        let nonzeros: usize = pieces.clone().map(|piece| span(&piece).len()).sum();
        let joined_rows: usize = pieces.clone().map(|(_, range)| range.len()).sum();
        if joined_rows != rows || nonzeros as f64 > (rows * cols) as f64 * MAX_DENSITY {
            return None;
        }
        let mut whole = Compressed {
            starts: Vec::with_capacity(rows + 1),
            columns: Vec::with_capacity(nonzeros),
            values: Vec::with_capacity(nonzeros),
        };
        whole.starts.push(0);
        for piece in pieces {
            let (entries, (block, range)) = (span(&piece), piece);
            let offset = whole.values.len() - entries.start;
            let ends = &block.starts[range.start + 1..=range.end];
            whole.starts.extend(ends.iter().map(|&s| s + offset));
            whole
                .columns
                .extend_from_slice(&block.columns[entries.clone()]);
            whole.values.extend_from_slice(&block.values[entries]);
        }
        Some(whole)
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

    /// `out += scale · self · rhs`: each output row the sum of the rows of `rhs` its entries
    /// name, scaled by them.
    pub fn accumulate(
        &self,
        scale: F,
        rhs: ArrayView2<'_, F>,
        out: ArrayViewMut2<'_, F>,
        threads: usize,
    ) {
        let rhs = rhs.as_standard_layout();
        let entries = self.values.len();
        by_output_rows(out, entries, rhs.view(), threads, |rows| {
            for (i, row, rhs) in rows {
                let (columns, values) = self.row(i);
                add_rows(row, columns, values, scale, rhs);
            }
        });
    }

    /// `out += scale · (self + selfᵀ) · rhs` for a square `self`, given its transpose: row
    /// i's entries and column i's merged first, an entry `(i, j)` and its mirror taking the
    /// row of `rhs` once, summed (as the dense `G + Gᵀ`): a k-neighbourhood's adjoint has
    /// most of its pairs both ways (45 % of nca's entries at n = 1024).
    pub fn accumulate_symmetric(
        &self,
        transposed: &Self,
        scale: F,
        rhs: ArrayView2<'_, F>,
        out: ArrayViewMut2<'_, F>,
        threads: usize,
    ) {
        let rhs = rhs.as_standard_layout();
        let entries = self.values.len() + transposed.values.len();
        let n = self.starts.len() - 1;
        by_output_rows(out, entries, rhs.view(), threads, |rows| {
            let mut merged = MergedRow::new(n);
            for (i, row, rhs) in rows {
                merged.join(self.row(i), transposed.row(i));
                add_rows(row, &merged.columns, &merged.values, scale, rhs);
            }
        });
    }

    /// Row `i`'s columns and values.
    fn row(&self, i: usize) -> (&[u32], &[F]) {
        let entries = self.starts[i]..self.starts[i + 1];
        (&self.columns[entries.clone()], &self.values[entries])
    }
}

/// Hands blocks of `out`'s rows to `work` on the threads (one thread for less than about a
/// million multiply-adds), as `(i, row i, rhs)` for each row of the block.
fn by_output_rows<F: Real>(
    mut out: ArrayViewMut2<'_, F>,
    entries: usize,
    rhs: ArrayView2<'_, F>,
    threads: usize,
    work: impl Fn(&mut dyn Iterator<Item = (usize, &mut [F], RowsOf<'_, F>)>) + Sync,
) {
    let tasks: Vec<_> = out
        .axis_chunks_iter_mut(Axis(0), ROWS_PER_TASK)
        .enumerate()
        .collect();
    let threads = if entries * rhs.ncols() < 1 << 20 {
        1
    } else {
        threads
    };
    // Rows of `rhs` are read as slices (the callers pass a standard layout).
    let rhs = RowsOf {
        data: rhs.to_slice().unwrap_or_default(),
        width: rhs.ncols(),
    };
    run_tasks(tasks, threads, |(task, mut block)| {
        let mut rows = block.rows_mut().into_iter().enumerate().map(|(r, row)| {
            let row = row
                .into_slice()
                .expect("gradients are allocated in standard layout");
            (task * ROWS_PER_TASK + r, row, rhs)
        });
        work(&mut rows);
    });
}

/// A row merged from two rows of entries: their union of columns, the values of a column in
/// both summed, first in the first row's order, then the second's columns the first lacks.
struct MergedRow<F> {
    columns: Vec<u32>,
    values: Vec<F>,
    /// The position of each column in the row while it is merged, else `u32::MAX`.
    slots: Vec<u32>,
}

impl<F: Real> MergedRow<F> {
    fn new(width: usize) -> Self {
        MergedRow {
            columns: Vec::new(),
            values: Vec::new(),
            slots: vec![u32::MAX; width],
        }
    }

    fn join(&mut self, (columns, values): (&[u32], &[F]), (others, more): (&[u32], &[F])) {
        self.columns.clear();
        self.values.clear();
        for (k, &c) in columns.iter().enumerate() {
            self.slots[c as usize] = k as u32;
        }
        self.columns.extend_from_slice(columns);
        self.values.extend_from_slice(values);
        for (&c, &v) in others.iter().zip(more) {
            match self.slots[c as usize] {
                u32::MAX => {
                    self.columns.push(c);
                    self.values.push(v);
                }
                k => self.values[k as usize] = self.values[k as usize] + v,
            }
        }
        for &c in columns {
            self.slots[c as usize] = u32::MAX;
        }
    }
}

/// The rows of a standard-layout matrix, `width` floats each.
#[derive(Clone, Copy)]
struct RowsOf<'a, F> {
    data: &'a [F],
    width: usize,
}

/// Floats of an output row that [`add_rows`] sums in registers while it goes through the
/// entries (4 AVX-512 or 8 AVX2 registers of f32): the row then takes one load and one store
/// a chunk, where it took them at every four entries.
const ROW_CHUNK: usize = 64;

/// `row += scale · s · rhs[c]` for every entry `(c, s)` in turn; each float of the row adds
/// its terms in the entries' order.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn add_rows<F: Real>(row: &mut [F], columns: &[u32], values: &[F], scale: F, rhs: RowsOf<'_, F>) {
    for (chunk, out) in row.chunks_mut(ROW_CHUNK).enumerate() {
        let offset = chunk * ROW_CHUNK;
        match <&mut [F; ROW_CHUNK]>::try_from(&mut *out) {
            // A whole chunk: its length known, the sum stays in registers.
            Ok(whole) => {
                let mut sum = *whole;
                add_chunk(&mut sum, columns, values, scale, rhs, offset);
                *whole = sum;
            }
            Err(_) => add_chunk(out, columns, values, scale, rhs, offset),
        }
    }
}

/// The entries' terms of the row's floats `offset..offset + sum.len()`, added to `sum`.
#[inline(always)]
fn add_chunk<F: Real>(
    sum: &mut [F],
    columns: &[u32],
    values: &[F],
    scale: F,
    RowsOf { data, width }: RowsOf<'_, F>,
    offset: usize,
) {
    for (&c, &s) in columns.iter().zip(values) {
        let factor = scale * s;
        let x = &data[c as usize * width + offset..][..sum.len()];
        for (acc, &v) in sum.iter_mut().zip(x) {
            *acc = *acc + factor * v;
        }
    }
}

/// Appends the columns and values of `row`'s nonzero entries: a chunk's entries are
/// compared at once into a bit mask, whose set bits are then visited.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn push_nonzeros<F: Real>(row: &[F], columns: &mut Vec<u32>, values: &mut Vec<F>) {
    for (c, chunk) in row.chunks(CHUNK).enumerate() {
        let mut mask = chunk
            .iter()
            .enumerate()
            .fold(0u32, |mask, (k, &v)| mask | (u32::from(v != F::ZERO) << k));
        while mask != 0 {
            let k = mask.trailing_zeros() as usize;
            columns.push((c * CHUNK + k) as u32);
            values.push(chunk[k]);
            mask &= mask - 1;
        }
    }
}

/// How many of `row`'s entries are nonzero (a NaN counts).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn count_nonzeros<F: Real>(row: &[F]) -> usize {
    row.iter().filter(|&&v| v != F::ZERO).count()
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
        let by_row = Compressed::of(g.view(), 2).expect("3 in 70 is sparse");
        let by_column = by_row.transpose(g.ncols());
        for threads in [1, 2, 3] {
            let (mut da, mut db) = (Array2::zeros(a.dim()), Array2::zeros(b.dim()));
            by_row.accumulate(1.0, b.view(), da.view_mut(), threads);
            by_column.accumulate(1.0, a.view(), db.view_mut(), threads);
            let (want_a, want_b) = (g.dot(&b), g.t().dot(&a));
            assert!(da.iter().zip(&want_a).all(|(x, y)| (x - y).abs() < 1e-12));
            assert!(db.iter().zip(&want_b).all(|(x, y)| (x - y).abs() < 1e-12));
        }
    }

    #[test]
    fn the_symmetric_product_takes_each_pair_once() {
        let mut g = sparse_matrix(80, 80, 3);
        // Pairs both ways and a diagonal entry, which the merge must sum, not drop.
        g[(2, 9)] = 0.5;
        g[(9, 2)] = -1.25;
        g[(4, 4)] = 3.0;
        let x = Array2::from_shape_fn((80, 70), |(i, k)| ((i * 7 + k) as f64).sin());
        let by_row = Compressed::of(g.view(), 2).expect("4 in 80 is sparse");
        let by_column = by_row.transpose(g.ncols());
        let want = (&g + &g.t()).dot(&x) * 0.5;
        for threads in [1, 2, 3] {
            let mut got = Array2::zeros(x.dim());
            by_row.accumulate_symmetric(&by_column, 0.5, x.view(), got.view_mut(), threads);
            let worst = (got.iter().zip(&want)).fold(0.0_f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-12, "{threads} threads: off by {worst}");
        }
    }

    #[test]
    fn pieces_join_in_the_order_given() {
        let g = sparse_matrix(40, 30, 1);
        let rows: Vec<&[f64]> = g
            .rows()
            .into_iter()
            .map(|r| r.to_slice().unwrap())
            .collect();
        let dense = AtomicBool::new(false);
        // One worker's list that took the later rows first, as chunks come.
        let mut found = Compressed::empty();
        found.append_rows(rows[20..].iter().copied(), &dense);
        found.append_rows(rows[..20].iter().copied(), &dense);
        let pieces = [(&found, 20..40), (&found, 0..20)];
        let joined = Compressed::join(pieces.into_iter(), (40, 30)).expect("1 in 30 is sparse");
        let whole = Compressed::of(g.view(), 1).expect("1 in 30 is sparse");
        assert_eq!(joined.starts, whole.starts);
        assert_eq!(
            (joined.columns, joined.values),
            (whole.columns, whole.values)
        );
        let short = [(&found, 0..41)];
        assert!(
            Compressed::join(short.into_iter(), (41, 30)).is_none(),
            "a piece lacks a row"
        );
    }

    #[test]
    fn dense_matrices_are_refused() {
        let g = sparse_matrix(64, 64, 8);
        assert!(
            Compressed::of(g.view(), 2).is_none(),
            "8 in 64 is above 1/16"
        );
        let mut nan = Array2::<f64>::zeros((64, 64));
        nan[(3, 5)] = f64::NAN;
        let kept = Compressed::of(nan.view(), 2).expect("one entry");
        assert_eq!(kept.values.len(), 1, "a NaN counts as a nonzero entry");
    }
}
