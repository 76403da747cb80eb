//! Phase planning: in what order batch values and row passes are computed.
//!
//! A batch value that reduces per-anchor values (`sum(term)`) needs a pass over that
//! block's anchors first; a block whose rows read a batch value (`base` in center_nca)
//! needs that value first. Giving every expression a *time* — the number of row passes
//! that must precede it — orders everything: batch values of time t are computed in batch
//! phase t, then every block runs one pass computing what time-t values need, then phase
//! t + 1. A block's forward values and the gradient that depends only on earlier values
//! land in one pass, so most losses need a single fused pass.

use super::validate::{expr_refs, set_refs};
use super::*;

/// Something a phase does besides computing values: the gradient's scatters into `dL/dM`.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    /// The block whose rows it runs in, or `None` for batch level.
    pub block: Option<Handle<Block>>,
    /// The expressions it evaluates.
    pub deps: Vec<Handle<Expr>>,
    /// The sets it iterates over.
    pub sets: Vec<Handle<Set>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Batch values, in dependency order, and batch-level effects.
    Batch {
        exprs: Vec<Handle<Expr>>,
        effects: Vec<usize>,
    },
    /// One pass over a block's anchors: the per-anchor values later phases reduce, and
    /// row-level effects.
    Rows {
        block: Handle<Block>,
        outputs: Vec<Handle<Expr>>,
        effects: Vec<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schedule {
    pub phases: Vec<Phase>,
}

impl Schedule {
    /// The number of passes over anchor rows.
    pub fn row_passes(&self) -> usize {
        self.phases
            .iter()
            .filter(|p| matches!(p, Phase::Rows { .. }))
            .count()
    }
}

/// Plans the computation of `roots` (batch values) and `effects`.
pub fn schedule(module: &Module, roots: &[Handle<Expr>], effects: &[Effect]) -> Schedule {
    let times = Times::compute(module);
    let reachable = reachable(module, roots, effects);

    let max_time = reachable
        .iter()
        .enumerate()
        .filter(|(_, r)| **r)
        .map(|(i, _)| times.expr[i])
        .chain(effects.iter().map(|e| times.effect(module, e)))
        .max()
        .unwrap_or(0);

    let mut phases = Vec::new();
    for t in 0..=max_time {
        let exprs: Vec<Handle<Expr>> = module
            .exprs
            .iter()
            .filter(|(h, e)| {
                reachable[h.index()]
                    && times.expr[h.index()] == t
                    && matches!(e.level, Level::Batch)
            })
            .map(|(h, _)| h)
            .collect();
        let batch_effects: Vec<usize> = effects
            .iter()
            .enumerate()
            .filter(|(_, e)| e.block.is_none() && times.effect(module, e) == t)
            .map(|(i, _)| i)
            .collect();
        if !exprs.is_empty() || !batch_effects.is_empty() {
            phases.push(Phase::Batch {
                exprs,
                effects: batch_effects,
            });
        }
        for block in module.blocks.handles() {
            let mut outputs = Vec::new();
            for (h, e) in module.exprs.iter() {
                if !reachable[h.index()] || !matches!(e.level, Level::Batch | Level::Const) {
                    continue;
                }
                for (b, row_expr) in anchor_inputs(module, h) {
                    if b == block
                        && times.row(module, b, row_expr) == t
                        && !outputs.contains(&row_expr)
                    {
                        outputs.push(row_expr);
                    }
                }
            }
            let row_effects: Vec<usize> = effects
                .iter()
                .enumerate()
                .filter(|(_, e)| e.block == Some(block) && times.effect(module, e) == t)
                .map(|(i, _)| i)
                .collect();
            if !outputs.is_empty() || !row_effects.is_empty() {
                outputs.sort();
                phases.push(Phase::Rows {
                    block,
                    outputs,
                    effects: row_effects,
                });
            }
        }
    }
    Schedule { phases }
}

/// The per-anchor expressions a batch reduction over anchors reads, with their block.
pub fn anchor_inputs(module: &Module, h: Handle<Expr>) -> Vec<(Handle<Block>, Handle<Expr>)> {
    let (set, body) = match module.exprs[h].kind {
        ExprKind::Reduce {
            set,
            body,
            scope: Scope::Batch,
            ..
        } => (set, Some(body)),
        ExprKind::Rank {
            set,
            scope: Scope::Batch,
            ..
        } => (set, None),
        _ => return Vec::new(),
    };
    let mut inputs = Vec::new();
    let mut current = set;
    loop {
        let s = &module.sets[current];
        let SetShape::Anchors(block) = s.shape else {
            return Vec::new();
        };
        let mut push = |e: Handle<Expr>| {
            if module.exprs[e].level == Level::Row(block) && !inputs.contains(&(block, e)) {
                inputs.push((block, e));
            }
        };
        push(s.value);
        if let Some(body) = body {
            push(body);
        }
        match s.kind {
            SetKind::Filter { base, predicate } => {
                push(predicate);
                current = base;
            }
            SetKind::Skipped => {
                // The skip conditions themselves are what a count of skipped anchors reads.
                for &skip in &module.blocks[block].skips {
                    push(skip);
                }
                break;
            }
            _ => break,
        }
    }
    if inputs.is_empty() {
        // `count(anchors)` reads nothing per anchor but still needs the pass.
        if let SetShape::Anchors(block) = module.sets[set].shape
            && let Some(&skip) = module.blocks[block].skips.first()
        {
            inputs.push((block, skip));
        }
    }
    inputs
}

struct Times {
    expr: Vec<usize>,
    set: Vec<usize>,
}

impl Times {
    fn compute(module: &Module) -> Times {
        let mut times = Times {
            expr: vec![0; module.exprs.len()],
            set: vec![0; module.sets.len()],
        };
        for node in &module.order {
            match *node {
                Node::Set(h) => {
                    let s = &module.sets[h];
                    let t = set_refs(&s.kind)
                        .into_iter()
                        .chain(std::iter::once(Node::Expr(s.value)))
                        .map(|n| times.node(n))
                        .max()
                        .unwrap_or(0);
                    times.set[h.index()] = t;
                }
                Node::Expr(h) => {
                    let inputs = anchor_inputs(module, h);
                    let t = if inputs.is_empty() {
                        expr_refs(&module.exprs[h].kind)
                            .into_iter()
                            .map(|n| times.node(n))
                            .max()
                            .unwrap_or(0)
                    } else {
                        inputs
                            .iter()
                            .map(|&(b, r)| times.row(module, b, r) + 1)
                            .max()
                            .unwrap_or(0)
                    };
                    times.expr[h.index()] = t;
                }
            }
        }
        times
    }

    fn node(&self, node: Node) -> usize {
        match node {
            Node::Set(h) => self.set[h.index()],
            Node::Expr(h) => self.expr[h.index()],
        }
    }

    /// When a per-anchor value of `block` can be computed: after its inputs and the
    /// block's skip conditions.
    fn row(&self, module: &Module, block: Handle<Block>, e: Handle<Expr>) -> usize {
        let skips = module.blocks[block]
            .skips
            .iter()
            .map(|s| self.expr[s.index()])
            .max()
            .unwrap_or(0);
        self.expr[e.index()].max(skips)
    }

    fn effect(&self, module: &Module, effect: &Effect) -> usize {
        // A set's conditions may read batch values (a filter against a batch mean).
        let deps = (effect.deps.iter().map(|d| self.expr[d.index()]))
            .chain(effect.sets.iter().map(|s| self.set[s.index()]))
            .max()
            .unwrap_or(0);
        match effect.block {
            Some(b) => {
                let skips = module.blocks[b]
                    .skips
                    .iter()
                    .map(|s| self.expr[s.index()])
                    .max()
                    .unwrap_or(0);
                deps.max(skips)
            }
            None => deps,
        }
    }
}

/// Which expressions the roots and effects need, through any level.
fn reachable(module: &Module, roots: &[Handle<Expr>], effects: &[Effect]) -> Vec<bool> {
    let mut expr_seen = vec![false; module.exprs.len()];
    let mut set_seen = vec![false; module.sets.len()];
    let mut stack: Vec<Node> = roots.iter().map(|&h| Node::Expr(h)).collect();
    stack.extend(effects.iter().flat_map(|e| {
        (e.deps.iter().map(|&h| Node::Expr(h))).chain(e.sets.iter().map(|&s| Node::Set(s)))
    }));
    while let Some(node) = stack.pop() {
        match node {
            Node::Expr(h) => {
                if std::mem::replace(&mut expr_seen[h.index()], true) {
                    continue;
                }
                stack.extend(expr_refs(&module.exprs[h].kind));
                if let Level::Row(b)
                | Level::Member { block: Some(b), .. }
                | Level::Cross { block: b, .. } = module.exprs[h].level
                {
                    stack.extend(module.blocks[b].skips.iter().map(|&s| Node::Expr(s)));
                }
            }
            Node::Set(h) => {
                if std::mem::replace(&mut set_seen[h.index()], true) {
                    continue;
                }
                let s = &module.sets[h];
                stack.push(Node::Expr(s.value));
                stack.extend(set_refs(&s.kind));
                if let SetShape::Anchors(b) = s.shape {
                    stack.extend(module.blocks[b].skips.iter().map(|&s| Node::Expr(s)));
                }
            }
        }
    }
    expr_seen
}
