//! One block of memory per thread, kept from one use to the next.
//!
//! With glibc's defaults a block of 128 KiB or more comes from `mmap` and goes back to the
//! kernel when freed: a buffer allocated afresh on every call is faulted in page by page
//! every call, and its unmapping interrupts the other threads to flush their TLBs. The
//! Gram matrix's transposed panels and the row passes' buffers take this thread's block
//! instead, and give it back when done.

use std::cell::Cell;

thread_local! {
    static SPARE: Cell<Vec<u64>> = const { Cell::new(Vec::new()) };
}

/// This thread's block, with whatever its last user left in it (empty the first time). A
/// nested taker, while the block is out, gets an empty one of its own.
pub fn take() -> Vec<u64> {
    SPARE.take()
}

/// Gives `block` back for this thread's next [`take`].
pub fn keep(block: Vec<u64>) {
    SPARE.set(block);
}
