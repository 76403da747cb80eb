//! The cut of a batch-level `smallest` (or `largest`) over a matrix's entries chosen by
//! labels: the last member it keeps, in its order (by value, ties to the lower row, then
//! column). The plan turns such a selection into a filter against its cut
//! (`opt::Decompose::batch_set`), which the row passes apply like any other condition; the
//! runtime finds the cut between them.
//!
//! The search takes the cheapest way that applies. A set of pairs of one label is visited
//! class by class (the sum of the squared class sizes, not the matrix). Otherwise a sample
//! of every eighth row brackets, in a histogram of the keys' leading 16 bits, the bins that
//! should hold the k-th member, and one pass over the matrix counts the members below them
//! and gathers those within. When the sample misleads, a radix selection on the values'
//! order-preserving bits decides: a histogram of their leading 16 bits finds the bin that
//! holds the k-th member; when that bin is large, a histogram of the next 16 bits within
//! it narrows it again. The members left are sorted out exactly, by (key, row, column).
//! The passes split the matrix into blocks of rows on the threads: the histograms are
//! sums of counts and the members are gathered in row order, so the cut does not depend on
//! the thread count.

use super::gemm::run_tasks;
use super::real::Real;
use crate::ir::LabelledEntries;
use multiversion::multiversion;
use ndarray::ArrayView2;
use std::sync::atomic::{AtomicBool, Ordering};

/// Members of the bin a histogram found, above which a second histogram narrows it.
const GATHER_LIMIT: u32 = 1 << 14;
/// Keys tested at once for a bracket (a mask of one bit per key).
const CHUNK: usize = 64;
/// One row in this many is the sample that brackets the cut ([`Candidates::bracketed_by_sample`]).
const SAMPLE_STRIDE: usize = 8;
/// Bits of the order key each histogram reads.
const RADIX_BITS: u32 = 16;

/// The last member kept: its value and place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    pub value: f64,
    pub row: usize,
    pub col: usize,
}

/// Why a cut was not found: a member's value is NaN, which the filter's comparisons cannot
/// place (the interpreter, which orders NaN by its bits, evaluates the batch instead), or
/// the labels do not match the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotFound;

/// The entries a selection ranks.
#[derive(Clone, Copy)]
pub struct Candidates<'a, F> {
    pub matrix: ArrayView2<'a, F>,
    pub labels: &'a [i64],
    pub chosen: LabelledEntries,
    pub largest: bool,
}

/// The last of the `count` first members in order, `None` when none is kept.
pub fn find<F: Real>(
    candidates: &Candidates<'_, F>,
    count: usize,
    threads: usize,
) -> Result<Option<Cut>, NotFound> {
    let (rows, cols) = candidates.matrix.dim();
    if candidates.labels.len() != rows || rows != cols {
        return Err(NotFound);
    }
    if count == 0 {
        return Ok(None);
    }
    if let Some(found) = candidates.within_classes(count)? {
        return Ok(found);
    }
    if let Some(found) = candidates.bracketed_by_sample(count, threads)? {
        return Ok(Some(found));
    }
    let top = 64 - RADIX_BITS;
    let leading = candidates.histogram((threads, 1), top, None)?;
    let total: u64 = leading.iter().map(|&c| u64::from(c)).sum();
    let kept = (count as u64).min(total);
    if kept == 0 {
        return Ok(None);
    }
    let (mut prefix, mut rank) = bin_of(&leading, kept);
    let mut shift = top;
    if leading[prefix as usize] > GATHER_LIMIT {
        let within = Some((top, prefix));
        let next = candidates.histogram((threads, 1), top - RADIX_BITS, within)?;
        let (bin, within) = bin_of(&next, rank);
        prefix = (prefix << RADIX_BITS) | bin;
        rank = within;
        shift = top - RADIX_BITS;
    }
    let mut members = candidates.gather(threads, (shift, prefix))?;
    let position = (rank - 1) as usize;
    if position >= members.len() {
        // Both passes see the same members; were it otherwise, the interpreter decides.
        return Err(NotFound);
    }
    Ok(Some(candidates.at(&mut members, position)))
}

/// The bin of a histogram that holds the `rank`-th member (from 1), and its rank there.
fn bin_of(histogram: &[u32], rank: u64) -> (u64, u64) {
    let mut before = 0u64;
    for (bin, &c) in histogram.iter().enumerate() {
        if before + u64::from(c) >= rank {
            return (bin as u64, rank - before);
        }
        before += u64::from(c);
    }
    (histogram.len() as u64 - 1, rank - before)
}

/// The key of the entries a selection does not rank: no value that is not NaN has it
/// (the leading 16 bits of a key are at most those of infinity).
const NOT_MEMBER: u64 = u64::MAX;

/// The keys of one row in the selection's order ([`Real::order_key`], reversed for
/// `largest`), `NOT_MEMBER` where `keeps` (by `[same label][same sample]`) drops the entry;
/// whether a kept entry is NaN. On the widest vector unit the CPU has.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
#[allow(clippy::eq_op)] // `v != v` is the NaN test
fn row_keys<F: Real>(
    (row, labels, i): (&[F], &[i64], usize),
    keeps: [[bool; 2]; 2],
    largest: bool,
    keys: &mut [u64],
) -> bool {
    let label = labels[i];
    let (same, other) = (keeps[1][0], keeps[0][0]);
    let reverse = if largest { u64::MAX } else { 0 };
    let mut nan = false;
    for ((key, &v), &l) in keys.iter_mut().zip(row).zip(labels) {
        let keep = if l == label { same } else { other };
        nan |= keep & (v != v);
        *key = if keep {
            v.order_key() ^ reverse
        } else {
            NOT_MEMBER
        };
    }
    if let Some(&v) = row.get(i) {
        nan |= keeps[1][1] & (v != v);
        keys[i] = if keeps[1][1] {
            v.order_key() ^ reverse
        } else {
            NOT_MEMBER
        };
    }
    nan
}

/// How many of a row's keys lie below `from`; the members from `from` to `to` pushed onto
/// `found` as (key, row, column). Without a branch but the rare push, on the widest vector
/// unit the CPU has.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn bracket_row(
    keys: &[u64],
    (from, to): (u64, u64),
    i: usize,
    found: &mut Vec<(u64, u32, u32)>,
) -> u64 {
    let mut below = 0;
    for (chunk_index, chunk) in keys.chunks(CHUNK).enumerate() {
        let mut inside = 0u64;
        for (k, &key) in chunk.iter().enumerate() {
            below += u64::from(key < from);
            let hit = key >= from && key <= to && key != NOT_MEMBER;
            inside |= u64::from(hit) << k;
        }
        while inside != 0 {
            let k = inside.trailing_zeros() as usize;
            inside &= inside - 1;
            found.push((chunk[k], i as u32, (chunk_index * CHUNK + k) as u32));
        }
    }
    below
}

impl<F: Real> Candidates<'_, F> {
    /// Calls `visit(state, row, keys)` with the keys (see [`row_keys`]) of every `stride`-th
    /// row, blocks of rows on the threads, and returns the blocks' states in row order.
    fn scan<T: Send + Default>(
        &self,
        (threads, stride): (usize, usize),
        visit: impl Fn(&mut T, usize, &[u64]) + Sync,
    ) -> Result<Vec<T>, NotFound> {
        let (keeps, largest) = (self.chosen.keeps, self.largest);
        // Each block's state carries its buffer of keys.
        let sampled = |(state, keys): &mut (T, Vec<u64>), i: usize, row: &[F]| {
            if !i.is_multiple_of(stride) {
                return false;
            }
            keys.resize(row.len(), NOT_MEMBER);
            if row_keys((row, self.labels, i), keeps, largest, keys) {
                return true;
            }
            visit(state, i, keys);
            false
        };
        let blocks = self.rows(threads, sampled)?;
        Ok(blocks.into_iter().map(|(state, _)| state).collect())
    }

    /// Calls `visit(state, i, row)` for each row `i`, blocks of rows on the threads, and
    /// returns the blocks' states in row order; `visit` tells of a NaN member.
    fn rows<T: Send + Default>(
        &self,
        threads: usize,
        visit: impl Fn(&mut T, usize, &[F]) -> bool + Sync,
    ) -> Result<Vec<T>, NotFound> {
        let rows = self.matrix.nrows();
        let per_block = rows.div_ceil(threads.max(1)).max(1);
        let mut states: Vec<T> = (0..rows.div_ceil(per_block))
            .map(|_| T::default())
            .collect();
        let unordered = AtomicBool::new(false);
        let tasks: Vec<(usize, &mut T)> = states.iter_mut().enumerate().collect();
        run_tasks(tasks, threads, |(block, state)| {
            let mut copy;
            let start = block * per_block;
            for i in start..(start + per_block).min(rows) {
                let row = self.matrix.row(i);
                let row = match row.to_slice() {
                    Some(slice) => slice,
                    None => {
                        copy = row.to_vec();
                        &copy
                    }
                };
                if visit(state, i, row) {
                    unordered.store(true, Ordering::Relaxed);
                    return;
                }
            }
        });
        if unordered.into_inner() {
            return Err(NotFound);
        }
        Ok(states)
    }

    /// Counts of the members of every `stride`-th row by the `RADIX_BITS` bits of their key
    /// above `shift`, among those whose key above `within.0` is `within.1`.
    fn histogram(
        &self,
        (threads, stride): (usize, usize),
        shift: u32,
        within: Option<(u32, u64)>,
    ) -> Result<Vec<u32>, NotFound> {
        let mask = (1u64 << RADIX_BITS) - 1;
        let blocks = self.scan((threads, stride), |counts: &mut Vec<u32>, _, keys| {
            if counts.is_empty() {
                counts.resize(1 << RADIX_BITS, 0);
            }
            for &key in keys {
                let inside = within.is_none_or(|(above, prefix)| key >> above == prefix);
                if key != NOT_MEMBER && inside {
                    counts[((key >> shift) & mask) as usize] += 1;
                }
            }
        })?;
        let mut total = vec![0u32; 1 << RADIX_BITS];
        for counts in blocks.iter().filter(|c| !c.is_empty()) {
            total.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
        }
        Ok(total)
    }

    /// The cut from one pass over the matrix, when a sample of its rows shows where to look:
    /// the sample's histogram brackets the bins that should hold the `count`-th member; the
    /// pass counts the members below the bracket and gathers those in it, and the cut is
    /// among them unless the sample misled (or the bracket would gather too many, or the
    /// matrix is too small to sample). `None` then, for the full radix selection.
    fn bracketed_by_sample(&self, count: usize, threads: usize) -> Result<Option<Cut>, NotFound> {
        let rows = self.matrix.nrows();
        if rows < 8 * SAMPLE_STRIDE {
            return Ok(None);
        }
        let top = 64 - RADIX_BITS;
        let sample = self.histogram((threads, SAMPLE_STRIDE), top, None)?;
        let sampled = u64::from(sample.iter().sum::<u32>());
        let share = rows.div_ceil(SAMPLE_STRIDE) as f64 / rows as f64;
        // The count's rank in the sample, give or take four standard deviations.
        let expected = count as f64 * share;
        let margin = 4.0 * expected.sqrt() + 8.0;
        let (low, high) = ((expected - margin).max(1.0), (expected + margin).ceil());
        if high > sampled as f64 {
            return Ok(None);
        }
        let (low_bin, _) = bin_of(&sample, low as u64);
        let (high_bin, _) = bin_of(&sample, high as u64);
        let bracket: u32 = sample[low_bin as usize..=high_bin as usize].iter().sum();
        if f64::from(bracket) / share > f64::from(4 * GATHER_LIMIT) {
            return Ok(None);
        }
        let (from, to) = (low_bin << top, ((high_bin + 1) << top) - 1);
        let blocks = self.scan(
            (threads, 1),
            |(below, found): &mut (u64, Vec<_>), i, keys| {
                *below += bracket_row(keys, (from, to), i, found);
            },
        )?;
        let below: u64 = blocks.iter().map(|(below, _)| below).sum();
        let mut found: Vec<(u64, u32, u32)> = blocks.into_iter().flat_map(|(_, f)| f).collect();
        let Some(position) = (count as u64).checked_sub(below + 1) else {
            return Ok(None);
        };
        if position >= found.len() as u64 {
            return Ok(None);
        }
        Ok(Some(self.at(&mut found, position as usize)))
    }

    /// The cut of a set of pairs of one label (gaussian_metric's positives) from its
    /// members alone, visited class by class: the sum of the squared class sizes, not the
    /// whole matrix. `None` when the set keeps pairs of two labels, or the classes are large
    /// (an eighth of the matrix), for the passes over every entry.
    fn within_classes(&self, count: usize) -> Result<Option<Option<Cut>>, NotFound> {
        let keeps = self.chosen.keeps;
        if keeps[0][0] {
            return Ok(None);
        }
        let mut by_label: Vec<(i64, u32)> = (self.labels.iter())
            .zip(0u32..)
            .map(|(&label, i)| (label, i))
            .collect();
        by_label.sort_unstable();
        let classes: Vec<&[(i64, u32)]> = by_label.chunk_by(|a, b| a.0 == b.0).collect();
        let pairs: usize = classes.iter().map(|class| class.len() * class.len()).sum();
        if pairs > self.matrix.len() / 8 {
            return Ok(None);
        }
        let reverse = if self.largest { u64::MAX } else { 0 };
        let mut members = Vec::with_capacity(pairs);
        for class in classes {
            for &(_, i) in class {
                for &(_, j) in class {
                    if !keeps[1][usize::from(i == j)] {
                        continue;
                    }
                    let v = self.matrix[(i as usize, j as usize)];
                    if v.to_f64().is_nan() {
                        return Err(NotFound);
                    }
                    members.push((v.order_key() ^ reverse, i, j));
                }
            }
        }
        let kept = count.min(members.len());
        if kept == 0 {
            return Ok(Some(None));
        }
        Ok(Some(Some(self.at(&mut members, kept - 1))))
    }

    /// The member at `position` in order among `members`.
    fn at(&self, members: &mut [(u64, u32, u32)], position: usize) -> Cut {
        let (_, &mut (_, row, col), _) = members.select_nth_unstable(position);
        let (row, col) = (row as usize, col as usize);
        Cut {
            value: self.matrix[(row, col)].to_f64(),
            row,
            col,
        }
    }

    /// The members whose key above `shift` is `prefix`, as (key, row, column).
    fn gather(
        &self,
        threads: usize,
        (shift, prefix): (u32, u64),
    ) -> Result<Vec<(u64, u32, u32)>, NotFound> {
        let blocks = self.scan((threads, 1), |found: &mut Vec<(u64, u32, u32)>, i, keys| {
            for (j, &key) in keys.iter().enumerate() {
                if key != NOT_MEMBER && key >> shift == prefix {
                    found.push((key, i as u32, j as u32));
                }
            }
        })?;
        Ok(blocks.concat())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Handle, LabelledEntries};
    use ndarray::Array2;

    /// The cut by sorting every member, as the interpreter orders them (finite values).
    fn sorted_cut(c: &Candidates<'_, f32>, count: usize) -> Option<Cut> {
        let mut members = Vec::new();
        for ((i, j), &v) in c.matrix.indexed_iter() {
            if c.chosen.keeps[usize::from(c.labels[i] == c.labels[j])][usize::from(i == j)] {
                members.push((v, i, j));
            }
        }
        members.sort_by(|a, b| {
            let by_value = if c.largest {
                b.0.total_cmp(&a.0)
            } else {
                a.0.total_cmp(&b.0)
            };
            by_value.then((a.1, a.2).cmp(&(b.1, b.2)))
        });
        let kept = count.min(members.len());
        (kept > 0).then(|| {
            let (v, row, col) = members[kept - 1];
            Cut {
                value: f64::from(v),
                row,
                col,
            }
        })
    }

    /// A symmetric matrix of few distinct values (ties everywhere, as a distance matrix has
    /// them in pairs) within `spread` of 1, so that one bin of the first histogram holds
    /// them all when `spread` is small.
    fn tied_matrix(n: usize, levels: u32, spread: f32) -> Array2<f32> {
        Array2::from_shape_fn((n, n), |(i, j)| {
            let (a, b) = (i.min(j) as u32, i.max(j) as u32);
            let step = (a.wrapping_mul(2_654_435_761) ^ b.wrapping_mul(40_503)) % levels;
            1.0 + spread * step as f32 / levels as f32
        })
    }

    fn chosen(keeps: [[bool; 2]; 2]) -> LabelledEntries {
        LabelledEntries {
            matrix: Handle::from_index(0),
            keeps,
        }
    }

    #[test]
    fn cuts_match_a_full_sort_on_tied_values() {
        // Classes of four (the pairs of one label are gathered class by class) and of 50
        // (too many pairs for that).
        let small: Vec<i64> = (0..150).map(|i| i / 4).collect();
        let large: Vec<i64> = (0..150).map(|i| i % 3).collect();
        // One leading bin holds every value when the spread is tiny: the second histogram.
        // The last has its small values in the rows the sample reads: the sample's bracket
        // misleads, and the radix selection decides.
        let misleading = Array2::from_shape_fn((150, 150), |(i, j)| {
            let base = if i % SAMPLE_STRIDE == 0 { 0.0 } else { 10.0 };
            base + ((i * 31 + j * 17) % 101) as f32
        });
        let matrices = [(7, 0.5), (4000, 1e-3), (100_000, 0.9)]
            .map(|(levels, spread)| tied_matrix(150, levels, spread));
        let layouts = matrices
            .iter()
            .chain([&misleading])
            .flat_map(|m| [(m, &small), (m, &large)]);
        for (matrix, labels) in layouts {
            for keeps in [
                [[true, false], [false, false]],
                [[false, false], [true, false]],
                [[true, true], [true, true]],
            ] {
                for largest in [false, true] {
                    let c = Candidates {
                        matrix: matrix.view(),
                        labels,
                        chosen: chosen(keeps),
                        largest,
                    };
                    for count in [0, 1, 2, 3, 57, 450, 11_175, 22_349, 22_350, 30_000] {
                        for threads in [1, 3] {
                            assert_eq!(
                                find(&c, count, threads),
                                Ok(sorted_cut(&c, count)),
                                "keeps {keeps:?}, largest {largest}, count {count}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn negative_zero_ties_with_zero_and_nan_is_not_placed() {
        let labels = [0, 0, 1];
        let matrix = Array2::from_shape_vec(
            (3, 3),
            vec![0.0, -0.0, 0.0, -0.0, 0.0, -1.0, 0.0, -1.0, 0.0f32],
        )
        .unwrap();
        let c = Candidates {
            matrix: matrix.view(),
            labels: &labels,
            chosen: chosen([[true; 2]; 2]),
            largest: false,
        };
        // -1 twice, then the seven zeros by (row, column): the third member is (0, 0).
        assert_eq!(
            find(&c, 3, 1),
            Ok(Some(Cut {
                value: 0.0,
                row: 0,
                col: 0
            }))
        );
        assert_eq!(
            find(&c, 4, 1).map(|c| c.map(|c| (c.row, c.col))),
            Ok(Some((0, 1)))
        );
        let mut with_nan = matrix.clone();
        with_nan[(2, 0)] = f32::NAN;
        let c = Candidates {
            matrix: with_nan.view(),
            ..c
        };
        assert_eq!(find(&c, 1, 2), Err(NotFound));
    }
}
