//! Rebuilding a module from its roots, dropping what they do not need and letting a pass
//! replace expressions on the way. Arenas are append-only, so a transformation is a copy:
//! the rebuilt module re-interns every node it keeps, in dependency order.

use super::build::Builder;
use super::*;
use std::collections::HashMap;

/// A module being rebuilt from an old one.
pub struct Rewrite<'m> {
    pub old: &'m Module,
    pub builder: Builder,
    exprs: HashMap<Handle<Expr>, Handle<Expr>>,
    sets: HashMap<Handle<Set>, Handle<Set>>,
}

/// Decides, for each old expression, whether a pass replaces it. `None` keeps a copy.
pub trait Hook {
    fn replace(&mut self, rewrite: &mut Rewrite<'_>, old: Handle<Expr>) -> Option<Handle<Expr>>;
}

/// The identity pass: a plain copy of what the roots need.
pub struct Keep;

impl Hook for Keep {
    fn replace(&mut self, _: &mut Rewrite<'_>, _: Handle<Expr>) -> Option<Handle<Expr>> {
        None
    }
}

impl<'m> Rewrite<'m> {
    /// Starts a copy of `old` with its groupings, tensors, matrices and blocks, and no sets
    /// or expressions yet.
    pub fn new(old: &'m Module) -> Rewrite<'m> {
        let module = Module {
            name: old.name.clone(),
            params: old.params.clone(),
            inputs: old.inputs.clone(),
            groupings: old.groupings.clone(),
            tensors: old.tensors.clone(),
            matrices: old.matrices.clone(),
            blocks: old.blocks.clone(),
            random_sites: old.random_sites,
            spans: Spans {
                blocks: old.spans.blocks.clone(),
                tensors: old.spans.tensors.clone(),
                groupings: old.spans.groupings.clone(),
                ..Spans::default()
            },
            ..Module::default()
        };
        Rewrite {
            old,
            builder: Builder::new(module),
            exprs: HashMap::new(),
            sets: HashMap::new(),
        }
    }

    /// The new handle of an old expression, rebuilding it (and what it needs) first.
    pub fn expr(&mut self, old: Handle<Expr>, hook: &mut dyn Hook) -> Handle<Expr> {
        if let Some(&new) = self.exprs.get(&old) {
            return new;
        }
        let new = match hook.replace(self, old) {
            Some(new) => new,
            None => {
                let e = &self.old.exprs[old];
                let kind = self.map_kind(&e.kind, hook);
                self.builder.intern_raw(kind, e.ty, e.level)
            }
        };
        if let Some(&span) = self.old.spans.exprs.get(old)
            && self.builder.module.spans.exprs.get(new).is_none()
        {
            self.builder.module.spans.exprs.insert(new, span);
        }
        self.exprs.insert(old, new);
        new
    }

    /// The new handle of an old set.
    pub fn set(&mut self, old: Handle<Set>, hook: &mut dyn Hook) -> Handle<Set> {
        if let Some(&new) = self.sets.get(&old) {
            return new;
        }
        let s = self.old.sets[old].clone();
        let kind = match s.kind {
            SetKind::Filter { base, predicate } => {
                let base = self.set(base, hook);
                SetKind::Filter {
                    base,
                    predicate: self.expr(predicate, hook),
                }
            }
            SetKind::Extreme {
                base,
                count,
                largest,
            } => {
                let base = self.set(base, hook);
                SetKind::Extreme {
                    base,
                    count: self.expr(count, hook),
                    largest,
                }
            }
            SetKind::Sample {
                base,
                count,
                log_weight,
                site,
            } => {
                let base = self.set(base, hook);
                let count = self.expr(count, hook);
                SetKind::Sample {
                    base,
                    count,
                    log_weight: self.expr(log_weight, hook),
                    site,
                }
            }
            SetKind::Union { left, right } => SetKind::Union {
                left: self.set(left, hook),
                right: self.set(right, hook),
            },
            SetKind::Fallback { primary, fallback } => SetKind::Fallback {
                primary: self.set(primary, hook),
                fallback: self.set(fallback, hook),
            },
            SetKind::Cross { left, right } => SetKind::Cross {
                left: self.set(left, hook),
                right: self.set(right, hook),
            },
            other @ (SetKind::Entries
            | SetKind::Anchors
            | SetKind::Skipped
            | SetKind::VectorEntries) => other,
        };
        let value = self.expr(s.value, hook);
        let new = self.builder.add_set(kind, value, s.shape, s.block);
        if let Some(&span) = self.old.spans.sets.get(old) {
            self.builder.module.spans.sets.insert(new, span);
        }
        self.sets.insert(old, new);
        new
    }

    fn map_kind(&mut self, kind: &ExprKind, hook: &mut dyn Hook) -> ExprKind {
        use ExprKind::*;
        match kind.clone() {
            k @ (Const(_)
            | Bool(_)
            | BatchSize
            | Entry(_)
            | Same
            | IsSelf
            | Index(_)
            | GroupSize { .. }) => k,
            CrossSide { side, value } => CrossSide {
                side,
                value: self.expr(value, hook),
            },
            Unary { op, arg } => Unary {
                op,
                arg: self.expr(arg, hook),
            },
            Binary { op, lhs, rhs } => Binary {
                op,
                lhs: self.expr(lhs, hook),
                rhs: self.expr(rhs, hook),
            },
            Select {
                cond,
                then,
                otherwise,
            } => Select {
                cond: self.expr(cond, hook),
                then: self.expr(then, hook),
                otherwise: self.expr(otherwise, hook),
            },
            Stop(arg) => Stop(self.expr(arg, hook)),
            Reduce {
                op,
                set,
                body,
                scope,
            } => Reduce {
                op,
                set: self.set(set, hook),
                body: self.expr(body, hook),
                scope,
            },
            Rank { set, k, scope } => Rank {
                set: self.set(set, hook),
                k: self.expr(k, hook),
                scope,
            },
            Cut {
                set,
                count,
                largest,
                part,
            } => Cut {
                set: self.set(set, hook),
                count: self.expr(count, hook),
                largest,
                part,
            },
            Hist {
                set,
                bins,
                lo,
                hi,
                scope,
            } => Hist {
                set: self.set(set, hook),
                bins,
                lo,
                hi,
                scope,
            },
            Cumsum(v) => Cumsum(self.expr(v, hook)),
            ReverseCumsum(v) => ReverseCumsum(self.expr(v, hook)),
            ArgReduce {
                op,
                set,
                body,
                scope,
            } => {
                let op = match op {
                    ArgOp::Rank(k) => ArgOp::Rank(self.expr(k, hook)),
                    other => other,
                };
                ArgReduce {
                    op,
                    set: self.set(set, hook),
                    body: self.expr(body, hook),
                    scope,
                }
            }
            At { value, at } => At {
                value: self.expr(value, hook),
                at: self.expr(at, hook),
            },
            HistSlope {
                adjoint,
                value,
                bins,
                lo,
                hi,
            } => HistSlope {
                adjoint: self.expr(adjoint, hook),
                value: self.expr(value, hook),
                bins,
                lo,
                hi,
            },
        }
    }

    /// Copies the loss, the stats and every block's skip conditions, and returns the
    /// finished module.
    pub fn finish(mut self, hook: &mut dyn Hook) -> Module {
        let old = self.old;
        let loss = self.expr(old.loss_expr(), hook);
        let stats: Vec<(String, Handle<Expr>)> = old
            .stats
            .iter()
            .map(|(name, h)| (name.clone(), self.expr(*h, hook)))
            .collect();
        for (b, block) in old.blocks.iter() {
            let skips: Vec<Handle<Expr>> =
                block.skips.iter().map(|&s| self.expr(s, hook)).collect();
            self.builder.module.blocks[b].skips = skips;
        }
        let mut module = self.builder.finish();
        module.loss = Some(loss);
        module.stats = stats;
        module
    }
}

/// The module without the nodes its outputs do not need.
pub fn prune(module: &Module) -> Module {
    Rewrite::new(module).finish(&mut Keep)
}
