//! Seeded, deterministic k-means clustering.
//!
//! [`kmeans`] partitions the rows of a matrix into `k` clusters with
//! k-means++ seeding followed by Lloyd iterations. The result depends only on
//! the input and the seed: every sum has a fixed order, only the nearest-centre
//! search of each point is shared out between threads (each point's search is
//! the same on any thread), and only IEEE `+ - * /` are used (no `sqrt`, no
//! transcendental functions, no hashing), so it is bit-for-bit reproducible on
//! every machine and for any thread count.
//!
//! # Algorithm
//!
//! 1. **Normalisation.** Coordinates are multiplied by a power of two so that
//!    the largest magnitude lies in `[0.5, 1)` (clamped to the normal range).
//!    This is exact, so it changes no comparison, but guarantees that squared
//!    distances can neither overflow nor all underflow to zero.
//! 2. **Generator.** PCG-64 MCG (`rand_pcg::Pcg64Mcg`) with initial state
//!    `((hi << 64) | lo) | 1`, where `lo` and `hi` are the first two outputs of
//!    SplitMix64 started from `seed` (`mix(seed + γ)` and `mix(seed + 2γ)`
//!    with `γ = 0x9E3779B97F4A7C15` and Stafford's "Mix13" finaliser `mix`).
//!    From 64-bit outputs `x`: an index below `m` is `(x · m) >> 64` (128-bit
//!    product), and a uniform in `[0, 1)` is `(x >> 11) · 2^-53`.
//! 3. **k-means++ seeding.** The first centre is a uniformly drawn row. Each
//!    further centre is row `i` with probability `D(i)² / Σ D²`, `D(i)` being
//!    the distance to the nearest centre chosen so far: with `u` the next
//!    uniform in `[0, 1)` and `t = u · Σ D²` (sums in row order),
//!    the first row whose running sum of `D²` (in row order) exceeds `t`
//!    (or the last row with `D² > 0` if rounding leaves none). If every
//!    remaining row coincides with a centre (`Σ D² = 0`), a row that is not
//!    yet a centre is drawn uniformly instead (the `j`-th such row in order,
//!    `j` a uniform index). Seeding consumes exactly one generator output per
//!    centre; nothing after it is random.
//! 4. **Lloyd iterations.** Every point is assigned to its nearest centre by
//!    squared Euclidean distance (ties: lowest centre index; coordinate `j`
//!    goes into partial sum `j mod 4`, in coordinate order, and the partial
//!    sums are added as `(s0 + s1) + (s2 + s3)`), empty clusters
//!    are re-seeded (below), centres are recomputed as means (coordinates
//!    summed in row order, then divided by the cluster size), and this repeats
//!    until the assignment no longer changes, or for at most
//!    [`MAX_ITERATIONS`] updates.
//! 5. **Empty clusters.** Each empty cluster, in increasing index order,
//!    takes the point farthest (squared distance; ties: lowest row) from its
//!    current centre among clusters with at least two members, and is centred
//!    on it. Since `k <= n`, every cluster in the result is non-empty.
//! 6. **Canonical labels.** Clusters are renumbered in order of first
//!    appearance: row 0 is in cluster 0, the first row not in cluster 0 is in
//!    cluster 1, and so on.
//!
//! On convergence the result is a fixed point of a Lloyd step: recomputing
//! the means and reassigning every point (lowest-index ties) reproduces it,
//! unless there are fewer than `k` distinct points, when re-seeding is what
//! keeps all `k` clusters non-empty.

use super::gemm::{self, run_tasks};
use ndarray::{Array2, ArrayView1, Axis};
use rand_pcg::Pcg64Mcg;
use rand_pcg::rand_core::Rng;
use thiserror::Error;

/// Maximum number of Lloyd updates (centre recomputation plus reassignment)
/// after the initial assignment. Lloyd's algorithm typically converges in
/// far fewer; if the cap is reached, the last assignment (still with `k`
/// non-empty clusters) is returned.
pub const MAX_ITERATIONS: usize = 300;

/// Invalid input to [`kmeans`]. When several apply, the first in declaration
/// order is reported.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum KMeansError {
    /// The point matrix has zero rows.
    #[error("k-means needs at least one point, but the input has zero rows")]
    NoPoints,
    /// `k` was zero.
    #[error("k-means needs at least one cluster, but k = 0")]
    ZeroClusters,
    /// More clusters were requested than there are points.
    #[error(
        "cannot form {k} non-empty clusters from {points} points; k must not exceed the number of rows"
    )]
    TooManyClusters {
        /// The requested number of clusters.
        k: usize,
        /// The number of rows.
        points: usize,
    },
    /// A coordinate is NaN or infinite (the first in row-major order is
    /// reported).
    #[error("coordinate {column} of point {row} is {value}; k-means needs finite coordinates")]
    NonFinite {
        /// Row of the offending coordinate.
        row: usize,
        /// Column of the offending coordinate.
        column: usize,
        /// The offending value.
        value: f64,
    },
}

/// Clusters the rows of `points` into `k` clusters and returns the cluster
/// index (`0..k`) of every row.
///
/// Deterministic for a given `seed` on every machine; labels are canonical
/// (numbered in order of first appearance) and all `k` clusters are
/// non-empty. See the [module documentation](self) for the exact algorithm,
/// generator and tie rules. A matrix with zero columns is valid (all points
/// coincide).
///
/// # Errors
///
/// [`KMeansError::NoPoints`] for zero rows, [`KMeansError::ZeroClusters`]
/// for `k == 0`, [`KMeansError::TooManyClusters`] for `k` greater than the
/// number of rows, and [`KMeansError::NonFinite`] for a NaN or infinite
/// coordinate.
pub fn kmeans(
    mut points: Array2<f64>,
    k: usize,
    seed: u64,
    threads: usize,
) -> Result<Vec<usize>, KMeansError> {
    kmeans_on(&mut points, k, seed, threads)
}

/// [`kmeans`] on a buffer of the caller's, which it leaves holding the points scaled by
/// the normalisation's power of two (in standard layout): a caller that clusters every
/// call keeps the buffer's pages mapped from one call to the next.
pub fn kmeans_on(
    points: &mut Array2<f64>,
    k: usize,
    seed: u64,
    threads: usize,
) -> Result<Vec<usize>, KMeansError> {
    let n = points.nrows();
    if n == 0 {
        return Err(KMeansError::NoPoints);
    }
    if k == 0 {
        return Err(KMeansError::ZeroClusters);
    }
    if k > n {
        return Err(KMeansError::TooManyClusters { k, points: n });
    }
    normalise(points)?;
    let data = &*points;
    let mut rng = generator(seed);
    let mut centres = seed_centres(data, k, &mut rng, threads);
    let norms: Vec<f64> = data.outer_iter().map(|x| x.dot(&x)).collect();

    let mut labels = Vec::with_capacity(n);
    assign(data, &norms, &centres, &mut labels, threads);
    reseed_empty(data, &mut labels, &mut centres);

    let mut next = Vec::with_capacity(n);
    for _ in 0..MAX_ITERATIONS {
        update_centres(data, &labels, &mut centres);
        assign(data, &norms, &centres, &mut next, threads);
        reseed_empty(data, &mut next, &mut centres);
        if next == labels {
            break;
        }
        std::mem::swap(&mut labels, &mut next);
    }
    Ok(canonical(&labels, k))
}

/// The PCG-64 MCG generator for `seed` (see the module documentation).
fn generator(seed: u64) -> Pcg64Mcg {
    const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let lo = mix(seed.wrapping_add(GOLDEN_GAMMA));
    let hi = mix(seed.wrapping_add(GOLDEN_GAMMA.wrapping_mul(2)));
    Pcg64Mcg::new((u128::from(hi) << 64) | u128::from(lo))
}

/// A uniform index in `0..m` (`m >= 1`): the high word of `x · m`.
fn uniform_index(rng: &mut Pcg64Mcg, m: usize) -> usize {
    // `usize` is at most 64 bits on every supported target, and the high
    // word of a 64 × 64-bit product is below `m`, so both casts are lossless.
    ((u128::from(rng.next_u64()) * m as u128) >> 64) as usize
}

/// A uniform in `[0, 1)`: the top 53 bits of the next output times `2^-53`.
fn uniform_unit(rng: &mut Pcg64Mcg) -> f64 {
    (rng.next_u64() >> 11) as f64 * (f64::EPSILON / 2.0)
}

/// `data` put in standard layout and scaled in place by the power of two that brings the
/// largest magnitude into `[0.5, 1)`, clamped so the factor is a normal number (then the
/// largest magnitude is below 4). Scaling by a power of two is exact, so every distance
/// comparison is unchanged, but squared distances (and their sums) can no longer overflow.
/// The first coordinate that is not finite (in row-major order) is an error.
///
/// One pass finds the largest magnitude and whether all are finite (`v - v` is zero for a
/// finite `v` only), without a branch; the indexed search runs only to name a bad
/// coordinate. A copy and a search per element took 5 ms of cluster_nca's call at
/// 1024 x 512, mostly in the fresh pages of the copy.
#[allow(clippy::eq_op)] // `x - x` is the finiteness test
fn normalise(data: &mut Array2<f64>) -> Result<(), KMeansError> {
    if !data.is_standard_layout() {
        *data = data.as_standard_layout().into_owned();
    }
    let (max_abs, finite) = (data.iter()).fold((0.0_f64, true), |(m, finite), &x| {
        (
            if x.abs() > m { x.abs() } else { m },
            finite & (x - x == 0.0),
        )
    });
    if !finite
        && let Some(((row, column), &value)) = data.indexed_iter().find(|(_, v)| !v.is_finite())
    {
        return Err(KMeansError::NonFinite { row, column, value });
    }
    let factor = if max_abs == 0.0 {
        1.0
    } else {
        // Biased exponent `b` of max_abs (0 for subnormals): for normal
        // numbers 2^(b-1023) <= max_abs < 2^(b-1022), so 2^(1022-b) maps it
        // into [0.5, 1). Clamping keeps the factor a normal power of two.
        let biased = ((max_abs.to_bits() >> 52) & 0x7FF) as i64;
        let exponent = (1022 - biased).max(-1022);
        f64::from_bits(((exponent + 1023) as u64) << 52)
    };
    data.mapv_inplace(|v| v * factor);
    Ok(())
}

/// Squared Euclidean distance: coordinate `j` into partial sum `j mod 4`, then
/// `(s0 + s1) + (s2 + s3)`. Four independent sums run four times as fast as
/// one, whose every addition waits for the previous one.
fn squared_distance(a: ArrayView1<f64>, b: ArrayView1<f64>) -> f64 {
    match (a.as_slice(), b.as_slice()) {
        (Some(a), Some(b)) => squared_distance_of(a, b),
        _ => squared_distance_of(&a.to_vec(), &b.to_vec()),
    }
}

fn squared_distance_of(a: &[f64], b: &[f64]) -> f64 {
    let mut sums = [0.0; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let (a_rest, b_rest) = (a4.remainder(), b4.remainder());
    for (x, y) in a4.zip(b4) {
        for lane in 0..4 {
            let d = x[lane] - y[lane];
            sums[lane] += d * d;
        }
    }
    for (lane, (x, y)) in a_rest.iter().zip(b_rest).enumerate() {
        sums[lane] += (x - y) * (x - y);
    }
    (sums[0] + sums[1]) + (sums[2] + sums[3])
}

/// k-means++ seeding: `k` distinct rows of `data` chosen as initial centres.
fn seed_centres(data: &Array2<f64>, k: usize, rng: &mut Pcg64Mcg, threads: usize) -> Array2<f64> {
    let n = data.nrows();
    let mut chosen = Vec::with_capacity(k);
    let mut is_centre = vec![false; n];
    let mut nearest = vec![f64::INFINITY; n];
    let mut next = uniform_index(rng, n);
    loop {
        chosen.push(next);
        is_centre[next] = true;
        if chosen.len() == k {
            return data.select(Axis(0), &chosen);
        }
        let centre = data.row(next);
        // Each row's nearest distance on its own, so blocks of rows go to the threads.
        const ROWS: usize = 128;
        let tasks: Vec<_> = (nearest.chunks_mut(ROWS))
            .zip(data.axis_chunks_iter(Axis(0), ROWS))
            .collect();
        run_tasks(tasks, threads, |(nearest, rows)| {
            for (d2, x) in nearest.iter_mut().zip(rows.outer_iter()) {
                *d2 = d2.min(squared_distance(x, centre));
            }
        });
        let total = nearest.iter().fold(0.0, |acc, &d2| acc + d2);
        next = if total > 0.0 {
            pick_proportional(&nearest, uniform_unit(rng) * total)
        } else {
            // Every remaining row duplicates a centre: pick one uniformly.
            let j = uniform_index(rng, n - chosen.len());
            nth_unchosen(&is_centre, j)
        };
    }
}

/// The first row whose running sum of `weights` exceeds `target`, or the last
/// row with positive weight if rounding left none (requires a positive sum).
/// Rows of weight zero (existing centres) are never returned.
fn pick_proportional(weights: &[f64], target: f64) -> usize {
    let mut running = 0.0;
    let mut last_positive = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            running += w;
            last_positive = i;
            if running > target {
                return i;
            }
        }
    }
    last_positive
}

/// The `j`-th (0-based) row that is not yet a centre; `j` is below the number
/// of such rows.
fn nth_unchosen(is_centre: &[bool], j: usize) -> usize {
    is_centre
        .iter()
        .enumerate()
        .filter(|&(_, &taken)| !taken)
        .nth(j)
        .map_or(0, |(i, _)| i)
}

/// Writes into `labels` the nearest centre of every row (lowest index on ties),
/// blocks of rows shared out between `threads`.
///
/// The exact distances (the four-sum order above) decide, but most rows need not compute
/// them: a GEMM gives every `|c|^2 - 2 x.c` (the row's distances less `|x|^2`) within a
/// known rounding bound, and when the nearest centre leads the others by more than that
/// bound it is the exact nearest too. Only rows with a closer race take the exact path.
fn assign(
    data: &Array2<f64>,
    norms: &[f64],
    centres: &Array2<f64>,
    labels: &mut Vec<usize>,
    threads: usize,
) {
    const ROWS: usize = 64;
    labels.clear();
    labels.resize(data.nrows(), 0);
    let mut cross = Array2::zeros((data.nrows(), centres.nrows()));
    gemm::abt(data.view(), centres.view(), cross.view_mut(), threads);
    let centre_norms: Vec<f64> = centres.outer_iter().map(|c| c.dot(&c)).collect();
    let largest_centre = centre_norms.iter().fold(0.0f64, |m, &v| m.max(v));
    // Both the GEMM's value and the exact sum are within `m ε` times the sum of the
    // magnitudes they add (at most 2 (|x|^2 + |c|^2) for each), m the dimension: a
    // lead above `16 m ε (|x|^2 + max |c|^2)` is beyond both errors, with room.
    let bound = 16.0 * data.ncols().max(1) as f64 * f64::EPSILON;
    let tasks: Vec<_> = labels
        .chunks_mut(ROWS)
        .zip(data.axis_chunks_iter(Axis(0), ROWS))
        .zip(cross.axis_chunks_iter(Axis(0), ROWS))
        .zip(norms.chunks(ROWS))
        .collect();
    run_tasks(tasks, threads, |(((labels, rows), cross), norms)| {
        let rows = rows.outer_iter().zip(cross.outer_iter()).zip(norms);
        for (label, ((x, cross), &norm)) in labels.iter_mut().zip(rows) {
            let (mut best, mut best_d, mut runner_up) = (0, f64::INFINITY, f64::INFINITY);
            for (c, (&norm, &dot)) in centre_norms.iter().zip(&cross).enumerate() {
                let d = norm - 2.0 * dot;
                if d < best_d {
                    (best, best_d, runner_up) = (c, d, best_d);
                } else if d < runner_up {
                    runner_up = d;
                }
            }
            let margin = bound * (norm + largest_centre);
            *label = if runner_up - best_d > margin {
                best
            } else {
                nearest_exactly(x, centres)
            };
        }
    });
}

/// The nearest centre by the exact squared distance, lowest index on ties.
fn nearest_exactly(x: ArrayView1<f64>, centres: &Array2<f64>) -> usize {
    let mut best = (0, f64::INFINITY);
    for (c, centre) in centres.outer_iter().enumerate() {
        let d2 = squared_distance(x, centre);
        if d2 < best.1 {
            best = (c, d2);
        }
    }
    best.0
}

/// Gives every empty cluster, in increasing index order, the point farthest
/// from its current centre among clusters with at least two members (lowest
/// row on ties), and centres the emptied cluster on that point.
fn reseed_empty(data: &Array2<f64>, labels: &mut [usize], centres: &mut Array2<f64>) {
    let mut sizes = vec![0_usize; centres.nrows()];
    for &c in labels.iter() {
        sizes[c] += 1;
    }
    for empty in 0..sizes.len() {
        if sizes[empty] > 0 {
            continue;
        }
        let mut farthest: Option<(usize, f64)> = None;
        for (i, x) in data.outer_iter().enumerate() {
            let c = labels[i];
            if sizes[c] >= 2 {
                let d2 = squared_distance(x, centres.row(c));
                if farthest.is_none_or(|(_, best)| d2 > best) {
                    farthest = Some((i, d2));
                }
            }
        }
        // With k <= n some cluster has two or more members while one is empty.
        if let Some((i, _)) = farthest {
            sizes[labels[i]] -= 1;
            sizes[empty] = 1;
            labels[i] = empty;
            centres.row_mut(empty).assign(&data.row(i));
        }
    }
}

/// Recomputes each centre as the mean of its (non-empty) cluster: coordinates
/// summed in row order, then divided by the cluster size.
fn update_centres(data: &Array2<f64>, labels: &[usize], centres: &mut Array2<f64>) {
    let mut sizes = vec![0_usize; centres.nrows()];
    centres.fill(0.0);
    for (x, &c) in data.outer_iter().zip(labels) {
        let mut centre = centres.row_mut(c);
        centre += &x;
        sizes[c] += 1;
    }
    for (mut centre, &size) in centres.outer_iter_mut().zip(&sizes) {
        centre /= size as f64;
    }
}

/// Renumbers cluster ids in order of first appearance.
fn canonical(labels: &[usize], k: usize) -> Vec<usize> {
    let mut renamed: Vec<Option<usize>> = vec![None; k];
    let mut fresh = 0;
    labels
        .iter()
        .map(|&c| {
            *renamed[c].get_or_insert_with(|| {
                fresh += 1;
                fresh - 1
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, ShapeBuilder, array, s};

    /// Deterministic pseudo-random points in `[-1, 1)^d` for tests.
    fn random_points(n: usize, d: usize, seed: u64) -> Array2<f64> {
        let mut rng = generator(seed);
        Array2::from_shape_simple_fn((n, d), || 2.0 * uniform_unit(&mut rng) - 1.0)
    }

    /// Blobs of `per_blob` points uniformly within ±1 of each centre, in a
    /// deterministically shuffled row order; returns points and true blob ids.
    fn blobs(centres: &Array2<f64>, per_blob: usize, seed: u64) -> (Array2<f64>, Vec<usize>) {
        let (k, d) = centres.dim();
        let mut rng = generator(seed);
        let mut truth: Vec<usize> = (0..k * per_blob).map(|i| i % k).collect();
        // Fisher–Yates shuffle so blobs are not in row order.
        for i in (1..truth.len()).rev() {
            truth.swap(i, uniform_index(&mut rng, i + 1));
        }
        let points = Array2::from_shape_fn((truth.len(), d), |(i, j)| {
            centres[[truth[i], j]] + 2.0 * uniform_unit(&mut rng) - 1.0
        });
        (points, truth)
    }

    #[test]
    fn screened_assignment_is_the_exact_one() {
        let random = |n, d, k, seed| {
            let mut data = random_points(n, d, seed);
            normalise(&mut data).expect("finite points");
            let centres = seed_centres(&data, k, &mut generator(seed + 1), 1);
            (data, centres)
        };
        // Grid points against grid points: distances tie exactly, and the screen must
        // hand those rows to the exact path, whose lowest-index rule decides.
        let grid = Array2::from_shape_fn((300, 6), |(i, j)| ((i * 7 + j * 3) % 5) as f64);
        let grid_centres = grid.slice(s![10..19, ..]).to_owned();
        let tied = grid.outer_iter().any(|x| {
            let d: Vec<f64> = grid_centres
                .outer_iter()
                .map(|c| squared_distance(x, c))
                .collect();
            let best = d.iter().copied().fold(f64::INFINITY, f64::min);
            d.iter().filter(|&&v| v == best).count() > 1
        });
        assert!(tied, "the grid case has ties");
        for (data, centres) in [
            random(500, 40, 12, 3),
            random(64, 512, 16, 5),
            (grid, grid_centres),
        ] {
            let exact: Vec<usize> = (data.outer_iter())
                .map(|x| nearest_exactly(x, &centres))
                .collect();
            for threads in [1, 2, 3] {
                let mut labels = Vec::new();
                let norms: Vec<f64> = data.outer_iter().map(|x| x.dot(&x)).collect();
                assign(&data, &norms, &centres, &mut labels, threads);
                assert_eq!(labels, exact);
            }
        }
    }

    /// Canonical renumbering of arbitrary labels, for comparing partitions.
    fn relabel(labels: &[usize]) -> Vec<usize> {
        canonical(labels, labels.iter().max().map_or(0, |m| m + 1))
    }

    fn assert_valid(labels: &[usize], n: usize, k: usize) {
        assert_eq!(labels.len(), n);
        assert_eq!(relabel(labels), labels, "labels are not canonical");
        let mut seen = vec![false; k];
        for &c in labels {
            seen[c] = true;
        }
        assert!(seen.iter().all(|&s| s), "some cluster is empty: {labels:?}");
    }

    #[test]
    fn same_seed_gives_identical_output() {
        let points = random_points(200, 3, 1);
        for seed in [0, 1, 99, u64::MAX] {
            let a = kmeans(points.clone(), 7, seed, 1).unwrap();
            let b = kmeans(points.clone(), 7, seed, 1).unwrap();
            assert_eq!(a, b);
            assert_valid(&a, 200, 7);
        }
    }

    #[test]
    fn different_seeds_may_differ() {
        // Uniform noise has many local optima, so seeds lead to different ones.
        let points = random_points(300, 2, 2);
        let mut results: Vec<Vec<usize>> = (0..16)
            .map(|seed| kmeans(points.clone(), 8, seed, 1).unwrap())
            .collect();
        results.sort();
        results.dedup();
        assert!(results.len() > 1, "all 16 seeds gave the same clustering");
    }

    #[test]
    fn result_is_a_fixed_point_of_lloyds_step() {
        for (seed, (n, d, k)) in [(300, 4, 6), (150, 2, 10), (80, 7, 3), (50, 1, 5)]
            .into_iter()
            .enumerate()
        {
            let points = random_points(n, d, seed as u64 + 10);
            let labels = kmeans(points.clone(), k, seed as u64, 1).unwrap();
            assert_valid(&labels, n, k);

            // Recompute means from the assignment in the original coordinates.
            let mut means = Array2::<f64>::zeros((k, d));
            let mut sizes = vec![0.0; k];
            for (x, &c) in points.outer_iter().zip(&labels) {
                let mut mean = means.row_mut(c);
                mean += &x;
                sizes[c] += 1.0;
            }
            for (mut mean, &size) in means.outer_iter_mut().zip(&sizes) {
                mean /= size;
            }
            // Reassign: strict `<` keeps the lowest index on ties.
            for (i, x) in points.outer_iter().enumerate() {
                let d2: Array1<f64> = means
                    .outer_iter()
                    .map(|m| (&x - &m).mapv(|v| v * v).sum())
                    .collect();
                let mut best = 0;
                for c in 1..k {
                    if d2[c] < d2[best] {
                        best = c;
                    }
                }
                assert_eq!(
                    best, labels[i],
                    "row {i} moves from {} to {best}",
                    labels[i]
                );
            }
        }
    }

    #[test]
    fn recovers_well_separated_blobs_exactly() {
        let centres = array![
            [0.0, 0.0, 0.0],
            [50.0, 0.0, 0.0],
            [0.0, 50.0, 0.0],
            [0.0, 0.0, 50.0],
            [50.0, 50.0, 50.0],
        ];
        for seed in 0..20 {
            let (points, truth) = blobs(&centres, 30, seed + 100);
            let labels = kmeans(points.clone(), 5, seed, 1).unwrap();
            assert_eq!(labels, relabel(&truth), "seed {seed}");
        }
    }

    #[test]
    fn extreme_magnitudes_cluster_like_unit_scale_data() {
        let points = random_points(120, 3, 5);
        let reference = kmeans(points.clone(), 4, 8, 1).unwrap();
        for scale in [2f64.powi(1000), 2f64.powi(-1000)] {
            let scaled = points.mapv(|x| x * scale);
            assert_eq!(
                kmeans(scaled.clone(), 4, 8, 1).unwrap(),
                reference,
                "scale {scale:e}"
            );
        }
        // Blobs near the top of the f64 range: naive squared distances overflow.
        let centres = array![[-1e308, 0.0], [1e308, 0.0], [0.0, 1e308]];
        let (points, truth) = blobs(&centres, 10, 3);
        assert_eq!(kmeans(points.clone(), 3, 0, 1).unwrap(), relabel(&truth));
    }

    #[test]
    fn memory_layout_does_not_matter() {
        let points = random_points(90, 4, 6);
        let expected = kmeans(points.clone(), 5, 3, 1).unwrap();

        let mut column_major = Array2::zeros((90, 4).f());
        column_major.assign(&points);
        assert!(!column_major.is_standard_layout());
        assert_eq!(kmeans(column_major.clone(), 5, 3, 1).unwrap(), expected);

        let mut padded = Array2::from_elem((180, 8), f64::NAN);
        padded.slice_mut(s![..;2, 1..;2]).assign(&points);
        assert_eq!(
            kmeans(padded.slice(s![..;2, 1..;2]).to_owned(), 5, 3, 1).unwrap(),
            expected
        );
    }

    #[test]
    fn n_equal_to_k_puts_every_point_alone() {
        let points = random_points(9, 2, 7);
        assert_eq!(
            kmeans(points.clone(), 9, 4, 1).unwrap(),
            (0..9).collect::<Vec<_>>()
        );
        let one = array![[3.0, 4.0]];
        assert_eq!(kmeans(one.clone(), 1, 0, 1).unwrap(), [0]);
    }

    #[test]
    fn duplicate_points_still_fill_every_cluster() {
        // All rows identical: still k non-empty clusters.
        let same = Array2::from_elem((6, 2), 1.5);
        for seed in 0..5 {
            assert_valid(&kmeans(same.clone(), 3, seed, 1).unwrap(), 6, 3);
        }
        assert_eq!(
            kmeans(same.clone(), 6, 0, 1).unwrap(),
            (0..6).collect::<Vec<_>>()
        );

        // Two distinct locations, five copies each.
        let two = Array2::from_shape_fn((10, 2), |(i, _)| if i % 2 == 0 { 0.0 } else { 8.0 });
        let parity: Vec<usize> = (0..10).map(|i| i % 2).collect();
        for seed in 0..10 {
            assert_eq!(kmeans(two.clone(), 2, seed, 1).unwrap(), parity);
            // Three clusters over two locations: every cluster is still pure.
            let labels = kmeans(two.clone(), 3, seed, 1).unwrap();
            assert_valid(&labels, 10, 3);
            for i in 0..10 {
                for j in 0..10 {
                    if labels[i] == labels[j] {
                        assert_eq!(i % 2, j % 2, "mixed cluster in {labels:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn zero_columns_are_accepted() {
        let empty_rows = Array2::<f64>::zeros((4, 0));
        assert_valid(&kmeans(empty_rows.clone(), 2, 0, 1).unwrap(), 4, 2);
    }

    #[test]
    fn thread_count_does_not_matter() {
        let points = random_points(700, 9, 5);
        let one = kmeans(points.clone(), 12, 3, 1).unwrap();
        for threads in [2, 3] {
            assert_eq!(kmeans(points.clone(), 12, 3, threads).unwrap(), one);
        }
    }

    #[test]
    fn result_is_pinned() {
        // Golden output: changing it breaks reproducibility of saved runs.
        let points = random_points(12, 2, 42);
        assert_eq!(kmeans(points.clone(), 3, 42, 1).unwrap(), GOLDEN_12_3_42);
    }

    const GOLDEN_12_3_42: [usize; 12] = [0, 0, 1, 0, 2, 2, 0, 1, 2, 2, 0, 0];

    #[test]
    fn invalid_inputs_are_errors() {
        let no_rows = Array2::<f64>::zeros((0, 3));
        assert_eq!(kmeans(no_rows.clone(), 1, 0, 1), Err(KMeansError::NoPoints));
        assert_eq!(kmeans(no_rows.clone(), 0, 0, 1), Err(KMeansError::NoPoints));

        let points = random_points(5, 2, 0);
        assert_eq!(
            kmeans(points.clone(), 0, 0, 1),
            Err(KMeansError::ZeroClusters)
        );
        assert_eq!(
            kmeans(points.clone(), 6, 0, 1),
            Err(KMeansError::TooManyClusters { k: 6, points: 5 })
        );

        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut points = random_points(5, 3, 0);
            points[[3, 2]] = bad;
            points[[4, 0]] = bad;
            let mut column_major = Array2::zeros((5, 3).f());
            column_major.assign(&points);
            for view in [points.view(), column_major.view()] {
                let err = kmeans(view.to_owned(), 2, 0, 1).unwrap_err();
                assert!(matches!(
                    err,
                    KMeansError::NonFinite { row: 3, column: 2, value }
                        if value.to_bits() == bad.to_bits()
                ));
            }
        }
    }

    #[test]
    fn error_messages_are_informative() {
        let messages = [
            KMeansError::NoPoints.to_string(),
            KMeansError::ZeroClusters.to_string(),
            KMeansError::TooManyClusters { k: 6, points: 5 }.to_string(),
            KMeansError::NonFinite {
                row: 3,
                column: 2,
                value: f64::NAN,
            }
            .to_string(),
        ];
        assert!(messages[0].contains("zero rows"));
        assert!(messages[1].contains("k = 0"));
        assert!(messages[2].contains("6 non-empty clusters from 5 points"));
        assert!(messages[3].contains("point 3") && messages[3].contains("NaN"));
    }
}
