//! Dense GEMM kernels for the runtime: pair matrices `S = A Bᵀ`, `S = X Xᵀ`
//! and their backward products, in `f32` or `f64` (any [`Real`]).
//!
//! Every product is computed by the `gemm` crate (0.19, the kernel behind
//! faer), always called single-threaded (`Parallelism::None`) on output row
//! panels. The panel layout depends only on the problem shape, never on the
//! thread count, and each output element is written by exactly one panel task,
//! so results are bitwise identical for any `threads` value. (`gemm` documents
//! no such guarantee for its own `Parallelism::Rayon(n)`, so it is not used.)
//! `threads` is the number of workers: with `threads > 1`, panels go to
//! `threads` tasks on the current rayon pool (the global one unless called
//! inside `ThreadPool::install`); `0` and `1` mean the calling thread only.
//! Products below about 0.7 ms of single-core work ignore `threads` and run on
//! the calling thread (waking pool threads costs more than it saves).
//!
//! Inputs may be views with any strides (non-contiguous, transposed, negative):
//! `gemm` reads them in place. Outputs may have any strides too, except that
//! [`gram`] goes through a temporary when its output's rows are not of unit stride.
//! Shapes are checked with `assert!`; empty and single-row shapes are fine.
//!
//! Symmetric backward: `dX += (G + Gᵀ) X` is one GEMM, [`symmetrize`] in place
//! followed by [`ab_acc`]. (Forming `G + Gᵀ` block by block just before each
//! block's product, in cache, measured 1.2 ms slower at n = 1024: the
//! transposed reads then run in the GEMM's critical path, once per panel.)

use super::real::Real;
use super::spare;
use super::transpose::{BLOCK, Block, Transposer};
use multiversion::multiversion;
use ndarray::{ArrayView2, ArrayViewMut2, Axis, ShapeBuilder, s};
use std::sync::Mutex;

/// Below this much work (flops × `size_of::<T>()`; 2^28 = 67 Mflop in f32,
/// about 0.7 ms on one Zen 4 core) a product runs as a single task on the
/// calling thread: waking pool threads costs 0.1–0.2 ms on the target VM.
const MIN_PARALLEL_WORK: usize = 1 << 28;
/// Target flops per row-panel task.
const TASK_FLOPS: usize = 1 << 25;
/// Upper bound on the number of row panels of one product.
const MAX_PANELS: usize = 4;
/// Row panels are multiples of this (keeps gemm micro-tiles full).
const ROW_ALIGN: usize = 16;
/// Panel width bounds for the triangle of [`gram`]; the redundant work on
/// diagonal blocks is about `panel / n` of the triangle.
const TRI_PANEL_MIN: usize = 64;
const TRI_PANEL_MAX: usize = 256;

/// `dst = lhs · rhs`, or `dst += scale · lhs · rhs` with `accumulate = Some(scale)`,
/// single-threaded. `lhs`: r×k, `rhs`: k×c, `dst`: r×c.
fn kernel<T: Real>(
    mut dst: ArrayViewMut2<'_, T>,
    lhs: ArrayView2<'_, T>,
    rhs: ArrayView2<'_, T>,
    accumulate: Option<T>,
) {
    let (r, c) = dst.dim();
    let k = lhs.ncols();
    debug_assert_eq!(lhs.nrows(), r);
    debug_assert_eq!(rhs.dim(), (k, c));
    if r == 0 || c == 0 || (k == 0 && accumulate.is_some()) {
        return;
    }
    let [dst_rs, dst_cs] = [dst.strides()[0], dst.strides()[1]];
    let [lhs_rs, lhs_cs] = [lhs.strides()[0], lhs.strides()[1]];
    let [rhs_rs, rhs_cs] = [rhs.strides()[0], rhs.strides()[1]];
    // SAFETY: `Real` is implemented for f32 and f64 only, both supported by
    // `gemm::gemm` (which dispatches on the `TypeId` of `T` and would panic,
    // not misbehave, on any other type). Each pointer/stride pair comes from a live ndarray view of exactly the
    // shape passed (r×c, r×k, k×c), so every element gemm touches lies inside
    // the view (ndarray points `as_ptr` at element [0, 0] even for negative
    // strides, which gemm accepts). `dst` is borrowed mutably and exclusively,
    // so it cannot alias `lhs`/`rhs`. With `read_dst == false` gemm never
    // reads `dst`; with `true` it computes dst := 1·dst + scale·lhs·rhs.
    unsafe {
        ::gemm::gemm(
            r,
            c,
            k,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            accumulate.is_some(),
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            T::ONE,
            accumulate.unwrap_or(T::ONE),
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        );
    }
}

/// Runs `f` on every item, using up to `threads` workers of the current rayon
/// pool. Items are taken in order from a shared queue (dynamic balancing);
/// which worker runs an item never affects its result.
pub(super) fn run_tasks<I: Send, F: Fn(I) + Sync>(items: Vec<I>, threads: usize, f: F) {
    let workers = threads.min(items.len());
    if workers <= 1 {
        items.into_iter().for_each(f);
        return;
    }
    let queue = Mutex::new(items.into_iter());
    let work = || {
        loop {
            // A poisoned lock only means another task panicked; rayon
            // re-raises that panic when the scope ends.
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
            match next {
                Some(item) => f(item),
                None => break,
            }
        }
    };
    rayon::scope(|sc| {
        for _ in 1..workers {
            sc.spawn(|_| work());
        }
        work();
    });
}

/// Whether `flops` of `T` work is worth handing to other threads.
fn worth_parallel<T>(flops: usize) -> bool {
    flops.saturating_mul(size_of::<T>()) >= MIN_PARALLEL_WORK
}

/// Height of the row panels of an `rows × cols` product with depth `depth`.
/// Depends on the shape only (never on the thread count).
fn panel_rows<T>(rows: usize, cols: usize, depth: usize) -> usize {
    let flops = 2_usize
        .saturating_mul(rows)
        .saturating_mul(cols)
        .saturating_mul(depth);
    if !worth_parallel::<T>(flops) || rows <= ROW_ALIGN {
        return rows.max(1);
    }
    let panels = flops.div_ceil(TASK_FLOPS).clamp(2, MAX_PANELS);
    rows.div_ceil(panels).next_multiple_of(ROW_ALIGN)
}

/// `out = lhs · rhs` (or `+= scale · lhs · rhs`) split into fixed row panels.
fn panelled<T: Real>(
    lhs: ArrayView2<'_, T>,
    rhs: ArrayView2<'_, T>,
    mut out: ArrayViewMut2<'_, T>,
    accumulate: Option<T>,
    threads: usize,
) {
    let (rows, cols) = out.dim();
    let p = panel_rows::<T>(rows, cols, lhs.ncols());
    let tasks: Vec<_> = out
        .axis_chunks_iter_mut(Axis(0), p)
        .zip(lhs.axis_chunks_iter(Axis(0), p))
        .collect();
    run_tasks(tasks, threads, |(o, l)| kernel(o, l, rhs, accumulate));
}

/// `out = a · bᵀ`. `a`: n×d, `b`: m×d, `out`: n×m (previous contents ignored).
pub fn abt<T: Real>(
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    out: ArrayViewMut2<'_, T>,
    threads: usize,
) {
    assert_eq!(
        a.ncols(),
        b.ncols(),
        "abt: a is {:?}, b is {:?}",
        a.dim(),
        b.dim()
    );
    assert_eq!(
        out.dim(),
        (a.nrows(), b.nrows()),
        "abt: out has the wrong shape"
    );
    panelled(a, b.t(), out, None, threads);
}

/// `out += scale · g · b`. `g`: n×m, `b`: m×d, `out`: n×d.
pub fn ab_acc<T: Real>(
    scale: T,
    g: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    out: ArrayViewMut2<'_, T>,
    threads: usize,
) {
    assert_eq!(
        g.ncols(),
        b.nrows(),
        "ab_acc: g is {:?}, b is {:?}",
        g.dim(),
        b.dim()
    );
    assert_eq!(
        out.dim(),
        (g.nrows(), b.ncols()),
        "ab_acc: out has the wrong shape"
    );
    panelled(g, b, out, Some(scale), threads);
}

/// `out += scale · gᵀ · a`. `g`: n×m, `a`: n×d, `out`: m×d.
pub fn atb_acc<T: Real>(
    scale: T,
    g: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    out: ArrayViewMut2<'_, T>,
    threads: usize,
) {
    assert_eq!(
        g.nrows(),
        a.nrows(),
        "atb_acc: g is {:?}, a is {:?}",
        g.dim(),
        a.dim()
    );
    assert_eq!(
        out.dim(),
        (g.ncols(), a.ncols()),
        "atb_acc: out has the wrong shape"
    );
    panelled(g.t(), a, out, Some(scale), threads);
}

/// `out = x · xᵀ` (`x`: n×d, `out`: n×n, previous contents ignored).
///
/// Only the lower triangle (in column panels, each including its diagonal
/// block) is computed; the upper triangle is then copied from it, so `out` is
/// exactly symmetric.
pub fn gram<T: Real>(x: ArrayView2<'_, T>, out: ArrayViewMut2<'_, T>, threads: usize) {
    gram_with(x, out, threads, |_, _| {});
}

/// [`gram`], with `transform(first, panel)` applied to each column panel of the lower
/// triangle as soon as it is computed, while it is in cache, and before the mirroring: an
/// elementwise function of a symmetric matrix, on half of it. `panel` holds rows `first..n`
/// and columns `first..first + panel.ncols()`; its entries above the diagonal are
/// overwritten by the mirroring afterwards.
///
/// The triangle is computed in column panels (each from its diagonal block down): `gemm`
/// then packs only the panel's few columns of `x`, where row panels (each from column 0
/// to its diagonal) had it gather every earlier row of `x` again, panel after panel (a
/// quarter of the Gram matrix's time at n = 1024). The products are the same, bit for bit.
pub fn gram_with<T: Real>(
    x: ArrayView2<'_, T>,
    mut out: ArrayViewMut2<'_, T>,
    threads: usize,
    transform: impl Fn(usize, ArrayViewMut2<'_, T>) + Sync,
) {
    let n = x.nrows();
    assert_eq!(out.dim(), (n, n), "gram: out must be {n}x{n}");
    if n == 0 {
        return;
    }
    // Rows of unit stride, each `ld` after the last (padded rows are welcome: rows exactly
    // 4 KiB apart share their cache sets, and a panel of them does not stay in cache).
    let [row_stride, column_stride] = [out.strides()[0], out.strides()[1]];
    let ld = usize::try_from(row_stride).unwrap_or(0);
    if column_stride != 1 || ld < n {
        let mut tmp = vec![T::ZERO; n * n];
        let view = ArrayViewMut2::from_shape((n, n), &mut tmp[..]).expect("n*n buffer");
        gram_with(x, view, threads, transform);
        out.assign(&ArrayView2::from_shape((n, n), &tmp[..]).expect("n*n buffer"));
        return;
    }
    let p = (n / 8)
        .next_multiple_of(ROW_ALIGN)
        .clamp(TRI_PANEL_MIN, TRI_PANEL_MAX);
    // Largest panels first (the leftmost): better balance.
    let tasks: Vec<(usize, usize)> = (0..n).step_by(p).map(|j| (j, p.min(n - j))).collect();
    let d = x.ncols();
    let threads = if worth_parallel::<T>(n.saturating_mul(n).saturating_mul(d)) {
        threads
    } else {
        1
    };
    let x = x.as_standard_layout();
    let rows = x.as_slice().expect("a standard-layout copy is contiguous");
    let base = SharedMut(out.as_mut_ptr());
    run_tasks(tasks, threads, |(first, width)| {
        // The panel of columns first..first + width, from its diagonal block down; the task
        // then mirrors it onto rows first..first + width from that block right, while it is
        // in cache. What the tasks touch is disjoint: panel j's rows start at or below the
        // diagonal block of every panel to its right, and its mirror's rows end above the
        // rows of those panels, while every panel to its left lies in columns before it.
        let corner = first * ld + first;
        // SAFETY: the panel lies in `out` (n x n, rows `ld` apart), and no other task
        // touches it (above).
        let mut panel = unsafe {
            let shape = (n - first, width).strides((ld, 1));
            ArrayViewMut2::from_shape_ptr(shape, base.start().add(corner))
        };
        // The panel's rows of x, transposed: gemm reads them in place, where it would copy
        // them into a fresh buffer (see `spare`) to transpose them itself.
        with_scratch(width * d, |transposed: &mut [T]| {
            transpose_into(transposed, width, &rows[first * d..], d, d, width);
            let columns = ArrayView2::from_shape((d, width), &*transposed).expect("d x width");
            kernel(panel.view_mut(), x.slice(s![first.., ..]), columns, None);
        });
        transform(first, panel);
        // SAFETY: the diagonal block and the panel below it are this task's; so are the rows
        // of the diagonal block to its right (above). The view of the panel is gone.
        unsafe {
            let corner = base.start().add(corner);
            mirror_square(corner, ld, width);
            let below = corner.add(width * ld);
            transpose_raw(corner.add(width), ld, below, ld, width, n - first - width);
        }
    });
}

/// Runs `f` on `len` floats of this thread's [`spare`] block.
fn with_scratch<T: Real, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let mut words = spare::take();
    let needed = (len * size_of::<T>()).div_ceil(size_of::<u64>());
    if words.len() < needed {
        words.resize(needed, 0);
    }
    // SAFETY: `T` is f32 or f64 (the only `Real`s), for which every bit pattern is a value
    // and whose alignment u64's covers; the `len` floats lie inside the vector, which
    // nothing else refers to while `f` runs.
    let floats = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<T>(), len) };
    let result = f(floats);
    spare::keep(words);
    result
}

/// `g ← g + gᵀ` in place, on the leading `min(rows, cols)` square block, so
/// that `dX += (G + Gᵀ) X` is then one [`ab_acc`]. The result is exactly
/// symmetric and does not depend on the thread count.
pub fn symmetrize<T: Real>(g: ArrayViewMut2<'_, T>, threads: usize) {
    symmetrize_by(g, threads, &Sum);
}

/// [`MirrorPairs`] of [`symmetrize`]: both entries become their sum.
struct Sum;

impl<T: Real> MirrorPairs<T> for Sum {
    type State = ();

    fn state(&self) {}

    #[inline(always)]
    fn block(&self, _: &mut (), _: (usize, usize), upper: &mut Block<T>, lower: &mut Block<T>) {
        // Row by row: flattened, the block stayed off the vector lanes.
        for (upper, lower) in upper.iter_mut().zip(lower.iter_mut()) {
            for (u, l) in upper.iter_mut().zip(lower.iter_mut()) {
                let v = *u + *l;
                *u = v;
                *l = v;
            }
        }
    }

    #[inline(always)]
    fn single(&self, _: &mut (), _: (usize, usize), upper: T, lower: T) -> T {
        upper + lower
    }
}

/// How [`symmetrize_by`] combines each entry above the diagonal with its mirror below it:
/// both get the same value. The methods are inlined into code compiled for AVX2 and
/// AVX-512, so that a block's arithmetic runs on vector lanes.
pub trait MirrorPairs<T>: Sync {
    /// What one task accumulates.
    type State: Send;

    /// A task's state before its first pair.
    fn state(&self) -> Self::State;

    /// The block whose first entry is `(i, j)` (above the diagonal): `upper[a][b]` is entry
    /// `(i + a, j + b)` and `lower[a][b]` its mirror `(j + b, i + a)`.
    fn block(
        &self,
        state: &mut Self::State,
        at: (usize, usize),
        upper: &mut Block<T>,
        lower: &mut Block<T>,
    );

    /// The value of entry `(i, j)` and of its mirror (with `i <= j`; on the diagonal both
    /// are the one entry).
    fn single(&self, state: &mut Self::State, at: (usize, usize), upper: T, lower: T) -> T;
}

/// Tasks of [`symmetrize_by`]: a fixed number, whatever the thread count, so that what
/// each accumulates does not depend on it; a few per thread, since sharing out single
/// tiles costs more than it balances.
const SYMMETRIZE_TASKS: usize = 8;

/// Makes the leading `min(rows, cols)` square block of `g` symmetric by combining each
/// entry above the diagonal with its mirror as `pairs` says. Pairs of 64 x 64 tiles (one
/// above the diagonal, its mirror below) are shared out between `SYMMETRIZE_TASKS` tasks
/// in a fixed order, each with its own state; the states come back in task order, and
/// each element is written once, so nothing depends on the thread count.
pub fn symmetrize_by<T: Real, P: MirrorPairs<T>>(
    mut g: ArrayViewMut2<'_, T>,
    threads: usize,
    pairs: &P,
) -> Vec<P::State> {
    const TILE: usize = 64;
    let n = g.nrows().min(g.ncols());
    // Rows of unit stride, each starting `ld` after the last: padded rows are welcome
    // (rows 4 KiB apart share their cache sets, and cost this pass a third of its speed).
    let (row_stride, column_stride) = (g.strides()[0], g.strides()[1]);
    let ld = usize::try_from(row_stride).unwrap_or(0);
    if column_stride != 1 || ld < g.ncols() {
        let mut state = pairs.state();
        for i in 0..n {
            for j in i..n {
                let v = pairs.single(&mut state, (i, j), g[(i, j)], g[(j, i)]);
                g[(i, j)] = v;
                g[(j, i)] = v;
            }
        }
        return vec![state];
    }
    let tiles = n.div_ceil(TILE);
    let tile_pairs: Vec<(usize, usize)> = (0..tiles)
        .flat_map(|a| (a..tiles).map(move |b| (a * TILE, b * TILE)))
        .collect();
    let threads = if n < 512 { 1 } else { threads };
    let base = SharedMut(g.as_mut_ptr());
    let per_task = tile_pairs.len().div_ceil(SYMMETRIZE_TASKS).max(1);
    let chunks: Vec<&[(usize, usize)]> = tile_pairs.chunks(per_task).collect();
    let mut states: Vec<P::State> = chunks.iter().map(|_| pairs.state()).collect();
    let tasks: Vec<_> = chunks.into_iter().zip(states.iter_mut()).collect();
    let transposer = Transposer::detect();
    run_tasks(tasks, threads, |(chunk, state)| {
        for &(i0, j0) in chunk {
            let (h, w) = (TILE.min(n - i0), TILE.min(n - j0));
            // SAFETY: the tile at (i0, j0) and its mirror lie inside the n x ld buffer, and
            // no other task touches them.
            unsafe { symmetrize_tile(&base, ld, (i0, j0), (h, w), (pairs, transposer), state) }
        }
    });
    states
}

/// A pointer tasks share to write disjoint parts of one buffer.
struct SharedMut<T>(*mut T);
// SAFETY: the tasks given it write disjoint elements and are joined before the
// buffer is used again.
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The buffer's start (a method, so that closures capture the `Sync` wrapper).
    fn start(&self) -> *mut T {
        self.0
    }
}

/// Combines the `h × w` tile at row `i0`, column `j0` of a row-major buffer (row
/// length `ld`) with its mirror tile (row `j0`, column `i0`), as [`symmetrize_by`]
/// describes, `BLOCK × BLOCK` blocks at a time off the diagonal.
///
/// # Safety
/// Both tiles lie inside the buffer at `base`, and nothing else reads or writes
/// them while this runs.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
unsafe fn symmetrize_tile<T: Real, P: MirrorPairs<T>>(
    base: &SharedMut<T>,
    ld: usize,
    (i0, j0): (usize, usize),
    (h, w): (usize, usize),
    (pairs, transposer): (&P, Transposer),
    state: &mut P::State,
) {
    // SAFETY (for every use): the caller keeps (i, j) inside the buffer.
    let at = |i: usize, j: usize| unsafe { base.0.add(i * ld + j) };
    let full_blocks = i0 != j0;
    for i in (0..h).step_by(BLOCK) {
        let rows = BLOCK.min(h - i);
        for j in (0..w).step_by(BLOCK) {
            let cols = BLOCK.min(w - j);
            let (gi, gj) = (i0 + i, j0 + j);
            if full_blocks && rows == BLOCK && cols == BLOCK {
                // SAFETY: both blocks lie in the tiles, which are disjoint off the diagonal.
                unsafe {
                    let blocks = (at(gi, gj), at(gj, gi));
                    symmetrize_block(blocks, ld, (gi, gj), (pairs, transposer), state);
                };
                continue;
            }
            for a in 0..rows {
                for b in 0..cols {
                    let (gi, gj) = (gi + a, gj + b);
                    if gi <= gj {
                        // SAFETY: both entries lie in the tiles (one entry on the diagonal).
                        unsafe {
                            let v = pairs.single(state, (gi, gj), *at(gi, gj), *at(gj, gi));
                            *at(gi, gj) = v;
                            *at(gj, gi) = v;
                        }
                    }
                }
            }
        }
    }
}

/// [`symmetrize_tile`] of one block at `upper` (whose first entry is `at`) and its mirror
/// at `lower`: both are read into registers (`lower` transposed), combined, and written
/// back.
///
/// # Safety
/// Both blocks (rows of length `ld`) are valid, disjoint and not used elsewhere.
#[inline(always)]
unsafe fn symmetrize_block<T: Real, P: MirrorPairs<T>>(
    (upper, lower): (*mut T, *mut T),
    ld: usize,
    at: (usize, usize),
    (pairs, transposer): (&P, Transposer),
    state: &mut P::State,
) {
    let mut above = [[T::ZERO; BLOCK]; BLOCK];
    for (a, row) in above.iter_mut().enumerate() {
        // SAFETY: row `a` of the block at `upper`, inside it as the caller guarantees.
        row.copy_from_slice(unsafe { &*std::ptr::slice_from_raw_parts(upper.add(a * ld), BLOCK) });
    }
    // below[a][b] is lower's row b, column a: the mirror of above[a][b].
    // SAFETY: the caller vouches for the block at `lower`.
    let mut below = unsafe { transposer.load(lower, ld) };
    pairs.block(state, at, &mut above, &mut below);
    for (a, row) in above.iter().enumerate() {
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), upper.add(a * ld), BLOCK) };
    }
    // SAFETY: as above.
    unsafe { transposer.store(&below, lower, ld) };
}

/// `dst[i·dld + j] = src[j·sld + i]` for `i < rows`, `j < cols`.
fn transpose_into<T: Real>(
    dst: &mut [T],
    dld: usize,
    src: &[T],
    sld: usize,
    rows: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(src.len() >= (cols - 1) * sld + rows && dst.len() >= (rows - 1) * dld + cols);
    // SAFETY: both ranges lie in their slices (checked above); a mutable slice and a shared
    // one do not overlap.
    unsafe { transpose_raw(dst.as_mut_ptr(), dld, src.as_ptr(), sld, rows, cols) }
}

/// [`transpose_into`] on raw pointers, for parts of one matrix.
///
/// Cache-blocked: 64×64 blocks of 8×8 register tiles, each moved by a
/// [`Transposer`]; every source row segment is read contiguously. Compiled for
/// AVX2 and AVX-512 too, so that the tiles' shuffles are inlined.
///
/// # Safety
/// The `rows × cols` entries at `dst` (rows `dld` apart) and the `cols × rows` at `src`
/// (rows `sld` apart) are valid, do not overlap, and nothing else uses them meanwhile.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
unsafe fn transpose_raw<T: Real>(
    dst: *mut T,
    dld: usize,
    src: *const T,
    sld: usize,
    rows: usize,
    cols: usize,
) {
    const B: usize = 64;
    // SAFETY (for every use): entry (a, b) of `dst` and (b, a) of `src`, inside them.
    let scalar = |i: std::ops::Range<usize>, j: std::ops::Range<usize>| {
        for a in i {
            for b in j.clone() {
                unsafe { *dst.add(a * dld + b) = *src.add(b * sld + a) };
            }
        }
    };
    let transposer = Transposer::detect();
    for i0 in (0..rows).step_by(B) {
        let i1 = (i0 + B).min(rows);
        for j0 in (0..cols).step_by(B) {
            let j1 = (j0 + B).min(cols);
            let mut i = i0;
            while i + BLOCK <= i1 {
                let mut j = j0;
                while j + BLOCK <= j1 {
                    // SAFETY: the block's rows i..i + 8 of `dst` and j..j + 8 of `src` lie
                    // inside them, as the caller guarantees.
                    unsafe {
                        let (from, to) = (src.add(j * sld + i), dst.add(i * dld + j));
                        transposer.block(from, sld, to, dld);
                    }
                    j += BLOCK;
                }
                scalar(i..i + BLOCK, j..j1);
                i += BLOCK;
            }
            scalar(i..i1, j0..j1);
        }
    }
}

/// Copies the strictly lower triangle of the `len × len` block at `corner` (rows `ld`
/// apart) onto its upper triangle.
///
/// # Safety
/// The block is valid, and nothing else uses it meanwhile.
unsafe fn mirror_square<T: Real>(corner: *mut T, ld: usize, len: usize) {
    if len <= 64 {
        for i in 0..len {
            for j in i + 1..len {
                // SAFETY: both entries lie in the block.
                unsafe { *corner.add(i * ld + j) = *corner.add(j * ld + i) };
            }
        }
        return;
    }
    // The two diagonal quarters, then the lower-left quarter onto the upper-right one: all
    // four are disjoint.
    let h = (len / 2).next_multiple_of(8);
    let w = len - h;
    // SAFETY: the quarters lie in the block.
    unsafe {
        mirror_square(corner, ld, h);
        mirror_square(corner.add(h * ld + h), ld, w);
        transpose_raw(corner.add(h), ld, corner.add(h * ld), ld, h, w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, ShapeBuilder};

    /// Unit roundoff of `T`.
    fn eps<T: Real>() -> f64 {
        if size_of::<T>() == 4 { 6e-8 } else { 1.2e-16 }
    }

    /// Deterministic pseudo-random matrix with entries in [-1, 1).
    fn rand_mat<T: Real>(r: usize, c: usize, seed: u64) -> Array2<T> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Array2::from_shape_fn((r, c), |_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_f64((s >> 11) as f64 / (1_u64 << 53) as f64 * 2.0 - 1.0)
        })
    }

    fn naive(a: &Array2<f64>, b: &Array2<f64>) -> Array2<f64> {
        let (n, k) = a.dim();
        let m = b.ncols();
        Array2::from_shape_fn((n, m), |(i, j)| (0..k).map(|l| a[[i, l]] * b[[l, j]]).sum())
    }

    fn to64<T: Real>(a: &Array2<T>) -> Array2<f64> {
        a.mapv(T::to_f64)
    }

    /// |got - want| <= 4·depth·eps·(1 + |want|) elementwise (entries of the
    /// inputs are in [-1, 1], so this is a loose standard GEMM error bound).
    fn close<T: Real>(got: &Array2<T>, want: &Array2<f64>, depth: usize, what: &str) {
        assert_eq!(got.dim(), want.dim(), "{what}: shape");
        let tol = 4.0 * (depth as f64 + 2.0) * eps::<T>();
        for ((i, j), &w) in want.indexed_iter() {
            let g = got[[i, j]].to_f64();
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}: [{i},{j}] got {g}, want {w}"
            );
        }
    }

    /// Exact bit patterns (f32 -> f64 widening is exact and injective).
    fn bits<T: Real>(a: &Array2<T>) -> Vec<u64> {
        a.iter().map(|v| v.to_f64().to_bits()).collect()
    }

    /// All five routines on one shape, against the f64 naive product, and
    /// bitwise identical for 1, 2 and 3 threads.
    fn check_case<T: Real>(n: usize, m: usize, d: usize, seed: u64) {
        let a: Array2<T> = rand_mat(n, d, seed);
        let b: Array2<T> = rand_mat(m, d, seed + 1);
        let g: Array2<T> = rand_mat(n, m, seed + 2);
        let gs: Array2<T> = rand_mat(n, n, seed + 3);
        let init_a: Array2<T> = rand_mat(n, d, seed + 4);
        let init_b: Array2<T> = rand_mat(m, d, seed + 5);
        let (a64, b64, g64, gs64) = (to64(&a), to64(&b), to64(&g), to64(&gs));
        let want_abt = naive(&a64, &b64.t().to_owned());
        let want_gram = naive(&a64, &a64.t().to_owned());
        let want_ab = to64(&init_a) + naive(&g64, &b64);
        let want_atb = to64(&init_b) + naive(&g64.t().to_owned(), &a64);
        let want_sym = to64(&init_a) + naive(&(&gs64 + &gs64.t()), &a64);

        let mut first: Option<[Array2<T>; 5]> = None;
        for threads in [1, 2, 3] {
            let ctx = format!("n={n} m={m} d={d} threads={threads}");
            // Outputs start as NaN where they are overwritten.
            let mut s = Array2::from_elem((n, m), T::from_f64(f64::NAN));
            abt(a.view(), b.view(), s.view_mut(), threads);
            close(&s, &want_abt, d, &format!("abt {ctx}"));
            let mut k = Array2::from_elem((n, n), T::from_f64(f64::NAN));
            gram(a.view(), k.view_mut(), threads);
            close(&k, &want_gram, d, &format!("gram {ctx}"));
            assert_eq!(
                bits(&k),
                bits(&k.t().to_owned()),
                "gram not exactly symmetric, {ctx}"
            );
            let mut da = init_a.clone();
            ab_acc(T::ONE, g.view(), b.view(), da.view_mut(), threads);
            close(&da, &want_ab, m, &format!("ab_acc {ctx}"));
            let mut db = init_b.clone();
            atb_acc(T::ONE, g.view(), a.view(), db.view_mut(), threads);
            close(&db, &want_atb, n, &format!("atb_acc {ctx}"));
            let mut dx = init_a.clone();
            let mut sym = gs.clone();
            symmetrize(sym.view_mut(), threads);
            ab_acc(T::ONE, sym.view(), a.view(), dx.view_mut(), threads);
            close(&dx, &want_sym, 2 * n, &format!("symmetrize + ab_acc {ctx}"));

            let now = [s, k, da, db, dx];
            match &first {
                None => first = Some(now),
                Some(f) => {
                    for (name, (x, y)) in ["abt", "gram", "ab_acc", "atb_acc", "symmetrize"]
                        .iter()
                        .zip(f.iter().zip(&now))
                    {
                        assert!(
                            bits(x) == bits(y),
                            "{name}: threads={threads} differs from threads=1 ({ctx})"
                        );
                    }
                }
            }
        }
    }

    /// Small and degenerate shapes (0, 1, odd sizes): these run as single
    /// tasks or a few panels.
    fn small_shapes<T: Real>() {
        let mut seed = 10;
        for &n in &[0, 1, 2, 3, 7, 17, 33, 64, 100, 130, 257] {
            for &d in &[0, 1, 3, 16, 37, 128] {
                for m in [0, 1, (n * 3 / 2 + 5) % 263] {
                    seed += 10;
                    check_case::<T>(n, m, d, seed);
                }
            }
        }
    }

    #[test]
    fn small_shapes_f32() {
        small_shapes::<f32>();
    }

    #[test]
    fn small_shapes_f64() {
        small_shapes::<f64>();
    }

    /// Shapes above the parallel threshold, with ragged last panels, so that
    /// 2 and 3 threads really run concurrently.
    #[test]
    fn threaded_shapes() {
        check_case::<f32>(777, 531, 129, 1);
        check_case::<f64>(777, 531, 129, 2);
        check_case::<f64>(301, 1029, 300, 3);
    }

    /// Large enough for the parallel mirror of `gram` (n >= 1024).
    #[test]
    fn large_gram_thread_invariance() {
        let (n, d) = (1100, 70);
        let x: Array2<f32> = rand_mat(n, d, 7);
        let run = |t: usize| {
            let mut k = Array2::zeros((n, n));
            gram(x.view(), k.view_mut(), t);
            k
        };
        let k1 = run(1);
        assert!(bits(&k1) == bits(&k1.t().to_owned()), "not symmetric");
        let x64 = to64(&x);
        close(&k1, &naive(&x64, &x64.t().to_owned()), d, "large gram");
        for t in [2, 3] {
            assert!(bits(&k1) == bits(&run(t)), "threads={t}");
        }
    }

    #[test]
    fn symmetrize_matches_g_plus_gt() {
        for &(r, c) in &[
            (0, 0),
            (1, 1),
            (5, 3),
            (3, 5),
            (64, 64),
            (65, 65),
            (200, 203),
            (517, 517),
            (700, 700),
        ] {
            let g: Array2<f64> = rand_mat(r, c, 9);
            let n = r.min(c);
            let mut want = g.clone();
            let sq = g.slice(s![..n, ..n]);
            want.slice_mut(s![..n, ..n]).assign(&(&sq + &sq.t()));
            for threads in [1, 2, 3] {
                let mut got = g.clone();
                symmetrize(got.view_mut(), threads);
                assert!(bits(&got) == bits(&want), "{r}x{c}, {threads} threads");
                let mut got_f = Array2::<f64>::zeros((r, c).f());
                got_f.assign(&g);
                symmetrize(got_f.view_mut(), threads);
                assert!(bits(&got_f) == bits(&want), "{r}x{c} column-major");
                // Rows padded past their end, as the runtime allocates adjoints.
                let mut padded = Array2::<f64>::from_elem((r, c + 5), f64::NAN);
                padded.slice_mut(s![.., ..c]).assign(&g);
                symmetrize(padded.slice_mut(s![.., ..c]), threads);
                let got_padded = padded.slice(s![.., ..c]).to_owned();
                assert!(bits(&got_padded) == bits(&want), "{r}x{c} padded rows");
                assert!(padded.slice(s![.., c..]).iter().all(|v| v.is_nan()));
            }
        }
    }

    /// Non-contiguous, transposed, column-major and reversed views.
    #[test]
    fn strided_views() {
        let (n, m, d) = (37, 29, 11);
        let big_a: Array2<f64> = rand_mat(2 * n, 3 * d, 1);
        let a = big_a.slice(s![..;2, 1..;3]); // n×d, non-contiguous
        let b_cm: Array2<f64> = rand_mat(d, m, 2).reversed_axes(); // m×d, column-major
        let b = b_cm.slice(s![..;-1, ..]); // negative stride
        let g_t: Array2<f64> = rand_mat(m, n, 3);
        let g = g_t.t(); // n×m transposed view
        let (a64, b64, g64) = (a.to_owned(), b.to_owned(), g.to_owned());

        let mut out_big = Array2::<f64>::zeros((n, 2 * m).f());
        abt(a, b, out_big.slice_mut(s![.., ..;2]), 2);
        close(
            &out_big.slice(s![.., ..;2]).to_owned(),
            &naive(&a64, &b64.t().to_owned()),
            d,
            "abt strided",
        );

        let mut k = Array2::<f64>::zeros((n, n).f());
        gram(a, k.view_mut(), 2);
        close(&k, &naive(&a64, &a64.t().to_owned()), d, "gram strided");
        assert!(bits(&k) == bits(&k.t().to_owned()));

        let mut da = Array2::<f64>::zeros((d, n)).reversed_axes();
        ab_acc(1.0, g, b, da.view_mut(), 2);
        close(&da, &naive(&g64, &b64), m, "ab_acc strided");

        let mut db = Array2::<f64>::ones((2 * m, d));
        atb_acc(1.0, g, a, db.slice_mut(s![..;-2, ..]), 2);
        let want = naive(&g64.t().to_owned(), &a64).mapv(|v| v + 1.0);
        close(
            &db.slice(s![..;-2, ..]).to_owned(),
            &want,
            n,
            "atb_acc strided",
        );
    }
}
