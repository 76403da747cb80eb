//! The interface between the runtime and the generated kernels.
//!
//! A kernel runs one pass of one block for one anchor:
//! `kernel(args, anchor, buffers, values, indices) -> status`. `args` points at a
//! [`KernelArgs`] that the runtime fills per call; `buffers` at the kernel's row buffers
//! ([`RowBuffer`]: an index list per set it materialises, a float per column for values
//! it keeps between loops), each as long as its column domain; `values` and `indices` at
//! scratch buffers as long as the longest column domain, for the helpers that sort and
//! sample. The status is a bit set of [`Status`] flags.

use crate::ir::Domain;

/// Everything a kernel reads and writes besides its per-thread buffers. The tables of
/// matrices, batch values, stored values, vectors and adjoints hold what the pass's
/// [`Bindings`](super::kernel::Bindings) list, in that order; the per-domain and
/// per-grouping tables are indexed by [`domain_slot`] and the grouping's index.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KernelArgs {
    /// Per bound matrix: its values, row-major, in the run's float type.
    pub matrices: *const *const u8,
    /// Per bound matrix: how many floats apart its rows start (at least its number of
    /// columns: the runtime pads them).
    pub matrix_strides: *const u64,
    /// Per bound batch-level number or condition: its value (f64).
    pub batch: *const f64,
    /// Per bound per-anchor number: its values per anchor (f64), which an earlier pass stored.
    pub stored: *const *const f64,
    /// Per bound batch-level vector: its values (f64).
    pub vectors: *const *const f64,
    /// Per output slot of the pass: one value (or `width` values) per anchor.
    pub outputs: *const *mut u8,
    /// Per anchor of the block: 1 when skipped.
    pub skipped: *mut u8,
    /// Per anchor of the block: 1 when an earlier pass over it skipped the anchor (all
    /// zeros in the first pass).
    pub was_skipped: *const u8,
    /// Per bound adjoint slot: its matrix's adjoint `dL/dM` (or a part of it), row-major.
    pub grads: *const *mut u8,
    /// Per bound adjoint slot: how many floats apart its rows start (at least its number
    /// of columns: the runtime pads them).
    pub grad_strides: *const u64,
    /// Per domain slot ([`domain_slot`]): the label of each row of the domain.
    pub labels: *const *const i64,
    /// Per domain slot: the class id of each row (i32; -2 for rows without a class),
    /// followed by padding for vector loads.
    pub ids: *const *const i32,
    /// Per class id: where its samples start in `class_members`; one more entry at the end.
    pub class_starts: *const u32,
    /// The samples of each class in index order, class after class.
    pub class_members: *const u32,
    /// Per domain slot: how many rows the domain has.
    pub domain_len: *const u64,
    /// Per grouping: the group of each sample, followed by padding for vector loads.
    pub groups: *const *const u32,
    /// Per grouping: the size of each group, followed by padding for vector loads.
    pub sizes: *const *const u32,
    /// The seed of the sampling streams.
    pub seed: u64,
}

/// The signature of a compiled kernel.
pub type KernelFn = unsafe extern "C" fn(
    args: *const KernelArgs,
    anchor: u64,
    buffers: *const *mut u8,
    values: *mut u8,
    indices: *mut u32,
) -> u32;

/// A buffer of one row that the runtime gives each thread, one entry per column of a
/// domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowBuffer {
    /// Column indices (u32): the members of a set.
    Indices(Domain),
    /// One float of the run's type per column: a per-member value computed in one loop
    /// and read in a later one.
    Floats(Domain),
}

impl RowBuffer {
    pub fn domain(self) -> Domain {
        match self {
            RowBuffer::Indices(d) | RowBuffer::Floats(d) => d,
        }
    }
}

/// Conditions a kernel reports instead of failing: the runtime then lets the interpreter
/// evaluate the batch, which either finds the value well defined after all (the flag came
/// from a branch the interpreter does not take) or reports the precise error.
pub struct Status;

impl Status {
    /// A mean or standard deviation of an empty set.
    pub const EMPTY: u32 = 1;
    /// A rank beyond the set's size.
    pub const RANK: u32 = 2;
    /// A count that is not a non-negative integer.
    pub const COUNT: u32 = 4;
    /// Weights the sampler rejects (NaN).
    pub const SAMPLE: u32 = 8;
}

/// The slot of a domain in the per-domain tables: samples first, then each grouping.
pub fn domain_slot(domain: Domain) -> usize {
    match domain {
        Domain::Samples => 0,
        Domain::Groups(g) => 1 + g.index(),
    }
}
