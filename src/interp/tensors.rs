//! Tensors and pair matrices, forward and backward, by plain loops.

use super::Precision;
use crate::grad::TensorStep;
use crate::ir::*;
use crate::runtime::error::RunError;
use crate::runtime::groups::{GroupValues, column_part, column_range, partition_columns};
use ndarray::{Array2, Axis as NdAxis};

/// The value of tensor `target`, computing (and caching) the tensors it needs.
pub fn compute_all(
    module: &Module,
    x: &Array2<f64>,
    groups: &[GroupValues],
    seed: u64,
    precision: Precision,
    cache: &mut Vec<Option<Array2<f64>>>,
    target: Handle<Tensor>,
) -> Result<Array2<f64>, RunError> {
    if let Some(value) = &cache[target.index()] {
        return Ok(value.clone());
    }
    let r = |v: f64| precision.round(v);
    let source = |h: Handle<Tensor>, cache: &mut Vec<Option<Array2<f64>>>| {
        compute_all(module, x, groups, seed, precision, cache, h)
    };
    let value = match &module.tensors[target].op {
        TensorOp::Embedding => x.clone(),
        TensorOp::Columns {
            source: s,
            start,
            end,
        } => column_range(&source(*s, cache)?, *start, *end, target)?.to_owned(),
        TensorOp::Partition {
            source: s,
            sizes,
            part,
            site,
        } => {
            let a = source(*s, cache)?;
            let columns = column_part(a.ncols(), sizes, *part, (seed, *site), target)?;
            a.select(ndarray::Axis(1), &columns)
        }
        TensorOp::Normalize { source: s } => {
            let mut a = source(*s, cache)?;
            for (row, mut values) in a.rows_mut().into_iter().enumerate() {
                let norm = r(values.iter().fold(0.0, |acc, &v| r(acc + r(v * v))).sqrt());
                if norm == 0.0 {
                    return Err(RunError::ZeroRow {
                        row,
                        tensor: target,
                    });
                }
                values.mapv_inplace(|v| r(v / norm));
            }
            a
        }
        TensorOp::Centres {
            source: s,
            groups: g,
        } => {
            let a = source(*s, cache)?;
            let grouping = &groups[g.index()];
            let mut sums = Array2::zeros((grouping.count(), a.ncols()));
            for (sample, row) in a.rows().into_iter().enumerate() {
                let mut target_row = sums.row_mut(grouping.of_sample[sample]);
                target_row.zip_mut_with(&row, |acc, &v| *acc = r(*acc + v));
            }
            for (group, mut row) in sums.rows_mut().into_iter().enumerate() {
                let size = grouping.sizes[group] as f64;
                row.mapv_inplace(|v| r(v / size));
            }
            sums
        }
        TensorOp::Stop { source: s } => source(*s, cache)?,
        TensorOp::Concat { left, right } => {
            let a = source(*left, cache)?;
            let b = source(*right, cache)?;
            ndarray::concatenate(NdAxis(1), &[a.view(), b.view()]).map_err(|e| {
                RunError::Internal {
                    what: format!("concat: {e}"),
                }
            })?
        }
        TensorOp::OneHot { groups: g } => {
            let grouping = &groups[g.index()];
            let mut a = Array2::zeros((grouping.of_sample.len(), grouping.count()));
            for (sample, &group) in grouping.of_sample.iter().enumerate() {
                a[(sample, group)] = 1.0;
            }
            a
        }
        TensorOp::Scale { source: s, factor } => source(*s, cache)?.mapv(|v| r(v * factor)),
    };
    cache[target.index()] = Some(value.clone());
    Ok(value)
}

fn dot(a: ndarray::ArrayView1<f64>, b: ndarray::ArrayView1<f64>, precision: Precision) -> f64 {
    a.iter().zip(b.iter()).fold(0.0, |acc, (&x, &y)| {
        precision.round(acc + precision.round(x * y))
    })
}

/// Squared distances |a_i|^2 + |b_j|^2 - 2 a_i . b_j, with an exact zero diagonal when a
/// tensor is paired with itself.
/// `|a_i|^2 + |b_j|^2 - 2 a_i . b_j` entry by entry, with an exact zero diagonal when
/// `a` is `b`.
struct SquaredDistances<'t> {
    a: &'t Array2<f64>,
    b: &'t Array2<f64>,
    norms_a: Vec<f64>,
    norms_b: Vec<f64>,
    symmetric: bool,
    precision: Precision,
}

impl<'t> SquaredDistances<'t> {
    fn new(a: &'t Array2<f64>, b: &'t Array2<f64>, symmetric: bool, precision: Precision) -> Self {
        let norms = |t: &Array2<f64>| -> Vec<f64> {
            t.rows()
                .into_iter()
                .map(|row| dot(row, row, precision))
                .collect()
        };
        SquaredDistances {
            norms_a: norms(a),
            norms_b: norms(b),
            a,
            b,
            symmetric,
            precision,
        }
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        if self.symmetric && i == j {
            return 0.0;
        }
        let r = |v: f64| self.precision.round(v);
        let cross = dot(self.a.row(i), self.b.row(j), self.precision);
        r(r(self.norms_a[i] + self.norms_b[j]) - r(2.0 * cross))
    }

    fn matrix(&self) -> Array2<f64> {
        Array2::from_shape_fn((self.a.nrows(), self.b.nrows()), |(i, j)| self.at(i, j))
    }
}

fn squared_distances(
    a: &Array2<f64>,
    b: &Array2<f64>,
    symmetric: bool,
    precision: Precision,
) -> Array2<f64> {
    SquaredDistances::new(a, b, symmetric, precision).matrix()
}

pub fn pair_matrix(
    matrix: &Matrix,
    a: &Array2<f64>,
    b: &Array2<f64>,
    precision: Precision,
) -> Array2<f64> {
    let symmetric = matrix.is_symmetric();
    match matrix.metric {
        Metric::Dot => Array2::from_shape_fn((a.nrows(), b.nrows()), |(i, j)| {
            dot(a.row(i), b.row(j), precision)
        }),
        Metric::SqEuclid => squared_distances(a, b, symmetric, precision),
        Metric::Euclid { eps } => squared_distances(a, b, symmetric, precision)
            .mapv(|q| precision.round(q.max(eps).sqrt())),
    }
}

/// `dL/dx` from the adjoints of the matrices, through the tensor steps.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    module: &Module,
    steps: &[TensorStep],
    tensors: &[Array2<f64>],
    matrices: &[Array2<f64>],
    groups: &[GroupValues],
    matrix_adjoints: &[Array2<f64>],
    seed: u64,
    precision: Precision,
) -> Array2<f64> {
    let r = |v: f64| precision.round(v);
    let mut adjoints: Vec<Array2<f64>> = tensors.iter().map(|t| Array2::zeros(t.dim())).collect();
    let add = |target: &mut Array2<f64>, i: usize, k: usize, v: f64| {
        target[(i, k)] = r(target[(i, k)] + v)
    };
    for step in steps {
        match *step {
            TensorStep::Metric(m) => {
                let matrix = &module.matrices[m];
                let (a, b) = (
                    &tensors[matrix.left.index()],
                    &tensors[matrix.right.index()],
                );
                let g = &matrix_adjoints[m.index()];
                let mut da = Array2::zeros(a.dim());
                let mut db = Array2::zeros(b.dim());
                match matrix.metric {
                    Metric::Dot => {
                        // An entry of zero adds nothing: skipping it keeps a sparse
                        // adjoint's backward at O(nonzeros · d).
                        for ((i, j), &w) in g.indexed_iter().filter(|(_, w)| **w != 0.0) {
                            for k in 0..a.ncols() {
                                add(&mut da, i, k, r(w * b[(j, k)]));
                                add(&mut db, j, k, r(w * a[(i, k)]));
                            }
                        }
                    }
                    Metric::SqEuclid | Metric::Euclid { .. } => {
                        let value = &matrices[m.index()];
                        let squared = SquaredDistances::new(a, b, matrix.is_symmetric(), precision);
                        for ((i, j), &w) in g.indexed_iter().filter(|(_, w)| **w != 0.0) {
                            let wq = match matrix.metric {
                                // Zero where the clamp holds.
                                Metric::Euclid { eps } if squared.at(i, j) > eps => {
                                    r(w / r(2.0 * value[(i, j)]))
                                }
                                Metric::Euclid { .. } => 0.0,
                                _ => w,
                            };
                            if wq == 0.0 {
                                continue;
                            }
                            for k in 0..a.ncols() {
                                let diff = r(a[(i, k)] - b[(j, k)]);
                                let term = r(2.0 * r(wq * diff));
                                add(&mut da, i, k, term);
                                add(&mut db, j, k, -term);
                            }
                        }
                    }
                }
                adjoints[matrix.left.index()].zip_mut_with(&da, |acc, &v| *acc = r(*acc + v));
                adjoints[matrix.right.index()].zip_mut_with(&db, |acc, &v| *acc = r(*acc + v));
            }
            TensorStep::Tensor(t) => {
                let g = adjoints[t.index()].clone();
                match &module.tensors[t].op {
                    TensorOp::Columns { source, start, .. } => {
                        let target = &mut adjoints[source.index()];
                        for ((i, k), &v) in g.indexed_iter() {
                            add(target, i, start + k, v);
                        }
                    }
                    TensorOp::Partition {
                        source,
                        sizes,
                        part,
                        site,
                    } => {
                        let cols = tensors[source.index()].ncols();
                        let columns = partition_columns(cols, sizes, *part, (seed, *site));
                        let target = &mut adjoints[source.index()];
                        for ((i, k), &v) in g.indexed_iter() {
                            add(target, i, columns[k], v);
                        }
                    }
                    TensorOp::Normalize { source } => {
                        let y = &tensors[t.index()];
                        let x = &tensors[source.index()];
                        let target = &mut adjoints[source.index()];
                        for i in 0..g.nrows() {
                            let norm = r(dot(x.row(i), x.row(i), precision).sqrt());
                            let along = dot(g.row(i), y.row(i), precision);
                            for k in 0..g.ncols() {
                                add(target, i, k, r(r(g[(i, k)] - r(along * y[(i, k)])) / norm));
                            }
                        }
                    }
                    TensorOp::Centres {
                        source,
                        groups: grouping,
                    } => {
                        let grouping = &groups[grouping.index()];
                        let target = &mut adjoints[source.index()];
                        for (sample, &group) in grouping.of_sample.iter().enumerate() {
                            let size = grouping.sizes[group] as f64;
                            for k in 0..g.ncols() {
                                add(target, sample, k, r(g[(group, k)] / size));
                            }
                        }
                    }
                    TensorOp::Scale { source, factor } => {
                        let target = &mut adjoints[source.index()];
                        for ((i, k), &v) in g.indexed_iter() {
                            add(target, i, k, r(v * factor));
                        }
                    }
                    TensorOp::Embedding
                    | TensorOp::Stop { .. }
                    | TensorOp::Concat { .. }
                    | TensorOp::OneHot { .. } => {}
                }
            }
        }
    }
    let embedding = module
        .tensors
        .iter()
        .find(|(_, t)| t.op == TensorOp::Embedding)
        .map_or(0, |(h, _)| h.index());
    adjoints.swap_remove(embedding)
}
