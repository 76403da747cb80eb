//! Local derivative rules, shared by the batch/per-anchor pass and the per-member pass.

use super::GradError;
use crate::ir::*;
use std::collections::HashMap;

/// Pairs of (operand or leaf, its share of the adjoint).
pub type Partials = Vec<(Handle<Expr>, Handle<Expr>)>;

/// Which forward expressions depend on a matrix entry other than through `stop`: only
/// those can have a non-zero adjoint.
pub fn active(module: &Module) -> Vec<bool> {
    let mut active = vec![false; module.exprs.len()];
    for (h, e) in module.exprs.iter() {
        let on = |x: &Handle<Expr>| active[x.index()];
        active[h.index()] = e.ty != Type::Bool
            && match &e.kind {
                ExprKind::Entry(_) => true,
                ExprKind::CrossSide { value, .. } => on(value),
                ExprKind::Unary { op, arg } => {
                    !matches!(op, UnaryOp::Floor | UnaryOp::Step) && on(arg)
                }
                ExprKind::Binary { lhs, rhs, .. } => on(lhs) || on(rhs),
                ExprKind::Select {
                    then, otherwise, ..
                } => on(then) || on(otherwise),
                ExprKind::Reduce { op, body, .. } => *op != ReduceOp::Count && on(body),
                ExprKind::Rank { set, .. } | ExprKind::Hist { set, .. } => {
                    on(&module.sets[*set].value)
                }
                ExprKind::Cumsum(v) | ExprKind::ReverseCumsum(v) => on(v),
                _ => false,
            };
    }
    active
}

/// The contributions of `h`'s adjoint `a` to those of its operands that `wants`, for the
/// elementwise operations.
pub fn partials(
    b: &mut Builder,
    h: Handle<Expr>,
    a: Handle<Expr>,
    wants: &dyn Fn(Handle<Expr>) -> bool,
) -> Result<Partials, GradError> {
    let mut found = operand_partials(b, h, a, wants)?;
    found.retain(|(operand, _)| wants(*operand));
    Ok(found)
}

fn operand_partials(
    b: &mut Builder,
    h: Handle<Expr>,
    a: Handle<Expr>,
    wants: &dyn Fn(Handle<Expr>) -> bool,
) -> Result<Partials, GradError> {
    let e = b.expr(h).clone();
    let zero = b.constant_expr(0.0);
    let one = b.constant_expr(1.0);
    let mul =
        |b: &mut Builder, x: Handle<Expr>, y: Handle<Expr>| -> Result<Handle<Expr>, GradError> {
            if b.constant(x) == Some(0.0) || b.constant(y) == Some(0.0) {
                return Ok(b.constant_expr(0.0));
            }
            Ok(b.binary(BinaryOp::Mul, x, y)?)
        };
    Ok(match e.kind {
        ExprKind::Unary { op, arg: x } => {
            let derivative = match op {
                UnaryOp::Neg => b.constant_expr(-1.0),
                UnaryOp::Exp => h,
                UnaryOp::Log => b.binary(BinaryOp::Div, one, x)?,
                UnaryOp::Log1p => {
                    let shifted = b.binary(BinaryOp::Add, one, x)?;
                    b.binary(BinaryOp::Div, one, shifted)?
                }
                UnaryOp::Sqrt => {
                    let twice = b.binary(BinaryOp::Add, h, h)?;
                    b.binary(BinaryOp::Div, one, twice)?
                }
                UnaryOp::Softplus => b.unary(UnaryOp::Sigmoid, x)?,
                UnaryOp::Sigmoid => {
                    let rest = b.binary(BinaryOp::Sub, one, h)?;
                    b.binary(BinaryOp::Mul, h, rest)?
                }
                UnaryOp::Relu => b.unary(UnaryOp::Step, x)?,
                UnaryOp::Abs => {
                    let positive = b.unary(UnaryOp::Step, x)?;
                    let negated = b.unary(UnaryOp::Neg, x)?;
                    let negative = b.unary(UnaryOp::Step, negated)?;
                    b.binary(BinaryOp::Sub, positive, negative)?
                }
                UnaryOp::Floor | UnaryOp::Not | UnaryOp::Step => return Ok(Vec::new()),
            };
            vec![(x, mul(b, a, derivative)?)]
        }
        ExprKind::Binary { op, lhs, rhs } => match op {
            BinaryOp::Add => vec![(lhs, a), (rhs, a)],
            BinaryOp::Sub if wants(rhs) => vec![(lhs, a), (rhs, b.unary(UnaryOp::Neg, a)?)],
            BinaryOp::Sub => vec![(lhs, a)],
            BinaryOp::Mul => {
                let mut found = Vec::new();
                if wants(lhs) {
                    found.push((lhs, mul(b, a, rhs)?));
                }
                if wants(rhs) {
                    found.push((rhs, mul(b, a, lhs)?));
                }
                found
            }
            BinaryOp::Div => {
                let mut found = vec![(lhs, b.binary(BinaryOp::Div, a, rhs)?)];
                if wants(rhs) {
                    let ratio = b.binary(BinaryOp::Div, h, rhs)?;
                    let to_rhs = mul(b, a, ratio)?;
                    found.push((rhs, b.unary(UnaryOp::Neg, to_rhs)?));
                }
                found
            }
            BinaryOp::Pow => {
                let c = b.constant(rhs).unwrap_or(1.0);
                let reduced = b.constant_expr(c - 1.0);
                let power = b.binary(BinaryOp::Pow, lhs, reduced)?;
                let factor = b.constant_expr(c);
                let derivative = b.binary(BinaryOp::Mul, factor, power)?;
                vec![(lhs, mul(b, a, derivative)?)]
            }
            BinaryOp::Min | BinaryOp::Max => {
                // `apply` takes the right operand only when it is strictly smaller (larger).
                let cmp = if op == BinaryOp::Min {
                    BinaryOp::Lt
                } else {
                    BinaryOp::Gt
                };
                let right_wins = b.binary(cmp, rhs, lhs)?;
                let mut found = vec![(lhs, b.select(right_wins, zero, a)?)];
                if wants(rhs) {
                    found.push((rhs, b.select(right_wins, a, zero)?));
                }
                found
            }
            _ => Vec::new(),
        },
        ExprKind::Select {
            cond,
            then,
            otherwise,
        } => {
            vec![
                (then, b.select(cond, a, zero)?),
                (otherwise, b.select(cond, zero, a)?),
            ]
        }
        _ => Vec::new(),
    })
}

/// Reverse mode inside one per-member (or per-pair) expression: the partial derivatives of
/// `root`, seeded with `seed`, with respect to its leaves. Leaves are matrix entries, the
/// `p`/`q` of a cross body, and the batch or per-anchor values it reads.
pub fn local_gradient(
    b: &mut Builder,
    root: Handle<Expr>,
    seed: Handle<Expr>,
    wants: &dyn Fn(Handle<Expr>) -> bool,
) -> Result<Partials, GradError> {
    let is_local = |b: &Builder, h: Handle<Expr>| {
        matches!(b.expr(h).level, Level::Member { .. } | Level::Cross { .. })
    };
    let is_leaf = |b: &Builder, h: Handle<Expr>| {
        !is_local(b, h)
            || matches!(
                b.expr(h).kind,
                ExprKind::Entry(_) | ExprKind::CrossSide { .. }
            )
    };
    // The interior nodes below the root, found through their operands.
    let mut interior = Vec::new();
    let mut stack = vec![root];
    let mut seen = std::collections::HashSet::new();
    while let Some(h) = stack.pop() {
        if !seen.insert(h) || is_leaf(b, h) {
            continue;
        }
        interior.push(h);
        if let ExprKind::Unary { arg, .. } = b.expr(h).kind {
            stack.push(arg);
        }
        match b.expr(h).kind {
            ExprKind::Binary { lhs, rhs, .. } => stack.extend([lhs, rhs]),
            ExprKind::Select {
                then, otherwise, ..
            } => stack.extend([then, otherwise]),
            _ => {}
        }
    }
    interior.sort_unstable_by(|x, y| y.cmp(x));
    let mut adjoints: HashMap<Handle<Expr>, Handle<Expr>> = HashMap::new();
    let mut leaves: Vec<(Handle<Expr>, Handle<Expr>)> = Vec::new();
    let add = |b: &mut Builder,
               map: &mut HashMap<Handle<Expr>, Handle<Expr>>,
               target,
               value|
     -> Result<(), GradError> {
        let sum = match map.get(&target) {
            Some(&existing) => b.binary(BinaryOp::Add, existing, value)?,
            None => value,
        };
        map.insert(target, sum);
        Ok(())
    };
    if is_leaf(b, root) {
        return Ok(vec![(root, seed)]);
    }
    add(b, &mut adjoints, root, seed)?;
    for h in interior {
        let Some(&a) = adjoints.get(&h) else { continue };
        for (operand, contribution) in partials(b, h, a, wants)? {
            if b.constant(contribution) == Some(0.0) {
                continue;
            }
            add(b, &mut adjoints, operand, contribution)?;
        }
    }
    let mut keys: Vec<Handle<Expr>> = adjoints
        .keys()
        .copied()
        .filter(|&h| is_leaf(b, h))
        .collect();
    keys.sort_unstable();
    for leaf in keys {
        let gradient_flows = match b.expr(leaf).kind {
            ExprKind::Entry(_) | ExprKind::CrossSide { .. } => true,
            ExprKind::Const(_) | ExprKind::Bool(_) | ExprKind::Stop(_) => false,
            _ => b.expr(leaf).ty != Type::Bool,
        };
        if gradient_flows {
            leaves.push((leaf, adjoints[&leaf]));
        }
    }
    Ok(leaves)
}
