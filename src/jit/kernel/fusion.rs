//! Loop fusion. Loops over the same set run as one when neither needs what the other
//! computes: the row is read once, and what the bodies share is computed once.
//!
//! - The scatters over one set (its members, or both sides of its pairs) and the sums over
//!   the set that no weight needs share a loop: the `exp(-|x|)` of a softplus summed
//!   forward and of its sigmoid scattered backward is computed once. The set's count joins
//!   them when the weights read no reduction over the set (no earlier loop over it would
//!   take the count along); a skip on the set being empty then asks a loop that stops at
//!   its first member, and a row scale of the scatters (their `1 / count`) is applied to
//!   the anchor's adjoint row after the loop. These loops are planned before anything is
//!   emitted, so that their sums are not taken by the next rule.
//! - A scatter weight `exp(z - lse(S, z))` over the set `S` itself (the adjoint of a
//!   log-sum-exp: a softmax) reads `exp(z - max)`, kept per column by the log-sum-exp's
//!   own loop, times `1 / sum`: one exponential per member instead of two. A weight that
//!   is such a softmax times per-anchor factors is the buffer's entry times one
//!   coefficient; the buffer holds zeros off the set, so a loop with nothing else to do
//!   adds over the whole row, without masks.
//! - A reduction on lanes (a count, sum, mean, minimum or maximum) takes along every other
//!   such reduction over its set that the pass needs and that depends on none of them, and
//!   each log-sum-exp over the set; over a masked row, also those over its parent row and
//!   over its subsets under one more condition.
//! - A log-sum-exp is summed in that loop, the one that would find the maximum to shift it
//!   by: on a shift the loop chooses, the largest member of the first vector with members,
//!   moved (a branch rarely taken) when a member lies more than 40 above it. The sum
//!   stands unless the shift moved after terms were added, or it is below one half (the
//!   largest term is at least one): an empty set, a NaN, a row that climbs far. Then a
//!   cold loop sums again from the last shift and finds the maximum, whose value is the
//!   result when it is not finite, as it always was. One loop and one exponential per
//!   member where there were two loops, and no maximum on the lanes (its two accumulators
//!   cost the loop more than the branch); a log-sum-exp over a list of a few members (a
//!   class list, compacted) still takes only its maximum along, for its own loop.

use super::vector::{Fold, Guarded, LaneScatter, WeightTerm};
use super::{Gen, GuessedSum, LseKey, Repr, Result, Status, internal};
use crate::grad::ScatterTarget;
use crate::ir::*;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{InstBuilder, Value};
use std::collections::HashSet;

/// A per-anchor factor of a scatter's weight (see [`Gen::anchor_factors`]).
#[derive(Clone, Copy)]
enum AnchorFactor {
    Times(Handle<Expr>),
    Over(Handle<Expr>),
    Negated,
}

/// A set whose reductions join a loop, and the condition its members meet in the loop
/// (`None`: every member of the loop).
type LoopSet = (Handle<Set>, Option<Handle<Expr>>);

/// The scatters over one set, the sums that go into their loop, and the softmax weights
/// `exp(z - lse(set, z))` their weights read (each with the log-sum-exp's set and `z`).
pub(super) struct ScatterLoop {
    set: Handle<Set>,
    effects: Vec<usize>,
    sums: Vec<(Handle<Expr>, ReduceOp, Handle<Expr>)>,
    softmax: Vec<(Handle<Expr>, LseKey)>,
}

impl Gen<'_, '_> {
    /// Groups the member and pair scatters of `effects` by set, each with the sums and
    /// means over its set that the pass needs and no weight does, and reserves those sums
    /// for the groups' loops.
    pub(super) fn plan_scatter_loops(&mut self, effects: &[usize]) -> Vec<ScatterLoop> {
        let mut loops: Vec<ScatterLoop> = Vec::new();
        for &effect in effects {
            let (ScatterTarget::Members { set, .. } | ScatterTarget::Cross { set, .. }) =
                self.plan.scatters[effect].target
            else {
                continue;
            };
            match loops.iter_mut().find(|l| l.set == set) {
                Some(group) => group.effects.push(effect),
                None => loops.push(ScatterLoop {
                    set,
                    effects: vec![effect],
                    sums: Vec::new(),
                    softmax: Vec::new(),
                }),
            }
        }
        for group in &mut loops {
            let weights = (group.effects.iter()).flat_map(|&e| self.weight_roots(e));
            let weight_needs = dependencies(self.module, weights.map(Node::Expr));
            // A count joins too when the weights read no reduction over the set: there is
            // then no earlier loop over it that would take the count along for nothing.
            let earlier_loop = weight_needs.iter().any(|&x| {
                matches!(self.module.exprs[x].kind, ExprKind::Reduce { set, .. } if set == group.set)
            });
            group.sums = self
                .set_reductions(group.set)
                .filter(|&(h, op, _)| {
                    let joins = match op {
                        ReduceOp::Sum | ReduceOp::Mean => true,
                        ReduceOp::Count => !earlier_loop,
                        _ => false,
                    };
                    joins && !weight_needs.contains(&h)
                })
                .collect();
            self.reserved.extend(group.sums.iter().map(|&(h, _, _)| h));
            group.softmax = weight_needs
                .iter()
                .filter_map(|&h| Some((h, self.softmax_of(h)?)))
                .filter(|&(_, (set, _))| set == group.set)
                .collect();
            self.softmax_wanted
                .extend(group.softmax.iter().map(|&(_, key)| key));
        }
        loops
    }

    /// The set and body of the log-sum-exp `l` when `h` is `exp(z - l)` and `l` is
    /// `lse(set, z)` over a row of this block.
    fn softmax_of(&self, h: Handle<Expr>) -> Option<LseKey> {
        let exprs = &self.module.exprs;
        let ExprKind::Unary {
            op: UnaryOp::Exp,
            arg,
        } = exprs[h].kind
        else {
            return None;
        };
        let ExprKind::Binary {
            op: BinaryOp::Sub,
            lhs: z,
            rhs: lse,
        } = exprs[arg].kind
        else {
            return None;
        };
        match exprs[lse].kind {
            ExprKind::Reduce {
                op: ReduceOp::Lse,
                set,
                body,
                scope: Scope::Row(block),
            } if body == z && block == self.block => Some((set, body)),
            _ => None,
        }
    }

    /// `weight` as `c · core`, `c` the product of the per-anchor values at the top of its
    /// tree (some divided by, some negated): `core` and the factors of `c`.
    fn anchor_factors(&self, weight: Handle<Expr>) -> (Handle<Expr>, Vec<AnchorFactor>) {
        let exprs = &self.module.exprs;
        let per_anchor = |h: Handle<Expr>| {
            exprs[h].ty == Type::Num
                && !matches!(exprs[h].level, Level::Member { .. } | Level::Cross { .. })
        };
        let mut factors = Vec::new();
        let mut h = weight;
        // A per-anchor weight is left whole: its value is ready before the loop.
        while !per_anchor(h) {
            h = match exprs[h].kind {
                ExprKind::Unary {
                    op: UnaryOp::Neg,
                    arg,
                } => {
                    factors.push(AnchorFactor::Negated);
                    arg
                }
                ExprKind::Binary {
                    op: BinaryOp::Mul,
                    lhs,
                    rhs,
                } => {
                    let (factor, rest) = if per_anchor(lhs) {
                        (lhs, rhs)
                    } else {
                        (rhs, lhs)
                    };
                    if !per_anchor(factor) {
                        break;
                    }
                    factors.push(AnchorFactor::Times(factor));
                    rest
                }
                ExprKind::Binary {
                    op: BinaryOp::Div,
                    lhs,
                    rhs,
                } if per_anchor(rhs) => {
                    factors.push(AnchorFactor::Over(rhs));
                    lhs
                }
                _ => break,
            };
        }
        (h, factors)
    }

    /// Whether a loop would splat `factor` into a register (not a constant).
    fn splatted(&self, factor: AnchorFactor) -> bool {
        match factor {
            AnchorFactor::Times(h) | AnchorFactor::Over(h) => {
                self.module.exprs[h].level != Level::Const
            }
            AnchorFactor::Negated => false,
        }
    }

    /// `start` times the factors and the scatter's row scale: the coefficient of a
    /// [`WeightTerm`] (pinned before the loop once final).
    fn coefficient(
        &mut self,
        start: Value,
        factors: &[AnchorFactor],
        row_scale: Option<Value>,
    ) -> Result<Value> {
        let mut coefficient = start;
        for &factor in factors {
            coefficient = match factor {
                AnchorFactor::Times(h) => {
                    let v = self.row(h)?;
                    self.b.ins().fmul(coefficient, v)
                }
                AnchorFactor::Over(h) => {
                    let v = self.row(h)?;
                    self.b.ins().fdiv(coefficient, v)
                }
                AnchorFactor::Negated => self.b.ins().fneg(coefficient),
            };
        }
        if let Some(scale) = row_scale {
            coefficient = self.b.ins().fmul(coefficient, scale);
        }
        Ok(coefficient)
    }

    /// `coefficient`, or zero where the softmax's `1 / sum` is not finite: the set has no
    /// member (a NaN member's own term is NaN whatever the coefficient).
    fn unless_empty(&mut self, coefficient: Value, inverse: Value) -> Value {
        let infinity = self.fconst(f64::INFINITY);
        let finite = self.b.ins().fcmp(FloatCC::LessThan, inverse, infinity);
        let zero = self.fconst(0.0);
        self.b.ins().select(finite, coefficient, zero)
    }

    /// Emits the planned scatter loops whose weights and sums evaluate on lanes; returns
    /// the effects emitted. The sums' values are then known to [`Self::row`].
    pub(super) fn emit_scatter_loops(&mut self, loops: Vec<ScatterLoop>) -> Result<HashSet<usize>> {
        let mut emitted = HashSet::new();
        for group in loops {
            let repr = self.set_repr(group.set)?;
            let weights: Vec<Handle<Expr>> = (group.effects.iter())
                .flat_map(|&e| self.weight_roots(e))
                .collect();
            let bodies: Vec<Handle<Expr>> = group.sums.iter().map(|&(_, _, b)| b).collect();
            if !weights
                .iter()
                .chain(&bodies)
                .all(|&h| self.lanes_can_read(&repr, h))
            {
                // The sums are left to the reductions that need them.
                for (h, _, _) in group.sums {
                    self.reserved.remove(&h);
                }
                continue;
            }
            for &h in weights.iter().chain(&bodies) {
                self.prepare(h)?;
            }
            let mut scatters = Vec::with_capacity(group.effects.len());
            for &effect in &group.effects {
                let scatter = self.plan.scatters[effect];
                let side = match scatter.target {
                    ScatterTarget::Cross { side, .. } => Some(side),
                    _ => None,
                };
                let row_scale = self.applied_row_scale_value(effect)?;
                let (core, factors) = self.anchor_factors(scatter.weight);
                let softmax = (self.softmax_of(core))
                    .filter(|&(set, _)| set == group.set && side.is_none())
                    .and_then(|key| self.softmax_rows.get(&key).copied());
                let term = match softmax {
                    Some(row) => WeightTerm::Softmax {
                        row,
                        coefficient: self.coefficient(row.inverse, &factors, row_scale)?,
                    },
                    // Only for a factor a loop would splat: constants are loaded where
                    // they are used, and a coefficient of them would hold a register.
                    None if factors.iter().any(|f| self.splatted(*f)) => {
                        let one = self.fconst(1.0);
                        WeightTerm::Scaled {
                            core,
                            coefficient: self.coefficient(one, &factors, row_scale)?,
                        }
                    }
                    None => WeightTerm::Tree { row_scale },
                };
                scatters.push(LaneScatter {
                    weight: scatter.weight,
                    term,
                    grad_row: self.grad_row(&scatter),
                    side,
                });
            }
            for &(exp, key) in &group.softmax {
                if let Some(&row) = self.softmax_rows.get(&key) {
                    self.softmax_reads.insert(exp, row);
                }
            }
            // The set's size, for its counts and means, unless known already.
            let counted = !self.counts.contains_key(&group.set)
                && (group.sums.iter())
                    .any(|&(_, op, _)| matches!(op, ReduceOp::Count | ReduceOp::Mean));
            let mut folds: Vec<Guarded> = Vec::new();
            for &(_, op, body) in &group.sums {
                if op != ReduceOp::Count && !folds.contains(&(Fold::Sum(body), None)) {
                    folds.push((Fold::Sum(body), None));
                }
            }
            if counted {
                folds.push((Fold::Count, None));
            }
            // Softmax weights from buffers with zeros off the set can be added over the whole
            // row: no mask. Zero, not `c / sum`, for a set without members (`0 * inf`).
            let whole_row = folds.is_empty()
                && (scatters.iter())
                    .all(|s| matches!(s.term, WeightTerm::Softmax { row, .. } if row.every_column));
            if whole_row {
                for scatter in &mut scatters {
                    if let WeightTerm::Softmax { row, coefficient } = &mut scatter.term {
                        *coefficient = self.unless_empty(*coefficient, row.inverse);
                    }
                }
            }
            for scatter in &scatters {
                if let WeightTerm::Scaled { coefficient, .. }
                | WeightTerm::Softmax { coefficient, .. } = scatter.term
                {
                    self.pin(coefficient);
                }
            }
            let totals = self.vector_loop(&repr, &folds, &scatters, !whole_row);
            self.softmax_reads.clear();
            let totals = totals?;
            let total_of = |fold: Fold| {
                folds
                    .iter()
                    .position(|&(f, _)| f == fold)
                    .map(|at| totals[at])
            };
            if let Some(count) = total_of(Fold::Count) {
                self.counts.entry(group.set).or_insert(count);
            }
            for &(h, op, body) in &group.sums {
                let value = match op {
                    ReduceOp::Count => {
                        let n = *(self.counts.get(&group.set))
                            .ok_or_else(|| internal("a count without its fold"))?;
                        self.index_to_float(n)
                    }
                    _ => {
                        let total = total_of(Fold::Sum(body))
                            .ok_or_else(|| internal("a sum without its fold"))?;
                        self.finish_sum(op, group.set, &repr, total)?
                    }
                };
                self.row.insert(h, value);
            }
            emitted.extend(group.effects);
        }
        Ok(emitted)
    }

    /// A count, sum, mean, minimum, maximum or log-sum-exp over `set` (`body` is `None` for
    /// a count), computed on lanes in one loop with the other such reductions over the set,
    /// and over its parent when the set is the parent's masked row under one more
    /// condition, that the pass needs, that are not reserved for a scatter's loop and that
    /// depend on no reduction of the loop. The others' values go to [`Self::row`]; a count
    /// also to its set's cached size. Returns the value asked for (a count as an i64).
    ///
    /// A log-sum-exp sums its exponentials in the loop that finds its maximum, on a shift
    /// the loop chooses (see [`Self::finish_guessed`]), when its set is a whole or masked
    /// row the loop visits anyway; otherwise the loop finds its maximum for a second loop
    /// over the set.
    pub(super) fn fused_reduce(
        &mut self,
        op: ReduceOp,
        set: Handle<Set>,
        repr: &Repr,
        body: Option<Handle<Expr>>,
    ) -> Result<Value> {
        // What the body needs comes first: a sibling may need the same reductions over the
        // set (a sum of softmax terms and the log-sum-exp under them), which are then known.
        if let Some(body) = body {
            self.prepare(body)?;
        }
        let (loop_repr, sets) = self.fusion_scope(set, repr);
        let condition_of =
            |s: Handle<Set>| sets.iter().find(|&&(t, _)| t == s).and_then(|&(_, c)| c);
        let in_loop = |g: &Self, x: Handle<Expr>| {
            !g.known(x)
                && matches!(g.module.exprs[x].kind, ExprKind::Reduce { set: s, .. } if sets.iter().any(|&(t, _)| t == s))
        };
        // (the expression, when a sibling; its set; its operation; its body)
        let mut members = vec![(None, set, op, body)];
        for &(over, _) in &sets {
            for (h, other_op, other_body) in self.set_reductions(over).collect::<Vec<_>>() {
                let same = over == set
                    && other_op == op
                    && (op == ReduceOp::Count || Some(other_body) == body);
                let readable =
                    other_op == ReduceOp::Count || self.lanes_can_read(&loop_repr, other_body);
                let independent = !dependencies(self.module, [Node::Expr(other_body)])
                    .into_iter()
                    .any(|x| in_loop(self, x));
                if !same && readable && independent && !self.reserved.contains(&h) {
                    members.push((Some(h), over, other_op, Some(other_body)));
                }
            }
        }
        let mut folds: Vec<Guarded> = Vec::new();
        for &(over, condition) in &sets {
            let counted = members
                .iter()
                .any(|&(_, s, op, _)| s == over && matches!(op, ReduceOp::Mean | ReduceOp::Count));
            if counted && !self.counts.contains_key(&over) {
                folds.push((Fold::Count, condition));
            }
            if let Some(condition) = condition {
                self.prepare(condition)?;
            }
        }
        // The log-sum-exps whose sums join the loop, each with its guess and the position of
        // its fold.
        let mut guessed: Vec<(Handle<Set>, Fold, usize)> = Vec::new();
        for &(sibling, over, op, body) in &members {
            if let (ReduceOp::Lse, Some(body)) = (op, body)
                && (sibling.is_none() || self.sums_in_loop(over, &loop_repr))
            {
                self.prepare(body)?;
                let kept = self.softmax_buffer(over, &loop_repr, body)?;
                let none = self.fconst(f64::NEG_INFINITY);
                let guess = self.new_guess(none);
                let fold = Fold::GuessedExp { body, kept, guess };
                guessed.push((over, fold, folds.len()));
                folds.push((fold, condition_of(over)));
                continue;
            }
            let Some(fold) = fold_of(op, body) else {
                continue;
            };
            if let Some(body) = fold.body() {
                self.prepare(body)?;
            }
            let guarded = (fold, condition_of(over));
            if !folds.contains(&guarded) {
                folds.push(guarded);
            }
        }
        let every_vector = matches!(loop_repr, Repr::Range { .. } | Repr::Masked { .. })
            && !self.skips_empty(&folds, &[]);
        let results = self.vector_loop(&loop_repr, &folds, &[], true)?;
        let result_of = |fold: Fold, over: Handle<Set>| {
            folds
                .iter()
                .position(|&f| f == (fold, condition_of(over)))
                .map(|at| results[at])
                .ok_or_else(|| internal("a reduction without its fold"))
        };
        let sums: Vec<GuessedSum> = (guessed.iter())
            .map(|&(set, fold, at)| GuessedSum {
                set,
                fold,
                condition: condition_of(set),
                total: results[at],
            })
            .collect();
        let lses = self.finish_guessed(&sums, every_vector, &loop_repr)?;
        for &(over, _) in &sets {
            if let Ok(n) = result_of(Fold::Count, over) {
                self.counts.entry(over).or_insert(n);
            }
        }
        let mut asked = None;
        for (sibling, over, op, body) in members {
            if let (ReduceOp::Lse, Some(body)) = (op, body) {
                let guessed_here = |&(s, fold, _): &(Handle<Set>, Fold, usize)| {
                    s == over && fold.body() == Some(body)
                };
                let Some(at) = guessed.iter().position(guessed_here) else {
                    let max = result_of(Fold::Max(body), over)?;
                    self.lse_max.insert((over, body), max);
                    continue;
                };
                let lse = lses[at];
                match sibling {
                    Some(h) => self.row.insert(h, lse),
                    None => asked.replace(lse),
                };
                continue;
            }
            let value = match fold_of(op, body) {
                // The count asked for is the set's size; a sibling count is a number.
                None if sibling.is_none() => self.counts[&over],
                None => {
                    let n = self.counts[&over];
                    self.index_to_float(n)
                }
                Some(fold) => {
                    let total = result_of(fold, over)?;
                    match sibling {
                        Some(h) if op == ReduceOp::Mean && self.in_skips => {
                            // Divided (and an empty set flagged) once the anchor is kept.
                            self.pending_means.insert(h, (total, over));
                            continue;
                        }
                        _ => {
                            let over_repr = if over == set { repr } else { &loop_repr };
                            self.finish_sum(op, over, over_repr, total)?
                        }
                    }
                }
            };
            match sibling {
                Some(h) => {
                    self.row.insert(h, value);
                }
                None => asked = Some(value),
            }
        }
        asked.ok_or_else(|| internal("a fused reduction without its value"))
    }

    /// Whether a loop over `loop_repr` sums the exponentials of a log-sum-exp over `set`
    /// (one of the loop's sets): when the set is a whole or masked row of the loop's, which
    /// its own loop would visit vector by vector too, not a list of a few members.
    fn sums_in_loop(&self, set: Handle<Set>, loop_repr: &Repr) -> bool {
        if !matches!(loop_repr, Repr::Range { .. } | Repr::Masked { .. }) {
            return false;
        }
        match (self.sets.get(&set), &self.module.sets[set].kind) {
            (Some(repr), _) => matches!(repr, Repr::Range { .. } | Repr::Masked { .. }),
            (None, SetKind::Entries) => true,
            (None, &SetKind::Filter { predicate, .. }) => self.reads_masked(set, predicate),
            (None, _) => false,
        }
    }

    /// The loop a reduction over `set` runs in, and the sets whose reductions can join it,
    /// each with the condition its members meet in that loop. When `set` is a masked row
    /// that its parent's masked row with one more condition (`hard_neg = neg where ...`),
    /// the loop is the parent's: the parent's reductions join with no condition and the
    /// set's with that one, provided it depends on no reduction over the parent.
    fn fusion_scope(&self, set: Handle<Set>, repr: &Repr) -> (Repr, Vec<LoopSet>) {
        let alone = (repr.clone(), self.with_subsets(set, repr));
        let SetKind::Filter { base, predicate } = self.module.sets[set].kind else {
            return alone;
        };
        let (
            Repr::Masked { cols, preds, space },
            Some(
                parent @ Repr::Masked {
                    cols: parent_cols,
                    preds: parent_preds,
                    space: parent_space,
                },
            ),
        ) = (repr, self.sets.get(&base))
        else {
            return alone;
        };
        let extends = preds.split_last() == Some((&predicate, parent_preds.as_slice()));
        if cols != parent_cols
            || space != parent_space
            || !extends
            || self.reads_reduction_over(predicate, base)
            || !self.lanes_can_read(parent, predicate)
        {
            return alone;
        }
        (parent.clone(), vec![(set, Some(predicate)), (base, None)])
    }

    /// `set` and, when it is a masked row, the sets that are it under one more condition
    /// (`semi_neg = neg where v < max(pos)` of `neg`) that the loop can test: each with that
    /// condition, provided it depends on no reduction over `set`.
    fn with_subsets(&self, set: Handle<Set>, repr: &Repr) -> Vec<LoopSet> {
        let mut sets = vec![(set, None)];
        let Repr::Masked { space, .. } = repr else {
            return sets;
        };
        for (child, s) in self.module.sets.iter() {
            let SetKind::Filter { base, predicate } = s.kind else {
                continue;
            };
            if base != set {
                continue;
            }
            if s.shape == self.module.sets[set].shape
                && !self.reads_reduction_over(predicate, set)
                && self.class_list(*space, predicate).is_none()
                && self.lanes_can_read(repr, predicate)
                && (self.sets.get(&child)).is_none_or(|known| {
                    matches!(known, Repr::Masked { preds, .. } if preds.last() == Some(&predicate))
                })
            {
                sets.push((child, Some(predicate)));
            }
        }
        sets
    }

    /// Whether `h` depends on a reduction over `set` (which a loop over `set` cannot test).
    fn reads_reduction_over(&self, h: Handle<Expr>, set: Handle<Set>) -> bool {
        dependencies(self.module, [Node::Expr(h)]).into_iter().any(
            |x| matches!(self.module.exprs[x].kind, ExprKind::Reduce { set: s, .. } if s == set),
        )
    }

    /// A reduction's value from its fold: a mean divides by the set's size (and flags an
    /// empty set), the others are the fold itself.
    pub(super) fn finish_sum(
        &mut self,
        op: ReduceOp,
        set: Handle<Set>,
        repr: &Repr,
        total: Value,
    ) -> Result<Value> {
        if op != ReduceOp::Mean {
            return Ok(total);
        }
        let n = self.set_count(set, repr)?;
        let empty = self.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
        self.flag(Status::EMPTY, empty);
        let n = self.index_to_float(n);
        Ok(self.b.ins().fdiv(total, n))
    }

    /// Whether a per-anchor value is at hand without a loop: computed, or stored by an
    /// earlier pass.
    fn known(&self, h: Handle<Expr>) -> bool {
        self.row.contains_key(&h) || self.stored.contains(&h)
    }

    /// The counts, sums, means, minima, maxima and log-sum-exps over `set` in this block
    /// that the pass needs, not computed yet, and whose bodies depend on no reduction over
    /// the set that is not known yet.
    pub(super) fn set_reductions(
        &self,
        set: Handle<Set>,
    ) -> impl Iterator<Item = (Handle<Expr>, ReduceOp, Handle<Expr>)> + '_ {
        let needed = dependencies(self.module, self.roots.iter().map(|&h| Node::Expr(h)));
        needed.into_iter().filter_map(move |h| {
            let ExprKind::Reduce {
                op,
                set: over,
                body,
                scope: Scope::Row(block),
            } = self.module.exprs[h].kind
            else {
                return None;
            };
            let fold = matches!(
                op,
                ReduceOp::Count
                    | ReduceOp::Sum
                    | ReduceOp::Mean
                    | ReduceOp::Min
                    | ReduceOp::Max
                    | ReduceOp::Lse
            );
            let over_set = |x: Handle<Expr>| {
                !self.known(x)
                    && matches!(self.module.exprs[x].kind, ExprKind::Reduce { set: s, .. } if s == set)
            };
            let independent = !dependencies(self.module, [Node::Expr(body)]).into_iter().any(over_set);
            (fold && over == set && block == self.block && !self.known(h) && independent)
                .then_some((h, op, body))
        })
    }
}

/// The fold that computes a reduction (`None` for a count, which is the set's size).
fn fold_of(op: ReduceOp, body: Option<Handle<Expr>>) -> Option<Fold> {
    match (op, body) {
        (ReduceOp::Sum | ReduceOp::Mean, Some(b)) => Some(Fold::Sum(b)),
        (ReduceOp::Min, Some(b)) => Some(Fold::Min(b)),
        // A log-sum-exp's loop needs its maximum first.
        (ReduceOp::Max | ReduceOp::Lse, Some(b)) => Some(Fold::Max(b)),
        _ => None,
    }
}
