//! Rust functions the generated kernels call for what is not worth generating inline:
//! sorting and selecting, sampling, merging index lists. Each matches the interpreter's
//! semantics exactly (ties to the lower position, the same sampling streams).

use crate::runtime::sample::{WeightedSampler, stream};
use std::cell::RefCell;

/// A float type the kernels compute in.
pub trait Lane: Copy + PartialOrd + 'static {
    fn to_f64(self) -> f64;
}

impl Lane for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Lane for f64 {
    fn to_f64(self) -> f64 {
        self
    }
}

/// A count argument as an integer, if it is a non-negative integer.
fn count(value: f64) -> Option<usize> {
    (value >= 0.0 && value.is_finite() && value == value.trunc()).then_some(value as usize)
}

/// The first `k` positions of 0..len ordered by (value, position) ascending, or by value
/// descending and position ascending when `largest`. Only the candidates within
/// [`candidate_bound`] are sorted: a row's rank 16 of 1023 sorts a few dozen values.
fn first_in_order<F: Lane>(values: &[F], k: usize, largest: bool) -> Vec<u32> {
    // Negation is exact, so `largest` is the same order on -v.
    let sign = if largest { -1.0 } else { 1.0 };
    let key = |p: u32| sign * values[p as usize].to_f64();
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let positions = 0..values.len() as u32;
    let mut chosen: Vec<u32> = match candidate_bound(values, k, sign) {
        Some(bound) => positions.filter(|&p| key(p) <= bound).collect(),
        None => positions.collect(),
    };
    chosen.sort_unstable_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
    chosen.truncate(k);
    chosen
}

/// A key that the first `k` keys (`sign * value`) do not exceed, when `k` is small against
/// the count: the k-th smallest of the minima of at least 2k blocks, since those minima are
/// k values at or below it. None when every value must be sorted, or one is NaN (NaN sits
/// at either end of the total order, past any bound).
fn candidate_bound<F: Lane>(values: &[F], k: usize, sign: f64) -> Option<f64> {
    if k * 8 >= values.len() {
        return None;
    }
    let mut nan = false;
    let mut minima: Vec<f64> = values
        .chunks(values.len() / (2 * k))
        .map(|block| {
            block.iter().fold(f64::INFINITY, |least, v| {
                let key = sign * v.to_f64();
                nan |= key.is_nan();
                if key < least { key } else { least }
            })
        })
        .collect();
    if nan {
        return None;
    }
    let (_, bound, _) = minima.select_nth_unstable_by(k - 1, f64::total_cmp);
    Some(*bound)
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
/// lower position), or -1 when `k` is not a rank of the set.
///
/// # Safety
/// `values` must point at `len` readable elements.
unsafe fn rank<F: Lane>(values: *const F, len: u64, k: f64) -> i64 {
    // SAFETY: the caller guarantees `len` elements.
    let values = unsafe { std::slice::from_raw_parts(values, len as usize) };
    match count(k) {
        Some(k) if k < values.len() => first_in_order(values, k + 1, false)
            .last()
            .map_or(-1, |&p| i64::from(p)),
        _ => -1,
    }
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
        /// See [`extreme`].
        ///
        /// # Safety
        /// As for [`extreme`].
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

        /// See [`rank`].
        ///
        /// # Safety
        /// As for [`rank`].
        pub unsafe extern "C" fn $rank(values: *const $lane, len: u64, k: f64) -> i64 {
            // SAFETY: forwarded from the caller.
            unsafe { rank(values, len, k) }
        }

        /// See [`sample`].
        ///
        /// # Safety
        /// As for [`sample`].
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
