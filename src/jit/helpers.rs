//! Rust functions the generated kernels call for what is not worth generating inline:
//! sorting and selecting, sampling, merging index lists. Each matches the interpreter's
//! semantics exactly (ties to the lower position, the same sampling streams).

use crate::runtime::sample::{WeightedSampler, stream};
use multiversion::multiversion;
use std::cell::RefCell;

/// A float type the kernels compute in.
pub trait Lane: Copy + PartialOrd + std::ops::Neg<Output = Self> + 'static {
    fn to_f64(self) -> f64;
    /// An integer whose order is the value's total order (`total_cmp`): negative values
    /// (NaN with the sign bit too) have all their bits flipped, the others the sign bit set.
    fn order_bits(self) -> u64;
    /// The value's [`Lane::order_bits`] and a position in one integer, whose order is that
    /// of the pairs (value in the total order, position): one comparison where a pair
    /// takes two and a branch.
    type Keyed: Ord + Copy + 'static;
    fn keyed(self, position: u32) -> Self::Keyed;
    fn position(keyed: Self::Keyed) -> u32;
    /// Runs `f` on this thread's scratch lists (positions, keyed values) for a selection.
    fn with_scratch<R>(f: impl FnOnce(&mut Vec<u32>, &mut Vec<Self::Keyed>) -> R) -> R;
    /// The positions of the values whose key (the value, or its negation when `largest`)
    /// is at most `bound`, in order, into `out`.
    fn candidates(values: &[Self], bound: Self, largest: bool, out: &mut Vec<u32>) {
        candidates(values, bound, |v: Self| if largest { -v } else { v }, out)
    }
}

impl Lane for f32 {
    type Keyed = u64;
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn keyed(self, position: u32) -> u64 {
        self.order_bits() << 32 | u64::from(position)
    }
    fn position(keyed: u64) -> u32 {
        keyed as u32
    }
    fn with_scratch<R>(f: impl FnOnce(&mut Vec<u32>, &mut Vec<u64>) -> R) -> R {
        SCRATCH_F32.with_borrow_mut(|(chosen, keyed)| f(chosen, keyed))
    }
    fn order_bits(self) -> u64 {
        let bits = self.to_bits();
        u64::from(if bits >> 31 == 1 {
            !bits
        } else {
            bits | 1 << 31
        })
    }
    fn candidates(values: &[f32], bound: f32, largest: bool, out: &mut Vec<u32>) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, as just checked.
            return unsafe { candidates_avx512(values, bound, largest, out) };
        }
        candidates(values, bound, |v: f32| if largest { -v } else { v }, out)
    }
}

/// [`Lane::candidates`] of `f32` values sixteen at a time: a lane mask of the comparisons
/// compresses the lanes' positions to the front of one store, and the length grows by its
/// popcount.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn candidates_avx512(values: &[f32], bound: f32, largest: bool, out: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    const LANES: usize = 16;
    // Each store writes sixteen lanes from the current length on, which never exceeds the
    // positions looked at so far: the last store ends within `values.len() + LANES`.
    out.clear();
    out.reserve(values.len() + LANES);
    let start = out.as_mut_ptr();
    let mut len = 0;
    // `-v <= bound` is `v >= -bound` (negation is exact; NaN meets neither).
    let limit = _mm512_set1_ps(if largest { -bound } else { bound });
    let mut positions = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let step = _mm512_set1_epi32(LANES as i32);
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        // SAFETY: `chunk` holds sixteen f32; `out`'s capacity has room for sixteen from
        // `len` on.
        unsafe {
            let v = _mm512_loadu_ps(chunk.as_ptr());
            let kept = if largest {
                _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, limit)
            } else {
                _mm512_cmp_ps_mask::<_CMP_LE_OQ>(v, limit)
            };
            let packed = _mm512_maskz_compress_epi32(kept, positions);
            _mm512_storeu_si512(start.add(len).cast(), packed);
            len += kept.count_ones() as usize;
        }
        positions = _mm512_add_epi32(positions, step);
    }
    let first = (values.len() - tail.len()) as u32;
    for (p, &v) in (first..).zip(tail) {
        // SAFETY: as above, one entry.
        unsafe { start.add(len).write(p) };
        len += usize::from(if largest { -v <= bound } else { v <= bound });
    }
    // SAFETY: the stores wrote every entry before `len` (the positions kept), within the
    // capacity reserved.
    unsafe { out.set_len(len) };
}

impl Lane for f64 {
    type Keyed = u128;
    fn to_f64(self) -> f64 {
        self
    }
    fn keyed(self, position: u32) -> u128 {
        u128::from(self.order_bits()) << 32 | u128::from(position)
    }
    fn position(keyed: u128) -> u32 {
        keyed as u32
    }
    fn with_scratch<R>(f: impl FnOnce(&mut Vec<u32>, &mut Vec<u128>) -> R) -> R {
        SCRATCH_F64.with_borrow_mut(|(chosen, keyed)| f(chosen, keyed))
    }
    fn order_bits(self) -> u64 {
        let bits = self.to_bits();
        if bits >> 63 == 1 {
            !bits
        } else {
            bits | 1 << 63
        }
    }
}

/// A count argument as an integer, if it is a non-negative integer.
fn count(value: f64) -> Option<usize> {
    (value >= 0.0 && value.is_finite() && value == value.trunc()).then_some(value as usize)
}

/// The first `k` positions of 0..len in the order by (value, position) ascending, or by
/// value descending and position ascending when `largest`: the k-th last, the others
/// before it in no particular order.
fn first_in_order<F: Lane>(values: &[F], k: usize, largest: bool) -> Vec<u32> {
    let bound = candidate_bound(values, k, largest);
    select_first(values, k, largest, bound, |first| {
        first.iter().map(|&keyed| F::position(keyed)).collect()
    })
}

/// `then` of the first `k` (at most all) of the values in the order of [`first_in_order`],
/// keyed ([`Lane::keyed`]), the k-th last. Only the candidates within `bound` are looked
/// at, and they are partitioned, not sorted: a row's rank 100 of 1023 looks at a few
/// hundred values.
fn select_first<F: Lane, R>(
    values: &[F],
    k: usize,
    largest: bool,
    bound: Bound<F>,
    then: impl FnOnce(&[F::Keyed]) -> R,
) -> R {
    // Negation is exact, so `largest` is the same order on -v.
    let key = |v: F| if largest { -v } else { v };
    let k = k.min(values.len());
    if k == 0 {
        return then(&[]);
    }
    F::with_scratch(|chosen, keyed| {
        keyed.clear();
        match bound {
            Bound::Within(bound) => {
                F::candidates(values, bound, largest, chosen);
                keyed.extend((chosen.iter()).map(|&p| key(values[p as usize]).keyed(p)));
            }
            Bound::None | Bound::NaN => {
                keyed.extend((0u32..).zip(values).map(|(p, &v)| key(v).keyed(p)));
            }
        }
        keyed.select_nth_unstable(k - 1);
        then(&keyed[..k])
    })
}

thread_local! {
    /// Kept between calls: the kernels select for every anchor, and fresh buffers each
    /// time met the other threads' allocations at the allocator's lock (which put threads
    /// to sleep).
    static SCRATCH_F32: RefCell<(Vec<u32>, Vec<u64>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    static SCRATCH_F64: RefCell<(Vec<u32>, Vec<u128>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The positions of the values whose key is at most `bound`, in order: each position is
/// written and kept by advancing the length, without a branch on the comparison (which
/// mispredicted on rows where candidates are not rare). Compiled for AVX2 and AVX-512 too.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn candidates<F: Lane>(values: &[F], bound: F, key: impl Fn(F) -> F, within: &mut Vec<u32>) {
    within.clear();
    within.resize(values.len(), 0);
    let mut len = 0;
    for (p, &v) in (0u32..).zip(values) {
        within[len] = p;
        len += usize::from(key(v) <= bound);
    }
    within.truncate(len);
}

/// What [`candidate_bound`] found.
enum Bound<F> {
    /// A key the first `k` keys do not exceed.
    Within(F),
    /// None short of every value: `k` is not small against the count.
    None,
    /// A value is NaN (at either end of the total order, past any bound).
    NaN,
}

/// A key that the first `k` keys do not exceed, when `k` is small against the count: the
/// k-th smallest of the minima of at least 2k disjoint subsets, since those minima are k
/// values at or below it. The subsets are the residues modulo a multiple of 8, so that
/// their minima are taken on vector lanes.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn candidate_bound<F: Lane>(values: &[F], k: usize, largest: bool) -> Bound<F> {
    if k == 0 || k * 8 >= values.len() {
        return Bound::None;
    }
    let key = |v: F| if largest { -v } else { v };
    // At most len/4 + 7 < len subsets, so none is empty.
    let subsets = (2 * k).next_multiple_of(8);
    let mut minima: Vec<F> = values[..subsets].iter().map(|&v| key(v)).collect();
    let mut nan = false;
    for stride in values.chunks(subsets) {
        for (least, &v) in minima.iter_mut().zip(stride) {
            let v = key(v);
            #[allow(clippy::eq_op)] // NaN is the one value unequal to itself
            {
                nan |= v != v;
            }
            *least = if v < *least { v } else { *least };
        }
    }
    if nan {
        return Bound::NaN;
    }
    let mut keyed: Vec<F::Keyed> = (0u32..).zip(&minima).map(|(p, &v)| v.keyed(p)).collect();
    let (_, &mut kth, _) = keyed.select_nth_unstable(k - 1);
    Bound::Within(minima[F::position(kth) as usize])
}

/// A helper's arguments as slices: the members' values and indices, and the output list.
///
/// # Safety
/// Each pointer must point at `len` elements (readable; `out` writable) that nothing else
/// accesses while the slices live.
unsafe fn member_slices<'a, F>(
    values: *const F,
    indices: *const u32,
    out: *mut u32,
    len: u64,
) -> (&'a [F], &'a [u32], &'a mut [u32]) {
    let len = len as usize;
    // SAFETY: as the caller guarantees.
    unsafe {
        (
            std::slice::from_raw_parts(values, len),
            std::slice::from_raw_parts(indices, len),
            std::slice::from_raw_parts_mut(out, len),
        )
    }
}

/// The `count` members with the smallest (largest) values, written to `out` in index
/// order; returns how many, or -1 when `count` is not a non-negative integer.
///
/// # Safety
/// `values` and `indices` must point at `len` readable elements, `out` at `len` writable ones.
unsafe fn extreme<F: Lane>(
    values: *const F,
    indices: *const u32,
    len: u64,
    wanted: f64,
    largest: u32,
    out: *mut u32,
) -> i64 {
    let Some(k) = count(wanted) else { return -1 };
    // SAFETY: the caller guarantees `len` elements behind each pointer.
    let (values, indices, out) = unsafe { member_slices(values, indices, out, len) };
    let mut chosen: Vec<u32> = first_in_order(values, k, largest != 0)
        .into_iter()
        .map(|p| indices[p as usize])
        .collect();
    chosen.sort_unstable();
    out[..chosen.len()].copy_from_slice(&chosen);
    chosen.len() as i64
}

/// The position (in `values`) of the value at rank `k` (0-based, ascending, ties to the
/// lower position), or -1 when `k` is not a rank of the set or a value is NaN (the kernels
/// rank a row padded with `+inf`, which a NaN member would rank after: the interpreter
/// takes such a row).
///
/// # Safety
/// `values` must point at `len` readable elements.
unsafe fn rank<F: Lane>(values: *const F, len: u64, k: f64) -> i64 {
    // SAFETY: the caller guarantees `len` elements.
    let values = unsafe { std::slice::from_raw_parts(values, len as usize) };
    let Some(k) = count(k).filter(|&k| k < values.len()) else {
        return -1;
    };
    // The bound's pass looks at every value for NaN; without a bound, a pass of its own.
    let bound = candidate_bound(values, k + 1, false);
    if matches!(bound, Bound::NaN) || matches!(bound, Bound::None) && any_nan(values) {
        return -1;
    }
    select_first(values, k + 1, false, bound, |first| {
        first
            .last()
            .map_or(-1, |&keyed| i64::from(F::position(keyed)))
    })
}

/// Whether a value is NaN (every value looked at, so that the loop runs on vector lanes).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn any_nan<F: Lane>(values: &[F]) -> bool {
    #[allow(clippy::eq_op)] // NaN is the one value unequal to itself
    values.iter().fold(false, |nan, &v| nan | (v != v))
}

thread_local! {
    static SAMPLER: RefCell<(WeightedSampler, Vec<f64>)> = RefCell::new((WeightedSampler::new(), Vec::new()));
}

/// `count` members drawn without replacement with log-weights `values`, from the stream of
/// (seed, site, anchor), written to `out` in index order; returns how many, -1 for a bad
/// count, -2 for weights the sampler rejects.
///
/// # Safety
/// `values` and `indices` must point at `len` readable elements, `out` at `len` writable ones.
#[allow(clippy::too_many_arguments)]
unsafe fn sample<F: Lane>(
    values: *const F,
    indices: *const u32,
    len: u64,
    wanted: f64,
    seed: u64,
    site: u32,
    anchor: u64,
    out: *mut u32,
) -> i64 {
    let Some(k) = count(wanted) else { return -1 };
    // SAFETY: the caller guarantees `len` elements behind each pointer.
    let (values, indices, out) = unsafe { member_slices(values, indices, out, len) };
    SAMPLER.with(|cell| {
        let (sampler, weights) = &mut *cell.borrow_mut();
        weights.clear();
        weights.extend(values.iter().map(|v| v.to_f64()));
        let mut rng = stream(seed, site, anchor as u32);
        match sampler.sample(weights, k, &mut rng) {
            Ok(drawn) => {
                let mut chosen: Vec<u32> = drawn.iter().map(|&p| indices[p]).collect();
                chosen.sort_unstable();
                out[..chosen.len()].copy_from_slice(&chosen);
                chosen.len() as i64
            }
            Err(_) => -2,
        }
    })
}

/// The sorted union of two sorted index lists, written to `out`; returns its length.
///
/// # Safety
/// `a` and `b` must point at `a_len` and `b_len` readable elements, `out` at room for
/// their union.
pub unsafe extern "C" fn losscc_union(
    a: *const u32,
    a_len: u64,
    b: *const u32,
    b_len: u64,
    out: *mut u32,
) -> u64 {
    // SAFETY: the caller guarantees the lengths.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a, a_len as usize),
            std::slice::from_raw_parts(b, b_len as usize),
        )
    };
    let (mut i, mut j, mut n) = (0, 0, 0usize);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x == y => {
                i += 1;
                j += 1;
                x
            }
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (_, Some(&y)) => {
                j += 1;
                y
            }
            (None, None) => break,
        };
        // SAFETY: the union has at most a_len + b_len members, which the caller made room for.
        unsafe { *out.add(n) = next };
        n += 1;
    }
    n as u64
}

macro_rules! typed_helpers {
    ($lane:ty, $extreme:ident, $rank:ident, $sample:ident) => {
        /// See `extreme`.
        ///
        /// # Safety
        /// As for `extreme`.
        pub unsafe extern "C" fn $extreme(
            values: *const $lane,
            indices: *const u32,
            len: u64,
            wanted: f64,
            largest: u32,
            out: *mut u32,
        ) -> i64 {
            // SAFETY: forwarded from the caller.
            unsafe { extreme(values, indices, len, wanted, largest, out) }
        }

        /// See `rank`.
        ///
        /// # Safety
        /// As for `rank`.
        pub unsafe extern "C" fn $rank(values: *const $lane, len: u64, k: f64) -> i64 {
            // SAFETY: forwarded from the caller.
            unsafe { rank(values, len, k) }
        }

        /// See `sample`.
        ///
        /// # Safety
        /// As for `sample`.
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "C" fn $sample(
            values: *const $lane,
            indices: *const u32,
            len: u64,
            wanted: f64,
            seed: u64,
            site: u32,
            anchor: u64,
            out: *mut u32,
        ) -> i64 {
            // SAFETY: forwarded from the caller.
            unsafe { sample(values, indices, len, wanted, seed, site, anchor, out) }
        }
    };
}

typed_helpers!(f32, losscc_extreme_f32, losscc_rank_f32, losscc_sample_f32);
typed_helpers!(f64, losscc_extreme_f64, losscc_rank_f64, losscc_sample_f64);

/// The helpers a kernel may import: (symbol, address).
pub fn symbols() -> Vec<(&'static str, *const u8)> {
    vec![
        ("losscc_union", losscc_union as *const u8),
        ("losscc_extreme_f32", losscc_extreme_f32 as *const u8),
        ("losscc_extreme_f64", losscc_extreme_f64 as *const u8),
        ("losscc_rank_f32", losscc_rank_f32 as *const u8),
        ("losscc_rank_f64", losscc_rank_f64 as *const u8),
        ("losscc_sample_f32", losscc_sample_f32 as *const u8),
        ("losscc_sample_f64", losscc_sample_f64 as *const u8),
    ]
}

#[cfg(test)]
mod tests {
    use super::{first_in_order, rank};
    use crate::runtime::sample::stream;
    use rand_pcg::rand_core::Rng;

    /// The definition: every position sorted by (value, position), or by (-value,
    /// position) when `largest`, in the total order.
    fn by_full_sort(values: &[f32], k: usize, largest: bool) -> Vec<u32> {
        let key = |p: u32| {
            if largest {
                -values[p as usize]
            } else {
                values[p as usize]
            }
        };
        let mut all: Vec<u32> = (0..values.len() as u32).collect();
        all.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
        all.truncate(k);
        all
    }

    #[test]
    fn selection_matches_a_full_sort_with_ties_signed_zeros_and_nan() {
        let mut rng = stream(7, 0, 0);
        let mut checked = 0;
        for case in 0..400u32 {
            let len = 1 + (rng.next_u32() % 1100) as usize;
            // Few distinct values make ties common; some cases carry ±0, inf and NaN.
            let distinct = [2, 16, 1 << 20][case as usize % 3];
            let mut values: Vec<f32> = (0..len)
                .map(|_| (rng.next_u32() % distinct) as f32 / 7.0 - 1.0)
                .collect();
            if case % 4 == 1 {
                for special in [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY] {
                    let at = rng.next_u32() as usize % len;
                    values[at] = special;
                }
            }
            if case % 8 == 3 {
                let at = rng.next_u32() as usize % len;
                values[at] = if case % 16 == 3 { f32::NAN } else { -f32::NAN };
            }
            for k in [0, 1, 2, 17, 65, len / 9, len] {
                for largest in [false, true] {
                    let mut chosen = first_in_order(&values, k, largest);
                    let mut want = by_full_sort(&values, k, largest);
                    let what = format!("case {case}: len {len}, k {k}, largest {largest}");
                    assert_eq!(chosen.last(), want.last(), "{what}: the k-th");
                    chosen.sort_unstable();
                    want.sort_unstable();
                    assert_eq!(chosen, want, "{what}: the first k");
                    checked += 1;
                }
                // The rank: the k-th in ascending order, or -1 past the end or over a NaN,
                // whether or not a bound was found for it.
                // SAFETY: `values` holds `len` floats.
                let ranked = unsafe { rank(values.as_ptr(), len as u64, k as f64) };
                let want = match by_full_sort(&values, k + 1, false).get(k) {
                    Some(&p) if !values.iter().any(|v| v.is_nan()) => i64::from(p),
                    _ => -1,
                };
                assert_eq!(ranked, want, "case {case}: len {len}, rank {k}");
            }
        }
        assert_eq!(checked, 400 * 14);
    }
}
