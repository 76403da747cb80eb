//! Planning for the compiled backend: moving batch-level work over pair sets into row
//! passes, and scheduling the result.
//!
//! The interpreter evaluates `sum(s where same and i < j)` at batch level by visiting every
//! entry of the matrix. A compiled kernel visits entries one anchor row at a time, so such
//! a reduction becomes a per-row partial in a row pass of its own (one per kind of row)
//! and a batch-level combination of the partials: a sum of sums, a minimum of minima, the
//! log-sum-exp of log-sum-exps, a mean as a sum over a count, a histogram as the sum of
//! per-row histograms. The same move turns batch-level scatters into per-row ones. The
//! smallest (or largest) entries of the whole batch among those chosen by labels become
//! the entries on the near side of their cut, the last one kept, which the runtime finds
//! between the passes (gaussian_metric's easiest fifth). What cannot be split by rows (the
//! smallest of entries chosen by value, a sample across the batch) stays at batch level,
//! and [`Plan::row_local`] is false.
//!
//! Three more rewrites serve the kernels: a batch-level factor shared by every scatter into
//! a matrix becomes the scale of an adjoint slot (`factor_into_slots`), a per-anchor factor
//! shared by every scatter into a slot that reads a reduction over their own set becomes
//! their row scale (`factor_out_rows`), and `f(x) < c` for an increasing `f` becomes
//! `x < f⁻¹(c)` (`compare_arguments`).

use crate::grad::{AdjointSlot, Gradient, Scatter, ScatterTarget, TensorStep};
use crate::ir::build::Builder;
use crate::ir::rewrite::{Hook, Rewrite};
use crate::ir::*;
use std::collections::HashMap;

/// What the compiled backend runs: the module, its scatters, the tensor-level backward and
/// the phases.
#[derive(Debug, Clone)]
pub struct Plan {
    pub module: Module,
    pub scatters: Vec<Scatter>,
    pub tensor_steps: Vec<TensorStep>,
    pub schedule: Schedule,
    /// The adjoint buffers the scatters add into, with the batch-level factors taken out
    /// of their weights (see `factor_into_slots`).
    pub slots: Vec<AdjointSlot>,
    /// Whether every pass over pair members runs per anchor row (no batch-level member sets).
    pub row_local: bool,
    /// The batch-level means split into row passes, with their member counts: a mean over
    /// no member that the result reads is an error, which the interpreter reports.
    pub means: Vec<(Handle<Expr>, Handle<Expr>)>,
}

impl Plan {
    /// The plan as a gradient, to print or to evaluate with the interpreter.
    pub fn to_gradient(&self) -> Gradient {
        Gradient {
            module: self.module.clone(),
            scatters: self.scatters.clone(),
            slots: self.slots.clone(),
            tensor_steps: self.tensor_steps.clone(),
            schedule: self.schedule.clone(),
        }
    }
}

/// The plan of the forward computation alone.
pub fn forward_plan(module: &Module) -> Plan {
    let mut decompose = Decompose::default();
    let module = Rewrite::new(module).finish(&mut decompose);
    let slots = own_slots(&module);
    finish(module, (Vec::new(), slots), Vec::new(), decompose)
}

/// The plan of the forward computation and its gradient.
pub fn gradient_plan(gradient: &Gradient) -> Plan {
    let mut decompose = Decompose::default();
    let mut rewrite = Rewrite::new(&gradient.module);
    let mut scatters: Vec<Scatter> = gradient
        .scatters
        .iter()
        .map(|s| {
            let target = match s.target {
                ScatterTarget::Members { set, scope } => {
                    let by_rows = match (scope, gradient.module.sets[set].shape) {
                        (Scope::Batch, SetShape::Members(space))
                            if splits_by_rows(&gradient.module, set) =>
                        {
                            decompose.batch_set(&mut rewrite, set).map(|new_set| {
                                let block = decompose.block_for(&mut rewrite, space);
                                (new_set, Scope::Row(block))
                            })
                        }
                        _ => None,
                    };
                    let (new_set, scope) =
                        by_rows.unwrap_or_else(|| (rewrite.set(set, &mut decompose), scope));
                    ScatterTarget::Members {
                        set: new_set,
                        scope,
                    }
                }
                ScatterTarget::At { index } => ScatterTarget::At {
                    index: rewrite.expr(index, &mut decompose),
                },
                ScatterTarget::Cross { set, side } => ScatterTarget::Cross {
                    set: rewrite.set(set, &mut decompose),
                    side,
                },
            };
            Scatter {
                matrix: s.matrix,
                slot: s.slot,
                target,
                weight: rewrite.expr(s.weight, &mut decompose),
                row_scale: None,
            }
        })
        .collect();
    let slots = factor_into_slots(&mut rewrite.builder, &mut scatters);
    factor_out_rows(&mut rewrite.builder, &mut scatters);
    let module = rewrite.finish(&mut decompose);
    let tensor_steps = gradient.tensor_steps.clone();
    finish(module, (scatters, slots), tensor_steps, decompose)
}

fn finish(
    module: Module,
    (scatters, slots): (Vec<Scatter>, Vec<AdjointSlot>),
    tensor_steps: Vec<TensorStep>,
    decompose: Decompose,
) -> Plan {
    let roots: Vec<Handle<Expr>> = std::iter::once(module.loss_expr())
        .chain(module.stats.iter().map(|s| s.1))
        .chain(slots.iter().filter_map(|s| s.scale))
        .collect();
    let effects: Vec<Effect> = scatters
        .iter()
        .map(|s| crate::grad::effect(&module, s))
        .collect();
    let schedule = schedule(&module, &roots, &effects);
    let row_local = !module
        .exprs
        .iter()
        .any(|(_, e)| batch_member_work(&module, e))
        && scatters.iter().all(|s| s.block(&module).is_some());
    Plan {
        module,
        scatters,
        tensor_steps,
        schedule,
        slots,
        row_local,
        means: decompose.means,
    }
}

/// One adjoint slot per matrix, unscaled.
fn own_slots(module: &Module) -> Vec<AdjointSlot> {
    (module.matrices.handles())
        .map(|matrix| AdjointSlot {
            matrix,
            scale: None,
        })
        .collect()
}

/// Takes the batch-level factor out of each scatter weight that has one, and sends the
/// scatter to an adjoint slot of its matrix scaled by that factor: the matrix's own slot
/// for the first factor (when every scatter into the matrix has one), a slot of its own
/// for each other. A loss normalised by a batch total (`sum(term) / sum(count)`, a mean
/// over the anchors not skipped) gives every weight such a factor, and it depends on every
/// row: left in, it holds the scatters back to a second row pass after the batch values,
/// which redoes the row's work (its selections, its member values). Taken out, the
/// weights are row-level, the scatters run in the forward's row pass, and the backward,
/// linear in the adjoint, applies the factor (a sum of terms with different totals, as
/// js_div_knn_softmax's, takes one slot per total).
fn factor_into_slots(b: &mut Builder, scatters: &mut [Scatter]) -> Vec<AdjointSlot> {
    // A factor known before the row passes holds nothing back: it stays in the weight.
    let waits_for_rows = |b: &Builder, f: Handle<Expr>| {
        dependencies(&b.module, [Node::Expr(f)])
            .into_iter()
            .any(|h| matches!(b.module.exprs[h].level, Level::Row(_)))
    };
    let mut slots = own_slots(&b.module);
    for matrix in b.module.matrices.handles().collect::<Vec<_>>() {
        let into: Vec<usize> = (0..scatters.len())
            .filter(|&i| scatters[i].matrix == matrix)
            .collect();
        let split: Vec<Option<(Handle<Expr>, Handle<Expr>)>> = into
            .iter()
            .map(|&i| batch_factor(b, scatters[i].weight).filter(|&(f, _)| waits_for_rows(b, f)))
            .collect();
        let own_is_free = split.iter().all(Option::is_some);
        let mut slot_of: Vec<(Handle<Expr>, usize)> = Vec::new();
        for (&i, part) in into.iter().zip(split) {
            let Some((factor, rest)) = part else {
                continue;
            };
            let slot = match slot_of.iter().find(|&&(f, _)| f == factor) {
                Some(&(_, slot)) => slot,
                None => {
                    let slot = if own_is_free && slot_of.is_empty() {
                        slots[matrix.index()].scale = Some(factor);
                        matrix.index()
                    } else {
                        slots.push(AdjointSlot {
                            matrix,
                            scale: Some(factor),
                        });
                        slots.len() - 1
                    };
                    slot_of.push((factor, slot));
                    slot
                }
            };
            scatters[i].weight = rest;
            scatters[i].slot = slot;
        }
    }
    slots
}

/// Takes out of the weights of the scatters into one adjoint slot the per-anchor factor
/// they share, as their `row_scale`, where that spares the kernel a loop: the factor reads
/// a reduction over the scatters' own set (triplet's `1 / count(valid)`), which the kernel
/// would otherwise finish in a loop of its own before the scatters' loop, and what is left
/// of the weights reads none. The scatters must all run over sets of one block.
fn factor_out_rows(b: &mut Builder, scatters: &mut [Scatter]) {
    let mut slots: Vec<usize> = scatters.iter().map(|s| s.slot).collect();
    slots.sort_unstable();
    slots.dedup();
    for slot in slots {
        let into: Vec<usize> = (0..scatters.len())
            .filter(|&i| scatters[i].slot == slot)
            .collect();
        let Some(block) = scatters[into[0]].block(&b.module) else {
            continue;
        };
        let sets: Option<Vec<Handle<Set>>> = into
            .iter()
            .map(|&i| match scatters[i].target {
                ScatterTarget::Members { set, .. } | ScatterTarget::Cross { set, .. } => {
                    (scatters[i].block(&b.module) == Some(block)).then_some(set)
                }
                ScatterTarget::At { .. } => None,
            })
            .collect();
        let Some(sets) = sets else {
            continue;
        };
        let per_anchor = |e: &Expr| matches!(e.level, Level::Row(x) if x == block);
        let split: Option<Vec<(Handle<Expr>, Handle<Expr>)>> = into
            .iter()
            .map(|&i| split_factor(b, scatters[i].weight, &per_anchor))
            .collect();
        let Some(split) = split else {
            continue;
        };
        let factor = split[0].0;
        let reads_own_sets = |b: &Builder, h: Handle<Expr>| {
            dependencies(&b.module, [Node::Expr(h)])
                .into_iter()
                .any(|x| {
                    matches!(b.module.exprs[x].kind,
                    ExprKind::Reduce { set, scope: Scope::Row(_), .. } if sets.contains(&set))
                })
        };
        if split.iter().any(|&(f, _)| f != factor)
            || !reads_own_sets(b, factor)
            || split.iter().any(|&(_, rest)| reads_own_sets(b, rest))
        {
            continue;
        }
        for (&i, &(_, rest)) in into.iter().zip(&split) {
            scatters[i].weight = rest;
            scatters[i].row_scale = Some(factor);
        }
    }
}

/// `h` as `factor * rest`, `factor` batch-level (see [`split_factor`]).
fn batch_factor(b: &mut Builder, h: Handle<Expr>) -> Option<(Handle<Expr>, Handle<Expr>)> {
    split_factor(b, h, &|e| e.level == Level::Batch)
}

/// `h` as `factor * rest`, `factor` made of the numbers `is_factor` accepts, through
/// products, quotients, negations, sums of terms with the same factor, row sums and means,
/// and choices against zero; None when `h` has no such factor.
fn split_factor(
    b: &mut Builder,
    h: Handle<Expr>,
    is_factor: &dyn Fn(&Expr) -> bool,
) -> Option<(Handle<Expr>, Handle<Expr>)> {
    let e = b.expr(h).clone();
    // A negation goes to the rest, so that `-f` and `f` share the factor `f`.
    if let ExprKind::Unary {
        op: UnaryOp::Neg,
        arg,
    } = e.kind
    {
        let (f, r) = split_factor(b, arg, is_factor)?;
        return Some((f, b.unary(UnaryOp::Neg, r).ok()?));
    }
    if is_factor(&e) && e.ty == Type::Num {
        return Some((h, b.constant_expr(1.0)));
    }
    let mul = |b: &mut Builder, x, y| b.binary(BinaryOp::Mul, x, y).ok();
    match e.kind {
        ExprKind::Binary {
            op: BinaryOp::Mul,
            lhs,
            rhs,
        } => match (
            split_factor(b, lhs, is_factor),
            split_factor(b, rhs, is_factor),
        ) {
            (None, None) => None,
            (Some((f, r)), None) => Some((f, mul(b, r, rhs)?)),
            (None, Some((f, r))) => Some((f, mul(b, lhs, r)?)),
            (Some((f, r)), Some((g, s))) => Some((mul(b, f, g)?, mul(b, r, s)?)),
        },
        // A sum (or mean) over a row's members of `f * r` is `f` times the sum of `r`.
        ExprKind::Reduce {
            op: op @ (ReduceOp::Sum | ReduceOp::Mean),
            set,
            body,
            scope: scope @ Scope::Row(_),
        } => {
            let (f, r) = split_factor(b, body, is_factor)?;
            Some((f, b.reduce(op, set, r, scope)))
        }
        // `f * r + f * s` is `f * (r + s)`: the terms must share the factor.
        ExprKind::Binary {
            op: op @ (BinaryOp::Add | BinaryOp::Sub),
            lhs,
            rhs,
        } => {
            let (f, r) = split_factor(b, lhs, is_factor)?;
            let (g, s) = split_factor(b, rhs, is_factor)?;
            (f == g).then_some(())?;
            Some((f, b.binary(op, r, s).ok()?))
        }
        ExprKind::Binary {
            op: BinaryOp::Div,
            lhs,
            rhs,
        } => {
            let numerator = split_factor(b, lhs, is_factor);
            if is_factor(b.expr(rhs)) {
                let (f, r) = numerator.unwrap_or((b.constant_expr(1.0), lhs));
                Some((b.binary(BinaryOp::Div, f, rhs).ok()?, r))
            } else {
                let (f, r) = numerator?;
                Some((f, b.binary(BinaryOp::Div, r, rhs).ok()?))
            }
        }
        // `if c then 0 else f * r` is `f * (if c then 0 else r)`, and the mirror image.
        ExprKind::Select {
            cond,
            then,
            otherwise,
        } => {
            let (zero, other, then_is_zero) = match (b.constant(then), b.constant(otherwise)) {
                (Some(0.0), _) => (then, otherwise, true),
                (_, Some(0.0)) => (otherwise, then, false),
                _ => return None,
            };
            let (f, r) = split_factor(b, other, is_factor)?;
            let (then, otherwise) = if then_is_zero { (zero, r) } else { (r, zero) };
            Some((f, b.select(cond, then, otherwise).ok()?))
        }
        _ => None,
    }
}

/// Whether an expression reduces pair members at batch level.
fn batch_member_work(module: &Module, e: &Expr) -> bool {
    let set = match e.kind {
        ExprKind::Reduce {
            set,
            scope: Scope::Batch,
            ..
        }
        | ExprKind::Rank {
            set,
            scope: Scope::Batch,
            ..
        }
        | ExprKind::ArgReduce {
            set,
            scope: Scope::Batch,
            ..
        }
        | ExprKind::Hist {
            set,
            scope: Scope::Batch,
            ..
        } => set,
        _ => return false,
    };
    matches!(module.sets[set].shape, SetShape::Members(_))
}

/// Whether the members of a batch-level set in one row depend on that row alone: entries
/// filtered by conditions, not ranks, samples or fallbacks across the batch, except the
/// smallest or largest entries chosen by labels, which a [`Decompose::batch_set`] filter
/// against their cut keeps.
fn splits_by_rows(module: &Module, set: Handle<Set>) -> bool {
    let s = &module.sets[set];
    matches!(s.shape, SetShape::Members(_))
        && match s.kind {
            SetKind::Entries => true,
            SetKind::Filter { base, .. } => splits_by_rows(module, base),
            SetKind::Extreme { base, .. } => module.labelled_entries(base).is_some(),
            _ => false,
        }
}

/// `f(x) < c` as `x < f⁻¹(c)` (and `<=`, `>`, `>=`, either side) for the increasing `exp`
/// and `softplus` and a positive constant `c`: a mining condition like triplet's
/// `softplus(p - q) > 0.7` then costs a comparison where a scatter loop, which needs the
/// condition but not the value, would evaluate the transcendental again. The two differ
/// only for `x` within rounding of the threshold.
fn compare_arguments(
    rewrite: &mut Rewrite<'_>,
    old: Handle<Expr>,
    hook: &mut dyn Hook,
) -> Option<Handle<Expr>> {
    let ExprKind::Binary { op, lhs, rhs } = rewrite.old.exprs[old].kind else {
        return None;
    };
    if !matches!(
        op,
        BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
    ) {
        return None;
    }
    let inverse = |h: Handle<Expr>| match rewrite.old.exprs[h].kind {
        ExprKind::Unary {
            op: UnaryOp::Exp,
            arg,
        } => Some((arg, UnaryOp::Exp)),
        ExprKind::Unary {
            op: UnaryOp::Softplus,
            arg,
        } => Some((arg, UnaryOp::Softplus)),
        _ => None,
    };
    let at = |f: UnaryOp, c: f64| match f {
        UnaryOp::Exp => c.ln(),
        _ => c.exp_m1().ln(),
    };
    let constant = |h: Handle<Expr>| match rewrite.old.exprs[h].kind {
        ExprKind::Const(Real(c)) if c > 0.0 && c.is_finite() => Some(c),
        _ => None,
    };
    let (arg, threshold, arg_on_left) =
        match (inverse(lhs), constant(rhs), inverse(rhs), constant(lhs)) {
            (Some((arg, f)), Some(c), _, _) => (arg, at(f, c), true),
            (_, _, Some((arg, f)), Some(c)) => (arg, at(f, c), false),
            _ => return None,
        };
    if !threshold.is_finite() {
        return None;
    }
    let arg = rewrite.expr(arg, hook);
    let threshold = rewrite.builder.constant_expr(threshold);
    let (lhs, rhs) = if arg_on_left {
        (arg, threshold)
    } else {
        (threshold, arg)
    };
    rewrite.builder.binary(op, lhs, rhs).ok()
}

/// The hook that splits batch-level reductions over pair members by rows (and moves
/// comparisons to the arguments of increasing functions, [`compare_arguments`]).
#[derive(Default)]
struct Decompose {
    /// The row pass created for each kind of row.
    blocks: HashMap<Domain, Handle<Block>>,
    /// See [`Plan::means`].
    means: Vec<(Handle<Expr>, Handle<Expr>)>,
}

impl Decompose {
    fn block_for(&mut self, rewrite: &mut Rewrite<'_>, space: Space) -> Handle<Block> {
        let rows = space.rows.unwrap_or(Domain::Samples);
        *self.blocks.entry(rows).or_insert_with(|| {
            rewrite.builder.module.blocks.append(Block {
                rows,
                skips: Vec::new(),
            })
        })
    }

    /// A batch-level set that [`splits_by_rows`] in the new module, with each `smallest`
    /// (or `largest`) of entries chosen by labels replaced by the filter that keeps the
    /// same members: `v < t or v == t and (i < r or i == r and j <= c)` for the cut
    /// (t, r, c), the last member kept (`v > t` for `largest`), which the runtime finds
    /// before the row pass. `None` if the filter's conditions do not combine (they do for
    /// every set `splits_by_rows` accepts); the selection then stays at batch level.
    fn batch_set(&mut self, rewrite: &mut Rewrite<'_>, old: Handle<Set>) -> Option<Handle<Set>> {
        let s = rewrite.old.sets[old].clone();
        let (base, predicate) = match s.kind {
            SetKind::Filter { base, predicate } => {
                let base = self.batch_set(rewrite, base)?;
                (base, rewrite.expr(predicate, self))
            }
            SetKind::Extreme {
                base,
                count,
                largest,
            } => {
                let base = rewrite.set(base, self);
                let count = rewrite.expr(count, self);
                let value = rewrite.expr(s.value, self);
                let kept = Self::kept_by_cut(&mut rewrite.builder, base, count, largest, value)?;
                (base, kept)
            }
            _ => return Some(rewrite.set(old, self)),
        };
        let value = rewrite.expr(s.value, self);
        let kind = SetKind::Filter { base, predicate };
        Some(rewrite.builder.add_set(kind, value, s.shape, s.block))
    }

    /// Whether a member of `set` is among its `count` smallest (or largest) values.
    fn kept_by_cut(
        b: &mut Builder,
        set: Handle<Set>,
        count: Handle<Expr>,
        largest: bool,
        value: Handle<Expr>,
    ) -> Option<Handle<Expr>> {
        let mut cut = |part| b.cut(set, count, largest, part);
        let (t, r, c) = (cut(CutPart::Value), cut(CutPart::Row), cut(CutPart::Col));
        let (i, j) = (b.index(Axis::Row), b.index(Axis::Col));
        let before = if largest { BinaryOp::Gt } else { BinaryOp::Lt };
        let mut op = |op, x, y| b.binary(op, x, y).ok();
        let beyond = op(before, value, t)?;
        let at = op(BinaryOp::Eq, value, t)?;
        let earlier_row = op(BinaryOp::Lt, i, r)?;
        let on_row = op(BinaryOp::Eq, i, r)?;
        let not_after = op(BinaryOp::Le, j, c)?;
        let on_row_not_after = op(BinaryOp::And, on_row, not_after)?;
        let not_later = op(BinaryOp::Or, earlier_row, on_row_not_after)?;
        let tie_kept = op(BinaryOp::And, at, not_later)?;
        op(BinaryOp::Or, beyond, tie_kept)
    }

    /// `combine` over anchors of the per-row `partial`.
    fn over_anchors(
        rewrite: &mut Rewrite<'_>,
        combine: ReduceOp,
        partial: Handle<Expr>,
        block: Handle<Block>,
    ) -> Handle<Expr> {
        let b = &mut rewrite.builder;
        let anchors = b.add_set(SetKind::Anchors, partial, SetShape::Anchors(block), None);
        b.reduce(combine, anchors, partial, Scope::Batch)
    }
}

impl Hook for Decompose {
    fn replace(&mut self, rewrite: &mut Rewrite<'_>, old: Handle<Expr>) -> Option<Handle<Expr>> {
        if let Some(new) = compare_arguments(rewrite, old, self) {
            return Some(new);
        }
        let e = rewrite.old.exprs[old].clone();
        let (set, space) = match e.kind {
            ExprKind::Reduce {
                set,
                scope: Scope::Batch,
                ..
            }
            | ExprKind::Hist {
                set,
                scope: Scope::Batch,
                ..
            } => match rewrite.old.sets[set].shape {
                SetShape::Members(space) if splits_by_rows(rewrite.old, set) => (set, space),
                _ => return None,
            },
            _ => return None,
        };
        let new_set = self.batch_set(rewrite, set)?;
        let block = self.block_for(rewrite, space);
        let row = Scope::Row(block);
        match e.kind {
            ExprKind::Hist { bins, lo, hi, .. } => {
                let partial = rewrite.builder.hist(new_set, bins, lo.0, hi.0, row);
                Some(Self::over_anchors(rewrite, ReduceOp::Sum, partial, block))
            }
            ExprKind::Reduce { op, body, .. } => {
                let body = rewrite.expr(body, self);
                let b = &mut rewrite.builder;
                match op {
                    ReduceOp::Sum | ReduceOp::Min | ReduceOp::Max | ReduceOp::Lse => {
                        let partial = b.reduce(op, new_set, body, row);
                        Some(Self::over_anchors(rewrite, op, partial, block))
                    }
                    ReduceOp::Count => {
                        let partial = b.reduce(op, new_set, body, row);
                        Some(Self::over_anchors(rewrite, ReduceOp::Sum, partial, block))
                    }
                    ReduceOp::Mean => {
                        let sum = b.reduce(ReduceOp::Sum, new_set, body, row);
                        let one = b.constant_expr(1.0);
                        let count = b.reduce(ReduceOp::Count, new_set, one, row);
                        let total = Self::over_anchors(rewrite, ReduceOp::Sum, sum, block);
                        let members = Self::over_anchors(rewrite, ReduceOp::Sum, count, block);
                        let mean = rewrite.builder.binary(BinaryOp::Div, total, members).ok()?;
                        self.means.push((mean, members));
                        Some(mean)
                    }
                    ReduceOp::Std => None,
                }
            }
            _ => None,
        }
    }
}
