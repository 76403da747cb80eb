//! Vector constants that loops read from memory where they use them.
//!
//! Cranelift hoists a splatted constant out of every loop it is used in, to the function's
//! entry. A kernel's vector loops use dozens (each polynomial of `exp`, `ln`... brings its
//! coefficients) and x86-64 has 16 vector registers, so the register allocator spills
//! them, and at each loop's back edge it stores the spilled ones again: the inner loops of
//! the triplet losses spent a third of their time moving constants to and from the stack.
//!
//! Instead, each distinct constant of a build gets a 16-byte slot in a [`ConstantTable`]
//! (a table indexed at run time, such as the byte shuffles of a compaction, consecutive
//! slots), and a vector loop reads it from there with a movable load whose address is
//! relative to a base that the loop advances by a zero it loads from memory: the optimiser
//! cannot prove the base invariant, so it neither hoists the loads nor folds them together
//! across loops, and places each just before its use (often as the operand of the
//! instruction that uses it). The step costs one integer addition per iteration.

use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;
use std::cell::RefCell;
use std::collections::HashMap;

/// One 16-byte vector constant.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Lanes([u8; 16]);

/// The vector constants of the kernels of one build, one slot per distinct bit pattern.
/// Slot 0 holds zeros: the step of the loops' bases. The slots never move once
/// allocated, and the table must outlive the code that reads it.
pub struct ConstantTable {
    lanes: Box<[Lanes]>,
    slots: HashMap<[u8; 16], usize>,
    /// Tables of vectors indexed at run time: where each starts.
    blocks: HashMap<Vec<[u8; 16]>, usize>,
    /// Slots taken so far.
    used: usize,
}

impl ConstantTable {
    /// Enough for any kernel seen so far many times over (a few dozen each); a build
    /// that runs out splats the rest in place.
    const CAPACITY: usize = 1024;

    pub fn new() -> Self {
        ConstantTable {
            lanes: vec![Lanes([0; 16]); Self::CAPACITY].into_boxed_slice(),
            slots: HashMap::from([([0; 16], 0)]),
            blocks: HashMap::new(),
            used: 1,
        }
    }

    /// The address of slot 0.
    fn address(&self) -> i64 {
        self.lanes.as_ptr() as i64
    }

    /// The byte offset of the slot holding `bytes`, taking a free slot for a new pattern;
    /// `None` when the table is full.
    fn offset_of(&mut self, bytes: [u8; 16]) -> Option<i32> {
        let slot = match self.slots.get(&bytes) {
            Some(&slot) => slot,
            None => {
                let slot = self.take(&[bytes])?;
                self.slots.insert(bytes, slot);
                slot
            }
        };
        i32::try_from(slot * size_of::<Lanes>()).ok()
    }

    /// The byte offset of the first of consecutive slots holding `block`.
    fn block_offset(&mut self, block: &[[u8; 16]]) -> Option<i32> {
        let first = match self.blocks.get(block) {
            Some(&first) => first,
            None => {
                let first = self.take(block)?;
                self.blocks.insert(block.to_vec(), first);
                first
            }
        };
        i32::try_from(first * size_of::<Lanes>()).ok()
    }

    /// Fills the next free slots with `vectors`; the first one's index.
    fn take(&mut self, vectors: &[[u8; 16]]) -> Option<usize> {
        let first = self.used;
        let end = first.checked_add(vectors.len())?;
        let slots = self.lanes.get_mut(first..end)?;
        for (slot, &bytes) in slots.iter_mut().zip(vectors) {
            *slot = Lanes(bytes);
        }
        self.used = end;
        Some(first)
    }
}

impl Default for ConstantTable {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the vector constants of the code being emitted come from.
#[derive(Clone, Copy)]
pub enum Constants<'t> {
    /// Splatted where they are used (outside vector loops, and in tests).
    Splat,
    /// Loaded from `table` relative to `base`, the current loop's base (see
    /// [`LoopBase`]).
    Table {
        table: &'t RefCell<ConstantTable>,
        base: Value,
    },
}

impl Constants<'_> {
    /// The vector of type `ty` with `lane` (the low `ty.lane_bits()` bits) in every lane,
    /// loaded from the table; `None` for [`Constants::Splat`] or a full table.
    pub fn vector(self, b: &mut FunctionBuilder<'_>, ty: Type, lane: u64) -> Option<Value> {
        let Constants::Table { table, base } = self else {
            return None;
        };
        if !ty.is_vector() {
            return None;
        }
        let width = ty.lane_bits() as usize / 8;
        let mut bytes = [0u8; 16];
        for chunk in bytes.chunks_exact_mut(width) {
            chunk.copy_from_slice(&lane.to_le_bytes()[..width]);
        }
        let offset = table.borrow_mut().offset_of(bytes)?;
        Some(b.ins().load(ty, movable(), base, offset))
    }

    /// Entry `index` (an i64 below `block.len()`) of a table of vectors, loaded as `ty`;
    /// `None` for [`Constants::Splat`] or a full table.
    pub fn vector_at(
        self,
        b: &mut FunctionBuilder<'_>,
        ty: Type,
        block: &[[u8; 16]],
        index: Value,
    ) -> Option<Value> {
        let Constants::Table { table, base } = self else {
            return None;
        };
        let offset = table.borrow_mut().block_offset(block)?;
        let scaled = b.ins().imul_imm_u(index, 16);
        let address = b.ins().iadd(base, scaled);
        Some(b.ins().load(ty, movable(), address, offset))
    }
}

/// The flags of a load from the table: movable, so that equal loads in one iteration are
/// one load; the moving base keeps them inside the loop.
fn movable() -> MemFlagsData {
    MemFlagsData::trusted().with_readonly().with_can_move()
}

/// The base a vector loop reads its constants relative to: the table's address, advanced
/// every iteration by a zero loaded from the table.
pub struct LoopBase {
    variable: cranelift_frontend::Variable,
    step: Value,
}

impl LoopBase {
    /// Emitted before the loop.
    pub fn before_loop(b: &mut FunctionBuilder<'_>, table: &RefCell<ConstantTable>) -> Self {
        let address = b.ins().iconst(I64, table.borrow().address());
        let step = b.ins().load(I64, MemFlagsData::trusted(), address, 0);
        let variable = b.declare_var(I64);
        b.def_var(variable, address);
        LoopBase { variable, step }
    }

    /// Emitted at the start of an iteration: this iteration's base.
    pub fn in_iteration(&self, b: &mut FunctionBuilder<'_>) -> Value {
        let base = b.use_var(self.variable);
        let next = b.ins().iadd(base, self.step);
        b.def_var(self.variable, next);
        base
    }
}
