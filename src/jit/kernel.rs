//! Code generation for one row pass: the Cranelift function that runs one anchor.
//!
//! The function walks the pass's per-anchor values in dependency order. Batch values are
//! loaded, per-anchor values are computed once in straight-line code, sets become index
//! lists (or stay implicit: a whole row, a cross product), and every reduction is a loop
//! over its set whose body evaluates the per-member expression inline. Skip conditions
//! come first, each guarding the rest. Then the outputs are stored and the scatters add
//! their weights into the anchor's row of each matrix adjoint. Nothing larger than a row
//! is allocated: a triplet set is two nested loops.

use super::CodegenError;
use super::abi::{KernelArgs, RowBuffer, Status, domain_slot};
use super::constants::{ConstantTable, Constants};
use super::math::MathBuilder;
use crate::grad::{Scatter, ScatterTarget};
use crate::ir::*;
use crate::opt::Plan;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F64, I8, I32, I64};
use cranelift_codegen::ir::{
    FuncRef, InstBuilder, MemFlagsData, StackSlot, StackSlotData, StackSlotKind, Type as ClifType,
    Value,
};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, Variable};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::mem::offset_of;

mod fusion;
mod vector;

use vector::{Fold, GUESS_REACH, Guess, LaneScatter, WeightTerm};

/// What the runtime must provide to a pass's kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct PassLayout {
    pub block: Handle<Block>,
    /// The per-anchor values the pass stores, in slot order, with their width (1, or a
    /// histogram's number of nodes).
    pub outputs: Vec<(Handle<Expr>, usize)>,
    /// The row buffers the kernel uses, in slot order.
    pub buffers: Vec<RowBuffer>,
    /// What the slots of the kernel's tables hold.
    pub bindings: Bindings,
}

/// The handles behind the slots of a kernel's tables: slot `k` of its matrix table holds
/// matrix `matrices[k]`, and so on. A kernel numbers what it reads from 0, in the order it
/// reads it, so that the kernels of passes that differ only in what they read (a loss
/// applied to one branch and to the next) are the same function, compiled once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bindings {
    pub matrices: Vec<Handle<Matrix>>,
    /// Batch-level numbers and conditions.
    pub batch: Vec<Handle<Expr>>,
    /// Per-anchor numbers an earlier pass over the block stored.
    pub stored: Vec<Handle<Expr>>,
    /// Batch-level vectors.
    pub vectors: Vec<Handle<Expr>>,
    /// Adjoint slots ([`Plan::slots`]).
    pub slots: Vec<usize>,
}

/// The slot of `item` in `bound`, given the next one when it has none yet.
fn bind<T: PartialEq + Copy>(bound: &mut Vec<T>, item: T) -> usize {
    bound.iter().position(|&x| x == item).unwrap_or_else(|| {
        bound.push(item);
        bound.len() - 1
    })
}

/// The helper functions imported into the function being built.
#[derive(Debug, Clone, Copy)]
pub struct Helpers {
    pub union: FuncRef,
    pub extreme: FuncRef,
    pub rank: FuncRef,
    pub sample: FuncRef,
}

/// What the code is generated for: the machine's math routines and configuration, the
/// float type, the imported helpers and the build's table of vector constants.
#[derive(Clone, Copy)]
pub struct Machine<'t> {
    pub math: MathBuilder,
    pub float: ClifType,
    pub helpers: Helpers,
    pub target: TargetFrontendConfig,
    /// Where the vector loops of the build's kernels read their constants.
    pub constants: &'t RefCell<ConstantTable>,
    /// What the loops may do on lanes beyond Cranelift's portable instructions.
    pub lanes: LaneOps,
}

/// The target's lane instructions that Cranelift offers beyond its portable set.
#[derive(Clone, Copy, Debug)]
pub struct LaneOps {
    /// Bytes of a vector shuffled by a vector of indices (`swizzle`; x86-64: SSSE3).
    pub shuffles: bool,
    /// The shuffle as x86's `pshufb`: an index with its top bit set gives a zero, where
    /// `swizzle` first saturates every index (one more instruction).
    pub pshufb: bool,
    /// A select on each lane's top bit in one instruction (`blendv`; x86-64: SSE4.1),
    /// where `bitselect` takes three.
    pub blend: bool,
    /// Any instruction may read an operand from an unaligned address (x86-64: AVX).
    pub unaligned_operands: bool,
}

/// How a set is visited.
#[derive(Debug, Clone)]
enum Repr {
    /// Every column of the row.
    Range { cols: Value, space: Space },
    /// An index list in a buffer.
    List {
        ptr: Value,
        len: Value,
        space: Space,
    },
    /// The columns of the row for which every condition holds, tested where the set is
    /// read: a dense set is read contiguously, a vector at a time, under a lane mask.
    Masked {
        cols: Value,
        preds: Vec<Handle<Expr>>,
        space: Space,
    },
    /// Every pair of members of two sets that meets the conditions.
    Cross {
        left: Box<Repr>,
        right: Box<Repr>,
        preds: Vec<Handle<Expr>>,
        space: Space,
    },
}

/// Where a per-member expression is evaluated: column `j`, or the pair (p, q).
#[derive(Debug, Clone, Copy)]
struct At {
    j: Value,
    pair: Option<(Value, Value)>,
    space: Space,
}

type Result<T> = std::result::Result<T, CodegenError>;

/// A log-sum-exp by its set and its per-member body.
type LseKey = (Handle<Set>, Handle<Expr>);

/// A log-sum-exp over `set` summed in a loop on a guessed shift: its fold, the condition
/// its members meet in the loop, and the loop's sum.
struct GuessedSum {
    set: Handle<Set>,
    fold: Fold,
    condition: Option<Handle<Expr>>,
    total: Value,
}

/// The terms of a log-sum-exp kept for the scatters of its softmax.
#[derive(Clone, Copy)]
struct SoftmaxRow {
    /// `exp(body - max)` per column, zero at the lanes of a vector that are not members.
    buffer: Value,
    /// `1 / sum`.
    inverse: Value,
    /// Whether the loop wrote every column of its whole vectors (a whole row, no vector
    /// skipped): a scatter can then add the buffer's zeros too, without a mask.
    every_column: bool,
}

/// Builds the kernel of one pass over `block`: it stores `outputs` and runs the scatters
/// `effects`. After an earlier pass over the block (`stored` is then what that stored),
/// it loads which anchors are skipped and the per-anchor numbers in `stored`.
pub fn build(
    plan: &Plan,
    block: Handle<Block>,
    outputs: &[Handle<Expr>],
    effects: &[usize],
    stored: Option<&HashSet<Handle<Expr>>>,
    b: FunctionBuilder<'_>,
    machine: &Machine,
) -> Result<PassLayout> {
    let target = machine.target;
    let mut g = Gen::new(plan, block, b, machine);
    g.earlier_pass = stored.is_some();
    g.stored = stored.cloned().unwrap_or_default();
    g.body(outputs, effects)?;
    let layout = PassLayout {
        block,
        outputs: outputs
            .iter()
            .map(|&h| (h, width(&plan.module, h)))
            .collect(),
        buffers: g.buffers.clone(),
        bindings: std::mem::take(&mut g.bindings),
    };
    g.b.seal_all_blocks();
    g.b.finalize(target);
    Ok(layout)
}

/// The adjoint slots of `effects` whose every scatter is among them with the same
/// per-anchor factor: the pass adds the rest of the weights into the anchor's row and
/// scales the row by the factor at the end, so the factor's reductions can join the
/// scatters' loop. (A slot that another pass adds into too has its factor applied to each
/// weight.)
fn deferred_row_scales(plan: &Plan, effects: &[usize]) -> Vec<(usize, Handle<Expr>)> {
    let mut deferred: Vec<(usize, Handle<Expr>)> = effects
        .iter()
        .filter_map(|&effect| {
            let scatter = plan.scatters[effect];
            let factor = scatter.row_scale?;
            let all_here = (plan.scatters.iter().enumerate())
                .filter(|(_, other)| other.slot == scatter.slot)
                .all(|(i, other)| effects.contains(&i) && other.row_scale == Some(factor));
            all_here.then_some((scatter.slot, factor))
        })
        .collect();
    deferred.sort_unstable();
    deferred.dedup();
    deferred
}

/// What a pass over `block` computes: its outputs, the block's skip conditions, and its
/// scatters' weights and positions.
pub fn pass_roots(
    plan: &Plan,
    block: Handle<Block>,
    outputs: &[Handle<Expr>],
    effects: &[usize],
) -> Vec<Handle<Expr>> {
    let mut roots: Vec<Handle<Expr>> = outputs
        .iter()
        .chain(&plan.module.blocks[block].skips)
        .copied()
        .collect();
    for &effect in effects {
        let scatter = plan.scatters[effect];
        roots.push(scatter.weight);
        roots.extend(scatter.row_scale);
        if let ScatterTarget::At { index } = scatter.target {
            roots.push(index);
        }
    }
    roots
}

/// How many values an output stores per anchor.
pub fn width(module: &Module, h: Handle<Expr>) -> usize {
    match module.exprs[h].ty {
        Type::Vector(n) => n as usize,
        _ => 1,
    }
}

struct Gen<'a, 'f> {
    module: &'a Module,
    plan: &'a Plan,
    block: Handle<Block>,
    b: FunctionBuilder<'f>,
    math: MathBuilder,
    float: ClifType,
    /// The size of one float in bytes.
    fb: i64,
    helpers: Helpers,
    args: Value,
    anchor: Value,
    buffers_arg: Value,
    values_arg: Value,
    indices_arg: Value,
    status: Variable,
    /// Batch and per-anchor values computed so far (in straight-line code).
    row: HashMap<Handle<Expr>, Value>,
    /// The values of `row` a loop reads that have a use before it ([`Self::pin`]).
    pinned: HashSet<Value>,
    /// The stack slot those uses store to.
    pin_slot: Option<StackSlot>,
    /// Pointers to batch vectors.
    vectors: HashMap<Handle<Expr>, Value>,
    sets: HashMap<Handle<Set>, Repr>,
    buffers: Vec<RowBuffer>,
    bindings: Bindings,
    matrix_rows: HashMap<Handle<Matrix>, Value>,
    /// Set sizes already counted.
    counts: HashMap<Handle<Set>, Value>,
    /// Masked sets written out as index lists, for the helpers that need one.
    lists_of: HashMap<Handle<Set>, (Value, Value)>,
    /// Per domain: its class ids (i32, padded for vector loads; loaded in the entry block).
    ids: HashMap<Domain, Value>,
    /// The anchor's class id in its block's row domain.
    anchor_id: Option<Value>,
    /// Per domain: its labels (loaded in the entry block).
    labels: HashMap<Domain, Value>,
    /// Per grouping: its group-of-sample and group-size tables.
    group_tables: HashMap<Handle<Grouping>, (Value, Value)>,
    /// The anchor's label in its block's row domain.
    anchor_label: Option<Value>,
    /// When the anchors are samples: the samples of the anchor's class, as an index list
    /// (pointer, length), loaded in the entry block.
    own_class: Option<(Value, Value)>,
    /// What the pass computes: its outputs, skip conditions and scatters' weights and
    /// positions; the reductions they need are the candidates for fused loops.
    roots: Vec<Handle<Expr>>,
    /// Whether an earlier pass went over the block (and recorded its skipped anchors).
    earlier_pass: bool,
    /// Per-anchor numbers an earlier pass stored: loaded, not computed.
    stored: HashSet<Handle<Expr>>,
    /// Means whose sums a loop computed while the skip conditions were: their sum and set.
    pending_means: HashMap<Handle<Expr>, (Value, Handle<Set>)>,
    /// Sums reserved for the loop of a scatter over their set.
    reserved: HashSet<Handle<Expr>>,
    /// The log-sum-exps (set, body) whose `exp(body - lse)` a scatter loop over the set
    /// reads: their loop keeps each member's `exp(body - max)`.
    softmax_wanted: HashSet<LseKey>,
    /// For those computed: their terms per column.
    softmax_rows: HashMap<LseKey, SoftmaxRow>,
    /// The maxima of log-sum-exps that a fused loop computed ahead of their own loop.
    lse_max: HashMap<LseKey, Value>,
    /// In the loop being emitted: the `exp(body - lse)` read from such a buffer.
    softmax_reads: HashMap<Handle<Expr>, SoftmaxRow>,
    /// Whether the skip conditions are being computed (a mean computed then could flag an
    /// empty set of an anchor that is skipped).
    in_skips: bool,
    constants: &'a RefCell<ConstantTable>,
    /// In a vector loop: the base its constants are read relative to.
    lane_base: Option<Value>,
    lanes: LaneOps,
    /// The adjoint slots whose anchor row this pass scales once its scatters are done, by
    /// the per-anchor factor their weights share (see [`deferred_row_scales`]).
    deferred: Vec<(usize, Handle<Expr>)>,
}

fn internal(what: impl Into<String>) -> CodegenError {
    CodegenError::Unsupported(what.into())
}

impl<'a, 'f> Gen<'a, 'f> {
    fn new(
        plan: &'a Plan,
        block: Handle<Block>,
        mut b: FunctionBuilder<'f>,
        machine: &Machine<'a>,
    ) -> Self {
        let Machine {
            math,
            float,
            helpers,
            constants,
            lanes,
            ..
        } = *machine;
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let params = b.block_params(entry).to_vec();
        let status = b.declare_var(I32);
        let zero = b.ins().iconst(I32, 0);
        b.def_var(status, zero);
        Gen {
            module: &plan.module,
            plan,
            block,
            b,
            math,
            float,
            fb: i64::from(float.bytes()),
            helpers,
            args: params[0],
            anchor: params[1],
            buffers_arg: params[2],
            values_arg: params[3],
            indices_arg: params[4],
            status,
            row: HashMap::new(),
            pinned: HashSet::new(),
            pin_slot: None,
            vectors: HashMap::new(),
            sets: HashMap::new(),
            buffers: Vec::new(),
            bindings: Bindings::default(),
            matrix_rows: HashMap::new(),
            lists_of: HashMap::new(),
            counts: HashMap::new(),
            ids: HashMap::new(),
            anchor_id: None,
            labels: HashMap::new(),
            group_tables: HashMap::new(),
            anchor_label: None,
            own_class: None,
            roots: Vec::new(),
            earlier_pass: false,
            stored: HashSet::new(),
            pending_means: HashMap::new(),
            reserved: HashSet::new(),
            softmax_wanted: HashSet::new(),
            softmax_rows: HashMap::new(),
            softmax_reads: HashMap::new(),
            lse_max: HashMap::new(),
            in_skips: false,
            constants,
            lane_base: None,
            lanes,
            deferred: Vec::new(),
        }
    }

    /// Where the code being emitted reads vector constants: inside a vector loop, from the
    /// table relative to the loop's base.
    fn constants(&self) -> Constants<'a> {
        match self.lane_base {
            Some(base) => Constants::Table {
                table: self.constants,
                base,
            },
            None => Constants::Splat,
        }
    }

    fn flags() -> MemFlagsData {
        MemFlagsData::trusted()
    }

    /// The flags of a load from what no kernel writes while the passes run (the pair
    /// matrices, the class ids): the optimiser may merge equal loads and take one whose
    /// address does not change out of a loop (the left member's entry of a cross set, read
    /// once per left member instead of once per vector of right members).
    fn input_flags() -> MemFlagsData {
        Self::flags().with_readonly().with_can_move()
    }

    fn fconst(&mut self, value: f64) -> Value {
        if self.float == F32 {
            self.b.ins().f32const(value as f32)
        } else {
            self.b.ins().f64const(value)
        }
    }

    /// `ptr[index]` of a table of pointers.
    fn load_ptr(&mut self, table: Value, index: usize) -> Value {
        self.b
            .ins()
            .load(I64, Self::flags(), table, (8 * index) as i32)
    }

    fn arg_field(&mut self, offset: usize) -> Value {
        self.b
            .ins()
            .load(I64, Self::flags(), self.args, offset as i32)
    }

    fn flag(&mut self, bit: u32, when: Value) {
        let current = self.b.use_var(self.status);
        let set = self.b.ins().bor_imm_u(current, i64::from(bit));
        let next = self.b.ins().select(when, set, current);
        self.b.def_var(self.status, next);
    }

    /// A number or condition from its f64 in a table the runtime filled.
    fn stored_value(&mut self, v: Value, ty: Type) -> Value {
        if ty == Type::Bool {
            let zero = self.b.ins().f64const(0.0);
            self.b.ins().fcmp(FloatCC::NotEqual, v, zero)
        } else {
            self.narrow(v)
        }
    }

    fn bool_to_float(&mut self, b: Value) -> Value {
        let one = self.fconst(1.0);
        let zero = self.fconst(0.0);
        self.b.ins().select(b, one, zero)
    }

    fn narrow(&mut self, v: Value) -> Value {
        if self.float == F32 {
            self.b.ins().fdemote(F32, v)
        } else {
            v
        }
    }

    fn widen(&mut self, v: Value) -> Value {
        if self.float == F32 {
            self.b.ins().fpromote(F64, v)
        } else {
            v
        }
    }

    fn index_to_float(&mut self, i: Value) -> Value {
        // Indices and counts are far below 2^63: the signed conversion is one instruction,
        // the unsigned one a branch and five more on x86-64.
        self.b.ins().fcvt_from_sint(self.float, i)
    }

    /// How many rows a domain has (i64).
    fn domain_len(&mut self, domain: Domain) -> Value {
        let table = self.arg_field(offset_of!(KernelArgs, domain_len));
        self.b
            .ins()
            .load(I64, Self::flags(), table, (8 * domain_slot(domain)) as i32)
    }

    /// The address of the anchor's row of matrix `m`, computed in the entry block so that
    /// it dominates every loop.
    fn matrix_row(&self, m: Handle<Matrix>) -> Result<Value> {
        self.matrix_rows
            .get(&m)
            .copied()
            .ok_or_else(|| internal(format!("matrix {m} read but not loaded")))
    }

    /// Loads what every loop may read, in the entry block, so that loops do not reload
    /// it and every later block sees it: the anchor's row of each matrix the pass reads or
    /// adds to, each domain's labels and the anchor's own label, each grouping's tables.
    fn load_common(&mut self, effects: &[usize]) {
        let table = self.arg_field(offset_of!(KernelArgs, matrices));
        let read = dependencies(self.module, self.roots.iter().copied().map(Node::Expr))
            .into_iter()
            .filter_map(|h| match self.module.exprs[h].kind {
                ExprKind::Entry(m) => Some(m),
                _ => None,
            });
        let written = effects.iter().map(|&e| self.plan.scatters[e].matrix);
        let mut matrices: Vec<Handle<Matrix>> = read.chain(written).collect();
        matrices.sort_unstable();
        matrices.dedup();
        for m in matrices {
            let slot = bind(&mut self.bindings.matrices, m);
            let base = self.load_ptr(table, slot);
            let row = self.row_address(base, m);
            self.matrix_rows.insert(m, row);
        }
        let labels = self.arg_field(offset_of!(KernelArgs, labels));
        let groups = self.arg_field(offset_of!(KernelArgs, groups));
        let sizes = self.arg_field(offset_of!(KernelArgs, sizes));
        let domains = std::iter::once(Domain::Samples)
            .chain(self.module.groupings.handles().map(Domain::Groups));
        let ids = self.arg_field(offset_of!(KernelArgs, ids));
        for domain in domains {
            let ptr = self.load_ptr(labels, domain_slot(domain));
            self.labels.insert(domain, ptr);
            let ptr = self.load_ptr(ids, domain_slot(domain));
            self.ids.insert(domain, ptr);
        }
        for g in self.module.groupings.handles() {
            let of_sample = self.load_ptr(groups, g.index());
            let size = self.load_ptr(sizes, g.index());
            self.group_tables.insert(g, (of_sample, size));
        }
        let rows = self.module.blocks[self.block].rows;
        let own = self.label(rows, self.anchor);
        self.anchor_label = Some(own);
        let offset = self.b.ins().imul_imm_u(self.anchor, 4);
        let addr = self.b.ins().iadd(self.ids[&rows], offset);
        let id = self.b.ins().load(I32, Self::flags(), addr, 0);
        self.anchor_id = Some(id);
        let classes_known = matches!(
            self.module.groupings.iter().next(),
            Some((_, Grouping::Labels))
        );
        if rows == Domain::Samples && classes_known {
            // A sample's class id is its position among the labels' classes: never negative.
            let starts = self.arg_field(offset_of!(KernelArgs, class_starts));
            let members = self.arg_field(offset_of!(KernelArgs, class_members));
            let class = self.b.ins().uextend(I64, id);
            let offset = self.b.ins().imul_imm_u(class, 4);
            let addr = self.b.ins().iadd(starts, offset);
            let start = self.b.ins().uload32(Self::flags(), addr, 0);
            let end = self.b.ins().uload32(Self::flags(), addr, 4);
            let len = self.b.ins().isub(end, start);
            let offset = self.b.ins().imul_imm_u(start, 4);
            let ptr = self.b.ins().iadd(members, offset);
            self.own_class = Some((ptr, len));
        }
    }

    /// `base + anchor * stride(m) * size of float`.
    fn row_address(&mut self, base: Value, m: Handle<Matrix>) -> Value {
        let strides = self.arg_field(offset_of!(KernelArgs, matrix_strides));
        let slot = bind(&mut self.bindings.matrices, m);
        let stride = self
            .b
            .ins()
            .load(I64, Self::flags(), strides, (8 * slot) as i32);
        self.offset_row(base, stride)
    }

    /// The anchor's row of a row-major table at `base` whose rows are `stride` floats apart.
    fn offset_row(&mut self, base: Value, stride: Value) -> Value {
        let offset = self.b.ins().imul(self.anchor, stride);
        let bytes = self.b.ins().imul_imm_u(offset, self.fb);
        self.b.ins().iadd(base, bytes)
    }

    // ---- the pass --------------------------------------------------------------------------

    fn body(&mut self, outputs: &[Handle<Expr>], effects: &[usize]) -> Result<()> {
        self.roots = pass_roots(self.plan, self.block, outputs, effects);
        self.deferred = deferred_row_scales(self.plan, effects);
        self.load_common(effects);
        let skips = self.module.blocks[self.block].skips.clone();
        let scatter_loops = self.plan_scatter_loops(effects);
        let skipped_ptr = self.arg_field(offset_of!(KernelArgs, skipped));
        let flag_at = self.b.ins().iadd(skipped_ptr, self.anchor);
        let skip_exit = self.b.create_block();
        if self.earlier_pass {
            // The conditions' values were not stored for skipped anchors: their flags were.
            let table = self.arg_field(offset_of!(KernelArgs, was_skipped));
            let addr = self.b.ins().iadd(table, self.anchor);
            let skipped = self.b.ins().load(I8, Self::flags(), addr, 0);
            let next = self.b.create_block();
            self.b.ins().brif(skipped, skip_exit, &[], next, &[]);
            self.b.switch_to_block(next);
        } else {
            self.in_skips = true;
            for &cond in &skips {
                let c = self.row(cond)?;
                let next = self.b.create_block();
                self.b.ins().brif(c, skip_exit, &[], next, &[]);
                self.b.switch_to_block(next);
            }
            self.in_skips = false;
        }
        let zero = self.b.ins().iconst(I8, 0);
        self.b.ins().store(Self::flags(), zero, flag_at, 0);

        // The outputs that need no sum of a scatter loop are stored before the loops, the
        // others after: a value held across a loop takes a register from it.
        let reserved = self.reserved.clone();
        let (early, late): (Vec<_>, Vec<_>) = outputs.iter().enumerate().partition(|&(_, &h)| {
            !dependencies(self.module, [Node::Expr(h)])
                .iter()
                .any(|x| reserved.contains(x))
        });
        self.store_outputs(&early)?;
        let fused = self.emit_scatter_loops(scatter_loops)?;
        self.store_outputs(&late)?;
        for &effect in effects.iter().filter(|e| !fused.contains(e)) {
            self.scatter(effect)?;
        }
        for (slot, factor) in self.deferred.clone() {
            let first = (self.plan.scatters.iter()).find(|s| s.slot == slot);
            let scatter = *first.ok_or_else(|| internal("a scaled slot without its scatters"))?;
            self.scale_row(&scatter, factor)?;
        }
        let status = self.b.use_var(self.status);
        self.b.ins().return_(&[status]);

        self.b.switch_to_block(skip_exit);
        let one = self.b.ins().iconst(I8, 1);
        self.b.ins().store(Self::flags(), one, flag_at, 0);
        let status = self.b.use_var(self.status);
        self.b.ins().return_(&[status]);
        Ok(())
    }

    /// Stores each output (given with its slot) at the anchor's place in its slot.
    fn store_outputs(&mut self, outputs: &[(usize, &Handle<Expr>)]) -> Result<()> {
        let out_table = self.arg_field(offset_of!(KernelArgs, outputs));
        for &(slot, &h) in outputs {
            let base = self.load_ptr(out_table, slot);
            match self.module.exprs[h].kind {
                ExprKind::Hist {
                    set, bins, lo, hi, ..
                } => self.hist_output(base, set, bins, lo.0, hi.0)?,
                _ => {
                    let mut v = self.row(h)?;
                    if self.module.exprs[h].ty == Type::Bool {
                        v = self.bool_to_float(v);
                    }
                    let at = self.b.ins().imul_imm_u(self.anchor, self.fb);
                    let addr = self.b.ins().iadd(base, at);
                    self.b.ins().store(Self::flags(), v, addr, 0);
                }
            }
        }
        Ok(())
    }

    /// Accumulates a per-anchor histogram into its output row.
    fn hist_output(
        &mut self,
        base: Value,
        set: Handle<Set>,
        bins: u32,
        lo: f64,
        hi: f64,
    ) -> Result<()> {
        let repr = self.set_repr(set)?;
        let value = self.module.sets[set].value;
        self.prepare(value)?;
        let row_bytes = i64::from(bins) * self.fb;
        let offset = self.b.ins().imul_imm_u(self.anchor, row_bytes);
        let row = self.b.ins().iadd(base, offset);
        let zero = self.fconst(0.0);
        for k in 0..bins {
            self.b
                .ins()
                .store(Self::flags(), zero, row, (i64::from(k) * self.fb) as i32);
        }
        self.each(&repr, &mut |g, at| {
            let s = g.member(value, at, &mut HashMap::new())?;
            let (node, low, high) = g.hist_weights(s, bins, lo, hi);
            let addr = g.b.ins().imul_imm_u(node, g.fb);
            let addr = g.b.ins().iadd(row, addr);
            for (offset, w) in [(0, low), (g.fb as i32, high)] {
                let old = g.b.ins().load(g.float, Self::flags(), addr, offset);
                let new = g.b.ins().fadd(old, w);
                g.b.ins().store(Self::flags(), new, addr, offset);
            }
            Ok(())
        })
    }

    /// The node (i64) and the two interpolation weights of a histogram value.
    fn hist_weights(&mut self, value: Value, bins: u32, lo: f64, hi: f64) -> (Value, Value, Value) {
        let step = (hi - lo) / (f64::from(bins) - 1.0);
        let lo_v = self.fconst(lo);
        let hi_v = self.fconst(hi);
        let below_lo = self.b.ins().fcmp(FloatCC::LessThan, value, lo_v);
        let s = self.b.ins().select(below_lo, lo_v, value);
        let above_hi = self.b.ins().fcmp(FloatCC::GreaterThan, s, hi_v);
        let s = self.b.ins().select(above_hi, hi_v, s);
        let step_v = self.fconst(step);
        let offset = self.b.ins().fsub(s, lo_v);
        // The node divides, as the interpreter does, so that both pick the same one.
        let scaled = self.b.ins().fdiv(offset, step_v);
        let floored = self.b.ins().floor(scaled);
        let node = self.small_float_to_index(floored);
        let last = self.b.ins().iconst(I64, i64::from(bins) - 2);
        let node = self.b.ins().umin(node, last);
        let node_f = self.index_to_float(node);
        let below = self.b.ins().fmul(node_f, step_v);
        let below = self.b.ins().fadd(lo_v, below);
        let next = self.b.ins().iadd_imm_u(node, 1);
        let next_f = self.index_to_float(next);
        let above = self.b.ins().fmul(next_f, step_v);
        let above = self.b.ins().fadd(lo_v, above);
        // The weights multiply by `1 / step` where they divided: within an ulp, and no
        // division in the loop but the node's.
        let per_step = self.fconst(1.0 / step);
        let low = self.b.ins().fsub(above, s);
        let low = self.b.ins().fmul(low, per_step);
        let high = self.b.ins().fsub(s, below);
        let high = self.b.ins().fmul(high, per_step);
        (node, low, high)
    }

    /// A whole float in `[0, 2^p)` as an i64, through the bits of its sum with `2^p` (`p`
    /// the bits of the significand's fraction): a few instructions where the saturating
    /// conversion branches. Any other input gives some i64 (a NaN, a large one).
    fn small_float_to_index(&mut self, whole: Value) -> Value {
        let (bits_type, significand) = if self.float == F32 {
            (I32, 23)
        } else {
            (I64, 52)
        };
        let magic = self.fconst(2f64.powi(significand));
        let shifted = self.b.ins().fadd(whole, magic);
        let bits = self
            .b
            .ins()
            .bitcast(bits_type, MemFlagsData::new(), shifted);
        let bits = if bits_type == I32 {
            self.b.ins().uextend(I64, bits)
        } else {
            bits
        };
        let magic_bits = if self.float == F32 {
            i64::from((2f32.powi(significand)).to_bits())
        } else {
            2f64.powi(significand).to_bits() as i64
        };
        self.b.ins().iadd_imm_s(bits, -magic_bits)
    }

    /// The set whose emptiness `e` tests (`count(set) == 0`), when the count is left to a
    /// scatter loop that comes later: the test need not count.
    fn emptiness_for_later_count(&self, e: &Expr) -> Option<Handle<Set>> {
        let ExprKind::Binary {
            op: BinaryOp::Eq,
            lhs,
            rhs,
        } = e.kind
        else {
            return None;
        };
        let ExprKind::Reduce {
            op: ReduceOp::Count,
            set,
            ..
        } = self.module.exprs[lhs].kind
        else {
            return None;
        };
        let zero = matches!(self.module.exprs[rhs].kind, ExprKind::Const(Real(c)) if c == 0.0);
        let later = self.reserved.contains(&lhs) && !self.row.contains_key(&lhs);
        (zero && later && !self.counts.contains_key(&set)).then_some(set)
    }

    /// The per-anchor factor of a scatter's weight that its loop applies (one the pass
    /// leaves to the row's scaling is not).
    fn applied_row_scale(&self, effect: usize) -> Option<Handle<Expr>> {
        let scatter = &self.plan.scatters[effect];
        let deferred = self.deferred.iter().any(|&(slot, _)| slot == scatter.slot);
        scatter.row_scale.filter(|_| !deferred)
    }

    /// The value of [`Self::applied_row_scale`], computed before the scatter's loop.
    fn applied_row_scale_value(&mut self, effect: usize) -> Result<Option<Value>> {
        self.applied_row_scale(effect)
            .map(|h| self.row(h))
            .transpose()
    }

    /// What a scatter's loop evaluates for each weight: the weight and the factor it applies.
    fn weight_roots(&self, effect: usize) -> impl Iterator<Item = Handle<Expr>> + use<> {
        [
            Some(self.plan.scatters[effect].weight),
            self.applied_row_scale(effect),
        ]
        .into_iter()
        .flatten()
    }

    /// The anchor's row of the adjoint slot a scatter adds into.
    fn grad_row(&mut self, scatter: &Scatter) -> Value {
        let table = self.arg_field(offset_of!(KernelArgs, grads));
        let slot = bind(&mut self.bindings.slots, scatter.slot);
        let base = self.load_ptr(table, slot);
        let strides = self.arg_field(offset_of!(KernelArgs, grad_strides));
        let stride = self
            .b
            .ins()
            .load(I64, Self::flags(), strides, (8 * slot) as i32);
        self.offset_row(base, stride)
    }

    fn scatter(&mut self, effect: usize) -> Result<()> {
        let scatter = &self.plan.scatters[effect];
        let grad_row = self.grad_row(scatter);
        let weight = scatter.weight;
        let row_scale = self.applied_row_scale_value(effect)?;
        let add = |g: &mut Self, col: Value, w: Value| {
            let w = match row_scale {
                Some(factor) => g.b.ins().fmul(w, factor),
                None => w,
            };
            let offset = g.b.ins().imul_imm_u(col, g.fb);
            let addr = g.b.ins().iadd(grad_row, offset);
            let old = g.b.ins().load(g.float, Self::flags(), addr, 0);
            let new = g.b.ins().fadd(old, w);
            g.b.ins().store(Self::flags(), new, addr, 0);
        };
        match scatter.target {
            ScatterTarget::Members { set, .. } | ScatterTarget::Cross { set, .. } => {
                let side = match scatter.target {
                    ScatterTarget::Cross { side, .. } => Some(side),
                    _ => None,
                };
                let repr = self.set_repr(set)?;
                self.prepare(weight)?;
                if self.lanes_can_read(&repr, weight) {
                    let lane_scatter = LaneScatter {
                        weight,
                        term: WeightTerm::Tree { row_scale },
                        grad_row,
                        side,
                    };
                    return self
                        .vector_loop(&repr, &[], &[lane_scatter], true)
                        .map(|_| ());
                }
                self.each(&repr, &mut |g, at| {
                    let w = g.member(weight, at, &mut HashMap::new())?;
                    let col = match (side, at.pair) {
                        (None, _) => at.j,
                        (Some(Side::Left), Some((p, _))) => p,
                        (Some(Side::Right), Some((_, q))) => q,
                        (Some(_), None) => {
                            return Err(internal("a cross scatter outside a cross set"));
                        }
                    };
                    add(g, col, w);
                    Ok(())
                })
            }
            ScatterTarget::At { index } => {
                let j = self.row(index)?;
                let space = self.arg_space(index)?;
                self.prepare(weight)?;
                let chosen = self.b.create_block();
                let done = self.b.create_block();
                let none = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, j, 0);
                self.b.ins().brif(none, done, &[], chosen, &[]);
                self.b.switch_to_block(chosen);
                let at = At {
                    j,
                    pair: None,
                    space,
                };
                let w = self.member(weight, at, &mut HashMap::new())?;
                add(self, j, w);
                self.b.ins().jump(done, &[]);
                self.b.switch_to_block(done);
                Ok(())
            }
        }
    }

    /// The space of the set an `ArgReduce` chooses from.
    fn arg_space(&self, index: Handle<Expr>) -> Result<Space> {
        match self.module.exprs[index].kind {
            ExprKind::ArgReduce { set, .. } => match self.module.sets[set].shape {
                SetShape::Members(space) => Ok(space),
                _ => Err(internal(
                    "a chosen member of a set that is not of pair members",
                )),
            },
            _ => Err(internal("an index that is not a chosen member")),
        }
    }

    // ---- per-anchor values -----------------------------------------------------------------

    /// Makes every batch or per-anchor value a per-member expression reads available before
    /// a loop over members starts.
    fn prepare(&mut self, h: Handle<Expr>) -> Result<()> {
        let mut stack = vec![h];
        let mut seen = std::collections::HashSet::new();
        while let Some(e) = stack.pop() {
            if !seen.insert(e) {
                continue;
            }
            let expr = &self.module.exprs[e];
            match expr.level {
                Level::Member { .. } | Level::Cross { .. } => {
                    stack.extend(crate::ir::expr_refs(&expr.kind).into_iter().filter_map(
                        |n| match n {
                            Node::Expr(x) => Some(x),
                            Node::Set(_) => None,
                        },
                    ));
                }
                _ if matches!(expr.ty, Type::Vector(_)) => {
                    if !self.vectors.contains_key(&e) {
                        let table = self.arg_field(offset_of!(KernelArgs, vectors));
                        let slot = bind(&mut self.bindings.vectors, e);
                        let ptr = self.load_ptr(table, slot);
                        self.vectors.insert(e, ptr);
                    }
                }
                Level::Const => {
                    self.row(e)?;
                }
                _ => {
                    let v = self.row(e)?;
                    self.pin(v);
                }
            }
        }
        Ok(())
    }

    /// Gives a per-anchor value a later loop reads a use here, before the loop: a store to
    /// a scratch stack slot. Cranelift's egraph places pure arithmetic at its first use and did not
    /// hoist it out of our loops: a row-level sigmoid (two divisions) that only a loop read
    /// was computed in every iteration.
    fn pin(&mut self, v: Value) {
        if !self.pinned.insert(v) {
            return;
        }
        let slot = *self.pin_slot.get_or_insert_with(|| {
            self.b
                .create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 8, 3))
        });
        self.b.ins().stack_store(I64, v, slot, 0);
    }

    /// A batch or per-anchor value, computed once.
    fn row(&mut self, h: Handle<Expr>) -> Result<Value> {
        if let Some(&v) = self.row.get(&h) {
            return Ok(v);
        }
        let e = self.module.exprs[h].clone();
        let v = match e.level {
            Level::Const => match e.kind {
                ExprKind::Const(Real(c)) => self.fconst(c),
                ExprKind::Bool(c) => self.b.ins().iconst(I8, i64::from(c)),
                _ => return Err(internal(format!("constant {h}"))),
            },
            Level::Batch => {
                if matches!(e.ty, Type::Vector(_)) {
                    return Err(internal(format!("vector {h} used as a number")));
                }
                let table = self.arg_field(offset_of!(KernelArgs, batch));
                let slot = bind(&mut self.bindings.batch, h);
                let v = self
                    .b
                    .ins()
                    .load(F64, Self::flags(), table, (8 * slot) as i32);
                self.stored_value(v, e.ty)
            }
            Level::Row(_) if self.stored.contains(&h) => {
                let table = self.arg_field(offset_of!(KernelArgs, stored));
                let slot = bind(&mut self.bindings.stored, h);
                let values = self.load_ptr(table, slot);
                let offset = self.b.ins().imul_imm_u(self.anchor, 8);
                let addr = self.b.ins().iadd(values, offset);
                let v = self.b.ins().load(F64, Self::flags(), addr, 0);
                self.stored_value(v, e.ty)
            }
            Level::Row(_) if self.pending_means.contains_key(&h) => {
                let (total, set) = self.pending_means[&h];
                let repr = self.set_repr(set)?;
                self.finish_sum(ReduceOp::Mean, set, &repr, total)?
            }
            Level::Row(_) => self.row_kind(h, &e)?,
            Level::Member { .. } | Level::Cross { .. } => {
                return Err(internal(format!("per-member {h} needed outside a loop")));
            }
        };
        self.row.insert(h, v);
        Ok(v)
    }

    fn row_kind(&mut self, h: Handle<Expr>, e: &Expr) -> Result<Value> {
        if let Some(set) = self.emptiness_for_later_count(e) {
            return self.set_is_empty(set);
        }
        Ok(match e.kind {
            ExprKind::Unary { op, arg } => {
                let a = self.row(arg)?;
                self.unary(op, a)
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.row(lhs)?;
                let b = self.row(rhs)?;
                let bools = self.module.exprs[lhs].ty == Type::Bool;
                self.binary(op, a, b, bools, rhs)?
            }
            ExprKind::Select {
                cond,
                then,
                otherwise,
            } => {
                let c = self.row(cond)?;
                let t = self.row(then)?;
                let o = self.row(otherwise)?;
                self.b.ins().select(c, t, o)
            }
            ExprKind::Stop(arg) => self.row(arg)?,
            ExprKind::Reduce { op, set, body, .. } => self.reduce(op, set, body)?,
            ExprKind::Rank { set, k, .. } => {
                let (repr, value) = (self.set_repr(set)?, self.module.sets[set].value);
                if self.ranks_over_row(&repr, value) {
                    let k = self.row(k)?;
                    let k = self.widen(k);
                    return self.rank_over_row(&repr, value, k);
                }
                let ((values, _), position, _) = self.rank_position(set, k)?;
                let offset = self.b.ins().imul_imm_u(position, self.fb);
                let addr = self.b.ins().iadd(values, offset);
                self.b.ins().load(self.float, Self::flags(), addr, 0)
            }
            ExprKind::ArgReduce { op, set, body, .. } => self.arg_reduce(op, set, body)?,
            ExprKind::At { value, at } => {
                let j = self.row(at)?;
                let space = self.arg_space(at)?;
                self.prepare(value)?;
                let none = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, j, 0);
                let zero_index = self.b.ins().iconst(I64, 0);
                let safe = self.b.ins().select(none, zero_index, j);
                let v = self.member(
                    value,
                    At {
                        j: safe,
                        pair: None,
                        space,
                    },
                    &mut HashMap::new(),
                )?;
                let zero = self.fconst(0.0);
                self.b.ins().select(none, zero, v)
            }
            _ => return Err(internal(format!("per-anchor {h} of an unexpected kind"))),
        })
    }

    /// The constant `c` in every lane of a value like `like` (a scalar or a vector).
    fn float_like(&mut self, like: Value, c: f64) -> Value {
        if self.b.func.dfg.value_type(like).is_vector() {
            self.vconst(c)
        } else {
            self.fconst(c)
        }
    }

    /// `cond ? x : y` on scalars, or lane by lane on vectors.
    fn select_like(&mut self, cond: Value, x: Value, y: Value) -> Value {
        if self.b.func.dfg.value_type(x).is_vector() {
            self.vselect(cond, x, y)
        } else {
            self.b.ins().select(cond, x, y)
        }
    }

    /// `op` applied to a scalar or, lane by lane, to a vector.
    fn unary(&mut self, op: UnaryOp, a: Value) -> Value {
        let lanes = self.b.func.dfg.value_type(a).is_vector();
        let constants = self.constants();
        match op {
            UnaryOp::Neg => self.b.ins().fneg(a),
            UnaryOp::Not if lanes => self.b.ins().bnot(a),
            UnaryOp::Not => self.b.ins().bxor_imm_u(a, 1),
            UnaryOp::Exp => self.math.exp(&mut self.b, a, constants),
            UnaryOp::Log => self.math.ln(&mut self.b, a, constants),
            UnaryOp::Log1p => self.math.log1p(&mut self.b, a, constants),
            UnaryOp::Softplus => self.math.softplus(&mut self.b, a, constants),
            UnaryOp::Sigmoid => self.math.sigmoid(&mut self.b, a, constants),
            UnaryOp::Sqrt => self.b.ins().sqrt(a),
            UnaryOp::Abs => self.b.ins().fabs(a),
            UnaryOp::Floor => self.b.ins().floor(a),
            UnaryOp::Relu | UnaryOp::Step => {
                let zero = self.float_like(a, 0.0);
                let positive = self.b.ins().fcmp(FloatCC::GreaterThan, a, zero);
                let when = if op == UnaryOp::Relu {
                    a
                } else {
                    self.float_like(a, 1.0)
                };
                self.select_like(positive, when, zero)
            }
        }
    }

    /// A binary operation; `bools` when the operands are booleans (i8); `rhs` is the
    /// exponent's expression for `Pow`.
    /// `op` on two scalars or, lane by lane, two vectors (`bools`: of conditions).
    fn binary(
        &mut self,
        op: BinaryOp,
        a: Value,
        b: Value,
        bools: bool,
        rhs: Handle<Expr>,
    ) -> Result<Value> {
        Ok(match op {
            BinaryOp::Add => self.b.ins().fadd(a, b),
            BinaryOp::Sub => self.b.ins().fsub(a, b),
            BinaryOp::Mul => self.b.ins().fmul(a, b),
            BinaryOp::Div => self.b.ins().fdiv(a, b),
            BinaryOp::Pow => {
                let ExprKind::Const(Real(c)) = self.module.exprs[rhs].kind else {
                    return Err(internal("a power with a variable exponent"));
                };
                self.power(a, c)
            }
            BinaryOp::Min => {
                let smaller = self.b.ins().fcmp(FloatCC::LessThan, b, a);
                self.select_like(smaller, b, a)
            }
            BinaryOp::Max => {
                let larger = self.b.ins().fcmp(FloatCC::GreaterThan, b, a);
                self.select_like(larger, b, a)
            }
            BinaryOp::And => self.b.ins().band(a, b),
            BinaryOp::Or => self.b.ins().bor(a, b),
            BinaryOp::Eq | BinaryOp::Ne if bools => {
                let cc = if op == BinaryOp::Eq {
                    IntCC::Equal
                } else {
                    IntCC::NotEqual
                };
                self.b.ins().icmp(cc, a, b)
            }
            BinaryOp::Lt => self.b.ins().fcmp(FloatCC::LessThan, a, b),
            BinaryOp::Le => self.b.ins().fcmp(FloatCC::LessThanOrEqual, a, b),
            BinaryOp::Gt => self.b.ins().fcmp(FloatCC::GreaterThan, a, b),
            BinaryOp::Ge => self.b.ins().fcmp(FloatCC::GreaterThanOrEqual, a, b),
            BinaryOp::Eq => self.b.ins().fcmp(FloatCC::Equal, a, b),
            BinaryOp::Ne => self.b.ins().fcmp(FloatCC::NotEqual, a, b),
        })
    }

    /// `a ^ c`, on a scalar or on lanes: repeated squaring for a small integer exponent
    /// (as `powi`), else `exp(c ln a)`.
    fn power(&mut self, a: Value, c: f64) -> Value {
        if c == c.trunc() && c.abs() <= 64.0 {
            let mut n = c.abs() as u32;
            let mut result = None;
            let mut base = a;
            while n > 0 {
                if n & 1 == 1 {
                    result = Some(match result {
                        None => base,
                        Some(r) => self.b.ins().fmul(r, base),
                    });
                }
                n >>= 1;
                if n > 0 {
                    base = self.b.ins().fmul(base, base);
                }
            }
            let mut result = match result {
                Some(r) => r,
                None => self.float_like(a, 1.0),
            };
            if c < 0.0 {
                let one = self.float_like(a, 1.0);
                result = self.b.ins().fdiv(one, result);
            }
            result
        } else {
            let constants = self.constants();
            let ln = self.math.ln(&mut self.b, a, constants);
            let c = self.float_like(a, c);
            let scaled = self.b.ins().fmul(c, ln);
            self.math.exp(&mut self.b, scaled, constants)
        }
    }

    // ---- reductions ------------------------------------------------------------------------

    /// The number of members of a set, counted once per kernel.
    fn set_count(&mut self, set: Handle<Set>, repr: &Repr) -> Result<Value> {
        if let Some(&n) = self.counts.get(&set) {
            return Ok(n);
        }
        let n = match repr {
            Repr::Range { cols, .. } => *cols,
            Repr::List { len, .. } => *len,
            // Counted with the set's other reductions (which caches the count).
            _ if self.lanes_can_visit(repr) => {
                self.fused_reduce(ReduceOp::Count, set, repr, None)?
            }
            Repr::Masked { .. } | Repr::Cross { .. } => {
                let n = self.b.declare_var(I64);
                let zero = self.b.ins().iconst(I64, 0);
                self.b.def_var(n, zero);
                self.each(repr, &mut |g, _| {
                    let current = g.b.use_var(n);
                    let next = g.b.ins().iadd_imm_u(current, 1);
                    g.b.def_var(n, next);
                    Ok(())
                })?;
                self.b.use_var(n)
            }
        };
        self.counts.insert(set, n);
        Ok(n)
    }

    fn reduce(&mut self, op: ReduceOp, set: Handle<Set>, body: Handle<Expr>) -> Result<Value> {
        let repr = self.set_repr(set)?;
        if op == ReduceOp::Count {
            let n = self.set_count(set, &repr)?;
            return Ok(self.index_to_float(n));
        }
        self.prepare(body)?;
        if self.lanes_can_read(&repr, body) {
            if matches!(
                op,
                ReduceOp::Sum | ReduceOp::Mean | ReduceOp::Min | ReduceOp::Max
            ) {
                return self.fused_reduce(op, set, &repr, Some(body));
            }
            return self.reduce_on_lanes(op, set, &repr, body);
        }
        let acc = self.b.declare_var(self.float);
        match op {
            ReduceOp::Sum | ReduceOp::Mean => {
                let zero = self.fconst(0.0);
                self.b.def_var(acc, zero);
                self.each(&repr, &mut |g, at| {
                    let v = g.member(body, at, &mut HashMap::new())?;
                    let current = g.b.use_var(acc);
                    let next = g.b.ins().fadd(current, v);
                    g.b.def_var(acc, next);
                    Ok(())
                })?;
                let total = self.b.use_var(acc);
                if op == ReduceOp::Sum {
                    return Ok(total);
                }
                let n = self.set_count(set, &repr)?;
                let empty = self.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
                self.flag(Status::EMPTY, empty);
                let n = self.index_to_float(n);
                Ok(self.b.ins().fdiv(total, n))
            }
            ReduceOp::Min | ReduceOp::Max => {
                self.extremum(&repr, body, op == ReduceOp::Min, acc)?;
                Ok(self.b.use_var(acc))
            }
            ReduceOp::Lse => {
                self.extremum(&repr, body, false, acc)?;
                let max = self.b.use_var(acc);
                // exp(v - max) summed; a non-finite maximum (an empty set) is the result.
                let sum = self.b.declare_var(self.float);
                let zero = self.fconst(0.0);
                self.b.def_var(sum, zero);
                self.each(&repr, &mut |g, at| {
                    let v = g.member(body, at, &mut HashMap::new())?;
                    let shifted = g.b.ins().fsub(v, max);
                    let constants = g.constants();
                    let e = g.math.exp_bounded(&mut g.b, shifted, constants);
                    let current = g.b.use_var(sum);
                    let next = g.b.ins().fadd(current, e);
                    g.b.def_var(sum, next);
                    Ok(())
                })?;
                let total = self.b.use_var(sum);
                Ok(self.lse_from(max, total))
            }
            ReduceOp::Std => {
                let mean = self.reduce(ReduceOp::Mean, set, body)?;
                let zero = self.fconst(0.0);
                self.b.def_var(acc, zero);
                self.each(&repr, &mut |g, at| {
                    let v = g.member(body, at, &mut HashMap::new())?;
                    let d = g.b.ins().fsub(v, mean);
                    let sq = g.b.ins().fmul(d, d);
                    let current = g.b.use_var(acc);
                    let next = g.b.ins().fadd(current, sq);
                    g.b.def_var(acc, next);
                    Ok(())
                })?;
                let squares = self.b.use_var(acc);
                let n = self.set_count(set, &repr)?;
                let n = self.index_to_float(n);
                let variance = self.b.ins().fdiv(squares, n);
                Ok(self.b.ins().sqrt(variance))
            }
            ReduceOp::Count => unreachable_count(),
        }
    }

    /// A standard deviation or a log-sum-exp on lanes: the mean or the maximum with the
    /// set's other reductions, then a second loop; a log-sum-exp whose maximum no loop has
    /// found yet is summed in the loop that finds it (see [`Self::fused_reduce`]).
    fn reduce_on_lanes(
        &mut self,
        op: ReduceOp,
        set: Handle<Set>,
        repr: &Repr,
        body: Handle<Expr>,
    ) -> Result<Value> {
        let add = |g: &mut Self, a: Value, v: Value| g.b.ins().fadd(a, v);
        match op {
            ReduceOp::Std => {
                let mean = self.fused_reduce(ReduceOp::Mean, set, repr, Some(body))?;
                self.pin(mean);
                let n = self.set_count(set, repr)?;
                let count = self.index_to_float(n);
                let square_gap = |g: &mut Self, v: Value| {
                    let m = if g.b.func.dfg.value_type(v).is_vector() {
                        g.splat(mean)
                    } else {
                        mean
                    };
                    let d = g.b.ins().fsub(v, m);
                    g.b.ins().fmul(d, d)
                };
                let squares = self.vector_reduce(repr, body, 0.0, &square_gap, &add)?;
                let variance = self.b.ins().fdiv(squares, count);
                Ok(self.b.ins().sqrt(variance))
            }
            ReduceOp::Lse => {
                // Its maximum not found yet, it is summed in the loop that finds it, over a
                // whole or masked row (a list's second loop visits only its few members).
                let max = match self.lse_max.get(&(set, body)) {
                    Some(&max) => max,
                    None if matches!(repr, Repr::Range { .. } | Repr::Masked { .. }) => {
                        return self.fused_reduce(ReduceOp::Lse, set, repr, Some(body));
                    }
                    None => self.fused_reduce(ReduceOp::Max, set, repr, Some(body))?,
                };
                // The other log-sum-exps over the set that the pass needs and whose maxima
                // are known sum their exponentials in the same loop.
                let siblings: Vec<(Handle<Expr>, Handle<Expr>, Value)> = self
                    .set_reductions(set)
                    .filter(|&(_, op, other)| {
                        op == ReduceOp::Lse && other != body && self.lanes_can_read(repr, other)
                    })
                    .filter_map(|(h, _, other)| Some((h, other, *self.lse_max.get(&(set, other))?)))
                    .collect();
                let mut folds = Vec::with_capacity(1 + siblings.len());
                let lses =
                    std::iter::once((body, max)).chain(siblings.iter().map(|&(_, b, m)| (b, m)));
                for (other, max) in lses {
                    self.prepare(other)?;
                    self.pin(max);
                    let kept = self.softmax_buffer(set, repr, other)?;
                    let fold = Fold::ShiftedExp {
                        body: other,
                        max,
                        kept,
                    };
                    folds.push((fold, None));
                }
                // A loop over a whole row that visits every vector writes each column.
                let every_column = matches!(repr, Repr::Range { .. } | Repr::Masked { .. })
                    && !self.skips_empty(&folds, &[]);
                let totals = self.vector_loop(repr, &folds, &[], true)?;
                let mut lses = Vec::with_capacity(folds.len());
                for ((fold, _), total) in folds.into_iter().zip(totals) {
                    let Fold::ShiftedExp {
                        body: other,
                        max,
                        kept,
                    } = fold
                    else {
                        return Err(internal("a log-sum-exp without its sum"));
                    };
                    if let Some(buffer) = kept {
                        self.keep_softmax((set, other), buffer, total, every_column);
                    }
                    lses.push(self.lse_from(max, total));
                }
                for (&(h, _, _), &lse) in siblings.iter().zip(&lses[1..]) {
                    self.row.insert(h, lse);
                }
                Ok(lses[0])
            }
            _ => Err(internal(format!("{op:?} is not reduced in two loops"))),
        }
    }

    /// The row buffer that keeps the terms `exp(body - shift)` of `lse(set, body)` for the
    /// softmax weights that read them (none for a pair set, or when no weight does).
    fn softmax_buffer(
        &mut self,
        set: Handle<Set>,
        repr: &Repr,
        body: Handle<Expr>,
    ) -> Result<Option<Value>> {
        match repr {
            Repr::Range { space, .. } | Repr::List { space, .. } | Repr::Masked { space, .. }
                if self.softmax_wanted.contains(&(set, body)) =>
            {
                let cols = space
                    .cols
                    .ok_or_else(|| internal("a set without columns"))?;
                Ok(Some(self.new_buffer(RowBuffer::Floats(cols))))
            }
            _ => Ok(None),
        }
    }

    /// A fresh [`Guess`] starting at `shift` (minus infinity: no shift yet), not moved.
    fn new_guess(&mut self, shift: Value) -> Guess {
        let vector = self.vector_type();
        let guess = Guess {
            shift: self.b.declare_var(self.float),
            lanes: (self.b.declare_var(vector), self.b.declare_var(vector)),
            moved: self.b.declare_var(I8),
        };
        self.b.def_var(guess.shift, shift);
        let reach = self.fconst(GUESS_REACH);
        let limit = self.b.ins().fadd(shift, reach);
        let (shift, limit) = (self.splat(shift), self.splat(limit));
        self.b.def_var(guess.lanes.0, shift);
        self.b.def_var(guess.lanes.1, limit);
        let still = self.b.ins().iconst(I8, 0);
        self.b.def_var(guess.moved, still);
        guess
    }

    /// The log-sum-exps of the [`Fold::GuessedExp`]s of one loop, `shift + ln(total)` from
    /// their sums; the loop visited every vector of its row `repr` (and so wrote each
    /// column of a buffer) when `every_vector`. A sum stands when its shift never moved
    /// after its first member's vector and it is at least one half (the term at the shift
    /// is one). (A shift below the maximum by `Δ` leaves `ln(total)` near `Δ`: the sum then
    /// rounds to about an ulp of `Δ`, at most of 40, where the maximum's shift rounds to an
    /// ulp of the maximum.)
    ///
    /// Unless all stand (a member far above the first ones, an empty set, a NaN or an
    /// infinity), a cold loop over the row sums each again from its last shift, which no
    /// member lies more than [`GUESS_REACH`] above, and finds its maximum: a maximum that
    /// is not finite (no member, a NaN, an infinity) is the result, as it always was.
    fn finish_guessed(
        &mut self,
        sums: &[GuessedSum],
        every_vector: bool,
        repr: &Repr,
    ) -> Result<Vec<Value>> {
        if sums.is_empty() {
            return Ok(Vec::new());
        }
        let mut all_stand = self.b.ins().iconst(I8, 1);
        let mut finals = Vec::with_capacity(sums.len());
        for sum in sums {
            let Fold::GuessedExp { guess, .. } = sum.fold else {
                return Err(internal("a guessed log-sum-exp without its fold"));
            };
            let shift = self.b.use_var(guess.shift);
            let moved = self.b.use_var(guess.moved);
            let half = self.fconst(0.5);
            let enough = self
                .b
                .ins()
                .fcmp(FloatCC::GreaterThanOrEqual, sum.total, half);
            let steady = self.b.ins().icmp_imm_u(IntCC::Equal, moved, 0);
            let stands = self.b.ins().band(enough, steady);
            all_stand = self.b.ins().band(all_stand, stands);
            let (lse, total) = (
                self.b.declare_var(self.float),
                self.b.declare_var(self.float),
            );
            let guessed = self.lse_from(shift, sum.total);
            self.b.def_var(lse, guessed);
            self.b.def_var(total, sum.total);
            finals.push((lse, total));
        }
        let (again, done) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(all_stand, done, &[], again, &[]);
        self.b.set_cold_block(again);
        self.b.switch_to_block(again);
        // Each sum again from its last shift, and its maximum.
        let mut cold_folds = Vec::with_capacity(2 * sums.len());
        for sum in sums {
            let Fold::GuessedExp { body, kept, guess } = sum.fold else {
                return Err(internal("a guessed log-sum-exp without its fold"));
            };
            let last = self.b.use_var(guess.shift);
            let guess = self.new_guess(last);
            cold_folds.push((Fold::GuessedExp { body, kept, guess }, sum.condition));
            cold_folds.push((Fold::Max(body), sum.condition));
        }
        let results = self.vector_loop(repr, &cold_folds, &[], true)?;
        let cold = cold_folds.chunks(2).zip(results.chunks(2));
        for ((folds, results), &(lse, total)) in cold.zip(&finals) {
            let Fold::GuessedExp { guess, .. } = folds[0].0 else {
                return Err(internal("a guessed log-sum-exp without its fold"));
            };
            let (sum, max) = (results[0], results[1]);
            let shift = self.b.use_var(guess.shift);
            let summed = self.lse_from(shift, sum);
            let inf = self.fconst(f64::INFINITY);
            let magnitude = self.b.ins().fabs(max);
            let finite = self.b.ins().fcmp(FloatCC::LessThan, magnitude, inf);
            let again = self.b.ins().select(finite, summed, max);
            self.b.def_var(lse, again);
            self.b.def_var(total, sum);
        }
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
        // Both loops visit the same vectors of the row.
        let every_column = every_vector && !self.skips_empty(&cold_folds, &[]);
        let mut lses = Vec::with_capacity(sums.len());
        for (sum, &(lse, total)) in sums.iter().zip(&finals) {
            if let Fold::GuessedExp {
                body,
                kept: Some(buffer),
                ..
            } = sum.fold
            {
                let total = self.b.use_var(total);
                self.keep_softmax((sum.set, body), buffer, total, every_column);
            }
            lses.push(self.b.use_var(lse));
        }
        Ok(lses)
    }

    /// Records the softmax of `lse(set, body)` for the weights that read it: its terms in
    /// `buffer` (each column written when `every_column`) times `1 / total`.
    fn keep_softmax(&mut self, key: LseKey, buffer: Value, total: Value, every_column: bool) {
        let one = self.fconst(1.0);
        let inverse = self.b.ins().fdiv(one, total);
        self.pin(inverse);
        let row = SoftmaxRow {
            buffer,
            inverse,
            every_column,
        };
        self.softmax_rows.insert(key, row);
    }

    /// `max + ln(total)` from a log-sum-exp's maximum and its sum of `exp(v - max)`; a
    /// non-finite maximum (an empty set, or an infinite member) is the result.
    fn lse_from(&mut self, max: Value, total: Value) -> Value {
        let constants = self.constants();
        let ln = self.math.ln(&mut self.b, total, constants);
        let lse = self.b.ins().fadd(max, ln);
        let inf = self.fconst(f64::INFINITY);
        let magnitude = self.b.ins().fabs(max);
        let finite = self.b.ins().fcmp(FloatCC::LessThan, magnitude, inf);
        self.b.ins().select(finite, lse, max)
    }

    /// The minimum (or maximum) of `body` over the members into `acc`: the first strictly
    /// smaller value wins, and a NaN is kept (as the interpreter does).
    fn extremum(
        &mut self,
        repr: &Repr,
        body: Handle<Expr>,
        min: bool,
        acc: Variable,
    ) -> Result<()> {
        let start = self.fconst(if min {
            f64::INFINITY
        } else {
            f64::NEG_INFINITY
        });
        self.b.def_var(acc, start);
        self.each(repr, &mut |g, at| {
            let v = g.member(body, at, &mut HashMap::new())?;
            let current = g.b.use_var(acc);
            let cc = if min {
                FloatCC::LessThan
            } else {
                FloatCC::GreaterThan
            };
            let better = g.b.ins().fcmp(cc, v, current);
            let nan = g.b.ins().fcmp(FloatCC::Unordered, v, v);
            let take = g.b.ins().bor(better, nan);
            let next = g.b.ins().select(take, v, current);
            g.b.def_var(acc, next);
            Ok(())
        })
    }

    /// The column chosen by `argmin`, `argmax` or `argrank` (i64, -1 for none).
    fn arg_reduce(&mut self, op: ArgOp, set: Handle<Set>, body: Handle<Expr>) -> Result<Value> {
        match op {
            ArgOp::Rank(k) => {
                let ((_, indices), safe, bad) = self.rank_position(set, k)?;
                let offset = self.b.ins().imul_imm_u(safe, 4);
                let addr = self.b.ins().iadd(indices, offset);
                let j = self.b.ins().uload32(Self::flags(), addr, 0);
                let none = self.b.ins().iconst(I64, -1);
                Ok(self.b.ins().select(bad, none, j))
            }
            ArgOp::Min | ArgOp::Max => {
                let repr = self.set_repr(set)?;
                self.prepare(body)?;
                if self.lanes_can_read(&repr, body) {
                    return self.vector_arg_extreme(&repr, body, op == ArgOp::Min);
                }
                let best = self.b.declare_var(self.float);
                let chosen = self.b.declare_var(I64);
                let start = self.fconst(0.0);
                self.b.def_var(best, start);
                let none = self.b.ins().iconst(I64, -1);
                self.b.def_var(chosen, none);
                let min = op == ArgOp::Min;
                self.each(&repr, &mut |g, at| {
                    g.arg_step(body, at, min, (best, chosen))
                })?;
                Ok(self.b.use_var(chosen))
            }
        }
    }

    /// Where the member of rank `k` of `set` lies in the scratch buffers (values, indices)
    /// the set is written to: its position (0 when there is no such member, which is
    /// flagged) and whether there is none.
    fn rank_position(
        &mut self,
        set: Handle<Set>,
        k: Handle<Expr>,
    ) -> Result<((Value, Value), Value, Value)> {
        let (values, indices, count) = self.fill(set)?;
        let k = self.row(k)?;
        let k = self.widen(k);
        let call = self.b.ins().call(self.helpers.rank, &[values, count, k]);
        let position = self.b.inst_results(call)[0];
        let none = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, position, 0);
        self.flag(Status::RANK, none);
        let zero = self.b.ins().iconst(I64, 0);
        let safe = self.b.ins().select(none, zero, position);
        Ok(((values, indices), safe, none))
    }

    /// One member of a scalar `argmin` (`argmax`) loop: it becomes the choice if it is the
    /// first member or strictly better than the best so far (`state`: best value, column).
    pub(super) fn arg_step(
        &mut self,
        body: Handle<Expr>,
        at: At,
        min: bool,
        (best, chosen): (Variable, Variable),
    ) -> Result<()> {
        let v = self.member(body, at, &mut HashMap::new())?;
        let (current, index) = (self.b.use_var(best), self.b.use_var(chosen));
        let cc = if min {
            FloatCC::LessThan
        } else {
            FloatCC::GreaterThan
        };
        let better = self.b.ins().fcmp(cc, v, current);
        let first = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, index, 0);
        let take = self.b.ins().bor(better, first);
        let next_value = self.b.ins().select(take, v, current);
        let next_index = self.b.ins().select(take, at.j, index);
        self.b.def_var(best, next_value);
        self.b.def_var(chosen, next_index);
        Ok(())
    }

    /// Writes the members of `set` and their values into the scratch buffers; returns the
    /// buffers and the count.
    fn fill(&mut self, set: Handle<Set>) -> Result<(Value, Value, Value)> {
        let repr = self.set_repr(set)?;
        let value = self.module.sets[set].value;
        self.fill_repr(&repr, value)
    }

    fn fill_repr(&mut self, repr: &Repr, value: Handle<Expr>) -> Result<(Value, Value, Value)> {
        self.prepare(value)?;
        let n = self.b.declare_var(I64);
        let zero = self.b.ins().iconst(I64, 0);
        self.b.def_var(n, zero);
        let (values, indices) = (self.values_arg, self.indices_arg);
        let mut one = |g: &mut Self, at: At| {
            let v = g.member(value, at, &mut HashMap::new())?;
            let k = g.b.use_var(n);
            let offset = g.b.ins().imul_imm_u(k, g.fb);
            let addr = g.b.ins().iadd(values, offset);
            g.b.ins().store(Self::flags(), v, addr, 0);
            g.append_index(indices, n, at.j, None);
            Ok(())
        };
        if self.can_compact_on_lanes(repr, &[], Some(value)) {
            self.each_vector(
                repr,
                false,
                &mut |g, at| g.compact_lanes(at, &[], indices, Some((value, values)), n),
                &mut one,
            )?;
        } else {
            self.each(repr, &mut one)?;
        }
        let count = self.b.use_var(n);
        Ok((values, indices, count))
    }

    // ---- sets ------------------------------------------------------------------------------

    fn new_list(&mut self, domain: Domain) -> Value {
        self.new_buffer(RowBuffer::Indices(domain))
    }

    /// A row buffer of this thread: its address.
    fn new_buffer(&mut self, buffer: RowBuffer) -> Value {
        let slot = self.buffers.len();
        self.buffers.push(buffer);
        self.load_ptr(self.buffers_arg, slot)
    }

    fn set_repr(&mut self, set: Handle<Set>) -> Result<Repr> {
        if let Some(repr) = self.sets.get(&set) {
            return Ok(repr.clone());
        }
        let s = self.module.sets[set].clone();
        let space = match s.shape {
            SetShape::Members(space) | SetShape::Cross(space) => space,
            _ => return Err(internal(format!("{set} is not a set of pair members"))),
        };
        let cols_domain = space
            .cols
            .ok_or_else(|| internal(format!("{set} has no column domain")))?;
        let repr = match s.kind {
            SetKind::Entries => {
                let cols = self.domain_len(cols_domain);
                Repr::Range { cols, space }
            }
            SetKind::Filter { base, predicate } => {
                let class = self.class_list(space, predicate);
                match (self.set_repr(base)?, class) {
                    (
                        Repr::Cross {
                            left,
                            right,
                            mut preds,
                            space,
                        },
                        _,
                    ) => {
                        self.prepare(predicate)?;
                        preds.push(predicate);
                        Repr::Cross {
                            left,
                            right,
                            preds,
                            space,
                        }
                    }
                    (base @ (Repr::Range { .. } | Repr::Masked { .. }), Some((ptr, len))) => {
                        // Members of the anchor's class: read from its list, not the row.
                        let class = Repr::List { ptr, len, space };
                        let mut preds = match base {
                            Repr::Masked { preds, .. } => preds,
                            _ => Vec::new(),
                        };
                        if !matches!(self.module.exprs[predicate].kind, ExprKind::Same) {
                            preds.push(predicate);
                        }
                        if preds.is_empty() {
                            class
                        } else {
                            self.compact_where(&class, &preds, cols_domain)?
                        }
                    }
                    (Repr::Range { cols, .. }, _) if self.reads_masked(set, predicate) => {
                        self.prepare(predicate)?;
                        Repr::Masked {
                            cols,
                            preds: vec![predicate],
                            space,
                        }
                    }
                    (
                        Repr::Masked {
                            cols, mut preds, ..
                        },
                        _,
                    ) if self.reads_masked(set, predicate) => {
                        self.prepare(predicate)?;
                        preds.push(predicate);
                        Repr::Masked { cols, preds, space }
                    }
                    (base_repr, _) => self.compact_where(&base_repr, &[predicate], cols_domain)?,
                }
            }
            SetKind::Extreme {
                base,
                count,
                largest,
            } => {
                let base_repr = self.set_repr(base)?;
                let (values, indices, n) = self.fill_repr(&base_repr, s.value)?;
                let wanted = self.row(count)?;
                let wanted = self.widen(wanted);
                let ptr = self.new_list(cols_domain);
                let largest = self.b.ins().iconst(I32, i64::from(largest));
                let call = self.b.ins().call(
                    self.helpers.extreme,
                    &[values, indices, n, wanted, largest, ptr],
                );
                let result = self.b.inst_results(call)[0];
                let len = self.helper_len(result, Status::COUNT);
                Repr::List { ptr, len, space }
            }
            SetKind::Sample {
                base,
                count,
                log_weight,
                site,
            } => {
                let base_repr = self.set_repr(base)?;
                let (values, indices, n) = self.fill_repr(&base_repr, log_weight)?;
                let wanted = self.row(count)?;
                let wanted = self.widen(wanted);
                let ptr = self.new_list(cols_domain);
                let seed = self.arg_field(offset_of!(KernelArgs, seed));
                let site = self.b.ins().iconst(I32, i64::from(site));
                let call = self.b.ins().call(
                    self.helpers.sample,
                    &[values, indices, n, wanted, seed, site, self.anchor, ptr],
                );
                let result = self.b.inst_results(call)[0];
                let bad_count = self.b.ins().icmp_imm_s(IntCC::Equal, result, -1);
                self.flag(Status::COUNT, bad_count);
                let len = self.helper_len(result, Status::SAMPLE);
                Repr::List { ptr, len, space }
            }
            SetKind::Union { left, right } => {
                let (a, a_len) = self.as_list(left, cols_domain)?;
                let (b, b_len) = self.as_list(right, cols_domain)?;
                let ptr = self.new_list(cols_domain);
                let call = self
                    .b
                    .ins()
                    .call(self.helpers.union, &[a, a_len, b, b_len, ptr]);
                let len = self.b.inst_results(call)[0];
                Repr::List { ptr, len, space }
            }
            SetKind::Fallback { primary, fallback } => {
                let (a, a_len) = self.as_list(primary, cols_domain)?;
                let (b, b_len) = self.as_list(fallback, cols_domain)?;
                let empty = self.b.ins().icmp_imm_s(IntCC::Equal, a_len, 0);
                let ptr = self.b.ins().select(empty, b, a);
                let len = self.b.ins().select(empty, b_len, a_len);
                Repr::List { ptr, len, space }
            }
            SetKind::Cross { left, right } => {
                let left = Box::new(self.set_repr(left)?);
                let right = Box::new(self.set_repr(right)?);
                Repr::Cross {
                    left,
                    right,
                    preds: Vec::new(),
                    space,
                }
            }
            SetKind::Anchors | SetKind::Skipped | SetKind::VectorEntries => {
                return Err(internal(format!(
                    "{set} is not a set of one anchor's members"
                )));
            }
        };
        if let Some(size) = self.size_by_class(&repr) {
            self.counts.insert(set, size);
        }
        self.sets.insert(set, repr.clone());
        Ok(repr)
    }

    /// The size of a row of samples masked by `!same` (and `!self`, which it implies): the
    /// samples outside the anchor's class, known without counting them.
    fn size_by_class(&mut self, repr: &Repr) -> Option<Value> {
        let Repr::Masked { cols, preds, space } = repr else {
            return None;
        };
        let negated = |h: Handle<Expr>| match self.module.exprs[h].kind {
            ExprKind::Unary {
                op: UnaryOp::Not,
                arg,
            } => Some(&self.module.exprs[arg].kind),
            _ => None,
        };
        let outside_class = preds
            .iter()
            .any(|&p| matches!(negated(p), Some(ExprKind::Same)));
        let only_labels = preds
            .iter()
            .all(|&p| matches!(negated(p), Some(ExprKind::Same | ExprKind::IsSelf)));
        let samples = Some(Domain::Samples);
        if !(outside_class && only_labels && space.rows == samples && space.cols == samples) {
            return None;
        }
        let (_, class_size) = self.own_class?;
        Some(self.b.ins().isub(*cols, class_size))
    }

    /// Whether the filtered set `set` is read under a mask, not written out: its filter
    /// keeps most of a row ([`Self::dense_filter`]) and it is not a mined set that a costly
    /// reduction reads ([`Self::mined_for_costly_body`]).
    fn reads_masked(&self, set: Handle<Set>, predicate: Handle<Expr>) -> bool {
        self.dense_filter(predicate) && !self.mined_for_costly_body(set, predicate)
    }

    /// Whether `predicate` compares a member with the anchor's own minimum or maximum over
    /// a set (give or take a constant) and a reduction with a costly body (a softplus per
    /// member, say) reads `set`, and no log-sum-exp does. Such a set (hard negatives above
    /// the closest positive: a fifth to a half of the row on the bench's batch, fewer as
    /// training separates the classes) has members in most vectors of the row, so a
    /// masked loop evaluates the body on every lane of most of them; written out, the body
    /// runs on full vectors of members. A log-sum-exp keeps its terms for the softmax
    /// scatter over the whole masked row, and `neg where v < max(pos)`, mined the same
    /// way, keeps most of the row: both are left masked, as are sets with cheap bodies,
    /// whose masked loop costs less than the writing out.
    fn mined_for_costly_body(&self, set: Handle<Set>, predicate: Handle<Expr>) -> bool {
        fn threshold(module: &Module, h: Handle<Expr>) -> bool {
            let e = &module.exprs[h];
            if !matches!(e.level, Level::Row(_)) {
                return false;
            }
            let constant = |x: Handle<Expr>| module.exprs[x].level == Level::Const;
            match e.kind {
                ExprKind::Reduce {
                    op: ReduceOp::Min | ReduceOp::Max,
                    ..
                } => true,
                ExprKind::Binary {
                    op: BinaryOp::Add | BinaryOp::Sub,
                    lhs,
                    rhs,
                } if constant(rhs) => threshold(module, lhs),
                ExprKind::Binary {
                    op: BinaryOp::Add,
                    lhs,
                    rhs,
                } if constant(lhs) => threshold(module, rhs),
                _ => false,
            }
        }
        fn mined(module: &Module, p: Handle<Expr>) -> bool {
            match module.exprs[p].kind {
                ExprKind::Binary {
                    op: BinaryOp::And,
                    lhs,
                    rhs,
                } => mined(module, lhs) || mined(module, rhs),
                ExprKind::Binary {
                    op: BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge,
                    lhs,
                    rhs,
                } => threshold(module, lhs) || threshold(module, rhs),
                _ => false,
            }
        }
        if !mined(self.module, predicate) {
            return false;
        }
        let readers = self.module.exprs.iter().filter_map(|(_, e)| match e.kind {
            ExprKind::Reduce {
                op,
                set: read,
                body,
                ..
            } if read == set => Some((op, body)),
            _ => None,
        });
        let (mut costly, mut lse) = (false, false);
        for (op, body) in readers {
            lse |= op == ReduceOp::Lse;
            costly |= self.costly(body);
        }
        costly && !lse
    }

    /// Whether a filter keeps most of a row, so that its set is better read under a mask
    /// than written out: its condition can be evaluated on lanes and is not one that picks
    /// a few members (`same`, `self`, an index equality) as a conjunct.
    fn dense_filter(&self, predicate: Handle<Expr>) -> bool {
        fn picks_few(module: &Module, h: Handle<Expr>) -> bool {
            match module.exprs[h].kind {
                ExprKind::Same | ExprKind::IsSelf => true,
                ExprKind::Binary {
                    op: BinaryOp::And,
                    lhs,
                    rhs,
                } => picks_few(module, lhs) || picks_few(module, rhs),
                ExprKind::Binary {
                    op: BinaryOp::Eq,
                    lhs,
                    rhs,
                } => {
                    matches!(module.exprs[lhs].kind, ExprKind::Index(_))
                        || matches!(module.exprs[rhs].kind, ExprKind::Index(_))
                }
                // Below the k-th value of the row: k members (knn_softmax's neighbourhood).
                ExprKind::Binary {
                    op: BinaryOp::Lt | BinaryOp::Le,
                    rhs,
                    ..
                } => matches!(module.exprs[rhs].kind, ExprKind::Rank { .. }),
                ExprKind::Binary {
                    op: BinaryOp::Gt | BinaryOp::Ge,
                    lhs,
                    ..
                } => matches!(module.exprs[lhs].kind, ExprKind::Rank { .. }),
                _ => false,
            }
        }
        self.vectorizable(predicate, true) && !picks_few(self.module, predicate)
    }

    /// A helper's length result: negative values flag `bit` and count as empty.
    fn helper_len(&mut self, result: Value, bit: u32) -> Value {
        let bad = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, result, 0);
        self.flag(bit, bad);
        let zero = self.b.ins().iconst(I64, 0);
        self.b.ins().select(bad, zero, result)
    }

    /// The members of `repr` for which every condition holds, written out as an index list.
    fn compact_where(
        &mut self,
        repr: &Repr,
        preds: &[Handle<Expr>],
        domain: Domain,
    ) -> Result<Repr> {
        let space = match repr {
            Repr::Range { space, .. }
            | Repr::List { space, .. }
            | Repr::Masked { space, .. }
            | Repr::Cross { space, .. } => *space,
        };
        for &p in preds {
            self.prepare(p)?;
        }
        let ptr = self.new_list(domain);
        let len = self.b.declare_var(I64);
        let zero = self.b.ins().iconst(I64, 0);
        self.b.def_var(len, zero);
        let mut one = |g: &mut Self, at: At| {
            // Stored always, kept by advancing the length: no branch on the condition.
            let mut cache = HashMap::new();
            let mut keep = g.b.ins().iconst(I8, 1);
            for &p in preds {
                let holds = g.member(p, at, &mut cache)?;
                keep = g.b.ins().band(keep, holds);
            }
            g.append_index(ptr, len, at.j, Some(keep));
            Ok(())
        };
        if self.can_compact_on_lanes(repr, preds, None) {
            self.each_vector(
                repr,
                false,
                &mut |g, at| g.compact_lanes(at, preds, ptr, None, len),
                &mut one,
            )?;
        } else {
            self.each(repr, &mut one)?;
        }
        let len = self.b.use_var(len);
        Ok(Repr::List { ptr, len, space })
    }

    /// Writes column `j` at position `len` of the index list `list` and advances `len` by
    /// one, or by `keep` (an `i8` of 0 or 1): stored always, kept by the length, so that
    /// a condition costs no branch.
    fn append_index(&mut self, list: Value, len: Variable, j: Value, keep: Option<Value>) {
        let k = self.b.use_var(len);
        let offset = self.b.ins().imul_imm_u(k, 4);
        let addr = self.b.ins().iadd(list, offset);
        let j32 = self.b.ins().ireduce(I32, j);
        self.b.ins().store(Self::flags(), j32, addr, 0);
        let next = match keep {
            Some(keep) => {
                let step = self.b.ins().uextend(I64, keep);
                self.b.ins().iadd(k, step)
            }
            None => self.b.ins().iadd_imm_u(k, 1),
        };
        self.b.def_var(len, next);
    }

    /// The list of the anchor's class, when `predicate` keeps only members of it (`same`
    /// is one of its conjuncts) and both anchors and members are samples.
    fn class_list(&self, space: Space, predicate: Handle<Expr>) -> Option<(Value, Value)> {
        fn requires_same(module: &Module, h: Handle<Expr>) -> bool {
            match module.exprs[h].kind {
                ExprKind::Same => true,
                ExprKind::Binary {
                    op: BinaryOp::And,
                    lhs,
                    rhs,
                } => requires_same(module, lhs) || requires_same(module, rhs),
                _ => false,
            }
        }
        let samples = Some(Domain::Samples);
        (space.rows == samples && space.cols == samples && requires_same(self.module, predicate))
            .then_some(self.own_class?)
    }

    /// A set as an index list, writing out a whole row when it is one.
    fn as_list(&mut self, set: Handle<Set>, domain: Domain) -> Result<(Value, Value)> {
        let repr = match self.set_repr(set)? {
            Repr::List { ptr, len, .. } => return Ok((ptr, len)),
            Repr::Cross { .. } => {
                return Err(internal(format!("{set}: a cross set as an index list")));
            }
            dense => dense,
        };
        if let Some(&list) = self.lists_of.get(&set) {
            return Ok(list);
        }
        let Repr::List { ptr, len, .. } = self.compact_where(&repr, &[], domain)? else {
            return Err(internal("a compacted set that is not a list"));
        };
        self.lists_of.insert(set, (ptr, len));
        Ok((ptr, len))
    }

    // ---- loops -----------------------------------------------------------------------------

    /// Emits a loop over the members of `repr`, calling `body` in it.
    fn each(
        &mut self,
        repr: &Repr,
        body: &mut dyn FnMut(&mut Self, At) -> Result<()>,
    ) -> Result<()> {
        match repr {
            Repr::Range { cols, space } => {
                let space = *space;
                self.counted_loop(*cols, &mut |g, i| {
                    body(
                        g,
                        At {
                            j: i,
                            pair: None,
                            space,
                        },
                    )
                })
            }
            Repr::List { ptr, len, space } => {
                let (ptr, space) = (*ptr, *space);
                self.counted_loop(*len, &mut |g, k| {
                    let offset = g.b.ins().imul_imm_u(k, 4);
                    let addr = g.b.ins().iadd(ptr, offset);
                    let j = g.b.ins().uload32(Self::flags(), addr, 0);
                    body(
                        g,
                        At {
                            j,
                            pair: None,
                            space,
                        },
                    )
                })
            }
            Repr::Masked { cols, preds, space } => {
                let (space, preds) = (*space, preds.clone());
                let start = self.first_column(&preds, 1);
                self.range_loop(start, *cols, 1, &mut |g, j| {
                    let at = At {
                        j,
                        pair: None,
                        space,
                    };
                    g.when_all(&preds, at, &mut |g| body(g, at))
                })
            }
            Repr::Cross {
                left,
                right,
                preds,
                space,
            } => {
                let space = *space;
                let (right, preds) = (right.clone(), preds.clone());
                self.each(left, &mut |g, outer| {
                    g.each(&right, &mut |g, inner| {
                        let at = At {
                            j: outer.j,
                            pair: Some((outer.j, inner.j)),
                            space,
                        };
                        g.when_all(&preds, at, &mut |g| body(g, at))
                    })
                })
            }
        }
    }

    /// The first column a loop `step` columns at a time needs to visit for members that meet
    /// `preds`: after the anchor's own when they include `i < j` (a pair counted once, as
    /// histogram's are), rounded down to a multiple of `step`; else the first.
    fn first_column(&mut self, preds: &[Handle<Expr>], step: i64) -> Value {
        if !preds.iter().any(|&p| self.only_after_anchor(p)) {
            return self.b.ins().iconst(I64, 0);
        }
        let next = self.b.ins().iadd_imm_u(self.anchor, 1);
        self.b.ins().band_imm_s(next, -step)
    }

    /// Whether condition `h` holds only at columns after the anchor's index.
    fn only_after_anchor(&self, h: Handle<Expr>) -> bool {
        let index = |h: Handle<Expr>| match self.module.exprs[h].kind {
            ExprKind::Index(axis) => Some(axis),
            _ => None,
        };
        match self.module.exprs[h].kind {
            ExprKind::Binary {
                op: BinaryOp::And,
                lhs,
                rhs,
            } => self.only_after_anchor(lhs) || self.only_after_anchor(rhs),
            ExprKind::Binary { op, lhs, rhs } => matches!(
                (op, index(lhs), index(rhs)),
                (BinaryOp::Lt, Some(Axis::Row), Some(Axis::Col))
                    | (BinaryOp::Gt, Some(Axis::Col), Some(Axis::Row))
            ),
            _ => false,
        }
    }

    /// Runs `body` at `at` only when every condition holds there.
    fn when_all(
        &mut self,
        preds: &[Handle<Expr>],
        at: At,
        body: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        if preds.is_empty() {
            return body(self);
        }
        let mut cache = HashMap::new();
        let mut all = self.b.ins().iconst(I8, 1);
        for &p in preds {
            let v = self.member(p, at, &mut cache)?;
            all = self.b.ins().band(all, v);
        }
        let inside = self.b.create_block();
        let after = self.b.create_block();
        self.b.ins().brif(all, inside, &[], after, &[]);
        self.b.switch_to_block(inside);
        body(self)?;
        self.b.ins().jump(after, &[]);
        self.b.switch_to_block(after);
        Ok(())
    }

    /// `for i in 0..n { body(i) }` with an i64 counter.
    fn counted_loop(
        &mut self,
        n: Value,
        body: &mut dyn FnMut(&mut Self, Value) -> Result<()>,
    ) -> Result<()> {
        let zero = self.b.ins().iconst(I64, 0);
        self.range_loop(zero, n, 1, body)
    }

    /// `for i in (start..end).step_by(step) { body(i) }` with an i64 counter.
    fn range_loop(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        body: &mut dyn FnMut(&mut Self, Value) -> Result<()>,
    ) -> Result<()> {
        // Rotated: the test sits at the bottom, so an iteration takes one branch and the
        // register allocator sees one edge into the loop and one back edge.
        let counter = self.b.declare_var(I64);
        self.b.def_var(counter, start);
        let inner = self.b.create_block();
        let exit = self.b.create_block();
        let any = self.b.ins().icmp(IntCC::UnsignedLessThan, start, end);
        self.b.ins().brif(any, inner, &[], exit, &[]);
        self.b.switch_to_block(inner);
        let i = self.b.use_var(counter);
        body(self, i)?;
        let i = self.b.use_var(counter);
        let next = self.b.ins().iadd_imm_u(i, step);
        self.b.def_var(counter, next);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, next, end);
        self.b.ins().brif(more, inner, &[], exit, &[]);
        self.b.switch_to_block(exit);
        Ok(())
    }

    // ---- per-member values -----------------------------------------------------------------

    /// The entry at column `j` of a softmax buffer.
    fn kept_term(&mut self, buffer: Value, j: Value) -> Value {
        let offset = self.b.ins().imul_imm_u(j, self.fb);
        let addr = self.b.ins().iadd(buffer, offset);
        self.b.ins().load(self.float, Self::flags(), addr, 0)
    }

    fn member(
        &mut self,
        h: Handle<Expr>,
        at: At,
        cache: &mut HashMap<Handle<Expr>, Value>,
    ) -> Result<Value> {
        let e = self.module.exprs[h].clone();
        if !matches!(e.level, Level::Member { .. } | Level::Cross { .. }) {
            return self
                .row
                .get(&h)
                .copied()
                .ok_or_else(|| internal(format!("{h} was not prepared before its loop")));
        }
        if let Some(&v) = cache.get(&h) {
            return Ok(v);
        }
        if let Some(&row) = self.softmax_reads.get(&h) {
            let kept = self.kept_term(row.buffer, at.j);
            let v = self.b.ins().fmul(kept, row.inverse);
            cache.insert(h, v);
            return Ok(v);
        }
        let (rows, cols) = (at.space.rows, at.space.cols);
        let v = match e.kind {
            ExprKind::Entry(m) => {
                let row = self.matrix_row(m)?;
                let offset = self.b.ins().imul_imm_u(at.j, self.fb);
                let addr = self.b.ins().iadd(row, offset);
                self.b.ins().load(self.float, Self::input_flags(), addr, 0)
            }
            ExprKind::Same => {
                // The rows of a member's space are the block's anchors.
                let (Some(_), Some(cols)) = (rows, cols) else {
                    return Err(internal("`same` without a space"));
                };
                let row_label = self
                    .anchor_label
                    .ok_or_else(|| internal("the anchor's label was not loaded"))?;
                let col_label = self.label(cols, at.j);
                self.b.ins().icmp(IntCC::Equal, row_label, col_label)
            }
            ExprKind::IsSelf => match (rows, cols) {
                (Some(Domain::Samples), Some(Domain::Groups(g))) => {
                    let own = self.group_of(g, self.anchor);
                    self.b.ins().icmp(IntCC::Equal, own, at.j)
                }
                (Some(Domain::Groups(g)), Some(Domain::Samples)) => {
                    let own = self.group_of(g, at.j);
                    self.b.ins().icmp(IntCC::Equal, own, self.anchor)
                }
                _ => self.b.ins().icmp(IntCC::Equal, at.j, self.anchor),
            },
            ExprKind::Index(axis) => {
                let i = if axis == Axis::Row { self.anchor } else { at.j };
                self.index_to_float(i)
            }
            ExprKind::GroupSize { groups, axis } => {
                let i = if axis == Axis::Row { self.anchor } else { at.j };
                let size = self.group_size(groups, i);
                self.b.ins().fcvt_from_sint(self.float, size)
            }
            ExprKind::CrossSide { side, value } => {
                let (p, q) = at
                    .pair
                    .ok_or_else(|| internal("`p`/`q` outside a cross set"))?;
                let j = if side == Side::Left { p } else { q };
                // Values at one side do not share the pair's cache.
                self.member(
                    value,
                    At {
                        j,
                        pair: None,
                        space: at.space,
                    },
                    &mut HashMap::new(),
                )?
            }
            ExprKind::Unary { op, arg } => {
                let a = self.member(arg, at, cache)?;
                self.unary(op, a)
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.member(lhs, at, cache)?;
                let b = self.member(rhs, at, cache)?;
                let bools = self.module.exprs[lhs].ty == Type::Bool;
                self.binary(op, a, b, bools, rhs)?
            }
            ExprKind::Select {
                cond,
                then,
                otherwise,
            } => {
                let c = self.member(cond, at, cache)?;
                let t = self.member(then, at, cache)?;
                let o = self.member(otherwise, at, cache)?;
                self.b.ins().select(c, t, o)
            }
            ExprKind::Stop(arg) => self.member(arg, at, cache)?,
            ExprKind::HistSlope {
                adjoint,
                value,
                bins,
                lo,
                hi,
            } => {
                let s = self.member(value, at, cache)?;
                let adj = *self
                    .vectors
                    .get(&adjoint)
                    .ok_or_else(|| internal("a histogram adjoint that was not loaded"))?;
                let lo_v = self.fconst(lo.0);
                let hi_v = self.fconst(hi.0);
                let below = self.b.ins().fcmp(FloatCC::LessThan, s, lo_v);
                let above = self.b.ins().fcmp(FloatCC::GreaterThan, s, hi_v);
                let outside = self.b.ins().bor(below, above);
                let (node, _, _) = self.hist_weights(s, bins, lo.0, hi.0);
                let offset = self.b.ins().imul_imm_u(node, 8);
                let addr = self.b.ins().iadd(adj, offset);
                let a0 = self.b.ins().load(F64, Self::flags(), addr, 0);
                let a1 = self.b.ins().load(F64, Self::flags(), addr, 8);
                let (a0, a1) = (self.narrow(a0), self.narrow(a1));
                let diff = self.b.ins().fsub(a1, a0);
                let per_step = self.fconst((f64::from(bins) - 1.0) / (hi.0 - lo.0));
                let slope = self.b.ins().fmul(diff, per_step);
                let zero = self.fconst(0.0);
                self.b.ins().select(outside, zero, slope)
            }
            _ => return Err(internal(format!("per-member {h} of an unexpected kind"))),
        };
        cache.insert(h, v);
        Ok(v)
    }

    /// The label of row `i` of a domain (i64).
    fn label(&mut self, domain: Domain, i: Value) -> Value {
        let labels = self.labels[&domain];
        let offset = self.b.ins().imul_imm_u(i, 8);
        let addr = self.b.ins().iadd(labels, offset);
        self.b.ins().load(I64, Self::flags(), addr, 0)
    }

    /// The group (i64) of sample `i` in a grouping.
    fn group_of(&mut self, groups: Handle<Grouping>, i: Value) -> Value {
        let of_sample = self.group_tables[&groups].0;
        self.u32_entry(of_sample, i)
    }

    /// The size (i64) of group `i` of a grouping.
    fn group_size(&mut self, groups: Handle<Grouping>, i: Value) -> Value {
        let sizes = self.group_tables[&groups].1;
        self.u32_entry(sizes, i)
    }

    /// Entry `i` of a table of u32, widened to i64.
    fn u32_entry(&mut self, table: Value, i: Value) -> Value {
        let offset = self.b.ins().imul_imm_u(i, 4);
        let addr = self.b.ins().iadd(table, offset);
        self.b.ins().uload32(Self::flags(), addr, 0)
    }
}

fn unreachable_count() -> Result<Value> {
    Err(internal("a count reached the reduction loop"))
}
