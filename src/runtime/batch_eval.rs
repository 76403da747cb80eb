//! The batch phases of a compiled run: the few batch-level values between row passes,
//! computed from the passes' per-anchor outputs with the interpreter's arithmetic (every
//! operation rounded to the run's float type).

use super::error::RunError;
use crate::interp::Precision;
use crate::ir::*;
use std::collections::HashMap;

/// The per-anchor values the row passes stored, as f64, and which anchors were skipped.
#[derive(Debug, Default)]
pub struct RowStore {
    /// (block, expression) -> its values, `width` per anchor.
    pub outputs: HashMap<(Handle<Block>, Handle<Expr>), Stored>,
    /// Per block: 1 for each skipped anchor.
    pub skipped: HashMap<Handle<Block>, Vec<u8>>,
}

/// The per-anchor values of one expression, `width` per anchor.
#[derive(Debug, Clone)]
pub struct Stored {
    pub values: Vec<f64>,
    pub width: usize,
}

/// Batch values by expression index; vectors apart.
pub struct BatchValues {
    pub numbers: Vec<f64>,
    pub vectors: Vec<Option<Vec<f64>>>,
}

impl BatchValues {
    pub fn new(module: &Module) -> BatchValues {
        BatchValues {
            numbers: vec![f64::NAN; module.exprs.len()],
            vectors: vec![None; module.exprs.len()],
        }
    }
}

enum Value {
    Num(f64),
    Vector(Vec<f64>),
}

/// Computes the batch expression `h` (its operands are already computed) into `values`.
pub fn evaluate(
    module: &Module,
    h: Handle<Expr>,
    values: &mut BatchValues,
    rows: &RowStore,
    n: usize,
    precision: Precision,
) -> Result<(), RunError> {
    let evaluator = Evaluator {
        module,
        values,
        rows,
        n,
        precision,
    };
    match evaluator.compute(h)? {
        Value::Num(v) => values.numbers[h.index()] = v,
        Value::Vector(v) => values.vectors[h.index()] = Some(v),
    }
    Ok(())
}

struct Evaluator<'a> {
    module: &'a Module,
    values: &'a BatchValues,
    rows: &'a RowStore,
    n: usize,
    precision: Precision,
}

fn internal(what: String) -> RunError {
    RunError::Internal { what }
}

impl Evaluator<'_> {
    fn r(&self, v: f64) -> f64 {
        match self.precision {
            Precision::F32 => v as f32 as f64,
            Precision::F64 => v,
        }
    }

    fn get(&self, h: Handle<Expr>) -> Value {
        match self.module.exprs[h].kind {
            ExprKind::Const(Real(v)) => return Value::Num(self.r(v)),
            ExprKind::Bool(b) => return Value::Num(f64::from(u8::from(b))),
            _ => {}
        }
        match &self.values.vectors[h.index()] {
            Some(v) => Value::Vector(v.clone()),
            None => Value::Num(self.values.numbers[h.index()]),
        }
    }

    fn num(&self, h: Handle<Expr>) -> f64 {
        match self.get(h) {
            Value::Num(v) => v,
            Value::Vector(_) => f64::NAN,
        }
    }

    fn compute(&self, h: Handle<Expr>) -> Result<Value, RunError> {
        let e = &self.module.exprs[h];
        Ok(match &e.kind {
            ExprKind::Const(Real(v)) => Value::Num(self.r(*v)),
            ExprKind::Bool(b) => Value::Num(f64::from(u8::from(*b))),
            ExprKind::BatchSize => Value::Num(self.n as f64),
            ExprKind::Unary { op, arg } => self.map(self.get(*arg), |x| op.apply(x)),
            ExprKind::Binary { op, lhs, rhs } => {
                let (a, b) = (self.get(*lhs), self.get(*rhs));
                self.zip(a, b, |x, y| op.apply(x, y))
            }
            ExprKind::Select {
                cond,
                then,
                otherwise,
            } => self.get(if self.num(*cond) != 0.0 {
                *then
            } else {
                *otherwise
            }),
            ExprKind::Stop(arg) => self.get(*arg),
            ExprKind::Cumsum(v) | ExprKind::ReverseCumsum(v) => {
                let Value::Vector(mut values) = self.get(*v) else {
                    return Err(internal(format!("{h}: not a vector")));
                };
                let reverse = matches!(e.kind, ExprKind::ReverseCumsum(_));
                let mut acc = 0.0;
                let order: Vec<usize> = if reverse {
                    (0..values.len()).rev().collect()
                } else {
                    (0..values.len()).collect()
                };
                for i in order {
                    acc = self.r(acc + values[i]);
                    values[i] = acc;
                }
                Value::Vector(values)
            }
            ExprKind::Reduce {
                op,
                set,
                body,
                scope: Scope::Batch,
            } => self.reduce(h, *op, *set, *body)?,
            _ => {
                return Err(internal(format!(
                    "{h} is not a batch value the compiled backend computes"
                )));
            }
        })
    }

    fn map(&self, a: Value, f: impl Fn(f64) -> f64) -> Value {
        match a {
            Value::Num(x) => Value::Num(self.r(f(x))),
            Value::Vector(v) => Value::Vector(v.iter().map(|&x| self.r(f(x))).collect()),
        }
    }

    fn zip(&self, a: Value, b: Value, f: impl Fn(f64, f64) -> f64) -> Value {
        match (a, b) {
            (Value::Vector(x), Value::Vector(y)) => {
                Value::Vector(x.iter().zip(&y).map(|(&p, &q)| self.r(f(p, q))).collect())
            }
            (Value::Vector(x), Value::Num(y)) => {
                Value::Vector(x.iter().map(|&p| self.r(f(p, y))).collect())
            }
            (Value::Num(x), Value::Vector(y)) => {
                Value::Vector(y.iter().map(|&q| self.r(f(x, q))).collect())
            }
            (Value::Num(x), Value::Num(y)) => Value::Num(self.r(f(x, y))),
        }
    }

    /// The anchors of an anchor set, in order.
    fn anchors(&self, set: Handle<Set>) -> Result<(Handle<Block>, Vec<usize>), RunError> {
        let s = &self.module.sets[set];
        let SetShape::Anchors(block) = s.shape else {
            return Err(internal(format!("{set}: not a set of anchors")));
        };
        let skipped = self
            .rows
            .skipped
            .get(&block)
            .ok_or_else(|| internal(format!("{block} has not run")))?;
        let anchors = match s.kind {
            SetKind::Anchors => (0..skipped.len()).filter(|&a| skipped[a] == 0).collect(),
            SetKind::Skipped => (0..skipped.len()).filter(|&a| skipped[a] != 0).collect(),
            SetKind::Filter { base, predicate } => {
                let (_, base) = self.anchors(base)?;
                let keep = self.row_values(block, predicate)?;
                base.into_iter().filter(|&a| keep[a] != 0.0).collect()
            }
            _ => {
                return Err(internal(format!(
                    "{set}: an anchor set of an unexpected kind"
                )));
            }
        };
        Ok((block, anchors))
    }

    /// The per-anchor values of `h` (a per-anchor output, or a constant for every anchor).
    fn row_values(&self, block: Handle<Block>, h: Handle<Expr>) -> Result<Vec<f64>, RunError> {
        let rows = self.rows.skipped.get(&block).map_or(0, Vec::len);
        match self.module.exprs[h].level {
            Level::Const | Level::Batch => Ok(vec![self.num(h); rows]),
            _ => self
                .rows
                .outputs
                .get(&(block, h))
                .map(|stored| stored.values.clone())
                .ok_or_else(|| internal(format!("{h} of {block} was not stored by its pass"))),
        }
    }

    fn reduce(
        &self,
        h: Handle<Expr>,
        op: ReduceOp,
        set: Handle<Set>,
        body: Handle<Expr>,
    ) -> Result<Value, RunError> {
        let values: Vec<f64> = match self.module.sets[set].shape {
            SetShape::Anchors(_) => {
                let (block, anchors) = self.anchors(set)?;
                if let Type::Vector(width) = self.module.exprs[h].ty {
                    let stored = &self
                        .rows
                        .outputs
                        .get(&(block, body))
                        .ok_or_else(|| internal(format!("{body} was not stored")))?;
                    let mut total = vec![0.0; width as usize];
                    for a in anchors {
                        for (k, acc) in total.iter_mut().enumerate() {
                            *acc = self.r(*acc + stored.values[a * width as usize + k]);
                        }
                    }
                    return Ok(Value::Vector(total));
                }
                let per_anchor = self.row_values(block, body)?;
                anchors.into_iter().map(|a| per_anchor[a]).collect()
            }
            SetShape::Vector(_) => match self.get(body) {
                Value::Vector(v) => v,
                Value::Num(x) => vec![x],
            },
            _ => {
                return Err(internal(format!(
                    "{h}: a batch reduction over pair members"
                )));
            }
        };
        let count = values.len();
        if count == 0 && op.needs_members() {
            return Err(RunError::EmptyReduction {
                op: op.name(),
                expr: h,
                anchor: None,
            });
        }
        Ok(Value::Num(op.fold(&values, count, |v| self.r(v))))
    }
}
