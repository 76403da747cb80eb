//! Reverse-mode symbolic differentiation: a module in, its gradient as IR out.
//!
//! The adjoint of every batch and per-anchor value is an expression appended to the same
//! arenas, built from the forward values. Per-member values are differentiated locally,
//! inside each reduction that consumes them: a reduction gives each member a weight (its
//! adjoint), the chain rule carries that weight down the member's expression, and where
//! it reaches a matrix entry the result is a [`Scatter`]: `dL/dM[i, j] += weight` for
//! every member. Where it reaches a per-anchor or batch value it becomes a reduction of
//! the weights, added to that value's adjoint. From the matrices' adjoints the
//! [`TensorStep`]s carry the gradient back through the metrics, centres, branches and
//! renormalisation to `x`.
//!
//! The rules (DESIGN.md section 2): sets are not differentiated, only their members'
//! values; min, max and rank give their whole gradient to one member, the lowest index
//! among ties; `stop` gives zero; a clamp gives zero where it holds; the log-sum-exp of an
//! empty set contributes nothing.

mod print;
mod rules;
pub(crate) mod tensors;

pub use print::print_gradient;
pub use tensors::TensorStep;

use crate::ir::build::Conflict;
use crate::ir::rewrite::{Keep, Rewrite};
use crate::ir::*;
use std::collections::HashMap;

/// Where the members a scatter writes to come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScatterTarget {
    /// Every member of the set: per anchor (row scope) or over the whole matrix (batch).
    Members { set: Handle<Set>, scope: Scope },
    /// The one member an `ArgReduce` chose.
    At { index: Handle<Expr> },
    /// Every pair of a cross set, at its left (`p`) or right (`q`) member.
    Cross { set: Handle<Set>, side: Side },
}

/// `dL/dM[member] += weight` for every member of the target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scatter {
    pub matrix: Handle<Matrix>,
    /// The adjoint buffer it adds into ([`Gradient::slots`]); the matrix's own, numbered as
    /// the matrix, unless a plan gave it another.
    pub slot: usize,
    pub target: ScatterTarget,
    pub weight: Handle<Expr>,
    /// A per-anchor factor of the weight that a plan took out (`None`: one): the scatter adds
    /// `weight * row_scale`. Every scatter into its slot has the same, over sets of one
    /// block, so that a kernel may add the weights and scale the anchor's row once after
    /// them, without the reduction the factor reads before its loop.
    pub row_scale: Option<Handle<Expr>>,
}

/// An adjoint buffer: the matrix it belongs to and the batch-level factor it is taken
/// with (`None`: one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdjointSlot {
    pub matrix: Handle<Matrix>,
    pub scale: Option<Handle<Expr>>,
}

impl Scatter {
    /// The block whose anchors the scatter runs over, if it runs per anchor.
    pub fn block(&self, module: &Module) -> Option<Handle<Block>> {
        match self.target {
            ScatterTarget::Members {
                scope: Scope::Row(b),
                ..
            } => Some(b),
            ScatterTarget::Members {
                scope: Scope::Batch,
                ..
            } => None,
            ScatterTarget::At { index } => module.exprs[index].level.block(),
            ScatterTarget::Cross { set, .. } => module.sets[set].block,
        }
    }
}

/// A module together with its gradient.
#[derive(Debug, Clone)]
pub struct Gradient {
    /// The forward module with the adjoint expressions appended.
    pub module: Module,
    pub scatters: Vec<Scatter>,
    /// The adjoint buffers the scatters add into: first one per matrix (slot `i` for
    /// matrix `i`), then any more a plan adds. A matrix's adjoint is the sum of its slots,
    /// each times its scale, taken once the scatters are done. Differentiation leaves one
    /// slot per matrix and no scales; the compiled backend's plan takes batch-level
    /// factors out of the scatter weights into them.
    pub slots: Vec<AdjointSlot>,
    /// From the matrices' adjoints back to `x`, in order.
    pub tensor_steps: Vec<TensorStep>,
    /// Forward values, adjoints and scatters, in phases.
    pub schedule: Schedule,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GradError {
    #[error("cannot differentiate {what}")]
    Unsupported { what: String, expr: Handle<Expr> },
    #[error("internal error while differentiating: {0:?}")]
    Conflict(String),
}

impl From<Conflict> for GradError {
    fn from(c: Conflict) -> Self {
        GradError::Conflict(format!("{c:?}"))
    }
}

/// Differentiates the loss of `module` with respect to `x`.
pub fn differentiate(module: &Module) -> Result<Gradient, GradError> {
    let forward_len = module.exprs.len();
    let active = rules::active(module);
    let mut pass = Pass {
        b: Builder::new(module.clone()),
        contributions: HashMap::new(),
        scatters: Vec::new(),
        active,
    };
    let one = pass.b.constant_expr(1.0);
    let loss = module.loss_expr();
    pass.contribute(loss, one)?;
    for index in (0..forward_len).rev() {
        let h: Handle<Expr> = Handle::from_index(index);
        if !pass.active[index] {
            continue;
        }
        let Some(adjoint) = pass.adjoint(h)? else {
            continue;
        };
        pass.backward(h, adjoint)?;
    }
    let (module, scatters) = prune(&pass.b.finish(), &pass.scatters);
    let tensor_steps = tensors::steps(&module);
    let roots: Vec<Handle<Expr>> = std::iter::once(module.loss_expr())
        .chain(module.stats.iter().map(|s| s.1))
        .collect();
    let effects: Vec<Effect> = scatters.iter().map(|s| effect(&module, s)).collect();
    let schedule = schedule(&module, &roots, &effects);
    Ok(Gradient {
        slots: module
            .matrices
            .handles()
            .map(|matrix| AdjointSlot {
                matrix,
                scale: None,
            })
            .collect(),
        module,
        scatters,
        tensor_steps,
        schedule,
    })
}

/// The module without the nodes neither the outputs nor the scatters need.
fn prune(module: &Module, scatters: &[Scatter]) -> (Module, Vec<Scatter>) {
    let mut rewrite = Rewrite::new(module);
    let keep = &mut Keep;
    let scatters = scatters
        .iter()
        .map(|s| Scatter {
            matrix: s.matrix,
            slot: s.slot,
            target: match s.target {
                ScatterTarget::Members { set, scope } => ScatterTarget::Members {
                    set: rewrite.set(set, keep),
                    scope,
                },
                ScatterTarget::At { index } => ScatterTarget::At {
                    index: rewrite.expr(index, keep),
                },
                ScatterTarget::Cross { set, side } => ScatterTarget::Cross {
                    set: rewrite.set(set, keep),
                    side,
                },
            },
            weight: rewrite.expr(s.weight, keep),
            row_scale: s.row_scale.map(|h| rewrite.expr(h, keep)),
        })
        .collect();
    (rewrite.finish(keep), scatters)
}

/// What a scatter reads, for the scheduler.
pub fn effect(module: &Module, scatter: &Scatter) -> Effect {
    let mut deps: Vec<Handle<Expr>> = [Some(scatter.weight), scatter.row_scale]
        .into_iter()
        .flatten()
        .collect();
    let mut sets = Vec::new();
    match scatter.target {
        ScatterTarget::Members { set, .. } | ScatterTarget::Cross { set, .. } => sets.push(set),
        ScatterTarget::At { index } => deps.push(index),
    }
    Effect {
        block: scatter.block(module),
        deps,
        sets,
    }
}

/// Whether gradient should flow into `h`: every expression made by this pass may carry
/// it, of the forward ones only the active.
fn wants(active: &[bool], h: Handle<Expr>) -> bool {
    active.get(h.index()).copied().unwrap_or(true)
}

struct Pass {
    b: Builder,
    /// The adjoint contributions collected for each forward expression.
    contributions: HashMap<Handle<Expr>, Vec<Handle<Expr>>>,
    scatters: Vec<Scatter>,
    /// Forward expressions the loss depends on through some matrix entry.
    active: Vec<bool>,
}

impl Pass {
    fn level(&self, h: Handle<Expr>) -> Level {
        self.b.expr(h).level
    }

    /// The sum of an expression's contributions, if it has any.
    fn adjoint(&mut self, h: Handle<Expr>) -> Result<Option<Handle<Expr>>, GradError> {
        let Some(parts) = self.contributions.remove(&h) else {
            return Ok(None);
        };
        let mut sum = parts[0];
        for &part in &parts[1..] {
            sum = self.b.binary(BinaryOp::Add, sum, part)?;
        }
        Ok(Some(sum))
    }

    /// Adds `c` to the adjoint of `target`; a per-anchor contribution to a batch value is
    /// summed over the block's (unskipped) anchors first.
    fn contribute(&mut self, target: Handle<Expr>, c: Handle<Expr>) -> Result<(), GradError> {
        if !self.active.get(target.index()).copied().unwrap_or(false) {
            return Ok(());
        }
        if self.b.constant(c) == Some(0.0) {
            return Ok(());
        }
        let c = match (self.level(c), self.level(target)) {
            (Level::Row(block), Level::Batch | Level::Const) => {
                let set = self
                    .b
                    .add_set(SetKind::Anchors, c, SetShape::Anchors(block), None);
                self.b.reduce(ReduceOp::Sum, set, c, Scope::Batch)
            }
            _ => c,
        };
        // A vector's adjoint reaching a number it was broadcast from is summed.
        let c = match (self.b.expr(c).ty, self.b.expr(target).ty) {
            (Type::Vector(n), Type::Num) => {
                let set = self
                    .b
                    .add_set(SetKind::VectorEntries, c, SetShape::Vector(n), None);
                self.b.reduce(ReduceOp::Sum, set, c, Scope::Batch)
            }
            _ => c,
        };
        self.contributions.entry(target).or_default().push(c);
        Ok(())
    }

    fn mul(&mut self, a: Handle<Expr>, b: Handle<Expr>) -> Result<Handle<Expr>, GradError> {
        if self.b.constant(a) == Some(0.0) || self.b.constant(b) == Some(0.0) {
            return Ok(self.b.constant_expr(0.0));
        }
        Ok(self.b.binary(BinaryOp::Mul, a, b)?)
    }

    /// Propagates the adjoint of one batch or per-anchor expression to its operands.
    fn backward(&mut self, h: Handle<Expr>, adjoint: Handle<Expr>) -> Result<(), GradError> {
        let e = self.b.expr(h).clone();
        match e.kind {
            ExprKind::Reduce {
                op,
                set,
                body,
                scope,
            } => self.reduce(h, op, set, body, scope, adjoint),
            ExprKind::Rank { set, k, scope } => {
                let value = self.b.set(set).value;
                let index = self.b.arg_reduce(ArgOp::Rank(k), set, value, scope);
                self.at_member(value, adjoint, index)
            }
            ExprKind::Hist {
                set,
                bins,
                lo,
                hi,
                scope,
            } => {
                let value = self.b.set(set).value;
                let slope = self.b.hist_slope(adjoint, value, bins, lo.0, hi.0);
                self.over_members(value, slope, set, scope)
            }
            ExprKind::Cumsum(v) => {
                let reversed = self.b.cumsum(adjoint, true)?;
                self.contribute(v, reversed)
            }
            _ => {
                for (operand, partial) in
                    rules::partials(&mut self.b, h, adjoint, &|x| wants(&self.active, x))?
                {
                    self.contribute(operand, partial)?;
                }
                Ok(())
            }
        }
    }

    fn reduce(
        &mut self,
        h: Handle<Expr>,
        op: ReduceOp,
        set: Handle<Set>,
        body: Handle<Expr>,
        scope: Scope,
        adjoint: Handle<Expr>,
    ) -> Result<(), GradError> {
        let shape = self.b.set(set).shape;
        let one = self.b.constant_expr(1.0);
        let weight = match op {
            ReduceOp::Count => return Ok(()),
            ReduceOp::Sum => adjoint,
            ReduceOp::Mean => {
                let count = self.b.reduce(ReduceOp::Count, set, one, scope);
                self.b.binary(BinaryOp::Div, adjoint, count)?
            }
            ReduceOp::Lse => {
                let shifted = self.b.binary(BinaryOp::Sub, body, h)?;
                let softmax = self.b.unary(UnaryOp::Exp, shifted)?;
                self.mul(adjoint, softmax)?
            }
            ReduceOp::Std => {
                // d std / d b_j = (b_j - mean) / (count * std), zero when std is zero.
                let mean = self.b.reduce(ReduceOp::Mean, set, body, scope);
                let count = self.b.reduce(ReduceOp::Count, set, one, scope);
                let centred = self.b.binary(BinaryOp::Sub, body, mean)?;
                let spread = self.b.binary(BinaryOp::Mul, count, h)?;
                let zero = self.b.constant_expr(0.0);
                let positive = self.b.binary(BinaryOp::Gt, h, zero)?;
                let safe = self.b.select(positive, spread, one)?;
                let ratio = self.b.binary(BinaryOp::Div, centred, safe)?;
                let ratio = self.b.select(positive, ratio, zero)?;
                self.mul(adjoint, ratio)?
            }
            ReduceOp::Min | ReduceOp::Max => {
                let arg = if op == ReduceOp::Min {
                    ArgOp::Min
                } else {
                    ArgOp::Max
                };
                if let SetShape::Anchors(_) = shape {
                    return Err(GradError::Unsupported {
                        what: format!("`{}` over anchors", op.name()),
                        expr: h,
                    });
                }
                let index = self.b.arg_reduce(arg, set, body, scope);
                return self.at_member(body, adjoint, index);
            }
        };
        match shape {
            SetShape::Anchors(_) => self.contribute(body, weight),
            SetShape::Vector(_) => self.contribute(body, weight),
            SetShape::Members(_) => self.over_members(body, weight, set, scope),
            SetShape::Cross(_) => self.over_cross(body, weight, set),
        }
    }

    /// The gradient of a per-member `body` whose member `j` has adjoint `weight(j)`, over
    /// every member of `set`.
    fn over_members(
        &mut self,
        body: Handle<Expr>,
        weight: Handle<Expr>,
        set: Handle<Set>,
        scope: Scope,
    ) -> Result<(), GradError> {
        for (leaf, partial) in
            rules::local_gradient(&mut self.b, body, weight, &|x| wants(&self.active, x))?
        {
            match self.b.expr(leaf).kind {
                ExprKind::Entry(matrix) => self.scatters.push(Scatter {
                    matrix,
                    slot: matrix.index(),
                    target: ScatterTarget::Members { set, scope },
                    weight: partial,
                    row_scale: None,
                }),
                _ => {
                    let sum = self.b.reduce(ReduceOp::Sum, set, partial, scope);
                    self.contribute(leaf, sum)?;
                }
            }
        }
        Ok(())
    }

    /// The gradient of a per-member `body` at the one member `index` chose.
    fn at_member(
        &mut self,
        body: Handle<Expr>,
        adjoint: Handle<Expr>,
        index: Handle<Expr>,
    ) -> Result<(), GradError> {
        for (leaf, partial) in
            rules::local_gradient(&mut self.b, body, adjoint, &|x| wants(&self.active, x))?
        {
            match self.b.expr(leaf).kind {
                ExprKind::Entry(matrix) => self.scatters.push(Scatter {
                    matrix,
                    slot: matrix.index(),
                    target: ScatterTarget::At { index },
                    weight: partial,
                    row_scale: None,
                }),
                _ => {
                    let value = self.b.at(partial, index);
                    self.contribute(leaf, value)?;
                }
            }
        }
        Ok(())
    }

    /// The gradient of a per-pair `body` of a cross set, each pair with adjoint `weight`.
    fn over_cross(
        &mut self,
        body: Handle<Expr>,
        weight: Handle<Expr>,
        set: Handle<Set>,
    ) -> Result<(), GradError> {
        let Some(block) = self.b.set(set).block else {
            return Err(GradError::Conflict("a cross set outside a block".into()));
        };
        let scope = Scope::Row(block);
        for (leaf, partial) in
            rules::local_gradient(&mut self.b, body, weight, &|x| wants(&self.active, x))?
        {
            match self.b.expr(leaf).kind {
                ExprKind::CrossSide { side, value } => {
                    let one = self.b.constant_expr(1.0);
                    for (inner, inner_partial) in
                        rules::local_gradient(&mut self.b, value, one, &|x| wants(&self.active, x))?
                    {
                        let at_side = self.b.cross_side(side, inner_partial, block)?;
                        let combined = self.mul(partial, at_side)?;
                        match self.b.expr(inner).kind {
                            ExprKind::Entry(matrix) => self.scatters.push(Scatter {
                                matrix,
                                slot: matrix.index(),
                                target: ScatterTarget::Cross { set, side },
                                weight: combined,
                                row_scale: None,
                            }),
                            _ => {
                                let sum = self.b.reduce(ReduceOp::Sum, set, combined, scope);
                                self.contribute(inner, sum)?;
                            }
                        }
                    }
                }
                _ => {
                    let sum = self.b.reduce(ReduceOp::Sum, set, partial, scope);
                    self.contribute(leaf, sum)?;
                }
            }
        }
        Ok(())
    }
}
