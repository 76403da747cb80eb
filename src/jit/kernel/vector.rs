//! Loops over members a vector at a time: four f32 (two f64) members per iteration, the
//! member expression evaluated in SIMD lanes (the transcendental functions with the
//! vector polynomials of `jit::math`), the rest of the set in a scalar tail.
//!
//! Only expressions made of arithmetic, comparisons, selections and the math functions on
//! matrix entries and per-anchor values are vectorised; a member expression that reads
//! labels, indices or group sizes keeps the scalar loop.

use super::{At, Gen, Repr, Result, SoftmaxRow, Status, internal};
use crate::grad::{Scatter, ScatterTarget};
use crate::ir::*;
use crate::jit::constants::LoopBase;
use crate::jit::math::EXP_BOUNDED_MAX;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, F64, F64X2, I8, I8X16, I32, I32X4, I64, I64X2};
use cranelift_codegen::ir::{
    Endianness, InstBuilder, InstructionData, MemFlagsData, Opcode, Type as ClifType, Value,
    ValueDef,
};
use cranelift_frontend::Variable;
use std::collections::HashMap;

/// Where a vector of members is evaluated: the position of its first member in the set,
/// each lane's column, whether the columns are consecutive (a whole row), which lanes
/// are members (for a masked set), and in a cross set the column of the left member that
/// every lane pairs with.
pub(super) struct VAt {
    first: Value,
    cols: Vec<Value>,
    contiguous: bool,
    mask: Option<Value>,
    space: Space,
    left: Option<Value>,
}

/// What a vector loop computes over a set: its size, or the sum, minimum or maximum of a
/// per-member expression, or a log-sum-exp's sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Fold {
    Count,
    Sum(Handle<Expr>),
    Min(Handle<Expr>),
    Max(Handle<Expr>),
    /// The sum of `exp(body - max)`; with a row buffer `kept`, each member's term is also
    /// stored at its column, and a zero at the other columns of a vector.
    ShiftedExp {
        body: Handle<Expr>,
        max: Value,
        kept: Option<Value>,
    },
    /// The sum of `exp(body - shift)`, `shift` chosen in the loop (see
    /// [`Gen::guessed_exp`]): a log-sum-exp's sum in the loop that finds its maximum.
    GuessedExp {
        body: Handle<Expr>,
        kept: Option<Value>,
        guess: Guess,
    },
}

/// The state of a [`Fold::GuessedExp`]: its shift (minus infinity before the first
/// member), on lanes with the shift plus [`GUESS_REACH`], and whether it moved after terms
/// were summed on it (an `I8`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Guess {
    pub shift: Variable,
    pub lanes: (Variable, Variable),
    pub moved: Variable,
}

/// How far above its shift a [`Fold::GuessedExp`] lets a member be before it moves the
/// shift: as far as the bounded exponential goes. `e^40` times the members of a row stays
/// far below f32's largest value, and a shift at or below the maximum loses no term that
/// counts (the maximum's term is at least 1).
pub(super) const GUESS_REACH: f64 = EXP_BOUNDED_MAX;

impl Fold {
    fn identity(self) -> f64 {
        match self {
            Fold::Count | Fold::Sum(_) | Fold::ShiftedExp { .. } | Fold::GuessedExp { .. } => 0.0,
            Fold::Min(_) => f64::INFINITY,
            Fold::Max(_) => f64::NEG_INFINITY,
        }
    }

    pub(super) fn body(self) -> Option<Handle<Expr>> {
        match self {
            Fold::Count => None,
            Fold::Sum(h)
            | Fold::Min(h)
            | Fold::Max(h)
            | Fold::ShiftedExp { body: h, .. }
            | Fold::GuessedExp { body: h, .. } => Some(h),
        }
    }
}

/// A fold in a loop: over every member, or (`Some(condition)`) over the members that also
/// meet one more condition: a reduction over a subset taken in its parent set's loop.
pub(super) type Guarded = (Fold, Option<Handle<Expr>>);

/// The left member of a cross set whose pairs a vector loop visits, the pairs' conditions
/// and space.
struct Pairs<'p> {
    left: Value,
    preds: &'p [Handle<Expr>],
    space: Space,
}

/// What the vector part of a loop over a masked row does with the lanes that are not
/// members.
#[derive(Clone, Copy, PartialEq)]
enum NonMembers {
    /// Masked out.
    Mask,
    /// Masked out, and a vector with no member skipped: worth a branch that mispredicts
    /// where members and others mix when the body is costly.
    Skip,
    /// Visited like members (the body adds nothing at them).
    Visit,
}

/// A scatter in a vector loop: `weight` added into the adjoint row `grad_row` at each
/// member, or at a pair's left or right member.
#[derive(Clone, Copy)]
pub(super) struct LaneScatter {
    pub weight: Handle<Expr>,
    /// How the loop computes the weight.
    pub term: WeightTerm,
    pub grad_row: Value,
    pub side: Option<Side>,
}

/// How a scatter's loop computes a weight `c · core`, `c` the product of the per-anchor
/// factors at the top of the weight's tree (and the scatter's row scale, when its loop
/// applies it): with `c` known before the loop, one multiplication per vector where the
/// tree took one per factor.
#[derive(Clone, Copy)]
pub(super) enum WeightTerm {
    /// The weight's tree, times the row scale if there is one.
    Tree { row_scale: Option<Value> },
    /// `core` times `coefficient` (`c`).
    Scaled {
        core: Handle<Expr>,
        coefficient: Value,
    },
    /// `core` is the softmax `exp(z - lse(set, z))` over the scatter's own set: the
    /// entry of the log-sum-exp's buffer (`exp(z - max)`, kept in `row`) times
    /// `coefficient` (`c / sum`).
    Softmax { row: SoftmaxRow, coefficient: Value },
}

/// What a [`WeightTerm`] reads per member.
enum TermRead {
    Expr(Handle<Expr>),
    /// The entry of a softmax buffer.
    Kept(Value),
}

impl WeightTerm {
    /// What the term reads per member, and the per-anchor factor it multiplies that by.
    fn parts(self, weight: Handle<Expr>) -> (TermRead, Option<Value>) {
        match self {
            WeightTerm::Tree { row_scale } => (TermRead::Expr(weight), row_scale),
            WeightTerm::Scaled { core, coefficient } => (TermRead::Expr(core), Some(coefficient)),
            WeightTerm::Softmax { row, coefficient } => {
                (TermRead::Kept(row.buffer), Some(coefficient))
            }
        }
    }
}

impl Gen<'_, '_> {
    pub(super) fn lanes(&self) -> usize {
        if self.float == F32 { 4 } else { 2 }
    }

    pub(super) fn vector_type(&self) -> ClifType {
        if self.float == F32 { F32X4 } else { F64X2 }
    }

    fn vector_flags() -> MemFlagsData {
        // Rows are aligned to one float, not to a vector.
        MemFlagsData::new().with_notrap()
    }

    /// [`Self::vector_flags`] for lanes of what no kernel writes (see [`Gen::input_flags`]).
    fn vector_input_flags() -> MemFlagsData {
        Self::vector_flags().with_readonly().with_can_move()
    }

    /// Whether `h`, evaluated per member, can be evaluated on lanes.
    pub(super) fn vectorizable(&self, h: Handle<Expr>, contiguous: bool) -> bool {
        let e = &self.module.exprs[h];
        if !matches!(e.level, Level::Member { .. } | Level::Cross { .. }) {
            // Per-anchor and batch values are splatted.
            return matches!(e.ty, Type::Num | Type::Bool);
        }
        match &e.kind {
            ExprKind::Entry(_) => true,
            ExprKind::Same
            | ExprKind::IsSelf
            | ExprKind::Index(_)
            | ExprKind::GroupSize {
                axis: Axis::Col, ..
            } => contiguous,
            // The anchor's own group's size, on every lane.
            ExprKind::GroupSize {
                axis: Axis::Row, ..
            } => true,
            // The left member is one per inner loop: its values are computed once, splatted.
            ExprKind::CrossSide {
                side: Side::Left, ..
            } => true,
            ExprKind::CrossSide {
                side: Side::Right,
                value,
            } => self.vectorizable(*value, contiguous),
            ExprKind::Unary { arg, .. } | ExprKind::Stop(arg) => {
                self.vectorizable(*arg, contiguous)
            }
            ExprKind::Binary { op, lhs, rhs } => {
                // Comparing two conditions would need masks compared: not worth it.
                let bools = self.module.exprs[*lhs].ty == Type::Bool;
                !(bools && matches!(op, BinaryOp::Eq | BinaryOp::Ne))
                    && self.vectorizable(*lhs, contiguous)
                    && self.vectorizable(*rhs, contiguous)
            }
            ExprKind::Select {
                cond,
                then,
                otherwise,
            } => {
                self.vectorizable(*cond, contiguous)
                    && self.vectorizable(*then, contiguous)
                    && self.vectorizable(*otherwise, contiguous)
            }
            _ => false,
        }
    }

    /// Whether a per-member expression costs more than a few instructions a lane: it calls
    /// a transcendental function or divides.
    pub(super) fn costly(&self, h: Handle<Expr>) -> bool {
        let e = &self.module.exprs[h];
        if !matches!(e.level, Level::Member { .. } | Level::Cross { .. }) {
            return false;
        }
        match &e.kind {
            ExprKind::Unary {
                op:
                    UnaryOp::Exp
                    | UnaryOp::Log
                    | UnaryOp::Log1p
                    | UnaryOp::Softplus
                    | UnaryOp::Sigmoid
                    | UnaryOp::Sqrt,
                ..
            }
            | ExprKind::Binary {
                op: BinaryOp::Div | BinaryOp::Pow,
                ..
            } => true,
            kind => crate::ir::expr_refs(kind).into_iter().any(|n| match n {
                Node::Expr(x) => self.costly(x),
                Node::Set(_) => false,
            }),
        }
    }

    /// Whether a loop over `repr` can evaluate `h` on lanes.
    pub(super) fn lanes_can_read(&self, repr: &Repr, h: Handle<Expr>) -> bool {
        self.lanes_can_visit(repr) && self.vectorizable(h, !matches!(repr, Repr::List { .. }))
    }

    /// Whether the members of `repr` can be visited a vector at a time: its conditions
    /// evaluate on lanes; a cross set's right side is visited so, for each left member.
    pub(super) fn lanes_can_visit(&self, repr: &Repr) -> bool {
        match repr {
            Repr::Range { .. } | Repr::List { .. } => true,
            Repr::Masked { preds, .. } => preds.iter().all(|&p| self.vectorizable(p, true)),
            Repr::Cross { right, preds, .. } => {
                let contiguous = !matches!(**right, Repr::List { .. });
                !matches!(**right, Repr::Cross { .. })
                    && self.lanes_can_visit(right)
                    && preds.iter().all(|&p| self.vectorizable(p, contiguous))
            }
        }
    }

    /// The integer vector type of lane masks.
    fn mask_type(&self) -> ClifType {
        if self.float == F32 { I32X4 } else { I64X2 }
    }

    /// The columns of a contiguous vector, as a vector of lane integers.
    fn column_vector(&mut self, first: Value) -> Value {
        let ty = self.mask_type();
        let lane = ty.lane_type();
        // (0, 1, 2, ...): a constant, hoisted out of the loop.
        let zero = self.b.ins().iconst(lane, 0);
        let mut iota = self.b.ins().splat(ty, zero);
        for l in 1..self.lanes() {
            let c = self.b.ins().iconst(lane, l as i64);
            iota = self.b.ins().insertlane(iota, c, l as u8);
        }
        let first = self.splat_int(first);
        self.b.ins().iadd(first, iota)
    }

    /// The columns of a vector's lanes, as a vector of lane integers.
    fn lane_columns(&mut self, at: &VAt) -> Value {
        if at.contiguous {
            return self.column_vector(at.first);
        }
        let ty = self.mask_type();
        let zero = self.b.ins().iconst(I64, 0);
        let mut v = self.splat_int(zero);
        for (lane, &col) in at.cols.iter().enumerate() {
            let col = if ty.lane_type() == I32 {
                self.b.ins().ireduce(I32, col)
            } else {
                col
            };
            v = self.b.ins().insertlane(v, col, lane as u8);
        }
        v
    }

    /// A scalar i64 splatted to the mask type.
    fn splat_int(&mut self, x: Value) -> Value {
        let ty = self.mask_type();
        let x = if ty.lane_type() == I32 {
            self.b.ins().ireduce(I32, x)
        } else {
            x
        };
        self.b.ins().splat(ty, x)
    }

    /// The class ids of the columns `first..first + lanes` of a domain.
    fn id_vector(&mut self, domain: Domain, first: Value) -> Value {
        let offset = self.b.ins().imul_imm_u(first, 4);
        let addr = self.b.ins().iadd(self.ids[&domain], offset);
        if self.float == F32 {
            self.b
                .ins()
                .load(I32X4, Self::vector_input_flags(), addr, 0)
        } else {
            self.b.ins().sload32x2(Self::vector_input_flags(), addr, 0)
        }
    }

    /// The space a per-member expression is evaluated in: its own, or the loop's when it
    /// works in any (`same`, `self`).
    fn member_space(&self, h: Handle<Expr>, at: &VAt) -> Space {
        match self.module.exprs[h].level {
            Level::Member { space, .. } | Level::Cross { space, .. } if space.is_complete() => {
                space
            }
            _ => at.space,
        }
    }

    /// The groups (as lane integers) of the samples `first..first + lanes`.
    fn group_id_vector(&mut self, groups: Handle<Grouping>, first: Value) -> Value {
        let of_sample = self.group_tables[&groups].0;
        self.u32_vector(of_sample, first)
    }

    /// Entries `first..first + lanes` of a padded table of u32, as lane integers.
    fn u32_vector(&mut self, table: Value, first: Value) -> Value {
        let offset = self.b.ins().imul_imm_u(first, 4);
        let addr = self.b.ins().iadd(table, offset);
        if self.float == F32 {
            self.b.ins().load(I32X4, Self::vector_flags(), addr, 0)
        } else {
            self.b.ins().uload32x2(Self::vector_flags(), addr, 0)
        }
    }

    /// `scalar` on every lane. A constant comes from the loop's table like [`Gen::vconst`]'s:
    /// splatted, it would be hoisted to the function's entry and take a register in every
    /// loop (a spill, a reload and a store per iteration where registers run short).
    pub(super) fn splat(&mut self, scalar: Value) -> Value {
        let dfg = &self.b.func.dfg;
        let lane = match dfg.value_def(scalar) {
            ValueDef::Result(inst, _) => match dfg.insts[inst] {
                InstructionData::UnaryIeee32 { imm, .. } => Some(u64::from(imm.bits())),
                InstructionData::UnaryIeee64 { imm, .. } => Some(imm.bits()),
                _ => None,
            },
            _ => None,
        };
        let (ty, constants) = (self.vector_type(), self.constants());
        if let Some(loaded) = lane.and_then(|lane| constants.vector(&mut self.b, ty, lane)) {
            return loaded;
        }
        self.b.ins().splat(ty, scalar)
    }

    pub(super) fn vconst(&mut self, value: f64) -> Value {
        let lane = if self.float == F32 {
            u64::from((value as f32).to_bits())
        } else {
            value.to_bits()
        };
        let (ty, constants) = (self.vector_type(), self.constants());
        if let Some(loaded) = constants.vector(&mut self.b, ty, lane) {
            return loaded;
        }
        let c = self.fconst(value);
        self.splat(c)
    }

    /// `mask ? a : otherwise` lane by lane, `otherwise` a constant. A `+0` fallback (the
    /// identity of sums and counts, the weight of a member left out) is one `and` with the
    /// mask instead of a constant's load and a three-instruction select.
    pub(super) fn vmasked(&mut self, mask: Value, a: Value, otherwise: f64) -> Value {
        if otherwise.to_bits() == 0 {
            let ty = self.vector_type();
            if let Some(complement) = self.complement(mask) {
                // `a & !m` is one `andn`, where the `!m` took two instructions (Cranelift
                // builds its all-ones) and its use an `and`.
                let (ity, flags) = (self.mask_type(), MemFlagsData::new());
                let a = self.b.ins().bitcast(ity, flags, a);
                let kept = self.b.ins().band_not(a, complement);
                return self.b.ins().bitcast(ty, flags, kept);
            }
            let mask = self.b.ins().bitcast(ty, MemFlagsData::new(), mask);
            return self.b.ins().band(mask, a);
        }
        let otherwise = self.vconst(otherwise);
        self.vselect(mask, a, otherwise)
    }

    /// `m` when `mask` is `!m`.
    fn complement(&self, mask: Value) -> Option<Value> {
        let dfg = &self.b.func.dfg;
        match dfg.value_def(mask) {
            ValueDef::Result(inst, _) => match dfg.insts[inst] {
                InstructionData::Unary {
                    opcode: Opcode::Bnot,
                    arg,
                } => Some(arg),
                _ => None,
            },
            _ => None,
        }
    }

    /// `mask ? a : b` lane by lane, `mask` an integer vector of all-ones or zero lanes.
    pub(super) fn vselect(&mut self, mask: Value, a: Value, b: Value) -> Value {
        let ty = self.b.func.dfg.value_type(a);
        if let Some(complement) = self.complement(mask) {
            // `!m ? a : b` is `m ? b : a`: no `!m` to build.
            return self.vselect(complement, b, a);
        }
        if !self.lanes.blend {
            let mask = self.b.ins().bitcast(ty, MemFlagsData::new(), mask);
            return self.b.ins().bitselect(mask, a, b);
        }
        // Cranelift lowers `blendv` on integer lanes only.
        let (ity, flags) = (self.mask_type(), MemFlagsData::new());
        let a = self.b.ins().bitcast(ity, flags, a);
        let b = self.b.ins().bitcast(ity, flags, b);
        let picked = self.b.ins().blendv(mask, a, b);
        self.b.ins().bitcast(ty, flags, picked)
    }

    /// The value of a per-member expression on every lane.
    fn vmember(
        &mut self,
        h: Handle<Expr>,
        at: &VAt,
        cache: &mut HashMap<Handle<Expr>, Value>,
    ) -> Result<Value> {
        if let Some(&v) = cache.get(&h) {
            return Ok(v);
        }
        let e = self.module.exprs[h].clone();
        if !matches!(e.level, Level::Member { .. } | Level::Cross { .. }) {
            let scalar = *self
                .row
                .get(&h)
                .ok_or_else(|| internal(format!("{h} was not prepared before its loop")))?;
            let v = self.splat(scalar);
            cache.insert(h, v);
            return Ok(v);
        }
        if let Some(&row) = self.softmax_reads.get(&h) {
            let kept = self.load_lanes(row.buffer, at, false)?;
            let inverse = self.splat(row.inverse);
            let v = self.b.ins().fmul(kept, inverse);
            cache.insert(h, v);
            return Ok(v);
        }
        let v = match e.kind {
            ExprKind::Entry(m) => {
                let row = self.matrix_row(m)?;
                self.load_lanes(row, at, true)?
            }
            ExprKind::Same => {
                let space = self.member_space(h, at);
                let cols = space
                    .cols
                    .ok_or_else(|| internal("`same` without columns"))?;
                let ids = self.id_vector(cols, at.first);
                let own = self
                    .anchor_id
                    .ok_or_else(|| internal("the anchor's class was not loaded"))?;
                let own = self.b.ins().sextend(I64, own);
                let own = self.splat_int(own);
                self.b.ins().icmp(IntCC::Equal, ids, own)
            }
            ExprKind::IsSelf => {
                let space = self.member_space(h, at);
                let columns = self.column_vector(at.first);
                match (space.rows, space.cols) {
                    (Some(Domain::Groups(g)), Some(Domain::Samples)) => {
                        // Each column's group against the anchor (a group).
                        let groups = self.group_id_vector(g, at.first);
                        let own = self.splat_int(self.anchor);
                        self.b.ins().icmp(IntCC::Equal, groups, own)
                    }
                    (Some(Domain::Samples), Some(Domain::Groups(g))) => {
                        let own = self.group_of(g, self.anchor);
                        let own = self.splat_int(own);
                        self.b.ins().icmp(IntCC::Equal, columns, own)
                    }
                    _ => {
                        let own = self.splat_int(self.anchor);
                        self.b.ins().icmp(IntCC::Equal, columns, own)
                    }
                }
            }
            ExprKind::Index(axis) => {
                let ints = if axis == Axis::Row {
                    self.splat_int(self.anchor)
                } else {
                    self.column_vector(at.first)
                };
                let ty = self.vector_type();
                self.b.ins().fcvt_from_sint(ty, ints)
            }
            ExprKind::GroupSize { groups, axis } => {
                let ints = if axis == Axis::Row {
                    let size = self.group_size(groups, self.anchor);
                    self.splat_int(size)
                } else {
                    let sizes = self.group_tables[&groups].1;
                    self.u32_vector(sizes, at.first)
                };
                let ty = self.vector_type();
                self.b.ins().fcvt_from_sint(ty, ints)
            }
            ExprKind::Unary { op, arg } => {
                let a = self.vmember(arg, at, cache)?;
                self.unary(op, a)
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.vmember(lhs, at, cache)?;
                let b = self.vmember(rhs, at, cache)?;
                let bools = self.module.exprs[lhs].ty == Type::Bool;
                self.binary(op, a, b, bools, rhs)?
            }
            ExprKind::Select {
                cond,
                then,
                otherwise,
            } => {
                let c = self.vmember(cond, at, cache)?;
                let t = self.vmember(then, at, cache)?;
                let o = self.vmember(otherwise, at, cache)?;
                self.vselect(c, t, o)
            }
            ExprKind::Stop(arg) => self.vmember(arg, at, cache)?,
            ExprKind::CrossSide {
                side: Side::Left,
                value,
            } => {
                let j = at.left.ok_or_else(|| internal("`p` outside a cross set"))?;
                let at = At {
                    j,
                    pair: None,
                    space: at.space,
                };
                let x = self.member(value, at, &mut HashMap::new())?;
                self.splat(x)
            }
            ExprKind::CrossSide {
                side: Side::Right,
                value,
            } => self.vmember(value, at, cache)?,
            _ => return Err(internal(format!("{h} cannot be evaluated on lanes"))),
        };
        cache.insert(h, v);
        Ok(v)
    }

    /// The floats of a row (`base`, one per column) at the lanes' columns; `input`: a row
    /// no kernel writes (a pair matrix's).
    fn load_lanes(&mut self, base: Value, at: &VAt, input: bool) -> Result<Value> {
        let ty = self.vector_type();
        let (vector_flags, flags) = if input {
            (Self::vector_input_flags(), Self::input_flags())
        } else {
            (Self::vector_flags(), Self::flags())
        };
        if at.contiguous {
            let offset = self.b.ins().imul_imm_u(at.first, self.fb);
            let addr = self.b.ins().iadd(base, offset);
            if self.lanes.unaligned_operands {
                return Ok(self.b.ins().load(ty, vector_flags, addr, 0));
            }
            // Cranelift 0.135 folds a load into the SSE form of a float compare (`cmpps`),
            // which faults on an address not aligned to 16 bytes; a load reinterpreted is
            // not folded.
            let bits = self.mask_type();
            let loaded = self.b.ins().load(bits, vector_flags, addr, 0);
            return Ok(self.b.ins().bitcast(ty, MemFlagsData::new(), loaded));
        }
        let mut vector = None;
        for (lane, &j) in at.cols.iter().enumerate() {
            let offset = self.b.ins().imul_imm_u(j, self.fb);
            let addr = self.b.ins().iadd(base, offset);
            let x = self.b.ins().load(self.float, flags, addr, 0);
            vector = Some(match vector {
                None => self.b.ins().scalar_to_vector(ty, x),
                Some(v) => self.b.ins().insertlane(v, x, lane as u8),
            });
        }
        vector.ok_or_else(|| internal("a vector of no lanes"))
    }

    /// Whether `set` has no member (an `i8`), from a loop that stops at the first one: a
    /// skip condition's `count(set) == 0` when the count itself can wait for a later loop
    /// (the scatters' loop over the set, say).
    pub(super) fn set_is_empty(&mut self, set: Handle<Set>) -> Result<Value> {
        let repr = self.set_repr(set)?;
        let found = self.b.create_block();
        let done = self.b.create_block();
        let empty = self.b.append_block_param(done, I8);
        let leave_if = |g: &mut Self, any: Value| {
            let next = g.b.create_block();
            g.b.ins().brif(any, found, &[], next, &[]);
            g.b.switch_to_block(next);
        };
        self.each_vector(
            &repr,
            false,
            &mut |g, at| {
                let any = match at.mask {
                    Some(mask) => g.b.ins().vany_true(mask),
                    None => g.b.ins().iconst(I8, 1),
                };
                leave_if(g, any);
                Ok(())
            },
            &mut |g, _| {
                // The scalar visit reaches members only.
                let member = g.b.ins().iconst(I8, 1);
                leave_if(g, member);
                Ok(())
            },
        )?;
        let yes = self.b.ins().iconst(I8, 1);
        self.b.ins().jump(done, &[yes.into()]);
        self.b.switch_to_block(found);
        let no = self.b.ins().iconst(I8, 0);
        self.b.ins().jump(done, &[no.into()]);
        self.b.switch_to_block(done);
        Ok(empty)
    }

    /// Multiplies the anchor's row of `scatter`'s adjoint slot by the per-anchor `factor`
    /// that the weights of its scatters left out. An entry no scatter reached stays zero,
    /// as the weights would have left it (`0 * inf` would not).
    pub(super) fn scale_row(&mut self, scatter: &Scatter, factor: Handle<Expr>) -> Result<()> {
        let set = match scatter.target {
            ScatterTarget::Members { set, .. } | ScatterTarget::Cross { set, .. } => set,
            ScatterTarget::At { .. } => return Err(internal("a row scale on a chosen member")),
        };
        let (SetShape::Members(space) | SetShape::Cross(space)) = self.module.sets[set].shape
        else {
            return Err(internal(format!("{set} is not a set of pair members")));
        };
        let cols = space
            .cols
            .ok_or_else(|| internal(format!("{set} has no column domain")))?;
        let cols = self.domain_len(cols);
        let grad_row = self.grad_row(scatter);
        let factor = self.row(factor)?;
        let scaled = |g: &mut Self, v: Value, factor: Value| {
            let product = g.b.ins().fmul(v, factor);
            let zero = g.float_like(v, 0.0);
            let reached = g.b.ins().fcmp(FloatCC::NotEqual, v, zero);
            g.select_like(reached, product, zero)
        };
        self.each_vector(
            &Repr::Range { cols, space },
            false,
            &mut |g, at| {
                let v = g.load_lanes(grad_row, at, false)?;
                let factor = g.splat(factor);
                let v = scaled(g, v, factor);
                g.store_lanes(grad_row, at, v);
                Ok(())
            },
            &mut |g, at| {
                let offset = g.b.ins().imul_imm_u(at.j, g.fb);
                let addr = g.b.ins().iadd(grad_row, offset);
                let v = g.b.ins().load(g.float, Self::flags(), addr, 0);
                let v = scaled(g, v, factor);
                g.b.ins().store(Self::flags(), v, addr, 0);
                Ok(())
            },
        )
    }

    /// Stores the lanes of `v` into a row (`base`, one float per column) at their columns.
    fn store_lanes(&mut self, base: Value, at: &VAt, v: Value) {
        if at.contiguous {
            let offset = self.b.ins().imul_imm_u(at.first, self.fb);
            let addr = self.b.ins().iadd(base, offset);
            self.b.ins().store(Self::vector_flags(), v, addr, 0);
            return;
        }
        for (lane, &j) in at.cols.iter().enumerate() {
            let x = self.b.ins().extractlane(v, lane as u8);
            let offset = self.b.ins().imul_imm_u(j, self.fb);
            let addr = self.b.ins().iadd(base, offset);
            self.b.ins().store(Self::flags(), x, addr, 0);
        }
    }

    /// A loop over the members of a whole row or an index list, `lanes` at a time, then the
    /// remaining members one at a time. A cross set is a scalar loop over its left side and
    /// such a loop over its right side for each left member.
    ///
    /// With `skip_empty`, a vector of which no lane is a member skips `vector` (see
    /// [`NonMembers::Skip`]).
    pub(super) fn each_vector(
        &mut self,
        repr: &Repr,
        skip_empty: bool,
        vector: &mut dyn FnMut(&mut Self, &VAt) -> Result<()>,
        scalar: &mut dyn FnMut(&mut Self, At) -> Result<()>,
    ) -> Result<()> {
        let mut left_done = |_: &mut Self, _: Value| Ok(());
        let others = if skip_empty {
            NonMembers::Skip
        } else {
            NonMembers::Mask
        };
        self.each_vector_by_left(repr, others, vector, scalar, &mut left_done)
    }

    /// [`Self::each_vector`], with `left_done(g, p)` emitted after the pairs of each left
    /// member `p` of a cross set.
    fn each_vector_by_left(
        &mut self,
        repr: &Repr,
        others: NonMembers,
        vector: &mut dyn FnMut(&mut Self, &VAt) -> Result<()>,
        scalar: &mut dyn FnMut(&mut Self, At) -> Result<()>,
        left_done: &mut dyn FnMut(&mut Self, Value) -> Result<()>,
    ) -> Result<()> {
        let Repr::Cross {
            left,
            right,
            preds,
            space,
        } = repr
        else {
            return self.vector_members(repr, None, others, vector, scalar);
        };
        let (right, preds, space) = ((**right).clone(), preds.clone(), *space);
        let listed = self.compacts_pairs(&right, &preds, others);
        self.each(left, &mut |g, outer| {
            let pairs = Pairs {
                left: outer.j,
                preds: &preds,
                space,
            };
            match listed {
                Some(list) => {
                    let members = g.pair_list(&right, pairs, list)?;
                    let pairs = Pairs {
                        left: outer.j,
                        preds: &[],
                        space,
                    };
                    g.vector_members(&members, Some(pairs), NonMembers::Mask, vector, scalar)?;
                }
                None => g.vector_members(&right, Some(pairs), others, vector, scalar)?,
            }
            left_done(g, outer.j)
        })
    }

    /// A list buffer for the right members of a cross set's pairs, when a loop whose body
    /// is costly (`others` is [`NonMembers::Skip`]) visits the pairs that meet conditions
    /// the lanes can test: the members that meet them are written out first for each left
    /// member, so that the body runs on full vectors of pairs, not on every vector with
    /// one. (triplet keeps about one pair in eight.)
    fn compacts_pairs(
        &mut self,
        right: &Repr,
        preds: &[Handle<Expr>],
        others: NonMembers,
    ) -> Option<Value> {
        let own = match right {
            Repr::Masked { preds, .. } => preds.as_slice(),
            _ => &[],
        };
        let all: Vec<Handle<Expr>> = own.iter().chain(preds).copied().collect();
        let space = match right {
            Repr::Range { space, .. } | Repr::Masked { space, .. } => *space,
            _ => return None,
        };
        let compacts = others == NonMembers::Skip
            && !preds.is_empty()
            && self.can_compact_on_lanes(right, &all, None)
            && !all.iter().any(|&p| self.costly(p));
        compacts.then(|| self.new_list(space.cols.unwrap_or(Domain::Samples)))
    }

    /// The right members of `right` that meet its own conditions and the pairs' with the
    /// left member of `pairs`, written to `list`.
    fn pair_list(&mut self, right: &Repr, pairs: Pairs<'_>, list: Value) -> Result<Repr> {
        let space = match right {
            Repr::Range { space, .. } | Repr::Masked { space, .. } => *space,
            _ => return Err(internal("a pair list over a set that is not a row")),
        };
        let len = self.b.declare_var(I64);
        let zero = self.b.ins().iconst(I64, 0);
        self.b.def_var(len, zero);
        self.vector_members(
            right,
            Some(pairs),
            NonMembers::Mask,
            &mut |g, at| g.compact_lanes(at, &[], list, None, len),
            &mut |g, at| {
                g.append_index(list, len, at.pair.map_or(at.j, |(_, q)| q), None);
                Ok(())
            },
        )?;
        let len = self.b.use_var(len);
        Ok(Repr::List {
            ptr: list,
            len,
            space,
        })
    }

    /// [`Self::each_vector`] over a set that is not a cross set, or over the right side of
    /// a cross set for one left member.
    fn vector_members(
        &mut self,
        repr: &Repr,
        pairs: Option<Pairs<'_>>,
        others: NonMembers,
        vector: &mut dyn FnMut(&mut Self, &VAt) -> Result<()>,
        scalar: &mut dyn FnMut(&mut Self, At) -> Result<()>,
    ) -> Result<()> {
        let lanes = self.lanes();
        let (n, list, own_space, own_preds) = match repr {
            Repr::Range { cols, space } => (*cols, None, *space, Vec::new()),
            Repr::Masked { cols, preds, space } => (*cols, None, *space, preds.clone()),
            Repr::List { ptr, len, space } => (*len, Some(*ptr), *space, Vec::new()),
            Repr::Cross { .. } => return Err(internal("a cross set inside a cross set")),
        };
        let left = pairs.as_ref().map(|p| p.left);
        // The set's own conditions are on its member; a cross set's, on the pair.
        let (space, pair_preds) = match &pairs {
            Some(pairs) => (pairs.space, pairs.preds.to_vec()),
            None => (own_space, Vec::new()),
        };
        let preds: Vec<Handle<Expr>> = match others {
            NonMembers::Visit => Vec::new(),
            NonMembers::Mask | NonMembers::Skip => {
                own_preds.iter().chain(&pair_preds).copied().collect()
            }
        };
        let full = self.b.ins().band_imm_s(n, -(lanes as i64));
        // Vectors before the set's first member column have no member: when such vectors
        // are skipped anyway, the loop starts after them. (A masked loop may write every
        // column it visits.)
        let start = match (list, others) {
            (None, NonMembers::Skip) => self.first_column(&own_preds, lanes as i64),
            _ => self.b.ins().iconst(I64, 0),
        };
        let base = LoopBase::before_loop(&mut self.b, self.constants);
        let outer_base = self.lane_base;
        self.range_loop(start, full, lanes as i64, &mut |g, k| {
            g.lane_base = Some(base.in_iteration(&mut g.b));
            let mut cols = Vec::with_capacity(lanes);
            for lane in 0..lanes {
                let position = g.b.ins().iadd_imm_u(k, lane as i64);
                cols.push(match list {
                    Some(ptr) => {
                        let offset = g.b.ins().imul_imm_u(position, 4);
                        let addr = g.b.ins().iadd(ptr, offset);
                        g.b.ins().uload32(Self::flags(), addr, 0)
                    }
                    None => position,
                });
            }
            let mut at = VAt {
                first: k,
                cols,
                contiguous: list.is_none(),
                mask: None,
                space,
                left,
            };
            let mut cache = HashMap::new();
            for &p in &preds {
                let m = g.vmember(p, &at, &mut cache)?;
                at.mask = Some(match at.mask {
                    None => m,
                    Some(all) => g.b.ins().band(all, m),
                });
            }
            let Some(mask) = at.mask.filter(|_| others == NonMembers::Skip) else {
                return vector(g, &at);
            };
            // Mined sets keep few members of a row: a vector without one costs a test, not
            // the member expression (a masked lane changes no sum and no adjoint).
            let any = g.b.ins().vany_true(mask);
            let members = g.b.create_block();
            let after = g.b.create_block();
            g.b.ins().brif(any, members, &[], after, &[]);
            g.b.switch_to_block(members);
            vector(g, &at)?;
            g.b.ins().jump(after, &[]);
            g.b.switch_to_block(after);
            Ok(())
        })?;
        self.lane_base = outer_base;
        self.range_loop(full, n, 1, &mut |g, k| {
            let j = match list {
                Some(ptr) => {
                    let offset = g.b.ins().imul_imm_u(k, 4);
                    let addr = g.b.ins().iadd(ptr, offset);
                    g.b.ins().uload32(Self::flags(), addr, 0)
                }
                None => k,
            };
            let member = At {
                j,
                pair: None,
                space: own_space,
            };
            g.when_all(&own_preds, member, &mut |g| match left {
                Some(p) => {
                    let at = At {
                        j: p,
                        pair: Some((p, j)),
                        space,
                    };
                    g.when_all(&pair_preds, at, &mut |g| scalar(g, at))
                }
                None => scalar(g, member),
            })
        })
    }

    /// Whether [`Self::compact_lanes`] can write out the members of `repr` that meet
    /// `preds` (with `value` per member): four f32 lanes of a row at a time, shuffled
    /// together.
    pub(super) fn can_compact_on_lanes(
        &self,
        repr: &Repr,
        preds: &[Handle<Expr>],
        value: Option<Handle<Expr>>,
    ) -> bool {
        // A whole row, masked or not: a list is short (a class) or would be gathered.
        self.lanes.shuffles
            && self.float == F32
            && matches!(repr, Repr::Range { .. } | Repr::Masked { .. })
            && self.lanes_can_visit(repr)
            && preds
                .iter()
                .chain(&value)
                .all(|&h| self.vectorizable(h, true))
    }

    /// One vector of a compaction: the lanes that are members and meet `preds` have their
    /// column (and `value`, into the second buffer) appended at position `len` of `list`,
    /// shuffled to the front of one unaligned store. The store writes all four lanes: it
    /// never reaches past the columns read so far, which the buffers are as long as.
    pub(super) fn compact_lanes(
        &mut self,
        at: &VAt,
        preds: &[Handle<Expr>],
        list: Value,
        value: Option<(Handle<Expr>, Value)>,
        len: Variable,
    ) -> Result<()> {
        let mut cache = HashMap::new();
        let mut mask = at.mask;
        for &p in preds {
            let m = self.vmember(p, at, &mut cache)?;
            mask = Some(match mask {
                None => m,
                Some(all) => self.b.ins().band(all, m),
            });
        }
        let bits = match mask {
            Some(mask) => self.b.ins().vhigh_bits(I64, mask),
            None => self.b.ins().iconst(I64, 0b1111),
        };
        let control = self
            .constants()
            .vector_at(&mut self.b, I8X16, &compaction_shuffles(), bits)
            .ok_or_else(|| internal("no room for the compaction shuffles"))?;
        let at_len = self.b.use_var(len);
        let offset = self.b.ins().imul_imm_u(at_len, 4);
        let columns = self.lane_columns(at);
        self.store_packed(columns, control, list, offset);
        if let Some((value, buffer)) = value {
            let v = self.vmember(value, at, &mut cache)?;
            self.store_packed(v, control, buffer, offset);
        }
        let kept = self.b.ins().popcnt(bits);
        let next = self.b.ins().iadd(at_len, kept);
        self.b.def_var(len, next);
        Ok(())
    }

    /// The 16 bytes of `v` shuffled by `control` (whose unused bytes are `0x80`), stored at
    /// `base + offset`.
    fn store_packed(&mut self, v: Value, control: Value, base: Value, offset: Value) {
        let little = MemFlagsData::new().with_endianness(Endianness::Little);
        let bytes = self.b.ins().bitcast(I8X16, little, v);
        let packed = if self.lanes.pshufb {
            self.b.ins().x86_pshufb(bytes, control)
        } else {
            self.b.ins().swizzle(bytes, control)
        };
        let addr = self.b.ins().iadd(base, offset);
        self.b.ins().store(Self::vector_flags(), packed, addr, 0);
    }

    /// Whether [`Self::rank_over_row`] can rank the members of `repr` by `value`.
    pub(super) fn ranks_over_row(&self, repr: &Repr, value: Handle<Expr>) -> bool {
        matches!(repr, Repr::Range { .. } | Repr::Masked { .. })
            && self.lanes_can_visit(repr)
            && self.vectorizable(value, true)
    }

    /// The value of rank `k` (ascending) among the members of a whole row (`repr`, a range
    /// or a masked row), by `value`. The row is written out whole, `+inf` in place of each
    /// column that is not a member: a plain store per vector, where writing out the members
    /// alone (as [`Gen::fill`] does for the other helpers) shuffles every vector, and that
    /// loop took two fifths of knn_softmax's kernel. The fillers rank after every member
    /// but `+inf` and NaN ones: an `+inf` ties and is the same value, and a NaN (which would
    /// rank after them) makes the helper fail, which is flagged for the interpreter, as is a
    /// rank beyond the members.
    pub(super) fn rank_over_row(
        &mut self,
        repr: &Repr,
        value: Handle<Expr>,
        k: Value,
    ) -> Result<Value> {
        let (Repr::Range { cols, .. } | Repr::Masked { cols, .. }) = *repr else {
            return Err(internal("a row ranked on lanes that is not a row"));
        };
        self.prepare(value)?;
        let values = self.values_arg;
        let filler = self.fconst(f64::INFINITY);
        // The scalar tail visits members only: its other columns are filled first.
        let lanes = self.lanes() as i64;
        let full = self.b.ins().band_imm_s(cols, -lanes);
        self.range_loop(full, cols, 1, &mut |g, j| {
            let offset = g.b.ins().imul_imm_u(j, g.fb);
            let addr = g.b.ins().iadd(values, offset);
            g.b.ins().store(Self::flags(), filler, addr, 0);
            Ok(())
        })?;
        let count = self.b.declare_var(I64);
        let zero = self.b.ins().iconst(I64, 0);
        self.b.def_var(count, zero);
        self.each_vector(
            repr,
            false,
            &mut |g, at| {
                let v = g.vmember(value, at, &mut HashMap::new())?;
                let (stored, members) = match at.mask {
                    Some(mask) => {
                        let stored = g.vmasked(mask, v, f64::INFINITY);
                        let bits = g.b.ins().vhigh_bits(I64, mask);
                        (stored, g.b.ins().popcnt(bits))
                    }
                    None => (v, g.b.ins().iconst(I64, lanes)),
                };
                g.store_lanes(values, at, stored);
                let so_far = g.b.use_var(count);
                let so_far = g.b.ins().iadd(so_far, members);
                g.b.def_var(count, so_far);
                Ok(())
            },
            &mut |g, at| {
                let v = g.member(value, at, &mut HashMap::new())?;
                let offset = g.b.ins().imul_imm_u(at.j, g.fb);
                let addr = g.b.ins().iadd(values, offset);
                g.b.ins().store(Self::flags(), v, addr, 0);
                let so_far = g.b.use_var(count);
                let so_far = g.b.ins().iadd_imm_u(so_far, 1);
                g.b.def_var(count, so_far);
                Ok(())
            },
        )?;
        let call = self.b.ins().call(self.helpers.rank, &[values, cols, k]);
        let position = self.b.inst_results(call)[0];
        let count = self.b.use_var(count);
        let count = self.b.ins().fcvt_from_uint(F64, count);
        let beyond = self
            .b
            .ins()
            .fcmp(FloatCC::UnorderedOrGreaterThanOrEqual, k, count);
        let missing = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, position, 0);
        let bad = self.b.ins().bor(missing, beyond);
        self.flag(Status::RANK, bad);
        let safe = self.b.ins().select(bad, zero, position);
        let offset = self.b.ins().imul_imm_u(safe, self.fb);
        let addr = self.b.ins().iadd(values, offset);
        Ok(self.b.ins().load(self.float, Self::flags(), addr, 0))
    }

    /// `acc <- combine(acc, map(body))` over every member of `repr`, on lanes then in the
    /// tail; returns the reduced scalar. `map` and `combine` take values of either width.
    pub(super) fn vector_reduce(
        &mut self,
        repr: &Repr,
        body: Handle<Expr>,
        start: f64,
        map: &dyn Fn(&mut Self, Value) -> Value,
        combine: &dyn Fn(&mut Self, Value, Value) -> Value,
    ) -> Result<Value> {
        let vty = self.vector_type();
        let vacc = self.b.declare_var(vty);
        let init = self.vconst(start);
        self.b.def_var(vacc, init);
        let acc = self.b.declare_var(self.float);
        let init = self.fconst(start);
        self.b.def_var(acc, init);
        let skip_empty = self.costly(body);
        self.each_vector(
            repr,
            skip_empty,
            &mut |g, at| {
                let v = g.vmember(body, at, &mut HashMap::new())?;
                let mut v = map(g, v);
                if let Some(mask) = at.mask {
                    v = g.vmasked(mask, v, start);
                }
                let current = g.b.use_var(vacc);
                let next = combine(g, current, v);
                g.b.def_var(vacc, next);
                Ok(())
            },
            &mut |g, at| {
                let v = g.member(body, at, &mut HashMap::new())?;
                let v = map(g, v);
                let current = g.b.use_var(acc);
                let next = combine(g, current, v);
                g.b.def_var(acc, next);
                Ok(())
            },
        )?;
        // Lanes first, in order, then the tail.
        let lanes = self.b.use_var(vacc);
        let mut total = None;
        for lane in 0..self.lanes() {
            let x = self.b.ins().extractlane(lanes, lane as u8);
            total = Some(match total {
                None => x,
                Some(t) => combine(self, t, x),
            });
        }
        let tail = self.b.use_var(acc);
        let total = total.ok_or_else(|| internal("a vector of no lanes"))?;
        Ok(combine(self, total, tail))
    }

    /// Whether [`Self::vector_loop`] skips the vectors with no member: when what it
    /// computes per member is costly.
    pub(super) fn skips_empty(&self, folds: &[Guarded], scatters: &[LaneScatter]) -> bool {
        folds
            .iter()
            .filter_map(|(f, _)| f.body())
            .chain(scatters.iter().filter_map(|s| match s.term {
                WeightTerm::Tree { .. } => Some(s.weight),
                WeightTerm::Scaled { core, .. } => Some(core),
                WeightTerm::Softmax { .. } => None,
            }))
            .any(|h| self.costly(h))
    }

    /// One loop over the members of `repr` that computes each of `folds` (each over the
    /// members that meet its condition, if any) and adds the weight of each of `scatters`
    /// into its adjoint row. Returns the folds' results, each
    /// combined as [`Self::vector_reduce`] does (lanes in order, then the tail); a count as
    /// an i64.
    ///
    /// Without `mask_lanes`, the vectors of a masked row are not masked: every lane's
    /// weight is added (the caller knows it to be zero off the set). The scalar tail still
    /// visits the members only.
    pub(super) fn vector_loop(
        &mut self,
        repr: &Repr,
        folds: &[Guarded],
        scatters: &[LaneScatter],
        mask_lanes: bool,
    ) -> Result<Vec<Value>> {
        let vty = self.vector_type();
        let mut accumulators = Vec::with_capacity(folds.len());
        for (fold, _) in folds {
            let lanes = self.b.declare_var(vty);
            let start = self.vconst(fold.identity());
            self.b.def_var(lanes, start);
            let tail = self.b.declare_var(self.float);
            let start = self.fconst(fold.identity());
            self.b.def_var(tail, start);
            let nan_lanes = matches!(fold, Fold::Min(_) | Fold::Max(_)).then(|| {
                let nan_lanes = self.b.declare_var(self.mask_type());
                let none = self.b.ins().iconst(I64, 0);
                let none = self.splat_int(none);
                self.b.def_var(nan_lanes, none);
                nan_lanes
            });
            accumulators.push((lanes, tail, nan_lanes));
        }
        let add = |g: &mut Self, grad_row: Value, col: Value, w: Value| {
            let offset = g.b.ins().imul_imm_u(col, g.fb);
            let addr = g.b.ins().iadd(grad_row, offset);
            let old = g.b.ins().load(g.float, Self::flags(), addr, 0);
            let new = g.b.ins().fadd(old, w);
            g.b.ins().store(Self::flags(), new, addr, 0);
        };
        let others = if !mask_lanes {
            NonMembers::Visit
        } else if self.skips_empty(folds, scatters) {
            NonMembers::Skip
        } else {
            NonMembers::Mask
        };
        // A left-side scatter's weights all go to the left member of the pairs: they are
        // summed on lanes (and in the tail) over its pairs and added to its column once.
        let mut at_left = Vec::new();
        for (k, scatter) in scatters.iter().enumerate() {
            if scatter.side == Some(Side::Left) {
                let (lanes, tail) = (self.b.declare_var(vty), self.b.declare_var(self.float));
                at_left.push((k, lanes, tail));
            }
        }
        if !at_left.is_empty() && !matches!(repr, Repr::Cross { .. }) {
            return Err(internal("`p` outside a cross set"));
        }
        let left_sums = |g: &mut Self| {
            for &(_, lanes, tail) in &at_left {
                let zero = g.vconst(0.0);
                g.b.def_var(lanes, zero);
                let zero = g.fconst(0.0);
                g.b.def_var(tail, zero);
            }
        };
        left_sums(self);
        let left_of = |k: usize| {
            at_left
                .iter()
                .find(|&&(at, _, _)| at == k)
                .map(|&(_, l, t)| (l, t))
        };
        self.each_vector_by_left(
            repr,
            others,
            &mut |g, at| {
                // One cache for the whole body: what the folds and the weights share is
                // computed once.
                let mut cache = HashMap::new();
                for ((fold, only), &(lanes, _, nan_lanes)) in folds.iter().zip(&accumulators) {
                    let mut v = match fold.body() {
                        Some(body) => g.vmember(body, at, &mut cache)?,
                        None => g.vconst(1.0),
                    };
                    let only = match only {
                        Some(condition) => Some(g.vmember(*condition, at, &mut cache)?),
                        None => None,
                    };
                    let mut mask = match (at.mask, only) {
                        (Some(a), Some(b)) => Some(g.b.ins().band(a, b)),
                        (a, b) => a.or(b),
                    };
                    let kept;
                    (v, kept) = g.fold_term(*fold, v, mask);
                    if let Some(buffer) = kept {
                        // Masked before it is kept (and summed): see `SoftmaxRow`.
                        if let Some(mask) = mask.take() {
                            v = g.vmasked(mask, v, 0.0);
                        }
                        g.store_lanes(buffer, at, v);
                    }
                    let current = g.b.use_var(lanes);
                    let next = match (*fold, nan_lanes) {
                        (Fold::Min(_) | Fold::Max(_), Some(nan_lanes)) => {
                            let min = matches!(fold, Fold::Min(_));
                            g.lane_extreme(current, v, min, mask, nan_lanes)
                        }
                        _ => g.fold_step(*fold, current, v, mask),
                    };
                    g.b.def_var(lanes, next);
                }
                for (k, scatter) in scatters.iter().enumerate() {
                    let mut w = g.vweight(scatter, at, &mut cache)?;
                    if let Some(mask) = at.mask {
                        w = g.vmasked(mask, w, 0.0);
                    }
                    if let Some((lanes, _)) = left_of(k) {
                        let sum = g.b.use_var(lanes);
                        let sum = g.b.ins().fadd(sum, w);
                        g.b.def_var(lanes, sum);
                    } else if at.contiguous {
                        let offset = g.b.ins().imul_imm_u(at.first, g.fb);
                        let addr = g.b.ins().iadd(scatter.grad_row, offset);
                        let old = g.b.ins().load(vty, Self::vector_flags(), addr, 0);
                        let new = g.b.ins().fadd(old, w);
                        g.b.ins().store(Self::vector_flags(), new, addr, 0);
                    } else {
                        for (lane, &col) in at.cols.iter().enumerate() {
                            let x = g.b.ins().extractlane(w, lane as u8);
                            add(g, scatter.grad_row, col, x);
                        }
                    }
                }
                Ok(())
            },
            &mut |g, at| {
                let mut cache = HashMap::new();
                for (&(fold, only), &(_, tail, _)) in folds.iter().zip(&accumulators) {
                    match only {
                        // What is computed under the condition is not shared: it would not
                        // dominate the rest of the body.
                        Some(condition) => g.when_all(&[condition], at, &mut |g| {
                            g.fold_member(fold, tail, at, &mut HashMap::new())
                        })?,
                        None => g.fold_member(fold, tail, at, &mut cache)?,
                    }
                }
                for (k, scatter) in scatters.iter().enumerate() {
                    let w = g.tail_weight(scatter, at, &mut cache)?;
                    if let Some((_, tail)) = left_of(k) {
                        let sum = g.b.use_var(tail);
                        let sum = g.b.ins().fadd(sum, w);
                        g.b.def_var(tail, sum);
                        continue;
                    }
                    let col = match (scatter.side, at.pair) {
                        (None, _) => at.j,
                        (Some(Side::Left), Some((p, _))) => p,
                        (Some(Side::Right), Some((_, q))) => q,
                        (Some(_), None) => return Err(internal("a pair scatter outside pairs")),
                    };
                    add(g, scatter.grad_row, col, w);
                }
                Ok(())
            },
            &mut |g, p| {
                for &(k, lanes, tail) in &at_left {
                    let lanes = g.b.use_var(lanes);
                    let mut total = g.b.use_var(tail);
                    for lane in 0..g.lanes() {
                        let x = g.b.ins().extractlane(lanes, lane as u8);
                        total = g.b.ins().fadd(total, x);
                    }
                    add(g, scatters[k].grad_row, p, total);
                }
                left_sums(g);
                Ok(())
            },
        )?;
        let mut results = Vec::with_capacity(folds.len());
        for ((fold, _), (lanes, tail, nan_lanes)) in folds.iter().zip(accumulators) {
            let mut lanes = self.b.use_var(lanes);
            if let Some(nan_lanes) = nan_lanes {
                // A lane that met a NaN becomes one (all bits set), as the scalar rule has it.
                let flags = MemFlagsData::new();
                let nan_lanes = self.b.use_var(nan_lanes);
                let ity = self.mask_type();
                let bits = self.b.ins().bitcast(ity, flags, lanes);
                let bits = self.b.ins().bor(bits, nan_lanes);
                lanes = self.b.ins().bitcast(vty, flags, bits);
            }
            let tail = self.b.use_var(tail);
            let parts: Vec<Value> = (0..self.lanes())
                .map(|lane| self.b.ins().extractlane(lanes, lane as u8))
                .chain([tail])
                .collect();
            let result = if *fold == Fold::Count {
                // Each lane's count is exact in the float type; their total need not be.
                let mut total = self.b.ins().iconst(I64, 0);
                for part in parts {
                    let part = self.b.ins().fcvt_to_uint(I64, part);
                    total = self.b.ins().iadd(total, part);
                }
                total
            } else {
                let mut total = parts[0];
                for &part in &parts[1..] {
                    total = self.fold_step(*fold, total, part, None);
                }
                total
            };
            results.push(result);
        }
        Ok(results)
    }

    /// A scatter's weights on the lanes (see [`WeightTerm`]).
    fn vweight(
        &mut self,
        scatter: &LaneScatter,
        at: &VAt,
        cache: &mut HashMap<Handle<Expr>, Value>,
    ) -> Result<Value> {
        let (read, factor) = scatter.term.parts(scatter.weight);
        let v = match read {
            TermRead::Expr(h) => self.vmember(h, at, cache)?,
            TermRead::Kept(buffer) => self.load_lanes(buffer, at, false)?,
        };
        Ok(match factor {
            Some(factor) => {
                let factor = self.splat(factor);
                self.b.ins().fmul(v, factor)
            }
            None => v,
        })
    }

    /// A scatter's weight at one member of its loop's scalar tail (see [`WeightTerm`]).
    fn tail_weight(
        &mut self,
        scatter: &LaneScatter,
        at: At,
        cache: &mut HashMap<Handle<Expr>, Value>,
    ) -> Result<Value> {
        let (read, factor) = scatter.term.parts(scatter.weight);
        let v = match read {
            TermRead::Expr(h) => self.member(h, at, cache)?,
            TermRead::Kept(buffer) => self.kept_term(buffer, at.j),
        };
        Ok(match factor {
            Some(factor) => self.b.ins().fmul(v, factor),
            None => v,
        })
    }

    /// One member's step of a fold into the scalar accumulator `tail`.
    fn fold_member(
        &mut self,
        fold: Fold,
        tail: Variable,
        at: At,
        cache: &mut HashMap<Handle<Expr>, Value>,
    ) -> Result<()> {
        let mut v = match fold.body() {
            Some(body) => self.member(body, at, cache)?,
            None => self.fconst(1.0),
        };
        let kept;
        (v, kept) = self.fold_term(fold, v, None);
        if let Some(buffer) = kept {
            let offset = self.b.ins().imul_imm_u(at.j, self.fb);
            let addr = self.b.ins().iadd(buffer, offset);
            self.b.ins().store(Self::flags(), v, addr, 0);
        }
        let current = self.b.use_var(tail);
        let next = self.fold_step(fold, current, v, None);
        self.b.def_var(tail, next);
        Ok(())
    }

    /// One step of a fold, on values of either width; on vectors, over the lanes `mask`
    /// keeps (all without one).
    fn fold_step(&mut self, fold: Fold, acc: Value, v: Value, mask: Option<Value>) -> Value {
        match fold {
            Fold::Count | Fold::Sum(_) | Fold::ShiftedExp { .. } | Fold::GuessedExp { .. } => {
                let v = match mask {
                    Some(mask) => self.vmasked(mask, v, fold.identity()),
                    None => v,
                };
                self.b.ins().fadd(acc, v)
            }
            Fold::Min(_) => self.extreme_of(acc, v, true, mask),
            Fold::Max(_) => self.extreme_of(acc, v, false, mask),
        }
    }

    /// The column of the first smallest (largest) value of `body` over `repr`, as an i64,
    /// -1 for an empty set: each lane keeps its first best member, then the lanes' bests
    /// are merged (the lower column wins a tie) and the tail's after them.
    pub(super) fn vector_arg_extreme(
        &mut self,
        repr: &Repr,
        body: Handle<Expr>,
        min: bool,
    ) -> Result<Value> {
        let (vty, ity) = (self.vector_type(), self.mask_type());
        let cc = if min {
            FloatCC::LessThan
        } else {
            FloatCC::GreaterThan
        };
        let (best_lanes, chosen_lanes) = (self.b.declare_var(vty), self.b.declare_var(ity));
        let (best_tail, chosen_tail) = (self.b.declare_var(self.float), self.b.declare_var(I64));
        let zero = self.vconst(0.0);
        self.b.def_var(best_lanes, zero);
        let none = self.b.ins().iconst(I64, -1);
        let none_lanes = self.splat_int(none);
        self.b.def_var(chosen_lanes, none_lanes);
        let zero = self.fconst(0.0);
        self.b.def_var(best_tail, zero);
        self.b.def_var(chosen_tail, none);
        self.each_vector(
            repr,
            false,
            &mut |g, at| {
                let v = g.vmember(body, at, &mut HashMap::new())?;
                let (best, chosen) = (g.b.use_var(best_lanes), g.b.use_var(chosen_lanes));
                let better = g.b.ins().fcmp(cc, v, best);
                let better = g.b.ins().bitcast(ity, MemFlagsData::new(), better);
                let zero = g.b.ins().iconst(I64, 0);
                let zero = g.splat_int(zero);
                let first = g.b.ins().icmp(IntCC::SignedLessThan, chosen, zero);
                let mut take = g.b.ins().bor(better, first);
                if let Some(mask) = at.mask {
                    take = g.b.ins().band(take, mask);
                }
                let cols = g.lane_columns(at);
                let best = g.vselect(take, v, best);
                let chosen = g.b.ins().bitselect(take, cols, chosen);
                g.b.def_var(best_lanes, best);
                g.b.def_var(chosen_lanes, chosen);
                Ok(())
            },
            &mut |g, at| g.arg_step(body, at, min, (best_tail, chosen_tail)),
        )?;
        let (best, chosen) = (self.b.use_var(best_lanes), self.b.use_var(chosen_lanes));
        let mut merged: Option<(Value, Value)> = None;
        let lanes: Vec<(Value, Value)> = (0..self.lanes())
            .map(|lane| {
                let v = self.b.ins().extractlane(best, lane as u8);
                let c = self.b.ins().extractlane(chosen, lane as u8);
                let c = if ity.lane_type() == I32 {
                    self.b.ins().sextend(I64, c)
                } else {
                    c
                };
                (v, c)
            })
            .collect();
        let tail = (self.b.use_var(best_tail), self.b.use_var(chosen_tail));
        for (v, c) in lanes.into_iter().chain([tail]) {
            merged = Some(match merged {
                None => (v, c),
                Some((best, chosen)) => {
                    let valid = self
                        .b
                        .ins()
                        .icmp_imm_s(IntCC::SignedGreaterThanOrEqual, c, 0);
                    let unset = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, chosen, 0);
                    let better = self.b.ins().fcmp(cc, v, best);
                    let equal = self.b.ins().fcmp(FloatCC::Equal, v, best);
                    let lower = self.b.ins().icmp(IntCC::SignedLessThan, c, chosen);
                    let tie = self.b.ins().band(equal, lower);
                    let wins = self.b.ins().bor(better, tie);
                    let wins = self.b.ins().bor(wins, unset);
                    let take = self.b.ins().band(valid, wins);
                    let v = self.b.ins().select(take, v, best);
                    let c = self.b.ins().select(take, c, chosen);
                    (v, c)
                }
            });
        }
        merged
            .map(|(_, chosen)| chosen)
            .ok_or_else(|| internal("a vector of no lanes"))
    }

    /// One step of a minimum (or maximum) on lanes, `acc` where `mask` (if any) leaves a lane
    /// out. The result is the rule of [`Self::extreme_of`] split in two: the lanes' extremes
    /// ignoring NaNs, one `minps` (`maxps`) after `acc` (a NaN member leaves it as it is, an
    /// equal one too), and the lanes that met a NaN, or-ed into `nan_lanes`. The
    /// accumulator's chain from one iteration to the next is then one instruction where the
    /// rule's compare, or, and and blend took twice its latency.
    fn lane_extreme(
        &mut self,
        acc: Value,
        v: Value,
        min: bool,
        mask: Option<Value>,
        nan_lanes: Variable,
    ) -> Value {
        let identity = if min {
            f64::INFINITY
        } else {
            f64::NEG_INFINITY
        };
        let v = match mask {
            Some(mask) => self.vmasked(mask, v, identity),
            None => v,
        };
        let nan = self.b.ins().fcmp(FloatCC::Unordered, v, v);
        let seen = self.b.use_var(nan_lanes);
        let seen = self.b.ins().bor(seen, nan);
        self.b.def_var(nan_lanes, seen);
        // The shapes Cranelift lowers to `minps v, acc` and `maxps v, acc`: `v` where it is
        // below (above) `acc`, else `acc`.
        let better = if min {
            self.b.ins().fcmp(FloatCC::LessThan, v, acc)
        } else {
            self.b.ins().fcmp(FloatCC::LessThan, acc, v)
        };
        let ty = self.b.func.dfg.value_type(v);
        let better = self.b.ins().bitcast(ty, MemFlagsData::new(), better);
        self.b.ins().bitselect(better, v, acc)
    }

    /// What `fold` adds up for the members `v` of either width (the lanes `mask` keeps): a
    /// log-sum-exp's shifted exponential, with the row buffer that keeps it, or `v` itself.
    fn fold_term(&mut self, fold: Fold, v: Value, mask: Option<Value>) -> (Value, Option<Value>) {
        match fold {
            Fold::ShiftedExp { max, kept, .. } => {
                let max = if self.b.func.dfg.value_type(v).is_vector() {
                    self.splat(max)
                } else {
                    max
                };
                let shifted = self.b.ins().fsub(v, max);
                let constants = self.constants();
                (self.math.exp_bounded(&mut self.b, shifted, constants), kept)
            }
            Fold::GuessedExp { kept, guess, .. } => (self.guessed_exp(v, mask, guess), kept),
            _ => (v, None),
        }
    }

    /// `exp(z - shift)` for the members `z` of either width (the lanes `mask` keeps), the
    /// shift of `guess` first moved to their largest when one lies more than
    /// [`GUESS_REACH`] above it (or it is the first): a branch the loop rarely takes. The
    /// shift is at most the set's maximum and every term at most `e^GUESS_REACH`; `moved`
    /// records a move after the first, which leaves earlier terms on the old shift.
    pub(super) fn guessed_exp(&mut self, z: Value, mask: Option<Value>, guess: Guess) -> Value {
        let vector = self.b.func.dfg.value_type(z).is_vector();
        let members = match mask {
            Some(mask) => self.vmasked(mask, z, f64::NEG_INFINITY),
            None => z,
        };
        let reach = self.fconst(GUESS_REACH);
        let above = if vector {
            let limit = self.b.use_var(guess.lanes.1);
            let lanes = self.b.ins().fcmp(FloatCC::GreaterThan, members, limit);
            self.b.ins().vany_true(lanes)
        } else {
            let shift = self.b.use_var(guess.shift);
            let limit = self.b.ins().fadd(shift, reach);
            self.b.ins().fcmp(FloatCC::GreaterThan, members, limit)
        };
        let (moving, after) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(above, moving, &[], after, &[]);
        self.b.switch_to_block(moving);
        let largest = if vector {
            let lanes = (0..self.lanes()).map(|lane| self.b.ins().extractlane(members, lane as u8));
            let lanes: Vec<Value> = lanes.collect();
            (lanes[1..].iter()).fold(lanes[0], |top, &x| self.b.ins().fmax(top, x))
        } else {
            members
        };
        let shift = self.b.use_var(guess.shift);
        let none = self.fconst(f64::NEG_INFINITY);
        let summed = self.b.ins().fcmp(FloatCC::GreaterThan, shift, none);
        let moved = self.b.use_var(guess.moved);
        let moved = self.b.ins().bor(moved, summed);
        self.b.def_var(guess.moved, moved);
        self.b.def_var(guess.shift, largest);
        let limit = self.b.ins().fadd(largest, reach);
        let (largest, limit) = (self.splat(largest), self.splat(limit));
        self.b.def_var(guess.lanes.0, largest);
        self.b.def_var(guess.lanes.1, limit);
        self.b.ins().jump(after, &[]);
        self.b.switch_to_block(after);
        let shift = if vector {
            self.b.use_var(guess.lanes.0)
        } else {
            self.b.use_var(guess.shift)
        };
        let shifted = self.b.ins().fsub(z, shift);
        let constants = self.constants();
        self.math.exp_bounded(&mut self.b, shifted, constants)
    }

    /// `min` (or `max`) of two values of either width, keeping a NaN: the rule of the scalar
    /// loops, lane by lane; on vectors, `acc` where `mask` (if any) leaves a lane out.
    fn extreme_of(&mut self, acc: Value, v: Value, min: bool, mask: Option<Value>) -> Value {
        let cc = if min {
            FloatCC::LessThan
        } else {
            FloatCC::GreaterThan
        };
        let better = self.b.ins().fcmp(cc, v, acc);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, v, v);
        let mut take = self.b.ins().bor(better, nan);
        if let Some(mask) = mask {
            take = self.b.ins().band(take, mask);
        }
        if self.b.func.dfg.value_type(v).is_vector() {
            self.vselect(take, v, acc)
        } else {
            self.b.ins().select(take, v, acc)
        }
    }
}

/// Per mask of four lanes (bit `l` set when lane `l` is kept): the byte shuffle that moves
/// the kept 4-byte lanes, in order, to the front.
fn compaction_shuffles() -> Vec<[u8; 16]> {
    (0..16u8)
        .map(|mask| {
            let mut control = [0x80; 16];
            let kept = (0..4u8).filter(|lane| mask >> lane & 1 == 1);
            for (to, from) in kept.enumerate() {
                for byte in 0..4 {
                    control[4 * to + byte as usize] = 4 * from + byte;
                }
            }
            control
        })
        .collect()
}
