//! Loop fusion: a scatter over a set and the sums over the same set that its weight does
//! not need run as one loop. The row is read once, and what the loop bodies share is
//! computed once: the `exp(-|x|)` of a softplus summed forward and of the sigmoid
//! scattered backward.

use super::vector::LaneScatter;
use super::{Gen, Result, Status};
use crate::grad::ScatterTarget;
use crate::ir::*;
use cranelift_codegen::ir::InstBuilder;
use cranelift_codegen::ir::condcodes::IntCC;
use std::collections::HashSet;

impl Gen<'_, '_> {
    /// Emits the vectorisable scatters of `effects` over one set (its members, or either
    /// side of its pairs) as one loop, together with the sums and means over the set that
    /// `outputs` need and no weight does; returns the effects emitted. The sums' values are
    /// then known to [`Self::row`].
    pub(super) fn fuse_scatters(
        &mut self,
        outputs: &[Handle<Expr>],
        effects: &[usize],
    ) -> Result<HashSet<usize>> {
        let mut by_set: Vec<(Handle<Set>, Vec<usize>)> = Vec::new();
        for &effect in effects {
            let (ScatterTarget::Members { set, .. } | ScatterTarget::Cross { set, .. }) =
                self.plan.scatters[effect].target
            else {
                continue;
            };
            match by_set.iter_mut().find(|(s, _)| *s == set) {
                Some((_, group)) => group.push(effect),
                None => by_set.push((set, vec![effect])),
            }
        }
        let mut fused = HashSet::new();
        for (set, group) in by_set {
            let weights: Vec<Handle<Expr>> = group
                .iter()
                .map(|&e| self.plan.scatters[e].weight)
                .collect();
            let sums = self.fusable_sums(outputs, set, &weights);
            if sums.is_empty() && group.len() == 1 {
                continue;
            }
            let repr = self.set_repr(set)?;
            let bodies: Vec<Handle<Expr>> = sums.iter().map(|&(_, _, body)| body).collect();
            if !weights
                .iter()
                .chain(&bodies)
                .all(|&h| self.lanes_can_read(&repr, h))
            {
                continue;
            }
            for &h in weights.iter().chain(&bodies) {
                self.prepare(h)?;
            }
            let mut scatters = Vec::with_capacity(group.len());
            for &effect in &group {
                let scatter = self.plan.scatters[effect];
                let side = match scatter.target {
                    ScatterTarget::Cross { side, .. } => Some(side),
                    _ => None,
                };
                scatters.push(LaneScatter {
                    weight: scatter.weight,
                    grad_row: self.grad_row(scatter.matrix),
                    side,
                });
            }
            let totals = self.vector_loop(&repr, &bodies, &scatters)?;
            for (&(h, op, _), total) in sums.iter().zip(totals) {
                let value = if op == ReduceOp::Mean {
                    let n = self.set_count(set, &repr)?;
                    let empty = self.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
                    self.flag(Status::EMPTY, empty);
                    let n = self.index_to_float(n);
                    self.b.ins().fdiv(total, n)
                } else {
                    total
                };
                self.row.insert(h, value);
            }
            fused.extend(group);
        }
        Ok(fused)
    }

    /// The sums and means over `set` in this block that `outputs` need, not yet computed,
    /// that `weight` does not depend on and that do not depend on each other.
    fn fusable_sums(
        &self,
        outputs: &[Handle<Expr>],
        set: Handle<Set>,
        weights: &[Handle<Expr>],
    ) -> Vec<(Handle<Expr>, ReduceOp, Handle<Expr>)> {
        let weight_needs = self.reachable(weights.iter().map(|&w| Node::Expr(w)));
        let mut chosen: Vec<(Handle<Expr>, ReduceOp, Handle<Expr>)> = Vec::new();
        for h in self.reachable(outputs.iter().map(|&h| Node::Expr(h))) {
            let ExprKind::Reduce {
                op: op @ (ReduceOp::Sum | ReduceOp::Mean),
                set: over,
                body,
                scope: Scope::Row(block),
            } = self.module.exprs[h].kind
            else {
                continue;
            };
            let independent = |a: Handle<Expr>, b: Handle<Expr>| {
                !self.reachable([Node::Expr(a)]).contains(&b)
                    && !self.reachable([Node::Expr(b)]).contains(&a)
            };
            if over == set
                && block == self.block
                && !self.row.contains_key(&h)
                && !weight_needs.contains(&h)
                && chosen.iter().all(|&(c, _, _)| independent(c, h))
            {
                chosen.push((h, op, body));
            }
        }
        chosen
    }

    /// Every expression that `roots` depend on, themselves included, in handle order.
    fn reachable(&self, roots: impl IntoIterator<Item = Node>) -> Vec<Handle<Expr>> {
        let mut stack: Vec<Node> = roots.into_iter().collect();
        let mut exprs = HashSet::new();
        let mut sets = HashSet::new();
        while let Some(node) = stack.pop() {
            match node {
                Node::Expr(h) => {
                    if exprs.insert(h) {
                        stack.extend(expr_refs(&self.module.exprs[h].kind));
                    }
                }
                Node::Set(s) => {
                    if sets.insert(s) {
                        let set = &self.module.sets[s];
                        stack.extend(set_refs(&set.kind));
                        stack.push(Node::Expr(set.value));
                    }
                }
            }
        }
        let mut exprs: Vec<Handle<Expr>> = exprs.into_iter().collect();
        exprs.sort();
        exprs
    }
}
