//! The reference evaluator: the oracle the JIT is held against.
//!
//! It evaluates the IR as written, on demand and memoised, in float64; in float32 mode
//! every operation's result is rounded to float32, which is how a float32 kernel computes.
//! It ignores the schedule: a batch value that needs per-anchor values runs that block's
//! rows when it is first asked for, so its results do not depend on the phase planner
//! that the JIT relies on. Simplicity beats speed here.

mod sets;
mod tensors;

use crate::grad::{Gradient, ScatterTarget, TensorStep};
use crate::ir::*;
use crate::runtime::Batch;
use crate::runtime::error::{Origin, RunError};
use crate::runtime::groups::{GroupValues, evaluate_groupings};
use ndarray::Array2;
use sets::Members;
use std::collections::HashMap;
use std::rc::Rc;

/// The floating-point format arithmetic is rounded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

impl Precision {
    fn round(self, value: f64) -> f64 {
        match self {
            Precision::F32 => value as f32 as f64,
            Precision::F64 => value,
        }
    }
}

/// A loss's value, its stats and, when asked for, `dL/dx`.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub loss: f64,
    pub stats: Vec<(String, f64)>,
    pub grad: Option<Array2<f64>>,
}

/// The loss and stats of `module` on `batch`.
pub fn evaluate(module: &Module, batch: &Batch<'_>, precision: Precision) -> Result<Output> {
    let mut interp = Interp::new(module, batch, precision, Mode::Plain, None)?;
    interp.outputs()
}

/// [`evaluate`] on pair matrices computed elsewhere, which must be the module's matrices
/// on this batch: the compiled backend, falling back to the interpreter, hands over the
/// matrices its GEMMs made instead of having them recomputed entry by entry.
pub fn evaluate_on(
    module: &Module,
    batch: &Batch<'_>,
    precision: Precision,
    matrices: Vec<Array2<f64>>,
) -> Result<Output> {
    let mut interp = Interp::new(module, batch, precision, Mode::Plain, Some(matrices))?;
    interp.outputs()
}

/// The values of every `stop(...)` and every sampled set at one batch, to hold fixed while
/// the embeddings move: a finite difference of [`evaluate_frozen`] is then the derivative
/// the gradient rules define, with detached values and drawn samples constant.
#[derive(Debug, Default)]
pub struct Frozen {
    tensors: HashMap<Handle<Tensor>, Array2<f64>>,
    exprs: HashMap<(Handle<Expr>, Point), Val>,
    samples: HashMap<(Handle<Set>, Point), Rc<Members>>,
}

/// Evaluates `module` on `batch`, recording what [`evaluate_frozen`] holds fixed.
pub fn freeze(module: &Module, batch: &Batch<'_>, precision: Precision) -> Result<Frozen> {
    let mut interp = Interp::new(
        module,
        batch,
        precision,
        Mode::Record(Frozen::default()),
        None,
    )?;
    interp.outputs()?;
    match interp.mode {
        Mode::Record(frozen) => Ok(frozen),
        _ => Err(RunError::Internal {
            what: "recording mode lost".into(),
        }),
    }
}

/// The loss of `module` on `batch` with the stops and samples of `frozen`.
pub fn evaluate_frozen(
    module: &Module,
    batch: &Batch<'_>,
    precision: Precision,
    frozen: Frozen,
) -> Result<(Output, Frozen)> {
    let mut interp = Interp::new(module, batch, precision, Mode::Replay(frozen), None)?;
    let output = interp.outputs()?;
    match interp.mode {
        Mode::Replay(frozen) => Ok((output, frozen)),
        _ => Err(RunError::Internal {
            what: "replay mode lost".into(),
        }),
    }
}

/// Whether stops and samples are computed, recorded or replayed.
enum Mode {
    Plain,
    Record(Frozen),
    Replay(Frozen),
}

/// The loss, stats and gradient of a differentiated module on `batch`.
pub fn evaluate_with_gradient(
    gradient: &Gradient,
    batch: &Batch<'_>,
    precision: Precision,
) -> Result<Output> {
    gradient_on(gradient, batch, precision, None)
}

/// [`evaluate_with_gradient`] on given pair matrices, as [`evaluate_on`].
pub fn evaluate_with_gradient_on(
    gradient: &Gradient,
    batch: &Batch<'_>,
    precision: Precision,
    matrices: Vec<Array2<f64>>,
) -> Result<Output> {
    gradient_on(gradient, batch, precision, Some(matrices))
}

fn gradient_on(
    gradient: &Gradient,
    batch: &Batch<'_>,
    precision: Precision,
    matrices: Option<Vec<Array2<f64>>>,
) -> Result<Output> {
    let mut interp = Interp::new(&gradient.module, batch, precision, Mode::Plain, matrices)?;
    let mut output = interp.outputs()?;
    let mut slots: Vec<Array2<f64>> = (gradient.slots.iter())
        .map(|slot| Array2::zeros(interp.matrices[slot.matrix.index()].dim()))
        .collect();
    for scatter in &gradient.scatters {
        interp.scatter(scatter, &mut slots[scatter.slot])?;
    }
    // Each matrix's adjoint: its slots, each times its scale, added in slot order. An entry
    // no scatter reached stays zero whatever the scale: the factor came out of weights like
    // `if c then 0 else f * r`, zero where `f` may be infinite.
    let mut adjoints: Vec<Array2<f64>> = (interp.matrices.iter())
        .map(|m| Array2::zeros(m.dim()))
        .collect();
    for (slot, values) in gradient.slots.iter().zip(slots) {
        let scale = match slot.scale {
            Some(scale) => interp.num(scale, Point::Batch)?,
            None => 1.0,
        };
        let adjoint = &mut adjoints[slot.matrix.index()];
        adjoint.zip_mut_with(&values, |a, &w| {
            if w != 0.0 {
                *a = interp.r(*a + interp.r(w * scale));
            }
        });
    }
    let grad = interp.tensor_backward(&gradient.tensor_steps, &adjoints);
    if let Some((_, &value)) = grad.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(RunError::NotFinite {
            what: "gradient".into(),
            value,
            origin: interp.origin,
        });
    }
    output.grad = Some(grad);
    Ok(output)
}

/// A value: a number (booleans are 0 and 1), a vector, or a chosen member.
#[derive(Debug, Clone)]
enum Val {
    Num(f64),
    Vector(Rc<Vec<f64>>),
    Member(Option<Point>),
}

impl Val {
    fn num(&self) -> f64 {
        match self {
            Val::Num(v) => *v,
            Val::Vector(_) | Val::Member(_) => f64::NAN,
        }
    }
}

/// Where an expression is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Point {
    Batch,
    /// One anchor of a block.
    Row {
        block: Handle<Block>,
        anchor: usize,
    },
    /// One entry (row, col) of a space; `block` when the row is an anchor of it.
    Member {
        block: Option<Handle<Block>>,
        row: usize,
        col: usize,
        space: Space,
    },
    /// One pair (left, right) of columns of an anchor's cross set.
    Cross {
        block: Handle<Block>,
        anchor: usize,
        left: usize,
        right: usize,
        space: Space,
    },
    /// One entry of a vector.
    Entry(usize),
}

impl Point {
    fn anchor(self) -> Option<usize> {
        match self {
            Point::Row { anchor, .. } | Point::Cross { anchor, .. } => Some(anchor),
            Point::Member {
                block: Some(_),
                row,
                ..
            } => Some(row),
            _ => None,
        }
    }

    /// The anchor of `block` this point lies in.
    fn row_of(self, block: Handle<Block>) -> Option<usize> {
        match self {
            Point::Row { block: b, anchor }
            | Point::Cross {
                block: b, anchor, ..
            } if b == block => Some(anchor),
            Point::Member {
                block: Some(b),
                row,
                ..
            } if b == block => Some(row),
            _ => None,
        }
    }
}

/// The memoised state of one anchor of one block.
#[derive(Default)]
struct RowState {
    values: HashMap<Handle<Expr>, Val>,
    sets: HashMap<Handle<Set>, Rc<Members>>,
    skipped: Option<bool>,
}

struct Interp<'m> {
    module: &'m Module,
    precision: Precision,
    seed: u64,
    labels: Vec<i64>,
    groups: Vec<GroupValues>,
    tensors: Vec<Array2<f64>>,
    matrices: Vec<Array2<f64>>,
    batch_values: HashMap<Handle<Expr>, Val>,
    batch_sets: HashMap<Handle<Set>, Rc<Members>>,
    rows: HashMap<(Handle<Block>, usize), RowState>,
    mode: Mode,
    /// The first value that became infinite or NaN from finite inputs.
    origin: Option<Origin>,
}

type Result<T> = std::result::Result<T, RunError>;

impl<'m> Interp<'m> {
    fn new(
        module: &'m Module,
        batch: &Batch<'_>,
        precision: Precision,
        mut mode: Mode,
        given: Option<Vec<Array2<f64>>>,
    ) -> Result<Interp<'m>> {
        batch.validate(module, 1)?;
        let x = batch.x.mapv(|v| precision.round(v));
        let mut tensor_cache: Vec<Option<Array2<f64>>> = vec![None; module.tensors.len()];
        if let Mode::Replay(frozen) = &mode {
            for (h, value) in &frozen.tensors {
                tensor_cache[h.index()] = Some(value.clone());
            }
        }
        // The reference evaluator runs on one thread (k-means gives the same on any).
        let points = &mut Array2::zeros((0, 0));
        let groups = evaluate_groupings(module, batch, (points, 1), |tensor, groups, points| {
            *points = tensors::compute_all(
                module,
                &x,
                groups,
                batch.seed,
                precision,
                &mut tensor_cache,
                tensor,
            )
            .unwrap_or_else(|_| Array2::zeros((0, 0)))
        })?;
        let mut tensors_out = Vec::with_capacity(module.tensors.len());
        for (h, _) in module.tensors.iter() {
            tensors_out.push(tensors::compute_all(
                module,
                &x,
                &groups,
                batch.seed,
                precision,
                &mut tensor_cache,
                h,
            )?);
        }
        if let Mode::Record(frozen) = &mut mode {
            for (h, t) in module.tensors.iter() {
                if let TensorOp::Stop { .. } = t.op {
                    frozen.tensors.insert(h, tensors_out[h.index()].clone());
                }
            }
        }
        let matrices = given.unwrap_or_else(|| {
            module
                .matrices
                .iter()
                .map(|(_, m)| {
                    tensors::pair_matrix(
                        m,
                        &tensors_out[m.left.index()],
                        &tensors_out[m.right.index()],
                        precision,
                    )
                })
                .collect()
        });
        Ok(Interp {
            module,
            precision,
            seed: batch.seed,
            labels: batch.labels.to_vec(),
            groups,
            tensors: tensors_out,
            matrices,
            batch_values: HashMap::new(),
            batch_sets: HashMap::new(),
            rows: HashMap::new(),
            mode,
            origin: None,
        })
    }

    fn r(&self, value: f64) -> f64 {
        self.precision.round(value)
    }

    fn outputs(&mut self) -> Result<Output> {
        let module = self.module;
        let loss = self.eval(module.loss_expr(), Point::Batch)?.num();
        if !loss.is_finite() {
            return Err(RunError::NotFinite {
                what: "loss".into(),
                value: loss,
                origin: self.origin,
            });
        }
        let mut stats = Vec::with_capacity(module.stats.len());
        for (name, h) in &module.stats {
            let value = self.eval(*h, Point::Batch)?.num();
            if !value.is_finite() {
                return Err(RunError::NotFinite {
                    what: format!("stat `{name}`"),
                    value,
                    origin: self.origin,
                });
            }
            stats.push((name.clone(), value));
        }
        Ok(Output {
            loss,
            stats,
            grad: None,
        })
    }

    /// How many rows a domain has.
    fn domain_len(&self, domain: Domain) -> usize {
        match domain {
            Domain::Samples => self.tensors.first().map_or(0, |x| x.nrows()),
            Domain::Groups(g) => self.groups[g.index()].count(),
        }
    }

    fn label(&self, domain: Domain, index: usize) -> i64 {
        match domain {
            Domain::Samples => self.labels[index],
            Domain::Groups(g) => self.groups[g.index()]
                .labels
                .as_ref()
                .map_or(-1, |l| l[index]),
        }
    }

    // ---- evaluation ----------------------------------------------------------------------

    /// The value of `h` at `point`, memoised at batch and anchor level.
    fn eval(&mut self, h: Handle<Expr>, point: Point) -> Result<Val> {
        match self.module.exprs[h].level {
            Level::Const | Level::Batch => {
                if let Some(v) = self.batch_values.get(&h) {
                    return Ok(v.clone());
                }
                let v = self.compute(h, Point::Batch)?;
                self.batch_values.insert(h, v.clone());
                Ok(v)
            }
            Level::Row(block) => {
                let anchor = point.row_of(block).ok_or_else(|| internal(h))?;
                if let Some(v) = self
                    .rows
                    .get(&(block, anchor))
                    .and_then(|r| r.values.get(&h))
                {
                    return Ok(v.clone());
                }
                let v = self.compute(h, Point::Row { block, anchor })?;
                self.rows
                    .entry((block, anchor))
                    .or_default()
                    .values
                    .insert(h, v.clone());
                Ok(v)
            }
            Level::Member { .. } | Level::Cross { .. } => self.compute(h, point),
        }
    }

    fn num(&mut self, h: Handle<Expr>, point: Point) -> Result<f64> {
        Ok(match (self.eval(h, point)?, point) {
            (Val::Vector(values), Point::Entry(k)) => values.get(k).copied().unwrap_or(f64::NAN),
            (value, _) => value.num(),
        })
    }

    fn compute(&mut self, h: Handle<Expr>, point: Point) -> Result<Val> {
        let module = self.module;
        let e = &module.exprs[h];
        Ok(match &e.kind {
            ExprKind::Const(Real(v)) => Val::Num(self.r(*v)),
            ExprKind::Bool(b) => Val::Num(f64::from(u8::from(*b))),
            ExprKind::BatchSize => Val::Num(self.domain_len(Domain::Samples) as f64),
            ExprKind::Entry(m) => {
                let Point::Member { row, col, .. } = point else {
                    return Err(internal(h));
                };
                Val::Num(self.matrices[m.index()][(row, col)])
            }
            ExprKind::Same | ExprKind::IsSelf | ExprKind::Index(_) | ExprKind::GroupSize { .. } => {
                let Point::Member {
                    row, col, space, ..
                } = point
                else {
                    return Err(internal(h));
                };
                Val::Num(self.structural(&e.kind, row, col, space))
            }
            ExprKind::CrossSide { side, value } => {
                let Point::Cross {
                    block,
                    anchor,
                    left,
                    right,
                    space,
                } = point
                else {
                    return Err(internal(h));
                };
                let col = if *side == Side::Left { left } else { right };
                self.eval(
                    *value,
                    Point::Member {
                        block: Some(block),
                        row: anchor,
                        col,
                        space,
                    },
                )?
            }
            ExprKind::Unary { op, arg } => {
                let a = self.eval(*arg, point)?;
                let result = self.map(a.clone(), |x| op.apply(x));
                self.note(h, point, &[&a], &result, false);
                result
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.eval(*lhs, point)?;
                // Conditions short-circuit, as a spec reads them.
                if *op == BinaryOp::And && a.num() == 0.0 {
                    return Ok(Val::Num(0.0));
                }
                if *op == BinaryOp::Or && a.num() != 0.0 {
                    return Ok(Val::Num(1.0));
                }
                let b = self.eval(*rhs, point)?;
                let result = self.zip(a.clone(), b.clone(), |x, y| op.apply(x, y));
                self.note(h, point, &[&a, &b], &result, false);
                result
            }
            ExprKind::Select {
                cond,
                then,
                otherwise,
            } => {
                let c = self.num(*cond, point)?;
                self.eval(if c != 0.0 { *then } else { *otherwise }, point)?
            }
            ExprKind::Stop(arg) => {
                if let Mode::Replay(frozen) = &self.mode
                    && let Some(value) = frozen.exprs.get(&(h, point))
                {
                    return Ok(value.clone());
                }
                let value = self.eval(*arg, point)?;
                if let Mode::Record(frozen) = &mut self.mode {
                    frozen.exprs.insert((h, point), value.clone());
                }
                value
            }
            ExprKind::Reduce {
                set, body, scope, ..
            } if matches!(e.ty, Type::Vector(_)) => {
                let (members, at) = self.members_at(*set, *scope, point)?;
                let Type::Vector(len) = e.ty else {
                    return Err(internal(h));
                };
                let mut total = vec![0.0; len as usize];
                for m in members.points(at) {
                    let Val::Vector(part) = self.eval(*body, m)? else {
                        return Err(internal(h));
                    };
                    for (acc, &v) in total.iter_mut().zip(part.iter()) {
                        *acc = self.precision.round(*acc + v);
                    }
                }
                Val::Vector(Rc::new(total))
            }
            ExprKind::Reduce {
                op,
                set,
                body,
                scope,
            } => Val::Num(self.reduce(h, *op, *set, *body, *scope, point)?),
            ExprKind::Rank { set, k, scope } => {
                let (members, at) = self.members_at(*set, *scope, point)?;
                let sorted = self.sorted(&members, *set, at)?;
                let k_value = self.num(*k, point)?;
                let index = self.rank_index(k_value, sorted.len(), h, point)?;
                Val::Num(sorted[index].0)
            }
            ExprKind::Cut {
                set,
                count,
                largest,
                part,
            } => Val::Num(self.cut(h, *set, *count, *largest, *part)?),
            ExprKind::ArgReduce {
                op,
                set,
                body,
                scope,
            } => {
                let (members, at) = self.members_at(*set, *scope, point)?;
                let chosen = match op {
                    ArgOp::Rank(k) => {
                        let sorted = self.sorted(&members, *set, at)?;
                        let k_value = self.num(*k, point)?;
                        let index = self.rank_index(k_value, sorted.len(), h, point)?;
                        Some(sorted[index].1)
                    }
                    ArgOp::Min | ArgOp::Max => {
                        let mut best: Option<(f64, Point)> = None;
                        for m in members.points(at) {
                            let v = self.num(*body, m)?;
                            let better = match best {
                                None => true,
                                Some((b, _)) if *op == ArgOp::Min => v < b,
                                Some((b, _)) => v > b,
                            };
                            if better {
                                best = Some((v, m));
                            }
                        }
                        best.map(|(_, p)| p)
                    }
                };
                Val::Member(chosen)
            }
            ExprKind::At { value, at } => match self.eval(*at, point)? {
                Val::Member(Some(member)) => self.eval(*value, member)?,
                _ => Val::Num(0.0),
            },
            ExprKind::Hist {
                set,
                bins,
                lo,
                hi,
                scope,
            } => {
                let (members, at) = self.members_at(*set, *scope, point)?;
                let value = module.sets[*set].value;
                let mut hist = vec![0.0; *bins as usize];
                for m in members.points(at) {
                    let s = self.num(value, m)?;
                    let (b, low, high) = hist_weights(s, *bins, lo.0, hi.0);
                    hist[b] = self.r(hist[b] + self.r(low));
                    hist[b + 1] = self.r(hist[b + 1] + self.r(high));
                }
                Val::Vector(Rc::new(hist))
            }
            ExprKind::Cumsum(v) | ExprKind::ReverseCumsum(v) => {
                let Val::Vector(values) = self.eval(*v, point)? else {
                    return Err(internal(h));
                };
                let mut out = values.as_ref().clone();
                let reverse = matches!(e.kind, ExprKind::ReverseCumsum(_));
                let mut acc = 0.0;
                let order: Vec<usize> = if reverse {
                    (0..out.len()).rev().collect()
                } else {
                    (0..out.len()).collect()
                };
                for i in order {
                    acc = self.r(acc + out[i]);
                    out[i] = acc;
                }
                Val::Vector(Rc::new(out))
            }
            ExprKind::HistSlope {
                adjoint,
                value,
                bins,
                lo,
                hi,
            } => {
                let Val::Vector(adj) = self.eval(*adjoint, point)? else {
                    return Err(internal(h));
                };
                let s = self.num(*value, point)?;
                let step = (hi.0 - lo.0) / (f64::from(*bins) - 1.0);
                if s < lo.0 || s > hi.0 {
                    Val::Num(0.0)
                } else {
                    let (b, _, _) = hist_weights(s, *bins, lo.0, hi.0);
                    Val::Num(self.r(self.r(adj[b + 1] - adj[b]) / self.r(step)))
                }
            }
        })
    }

    /// Records `h` as the origin of a non-finite value when its operands were finite.
    fn note(
        &mut self,
        h: Handle<Expr>,
        point: Point,
        operands: &[&Val],
        result: &Val,
        empty_set: bool,
    ) {
        if self.origin.is_some() {
            return;
        }
        let finite = |v: &Val| match v {
            Val::Num(x) => x.is_finite(),
            Val::Vector(xs) => xs.iter().all(|x| x.is_finite()),
            Val::Member(_) => true,
        };
        if !finite(result) && operands.iter().all(|v| finite(v)) {
            let value = match result {
                Val::Num(x) => *x,
                Val::Vector(xs) => xs
                    .iter()
                    .copied()
                    .find(|x| !x.is_finite())
                    .unwrap_or(f64::NAN),
                Val::Member(_) => f64::NAN,
            };
            self.origin = Some(Origin {
                expr: h,
                anchor: point.anchor(),
                value,
                empty_set,
            });
        }
    }

    fn map(&self, a: Val, f: impl Fn(f64) -> f64) -> Val {
        match a {
            Val::Num(x) => Val::Num(self.r(f(x))),
            Val::Vector(v) => Val::Vector(Rc::new(v.iter().map(|&x| self.r(f(x))).collect())),
            member => member,
        }
    }

    fn zip(&self, a: Val, b: Val, f: impl Fn(f64, f64) -> f64) -> Val {
        match (a, b) {
            (Val::Vector(x), Val::Vector(y)) => Val::Vector(Rc::new(
                x.iter()
                    .zip(y.iter())
                    .map(|(&p, &q)| self.r(f(p, q)))
                    .collect(),
            )),
            (Val::Vector(x), y) => {
                Val::Vector(Rc::new(x.iter().map(|&p| self.r(f(p, y.num()))).collect()))
            }
            (x, Val::Vector(y)) => {
                Val::Vector(Rc::new(y.iter().map(|&q| self.r(f(x.num(), q))).collect()))
            }
            (x, y) => Val::Num(self.r(f(x.num(), y.num()))),
        }
    }

    fn structural(&self, kind: &ExprKind, row: usize, col: usize, space: Space) -> f64 {
        let (Some(rows), Some(cols)) = (space.rows, space.cols) else {
            return f64::NAN;
        };
        let value = match kind {
            ExprKind::Same => self.label(rows, row) == self.label(cols, col),
            ExprKind::IsSelf => match (rows, cols) {
                (Domain::Samples, Domain::Groups(g)) => {
                    self.groups[g.index()].of_sample[row] == col
                }
                (Domain::Groups(g), Domain::Samples) => {
                    self.groups[g.index()].of_sample[col] == row
                }
                _ => row == col,
            },
            ExprKind::Index(axis) => {
                return if *axis == Axis::Row {
                    row as f64
                } else {
                    col as f64
                };
            }
            ExprKind::GroupSize { groups, axis } => {
                let at = if *axis == Axis::Row { row } else { col };
                return self.groups[groups.index()].sizes[at] as f64;
            }
            _ => return f64::NAN,
        };
        f64::from(u8::from(value))
    }

    fn rank_index(&self, k: f64, count: usize, h: Handle<Expr>, point: Point) -> Result<usize> {
        if k < 0.0 || k != k.trunc() || k >= count as f64 {
            return Err(RunError::RankOutOfRange {
                k,
                count,
                expr: h,
                anchor: point.anchor(),
            });
        }
        Ok(k as usize)
    }

    fn reduce(
        &mut self,
        h: Handle<Expr>,
        op: ReduceOp,
        set: Handle<Set>,
        body: Handle<Expr>,
        scope: Scope,
        point: Point,
    ) -> Result<f64> {
        let (members, at) = self.members_at(set, scope, point)?;
        let count = members.len();
        if count == 0 && op.needs_members() {
            return Err(RunError::EmptyReduction {
                op: op.name(),
                expr: h,
                anchor: point.anchor(),
            });
        }
        let mut values = Vec::with_capacity(count);
        if op != ReduceOp::Count {
            for m in members.points(at) {
                values.push(self.num(body, m)?);
            }
        }
        let result = self.fold(op, &values, count);
        let inputs: Vec<Val> = values.iter().map(|&v| Val::Num(v)).collect();
        let inputs: Vec<&Val> = inputs.iter().collect();
        self.note(h, point, &inputs, &Val::Num(result), count == 0);
        Ok(result)
    }

    fn fold(&self, op: ReduceOp, values: &[f64], count: usize) -> f64 {
        op.fold(values, count, |v| self.r(v))
    }

    /// The members of a set as seen from `point`, and the point its members hang off.
    fn members_at(
        &mut self,
        set: Handle<Set>,
        scope: Scope,
        point: Point,
    ) -> Result<(Rc<Members>, Point)> {
        let at = match scope {
            Scope::Batch => Point::Batch,
            Scope::Row(block) => {
                let anchor = point.row_of(block).ok_or_else(|| internal_set(set))?;
                Point::Row { block, anchor }
            }
        };
        Ok((self.members(set, at)?, at))
    }

    /// The last member an `Extreme { base: set, count, largest }` keeps at batch level, in
    /// its order: by value, ties to the lower (row, column).
    fn cut(
        &mut self,
        h: Handle<Expr>,
        set: Handle<Set>,
        count: Handle<Expr>,
        largest: bool,
        part: CutPart,
    ) -> Result<f64> {
        let members = self.members(set, Point::Batch)?;
        let k = self.count(count, Point::Batch, set)?;
        let value = self.module.sets[set].value;
        let mut ranked = Vec::with_capacity(members.len());
        for m in members.points(Point::Batch) {
            let Point::Member { row, col, .. } = m else {
                return Err(internal(h));
            };
            ranked.push((self.num(value, m)?, (row, col)));
        }
        let kept = k.min(ranked.len());
        if kept == 0 {
            let none = if largest {
                f64::INFINITY
            } else {
                f64::NEG_INFINITY
            };
            return Ok(match part {
                CutPart::Value => none,
                CutPart::Row | CutPart::Col => -1.0,
            });
        }
        // -0 and 0 are one value to the filter the cut serves (as NaN is none), where
        // `Extreme`'s order puts -0 first.
        let zero_as_one = |v: f64| if v == 0.0 { 0.0 } else { v };
        let (_, (v, (row, col)), _) = ranked.select_nth_unstable_by(kept - 1, |a, b| {
            let (a_value, b_value) = (zero_as_one(a.0), zero_as_one(b.0));
            let by_value = if largest {
                b_value.total_cmp(&a_value)
            } else {
                a_value.total_cmp(&b_value)
            };
            by_value.then(a.1.cmp(&b.1))
        });
        Ok(match part {
            CutPart::Value => *v,
            CutPart::Row => *row as f64,
            CutPart::Col => *col as f64,
        })
    }

    /// Members paired with their values, sorted ascending (ties: lower index first).
    fn sorted(
        &mut self,
        members: &Members,
        set: Handle<Set>,
        at: Point,
    ) -> Result<Vec<(f64, Point)>> {
        let value = self.module.sets[set].value;
        let mut pairs = Vec::with_capacity(members.len());
        for m in members.points(at) {
            pairs.push((self.num(value, m)?, m));
        }
        // `points` lists members in index order; a stable sort keeps ties in that order.
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(pairs)
    }

    /// Whether an anchor is skipped: its skip conditions, in order.
    fn skipped(&mut self, block: Handle<Block>, anchor: usize) -> Result<bool> {
        if let Some(s) = self.rows.get(&(block, anchor)).and_then(|r| r.skipped) {
            return Ok(s);
        }
        let mut skipped = false;
        for &cond in &self.module.blocks[block].skips {
            if self.num(cond, Point::Row { block, anchor })? != 0.0 {
                skipped = true;
                break;
            }
        }
        self.rows.entry((block, anchor)).or_default().skipped = Some(skipped);
        Ok(skipped)
    }

    // ---- the gradient --------------------------------------------------------------------

    fn scatter(&mut self, scatter: &crate::grad::Scatter, adjoint: &mut Array2<f64>) -> Result<()> {
        let module = self.module;
        let block = scatter.block(module);
        let anchors: Vec<Point> = match block {
            Some(b) => {
                let mut anchors = Vec::new();
                for anchor in 0..self.domain_len(module.blocks[b].rows) {
                    if !self.skipped(b, anchor)? {
                        anchors.push(Point::Row { block: b, anchor });
                    }
                }
                anchors
            }
            None => vec![Point::Batch],
        };
        for at in anchors {
            let points: Vec<Point> = match scatter.target {
                ScatterTarget::Members { set, .. } | ScatterTarget::Cross { set, .. } => {
                    self.members(set, at)?.points(at).collect()
                }
                ScatterTarget::At { index } => match self.eval(index, at)? {
                    Val::Member(Some(member)) => vec![member],
                    _ => Vec::new(),
                },
            };
            // Read only where the scatter adds something, as the weight it came out of.
            let row_scale = match (scatter.row_scale, points.is_empty()) {
                (Some(h), false) => Some(self.num(h, at)?),
                _ => None,
            };
            for point in points {
                let mut weight = self.num(scatter.weight, point)?;
                if let Some(factor) = row_scale {
                    weight = self.precision.round(weight * factor);
                }
                let (row, col) = match (scatter.target, point) {
                    (
                        ScatterTarget::Cross { side, .. },
                        Point::Cross {
                            anchor,
                            left,
                            right,
                            ..
                        },
                    ) => (anchor, if side == Side::Left { left } else { right }),
                    (_, Point::Member { row, col, .. }) => (row, col),
                    _ => return Err(internal(scatter.weight)),
                };
                let cell = &mut adjoint[(row, col)];
                *cell = self.precision.round(*cell + weight);
            }
        }
        Ok(())
    }

    fn tensor_backward(
        &self,
        steps: &[TensorStep],
        matrix_adjoints: &[Array2<f64>],
    ) -> Array2<f64> {
        tensors::backward(
            self.module,
            steps,
            &self.tensors,
            &self.matrices,
            &self.groups,
            matrix_adjoints,
            self.seed,
            self.precision,
        )
    }
}

/// The node and interpolation weights of a histogram value: it adds `low` to node `b`
/// and `high` to node `b + 1`. Values outside [lo, hi] count at the nearest end.
pub(crate) fn hist_weights(value: f64, bins: u32, lo: f64, hi: f64) -> (usize, f64, f64) {
    let step = (hi - lo) / (f64::from(bins) - 1.0);
    let s = value.clamp(lo, hi);
    let b = (((s - lo) / step).floor().max(0.0) as usize).min(bins as usize - 2);
    let below = lo + b as f64 * step;
    let above = lo + (b + 1) as f64 * step;
    (b, (above - s) / step, (s - below) / step)
}

fn internal(h: Handle<Expr>) -> RunError {
    RunError::Internal {
        what: format!("{h} evaluated where its level does not allow"),
    }
}

fn internal_set(h: Handle<Set>) -> RunError {
    RunError::Internal {
        what: format!("{h} enumerated where its level does not allow"),
    }
}
