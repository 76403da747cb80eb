//! Validation: the invariants every later stage relies on, checked once.
//!
//! - every handle refers to an existing node created earlier (arena order is topological);
//! - every expression's level and type are what its operands give;
//! - every set's definition fits its shape and block;
//! - the loss is a batch-level number.
//!
//! A failure here is a bug in losscc, never a mistake in a spec: lowering reports those.

use super::build::Builder;
use super::*;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid IR at {node}: {message}")]
pub struct ValidationError {
    pub node: String,
    pub message: String,
}

fn invalid(node: impl std::fmt::Display, message: impl Into<String>) -> ValidationError {
    ValidationError {
        node: node.to_string(),
        message: message.into(),
    }
}

pub fn validate(module: &Module) -> Result<(), ValidationError> {
    for (h, g) in module.groupings.iter() {
        let refs_ok = match g {
            Grouping::Labels => true,
            Grouping::KMeans { features, .. } => module.tensors.contains(*features),
            Grouping::Input { default, .. } | Grouping::SplitByLabel { groups: default } => {
                *default < h
            }
        };
        if !refs_ok {
            return Err(invalid(h, "refers to a missing or later node"));
        }
    }
    for (h, t) in module.tensors.iter() {
        let sources: Vec<Handle<Tensor>> = match &t.op {
            TensorOp::Embedding | TensorOp::OneHot { .. } => vec![],
            TensorOp::Columns { source, .. }
            | TensorOp::Partition { source, .. }
            | TensorOp::Normalize { source }
            | TensorOp::Centres { source, .. }
            | TensorOp::Stop { source }
            | TensorOp::Scale { source, .. } => vec![*source],
            TensorOp::Concat { left, right } => vec![*left, *right],
        };
        if sources.iter().any(|s| *s >= h) {
            return Err(invalid(h, "refers to a later tensor"));
        }
        if let TensorOp::Columns { start, end, .. } = t.op
            && start >= end
        {
            return Err(invalid(h, "empty column range"));
        }
    }
    for (h, m) in module.matrices.iter() {
        if !module.tensors.contains(m.left) || !module.tensors.contains(m.right) {
            return Err(invalid(h, "refers to a missing tensor"));
        }
    }

    // Position of every set and expression in creation order.
    let mut position: HashMap<Node, usize> = HashMap::new();
    for (index, node) in module.order.iter().enumerate() {
        position.insert(*node, index);
    }
    if position.len() != module.sets.len() + module.exprs.len() {
        return Err(invalid(
            "order",
            "does not list every set and expression exactly once",
        ));
    }
    let before = |user: Node, used: Node| -> Result<(), ValidationError> {
        match (position.get(&user), position.get(&used)) {
            (Some(a), Some(b)) if b < a => Ok(()),
            _ => Err(invalid(
                node_name(user),
                format!("uses {} which is missing or created later", node_name(used)),
            )),
        }
    };

    for (h, e) in module.exprs.iter() {
        let me = Node::Expr(h);
        for used in expr_refs(&e.kind) {
            before(me, used)?;
        }
        check_expr(module, h, e)?;
    }
    for (h, s) in module.sets.iter() {
        let me = Node::Set(h);
        before(me, Node::Expr(s.value))?;
        for used in set_refs(&s.kind) {
            before(me, used)?;
        }
        if let SetShape::Anchors(b) = s.shape
            && !module.blocks.contains(b)
        {
            return Err(invalid(h, "anchors of a missing block"));
        }
    }
    for (h, b) in module.blocks.iter() {
        for skip in &b.skips {
            let e = &module.exprs[*skip];
            if e.ty != Type::Bool || !matches!(e.level, Level::Const | Level::Batch | Level::Row(_))
            {
                return Err(invalid(
                    h,
                    format!("skip condition {skip} is not a per-anchor condition"),
                ));
            }
        }
    }
    let loss = module
        .loss
        .ok_or_else(|| invalid("loss", "the module has no loss"))?;
    for h in std::iter::once(loss).chain(module.stats.iter().map(|(_, h)| *h)) {
        let e = &module.exprs[h];
        if e.ty != Type::Num || !matches!(e.level, Level::Const | Level::Batch) {
            return Err(invalid(h, "an output is not a batch-level number"));
        }
    }
    Ok(())
}

fn node_name(node: Node) -> String {
    match node {
        Node::Set(h) => h.to_string(),
        Node::Expr(h) => h.to_string(),
    }
}

/// The sets and expressions an expression refers to.
pub(crate) fn expr_refs(kind: &ExprKind) -> Vec<Node> {
    use ExprKind::*;
    let e = Node::Expr;
    let s = Node::Set;
    match kind {
        Const(_) | Bool(_) | BatchSize | Entry(_) | Same | IsSelf | Index(_) | GroupSize { .. } => {
            vec![]
        }
        CrossSide { value, .. } => vec![e(*value)],
        Unary { arg, .. } | Stop(arg) | Cumsum(arg) | ReverseCumsum(arg) => vec![e(*arg)],
        Binary { lhs, rhs, .. } => vec![e(*lhs), e(*rhs)],
        Select {
            cond,
            then,
            otherwise,
        } => vec![e(*cond), e(*then), e(*otherwise)],
        Reduce { set, body, .. } => vec![s(*set), e(*body)],
        Rank { set, k, .. } => vec![s(*set), e(*k)],
        Cut { set, count, .. } => vec![s(*set), e(*count)],
        Hist { set, .. } => vec![s(*set)],
        ArgReduce { op, set, body, .. } => {
            let mut refs = vec![s(*set), e(*body)];
            if let ArgOp::Rank(k) = op {
                refs.push(e(*k));
            }
            refs
        }
        At { value, at } => vec![e(*value), e(*at)],
        HistSlope { adjoint, value, .. } => vec![e(*adjoint), e(*value)],
    }
}

/// Every expression that `roots` depend on (through expressions and sets), themselves
/// included, in handle order.
pub(crate) fn dependencies(
    module: &Module,
    roots: impl IntoIterator<Item = Node>,
) -> Vec<Handle<Expr>> {
    let mut stack: Vec<Node> = roots.into_iter().collect();
    let mut exprs = vec![false; module.exprs.len()];
    let mut sets = vec![false; module.sets.len()];
    while let Some(node) = stack.pop() {
        match node {
            Node::Expr(h) => {
                if !std::mem::replace(&mut exprs[h.index()], true) {
                    stack.extend(expr_refs(&module.exprs[h].kind));
                }
            }
            Node::Set(s) => {
                if !std::mem::replace(&mut sets[s.index()], true) {
                    let set = &module.sets[s];
                    stack.extend(set_refs(&set.kind));
                    stack.push(Node::Expr(set.value));
                }
            }
        }
    }
    module
        .exprs
        .handles()
        .filter(|h| exprs[h.index()])
        .collect()
}

/// The sets and expressions a set's definition refers to (besides its value).
pub(crate) fn set_refs(kind: &SetKind) -> Vec<Node> {
    match kind {
        SetKind::Entries | SetKind::Anchors | SetKind::Skipped | SetKind::VectorEntries => vec![],
        SetKind::Filter { base, predicate } => vec![Node::Set(*base), Node::Expr(*predicate)],
        SetKind::Extreme { base, count, .. } => vec![Node::Set(*base), Node::Expr(*count)],
        SetKind::Sample {
            base,
            count,
            log_weight,
            ..
        } => {
            vec![
                Node::Set(*base),
                Node::Expr(*count),
                Node::Expr(*log_weight),
            ]
        }
        SetKind::Union { left, right } | SetKind::Cross { left, right } => {
            vec![Node::Set(*left), Node::Set(*right)]
        }
        SetKind::Fallback { primary, fallback } => vec![Node::Set(*primary), Node::Set(*fallback)],
    }
}

/// Recomputes an expression's level and type from its operands.
fn check_expr(module: &Module, h: Handle<Expr>, e: &Expr) -> Result<(), ValidationError> {
    let level_of = |x: Handle<Expr>| module.exprs[x].level;
    let scope_level = |s: Scope| match s {
        Scope::Row(b) => Level::Row(b),
        Scope::Batch => Level::Batch,
    };
    let expected = match &e.kind {
        ExprKind::Unary { arg, .. }
        | ExprKind::Stop(arg)
        | ExprKind::Cumsum(arg)
        | ExprKind::ReverseCumsum(arg) => Some(level_of(*arg)),
        ExprKind::Binary { lhs, rhs, .. } => Builder::combine(level_of(*lhs), level_of(*rhs)).ok(),
        ExprKind::Select {
            cond,
            then,
            otherwise,
        } => Builder::combine(level_of(*cond), level_of(*then))
            .and_then(|l| Builder::combine(l, level_of(*otherwise)))
            .ok(),
        ExprKind::Reduce { scope, .. }
        | ExprKind::Rank { scope, .. }
        | ExprKind::ArgReduce { scope, .. } => Some(scope_level(*scope)),
        ExprKind::Cut { .. } => Some(Level::Batch),
        ExprKind::Entry(m) => {
            if !module.matrices.contains(*m) {
                return Err(invalid(h, "entry of a missing matrix"));
            }
            Some(Level::Member {
                space: module.space_of(*m),
                block: None,
            })
        }
        _ => None,
    };
    if let Some(expected) = expected
        && expected != e.level
    {
        return Err(invalid(
            h,
            format!("level {:?} but its operands give {expected:?}", e.level),
        ));
    }
    if let ExprKind::Reduce {
        scope: Scope::Row(b),
        ..
    }
    | ExprKind::Rank {
        scope: Scope::Row(b),
        ..
    } = e.kind
        && !module.blocks.contains(b)
    {
        return Err(invalid(h, "reduces in a missing block"));
    }
    Ok(())
}

// ---- emptiness ---------------------------------------------------------------------------------

/// Why `set` has no member on any batch, if that can be shown from its definition alone.
pub fn proof_of_emptiness(module: &Module, set: Handle<Set>) -> Option<String> {
    let s = &module.sets[set];
    let constant = |h: Handle<Expr>| match module.exprs[h].kind {
        ExprKind::Const(Real(v)) => Some(v),
        _ => None,
    };
    match &s.kind {
        SetKind::Extreme { base, count, .. } | SetKind::Sample { base, count, .. } => {
            if constant(*count) == Some(0.0) {
                return Some("it keeps 0 members".into());
            }
            proof_of_emptiness(module, *base)
        }
        SetKind::Union { left, right }
        | SetKind::Fallback {
            primary: left,
            fallback: right,
        } => {
            let a = proof_of_emptiness(module, *left)?;
            proof_of_emptiness(module, *right).map(|b| format!("both sides are empty: {a}; {b}"))
        }
        SetKind::Cross { left, right } => {
            proof_of_emptiness(module, *left).or_else(|| proof_of_emptiness(module, *right))
        }
        SetKind::Filter { .. } => {
            let mut predicates = Vec::new();
            let mut current = set;
            while let SetKind::Filter { base, predicate } = module.sets[current].kind {
                predicates.push(predicate);
                current = base;
            }
            if let Some(reason) = proof_of_emptiness(module, current) {
                return Some(reason);
            }
            let SetShape::Members(space) = s.shape else {
                return None;
            };
            if unsatisfiable(module, &predicates, space) {
                Some(
                    "no pair can meet its conditions on `same`, `self` and the indices together"
                        .into(),
                )
            } else {
                None
            }
        }
        SetKind::Entries | SetKind::Anchors | SetKind::Skipped | SetKind::VectorEntries => None,
    }
}

/// How a row index compares to a column index.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    Less,
    Equal,
    Greater,
}

/// Whether the conjunction of the predicates is false for every pair of the space: it
/// tries every combination of `same`, the order of i and j (or `self` when rows and columns
/// differ), and the other conditions treated as free.
fn unsatisfiable(module: &Module, predicates: &[Handle<Expr>], space: Space) -> bool {
    let square = space.rows.is_some() && space.rows == space.cols;
    let mut opaque: Vec<Handle<Expr>> = Vec::new();
    for &p in predicates {
        collect_opaque(module, p, square, &mut opaque);
    }
    if opaque.len() > 8 {
        return false;
    }
    let orders: &[Order] = if square {
        &[Order::Less, Order::Equal, Order::Greater]
    } else {
        &[Order::Less, Order::Equal]
    };
    for same in [false, true] {
        for &order in orders {
            // Outside square spaces `Equal` stands for "the row owns the column".
            let is_self = order == Order::Equal;
            if is_self && !same {
                continue;
            }
            for bits in 0u32..(1 << opaque.len()) {
                let assignment = Assignment {
                    same,
                    order,
                    is_self,
                    square,
                    opaque: &opaque,
                    bits,
                };
                if predicates.iter().all(|&p| assignment.eval(module, p)) {
                    return false;
                }
            }
        }
    }
    true
}

fn index_comparison(module: &Module, h: Handle<Expr>) -> Option<(BinaryOp, bool)> {
    if let ExprKind::Binary { op, lhs, rhs } = module.exprs[h].kind {
        let axis = |x: Handle<Expr>| match module.exprs[x].kind {
            ExprKind::Index(axis) => Some(axis),
            _ => None,
        };
        if op.is_predicate() && !matches!(op, BinaryOp::And | BinaryOp::Or) {
            match (axis(lhs), axis(rhs)) {
                (Some(Axis::Row), Some(Axis::Col)) => return Some((op, false)),
                (Some(Axis::Col), Some(Axis::Row)) => return Some((op, true)),
                _ => {}
            }
        }
    }
    None
}

fn collect_opaque(module: &Module, h: Handle<Expr>, square: bool, out: &mut Vec<Handle<Expr>>) {
    match module.exprs[h].kind {
        ExprKind::Bool(_) | ExprKind::Same | ExprKind::IsSelf => {}
        ExprKind::Unary {
            op: UnaryOp::Not,
            arg,
        } => collect_opaque(module, arg, square, out),
        ExprKind::Binary {
            op: BinaryOp::And | BinaryOp::Or,
            lhs,
            rhs,
        } => {
            collect_opaque(module, lhs, square, out);
            collect_opaque(module, rhs, square, out);
        }
        _ if square && index_comparison(module, h).is_some() => {}
        _ => {
            if !out.contains(&h) {
                out.push(h);
            }
        }
    }
}

struct Assignment<'a> {
    same: bool,
    order: Order,
    is_self: bool,
    square: bool,
    opaque: &'a [Handle<Expr>],
    bits: u32,
}

impl Assignment<'_> {
    fn eval(&self, module: &Module, h: Handle<Expr>) -> bool {
        match module.exprs[h].kind {
            ExprKind::Bool(b) => b,
            ExprKind::Same => self.same,
            ExprKind::IsSelf => self.is_self,
            ExprKind::Unary {
                op: UnaryOp::Not,
                arg,
            } => !self.eval(module, arg),
            ExprKind::Binary {
                op: BinaryOp::And,
                lhs,
                rhs,
            } => self.eval(module, lhs) && self.eval(module, rhs),
            ExprKind::Binary {
                op: BinaryOp::Or,
                lhs,
                rhs,
            } => self.eval(module, lhs) || self.eval(module, rhs),
            _ => match (self.square, index_comparison(module, h)) {
                (true, Some((op, swapped))) => {
                    let order = match (self.order, swapped) {
                        (Order::Less, true) => Order::Greater,
                        (Order::Greater, true) => Order::Less,
                        (o, _) => o,
                    };
                    match op {
                        BinaryOp::Lt => order == Order::Less,
                        BinaryOp::Le => order != Order::Greater,
                        BinaryOp::Gt => order == Order::Greater,
                        BinaryOp::Ge => order != Order::Less,
                        BinaryOp::Eq => order == Order::Equal,
                        _ => order != Order::Equal,
                    }
                }
                _ => {
                    let index = self.opaque.iter().position(|&o| o == h).unwrap_or(0);
                    self.bits & (1 << index) != 0
                }
            },
        }
    }
}
