//! Tensors and pair matrices of a compiled run, forward and backward, with the GEMM doing
//! the O(n m d) work: `A B^T` (one triangle of `X X^T`), and `(G + G^T) X` as one product.

use super::error::RunError;
use super::gemm;
use super::groups::{GroupValues, column_part, column_range, partition_columns};
use super::real::{FLOATS_PER_TASK, Real};
use super::sparse;
use super::transpose;
use crate::grad::TensorStep;
use crate::ir::*;
use multiversion::multiversion;
use ndarray::{Array2, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis as NdAxis, ShapeBuilder};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The buffers [`tensors`] may write into, by tensor: an earlier call's, of which the
/// first `computed` hold this call's values already (the k-means features and the tensors
/// they come from, which the groupings needed first).
#[derive(Default)]
pub struct Earlier<F> {
    pub buffers: Vec<Array2<F>>,
    pub computed: usize,
}

/// The tensors of the module in order, up to and including `last` (all when `None`): the
/// k-means features come before the groupings computed from them, and so before any tensor
/// that needs those groupings. Each is written into its buffer of an earlier call in
/// `earlier` when that has its shape: its pages are mapped already, where a fresh array's
/// are faulted in one by one (a spec with four branches spent 0.8 ms so). Copies run on
/// `threads`.
pub fn tensors<F: Real>(
    module: &Module,
    x: ArrayView2<F>,
    groups: &[GroupValues],
    seed: u64,
    last: Option<Handle<Tensor>>,
    (earlier, threads): (Earlier<F>, usize),
) -> Result<Vec<Array2<F>>, RunError> {
    let mut spare: Vec<Option<Array2<F>>> = earlier.buffers.into_iter().map(Some).collect();
    let mut values: Vec<Array2<F>> = Vec::with_capacity(module.tensors.len());
    for (h, tensor) in module.tensors.iter() {
        if last.is_some_and(|last| h > last) {
            break;
        }
        if h.index() < earlier.computed
            && let Some(value) = spare.get_mut(h.index()).and_then(Option::take)
        {
            values.push(value);
            continue;
        }
        let source = |s: &Handle<Tensor>| &values[s.index()];
        let mut buffer = |dim: (usize, usize)| {
            (spare.get_mut(h.index()).and_then(Option::take))
                .filter(|b| b.dim() == dim && b.is_standard_layout())
        };
        let mut copy = |view: ArrayView2<'_, F>| match buffer(view.dim()) {
            Some(mut b) => {
                copy_on_threads(&mut b, view, threads);
                b
            }
            None => view.to_owned(),
        };
        let value = match &tensor.op {
            TensorOp::Embedding => copy(x),
            TensorOp::Columns {
                source: s,
                start,
                end,
            } => copy(column_range(source(s), *start, *end, h)?),
            TensorOp::Partition {
                source: s,
                sizes,
                part,
                site,
            } => {
                let a = source(s);
                let columns = column_part(a.ncols(), sizes, *part, (seed, *site), h)?;
                match buffer((a.nrows(), columns.len())) {
                    Some(mut b) => {
                        for (mut column, &c) in b.columns_mut().into_iter().zip(&columns) {
                            column.assign(&a.column(c));
                        }
                        b
                    }
                    None => a.select(NdAxis(1), &columns),
                }
            }
            TensorOp::Normalize { source: s } => {
                let mut a = copy(source(s).view());
                match normalize_rows(&mut a, threads) {
                    None => a,
                    Some(row) => return Err(RunError::ZeroRow { row, tensor: h }),
                }
            }
            TensorOp::Centres {
                source: s,
                groups: g,
            } => {
                let a = source(s);
                let grouping = &groups[g.index()];
                let dim = (grouping.count(), a.ncols());
                let mut sums = zeroed(buffer(dim), dim);
                for (sample, row) in a.rows().into_iter().enumerate() {
                    sums.row_mut(grouping.of_sample[sample])
                        .zip_mut_with(&row, |acc, &v| *acc = *acc + v);
                }
                for (group, mut row) in sums.rows_mut().into_iter().enumerate() {
                    let size = F::from_f64(grouping.sizes[group] as f64);
                    row.mapv_inplace(|v| v / size);
                }
                sums
            }
            TensorOp::Stop { source: s } => copy(source(s).view()),
            TensorOp::Concat { left, right } => {
                let (a, b) = (source(left), source(right));
                if a.nrows() != b.nrows() {
                    return Err(RunError::Internal {
                        what: format!("concat: {} rows against {}", a.nrows(), b.nrows()),
                    });
                }
                let dim = (a.nrows(), a.ncols() + b.ncols());
                let mut joined = buffer(dim).unwrap_or_else(|| Array2::zeros(dim));
                let (mut first, mut second) = joined.view_mut().split_at(NdAxis(1), a.ncols());
                first.assign(a);
                second.assign(b);
                joined
            }
            TensorOp::OneHot { groups: g } => {
                let grouping = &groups[g.index()];
                let dim = (grouping.of_sample.len(), grouping.count());
                let mut a = zeroed(buffer(dim), dim);
                for (sample, &group) in grouping.of_sample.iter().enumerate() {
                    a[(sample, group)] = F::ONE;
                }
                a
            }
            TensorOp::Scale { source: s, factor } => {
                let factor = F::from_f64(*factor);
                let mut a = copy(source(s).view());
                a.mapv_inplace(|v| v * factor);
                a
            }
        };
        values.push(value);
    }
    Ok(values)
}

/// Rows of a normalisation's passes per task: eight tasks where the elementwise passes
/// take one block of [`FLOATS_PER_TASK`] (a row's work is two dot products, not a copy),
/// so that a branch of 1024 x 64 is shared between threads too.
fn normalized_rows_per_task(cols: usize) -> usize {
    (FLOATS_PER_TASK / 8 / cols.max(1)).max(1)
}

/// Each row of `a` divided by its length, blocks of rows on the threads; the first row of
/// length zero, if any (its block's later rows are still divided).
fn normalize_rows<F: Real>(a: &mut Array2<F>, threads: usize) -> Option<usize> {
    let rows = normalized_rows_per_task(a.ncols());
    let first_zero = AtomicUsize::new(usize::MAX);
    rows_on_threads(a, rows, threads, |i, mut row| {
        let norm = row.dot(&row).sqrt();
        if norm == F::ZERO {
            first_zero.fetch_min(i, Ordering::Relaxed);
        } else {
            row.mapv_inplace(|v| v / norm);
        }
    });
    Some(first_zero.into_inner()).filter(|&row| row != usize::MAX)
}

/// `f(i, row i)` for every row of `a`, in blocks of `rows` rows on the threads.
fn rows_on_threads<F: Real>(
    a: &mut Array2<F>,
    rows: usize,
    threads: usize,
    f: impl Fn(usize, ArrayViewMut1<'_, F>) + Sync,
) {
    let blocks: Vec<_> = a
        .axis_chunks_iter_mut(NdAxis(0), rows)
        .enumerate()
        .collect();
    gemm::run_tasks(blocks, threads, |(block, mut values)| {
        for (r, row) in values.rows_mut().into_iter().enumerate() {
            f(block * rows + r, row);
        }
    });
}

/// `buffer` (of shape `dim`) set to zeros, or a new array of them.
fn zeroed<F: Real>(buffer: Option<Array2<F>>, dim: (usize, usize)) -> Array2<F> {
    match buffer {
        Some(mut b) => {
            b.fill(F::ZERO);
            b
        }
        None => Array2::zeros(dim),
    }
}

/// Rows of a distance matrix (or of its adjoint) per task of an elementwise pass.
const DISTANCE_ROWS: usize = 64;

/// `|a_i|²` of every row.
fn row_norms<F: Real>(a: &Array2<F>) -> Vec<F> {
    a.rows()
        .into_iter()
        .map(|row| row.as_slice().map_or_else(|| row.dot(&row), squared_norm))
        .collect()
}

/// `|v|²`, with sixteen running sums (combined in a fixed order) on the widest vector
/// unit the CPU has.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn squared_norm<F: Real>(v: &[F]) -> F {
    const LANES: usize = 16;
    let mut partial = [F::ZERO; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (sum, &x) in partial.iter_mut().zip(chunk) {
            *sum = *sum + x * x;
        }
    }
    let total = partial.into_iter().fold(F::ZERO, |a, b| a + b);
    tail.iter().fold(total, |t, &x| t + x * x)
}

/// `metric(left_i, right_j)` for every pair, computed in `values` (reused between calls,
/// reallocated with padded rows when its shape is wrong); a tensor against itself has an
/// exact zero diagonal of distances.
pub fn pair_matrix<F: Real>(
    matrix: &Matrix,
    a: &Array2<F>,
    b: &Array2<F>,
    threads: usize,
    values: &mut Array2<F>,
) {
    if values.dim() != (a.nrows(), b.nrows()) || values.strides()[1] != 1 {
        *values = padded_zeros((a.nrows(), b.nrows()));
    }
    let eps = match matrix.metric {
        Metric::Dot => None,
        Metric::SqEuclid => Some(None),
        Metric::Euclid { eps } => Some(Some(F::from_f64(eps))),
    };
    let Some(eps) = eps else {
        if matrix.is_symmetric() {
            gemm::gram(a.view(), values.view_mut(), threads);
        } else {
            gemm::abt(a.view(), b.view(), values.view_mut(), threads);
        }
        return;
    };
    // Q = |a_i|^2 + |b_j|^2 - 2 a_i . b_j, then D = sqrt(Q) above the clamp: elementwise, so
    // shared out by rows without changing a bit (and on the lower triangle alone, mirrored
    // with the products, when the matrix is symmetric).
    let na = row_norms(a);
    let floor = eps.map(|e| e.sqrt());
    if matrix.is_symmetric() {
        gemm::gram_with(a.view(), values.view_mut(), threads, |first, panel| {
            distance_panel(panel, first, &na, eps.zip(floor));
        });
        return;
    }
    let nb = &row_norms(b);
    gemm::abt(a.view(), b.view(), values.view_mut(), threads);
    rows_on_threads(values, DISTANCE_ROWS, threads, |i, mut row| {
        let Some(row) = row.as_slice_mut() else {
            unreachable!("rows of a pair matrix are contiguous")
        };
        distance_row(row, na[i], nb, eps.zip(floor));
    });
}

/// Zeros whose rows are padded to a length that is not a multiple of a kilobyte, for pair
/// matrices and their adjoints: rows 4 KiB apart (1024 f32 columns) share their cache
/// sets, so that a panel of them does not stay in cache (the Gram matrix took 9 % longer
/// on them), and the transposed reads of the symmetrisation ran three times slower.
pub fn padded_zeros<F: Real>((rows, cols): (usize, usize)) -> Array2<F> {
    let line = 64 / size_of::<F>();
    let mut stride = cols.next_multiple_of(line);
    if (stride * size_of::<F>()).is_multiple_of(1024) {
        stride += line;
    }
    let len = rows.saturating_sub(1) * stride + cols;
    Array2::from_shape_vec((rows, cols).strides((stride, 1)), vec![F::ZERO; len])
        .unwrap_or_else(|_| Array2::zeros((rows, cols)))
}

/// One row of distances from its dot products `v`: `Q = n_i + n_j - 2 v`, then
/// `D = sqrt(Q)` above the clamp `eps` (with `floor = sqrt(eps)` below it), or `Q` itself.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn distance_row<F: Real>(row: &mut [F], ni: F, nb: &[F], clamp: Option<(F, F)>) {
    distances_from_products(row, ni, nb, clamp);
}

/// [`distance_row`] on a column panel of a symmetric matrix's lower triangle (rows and
/// columns from `first` on, `norms` those of every sample), with the diagonal's distances
/// exactly zero (or the clamp's floor).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn distance_panel<F: Real>(
    mut panel: ArrayViewMut2<'_, F>,
    first: usize,
    norms: &[F],
    clamp: Option<(F, F)>,
) {
    let columns = &norms[first..][..panel.ncols()];
    for (r, mut row) in panel.rows_mut().into_iter().enumerate() {
        let Some(row) = row.as_slice_mut() else {
            unreachable!("rows of a panel of a standard-layout matrix are contiguous")
        };
        distances_from_products(row, norms[first + r], columns, clamp);
        if let Some(diagonal) = row.get_mut(r) {
            *diagonal = clamp.map_or(F::ZERO, |(_, floor)| floor);
        }
    }
}

#[inline(always)]
fn distances_from_products<F: Real>(row: &mut [F], ni: F, nb: &[F], clamp: Option<(F, F)>) {
    let two = F::from_f64(2.0);
    let squared = row.iter_mut().zip(nb);
    match clamp {
        Some((eps, floor)) => squared.for_each(|(v, &nj)| {
            let q = ni + nj - two * *v;
            *v = if q > eps { q.sqrt() } else { floor };
        }),
        None => squared.for_each(|(v, &nj)| *v = ni + nj - two * *v),
    }
}

/// The GEMM work of one matrix in a forward+backward, on stand-in adjoints: what
/// `losscc bench` reports as `gemm_ms`. The buffers are allocated once, so that
/// [`GemmWork::run`] times the products alone.
pub struct GemmWork<'t, F> {
    symmetric: bool,
    /// Whether the gradient reaches the embedding through the left and the right tensor.
    reaches: [bool; 2],
    a: &'t Array2<F>,
    b: &'t Array2<F>,
    s: Array2<F>,
    da: Array2<F>,
    db: Array2<F>,
}

impl<'t, F: Real> GemmWork<'t, F> {
    /// The work of `matrix` on its tensors `a` and `b`, with `reaches` per tensor of the
    /// module as the backward has it.
    pub fn new(matrix: &Matrix, a: &'t Array2<F>, b: &'t Array2<F>, reaches: &[bool]) -> Self {
        let symmetric = matrix.is_symmetric();
        GemmWork {
            symmetric,
            reaches: [reaches[matrix.left.index()], reaches[matrix.right.index()]],
            a,
            b,
            s: padded_zeros((a.nrows(), b.nrows())),
            da: Array2::zeros(a.dim()),
            db: Array2::zeros(if symmetric { (0, 0) } else { b.dim() }),
        }
    }

    /// `S = A Bᵀ` and `dA += S B`, `dB += Sᵀ A` for the sides the gradient reaches the
    /// embedding through (one triangle and one product when symmetric), as the backward
    /// does.
    pub fn run(&mut self, threads: usize) {
        let (a, b) = (self.a.view(), self.b.view());
        let [left, right] = self.reaches;
        if self.symmetric {
            gemm::gram(a, self.s.view_mut(), threads);
            if left {
                gemm::ab_acc(F::ONE, self.s.view(), a, self.da.view_mut(), threads);
            }
        } else {
            gemm::abt(a, b, self.s.view_mut(), threads);
            if left {
                gemm::ab_acc(F::ONE, self.s.view(), b, self.da.view_mut(), threads);
            }
            if right {
                gemm::atb_acc(F::ONE, self.s.view(), a, self.db.view_mut(), threads);
            }
        }
    }
}

/// What the forward computation left for the backward one.
#[derive(Clone, Copy)]
pub struct Forward<'a, F> {
    pub module: &'a Module,
    pub tensors: &'a [Array2<F>],
    pub matrices: &'a [Array2<F>],
    pub groups: &'a [GroupValues],
    pub seed: u64,
}

/// `dL/dx` from the matrices' adjoints (each times its scale), through the tensor steps.
/// The tensors' gradients are written into `spare`'s buffers of an earlier call where they
/// have the shape; the derived tensors' are left there for the next.
pub fn backward<F: Real>(
    forward: &Forward<'_, F>,
    steps: &[TensorStep],
    adjoints: &mut [Option<Array2<F>>],
    scanned: &mut [Option<sparse::Scan<F>>],
    scales: &[F],
    spare: &mut Vec<Array2<F>>,
    threads: usize,
) -> Array2<F> {
    let Forward {
        module,
        tensors,
        matrices,
        ..
    } = *forward;
    // Only the tensors gradient passes through are written (and the embedding, whose
    // gradient is the result even when none reaches it).
    let on_path = crate::grad::tensors::on_gradient_path(module);
    let mut earlier = std::mem::take(spare).into_iter();
    let mut grads: Vec<Array2<F>> = (module.tensors.iter().zip(tensors))
        .map(|((h, t), value)| {
            let buffer = earlier.next();
            if on_path[h.index()] || t.op == TensorOp::Embedding {
                written_zeros(buffer, value.dim(), threads)
            } else {
                Array2::zeros((0, 0))
            }
        })
        .collect();
    let reaches = crate::grad::tensors::reaches_embedding(module);
    for step in steps {
        match *step {
            TensorStep::Metric(m) => {
                let Some(g) = adjoints[m.index()].as_mut() else {
                    continue;
                };
                metric_backward(
                    &module.matrices[m],
                    scales[m.index()],
                    (g, scanned[m.index()].take()),
                    &matrices[m.index()],
                    tensors,
                    (&mut grads, &reaches),
                    threads,
                );
            }
            TensorStep::Tensor(t) => {
                // Out of the list while its source's gradient is written, and back for
                // the next call.
                let g = std::mem::replace(&mut grads[t.index()], Array2::zeros((0, 0)));
                tensor_backward(forward, t, &g, &mut grads, threads);
                grads[t.index()] = g;
            }
        }
    }
    let embedding = module
        .tensors
        .iter()
        .find(|(_, t)| t.op == TensorOp::Embedding)
        .map_or(0, |(h, _)| h.index());
    let grad = std::mem::take(&mut grads[embedding]);
    *spare = grads;
    grad
}

/// A matrix of zeros written out, blocks on the threads (alone, a 1024 x 256 gradient's
/// zeros took 0.03 ms of one core), into `buffer` when it has the shape. `Array2::zeros`
/// takes fresh pages the kernel maps to its zero page; the GEMM's first write to each then
/// costs a copy-on-write fault and a TLB shootdown across the threads, 0.3-0.5 ms for a
/// 1024 x 256 gradient.
fn written_zeros<F: Real>(
    buffer: Option<Array2<F>>,
    dim: (usize, usize),
    threads: usize,
) -> Array2<F> {
    if let Some(mut buffer) = buffer.filter(|b| b.dim() == dim && b.is_standard_layout()) {
        zero_on_threads(&mut buffer, threads);
        return buffer;
    }
    let len = dim.0 * dim.1;
    let mut values: Vec<F> = Vec::with_capacity(len);
    let blocks: Vec<_> = values.spare_capacity_mut()[..len]
        .chunks_mut(FLOATS_PER_TASK)
        .collect();
    gemm::run_tasks(blocks, threads, |block| {
        block.fill(std::mem::MaybeUninit::new(F::ZERO))
    });
    // SAFETY: the tasks wrote each of the first `len` entries, and have all finished.
    unsafe { values.set_len(len) };
    Array2::from_shape_vec(dim, values).unwrap_or_else(|_| Array2::zeros(dim))
}

/// Sets every entry to zero, blocks of rows on the threads: one thread's memset of a
/// 1024 x 1024 adjoint takes a few tenths of a millisecond.
pub(super) fn zero_on_threads<F: Real>(a: &mut Array2<F>, threads: usize) {
    let rows = (FLOATS_PER_TASK / a.ncols().max(1)).max(1);
    let tasks: Vec<_> = a.axis_chunks_iter_mut(NdAxis(0), rows).collect();
    gemm::run_tasks(tasks, threads, |mut block| block.fill(F::ZERO));
}

/// `dst = src` (of one shape), blocks of rows on the threads (alone, the embedding's copy
/// took 0.05 ms of one core at 1024 x 256).
fn copy_on_threads<F: Real>(dst: &mut Array2<F>, src: ArrayView2<'_, F>, threads: usize) {
    let rows = (FLOATS_PER_TASK / src.ncols().max(1)).max(1);
    let blocks: Vec<_> = dst
        .axis_chunks_iter_mut(NdAxis(0), rows)
        .zip(src.axis_chunks_iter(NdAxis(0), rows))
        .collect();
    gemm::run_tasks(blocks, threads, |(mut dst, src)| dst.assign(&src));
}

/// From a matrix's adjoint, times `scale`, to its tensors'. For the distances, `dQ = dD / (2 D)` where the
/// clamp does not hold, then `dA_i += 2 (rowsum_i(dQ) a_i - (dQ B)_i)` and symmetrically for B.
fn metric_backward<F: Real>(
    matrix: &Matrix,
    scale: F,
    (g, scanned): (&mut Array2<F>, Option<sparse::Scan<F>>),
    value: &Array2<F>,
    tensors: &[Array2<F>],
    (grads, reaches): (&mut [Array2<F>], &[bool]),
    threads: usize,
) {
    let (left, right) = (matrix.left.index(), matrix.right.index());
    // A side the gradient does not reach the embedding through (stopped centres, say) is
    // not computed.
    let (to_left, to_right) = (reaches[left], reaches[right]);
    let two = F::from_f64(2.0);
    let floor = match matrix.metric {
        Metric::Dot => None,
        Metric::SqEuclid => Some(None),
        Metric::Euclid { eps } => Some(Some(F::from_f64(eps).sqrt())),
    };
    // The pass that wrote the adjoint may have found its entries already.
    let mut sparse = match scanned {
        Some(sparse::Scan::Sparse(entries)) => Some(entries),
        Some(sparse::Scan::Dense) => None,
        None => sparse::Compressed::of(g.view(), threads),
    };
    if let (Some(floor), true, true, None) = (floor, left == right, to_left, &sparse) {
        // One pass over the pairs (i, j), (j, i) of the symmetric matrix and its adjoint
        // (the distances are symmetric too): dQ of both entries' sum, into both samples'
        // coefficients, and -2 dQ to both entries, the symmetrised adjoint of the cross
        // term, ready for the GEMM.
        let n = g.nrows();
        let distances = value.view();
        let sums = match floor {
            Some(floor) => {
                // Divided whatever the distance, then selected: no branch in the lanes.
                let dq = move |w: F, d: F| {
                    let q = w / (two * d);
                    if d > floor { q } else { F::ZERO }
                };
                let pairs = SymmetricDistanceAdjoint { distances, dq };
                gemm::symmetrize_by(g.view_mut(), threads, &pairs)
            }
            None => {
                let pairs = SymmetricDistanceAdjoint {
                    distances,
                    dq: |w, _| w,
                };
                gemm::symmetrize_by(g.view_mut(), threads, &pairs)
            }
        };
        let coefficients = CoefficientSums::total(sums, n);
        let x = &tensors[left];
        add_scaled_rows(&mut grads[left], x, &coefficients, two * scale, threads);
        gemm::ab_acc(scale, g.view(), x.view(), grads[left].view_mut(), threads);
        return;
    }
    if let Some(floor) = floor {
        // dQ = dD / (2 D) where the clamp does not hold (D above its floor); the |a_i|^2
        // and |b_j|^2 terms take the row and column sums of dQ, the cross term -2 a_i . b_j
        // takes -2 dQ, which replaces the adjoint (only its nonzero entries can change).
        let dq = squared_adjoint(floor);
        let mut rows = vec![F::ZERO; g.nrows()];
        let mut cols = vec![F::ZERO; g.ncols()];
        match sparse.as_mut() {
            Some(entries) => entries.for_each_mut(|i, j, w| {
                let dq = dq(*w, value[(i, j)]);
                rows[i] = rows[i] + dq;
                cols[j] = cols[j] + dq;
                *w = -two * dq;
            }),
            None => {
                // Fixed blocks of rows on the threads; their column sums are added in
                // block order, so the result does not depend on the thread count.
                let width = g.ncols();
                let blocks = g.nrows().div_ceil(DISTANCE_ROWS);
                let mut block_cols = vec![vec![F::ZERO; width]; blocks];
                let tasks: Vec<_> = g
                    .axis_chunks_iter_mut(NdAxis(0), DISTANCE_ROWS)
                    .zip(value.axis_chunks_iter(NdAxis(0), DISTANCE_ROWS))
                    .zip(rows.chunks_mut(DISTANCE_ROWS))
                    .zip(block_cols.iter_mut())
                    .collect();
                gemm::run_tasks(
                    tasks,
                    threads,
                    |(((mut g_rows, d_rows), row_sums), col_sums)| {
                        let pairs = g_rows.rows_mut().into_iter().zip(d_rows.rows());
                        for ((mut g_row, d_row), row_sum) in pairs.zip(row_sums) {
                            let (Some(g_row), Some(d_row)) =
                                (g_row.as_slice_mut(), d_row.as_slice())
                            else {
                                unreachable!("adjoint and matrix rows are contiguous")
                            };
                            *row_sum = distance_adjoint_row(g_row, d_row, col_sums, &dq);
                        }
                    },
                );
                for block in block_cols {
                    add_into(&mut cols, &block);
                }
            }
        }
        let scaled_rows = |grad: &mut Array2<F>, x: &Array2<F>, coefficients: &[F]| {
            add_scaled_rows(grad, x, coefficients, two * scale, threads)
        };
        if left == right {
            // Both sums are one sample's coefficient: one pass over its row, not two.
            if to_left {
                add_into(&mut rows, &cols);
                scaled_rows(&mut grads[left], &tensors[left], &rows);
            }
        } else {
            if to_left {
                scaled_rows(&mut grads[left], &tensors[left], &rows);
            }
            if to_right {
                scaled_rows(&mut grads[right], &tensors[right], &cols);
            }
        }
    }
    if let Some(by_row) = sparse {
        let (x_left, x_right) = (tensors[left].view(), tensors[right].view());
        let by_column = to_right.then(|| by_row.transpose(g.ncols()));
        match (to_left, by_column) {
            // One sample's gradient takes both sides: (G + Gᵀ) X, the pairs taken both ways
            // once.
            (true, Some(by_column)) if left == right => by_row.accumulate_symmetric(
                &by_column,
                scale,
                x_right,
                grads[left].view_mut(),
                threads,
            ),
            (to_left, by_column) => {
                if to_left {
                    by_row.accumulate(scale, x_right, grads[left].view_mut(), threads);
                }
                if let Some(by_column) = by_column {
                    by_column.accumulate(scale, x_left, grads[right].view_mut(), threads);
                }
            }
        }
        return;
    }
    if left == right {
        gemm::symmetrize(g.view_mut(), threads);
        gemm::ab_acc(
            scale,
            g.view(),
            tensors[left].view(),
            grads[left].view_mut(),
            threads,
        );
    } else {
        if to_left {
            gemm::ab_acc(
                scale,
                g.view(),
                tensors[right].view(),
                grads[left].view_mut(),
                threads,
            );
        }
        if to_right {
            gemm::atb_acc(
                scale,
                g.view(),
                tensors[left].view(),
                grads[right].view_mut(),
                threads,
            );
        }
    }
}

/// `total += part`, elementwise.
fn add_into<F: Real>(total: &mut [F], part: &[F]) {
    total.iter_mut().zip(part).for_each(|(t, &p)| *t = *t + p);
}

/// Row `i` of `grad` gains `scale · coefficients[i]` times row `i` of `x`, blocks of rows on
/// the threads.
fn add_scaled_rows<F: Real>(
    grad: &mut Array2<F>,
    x: &Array2<F>,
    coefficients: &[F],
    scale: F,
    threads: usize,
) {
    let rows = (FLOATS_PER_TASK / x.ncols().max(1)).max(1);
    let blocks: Vec<_> = (grad.axis_chunks_iter_mut(NdAxis(0), rows))
        .zip(x.axis_chunks_iter(NdAxis(0), rows))
        .zip(coefficients.chunks(rows))
        .collect();
    gemm::run_tasks(blocks, threads, |((mut grad, x), coefficients)| {
        for ((mut row, x_row), &c) in grad.rows_mut().into_iter().zip(x.rows()).zip(coefficients) {
            let factor = scale * c;
            row.zip_mut_with(&x_row, |acc, &v| *acc = *acc + factor * v);
        }
    });
}

/// The backward pass of a symmetric distance matrix as [`gemm::MirrorPairs`]: an entry
/// and its mirror take `dq` of their sum (and of their distance), which goes into both
/// samples' coefficients, and are replaced by `-2 dq`.
struct SymmetricDistanceAdjoint<'a, F, Q> {
    /// The distances, n x n.
    distances: ArrayView2<'a, F>,
    dq: Q,
}

/// What a task of [`SymmetricDistanceAdjoint`] accumulates: per sample, the sums of `dq`
/// over its row by lanes (a block's row adds to its first sample's lanes) and over its
/// column; the coefficient is their total.
struct CoefficientSums<F> {
    rows: Vec<[F; transpose::BLOCK]>,
    columns: Vec<F>,
}

impl<F: Real> CoefficientSums<F> {
    /// Each sample's coefficient: the tasks' sums, added in task order.
    fn total(tasks: Vec<CoefficientSums<F>>, n: usize) -> Vec<F> {
        let mut coefficients = vec![F::ZERO; n];
        for task in tasks {
            let lanes = task
                .rows
                .iter()
                .map(|lanes| lanes.iter().fold(F::ZERO, |t, &v| t + v));
            for ((c, &column), row) in coefficients.iter_mut().zip(&task.columns).zip(lanes) {
                *c = *c + (column + row);
            }
        }
        coefficients
    }
}

impl<F: Real, Q: Fn(F, F) -> F + Sync> gemm::MirrorPairs<F> for SymmetricDistanceAdjoint<'_, F, Q> {
    type State = CoefficientSums<F>;

    fn state(&self) -> CoefficientSums<F> {
        CoefficientSums {
            rows: vec![[F::ZERO; transpose::BLOCK]; self.distances.nrows()],
            columns: vec![F::ZERO; self.distances.nrows()],
        }
    }

    #[inline(always)]
    fn block(
        &self,
        sums: &mut CoefficientSums<F>,
        (i, j): (usize, usize),
        upper: &mut transpose::Block<F>,
        lower: &mut transpose::Block<F>,
    ) {
        const B: usize = transpose::BLOCK;
        let minus_two = F::from_f64(-2.0);
        let mut columns = [F::ZERO; B];
        // A row at a time, each step its own loop over the row: so they run on vector lanes.
        for (a, (upper, lower)) in upper.iter_mut().zip(lower.iter_mut()).enumerate() {
            let row = self.distances.row(i + a);
            let Some(row) = row.as_slice() else {
                unreachable!("rows of a pair matrix are contiguous")
            };
            let distances = &row[j..][..B];
            let mut dq = [F::ZERO; B];
            for (((q, &u), &l), &d) in dq.iter_mut().zip(&*upper).zip(&*lower).zip(distances) {
                *q = (self.dq)(u + l, d);
            }
            for ((lane, column), &q) in sums.rows[i + a].iter_mut().zip(&mut columns).zip(&dq) {
                *lane = *lane + q;
                *column = *column + q;
            }
            for ((u, l), &q) in upper.iter_mut().zip(lower.iter_mut()).zip(&dq) {
                *u = minus_two * q;
                *l = *u;
            }
        }
        for (total, column) in sums.columns[j..][..B].iter_mut().zip(columns) {
            *total = *total + column;
        }
    }

    #[inline(always)]
    fn single(
        &self,
        sums: &mut CoefficientSums<F>,
        (i, j): (usize, usize),
        upper: F,
        lower: F,
    ) -> F {
        let dq = (self.dq)(upper + lower, self.distances[(i, j)]);
        sums.columns[j] = sums.columns[j] + dq;
        // On the diagonal, (i, i) is one entry: it counts once.
        if i != j {
            sums.columns[i] = sums.columns[i] + dq;
        }
        F::from_f64(-2.0) * dq
    }
}

/// `dQ = dD / (2 D)` from an entry `w` of the adjoint of a distance `d` (zero where the clamp
/// holds, `d` at its `floor`); the adjoint itself for a squared distance (`floor` None).
fn squared_adjoint<F: Real>(floor: Option<F>) -> impl Fn(F, F) -> F + Copy + Sync {
    let two = F::from_f64(2.0);
    move |w, d| match floor {
        Some(floor) if d > floor => w / (two * d),
        Some(_) => F::ZERO,
        None => w,
    }
}

/// One row of the distance adjoint's dense pass: each entry `w` of `g` becomes `-2 dq(w, d)`
/// and `dq` is added into `cols`; returns the row's sum of `dq`. Eight running sums,
/// combined in a fixed order at the end, let the loop run on vector lanes.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn distance_adjoint_row<F: Real>(
    g: &mut [F],
    d: &[F],
    cols: &mut [F],
    dq: &impl Fn(F, F) -> F,
) -> F {
    const LANES: usize = 8;
    let minus_two = F::from_f64(-2.0);
    let mut partial = [F::ZERO; LANES];
    let mut g_chunks = g.chunks_exact_mut(LANES);
    let mut d_chunks = d.chunks_exact(LANES);
    let mut col_chunks = cols.chunks_exact_mut(LANES);
    for ((g, d), cols) in (&mut g_chunks).zip(&mut d_chunks).zip(&mut col_chunks) {
        for lane in 0..LANES {
            let q = dq(g[lane], d[lane]);
            partial[lane] = partial[lane] + q;
            cols[lane] = cols[lane] + q;
            g[lane] = minus_two * q;
        }
    }
    let mut total = partial.into_iter().fold(F::ZERO, |a, b| a + b);
    let tail = g_chunks.into_remainder().iter_mut();
    for ((g, &d), col) in tail
        .zip(d_chunks.remainder())
        .zip(col_chunks.into_remainder())
    {
        let q = dq(*g, d);
        total = total + q;
        *col = *col + q;
        *g = minus_two * q;
    }
    total
}

/// From a derived tensor's adjoint to its source's.
fn tensor_backward<F: Real>(
    forward: &Forward<'_, F>,
    t: Handle<Tensor>,
    g: &Array2<F>,
    grads: &mut [Array2<F>],
    threads: usize,
) {
    let Forward {
        module,
        tensors,
        groups,
        seed,
        ..
    } = *forward;
    match &module.tensors[t].op {
        TensorOp::Columns { source, start, end } => {
            let mut target = grads[source.index()].slice_mut(ndarray::s![.., *start..*end]);
            target.zip_mut_with(g, |acc, &v| *acc = *acc + v);
        }
        TensorOp::Partition {
            source,
            sizes,
            part,
            site,
        } => {
            let cols = tensors[source.index()].ncols();
            let columns = partition_columns(cols, sizes, *part, (seed, *site));
            let target = &mut grads[source.index()];
            for (k, &c) in columns.iter().enumerate() {
                target
                    .column_mut(c)
                    .zip_mut_with(&g.column(k), |acc, &v| *acc = *acc + v);
            }
        }
        TensorOp::Normalize { source } => {
            // dx_i += (g_i - (g_i . y_i) y_i) / |x_i|, blocks of rows on the threads.
            let (y, x) = (&tensors[t.index()], &tensors[source.index()]);
            let rows = normalized_rows_per_task(g.ncols());
            let blocks: Vec<_> = (grads[source.index()].axis_chunks_iter_mut(NdAxis(0), rows))
                .zip(g.axis_chunks_iter(NdAxis(0), rows))
                .zip(y.axis_chunks_iter(NdAxis(0), rows))
                .zip(x.axis_chunks_iter(NdAxis(0), rows))
                .collect();
            gemm::run_tasks(blocks, threads, |(((mut target, g), y), x)| {
                let rows = ndarray::Zip::from(target.rows_mut()).and(g.rows());
                rows.and(y.rows())
                    .and(x.rows())
                    .for_each(|mut target, g, y, x| {
                        let norm = x.dot(&x).sqrt();
                        let along = g.dot(&y);
                        ndarray::Zip::from(&mut target)
                            .and(&g)
                            .and(&y)
                            .for_each(|t, &g, &y| *t = *t + (g - along * y) / norm);
                    });
            });
        }
        TensorOp::Centres {
            source,
            groups: grouping,
        } => {
            let grouping = &groups[grouping.index()];
            let target = &mut grads[source.index()];
            for (sample, &group) in grouping.of_sample.iter().enumerate() {
                let size = F::from_f64(grouping.sizes[group] as f64);
                target
                    .row_mut(sample)
                    .zip_mut_with(&g.row(group), |acc, &v| *acc = *acc + v / size);
            }
        }
        TensorOp::Scale { source, factor } => {
            let factor = F::from_f64(*factor);
            grads[source.index()].zip_mut_with(g, |acc, &v| *acc = *acc + factor * v);
        }
        TensorOp::Embedding
        | TensorOp::Stop { .. }
        | TensorOp::Concat { .. }
        | TensorOp::OneHot { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows divided by their lengths on the threads, and the first row of length zero
    /// named whichever block it falls in (blocks of 128 rows at 64 columns).
    #[test]
    fn normalisation_names_the_first_zero_row() {
        let mut state = 7_u64;
        let a = Array2::from_shape_simple_fn((300, 64), || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f64 / (1u64 << 24) as f64 - 0.5
        });
        for threads in [1, 3] {
            let mut unit = a.clone();
            assert_eq!(normalize_rows(&mut unit, threads), None);
            for (row, original) in unit.rows().into_iter().zip(a.rows()) {
                let norm = original.dot(&original).sqrt();
                assert!(row.iter().zip(original).all(|(&u, &v)| u == v / norm));
            }
            let mut zeroed = a.clone();
            for row in [290, 140] {
                zeroed.row_mut(row).fill(0.0);
            }
            assert_eq!(normalize_rows(&mut zeroed, threads), Some(140));
        }
    }

    /// The pass over mirrored pairs against its definition: entry (i, j) becomes
    /// `-2 dq(g_ij + g_ji, d_ij)` and sample i's coefficient is the sum of
    /// `dq(g_ij + g_ji, d_ij)` over its row; the same bits for any thread count, with tiles
    /// cut at the edges, blocks off the diagonal and padded rows.
    #[test]
    fn symmetric_distance_adjoint_matches_its_definition() {
        let floor = 0.25;
        let dq = |w: f64, d: f64| if d > floor { w / (2.0 * d) } else { 0.0 };
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for n in [1, 7, 64, 65, 130, 700] {
            let g0 = Array2::from_shape_fn((n, n + 3), |_| uniform() - 0.5);
            let mut d = Array2::from_shape_fn((n, n), |_| uniform());
            for i in 0..n {
                d[(i, i)] = floor;
                for j in 0..i {
                    d[(i, j)] = d[(j, i)];
                }
            }
            // In a wider buffer whose padding is NaN: a read past a row would show.
            let mut padded = Array2::from_elem((n, n + 5), f64::NAN);
            padded.slice_mut(ndarray::s![.., ..n]).assign(&d);
            let distances = padded.slice(ndarray::s![.., ..n]);
            let mut first: Option<(Array2<f64>, Vec<f64>)> = None;
            for threads in [1, 2, 3] {
                let mut g = g0.clone();
                let pairs = SymmetricDistanceAdjoint { distances, dq };
                let sums = gemm::symmetrize_by(g.slice_mut(ndarray::s![.., ..n]), threads, &pairs);
                let coefficients = CoefficientSums::total(sums, n);
                for i in 0..n {
                    let mut row = 0.0;
                    for j in 0..n {
                        let q = dq(g0[(i, j)] + g0[(j, i)], d[(i, j)]);
                        assert_eq!(g[(i, j)], -2.0 * q, "n = {n}, entry ({i}, {j})");
                        row += q;
                    }
                    let got = coefficients[i];
                    assert!(
                        (got - row).abs() <= 1e-12 * (1.0 + row.abs()),
                        "n = {n}, row {i}: {got} against {row}"
                    );
                    assert_eq!(g[(i, n)], g0[(i, n)], "the padding is left alone");
                }
                match &first {
                    None => first = Some((g, coefficients)),
                    Some((g1, c1)) => {
                        assert!(
                            g == *g1 && coefficients == *c1,
                            "n = {n}, {threads} threads"
                        );
                    }
                }
            }
        }
    }
}
