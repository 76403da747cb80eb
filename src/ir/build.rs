//! Constructing IR nodes: interning (so equal expressions share one handle), level and
//! type inference, and constant folding. Lowering and the gradient pass both build through
//! this, so every node in a module went through the same checks.

use super::*;
use std::collections::HashMap;

/// Why two values cannot be combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Row values of two different `per anchor` blocks.
    Blocks,
    /// Per-member values of matrices with different rows or columns.
    Spaces,
    /// A per-member value inside a cross body, where only `p` and `q` name members.
    MemberInCross,
    /// Operand types that do not fit the operation.
    Types,
}

/// Appends nodes to a module, interning sets and expressions.
pub struct Builder {
    pub module: Module,
    exprs: HashMap<ExprKind, Handle<Expr>>,
    sets: HashMap<(SetKind, Handle<Expr>), Handle<Set>>,
}

impl Builder {
    pub fn new(module: Module) -> Builder {
        let exprs = module
            .exprs
            .iter()
            .map(|(h, e)| (e.kind.clone(), h))
            .collect();
        let sets = module
            .sets
            .iter()
            .map(|(h, s)| ((s.kind.clone(), s.value), h))
            .collect();
        Builder {
            module,
            exprs,
            sets,
        }
    }

    pub fn finish(self) -> Module {
        self.module
    }

    pub fn expr(&self, handle: Handle<Expr>) -> &Expr {
        &self.module.exprs[handle]
    }

    pub fn set(&self, handle: Handle<Set>) -> &Set {
        &self.module.sets[handle]
    }

    /// The constant value of an expression, if it has one.
    pub fn constant(&self, handle: Handle<Expr>) -> Option<f64> {
        match self.module.exprs[handle].kind {
            ExprKind::Const(Real(value)) => Some(value),
            _ => None,
        }
    }

    /// Interns a node whose type and level the caller vouches for (a rewrite's copy).
    pub(crate) fn intern_raw(&mut self, kind: ExprKind, ty: Type, level: Level) -> Handle<Expr> {
        self.intern(kind, ty, level)
    }

    fn intern(&mut self, kind: ExprKind, ty: Type, level: Level) -> Handle<Expr> {
        if let Some(&handle) = self.exprs.get(&kind) {
            return handle;
        }
        let handle = self.module.exprs.append(Expr {
            kind: kind.clone(),
            ty,
            level,
        });
        self.module.order.push(Node::Expr(handle));
        self.exprs.insert(kind, handle);
        handle
    }

    // ---- leaves --------------------------------------------------------------------------

    pub fn constant_expr(&mut self, value: f64) -> Handle<Expr> {
        // -0.0 and 0.0 fold to one constant.
        let value = if value == 0.0 { 0.0 } else { value };
        self.intern(ExprKind::Const(Real(value)), Type::Num, Level::Const)
    }

    pub fn batch_size(&mut self) -> Handle<Expr> {
        self.intern(ExprKind::BatchSize, Type::Num, Level::Batch)
    }

    pub fn entry(&mut self, matrix: Handle<Matrix>) -> Handle<Expr> {
        let space = self.module.space_of(matrix);
        self.intern(
            ExprKind::Entry(matrix),
            Type::Num,
            Level::Member { space, block: None },
        )
    }

    pub fn same(&mut self) -> Handle<Expr> {
        self.intern(
            ExprKind::Same,
            Type::Bool,
            Level::Member {
                space: Space::ANY,
                block: None,
            },
        )
    }

    pub fn is_self(&mut self) -> Handle<Expr> {
        self.intern(
            ExprKind::IsSelf,
            Type::Bool,
            Level::Member {
                space: Space::ANY,
                block: None,
            },
        )
    }

    pub fn index(&mut self, axis: Axis) -> Handle<Expr> {
        self.intern(
            ExprKind::Index(axis),
            Type::Num,
            Level::Member {
                space: Space::ANY,
                block: None,
            },
        )
    }

    pub fn group_size(&mut self, groups: Handle<Grouping>, axis: Axis) -> Handle<Expr> {
        let domain = Some(Domain::Groups(groups));
        let space = match axis {
            Axis::Row => Space {
                rows: domain,
                cols: None,
            },
            Axis::Col => Space {
                rows: None,
                cols: domain,
            },
        };
        self.intern(
            ExprKind::GroupSize { groups, axis },
            Type::Num,
            Level::Member { space, block: None },
        )
    }

    /// `p` or `q`: a member value of one side of the cross set in `block`.
    pub fn cross_side(
        &mut self,
        side: Side,
        value: Handle<Expr>,
        block: Handle<Block>,
    ) -> Result<Handle<Expr>, Conflict> {
        let e = self.expr(value);
        if e.level == Level::Const {
            return Ok(value);
        }
        let (ty, space) = match e.level {
            Level::Member { space, block: b } if b.is_none() || b == Some(block) => (e.ty, space),
            Level::Const | Level::Batch => (e.ty, Space::ANY),
            Level::Row(b) if b == block => (e.ty, Space::ANY),
            _ => return Err(Conflict::Blocks),
        };
        Ok(self.intern(
            ExprKind::CrossSide { side, value },
            ty,
            Level::Cross { space, block },
        ))
    }

    // ---- operations ----------------------------------------------------------------------

    /// The level of a value combining values of these levels.
    pub fn combine(a: Level, b: Level) -> Result<Level, Conflict> {
        use Level::*;
        fn blocks(
            a: Option<Handle<Block>>,
            b: Option<Handle<Block>>,
        ) -> Result<Option<Handle<Block>>, Conflict> {
            match (a, b) {
                (Some(x), Some(y)) if x != y => Err(Conflict::Blocks),
                (x, y) => Ok(x.or(y)),
            }
        }
        Ok(match (a, b) {
            (Const, x) | (x, Const) => x,
            (Batch, x) | (x, Batch) => x,
            (Row(x), Row(y)) => Row(blocks(Some(x), Some(y))?.unwrap_or(x)),
            (Row(r), Member { space, block }) | (Member { space, block }, Row(r)) => Member {
                space,
                block: blocks(Some(r), block)?,
            },
            (Row(r), Cross { space, block }) | (Cross { space, block }, Row(r)) => Cross {
                space,
                block: blocks(Some(r), Some(block))?.unwrap_or(block),
            },
            (
                Member {
                    space: s1,
                    block: b1,
                },
                Member {
                    space: s2,
                    block: b2,
                },
            ) => Member {
                space: s1.unify(s2).ok_or(Conflict::Spaces)?,
                block: blocks(b1, b2)?,
            },
            (
                Cross {
                    space: s1,
                    block: b1,
                },
                Cross {
                    space: s2,
                    block: b2,
                },
            ) => Cross {
                space: s1.unify(s2).ok_or(Conflict::Spaces)?,
                block: blocks(Some(b1), Some(b2))?.unwrap_or(b1),
            },
            (Member { .. }, Cross { .. }) | (Cross { .. }, Member { .. }) => {
                return Err(Conflict::MemberInCross);
            }
        })
    }

    pub fn unary(&mut self, op: UnaryOp, arg: Handle<Expr>) -> Result<Handle<Expr>, Conflict> {
        let a = self.expr(arg).clone();
        let ty = match (op, a.ty) {
            (UnaryOp::Not, Type::Bool) => Type::Bool,
            (UnaryOp::Not, _) | (_, Type::Bool | Type::Index) => return Err(Conflict::Types),
            (_, ty) => ty,
        };
        if let ExprKind::Const(Real(value)) = a.kind {
            return Ok(self.constant_typed(op.apply(value), ty));
        }
        // Algebra that keeps printed IR small: --x = x, !!b = b.
        if let ExprKind::Unary {
            op: inner,
            arg: inner_arg,
        } = a.kind
            && inner == op
            && matches!(op, UnaryOp::Neg | UnaryOp::Not)
        {
            return Ok(inner_arg);
        }
        Ok(self.intern(ExprKind::Unary { op, arg }, ty, a.level))
    }

    fn constant_typed(&mut self, value: f64, ty: Type) -> Handle<Expr> {
        match ty {
            Type::Bool => self.bool_const(value != 0.0),
            _ => self.constant_expr(value),
        }
    }

    /// The value of a boolean constant, if the expression is one.
    pub fn bool_constant(&self, handle: Handle<Expr>) -> Option<bool> {
        match self.expr(handle).kind {
            ExprKind::Bool(value) => Some(value),
            _ => None,
        }
    }

    pub fn binary(
        &mut self,
        op: BinaryOp,
        lhs: Handle<Expr>,
        rhs: Handle<Expr>,
    ) -> Result<Handle<Expr>, Conflict> {
        let a = self.expr(lhs).clone();
        let b = self.expr(rhs).clone();
        let level = Self::combine(a.level, b.level)?;
        let ty = match op {
            BinaryOp::And | BinaryOp::Or => match (a.ty, b.ty) {
                (Type::Bool, Type::Bool) => Type::Bool,
                _ => return Err(Conflict::Types),
            },
            _ if op.is_predicate() => match (a.ty, b.ty) {
                (Type::Num, Type::Num) => Type::Bool,
                (Type::Bool, Type::Bool) if matches!(op, BinaryOp::Eq | BinaryOp::Ne) => Type::Bool,
                _ => return Err(Conflict::Types),
            },
            _ => match (a.ty, b.ty) {
                (Type::Num, Type::Num) => Type::Num,
                (Type::Vector(n), Type::Num) | (Type::Num, Type::Vector(n)) => Type::Vector(n),
                (Type::Vector(n), Type::Vector(m)) if n == m => Type::Vector(n),
                _ => return Err(Conflict::Types),
            },
        };
        // Boolean constants are `c != 0`; fold through their values.
        let value_of = |builder: &Self, h: Handle<Expr>, e: &Expr| match e.ty {
            Type::Bool => builder.bool_constant(h).map(|b| f64::from(u8::from(b))),
            _ => builder.constant(h),
        };
        if let (Some(x), Some(y)) = (value_of(self, lhs, &a), value_of(self, rhs, &b)) {
            return Ok(self.constant_typed(op.apply(x, y), ty));
        }
        if let Some(simpler) = self.simplify(op, lhs, rhs, &a, &b) {
            return Ok(simpler);
        }
        Ok(self.intern(ExprKind::Binary { op, lhs, rhs }, ty, level))
    }

    /// Identities with one constant operand: x + 0, x * 1, x * 0 (of a number), x / 1,
    /// x ^ 1, b and true, b or false...
    fn simplify(
        &mut self,
        op: BinaryOp,
        lhs: Handle<Expr>,
        rhs: Handle<Expr>,
        a: &Expr,
        b: &Expr,
    ) -> Option<Handle<Expr>> {
        let ca = self.constant(lhs).filter(|_| a.ty == Type::Num);
        let cb = self.constant(rhs).filter(|_| b.ty == Type::Num);
        let ba = self.bool_constant(lhs);
        let bb = self.bool_constant(rhs);
        match op {
            BinaryOp::Add if cb == Some(0.0) => Some(lhs),
            BinaryOp::Add if ca == Some(0.0) => Some(rhs),
            BinaryOp::Sub if cb == Some(0.0) => Some(lhs),
            BinaryOp::Mul if cb == Some(1.0) => Some(lhs),
            BinaryOp::Mul if ca == Some(1.0) => Some(rhs),
            BinaryOp::Div if cb == Some(1.0) => Some(lhs),
            BinaryOp::Pow if cb == Some(1.0) => Some(lhs),
            BinaryOp::And if ba == Some(true) => Some(rhs),
            BinaryOp::And if bb == Some(true) => Some(lhs),
            BinaryOp::Or if ba == Some(false) => Some(rhs),
            BinaryOp::Or if bb == Some(false) => Some(lhs),
            BinaryOp::And if ba == Some(false) || bb == Some(false) => Some(self.bool_const(false)),
            BinaryOp::Or if ba == Some(true) || bb == Some(true) => Some(self.bool_const(true)),
            _ => None,
        }
    }

    pub fn bool_const(&mut self, value: bool) -> Handle<Expr> {
        self.intern(ExprKind::Bool(value), Type::Bool, Level::Const)
    }

    pub fn select(
        &mut self,
        cond: Handle<Expr>,
        then: Handle<Expr>,
        otherwise: Handle<Expr>,
    ) -> Result<Handle<Expr>, Conflict> {
        let c = self.expr(cond).clone();
        let t = self.expr(then).clone();
        let o = self.expr(otherwise).clone();
        if c.ty != Type::Bool || t.ty != o.ty {
            return Err(Conflict::Types);
        }
        if let Some(value) = self.bool_constant(cond) {
            return Ok(if value { then } else { otherwise });
        }
        if then == otherwise {
            return Ok(then);
        }
        let level = Self::combine(Self::combine(c.level, t.level)?, o.level)?;
        Ok(self.intern(
            ExprKind::Select {
                cond,
                then,
                otherwise,
            },
            t.ty,
            level,
        ))
    }

    pub fn stop(&mut self, arg: Handle<Expr>) -> Handle<Expr> {
        let a = self.expr(arg).clone();
        match a.kind {
            ExprKind::Const(_) | ExprKind::Stop(_) => arg,
            _ if a.ty == Type::Bool => arg,
            _ => self.intern(ExprKind::Stop(arg), a.ty, a.level),
        }
    }

    /// The level of a reduction's result in `scope`.
    fn scope_level(scope: Scope) -> Level {
        match scope {
            Scope::Row(block) => Level::Row(block),
            Scope::Batch => Level::Batch,
        }
    }

    /// A reduction; the sum of per-anchor vectors is a vector, every other result a number
    /// (the entries of a vector set are numbers).
    pub fn reduce(
        &mut self,
        op: ReduceOp,
        set: Handle<Set>,
        body: Handle<Expr>,
        scope: Scope,
    ) -> Handle<Expr> {
        let ty = match (op, self.expr(body).ty, self.set(set).shape) {
            (ReduceOp::Sum, Type::Vector(n), SetShape::Anchors(_)) => Type::Vector(n),
            _ => Type::Num,
        };
        self.intern(
            ExprKind::Reduce {
                op,
                set,
                body,
                scope,
            },
            ty,
            Self::scope_level(scope),
        )
    }

    pub fn rank(&mut self, set: Handle<Set>, k: Handle<Expr>, scope: Scope) -> Handle<Expr> {
        self.intern(
            ExprKind::Rank { set, k, scope },
            Type::Num,
            Self::scope_level(scope),
        )
    }

    pub fn cut(
        &mut self,
        set: Handle<Set>,
        count: Handle<Expr>,
        largest: bool,
        part: CutPart,
    ) -> Handle<Expr> {
        self.intern(
            ExprKind::Cut {
                set,
                count,
                largest,
                part,
            },
            Type::Num,
            Level::Batch,
        )
    }

    pub fn hist(
        &mut self,
        set: Handle<Set>,
        bins: u32,
        lo: f64,
        hi: f64,
        scope: Scope,
    ) -> Handle<Expr> {
        self.intern(
            ExprKind::Hist {
                set,
                bins,
                lo: Real(lo),
                hi: Real(hi),
                scope,
            },
            Type::Vector(bins),
            Self::scope_level(scope),
        )
    }

    pub fn cumsum(
        &mut self,
        vector: Handle<Expr>,
        reverse: bool,
    ) -> Result<Handle<Expr>, Conflict> {
        let v = self.expr(vector).clone();
        if !matches!(v.ty, Type::Vector(_)) {
            return Err(Conflict::Types);
        }
        let kind = if reverse {
            ExprKind::ReverseCumsum(vector)
        } else {
            ExprKind::Cumsum(vector)
        };
        Ok(self.intern(kind, v.ty, v.level))
    }

    pub fn arg_reduce(
        &mut self,
        op: ArgOp,
        set: Handle<Set>,
        body: Handle<Expr>,
        scope: Scope,
    ) -> Handle<Expr> {
        self.intern(
            ExprKind::ArgReduce {
                op,
                set,
                body,
                scope,
            },
            Type::Index,
            Self::scope_level(scope),
        )
    }

    /// A member value taken at the member `at` chosen by an `ArgReduce`.
    pub fn at(&mut self, value: Handle<Expr>, at: Handle<Expr>) -> Handle<Expr> {
        let ty = self.expr(value).ty;
        let level = self.expr(at).level;
        if let ExprKind::Const(_) = self.expr(value).kind {
            return value;
        }
        self.intern(ExprKind::At { value, at }, ty, level)
    }

    pub fn hist_slope(
        &mut self,
        adjoint: Handle<Expr>,
        value: Handle<Expr>,
        bins: u32,
        lo: f64,
        hi: f64,
    ) -> Handle<Expr> {
        let level = self.expr(value).level;
        self.intern(
            ExprKind::HistSlope {
                adjoint,
                value,
                bins,
                lo: Real(lo),
                hi: Real(hi),
            },
            Type::Num,
            level,
        )
    }

    // ---- sets ----------------------------------------------------------------------------

    pub fn add_set(
        &mut self,
        kind: SetKind,
        value: Handle<Expr>,
        shape: SetShape,
        block: Option<Handle<Block>>,
    ) -> Handle<Set> {
        if let Some(&handle) = self.sets.get(&(kind.clone(), value)) {
            return handle;
        }
        let handle = self.module.sets.append(Set {
            kind: kind.clone(),
            value,
            shape,
            block,
        });
        self.module.order.push(Node::Set(handle));
        self.sets.insert((kind, value), handle);
        handle
    }
}
